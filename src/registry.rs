//! The connection registry and instance heartbeats (Redis mode), on a dedicated core.
//!
//! Shards never talk to Redis for bookkeeping and never wait on it: they push [`RegEvent`]s into
//! a bounded [`RegistryQueue`] (one atomic swap per connect/disconnect, never per message). If the
//! queue is full the shard counts a drop and moves on; the registry notices the drop counter moved
//! and repairs itself with a full refresh: it asks every shard for a snapshot of its connections
//! (through the shards' inboxes), rebuilds its map, deletes keys that should not exist (from this
//! instance's index set) and rewrites every key that should.
//!
//! Keys (prefix `ws:` by default; docs/registry.md has the full table):
//! - `ws:instance:<id>` — `{"instance","addr","shards","connections","started_at","version"}`,
//!   written every heartbeat interval with the heartbeat TTL;
//! - `ws:conn:<connection>` — `{"connection","instance","shard","remote","connected_at","user"}`,
//!   written with the connection TTL and rewritten when half of it has passed, deleted on close;
//! - `ws:instance:<id>:conns` — the set of this instance's connection ids (the per-instance
//!   index: a live instance cleans up a dead one's keys from it, never scanning the keyspace);
//! - `ws:user:<user>` — the set of a user's connection ids on every instance (non-empty users
//!   only), so sends and disconnects by user need no scan; its TTL is renewed with its members'
//!   connection keys;
//! - `ws:instance:<id>:users` — the users with connections on this instance: a dead instance's ids
//!   are removed from exactly these users' sets, even after its connection keys expired;
//! - `ws:instances` — the set of instance ids ever alive and not yet cleaned up;
//! - `ws:cleanup:<id>` — a short-lived lock (SET NX EX) so two live instances do not clean up the
//!   same dead instance at once.
//!
//! Every write is batched: each turn of the registry loop drains everything queued and sends it
//! as one pipeline (one round trip), so 10,000 connections arriving in a second cost a handful of
//! round trips. Refresh cost grows linearly with connections (one SET per connection per half TTL,
//! spread over time in arrival order, pipelined).
//!
//! Backend requests for other instances (`POST /send`, `POST /disconnect`) are looked up here and
//! published to the target instances' inbox channels as [`InboxMsg`]s: three round trips per turn
//! at most, whatever the number of requests.
//!
//! While Redis is unreachable the registry keeps its in-memory map current and reconnects with
//! backoff; on reconnect it does the full refresh. Graceful shutdown deletes every key of this
//! instance (and its ids in the users' sets) before the process exits.
//!
//! The user keys are read and written with single-key commands only (`SADD`, `SREM`, `PEXPIRE`,
//! `SMEMBERS`, `EXISTS`), so they route key by key on a Redis Cluster; the chunked `DEL`s of
//! connection keys do not, yet.

use crate::config::RedisConfig;
use crate::inbox::{Inbox, ShardMsg, Wakeup};
use crate::redis::RedisConn;
use crate::resp::{self, Frame};
use bytes::BytesMut;
use crossbeam_queue::ArrayQueue;
use futures_util::future::{select, Either};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Events queued per shard-to-registry push before drops start.
pub const QUEUE_CAPACITY: usize = 1 << 16;
/// Keys per DEL / members per SADD or SREM command.
const CHUNK: usize = 500;
/// Longest the registry sleeps between turns (heartbeats and refreshes are checked each turn).
const MAX_IDLE: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bound on the final cleanup at shutdown.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(5);
/// How long events are collected before a turn: short when quiet (registration lands within a
/// few ms), longer after a busy turn so that a burst of connects goes out in a handful of
/// pipelines (10,000 connects in a second: about 5 round trips).
const BATCH_QUIET: Duration = Duration::from_millis(2);
const BATCH_BUSY: Duration = Duration::from_millis(200);
/// A turn with at least this many events counts as busy.
const BUSY_EVENTS: usize = 256;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One live connection as the registry records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnRecord {
    pub id: String,
    pub shard: usize,
    pub remote: SocketAddr,
    /// Unix milliseconds.
    pub connected_at: u64,
    /// The connection's user (`sub` of its token); empty for anonymous connections.
    pub user: String,
}

/// Whom a backend request (`POST /send`, `POST /disconnect`) or an inbox message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One connection, by id.
    Connection(String),
    /// Every connection of a user (never empty: anonymous connections have no user).
    User(String),
}

/// What a backend request or an inbox message does to its target's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `{"type":"direct","data":<data>}`; `data` is JSON text, passed on verbatim.
    Send(String),
    /// Close with `code` (4000–4999) and `reason` (at most [`MAX_REASON`] bytes).
    Disconnect { code: u16, reason: String },
}

/// Longest close reason: a close frame's payload is at most 125 bytes, 2 of them the code.
pub const MAX_REASON: usize = 123;
/// The reason of a `POST /disconnect` that gives none.
pub const DEFAULT_REASON: &str = "disconnected by the server";

impl Action {
    /// A disconnect with the defaults filled in (code 4004, [`DEFAULT_REASON`]) and the limits
    /// checked: the code must be 4000–4999 (application codes), the reason ≤ [`MAX_REASON`] bytes.
    pub fn disconnect(code: Option<i64>, reason: Option<&str>) -> Result<Action, String> {
        let code = code.unwrap_or(crate::auth::close::DISCONNECTED as i64);
        if !(4000..=4999).contains(&code) {
            return Err(format!("`code` must be 4000-4999, not {code}"));
        }
        let reason = reason.unwrap_or(DEFAULT_REASON);
        if reason.len() > MAX_REASON {
            return Err(format!(
                "`reason` is {} bytes; at most {MAX_REASON} fit in a close frame",
                reason.len()
            ));
        }
        Ok(Action::Disconnect {
            code: code as u16,
            reason: reason.to_owned(),
        })
    }
}

/// The fields of a backend request body and of an inbox message, as they arrive.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Fields<'a> {
    #[serde(borrow, default)]
    pub connection: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    pub user: Option<std::borrow::Cow<'a, str>>,
    /// Present (even as `null`) or absent.
    #[serde(borrow, default, deserialize_with = "present")]
    pub data: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    pub disconnect: bool,
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(borrow, default)]
    pub reason: Option<std::borrow::Cow<'a, str>>,
}

/// A field that is there is `Some`, even when it is `null` (`"data":null` is data).
fn present<'de, D>(d: D) -> Result<Option<&'de serde_json::value::RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    serde::Deserialize::deserialize(d).map(Some)
}

impl Fields<'_> {
    /// Exactly one of `connection` and `user` (a non-empty string).
    pub fn target(&self) -> Result<Target, &'static str> {
        match (&self.connection, &self.user) {
            (Some(c), None) => Ok(Target::Connection(c.clone().into_owned())),
            (None, Some(u)) if u.is_empty() => Err("`user` must not be empty"),
            (None, Some(u)) => Ok(Target::User(u.clone().into_owned())),
            _ => Err("give exactly one of `connection` and `user`"),
        }
    }
}

/// A message on an instance's inbox channel (`<prefix>inbox:<instance>`), published by the
/// registry of another instance or by any backend with a Redis client:
///
/// | payload | effect on the receiving instance |
/// |---|---|
/// | `{"connection":"<id>","data":<JSON>}` | `{"type":"direct","data":<JSON>}` to that connection |
/// | `{"user":"<user>","data":<JSON>}` | the same to every connection of the user there |
/// | `{"connection":"<id>","disconnect":true,"code":4004,"reason":".."}` | close that connection |
/// | `{"user":"<user>","disconnect":true,"code":4004,"reason":".."}` | close every one of the user's |
///
/// `code` (4000–4999) and `reason` (≤ 123 bytes) are optional (4004, [`DEFAULT_REASON`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMsg {
    pub target: Target,
    pub action: Action,
}

impl InboxMsg {
    /// The JSON payload (`data` verbatim).
    pub fn encode(&self) -> String {
        let (field, who) = match &self.target {
            Target::Connection(id) => ("connection", id),
            Target::User(user) => ("user", user),
        };
        let who = serde_json::Value::String(who.clone()).to_string();
        match &self.action {
            Action::Send(data) => {
                let mut out = String::with_capacity(who.len() + data.len() + 24);
                out.push_str("{\"");
                out.push_str(field);
                out.push_str("\":");
                out.push_str(&who);
                out.push_str(",\"data\":");
                out.push_str(data);
                out.push('}');
                out
            }
            Action::Disconnect { code, reason } => {
                let reason = serde_json::Value::String(reason.clone());
                format!(r#"{{"{field}":{who},"disconnect":true,"code":{code},"reason":{reason}}}"#)
            }
        }
    }

    /// Parse a payload; `Err` says what is wrong with it (the receiver ignores it).
    pub fn decode(payload: &[u8]) -> Result<InboxMsg, String> {
        let f: Fields = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        let target = f.target()?;
        let action = match (f.data, f.disconnect) {
            (Some(data), false) => Action::Send(data.get().to_owned()),
            (None, true) => Action::disconnect(f.code, f.reason.as_deref())?,
            (Some(_), true) => return Err("`data` and `disconnect` together".into()),
            (None, false) => return Err("neither `data` nor `\"disconnect\":true`".into()),
        };
        Ok(InboxMsg { target, action })
    }
}

/// How a request for another instance went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// Published to every instance holding the target; the number of connections they hold
    /// according to the registry (0 for a user with none elsewhere).
    Connections(usize),
    /// No such connection in the registry (or its instance is gone). Never for a user.
    NotFound,
    /// Redis is unreachable.
    Unavailable,
}

/// A backend request for connections of other instances. For a [`Target::User`] the registry
/// leaves out this instance's connections: the caller reaches them through the shards.
#[derive(Debug)]
pub struct Request {
    pub target: Target,
    pub action: Action,
    pub reply: futures_channel::oneshot::Sender<Reached>,
}

/// What shards and HTTP handlers ask of the registry.
#[derive(Debug)]
pub enum RegEvent {
    /// A connection opened (or, in auth mode, authenticated). Registering a known id again
    /// updates its record (its user may change; its remote address and time are kept when the
    /// new record has none).
    Register(ConnRecord),
    Unregister(String),
    /// `POST /send` / `POST /disconnect` for connections elsewhere: look them up and publish to
    /// their instances' inboxes.
    Request(Request),
    /// `GET /instances`: the JSON array of live instances.
    Instances(futures_channel::oneshot::Sender<Result<String, String>>),
    /// Delete this instance's keys and stop.
    Shutdown,
}

/// The bounded queue from shards (and HTTP handlers) to the registry thread.
#[derive(Debug)]
pub struct RegistryQueue {
    queue: ArrayQueue<RegEvent>,
    wakeup: Wakeup,
    dropped: AtomicU64,
}

impl RegistryQueue {
    pub fn new(capacity: usize) -> Arc<RegistryQueue> {
        Arc::new(RegistryQueue {
            queue: ArrayQueue::new(capacity),
            wakeup: Wakeup::default(),
            dropped: AtomicU64::new(0),
        })
    }

    /// Queue an event without waiting. On a full queue the event is handed back and, for
    /// register/unregister, the drop is counted (the registry repairs itself from it).
    pub fn push(&self, ev: RegEvent) -> Result<(), RegEvent> {
        match self.queue.push(ev) {
            Ok(()) => {
                self.wakeup.notify();
                Ok(())
            }
            Err(ev) => {
                if matches!(ev, RegEvent::Register(_) | RegEvent::Unregister(_)) {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(ev)
            }
        }
    }

    /// Events dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    async fn ready(&self) {
        self.wakeup.wait(|| !self.queue.is_empty()).await
    }
}

/// Redis key names for one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    pub fn conn(&self, id: &str) -> String {
        format!("{}conn:{id}", self.prefix)
    }
    pub fn instance(&self, id: &str) -> String {
        format!("{}instance:{id}", self.prefix)
    }
    pub fn index(&self, id: &str) -> String {
        format!("{}instance:{id}:conns", self.prefix)
    }
    /// The set of a user's connection ids (all instances).
    pub fn user(&self, user: &str) -> String {
        format!("{}user:{user}", self.prefix)
    }
    /// The set of users with connections on instance `id`.
    pub fn instance_users(&self, id: &str) -> String {
        format!("{}instance:{id}:users", self.prefix)
    }
    pub fn instances(&self) -> String {
        format!("{}instances", self.prefix)
    }
    pub fn cleanup_lock(&self, id: &str) -> String {
        format!("{}cleanup:{id}", self.prefix)
    }
    pub fn inbox(&self, id: &str) -> String {
        format!("{}inbox:{id}", self.prefix)
    }
}

/// Registry timing (see `Config`).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat_interval: Duration,
    pub heartbeat_ttl: Duration,
    pub conn_ttl: Duration,
}

/// Everything the registry thread needs.
pub struct RegistryStart {
    pub redis: RedisConfig,
    pub timing: Timing,
    pub instance: Arc<str>,
    pub addr: SocketAddr,
    pub shards: usize,
    pub inboxes: Arc<[Arc<Inbox>]>,
    pub queue: Arc<RegistryQueue>,
    pub core: Option<core_affinity::CoreId>,
    pub started_at: u64,
}

/// Start the registry thread.
pub fn spawn(ctx: RegistryStart) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ringhub-registry".into())
        .spawn(move || {
            if let Some(core) = ctx.core {
                if !core_affinity::set_for_current(core) {
                    tracing::warn!(core = core.id, "could not pin the registry to its core");
                }
            }
            let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build();
            match rt {
                Ok(mut rt) => rt.block_on(Registry::new(ctx).run()),
                Err(e) => tracing::error!(error = %e, "registry runtime failed to start"),
            }
        })
}

fn ms(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

struct Registry {
    ctx: RegistryStart,
    keys: Keys,
    /// This instance's live connections.
    conns: HashMap<String, ConnRecord>,
    /// Connections per (non-empty) user in `conns`: a user leaves this instance's users set
    /// when its count drops to zero.
    user_counts: HashMap<String, usize>,
    /// Ids to write (new, or everything after a resync).
    to_set: Vec<String>,
    /// Ids to delete, with the user whose set lists them (`""`: none, or unknown).
    to_del: Vec<(String, String)>,
    /// (when written, id), oldest first: drives the TTL refresh.
    written: VecDeque<(Instant, String)>,
    requests: Vec<Request>,
    instance_requests: Vec<futures_channel::oneshot::Sender<Result<String, String>>>,
    next_heartbeat: Instant,
    seen_dropped: u64,
    /// Rebuild and rewrite everything on the next connected turn.
    resync: bool,
    shutdown: bool,
    /// The first heartbeat has been written.
    joined: bool,
    /// Register/unregister events handled in the last turn (drives the batching delay).
    last_turn_events: usize,
    redis: Option<RedisConn>,
    next_connect: Instant,
    backoff: Duration,
    logged_down: bool,
}

impl Registry {
    fn new(ctx: RegistryStart) -> Registry {
        let keys = Keys::new(&ctx.redis.prefix);
        Registry {
            ctx,
            keys,
            conns: HashMap::new(),
            user_counts: HashMap::new(),
            to_set: Vec::new(),
            to_del: Vec::new(),
            written: VecDeque::new(),
            requests: Vec::new(),
            instance_requests: Vec::new(),
            next_heartbeat: Instant::now(),
            seen_dropped: 0,
            resync: true,
            shutdown: false,
            joined: false,
            last_turn_events: 0,
            redis: None,
            next_connect: Instant::now(),
            backoff: BACKOFF_MIN,
            logged_down: false,
        }
    }

    async fn run(mut self) {
        loop {
            self.drain();
            if self.ctx.queue.dropped() != self.seen_dropped {
                self.seen_dropped = self.ctx.queue.dropped();
                tracing::warn!(
                    dropped = self.seen_dropped,
                    "registry queue overflowed; rebuilding from the shards"
                );
                self.rebuild_from_shards().await;
            }
            if self.shutdown {
                self.final_cleanup().await;
                return;
            }
            if self.redis.is_none() && Instant::now() >= self.next_connect {
                self.connect().await;
            }
            if self.redis.is_some() {
                // A Redis that stops answering must not stall the registry (or shutdown): each
                // turn is bounded, and a turn that times out drops the connection.
                let budget = (self.ctx.timing.heartbeat_ttl / 2).min(Duration::from_secs(5));
                match monoio::time::timeout(budget, self.turn()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => self.down(&e),
                    Err(_) => self.down(&io::Error::new(
                        io::ErrorKind::TimedOut,
                        "Redis did not answer the registry in time",
                    )),
                }
            } else {
                self.fail_requests();
            }
            // Sleep until something is queued or the next periodic job is due.
            let wait = MAX_IDLE.min(
                self.next_heartbeat
                    .saturating_duration_since(Instant::now()),
            );
            if !wait.is_zero() {
                let ready = pin!(self.ctx.queue.ready());
                let timer = pin!(monoio::time::sleep(wait));
                if let Either::Left(_) = select(ready, timer).await {
                    // Let a burst of connects accumulate so it goes out as one pipeline.
                    let batch = if self.last_turn_events >= BUSY_EVENTS {
                        BATCH_BUSY
                    } else {
                        BATCH_QUIET
                    };
                    monoio::time::sleep(batch).await;
                }
            }
        }
    }

    /// Take everything queued.
    fn drain(&mut self) {
        while let Some(ev) = self.ctx.queue.queue.pop() {
            match ev {
                RegEvent::Register(rec) => {
                    self.to_set.push(rec.id.clone());
                    self.insert(rec);
                }
                RegEvent::Unregister(id) => {
                    let user = self.remove(&id).map(|r| r.user).unwrap_or_default();
                    self.to_del.push((id, user));
                }
                RegEvent::Request(req) => self.requests.push(req),
                RegEvent::Instances(reply) => self.instance_requests.push(reply),
                RegEvent::Shutdown => self.shutdown = true,
            }
        }
    }

    /// Add or update a record. A known connection keeps its address and time when the new
    /// record has none (a re-registration after authentication); if its user changed, its id
    /// leaves the old user's set.
    fn insert(&mut self, mut rec: ConnRecord) {
        if let Some(old) = self.remove(&rec.id) {
            if rec.remote.ip().is_unspecified() {
                rec.remote = old.remote;
                rec.connected_at = old.connected_at;
            }
            if old.user != rec.user && !old.user.is_empty() {
                self.to_del.push((old.id, old.user));
            }
        }
        if !rec.user.is_empty() {
            *self.user_counts.entry(rec.user.clone()).or_default() += 1;
        }
        self.conns.insert(rec.id.clone(), rec);
    }

    fn remove(&mut self, id: &str) -> Option<ConnRecord> {
        let rec = self.conns.remove(id)?;
        if let Some(n) = self.user_counts.get_mut(&rec.user) {
            *n -= 1;
            if *n == 0 {
                self.user_counts.remove(&rec.user);
            }
        }
        Some(rec)
    }

    /// Ask every shard for its connections and make that the truth (after queue drops).
    async fn rebuild_from_shards(&mut self) {
        let mut pending = Vec::new();
        for inbox in self.ctx.inboxes.iter() {
            let (tx, rx) = futures_channel::oneshot::channel();
            inbox.push(ShardMsg::RegistrySnapshot(tx));
            pending.push(rx);
        }
        let mut fresh = HashMap::new();
        for rx in pending {
            if let Ok(mut records) = rx.await {
                for r in records.iter_mut() {
                    // Shards do not keep peer addresses; keep the one we already knew.
                    if let Some(known) = self.conns.get(&r.id) {
                        r.remote = known.remote;
                        r.connected_at = known.connected_at;
                    }
                }
                for r in records {
                    fresh.insert(r.id.clone(), r);
                }
            }
        }
        // The snapshots are the truth as of when each shard took it. Events queued since were
        // pushed after it (per-shard FIFO), so applying them on top in order is correct; events
        // from before it only repeat what the snapshot already shows.
        self.conns.clear();
        self.user_counts.clear();
        for (_, r) in fresh {
            self.insert(r);
        }
        self.drain();
        self.resync = true;
    }

    async fn connect(&mut self) {
        let res = async {
            let mut conn = RedisConn::open(&self.ctx.redis).await?;
            conn.handshake(&self.ctx.redis, true).await?;
            Ok::<_, io::Error>(conn)
        }
        .await;
        match res {
            Ok(conn) => {
                if self.logged_down {
                    tracing::info!("registry reconnected to Redis; refreshing every key");
                }
                self.logged_down = false;
                self.redis = Some(conn);
                self.backoff = BACKOFF_MIN;
                self.resync = true;
                self.next_heartbeat = Instant::now();
            }
            Err(e) => self.down(&e),
        }
    }

    fn down(&mut self, e: &io::Error) {
        if !self.logged_down {
            tracing::warn!(error = %e, "registry cannot reach Redis; keeping state and retrying");
            self.logged_down = true;
        }
        self.redis = None;
        self.resync = true;
        let jitter = 0.5 + rand::random::<f64>() * 0.5;
        self.next_connect = Instant::now() + self.backoff.mul_f64(jitter);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.fail_requests();
    }

    /// Answer waiting requests while Redis is unreachable.
    fn fail_requests(&mut self) {
        for req in self.requests.drain(..) {
            let _ = req.reply.send(Reached::Unavailable);
        }
        for reply in self.instance_requests.drain(..) {
            let _ = reply.send(Err("the registry cannot reach Redis".into()));
        }
    }

    fn conn_json(&self, rec: &ConnRecord) -> String {
        serde_json::json!({
            "connection": rec.id,
            "instance": &*self.ctx.instance,
            "shard": rec.shard,
            "remote": rec.remote.to_string(),
            "connected_at": rec.connected_at,
            "user": rec.user,
        })
        .to_string()
    }

    fn instance_json(&self) -> String {
        serde_json::json!({
            "instance": &*self.ctx.instance,
            "addr": self.ctx.addr.to_string(),
            "shards": self.ctx.shards,
            "connections": self.conns.len(),
            "started_at": self.ctx.started_at,
            "version": env!("CARGO_PKG_VERSION"),
        })
        .to_string()
    }

    /// One connected turn: writes, heartbeat, refresh, requests, orphan cleanup.
    async fn turn(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let me = self.ctx.instance.to_string();
        let conn_ttl = ms(self.ctx.timing.conn_ttl);
        let index = self.keys.index(&me);
        let users_key = self.keys.instance_users(&me);
        // The sets outlive their members' keys by long enough for a survivor to clean up.
        let set_ttl = ms(self.ctx.timing.conn_ttl + self.ctx.timing.heartbeat_ttl * 2);
        let mut cmds = BytesMut::new();
        let mut n = 0;
        // Encode one command and count the reply to expect.
        fn push(cmds: &mut BytesMut, n: &mut usize, args: &[&[u8]]) {
            resp::encode_command(cmds, args);
            *n += 1;
        }
        // Users who have no connection here any more (they leave this instance's users set).
        let mut gone_users: Vec<String> = Vec::new();

        if self.resync {
            // Delete what the index lists but we no longer have; rewrite everything we have.
            let mut q = BytesMut::new();
            resp::encode_command(&mut q, &[b"SMEMBERS", index.as_bytes()]);
            resp::encode_command(&mut q, &[b"SMEMBERS", users_key.as_bytes()]);
            let listed = self.redis()?.pipeline(q, 2).await?;
            let stale = strings(&listed[0])
                .into_iter()
                .filter(|id| !self.conns.contains_key(id))
                .map(|id| (id, String::new()));
            self.to_del.extend(stale);
            // The users' sets may list ids we no longer have (their users are unknown here):
            // keep in each set exactly this instance's ids the map gives that user.
            let mut users = strings(&listed[1]);
            gone_users.extend(
                users
                    .iter()
                    .filter(|u| !self.user_counts.contains_key(*u))
                    .cloned(),
            );
            users.extend(self.user_counts.keys().cloned());
            users.sort_unstable();
            users.dedup();
            let conns = &self.conns;
            let redis = self.redis.as_mut().ok_or_else(not_connected)?;
            purge_user_sets(redis, &self.keys, &me, &users, |user, id| {
                conns.get(id).is_some_and(|r| r.user == user)
            })
            .await?;
            self.to_set = self.conns.keys().cloned().collect();
            self.written.clear();
            self.resync = false;
        }

        self.last_turn_events = self.to_del.len() + self.to_set.len();
        // Deletions first (an id reconnecting after a drop is re-added below).
        let dels = std::mem::take(&mut self.to_del);
        let del_ids: Vec<&str> = dels.iter().map(|(id, _)| id.as_str()).collect();
        n += encode_conn_deletes(&mut cmds, &self.keys, &del_ids);
        for chunk in del_ids.chunks(CHUNK) {
            let mut args: Vec<&[u8]> = vec![b"SREM", index.as_bytes()];
            args.extend(chunk.iter().map(|id| id.as_bytes()));
            push(&mut cmds, &mut n, &args);
        }
        let by_user = group_by_user(dels.iter().map(|(id, user)| (user.as_str(), id.as_str())));
        for (user, ids) in &by_user {
            let key = self.keys.user(user);
            for chunk in ids.chunks(CHUNK) {
                let mut args: Vec<&[u8]> = vec![b"SREM", key.as_bytes()];
                args.extend(chunk.iter().map(|id| id.as_bytes()));
                push(&mut cmds, &mut n, &args);
            }
            if !self.user_counts.contains_key(*user) {
                gone_users.push(user.to_string());
            }
        }
        gone_users.sort_unstable();
        gone_users.dedup();
        for chunk in gone_users.chunks(CHUNK) {
            let mut args: Vec<&[u8]> = vec![b"SREM", users_key.as_bytes()];
            args.extend(chunk.iter().map(|u| u.as_bytes()));
            push(&mut cmds, &mut n, &args);
        }

        // New connections, then refreshes of those written half a TTL ago.
        let mut sets = std::mem::take(&mut self.to_set);
        let half = self.ctx.timing.conn_ttl / 2;
        while let Some((at, _)) = self.written.front() {
            if now.duration_since(*at) < half {
                break;
            }
            let (_, id) = self.written.pop_front().expect("front exists");
            sets.push(id);
        }
        sets.retain(|id| self.conns.contains_key(id));
        sets.sort_unstable();
        sets.dedup();
        for chunk in sets.chunks(CHUNK) {
            for id in chunk {
                let key = self.keys.conn(id);
                let json = self.conn_json(&self.conns[id]);
                push(
                    &mut cmds,
                    &mut n,
                    &[
                        b"SET",
                        key.as_bytes(),
                        json.as_bytes(),
                        b"PX",
                        conn_ttl.as_bytes(),
                    ],
                );
            }
            let mut args: Vec<&[u8]> = vec![b"SADD", index.as_bytes()];
            args.extend(chunk.iter().map(|id| id.as_bytes()));
            push(&mut cmds, &mut n, &args);
        }
        // Each user's set gets its ids (again, on a refresh) and a renewed TTL; this instance's
        // users set lists the users.
        let by_user = group_by_user(
            sets.iter()
                .map(|id| (self.conns[id].user.as_str(), id.as_str())),
        );
        for (user, ids) in &by_user {
            let key = self.keys.user(user);
            for chunk in ids.chunks(CHUNK) {
                let mut args: Vec<&[u8]> = vec![b"SADD", key.as_bytes()];
                args.extend(chunk.iter().map(|id| id.as_bytes()));
                push(&mut cmds, &mut n, &args);
            }
            push(
                &mut cmds,
                &mut n,
                &[b"PEXPIRE", key.as_bytes(), set_ttl.as_bytes()],
            );
        }
        let users: Vec<&str> = by_user.keys().copied().collect();
        for chunk in users.chunks(CHUNK) {
            let mut args: Vec<&[u8]> = vec![b"SADD", users_key.as_bytes()];
            args.extend(chunk.iter().map(|u| u.as_bytes()));
            push(&mut cmds, &mut n, &args);
        }
        for id in sets {
            self.written.push_back((now, id));
        }

        // Heartbeat.
        let heartbeat = now >= self.next_heartbeat;
        let mut joined_reply = None;
        if heartbeat {
            let key = self.keys.instance(&me);
            let json = self.instance_json();
            let ttl = ms(self.ctx.timing.heartbeat_ttl);
            push(
                &mut cmds,
                &mut n,
                &[
                    b"SET",
                    key.as_bytes(),
                    json.as_bytes(),
                    b"PX",
                    ttl.as_bytes(),
                ],
            );
            let set = self.keys.instances();
            joined_reply = Some(n);
            push(&mut cmds, &mut n, &[b"SADD", set.as_bytes(), me.as_bytes()]);
            // The index and the users set outlive this instance by long enough for a survivor
            // to clean up.
            for key in [&index, &users_key] {
                push(
                    &mut cmds,
                    &mut n,
                    &[b"PEXPIRE", key.as_bytes(), set_ttl.as_bytes()],
                );
            }
            self.next_heartbeat = now + self.ctx.timing.heartbeat_interval;
        }

        if n > 0 {
            let replies = self.redis()?.pipeline(cmds, n).await?;
            if let Some(Frame::Error(e)) = replies.iter().find(|f| matches!(f, Frame::Error(_))) {
                tracing::warn!(error = %String::from_utf8_lossy(e), "Redis refused a registry write");
            }
            // Re-joining the instance set after the first heartbeat means another instance took
            // us for dead (we were stalled past our TTL) and removed our keys: rewrite them.
            let rejoined = joined_reply.and_then(|i| replies.get(i)) == Some(&Frame::Integer(1));
            if rejoined && self.joined {
                tracing::warn!(
                    "this instance was taken for dead and cleaned up; rewriting its keys"
                );
                self.resync = true;
            }
            if joined_reply.is_some() {
                self.joined = true;
            }
        }

        self.serve_requests().await?;
        self.serve_instances().await?;
        if heartbeat {
            self.clean_up_dead_instances().await?;
        }
        Ok(())
    }

    fn redis(&mut self) -> io::Result<&mut RedisConn> {
        self.redis.as_mut().ok_or_else(not_connected)
    }

    async fn command(&mut self, args: &[&[u8]]) -> io::Result<Frame> {
        let mut cmds = BytesMut::new();
        resp::encode_command(&mut cmds, args);
        let mut replies = self.redis()?.pipeline(cmds, 1).await?;
        Ok(replies.pop().expect("one reply"))
    }

    async fn smembers(&mut self, key: &str) -> io::Result<Vec<String>> {
        let reply = self.command(&[b"SMEMBERS", key.as_bytes()]).await?;
        Ok(strings(&reply))
    }

    /// Backend requests for other instances, in at most three round trips for all of them:
    /// where the targets are (`GET` the connection's key, `SMEMBERS` the user's set), which of a
    /// user's ids are still live (`EXISTS` their keys), then one `PUBLISH` per request and target
    /// instance.
    async fn serve_requests(&mut self) -> io::Result<()> {
        if self.requests.is_empty() {
            return Ok(());
        }
        let requests = std::mem::take(&mut self.requests);
        let me = self.ctx.instance.to_string();
        let mut cmds = BytesMut::new();
        for req in &requests {
            let (verb, key): (&[u8], String) = match &req.target {
                Target::Connection(id) => (b"GET", self.keys.conn(id)),
                Target::User(user) => (b"SMEMBERS", self.keys.user(user)),
            };
            resp::encode_command(&mut cmds, &[verb, key.as_bytes()]);
        }
        let found = self.redis()?.pipeline(cmds, requests.len()).await?;

        // Per request: the instances to publish to, each with its number of connections (None:
        // a connection that is not in the registry).
        let mut plans: Vec<Option<Vec<(String, usize)>>> = Vec::with_capacity(requests.len());
        // A user's ids on other instances, as (request, instance), in the order checked.
        let mut candidates: Vec<(usize, String)> = Vec::new();
        let mut cmds = BytesMut::new();
        for (i, (req, reply)) in requests.iter().zip(&found).enumerate() {
            match &req.target {
                Target::Connection(_) => {
                    let instance = match reply {
                        Frame::Bulk(json) => serde_json::from_slice::<serde_json::Value>(json)
                            .ok()
                            .and_then(|v| v["instance"].as_str().map(str::to_owned)),
                        _ => None,
                    };
                    plans.push(instance.map(|inst| vec![(inst, 1)]));
                }
                Target::User(_) => {
                    for id in strings(reply) {
                        let Some((instance, ..)) = parse_conn_id(&id) else {
                            continue;
                        };
                        if instance == me {
                            continue; // the caller reaches these through the shards
                        }
                        candidates.push((i, instance.to_owned()));
                        resp::encode_command(
                            &mut cmds,
                            &[b"EXISTS", self.keys.conn(&id).as_bytes()],
                        );
                    }
                    plans.push(Some(Vec::new()));
                }
            }
        }
        if !candidates.is_empty() {
            let live = self.redis()?.pipeline(cmds, candidates.len()).await?;
            for ((i, instance), exists) in candidates.into_iter().zip(live) {
                if exists != Frame::Integer(1) {
                    continue; // expired or deleted: the set is behind
                }
                let plan = plans[i].as_mut().expect("a user's plan exists");
                match plan.iter_mut().find(|(inst, _)| *inst == instance) {
                    Some((_, n)) => *n += 1,
                    None => plan.push((instance, 1)),
                }
            }
        }

        let mut cmds = BytesMut::new();
        let mut published = 0;
        for (req, plan) in requests.iter().zip(&plans) {
            let Some(plan) = plan else { continue };
            let payload = InboxMsg {
                target: req.target.clone(),
                action: req.action.clone(),
            }
            .encode();
            for (instance, _) in plan {
                let channel = self.keys.inbox(instance);
                resp::encode_command(
                    &mut cmds,
                    &[b"PUBLISH", channel.as_bytes(), payload.as_bytes()],
                );
                published += 1;
            }
        }
        let mut receivers = if published > 0 {
            self.redis()?.pipeline(cmds, published).await?.into_iter()
        } else {
            Vec::new().into_iter()
        };
        for (req, plan) in requests.into_iter().zip(plans) {
            let outcome = match plan {
                None => Reached::NotFound,
                Some(plan) => {
                    // Count only instances that are listening (a dead one has no subscriber).
                    let reached: usize = plan
                        .iter()
                        .map(|(_, n)| match receivers.next() {
                            Some(Frame::Integer(r)) if r > 0 => *n,
                            _ => 0,
                        })
                        .sum();
                    match req.target {
                        Target::Connection(_) if reached == 0 => Reached::NotFound,
                        _ => Reached::Connections(reached),
                    }
                }
            };
            let _ = req.reply.send(outcome);
        }
        Ok(())
    }

    /// `GET /instances`: the live instances' JSON, as a JSON array.
    async fn serve_instances(&mut self) -> io::Result<()> {
        if self.instance_requests.is_empty() {
            return Ok(());
        }
        let keys = self.keys.clone();
        let json = live_instances(self.redis()?, &keys).await?;
        for reply in self.instance_requests.drain(..) {
            let _ = reply.send(Ok(json.clone()));
        }
        Ok(())
    }

    /// Remove the keys of instances whose heartbeat expired. A `SET NX` lock per dead instance
    /// makes sure only one live instance does it.
    async fn clean_up_dead_instances(&mut self) -> io::Result<()> {
        let me = self.ctx.instance.to_string();
        let all = self.smembers(&self.keys.instances()).await?;
        let others: Vec<String> = all.into_iter().filter(|id| *id != me).collect();
        if others.is_empty() {
            return Ok(());
        }
        let mut cmds = BytesMut::new();
        for id in &others {
            resp::encode_command(&mut cmds, &[b"EXISTS", self.keys.instance(id).as_bytes()]);
        }
        let alive = self.redis()?.pipeline(cmds, others.len()).await?;
        for (id, a) in others.iter().zip(alive) {
            if a != Frame::Integer(0) {
                continue;
            }
            let lock = self.keys.cleanup_lock(id);
            let got = self
                .command(&[
                    b"SET",
                    lock.as_bytes(),
                    me.as_bytes(),
                    b"NX",
                    b"PX",
                    b"60000",
                ])
                .await?;
            if !matches!(got, Frame::Simple(_)) {
                continue; // another instance is on it
            }
            let index = self.keys.index(id);
            let members = self.smembers(&index).await?;
            // Its ids leave its users' sets, found from its users set (not from its connection
            // keys, which may have expired already).
            let users_key = self.keys.instance_users(id);
            let users = self.smembers(&users_key).await?;
            let redis = self.redis.as_mut().ok_or_else(not_connected)?;
            purge_user_sets(redis, &self.keys, id, &users, |_, _| false).await?;
            let mut cmds = BytesMut::new();
            let mut n = encode_conn_deletes(&mut cmds, &self.keys, &members);
            resp::encode_command(&mut cmds, &[b"DEL", users_key.as_bytes()]);
            n += 1;
            resp::encode_command(&mut cmds, &[b"DEL", index.as_bytes()]);
            resp::encode_command(
                &mut cmds,
                &[b"SREM", self.keys.instances().as_bytes(), id.as_bytes()],
            );
            n += 2;
            self.redis()?.pipeline(cmds, n).await?;
            tracing::info!(instance = %id, connections = members.len(), users = users.len(), "removed the registry keys of a dead instance");
        }
        Ok(())
    }

    /// Graceful shutdown: delete every key of this instance (bounded in time).
    async fn final_cleanup(&mut self) {
        let work = async {
            if self.redis.is_none() {
                self.connect().await;
            }
            let me = self.ctx.instance.to_string();
            let index = self.keys.index(&me);
            let mut ids: HashSet<String> = self.smembers(&index).await?.into_iter().collect();
            ids.extend(self.conns.keys().cloned());
            let users_key = self.keys.instance_users(&me);
            let mut users: HashSet<String> = self.smembers(&users_key).await?.into_iter().collect();
            users.extend(self.user_counts.keys().cloned());
            for (id, user) in self.to_del.drain(..) {
                ids.insert(id);
                if !user.is_empty() {
                    users.insert(user);
                }
            }
            let ids: Vec<String> = ids.into_iter().collect();
            let users: Vec<String> = users.into_iter().collect();
            let redis = self.redis.as_mut().ok_or_else(not_connected)?;
            purge_user_sets(redis, &self.keys, &me, &users, |_, _| false).await?;
            let mut cmds = BytesMut::new();
            let mut n = encode_conn_deletes(&mut cmds, &self.keys, &ids);
            resp::encode_command(&mut cmds, &[b"DEL", users_key.as_bytes()]);
            n += 1;
            let instance_key = self.keys.instance(&me);
            resp::encode_command(
                &mut cmds,
                &[b"DEL", index.as_bytes(), instance_key.as_bytes()],
            );
            resp::encode_command(
                &mut cmds,
                &[b"SREM", self.keys.instances().as_bytes(), me.as_bytes()],
            );
            n += 2;
            self.redis()?.pipeline(cmds, n).await?;
            Ok::<usize, io::Error>(ids.len())
        };
        match monoio::time::timeout(SHUTDOWN_BUDGET, work).await {
            Ok(Ok(count)) => tracing::info!(
                connections = count,
                "registry keys of this instance removed"
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not remove this instance's registry keys; they expire with their TTLs")
            }
            Err(_) => tracing::warn!(
                "removing this instance's registry keys timed out; they expire with their TTLs"
            ),
        }
        self.fail_requests();
    }
}

/// Split a connection id `<instance>-<shard>-<key>-<seq>` into its parts.
pub fn parse_conn_id(id: &str) -> Option<(&str, usize, usize, u64)> {
    let mut parts = id.rsplitn(4, '-');
    let seq = parts.next()?.parse().ok()?;
    let key = parts.next()?.parse().ok()?;
    let shard = parts.next()?.parse().ok()?;
    let instance = parts.next()?;
    if instance.is_empty() {
        return None;
    }
    Some((instance, shard, key, seq))
}

/// Encode `DEL` of the connection keys of `ids`, [`CHUNK`] keys per command. Returns the number
/// of commands (replies to expect).
fn encode_conn_deletes<S: AsRef<str>>(cmds: &mut BytesMut, keys: &Keys, ids: &[S]) -> usize {
    let mut n = 0;
    for chunk in ids.chunks(CHUNK) {
        let names: Vec<String> = chunk.iter().map(|id| keys.conn(id.as_ref())).collect();
        let mut args: Vec<&[u8]> = vec![b"DEL"];
        args.extend(names.iter().map(|k| k.as_bytes()));
        resp::encode_command(cmds, &args);
        n += 1;
    }
    n
}

/// (user, id) pairs grouped by user, anonymous ones (`""`) left out.
fn group_by_user<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<&'a str, Vec<&'a str>> {
    let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (user, id) in pairs {
        if !user.is_empty() {
            out.entry(user).or_default().push(id);
        }
    }
    out
}

/// The members of a user's set that belong to `instance` and are not to be kept.
fn stale_members<'a>(
    members: &'a [String],
    instance: &str,
    user: &str,
    keep: &impl Fn(&str, &str) -> bool,
) -> Vec<&'a str> {
    members
        .iter()
        .filter(|id| parse_conn_id(id).is_some_and(|(inst, ..)| inst == instance))
        .filter(|id| !keep(user, id))
        .map(String::as_str)
        .collect()
}

/// Remove `instance`'s connection ids from the sets of `users`, except those `keep(user, id)`
/// says are live: `SMEMBERS` of every set in one pipeline, then the `SREM`s in another. The
/// owner of an id is read from the id itself (`<instance>-…`), so this works after the
/// connection keys expired. Returns how many ids were removed.
async fn purge_user_sets(
    redis: &mut RedisConn,
    keys: &Keys,
    instance: &str,
    users: &[String],
    keep: impl Fn(&str, &str) -> bool,
) -> io::Result<usize> {
    if users.is_empty() {
        return Ok(0);
    }
    let mut cmds = BytesMut::new();
    for user in users {
        resp::encode_command(&mut cmds, &[b"SMEMBERS", keys.user(user).as_bytes()]);
    }
    let sets = redis.pipeline(cmds, users.len()).await?;
    let mut cmds = BytesMut::new();
    let mut n = 0;
    let mut removed = 0;
    for (user, set) in users.iter().zip(&sets) {
        let members = strings(set);
        let stale = stale_members(&members, instance, user, &keep);
        removed += stale.len();
        let key = keys.user(user);
        for chunk in stale.chunks(CHUNK) {
            let mut args: Vec<&[u8]> = vec![b"SREM", key.as_bytes()];
            args.extend(chunk.iter().map(|id| id.as_bytes()));
            resp::encode_command(&mut cmds, &args);
            n += 1;
        }
    }
    if n > 0 {
        redis.pipeline(cmds, n).await?;
    }
    Ok(removed)
}

fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "not connected")
}

/// Bulk/simple strings of an array reply.
fn strings(reply: &Frame) -> Vec<String> {
    match reply {
        Frame::Array(items) | Frame::Set(items) => items
            .iter()
            .filter_map(|f| match f {
                Frame::Bulk(b) | Frame::Simple(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The JSON array of live instances (those in the instance set whose heartbeat key exists).
pub async fn live_instances(redis: &mut RedisConn, keys: &Keys) -> io::Result<String> {
    let mut cmds = BytesMut::new();
    resp::encode_command(&mut cmds, &[b"SMEMBERS", keys.instances().as_bytes()]);
    let ids = strings(&redis.pipeline(cmds, 1).await?[0]);
    if ids.is_empty() {
        return Ok("[]".into());
    }
    let instance_keys: Vec<String> = ids.iter().map(|id| keys.instance(id)).collect();
    let mut args: Vec<&[u8]> = vec![b"MGET"];
    args.extend(instance_keys.iter().map(|k| k.as_bytes()));
    let mut cmds = BytesMut::new();
    resp::encode_command(&mut cmds, &args);
    let values = redis.pipeline(cmds, 1).await?;
    let mut list: Vec<serde_json::Value> = match &values[0] {
        Frame::Array(items) => items
            .iter()
            .filter_map(|f| match f {
                Frame::Bulk(b) => serde_json::from_slice(b).ok(),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    list.sort_by(|a, b| a["instance"].as_str().cmp(&b["instance"].as_str()));
    Ok(serde_json::Value::Array(list).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_parse() {
        assert_eq!(parse_conn_id("ab12-1-7-42"), Some(("ab12", 1, 7, 42)));
        assert_eq!(parse_conn_id("my-host-0-3-9"), Some(("my-host", 0, 3, 9)));
        assert_eq!(parse_conn_id("ab12-1-7"), None);
        assert_eq!(parse_conn_id("-1-2-3"), None);
        assert_eq!(parse_conn_id("a-x-2-3"), None);
    }

    #[test]
    fn key_names_follow_the_prefix() {
        let k = Keys::new("ws:");
        assert_eq!(k.conn("a-0-1-2"), "ws:conn:a-0-1-2");
        assert_eq!(k.instance("a"), "ws:instance:a");
        assert_eq!(k.index("a"), "ws:instance:a:conns");
        assert_eq!(k.instances(), "ws:instances");
        assert_eq!(k.inbox("a"), "ws:inbox:a");
        assert_eq!(k.user("42"), "ws:user:42");
        assert_eq!(k.instance_users("a"), "ws:instance:a:users");
        assert_eq!(Keys::new("x/").conn("c"), "x/conn:c");
    }

    fn send(target: Target, data: &str) -> InboxMsg {
        InboxMsg {
            target,
            action: Action::Send(data.into()),
        }
    }

    #[test]
    fn inbox_payloads_are_json_with_the_data_verbatim() {
        let conn = Target::Connection("i-0-1-2".into());
        let p = send(conn.clone(), r#"{"a":[1,2.50]}"#).encode();
        assert_eq!(p, r#"{"connection":"i-0-1-2","data":{"a":[1,2.50]}}"#);
        let p = send(Target::User("42".into()), "null").encode();
        assert_eq!(p, r#"{"user":"42","data":null}"#);
        let bye = Action::Disconnect {
            code: 4100,
            reason: "bye \"now\"".into(),
        };
        let p = InboxMsg {
            target: conn,
            action: bye.clone(),
        }
        .encode();
        assert_eq!(
            p,
            r#"{"connection":"i-0-1-2","disconnect":true,"code":4100,"reason":"bye \"now\""}"#
        );
        let p = InboxMsg {
            target: Target::User("u\"1".into()),
            action: bye,
        }
        .encode();
        assert_eq!(
            p,
            r#"{"user":"u\"1","disconnect":true,"code":4100,"reason":"bye \"now\""}"#
        );
    }

    #[test]
    fn inbox_payloads_round_trip() {
        let msgs = [
            send(
                Target::Connection("a-0-1-2".into()),
                r#"{"x":[1,2.50,"é"]}"#,
            ),
            send(Target::User("42".into()), "null"),
            send(Target::User("ü:{tag}".into()), r#""text""#),
            InboxMsg {
                target: Target::Connection("q\"x-0-1-2".into()),
                action: Action::Disconnect {
                    code: 4004,
                    reason: "disconnected by the server".into(),
                },
            },
            InboxMsg {
                target: Target::User("42".into()),
                action: Action::Disconnect {
                    code: 4999,
                    reason: "r".repeat(MAX_REASON),
                },
            },
        ];
        for m in msgs {
            assert_eq!(
                InboxMsg::decode(m.encode().as_bytes()),
                Ok(m.clone()),
                "{m:?}"
            );
        }
    }

    #[test]
    fn inbox_payloads_from_backends_get_defaults_and_are_checked() {
        let m = InboxMsg::decode(br#"{"user":"7","disconnect":true}"#).unwrap();
        assert_eq!(m.target, Target::User("7".into()));
        assert_eq!(
            m.action,
            Action::Disconnect {
                code: crate::auth::close::DISCONNECTED,
                reason: DEFAULT_REASON.into()
            }
        );
        // The payload the hub has always accepted.
        let m = InboxMsg::decode(br#"{"connection":"a-0-1-2","data":{"k":1}}"#).unwrap();
        assert_eq!(m.action, Action::Send(r#"{"k":1}"#.into()));
        let long = format!(
            r#"{{"user":"7","disconnect":true,"reason":"{}"}}"#,
            "r".repeat(MAX_REASON + 1)
        );
        for bad in [
            "not json",
            r#"{"data":1}"#,
            r#"{"connection":"a-0-1-2","user":"7","data":1}"#,
            r#"{"user":"","data":1}"#,
            r#"{"user":7,"data":1}"#,
            r#"{"user":"7"}"#,
            r#"{"user":"7","disconnect":false}"#,
            r#"{"user":"7","data":1,"disconnect":true}"#,
            r#"{"user":"7","disconnect":true,"code":1000}"#,
            r#"{"user":"7","disconnect":true,"code":5000}"#,
            r#"{"user":"7","disconnect":true,"code":-1}"#,
            r#"{"user":"7","disconnect":true,"code":4100.5}"#,
            &long,
        ] {
            assert!(InboxMsg::decode(bad.as_bytes()).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn disconnect_limits() {
        assert!(Action::disconnect(Some(4000), Some("")).is_ok());
        assert!(Action::disconnect(Some(4999), None).is_ok());
        assert!(Action::disconnect(Some(3999), None).is_err());
        assert!(Action::disconnect(Some(1000), None).is_err());
        // 123 bytes of UTF-8 fit (61 two-byte characters and one byte), 124 do not.
        let fits = format!("{}x", "é".repeat(61));
        assert_eq!(fits.len(), MAX_REASON);
        assert!(Action::disconnect(None, Some(&fits)).is_ok());
        assert!(Action::disconnect(None, Some(&format!("{fits}x"))).is_err());
    }

    #[test]
    fn stale_members_are_the_instances_own_ids_not_kept() {
        let members: Vec<String> = ["ab-0-1-1", "ab-1-0-3-4", "ab-1-2-5", "cd-0-0-1", "junk"]
            .into_iter()
            .map(String::from)
            .collect();
        // "ab-1-0-3-4" belongs to instance "ab-1", not "ab".
        let none = |_: &str, _: &str| false;
        assert_eq!(
            stale_members(&members, "ab", "u", &none),
            ["ab-0-1-1", "ab-1-2-5"]
        );
        assert_eq!(stale_members(&members, "ab-1", "u", &none), ["ab-1-0-3-4"]);
        let keep = |user: &str, id: &str| user == "u" && id == "ab-1-2-5";
        assert_eq!(stale_members(&members, "ab", "u", &keep), ["ab-0-1-1"]);
        assert_eq!(
            stale_members(&members, "ab", "v", &keep),
            ["ab-0-1-1", "ab-1-2-5"]
        );
    }

    #[test]
    fn grouping_by_user_leaves_anonymous_out() {
        let pairs = [
            ("u", "a-0-0-1"),
            ("", "a-0-0-2"),
            ("v", "a-0-0-3"),
            ("u", "a-1-0-4"),
        ];
        let g = group_by_user(pairs.into_iter());
        assert_eq!(g.len(), 2);
        assert_eq!(g["u"], ["a-0-0-1", "a-1-0-4"]);
        assert_eq!(g["v"], ["a-0-0-3"]);
    }

    #[test]
    fn request_fields_name_exactly_one_target() {
        let f = |body: &str| -> Result<Target, String> {
            let f: Fields = serde_json::from_str(body).map_err(|e| e.to_string())?;
            f.target().map_err(String::from)
        };
        assert_eq!(f(r#"{"user":"42"}"#), Ok(Target::User("42".into())));
        assert_eq!(
            f(r#"{"connection":"a-0-1-2"}"#),
            Ok(Target::Connection("a-0-1-2".into()))
        );
        assert!(f(r#"{}"#).is_err());
        assert!(f(r#"{"user":""}"#).is_err());
        assert!(f(r#"{"user":"1","connection":"a-0-1-2"}"#).is_err());
        let d: Fields = serde_json::from_str(r#"{"user":"1","data":null}"#).unwrap();
        assert_eq!(d.data.map(|r| r.get()), Some("null"), "null is data");
    }

    #[test]
    fn a_full_queue_counts_dropped_bookkeeping_but_hands_requests_back() {
        let q = RegistryQueue::new(1);
        q.push(RegEvent::Unregister("a".into())).unwrap();
        assert!(q.push(RegEvent::Unregister("b".into())).is_err());
        assert_eq!(q.dropped(), 1);
        let (tx, _rx) = futures_channel::oneshot::channel();
        let back = q.push(RegEvent::Instances(tx));
        assert!(matches!(back, Err(RegEvent::Instances(_))));
        assert_eq!(q.dropped(), 1, "requests are not bookkeeping drops");
    }
}
