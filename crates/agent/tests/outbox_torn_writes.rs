//! Torn writes at every byte on real files: the outbox's last segment is cut (truncated) or
//! its tail zeroed at EVERY byte offset of its last three records, with and without the
//! record MAC key the agent uses. `Outbox::open` must keep every complete record (and no
//! other), count the torn bytes it cut (`OutboxStats::corrupt_bytes`, logged as "outbox
//! segment had torn or corrupt data"), go on appending, and reopen cleanly afterwards.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devid_agent::outbox::{Cursor, Outbox, OutboxConfig, Record, MAC_TAG_LEN};
use devid_testkit::robust::Report;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn cfg(dir: &Path, keyed: bool) -> OutboxConfig {
    let mut c = OutboxConfig::new(dir.to_path_buf());
    c.segment_bytes = 600;
    if keyed {
        c.mac_key = Some(Arc::new(devid_vault::SecretBytes::from_slice(&[7u8; 32])));
    }
    c
}

fn payload(i: u32) -> Vec<u8> {
    (0..(i * 11 % 47 + 1)).map(|b| (b * 5 + i) as u8).collect()
}

fn drain(ob: &Outbox) -> Vec<Record> {
    let mut c = Cursor::new(0);
    let mut got = Vec::new();
    for _ in 0..1000 {
        let b = ob.read_batch(&mut c, 64, 1 << 20).unwrap();
        if b.is_empty() {
            return got;
        }
        got.extend(b);
    }
    panic!("read_batch never ran dry");
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".log"))
        })
        .collect();
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn every_offset(keyed: bool) -> (u64, u64) {
    let rt = rt();
    let base = tempfile::tempdir().unwrap();
    let orig = base.path().join("orig");
    let ob = Outbox::open(cfg(&orig, keyed)).unwrap();
    let mut written = Vec::new();
    for i in 0..30u32 {
        let a = rt.block_on(ob.append("telemetry/t", payload(i))).unwrap();
        written.push((a.seq, payload(i)));
    }
    ob.close();
    drop(ob);
    let segs = segments(&orig);
    assert!(segs.len() >= 3, "several segments: {segs:?}");
    let last = segs.last().unwrap().clone();
    let name = last.file_name().unwrap().to_owned();
    let bytes = std::fs::read(&last).unwrap();
    // the records of the last segment and where each ends
    let first_seq: u64 = name.to_str().unwrap()[4..24].parse().unwrap();
    let tag = if keyed { MAC_TAG_LEN } else { 0 };
    let mut ends = Vec::new();
    let mut at = 0usize;
    for (seq, p) in written.iter().filter(|(s, _)| *s >= first_seq) {
        let r = Record {
            seq: *seq,
            epoch: 0,
            unix_ms: 0,
            topic: "telemetry/t".into(),
            payload: p.clone(),
        };
        at += r.encoded_len() + tag;
        ends.push((at, *seq));
    }
    assert_eq!(at, bytes.len(), "record sizes add up to the segment");
    assert!(ends.len() >= 3);
    let from = ends[ends.len() - 4.min(ends.len())].0;
    let from = if ends.len() <= 3 { 0 } else { from };
    let (mut cases, mut cut_tails) = (0u64, 0u64);
    for cut in from..=bytes.len() {
        for zeros in [false, true] {
            if zeros && cut == bytes.len() {
                continue;
            }
            let dir = base.path().join(format!("c-{cut}-{zeros}"));
            copy_dir(&orig, &dir);
            let mut m = bytes.clone();
            if zeros {
                m[cut..].iter_mut().for_each(|b| *b = 0);
            } else {
                m.truncate(cut);
            }
            std::fs::write(dir.join(&name), &m).unwrap();
            let whole = ends.iter().filter(|(e, _)| *e <= cut).count();
            let keep_end = if whole == 0 { 0 } else { ends[whole - 1].0 };
            let expect_last = if whole == 0 {
                first_seq - 1
            } else {
                ends[whole - 1].1
            };
            let ctx = format!(
                "cut at {cut} of {} (zeros {zeros}, keyed {keyed})",
                bytes.len()
            );
            let ob = Outbox::open(cfg(&dir, keyed)).unwrap();
            let got = drain(&ob);
            let want: Vec<&(u64, Vec<u8>)> =
                written.iter().filter(|(s, _)| *s <= expect_last).collect();
            assert_eq!(got.len(), want.len(), "{ctx}");
            for (r, (seq, p)) in got.iter().zip(want) {
                assert_eq!((r.seq, &r.payload), (*seq, p), "{ctx}");
            }
            let st = ob.stats();
            assert_eq!(st.depth, got.len() as u64, "{ctx}");
            assert_eq!(
                st.corrupt_bytes,
                (m.len() - keep_end) as u64,
                "{ctx}: the torn bytes are reported"
            );
            if m.len() > keep_end {
                cut_tails += 1;
            }
            // appends go on after the last complete record
            let a = rt
                .block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(5),
                        ob.append("events/after", b"after".to_vec()),
                    )
                    .await
                })
                .unwrap()
                .unwrap();
            assert_eq!(a.seq, expect_last + 1, "{ctx}");
            ob.close();
            drop(ob);
            let ob = Outbox::open(cfg(&dir, keyed)).unwrap();
            let again = drain(&ob);
            assert_eq!(ob.stats().corrupt_bytes, 0, "{ctx}: reopens cleanly");
            assert_eq!(again.len(), got.len() + 1, "{ctx}");
            assert_eq!(again.last().unwrap().payload, b"after", "{ctx}");
            ob.close();
            drop(ob);
            std::fs::remove_dir_all(&dir).unwrap();
            cases += 1;
        }
    }
    (cases, cut_tails)
}

#[test]
fn outbox_torn_tail_at_every_byte_offset_keeps_exactly_the_complete_records() {
    let (plain, plain_cut) = every_offset(false);
    let (keyed, keyed_cut) = every_offset(true);
    eprintln!(
        "outbox torn writes: {plain} cases without MAC ({plain_cut} torn), {keyed} with MAC \
         ({keyed_cut} torn)"
    );
    Report::new("outbox_torn_tail_every_offset")
        .text("threats", "C1,C2")
        .num("cases", (plain + keyed) as f64)
        .num("torn_tails_cut", (plain_cut + keyed_cut) as f64)
        .num("lost_complete_records", 0)
        .emit();
}
