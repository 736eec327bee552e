//! JWKS fetching off the shard threads: the only I/O in `auth`.
//!
//! [`JwksCache::start`] spawns one thread (`ringhub-jwks`) that GETs the key set over plain
//! HTTP/1.1 (blocking `std::net`, timeouts on everything) at start, every
//! [`JwksTiming::refresh_every`], and when a shard asks ([`JwksCache::request_refresh`], after
//! a token named a `kid` the set does not have). The shards read the current [`KeySet`] through
//! an `RwLock<Arc<..>>`, once per token verification (a cold path).
//!
//! Invariants:
//! - a failed fetch never clears the keys: the last good set keeps working while the URL is
//!   down (a fetch that yields no usable key counts as failed);
//! - fetches asked for by shards are rate limited ([`JwksTiming::min_request_interval`], 30 s):
//!   a flood of tokens with unknown `kid`s costs at most one fetch per interval;
//! - only public keys are taken from the set (RSA, EC P-256/P-384, Ed25519); symmetric (`oct`)
//!   keys, encryption keys and keys that fail to parse are skipped;
//! - the thread ends when the last [`JwksCache`] is dropped (it holds none itself); it never
//!   keeps a process alive (it is detached).

use std::fmt;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::Value;

use super::token::VerifyKey;

/// Largest key set body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Largest response head accepted.
const MAX_HEAD: usize = 16 << 10;
/// Most keys kept from one set (the rest are skipped with a warning).
pub const MAX_KEYS: usize = 100;

/// When the fetcher fetches, and how long it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwksTiming {
    /// Period of the background refetch. Default 5 min: keys added by the issuer are seen
    /// within that even if no token names them first.
    pub refresh_every: Duration,
    /// Least time between two fetches asked for by [`JwksCache::request_refresh`]. Default
    /// 30 s: bounds the fetches a flood of unknown `kid`s can cause.
    pub min_request_interval: Duration,
    /// How long [`JwksCache::start`] waits for the first fetch. Default 5 s: the hub starts
    /// (with an empty set) even if the URL is down.
    pub initial_wait: Duration,
    /// Connect, read and write timeout of each socket operation. Default 5 s.
    pub io_timeout: Duration,
    /// Whole-fetch limit (a server dripping bytes cannot hold the fetcher). Default 10 s.
    pub fetch_deadline: Duration,
}

impl Default for JwksTiming {
    fn default() -> Self {
        JwksTiming {
            refresh_every: Duration::from_secs(300),
            min_request_interval: Duration::from_secs(30),
            initial_wait: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
            fetch_deadline: Duration::from_secs(10),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// URL
// ---------------------------------------------------------------------------------------------

/// A parsed `http://host[:port]/path[?query]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// The authority as written (the `Host` header).
    pub authority: String,
}

impl fmt::Display for JwksUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

impl JwksUrl {
    /// Parse an `http://` URL; `https://` is refused (the hub has no TLS client).
    pub fn parse(url: &str) -> Result<JwksUrl, String> {
        let url = url.trim();
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err("https is not supported (the hub has no TLS client): use \
                        public_key_files, or serve the key set through a local http proxy \
                        (e.g. http://127.0.0.1:8080/jwks.json)"
                .into());
        }
        if !lower.starts_with("http://") {
            return Err(format!("{url:?} is not an http:// URL"));
        }
        let rest = &url["http://".len()..];
        let rest = rest.split('#').next().unwrap_or("");
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let path = if path.is_empty() {
            "/".to_string()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err("the path has spaces or control characters".into());
        }
        if authority.contains('@') {
            return Err("user:password@ in the URL is not supported".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| "unclosed [ in the host".to_string())?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| "garbage after the IPv6 address".to_string())?,
                ),
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err("no valid host in the URL".into());
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("bad port {p:?}"))?,
        };
        Ok(JwksUrl {
            host: host.to_string(),
            port,
            path,
            authority: authority.to_string(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Key set
// ---------------------------------------------------------------------------------------------

/// The usable keys of one fetched JWK set, in document order.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<(Option<String>, VerifyKey)>,
}

impl KeySet {
    /// The keys with this `kid` (usually one).
    pub fn with_kid<'a>(&'a self, kid: &'a str) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        self.keys
            .iter()
            .filter(move |(k, _)| k.as_deref() == Some(kid))
            .map(|(_, key)| key)
    }

    /// Every key with its `kid`.
    pub fn iter(&self) -> impl Iterator<Item = (Option<&str>, &VerifyKey)> {
        self.keys.iter().map(|(kid, key)| (kid.as_deref(), key))
    }

    /// The `kid`s, in document order (keys without one are left out).
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().filter_map(|(k, _)| k.as_deref()).collect()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Parse a JWK set (`{"keys":[...]}`). Keys that are not usable public signature keys are
/// skipped (returned as one line each in the second value, for the log); a body that is not a
/// JSON object with a `keys` array is an error.
pub fn parse_jwks(body: &[u8]) -> Result<(KeySet, Vec<String>), String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let list = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| "not a JWK set (no \"keys\" array)".to_string())?;
    let mut set = KeySet::default();
    let mut skipped = Vec::new();
    for (i, value) in list.iter().enumerate() {
        if set.keys.len() == MAX_KEYS {
            skipped.push(format!("keys after the first {MAX_KEYS} usable ones"));
            break;
        }
        let kid = value.get("kid").and_then(Value::as_str).map(str::to_owned);
        match usable_key(value) {
            Ok(key) => set.keys.push((kid, key)),
            Err(why) => skipped.push(format!("key #{i} (kid {kid:?}): {why}")),
        }
    }
    Ok((set, skipped))
}

/// One JWK as a verification key, or why it is not used.
fn usable_key(value: &Value) -> Result<VerifyKey, String> {
    let jwk: Jwk = serde_json::from_value(value.clone()).map_err(|e| format!("unparsable: {e}"))?;
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Err("an encryption key (use \"enc\")".into());
    }
    let declared = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => Some(Algorithm::try_from(ka).map_err(|_| format!("unsupported alg {ka}"))?),
    };
    let algorithms: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa.algorithms().to_vec(),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err("unsupported EC curve (P-256 and P-384 only)".into()),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => return Err("unsupported OKP curve (Ed25519 only)".into()),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric key (kty \"oct\"): never taken from a JWKS".into())
        }
        _ => return Err("unsupported key type".into()),
    };
    let algorithms = match declared {
        None => algorithms,
        Some(alg) if algorithms.contains(&alg) => vec![alg],
        Some(alg) => return Err(format!("alg {alg:?} does not fit the key type")),
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("bad key material: {e}"))?;
    // EC points and Ed25519 keys are checked by building a verifier (RSA: at first use).
    if key.family() != AlgorithmFamily::Rsa {
        let provider = CryptoProvider::try_get_default()
            .ok_or_else(|| "jsonwebtoken has no crypto provider".to_string())?;
        (provider.verifier_factory)(&algorithms[0], &key)
            .map_err(|e| format!("bad key material: {e}"))?;
    }
    Ok(VerifyKey { key, algorithms })
}

/// The public JWK (with `kid` and `alg`) of a PEM public key, as JSON: what a test or an issuer
/// serves in a key set. RSA gives `n`/`e`, EC `crv`/`x`/`y`, Ed25519 `crv`/`x`.
pub fn jwk_from_public_pem(pem: &[u8], kid: &str, alg: Algorithm) -> Result<Value, String> {
    let key = VerifyKey::from_public_pem(pem)?;
    if !key.can_verify(alg) {
        return Err(format!("{alg:?} does not fit this key"));
    }
    let mut jwk = Jwk::from_decoding_key(&key.key, Some(alg)).map_err(|e| e.to_string())?;
    jwk.common.key_id = Some(kid.to_string());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    serde_json::to_value(&jwk).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Cache and fetcher thread
// ---------------------------------------------------------------------------------------------

/// The fetcher's side of the cache, shared with its thread.
struct Shared {
    url: JwksUrl,
    timing: JwksTiming,
    keys: RwLock<Arc<KeySet>>,
    state: Mutex<State>,
    /// Wakes the fetcher (a request, or stop).
    wake: Condvar,
    /// Signalled after each fetch (for the initial wait).
    done: Condvar,
    fetches: AtomicU64,
}

/// What the fetcher is asked to do, under `Shared::state`.
#[derive(Default)]
struct State {
    /// The cache was dropped: the thread ends.
    stop: bool,
    /// A fetch was requested and has not started yet.
    pending: bool,
    /// When the last requested fetch was granted (the rate limit).
    last_requested: Option<Instant>,
    /// Completed when the next fetch to start has finished.
    waiters: Vec<futures_channel::oneshot::Sender<()>>,
    /// Fetches finished (successfully or not).
    finished: u64,
}

/// The JWKS key cache shared by the shards.
pub struct JwksCache {
    shared: Arc<Shared>,
}

impl fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksCache")
            .field("url", &self.shared.url.to_string())
            .field("keys", &self.keys().len())
            .field("fetches", &self.fetch_count())
            .finish()
    }
}

impl JwksCache {
    /// Spawn the fetcher thread and wait up to `timing.initial_wait` for its first fetch (on
    /// failure or timeout the set starts empty, with a warning).
    pub fn start(url: JwksUrl, timing: JwksTiming) -> Result<Arc<JwksCache>, String> {
        let shared = Arc::new(Shared {
            url,
            timing,
            keys: RwLock::new(Arc::new(KeySet::default())),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
            fetches: AtomicU64::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("ringhub-jwks".into())
            .spawn(move || run(thread_shared))
            .map_err(|e| format!("cannot start the JWKS thread: {e}"))?;

        let deadline = Instant::now() + timing.initial_wait;
        let mut state = lock(&shared.state);
        while state.finished == 0 {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    "JWKS: no key set from {} within {:?}; starting with no JWKS keys",
                    shared.url,
                    timing.initial_wait
                );
                break;
            }
            state = shared
                .done
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(state);
        Ok(Arc::new(JwksCache { shared }))
    }

    /// The current key set (a cheap clone of an `Arc`).
    pub fn keys(&self) -> Arc<KeySet> {
        Arc::clone(
            &self
                .shared
                .keys
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Ask the fetcher to refetch now (an unknown `kid` was seen). `None` when it fetched less
    /// than 30 s ago: the caller refuses the token at once. Otherwise the receiver resolves when
    /// the fetch finished (successfully or not).
    ///
    /// The 30 s ([`JwksTiming::min_request_interval`]) are counted between fetches asked for
    /// here; the start and periodic fetches do not count, so a key published just after start
    /// is still fetched on demand. The receiver is cancelled if the cache is dropped first.
    pub fn request_refresh(&self) -> Option<futures_channel::oneshot::Receiver<()>> {
        let mut state = lock(&self.shared.state);
        let now = Instant::now();
        if state.stop
            || state
                .last_requested
                .is_some_and(|t| now.duration_since(t) < self.shared.timing.min_request_interval)
        {
            return None;
        }
        state.last_requested = Some(now);
        state.pending = true;
        let (tx, rx) = futures_channel::oneshot::channel();
        state.waiters.push(tx);
        self.shared.wake.notify_all();
        Some(rx)
    }

    /// Fetches attempted so far (start, periodic and requested; failed ones included).
    pub fn fetch_count(&self) -> u64 {
        self.shared.fetches.load(Ordering::Relaxed)
    }

    /// The key set URL.
    pub fn url(&self) -> &JwksUrl {
        &self.shared.url
    }
}

impl Drop for JwksCache {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_all();
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fetcher thread: fetch, then sleep until the period ends, a request or stop.
fn run(shared: Arc<Shared>) {
    let mut next_periodic = Instant::now();
    loop {
        let waiters = {
            let mut state = lock(&shared.state);
            loop {
                if state.stop {
                    return;
                }
                let now = Instant::now();
                if state.pending || now >= next_periodic {
                    break;
                }
                state = shared
                    .wake
                    .wait_timeout(state, next_periodic - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            state.pending = false;
            std::mem::take(&mut state.waiters)
        };

        shared.fetches.fetch_add(1, Ordering::Relaxed);
        let result = fetch(&shared.url, &shared.timing).and_then(|body| parse_jwks(&body));
        let current = shared
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        match result {
            Ok((set, skipped)) => {
                for why in &skipped {
                    tracing::warn!("JWKS {}: skipped {why}", shared.url);
                }
                if set.is_empty() {
                    tracing::warn!(
                        "JWKS {}: no usable key in the set; keeping the {current} current keys",
                        shared.url
                    );
                } else {
                    tracing::info!(
                        "JWKS {}: {} keys (kids {:?})",
                        shared.url,
                        set.len(),
                        set.kids()
                    );
                    *shared.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                }
            }
            Err(e) => tracing::warn!(
                "JWKS {}: fetch failed: {e}; keeping the {current} current keys",
                shared.url
            ),
        }
        next_periodic = Instant::now() + shared.timing.refresh_every;
        lock(&shared.state).finished += 1;
        shared.done.notify_all();
        for waiter in waiters {
            let _ = waiter.send(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 GET
// ---------------------------------------------------------------------------------------------

/// How the response body ends.
enum Framing {
    Length(usize),
    Chunked,
    /// Read to EOF (`Connection: close`).
    Eof,
}

/// GET the URL; the body of a 200 response (≤ [`MAX_BODY`]).
pub fn fetch(url: &JwksUrl, timing: &JwksTiming) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timing.fetch_deadline;
    let addrs = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?;
    let mut last_error = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timing.io_timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let mut stream = stream.ok_or_else(|| match last_error {
        Some(e) => format!("cannot connect to {}:{}: {e}", url.host, url.port),
        None => format!("{} resolves to no address", url.host),
    })?;
    stream
        .set_write_timeout(Some(timing.io_timeout))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n\
         User-Agent: ringhub\r\nConnection: close\r\n\r\n",
        url.path, url.authority
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;

    let mut buf = Vec::with_capacity(8192);
    let (head_len, framing) = loop {
        if let Some(parsed) = parse_response_head(&buf)? {
            break parsed;
        }
        if buf.len() > MAX_HEAD {
            return Err("response head too large".into());
        }
        if read_some(&mut stream, &mut buf, deadline, timing.io_timeout)? == 0 {
            return Err("connection closed before the response head ended".into());
        }
    };
    let mut body = buf.split_off(head_len);
    loop {
        match framing {
            Framing::Length(n) if body.len() >= n => {
                body.truncate(n);
                return Ok(body);
            }
            Framing::Chunked => {
                if let Some(decoded) = decode_chunked(&body)? {
                    return Ok(decoded);
                }
            }
            _ => {}
        }
        // Chunk framing may add overhead; the decoded size is checked by `decode_chunked`.
        let limit = match framing {
            Framing::Chunked => 2 * MAX_BODY,
            _ => MAX_BODY,
        };
        if body.len() > limit {
            return Err(format!("the key set is larger than {MAX_BODY} bytes"));
        }
        if read_some(&mut stream, &mut body, deadline, timing.io_timeout)? == 0 {
            return match framing {
                Framing::Eof => Ok(body),
                _ => Err("connection closed before the body ended".into()),
            };
        }
    }
}

/// Read what is available into `buf`; 0 at EOF. Errors on timeout or past `deadline`.
fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    io_timeout: Duration,
) -> Result<usize, String> {
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| "timed out".to_string())?;
    stream
        .set_read_timeout(Some(left.min(io_timeout)))
        .map_err(|e| e.to_string())?;
    let mut chunk = [0u8; 16384];
    loop {
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timed out".into())
            }
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

/// The response head in `buf`: `None` while incomplete, else its length and the body framing.
/// Anything but `200` is an error (no redirects).
fn parse_response_head(buf: &[u8]) -> Result<Option<(usize, Framing)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad response head: {e}")),
    };
    let status = response.code.unwrap_or(0);
    if status != 200 {
        return Err(format!("HTTP status {status}"));
    }
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| format!("non-text {} header", h.name))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| "bad Content-Length".to_string())?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(format!("unsupported Transfer-Encoding {value:?}"));
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("content-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(format!("unsupported Content-Encoding {value:?}"));
        }
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) if n > MAX_BODY => {
            return Err(format!("the key set is larger than {MAX_BODY} bytes"))
        }
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Eof,
    };
    Ok(Some((head_len, framing)))
}

/// A chunked body: `None` until the last chunk and the trailer end are in `data`.
fn decode_chunked(data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let (consumed, size) = match httparse::parse_chunk_size(&data[pos..]) {
            Ok(httparse::Status::Complete(v)) => v,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err("bad chunk size".into()),
        };
        pos += consumed;
        if size == 0 {
            // Trailer fields, then an empty line.
            let rest = &data[pos..];
            if rest.starts_with(b"\r\n") || rest.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(Some(out));
            }
            return Ok(None);
        }
        let size = usize::try_from(size).map_err(|_| "chunk too large".to_string())?;
        if out.len().saturating_add(size) > MAX_BODY {
            return Err(format!("the key set is larger than {MAX_BODY} bytes"));
        }
        if data.len() - pos < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&data[pos..pos + size]);
        pos += size;
        if &data[pos..pos + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        pos += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::{mint, MintKey, TokenError, Verifier, JWKS_ALGORITHMS};
    use crate::auth::AuthConfig;
    use serde_json::json;
    use std::net::TcpListener;
    use std::path::Path;
    use std::sync::atomic::AtomicUsize;

    const NOW: u64 = 1_700_000_000;

    fn key_file(name: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/keys")
                .join(name),
        )
        .unwrap()
    }

    fn jwk(file: &str, kid: &str, alg: Algorithm) -> Value {
        jwk_from_public_pem(&key_file(file), kid, alg).unwrap()
    }

    fn set_of(keys: &[Value]) -> String {
        json!({ "keys": keys }).to_string()
    }

    fn token(private: &str, alg: Algorithm, kid: Option<&str>) -> String {
        let key = MintKey::Pem {
            pem: key_file(private),
            alg,
        };
        mint(&key, &json!({"sub": "bob", "exp": NOW + 60}), kid).unwrap()
    }

    /// What the test server answers.
    #[derive(Clone)]
    enum Reply {
        /// 200 with Content-Length.
        Length(String),
        /// 200, chunked (in 7-byte chunks, with a trailer).
        Chunked(String),
        /// 200 without length, closed after the body.
        Eof(String),
        Status(u16),
        /// Close without answering.
        Hangup,
        /// Say nothing for this long, then close.
        Silent(Duration),
    }

    /// A one-thread HTTP server on 127.0.0.1:0 answering every request with `reply`.
    struct TestServer {
        url: String,
        reply: Arc<Mutex<Reply>>,
        hits: Arc<AtomicUsize>,
    }

    impl TestServer {
        fn start(reply: Reply) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!(
                "http://{}/.well-known/jwks.json",
                listener.local_addr().unwrap()
            );
            let reply = Arc::new(Mutex::new(reply));
            let hits = Arc::new(AtomicUsize::new(0));
            let (r, h) = (Arc::clone(&reply), Arc::clone(&hits));
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    h.fetch_add(1, Ordering::SeqCst);
                    let reply = r.lock().unwrap().clone();
                    let _ = serve(&mut stream, reply);
                }
            });
            TestServer { url, reply, hits }
        }

        fn set(&self, reply: Reply) {
            *self.reply.lock().unwrap() = reply;
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    fn serve(stream: &mut TcpStream, reply: Reply) -> std::io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte)? == 0 {
                return Ok(());
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(
            head.starts_with("GET /.well-known/jwks.json HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
        let out = match reply {
            Reply::Length(body) => format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
            Reply::Chunked(body) => {
                let mut out = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string();
                for chunk in body.as_bytes().chunks(7) {
                    out += &format!("{:x}\r\n{}\r\n", chunk.len(), String::from_utf8_lossy(chunk));
                }
                out + "0\r\nX-Trailer: 1\r\n\r\n"
            }
            Reply::Eof(body) => format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{body}"),
            Reply::Status(code) => {
                format!("HTTP/1.1 {code} Oops\r\nContent-Length: 2\r\n\r\n{{}}")
            }
            Reply::Hangup => return Ok(()),
            Reply::Silent(d) => {
                std::thread::sleep(d);
                return Ok(());
            }
        };
        stream.write_all(out.as_bytes())
    }

    fn timing(min_request_interval: Duration) -> JwksTiming {
        JwksTiming {
            refresh_every: Duration::from_secs(3600),
            min_request_interval,
            initial_wait: Duration::from_secs(5),
            io_timeout: Duration::from_secs(2),
            fetch_deadline: Duration::from_secs(4),
        }
    }

    fn jwks_verifier(url: &str, timing: JwksTiming) -> Verifier {
        let cfg = AuthConfig {
            jwks_url: Some(url.to_string()),
            ..AuthConfig::default()
        };
        Verifier::with_jwks_timing(&cfg, timing).unwrap()
    }

    /// Wait for a refresh receiver to complete.
    fn wait(mut rx: futures_channel::oneshot::Receiver<()>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rx.try_recv() {
                Ok(Some(())) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => panic!("refresh did not complete: {other:?}"),
            }
        }
    }

    #[test]
    fn url_parsing() {
        let u = JwksUrl::parse("http://issuer.test:8080/keys?x=1#frag").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.path.as_str(),
                u.authority.as_str()
            ),
            ("issuer.test", 8080, "/keys?x=1", "issuer.test:8080")
        );
        assert_eq!(u.to_string(), "http://issuer.test:8080/keys?x=1");
        let u = JwksUrl::parse("HTTP://127.0.0.1").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = JwksUrl::parse("http://h?q").unwrap();
        assert_eq!(u.path, "/?q");
        let u = JwksUrl::parse("http://[::1]:9000/jwks").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        assert!(JwksUrl::parse("https://issuer.test/jwks")
            .unwrap_err()
            .starts_with("https is not supported"));
        for bad in [
            "ftp://x/",
            "http://",
            "http:///path",
            "http://h:0/",
            "http://h:99999/",
            "http://h:x/",
            "http://u:p@h/",
            "http://[::1/",
            "http://h/a b",
            "http://h/\r\nX: y",
        ] {
            assert!(JwksUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jwk_encoding_and_parsing() {
        let rsa = jwk("rsa_public.pem", "r", Algorithm::RS256);
        assert_eq!(rsa["kty"], "RSA");
        assert_eq!(rsa["kid"], "r");
        assert_eq!(rsa["alg"], "RS256");
        assert_eq!(rsa["e"], "AQAB");
        assert!(rsa["n"].as_str().unwrap().len() >= 342);
        let ec = jwk("ec_public.pem", "e", Algorithm::ES256);
        assert_eq!(
            (ec["kty"].as_str(), ec["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        let ec384 = jwk("ec384_public.pem", "e3", Algorithm::ES384);
        assert_eq!(ec384["crv"], "P-384");
        let ed = jwk("ed_public.pem", "d", Algorithm::EdDSA);
        assert_eq!(
            (ed["kty"].as_str(), ed["crv"].as_str()),
            (Some("OKP"), Some("Ed25519"))
        );
        assert!(jwk_from_public_pem(&key_file("ec_public.pem"), "x", Algorithm::ES384).is_err());
        assert!(jwk_from_public_pem(&key_file("rsa_private.pem"), "x", Algorithm::RS256).is_err());

        let mut no_alg = jwk("rsa2_public.pem", "r2", Algorithm::RS256);
        no_alg.as_object_mut().unwrap().remove("alg");
        let mut bad_point = ec.clone();
        bad_point["kid"] = json!("bad-point");
        bad_point["x"] = json!("AAAA");
        let mut enc = ec.clone();
        enc["kid"] = json!("enc");
        enc["use"] = json!("enc");
        let mut mismatched = ec.clone();
        mismatched["kid"] = json!("mismatch");
        mismatched["alg"] = json!("RS256");
        let mut unknown_alg = rsa.clone();
        unknown_alg["kid"] = json!("oaep");
        unknown_alg["alg"] = json!("RSA-OAEP");
        let body = json!({"keys": [
            rsa, ec, ec384, ed, no_alg, bad_point, enc, mismatched, unknown_alg,
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "kid": "no-n"},
            {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA", "kid": "p521"},
            "not an object",
            {"kid": 5},
        ]});
        let (set, skipped) = parse_jwks(body.to_string().as_bytes()).unwrap();
        assert_eq!(set.kids(), ["r", "e", "e3", "d", "r2"]);
        assert_eq!(skipped.len(), 9, "{skipped:#?}");
        let r = set.with_kid("r").next().unwrap();
        assert_eq!(r.algorithms, [Algorithm::RS256], "alg from the JWK");
        let r2 = set.with_kid("r2").next().unwrap();
        assert_eq!(
            r2.algorithms,
            AlgorithmFamily::Rsa.algorithms(),
            "no alg: the family"
        );
        assert_eq!(
            set.with_kid("e3").next().unwrap().algorithms,
            [Algorithm::ES384]
        );
        assert!(set.with_kid("hmac").next().is_none());

        assert!(parse_jwks(b"not json").is_err());
        assert!(parse_jwks(b"{\"keys\": 5}").is_err());
        assert!(parse_jwks(b"[]").is_err());
        assert!(parse_jwks(b"{\"keys\": []}").unwrap().0.is_empty());
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(decode_chunked(b"").unwrap(), None);
        assert_eq!(decode_chunked(b"3\r\nab").unwrap(), None);
        assert_eq!(decode_chunked(b"3\r\nabc\r\n").unwrap(), None);
        assert_eq!(decode_chunked(b"3\r\nabc\r\n0\r\n").unwrap(), None);
        assert_eq!(
            decode_chunked(b"3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n").unwrap(),
            Some(b"abcd".to_vec())
        );
        assert_eq!(
            decode_chunked(b"3;ext=1\r\nabc\r\n0\r\nT: 1\r\n\r\n").unwrap(),
            Some(b"abc".to_vec())
        );
        assert!(decode_chunked(b"zz\r\n").is_err());
        assert!(decode_chunked(b"3\r\nabcX\r\n").is_err());
        assert!(
            decode_chunked(b"ffffffff\r\n").is_err(),
            "over the body limit"
        );
    }

    #[test]
    fn verifies_with_jwks_keys() {
        let server = TestServer::start(Reply::Length(set_of(&[
            jwk("rsa_public.pem", "k1", Algorithm::RS256),
            jwk("ec_public.pem", "e1", Algorithm::ES256),
            jwk("ed_public.pem", "d1", Algorithm::EdDSA),
        ])));
        let v = jwks_verifier(&server.url, timing(Duration::from_secs(30)));
        let cache = v.jwks().unwrap();
        assert_eq!(cache.fetch_count(), 1);
        assert_eq!(cache.keys().kids(), ["k1", "e1", "d1"]);
        assert_eq!(v.algorithms(), JWKS_ALGORITHMS);

        for (private, alg, kid) in [
            ("rsa_private.pem", Algorithm::RS256, "k1"),
            ("ec_private.pem", Algorithm::ES256, "e1"),
            ("ed_private.pem", Algorithm::EdDSA, "d1"),
        ] {
            let t = token(private, alg, Some(kid));
            assert_eq!(v.verify_connection(&t, NOW).unwrap().user, "bob", "{kid}");
        }
        // No kid: every JWKS key of the family is tried.
        assert!(v
            .verify_connection(&token("rsa_private.pem", Algorithm::RS256, None), NOW)
            .is_ok());
        assert_eq!(
            v.verify_connection(&token("rsa_private.pem", Algorithm::RS256, Some("k9")), NOW)
                .unwrap_err(),
            TokenError::UnknownKid("k9".into())
        );
        let long_kid = "k".repeat(500);
        assert_eq!(
            v.verify_connection(
                &token("rsa_private.pem", Algorithm::RS256, Some(&long_kid)),
                NOW
            )
            .unwrap_err(),
            TokenError::UnknownKid("k".repeat(128))
        );
        assert_eq!(
            v.verify_connection(
                &token("rsa2_private.pem", Algorithm::RS256, Some("k1")),
                NOW
            )
            .unwrap_err(),
            TokenError::BadSignature
        );
        // k1 is declared RS256: a PS256 token naming it finds no key.
        assert_eq!(
            v.verify_connection(&token("rsa_private.pem", Algorithm::PS256, Some("k1")), NOW)
                .unwrap_err(),
            TokenError::NoKey
        );
        // The EC key's kid with an RSA signature: no RSA key with that kid.
        assert_eq!(
            v.verify_connection(&token("rsa_private.pem", Algorithm::RS256, Some("e1")), NOW)
                .unwrap_err(),
            TokenError::NoKey
        );
        let hs = mint(
            &MintKey::Hmac {
                secret: key_file("rsa_public.pem"),
                alg: Algorithm::HS256,
            },
            &json!({"sub": "bob", "exp": NOW + 60}),
            Some("k1"),
        )
        .unwrap();
        assert_eq!(
            v.verify_connection(&hs, NOW).unwrap_err(),
            TokenError::Algorithm("HS256".into())
        );
        assert_eq!(server.hits(), 1);
    }

    #[test]
    fn rotation_after_refresh() {
        let server = TestServer::start(Reply::Length(set_of(&[jwk(
            "rsa_public.pem",
            "k1",
            Algorithm::RS256,
        )])));
        let v = jwks_verifier(&server.url, timing(Duration::ZERO));
        let cache = v.jwks().unwrap();
        let t1 = token("rsa_private.pem", Algorithm::RS256, Some("k1"));
        let t2 = token("rsa2_private.pem", Algorithm::RS256, Some("k2"));
        assert!(v.verify_connection(&t1, NOW).is_ok());

        server.set(Reply::Length(set_of(&[
            jwk("rsa_public.pem", "k1", Algorithm::RS256),
            jwk("rsa2_public.pem", "k2", Algorithm::RS256),
        ])));
        assert_eq!(
            v.verify_connection(&t2, NOW).unwrap_err(),
            TokenError::UnknownKid("k2".into())
        );
        wait(cache.request_refresh().expect("refresh granted"));
        assert_eq!(cache.fetch_count(), 2);
        assert!(v.verify_connection(&t2, NOW).is_ok());
        assert!(v.verify_connection(&t1, NOW).is_ok());

        // k1 retired: gone after the next fetch.
        server.set(Reply::Chunked(set_of(&[jwk(
            "rsa2_public.pem",
            "k2",
            Algorithm::RS256,
        )])));
        wait(cache.request_refresh().expect("refresh granted"));
        assert_eq!(cache.keys().kids(), ["k2"]);
        assert_eq!(
            v.verify_connection(&t1, NOW).unwrap_err(),
            TokenError::UnknownKid("k1".into())
        );
        assert!(v.verify_channel(&t2, NOW).is_err(), "not a channel token");
        assert_eq!(server.hits(), 3);
    }

    #[test]
    fn refresh_rate_limit() {
        let server = TestServer::start(Reply::Eof(set_of(&[jwk(
            "ed_public.pem",
            "d1",
            Algorithm::EdDSA,
        )])));
        let v = jwks_verifier(&server.url, JwksTiming::default());
        let cache = v.jwks().unwrap();
        assert_eq!(cache.keys().kids(), ["d1"], "read to EOF");
        assert_eq!(cache.fetch_count(), 1);
        let first = cache
            .request_refresh()
            .expect("the first request is granted");
        assert!(cache.request_refresh().is_none(), "second within 30 s");
        wait(first);
        for _ in 0..100 {
            assert!(cache.request_refresh().is_none());
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(cache.fetch_count(), 2);
        assert_eq!(server.hits(), 2);
    }

    #[test]
    fn failed_fetches_keep_the_last_good_keys() {
        let good = set_of(&[jwk("ec_public.pem", "e1", Algorithm::ES256)]);
        let server = TestServer::start(Reply::Length(good));
        let v = jwks_verifier(&server.url, timing(Duration::ZERO));
        let cache = v.jwks().unwrap();
        let t = token("ec_private.pem", Algorithm::ES256, Some("e1"));
        assert!(v.verify_connection(&t, NOW).is_ok());
        let failures = [
            Reply::Hangup,
            Reply::Status(500),
            Reply::Status(301),
            Reply::Length("not json".into()),
            Reply::Length(r#"{"keys": []}"#.into()),
            Reply::Length(r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "e1"}]}"#.into()),
            Reply::Length("x".repeat(MAX_BODY + 1)),
        ];
        let n = failures.len() as u64;
        for reply in failures {
            server.set(reply);
            wait(cache.request_refresh().expect("refresh granted"));
            assert!(v.verify_connection(&t, NOW).is_ok());
            assert_eq!(cache.keys().kids(), ["e1"]);
        }
        assert_eq!(cache.fetch_count(), 1 + n);
    }

    #[test]
    fn url_down_at_start() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let started = Instant::now();
        let v = jwks_verifier(
            &format!("http://127.0.0.1:{port}/jwks"),
            timing(Duration::ZERO),
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        let cache = v.jwks().unwrap();
        assert!(cache.keys().is_empty());
        assert_eq!(cache.fetch_count(), 1);
        assert_eq!(
            v.verify_connection(&token("rsa_private.pem", Algorithm::RS256, Some("k1")), NOW)
                .unwrap_err(),
            TokenError::UnknownKid("k1".into())
        );
        assert_eq!(
            v.verify_connection(&token("rsa_private.pem", Algorithm::RS256, None), NOW)
                .unwrap_err(),
            TokenError::NoKey
        );
        wait(cache.request_refresh().unwrap());
        assert_eq!(cache.fetch_count(), 2);
    }

    #[test]
    fn silent_server_does_not_hold_the_start() {
        let server = TestServer::start(Reply::Silent(Duration::from_secs(3)));
        let t = JwksTiming {
            initial_wait: Duration::from_millis(300),
            io_timeout: Duration::from_millis(500),
            fetch_deadline: Duration::from_secs(1),
            ..timing(Duration::ZERO)
        };
        let started = Instant::now();
        let v = jwks_verifier(&server.url, t);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert!(v.jwks().unwrap().keys().is_empty());
        // The fetch itself gives up at its read timeout.
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&v.jwks().unwrap().shared.state).finished == 0 {
            assert!(Instant::now() < deadline, "fetch never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn jwks_with_static_keys() {
        let server = TestServer::start(Reply::Length(set_of(&[jwk(
            "rsa2_public.pem",
            "k2",
            Algorithm::RS256,
        )])));
        let cfg = AuthConfig {
            jwks_url: Some(server.url.clone()),
            public_key_files: vec![
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys/rsa_public.pem")
            ],
            secret: Some("jwks-and-a-secret-0123456789abcdef".into()),
            algorithms: vec!["RS256".into(), "HS256".into()],
            ..AuthConfig::default()
        };
        let v = Verifier::with_jwks_timing(&cfg, timing(Duration::from_secs(30))).unwrap();
        assert!(v
            .verify_connection(
                &token("rsa2_private.pem", Algorithm::RS256, Some("k2")),
                NOW
            )
            .is_ok());
        // A kid the JWKS does not know, but a static key verifies the token.
        assert!(v
            .verify_connection(
                &token("rsa_private.pem", Algorithm::RS256, Some("other")),
                NOW
            )
            .is_ok());
        assert!(v
            .verify_connection(&token("rsa_private.pem", Algorithm::RS256, None), NOW)
            .is_ok());
        assert_eq!(
            v.verify_connection(&token("rsa_private.pem", Algorithm::PS256, None), NOW)
                .unwrap_err(),
            TokenError::Algorithm("PS256".into())
        );
    }
}
