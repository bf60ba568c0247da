//! What the console's forms post: login, logout, device state changes, enrolment tokens.
//! Each change passes [`super::user::check_csrf`] and then the admin API's own handler, so the role
//! check, the audit row (`admin:<name>`) and the cut of live sessions are the same.

use axum::body::Bytes;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use devid_proto::DeviceState;
use devid_stdx::now_ms;
use devid_store::{token, AuditCtx, NewAudit};
use serde::Deserialize;

use super::html::{esc, layout, layout_status, problem, url_enc, Page};
use super::session::{cookie_value, ABSOLUTE, COOKIE};
use super::user::{check_csrf, same_origin, ConsoleUser};
use crate::request::{audit_refusal, blocking};
use crate::state::{HttpState, PeerInfo};

/// `GET /console/login`.
pub(crate) async fn login_page() -> Response {
    login_form(StatusCode::OK, None)
}

fn login_form(status: StatusCode, message: Option<&str>) -> Response {
    let body = format!(
        "<section class=\"card login\"><h1>Sign in</h1>{}\
         <form method=\"post\" action=\"/console/login\" id=\"login\">\
         <label>Admin credential <input type=\"password\" name=\"token\" id=\"token\" \
         autocomplete=\"current-password\" required></label>\
         <p class=\"hint\">The bearer secret of a named admin credential (<code>admin.token</code> \
         in the data dir, or one made with <code>devid-server credential create</code>). \
         Read-only credentials can look and change nothing.</p>\
         <button type=\"submit\" id=\"sign-in\">Sign in</button></form></section>",
        message
            .map(|m| format!("<p class=\"problem\" id=\"login-error\">{}</p>", esc(m)))
            .unwrap_or_default()
    );
    layout_status(status, "Sign in", Page::Login, None, &body)
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    token: Option<String>,
}

/// `POST /console/login`: a named credential's secret opens a session.
pub(crate) async fn login(
    State(state): State<HttpState>,
    peer: Option<Extension<PeerInfo>>,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let addr = peer.as_ref().and_then(|p| p.addr);
    let ip = addr
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let ctx = AuditCtx {
        actor: "anonymous".into(),
        source: addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into()),
        now_ms: now_ms(),
    };
    // login CSRF: only the console's own login form may sign a browser in
    if !same_origin(&headers, &uri) {
        if let Err(e) = audit_refusal(&state, ctx, "console.login", None, "cross_origin").await {
            return e.into_response();
        }
        return login_form(
            StatusCode::FORBIDDEN,
            Some("refused: the login did not come from this console's page"),
        );
    }
    if let Err(wait) = state.limits.admin_failures.would_allow(&ip) {
        if let Err(e) = audit_refusal(&state, ctx, "console.login", None, "rate_limited").await {
            return e.into_response();
        }
        let mut r = login_form(
            StatusCode::TOO_MANY_REQUESTS,
            Some("too many failed sign-ins from this address; wait and try again"),
        );
        if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let presented = form
        .ok()
        .and_then(|Form(f)| f.token)
        .map(zeroize::Zeroizing::new)
        .filter(|t| token::well_formed(t))
        .map(|t| token::hash(&t));
    let found = match presented.clone() {
        Some(hash) => {
            let store = state.registry.clone();
            match blocking(move || store.admin_credential(&hash)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return crate::ApiError::from(e).into_response(),
                Err(e) => return e.into_response(),
            }
        }
        None => None,
    };
    let (Some(credential), Some(hash)) = (found, presented) else {
        let _ = state.limits.admin_failures.check(&ip);
        tracing::warn!(source = %ctx.source, "console sign-in with an unknown credential");
        if let Err(e) =
            audit_refusal(&state, ctx, "console.login", None, "admin_unauthorized").await
        {
            return e.into_response();
        }
        return login_form(
            StatusCode::UNAUTHORIZED,
            Some("unknown or revoked credential"),
        );
    };
    let (cookie, _csrf) = state.console.create(hash);
    let mut ok_ctx = ctx;
    ok_ctx.actor = format!("admin:{}", credential.name);
    let store = state.registry.clone();
    let role = credential.role.as_str();
    let audited = blocking(move || {
        store.append_audit(&NewAudit {
            ctx: &ok_ctx,
            device_id: None,
            action: "console.login",
            outcome: "ok",
            detail: role,
        })
    })
    .await;
    match audited {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return crate::ApiError::from(e).into_response(),
        Err(e) => return e.into_response(),
    }
    tracing::info!(name = %credential.name, role, "console sign-in");
    let mut resp = Redirect::to("/console/devices").into_response();
    let value = format!(
        "{COOKIE}={cookie}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        ABSOLUTE.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// Fields of every change form.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct ChangeForm {
    csrf: Option<String>,
    confirm: Option<String>,
    device_id: Option<String>,
    ttl: Option<u64>,
}

fn form_of(form: Result<Form<ChangeForm>, FormRejection>) -> ChangeForm {
    form.map(|Form(f)| f).unwrap_or_default()
}

/// `POST /console/logout`.
pub(crate) async fn logout(
    user: ConsoleUser,
    State(state): State<HttpState>,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<ChangeForm>, FormRejection>,
) -> Response {
    let f = form_of(form);
    if let Err(r) = check_csrf(
        &state,
        &user,
        &headers,
        &uri,
        f.csrf.as_deref(),
        "console.logout",
    )
    .await
    {
        return r;
    }
    if let Some(c) = cookie_value(&headers) {
        state.console.remove(&c);
    }
    let store = state.registry.clone();
    let ctx = user.ctx.clone();
    let _ = blocking(move || {
        store.append_audit(&NewAudit {
            ctx: &ctx,
            device_id: None,
            action: "console.logout",
            outcome: "ok",
            detail: "",
        })
    })
    .await;
    let mut resp = Redirect::to("/console/login").into_response();
    let value = format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// `POST /console/devices/{id}/{suspend|resume|revoke}` (after the confirmation page).
pub(crate) async fn change(
    user: ConsoleUser,
    State(state): State<HttpState>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<ChangeForm>, FormRejection>,
) -> Response {
    let f = form_of(form);
    let target = match action.as_str() {
        "suspend" => DeviceState::Suspended,
        "resume" => DeviceState::Active,
        "revoke" => DeviceState::Revoked,
        _ => return problem(StatusCode::NOT_FOUND, Some(&user), "no such action"),
    };
    let audit_action = devid_store::state_action(target);
    if let Err(r) = check_csrf(
        &state,
        &user,
        &headers,
        &uri,
        f.csrf.as_deref(),
        audit_action,
    )
    .await
    {
        return r;
    }
    if f.confirm.as_deref() != Some("yes") {
        return problem(
            StatusCode::BAD_REQUEST,
            Some(&user),
            "not confirmed: use the confirmation page",
        );
    }
    match crate::admin::change_state(user.admin(), state, id.clone(), target).await {
        Ok(_) => Redirect::to(&format!("/console/devices/{}", url_enc(&id))).into_response(),
        Err(e) => problem(e.status, Some(&user), &e.message),
    }
}

/// `POST /console/tokens`: an enrolment token, shown once with the command to paste.
pub(crate) async fn create_token(
    user: ConsoleUser,
    State(state): State<HttpState>,
    headers: HeaderMap,
    uri: Uri,
    form: Result<Form<ChangeForm>, FormRejection>,
) -> Response {
    let f = form_of(form);
    if let Err(r) = check_csrf(
        &state,
        &user,
        &headers,
        &uri,
        f.csrf.as_deref(),
        "token.create",
    )
    .await
    {
        return r;
    }
    let device_id = f
        .device_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let req = serde_json::json!({
        "device_id": device_id,
        "ttl_seconds": f.ttl.unwrap_or(3600),
    });
    let body = Bytes::from(req.to_string());
    let created =
        match crate::admin::create_token(user.admin(), State(state.clone()), Ok(body)).await {
            Ok((_, axum::Json(t))) => t,
            Err(e) => return problem(e.status, Some(&user), &e.message),
        };
    let server = format!(
        "https://{}:{}",
        state.config.hostname,
        state.config.https_listen.port()
    );
    let mut command = format!(
        "printf %s {} | devid enroll --server {} --ca-pin {}",
        created.token,
        server,
        state.ca.pin()
    );
    if let Some(id) = &created.device_id {
        command.push_str(&format!(" --device-id {id}"));
    }
    command.push_str(" --token -");
    let body = format!(
        "<h1>Enrolment token created</h1><section class=\"card wide\">\
         <p><b>Shown once.</b> The server keeps only its SHA-256; copy it now.</p><dl>\
         <dt>Token</dt><dd class=\"mono\" id=\"new-token\">{}</dd>\
         <dt>Bound to device</dt><dd>{}</dd><dt>Expires</dt><dd>{}</dd></dl>\
         <p>On the device, run:</p><pre id=\"enroll-command\">{}</pre>\
         <p><a href=\"/console/devices\">Back to the devices</a></p></section>",
        esc(&created.token),
        created
            .device_id
            .as_deref()
            .map(esc)
            .unwrap_or_else(|| "any id (the device chooses)".to_owned()),
        esc(&created.expires_at),
        esc(&command),
    );
    zeroize::Zeroize::zeroize(&mut command);
    layout("Token created", Page::Other, Some(&user), &body)
}
