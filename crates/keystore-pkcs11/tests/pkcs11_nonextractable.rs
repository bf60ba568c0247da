//! The keys made by `Pkcs11Keystore::create` cannot leave the token: read their attributes
//! back with an independent PKCS#11 session, try to read CKA_VALUE, to wrap them out, and to
//! relax the attributes. A deliberately extractable key made in the same session shows each
//! probe does work when the key allows it, so the checks can fail.
#![allow(clippy::unwrap_used)]

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use devid_keystore::Keystore;
use devid_keystore_pkcs11::Pkcs11Keystore;
use devid_testkit::softhsm::{SoftHsm, USER_PIN};

fn bool_attr(session: &Session, obj: ObjectHandle, ty: AttributeType) -> bool {
    let attrs = session.get_attributes(obj, &[ty]).unwrap();
    match attrs.as_slice() {
        [Attribute::Sensitive(v)]
        | [Attribute::Extractable(v)]
        | [Attribute::AlwaysSensitive(v)]
        | [Attribute::NeverExtractable(v)]
        | [Attribute::Token(v)]
        | [Attribute::Private(v)]
        | [Attribute::Sign(v)]
        | [Attribute::Encrypt(v)]
        | [Attribute::Decrypt(v)]
        | [Attribute::Wrap(v)]
        | [Attribute::Unwrap(v)] => *v,
        other => panic!("{ty:?}: unexpected {other:?}"),
    }
}

fn find(session: &Session, class: ObjectClass, id: &[u8]) -> ObjectHandle {
    let found = session
        .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
        .unwrap();
    assert_eq!(found.len(), 1, "{class}");
    found[0]
}

/// The probes every key of ours must fail: value unreadable, no export by wrapping, no way
/// to make it sensitive=false or extractable=true.
fn assert_unextractable(session: &Session, key: ObjectHandle, wrapping: ObjectHandle) {
    assert!(bool_attr(session, key, AttributeType::Sensitive));
    assert!(!bool_attr(session, key, AttributeType::Extractable));
    assert!(bool_attr(session, key, AttributeType::AlwaysSensitive));
    assert!(bool_attr(session, key, AttributeType::NeverExtractable));
    assert!(bool_attr(session, key, AttributeType::Token));
    assert!(bool_attr(session, key, AttributeType::Private));

    let info = session
        .get_attribute_info(key, &[AttributeType::Value])
        .unwrap();
    assert!(
        matches!(info.as_slice(), [AttributeInfo::Sensitive]),
        "CKA_VALUE must be refused as sensitive, got {info:?}"
    );
    assert!(session
        .get_attributes(key, &[AttributeType::Value])
        .unwrap()
        .is_empty());

    match session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, key) {
        Err(Error::Pkcs11(RvError::KeyUnextractable, _)) => {}
        Ok(_) => panic!("a non-extractable key was wrapped out"),
        Err(other) => panic!("wrapping failed for another reason than CKA_EXTRACTABLE: {other}"),
    }
    assert!(session
        .update_attributes(key, &[Attribute::Extractable(true)])
        .is_err());
    assert!(session
        .update_attributes(key, &[Attribute::Sensitive(false)])
        .is_err());
}

#[test]
fn device_key_and_wrap_key_cannot_leave_the_token() {
    let hsm = SoftHsm::new("devid-nx");
    hsm.install_process_env();
    let (ks, cfg) = Pkcs11Keystore::create(&hsm.module(), hsm.label(), hsm.pin_file()).unwrap();
    let public = ks.public_key();
    // Dropping the last keystore finalises the module, so this test's own context below is
    // the only one.
    drop(ks);

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
    let id = hex::decode(&cfg.key_id).unwrap();

    // A session key allowed to wrap, to try to export ours with.
    let wrapping = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
            ],
        )
        .unwrap();

    // Control: an extractable, non-sensitive session key is readable and wrappable, so the
    // probes in assert_unextractable really detect an exportable key.
    let loose = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ],
        )
        .unwrap();
    let value = session
        .get_attributes(loose, &[AttributeType::Value])
        .unwrap();
    assert!(matches!(value.as_slice(), [Attribute::Value(v)] if v.len() == 32));
    assert!(session
        .wrap_key(&Mechanism::AesKeyWrapPad, wrapping, loose)
        .is_ok());

    // The device private key.
    let private = find(&session, ObjectClass::PRIVATE_KEY, &id);
    assert!(bool_attr(&session, private, AttributeType::Sign));
    let key_type = session
        .get_attributes(private, &[AttributeType::KeyType])
        .unwrap();
    assert!(matches!(
        key_type.as_slice(),
        [Attribute::KeyType(KeyType::EC)]
    ));
    assert_unextractable(&session, private, wrapping);

    // The AES wrap key: encrypt/decrypt only.
    let wrap_key = find(&session, ObjectClass::SECRET_KEY, &id);
    assert!(bool_attr(&session, wrap_key, AttributeType::Encrypt));
    assert!(bool_attr(&session, wrap_key, AttributeType::Decrypt));
    assert!(!bool_attr(&session, wrap_key, AttributeType::Wrap));
    assert!(!bool_attr(&session, wrap_key, AttributeType::Unwrap));
    let len = session
        .get_attributes(wrap_key, &[AttributeType::ValueLen])
        .unwrap();
    assert!(
        matches!(len.as_slice(), [Attribute::ValueLen(l)] if u64::from(*l) == 32),
        "{len:?}"
    );
    assert_unextractable(&session, wrap_key, wrapping);
    // The wrap key cannot be used to export the device key either.
    assert!(session
        .wrap_key(&Mechanism::AesKeyWrapPad, wrap_key, private)
        .is_err());

    // The public half is public, and it is the key the keystore reported.
    let public_obj = find(&session, ObjectClass::PUBLIC_KEY, &id);
    assert!(!bool_attr(&session, public_obj, AttributeType::Private));
    drop(session);
    ctx.finalize().unwrap();

    // And the keystore still opens afterwards (the module is initialised again).
    let ks = Pkcs11Keystore::open(&cfg).unwrap();
    assert_eq!(ks.public_key(), public);
}
