//! One hub shard: everything one core owns, and the per-core loops that drive it.
//!
//! A shard is a thread pinned to a core running its own monoio runtime. It owns a SO_REUSEPORT
//! listener, a slab of connections, a topic registry, a broker handle and plain counters. Nothing
//! here is shared with other threads except the shard's [`Inbox`] (and one connection counter
//! touched at connect/disconnect only).
//!
//! Tasks on a shard (all `!Send`, sharing the [`Shard`] through `Rc<RefCell<_>>`; no borrow is ever
//! held across an `.await`):
//! - the accept loop ([`accept_loop`]) spawns one task per connection (`conn.rs`);
//! - the inbox loop ([`inbox_loop`]) drains cross-shard messages;
//! - the sweep ([`sweep_loop`]) is the per-shard timer: handshake, idle, ping and close deadlines
//!   for every connection in one pass per tick — no timer per connection.
//!
//! # Hot path (read it here)
//! client publish → `conn.rs` decodes the frame → [`Shard::handle_text`] →
//! [`Shard::publish`] → broker routes to other shards → [`Shard::deliver_local`] builds the frame
//! ONCE and pushes a refcounted clone into each subscriber's outbox, marking it dirty →
//! when the current task yields, the shard's flusher ([`flush_loop`]) writes each dirty
//! connection's whole outbox with one non-blocking `sendmsg` (gather I/O straight from the
//! outbox's frames: nothing is copied, nothing stays in flight). A subscriber whose outbox passes
//! `max_queued_bytes` is cut off with 1013.

use crate::broker::{Broker, BrokerError, Route};
use crate::codec::{self, OpCode};
use crate::config::Config;
use crate::inbox::{Inbox, ShardMsg};
use crate::metrics::ShardMetrics;
use crate::protocol::{self, Command, ErrorCode};
use crate::ratelimit::{self, Bucket, PublishLimit, Verdict};
use crate::registry::{ConnRecord, RegEvent, RegistryQueue};
use crate::topics::TopicRegistry;
use bytes::{Bytes, BytesMut};
use serde_json::value::RawValue;
use slab::Slab;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

/// The shard as its tasks see it.
pub type ShardRef = Rc<RefCell<Shard>>;

/// Bookkeeping charged per queued frame on top of its length (the `Bytes` handle and deque slot),
/// so a flood of tiny frames is bounded too.
pub const FRAME_OVERHEAD: usize = 32;
/// Inbox messages handled per wake-up before other tasks get a turn.
const INBOX_BUDGET: usize = 4096;

/// Process-wide state shared by all shards: touched once per connect/disconnect, never per message.
pub struct Shared {
    /// Open sockets (HTTP and WebSocket) across all shards.
    pub connections: AtomicUsize,
    /// Upgrades beyond this get HTTP 503.
    pub max_connections: usize,
    /// Per-shard bus readiness for `GET /readyz` (always up in embedded mode).
    pub readiness: Arc<crate::redis::Readiness>,
    /// The registry's queue (Redis mode).
    pub registry: Option<Arc<RegistryQueue>>,
    /// The address the shards listen on, and when the instance started (Unix ms), for
    /// `GET /instances`.
    pub addr: SocketAddr,
    pub started_at: u64,
    /// Token verification (`[auth]`); `None` in open mode.
    pub verifier: Option<Arc<crate::auth::token::Verifier>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("connections", &self.connections)
            .field("max_connections", &self.max_connections)
            .field("addr", &self.addr)
            .field("auth", &self.verifier.is_some())
            .finish_non_exhaustive()
    }
}

/// Where a connection is in its life. The connection task and the sweep both act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted; waiting for a complete HTTP request head (or the next keep-alive request).
    /// The handshake deadline applies.
    Http,
    /// WebSocket open: messages flow both ways.
    Open,
    /// We queued a close frame and wait for the peer's; incoming data frames are discarded.
    /// The close deadline applies.
    ClosingByUs,
    /// Flush the outbox, then shut the socket (peer closed, or we failed the connection).
    /// The close deadline applies.
    FlushThenClose,
    /// The socket was shut by the sweep; the task exits as soon as it runs.
    Dead,
}

/// One connection's entry in the shard's slab: only what fan-out and the sweep need. The read
/// buffer and decoder live in the connection task itself.
#[derive(Debug)]
pub struct Conn {
    /// The socket, for `shutdown(2)` by the sweep (the task owns the stream and removes this entry
    /// before closing it, so the fd is always valid while the entry exists).
    pub fd: RawFd,
    /// Per-shard sequence number; the connection id is `<instance>-<shard>-<key>-<seq>`, so a
    /// targeted send finds the entry by key and checks the sequence (a reused key differs).
    pub seq: u64,
    /// When the connection was accepted (Unix seconds), for the registry.
    pub connected_at: u32,
    pub phase: Phase,
    /// Whether the connection became a WebSocket (counted in `connections_current`).
    pub upgraded: bool,
    /// A `subscribe` waits for the bus to confirm; the connection's further commands wait too.
    pub awaiting_ack: bool,
    /// An `/echo` connection: messages are sent back instead of parsed as commands.
    pub echo: bool,
    /// Frames waiting to be written (shared `Bytes`, so a fan-out frame exists once per shard).
    pub outbox: VecDeque<Bytes>,
    /// Bytes charged for `outbox` (frame lengths plus [`FRAME_OVERHEAD`] each).
    pub queued: usize,
    /// The connection task's waker while it waits (for input, or for a kick).
    pub waker: Option<Waker>,
    /// Set when the task must re-check its state (phase change, socket full, ack released).
    pub kick: bool,
    /// In the shard's dirty list: output queued since the last flush.
    pub dirty: bool,
    /// The front frame of the outbox was partly written: it must be finished before anything
    /// else (dropping it would corrupt the stream).
    pub front_partial: bool,
    /// The socket's send buffer was full: the connection's own task waits for writability and
    /// flushes; the flusher leaves it alone until then.
    pub write_blocked: bool,
    /// Sweep tick of the last bytes received.
    pub last_rx: u32,
    /// Sweep tick of the last ping sent.
    pub last_ping: u32,
    /// Tick at which the current phase's deadline expires (Http, ClosingByUs, FlushThenClose).
    pub deadline: u32,
    /// Publish rate limit state (16 bytes; refilled lazily when a publish arrives).
    pub publish_bucket: Bucket,
    /// Identity: `None` until the connection authenticated (auth mode), or when it is anonymous
    /// in open mode. Boxed: an idle connection pays one pointer.
    pub session: Option<Box<crate::session::Session>>,
}

/// Deadlines in sweep ticks.
#[derive(Debug, Clone, Copy)]
struct Ticks {
    period: Duration,
    idle: u32,
    ping: u32,
    handshake: u32,
    close: u32,
    shutdown: u32,
    /// Time a connection has to send `connect` (auth mode).
    pub auth: u32,
}

impl Ticks {
    fn new(cfg: &Config) -> Ticks {
        let period = cfg.tick();
        let n = |d: Duration| -> u32 {
            let t = d.as_nanos().div_ceil(period.as_nanos());
            t.clamp(1, u32::MAX as u128 / 2) as u32
        };
        Ticks {
            period,
            idle: n(cfg.idle_timeout),
            ping: n(cfg.ping_interval),
            handshake: n(cfg.handshake_timeout),
            close: n(cfg.close_timeout),
            shutdown: n(cfg.shutdown_timeout),
            auth: n(cfg
                .auth
                .as_ref()
                .map_or(Duration::from_secs(10), |a| a.auth_timeout)),
        }
    }
}

/// The outcome of writing a connection's outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Everything queued was handed to the kernel.
    Drained,
    /// The socket's send buffer is full; the rest waits for writability.
    Blocked,
    /// The socket failed (peer gone); the connection must end.
    Failed,
}

/// Frames per `sendmsg` (well under IOV_MAX).
const IOV_BATCH: usize = 512;

/// Everything one core owns.
pub struct Shard {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub instance: Arc<str>,
    pub shared: Arc<Shared>,
    pub conns: Slab<Conn>,
    pub topics: TopicRegistry,
    pub broker: Box<dyn Broker>,
    pub metrics: ShardMetrics,
    pub inbox: Arc<Inbox>,
    pub peers: Arc<[Arc<Inbox>]>,
    pub limits: codec::Limits,
    /// Sweep ticks since the shard started.
    pub tick: u32,
    ticks: Ticks,
    next_seq: u64,
    /// Set once shutdown began; the tick it began at.
    pub shutdown_at: Option<u32>,
    /// Wakes the accept loop so it stops accepting.
    pub accept_waker: Option<Waker>,
    /// Wakes the sweep early during shutdown (so the shard exits as soon as it is drained).
    sweep_waker: Option<Waker>,
    /// Connections that overflowed during the current fan-out (closed right after it).
    pub(crate) slow: Vec<usize>,
    /// Connections with output queued since the last flush.
    pub(crate) dirty: Vec<usize>,
    /// Wakes the flusher when the dirty list becomes non-empty.
    flusher_waker: Option<Waker>,
    /// Scratch iovec array for `sendmsg` (reused).
    iov: Vec<libc::iovec>,
    /// `subscribed` acks held until the bus confirms the channel's subscription.
    pending_acks: HashMap<Box<str>, Vec<PendingAck>>,
    /// `--max-publish-rate` with its burst; `None` = unlimited.
    publish_limit: Option<PublishLimit>,
    /// Connections by user (authenticated connections only), for sends and disconnects by user.
    pub users: HashMap<Box<str>, Vec<usize>>,
    /// Channel permissions, resolved from the config for this mode (auth on or off).
    pub policy: crate::auth::namespaces::Policy,
    /// Embedded mode: the histories of the channels this shard owns.
    pub history: crate::history::Store,
    /// Last (epoch, offset) delivered on each history channel this shard serves.
    pub positions: HashMap<Box<str>, (Arc<str>, u64)>,
    /// Connections joining a history channel's live stream (see `recovery.rs`).
    pub holds: HashMap<usize, Vec<crate::recovery::Hold>>,
    /// History subscribes waiting for the bus to confirm their channel.
    pub(crate) pending_history: HashMap<Box<str>, Vec<crate::recovery::PendingSubscribe>>,
    /// The shard's own handle, for the few cold-path tasks it spawns (a `connect` waiting for
    /// the JWKS). Set right after construction.
    pub this: std::rc::Weak<RefCell<Shard>>,
}

/// A client's `subscribe` acknowledgement waiting for the bus.
#[derive(Debug)]
struct PendingAck {
    key: usize,
    /// Guards against a slab key reused by a newer connection.
    seq: u64,
    id: Option<Box<RawValue>>,
}

impl Shard {
    pub fn new(
        id: usize,
        cfg: Arc<Config>,
        instance: Arc<str>,
        shared: Arc<Shared>,
        inbox: Arc<Inbox>,
        peers: Arc<[Arc<Inbox>]>,
        broker: Box<dyn Broker>,
    ) -> Shard {
        let publish_limit = PublishLimit::new(cfg.max_publish_rate, cfg.publish_burst_limit());
        let policy = crate::auth::namespaces::Policy::new(&cfg.namespaces, cfg.auth.is_some());
        let limits = codec::Limits {
            max_frame_size: cfg.max_message_size,
            max_message_size: cfg.max_message_size,
        };
        Shard {
            id,
            ticks: Ticks::new(&cfg),
            cfg,
            instance,
            shared,
            conns: Slab::new(),
            topics: TopicRegistry::new(),
            broker,
            metrics: ShardMetrics::default(),
            inbox,
            peers,
            limits,
            tick: 0,
            next_seq: 0,
            shutdown_at: None,
            accept_waker: None,
            sweep_waker: None,
            slow: Vec::new(),
            dirty: Vec::new(),
            flusher_waker: None,
            iov: Vec::with_capacity(IOV_BATCH),
            pending_acks: HashMap::new(),
            publish_limit,
            users: HashMap::new(),
            policy,
            history: Default::default(),
            positions: HashMap::new(),
            holds: HashMap::new(),
            pending_history: HashMap::new(),
            this: std::rc::Weak::new(),
        }
    }

    // ----- connection table (cold path) -----

    /// Add a freshly accepted socket in the `Http` phase.
    pub fn insert_conn(&mut self, fd: RawFd) -> usize {
        self.next_seq += 1;
        let tick = self.tick;
        self.conns.insert(Conn {
            fd,
            seq: self.next_seq,
            connected_at: (crate::registry::unix_ms() / 1000) as u32,
            phase: Phase::Http,
            upgraded: false,
            awaiting_ack: false,
            echo: false,
            outbox: VecDeque::new(),
            queued: 0,
            waker: None,
            kick: false,
            dirty: false,
            front_partial: false,
            write_blocked: false,
            last_rx: tick,
            last_ping: tick,
            deadline: tick.wrapping_add(self.ticks.handshake),
            publish_bucket: Bucket::default(),
            session: None,
        })
    }

    /// The connection id as clients see it: unique across shards, instances and restarts.
    pub fn conn_id(&self, key: usize) -> String {
        format!(
            "{}-{}-{}-{}",
            self.instance, self.id, key, self.conns[key].seq
        )
    }

    /// The registry's record of an open connection.
    fn record(&self, key: usize, remote: Option<SocketAddr>) -> ConnRecord {
        ConnRecord {
            id: self.conn_id(key),
            shard: self.id,
            remote: remote.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            connected_at: if remote.is_some() {
                crate::registry::unix_ms()
            } else {
                self.conns[key].connected_at as u64 * 1000
            },
            user: self.conns[key]
                .session
                .as_ref()
                .map(|s| s.user.to_string())
                .unwrap_or_default(),
        }
    }

    /// Tell the registry (Redis mode); a full queue is counted and repaired by the registry.
    fn tell_registry(&mut self, ev: RegEvent) {
        if let Some(q) = &self.shared.registry {
            if q.push(ev).is_err() {
                self.metrics.registry_drops += 1;
            }
        }
    }

    /// Deliver `{"type":"direct","data":<data>}` to one connection. False when it is not here
    /// (closed, or the key now belongs to a newer connection).
    pub fn deliver_direct(&mut self, key: usize, seq: u64, data: &[u8]) -> bool {
        match self.conns.get(key) {
            Some(c) if c.seq == seq && c.phase == Phase::Open && c.upgraded => {}
            _ => return false,
        }
        let mut json = Vec::with_capacity(data.len() + 26);
        json.extend_from_slice(b"{\"type\":\"direct\",\"data\":");
        json.extend_from_slice(data);
        json.push(b'}');
        let frame = codec::encode_frame(OpCode::Data(codec::Data::Text), &json);
        self.send_frame(key, frame);
        true
    }

    /// Close one connection on a backend's request (`POST /disconnect`). False when it is not
    /// here.
    pub fn disconnect(&mut self, key: usize, seq: u64, code: u16, reason: &str) -> bool {
        match self.conns.get(key) {
            Some(c) if c.seq == seq && c.phase == Phase::Open && c.upgraded && !c.echo => {}
            _ => return false,
        }
        self.metrics.server_disconnects += 1;
        self.close(key, code, reason, false);
        true
    }

    /// The open connections of `user` on this shard, as (key, seq).
    pub fn user_conns(&self, user: &str) -> Vec<(usize, u64)> {
        self.users
            .get(user)
            .map(|keys| keys.iter().map(|&k| (k, self.conns[k].seq)).collect())
            .unwrap_or_default()
    }

    /// Restart the handshake deadline (next keep-alive HTTP request).
    pub fn rearm_http_deadline(&mut self, key: usize) {
        let t = self.tick.wrapping_add(self.ticks.handshake);
        self.conns[key].deadline = t;
    }

    /// The HTTP upgrade succeeded: the connection is a WebSocket from now on.
    pub fn mark_open(&mut self, key: usize, echo: bool, remote: SocketAddr) {
        let tick = self.tick;
        let c = &mut self.conns[key];
        c.phase = Phase::Open;
        c.echo = echo;
        c.upgraded = true;
        c.last_rx = tick;
        c.last_ping = tick;
        // Auth mode: the connection must authenticate before this deadline (checked by the sweep).
        c.deadline = tick.wrapping_add(self.ticks.auth);
        self.metrics.connections_current += 1;
        self.metrics.connections_total += 1;
        // Registered now (with its address); in auth mode registered again with its user once
        // it authenticated (the registry treats that as an update).
        if self.shared.registry.is_some() && !echo {
            let rec = self.record(key, Some(remote));
            self.tell_registry(RegEvent::Register(rec));
        }
    }

    /// Whether the registry knows this connection (every open WebSocket but `/echo` ones).
    fn is_registered(&self, key: usize) -> bool {
        let c = &self.conns[key];
        c.upgraded && !c.echo
    }

    /// Tell the registry the user of a connection that just authenticated (an update of the
    /// record written at the upgrade: address and connect time are kept).
    pub(crate) fn register_authenticated(&mut self, key: usize) {
        if self.shared.registry.is_some() {
            let rec = self.record(key, None);
            self.tell_registry(RegEvent::Register(rec));
        }
    }

    /// Forget a connection (its task is about to drop the socket): subscriptions are released and
    /// the broker hears about channels that lost their last local subscriber.
    pub fn remove_conn(&mut self, key: usize) {
        if self.is_registered(key) {
            let id = self.conn_id(key);
            self.tell_registry(RegEvent::Unregister(id));
        }
        if !self.holds.is_empty() {
            self.drop_holds(key, None);
        }
        if !self.pending_history.is_empty() {
            for waiting in self.pending_history.values_mut() {
                waiting.retain(|p| p.key != key);
            }
            self.pending_history.retain(|_, w| !w.is_empty());
        }
        let c = self.conns.remove(key);
        if let Some(session) = &c.session {
            if let Some(keys) = self.users.get_mut(&session.user) {
                keys.retain(|&k| k != key);
                if keys.is_empty() {
                    self.users.remove(&session.user);
                }
            }
        }
        if c.upgraded {
            self.metrics.connections_current -= 1;
        }
        let broker = &mut self.broker;
        self.topics
            .remove_conn(key, |channel| broker.last_unsubscribed(channel));
        if self.shutdown_at.is_some() && self.conns.is_empty() {
            if let Some(w) = self.sweep_waker.take() {
                w.wake();
            }
        }
    }

    // ----- outbox -----

    /// Queue a frame for one connection. Returns false when the connection's budget is exceeded
    /// (the caller closes it as a slow consumer). The connection is put on the dirty list; the
    /// flusher writes it when the current task yields.
    pub(crate) fn enqueue(
        c: &mut Conn,
        key: usize,
        frame: Bytes,
        limit: usize,
        dirty: &mut Vec<usize>,
    ) -> bool {
        let cost = frame.len() + FRAME_OVERHEAD;
        if c.queued + cost > limit {
            return false;
        }
        c.queued += cost;
        c.outbox.push_back(frame);
        Self::mark_dirty(c, key, dirty);
        true
    }

    /// Put a connection with queued output on the dirty list (once).
    fn mark_dirty(c: &mut Conn, key: usize, dirty: &mut Vec<usize>) {
        if !c.dirty {
            c.dirty = true;
            dirty.push(key);
        }
    }

    /// Wake the flusher if there is work (call after queueing).
    fn wake_flusher(&mut self) {
        if !self.dirty.is_empty() {
            if let Some(w) = self.flusher_waker.take() {
                w.wake();
            }
        }
    }

    /// Wake a connection's task so it re-checks its state.
    pub(crate) fn kick_conn(c: &mut Conn) {
        Self::kick(c)
    }

    fn kick(c: &mut Conn) {
        c.kick = true;
        if let Some(w) = c.waker.take() {
            w.wake();
        }
    }

    /// Queue a control or reply frame to `key`; cuts the connection off if it overflows.
    pub fn send_frame(&mut self, key: usize, frame: Bytes) {
        let limit = self.cfg.max_queued_bytes;
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if matches!(c.phase, Phase::Dead) {
            return;
        }
        if Self::enqueue(c, key, frame, limit, &mut self.dirty) {
            self.wake_flusher();
        } else {
            self.close_slow(key);
        }
    }

    /// Queue a JSON text reply.
    pub fn send_text(&mut self, key: usize, json: &str) {
        self.send_frame(
            key,
            codec::encode_frame(OpCode::Data(codec::Data::Text), json.as_bytes()),
        );
    }

    /// Queue an error reply and count it.
    pub fn send_error(
        &mut self,
        key: usize,
        id: Option<&serde_json::value::RawValue>,
        code: ErrorCode,
        message: &str,
    ) {
        self.metrics.count_error(code);
        self.send_text(key, &protocol::error(id, code, message));
    }

    /// Write as much of a connection's outbox as its socket takes now: one `sendmsg` per up to
    /// [`IOV_BATCH`] frames, straight from the shared frames (no copy), never blocking.
    pub fn flush_conn(&mut self, key: usize) -> Flush {
        let Some(c) = self.conns.get_mut(key) else {
            return Flush::Failed;
        };
        loop {
            if c.outbox.is_empty() {
                if c.outbox.capacity() > 64 {
                    // Give back the memory of a burst once it has drained.
                    c.outbox = VecDeque::new();
                }
                return Flush::Drained;
            }
            self.iov.clear();
            let mut total = 0;
            for f in c.outbox.iter().take(IOV_BATCH) {
                total += f.len();
                self.iov.push(libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                });
            }
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.iov.as_mut_ptr();
            msg.msg_iovlen = self.iov.len() as _;
            // SAFETY: `fd` is this connection's live socket (the entry exists); the iovecs point
            // into frames owned by the outbox, which is not touched until the call returns.
            let n = unsafe { libc::sendmsg(c.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if n < 0 {
                match std::io::Error::last_os_error().kind() {
                    std::io::ErrorKind::WouldBlock => return Flush::Blocked,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => return Flush::Failed,
                }
            }
            let mut n = n as usize;
            self.metrics.bytes_written += n as u64;
            let short = n < total;
            while n > 0 {
                let f = c
                    .outbox
                    .front_mut()
                    .expect("written bytes come from queued frames");
                if f.len() <= n {
                    n -= f.len();
                    c.queued -= f.len() + FRAME_OVERHEAD;
                    c.outbox.pop_front();
                    c.front_partial = false;
                } else {
                    bytes::Buf::advance(f, n);
                    c.queued -= n;
                    c.front_partial = true;
                    n = 0;
                }
            }
            if short {
                // The kernel took less than offered: its buffer is full.
                return Flush::Blocked;
            }
        }
    }

    /// Flush every dirty connection (the flusher's turn). Connections whose socket is full, failed,
    /// or that must close once drained are handed to their own tasks.
    fn flush_dirty(&mut self) {
        let mut keys = std::mem::take(&mut self.dirty);
        for &key in &keys {
            let Some(c) = self.conns.get_mut(key) else {
                continue;
            };
            c.dirty = false;
            if c.write_blocked || c.phase == Phase::Dead {
                continue;
            }
            match self.flush_conn(key) {
                Flush::Drained => {
                    let c = &mut self.conns[key];
                    if c.phase == Phase::FlushThenClose {
                        Self::kick(c);
                    }
                }
                Flush::Blocked => {
                    let c = &mut self.conns[key];
                    c.write_blocked = true;
                    Self::kick(c);
                }
                Flush::Failed => Self::kill(&mut self.conns[key]),
            }
        }
        keys.clear();
        if self.dirty.is_empty() {
            // Keep the list's capacity for the next turn.
            self.dirty = keys;
        }
    }

    // ----- closing -----

    /// Start the close handshake from our side: queue a close frame (after what is queued, unless
    /// `drop_queued`), then wait for the peer's close until the close deadline.
    pub fn close(&mut self, key: usize, code: u16, reason: &str, drop_queued: bool) {
        let deadline = self.tick.wrapping_add(self.ticks.close);
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if c.phase != Phase::Open {
            return;
        }
        if drop_queued {
            // Keep a partly written frame: the peer must receive it whole before our close.
            let keep = if c.front_partial { 1 } else { 0 };
            c.outbox.truncate(keep);
            c.queued = c.outbox.iter().map(|f| f.len() + FRAME_OVERHEAD).sum();
        }
        // The close frame always fits: it bypasses the budget.
        let frame = codec::encode_close(code, reason);
        c.queued += frame.len() + FRAME_OVERHEAD;
        c.outbox.push_back(frame);
        c.phase = Phase::ClosingByUs;
        c.deadline = deadline;
        Self::mark_dirty(c, key, &mut self.dirty);
        Self::kick(c);
        self.wake_flusher();
    }

    /// Fail the connection (protocol error) or answer the peer's close: queue the close frame,
    /// flush, then shut the socket.
    pub fn close_after_flush(&mut self, key: usize, close_frame: Option<Bytes>) {
        let deadline = self.tick.wrapping_add(self.ticks.close);
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(frame) = close_frame {
            c.queued += frame.len() + FRAME_OVERHEAD;
            c.outbox.push_back(frame);
        }
        c.phase = Phase::FlushThenClose;
        c.deadline = deadline;
        // The task flushes what is left itself, then half-closes and lingers.
        Self::kick(c);
    }

    /// Cut off a slow consumer: drop its backlog and close with 1013.
    fn close_slow(&mut self, key: usize) {
        if self.conns.get(key).map(|c| c.phase) == Some(Phase::Open) {
            self.metrics.slow_consumer_closes += 1;
            self.close(key, 1013, "slow consumer: outbox limit exceeded", true);
        }
    }

    /// Shut the socket now (deadline passed): any read or write in flight fails and the task exits.
    fn kill(c: &mut Conn) {
        // SAFETY: `fd` belongs to a live socket: the connection task removes this entry before it
        // drops the stream, and both run on this thread. shutdown(2) does not close the fd.
        unsafe {
            libc::shutdown(c.fd, libc::SHUT_RDWR);
        }
        c.phase = Phase::Dead;
        Self::kick(c);
    }

    // ----- client commands (hot path) -----

    /// Handle one complete text message from connection `key`.
    pub fn handle_text(&mut self, key: usize, text: &[u8]) {
        self.metrics.messages_received += 1;
        let cmd = match protocol::parse_command(text) {
            Ok(cmd) => cmd,
            Err(e) => {
                let id = e.id;
                self.send_error(key, id, e.code, &e.message);
                return;
            }
        };
        if self.shared.verifier.is_some() && self.conns[key].session.is_none() {
            // Auth mode, not authenticated yet: only `connect` and `ping`.
            if !matches!(cmd, Command::Connect { .. } | Command::Ping { .. }) {
                let id = cmd.id();
                self.send_error(
                    key,
                    id,
                    ErrorCode::Unauthorized,
                    "send {\"type\":\"connect\",\"token\":..} first",
                );
                return;
            }
        }
        match cmd {
            Command::Publish { channel, data, id } => {
                if !self.policy.is_open() || channel.starts_with('$') {
                    let subscribed = self.topics.is_subscribed(key, &channel);
                    let user = self.user_of(key);
                    if let Err(d) = self.policy.check_publish(&channel, user, subscribed) {
                        self.send_denial(key, id, d);
                        return;
                    }
                }
                if !self.publish_allowed(key, id) {
                    return;
                }
                match self.publish(&channel, data.get().as_bytes()) {
                    Ok(()) => {
                        if id.is_some() {
                            self.send_text(key, &protocol::ack("published", &channel, id));
                        }
                    }
                    Err(BrokerError::Unavailable) => {
                        if id.is_some() {
                            self.send_error(
                                key,
                                id,
                                ErrorCode::Unavailable,
                                "the message bus is unavailable; the message was not published",
                            );
                        }
                    }
                }
            }
            Command::Connect { token, id } => self.handle_connect(key, token.as_deref(), id),
            Command::Refresh { channel, token, id } => {
                self.handle_refresh(key, channel.as_deref(), &token, id)
            }
            Command::Subscribe {
                channel,
                token,
                since,
                id,
            } => {
                let mut channel_exp = None;
                if !self.policy.is_open() || channel.starts_with('$') || token.is_some() {
                    match self.subscribe_allowed(key, &channel, token.as_deref(), id) {
                        Ok(exp) => channel_exp = exp,
                        Err(()) => return,
                    }
                }
                if let Some(opts) = self.policy.history(&channel) {
                    self.subscribe_history(key, &channel, id, since, opts, channel_exp);
                } else {
                    self.subscribe(key, &channel, id, channel_exp);
                }
            }
            Command::History {
                channel,
                since,
                limit,
                id,
            } => self.handle_history(key, &channel, since, limit, id),
            Command::Unsubscribe { channel, id } => {
                if let crate::topics::Unsubscribed::Removed { last: true } =
                    self.topics.unsubscribe(key, &channel)
                {
                    self.broker.last_unsubscribed(&channel);
                }
                if let Some(session) = self.conns[key].session.as_mut() {
                    session.channel_exp.retain(|(c, _)| **c != *channel);
                }
                if !self.holds.is_empty() {
                    self.drop_holds(key, Some(&channel));
                }
                self.send_text(key, &protocol::ack("unsubscribed", &channel, id));
            }
            Command::Ping { id } => self.send_text(key, &protocol::pong(id)),
        }
    }

    /// Subscribe `key` to `channel` (permissions already checked) and acknowledge it, now or
    /// when the bus confirms. `channel_exp`: expiry of the channel token it came with.
    pub(crate) fn subscribe(
        &mut self,
        key: usize,
        channel: &str,
        id: Option<&RawValue>,
        channel_exp: Option<u64>,
    ) {
        if !self.add_subscription(key, channel, id) {
            return;
        }
        if self.broker.subscription_pending(channel) {
            let c = &mut self.conns[key];
            c.awaiting_ack = true;
            let ack = PendingAck {
                key,
                seq: c.seq,
                id: id.map(|id| id.to_owned()),
            };
            self.pending_acks
                .entry(Box::from(channel))
                .or_default()
                .push(ack);
        } else {
            self.send_text(key, &protocol::ack("subscribed", channel, id));
        }
        if let Some(exp) = channel_exp {
            if let Some(session) = self.conns[key].session.as_mut() {
                session.set_channel_exp(channel, exp);
            }
        }
    }

    /// Add `channel` to `key`'s subscriptions (the broker hears of a first subscriber). False
    /// (error sent) at the subscription limit.
    pub(crate) fn add_subscription(
        &mut self,
        key: usize,
        channel: &str,
        id: Option<&RawValue>,
    ) -> bool {
        if !self.topics.is_subscribed(key, channel)
            && self.topics.subscriptions_of(key) >= self.cfg.max_subscriptions
        {
            let msg = format!(
                "a connection may hold at most {} subscriptions",
                self.cfg.max_subscriptions
            );
            self.send_error(key, id, ErrorCode::TooManySubscriptions, &msg);
            return false;
        }
        if let crate::topics::Subscribed::Added { first: true } =
            self.topics.subscribe(key, channel)
        {
            self.broker.first_subscriber(channel);
        }
        true
    }

    /// Queue a shared frame to one subscriber; an overflow marks it for the slow-consumer cut
    /// (done by [`Shard::flush_slow`]). True when queued.
    pub(crate) fn queue_or_cut(&mut self, key: usize, frame: Bytes, limit: usize) -> bool {
        let c = &mut self.conns[key];
        if c.phase != Phase::Open {
            return false;
        }
        if Self::enqueue(c, key, frame, limit, &mut self.dirty) {
            true
        } else {
            self.slow.push(key);
            false
        }
    }

    /// Wake the flusher and cut the slow consumers found while queueing.
    pub(crate) fn flush_slow(&mut self) {
        self.wake_flusher();
        while let Some(key) = self.slow.pop() {
            self.close_slow(key);
        }
    }

    /// Take a token from the connection's publish bucket. When it is empty the publish is dropped
    /// with a `rate_limited` error; a connection that keeps going is closed with 1008.
    fn publish_allowed(&mut self, key: usize, id: Option<&RawValue>) -> bool {
        let Some(limit) = self.publish_limit else {
            return true;
        };
        let verdict = limit.check(&mut self.conns[key].publish_bucket, ratelimit::now_ms());
        if verdict == Verdict::Allowed {
            return true;
        }
        let msg = format!(
            "publish rate limit exceeded ({}/s, burst {}); the message was dropped",
            self.cfg.max_publish_rate,
            self.cfg.publish_burst_limit()
        );
        self.send_error(key, id, ErrorCode::RateLimited, &msg);
        if verdict == Verdict::Abusive {
            self.metrics.rate_limit_closes += 1;
            self.close(key, 1008, "publish rate limit exceeded persistently", false);
        }
        false
    }

    /// The bus confirmed the subscription to `channel`: send the held acks and let those
    /// connections continue.
    pub fn subscription_confirmed(&mut self, channel: &str) {
        if let Some(acks) = self.pending_acks.remove(channel) {
            for ack in acks {
                self.release_ack(channel, ack);
            }
        }
        if !self.pending_history.is_empty() {
            self.start_pending_history(Some(channel));
        }
    }

    /// The bus went down: acknowledge every held subscribe now (the subscriptions are kept and
    /// re-established when the bus returns).
    pub fn release_all_pending_acks(&mut self) {
        for (channel, acks) in std::mem::take(&mut self.pending_acks) {
            for ack in acks {
                self.release_ack(&channel, ack);
            }
        }
        if !self.pending_history.is_empty() {
            self.start_pending_history(None);
        }
    }

    fn release_ack(&mut self, channel: &str, ack: PendingAck) {
        let Some(c) = self.conns.get_mut(ack.key) else {
            return;
        };
        if c.seq != ack.seq {
            return;
        }
        c.awaiting_ack = false;
        Self::kick(c);
        self.send_text(
            ack.key,
            &protocol::ack("subscribed", channel, ack.id.as_deref()),
        );
    }

    /// Accept a publish from this shard (a client or `POST /publish`).
    pub fn publish(&mut self, channel: &str, data: &[u8]) -> Result<(), BrokerError> {
        // Apply pending interest changes first, so a subscribe acknowledged on another shard
        // before this publish arrived is routed (see `MemoryBroker`).
        if !self.inbox.is_empty() {
            self.drain_inbox(usize::MAX);
        }
        if let Some(opts) = self.policy.history(channel) {
            self.publish_history(channel, data, opts)?;
            self.metrics.messages_published += 1;
            return Ok(());
        }
        let route = self.broker.publish(channel, data)?;
        self.metrics.messages_published += 1;
        if route == Route::Local {
            self.deliver_local(channel, data);
        }
        Ok(())
    }

    /// Fan a message out to this shard's subscribers: the frame is built once and each subscriber
    /// gets a refcounted clone. Cost: linear in the channel's local subscribers, no allocation per
    /// subscriber (beyond outbox growth).
    pub fn deliver_local(&mut self, channel: &str, data: &[u8]) {
        let n = self.topics.subscriber_count(channel);
        if n == 0 {
            return;
        }
        let json_len = protocol::message_json_len(channel, data);
        let mut buf = BytesMut::with_capacity(codec::frame_header_len(json_len) + json_len);
        codec::write_frame_header(&mut buf, OpCode::Data(codec::Data::Text), json_len);
        protocol::write_message_json(&mut buf, channel, data);
        debug_assert_eq!(buf.len(), codec::frame_header_len(json_len) + json_len);
        let frame = buf.freeze();

        let limit = self.cfg.max_queued_bytes;
        let mut delivered = 0u64;
        for key in self.topics.subscribers(channel) {
            let c = &mut self.conns[key];
            if c.phase != Phase::Open {
                continue;
            }
            if Self::enqueue(c, key, frame.clone(), limit, &mut self.dirty) {
                delivered += 1;
            } else {
                self.slow.push(key);
            }
        }
        self.metrics.messages_delivered += delivered;
        self.wake_flusher();
        while let Some(key) = self.slow.pop() {
            self.close_slow(key);
        }
    }

    // ----- inbox, sweep, shutdown (cold path) -----

    /// Handle up to `budget` messages from the inbox. Returns how many were handled.
    pub fn drain_inbox(&mut self, budget: usize) -> usize {
        let mut n = 0;
        while n < budget {
            let Some(msg) = self.inbox.try_pop() else {
                break;
            };
            n += 1;
            match msg {
                ShardMsg::Deliver { channel, data } => self.deliver_local(&channel, &data),
                ShardMsg::DeliverNumbered {
                    channel,
                    data,
                    offset,
                    epoch,
                } => self.deliver_numbered(&channel, &data, offset, &epoch),
                ShardMsg::HistoryPublish { channel, data } => match self.policy.history(&channel) {
                    Some(opts) => self.append_history(&channel, data, opts),
                    None => self.deliver_local(&channel, &data),
                },
                ShardMsg::HistoryRead {
                    channel,
                    since,
                    limit,
                    create,
                    reply,
                } => self.serve_history_read(&channel, since, limit, create, reply),
                ShardMsg::Interest { from, channel, on } => {
                    self.broker.peer_interest(from, channel, on)
                }
                ShardMsg::Metrics(tx) => {
                    let _ = tx.send(self.metrics.clone());
                }
                ShardMsg::Shutdown => self.begin_shutdown(),
                ShardMsg::Direct {
                    key,
                    seq,
                    data,
                    reply,
                } => {
                    let found = self.deliver_direct(key, seq, &data);
                    if let Some(reply) = reply {
                        let _ = reply.send(found);
                    }
                }
                ShardMsg::UserDirect { user, data, reply } => {
                    let keys = self.user_conns(&user);
                    let mut n = 0;
                    for (key, seq) in keys {
                        n += self.deliver_direct(key, seq, &data) as usize;
                    }
                    let _ = reply.send(n);
                }
                ShardMsg::Disconnect {
                    key,
                    seq,
                    code,
                    reason,
                    reply,
                } => {
                    let found = self.disconnect(key, seq, code, &reason);
                    if let Some(reply) = reply {
                        let _ = reply.send(found);
                    }
                }
                ShardMsg::UserDisconnect {
                    user,
                    code,
                    reason,
                    reply,
                } => {
                    let keys = self.user_conns(&user);
                    let mut n = 0;
                    for (key, seq) in keys {
                        n += self.disconnect(key, seq, code, &reason) as usize;
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(n);
                    }
                }
                ShardMsg::RegistrySnapshot(reply) => {
                    let keys: Vec<usize> = self
                        .conns
                        .iter()
                        .filter(|(_, c)| c.upgraded && !c.echo && c.phase != Phase::Http)
                        .map(|(k, _)| k)
                        .collect();
                    let records = keys.into_iter().map(|k| self.record(k, None)).collect();
                    let _ = reply.send(records);
                }
            }
        }
        n
    }

    /// Stop accepting, close every WebSocket with 1001 after what is queued, drop HTTP clients.
    pub fn begin_shutdown(&mut self) {
        if self.shutdown_at.is_some() {
            return;
        }
        self.shutdown_at = Some(self.tick);
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        if let Some(w) = self.sweep_waker.take() {
            w.wake();
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            match self.conns[key].phase {
                Phase::Open => self.close(key, 1001, "going away", false),
                Phase::Http => Self::kill(&mut self.conns[key]),
                _ => {}
            }
        }
    }

    /// Whether the shard may exit: shutdown began and every connection is gone (or the shutdown
    /// timeout passed, in which case the remaining sockets are shut).
    fn shutdown_finished(&mut self) -> bool {
        let Some(at) = self.shutdown_at else {
            return false;
        };
        if self.conns.is_empty() {
            return true;
        }
        if self.tick.wrapping_sub(at) >= self.ticks.shutdown {
            for (_, c) in self.conns.iter_mut() {
                if c.phase != Phase::Dead {
                    Self::kill(c);
                }
            }
            return true;
        }
        false
    }

    /// One timer pass over every connection. Cost: linear in connections, once per tick.
    fn sweep(&mut self) {
        self.tick = self.tick.wrapping_add(1);
        let now = self.tick;
        let t = self.ticks;
        let ping = codec::encode_frame(OpCode::Control(codec::Control::Ping), b"");
        let limit = self.cfg.max_queued_bytes;
        let mut to_close: Vec<(usize, u16, &'static str)> = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            let expired = now.wrapping_sub(c.deadline) as i32 >= 0;
            match c.phase {
                Phase::Http if expired => {
                    self.metrics.handshake_timeouts += 1;
                    Self::kill(c);
                }
                Phase::Open => {
                    if now.wrapping_sub(c.last_rx) >= t.idle {
                        self.metrics.idle_closes += 1;
                        to_close.push((key, 1001, "idle timeout"));
                    } else if now.wrapping_sub(c.last_ping) >= t.ping {
                        c.last_ping = now;
                        if !Self::enqueue(c, key, ping.clone(), limit, &mut self.dirty) {
                            self.slow.push(key);
                        }
                    }
                }
                Phase::ClosingByUs | Phase::FlushThenClose if expired => Self::kill(c),
                _ => {}
            }
        }
        for (key, code, reason) in to_close {
            self.close(key, code, reason, false);
        }
        if self.shared.verifier.is_some() {
            self.sweep_auth(now);
        }
        self.sweep_history();
        while let Some(key) = self.slow.pop() {
            self.close_slow(key);
        }
        self.wake_flusher();
    }
}

/// Accept connections until shutdown; one task per connection.
pub async fn accept_loop(shard: ShardRef, listener: monoio::net::TcpListener) {
    use futures_util::future::{select, Either};
    let mut emfile_logged = false;
    loop {
        let stop = std::future::poll_fn(|cx| {
            let mut s = shard.borrow_mut();
            if s.shutdown_at.is_some() {
                std::task::Poll::Ready(())
            } else {
                s.accept_waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        });
        let accepted = match select(std::pin::pin!(listener.accept()), std::pin::pin!(stop)).await {
            Either::Left((res, _)) => res,
            Either::Right(_) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                emfile_logged = false;
                let _ = stream.set_nodelay(true);
                monoio::spawn(crate::conn::serve(shard.clone(), stream, peer));
            }
            Err(e) => {
                // Out of file descriptors (or similar): back off instead of spinning; existing
                // clients keep being served.
                if !emfile_logged {
                    tracing::warn!(shard = shard.borrow().id, error = %e, "accept failed; backing off");
                    emfile_logged = true;
                }
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Dropping the listener here stops the kernel from routing new connections to this shard.
}

/// The shard's writer: runs after the tasks that queued output yield, so everything queued in a
/// turn (all messages a publisher's read produced, to every subscriber) goes out with one
/// `sendmsg` per connection.
pub async fn flush_loop(shard: ShardRef) {
    loop {
        std::future::poll_fn(|cx| {
            let mut s = shard.borrow_mut();
            if s.dirty.is_empty() {
                s.flusher_waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        shard.borrow_mut().flush_dirty();
    }
}

/// Drain the inbox whenever another thread pushes to it.
pub async fn inbox_loop(shard: ShardRef) {
    let inbox = shard.borrow().inbox.clone();
    loop {
        inbox.ready().await;
        let handled = shard.borrow_mut().drain_inbox(INBOX_BUDGET);
        if handled == INBOX_BUDGET {
            // More is waiting: let connection tasks write before draining on (a timer yield; in
            // monoio 0.2.4 `yield_now` would run this task again first).
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The per-shard timer. Returns when the shard has shut down.
pub async fn sweep_loop(shard: ShardRef) {
    use futures_util::future::select;
    let period = shard.borrow().ticks.period;
    loop {
        // Sleep one tick, or less when shutdown begins or the last connection leaves during it.
        let early = std::future::poll_fn(|cx| {
            let mut s = shard.borrow_mut();
            if s.shutdown_at.is_some() && s.conns.is_empty() {
                std::task::Poll::Ready(())
            } else {
                s.sweep_waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        });
        let sleep = monoio::time::sleep(period);
        select(std::pin::pin!(sleep), std::pin::pin!(early)).await;
        let mut s = shard.borrow_mut();
        if s.shutdown_at.is_some() && s.conns.is_empty() {
            return;
        }
        s.sweep();
        if s.shutdown_finished() {
            return;
        }
    }
}
