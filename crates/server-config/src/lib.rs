//! `devid-server.toml`: the server's settings and the layout of its data dir.
//!
//! * this file: [`ServerConfig`] (the top-level keys), [`DbLocation`], [`CaKeyRef`] and
//!   [`Pkcs11KeyUri`], the data-dir file names, [`parse_duration`], [`is_hostname`];
//! * [`mqtt`]: the `[mqtt]` table (the ingest's settings).
//!
//! Invariants: pure serde/toml, no I/O but reading the config file itself; the other server
//! crates take settings as values from here and never read `devid-server.toml` themselves.
#![forbid(unsafe_code)]

pub mod error;
pub mod https;
pub mod mqtt;
pub mod storage;

pub use error::ConfigError;
pub use https::HttpsSettings;
pub use mqtt::MqttSettings;
pub use storage::{RetentionSettings, StorageSettings};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default HTTPS listen address (enrolment, renewal, admin API).
pub const DEFAULT_HTTPS_LISTEN: &str = "127.0.0.1:8443";
/// Default admin API listen address (loopback: the admin API and the console are for operators
/// on the server or behind an SSH tunnel or a VPN, never the open internet).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8444";
/// Default MQTT listen address.
pub const DEFAULT_MQTT_LISTEN: &str = "0.0.0.0:8883";
/// Name of the config file inside the data dir.
pub const CONFIG_FILE: &str = "devid-server.toml";
/// The fleet CA certificate (PEM), public.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The fleet CA private key (PKCS#8 PEM, 0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The server's TLS certificate chain (PEM: leaf, then CA).
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The server's TLS private key (0600).
pub const SERVER_KEY_FILE: &str = "server-key.pem";
/// The admin bearer token in plaintext (0600); the database holds only its hash.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The SQLite database file.
pub const SQLITE_FILE: &str = "devid-server.db";

/// Everything `devid-server run` needs. Relative paths are relative to `data_dir`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Directory holding the CA, TLS files, admin token and SQLite database.
    pub data_dir: PathBuf,
    /// The name devices use to reach this server (in its TLS certificate and the MQTT URL).
    pub hostname: String,
    /// HTTPS listen address.
    #[serde(default = "default_https")]
    pub https_listen: SocketAddr,
    /// MQTT listen address (the port goes into the `mqtt_url` given to devices).
    #[serde(default = "default_mqtt")]
    pub mqtt_listen: SocketAddr,
    /// HTTPS listener of the admin API (`/v1/admin/...`, messages, stream, metrics), with the
    /// server's certificate. Enrolment and renewal are served on `https_listen` only.
    #[serde(default = "default_admin")]
    pub admin_listen: SocketAddr,
    /// Database URL: `sqlite:FILE` (relative to data_dir) or `postgres://...` (with libpq's
    /// `sslmode` and `sslrootcert` for TLS).
    #[serde(default = "default_db")]
    pub db: String,
    /// PostgreSQL connection settings beyond the URL (`database.*` keys).
    #[serde(default)]
    pub database: DatabaseSettings,
    /// The fleet CA's private key: `file:FILE` (relative to data_dir) or an RFC 7512
    /// `pkcs11:` URI (see [`Pkcs11KeyUri`]).
    #[serde(default = "default_ca_key")]
    pub ca_key: String,
    /// Lifetime of device certificates in days.
    #[serde(default = "default_cert_days")]
    pub device_cert_days: u32,
    /// Lifetime of device certificates as a humantime duration (`2m`, `12h`, `30d`); when set
    /// it overrides `device_cert_days` (short lifetimes exercise renewal in tests and drills).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_cert_lifetime: Option<String>,
    /// Lifetime of enrolment tokens when `token create` gives no `--ttl` (humantime: `1h`).
    #[serde(default = "default_token_ttl")]
    pub token_default_ttl: String,
    /// Longest enrolment token lifetime accepted (humantime: `30d`).
    #[serde(default = "default_token_max_ttl")]
    pub token_max_ttl: String,
    /// Largest request body accepted, in bytes (413 above).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Time allowed for one request, in seconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Most TLS connections served at once (handshakes included). Default 10,000, like
    /// `mqtt.max_connections`: a connection flood must not take every slot cheaply.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// The MQTT URL enrolment hands devices when they reach the server through a load
    /// balancer (e.g. `mqtts://iot.example.com:8883`); default: built from `hostname` and
    /// `mqtt_listen`'s port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_advertised_url: Option<String>,
    /// Load balancers whose connections carry a PROXY protocol v2 header
    /// (`proxy_protocol.trusted`).
    #[serde(default)]
    pub proxy_protocol: ProxySettings,
    /// Renewal policy (`renewal.*` keys).
    #[serde(default)]
    pub renewal: RenewalSettings,
    /// TPM key attestation (`attestation.*` keys).
    #[serde(default)]
    pub attestation: AttestationSettings,
    /// HTTPS API limits and timeouts (`https.*` keys; every one has a default).
    #[serde(default)]
    pub https: https::HttpsSettings,
    /// MQTT ingest settings (`mqtt.*` keys; every one has a default).
    #[serde(default)]
    pub mqtt: mqtt::MqttSettings,
    /// Free-disk watermark and log segment size (`storage.*` keys).
    #[serde(default)]
    pub storage: storage::StorageSettings,
    /// Message retention and per-device quota (`retention.*` keys; off by default).
    #[serde(default)]
    pub retention: storage::RetentionSettings,
}

/// The `[database]` table (written as dotted keys, `database.password_file = ...`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// A file holding the PostgreSQL password alone (0600, relative to data_dir), so that the
    /// `db` URL and the config file carry no secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// The `proxy_protocol.*` keys.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// Address ranges (`127.0.0.1/32`, `10.0.0.0/24`, `::1`) of the load balancers that send
    /// a PROXY protocol v2 header on the HTTPS and MQTT listeners. A connection from one of
    /// them must start with the header; from anyone else a header is never read. Empty: off.
    pub trusted: Vec<String>,
}

/// The `[renewal]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RenewalSettings {
    /// Whether a renewal may move a device onto another key than the one its certificate
    /// certifies.
    pub key_change: KeyChange,
}

/// The `attestation.*` keys.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttestationSettings {
    /// `required`, `optional` (attest when the device can; the default) or `off`.
    pub mode: AttestationMode,
    /// A directory of PEM files: the TPM manufacturers' root (and intermediate) CA
    /// certificates an EK certificate must chain to (relative to data_dir). Unset: no EK
    /// certificate is trusted, only EKs a token names (`token create --ek-fingerprint`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ek_roots: Option<PathBuf>,
}

/// `attestation.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttestationMode {
    /// Every enrolment must attest its key in a TPM.
    Required,
    /// Devices that can attest do; the registry records the assurance of each.
    #[default]
    Optional,
    /// No attestation challenge is offered.
    Off,
}

impl AttestationMode {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            AttestationMode::Required => "required",
            AttestationMode::Optional => "optional",
            AttestationMode::Off => "off",
        }
    }
}

/// `renewal.key_change`: may a renewal CSR carry a new key?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyChange {
    /// Any new key the device proves it holds (the CSR) is accepted, and audited as a key
    /// change.
    #[default]
    Allowed,
    /// Only a new key certified by the device's registered attestation key (TPM attestation;
    /// until a device has one, this refuses every key change).
    Attested,
    /// Never: a device keeps the key it enrolled with.
    Refused,
}

impl KeyChange {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyChange::Allowed => "allowed",
            KeyChange::Attested => "attested",
            KeyChange::Refused => "refused",
        }
    }
}

fn default_https() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8444))
}
fn default_mqtt() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8883))
}
fn default_db() -> String {
    format!("sqlite:{SQLITE_FILE}")
}
fn default_ca_key() -> String {
    format!("file:{CA_KEY_FILE}")
}
fn default_cert_days() -> u32 {
    30
}
fn default_token_ttl() -> String {
    "1h".into()
}
fn default_token_max_ttl() -> String {
    "30d".into()
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_request_timeout() -> u64 {
    30
}
fn default_max_connections() -> usize {
    // As many as the MQTT listener: 1,024 let about 1,100 idle TCP connections from anyone
    // (never starting TLS, each held for the 10 s handshake timeout) fill every slot and the
    // listen backlog, so no device could enrol or renew (issue 15, ingest_floods.rs).
    10_000
}

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbLocation {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl ServerConfig {
    /// A config with every default and the given data dir and hostname.
    pub fn new(data_dir: PathBuf, hostname: String) -> Self {
        Self {
            data_dir,
            hostname,
            https_listen: default_https(),
            mqtt_listen: default_mqtt(),
            admin_listen: default_admin(),
            db: default_db(),
            database: DatabaseSettings::default(),
            ca_key: default_ca_key(),
            device_cert_days: default_cert_days(),
            device_cert_lifetime: None,
            token_default_ttl: default_token_ttl(),
            token_max_ttl: default_token_max_ttl(),
            max_body_bytes: default_max_body(),
            request_timeout_secs: default_request_timeout(),
            max_connections: default_max_connections(),
            mqtt_advertised_url: None,
            proxy_protocol: ProxySettings::default(),
            renewal: RenewalSettings::default(),
            attestation: AttestationSettings::default(),
            https: Default::default(),
            mqtt: Default::default(),
            storage: Default::default(),
            retention: Default::default(),
        }
    }

    /// Read and check a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg: ServerConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            detail: e.message().to_owned(),
        })?;
        if cfg.data_dir.is_relative() {
            let base = path.parent().unwrap_or(Path::new("."));
            cfg.data_dir = base.join(&cfg.data_dir);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read `DIR/devid-server.toml`.
    pub fn load_from_data_dir(dir: &Path) -> Result<Self, ConfigError> {
        Self::load(&dir.join(CONFIG_FILE))
    }

    /// Check values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_hostname(&self.hostname) {
            return Err(ConfigError::Invalid {
                key: "hostname",
                detail: format!("{:?} is not a DNS name or IP address", self.hostname),
            });
        }
        if self.device_cert_days == 0 || self.device_cert_days > 3650 {
            return Err(ConfigError::Invalid {
                key: "device_cert_days",
                detail: "must be between 1 and 3650".into(),
            });
        }
        if let Some(l) = &self.device_cert_lifetime {
            let d = parse_duration("device_cert_lifetime", l)?;
            if d < Duration::from_secs(60) || d > Duration::from_secs(3650 * 86_400) {
                return Err(ConfigError::Invalid {
                    key: "device_cert_lifetime",
                    detail: "must be between 1 minute and 3650 days".into(),
                });
            }
        }
        let ttl = self.token_default_ttl()?;
        if ttl > self.token_max_ttl()? {
            return Err(ConfigError::Invalid {
                key: "token_default_ttl",
                detail: "longer than token_max_ttl".into(),
            });
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid {
                key: "max_body_bytes",
                detail: "must be at least 1024".into(),
            });
        }
        if self.database.password_file.is_some()
            && !matches!(self.db_location()?, DbLocation::Postgres(_))
        {
            return Err(ConfigError::Invalid {
                key: "database.password_file",
                detail: "only a postgres:// database has a password".into(),
            });
        }
        if self.database.password_file.as_deref() == Some(Path::new("")) {
            return Err(ConfigError::Invalid {
                key: "database.password_file",
                detail: "empty path".into(),
            });
        }
        self.db_location()?;
        self.mqtt.validate()?;
        self.https.validate()?;
        self.storage.validate()?;
        self.retention.validate()?;
        if self.storage.segment_bytes <= self.mqtt.max_payload_bytes.saturating_add(8 << 10) {
            return Err(ConfigError::Invalid {
                key: "storage.segment_bytes",
                detail: "must be larger than mqtt.max_payload_bytes plus 8 KiB".into(),
            });
        }
        devid_stdx::proxy::Trusted::parse(&self.proxy_protocol.trusted).map_err(|e| {
            ConfigError::Invalid {
                key: "proxy_protocol.trusted",
                detail: e,
            }
        })?;
        if let Some(u) = &self.mqtt_advertised_url {
            if !(u.starts_with("mqtts://") && u.len() > "mqtts://".len()) {
                return Err(ConfigError::Invalid {
                    key: "mqtt_advertised_url",
                    detail: "must be an mqtts://HOST:PORT URL".into(),
                });
            }
        }
        self.ca_key_ref()?;
        Ok(())
    }

    /// Where the CA private key is.
    pub fn ca_key_ref(&self) -> Result<CaKeyRef, ConfigError> {
        CaKeyRef::parse(&self.ca_key, &self.data_dir)
    }

    /// Default token lifetime.
    pub fn token_default_ttl(&self) -> Result<Duration, ConfigError> {
        parse_duration("token_default_ttl", &self.token_default_ttl)
    }

    /// Longest token lifetime.
    pub fn token_max_ttl(&self) -> Result<Duration, ConfigError> {
        parse_duration("token_max_ttl", &self.token_max_ttl)
    }

    /// Lifetime of device certificates.
    pub fn device_cert_lifetime(&self) -> Duration {
        self.device_cert_lifetime
            .as_deref()
            .and_then(|l| parse_duration("device_cert_lifetime", l).ok())
            .unwrap_or_else(|| Duration::from_secs(u64::from(self.device_cert_days) * 86_400))
    }

    /// Where the database is.
    pub fn db_location(&self) -> Result<DbLocation, ConfigError> {
        if let Some(rest) = self.db.strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            if rest.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "db",
                    detail: "sqlite: needs a file name".into(),
                });
            }
            let p = PathBuf::from(rest);
            Ok(DbLocation::Sqlite(if p.is_absolute() {
                p
            } else {
                self.data_dir.join(p)
            }))
        } else if self.db.starts_with("postgres://") || self.db.starts_with("postgresql://") {
            Ok(DbLocation::Postgres(self.db.clone()))
        } else {
            Err(ConfigError::Invalid {
                key: "db",
                detail: "use sqlite:FILE or postgres://USER@HOST:PORT/DB".into(),
            })
        }
    }

    /// The PostgreSQL password file (`database.password_file`), relative paths joined to
    /// data_dir.
    pub fn db_password_file(&self) -> Option<PathBuf> {
        self.database
            .password_file
            .as_ref()
            .map(|p| self.data_dir.join(p))
    }

    /// The EK trust-bundle directory (`attestation.ek_roots`), relative paths joined to
    /// data_dir.
    pub fn ek_roots_dir(&self) -> Option<PathBuf> {
        self.attestation
            .ek_roots
            .as_ref()
            .map(|p| self.data_dir.join(p))
    }

    /// The URL devices get for MQTT.
    pub fn mqtt_url(&self) -> String {
        match &self.mqtt_advertised_url {
            Some(u) => u.clone(),
            None => format!("mqtts://{}:{}", self.hostname, self.mqtt_listen.port()),
        }
    }

    /// The URL local admin commands use to reach the HTTPS API (loopback when the server
    /// listens on every address).
    pub fn local_https_url(&self) -> String {
        local_url(self.https_listen)
    }

    /// `https://` URL of the admin listener as reached from this machine (the admin
    /// subcommands' default).
    pub fn local_admin_url(&self) -> String {
        local_url(self.admin_listen)
    }
}

fn local_url(addr: SocketAddr) -> String {
    {
        let ip = addr.ip();
        let host = if ip.is_unspecified() {
            if ip.is_ipv4() {
                "127.0.0.1".to_owned()
            } else {
                "[::1]".to_owned()
            }
        } else if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        format!("https://{host}:{}", addr.port())
    }
}

impl ServerConfig {
    /// A path inside the data dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.data_dir.join(name)
    }

    /// The config file text, every setting with a comment.
    pub fn to_commented_toml(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
        format!(
            "# devid-server configuration, written by `devid-server init`.\n\
             # Start the server with: devid-server run --config THIS_FILE (or --data-dir DIR)\n\
             \n\
             # Directory holding ca.pem, ca-key.pem (0600), server.pem, server-key.pem (0600),\n\
             # admin.token (0600) and the SQLite database.\n\
             data_dir = {data_dir}\n\
             \n\
             # The name devices use to reach this server: it is in the server's TLS certificate\n\
             # and in the MQTT URL handed to devices at enrolment.\n\
             hostname = {hostname}\n\
             \n\
             # Public HTTPS listener: enrolment (POST /v1/enroll), renewal over mutual TLS\n\
             # (POST /v1/renew), /readyz and /v1/health. The admin API is on admin_listen.\n\
             https_listen = {https}\n\
             \n\
             # MQTT over TLS listener; its port is in the mqtt_url given to devices.\n\
             mqtt_listen = {mqtt}\n\
             \n\
             # Admin API listener (HTTPS, the server's certificate): /v1/admin/..., messages,\n\
             # the live stream, /metrics. Keep it on loopback or a management network.\n\
             admin_listen = {admin}\n\
             \n\
             # Database: sqlite:FILE (relative to data_dir; WAL mode) or\n\
             # postgres://USER@HOST:PORT/DB. Over a network, use TLS with the database's CA:\n\
             # postgres://USER@HOST:PORT/DB?sslmode=verify-full&sslrootcert=/PATH/db-ca.pem\n\
             # (sslmode: disable, prefer (the default), require, verify-ca, verify-full).\n\
             db = {db}\n\
             # PostgreSQL: the password, alone in a file only the server's user can read\n\
             # (chmod 600; relative to data_dir), instead of a password in the db URL.\n\
             {pwfile}\n\
             \n\
             # The fleet CA's private key: file:FILE (relative to data_dir, 0600), or a key on\n\
             # a PKCS#11 token, as an RFC 7512 URI naming the token (label and serial), the\n\
             # key's CKA_ID, the module and the PIN file: pkcs11:token=LABEL;serial=S;id=%..;\n\
             # type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:PATH\n\
             ca_key = {ca_key}\n\
             \n\
             # Lifetime of device certificates, in days (devices renew at 2/3 of it).\n\
             device_cert_days = {days}\n\
             # Or as a duration, overriding device_cert_days (1m to 3650d), e.g. for renewal drills:\n\
             # device_cert_lifetime = \"2m\"\n\
             \n\
             # Lifetime of an enrolment token when `token create` has no --ttl, and the longest\n\
             # accepted (humantime: 30m, 1h, 7d).\n\
             token_default_ttl = {ttl}\n\
             token_max_ttl = {max_ttl}\n\
             \n\
             # Largest request body accepted, in bytes (larger: 413).\n\
             max_body_bytes = {body}\n\
             \n\
             # Time allowed for one request, in seconds.\n\
             request_timeout_secs = {timeout}\n\
             \n\
             # Most TLS connections served at once.\n\
             max_connections = {conns}\n\
             \n\
             # May a renewal move a device onto a new key? \"allowed\" (audited as a key change),\n\
             # \"attested\" (only a new key certified by the device's TPM attestation key), or\n\
             # \"refused\". A renewal always needs the device's current certificate (or, until\n\
             # the new one is first used, its immediate predecessor).\n\
             renewal.key_change = {key_change}\n\
             \n\
             # TPM key attestation at enrolment and renewal: \"required\", \"optional\" (devices\n\
             # that can attest do; the registry records each device's assurance) or \"off\".\n\
             attestation.mode = {att_mode}\n\
             # Directory of PEM files with the TPM manufacturers' EK root CAs (relative to\n\
             # data_dir); without it only EKs named by a token (--ek-fingerprint) are trusted.\n\
             {ek_roots}\n\
             \n\
             # Behind a load balancer in TCP mode: the address ranges whose connections carry a\n\
             # PROXY protocol v2 header (HAProxy: send-proxy-v2), so limits and the audit see\n\
             # devices' addresses; and the MQTT URL enrolment hands devices.\n\
             proxy_protocol.trusted = {trusted}\n\
             # mqtt_advertised_url = \"mqtts://iot.example.com:8883\"\n",
            data_dir = q(&self.data_dir.display().to_string()),
            hostname = q(&self.hostname),
            https = q(&self.https_listen.to_string()),
            mqtt = q(&self.mqtt_listen.to_string()),
            admin = q(&self.admin_listen.to_string()),
            db = q(&self.db),
            pwfile = match &self.database.password_file {
                Some(p) => format!("database.password_file = {}", q(&p.display().to_string())),
                None => "# database.password_file = \"/etc/devid-server/db.password\"".into(),
            },
            ca_key = q(&self.ca_key),
            days = self.device_cert_days,
            ttl = q(&self.token_default_ttl),
            max_ttl = q(&self.token_max_ttl),
            body = self.max_body_bytes,
            timeout = self.request_timeout_secs,
            conns = self.max_connections,
            key_change = q(self.renewal.key_change.as_str()),
            att_mode = q(self.attestation.mode.as_str()),
            ek_roots = match &self.attestation.ek_roots {
                Some(p) => format!("attestation.ek_roots = {}", q(&p.display().to_string())),
                None => "# attestation.ek_roots = \"/etc/devid-server/tpm-roots\"".into(),
            },
            trusted = toml::Value::Array(
                self.proxy_protocol
                    .trusted
                    .iter()
                    .map(|t| toml::Value::String(t.clone()))
                    .collect()
            ),
        ) + &self.https.to_commented_toml()
            + &self.mqtt.to_commented_toml()
            + &self.storage.to_commented_toml()
            + &self.retention.to_commented_toml()
    }
}

/// Where the fleet CA's private key is (`ca_key` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaKeyRef {
    /// A PKCS#8 PEM file (0600); the path is absolute (relative ones are joined to data_dir).
    File(PathBuf),
    /// A key on a PKCS#11 token.
    Pkcs11(Pkcs11KeyUri),
}

impl CaKeyRef {
    /// Parse `file:FILE` or a `pkcs11:` URI; relative files are taken from `data_dir`.
    pub fn parse(s: &str, data_dir: &Path) -> Result<Self, ConfigError> {
        if let Some(rest) = s.strip_prefix("file:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            if rest.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "ca_key",
                    detail: "file: needs a file name".into(),
                });
            }
            let p = PathBuf::from(rest);
            Ok(CaKeyRef::File(if p.is_absolute() {
                p
            } else {
                data_dir.join(p)
            }))
        } else if s.starts_with("pkcs11:") {
            Ok(CaKeyRef::Pkcs11(Pkcs11KeyUri::parse(s)?))
        } else {
            Err(ConfigError::Invalid {
                key: "ca_key",
                detail: "use file:FILE or a pkcs11: URI (RFC 7512)".into(),
            })
        }
    }
}

/// A key on a PKCS#11 token as an RFC 7512 URI:
/// `pkcs11:token=LABEL;serial=SERIAL;id=%01%02..;type=private?module-path=MODULE&pin-source=file:PIN_FILE`.
///
/// Path attributes: `token` (the token label, required), `serial` (the token serial: a token
/// with the same label but another serial is refused), `id` (the key's `CKA_ID`), `type`
/// (`private` when present); `object`, `manufacturer`, `model` and `library-*` are accepted
/// and ignored. Query attributes: `module-path` (the PKCS#11 module, required) and
/// `pin-source` (a `file:` URI or a path to a file holding the user PIN, required).
/// `pin-value` is refused: a PIN does not belong in a config file. `devid-server init
/// --ca-key` takes the URI without `serial` and `id` and records the full one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11KeyUri {
    /// Token label.
    pub token: String,
    /// Token serial number.
    pub serial: Option<String>,
    /// `CKA_ID` of the key.
    pub id: Option<Vec<u8>>,
    /// The PKCS#11 module.
    pub module_path: PathBuf,
    /// File holding the user PIN.
    pub pin_file: PathBuf,
}

fn pct_decode(key: &'static str, s: &str) -> Result<Vec<u8>, ConfigError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConfigError::Invalid {
                    key,
                    detail: format!("bad percent-encoding in {s:?}"),
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn pct_encode(bytes: &[u8], keep: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

impl Pkcs11KeyUri {
    /// Parse an RFC 7512 URI (see the type's docs for the attributes used).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        const KEY: &str = "ca_key";
        let invalid = |detail: String| ConfigError::Invalid { key: KEY, detail };
        let text = |v: &str| {
            String::from_utf8(pct_decode(KEY, v)?)
                .map_err(|_| invalid(format!("{v:?} is not UTF-8 once decoded")))
        };
        let rest = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| invalid("a PKCS#11 URI starts with pkcs11:".into()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut token, mut serial, mut id) = (None, None, None);
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| invalid(format!("path attribute {attr:?} has no '='")))?;
            match k {
                "token" => token = Some(text(v)?),
                "serial" => serial = Some(text(v)?),
                "id" => id = Some(pct_decode(KEY, v)?),
                "type" if v == "private" => {}
                "type" => {
                    return Err(invalid(format!(
                        "type={v}: the CA key reference names the private key (type=private)"
                    )))
                }
                "object"
                | "manufacturer"
                | "model"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-id"
                | "slot-description"
                | "slot-manufacturer" => {}
                other => return Err(invalid(format!("unknown path attribute {other:?}"))),
            }
        }
        let (mut module_path, mut pin_file) = (None, None);
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| invalid("a query attribute has no '='".into()))?;
            match k {
                "module-path" => module_path = Some(PathBuf::from(text(v)?)),
                "pin-source" => {
                    let v = text(v)?;
                    let p = v
                        .strip_prefix("file://")
                        .or(v.strip_prefix("file:"))
                        .unwrap_or(&v);
                    if !p.starts_with('/') {
                        return Err(invalid(
                            "pin-source must be an absolute file: URI or path".into(),
                        ));
                    }
                    pin_file = Some(PathBuf::from(p));
                }
                "pin-value" => {
                    return Err(invalid(
                        "pin-value is refused: put the PIN in a 0600 file and name it with \
                         pin-source=file:/PATH"
                            .into(),
                    ))
                }
                "module-name" => {}
                other => return Err(invalid(format!("unknown query attribute {other:?}"))),
            }
        }
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid("the URI needs token=LABEL".into()))?;
        let module_path = module_path.ok_or_else(|| {
            invalid("the URI needs ?module-path=/path/to/module.so (the PKCS#11 library)".into())
        })?;
        let pin_file = pin_file.ok_or_else(|| {
            invalid("the URI needs pin-source=file:/PATH (a file holding the user PIN)".into())
        })?;
        Ok(Self {
            token,
            serial,
            id,
            module_path,
            pin_file,
        })
    }

    /// The URI text.
    pub fn to_uri(&self) -> String {
        let mut s = format!("pkcs11:token={}", pct_encode(self.token.as_bytes(), b""));
        if let Some(serial) = &self.serial {
            s.push_str(&format!(";serial={}", pct_encode(serial.as_bytes(), b"")));
        }
        if let Some(id) = &self.id {
            s.push_str(";id=");
            for b in id {
                s.push_str(&format!("%{b:02x}"));
            }
        }
        s.push_str(";type=private");
        s.push_str(&format!(
            "?module-path={}&pin-source=file:{}",
            pct_encode(self.module_path.as_os_str().as_encoded_bytes(), b"/"),
            pct_encode(self.pin_file.as_os_str().as_encoded_bytes(), b"/")
        ));
        s
    }
}

/// Parse a humantime duration (`90s`, `15m`, `1h`, `7d`).
pub fn parse_duration(key: &'static str, s: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| ConfigError::Invalid {
        key,
        detail: format!("{s:?}: {e} (examples: 90s, 15m, 1h, 7d)"),
    })?;
    if d.is_zero() {
        return Err(ConfigError::Invalid {
            key,
            detail: "must be longer than zero".into(),
        });
    }
    Ok(d)
}

/// A DNS name (letters, digits, '-', '.') or an IP address.
pub fn is_hostname(s: &str) -> bool {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commented_toml_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServerConfig::new(dir.path().to_path_buf(), "iot.example.com".into());
        cfg.https_listen = "127.0.0.1:9443".parse().unwrap();
        let text = cfg.to_commented_toml();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, &text).unwrap();
        let back = ServerConfig::load(&path).unwrap();
        assert_eq!(back.https_listen, cfg.https_listen);
        assert_eq!(back.hostname, "iot.example.com");
        assert_eq!(
            back.db_location().unwrap(),
            DbLocation::Sqlite(dir.path().join(SQLITE_FILE))
        );
        // every setting line is preceded by a comment
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.contains(" = ") {
                assert!(
                    lines[..i].iter().rev().take(2).any(|p| p.starts_with('#')),
                    "{l}"
                );
            }
        }
        assert_eq!(back.mqtt_url(), "mqtts://iot.example.com:8883");
        assert_eq!(back.db_password_file(), None);
    }

    #[test]
    fn the_database_password_file_round_trips_and_is_for_postgres_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServerConfig::new(dir.path().to_path_buf(), "iot.example.com".into());
        cfg.db =
            "postgres://devid@db.example:5432/devid?sslmode=verify-full&sslrootcert=/ca.pem".into();
        cfg.database.password_file = Some("db.password".into());
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, cfg.to_commented_toml()).unwrap();
        let back = ServerConfig::load(&path).unwrap();
        assert_eq!(back.db, cfg.db);
        assert_eq!(
            back.db_password_file(),
            Some(dir.path().join("db.password"))
        );
        // the dotted key opens no table that would swallow the keys after it
        assert_eq!(back.ca_key, cfg.ca_key);
        let mut sqlite = cfg.clone();
        sqlite.db = default_db();
        assert!(sqlite.validate().is_err());
    }

    #[test]
    fn ca_key_refs() {
        let dir = Path::new("/data");
        assert_eq!(
            CaKeyRef::parse("file:ca-key.pem", dir).unwrap(),
            CaKeyRef::File(dir.join("ca-key.pem"))
        );
        let uri = "pkcs11:token=fleet%20ca;serial=abc123;id=%01%ff;type=private\
                   ?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/pin%20file";
        let CaKeyRef::Pkcs11(k) = CaKeyRef::parse(uri, dir).unwrap() else {
            panic!("pkcs11 expected");
        };
        assert_eq!(k.token, "fleet ca");
        assert_eq!(k.serial.as_deref(), Some("abc123"));
        assert_eq!(k.id.as_deref(), Some(&[1u8, 0xff][..]));
        assert_eq!(k.module_path, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(k.pin_file, Path::new("/etc/pin file"));
        assert_eq!(Pkcs11KeyUri::parse(&k.to_uri()).unwrap(), k);
        for bad in [
            "pkcs11:token=a?module-path=/m.so&pin-value=1234",
            "pkcs11:token=a?pin-source=file:/p",
            "pkcs11:token=a?module-path=/m.so",
            "pkcs11:serial=1?module-path=/m.so&pin-source=file:/p",
            "pkcs11:token=a;type=public?module-path=/m.so&pin-source=file:/p",
            "pkcs11:token=a;id=%zz?module-path=/m.so&pin-source=file:/p",
            "pkcs11:token=a?module-path=/m.so&pin-source=pin.txt",
            "tpm:/x",
        ] {
            assert!(CaKeyRef::parse(bad, dir).is_err(), "{bad}");
        }
        let err = CaKeyRef::parse("pkcs11:token=a?module-path=/m.so&pin-value=1234", dir)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("1234"), "{err}");
    }

    #[test]
    fn hostnames_and_durations() {
        assert!(is_hostname("a.example-1.com"));
        assert!(is_hostname("127.0.0.1"));
        assert!(!is_hostname("-a.com"));
        assert!(!is_hostname("a b"));
        assert_eq!(
            parse_duration("t", "1h").unwrap(),
            Duration::from_secs(3600)
        );
        assert!(parse_duration("t", "0s").is_err());
        assert!(parse_duration("t", "soon").is_err());
    }
}
