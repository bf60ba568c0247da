//! The command line of `devid`. Names follow ../shared/DESIGN.md; users and tests rely on them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// devid: a hardware-rooted identity and sealed credentials for this device.
#[derive(Debug, Parser)]
#[command(name = "devid", version, about, propagate_version = true)]
#[command(
    after_help = "Example:\n  devid init --backend tpm --tcti swtpm:host=127.0.0.1,port=2321\n  echo -n s3cret | devid secret put wifi-psk\n  devid status"
)]
pub struct Cli {
    /// State directory holding the key file and the sealed bundle.
    #[arg(
        long,
        global = true,
        env = "DEVID_STATE_DIR",
        default_value = "/var/lib/devid"
    )]
    pub state_dir: PathBuf,

    /// The root-owned device configuration holding the anchor (backend, PKCS#11 module,
    /// TCTI). Missing: the device is unanchored (see `devid status`).
    #[arg(
        long,
        global = true,
        env = "DEVID_CONFIG_FILE",
        default_value = crate::anchor::DEFAULT_CONFIG_FILE,
        value_name = "PATH"
    )]
    pub config_file: PathBuf,

    /// TPM TCTI, e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321. Given at run time
    /// it overrides the device configuration's, which overrides the one recorded at init.
    #[arg(long, global = true, env = "DEVID_TCTI")]
    pub tcti: Option<String>,

    /// More logging (-v info, -vv debug). Logs never contain secrets.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the device key in its keystore and an empty sealed bundle.
    #[command(
        after_help = "Examples:\n  devid init --backend tpm --tcti device:/dev/tpmrm0 --pcrs 7\n  devid init --backend pkcs11 --module /usr/lib/softhsm/libsofthsm2.so --token devid --pin-file /etc/devid/pin\n  devid init --backend soft"
    )]
    Init(InitArgs),
    /// Write this device's backend, TCTI and PKCS#11 module into the device configuration
    /// (the anchor), so an offline change of the state dir cannot swap them. Run as root.
    #[command(
        after_help = "Example:\n  sudo devid anchor\n  devid --config-file /etc/devid/devid.toml anchor"
    )]
    Anchor,
    /// Show backend, key fingerprint, identity, server and protection level (never a secret).
    #[command(after_help = "Example:\n  devid status --json")]
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Only the running agent's status (connection, outbox, certificate), read from its
        /// status file without opening the keystore (for monitoring, as any user that can
        /// read the state dir).
        #[arg(long)]
        agent: bool,
    },
    /// Print the device public key (PEM).
    #[command(after_help = "Example:\n  devid pubkey > device.pub.pem")]
    Pubkey,
    /// Sign standard input with the device key (ECDSA P-256, SHA-256); DER signature on stdout.
    #[command(
        after_help = "Example:\n  devid sign < message > message.sig\n  openssl dgst -sha256 -verify device.pub.pem -signature message.sig message"
    )]
    Sign {
        /// Print the signature as base64 instead of raw DER.
        #[arg(long)]
        base64: bool,
    },
    /// Enrol with the devid server: CSR signed in the keystore, one-time token, pinned CA.
    #[command(
        after_help = "Example:\n  devid enroll --server https://devid.example.net:8443 --ca-pin 3f0c...e1 --token - < token.txt\n\nThe token can also come from DEVID_ENROLL_TOKEN; avoid putting it on the command line on\nshared machines (other users can read /proc/PID/cmdline)."
    )]
    Enroll(EnrollArgs),
    /// Named secrets sealed in the bundle.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Settings sealed in the bundle (server endpoint, CA pin).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run the device agent: MQTT over mutual TLS (key in the keystore), durable outbox,
    /// local socket for applications, certificate renewal. Runs until SIGTERM.
    #[command(
        after_help = "Example:\n  devid agent --socket /run/devid/agent.sock --socket-group devid-apps\n\nUsually started by systemd (packaging/devid-agent.service). See docs/agent.md."
    )]
    Agent(AgentArgs),
    /// Publish a message through the running agent; exits 0 only once the agent has it in
    /// its durable outbox.
    #[command(
        after_help = "Examples:\n  devid send --topic telemetry/temp 21.5\n  sensor-read | devid send --topic events/door -"
    )]
    Send(SendArgs),
}

/// `devid agent` options.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Unix socket applications publish through.
    #[arg(long, env = "DEVID_AGENT_SOCKET", default_value = devid_agent::local::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Group (name or gid) allowed to use the socket; the socket file gets this group.
    #[arg(long, env = "DEVID_AGENT_SOCKET_GROUP", value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Mode of the socket file (octal). Peers are checked again with SO_PEERCRED.
    #[arg(long, default_value = "0660", value_name = "OCTAL")]
    pub socket_mode: String,
    /// Outbox directory (default: <state dir>/outbox).
    #[arg(long, value_name = "DIR")]
    pub outbox_dir: Option<PathBuf>,
    /// Most bytes the outbox keeps (suffix K, M, G).
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    pub outbox_max_bytes: String,
    /// Oldest message the outbox keeps (e.g. 7d, 12h).
    #[arg(long, default_value = "7d", value_name = "DURATION")]
    pub outbox_max_age: String,
    /// When the outbox is full: refuse new messages, or drop the oldest.
    #[arg(long, default_value = "refuse", value_name = "POLICY")]
    pub outbox_full: devid_agent::outbox::FullPolicy,
    /// Largest message payload accepted (suffix K, M).
    #[arg(long, default_value = "64K", value_name = "SIZE")]
    pub max_payload: String,
    /// Renew the certificate at this fraction of its lifetime.
    #[arg(long, default_value_t = 2.0 / 3.0, value_name = "FRACTION")]
    pub renew_at: f64,
    /// Do not renew the certificate.
    #[arg(long)]
    pub no_renew: bool,
    /// MQTT keep-alive.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub keepalive: String,
    /// First reconnect delay ceiling (doubles per failure, full jitter).
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub backoff_base: String,
    /// Largest reconnect delay.
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub backoff_cap: String,
    /// Most unacknowledged messages on the MQTT connection.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub inflight: u16,
    /// How often the status file is rewritten at least.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub status_interval: String,
}

/// `devid send` options.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The agent's socket.
    #[arg(long, env = "DEVID_AGENT_SOCKET", default_value = devid_agent::local::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Topic suffix: telemetry/<name> or events/<name>.
    #[arg(long)]
    pub topic: String,
    /// The payload, or `-` to read it from standard input.
    pub payload: String,
    /// Give up after this long.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub timeout: String,
    /// Print the message's sequence number and idempotency key as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Key backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// TPM 2.0 (tpm2-tss).
    Tpm,
    /// PKCS#11 token or secure element.
    Pkcs11,
    /// Files in the state dir: no hardware protection (see `devid status`).
    Soft,
}

/// `devid init` options.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where the device key is created.
    #[arg(long, value_enum)]
    pub backend: Backend,
    /// TPM: bind the bundle key's unseal and the device key's use (signing) to these PCRs
    /// (SHA-256 bank, PolicyPCR), e.g. `7` or `0,2,4,7`.
    /// PCRs 16-23 can be reset by software and are refused unless --allow-resettable-pcrs.
    #[arg(long, value_name = "LIST")]
    pub pcrs: Option<String>,
    /// TPM: accept PCRs 16-23 in --pcrs although software can reset them (tests only).
    #[arg(long)]
    pub allow_resettable_pcrs: bool,
    /// PKCS#11: the module (shared library) path.
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,
    /// PKCS#11: token label.
    #[arg(long, value_name = "LABEL")]
    pub token: Option<String>,
    /// PKCS#11: file holding the user PIN.
    #[arg(long, value_name = "PATH")]
    pub pin_file: Option<PathBuf>,
}

/// `devid enroll` options.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// Server enrolment endpoint, https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// One-time enrolment token from `devid-server token create`; `-` reads it from stdin.
    #[arg(
        long,
        env = "DEVID_ENROLL_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: String,
    /// Hex SHA-256 of the fleet CA certificate, printed by `devid-server init`.
    #[arg(long, value_name = "SHA256")]
    pub ca_pin: String,
    /// Device id to ask for (lowercase a-z 0-9 -, up to 64); the token may already bind one.
    #[arg(long, value_name = "ID")]
    pub device_id: Option<String>,
    /// Do not attest the key, even if the TPM and the server could (refused by servers and
    /// tokens that require attestation).
    #[arg(long)]
    pub no_attest: bool,
    /// Which endorsement key attests (rsa2048, ecc-p256, ecc-p384, rsa3072); default: the
    /// first one the TPM has a certificate for.
    #[arg(long, value_name = "ALG", value_parser = ["rsa2048", "ecc-p256", "ecc-p384", "rsa3072"])]
    pub ek_alg: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `devid secret ...`
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store a secret; the value is read from standard input.
    #[command(after_help = "Example:\n  printf %s \"$PSK\" | devid secret put wifi-psk")]
    Put {
        /// Name: letters, digits, '.', '_', '-' (1-64).
        name: String,
    },
    /// Write a secret's value to standard output.
    #[command(after_help = "Example:\n  devid secret get wifi-psk")]
    Get {
        /// Name of the secret.
        name: String,
    },
    /// List secret names (never values).
    #[command(after_help = "Example:\n  devid secret list --json")]
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret.
    #[command(after_help = "Example:\n  devid secret rm wifi-psk")]
    Rm {
        /// Name of the secret.
        name: String,
    },
}

/// `devid config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Set a sealed setting: `server URL` or `ca-pin SHA256` (enrolment fills both).
    #[command(
        after_help = "Examples:\n  devid config set server https://devid.example.net:8443\n  devid config set ca-pin 3f0c...e1 (64 hex digits: SHA-256 of the CA certificate DER)"
    )]
    Set {
        /// Setting name.
        key: ConfigKey,
        /// New value.
        value: String,
    },
    /// Print the sealed settings (not secrets).
    #[command(after_help = "Example:\n  devid config show --json")]
    Show {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Settings that `devid config set` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConfigKey {
    /// Server enrolment/API endpoint, https://HOST:PORT.
    Server,
    /// Hex SHA-256 of the server CA certificate (DER).
    CaPin,
}
