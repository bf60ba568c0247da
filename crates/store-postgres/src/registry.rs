//! The PostgreSQL backend: the same tables, triggers and guarantees as the SQLite backend, for
//! one or several server nodes sharing one database.
//!
//! * Connections come from a small [`r2d2`] pool of synchronous [`postgres`] clients; the
//!   store methods block, and the HTTPS handlers call them through `spawn_blocking`. Each
//!   client drives its socket with a small runtime of its own, which cannot run on an async
//!   executor thread: [`PostgresStore::open`] connects on a plain thread of its own, so it is
//!   safe anywhere (`devid-server run` opens the store inside its runtime), but the methods
//!   must run outside the executor (`spawn_blocking` or a dedicated thread): on an executor
//!   thread they panic.
//! * The schema is versioned: [`MIGRATIONS`] are applied in order at every start, each in its
//!   own transaction, under a transaction-scoped advisory lock ([`MIGRATION_LOCK`]) so nodes
//!   starting at once migrate one after the other; the version lives in `meta`, key
//!   `schema_version`, as in SQLite.
//! * A token is consumed by `UPDATE ... WHERE used_at IS NULL AND expires_at > now RETURNING`
//!   after its row was locked (`SELECT ... FOR UPDATE`): of two nodes racing for one token,
//!   exactly one gets the row back. Changes to one device (enrolment, renewal, state) are
//!   serialised across nodes by a transaction-scoped advisory lock on the device id, so the
//!   checks done in the transaction still hold when it writes.
//! * Triggers make the audit log append-only (UPDATE, DELETE and TRUNCATE are refused) and
//!   revocation permanent (a revoked row can neither change state nor be deleted).
//! * Every connection (the first one, the pool's, the listener's) goes through one rustls
//!   connector built from the URL's libpq `sslmode` and `sslrootcert` ([`crate::tls`]).
//! * The password (in the URL, or read from `database.password_file`, [`ConnectOptions`])
//!   never reaches a log line or an error: see [`redact_url`] and the scrubbing in `detail`.

use std::str::FromStr;
use std::time::Duration;

use devid_proto::{AuditEntry, DeviceId, DeviceState};
use r2d2_postgres::postgres::fallible_iterator::FallibleIterator;
use r2d2_postgres::postgres::{self, GenericClient, Row, Transaction};
use r2d2_postgres::{r2d2, PostgresConnectionManager};
use tokio_postgres_rustls::MakeRustlsConnect;

use devid_stdx::rfc3339;
use devid_store::{
    tx, AdminCredential, Attestation, AuditCtx, AuditLog, Challenge, ChallengeFor, DeviceLookup,
    DevicePage, DeviceQuery, DeviceRecord, EnrollAttempt, FleetCounts, IssueFn, IssuedCert,
    NewAudit, NewToken, Outcome, Registry, RegistryTx, RenewAttempt, Role, StateChangeSink,
    StoreError, TokenRow,
};

use crate::tls::{only_local, TlsSettingsError, TlsTarget};

/// Key of the advisory lock held while migrating (`pg_advisory_xact_lock`): "devid" in ASCII.
pub const MIGRATION_LOCK: i64 = 0x64_6576_6964;

/// The `NOTIFY` channel of committed device state changes; the payload is
/// `<device id> <state>`. Every node `LISTEN`s on it to cut the live sessions of a device
/// another node suspended or revoked.
pub const STATE_CHANNEL: &str = "devid_device_state";
/// Longest wait between attempts to (re)connect the state-change listener.
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the listener looks whether its sink is still there.
const LISTEN_POLL: Duration = Duration::from_secs(1);
/// How often the listener checks that its connection still works.
const LISTEN_PROBE: Duration = Duration::from_secs(30);

/// Connections in the pool.
const POOL_SIZE: u32 = 8;
/// How long a request waits for a free connection or for the server to answer a connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema, one migration per version (index 0 is version 1). Never edit a released
/// migration: add a new one.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE IF NOT EXISTS admin_credentials (
    token_hash TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_hash TEXT PRIMARY KEY,
    device_id  TEXT,
    policy     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT,
    used_by    TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    id              TEXT PRIMARY KEY,
    state           TEXT NOT NULL CHECK (state IN ('active', 'suspended', 'revoked')),
    cert_serial     TEXT NOT NULL,
    cert_not_after  BIGINT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    policy          TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    enrolled_at     BIGINT NOT NULL,
    last_seen       BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id        BIGSERIAL PRIMARY KEY,
    time      BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    device_id TEXT,
    action    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    source    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_device ON audit (device_id, id);

CREATE OR REPLACE FUNCTION devid_audit_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the audit log is append-only';
    END $$;
DROP TRIGGER IF EXISTS audit_no_update_delete ON audit;
CREATE TRIGGER audit_no_update_delete BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION devid_audit_append_only();
DROP TRIGGER IF EXISTS audit_no_truncate ON audit;
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION devid_audit_append_only();

CREATE OR REPLACE FUNCTION devid_revoked_is_permanent() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'revocation is permanent';
    END $$;
DROP TRIGGER IF EXISTS revoked_is_permanent ON devices;
CREATE TRIGGER revoked_is_permanent BEFORE UPDATE OF state ON devices
    FOR EACH ROW WHEN (OLD.state = 'revoked' AND NEW.state <> 'revoked')
    EXECUTE FUNCTION devid_revoked_is_permanent();
DROP TRIGGER IF EXISTS revoked_not_deleted ON devices;
CREATE TRIGGER revoked_not_deleted BEFORE DELETE ON devices
    FOR EACH ROW WHEN (OLD.state = 'revoked')
    EXECUTE FUNCTION devid_revoked_is_permanent();
"#,
    // 2: telemetry messages (see postgres_messages.rs); (device_id, msg_id) unique where a
    // msg-id exists, so a redelivered idempotent message is stored once.
    r#"
CREATE TABLE IF NOT EXISTS messages (
    id          BIGSERIAL PRIMARY KEY,
    device_id   TEXT NOT NULL,
    topic       TEXT NOT NULL,
    payload     BYTEA NOT NULL,
    qos         SMALLINT NOT NULL,
    msg_id      TEXT,
    received_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_device ON messages (device_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency
    ON messages (device_id, msg_id) WHERE msg_id IS NOT NULL;
"#,
    // 3: a renewed certificate's predecessor, kept until the new one is first used (a device
    // whose renewal answer was lost retries with it; nothing older ever works).
    r#"
ALTER TABLE devices ADD COLUMN IF NOT EXISTS prev_cert_serial TEXT;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS prev_key_fingerprint TEXT;
"#,
    // 4: named admin credentials with a role; the one `init` made becomes `admin`.
    r#"
ALTER TABLE admin_credentials ADD COLUMN IF NOT EXISTS name TEXT;
ALTER TABLE admin_credentials ADD COLUMN IF NOT EXISTS role TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE admin_credentials ADD COLUMN IF NOT EXISTS revoked_at BIGINT;
UPDATE admin_credentials c SET name = CASE WHEN n.rn = 1 THEN 'admin' ELSE 'admin-' || n.rn END
    FROM (SELECT token_hash, row_number() OVER (ORDER BY created_at, token_hash) AS rn
          FROM admin_credentials WHERE name IS NULL) n
    WHERE c.token_hash = n.token_hash;
CREATE UNIQUE INDEX IF NOT EXISTS admin_credentials_name ON admin_credentials (name);
"#,
    // 5: the backend a device reported at enrolment, and indexes for the console's device
    // table (filter by state or backend, sort by last seen or expiry, paged).
    r#"
ALTER TABLE devices ADD COLUMN IF NOT EXISTS reported_backend TEXT;
CREATE INDEX IF NOT EXISTS devices_state ON devices (state, id);
CREATE INDEX IF NOT EXISTS devices_last_seen ON devices (last_seen, id);
CREATE INDEX IF NOT EXISTS devices_cert_not_after ON devices (cert_not_after, id);
CREATE INDEX IF NOT EXISTS devices_reported_backend ON devices (reported_backend, id);
"#,
    // 6: key attestation: per device the verified attestation (one EK is one device), the
    // pending challenges between the two steps, per token the attestation demands.
    r#"
CREATE TABLE IF NOT EXISTS device_attestation (
    device_id       TEXT PRIMARY KEY,
    assurance       TEXT NOT NULL,
    ek_fingerprint  TEXT NOT NULL UNIQUE,
    ek_manufacturer TEXT,
    ek_model        TEXT,
    ak_public       TEXT NOT NULL,
    recorded_at     BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS attest_challenges (
    id              TEXT PRIMARY KEY,
    token_hash      TEXT,
    device_id       TEXT,
    assurance       TEXT NOT NULL,
    ek_fingerprint  TEXT NOT NULL,
    ek_manufacturer TEXT,
    ek_model        TEXT,
    ak_public       TEXT NOT NULL,
    secret          TEXT NOT NULL,
    expires_at      BIGINT NOT NULL
);
ALTER TABLE enrollment_tokens ADD COLUMN IF NOT EXISTS attestation TEXT;
ALTER TABLE enrollment_tokens ADD COLUMN IF NOT EXISTS ek_fingerprint TEXT;
"#,
];

const ATTESTATION_COLUMNS: &str = "assurance, ek_fingerprint, ek_manufacturer, ek_model, ak_public";

fn to_attestation(row: &Row, at: usize) -> Result<Attestation, postgres::Error> {
    Ok(Attestation {
        assurance: row.try_get(at)?,
        ek_fingerprint: row.try_get(at + 1)?,
        ek_manufacturer: row.try_get(at + 2)?,
        ek_model: row.try_get(at + 3)?,
        ak_public: row.try_get(at + 4)?,
    })
}

fn to_token(row: &Row) -> Result<TokenRow, postgres::Error> {
    Ok(TokenRow {
        bound: row.try_get(0)?,
        policy: row.try_get(1)?,
        expires_at_ms: row.try_get(2)?,
        used: row.try_get::<_, Option<i64>>(3)?.is_some(),
        attestation_required: row.try_get::<_, Option<String>>(4)?.as_deref() == Some("required"),
        ek_fingerprint: row.try_get(5)?,
    })
}

const TOKEN_COLUMNS: &str = "device_id, policy, expires_at, used_at, attestation, ek_fingerprint";

type Manager = PostgresConnectionManager<MakeRustlsConnect>;
type Pool = r2d2::Pool<Manager>;

/// How to connect, beyond the URL.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// A file holding the password alone (`database.password_file`); must not be readable by
    /// group or others, and the URL must then carry no password.
    pub password_file: Option<std::path::PathBuf>,
}

/// A registry in a PostgreSQL database, shareable by several server nodes.
pub struct PostgresStore {
    pool: Pool,
    /// For connections outside the pool (the state-change listener).
    config: postgres::Config,
    /// The TLS connector of every connection (pool, first connection, listener).
    tls: MakeRustlsConnect,
    /// `sslmode` and `sslrootcert`, to explain a refused handshake.
    target: TlsTarget,
    /// The URL with its password replaced, for messages.
    shown: String,
    /// The password, to scrub from driver messages (defence in depth: the driver does not
    /// quote it today).
    password: Option<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

/// `url` with the password (userinfo `user:PASSWORD@` or a `password=` query parameter)
/// replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{host}", &userinfo[..colon]),
                None => authority.to_owned(),
            }
        }
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", q.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{head}{authority}{tail}")
}

/// The driver's words with the cause chain, the password scrubbed.
fn detail(e: &dyn std::error::Error, password: Option<&str>) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    match password {
        Some(p) if !p.is_empty() => s.replace(p, "***"),
        _ => s,
    }
}

const DEVICE_COLUMNS: &str = "id, state, cert_serial, cert_not_after, key_fingerprint, policy, \
                              created_at, enrolled_at, last_seen, prev_cert_serial, \
                              prev_key_fingerprint, reported_backend";

fn to_record(row: &Row) -> Result<DeviceRecord, StoreError> {
    let bad = |e: postgres::Error| StoreError::Corrupt {
        what: "device row",
        detail: e.to_string(),
    };
    let id: String = row.try_get(0).map_err(bad)?;
    let state: String = row.try_get(1).map_err(bad)?;
    Ok(DeviceRecord {
        id: DeviceId::parse(&id).map_err(|e| StoreError::Corrupt {
            what: "device id",
            detail: e.to_string(),
        })?,
        state: state.parse().map_err(|e: String| StoreError::Corrupt {
            what: "device state",
            detail: e,
        })?,
        cert_serial: row.try_get(2).map_err(bad)?,
        cert_not_after_ms: row.try_get(3).map_err(bad)?,
        key_fingerprint: row.try_get(4).map_err(bad)?,
        policy: row.try_get(5).map_err(bad)?,
        created_at_ms: row.try_get(6).map_err(bad)?,
        enrolled_at_ms: row.try_get(7).map_err(bad)?,
        last_seen_ms: row.try_get(8).map_err(bad)?,
        predecessor: row
            .try_get::<_, Option<String>>(9)
            .map_err(bad)?
            .zip(row.try_get::<_, Option<String>>(10).map_err(bad)?),
        reported_backend: row.try_get(11).map_err(bad)?,
    })
}

impl PostgresStore {
    /// Connect to the database at `url` (`postgres://USER[:PASSWORD]@HOST:PORT/DB`, with
    /// libpq's `sslmode` and `sslrootcert` if wanted: see [`crate::tls`]), bring its schema up
    /// to date (under [`MIGRATION_LOCK`]) and open a pool of connections. Safe to call from
    /// async code (it blocks the caller until connected).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, &ConnectOptions::default())
    }

    /// [`open`](Self::open) with the password read from a file.
    pub fn open_with(url: &str, options: &ConnectOptions) -> Result<Self, StoreError> {
        std::thread::scope(|s| s.spawn(|| Self::open_on_this_thread(url, options)).join())
            .unwrap_or_else(|_| {
                Err(StoreError::Db {
                    operation: "connect",
                    detail: "the connecting thread panicked; see the log".into(),
                })
            })
    }

    fn open_on_this_thread(url: &str, options: &ConnectOptions) -> Result<Self, StoreError> {
        let shown = redact_url(url);
        let settings = |operation: &'static str| {
            let shown = shown.clone();
            move |e: TlsSettingsError| StoreError::Db {
                operation,
                detail: format!("{shown}: {e}"),
            }
        };
        let target = TlsTarget::parse(url).map_err(settings("parse the database URL"))?;
        let mut config =
            postgres::Config::from_str(&target.driver_url).map_err(|e| StoreError::Db {
                operation: "parse the database URL",
                detail: format!("{shown}: {}", detail(&e, None)),
            })?;
        config.ssl_mode(target.driver_mode());
        if let Some(path) = &options.password_file {
            if config.get_password().is_some() {
                return Err(StoreError::Db {
                    operation: "read the database password",
                    detail: format!(
                        "{shown} has a password and database.password_file is set too: keep \
                         only the file"
                    ),
                });
            }
            let pw = read_password_file(path)?;
            config.password(pw.as_bytes());
        }
        let password = config
            .get_password()
            .map(|p| zeroize::Zeroizing::new(String::from_utf8_lossy(p).into_owned()));
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("devid-server");
        }
        let tls = target
            .connector()
            .map_err(settings("set up TLS to the database"))?;
        let this_pw = password.as_ref().map(|p| p.as_str());
        let fail = |operation: &'static str| {
            let (shown, target, config) = (shown.clone(), &target, &config);
            move |e: postgres::Error| StoreError::Db {
                operation,
                detail: format!(
                    "{shown}: {}",
                    target
                        .explain(&e, config)
                        .unwrap_or_else(|| detail(&e, this_pw))
                ),
            }
        };
        // One direct connection first: a wrong URL, password or certificate fails now,
        // clearly, instead of after the pool's timeout.
        let mut client = config.connect(tls.clone()).map_err(fail("connect"))?;
        let encryption =
            encryption(&mut client).map_err(fail("read the connection's TLS state"))?;
        let version = migrate(&mut client).map_err(fail("migrate the schema"))?;
        drop(client);
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(CONNECT_TIMEOUT)
            .build_unchecked(PostgresConnectionManager::new(config.clone(), tls.clone()));
        let tls_shown = encryption.as_deref().unwrap_or("none");
        tracing::info!(
            db = %shown,
            schema_version = version,
            sslmode = target.mode.as_str(),
            tls = tls_shown,
            server_verified = encryption.is_some() && target.verifies_chain(),
            "PostgreSQL store ready"
        );
        if !only_local(&config) {
            if encryption.is_none() {
                tracing::warn!(
                    db = %shown,
                    "the connection to the database is NOT encrypted: anyone on the path can \
                     read and change the registry; use sslmode=verify-full&sslrootcert=CA.pem"
                );
            } else if !target.verifies_chain() {
                tracing::warn!(
                    db = %shown,
                    sslmode = target.mode.as_str(),
                    "the connection to the database is encrypted but the server is not \
                     authenticated (no sslrootcert): an active attacker can impersonate it; \
                     use sslmode=verify-full&sslrootcert=CA.pem"
                );
            }
        }
        Ok(Self {
            pool,
            config,
            tls,
            target,
            shown,
            password,
        })
    }

    /// The URL this store was opened with, password redacted.
    pub fn url_redacted(&self) -> &str {
        &self.shown
    }

    pub(crate) fn conn(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        self.pool.get().map_err(|e| StoreError::Db {
            operation: "get a connection",
            detail: format!(
                "{}: {}; is the database reachable?",
                self.shown,
                detail(&e, self.pw())
            ),
        })
    }

    fn pw(&self) -> Option<&str> {
        self.password.as_ref().map(|p| p.as_str())
    }

    pub(crate) fn db(
        &self,
        operation: &'static str,
    ) -> impl Fn(postgres::Error) -> StoreError + '_ {
        move |e| StoreError::Db {
            operation,
            detail: detail(&e, self.pw()),
        }
    }

    fn load_device(
        &self,
        c: &mut impl GenericClient,
        id: &str,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        c.query_opt(
            &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"),
            &[&id],
        )
        .map_err(self.db("read device"))?
        .as_ref()
        .map(to_record)
        .transpose()
    }

    fn load_attestation(
        &self,
        c: &mut impl GenericClient,
        id: &str,
    ) -> Result<Option<Attestation>, StoreError> {
        let row = c
            .query_opt(
                &format!(
                    "SELECT {ATTESTATION_COLUMNS} FROM device_attestation WHERE device_id = $1"
                ),
                &[&id],
            )
            .map_err(self.db("read attestation"))?;
        row.map(|r| to_attestation(&r, 0))
            .transpose()
            .map_err(self.db("read attestation"))
    }

    fn insert_audit(
        &self,
        c: &mut impl GenericClient,
        row: &NewAudit<'_>,
    ) -> Result<(), StoreError> {
        c.execute(
            "INSERT INTO audit (time, actor, device_id, action, outcome, detail, source) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &row.ctx.now_ms,
                &row.ctx.actor,
                &row.device_id,
                &row.action,
                &row.outcome,
                &row.detail,
                &row.ctx.source,
            ],
        )
        .map_err(self.db("append audit"))?;
        Ok(())
    }
}

/// The TLS version of this connection as the server sees it (`pg_stat_ssl`), `None` when it
/// is not encrypted.
fn encryption(client: &mut postgres::Client) -> Result<Option<String>, postgres::Error> {
    let row = client.query_opt(
        "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )?;
    Ok(match row {
        Some(r) if r.try_get::<_, bool>(0)? => Some(
            r.try_get::<_, Option<String>>(1)?
                .unwrap_or_else(|| "TLS".into()),
        ),
        _ => None,
    })
}

/// The password of `database.password_file`: the file's only line (a final newline is not
/// part of it). The file must not be readable by group or others; what is read is zeroized.
fn read_password_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<String>, StoreError> {
    let fail = |why: String| StoreError::Db {
        operation: "read the database password",
        detail: format!("database.password_file {}: {why}", path.display()),
    };
    let bytes = zeroize::Zeroizing::new(
        devid_stdx::fs::read_private(path).map_err(|e| fail(e.to_string()))?,
    );
    let text = std::str::from_utf8(&bytes).map_err(|_| fail("not UTF-8".into()))?;
    let pw = text.strip_suffix('\n').unwrap_or(text);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() {
        return Err(fail("empty".into()));
    }
    if pw.contains(['\n', '\r']) {
        return Err(fail("must hold the password alone, on one line".into()));
    }
    Ok(zeroize::Zeroizing::new(pw.to_owned()))
}

/// Apply the migrations the database lacks; returns the schema version.
fn migrate(client: &mut postgres::Client) -> Result<i64, postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    )?;
    let current: i64 = tx
        .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])?
        .and_then(|r| r.get::<_, String>(0).parse().ok())
        .unwrap_or(0);
    let mut version = current;
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let v = i64::try_from(i).unwrap_or(i64::MAX - 1) + 1;
        if v <= current {
            continue;
        }
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&v.to_string()],
        )?;
        tracing::info!(schema_version = v, "applied database migration");
        version = v;
    }
    tx.commit()?;
    Ok(version)
}

const CREDENTIAL_COLUMNS: &str = "name, role, created_at, revoked_at";

fn to_credential(row: &Row) -> Result<AdminCredential, StoreError> {
    let bad = |e: postgres::Error| StoreError::Corrupt {
        what: "credential row",
        detail: e.to_string(),
    };
    let role: String = row.try_get(1).map_err(bad)?;
    Ok(AdminCredential {
        name: row
            .try_get::<_, Option<String>>(0)
            .map_err(bad)?
            .unwrap_or_default(),
        role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt {
            what: "credential role",
            detail: role.clone(),
        })?,
        created_at_ms: row.try_get(2).map_err(bad)?,
        revoked_at_ms: row.try_get(3).map_err(bad)?,
    })
}

impl Registry for PostgresStore {
    fn add_admin_credential(
        &self,
        name: &str,
        role: Role,
        hash: &str,
        ctx: &AuditCtx,
    ) -> Outcome<()> {
        let mut conn = self.conn()?;
        let open = PgTx::begin(self, &mut conn)?;
        tx::add_credential(open, name, role, hash, ctx)
    }

    fn admin_credential(&self, hash: &str) -> Result<Option<AdminCredential>, StoreError> {
        self.conn()?
            .query_opt(
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM admin_credentials \
                     WHERE token_hash = $1 AND revoked_at IS NULL"
                ),
                &[&hash],
            )
            .map_err(self.db("check admin credential"))?
            .as_ref()
            .map(to_credential)
            .transpose()
    }

    fn admin_credentials(&self) -> Result<Vec<AdminCredential>, StoreError> {
        let rows = self
            .conn()?
            .query(
                &format!("SELECT {CREDENTIAL_COLUMNS} FROM admin_credentials ORDER BY name"),
                &[],
            )
            .map_err(self.db("list admin credentials"))?;
        rows.iter().map(to_credential).collect()
    }

    fn revoke_admin_credential(&self, name: &str, ctx: &AuditCtx) -> Outcome<()> {
        let mut conn = self.conn()?;
        let open = PgTx::begin(self, &mut conn)?;
        tx::revoke_credential(open, name, ctx)
    }

    fn create_token(&self, token: &NewToken, ctx: &AuditCtx) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let open = PgTx::begin(self, &mut conn)?;
        tx::create_token(open, token, ctx)
    }

    fn enroll(
        &self,
        a: &EnrollAttempt<'_>,
        issue: IssueFn<'_>,
    ) -> Outcome<(DeviceRecord, IssuedCert)> {
        let mut conn = self.conn()?;
        let open = PgTx::begin(self, &mut conn)?;
        tx::enroll(open, a, issue)
    }

    fn renew(
        &self,
        attempt: &RenewAttempt<'_>,
        issue: IssueFn<'_>,
    ) -> Outcome<(DeviceRecord, IssuedCert)> {
        let mut conn = self.conn()?;
        let open = PgTx::begin(self, &mut conn)?;
        tx::renew(open, attempt, issue)
    }

    fn set_state(
        &self,
        id: &DeviceId,
        target: DeviceState,
        ctx: &AuditCtx,
    ) -> Outcome<DeviceRecord> {
        let mut conn = self.conn()?;
        let open = PgTx::begin(self, &mut conn)?;
        tx::set_state(open, id, target, ctx)
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        let row = self
            .conn()?
            .query_opt(
                &format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE token_hash = $1"),
                &[&hash],
            )
            .map_err(self.db("read token"))?;
        row.as_ref()
            .map(to_token)
            .transpose()
            .map_err(self.db("read token"))
    }

    fn put_challenge(&self, c: &Challenge, now_ms: i64) -> Result<(), StoreError> {
        let (token, device) = match &c.bound {
            ChallengeFor::Token(h) => (Some(h.as_str()), None),
            ChallengeFor::Device(d) => (None, Some(d.as_str())),
        };
        let secret = c.secret_hex();
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(self.db("begin"))?;
        tx.execute(
            "DELETE FROM attest_challenges WHERE expires_at < $1 OR token_hash = $2 \
             OR device_id = $3",
            &[&(now_ms - 600_000), &token, &device],
        )
        .map_err(self.db("store challenge"))?;
        tx.execute(
            "INSERT INTO attest_challenges (id, token_hash, device_id, assurance, \
             ek_fingerprint, ek_manufacturer, ek_model, ak_public, secret, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &c.id,
                &token,
                &device,
                &c.attestation.assurance,
                &c.attestation.ek_fingerprint,
                &c.attestation.ek_manufacturer,
                &c.attestation.ek_model,
                &c.attestation.ak_public,
                &secret.as_str(),
                &c.expires_at_ms,
            ],
        )
        .map_err(self.db("store challenge"))?;
        tx.commit().map_err(self.db("commit"))
    }

    fn take_challenge(&self, id: &str) -> Result<Option<Challenge>, StoreError> {
        let row = self
            .conn()?
            .query_opt(
                &format!(
                    "DELETE FROM attest_challenges WHERE id = $1 RETURNING token_hash, \
                     device_id, secret, expires_at, {ATTESTATION_COLUMNS}"
                ),
                &[&id],
            )
            .map_err(self.db("take challenge"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let read = || -> Result<_, postgres::Error> {
            Ok((
                row.try_get::<_, Option<String>>(0)?,
                row.try_get::<_, Option<String>>(1)?,
                devid_store::Secret::new(row.try_get::<_, String>(2)?),
                row.try_get::<_, i64>(3)?,
                to_attestation(&row, 4)?,
            ))
        };
        let (token, device, secret, expires_at_ms, attestation) =
            read().map_err(self.db("take challenge"))?;
        Challenge::from_row(id, token, device, &secret, expires_at_ms, attestation).map(Some)
    }

    fn attestation(&self, id: &DeviceId) -> Result<Option<Attestation>, StoreError> {
        self.load_attestation(&mut *self.conn()?, id.as_str())
    }

    fn attestations(&self) -> Result<Vec<(String, Attestation)>, StoreError> {
        let rows = self
            .conn()?
            .query(
                &format!(
                    "SELECT device_id, {ATTESTATION_COLUMNS} FROM device_attestation \
                     ORDER BY device_id"
                ),
                &[],
            )
            .map_err(self.db("list attestations"))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, to_attestation(r, 1)?)))
            .collect::<Result<Vec<_>, postgres::Error>>()
            .map_err(self.db("list attestations"))
    }

    fn reset_attestation(&self, id: &DeviceId, ctx: &AuditCtx) -> Outcome<()> {
        let mut conn = self.conn()?;
        let open = PgTx::begin(self, &mut conn)?;
        tx::reset_attestation(open, id, ctx)
    }

    fn device_page(&self, q: &DeviceQuery) -> Result<DevicePage, StoreError> {
        let mut conn = self.conn()?;
        // Every value is a bound parameter; only the fixed column name and direction are
        // formatted in. A device without an attestation row is `none`.
        let from = "devices LEFT JOIN device_attestation a ON a.device_id = devices.id";
        let filter = "($1::text IS NULL OR state = $1) \
                      AND ($2::text IS NULL OR reported_backend = $2) \
                      AND ($3::text IS NULL OR starts_with(id, $3)) \
                      AND ($4::text IS NULL OR COALESCE(a.assurance, 'none') = $4)";
        let state = q.state.map(|s| s.to_string());
        let prefix = q
            .id_prefix
            .as_deref()
            .filter(|p| !p.is_empty())
            .map(str::to_owned);
        let total: i64 = conn
            .query_one(
                &format!("SELECT COUNT(*) FROM {from} WHERE {filter}"),
                &[&state, &q.reported_backend, &prefix, &q.assurance],
            )
            .and_then(|r| r.try_get(0))
            .map_err(self.db("count devices"))?;
        let dir = if q.descending { "DESC" } else { "ASC" };
        let col = q.sort.column();
        let order = if col == "id" {
            format!("id {dir}")
        } else {
            format!("{col} {dir}, id {dir}")
        };
        let limit = i64::from(q.limit);
        let offset = i64::try_from(q.offset).unwrap_or(i64::MAX);
        let rows = conn
            .query(
                &format!(
                    "SELECT {DEVICE_COLUMNS}, COALESCE(a.assurance, 'none') FROM {from} \
                     WHERE {filter} ORDER BY {order} LIMIT $5 OFFSET $6"
                ),
                &[
                    &state,
                    &q.reported_backend,
                    &prefix,
                    &q.assurance,
                    &limit,
                    &offset,
                ],
            )
            .map_err(self.db("list devices"))?;
        let columns = DEVICE_COLUMNS.split(',').count();
        let assurance = rows
            .iter()
            .map(|r| r.try_get::<_, String>(columns))
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.db("list devices"))?;
        Ok(DevicePage {
            devices: rows.iter().map(to_record).collect::<Result<_, _>>()?,
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
        let mut conn = self.conn()?;
        let mut out = FleetCounts::default();
        let bad = |e: postgres::Error| StoreError::Corrupt {
            what: "device count",
            detail: e.to_string(),
        };
        for row in conn
            .query(
                "SELECT state, COUNT(*) FROM devices GROUP BY state ORDER BY state",
                &[],
            )
            .map_err(self.db("count devices"))?
        {
            let state: String = row.try_get(0).map_err(bad)?;
            let n: i64 = row.try_get(1).map_err(bad)?;
            let state = state.parse().map_err(|e: String| StoreError::Corrupt {
                what: "device state",
                detail: e,
            })?;
            out.by_state.push((state, u64::try_from(n).unwrap_or(0)));
        }
        for row in conn
            .query(
                "SELECT reported_backend, COUNT(*) FROM devices GROUP BY reported_backend \
                 ORDER BY reported_backend",
                &[],
            )
            .map_err(self.db("count devices"))?
        {
            let b: Option<String> = row.try_get(0).map_err(bad)?;
            let n: i64 = row.try_get(1).map_err(bad)?;
            out.by_backend.push((b, u64::try_from(n).unwrap_or(0)));
        }
        for row in conn
            .query(
                "SELECT COALESCE(a.assurance, 'none') AS level, COUNT(*) FROM devices \
                 LEFT JOIN device_attestation a ON a.device_id = devices.id \
                 GROUP BY level ORDER BY level",
                &[],
            )
            .map_err(self.db("count devices"))?
        {
            let level: String = row.try_get(0).map_err(bad)?;
            let n: i64 = row.try_get(1).map_err(bad)?;
            out.by_assurance
                .push((level, u64::try_from(n).unwrap_or(0)));
        }
        let window = "state <> 'revoked' AND cert_not_after >= $1 AND cert_not_after < $2";
        let total: i64 = conn
            .query_one(
                &format!("SELECT COUNT(*) FROM devices WHERE {window}"),
                &[&now_ms, &until_ms],
            )
            .and_then(|r| r.try_get(0))
            .map_err(self.db("count devices"))?;
        out.expiring_total = u64::try_from(total).unwrap_or(0);
        let rows = conn
            .query(
                &format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices WHERE {window} \
                     ORDER BY cert_not_after, id LIMIT $3"
                ),
                &[&now_ms, &until_ms, &i64::from(limit)],
            )
            .map_err(self.db("list devices"))?;
        out.expiring = rows.iter().map(to_record).collect::<Result<_, _>>()?;
        Ok(out)
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let rows = self
            .conn()?
            .query(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"),
                &[],
            )
            .map_err(self.db("list devices"))?;
        rows.iter().map(to_record).collect()
    }
}

/// One transaction on a pooled connection. A token's row is locked with `FOR UPDATE`; changes
/// to one device are serialised across transactions and nodes by an advisory lock on its id.
struct PgTx<'t, 's> {
    tx: Transaction<'t>,
    store: &'s PostgresStore,
}

impl<'t, 's> PgTx<'t, 's> {
    fn begin(store: &'s PostgresStore, conn: &'t mut postgres::Client) -> Result<Self, StoreError> {
        Ok(PgTx {
            tx: conn.transaction().map_err(store.db("begin"))?,
            store,
        })
    }
}

impl RegistryTx for PgTx<'_, '_> {
    fn lock_device(&mut self, id: &DeviceId) -> Result<(), StoreError> {
        self.tx
            .execute(
                "SELECT pg_advisory_xact_lock(hashtext('devid-device:' || $1))",
                &[&id.as_str()],
            )
            .map_err(self.store.db("lock device"))?;
        Ok(())
    }

    fn device(&mut self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.store.load_device(&mut self.tx, id.as_str())
    }

    fn token_for_update(&mut self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        let row = self
            .tx
            .query_opt(
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE token_hash = $1 \
                     FOR UPDATE"
                ),
                &[&hash],
            )
            .map_err(self.store.db("read token"))?;
        row.as_ref()
            .map(to_token)
            .transpose()
            .map_err(self.store.db("read token"))
    }

    fn consume_token(
        &mut self,
        hash: &str,
        used_by: &DeviceId,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let row = self
            .tx
            .query_opt(
                "UPDATE enrollment_tokens SET used_at = $1, used_by = $2 \
                 WHERE token_hash = $3 AND used_at IS NULL AND expires_at > $1 \
                 RETURNING token_hash",
                &[&now_ms, &used_by.as_str(), &hash],
            )
            .map_err(self.store.db("consume token"))?;
        Ok(row.is_some())
    }

    fn insert_token(&mut self, token: &NewToken, now_ms: i64) -> Result<(), StoreError> {
        let device = token.device_id.as_ref().map(|d| d.as_str());
        self.tx
            .execute(
                "INSERT INTO enrollment_tokens (token_hash, device_id, policy, created_at, \
                 expires_at, attestation, ek_fingerprint) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &token.hash,
                    &device,
                    &token.policy,
                    &now_ms,
                    &token.expires_at_ms,
                    &token.attestation_required.then_some("required"),
                    &token.ek_fingerprint,
                ],
            )
            .map_err(self.store.db("create token"))?;
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
        self.tx
            .execute(
                "INSERT INTO devices (id, state, cert_serial, cert_not_after, key_fingerprint, \
                 policy, created_at, enrolled_at, last_seen, reported_backend) \
                 VALUES ($1, 'active', $2, $3, $4, $5, $6, $6, $6, $7) \
                 ON CONFLICT (id) DO UPDATE SET cert_serial = excluded.cert_serial, \
                 cert_not_after = excluded.cert_not_after, \
                 key_fingerprint = excluded.key_fingerprint, policy = excluded.policy, \
                 enrolled_at = excluded.enrolled_at, last_seen = excluded.last_seen, \
                 prev_cert_serial = NULL, prev_key_fingerprint = NULL, \
                 reported_backend = excluded.reported_backend \
                 WHERE devices.state = 'active'",
                &[
                    &id.as_str(),
                    &cert.serial_hex,
                    &cert.not_after_ms,
                    &key_fingerprint,
                    &policy,
                    &now_ms,
                    &reported_backend,
                ],
            )
            .map_err(self.store.db("record device"))
    }

    fn write_renewed(
        &mut self,
        id: &DeviceId,
        cert: &IssuedCert,
        key_fingerprint: &str,
        predecessor: Option<&(String, String)>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let (prev_serial, prev_key) = (predecessor.map(|p| &p.0), predecessor.map(|p| &p.1));
        self.tx
            .execute(
                "UPDATE devices SET cert_serial = $1, cert_not_after = $2, key_fingerprint = $3, \
                 last_seen = $4, prev_cert_serial = $6, prev_key_fingerprint = $7 \
                 WHERE id = $5 AND state = 'active'",
                &[
                    &cert.serial_hex,
                    &cert.not_after_ms,
                    &key_fingerprint,
                    &now_ms,
                    &id.as_str(),
                    &prev_serial,
                    &prev_key,
                ],
            )
            .map_err(self.store.db("record renewal"))
    }

    fn write_state(&mut self, id: &DeviceId, target: DeviceState) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE devices SET state = $1 WHERE id = $2",
                &[&target.as_str(), &id.as_str()],
            )
            .map_err(self.store.db("change device state"))?;
        // delivered to every listening node when (and only if) the transaction commits
        let note = format!("{id} {target}");
        self.tx
            .execute("SELECT pg_notify($1, $2)", &[&STATE_CHANNEL, &note])
            .map_err(self.store.db("announce the state change"))?;
        Ok(())
    }

    fn insert_audit(&mut self, row: &NewAudit<'_>) -> Result<(), StoreError> {
        self.store.insert_audit(&mut self.tx, row)
    }

    fn credentials_for_update(&mut self) -> Result<Vec<AdminCredential>, StoreError> {
        // serialise credential changes across nodes; readers are not blocked
        self.tx
            .batch_execute("LOCK TABLE admin_credentials IN SHARE ROW EXCLUSIVE MODE")
            .map_err(self.store.db("lock admin credentials"))?;
        let rows = self
            .tx
            .query(
                &format!("SELECT {CREDENTIAL_COLUMNS} FROM admin_credentials ORDER BY name"),
                &[],
            )
            .map_err(self.store.db("list admin credentials"))?;
        rows.iter().map(to_credential).collect()
    }

    fn insert_credential(
        &mut self,
        name: &str,
        role: Role,
        hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO admin_credentials (token_hash, created_at, name, role) \
                 VALUES ($1, $2, $3, $4)",
                &[&hash, &now_ms, &name, &role.as_str()],
            )
            .map_err(self.store.db("add admin credential"))?;
        Ok(())
    }

    fn revoke_credential(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.tx
            .execute(
                "UPDATE admin_credentials SET revoked_at = $1 WHERE name = $2 \
                 AND revoked_at IS NULL",
                &[&now_ms, &name],
            )
            .map_err(self.store.db("revoke admin credential"))?;
        Ok(())
    }

    fn attestation(&mut self, id: &DeviceId) -> Result<Option<Attestation>, StoreError> {
        self.store.load_attestation(&mut self.tx, id.as_str())
    }

    fn device_with_ek(&mut self, ek_fingerprint: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .tx
            .query_opt(
                "SELECT device_id FROM device_attestation WHERE ek_fingerprint = $1",
                &[&ek_fingerprint],
            )
            .map_err(self.store.db("read attestation"))?;
        row.map(|r| r.try_get(0))
            .transpose()
            .map_err(self.store.db("read attestation"))
    }

    fn write_attestation(
        &mut self,
        id: &DeviceId,
        a: &Attestation,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO device_attestation (device_id, assurance, ek_fingerprint, \
                 ek_manufacturer, ek_model, ak_public, recorded_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (device_id) DO UPDATE SET assurance = excluded.assurance, \
                 ek_fingerprint = excluded.ek_fingerprint, \
                 ek_manufacturer = excluded.ek_manufacturer, ek_model = excluded.ek_model, \
                 ak_public = excluded.ak_public, recorded_at = excluded.recorded_at",
                &[
                    &id.as_str(),
                    &a.assurance,
                    &a.ek_fingerprint,
                    &a.ek_manufacturer,
                    &a.ek_model,
                    &a.ak_public,
                    &now_ms,
                ],
            )
            .map_err(self.store.db("record attestation"))?;
        Ok(())
    }

    fn delete_attestation(&mut self, id: &DeviceId) -> Result<u64, StoreError> {
        self.tx
            .execute(
                "DELETE FROM device_attestation WHERE device_id = $1",
                &[&id.as_str()],
            )
            .map_err(self.store.db("reset attestation"))
    }

    fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().map_err(self.store.db("commit"))
    }
}

impl DeviceLookup for PostgresStore {
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let mut conn = self.conn()?;
        self.load_device(&mut *conn, id.as_str())
    }

    fn mark_cert_used(&self, id: &DeviceId, serial_hex: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()?
            .execute(
                "UPDATE devices SET prev_cert_serial = NULL, prev_key_fingerprint = NULL \
                 WHERE id = $1 AND cert_serial = $2 AND prev_cert_serial IS NOT NULL",
                &[&id.as_str(), &serial_hex],
            )
            .map_err(self.db("record the certificate's first use"))?;
        Ok(n == 1)
    }

    fn record_last_seen(&self, seen: &[(DeviceId, i64)]) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(self.db("begin"))?;
        let stmt = tx
            .prepare("UPDATE devices SET last_seen = $1 WHERE id = $2 AND last_seen < $1")
            .map_err(self.db("record last seen"))?;
        // Rows are locked in the order given; callers sort by id so that two nodes'
        // batches cannot deadlock.
        for (id, ms) in seen {
            tx.execute(&stmt, &[ms, &id.as_str()])
                .map_err(self.db("record last seen"))?;
        }
        tx.commit().map_err(self.db("commit"))
    }

    fn follow_state_changes(
        &self,
        sink: std::sync::Weak<dyn StateChangeSink>,
    ) -> Result<bool, StoreError> {
        let mut config = self.config.clone();
        let name = format!(
            "{}:listen",
            config.get_application_name().unwrap_or("devid-server")
        );
        config.application_name(&name);
        let listener = Listener {
            config,
            tls: self.tls.clone(),
            target: self.target.clone(),
            shown: self.shown.clone(),
            password: self.password.clone(),
            sink,
        };
        std::thread::Builder::new()
            .name("devid-pg-listen".into())
            .spawn(move || listener.run())
            .map_err(|e| StoreError::Db {
                operation: "start the state-change listener",
                detail: e.to_string(),
            })?;
        Ok(true)
    }
}

impl AuditLog for PostgresStore {
    fn append_audit(&self, row: &NewAudit<'_>) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        self.insert_audit(&mut *conn, row)
    }

    fn audit_log(&self, limit: u32, device: Option<&str>) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = self
            .conn()?
            .query(
                "SELECT id, time, actor, device_id, action, outcome, detail, source FROM audit \
                 WHERE ($1::TEXT IS NULL OR device_id = $1) ORDER BY id DESC LIMIT $2",
                &[&device, &i64::from(limit)],
            )
            .map_err(self.db("read audit"))?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get(0)?,
                    time: rfc3339(r.try_get(1)?),
                    actor: r.try_get(2)?,
                    device_id: r.try_get(3)?,
                    action: r.try_get(4)?,
                    outcome: r.try_get(5)?,
                    detail: r.try_get(6)?,
                    source: r.try_get(7)?,
                })
            })
            .collect::<Result<Vec<_>, postgres::Error>>()
            .map_err(self.db("read audit"))?;
        out.reverse();
        Ok(out)
    }
}

/// `LISTEN`s on [`STATE_CHANNEL`] with a connection of its own and tells the sink; reconnects
/// with backoff. A change committed while it is disconnected reaches this node's sessions
/// through the sweep after it listens again, or their periodic registry re-check
/// (`mqtt.registry_recheck_secs`), whichever comes first.
struct Listener {
    config: postgres::Config,
    tls: MakeRustlsConnect,
    target: TlsTarget,
    shown: String,
    password: Option<zeroize::Zeroizing<String>>,
    sink: std::sync::Weak<dyn StateChangeSink>,
}

impl Listener {
    fn run(self) {
        let mut retry = Duration::from_secs(1);
        let mut lost = false;
        while self.sink.strong_count() > 0 {
            let listening = self.config.connect(self.tls.clone()).and_then(|mut c| {
                c.batch_execute(&format!("LISTEN {STATE_CHANNEL}"))?;
                // Changes committed before LISTEN took effect (at start, or while the
                // connection was lost) sent no notice this node saw: hand over every device
                // that is not active now. A session that registers later reads the registry
                // itself; anything committed from here on arrives as a notice.
                self.sweep(&mut c)?;
                Ok(c)
            });
            let mut client = match listening {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(
                        db = %self.shown,
                        error = %self.target.explain(&e, &self.config).unwrap_or_else(
                            || detail(&e, self.password.as_ref().map(|p| p.as_str()))
                        ),
                        retry_in_secs = retry.as_secs(),
                        "cannot listen for other nodes' device state changes; live sessions \
                         fall back to the periodic registry re-check"
                    );
                    std::thread::sleep(retry);
                    retry = (retry * 2).min(LISTEN_RETRY_MAX);
                    lost = true;
                    continue;
                }
            };
            if lost {
                tracing::info!(db = %self.shown, "listening for device state changes again");
            }
            retry = Duration::from_secs(1);
            match self.deliver(&mut client) {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(
                        db = %self.shown,
                        error = %detail(&e, self.password.as_ref().map(|p| p.as_str())),
                        "lost the state-change listener's connection; reconnecting"
                    );
                    lost = true;
                }
            }
        }
    }

    /// Tell the sink about every device that is suspended or revoked now.
    fn sweep(&self, client: &mut postgres::Client) -> Result<(), postgres::Error> {
        let rows = client.query("SELECT id, state FROM devices WHERE state <> 'active'", &[])?;
        let Some(sink) = self.sink.upgrade() else {
            return Ok(());
        };
        for row in rows {
            let (id, state): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            if let (Ok(id), Ok(state)) = (DeviceId::parse(&id), state.parse()) {
                sink.state_changed(&id, state);
            }
        }
        Ok(())
    }

    /// Hand notifications to the sink until it is gone (`Ok`) or the connection fails.
    fn deliver(&self, client: &mut postgres::Client) -> Result<(), postgres::Error> {
        let mut probed = std::time::Instant::now();
        while self.sink.strong_count() > 0 {
            // A listening connection only reads: a peer that vanished without a reset would go
            // unnoticed forever. Ask the server now and then.
            if probed.elapsed() >= LISTEN_PROBE {
                client.is_valid(CONNECT_TIMEOUT)?;
                probed = std::time::Instant::now();
            }
            // At most LISTEN_POLL per round, even while notices keep coming (the iterator's
            // timeout restarts with each one): the probe and the sink check above still run.
            let round = std::time::Instant::now() + LISTEN_POLL;
            let mut notes = client.notifications();
            let mut wait = notes.timeout_iter(LISTEN_POLL);
            while let Some(note) = wait.next()? {
                let Some(sink) = self.sink.upgrade() else {
                    return Ok(());
                };
                match parse_state_note(note.payload()) {
                    Some((id, state)) => sink.state_changed(&id, state),
                    None => tracing::warn!(
                        channel = note.channel(),
                        "ignoring a malformed state-change notification"
                    ),
                }
                if std::time::Instant::now() >= round {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// `<device id> <state>`, as the state change writes it (`RegistryTx::write_state`).
fn parse_state_note(payload: &str) -> Option<(DeviceId, DeviceState)> {
    let (id, state) = payload.split_once(' ')?;
    Some((DeviceId::parse(id).ok()?, state.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::{parse_state_note, redact_url};
    use devid_proto::DeviceState;

    #[test]
    fn state_notes_parse_and_junk_is_refused() {
        let (id, state) = parse_state_note("pump-7 revoked").unwrap();
        assert_eq!((id.as_str(), state), ("pump-7", DeviceState::Revoked));
        for junk in [
            "",
            "pump-7",
            "pump-7 gone",
            " revoked",
            "a/b revoked",
            "pump-7  revoked",
        ] {
            assert!(parse_state_note(junk).is_none(), "{junk:?}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://devid:s3cr%40t@db.example:5432/devid"),
            "postgres://devid:***@db.example:5432/devid"
        );
        assert_eq!(
            redact_url("postgresql://u:p@h/d?sslmode=disable&password=x&application_name=a"),
            "postgresql://u:***@h/d?sslmode=disable&password=***&application_name=a"
        );
        assert_eq!(
            redact_url("postgres://devid@127.0.0.1:5433/devid"),
            "postgres://devid@127.0.0.1:5433/devid"
        );
        assert_eq!(redact_url("postgres://h"), "postgres://h");
        // '@' inside the password: the last '@' ends the userinfo
        assert_eq!(redact_url("postgres://u:a@b@h/d"), "postgres://u:***@h/d");
    }
}
