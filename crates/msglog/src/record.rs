//! One record of the log, on disk:
//!
//! ```text
//! 0   u32 LE  body length (bytes after the 16-byte header)
//! 4   u32 LE  CRC-32 (IEEE) of bytes 8 .. 16 + body length (seq and body)
//! 8   u64 LE  seq (never 0; +1 per record, across segments)
//! 16  body:   u8 version (1), u8 qos, i64 LE received_ms,
//!             u16 LE device id length, u16 LE topic length,
//!             u16 LE msg-id length (0xFFFF: none), u32 LE payload length,
//!             device id, topic, msg-id, payload
//! ```
//!
//! A length of zero (or fewer than 16 bytes left) ends the data of a segment. Anything that
//! does not check out (lengths, CRC, UTF-8, version) is [`Decoded::Invalid`]: the scanner
//! stops there, so a torn write at the end is cut off and never read as data.

/// Bytes before the body.
pub const HEADER_LEN: usize = 16;
/// Fixed part of the body.
const BODY_FIXED: usize = 20;
/// Largest body accepted (a PUBLISH is far smaller; this only bounds what a corrupt length
/// can make the reader allocate).
pub const MAX_BODY: usize = 64 << 20;
const VERSION: u8 = 1;
const NO_MSG_ID: u16 = u16::MAX;

/// A record to append, borrowed from the decoded PUBLISH.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// Device id (from its certificate).
    pub device_id: &'a str,
    /// Topic name.
    pub topic: &'a str,
    /// Idempotency key.
    pub msg_id: Option<&'a str>,
    /// Payload bytes.
    pub payload: &'a [u8],
    /// QoS it was published with.
    pub qos: u8,
    /// Receive time, ms since the epoch.
    pub received_ms: i64,
}

/// A record read back.
#[derive(Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Sequence number (the message's row id).
    pub seq: u64,
    /// Device id.
    pub device_id: String,
    /// Topic.
    pub topic: String,
    /// Idempotency key.
    pub msg_id: Option<String>,
    /// Payload (never logged).
    pub payload: Vec<u8>,
    /// QoS.
    pub qos: u8,
    /// Receive time, ms since the epoch.
    pub received_ms: i64,
}

impl std::fmt::Debug for LogRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogRecord")
            .field("seq", &self.seq)
            .field("device_id", &self.device_id)
            .field("topic", &self.topic)
            .field("msg_id", &self.msg_id)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl LogRecord {
    /// The borrowed form, for re-encoding.
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            device_id: &self.device_id,
            topic: &self.topic,
            msg_id: self.msg_id.as_deref(),
            payload: &self.payload,
            qos: self.qos,
            received_ms: self.received_ms,
        }
    }
}

/// Why a record cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A field is longer than the format allows.
    #[error("{0} is too long for a log record")]
    TooLong(&'static str),
}

/// The encoded length of `r`, or why it cannot be encoded.
pub fn encoded_len(r: &RecordRef<'_>) -> Result<usize, EncodeError> {
    if r.device_id.len() > usize::from(u16::MAX) {
        return Err(EncodeError::TooLong("device id"));
    }
    if r.topic.len() > usize::from(u16::MAX) {
        return Err(EncodeError::TooLong("topic"));
    }
    if r.msg_id.is_some_and(|m| m.len() >= usize::from(NO_MSG_ID)) {
        return Err(EncodeError::TooLong("msg-id"));
    }
    let body = BODY_FIXED
        + r.device_id.len()
        + r.topic.len()
        + r.msg_id.map_or(0, str::len)
        + r.payload.len();
    if body > MAX_BODY {
        return Err(EncodeError::TooLong("payload"));
    }
    Ok(HEADER_LEN + body)
}

/// Append the record `seq` to `out`; returns its length.
pub fn encode_record(seq: u64, r: &RecordRef<'_>, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
    let total = encoded_len(r)?;
    let body_len = total - HEADER_LEN;
    let start = out.len();
    out.reserve(total);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(VERSION);
    out.push(r.qos);
    out.extend_from_slice(&r.received_ms.to_le_bytes());
    // lengths checked by encoded_len
    out.extend_from_slice(&(r.device_id.len() as u16).to_le_bytes());
    out.extend_from_slice(&(r.topic.len() as u16).to_le_bytes());
    let mid = r.msg_id.map_or(NO_MSG_ID, |m| m.len() as u16);
    out.extend_from_slice(&mid.to_le_bytes());
    out.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(r.device_id.as_bytes());
    out.extend_from_slice(r.topic.as_bytes());
    if let Some(m) = r.msg_id {
        out.extend_from_slice(m.as_bytes());
    }
    out.extend_from_slice(r.payload);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(total)
}

/// What [`decode_record`] found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole, checked record and its encoded length.
    Record(LogRecord, usize),
    /// No more data: fewer than 16 bytes left or a zero length (the end of a segment).
    End,
    /// Bytes that are not a record: a torn write or corruption.
    Invalid(&'static str),
}

fn u16_at(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decode the record at the start of `buf`. Never panics.
pub fn decode_record(buf: &[u8]) -> Decoded {
    if buf.len() < HEADER_LEN {
        return if buf.iter().all(|b| *b == 0) {
            Decoded::End
        } else {
            Decoded::Invalid("truncated header")
        };
    }
    let body_len = u32_at(buf, 0) as usize;
    if body_len == 0 {
        return Decoded::End;
    }
    if !(BODY_FIXED..=MAX_BODY).contains(&body_len) {
        return Decoded::Invalid("bad length");
    }
    let total = HEADER_LEN + body_len;
    if buf.len() < total {
        return Decoded::Invalid("truncated record");
    }
    if crc32fast::hash(&buf[8..total]) != u32_at(buf, 4) {
        return Decoded::Invalid("checksum mismatch");
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&buf[8..16]);
    let seq = u64::from_le_bytes(seq);
    if seq == 0 {
        return Decoded::Invalid("seq 0");
    }
    let b = &buf[HEADER_LEN..total];
    if b[0] != VERSION {
        return Decoded::Invalid("unknown record version");
    }
    let qos = b[1];
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&b[2..10]);
    let received_ms = i64::from_le_bytes(ms);
    let dev_len = u16_at(b, 10);
    let topic_len = u16_at(b, 12);
    let mid_raw = u16_at(b, 14);
    let payload_len = u32_at(b, 16) as usize;
    let mid_len = if mid_raw == usize::from(NO_MSG_ID) {
        0
    } else {
        mid_raw
    };
    if BODY_FIXED + dev_len + topic_len + mid_len + payload_len != body_len {
        return Decoded::Invalid("field lengths do not add up");
    }
    let mut at = BODY_FIXED;
    let mut take = |n: usize| {
        let s = &b[at..at + n];
        at += n;
        s
    };
    let Ok(device_id) = std::str::from_utf8(take(dev_len)) else {
        return Decoded::Invalid("device id is not UTF-8");
    };
    let Ok(topic) = std::str::from_utf8(take(topic_len)) else {
        return Decoded::Invalid("topic is not UTF-8");
    };
    let msg_id = take(mid_len);
    let msg_id = if mid_raw == usize::from(NO_MSG_ID) {
        None
    } else {
        match std::str::from_utf8(msg_id) {
            Ok(m) => Some(m.to_owned()),
            Err(_) => return Decoded::Invalid("msg-id is not UTF-8"),
        }
    };
    let payload = take(payload_len).to_vec();
    Decoded::Record(
        LogRecord {
            seq,
            device_id: device_id.to_owned(),
            topic: topic.to_owned(),
            msg_id,
            payload,
            qos,
            received_ms,
        },
        total,
    )
}

/// The result of scanning a segment's bytes.
#[derive(Debug, Default)]
pub struct Scan {
    /// Whole, checked records with consecutive seqs, in order, with their offsets.
    pub records: Vec<(u64, LogRecord)>,
    /// Offset just past the last good record.
    pub valid_end: usize,
    /// Why the scan stopped before the end of the buffer (None: clean end).
    pub stopped: Option<&'static str>,
}

/// Scan a segment's bytes from the start: consecutive records until the end of data. Never
/// panics. A record whose seq is not the previous one's + 1 stops the scan (it cannot be part
/// of this log's sequence).
pub fn scan_segment(buf: &[u8]) -> Scan {
    let mut scan = Scan::default();
    let mut pos = 0usize;
    let mut last: Option<u64> = None;
    loop {
        match decode_record(&buf[pos..]) {
            Decoded::Record(r, len) => {
                if last.is_some_and(|l| l.checked_add(1) != Some(r.seq)) {
                    scan.stopped = Some("seq out of order");
                    break;
                }
                last = Some(r.seq);
                scan.records.push((pos as u64, r));
                pos += len;
            }
            Decoded::End => {
                if buf[pos..].iter().any(|b| *b != 0) {
                    scan.stopped = Some("data after the end marker");
                }
                break;
            }
            Decoded::Invalid(why) => {
                scan.stopped = Some(why);
                break;
            }
        }
    }
    scan.valid_end = pos;
    scan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, payload: &[u8], msg_id: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(
            seq,
            &RecordRef {
                device_id: "dev-1",
                topic: "devices/dev-1/telemetry/t",
                msg_id,
                payload,
                qos: 1,
                received_ms: 1_700_000_000_000,
            },
            &mut out,
        )
        .unwrap();
        out
    }

    #[test]
    fn round_trip_and_scan() {
        let mut seg = rec(7, b"hello", Some("k1"));
        seg.extend(rec(8, &[0, 255, 1], None));
        seg.extend(rec(9, b"", Some("")));
        let s = scan_segment(&seg);
        assert_eq!(s.stopped, None);
        assert_eq!(s.valid_end, seg.len());
        let got: Vec<_> = s.records.iter().map(|(_, r)| r.seq).collect();
        assert_eq!(got, vec![7, 8, 9]);
        assert_eq!(s.records[0].1.msg_id.as_deref(), Some("k1"));
        assert_eq!(s.records[1].1.payload, vec![0, 255, 1]);
        assert_eq!(s.records[2].1.msg_id.as_deref(), Some(""));
        // trailing zeros (a preallocated tail) are a clean end
        seg.extend([0u8; 100]);
        assert_eq!(scan_segment(&seg).stopped, None);
    }

    #[test]
    fn every_torn_tail_is_cut_at_the_last_whole_record() {
        let mut seg = rec(1, b"first", None);
        let first = seg.len();
        seg.extend(rec(2, b"second record", Some("m")));
        for cut in first + 1..seg.len() {
            let s = scan_segment(&seg[..cut]);
            assert_eq!(s.records.len(), 1, "cut at {cut}");
            assert_eq!(s.valid_end, first);
            assert!(s.stopped.is_some(), "cut at {cut}");
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let one = rec(3, b"payload bytes", Some("id"));
        for i in 0..one.len() {
            for bit in 0..8 {
                let mut b = one.clone();
                b[i] ^= 1 << bit;
                match decode_record(&b) {
                    Decoded::Record(r, _) => panic!("flip {i}.{bit} accepted: {r:?}"),
                    Decoded::End | Decoded::Invalid(_) => {}
                }
            }
        }
    }

    #[test]
    fn gaps_in_seq_stop_the_scan() {
        let mut seg = rec(1, b"a", None);
        seg.extend(rec(3, b"b", None));
        let s = scan_segment(&seg);
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.stopped, Some("seq out of order"));
    }

    #[test]
    fn oversized_fields_are_refused() {
        let long = "x".repeat(70_000);
        let r = RecordRef {
            device_id: &long,
            topic: "t",
            msg_id: None,
            payload: b"",
            qos: 0,
            received_ms: 0,
        };
        assert_eq!(
            encode_record(1, &r, &mut Vec::new()),
            Err(EncodeError::TooLong("device id"))
        );
    }
}
