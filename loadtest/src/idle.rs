//! The `idle` scenario: open `--connections` WebSocket connections at `--rate` per second
//! (each upgraded and welcomed, optionally subscribed to a channel of its own), let the hub
//! settle for `--warmup`, read resident memory, hold the connections for `--duration` while
//! answering pings, and report failures by cause, connections the server closed, and memory
//! per idle connection on both sides: (VmRSS with the connections open − VmRSS before) ÷
//! connections open. The hub's figure needs `--server-pid`. With auth on, the tokens are
//! minted before the baseline memory is read, and a connection counts once the hub answered
//! `connected`.

use crate::cli::IdleArgs;
use crate::connect::{self, OpenPlan};
use crate::report::{CpuProbe, Report};
use crate::stats::{self, mib, mono_ns};
use crate::Prepared;
use serde_json::json;
use std::time::Duration;

/// Read buffer per idle connection: a pending read pins it, so keep it small.
const CHUNK: usize = 512;

pub fn run(a: &IdleArgs, prep: &Prepared) -> Result<Report, String> {
    let c = &prep.common;
    let n = a.connections;
    if !prep.common.publish_urls.is_empty() {
        return Err("idle: there are no publishers; use --url (or --subscribe-url)".into());
    }
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        return Err("--rate must be a positive number of connects per second".into());
    }
    if n == 0 {
        return Err("--connections must be at least 1".into());
    }
    let mut per = vec![0usize; prep.targets.len()];
    for k in 0..n {
        per[prep.sub_targets[k % prep.sub_targets.len()]] += 1;
    }
    // Not fatal: hitting the limit is what some runs want to see, reported by cause.
    prep.check_capacity(&per, false)?;
    let need = Duration::from_secs_f64(n as f64 / a.rate) + c.warmup + c.duration;
    let tokens = prep.mint(n, need)?;
    let auth = tokens.is_some();
    let pid = c.server_pid;
    let mut hub_rss = pid.and_then(|p| stats::Rss::open(Some(p)));
    let hub_rss0 = hub_rss.as_mut().and_then(|r| r.read());
    if let (Some(p), None) = (pid, hub_rss0) {
        return Err(format!(
            "cannot read /proc/{p}/status: is --server-pid right?"
        ));
    }
    let mut own_rss = stats::Rss::open(None);
    let own_rss0 = own_rss.as_mut().and_then(|r| r.read());

    let start = mono_ns() + 20_000_000;
    let plan = OpenPlan {
        targets: prep.targets.clone(),
        order: prep.sub_targets.clone(),
        connections: n,
        rate: a.rate,
        start_ns: start,
        warm_end_ns: start,
        keep: true,
        subscribe: a.subscribe.then(|| format!("idle-{}-", std::process::id())),
        chunk: CHUNK,
        threads: c.threads,
        source_ips: c.source_ips.clone().unwrap_or_default(),
        uring: c.uring(),
        tokens: tokens.clone(),
    };
    let sched_end = plan.schedule().due(n as u64 - 1);
    let (shared, workers) = connect::start(plan, prep)?;
    let probe = CpuProbe::start(pid, &workers, start);
    if !c.quiet {
        eprintln!("idle: opening {n} connections at {}/s ...", a.rate);
    }

    // Connect phase: until every attempt is established or has failed.
    let deadline = sched_end + 15_000_000_000;
    let mut last = (start, 0);
    let mut next = start + 1_000_000_000;
    let connected_at = loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = mono_ns();
        if shared.agg.lock().unwrap().counts.settled(false) as usize >= n || now > deadline {
            break now;
        }
        if now >= next {
            next += 1_000_000_000;
            if !c.quiet {
                connect::progress(&shared, start, n, &mut last);
            }
        }
    };
    let connect_s = (connected_at - start) as f64 / 1e9;
    if !c.quiet {
        connect::progress(&shared, start, n, &mut last);
        eprintln!("settling for {:?}, then measuring memory ...", c.warmup);
    }

    // Let the hub settle, then measure memory; then hold.
    std::thread::sleep(c.warmup);
    let hub_rss1 = hub_rss.as_mut().and_then(|r| r.read());
    let own_rss1 = own_rss.as_mut().and_then(|r| r.read());
    let open_at_measure = shared.agg.lock().unwrap().counts.live.max(0) as u64;
    if !c.quiet {
        eprintln!("holding for {:?} ...", c.duration);
    }
    let hold_end = mono_ns() + c.duration.as_nanos() as u64;
    while mono_ns() < hold_end {
        std::thread::sleep(Duration::from_nanos(
            (hold_end - mono_ns()).min(1_000_000_000),
        ));
        if !c.quiet {
            connect::progress(&shared, start, n, &mut last);
        }
    }
    let (still_open, established) = {
        let agg = shared.agg.lock().unwrap();
        (agg.counts.live, agg.counts.established)
    };
    let cpu = probe.finish(&workers, established);
    connect::stop(&shared, &workers);
    let agg = shared.agg.lock().unwrap();

    let mut r = Report::new("idle", prep);
    let sub = if a.subscribe {
        ", each subscribed to its own channel"
    } else {
        ""
    };
    r.setup("connections", format!("{n} requested at {}/s{sub}", a.rate));
    r.setup(
        "hold",
        format!(
            "{} s after {} s of settling",
            c.duration.as_secs_f64(),
            c.warmup.as_secs_f64()
        ),
    );
    r.param("connections", json!(n));
    r.param("rate", json!(a.rate));
    r.param("subscribe", json!(a.subscribe));
    r.common_setup(prep, tokens.as_deref());
    connect::report_lines(&mut r, &agg, prep, connect_s, auth);
    r.line(
        "still open",
        format!("{still_open} after the {} s hold", c.duration.as_secs_f64()),
    );
    let mut mem = serde_json::Map::new();
    mem.insert("open_at_measure".into(), json!(open_at_measure));
    let mut rss_line =
        |r: &mut Report, label: &str, key: &str, b: Option<u64>, a: Option<u64>| match (b, a) {
            (Some(b), Some(a)) => {
                let d = a as i64 - b as i64;
                let per = (open_at_measure > 0).then(|| d as f64 / open_at_measure as f64);
                let per_text = per.map_or("no connection open".into(), |p| {
                    format!("{p:.0} B per idle connection")
                });
                r.line(
                    label,
                    format!(
                        "{} before, {} with {open_at_measure} open: {:+.1} MiB = {per_text}",
                        mib(b),
                        mib(a),
                        d as f64 / 1048576.0
                    ),
                );
                mem.insert(
                    key.into(),
                    json!({"rss_before": b, "rss_after": a, "bytes_per_connection": per}),
                );
            }
            _ => r.line(label, "not readable"),
        };
    if pid.is_some() {
        rss_line(&mut r, "hub RSS", "server", hub_rss0, hub_rss1);
    } else {
        r.line("hub RSS", "not measured (give --server-pid)");
    }
    rss_line(&mut r, "load gen RSS", "load_generator", own_rss0, own_rss1);
    r.json_extra("memory", serde_json::Value::Object(mem));
    r.set_latency(agg.total.clone(), connect::latency_what(auth));
    r.set_cpu_per(cpu, "connection");
    Ok(r)
}
