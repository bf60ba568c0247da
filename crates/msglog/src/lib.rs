//! devid-msglog: the append-only message log behind devid-server's durable PUBACKs.
//!
//! The ingest's single writer thread encodes a batch of messages as [`record`]s, appends them
//! to the current segment file with ONE `write` and ONE `fdatasync`, and only then lets the
//! sessions acknowledge them. The log is the durable record of every acknowledged message and
//! keeps each payload until retention deletes its whole segment; a database (SQLite in devid-server) indexes the records
//! asynchronously and points back at them by [`Pos`]. After a crash, [`LogWriter::open`]
//! cuts a torn tail off and hands every record the index has not seen yet back for indexing.
//!
//! Layout: `DIR/seg-NNNNNNNNNN.log`, numbered from 0; a new segment starts when the current one
//! would pass the segment limit. Records never span segments. A position is
//! `segment << 32 | offset`.

mod log;
pub mod record;

pub use log::{
    list_segments, remove_segment, segment_path, summarize_segment, Entry, LogError, LogReader,
    LogWriter, Options, Pos, Recovered, SegmentSummary,
};
pub use record::{decode_record, encode_record, scan_segment, Decoded, LogRecord, RecordRef};
