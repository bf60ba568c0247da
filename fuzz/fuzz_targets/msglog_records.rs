//! Fuzz the server's message-log record parser (it reads segment files from the disk at
//! recovery and every record a query returns).
//!
//! Each input is scanned as a whole segment: no panic, consecutive seqs, every record
//! re-encodes to exactly the bytes it was read from. The deterministic stand-ins that run with
//! the unit tests are in crates/msglog/src/record.rs (every torn tail, every flipped bit).
#![no_main]

use devid_msglog::{decode_record, encode_record, scan_segment, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_record(data);
    let scan = scan_segment(data);
    let mut last: Option<u64> = None;
    for (off, r) in &scan.records {
        assert!(last.is_none_or(|l| r.seq == l + 1));
        last = Some(r.seq);
        let mut buf = Vec::new();
        let n = encode_record(r.seq, &r.as_ref(), &mut buf).expect("a decoded record re-encodes");
        let at = *off as usize;
        assert_eq!(&data[at..at + n], &buf[..], "re-encoding gives the same bytes");
        match decode_record(&buf) {
            Decoded::Record(back, used) => {
                assert_eq!(used, n);
                assert_eq!(&back, r);
            }
            other => panic!("re-encoded record does not decode: {other:?}"),
        }
    }
    assert!(scan.valid_end <= data.len());
});
