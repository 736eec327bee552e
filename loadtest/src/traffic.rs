//! The message scenarios, `fanout` and `rooms`, on one engine.
//!
//! - `fanout`: P publishers publish round-robin over C channels; N subscribers are spread
//!   round-robin over the channels. Publishers subscribe to every channel only in closed loop
//!   (they need their own messages back to know one is done).
//! - `rooms`: R rooms × M members; every member is one connection that subscribes to its room
//!   and publishes into it (chat: everyone hears everyone, itself included).
//!
//! Pacing (see [`crate::schedule`]): open loop (`--rate`, total messages/s over all
//! publishers, phases spread evenly) with latency measured from each message's *intended* send
//! time; or closed loop (`--max --window W`): at most W messages in flight per publisher, `t`
//! is the actual send time.
//!
//! Every message's data is `{"p":P,"s":S,"t":T,"x":"…"}`: publisher id, sequence number on
//! that channel, CLOCK_MONOTONIC ns (intended send time). Receivers parse it without
//! allocating, record latency per thread, and account every (publisher, channel) stream
//! ([`crate::track`]). Expected deliveries are Σ over channels of publishes written × the
//! subscriptions the hub confirmed, so "delivered 100%" is checked, not assumed.
//!
//! On history channels (`--channel-prefix` naming a namespace with history) messages also carry
//! the hub's `offset`: each connection checks, per channel, that the offsets after its
//! `subscribed` reply's top arrive once each and in order ([`crate::track::Offsets`]); a `reset`
//! frame restarts that channel's check and is counted.
//!
//! With auth on, connection `j` authenticates with token `j` (minted before setup) and is set
//! up only once the hub answered `connected`; publishing over WebSocket then needs the hub to
//! let authenticated clients publish (`[channels] publish = "authenticated"`).

use crate::auth::{self, Tokens};
use crate::cli::{FanoutArgs, RoomsArgs, Traffic};
use crate::client::{self, Conn, ConnError, Reader, Target, Writer, PING, PONG, TEXT};
use crate::report::{Cpu, CpuProbe, Deliveries, Report};
use crate::schedule::Schedule;
use crate::stats::{mono_ns, new_hist, us, Closes, Tally};
use crate::track::{OffsetCounts, Offsets, SeqCounts, Tracker};
use crate::worker::{Live, PreciseTimer, Signal};
use crate::Prepared;
use bytes::Bytes;
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being set up at once, per thread.
const SETUPS_IN_FLIGHT: usize = 128;
/// Most frames a publisher writes in one batch.
const MAX_BATCH: u64 = 64;
/// Read buffer per connection.
const CHUNK: usize = 16 * 1024;
/// Size of the data object without padding, roughly: `{"p":0,"s":0,"t":…,"x":""}`.
const DATA_OVERHEAD: usize = 40;
/// After the schedule ends: wait at most this long for the last deliveries…
const DRAIN_MAX_NS: u64 = 10_000_000_000;
/// …and stop waiting once nothing arrived for this long.
const DRAIN_IDLE_NS: u64 = 2_000_000_000;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Rate(f64),
    Max(u32),
}

#[derive(Clone, Copy, Debug)]
enum Layout {
    Fanout {
        subscribers: usize,
        channels: usize,
        publishers: usize,
    },
    Rooms {
        rooms: usize,
        members: usize,
    },
}

/// Which channels a connection is subscribed to.
#[derive(Clone, Debug)]
enum Subs {
    None,
    One(usize),
    All,
}

impl Subs {
    fn contains(&self, c: usize, channels: usize) -> bool {
        match self {
            Subs::None => false,
            Subs::One(o) => *o == c,
            Subs::All => c < channels,
        }
    }

    fn list(&self, channels: usize) -> Vec<usize> {
        match self {
            Subs::None => Vec::new(),
            Subs::One(c) => vec![*c],
            Subs::All => (0..channels).collect(),
        }
    }
}

/// What connection `j` does.
struct Role {
    /// Publisher id and the channels it publishes to, in order (round-robin).
    publisher: Option<(u32, Vec<usize>)>,
    subs: Subs,
    target: usize,
}

struct Plan {
    scenario: &'static str,
    layout: Layout,
    conns: usize,
    channels: usize,
    publishers: usize,
    mode: Mode,
    /// Targets publishers / subscribers use, by index into `targets`.
    targets: Vec<Target>,
    pub_targets: Vec<usize>,
    sub_targets: Vec<usize>,
    /// Channel names are `{prefix}{index}`; the prefix (`--channel-prefix` + `load-<run id>-`)
    /// carries a run id so that concurrent runs against one hub do not hear each other.
    prefix: String,
    pad: String,
    warmup_ns: u64,
    measure_ns: u64,
    threads: usize,
    source_ips: Vec<IpAddr>,
    uring: bool,
    /// One token per connection (auth on).
    tokens: Option<Arc<Tokens>>,
}

impl Plan {
    fn role(&self, j: usize) -> Role {
        match self.layout {
            Layout::Fanout {
                channels,
                publishers,
                ..
            } => {
                if j < publishers {
                    let order = (0..channels).map(|k| (k + j) % channels).collect();
                    let subs = match self.mode {
                        Mode::Max(_) => Subs::All,
                        Mode::Rate(_) => Subs::None,
                    };
                    Role {
                        publisher: Some((j as u32, order)),
                        subs,
                        target: self.pub_targets[j % self.pub_targets.len()],
                    }
                } else {
                    let i = j - publishers;
                    Role {
                        publisher: None,
                        subs: Subs::One(i % channels),
                        target: self.sub_targets[i % self.sub_targets.len()],
                    }
                }
            }
            Layout::Rooms { members, .. } => {
                let room = j / members;
                Role {
                    publisher: Some((j as u32, vec![room])),
                    subs: Subs::One(room),
                    target: self.sub_targets[j % self.sub_targets.len()],
                }
            }
        }
    }

    fn channel_name(&self, c: usize) -> String {
        format!("{}{c}", self.prefix)
    }
}

/// Counters one thread accumulates and hands to the main thread ([`Counts::absorb`] moves
/// them, leaving zeros behind; `live` is a delta).
#[derive(Default)]
struct Counts {
    setup_ok: u64,
    setup_failed: u64,
    /// Set up, but the hub's `connected` had an empty user (it does not check tokens).
    anonymous: u64,
    live: i64,
    publishers_done: u64,
    seq: SeqCounts,
    /// Offset checks on history channels.
    offsets: OffsetCounts,
    /// Deliveries that arrived inside the measurement window (for deliveries/s).
    window_deliveries: u64,
    /// Messages for a channel the connection did not subscribe to, or unparseable.
    unexpected: u64,
    /// Subscriptions confirmed, per channel.
    subs: Vec<u64>,
    /// Publishes written (flushed to the socket), per channel.
    sent: Vec<u64>,
    /// Open loop: messages the schedules held.
    scheduled: u64,
    /// Open loop: scheduled messages never written (the run ended first).
    unsent: u64,
    errors: Tally,
    closes: Closes,
}

impl Counts {
    fn with_channels(c: usize) -> Self {
        Counts {
            subs: vec![0; c],
            sent: vec![0; c],
            ..Default::default()
        }
    }

    fn absorb(&mut self, o: &mut Counts) {
        use std::mem::take;
        self.setup_ok += take(&mut o.setup_ok);
        self.setup_failed += take(&mut o.setup_failed);
        self.anonymous += take(&mut o.anonymous);
        self.live += take(&mut o.live);
        self.publishers_done += take(&mut o.publishers_done);
        self.seq.absorb(&mut o.seq);
        self.offsets.absorb(&mut o.offsets);
        self.window_deliveries += take(&mut o.window_deliveries);
        self.unexpected += take(&mut o.unexpected);
        for (d, s) in self.subs.iter_mut().zip(o.subs.iter_mut()) {
            *d += take(s);
        }
        for (d, s) in self.sent.iter_mut().zip(o.sent.iter_mut()) {
            *d += take(s);
        }
        self.scheduled += take(&mut o.scheduled);
        self.unsent += take(&mut o.unsent);
        self.errors.absorb(&mut o.errors);
        self.closes.absorb(&mut o.closes);
    }

    /// Σ over channels of publishes written × subscriptions confirmed.
    fn expected(&self) -> u64 {
        self.sent.iter().zip(&self.subs).map(|(s, n)| s * n).sum()
    }
}

/// Totals the worker threads add to; read by the main thread.
struct Agg {
    counts: Counts,
    /// Latencies since the last progress line (including warmup).
    interval: Histogram<u64>,
    /// Latencies of messages intended after the warmup.
    total: Histogram<u64>,
    /// Open loop: how late publishers' batches were written against the schedule.
    send_lag: Histogram<u64>,
    threads_done: usize,
}

struct Shared {
    /// CLOCK_MONOTONIC ns at which publishing starts; 0 until setup is complete.
    start_ns: AtomicU64,
    /// Publishers stop (the drain gave up waiting for them).
    stop_publishing: AtomicBool,
    /// Threads shut their connections and hand in their last figures.
    stop: AtomicBool,
    agg: Mutex<Agg>,
}

struct Local {
    counts: Counts,
    interval: Histogram<u64>,
    total: Histogram<u64>,
    send_lag: Histogram<u64>,
}

/// One thread's context, shared by its connection tasks.
struct Ctx {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    local: RefCell<Local>,
    live: Rc<Live>,
    in_setup: Cell<usize>,
    setup_slot: Signal,
}

impl Ctx {
    /// Count a connection's or publisher's end, unless the run is over (then it is ours).
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
}

/// The fields of a delivered load message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Msg {
    pub chan: usize,
    pub p: u32,
    pub s: u64,
    pub t: u64,
    /// The hub's offset (history channels only).
    pub offset: Option<u64>,
}

/// A byte cursor for the message scanner.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    /// Skip whitespace, then `lit`.
    fn lit(&mut self, lit: &[u8]) -> Option<()> {
        self.ws();
        self.b
            .get(self.i..)?
            .starts_with(lit)
            .then(|| self.i += lit.len())
    }

    /// Move past the next occurrence of `pat`.
    fn after(&mut self, pat: &[u8]) -> Option<()> {
        let at = client::find(self.b.get(self.i..)?, pat)?;
        self.i += at + pat.len();
        Some(())
    }

    fn num(&mut self) -> Option<u64> {
        self.ws();
        let start = self.i;
        let mut v = 0u64;
        while let Some(d) = self.b.get(self.i).filter(|d| d.is_ascii_digit()) {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.i += 1;
        }
        (self.i > start).then_some(v)
    }

    /// `"key":` then a number.
    fn field(&mut self, key: &[u8]) -> Option<u64> {
        self.lit(b"\"")?;
        self.lit(key)?;
        self.lit(b"\"")?;
        self.lit(b":")?;
        self.num()
    }
}

/// Parse a delivery `{"type":"message","channel":"<prefix>C"[,"offset":O],"data":{"p":P,"s":S,
/// "t":T,…}}` in place. The hub's exact layout is the fast path; whitespace and another order of
/// the top-level keys (servers that re-serialise) are accepted too.
pub(crate) fn parse_message(b: &[u8], prefix: &[u8]) -> Option<Msg> {
    if !b.starts_with(br#"{"type":"message""#) && client::find(b, br#""message""#).is_none() {
        return None;
    }
    let mut sc = Scan { b, i: 0 };
    sc.after(br#""channel""#)?;
    sc.lit(b":")?;
    sc.lit(b"\"")?;
    sc.lit(prefix)?;
    let chan = sc.num()? as usize;
    sc.lit(b"\"")?;
    // The hub puts the offset right after the channel; elsewhere only if re-serialised (our
    // data object has no "offset" key, so a match is the top-level one).
    let offset = match sc.lit(b",").and_then(|_| sc.field(b"offset")) {
        Some(o) => Some(o),
        None if b.starts_with(br#"{"type":"message""#) => None,
        None => client::find(b, br#""offset""#).and_then(|at| {
            let mut sc = Scan { b, i: at };
            sc.field(b"offset")
        }),
    };
    let mut sc = Scan { b, i: 0 };
    sc.after(br#""data""#)?;
    sc.lit(b":")?;
    sc.lit(b"{")?;
    let p = u32::try_from(sc.field(b"p")?).ok()?;
    sc.lit(b",")?;
    let s = sc.field(b"s")?;
    sc.lit(b",")?;
    let t = sc.field(b"t")?;
    Some(Msg {
        chan,
        p,
        s,
        t,
        offset,
    })
}

/// The channel index and top offset of a `reset` frame
/// (`{"type":"reset","channel":"<prefix>C","recovered":false,"epoch":…,"offset":N}`), and its
/// epoch.
pub(crate) fn parse_reset(b: &[u8], prefix: &[u8]) -> Option<(usize, u64, String)> {
    if !client::is_type(b, "reset") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(b).ok()?;
    let chan = v["channel"]
        .as_str()?
        .strip_prefix(std::str::from_utf8(prefix).ok()?)?
        .parse()
        .ok()?;
    Some((chan, v["offset"].as_u64()?, v["epoch"].as_str()?.into()))
}

/// What a connection has seen: its (publisher, channel) streams and, on history channels, the
/// offsets per channel.
#[derive(Default)]
struct Heard {
    streams: Tracker,
    offsets: Offsets,
}

/// Account one text frame that arrived at `arrived`; the publisher id of a valid message.
fn on_text(ctx: &Ctx, heard: &mut Heard, subs: &Subs, text: &[u8], arrived: u64) -> Option<u32> {
    let mut l = ctx.local.borrow_mut();
    let plan = &ctx.plan;
    let Some(m) = parse_message(text, plan.prefix.as_bytes()) else {
        if let Some((chan, top, _)) = parse_reset(text, plan.prefix.as_bytes()) {
            // The channel's history (epoch) was lost: its offsets start over after `top`.
            heard.offsets.restart(chan as u32, top);
            l.counts.offsets.resets += 1;
        } else if client::is_type(text, "error") {
            let code = error_code(text);
            l.counts.errors.add(&format!("hub error {code}"), || {
                String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned()
            });
        } else {
            l.counts.unexpected += 1;
            l.counts.errors.add("unexpected frame", || {
                let t = String::from_utf8_lossy(&text[..text.len().min(160)]);
                format!("unexpected text frame: {t}")
            });
        }
        return None;
    };
    if !subs.contains(m.chan, plan.channels) || m.p as usize >= plan.publishers {
        l.counts.unexpected += 1;
        l.counts.errors.add("unexpected message", || {
            format!(
                "message from publisher {} on channel {} (not subscribed there)",
                m.p,
                plan.channel_name(m.chan)
            )
        });
        return None;
    }
    let s = heard.streams.observe(m.p, m.chan as u32, m.s);
    l.counts.seq.add(s);
    if let Some(o) = m.offset {
        l.counts
            .offsets
            .add(heard.offsets.observe(m.chan as u32, o));
    }
    let latency = arrived.saturating_sub(m.t).max(1);
    let warm_end = ctx.shared.start_ns.load(Relaxed) + plan.warmup_ns;
    if arrived >= warm_end && arrived < warm_end + plan.measure_ns {
        l.counts.window_deliveries += 1;
    }
    l.interval.saturating_record(latency);
    if m.t >= warm_end {
        l.total.saturating_record(latency);
    }
    Some(m.p)
}

/// The `"code"` of a hub error frame (`?` when absent).
pub(crate) fn error_code(text: &[u8]) -> String {
    let mut sc = Scan { b: text, i: 0 };
    let code = (|| {
        sc.after(br#""code""#)?;
        sc.lit(b":")?;
        sc.lit(b"\"")?;
        let start = sc.i;
        sc.after(b"\"")?;
        Some(String::from_utf8_lossy(&text[start..sc.i - 1]).into_owned())
    })();
    code.unwrap_or_else(|| "?".into())
}

/// What a publisher's reader tells its writer.
#[derive(Default)]
struct PubState {
    in_flight: Cell<u32>,
    /// The connection ended (the reader saw a close or an error): stop publishing.
    ended: Cell<bool>,
    wake: Signal,
    /// A ping payload to answer with the next write.
    pong: RefCell<Option<Bytes>>,
    /// The writer once publishing is over: kept open (dropping it would shut the socket's
    /// sending side) and used by the reader to answer pings.
    parked: RefCell<Option<Writer>>,
}

/// Read frames until the connection ends: account deliveries, answer pings (directly, or
/// through the publish task while it owns the writer).
async fn read_loop(
    ctx: &Ctx,
    reader: &mut Reader,
    st: &PubState,
    subs: &Subs,
    own: Option<u32>,
    mut heard: Heard,
) -> Result<(), ConnError> {
    loop {
        let (op, payload) = reader.next_frame().await?;
        match op {
            TEXT => {
                let p = on_text(ctx, &mut heard, subs, &payload, reader.read_ns);
                if p.is_some() && p == own {
                    st.in_flight.set(st.in_flight.get().saturating_sub(1));
                    st.wake.notify();
                }
            }
            PING => {
                let parked = st.parked.borrow_mut().take();
                match parked {
                    Some(mut w) => {
                        let res = w.send(PONG, &payload).await;
                        *st.parked.borrow_mut() = Some(w);
                        res?;
                    }
                    None => {
                        *st.pong.borrow_mut() = Some(payload);
                        st.wake.notify();
                    }
                }
            }
            _ => {}
        }
    }
}

async fn publish_task(ctx: Rc<Ctx>, mut w: Writer, st: Rc<PubState>, p: u32, chans: Vec<usize>) {
    let _task = ctx.live.task();
    if let Err(e) = publish(&ctx, &mut w, &st, p, &chans).await {
        ctx.ended(&format!("publisher {p}"), e);
    }
    ctx.local.borrow_mut().counts.publishers_done += 1;
    *st.parked.borrow_mut() = Some(w);
}

/// One publisher's pending batch: frames queued in the writer, counted per channel once
/// written.
struct Batch {
    text: Vec<u8>,
    /// Next sequence number per channel of `chans`.
    seq: Vec<u64>,
    /// Messages queued per channel index of `chans`, not yet written.
    queued: Vec<(usize, u64)>,
}

impl Batch {
    /// Queue message `k` of publisher `p` (channel chosen round-robin), intended at `t`.
    fn push(&mut self, plan: &Plan, w: &mut Writer, p: u32, chans: &[usize], k: u64, t: u64) {
        let ci = (k % chans.len() as u64) as usize;
        let c = chans[ci];
        let s = self.seq[ci];
        self.seq[ci] += 1;
        self.text.clear();
        let (prefix, pad) = (&plan.prefix, &plan.pad);
        let _ = write!(
            self.text,
            r#"{{"type":"publish","channel":"{prefix}{c}","data":{{"p":{p},"s":{s},"t":{t},"x":"{pad}"}}}}"#
        );
        w.push(TEXT, &self.text);
        match self.queued.last_mut() {
            Some((last, n)) if *last == c => *n += 1,
            _ => self.queued.push((c, 1)),
        }
    }

    /// Write what is queued (and a pending pong); count it as sent once written.
    async fn flush(&mut self, ctx: &Ctx, w: &mut Writer, st: &PubState) -> Result<(), ConnError> {
        if let Some(ping) = st.pong.borrow_mut().take() {
            w.push(PONG, &ping);
        }
        let res = w.flush().await;
        if res.is_ok() {
            let mut l = ctx.local.borrow_mut();
            for &(c, n) in &self.queued {
                l.counts.sent[c] += n;
            }
        }
        self.queued.clear();
        res
    }
}

async fn publish(
    ctx: &Rc<Ctx>,
    w: &mut Writer,
    st: &PubState,
    p: u32,
    chans: &[usize],
) -> Result<(), ConnError> {
    let plan = &ctx.plan;
    let start = loop {
        match ctx.shared.start_ns.load(Relaxed) {
            0 => monoio::time::sleep(Duration::from_millis(1)).await,
            s => break s,
        }
    };
    let end = start + plan.warmup_ns + plan.measure_ns;
    let mut timer = PreciseTimer::new(&ctx.live, plan.uring)?;
    let mut b = Batch {
        text: Vec::with_capacity(256 + plan.pad.len()),
        seq: vec![0; chans.len()],
        queued: Vec::new(),
    };
    let stopped =
        || st.ended.get() || ctx.live.closing() || ctx.shared.stop_publishing.load(Relaxed);
    match plan.mode {
        Mode::Rate(rate) => {
            let per_pub = rate / plan.publishers as f64;
            let phase = f64::from(p) / plan.publishers as f64;
            let sched = Schedule::new(start, end, per_pub, phase);
            ctx.local.borrow_mut().counts.scheduled += sched.count();
            let mut k = 0u64;
            while k < sched.count() && !stopped() {
                let due = sched.due_by(mono_ns()).min(k + MAX_BATCH);
                if due == k {
                    timer.sleep_until(sched.due(k)).await?;
                    continue;
                }
                let first_due = sched.due(k);
                while k < due {
                    b.push(plan, w, p, chans, k, sched.due(k));
                    k += 1;
                }
                let res = b.flush(ctx, w, st).await;
                if first_due >= start + plan.warmup_ns {
                    let lag = mono_ns().saturating_sub(first_due).max(1);
                    ctx.local.borrow_mut().send_lag.saturating_record(lag);
                }
                if let Err(e) = res {
                    ctx.local.borrow_mut().counts.unsent += sched.count() - k;
                    return Err(e);
                }
            }
            ctx.local.borrow_mut().counts.unsent += sched.count() - k;
        }
        Mode::Max(window) => {
            timer.sleep_until(start).await?;
            let mut k = 0u64;
            while mono_ns() < end && !stopped() {
                let now = mono_ns();
                let mut n = 0;
                while st.in_flight.get() < window && n < MAX_BATCH {
                    b.push(plan, w, p, chans, k, now);
                    st.in_flight.set(st.in_flight.get() + 1);
                    k += 1;
                    n += 1;
                }
                b.flush(ctx, w, st).await?;
                if st.in_flight.get() >= window {
                    st.wake.wait().await;
                }
            }
        }
    }
    Ok(())
}

/// Set up connection `j`, then run it until it ends or the run is over.
async fn conn_task(ctx: Rc<Ctx>, j: usize) {
    let _task = ctx.live.task();
    let plan = ctx.plan.clone();
    let role = plan.role(j);
    let src = (!plan.source_ips.is_empty()).then(|| plan.source_ips[j % plan.source_ips.len()]);
    let channels = role.subs.list(plan.channels);
    let setup = async {
        let seed = (j as u32).wrapping_mul(0x9e37_79b9);
        let target = &plan.targets[role.target];
        let login = auth::login(plan.tokens.as_deref(), j);
        let mut conn = client::open(target, src, plan.uring, CHUNK, seed, login).await?;
        let names: Vec<String> = channels.iter().map(|&c| plan.channel_name(c)).collect();
        let replies = client::subscribe(&mut conn, &names).await?;
        Ok((conn, replies))
    };
    let res = monoio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .unwrap_or(Err(ConnError::Timeout));
    ctx.in_setup.set(ctx.in_setup.get() - 1);
    ctx.setup_slot.notify();
    let (conn, replies): (Conn, _) = match res {
        Ok(r) => r,
        Err(e) => {
            let mut l = ctx.local.borrow_mut();
            l.counts.setup_failed += 1;
            l.counts.errors.add(e.kind(), || e.to_string());
            return;
        }
    };
    let _fd = ctx.live.socket(conn.fd);
    {
        let mut l = ctx.local.borrow_mut();
        l.counts.setup_ok += 1;
        l.counts.anonymous += u64::from(conn.anonymous);
        l.counts.live += 1;
        for &c in &channels {
            l.counts.subs[c] += 1;
        }
    }
    let Conn {
        mut reader, writer, ..
    } = conn;
    let st = Rc::new(PubState::default());
    let own = match role.publisher {
        Some((p, chans)) => {
            monoio::spawn(publish_task(ctx.clone(), writer, st.clone(), p, chans));
            Some(p)
        }
        None => {
            *st.parked.borrow_mut() = Some(writer);
            None
        }
    };
    // History channels: offsets continue after the top each reply gave.
    let mut heard = Heard::default();
    for (&c, r) in channels.iter().zip(&replies) {
        if let Some(top) = r.offset {
            heard.offsets.restart(c as u32, top);
        }
    }
    let res = read_loop(&ctx, &mut reader, &st, &role.subs, own, heard).await;
    st.ended.set(true);
    st.wake.notify();
    ctx.local.borrow_mut().counts.live -= 1;
    if let Err(e) = res {
        ctx.ended(&format!("connection {j}"), e);
    }
}

/// Move this thread's figures into the shared totals.
fn flush(ctx: &Ctx, last: bool) {
    let mut l = ctx.local.borrow_mut();
    let l = &mut *l;
    let mut agg = ctx.shared.agg.lock().unwrap();
    agg.counts.absorb(&mut l.counts);
    let _ = agg.interval.add(&l.interval);
    l.interval.reset();
    if last {
        let _ = agg.total.add(&l.total);
        let _ = agg.send_lag.add(&l.send_lag);
        agg.threads_done += 1;
    }
}

async fn thread_main(plan: Arc<Plan>, shared: Arc<Shared>, tid: usize) -> bool {
    let ctx = Rc::new(Ctx {
        local: RefCell::new(Local {
            counts: Counts::with_channels(plan.channels),
            interval: new_hist(),
            total: new_hist(),
            send_lag: new_hist(),
        }),
        plan,
        shared,
        live: Rc::new(Live::default()),
        in_setup: Cell::new(0),
        setup_slot: Signal::default(),
    });
    let spawner = ctx.clone();
    monoio::spawn(async move {
        let _task = spawner.live.task();
        let plan = spawner.plan.clone();
        for j in (tid..plan.conns).step_by(plan.threads) {
            while spawner.in_setup.get() >= SETUPS_IN_FLIGHT {
                spawner.setup_slot.wait().await;
            }
            if spawner.live.closing() {
                break;
            }
            spawner.in_setup.set(spawner.in_setup.get() + 1);
            monoio::spawn(conn_task(spawner.clone(), j));
        }
    });
    while !ctx.shared.stop.load(Relaxed) {
        monoio::time::sleep(Duration::from_millis(250)).await;
        flush(&ctx, false);
    }
    ctx.live.shut_all();
    let clean = ctx.live.wait_ended(Duration::from_secs(3)).await;
    flush(&ctx, true);
    clean
}

/// Print one progress line to stderr; `last` carries the previous (time, deliveries).
/// Returns the number of open connections.
fn progress(shared: &Shared, start: u64, last: &mut (u64, u64), quiet: bool) -> i64 {
    let now = mono_ns();
    let mut agg = shared.agg.lock().unwrap();
    let dt = (now - last.0) as f64 / 1e9;
    let received = agg.counts.seq.received;
    let rate = (received - last.1) as f64 / dt.max(1e-3);
    let p99 = agg.interval.value_at_quantile(0.99);
    agg.interval.reset();
    let c = &agg.counts;
    let errors = c.errors.total() + c.closes.total();
    if !quiet {
        eprintln!(
            "[{:5.1}s] conns {:>6}  deliveries/s {:>10.0}  p99 {:>9} µs  errors {}",
            now.saturating_sub(start) as f64 / 1e9,
            c.live,
            rate,
            us(p99),
            errors
        );
    }
    *last = (now, received);
    c.live
}

pub fn fanout(a: &FanoutArgs, prep: &Prepared) -> Result<Report, String> {
    if a.channels == 0 || a.publishers == 0 {
        return Err("--channels and --publishers must be at least 1".into());
    }
    let layout = Layout::Fanout {
        subscribers: a.subscribers,
        channels: a.channels,
        publishers: a.publishers,
    };
    run(
        "fanout",
        layout,
        a.channels,
        a.publishers,
        a.publishers + a.subscribers,
        &a.traffic,
        prep,
    )
}

pub fn rooms(a: &RoomsArgs, prep: &Prepared) -> Result<Report, String> {
    if a.rooms == 0 || a.members == 0 {
        return Err("--rooms and --members must be at least 1".into());
    }
    if !prep.common.publish_urls.is_empty() || !prep.common.subscribe_urls.is_empty() {
        return Err(
            "rooms: every member publishes and subscribes on one connection, so \
                    --publish-url/--subscribe-url do not apply; give several --url to spread \
                    the members of each room over instances"
                .into(),
        );
    }
    let layout = Layout::Rooms {
        rooms: a.rooms,
        members: a.members,
    };
    let n = a.rooms * a.members;
    run("rooms", layout, a.rooms, n, n, &a.traffic, prep)
}

/// A run id for channel names: differs between runs and processes.
pub(crate) fn run_id() -> String {
    let x = mono_ns() ^ (u64::from(std::process::id()) << 40);
    format!("{:06x}", (x ^ (x >> 24)) & 0xff_ffff)
}

fn run(
    scenario: &'static str,
    layout: Layout,
    channels: usize,
    publishers: usize,
    conns: usize,
    t: &Traffic,
    prep: &Prepared,
) -> Result<Report, String> {
    let c = &prep.common;
    let mode = match (t.rate, t.max) {
        (Some(r), _) if r > 0.0 && r.is_finite() => Mode::Rate(r),
        (None, true) if t.window != Some(0) => Mode::Max(t.window.unwrap_or(16)),
        _ => return Err("give --rate R (R > 0) or --max with --window W (W > 0)".into()),
    };
    if t.payload_size > 16 << 20 {
        return Err("--payload-size: at most 16 MiB".into());
    }
    if u32::try_from(publishers).is_err() {
        return Err("too many publishers".into());
    }
    // Minted before setup: the connections need them until the drain is over.
    let need = c.warmup + c.duration + Duration::from_nanos(DRAIN_MAX_NS) + SETUP_TIMEOUT;
    let tokens = prep.mint(conns, need)?;
    let plan = Arc::new(Plan {
        scenario,
        layout,
        conns,
        channels,
        publishers,
        mode,
        targets: prep.targets.clone(),
        pub_targets: prep.pub_targets.clone(),
        sub_targets: prep.sub_targets.clone(),
        prefix: format!("{}load-{}-", t.channel_prefix, run_id()),
        pad: "x".repeat(t.payload_size.saturating_sub(DATA_OVERHEAD)),
        warmup_ns: c.warmup.as_nanos() as u64,
        measure_ns: c.duration.as_nanos() as u64,
        threads: c.threads,
        source_ips: c.source_ips.clone().unwrap_or_default(),
        uring: c.uring(),
        tokens,
    });
    // Connections per destination, for the ephemeral-port check.
    let mut per_target = vec![0usize; plan.targets.len()];
    for j in 0..conns {
        per_target[plan.role(j).target] += 1;
    }
    prep.check_capacity(&per_target, true)?;

    let shared = Arc::new(Shared {
        start_ns: AtomicU64::new(0),
        stop_publishing: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        agg: Mutex::new(Agg {
            counts: Counts::with_channels(channels),
            interval: new_hist(),
            total: new_hist(),
            send_lag: new_hist(),
            threads_done: 0,
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

    // Setup: every connection upgraded and subscribed (or failed).
    if !c.quiet {
        eprintln!("{scenario}: setting up {conns} connections ...");
    }
    let t0 = mono_ns();
    let mut next_print = t0 + 1_000_000_000;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let agg = shared.agg.lock().unwrap();
        let (ok, failed) = (agg.counts.setup_ok, agg.counts.setup_failed);
        if (ok + failed) as usize == conns {
            if failed > 0 {
                let mut msg = format!("{failed} of {conns} connections failed during setup:");
                for line in agg.counts.errors.lines() {
                    msg.push_str(&format!("\n  {line}"));
                }
                if agg.counts.errors.count("fd limit") > 0 {
                    msg.push_str(&format!(
                        "\n  the open-file limit (RLIMIT_NOFILE) is {}; {ok} connections were open",
                        prep.fd_limit
                    ));
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
                eprintln!("  setup: {ok} of {conns} subscribed, {failed} failed");
            }
        }
    }
    let setup_s = (mono_ns() - t0) as f64 / 1e9;
    if !c.quiet {
        eprintln!("setup done in {setup_s:.2} s");
    }

    // Run: publishing starts at `start` on every thread.
    let start = mono_ns() + 20_000_000;
    let probe = CpuProbe::start(c.server_pid, &workers, start);
    shared.start_ns.store(start, Relaxed);
    let end = start + plan.warmup_ns + plan.measure_ns;
    let mut last = (start, 0);
    let mut tick = start;
    let mut all_closed = false;
    while tick < end {
        tick = (tick + 1_000_000_000).min(end);
        std::thread::sleep(Duration::from_nanos(tick.saturating_sub(mono_ns())));
        if progress(&shared, start, &mut last, c.quiet) == 0 {
            eprintln!("every connection is closed: stopping");
            all_closed = true;
            break;
        }
    }
    let received_at_end = shared.agg.lock().unwrap().counts.seq.received;
    let cpu: Cpu = probe.finish(&workers, received_at_end);

    // Drain: until everything expected arrived, nothing moved for a while, or the cap.
    let drain_end = mono_ns() + DRAIN_MAX_NS;
    let (mut seen, mut moved_at) = (u64::MAX, mono_ns());
    if !all_closed {
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = mono_ns();
            let (done, delivered, exp) = {
                let agg = shared.agg.lock().unwrap();
                let c = &agg.counts;
                (
                    c.publishers_done as usize == plan.publishers,
                    c.seq.unique(),
                    c.expected(),
                )
            };
            if delivered != seen {
                (seen, moved_at) = (delivered, now);
            }
            if (done && delivered >= exp) || now - moved_at > DRAIN_IDLE_NS || now > drain_end {
                break;
            }
            if now - last.0 >= 1_000_000_000 {
                progress(&shared, start, &mut last, c.quiet);
            }
        }
    }
    let drain_s = mono_ns().saturating_sub(end) as f64 / 1e9;
    stop_all(&shared);
    let agg = shared.agg.lock().unwrap();
    Ok(report(&plan, &agg, t, prep, cpu, setup_s, drain_s))
}

fn report(
    plan: &Plan,
    agg: &Agg,
    t: &Traffic,
    prep: &Prepared,
    cpu: Cpu,
    setup_s: f64,
    drain_s: f64,
) -> Report {
    use serde_json::json;
    let c = &agg.counts;
    let secs = plan.measure_ns as f64 / 1e9;
    let mut r = Report::new(plan.scenario, prep);
    match plan.layout {
        Layout::Fanout {
            subscribers,
            channels,
            publishers,
        } => {
            let also = match plan.mode {
                Mode::Max(_) => format!(
                    " (+{publishers} publisher connection(s) subscribed to every channel, to \
                     close the loop)"
                ),
                Mode::Rate(_) => String::new(),
            };
            r.setup("subscribers", format!("{subscribers}{also}"));
            r.setup("channels", channels.to_string());
            r.setup("publishers", publishers.to_string());
            r.param("subscribers", json!(subscribers));
            r.param("channels", json!(channels));
            r.param("publishers", json!(publishers));
        }
        Layout::Rooms { rooms, members } => {
            r.setup("rooms", rooms.to_string());
            r.setup(
                "members",
                format!(
                    "{members} per room ({} connections, each publishing and subscribed to its \
                     room)",
                    rooms * members
                ),
            );
            r.param("rooms", json!(rooms));
            r.param("members", json!(members));
        }
    }
    match plan.mode {
        Mode::Rate(rate) => {
            r.setup(
                "load",
                format!(
                    "open loop, {} msg/s total ({}/s per publisher), latency from the intended \
                     send time",
                    fmt_rate(rate),
                    fmt_rate(rate / plan.publishers as f64)
                ),
            );
            r.param("mode", json!("open loop"));
            r.param("rate", json!(rate));
        }
        Mode::Max(w) => {
            r.setup(
                "load",
                format!(
                    "closed loop (--max), window {w} per publisher, latency from the send time"
                ),
            );
            r.param("mode", json!("closed loop"));
            r.param("window", json!(w));
        }
    }
    let size = t.payload_size.max(DATA_OVERHEAD);
    r.setup("payload", format!("{size} B of data per message"));
    r.param("payload_size", json!(size));
    r.common_setup(prep, plan.tokens.as_deref());

    let sent: u64 = c.sent.iter().sum();
    let exp = c.expected();
    let delivered = c.seq.unique();
    let d = Deliveries {
        publishes_scheduled: matches!(plan.mode, Mode::Rate(_)).then_some(c.scheduled),
        publishes_sent: sent,
        publishes_unsent: c.unsent,
        subscriptions: c.subs.iter().sum(),
        expected: exp,
        received: c.seq.received,
        delivered,
        lost: exp.saturating_sub(delivered),
        extra: delivered.saturating_sub(exp),
        duplicates: c.seq.duplicates,
        reordered: c.seq.reordered,
        unexpected: c.unexpected,
        deliveries_in_window: c.window_deliveries,
        deliveries_per_s: c.window_deliveries as f64 / secs,
    };
    let authed = if plan.tokens.is_some() {
        ", each authenticated before subscribing"
    } else {
        ""
    };
    r.line(
        "setup",
        format!("{} connections in {setup_s:.2} s{authed}", c.setup_ok),
    );
    if plan.tokens.is_some() {
        r.set_auth(c.setup_ok - c.anonymous, c.anonymous);
        let denied = c.errors.count("hub error permission_denied");
        if denied > 0 {
            r.warn(format!(
                "the hub refused {denied} publish(es) with permission_denied: with [auth], \
                 clients may not publish unless the hub allows it (`publish = \"authenticated\"` \
                 under [channels] in its config)"
            ));
        }
    }
    let sched = match d.publishes_scheduled {
        Some(n) => format!(" of {n} scheduled"),
        None => String::new(),
    };
    r.line("publishes", format!("{sent} written{sched}"));
    r.line(
        "deliveries",
        format!(
            "{} received, {} in the measured window",
            d.received, d.deliveries_in_window
        ),
    );
    r.line("deliveries/s", format!("{:.0}", d.deliveries_per_s));
    r.line(
        "expected",
        format!(
            "{exp} (publishes written × confirmed subscriptions of their channel, {} in all)",
            d.subscriptions
        ),
    );
    let pct = if exp == 0 {
        100.0
    } else {
        delivered as f64 * 100.0 / exp as f64
    };
    r.line("delivered", format!("{delivered} ({pct:.3}%)"));
    r.line(
        "lost",
        format!(
            "{} (waited {drain_s:.1} s after the run for stragglers)",
            d.lost
        ),
    );
    r.line("duplicates", d.duplicates.to_string());
    r.line(
        "reordered",
        format!(
            "{} (arrived after a later message of the same publisher and channel)",
            d.reordered
        ),
    );
    if d.extra > 0 || d.unexpected > 0 {
        r.line(
            "unexpected",
            format!(
                "{} message(s) on channels not subscribed or unparseable, {} more distinct \
                 deliveries than expected",
                d.unexpected, d.extra
            ),
        );
    }
    r.set_offsets(&c.offsets);
    r.lag(
        "send lag µs",
        "send_lag_us",
        &agg.send_lag,
        "writes behind schedule; part of the latency",
    );
    if d.lost > 0 {
        r.warn(format!(
            "{} of {exp} expected deliveries did not arrive ({:.3}%)",
            d.lost,
            d.lost as f64 * 100.0 / exp.max(1) as f64
        ));
    }
    if d.publishes_unsent > 0 {
        r.warn(format!(
            "{} scheduled publishes were never written (publisher connections ended, or \
             publishers were still behind schedule when the run ended): their latency is not in \
             the histogram",
            d.publishes_unsent
        ));
    }
    if d.duplicates > 0 || d.reordered > 0 {
        r.warn(format!(
            "{} duplicate(s) and {} reordered message(s)",
            d.duplicates, d.reordered
        ));
    }
    r.set_latency(
        agg.total.clone(),
        match plan.mode {
            Mode::Rate(_) => "delivery latency from the intended send time",
            Mode::Max(_) => "delivery latency from the send time",
        },
    );
    r.set_errors(&c.errors, &c.closes, prep.fd_limit, c.setup_ok);
    r.set_deliveries(d);
    r.set_cpu(cpu);
    r
}

/// A per-publisher rate without needless decimals.
fn fmt_rate(r: f64) -> String {
    if r >= 100.0 || r.fract() == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_hubs_layout() {
        let b = br#"{"type":"message","channel":"load-ab12cd-17","data":{"p":3,"s":99,"t":123456789,"x":"xxx"}}"#;
        assert_eq!(
            parse_message(b, b"load-ab12cd-"),
            Some(Msg {
                chan: 17,
                p: 3,
                s: 99,
                t: 123456789,
                offset: None
            })
        );
        assert_eq!(
            parse_message(b, b"load-ffffff-"),
            None,
            "another run's channel"
        );
    }

    #[test]
    fn parses_reserialised_messages() {
        let b = br#"{ "channel": "load-x-2", "type": "message", "data": { "p": 1, "s": 2, "t": 3, "x": "" } }"#;
        assert_eq!(
            parse_message(b, b"load-x-"),
            Some(Msg {
                chan: 2,
                p: 1,
                s: 2,
                t: 3,
                offset: None
            })
        );
    }

    #[test]
    fn parses_offsets_and_resets_of_history_channels() {
        let p = b"h:load-ab12cd-";
        let b = br#"{"type":"message","channel":"h:load-ab12cd-4","offset":42,"data":{"p":1,"s":7,"t":9,"x":""}}"#;
        let m = parse_message(b, p).unwrap();
        assert_eq!((m.chan, m.p, m.s, m.offset), (4, 1, 7, Some(42)));
        // Re-serialised, offset last.
        let b = br#"{"data":{"p":1,"s":7,"t":9},"channel":"h:load-ab12cd-4","type":"message","offset": 43}"#;
        assert_eq!(parse_message(b, p).unwrap().offset, Some(43));
        let reset = br#"{"type":"reset","channel":"h:load-ab12cd-4","recovered":false,"epoch":"e2","offset":3}"#;
        assert_eq!(parse_reset(reset, p), Some((4, 3, "e2".into())));
        assert_eq!(parse_reset(reset, b"h:load-ffffff-"), None, "another run");
        assert_eq!(parse_message(reset, p), None);
    }

    #[test]
    fn rejects_other_frames() {
        let p = b"load-x-";
        assert_eq!(
            parse_message(br#"{"type":"subscribed","channel":"load-x-1","id":1}"#, p),
            None
        );
        assert_eq!(
            parse_message(br#"{"type":"message","channel":"load-x-1","data":42}"#, p),
            None
        );
        assert_eq!(
            parse_message(
                br#"{"type":"message","channel":"load-x-1","data":{"p":1,"s":99999999999999999999,"t":1}}"#,
                p
            ),
            None,
            "overflow"
        );
        assert_eq!(
            error_code(br#"{"type":"error","code":"rate_limited","message":"slow down"}"#),
            "rate_limited"
        );
        assert_eq!(error_code(br#"{"type":"error"}"#), "?");
    }

    #[test]
    fn rates_print_without_noise() {
        assert_eq!(fmt_rate(200.0), "200");
        assert_eq!(fmt_rate(0.1), "0.1");
        assert_eq!(fmt_rate(33.333333), "33.333");
        assert_eq!(fmt_rate(1234.6), "1235");
    }
}
