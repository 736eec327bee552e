//! Server configuration: one struct, every limit with its default and the reason for it.
//!
//! Parsing of flags and environment variables happens only in the binary (`main.rs`); this module
//! holds the values plus the small parsers for sizes (`64KiB`) and durations (`500ms`, `25s`, `2m`)
//! that the binary and the tests share. [`Config::default`] is what `ringhub serve` runs with.
//! [`file`] reads the TOML config file (`--config`) onto a `Config`.

pub mod file;

use crate::auth::namespaces::Namespaces;
use crate::auth::AuthConfig;
use std::net::SocketAddr;
use std::time::Duration;

/// Everything a hub instance needs to know. Build one with `Config::default()` and adjust fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address every shard listens on with SO_REUSEPORT. Default `127.0.0.1:8080`: local-only
    /// unless the operator opens it up on purpose. Port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Number of shards (threads, each with its own runtime, listener and connection table).
    /// Default: one per available core.
    pub shards: usize,
    /// Cores the shards are pinned to, in shard order (`--cpus 0,2-3`). Default: cores 0..shards
    /// (wrapping around when there are more shards than cores).
    pub cpus: Option<Vec<usize>>,
    /// Pin shard threads to cores (default true). `--no-pin` leaves placement to the kernel.
    pub pin: bool,
    /// Bytes that may wait in one connection's outbox before it is cut off with close 1013.
    /// Default 1 MiB: about 10,000 small messages of backlog, while 10,000 slow clients can pin
    /// at most 10 GiB of frames at worst (shared frames make the real figure far smaller).
    pub max_queued_bytes: usize,
    /// Largest WebSocket frame and message (after reassembly) a client may send. Default 64 KiB:
    /// pub/sub payloads are small; larger ones close with 1009.
    pub max_message_size: usize,
    /// Subscriptions one connection may hold. Default 1000: enough for any real client, bounded
    /// registry memory per connection.
    pub max_subscriptions: usize,
    /// Publishes per second one WebSocket connection may make (a token bucket refilled
    /// continuously); 0 = unlimited. Beyond it a publish is dropped with a `rate_limited` error,
    /// and a connection that keeps at it is closed with 1008 (see `ratelimit.rs`). Default 1000:
    /// far above interactive use (tens per second), while one connection can no longer keep its
    /// shard busy with fan-out alone — a hub faces the open internet, so the limit is on unless
    /// turned off. Every dropped publish is answered (`rate_limited`) and counted; backends that
    /// publish more use `POST /publish`, or a hub with `--max-publish-rate 0`.
    pub max_publish_rate: u32,
    /// Publishes a connection may make at once after being quiet (the bucket size). Default
    /// (`None`): 2 × `max_publish_rate`, so a client that reconnects and catches up is not
    /// limited.
    pub publish_burst: Option<u32>,
    /// How often the server pings each connection. Default 25 s: under the 30–60 s idle cut-offs of
    /// common load balancers and proxies.
    pub ping_interval: Duration,
    /// A connection that sends nothing (not even a pong) for this long is closed. Default 60 s.
    pub idle_timeout: Duration,
    /// Time allowed from TCP accept to a complete HTTP request head (and between keep-alive HTTP
    /// requests). Default 5 s: slow-loris clients cannot hold a slot for long.
    pub handshake_timeout: Duration,
    /// On SIGTERM/SIGINT, how long to wait for clients to take their close frames. Default 10 s.
    pub shutdown_timeout: Duration,
    /// How long a connection we are closing gets to receive our close frame (and answer it) before
    /// its socket is shut. Default 5 s.
    pub close_timeout: Duration,
    /// Connections (WebSocket and HTTP) the instance accepts; beyond it upgrades get HTTP 503.
    /// Default: derived from the open-file limit (limit minus a reserve of 64).
    pub max_connections: Option<usize>,
    /// When set, `POST /publish` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Largest HTTP request body (`POST /publish`). Default: max_message_size + 1 KiB.
    pub max_http_body: Option<usize>,
    /// Instance id used in connection ids and the welcome. Default: random per process start.
    pub instance_id: Option<String>,
    /// Use monoio's epoll (legacy) driver instead of io_uring. Default false: the Fusion driver
    /// picks io_uring and falls back to epoll by itself where io_uring is unavailable (e.g. some
    /// container seccomp profiles); this forces the fallback, to test it or to compare.
    pub epoll: bool,
    /// Serve `GET /echo`: a WebSocket endpoint that sends every text or binary message back,
    /// through the same connection, codec and outbox code as `/ws`. For conformance testing
    /// (Autobahn); off by default.
    pub echo: bool,
    /// Redis coordination (multi-instance mode). `None`: embedded mode, shards exchange messages
    /// in-process.
    pub redis: Option<RedisConfig>,
    /// Core the registry thread is pinned to (Redis mode). Default: the last core; when there are
    /// fewer cores than shards + 1 it shares a core with a shard (said at start).
    pub registry_core: Option<usize>,
    /// How often this instance writes its `instance` key. Default 10 s.
    pub heartbeat_interval: Duration,
    /// TTL of the `instance` key: a dead instance is noticed about this long after its last
    /// heartbeat. Default 30 s (three missed heartbeats).
    pub heartbeat_ttl: Duration,
    /// TTL of each `conn` key, rewritten when half of it has passed. Default 120 s.
    pub connection_ttl: Duration,
    /// Token authentication (`[auth]` with a key). `None`: open mode — anyone who can reach the
    /// port may subscribe and publish (a warning is logged at start).
    pub auth: Option<AuthConfig>,
    /// Origins a browser upgrade may come from (`[auth] allowed_origins`); empty = any. Others
    /// get HTTP 403 before any WebSocket frame.
    pub allowed_origins: Vec<String>,
    /// Channel rules: `[channels]` (default namespace) and `[namespaces.NAME]`.
    pub namespaces: Namespaces,
    /// A subscribe with `since` that misses more than this many messages is answered
    /// `recovered: false` (the client reloads instead). Default 1000: a few seconds of a busy
    /// channel, while one recovery cannot make a shard read and send an unbounded backlog.
    pub max_recovery: usize,
}

/// Where and how to reach Redis (`--redis redis://[:password@]host:port[/db]`).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `host:port`.
    pub addr: String,
    /// Database index for SELECT (pub/sub ignores it; the registry's keys live there). Default 0.
    pub db: u32,
    /// AUTH username (Redis 6 ACL), if any.
    pub username: Option<String>,
    /// AUTH password, if any (`redis://:pw@host` or `--redis-password`).
    pub password: Option<String>,
    /// Prefix of every key and channel. Default `ws:`: hub channel `news` is `ws:chan:news`.
    pub prefix: String,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("addr", &self.addr)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisConfig {
    /// Parse `redis://[[user]:password@]host[:port][/db]` (port 6379 and db 0 by default).
    pub fn from_url(url: &str) -> Result<RedisConfig, String> {
        let bad = |why: &str| {
            format!(
                "invalid Redis URL {url:?}: {why} (expected redis://[:password@]host:port[/db])"
            )
        };
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| bad("must start with redis://"))?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, d)) => (
                h,
                d.parse()
                    .map_err(|_| bad("the database must be a number"))?,
            ),
            None => (rest, 0),
        };
        if hostport.is_empty() {
            return Err(bad("missing host"));
        }
        let addr = if hostport.starts_with('[')
            || hostport
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            hostport.to_string()
        } else if hostport.contains(':') {
            return Err(bad("invalid port"));
        } else {
            format!("{hostport}:6379")
        };
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some(("", pw)) => (None, Some(pw.to_string())),
                Some((user, pw)) => (Some(user.to_string()), Some(pw.to_string())),
                None => (None, Some(a.to_string())),
            },
        };
        Ok(RedisConfig {
            addr,
            db,
            username,
            password,
            prefix: "ws:".into(),
        })
    }

    /// The Redis pub/sub channel of hub channel `channel`.
    pub fn channel_key(&self, channel: &str) -> String {
        format!("{}chan:{channel}", self.prefix)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpus: None,
            pin: true,
            max_queued_bytes: 1 << 20,
            max_message_size: 64 << 10,
            max_subscriptions: 1000,
            max_publish_rate: 1000,
            publish_burst: None,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            max_connections: None,
            api_key: None,
            max_http_body: None,
            instance_id: None,
            epoll: false,
            echo: false,
            redis: None,
            registry_core: None,
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_ttl: Duration::from_secs(30),
            connection_ttl: Duration::from_secs(120),
            auth: None,
            allowed_origins: Vec::new(),
            namespaces: Namespaces::default(),
            max_recovery: 1000,
        }
    }
}

impl Config {
    /// The HTTP body limit in force.
    pub fn http_body_limit(&self) -> usize {
        self.max_http_body.unwrap_or(self.max_message_size + 1024)
    }

    /// The publish burst in force (2 × the rate unless set), at most [`crate::ratelimit::MAX_BURST`].
    pub fn publish_burst_limit(&self) -> u32 {
        self.publish_burst
            .unwrap_or_else(|| self.max_publish_rate.saturating_mul(2))
            .min(crate::ratelimit::MAX_BURST)
    }

    /// Timer sweep period: a quarter of the shortest timeout, between 10 ms and 1 s. Timeouts fire
    /// within one tick of their nominal time.
    pub fn tick(&self) -> Duration {
        let shortest = self
            .ping_interval
            .min(self.idle_timeout)
            .min(self.handshake_timeout)
            .min(self.close_timeout);
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// Reject combinations that cannot work, with a message saying why.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.shards > 1024 {
            return Err(format!("--shards must be 1..=1024, got {}", self.shards));
        }
        if let Some(cpus) = &self.cpus {
            if cpus.len() < self.shards {
                return Err(format!(
                    "--cpus lists {} cores for {} shards",
                    cpus.len(),
                    self.shards
                ));
            }
        }
        if self.heartbeat_ttl <= self.heartbeat_interval {
            return Err("--heartbeat-ttl must be longer than --heartbeat-interval".into());
        }
        if self.heartbeat_interval.is_zero() || self.connection_ttl < Duration::from_millis(100) {
            return Err(
                "--heartbeat-interval must be > 0 and --connection-ttl at least 100ms".into(),
            );
        }
        if self.max_message_size < 128 {
            return Err("--max-message-size must be at least 128 bytes".into());
        }
        if let Some(burst) = self.publish_burst {
            if self.max_publish_rate > 0 && !(1..=crate::ratelimit::MAX_BURST).contains(&burst) {
                return Err(format!(
                    "--publish-burst must be 1..={}, got {burst}",
                    crate::ratelimit::MAX_BURST
                ));
            }
        }
        if self.max_queued_bytes < self.max_message_size {
            return Err("--max-queued-bytes must be at least --max-message-size".into());
        }
        for (name, d) in [
            ("--ping-interval", self.ping_interval),
            ("--idle-timeout", self.idle_timeout),
            ("--handshake-timeout", self.handshake_timeout),
            ("--close-timeout", self.close_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be greater than zero"));
            }
        }
        Ok(())
    }
}

/// Parse a duration written like `500ms`, `25s`, `2m`, `1h` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 25s, 2m"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    Ok(d)
}

/// Parse a byte size: `1048576`, `64KiB`, `1MiB`, `64k`, `1m` (binary multiples).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 65536, 64KiB, 1MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Write a duration the way [`parse_duration`] reads it: `500ms`, `25s`, `2m`, `1h` (the largest
/// whole unit; sub-millisecond parts are dropped).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let s = ms / 1000;
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if s != 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s != 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Write a byte size the way [`parse_size`] reads it: `1GiB`, `1MiB`, `64KiB` (the largest whole
/// binary unit), else the number of bytes.
pub fn format_size(n: usize) -> String {
    let unit = [(30, "GiB"), (20, "MiB"), (10, "KiB")]
        .into_iter()
        .find(|&(shift, _)| n != 0 && n.is_multiple_of(1 << shift));
    match unit {
        Some((shift, name)) => format!("{}{name}", n >> shift),
        None => n.to_string(),
    }
}

/// Parse a core list like `0,2-3` into `[0, 2, 3]`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("invalid core list {s:?}: expected e.g. 0,2-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b - a > 4096 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err(format!("empty core list {s:?}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("25s").unwrap(), Duration::from_secs(25));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("12 apples").is_err());
        assert!(parse_size("99999999999999999999g").is_err());
    }

    #[test]
    fn formatting_reads_back() {
        for d in [0, 1, 500, 1000, 25_000, 120_000, 7_200_000, 90_500] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        for n in [0, 1, 1000, 1024, 65536, 1 << 20, 3 << 30, (1 << 20) + 1] {
            assert_eq!(parse_size(&format_size(n)).unwrap(), n);
        }
        assert_eq!(format_size(64 << 10), "64KiB");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2-3").unwrap(), vec![0, 2, 3]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("").is_err());
    }

    #[test]
    fn validation() {
        let mut c = Config {
            shards: 2,
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        c.cpus = Some(vec![0]);
        assert!(c.validate().unwrap_err().contains("--cpus"));
        c.cpus = None;
        c.idle_timeout = Duration::ZERO;
        assert!(c.validate().is_err());
        c.idle_timeout = Duration::from_secs(1);
        c.max_publish_rate = 1000;
        c.publish_burst = Some(0);
        assert!(c.validate().unwrap_err().contains("--publish-burst"));
        c.max_publish_rate = 0;
        assert!(c.validate().is_ok(), "no burst needed without a rate");
    }

    #[test]
    fn publish_burst_defaults_to_twice_the_rate() {
        let mut c = Config::default();
        assert_eq!(c.max_publish_rate, 1000, "limited by default");
        assert_eq!(c.publish_burst_limit(), 2000);
        c.max_publish_rate = 100;
        assert_eq!(c.publish_burst_limit(), 200);
        c.publish_burst = Some(5);
        assert_eq!(c.publish_burst_limit(), 5);
        c.publish_burst = None;
        c.max_publish_rate = u32::MAX;
        assert_eq!(c.publish_burst_limit(), crate::ratelimit::MAX_BURST);
    }

    #[test]
    fn tick_is_bounded() {
        let mut c = Config::default();
        assert_eq!(c.tick(), Duration::from_secs(1));
        c.idle_timeout = Duration::from_millis(20);
        assert_eq!(c.tick(), Duration::from_millis(10));
    }

    #[test]
    fn redis_urls() {
        let c = RedisConfig::from_url("redis://127.0.0.1:7001/2").unwrap();
        assert_eq!(
            (c.addr.as_str(), c.db, c.password.as_deref()),
            ("127.0.0.1:7001", 2, None)
        );
        let c = RedisConfig::from_url("redis://:s3cr@t@localhost").unwrap();
        assert_eq!(c.addr, "localhost:6379");
        assert_eq!(c.password.as_deref(), Some("s3cr@t"));
        let c = RedisConfig::from_url("redis://bob:pw@h:1/").unwrap();
        assert_eq!(
            (c.username.as_deref(), c.password.as_deref(), c.db),
            (Some("bob"), Some("pw"), 0)
        );
        assert!(RedisConfig::from_url("http://h:1").is_err());
        assert!(RedisConfig::from_url("redis://h:1/x").is_err());
        assert!(RedisConfig::from_url("redis://h:notaport").is_err());
        assert!(
            !format!("{c:?}").contains("pw"),
            "password must not be logged"
        );
        assert_eq!(c.channel_key("news"), "ws:chan:news");
    }
}
