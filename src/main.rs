//! The `ringhub` binary: flag and environment parsing, logging set-up, then `server::run`; plus
//! `ringhub config check`, `ringhub token` and `ringhub instances`.
//!
//! Every flag also reads an environment variable (`RINGHUB_<FLAG>`); durations are written like
//! `500ms`, `25s`, `2m` and sizes like `64KiB`, `1MiB`. With `--config FILE` the TOML file is read
//! first ([`ringhub::config::file`]); then every flag given on the command line or through its
//! environment variable overrides the file (clap's `value_source`; a flag's default never does).
//! Precedence: flag > environment variable > file > default.

use clap::parser::ValueSource;
use clap::{ArgGroup, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ringhub::auth::token::{mint, mint_key_from_config, MintKey};
use ringhub::auth::AuthConfig;
use ringhub::config::file::{self, parse_origin, ConfigError, Settings};
use ringhub::config::{parse_cpu_list, parse_duration, parse_size, RedisConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Exit status for a configuration that was refused (the hub did not start).
const EXIT_CONFIG: u8 = 2;

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
    /// Config file tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Mint a token (connection token, or channel token with --channel) and print it.
    Token(Box<TokenArgs>),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a config file (keys, values, key files) and print the effective configuration
    /// (defaults filled in, secrets hidden). Exit status 2 when it is refused.
    Check {
        /// The TOML config file.
        file: PathBuf,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML config file (docs/configuration.md). Flags and environment variables override it.
    #[arg(long, env = "RINGHUB_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration (defaults, file, environment, flags) and exit.
    #[arg(long)]
    print_config: bool,
    /// HMAC secret that tokens are signed with: turns authentication on (replaces the file's
    /// secret, secret_file and secret_env). Prefer the environment variable to the flag.
    #[arg(long, env = "RINGHUB_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Option<String>,
    /// Origins browser upgrades may come from, comma-separated (`https://app.example.com`,
    /// `https://*.example.com`, `*`) [default: any].
    #[arg(long, env = "RINGHUB_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    allowed_origins: Option<Vec<String>>,
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
    /// A subscribe with `since` missing more messages than this gets `recovered: false`.
    #[arg(long, env = "RINGHUB_MAX_RECOVERY", default_value_t = 1000)]
    max_recovery: usize,
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
    #[arg(long, env = "RINGHUB_REDIS_PASSWORD", hide_env_values = true)]
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

/// Whether flag `id` was given, on the command line or through its environment variable (a
/// default value does not count: it must not override the config file).
fn given(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// `ringhub serve`'s settings: defaults, then the config file, then every flag that was given
/// (`m` holds the `serve` matches; `log` is `--log`/`RINGHUB_LOG` when given). Then the checks
/// across keys, on the result.
fn serve_settings(
    a: ServeArgs,
    m: &ArgMatches,
    log: Option<String>,
) -> Result<Settings, ConfigError> {
    let mut s = match &a.config {
        Some(path) => file::load(path)?,
        None => Settings::default(),
    };
    // `field = value` when flag `id` was given; the key no longer comes from the file.
    macro_rules! flag {
        ($id:ident, $field:expr, $value:expr) => {
            if given(m, stringify!($id)) {
                $field = $value;
                s.overridden(stringify!($id));
            }
        };
    }
    // The same for flags without a default (given exactly when `Some`).
    macro_rules! opt {
        ($id:ident, $field:expr, $value:expr) => {
            if let Some(v) = $value {
                $field = v;
                s.overridden(stringify!($id));
            }
        };
    }
    flag!(listen, s.config.listen, a.listen);
    opt!(shards, s.config.shards, a.shards);
    opt!(cpus, s.config.cpus, a.cpus.map(|c| Some(c.0)));
    flag!(no_pin, s.config.pin, !a.no_pin);
    flag!(
        max_queued_bytes,
        s.config.max_queued_bytes,
        a.max_queued_bytes
    );
    flag!(
        max_message_size,
        s.config.max_message_size,
        a.max_message_size
    );
    flag!(
        max_subscriptions,
        s.config.max_subscriptions,
        a.max_subscriptions
    );
    flag!(max_recovery, s.config.max_recovery, a.max_recovery);
    flag!(
        max_publish_rate,
        s.config.max_publish_rate,
        a.max_publish_rate
    );
    opt!(
        publish_burst,
        s.config.publish_burst,
        a.publish_burst.map(Some)
    );
    flag!(ping_interval, s.config.ping_interval, a.ping_interval);
    flag!(idle_timeout, s.config.idle_timeout, a.idle_timeout);
    flag!(
        handshake_timeout,
        s.config.handshake_timeout,
        a.handshake_timeout
    );
    flag!(
        shutdown_timeout,
        s.config.shutdown_timeout,
        a.shutdown_timeout
    );
    flag!(close_timeout, s.config.close_timeout, a.close_timeout);
    opt!(
        max_connections,
        s.config.max_connections,
        a.max_connections.map(Some)
    );
    opt!(api_key, s.config.api_key, a.api_key.map(Some));
    opt!(instance_id, s.config.instance_id, a.instance_id.map(Some));
    flag!(io_driver, s.config.epoll, a.io_driver == "epoll");
    flag!(echo, s.config.echo, a.echo);
    // A `--redis` URL still gets the file's redis_password and redis_prefix; the flags for those
    // override both.
    if let Some(mut r) = a.redis {
        if let Some(pw) = &s.redis_password {
            r.password = Some(pw.clone());
        }
        if let Some(prefix) = &s.redis_prefix {
            r.prefix = prefix.clone();
        }
        s.config.redis = Some(r);
        s.overridden("redis");
    }
    if let Some(pw) = a.redis_password {
        if let Some(r) = &mut s.config.redis {
            r.password = Some(pw.clone());
        }
        s.redis_password = Some(pw);
        s.overridden("redis_password");
    }
    if given(m, "redis_prefix") {
        if let Some(r) = &mut s.config.redis {
            r.prefix = a.redis_prefix.clone();
        }
        s.redis_prefix = Some(a.redis_prefix);
        s.overridden("redis_prefix");
    }
    opt!(
        registry_core,
        s.config.registry_core,
        a.registry_core.map(Some)
    );
    flag!(
        heartbeat_interval,
        s.config.heartbeat_interval,
        a.heartbeat_interval
    );
    flag!(heartbeat_ttl, s.config.heartbeat_ttl, a.heartbeat_ttl);
    flag!(connection_ttl, s.config.connection_ttl, a.connection_ttl);
    if let Some(secret) = a.auth_secret {
        // The flag is the HMAC secret: other sources of it in the file no longer apply.
        let auth = s.config.auth.get_or_insert_with(AuthConfig::default);
        auth.secret = Some(secret);
        auth.secret_file = None;
        auth.secret_env = None;
        for key in ["auth", "auth.secret", "auth.secret_file", "auth.secret_env"] {
            s.overridden(key);
        }
    }
    if let Some(origins) = a.allowed_origins {
        s.config.allowed_origins = origins;
        s.overridden("auth.allowed_origins");
    }
    if log.is_some() {
        s.log = log;
        s.overridden("log");
    }
    s.check()?;
    Ok(s)
}

fn init_logging(log: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn serve(args: ServeArgs, m: &ArgMatches, log: Option<String>) -> ExitCode {
    let print_config = args.print_config;
    let settings = match serve_settings(args, m, log) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringhub: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if print_config {
        print!("{}", settings.render());
        return ExitCode::SUCCESS;
    }
    init_logging(settings.log.as_deref().unwrap_or("info"));
    match ringhub::server::run(settings.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringhub: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ringhub config check FILE`: the effective configuration, or why the file is refused.
fn config_check(path: &Path) -> Result<String, ConfigError> {
    let s = file::load(path)?;
    s.check()?;
    for warning in s.check_keys()? {
        eprintln!("ringhub: warning: {warning}");
    }
    Ok(s.render())
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("signing_key").required(true).args(["config", "secret", "key"])))]
struct TokenArgs {
    /// User id (`sub`).
    #[arg(long)]
    user: String,
    /// Lifetime: `exp` is now + this.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: Duration,
    /// Mint a channel token for this channel (e.g. `$room`, `private:1`).
    #[arg(long, value_parser = parse_channel)]
    channel: Option<String>,
    /// `info` claim: a JSON object, e.g. '{"name":"Ada"}'.
    #[arg(long, value_parser = parse_info)]
    info: Option<serde_json::Value>,
    /// Sign with the HMAC secret of this config file's [auth] (secret, secret_file, secret_env);
    /// its first audience and its issuer become `aud` and `iss`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Sign with this HMAC secret.
    #[arg(long)]
    secret: Option<String>,
    /// Sign with this private key (PEM: RSA, ECDSA P-256/P-384 or Ed25519).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Signing algorithm [default: HS256 for secrets (or the config's first HS* algorithm);
    /// detected from a --key: RS256, ES256/ES384 or EdDSA]. Also HS384, HS512, RS384, RS512,
    /// PS256, PS384, PS512.
    #[arg(long, value_parser = parse_alg)]
    alg: Option<jsonwebtoken::Algorithm>,
    /// `kid` header (which key of a JWKS verifies the token).
    #[arg(long)]
    kid: Option<String>,
    /// `aud` claim [default: the config's first audience].
    #[arg(long)]
    aud: Option<String>,
    /// `iss` claim [default: the config's issuer].
    #[arg(long)]
    iss: Option<String>,
}

fn parse_channel(s: &str) -> Result<String, String> {
    if ringhub::protocol::is_valid_channel(s) {
        Ok(s.to_string())
    } else {
        Err("channel names are 1-256 bytes of ASCII letters, digits and _-.:/@#,$".into())
    }
}

fn parse_info(s: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str(s) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err("must be a JSON object".into()),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

fn parse_alg(s: &str) -> Result<jsonwebtoken::Algorithm, String> {
    s.parse()
        .map_err(|_| format!("unknown algorithm {s:?} (HS256, RS256, ES256, EdDSA, ...)"))
}

/// `ringhub token`: the signed token.
fn mint_token(a: TokenArgs) -> Result<String, String> {
    let (key, auth) = match (a.config, a.secret, a.key) {
        (Some(path), _, _) => {
            let s = file::load(&path).map_err(|e| e.to_string())?;
            let auth = s
                .config
                .auth
                .ok_or_else(|| format!("{}: no [auth] key to sign with", path.display()))?;
            let mut key = mint_key_from_config(&auth)?;
            if let (Some(alg), MintKey::Hmac { alg: k, .. }) = (a.alg, &mut key) {
                *k = alg;
            }
            (key, Some(auth))
        }
        (_, Some(secret), _) => {
            let alg = a.alg.unwrap_or(jsonwebtoken::Algorithm::HS256);
            let key = MintKey::Hmac {
                secret: secret.into_bytes(),
                alg,
            };
            (key, None)
        }
        (_, _, Some(path)) => {
            let pem =
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let key = MintKey::from_private_pem(pem, a.alg)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            (key, None)
        }
        (None, None, None) => return Err("one of --config, --secret or --key is needed".into()),
    };
    let now = ringhub::auth::token::now_secs();
    let mut claims = serde_json::json!({
        "sub": a.user,
        "iat": now,
        "exp": now.saturating_add(a.ttl.as_secs()),
    });
    if let Some(channel) = a.channel {
        claims["channel"] = channel.into();
    }
    if let Some(info) = a.info {
        claims["info"] = info;
    }
    let aud = a.aud.or_else(|| auth.as_ref()?.audience.first().cloned());
    if let Some(aud) = aud {
        claims["aud"] = aud.into();
    }
    if let Some(iss) = a.iss.or_else(|| auth?.issuer) {
        claims["iss"] = iss.into();
    }
    mint(&key, &claims, a.kid.as_deref())
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let log = given(&matches, "log").then(|| cli.log.clone());
    let report = |r: Result<(), String>| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringhub: {e}");
            ExitCode::FAILURE
        }
    };
    match cli.command {
        Command::Serve(args) => {
            let m = matches
                .subcommand_matches("serve")
                .expect("the serve subcommand's matches");
            serve(*args, m, log)
        }
        Command::Instances(args) => {
            init_logging(&cli.log);
            report(list_instances(args))
        }
        Command::Config(ConfigCommand::Check { file }) => match config_check(&file) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ringhub: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Token(args) => report(mint_token(*args).map(|token| println!("{token}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ringhub serve ARGS`'s settings, through the same merge as the binary.
    fn settings(args: &[&str]) -> Result<Settings, ConfigError> {
        let argv = ["ringhub", "serve"].iter().chain(args);
        let m = Cli::command().try_get_matches_from(argv).unwrap();
        let cli = Cli::from_arg_matches(&m).unwrap();
        let log = given(&m, "log").then(|| cli.log.clone());
        let Command::Serve(a) = cli.command else {
            unreachable!("serve")
        };
        serve_settings(*a, m.subcommand_matches("serve").unwrap(), log)
    }

    fn temp_file(name: &str, text: &str) -> String {
        let path = std::env::temp_dir().join(format!("ringhub-main-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    #[test]
    fn flag_defaults_are_the_config_defaults() {
        // A flag overrides only when given, so the defaults `--help` shows must be what the hub
        // runs with anyway: giving each one explicitly changes nothing.
        let default = settings(&[]).unwrap().render();
        assert_eq!(default, Settings::default().render());
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        for arg in serve.get_arguments() {
            let Some(value) = arg.get_default_values().first() else {
                continue;
            };
            if !arg.get_action().takes_values() {
                continue;
            }
            let flag = format!("--{}", arg.get_long().unwrap());
            let out = settings(&[&flag, value.to_str().unwrap()])
                .unwrap()
                .render();
            assert_eq!(out, default, "{flag} {value:?}");
        }
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let path = temp_file(
            "precedence.toml",
            "max_subscriptions = 2\nidle_timeout = \"9s\"\nno_pin = true\n\
             redis = \"redis://h:1\"\nredis_password = \"filepw\"\nredis_prefix = \"f:\"\n\
             log = \"warn\"\n\
             [auth]\nsecret_file = \"/nonexistent\"\nallowed_origins = [\"https://a.example\"]\n",
        );
        let s = settings(&["--config", &path]).unwrap();
        assert_eq!(s.config.max_subscriptions, 2);
        assert_eq!(s.config.max_publish_rate, 1000, "default");
        assert_eq!(s.log.as_deref(), Some("warn"));
        let s = settings(&[
            "--config",
            &path,
            "--max-subscriptions",
            "5",
            "--redis",
            "redis://other:2",
            "--auth-secret",
            "flagsecret",
            "--allowed-origins",
            "https://b.example,https://*.c.example",
            "--log",
            "debug",
        ])
        .unwrap();
        let c = &s.config;
        assert_eq!(c.max_subscriptions, 5, "flag over file");
        assert_eq!(c.idle_timeout, Duration::from_secs(9), "file over default");
        assert!(!c.pin, "file over default");
        let r = c.redis.as_ref().unwrap();
        assert_eq!(r.addr, "other:2", "flag over file");
        assert_eq!(r.password.as_deref(), Some("filepw"), "the file's password");
        assert_eq!(r.prefix, "f:", "the file's prefix");
        let a = c.auth.as_ref().unwrap();
        assert_eq!(a.secret.as_deref(), Some("flagsecret"));
        assert_eq!(
            a.secret_file, None,
            "--auth-secret replaces the file's secret source"
        );
        assert_eq!(
            c.allowed_origins,
            vec!["https://b.example", "https://*.c.example"]
        );
        assert_eq!(s.log.as_deref(), Some("debug"));
        let s = settings(&[
            "--config",
            &path,
            "--redis-password",
            "p2",
            "--redis-prefix",
            "x:",
        ])
        .unwrap();
        let r = s.config.redis.as_ref().unwrap();
        assert_eq!(
            (r.password.as_deref(), r.prefix.as_str()),
            (Some("p2"), "x:")
        );
    }

    #[test]
    fn checks_run_on_the_merged_settings() {
        // The file alone is invalid (heartbeat_ttl <= the default interval); a flag fixes it.
        let path = temp_file(
            "merged.toml",
            "\nheartbeat_ttl = \"5s\"\n[auth]\naudience = \"a\"\n",
        );
        let e = settings(&["--config", &path, "--auth-secret", "s"]).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(2), Some("heartbeat_ttl")),
            "{e}"
        );
        let e = settings(&["--config", &path, "--heartbeat-interval", "1s"]).unwrap_err();
        assert!(e.message.contains("no key configured"), "{e}");
        settings(&[
            "--config",
            &path,
            "--heartbeat-interval",
            "1s",
            "--auth-secret",
            "s",
        ])
        .unwrap();
        // A flag's error names no file.
        let e = settings(&["--heartbeat-ttl", "1s"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--heartbeat-ttl must be longer than --heartbeat-interval"
        );
        let e = settings(&["--redis-password", "x"]).unwrap_err();
        assert!(e.to_string().contains("needs a Redis URL"), "{e}");
    }
}
