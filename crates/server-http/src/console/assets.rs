//! The console's static files, embedded in the binary (no CDN, works offline). uPlot's
//! version and hashes: `assets/console/README.md` (a test checks them).

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// (name, content type, bytes) of every embedded file.
pub const FILES: &[(&str, &str, &str)] = &[
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/console/console.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/console/uPlot.min.css"),
    ),
];

/// Bytes the embedded files add to the binary.
pub fn embedded_bytes() -> usize {
    FILES.iter().map(|(_, _, b)| b.len()).sum()
}

/// `GET /console/assets/{name}` (no session needed: nothing here is secret).
pub(crate) async fn serve(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, ctype, body)) => (
            [
                (header::CONTENT_TYPE, *ctype),
                (header::CACHE_CONTROL, "private, max-age=300"),
            ],
            *body,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    #[test]
    fn the_embedded_uplot_is_the_one_the_readme_names() {
        let readme = include_str!("../../assets/console/README.md");
        for (name, _, body) in super::FILES
            .iter()
            .filter(|(n, _, _)| n.starts_with("uPlot"))
        {
            let h = hex::encode(Sha256::digest(body.as_bytes()));
            assert!(
                readme.contains(&format!("{h}  {name}")),
                "{name}: sha256 {h} is not the one in assets/console/README.md"
            );
        }
        assert!(super::embedded_bytes() > 50_000);
    }
}
