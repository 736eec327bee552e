//! The `fanout` scenario: P publishers publish round-robin over C channels, N subscribers are
//! spread round-robin over those channels, and every publisher also subscribes to all of them.
//!
//! - Open loop (`--rate`): message k of a publisher is *intended* at `start + k / rate_pp`;
//!   its data carries that time, and latency is measured from it (no coordinated omission).
//!   A publisher sleeps on a timerfd (µs precision) and writes every due message in one batch.
//! - Closed loop (`--max --window W`): at most W messages in flight per publisher; one is done
//!   when the publisher receives it back; `t` is the actual send time.
//!
//! Receivers parse `p`, `s`, `t` with a small scanner (no allocation), record latency per
//! thread, and track the next expected sequence number per (publisher, channel) to count gaps,
//! duplicates and late (reordered) messages. Expected deliveries come from the subscriptions
//! the hub confirmed and the publishes written, and are compared with what arrived.

use crate::client::{self, Conn, ConnError, Reader, Target, Writer, PING, PONG, TEXT};
use crate::stats::{self, mono_ns, new_hist, us, Counts};
use crate::FanoutArgs;
use bytes::Bytes;
use hdrhistogram::Histogram;
use monoio::buf::VecBuf;
use monoio::io::AsyncReadRent;
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being set up at once, per thread.
const SETUPS_IN_FLIGHT: usize = 128;
/// Most frames a publisher writes in one batch.
const MAX_BATCH: usize = 64;
/// Read buffer per connection.
const CHUNK: usize = 16 * 1024;
/// Size of the data object without padding, roughly: `{"p":0,"s":0,"t":…,"x":""}`.
const DATA_OVERHEAD: usize = 40;

#[derive(Clone, Copy)]
enum Mode {
    Rate(f64),
    Max(u32),
}

struct Plan {
    target: Target,
    subscribers: usize,
    channels: usize,
    publishers: usize,
    mode: Mode,
    warmup_ns: u64,
    measure_ns: u64,
    pad: String,
    threads: usize,
    source_ips: Vec<IpAddr>,
    uring: bool,
}

/// Totals the worker threads add to; read by the main thread.
struct Agg {
    counts: Counts,
    /// Latencies since the last progress line (including warmup).
    interval: Histogram<u64>,
    /// Latencies of messages intended after the warmup; complete once `threads_done == threads`.
    total: Histogram<u64>,
    /// Open loop: how late publishers wrote their batches against the schedule.
    send_lag: Histogram<u64>,
    threads_done: usize,
}

struct Shared {
    /// CLOCK_MONOTONIC ns at which publishing starts; 0 until setup is complete.
    start_ns: AtomicU64,
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
    in_setup: Cell<usize>,
    setup_slot: Signal,
}

/// A wake-up for one waiting task on the same thread (level-triggered: a notify before the
/// wait is not lost).
#[derive(Default)]
struct Signal {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Signal {
    fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// A timerfd read through monoio: sleeps to an absolute CLOCK_MONOTONIC time with µs
/// precision (monoio's own timer has 1 ms granularity, too coarse for a send schedule).
struct PreciseTimer {
    fd: monoio::net::TcpStream,
    buf: Option<VecBuf>,
}

impl PreciseTimer {
    fn new(uring: bool) -> std::io::Result<Self> {
        // io_uring polls blocking fds itself; the epoll driver needs a non-blocking one.
        let flags = libc::TFD_CLOEXEC | if uring { 0 } else { libc::TFD_NONBLOCK };
        // SAFETY: plain timerfd_create; the fd is owned by `std` right away.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh fd owned by nobody else. monoio only reads it with readv, which works
        // on any readable fd (the socket type is just the owner of the fd).
        let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        let fd = monoio::net::TcpStream::from_std(std)?;
        Ok(PreciseTimer {
            fd,
            buf: Some(VecBuf::from(vec![vec![0u8; 8]])),
        })
    }

    async fn sleep_until(&mut self, t: u64) -> Result<(), ConnError> {
        if t <= mono_ns() {
            return Ok(());
        }
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let value = libc::timespec {
            tv_sec: (t / 1_000_000_000) as libc::time_t,
            tv_nsec: (t % 1_000_000_000) as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: zero,
            it_value: value,
        };
        let fd = self.fd.as_raw_fd();
        // SAFETY: valid timerfd and itimerspec; the old value is not wanted.
        let rc = unsafe {
            libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
        if rc < 0 {
            return Err(ConnError::Io(
                "timerfd_settime",
                std::io::Error::last_os_error(),
            ));
        }
        let buf = self
            .buf
            .take()
            .expect("timer buffer is returned after every read");
        let (res, buf) = self.fd.readv(buf).await;
        self.buf = Some(buf);
        res.map(|_| ())
            .map_err(|e| ConnError::Io("timerfd read", e))
    }
}

/// The fields of a delivered load message.
struct Msg {
    chan: usize,
    p: usize,
    s: u64,
    t: u64,
}

/// Parse `{"type":"message","channel":"load-C","data":{"p":P,"s":S,"t":T,...` in place.
fn parse_message(b: &[u8]) -> Option<Msg> {
    fn lit(b: &[u8], i: &mut usize, s: &[u8]) -> Option<()> {
        b.get(*i..)?.starts_with(s).then(|| *i += s.len())
    }
    fn num(b: &[u8], i: &mut usize) -> Option<u64> {
        let start = *i;
        let mut v = 0u64;
        while let Some(d) = b.get(*i).filter(|d| d.is_ascii_digit()) {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            *i += 1;
        }
        (*i > start).then_some(v)
    }
    let mut i = 0;
    lit(b, &mut i, br#"{"type":"message","channel":"load-"#)?;
    let chan = num(b, &mut i)? as usize;
    lit(b, &mut i, br#"","data":{"p":"#)?;
    let p = num(b, &mut i)? as usize;
    lit(b, &mut i, br#","s":"#)?;
    let s = num(b, &mut i)?;
    lit(b, &mut i, br#","t":"#)?;
    let t = num(b, &mut i)?;
    Some(Msg { chan, p, s, t })
}

/// Per connection: the next expected per-channel index of each (publisher, channel) it hears.
/// Publisher p sends sequence s on channel (s + p) % C, so on one channel its messages carry
/// s / C = 0, 1, 2, ...
struct SeqTrack {
    next: Vec<u64>,
    channels: usize,
    /// Some(c): a subscriber of channel c only; None: subscribed to every channel.
    own: Option<usize>,
    /// Messages skipped over and not yet seen (a late one fills a gap: reordered).
    gaps: u64,
}

impl SeqTrack {
    fn new(plan: &Plan, own: Option<usize>) -> Self {
        let per_pub = if own.is_some() { 1 } else { plan.channels };
        SeqTrack {
            next: vec![0; plan.publishers * per_pub],
            channels: plan.channels,
            own,
            gaps: 0,
        }
    }

    /// Account one message; false when it was not meant for this connection.
    fn observe(&mut self, m: &Msg, counts: &mut Counts) -> bool {
        let slot = match self.own {
            Some(own) if m.chan == own => m.p,
            None if m.chan < self.channels => m.p * self.channels + m.chan,
            _ => usize::MAX,
        };
        let Some(next) = self.next.get_mut(slot) else {
            counts.errors.add("unexpected message", || {
                format!(
                    "message from publisher {} on channel load-{} not subscribed",
                    m.p, m.chan
                )
            });
            return false;
        };
        let k = m.s / self.channels as u64;
        if k == *next {
            *next += 1;
        } else if k > *next {
            self.gaps += k - *next;
            *next = k + 1;
        } else if self.gaps > 0 {
            self.gaps -= 1;
            counts.reordered += 1;
        } else {
            counts.duplicates += 1;
        }
        true
    }
}

/// Account one text frame that arrived at `arrived`; the publisher index of a valid message.
fn on_text(ctx: &Ctx, track: &mut SeqTrack, text: &[u8], arrived: u64) -> Option<usize> {
    let mut l = ctx.local.borrow_mut();
    let Some(m) = parse_message(text) else {
        l.counts.errors.add("unexpected frame", || {
            format!(
                "unexpected text frame: {}",
                String::from_utf8_lossy(&text[..text.len().min(160)])
            )
        });
        return None;
    };
    if !track.observe(&m, &mut l.counts) {
        return None;
    }
    let latency = arrived.saturating_sub(m.t).max(1);
    let warm_end = ctx.shared.start_ns.load(Relaxed) + ctx.plan.warmup_ns;
    l.counts.deliveries += 1;
    if arrived >= warm_end && arrived < warm_end + ctx.plan.measure_ns {
        l.counts.window_deliveries += 1;
    }
    l.interval.saturating_record(latency);
    if m.t >= warm_end {
        l.total.saturating_record(latency);
    }
    Some(m.p)
}

async fn run_subscriber(ctx: &Ctx, mut conn: Conn, channel: usize) -> Result<(), ConnError> {
    let mut track = SeqTrack::new(&ctx.plan, Some(channel));
    loop {
        let (op, payload) = conn.reader.next_frame().await?;
        match op {
            TEXT => {
                on_text(ctx, &mut track, &payload, conn.reader.read_ns);
            }
            PING => conn.writer.send(PONG, &payload).await?,
            _ => {}
        }
    }
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

async fn run_publisher(ctx: &Rc<Ctx>, conn: Conn, p: usize) -> Result<(), ConnError> {
    let Conn { mut reader, writer } = conn;
    let st = Rc::new(PubState::default());
    monoio::spawn(publish_task(ctx.clone(), writer, st.clone(), p));
    let mut track = SeqTrack::new(&ctx.plan, None);
    let res = publisher_reader(ctx, &mut reader, &st, &mut track, p).await;
    st.ended.set(true);
    st.wake.notify();
    res
}

async fn publisher_reader(
    ctx: &Ctx,
    reader: &mut Reader,
    st: &PubState,
    track: &mut SeqTrack,
    p: usize,
) -> Result<(), ConnError> {
    loop {
        let (op, payload) = reader.next_frame().await?;
        match op {
            TEXT if on_text(ctx, track, &payload, reader.read_ns) == Some(p) => {
                st.in_flight.set(st.in_flight.get().saturating_sub(1));
                st.wake.notify();
            }
            PING => {
                let parked = st.parked.borrow_mut().take();
                match parked {
                    Some(mut w) => {
                        w.send(PONG, &payload).await?;
                        *st.parked.borrow_mut() = Some(w);
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

async fn publish_task(ctx: Rc<Ctx>, mut w: Writer, st: Rc<PubState>, p: usize) {
    if let Err(e) = publish(&ctx, &mut w, &st, p).await {
        let mut l = ctx.local.borrow_mut();
        l.counts
            .errors
            .add(e.kind(), || format!("publisher {p}: {e}"));
    }
    ctx.local.borrow_mut().counts.publishers_done += 1;
    *st.parked.borrow_mut() = Some(w);
}

/// Queue the publish of message `s` of publisher `p`, intended at `t`.
fn push_publish(ctx: &Ctx, w: &mut Writer, text: &mut Vec<u8>, p: usize, s: u64, t: u64) {
    let c = ((s + p as u64) % ctx.plan.channels as u64) as usize;
    text.clear();
    let pad = &ctx.plan.pad;
    let _ = write!(
        text,
        r#"{{"type":"publish","channel":"load-{c}","data":{{"p":{p},"s":{s},"t":{t},"x":"{pad}"}}}}"#
    );
    w.push(TEXT, text);
    ctx.local.borrow_mut().counts.sent[c] += 1;
}

async fn publish(ctx: &Ctx, w: &mut Writer, st: &PubState, p: usize) -> Result<(), ConnError> {
    let plan = &ctx.plan;
    let start = loop {
        match ctx.shared.start_ns.load(Relaxed) {
            0 => monoio::time::sleep(Duration::from_millis(1)).await,
            s => break s,
        }
    };
    let end = start + plan.warmup_ns + plan.measure_ns;
    let mut timer = PreciseTimer::new(plan.uring).map_err(|e| ConnError::Io("timerfd", e))?;
    timer.sleep_until(start).await?;
    let mut text = Vec::with_capacity(256 + plan.pad.len());
    let mut s = 0u64;
    let answer_ping = |w: &mut Writer| {
        if let Some(ping) = st.pong.borrow_mut().take() {
            w.push(PONG, &ping);
        }
    };
    match plan.mode {
        Mode::Rate(rate) => {
            let per_pub = rate / plan.publishers as f64;
            let count = ((end - start) as f64 / 1e9 * per_pub) as u64;
            let due = |k: u64| start + (k as f64 * 1e9 / per_pub) as u64;
            while s < count && !st.ended.get() {
                let now = mono_ns();
                let batch_due = due(s);
                let mut n = 0;
                while s < count && n < MAX_BATCH && due(s) <= now {
                    push_publish(ctx, w, &mut text, p, s, due(s));
                    s += 1;
                    n += 1;
                }
                answer_ping(w);
                w.flush().await?;
                if n > 0 && batch_due >= start + plan.warmup_ns {
                    let lag = mono_ns().saturating_sub(batch_due).max(1);
                    ctx.local.borrow_mut().send_lag.saturating_record(lag);
                }
                if s < count {
                    timer.sleep_until(due(s)).await?;
                }
            }
        }
        Mode::Max(window) => {
            while mono_ns() < end && !st.ended.get() {
                let now = mono_ns();
                let mut n = 0;
                while st.in_flight.get() < window && n < MAX_BATCH {
                    push_publish(ctx, w, &mut text, p, s, now);
                    st.in_flight.set(st.in_flight.get() + 1);
                    s += 1;
                    n += 1;
                }
                answer_ping(w);
                w.flush().await?;
                if st.in_flight.get() >= window {
                    st.wake.wait().await;
                }
            }
        }
    }
    Ok(())
}

/// Set up connection `j` (publishers first), then run it until the process ends.
async fn conn_task(ctx: Rc<Ctx>, j: usize) {
    let plan = ctx.plan.clone();
    let publisher = j < plan.publishers;
    let channels: Vec<usize> = if publisher {
        (0..plan.channels).collect()
    } else {
        vec![(j - plan.publishers) % plan.channels]
    };
    let src = (!plan.source_ips.is_empty()).then(|| plan.source_ips[j % plan.source_ips.len()]);
    let setup = async {
        let seed = (j as u32).wrapping_mul(0x9e37_79b9);
        let mut conn = client::open(&plan.target, src, plan.uring, CHUNK, seed).await?;
        let names: Vec<String> = channels.iter().map(|c| format!("load-{c}")).collect();
        client::subscribe(&mut conn, &names).await?;
        Ok(conn)
    };
    let res = monoio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .unwrap_or(Err(ConnError::Timeout));
    ctx.in_setup.set(ctx.in_setup.get() - 1);
    ctx.setup_slot.notify();
    let conn = match res {
        Ok(conn) => conn,
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
        l.counts.live += 1;
        for &c in &channels {
            l.counts.subs[c] += 1;
        }
    }
    let res = if publisher {
        run_publisher(&ctx, conn, j).await
    } else {
        run_subscriber(&ctx, conn, channels[0]).await
    };
    let mut l = ctx.local.borrow_mut();
    l.counts.live -= 1;
    match res {
        Err(ConnError::Closed(code)) => *l.counts.closes.entry(code).or_default() += 1,
        Err(e) => l.counts.errors.add(e.kind(), || e.to_string()),
        Ok(()) => {}
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

async fn thread_main(plan: Arc<Plan>, shared: Arc<Shared>, tid: usize) {
    let ctx = Rc::new(Ctx {
        local: RefCell::new(Local {
            counts: Counts::with_channels(plan.channels),
            interval: new_hist(),
            total: new_hist(),
            send_lag: new_hist(),
        }),
        plan,
        shared,
        in_setup: Cell::new(0),
        setup_slot: Signal::default(),
    });
    let spawner = ctx.clone();
    monoio::spawn(async move {
        let plan = spawner.plan.clone();
        for j in (tid..plan.publishers + plan.subscribers).step_by(plan.threads) {
            while spawner.in_setup.get() >= SETUPS_IN_FLIGHT {
                spawner.setup_slot.wait().await;
            }
            spawner.in_setup.set(spawner.in_setup.get() + 1);
            monoio::spawn(conn_task(spawner.clone(), j));
        }
    });
    loop {
        monoio::time::sleep(Duration::from_millis(250)).await;
        let last = ctx.shared.stop.load(Relaxed);
        flush(&ctx, last);
        if last {
            return;
        }
    }
}

/// Σ over channels of publishes written × subscriptions confirmed.
fn expected(c: &Counts) -> u64 {
    c.sent.iter().zip(&c.subs).map(|(s, n)| s * n).sum()
}

/// Print one progress line to stderr; `last` carries the previous (time, deliveries).
/// Returns the number of open connections.
fn progress(shared: &Shared, start: u64, last: &mut (u64, u64)) -> i64 {
    let now = mono_ns();
    let mut agg = shared.agg.lock().unwrap();
    let dt = (now - last.0) as f64 / 1e9;
    let rate = (agg.counts.deliveries - last.1) as f64 / dt.max(1e-3);
    let p99 = agg.interval.value_at_quantile(0.99);
    agg.interval.reset();
    let c = &agg.counts;
    let errors = c.errors.total() + c.closes.values().sum::<u64>();
    eprintln!(
        "[{:5.1}s] conns {:>6}  deliveries/s {:>10.0}  p99 {:>9} µs  errors {}",
        now.saturating_sub(start) as f64 / 1e9,
        c.live,
        rate,
        us(p99),
        errors
    );
    *last = (now, c.deliveries);
    c.live
}

pub fn run(a: FanoutArgs, target: Target, fd_limit: u64) -> Result<(), String> {
    if a.channels == 0 || a.publishers == 0 {
        return Err("--channels and --publishers must be at least 1".into());
    }
    let mode = match (a.rate, a.max) {
        (Some(r), _) if r > 0.0 && r.is_finite() => Mode::Rate(r),
        (None, true) if a.window > 0 => Mode::Max(a.window),
        _ => return Err("give --rate R (R > 0) or --max with --window W (W > 0)".into()),
    };
    let conns = a.publishers + a.subscribers;
    if conns as u64 + 32 > fd_limit {
        eprintln!("warning: {conns} connections need more than the open-file limit ({fd_limit})");
    }
    let plan = Arc::new(Plan {
        target,
        subscribers: a.subscribers,
        channels: a.channels,
        publishers: a.publishers,
        mode,
        warmup_ns: a.warmup.as_nanos() as u64,
        measure_ns: a.duration.as_nanos() as u64,
        pad: "x".repeat(a.payload_size.saturating_sub(DATA_OVERHEAD)),
        threads: a.common.threads,
        source_ips: a.common.source_ips.clone().unwrap_or_default(),
        uring: a.common.uring(),
    });
    let shared = Arc::new(Shared {
        start_ns: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        agg: Mutex::new(Agg {
            counts: Counts::with_channels(a.channels),
            interval: new_hist(),
            total: new_hist(),
            send_lag: new_hist(),
            threads_done: 0,
        }),
    });
    let (p2, s2) = (plan.clone(), shared.clone());
    crate::spawn_threads(&a.common, move |tid| {
        thread_main(p2.clone(), s2.clone(), tid)
    });

    // Setup: every connection upgraded and subscribed (or failed).
    eprintln!("connecting {conns} connections to {} ...", plan.target.url);
    let t0 = mono_ns();
    let mut next_print = t0 + 1_000_000_000;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let agg = shared.agg.lock().unwrap();
        let (ok, failed) = (agg.counts.setup_ok, agg.counts.setup_failed);
        if (ok + failed) as usize == conns {
            if failed > 0 {
                for line in agg.counts.errors.lines() {
                    eprintln!("  {line}");
                }
                return Err(format!(
                    "{failed} of {conns} connections failed during setup"
                ));
            }
            break;
        }
        if mono_ns() >= next_print {
            next_print += 1_000_000_000;
            eprintln!("  setup: {ok} of {conns} subscribed, {failed} failed");
        }
    }
    eprintln!("setup done in {:.2} s", (mono_ns() - t0) as f64 / 1e9);

    // Run: publishing starts at `start` on every thread.
    let pid = a.common.server_pid;
    let (cpu0, hub0) = (stats::self_cpu_s(), pid.and_then(stats::proc_cpu_s));
    let start = mono_ns() + 20_000_000;
    shared.start_ns.store(start, Relaxed);
    let end = start + plan.warmup_ns + plan.measure_ns;
    let mut last = (start, 0);
    let mut tick = start;
    while tick < end {
        tick = (tick + 1_000_000_000).min(end);
        std::thread::sleep(Duration::from_nanos(tick.saturating_sub(mono_ns())));
        if progress(&shared, start, &mut last) == 0 {
            eprintln!("every connection is closed: stopping");
            break;
        }
    }

    // Drain: until everything expected arrived, nothing moved for 2 s, or 10 s passed.
    let drain_end = end + 10_000_000_000;
    let (mut seen, mut moved_at) = (u64::MAX, mono_ns());
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = mono_ns();
        let (done, delivered, exp) = {
            let agg = shared.agg.lock().unwrap();
            let c = &agg.counts;
            (
                c.publishers_done as usize == plan.publishers,
                c.deliveries - c.duplicates,
                expected(c),
            )
        };
        if delivered != seen {
            (seen, moved_at) = (delivered, now);
        }
        if (done && delivered >= exp) || now - moved_at > 2_000_000_000 || now > drain_end {
            break;
        }
        if now - last.0 >= 1_000_000_000 {
            progress(&shared, start, &mut last);
        }
    }
    let wall = (mono_ns() - start) as f64 / 1e9;
    let cpu = stats::self_cpu_s() - cpu0;
    let hub_cpu = pid
        .and_then(stats::proc_cpu_s)
        .zip(hub0)
        .map(|(b, a)| b - a);
    shared.stop.store(true, Relaxed);
    let wait_end = mono_ns() + 3_000_000_000;
    while shared.agg.lock().unwrap().threads_done < plan.threads && mono_ns() < wait_end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let agg = shared.agg.lock().unwrap();
    report(&a, &plan, &agg, wall, cpu, hub_cpu)
}

fn report(
    a: &FanoutArgs,
    plan: &Plan,
    agg: &Agg,
    wall: f64,
    cpu: f64,
    hub_cpu: Option<f64>,
) -> Result<(), String> {
    let c = &agg.counts;
    let h = &agg.total;
    let load = match plan.mode {
        Mode::Rate(r) => format!(
            "open loop, {r} msg/s total ({:.1}/s per publisher)",
            r / plan.publishers as f64
        ),
        Mode::Max(w) => format!("closed loop (--max), window {w} per publisher"),
    };
    let sent: u64 = c.sent.iter().sum();
    let exp = expected(c);
    let delivered = c.deliveries - c.duplicates;
    let pct = if exp == 0 {
        0.0
    } else {
        delivered as f64 * 100.0 / exp as f64
    };
    let secs = plan.measure_ns as f64 / 1e9;
    println!("ringhub-load fanout");
    println!("  url            {}", plan.target.url);
    println!(
        "  subscribers    {} (+{} publisher connection(s) subscribed to every channel)",
        plan.subscribers, plan.publishers
    );
    println!("  channels       {}", plan.channels);
    println!("  publishers     {}", plan.publishers);
    println!("  load           {load}");
    println!(
        "  payload        ~{} B of data per message",
        a.payload_size.max(DATA_OVERHEAD)
    );
    println!(
        "  duration       {secs} s measured after {} s warmup",
        plan.warmup_ns as f64 / 1e9
    );
    println!("  threads        {}", crate::threads_desc(&a.common));
    println!("results");
    println!("  publishes sent {sent}");
    println!(
        "  deliveries     {} ({} in the measured window)",
        c.deliveries, c.window_deliveries
    );
    println!("  deliveries/s   {:.0}", c.window_deliveries as f64 / secs);
    println!("  expected       {exp} (publishes × confirmed subscriptions of their channel)");
    println!("  delivered      {delivered} ({pct:.3}%)");
    println!("  lost           {}", exp.saturating_sub(delivered));
    println!("  duplicates     {}", c.duplicates);
    println!("  reordered      {}", c.reordered);
    let q = |x: f64| us(h.value_at_quantile(x));
    println!(
        "  latency µs     p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}  max {}  ({} samples)",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        q(0.9999),
        us(h.max()),
        h.len()
    );
    let lag = &agg.send_lag;
    if !lag.is_empty() {
        println!(
            "  send lag µs    p50 {}  p99 {}  max {}  (publisher writes behind schedule; \
             included in the latency)",
            us(lag.value_at_quantile(0.5)),
            us(lag.value_at_quantile(0.99)),
            us(lag.max())
        );
    }
    println!("  server closes  {}", c.closes_line());
    if c.errors.total() == 0 {
        println!("  errors         none");
    } else {
        println!("  errors");
        for line in c.errors.lines() {
            println!("    {line}");
        }
    }
    let pct_core = cpu / wall * 100.0;
    let per = |s: f64| format!("{:.2}", s * 1e6 / c.deliveries.max(1) as f64);
    println!(
        "  load gen CPU   {cpu:.2} s user+sys in {wall:.2} s = {pct_core:.1}% of one core \
         ({} µs per delivery)",
        per(cpu)
    );
    if let (Some(hub), Some(pid)) = (hub_cpu, a.common.server_pid) {
        println!(
            "  hub CPU        {hub:.2} s user+sys (pid {pid}) = {:.1}% of one core \
             ({} µs per delivery; softirq time on other tasks not included)",
            hub / wall * 100.0,
            per(hub)
        );
    }
    if pct_core > 90.0 * plan.threads as f64 {
        println!(
            "WARNING: the load generator used {pct_core:.0}% of its {} thread(s)' cores: \
             it may have been the bottleneck (add --threads)",
            plan.threads
        );
    }
    if let Some(path) = &a.hgrm {
        stats::write_hgrm(h, path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("  histogram      {} (values in µs)", path.display());
    }
    Ok(())
}
