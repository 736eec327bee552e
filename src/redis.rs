//! Redis as the bus between instances: one pair of links per shard and the [`RedisBroker`].
//!
//! Each shard opens two TCP connections to Redis on its own runtime (no shared client):
//! - the **publisher** link carries `PUBLISH` commands, pipelined, in the order the shard accepted
//!   them — so per-publisher order holds across instances;
//! - the **subscriber** link carries `SUBSCRIBE`/`UNSUBSCRIBE` and receives the messages. (A RESP2
//!   connection in subscribed mode cannot `PUBLISH`, and keeping them apart means a burst of
//!   incoming messages never delays outgoing publishes, or the reverse.)
//!
//! Lazy subscriptions: the shard subscribes to `<prefix>chan:<name>` when its topic registry
//! reports the first local subscriber, and unsubscribes on the last one leaving. Redis applies the
//! commands of one connection in order, so the state Redis ends in is the LAST command we sent for
//! a channel; [`Links`] therefore decides from the last command sent (pending or confirmed), and
//! uses confirmations only to know when a subscription is live. Join/leave/join sends
//! SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE and ends subscribed, whatever order the confirmations race in.
//!
//! A client's `subscribe` that made the shard subscribe in Redis is acknowledged only when Redis
//! confirms (the shard holds that connection's further commands until then), so a client that
//! publishes right after its `subscribed` ack receives its own message. While the subscriber link
//! is down, subscribes are acknowledged at once (the shard re-subscribes when Redis returns).
//!
//! Failure: a link that fails goes to `BackingOff` and reconnects with capped, jittered
//! exponential backoff; the subscriber re-subscribes every channel its shard still needs. Clients
//! stay connected. Publishes while the publisher link is down fail with `unavailable`. Links ping
//! Redis when idle and reconnect when a ping goes unanswered. State changes are logged once.
//!
//! Delivery guarantee: at most once (Redis pub/sub keeps nothing; a message published while a
//! link is down, or to a shard not yet subscribed, is not delivered there) — except on channels
//! with history, whose messages are numbered and kept by Redis: there a shard repairs holes in
//! its live stream from the stream (see [`history`]). A shard with history channels opens a third
//! link, the **reader**, for history reads and repairs, so that reads never delay publishes.
//! Every link names itself `ringhub-<instance>-<shard>-<pub|sub|read>` (`CLIENT SETNAME`).

mod history;

use crate::broker::{Broker, BrokerError, HistoryFuture, Route};
use crate::config::RedisConfig;
use crate::resp::{self, Frame, PubSub};
use crate::shard::ShardRef;
use crate::sock::recv_into;
use bytes::BytesMut;
use futures_util::future::{select, Either};
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// First reconnect delay; doubles per failure up to [`BACKOFF_MAX`], each with 50–100% jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Time allowed for TCP connect plus AUTH.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// An idle link pings Redis this often…
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// …and reconnects when a ping stays unanswered this long.
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Publishes buffered for Redis beyond this are refused with `unavailable` (Redis is not keeping
/// up; better to tell the publisher than to grow without bound).
const MAX_PENDING_PUBLISH_BYTES: usize = 32 << 20;
/// Channels per SUBSCRIBE command when re-subscribing after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 512;

/// Which of a shard's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Publisher,
    Subscriber,
    /// History reads, repairs and checks (only with history channels).
    Reader,
}

/// A link's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Opening the TCP connection.
    Connecting,
    /// Connected; AUTH (and SELECT) sent, replies awaited.
    Authenticating,
    /// Subscriber only: connected, re-subscriptions sent after a (re)connect, confirmations
    /// awaited. Commands flow, but `/readyz` still says not ready.
    Subscribing,
    /// Usable: commands flow (the subscriber's subscriptions are confirmed).
    Ready,
    /// Failed; waiting before the next attempt.
    BackingOff,
}

/// The last command sent for a channel, pending confirmation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Sub,
    Unsub,
}

#[derive(Debug, Default)]
struct Chan {
    /// The shard has local subscribers.
    wanted: bool,
    /// Commands sent and not yet confirmed, oldest first.
    inflight: VecDeque<Cmd>,
    /// Redis confirmed a SUBSCRIBE more recently than an UNSUBSCRIBE.
    subscribed: bool,
}

impl Chan {
    /// Whether Redis will be (or is) subscribed once everything sent is applied.
    fn will_be_subscribed(&self) -> bool {
        match self.inflight.back() {
            Some(cmd) => *cmd == Cmd::Sub,
            None => self.subscribed,
        }
    }
}

/// One connection's outgoing side.
#[derive(Debug)]
struct LinkIo {
    state: LinkState,
    /// Encoded commands waiting to be written.
    out: BytesMut,
    /// The link task's waker while it waits for output.
    waker: Option<Waker>,
    /// Replies expected (publisher: one per PUBLISH/PING).
    awaiting: usize,
    /// When the oldest unanswered ping was sent.
    ping_sent: Option<Instant>,
    /// The last state change was logged as "down" (so repeated failures log once).
    logged_down: bool,
    /// Subscriber: re-subscriptions sent on connect and not yet confirmed.
    resubscribing: usize,
    /// Publisher: do not write `out` (the function library is being reloaded).
    hold_output: bool,
}

impl LinkIo {
    fn new() -> LinkIo {
        LinkIo {
            state: LinkState::Connecting,
            out: BytesMut::new(),
            waker: None,
            awaiting: 0,
            ping_sent: None,
            logged_down: false,
            resubscribing: 0,
            hold_output: false,
        }
    }

    /// Whether there is output the link may write now.
    fn has_output(&self) -> bool {
        !self.out.is_empty() && !self.hold_output
    }

    fn queue(&mut self, args: &[&[u8]]) {
        resp::encode_command(&mut self.out, args);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Process-wide readiness flags: one per shard, written on link state changes only, read by
/// `GET /readyz`.
#[derive(Debug)]
pub struct Readiness(Vec<AtomicBool>);

impl Readiness {
    pub fn new(shards: usize, initially: bool) -> Arc<Readiness> {
        Arc::new(Readiness(
            (0..shards).map(|_| AtomicBool::new(initially)).collect(),
        ))
    }
    pub fn set(&self, shard: usize, up: bool) {
        self.0[shard].store(up, Ordering::Relaxed);
    }
    /// True when every shard's bus is up.
    pub fn all(&self) -> bool {
        self.0.iter().all(|f| f.load(Ordering::Relaxed))
    }
}

/// A shard's Redis state, shared by its [`RedisBroker`] and its link tasks.
pub struct Links {
    cfg: Arc<RedisConfig>,
    shard: usize,
    readiness: Arc<Readiness>,
    publisher: LinkIo,
    subscriber: LinkIo,
    reader: LinkIo,
    channels: HashMap<Box<str>, Chan>,
    /// The shard's channel rules (which channels keep history); set by [`spawn_links`].
    policy: Option<crate::auth::namespaces::Policy>,
    /// `ringhub-<instance>-<shard>`, for `CLIENT SETNAME`; set by [`spawn_links`].
    name: Option<String>,
    /// History: publishes and reads in flight, the channels being kept gapless.
    hist: history::State,
    /// `<prefix>chan:`
    chan_prefix: Vec<u8>,
    /// `<prefix>inbox:<instance>`, subscribed by shard 0 only: sends and disconnects for this
    /// instance's connections (`route_inbox`).
    inbox: Option<Vec<u8>>,
}

impl Links {
    pub fn new(
        cfg: Arc<RedisConfig>,
        shard: usize,
        readiness: Arc<Readiness>,
        inbox: Option<String>,
    ) -> Rc<RefCell<Links>> {
        let chan_prefix = format!("{}chan:", cfg.prefix).into_bytes();
        Rc::new(RefCell::new(Links {
            cfg,
            shard,
            readiness,
            publisher: LinkIo::new(),
            subscriber: LinkIo::new(),
            reader: LinkIo::new(),
            channels: HashMap::new(),
            policy: None,
            name: None,
            hist: history::State::default(),
            chan_prefix,
            inbox: inbox.map(String::into_bytes),
        }))
    }

    fn io(&mut self, role: Role) -> &mut LinkIo {
        match role {
            Role::Publisher => &mut self.publisher,
            Role::Subscriber => &mut self.subscriber,
            Role::Reader => &mut self.reader,
        }
    }

    /// Whether `channel` keeps history (decided by the config alone).
    fn is_history(&self, channel: &str) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|p| p.history(channel).is_some())
    }

    /// The pub/sub channel of `channel`: `<prefix>{<channel>}:pub` with history, else
    /// `<prefix>chan:<channel>`.
    fn key(&self, channel: &str) -> Vec<u8> {
        if self.is_history(channel) {
            return history::pub_channel(&self.cfg.prefix, channel);
        }
        self.plain_key(channel)
    }

    /// `<prefix>chan:<channel>`
    fn plain_key(&self, channel: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.chan_prefix.len() + channel.len());
        k.extend_from_slice(&self.chan_prefix);
        k.extend_from_slice(channel.as_bytes());
        k
    }

    /// The hub channel a Redis pub/sub name stands for, and whether it is a history channel's.
    fn channel_of<'a>(&self, name: &'a [u8]) -> Option<(&'a str, bool)> {
        if let Some(rest) = name.strip_prefix(self.chan_prefix.as_slice()) {
            return std::str::from_utf8(rest).ok().map(|c| (c, false));
        }
        history::parse_pub_channel(&self.cfg.prefix, name).map(|c| (c, true))
    }

    /// Queue a keepalive PING on a link (its reply is matched like any other).
    fn queue_ping(&mut self, role: Role) {
        self.io(role).ping_sent = Some(Instant::now());
        match role {
            Role::Publisher => {
                self.hist.pub_sent.push_back(history::PubSent::Ping);
                self.hist.pub_unwritten += 1;
                self.publisher.awaiting += 1;
                self.publisher.queue(&[b"PING"]);
            }
            Role::Subscriber => self.subscriber.queue(&[b"PING"]),
            Role::Reader => self.reader_ping(),
        }
    }

    /// The bytes a link may write now, if any.
    fn take_output(&mut self, role: Role) -> Option<bytes::Bytes> {
        if !self.io(role).has_output() {
            return None;
        }
        if role == Role::Publisher {
            self.hist.pub_unwritten = 0;
        }
        Some(self.io(role).out.split().freeze())
    }

    /// Ready: publisher and subscriber up, and the reader too when some channel keeps history
    /// (history subscribes need it).
    fn update_readiness(&self) {
        self.readiness.set(self.shard, self.ready());
    }

    fn ready(&self) -> bool {
        self.publisher.state == LinkState::Ready
            && self.subscriber.state == LinkState::Ready
            && (self.reader.state == LinkState::Ready || !self.has_history())
    }

    /// Whether some namespace keeps history (then the shard has a reader link).
    fn has_history(&self) -> bool {
        self.policy.as_ref().is_some_and(|p| p.any_history())
    }

    /// Whether the subscriber link can take commands.
    fn sub_connected(&self) -> bool {
        matches!(
            self.subscriber.state,
            LinkState::Subscribing | LinkState::Ready
        )
    }

    /// The shard gained its first local subscriber of `channel`.
    fn want(&mut self, channel: &str) {
        let key = self.key(channel);
        let ready = self.sub_connected();
        if self.is_history(channel) {
            self.hist.track(channel);
        }
        let chan = self.channels.entry(channel.into()).or_default();
        chan.wanted = true;
        if ready && !chan.will_be_subscribed() {
            chan.inflight.push_back(Cmd::Sub);
            self.subscriber.queue(&[b"SUBSCRIBE", &key]);
        }
    }

    /// The shard lost its last local subscriber of `channel`.
    fn unwant(&mut self, channel: &str) {
        let key = self.key(channel);
        let ready = self.sub_connected();
        self.hist.untrack(channel);
        let Some(chan) = self.channels.get_mut(channel) else {
            return;
        };
        chan.wanted = false;
        if ready && chan.will_be_subscribed() {
            chan.inflight.push_back(Cmd::Unsub);
            self.subscriber.queue(&[b"UNSUBSCRIBE", &key]);
        } else if chan.inflight.is_empty() && !chan.subscribed {
            self.channels.remove(channel);
        }
    }

    /// Whether a subscribe to `channel` is sent but not yet confirmed (only while the link is up).
    fn pending(&self, channel: &str) -> bool {
        self.sub_connected()
            && self
                .channels
                .get(channel)
                .is_some_and(|c| c.wanted && !(c.subscribed && c.inflight.is_empty()))
    }

    /// A SUBSCRIBE/UNSUBSCRIBE confirmation arrived. Returns true when waiting client acks for
    /// this channel may be released.
    fn confirmed(&mut self, channel: &str, cmd: Cmd) -> bool {
        let Some(chan) = self.channels.get_mut(channel) else {
            return false;
        };
        let first_is_cmd = chan.inflight.front() == Some(&cmd);
        if first_is_cmd {
            chan.inflight.pop_front();
        }
        if cmd == Cmd::Sub && self.subscriber.resubscribing > 0 {
            self.subscriber.resubscribing -= 1;
            if self.subscriber.resubscribing == 0 && self.subscriber.state == LinkState::Subscribing
            {
                self.subscriber.state = LinkState::Ready;
                self.update_readiness();
                // Everything is subscribed again: fill what was missed while the link was down.
                self.hist.request_check();
            }
        }
        let Some(chan) = self.channels.get_mut(channel) else {
            return false;
        };
        chan.subscribed = cmd == Cmd::Sub;
        let release = cmd == Cmd::Sub && !chan.inflight.contains(&Cmd::Unsub);
        if !chan.wanted && chan.inflight.is_empty() && !chan.subscribed {
            self.channels.remove(channel);
        }
        release
    }

    /// The link is connected and authenticated.
    fn on_ready(&mut self, role: Role) {
        let shard = self.shard;
        let io = self.io(role);
        io.state = LinkState::Ready;
        io.resubscribing = 0;
        if io.logged_down {
            tracing::info!(shard, ?role, "Redis link is back up");
        } else {
            tracing::debug!(shard, ?role, "Redis link up");
        }
        io.logged_down = false;
        if role == Role::Subscriber {
            if let Some(inbox) = self.inbox.clone() {
                self.subscriber.queue(&[b"SUBSCRIBE", &inbox]);
            }
            // Re-subscribe everything the shard still needs, in a few commands.
            let wanted: Vec<Box<str>> = self
                .channels
                .iter()
                .filter(|(_, c)| c.wanted)
                .map(|(k, _)| k.clone())
                .collect();
            for chunk in wanted.chunks(RESUBSCRIBE_CHUNK) {
                let keys: Vec<Vec<u8>> = chunk.iter().map(|c| self.key(c)).collect();
                let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
                args.extend(keys.iter().map(|k| k.as_slice()));
                self.subscriber.queue(&args);
                for c in chunk {
                    if let Some(chan) = self.channels.get_mut(c) {
                        chan.inflight.push_back(Cmd::Sub);
                    }
                }
            }
            if !wanted.is_empty() {
                // Ready (for /readyz) once Redis confirmed every re-subscription.
                self.subscriber.resubscribing = wanted.len();
                self.subscriber.state = LinkState::Subscribing;
            }
        }
        if role == Role::Reader {
            self.reader_up();
        }
        self.update_readiness();
    }

    /// The link failed: forget what was in flight.
    fn on_down(&mut self, role: Role, why: &str) {
        let shard = self.shard;
        let addr = self.cfg.addr.clone();
        let io = self.io(role);
        let was = io.state;
        io.state = LinkState::BackingOff;
        io.out.clear();
        io.awaiting = 0;
        io.ping_sent = None;
        io.resubscribing = 0;
        self.history_down(role);
        let io = self.io(role);
        if !io.logged_down {
            if was == LinkState::Ready {
                tracing::warn!(shard, ?role, %addr, error = why, "Redis link down; reconnecting with backoff");
            } else {
                tracing::warn!(shard, ?role, %addr, error = why, "cannot reach Redis; retrying with backoff");
            }
            io.logged_down = true;
        }
        if role == Role::Subscriber {
            self.channels.retain(|_, c| {
                c.inflight.clear();
                c.subscribed = false;
                c.wanted
            });
        }
        self.update_readiness();
    }
}

/// The Redis implementation of [`Broker`] for one shard.
pub struct RedisBroker {
    links: Rc<RefCell<Links>>,
}

impl RedisBroker {
    pub fn new(links: Rc<RefCell<Links>>) -> RedisBroker {
        RedisBroker { links }
    }
}

impl Broker for RedisBroker {
    fn publish(&mut self, channel: &str, data: &[u8]) -> Result<Route, BrokerError> {
        let mut l = self.links.borrow_mut();
        if l.publisher.state != LinkState::Ready
            || l.publisher.out.len() > MAX_PENDING_PUBLISH_BYTES
        {
            return Err(BrokerError::Unavailable);
        }
        let key = l.plain_key(channel);
        l.publisher.awaiting += 1;
        l.hist.pub_sent.push_back(history::PubSent::Publish);
        l.hist.pub_unwritten += 1;
        l.publisher.queue(&[b"PUBLISH", &key, data]);
        Ok(Route::ViaBus)
    }

    fn publish_history(
        &mut self,
        channel: &str,
        data: &[u8],
        opts: &crate::history::HistoryOptions,
    ) -> Result<(), BrokerError> {
        self.links.borrow_mut().publish_history(channel, data, opts)
    }

    fn read_history(
        &mut self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        opts: &crate::history::HistoryOptions,
    ) -> Option<HistoryFuture> {
        Some(
            self.links
                .borrow_mut()
                .read_history(channel, since, limit, opts),
        )
    }

    fn first_subscriber(&mut self, channel: &str) {
        self.links.borrow_mut().want(channel);
    }

    fn last_unsubscribed(&mut self, channel: &str) {
        self.links.borrow_mut().unwant(channel);
    }

    fn subscription_pending(&self, channel: &str) -> bool {
        self.links.borrow().pending(channel)
    }

    fn is_ready(&self) -> bool {
        self.links.borrow().ready()
    }
}

/// Start the link tasks of a shard: publisher and subscriber; with history channels in the
/// config also the reader and the periodic history check.
pub fn spawn_links(shard: ShardRef, links: Rc<RefCell<Links>>) {
    let history = {
        let s = shard.borrow();
        let mut l = links.borrow_mut();
        let instance: String = s
            .instance
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect();
        l.name = Some(format!("ringhub-{instance}-{}", s.id));
        l.policy = Some(s.policy.clone());
        l.hist.max_recovery = s.cfg.max_recovery;
        l.has_history()
    };
    monoio::spawn(run_link(shard.clone(), links.clone(), Role::Publisher));
    if history {
        monoio::spawn(run_link(shard.clone(), links.clone(), Role::Reader));
        monoio::spawn(history::check_loop(links.clone()));
    }
    monoio::spawn(run_link(shard, links, Role::Subscriber));
}

/// Keep one link connected for the life of the shard.
async fn run_link(shard: ShardRef, links: Rc<RefCell<Links>>, role: Role) {
    let mut delay = BACKOFF_MIN;
    loop {
        links.borrow_mut().io(role).state = LinkState::Connecting;
        let started = Instant::now();
        let err = session(&shard, &links, role).await;
        let was_ready_long = started.elapsed() > BACKOFF_MAX;
        links.borrow_mut().on_down(role, &err.to_string());
        if role == Role::Subscriber {
            // Subscribes that waited for Redis are acknowledged: the shard re-subscribes on return.
            shard.borrow_mut().release_all_pending_acks();
        }
        if was_ready_long {
            delay = BACKOFF_MIN;
        }
        let jittered = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        monoio::time::sleep(jittered).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// A connection to Redis for request/response use (the links' sessions and the registry):
/// TCP connect, then AUTH (and SELECT), then pipelined commands and their replies.
pub struct RedisConn {
    pub stream: TcpStream,
    fd: i32,
    rbuf: BytesMut,
    /// Stateful: remembers how far it checked a frame that is still arriving.
    parser: resp::Parser,
    limits: resp::Limits,
}

impl RedisConn {
    /// Open the TCP connection (bounded by [`CONNECT_TIMEOUT`]).
    pub async fn open(cfg: &RedisConfig) -> io::Result<RedisConn> {
        let connect = async {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(&cfg.addr)?
                .next()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "no address for Redis host")
                })?;
            TcpStream::connect(addr).await
        };
        let stream = match monoio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(res) => res?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        };
        let _ = stream.set_nodelay(true);
        Ok(RedisConn {
            fd: stream.as_raw_fd(),
            stream,
            rbuf: BytesMut::with_capacity(16 << 10),
            parser: resp::Parser::new(),
            limits: resp::Limits::default(),
        })
    }

    /// AUTH when a password is configured, SELECT when asked and the db is not 0; an error reply
    /// fails the handshake (bounded by [`CONNECT_TIMEOUT`]).
    pub async fn handshake(&mut self, cfg: &RedisConfig, select_db: bool) -> io::Result<()> {
        let mut hello = BytesMut::new();
        let mut expected = 0;
        if let Some(pw) = &cfg.password {
            match &cfg.username {
                Some(user) => {
                    resp::encode_command(&mut hello, &[b"AUTH", user.as_bytes(), pw.as_bytes()])
                }
                None => resp::encode_command(&mut hello, &[b"AUTH", pw.as_bytes()]),
            }
            expected += 1;
        }
        if select_db && cfg.db != 0 {
            let db = cfg.db.to_string();
            resp::encode_command(&mut hello, &[b"SELECT", db.as_bytes()]);
            expected += 1;
        }
        if expected == 0 {
            return Ok(());
        }
        let replies =
            match monoio::time::timeout(CONNECT_TIMEOUT, self.pipeline(hello, expected)).await {
                Ok(res) => res?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "Redis handshake timed out",
                    ))
                }
            };
        for r in replies {
            if let Frame::Error(e) = r {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "Redis refused the handshake: {}",
                        String::from_utf8_lossy(&e)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Write encoded commands and read `n` replies (error replies are returned, not raised).
    pub async fn pipeline(&mut self, cmds: BytesMut, n: usize) -> io::Result<Vec<Frame>> {
        if !cmds.is_empty() {
            let (res, _) = self.stream.write_all(cmds.freeze()).await;
            res?;
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.push(self.next_frame().await?);
        }
        Ok(out)
    }

    /// Wait for the next complete frame.
    pub async fn next_frame(&mut self) -> io::Result<Frame> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            if fill(&self.stream, self.fd, &mut self.rbuf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// A complete frame already buffered, if any.
    fn try_frame(&mut self) -> io::Result<Option<Frame>> {
        self.parser
            .parse(&mut self.rbuf, &self.limits)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    /// Read what the socket has without waiting (after readiness). Ok(0): closed.
    fn read_available(&mut self) -> io::Result<usize> {
        let mut total = 0;
        loop {
            self.rbuf.reserve(16 << 10);
            match recv_into(self.fd, &mut self.rbuf) {
                Ok(0) => return if total == 0 { Ok(0) } else { Ok(total) },
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total.max(1)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if self.rbuf.len() >= 256 << 10 {
                return Ok(total);
            }
        }
    }
}

/// One connection's life: connect, authenticate, then pump commands and replies until it fails.
/// Returns the error that ended it.
async fn session(shard: &ShardRef, links: &Rc<RefCell<Links>>, role: Role) -> io::Error {
    let cfg = links.borrow().cfg.clone();
    let mut conn = match RedisConn::open(&cfg).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    links.borrow_mut().io(role).state = LinkState::Authenticating;
    if let Err(e) = conn.handshake(&cfg, role != Role::Subscriber).await {
        return e;
    }
    if let Err(e) = history::prepare(&mut conn, links, role).await {
        return e;
    }
    links.borrow_mut().on_ready(role);

    let mut last_activity = Instant::now();
    loop {
        // Write what is queued (never cancelled mid-write).
        let out = links.borrow_mut().take_output(role);
        if let Some(out) = out {
            let (res, _) = conn.stream.write_all(out).await;
            if let Err(e) = res {
                return e;
            }
            continue;
        }
        // Idle keepalive.
        {
            let mut l = links.borrow_mut();
            if let Some(sent) = l.io(role).ping_sent {
                if sent.elapsed() > PING_TIMEOUT {
                    return io::Error::new(io::ErrorKind::TimedOut, "Redis did not answer a ping");
                }
            } else if last_activity.elapsed() >= PING_INTERVAL {
                l.queue_ping(role);
                continue;
            }
        }
        // Wait for input, output, or the keepalive timer.
        let readable = {
            let output = std::future::poll_fn(|cx| {
                let mut l = links.borrow_mut();
                let io = l.io(role);
                if io.has_output() {
                    Poll::Ready(())
                } else {
                    io.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            });
            let output = pin!(output);
            let timer = pin!(monoio::time::sleep(PING_INTERVAL));
            let wait_out = select(output, timer);
            match select(pin!(conn.stream.readable(false)), wait_out).await {
                Either::Left((res, _)) => Some(res),
                Either::Right(_) => None,
            }
        };
        match readable {
            None => continue,
            Some(Err(e)) => return e,
            Some(Ok(())) => {}
        }
        match conn.read_available() {
            Ok(0) => return io::ErrorKind::UnexpectedEof.into(),
            Ok(_) => {}
            Err(e) => return e,
        }
        last_activity = Instant::now();
        loop {
            let frame = match conn.try_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return e,
            };
            if let Err(e) = handle_frame(shard, links, role, frame) {
                return e;
            }
        }
        if conn.rbuf.is_empty() && conn.rbuf.capacity() > 64 << 10 {
            conn.rbuf = BytesMut::with_capacity(16 << 10);
        }
    }
}

/// Wait for readability and read into `rbuf`.
async fn fill(stream: &TcpStream, fd: i32, rbuf: &mut BytesMut) -> io::Result<usize> {
    loop {
        stream.readable(false).await?;
        rbuf.reserve(16 << 10);
        match recv_into(fd, rbuf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// A message arrived on this instance's inbox channel (a [`crate::registry::InboxMsg`]): a
/// send or disconnect for one connection goes to that connection's shard (or is done here); one
/// for a user goes to every shard, each acting on its own connections of that user. Malformed
/// payloads and connections of other instances are ignored.
fn route_inbox(shard: &ShardRef, payload: &[u8]) {
    use crate::inbox::ShardMsg;
    use crate::registry::{parse_conn_id, Action, InboxMsg, Target};
    let msg = match InboxMsg::decode(payload) {
        Ok(msg) => msg,
        Err(e) => {
            tracing::debug!(error = %e, "ignored a malformed inbox message");
            return;
        }
    };
    let mut s = shard.borrow_mut();
    match msg.target {
        Target::Connection(id) => {
            let Some((instance, target, key, seq)) = parse_conn_id(&id) else {
                return;
            };
            if instance != &*s.instance || target >= s.peers.len() {
                return;
            }
            match msg.action {
                Action::Send(data) if target == s.id => {
                    s.deliver_direct(key, seq, data.as_bytes());
                }
                Action::Send(data) => s.peers[target].push(ShardMsg::Direct {
                    key,
                    seq,
                    data: bytes::Bytes::from(data),
                    reply: None,
                }),
                Action::Disconnect { code, reason } if target == s.id => {
                    s.disconnect(key, seq, code, &reason);
                }
                Action::Disconnect { code, reason } => s.peers[target].push(ShardMsg::Disconnect {
                    key,
                    seq,
                    code,
                    reason: Arc::from(reason),
                    reply: None,
                }),
            }
        }
        Target::User(user) => {
            let user: Arc<str> = Arc::from(user);
            match msg.action {
                Action::Send(data) => {
                    let data = bytes::Bytes::from(data);
                    for inbox in s.peers.iter() {
                        // Nobody waits for the count.
                        let (reply, _) = futures_channel::oneshot::channel();
                        inbox.push(ShardMsg::UserDirect {
                            user: user.clone(),
                            data: data.clone(),
                            reply,
                        });
                    }
                }
                Action::Disconnect { code, reason } => {
                    let reason: Arc<str> = Arc::from(reason);
                    for inbox in s.peers.iter() {
                        inbox.push(ShardMsg::UserDisconnect {
                            user: user.clone(),
                            code,
                            reason: reason.clone(),
                            reply: None,
                        });
                    }
                }
            }
        }
    }
}

/// Act on one frame from Redis.
fn handle_frame(
    shard: &ShardRef,
    links: &Rc<RefCell<Links>>,
    role: Role,
    frame: Frame,
) -> io::Result<()> {
    match role {
        Role::Publisher => {
            history::on_publisher_reply(links, frame);
            Ok(())
        }
        Role::Reader => history::on_reader_reply(shard, links, frame),
        Role::Subscriber => {
            if let Frame::Simple(s) = &frame {
                // A subscriber link with no subscriptions answers PING like any connection.
                if s.eq_ignore_ascii_case(b"PONG") {
                    links.borrow_mut().subscriber.ping_sent = None;
                }
                return Ok(());
            }
            if let Frame::Error(e) = &frame {
                return Err(io::Error::other(format!(
                    "Redis error on the subscriber link: {}",
                    String::from_utf8_lossy(e)
                )));
            }
            let Some(event) = resp::as_pubsub(&frame) else {
                return Ok(());
            };
            let name = |ch: &[u8]| -> Option<String> {
                links
                    .borrow()
                    .channel_of(ch)
                    .map(|(name, _)| name.to_owned())
            };
            match event {
                PubSub::Message { channel, payload }
                    if links.borrow().inbox.as_deref() == Some(&channel[..]) =>
                {
                    route_inbox(shard, &payload);
                }
                PubSub::Message { channel, payload } => {
                    let target = links.borrow().channel_of(&channel);
                    match target {
                        Some((ch, true)) => history::on_message(shard, links, ch, &payload),
                        Some((ch, false)) => {
                            let data = crate::protocol::payload_to_json(&payload);
                            let mut s = shard.borrow_mut();
                            s.metrics.bus_messages_received += 1;
                            s.deliver_local(ch, &data);
                        }
                        None => {}
                    }
                }
                PubSub::Subscribed { channel, .. } => {
                    if let Some(ch) = name(&channel) {
                        let release = links.borrow_mut().confirmed(&ch, Cmd::Sub);
                        if release {
                            shard.borrow_mut().subscription_confirmed(&ch);
                        }
                    }
                }
                PubSub::Unsubscribed { channel, .. } => {
                    if let Some(ch) = name(&channel) {
                        links.borrow_mut().confirmed(&ch, Cmd::Unsub);
                    }
                }
                PubSub::Pong(_) => links.borrow_mut().subscriber.ping_sent = None,
                PubSub::PMessage { .. } => {}
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Rc<RefCell<Links>> {
        let cfg = Arc::new(RedisConfig::from_url("redis://127.0.0.1:1").unwrap());
        let l = Links::new(cfg, 0, Readiness::new(1, false), None);
        l.borrow_mut().on_ready(Role::Subscriber);
        l.borrow_mut().on_ready(Role::Publisher);
        l
    }

    fn sent(l: &Rc<RefCell<Links>>) -> Vec<String> {
        let mut out = l.borrow_mut().subscriber.out.split();
        let mut cmds = Vec::new();
        while let Some(Frame::Array(parts)) =
            resp::parse(&mut out, &resp::Limits::default()).unwrap()
        {
            let words: Vec<String> = parts
                .iter()
                .map(|p| match p {
                    Frame::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
                    other => format!("{other:?}"),
                })
                .collect();
            cmds.push(words.join(" "));
        }
        cmds
    }

    #[test]
    fn churn_ends_in_the_last_wanted_state() {
        let l = links();
        l.borrow_mut().want("a");
        l.borrow_mut().unwant("a");
        l.borrow_mut().want("a");
        assert_eq!(
            sent(&l),
            [
                "SUBSCRIBE ws:chan:a",
                "UNSUBSCRIBE ws:chan:a",
                "SUBSCRIBE ws:chan:a"
            ]
        );
        assert!(l.borrow().pending("a"));
        // Confirmations arrive in order; acks are released only by the last SUBSCRIBE.
        assert!(
            !l.borrow_mut().confirmed("a", Cmd::Sub),
            "an UNSUBSCRIBE follows"
        );
        assert!(!l.borrow_mut().confirmed("a", Cmd::Unsub));
        assert!(l.borrow_mut().confirmed("a", Cmd::Sub));
        assert!(!l.borrow().pending("a"));
        // Wanting again while subscribed sends nothing.
        l.borrow_mut().want("a");
        assert!(sent(&l).is_empty());
    }

    #[test]
    fn leave_join_leave_ends_unsubscribed_and_forgotten() {
        let l = links();
        l.borrow_mut().want("b");
        l.borrow_mut().confirmed("b", Cmd::Sub);
        l.borrow_mut().unwant("b");
        l.borrow_mut().want("b");
        l.borrow_mut().unwant("b");
        assert_eq!(
            sent(&l),
            [
                "SUBSCRIBE ws:chan:b",
                "UNSUBSCRIBE ws:chan:b",
                "SUBSCRIBE ws:chan:b",
                "UNSUBSCRIBE ws:chan:b"
            ]
        );
        l.borrow_mut().confirmed("b", Cmd::Unsub);
        l.borrow_mut().confirmed("b", Cmd::Sub);
        l.borrow_mut().confirmed("b", Cmd::Unsub);
        assert!(
            l.borrow().channels.is_empty(),
            "no state left for an unwanted channel"
        );
    }

    #[test]
    fn reconnect_resubscribes_only_wanted_channels() {
        let l = links();
        for c in ["x", "y", "z"] {
            l.borrow_mut().want(c);
        }
        l.borrow_mut().unwant("y");
        sent(&l);
        l.borrow_mut().on_down(Role::Subscriber, "test");
        assert!(
            !l.borrow().pending("x"),
            "nothing is pending while the link is down"
        );
        // While down, joins and leaves only change the wanted set.
        l.borrow_mut().want("w");
        l.borrow_mut().unwant("z");
        assert!(sent(&l).is_empty());
        l.borrow_mut().on_ready(Role::Subscriber);
        let cmds = sent(&l);
        assert_eq!(cmds.len(), 1);
        let mut chans: Vec<&str> = cmds[0].split(' ').skip(1).collect();
        chans.sort();
        assert_eq!(chans, ["ws:chan:w", "ws:chan:x"]);
        assert!(l.borrow().pending("w") && l.borrow().pending("x"));
    }

    #[test]
    fn readiness_needs_both_links() {
        let cfg = Arc::new(RedisConfig::from_url("redis://127.0.0.1:1").unwrap());
        let ready = Readiness::new(2, false);
        ready.set(1, true);
        let l = Links::new(cfg, 0, ready.clone(), None);
        l.borrow_mut().on_ready(Role::Publisher);
        assert!(!ready.all());
        l.borrow_mut().on_ready(Role::Subscriber);
        assert!(ready.all());
        l.borrow_mut().on_down(Role::Publisher, "test");
        assert!(!ready.all());
        let mut b = RedisBroker::new(l);
        assert_eq!(b.publish("c", b"1"), Err(BrokerError::Unavailable));
    }
    #[test]
    fn readiness_waits_for_resubscriptions_after_a_reconnect() {
        let cfg = Arc::new(RedisConfig::from_url("redis://127.0.0.1:1").unwrap());
        let ready = Readiness::new(1, false);
        let l = Links::new(cfg, 0, ready.clone(), None);
        l.borrow_mut().on_ready(Role::Publisher);
        l.borrow_mut().on_ready(Role::Subscriber);
        l.borrow_mut().want("a");
        l.borrow_mut().want("b");
        l.borrow_mut().on_down(Role::Subscriber, "test");
        l.borrow_mut().on_ready(Role::Subscriber);
        assert_eq!(l.borrow().subscriber.state, LinkState::Subscribing);
        assert!(
            !ready.all(),
            "not ready until Redis confirmed the re-subscriptions"
        );
        assert!(
            l.borrow().pending("a"),
            "a new subscriber of `a` waits for the confirmation"
        );
        l.borrow_mut().confirmed("a", Cmd::Sub);
        assert!(!ready.all());
        l.borrow_mut().confirmed("b", Cmd::Sub);
        assert!(ready.all());
        assert_eq!(l.borrow().subscriber.state, LinkState::Ready);
    }
}
