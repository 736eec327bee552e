//! JWT verification for connection and channel tokens, and minting for tools and tests.
//!
//! STUB: the API below is fixed; the bodies are being written.

use super::AuthConfig;
use serde_json::value::RawValue;

/// What a verified connection token says.
#[derive(Debug, Clone)]
pub struct ConnectionClaims {
    /// `sub`: the user id; `""` = anonymous.
    pub user: String,
    /// `exp` (Unix seconds), when present.
    pub exp: Option<u64>,
    /// `info`: a JSON object (≤ 1 KiB of JSON text), kept with the connection.
    pub info: Option<Box<RawValue>>,
    /// `channels`: subscribed for the client at connect.
    pub channels: Vec<String>,
}

/// What a verified channel token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelClaims {
    pub user: String,
    pub channel: String,
    /// Unix seconds (required).
    pub exp: u64,
}

/// Why a token was refused. None is fatal to the hub; each maps to a protocol error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("no key matches the token")]
    NoKey,
    /// The JWKS has no key with this `kid` (a refetch may find it).
    #[error("unknown key id {0:?}")]
    UnknownKid(String),
    #[error("bad signature")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("{0}")]
    Claim(String),
    /// A channel token used to connect, or a connection token used for a channel.
    #[error("{0}")]
    WrongKind(&'static str),
}

impl TokenError {
    /// Whether the error means "expired" (`token_expired`) rather than "invalid" (`unauthorized`).
    pub fn is_expired(&self) -> bool {
        matches!(self, TokenError::Expired)
    }
}

/// The keys and rules tokens are checked against (built once at start, shared by the shards).
pub struct Verifier {
    _cfg: AuthConfig,
}

impl Verifier {
    /// Load keys (secret, secret file/env, PEM files; start the JWKS fetcher when a URL is set).
    pub fn new(cfg: &AuthConfig) -> Result<Verifier, String> {
        Ok(Verifier { _cfg: cfg.clone() })
    }

    /// The JWKS cache, when a JWKS URL is configured.
    pub fn jwks(&self) -> Option<&std::sync::Arc<super::jwks::JwksCache>> {
        None
    }

    /// Verify a connection token at `now` (Unix seconds).
    pub fn verify_connection(
        &self,
        _token: &str,
        _now: u64,
    ) -> Result<ConnectionClaims, TokenError> {
        Err(TokenError::NoKey)
    }

    /// Verify a channel token at `now` (Unix seconds).
    pub fn verify_channel(&self, _token: &str, _now: u64) -> Result<ChannelClaims, TokenError> {
        Err(TokenError::NoKey)
    }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
