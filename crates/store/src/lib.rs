//! The server's storage contract (an API boundary, like `devid-keystore` on the device): the
//! registry, enrolment tokens, admin credentials and the append-only audit log behind small
//! traits, the telemetry [`messages`] contract, the value types both sides share, the rules
//! every backend applies ([`rules`]) and the enrolment, renewal and state-change transactions
//! written once over a per-backend [`RegistryTx`] ([`tx`]).
//!
//! Backends live in crates of their own (`devid-store-sqlite`, `devid-store-postgres`), the
//! only ones that link a database driver.
//!
//! **Blocking vs async.** Every method of every trait here blocks (disk, locks, network):
//! async callers run them through `tokio::task::spawn_blocking` (the HTTPS API's `blocking`
//! helper, the ingest's registry reads). The one method an async worker may call directly is
//! [`DeviceLookup::try_device_now`], which answers only when it can without waiting and else
//! returns `None`. The PostgreSQL backend panics on an executor thread, so a slip shows in
//! the first test that runs it.
//!
//! Invariants: knows no driver, no HTTP, no MQTT session and no config file; never reads a
//! path of the data dir; operations that must be atomic (enrolment, renewal, state changes)
//! run in one transaction that writes its own audit row, so an acknowledged change always
//! has its audit row.
#![forbid(unsafe_code)]

use std::fmt;
use std::sync::Weak;

use devid_proto::{AuditEntry, DeviceId, DeviceState};

mod attest;
pub mod messages;
mod rules;
pub mod token;
pub mod tx;

pub use attest::{Attestation, Challenge, ChallengeFor, Secret};
pub use messages::{
    Appended, DeviceUsage, IndexHook, LiveMessage, MessageStore, NewMessage, StoredMessage,
    RECORD_OVERHEAD,
};
pub use rules::{state_action, TokenRow};
pub use tx::RegistryTx;

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
    Issue(#[from] IssueError),
    /// The store can no longer promise durability (a failed `fdatasync` of the message log):
    /// the process must stop acknowledging and restart; recovery reads what is on disk.
    #[error("storage {operation} failed fatally: {detail}")]
    Fatal {
        /// What was being done.
        operation: &'static str,
        /// Why.
        detail: String,
    },
}

impl StoreError {
    /// Must the process stop (see [`StoreError::Fatal`])?
    pub fn is_fatal(&self) -> bool {
        matches!(self, StoreError::Fatal { .. })
    }
}

/// The CA could not issue a certificate inside a registry transaction (its words, never a
/// key).
#[derive(Debug, thiserror::Error)]
#[error("issuing the certificate failed: {0}")]
pub struct IssueError(pub String);

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// Expiry, milliseconds since the epoch.
    pub not_after_ms: i64,
}

/// Why the store refused an operation; nothing changed except the audit row. Exhaustive on
/// purpose: a new refusal makes every consumer decide how to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// The presented certificate is neither the device's current one nor, before the current
    /// one was first used, its immediate predecessor (superseded, or from before a
    /// re-enrolment).
    CertSuperseded,
    /// The renewal asks for a new key and the policy (`renewal.key_change`) refuses it.
    KeyChangeRefused,
    /// An admin credential with this name exists (or existed).
    CredentialExists,
    /// No such live admin credential.
    CredentialUnknown,
    /// Revoking it would leave no live credential with the admin role.
    LastAdminCredential,
    /// The token or the server requires key attestation and none was presented.
    AttestationRequired,
    /// The device is attested; enrolling or renewing it onto an unattested key is refused.
    AttestationDowngrade,
    /// The device is registered with another endorsement key (another TPM): an operator must
    /// reset its attestation first.
    EkChanged,
    /// This endorsement key is registered to another device.
    EkRegisteredElsewhere,
    /// The renewal's attestation key is not the one registered for the device.
    AkChanged,
    /// The token names another endorsement key than the one attested.
    EkNotAllowed,
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
            Refusal::CertSuperseded => "cert_superseded",
            Refusal::KeyChangeRefused => "key_change_refused",
            Refusal::CredentialExists => "credential_exists",
            Refusal::CredentialUnknown => "credential_unknown",
            Refusal::LastAdminCredential => "last_admin_credential",
            Refusal::AttestationRequired => "attestation_required",
            Refusal::AttestationDowngrade => "attestation_downgrade",
            Refusal::EkChanged => "ek_changed",
            Refusal::EkRegisteredElsewhere => "ek_registered_elsewhere",
            Refusal::AkChanged => "ak_changed",
            Refusal::EkNotAllowed => "ek_not_allowed",
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
            Refusal::CertSuperseded => {
                "this certificate was superseded (renewed or re-enrolled); renew with the \
                 device's current certificate"
            }
            Refusal::KeyChangeRefused => {
                "the renewal asks for a new key and the server's renewal.key_change policy \
                 refuses it; renew with the certified key"
            }
            Refusal::CredentialExists => {
                "an admin credential with this name exists (names of revoked credentials stay \
                 taken); pick another name"
            }
            Refusal::CredentialUnknown => "no live admin credential with this name",
            Refusal::LastAdminCredential => {
                "this is the last live credential with the admin role; create another admin \
                 credential first"
            }
            Refusal::AttestationRequired => {
                "key attestation is required (by the token or the server): enrol from a TPM \
                 with an endorsement key certificate, without --no-attest"
            }
            Refusal::AttestationDowngrade => {
                "this device is TPM attested: a key that is not attested is refused; attest \
                 the new key, or have the operator reset the device's attestation"
            }
            Refusal::EkChanged => {
                "this device is registered with another TPM (endorsement key); the operator \
                 must run `devid-server device reset-attestation ID` first"
            }
            Refusal::EkRegisteredElsewhere => {
                "this TPM's endorsement key is registered to another device; one TPM is one \
                 device"
            }
            Refusal::AkChanged => {
                "the attestation key is not the one registered for this device; renew with \
                 the registered one or re-enrol"
            }
            Refusal::EkNotAllowed => {
                "the enrolment token is for another TPM (endorsement key fingerprint)"
            }
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
    /// The device must attest its key.
    pub attestation_required: bool,
    /// The endorsement key (hex SHA-256 of its SPKI) the device must attest with.
    pub ek_fingerprint: Option<String>,
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
    /// The certificate the current one replaced at renewal (serial, key fingerprint), kept
    /// only until the current one is first used (an MQTT CONNECT or a renewal with it): a
    /// device whose renewal answer was lost retries with it. `None` after first use and after
    /// an enrolment.
    pub predecessor: Option<(String, String)>,
    /// The keystore backend the device said it used at enrolment (`tpm`, `pkcs11`, `soft`):
    /// what it *reported*, which nothing proves (attestation is what proves a TPM key).
    /// `None` for devices enrolled before devices reported it.
    pub reported_backend: Option<String>,
}

/// Where a certificate stands with its device's registry row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStanding {
    /// The device's current certificate.
    Current,
    /// The immediate predecessor of the current one, which was never used yet: still good
    /// (for the renewal retry after a lost answer, and for the session that was live when the
    /// device renewed).
    Predecessor,
    /// Anything else: an older certificate, or one from before a re-enrolment. Refused.
    Superseded,
}

impl DeviceRecord {
    /// The one rule for which of a device's certificates still work, on HTTPS and MQTT alike.
    pub fn certificate_standing(&self, serial_hex: &str, key_fingerprint: &str) -> CertStanding {
        if self.cert_serial == serial_hex && self.key_fingerprint == key_fingerprint {
            return CertStanding::Current;
        }
        match &self.predecessor {
            Some((s, k)) if s == serial_hex && k == key_fingerprint => CertStanding::Predecessor,
            _ => CertStanding::Superseded,
        }
    }
}

/// The client certificate a renewal was made with, as the TLS layer verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedCert {
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// Hex SHA-256 of its SubjectPublicKeyInfo.
    pub key_fingerprint: String,
}

/// Whether a renewal may change the device's key (`renewal.key_change`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChangePolicy {
    /// Any key the CSR proves possession of (an attested device still needs an attested key).
    Allowed,
    /// Only a key certified by the device's attestation key.
    Attested,
    /// Never.
    Refused,
}

/// A renewal to attempt.
#[derive(Debug, Clone)]
pub struct RenewAttempt<'a> {
    /// The device the presented certificate names.
    pub id: &'a DeviceId,
    /// That certificate.
    pub presented: &'a PresentedCert,
    /// Hex SHA-256 of the CSR's key (the key to certify).
    pub key_fingerprint: &'a str,
    /// May the key change?
    pub key_change: KeyChangePolicy,
    /// The attestation verified for the CSR's key, if any.
    pub attestation: Option<&'a Attestation>,
    /// Audit context.
    pub ctx: &'a AuditCtx,
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
    /// The attestation verified for the CSR's key, if any.
    pub attestation: Option<&'a Attestation>,
    /// Audit context (actor `anonymous`, source, time).
    pub ctx: &'a AuditCtx,
    /// The keystore backend the device reports (one of [`REPORTED_BACKENDS`]), stored as it
    /// is: a claim, not a proof.
    pub reported_backend: Option<&'a str>,
}

/// The backend names a device may report at enrolment; anything else is stored as nothing.
pub const REPORTED_BACKENDS: &[&str] = &["tpm", "pkcs11", "soft"];

/// Issues the certificate inside the store's transaction, once the device id is known.
pub type IssueFn<'a> = &'a mut dyn FnMut(&DeviceId) -> Result<IssuedCert, IssueError>;

/// Result of an operation that may be refused.
pub type Outcome<T> = Result<Result<T, Refusal>, StoreError>;

/// Reading devices, as the MQTT ingest does at every CONNECT and re-check.
pub trait DeviceLookup: Send + Sync + fmt::Debug {
    /// One device.
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;

    /// [`DeviceLookup::device`], but only if it can be answered at once without waiting for
    /// a lock or the network (an embedded database whose connection is free): `None` tells
    /// the caller to use [`DeviceLookup::device`] off the async executor. The only method of
    /// this crate's traits that may run on an async worker thread.
    fn try_device_now(&self, _id: &DeviceId) -> Option<Result<Option<DeviceRecord>, StoreError>> {
        None
    }

    /// The certificate `serial_hex` of device `id` was used (an MQTT CONNECT): if it is the
    /// current one and a predecessor is still kept, forget the predecessor, so no older
    /// certificate works any more. Returns whether anything changed. The one registry write
    /// besides `last_seen` that the MQTT ingest makes.
    fn mark_cert_used(&self, id: &DeviceId, serial_hex: &str) -> Result<bool, StoreError>;

    /// Move devices' `last_seen` forward to the given times (ms since the epoch; an older time
    /// than the stored one changes nothing), in one transaction. Unknown ids are skipped.
    fn record_last_seen(&self, seen: &[(DeviceId, i64)]) -> Result<(), StoreError>;

    /// Follow the device state changes that every node sharing this store commits: tell
    /// `sink` about each one (from a thread of the store's), until `sink` is dropped. A node
    /// uses it to cut the live sessions of a device that another node suspended or revoked.
    /// Returns false when there is nothing to follow because the store is this node's alone
    /// (SQLite): the node's own admin path reports its changes directly.
    fn follow_state_changes(&self, sink: Weak<dyn StateChangeSink>) -> Result<bool, StoreError> {
        let _ = sink;
        Ok(false)
    }
}

/// The append-only audit log.
pub trait AuditLog: Send + Sync + fmt::Debug {
    /// Append an audit row.
    fn append_audit(&self, row: &NewAudit<'_>) -> Result<(), StoreError>;

    /// The newest `limit` audit rows (oldest first), optionally for one device.
    fn audit_log(&self, limit: u32, device: Option<&str>) -> Result<Vec<AuditEntry>, StoreError>;
}

/// What the MQTT ingest may do with the registry: read devices, note `last_seen`, audit its
/// refusals. Never enrol, renew or change a state: least privilege in the type.
pub trait IngestRegistry: DeviceLookup + AuditLog {}

impl<T: DeviceLookup + AuditLog + ?Sized> IngestRegistry for T {}

/// What an admin credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything the admin API offers.
    Admin,
    /// Read everything, change nothing (dashboards, data readers).
    ReadOnly,
}

impl Role {
    /// As stored and shown: `admin`, `read-only`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
        }
    }

    /// The stored form back.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "read-only" => Some(Role::ReadOnly),
            _ => None,
        }
    }
}

/// A named admin credential (its token exists only as a hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCredential {
    /// Its name, in audit rows as `admin:<name>`.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Creation, ms.
    pub created_at_ms: i64,
    /// Revocation, ms (a revoked credential authenticates nothing).
    pub revoked_at_ms: Option<i64>,
}

/// The name the credential made by `devid-server init` (`DATA_DIR/admin.token`) carries.
pub const INIT_CREDENTIAL: &str = "admin";

/// The whole registry, as the HTTPS API and `devid-server init` use it.
pub trait Registry: IngestRegistry {
    /// Record a named admin credential (the hash of its bearer token) and audit it. Refused
    /// with [`Refusal::CredentialExists`] when the name is taken (revoked names stay taken).
    fn add_admin_credential(
        &self,
        name: &str,
        role: Role,
        hash: &str,
        ctx: &AuditCtx,
    ) -> Outcome<()>;

    /// The live (not revoked) credential whose token hashes to `hash`. The lookup is by the
    /// token's SHA-256, so its timing tells nothing about the token.
    fn admin_credential(&self, hash: &str) -> Result<Option<AdminCredential>, StoreError>;

    /// Every credential, revoked ones too, by name.
    fn admin_credentials(&self) -> Result<Vec<AdminCredential>, StoreError>;

    /// Revoke the credential `name` and audit it. Refused with [`Refusal::CredentialUnknown`]
    /// for no such live credential, and [`Refusal::LastAdminCredential`] when it is the last
    /// live one with the admin role (that would lock every operator out).
    fn revoke_admin_credential(&self, name: &str, ctx: &AuditCtx) -> Outcome<()>;

    /// Store a new enrolment token (its hash) and audit it.
    fn create_token(&self, token: &NewToken, ctx: &AuditCtx) -> Result<(), StoreError>;

    /// Enrol: check and consume the token atomically, choose the device id (token binding,
    /// else the request, else a new UUID v4), call `issue`, record the device and the audit
    /// row, all in one transaction ([`tx::enroll`]). A refusal changes nothing but writes a
    /// `refused` audit row.
    fn enroll(
        &self,
        attempt: &EnrollAttempt<'_>,
        issue: IssueFn<'_>,
    ) -> Outcome<(DeviceRecord, IssuedCert)>;

    /// Renew ([`tx::renew`]): the device must be active and the presented certificate its
    /// current one, or the immediate predecessor while the current one was never used; a new
    /// key only where the policy allows. `issue` runs inside the transaction that records the
    /// new serial, key fingerprint, predecessor and last-seen time.
    fn renew(
        &self,
        attempt: &RenewAttempt<'_>,
        issue: IssueFn<'_>,
    ) -> Outcome<(DeviceRecord, IssuedCert)>;

    /// Move a device to `target` ([`tx::set_state`]). Revocation is permanent: leaving
    /// `revoked` is refused with [`Refusal::DeviceRevoked`]. Setting the current state again
    /// is a no-op that succeeds.
    fn set_state(
        &self,
        id: &DeviceId,
        target: DeviceState,
        ctx: &AuditCtx,
    ) -> Outcome<DeviceRecord>;

    /// Every device, by id.
    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;

    /// The token with this hash, read only (the attestation challenge checks a token without
    /// consuming it).
    fn token(&self, hash: &str) -> Result<Option<TokenRow>, StoreError>;

    /// Store an attestation challenge, replacing any other of the same token or device, and
    /// drop challenges that expired more than ten minutes before `now_ms`.
    fn put_challenge(&self, challenge: &Challenge, now_ms: i64) -> Result<(), StoreError>;

    /// Remove and return the challenge `id` (single use: a second take finds nothing).
    fn take_challenge(&self, id: &str) -> Result<Option<Challenge>, StoreError>;

    /// The device's registered attestation.
    fn attestation(&self, id: &DeviceId) -> Result<Option<Attestation>, StoreError>;

    /// Every registered attestation, by device id.
    fn attestations(&self) -> Result<Vec<(String, Attestation)>, StoreError>;

    /// Forget the device's attestation (an operator's decision after a TPM swap), audited
    /// ([`tx::reset_attestation`]).
    fn reset_attestation(&self, id: &DeviceId, ctx: &AuditCtx) -> Outcome<()>;
    /// One page of devices (filter, sort, `LIMIT`/`OFFSET` on indexed columns) and how many
    /// match the filter: what the console's device table shows, fast with 100,000 devices.
    fn device_page(&self, query: &DeviceQuery) -> Result<DevicePage, StoreError>;

    /// Counts for the fleet overview: devices by state and by reported backend, and the
    /// devices (not revoked) whose certificate expires between `now_ms` and `until_ms`
    /// (soonest first, at most `limit`, with their total).
    fn fleet_counts(
        &self,
        now_ms: i64,
        until_ms: i64,
        limit: u32,
    ) -> Result<FleetCounts, StoreError>;
}

/// How the device table is sorted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSort {
    /// By id.
    #[default]
    Id,
    /// By state, then id.
    State,
    /// By last seen, then id.
    LastSeen,
    /// By certificate expiry, then id.
    CertNotAfter,
}

impl DeviceSort {
    /// The query-string name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceSort::Id => "id",
            DeviceSort::State => "state",
            DeviceSort::LastSeen => "last_seen",
            DeviceSort::CertNotAfter => "cert_not_after",
        }
    }

    /// From the query-string name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            DeviceSort::Id,
            DeviceSort::State,
            DeviceSort::LastSeen,
            DeviceSort::CertNotAfter,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// The column (a fixed name, never user text: safe to format into SQL).
    pub fn column(self) -> &'static str {
        match self {
            DeviceSort::Id => "id",
            DeviceSort::State => "state",
            DeviceSort::LastSeen => "last_seen",
            DeviceSort::CertNotAfter => "cert_not_after",
        }
    }
}

/// A page of the device table to read ([`Registry::device_page`]).
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    /// Only devices in this state.
    pub state: Option<DeviceState>,
    /// Only devices with this verified assurance level (`none`: not attested).
    pub assurance: Option<String>,
    /// Only devices that reported this backend.
    pub reported_backend: Option<String>,
    /// Only ids starting with this.
    pub id_prefix: Option<String>,
    /// Sort key.
    pub sort: DeviceSort,
    /// Descending.
    pub descending: bool,
    /// Rows to skip.
    pub offset: u64,
    /// Rows to return (at most).
    pub limit: u32,
}

/// What [`Registry::device_page`] returns.
#[derive(Debug, Clone, Default)]
pub struct DevicePage {
    /// The rows.
    pub devices: Vec<DeviceRecord>,
    /// The verified assurance of each row (`ek-cert`, `ek-allowlist`, `none`), in order.
    pub assurance: Vec<String>,
    /// How many devices match the filter in all.
    pub total: u64,
}

/// The assurance level of a device no attestation was recorded for.
pub const ASSURANCE_NONE: &str = "none";

/// What [`Registry::fleet_counts`] returns.
#[derive(Debug, Clone, Default)]
pub struct FleetCounts {
    /// (state, devices), every state.
    pub by_state: Vec<(DeviceState, u64)>,
    /// (reported backend or `None`, devices).
    pub by_backend: Vec<(Option<String>, u64)>,
    /// (verified assurance, devices): `ek-cert`, `ek-allowlist`, `none`.
    pub by_assurance: Vec<(String, u64)>,
    /// Certificates expiring in the window, soonest first.
    pub expiring: Vec<DeviceRecord>,
    /// How many expire in the window in all.
    pub expiring_total: u64,
}

/// Which devices have a live session on this node (the MQTT ingest's table), for the
/// console's "connected now" column.
pub trait Presence: Send + Sync {
    /// Whether device `id` has a live MQTT session on this node.
    fn connected(&self, id: &str) -> bool;
    /// How many devices have a live session on this node.
    fn connected_count(&self) -> usize;
}

/// Told about device state changes committed by any node (see
/// [`DeviceLookup::follow_state_changes`]).
pub trait StateChangeSink: Send + Sync {
    /// `id` is now in `state` (the change is committed). May be called more than once for one
    /// change, also for the node's own changes: it must be idempotent.
    fn state_changed(&self, id: &DeviceId, state: DeviceState);
}
