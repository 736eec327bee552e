//! Connection tokens for hubs with `[auth]`.
//!
//! [`Auth`] is the `--token-*` flags checked and resolved when a scenario is prepared: the key
//! read, the algorithm matched to it, one token signed as a test. [`Auth::mint_all`] then signs
//! one token per connection *before* the timed part of a run, spread over this machine's cores,
//! so signing (about a millisecond per token for RSA) costs neither the run's clock nor the CPU
//! it measures. Connection `n` is user `<--token-user-prefix><n>`; its token carries `sub`,
//! `iat`, `exp` (= mint time + `--token-ttl`) and `aud`/`iss` when given, signed with
//! `ringhub::auth::token::mint`.
//!
//! How a connection presents its token is a [`Login`]; the handshake that waits for the hub's
//! `connected` is [`crate::client::open`].

use crate::cli::{TokenArgs, TokenIn};
use crate::client::Login;
use jsonwebtoken::Algorithm;
use ringhub::auth::token::{mint, now_secs, MintKey};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Below this many tokens per thread, one thread mints them all (threads cost more).
const PER_THREAD_MIN: usize = 64;

/// The resolved `--token-*` flags: what signs the tokens and what they say.
pub struct Auth {
    key: MintKey,
    pub alg: Algorithm,
    /// What signs, for the report: `HMAC secret` or the key file.
    pub signer: String,
    pub ttl: Duration,
    pub token_in: TokenIn,
    pub user_prefix: String,
    pub aud: Option<String>,
    pub iss: Option<String>,
}

/// HS256, HS384, HS512: signed with a shared secret.
fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl Auth {
    /// `None` without `--token-secret` and `--token-key` (connections do not authenticate).
    /// Every mistake in the flags is an error here, before anything connects.
    pub fn new(t: &TokenArgs) -> Result<Option<Auth>, String> {
        let (key, alg, signer) = match (&t.token_secret, &t.token_key) {
            (None, None) => {
                let stray = [
                    ("--token-alg", t.token_alg.is_some()),
                    ("--token-aud", t.token_aud.is_some()),
                    ("--token-iss", t.token_iss.is_some()),
                ];
                if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
                    return Err(format!(
                        "{flag} needs --token-secret (or RINGHUB_LOAD_TOKEN_SECRET) or \
                         --token-key: there is nothing to sign tokens with"
                    ));
                }
                return Ok(None);
            }
            (Some(_), Some(_)) => {
                return Err(
                    "give --token-secret (or RINGHUB_LOAD_TOKEN_SECRET) or --token-key, \
                            not both"
                        .into(),
                )
            }
            (Some(secret), None) => {
                if secret.is_empty() {
                    return Err("--token-secret is empty".into());
                }
                let alg = t.token_alg.unwrap_or(Algorithm::HS256);
                if !is_hmac(alg) {
                    return Err(format!(
                        "--token-alg {alg:?} signs with a private key: give --token-key \
                         FILE.pem (a secret signs HS256, HS384 or HS512)"
                    ));
                }
                let key = MintKey::Hmac {
                    secret: secret.as_bytes().to_vec(),
                    alg,
                };
                (key, alg, "HMAC secret".to_string())
            }
            (None, Some(path)) => {
                let Some(alg) = t.token_alg else {
                    return Err(format!(
                        "--token-key {} needs --token-alg (RS256, ES256, EdDSA, …: the one the \
                         key is for)",
                        path.display()
                    ));
                };
                if is_hmac(alg) {
                    return Err(format!(
                        "--token-alg {alg:?} signs with a shared secret: give --token-secret, \
                         or an algorithm for the key in {}",
                        path.display()
                    ));
                }
                let pem = std::fs::read(path)
                    .map_err(|e| format!("cannot read --token-key {}: {e}", path.display()))?;
                let key = MintKey::Pem { pem, alg };
                (key, alg, format!("private key {}", path.display()))
            }
        };
        if t.token_ttl < Duration::from_secs(1) {
            return Err("--token-ttl must be at least 1s".into());
        }
        let auth = Auth {
            key,
            alg,
            signer,
            ttl: t.token_ttl,
            token_in: t.token_in,
            user_prefix: t.token_user_prefix.clone(),
            aud: t.token_aud.clone(),
            iss: t.token_iss.clone(),
        };
        // A key that does not fit the algorithm fails here, once, not once per connection.
        auth.mint(0, now_secs())
            .map_err(|e| format!("cannot sign a {alg:?} token with the {}: {e}", auth.signer))?;
        Ok(Some(auth))
    }

    /// The algorithm's name as in a JWT header (`HS256`, `EdDSA`).
    pub fn alg_name(&self) -> String {
        format!("{:?}", self.alg)
    }

    /// The token of connection `n`, issued at `now` (Unix seconds).
    pub fn mint(&self, n: usize, now: u64) -> Result<String, String> {
        let mut claims = json!({
            "sub": format!("{}{n}", self.user_prefix),
            "iat": now,
            "exp": now + self.ttl.as_secs(),
        });
        if let Some(aud) = &self.aud {
            claims["aud"] = json!(aud);
        }
        if let Some(iss) = &self.iss {
            claims["iss"] = json!(iss);
        }
        mint(&self.key, &claims, None)
    }

    /// One token per connection, `0..n`, minted on every core of this machine.
    pub fn mint_all(&self, n: usize, quiet: bool) -> Result<Tokens, String> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |p| p.get())
            .min(n.div_ceil(PER_THREAD_MIN))
            .max(1);
        if !quiet {
            eprintln!(
                "minting {n} {} tokens on {threads} thread(s) (before the timed part) ...",
                self.alg_name()
            );
        }
        let t0 = Instant::now();
        let now = now_secs();
        let per = n.div_ceil(threads).max(1);
        let parts: Vec<Result<Vec<String>, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let range = (t * per).min(n)..((t + 1) * per).min(n);
                    s.spawn(move || range.map(|k| self.mint(k, now)).collect())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("a minting thread panicked".into()))
                })
                .collect()
        });
        let mut list = Vec::with_capacity(n);
        for part in parts {
            list.extend(part.map_err(|e| format!("cannot mint tokens: {e}"))?);
        }
        let mint_s = t0.elapsed().as_secs_f64();
        if !quiet {
            eprintln!("  {n} tokens in {mint_s:.2} s");
        }
        Ok(Tokens {
            list,
            token_in: self.token_in,
            expires_at: now + self.ttl.as_secs(),
            mint_s,
        })
    }

    /// The report's setup line.
    pub fn describe(&self, tokens: &Tokens) -> String {
        let how = match self.token_in {
            TokenIn::Message => "in a connect message after the welcome",
            TokenIn::Query => "in the upgrade URL (?token=)",
        };
        let mut claims = Vec::new();
        if let Some(aud) = &self.aud {
            claims.push(format!("aud {aud:?}"));
        }
        if let Some(iss) = &self.iss {
            claims.push(format!("iss {iss:?}"));
        }
        let claims = if claims.is_empty() {
            String::new()
        } else {
            format!(", {}", claims.join(", "))
        };
        format!(
            "on: {} tokens ({}), one per connection as user {}<n>, sent {how}, valid {} s{claims}; \
             {} minted in {:.2} s before the run (not timed)",
            self.alg_name(),
            self.signer,
            self.user_prefix,
            self.ttl.as_secs(),
            tokens.len(),
            tokens.mint_s
        )
    }

    /// The report's `setup.auth` object.
    pub fn to_json(&self, tokens: &Tokens) -> Value {
        json!({
            "enabled": true,
            "algorithm": self.alg_name(),
            "key": if is_hmac(self.alg) { "secret" } else { "pem" },
            "token_in": self.token_in.as_str(),
            "ttl_s": self.ttl.as_secs(),
            "user_prefix": self.user_prefix,
            "audience": self.aud,
            "issuer": self.iss,
            "tokens": tokens.len(),
            "mint_s": tokens.mint_s,
        })
    }
}

/// The tokens of one run, connection `n`'s at index `n` (shared by the worker threads).
pub struct Tokens {
    list: Vec<String>,
    pub token_in: TokenIn,
    /// Unix seconds at which the first of them expires.
    pub expires_at: u64,
    /// Seconds minting took.
    pub mint_s: f64,
}

impl Tokens {
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// How connection `n` authenticates.
    pub fn login(&self, n: usize) -> Login<'_> {
        let token = &self.list[n];
        match self.token_in {
            TokenIn::Message => Login::Message(token),
            TokenIn::Query => Login::Query(token),
        }
    }

    /// A warning when the tokens expire less than `need` from now.
    pub fn expiry_warning(&self, need: Duration) -> Option<String> {
        let left = self.expires_at.saturating_sub(now_secs());
        (left < need.as_secs()).then(|| {
            format!(
                "the connection tokens expire in {left} s but the connections are needed for \
                 about {} s: the hub closes connections whose token expired (4002 after its \
                 grace period); raise --token-ttl",
                need.as_secs()
            )
        })
    }
}

/// How connection `n` authenticates: with its token, or not at all.
pub fn login(tokens: Option<&Tokens>, n: usize) -> Login<'_> {
    tokens.map_or(Login::None, |t| t.login(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(secret: Option<&str>) -> TokenArgs {
        TokenArgs {
            token_secret: secret.map(String::from),
            ..TokenArgs::default()
        }
    }

    #[test]
    fn no_token_flags_mean_no_auth() {
        assert!(Auth::new(&args(None)).unwrap().is_none());
        let mut a = args(None);
        a.token_aud = Some("x".into());
        assert!(Auth::new(&a).err().unwrap().contains("--token-aud needs"));
    }

    #[test]
    fn a_secret_signs_hmac_only() {
        let auth = Auth::new(&args(Some("s3cret"))).unwrap().unwrap();
        assert_eq!(auth.alg_name(), "HS256");
        let mut a = args(Some("s3cret"));
        a.token_alg = Some(Algorithm::RS256);
        assert!(Auth::new(&a).err().unwrap().contains("--token-key"));
        a.token_alg = Some(Algorithm::HS512);
        assert_eq!(Auth::new(&a).unwrap().unwrap().alg_name(), "HS512");
        assert!(Auth::new(&args(Some(""))).is_err());
    }

    #[test]
    fn a_key_needs_an_algorithm_for_it() {
        let mut a = args(None);
        a.token_key = Some("/nonexistent/key.pem".into());
        assert!(Auth::new(&a).err().unwrap().contains("needs --token-alg"));
        a.token_alg = Some(Algorithm::HS256);
        assert!(Auth::new(&a).err().unwrap().contains("shared secret"));
        a.token_alg = Some(Algorithm::ES256);
        assert!(Auth::new(&a).err().unwrap().contains("cannot read"));
        a.token_secret = Some("s".into());
        assert!(Auth::new(&a).err().unwrap().contains("not both"));
    }

    #[test]
    fn tokens_carry_user_expiry_and_claims() {
        let mut a = args(Some("s3cret"));
        a.token_user_prefix = "u-".into();
        a.token_aud = Some("hub".into());
        a.token_iss = Some("load".into());
        a.token_ttl = Duration::from_secs(60);
        let auth = Auth::new(&a).unwrap().unwrap();
        let tokens = auth.mint_all(300, true).unwrap();
        assert_eq!(tokens.len(), 300);
        let Login::Message(t) = tokens.login(299) else {
            panic!("message login expected")
        };
        // The payload is the middle part, base64url without padding.
        let payload = t.split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(&b64url(payload)).unwrap();
        assert_eq!(claims["sub"], "u-299");
        assert_eq!(claims["aud"], "hub");
        assert_eq!(claims["iss"], "load");
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert_eq!(exp - iat, 60);
        assert!(tokens.expiry_warning(Duration::from_secs(10)).is_none());
        assert!(tokens.expiry_warning(Duration::from_secs(120)).is_some());
    }

    /// Decode base64url without padding (enough for a test).
    fn b64url(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url: {c}"),
        };
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for &c in s.as_bytes() {
            acc = acc << 6 | u32::from(val(c));
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }
}
