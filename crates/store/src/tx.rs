//! The registry's transactions, written once for every backend.
//!
//! A backend implements [`RegistryTx`]: a handful of primitives over ONE open database
//! transaction (read a token and lock its row, lock a device, read a device, write the rows,
//! append an audit row, commit). The scripts below decide what happens, in what order, and
//! what the audit row says, with [`crate::rules`] answering who is refused. So the SQLite and
//! PostgreSQL backends cannot drift apart on a check, its order or its audit trail: they
//! only differ in how they lock (SQLite: `BEGIN IMMEDIATE` holds the database's write lock;
//! PostgreSQL: `SELECT ... FOR UPDATE` on the token and an advisory lock per device).
//!
//! Dropping a transaction without [`RegistryTx::commit`] rolls it back: an error anywhere in a
//! script stores nothing.

use devid_proto::{DeviceId, DeviceState};

use crate::rules::{self, TokenRow};
use crate::{
    AdminCredential, Attestation, AuditCtx, DeviceRecord, EnrollAttempt, IssueFn, IssuedCert,
    NewAudit, NewToken, Outcome, Refusal, RenewAttempt, Role, StoreError,
};

/// One open transaction of a backend. Every method runs inside it.
pub trait RegistryTx: Sized {
    /// Serialise every change to device `id` until this transaction ends (across nodes where
    /// the database is shared). A backend whose transaction already excludes every other
    /// writer (SQLite's `BEGIN IMMEDIATE`) does nothing.
    fn lock_device(&mut self, id: &DeviceId) -> Result<(), StoreError>;

    /// The device row, as this transaction sees it.
    fn device(&mut self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;

    /// The token with this hash, its row locked against concurrent consumption.
    fn token_for_update(&mut self, hash: &str) -> Result<Option<TokenRow>, StoreError>;

    /// Mark the token used by `used_by` if it is still unused and unexpired at `now_ms`
    /// (`UPDATE ... WHERE used_at IS NULL AND expires_at > now`). False when it was not.
    fn consume_token(
        &mut self,
        hash: &str,
        used_by: &DeviceId,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Store a new enrolment token.
    fn insert_token(&mut self, token: &NewToken, now_ms: i64) -> Result<(), StoreError>;

    /// Insert the device as active, or update an active one (re-enrolment) with the new
    /// certificate, key and policy, keeping no predecessor (every older certificate is dead).
    /// Returns the rows written (1, or 0 if the row is no longer active).
    fn write_enrolled(
        &mut self,
        id: &DeviceId,
        cert: &IssuedCert,
        key_fingerprint: &str,
        policy: &str,
        reported_backend: Option<&str>,
        now_ms: i64,
    ) -> Result<u64, StoreError>;

    /// Record a renewal of an active device: the new certificate and key, and the certificate
    /// kept as its predecessor until first use. Returns the rows written (1, or 0).
    fn write_renewed(
        &mut self,
        id: &DeviceId,
        cert: &IssuedCert,
        key_fingerprint: &str,
        predecessor: Option<&(String, String)>,
        now_ms: i64,
    ) -> Result<u64, StoreError>;

    /// Set the device's state; a shared database also announces the change to the other
    /// nodes in this transaction (delivered if and only if it commits).
    fn write_state(&mut self, id: &DeviceId, target: DeviceState) -> Result<(), StoreError>;

    /// Append an audit row.
    fn insert_audit(&mut self, row: &NewAudit<'_>) -> Result<(), StoreError>;

    /// Every admin credential (revoked ones too), the table locked against concurrent changes.
    fn credentials_for_update(&mut self) -> Result<Vec<AdminCredential>, StoreError>;

    /// Store a new credential.
    fn insert_credential(
        &mut self,
        name: &str,
        role: Role,
        hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Mark a credential revoked.
    fn revoke_credential(&mut self, name: &str, now_ms: i64) -> Result<(), StoreError>;

    /// The device's registered attestation.
    fn attestation(&mut self, id: &DeviceId) -> Result<Option<Attestation>, StoreError>;

    /// The device the endorsement key with this fingerprint is registered to.
    fn device_with_ek(&mut self, ek_fingerprint: &str) -> Result<Option<String>, StoreError>;

    /// Record (insert or replace) the device's attestation.
    fn write_attestation(
        &mut self,
        id: &DeviceId,
        attestation: &Attestation,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Forget the device's attestation; the rows removed (0 or 1).
    fn delete_attestation(&mut self, id: &DeviceId) -> Result<u64, StoreError>;

    /// Commit.
    fn commit(self) -> Result<(), StoreError>;
}

/// A refusal found before anything was written: its audit row is the transaction's only
/// write, then commit.
fn refuse<T, X: RegistryTx>(
    mut tx: X,
    ctx: &AuditCtx,
    action: &str,
    device: Option<&str>,
    why: Refusal,
) -> Outcome<T> {
    tx.insert_audit(&NewAudit {
        ctx,
        device_id: device,
        action,
        outcome: "refused",
        detail: why.code(),
    })?;
    tx.commit()?;
    Ok(Err(why))
}

fn changed_meanwhile(what: &str) -> StoreError {
    // Cannot happen under the device lock; never hand out a certificate unrecorded.
    StoreError::Corrupt {
        what: "device",
        detail: format!("the device row changed during the {what}; nothing was stored"),
    }
}

/// Create an enrolment token and audit it.
pub fn create_token<X: RegistryTx>(
    mut tx: X,
    token: &NewToken,
    ctx: &AuditCtx,
) -> Result<(), StoreError> {
    tx.insert_token(token, ctx.now_ms)?;
    let detail = rules::token_detail(token);
    tx.insert_audit(&NewAudit {
        ctx,
        device_id: token.device_id.as_ref().map(|d| d.as_str()),
        action: "token.create",
        outcome: "ok",
        detail: &detail,
    })?;
    tx.commit()
}

/// Enrol (see [`crate::Registry::enroll`]). Refusals in this order: the token (unknown, used,
/// expired, bound to another id), then the device's state, then a token consumed meanwhile.
pub fn enroll<X: RegistryTx>(
    mut tx: X,
    a: &EnrollAttempt<'_>,
    issue: IssueFn<'_>,
) -> Outcome<(DeviceRecord, IssuedCert)> {
    let now = a.ctx.now_ms;
    // A concurrent enrolment with the same token waits here and then sees it used.
    let token = tx.token_for_update(a.token_hash)?;
    let token = match rules::check_token(token, a.requested_id, now)? {
        Ok(u) => u,
        Err((why, dev)) => return refuse(tx, a.ctx, "enroll", dev.as_deref(), why),
    };
    let id = token.id.clone();
    tx.lock_device(&id)?;
    let existing = tx.device(&id)?;
    if let Some(r) = rules::enroll_refusal(existing.as_ref().map(|d| d.state), token.bound) {
        return refuse(tx, a.ctx, "enroll", Some(id.as_str()), r);
    }
    let registered = tx.attestation(&id)?;
    let ek_owner = match a.attestation {
        Some(p) => tx.device_with_ek(&p.ek_fingerprint)?,
        None => None,
    };
    if let Some(r) = rules::enroll_attestation_refusal(
        &id,
        &token,
        registered.as_ref(),
        a.attestation,
        ek_owner.as_deref(),
    ) {
        return refuse(tx, a.ctx, "enroll", Some(id.as_str()), r);
    }
    let policy = token.policy;
    if !tx.consume_token(a.token_hash, &id, now)? {
        return refuse(tx, a.ctx, "enroll", Some(id.as_str()), Refusal::TokenUsed);
    }
    let cert = issue(&id)?;
    let reported = a
        .reported_backend
        .filter(|b| crate::REPORTED_BACKENDS.contains(b));
    if tx.write_enrolled(&id, &cert, a.key_fingerprint, &policy, reported, now)? != 1 {
        return Err(changed_meanwhile("enrolment"));
    }
    if let Some(att) = a.attestation {
        tx.write_attestation(&id, att, now)?;
    }
    let detail = rules::enroll_detail(
        &cert,
        &policy,
        a.key_fingerprint,
        a.attestation,
        existing.is_some(),
    );
    tx.insert_audit(&NewAudit {
        ctx: a.ctx,
        device_id: Some(id.as_str()),
        action: "enroll",
        outcome: "ok",
        detail: &detail,
    })?;
    let record = tx
        .device(&id)?
        .ok_or_else(|| rules::row_missing("insert"))?;
    tx.commit()?;
    Ok(Ok((record, cert)))
}

/// Renew (see [`crate::Registry::renew`]). Refusals in this order: the device's state, a
/// certificate that is neither current nor the kept predecessor, a key change the policy
/// refuses. Each refusal changes nothing but the audit log.
pub fn renew<X: RegistryTx>(
    mut tx: X,
    a: &RenewAttempt<'_>,
    issue: IssueFn<'_>,
) -> Outcome<(DeviceRecord, IssuedCert)> {
    let id = a.id;
    tx.lock_device(id)?;
    let device = tx.device(id)?;
    if let Some(r) = rules::renew_refusal(device.as_ref().map(|d| d.state)) {
        return refuse(tx, a.ctx, "renew", Some(id.as_str()), r);
    }
    let Some(device) = device else {
        return refuse(
            tx,
            a.ctx,
            "renew",
            Some(id.as_str()),
            Refusal::DeviceUnknown,
        );
    };
    let presented = match rules::presented_cert(&device, a.presented) {
        Ok(p) => p,
        Err(r) => return refuse(tx, a.ctx, "renew", Some(id.as_str()), r),
    };
    if let Some(r) = rules::key_change_refusal(
        &a.presented.key_fingerprint,
        a.key_fingerprint,
        a.key_change,
        a.attestation.is_some(),
    ) {
        return refuse(tx, a.ctx, "renew", Some(id.as_str()), r);
    }
    let registered = tx.attestation(id)?;
    let ek_owner = match a.attestation {
        Some(p) => tx.device_with_ek(&p.ek_fingerprint)?,
        None => None,
    };
    if let Some(r) = rules::renew_attestation_refusal(
        id,
        a.presented.key_fingerprint != a.key_fingerprint,
        registered.as_ref(),
        a.attestation,
        ek_owner.as_deref(),
    ) {
        return refuse(tx, a.ctx, "renew", Some(id.as_str()), r);
    }
    // The predecessor after this renewal: the presented certificate when it was the current
    // one; the same predecessor when the device retries with it (the certificate issued in
    // between was never used, and this one replaces it).
    let predecessor = match presented {
        rules::Presented::Current => (device.cert_serial.clone(), device.key_fingerprint.clone()),
        rules::Presented::Predecessor => (
            a.presented.serial_hex.clone(),
            a.presented.key_fingerprint.clone(),
        ),
    };
    let cert = issue(id)?;
    if tx.write_renewed(
        id,
        &cert,
        a.key_fingerprint,
        Some(&predecessor),
        a.ctx.now_ms,
    )? != 1
    {
        return Err(changed_meanwhile("renewal"));
    }
    if let Some(att) = a.attestation {
        tx.write_attestation(id, att, a.ctx.now_ms)?;
    }
    let key_changed = a.presented.key_fingerprint != a.key_fingerprint;
    let mut detail = rules::renew_detail(&cert, a.key_fingerprint, key_changed, presented);
    detail.push_str(&rules::assurance_detail(a.attestation));
    tx.insert_audit(&NewAudit {
        ctx: a.ctx,
        device_id: Some(id.as_str()),
        action: if key_changed {
            "renew.key_change"
        } else {
            "renew"
        },
        outcome: "ok",
        detail: &detail,
    })?;
    let record = tx.device(id)?.ok_or_else(|| rules::row_missing("update"))?;
    tx.commit()?;
    Ok(Ok((record, cert)))
}

/// Change a device's state (see [`crate::Registry::set_state`]).
pub fn set_state<X: RegistryTx>(
    mut tx: X,
    id: &DeviceId,
    target: DeviceState,
    ctx: &AuditCtx,
) -> Outcome<DeviceRecord> {
    let action = rules::state_action(target);
    tx.lock_device(id)?;
    let state = tx.device(id)?.map(|d| d.state);
    let current = match rules::state_change(state, target) {
        Ok(c) => c,
        Err(r) => return refuse(tx, ctx, action, Some(id.as_str()), r),
    };
    tx.write_state(id, target)?;
    let detail = rules::state_detail(current, target);
    tx.insert_audit(&NewAudit {
        ctx,
        device_id: Some(id.as_str()),
        action,
        outcome: "ok",
        detail: &detail,
    })?;
    let record = tx.device(id)?.ok_or_else(|| rules::row_missing("update"))?;
    tx.commit()?;
    Ok(Ok(record))
}

/// Forget a device's attestation (see [`crate::Registry::reset_attestation`]): refused for
/// an unknown device; audited either way.
pub fn reset_attestation<X: RegistryTx>(mut tx: X, id: &DeviceId, ctx: &AuditCtx) -> Outcome<()> {
    let action = "device.reset_attestation";
    tx.lock_device(id)?;
    if tx.device(id)?.is_none() {
        return refuse(tx, ctx, action, Some(id.as_str()), Refusal::DeviceUnknown);
    }
    let removed = tx.delete_attestation(id)?;
    let detail = if removed == 1 {
        "attestation forgotten"
    } else {
        "no attestation was registered"
    };
    tx.insert_audit(&NewAudit {
        ctx,
        device_id: Some(id.as_str()),
        action,
        outcome: "ok",
        detail,
    })?;
    tx.commit()?;
    Ok(Ok(()))
}

/// Add a named admin credential (see [`crate::Registry::add_admin_credential`]).
pub fn add_credential<X: RegistryTx>(
    mut tx: X,
    name: &str,
    role: Role,
    hash: &str,
    ctx: &AuditCtx,
) -> Outcome<()> {
    if tx.credentials_for_update()?.iter().any(|c| c.name == name) {
        return refuse(
            tx,
            ctx,
            "credential.create",
            None,
            Refusal::CredentialExists,
        );
    }
    tx.insert_credential(name, role, hash, ctx.now_ms)?;
    let detail = format!("name={name} role={}", role.as_str());
    tx.insert_audit(&NewAudit {
        ctx,
        device_id: None,
        action: "credential.create",
        outcome: "ok",
        detail: &detail,
    })?;
    tx.commit()?;
    Ok(Ok(()))
}

/// Revoke a named admin credential (see [`crate::Registry::revoke_admin_credential`]).
pub fn revoke_credential<X: RegistryTx>(mut tx: X, name: &str, ctx: &AuditCtx) -> Outcome<()> {
    let all = tx.credentials_for_update()?;
    let live = |c: &&AdminCredential| c.revoked_at_ms.is_none();
    let Some(target) = all.iter().filter(live).find(|c| c.name == name) else {
        return refuse(
            tx,
            ctx,
            "credential.revoke",
            None,
            Refusal::CredentialUnknown,
        );
    };
    let admins = all
        .iter()
        .filter(live)
        .filter(|c| c.role == Role::Admin)
        .count();
    if target.role == Role::Admin && admins <= 1 {
        return refuse(
            tx,
            ctx,
            "credential.revoke",
            None,
            Refusal::LastAdminCredential,
        );
    }
    tx.revoke_credential(name, ctx.now_ms)?;
    let detail = format!("name={name}");
    tx.insert_audit(&NewAudit {
        ctx,
        device_id: None,
        action: "credential.revoke",
        outcome: "ok",
        detail: &detail,
    })?;
    tx.commit()?;
    Ok(Ok(()))
}
