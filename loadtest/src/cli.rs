//! Command-line arguments of every scenario (clap derive), shared by the binary and by tests,
//! which build the same structs to run a scenario through the library.

use clap::{Args, Parser, Subcommand, ValueEnum};
use jsonwebtoken::Algorithm;
use ringhub::config::{parse_cpu_list, parse_duration, parse_size};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "ringhub-load",
    version,
    about = "Load generator for the ringhub WebSocket hub (and any server speaking its protocol v1)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fan-out: publishers → channels → subscribers; latency, loss and throughput.
    Fanout(FanoutArgs),
    /// Chat rooms: many channels with a few members each, every member publishing.
    Rooms(RoomsArgs),
    /// Connection setup: open connections at a fixed rate; connect→welcome time (→connected
    /// with a token), failures.
    Connect(ConnectArgs),
    /// Many idle connections: failures and memory per connection (hub and load generator).
    Idle(IdleArgs),
    /// History recovery: subscribers on history channels are dropped and resubscribe with
    /// `since` while publishers run; recovered %, messages recovered, recovery time, loss.
    ///
    /// Every subscriber subscribes to one channel `<--channel-prefix>load-<run>-<k>` (the prefix
    /// must name a namespace with `history_size` > 0) and remembers the channel's epoch and the
    /// last offset it received. Publishers publish at --rate on a fixed schedule, each message
    /// with an `id` (over WebSocket, acknowledged by `published`) or as `POST /publish` (an
    /// `http://` --publish-url, acknowledged by 200). After --warmup, subscribers are dropped
    /// (--drop-every, --drop-fraction, --drop-mode), stay away for --down-time, reconnect and
    /// subscribe with `"since":{"offset":<last received>,"epoch":…}`.
    ///
    /// Recovery time: from writing that subscribe until reading the message whose offset is the
    /// reply's top (`offset`), i.e. the last message of the backlog; with an empty backlog
    /// (top = since) until reading the reply. (If the message at the top never comes, the first
    /// one after it ends the recovery; the live stream that follows is not waited for.) Only
    /// replies with `recovered:true` have a recovery time; `reply time` is subscribe → reply for
    /// every reconnect.
    ///
    /// Messages recovered: the backlog of a `recovered:true` reply, top − since. Loss and
    /// duplicates: every message a publisher got acknowledged must reach every subscriber of
    /// its channel exactly once, live or recovered, across all reconnects (checked per
    /// (publisher, channel) by sequence number), except the messages of a `recovered:false`
    /// window (top − since of that reply), which are counted as "not recoverable", not as lost.
    /// Offsets are checked per subscriber too: once each, in order, across reconnects.
    Reconnect(ReconnectArgs),
    /// Compare .hgrm files: percentiles side by side with ratios, and an SVG plot.
    Compare(CompareArgs),
}

/// Flags every load scenario has.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Hub WebSocket URL; repeat (or comma-separate) to spread connections over instances.
    #[arg(
        long = "url",
        env = "RINGHUB_LOAD_URL",
        default_value = "ws://127.0.0.1:8080/ws",
        value_delimiter = ','
    )]
    pub urls: Vec<String>,
    /// URL(s) publishers connect to [default: --url]. With --subscribe-url on another instance
    /// this measures cross-instance latency (e.g. through Redis). `reconnect` also takes
    /// `http://host:port`: publish with `POST /publish`.
    #[arg(long = "publish-url", value_delimiter = ',')]
    pub publish_urls: Vec<String>,
    /// URL(s) subscribers connect to [default: --url].
    #[arg(long = "subscribe-url", value_delimiter = ',')]
    pub subscribe_urls: Vec<String>,
    /// Measured time, after the warmup (idle: how long the connections are held).
    #[arg(long, default_value = "10s", value_parser = parse_duration, visible_alias = "hold")]
    pub duration: Duration,
    /// Time run before measuring: traffic (and loss checks) but no latency samples; idle: the
    /// settling time before memory is read.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// monoio threads the connections are spread over.
    #[arg(long, env = "RINGHUB_LOAD_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// Cores to pin the threads to, e.g. `1` or `2-3` [default: no pinning].
    #[arg(long, env = "RINGHUB_LOAD_CPUS", value_parser = parse_cpu_list)]
    pub cpus: Option<::std::vec::Vec<usize>>,
    /// Source addresses to bind client sockets to, round-robin: `127.0.0.2-127.0.0.9,127.0.1.1`
    /// (each gives another ~28k ephemeral ports per destination).
    #[arg(long, env = "RINGHUB_LOAD_SOURCE_IPS", value_parser = parse_ip_list)]
    pub source_ips: Option<::std::vec::Vec<IpAddr>>,
    /// PID of the hub, to report its CPU time (and, for `idle`, its memory per connection).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write the latency distribution (µs) as an HdrHistogram `.hgrm` percentile text file.
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
    /// Write a machine-readable summary (setup, counts, percentiles in µs, CPU) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Use monoio's epoll driver even where io_uring is available.
    #[arg(long, env = "RINGHUB_LOAD_EPOLL")]
    pub epoll: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub token: TokenArgs,
}

impl Common {
    /// Defaults for library use (tests): one thread, no pinning, `url` only.
    pub fn new(url: &str) -> Self {
        Common {
            urls: vec![url.into()],
            publish_urls: Vec::new(),
            subscribe_urls: Vec::new(),
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            threads: 1,
            cpus: None,
            source_ips: None,
            server_pid: None,
            hgrm: None,
            json: None,
            epoll: false,
            quiet: false,
            token: TokenArgs::default(),
        }
    }

    /// Whether the runtimes use io_uring (else epoll).
    pub fn uring(&self) -> bool {
        !self.epoll && monoio::utils::detect_uring()
    }
}

/// The help section of the token flags.
const AUTH_HEADING: &str = "Authentication (hubs with [auth])";

/// Connection tokens, for hubs with `[auth]`: with `--token-secret` or `--token-key` every
/// connection authenticates with a token of its own, minted before the timed part of the run
/// ([`crate::auth`]). Without either, connections do not authenticate (open-mode hubs, peers).
#[derive(Args, Clone)]
pub struct TokenArgs {
    /// HMAC secret to sign the connection tokens with (HS256 unless --token-alg says otherwise).
    #[arg(
        long,
        help_heading = AUTH_HEADING,
        env = "RINGHUB_LOAD_TOKEN_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub token_secret: Option<String>,
    /// PEM private key (RSA, EC P-256/P-384 or Ed25519) to sign the tokens with; needs
    /// --token-alg.
    #[arg(long, help_heading = AUTH_HEADING, value_name = "FILE.pem")]
    pub token_key: Option<PathBuf>,
    /// Signing algorithm: HS256, HS384, HS512 with a secret [default: HS256]; RS256, RS384,
    /// RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA with a key (required).
    #[arg(long, help_heading = AUTH_HEADING, value_parser = parse_alg, value_name = "ALG")]
    pub token_alg: Option<Algorithm>,
    /// Lifetime of each token: `exp` = the time it was minted + this.
    #[arg(long, help_heading = AUTH_HEADING, default_value = "1h", value_parser = parse_duration)]
    pub token_ttl: Duration,
    /// Where each connection presents its token: in a `connect` message after the welcome, or
    /// as `?token=` in the upgrade URL.
    #[arg(long, help_heading = AUTH_HEADING, value_enum, default_value_t = TokenIn::Message)]
    pub token_in: TokenIn,
    /// Connection n (0, 1, …) authenticates as user `<prefix><n>` (the token's `sub`).
    #[arg(long, help_heading = AUTH_HEADING, default_value = "load-", value_name = "PREFIX")]
    pub token_user_prefix: String,
    /// `aud` claim of the tokens.
    #[arg(long, help_heading = AUTH_HEADING, value_name = "AUD")]
    pub token_aud: Option<String>,
    /// `iss` claim of the tokens.
    #[arg(long, help_heading = AUTH_HEADING, value_name = "ISS")]
    pub token_iss: Option<String>,
}

impl Default for TokenArgs {
    /// No token (auth off); the other fields at their flags' defaults.
    fn default() -> Self {
        TokenArgs {
            token_secret: None,
            token_key: None,
            token_alg: None,
            token_ttl: Duration::from_secs(3600),
            token_in: TokenIn::Message,
            token_user_prefix: "load-".into(),
            token_aud: None,
            token_iss: None,
        }
    }
}

impl std::fmt::Debug for TokenArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenArgs")
            .field(
                "token_secret",
                &self.token_secret.as_ref().map(|_| "<hidden>"),
            )
            .field("token_key", &self.token_key)
            .field("token_alg", &self.token_alg)
            .field("token_ttl", &self.token_ttl)
            .field("token_in", &self.token_in)
            .field("token_user_prefix", &self.token_user_prefix)
            .field("token_aud", &self.token_aud)
            .field("token_iss", &self.token_iss)
            .finish()
    }
}

/// Where a connection presents its token.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenIn {
    /// `{"type":"connect","token":…,"id":0}` after the welcome; the hub answers `connected`.
    Message,
    /// `/ws?token=…` in the upgrade request; the hub sends `connected` right after the welcome.
    Query,
}

impl TokenIn {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenIn::Message => "message",
            TokenIn::Query => "query",
        }
    }
}

/// A JWT algorithm name (`HS256`, `RS256`, `ES256`, `EdDSA`, …; case-insensitive).
pub fn parse_alg(s: &str) -> Result<Algorithm, String> {
    let name = s.trim().to_ascii_uppercase();
    let name = if name == "EDDSA" { "EdDSA" } else { &name };
    name.parse().map_err(|_| {
        format!(
            "unknown algorithm {s:?}: expected HS256, HS384, HS512, RS256, RS384, RS512, PS256, \
             PS384, PS512, ES256, ES384 or EdDSA"
        )
    })
}

/// How publishers pace themselves (fanout and rooms).
#[derive(Args, Clone, Debug)]
pub struct Traffic {
    /// Open loop: total messages per second over all publishers, on a fixed schedule; latency
    /// is measured from each message's intended send time.
    #[arg(long, required_unless_present = "max", conflicts_with = "max")]
    pub rate: Option<f64>,
    /// Closed loop: publish as fast as the window allows (to find saturation).
    #[arg(long)]
    pub max: bool,
    /// With --max: messages in flight per publisher (one is done when the publisher receives
    /// it back from the hub).
    #[arg(long, conflicts_with = "rate", value_name = "W (default 16)")]
    pub window: Option<u32>,
    /// Size of each message's `data` JSON in bytes (`64`, `1KiB`); below ~40 it is ~40, what
    /// the publisher id, sequence number and send time take.
    #[arg(long, default_value = "64", value_parser = parse_size)]
    pub payload_size: usize,
    /// Text before every channel name (`h:` → `h:load-<run>-0`, …): a namespace of the hub, e.g.
    /// one with history (then every message's offset is checked too).
    #[arg(long, default_value = "", value_name = "PREFIX")]
    pub channel_prefix: String,
}

#[derive(Args, Clone, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub traffic: Traffic,
    /// Subscriber connections (spread round-robin over the channels).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Channels.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Publisher connections; each publishes round-robin over the channels.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
}

#[derive(Args, Clone, Debug)]
pub struct RoomsArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub traffic: Traffic,
    /// Rooms (channels).
    #[arg(long, default_value_t = 1000)]
    pub rooms: usize,
    /// Members per room; each is one connection that subscribes to its room and publishes
    /// into it (receiving its own messages too).
    #[arg(long, default_value_t = 5)]
    pub members: usize,
}

#[derive(Args, Clone, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connection attempts per second, on a fixed schedule.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Total attempts [default: rate × (warmup + duration)].
    #[arg(long)]
    pub connections: Option<usize>,
    /// Keep every connection open until the end (default: close each, with a close
    /// handshake, right after its welcome, or its `connected` with a token).
    #[arg(long)]
    pub keep: bool,
}

#[derive(Args, Clone, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connects per second.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Each connection subscribes to a channel of its own.
    #[arg(long)]
    pub subscribe: bool,
}

/// How `reconnect` drops a subscriber.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropMode {
    /// A clean leave: WebSocket close (1000), messages still read until the hub's close, then
    /// the TCP connection is closed.
    Close,
    /// Abrupt: the TCP connection is reset (RST) at once, no close frame; whatever is in flight
    /// is lost (and recovered).
    Abort,
}

impl DropMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DropMode::Close => "close",
            DropMode::Abort => "abort",
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct ReconnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscriber connections, spread round-robin over the channels and the --url (or
    /// --subscribe-url) instances.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Channels.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Text before every channel name: a namespace with history (`history_size` > 0), e.g.
    /// `h:` → `h:load-<run>-0`, …
    #[arg(long, value_name = "PREFIX")]
    pub channel_prefix: String,
    /// Publishers, each publishing round-robin over the channels; publisher p on the p-th
    /// --publish-url (round-robin) [default: the --url list, so a single publisher is on the
    /// first]; an `http://host:port` --publish-url publishes with `POST /publish`.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Total messages per second over all publishers, on a fixed schedule.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Size of each message's `data` JSON in bytes (at least ~40).
    #[arg(long, default_value = "64", value_parser = parse_size)]
    pub payload_size: usize,
    /// Drop each subscriber once per this period, the drops staggered evenly over it; with
    /// --drop-fraction, drop that fraction of the subscribers at once, once per period.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "T")]
    pub drop_every: Duration,
    /// Drop in waves: every --drop-every, this fraction (0 < F ≤ 1) of the subscribers at the
    /// same moment (the next ones in turn).
    #[arg(long, value_name = "F")]
    pub drop_fraction: Option<f64>,
    /// How a subscriber is dropped.
    #[arg(long, value_enum, default_value_t = DropMode::Close)]
    pub drop_mode: DropMode,
    /// How long a dropped subscriber stays away before it reconnects (and between failed
    /// reconnect attempts).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub down_time: Duration,
    /// Reconnect to the instance the subscriber left [default with several --url: the next
    /// one, so that the backlog is read on another instance than the one it left].
    #[arg(long)]
    pub sticky: bool,
    /// Bearer key for `POST /publish` (the hub's --api-key).
    #[arg(
        long,
        env = "RINGHUB_LOAD_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
}

/// The y axis of the comparison plot.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Log,
    Linear,
}

#[derive(Args, Clone, Debug)]
pub struct CompareArgs {
    /// .hgrm files (HdrHistogram percentile distributions, as `--hgrm` writes them); ratios
    /// are relative to the first.
    #[arg(required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Names of the runs, comma-separated, in file order [default: file names].
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Write a latency-by-percentile plot as SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Latency axis of the plot.
    #[arg(long, value_enum, default_value_t = Scale::Log)]
    pub y_scale: Scale,
    /// Title of the plot.
    #[arg(long, default_value = "Latency by percentile")]
    pub title: String,
}

/// Parse `a`, `a-b` (IPv4 ranges) and comma-separated mixes of them.
pub fn parse_ip_list(s: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ip = |t: &str| {
            t.trim()
                .parse::<IpAddr>()
                .map_err(|e| format!("bad address {t:?}: {e}"))
        };
        match part.split_once('-') {
            None => out.push(ip(part)?),
            Some((a, b)) => match (ip(a)?, ip(b)?) {
                (IpAddr::V4(a), IpAddr::V4(b)) if u32::from(a) <= u32::from(b) => {
                    if u32::from(b) - u32::from(a) >= 1 << 16 {
                        return Err(format!("range {part:?} is too large (at most 65536)"));
                    }
                    out.extend((u32::from(a)..=u32::from(b)).map(|n| IpAddr::from(n.to_be_bytes())))
                }
                _ => return Err(format!("bad range {part:?}: need ascending IPv4 addresses")),
            },
        }
    }
    if out.is_empty() {
        return Err("no address given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ip_lists() {
        let v = parse_ip_list("127.0.0.2-127.0.0.4, 127.0.1.1").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[3], "127.0.1.1".parse::<IpAddr>().unwrap());
        assert!(parse_ip_list("127.0.0.4-127.0.0.2").is_err());
        assert!(parse_ip_list("").is_err());
        assert!(parse_ip_list("10.0.0.0-10.255.255.255").is_err());
    }

    #[test]
    fn repeated_and_comma_separated_urls() {
        let cli = Cli::try_parse_from([
            "ringhub-load",
            "fanout",
            "--rate",
            "10",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--url",
            "ws://127.0.0.1:2/ws,ws://127.0.0.1:3/ws",
        ])
        .unwrap();
        let Command::Fanout(a) = cli.command else {
            panic!("fanout expected")
        };
        assert_eq!(a.common.urls.len(), 3);
        assert!(a.common.publish_urls.is_empty());
    }

    #[test]
    fn token_flags_on_every_load_scenario() {
        for scenario in [
            &["fanout", "--rate", "1"][..],
            &["rooms", "--max"],
            &["connect"],
            &["idle"],
            &["reconnect", "--channel-prefix", "h:"],
        ] {
            let cli = Cli::try_parse_from(["ringhub-load"].iter().chain(scenario).chain(&[
                "--token-key",
                "k.pem",
                "--token-alg",
                "es256",
                "--token-in",
                "query",
                "--token-ttl",
                "10m",
                "--token-aud",
                "hub",
            ]))
            .unwrap();
            let t = match cli.command {
                Command::Fanout(a) => a.common.token,
                Command::Rooms(a) => a.common.token,
                Command::Connect(a) => a.common.token,
                Command::Idle(a) => a.common.token,
                Command::Reconnect(a) => a.common.token,
                Command::Compare(_) => unreachable!(),
            };
            assert_eq!(t.token_alg, Some(Algorithm::ES256));
            assert_eq!(t.token_in, TokenIn::Query);
            assert_eq!(t.token_ttl, Duration::from_secs(600));
            assert_eq!(t.token_aud.as_deref(), Some("hub"));
            assert_eq!(t.token_user_prefix, "load-");
        }
        assert_eq!(parse_alg("EdDSA"), Ok(Algorithm::EdDSA));
        assert_eq!(parse_alg("hs512"), Ok(Algorithm::HS512));
        assert!(parse_alg("none").is_err());
        let hidden = TokenArgs {
            token_secret: Some("hunter2".into()),
            ..TokenArgs::default()
        };
        assert!(!format!("{hidden:?}").contains("hunter2"));
    }

    #[test]
    fn reconnect_flags() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["ringhub-load", "reconnect"].iter().chain(args.iter()))
        };
        assert!(parse(&[]).is_err(), "--channel-prefix is required");
        let cli = parse(&[
            "--channel-prefix",
            "h:",
            "--drop-mode",
            "abort",
            "--drop-every",
            "500ms",
            "--drop-fraction",
            "0.5",
            "--down-time",
            "1s",
            "--publish-url",
            "http://127.0.0.1:1",
        ])
        .unwrap();
        let Command::Reconnect(a) = cli.command else {
            panic!("reconnect expected")
        };
        assert_eq!(a.drop_mode, DropMode::Abort);
        assert_eq!(a.drop_every, Duration::from_millis(500));
        assert_eq!(a.drop_fraction, Some(0.5));
        assert_eq!(a.down_time, Duration::from_secs(1));
        assert_eq!(a.common.publish_urls, ["http://127.0.0.1:1"]);
        assert!(!a.sticky);
        let Command::Reconnect(a) = parse(&["--channel-prefix", "h:"]).unwrap().command else {
            panic!("reconnect expected")
        };
        assert_eq!((a.drop_mode, a.drop_fraction), (DropMode::Close, None));
        assert_eq!(a.down_time, Duration::from_millis(200));
    }

    #[test]
    fn rate_and_max_exclude_each_other() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["ringhub-load", "rooms"].iter().chain(args.iter()))
        };
        assert!(parse(&["--rate", "10", "--max"]).is_err());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--max", "--window", "4"]).is_ok());
        assert!(parse(&["--rate", "10", "--window", "4"]).is_err());
    }
}
