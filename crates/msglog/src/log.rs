//! Segment files: the writer (append, fdatasync, rotate, recover) and the reader.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crate::record::{self, Decoded, LogRecord, RecordRef};

/// A record's place in the log: `segment << 32 | offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos(pub u64);

impl Pos {
    fn new(segment: u32, offset: u32) -> Pos {
        Pos((u64::from(segment) << 32) | u64::from(offset))
    }
    /// Segment number.
    pub fn segment(self) -> u32 {
        (self.0 >> 32) as u32
    }
    /// Byte offset in the segment.
    pub fn offset(self) -> u32 {
        self.0 as u32
    }
}

/// Where one appended record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Its sequence number.
    pub seq: u64,
    /// Its position.
    pub pos: Pos,
    /// Its encoded length.
    pub len: u32,
}

/// Log failures. After a failed write the writer cuts the segment back to the end of the last
/// durable batch and syncs it before it appends again (the next append tries that repair
/// first), so a full disk costs the batches that failed, never a restart.
///
/// A failed `fdatasync`/`fsync` is different ([`LogError::SyncFailed`], then
/// [`LogError::Halted`]): the kernel may already have dropped the dirty pages and cleared the
/// error, so a later sync that succeeds proves nothing about them (PostgreSQL's rule since
/// "fsyncgate"). The writer accepts no more appends; the process must restart, and recovery
/// reads what really is on disk. [`LogError::is_fatal`] tells the two apart.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file operation failed.
    #[error("message log: cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The log holds data that is not a valid continuation of the sequence before the end of
    /// its last segment: something other than a crash changed it.
    #[error("message log is corrupt: {path} at offset {offset}: {why}; move the file away and restart to keep what precedes it")]
    Corrupt {
        /// Which segment.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A record read back at a position is not the expected one.
    #[error("message log: no record {seq} at {pos:?}: {why}")]
    NotFound {
        /// The expected seq.
        seq: u64,
        /// The position looked at.
        pos: Pos,
        /// What was found instead.
        why: &'static str,
    },
    /// A message cannot be encoded.
    #[error("message log: {0}")]
    Encode(#[from] record::EncodeError),
    /// An earlier write failed and the segment could not be cut back to its durable end yet
    /// (the next append tries again).
    #[error("message log: an earlier write failed and the log could not be repaired yet: {0}")]
    Poisoned(String),
    /// `fdatasync`/`fsync` of a segment failed: what it covered may not be on disk, and no
    /// later sync can tell. Fatal: the writer refuses every further append.
    #[error("message log: fdatasync of {path} failed: {source}; data the kernel had not written may be lost and a retry cannot tell, so the log takes no more appends: restart the server (recovery keeps what is on disk)")]
    SyncFailed {
        /// Which segment.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An earlier `fdatasync` failed ([`LogError::SyncFailed`]); nothing is appended any more.
    #[error("message log: stopped after a failed fdatasync; restart the server")]
    Halted,
}

impl LogError {
    /// A failed sync (now or before): the process must stop acknowledging and restart.
    pub fn is_fatal(&self) -> bool {
        matches!(self, LogError::SyncFailed { .. } | LogError::Halted)
    }
}

fn sync_failed(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::SyncFailed {
        path: path.to_owned(),
        source,
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Writer settings.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Start a new segment when the current one would grow past this many bytes.
    pub segment_bytes: u32,
    /// Keep the next segment ready, zero-filled and synced, in the background. An
    /// `fdatasync` that only overwrites allocated blocks does not commit file-system metadata,
    /// which makes it several times faster than one that appends (0.14 vs 0.39 ms for 4 KiB
    /// on the benchmark machine). Costs one zero write of each segment.
    pub preallocate: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: 32 << 20,
            preallocate: true,
        }
    }
}

/// The file of segment `n` in `dir`.
pub fn segment_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("seg-{n:010}.log"))
}

/// The segment numbers in `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<u32>, LogError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let e = e.map_err(io("list", dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("seg-")
            .and_then(|s| s.strip_suffix(".log"))
            .filter(|s| s.len() == 10)
            .and_then(|s| s.parse::<u32>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

fn create_segment(dir: &Path, n: u32) -> Result<File, LogError> {
    let path = segment_path(dir, n);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("create", &path))?;
    sync_dir(dir)?;
    Ok(f)
}

/// The zero-filled next segment, made by a background thread.
#[derive(Debug, Default)]
struct Spare {
    state: Mutex<SpareState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct SpareState {
    ready: Option<(PathBuf, File)>,
    stop: bool,
}

/// Zeros written (and flushed) per step while preparing a segment.
const ZERO_CHUNK: usize = 256 << 10;

fn preparer(dir: PathBuf, bytes: u32, spare: Arc<Spare>) {
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut n = 0u64;
    loop {
        {
            let mut st = spare.state.lock().unwrap_or_else(|p| p.into_inner());
            while st.ready.is_some() && !st.stop {
                st = spare.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                return;
            }
        }
        n += 1;
        let path = dir.join(format!("spare-{}-{n}.tmp", std::process::id()));
        let made = (|| -> std::io::Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            let mut at = 0u64;
            while at < u64::from(bytes) {
                if spare.state.lock().map(|s| s.stop).unwrap_or(true) {
                    return Err(std::io::Error::other("stopped"));
                }
                let n = (u64::from(bytes) - at).min(ZERO_CHUNK as u64) as usize;
                f.write_all_at(&zeros[..n], at)?;
                // Flush as we go: one large writeback at the end would sit in the disk's
                // queue ahead of the commits' fdatasyncs and stall their acks for its whole
                // length (tens of ms for a segment).
                f.sync_data()?;
                at += n as u64;
            }
            f.sync_all()?;
            Ok(f)
        })();
        match made {
            Ok(f) => {
                let mut st = spare.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.stop {
                    let _ = std::fs::remove_file(&path);
                    return;
                }
                st.ready = Some((path, f));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                if spare.state.lock().map(|s| s.stop).unwrap_or(true) {
                    return;
                }
                tracing::warn!(error = %e, "message log: cannot prepare the next segment; appending instead");
                std::thread::sleep(std::time::Duration::from_secs(5));
            }
        }
    }
}

/// What [`LogWriter::open`] found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Recovered {
    /// Records handed back for indexing.
    pub replayed: u64,
    /// Bytes of a torn tail cut off the last segment.
    pub torn_bytes: u64,
    /// The last seq in the log (0: empty).
    pub last_seq: u64,
}

/// The appending side; one per log (the ingest's writer thread owns it).
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    opts: Options,
    file: File,
    segment: u32,
    offset: u32,
    next_seq: u64,
    buf: Vec<u8>,
    poisoned: bool,
    /// A sync failed: no more appends (see [`LogError::SyncFailed`]).
    halted: bool,
    /// The current segment was zero-filled ahead (false: it grows by appending).
    preallocated: bool,
    spare: Option<Arc<Spare>>,
    /// The next seq jumps (the index holds higher ids than the log): start a new segment so
    /// that seqs stay consecutive within every segment.
    rotate_first: bool,
}

impl LogWriter {
    /// Open (or create) the log in `dir` and recover it: a torn tail of the last segment is
    /// cut off, and every record with a seq above `indexed` goes to `each`, in order, for
    /// indexing. New records get seqs above both the log's last and `min_next_seq - 1`.
    pub fn open(
        dir: &Path,
        opts: Options,
        indexed: u64,
        min_next_seq: u64,
        mut each: impl FnMut(Entry, LogRecord),
    ) -> Result<(LogWriter, Recovered), LogError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let segments = list_segments(dir)?;
        let mut rec = Recovered::default();
        let (segment, offset, file) = match segments.last() {
            None => (0, 0, create_segment(dir, 0)?),
            Some(&last) => {
                // Start at the last segment whose first record is at or below indexed + 1.
                let mut start = 0;
                for (i, &n) in segments.iter().enumerate() {
                    match first_seq(&segment_path(dir, n))? {
                        Some(s) if s <= indexed.saturating_add(1) => start = i,
                        _ => break,
                    }
                }
                let mut expect: Option<u64> = None;
                let mut end = 0u32;
                for &n in &segments[start..] {
                    let path = segment_path(dir, n);
                    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
                    let scan = record::scan_segment(&bytes);
                    if let (Some(e), Some((_, r))) = (expect, scan.records.first()) {
                        if r.seq < e {
                            return Err(LogError::Corrupt {
                                path,
                                offset: 0,
                                why: "segment does not continue the sequence",
                            });
                        }
                    }
                    let is_last = n == last;
                    if let Some(why) = scan.stopped {
                        if !is_last {
                            return Err(LogError::Corrupt {
                                path,
                                offset: scan.valid_end as u64,
                                why,
                            });
                        }
                    }
                    for (off, r) in scan.records {
                        expect = Some(r.seq + 1);
                        rec.last_seq = r.seq;
                        if r.seq > indexed {
                            let len = record::encoded_len(&r.as_ref())? as u32;
                            each(
                                Entry {
                                    seq: r.seq,
                                    pos: Pos::new(n, off as u32),
                                    len,
                                },
                                r,
                            );
                            rec.replayed += 1;
                        }
                    }
                    if is_last {
                        end = scan.valid_end as u32;
                        if (scan.valid_end as u64) < bytes.len() as u64 {
                            rec.torn_bytes = bytes.len() as u64 - scan.valid_end as u64;
                            tracing::warn!(
                                segment = %path.display(),
                                bytes = rec.torn_bytes,
                                why = scan.stopped.unwrap_or("trailing zeros"),
                                "message log: cutting off a torn tail (never acknowledged)"
                            );
                        }
                    }
                }
                let path = segment_path(dir, last);
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io("open", &path))?;
                f.set_len(u64::from(end)).map_err(io("truncate", &path))?;
                f.sync_all().map_err(io("sync", &path))?;
                (last, end, f)
            }
        };
        let next_seq = rec.last_seq.saturating_add(1).max(min_next_seq).max(1);
        // leftovers of an earlier process's preparer
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("spare-") && name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let spare = if opts.preallocate {
            let spare = Arc::new(Spare::default());
            let (d, b, sp) = (dir.to_owned(), opts.segment_bytes, spare.clone());
            std::thread::Builder::new()
                .name("devid-log-prep".into())
                .spawn(move || preparer(d, b, sp))
                .map_err(io("start the segment preparer for", dir))?;
            Some(spare)
        } else {
            None
        };
        let rotate_first = offset > 0 && next_seq != rec.last_seq.saturating_add(1);
        Ok((
            LogWriter {
                dir: dir.to_owned(),
                opts,
                file,
                segment,
                offset,
                next_seq,
                buf: Vec::with_capacity(1 << 20),
                poisoned: false,
                halted: false,
                rotate_first,
                preallocated: false,
                spare,
            },
            rec,
        ))
    }

    /// The seq the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Append `records` with one write and one `fdatasync`; on success every entry pushed onto
    /// `out` (one per record, in order) is durable. On error nothing of the batch counts.
    pub fn append<'a>(
        &mut self,
        records: impl IntoIterator<Item = RecordRef<'a>>,
        out: &mut Vec<Entry>,
    ) -> Result<(), LogError> {
        if self.halted {
            return Err(LogError::Halted);
        }
        if self.poisoned {
            self.repair()?;
        }
        self.buf.clear();
        let first_out = out.len();
        let mut seq = self.next_seq;
        for r in records {
            let at = self.buf.len();
            let len = record::encode_record(seq, &r, &mut self.buf).inspect_err(|_| {
                out.truncate(first_out);
            })?;
            out.push(Entry {
                seq,
                pos: Pos(at as u64), // relative for now
                len: len as u32,
            });
            seq += 1;
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let need = self.buf.len() as u64;
        if self.offset > 0
            && (self.rotate_first
                || u64::from(self.offset) + need > u64::from(self.opts.segment_bytes)
                || (!self.preallocated && self.spare_ready()))
        {
            if let Err(e) = self.rotate() {
                out.truncate(first_out);
                return Err(e);
            }
            self.rotate_first = false;
        }
        if u64::from(self.offset) + need > u64::from(u32::MAX) {
            out.truncate(first_out);
            return Err(LogError::Encode(record::EncodeError::TooLong("batch")));
        }
        let path = segment_path(&self.dir, self.segment);
        if let Err(e) = self
            .file
            .write_all_at(&self.buf, u64::from(self.offset))
            .map_err(io("write", &path))
        {
            out.truncate(first_out);
            // What reached the disk past `offset` is unknown: cut it off and sync before the
            // next append. Everything before `offset` was synced by earlier batches.
            self.poisoned = true;
            let _ = self.repair();
            return Err(e);
        }
        if let Err(e) = self.file.sync_data().map_err(sync_failed(&path)) {
            out.truncate(first_out);
            // Never retried, never repaired: see LogError::SyncFailed.
            self.halted = true;
            tracing::error!(segment = %path.display(), "message log: fdatasync failed; the log takes no more appends");
            return Err(e);
        }
        for e in &mut out[first_out..] {
            e.pos = Pos::new(self.segment, self.offset + e.pos.0 as u32);
        }
        self.offset += need as u32;
        self.next_seq = seq;
        Ok(())
    }

    /// Cut the current segment back to the end of the last durable batch and sync it; only
    /// then may appends continue.
    fn repair(&mut self) -> Result<(), LogError> {
        let path = segment_path(&self.dir, self.segment);
        if let Err(e) = self.file.set_len(u64::from(self.offset)) {
            self.poisoned = true;
            return Err(LogError::Poisoned(e.to_string()));
        }
        if let Err(e) = self.file.sync_all().map_err(sync_failed(&path)) {
            self.halted = true;
            return Err(e);
        }
        if self.poisoned {
            tracing::info!(segment = %path.display(), "message log repaired after a failed write; appending again");
        }
        self.poisoned = false;
        // the file now ends at `offset`: appends grow it
        self.preallocated = false;
        Ok(())
    }

    /// The segment appends go to now.
    pub fn segment(&self) -> u32 {
        self.segment
    }

    fn spare_ready(&self) -> bool {
        self.spare
            .as_ref()
            .is_some_and(|s| s.state.lock().map(|st| st.ready.is_some()).unwrap_or(false))
    }

    fn rotate(&mut self) -> Result<(), LogError> {
        let next = self.segment.checked_add(1).ok_or(LogError::Corrupt {
            path: self.dir.clone(),
            offset: 0,
            why: "segment numbers exhausted",
        })?;
        let ready = self.spare.as_ref().and_then(|s| {
            let taken = s.state.lock().ok().and_then(|mut st| st.ready.take());
            s.wake.notify_all();
            taken
        });
        let (file, preallocated) = match ready {
            Some((tmp, f)) => {
                let path = segment_path(&self.dir, next);
                if let Err(e) = std::fs::rename(&tmp, &path)
                    .map_err(io("rename the prepared segment to", &path))
                    .and_then(|()| sync_dir(&self.dir))
                {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                (f, true)
            }
            None => {
                // a rotation that failed after creating the file leaves it empty: reuse it
                let path = segment_path(&self.dir, next);
                if path.exists() && first_seq(&path)?.is_none() {
                    std::fs::remove_file(&path).map_err(io("remove", &path))?;
                }
                (create_segment(&self.dir, next)?, false)
            }
        };
        self.file = file;
        self.segment = next;
        self.offset = 0;
        self.preallocated = preallocated;
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if let Some(s) = &self.spare {
            if let Ok(mut st) = s.state.lock() {
                st.stop = true;
                if let Some((tmp, _)) = st.ready.take() {
                    let _ = std::fs::remove_file(tmp);
                }
            }
            s.wake.notify_all();
        }
    }
}

fn first_seq(path: &Path) -> Result<Option<u64>, LogError> {
    let f = File::open(path).map_err(io("open", path))?;
    let mut head = [0u8; record::HEADER_LEN];
    match f.read_exact_at(&mut head, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io("read", path)(e)),
    }
    if u32::from_le_bytes([head[0], head[1], head[2], head[3]]) == 0 {
        return Ok(None);
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&head[8..16]);
    Ok(Some(u64::from_le_bytes(seq)))
}

/// Reads records back by position; keeps the segment files it opened.
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    files: Mutex<HashMap<u32, Arc<File>>>,
}

/// Open segment files kept by a reader.
const READER_FILES: usize = 64;

impl LogReader {
    /// A reader of the log in `dir`.
    pub fn new(dir: &Path) -> LogReader {
        LogReader {
            dir: dir.to_owned(),
            files: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, segment: u32) -> Result<Arc<File>, LogError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get(&segment) {
            return Ok(f.clone());
        }
        let path = segment_path(&self.dir, segment);
        let f = Arc::new(File::open(&path).map_err(io("open", &path))?);
        if files.len() >= READER_FILES {
            files.clear();
        }
        files.insert(segment, f.clone());
        Ok(f)
    }

    /// The record `seq` at `pos` (`len` bytes), checked.
    pub fn read(&self, seq: u64, pos: Pos, len: u32) -> Result<LogRecord, LogError> {
        let f = self.file(pos.segment())?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, u64::from(pos.offset()))
            .map_err(io("read", &segment_path(&self.dir, pos.segment())))?;
        match record::decode_record(&buf) {
            Decoded::Record(r, n) if r.seq == seq && n == buf.len() => Ok(r),
            Decoded::Record(..) => Err(LogError::NotFound {
                seq,
                pos,
                why: "another record",
            }),
            Decoded::End => Err(LogError::NotFound {
                seq,
                pos,
                why: "end of data",
            }),
            Decoded::Invalid(why) => Err(LogError::NotFound { seq, pos, why }),
        }
    }
}

/// What one closed segment holds, for retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSummary {
    /// The segment number.
    pub segment: u32,
    /// Its first and last seq.
    pub first_seq: u64,
    /// Its last seq.
    pub last_seq: u64,
    /// The newest receive time in it, ms.
    pub newest_ms: i64,
}

/// Read segment `n` of `dir` and summarise it (None: it holds no record).
pub fn summarize_segment(dir: &Path, n: u32) -> Result<Option<SegmentSummary>, LogError> {
    let path = segment_path(dir, n);
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    let scan = record::scan_segment(&bytes);
    let (Some((_, first)), Some((_, last))) = (scan.records.first(), scan.records.last()) else {
        return Ok(None);
    };
    Ok(Some(SegmentSummary {
        segment: n,
        first_seq: first.seq,
        last_seq: last.seq,
        newest_ms: scan
            .records
            .iter()
            .map(|(_, r)| r.received_ms)
            .max()
            .unwrap_or(i64::MIN),
    }))
}

/// Delete segment `n` of `dir` (retention). Never call it for the segment being written.
pub fn remove_segment(dir: &Path, n: u32) -> Result<(), LogError> {
    let path = segment_path(dir, n);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", &path)(e)),
    }
}
