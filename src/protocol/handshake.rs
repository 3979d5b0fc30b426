//! HTTP/1.1 request head parsing and the WebSocket upgrade (RFC 6455 §4),
//! sans-IO.
//!
//! Owns: turning the first bytes of a connection into a [`RequestHead`]
//! (with httparse, under the header-size and header-count caps), deciding
//! whether it is a well-formed upgrade on `/ws`, an HTTP endpoint, or a
//! refusal (PROTOCOL.md §1), and writing the HTTP responses. Policy that needs
//! server state (origin allowlist, IP limits, tokens) is the caller's.

/// Largest request head accepted, in bytes (PROTOCOL.md §1: 431 beyond it).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines accepted; more is treated like an oversized head.
pub const MAX_HEADERS: usize = 64;

/// The parts of a request head this server looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub upgrade_websocket: bool,
    pub connection_upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    pub origin: Option<String>,
    /// Every `X-Forwarded-For` hop, in header order, left to right.
    pub forwarded_for: Vec<String>,
    pub authorization: Option<String>,
}

/// What parsing the bytes received so far produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A complete head, and how many bytes it used.
    Complete(RequestHead, usize),
    /// A refusal: status code and message for the JSON body.
    Refused(Refusal),
}

/// A refusal before the upgrade: an HTTP status and a human message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: &'static str,
    /// Seconds for a `Retry-After` header (503: the client should come
    /// back, or try another instance, after this long).
    pub retry_after_s: Option<u32>,
}

impl Refusal {
    pub const fn new(status: u16, message: &'static str) -> Self {
        Self { status, message, retry_after_s: None }
    }

    /// A 503 with `Retry-After: retry_after_s`.
    pub const fn unavailable(message: &'static str, retry_after_s: u32) -> Self {
        Self { status: 503, message, retry_after_s: Some(retry_after_s) }
    }
}

/// Parses a request head from `buf` (everything received so far).
pub fn parse_head(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD_BYTES => n,
        Ok(httparse::Status::Complete(_)) => return Parsed::Refused(Refusal::new(431, "request headers too large")),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Parsed::Refused(Refusal::new(431, "request headers too large"))
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Refused(Refusal::new(431, "too many request headers")),
        Err(_) => return Parsed::Refused(Refusal::new(400, "malformed HTTP request")),
    };
    if req.version != Some(1) {
        return Parsed::Refused(Refusal::new(400, "HTTP/1.1 required"));
    }
    let target = req.path.unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/");
    let mut head =
        RequestHead { method: req.method.unwrap_or("").to_owned(), path: path.to_owned(), ..RequestHead::default() };
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            continue;
        };
        let value = value.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            head.upgrade_websocket |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            head.connection_upgrade |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            head.ws_key = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("origin") {
            head.origin = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            head.forwarded_for.extend(value.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()));
        } else if name.eq_ignore_ascii_case("authorization") {
            head.authorization = Some(value.to_owned());
        }
    }
    Parsed::Complete(head, used)
}

fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Where a complete request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A well-formed WebSocket upgrade on `/ws`, with its key.
    Upgrade {
        key: String,
    },
    /// A plain HTTP request for `path` (the endpoints of §8).
    Http,
    Refused(Refusal),
}

/// Classifies a request: the protocol-level checks of PROTOCOL.md §1.
pub fn route(head: &RequestHead) -> Route {
    let wants_ws = head.upgrade_websocket || head.path == "/ws";
    if !wants_ws {
        return Route::Http;
    }
    if head.path != "/ws" {
        return Route::Refused(Refusal::new(404, "not found: WebSocket upgrades are served on /ws"));
    }
    if head.method != "GET" {
        return Route::Refused(Refusal::new(400, "WebSocket upgrade requires GET"));
    }
    if !head.upgrade_websocket || !head.connection_upgrade {
        return Route::Refused(Refusal::new(400, "missing Upgrade: websocket or Connection: Upgrade"));
    }
    if head.ws_version.as_deref() != Some("13") {
        return Route::Refused(Refusal::new(426, "unsupported Sec-WebSocket-Version"));
    }
    match &head.ws_key {
        Some(k) if is_valid_key(k) => Route::Upgrade { key: k.clone() },
        _ => Route::Refused(Refusal::new(400, "missing or invalid Sec-WebSocket-Key")),
    }
}

/// A valid key is the base64 of 16 bytes: 22 symbols then `==`.
fn is_valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22] == b'='
        && b[23] == b'='
        && b[..22].iter().all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// The bearer token of an `Authorization` header, if it is one.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Appends the `101 Switching Protocols` response for `key`.
pub fn write_switching_protocols(key: &str, out: &mut Vec<u8>) {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends a complete HTTP response that closes the connection.
pub fn write_response(status: u16, content_type: &str, extra_headers: &[(&str, &str)], body: &[u8], out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        reason_phrase(status),
        body.len()
    );
    for (name, value) in extra_headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Appends a refusal: the status with a `{"error": "..."}` body.
pub fn write_refusal(refusal: Refusal, out: &mut Vec<u8>) {
    let body = serde_json::json!({ "error": refusal.message }).to_string();
    let retry = refusal.retry_after_s.map(|s| s.to_string());
    let extra: &[(&str, &str)] = match (refusal.status, &retry) {
        (426, _) => &[("Sec-WebSocket-Version", "13")],
        (_, Some(secs)) => &[("Retry-After", secs.as_str())],
        _ => &[],
    };
    write_response(refusal.status, "application/json", extra, body.as_bytes(), out);
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_503_says_when_to_retry() {
        let mut out = Vec::new();
        write_refusal(Refusal::unavailable("full", 5), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
        assert!(text.contains("\r\nRetry-After: 5\r\n"), "{text}");
        let mut out = Vec::new();
        write_refusal(Refusal::new(403, "no"), &mut out);
        assert!(!String::from_utf8(out).unwrap().contains("Retry-After"));
    }

    const UPGRADE: &str = "GET /ws?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.example\r\nX-Forwarded-For: 1.1.1.1, 2.2.2.2\r\nX-Forwarded-For: 3.3.3.3\r\n\r\n";

    fn head(text: &str) -> RequestHead {
        match parse_head(text.as_bytes()) {
            Parsed::Complete(h, n) => {
                assert_eq!(n, text.len());
                h
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_an_upgrade() {
        let h = head(UPGRADE);
        assert_eq!(h.path, "/ws");
        assert_eq!(h.origin.as_deref(), Some("https://app.example"));
        assert_eq!(h.forwarded_for, ["1.1.1.1", "2.2.2.2", "3.3.3.3"]);
        assert_eq!(route(&h), Route::Upgrade { key: "dGhlIHNhbXBsZSBub25jZQ==".into() });
        let mut out = Vec::new();
        write_switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", &mut out);
        // RFC 6455 §1.3's worked example.
        assert!(String::from_utf8(out).unwrap().contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn partial_until_blank_line_then_431_past_8k() {
        assert_eq!(parse_head(b"GET /ws HTTP/1.1\r\nHost: a\r\n"), Parsed::Partial);
        let mut big = b"GET /ws HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 1, b'a');
        assert!(matches!(parse_head(&big), Parsed::Refused(Refusal { status: 431, .. })));
        let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
        let req = format!("GET /ws HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parse_head(req.as_bytes()), Parsed::Refused(Refusal { status: 431, .. })));
    }

    #[test]
    fn refusals() {
        let status = |text: &str| match route(&head(text)) {
            Route::Refused(r) => r.status,
            other => panic!("{other:?}"),
        };
        assert_eq!(status(&UPGRADE.replace("/ws?x=1", "/other")), 404);
        assert_eq!(status(&UPGRADE.replace("GET", "POST")), 400);
        assert_eq!(status(&UPGRADE.replace("Upgrade: websocket\r\n", "")), 400);
        assert_eq!(status(&UPGRADE.replace("keep-alive, Upgrade", "keep-alive")), 400);
        assert_eq!(status(&UPGRADE.replace("Version: 13", "Version: 8")), 426);
        assert_eq!(status(&UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")), 400);
        assert_eq!(status("GET /ws HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(route(&head("GET /health HTTP/1.1\r\n\r\n")), Route::Http);
        assert!(matches!(parse_head(b"GARBAGE\r\n\r\n"), Parsed::Refused(Refusal { status: 400, .. })));
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }

    #[test]
    fn refusal_body_is_json_and_426_names_the_version() {
        let mut out = Vec::new();
        write_refusal(Refusal::new(426, "x"), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(text.ends_with("{\"error\":\"x\"}"));
    }
}
