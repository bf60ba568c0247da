//! [`MessageStore`] on SQLite: table `messages` in WAL mode with `synchronous = FULL`, so a
//! committed transaction has been fsynced to the WAL before `append_batch` returns. One
//! connection writes (the ingest's single group-commit writer thread), another reads, so
//! queries never wait behind an fsync, and a third checkpoints the WAL into the database file
//! in the background (`PASSIVE`, every [`CHECKPOINT_EVERY`]): with SQLite's automatic
//! checkpoint, one unlucky commit in a few hundred would also copy and fsync a thousand pages,
//! and its PUBACKs would wait for that.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use devid_proto::DeviceId;
use rusqlite::{params, Connection, TransactionBehavior};

use super::messages::{Appended, MessageStore, NewMessage, StoredMessage};
use super::StoreError;

/// The schema. `(device_id, msg_id)` is unique where a msg-id exists: redelivery of an
/// idempotent message is a no-op.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY,
    device_id   TEXT NOT NULL,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    qos         INTEGER NOT NULL,
    msg_id      TEXT,
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_device ON messages (device_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency
    ON messages (device_id, msg_id) WHERE msg_id IS NOT NULL;
"#;

/// Rows per multi-row INSERT: a batch is split into statements of these sizes (largest
/// first), so only four statements are ever prepared and cached.
const CHUNKS: [usize; 4] = [64, 16, 4, 1];

/// `INSERT OR IGNORE ... VALUES (...), (...) ... RETURNING id, msg_id` for `n` rows. Only
/// inserted rows come back; their ids increase in input order.
fn insert_sql(n: usize) -> String {
    let mut sql = String::from(
        "INSERT OR IGNORE INTO messages (device_id, topic, payload, qos, msg_id, received_at) \
         VALUES ",
    );
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?)");
    }
    sql.push_str(" RETURNING id, msg_id");
    sql
}

/// Append `rows` with one statement; push one outcome per row onto `out`.
fn insert_chunk(
    tx: &rusqlite::Transaction<'_>,
    sql: &str,
    rows: &[NewMessage],
    returned: &mut Vec<(i64, Option<String>)>,
    out: &mut Vec<Appended>,
) -> Result<(), StoreError> {
    let err = db("append messages");
    let mut stmt = tx.prepare_cached(sql).map_err(&err)?;
    for (i, m) in rows.iter().enumerate() {
        let b = i * 6;
        stmt.raw_bind_parameter(b + 1, &*m.device_id)
            .map_err(&err)?;
        stmt.raw_bind_parameter(b + 2, &*m.topic).map_err(&err)?;
        stmt.raw_bind_parameter(b + 3, &m.payload[..])
            .map_err(&err)?;
        stmt.raw_bind_parameter(b + 4, m.qos).map_err(&err)?;
        stmt.raw_bind_parameter(b + 5, m.msg_id.as_deref())
            .map_err(&err)?;
        stmt.raw_bind_parameter(b + 6, m.received_ms)
            .map_err(&err)?;
    }
    returned.clear();
    let mut q = stmt.raw_query();
    while let Some(r) = q.next().map_err(&err)? {
        returned.push((r.get(0).map_err(&err)?, r.get(1).map_err(&err)?));
    }
    returned.sort_unstable_by_key(|(id, _)| *id);
    // Inserted rows, in id order, are the inserted inputs in input order: an input is the next
    // returned row exactly when it was inserted (a skipped input has a msg-id that exists, and
    // the next inserted row cannot carry the same one).
    let mut next = returned.iter().peekable();
    for m in rows {
        let inserted = match (next.peek(), m.msg_id.as_deref()) {
            (Some(_), None) => true,
            (Some((_, Some(k))), Some(mine)) => k.as_str() == mine,
            _ => false,
        };
        match (inserted, next.peek()) {
            (true, Some((id, _))) => {
                out.push(Appended::Stored(*id));
                next.next();
            }
            _ => out.push(Appended::Duplicate),
        }
    }
    if next.next().is_some() {
        return Err(StoreError::Corrupt {
            what: "insert result",
            detail: "more rows returned than inserted".into(),
        });
    }
    Ok(())
}

/// How often the background checkpointer runs.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Messages in an SQLite file.
#[derive(Debug)]
pub struct SqliteMessageStore {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    insert_sql: [String; 4],
}

impl Drop for SqliteMessageStore {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn checkpointer(conn: Connection, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(CHECKPOINT_EVERY);
        // (busy, frames in the WAL, frames checkpointed); busy is normal under load
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0))
        {
            tracing::warn!(error = %e, "WAL checkpoint of the message store failed");
        }
    }
}

fn db(operation: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::Db {
        operation,
        detail: e.to_string(),
    }
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
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
    conn.busy_timeout(std::time::Duration::from_secs(10))
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
    // synchronous is per connection: FULL makes every commit fsync the WAL.
    conn.execute_batch("PRAGMA synchronous = FULL;")
        .map_err(db("configure message store"))?;
    Ok(conn)
}

impl SqliteMessageStore {
    /// Open (or create) the `messages` table in the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let writer = connect(path)?;
        writer
            .execute_batch(SCHEMA)
            .map_err(db("create messages schema"))?;
        let sync: i64 = writer
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .map_err(db("configure message store"))?;
        if sync < 2 {
            return Err(StoreError::Db {
                operation: "configure message store",
                detail: format!("synchronous is {sync}, FULL (2) is required for durable acks"),
            });
        }
        // checkpoints happen in the background, never inside a commit the acks wait for
        writer
            .execute_batch("PRAGMA wal_autocheckpoint = 0;")
            .map_err(db("configure message store"))?;
        let reader = connect(path)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ckpt = connect(path)?;
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("devid-checkpoint".into())
            .spawn(move || checkpointer(ckpt, flag))
            .map_err(|e| StoreError::Db {
                operation: "start the WAL checkpointer",
                detail: e.to_string(),
            })?;
        Ok(Self {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            stop,
            insert_sql: CHUNKS.map(insert_sql),
        })
    }

    fn lock(m: &Mutex<Connection>) -> Result<MutexGuard<'_, Connection>, StoreError> {
        m.lock().map_err(|_| StoreError::Db {
            operation: "lock",
            detail: "a previous database operation panicked; restart the server".into(),
        })
    }
}

impl MessageStore for SqliteMessageStore {
    fn append_batch(&self, batch: &[NewMessage]) -> Result<Vec<Appended>, StoreError> {
        let mut conn = Self::lock(&self.writer)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db("begin message batch"))?;
        let mut out = Vec::with_capacity(batch.len());
        let mut returned = Vec::with_capacity(CHUNKS[0]);
        let mut rest = batch;
        for (size, sql) in CHUNKS.iter().zip(self.insert_sql.iter()) {
            while rest.len() >= *size {
                let (chunk, tail) = rest.split_at(*size);
                insert_chunk(&tx, sql, chunk, &mut returned, &mut out)?;
                rest = tail;
            }
        }
        tx.commit().map_err(db("commit message batch"))?;
        Ok(out)
    }

    fn list(
        &self,
        device: &DeviceId,
        since: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let conn = Self::lock(&self.reader)?;
        let row = |r: &rusqlite::Row<'_>| {
            Ok(StoredMessage {
                id: r.get(0)?,
                device_id: r.get(1)?,
                topic: r.get(2)?,
                payload: r.get(3)?,
                qos: r.get(4)?,
                msg_id: r.get(5)?,
                received_ms: r.get(6)?,
            })
        };
        const COLS: &str = "id, device_id, topic, payload, qos, msg_id, received_at";
        let rows = match since {
            Some(after) => {
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "SELECT {COLS} FROM messages WHERE device_id = ?1 AND id > ?2 \
                         ORDER BY id LIMIT ?3"
                    ))
                    .map_err(db("list messages"))?;
                let rows = stmt
                    .query_map(params![device.as_str(), after, limit], row)
                    .map_err(db("list messages"))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db("list messages"))?;
                rows
            }
            None => {
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "SELECT {COLS} FROM messages WHERE device_id = ?1 \
                         ORDER BY id DESC LIMIT ?2"
                    ))
                    .map_err(db("list messages"))?;
                let mut rows = stmt
                    .query_map(params![device.as_str(), limit], row)
                    .map_err(db("list messages"))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db("list messages"))?;
                rows.reverse();
                rows
            }
        };
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
        assert!(matches!(r[0], Appended::Stored(_)));
        assert!(matches!(r[1], Appended::Stored(_)));
        assert!(matches!(r[2], Appended::Stored(_)), "msg-id is per device");
        assert_eq!(r[3], Appended::Duplicate);
        // a later batch with the same key is a duplicate too; no key never is
        let r = s
            .append_batch(&[msg("a", 5, Some("k1")), msg("a", 6, None)])
            .unwrap();
        assert_eq!(r[0], Appended::Duplicate);
        assert!(matches!(r[1], Appended::Stored(_)));
        let a = DeviceId::parse("a").unwrap();
        let all = s.list(&a, None, 100).unwrap();
        let payloads: Vec<_> = all.iter().map(|m| m.payload.clone()).collect();
        assert_eq!(
            payloads,
            vec![b"p1".to_vec(), b"p2".to_vec(), b"p6".to_vec()]
        );
        let newest = s.list(&a, None, 1).unwrap();
        assert_eq!(newest[0].payload, b"p6");
        let page = s.list(&a, Some(all[0].id), 1).unwrap();
        assert_eq!(page[0].id, all[1].id);
        assert_eq!(all[0].msg_id.as_deref(), Some("k1"));
        assert_eq!(all[0].topic, "devices/a/telemetry/t");
    }

    #[test]
    fn outcomes_match_inputs_across_chunk_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteMessageStore::open(&dir.path().join("m.db")).unwrap();
        // 150 rows: 64 + 64 + 16 + 4 + 1 + 1; keys repeat within and across chunks
        let key = |i: u32| i.is_multiple_of(2).then(|| format!("k{}", i % 40));
        let batch: Vec<NewMessage> = (0..150).map(|i| msg("d", i, key(i).as_deref())).collect();
        let r = s.append_batch(&batch).unwrap();
        assert_eq!(r.len(), 150);
        let mut seen = std::collections::HashSet::new();
        let mut last = 0;
        for (i, out) in (0..150u32).zip(&r) {
            let expect_new = key(i).is_none_or(|k| seen.insert(k));
            match out {
                Appended::Stored(id) => {
                    assert!(expect_new, "row {i} stored twice");
                    assert!(*id > last, "ids follow input order");
                    last = *id;
                }
                Appended::Duplicate => assert!(!expect_new, "row {i} lost"),
            }
        }
        let stored = s.list(&DeviceId::parse("d").unwrap(), None, 1000).unwrap();
        assert_eq!(stored.len(), 75 + 20);
        // payloads line up with the ids reported
        for (i, out) in (0..150u32).zip(&r) {
            if let Appended::Stored(id) = out {
                let row = stored.iter().find(|m| m.id == *id).unwrap();
                assert_eq!(row.payload, format!("p{i}").into_bytes());
            }
        }
        let again = s.append_batch(&batch[..10]).unwrap();
        for (i, out) in again.iter().enumerate() {
            assert_eq!(
                matches!(out, Appended::Duplicate),
                i.is_multiple_of(2),
                "{i}"
            );
        }
    }
}
