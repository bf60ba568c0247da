//! Torn writes at every byte: the last records of the log's last segment are cut (the file
//! truncated), zeroed (a preallocated segment whose write did not reach the disk) or
//! overwritten with stale bytes at EVERY byte offset, one offset at a time, on real files.
//! Recovery must keep every complete record (and nothing else), report the torn bytes it cut
//! (`Recovered::torn_bytes`, logged as "cutting off a torn tail"), continue the sequence, and
//! the log must then reopen cleanly with the new record.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use devid_msglog::{
    list_segments, scan_segment, segment_path, LogRecord, LogWriter, Options, RecordRef,
};
use devid_testkit::robust::Report;

const OPTS: Options = Options {
    segment_bytes: 700,
    preallocate: false,
};

fn payload(i: u64) -> Vec<u8> {
    (0..(i * 13 % 61 + 1)).map(|b| (b * 7 + i) as u8).collect()
}

/// A log of `n` records in batches of 3, several segments long; returns what was written.
fn build(dir: &Path, n: u64) -> Vec<(u64, Vec<u8>)> {
    let (mut w, _) = LogWriter::open(dir, OPTS, 0, 1, |_, _| {}).unwrap();
    let mut written = Vec::new();
    let mut i = 0;
    while i < n {
        let batch: Vec<(String, Vec<u8>)> = (i..(i + 3).min(n))
            .map(|k| (format!("k-{k}"), payload(k)))
            .collect();
        let mut out = Vec::new();
        w.append(
            batch.iter().map(|(id, p)| RecordRef {
                device_id: "dev",
                topic: "devices/dev/telemetry/t",
                msg_id: Some(id),
                payload: p,
                qos: 1,
                received_ms: 1,
            }),
            &mut out,
        )
        .unwrap();
        for (e, (_, p)) in out.iter().zip(&batch) {
            written.push((e.seq, p.clone()));
        }
        i += 3;
    }
    written
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn open_all(dir: &Path) -> (LogWriter, Vec<LogRecord>, devid_msglog::Recovered) {
    let mut got = Vec::new();
    let (w, rec) = LogWriter::open(dir, OPTS, 0, 1, |_, r| got.push(r)).unwrap();
    (w, got, rec)
}

#[derive(Clone, Copy, Debug)]
enum Tear {
    /// The file ends at the offset (a crash while the file grew).
    Truncate,
    /// The bytes from the offset on are zero (a preallocated segment).
    Zeros,
    /// The bytes from the offset on are stale garbage of the same length.
    Garbage,
}

#[test]
fn torn_tail_at_every_byte_offset_keeps_exactly_the_complete_records() {
    let base = tempfile::tempdir().unwrap();
    let orig = base.path().join("orig");
    let written = build(&orig, 40);
    let segs = list_segments(&orig).unwrap();
    assert!(segs.len() >= 3, "several segments: {segs:?}");
    let last = *segs.last().unwrap();
    let last_path = segment_path(&orig, last);
    let bytes = std::fs::read(&last_path).unwrap();
    let scan = scan_segment(&bytes);
    assert!(scan.stopped.is_none() && scan.valid_end == bytes.len());
    // record boundaries in the last segment: (start, end, seq)
    let mut bounds: Vec<(usize, usize, u64)> = Vec::new();
    for (k, (off, r)) in scan.records.iter().enumerate() {
        let end = scan
            .records
            .get(k + 1)
            .map(|(o, _)| *o as usize)
            .unwrap_or(bytes.len());
        bounds.push((*off as usize, end, r.seq));
    }
    assert!(bounds.len() >= 3, "the last segment holds its last batch");
    let first_seq_last = bounds[0].2;
    // every offset from the start of the last three records to the end (the end itself is
    // the control: nothing torn)
    let from = bounds[bounds.len() - 3].0;
    let mut cases = 0u64;
    let mut torn_cut = 0u64;
    for cut in from..=bytes.len() {
        for tear in [Tear::Truncate, Tear::Zeros, Tear::Garbage] {
            if cut == bytes.len() && !matches!(tear, Tear::Truncate) {
                continue;
            }
            let dir = base.path().join(format!("c-{cut}-{tear:?}"));
            copy_dir(&orig, &dir);
            let p = segment_path(&dir, last);
            let mut m = bytes.clone();
            match tear {
                Tear::Truncate => m.truncate(cut),
                Tear::Zeros => m[cut..].iter_mut().for_each(|b| *b = 0),
                Tear::Garbage => m[cut..]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(k, b)| *b = 0xA5 ^ (k as u8)),
            }
            std::fs::write(&p, &m).unwrap();
            let whole = bounds.iter().filter(|(_, end, _)| *end <= cut).count();
            let keep_end = if whole == 0 { 0 } else { bounds[whole - 1].1 };
            let expect_last = if whole == 0 {
                first_seq_last - 1
            } else {
                bounds[whole - 1].2
            };
            let (mut w, got, rec) = open_all(&dir);
            let ctx = format!("cut at {cut} ({tear:?}) of {}", bytes.len());
            // every complete record, in order, byte for byte, and nothing else
            assert_eq!(got.len() as u64, expect_last, "{ctx}");
            for (r, (seq, p)) in got.iter().zip(&written) {
                assert_eq!((r.seq, &r.payload), (*seq, p), "{ctx}");
            }
            assert_eq!(rec.last_seq, expect_last, "{ctx}");
            // ... and it says what it cut
            assert_eq!(rec.torn_bytes, (m.len() - keep_end) as u64, "{ctx}");
            if m.len() > keep_end {
                assert!(rec.torn_bytes > 0, "{ctx}: the tear is reported");
                torn_cut += 1;
            }
            assert_eq!(
                std::fs::metadata(&p).unwrap().len(),
                keep_end as u64,
                "{ctx}: the tail is cut on disk"
            );
            // appends continue the sequence and the log reopens cleanly with them
            let mut out = Vec::new();
            w.append(
                [RecordRef {
                    device_id: "dev",
                    topic: "devices/dev/telemetry/t",
                    msg_id: Some("after"),
                    payload: b"after",
                    qos: 1,
                    received_ms: 2,
                }],
                &mut out,
            )
            .unwrap();
            assert_eq!(out[0].seq, expect_last + 1, "{ctx}");
            drop(w);
            let (_, again, rec2) = open_all(&dir);
            assert_eq!(rec2.torn_bytes, 0, "{ctx}: reopens cleanly");
            assert_eq!(again.len() as u64, expect_last + 1, "{ctx}");
            assert_eq!(again.last().unwrap().payload, b"after", "{ctx}");
            std::fs::remove_dir_all(&dir).unwrap();
            cases += 1;
        }
    }
    eprintln!(
        "msglog torn writes: {cases} cases ({} offsets x 3 kinds), {torn_cut} torn tails cut",
        bytes.len() + 1 - from
    );
    Report::new("msglog_torn_tail_every_offset")
        .text("threats", "C2")
        .num("offsets", (bytes.len() + 1 - from) as f64)
        .num("cases", cases as f64)
        .num("torn_tails_cut", torn_cut as f64)
        .num("lost_complete_records", 0)
        .emit();
}
