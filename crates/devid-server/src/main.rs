//! `devid-server`: the fleet CA, enrolment and device registry, from the command line.
//! Thin glue over the `devid_server` library (the composition root) and the admin client.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use devid_admin_client::{AdminClient, MessagesClient, StateAction};
use devid_proto::MessageView;
use devid_proto::TokenCreateRequest;
use devid_server::cli::{
    Cli, Command, CredentialCommand, DataDir, DeviceCommand, MessagesCommand, TokenCommand,
    DEFAULT_DATA_DIR,
};
use devid_server::init::{init, InitOptions};
use devid_server_config::{parse_duration, ServerConfig};

fn client(dir: &DataDir) -> Result<AdminClient> {
    AdminClient::from_data_dir_with(
        &dir.data_dir,
        dir.server.as_deref(),
        dir.token_file.as_deref(),
    )
    .with_context(|| format!("using data dir {}", dir.data_dir.display()))
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
            config,
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
                config_file: config,
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
            attestation,
            ek_fingerprint,
        }) => {
            let ttl_seconds = ttl
                .as_deref()
                .map(|t| parse_duration("--ttl", t).map(|d| d.as_secs().max(1)))
                .transpose()?;
            let resp = client(&dir)?.create_token(&TokenCreateRequest {
                device_id,
                ttl_seconds,
                policy,
                attestation,
                ek_fingerprint,
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
            let resp = client(&dir)?.create_credential(&name, read_only)?;
            println!(
                "# {} credential {}; keep its token (shown once) in a 0600 file:",
                resp.role, resp.name
            );
            println!("{}", resp.token);
            Ok(())
        }
        Command::Credential(CredentialCommand::List { dir, json }) => {
            let all = client(&dir)?.credentials()?;
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
            client(&dir)?.revoke_credential(&name)?;
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
            let rows = client(&dir)?.audit(limit, device_id.as_deref())?;
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
            let devices = client(&dir)?.devices()?;
            if json {
                return print_json(&devices);
            }
            println!(
                "{:<40} {:<9} {:<10} {:<12} CERT EXPIRES",
                "ID", "STATE", "POLICY", "ASSURANCE"
            );
            for d in devices {
                println!(
                    "{:<40} {:<9} {:<10} {:<12} {}",
                    d.id,
                    d.state.as_str(),
                    d.policy,
                    d.assurance,
                    d.cert_not_after
                );
            }
            return Ok(());
        }
        DeviceCommand::Show { id, dir, json } => {
            let d = client(&dir)?.device(&id)?;
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
            println!("assurance:       {}", d.assurance);
            if let Some(ek) = &d.ek_fingerprint {
                println!("EK fingerprint:  {ek}");
            }
            if d.tpm_manufacturer.is_some() || d.tpm_model.is_some() {
                println!(
                    "TPM:             {} {}",
                    d.tpm_manufacturer.as_deref().unwrap_or("?"),
                    d.tpm_model.as_deref().unwrap_or("")
                );
            }
            return Ok(());
        }
        DeviceCommand::ResetAttestation { id, dir } => {
            let d = client(&dir)?.reset_attestation(&id)?;
            println!("{}: attestation reset (assurance {})", d.id, d.assurance);
            return Ok(());
        }
        DeviceCommand::Suspend { id, dir } => (id, dir, StateAction::Suspend),
        DeviceCommand::Resume { id, dir } => (id, dir, StateAction::Resume),
        DeviceCommand::Revoke { id, dir } => (id, dir, StateAction::Revoke),
    };
    if devid_proto::DeviceId::parse(&id).is_err() {
        bail!("invalid device id {id:?}: use lowercase a-z, 0-9 and '-'");
    }
    let d = client(&dir)?.set_state(&id, action)?;
    println!("{} is now {}", d.id, d.state);
    Ok(())
}
