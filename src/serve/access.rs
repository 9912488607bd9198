//! Who may use the server, and from which page: a bearer token, a Host allow-list and a CORS
//! policy, checked before any route runs.
//!
//! - Token (`mvlt serve --token-file`): every route but `/healthz`, the page and
//!   `/openapi.json` (which hold no data) needs `Authorization: Bearer <token>`; 401 otherwise.
//!   Required when the server listens beyond loopback, unless `--insecure-public` says otherwise.
//! - Host: a page on another site can point its own host name at this machine (DNS
//!   rebinding) and then read answers as "same-origin"; answering only requests whose `Host` names
//!   this server (loopback names, the listening address, `--allow-host`) stops that. 403 otherwise.
//! - Origin: a browser sends a cross-site multipart POST without asking first (it is a "simple"
//!   request), so the server refuses requests whose `Origin` is neither its own nor one of
//!   `--cors-origin`, before they run. Allowed origins get CORS headers and preflight answers.
//!
//! `/healthz` is exempt from all three: load balancers probe it by address.

use super::ApiError;
use anyhow::{bail, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// Routes that answer without a token: they carry no catalogue or model data.
const PUBLIC_PATHS: [&str; 3] = ["/", "/openapi.json", "/healthz"];
/// Shortest accepted token: 128 bits of randomness written as hex is 32 characters.
pub const MIN_TOKEN_CHARS: usize = 16;

/// The access policy of one server.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// The bearer token every data route requires, if any.
    pub token: Option<String>,
    /// Host names (without port, lower case) requests may name; `None`: any.
    pub hosts: Option<Vec<String>>,
    /// Origins (scheme://host[:port]) allowed cross-origin; `*` allows any.
    pub cors_origins: Vec<String>,
}

impl Access {
    /// The policy for a server listening on `addr`: loopback names and the address itself, plus
    /// `extra_hosts` (`*`: any host), the token, the CORS origins. A server listening beyond
    /// loopback needs a token unless `insecure_public`.
    pub fn new(
        addr: SocketAddr,
        token: Option<String>,
        extra_hosts: &[String],
        cors_origins: &[String],
        insecure_public: bool,
    ) -> Result<Access> {
        if !addr.ip().is_loopback() && token.is_none() && !insecure_public {
            bail!(
                "listening on {addr} exposes the API beyond this machine: give it a token (--token-file FILE, a line of at \
                 least {MIN_TOKEN_CHARS} characters, e.g. from `openssl rand -hex 16`), or pass --insecure-public to \
                 serve without one"
            );
        }
        for o in cors_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                bail!("--cors-origin '{o}' is not an origin: write it as scheme://host[:port], e.g. https://shop.example.com");
            }
        }
        let hosts = if extra_hosts.iter().any(|h| h == "*") {
            None
        } else {
            let mut hosts = Access::loopback().hosts.unwrap_or_default();
            if !addr.ip().is_unspecified() {
                hosts.push(addr.ip().to_string());
            }
            hosts.extend(extra_hosts.iter().map(|h| h.to_ascii_lowercase()));
            Some(hosts)
        };
        Ok(Access {
            token,
            hosts,
            cors_origins: cors_origins.iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect(),
        })
    }

    /// Loopback names only, no token, no cross-origin pages: a server on 127.0.0.1.
    pub fn loopback() -> Access {
        Access {
            token: None,
            hosts: Some(["localhost", "127.0.0.1", "::1"].map(String::from).to_vec()),
            cors_origins: vec![],
        }
    }

    /// Read a token file: its first line, trimmed, of at least [`MIN_TOKEN_CHARS`] visible ASCII
    /// characters.
    pub fn read_token(path: &Path) -> Result<String> {
        let text = mvlt::files::read_text_limited(path, "token file", 4096)?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        if token.chars().count() < MIN_TOKEN_CHARS || !token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!(
                "the token in {} must be one line of at least {MIN_TOKEN_CHARS} visible ASCII characters (no spaces), e.g. \
                 from `openssl rand -hex 16`",
                path.display()
            );
        }
        Ok(token)
    }

    fn host_allowed(&self, host: &str) -> bool {
        let Some(hosts) = &self.hosts else { return true };
        let name = host_name(host).to_ascii_lowercase();
        hosts.contains(&name)
    }

    fn token_ok(&self, req: &Request) -> bool {
        let Some(token) = &self.token else { return true };
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        let given = given.strip_prefix("Bearer ").unwrap_or("");
        constant_time_eq(given.trim().as_bytes(), token.as_bytes())
    }

    fn cors_allowed(&self, origin: &str) -> bool {
        self.cors_origins.iter().any(|o| o == "*" || o == origin)
    }
}

/// The host name of a `Host` header value (`name:port`, `[v6]:port`, `name`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Compare without an early exit, so the time taken says nothing about how much of a guess was
/// right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for (i, &y) in b.iter().enumerate() {
        diff |= (a.get(i).copied().unwrap_or(0) ^ y) as u64;
    }
    diff == 0
}

fn refuse(status: StatusCode, msg: String) -> Response {
    let mut r = ApiError(status, msg).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// The middleware: Host, then Origin (answering allowed preflights), then the token.
pub async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some(host) = host else {
        return refuse(StatusCode::BAD_REQUEST, "the request has no Host header".into());
    };
    if !access.host_allowed(&host) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "this server does not answer to the host name '{}' (the server's operator can allow it with --allow-host)",
                mvlt::files::printable(host_name(&host))
            ),
        );
    }
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(|o| o.to_ascii_lowercase());
    let cross_origin = match &origin {
        None => None,
        Some(o) => {
            let same = o.split_once("://").is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(&host));
            if same {
                None
            } else if access.cors_allowed(o) {
                Some(o.clone())
            } else {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!(
                        "requests from pages of {} are not allowed (the server's operator can allow that origin with --cors-origin)",
                        mvlt::files::printable(o)
                    ),
                );
            }
        }
    };
    if let (Some(o), &Method::OPTIONS) = (&cross_origin, req.method()) {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        cors_headers(h, o);
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        return r;
    }
    if !PUBLIC_PATHS.contains(&path.as_str()) && !access.token_ok(&req) {
        let mut r = refuse(
            StatusCode::UNAUTHORIZED,
            "this server needs its access token: send the header 'Authorization: Bearer <token>'".into(),
        );
        if let Some(o) = &cross_origin {
            cors_headers(r.headers_mut(), o);
        }
        return r;
    }
    let mut r = next.run(req).await;
    if let Some(o) = &cross_origin {
        cors_headers(r.headers_mut(), o);
    }
    r
}

fn cors_headers(h: &mut axum::http::HeaderMap, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_tokens() {
        assert_eq!(host_name("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("Shop.Example"), "Shop.Example");
        let a = Access::new("127.0.0.1:0".parse().unwrap(), None, &[], &[], false).unwrap();
        assert!(a.host_allowed("localhost:1234") && a.host_allowed("[::1]:1") && a.host_allowed("127.0.0.1"));
        assert!(!a.host_allowed("evil.example:8080") && !a.host_allowed("127.0.0.1.evil.example"));
        let any = Access::new("127.0.0.1:0".parse().unwrap(), None, &["*".into()], &[], false).unwrap();
        assert!(any.host_allowed("evil.example"));
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(
            !constant_time_eq(b"abcdeg", b"abcdef")
                && !constant_time_eq(b"abc", b"abcdef")
                && !constant_time_eq(b"", b"a")
        );
    }

    #[test]
    fn public_addresses_need_a_token_or_an_explicit_opt_out() {
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let e = Access::new(public, None, &[], &[], false).unwrap_err().to_string();
        assert!(e.contains("--token-file") && e.contains("--insecure-public"), "{e}");
        assert!(Access::new(public, Some("x".repeat(20)), &[], &[], false).is_ok());
        assert!(Access::new(public, None, &[], &[], true).is_ok());
        let e = Access::new(public, None, &[], &["shop.example".into()], true).unwrap_err().to_string();
        assert!(e.contains("not an origin"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        for (text, ok) in [("short\n", false), ("has a space in it here\n", false), ("0123456789abcdef0123\n", true)] {
            std::fs::write(&f, text).unwrap();
            assert_eq!(Access::read_token(&f).is_ok(), ok, "{text}");
        }
    }
}
