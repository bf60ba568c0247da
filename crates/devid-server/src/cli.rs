//! The `devid-server` command line (clap definitions), in the library so that the man pages
//! and shell completions can be generated from it (`devid-docgen`). `main.rs` runs it.
// The doc comments are the help text; fields are named by their flags.
#![allow(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Where `init` creates the data dir and `run` looks for it by default.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/devid-server";

#[derive(Parser, Debug)]
#[command(
    name = "devid-server",
    version,
    about = "devid server: fleet CA, device enrolment and registry",
    after_help = "Example:\n  devid-server init --data-dir /var/lib/devid-server --hostname iot.example.com\n  \
                  devid-server run --data-dir /var/lib/devid-server\n  \
                  devid-server token create --device-id sensor-01 --ttl 1h"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct DataDir {
    /// Server data dir (CA, TLS files, admin token, database).
    #[arg(long, env = "DEVID_SERVER_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Reach the admin API at this URL instead of the config's admin_listen address.
    #[arg(long)]
    pub server: Option<String>,
    /// Authenticate with the named credential whose token is in this file (default:
    /// DATA_DIR/admin.token, the credential `admin` made by `init`).
    #[arg(long, env = "DEVID_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the data dir: fleet CA, server TLS certificate, admin token, database, config.
    #[command(
        after_help = "Example:\n  devid-server init --data-dir /var/lib/devid-server \
                            --hostname iot.example.com --https-listen 0.0.0.0:8443"
    )]
    Init {
        /// Data dir to create.
        #[arg(long, env = "DEVID_SERVER_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The name devices use to reach this server (DNS name or IP).
        #[arg(long)]
        hostname: String,
        /// HTTPS listen address.
        #[arg(long, default_value = "127.0.0.1:8443")]
        https_listen: SocketAddr,
        /// MQTT listen address (its port goes into the URL given to devices).
        #[arg(long, default_value = "0.0.0.0:8883")]
        mqtt_listen: SocketAddr,
        /// Admin API listen address (keep it on loopback or a management network).
        #[arg(long, default_value = "127.0.0.1:8444")]
        admin_listen: SocketAddr,
        /// Database URL: sqlite:FILE (relative to the data dir) or
        /// postgres://USER[:PASSWORD]@HOST:PORT/DB (several nodes may share one database).
        #[arg(long)]
        db: Option<String>,
        /// PostgreSQL: read the password from this file (chmod 600; recorded as
        /// database.password_file), so neither the URL nor the config holds it.
        #[arg(long, value_name = "FILE")]
        db_password_file: Option<PathBuf>,
        /// Where to make the fleet CA key: file:FILE (relative to the data dir, the default
        /// file:ca-key.pem) or an RFC 7512 URI naming a PKCS#11 token, its module and a PIN
        /// file: the key is generated on the token and never leaves it.
        #[arg(
            long,
            value_name = "KEY_REF",
            long_help = "Where to make the fleet CA key.\n  file:FILE  a 0600 PKCS#8 file \
                         in the data dir (default file:ca-key.pem)\n  \
                         pkcs11:token=LABEL?module-path=MODULE&pin-source=file:PIN_FILE\n    \
                         generated on the PKCS#11 token LABEL (never extractable); the full \
                         reference (token serial, key id) is recorded in devid-server.toml.\n\
                         Example: --ca-key 'pkcs11:token=fleet-ca?module-path=/usr/lib/softhsm/\
                         libsofthsm2.so&pin-source=file:/etc/devid-server/token.pin'"
        )]
        ca_key: Option<String>,
        /// Write the config file here instead of DATA_DIR/devid-server.toml (the Debian
        /// package's unit reads /etc/devid-server/devid-server.toml); DATA_DIR then holds a
        /// symlink to it.
        #[arg(long, value_name = "FILE", env = "DEVID_SERVER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Serve HTTPS (enrolment, renewal, admin API, messages, /metrics) and MQTT (telemetry
    /// ingest over mutual TLS).
    #[command(
        after_help = "Example:\n  devid-server run --data-dir /var/lib/devid-server\n  \
                            devid-server run --config /etc/devid-server/devid-server.toml"
    )]
    Run {
        /// Data dir holding devid-server.toml.
        #[arg(long, env = "DEVID_SERVER_DATA_DIR", conflicts_with = "config")]
        data_dir: Option<PathBuf>,
        /// Config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Enrolment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The device registry.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Stored telemetry (MQTT messages).
    #[command(subcommand)]
    Messages(MessagesCommand),
    /// Named admin credentials (admin or read-only), revocable.
    #[command(subcommand)]
    Credential(CredentialCommand),
    /// Show the audit log.
    #[command(after_help = "Example:\n  devid-server audit --json --limit 50")]
    Audit {
        #[command(flatten)]
        dir: DataDir,
        /// Only rows about this device.
        #[arg(long)]
        device_id: Option<String>,
        /// Newest N rows.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CredentialCommand {
    /// Create a named credential; its token is printed alone on the last line, once.
    #[command(
        after_help = "Example:\n  devid-server credential create dashboard --read-only | tail -n1 \
                      > /etc/devid-server/dashboard.token"
    )]
    Create {
        #[command(flatten)]
        dir: DataDir,
        /// Its name (1 to 64 of a-z, 0-9, '-', '_'); audit rows name it as admin:NAME.
        name: String,
        /// Read everything, change nothing.
        #[arg(long)]
        read_only: bool,
    },
    /// List the credentials (never their tokens).
    #[command(after_help = "Example:\n  devid-server credential list --json")]
    List {
        #[command(flatten)]
        dir: DataDir,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a credential (its token stops working at once; the last admin one cannot be).
    #[command(after_help = "Example:\n  devid-server credential revoke dashboard")]
    Revoke {
        #[command(flatten)]
        dir: DataDir,
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a one-time enrolment token; the token is printed alone on the last line.
    #[command(
        after_help = "Example:\n  TOKEN=$(devid-server token create --device-id sensor-01 \
                            --ttl 1h | tail -n1)"
    )]
    Create {
        #[command(flatten)]
        dir: DataDir,
        /// Bind the token to this device id.
        #[arg(long)]
        device_id: Option<String>,
        /// Lifetime (30m, 1h, 7d); the server's default when absent.
        #[arg(long)]
        ttl: Option<String>,
        /// Policy name for the device.
        #[arg(long)]
        policy: Option<String>,
        /// `required`: the device must attest its key in a TPM (a token can only be stricter
        /// than the server's attestation.mode).
        #[arg(long, value_parser = ["required", "optional"])]
        attestation: Option<String>,
        /// Hex SHA-256 of the EK public key (SPKI) the device must attest with: its assurance
        /// is `ek-allowlist` when the EK certificate chains to no configured root.
        #[arg(long)]
        ek_fingerprint: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum MessagesCommand {
    /// List a device's stored messages, oldest first (the newest --limit, or those after
    /// --since). Payloads print as text when UTF-8, as base64: otherwise.
    #[command(
        after_help = "Example:\n  devid-server messages list --device sensor-01 --limit 20\n  \
                            devid-server messages list --device sensor-01 --since 1200 --json"
    )]
    List {
        #[command(flatten)]
        dir: DataDir,
        /// Device id.
        #[arg(long)]
        device: String,
        /// Most messages shown (1 to 10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only messages after this message id (paging).
        #[arg(long)]
        since: Option<i64>,
        /// JSON output: {"messages": [...], "next_since": ID}.
        #[arg(long)]
        json: bool,
    },
    /// Follow messages as they are stored (server-sent events from /v1/stream).
    #[command(after_help = "Example:\n  devid-server messages tail --device sensor-01")]
    Tail {
        #[command(flatten)]
        dir: DataDir,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// List devices.
    #[command(after_help = "Example:\n  devid-server device list --json")]
    List {
        #[command(flatten)]
        dir: DataDir,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one device.
    #[command(after_help = "Example:\n  devid-server device show sensor-01")]
    Show {
        /// Device id.
        id: String,
        #[command(flatten)]
        dir: DataDir,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Refuse a device until resumed.
    #[command(after_help = "Example:\n  devid-server device suspend sensor-01")]
    Suspend {
        /// Device id.
        id: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Make a suspended device active again.
    #[command(after_help = "Example:\n  devid-server device resume sensor-01")]
    Resume {
        /// Device id.
        id: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Revoke a device for good.
    #[command(after_help = "Example:\n  devid-server device revoke sensor-01")]
    Revoke {
        /// Device id.
        id: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Forget the device's registered TPM (endorsement and attestation key), so that it may
    /// attest from another TPM (after a board repair). Audited.
    #[command(after_help = "Example:\n  devid-server device reset-attestation sensor-01")]
    ResetAttestation {
        /// Device id.
        id: String,
        #[command(flatten)]
        dir: DataDir,
    },
}
