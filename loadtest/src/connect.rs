//! The `connect` scenario, and the connection-opening engine it shares with `idle`.
//!
//! Attempt k is intended at `start + k / rate` (open loop, [`Schedule`]); its connect→welcome
//! time is measured from that intended time, so a hub that accepts slowly cannot hide it by
//! slowing the attempts down (how late the load generator itself started attempts is reported
//! separately). Each attempt connects (from the next `--source-ips` address), upgrades, waits
//! for the welcome, optionally subscribes to a channel of its own, and then either closes with a
//! close handshake (`connect`, the default: connection churn) or stays open answering pings
//! until the end (`connect --keep`, `idle`). Failures are counted by cause.
//!
//! With auth on, attempt k presents token k (all minted before the schedule starts, so signing
//! is neither in the connect rate nor in the CPU per connection) and is established only when
//! the hub answered `connected`: the latency is then connect→connected, and the hub's CPU per
//! connection includes verifying the token.

use crate::auth::{self, Tokens};
use crate::cli::ConnectArgs;
use crate::client::{self, ConnError, Target, PING, PONG};
use crate::report::{CpuProbe, Report};
use crate::schedule::Schedule;
use crate::stats::{mono_ns, new_hist, us, Closes, Tally};
use crate::worker::{Live, PreciseTimer, Workers};
use crate::Prepared;
use hdrhistogram::Histogram;
use serde_json::json;
use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the engine opens, how fast, and what it does with each connection.
pub(crate) struct OpenPlan {
    pub targets: Vec<Target>,
    /// Indexes into `targets`, round-robin over the attempts.
    pub order: Vec<usize>,
    pub connections: usize,
    pub rate: f64,
    pub start_ns: u64,
    /// Attempts intended before this go into the latency histogram only for the progress line.
    pub warm_end_ns: u64,
    /// Hold every connection until the end (else close it right after the welcome).
    pub keep: bool,
    /// Subscribe each connection to a channel of its own (`{prefix}{k}`).
    pub subscribe: Option<String>,
    /// Read buffer size per connection (a pending read pins it: small for idle connections).
    pub chunk: usize,
    pub threads: usize,
    pub source_ips: Vec<IpAddr>,
    pub uring: bool,
    /// Token k for attempt k (auth on).
    pub tokens: Option<Arc<Tokens>>,
}

impl OpenPlan {
    pub fn schedule(&self) -> Schedule {
        // One schedule for all attempts; thread t takes attempts t, t + T, …
        let span = (self.connections as f64 / self.rate * 1e9) as u64 + 1;
        let s = Schedule::new(self.start_ns, self.start_ns + span, self.rate, 0.0);
        debug_assert!(s.count() >= self.connections as u64);
        s
    }
}

/// Counters a thread hands to the main thread (moved by [`OpenCounts::absorb`]).
#[derive(Default)]
pub(crate) struct OpenCounts {
    pub attempted: u64,
    pub established: u64,
    /// Established, but the hub's `connected` had an empty user (it does not check tokens).
    pub anonymous: u64,
    /// Established from attempts intended in the measured window.
    pub window_established: u64,
    pub failed: u64,
    /// Currently open (a delta).
    pub live: i64,
    pub closed_clean: u64,
    /// Close handshakes finished, cleanly or not (without --keep).
    pub close_done: u64,
    pub errors: Tally,
    /// Held connections the server closed.
    pub closes: Closes,
}

impl OpenCounts {
    fn absorb(&mut self, o: &mut OpenCounts) {
        use std::mem::take;
        self.attempted += take(&mut o.attempted);
        self.established += take(&mut o.established);
        self.anonymous += take(&mut o.anonymous);
        self.window_established += take(&mut o.window_established);
        self.failed += take(&mut o.failed);
        self.live += take(&mut o.live);
        self.closed_clean += take(&mut o.closed_clean);
        self.close_done += take(&mut o.close_done);
        self.errors.absorb(&mut o.errors);
        self.closes.absorb(&mut o.closes);
    }

    /// Attempts that have an outcome (with `closing`: including their close handshake).
    pub fn settled(&self, closing: bool) -> u64 {
        if closing {
            self.close_done + self.failed
        } else {
            self.established + self.failed
        }
    }
}

pub(crate) struct OpenAgg {
    pub counts: OpenCounts,
    /// connect→welcome since the last progress line.
    pub interval: Histogram<u64>,
    /// connect→welcome of attempts intended after the warmup.
    pub total: Histogram<u64>,
    /// How late attempts started against their intended time (the load generator's lag).
    pub start_lag: Histogram<u64>,
}

pub(crate) struct OpenShared {
    pub stop: AtomicBool,
    pub agg: Mutex<OpenAgg>,
}

struct Local {
    counts: OpenCounts,
    interval: Histogram<u64>,
    total: Histogram<u64>,
    start_lag: Histogram<u64>,
}

struct Ctx {
    plan: Arc<OpenPlan>,
    live: Rc<Live>,
    local: RefCell<Local>,
}

async fn attempt(ctx: Rc<Ctx>, k: usize, due: u64) {
    let _task = ctx.live.task();
    let plan = &ctx.plan;
    let src = (!plan.source_ips.is_empty()).then(|| plan.source_ips[k % plan.source_ips.len()]);
    let target = &plan.targets[plan.order[k % plan.order.len()]];
    let setup = async {
        let seed = (k as u32).wrapping_mul(0x9e37_79b9);
        let login = auth::login(plan.tokens.as_deref(), k);
        let mut conn = client::open(target, src, plan.uring, plan.chunk, seed, login).await?;
        let welcomed = mono_ns();
        if let Some(prefix) = &plan.subscribe {
            client::subscribe(&mut conn, &[format!("{prefix}{k}")]).await?;
        }
        Ok((conn, welcomed))
    };
    let res = monoio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .unwrap_or(Err(ConnError::Timeout));
    let mut conn = {
        let mut l = ctx.local.borrow_mut();
        match res {
            Ok((conn, welcomed)) => {
                let t = welcomed.saturating_sub(due).max(1);
                l.interval.saturating_record(t);
                l.counts.established += 1;
                l.counts.anonymous += u64::from(conn.anonymous);
                if due >= plan.warm_end_ns {
                    l.total.saturating_record(t);
                    l.counts.window_established += 1;
                }
                conn
            }
            Err(e) => {
                l.counts.failed += 1;
                l.counts.errors.add(e.kind(), || e.to_string());
                return;
            }
        }
    };
    let _fd = ctx.live.socket(conn.fd);
    if !plan.keep {
        let res = monoio::time::timeout(CLOSE_TIMEOUT, conn.close())
            .await
            .unwrap_or(Err(ConnError::Timeout));
        let mut l = ctx.local.borrow_mut();
        l.counts.close_done += 1;
        match res {
            Ok(()) => l.counts.closed_clean += 1,
            Err(_) if ctx.live.closing() => {}
            Err(e) => l
                .counts
                .errors
                .add(&format!("close: {}", e.kind()), || e.to_string()),
        }
        return;
    }
    ctx.local.borrow_mut().counts.live += 1;
    let end = loop {
        match conn.reader.next_frame().await {
            Ok((PING, payload)) => {
                if let Err(e) = conn.writer.send(PONG, &payload).await {
                    break e;
                }
            }
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    let mut l = ctx.local.borrow_mut();
    l.counts.live -= 1;
    if !ctx.live.closing() {
        match end {
            ConnError::Closed(code) => l.counts.closes.add(code),
            e => l.counts.errors.add(e.kind(), || e.to_string()),
        }
    }
}

fn flush(ctx: &Ctx, shared: &OpenShared) {
    let mut l = ctx.local.borrow_mut();
    let l = &mut *l;
    let mut agg = shared.agg.lock().unwrap();
    agg.counts.absorb(&mut l.counts);
    let _ = agg.interval.add(&l.interval);
    let _ = agg.total.add(&l.total);
    let _ = agg.start_lag.add(&l.start_lag);
    l.interval.reset();
    l.total.reset();
    l.start_lag.reset();
}

async fn thread_main(plan: Arc<OpenPlan>, shared: Arc<OpenShared>, tid: usize) -> bool {
    let ctx = Rc::new(Ctx {
        plan,
        live: Rc::new(Live::default()),
        local: RefCell::new(Local {
            counts: OpenCounts::default(),
            interval: new_hist(),
            total: new_hist(),
            start_lag: new_hist(),
        }),
    });
    let spawner = ctx.clone();
    monoio::spawn(async move {
        let _task = spawner.live.task();
        let plan = spawner.plan.clone();
        let sched = plan.schedule();
        let mut timer = match PreciseTimer::new(&spawner.live, plan.uring) {
            Ok(t) => t,
            Err(e) => {
                let mut l = spawner.local.borrow_mut();
                l.counts.errors.add(e.kind(), || format!("timer: {e}"));
                return;
            }
        };
        for k in (tid..plan.connections).step_by(plan.threads) {
            let due = sched.due(k as u64);
            if timer.sleep_until(due).await.is_err() || spawner.live.closing() {
                break;
            }
            {
                let mut l = spawner.local.borrow_mut();
                l.counts.attempted += 1;
                l.start_lag
                    .saturating_record(mono_ns().saturating_sub(due).max(1));
            }
            monoio::spawn(attempt(spawner.clone(), k, due));
        }
    });
    let shared2 = shared.clone();
    while !shared2.stop.load(Relaxed) {
        monoio::time::sleep(Duration::from_millis(100)).await;
        flush(&ctx, &shared2);
    }
    ctx.live.shut_all();
    let clean = ctx.live.wait_ended(Duration::from_secs(3)).await;
    flush(&ctx, &shared2);
    clean
}

/// Start the engine's threads.
pub(crate) fn start(plan: OpenPlan, prep: &Prepared) -> Result<(Arc<OpenShared>, Workers), String> {
    let plan = Arc::new(plan);
    let shared = Arc::new(OpenShared {
        stop: AtomicBool::new(false),
        agg: Mutex::new(OpenAgg {
            counts: OpenCounts::default(),
            interval: new_hist(),
            total: new_hist(),
            start_lag: new_hist(),
        }),
    });
    let (p2, s2) = (plan.clone(), shared.clone());
    let workers = crate::worker::spawn_threads(&prep.common, move |tid| {
        thread_main(p2.clone(), s2.clone(), tid)
    })?;
    Ok((shared, workers))
}

/// Stop the engine: every thread shuts its connections and hands in its last figures.
pub(crate) fn stop(shared: &OpenShared, workers: &Workers) {
    shared.stop.store(true, Relaxed);
    workers.wait(Duration::from_secs(5));
}

/// One progress line; `last` carries the previous (time, established).
pub(crate) fn progress(shared: &OpenShared, start: u64, total: usize, last: &mut (u64, u64)) {
    let now = mono_ns();
    let mut agg = shared.agg.lock().unwrap();
    let c = &agg.counts;
    let rate = (c.established - last.1) as f64 / ((now - last.0) as f64 / 1e9).max(1e-3);
    let line = format!(
        "[{:5.1}s] established {:>6}/{total} ({rate:.0}/s)  failed {:>5}  open {:>6}  \
         p99 {} µs  closed by server {}",
        now.saturating_sub(start) as f64 / 1e9,
        c.established,
        c.failed,
        c.live,
        us(agg.interval.value_at_quantile(0.99)),
        c.closes.total()
    );
    *last = (now, c.established);
    agg.interval.reset();
    eprintln!("{line}");
}

/// The connect-side lines of a report (shared with idle); `auth`: tokens were used.
pub(crate) fn report_lines(
    r: &mut Report,
    agg: &OpenAgg,
    prep: &Prepared,
    connect_s: f64,
    auth: bool,
) {
    let c = &agg.counts;
    r.line(
        "established",
        format!(
            "{} of {} attempts in {connect_s:.2} s ({:.0}/s)",
            c.established,
            c.attempted,
            c.established as f64 / connect_s.max(1e-9)
        ),
    );
    r.line("failed", c.failed.to_string());
    if auth {
        r.set_auth(c.established - c.anonymous, c.anonymous);
    }
    r.lag(
        "start lag µs",
        "start_lag_us",
        &agg.start_lag,
        "attempts started behind schedule; part of the latency",
    );
    r.json_extra(
        "counts",
        json!({
            "attempted": c.attempted,
            "established": c.established,
            "established_in_window": c.window_established,
            "failed": c.failed,
            "closed_clean": c.closed_clean,
            "open_at_end": c.live,
        }),
    );
    r.set_errors(&c.errors, &c.closes, prep.fd_limit, c.established);
    if c.failed > 0 {
        r.warn(format!(
            "{} of {} connection attempts failed",
            c.failed, c.attempted
        ));
    }
}

pub fn run(a: &ConnectArgs, prep: &Prepared) -> Result<Report, String> {
    let c = &prep.common;
    if !prep.common.publish_urls.is_empty() {
        return Err("connect: there are no publishers; use --url (or --subscribe-url)".into());
    }
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        return Err("--rate must be a positive number of connections per second".into());
    }
    let window_s = (c.warmup + c.duration).as_secs_f64();
    let n = a
        .connections
        .unwrap_or_else(|| (a.rate * window_s).round() as usize);
    if n == 0 {
        return Err("no connections to open (--connections, or --rate × duration)".into());
    }
    if a.keep {
        let mut per = vec![0usize; prep.targets.len()];
        for k in 0..n {
            per[prep.sub_targets[k % prep.sub_targets.len()]] += 1;
        }
        prep.check_capacity(&per, false)?;
    }
    // Every token is minted before the schedule starts.
    let need = Duration::from_secs_f64(n as f64 / a.rate) + SETUP_TIMEOUT + CLOSE_TIMEOUT;
    let tokens = prep.mint(n, need)?;
    let auth = tokens.is_some();
    let t0 = mono_ns() + 20_000_000;
    let warm_end = t0 + c.warmup.as_nanos() as u64;
    let plan = OpenPlan {
        targets: prep.targets.clone(),
        order: prep.sub_targets.clone(),
        connections: n,
        rate: a.rate,
        start_ns: t0,
        warm_end_ns: warm_end,
        keep: a.keep,
        subscribe: None,
        chunk: 4096,
        threads: c.threads,
        source_ips: c.source_ips.clone().unwrap_or_default(),
        uring: c.uring(),
        tokens: tokens.clone(),
    };
    let sched_end = plan.schedule().due(n as u64 - 1);
    let (shared, workers) = start(plan, prep)?;
    if !c.quiet {
        eprintln!("connect: {n} connections at {}/s ...", a.rate);
    }
    let start = t0;
    let probe = CpuProbe::start(c.server_pid, &workers, start);
    let deadline = sched_end + (SETUP_TIMEOUT + CLOSE_TIMEOUT).as_nanos() as u64 + 1_000_000_000;
    let mut last = (start, 0);
    let mut next = start + 1_000_000_000;
    let settled_at = loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = mono_ns();
        let settled = shared.agg.lock().unwrap().counts.settled(!a.keep);
        if settled as usize >= n || now > deadline {
            break now;
        }
        if now >= next {
            next += 1_000_000_000;
            if !c.quiet {
                progress(&shared, start, n, &mut last);
            }
        }
    };
    // CPU includes the close handshakes (waited for above); read it while the threads run.
    let established = shared.agg.lock().unwrap().counts.established;
    let cpu = probe.finish(&workers, established);
    stop(&shared, &workers);
    let agg = shared.agg.lock().unwrap();
    let connect_s = (settled_at - start) as f64 / 1e9;

    let mut r = Report::new("connect", prep);
    r.setup("connections", n.to_string());
    let reply = if auth { "connected" } else { "welcome" };
    r.setup(
        "rate",
        format!(
            "{}/s, open loop (connect→{reply} measured from the intended connect time)",
            a.rate
        ),
    );
    r.setup(
        "each",
        match (a.keep, auth) {
            (true, _) => "kept open until the end",
            (false, false) => "closed with a close handshake right after its welcome",
            (false, true) => "closed with a close handshake right after its `connected`",
        },
    );
    r.param("connections", json!(n));
    r.param("rate", json!(a.rate));
    r.param("keep", json!(a.keep));
    r.common_setup(prep, tokens.as_deref());
    report_lines(&mut r, &agg, prep, connect_s, auth);
    // The measured window: attempts intended after the warmup.
    let secs = (n as f64 / a.rate - c.warmup.as_secs_f64()).max(0.0);
    let per_s = agg.counts.window_established as f64 / secs.max(1e-9);
    r.line(
        "connections/s",
        format!(
            "{per_s:.0} established per second in the measured window (asked: {})",
            a.rate
        ),
    );
    r.json_extra("connections_per_s", json!(per_s));
    if !a.keep {
        r.line(
            "closed cleanly",
            format!("{} (close handshake completed)", agg.counts.closed_clean),
        );
    }
    r.set_latency(agg.total.clone(), latency_what(auth));
    r.set_cpu_per(cpu, "connection");
    Ok(r)
}

/// What the connect latency measures.
pub(crate) fn latency_what(auth: bool) -> &'static str {
    if auth {
        "connect→connected (token accepted) from the intended connect time"
    } else {
        "connect→welcome from the intended connect time"
    }
}
