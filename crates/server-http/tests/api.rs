//! The HTTPS API at its own crate boundary: requests go into the router in-process (no TLS,
//! no binary), against a real SQLite registry and message store in a temp dir and a real CA;
//! each test checks the response AND what the store holds afterwards.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use devid_ca::Ca;
use devid_proto::{DeviceId, DeviceState, EnrollResponse, ErrorBody, TokenCreateResponse};
use devid_server_config::ServerConfig;
use devid_server_http::{app, routes, HttpState, PeerInfo};
use devid_store::{AuditLog, DeviceLookup, Registry, StateChangeSink};
use devid_store_sqlite::{SqliteMessageStore, SqliteStore};
use tower::ServiceExt;

/// Records the state changes the API reports to the live sessions.
#[derive(Default)]
struct Changes(Mutex<Vec<(String, DeviceState)>>);

impl StateChangeSink for Changes {
    fn state_changed(&self, id: &DeviceId, state: DeviceState) {
        self.0.lock().unwrap().push((id.to_string(), state));
    }
}

/// No MQTT listener in these tests: nothing is ever connected.
struct NoSessions;

impl devid_store::Presence for NoSessions {
    fn connected(&self, _id: &str) -> bool {
        false
    }
    fn connected_count(&self) -> usize {
        0
    }
}

struct Api {
    _dir: tempfile::TempDir,
    state: HttpState,
    registry: Arc<SqliteStore>,
    changes: Arc<Changes>,
    admin: String,
}

impl Api {
    fn new() -> Api {
        Api::with_https(devid_server_config::HttpsSettings::default())
    }

    fn with_https(https: devid_server_config::HttpsSettings) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("devid-server.db");
        let registry = Arc::new(SqliteStore::open(&db).unwrap());
        let admin = devid_store::token::generate().to_string();
        let ctx = devid_store::AuditCtx {
            actor: "test".into(),
            source: "local".into(),
            now_ms: devid_stdx::now_ms(),
        };
        registry
            .add_admin_credential(
                "admin",
                devid_store::Role::Admin,
                &devid_store::token::hash(&admin),
                &ctx,
            )
            .unwrap()
            .unwrap();
        let changes = Arc::new(Changes::default());
        let (stream, _) = tokio::sync::broadcast::channel(16);
        let state = HttpState {
            registry: registry.clone(),
            ca: Arc::new(Ca::generate("localhost", devid_stdx::now_ms()).unwrap()),
            config: Arc::new(ServerConfig::new(
                dir.path().to_path_buf(),
                "localhost".into(),
            )),
            live: changes.clone(),
            presence: Arc::new(NoSessions),
            console: Arc::new(devid_server_http::ConsoleSessions::default()),
            messages: Arc::new(SqliteMessageStore::open(&db).unwrap()),
            stream,
            metrics: Arc::new(|| "# EOF\n".to_owned()),
            limits: Arc::new(devid_server_http::HttpLimits::new(&https)),
            readiness: Arc::new(|| Ok(())),
            attest: Default::default(),
            http_metrics: Arc::new(devid_server_http::HttpMetrics::default()),
        };
        Api {
            _dir: dir,
            state,
            registry,
            changes,
            admin,
        }
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        bearer: Option<&str>,
        body: &str,
    ) -> (StatusCode, Vec<u8>) {
        let (status, _, body) = self.call_from(None, method, uri, bearer, body).await;
        (status, body)
    }

    /// A request as the TLS listener hands it over from `source` (an address on 127.0.0.0/8).
    async fn call_from(
        &self,
        source: Option<&str>,
        method: &str,
        uri: &str,
        bearer: Option<&str>,
        body: &str,
    ) -> (StatusCode, Option<String>, Vec<u8>) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        let mut req = req.body(Body::from(body.to_owned())).unwrap();
        if let Some(src) = source {
            req.extensions_mut().insert(PeerInfo {
                addr: Some(format!("{src}:40000").parse().unwrap()),
                client_chain: None,
            });
        }
        let resp = app(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, retry_after, bytes.to_vec())
    }

    async fn token(&self, device: &str) -> String {
        let (status, body) = self
            .call(
                "POST",
                "/v1/admin/tokens",
                Some(&self.admin),
                &format!(r#"{{"device_id":"{device}"}}"#),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        serde_json::from_slice::<TokenCreateResponse>(&body)
            .unwrap()
            .token
    }

    fn audit_actions(&self) -> Vec<(String, String, String)> {
        self.registry
            .audit_log(100, None)
            .unwrap()
            .into_iter()
            .map(|a| (a.action, a.outcome, a.detail))
            .collect()
    }
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body).unwrap().code
}

fn openapi_routes() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        doc["openapi"].as_str().unwrap().split('.').next(),
        Some("3")
    );
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_mapping().unwrap() {
        for (method, _) in ops.as_mapping().unwrap() {
            out.insert((
                method.as_str().unwrap().to_uppercase(),
                path.as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

#[test]
fn openapi_lists_exactly_the_served_routes() {
    let served: BTreeSet<(String, String)> = routes()
        .into_iter()
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    let documented = openapi_routes();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in openapi.yaml but not served: {unserved:?}"
    );
}

#[tokio::test]
async fn every_listed_route_is_really_served() {
    let api = Api::new();
    for (method, path) in routes() {
        let uri = path.replace("{id}", "some-device");
        let (status, _) = api.call(method, &uri, None, "{}").await;
        assert_ne!(status, StatusCode::NOT_FOUND, "{method} {uri}");
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
    }
    let (status, body) = api.call("GET", "/v1/admin/secrets", None, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");
}

#[tokio::test]
async fn admin_routes_refuse_a_missing_or_wrong_token_and_audit_it() {
    let api = Api::new();
    let (status, body) = api.call("GET", "/v1/admin/devices", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "admin_unauthorized");
    let wrong = devid_store::token::generate().to_string();
    let (status, _) = api
        .call("POST", "/v1/admin/tokens", Some(&wrong), "{}")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // refusals decided before the registry are audited in aggregate: one row per source and
    // reason per https.audit_interval_secs
    let refusals: Vec<_> = api
        .audit_actions()
        .into_iter()
        .filter(|(a, o, _)| a == "admin.auth" && o == "refused")
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    // no token was created by the refused request
    assert!(api
        .audit_actions()
        .iter()
        .all(|(a, _, _)| a != "token.create"));
}

#[tokio::test]
async fn enrolment_issues_once_records_the_device_and_refuses_a_replayed_token() {
    let api = Api::new();
    let token = api.token("pump-1").await;
    let body = serde_json::json!({"token": token, "csr": csr()}).to_string();
    let (status, resp) = api.call("POST", "/v1/enroll", None, &body).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    let resp: EnrollResponse = serde_json::from_slice(&resp).unwrap();
    assert_eq!(resp.device_id, "pump-1");
    assert_eq!(resp.ca_pin, api.state.ca.pin());
    let id = DeviceId::parse("pump-1").unwrap();
    let rec = api.registry.device(&id).unwrap().unwrap();
    assert_eq!(rec.state, DeviceState::Active);
    // the issued leaf names the device by the one identity rule
    let leaf = rustls_pemfile_first(&resp.certificate_chain);
    assert_eq!(devid_tls::identity::device_of(&leaf).unwrap(), id);
    // the same token again: refused, registry unchanged, refusal audited
    let body = serde_json::json!({"token": token, "csr": csr()}).to_string();
    let (status, err) = api.call("POST", "/v1/enroll", None, &body).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&err), "token_used");
    assert_eq!(api.registry.device(&id).unwrap().unwrap(), rec);
    let audit = api.audit_actions();
    assert!(audit.contains(&("enroll".into(), "refused".into(), "token_used".into())));
    // renewal without a client certificate: refused before the store is involved
    let (status, err) = api
        .call(
            "POST",
            "/v1/renew",
            None,
            &format!(r#"{{"csr":{:?}}}"#, csr()),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&err), "client_cert_required");
}

#[tokio::test]
async fn a_revocation_is_committed_then_reported_to_live_sessions_and_is_permanent() {
    let api = Api::new();
    let token = api.token("pump-2").await;
    let body = serde_json::json!({"token": token, "csr": csr()}).to_string();
    assert_eq!(
        api.call("POST", "/v1/enroll", None, &body).await.0,
        StatusCode::OK
    );
    let (status, _) = api
        .call(
            "POST",
            "/v1/admin/devices/pump-2/revoke",
            Some(&api.admin),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let id = DeviceId::parse("pump-2").unwrap();
    assert_eq!(
        api.registry.device(&id).unwrap().unwrap().state,
        DeviceState::Revoked
    );
    assert_eq!(
        *api.changes.0.lock().unwrap(),
        vec![("pump-2".to_owned(), DeviceState::Revoked)]
    );
    let (status, err) = api
        .call(
            "POST",
            "/v1/admin/devices/pump-2/resume",
            Some(&api.admin),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&err), "device_revoked");
    assert_eq!(
        api.registry.device(&id).unwrap().unwrap().state,
        DeviceState::Revoked
    );
    // a refused change tells the live sessions nothing
    assert_eq!(api.changes.0.lock().unwrap().len(), 1);
}

fn rustls_pemfile_first(chain_pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

fn small_limits() -> devid_server_config::HttpsSettings {
    devid_server_config::HttpsSettings {
        enroll_per_source_per_sec: 0.01,
        enroll_burst_per_source: 3.0,
        admin_auth_failures_per_source_per_sec: 0.01,
        admin_auth_failure_burst_per_source: 2.0,
        ..Default::default()
    }
}

/// Review finding M2: an enrolment flood from one address is throttled with 429 and
/// Retry-After before any parsing or database work, audited in one row, and a device enrolling
/// from another address is not affected.
#[tokio::test]
async fn an_enrolment_flood_from_one_address_is_throttled_and_others_still_enrol() {
    let api = Api::with_https(small_limits());
    let junk = serde_json::json!({"token": "0".repeat(64), "csr": "x"}).to_string();
    let mut limited = 0;
    for _ in 0..200 {
        let (status, retry, body) = api
            .call_from(Some("127.0.0.9"), "POST", "/v1/enroll", None, &junk)
            .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
            assert_eq!(error_code(&body), "rate_limited");
            let secs: u64 = retry.expect("Retry-After").parse().unwrap();
            assert!(secs >= 1, "{secs}");
        } else {
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    assert_eq!(limited, 197, "the burst of 3 passes, the rest is throttled");
    // a legitimate device on another address enrols meanwhile
    let token = api.token("pump-9").await;
    let body = serde_json::json!({"token": token, "csr": csr()}).to_string();
    let (status, _, _) = api
        .call_from(Some("127.0.0.10"), "POST", "/v1/enroll", None, &body)
        .await;
    assert_eq!(status, StatusCode::OK);
    // one audit row for the whole flood's throttling, one for its malformed requests
    let rows = api.audit_actions();
    let throttled: Vec<_> = rows
        .iter()
        .filter(|(a, o, d)| a == "enroll" && o == "refused" && d.starts_with("rate_limited"))
        .collect();
    assert_eq!(throttled.len(), 1, "{rows:?}");
    let malformed = rows
        .iter()
        .filter(|(a, o, d)| a == "enroll" && o == "refused" && d.starts_with("csr_malformed"))
        .count();
    assert_eq!(malformed, 1, "{rows:?}");
    assert_eq!(
        api.registry.devices().unwrap().len(),
        1,
        "only pump-9 enrolled"
    );
}

/// Failed admin authentications from one address are throttled (429 before the token is
/// looked up, even a valid one from that address); another address is not affected.
#[tokio::test]
async fn failed_admin_authentication_is_throttled_per_address() {
    let api = Api::with_https(small_limits());
    let wrong = devid_store::token::generate().to_string();
    for _ in 0..2 {
        let (status, _, _) = api
            .call_from(
                Some("127.0.0.20"),
                "GET",
                "/v1/admin/devices",
                Some(&wrong),
                "",
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, retry, body) = api
        .call_from(
            Some("127.0.0.20"),
            "GET",
            "/v1/admin/devices",
            Some(&api.admin),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&body), "rate_limited");
    assert!(retry.is_some());
    let (status, _, _) = api
        .call_from(
            Some("127.0.0.21"),
            "GET",
            "/v1/admin/devices",
            Some(&api.admin),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn readiness_reports_the_database_and_the_other_listeners() {
    let mut api = Api::new();
    let (status, body) = api.call("GET", "/readyz", None, "").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    api.state.readiness = Arc::new(|| Err("mqtt_listener".to_owned()));
    let (status, body) = api.call("GET", "/readyz", None, "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["check"], "mqtt_listener");
}

/// Review finding L5: a read-only credential reads everything and changes nothing, refused
/// by the server (not only hidden in a console); changes are audited with the credential's
/// name; a revoked credential authenticates nothing.
#[tokio::test]
async fn a_read_only_credential_reads_and_is_refused_every_change() {
    let api = Api::new();
    let token = api.token("pump-r").await;
    let body = serde_json::json!({"token": token, "csr": csr()}).to_string();
    assert_eq!(
        api.call("POST", "/v1/enroll", None, &body).await.0,
        StatusCode::OK
    );
    let (status, body) = api
        .call(
            "POST",
            "/v1/admin/credentials",
            Some(&api.admin),
            r#"{"name":"dash","read_only":true}"#,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let dash: devid_proto::CredentialCreateResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!(dash.role, "read-only");
    for uri in [
        "/v1/admin/devices",
        "/v1/admin/audit",
        "/v1/admin/credentials",
    ] {
        let (status, _) = api.call("GET", uri, Some(&dash.token), "").await;
        assert_eq!(status, StatusCode::OK, "{uri}");
    }
    let changes = [
        ("/v1/admin/devices/pump-r/revoke", ""),
        ("/v1/admin/devices/pump-r/suspend", ""),
        ("/v1/admin/tokens", "{}"),
        ("/v1/admin/credentials", r#"{"name":"evil"}"#),
        ("/v1/admin/credentials/admin/revoke", ""),
    ];
    for (uri, body) in changes {
        let (status, err) = api.call("POST", uri, Some(&dash.token), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}");
        assert_eq!(error_code(&err), "read_only_credential", "{uri}");
    }
    let id = DeviceId::parse("pump-r").unwrap();
    assert_eq!(
        api.registry.device(&id).unwrap().unwrap().state,
        DeviceState::Active
    );
    assert_eq!(api.registry.admin_credentials().unwrap().len(), 2);
    // read-only calls are counted in the metrics, refused changes too
    let text = api.state.http_metrics.encode();
    assert!(
        text.contains("devid_admin_requests_total{role=\"read-only\",kind=\"read\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("devid_admin_requests_total{role=\"read-only\",kind=\"change\"} 5"),
        "{text}"
    );
    // the admin revokes dash: audited with its name; dash's token is dead
    let (status, _) = api
        .call(
            "POST",
            "/v1/admin/credentials/dash/revoke",
            Some(&api.admin),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api
        .call("GET", "/v1/admin/devices", Some(&dash.token), "")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let actors: Vec<(String, String)> = api
        .registry
        .audit_log(100, None)
        .unwrap()
        .into_iter()
        .filter(|a| a.action.starts_with("credential.") && a.outcome == "ok")
        .map(|a| (a.action, a.actor))
        .collect();
    assert_eq!(
        actors,
        [
            // the test's own bootstrap credential, then dashboard's life
            ("credential.create".to_owned(), "test".to_owned()),
            ("credential.create".to_owned(), "admin:admin".to_owned()),
            ("credential.revoke".to_owned(), "admin:admin".to_owned())
        ]
    );
}

/// The admin API is not served on the public listener devices reach, and the admin listener
/// serves no enrolment or renewal.
#[tokio::test]
async fn the_public_listener_serves_no_admin_route() {
    use devid_server_http::{surface_app, surface_routes, Surface};
    let public: BTreeSet<_> = surface_routes(Surface::Public).into_iter().collect();
    assert_eq!(
        public,
        BTreeSet::from([
            ("GET", "/v1/health"),
            ("GET", "/readyz"),
            ("POST", "/v1/attest/start"),
            ("POST", "/v1/enroll"),
            ("POST", "/v1/renew/attest/start"),
            ("POST", "/v1/renew")
        ])
    );
    let admin = surface_routes(Surface::Admin);
    assert!(admin
        .iter()
        .all(|(_, p)| *p != "/v1/enroll" && *p != "/v1/renew"));
    assert!(admin.contains(&("GET", "/v1/admin/devices")));
    let api = Api::new();
    let req = Request::builder()
        .method("GET")
        .uri("/v1/admin/devices")
        .header("authorization", format!("Bearer {}", api.admin))
        .body(Body::empty())
        .unwrap();
    let resp = surface_app(api.state.clone(), Surface::Public)
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

/// The operators' console is on the admin listener only: the public listener answers 404 for
/// every console path, the admin one serves the login page (with the strict CSP) and sends a
/// browser without a session to it.
#[tokio::test]
async fn the_console_is_served_on_the_admin_listener_only() {
    use devid_server_http::{surface_app, Surface};
    let api = Api::new();
    let get = |surface: Surface, uri: &str| {
        let req = Request::builder()
            .method("GET")
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        surface_app(api.state.clone(), surface).oneshot(req)
    };
    for (_, path) in devid_server_http::console::routes() {
        let uri = path
            .replace("{id}", "some-device")
            .replace("{action}", "revoke")
            .replace("{name}", "console.js");
        let resp = get(Surface::Public, &uri).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::NOT_FOUND,
            "{uri} on the public listener"
        );
    }
    let resp = get(Surface::Admin, "/console/login").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'self'; script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
    let resp = get(Surface::Admin, "/console/devices").await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/console/login");
    let resp = get(Surface::Admin, "/console/devices/x-1/stream")
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "no session: no stream"
    );
    let resp = get(Surface::Admin, "/console/assets/uPlot.iife.min.js")
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(devid_server_http::console::assets::embedded_bytes() > 50_000);
}
