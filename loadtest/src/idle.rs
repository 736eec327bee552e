//! The `idle` scenario: open `--connections` WebSocket connections at `--rate` per second
//! (each upgraded and welcomed, optionally subscribed to a channel of its own), hold them for
//! `--hold` while answering pings, and report failures by cause, connections the server
//! closed, and memory per idle connection on both sides (VmRSS deltas).

use crate::client::{self, ConnError, Target, PING, PONG};
use crate::stats::{self, mib, mono_ns, Counts};
use crate::IdleArgs;
use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer per idle connection: a pending read pins it, so keep it small.
const CHUNK: usize = 512;

struct Plan {
    target: Target,
    connections: usize,
    rate: f64,
    subscribe: bool,
    threads: usize,
    source_ips: Vec<IpAddr>,
    uring: bool,
    start_ns: u64,
}

struct Shared {
    stop: AtomicBool,
    /// Totals and the number of threads that made their last flush.
    agg: Mutex<(Counts, usize)>,
}

struct Ctx {
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    counts: RefCell<Counts>,
}

async fn idle_conn(ctx: Rc<Ctx>, j: usize) {
    let plan = &ctx.plan;
    let src = (!plan.source_ips.is_empty()).then(|| plan.source_ips[j % plan.source_ips.len()]);
    let setup = async {
        let seed = (j as u32).wrapping_mul(0x9e37_79b9);
        let mut conn = client::open(&plan.target, src, plan.uring, CHUNK, seed).await?;
        if plan.subscribe {
            client::subscribe(&mut conn, &[format!("idle-{j}")]).await?;
        }
        Ok(conn)
    };
    let res = monoio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .unwrap_or(Err(ConnError::Timeout));
    let mut conn = match res {
        Ok(conn) => conn,
        Err(e) => {
            let mut c = ctx.counts.borrow_mut();
            c.setup_failed += 1;
            c.errors.add(e.kind(), || e.to_string());
            return;
        }
    };
    {
        let mut c = ctx.counts.borrow_mut();
        c.setup_ok += 1;
        c.live += 1;
    }
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
    let mut c = ctx.counts.borrow_mut();
    c.live -= 1;
    match end {
        ConnError::Closed(code) => *c.closes.entry(code).or_default() += 1,
        e => c.errors.add(e.kind(), || e.to_string()),
    }
}

async fn thread_main(plan: Arc<Plan>, shared: Arc<Shared>, tid: usize) {
    let ctx = Rc::new(Ctx {
        plan,
        shared,
        counts: RefCell::new(Counts::default()),
    });
    let spawner = ctx.clone();
    monoio::spawn(async move {
        let plan = spawner.plan.clone();
        for j in (tid..plan.connections).step_by(plan.threads) {
            let due = plan.start_ns + (j as f64 * 1e9 / plan.rate) as u64;
            let now = mono_ns();
            if due > now {
                monoio::time::sleep(Duration::from_nanos(due - now)).await;
            }
            monoio::spawn(idle_conn(spawner.clone(), j));
        }
    });
    loop {
        monoio::time::sleep(Duration::from_millis(250)).await;
        let last = ctx.shared.stop.load(Relaxed);
        let mut agg = ctx.shared.agg.lock().unwrap();
        agg.0.absorb(&mut ctx.counts.borrow_mut());
        if last {
            agg.1 += 1;
            return;
        }
    }
}

fn progress(shared: &Shared, start: u64, total: usize) {
    let agg = shared.agg.lock().unwrap();
    let c = &agg.0;
    eprintln!(
        "[{:5.1}s] established {:>6}/{total}  failed {:>5}  open {:>6}  closed by server {}",
        mono_ns().saturating_sub(start) as f64 / 1e9,
        c.setup_ok,
        c.setup_failed,
        c.live,
        c.closes.values().sum::<u64>()
    );
}

pub fn run(a: IdleArgs, target: Target, fd_limit: u64) -> Result<(), String> {
    let n = a.connections;
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        return Err("--rate must be a positive number of connects per second".into());
    }
    if n as u64 + 32 > fd_limit {
        eprintln!(
            "NOTE: {n} connections exceed what the open-file limit allows (RLIMIT_NOFILE = \
             {fd_limit}, already raised to the hard limit): about {} can be opened, the rest \
             will fail with 'fd limit'",
            fd_limit.saturating_sub(32)
        );
    }
    let pid = a.common.server_pid;
    let mut hub_rss = pid.and_then(|p| stats::Rss::open(Some(p)));
    let hub_rss0 = hub_rss.as_mut().and_then(|r| r.read());
    if let (Some(p), None) = (pid, hub_rss0) {
        return Err(format!(
            "cannot read /proc/{p}/status: is --server-pid right?"
        ));
    }
    let mut own_rss = stats::Rss::open(None);
    let own_rss0 = own_rss.as_mut().and_then(|r| r.read());
    let (cpu0, hub_cpu0) = (stats::self_cpu_s(), pid.and_then(stats::proc_cpu_s));
    let start = mono_ns() + 10_000_000;
    let plan = Arc::new(Plan {
        target,
        connections: n,
        rate: a.rate,
        subscribe: a.subscribe,
        threads: a.common.threads,
        source_ips: a.common.source_ips.clone().unwrap_or_default(),
        uring: a.common.uring(),
        start_ns: start,
    });
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        agg: Mutex::new((Counts::default(), 0)),
    });
    let (p2, s2) = (plan.clone(), shared.clone());
    crate::spawn_threads(&a.common, move |tid| {
        thread_main(p2.clone(), s2.clone(), tid)
    });
    eprintln!(
        "opening {n} connections to {} at {}/s ...",
        plan.target.url, a.rate
    );

    // Connect phase: until every connection is established or has failed.
    let deadline = start + ((n as f64 / a.rate + 30.0) * 1e9) as u64;
    let mut next_print = start + 1_000_000_000;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let settled = {
            let agg = shared.agg.lock().unwrap();
            (agg.0.setup_ok + agg.0.setup_failed) as usize
        };
        if settled == n || mono_ns() > deadline {
            break;
        }
        if mono_ns() >= next_print {
            next_print += 1_000_000_000;
            progress(&shared, start, n);
        }
    }
    let connect_s = (mono_ns() - start) as f64 / 1e9;
    progress(&shared, start, n);

    // Let the server settle, then measure memory; then hold.
    std::thread::sleep(Duration::from_secs(1));
    let hub_rss1 = hub_rss.as_mut().and_then(|r| r.read());
    let own_rss1 = own_rss.as_mut().and_then(|r| r.read());
    let open_at_measure = shared.agg.lock().unwrap().0.live;
    eprintln!("holding for {:?} ...", a.hold);
    let hold_end = mono_ns() + a.hold.as_nanos() as u64;
    while mono_ns() < hold_end {
        std::thread::sleep(Duration::from_nanos(
            (hold_end - mono_ns()).min(1_000_000_000),
        ));
        progress(&shared, start, n);
    }
    let wall = (mono_ns() - start) as f64 / 1e9;
    let cpu = stats::self_cpu_s() - cpu0;
    let hub_cpu = pid
        .and_then(stats::proc_cpu_s)
        .zip(hub_cpu0)
        .map(|(b, a)| b - a);
    shared.stop.store(true, Relaxed);
    let wait_end = mono_ns() + 3_000_000_000;
    while shared.agg.lock().unwrap().1 < plan.threads && mono_ns() < wait_end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let agg = shared.agg.lock().unwrap();
    let c = &agg.0;

    println!("ringhub-load idle");
    println!("  url            {}", plan.target.url);
    let sub = if a.subscribe {
        ", each subscribed to its own channel"
    } else {
        ""
    };
    println!("  connections    {n} requested at {}/s{sub}", a.rate);
    println!("  threads        {}", crate::threads_desc(&a.common));
    match &a.common.source_ips {
        Some(ips) => println!("  source ips     {} address(es)", ips.len()),
        None => println!("  source ips     default"),
    }
    println!("results");
    println!(
        "  established    {} in {connect_s:.2} s ({:.0}/s)",
        c.setup_ok,
        c.setup_ok as f64 / connect_s
    );
    println!("  failed         {}", c.setup_failed);
    for line in c.errors.lines() {
        println!("    {line}");
    }
    if c.errors.count("fd limit") > 0 {
        println!(
            "    (the open-file limit RLIMIT_NOFILE is {fd_limit}; {} connections were open)",
            c.setup_ok
        );
    }
    println!("  still open     {} after a {:?} hold", c.live, a.hold);
    println!("  server closes  {}", c.closes_line());
    let per_conn = |d: i64| {
        if open_at_measure > 0 {
            format!(
                "{:.0} B per idle connection",
                d as f64 / open_at_measure as f64
            )
        } else {
            "no connection open".into()
        }
    };
    let rss_line = |label: &str, before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(b), Some(a)) => {
            let d = a as i64 - b as i64;
            let (b, a, dm) = (mib(b), mib(a), d as f64 / 1048576.0);
            println!(
                "  {label}  {b} before, {a} with {open_at_measure} open: {dm:+.1} MiB = {}",
                per_conn(d)
            );
        }
        _ => println!("  {label}  not readable"),
    };
    if pid.is_some() {
        rss_line("hub RSS     ", hub_rss0, hub_rss1);
    }
    rss_line("client RSS  ", own_rss0, own_rss1);
    println!(
        "  load gen CPU   {cpu:.2} s user+sys in {wall:.2} s = {:.1}% of one core",
        cpu / wall * 100.0
    );
    if let (Some(h), Some(p)) = (hub_cpu, pid) {
        println!(
            "  hub CPU        {h:.2} s user+sys (pid {p}) = {:.1}% of one core",
            h / wall * 100.0
        );
    }
    Ok(())
}
