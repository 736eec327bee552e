//! Sans-IO HTTP/1.1 request-head parsing, WebSocket upgrade validation and small responses.
//!
//! Every TCP connection to the hub begins with an HTTP/1.x request head. The connection code
//! appends bytes to a buffer and calls [`parse_head`] until it yields a [`RequestHead`], then
//! reads `content_length` body bytes (if any) that follow `head_len`. A `GET /ws` carrying a
//! valid upgrade is turned into a WebSocket with [`accept_upgrade`] + [`switching_protocols`];
//! every other request is answered with [`response`] / [`json_error`].
//!
//! This module never touches sockets: it only inspects byte slices and builds byte vectors.
//!
//! # Invariants
//! - [`parse_head`] never panics and never looks at more than `max_head_size` bytes, so the
//!   work per call is bounded no matter how large the buffer grows.
//! - `Ok(None)` is returned only while the head is incomplete **and** could still complete
//!   within `max_head_size`; once the buffer reaches that size without a complete head the
//!   result is a 431 error, so a caller looping on `Ok(None)` cannot buffer without bound.
//! - A returned head always has `head_len <= max_head_size` and
//!   `content_length <= max_body_size`.
//! - Any `Transfer-Encoding` on a request is refused (501): bodies are only ever delimited by
//!   `Content-Length`, which removes request-smuggling ambiguity. Conflicting or non-numeric
//!   `Content-Length` values are a 400.
//! - After any [`HttpError`] the connection must be closed (the byte stream can no longer be
//!   trusted to be in sync); [`HttpError::to_response`] builds a `Connection: close` reply.
//! - Generated responses never contain raw CR/LF inside header names or values (they are
//!   replaced by spaces), so caller-supplied strings cannot inject headers.

use std::fmt::Write as _;

/// Size limits applied while parsing a request.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Maximum size of the request line plus headers plus the terminating blank line.
    pub max_head_size: usize,
    /// Maximum number of header fields.
    pub max_headers: usize,
    /// Maximum accepted `Content-Length`.
    pub max_body_size: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_head_size: 8192,
            max_headers: 32,
            max_body_size: 1 << 20,
        }
    }
}

/// The request method, reduced to what the hub distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Other,
}

impl Method {
    fn from_token(token: &str) -> Self {
        // Methods are case-sensitive (RFC 9110 §9.1).
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            _ => Method::Other,
        }
    }
}

/// A parsed HTTP/1.x request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// Request target without the query string (`/ws` for `/ws?x=1`).
    pub path: String,
    /// Everything after the first `?` (may be empty), `None` when there is no `?`.
    pub query: Option<String>,
    /// Minor version of HTTP/1.x (0 or 1).
    pub version_minor: u8,
    /// HTTP/1.1: true unless `Connection: close`; HTTP/1.0: only with `Connection: keep-alive`
    /// (and no `close`).
    pub keep_alive: bool,
    /// Declared body length, 0 when absent.
    pub content_length: usize,
    /// Raw `Authorization` value (trimmed).
    pub authorization: Option<String>,
    /// `Origin` (browsers send it on WebSocket upgrades); a repeated field is malformed.
    pub origin: Option<String>,
    /// Some when the request lists `websocket` in its `Upgrade` header (any case).
    pub upgrade: Option<UpgradeRequest>,
    /// Number of bytes of the buffer consumed by the head (body starts here).
    pub head_len: usize,
}

/// The WebSocket-related headers of a request that asks for an upgrade. Validation happens
/// in [`accept_upgrade`]; parsing only collects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// `Sec-WebSocket-Key`; repeated fields are joined with `", "` (and then fail validation).
    pub key: Option<String>,
    /// `Sec-WebSocket-Version`; repeated fields are joined with `", "`.
    pub version: Option<String>,
    /// Whether some `Connection` header carries the `upgrade` token.
    pub connection_upgrade: bool,
    /// `Sec-WebSocket-Protocol` tokens, in order, across all such fields.
    pub protocols: Vec<String>,
    /// `Sec-WebSocket-Extensions`, fields joined with `", "`.
    pub extensions: Option<String>,
}

/// Why a request head was rejected. Each variant maps to an HTTP status via
/// [`HttpError::status`]; the connection must be closed afterwards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Syntactically invalid request (400).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The head did not complete within `max_head_size` bytes (431).
    #[error("request head exceeds {limit} bytes")]
    HeadTooLarge { limit: usize },
    /// More header fields than `max_headers` (431).
    #[error("more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    /// Declared `Content-Length` exceeds `max_body_size` (413).
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// A `Content-Length` that is not a decimal number, or conflicting duplicates (400).
    #[error("invalid Content-Length")]
    InvalidContentLength,
    /// Any `Transfer-Encoding` (e.g. chunked) on a request (501).
    #[error("Transfer-Encoding is not supported")]
    TransferEncodingUnsupported,
}

impl HttpError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) | HttpError::InvalidContentLength => 400,
            HttpError::HeadTooLarge { .. } | HttpError::TooManyHeaders { .. } => 431,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::TransferEncodingUnsupported => 501,
        }
    }

    /// A short machine-readable code for [`json_error`].
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::Malformed(_) | HttpError::InvalidContentLength => "bad_request",
            HttpError::HeadTooLarge { .. } | HttpError::TooManyHeaders { .. } => {
                "headers_too_large"
            }
            HttpError::BodyTooLarge { .. } => "payload_too_large",
            HttpError::TransferEncodingUnsupported => "not_implemented",
        }
    }

    /// A complete JSON error response with `Connection: close`.
    pub fn to_response(&self) -> Vec<u8> {
        json_error(self.status(), self.code(), &self.to_string(), false)
    }
}

fn map_httparse_error(err: httparse::Error, limits: &HttpLimits) -> HttpError {
    match err {
        httparse::Error::TooManyHeaders => HttpError::TooManyHeaders {
            limit: limits.max_headers,
        },
        httparse::Error::HeaderName => HttpError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HttpError::Malformed("invalid header value"),
        httparse::Error::NewLine => HttpError::Malformed("invalid line ending"),
        httparse::Error::Token => HttpError::Malformed("invalid request line"),
        httparse::Error::Version => HttpError::Malformed("unsupported HTTP version"),
        httparse::Error::Status => HttpError::Malformed("invalid request"),
    }
}

/// Trim optional whitespace (SP / HTAB) from both ends of a byte slice.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Iterate the non-empty, whitespace-trimmed elements of a comma-separated header value.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|item| !item.is_empty())
}

/// Whether a comma-separated header value contains `token` (ASCII case-insensitive).
pub fn header_has_token(value: &[u8], token: &str) -> bool {
    list_items(value).any(|item| item.eq_ignore_ascii_case(token.as_bytes()))
}

fn value_str(value: &[u8], what: &'static str) -> Result<String, HttpError> {
    std::str::from_utf8(trim_ows(value))
        .map(str::to_owned)
        .map_err(|_| HttpError::Malformed(what))
}

fn join_into(slot: &mut Option<String>, value: String) {
    match slot {
        Some(existing) => {
            existing.push_str(", ");
            existing.push_str(&value);
        }
        None => *slot = Some(value),
    }
}

/// Parse one `Content-Length` field value. Returns the length, saturated at `usize::MAX`
/// for absurdly large numbers (which then fail the body-size limit with 413).
fn parse_content_length(value: &[u8]) -> Result<usize, HttpError> {
    // A list of identical values ("5, 5") is tolerated (RFC 9110 §8.6); anything else is not.
    let mut result: Option<usize> = None;
    let mut any = false;
    for item in value.split(|&b| b == b',').map(trim_ows) {
        if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
            return Err(HttpError::InvalidContentLength);
        }
        any = true;
        let n = item.iter().fold(0usize, |acc, &d| {
            acc.saturating_mul(10).saturating_add(usize::from(d - b'0'))
        });
        match result {
            Some(prev) if prev != n => return Err(HttpError::InvalidContentLength),
            _ => result = Some(n),
        }
    }
    match (any, result) {
        (true, Some(n)) => Ok(n),
        _ => Err(HttpError::InvalidContentLength),
    }
}

/// Parse an HTTP/1.x request head from the start of `buf`.
///
/// `Ok(None)`: the head is incomplete (and still within `max_head_size`); read more and call
/// again with the grown buffer. `Err` when malformed or over limits (a buffer that reaches
/// `max_head_size` bytes without a complete head → 431). Bytes after `head_len` (the body or
/// pipelined data) are not inspected. Never panics on any input.
pub fn parse_head(buf: &[u8], limits: &HttpLimits) -> Result<Option<RequestHead>, HttpError> {
    // Only look at what could legally be part of the head: bounds the work per call.
    let window = &buf[..buf.len().min(limits.max_head_size)];
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.max_head_size {
                return Err(HttpError::HeadTooLarge {
                    limit: limits.max_head_size,
                });
            }
            return Ok(None);
        }
        Err(e) => return Err(map_httparse_error(e, limits)),
    };

    let (Some(method), Some(target), Some(version_minor)) = (req.method, req.path, req.version)
    else {
        return Err(HttpError::Malformed("incomplete request line"));
    };
    let method = Method::from_token(method);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };

    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut conn_upgrade = false;
    let mut upgrade_websocket = false;
    let mut content_length: Option<usize> = None;
    let mut transfer_encoding = false;
    let mut authorization: Option<String> = None;
    let mut origin: Option<String> = None;
    let mut ws_key: Option<String> = None;
    let mut ws_version: Option<String> = None;
    let mut ws_protocols: Vec<String> = Vec::new();
    let mut ws_extensions: Option<String> = None;

    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("connection") {
            for item in list_items(value) {
                if item.eq_ignore_ascii_case(b"close") {
                    conn_close = true;
                } else if item.eq_ignore_ascii_case(b"keep-alive") {
                    conn_keep_alive = true;
                } else if item.eq_ignore_ascii_case(b"upgrade") {
                    conn_upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            if header_has_token(value, "websocket") {
                upgrade_websocket = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(value)?;
            match content_length {
                Some(prev) if prev != n => return Err(HttpError::InvalidContentLength),
                _ => content_length = Some(n),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("authorization") {
            if authorization.is_some() {
                return Err(HttpError::Malformed("duplicate Authorization header"));
            }
            authorization = Some(value_str(value, "invalid Authorization header")?);
        } else if name.eq_ignore_ascii_case("origin") {
            if origin.is_some() {
                return Err(HttpError::Malformed("duplicate Origin header"));
            }
            origin = Some(value_str(value, "invalid Origin header")?);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            let v = value_str(value, "invalid Sec-WebSocket-Key header")?;
            join_into(&mut ws_key, v);
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            let v = value_str(value, "invalid Sec-WebSocket-Version header")?;
            join_into(&mut ws_version, v);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for item in list_items(value) {
                let p = std::str::from_utf8(item)
                    .map_err(|_| HttpError::Malformed("invalid Sec-WebSocket-Protocol header"))?;
                ws_protocols.push(p.to_owned());
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            let v = value_str(value, "invalid Sec-WebSocket-Extensions header")?;
            if !v.is_empty() {
                join_into(&mut ws_extensions, v);
            }
        }
    }

    if transfer_encoding {
        return Err(HttpError::TransferEncodingUnsupported);
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > limits.max_body_size {
        return Err(HttpError::BodyTooLarge {
            limit: limits.max_body_size,
        });
    }

    let keep_alive = if version_minor >= 1 {
        !conn_close
    } else {
        conn_keep_alive && !conn_close
    };

    let upgrade = upgrade_websocket.then_some(UpgradeRequest {
        key: ws_key,
        version: ws_version,
        connection_upgrade: conn_upgrade,
        protocols: ws_protocols,
        extensions: ws_extensions,
    });

    Ok(Some(RequestHead {
        method,
        path,
        query,
        version_minor,
        keep_alive,
        content_length,
        authorization,
        origin,
        upgrade,
        head_len,
    }))
}

/// Whether `key` is canonical base64 of exactly 16 bytes (24 chars ending in `==`).
fn is_valid_ws_key(key: &str) -> bool {
    fn sextet(c: u8) -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let bytes = key.as_bytes();
    if bytes.len() != 24 || &bytes[22..] != b"==" {
        return false;
    }
    let mut last = 0;
    for &c in &bytes[..22] {
        match sextet(c) {
            Some(v) => last = v,
            None => return false,
        }
    }
    // 16 bytes = 21 full sextets + 2 bits: the unused low 4 bits of the last one must be 0.
    last & 0x0F == 0
}

/// Validate a WebSocket upgrade request (RFC 6455 §4.2.1).
///
/// Requires method GET, HTTP/1.1 (or later minor), `Upgrade: websocket`, a `Connection`
/// header with the `upgrade` token, `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`
/// that is base64 of 16 bytes. Returns the `Sec-WebSocket-Accept` value, or
/// `(status, message)`: 400 for a bad/missing key or headers, 426 for a missing-but-wrong
/// version (the reply must then carry `Sec-WebSocket-Version: 13`; see
/// [`upgrade_error_response`]).
pub fn accept_upgrade(head: &RequestHead) -> Result<String, (u16, &'static str)> {
    if head.method != Method::Get {
        return Err((400, "websocket upgrade requires GET"));
    }
    if head.version_minor < 1 {
        return Err((400, "websocket upgrade requires HTTP/1.1"));
    }
    let Some(up) = &head.upgrade else {
        return Err((400, "missing Upgrade: websocket header"));
    };
    if !up.connection_upgrade {
        return Err((400, "missing Connection: upgrade header"));
    }
    match up.version.as_deref() {
        None => return Err((400, "missing Sec-WebSocket-Version header")),
        Some("13") => {}
        Some(_) => return Err((426, "unsupported Sec-WebSocket-Version (expected 13)")),
    }
    let Some(key) = up.key.as_deref() else {
        return Err((400, "missing Sec-WebSocket-Key header"));
    };
    if !is_valid_ws_key(key) {
        return Err((400, "invalid Sec-WebSocket-Key header"));
    }
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// The error reply for a failed [`accept_upgrade`]: a JSON error with `Connection: close`,
/// plus `Sec-WebSocket-Version: 13` when the status is 426.
pub fn upgrade_error_response(status: u16, message: &str) -> Vec<u8> {
    let code = if status == 426 {
        "upgrade_required"
    } else {
        "bad_request"
    };
    let body = json_error_body(code, message);
    let extra: &[(&str, &str)] = if status == 426 {
        &[("Sec-WebSocket-Version", "13")]
    } else {
        &[]
    };
    response_with_headers(status, "application/json", extra, body.as_bytes(), false)
}

/// `HTTP/1.1 101 Switching Protocols` with Upgrade/Connection/Sec-WebSocket-Accept.
pub fn switching_protocols(accept_key: &str) -> Vec<u8> {
    switching_protocols_with_protocol(accept_key, None)
}

/// Like [`switching_protocols`], additionally selecting a subprotocol when `protocol` is Some.
pub fn switching_protocols_with_protocol(accept_key: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut out = String::with_capacity(160);
    out.push_str(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    push_header(&mut out, "Sec-WebSocket-Accept", accept_key);
    if let Some(p) = protocol {
        push_header(&mut out, "Sec-WebSocket-Protocol", p);
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// Append `Name: value\r\n`, replacing any CR/LF so nothing can be injected.
fn push_header(out: &mut String, name: &str, value: &str) {
    for c in name.chars() {
        out.push(if c == '\r' || c == '\n' || c == ':' {
            ' '
        } else {
            c
        });
    }
    out.push_str(": ");
    for c in value.chars() {
        out.push(if c == '\r' || c == '\n' { ' ' } else { c });
    }
    out.push_str("\r\n");
}

/// A complete response with Content-Length, Content-Type, and `Connection: close` when
/// `!keep_alive` (`Connection: keep-alive` otherwise, so HTTP/1.0 clients keep the connection).
pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    response_with_headers(status, content_type, &[], body, keep_alive)
}

/// [`response`] with extra headers (e.g. `Sec-WebSocket-Version` for 426, `WWW-Authenticate`
/// for 401). For 1xx / 204 / 304 no body, Content-Type or Content-Length is emitted.
pub fn response_with_headers(
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let bodyless = (100..200).contains(&status) || status == 204 || status == 304;
    let mut head = String::with_capacity(128);
    // Writing to a String cannot fail.
    let _ = write!(head, "HTTP/1.1 {} {}\r\n", status, reason_phrase(status));
    if !bodyless {
        push_header(&mut head, "Content-Type", content_type);
        let _ = write!(head, "Content-Length: {}\r\n", body.len());
    }
    for (name, value) in extra_headers {
        push_header(&mut head, name, value);
    }
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n"
    } else {
        "Connection: close\r\n"
    });
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if !bodyless {
        out.extend_from_slice(body);
    }
    out
}

pub fn json_error_body(code: &str, message: &str) -> String {
    let code = serde_json::Value::String(code.to_owned());
    let message = serde_json::Value::String(message.to_owned());
    format!("{{\"ok\":false,\"error\":{{\"code\":{code},\"message\":{message}}}}}")
}

/// `{"ok":false,"error":{"code":<code>,"message":<message>}}` as application/json with the status.
pub fn json_error(status: u16, code: &str, message: &str, keep_alive: bool) -> Vec<u8> {
    let body = json_error_body(code, message);
    response(status, "application/json", body.as_bytes(), keep_alive)
}

/// The standard reason phrase for `status` (`"Unknown"` for codes not listed).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UPGRADE_REQ: &str = "GET /ws?token=abc HTTP/1.1\r\n\
        Host: example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Protocol: chat, superchat\r\n\
        \r\n";

    fn limits() -> HttpLimits {
        HttpLimits {
            max_head_size: 8192,
            max_headers: 32,
            max_body_size: 1024,
        }
    }

    fn parse(s: &str) -> Result<Option<RequestHead>, HttpError> {
        parse_head(s.as_bytes(), &limits())
    }

    fn parse_ok(s: &str) -> RequestHead {
        parse(s).expect("parse error").expect("incomplete head")
    }

    fn upgrade_head(extra: &str, method: &str, version: &str, key: Option<&str>) -> RequestHead {
        let mut s = format!("{method} /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n{extra}");
        s.push_str(&format!("Sec-WebSocket-Version: {version}\r\n"));
        if let Some(k) = key {
            s.push_str(&format!("Sec-WebSocket-Key: {k}\r\n"));
        }
        s.push_str("\r\n");
        parse_ok(&s)
    }

    #[test]
    fn complete_upgrade_request() {
        let h = parse_ok(UPGRADE_REQ);
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.path, "/ws");
        assert_eq!(h.query.as_deref(), Some("token=abc"));
        assert_eq!(h.version_minor, 1);
        assert!(h.keep_alive);
        assert_eq!(h.content_length, 0);
        assert_eq!(h.head_len, UPGRADE_REQ.len());
        let up = h.upgrade.expect("upgrade");
        assert_eq!(up.key.as_deref(), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(up.version.as_deref(), Some("13"));
        assert!(up.connection_upgrade);
        assert_eq!(
            up.protocols,
            vec!["chat".to_string(), "superchat".to_string()]
        );
        assert_eq!(up.extensions, None);
    }

    #[test]
    fn every_split_point_is_incomplete_until_the_end() {
        let bytes = UPGRADE_REQ.as_bytes();
        for i in 0..bytes.len() {
            assert_eq!(
                parse_head(&bytes[..i], &limits()),
                Ok(None),
                "prefix of length {i} should be incomplete"
            );
        }
        let full = parse_head(bytes, &limits()).unwrap().unwrap();
        assert_eq!(full.head_len, bytes.len());
    }

    #[test]
    fn head_len_excludes_trailing_body() {
        let s = "POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let h = parse_ok(s);
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.content_length, 5);
        assert_eq!(&s[h.head_len..], "hello");
        assert!(h.upgrade.is_none());
    }

    #[test]
    fn query_split() {
        let h = parse_ok("GET /metrics?a=1&b=2?c HTTP/1.1\r\n\r\n");
        assert_eq!(h.path, "/metrics");
        assert_eq!(h.query.as_deref(), Some("a=1&b=2?c"));
        let h = parse_ok("GET /healthz HTTP/1.1\r\n\r\n");
        assert_eq!(h.path, "/healthz");
        assert_eq!(h.query, None);
        let h = parse_ok("GET /x? HTTP/1.1\r\n\r\n");
        assert_eq!(h.path, "/x");
        assert_eq!(h.query.as_deref(), Some(""));
    }

    #[test]
    fn methods() {
        assert_eq!(parse_ok("HEAD / HTTP/1.1\r\n\r\n").method, Method::Head);
        assert_eq!(parse_ok("DELETE / HTTP/1.1\r\n\r\n").method, Method::Other);
        assert_eq!(parse_ok("get / HTTP/1.1\r\n\r\n").method, Method::Other);
    }

    #[test]
    fn keep_alive_rules() {
        assert!(parse_ok("GET / HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!parse_ok("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!parse_ok("GET / HTTP/1.1\r\nConnection: CLOSE\r\n\r\n").keep_alive);
        assert!(!parse_ok("GET / HTTP/1.0\r\n\r\n").keep_alive);
        let h = parse_ok("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert_eq!(h.version_minor, 0);
        assert!(h.keep_alive);
        assert!(!parse_ok("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n").keep_alive);
        assert!(
            !parse_ok("GET / HTTP/1.1\r\nConnection: upgrade\r\nConnection: close\r\n\r\n")
                .keep_alive
        );
    }

    #[test]
    fn connection_multiple_tokens() {
        let h = parse_ok(
            "GET /ws HTTP/1.1\r\nConnection: keep-alive,  Upgrade \r\nUpgrade: WebSocket\r\n\r\n",
        );
        assert!(h.keep_alive);
        assert!(h.upgrade.expect("upgrade").connection_upgrade);
        let h =
            parse_ok("GET /ws HTTP/1.1\r\nConnection: keep-alive\r\nUpgrade: websocket\r\n\r\n");
        assert!(!h.upgrade.expect("upgrade").connection_upgrade);
        // Substrings are not tokens.
        let h = parse_ok("GET /ws HTTP/1.1\r\nConnection: upgraded\r\nUpgrade: websocket\r\n\r\n");
        assert!(!h.upgrade.expect("upgrade").connection_upgrade);
        // Upgrade to something else is not a websocket upgrade.
        let h = parse_ok("GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n");
        assert!(h.upgrade.is_none());
    }

    #[test]
    fn authorization_header() {
        let h = parse_ok("GET / HTTP/1.1\r\nauthorization:  Bearer xyz \r\n\r\n");
        assert_eq!(h.authorization.as_deref(), Some("Bearer xyz"));
        assert_eq!(
            parse("GET / HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn content_length_parsing() {
        assert_eq!(parse_ok("POST /publish HTTP/1.1\r\n\r\n").content_length, 0);
        assert_eq!(
            parse_ok("POST /publish HTTP/1.1\r\nContent-Length: 42\r\n\r\n").content_length,
            42
        );
        // Identical duplicates are tolerated.
        assert_eq!(
            parse_ok("POST / HTTP/1.1\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n")
                .content_length,
            7
        );
        assert_eq!(
            parse_ok("POST / HTTP/1.1\r\nContent-Length: 7, 7\r\n\r\n").content_length,
            7
        );
        let conflicting =
            parse("POST / HTTP/1.1\r\nContent-Length: 7\r\ncontent-length: 8\r\n\r\n");
        assert_eq!(conflicting, Err(HttpError::InvalidContentLength));
        assert_eq!(conflicting.unwrap_err().status(), 400);
        for bad in ["abc", "-1", "+5", "", "5 5", "0x10", "1.5", "7, 8", "7,"] {
            let s = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            let err = parse(&s).unwrap_err();
            assert_eq!(err.status(), 400, "value {bad:?}");
        }
        assert_eq!(
            parse("POST / HTTP/1.1\r\nContent-Length: 1024\r\n\r\n")
                .unwrap()
                .unwrap()
                .content_length,
            1024
        );
        let too_big = parse("POST / HTTP/1.1\r\nContent-Length: 1025\r\n\r\n").unwrap_err();
        assert_eq!(too_big, HttpError::BodyTooLarge { limit: 1024 });
        assert_eq!(too_big.status(), 413);
        let huge =
            parse("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999999999\r\n\r\n")
                .unwrap_err();
        assert_eq!(huge.status(), 413);
    }

    #[test]
    fn transfer_encoding_rejected() {
        let err = parse("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert_eq!(err, HttpError::TransferEncodingUnsupported);
        assert_eq!(err.status(), 501);
        let err =
            parse("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap_err();
        assert_eq!(err.status(), 501);
    }

    #[test]
    fn too_many_headers() {
        let lim = HttpLimits {
            max_headers: 4,
            ..limits()
        };
        let mut ok = String::from("GET / HTTP/1.1\r\n");
        for i in 0..4 {
            ok.push_str(&format!("X-H{i}: v\r\n"));
        }
        ok.push_str("\r\n");
        assert!(parse_head(ok.as_bytes(), &lim).unwrap().is_some());
        let mut bad = String::from("GET / HTTP/1.1\r\n");
        for i in 0..5 {
            bad.push_str(&format!("X-H{i}: v\r\n"));
        }
        bad.push_str("\r\n");
        let err = parse_head(bad.as_bytes(), &lim).unwrap_err();
        assert_eq!(err, HttpError::TooManyHeaders { limit: 4 });
        assert_eq!(err.status(), 431);
    }

    #[test]
    fn head_over_max_size() {
        let lim = HttpLimits {
            max_head_size: 64,
            ..limits()
        };
        // Incomplete and below the limit: keep reading.
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nX-A: b\r\n", &lim), Ok(None));
        // Incomplete and at the limit: the head can never fit.
        let long = format!("GET / HTTP/1.1\r\nX-Long: {}", "a".repeat(100));
        let err = parse_head(long.as_bytes(), &lim).unwrap_err();
        assert_eq!(err, HttpError::HeadTooLarge { limit: 64 });
        assert_eq!(err.status(), 431);
        // A complete head that is longer than the limit is also rejected.
        let complete = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(100));
        assert_eq!(
            parse_head(complete.as_bytes(), &lim).unwrap_err().status(),
            431
        );
        // Exactly at the limit is fine, even with body bytes following it.
        let mut exact = String::from("GET / HTTP/1.1\r\nX-Pad: ");
        let pad = 64 - exact.len() - 4;
        exact.push_str(&"p".repeat(pad));
        exact.push_str("\r\n\r\n");
        assert_eq!(exact.len(), 64);
        exact.push_str("trailing body bytes beyond the head limit");
        let h = parse_head(exact.as_bytes(), &lim).unwrap().unwrap();
        assert_eq!(h.head_len, 64);
    }

    #[test]
    fn garbage_is_bad_request() {
        for g in [
            &b"\x00\x01\x02\x03 garbage\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / FTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            let err = parse_head(g, &limits()).unwrap_err();
            assert_eq!(err.status(), 400, "input {g:?}");
        }
    }

    #[test]
    fn error_response_closes() {
        let bytes = HttpError::BodyTooLarge { limit: 1 }.to_response();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 413 Content Too Large\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.contains("\"code\":\"payload_too_large\""));
    }

    #[test]
    fn accept_upgrade_rfc_example() {
        let h = parse_ok(UPGRADE_REQ);
        assert_eq!(accept_upgrade(&h).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accept_upgrade_missing_key() {
        let h = upgrade_head("Connection: Upgrade\r\n", "GET", "13", None);
        assert_eq!(accept_upgrade(&h).unwrap_err().0, 400);
    }

    #[test]
    fn accept_upgrade_bad_keys() {
        for key in [
            "dGhlIHNhbXBsZQ==",             // 10 bytes
            "dGhlIHNhbXBsZSBub25jZSE=",     // 17 chars of data
            "dGhlIHNhbXBsZSBub25jZSEhIQ==", // 19 bytes
            "dGhlIHNhbXBsZSBub25jZ!==",     // invalid char
            "dGhlIHNhbXBsZSBub25jZR==",     // non-canonical trailing bits
            "",
        ] {
            let h = upgrade_head("Connection: Upgrade\r\n", "GET", "13", Some(key));
            assert_eq!(accept_upgrade(&h).unwrap_err().0, 400, "key {key:?}");
        }
        // A duplicated key header fails too.
        let h = parse_ok(
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
             Sec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        );
        assert_eq!(accept_upgrade(&h).unwrap_err().0, 400);
    }

    #[test]
    fn accept_upgrade_wrong_version_is_426() {
        let h = upgrade_head(
            "Connection: Upgrade\r\n",
            "GET",
            "8",
            Some("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(accept_upgrade(&h).unwrap_err().0, 426);
        let resp = String::from_utf8(upgrade_error_response(426, "bad version")).unwrap();
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        let resp = String::from_utf8(upgrade_error_response(400, "bad key")).unwrap();
        assert!(!resp.contains("Sec-WebSocket-Version"));
    }

    #[test]
    fn accept_upgrade_post_is_400() {
        let h = upgrade_head(
            "Connection: Upgrade\r\n",
            "POST",
            "13",
            Some("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert!(h.upgrade.is_some());
        assert_eq!(accept_upgrade(&h).unwrap_err().0, 400);
    }

    #[test]
    fn accept_upgrade_requires_connection_upgrade() {
        let h = upgrade_head("", "GET", "13", Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(accept_upgrade(&h).unwrap_err().0, 400);
        let h = upgrade_head(
            "Connection: keep-alive\r\n",
            "GET",
            "13",
            Some("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(accept_upgrade(&h).unwrap_err().0, 400);
    }

    #[test]
    fn accept_upgrade_requires_upgrade_header_and_http11() {
        let h = parse_ok(
            "GET /ws HTTP/1.1\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        );
        assert!(h.upgrade.is_none());
        assert_eq!(accept_upgrade(&h).unwrap_err().0, 400);
        let h = parse_ok(
            "GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        );
        assert_eq!(accept_upgrade(&h).unwrap_err().0, 400);
        let h = upgrade_head(
            "Connection: Upgrade\r\n",
            "GET",
            "13",
            Some("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(
            accept_upgrade(&h).as_deref(),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
    }

    #[test]
    fn switching_protocols_bytes() {
        let bytes = switching_protocols("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        let bytes = switching_protocols_with_protocol("k", Some("chat"));
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.ends_with("Sec-WebSocket-Protocol: chat\r\n\r\n"));
    }

    #[test]
    fn response_bytes() {
        let bytes = response(200, "text/plain", b"ok\n", true);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\
             Connection: keep-alive\r\n\r\nok\n"
        );
        let bytes = response(404, "text/plain", b"", false);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("\r\nContent-Length: 0\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn response_content_length_is_exact() {
        let body = vec![b'x'; 1234];
        let bytes = response(200, "application/octet-stream", &body, true);
        let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = std::str::from_utf8(&bytes[..split]).unwrap();
        assert!(head.contains("Content-Length: 1234\r\n"));
        assert_eq!(bytes.len() - split, 1234);
        assert_eq!(&bytes[split..], &body[..]);
    }

    #[test]
    fn response_extra_headers_and_injection() {
        let bytes = response_with_headers(
            401,
            "application/json",
            &[("WWW-Authenticate", "Bearer\r\nX-Evil: 1")],
            b"{}",
            false,
        );
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(text.contains("\r\nWWW-Authenticate: Bearer  X-Evil: 1\r\n"));
        assert!(!text.contains("\r\nX-Evil"));
        let bytes = response(204, "text/plain", b"ignored", true);
        let text = String::from_utf8(bytes).unwrap();
        assert!(!text.contains("Content-Length"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn json_error_bytes() {
        let bytes = json_error(400, "bad_request", "quote \" and \\ here", true);
        let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = std::str::from_utf8(&bytes[..split]).unwrap();
        let body = &bytes[split..];
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(head.contains("Content-Type: application/json\r\n"));
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert_eq!(
            std::str::from_utf8(body).unwrap(),
            r#"{"ok":false,"error":{"code":"bad_request","message":"quote \" and \\ here"}}"#
        );
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["error"]["message"], "quote \" and \\ here");
    }

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(200), "OK");
        assert_eq!(reason_phrase(426), "Upgrade Required");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(799), "Unknown");
    }

    proptest! {
        #[test]
        fn parse_head_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512),
                                   split in 0usize..512) {
            let lim = HttpLimits { max_head_size: 256, max_headers: 8, max_body_size: 100 };
            let cut = split.min(data.len());
            let _ = parse_head(&data[..cut], &lim);
            let _ = parse_head(&data, &lim);
        }

        #[test]
        fn valid_request_any_split(split in 0usize..400, tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut data = UPGRADE_REQ.as_bytes().to_vec();
            let head_len = data.len();
            data.extend_from_slice(&tail);
            let cut = split.min(data.len());
            let res = parse_head(&data[..cut], &limits());
            if cut < head_len {
                prop_assert_eq!(res, Ok(None));
            } else {
                let h = res.unwrap().unwrap();
                prop_assert_eq!(h.head_len, head_len);
                prop_assert!(h.upgrade.is_some());
            }
        }

        #[test]
        fn fuzzed_request_lines_do_not_panic(
            prefix in "(GET|POST|HEAD|X) /[ -~]{0,40} HTTP/1\\.[01]\r\n",
            headers in proptest::collection::vec("[A-Za-z-]{1,12}: [ -~]{0,30}\r\n", 0..12),
            split in 0usize..1024,
        ) {
            let mut s = prefix;
            for h in headers { s.push_str(&h); }
            s.push_str("\r\n");
            let bytes = s.as_bytes();
            let lim = HttpLimits { max_head_size: 512, max_headers: 8, max_body_size: 100 };
            let _ = parse_head(&bytes[..split.min(bytes.len())], &lim);
            if let Ok(Some(h)) = parse_head(bytes, &lim) {
                prop_assert!(h.head_len <= 512);
                prop_assert!(h.content_length <= 100);
                let _ = accept_upgrade(&h);
            }
        }
    }
}
