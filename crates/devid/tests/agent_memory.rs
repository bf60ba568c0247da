//! THREATS.md T7, issue 12 item 2: a root dump of the running soft-backend agent's memory
//! (`/proc/PID/mem`, after it unsealed the bundle, made its TLS handshake and sent readings)
//! holds no copy of the vault's data key or of an operator secret.

#![allow(clippy::unwrap_used)]

mod agent_support;
mod common;

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use agent_support::*;
use common::Devid;
use devid_testkit::server::DevidServer;

#[path = "../../agent/tests/support/mod.rs"]
mod support;

/// Every readable mapping of process `pid`, concatenated per region.
fn dump_memory(pid: u32) -> Vec<Vec<u8>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.contains("[vvar") || line.contains("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_ok() && mem.read_exact(&mut buf).is_ok() {
            out.push(buf);
        }
    }
    out
}

/// The outbox MAC key the agent derives (it must stay in the agent: this needle is only
/// reported, not asserted, so a test helper can compute it without a second copy mattering).
fn derived_mac_key(d: &Devid) -> Vec<u8> {
    let (_, vault) = devid::open_vault(&d.state, None).unwrap();
    vault
        .derive_key(devid_agent::OUTBOX_MAC_PURPOSE)
        .expose()
        .to_vec()
}

fn hits(regions: &[Vec<u8>], needle: &[u8]) -> usize {
    regions
        .iter()
        .map(|r| devid_testkit::count(r, needle))
        .sum()
}

#[test]
fn running_soft_agent_memory_holds_no_data_key_or_operator_secret() {
    let server = DevidServer::start();
    let d = Devid::new();
    d.run(&["init", "--backend", "soft"]).ok();
    let secret = b"OPERATOR-SECRET-7c1f9a2e-do-not-keep";
    d.run_stdin(&["secret", "put", "api-key"], secret).ok();
    let token = server.token(&["--device-id", "mem-1"]);
    d.run_stdin(
        &[
            "enroll",
            "--server",
            &server.url,
            "--ca-pin",
            &server.pin,
            "--token",
            "-",
        ],
        token.as_bytes(),
    )
    .ok();
    let key_pem = std::fs::read_to_string(d.state.join(devid_keystore::soft::KEY_FILE)).unwrap();
    let scalar = {
        use p256::pkcs8::DecodePrivateKey;
        p256::SecretKey::from_pkcs8_pem(&key_pem)
            .unwrap()
            .to_bytes()
            .to_vec()
    };
    // A line of the key file's base64 body.
    let key_line = key_pem.lines().nth(1).unwrap().as_bytes().to_vec();
    assert!(key_line.len() >= 40);
    let data_key = std::fs::read(d.state.join(devid_vault::DATA_KEY_FILE)).unwrap()[8..].to_vec();
    assert_eq!(data_key.len(), 32);

    let agent = Agent::start(&d, &[]);
    agent.wait_status("connected", Duration::from_secs(20), |s| {
        s["connection"]["state"] == "connected"
    });
    for i in 0..20 {
        devid_agent::local::publish(
            &agent.socket,
            "telemetry/mem",
            format!("reading-{i}").as_bytes(),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    agent.wait_status("acked", Duration::from_secs(20), |s| {
        s["mqtt"]["acked"] == 20
    });

    let regions = dump_memory(agent.pid());
    let total: usize = regions.iter().map(Vec::len).sum();
    assert!(total > 1 << 20, "the dump read only {total} bytes");
    // The dump can fail: the device id and a payload the agent just sent are in it.
    assert!(hits(&regions, b"mem-1") > 0, "the dump is not of the agent");
    let needles: [(&str, Vec<u8>); 8] = [
        ("data key", data_key.clone()),
        ("data key (hex)", hex::encode(&data_key).into_bytes()),
        ("operator secret", secret.to_vec()),
        ("operator secret (hex)", hex::encode(secret).into_bytes()),
        ("soft private scalar", scalar),
        ("soft key file text", key_line),
        ("enrolment token", token.trim().as_bytes().to_vec()),
        ("mac key", derived_mac_key(&d)),
    ];
    let found: Vec<(&str, usize)> = needles
        .iter()
        .map(|(what, n)| (*what, hits(&regions, n)))
        .collect();
    println!("MEASURED agent memory ({total} bytes readable): {found:?}");
    for (what, n) in &found {
        if *what == "mac key" {
            // Held on purpose (locked memory) for the agent's lifetime: one copy.
            assert!(*n <= 1, "{n} copies of the outbox MAC key: {found:?}");
            continue;
        }
        assert_eq!(
            *n, 0,
            "{n} copies of the {what} in the running agent: {found:?}"
        );
    }
}

/// The same dump for the TPM agent: the data key is unsealed by the TPM (through tss-esapi,
/// which frees its unsealed buffer without wiping it) at start and at each renewal. The
/// agent runs with glibc wiping freed heap memory, so that copy does not survive.
#[test]
fn running_tpm_agent_memory_holds_no_data_key_or_operator_secret() {
    let server = DevidServer::start();
    let tpm = devid_testkit::swtpm::Swtpm::start();
    let d = Devid::new().tcti(&tpm.tcti());
    d.run(&["init", "--backend", "tpm"]).ok();
    let secret = b"OPERATOR-SECRET-3d9e01b7-tpm-agent";
    d.run_stdin(&["secret", "put", "api-key"], secret).ok();
    enrol(&server, &d, "mem-2");
    let data_key = {
        let state = devid::state::StateFile::require(&d.state).unwrap();
        let ks = state.open_keystore(&d.state, Some(&tpm.tcti())).unwrap();
        let sealed = std::fs::read(d.state.join(devid_vault::DATA_KEY_FILE)).unwrap();
        ks.unseal(&sealed).unwrap().expose().to_vec()
    };
    let agent = Agent::start(&d, &[]);
    agent.wait_status("connected", Duration::from_secs(20), |s| {
        s["connection"]["state"] == "connected"
    });
    for i in 0..20 {
        devid_agent::local::publish(
            &agent.socket,
            "telemetry/mem",
            format!("reading-{i}").as_bytes(),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    agent.wait_status("acked", Duration::from_secs(20), |s| {
        s["mqtt"]["acked"] == 20
    });
    let regions = dump_memory(agent.pid());
    let total: usize = regions.iter().map(Vec::len).sum();
    assert!(hits(&regions, b"mem-2") > 0, "the dump is not of the agent");
    let needles: [(&str, Vec<u8>); 4] = [
        ("data key", data_key.clone()),
        ("data key (hex)", hex::encode(&data_key).into_bytes()),
        ("operator secret", secret.to_vec()),
        ("operator secret (hex)", hex::encode(secret).into_bytes()),
    ];
    let found: Vec<(&str, usize)> = needles
        .iter()
        .map(|(what, n)| (*what, hits(&regions, n)))
        .collect();
    println!("MEASURED TPM agent memory ({total} bytes readable): {found:?}");
    for (what, n) in &found {
        assert_eq!(
            *n, 0,
            "{n} copies of the {what} in the running TPM agent: {found:?}"
        );
    }
}
