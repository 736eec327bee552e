//! Authentication and channel permissions: pure decisions, no sockets.
//!
//! - [`token`]: JWT verification (connection and channel tokens) with `jsonwebtoken`, the key
//!   set (HMAC secrets, PEM public keys, a JWKS cache) and token minting for tools and tests.
//! - [`jwks`]: the JWKS fetcher thread (the only I/O here: an HTTP GET off the shard threads).
//! - [`namespaces`]: namespace rules and the permission decisions (subscribe, publish, history).
//!
//! This module imports nothing else of ours: the config holds its types, the shards call it.
//!
//! Invariants: every check fails closed (an error or an unknown case denies); signatures are
//! compared in constant time (by the crypto crates); no token text is logged.

pub mod jwks;
pub mod namespaces;
pub mod token;

use std::path::PathBuf;
use std::time::Duration;

/// Close codes of the native protocol (4000–4999), one meaning each (docs/protocol.md).
pub mod close {
    /// The token was refused (bad signature, malformed, wrong audience, no `connect` in time…):
    /// do not retry with the same token.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The connection token expired and was not refreshed: get a new token and reconnect.
    pub const TOKEN_EXPIRED: u16 = 4002;
    /// The connection did something it is not allowed to (e.g. refresh with another user's
    /// token): do not retry as is.
    pub const FORBIDDEN: u16 = 4003;
    /// A backend disconnected this connection (`POST /disconnect`); the default code.
    pub const DISCONNECTED: u16 = 4004;
}

/// The `[auth]` table: where keys come from and what tokens must carry. `None` in
/// [`crate::config::Config::auth`] means open mode (no tokens; anyone may subscribe and publish).
#[derive(Clone, PartialEq)]
pub struct AuthConfig {
    /// HMAC secret, inline.
    pub secret: Option<String>,
    /// A second HMAC secret accepted during rotation.
    pub previous_secret: Option<String>,
    /// A file holding the HMAC secret (trailing newline trimmed).
    pub secret_file: Option<PathBuf>,
    /// The name of an environment variable holding the HMAC secret.
    pub secret_env: Option<String>,
    /// PEM files with RSA, ECDSA (P-256/P-384) or Ed25519 public keys.
    pub public_key_files: Vec<PathBuf>,
    /// A JWKS URL (`http://`), fetched off the shard threads; keys looked up by `kid`.
    pub jwks_url: Option<String>,
    /// Accepted algorithms (`HS256`, `RS256`, `ES256`, `EdDSA`, …). Empty = every algorithm the
    /// configured keys can verify. Nothing else is ever accepted (no `none`).
    pub algorithms: Vec<String>,
    /// Accepted `aud` values; when non-empty, `aud` is required and must contain one of them.
    pub audience: Vec<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`. Default 30 s.
    pub leeway: Duration,
    /// Whether `exp` is required (default true).
    pub require_exp: bool,
    /// Accept the token in the upgrade URL's `?token=` (browsers cannot set headers). Default true.
    pub query_token: bool,
    /// A connection that has not authenticated within this is closed (4001). Default 10 s.
    pub auth_timeout: Duration,
    /// Time after `exp` before an unrefreshed connection is closed (4002). Default 10 s.
    pub expiry_grace: Duration,
    /// Tokens longer than this are refused unparsed. Default 8 KiB.
    pub max_token_size: usize,
    /// `{"type":"connect"}` without a token is accepted as an anonymous user. Default false.
    pub anonymous_connect: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secret: None,
            previous_secret: None,
            secret_file: None,
            secret_env: None,
            public_key_files: Vec::new(),
            jwks_url: None,
            algorithms: Vec::new(),
            audience: Vec::new(),
            issuer: None,
            leeway: Duration::from_secs(30),
            require_exp: true,
            query_token: true,
            auth_timeout: Duration::from_secs(10),
            expiry_grace: Duration::from_secs(10),
            max_token_size: 8 << 10,
            anonymous_connect: false,
        }
    }
}

impl AuthConfig {
    /// Whether any key source is configured (auth is on only then).
    pub fn has_keys(&self) -> bool {
        self.secret.is_some()
            || self.secret_file.is_some()
            || self.secret_env.is_some()
            || !self.public_key_files.is_empty()
            || self.jwks_url.is_some()
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mask = |s: &Option<String>| s.as_ref().map(|_| "<hidden>");
        f.debug_struct("AuthConfig")
            .field("secret", &mask(&self.secret))
            .field("previous_secret", &mask(&self.previous_secret))
            .field("secret_file", &self.secret_file)
            .field("secret_env", &self.secret_env)
            .field("public_key_files", &self.public_key_files)
            .field("jwks_url", &self.jwks_url)
            .field("algorithms", &self.algorithms)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("leeway", &self.leeway)
            .field("require_exp", &self.require_exp)
            .field("query_token", &self.query_token)
            .field("auth_timeout", &self.auth_timeout)
            .field("expiry_grace", &self.expiry_grace)
            .field("max_token_size", &self.max_token_size)
            .field("anonymous_connect", &self.anonymous_connect)
            .finish()
    }
}

/// Whether `origin` (the upgrade's `Origin` header) matches one of `allowed`: exact
/// (`https://app.example.com`, case-insensitive), `*` (anything), or a leading-wildcard host
/// pattern (`https://*.example.com` matches any subdomain, not the bare domain). An empty list
/// allows everything; a request without `Origin` (not a browser) is allowed.
pub fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    if allowed.is_empty() {
        return true;
    }
    let origin = origin.trim().to_ascii_lowercase();
    allowed.iter().any(|pattern| {
        let p = pattern.trim().to_ascii_lowercase();
        if p == "*" || p == origin {
            return true;
        }
        match p.split_once("://*.") {
            Some((scheme, domain)) => origin
                .strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix("://"))
                .and_then(|host| host.strip_suffix(domain))
                .and_then(|sub| sub.strip_suffix('.'))
                .is_some_and(|sub| !sub.is_empty()),
            None => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let allowed = vec![
            "https://app.example.com".to_string(),
            "https://*.example.org".to_string(),
        ];
        assert!(origin_allowed(&allowed, None), "non-browser clients");
        assert!(origin_allowed(&[], Some("https://evil.test")));
        assert!(origin_allowed(&allowed, Some("https://app.example.com")));
        assert!(origin_allowed(&allowed, Some("HTTPS://APP.example.com")));
        assert!(!origin_allowed(
            &allowed,
            Some("https://app.example.com.evil.test")
        ));
        assert!(!origin_allowed(&allowed, Some("http://app.example.com")));
        assert!(origin_allowed(&allowed, Some("https://a.b.example.org")));
        assert!(!origin_allowed(&allowed, Some("https://example.org")));
        assert!(!origin_allowed(&allowed, Some("https://badexample.org")));
        assert!(!origin_allowed(&allowed, Some("http://x.example.org")));
        assert!(origin_allowed(&["*".into()], Some("null")));
    }

    #[test]
    fn debug_hides_secrets() {
        let c = AuthConfig {
            secret: Some("hunter2".into()),
            previous_secret: Some("hunter1".into()),
            ..AuthConfig::default()
        };
        let s = format!("{c:?}");
        assert!(!s.contains("hunter"), "{s}");
    }
}
