//! Storage: the device registry, enrolment tokens, admin credentials and the append-only audit
//! log, behind the [`Store`] trait so SQLite ([`sqlite`]) and PostgreSQL ([`postgres`]) share one
//! contract.
//!
//! Methods are blocking; async callers use `spawn_blocking`. Operations that must be atomic
//! (enrolment, renewal, state changes) are single methods that run in one transaction and
//! write their own audit row in it, so an acknowledged change always has its audit row.

use std::fmt;

use devid_proto::{AuditEntry, DeviceId, DeviceInfo, DeviceState};

use crate::ca::{CaError, IssuedCert};
use crate::timeutil::rfc3339;

pub mod messages;
pub mod messages_sqlite;
pub mod postgres;
pub mod postgres_messages;
mod rules;
pub mod sqlite;

/// Storage failures (not refusals: those are [`Refusal`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed.
    #[error("database {operation} failed: {detail}")]
    Db {
        /// What was being done.
        operation: &'static str,
        /// The driver's words (never a token: tokens are bound as parameters, never
        /// formatted into SQL).
        detail: String,
    },
    /// The database holds something this version cannot read.
    #[error("database holds an invalid {what}: {detail}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// Signing the certificate inside the transaction failed; nothing was stored.
    #[error(transparent)]
    Issue(#[from] CaError),
}

/// Why the store refused an operation; nothing changed except the audit row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// No such enrolment token.
    TokenUnknown,
    /// The token was used already.
    TokenUsed,
    /// The token expired.
    TokenExpired,
    /// The token is bound to another device id than the one requested.
    TokenBoundToOther,
    /// A device with this id exists and the token is not bound to it.
    DeviceExists,
    /// The device is revoked (for good).
    DeviceRevoked,
    /// The device is suspended.
    DeviceSuspended,
    /// No such device.
    DeviceUnknown,
}

impl Refusal {
    /// Stable code for JSON errors and the audit log.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::TokenUnknown => "token_unknown",
            Refusal::TokenUsed => "token_used",
            Refusal::TokenExpired => "token_expired",
            Refusal::TokenBoundToOther => "token_device_mismatch",
            Refusal::DeviceExists => "device_exists",
            Refusal::DeviceRevoked => "device_revoked",
            Refusal::DeviceSuspended => "device_suspended",
            Refusal::DeviceUnknown => "device_unknown",
        }
    }

    /// A sentence for the client.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::TokenUnknown => "unknown enrolment token; ask the operator for a new one",
            Refusal::TokenUsed => {
                "enrolment token was already used; tokens are single-use, ask for a new one"
            }
            Refusal::TokenExpired => "enrolment token expired; ask the operator for a new one",
            Refusal::TokenBoundToOther => {
                "enrolment token is bound to another device id; omit device_id or use the \
                 token made for this device"
            }
            Refusal::DeviceExists => {
                "a device with this id is already enrolled; pick another id, or have the \
                 operator create a token bound to this id to re-enrol it"
            }
            Refusal::DeviceRevoked => "device is revoked; revocation is permanent",
            Refusal::DeviceSuspended => "device is suspended; ask the operator to resume it",
            Refusal::DeviceUnknown => "no such device in the registry",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// Who does something and from where, for the audit row.
#[derive(Debug, Clone)]
pub struct AuditCtx {
    /// `admin`, `device:<id>`, `anonymous`.
    pub actor: String,
    /// Peer address.
    pub source: String,
    /// Time of the operation, ms since the epoch.
    pub now_ms: i64,
}

/// A new audit row.
#[derive(Debug, Clone)]
pub struct NewAudit<'a> {
    /// Context.
    pub ctx: &'a AuditCtx,
    /// Device concerned.
    pub device_id: Option<&'a str>,
    /// Action name.
    pub action: &'a str,
    /// `ok` or `refused`.
    pub outcome: &'a str,
    /// Code or non-secret detail.
    pub detail: &'a str,
}

/// A new enrolment token (only its hash).
#[derive(Debug, Clone)]
pub struct NewToken {
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// Bound device id.
    pub device_id: Option<DeviceId>,
    /// Policy for the device that uses it.
    pub policy: String,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: i64,
}

/// A registry row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Device id.
    pub id: DeviceId,
    /// State.
    pub state: DeviceState,
    /// Newest certificate serial, hex.
    pub cert_serial: String,
    /// Its expiry, ms.
    pub cert_not_after_ms: i64,
    /// Hex SHA-256 of the device key's SPKI.
    pub key_fingerprint: String,
    /// Policy name.
    pub policy: String,
    /// Row creation, ms.
    pub created_at_ms: i64,
    /// Last enrolment, ms.
    pub enrolled_at_ms: i64,
    /// Last seen, ms.
    pub last_seen_ms: i64,
}

impl DeviceRecord {
    /// The admin API's view.
    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: self.id.to_string(),
            state: self.state,
            cert_serial: self.cert_serial.clone(),
            cert_not_after: rfc3339(self.cert_not_after_ms),
            key_fingerprint: self.key_fingerprint.clone(),
            policy: self.policy.clone(),
            created_at: rfc3339(self.created_at_ms),
            enrolled_at: rfc3339(self.enrolled_at_ms),
            last_seen: rfc3339(self.last_seen_ms),
        }
    }
}

/// An enrolment to attempt.
#[derive(Debug, Clone)]
pub struct EnrollAttempt<'a> {
    /// Hex SHA-256 of the presented token.
    pub token_hash: &'a str,
    /// The id the device asked for.
    pub requested_id: Option<&'a DeviceId>,
    /// Hex SHA-256 of the CSR's key.
    pub key_fingerprint: &'a str,
    /// Audit context (actor `anonymous`, source, time).
    pub ctx: &'a AuditCtx,
}

/// Issues the certificate inside the store's transaction, once the device id is known.
pub type IssueFn<'a> = &'a mut dyn FnMut(&DeviceId) -> Result<IssuedCert, CaError>;

/// Result of an operation that may be refused.
pub type Outcome<T> = Result<Result<T, Refusal>, StoreError>;

/// The server's storage.
pub trait Store: Send + Sync + fmt::Debug {
    /// Record the hash of an admin bearer token.
    fn add_admin_credential(&self, hash: &str, now_ms: i64) -> Result<(), StoreError>;

    /// Whether a bearer token hash belongs to an admin.
    fn admin_credential_valid(&self, hash: &str) -> Result<bool, StoreError>;

    /// Store a new enrolment token (its hash) and audit it.
    fn create_token(&self, token: &NewToken, ctx: &AuditCtx) -> Result<(), StoreError>;

    /// Enrol: check and consume the token atomically (`UPDATE ... WHERE used_at IS NULL AND
    /// expires_at > now`), choose the device id (token binding, else the request, else a new
    /// UUID v4), call `issue`, record the device and the audit row, all in one transaction.
    /// A refusal changes nothing but writes a `refused` audit row.
    fn enroll(
        &self,
        attempt: &EnrollAttempt<'_>,
        issue: IssueFn<'_>,
    ) -> Outcome<(DeviceRecord, IssuedCert)>;

    /// Renew: the device must be active; `issue` runs inside the transaction that records the
    /// new serial, key fingerprint and last-seen time.
    fn renew(
        &self,
        id: &DeviceId,
        key_fingerprint: &str,
        ctx: &AuditCtx,
        issue: IssueFn<'_>,
    ) -> Outcome<(DeviceRecord, IssuedCert)>;

    /// Move a device to `target`. Revocation is permanent: leaving `revoked` is refused with
    /// [`Refusal::DeviceRevoked`]. Setting the current state again is a no-op that succeeds.
    fn set_state(
        &self,
        id: &DeviceId,
        target: DeviceState,
        ctx: &AuditCtx,
    ) -> Outcome<DeviceRecord>;

    /// One device.
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;

    /// Move devices' `last_seen` forward to the given times (ms since the epoch; an older time
    /// than the stored one changes nothing), in one transaction. Unknown ids are skipped.
    fn record_last_seen(&self, seen: &[(DeviceId, i64)]) -> Result<(), StoreError>;

    /// [`Store::device`], but only if it can be answered at once without waiting for a lock
    /// or the network (an embedded database whose connection is free): `None` tells the
    /// caller to use [`Store::device`] off the async executor. The MQTT ingest reads the
    /// registry at every CONNECT; this saves that read a trip through the blocking pool.
    fn try_device_now(&self, _id: &DeviceId) -> Option<Result<Option<DeviceRecord>, StoreError>> {
        None
    }

    /// Every device, by id.
    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;

    /// Append an audit row.
    fn append_audit(&self, row: &NewAudit<'_>) -> Result<(), StoreError>;

    /// The newest `limit` audit rows (oldest first), optionally for one device.
    fn audit_log(&self, limit: u32, device: Option<&str>) -> Result<Vec<AuditEntry>, StoreError>;

    /// Follow the device state changes that every node sharing this store commits: tell
    /// `sink` about each one (from a thread of the store's), until `sink` is dropped. A node
    /// uses it to cut the live sessions of a device that another node suspended or revoked.
    /// Returns false when there is nothing to follow because the store is this node's alone
    /// (SQLite): the node's own admin path reports its changes directly.
    fn follow_state_changes(
        &self,
        sink: std::sync::Weak<dyn StateChangeSink>,
    ) -> Result<bool, StoreError> {
        let _ = sink;
        Ok(false)
    }
}

/// Told about device state changes committed by any node (see
/// [`Store::follow_state_changes`]).
pub trait StateChangeSink: Send + Sync {
    /// `id` is now in `state` (the change is committed). May be called more than once for one
    /// change, also for the node's own changes: it must be idempotent.
    fn state_changed(&self, id: &DeviceId, state: DeviceState);
}

/// Open the store a config names.
pub fn open(cfg: &crate::config::ServerConfig) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    match cfg.db_location() {
        Ok(crate::config::DbLocation::Sqlite(path)) => {
            Ok(std::sync::Arc::new(sqlite::SqliteStore::open(&path)?))
        }
        Ok(crate::config::DbLocation::Postgres(url)) => {
            Ok(std::sync::Arc::new(postgres::PostgresStore::open(&url)?))
        }
        Err(e) => Err(StoreError::Db {
            operation: "open",
            detail: e.to_string(),
        }),
    }
}
