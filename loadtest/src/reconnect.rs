//! The `reconnect` scenario: history recovery while publishers run.
//!
//! N subscribers, spread round-robin over K history channels (`<--channel-prefix>load-<run>-<k>`)
//! and over the subscribe instances, each subscribe once at setup and remember the channel's
//! epoch and top offset. P publishers publish at a fixed total rate (open loop, [`Schedule`])
//! round-robin over the channels, every message `{"p":P,"s":S,"t":T,"x":…}` as in `fanout`,
//! either over WebSocket with an `id` (acknowledged by `published`) or as `POST /publish` on an
//! `http://` publish URL (acknowledged by 200). After the warmup a per-thread drop scheduler
//! (`dropper`) drops subscribers: staggered (each once per `--drop-every`) or in waves
//! (`--drop-fraction` of them at once); by a WebSocket close (read on until the hub's close) or
//! by a TCP reset. A dropped subscriber stays away `--down-time`, reconnects (to the next
//! instance unless `--sticky`) and subscribes with `since` = the last offset it received.
//!
//! Per reconnect: the reply (`recovered` true or false; reply time), the backlog (top − since
//! messages) and the recovery time: subscribe-with-since written → the message at the reply's
//! top read (the first one above it, should it be missing), or → the reply for an empty backlog.
//!
//! End to end, each subscriber keeps one [`Tracker`] (per (publisher, channel) sequence
//! numbers) and one [`Offsets`] across all its connections, so a message received twice —
//! live before the drop and again in the backlog — is a duplicate, and one never received is
//! lost: expected = Σ over channels of acknowledged publishes × subscribers, less the messages
//! of `recovered:false` windows (top − since of such a reply: "not recoverable", reported
//! apart). A subscriber whose window cannot be sized (the epoch changed, `since` ahead of the
//! top, no `recovered` in the reply) leaves the loss accounting and is counted.

use crate::auth;
use crate::cli::{DropMode, ReconnectArgs};
use crate::client::{self, Conn, ConnError, Reader, Subscribed, Target, Writer, CLOSE, PING};
use crate::client::{PONG, TEXT};
use crate::http::{self, Responses};
use crate::report::{Cpu, CpuProbe, Deliveries, Report};
use crate::schedule::Schedule;
use crate::stats::{mono_ns, new_hist, Closes, Tally};
use crate::track::{OffsetCounts, Offsets, Seen, SeqCounts, Tracker};
use crate::traffic::{error_code, parse_message, parse_reset, run_id};
use crate::worker::{Live, PreciseTimer, Signal};
use crate::Prepared;
use bytes::Bytes;
use hdrhistogram::Histogram;
use monoio::io::{AsyncWriteRentExt, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use serde_json::json;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being set up at once, per thread.
const SETUPS_IN_FLIGHT: usize = 128;
/// Most messages a publisher writes in one batch.
const MAX_BATCH: u64 = 64;
/// Read buffer per connection.
const CHUNK: usize = 16 * 1024;
/// Size of the data object without padding, roughly: `{"p":0,"s":0,"t":…,"x":""}`.
const DATA_OVERHEAD: usize = 40;
/// After the schedule ends: wait at most this long for acknowledgements, reconnects and the
/// last deliveries…
const DRAIN_MAX_NS: u64 = 10_000_000_000;
/// …and stop waiting once nothing arrived for this long.
const DRAIN_IDLE_NS: u64 = 2_000_000_000;
/// Longest a close frame waits for the writer (busy with a pong) before giving up.
const CLOSE_WRITER_TRIES: u32 = 1000;

/// What the run does, the same on every thread.
struct Plan {
    subscribers: usize,
    channels: usize,
    publishers: usize,
    rate: f64,
    /// Channel names are `{prefix}{index}` (`--channel-prefix` + `load-<run id>-`).
    prefix: String,
    pad: String,
    targets: Vec<Target>,
    pub_targets: Vec<usize>,
    sub_targets: Vec<usize>,
    sticky: bool,
    drop_mode: DropMode,
    drop_every_ns: u64,
    /// Subscribers dropped together, once per period (None: staggered, one at a time).
    wave: Option<usize>,
    down_ns: u64,
    warmup_ns: u64,
    measure_ns: u64,
    threads: usize,
    source_ips: Vec<IpAddr>,
    uring: bool,
    /// One token per WebSocket connection: publishers 0..P, subscriber i is P + i.
    tokens: Option<Arc<auth::Tokens>>,
    api_key: Option<String>,
}

impl Plan {
    fn channel_name(&self, c: usize) -> String {
        format!("{}{c}", self.prefix)
    }

    fn sub_channel(&self, i: usize) -> usize {
        i % self.channels
    }

    /// The target of subscriber `i`'s connection number `n` (0 at setup): the next instance
    /// at every reconnect unless sticky.
    fn sub_target(&self, i: usize, n: usize) -> usize {
        let k = if self.sticky { i } else { i + n };
        self.sub_targets[k % self.sub_targets.len()]
    }

    fn pub_target(&self, p: usize) -> &Target {
        &self.targets[self.pub_targets[p % self.pub_targets.len()]]
    }

    /// WebSocket publishers (set up with the subscribers; HTTP ones connect at the start).
    fn ws_publishers(&self) -> usize {
        (0..self.publishers)
            .filter(|&p| !self.pub_target(p).http)
            .count()
    }

    /// The drops of thread `tid`'s subscribers: (ns after the start, subscriber), by time.
    /// Drops start after the warmup; each is kept only if its reconnect (down time later)
    /// falls before the end of the schedule, so every reconnect happens while publishers run.
    fn drops(&self, tid: usize) -> Vec<(u64, usize)> {
        let end = self.warmup_ns + self.measure_ns;
        let every = self.drop_every_ns as f64;
        let at = |periods: f64| self.warmup_ns + (periods * every).round() as u64;
        let fits = |t: u64| t + self.down_ns < end;
        let n = self.subscribers;
        let mut out = Vec::new();
        match self.wave {
            None => {
                for i in (tid..n).step_by(self.threads) {
                    let phase = (i as f64 + 0.5) / n as f64;
                    for k in 0.. {
                        let t = at(phase + k as f64);
                        if !fits(t) {
                            break;
                        }
                        out.push((t, i));
                    }
                }
            }
            Some(m) => {
                for w in 0.. {
                    let t = at(w as f64 + 0.5);
                    if !fits(t) {
                        break;
                    }
                    for j in 0..m {
                        let i = (w * m + j) % n;
                        if i % self.threads == tid {
                            out.push((t, i));
                        }
                    }
                }
            }
        }
        out.sort_unstable();
        out
    }
}

/// Counters of one thread, moved into the shared totals every 250 ms. Gauges (`connected`,
/// `away`, `recovering`, `unanswered`) are deltas that add up across threads.
#[derive(Default)]
struct Counts {
    setup_ok: u64,
    setup_failed: u64,
    anonymous: u64,
    /// Subscribers with an open connection.
    connected: i64,
    /// Subscribers dropped (or lost) and not yet reconnected.
    away: i64,
    /// Reconnected subscribers waiting for their reply or backlog.
    recovering: i64,
    /// Publishes written and not yet answered.
    unanswered: i64,
    publishers_done: u64,
    /// Subscribers set up, per channel.
    subs: Vec<u64>,
    /// Publishes written / acknowledged, per channel.
    sent: Vec<u64>,
    acked: Vec<u64>,
    /// Publishes the hub answered with an error.
    refused: u64,
    scheduled: u64,
    unsent: u64,
    seq: SeqCounts,
    offsets: OffsetCounts,
    drops: u64,
    /// Drops due while the subscriber was not connected (still away).
    drops_skipped: u64,
    /// Connections that ended without being dropped by us (then reconnected like drops).
    lost_conns: u64,
    /// Reconnect attempts that failed before the subscribe was written (retried).
    failed_attempts: u64,
    /// Subscribes with `since` written.
    reconnects: u64,
    replies: u64,
    recovered: u64,
    not_recoverable: u64,
    /// Messages in `recovered:false` windows (top − since).
    window_msgs: u64,
    /// Subscribers left out of the loss accounting, and what they contributed.
    unaccounted: u64,
    excluded_subs: Vec<u64>,
    excluded_unique: u64,
    excluded_window_msgs: u64,
    /// top − since of each `recovered:true` reply.
    backlog: Vec<u64>,
    /// Backlog messages received (offset in since+1..=top).
    backlog_received: u64,
    /// Recoveries cut short (dropped again, or the run ended) before complete.
    incomplete: u64,
    window_deliveries: u64,
    unexpected: u64,
    errors: Tally,
    closes: Closes,
}

impl Counts {
    fn with_channels(c: usize) -> Self {
        Counts {
            subs: vec![0; c],
            sent: vec![0; c],
            acked: vec![0; c],
            excluded_subs: vec![0; c],
            ..Default::default()
        }
    }

    fn absorb(&mut self, o: &mut Counts) {
        use std::mem::take;
        let sum = |d: &mut Vec<u64>, s: &mut Vec<u64>| {
            for (d, s) in d.iter_mut().zip(s.iter_mut()) {
                *d += take(s);
            }
        };
        sum(&mut self.subs, &mut o.subs);
        sum(&mut self.sent, &mut o.sent);
        sum(&mut self.acked, &mut o.acked);
        sum(&mut self.excluded_subs, &mut o.excluded_subs);
        self.setup_ok += take(&mut o.setup_ok);
        self.setup_failed += take(&mut o.setup_failed);
        self.anonymous += take(&mut o.anonymous);
        self.connected += take(&mut o.connected);
        self.away += take(&mut o.away);
        self.recovering += take(&mut o.recovering);
        self.unanswered += take(&mut o.unanswered);
        self.publishers_done += take(&mut o.publishers_done);
        self.refused += take(&mut o.refused);
        self.scheduled += take(&mut o.scheduled);
        self.unsent += take(&mut o.unsent);
        self.seq.absorb(&mut o.seq);
        self.offsets.absorb(&mut o.offsets);
        self.drops += take(&mut o.drops);
        self.drops_skipped += take(&mut o.drops_skipped);
        self.lost_conns += take(&mut o.lost_conns);
        self.failed_attempts += take(&mut o.failed_attempts);
        self.reconnects += take(&mut o.reconnects);
        self.replies += take(&mut o.replies);
        self.recovered += take(&mut o.recovered);
        self.not_recoverable += take(&mut o.not_recoverable);
        self.window_msgs += take(&mut o.window_msgs);
        self.unaccounted += take(&mut o.unaccounted);
        self.excluded_unique += take(&mut o.excluded_unique);
        self.excluded_window_msgs += take(&mut o.excluded_window_msgs);
        self.backlog.append(&mut o.backlog);
        self.backlog_received += take(&mut o.backlog_received);
        self.incomplete += take(&mut o.incomplete);
        self.window_deliveries += take(&mut o.window_deliveries);
        self.unexpected += take(&mut o.unexpected);
        self.errors.absorb(&mut o.errors);
        self.closes.absorb(&mut o.closes);
    }

    /// Deliveries owed: every acknowledged publish to every accounted subscriber of its
    /// channel, less the accounted `recovered:false` windows.
    fn expected(&self) -> u64 {
        let owed: u64 = (self.acked.iter().zip(&self.subs).zip(&self.excluded_subs))
            .map(|((a, s), x)| a * s.saturating_sub(*x))
            .sum();
        owed.saturating_sub(self.window_msgs.saturating_sub(self.excluded_window_msgs))
    }

    /// Distinct deliveries to accounted subscribers.
    fn delivered(&self) -> u64 {
        self.seq.unique().saturating_sub(self.excluded_unique)
    }
}

/// Totals the worker threads add to; read by the main thread.
struct Agg {
    counts: Counts,
    /// Recovery times (ns) of `recovered:true` reconnects.
    recovery: Histogram<u64>,
    /// Subscribe-with-since → reply, every reconnect.
    reply: Histogram<u64>,
    send_lag: Histogram<u64>,
}

struct Shared {
    /// CLOCK_MONOTONIC ns at which publishing starts; 0 until setup is complete.
    start_ns: AtomicU64,
    stop_publishing: AtomicBool,
    stop: AtomicBool,
    agg: Mutex<Agg>,
}

struct Local {
    counts: Counts,
    recovery: Histogram<u64>,
    reply: Histogram<u64>,
    send_lag: Histogram<u64>,
}

/// One thread's context, shared by its tasks.
struct Ctx {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    local: RefCell<Local>,
    live: Rc<Live>,
    /// This thread's subscribers, for the drop scheduler.
    subs: RefCell<HashMap<usize, Rc<Sub>>>,
    in_setup: Cell<usize>,
    setup_slot: Signal,
}

impl Ctx {
    /// Count a connection's end, unless the run is over (then it is ours).
    fn ended(&self, who: &str, e: ConnError) {
        if self.live.closing() {
            return;
        }
        let mut l = self.local.borrow_mut();
        match e {
            ConnError::Closed(code) => l.counts.closes.add(code),
            e => l.counts.errors.add(e.kind(), || format!("{who}: {e}")),
        }
    }

    fn setup_done(&self) {
        self.in_setup.set(self.in_setup.get() - 1);
        self.setup_slot.notify();
    }

    /// The run's start, once setup is over; None if the run ended first.
    async fn start(&self) -> Option<u64> {
        loop {
            match self.shared.start_ns.load(Relaxed) {
                0 if self.live.closing() => return None,
                0 => monoio::time::sleep(Duration::from_millis(1)).await,
                s => return Some(s),
            }
        }
    }

    /// Sleep `ns`, in steps short enough to notice the end of the run; false if it ended.
    async fn nap(&self, ns: u64) -> bool {
        let until = mono_ns() + ns;
        loop {
            if self.live.closing() {
                return false;
            }
            let left = until.saturating_sub(mono_ns());
            if left == 0 {
                return true;
            }
            monoio::time::sleep(Duration::from_nanos(left.min(100_000_000))).await;
        }
    }
}

/// One subscriber, across its connections, as the drop scheduler sees it.
struct Sub {
    /// The connection now open (None while away).
    link: RefCell<Option<Rc<Link>>>,
}

/// An open subscriber connection.
struct Link {
    fd: RawFd,
    /// The sending half, parked (pongs and our close frame borrow it).
    writer: RefCell<Option<Writer>>,
    /// The scheduler dropped it: its end is ours.
    dropped: Cell<bool>,
}

/// What a subscriber received on its channel, kept across its connections.
struct Ledger {
    chan: usize,
    /// Sequence numbers per (publisher, channel): duplicates and loss across reconnects.
    seqs: Tracker,
    /// Offsets of the channel: `since` for the next resubscribe.
    offsets: Offsets,
    epoch: String,
    /// Left out of the loss accounting (a window that cannot be sized).
    unaccounted: bool,
    /// Messages of this subscriber's `recovered:false` windows so far.
    windows: u64,
}

impl Ledger {
    /// What the next resubscribe passes as `since`: the last offset received (or the top the
    /// stream restarted after).
    fn since(&self) -> u64 {
        self.offsets.last(self.chan as u32).unwrap_or(0)
    }

    /// Leave the loss accounting, taking along what was counted so far.
    fn exclude(&mut self, c: &mut Counts) {
        if self.unaccounted {
            return;
        }
        self.unaccounted = true;
        c.unaccounted += 1;
        c.excluded_subs[self.chan] += 1;
        c.excluded_unique += self.seqs.unique();
        c.excluded_window_msgs += self.windows;
    }
}

/// Where a connection stands in its resubscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Subscribe with `since` written at `sent`; waiting for the reply.
    Reply { sent: u64, since: u64 },
    /// `recovered:true`: the backlog `since+1..=top` is arriving.
    Backlog { sent: u64, since: u64, top: u64 },
    /// Receiving live messages (the first connection, or recovery done).
    Live,
}

/// How a subscriber connection ended.
enum End {
    /// Dropped by the scheduler.
    Dropped,
    /// Closed by the hub or failed.
    Lost(ConnError),
}

/// Open subscriber `i`'s connection number `n`: upgraded and authenticated.
async fn open(ctx: &Ctx, i: usize, n: usize) -> Result<Conn, ConnError> {
    let plan = &ctx.plan;
    let k = plan.publishers + i;
    let src = (!plan.source_ips.is_empty()).then(|| plan.source_ips[k % plan.source_ips.len()]);
    let target = &plan.targets[plan.sub_target(i, n)];
    let seed = (k as u32 ^ (n as u32) << 20).wrapping_mul(0x9e37_79b9);
    let login = auth::login(plan.tokens.as_deref(), k);
    client::open(target, src, plan.uring, CHUNK, seed, login).await
}

/// Reconnect: open connection `n` and write the subscribe with `since`.
async fn resubscribe(
    ctx: &Ctx,
    i: usize,
    n: usize,
    name: &str,
    st: &Ledger,
) -> Result<(Conn, Phase), ConnError> {
    let mut conn = open(ctx, i, n).await?;
    let since = st.since();
    let cmd = json!({
        "type": "subscribe",
        "channel": name,
        "since": {"offset": since, "epoch": st.epoch},
        "id": 1,
    });
    let sent = mono_ns();
    conn.writer.send(TEXT, cmd.to_string().as_bytes()).await?;
    Ok((conn, Phase::Reply { sent, since }))
}

/// Subscriber `i`: set up, then live / dropped / away / reconnected until the run ends.
async fn subscriber(ctx: Rc<Ctx>, i: usize) {
    let _task = ctx.live.task();
    let plan = ctx.plan.clone();
    let chan = plan.sub_channel(i);
    let name = plan.channel_name(chan);
    let setup = async {
        let mut conn = open(&ctx, i, 0).await?;
        let reply = client::subscribe(&mut conn, std::slice::from_ref(&name)).await?;
        match reply.into_iter().next() {
            Some(Subscribed {
                epoch: Some(epoch),
                offset: Some(top),
                ..
            }) => Ok((conn, epoch, top)),
            _ => Err(ConnError::Protocol(format!(
                "{name} has no history (its `subscribed` carries no epoch and offset): give \
                 --channel-prefix a namespace with history_size > 0"
            ))),
        }
    };
    let res = monoio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .unwrap_or(Err(ConnError::Timeout));
    ctx.setup_done();
    let (conn, epoch, top) = match res {
        Ok(r) => r,
        Err(e) => {
            let mut l = ctx.local.borrow_mut();
            l.counts.setup_failed += 1;
            l.counts.errors.add(e.kind(), || e.to_string());
            return;
        }
    };
    {
        let mut l = ctx.local.borrow_mut();
        l.counts.setup_ok += 1;
        l.counts.anonymous += u64::from(conn.anonymous);
        l.counts.subs[chan] += 1;
    }
    let sub = Rc::new(Sub {
        link: RefCell::new(None),
    });
    ctx.subs.borrow_mut().insert(i, sub.clone());
    let mut st = Ledger {
        chan,
        seqs: Tracker::default(),
        offsets: Offsets::default(),
        epoch,
        unaccounted: false,
        windows: 0,
    };
    st.offsets.restart(chan as u32, top);
    let mut next = Some((conn, Phase::Live));
    let mut n = 0;
    while let Some((conn, phase)) = next.take() {
        let end = connected(&ctx, &sub, &mut st, conn, phase).await;
        if ctx.live.closing() {
            break;
        }
        if let End::Lost(e) = end {
            ctx.local.borrow_mut().counts.lost_conns += 1;
            ctx.ended(&format!("subscriber {i}"), e);
        }
        // Away for the down time, then reconnect (again after each failed attempt).
        ctx.local.borrow_mut().counts.away += 1;
        while ctx.nap(plan.down_ns).await {
            n += 1;
            let attempt = resubscribe(&ctx, i, n, &name, &st);
            let res = monoio::time::timeout(SETUP_TIMEOUT, attempt)
                .await
                .unwrap_or(Err(ConnError::Timeout));
            match res {
                Ok(c) => {
                    let mut l = ctx.local.borrow_mut();
                    l.counts.reconnects += 1;
                    l.counts.recovering += 1;
                    next = Some(c);
                    break;
                }
                Err(e) => {
                    let mut l = ctx.local.borrow_mut();
                    l.counts.failed_attempts += 1;
                    l.counts.errors.add(e.kind(), || format!("reconnect: {e}"));
                }
            }
        }
        ctx.local.borrow_mut().counts.away -= 1;
    }
}

/// Run one connection of a subscriber until it ends: account its frames, finish a recovery.
async fn connected(ctx: &Ctx, sub: &Sub, st: &mut Ledger, conn: Conn, mut phase: Phase) -> End {
    let Conn {
        mut reader,
        writer,
        fd,
        ..
    } = conn;
    let _fd = ctx.live.socket(fd);
    let link = Rc::new(Link {
        fd,
        writer: RefCell::new(Some(writer)),
        dropped: Cell::new(false),
    });
    *sub.link.borrow_mut() = Some(link.clone());
    ctx.local.borrow_mut().counts.connected += 1;
    let end = read_frames(ctx, &link, st, &mut reader, &mut phase).await;
    *sub.link.borrow_mut() = None;
    let mut l = ctx.local.borrow_mut();
    l.counts.connected -= 1;
    if phase != Phase::Live {
        l.counts.incomplete += 1;
        l.counts.recovering -= 1;
    }
    end
}

/// The hot path of a subscriber: frames until the connection ends.
async fn read_frames(
    ctx: &Ctx,
    link: &Link,
    st: &mut Ledger,
    reader: &mut Reader,
    phase: &mut Phase,
) -> End {
    loop {
        let res = reader.next_frame().await;
        if link.dropped.get() && (ctx.plan.drop_mode == DropMode::Abort || res.is_err()) {
            // Aborted: whatever is still buffered is lost with the connection.
            return End::Dropped;
        }
        match res {
            Ok((TEXT, t)) => {
                if let Err(e) = on_text(ctx, st, &t, reader.read_ns, phase) {
                    return End::Lost(e);
                }
            }
            Ok((PING, p)) => {
                let parked = link.writer.borrow_mut().take();
                if let Some(mut w) = parked {
                    let res = w.send(PONG, &p).await;
                    *link.writer.borrow_mut() = Some(w);
                    if let Err(e) = res {
                        return End::Lost(e);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => return End::Lost(e),
        }
    }
}

/// Account one text frame of a subscriber, read at `at`. An error ends the connection.
fn on_text(
    ctx: &Ctx,
    st: &mut Ledger,
    text: &[u8],
    at: u64,
    phase: &mut Phase,
) -> Result<(), ConnError> {
    let plan = &ctx.plan;
    let prefix = plan.prefix.as_bytes();
    let mut l = ctx.local.borrow_mut();
    let l = &mut *l;
    let chan = st.chan as u32;
    if let Some(m) = parse_message(text, prefix) {
        if m.chan != st.chan || m.p as usize >= plan.publishers {
            l.counts.unexpected += 1;
            l.counts.errors.add("unexpected message", || {
                format!(
                    "message from publisher {} on {} (subscribed to {})",
                    m.p,
                    plan.channel_name(m.chan),
                    plan.channel_name(st.chan)
                )
            });
            return Ok(());
        }
        let seen = st.seqs.observe(m.p, chan, m.s);
        l.counts.seq.add(seen);
        if st.unaccounted && seen != Seen::Duplicate {
            l.counts.excluded_unique += 1;
        }
        let warm_end = ctx.shared.start_ns.load(Relaxed) + plan.warmup_ns;
        if at >= warm_end && at < warm_end + plan.measure_ns {
            l.counts.window_deliveries += 1;
        }
        let Some(o) = m.offset else {
            l.counts.errors.add("message without offset", || {
                format!(
                    "{} carries no offset: not a history channel",
                    plan.channel_name(m.chan)
                )
            });
            return Ok(());
        };
        l.counts.offsets.add(st.offsets.observe(chan, o));
        if let Phase::Backlog { sent, since, top } = *phase {
            if o > since && o <= top {
                l.counts.backlog_received += 1;
            }
            if o >= top {
                l.recovery.saturating_record(at.saturating_sub(sent).max(1));
                l.counts.recovering -= 1;
                *phase = Phase::Live;
            }
        }
        return Ok(());
    }
    if let Phase::Reply { sent, since } = *phase {
        if let Some(r) = Subscribed::parse(text) {
            on_reply(l, st, r, at, sent, since, phase);
            return Ok(());
        }
    }
    if let Some((c, top, epoch)) = parse_reset(text, prefix) {
        if c == st.chan {
            st.offsets.restart(chan, top);
            st.epoch = epoch;
            l.counts.offsets.resets += 1;
            return Ok(());
        }
    }
    if client::is_type(text, "error") {
        let code = error_code(text);
        l.counts.errors.add(&format!("hub error {code}"), || {
            String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned()
        });
        if matches!(phase, Phase::Reply { .. }) {
            return Err(ConnError::Protocol(format!(
                "the subscribe with since was refused: {code}"
            )));
        }
        return Ok(());
    }
    l.counts.unexpected += 1;
    l.counts.errors.add("unexpected frame", || {
        let t = String::from_utf8_lossy(&text[..text.len().min(160)]);
        format!("unexpected text frame: {t}")
    });
    Ok(())
}

/// The reply to a subscribe with `since`, written at `sent`, read at `at`.
fn on_reply(
    l: &mut Local,
    st: &mut Ledger,
    r: Subscribed,
    at: u64,
    sent: u64,
    since: u64,
    phase: &mut Phase,
) {
    let chan = st.chan as u32;
    l.counts.replies += 1;
    l.reply.saturating_record(at.saturating_sub(sent).max(1));
    let same_epoch = r.epoch.as_deref() == Some(st.epoch.as_str());
    let top = r.offset.unwrap_or(since);
    if let Some(e) = r.epoch {
        st.epoch = e;
    }
    match r.recovered {
        Some(true) => {
            l.counts.recovered += 1;
            let backlog = top.saturating_sub(since);
            l.counts.backlog.push(backlog);
            if backlog == 0 {
                l.recovery.saturating_record(at.saturating_sub(sent).max(1));
                l.counts.recovering -= 1;
                *phase = Phase::Live;
            } else {
                *phase = Phase::Backlog { sent, since, top };
            }
        }
        not => {
            // Nothing missed is coming: live messages follow from top + 1.
            l.counts.not_recoverable += u64::from(not == Some(false));
            if not.is_none() {
                l.counts.errors.add("reply without recovered", || {
                    "the hub answered a subscribe with since without `recovered`: it does not \
                     recover history"
                        .into()
                });
            }
            if not.is_some() && same_epoch && top >= since {
                let window = top - since;
                st.windows += window;
                l.counts.window_msgs += window;
                if st.unaccounted {
                    l.counts.excluded_window_msgs += window;
                }
            } else {
                st.exclude(&mut l.counts);
            }
            st.offsets.restart(chan, top);
            l.counts.recovering -= 1;
            *phase = Phase::Live;
        }
    }
}

/// Thread `tid`'s drop scheduler: drops each due subscriber that is connected.
async fn dropper(ctx: Rc<Ctx>, drops: Vec<(u64, usize)>) {
    let _task = ctx.live.task();
    let plan = ctx.plan.clone();
    let Some(start) = ctx.start().await else {
        return;
    };
    let mut timer = match PreciseTimer::new(&ctx.live, plan.uring) {
        Ok(t) => t,
        Err(e) => return ctx.ended("drop scheduler", e),
    };
    for (t, i) in drops {
        if timer.sleep_until(start + t).await.is_err() || ctx.live.closing() {
            return;
        }
        let link = ctx
            .subs
            .borrow()
            .get(&i)
            .and_then(|s| s.link.borrow().clone());
        let mut l = ctx.local.borrow_mut();
        match link {
            Some(link) if !link.dropped.get() => {
                l.counts.drops += 1;
                link.dropped.set(true);
                match plan.drop_mode {
                    DropMode::Abort => client::abort(link.fd),
                    DropMode::Close => {
                        monoio::spawn(send_close(ctx.clone(), link));
                    }
                }
            }
            _ => l.counts.drops_skipped += 1,
        }
    }
}

/// Start a close handshake on `link`; its reader reads on until the hub's close.
async fn send_close(ctx: Rc<Ctx>, link: Rc<Link>) {
    let _task = ctx.live.task();
    for _ in 0..CLOSE_WRITER_TRIES {
        let parked = link.writer.borrow_mut().take();
        if let Some(mut w) = parked {
            // A failed write ends the reader too (the connection is gone).
            let _ = w.send(CLOSE, &1000u16.to_be_bytes()).await;
            *link.writer.borrow_mut() = Some(w);
            return;
        }
        if ctx.live.closing() {
            return;
        }
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A publisher's sending side.
enum Out {
    /// Publish frames with an `id`.
    Ws(Writer),
    /// `POST /publish` requests on a keep-alive connection.
    Http {
        io: OwnedWriteHalf<TcpStream>,
        buf: Vec<u8>,
    },
}

/// What a publisher's reader and writer share.
#[derive(Default)]
struct PubState {
    /// (id, channel) of every publish written and not yet answered, oldest first (answers
    /// come in order).
    pending: RefCell<VecDeque<(u64, usize)>>,
    /// A ping payload to answer with the next write (WebSocket).
    pong: RefCell<Option<Bytes>>,
    /// The writer once publishing is over (kept: dropping it would shut the sending side).
    parked: RefCell<Option<Out>>,
}

/// A publisher's open connection: the sending side and what reads the answers.
enum PubConn {
    Ws(Conn),
    Http(TcpStream),
}

async fn pub_connect(ctx: &Ctx, p: usize) -> Result<PubConn, ConnError> {
    let plan = &ctx.plan;
    let target = plan.pub_target(p);
    let src = (!plan.source_ips.is_empty()).then(|| plan.source_ips[p % plan.source_ips.len()]);
    if target.http {
        return client::connect(target.addr, src, plan.uring)
            .await
            .map(PubConn::Http);
    }
    let seed = (p as u32).wrapping_mul(0x9e37_79b9) ^ 0x5555;
    let login = auth::login(plan.tokens.as_deref(), p);
    client::open(target, src, plan.uring, CHUNK, seed, login)
        .await
        .map(PubConn::Ws)
}

/// Publisher `p`: WebSocket ones connect during setup, HTTP ones at the start (an idle
/// keep-alive connection would be closed by the hub while the subscribers set up).
async fn publisher(ctx: Rc<Ctx>, p: usize) {
    let _task = ctx.live.task();
    let http = ctx.plan.pub_target(p).http;
    let conn = if http {
        match ctx.start().await {
            Some(_) => monoio::time::timeout(SETUP_TIMEOUT, pub_connect(&ctx, p)).await,
            None => return,
        }
    } else {
        let res = monoio::time::timeout(SETUP_TIMEOUT, pub_connect(&ctx, p)).await;
        ctx.setup_done();
        res
    };
    let conn = match conn.unwrap_or(Err(ConnError::Timeout)) {
        Ok(c) => c,
        Err(e) => {
            let mut l = ctx.local.borrow_mut();
            if http {
                l.counts
                    .errors
                    .add(e.kind(), || format!("publisher {p}: {e}"));
                l.counts.publishers_done += 1;
            } else {
                l.counts.setup_failed += 1;
                l.counts
                    .errors
                    .add(e.kind(), || format!("publisher {p}: {e}"));
            }
            return;
        }
    };
    let st = Rc::new(PubState::default());
    let res = match conn {
        PubConn::Ws(conn) => {
            {
                let mut l = ctx.local.borrow_mut();
                l.counts.setup_ok += 1;
                l.counts.anonymous += u64::from(conn.anonymous);
            }
            let _fd = ctx.live.socket(conn.fd);
            let Conn {
                mut reader, writer, ..
            } = conn;
            monoio::spawn(publish_task(ctx.clone(), Out::Ws(writer), st.clone(), p));
            ws_acks(&ctx, &mut reader, &st).await
        }
        PubConn::Http(stream) => {
            let _fd = ctx.live.socket(stream.as_raw_fd());
            let (r, w) = stream.into_split();
            let out = Out::Http {
                io: w,
                buf: Vec::new(),
            };
            monoio::spawn(publish_task(ctx.clone(), out, st.clone(), p));
            http_acks(&ctx, &mut Responses::new(r), &st).await
        }
    };
    // Publishes never answered stay counted in `unanswered`: the drain does not wait for them.
    if let Err(e) = res {
        let idle = st.pending.borrow().is_empty();
        if !(http && idle && matches!(e, ConnError::Closed(_))) {
            ctx.ended(&format!("publisher {p}"), e);
        }
    }
}

/// Settle the oldest pending publish: acknowledged (`ok`) or refused.
fn settle(ctx: &Ctx, st: &PubState, id: Option<u64>, ok: bool, why: impl FnOnce() -> String) {
    let front = st.pending.borrow_mut().pop_front();
    let mut l = ctx.local.borrow_mut();
    let Some((want, c)) = front else {
        l.counts.errors.add("answer to no publish", why);
        return;
    };
    l.counts.unanswered -= 1;
    if id.is_some_and(|id| id != want) {
        l.counts.errors.add("answer out of order", || {
            format!("expected the answer to publish {want}, got {id:?}")
        });
    }
    if ok {
        l.counts.acked[c] += 1;
    } else {
        l.counts.refused += 1;
    }
}

/// The `"id"` number of a reply.
fn reply_id(text: &[u8]) -> Option<u64> {
    let at = client::find(text, br#""id":"#)? + 5;
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// A WebSocket publisher's answers: `published` or an error, in publish order.
async fn ws_acks(ctx: &Ctx, reader: &mut Reader, st: &PubState) -> Result<(), ConnError> {
    loop {
        let (op, t) = reader.next_frame().await?;
        match op {
            TEXT if client::is_type(&t, "published") => {
                settle(ctx, st, reply_id(&t), true, || "published".into());
            }
            TEXT if client::is_type(&t, "error") => {
                let code = error_code(&t);
                let text = || String::from_utf8_lossy(&t[..t.len().min(200)]).into_owned();
                ctx.local
                    .borrow_mut()
                    .counts
                    .errors
                    .add(&format!("publish refused: {code}"), text);
                settle(ctx, st, reply_id(&t), false, text);
            }
            TEXT => {
                let mut l = ctx.local.borrow_mut();
                l.counts.unexpected += 1;
                l.counts.errors.add("unexpected frame", || {
                    let t = String::from_utf8_lossy(&t[..t.len().min(160)]);
                    format!("publisher got {t}")
                });
            }
            PING => {
                let parked = st.parked.borrow_mut().take();
                match parked {
                    Some(Out::Ws(mut w)) => {
                        let res = w.send(PONG, &t).await;
                        *st.parked.borrow_mut() = Some(Out::Ws(w));
                        res?;
                    }
                    other => {
                        *st.parked.borrow_mut() = other;
                        *st.pong.borrow_mut() = Some(t);
                    }
                }
            }
            _ => {}
        }
    }
}

/// An HTTP publisher's answers: 200, or an error status, in request order.
async fn http_acks(ctx: &Ctx, rx: &mut Responses, st: &PubState) -> Result<(), ConnError> {
    loop {
        let (status, body) = rx.next().await?;
        let text = || format!("{status} {}", String::from_utf8_lossy(&body));
        if status != 200 {
            ctx.local
                .borrow_mut()
                .counts
                .errors
                .add(&format!("POST /publish answered {status}"), text);
        }
        settle(ctx, st, None, status == 200, text);
    }
}

async fn publish_task(ctx: Rc<Ctx>, mut out: Out, st: Rc<PubState>, p: usize) {
    let _task = ctx.live.task();
    if let Err(e) = publish(&ctx, &mut out, &st, p).await {
        ctx.ended(&format!("publisher {p}"), e);
    }
    ctx.local.borrow_mut().counts.publishers_done += 1;
    *st.parked.borrow_mut() = Some(out);
}

/// Publisher `p`'s schedule: message k on channel k mod K, sequence numbers per channel.
async fn publish(ctx: &Ctx, out: &mut Out, st: &PubState, p: usize) -> Result<(), ConnError> {
    let plan = &ctx.plan;
    let Some(start) = ctx.start().await else {
        return Ok(());
    };
    let end = start + plan.warmup_ns + plan.measure_ns;
    let mut timer = PreciseTimer::new(&ctx.live, plan.uring)?;
    let per_pub = plan.rate / plan.publishers as f64;
    let sched = Schedule::new(start, end, per_pub, p as f64 / plan.publishers as f64);
    ctx.local.borrow_mut().counts.scheduled += sched.count();
    let chans: Vec<usize> = (0..plan.channels)
        .map(|k| (k + p) % plan.channels)
        .collect();
    let mut seq = vec![0u64; chans.len()];
    let (mut data, mut frame) = (Vec::new(), Vec::new());
    let target = plan.pub_target(p);
    let mut k = 0u64;
    let stopped = || ctx.live.closing() || ctx.shared.stop_publishing.load(Relaxed);
    while k < sched.count() && !stopped() {
        let due = sched.due_by(mono_ns()).min(k + MAX_BATCH);
        if due == k {
            timer.sleep_until(sched.due(k)).await?;
            continue;
        }
        let first_due = sched.due(k);
        let mut batch = vec![0u64; plan.channels];
        while k < due {
            let ci = (k % chans.len() as u64) as usize;
            let c = chans[ci];
            let s = seq[ci];
            seq[ci] += 1;
            data.clear();
            let _ = write!(
                data,
                r#"{{"p":{p},"s":{s},"t":{},"x":"{}"}}"#,
                sched.due(k),
                plan.pad
            );
            let name = plan.channel_name(c);
            frame.clear();
            match out {
                Out::Ws(w) => {
                    frame.extend_from_slice(br#"{"type":"publish","channel":""#);
                    frame.extend_from_slice(name.as_bytes());
                    frame.extend_from_slice(br#"","data":"#);
                    frame.extend_from_slice(&data);
                    let _ = write!(frame, r#","id":{k}}}"#);
                    w.push(TEXT, &frame);
                }
                Out::Http { buf, .. } => {
                    frame.extend_from_slice(br#"{"channel":""#);
                    frame.extend_from_slice(name.as_bytes());
                    frame.extend_from_slice(br#"","data":"#);
                    frame.extend_from_slice(&data);
                    frame.push(b'}');
                    http::push_post(buf, target, plan.api_key.as_deref(), &frame);
                }
            }
            st.pending.borrow_mut().push_back((k, c));
            batch[c] += 1;
            k += 1;
        }
        let pong = st.pong.borrow_mut().take();
        let res = match out {
            Out::Ws(w) => {
                if let Some(ping) = pong {
                    w.push(PONG, &ping);
                }
                w.flush().await
            }
            Out::Http { io, buf } => {
                let (res, mut b) = io.write_all(std::mem::take(buf)).await;
                b.clear();
                *buf = b;
                res.map(|_| ()).map_err(|e| ConnError::Io("write", e))
            }
        };
        let mut l = ctx.local.borrow_mut();
        if first_due >= start + plan.warmup_ns {
            let lag = mono_ns().saturating_sub(first_due).max(1);
            l.send_lag.saturating_record(lag);
        }
        if let Err(e) = res {
            l.counts.unsent += sched.count() - k;
            return Err(e);
        }
        for (c, n) in batch.iter().enumerate() {
            l.counts.sent[c] += n;
            l.counts.unanswered += *n as i64;
        }
    }
    ctx.local.borrow_mut().counts.unsent += sched.count() - k;
    Ok(())
}

/// Move this thread's figures into the shared totals.
fn flush(ctx: &Ctx) {
    let mut l = ctx.local.borrow_mut();
    let l = &mut *l;
    let mut agg = ctx.shared.agg.lock().unwrap();
    agg.counts.absorb(&mut l.counts);
    let _ = agg.recovery.add(&l.recovery);
    l.recovery.reset();
    let _ = agg.reply.add(&l.reply);
    l.reply.reset();
    let _ = agg.send_lag.add(&l.send_lag);
    l.send_lag.reset();
}

async fn thread_main(plan: Arc<Plan>, shared: Arc<Shared>, tid: usize) -> bool {
    let ctx = Rc::new(Ctx {
        local: RefCell::new(Local {
            counts: Counts::with_channels(plan.channels),
            recovery: new_hist(),
            reply: new_hist(),
            send_lag: new_hist(),
        }),
        subs: RefCell::new(HashMap::new()),
        plan: plan.clone(),
        shared,
        live: Rc::new(Live::default()),
        in_setup: Cell::new(0),
        setup_slot: Signal::default(),
    });
    monoio::spawn(dropper(ctx.clone(), plan.drops(tid)));
    let spawner = ctx.clone();
    monoio::spawn(async move {
        let _task = spawner.live.task();
        let plan = spawner.plan.clone();
        let ws_pubs = (tid..plan.publishers).step_by(plan.threads);
        for p in ws_pubs {
            if !plan.pub_target(p).http {
                spawner.in_setup.set(spawner.in_setup.get() + 1);
            }
            monoio::spawn(publisher(spawner.clone(), p));
        }
        for i in (tid..plan.subscribers).step_by(plan.threads) {
            while spawner.in_setup.get() >= SETUPS_IN_FLIGHT {
                spawner.setup_slot.wait().await;
            }
            if spawner.live.closing() {
                break;
            }
            spawner.in_setup.set(spawner.in_setup.get() + 1);
            monoio::spawn(subscriber(spawner.clone(), i));
        }
    });
    while !ctx.shared.stop.load(Relaxed) {
        monoio::time::sleep(Duration::from_millis(250)).await;
        flush(&ctx);
    }
    ctx.live.shut_all();
    let clean = ctx.live.wait_ended(Duration::from_secs(3)).await;
    flush(&ctx);
    clean
}

/// One progress line on stderr; `last`: the previous (time, deliveries). Returns the
/// subscribers connected or reconnecting.
fn progress(shared: &Shared, start: u64, last: &mut (u64, u64), quiet: bool) -> i64 {
    let now = mono_ns();
    let agg = shared.agg.lock().unwrap();
    let c = &agg.counts;
    let rate = (c.seq.received - last.1) as f64 / ((now - last.0) as f64 / 1e9).max(1e-3);
    if !quiet {
        eprintln!(
            "[{:5.1}s] subs {:>6} connected {:>5} away  deliveries/s {:>9.0}  reconnects {} \
             (recovered {}, not {})  errors {}",
            now.saturating_sub(start) as f64 / 1e9,
            c.connected,
            c.away,
            rate,
            c.reconnects,
            c.recovered,
            c.not_recoverable,
            c.errors.total() + c.closes.total()
        );
    }
    *last = (now, c.seq.received);
    c.connected + c.away
}

pub fn run(a: &ReconnectArgs, prep: &Prepared) -> Result<Report, String> {
    let c = &prep.common;
    if a.subscribers == 0 || a.channels == 0 || a.publishers == 0 {
        return Err("--subscribers, --channels and --publishers must be at least 1".into());
    }
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        return Err("--rate must be a positive number".into());
    }
    if a.drop_every.is_zero() {
        return Err("--drop-every must be above 0".into());
    }
    let wave = match a.drop_fraction {
        None => None,
        Some(f) if f > 0.0 && f <= 1.0 => {
            Some(((f * a.subscribers as f64).ceil() as usize).clamp(1, a.subscribers))
        }
        Some(f) => return Err(format!("--drop-fraction {f}: give 0 < F ≤ 1")),
    };
    if a.payload_size > 16 << 20 {
        return Err("--payload-size: at most 16 MiB".into());
    }
    if a.channel_prefix.is_empty() {
        return Err(
            "--channel-prefix: give the prefix of a namespace with history (e.g. `h:`)".into(),
        );
    }
    if let Some(&i) = prep.sub_targets.iter().find(|&&i| prep.targets[i].http) {
        return Err(format!(
            "{}: subscribers need a ws:// URL (http:// is for --publish-url)",
            prep.targets[i].url
        ));
    }
    let need = c.warmup + c.duration + Duration::from_nanos(DRAIN_MAX_NS) + SETUP_TIMEOUT;
    let tokens = prep.mint(a.publishers + a.subscribers, need)?;
    let plan = Arc::new(Plan {
        subscribers: a.subscribers,
        channels: a.channels,
        publishers: a.publishers,
        rate: a.rate,
        prefix: format!("{}load-{}-", a.channel_prefix, run_id()),
        pad: "x".repeat(a.payload_size.saturating_sub(DATA_OVERHEAD)),
        targets: prep.targets.clone(),
        pub_targets: prep.pub_targets.clone(),
        sub_targets: prep.sub_targets.clone(),
        sticky: a.sticky,
        drop_mode: a.drop_mode,
        drop_every_ns: a.drop_every.as_nanos() as u64,
        wave,
        down_ns: a.down_time.as_nanos() as u64,
        warmup_ns: c.warmup.as_nanos() as u64,
        measure_ns: c.duration.as_nanos() as u64,
        threads: c.threads,
        source_ips: c.source_ips.clone().unwrap_or_default(),
        uring: c.uring(),
        tokens,
        api_key: a.api_key.clone(),
    });
    let mut per_target = vec![0usize; plan.targets.len()];
    for i in 0..plan.subscribers {
        per_target[plan.sub_target(i, 0)] += 1;
    }
    for p in 0..plan.publishers {
        per_target[plan.pub_targets[p % plan.pub_targets.len()]] += 1;
    }
    prep.check_capacity(&per_target, true)?;
    let ws_conns = plan.subscribers + plan.ws_publishers();
    let planned_drops: usize = (0..plan.threads).map(|t| plan.drops(t).len()).sum();

    let shared = Arc::new(Shared {
        start_ns: AtomicU64::new(0),
        stop_publishing: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        agg: Mutex::new(Agg {
            counts: Counts::with_channels(plan.channels),
            recovery: new_hist(),
            reply: new_hist(),
            send_lag: new_hist(),
        }),
    });
    let (p2, s2) = (plan.clone(), shared.clone());
    let workers =
        crate::worker::spawn_threads(c, move |tid| thread_main(p2.clone(), s2.clone(), tid))?;
    let stop_all = |shared: &Shared| {
        shared.stop_publishing.store(true, Relaxed);
        shared.stop.store(true, Relaxed);
        workers.wait(Duration::from_secs(5));
    };

    if !c.quiet {
        eprintln!("reconnect: setting up {ws_conns} connections ...");
    }
    let t0 = mono_ns();
    let mut next_print = t0 + 1_000_000_000;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let agg = shared.agg.lock().unwrap();
        let (ok, failed) = (agg.counts.setup_ok, agg.counts.setup_failed);
        if (ok + failed) as usize == ws_conns {
            if failed > 0 {
                let mut msg = format!("{failed} of {ws_conns} connections failed during setup:");
                for line in agg.counts.errors.lines() {
                    msg.push_str(&format!("\n  {line}"));
                }
                drop(agg);
                stop_all(&shared);
                return Err(msg);
            }
            break;
        }
        if mono_ns() >= next_print {
            next_print += 1_000_000_000;
            if !c.quiet {
                eprintln!("  setup: {ok} of {ws_conns} set up, {failed} failed");
            }
        }
    }
    let setup_s = (mono_ns() - t0) as f64 / 1e9;
    if !c.quiet {
        eprintln!("setup done in {setup_s:.2} s; {planned_drops} drops planned");
    }

    let start = mono_ns() + 20_000_000;
    let probe = CpuProbe::start(c.server_pid, &workers, start);
    shared.start_ns.store(start, Relaxed);
    let end = start + plan.warmup_ns + plan.measure_ns;
    let mut last = (start, 0);
    let mut tick = start;
    while tick < end {
        tick = (tick + 1_000_000_000).min(end);
        std::thread::sleep(Duration::from_nanos(tick.saturating_sub(mono_ns())));
        progress(&shared, start, &mut last, c.quiet);
    }
    let in_window = shared.agg.lock().unwrap().counts.window_deliveries;
    let cpu: Cpu = probe.finish(&workers, in_window);

    // Drain: until every publish is answered, every subscriber is back and has all it is owed;
    // or nothing moved for a while; or the cap.
    let drain_end = mono_ns() + DRAIN_MAX_NS;
    let (mut seen, mut moved_at) = (u64::MAX, mono_ns());
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = mono_ns();
        let (settled, delivered, expected) = {
            let agg = shared.agg.lock().unwrap();
            let c = &agg.counts;
            let settled = c.publishers_done as usize == plan.publishers
                && c.unanswered <= 0
                && c.away <= 0
                && c.recovering <= 0;
            (settled, c.delivered(), c.expected())
        };
        if delivered != seen {
            (seen, moved_at) = (delivered, now);
        }
        if (settled && delivered >= expected) || now - moved_at > DRAIN_IDLE_NS || now > drain_end {
            break;
        }
        if now - last.0 >= 1_000_000_000 {
            progress(&shared, start, &mut last, c.quiet);
        }
    }
    let drain_s = mono_ns().saturating_sub(end) as f64 / 1e9;
    stop_all(&shared);
    let agg = shared.agg.lock().unwrap();
    Ok(report(&plan, &agg, a, prep, cpu, setup_s, drain_s))
}

/// p50 and max of a list of counts.
fn p50_max(v: &[u64]) -> (u64, u64) {
    let mut s = v.to_vec();
    s.sort_unstable();
    match s.len() {
        0 => (0, 0),
        n => (s[(n - 1) / 2], s[n - 1]),
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// A histogram (ns) as JSON µs.
fn hist_json(h: &Histogram<u64>) -> serde_json::Value {
    let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": h.max() as f64 / 1000.0,
        "samples": h.len(),
    })
}

/// What a recovery time is, for the report.
const RECOVERY_WHAT: &str = "recovery time: subscribe with since written → the message at the \
                             reply's top read (empty backlog: → the reply read), recovered:true \
                             only";

fn report(
    plan: &Plan,
    agg: &Agg,
    a: &ReconnectArgs,
    prep: &Prepared,
    cpu: Cpu,
    setup_s: f64,
    drain_s: f64,
) -> Report {
    let c = &agg.counts;
    let mut r = Report::new("reconnect", prep);
    let n = plan.subscribers;
    r.setup(
        "subscribers",
        format!(
            "{n} on {} channel(s) {}0…, each dropped and resubscribed with `since`",
            plan.channels, plan.prefix
        ),
    );
    let http = (0..plan.publishers)
        .filter(|&p| plan.pub_target(p).http)
        .count();
    let how = match http {
        0 => "over WebSocket, each publish with an id (acknowledged by `published`)".to_string(),
        h if h == plan.publishers => "with POST /publish (acknowledged by 200)".into(),
        h => format!("{h} with POST /publish, the others over WebSocket"),
    };
    r.setup("publishers", format!("{} {how}", plan.publishers));
    r.setup(
        "load",
        format!(
            "{} msg/s total on a fixed schedule, {} B of data per message",
            a.rate,
            a.payload_size.max(DATA_OVERHEAD)
        ),
    );
    let every = a.drop_every.as_secs_f64();
    let drops = match plan.wave {
        None => format!("each subscriber once every {every} s, staggered"),
        Some(m) => format!("{m} subscriber(s) at once every {every} s, in turn"),
    };
    let mode = match plan.drop_mode {
        DropMode::Close => "close: WebSocket close, read on until the hub's close",
        DropMode::Abort => "abort: TCP reset, no close frame",
    };
    let back = if plan.sticky || plan.sub_targets.len() == 1 {
        "to the same instance"
    } else {
        "to the next instance"
    };
    r.setup(
        "drops",
        format!(
            "{drops} after the warmup ({mode}); back after {} ms, {back}",
            a.down_time.as_millis()
        ),
    );
    r.param("subscribers", json!(n));
    r.param("channels", json!(plan.channels));
    r.param("channel_prefix", json!(a.channel_prefix));
    r.param("publishers", json!(plan.publishers));
    r.param("publishers_http", json!(http));
    r.param("rate", json!(a.rate));
    r.param("payload_size", json!(a.payload_size.max(DATA_OVERHEAD)));
    r.param("drop_every_s", json!(every));
    r.param("drop_fraction", json!(a.drop_fraction));
    r.param("drop_mode", json!(plan.drop_mode.as_str()));
    r.param("down_time_ms", json!(a.down_time.as_secs_f64() * 1000.0));
    r.param("sticky", json!(plan.sticky));
    r.common_setup(prep, plan.tokens.as_deref());

    let sent: u64 = c.sent.iter().sum();
    let acked: u64 = c.acked.iter().sum();
    let unanswered = c.unanswered.max(0) as u64;
    let expected = c.expected();
    let delivered = c.delivered();
    let d = Deliveries {
        publishes_scheduled: Some(c.scheduled),
        publishes_sent: sent,
        publishes_unsent: c.unsent,
        subscriptions: c.subs.iter().sum(),
        expected,
        received: c.seq.received,
        delivered,
        lost: expected.saturating_sub(delivered),
        extra: delivered.saturating_sub(expected),
        duplicates: c.seq.duplicates,
        reordered: c.seq.reordered,
        unexpected: c.unexpected,
        deliveries_in_window: c.window_deliveries,
        deliveries_per_s: c.window_deliveries as f64 / (plan.measure_ns as f64 / 1e9),
    };
    let authed = if plan.tokens.is_some() {
        ", each authenticated"
    } else {
        ""
    };
    r.line(
        "setup",
        format!("{} connections in {setup_s:.2} s{authed}", c.setup_ok),
    );
    if plan.tokens.is_some() {
        r.set_auth(c.setup_ok - c.anonymous, c.anonymous);
    }
    r.line(
        "publishes",
        format!(
            "{sent} written of {} scheduled: {acked} acknowledged, {} refused, {unanswered} \
             unanswered",
            c.scheduled, c.refused
        ),
    );
    r.line(
        "drops",
        format!(
            "{} ({}), {} skipped (the subscriber was still away)",
            c.drops,
            plan.drop_mode.as_str(),
            c.drops_skipped
        ),
    );
    r.line(
        "reconnects",
        format!(
            "{} subscribes with since; {} failed attempt(s) (retried); {} connection(s) \
             ended by the hub or an error (reconnected too)",
            c.reconnects, c.failed_attempts, c.lost_conns
        ),
    );
    let recovered_pct = pct(c.recovered, c.replies);
    r.line(
        "recovered",
        format!(
            "{} of {} replies ({recovered_pct:.3}%); {} not recoverable (recovered:false); {} \
             cut short before the backlog was complete",
            c.recovered, c.replies, c.not_recoverable, c.incomplete
        ),
    );
    let backlog_total: u64 = c.backlog.iter().sum();
    let (b50, bmax) = p50_max(&c.backlog);
    r.line(
        "msgs recovered",
        format!(
            "{backlog_total} in backlogs ({} received), per reconnect p50 {b50} max {bmax}",
            c.backlog_received
        ),
    );
    r.lag(
        "reply µs",
        "reply_time_us",
        &agg.reply,
        "subscribe with since → reply, every reconnect",
    );
    r.line(
        "expected",
        format!(
            "{expected} (acknowledged publishes × subscribers of their channel, less {} not \
             recoverable)",
            c.window_msgs.saturating_sub(c.excluded_window_msgs)
        ),
    );
    r.line(
        "delivered",
        format!(
            "{delivered} ({:.3}%), live or recovered",
            pct(delivered, expected)
        ),
    );
    r.line(
        "lost",
        format!(
            "{} (waited {drain_s:.1} s after the run for stragglers)",
            d.lost
        ),
    );
    r.line(
        "duplicates",
        format!(
            "{} (a message received twice by one subscriber, across reconnects)",
            d.duplicates
        ),
    );
    r.line("reordered", d.reordered.to_string());
    r.line(
        "not recoverable",
        format!(
            "{} message(s) in {} recovered:false window(s) (top − since; not counted as lost)",
            c.window_msgs, c.not_recoverable
        ),
    );
    if d.extra > 0 || d.unexpected > 0 {
        r.line(
            "unexpected",
            format!(
                "{} unexpected message(s), {} more distinct deliveries than expected",
                d.unexpected, d.extra
            ),
        );
    }
    if c.unaccounted > 0 {
        r.warn(format!(
            "{} subscriber(s) left out of the loss accounting: a reply whose missed messages \
             cannot be counted (epoch changed, since ahead of the channel, or no `recovered`)",
            c.unaccounted
        ));
    }
    r.set_offsets(&c.offsets);
    r.lag(
        "send lag µs",
        "send_lag_us",
        &agg.send_lag,
        "writes behind schedule",
    );
    if d.lost > 0 {
        r.warn(format!(
            "{} of {expected} expected deliveries did not arrive ({:.3}%)",
            d.lost,
            pct(d.lost, expected)
        ));
    }
    if d.duplicates > 0 || d.reordered > 0 {
        r.warn(format!(
            "{} duplicate(s) and {} reordered message(s)",
            d.duplicates, d.reordered
        ));
    }
    if c.not_recoverable > 0 {
        r.warn(format!(
            "{} of {} reconnects were not recoverable (recovered:false): the backlog was \
             longer than the hub's max_recovery or its history_size, or expired",
            c.not_recoverable, c.replies
        ));
    }
    if c.drops == 0 {
        r.warn(
            "no subscriber was dropped: drops start after --warmup and are made only when the \
             reconnect (--down-time later) falls within --duration; lengthen --duration or \
             shorten --drop-every",
        );
    }
    if c.errors.count("publish refused: rate_limited") > 0 {
        r.warn(
            "the hub rate-limited the publishers: start it with --max-publish-rate 0, or \
             spread --rate over more --publishers (or publish with an http:// --publish-url)",
        );
    }
    if unanswered > 0 || c.refused > 0 {
        r.warn(format!(
            "{} publish(es) refused and {unanswered} never answered: not expected at the \
             subscribers",
            c.refused
        ));
    }
    if c.errors.count("hub error permission_denied")
        + c.errors.count("publish refused: permission_denied")
        > 0
    {
        r.warn(
            "the hub answered permission_denied: with [auth], clients may publish only where \
             the namespace allows it (`publish = \"authenticated\"`), or publish with an \
             http:// --publish-url",
        );
    }
    r.json_extra(
        "reconnect",
        json!({
            "drops": c.drops,
            "drops_skipped": c.drops_skipped,
            "reconnects": c.reconnects,
            "failed_attempts": c.failed_attempts,
            "connections_lost": c.lost_conns,
            "replies": c.replies,
            "recovered": c.recovered,
            "recovered_pct": recovered_pct,
            "not_recoverable": c.not_recoverable,
            "not_recoverable_messages": c.window_msgs,
            "incomplete": c.incomplete,
            "unaccounted_subscribers": c.unaccounted,
            "messages_recovered": {
                "total": backlog_total,
                "received": c.backlog_received,
                "p50": b50,
                "max": bmax,
            },
            "recovery_time_us": hist_json(&agg.recovery),
            "reply_time_us": hist_json(&agg.reply),
            "publishes_acknowledged": acked,
            "publishes_refused": c.refused,
            "publishes_unanswered": unanswered,
        }),
    );
    r.set_latency(agg.recovery.clone(), RECOVERY_WHAT);
    r.set_latency_label("recovery µs");
    r.set_errors(&c.errors, &c.closes, prep.fd_limit, c.setup_ok);
    r.set_deliveries(d);
    r.set_cpu(cpu);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(subscribers: usize, threads: usize, wave: Option<usize>) -> Plan {
        Plan {
            subscribers,
            channels: 1,
            publishers: 1,
            rate: 100.0,
            prefix: "h:load-x-".into(),
            pad: String::new(),
            targets: Vec::new(),
            pub_targets: vec![0],
            sub_targets: vec![0, 1, 2],
            sticky: false,
            drop_mode: DropMode::Close,
            drop_every_ns: 1_000_000_000,
            wave,
            down_ns: 200_000_000,
            warmup_ns: 500_000_000,
            measure_ns: 2_000_000_000,
            threads,
            source_ips: Vec::new(),
            uring: false,
            tokens: None,
            api_key: None,
        }
    }

    #[test]
    fn staggered_drops_cover_every_subscriber_each_period() {
        let p = plan(4, 2, None);
        let all: Vec<(u64, usize)> = {
            let mut v: Vec<_> = (0..2).flat_map(|t| p.drops(t)).collect();
            v.sort_unstable();
            v
        };
        // Phases 1/8, 3/8, 5/8, 7/8 of a second after the 0.5 s warmup, twice (the reconnect,
        // 0.2 s later, must be before the end at 2.5 s: 2.375 s + 0.2 s is not).
        let ms: Vec<(u64, usize)> = all.iter().map(|&(t, i)| (t / 1_000_000, i)).collect();
        assert_eq!(
            ms,
            [
                (625, 0),
                (875, 1),
                (1125, 2),
                (1375, 3),
                (1625, 0),
                (1875, 1),
                (2125, 2)
            ]
        );
        assert!(
            p.drops(0).iter().all(|&(_, i)| i % 2 == 0),
            "thread 0: even"
        );
    }

    #[test]
    fn waves_drop_the_next_subscribers_together() {
        let p = plan(5, 1, Some(3));
        let d = p.drops(0);
        // Waves at 1.0 s and 2.0 s (2.0 + 0.2 < 2.5): subscribers 0,1,2 then 3,4,0.
        let ms: Vec<(u64, usize)> = d.iter().map(|&(t, i)| (t / 1_000_000, i)).collect();
        assert_eq!(
            ms,
            [
                (1000, 0),
                (1000, 1),
                (1000, 2),
                (2000, 0),
                (2000, 3),
                (2000, 4)
            ]
        );
    }

    #[test]
    fn reconnects_move_to_the_next_instance_unless_sticky() {
        let mut p = plan(3, 1, None);
        assert_eq!(
            (0..4).map(|n| p.sub_target(1, n)).collect::<Vec<_>>(),
            [1, 2, 0, 1]
        );
        p.sticky = true;
        assert_eq!(
            (0..4).map(|n| p.sub_target(1, n)).collect::<Vec<_>>(),
            [1, 1, 1, 1]
        );
    }

    #[test]
    fn expected_leaves_out_windows_and_unaccounted_subscribers() {
        let mut c = Counts::with_channels(2);
        c.acked = vec![100, 50];
        c.subs = vec![3, 2];
        assert_eq!(c.expected(), 100 * 3 + 50 * 2);
        c.window_msgs = 30;
        assert_eq!(c.expected(), 400 - 30);
        // One subscriber of channel 0 leaves the accounting with 10 of those window messages.
        c.excluded_subs[0] = 1;
        c.excluded_window_msgs = 10;
        assert_eq!(c.expected(), 200 + 100 - 20);
        c.seq.received = 300;
        c.excluded_unique = 80;
        assert_eq!(c.delivered(), 220);
    }

    #[test]
    fn reply_ids() {
        assert_eq!(
            reply_id(br#"{"type":"published","channel":"h:x","id":42}"#),
            Some(42)
        );
        assert_eq!(
            reply_id(br#"{"type":"error","id":7,"code":"rate_limited"}"#),
            Some(7)
        );
        assert_eq!(reply_id(br#"{"type":"published","channel":"c"}"#), None);
    }
}
