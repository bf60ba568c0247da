//! `devid-server init`: create the data dir, the fleet CA, the server's TLS certificate, the
//! admin credential, the database and a commented config file.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use devid_ca::{Ca, CaError};
use devid_server_config::{
    is_hostname, CaKeyRef, ConfigError, ServerConfig, ADMIN_TOKEN_FILE, CA_CERT_FILE, CA_KEY_FILE,
    CONFIG_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE,
};
use devid_stdx::fs as fsutil;
use devid_stdx::now_ms;
use devid_store::{token, StoreError};

/// Lifetime of the server's own TLS certificate.
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(397 * 86_400);

/// Errors of `init`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// The data dir already holds a server.
    #[error(
        "{0} already exists: this data dir is initialised; use another --data-dir or remove it"
    )]
    Exists(String),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// CA or certificate generation failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The database could not be created.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `init` is told.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Data dir to create.
    pub data_dir: PathBuf,
    /// Name devices use for this server.
    pub hostname: String,
    /// HTTPS listen address (default 127.0.0.1:8443).
    pub https_listen: Option<SocketAddr>,
    /// MQTT listen address (default 0.0.0.0:8883).
    pub mqtt_listen: Option<SocketAddr>,
    /// Admin API listen address (default 127.0.0.1:8444).
    pub admin_listen: Option<SocketAddr>,
    /// Database URL (default sqlite in the data dir).
    pub db: Option<String>,
    /// PostgreSQL: the file holding the password (`database.password_file`).
    pub db_password_file: Option<PathBuf>,
    /// Where to make the CA key: `file:FILE` (default `file:ca-key.pem`) or a `pkcs11:` URI
    /// naming a token, its module and PIN file (the key is generated on the token).
    pub ca_key: Option<String>,
    /// Write the config file here instead of `DATA_DIR/devid-server.toml` (e.g.
    /// `/etc/devid-server/devid-server.toml`, as the Debian package's unit reads it); the data
    /// dir then gets a `devid-server.toml` symlink to it, so that the admin commands, which
    /// take `--data-dir`, find it.
    pub config_file: Option<PathBuf>,
}

/// What `init` made.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The config, as written.
    pub config: ServerConfig,
    /// Path of the config file.
    pub config_path: PathBuf,
    /// Hex SHA-256 of the CA certificate DER.
    pub ca_pin: String,
}

/// Run `init`.
pub fn init(opts: &InitOptions) -> Result<InitReport, InitError> {
    let ioe = |p: &std::path::Path| {
        let path = p.display().to_string();
        move |source| InitError::Io {
            path: path.clone(),
            source,
        }
    };
    if !is_hostname(&opts.hostname) {
        return Err(ConfigError::Invalid {
            key: "hostname",
            detail: format!("{:?} is not a DNS name or IP address", opts.hostname),
        }
        .into());
    }
    fsutil::ensure_private_dir(&opts.data_dir).map_err(ioe(&opts.data_dir))?;
    let data_dir = opts.data_dir.canonicalize().map_err(ioe(&opts.data_dir))?;
    for name in [CONFIG_FILE, CA_CERT_FILE, CA_KEY_FILE, ADMIN_TOKEN_FILE] {
        if data_dir.join(name).symlink_metadata().is_ok() {
            return Err(InitError::Exists(data_dir.join(name).display().to_string()));
        }
    }
    let mut cfg = ServerConfig::new(data_dir.clone(), opts.hostname.clone());
    if let Some(a) = opts.admin_listen {
        cfg.admin_listen = a;
    }
    if let Some(a) = opts.https_listen {
        cfg.https_listen = a;
    }
    if let Some(a) = opts.mqtt_listen {
        cfg.mqtt_listen = a;
    }
    if let Some(db) = &opts.db {
        cfg.db = db.clone();
    }
    if let Some(p) = &opts.db_password_file {
        // relative to where init runs, like --data-dir
        let abs = p.canonicalize().map_err(ioe(p))?;
        cfg.database.password_file = Some(abs);
    }
    if let Some(k) = &opts.ca_key {
        cfg.ca_key = k.clone();
    }
    cfg.validate()?;
    if let Some(p) = &opts.config_file {
        if p.symlink_metadata().is_ok() {
            return Err(InitError::Exists(p.display().to_string()));
        }
    }
    let key_ref = cfg.ca_key_ref()?;
    if let CaKeyRef::File(p) = &key_ref {
        if p.exists() {
            return Err(InitError::Exists(p.display().to_string()));
        }
    }
    let store = crate::backend::open_registry(&cfg)?;

    let now = now_ms();
    let ca = match &key_ref {
        CaKeyRef::File(key_path) => {
            let ca = Ca::generate(&cfg.hostname, now)?;
            ca.save(&cfg.path(CA_CERT_FILE), key_path)?;
            ca
        }
        CaKeyRef::Pkcs11(uri) => {
            let (ca, full) = Ca::generate_on_token(&cfg.hostname, now, uri)?;
            // Record the exact key (token serial and CKA_ID) for `run`.
            cfg.ca_key = full.to_uri();
            ca.save(&cfg.path(CA_CERT_FILE), &cfg.path(CA_KEY_FILE))?;
            ca
        }
    };

    let mut dns = Vec::new();
    let mut ips: Vec<IpAddr> = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
    match cfg.hostname.parse::<IpAddr>() {
        Ok(ip) => ips.push(ip),
        Err(_) => dns.push(cfg.hostname.clone()),
    }
    if !dns.iter().any(|d| d == "localhost") {
        dns.push("localhost".into());
    }
    for addr in [cfg.https_listen, cfg.mqtt_listen, cfg.admin_listen] {
        if !addr.ip().is_unspecified() {
            ips.push(addr.ip());
        }
    }
    ips.sort();
    ips.dedup();
    let (chain, key) = ca.issue_server(&dns, &ips, SERVER_CERT_LIFETIME, now)?;
    let key_path = cfg.path(SERVER_KEY_FILE);
    fsutil::write_new(&key_path, key.as_bytes(), 0o600).map_err(ioe(&key_path))?;
    let cert_path = cfg.path(SERVER_CERT_FILE);
    fsutil::write_new(&cert_path, chain.as_bytes(), 0o644).map_err(ioe(&cert_path))?;

    let admin = token::generate();
    let ctx = devid_store::AuditCtx {
        actor: "init".into(),
        source: "local".into(),
        now_ms: now,
    };
    store
        .add_admin_credential(
            devid_store::INIT_CREDENTIAL,
            devid_store::Role::Admin,
            &token::hash(&admin),
            &ctx,
        )?
        .map_err(|r| {
            InitError::Store(StoreError::Corrupt {
                what: "new database",
                detail: format!("it already holds an admin credential: {}", r.code()),
            })
        })?;
    let admin_path = cfg.path(ADMIN_TOKEN_FILE);
    fsutil::write_new(
        &admin_path,
        format!("{}\n", admin.as_str()).as_bytes(),
        0o600,
    )
    .map_err(ioe(&admin_path))?;

    let config_path = opts
        .config_file
        .clone()
        .unwrap_or_else(|| cfg.path(CONFIG_FILE));
    // A database URL with a password makes the config a secret.
    let has_password = devid_store_postgres::redact_url(&cfg.db) != cfg.db;
    let mode = if has_password { 0o600 } else { 0o644 };
    fsutil::write_new(&config_path, cfg.to_commented_toml().as_bytes(), mode)
        .map_err(ioe(&config_path))?;
    if opts.config_file.is_some() {
        let link = cfg.path(CONFIG_FILE);
        let target = config_path.canonicalize().map_err(ioe(&config_path))?;
        std::os::unix::fs::symlink(&target, &link).map_err(ioe(&link))?;
    }
    tracing::info!(
        data_dir = %data_dir.display(),
        ca_pin = %ca.pin(),
        ca_key = ca.key_kind(),
        "server initialised"
    );
    Ok(InitReport {
        ca_pin: ca.pin(),
        config: cfg,
        config_path,
    })
}
