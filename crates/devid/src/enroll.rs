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
    let evidence = attest(args, &token, &pin, ks.as_ref(), &csr)?;
    let backend = ks.kind().as_str();
    let resp = devid_enroll::enroll_with(
        &args.server,
        &token,
        &pin,
        &csr,
        wanted_id,
        evidence,
        Some(backend),
    )
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
            "assurance": resp.assurance,
            "mqtt_url": resp.mqtt_url,
            "certificate": cert,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("enrolled as device {}", resp.device_id);
        println!("key assurance: {}", assurance_text(&resp.assurance));
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

/// What the server's assurance level means, for people.
fn assurance_text(a: &str) -> String {
    match a {
        "ek-cert" => "ek-cert (TPM attested: the key was made in a TPM whose EK certificate \
                      the server trusts)"
            .into(),
        "ek-allowlist" => "ek-allowlist (TPM attested: the token named this TPM's EK)".into(),
        other => format!("{other} (not attested)"),
    }
}

/// Attest the key when the keystore can (a TPM with an EK certificate), the user did not say
/// `--no-attest` and the server attests: the challenge, then the TPM's answer. `None` means
/// enrol unattested (and the server decides whether that is enough).
fn attest(
    args: &EnrollArgs,
    token: &str,
    pin: &str,
    ks: &dyn Keystore,
    csr: &str,
) -> Result<Option<devid_proto::AttestationEvidence>> {
    if args.no_attest {
        return Ok(None);
    }
    let Some(attestor) = ks.attestation() else {
        return Ok(None);
    };
    let identity = attestor
        .attestation_identity(args.ek_alg.as_deref())
        .context("cannot read the TPM's endorsement key certificate or make its attestation key")?;
    let Some(identity) = identity else {
        if let Some(alg) = &args.ek_alg {
            bail!("the TPM has no {alg} endorsement key certificate; try another --ek-alg or --no-attest");
        }
        tracing::info!("the TPM holds no EK certificate: enrolling without attestation");
        return Ok(None);
    };
    let challenge = match devid_enroll::attest_start(&args.server, token, pin, &identity) {
        Ok(c) => c,
        Err(devid_enroll::EnrollError::Server { code, .. }) if code == "attestation_off" => {
            tracing::info!("the server does not attest keys: enrolling without attestation");
            return Ok(None);
        }
        Err(devid_enroll::EnrollError::Server { code, message, .. }) if code == "ek_untrusted" => {
            // Unattested enrolment is what the server allows without attestation anyway;
            // where the token or the server requires it, the enrolment itself is refused.
            eprintln!(
                "warning: the server does not trust this TPM's EK certificate ({message}); \
                 enrolling without attestation"
            );
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("attestation with {} failed", args.server))
        }
    };
    let evidence = devid_enroll::answer_challenge(attestor, &identity.ek_alg, &challenge, csr)
        .context("the TPM could not answer the server's attestation challenge")?;
    Ok(Some(evidence))
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
