//! Deterministic stand-in for the `outbox_records` fuzz target: the outbox record parser faces
//! the disk, so every truncation, every single-bit flip and thousands of seeded random
//! corruptions of a real segment must be handled without a panic, and must never yield a
//! record that was not written.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use devid_agent::outbox::{
    decode_record, encode_record, scan_segment, Cursor, Decoded, Outbox, OutboxConfig, Record,
};

fn sample() -> (Vec<u8>, Vec<Record>, Vec<usize>) {
    let mut buf = Vec::new();
    let mut recs = Vec::new();
    let mut ends = Vec::new();
    for i in 0..12u64 {
        let topic = if i % 2 == 0 {
            "telemetry/t"
        } else {
            "events/door/open"
        };
        let payload: Vec<u8> = (0..(i * 7 % 40)).map(|b| (b * 31 + i) as u8).collect();
        encode_record(
            100 + i,
            0xabcdef,
            1_700_000_000_000 + i,
            topic,
            &payload,
            &mut buf,
        );
        ends.push(buf.len());
        recs.push(Record {
            seq: 100 + i,
            epoch: 0xabcdef,
            unix_ms: 1_700_000_000_000 + i,
            topic: topic.into(),
            payload,
        });
    }
    (buf, recs, ends)
}

/// Every record found is one that was written, in increasing seq order.
fn check_sound(found: &[Record], written: &HashMap<u64, Record>) {
    let mut last = None;
    for r in found {
        assert_eq!(
            written.get(&r.seq),
            Some(r),
            "a record that was never written"
        );
        assert!(last.is_none_or(|l| r.seq > l));
        last = Some(r.seq);
    }
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn truncations_keep_exactly_the_whole_records() {
    let (buf, recs, ends) = sample();
    let written: HashMap<u64, Record> = recs.iter().map(|r| (r.seq, r.clone())).collect();
    for len in 0..=buf.len() {
        let s = scan_segment(&buf[..len]);
        check_sound(&s.records, &written);
        let whole = ends.iter().filter(|e| **e <= len).count();
        assert_eq!(s.records.len(), whole, "cut at {len}");
        let kept = ends.get(whole.wrapping_sub(1)).copied().unwrap_or(0);
        assert_eq!(s.torn_tail_bytes, len - kept);
        assert_eq!(s.skipped_bytes, 0);
    }
}

#[test]
fn every_bit_flip_loses_only_the_record_it_hits() {
    let (buf, recs, ends) = sample();
    let written: HashMap<u64, Record> = recs.iter().map(|r| (r.seq, r.clone())).collect();
    for pos in 0..buf.len() {
        let hit = ends.iter().position(|e| pos < *e).unwrap();
        for bit in 0..8 {
            let mut m = buf.clone();
            m[pos] ^= 1 << bit;
            let s = scan_segment(&m);
            check_sound(&s.records, &written);
            let seqs: Vec<u64> = s.records.iter().map(|r| r.seq).collect();
            let expect: Vec<u64> = recs
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != hit)
                .map(|(_, r)| r.seq)
                .collect();
            assert_eq!(seqs, expect, "flip bit {bit} at {pos}");
            assert!(matches!(
                decode_record(&m[if hit == 0 { 0 } else { ends[hit - 1] }..]),
                Decoded::Corrupt(_) | Decoded::Incomplete { .. }
            ));
        }
    }
}

#[test]
fn seeded_random_corruption_never_invents_records() {
    let (buf, recs, _) = sample();
    let written: HashMap<u64, Record> = recs.iter().map(|r| (r.seq, r.clone())).collect();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..5000 {
        let mut m = buf.clone();
        match round % 4 {
            0 => {
                for _ in 0..(1 + rng.next() % 8) {
                    let p = (rng.next() as usize) % m.len();
                    m[p] = rng.next() as u8;
                }
            }
            1 => {
                let p = (rng.next() as usize) % m.len();
                let n = 1 + (rng.next() as usize) % 32;
                m.drain(p..(p + n).min(m.len()));
            }
            2 => {
                let p = (rng.next() as usize) % m.len();
                let junk: Vec<u8> = (0..(rng.next() % 64)).map(|_| rng.next() as u8).collect();
                m.splice(p..p, junk);
            }
            _ => {
                // duplicate a slice (a replayed write)
                let a = (rng.next() as usize) % m.len();
                let b = (a + (rng.next() as usize) % 200).min(m.len());
                let dup = m[a..b].to_vec();
                m.splice(b..b, dup);
            }
        }
        let s = scan_segment(&m);
        check_sound(&s.records, &written);
        let used: usize = s.records.iter().map(Record::encoded_len).sum();
        assert_eq!(used + s.skipped_bytes + s.torn_tail_bytes, m.len());
    }
    // pure noise
    for _ in 0..500 {
        let n = (rng.next() % 4096) as usize;
        let noise: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        let s = scan_segment(&noise);
        assert!(s.records.is_empty());
    }
}

#[test]
fn corrupted_segment_on_disk_is_recovered_on_open() {
    let d = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = OutboxConfig::new(d.path().join("outbox"));
    let ob = Outbox::open(cfg.clone()).unwrap();
    for i in 0..200u32 {
        rt.block_on(ob.append("telemetry/x", i.to_be_bytes().to_vec()))
            .unwrap();
    }
    ob.close();
    drop(ob);
    let seg = std::fs::read_dir(&cfg.dir)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("seg-"))
        .unwrap()
        .path();
    let original = std::fs::read(&seg).unwrap();
    let mut rng = XorShift(42);
    for round in 0..40 {
        let mut m = original.clone();
        for _ in 0..(1 + round % 5) {
            let p = (rng.next() as usize) % m.len();
            m[p] ^= 1 << (rng.next() % 8);
        }
        if round % 3 == 0 {
            let cut = m.len() - (rng.next() as usize) % 50;
            m.truncate(cut);
        }
        std::fs::write(&seg, &m).unwrap();
        let _ = std::fs::remove_file(cfg.dir.join("acked"));
        let ob = Outbox::open(cfg.clone()).unwrap();
        let mut c = Cursor::new(0);
        let mut got = Vec::new();
        loop {
            let b = ob.read_batch(&mut c, 64, 1 << 20).unwrap();
            if b.is_empty() {
                break;
            }
            got.extend(b);
        }
        assert!(
            got.len() >= 190 && got.len() <= 200,
            "round {round}: {}",
            got.len()
        );
        for r in &got {
            assert_eq!(r.payload, (r.seq as u32).to_be_bytes(), "round {round}");
        }
        assert_eq!(ob.stats().depth as usize, got.len());
        // appends continue after the recovered data
        let a = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), ob.append("events/e", vec![1])).await
            })
            .unwrap()
            .unwrap();
        assert!(a.seq > got.last().unwrap().seq);
        ob.close();
        drop(ob);
        // restore for the next round (and drop the segment the append created)
        for e in std::fs::read_dir(&cfg.dir).unwrap().filter_map(Result::ok) {
            std::fs::remove_file(e.path()).unwrap();
        }
        std::fs::write(&seg, &original).unwrap();
    }
}
