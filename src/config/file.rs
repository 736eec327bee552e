//! The config file (`ringhub serve --config ringhub.toml`): TOML read through serde into structs
//! that mirror the file, then applied onto a [`Config`]. Reference: docs/configuration.md.
//!
//! - Unknown keys, wrong types and bad values are errors naming the dotted key and its line
//!   ([`ConfigError`]); the hub exits before listening. Values are validated while they are
//!   deserialized (the value types below), so toml's error span points at the bad value; the
//!   span is mapped back to a key with an index of the document's keys (`Doc`).
//! - Checks across keys (`[auth]` needs a key, `Config::validate`) run on the final settings,
//!   after command-line flags were applied ([`Settings::check`]).
//! - [`Settings::render`] prints the effective configuration as TOML that this module reads back
//!   (secrets shown as `"<hidden>"`).
//!
//! Adding a key: a field in its table's struct (typed with a value type that validates it), one
//! line in that table's `apply` (the struct is destructured there, so a forgotten field fails the
//! build with an unused-variable warning), one line in `render`, and a row in
//! docs/configuration.md.

use super::{format_duration, format_size, parse_cpu_list, parse_duration, parse_size};
use super::{Config, RedisConfig};
use crate::auth::namespaces::{Access, NamespaceRules, Policy, Rules, SubscribeRule};
use crate::auth::AuthConfig;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration was refused. Always fatal: the hub exits (status 2) before listening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as the operator named it; empty when the problem is not in a file (flags).
    pub file: String,
    /// 1-based line of the offending key or value, when known.
    pub line: Option<usize>,
    /// The dotted key (`auth.leeway`, `namespaces.chat.subscribe`), when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `ringhub.toml line 7: auth.leeway: invalid duration "5 parsecs": unknown unit ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.file.is_empty() {
            f.write_str(&self.file)?;
            if let Some(line) = self.line {
                write!(f, " line {line}")?;
            }
            f.write_str(": ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Everything `ringhub serve` runs with: the hub's [`Config`], the binary's own settings, and
/// where each key was written (for error messages). Built from a file by [`load`], or from
/// [`Settings::default`] when there is no file; command-line flags are then applied on top.
#[derive(Clone, Default)]
pub struct Settings {
    /// Defaults with the file's settings applied.
    pub config: Config,
    /// `log`: the log filter; `None` = the flag's default (`info`).
    pub log: Option<String>,
    /// `redis_password` as written (also applied to `config.redis` when the file sets `redis`),
    /// kept so that a `--redis` URL given on the command line gets it too.
    pub redis_password: Option<String>,
    /// `redis_prefix` as written (see `redis_password`).
    pub redis_prefix: Option<String>,
    /// The file as named by the operator (empty without a file).
    pub file: String,
    /// Line of every key written in the file (dotted path → 1-based line).
    lines: BTreeMap<String, usize>,
}

/// Shows the rendered settings: secrets stay hidden.
impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Settings from {:?}:\n{}", self.file, self.render())
    }
}

/// Read and apply the config file at `path`. Relative `secret_file` and `public_key_files` are
/// resolved against the file's directory. Cross-key checks are left to [`Settings::check`].
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: name.clone(),
        line: None,
        key: None,
        message: format!("cannot read the config file: {e}"),
    })?;
    parse(&text, &name, path.parent())
}

/// Parse config text; `file` names it in errors, `base` resolves relative paths (none: as is).
pub fn parse(text: &str, file: &str, base: Option<&Path>) -> Result<Settings, ConfigError> {
    let doc = Doc::new(text, file)?;
    let top: TopTable = toml::from_str(text).map_err(|e| doc.de_error(&e))?;
    top.apply(&doc, base)
}

impl Settings {
    /// An error about `key`, with its line when the file sets it.
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let line = self.lines.get(key).copied();
        ConfigError {
            file: if line.is_some() {
                self.file.clone()
            } else {
                String::new()
            },
            line,
            key: Some(key.to_string()),
            message: message.into(),
        }
    }

    /// Whether the file sets `key` (dotted path).
    pub fn in_file(&self, key: &str) -> bool {
        self.lines.contains_key(key)
    }

    /// Note that `key` no longer comes from the file (a flag overrode it), so that errors about
    /// it do not point at the file.
    pub fn overridden(&mut self, key: &str) {
        self.lines.remove(key);
    }

    /// Checks across keys, on the final settings (after flags): `[auth]` has a key source,
    /// `redis_password` has a Redis URL, and [`Config::validate`]. Errors name the file line when
    /// the offending key comes from the file.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(auth) = &self.config.auth {
            if !auth.has_keys() {
                return Err(self.error(
                    "auth",
                    "no key configured (secret, secret_file, secret_env, public_key_files or \
                     jwks_url)",
                ));
            }
            let sources = [
                ("auth.secret", auth.secret.is_some()),
                ("auth.secret_file", auth.secret_file.is_some()),
                ("auth.secret_env", auth.secret_env.is_some()),
            ];
            if let Some((second, _)) = sources.iter().filter(|(_, set)| *set).nth(1) {
                return Err(self.error(
                    second,
                    "set only one of secret, secret_file and secret_env (previous_secret holds \
                     the old secret during a rotation)",
                ));
            }
        }
        if self.redis_password.is_some() && self.config.redis.is_none() {
            return Err(self.error("redis_password", "needs a Redis URL (`redis` or --redis)"));
        }
        self.config.validate().map_err(|message| {
            // The messages name flags (`--heartbeat-ttl must be ...`); point at the first one's
            // key when the file sets it.
            let key = message
                .split_whitespace()
                .find_map(|w| w.strip_prefix("--"))
                .map(|flag| flag.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
                .map(|flag| flag.replace('-', "_"));
            match key {
                Some(key) if self.in_file(&key) => self.error(&key, message),
                _ => ConfigError {
                    file: String::new(),
                    line: None,
                    key: None,
                    message,
                },
            }
        })
    }

    /// What can be checked of `[auth]`'s keys without the hub's environment: the keys load as
    /// the hub loads them (`Verifier`: files readable, PEM keys parse, `algorithms` verifiable).
    /// A `jwks_url` is not waited for (its fetch starts in the background and is abandoned). A
    /// `secret_env` variable not set here is returned as a warning, since the hub's environment
    /// may differ (the hub refuses to start without it); a stand-in secret takes its place.
    pub fn check_keys(&self) -> Result<Vec<ConfigError>, ConfigError> {
        let Some(auth) = &self.config.auth else {
            return Ok(Vec::new());
        };
        let mut warnings = Vec::new();
        let mut offline = auth.clone();
        if let Some(var) = &auth.secret_env {
            if std::env::var_os(var).is_none() {
                warnings.push(self.error(
                    "auth.secret_env",
                    format!("{var} is not set here: the hub will not start without it"),
                ));
                offline.secret_env = None;
                offline.secret = Some("stand-in for the unset variable, 32+ bytes".into());
            }
        }
        let timing = crate::auth::jwks::JwksTiming {
            initial_wait: Duration::ZERO,
            ..Default::default()
        };
        crate::auth::token::Verifier::with_jwks_timing(&offline, timing).map_err(|e| {
            // The verifier's messages start with the key (`auth.secret_file: cannot read ...`).
            match e.split_once(": ") {
                Some((key, rest)) if key.starts_with("auth") && !key.contains(' ') => {
                    self.error(key, rest)
                }
                _ => self.error("auth", e),
            }
        })?;
        Ok(warnings)
    }

    /// The effective configuration as TOML that [`parse`] reads back: every key, defaults filled
    /// in, unset optional keys as comments, secrets as `"<hidden>"`.
    pub fn render(&self) -> String {
        let c = &self.config;
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "# ringhub effective configuration (defaults filled in, secrets hidden)"
        );
        kv(w, "listen", quote(&c.listen.to_string()));
        kv(w, "shards", c.shards.to_string());
        match &c.cpus {
            Some(cpus) => kv(w, "cpus", format!("{cpus:?}")),
            None => unset(w, "cpus", "cores 0, 1, 2, ... in shard order"),
        }
        kv(w, "no_pin", (!c.pin).to_string());
        kv(
            w,
            "max_queued_bytes",
            quote(&format_size(c.max_queued_bytes)),
        );
        kv(
            w,
            "max_message_size",
            quote(&format_size(c.max_message_size)),
        );
        kv(w, "max_subscriptions", c.max_subscriptions.to_string());
        kv(w, "max_recovery", c.max_recovery.to_string());
        kv(w, "max_publish_rate", c.max_publish_rate.to_string());
        match c.publish_burst {
            Some(b) => kv(w, "publish_burst", b.to_string()),
            None => unset(w, "publish_burst", "2 x max_publish_rate"),
        }
        kv(w, "ping_interval", dur(c.ping_interval));
        kv(w, "idle_timeout", dur(c.idle_timeout));
        kv(w, "handshake_timeout", dur(c.handshake_timeout));
        kv(w, "shutdown_timeout", dur(c.shutdown_timeout));
        kv(w, "close_timeout", dur(c.close_timeout));
        match c.max_connections {
            Some(n) => kv(w, "max_connections", n.to_string()),
            None => unset(w, "max_connections", "open-file limit - 64"),
        }
        match c.max_http_body {
            Some(n) => kv(w, "max_http_body", quote(&format_size(n))),
            None => unset(w, "max_http_body", "max_message_size + 1KiB"),
        }
        match &c.api_key {
            Some(_) => kv(w, "api_key", quote(HIDDEN)),
            None => unset(w, "api_key", "POST /publish needs no key"),
        }
        match &c.instance_id {
            Some(id) => kv(w, "instance_id", quote(id)),
            None => unset(w, "instance_id", "random at each start"),
        }
        kv(
            w,
            "io_driver",
            quote(if c.epoll { "epoll" } else { "auto" }),
        );
        kv(w, "echo", c.echo.to_string());
        match &c.redis {
            Some(r) => {
                // A username always comes with a password (`redis://user:pw@host`).
                let user = r
                    .username
                    .as_deref()
                    .map_or(String::new(), |u| format!("{u}:{HIDDEN}@"));
                kv(
                    w,
                    "redis",
                    quote(&format!("redis://{user}{}/{}", r.addr, r.db)),
                );
                match &r.password {
                    Some(_) => kv(w, "redis_password", quote(HIDDEN)),
                    None => unset(w, "redis_password", "none"),
                }
                kv(w, "redis_prefix", quote(&r.prefix));
            }
            None => {
                unset(w, "redis", "embedded single-instance mode");
                match &self.redis_password {
                    Some(_) => kv(w, "redis_password", quote(HIDDEN)),
                    None => unset(w, "redis_password", "none"),
                }
                kv(
                    w,
                    "redis_prefix",
                    quote(self.redis_prefix.as_deref().unwrap_or("ws:")),
                );
            }
        }
        match c.registry_core {
            Some(n) => kv(w, "registry_core", n.to_string()),
            None => unset(w, "registry_core", "the last core"),
        }
        kv(w, "heartbeat_interval", dur(c.heartbeat_interval));
        kv(w, "heartbeat_ttl", dur(c.heartbeat_ttl));
        kv(w, "connection_ttl", dur(c.connection_ttl));
        kv(w, "log", quote(self.log.as_deref().unwrap_or("info")));

        let _ = writeln!(w);
        render_auth(w, c.auth.as_ref(), &c.allowed_origins);

        let policy = Policy::new(&c.namespaces, c.auth.is_some());
        let _ = writeln!(w, "\n[channels]");
        render_rules(w, &c.namespaces.default, policy.rules("x").ok());
        for (name, rules) in &c.namespaces.named {
            let _ = writeln!(w, "\n[namespaces.{}]", key_repr(name));
            render_rules(w, rules, policy.rules(&format!("{name}:x")).ok());
        }
        out
    }
}

const HIDDEN: &str = "<hidden>";

fn kv(w: &mut String, key: &str, value: String) {
    let _ = writeln!(w, "{key} = {value}");
}

fn unset(w: &mut String, key: &str, default: &str) {
    let _ = writeln!(w, "# {key}: not set ({default})");
}

/// A TOML string literal.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn dur(d: Duration) -> String {
    quote(&format_duration(d))
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<String> = items.into_iter().map(quote).collect();
    format!("[{}]", items.join(", "))
}

fn render_auth(w: &mut String, auth: Option<&AuthConfig>, origins: &[String]) {
    let Some(a) = auth else {
        if origins.is_empty() {
            let _ = writeln!(
                w,
                "# [auth]: not set: open mode (no tokens; anyone may subscribe and publish)"
            );
        } else {
            let _ = writeln!(w, "# open mode (no key), browser origins limited:");
            let _ = writeln!(w, "[auth]");
            kv(
                w,
                "allowed_origins",
                strings(origins.iter().map(String::as_str)),
            );
        }
        return;
    };
    let _ = writeln!(w, "[auth]");
    let secret = |w: &mut String, key: &str, s: &Option<String>| match s {
        Some(_) => kv(w, key, quote(HIDDEN)),
        None => unset(w, key, "none"),
    };
    secret(w, "secret", &a.secret);
    secret(w, "previous_secret", &a.previous_secret);
    match &a.secret_file {
        Some(p) => kv(w, "secret_file", quote(&p.display().to_string())),
        None => unset(w, "secret_file", "none"),
    }
    match &a.secret_env {
        Some(v) => kv(w, "secret_env", quote(v)),
        None => unset(w, "secret_env", "none"),
    }
    let files: Vec<String> = a
        .public_key_files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    kv(
        w,
        "public_key_files",
        strings(files.iter().map(String::as_str)),
    );
    match &a.jwks_url {
        Some(u) => kv(w, "jwks_url", quote(u)),
        None => unset(w, "jwks_url", "none"),
    }
    kv(
        w,
        "algorithms",
        strings(a.algorithms.iter().map(String::as_str)),
    );
    kv(
        w,
        "audience",
        strings(a.audience.iter().map(String::as_str)),
    );
    match &a.issuer {
        Some(i) => kv(w, "issuer", quote(i)),
        None => unset(w, "issuer", "any issuer"),
    }
    kv(w, "leeway", dur(a.leeway));
    kv(w, "require_exp", a.require_exp.to_string());
    kv(w, "query_token", a.query_token.to_string());
    kv(w, "auth_timeout", dur(a.auth_timeout));
    kv(w, "expiry_grace", dur(a.expiry_grace));
    kv(w, "max_token_size", quote(&format_size(a.max_token_size)));
    kv(w, "anonymous_connect", a.anonymous_connect.to_string());
    kv(
        w,
        "allowed_origins",
        strings(origins.iter().map(String::as_str)),
    );
}

/// One namespace's rules: configured values as keys, unset ones as comments with the value the
/// mode gives them.
fn render_rules(w: &mut String, r: &NamespaceRules, resolved: Option<&Rules>) {
    let Some(res) = resolved else { return };
    match r.subscribe {
        Some(v) => kv(w, "subscribe", quote(v.as_str())),
        None => unset(
            w,
            "subscribe",
            &format!("{:?} in this mode", res.subscribe.as_str()),
        ),
    }
    match r.publish {
        Some(v) => kv(w, "publish", quote(v.as_str())),
        None => unset(
            w,
            "publish",
            &format!("{:?} in this mode", res.publish.as_str()),
        ),
    }
    kv(w, "user_limited", r.user_limited.to_string());
    kv(w, "history_size", r.history_size.unwrap_or(0).to_string());
    let (ttl, meta_ttl) = match res.history {
        Some(h) => (h.ttl, h.meta_ttl),
        None => (
            r.history_ttl
                .unwrap_or(crate::auth::namespaces::DEFAULT_HISTORY_TTL),
            r.history_meta_ttl
                .unwrap_or(crate::auth::namespaces::DEFAULT_HISTORY_META_TTL),
        ),
    };
    kv(w, "history_ttl", quote(&super::format_duration(ttl)));
    kv(
        w,
        "history_meta_ttl",
        quote(&super::format_duration(meta_ttl)),
    );
    kv(w, "history", quote(res.history_access.as_str()));
}

/// A key as written in a dotted path: bare when it can be, quoted otherwise.
fn key_repr(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_string()
    } else {
        quote(k)
    }
}

// ---------------------------------------------------------------------------------------------
// The document index: every key's dotted path and spans, to turn a byte offset into a key and a
// line.

/// The parsed document's keys, for locating errors.
struct Doc<'a> {
    text: &'a str,
    file: &'a str,
    /// Every key (nested tables included, arrays not entered): dotted path, key span, value span.
    keys: Vec<(String, Range<usize>, Range<usize>)>,
}

impl<'a> Doc<'a> {
    /// Parse `text` as TOML (syntax errors are reported here, with their line).
    fn new(text: &'a str, file: &'a str) -> Result<Doc<'a>, ConfigError> {
        let mut doc = Doc {
            text,
            file,
            keys: Vec::new(),
        };
        let table = toml::de::DeTable::parse(text).map_err(|e| doc.de_error(&e))?;
        doc.index("", table.get_ref());
        Ok(doc)
    }

    fn index(&mut self, prefix: &str, table: &toml::de::DeTable<'_>) {
        for (k, v) in table.iter() {
            let path = if prefix.is_empty() {
                key_repr(k.get_ref())
            } else {
                format!("{prefix}.{}", key_repr(k.get_ref()))
            };
            self.keys.push((path.clone(), k.span(), v.span()));
            if let Some(t) = v.get_ref().as_table() {
                self.index(&path, t);
            }
        }
    }

    fn line_at(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text.as_bytes()[..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// The line of `key` (dotted path), if the document has it.
    fn line_of(&self, key: &str) -> Option<usize> {
        self.keys
            .iter()
            .find(|(p, _, _)| p == key)
            .map(|(_, k, _)| self.line_at(k.start))
    }

    /// An error about `key`.
    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line: self.line_of(key),
            key: Some(key.to_string()),
            message: message.into(),
        }
    }

    /// A toml/serde error, located: the deepest key whose key or value span holds the error.
    fn de_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span();
        let key = span.as_ref().and_then(|s| {
            self.keys
                .iter()
                .filter(|(_, k, v)| {
                    let within =
                        |r: &Range<usize>| r.start <= s.start && s.start < r.end.max(r.start + 1);
                    within(k) || within(v)
                })
                .max_by_key(|(p, _, _)| p.matches('.').count())
                .map(|(p, _, _)| p.clone())
        });
        let message = e.message().trim().replace("unknown field", "unknown key");
        ConfigError {
            file: self.file.to_string(),
            line: span.map(|s| self.line_at(s.start)),
            key,
            message,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file's tables. Every field is optional: a key not written keeps its default.

/// The top level: server settings, named like the `serve` flags in snake_case.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TopTable {
    listen: Option<Addr>,
    shards: Option<usize>,
    cpus: Option<Cpus>,
    no_pin: Option<bool>,
    max_queued_bytes: Option<Size>,
    max_message_size: Option<Size>,
    max_subscriptions: Option<usize>,
    max_recovery: Option<usize>,
    max_publish_rate: Option<u32>,
    publish_burst: Option<u32>,
    ping_interval: Option<Dur>,
    idle_timeout: Option<Dur>,
    handshake_timeout: Option<Dur>,
    shutdown_timeout: Option<Dur>,
    close_timeout: Option<Dur>,
    max_connections: Option<usize>,
    max_http_body: Option<Size>,
    api_key: Option<NonEmpty>,
    instance_id: Option<NonEmpty>,
    io_driver: Option<IoDriver>,
    echo: Option<bool>,
    redis: Option<RedisUrl>,
    redis_password: Option<NonEmpty>,
    redis_prefix: Option<String>,
    registry_core: Option<usize>,
    heartbeat_interval: Option<Dur>,
    heartbeat_ttl: Option<Dur>,
    connection_ttl: Option<Dur>,
    log: Option<NonEmpty>,
    auth: Option<AuthTable>,
    channels: Option<RulesTable>,
    #[serde(default)]
    namespaces: BTreeMap<NamespaceName, RulesTable>,
}

/// Overwrite `field` when the file sets the key.
fn put<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

impl TopTable {
    fn apply(self, doc: &Doc<'_>, base: Option<&Path>) -> Result<Settings, ConfigError> {
        let TopTable {
            listen,
            shards,
            cpus,
            no_pin,
            max_queued_bytes,
            max_message_size,
            max_subscriptions,
            max_recovery,
            max_publish_rate,
            publish_burst,
            ping_interval,
            idle_timeout,
            handshake_timeout,
            shutdown_timeout,
            close_timeout,
            max_connections,
            max_http_body,
            api_key,
            instance_id,
            io_driver,
            echo,
            redis,
            redis_password,
            redis_prefix,
            registry_core,
            heartbeat_interval,
            heartbeat_ttl,
            connection_ttl,
            log,
            auth,
            channels,
            namespaces,
        } = self;
        let mut c = Config::default();
        put(&mut c.listen, listen.map(|v| v.0));
        put(&mut c.shards, shards);
        put(&mut c.cpus, cpus.map(|v| Some(v.0)));
        put(&mut c.pin, no_pin.map(|v| !v));
        put(&mut c.max_queued_bytes, max_queued_bytes.map(|v| v.0));
        put(&mut c.max_message_size, max_message_size.map(|v| v.0));
        put(&mut c.max_subscriptions, max_subscriptions);
        put(&mut c.max_recovery, max_recovery);
        put(&mut c.max_publish_rate, max_publish_rate);
        put(&mut c.publish_burst, publish_burst.map(Some));
        put(&mut c.ping_interval, ping_interval.map(|v| v.0));
        put(&mut c.idle_timeout, idle_timeout.map(|v| v.0));
        put(&mut c.handshake_timeout, handshake_timeout.map(|v| v.0));
        put(&mut c.shutdown_timeout, shutdown_timeout.map(|v| v.0));
        put(&mut c.close_timeout, close_timeout.map(|v| v.0));
        put(&mut c.max_connections, max_connections.map(Some));
        put(&mut c.max_http_body, max_http_body.map(|v| Some(v.0)));
        put(&mut c.api_key, api_key.map(|v| Some(v.0)));
        put(&mut c.instance_id, instance_id.map(|v| Some(v.0)));
        put(&mut c.epoll, io_driver.map(|v| v.0));
        put(&mut c.echo, echo);
        let redis_password = redis_password.map(|v| v.0);
        c.redis = redis.map(|r| {
            let mut r = r.0;
            put(&mut r.password, redis_password.clone().map(Some));
            put(&mut r.prefix, redis_prefix.clone());
            r
        });
        put(&mut c.registry_core, registry_core.map(Some));
        put(&mut c.heartbeat_interval, heartbeat_interval.map(|v| v.0));
        put(&mut c.heartbeat_ttl, heartbeat_ttl.map(|v| v.0));
        put(&mut c.connection_ttl, connection_ttl.map(|v| v.0));
        if let Some(auth) = auth {
            auth.apply(&mut c, doc, base)?;
        }
        if let Some(rules) = channels {
            c.namespaces.default = rules.into_rules();
        }
        for (name, rules) in namespaces {
            c.namespaces.named.insert(name.0, rules.into_rules());
        }
        let lines = doc
            .keys
            .iter()
            .map(|(p, k, _)| (p.clone(), doc.line_at(k.start)))
            .collect();
        Ok(Settings {
            config: c,
            log: log.map(|v| v.0),
            redis_password,
            redis_prefix,
            file: doc.file.to_string(),
            lines,
        })
    }
}

/// `[auth]`: exactly the fields of [`AuthConfig`], plus `allowed_origins`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthTable {
    secret: Option<NonEmpty>,
    previous_secret: Option<NonEmpty>,
    secret_file: Option<PathBuf>,
    secret_env: Option<NonEmpty>,
    public_key_files: Option<OneOrMany>,
    jwks_url: Option<HttpUrl>,
    algorithms: Option<Vec<Algorithm>>,
    audience: Option<OneOrMany>,
    issuer: Option<NonEmpty>,
    leeway: Option<Dur>,
    require_exp: Option<bool>,
    query_token: Option<bool>,
    auth_timeout: Option<Dur>,
    expiry_grace: Option<Dur>,
    max_token_size: Option<Size>,
    anonymous_connect: Option<bool>,
    allowed_origins: Option<Vec<Origin>>,
}

impl AuthTable {
    /// Token settings go to `c.auth` (unless `allowed_origins` is the only key: open mode with
    /// limited origins); `[auth]` without a key source is refused later, by [`Settings::check`],
    /// so that `--auth-secret` can still supply the key.
    fn apply(self, c: &mut Config, doc: &Doc<'_>, base: Option<&Path>) -> Result<(), ConfigError> {
        let AuthTable {
            secret,
            previous_secret,
            secret_file,
            secret_env,
            public_key_files,
            jwks_url,
            algorithms,
            audience,
            issuer,
            leeway,
            require_exp,
            query_token,
            auth_timeout,
            expiry_grace,
            max_token_size,
            anonymous_connect,
            allowed_origins,
        } = self;
        let resolve = |p: PathBuf| match base {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        };
        let mut a = AuthConfig::default();
        put(&mut a.secret, secret.map(|v| Some(v.0)));
        put(&mut a.previous_secret, previous_secret.map(|v| Some(v.0)));
        if let Some(p) = secret_file {
            if p.as_os_str().is_empty() {
                return Err(doc.error("auth.secret_file", "must not be empty"));
            }
            a.secret_file = Some(resolve(p));
        }
        put(&mut a.secret_env, secret_env.map(|v| Some(v.0)));
        put(
            &mut a.public_key_files,
            public_key_files.map(|v| v.0.into_iter().map(|p| resolve(p.into())).collect()),
        );
        put(&mut a.jwks_url, jwks_url.map(|v| Some(v.0)));
        put(
            &mut a.algorithms,
            algorithms.map(|v| v.into_iter().map(|a| a.0).collect()),
        );
        put(&mut a.audience, audience.map(|v| v.0));
        put(&mut a.issuer, issuer.map(|v| Some(v.0)));
        put(&mut a.leeway, leeway.map(|v| v.0));
        put(&mut a.require_exp, require_exp);
        put(&mut a.query_token, query_token);
        put(&mut a.auth_timeout, auth_timeout.map(|v| v.0));
        put(&mut a.expiry_grace, expiry_grace.map(|v| v.0));
        put(&mut a.max_token_size, max_token_size.map(|v| v.0));
        put(&mut a.anonymous_connect, anonymous_connect);
        let only_origins = allowed_origins.is_some()
            && doc
                .keys
                .iter()
                .filter(|(p, _, _)| p.starts_with("auth.") && p.matches('.').count() == 1)
                .all(|(p, _, _)| p == "auth.allowed_origins");
        put(
            &mut c.allowed_origins,
            allowed_origins.map(|v| v.into_iter().map(|o| o.0).collect()),
        );
        if !only_origins {
            c.auth = Some(a);
        }
        Ok(())
    }
}

/// `[channels]` and `[namespaces.NAME]`: one namespace's rules.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesTable {
    subscribe: Option<Subscribe>,
    publish: Option<Publish>,
    user_limited: Option<bool>,
    history_size: Option<usize>,
    history_ttl: Option<Dur>,
    history_meta_ttl: Option<Dur>,
    history: Option<Publish>,
}

impl RulesTable {
    fn into_rules(self) -> NamespaceRules {
        let RulesTable {
            subscribe,
            publish,
            user_limited,
            history_size,
            history_ttl,
            history_meta_ttl,
            history,
        } = self;
        NamespaceRules {
            subscribe: subscribe.map(|v| v.0),
            publish: publish.map(|v| v.0),
            user_limited: user_limited.unwrap_or(false),
            history_size,
            history_ttl: history_ttl.map(|d| d.0),
            history_meta_ttl: history_meta_ttl.map(|d| d.0),
            history: history.map(|v| v.0),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Value types: each validates while it is deserialized, so an error carries the value's span.

/// A duration: `"500ms"`, `"25s"`, `"2m"`, `"1h"`, or an integer number of seconds.
struct Dur(Duration);

/// A byte size: `"64KiB"`, `"1MiB"`, or an integer number of bytes.
struct Size(usize);

/// A core list: `"0,2-3"` or `[0, 2, 3]`.
struct Cpus(Vec<usize>);

/// A string or an array of strings (`audience`, `public_key_files`).
struct OneOrMany(Vec<String>);

/// A string that must not be empty.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct NonEmpty(String);

#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Addr(SocketAddr);

#[derive(Deserialize)]
#[serde(try_from = "String")]
struct RedisUrl(RedisConfig);

/// `io_driver`: `"auto"` or `"epoll"` (true = epoll).
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct IoDriver(bool);

/// A JWKS URL (`http://` only: the hub has no TLS client).
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct HttpUrl(String);

/// A JWT algorithm name jsonwebtoken knows (`HS256`, `RS256`, `ES256`, `EdDSA`, ...).
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Algorithm(String);

#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Origin(String);

#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Subscribe(SubscribeRule);

#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Publish(Access);

#[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(try_from = "String")]
struct NamespaceName(String);

impl TryFrom<String> for NonEmpty {
    type Error = &'static str;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.is_empty() {
            Err("must not be empty")
        } else {
            Ok(NonEmpty(s))
        }
    }
}

impl TryFrom<String> for Addr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
            .map(Addr)
            .map_err(|_| format!("invalid address {s:?}: expected IP:port, e.g. 0.0.0.0:8080"))
    }
}

impl TryFrom<String> for RedisUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        RedisConfig::from_url(&s).map(RedisUrl)
    }
}

impl TryFrom<String> for IoDriver {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "auto" => Ok(IoDriver(false)),
            "epoll" => Ok(IoDriver(true)),
            _ => Err(format!(
                "invalid value {s:?}: expected \"auto\" or \"epoll\""
            )),
        }
    }
}

impl TryFrom<String> for HttpUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::auth::jwks::JwksUrl::parse(&s).map(|_| HttpUrl(s))
    }
}

impl TryFrom<String> for Algorithm {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.parse::<jsonwebtoken::Algorithm>() {
            Ok(_) => Ok(Algorithm(s)),
            Err(_) => Err(format!(
                "unknown algorithm {s:?}: expected HS256, HS384, HS512, RS256, RS384, RS512, \
                 PS256, PS384, PS512, ES256, ES384 or EdDSA"
            )),
        }
    }
}

impl TryFrom<String> for Origin {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_origin(&s).map(Origin)
    }
}

impl TryFrom<String> for Subscribe {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        SubscribeRule::parse(&s).map(Subscribe).ok_or_else(|| {
            format!("invalid value {s:?}: expected anonymous, authenticated, token or none")
        })
    }
}

impl TryFrom<String> for Publish {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Access::parse(&s).map(Publish).ok_or_else(|| {
            format!("invalid value {s:?}: expected none, subscribers, authenticated or anonymous")
        })
    }
}

impl TryFrom<String> for NamespaceName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_namespace_name(&s).map(NamespaceName)
    }
}

/// Check an allowed origin: `*`, `scheme://host[:port]`, or `scheme://*.domain` (no path).
pub fn parse_origin(s: &str) -> Result<String, String> {
    if s == "*" {
        return Ok(s.to_string());
    }
    let ok = match s.split_once("://") {
        Some((scheme, host)) => {
            !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
                && !host.is_empty()
                && !host.contains('/')
        }
        None => false,
    };
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid origin {s:?}: expected \"*\", scheme://host[:port] or scheme://*.domain \
             (no path, no trailing slash)"
        ))
    }
}

/// Check a namespace name: 1–200 bytes of ASCII letters, digits and `_-./@` (so never `:`).
pub fn parse_namespace_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/' | b'@'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid namespace name {s:?}: 1-200 ASCII letters, digits and _-./@ (no ':')"
        ))
    }
}

/// A visitor for values written as a string or an integer.
struct StrOrInt<T> {
    expecting: &'static str,
    from_str: fn(&str) -> Result<T, String>,
    from_int: fn(u64) -> Result<T, String>,
}

impl<'de, T> Visitor<'de> for StrOrInt<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        (self.from_str)(s).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
        (self.from_int)(n).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
        match u64::try_from(n) {
            Ok(n) => (self.from_int)(n).map_err(E::custom),
            Err(_) => Err(E::custom(format!("must not be negative, got {n}"))),
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt {
            expecting: "a duration like \"500ms\", \"25s\", \"2m\" or a number of seconds",
            from_str: |s| parse_duration(s).map(Dur),
            from_int: |n| Ok(Dur(Duration::from_secs(n))),
        })
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt {
            expecting: "a size like \"64KiB\", \"1MiB\" or a number of bytes",
            from_str: |s| parse_size(s).map(Size),
            from_int: |n| {
                usize::try_from(n)
                    .map(Size)
                    .map_err(|_| format!("size {n} is too large"))
            },
        })
    }
}

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cpus;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a core list like \"0,2-3\" or an array of core numbers")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Cpus, E> {
                parse_cpu_list(s).map(Cpus).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Cpus, A::Error> {
                let mut cpus = Vec::new();
                while let Some(n) = seq.next_element::<usize>()? {
                    cpus.push(n);
                }
                if cpus.is_empty() {
                    return Err(de::Error::custom("empty core list"));
                }
                Ok(Cpus(cpus))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<OneOrMany, E> {
                if s.is_empty() {
                    return Err(E::custom("must not be empty"));
                }
                Ok(OneOrMany(vec![s.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(NonEmpty(s)) = seq.next_element()? {
                    items.push(s);
                }
                Ok(OneOrMany(items))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Settings {
        parse(text, "t.toml", None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(text: &str) -> ConfigError {
        match parse(text, "t.toml", None) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e,
        }
    }

    /// Every key set to a value other than its default.
    const FULL: &str = r#"
listen = "0.0.0.0:9001"
shards = 3
cpus = "0,2-3"
no_pin = true
max_queued_bytes = "2MiB"
max_message_size = 4096
max_subscriptions = 7
max_publish_rate = 9
publish_burst = 11
ping_interval = "13s"
idle_timeout = 17
handshake_timeout = "1500ms"
shutdown_timeout = "2m"
close_timeout = "3s"
max_connections = 19
max_http_body = "8KiB"
api_key = "k3y"
instance_id = "inst-a"
io_driver = "epoll"
echo = true
redis = "redis://r.example:6390/4"
redis_password = "pw"
redis_prefix = "rh:"
registry_core = 5
heartbeat_interval = "4s"
heartbeat_ttl = "12s"
connection_ttl = "1h"
log = "debug"

[auth]
secret = "s1"
previous_secret = "s0"
secret_file = "/run/secret"
secret_env = "HUB_SECRET"
public_key_files = ["/k/a.pem", "/k/b.pem"]
jwks_url = "http://idp.example/jwks.json"
algorithms = ["HS256", "RS256"]
audience = "hub"
issuer = "https://idp.example"
leeway = "5s"
require_exp = false
query_token = false
auth_timeout = "6s"
expiry_grace = "7s"
max_token_size = "4KiB"
anonymous_connect = true
allowed_origins = ["https://app.example.com", "https://*.example.org"]

[channels]
subscribe = "anonymous"
publish = "subscribers"
user_limited = true

[namespaces.chat]
subscribe = "authenticated"
publish = "anonymous"

[namespaces."a.b/c@d"]
subscribe = "none"
publish = "none"
user_limited = true
"#;

    #[test]
    fn every_key_is_applied() {
        let s = parse_ok(FULL);
        let c = &s.config;
        assert_eq!(c.listen, "0.0.0.0:9001".parse().unwrap());
        assert_eq!(c.shards, 3);
        assert_eq!(c.cpus, Some(vec![0, 2, 3]));
        assert!(!c.pin);
        assert_eq!(c.max_queued_bytes, 2 << 20);
        assert_eq!(c.max_message_size, 4096);
        assert_eq!(c.max_subscriptions, 7);
        assert_eq!(c.max_publish_rate, 9);
        assert_eq!(c.publish_burst, Some(11));
        assert_eq!(c.ping_interval, Duration::from_secs(13));
        assert_eq!(c.idle_timeout, Duration::from_secs(17));
        assert_eq!(c.handshake_timeout, Duration::from_millis(1500));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(120));
        assert_eq!(c.close_timeout, Duration::from_secs(3));
        assert_eq!(c.max_connections, Some(19));
        assert_eq!(c.max_http_body, Some(8192));
        assert_eq!(c.api_key.as_deref(), Some("k3y"));
        assert_eq!(c.instance_id.as_deref(), Some("inst-a"));
        assert!(c.epoll);
        assert!(c.echo);
        let r = c.redis.as_ref().unwrap();
        assert_eq!((r.addr.as_str(), r.db), ("r.example:6390", 4));
        assert_eq!(r.password.as_deref(), Some("pw"));
        assert_eq!(r.prefix, "rh:");
        assert_eq!(c.registry_core, Some(5));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(4));
        assert_eq!(c.heartbeat_ttl, Duration::from_secs(12));
        assert_eq!(c.connection_ttl, Duration::from_secs(3600));
        assert_eq!(s.log.as_deref(), Some("debug"));

        let a = c.auth.as_ref().unwrap();
        let expected = AuthConfig {
            secret: Some("s1".into()),
            previous_secret: Some("s0".into()),
            secret_file: Some("/run/secret".into()),
            secret_env: Some("HUB_SECRET".into()),
            public_key_files: vec!["/k/a.pem".into(), "/k/b.pem".into()],
            jwks_url: Some("http://idp.example/jwks.json".into()),
            algorithms: vec!["HS256".into(), "RS256".into()],
            audience: vec!["hub".into()],
            issuer: Some("https://idp.example".into()),
            leeway: Duration::from_secs(5),
            require_exp: false,
            query_token: false,
            auth_timeout: Duration::from_secs(6),
            expiry_grace: Duration::from_secs(7),
            max_token_size: 4096,
            anonymous_connect: true,
        };
        assert_eq!(a, &expected);
        assert_eq!(
            c.allowed_origins,
            vec!["https://app.example.com", "https://*.example.org"]
        );

        let ns = &c.namespaces;
        assert_eq!(
            ns.default,
            NamespaceRules {
                subscribe: Some(SubscribeRule::Anonymous),
                publish: Some(Access::Subscribers),
                user_limited: true,
                ..Default::default()
            }
        );
        assert_eq!(
            ns.named["chat"],
            NamespaceRules {
                subscribe: Some(SubscribeRule::Authenticated),
                publish: Some(Access::Anonymous),
                user_limited: false,
                ..Default::default()
            }
        );
        assert_eq!(
            ns.named["a.b/c@d"],
            NamespaceRules {
                subscribe: Some(SubscribeRule::None),
                publish: Some(Access::None),
                user_limited: true,
                ..Default::default()
            }
        );
        // The hub takes one HMAC secret source (FULL sets all three to test each key).
        let e = s.check().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("auth.secret_file"), "{e}");
        assert!(e.message.starts_with("set only one of"), "{e}");
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let s = parse_ok("");
        let d = Settings::default();
        assert_eq!(s.render(), d.render());
        assert!(s.config.auth.is_none() && s.log.is_none());
    }

    #[test]
    fn render_reads_back_to_the_same_configuration() {
        for text in [FULL, "", "[auth]\nallowed_origins = [\"*\"]\n"] {
            let once = parse_ok(text).render();
            let twice = parse_ok(&once).render();
            assert_eq!(once, twice);
        }
        let out = parse_ok(FULL).render();
        for secret in ["k3y", "\"pw\"", "s1", "s0"] {
            assert!(!out.contains(secret), "{secret} shown:\n{out}");
        }
        assert!(out.contains("secret = \"<hidden>\""), "{out}");
        assert!(out.contains("[namespaces.\"a.b/c@d\"]"), "{out}");
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        // (file text, start of the message: "line N: key: what")
        let cases: &[(&str, &str)] = &[
            (
                "listen = \"127.0.0.1:1\"\nbogus = 1\n",
                "line 2: bogus: unknown key",
            ),
            ("shards = \"many\"\n", "line 1: shards: invalid type"),
            (
                "\n\n[auth]\nsecret = \"x\"\n\nleeway = \"5 parsecs\"\n",
                "line 6: auth.leeway: invalid duration \"5 parsecs\": unknown unit \"parsecs\"",
            ),
            (
                "[channels]\nsubscribe = \"everyone\"\n",
                "line 2: channels.subscribe: invalid value \"everyone\"",
            ),
            (
                "[namespaces.chat]\npublish = \"all\"\n",
                "line 2: namespaces.chat.publish: invalid value \"all\"",
            ),
            (
                "[namespaces.chat]\nwho = 1\n",
                "line 2: namespaces.chat.who: unknown key",
            ),
            (
                "[namespaces.\"a:b\"]\npublish = \"none\"\n",
                "line 1: namespaces.\"a:b\": invalid namespace name",
            ),
            (
                "[auth]\nsecret = \"x\"\nalgorithms = [\"none\"]\n",
                "line 3: auth.algorithms: unknown algorithm",
            ),
            (
                "[auth]\nallowed_origins = [\"https://a.com/\"]\n",
                "line 2: auth.allowed_origins: invalid origin",
            ),
            ("cpus = \"0,x\"\n", "line 1: cpus: invalid core list"),
            ("cpus = [0, -1]\n", "line 1: cpus: invalid value"),
            (
                "max_queued_bytes = \"12 apples\"\n",
                "line 1: max_queued_bytes: invalid size",
            ),
            (
                "idle_timeout = -5\n",
                "line 1: idle_timeout: must not be negative",
            ),
            (
                "idle_timeout = true\n",
                "line 1: idle_timeout: invalid type",
            ),
            (
                "io_driver = \"kqueue\"\n",
                "line 1: io_driver: invalid value",
            ),
            ("redis = \"http://x\"\n", "line 1: redis: invalid Redis URL"),
            ("[server]\nlisten = 1\n", "line 1: server: unknown key"),
            ("auth.secret = 3\n", "line 1: auth.secret: invalid type"),
            ("api_key = \"\"\n", "line 1: api_key: must not be empty"),
        ];
        for (text, expected) in cases {
            let e = parse_err(text).to_string();
            assert!(
                e.starts_with(&format!("t.toml {expected}")),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = parse_err("listen = \"x\"\nshards = [1,\n");
        assert_eq!(e.line, Some(2), "{e}");
        let e = parse_err("a = 1\na = 2\n");
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn auth_without_a_key() {
        let s = parse_ok("\n[auth]\naudience = \"hub\"\n");
        let e = s.check().unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("auth")), "{e}");
        assert!(e.message.contains("no key configured"), "{e}");
        let e = parse_ok("[auth]\n").check().unwrap_err();
        assert!(e.message.contains("no key configured"), "{e}");
        // Only origins: open mode, origins enforced.
        let s = parse_ok("[auth]\nallowed_origins = [\"https://a.example\"]\n");
        s.check().unwrap();
        assert!(s.config.auth.is_none());
        assert_eq!(s.config.allowed_origins, vec!["https://a.example"]);
        // A key: auth mode.
        let s = parse_ok("[auth]\nsecret_env = \"S\"\n");
        s.check().unwrap();
        assert!(s.config.auth.as_ref().unwrap().has_keys());
    }

    #[test]
    fn cross_key_errors_point_at_the_file() {
        let s = parse_ok("heartbeat_interval = \"10s\"\nheartbeat_ttl = \"5s\"\n");
        let e = s.check().unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(2), Some("heartbeat_ttl")),
            "{e}"
        );
        let e = parse_ok("\nredis_password = \"x\"\n").check().unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(2), Some("redis_password")),
            "{e}"
        );
        // A key the file does not set: the message alone.
        let mut s = parse_ok("heartbeat_interval = \"10s\"\nheartbeat_ttl = \"5s\"\n");
        s.overridden("heartbeat_ttl");
        let e = s.check().unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("", None), "{e}");
    }

    #[test]
    fn relative_key_paths_follow_the_file() {
        let s = parse(
            "[auth]\nsecret_file = \"s.txt\"\npublic_key_files = \"/abs.pem\"\n",
            "x",
            Some(Path::new("/etc/ringhub")),
        )
        .unwrap();
        let a = s.config.auth.unwrap();
        assert_eq!(a.secret_file.unwrap(), Path::new("/etc/ringhub/s.txt"));
        assert_eq!(a.public_key_files, vec![PathBuf::from("/abs.pem")]);
    }

    #[test]
    fn value_forms() {
        let s = parse_ok("cpus = [1, 3]\nidle_timeout = \"2m\"\nmax_message_size = \"1MiB\"\n");
        assert_eq!(s.config.cpus, Some(vec![1, 3]));
        assert_eq!(s.config.idle_timeout, Duration::from_secs(120));
        let s = parse_ok("[auth]\nsecret = \"x\"\naudience = [\"a\", \"b\"]\n");
        assert_eq!(s.config.auth.unwrap().audience, vec!["a", "b"]);
        assert!(parse_origin("https://*.example.com").is_ok());
        assert!(parse_origin("*").is_ok());
        assert!(parse_origin("example.com").is_err());
        assert!(parse_namespace_name("chat").is_ok());
        assert!(parse_namespace_name("").is_err());
        assert!(parse_namespace_name("a#b").is_err());
    }
}
