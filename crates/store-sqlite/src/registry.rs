//! The SQLite backend: one WAL-mode database file in the data dir, `synchronous = FULL` so an
//! acknowledged enrolment survives a power loss.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use devid_proto::{AuditEntry, DeviceId, DeviceState};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use devid_stdx::rfc3339;
use devid_store::{
    tx, AdminCredential, Attestation, AuditCtx, AuditLog, Challenge, ChallengeFor, DeviceLookup,
    DevicePage, DeviceQuery, DeviceRecord, EnrollAttempt, FleetCounts, IssueFn, IssuedCert,
    NewAudit, NewToken, Outcome, Registry, RegistryTx, RenewAttempt, Role, StoreError, TokenRow,
};

/// The schema. The audit table is append-only (triggers refuse UPDATE and DELETE) and a revoked
/// device cannot leave `revoked` (trigger), so even a bug above cannot undo either.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS admin_credentials (
    token_hash TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_hash TEXT PRIMARY KEY,
    device_id  TEXT,
    policy     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    used_by    TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    id              TEXT PRIMARY KEY,
    state           TEXT NOT NULL CHECK (state IN ('active', 'suspended', 'revoked')),
    cert_serial     TEXT NOT NULL,
    cert_not_after  INTEGER NOT NULL,
    key_fingerprint TEXT NOT NULL,
    policy          TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    enrolled_at     INTEGER NOT NULL,
    last_seen       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    time      INTEGER NOT NULL,
    actor     TEXT NOT NULL,
    device_id TEXT,
    action    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    source    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_device ON audit (device_id, id);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS revoked_is_permanent BEFORE UPDATE OF state ON devices
    WHEN OLD.state = 'revoked' AND NEW.state <> 'revoked'
    BEGIN SELECT RAISE(ABORT, 'revocation is permanent'); END;
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');
"#;

/// A registry in one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// For [`Store::record_last_seen`] only.
    seen: Mutex<Connection>,
    /// For [`Store::try_device_now`] only (read-only, no busy timeout).
    reader: Mutex<Connection>,
}

fn db(operation: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::Db {
        operation,
        detail: e.to_string(),
    }
}

const DEVICE_COLUMNS: &str = "id, state, cert_serial, cert_not_after, key_fingerprint, policy, \
                              created_at, enrolled_at, last_seen, prev_cert_serial, \
                              prev_key_fingerprint, reported_backend";

/// Schema version 2 (applied at open to every database of version 1, new ones included: the
/// released [`SCHEMA`] is never edited): a renewed certificate's predecessor, kept until the
/// new one is first used.
const MIGRATE_2: &str = "ALTER TABLE devices ADD COLUMN prev_cert_serial TEXT; \
                         ALTER TABLE devices ADD COLUMN prev_key_fingerprint TEXT;";

fn device_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, DeviceRecordRest)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        DeviceRecordRest {
            cert_serial: row.get(2)?,
            cert_not_after_ms: row.get(3)?,
            key_fingerprint: row.get(4)?,
            policy: row.get(5)?,
            created_at_ms: row.get(6)?,
            enrolled_at_ms: row.get(7)?,
            last_seen_ms: row.get(8)?,
            prev_serial: row.get(9)?,
            prev_key: row.get(10)?,
            reported_backend: row.get(11)?,
        },
    ))
}

struct DeviceRecordRest {
    cert_serial: String,
    cert_not_after_ms: i64,
    key_fingerprint: String,
    policy: String,
    created_at_ms: i64,
    enrolled_at_ms: i64,
    last_seen_ms: i64,
    prev_serial: Option<String>,
    prev_key: Option<String>,
    reported_backend: Option<String>,
}

fn to_record(
    (id, state, r): (String, String, DeviceRecordRest),
) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord {
        id: DeviceId::parse(&id).map_err(|e| StoreError::Corrupt {
            what: "device id",
            detail: e.to_string(),
        })?,
        state: state.parse().map_err(|e: String| StoreError::Corrupt {
            what: "device state",
            detail: e,
        })?,
        cert_serial: r.cert_serial,
        cert_not_after_ms: r.cert_not_after_ms,
        key_fingerprint: r.key_fingerprint,
        policy: r.policy,
        created_at_ms: r.created_at_ms,
        enrolled_at_ms: r.enrolled_at_ms,
        last_seen_ms: r.last_seen_ms,
        predecessor: r.prev_serial.zip(r.prev_key),
        reported_backend: r.reported_backend,
    })
}

fn load_device(conn: &Connection, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
    device_of(query_device(conn, id))
}

fn device_of(
    row: rusqlite::Result<Option<(String, String, DeviceRecordRest)>>,
) -> Result<Option<DeviceRecord>, StoreError> {
    row.map_err(db("read device"))?.map(to_record).transpose()
}

fn query_device(
    conn: &Connection,
    id: &str,
) -> rusqlite::Result<Option<(String, String, DeviceRecordRest)>> {
    // cached: every MQTT CONNECT reads its device
    conn.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
    ))
    .and_then(|mut st| st.query_row(params![id], device_row))
    .optional()
}

fn insert_audit(conn: &Connection, row: &NewAudit<'_>) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit (time, actor, device_id, action, outcome, detail, source) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            row.ctx.now_ms,
            row.ctx.actor,
            row.device_id,
            row.action,
            row.outcome,
            row.detail,
            row.ctx.source
        ],
    )
    .map_err(db("append audit"))?;
    Ok(())
}

impl SqliteStore {
    /// Open (creating when missing) the database at `path` and bring its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let existed = path.exists();
        let conn = Connection::open(path).map_err(db("open"))?;
        if !existed {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| StoreError::Db {
                    operation: "open",
                    detail: format!("chmod 600 {}: {e}", path.display()),
                },
            )?;
        }
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db("configure"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(db("enable WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Db {
                operation: "enable WAL",
                detail: format!("journal mode is {mode}"),
            });
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(db("configure"))?;
        conn.execute_batch(SCHEMA).map_err(db("create schema"))?;
        migrate(&conn)?;
        // last_seen gets a connection of its own: its batches wait for the database's write
        // lock (the message indexer shares the file) without holding the registry's
        // connection, which every CONNECT reads through. It is a convenience, not a record
        // that must survive a power cut: NORMAL skips the fsync at commit.
        let seen = Connection::open(path).map_err(db("open"))?;
        seen.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db("configure"))?;
        seen.execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(db("configure"))?;
        // The in-place reader of `try_device_now`: no busy handler, so it never sleeps on an
        // async worker (a busy database sends the caller to the blocking path instead).
        let reader = Connection::open(path).map_err(db("open"))?;
        reader
            .execute_batch("PRAGMA query_only = ON;")
            .map_err(db("configure"))?;
        Ok(Self {
            conn: Mutex::new(conn),
            seen: Mutex::new(seen),
            reader: Mutex::new(reader),
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Db {
            operation: "lock",
            detail: "a previous database operation panicked; restart the server".into(),
        })
    }
}

/// Schema version 3: admin credentials get a name (the one `init` made is `admin`), a role and
/// a revocation time.
const MIGRATE_3: &str = "ALTER TABLE admin_credentials ADD COLUMN name TEXT; \
                         ALTER TABLE admin_credentials ADD COLUMN role TEXT NOT NULL \
                             DEFAULT 'admin'; \
                         ALTER TABLE admin_credentials ADD COLUMN revoked_at INTEGER; \
                         UPDATE admin_credentials SET name = CASE WHEN rowid = \
                             (SELECT MIN(rowid) FROM admin_credentials) THEN 'admin' \
                             ELSE 'admin-' || rowid END; \
                         CREATE UNIQUE INDEX admin_credentials_name ON admin_credentials (name);";

/// Schema version 5: key attestation. Per device the verified attestation (one EK is one
/// device: the fingerprint is unique), the pending challenges between the two steps, and
/// per token the attestation demands.
const MIGRATE_5: &str = "CREATE TABLE device_attestation ( \
                             device_id TEXT PRIMARY KEY, \
                             assurance TEXT NOT NULL, \
                             ek_fingerprint TEXT NOT NULL UNIQUE, \
                             ek_manufacturer TEXT, \
                             ek_model TEXT, \
                             ak_public TEXT NOT NULL, \
                             recorded_at INTEGER NOT NULL); \
                         CREATE TABLE attest_challenges ( \
                             id TEXT PRIMARY KEY, \
                             token_hash TEXT, \
                             device_id TEXT, \
                             assurance TEXT NOT NULL, \
                             ek_fingerprint TEXT NOT NULL, \
                             ek_manufacturer TEXT, \
                             ek_model TEXT, \
                             ak_public TEXT NOT NULL, \
                             secret TEXT NOT NULL, \
                             expires_at INTEGER NOT NULL); \
                         ALTER TABLE enrollment_tokens ADD COLUMN attestation TEXT; \
                         ALTER TABLE enrollment_tokens ADD COLUMN ek_fingerprint TEXT;";

const ATTESTATION_COLUMNS: &str = "assurance, ek_fingerprint, ek_manufacturer, ek_model, ak_public";

fn attestation_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Attestation> {
    Ok(Attestation {
        assurance: r.get(at)?,
        ek_fingerprint: r.get(at + 1)?,
        ek_manufacturer: r.get(at + 2)?,
        ek_model: r.get(at + 3)?,
        ak_public: r.get(at + 4)?,
    })
}

fn load_attestation(conn: &Connection, id: &str) -> Result<Option<Attestation>, StoreError> {
    conn.query_row(
        &format!("SELECT {ATTESTATION_COLUMNS} FROM device_attestation WHERE device_id = ?1"),
        params![id],
        |r| attestation_row(r, 0),
    )
    .optional()
    .map_err(db("read attestation"))
}

fn token_row(conn: &Connection, hash: &str) -> Result<Option<TokenRow>, StoreError> {
    conn.query_row(
        "SELECT device_id, policy, expires_at, used_at, attestation, ek_fingerprint \
         FROM enrollment_tokens WHERE token_hash = ?1",
        params![hash],
        |r| {
            Ok(TokenRow {
                bound: r.get(0)?,
                policy: r.get(1)?,
                expires_at_ms: r.get(2)?,
                used: r.get::<_, Option<i64>>(3)?.is_some(),
                attestation_required: r.get::<_, Option<String>>(4)?.as_deref() == Some("required"),
                ek_fingerprint: r.get(5)?,
            })
        },
    )
    .optional()
    .map_err(db("read token"))
}

fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool, StoreError> {
    conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .map_err(db("read the schema"))
}

/// Schema version 4: the backend a device reported at enrolment, and indexes for the
/// console's device table (filter by state or backend, sort by last seen or expiry, paged).
const MIGRATE_4: &str = "ALTER TABLE devices ADD COLUMN reported_backend TEXT; \
                         CREATE INDEX devices_state ON devices (state, id); \
                         CREATE INDEX devices_last_seen ON devices (last_seen, id); \
                         CREATE INDEX devices_cert_not_after ON devices (cert_not_after, id); \
                         CREATE INDEX devices_reported_backend ON devices (reported_backend, id);";

/// Bring a database made by an older version up to the current schema (in one transaction).
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    migrate_2(conn)?;
    migrate_3(conn)?;
    if !has_column(conn, "devices", "reported_backend")? {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {MIGRATE_4} \
             UPDATE meta SET value = '4' WHERE key = 'schema_version'; COMMIT;"
        ))
        .map_err(db("migrate the schema to version 4"))?;
        tracing::info!(schema_version = 4, "applied database migration");
    }
    if !has_column(conn, "enrollment_tokens", "attestation")? {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {MIGRATE_5} \
             UPDATE meta SET value = '5' WHERE key = 'schema_version'; COMMIT;"
        ))
        .map_err(db("migrate the schema to version 5"))?;
        tracing::info!(schema_version = 5, "applied database migration");
    }
    Ok(())
}

fn migrate_3(conn: &Connection) -> Result<(), StoreError> {
    if !has_column(conn, "admin_credentials", "name")? {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {MIGRATE_3} \
             UPDATE meta SET value = '3' WHERE key = 'schema_version'; COMMIT;"
        ))
        .map_err(db("migrate the schema to version 3"))?;
        tracing::info!(schema_version = 3, "applied database migration");
    }
    Ok(())
}

fn migrate_2(conn: &Connection) -> Result<(), StoreError> {
    if !has_column(conn, "devices", "prev_cert_serial")? {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {MIGRATE_2} \
             UPDATE meta SET value = '2' WHERE key = 'schema_version'; COMMIT;"
        ))
        .map_err(db("migrate the schema to version 2"))?;
        tracing::info!(schema_version = 2, "applied database migration");
    }
    Ok(())
}

const CREDENTIAL_COLUMNS: &str = "name, role, created_at, revoked_at";

fn credential_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, i64, Option<i64>)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn to_credential(
    (name, role, created_at_ms, revoked_at_ms): (String, String, i64, Option<i64>),
) -> Result<AdminCredential, StoreError> {
    Ok(AdminCredential {
        role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt {
            what: "credential role",
            detail: role.clone(),
        })?,
        name,
        created_at_ms,
        revoked_at_ms,
    })
}

fn all_credentials(conn: &Connection) -> Result<Vec<AdminCredential>, StoreError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM admin_credentials ORDER BY name"
        ))
        .map_err(db("list admin credentials"))?;
    let rows = stmt
        .query_map([], credential_row)
        .map_err(db("list admin credentials"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db("list admin credentials"))?;
    rows.into_iter().map(to_credential).collect()
}

impl Registry for SqliteStore {
    fn add_admin_credential(
        &self,
        name: &str,
        role: Role,
        hash: &str,
        ctx: &AuditCtx,
    ) -> Outcome<()> {
        let mut conn = self.conn()?;
        let open = SqliteTx::begin(&mut conn)?;
        tx::add_credential(open, name, role, hash, ctx)
    }

    fn admin_credential(&self, hash: &str) -> Result<Option<AdminCredential>, StoreError> {
        self.conn()?
            .query_row(
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM admin_credentials \
                     WHERE token_hash = ?1 AND revoked_at IS NULL"
                ),
                params![hash],
                credential_row,
            )
            .optional()
            .map_err(db("check admin credential"))?
            .map(to_credential)
            .transpose()
    }

    fn admin_credentials(&self) -> Result<Vec<AdminCredential>, StoreError> {
        all_credentials(&*self.conn()?)
    }

    fn revoke_admin_credential(&self, name: &str, ctx: &AuditCtx) -> Outcome<()> {
        let mut conn = self.conn()?;
        let open = SqliteTx::begin(&mut conn)?;
        tx::revoke_credential(open, name, ctx)
    }

    fn create_token(&self, token: &NewToken, ctx: &AuditCtx) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let open = SqliteTx::begin(&mut conn)?;
        tx::create_token(open, token, ctx)
    }

    fn enroll(
        &self,
        a: &EnrollAttempt<'_>,
        issue: IssueFn<'_>,
    ) -> Outcome<(DeviceRecord, IssuedCert)> {
        let mut conn = self.conn()?;
        let open = SqliteTx::begin(&mut conn)?;
        tx::enroll(open, a, issue)
    }

    fn renew(
        &self,
        attempt: &RenewAttempt<'_>,
        issue: IssueFn<'_>,
    ) -> Outcome<(DeviceRecord, IssuedCert)> {
        let mut conn = self.conn()?;
        let open = SqliteTx::begin(&mut conn)?;
        tx::renew(open, attempt, issue)
    }

    fn set_state(
        &self,
        id: &DeviceId,
        target: DeviceState,
        ctx: &AuditCtx,
    ) -> Outcome<DeviceRecord> {
        let mut conn = self.conn()?;
        let open = SqliteTx::begin(&mut conn)?;
        tx::set_state(open, id, target, ctx)
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        token_row(&*self.conn()?, hash)
    }

    fn put_challenge(&self, c: &Challenge, now_ms: i64) -> Result<(), StoreError> {
        let (token, device) = match &c.bound {
            ChallengeFor::Token(h) => (Some(h.as_str()), None),
            ChallengeFor::Device(d) => (None, Some(d.as_str())),
        };
        let secret = c.secret_hex();
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db("begin"))?;
        tx.execute(
            "DELETE FROM attest_challenges WHERE expires_at < ?1 OR token_hash = ?2 \
             OR device_id = ?3",
            params![now_ms - 600_000, token, device],
        )
        .map_err(db("store challenge"))?;
        tx.execute(
            "INSERT INTO attest_challenges (id, token_hash, device_id, assurance, \
             ek_fingerprint, ek_manufacturer, ek_model, ak_public, secret, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                c.id,
                token,
                device,
                c.attestation.assurance,
                c.attestation.ek_fingerprint,
                c.attestation.ek_manufacturer,
                c.attestation.ek_model,
                c.attestation.ak_public,
                secret.as_str(),
                c.expires_at_ms
            ],
        )
        .map_err(db("store challenge"))?;
        tx.commit().map_err(db("commit"))
    }

    fn take_challenge(&self, id: &str) -> Result<Option<Challenge>, StoreError> {
        let conn = self.conn()?;
        let row = conn
            .query_row(
                &format!(
                    "DELETE FROM attest_challenges WHERE id = ?1 RETURNING token_hash, \
                     device_id, secret, expires_at, {ATTESTATION_COLUMNS}"
                ),
                params![id],
                |r| {
                    Ok((
                        r.get::<_, Option<String>>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        devid_store::Secret::new(r.get::<_, String>(2)?),
                        r.get::<_, i64>(3)?,
                        attestation_row(r, 4)?,
                    ))
                },
            )
            .optional()
            .map_err(db("take challenge"))?;
        let Some((token, device, secret, expires_at_ms, attestation)) = row else {
            return Ok(None);
        };
        Challenge::from_row(id, token, device, &secret, expires_at_ms, attestation).map(Some)
    }

    fn attestation(&self, id: &DeviceId) -> Result<Option<Attestation>, StoreError> {
        load_attestation(&*self.conn()?, id.as_str())
    }

    fn attestations(&self) -> Result<Vec<(String, Attestation)>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT device_id, {ATTESTATION_COLUMNS} FROM device_attestation \
                 ORDER BY device_id"
            ))
            .map_err(db("list attestations"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, attestation_row(r, 1)?)))
            .map_err(db("list attestations"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("list attestations"));
        rows
    }

    fn reset_attestation(&self, id: &DeviceId, ctx: &AuditCtx) -> Outcome<()> {
        let mut conn = self.conn()?;
        let open = SqliteTx::begin(&mut conn)?;
        tx::reset_attestation(open, id, ctx)
    }

    fn device_page(&self, q: &DeviceQuery) -> Result<DevicePage, StoreError> {
        let conn = self.conn()?;
        // Every value is a bound parameter; only the fixed column name and direction are
        // formatted in. A device without an attestation row is `none`.
        let from = "devices LEFT JOIN device_attestation a ON a.device_id = devices.id";
        let filter = "(?1 IS NULL OR state = ?1) AND (?2 IS NULL OR reported_backend = ?2) \
                      AND (?3 IS NULL OR (id >= ?3 AND id < ?3 || char(1114111))) \
                      AND (?4 IS NULL OR COALESCE(a.assurance, 'none') = ?4)";
        let state = q.state.map(|s| s.to_string());
        let prefix = q.id_prefix.as_deref().filter(|p| !p.is_empty());
        let args = params![
            state,
            q.reported_backend.as_deref(),
            prefix,
            q.assurance.as_deref()
        ];
        let total: i64 = conn
            .query_row(
                &format!("SELECT COUNT(*) FROM {from} WHERE {filter}"),
                args,
                |r| r.get(0),
            )
            .map_err(db("count devices"))?;
        let dir = if q.descending { "DESC" } else { "ASC" };
        let col = q.sort.column();
        let order = if col == "id" {
            format!("id {dir}")
        } else {
            format!("{col} {dir}, id {dir}")
        };
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {DEVICE_COLUMNS}, COALESCE(a.assurance, 'none') FROM {from} \
                 WHERE {filter} ORDER BY {order} LIMIT ?5 OFFSET ?6"
            ))
            .map_err(db("list devices"))?;
        let columns = DEVICE_COLUMNS.split(',').count();
        let offset = i64::try_from(q.offset).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(
                params![
                    state,
                    q.reported_backend.as_deref(),
                    prefix,
                    q.assurance.as_deref(),
                    q.limit,
                    offset
                ],
                |r| Ok((device_row(r)?, r.get::<_, String>(columns)?)),
            )
            .map_err(db("list devices"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("list devices"))?;
        let (devices, assurance): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
        Ok(DevicePage {
            devices: devices
                .into_iter()
                .map(to_record)
                .collect::<Result<_, _>>()?,
            assurance,
            total: u64::try_from(total).unwrap_or(0),
        })
    }

    fn fleet_counts(
        &self,
        now_ms: i64,
        until_ms: i64,
        limit: u32,
    ) -> Result<FleetCounts, StoreError> {
        let conn = self.conn()?;
        let mut out = FleetCounts::default();
        let mut stmt = conn
            .prepare("SELECT state, COUNT(*) FROM devices GROUP BY state ORDER BY state")
            .map_err(db("count devices"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(db("count devices"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("count devices"))?;
        for (state, n) in rows {
            let state = state.parse().map_err(|e: String| StoreError::Corrupt {
                what: "device state",
                detail: e,
            })?;
            out.by_state.push((state, u64::try_from(n).unwrap_or(0)));
        }
        let mut stmt = conn
            .prepare(
                "SELECT reported_backend, COUNT(*) FROM devices GROUP BY reported_backend \
                 ORDER BY reported_backend",
            )
            .map_err(db("count devices"))?;
        out.by_backend = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                ))
            })
            .map_err(db("count devices"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("count devices"))?;
        let mut stmt = conn
            .prepare(
                "SELECT COALESCE(a.assurance, 'none') AS level, COUNT(*) FROM devices \
                 LEFT JOIN device_attestation a ON a.device_id = devices.id \
                 GROUP BY level ORDER BY level",
            )
            .map_err(db("count devices"))?;
        out.by_assurance = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                ))
            })
            .map_err(db("count devices"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("count devices"))?;
        let window = "state <> 'revoked' AND cert_not_after >= ?1 AND cert_not_after < ?2";
        let total: i64 = conn
            .query_row(
                &format!("SELECT COUNT(*) FROM devices WHERE {window}"),
                params![now_ms, until_ms],
                |r| r.get(0),
            )
            .map_err(db("count devices"))?;
        out.expiring_total = u64::try_from(total).unwrap_or(0);
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE {window} \
                 ORDER BY cert_not_after, id LIMIT ?3"
            ))
            .map_err(db("list devices"))?;
        let rows = stmt
            .query_map(params![now_ms, until_ms, limit], device_row)
            .map_err(db("list devices"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("list devices"))?;
        out.expiring = rows.into_iter().map(to_record).collect::<Result<_, _>>()?;
        Ok(out)
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(&format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"))
            .map_err(db("list devices"))?;
        let rows = stmt
            .query_map([], device_row)
            .map_err(db("list devices"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("list devices"))?;
        rows.into_iter().map(to_record).collect()
    }
}

/// One `BEGIN IMMEDIATE` transaction: it holds the database's write lock from the start, so
/// nothing another connection writes can change what the transaction read.
struct SqliteTx<'c>(rusqlite::Transaction<'c>);

impl<'c> SqliteTx<'c> {
    fn begin(conn: &'c mut Connection) -> Result<Self, StoreError> {
        conn.transaction_with_behavior(TransactionBehavior::Immediate)
            .map(SqliteTx)
            .map_err(db("begin"))
    }
}

impl RegistryTx for SqliteTx<'_> {
    fn lock_device(&mut self, _id: &DeviceId) -> Result<(), StoreError> {
        Ok(()) // BEGIN IMMEDIATE excludes every other writer already
    }

    fn device(&mut self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        load_device(&self.0, id.as_str())
    }

    fn token_for_update(&mut self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        token_row(&self.0, hash) // BEGIN IMMEDIATE holds the write lock already
    }

    fn consume_token(
        &mut self,
        hash: &str,
        used_by: &DeviceId,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self
            .0
            .execute(
                "UPDATE enrollment_tokens SET used_at = ?1, used_by = ?2 \
                 WHERE token_hash = ?3 AND used_at IS NULL AND expires_at > ?1",
                params![now_ms, used_by.as_str(), hash],
            )
            .map_err(db("consume token"))?;
        Ok(n == 1)
    }

    fn insert_token(&mut self, token: &NewToken, now_ms: i64) -> Result<(), StoreError> {
        self.0
            .execute(
                "INSERT INTO enrollment_tokens (token_hash, device_id, policy, created_at, \
                 expires_at, attestation, ek_fingerprint) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    token.hash,
                    token.device_id.as_ref().map(|d| d.as_str()),
                    token.policy,
                    now_ms,
                    token.expires_at_ms,
                    token.attestation_required.then_some("required"),
                    token.ek_fingerprint,
                ],
            )
            .map_err(db("create token"))?;
        Ok(())
    }

    fn write_enrolled(
        &mut self,
        id: &DeviceId,
        cert: &IssuedCert,
        key_fingerprint: &str,
        policy: &str,
        reported_backend: Option<&str>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let n = self
            .0
            .execute(
                "INSERT INTO devices (id, state, cert_serial, cert_not_after, key_fingerprint, \
                 policy, created_at, enrolled_at, last_seen, reported_backend) \
                 VALUES (?1, 'active', ?2, ?3, ?4, ?5, ?6, ?6, ?6, ?7) \
                 ON CONFLICT (id) DO UPDATE SET cert_serial = excluded.cert_serial, \
                 cert_not_after = excluded.cert_not_after, \
                 key_fingerprint = excluded.key_fingerprint, policy = excluded.policy, \
                 enrolled_at = excluded.enrolled_at, last_seen = excluded.last_seen, \
                 prev_cert_serial = NULL, prev_key_fingerprint = NULL, \
                 reported_backend = excluded.reported_backend \
                 WHERE devices.state = 'active'",
                params![
                    id.as_str(),
                    cert.serial_hex,
                    cert.not_after_ms,
                    key_fingerprint,
                    policy,
                    now_ms,
                    reported_backend
                ],
            )
            .map_err(db("record device"))?;
        Ok(n as u64)
    }

    fn write_renewed(
        &mut self,
        id: &DeviceId,
        cert: &IssuedCert,
        key_fingerprint: &str,
        predecessor: Option<&(String, String)>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let n = self
            .0
            .execute(
                "UPDATE devices SET cert_serial = ?1, cert_not_after = ?2, key_fingerprint = ?3, \
                 last_seen = ?4, prev_cert_serial = ?6, prev_key_fingerprint = ?7 \
                 WHERE id = ?5 AND state = 'active'",
                params![
                    cert.serial_hex,
                    cert.not_after_ms,
                    key_fingerprint,
                    now_ms,
                    id.as_str(),
                    predecessor.map(|p| p.0.as_str()),
                    predecessor.map(|p| p.1.as_str()),
                ],
            )
            .map_err(db("record renewal"))?;
        Ok(n as u64)
    }

    fn write_state(&mut self, id: &DeviceId, target: DeviceState) -> Result<(), StoreError> {
        self.0
            .execute(
                "UPDATE devices SET state = ?1 WHERE id = ?2",
                params![target.as_str(), id.as_str()],
            )
            .map_err(db("change device state"))?;
        Ok(())
    }

    fn insert_audit(&mut self, row: &NewAudit<'_>) -> Result<(), StoreError> {
        insert_audit(&self.0, row)
    }

    fn credentials_for_update(&mut self) -> Result<Vec<AdminCredential>, StoreError> {
        all_credentials(&self.0) // BEGIN IMMEDIATE holds the write lock already
    }

    fn insert_credential(
        &mut self,
        name: &str,
        role: Role,
        hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.0
            .execute(
                "INSERT INTO admin_credentials (token_hash, created_at, name, role) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![hash, now_ms, name, role.as_str()],
            )
            .map_err(db("add admin credential"))?;
        Ok(())
    }

    fn revoke_credential(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.0
            .execute(
                "UPDATE admin_credentials SET revoked_at = ?1 WHERE name = ?2 \
                 AND revoked_at IS NULL",
                params![now_ms, name],
            )
            .map_err(db("revoke admin credential"))?;
        Ok(())
    }

    fn attestation(&mut self, id: &DeviceId) -> Result<Option<Attestation>, StoreError> {
        load_attestation(&self.0, id.as_str())
    }

    fn device_with_ek(&mut self, ek_fingerprint: &str) -> Result<Option<String>, StoreError> {
        self.0
            .query_row(
                "SELECT device_id FROM device_attestation WHERE ek_fingerprint = ?1",
                params![ek_fingerprint],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("read attestation"))
    }

    fn write_attestation(
        &mut self,
        id: &DeviceId,
        a: &Attestation,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.0
            .execute(
                "INSERT INTO device_attestation (device_id, assurance, ek_fingerprint, \
                 ek_manufacturer, ek_model, ak_public, recorded_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (device_id) DO UPDATE SET assurance = excluded.assurance, \
                 ek_fingerprint = excluded.ek_fingerprint, \
                 ek_manufacturer = excluded.ek_manufacturer, ek_model = excluded.ek_model, \
                 ak_public = excluded.ak_public, recorded_at = excluded.recorded_at",
                params![
                    id.as_str(),
                    a.assurance,
                    a.ek_fingerprint,
                    a.ek_manufacturer,
                    a.ek_model,
                    a.ak_public,
                    now_ms
                ],
            )
            .map_err(db("record attestation"))?;
        Ok(())
    }

    fn delete_attestation(&mut self, id: &DeviceId) -> Result<u64, StoreError> {
        let n = self
            .0
            .execute(
                "DELETE FROM device_attestation WHERE device_id = ?1",
                params![id.as_str()],
            )
            .map_err(db("reset attestation"))?;
        Ok(n as u64)
    }

    fn commit(self) -> Result<(), StoreError> {
        self.0.commit().map_err(db("commit"))
    }
}

impl DeviceLookup for SqliteStore {
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        load_device(&*self.conn()?, id.as_str())
    }

    fn mark_cert_used(&self, id: &DeviceId, serial_hex: &str) -> Result<bool, StoreError> {
        // on the registry's own connection (synchronous = FULL): forgetting the predecessor
        // is what makes an older certificate useless, so it must survive a power cut
        let n = self
            .conn()?
            .execute(
                "UPDATE devices SET prev_cert_serial = NULL, prev_key_fingerprint = NULL \
                 WHERE id = ?1 AND cert_serial = ?2 AND prev_cert_serial IS NOT NULL",
                params![id.as_str(), serial_hex],
            )
            .map_err(db("record the certificate's first use"))?;
        Ok(n == 1)
    }

    fn record_last_seen(&self, seen: &[(DeviceId, i64)]) -> Result<(), StoreError> {
        let mut conn = self.seen.lock().map_err(|_| StoreError::Db {
            operation: "lock",
            detail: "a previous last-seen write panicked; restart the server".into(),
        })?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db("begin"))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE devices SET last_seen = ?1 WHERE id = ?2 AND last_seen < ?1",
                )
                .map_err(db("record last seen"))?;
            for (id, ms) in seen {
                stmt.execute(params![ms, id.as_str()])
                    .map_err(db("record last seen"))?;
            }
        }
        tx.commit().map_err(db("commit"))
    }

    fn try_device_now(&self, id: &DeviceId) -> Option<Result<Option<DeviceRecord>, StoreError>> {
        // A WAL reader does not wait for writers; in the rare cases SQLite still answers
        // SQLITE_BUSY (e.g. WAL recovery), or another worker holds the reader, the caller
        // takes the blocking path.
        match self.reader.try_lock() {
            Ok(conn) => match query_device(&conn, id.as_str()) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) =>
                {
                    None
                }
                row => Some(device_of(row)),
            },
            Err(std::sync::TryLockError::WouldBlock) => None,
            Err(std::sync::TryLockError::Poisoned(_)) => Some(Err(StoreError::Db {
                operation: "lock",
                detail: "a previous database operation panicked; restart the server".into(),
            })),
        }
    }
}

impl AuditLog for SqliteStore {
    fn append_audit(&self, row: &NewAudit<'_>) -> Result<(), StoreError> {
        insert_audit(&*self.conn()?, row)
    }

    fn audit_log(&self, limit: u32, device: Option<&str>) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(
                "SELECT id, time, actor, device_id, action, outcome, detail, source FROM audit \
                 WHERE (?1 IS NULL OR device_id = ?1) ORDER BY id DESC LIMIT ?2",
            )
            .map_err(db("read audit"))?;
        let mut rows = stmt
            .query_map(params![device, limit], |r| {
                Ok(AuditEntry {
                    id: r.get(0)?,
                    time: rfc3339(r.get(1)?),
                    actor: r.get(2)?,
                    device_id: r.get(3)?,
                    action: r.get(4)?,
                    outcome: r.get(5)?,
                    detail: r.get(6)?,
                    source: r.get(7)?,
                })
            })
            .map_err(db("read audit"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("read audit"))?;
        rows.reverse();
        Ok(rows)
    }
}
