//! HTML building: every text that did not come from this file goes through [`esc`].

use std::fmt::Write;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::user::ConsoleUser;

/// Escape text for HTML element content and double- or single-quoted attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encode a query-string value.
pub(crate) fn url_enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Which page a layout is for (the script reads it from `<body data-page>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Page {
    Login,
    Devices,
    Device,
    Overview,
    Other,
}

impl Page {
    fn name(self) -> &'static str {
        match self {
            Page::Login => "login",
            Page::Devices => "devices",
            Page::Device => "device",
            Page::Overview => "overview",
            Page::Other => "other",
        }
    }
}

/// A whole page: `body` is HTML already escaped where needed.
pub(crate) fn layout(title: &str, page: Page, user: Option<&ConsoleUser>, body: &str) -> Response {
    layout_status(StatusCode::OK, title, page, user, body)
}

/// [`layout`] with a status.
pub(crate) fn layout_status(
    status: StatusCode,
    title: &str,
    page: Page,
    user: Option<&ConsoleUser>,
    body: &str,
) -> Response {
    let chart = if page == Page::Device {
        "<link rel=\"stylesheet\" href=\"/console/assets/uPlot.min.css\">\
         <script src=\"/console/assets/uPlot.iife.min.js\" defer></script>"
    } else {
        ""
    };
    let nav = match user {
        Some(u) => format!(
            "<nav><a class=\"brand\" href=\"/console/devices\">devid console</a>\
             <a href=\"/console/devices\"{}>Devices</a>\
             <a href=\"/console/overview\"{}>Fleet overview</a>\
             <span class=\"who\" id=\"who\">signed in as <b>admin:{}</b> ({})</span>\
             <form method=\"post\" action=\"/console/logout\" class=\"inline\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">Sign out</button></form></nav>",
            if page == Page::Devices {
                " class=\"here\""
            } else {
                ""
            },
            if page == Page::Overview {
                " class=\"here\""
            } else {
                ""
            },
            esc(&u.name),
            esc(u.role.as_str()),
            esc(&u.csrf),
        ),
        None => "<nav><span class=\"brand\">devid console</span></nav>".to_owned(),
    };
    let csrf_meta = user
        .map(|u| format!("<meta name=\"csrf-token\" content=\"{}\">", esc(&u.csrf)))
        .unwrap_or_default();
    let role = user.map(|u| u.role.as_str()).unwrap_or("");
    let text = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · devid console</title>{csrf_meta}\
         <link rel=\"stylesheet\" href=\"/console/assets/console.css\">{chart}\
         <script src=\"/console/assets/console.js\" defer></script></head>\
         <body data-page=\"{}\" data-role=\"{}\"><header>{nav}</header><main>{body}</main>\
         </body></html>\n",
        esc(title),
        page.name(),
        esc(role),
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        text,
    )
        .into_response()
}

/// A page that says something went wrong, with a way back.
pub(crate) fn problem(status: StatusCode, user: Option<&ConsoleUser>, message: &str) -> Response {
    layout_status(
        status,
        "Problem",
        Page::Other,
        user,
        &format!(
            "<h1>{}</h1><p class=\"problem\">{}</p><p><a href=\"/console/devices\">Back to the \
             devices</a></p>",
            status.as_u16(),
            esc(message)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(esc("&lt;"), "&amp;lt;");
        assert_eq!(url_enc("a b&c"), "a%20b%26c");
    }
}
