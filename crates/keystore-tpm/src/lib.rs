//! devid keystore backend for TPM 2.0. This is the only crate of devid that links tss-esapi.
//!
//! What it guarantees (THREATS.md T2, T3, T5, T6, T8):
//! * The device key is an ECC P-256 child of the storage primary (SRK), created *inside* the
//!   TPM with fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | sign. Only its
//!   TPM-encrypted blobs leave the chip, in a "TSS2 PRIVATE KEY" PEM file that tpm2-tools and
//!   the tpm2-openssl provider also read.
//! * Small secrets (the vault's data key) are sealed in a keyedhash object under the SRK,
//!   optionally bound to a PCR policy.
//! * Every command runs in an HMAC (or policy) session **salted** with the SRK and with
//!   AES-128-CFB parameter encryption in both directions, so a probe on the bus sees the
//!   sealed secret only as ciphertext. The unsalted `execute_with_nullauth_session` is never
//!   used for anything that carries a secret.
//! * Salting cannot protect the CreatePrimary that makes the salt key, so the SRK's Name is
//!   recorded at init and compared on every open: another TPM, a cleared TPM or an interposer
//!   that answers with a different key is refused ([`KeystoreError::OtherDevice`]).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use devid_keystore::{
    fsutil::write_atomic_private, BackendKind, Keystore, KeystoreError, Protection, PublicKey,
    SecretBytes, Signature,
};
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket, KeyedHashScheme, PcrSelectionList,
    PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    PublicKeyedHashParameters, SensitiveData, SignatureScheme, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, TctiNameConf};

pub mod attest;
pub mod keyfile;
pub mod rotate;

use keyfile::{make_tpm2b, take_tpm2b, TpmKeyFile, PARENT_OWNER};

/// File name of the device key inside the state dir.
pub const KEY_FILE: &str = "tpm-device-key.pem";
/// The persistent SRK handle used when the platform provisioned one.
pub const SRK_PERSISTENT_HANDLE: u32 = 0x8100_0001;

const SEAL_MAGIC: &[u8; 8] = b"DEVIDTS1";
const WHAT: &str = "TPM";

/// What `devid init` records about the TPM and reads back on every start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TpmConfig {
    /// TCTI string, e.g. `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// Persistent SRK handle, when the platform provides one; otherwise the primary is
    /// re-created from the standard ECC P-256 template on every start.
    #[serde(default)]
    pub srk_handle: Option<u32>,
    /// Hex TPM Name of the SRK, pinned at init (the TPM-swap and clone check).
    pub srk_name: String,
    /// PCRs (SHA-256 bank) the sealed data key is bound to; empty for none.
    #[serde(default)]
    pub pcrs: Vec<u8>,
    /// The key file, relative to the state dir.
    pub key_file: String,
    /// PCRs (SHA-256 bank) the device key's *use* is bound to (PolicyPCR): with a changed
    /// boot the key no longer signs. Empty for none (vaults made before this existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_pcrs: Vec<u8>,
}

/// Options for [`TpmKeystore::create`].
#[derive(Debug, Clone, Default)]
pub struct TpmInitOptions {
    /// TCTI string.
    pub tcti: String,
    /// PCRs (SHA-256 bank) to bind sealing to.
    pub pcrs: Vec<u8>,
    /// Accept PCRs 16-23, which software can reset (review M5): a binding to them proves
    /// nothing about the boot. Off by default.
    pub allow_resettable_pcrs: bool,
    /// Also bind the device key's use to `pcrs` (PolicyPCR; the key has no auth value path:
    /// userWithAuth is clear), so a modified OS cannot sign with it.
    pub bind_key_to_pcrs: bool,
}

/// First PCR of the range the PC Client profile lets software reset (16 debug, 23
/// application, and 17-22 from the dynamic-launch localities).
pub const FIRST_RESETTABLE_PCR: u8 = 16;

/// Parse a PCR list such as `7` or `0,2,4,7`.
pub fn parse_pcr_list(s: &str) -> Result<Vec<u8>, KeystoreError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n: u8 = part
            .parse()
            .map_err(|_| KeystoreError::Config(format!("PCR '{part}' is not a number 0-23")))?;
        if n > 23 {
            return Err(KeystoreError::Config(format!(
                "PCR {n} does not exist (0-23)"
            )));
        }
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out.sort_unstable();
    if out.len() > 8 {
        return Err(KeystoreError::Config("at most 8 PCRs can be bound".into()));
    }
    Ok(out)
}

fn pcr_list_string(pcrs: &[u8]) -> String {
    pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
}

/// A device key in a TPM 2.0.
pub struct TpmKeystore {
    inner: Mutex<Inner>,
    config: TpmConfig,
    key_path: PathBuf,
    /// The device key's public key; changes only when a rotation commits.
    public: std::sync::RwLock<PublicKey>,
}

impl std::fmt::Debug for TpmKeystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmKeystore")
            .field("tcti", &self.config.tcti)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

struct Inner {
    ctx: Context,
    srk: KeyHandle,
    session: AuthSession,
    device_key: Option<KeyHandle>,
    key_file: TpmKeyFile,
    /// A key made for a rotation, not yet the device key ([`rotate`]).
    next: Option<rotate::NextKey>,
    param_encryption: bool,
}

fn backend_err(operation: &'static str, e: impl std::fmt::Display) -> KeystoreError {
    KeystoreError::Backend {
        backend: "TPM",
        operation,
        detail: e.to_string(),
    }
}

fn tss(operation: &'static str) -> impl Fn(tss_esapi::Error) -> KeystoreError {
    move |e| tss_err(operation, e)
}

/// A TPM error, with TPM_RC_OBJECT_MEMORY / TPM_RC_SESSION_MEMORY explained: on a TPM without
/// a resource manager a crashed process leaves its objects and sessions loaded.
fn tss_err(operation: &'static str, e: tss_esapi::Error) -> KeystoreError {
    if let tss_esapi::Error::Tss2Error(rc) = e {
        let what = match rc.kind() {
            Some(Tss2ResponseCodeKind::ObjectMemory) => Some("object"),
            Some(Tss2ResponseCodeKind::SessionMemory) => Some("session"),
            _ => None,
        };
        if let Some(what) = what {
            return KeystoreError::Backend {
                backend: "TPM",
                operation,
                detail: format!(
                    "{e}: the TPM has no free {what} slot. Without a resource manager (swtpm, \
                     mssim, device:/dev/tpm0) a process that died (kill -9, OOM) leaves its \
                     objects and sessions loaded: `devid agent` flushes them when it starts; \
                     otherwise run `tpm2_flushcontext -t -l -s` while no other TPM user runs, \
                     or use /dev/tpmrm0"
                ),
            };
        }
    }
    backend_err(operation, e)
}

/// Whether `tcti` reaches the TPM through a resource manager (the kernel's `/dev/tpmrm*`, or
/// tpm2-abrmd), which flushes a dead client's objects and sessions by itself.
pub fn tcti_has_resource_manager(tcti: &str) -> bool {
    let t = tcti.trim();
    if t.starts_with("tabrmd") {
        return true;
    }
    match t.strip_prefix("device") {
        // `device` alone means /dev/tpm0: no resource manager.
        Some(rest) => rest.contains("tpmrm"),
        None => false,
    }
}

/// What [`flush_leftovers`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Transient objects.
    pub objects: usize,
    /// Loaded or saved sessions.
    pub sessions: usize,
}

/// On a TCTI without a resource manager ([`tcti_has_resource_manager`]), flush every transient
/// object and session left in the TPM, e.g. by a previous agent killed with `kill -9`. Does
/// nothing through a resource manager.
///
/// This cuts the objects of *every* TPM user, so only a process that is the TPM's sole user
/// may call it: `devid agent` at start (docs/agent.md says so), never the other commands.
pub fn flush_leftovers(tcti: &str) -> Result<Flushed, KeystoreError> {
    use tss_esapi::constants::tss::{
        TPM2_ACTIVE_SESSION_FIRST, TPM2_LOADED_SESSION_FIRST, TPM2_TRANSIENT_FIRST,
    };
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::structures::CapabilityData;
    let mut out = Flushed::default();
    if tcti_has_resource_manager(tcti) {
        return Ok(out);
    }
    let mut ctx = connect(tcti)?;
    for (first, session) in [
        (TPM2_TRANSIENT_FIRST, false),
        (TPM2_LOADED_SESSION_FIRST, true),
        (TPM2_ACTIVE_SESSION_FIRST, true),
    ] {
        let (data, _more) = ctx
            .get_capability(CapabilityType::Handles, first, 64)
            .map_err(tss("list leftover handles"))?;
        let CapabilityData::Handles(list) = data else {
            continue;
        };
        for h in list.into_inner() {
            // Stay within the range asked for (a TPM lists from `first` onwards).
            if u32::from(h) >> 24 != first >> 24 {
                continue;
            }
            let raw = u32::from(h);
            let flushed = ctx
                .tr_from_tpm_public(h)
                .and_then(|obj| ctx.flush_context(obj));
            if let Err(e) = flushed {
                tracing::warn!(handle = format!("{raw:#010x}"), error = %e, "cannot flush a leftover TPM handle");
                continue;
            }
            if session {
                out.sessions += 1;
            } else {
                out.objects += 1;
            }
        }
    }
    Ok(out)
}

/// The standard ECC P-256 storage key template (TCG "SRK template", as made by
/// `tpm2_createprimary -G ecc256:aes128cfb`).
fn srk_template() -> Result<Public, KeystoreError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(tss("build SRK template"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(tss("build SRK template"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(tss("build SRK template"))
}

fn device_key_template(policy: Option<Digest>) -> Result<Public, KeystoreError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        // With a PCR policy the key is usable only through it, never with its (empty) auth.
        .with_user_with_auth(policy.is_none())
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .with_restricted(false)
        .build()
        .map_err(tss("build key template"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()
            .map_err(tss("build key template"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .with_auth_policy(policy.unwrap_or_default())
        .build()
        .map_err(tss("build key template"))
}

fn sealed_template(policy: Option<Digest>) -> Result<Public, KeystoreError> {
    let mut attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true);
    attrs = if policy.is_some() {
        attrs
            .with_user_with_auth(false)
            .with_admin_with_policy(true)
    } else {
        attrs.with_user_with_auth(true)
    };
    let attrs = attrs.build().map_err(tss("build sealed object template"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_auth_policy(policy.unwrap_or_default())
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Default::default())
        .build()
        .map_err(tss("build sealed object template"))
}

fn pcr_selection(pcrs: &[u8]) -> Result<PcrSelectionList, KeystoreError> {
    let slots = pcrs
        .iter()
        .map(|n| {
            PcrSlot::try_from(1u32 << n).map_err(|e| KeystoreError::Config(format!("PCR {n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| KeystoreError::Config(format!("PCR selection: {e}")))
}

/// The TPM Name of a public area: nameAlg (SHA-256 = 0x000B) || SHA-256(TPMT_PUBLIC).
pub fn public_name(public: &Public) -> Result<Vec<u8>, KeystoreError> {
    let bytes = public.marshall().map_err(tss("marshal public area"))?;
    let mut name = vec![0x00, 0x0b];
    name.extend_from_slice(&Sha256::digest(&bytes));
    Ok(name)
}

fn ecc_public_key(public: &Public) -> Result<PublicKey, KeystoreError> {
    match public {
        Public::Ecc { unique, .. } => {
            let mut sec1 = vec![0x04];
            let x = unique.x().value();
            let y = unique.y().value();
            if x.len() > 32 || y.len() > 32 {
                return Err(KeystoreError::InvalidBlob {
                    what: "TPM public key",
                    detail: "coordinate longer than 32 bytes".into(),
                });
            }
            sec1.extend(std::iter::repeat_n(0, 32 - x.len()));
            sec1.extend_from_slice(x);
            sec1.extend(std::iter::repeat_n(0, 32 - y.len()));
            sec1.extend_from_slice(y);
            PublicKey::from_sec1_bytes(&sec1).map_err(|e| KeystoreError::InvalidBlob {
                what: "TPM public key",
                detail: e.to_string(),
            })
        }
        _ => Err(KeystoreError::InvalidBlob {
            what: "TPM public key",
            detail: "not an ECC key".into(),
        }),
    }
}

fn connect(tcti: &str) -> Result<Context, KeystoreError> {
    let no_tpm = |detail: String| KeystoreError::NoDevice {
        what: WHAT,
        location: tcti.to_string(),
        detail,
    };
    let conf = TctiNameConf::from_str(tcti)
        .map_err(|e| no_tpm(format!("invalid TCTI string ({e}); examples: device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321")))?;
    Context::new(conf)
        .map_err(|e| no_tpm(format!("{e}; is the TPM present and readable (tss group)?")))
}

/// Get the SRK: the persistent one if asked for, else create the primary from the template.
/// `check_template`: refuse a persistent key whose public area is not the standard template
/// (at init; on open the pinned Name, a hash of the whole public area, already covers it).
fn load_srk(
    ctx: &mut Context,
    handle: Option<u32>,
    check_template: bool,
) -> Result<KeyHandle, KeystoreError> {
    match handle {
        Some(h) => {
            let ph = PersistentTpmHandle::new(h).map_err(tss("persistent SRK handle"))?;
            let obj = ctx
                .tr_from_tpm_public(TpmHandle::Persistent(ph))
                .map_err(tss("read persistent SRK"))?;
            let key = KeyHandle::from(obj);
            if check_template {
                check_srk_template(ctx, key, h)?;
            }
            Ok(key)
        }
        None => {
            // CreatePrimary carries no secret (empty auth, empty sensitive data): a password
            // session for the owner hierarchy is enough. Its result is checked against the
            // pinned Name before anything secret is sent.
            let result = ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
                    .map_err(tss("create storage primary key"))
            })?;
            Ok(result.key_handle)
        }
    }
}

/// Use a persistent key as the SRK only if its public area is the standard ECC P-256 SRK
/// template (everything but the public point): a key of another template (say, one an
/// attacker provisioned with a known policy, or a signing key) is refused (review L1).
fn check_srk_template(ctx: &mut Context, key: KeyHandle, handle: u32) -> Result<(), KeystoreError> {
    let (public, _, _) = ctx
        .read_public(key)
        .map_err(tss("read persistent SRK public area"))?;
    let want = srk_template()?;
    let same = match (&public, &want) {
        (
            Public::Ecc {
                object_attributes: a1,
                name_hashing_algorithm: n1,
                auth_policy: p1,
                parameters: e1,
                ..
            },
            Public::Ecc {
                object_attributes: a2,
                name_hashing_algorithm: n2,
                auth_policy: p2,
                parameters: e2,
                ..
            },
        ) => {
            // noDA only changes dictionary-attack accounting of an empty-auth key; tpm2-tools
            // creates primaries without it by default, the TCG template has it.
            let no_da = tss_esapi::constants::tss::TPMA_OBJECT_NODA;
            let attrs = |a: &tss_esapi::attributes::ObjectAttributes| {
                tss_esapi::tss2_esys::TPMA_OBJECT::from(*a) & !no_da
            };
            attrs(a1) == attrs(a2) && n1 == n2 && p1 == p2 && e1 == e2
        }
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(KeystoreError::Config(format!(
            "the persistent key at {handle:#010x} does not match the standard storage key \
             template (ECC P-256, AES-128-CFB, fixedTPM|fixedParent|sensitiveDataOrigin|\
             userWithAuth|restricted|decrypt with or without noDA, empty policy): devid will not use it as its \
             SRK. Evict it (tpm2_evictcontrol -C o -c {handle:#010x}) or provision the \
             standard SRK there (tpm2_createprimary -C o -G ecc256:aes128cfb)"
        )))
    }
}

fn persistent_srk_present(ctx: &mut Context) -> bool {
    let Ok(ph) = PersistentTpmHandle::new(SRK_PERSISTENT_HANDLE) else {
        return false;
    };
    match ctx.tr_from_tpm_public(TpmHandle::Persistent(ph)) {
        Ok(mut obj) => {
            let _ = ctx.tr_close(&mut obj);
            true
        }
        Err(_) => false,
    }
}

fn srk_name(ctx: &mut Context, srk: KeyHandle) -> Result<Vec<u8>, KeystoreError> {
    let name = ctx
        .tr_get_name(ObjectHandle::from(srk))
        .map_err(tss("read SRK name"))?;
    Ok(name.value().to_vec())
}

/// Start an HMAC or policy session salted with the SRK, AES-128-CFB parameter encryption in
/// both directions (unless a test switched encryption off to prove the bus test can fail).
fn start_salted_session(
    ctx: &mut Context,
    srk: KeyHandle,
    kind: SessionType,
    param_encryption: bool,
) -> Result<AuthSession, KeystoreError> {
    let session = ctx
        .start_auth_session(
            Some(srk),
            None,
            None,
            kind,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(tss("start salted session"))?
        .ok_or_else(|| backend_err("start salted session", "TPM returned no session"))?;
    let (attrs, mask) = SessionAttributesBuilder::new()
        .with_continue_session(true)
        .with_decrypt(param_encryption)
        .with_encrypt(param_encryption)
        .build();
    ctx.tr_sess_set_attributes(session, attrs, mask)
        .map_err(tss("set session attributes"))?;
    Ok(session)
}

impl Inner {
    fn connect(
        config: &TpmConfig,
        tcti: &str,
        key_file: TpmKeyFile,
    ) -> Result<Inner, KeystoreError> {
        let mut ctx = connect(tcti)?;
        let srk = load_srk(&mut ctx, config.srk_handle, false)?;
        let name = hex::encode(srk_name(&mut ctx, srk)?);
        if name != config.srk_name {
            return Err(KeystoreError::OtherDevice {
                what: WHAT,
                detail: format!(
                    "its storage key Name is {}, the vault was created with {}",
                    short(&name),
                    short(&config.srk_name)
                ),
            });
        }
        let session = start_salted_session(&mut ctx, srk, SessionType::Hmac, true)?;
        Ok(Inner {
            ctx,
            srk,
            session,
            device_key: None,
            key_file,
            next: None,
            param_encryption: true,
        })
    }

    fn device_key(&mut self) -> Result<KeyHandle, KeystoreError> {
        if let Some(k) = self.device_key {
            return Ok(k);
        }
        let (pub_body, _) = take_tpm2b(&self.key_file.public)?;
        let (priv_body, _) = take_tpm2b(&self.key_file.private)?;
        let public = Public::unmarshall(pub_body).map_err(tss("parse key public area"))?;
        let private =
            Private::try_from(priv_body.to_vec()).map_err(tss("parse key private blob"))?;
        let srk = self.srk;
        let handle = self
            .ctx
            .execute_with_session(Some(self.session), |ctx| ctx.load(srk, private, public))
            .map_err(|e| load_error("load device key", e))?;
        self.device_key = Some(handle);
        Ok(handle)
    }
}

fn load_error(operation: &'static str, e: tss_esapi::Error) -> KeystoreError {
    if let tss_esapi::Error::Tss2Error(rc) = e {
        if matches!(rc.kind(), Some(Tss2ResponseCodeKind::Integrity)) {
            return KeystoreError::OtherDevice {
                what: WHAT,
                detail: "the key blob does not load under this TPM's storage key".into(),
            };
        }
    }
    tss_err(operation, e)
}

/// A PolicyPCR failure is [`KeystoreError::PolicyNotSatisfied`]; anything else a TPM error.
fn pcr_policy_error(operation: &'static str, pcrs: &[u8], e: tss_esapi::Error) -> KeystoreError {
    match e {
        tss_esapi::Error::Tss2Error(rc)
            if matches!(
                rc.kind(),
                Some(Tss2ResponseCodeKind::PolicyFail)
                    | Some(Tss2ResponseCodeKind::PcrChanged)
                    | Some(Tss2ResponseCodeKind::Value)
            ) =>
        {
            KeystoreError::PolicyNotSatisfied {
                pcrs: pcr_list_string(pcrs),
            }
        }
        e => backend_err(operation, e),
    }
}

fn short(hex_name: &str) -> String {
    hex_name.chars().take(16).collect::<String>() + "…"
}

impl TpmKeystore {
    /// Create the device key inside the TPM and write its key file into `state_dir`.
    /// Returns the keystore and the configuration to record.
    pub fn create(
        state_dir: &Path,
        opts: &TpmInitOptions,
    ) -> Result<(TpmKeystore, TpmConfig), KeystoreError> {
        let key_path = state_dir.join(KEY_FILE);
        if key_path.exists() {
            return Err(KeystoreError::Config(format!(
                "{} already exists; refusing to overwrite a device key",
                key_path.display()
            )));
        }
        if let Some(p) = opts
            .pcrs
            .iter()
            .find(|p| **p >= FIRST_RESETTABLE_PCR)
            .filter(|_| !opts.allow_resettable_pcrs)
        {
            return Err(KeystoreError::Config(format!(
                "PCR {p} can be reset by software (PCRs {FIRST_RESETTABLE_PCR}-23), so binding \
                 the data key to it proves nothing about the boot; choose PCRs 0-15 (e.g. 7 for \
                 Secure Boot), or allow it explicitly (devid init --allow-resettable-pcrs)"
            )));
        }
        let mut ctx = connect(&opts.tcti)?;
        let srk_handle = persistent_srk_present(&mut ctx).then_some(SRK_PERSISTENT_HANDLE);
        let srk = load_srk(&mut ctx, srk_handle, true)?;
        let name = hex::encode(srk_name(&mut ctx, srk)?);
        let key_pcrs = if opts.bind_key_to_pcrs {
            opts.pcrs.clone()
        } else {
            Vec::new()
        };
        let key_policy = if key_pcrs.is_empty() {
            None
        } else {
            Some(Self::policy_digest(&mut ctx, &key_pcrs)?)
        };
        let session = start_salted_session(&mut ctx, srk, SessionType::Hmac, true)?;
        let created = ctx.execute_with_session(Some(session), |ctx| {
            ctx.create(
                srk,
                device_key_template(key_policy)?,
                None,
                None,
                None,
                None,
            )
            .map_err(tss("create device key"))
        })?;
        let public_bytes = created
            .out_public
            .marshall()
            .map_err(tss("marshal key public area"))?;
        let key_file = TpmKeyFile {
            parent: srk_handle.unwrap_or(PARENT_OWNER),
            public: make_tpm2b(&public_bytes)?,
            private: make_tpm2b(created.out_private.value())?,
        };
        let public = ecc_public_key(&created.out_public)?;
        write_atomic_private(&key_path, key_file.to_pem()?.as_bytes())
            .map_err(|e| KeystoreError::io(&key_path, e))?;
        let config = TpmConfig {
            tcti: opts.tcti.clone(),
            srk_handle,
            srk_name: name,
            pcrs: opts.pcrs.clone(),
            key_file: KEY_FILE.into(),
            key_pcrs,
        };
        let inner = Inner {
            ctx,
            srk,
            session,
            device_key: None,
            key_file,
            next: None,
            param_encryption: true,
        };
        Ok((
            TpmKeystore {
                inner: Mutex::new(inner),
                config: config.clone(),
                key_path,
                public: std::sync::RwLock::new(public),
            },
            config,
        ))
    }

    /// Open the keystore recorded in `config`. `tcti_override` (from `--tcti`/`DEVID_TCTI`)
    /// replaces the recorded TCTI string. Refuses a TPM whose SRK Name differs from the one
    /// pinned at init.
    pub fn open(
        state_dir: &Path,
        config: &TpmConfig,
        tcti_override: Option<&str>,
    ) -> Result<TpmKeystore, KeystoreError> {
        let key_path = state_dir.join(&config.key_file);
        let pem =
            std::fs::read_to_string(&key_path).map_err(|e| KeystoreError::io(&key_path, e))?;
        let key_file = TpmKeyFile::from_pem(&pem)?;
        let (pub_body, _) = take_tpm2b(&key_file.public)?;
        let public = Public::unmarshall(pub_body).map_err(tss("parse key public area"))?;
        let public = ecc_public_key(&public)?;
        let tcti = tcti_override.unwrap_or(&config.tcti);
        let mut config = config.clone();
        config.tcti = tcti.to_string();
        let mut inner = Inner::connect(&config, tcti, key_file)?;
        inner.next = rotate::read_next(&key_path)?;
        Ok(TpmKeystore {
            inner: Mutex::new(inner),
            config,
            key_path,
            public: std::sync::RwLock::new(public),
        })
    }

    /// The configuration in force (TCTI, pinned SRK Name, PCRs).
    pub fn config(&self) -> &TpmConfig {
        &self.config
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, KeystoreError> {
        self.inner
            .lock()
            .map_err(|_| backend_err("lock", "a previous TPM operation panicked"))
    }

    fn policy_digest(ctx: &mut Context, pcrs: &[u8]) -> Result<Digest, KeystoreError> {
        let selection = pcr_selection(pcrs)?;
        let (_, read_sel, digests) = ctx
            .execute_without_session(|ctx| ctx.pcr_read(selection.clone()))
            .map_err(tss("read PCRs"))?;
        if read_sel != selection {
            return Err(KeystoreError::Config(
                "the TPM has no SHA-256 bank for the requested PCRs".into(),
            ));
        }
        let mut h = Sha256::new();
        for d in digests.value() {
            h.update(d.value());
        }
        let pcr_digest = Digest::try_from(h.finalize().to_vec()).map_err(tss("PCR digest"))?;
        let trial = ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Trial,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(tss("start trial session"))?
            .ok_or_else(|| backend_err("start trial session", "TPM returned no session"))?;
        let policy = PolicySession::try_from(trial).map_err(tss("trial session"))?;
        let result = ctx
            .execute_without_session(|ctx| {
                ctx.policy_pcr(policy, pcr_digest, selection)?;
                ctx.policy_get_digest(policy)
            })
            .map_err(tss("compute PCR policy"));
        let _ = ctx.flush_context(ObjectHandle::from(SessionHandle::from(trial)));
        result
    }
}

/// A sealed data key as stored by [`TpmKeystore::seal`]: the PCR list it is bound to and the
/// TPM2B_PUBLIC / TPM2B_PRIVATE blobs of the keyedhash object.
#[derive(Debug)]
pub struct SealedBlob {
    /// PCRs (SHA-256 bank) of the policy; empty for none.
    pub pcrs: Vec<u8>,
    /// The sealed object's public area.
    pub public: Public,
    /// The sealed object's private blob (encrypted by the TPM's storage key).
    pub private: Private,
}

/// Parse a sealed blob read from disk: `DEVIDTS1 | n | n PCR indices | TPM2B_PUBLIC |
/// TPM2B_PRIVATE`. Never panics on any input (fuzzed).
pub fn parse_sealed_blob(blob: &[u8]) -> Result<SealedBlob, KeystoreError> {
    let invalid = |detail: &str| KeystoreError::InvalidBlob {
        what: "sealed data key",
        detail: detail.into(),
    };
    let rest = blob
        .strip_prefix(SEAL_MAGIC.as_slice())
        .ok_or_else(|| invalid("not sealed by the TPM backend"))?;
    let (&npcr, rest) = rest.split_first().ok_or_else(|| invalid("truncated"))?;
    if rest.len() < npcr as usize {
        return Err(invalid("truncated PCR list"));
    }
    let (pcrs, rest) = rest.split_at(npcr as usize);
    if pcrs.len() > 8 || pcrs.iter().any(|p| *p > 23) {
        return Err(invalid("bad PCR list"));
    }
    let (pub_body, rest) = take_tpm2b(rest)?;
    let (priv_body, rest) = take_tpm2b(rest)?;
    if !rest.is_empty() {
        return Err(invalid("trailing bytes"));
    }
    let public = Public::unmarshall(pub_body).map_err(tss("parse sealed object"))?;
    let private = Private::try_from(priv_body.to_vec()).map_err(tss("parse sealed object"))?;
    Ok(SealedBlob {
        pcrs: pcrs.to_vec(),
        public,
        private,
    })
}

impl Keystore for TpmKeystore {
    fn kind(&self) -> BackendKind {
        BackendKind::Tpm
    }

    fn protection(&self) -> Protection {
        Protection::Hardware
    }

    fn key_ref(&self) -> String {
        format!("tpm:{}", self.key_path.display())
    }

    fn attestation(&self) -> Option<&dyn devid_keystore::KeyAttestation> {
        Some(self)
    }

    fn public_key(&self) -> PublicKey {
        *self.public.read().unwrap_or_else(|p| p.into_inner())
    }

    fn sign_digest(&self, digest: &[u8; 32]) -> Result<Signature, KeystoreError> {
        let mut inner = self.lock()?;
        let key = inner.device_key()?;
        self.sign_with(&mut inner, key, digest)
    }

    fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        self.seal_impl(secret)
    }

    fn unseal(&self, blob: &[u8]) -> Result<SecretBytes, KeystoreError> {
        self.unseal_impl(blob)
    }

    fn rotation(&self) -> Option<&dyn devid_keystore::KeyRotation> {
        Some(self)
    }
}

impl TpmKeystore {
    /// Sign `digest` with the loaded key `key` (the device key, or a rotation's next key: both
    /// have the same template and PCR policy).
    fn sign_with(
        &self,
        inner: &mut Inner,
        key: KeyHandle,
        digest: &[u8; 32],
    ) -> Result<Signature, KeystoreError> {
        let digest = Digest::try_from(digest.to_vec()).map_err(tss("digest"))?;
        let validation = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(tss("hashcheck ticket"))?;
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        let sig = if self.config.key_pcrs.is_empty() {
            let session = inner.session;
            inner
                .ctx
                .execute_with_session(Some(session), |ctx| {
                    ctx.sign(key, digest, scheme, validation)
                })
                .map_err(tss("sign"))?
        } else {
            // The key signs only in a policy session that satisfied PolicyPCR (salted and
            // parameter-encrypted like every other session).
            let pcrs = self.config.key_pcrs.as_slice();
            let selection = pcr_selection(pcrs)?;
            let srk = inner.srk;
            let param_encryption = inner.param_encryption;
            let psession =
                start_salted_session(&mut inner.ctx, srk, SessionType::Policy, param_encryption)?;
            let policy = PolicySession::try_from(psession).map_err(tss("policy session"))?;
            let r = inner
                .ctx
                .execute_without_session(|ctx| ctx.policy_pcr(policy, Digest::default(), selection))
                .and_then(|_| {
                    inner.ctx.execute_with_session(Some(psession), |ctx| {
                        ctx.sign(key, digest, scheme, validation)
                    })
                })
                .map_err(|e| pcr_policy_error("sign", pcrs, e));
            let _ = inner
                .ctx
                .flush_context(ObjectHandle::from(SessionHandle::from(psession)));
            r?
        };
        match sig {
            tss_esapi::structures::Signature::EcDsa(ecc) => devid_keystore::signature_from_scalars(
                ecc.signature_r().value(),
                ecc.signature_s().value(),
            ),
            _ => Err(backend_err("sign", "TPM returned a non-ECDSA signature")),
        }
    }

    fn seal_impl(&self, secret: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        let mut inner = self.lock()?;
        let pcrs = self.config.pcrs.clone();
        let policy = if pcrs.is_empty() {
            None
        } else {
            Some(Self::policy_digest(&mut inner.ctx, &pcrs)?)
        };
        let data =
            SensitiveData::try_from(secret.to_vec()).map_err(tss("secret too large to seal"))?;
        let srk = inner.srk;
        let session = inner.session;
        let created = inner.ctx.execute_with_session(Some(session), |ctx| {
            ctx.create(srk, sealed_template(policy)?, None, Some(data), None, None)
                .map_err(tss("seal"))
        })?;
        let public = created
            .out_public
            .marshall()
            .map_err(tss("marshal sealed object"))?;
        let mut out = Vec::new();
        out.extend_from_slice(SEAL_MAGIC);
        out.push(
            u8::try_from(pcrs.len()).map_err(|_| KeystoreError::Config("too many PCRs".into()))?,
        );
        out.extend_from_slice(&pcrs);
        out.extend_from_slice(&make_tpm2b(&public)?);
        out.extend_from_slice(&make_tpm2b(created.out_private.value())?);
        Ok(out)
    }

    fn unseal_impl(&self, blob: &[u8]) -> Result<SecretBytes, KeystoreError> {
        let SealedBlob {
            pcrs,
            public,
            private,
        } = parse_sealed_blob(blob)?;
        let pcrs = pcrs.as_slice();

        let mut inner = self.lock()?;
        let srk = inner.srk;
        let session = inner.session;
        let obj = inner
            .ctx
            .execute_with_session(Some(session), |ctx| ctx.load(srk, private, public))
            .map_err(|e| load_error("load sealed object", e))?;
        let result = if pcrs.is_empty() {
            inner
                .ctx
                .execute_with_session(Some(session), |ctx| ctx.unseal(obj.into()))
                .map_err(tss("unseal"))
        } else {
            let selection = pcr_selection(pcrs)?;
            let param_encryption = inner.param_encryption;
            let psession =
                start_salted_session(&mut inner.ctx, srk, SessionType::Policy, param_encryption)?;
            let policy = PolicySession::try_from(psession).map_err(tss("policy session"))?;
            let r = inner
                .ctx
                .execute_without_session(|ctx| ctx.policy_pcr(policy, Digest::default(), selection))
                .and_then(|_| {
                    inner
                        .ctx
                        .execute_with_session(Some(psession), |ctx| ctx.unseal(obj.into()))
                })
                .map_err(|e| pcr_policy_error("unseal", pcrs, e));
            let _ = inner
                .ctx
                .flush_context(ObjectHandle::from(SessionHandle::from(psession)));
            r
        };
        let _ = inner.ctx.flush_context(obj.into());
        let data = result?;
        Ok(SecretBytes::from_slice(data.value()))
    }
}

/// Hooks that weaken the backend, for tests that must show the attack they defend against.
#[cfg(feature = "danger-test-hooks")]
pub mod danger {
    use super::*;

    /// Turn parameter encryption off for every later command of this keystore (its
    /// sessions stay salted). Only for the T5 bus-capture test, to prove that it can fail.
    pub fn disable_parameter_encryption(ks: &TpmKeystore) -> Result<(), KeystoreError> {
        let mut inner = ks.lock()?;
        inner.param_encryption = false;
        let session = inner.session;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(false)
            .with_encrypt(false)
            .build();
        inner
            .ctx
            .tr_sess_set_attributes(session, attrs, mask)
            .map_err(tss("set session attributes"))
    }
}

#[cfg(test)]
mod tests {
    use super::tcti_has_resource_manager;

    #[test]
    fn resource_manager_is_recognised_from_the_tcti() {
        for with_rm in [
            "device:/dev/tpmrm0",
            "device:/dev/tpmrm1",
            "tabrmd:",
            "tabrmd",
        ] {
            assert!(tcti_has_resource_manager(with_rm), "{with_rm}");
        }
        for without in [
            "device:/dev/tpm0",
            "device",
            "swtpm:host=127.0.0.1,port=2321",
            "mssim:host=localhost,port=2321",
        ] {
            assert!(!tcti_has_resource_manager(without), "{without}");
        }
    }
}
