//! The OpenAPI file lists exactly the routes the router serves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use devid_server_core::init::{init, InitOptions};
use devid_server_core::serve::prepare;
use tower::ServiceExt;

fn openapi_routes() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        doc["openapi"].as_str().unwrap().split('.').next(),
        Some("3")
    );
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (method, _) in item.as_mapping().unwrap() {
            let m = method.as_str().unwrap();
            if ["get", "post", "put", "delete", "patch", "head", "options"].contains(&m) {
                out.insert((m.to_uppercase(), path.as_str().unwrap().to_owned()));
            }
        }
    }
    out
}

#[test]
fn openapi_lists_exactly_the_served_routes() {
    let served: BTreeSet<(String, String)> = devid_server_core::api::routes()
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
    let dir = tempfile::tempdir().unwrap();
    let report = init(&InitOptions {
        data_dir: dir.path().join("d"),
        hostname: "localhost".into(),
        https_listen: None,
        mqtt_listen: None,
        db: None,
        ca_key: None,
    })
    .unwrap();
    let (state, _tls) = prepare(report.config).unwrap();
    let app = devid_server_core::app(state);
    for (method, path) in devid_server_core::api::routes() {
        let uri = path.replace("{id}", "some-device");
        let req = Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let status = app.clone().oneshot(req).await.unwrap().status();
        assert_ne!(status, StatusCode::NOT_FOUND, "{method} {uri}");
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
    }
    // and something unlisted is not served
    let req = Request::builder()
        .method("GET")
        .uri("/v1/admin/secrets")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    let err: devid_proto::ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(err.code, "not_found");
}
