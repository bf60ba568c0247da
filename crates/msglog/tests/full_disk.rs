//! A write that fails for want of space costs that batch only: once space returns the writer
//! appends again (no restart), and a reopened log holds every batch that was reported durable.
//! Needs root (a 4 MiB tmpfs, unmounted on drop even after a failure).
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use devid_msglog::{LogWriter, Options, RecordRef};

struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "devid-msglog-test",
            ])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed (this test needs root)");
        Tmpfs {
            dir,
            _parent: parent,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn rec(payload: &[u8]) -> RecordRef<'_> {
    RecordRef {
        device_id: "d",
        topic: "devices/d/telemetry/t",
        msg_id: None,
        payload,
        qos: 1,
        received_ms: 1,
    }
}

#[test]
fn a_failed_append_on_a_full_disk_is_repaired_once_space_returns() {
    let fs = Tmpfs::mount("4m");
    let log = fs.dir.join("log");
    let opts = Options {
        segment_bytes: 1 << 20,
        preallocate: false,
    };
    let (mut w, _) = LogWriter::open(&log, opts, 0, 1, |_, _| {}).unwrap();
    let payload = vec![7u8; 16 << 10];
    let mut durable = Vec::new();
    let mut out = Vec::new();
    for _ in 0..10 {
        out.clear();
        w.append([rec(&payload)], &mut out).unwrap();
        durable.push(out[0].seq);
    }
    // fill the rest of the disk
    let mut filler = std::fs::File::create(fs.dir.join("filler")).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while filler.write_all(&chunk).is_ok() {}
    drop(filler);
    out.clear();
    let e = w.append([rec(&payload)], &mut out).unwrap_err();
    assert!(out.is_empty(), "nothing of a failed batch is reported");
    eprintln!("append on a full disk: {e}");
    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    for _ in 0..10 {
        out.clear();
        w.append([rec(&payload)], &mut out)
            .expect("appends work again once space returned");
        durable.push(out[0].seq);
    }
    drop(w);
    let mut seen = Vec::new();
    LogWriter::open(&log, opts, 0, 1, |e, _| seen.push(e.seq)).unwrap();
    assert_eq!(seen, durable, "every durable record, nothing else");
}
