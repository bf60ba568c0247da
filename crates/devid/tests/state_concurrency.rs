//! Review L4: writers of the state dir do not lose each other's update. `devid secret put`
//! and `devid config set` run at once, in separate processes, while a third writer does what
//! the agent's renewal does at its end (`Vault::update` of the certificate chain): every
//! change of every writer survives.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::Devid;

const ROUNDS: usize = 25;

#[test]
fn concurrent_secret_put_config_set_and_renewal_lose_nothing() {
    let d = Arc::new(Devid::new());
    d.run(&["init", "--backend", "soft"]).ok();

    let puts = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || {
            for i in 0..ROUNDS {
                d.run_stdin(&["secret", "put", &format!("s{i:02}")], b"value")
                    .ok();
            }
        })
    };
    let sets = {
        let d = Arc::clone(&d);
        std::thread::spawn(move || {
            for i in 0..ROUNDS {
                d.run(&[
                    "config",
                    "set",
                    "server",
                    &format!("https://h{i:02}.example:8443"),
                ])
                .ok();
            }
        })
    };
    // The renewal's write, as the agent makes it: re-read under the lock, change the chain.
    let renewals = {
        let state = d.state.clone();
        std::thread::spawn(move || {
            let (_, vault) = devid::open_vault(&state, None).unwrap();
            for i in 0..ROUNDS {
                vault
                    .update(|c| {
                        c.cert_chain_pem = Some(format!("chain {i:02}"));
                        Ok(())
                    })
                    .unwrap();
            }
        })
    };
    puts.join().unwrap();
    sets.join().unwrap();
    renewals.join().unwrap();

    let names = d.run(&["secret", "list"]).ok().text();
    let expected: String = (0..ROUNDS).map(|i| format!("s{i:02}\n")).collect();
    assert_eq!(names, expected, "secret puts were lost");
    let (_, vault) = devid::open_vault(&d.state, None).unwrap();
    let c = vault.load().unwrap();
    assert_eq!(
        c.server_url.as_deref(),
        Some(format!("https://h{:02}.example:8443", ROUNDS - 1).as_str()),
        "the last config set was lost"
    );
    assert_eq!(
        c.cert_chain_pem.as_deref(),
        Some(format!("chain {:02}", ROUNDS - 1).as_str()),
        "the last renewal write was lost"
    );
    // No temp file is left behind.
    for e in std::fs::read_dir(&d.state).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp."), "leftover {name}");
    }
}
