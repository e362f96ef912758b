//! The chat page at `/`, and the development tokens it signs in with.
//!
//! The page is built from `clients/web/page` into `web/` and compiled into
//! the binary, so a fresh clone serves it without Node (the web client's
//! tests check that the committed build matches its sources). It is static
//! and the same for everyone; what it may do is decided by the token it
//! presents, as for any other client.
//!
//! `/dev/token` signs anyone in under any name, so it answers only while
//! the gateway is a developer's own: the built-in development secret and
//! a loopback listener (a public listener refuses that secret at start,
//! this checks both anyway). Everywhere else it is 404, and the page's
//! application supplies its own tokens.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use chatgate_protocol::limits::find_hidden_char;

use crate::auth::{Claims, unix_now};
use crate::config::DEV_SECRET;
use crate::node::Node;

type Body = Full<Bytes>;

/// How long a development token lasts; the page fetches one per connect.
pub const DEV_TOKEN_TTL_SECS: u64 = 3600;

/// Longest display name the sign-in form accepts, in characters.
pub const MAX_DEV_NAME_CHARS: usize = 32;

/// Only this origin's scripts, styles and sockets; the page never needs
/// inline code, so injected markup could not run even if it got in.
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   script-src 'self'; style-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

const INDEX_HTML: &[u8] = include_bytes!("../web/index.html");
const APP_JS: &[u8] = include_bytes!("../web/app.js");
const APP_CSS: &[u8] = include_bytes!("../web/app.css");

/// The page's files by request path, or `None` for any other path.
pub fn asset(path: &str) -> Option<Response<Body>> {
    let (body, kind) = match path {
        "/" | "/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut r = typed(StatusCode::OK, Bytes::from_static(body), kind);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The files change with the binary; a revalidation per load is cheap.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(r)
}

/// Whether this gateway hands out development tokens: the development
/// secret on a loopback listener with no proxy in front (a proxy on the
/// same host would hand them to everyone it serves).
pub fn dev_tokens_enabled(node: &Node) -> bool {
    node.config.token_secret == DEV_SECRET
        && node.config.listen.ip().is_loopback()
        && node.config.trusted_proxies.is_empty()
}

/// `GET /dev/token?name=N`: a token for user `N` named `N`, as JSON
/// `{"token": ..., "user": ...}`. 404 unless [`dev_tokens_enabled`] and
/// the request came straight from the browser (no `X-Forwarded-For`);
/// 400 for a missing, blank, too long or hidden-character name.
pub fn dev_token(node: &Node, query: Option<&str>, forwarded: bool) -> Response<Body> {
    if !dev_tokens_enabled(node) || forwarded {
        return json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.into());
    }
    let name = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    if let Err(problem) = check_name(&name) {
        let body = serde_json::json!({ "error": problem }).to_string();
        return json(StatusCode::BAD_REQUEST, body);
    }
    let token = node.verifier.mint(&Claims {
        sub: name.clone(),
        name: Some(name.clone()),
        picture: None,
        exp: unix_now().saturating_add(DEV_TOKEN_TTL_SECS),
        rooms: Vec::new(),
    });
    let body = serde_json::json!({ "token": token, "user": name }).to_string();
    let mut r = json(StatusCode::OK, body);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A sign-in name: what the token check will accept as both id and name.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("a name is required");
    }
    if name.chars().count() > MAX_DEV_NAME_CHARS {
        return Err("a name is at most 32 characters");
    }
    if find_hidden_char(name).is_some() {
        return Err("a name cannot hold control or invisible characters");
    }
    Ok(())
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    typed(status, Bytes::from(body), "application/json")
}

/// A response of content type `kind` that browsers must not sniff as
/// anything else.
fn typed(status: StatusCode, body: Bytes, kind: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_like_token_names() {
        assert!(check_name("ada").is_ok());
        assert!(check_name("Ada Lovelace 🙂").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(33)).is_err());
        assert!(check_name("a\u{202e}b").is_err());
        assert!(check_name("a\nb").is_err());
    }

    #[test]
    fn only_the_page_files_are_served() {
        for path in ["/", "/index.html", "/app.js", "/app.css"] {
            let r = asset(path).expect(path);
            assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        }
        for path in ["/app.js.map", "/../Cargo.toml", "/web/app.js", "/dev/token"] {
            assert!(asset(path).is_none(), "{path}");
        }
    }
}
