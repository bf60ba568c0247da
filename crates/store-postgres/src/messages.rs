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

use devid_store::{Appended, MessageStore, NewMessage, StoreError, StoredMessage};

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
