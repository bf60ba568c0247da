//! `devid-server`: the fleet CA, enrolment and device registry, from the command line.
//! Thin glue over the `devid_server` library (the composition root) and the admin client.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use devid_admin_client::{AdminClient, MessagesClient, StateAction};
use devid_proto::MessageView;
use devid_proto::TokenCreateRequest;
use devid_server::init::{init, InitOptions};
use devid_server_config::{parse_duration, ServerConfig};

const DEFAULT_DATA_DIR: &str = "/var/lib/devid-server";

#[derive(Parser, Debug)]
#[command(
    name = "devid-server",
    version,
    about = "devid server: fleet CA, device enrolment and registry",
    after_help = "Example:\n  devid-server init --data-dir /var/lib/devid-server --hostname iot.example.com\n  \
                  devid-server run --data-dir /var/lib/devid-server\n  \
                  devid-server token create --device-id sensor-01 --ttl 1h"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct DataDir {
    /// Server data dir (CA, TLS files, admin token, database).
    #[arg(long, env = "DEVID_SERVER_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Reach the admin API at this URL instead of the config's admin_listen address.
    #[arg(long)]
    server: Option<String>,
    /// Authenticate with the named credential whose token is in this file (default:
    /// DATA_DIR/admin.token, the credential `admin` made by `init`).
    #[arg(long, env = "DEVID_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl DataDir {
    fn client(&self) -> Result<AdminClient> {
        AdminClient::from_data_dir_with(
            &self.data_dir,
            self.server.as_deref(),
            self.token_file.as_deref(),
        )
        .with_context(|| format!("using data dir {}", self.data_dir.display()))
    }
}

#[derive(Subcommand, Debug)]
enum Command {
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
enum CredentialCommand {
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
enum TokenCommand {
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
    },
}

#[derive(Subcommand, Debug)]
enum MessagesCommand {
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
enum DeviceCommand {
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = if matches!(cli.command, Command::Run { .. } | Command::Init { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            data_dir,
            hostname,
            https_listen,
            mqtt_listen,
            admin_listen,
            db,
            db_password_file,
            ca_key,
        } => {
            let report = init(&InitOptions {
                data_dir,
                hostname,
                https_listen: Some(https_listen),
                mqtt_listen: Some(mqtt_listen),
                admin_listen: Some(admin_listen),
                db,
                db_password_file,
                ca_key,
            })?;
            let dir = report.config.data_dir.display();
            let url = format!(
                "https://{}:{}",
                report.config.hostname,
                report.config.https_listen.port()
            );
            println!("initialised {dir}");
            println!("  config:      {}", report.config_path.display());
            match report.config.ca_key_ref()? {
                devid_server_config::CaKeyRef::File(p) => println!(
                    "  CA cert:     {dir}/ca.pem (CA key: {}, mode 0600)",
                    p.display()
                ),
                devid_server_config::CaKeyRef::Pkcs11(uri) => println!(
                    "  CA cert:     {dir}/ca.pem (CA key on PKCS#11 token {:?}, serial {})",
                    uri.token,
                    uri.serial.as_deref().unwrap_or("?")
                ),
            }
            println!("  admin token: {dir}/admin.token (mode 0600)");
            println!("CA pin (SHA-256 of the CA certificate DER):");
            println!("  {}", report.ca_pin);
            println!("next:");
            println!("  devid-server run --data-dir {dir}");
            println!("  devid-server token create --data-dir {dir} --device-id DEVICE_ID --ttl 1h");
            println!(
                "  on the device: devid enroll --server {url} --ca-pin {} --token TOKEN",
                report.ca_pin
            );
            Ok(())
        }
        Command::Run { data_dir, config } => {
            let cfg = match (data_dir, config) {
                (_, Some(path)) => ServerConfig::load(&path)?,
                (Some(dir), None) => ServerConfig::load_from_data_dir(&dir)?,
                (None, None) => ServerConfig::load_from_data_dir(DEFAULT_DATA_DIR.as_ref())?,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(devid_server::run(cfg))?;
            Ok(())
        }
        Command::Token(TokenCommand::Create {
            dir,
            device_id,
            ttl,
            policy,
        }) => {
            let ttl_seconds = ttl
                .as_deref()
                .map(|t| parse_duration("--ttl", t).map(|d| d.as_secs().max(1)))
                .transpose()?;
            let resp = dir.client()?.create_token(&TokenCreateRequest {
                device_id,
                ttl_seconds,
                policy,
            })?;
            println!(
                "# one-time enrolment token{} (policy {}), expires {}:",
                resp.device_id
                    .as_deref()
                    .map(|d| format!(" for device {d}"))
                    .unwrap_or_default(),
                resp.policy,
                resp.expires_at
            );
            println!("{}", resp.token);
            Ok(())
        }
        Command::Credential(CredentialCommand::Create {
            dir,
            name,
            read_only,
        }) => {
            let resp = dir.client()?.create_credential(&name, read_only)?;
            println!(
                "# {} credential {}; keep its token (shown once) in a 0600 file:",
                resp.role, resp.name
            );
            println!("{}", resp.token);
            Ok(())
        }
        Command::Credential(CredentialCommand::List { dir, json }) => {
            let all = dir.client()?.credentials()?;
            if json {
                return print_json(&all);
            }
            for c in all {
                println!(
                    "{:<24} {:<10} created {} {}",
                    c.name,
                    c.role,
                    c.created_at,
                    c.revoked_at
                        .map(|r| format!("revoked {r}"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::Credential(CredentialCommand::Revoke { dir, name }) => {
            dir.client()?.revoke_credential(&name)?;
            println!("credential {name} revoked");
            Ok(())
        }
        Command::Device(cmd) => device(cmd),
        Command::Messages(cmd) => messages(cmd),
        Command::Audit {
            dir,
            device_id,
            limit,
            json,
        } => {
            let rows = dir.client()?.audit(limit, device_id.as_deref())?;
            if json {
                return print_json(&rows);
            }
            for r in rows {
                println!(
                    "{} {:<9} {:<16} {:<16} {:<8} {:<24} {}",
                    r.time,
                    r.actor,
                    r.action,
                    r.device_id.as_deref().unwrap_or("-"),
                    r.outcome,
                    r.source,
                    r.detail
                );
            }
            Ok(())
        }
    }
}

fn print_message(m: &MessageView) {
    let payload = if m.payload_encoding == "utf8" {
        m.payload.clone()
    } else {
        format!("{}:{}", m.payload_encoding, m.payload)
    };
    let msg_id = m
        .msg_id
        .as_deref()
        .map(|k| format!(" msg-id={k}"))
        .unwrap_or_default();
    println!(
        "{} {:>8} {} {} qos={}{} {}",
        m.received_at, m.id, m.device_id, m.topic, m.qos, msg_id, payload
    );
}

fn messages(cmd: MessagesCommand) -> Result<()> {
    use std::io::Write;
    match cmd {
        MessagesCommand::List {
            dir,
            device,
            limit,
            since,
            json,
        } => {
            let page = MessagesClient::from_data_dir(&dir.data_dir, dir.server.as_deref())?
                .list(&device, since, limit)?;
            if json {
                return print_json(&page);
            }
            for m in &page.messages {
                print_message(m);
            }
            Ok(())
        }
        MessagesCommand::Tail {
            dir,
            device,
            json,
            count,
        } => {
            let client = MessagesClient::from_data_dir(&dir.data_dir, dir.server.as_deref())?;
            let mut seen = 0usize;
            client.tail(device.as_deref(), |m| {
                if json {
                    if let Ok(line) = serde_json::to_string(&m) {
                        println!("{line}");
                    }
                } else {
                    print_message(&m);
                }
                let _ = std::io::stdout().flush();
                seen += 1;
                count.is_none_or(|n| seen < n)
            })?;
            Ok(())
        }
    }
}

fn device(cmd: DeviceCommand) -> Result<()> {
    let (id, dir, action) = match cmd {
        DeviceCommand::List { dir, json } => {
            let devices = dir.client()?.devices()?;
            if json {
                return print_json(&devices);
            }
            println!("{:<40} {:<9} {:<10} CERT EXPIRES", "ID", "STATE", "POLICY");
            for d in devices {
                println!(
                    "{:<40} {:<9} {:<10} {}",
                    d.id,
                    d.state.as_str(),
                    d.policy,
                    d.cert_not_after
                );
            }
            return Ok(());
        }
        DeviceCommand::Show { id, dir, json } => {
            let d = dir.client()?.device(&id)?;
            if json {
                return print_json(&d);
            }
            println!("id:              {}", d.id);
            println!("state:           {}", d.state);
            println!("policy:          {}", d.policy);
            println!("cert serial:     {}", d.cert_serial);
            println!("cert expires:    {}", d.cert_not_after);
            println!("key fingerprint: {}", d.key_fingerprint);
            println!("created:         {}", d.created_at);
            println!("enrolled:        {}", d.enrolled_at);
            println!("last seen:       {}", d.last_seen);
            return Ok(());
        }
        DeviceCommand::Suspend { id, dir } => (id, dir, StateAction::Suspend),
        DeviceCommand::Resume { id, dir } => (id, dir, StateAction::Resume),
        DeviceCommand::Revoke { id, dir } => (id, dir, StateAction::Revoke),
    };
    if devid_proto::DeviceId::parse(&id).is_err() {
        bail!("invalid device id {id:?}: use lowercase a-z, 0-9 and '-'");
    }
    let d = dir.client()?.set_state(&id, action)?;
    println!("{} is now {}", d.id, d.state);
    Ok(())
}
