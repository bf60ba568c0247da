//! The device side of devid: the logic behind the `devid` command.
//!
//! `devid init` creates the device key in its keystore ([`devid_keystore`] and its TPM and
//! PKCS#11 backends) and an empty sealed bundle ([`devid_vault`]); every other command opens
//! the keystore recorded in [`state::StateFile`], unseals the bundle's data key with it, and
//! works on the decrypted contents held in locked, zeroized memory.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use devid_keystore::{fingerprint, public_key_pem, BackendKind, Keystore, SecretBytes};
use devid_vault::{Contents, Vault};
use serde_json::json;

pub mod anchor;
pub mod cli;
pub mod enroll;
pub mod logging;
pub mod state;

use anchor::{Anchor, DeviceConfig};
use cli::{
    AgentArgs, Backend, Cli, Command, ConfigCommand, ConfigKey, InitArgs, SecretCommand, SendArgs,
};
use state::StateFile;

/// Largest secret `devid secret put` accepts.
pub const MAX_SECRET_LEN: usize = 64 * 1024;

/// Run one command.
pub fn run(cli: Cli) -> Result<()> {
    let dir = cli.state_dir.as_path();
    let tcti = cli.tcti.as_deref();
    // Commands that never open the keystore do not need the device configuration.
    match &cli.command {
        Command::Status { json, agent: true } => return agent_status(dir, *json),
        Command::Send(args) => return send(args),
        _ => {}
    }
    let cx = Ctx {
        dir,
        tcti,
        config: DeviceConfig::load(&cli.config_file)?,
    };
    match cli.command {
        Command::Init(args) => init(&cx, &args),
        Command::Anchor => anchor_cmd(&cx),
        Command::Status { json, .. } => status(&cx, json),
        Command::Pubkey => {
            let (_, ks) = cx.open_keystore()?;
            print!("{}", public_key_pem(&ks.public_key()));
            Ok(())
        }
        Command::Sign { base64 } => sign(&cx, base64),
        Command::Enroll(args) => enroll::run(&cx, &args),
        Command::Secret(cmd) => secret(&cx, cmd),
        Command::Config(cmd) => config(&cx, cmd),
        Command::Agent(args) => agent(&cx, &args),
        Command::Send(args) => send(&args),
    }
}

/// What every command that opens the keystore works with: the state dir, the `--tcti` /
/// `DEVID_TCTI` override and the device configuration (the anchor).
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The state dir.
    pub dir: &'a Path,
    /// `--tcti` / `DEVID_TCTI`.
    pub tcti: Option<&'a str>,
    /// The device configuration file, read and checked.
    pub config: DeviceConfig,
}

impl Ctx<'_> {
    /// Open the keystore recorded in the state dir, under the anchor.
    pub fn open_keystore(&self) -> Result<(StateFile, Arc<dyn Keystore>)> {
        let state = StateFile::require(self.dir)?;
        let ks = state.open_keystore_with(self.dir, self.tcti, &self.config)?;
        Ok((state, ks))
    }

    /// Open the keystore and the vault (bound to the state file's trust fields).
    pub fn open_vault(&self) -> Result<(StateFile, Vault)> {
        let (state, ks) = self.open_keystore()?;
        let vault = Vault::open_bound(self.dir, ks, state.binding())?;
        Ok((state, vault))
    }
}

/// Open the keystore recorded in the state dir (no device configuration: unanchored).
pub fn open_keystore(dir: &Path, tcti: Option<&str>) -> Result<(StateFile, Arc<dyn Keystore>)> {
    Ctx {
        dir,
        tcti,
        config: DeviceConfig::unanchored(),
    }
    .open_keystore()
}

/// Open the keystore and the vault (no device configuration: unanchored).
pub fn open_vault(dir: &Path, tcti: Option<&str>) -> Result<(StateFile, Vault)> {
    Ctx {
        dir,
        tcti,
        config: DeviceConfig::unanchored(),
    }
    .open_vault()
}

/// The anchor describing `state` (with the TCTI and module it was opened with).
fn anchor_for(state: &StateFile) -> Anchor {
    Anchor {
        backend: Some(state.backend),
        tcti: state.tpm.as_ref().map(|t| t.tcti.clone()),
        module: state.pkcs11.as_ref().map(|p| p.module.clone()),
    }
}

fn anchor_cmd(cx: &Ctx<'_>) -> Result<()> {
    let (state, _ks) = cx.open_keystore()?;
    if let Some(a) = &cx.config.anchor {
        println!(
            "already anchored to the {} backend in {}",
            a.backend.map(|b| b.as_str()).unwrap_or("?"),
            cx.config.path.display()
        );
        return Ok(());
    }
    let mut anchor = anchor_for(&state);
    if let (Some(t), BackendKind::Tpm) = (cx.tcti, state.backend) {
        anchor.tcti = Some(t.to_string());
    }
    cx.config.write_anchor(&anchor)?;
    println!(
        "anchored this device to the {} backend in {}",
        state.backend,
        cx.config.path.display()
    );
    Ok(())
}

fn init(cx: &Ctx<'_>, args: &InitArgs) -> Result<()> {
    let dir = cx.dir;
    let wanted = match args.backend {
        Backend::Tpm => BackendKind::Tpm,
        Backend::Pkcs11 => BackendKind::Pkcs11,
        Backend::Soft => BackendKind::Soft,
    };
    if let Some(anchored) = cx.config.backend() {
        if anchored != wanted {
            bail!(
                "this device is anchored to the {anchored} backend ({}): refusing `devid init \
                 --backend {wanted}`; use --backend {anchored}, or change the anchor in that \
                 file first",
                cx.config.path.display()
            );
        }
    }
    if let Some(existing) = StateFile::read(dir)? {
        // Opening proves whether this state belongs to this device: a copied state dir gets
        // the keystore's "created on another TPM/token" error, not a generic one.
        existing.open_keystore_with(dir, cx.tcti, &cx.config)?;
        bail!(
            "{} already holds a devid vault ({} backend); remove the directory to start over \
             (the device must then be enrolled again)",
            dir.display(),
            existing.backend
        );
    }
    devid_keystore::fsutil::ensure_private_dir(dir)
        .with_context(|| format!("cannot create state dir {}", dir.display()))?;

    let (state, ks) = create_keystore(cx, args)?;
    if let Err(e) = Vault::create_bound(dir, ks.clone(), state.binding()) {
        cleanup_failed_init(dir);
        return Err(e.into());
    }
    if let Err(e) = state.write(dir) {
        cleanup_failed_init(dir);
        return Err(e);
    }
    println!(
        "initialised a {} vault in {}\nkey: {}\npublic key fingerprint (SHA-256 of SPKI): {}\nprotection: {}",
        state.backend,
        dir.display(),
        ks.key_ref(),
        fingerprint(&ks.public_key()),
        ks.protection().summary()
    );
    if cx.config.anchor.is_none() {
        if cx.config.exists {
            match cx.config.write_anchor(&anchor_for(&state)) {
                Ok(()) => println!(
                    "anchor: this device is now anchored to the {} backend in {}",
                    state.backend,
                    cx.config.path.display()
                ),
                Err(e) => eprintln!("devid: warning: {e:#}; {}", cx.config.unanchored_hint()),
            }
        } else {
            println!("anchor: {}", cx.config.unanchored_hint());
        }
    }
    Ok(())
}

fn cleanup_failed_init(dir: &Path) {
    for f in [
        devid_vault::BUNDLE_FILE,
        devid_vault::DATA_KEY_FILE,
        devid_keystore_tpm::KEY_FILE,
        devid_keystore::soft::KEY_FILE,
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

fn create_keystore(cx: &Ctx<'_>, args: &InitArgs) -> Result<(StateFile, Arc<dyn Keystore>)> {
    let dir = cx.dir;
    let anchored = cx.config.anchor.as_ref();
    match args.backend {
        Backend::Tpm => {
            let tcti = cx
                .tcti
                .or(anchored.and_then(|a| a.tcti.as_deref()))
                .map(str::to_string)
                .unwrap_or_else(|| "device:/dev/tpmrm0".to_string());
            let pcrs = match &args.pcrs {
                Some(list) => devid_keystore_tpm::parse_pcr_list(list)?,
                None => Vec::new(),
            };
            let (ks, cfg) = devid_keystore_tpm::TpmKeystore::create(
                dir,
                &devid_keystore_tpm::TpmInitOptions {
                    tcti,
                    pcrs,
                    allow_resettable_pcrs: args.allow_resettable_pcrs,
                    // --pcrs binds the device key's use too: a modified OS cannot sign.
                    bind_key_to_pcrs: true,
                },
            )?;
            let mut state = StateFile::new(BackendKind::Tpm);
            state.tpm = Some(cfg);
            Ok((state, Arc::new(ks)))
        }
        Backend::Pkcs11 => {
            let anchored_module = anchored.and_then(|a| a.module.as_deref());
            let module = match (args.module.as_deref(), anchored_module) {
                (Some(m), Some(a)) if m != a => bail!(
                    "this device is anchored to the PKCS#11 module {} ({}): refusing --module {}",
                    a.display(),
                    cx.config.path.display(),
                    m.display()
                ),
                (Some(m), _) => m,
                (None, Some(a)) => a,
                (None, None) => bail!(
                    "--backend pkcs11 needs --module PATH (e.g. /usr/lib/softhsm/libsofthsm2.so)"
                ),
            };
            anchor::check_module(module, dir)?;
            let token = args
                .token
                .as_deref()
                .context("--backend pkcs11 needs --token LABEL")?;
            let pin_file = args
                .pin_file
                .as_deref()
                .context("--backend pkcs11 needs --pin-file PATH")?;
            let (ks, cfg) = devid_keystore_pkcs11::Pkcs11Keystore::create(module, token, pin_file)?;
            let mut state = StateFile::new(BackendKind::Pkcs11);
            state.pkcs11 = Some(cfg);
            Ok((state, Arc::new(ks)))
        }
        Backend::Soft => {
            let ks = devid_keystore::soft::SoftKeystore::create(dir)?;
            Ok((StateFile::new(BackendKind::Soft), Arc::new(ks)))
        }
    }
}

fn status(cx: &Ctx<'_>, as_json: bool) -> Result<()> {
    let dir = cx.dir;
    let tcti = cx
        .tcti
        .or(cx.config.anchor.as_ref().and_then(|a| a.tcti.as_deref()));
    let (state, vault) = cx.open_vault()?;
    let contents = vault.load()?;
    let ks = vault.keystore();
    let hygiene = devid_secmem::hygiene();
    let cert = contents
        .cert_chain_pem
        .as_deref()
        .and_then(certificate_summary);
    let backend_detail = match state.backend {
        BackendKind::Tpm => state.tpm.as_ref().map(|t| {
            json!({
                "tcti": tcti.unwrap_or(&t.tcti),
                "srk_name": t.srk_name,
                "pcrs": t.pcrs,
                "key_pcrs": t.key_pcrs,
            })
        }),
        BackendKind::Pkcs11 => state.pkcs11.as_ref().map(|p| {
            let module = cx
                .config
                .anchor
                .as_ref()
                .and_then(|a| a.module.as_ref())
                .unwrap_or(&p.module);
            json!({"module": module, "token_label": p.token_label, "token_serial": p.token_serial})
        }),
        BackendKind::Soft => None,
    };
    let anchor = match cx.config.backend() {
        Some(b) => json!({"anchored": true, "backend": b, "config_file": cx.config.path}),
        None => json!({
            "anchored": false,
            "config_file": cx.config.path,
            "hint": cx.config.unanchored_hint(),
        }),
    };
    let v = json!({
        "state_dir": dir,
        "anchor": anchor,
        "backend": state.backend,
        "backend_detail": backend_detail,
        "key_ref": ks.key_ref(),
        "key_algorithm": "ECDSA P-256 with SHA-256",
        "public_key_fingerprint": fingerprint(&ks.public_key()),
        "protection": ks.protection(),
        "protection_summary": ks.protection().summary(),
        "device_id": contents.device_id,
        "server_url": contents.server_url,
        "mqtt_url": contents.mqtt_url,
        "ca_pin": contents.ca_pin,
        "certificate": cert,
        "secret_count": contents.secrets.len(),
        "process": {
            "dumpable": hygiene.dumpable,
            "core_limit": hygiene.core_limit,
            "secrets_locked": vault.key_locked(),
        },
        "agent": agent_status_json(dir),
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let show = |o: &Option<String>| o.clone().unwrap_or_else(|| "(not set)".into());
    println!("state dir:    {}", dir.display());
    println!("backend:      {}", state.backend);
    match cx.config.backend() {
        Some(b) => println!(
            "anchor:       anchored to {b} by {}",
            cx.config.path.display()
        ),
        None => println!("anchor:       UNANCHORED: {}", cx.config.unanchored_hint()),
    }
    println!("key:          {} (ECDSA P-256)", ks.key_ref());
    println!("fingerprint:  {}", fingerprint(&ks.public_key()));
    println!("protection:   {}", ks.protection().summary());
    println!("device id:    {}", show(&contents.device_id));
    println!("server:       {}", show(&contents.server_url));
    println!("mqtt:         {}", show(&contents.mqtt_url));
    println!("ca pin:       {}", show(&contents.ca_pin));
    match &v["certificate"] {
        serde_json::Value::Null => println!("certificate:  (not enrolled)"),
        c => println!(
            "certificate:  serial {}, expires {}",
            c["serial"].as_str().unwrap_or("?"),
            c["not_after"].as_str().unwrap_or("?")
        ),
    }
    println!("secrets:      {}", contents.secrets.len());
    println!(
        "process:      dumpable={} core_limit={}",
        hygiene.dumpable, hygiene.core_limit
    );
    if vault.key_locked() {
        println!("memory:       secrets locked in RAM (mlock)");
    } else {
        println!(
            "memory:       WARNING: mlock failed, unsealed secrets may be written to swap \
             (raise RLIMIT_MEMLOCK, e.g. LimitMEMLOCK=1M in the unit, or disable swap)"
        );
    }
    print_agent_status(&v["agent"]);
    Ok(())
}

/// The agent's status file as JSON (`null` when no agent ever ran on this state dir), with
/// `running`: whether the process that wrote it is still alive.
pub fn agent_status_json(dir: &Path) -> serde_json::Value {
    match devid_agent::status::read_status(dir) {
        Some(st) => {
            let running = st.connection.state != devid_agent::status::ConnState::Stopped
                && devid_agent::status::agent_alive(&st);
            let mut v = serde_json::to_value(&st).unwrap_or(serde_json::Value::Null);
            v["running"] = json!(running);
            v
        }
        None => serde_json::Value::Null,
    }
}

fn agent_status(dir: &Path, as_json: bool) -> Result<()> {
    let v = agent_status_json(dir);
    if v.is_null() {
        bail!(
            "no agent status in {} (has `devid agent` run with this --state-dir?)",
            dir.display()
        );
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_agent_status(&v);
    }
    Ok(())
}

fn unix_to_text(secs: Option<i64>) -> String {
    match secs {
        Some(s) if s > 0 => {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s as u64);
            humantime::format_rfc3339_seconds(t).to_string()
        }
        _ => "never".into(),
    }
}

fn print_agent_status(v: &serde_json::Value) {
    if v.is_null() {
        println!("agent:        (never ran on this state dir)");
        return;
    }
    let c = &v["connection"];
    let state = if v["running"].as_bool() == Some(true) {
        c["state"].as_str().unwrap_or("?").to_string()
    } else {
        format!(
            "not running (last state: {})",
            c["state"].as_str().unwrap_or("?")
        )
    };
    println!(
        "agent:        {state} since {} (pid {}, {})",
        unix_to_text(c["since_unix"].as_i64()),
        v["pid"],
        c["endpoint"].as_str().unwrap_or("?")
    );
    if let Some(e) = c["last_error"].as_str() {
        println!("  last error: {e}");
    }
    let o = &v["outbox"];
    println!(
        "  outbox:     {} waiting ({} bytes); dropped {} full / {} too old; refused {} (full); \
         {} records failed authentication (never sent)",
        o["depth"],
        o["bytes"],
        o["dropped_full"],
        o["dropped_age"],
        o["refused_full"],
        o["refused_unauthenticated"]
    );
    let m = &v["mqtt"];
    println!(
        "  messages:   {} acked, {} rejected by the server, last ack {}",
        m["acked"],
        m["rejected"],
        unix_to_text(m["last_ack_unix"].as_i64())
    );
    let cert = &v["certificate"];
    println!(
        "  cert:       serial {}, expires {}, renewal due {}, renewed {}x{}",
        cert["serial"].as_str().unwrap_or("?"),
        unix_to_text(cert["not_after_unix"].as_i64()),
        unix_to_text(cert["renew_at_unix"].as_i64()),
        cert["renewals"],
        cert["last_renewal_error"]
            .as_str()
            .map(|e| format!(" (last renewal error: {e})"))
            .unwrap_or_default()
    );
    let t = &v["tls"];
    println!(
        "  tls:        {} full / {} resumed handshakes, {} keystore signatures",
        t["full_handshakes"], t["resumed_handshakes"], t["keystore_signatures"]
    );
}

/// Parse a size like `64M`, `512K`, `1G` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .with_context(|| format!("{s:?} is not a size: use bytes or a number with K, M or G"))
}

fn parse_duration(what: &str, s: &str) -> Result<std::time::Duration> {
    humantime::parse_duration(s)
        .with_context(|| format!("{what}: {s:?} is not a duration (e.g. 500ms, 30s, 5m, 7d)"))
}

fn parse_group(g: &str) -> Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(gr)) => Ok(gr.gid.as_raw()),
        Ok(None) => bail!("no group named {g:?} (create it, or give a numeric gid)"),
        Err(e) => bail!("cannot look up group {g:?}: {e}"),
    }
}

/// The agent configuration `devid agent` flags describe.
pub fn agent_config(dir: &Path, args: &AgentArgs) -> Result<devid_agent::AgentConfig> {
    let mut cfg = devid_agent::AgentConfig::new(dir.to_path_buf());
    cfg.socket = args.socket.clone();
    cfg.socket_group = args.socket_group.as_deref().map(parse_group).transpose()?;
    cfg.socket_mode = u32::from_str_radix(args.socket_mode.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .context("--socket-mode is an octal mode such as 0660")?;
    if let Some(d) = &args.outbox_dir {
        cfg.outbox.dir = d.clone();
    }
    cfg.outbox.max_bytes = parse_size(&args.outbox_max_bytes)?;
    cfg.outbox.max_age = parse_duration("--outbox-max-age", &args.outbox_max_age)?;
    cfg.outbox.when_full = args.outbox_full;
    cfg.outbox.max_payload = usize::try_from(parse_size(&args.max_payload)?)
        .ok()
        .filter(|n| *n <= 1 << 20)
        .context("--max-payload is at most 1M")?;
    cfg.outbox.segment_bytes = (cfg.outbox.max_bytes / 8).clamp(64 << 10, 4 << 20);
    if cfg.outbox.max_bytes < 2 * cfg.outbox.max_payload as u64 {
        bail!("--outbox-max-bytes must hold at least two messages of --max-payload");
    }
    cfg.renew_fraction = (!args.no_renew).then_some(args.renew_at);
    cfg.keep_alive = parse_duration("--keepalive", &args.keepalive)?;
    cfg.backoff_base = parse_duration("--backoff-base", &args.backoff_base)?;
    cfg.backoff_cap = parse_duration("--backoff-cap", &args.backoff_cap)?;
    cfg.inflight = args.inflight.max(1);
    cfg.status_interval = parse_duration("--status-interval", &args.status_interval)?;
    Ok(cfg)
}

/// glibc tunables under which freed heap memory is overwritten at once (`perturb`) and no
/// freed chunk is kept aside unwiped (`tcache_count=0`).
pub const HEAP_WIPE_TUNABLES: &str = "glibc.malloc.tcache_count=0:glibc.malloc.perturb=165";

/// The long-running agent must not keep copies of secrets in freed memory: tss-esapi frees
/// the TPM's unsealed buffer without zeroizing it, and other C and Rust code may do the same.
/// glibc can wipe every freed chunk, but only if told so before the process starts, so the
/// agent re-executes itself once with [`HEAP_WIPE_TUNABLES`] (same pid, same arguments),
/// before anything is unsealed. If that fails it says so and runs on.
fn ensure_heap_wiping() {
    use std::os::unix::process::CommandExt;
    const KEY: &str = "GLIBC_TUNABLES";
    let current = std::env::var(KEY).unwrap_or_default();
    if current.contains("glibc.malloc.perturb=") {
        return;
    }
    let value = if current.is_empty() {
        HEAP_WIPE_TUNABLES.to_string()
    } else {
        format!("{current}:{HEAP_WIPE_TUNABLES}")
    };
    let err = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(KEY, value)
            .exec(),
        Err(e) => e,
    };
    tracing::warn!(
        error = %err,
        "cannot re-execute the agent with glibc wiping freed memory; copies of unsealed \
         secrets may stay in freed heap memory (set GLIBC_TUNABLES={HEAP_WIPE_TUNABLES})"
    );
}

fn agent(cx: &Ctx<'_>, args: &AgentArgs) -> Result<()> {
    ensure_heap_wiping();
    let cfg = agent_config(cx.dir, args)?;
    flush_tpm_leftovers(cx)?;
    let (_, vault) = cx.open_vault()?;
    match cx.config.backend() {
        Some(b) => {
            tracing::info!(backend = %b, config = %cx.config.path.display(), "device anchored")
        }
        None => tracing::warn!("{}", cx.config.unanchored_hint()),
    }
    let end = devid_agent::run(cfg, vault)?;
    tracing::info!(
        pending = end.outbox.depth,
        "devid agent stopped; pending messages stay in the outbox"
    );
    Ok(())
}

/// On a TPM reached without a resource manager (swtpm, mssim, `device:/dev/tpm0`), a previous
/// agent killed with `kill -9` (or by the OOM killer) left its objects and sessions loaded,
/// and every later load would fail with "out of memory for object contexts". The agent is the
/// TPM's only user on such a device (docs/agent.md), so it flushes them when it starts. No
/// other command does: it could cut a running agent's objects.
fn flush_tpm_leftovers(cx: &Ctx<'_>) -> Result<()> {
    let Some(state) = StateFile::read(cx.dir)? else {
        return Ok(());
    };
    anchor::check_backend(&cx.config, state.backend, cx.dir)?;
    let Some(tpm) = state
        .tpm
        .as_ref()
        .filter(|_| state.backend == BackendKind::Tpm)
    else {
        return Ok(());
    };
    let tcti = cx
        .tcti
        .or(cx.config.anchor.as_ref().and_then(|a| a.tcti.as_deref()))
        .unwrap_or(&tpm.tcti);
    if devid_keystore_tpm::tcti_has_resource_manager(tcti) {
        return Ok(());
    }
    let flushed = devid_keystore_tpm::flush_leftovers(tcti)
        .context("cannot flush the TPM objects a previous agent left behind")?;
    if flushed != devid_keystore_tpm::Flushed::default() {
        tracing::warn!(
            objects = flushed.objects,
            sessions = flushed.sessions,
            "flushed TPM objects and sessions left by a previous process (no resource manager \
             on this TCTI: did the agent crash or get killed?)"
        );
    }
    Ok(())
}

fn send(args: &SendArgs) -> Result<()> {
    let payload = if args.payload == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .take(devid_agent::outbox::MAX_RECORD_BODY as u64)
            .read_to_end(&mut buf)
            .context("cannot read the payload from standard input")?;
        buf
    } else {
        args.payload.clone().into_bytes()
    };
    devid_agent::topic::validate_suffix(&args.topic)?;
    let timeout = parse_duration("--timeout", &args.timeout)?;
    let accepted = devid_agent::local::publish(&args.socket, &args.topic, &payload, timeout)?;
    if args.json {
        println!(
            "{}",
            json!({"seq": accepted.seq, "msg_id": accepted.msg_id})
        );
    }
    Ok(())
}

/// Serial and validity of the first certificate of a PEM chain.
pub fn certificate_summary(chain_pem: &str) -> Option<serde_json::Value> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let not_after = cert.validity().not_after;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Some(json!({
        "serial": cert.raw_serial_as_string(),
        "subject": cert.subject().to_string(),
        "not_before": cert.validity().not_before.to_rfc2822().unwrap_or_default(),
        "not_after": not_after.to_rfc2822().unwrap_or_default(),
        "not_after_unix": not_after.timestamp(),
        "expires_in_seconds": not_after.timestamp() - now,
    }))
}

fn sign(cx: &Ctx<'_>, base64: bool) -> Result<()> {
    let (_, ks) = cx.open_keystore()?;
    let mut msg = Vec::new();
    std::io::stdin()
        .read_to_end(&mut msg)
        .context("cannot read the message from standard input")?;
    let sig = ks.sign(&msg)?;
    let der = sig.to_der();
    let mut out = std::io::stdout().lock();
    if base64 {
        use base64::Engine;
        writeln!(
            out,
            "{}",
            base64::engine::general_purpose::STANDARD.encode(der.as_bytes())
        )?;
    } else {
        out.write_all(der.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

/// Read at most [`MAX_SECRET_LEN`] bytes of standard input into locked memory.
fn read_secret_stdin() -> Result<SecretBytes> {
    let mut buf = SecretBytes::zeroed(MAX_SECRET_LEN + 1);
    let mut len = 0;
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = stdin
            .read(&mut buf.expose_mut()[len..])
            .context("cannot read the secret from standard input")?;
        if n == 0 {
            break;
        }
        len += n;
        if len > MAX_SECRET_LEN {
            bail!("secret longer than {MAX_SECRET_LEN} bytes; store a file key instead");
        }
    }
    Ok(SecretBytes::from_slice(&buf.expose()[..len]))
}

fn secret(cx: &Ctx<'_>, cmd: SecretCommand) -> Result<()> {
    match cmd {
        SecretCommand::Put { name } => {
            devid_vault::validate_secret_name(&name)?;
            // Read the value before touching the chip, so a slow writer does not hold the TPM.
            let value = read_secret_stdin()?;
            let (_, vault) = cx.open_vault()?;
            vault.update(|contents| {
                contents.secrets.insert(name, value);
                Ok(())
            })?;
            Ok(())
        }
        SecretCommand::Get { name } => {
            let (_, vault) = cx.open_vault()?;
            let contents = vault.load()?;
            let value = contents
                .secrets
                .get(&name)
                .with_context(|| format!("no secret named '{name}' (see `devid secret list`)"))?;
            let mut out = std::io::stdout().lock();
            out.write_all(value.expose())?;
            out.flush()?;
            Ok(())
        }
        SecretCommand::List { json } => {
            let (_, vault) = cx.open_vault()?;
            let contents = vault.load()?;
            let names: Vec<&String> = contents.secrets.keys().collect();
            if json {
                println!("{}", serde_json::to_string(&names)?);
            } else {
                for n in names {
                    println!("{n}");
                }
            }
            Ok(())
        }
        SecretCommand::Rm { name } => {
            let (_, vault) = cx.open_vault()?;
            let removed = vault.update(|contents| Ok(contents.secrets.remove(&name).is_some()))?;
            if !removed {
                bail!("no secret named '{name}' (see `devid secret list`)");
            }
            Ok(())
        }
    }
}

/// Validate a server URL for `config set server`.
pub fn validate_server_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("https://")
        .context("the server URL must start with https:// (e.g. https://devid.example.net:8443)")?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        bail!("the server URL needs a host, e.g. https://devid.example.net:8443");
    }
    Ok(())
}

/// Validate and normalise a CA pin (64 hex digits, optional `sha256:` prefix and colons).
pub fn normalise_pin(pin: &str) -> Result<String> {
    let p = pin.trim();
    let p = p.strip_prefix("sha256:").unwrap_or(p).replace(':', "");
    let p = p.to_ascii_lowercase();
    if p.len() != 64 || !p.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("a CA pin is 64 hex digits: the SHA-256 of the CA certificate (DER), as printed by `devid-server init`");
    }
    Ok(p)
}

fn config(cx: &Ctx<'_>, cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Set { key, value } => {
            let set: Box<dyn FnOnce(&mut Contents)> = match key {
                ConfigKey::Server => {
                    validate_server_url(&value)?;
                    Box::new(move |c| c.server_url = Some(value))
                }
                ConfigKey::CaPin => {
                    let pin = normalise_pin(&value)?;
                    Box::new(move |c| c.ca_pin = Some(pin))
                }
            };
            let (_, vault) = cx.open_vault()?;
            vault.update(|contents| {
                set(contents);
                Ok(())
            })?;
            Ok(())
        }
        ConfigCommand::Show { json } => {
            let (_, vault) = cx.open_vault()?;
            let c = vault.load()?;
            let v = json!({
                "server": c.server_url, "mqtt": c.mqtt_url, "ca_pin": c.ca_pin,
                "device_id": c.device_id,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (k, val) in v.as_object().into_iter().flatten() {
                    println!("{k}: {}", val.as_str().unwrap_or("(not set)"));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_normalised() {
        let hex64 = "AB".repeat(32);
        assert_eq!(normalise_pin(&hex64).expect("pin"), "ab".repeat(32));
        assert!(normalise_pin("abc").is_err());
        assert!(normalise_pin(&"zz".repeat(32)).is_err());
        assert!(validate_server_url("http://x").is_err());
        assert!(validate_server_url("https://x:8443").is_ok());
    }
}
