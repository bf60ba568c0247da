//! [`MessageStore`] for the embedded server: an append-only message log ([`devid_msglog`])
//! is the durable record, SQLite the index.
//!
//! `append_batch` (called by the ingest's single group-commit writer) encodes the batch into
//! the current log segment with one write and one `fdatasync`, and returns: the PUBACKs wait
//! for nothing else. An indexer thread then inserts the batch's rows into the `messages` table
//! (many batches per transaction, `synchronous = NORMAL`: the log, not SQLite, is what must
//! survive a power cut), skipping a (device, msg-id) that exists. The payload stays in the log
//! only; the row points at it (`log_pos`, `log_len`), so SQLite's write volume does not grow
//! with payload size. Row ids are the log's sequence numbers.
//!
//! Reads see every acknowledged message: [`MessageStore::list`] first waits until the index has
//! caught up with what was logged when it was called. On open, every log record above the
//! highest indexed id is indexed again (a crash can lose the index's last transactions, never
//! the log's), and a torn tail of the log (never acknowledged) is cut off.
//!
//! A third connection checkpoints the WAL into the database file in the background
//! (`PASSIVE`, every [`CHECKPOINT_EVERY`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use devid_msglog::{Entry, LogReader, LogRecord, LogWriter, Pos, RecordRef};
use devid_proto::DeviceId;
use rusqlite::{params, Connection, TransactionBehavior};

use devid_store::StoreError;
use devid_store::{Appended, DeviceUsage, IndexHook, MessageStore, NewMessage, StoredMessage};

/// The index. One narrow row per message, clustered by device (`WITHOUT ROWID`, so one b-tree
/// insert per message); topic, payload and the rest stay in the log record the row points at.
/// `(device_id, msg_id)` is unique where a msg-id exists: a redelivery is not indexed again.
/// `message_log_state.indexed` is the highest log seq the index has seen.
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS message_index (
    device_id TEXT NOT NULL,
    id        INTEGER NOT NULL,
    log_pos   INTEGER NOT NULL,
    log_len   INTEGER NOT NULL,
    msg_id    TEXT,
    PRIMARY KEY (device_id, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS message_index_idempotency
    ON message_index (device_id, msg_id) WHERE msg_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS message_log_state (
    k       INTEGER PRIMARY KEY CHECK (k = 1),
    indexed INTEGER NOT NULL
);
INSERT OR IGNORE INTO message_log_state (k, indexed) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS message_segments (
    segment   INTEGER PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    newest_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS message_usage (
    device_id TEXT NOT NULL,
    bucket_ms INTEGER NOT NULL,
    bytes     INTEGER NOT NULL,
    PRIMARY KEY (device_id, bucket_ms)
) WITHOUT ROWID;
"#;

/// Width of the `message_usage` time buckets written while the log is recovered at open
/// (fine, so that a restart seeds the quota precisely). Afterwards the indexer writes none
/// until [`SqliteMessageStore::start_retention`] sets a width from `retention.max_age`.
const DEFAULT_USAGE_BUCKET_MS: i64 = 1_000;
/// Index rows deleted per statement by retention (each its own transaction, so the indexer
/// never waits long for the write lock).
const RETENTION_DELETE_BATCH: i64 = 10_000;
/// Most segments retention deletes per round (bounded work per round).
const RETENTION_SEGMENTS_PER_ROUND: i64 = 8;

/// Rows per multi-row INSERT: a batch is split into statements of these sizes (largest
/// first), so only four statements are ever prepared and cached.
const CHUNKS: [usize; 4] = [64, 16, 4, 1];
/// Bound parameters per row.
const PARAMS_PER_ROW: usize = 5;

/// Most rows the indexer puts in one transaction.
const INDEX_BATCH_MAX: usize = 20_000;
/// How long the indexer gathers logged batches into one transaction.
const INDEX_GATHER: Duration = Duration::from_millis(50);
/// How often the gathering indexer looks for waiting readers.
const INDEX_POLL: Duration = Duration::from_millis(1);
/// Logged batches waiting for the indexer before `append_batch` waits (backpressure: the
/// index never falls more than this far behind the acknowledgements).
const INDEX_QUEUE: usize = 512;
/// How long `list` waits for the index to catch up before it gives up.
const READ_BARRIER: Duration = Duration::from_secs(10);

/// How often the background checkpointer runs. Often, so that each checkpoint is small: a
/// checkpoint writes every page changed since the last one and syncs the database file, and
/// the commits' `fdatasync`s queue behind that burst. At 250 ms, checkpoints under full load
/// took 15-24 ms and 22 of 30 commit stalls over 5 ms overlapped one (docs/benchmarks-profile.md).
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

fn insert_sql(n: usize) -> String {
    let mut sql = String::from(
        "INSERT OR IGNORE INTO message_index (id, device_id, msg_id, log_pos, log_len) VALUES ",
    );
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?)");
    }
    sql.push_str(" RETURNING id");
    sql
}

/// One row for the index.
struct IndexRow {
    entry: Entry,
    msg: NewMessage,
}

fn db(operation: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::Db {
        operation,
        detail: e.to_string(),
    }
}

fn log_err(operation: &'static str) -> impl Fn(devid_msglog::LogError) -> StoreError {
    move |e| {
        if e.is_fatal() {
            StoreError::Fatal {
                operation,
                detail: e.to_string(),
            }
        } else {
            StoreError::Db {
                operation,
                detail: e.to_string(),
            }
        }
    }
}

/// Insert `rows` in one transaction; returns the ids that were new (in order).
fn index_rows(
    conn: &mut Connection,
    sqls: &[String; 4],
    rows: &[IndexRow],
    bucket_ms: i64,
) -> Result<Vec<i64>, StoreError> {
    let err = db("index messages");
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&err)?;
    let mut stored = Vec::with_capacity(rows.len());
    let mut rest = rows;
    for (size, sql) in CHUNKS.iter().zip(sqls.iter()) {
        while rest.len() >= *size {
            let (chunk, tail) = rest.split_at(*size);
            let mut stmt = tx.prepare_cached(sql).map_err(&err)?;
            for (i, r) in chunk.iter().enumerate() {
                let b = i * PARAMS_PER_ROW;
                let m = &r.msg;
                let id = i64::try_from(r.entry.seq).map_err(|_| StoreError::Corrupt {
                    what: "message log seq",
                    detail: r.entry.seq.to_string(),
                })?;
                stmt.raw_bind_parameter(b + 1, id).map_err(&err)?;
                stmt.raw_bind_parameter(b + 2, &*m.device_id)
                    .map_err(&err)?;
                stmt.raw_bind_parameter(b + 3, m.msg_id.as_deref())
                    .map_err(&err)?;
                stmt.raw_bind_parameter(b + 4, r.entry.pos.0 as i64)
                    .map_err(&err)?;
                stmt.raw_bind_parameter(b + 5, r.entry.len).map_err(&err)?;
            }
            let mut q = stmt.raw_query();
            while let Some(row) = q.next().map_err(&err)? {
                stored.push(row.get::<_, i64>(0).map_err(&err)?);
            }
            rest = tail;
        }
    }
    // What retention and the quota need: each segment's seq range and newest time, and the
    // bytes each device logged per time bucket (a few rows per transaction).
    let mut segments: std::collections::BTreeMap<u32, (u64, u64, i64)> = Default::default();
    let mut usage: std::collections::BTreeMap<(&str, i64), i64> = Default::default();
    for r in rows {
        let seg =
            segments
                .entry(r.entry.pos.segment())
                .or_insert((r.entry.seq, r.entry.seq, i64::MIN));
        seg.0 = seg.0.min(r.entry.seq);
        seg.1 = seg.1.max(r.entry.seq);
        seg.2 = seg.2.max(r.msg.received_ms);
        if bucket_ms > 0 {
            let bucket = r.msg.received_ms.div_euclid(bucket_ms) * bucket_ms;
            *usage.entry((&r.msg.device_id, bucket)).or_insert(0) += i64::from(r.entry.len);
        }
    }
    {
        let mut st = tx
            .prepare_cached(
                "INSERT INTO message_segments (segment, first_seq, last_seq, newest_ms) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (segment) DO UPDATE SET \
                 first_seq = min(first_seq, excluded.first_seq), \
                 last_seq = max(last_seq, excluded.last_seq), \
                 newest_ms = max(newest_ms, excluded.newest_ms)",
            )
            .map_err(&err)?;
        for (seg, (first, last, newest)) in segments {
            st.execute(params![seg, first as i64, last as i64, newest])
                .map_err(&err)?;
        }
        let mut st = tx
            .prepare_cached(
                "INSERT INTO message_usage (device_id, bucket_ms, bytes) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (device_id, bucket_ms) DO UPDATE SET bytes = bytes + excluded.bytes",
            )
            .map_err(&err)?;
        for ((dev, bucket), bytes) in usage {
            st.execute(params![dev, bucket, bytes]).map_err(&err)?;
        }
    }
    if let Some(last) = rows.last() {
        tx.prepare_cached("UPDATE message_log_state SET indexed = max(indexed, ?1) WHERE k = 1")
            .and_then(|mut st| st.execute([last.entry.seq as i64]))
            .map_err(&err)?;
    }
    tx.commit().map_err(&err)?;
    stored.sort_unstable();
    Ok(stored)
}

/// How far the log and the index are.
#[derive(Debug, Default)]
struct Progress {
    /// Highest seq durably logged.
    logged: AtomicU64,
    /// Readers waiting in [`Progress::barrier`] (the indexer stops gathering for them).
    readers: std::sync::atomic::AtomicUsize,
    /// Highest seq indexed (all below it too).
    indexed: Mutex<u64>,
    caught_up: Condvar,
}

impl Progress {
    fn set_indexed(&self, seq: u64) {
        let mut i = self.indexed.lock().unwrap_or_else(|p| p.into_inner());
        if seq > *i {
            *i = seq;
        }
        drop(i);
        self.caught_up.notify_all();
    }

    /// Wait until everything logged before this call is indexed.
    fn barrier(&self) -> Result<(), StoreError> {
        let target = self.logged.load(Ordering::Acquire);
        let i = self.indexed.lock().unwrap_or_else(|p| p.into_inner());
        if *i >= target {
            return Ok(());
        }
        self.readers.fetch_add(1, Ordering::AcqRel);
        let (i, timeout) = self
            .caught_up
            .wait_timeout_while(i, READ_BARRIER, |i| *i < target)
            .unwrap_or_else(|p| p.into_inner());
        self.readers.fetch_sub(1, Ordering::AcqRel);
        if timeout.timed_out() && *i < target {
            return Err(StoreError::Db {
                operation: "list messages",
                detail: format!(
                    "the message index is {} messages behind the log; see the server log",
                    target - *i
                ),
            });
        }
        Ok(())
    }
}

struct WriterSide {
    log: LogWriter,
    entries: Vec<Entry>,
    to_index: Option<SyncSender<Vec<IndexRow>>>,
}

/// Messages in an append-only log indexed by an SQLite file.
pub struct SqliteMessageStore {
    writer: Mutex<WriterSide>,
    reader: Mutex<Connection>,
    log_reader: LogReader,
    progress: Arc<Progress>,
    hook: Arc<OnceLock<IndexHook>>,
    indexer: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
    log_dir: PathBuf,
    /// The SQLite file (retention opens its own connection).
    path: PathBuf,
    /// Width of the `message_usage` buckets the indexer writes.
    bucket_ms: Arc<AtomicI64>,
    /// The segment being written (retention never deletes it).
    segment: Arc<AtomicU32>,
}

impl std::fmt::Debug for SqliteMessageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteMessageStore")
            .field("log_dir", &self.log_dir)
            .finish_non_exhaustive()
    }
}

impl Drop for SqliteMessageStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Closing the queue lets the indexer finish what is queued and stop.
        if let Ok(mut w) = self.writer.lock() {
            w.to_index = None;
        }
        if let Some(h) = self.indexer.lock().ok().and_then(|mut h| h.take()) {
            let _ = h.join();
        }
    }
}

fn checkpointer(conn: Connection, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(CHECKPOINT_EVERY);
        // (busy, frames in the WAL, frames checkpointed); busy is normal under load
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0))
        {
            tracing::warn!(error = %e, "WAL checkpoint of the message store failed");
        }
    }
}

fn indexer(
    mut conn: Connection,
    rx: Receiver<Vec<IndexRow>>,
    sqls: [String; 4],
    progress: Arc<Progress>,
    hook: Arc<OnceLock<IndexHook>>,
    bucket_ms: Arc<AtomicI64>,
) {
    let mut rows: Vec<IndexRow> = Vec::new();
    while let Ok(first) = rx.recv() {
        rows.extend(first);
        // Gather: SQLite's cost per row falls steeply with rows per transaction, because a
        // transaction writes every b-tree page it touches to the WAL once (with 100 devices a
        // short transaction touches ~100 leaf pages for a few rows each). A reader waiting on
        // the barrier ends the gathering at once, so reads do not pay for it.
        let until = std::time::Instant::now() + INDEX_GATHER;
        while rows.len() < INDEX_BATCH_MAX && progress.readers.load(Ordering::Acquire) == 0 {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left.min(INDEX_POLL)) {
                Ok(more) => rows.extend(more),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut delay = Duration::from_millis(10);
        let stored = loop {
            match index_rows(&mut conn, &sqls, &rows, bucket_ms.load(Ordering::Relaxed)) {
                Ok(s) => break s,
                Err(e) => {
                    // The log holds the messages; retrying loses nothing. Reads wait (and
                    // time out with an error) meanwhile.
                    tracing::error!(error = %e, rows = rows.len(), "indexing logged messages failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        let last = rows.last().map_or(0, |r| r.entry.seq);
        if let Some(hook) = hook.get() {
            let dups = (rows.len() - stored.len()) as u64;
            let mut new = Vec::with_capacity(stored.len());
            let mut ids = stored.iter().peekable();
            for r in rows.drain(..) {
                if ids.peek().is_some_and(|id| **id as u64 == r.entry.seq) {
                    ids.next();
                    new.push((r.entry.seq as i64, r.msg));
                }
            }
            hook(&new, dups);
        }
        rows.clear();
        progress.set_indexed(last);
    }
    tracing::debug!("message indexer stopped");
}

fn connect(path: &Path, synchronous: &str) -> Result<Connection, StoreError> {
    let existed = path.exists();
    let conn = Connection::open(path).map_err(db("open message store"))?;
    if !existed {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            StoreError::Db {
                operation: "open message store",
                detail: format!("chmod 600 {}: {e}", path.display()),
            }
        })?;
    }
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(db("configure message store"))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(db("enable WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Db {
            operation: "enable WAL",
            detail: format!("journal mode is {mode}"),
        });
    }
    conn.execute_batch(&format!("PRAGMA synchronous = {synchronous};"))
        .map_err(db("configure message store"))?;
    Ok(conn)
}

fn create_schema(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(SCHEMA)
        .map_err(db("create messages schema"))
}

/// Rows of the `messages` table of earlier versions (payloads inline), oldest first, to move
/// into the log at open; the table is dropped afterwards.
fn legacy_rows(conn: &Connection) -> Result<Vec<NewMessage>, StoreError> {
    let exists: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'messages'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(db("look for an older messages table"))?
        > 0;
    if !exists {
        return Ok(Vec::new());
    }
    let mut stmt = conn
        .prepare(
            "SELECT device_id, topic, payload, qos, msg_id, received_at FROM messages ORDER BY id",
        )
        .map_err(db("read the older messages table"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok(NewMessage {
                device_id: Arc::from(r.get::<_, String>(0)?),
                topic: r.get::<_, String>(1)?.into(),
                payload: r.get::<_, Vec<u8>>(2)?.into(),
                qos: r.get(3)?,
                msg_id: r.get::<_, Option<String>>(4)?.map(Into::into),
                received_ms: r.get(5)?,
            })
        })
        .map_err(db("read the older messages table"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db("read the older messages table"))?;
    Ok(rows)
}

/// The log directory of the message store in the SQLite file `path`: `NAME.msglog` next to it.
pub(crate) fn log_dir(path: &Path) -> PathBuf {
    let mut name = path.file_stem().unwrap_or_default().to_os_string();
    name.push(".msglog");
    path.with_file_name(name)
}

impl SqliteMessageStore {
    /// Open (or create) the message store: the index in the SQLite file at `path`, the log in
    /// [`log_dir`]`(path)`. Recovers the log and indexes what the index lacks.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, devid_msglog::Options::default())
    }

    /// [`Self::open`] with log segments of `segment_bytes` (`storage.segment_bytes`).
    pub fn open_with_segment_bytes(path: &Path, segment_bytes: u32) -> Result<Self, StoreError> {
        Self::open_with(
            path,
            devid_msglog::Options {
                segment_bytes,
                ..Default::default()
            },
        )
    }

    /// [`Self::open`] with explicit log settings (tests use small segments).
    pub fn open_with(path: &Path, opts: devid_msglog::Options) -> Result<Self, StoreError> {
        let mut index = connect(path, "NORMAL")?;
        create_schema(&index)?;
        index
            .execute_batch("PRAGMA wal_autocheckpoint = 0;")
            .map_err(db("configure message store"))?;
        let max_id: i64 = index
            .query_row(
                "SELECT indexed FROM message_log_state WHERE k = 1",
                [],
                |r| r.get(0),
            )
            .map_err(db("read the message index"))?;
        let max_id = u64::try_from(max_id).unwrap_or(0);
        let dir = log_dir(path);
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::Db {
            operation: "open message log",
            detail: format!("create {}: {e}", dir.display()),
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |e| StoreError::Db {
                    operation: "open message log",
                    detail: format!("chmod 700 {}: {e}", dir.display()),
                },
            )?;
        }
        let sqls = CHUNKS.map(insert_sql);
        // Recover: records above the index's highest id are indexed again before we serve.
        let mut replay: Vec<IndexRow> = Vec::new();
        let mut replay_err: Option<StoreError> = None;
        let (log, rec) = LogWriter::open(&dir, opts, max_id, max_id + 1, |entry, r| {
            if replay_err.is_some() {
                return;
            }
            replay.push(IndexRow {
                entry,
                msg: from_record(r),
            });
            if replay.len() >= INDEX_BATCH_MAX {
                if let Err(e) = index_rows(&mut index, &sqls, &replay, DEFAULT_USAGE_BUCKET_MS) {
                    replay_err = Some(e);
                }
                replay.clear();
            }
        })
        .map_err(log_err("open message log"))?;
        if let Some(e) = replay_err {
            return Err(e);
        }
        if !replay.is_empty() {
            index_rows(&mut index, &sqls, &replay, DEFAULT_USAGE_BUCKET_MS)?;
        }
        if rec.replayed > 0 || rec.torn_bytes > 0 {
            tracing::info!(
                indexed_again = rec.replayed,
                torn_bytes = rec.torn_bytes,
                "message log recovered"
            );
        }
        let mut log = log;
        let legacy = legacy_rows(&index)?;
        if !legacy.is_empty() {
            // Messages stored inline by an earlier version move into the log (new ids).
            for chunk in legacy.chunks(4_096) {
                let mut entries = Vec::new();
                log.append(chunk.iter().map(record_ref), &mut entries)
                    .map_err(log_err("move older messages into the log"))?;
                let rows: Vec<IndexRow> = entries
                    .into_iter()
                    .zip(chunk)
                    .map(|(entry, m)| IndexRow {
                        entry,
                        msg: m.clone(),
                    })
                    .collect();
                index_rows(&mut index, &sqls, &rows, DEFAULT_USAGE_BUCKET_MS)?;
            }
            index
                .execute_batch("DROP TABLE messages;")
                .map_err(db("drop the older messages table"))?;
            tracing::info!(
                messages = legacy.len(),
                "moved messages of an earlier version into the message log"
            );
        }
        let last = (log.next_seq() - 1).max(rec.last_seq).max(max_id);
        let progress = Arc::new(Progress::default());
        progress.logged.store(last, Ordering::Release);
        progress.set_indexed(last);
        let hook: Arc<OnceLock<IndexHook>> = Arc::new(OnceLock::new());
        let bucket_ms = Arc::new(AtomicI64::new(0));
        let segment = Arc::new(AtomicU32::new(log.segment()));
        let (tx, rx) = mpsc::sync_channel(INDEX_QUEUE);
        let indexer = {
            let progress = progress.clone();
            let hook = hook.clone();
            let bucket_ms = bucket_ms.clone();
            std::thread::Builder::new()
                .name("devid-index".into())
                .spawn(move || indexer(index, rx, sqls, progress, hook, bucket_ms))
                .map_err(|e| StoreError::Db {
                    operation: "start the message indexer",
                    detail: e.to_string(),
                })?
        };
        let reader = connect(path, "NORMAL")?;
        let stop = Arc::new(AtomicBool::new(false));
        let ckpt = connect(path, "NORMAL")?;
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("devid-checkpoint".into())
            .spawn(move || checkpointer(ckpt, flag))
            .map_err(|e| StoreError::Db {
                operation: "start the WAL checkpointer",
                detail: e.to_string(),
            })?;
        Ok(Self {
            writer: Mutex::new(WriterSide {
                log,
                entries: Vec::new(),
                to_index: Some(tx),
            }),
            reader: Mutex::new(reader),
            log_reader: LogReader::new(&dir),
            progress,
            hook,
            indexer: Mutex::new(Some(indexer)),
            stop,
            log_dir: dir,
            path: path.to_owned(),
            bucket_ms,
            segment,
        })
    }

    fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, StoreError> {
        m.lock().map_err(|_| StoreError::Db {
            operation: "lock",
            detail: "a previous message store operation panicked; restart the server".into(),
        })
    }

    /// Wait until everything logged so far is indexed (tests, shutdown).
    pub fn sync_index(&self) -> Result<(), StoreError> {
        self.progress.barrier()
    }

    /// Delete messages older than `max_age` in a background thread, every `interval`: whole
    /// log segments once their newest record is older (never the one being written), after
    /// their index rows; and the quota's usage buckets of that age.
    pub fn start_retention(&self, max_age: Duration, interval: Duration) -> Result<(), StoreError> {
        let age_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        self.bucket_ms
            .store(usage_bucket_ms(max_age), Ordering::Relaxed);
        let mut r = Retention {
            conn: connect(&self.path, "NORMAL")?,
            dir: self.log_dir.clone(),
            segment: self.segment.clone(),
            age_ms,
        };
        let stop = self.stop.clone();
        std::thread::Builder::new()
            .name("devid-retention".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match r.round(devid_stdx::now_ms()) {
                        Ok(n) if n.segments > 0 => tracing::info!(
                            segments = n.segments,
                            index_rows = n.rows,
                            "retention deleted old messages"
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "retention round failed; retrying"),
                    }
                    let until = std::time::Instant::now() + interval;
                    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(100).min(interval));
                    }
                }
            })
            .map_err(|e| StoreError::Db {
                operation: "start message retention",
                detail: e.to_string(),
            })?;
        Ok(())
    }
}

/// The quota's bucket width for a retention window: 1/64 of it, between 1 s and 1 h.
fn usage_bucket_ms(max_age: Duration) -> i64 {
    i64::try_from(max_age.as_millis() / 64)
        .unwrap_or(i64::MAX)
        .clamp(1_000, 3_600_000)
}

/// The retention worker's connection and settings.
struct Retention {
    conn: Connection,
    dir: PathBuf,
    segment: Arc<AtomicU32>,
    age_ms: i64,
}

/// What one retention round deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Deleted {
    segments: u64,
    rows: u64,
}

impl Retention {
    /// One bounded round at time `now_ms`.
    fn round(&mut self, now_ms: i64) -> Result<Deleted, StoreError> {
        let err = db("delete old messages");
        let cutoff = now_ms.saturating_sub(self.age_ms);
        let current = self.segment.load(Ordering::Acquire);
        self.describe_unknown_segments(current)?;
        let old: Vec<(u32, i64, i64)> = {
            let mut st = self
                .conn
                .prepare_cached(
                    // Only segments the indexer is past (a later segment has rows, and
                    // rows are indexed in log order): the range and newest time of the
                    // segment are then complete, so no recent record can hide in it.
                    "SELECT segment, first_seq, last_seq FROM message_segments \
                     WHERE newest_ms < ?1 AND segment < ?2 \
                     AND segment < (SELECT max(segment) FROM message_segments) \
                     ORDER BY segment LIMIT ?3",
                )
                .map_err(&err)?;
            let rows = st
                .query_map(
                    params![cutoff, current, RETENTION_SEGMENTS_PER_ROUND],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(&err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(&err)?;
            rows
        };
        let mut done = Deleted::default();
        for (seg, first, last) in old {
            done.rows += self.delete_index_rows(first, last)?;
            devid_msglog::remove_segment(&self.dir, seg)
                .map_err(log_err("delete a log segment"))?;
            self.conn
                .execute("DELETE FROM message_segments WHERE segment = ?1", [seg])
                .map_err(&err)?;
            done.segments += 1;
        }
        self.conn
            .execute(
                "DELETE FROM message_usage WHERE bucket_ms < ?1",
                [cutoff.saturating_sub(3_600_000)],
            )
            .map_err(&err)?;
        Ok(done)
    }

    /// Index rows with ids in `first..=last`, device by device, in batches.
    fn delete_index_rows(&mut self, first: i64, last: i64) -> Result<u64, StoreError> {
        let err = db("delete old index rows");
        let mut n = 0u64;
        let mut after = String::new();
        loop {
            let next: Option<String> = self
                .conn
                .prepare_cached(
                    "SELECT device_id FROM message_index WHERE device_id > ?1 \
                     ORDER BY device_id LIMIT 1",
                )
                .and_then(|mut st| {
                    st.query_row([&after], |r| r.get(0))
                        .map(Some)
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok(None),
                            e => Err(e),
                        })
                })
                .map_err(&err)?;
            let Some(dev) = next else { return Ok(n) };
            loop {
                let k = self
                    .conn
                    .prepare_cached(
                        "DELETE FROM message_index WHERE device_id = ?1 AND id IN \
                         (SELECT id FROM message_index WHERE device_id = ?1 \
                          AND id BETWEEN ?2 AND ?3 LIMIT ?4)",
                    )
                    .and_then(|mut st| {
                        st.execute(params![dev, first, last, RETENTION_DELETE_BATCH])
                    })
                    .map_err(&err)?;
                n += k as u64;
                if (k as i64) < RETENTION_DELETE_BATCH {
                    break;
                }
            }
            after = dev;
        }
    }

    /// Closed segments the index never described (written by an older version, or whose
    /// rows were lost): read one per round and record its range and newest time.
    fn describe_unknown_segments(&mut self, current: u32) -> Result<(), StoreError> {
        let err = db("describe log segments");
        for n in devid_msglog::list_segments(&self.dir).map_err(log_err("list log segments"))? {
            if n >= current {
                break;
            }
            let known: bool = self
                .conn
                .prepare_cached("SELECT count(*) FROM message_segments WHERE segment = ?1")
                .and_then(|mut st| st.query_row([n], |r| r.get::<_, i64>(0)))
                .map_err(&err)?
                > 0;
            if known {
                continue;
            }
            match devid_msglog::summarize_segment(&self.dir, n)
                .map_err(log_err("read a log segment"))?
            {
                Some(sum) => {
                    self.conn
                        .execute(
                            "INSERT OR IGNORE INTO message_segments \
                             (segment, first_seq, last_seq, newest_ms) VALUES (?1, ?2, ?3, ?4)",
                            params![n, sum.first_seq as i64, sum.last_seq as i64, sum.newest_ms],
                        )
                        .map_err(&err)?;
                }
                None => {
                    devid_msglog::remove_segment(&self.dir, n)
                        .map_err(log_err("delete an empty log segment"))?;
                }
            }
            return Ok(());
        }
        Ok(())
    }
}

fn record_ref(m: &NewMessage) -> RecordRef<'_> {
    RecordRef {
        device_id: &m.device_id,
        topic: &m.topic,
        msg_id: m.msg_id.as_deref(),
        payload: &m.payload,
        qos: m.qos,
        received_ms: m.received_ms,
    }
}

fn from_record(r: LogRecord) -> NewMessage {
    NewMessage {
        device_id: Arc::from(r.device_id),
        topic: r.topic.into(),
        payload: r.payload.into(),
        qos: r.qos,
        msg_id: r.msg_id.map(Into::into),
        received_ms: r.received_ms,
    }
}

impl MessageStore for SqliteMessageStore {
    fn append_batch(&self, batch: &[NewMessage]) -> Result<Vec<Appended>, StoreError> {
        let mut w = Self::lock(&self.writer)?;
        let w = &mut *w;
        w.entries.clear();
        w.log
            .append(batch.iter().map(record_ref), &mut w.entries)
            .map_err(log_err("append messages"))?;
        let Some(last) = w.entries.last().map(|e| e.seq) else {
            return Ok(Vec::new());
        };
        let out = w
            .entries
            .iter()
            .map(|e| Appended::Logged(e.seq as i64))
            .collect();
        let rows = w
            .entries
            .iter()
            .zip(batch)
            .map(|(e, m)| IndexRow {
                entry: *e,
                msg: m.clone(),
            })
            .collect();
        self.segment.store(w.log.segment(), Ordering::Release);
        // Logged before queued for the index: a reader's barrier never waits for a seq that
        // is not on its way to the indexer.
        self.progress.logged.store(last, Ordering::Release);
        match &w.to_index {
            Some(tx) if tx.send(rows).is_ok() => {}
            _ => {
                tracing::error!("the message indexer has stopped; logged messages will be indexed at the next start");
            }
        }
        Ok(out)
    }

    fn set_index_hook(&self, hook: IndexHook) {
        if self.hook.set(hook).is_err() {
            tracing::warn!("message index hook set twice; keeping the first");
        }
    }

    fn usage_since(&self, since_ms: i64, _bucket_ms: i64) -> Result<Vec<DeviceUsage>, StoreError> {
        self.progress.barrier()?;
        let conn = Self::lock(&self.reader)?;
        let err = db("read message usage");
        let mut st = conn
            .prepare(
                "SELECT device_id, bucket_ms, bytes FROM message_usage \
                 WHERE bucket_ms + ?2 > ?1",
            )
            .map_err(&err)?;
        let rows = st
            .query_map(
                params![
                    since_ms,
                    self.bucket_ms
                        .load(Ordering::Relaxed)
                        .max(DEFAULT_USAGE_BUCKET_MS)
                ],
                |r| {
                    Ok(DeviceUsage {
                        device_id: r.get(0)?,
                        bucket_ms: r.get(1)?,
                        bytes: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                    })
                },
            )
            .map_err(&err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&err)?;
        Ok(rows)
    }

    fn list(
        &self,
        device: &DeviceId,
        since: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.progress.barrier()?;
        let conn = Self::lock(&self.reader)?;
        let row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(i64, i64, u32)> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        };
        // After a cursor: the oldest `limit` past it; without: the newest `limit` (ids >= 1).
        let (sql, after) = match since {
            Some(after) => (
                "SELECT id, log_pos, log_len FROM message_index \
                 WHERE device_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                after,
            ),
            None => (
                "SELECT id, log_pos, log_len FROM message_index \
                 WHERE device_id = ?1 AND id > ?2 ORDER BY id DESC LIMIT ?3",
                0,
            ),
        };
        let mut stmt = conn.prepare_cached(sql).map_err(db("list messages"))?;
        let mut rows = stmt
            .query_map(params![device.as_str(), after, limit], row)
            .map_err(db("list messages"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("list messages"))?;
        drop(stmt);
        if since.is_none() {
            rows.reverse();
        }
        drop(conn);
        let mut out = Vec::with_capacity(rows.len());
        for (id, pos, len) in rows {
            let r = self
                .log_reader
                .read(id as u64, Pos(pos as u64), len)
                .map_err(log_err("read a message from the log"))?;
            if r.device_id != device.as_str() {
                return Err(StoreError::Corrupt {
                    what: "message log record",
                    detail: format!("record {id} belongs to another device"),
                });
            }
            out.push(StoredMessage {
                id,
                device_id: r.device_id,
                topic: r.topic,
                payload: r.payload,
                qos: r.qos,
                msg_id: r.msg_id,
                received_ms: r.received_ms,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(dev: &str, n: u32, msg_id: Option<&str>) -> NewMessage {
        NewMessage {
            device_id: Arc::from(dev),
            topic: format!("devices/{dev}/telemetry/t").into(),
            payload: devid_mqtt::Bytes::from(format!("p{n}")),
            qos: 1,
            msg_id: msg_id.map(Into::into),
            received_ms: 1_000 + i64::from(n),
        }
    }

    fn payloads(s: &SqliteMessageStore, dev: &str) -> Vec<String> {
        s.list(&DeviceId::parse(dev).unwrap(), None, 1000)
            .unwrap()
            .into_iter()
            .map(|m| String::from_utf8(m.payload).unwrap())
            .collect()
    }

    #[test]
    fn append_dedupe_and_page() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteMessageStore::open(&dir.path().join("m.db")).unwrap();
        let r = s
            .append_batch(&[
                msg("a", 1, Some("k1")),
                msg("a", 2, None),
                msg("b", 3, Some("k1")),
                msg("a", 4, Some("k1")),
            ])
            .unwrap();
        assert!(r.iter().all(|a| matches!(a, Appended::Logged(_))));
        // a later batch with the same key is a duplicate too; no key never is
        s.append_batch(&[msg("a", 5, Some("k1")), msg("a", 6, None)])
            .unwrap();
        assert_eq!(payloads(&s, "a"), ["p1", "p2", "p6"]);
        assert_eq!(payloads(&s, "b"), ["p3"], "msg-id is per device");
        let a = DeviceId::parse("a").unwrap();
        let all = s.list(&a, None, 100).unwrap();
        let newest = s.list(&a, None, 1).unwrap();
        assert_eq!(newest[0].payload, b"p6");
        let page = s.list(&a, Some(all[0].id), 1).unwrap();
        assert_eq!(page[0].id, all[1].id);
        assert_eq!(all[0].msg_id.as_deref(), Some("k1"));
        assert_eq!(all[0].topic, "devices/a/telemetry/t");
    }

    #[test]
    fn the_hook_sees_stored_and_duplicates_before_reads_do() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteMessageStore::open(&dir.path().join("m.db")).unwrap();
        let seen = Arc::new(Mutex::new((Vec::new(), 0u64)));
        let s2 = seen.clone();
        s.set_index_hook(Box::new(move |stored, dups| {
            let mut g = s2.lock().unwrap();
            g.0.extend(stored.iter().map(|(id, _)| *id));
            g.1 += dups;
        }));
        // 150 rows: keys repeat within and across chunks
        let key = |i: u32| i.is_multiple_of(2).then(|| format!("k{}", i % 40));
        let batch: Vec<NewMessage> = (0..150).map(|i| msg("d", i, key(i).as_deref())).collect();
        let mut r = s.append_batch(&batch).unwrap();
        r.extend(s.append_batch(&batch[..10]).unwrap());
        // first batch: 75 without a key + 20 distinct keys; again: 5 without a key are new
        let stored = payloads(&s, "d");
        assert_eq!(stored.len(), 75 + 20 + 5);
        let g = seen.lock().unwrap();
        assert_eq!(g.0.len(), 100);
        assert_eq!(g.1, 55 + 5);
        // ids are the log seqs reported at append time
        let ids: Vec<i64> = r
            .iter()
            .filter_map(|a| match a {
                Appended::Logged(id) => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 160);
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(g.0.iter().all(|id| ids.contains(id)));
    }

    #[test]
    fn a_lost_index_is_rebuilt_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let s = SqliteMessageStore::open_with(
                &path,
                devid_msglog::Options {
                    segment_bytes: 256,
                    preallocate: false,
                },
            )
            .unwrap();
            for i in 0..40 {
                s.append_batch(&[msg("a", i, Some(&format!("k{}", i % 30)))])
                    .unwrap();
            }
            s.sync_index().unwrap();
        }
        // the index loses its newest rows (as a power cut with synchronous=NORMAL may do)
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "DELETE FROM message_index WHERE id > 12; \
                 UPDATE message_log_state SET indexed = 12;",
            )
            .unwrap();
        let s = SqliteMessageStore::open_with(
            &path,
            devid_msglog::Options {
                segment_bytes: 256,
                preallocate: false,
            },
        )
        .unwrap();
        let got = payloads(&s, "a");
        let want: Vec<String> = (0..30).map(|i| format!("p{i}")).collect();
        assert_eq!(got, want, "rebuilt, duplicates still skipped");
        // new ids continue after the log's
        let r = s.append_batch(&[msg("a", 99, None)]).unwrap();
        assert_eq!(r[0], Appended::Logged(41));
    }

    #[test]
    fn payloads_live_in_the_log_not_in_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let s = SqliteMessageStore::open(&path).unwrap();
        let mut m = msg("a", 1, None);
        m.payload = devid_mqtt::Bytes::from(vec![0xA5u8; 4096]);
        s.append_batch(&[m]).unwrap();
        s.sync_index().unwrap();
        let cols: Vec<String> = Connection::open(&path)
            .unwrap()
            .prepare("SELECT name FROM pragma_table_info('message_index')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!cols.iter().any(|c| c == "payload"), "{cols:?}");
        let back = s.list(&DeviceId::parse("a").unwrap(), None, 1).unwrap();
        assert_eq!(back[0].payload, vec![0xA5u8; 4096]);
        assert!(log_dir(&path).join("seg-0000000000.log").is_file());
    }
}

#[cfg(test)]
mod legacy_tests {
    use super::*;

    #[test]
    fn messages_of_the_older_inline_table_move_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, \
             topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, msg_id TEXT, \
             received_at INTEGER NOT NULL); \
             INSERT INTO messages VALUES (5, 'a', 't/1', x'01', 1, 'k', 10), \
             (9, 'a', 't/2', x'02', 0, NULL, 11);",
        )
        .unwrap();
        drop(c);
        let s = SqliteMessageStore::open(&path).unwrap();
        let got = s.list(&DeviceId::parse("a").unwrap(), None, 10).unwrap();
        let summary: Vec<_> = got
            .iter()
            .map(|m| {
                (
                    m.topic.as_str(),
                    m.payload.clone(),
                    m.msg_id.clone(),
                    m.received_ms,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("t/1", vec![1u8], Some("k".to_owned()), 10),
                ("t/2", vec![2u8], None, 11)
            ]
        );
        // the redelivery of a moved message is still a duplicate
        s.append_batch(&[NewMessage {
            device_id: Arc::from("a"),
            topic: "t/1".into(),
            payload: devid_mqtt::Bytes::from_static(b"x"),
            qos: 1,
            msg_id: Some("k".into()),
            received_ms: 12,
        }])
        .unwrap();
        assert_eq!(
            s.list(&DeviceId::parse("a").unwrap(), None, 10)
                .unwrap()
                .len(),
            2
        );
    }
}
