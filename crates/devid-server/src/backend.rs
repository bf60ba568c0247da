//! The one place that chooses the storage backends: [`open`] reads the config's `db` setting
//! and opens SQLite (registry and message index in the data dir's database, payloads in its
//! message log) or PostgreSQL (registry and messages on ONE pool, migrated once).

use std::sync::Arc;

use devid_server_config::{DbLocation, ServerConfig};
use devid_store::{MessageStore, Registry, StoreError};
use devid_store_postgres::{ConnectOptions, PostgresStore};
use devid_store_sqlite::{SqliteMessageStore, SqliteStore};

/// The stores a server process runs on.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Registry, tokens, credentials, audit.
    pub registry: Arc<dyn Registry>,
    /// Telemetry.
    pub messages: Arc<dyn MessageStore>,
    /// The directory whose file system the message log is written to (the free-disk
    /// watermark watches it): the SQLite file's directory, or the data dir with PostgreSQL.
    pub log_dir: std::path::PathBuf,
}

/// Open the registry alone (what `init` needs).
pub fn open_registry(cfg: &ServerConfig) -> Result<Arc<dyn Registry>, StoreError> {
    match location(cfg)? {
        DbLocation::Sqlite(path) => Ok(Arc::new(SqliteStore::open(&path)?)),
        DbLocation::Postgres(url) => {
            Ok(Arc::new(PostgresStore::open_with(&url, &pg_options(cfg))?))
        }
    }
}

/// Open the registry and the message store the config names, and start the store's
/// retention (`retention.max_age`) when set.
pub fn open(cfg: &ServerConfig) -> Result<Backend, StoreError> {
    let max_age = cfg.retention.max_age().map_err(|e| StoreError::Db {
        operation: "open",
        detail: e.to_string(),
    })?;
    let interval = cfg.retention.sweep_interval();
    match location(cfg)? {
        DbLocation::Sqlite(path) => {
            let messages =
                SqliteMessageStore::open_with_segment_bytes(&path, cfg.storage.segment_bytes)?;
            if let Some(age) = max_age {
                messages.start_retention(age, interval)?;
            }
            Ok(Backend {
                registry: Arc::new(SqliteStore::open(&path)?),
                messages: Arc::new(messages),
                log_dir: path
                    .parent()
                    .map_or_else(|| cfg.data_dir.clone(), |p| p.to_path_buf()),
            })
        }
        DbLocation::Postgres(url) => {
            let store = Arc::new(PostgresStore::open_with(&url, &pg_options(cfg))?);
            if let Some(age) = max_age {
                store.start_retention(age, interval)?;
            }
            Ok(Backend {
                registry: store.clone(),
                messages: store,
                log_dir: cfg.data_dir.clone(),
            })
        }
    }
}

fn pg_options(cfg: &ServerConfig) -> ConnectOptions {
    ConnectOptions {
        password_file: cfg.db_password_file(),
    }
}

fn location(cfg: &ServerConfig) -> Result<DbLocation, StoreError> {
    cfg.db_location().map_err(|e| StoreError::Db {
        operation: "open",
        detail: e.to_string(),
    })
}
