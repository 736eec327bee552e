//! JWT verification for connection and channel tokens, and minting for tools and tests.
//!
//! A cold path: a token is verified once per connect, per private-channel subscribe and per
//! refresh. [`Verifier::verify_connection`] and [`Verifier::verify_channel`] go:
//! 1. size check (`max_token_size`) before anything is parsed ([`TokenError::TooLarge`]);
//! 2. [`inspect`]: header and payload decoded, no signature checked yet;
//! 3. the header's `alg` must be one of the accepted algorithms ([`Verifier::algorithms`]);
//!    `none` is never one of them;
//! 4. candidate keys, of that algorithm's family only: an HS* token is checked against the
//!    HMAC secrets only (never against the bytes of a public key: no key confusion), an RS*/PS*
//!    token against RSA keys only, ES256/ES384 against EC keys of that curve, EdDSA against
//!    Ed25519 keys. With a JWKS and a `kid`, the JWKS key of that id; a `kid` the JWKS does not
//!    know is [`TokenError::UnknownKid`] (the caller may ask for a refetch and retry);
//! 5. the signature over `header.payload`, checked by `jsonwebtoken::crypto::verify` (which
//!    looks at no claim);
//! 6. the claims, checked here with strict types ([`check_connection_claims`],
//!    [`check_channel_claims`]): `exp`/`nbf`/`iat` must be JSON numbers, never strings.
//!
//! Invariants: every check fails closed (an unknown case refuses the token); no error message
//! or log line carries token text; signatures are compared by the crypto crates (constant time
//! for HMAC).

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::errors::ErrorKind;
/// Re-exported so that users of [`MintKey`] and [`inspect`] need no `jsonwebtoken` dependency.
pub use jsonwebtoken::{Algorithm, Header};
use jsonwebtoken::{AlgorithmFamily, DecodingKey, EncodingKey};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::jwks::{JwksCache, JwksTiming, JwksUrl, KeySet};
use super::AuthConfig;

/// Largest `info` claim, as compact JSON text: it is kept with the connection and sent along
/// with presence, so it must stay small.
pub const MAX_INFO_BYTES: usize = 1024;

/// Most entries in a `channels` claim (each one is a subscription made at connect).
pub const MAX_CHANNELS: usize = 1000;

/// Smallest RSA modulus accepted from a PEM file, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// JWKS keys tried for a token without `kid` (bounds the signature checks one token can cost).
const MAX_JWKS_KEYS_WITHOUT_KID: usize = 8;

/// Longest `kid` echoed in [`TokenError::UnknownKid`]; a longer one is cut.
const MAX_KID_ECHO: usize = 128;

/// HMAC secrets shorter than this get a warning at start (HS256 wants 256 bits of secret).
const MIN_SECRET_BYTES: usize = 32;

/// Every algorithm `jsonwebtoken` can verify, in the order they are listed in messages.
pub const ALL_ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The algorithms a JWKS may provide keys for (no HMAC: symmetric keys are never taken from a
/// key set fetched over the network).
pub const JWKS_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The JOSE name of `alg` (`"HS256"`, `"EdDSA"`, …).
pub fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
        // `Algorithm` is non-exhaustive; a future variant is not accepted here anyway.
        #[allow(unreachable_patterns)]
        _ => "unknown",
    }
}

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

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// A public key and the algorithms it may verify. HMAC secrets are kept apart (see
/// [`Verifier`]), so a public key is never used as an HMAC secret.
#[derive(Clone)]
pub struct VerifyKey {
    pub key: DecodingKey,
    /// One family only: RS*/PS* for RSA, ES256 or ES384 for EC (by curve), EdDSA for Ed25519.
    pub algorithms: Vec<Algorithm>,
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKey")
            .field("family", &self.key.family())
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

impl VerifyKey {
    /// Whether this key may check a token signed with `alg`.
    pub fn can_verify(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg)
    }

    /// A public key from PEM text, its type detected: RSA (`PUBLIC KEY` or `RSA PUBLIC KEY`,
    /// at least [`MIN_RSA_BITS`]), ECDSA P-256 or P-384 (`PUBLIC KEY`), Ed25519 (`PUBLIC KEY`).
    /// Private keys and certificates are refused.
    pub fn from_public_pem(pem: &[u8]) -> Result<VerifyKey, String> {
        let text = std::str::from_utf8(pem).map_err(|_| "not a PEM file (not text)".to_string())?;
        if text.contains("PRIVATE KEY-----") {
            return Err("holds a private key: give the public key \
                        (openssl pkey -in private.pem -pubout)"
                .into());
        }
        let label = text
            .split("-----BEGIN ")
            .nth(1)
            .and_then(|rest| rest.split_once("-----"))
            .map(|(label, _)| label);
        match label {
            Some("PUBLIC KEY" | "RSA PUBLIC KEY") => {}
            Some(other) => {
                return Err(format!(
                    "a {other:?} PEM block; expected PUBLIC KEY or RSA PUBLIC KEY"
                ))
            }
            None => return Err("no PEM block (-----BEGIN PUBLIC KEY-----)".into()),
        }
        let provider = provider()?;
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            let der = key.try_get_as_bytes().map_err(|e| e.to_string())?;
            let (n, _e) = (provider.key_utils.rsa_pub_components_from_public_key)(der)
                .map_err(|e| format!("not a valid RSA public key: {e}"))?;
            let bits = significant_bits(&n);
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of {bits} bits is too short (minimum {MIN_RSA_BITS})"
                ));
            }
            return Ok(VerifyKey {
                key,
                algorithms: AlgorithmFamily::Rsa.algorithms().to_vec(),
            });
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            let point = key.try_get_as_bytes().map_err(|e| e.to_string())?;
            let alg = match point.len() {
                65 => Algorithm::ES256,
                97 => Algorithm::ES384,
                _ => return Err("unsupported EC key (P-256 or P-384, uncompressed point)".into()),
            };
            (provider.verifier_factory)(&alg, &key)
                .map_err(|e| format!("not a valid EC public key: {e}"))?;
            return Ok(VerifyKey {
                key,
                algorithms: vec![alg],
            });
        }
        if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            (provider.verifier_factory)(&Algorithm::EdDSA, &key)
                .map_err(|e| format!("not a valid Ed25519 public key: {e}"))?;
            return Ok(VerifyKey {
                key,
                algorithms: vec![Algorithm::EdDSA],
            });
        }
        Err("not an RSA, ECDSA (P-256/P-384) or Ed25519 public key".into())
    }
}

/// Bits of a big-endian unsigned integer, leading zeros not counted.
fn significant_bits(n: &[u8]) -> usize {
    match n.iter().position(|&b| b != 0) {
        Some(i) => (n.len() - i) * 8 - n[i].leading_zeros() as usize,
        None => 0,
    }
}

/// The process's `jsonwebtoken` crypto provider (RustCrypto, from the crate features).
fn provider() -> Result<&'static CryptoProvider, String> {
    CryptoProvider::try_get_default()
        .ok_or_else(|| "jsonwebtoken has no crypto provider (build features)".to_string())
}

/// The HMAC secret from `secret`, `secret_file` (trailing CR/LF trimmed) or `secret_env`,
/// `None` when none is set. Errors name the config key; an empty secret is an error, and so is
/// more than one source.
pub fn hmac_secret(cfg: &AuthConfig) -> Result<Option<Vec<u8>>, String> {
    let sources = [
        cfg.secret.is_some(),
        cfg.secret_file.is_some(),
        cfg.secret_env.is_some(),
    ];
    if sources.iter().filter(|set| **set).count() > 1 {
        return Err("auth: set only one of secret, secret_file and secret_env".into());
    }
    if let Some(secret) = &cfg.secret {
        if secret.is_empty() {
            return Err("auth.secret: the secret is empty".into());
        }
        return Ok(Some(secret.as_bytes().to_vec()));
    }
    if let Some(path) = &cfg.secret_file {
        let mut secret = std::fs::read(path)
            .map_err(|e| format!("auth.secret_file: cannot read {}: {e}", path.display()))?;
        while secret.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
            secret.pop();
        }
        if secret.is_empty() {
            return Err(format!(
                "auth.secret_file: {} holds an empty secret",
                path.display()
            ));
        }
        return Ok(Some(secret));
    }
    if let Some(name) = &cfg.secret_env {
        let value = std::env::var_os(name)
            .ok_or_else(|| format!("auth.secret_env: environment variable {name} is not set"))?;
        if value.is_empty() {
            return Err(format!(
                "auth.secret_env: environment variable {name} is empty"
            ));
        }
        return Ok(Some(value.into_encoded_bytes()));
    }
    Ok(None)
}

/// `auth.algorithms` parsed: known JOSE names only, `none` refused, duplicates dropped.
pub fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, String> {
    let mut out = Vec::new();
    for name in names {
        let name = name.trim();
        if name.eq_ignore_ascii_case("none") {
            return Err("auth.algorithms: \"none\" (unsigned tokens) is never accepted".into());
        }
        let alg = Algorithm::from_str(name).map_err(|_| {
            let known: Vec<&str> = ALL_ALGORITHMS.iter().map(|a| algorithm_name(*a)).collect();
            format!(
                "auth.algorithms: unknown algorithm {name:?} (known: {})",
                known.join(", ")
            )
        })?;
        if !out.contains(&alg) {
            out.push(alg);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Verifier
// ---------------------------------------------------------------------------------------------

/// The keys and rules tokens are checked against (built once at start, shared by the shards).
pub struct Verifier {
    /// HMAC secrets: the current one first, then `previous_secret`.
    hmac: Vec<DecodingKey>,
    /// Public keys from `public_key_files`, in config order.
    public: Vec<VerifyKey>,
    jwks: Option<Arc<JwksCache>>,
    /// Accepted `alg` values (never empty, never `none`).
    algorithms: Vec<Algorithm>,
    rules: ClaimRules,
    max_token_size: usize,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("hmac_secrets", &self.hmac.len())
            .field("public_keys", &self.public)
            .field("jwks", &self.jwks.as_ref().map(|j| j.url().to_string()))
            .field("algorithms", &self.algorithms)
            .field("rules", &self.rules)
            .field("max_token_size", &self.max_token_size)
            .finish()
    }
}

impl Verifier {
    /// Load keys (secret, secret file/env, PEM files; start the JWKS fetcher when a URL is set).
    pub fn new(cfg: &AuthConfig) -> Result<Verifier, String> {
        Verifier::with_jwks_timing(cfg, JwksTiming::default())
    }

    /// [`Verifier::new`] with other JWKS timings (tests shorten the refetch rate limit).
    pub fn with_jwks_timing(cfg: &AuthConfig, timing: JwksTiming) -> Result<Verifier, String> {
        let mut hmac = Vec::new();
        let secret = hmac_secret(cfg)?;
        if let Some(secret) = &secret {
            if secret.len() < MIN_SECRET_BYTES {
                tracing::warn!(
                    "auth: the HMAC secret is {} bytes; use at least {MIN_SECRET_BYTES} random bytes",
                    secret.len()
                );
            }
            hmac.push(DecodingKey::from_secret(secret).map_err(|e| format!("auth.secret: {e}"))?);
        }
        if let Some(previous) = &cfg.previous_secret {
            if previous.is_empty() {
                return Err("auth.previous_secret: the secret is empty".into());
            }
            if secret.is_none() {
                return Err("auth.previous_secret: set without a current secret \
                            (secret, secret_file or secret_env)"
                    .into());
            }
            hmac.push(
                DecodingKey::from_secret(previous.as_bytes())
                    .map_err(|e| format!("auth.previous_secret: {e}"))?,
            );
        }

        let mut public = Vec::new();
        for path in &cfg.public_key_files {
            public.push(load_public_key(path)?);
        }

        let jwks_url = match &cfg.jwks_url {
            Some(url) => Some(JwksUrl::parse(url).map_err(|e| format!("auth.jwks_url: {e}"))?),
            None => None,
        };

        // What the configured keys can verify, in a stable order.
        let verifiable: Vec<Algorithm> = ALL_ALGORITHMS
            .into_iter()
            .filter(|alg| match alg.family() {
                AlgorithmFamily::Hmac => !hmac.is_empty(),
                _ => {
                    public.iter().any(|k| k.can_verify(*alg))
                        || (jwks_url.is_some() && JWKS_ALGORITHMS.contains(alg))
                }
            })
            .collect();
        let listed = parse_algorithms(&cfg.algorithms)?;
        let algorithms = if listed.is_empty() {
            verifiable
        } else {
            if let Some(alg) = listed.iter().find(|a| !verifiable.contains(a)) {
                let needs = match alg.family() {
                    AlgorithmFamily::Hmac => "an HMAC secret",
                    AlgorithmFamily::Rsa => "an RSA key in public_key_files or a jwks_url",
                    AlgorithmFamily::Ec => {
                        "an EC key of its curve in public_key_files or a jwks_url"
                    }
                    AlgorithmFamily::Ed => "an Ed25519 key in public_key_files or a jwks_url",
                };
                return Err(format!(
                    "auth.algorithms: {} is listed but no configured key can verify it (it needs {needs})",
                    algorithm_name(*alg)
                ));
            }
            listed
        };
        if algorithms.is_empty() {
            return Err("auth: no key configured (secret, secret_file, secret_env, \
                        public_key_files or jwks_url)"
                .into());
        }

        // Last, so that a config error leaves no thread behind.
        let jwks = match jwks_url {
            Some(url) => {
                Some(JwksCache::start(url, timing).map_err(|e| format!("auth.jwks_url: {e}"))?)
            }
            None => None,
        };
        let names: Vec<&str> = algorithms.iter().map(|a| algorithm_name(*a)).collect();
        tracing::info!(
            "auth: {} HMAC secret(s), {} public key(s){}; algorithms {}",
            hmac.len(),
            public.len(),
            if jwks.is_some() { ", a JWKS" } else { "" },
            names.join(",")
        );
        Ok(Verifier {
            hmac,
            public,
            jwks,
            algorithms,
            rules: ClaimRules::from_config(cfg),
            max_token_size: cfg.max_token_size,
        })
    }

    /// The JWKS cache, when a JWKS URL is configured.
    pub fn jwks(&self) -> Option<&Arc<JwksCache>> {
        self.jwks.as_ref()
    }

    /// The accepted algorithms.
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    /// The claim rules (audience, issuer, leeway, `exp` required).
    pub fn rules(&self) -> &ClaimRules {
        &self.rules
    }

    /// Verify a connection token at `now` (Unix seconds).
    pub fn verify_connection(&self, token: &str, now: u64) -> Result<ConnectionClaims, TokenError> {
        let claims = self.verify_signature(token)?;
        check_connection_claims(&claims, &self.rules, now)
    }

    /// Verify a channel token at `now` (Unix seconds).
    pub fn verify_channel(&self, token: &str, now: u64) -> Result<ChannelClaims, TokenError> {
        let claims = self.verify_signature(token)?;
        check_channel_claims(&claims, &self.rules, now)
    }

    /// Steps 1–5 of the module doc: the claims of a token whose signature one of our keys
    /// verifies (claims not checked yet).
    fn verify_signature(&self, token: &str) -> Result<Map<String, Value>, TokenError> {
        let (header, claims) = inspect(token, self.max_token_size)?;
        let alg = header.alg;
        if !self.algorithms.contains(&alg) {
            return Err(TokenError::Algorithm(algorithm_name(alg).into()));
        }
        // `jsonwebtoken` checks the signature over `header.payload`; the claims (already
        // decoded by `inspect`) are ours to check. (`jsonwebtoken::decode` is not used: it
        // also deserializes the claims into its own validation struct, which fails on some
        // mistyped claims, e.g. a numeric `sub`, before we can say which claim is wrong.)
        let (message, signature) = token
            .rsplit_once('.')
            .ok_or_else(|| TokenError::Malformed("no signature part".into()))?;
        let verifies = |key: &DecodingKey| -> Result<bool, TokenError> {
            match jsonwebtoken::crypto::verify(signature, message.as_bytes(), key, alg) {
                Ok(verified) => Ok(verified),
                Err(e) if matches!(e.kind(), ErrorKind::Base64(_)) => Err(TokenError::Malformed(
                    "the signature is not base64url".into(),
                )),
                // A key that cannot check this algorithm: not a match.
                Err(_) => Ok(false),
            }
        };

        if alg.family() == AlgorithmFamily::Hmac {
            for key in &self.hmac {
                if verifies(key)? {
                    return Ok(claims);
                }
            }
            return Err(if self.hmac.is_empty() {
                TokenError::NoKey
            } else {
                TokenError::BadSignature
            });
        }

        let set: Option<Arc<KeySet>> = self.jwks.as_ref().map(|j| j.keys());
        let mut tried = false;
        let mut unknown_kid = None;
        if let (Some(kid), Some(set)) = (header.kid.as_deref(), &set) {
            let mut known = false;
            for key in set.with_kid(kid) {
                known = true;
                if key.can_verify(alg) {
                    tried = true;
                    if verifies(&key.key)? {
                        return Ok(claims);
                    }
                }
            }
            if !known {
                unknown_kid = Some(kid);
            }
        }
        for key in self.public.iter().filter(|k| k.can_verify(alg)) {
            tried = true;
            if verifies(&key.key)? {
                return Ok(claims);
            }
        }
        if let (None, Some(set)) = (&header.kid, &set) {
            let keys = set.iter().map(|(_, k)| k).filter(|k| k.can_verify(alg));
            for key in keys.take(MAX_JWKS_KEYS_WITHOUT_KID) {
                tried = true;
                if verifies(&key.key)? {
                    return Ok(claims);
                }
            }
        }
        if let Some(kid) = unknown_kid {
            return Err(TokenError::UnknownKid(clip(kid, MAX_KID_ECHO).to_string()));
        }
        Err(if tried {
            TokenError::BadSignature
        } else {
            TokenError::NoKey
        })
    }
}

/// Read and parse one `auth.public_key_files` entry.
fn load_public_key(path: &Path) -> Result<VerifyKey, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("auth.public_key_files: cannot read {}: {e}", path.display()))?;
    VerifyKey::from_public_pem(&pem)
        .map_err(|e| format!("auth.public_key_files: {}: {e}", path.display()))
}

/// `s` cut to at most `max` bytes, at a char boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Inspection (no signature) and claims
// ---------------------------------------------------------------------------------------------

/// The header and claims of `token`, signature NOT checked: the size check, the header decode
/// and the payload decode (base64url, then a JSON object). The first steps of verification, and
/// what the fuzz target drives.
pub fn inspect(token: &str, max_size: usize) -> Result<(Header, Map<String, Value>), TokenError> {
    if token.len() > max_size {
        return Err(TokenError::TooLarge(max_size));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| header_error(token))?;
    // RFC 7515 `crit` and RFC 7797 `b64`: extensions we do not implement, so refused (a
    // `b64: true` is the default and harmless).
    if header.crit.is_some() {
        return Err(TokenError::Malformed("unsupported `crit` header".into()));
    }
    if header
        .extras
        .inner()
        .get("b64")
        .is_some_and(|b64| b64 != &Value::Bool(true))
    {
        return Err(TokenError::Malformed("unsupported `b64` header".into()));
    }
    let claims = jsonwebtoken::dangerous::insecure_decode_claims::<Map<String, Value>>(token)
        .map_err(|_| {
            TokenError::Malformed("the payload is not a base64url-encoded JSON object".into())
        })?;
    Ok((header, claims))
}

/// Why `jsonwebtoken` could not decode the header: an algorithm it does not know (`none`…) is
/// [`TokenError::Algorithm`], anything else [`TokenError::Malformed`].
fn header_error(token: &str) -> TokenError {
    let malformed = |why: &str| TokenError::Malformed(why.into());
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return malformed("a JWT is three base64url parts separated by dots");
    }
    let Some(json) = b64url_decode(parts[0]) else {
        return malformed("the header is not base64url");
    };
    let Ok(header) = serde_json::from_slice::<Map<String, Value>>(&json) else {
        return malformed("the header is not a JSON object");
    };
    match header.get("alg") {
        None => malformed("the header has no `alg`"),
        Some(Value::String(name)) if Algorithm::from_str(name).is_err() => {
            let printable = name.len() <= 16
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            TokenError::Algorithm(if printable {
                name.clone()
            } else {
                "(unsupported)".into()
            })
        }
        Some(Value::String(_)) => malformed("invalid header field"),
        Some(_) => malformed("`alg` is not a string"),
    }
}

/// Base64url without padding (RFC 4648 §5).
fn b64url_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Strict base64url without padding (RFC 4648 §5); `None` on any other byte, a length that is
/// 1 mod 4, or non-zero trailing bits.
fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (bits < 6 && acc == 0).then_some(out)
}

/// What claims must satisfy beyond their types (from [`AuthConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRules {
    /// Accepted `aud` values; when non-empty, `aud` is required and must contain one.
    pub audience: Vec<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    pub leeway: u64,
    /// Whether connection tokens need `exp` (channel tokens always do).
    pub require_exp: bool,
}

impl Default for ClaimRules {
    fn default() -> Self {
        ClaimRules::from_config(&AuthConfig::default())
    }
}

impl ClaimRules {
    pub fn from_config(cfg: &AuthConfig) -> ClaimRules {
        ClaimRules {
            audience: cfg.audience.clone(),
            issuer: cfg.issuer.clone(),
            leeway: cfg.leeway.as_secs(),
            require_exp: cfg.require_exp,
        }
    }
}

/// The claims of a connection token, checked: no `channel`; the registered claims
/// ([`check_registered`]); `info` an object of at most [`MAX_INFO_BYTES`]; `channels` at most
/// [`MAX_CHANNELS`] strings.
pub fn check_connection_claims(
    claims: &Map<String, Value>,
    rules: &ClaimRules,
    now: u64,
) -> Result<ConnectionClaims, TokenError> {
    if claims.contains_key("channel") {
        return Err(TokenError::WrongKind(
            "a channel token cannot be used as a connection token",
        ));
    }
    let (user, exp) = check_registered(claims, rules, now, rules.require_exp)?;
    let info = match claims.get("info") {
        None => None,
        Some(info @ Value::Object(_)) => {
            let raw = serde_json::value::to_raw_value(info)
                .map_err(|_| TokenError::Claim("`info` cannot be serialized".into()))?;
            if raw.get().len() > MAX_INFO_BYTES {
                return Err(TokenError::Claim(format!(
                    "`info` is larger than {MAX_INFO_BYTES} bytes"
                )));
            }
            Some(raw)
        }
        Some(_) => return Err(TokenError::Claim("`info` must be a JSON object".into())),
    };
    let channels = match claims.get("channels") {
        None => Vec::new(),
        Some(Value::Array(list)) => {
            if list.len() > MAX_CHANNELS {
                return Err(TokenError::Claim(format!(
                    "`channels` has more than {MAX_CHANNELS} entries"
                )));
            }
            list.iter()
                .map(|c| match c {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(TokenError::Claim(
                        "`channels` must be an array of strings".into(),
                    )),
                })
                .collect::<Result<Vec<String>, TokenError>>()?
        }
        Some(_) => {
            return Err(TokenError::Claim(
                "`channels` must be an array of strings".into(),
            ))
        }
    };
    Ok(ConnectionClaims {
        user,
        exp,
        info,
        channels,
    })
}

/// The claims of a channel token, checked: `channel` a non-empty string; `exp` required; the
/// registered claims ([`check_registered`]).
pub fn check_channel_claims(
    claims: &Map<String, Value>,
    rules: &ClaimRules,
    now: u64,
) -> Result<ChannelClaims, TokenError> {
    let channel = match claims.get("channel") {
        None => {
            return Err(TokenError::WrongKind(
                "a connection token cannot be used as a channel token",
            ))
        }
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => {
            return Err(TokenError::Claim("`channel` must not be empty".into()))
        }
        Some(_) => return Err(TokenError::Claim("`channel` must be a string".into())),
    };
    let (user, exp) = check_registered(claims, rules, now, true)?;
    let exp = exp.ok_or_else(|| TokenError::Claim("missing `exp`".into()))?;
    Ok(ChannelClaims { user, channel, exp })
}

/// The registered claims both kinds share: `exp`, `nbf`, `iat` JSON numbers ≥ 0 when present
/// (a string is refused, not ignored), `exp` present when `exp_required`, not expired, not
/// before `nbf`, `iat` not in the future (each with `rules.leeway`); `aud` a string or an array
/// of strings, naming one of `rules.audience` when that is set; `iss` a string, equal to
/// `rules.issuer` when set; `sub` a string (required; `""` = anonymous).
/// Returns (`sub`, `exp` in whole seconds).
pub fn check_registered(
    claims: &Map<String, Value>,
    rules: &ClaimRules,
    now: u64,
    exp_required: bool,
) -> Result<(String, Option<u64>), TokenError> {
    let exp = numeric_claim(claims, "exp")?;
    let nbf = numeric_claim(claims, "nbf")?;
    let iat = numeric_claim(claims, "iat")?;
    // f64 is exact for every plausible Unix time (< 2^53 s).
    let now_f = now as f64;
    let leeway = rules.leeway as f64;
    match exp {
        None if exp_required => return Err(TokenError::Claim("missing `exp`".into())),
        Some(exp) if exp + leeway < now_f => return Err(TokenError::Expired),
        _ => {}
    }
    if nbf.is_some_and(|nbf| nbf - leeway > now_f) {
        return Err(TokenError::NotYetValid);
    }
    if iat.is_some_and(|iat| iat - leeway > now_f) {
        return Err(TokenError::Claim("`iat` is in the future".into()));
    }

    let audiences: Vec<&str> = match claims.get("aud") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(list)) => list
            .iter()
            .map(Value::as_str)
            .collect::<Option<Vec<&str>>>()
            .ok_or_else(aud_type_error)?,
        Some(_) => return Err(aud_type_error()),
    };
    if !rules.audience.is_empty() {
        if !claims.contains_key("aud") {
            return Err(TokenError::Claim("missing `aud`".into()));
        }
        if !audiences
            .iter()
            .any(|a| rules.audience.iter().any(|want| want == a))
        {
            return Err(TokenError::Claim("`aud` does not name this hub".into()));
        }
    }

    match (claims.get("iss"), &rules.issuer) {
        (Some(Value::String(iss)), Some(want)) if iss != want => {
            return Err(TokenError::Claim("wrong `iss`".into()))
        }
        (Some(Value::String(_)), _) => {}
        (Some(_), _) => return Err(TokenError::Claim("`iss` must be a string".into())),
        (None, Some(_)) => return Err(TokenError::Claim("missing `iss`".into())),
        (None, None) => {}
    }

    let user = match claims.get("sub") {
        Some(Value::String(sub)) => sub.clone(),
        Some(_) => return Err(TokenError::Claim("`sub` must be a string".into())),
        None => return Err(TokenError::Claim("missing `sub`".into())),
    };
    // Saturating: a float beyond u64 becomes u64::MAX (never expires in practice).
    Ok((user, exp.map(|e| e as u64)))
}

fn aud_type_error() -> TokenError {
    TokenError::Claim("`aud` must be a string or an array of strings".into())
}

/// A NumericDate claim: absent, or a finite JSON number ≥ 0 (integer or float).
fn numeric_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(Some)
            .ok_or_else(|| TokenError::Claim(format!("`{name}` must be a non-negative number"))),
        Some(_) => Err(TokenError::Claim(format!("`{name}` must be a number"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Minting (CLI `ringhub token`, the load generator, tests)
// ---------------------------------------------------------------------------------------------

/// A signing key for [`mint`].
#[derive(Clone)]
pub enum MintKey {
    /// An HMAC secret and an HS* algorithm.
    Hmac { secret: Vec<u8>, alg: Algorithm },
    /// A PEM private key (RSA PKCS#1/PKCS#8, EC PKCS#8, Ed25519 PKCS#8) and an algorithm of
    /// its family.
    Pem { pem: Vec<u8>, alg: Algorithm },
}

impl fmt::Debug for MintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MintKey::Hmac { alg, .. } => write!(f, "MintKey::Hmac({alg:?}, <hidden>)"),
            MintKey::Pem { alg, .. } => write!(f, "MintKey::Pem({alg:?}, <hidden>)"),
        }
    }
}

impl MintKey {
    /// The algorithm tokens are signed with.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            MintKey::Hmac { alg, .. } | MintKey::Pem { alg, .. } => *alg,
        }
    }

    /// A private PEM key; with `alg` `None`, the algorithm is detected: RS256 for RSA, ES256 or
    /// ES384 by the EC curve, EdDSA for Ed25519.
    pub fn from_private_pem(pem: Vec<u8>, alg: Option<Algorithm>) -> Result<MintKey, String> {
        let probe = |alg: Algorithm| {
            let key = MintKey::Pem {
                pem: pem.clone(),
                alg,
            };
            mint(&key, &Value::Object(Map::new()), None).map(|_| key)
        };
        match alg {
            Some(alg) => probe(alg),
            None => [
                Algorithm::RS256,
                Algorithm::ES256,
                Algorithm::ES384,
                Algorithm::EdDSA,
            ]
            .into_iter()
            .find_map(|alg| probe(alg).ok())
            .ok_or_else(|| {
                "not an RSA, ECDSA (P-256/P-384) or Ed25519 private key in PEM form".to_string()
            }),
        }
    }
}

/// A signed JWT with `claims` (a JSON object) and `kid` in the header when given.
pub fn mint(key: &MintKey, claims: &Value, kid: Option<&str>) -> Result<String, String> {
    if !claims.is_object() {
        return Err("the claims must be a JSON object".into());
    }
    let payload = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
    mint_raw(key, &payload, kid)
}

/// A signed JWT whose payload is `payload` byte for byte, JSON or not (tests and fuzzing:
/// claims a `serde_json::Value` cannot hold, such as duplicate keys or odd numbers).
pub fn mint_raw(key: &MintKey, payload: &[u8], kid: Option<&str>) -> Result<String, String> {
    let alg = key.algorithm();
    let name = algorithm_name(alg);
    let encoding = match key {
        MintKey::Hmac { secret, .. } => {
            if alg.family() != AlgorithmFamily::Hmac {
                return Err(format!(
                    "{name} is not an HMAC algorithm (HS256, HS384, HS512)"
                ));
            }
            EncodingKey::from_secret(secret).map_err(|_| "the HMAC secret is empty".to_string())?
        }
        MintKey::Pem { pem, .. } => {
            let parsed = match alg.family() {
                AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(pem),
                AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pem),
                AlgorithmFamily::Ed => EncodingKey::from_ed_pem(pem),
                AlgorithmFamily::Hmac => {
                    return Err(format!("{name} needs an HMAC secret, not a PEM key"))
                }
            };
            parsed.map_err(|e| format!("cannot use the PEM as a private key for {name}: {e}"))?
        }
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    let message = format!("{}.{}", b64url_encode(&header), b64url_encode(payload));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &encoding, alg)
        .map_err(|e| format!("cannot sign with {name}: {e}"))?;
    Ok(format!("{message}.{signature}"))
}

/// The key `ringhub token` signs with by default: the configured HMAC secret (inline, file or
/// environment) with HS256, or the first HS* algorithm of `auth.algorithms`.
pub fn mint_key_from_config(cfg: &AuthConfig) -> Result<MintKey, String> {
    const NEEDS: &str = "minting needs the HMAC secret or --key <private PEM>";
    let secret = hmac_secret(cfg)?.ok_or_else(|| NEEDS.to_string())?;
    let listed = parse_algorithms(&cfg.algorithms)?;
    let alg = if listed.is_empty() {
        Algorithm::HS256
    } else {
        *listed
            .iter()
            .find(|a| a.family() == AlgorithmFamily::Hmac)
            .ok_or_else(|| format!("auth.algorithms accepts no HS* algorithm: {NEEDS}"))?
    };
    Ok(MintKey::Hmac { secret, alg })
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;
    use std::time::Duration;

    const NOW: u64 = 1_700_000_000;
    const SECRET: &str = "unit-test-secret-0123456789abcdef";

    fn key_path(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/keys")
            .join(name)
    }

    fn key_file(name: &str) -> Vec<u8> {
        std::fs::read(key_path(name)).unwrap()
    }

    fn secret_cfg() -> AuthConfig {
        AuthConfig {
            secret: Some(SECRET.into()),
            ..AuthConfig::default()
        }
    }

    fn pem_cfg(files: &[&str]) -> AuthConfig {
        AuthConfig {
            public_key_files: files.iter().map(|f| key_path(f)).collect(),
            ..AuthConfig::default()
        }
    }

    fn hs_key(secret: &[u8], alg: Algorithm) -> MintKey {
        MintKey::Hmac {
            secret: secret.to_vec(),
            alg,
        }
    }

    fn pem_key(file: &str, alg: Algorithm) -> MintKey {
        MintKey::Pem {
            pem: key_file(file),
            alg,
        }
    }

    /// A valid connection token's claims at `NOW`.
    fn base() -> Value {
        json!({"sub": "alice", "exp": NOW + 600})
    }

    fn with(mut claims: Value, key: &str, value: Value) -> Value {
        claims[key] = value;
        claims
    }

    fn without(mut claims: Value, key: &str) -> Value {
        claims.as_object_mut().unwrap().remove(key);
        claims
    }

    fn hs256(claims: &Value) -> String {
        mint(&hs_key(SECRET.as_bytes(), Algorithm::HS256), claims, None).unwrap()
    }

    fn verifier(cfg: &AuthConfig) -> Verifier {
        Verifier::new(cfg).unwrap()
    }

    fn claim_err(msg: &str) -> TokenError {
        TokenError::Claim(msg.into())
    }

    /// Unpadded base64url, for hand-made tokens.
    fn b64(data: &[u8]) -> String {
        b64url_encode(data)
    }

    fn unsigned(header: &Value, claims: &Value, signature: &str) -> String {
        format!(
            "{}.{}.{signature}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn b64url_round_trip_and_strictness() {
        let data: Vec<u8> = (0..=255).collect();
        for n in 0..data.len() {
            assert_eq!(
                b64url_decode(&b64url_encode(&data[..n])).unwrap(),
                &data[..n]
            );
        }
        assert_eq!(b64url_encode(b"\xfb\xff"), "-_8");
        assert_eq!(b64url_decode("").unwrap(), b"");
        for data in [&b"a"[..], b"ab", b"abc", b"abcd", b"\xff\xfe\xfd\x00"] {
            assert_eq!(b64url_decode(&b64(data)).unwrap(), data);
        }
        assert_eq!(b64url_decode("YQ=="), None, "padding");
        assert_eq!(b64url_decode("YR"), None, "non-zero trailing bits");
        assert_eq!(b64url_decode("Y"), None, "length 1 mod 4");
        assert_eq!(b64url_decode("a+b/"), None, "standard alphabet");
    }

    #[test]
    fn hmac_algorithms() {
        let v = verifier(&secret_cfg());
        assert_eq!(
            v.algorithms(),
            &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]
        );
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let t = mint(&hs_key(SECRET.as_bytes(), alg), &base(), None).unwrap();
            let c = v.verify_connection(&t, NOW).unwrap();
            assert_eq!(c.user, "alice");
            assert_eq!(c.exp, Some(NOW + 600));
            assert!(c.info.is_none() && c.channels.is_empty());
        }
    }

    #[test]
    fn rsa_algorithms_both_pem_forms() {
        for public in ["rsa_public.pem", "rsa_public_pkcs1.pem"] {
            let v = verifier(&pem_cfg(&[public]));
            assert_eq!(v.algorithms(), AlgorithmFamily::Rsa.algorithms());
            for private in ["rsa_private.pem", "rsa_private_pkcs1.pem"] {
                for alg in AlgorithmFamily::Rsa.algorithms() {
                    let t = mint(&pem_key(private, *alg), &base(), None).unwrap();
                    assert_eq!(v.verify_connection(&t, NOW).unwrap().user, "alice");
                }
            }
            let other = mint(
                &pem_key("rsa2_private.pem", Algorithm::RS256),
                &base(),
                None,
            );
            assert_eq!(
                v.verify_connection(&other.unwrap(), NOW).unwrap_err(),
                TokenError::BadSignature
            );
        }
    }

    #[test]
    fn ec_algorithms_by_curve() {
        let v = verifier(&pem_cfg(&["ec_public.pem"]));
        assert_eq!(v.algorithms(), &[Algorithm::ES256]);
        let t = mint(&pem_key("ec_private.pem", Algorithm::ES256), &base(), None).unwrap();
        assert_eq!(v.verify_connection(&t, NOW).unwrap().user, "alice");
        let t384 = mint(
            &pem_key("ec384_private.pem", Algorithm::ES384),
            &base(),
            None,
        )
        .unwrap();
        assert_eq!(
            v.verify_connection(&t384, NOW).unwrap_err(),
            TokenError::Algorithm("ES384".into())
        );

        let v = verifier(&pem_cfg(&["ec_public.pem", "ec384_public.pem"]));
        assert_eq!(v.algorithms(), &[Algorithm::ES256, Algorithm::ES384]);
        assert!(v.verify_connection(&t, NOW).is_ok());
        assert!(v.verify_connection(&t384, NOW).is_ok());
        // A P-384 signature relabelled ES256 finds no P-256 key that verifies it.
        let parts: Vec<&str> = t384.split('.').collect();
        let relabelled = format!(
            "{}.{}.{}",
            b64(br#"{"alg":"ES256","typ":"JWT"}"#),
            parts[1],
            parts[2]
        );
        assert_eq!(
            v.verify_connection(&relabelled, NOW).unwrap_err(),
            TokenError::BadSignature
        );
    }

    #[test]
    fn eddsa() {
        let v = verifier(&pem_cfg(&["ed_public.pem"]));
        assert_eq!(v.algorithms(), &[Algorithm::EdDSA]);
        let t = mint(&pem_key("ed_private.pem", Algorithm::EdDSA), &base(), None).unwrap();
        assert_eq!(v.verify_connection(&t, NOW).unwrap().user, "alice");
    }

    #[test]
    fn mixed_keys_each_family_to_its_own_keys() {
        let mut cfg = pem_cfg(&["rsa_public.pem", "ec_public.pem", "ed_public.pem"]);
        cfg.secret = Some(SECRET.into());
        let v = verifier(&cfg);
        assert_eq!(v.algorithms().len(), 3 + 6 + 1 + 1);
        for key in [
            hs_key(SECRET.as_bytes(), Algorithm::HS512),
            pem_key("rsa_private.pem", Algorithm::PS384),
            pem_key("ec_private.pem", Algorithm::ES256),
            pem_key("ed_private.pem", Algorithm::EdDSA),
        ] {
            let t = mint(&key, &base(), Some("ignored-without-jwks")).unwrap();
            assert_eq!(
                v.verify_connection(&t, NOW).unwrap().user,
                "alice",
                "{key:?}"
            );
        }
    }

    #[test]
    fn alg_none_is_refused() {
        let v = verifier(&secret_cfg());
        for alg in ["none", "None", "NONE", "nOnE"] {
            let t = unsigned(&json!({"alg": alg, "typ": "JWT"}), &base(), "");
            assert_eq!(
                v.verify_connection(&t, NOW).unwrap_err(),
                TokenError::Algorithm(alg.into())
            );
            // Even with a signature part that a naive verifier would ignore.
            let t = unsigned(&json!({"alg": alg}), &base(), "c2ln");
            assert!(v.verify_connection(&t, NOW).is_err());
        }
        let t = unsigned(&json!({"alg": "HS1024"}), &base(), "");
        assert_eq!(
            v.verify_connection(&t, NOW).unwrap_err(),
            TokenError::Algorithm("HS1024".into())
        );
        let t = unsigned(&json!({"alg": "x".repeat(100)}), &base(), "");
        assert_eq!(
            v.verify_connection(&t, NOW).unwrap_err(),
            TokenError::Algorithm("(unsupported)".into())
        );
        let t = unsigned(&json!({"typ": "JWT"}), &base(), "");
        assert!(matches!(
            v.verify_connection(&t, NOW),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn key_confusion_hs256_with_the_public_key_as_secret() {
        let public_pem = key_file("rsa_public.pem");
        let forged = mint(&hs_key(&public_pem, Algorithm::HS256), &base(), None).unwrap();
        // Only the RSA key: HS* is not even accepted.
        let v = verifier(&pem_cfg(&["rsa_public.pem"]));
        assert_eq!(
            v.verify_connection(&forged, NOW).unwrap_err(),
            TokenError::Algorithm("HS256".into())
        );
        // RSA key and a secret: the HS256 token is checked against the secret only.
        let mut cfg = pem_cfg(&["rsa_public.pem", "ec_public.pem", "ed_public.pem"]);
        cfg.secret = Some(SECRET.into());
        let v = verifier(&cfg);
        assert_eq!(
            v.verify_connection(&forged, NOW).unwrap_err(),
            TokenError::BadSignature
        );
        for file in ["ec_public.pem", "ed_public.pem", "rsa_public_pkcs1.pem"] {
            let forged = mint(&hs_key(&key_file(file), Algorithm::HS256), &base(), None);
            assert_eq!(
                v.verify_connection(&forged.unwrap(), NOW).unwrap_err(),
                TokenError::BadSignature
            );
        }
    }

    #[test]
    fn algorithm_not_configured() {
        let mut cfg = secret_cfg();
        cfg.algorithms = vec!["HS384".into()];
        let v = verifier(&cfg);
        assert_eq!(v.algorithms(), &[Algorithm::HS384]);
        assert_eq!(
            v.verify_connection(&hs256(&base()), NOW).unwrap_err(),
            TokenError::Algorithm("HS256".into())
        );
        let t = mint(&hs_key(SECRET.as_bytes(), Algorithm::HS384), &base(), None).unwrap();
        assert!(v.verify_connection(&t, NOW).is_ok());

        let mut cfg = pem_cfg(&["rsa_public.pem"]);
        cfg.algorithms = vec!["PS256".into()];
        let v = verifier(&cfg);
        let t = mint(&pem_key("rsa_private.pem", Algorithm::RS256), &base(), None).unwrap();
        assert_eq!(
            v.verify_connection(&t, NOW).unwrap_err(),
            TokenError::Algorithm("RS256".into())
        );
    }

    #[test]
    fn bad_signature_and_tampering() {
        let v = verifier(&secret_cfg());
        let t = mint(&hs_key(b"another secret", Algorithm::HS256), &base(), None).unwrap();
        assert_eq!(
            v.verify_connection(&t, NOW).unwrap_err(),
            TokenError::BadSignature
        );
        let good = hs256(&base());
        let parts: Vec<&str> = good.split('.').collect();
        let admin = b64(json!({"sub": "admin", "exp": NOW + 600})
            .to_string()
            .as_bytes());
        let tampered = format!("{}.{admin}.{}", parts[0], parts[2]);
        assert_eq!(
            v.verify_connection(&tampered, NOW).unwrap_err(),
            TokenError::BadSignature
        );
        let no_sig = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(
            v.verify_connection(&no_sig, NOW).unwrap_err(),
            TokenError::BadSignature
        );
        let bad_b64 = format!("{}.{}.{}!", parts[0], parts[1], parts[2]);
        assert!(matches!(
            v.verify_connection(&bad_b64, NOW),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn time_claims() {
        let v = verifier(&secret_cfg()); // leeway 30 s
        let at = |claims: Value| v.verify_connection(&hs256(&claims), NOW);
        assert!(at(with(base(), "exp", json!(NOW - 30))).is_ok());
        let expired = at(with(base(), "exp", json!(NOW - 31))).unwrap_err();
        assert_eq!(expired, TokenError::Expired);
        assert!(expired.is_expired());
        assert!(!TokenError::BadSignature.is_expired());
        assert!(at(with(base(), "nbf", json!(NOW + 30))).is_ok());
        assert_eq!(
            at(with(base(), "nbf", json!(NOW + 31))).unwrap_err(),
            TokenError::NotYetValid
        );
        assert!(at(with(base(), "iat", json!(NOW + 30))).is_ok());
        assert_eq!(
            at(with(base(), "iat", json!(NOW + 31))).unwrap_err(),
            claim_err("`iat` is in the future")
        );
        // Floats are numbers too.
        let c = at(with(base(), "exp", json!(NOW as f64 + 600.75))).unwrap();
        assert_eq!(c.exp, Some(NOW + 600));
        assert_eq!(
            at(with(base(), "exp", json!(NOW as f64 - 30.5))).unwrap_err(),
            TokenError::Expired
        );
        // Type confusion: strings, null, booleans, negative numbers are refused, not ignored.
        for name in ["exp", "nbf", "iat"] {
            for bad in [
                json!("9999999999"),
                json!(null),
                json!(true),
                json!([1]),
                json!({}),
            ] {
                assert_eq!(
                    at(with(base(), name, bad)).unwrap_err(),
                    claim_err(&format!("`{name}` must be a number"))
                );
            }
            assert_eq!(
                at(with(base(), name, json!(-1))).unwrap_err(),
                claim_err(&format!("`{name}` must be a non-negative number"))
            );
        }
        assert_eq!(
            at(without(base(), "exp")).unwrap_err(),
            claim_err("missing `exp`")
        );
        let mut cfg = secret_cfg();
        cfg.require_exp = false;
        cfg.leeway = Duration::ZERO;
        let v = verifier(&cfg);
        let c = v
            .verify_connection(&hs256(&without(base(), "exp")), NOW)
            .unwrap();
        assert_eq!(c.exp, None);
        assert_eq!(
            v.verify_connection(&hs256(&with(base(), "exp", json!(NOW - 1))), NOW)
                .unwrap_err(),
            TokenError::Expired
        );
        // Even without require_exp, a string exp is refused.
        assert_eq!(
            v.verify_connection(&hs256(&with(base(), "exp", json!("1"))), NOW)
                .unwrap_err(),
            claim_err("`exp` must be a number")
        );
    }

    #[test]
    fn audience_and_issuer() {
        let mut cfg = secret_cfg();
        cfg.audience = vec!["hub".into(), "hub2".into()];
        cfg.issuer = Some("https://issuer.test".into());
        let v = verifier(&cfg);
        let ok = with(
            with(base(), "aud", json!("hub")),
            "iss",
            json!("https://issuer.test"),
        );
        let at = |claims: Value| v.verify_connection(&hs256(&claims), NOW);
        assert!(at(ok.clone()).is_ok());
        assert!(at(with(ok.clone(), "aud", json!(["other", "hub2"]))).is_ok());
        assert_eq!(
            at(without(ok.clone(), "aud")).unwrap_err(),
            claim_err("missing `aud`")
        );
        for wrong in [json!("other"), json!([]), json!(["other"])] {
            assert_eq!(
                at(with(ok.clone(), "aud", wrong)).unwrap_err(),
                claim_err("`aud` does not name this hub")
            );
        }
        for bad in [
            json!(1),
            json!(["hub", 1]),
            json!(null),
            json!({"hub": true}),
        ] {
            assert_eq!(
                at(with(ok.clone(), "aud", bad)).unwrap_err(),
                claim_err("`aud` must be a string or an array of strings")
            );
        }
        assert_eq!(
            at(without(ok.clone(), "iss")).unwrap_err(),
            claim_err("missing `iss`")
        );
        assert_eq!(
            at(with(ok.clone(), "iss", json!("https://evil.test"))).unwrap_err(),
            claim_err("wrong `iss`")
        );
        assert_eq!(
            at(with(ok.clone(), "iss", json!(["https://issuer.test"]))).unwrap_err(),
            claim_err("`iss` must be a string")
        );
        // Without audience/issuer rules, the claims are optional (but still typed).
        let v = verifier(&secret_cfg());
        assert!(v.verify_connection(&hs256(&ok), NOW).is_ok());
        assert!(v.verify_connection(&hs256(&base()), NOW).is_ok());
        assert!(v
            .verify_connection(&hs256(&with(base(), "aud", json!(5))), NOW)
            .is_err());
    }

    #[test]
    fn subject() {
        let v = verifier(&secret_cfg());
        let at = |claims: Value| v.verify_connection(&hs256(&claims), NOW);
        assert_eq!(
            at(without(base(), "sub")).unwrap_err(),
            claim_err("missing `sub`")
        );
        for bad in [json!(42), json!(null), json!(["alice"])] {
            assert_eq!(
                at(with(base(), "sub", bad)).unwrap_err(),
                claim_err("`sub` must be a string")
            );
        }
        assert_eq!(at(with(base(), "sub", json!(""))).unwrap().user, "");
    }

    #[test]
    fn size_and_garbage() {
        let mut cfg = secret_cfg();
        cfg.max_token_size = 300;
        let v = verifier(&cfg);
        let big = hs256(&with(base(), "pad", json!("x".repeat(300))));
        assert_eq!(
            v.verify_connection(&big, NOW).unwrap_err(),
            TokenError::TooLarge(300)
        );
        assert_eq!(
            inspect(&"a".repeat(301), 300).unwrap_err(),
            TokenError::TooLarge(300)
        );
        let header = b64(br#"{"alg":"HS256"}"#);
        let payload = b64(br#"{"sub":"a"}"#);
        for garbage in [
            String::new(),
            "abc".into(),
            "a.b".into(),
            "a.b.c".into(),
            "....".into(),
            "é.é.é".into(),
            format!("{header}.{payload}"),
            format!("{header}.{payload}.sig.extra"),
            format!("{}.{payload}.sig", b64(b"not json")),
            format!("{}.{payload}.sig", b64(b"[1,2]")),
            format!("{}.{payload}.sig", b64(br#"{"alg":5}"#)),
            format!("{}.{payload}.sig", b64(br#"{"alg":"HS256","kid":5}"#)),
            format!("{header}.{}.sig", b64(b"[1,2]")),
            format!("{header}.{}.sig", b64(b"not json")),
            format!("{header}.{}.sig", b64(b"\"string\"")),
            format!("{header}.%%%.sig"),
            format!("{header}.{}.sig", b64(&[b'['; 200])),
        ] {
            assert!(
                matches!(
                    v.verify_connection(&garbage, NOW),
                    Err(TokenError::Malformed(_))
                ),
                "{garbage:?}: {:?}",
                v.verify_connection(&garbage, NOW)
            );
        }
    }

    #[test]
    fn crit_and_b64_headers_are_refused() {
        let v = verifier(&secret_cfg());
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp".into()]);
        let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        let t = jsonwebtoken::encode(&header, &base(), &key).unwrap();
        assert_eq!(
            v.verify_connection(&t, NOW).unwrap_err(),
            TokenError::Malformed("unsupported `crit` header".into())
        );
        for (b64_value, ok) in [
            (json!(false), false),
            (json!("no"), false),
            (json!(true), true),
        ] {
            let mut header = Header::new(Algorithm::HS256);
            header.extras.insert("b64", b64_value);
            let t = jsonwebtoken::encode(&header, &base(), &key).unwrap();
            assert_eq!(v.verify_connection(&t, NOW).is_ok(), ok);
        }
    }

    #[test]
    fn token_kinds() {
        let v = verifier(&secret_cfg());
        let channel = with(base(), "channel", json!("private:room"));
        assert_eq!(
            v.verify_connection(&hs256(&channel), NOW).unwrap_err(),
            TokenError::WrongKind("a channel token cannot be used as a connection token")
        );
        assert_eq!(
            v.verify_channel(&hs256(&base()), NOW).unwrap_err(),
            TokenError::WrongKind("a connection token cannot be used as a channel token")
        );
        assert_eq!(
            v.verify_channel(&hs256(&channel), NOW).unwrap(),
            ChannelClaims {
                user: "alice".into(),
                channel: "private:room".into(),
                exp: NOW + 600,
            }
        );
        for (bad, why) in [
            (json!(5), "`channel` must be a string"),
            (json!(null), "`channel` must be a string"),
            (json!(""), "`channel` must not be empty"),
        ] {
            assert_eq!(
                v.verify_channel(&hs256(&with(base(), "channel", bad)), NOW)
                    .unwrap_err(),
                claim_err(why)
            );
        }
        // Channel tokens always need `exp` and `sub`, whatever require_exp says.
        let mut cfg = secret_cfg();
        cfg.require_exp = false;
        let v = verifier(&cfg);
        assert_eq!(
            v.verify_channel(&hs256(&without(channel.clone(), "exp")), NOW)
                .unwrap_err(),
            claim_err("missing `exp`")
        );
        assert_eq!(
            v.verify_channel(&hs256(&without(channel.clone(), "sub")), NOW)
                .unwrap_err(),
            claim_err("missing `sub`")
        );
        assert_eq!(
            v.verify_channel(&hs256(&with(channel, "exp", json!(NOW - 100))), NOW)
                .unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn previous_secret_during_rotation() {
        let mut cfg = secret_cfg();
        cfg.previous_secret = Some("the-old-secret".into());
        let v = verifier(&cfg);
        let old = mint(&hs_key(b"the-old-secret", Algorithm::HS256), &base(), None).unwrap();
        assert!(v.verify_connection(&hs256(&base()), NOW).is_ok());
        assert!(v.verify_connection(&old, NOW).is_ok());
        let other = mint(&hs_key(b"a third secret", Algorithm::HS256), &base(), None).unwrap();
        assert_eq!(
            v.verify_connection(&other, NOW).unwrap_err(),
            TokenError::BadSignature
        );
        // Rotation done: the old secret is refused again.
        assert_eq!(
            verifier(&secret_cfg())
                .verify_connection(&old, NOW)
                .unwrap_err(),
            TokenError::BadSignature
        );
    }

    #[test]
    fn info_and_channels() {
        let v = verifier(&secret_cfg());
        let at = |claims: Value| v.verify_connection(&hs256(&claims), NOW);
        let info = json!({"name": "Alice", "tags": ["a", "b"], "n": 1});
        let c = at(with(
            with(base(), "info", info.clone()),
            "channels",
            json!(["news", "chat:1"]),
        ))
        .unwrap();
        let raw = c.info.unwrap();
        assert_eq!(serde_json::from_str::<Value>(raw.get()).unwrap(), info);
        assert_eq!(c.channels, vec!["news", "chat:1"]);

        // The limit is on the compact JSON text: {"k":"..."} is 8 bytes plus the string.
        let at_limit = json!({"k": "x".repeat(MAX_INFO_BYTES - 8)});
        assert_eq!(at_limit.to_string().len(), MAX_INFO_BYTES);
        assert!(at(with(base(), "info", at_limit)).is_ok());
        assert_eq!(
            at(with(
                base(),
                "info",
                json!({"k": "x".repeat(MAX_INFO_BYTES - 7)})
            ))
            .unwrap_err(),
            claim_err("`info` is larger than 1024 bytes")
        );
        for bad in [json!("str"), json!([1]), json!(null), json!(3)] {
            assert_eq!(
                at(with(base(), "info", bad)).unwrap_err(),
                claim_err("`info` must be a JSON object")
            );
        }
        for bad in [
            json!("news"),
            json!(["news", 1]),
            json!([null]),
            json!({"a": 1}),
        ] {
            assert_eq!(
                at(with(base(), "channels", bad)).unwrap_err(),
                claim_err("`channels` must be an array of strings")
            );
        }
        let many: Vec<String> = (0..=MAX_CHANNELS).map(|i| format!("c{i}")).collect();
        let checked = check_connection_claims(
            with(base(), "channels", json!(many)).as_object().unwrap(),
            &ClaimRules::default(),
            NOW,
        );
        assert_eq!(
            checked.unwrap_err(),
            claim_err("`channels` has more than 1000 entries")
        );
        let most = &many[..MAX_CHANNELS];
        let checked = check_connection_claims(
            with(base(), "channels", json!(most)).as_object().unwrap(),
            &ClaimRules::default(),
            NOW,
        );
        assert_eq!(checked.unwrap().channels.len(), MAX_CHANNELS);
    }

    #[test]
    fn errors_never_echo_the_token() {
        let mut cfg = secret_cfg();
        cfg.max_token_size = 2000;
        cfg.audience = vec!["hub".into()];
        let v = verifier(&cfg);
        let marker = "MARKER-7f3a9c";
        let with_marker = |c: Value| with(c, "marker", json!(marker));
        let tokens = [
            hs256(&with_marker(with(base(), "exp", json!(NOW - 1000)))),
            hs256(&with_marker(base())),
            hs256(&with_marker(with(base(), "aud", json!(marker)))),
            hs256(&with_marker(with(base(), "sub", json!(5)))),
            hs256(&with_marker(with(base(), "channel", json!(marker)))),
            mint(
                &hs_key(b"wrong", Algorithm::HS256),
                &with_marker(base()),
                None,
            )
            .unwrap(),
            unsigned(&json!({"alg": "none", "m": marker}), &base(), ""),
            format!("{marker}.{marker}.{marker}"),
            marker.repeat(300),
        ];
        for t in &tokens {
            for err in [
                v.verify_connection(t, NOW).unwrap_err(),
                v.verify_channel(t, NOW).unwrap_err(),
            ] {
                let text = format!("{err} {err:?}");
                assert!(!text.contains(marker), "{text}");
                assert!(!text.contains(t.as_str()), "{text}");
            }
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = |cfg: AuthConfig| Verifier::new(&cfg).unwrap_err();
        let e = err(pem_cfg(&["does-not-exist.pem"]));
        assert!(
            e.starts_with("auth.public_key_files: cannot read ")
                && e.contains("does-not-exist.pem"),
            "{e}"
        );
        let e = err(AuthConfig {
            secret_env: Some("RINGHUB_TEST_SURELY_UNSET_VARIABLE".into()),
            ..AuthConfig::default()
        });
        assert_eq!(
            e,
            "auth.secret_env: environment variable RINGHUB_TEST_SURELY_UNSET_VARIABLE is not set"
        );
        let e = err(AuthConfig {
            secret: Some(String::new()),
            ..AuthConfig::default()
        });
        assert_eq!(e, "auth.secret: the secret is empty");
        let e = err(AuthConfig {
            secret_file: Some("/nonexistent/ringhub-secret".into()),
            ..AuthConfig::default()
        });
        assert!(
            e.starts_with("auth.secret_file: cannot read /nonexistent/ringhub-secret"),
            "{e}"
        );
        let e = err(AuthConfig {
            secret: Some("a".into()),
            secret_env: Some("PATH".into()),
            ..AuthConfig::default()
        });
        assert!(e.contains("only one of"), "{e}");
        let e = err(AuthConfig {
            previous_secret: Some("old".into()),
            public_key_files: vec![key_path("rsa_public.pem")],
            ..AuthConfig::default()
        });
        assert!(e.starts_with("auth.previous_secret:"), "{e}");
        let mut cfg = secret_cfg();
        cfg.previous_secret = Some(String::new());
        assert_eq!(err(cfg), "auth.previous_secret: the secret is empty");

        let mut cfg = secret_cfg();
        cfg.jwks_url = Some("https://issuer.test/.well-known/jwks.json".into());
        let e = err(cfg);
        assert!(
            e.starts_with("auth.jwks_url: https is not supported"),
            "{e}"
        );
        assert!(e.contains("public_key_files") && e.contains("proxy"), "{e}");

        for (names, want) in [
            (
                vec!["HS256", "XS256"],
                "auth.algorithms: unknown algorithm \"XS256\"",
            ),
            (vec!["none"], "auth.algorithms: \"none\""),
            (
                vec!["RS256"],
                "auth.algorithms: RS256 is listed but no configured key",
            ),
        ] {
            let mut cfg = secret_cfg();
            cfg.algorithms = names.iter().map(|s| s.to_string()).collect();
            let e = err(cfg);
            assert!(e.starts_with(want), "{e}");
        }
        let mut cfg = pem_cfg(&["ec_public.pem"]);
        cfg.algorithms = vec!["ES384".into()];
        assert!(err(cfg).contains("ES384 is listed"));

        assert!(err(AuthConfig::default()).starts_with("auth: no key configured"));

        for (file, want) in [
            ("rsa_private.pem", "holds a private key"),
            ("ec_private.pem", "holds a private key"),
            ("rsa1024_public.pem", "RSA key of 1024 bits is too short"),
            ("README.md", "no PEM block"),
        ] {
            let e = err(pem_cfg(&[file]));
            assert!(
                e.starts_with("auth.public_key_files: ") && e.contains(file) && e.contains(want),
                "{e}"
            );
        }
    }

    #[test]
    fn secret_file_and_env() {
        let dir = std::env::temp_dir().join(format!("ringhub-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "from-a-file\r\n\n").unwrap();
        let v = verifier(&AuthConfig {
            secret_file: Some(path.clone()),
            ..AuthConfig::default()
        });
        let t = mint(&hs_key(b"from-a-file", Algorithm::HS256), &base(), None).unwrap();
        assert!(v.verify_connection(&t, NOW).is_ok());
        std::fs::write(&path, "\n").unwrap();
        let e = Verifier::new(&AuthConfig {
            secret_file: Some(path.clone()),
            ..AuthConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("holds an empty secret"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();

        // PATH is always set (and setting variables in a threaded test is racy).
        let cfg = AuthConfig {
            secret_env: Some("PATH".into()),
            ..AuthConfig::default()
        };
        let v = verifier(&cfg);
        let path_value = std::env::var_os("PATH").unwrap().into_encoded_bytes();
        let t = mint(&hs_key(&path_value, Algorithm::HS256), &base(), None).unwrap();
        assert!(v.verify_connection(&t, NOW).is_ok());
        match mint_key_from_config(&cfg).unwrap() {
            MintKey::Hmac { secret, alg } => {
                assert_eq!(secret, path_value);
                assert_eq!(alg, Algorithm::HS256);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn minting() {
        let mut cfg = secret_cfg();
        let key = mint_key_from_config(&cfg).unwrap();
        assert_eq!(key.algorithm(), Algorithm::HS256);
        assert!(!format!("{key:?}").contains(SECRET));
        let t = mint(&key, &base(), Some("k1")).unwrap();
        let (header, claims) = inspect(&t, 8192).unwrap();
        assert_eq!(header.kid.as_deref(), Some("k1"));
        assert_eq!(Value::Object(claims), base());
        assert!(verifier(&cfg).verify_connection(&t, NOW).is_ok());

        cfg.algorithms = vec!["HS512".into(), "HS256".into()];
        assert_eq!(
            mint_key_from_config(&cfg).unwrap().algorithm(),
            Algorithm::HS512
        );
        cfg.algorithms = vec!["RS256".into()];
        let e = mint_key_from_config(&cfg).unwrap_err();
        assert!(
            e.contains("minting needs the HMAC secret or --key <private PEM>"),
            "{e}"
        );
        let e = mint_key_from_config(&pem_cfg(&["rsa_public.pem"])).unwrap_err();
        assert_eq!(e, "minting needs the HMAC secret or --key <private PEM>");

        // Raw payloads: what `Value` cannot express still goes through the same checks.
        let v = verifier(&secret_cfg());
        let raw = |payload: &str| mint_raw(&key, payload.as_bytes(), None).unwrap();
        let dup = format!(r#"{{"sub":"a","exp":{},"exp":"9999999999"}}"#, NOW + 60);
        assert_eq!(
            v.verify_connection(&raw(&dup), NOW).unwrap_err(),
            claim_err("`exp` must be a number"),
            "the last duplicate wins, and is typed"
        );
        assert_eq!(
            v.verify_connection(&raw(r#"{"sub":"a","exp":1e400}"#), NOW)
                .unwrap_err(),
            TokenError::Malformed("the payload is not a base64url-encoded JSON object".into())
        );
        assert!(matches!(
            v.verify_connection(&raw("not json"), NOW),
            Err(TokenError::Malformed(_))
        ));
        assert!(mint(&key, &json!([1]), None).is_err());
        assert!(mint(&hs_key(b"", Algorithm::HS256), &base(), None).is_err());
        assert!(mint(&hs_key(b"x", Algorithm::RS256), &base(), None).is_err());
        assert!(mint(&pem_key("rsa_private.pem", Algorithm::HS256), &base(), None).is_err());
        assert!(mint(&pem_key("ec_private.pem", Algorithm::RS256), &base(), None).is_err());
        assert!(mint(&pem_key("rsa_public.pem", Algorithm::RS256), &base(), None).is_err());

        for (file, alg) in [
            ("rsa_private.pem", Algorithm::RS256),
            ("rsa_private_pkcs1.pem", Algorithm::RS256),
            ("ec_private.pem", Algorithm::ES256),
            ("ec384_private.pem", Algorithm::ES384),
            ("ed_private.pem", Algorithm::EdDSA),
        ] {
            let key = MintKey::from_private_pem(key_file(file), None).unwrap();
            assert_eq!(key.algorithm(), alg, "{file}");
        }
        assert!(MintKey::from_private_pem(key_file("rsa_public.pem"), None).is_err());
        let key = MintKey::from_private_pem(key_file("rsa_private.pem"), Some(Algorithm::PS512));
        assert_eq!(key.unwrap().algorithm(), Algorithm::PS512);
    }

    #[test]
    fn shared_across_shard_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Verifier>();
        send_sync::<std::sync::Arc<crate::auth::jwks::JwksCache>>();
    }

    #[test]
    fn check_registered_directly() {
        let rules = ClaimRules {
            audience: vec![],
            issuer: None,
            leeway: 0,
            require_exp: true,
        };
        let claims = json!({"sub": "u", "exp": 1e30});
        let (user, exp) = check_registered(claims.as_object().unwrap(), &rules, NOW, true).unwrap();
        assert_eq!((user.as_str(), exp), ("u", Some(u64::MAX)));
        let claims = json!({"sub": "u", "exp": NOW});
        assert!(check_registered(claims.as_object().unwrap(), &rules, NOW, true).is_ok());
        assert_eq!(
            check_registered(claims.as_object().unwrap(), &rules, NOW + 1, true).unwrap_err(),
            TokenError::Expired
        );
    }
}
