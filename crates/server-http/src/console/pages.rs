//! The console's pages: devices, one device, the confirmation step, the fleet overview, and
//! the data the script fetches (messages, the live stream, the overview's counters).

// The helpers answer a refusal with the page itself (`Result<_, Response>`), as the handlers
// do; a boxed response would only add an allocation per refusal.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use devid_proto::{DeviceId, DeviceState};
use devid_stdx::{now_ms, rfc3339};
use devid_store::{DeviceQuery, DeviceRecord, DeviceSort, Role, ASSURANCE_NONE};
use futures_util::stream::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::html::{esc, layout, problem, url_enc, Page};
use super::session::cookie_value;
use super::user::ConsoleUser;
use crate::messages::{view_live, view_stored};
use crate::request::blocking;
use crate::state::HttpState;

/// Rows per page of the device table.
pub(crate) const PAGE_SIZE: u32 = 50;

/// Query of `GET /console/devices`.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct DevicesQuery {
    state: Option<String>,
    assurance: Option<String>,
    backend: Option<String>,
    q: Option<String>,
    sort: Option<String>,
    dir: Option<String>,
    page: Option<u64>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn backend_label(b: Option<&str>) -> &'static str {
    match b {
        Some("tpm") => "TPM",
        Some("pkcs11") => "PKCS#11",
        Some("soft") => "software",
        _ => "not reported",
    }
}

/// The reported backend with its label (nothing to label when nothing was reported).
fn reported(b: Option<&str>) -> String {
    match b {
        Some(_) => format!("{} <small>(reported)</small>", backend_label(b)),
        None => backend_label(b).to_owned(),
    }
}

/// A time for a table cell: `2026-12-02 01:38:11Z`.
pub(crate) fn when(ms: i64) -> String {
    let s = rfc3339(ms);
    let t = s.replacen('T', " ", 1);
    match t.split_once('.') {
        Some((head, _)) => format!("{head}Z"),
        None => t,
    }
}

fn state_class(s: DeviceState) -> &'static str {
    match s {
        DeviceState::Active => "st-active",
        DeviceState::Suspended => "st-suspended",
        DeviceState::Revoked => "st-revoked",
    }
}

/// `GET /console/devices`.
pub(crate) async fn devices(
    user: ConsoleUser,
    State(state): State<HttpState>,
    query: Result<Query<DevicesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return problem(StatusCode::BAD_REQUEST, Some(&user), "invalid filter");
    };
    let dstate = match nonempty(&q.state).map(str::parse::<DeviceState>) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => {
            return problem(StatusCode::BAD_REQUEST, Some(&user), "unknown state filter")
        }
    };
    let sort = nonempty(&q.sort)
        .and_then(DeviceSort::parse)
        .unwrap_or_default();
    let descending = nonempty(&q.dir) == Some("desc");
    let page = q.page.unwrap_or(1).clamp(1, 1_000_000);
    let query = DeviceQuery {
        state: dstate,
        assurance: nonempty(&q.assurance).map(str::to_owned),
        reported_backend: nonempty(&q.backend).map(str::to_owned),
        id_prefix: nonempty(&q.q).map(str::to_owned),
        sort,
        descending,
        offset: (page - 1) * u64::from(PAGE_SIZE),
        limit: PAGE_SIZE,
    };
    let store = state.registry.clone();
    let qq = query.clone();
    let result = match blocking(move || store.device_page(&qq)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return crate::ApiError::from(e).into_response(),
        Err(e) => return e.into_response(),
    };
    // the filter and sort as query-string pairs, to build links that keep them
    let mut keep: Vec<(&str, String)> = Vec::new();
    for (k, v) in [
        ("state", nonempty(&q.state)),
        ("assurance", nonempty(&q.assurance)),
        ("backend", nonempty(&q.backend)),
        ("q", nonempty(&q.q)),
    ] {
        if let Some(v) = v {
            keep.push((k, v.to_owned()));
        }
    }
    let link = |extra: &[(&str, String)]| {
        let mut s = String::from("/console/devices?");
        for (i, (k, v)) in keep.iter().chain(extra.iter()).enumerate() {
            if i > 0 {
                s.push('&');
            }
            let _ = write!(s, "{k}={}", url_enc(v));
        }
        esc(&s)
    };
    let sort_link = |key: DeviceSort, label: &str| {
        let dir = if key == sort && !descending {
            "desc"
        } else {
            "asc"
        };
        let mark = if key == sort {
            if descending {
                " ▼"
            } else {
                " ▲"
            }
        } else {
            ""
        };
        format!(
            "<a href=\"{}\" data-sort=\"{}\">{label}{mark}</a>",
            link(&[("sort", key.as_str().into()), ("dir", dir.into())]),
            key.as_str()
        )
    };
    let select = |name: &str, current: Option<&str>, options: &[(&str, &str)]| {
        let mut s =
            format!("<select name=\"{name}\" id=\"f-{name}\"><option value=\"\">any</option>");
        for (v, label) in options {
            let sel = if current == Some(*v) { " selected" } else { "" };
            let _ = write!(s, "<option value=\"{v}\"{sel}>{label}</option>");
        }
        s.push_str("</select>");
        s
    };
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Devices</h1>\
         <form method=\"get\" action=\"/console/devices\" class=\"filters\" id=\"filters\">\
         <label>Search id <input type=\"search\" name=\"q\" id=\"f-q\" value=\"{}\" \
         placeholder=\"id starts with\"></label>\
         <label>State {}</label><label>Assurance (verified) {}</label>\
         <label>Backend (reported) {}</label>\
         <input type=\"hidden\" name=\"sort\" value=\"{}\">\
         <input type=\"hidden\" name=\"dir\" value=\"{}\">\
         <button type=\"submit\" id=\"f-apply\">Apply</button></form>",
        esc(nonempty(&q.q).unwrap_or("")),
        select(
            "state",
            nonempty(&q.state),
            &[
                ("active", "active"),
                ("suspended", "suspended"),
                ("revoked", "revoked")
            ]
        ),
        select(
            "assurance",
            nonempty(&q.assurance),
            &[
                ("ek-cert", "TPM attested (EK certificate)"),
                ("ek-allowlist", "TPM attested (EK allow-list)"),
                ("none", "none")
            ]
        ),
        select(
            "backend",
            nonempty(&q.backend),
            &[("tpm", "TPM"), ("pkcs11", "PKCS#11"), ("soft", "software")]
        ),
        sort.as_str(),
        if descending { "desc" } else { "asc" },
    );
    let first = query.offset + 1;
    let last = query.offset + result.devices.len() as u64;
    let _ = write!(
        body,
        "<p class=\"count\" id=\"count\">{} devices match{}</p>",
        result.total,
        if result.devices.is_empty() {
            String::new()
        } else {
            format!("; showing {first}–{last}")
        }
    );
    let _ = write!(
        body,
        "<table id=\"devices\" class=\"grid\"><thead><tr><th>{}</th><th>{}</th>\
         <th>Assurance <small>(verified)</small></th><th>Backend <small>(reported)</small></th>\
         <th>Certificate serial</th><th>{}</th><th>{}</th><th>Connected now</th></tr></thead>\
         <tbody>",
        sort_link(DeviceSort::Id, "Device id"),
        sort_link(DeviceSort::State, "State"),
        sort_link(DeviceSort::CertNotAfter, "Certificate expiry"),
        sort_link(DeviceSort::LastSeen, "Last seen"),
    );
    for (d, a) in result.devices.iter().zip(&result.assurance) {
        row(&mut body, &state, d, a);
    }
    body.push_str("</tbody></table>");
    let pages = result.total.div_ceil(u64::from(PAGE_SIZE)).max(1);
    let mut extra = vec![
        ("sort", sort.as_str().to_owned()),
        ("dir", if descending { "desc" } else { "asc" }.to_owned()),
    ];
    body.push_str("<p class=\"pager\">");
    if page > 1 {
        extra.push(("page", (page - 1).to_string()));
        let _ = write!(
            body,
            "<a href=\"{}\" id=\"prev\">← previous</a> ",
            link(&extra)
        );
        extra.pop();
    }
    let _ = write!(body, "page {page} of {pages}");
    if page < pages {
        extra.push(("page", (page + 1).to_string()));
        let _ = write!(body, " <a href=\"{}\" id=\"next\">next →</a>", link(&extra));
    }
    body.push_str("</p>");
    body.push_str(&token_form(&user, None));
    layout("Devices", Page::Devices, Some(&user), &body)
}

/// How the console names a verified assurance level.
fn assurance_label(level: &str) -> String {
    match level {
        "ek-cert" => "TPM attested (EK certificate)".to_owned(),
        "ek-allowlist" => "TPM attested (EK allow-list)".to_owned(),
        other => other.to_owned(),
    }
}

fn row(body: &mut String, state: &HttpState, d: &DeviceRecord, assurance: &str) {
    let id = d.id.as_str();
    let connected = state.presence.connected(id);
    let _ = write!(
        body,
        "<tr data-id=\"{}\" data-state=\"{}\"><td class=\"nowrap\"><a href=\"/console/devices/{}\">{}</a></td>\
         <td class=\"state {}\">{}</td><td class=\"assurance\">{}</td>\
         <td class=\"reported\">{}</td><td class=\"mono\">{}</td>\
         <td class=\"when\">{}</td><td class=\"when\">{}</td><td class=\"connected\">{}</td></tr>",
        esc(id),
        d.state,
        url_enc(id),
        esc(id),
        state_class(d.state),
        d.state,
        esc(&assurance_label(assurance)),
        reported(d.reported_backend.as_deref()),
        esc(&d.cert_serial),
        esc(&when(d.cert_not_after_ms)),
        esc(&when(d.last_seen_ms)),
        if connected { "yes" } else { "no" },
    );
}

/// The enrolment-token form (bound to `device` when given).
fn token_form(user: &ConsoleUser, device: Option<&str>) -> String {
    if user.role != Role::Admin {
        return "<p class=\"ro\">This credential is read-only: it can look at everything and \
                change nothing.</p>"
            .to_owned();
    }
    let id_field = match device {
        Some(id) => format!(
            "<input type=\"hidden\" name=\"device_id\" value=\"{}\">",
            esc(id)
        ),
        None => "<label>Device id <input name=\"device_id\" id=\"t-id\" \
                 placeholder=\"optional: bind the token to an id\"></label>"
            .to_owned(),
    };
    format!(
        "<section class=\"card\"><h2>{}</h2>\
         <form method=\"post\" action=\"/console/tokens\" id=\"token-form\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{id_field}\
         <label>Valid for <select name=\"ttl\"><option value=\"3600\">1 hour</option>\
         <option value=\"86400\">1 day</option><option value=\"604800\">7 days</option>\
         </select></label> <button type=\"submit\" id=\"t-create\">Create token</button>\
         </form></section>",
        if device.is_some() {
            "Re-enrolment token for this device"
        } else {
            "New enrolment token"
        },
        esc(&user.csrf),
    )
}

fn parse_id(user: &ConsoleUser, id: &str) -> Result<DeviceId, Response> {
    DeviceId::parse(id)
        .map_err(|_| problem(StatusCode::BAD_REQUEST, Some(user), "not a valid device id"))
}

async fn load(
    user: &ConsoleUser,
    state: &HttpState,
    id: &DeviceId,
) -> Result<DeviceRecord, Response> {
    let store = state.registry.clone();
    let i = id.clone();
    match blocking(move || store.device(&i)).await {
        Ok(Ok(Some(d))) => Ok(d),
        Ok(Ok(None)) => Err(problem(
            StatusCode::NOT_FOUND,
            Some(user),
            "no such device in the registry",
        )),
        Ok(Err(e)) => Err(crate::ApiError::from(e).into_response()),
        Err(e) => Err(e.into_response()),
    }
}

/// `GET /console/devices/{id}`.
pub(crate) async fn device(
    user: ConsoleUser,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_id(&user, &id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let d = match load(&user, &state, &id).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let store = state.registry.clone();
    let i = id.clone();
    let read = blocking(move || {
        Ok::<_, devid_store::StoreError>((
            store.audit_log(50, Some(i.as_str()))?,
            store.attestation(&i)?,
        ))
    });
    let (audit, attestation) = match read.await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return crate::ApiError::from(e).into_response(),
        Err(e) => return e.into_response(),
    };
    let assurance = match &attestation {
        Some(a) => format!(
            "{} <small>({} {}, EK {}…)</small>",
            esc(&assurance_label(&a.assurance)),
            esc(a.ek_manufacturer.as_deref().unwrap_or("?")),
            esc(a.ek_model.as_deref().unwrap_or("")),
            esc(a.ek_fingerprint.get(..16).unwrap_or(&a.ek_fingerprint))
        ),
        None => esc(ASSURANCE_NONE).to_string(),
    };
    let connected = state.presence.connected(id.as_str());
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Device <span id=\"device-id\">{}</span></h1>\
         <div class=\"cards\"><section class=\"card\"><h2>Identity</h2><dl id=\"identity\">\
         <dt>State</dt><dd id=\"state\" class=\"state {}\">{}</dd>\
         <dt>Assurance <small>(verified)</small></dt><dd id=\"assurance\">{}</dd>\
         <dt>Backend <small>(reported)</small></dt><dd id=\"reported\">{}</dd>\
         <dt>Connected now</dt><dd id=\"connected\">{}</dd>\
         <dt>Last seen</dt><dd>{}</dd><dt>Policy</dt><dd>{}</dd>\
         <dt>Created</dt><dd>{}</dd><dt>Enrolled</dt><dd>{}</dd></dl></section>\
         <section class=\"card cert\"><h2>Certificate</h2><dl>\
         <dt>Serial</dt><dd class=\"mono\" id=\"serial\">{}</dd>\
         <dt>Expires</dt><dd id=\"expiry\">{}</dd>\
         <dt>Key fingerprint <small>(SHA-256 of the SPKI)</small></dt>\
         <dd class=\"mono\" id=\"fingerprint\">{}</dd>\
         <dt>Predecessor kept</dt><dd>{}</dd></dl></section>",
        esc(id.as_str()),
        state_class(d.state),
        d.state,
        assurance,
        match d.reported_backend.as_deref() {
            Some(b) => format!(
                "{} <small>(reported by the device, not proven)</small>",
                backend_label(Some(b))
            ),
            None => backend_label(None).to_owned(),
        },
        if connected { "yes" } else { "no" },
        esc(&when(d.last_seen_ms)),
        esc(&d.policy),
        esc(&when(d.created_at_ms)),
        esc(&when(d.enrolled_at_ms)),
        esc(&d.cert_serial),
        esc(&when(d.cert_not_after_ms)),
        esc(&d.key_fingerprint),
        match &d.predecessor {
            Some((s, _)) => format!("serial {} (until the current one is first used)", esc(s)),
            None => "no".to_owned(),
        },
    );
    // actions
    body.push_str("<section class=\"card\"><h2>Actions</h2>");
    if user.role == Role::Admin {
        let mut any = false;
        for (action, label, allowed) in [
            ("suspend", "Suspend", d.state == DeviceState::Active),
            ("resume", "Resume", d.state == DeviceState::Suspended),
            ("revoke", "Revoke", d.state != DeviceState::Revoked),
        ] {
            if allowed {
                any = true;
                let _ = write!(
                    body,
                    "<a class=\"button {action}\" id=\"act-{action}\" \
                     href=\"/console/devices/{}/confirm/{action}\">{label}…</a> ",
                    url_enc(id.as_str())
                );
            }
        }
        if !any {
            body.push_str("<p>Revoked for good: nothing to change.</p>");
        }
        body.push_str("</section>");
        body.push_str(&token_form(&user, Some(id.as_str())));
    } else {
        body.push_str(
            "<p class=\"ro\">This credential is read-only: no action is offered, and the \
             server refuses any change asked with it.</p></section>",
        );
    }
    body.push_str("</div>");
    // telemetry: filled by the script (messages.json, then the live stream)
    let _ = write!(
        body,
        "<section class=\"card wide\"><h2>Telemetry <small id=\"live\">connecting…</small></h2>\
         <div id=\"chart\" data-device=\"{}\"></div>\
         <p class=\"hint\">Numbers found in JSON payloads, plotted as they arrive.</p>\
         <table class=\"grid\" id=\"messages\"><thead><tr><th>Received</th><th>Topic</th>\
         <th>Payload</th></tr></thead><tbody></tbody></table></section>",
        esc(id.as_str())
    );
    body.push_str(
        "<section class=\"card wide\"><h2>Audit history</h2><table class=\"grid\" id=\"audit\">\
         <thead><tr><th>Time</th><th>Actor</th><th>Action</th><th>Outcome</th><th>Detail</th>\
         <th>Source</th></tr></thead><tbody>",
    );
    for a in audit.iter().rev() {
        audit_row(&mut body, a);
    }
    body.push_str("</tbody></table></section>");
    layout(
        &format!("Device {}", id.as_str()),
        Page::Device,
        Some(&user),
        &body,
    )
}

fn audit_row(body: &mut String, a: &devid_proto::AuditEntry) {
    let _ = write!(
        body,
        "<tr class=\"{}\"><td class=\"when\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td>{}</td></tr>",
        if a.outcome == "ok" { "ok" } else { "refused" },
        esc(&a.time.replacen('T', " ", 1)),
        esc(&a.actor),
        esc(&a.action),
        esc(&a.outcome),
        esc(&a.detail),
        esc(&a.source),
    );
}

/// `GET /console/devices/{id}/confirm/{action}`: the confirmation step before a change.
pub(crate) async fn confirm(
    user: ConsoleUser,
    State(state): State<HttpState>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let id = match parse_id(&user, &id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let what = match action.as_str() {
        "suspend" => {
            "Suspend: its live MQTT session is cut now and it cannot connect, \
                      renew or enrol until resumed."
        }
        "resume" => "Resume: it may connect and renew again.",
        "revoke" => {
            "Revoke: its live MQTT session is cut now and it can never connect, \
                     renew or enrol again under this id. This cannot be undone."
        }
        _ => return problem(StatusCode::NOT_FOUND, Some(&user), "no such action"),
    };
    if let Err(r) = load(&user, &state, &id).await {
        return r;
    }
    let body = format!(
        "<h1>{} device {}?</h1><p>{}</p>\
         <form method=\"post\" action=\"/console/devices/{}/{}\" id=\"confirm-form\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <input type=\"hidden\" name=\"confirm\" value=\"yes\">\
         <button type=\"submit\" class=\"danger\" id=\"confirm\">Yes, {} it</button> \
         <a href=\"/console/devices/{}\" id=\"cancel\">Cancel</a></form>",
        esc(&action[..1].to_uppercase()) + &esc(&action[1..]),
        esc(id.as_str()),
        esc(what),
        url_enc(id.as_str()),
        esc(&action),
        esc(&user.csrf),
        esc(&action),
        url_enc(id.as_str()),
    );
    layout("Confirm", Page::Other, Some(&user), &body)
}

/// `GET /console/devices/{id}/messages.json`: the newest stored messages, oldest first.
pub(crate) async fn messages_json(
    _user: ConsoleUser,
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = DeviceId::parse(&id) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let store = state.messages.clone();
    match blocking(move || store.list(&id, None, 200)).await {
        Ok(Ok(rows)) => Json(rows.iter().map(view_stored).collect::<Vec<_>>()).into_response(),
        Ok(Err(e)) => crate::ApiError::from(e).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /console/devices/{id}/stream`: this device's messages as they are stored
/// (Server-Sent Events; the session cookie authenticates, EventSource sends no header).
pub(crate) async fn stream(
    _user: ConsoleUser,
    State(state): State<HttpState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, StatusCode> {
    let id = DeviceId::parse(&id).map_err(|_| StatusCode::BAD_REQUEST)?;
    // the extractor found this cookie's session; the stream ends when the session does
    // (sign-out, expiry, the credential's revocation noticed by another request)
    let cookie = cookie_value(&headers).ok_or(StatusCode::UNAUTHORIZED)?;
    let sessions = state.console.clone();
    let rx = state.stream.subscribe();
    let start = (rx, id, sessions, cookie);
    let events = futures_util::stream::unfold(start, |(mut rx, id, sessions, cookie)| async move {
        loop {
            if !sessions.is_alive(&cookie) {
                return None;
            }
            let next = tokio::time::timeout(STREAM_SESSION_CHECK, rx.recv()).await;
            let Ok(next) = next else {
                continue; // no message for a while: look at the session again
            };
            match next {
                Ok(m) => {
                    if id.as_str() != &*m.device_id {
                        continue;
                    }
                    let event = Event::default()
                        .event("message")
                        .id(m.id.to_string())
                        .json_data(view_live(&m))
                        .unwrap_or_else(|_| Event::default().comment("unencodable message"));
                    return Some((Ok(event), (rx, id, sessions, cookie)));
                }
                Err(RecvError::Lagged(n)) => {
                    let event = Event::default().event("lagged").data(n.to_string());
                    return Some((Ok(event), (rx, id, sessions, cookie)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// How often an idle live stream looks whether its session still exists.
const STREAM_SESSION_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// The counters of `/metrics` the overview shows: (name, labels) -> value.
fn counters(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let wanted = [
            "devid_mqtt_connections",
            "devid_mqtt_connects_total",
            "devid_mqtt_messages_in_total",
            "devid_mqtt_messages_stored_total",
            "devid_mqtt_handshake_failures_total",
            "devid_mqtt_connect_refusals_total",
            "devid_mqtt_denials_total",
            "devid_mqtt_rate_limited_total",
            "devid_mqtt_storage_refusals_total",
            "devid_mqtt_live_revocations_total",
        ];
        let name = key.split('{').next().unwrap_or(key);
        if wanted.contains(&name) {
            if let Ok(v) = value.trim().parse::<f64>() {
                out.insert(key.to_owned(), v);
            }
        }
    }
    out
}

/// Refusal counters: (family, reason) -> count.
fn refusals(c: &BTreeMap<String, f64>) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    for (k, v) in c {
        let Some((name, labels)) = k.split_once('{') else {
            continue;
        };
        let family = name
            .trim_start_matches("devid_mqtt_")
            .trim_end_matches("_total");
        let reason = labels
            .trim_end_matches('}')
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(_, v)| v.trim_matches('"'))
            .collect::<Vec<_>>()
            .join(",");
        out.push((family.to_owned(), reason, *v));
    }
    out
}

/// `GET /console/overview.json`: the counters, for the script's rates.
pub(crate) async fn overview_json(_user: ConsoleUser, State(state): State<HttpState>) -> Response {
    let c = counters(&(state.metrics)());
    let pick = |k: &str| c.get(k).copied().unwrap_or(0.0);
    Json(serde_json::json!({
        "time_ms": now_ms(),
        "connected_here": state.presence.connected_count(),
        "connections": pick("devid_mqtt_connections"),
        "connects_total": pick("devid_mqtt_connects_total"),
        "messages_total": pick("devid_mqtt_messages_in_total"),
        "refusals": refusals(&c)
            .into_iter()
            .map(|(f, r, v)| serde_json::json!({"family": f, "reason": r, "count": v}))
            .collect::<Vec<_>>(),
    }))
    .into_response()
}

/// `GET /console/overview`.
pub(crate) async fn overview(user: ConsoleUser, State(state): State<HttpState>) -> Response {
    let now = now_ms();
    let week = 7 * 24 * 3600 * 1000;
    let store = state.registry.clone();
    let counts = match blocking(move || store.fleet_counts(now, now + week, 20)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return crate::ApiError::from(e).into_response(),
        Err(e) => return e.into_response(),
    };
    let store = state.registry.clone();
    let audit = match blocking(move || store.audit_log(500, None)).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return crate::ApiError::from(e).into_response(),
        Err(e) => return e.into_response(),
    };
    let c = counters(&(state.metrics)());
    let total: u64 = counts.by_state.iter().map(|(_, n)| n).sum();
    let mut body = String::from("<h1>Fleet overview</h1><div class=\"cards\">");
    let _ = write!(
        body,
        "<section class=\"card\"><h2>Devices by state</h2><table class=\"grid\" \
         id=\"by-state\"><tbody>"
    );
    for s in [
        DeviceState::Active,
        DeviceState::Suspended,
        DeviceState::Revoked,
    ] {
        let n = counts
            .by_state
            .iter()
            .find(|(k, _)| *k == s)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let _ = write!(
            body,
            "<tr><td class=\"state {}\"><a href=\"/console/devices?state={s}\">{s}</a></td>\
             <td class=\"num\">{n}</td></tr>",
            state_class(s)
        );
    }
    let _ = write!(
        body,
        "<tr><td>all</td><td class=\"num\">{total}</td></tr></tbody></table></section>"
    );
    body.push_str(
        "<section class=\"card\"><h2>By protection</h2><table class=\"grid\" id=\"by-protection\">\
         <thead><tr><th>Assurance <small>(verified)</small></th><th></th></tr></thead><tbody>",
    );
    for (level, n) in &counts.by_assurance {
        let _ = write!(
            body,
            "<tr><td><a href=\"/console/devices?assurance={}\">{}</a></td><td class=\"num\">{n}</td></tr>",
            url_enc(level),
            esc(&assurance_label(level))
        );
    }
    body.push_str(
        "</tbody><thead><tr><th>Backend <small>(reported)</small></th><th></th></tr></thead><tbody>",
    );
    for (b, n) in &counts.by_backend {
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"num\">{n}</td></tr>",
            backend_label(b.as_deref())
        );
    }
    body.push_str("</tbody></table></section>");
    let pick = |k: &str| c.get(k).copied().unwrap_or(0.0);
    let _ = write!(
        body,
        "<section class=\"card\"><h2>Traffic <small>(this node)</small></h2><dl id=\"traffic\">\
         <dt>Open MQTT sessions</dt><dd id=\"m-connections\">{}</dd>\
         <dt>Connections per second</dt><dd id=\"m-connect-rate\">…</dd>\
         <dt>Messages per second</dt><dd id=\"m-message-rate\">…</dd>\
         <dt>Messages received</dt><dd id=\"m-messages\">{}</dd></dl></section>",
        pick("devid_mqtt_connections"),
        pick("devid_mqtt_messages_in_total"),
    );
    body.push_str(
        "<section class=\"card\"><h2>Refusals by reason <small>(since start, as in \
         /metrics)</small></h2><table class=\"grid\" id=\"refusals\"><thead><tr><th>What</th>\
         <th>Reason</th><th>Count</th></tr></thead><tbody>",
    );
    for (f, r, v) in refusals(&c) {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{v}</td></tr>",
            esc(&f),
            esc(&r)
        );
    }
    body.push_str("</tbody></table></section></div>");
    let _ = write!(
        body,
        "<section class=\"card wide\"><h2>Certificates expiring in the next 7 days \
         <small id=\"expiring-total\">{} in all</small></h2><table class=\"grid\" id=\"expiring\">\
         <thead><tr><th>Device</th><th>State</th><th>Expires</th></tr></thead><tbody>",
        counts.expiring_total
    );
    for d in &counts.expiring {
        let _ = write!(
            body,
            "<tr><td><a href=\"/console/devices/{}\">{}</a></td><td>{}</td><td>{}</td></tr>",
            url_enc(d.id.as_str()),
            esc(d.id.as_str()),
            d.state,
            esc(&when(d.cert_not_after_ms))
        );
    }
    body.push_str(
        "</tbody></table></section><section class=\"card wide\"><h2>Latest security events</h2>\
         <table class=\"grid\" id=\"security\"><thead><tr><th>Time</th><th>Actor</th>\
         <th>Action</th><th>Outcome</th><th>Detail</th><th>Source</th></tr></thead><tbody>",
    );
    let security = audit
        .iter()
        .rev()
        .filter(|a| {
            a.outcome != "ok"
                || a.action.starts_with("device.")
                || a.action.starts_with("credential.")
                || a.action.starts_with("console.")
                || a.action.starts_with("token.")
        })
        .take(30);
    for a in security {
        audit_row(&mut body, a);
    }
    body.push_str("</tbody></table></section>");
    layout("Fleet overview", Page::Overview, Some(&user), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_refusals_from_the_metrics_text() {
        let text = "# HELP x\ndevid_mqtt_connections 3\n\
                    devid_mqtt_connect_refusals_total{reason=\"device_revoked\"} 2\n\
                    devid_mqtt_other 9\n# EOF\n";
        let c = counters(text);
        assert_eq!(c.get("devid_mqtt_connections"), Some(&3.0));
        assert_eq!(c.len(), 2);
        assert_eq!(
            refusals(&c),
            vec![("connect_refusals".into(), "device_revoked".into(), 2.0)]
        );
    }
}
