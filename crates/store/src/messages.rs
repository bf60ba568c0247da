//! Telemetry message storage behind the [`MessageStore`] trait, so SQLite (`devid-store-sqlite`:
//! an append-only message log indexed asynchronously) and PostgreSQL (`devid-store-postgres`:
//! one table) share one contract.
//!
//! The contract that makes acknowledgements honest: [`MessageStore::append_batch`] returns only
//! once every row of the batch is durably committed (one transaction, synced to disk). The
//! ingest's group-commit writer calls it with many messages at once and releases their PUBACKs
//! only afterwards. A message that carries an idempotency key (`msg-id`) is stored at most once
//! per device: a redelivery is reported as [`Appended::Duplicate`] and still acknowledged.

use std::fmt;
use std::sync::Arc;

use devid_mqtt::{ByteString, Bytes};
use devid_proto::DeviceId;

use crate::StoreError;

/// A message to append. Cheap to build from a decoded PUBLISH: topic and payload share the
/// receive buffer.
#[derive(Clone)]
pub struct NewMessage {
    /// The device that sent it (from its certificate).
    pub device_id: Arc<str>,
    /// Topic name.
    pub topic: ByteString,
    /// Payload bytes (never logged).
    pub payload: Bytes,
    /// QoS it was published with (0 or 1).
    pub qos: u8,
    /// Idempotency key (MQTT 5 user property `msg-id`).
    pub msg_id: Option<ByteString>,
    /// When the server received it, ms since the epoch.
    pub received_ms: i64,
}

impl fmt::Debug for NewMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewMessage")
            .field("device_id", &self.device_id)
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("msg_id", &self.msg_id)
            .finish()
    }
}

/// Bytes of per-message overhead counted by [`NewMessage::stored_bytes`]: the message log's
/// record header and fixed fields (the same for every backend, so a quota means one thing).
pub const RECORD_OVERHEAD: u64 = 36;

impl NewMessage {
    /// What this message costs a device's quota: payload, topic, device id and msg-id bytes
    /// plus [`RECORD_OVERHEAD`] (exactly its length in the SQLite backend's message log).
    pub fn stored_bytes(&self) -> u64 {
        RECORD_OVERHEAD
            + self.payload.len() as u64
            + self.topic.len() as u64
            + self.device_id.len() as u64
            + self.msg_id.as_ref().map_or(0, |m| m.len() as u64)
    }
}

/// Bytes one device stored in one time bucket (quota seeding at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUsage {
    /// The device.
    pub device_id: String,
    /// Start of the bucket, ms since the epoch.
    pub bucket_ms: i64,
    /// [`NewMessage::stored_bytes`] summed over the bucket.
    pub bytes: u64,
}

/// What happened to one appended message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored with this row id.
    Stored(i64),
    /// Durable in the store's append-only log as this row id; the store indexes it
    /// asynchronously, skips it there if its (device, msg-id) exists already, and reports it
    /// through the [`IndexHook`].
    Logged(i64),
    /// Its (device, msg-id) was stored before: nothing new was written.
    Duplicate,
}

/// A stored message.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Row id, increasing with arrival.
    pub id: i64,
    /// Device id.
    pub device_id: String,
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS.
    pub qos: u8,
    /// Idempotency key, if the device sent one.
    pub msg_id: Option<String>,
    /// Receive time, ms since the epoch.
    pub received_ms: i64,
}

impl fmt::Debug for StoredMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredMessage")
            .field("id", &self.id)
            .field("device_id", &self.device_id)
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("msg_id", &self.msg_id)
            .finish()
    }
}

/// Called by a store that indexes asynchronously ([`Appended::Logged`]) after each indexed
/// batch, before the batch becomes visible to [`MessageStore::list`]: the messages stored with
/// their row ids, and how many were duplicates (skipped).
pub type IndexHook = Box<dyn Fn(&[(i64, NewMessage)], u64) + Send + Sync>;

/// Durable telemetry storage. Methods are blocking.
///
/// Two durability paths, one promise: [`MessageStore::append_batch`] returns only once every
/// message of the batch is durable. PostgreSQL stores the batch in one transaction and reports
/// [`Appended::Stored`] (or [`Appended::Duplicate`]); the caller counts and streams those at
/// once. SQLite appends the batch to its message log with one `fdatasync` and reports
/// [`Appended::Logged`]; its indexer later skips duplicates and reports the stored messages
/// through the [`IndexHook`], where they are counted and streamed.
pub trait MessageStore: Send + Sync + fmt::Debug {
    /// Append `batch` and return only once it is durable (see the trait's doc for the two
    /// paths). The result has one entry per input, in order. On error nothing of the batch is
    /// acknowledged.
    fn append_batch(&self, batch: &[NewMessage]) -> Result<Vec<Appended>, StoreError>;

    /// Install the hook of an asynchronously indexing store (a no-op for the others).
    fn set_index_hook(&self, _hook: IndexHook) {}

    /// Bytes each device stored since `since_ms`, per time bucket of at most `bucket_ms`
    /// (the ingest seeds its per-device quota counters from this once at start).
    fn usage_since(&self, since_ms: i64, bucket_ms: i64) -> Result<Vec<DeviceUsage>, StoreError>;

    /// Messages of `device`, oldest first. Every message acknowledged before the call is
    /// visible (an asynchronous index is waited for). With `since` (a row id): the first `limit` rows
    /// after it; without: the newest `limit` rows.
    fn list(
        &self,
        device: &DeviceId,
        since: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError>;
}

/// A stored message as the live stream (`GET /v1/stream`) sees it.
#[derive(Clone)]
pub struct LiveMessage {
    /// Row id.
    pub id: i64,
    /// Device id.
    pub device_id: Arc<str>,
    /// Topic.
    pub topic: ByteString,
    /// Payload (never logged).
    pub payload: Bytes,
    /// QoS.
    pub qos: u8,
    /// Idempotency key.
    pub msg_id: Option<ByteString>,
    /// Receive time, ms.
    pub received_ms: i64,
}

impl LiveMessage {
    /// Message `m`, stored with row id `id`.
    pub fn new(id: i64, m: NewMessage) -> Self {
        LiveMessage {
            id,
            device_id: m.device_id,
            topic: m.topic,
            payload: m.payload,
            qos: m.qos,
            msg_id: m.msg_id,
            received_ms: m.received_ms,
        }
    }
}

impl fmt::Debug for LiveMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveMessage")
            .field("id", &self.id)
            .field("device_id", &self.device_id)
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}
