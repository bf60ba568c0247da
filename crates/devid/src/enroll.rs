//! `devid enroll`: obtain this device's certificate from the devid server.
//!
//! The CSR is signed inside the keystore (the key never leaves it), the server is trusted only
//! through the CA pin, and the answer is checked before anything is sealed: the leaf carries
//! our public key and `urn:devid:<id>` and verifies against the pinned CA. Then the server URL,
//! MQTT URL, CA pin and certificate, device id and chain are sealed into the bundle in one
//! atomic write.

use std::io::Read;

use anyhow::{bail, Context, Result};
use devid_keystore::{spki_der, Keystore};
use serde_json::json;

use crate::cli::EnrollArgs;

/// Run `devid enroll`.
pub fn run(cx: &crate::Ctx<'_>, args: &EnrollArgs) -> Result<()> {
    crate::validate_server_url(&args.server)?;
    let pin = crate::normalise_pin(&args.ca_pin)?;
    let token = read_token(&args.token)?;
    let (_, vault) = cx.open_vault()?;
    let contents = vault.load()?;
    let ks = vault.keystore().clone();
    let wanted_id = args.device_id.as_deref().or(contents.device_id.as_deref());

    let csr = devid_enroll::build_csr_with_keystore(ks.as_ref(), wanted_id)
        .context("cannot build the certificate request in the keystore")?;
    let backend = ks.kind().as_str();
    let resp =
        devid_enroll::enroll_reporting(&args.server, &token, &pin, &csr, wanted_id, Some(backend))
            .with_context(|| format!("enrolment with {} failed", args.server))?;

    let ca_pem = check_chain(&resp.certificate_chain, &pin, &resp.device_id, ks.as_ref())?;
    drop(contents);
    vault.update(|contents| {
        contents.server_url = Some(args.server.trim_end_matches('/').to_string());
        contents.mqtt_url = Some(resp.mqtt_url.clone());
        contents.ca_pin = Some(pin);
        contents.ca_cert_pem = Some(ca_pem);
        contents.device_id = Some(resp.device_id.clone());
        contents.cert_chain_pem = Some(resp.certificate_chain.clone());
        Ok(())
    })?;

    let cert = crate::certificate_summary(&resp.certificate_chain);
    if args.json {
        let v = json!({
            "device_id": resp.device_id,
            "mqtt_url": resp.mqtt_url,
            "certificate": cert,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("enrolled as device {}", resp.device_id);
        println!("mqtt endpoint: {}", resp.mqtt_url);
        if let Some(c) = cert {
            println!(
                "certificate serial {}, valid until {}",
                c["serial"].as_str().unwrap_or("?"),
                c["not_after"].as_str().unwrap_or("?")
            );
        }
        println!("sealed into the bundle in {}", cx.dir.display());
    }
    Ok(())
}

/// The token, in a buffer wiped when dropped (the raw input too).
fn read_token(arg: &str) -> Result<zeroize::Zeroizing<String>> {
    let raw = zeroize::Zeroizing::new(if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the enrolment token from standard input")?;
        s
    } else {
        arg.to_string()
    });
    let token = zeroize::Zeroizing::new(raw.trim().to_string());
    if token.is_empty() {
        bail!("the enrolment token is empty: pass the line printed by `devid-server token create`");
    }
    Ok(token)
}

/// Check the chain the server returned; returns the CA certificate (PEM) it chains to.
fn check_chain(chain_pem: &str, pin: &str, device_id: &str, ks: &dyn Keystore) -> Result<String> {
    let id = devid_proto::DeviceId::parse(device_id)
        .context("the server returned an invalid device id")?;
    let spki = spki_der(&ks.public_key());
    let verified = devid_enroll::verify_issued_chain(chain_pem, pin, &id, &spki)?;
    Ok(verified.ca_pem)
}
