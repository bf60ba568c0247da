//! Fuzz the agent's outbox record parser (it reads segment files from the disk).
//!
//! Each input is scanned as a whole segment file: no panic, records strictly increasing in
//! seq, each one re-encodes to bytes that decode to the same record. The single-record
//! decoder is run on the input too. The deterministic stand-in that runs with the unit tests
//! is crates/agent/tests/outbox_mutation.rs.
#![no_main]

use devid_agent::outbox::{decode_record, encode_record, scan_segment, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_record(data);
    let scan = scan_segment(data);
    let mut last = None;
    let mut used = 0usize;
    for r in &scan.records {
        assert!(last.is_none_or(|l| r.seq > l));
        last = Some(r.seq);
        let mut buf = Vec::new();
        encode_record(r.seq, r.epoch, r.unix_ms, &r.topic, &r.payload, &mut buf);
        used += buf.len();
        match decode_record(&buf) {
            Decoded::Record(back, n) => {
                assert_eq!(n, buf.len());
                assert_eq!(&back, r);
            }
            other => panic!("re-encoded record does not decode: {other:?}"),
        }
    }
    assert_eq!(used + scan.skipped_bytes + scan.torn_tail_bytes, data.len());
});
