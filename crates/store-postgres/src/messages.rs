//! [`MessageStore`] on PostgreSQL: table `messages` (migration 2 of
//! [`crate::MIGRATIONS`]) in the registry's database, so every server node stores
//! into, and reads from, one place.
//!
//! A batch is ONE transaction with `synchronous_commit = on` forced for it (a database
//! configured to commit asynchronously would otherwise acknowledge before the WAL is flushed);
//! a message whose (device, msg-id) exists is skipped by `ON CONFLICT DO NOTHING` and reported
//! as [`Appended::Duplicate`], also when two nodes receive the same redelivery at once.

use devid_proto::DeviceId;
use r2d2_postgres::postgres::Row;

use devid_store::{
    Appended, DeviceUsage, MessageStore, NewMessage, StoreError, StoredMessage, RECORD_OVERHEAD,
};

use crate::registry::PostgresStore;

const INSERT: &str = "INSERT INTO messages (device_id, topic, payload, qos, msg_id, received_at) \
                      VALUES ($1, $2, $3, $4, $5, $6) \
                      ON CONFLICT (device_id, msg_id) WHERE msg_id IS NOT NULL DO NOTHING \
                      RETURNING id";

const COLS: &str = "id, device_id, topic, payload, qos, msg_id, received_at";

fn message(r: &Row) -> Result<StoredMessage, r2d2_postgres::postgres::Error> {
    let qos: i16 = r.try_get(4)?;
    Ok(StoredMessage {
        id: r.try_get(0)?,
        device_id: r.try_get(1)?,
        topic: r.try_get(2)?,
        payload: r.try_get(3)?,
        qos: u8::try_from(qos).unwrap_or(u8::MAX),
        msg_id: r.try_get(5)?,
        received_ms: r.try_get(6)?,
    })
}

impl MessageStore for PostgresStore {
    fn append_batch(&self, batch: &[NewMessage]) -> Result<Vec<Appended>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(self.db("begin message batch"))?;
        tx.batch_execute("SET LOCAL synchronous_commit = on")
            .map_err(self.db("begin message batch"))?;
        let stmt = tx.prepare(INSERT).map_err(self.db("append messages"))?;
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            let row = tx
                .query_opt(
                    &stmt,
                    &[
                        &&*m.device_id,
                        &&*m.topic,
                        &&m.payload[..],
                        &i16::from(m.qos),
                        &m.msg_id.as_deref(),
                        &m.received_ms,
                    ],
                )
                .map_err(self.db("append messages"))?;
            out.push(match row {
                Some(r) => Appended::Stored(r.try_get(0).map_err(self.db("append messages"))?),
                None => Appended::Duplicate,
            });
        }
        tx.commit().map_err(self.db("commit message batch"))?;
        Ok(out)
    }

    fn usage_since(&self, since_ms: i64, bucket_ms: i64) -> Result<Vec<DeviceUsage>, StoreError> {
        let mut conn = self.conn()?;
        let bucket_ms = bucket_ms.max(1);
        let overhead = RECORD_OVERHEAD as i64;
        let rows = conn
            .query(
                "SELECT device_id, (received_at / $2::BIGINT) * $2::BIGINT, \
                 sum($3::BIGINT + octet_length(payload) + octet_length(topic) \
                     + octet_length(device_id) + coalesce(octet_length(msg_id), 0))::BIGINT \
                 FROM messages WHERE received_at >= $1 GROUP BY 1, 2",
                &[&since_ms, &bucket_ms, &overhead],
            )
            .map_err(self.db("read message usage"))?;
        rows.iter()
            .map(|r| {
                Ok(DeviceUsage {
                    device_id: r.try_get(0)?,
                    bucket_ms: r.try_get(1)?,
                    bytes: u64::try_from(r.try_get::<_, i64>(2)?).unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>, r2d2_postgres::postgres::Error>>()
            .map_err(self.db("read message usage"))
    }

    fn list(
        &self,
        device: &DeviceId,
        since: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut conn = self.conn()?;
        let limit = i64::from(limit);
        let rows = match since {
            Some(after) => conn.query(
                &format!(
                    "SELECT {COLS} FROM messages WHERE device_id = $1 AND id > $2 \
                     ORDER BY id LIMIT $3"
                ),
                &[&device.as_str(), &after, &limit],
            ),
            None => conn.query(
                &format!(
                    "SELECT {COLS} FROM messages WHERE device_id = $1 ORDER BY id DESC LIMIT $2"
                ),
                &[&device.as_str(), &limit],
            ),
        }
        .map_err(self.db("list messages"))?;
        let mut out = rows
            .iter()
            .map(message)
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.db("list messages"))?;
        if since.is_none() {
            out.reverse();
        }
        Ok(out)
    }
}

/// Rows one retention statement deletes (`DELETE ... WHERE id IN (SELECT ... LIMIT n)`), so
/// no statement holds many row locks or writes much WAL at once.
const RETENTION_BATCH: i64 = 10_000;
/// Most batches per retention round (bounded work per round).
const RETENTION_BATCHES_PER_ROUND: usize = 50;

impl PostgresStore {
    /// One retention round: delete messages received before `cutoff_ms`, oldest ids first,
    /// in batches; returns how many went.
    pub fn delete_messages_before(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        let mut conn = self.conn()?;
        let mut n = 0u64;
        for _ in 0..RETENTION_BATCHES_PER_ROUND {
            let k = conn
                .execute(
                    "DELETE FROM messages WHERE id IN (SELECT id FROM messages \
                     WHERE received_at < $1 ORDER BY id LIMIT $2)",
                    &[&cutoff_ms, &RETENTION_BATCH],
                )
                .map_err(self.db("delete old messages"))?;
            n += k;
            if k < RETENTION_BATCH as u64 {
                break;
            }
        }
        Ok(n)
    }

    /// Delete messages older than `max_age` every `interval` in a background thread, which
    /// ends when the store is dropped.
    pub fn start_retention(
        self: &std::sync::Arc<Self>,
        max_age: std::time::Duration,
        interval: std::time::Duration,
    ) -> Result<(), StoreError> {
        let me = std::sync::Arc::downgrade(self);
        let age_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        std::thread::Builder::new()
            .name("devid-retention".into())
            .spawn(move || loop {
                let Some(store) = me.upgrade() else { return };
                match store.delete_messages_before(devid_stdx::now_ms().saturating_sub(age_ms)) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(messages = n, "retention deleted old messages"),
                    Err(e) => tracing::warn!(error = %e, "retention round failed; retrying"),
                }
                drop(store);
                std::thread::sleep(interval);
            })
            .map_err(|e| StoreError::Db {
                operation: "start message retention",
                detail: e.to_string(),
            })?;
        Ok(())
    }
}
