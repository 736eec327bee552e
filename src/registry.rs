//! The connection registry and instance heartbeats (Redis mode), on a dedicated core.
//!
//! Shards never talk to Redis for bookkeeping and never wait on it: they push [`RegEvent`]s into
//! a bounded [`RegistryQueue`] (one atomic swap per connect/disconnect, never per message). If the
//! queue is full the shard counts a drop and moves on; the registry notices the drop counter moved
//! and repairs itself with a full refresh: it asks every shard for a snapshot of its connections
//! (through the shards' inboxes), rebuilds its map, deletes keys that should not exist (from this
//! instance's index set) and rewrites every key that should.
//!
//! Keys (prefix `ws:` by default):
//! - `ws:instance:<id>` — `{"instance","addr","shards","connections","started_at","version"}`,
//!   written every heartbeat interval with the heartbeat TTL;
//! - `ws:conn:<connection>` — `{"connection","instance","shard","remote","connected_at"}`, written
//!   with the connection TTL and rewritten when half of it has passed, deleted on close;
//! - `ws:instance:<id>:conns` — the set of this instance's connection ids (the per-instance
//!   index: a live instance cleans up a dead one's keys from it, never scanning the keyspace);
//! - `ws:instances` — the set of instance ids ever alive and not yet cleaned up;
//! - `ws:cleanup:<id>` — a short-lived lock (SET NX EX) so two live instances do not clean up the
//!   same dead instance at once.
//!
//! Every write is batched: each turn of the registry loop drains everything queued and sends it
//! as one pipeline (one round trip), so 10,000 connections arriving in a second cost a handful of
//! round trips. Refresh cost grows linearly with connections (one SET per connection per half TTL,
//! spread over time in arrival order, pipelined).
//!
//! While Redis is unreachable the registry keeps its in-memory map current and reconnects with
//! backoff; on reconnect it does the full refresh. Graceful shutdown deletes every key of this
//! instance before the process exits.

use crate::config::RedisConfig;
use crate::inbox::{Inbox, ShardMsg, Wakeup};
use crate::redis::RedisConn;
use crate::resp::{self, Frame};
use bytes::BytesMut;
use crossbeam_queue::ArrayQueue;
use futures_util::future::{select, Either};
use std::collections::{HashMap, HashSet, VecDeque};
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

/// Outcome of a targeted send to a connection on another instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Published to the instance's inbox.
    Sent,
    /// No such connection in the registry (or its instance is gone).
    NotFound,
    /// Redis is unreachable.
    Unavailable,
}

/// What shards and HTTP handlers ask of the registry.
#[derive(Debug)]
pub enum RegEvent {
    Register(ConnRecord),
    Unregister(String),
    /// `POST /send` to a connection of another instance: look it up and publish to its inbox.
    Send {
        connection: String,
        /// JSON text of `data`.
        data: String,
        reply: futures_channel::oneshot::Sender<SendOutcome>,
    },
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
    /// Ids to write (new, or everything after a resync).
    to_set: Vec<String>,
    /// Ids to delete.
    to_del: Vec<String>,
    /// (when written, id), oldest first: drives the TTL refresh.
    written: VecDeque<(Instant, String)>,
    sends: Vec<(
        String,
        String,
        futures_channel::oneshot::Sender<SendOutcome>,
    )>,
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
            to_set: Vec::new(),
            to_del: Vec::new(),
            written: VecDeque::new(),
            sends: Vec::new(),
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
                    self.conns.insert(rec.id.clone(), rec);
                }
                RegEvent::Unregister(id) => {
                    self.conns.remove(&id);
                    self.to_del.push(id);
                }
                RegEvent::Send {
                    connection,
                    data,
                    reply,
                } => self.sends.push((connection, data, reply)),
                RegEvent::Instances(reply) => self.instance_requests.push(reply),
                RegEvent::Shutdown => self.shutdown = true,
            }
        }
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
        self.conns = fresh;
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
        for (_, _, reply) in self.sends.drain(..) {
            let _ = reply.send(SendOutcome::Unavailable);
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
        let mut cmds = BytesMut::new();
        let mut n = 0;
        // Encode one command and count the reply to expect.
        fn push(cmds: &mut BytesMut, n: &mut usize, args: &[&[u8]]) {
            resp::encode_command(cmds, args);
            *n += 1;
        }

        if self.resync {
            // Delete what the index lists but we no longer have; rewrite everything we have.
            let members = self.smembers(&index).await?;
            let stale: Vec<String> = members
                .into_iter()
                .filter(|id| !self.conns.contains_key(id))
                .collect();
            self.to_del.extend(stale);
            self.to_set = self.conns.keys().cloned().collect();
            self.written.clear();
            self.resync = false;
        }

        self.last_turn_events = self.to_del.len() + self.to_set.len();
        // Deletions first (an id reconnecting after a drop is re-added below).
        let dels = std::mem::take(&mut self.to_del);
        n += encode_conn_deletes(&mut cmds, &self.keys, &dels);
        for chunk in dels.chunks(CHUNK) {
            let mut args: Vec<&[u8]> = vec![b"SREM", index.as_bytes()];
            args.extend(chunk.iter().map(|id| id.as_bytes()));
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
            // The index outlives this instance by long enough for a survivor to clean up.
            let index_ttl = ms(self.ctx.timing.conn_ttl + self.ctx.timing.heartbeat_ttl * 2);
            push(
                &mut cmds,
                &mut n,
                &[b"PEXPIRE", index.as_bytes(), index_ttl.as_bytes()],
            );
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

        self.serve_sends().await?;
        self.serve_instances().await?;
        if heartbeat {
            self.clean_up_dead_instances().await?;
        }
        Ok(())
    }

    fn redis(&mut self) -> io::Result<&mut RedisConn> {
        self.redis
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "not connected"))
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

    /// Targeted sends: look every connection up (one pipeline), publish to the inboxes (one more).
    async fn serve_sends(&mut self) -> io::Result<()> {
        if self.sends.is_empty() {
            return Ok(());
        }
        let sends = std::mem::take(&mut self.sends);
        let mut cmds = BytesMut::new();
        for (conn, _, _) in &sends {
            resp::encode_command(&mut cmds, &[b"GET", self.keys.conn(conn).as_bytes()]);
        }
        let found = self.redis()?.pipeline(cmds, sends.len()).await?;
        let mut cmds = BytesMut::new();
        let mut publishing = Vec::new();
        for ((conn, data, reply), rec) in sends.into_iter().zip(found) {
            let instance = match &rec {
                Frame::Bulk(json) => serde_json::from_slice::<serde_json::Value>(json)
                    .ok()
                    .and_then(|v| v["instance"].as_str().map(str::to_owned)),
                _ => None,
            };
            let Some(instance) = instance else {
                let _ = reply.send(SendOutcome::NotFound);
                continue;
            };
            let payload = inbox_payload(&conn, &data);
            let channel = self.keys.inbox(&instance);
            resp::encode_command(
                &mut cmds,
                &[b"PUBLISH", channel.as_bytes(), payload.as_bytes()],
            );
            publishing.push(reply);
        }
        if publishing.is_empty() {
            return Ok(());
        }
        let n = publishing.len();
        let receivers = self.redis()?.pipeline(cmds, n).await?;
        for (reply, r) in publishing.into_iter().zip(receivers) {
            let outcome = match r {
                Frame::Integer(n) if n > 0 => SendOutcome::Sent,
                _ => SendOutcome::NotFound,
            };
            let _ = reply.send(outcome);
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
            let mut cmds = BytesMut::new();
            let mut n = encode_conn_deletes(&mut cmds, &self.keys, &members);
            resp::encode_command(&mut cmds, &[b"DEL", index.as_bytes()]);
            resp::encode_command(
                &mut cmds,
                &[b"SREM", self.keys.instances().as_bytes(), id.as_bytes()],
            );
            n += 2;
            self.redis()?.pipeline(cmds, n).await?;
            tracing::info!(instance = %id, connections = members.len(), "removed the registry keys of a dead instance");
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
            ids.extend(self.to_del.drain(..));
            let ids: Vec<String> = ids.into_iter().collect();
            let mut cmds = BytesMut::new();
            let mut n = encode_conn_deletes(&mut cmds, &self.keys, &ids);
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
fn encode_conn_deletes(cmds: &mut BytesMut, keys: &Keys, ids: &[String]) -> usize {
    let mut n = 0;
    for chunk in ids.chunks(CHUNK) {
        let names: Vec<String> = chunk.iter().map(|id| keys.conn(id)).collect();
        let mut args: Vec<&[u8]> = vec![b"DEL"];
        args.extend(names.iter().map(|k| k.as_bytes()));
        resp::encode_command(cmds, &args);
        n += 1;
    }
    n
}

/// The inbox payload for a targeted send: `{"connection":"<id>","data":<JSON>}`.
pub fn inbox_payload(connection: &str, data: &str) -> String {
    let mut out = String::with_capacity(connection.len() + data.len() + 32);
    out.push_str("{\"connection\":");
    out.push_str(&serde_json::Value::String(connection.to_owned()).to_string());
    out.push_str(",\"data\":");
    out.push_str(data);
    out.push('}');
    out
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
        assert_eq!(Keys::new("x/").conn("c"), "x/conn:c");
    }

    #[test]
    fn inbox_payload_is_json_with_the_data_verbatim() {
        let p = inbox_payload("i-0-1-2", r#"{"a":[1,2.50]}"#);
        assert_eq!(p, r#"{"connection":"i-0-1-2","data":{"a":[1,2.50]}}"#);
        let v: serde_json::Value = serde_json::from_str(&inbox_payload("q\"x", "null")).unwrap();
        assert_eq!(v["connection"], "q\"x");
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
