//! The log on a real filesystem: append and read back, recovery with replay, torn tails,
//! rotation, corruption in the middle refused.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use devid_msglog::{Entry, LogError, LogReader, LogRecord, LogWriter, Options, RecordRef};

fn msg(i: u64) -> (String, Vec<u8>) {
    (
        format!("devices/d{}/telemetry/t", i % 3),
        vec![i as u8; (i % 50) as usize + 1],
    )
}

fn append_n(w: &mut LogWriter, from: u64, n: u64) -> Vec<Entry> {
    let owned: Vec<_> = (from..from + n).map(msg).collect();
    let mut out = Vec::new();
    w.append(
        owned
            .iter()
            .enumerate()
            .map(|(k, (topic, payload))| RecordRef {
                device_id: "d",
                topic,
                msg_id: (k % 2 == 0).then_some("k"),
                payload,
                qos: 1,
                received_ms: 5,
            }),
        &mut out,
    )
    .unwrap();
    out
}

fn open(dir: &Path, opts: Options, indexed: u64) -> (LogWriter, Vec<(Entry, LogRecord)>) {
    let mut replay = Vec::new();
    let (w, _) = LogWriter::open(dir, opts, indexed, 1, |e, r| replay.push((e, r))).unwrap();
    (w, replay)
}

#[test]
fn append_read_back_and_replay_above_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_bytes: 4096,
        preallocate: false,
    };
    let (mut w, replay) = open(dir.path(), opts, 0);
    assert!(replay.is_empty());
    let mut all = Vec::new();
    for b in 0..20 {
        all.extend(append_n(&mut w, b * 10, 10));
    }
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    assert!(
        all.last().unwrap().pos.segment() > 2,
        "rotated: {:?}",
        all.last()
    );
    let r = LogReader::new(dir.path());
    for (i, e) in all.iter().enumerate() {
        let rec = r.read(e.seq, e.pos, e.len).unwrap();
        let (topic, payload) = msg(i as u64 - (i as u64 % 10) + (i as u64 % 10));
        assert_eq!(rec.topic, topic);
        assert_eq!(rec.payload, payload);
    }
    // the wrong seq at a position is refused
    assert!(matches!(
        r.read(all[5].seq + 1, all[5].pos, all[5].len),
        Err(LogError::NotFound { .. })
    ));
    drop(w);
    // reopen: everything above the index comes back, in order, at the same places
    let (mut w, replay) = open(dir.path(), opts, 150);
    let got: Vec<u64> = replay.iter().map(|(e, _)| e.seq).collect();
    assert_eq!(got, (151..=200).collect::<Vec<_>>());
    for (e, _) in &replay {
        assert_eq!(*e, all[e.seq as usize - 1]);
    }
    assert_eq!(w.next_seq(), 201);
    let more = append_n(&mut w, 0, 1);
    assert_eq!(more[0].seq, 201);
}

#[test]
fn torn_tail_is_cut_and_never_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default();
    let (mut w, _) = open(dir.path(), opts, 0);
    let es = append_n(&mut w, 0, 5);
    drop(w);
    let seg = dir.path().join("seg-0000000000.log");
    let full = std::fs::read(&seg).unwrap();
    // a crash in the middle of the next batch's write: half a record of garbage
    let mut torn = full.clone();
    torn.extend_from_slice(&full[..30]);
    std::fs::write(&seg, &torn).unwrap();
    let mut replay = Vec::new();
    let (mut w, rec) = LogWriter::open(dir.path(), opts, 0, 1, |e, r| replay.push((e, r))).unwrap();
    assert_eq!(rec.torn_bytes, 30);
    assert_eq!(rec.replayed, 5);
    assert_eq!(std::fs::read(&seg).unwrap().len(), full.len(), "cut off");
    let next = append_n(&mut w, 5, 1);
    assert_eq!(next[0].seq, 6);
    assert_eq!(next[0].pos.offset() as usize, full.len());
    assert_eq!(es.len(), 5);
}

#[test]
fn corruption_before_the_last_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_bytes: 600,
        preallocate: false,
    };
    let (mut w, _) = open(dir.path(), opts, 0);
    for b in 0..10 {
        append_n(&mut w, b * 4, 4);
    }
    drop(w);
    let seg = dir.path().join("seg-0000000001.log");
    let mut b = std::fs::read(&seg).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    std::fs::write(&seg, &b).unwrap();
    let err = LogWriter::open(dir.path(), opts, 0, 1, |_, _| {}).unwrap_err();
    assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("seg-0000000001.log"), "{err}");
}

#[test]
fn a_higher_index_moves_the_sequence_to_a_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default();
    let (mut w, _) = open(dir.path(), opts, 0);
    append_n(&mut w, 0, 3);
    drop(w);
    // the index already holds ids up to 99 (rows from before the log existed)
    let (mut w, _) = LogWriter::open(dir.path(), opts, 3, 100, |_, _| {}).unwrap();
    let e = append_n(&mut w, 3, 2);
    assert_eq!(e[0].seq, 100);
    assert_eq!(e[0].pos.segment(), 1, "the jump starts a new segment");
    drop(w);
    let mut replay = Vec::new();
    LogWriter::open(dir.path(), opts, 0, 1, |e, _| replay.push(e.seq)).unwrap();
    assert_eq!(
        replay,
        vec![1, 2, 3, 100, 101],
        "nothing lost across the jump"
    );
}

#[test]
fn prepared_segments_are_used_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_bytes: 64 << 10,
        preallocate: true,
    };
    let (mut w, _) = open(dir.path(), opts, 0);
    let mut all = append_n(&mut w, 0, 3);
    assert_eq!(
        all[0].pos.segment(),
        0,
        "the first segment grows by appending"
    );
    // wait for the preparer's zero-filled spare
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let spare = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("spare-"));
        if spare || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    // the next append moves to the prepared segment at once
    all.extend(append_n(&mut w, 3, 3));
    assert_eq!(all[3].pos.segment(), 1);
    let seg1 = dir.path().join("seg-0000000001.log");
    assert_eq!(
        std::fs::metadata(&seg1).unwrap().len(),
        64 << 10,
        "zero-filled ahead"
    );
    // fill past it: rotation to the next prepared (or new) segment
    for b in 0..60 {
        all.extend(append_n(&mut w, 6 + b * 10, 10));
    }
    let r = LogReader::new(dir.path());
    for e in &all {
        assert_eq!(r.read(e.seq, e.pos, e.len).unwrap().seq, e.seq);
    }
    let last = *all.last().unwrap();
    drop(w);
    let (w, replay) = open(dir.path(), opts, 0);
    let got: Vec<u64> = replay.iter().map(|(e, _)| e.seq).collect();
    assert_eq!(
        got,
        (1..=last.seq).collect::<Vec<_>>(),
        "trailing zeros are a clean end"
    );
    assert_eq!(w.next_seq(), last.seq + 1);
    drop(w);
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("spare-"))
        .count();
    assert!(leftovers <= 1);
}
