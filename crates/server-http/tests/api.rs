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
use devid_server_http::{app, routes, HttpState};
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

struct Api {
    _dir: tempfile::TempDir,
    state: HttpState,
    registry: Arc<SqliteStore>,
    changes: Arc<Changes>,
    admin: String,
}

impl Api {
    fn new() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("devid-server.db");
        let registry = Arc::new(SqliteStore::open(&db).unwrap());
        let admin = devid_store::token::generate().to_string();
        registry
            .add_admin_credential(&devid_store::token::hash(&admin), devid_stdx::now_ms())
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
            messages: Arc::new(SqliteMessageStore::open(&db).unwrap()),
            stream,
            metrics: Arc::new(|| "# EOF\n".to_owned()),
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
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        let resp = app(self.state.clone())
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, bytes.to_vec())
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
    let refusals: Vec<_> = api
        .audit_actions()
        .into_iter()
        .filter(|(a, o, _)| a == "admin.auth" && o == "refused")
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
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
