//! The `ringhub` binary: flag and environment parsing, logging set-up, then `server::run`.
//!
//! Every flag also reads an environment variable (`RINGHUB_<FLAG>`); durations are written like
//! `500ms`, `25s`, `2m` and sizes like `64KiB`, `1MiB`.

use clap::{Args, Parser, Subcommand};
use ringhub::config::{parse_cpu_list, parse_duration, parse_size, Config, RedisConfig};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "ringhub",
    version,
    about = "A thread-per-core WebSocket pub/sub hub"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing EnvFilter expression).
    #[arg(long, global = true, env = "RINGHUB_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the hub (embedded single-instance mode by default; `--redis` for multi-instance).
    Serve(Box<ServeArgs>),
    /// List the live instances registered in Redis, with their connection counts.
    Instances(InstancesArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on (every shard binds it with SO_REUSEPORT).
    #[arg(long, env = "RINGHUB_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Number of shards (threads with their own runtime and listener) [default: one per core].
    #[arg(long, env = "RINGHUB_SHARDS")]
    shards: Option<usize>,
    /// Cores to pin the shards to, in shard order, e.g. `0,2-3` [default: 0, 1, 2, ...].
    #[arg(long, env = "RINGHUB_CPUS", value_parser = parse_cpus)]
    cpus: Option<CpuList>,
    /// Do not pin shard threads to cores; leave placement to the kernel.
    #[arg(long, env = "RINGHUB_NO_PIN")]
    no_pin: bool,
    /// Outbox bytes per connection before a slow client is closed with 1013.
    #[arg(long, env = "RINGHUB_MAX_QUEUED_BYTES", default_value = "1MiB", value_parser = parse_size)]
    max_queued_bytes: usize,
    /// Largest frame or message a client may send (larger ones close with 1009).
    #[arg(long, env = "RINGHUB_MAX_MESSAGE_SIZE", default_value = "64KiB", value_parser = parse_size)]
    max_message_size: usize,
    /// Subscriptions one connection may hold.
    #[arg(long, env = "RINGHUB_MAX_SUBSCRIPTIONS", default_value_t = 1000)]
    max_subscriptions: usize,
    /// Publishes per second per connection (token bucket; 0 = unlimited). Beyond it publishes are
    /// dropped with a `rate_limited` error; persistent abuse closes the connection with 1008.
    #[arg(long, env = "RINGHUB_MAX_PUBLISH_RATE", default_value_t = 1000)]
    max_publish_rate: u32,
    /// Publishes a connection may make at once (the bucket size) [default: 2 x the rate].
    #[arg(long, env = "RINGHUB_PUBLISH_BURST")]
    publish_burst: Option<u32>,
    /// How often the server pings each connection.
    #[arg(long, env = "RINGHUB_PING_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    ping_interval: Duration,
    /// Close connections that send nothing (not even a pong) for this long.
    #[arg(long, env = "RINGHUB_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Drop connections whose HTTP request (upgrade) is not complete within this time.
    #[arg(long, env = "RINGHUB_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// On SIGTERM/SIGINT, wait at most this long for clients to take their close frames.
    #[arg(long, env = "RINGHUB_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// How long a connection being closed gets to answer our close frame.
    #[arg(long, env = "RINGHUB_CLOSE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    close_timeout: Duration,
    /// Connections accepted before upgrades get HTTP 503 [default: open-file limit - 64].
    #[arg(long, env = "RINGHUB_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Require `Authorization: Bearer <key>` on POST /publish.
    #[arg(long, env = "RINGHUB_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Instance id used in connection ids [default: random at each start].
    #[arg(long, env = "RINGHUB_INSTANCE_ID")]
    instance_id: Option<String>,
    /// I/O driver: `auto` (io_uring, falling back to epoll where unavailable) or `epoll`.
    #[arg(long, env = "RINGHUB_IO_DRIVER", default_value = "auto", value_parser = ["auto", "epoll"])]
    io_driver: String,
    /// Serve `GET /echo` (echoes every message; for conformance tests such as Autobahn).
    #[arg(long, env = "RINGHUB_ECHO")]
    echo: bool,
    /// Coordinate with other instances through Redis: `redis://[:password@]host:port[/db]`
    /// [default: none, embedded single-instance mode].
    #[arg(long, env = "RINGHUB_REDIS", value_parser = RedisConfig::from_url, hide_env_values = true)]
    redis: Option<RedisConfig>,
    /// Redis password (instead of putting it in the URL).
    #[arg(
        long,
        env = "RINGHUB_REDIS_PASSWORD",
        hide_env_values = true,
        requires = "redis"
    )]
    redis_password: Option<String>,
    /// Prefix of every Redis key and channel (hub channel `news` is `<prefix>chan:news`).
    #[arg(long, env = "RINGHUB_REDIS_PREFIX", default_value = "ws:")]
    redis_prefix: String,
    /// Core for the registry thread (Redis mode) [default: the last core].
    #[arg(long, env = "RINGHUB_REGISTRY_CORE")]
    registry_core: Option<usize>,
    /// How often this instance refreshes its `instance` key in Redis.
    #[arg(long, env = "RINGHUB_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// TTL of the `instance` key (a dead instance is noticed about this long after it died).
    #[arg(long, env = "RINGHUB_HEARTBEAT_TTL", default_value = "30s", value_parser = parse_duration)]
    heartbeat_ttl: Duration,
    /// TTL of each connection's key in Redis (refreshed while the connection lives).
    #[arg(long, env = "RINGHUB_CONNECTION_TTL", default_value = "120s", value_parser = parse_duration)]
    connection_ttl: Duration,
}

#[derive(Args, Debug)]
struct InstancesArgs {
    /// Redis URL: `redis://[:password@]host:port[/db]`.
    #[arg(long, env = "RINGHUB_REDIS", value_parser = RedisConfig::from_url, hide_env_values = true)]
    redis: RedisConfig,
    /// Redis password (instead of putting it in the URL).
    #[arg(long, env = "RINGHUB_REDIS_PASSWORD", hide_env_values = true)]
    redis_password: Option<String>,
    /// Prefix of every Redis key and channel.
    #[arg(long, env = "RINGHUB_REDIS_PREFIX", default_value = "ws:")]
    redis_prefix: String,
    /// Print the raw JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// `ringhub instances`: the same list `GET /instances` returns, as a table.
fn list_instances(args: InstancesArgs) -> Result<(), String> {
    let mut redis = args.redis;
    if args.redis_password.is_some() {
        redis.password = args.redis_password;
    }
    redis.prefix = args.redis_prefix;
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .map_err(|e| e.to_string())?;
    let json = rt
        .block_on(async {
            let mut conn = ringhub::redis::RedisConn::open(&redis).await?;
            conn.handshake(&redis, true).await?;
            let keys = ringhub::registry::Keys::new(&redis.prefix);
            ringhub::registry::live_instances(&mut conn, &keys).await
        })
        .map_err(|e| format!("cannot read instances from Redis at {}: {e}", redis.addr))?;
    if args.json {
        println!("{json}");
        return Ok(());
    }
    let list: Vec<serde_json::Value> = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    let now = ringhub::registry::unix_ms();
    println!(
        "{:<18} {:<22} {:>6} {:>11} {:>10}  VERSION",
        "INSTANCE", "ADDR", "SHARDS", "CONNECTIONS", "UPTIME"
    );
    for i in &list {
        let up = now.saturating_sub(i["started_at"].as_u64().unwrap_or(now)) / 1000;
        println!(
            "{:<18} {:<22} {:>6} {:>11} {:>9}s  {}",
            i["instance"].as_str().unwrap_or("?"),
            i["addr"].as_str().unwrap_or("?"),
            i["shards"].as_u64().unwrap_or(0),
            i["connections"].as_u64().unwrap_or(0),
            up,
            i["version"].as_str().unwrap_or("?"),
        );
    }
    println!("{} live instance(s)", list.len());
    Ok(())
}

/// A parsed core list (a newtype: clap would treat a bare `Vec` as a multi-value flag).
#[derive(Debug, Clone)]
struct CpuList(Vec<usize>);

fn parse_cpus(s: &str) -> Result<CpuList, String> {
    parse_cpu_list(s).map(CpuList)
}

impl ServeArgs {
    fn into_config(self) -> Config {
        let d = Config::default();
        Config {
            listen: self.listen,
            shards: self.shards.unwrap_or(d.shards),
            cpus: self.cpus.map(|c| c.0),
            pin: !self.no_pin,
            max_queued_bytes: self.max_queued_bytes,
            max_message_size: self.max_message_size,
            max_subscriptions: self.max_subscriptions,
            max_publish_rate: self.max_publish_rate,
            publish_burst: self.publish_burst,
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            handshake_timeout: self.handshake_timeout,
            shutdown_timeout: self.shutdown_timeout,
            close_timeout: self.close_timeout,
            max_connections: self.max_connections,
            api_key: self.api_key,
            max_http_body: None,
            instance_id: self.instance_id,
            epoll: self.io_driver == "epoll",
            echo: self.echo,
            redis: self.redis.map(|mut r| {
                if self.redis_password.is_some() {
                    r.password = self.redis_password;
                }
                r.prefix = self.redis_prefix;
                r
            }),
            registry_core: self.registry_core,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_ttl: self.heartbeat_ttl,
            connection_ttl: self.connection_ttl,
            ..d
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => match ringhub::server::run((*args).into_config()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringhub: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Instances(args) => match list_instances(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringhub: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
