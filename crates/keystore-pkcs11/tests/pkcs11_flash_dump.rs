//! THREATS.md T2 (flash dump) for the PKCS#11 backend, on SoftHSM.
//!
//! What holds, and is asserted:
//! * the sealed blob does not contain the data key (nor any 8-byte piece of it);
//! * no file of the token store contains the data key;
//! * no file of the token store or the state dir holds the wrap key in the clear: every
//!   32-byte window of every file is tried as the AES-256-GCM key of the blob, and none opens
//!   it. A control object (a non-private, extractable AES key with a known value, which
//!   SoftHSM stores unencrypted) shows that this scan does find a key stored in the clear.
//!
//! What does NOT hold for SoftHSM, and is asserted too so the docs stay honest: SoftHSM is a
//! software token. It encrypts private objects under a key derived from the user PIN, and the
//! PIN file sits on the same flash; a dump of the token dir plus the PIN file, loaded into
//! another SoftHSM, opens the keystore and unseals the blob (the copied token keeps its
//! serial, so the serial pin does not help either). A real secure element keeps the key
//! material in the chip, where no flash dump reaches it; SoftHSM stands in for one in tests
//! only (`Pkcs11Keystore::is_software_token`).
#![allow(clippy::unwrap_used)]

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use devid_keystore::Keystore;
use devid_keystore_pkcs11::{blob, Pkcs11Config, Pkcs11Keystore};
use devid_testkit::softhsm::{SoftHsm, USER_PIN};
use devid_testkit::{contains, copy_tree, read_tree};
use sha2::{Digest, Sha256};

/// Every 32-byte window of `files` that opens `sealed` as an AES-256-GCM key.
fn keys_that_open(files: &[(std::path::PathBuf, Vec<u8>)], sealed: &[u8]) -> Vec<String> {
    let iv: [u8; blob::IV_LEN] = sealed[blob::MAGIC.len()..blob::MAGIC.len() + blob::IV_LEN]
        .try_into()
        .unwrap();
    let nonce = Nonce::from(iv);
    let body = &sealed[blob::MAGIC.len() + blob::IV_LEN..];
    let mut hits = Vec::new();
    for (path, data) in files {
        for (offset, window) in data.windows(32).enumerate() {
            let cipher = Aes256Gcm::new_from_slice(window).unwrap();
            let opened = cipher.decrypt(
                &nonce,
                Payload {
                    msg: body,
                    aad: blob::MAGIC,
                },
            );
            if opened.is_ok() {
                hits.push(format!("{}@{offset}", path.display()));
            }
        }
    }
    hits
}

/// A blob in the keystore's format, sealed in software under `key`.
fn soft_seal(key: &[u8; 32], secret: &[u8]) -> Vec<u8> {
    let iv = [7u8; blob::IV_LEN];
    let sealed = Aes256Gcm::new_from_slice(key)
        .unwrap()
        .encrypt(
            &Nonce::from(iv),
            Payload {
                msg: secret,
                aad: blob::MAGIC,
            },
        )
        .unwrap();
    [blob::MAGIC.as_slice(), &iv, &sealed].concat()
}

#[test]
fn flash_dump_holds_neither_data_key_nor_wrap_key_in_the_clear() {
    let hsm = SoftHsm::new("devid-flash");
    hsm.install_process_env();
    let state = tempfile::tempdir().unwrap();

    let data_key: [u8; 32] = Sha256::digest(b"flash dump test: the vault data key").into();
    let (ks, cfg) = Pkcs11Keystore::create(&hsm.module(), hsm.label(), hsm.pin_file()).unwrap();
    let sealed = ks.seal(&data_key).unwrap();
    assert_eq!(ks.unseal(&sealed).unwrap().expose(), data_key);
    // What the vault keeps on flash.
    std::fs::write(
        state.path().join("keystore.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(state.path().join("datakey.sealed"), &sealed).unwrap();
    drop(ks); // module finalised: the token store on disk is complete

    // The blob: no trace of the data key.
    assert!(!contains(&sealed, &data_key));
    for piece in data_key.chunks(8) {
        assert!(
            !contains(&sealed, piece),
            "a piece of the data key is in the blob"
        );
    }

    // The token store and the state dir: no data key, and no wrap key that opens the blob.
    let token_files = read_tree(&hsm.token_dir());
    assert!(
        token_files.len() >= 4,
        "token.object + 3 key objects expected"
    );
    for (path, data) in &token_files {
        assert!(!contains(data, &data_key), "data key in {}", path.display());
    }
    let mut dump = token_files.clone();
    dump.extend(read_tree(state.path()));
    assert_eq!(keys_that_open(&dump, &sealed), Vec::<String>::new());

    // Control: a key SoftHSM stores in the clear (non-private, extractable) is found by the
    // same scan, so the scan above could have failed.
    let control_key: [u8; 32] = Sha256::digest(b"control key stored in the clear").into();
    {
        let ctx = Pkcs11::new(hsm.module()).unwrap();
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        let slot = ctx
            .get_slots_with_initialized_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().serial_number().trim() == cfg.token_serial)
            .unwrap();
        let session = ctx.open_rw_session(slot).unwrap();
        session
            .login(UserType::User, Some(&AuthPin::from(USER_PIN)))
            .unwrap();
        session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Encrypt(true),
                Attribute::Value(control_key.to_vec()),
                Attribute::Label(b"control-cleartext".to_vec()),
            ])
            .unwrap();
        drop(session);
        ctx.finalize().unwrap();
    }
    let control_blob = soft_seal(&control_key, b"control secret");
    let token_files = read_tree(&hsm.token_dir());
    let hits = keys_that_open(&token_files, &control_blob);
    assert_eq!(hits.len(), 1, "control key not found by the scan: {hits:?}");
    // ... while the real wrap key still is not.
    assert_eq!(keys_that_open(&token_files, &sealed), Vec::<String>::new());

    // The SoftHSM limit: the token dir and the PIN file, copied into another SoftHSM, open the
    // keystore and unseal the blob. Asserted so this stays documented truth.
    let thief = tempfile::tempdir().unwrap();
    copy_tree(&hsm.token_dir(), &thief.path().join("tokens"));
    let conf = thief.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\n",
            thief.path().join("tokens").display()
        ),
    )
    .unwrap();
    let pin_copy = thief.path().join("user.pin");
    std::fs::copy(hsm.pin_file(), &pin_copy).unwrap();
    std::env::set_var("SOFTHSM2_CONF", &conf); // every keystore is dropped: the next open re-reads it
    let stolen: Pkcs11Config =
        serde_json::from_slice(&std::fs::read(state.path().join("keystore.json")).unwrap())
            .unwrap();
    let stolen = Pkcs11Config {
        pin_file: pin_copy,
        ..stolen
    };
    let ks = Pkcs11Keystore::open(&stolen).unwrap();
    assert!(ks.is_software_token());
    assert_eq!(ks.unseal(&sealed).unwrap().expose(), data_key);
    drop(ks);

    // Without the right PIN the copied store stays shut.
    let wrong_pin = thief.path().join("wrong.pin");
    std::fs::write(&wrong_pin, "0000\n").unwrap();
    let err = Pkcs11Keystore::open(&Pkcs11Config {
        pin_file: wrong_pin,
        ..stolen
    })
    .unwrap_err();
    assert!(err.to_string().contains("refused the PIN"), "{err}");
}
