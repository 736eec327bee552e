//! The `reconnect` scenario: history recovery while publishers run.
//!
//! N subscribers, spread round-robin over K history channels (`<--channel-prefix>load-<run>-<k>`)
//! and over the subscribe instances, each subscribe once at setup and remember the channel's
//! epoch and top offset. P publishers publish at a fixed total rate (open loop, [`crate::schedule::Schedule`])
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
//! End to end, each subscriber keeps one [`crate::track::Tracker`] (per (publisher, channel) sequence
//! numbers) and one [`crate::track::Offsets`] across all its connections, so a message received twice —
//! live before the drop and again in the backlog — is a duplicate, and one never received is
//! lost: expected = Σ over channels of acknowledged publishes × subscribers, less the messages
//! of `recovered:false` windows (top − since of such a reply: "not recoverable", reported
//! apart). A subscriber whose window cannot be sized (the epoch changed, `since` ahead of the
//! top, no `recovered` in the reply) leaves the loss accounting and is counted.
//!
//! Files: this one holds the plan, the counters and the run (setup, timed part, drain);
//! `subscriber.rs` a subscriber's life and the drop scheduler; `publisher.rs` the publishers
//! and their acknowledgements; `report.rs` the report.

use crate::auth;
use crate::cli::{DropMode, ReconnectArgs};
use crate::client::{ConnError, Target};
use crate::report::{Cpu, CpuProbe, Report};
use crate::stats::{mono_ns, new_hist, Closes, Tally};
use crate::track::{OffsetCounts, SeqCounts};
use crate::traffic::run_id;
use crate::worker::{Live, Signal};
use crate::Prepared;
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subscriber::Sub;

mod publisher;
mod report;
mod subscriber;

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
    monoio::spawn(subscriber::dropper(ctx.clone(), plan.drops(tid)));
    let spawner = ctx.clone();
    monoio::spawn(async move {
        let _task = spawner.live.task();
        let plan = spawner.plan.clone();
        let ws_pubs = (tid..plan.publishers).step_by(plan.threads);
        for p in ws_pubs {
            if !plan.pub_target(p).http {
                spawner.in_setup.set(spawner.in_setup.get() + 1);
            }
            monoio::spawn(publisher::publisher(spawner.clone(), p));
        }
        for i in (tid..plan.subscribers).step_by(plan.threads) {
            while spawner.in_setup.get() >= SETUPS_IN_FLIGHT {
                spawner.setup_slot.wait().await;
            }
            if spawner.live.closing() {
                break;
            }
            spawner.in_setup.set(spawner.in_setup.get() + 1);
            monoio::spawn(subscriber::subscriber(spawner.clone(), i));
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
    Ok(report::report(&plan, &agg, a, prep, cpu, setup_s, drain_s))
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
}
