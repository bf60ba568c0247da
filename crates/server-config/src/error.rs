//! The error of reading or checking `devid-server.toml`.

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}; run `devid-server init` first or pass --config")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this version.
    #[error("invalid config {path}: {detail}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said.
        detail: String,
    },
    /// A setting has an invalid value.
    #[error("invalid setting {key}: {detail}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Why.
        detail: String,
    },
}
