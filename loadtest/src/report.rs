//! The end-of-run report every scenario produces: the setup, the results, the latency
//! percentiles, CPU use of the load generator (per thread) and of the hub, and warnings, as
//! text for people ([`Report::text`]) and as JSON for scripts ([`Report::to_json`]).
//!
//! CPU is measured over the run window only (not connection setup or the drain): this
//! process's user + system time and each worker thread's, the hub's (`--server-pid`, all its
//! threads), and when the hub is pinned to cores of its own, the `ksoftirqd/N` threads of those
//! cores (deferred network work the kernel does on the hub's behalf, not in its own time).

use crate::auth::Tokens;
use crate::stats::{self, mono_ns, Closes, Tally, REPORTED};
use crate::track::OffsetCounts;
use crate::worker::Workers;
use crate::Prepared;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Map, Value};

/// Delivery accounting of the message scenarios.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Deliveries {
    /// Open loop: messages the publishers' schedules held.
    pub publishes_scheduled: Option<u64>,
    /// Publishes written to the sockets.
    pub publishes_sent: u64,
    /// Open loop: scheduled but never written (the run ended with publishers behind).
    pub publishes_unsent: u64,
    /// Subscriptions the hub confirmed.
    pub subscriptions: u64,
    /// Σ over channels of publishes written × confirmed subscriptions.
    pub expected: u64,
    /// Every message received, duplicates included.
    pub received: u64,
    /// Distinct messages received.
    pub delivered: u64,
    pub lost: u64,
    /// Distinct deliveries beyond the expected ones (should be 0).
    pub extra: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Messages on a channel the connection had not subscribed to, or unparseable.
    pub unexpected: u64,
    pub deliveries_in_window: u64,
    pub deliveries_per_s: f64,
}

/// CPU use over the run window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    pub wall_s: f64,
    /// This process, all threads.
    pub load_generator_s: f64,
    /// Each worker thread (None: not measurable).
    pub threads_s: Vec<Option<f64>>,
    /// Time each worker thread was runnable but waited for a CPU (taken by other processes).
    pub threads_wait_s: Vec<Option<f64>>,
    pub server_s: Option<f64>,
    /// Time the hub's threads (summed) were runnable but waited for a CPU.
    pub server_wait_s: Option<f64>,
    /// ksoftirqd time on the hub's own cores (only when it is pinned away from ours).
    pub server_softirq_s: Option<f64>,
    /// The cores `server_softirq_s` covers.
    pub server_cpus: Option<Vec<usize>>,
    /// Deliveries (or connections) in the window: the unit of the per-item figures.
    pub items: u64,
}

/// Snapshot at the start of the run window; [`CpuProbe::finish`] gives the [`Cpu`] figures.
pub struct CpuProbe {
    t0: u64,
    self0: f64,
    threads0: Vec<Option<f64>>,
    waits0: Vec<Option<f64>>,
    server: Option<(u32, f64)>,
    server_wait0: Option<f64>,
    softirq: Option<(Vec<usize>, Vec<u32>, f64)>,
}

fn softirq_s(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| stats::proc_cpu_s(*p)).sum()
}

impl CpuProbe {
    pub fn start(server_pid: Option<u32>, workers: &Workers, t0: u64) -> CpuProbe {
        let server = server_pid.and_then(|p| Some((p, stats::proc_cpu_s(p)?)));
        // Only cores the hub has to itself: elsewhere ksoftirqd also works for us.
        let softirq = server_pid.and_then(|p| {
            let cpus = stats::allowed_cpus(p)?;
            if cpus.len() >= stats::online_cpus() {
                return None;
            }
            let pids = stats::ksoftirqd_pids(&cpus);
            (!pids.is_empty()).then(|| {
                let s = softirq_s(&pids);
                (cpus, pids, s)
            })
        });
        CpuProbe {
            t0,
            self0: stats::self_cpu_s(),
            threads0: workers.cpu_s(),
            waits0: workers.wait_s(),
            server,
            server_wait0: server_pid.and_then(stats::proc_wait_s),
            softirq,
        }
    }

    pub fn finish(&self, workers: &Workers, items: u64) -> Cpu {
        let delta = |now: Vec<Option<f64>>, then: &[Option<f64>]| -> Vec<Option<f64>> {
            now.iter()
                .zip(then.iter().chain(std::iter::repeat(&None)))
                .map(|(b, a)| Some(b.as_ref()? - a.as_ref()?))
                .collect()
        };
        Cpu {
            wall_s: mono_ns().saturating_sub(self.t0) as f64 / 1e9,
            load_generator_s: stats::self_cpu_s() - self.self0,
            threads_s: delta(workers.cpu_s(), &self.threads0),
            threads_wait_s: delta(workers.wait_s(), &self.waits0),
            // A hub that exited (or lost threads) during the run has no meaningful delta.
            server_wait_s: self
                .server
                .and_then(|(p, _)| Some(stats::proc_wait_s(p)? - self.server_wait0?))
                .filter(|w| *w >= 0.0),
            server_s: self
                .server
                .and_then(|(p, s0)| Some(stats::proc_cpu_s(p)? - s0))
                .filter(|s| *s >= 0.0),
            server_softirq_s: self
                .softirq
                .as_ref()
                .map(|(_, pids, s0)| softirq_s(pids) - s0),
            server_cpus: self.softirq.as_ref().map(|(c, ..)| c.clone()),
            items,
        }
    }
}

/// What one scenario run found.
pub struct Report {
    pub scenario: &'static str,
    /// (label, text) lines describing the setup.
    setup: Vec<(String, String)>,
    /// The same, machine-readable.
    params: Map<String, Value>,
    /// (label, text) result lines.
    lines: Vec<(String, String)>,
    extra: Map<String, Value>,
    pub deliveries: Option<Deliveries>,
    /// Latency samples in ns, and what they measure.
    pub latency: Histogram<u64>,
    pub latency_what: &'static str,
    /// Label of the histogram's line in the text ("latency µs").
    latency_label: &'static str,
    pub cpu: Option<Cpu>,
    /// Per-item unit of the CPU figures ("delivery", "connection").
    item: &'static str,
    errors: Value,
    closes: Value,
    pub error_count: u64,
    pub close_count: u64,
    pub warnings: Vec<String>,
    error_lines: Vec<String>,
    close_line: String,
    /// Threads of the load generator, for the bottleneck check.
    threads: usize,
    pinned_cpus: Option<Vec<usize>>,
    server_pid: Option<u32>,
}

impl Report {
    pub fn new(scenario: &'static str, prep: &Prepared) -> Report {
        Report {
            scenario,
            setup: Vec::new(),
            params: Map::new(),
            lines: Vec::new(),
            extra: Map::new(),
            deliveries: None,
            latency: stats::new_hist(),
            latency_what: "latency",
            latency_label: "latency µs",
            cpu: None,
            item: "delivery",
            errors: json!({}),
            closes: json!({}),
            error_count: 0,
            close_count: 0,
            warnings: Vec::new(),
            error_lines: Vec::new(),
            close_line: "none".into(),
            threads: prep.common.threads,
            pinned_cpus: prep.common.cpus.clone(),
            server_pid: prep.common.server_pid,
        }
    }

    /// A setup line (printed).
    pub fn setup(&mut self, label: &str, text: impl Into<String>) {
        self.setup.push((label.into(), text.into()));
    }

    /// A setup value (JSON).
    pub fn param(&mut self, key: &str, v: Value) {
        self.params.insert(key.into(), v);
    }

    /// The setup every scenario shares: URLs, duration, threads, source addresses, and whether
    /// connections authenticated (`tokens`: the run's tokens, with auth on).
    pub fn common_setup(&mut self, prep: &Prepared, tokens: Option<&Tokens>) {
        let c = &prep.common;
        let urls = |idx: &[usize]| -> Vec<String> {
            idx.iter().map(|&i| prep.targets[i].url.clone()).collect()
        };
        let (pubs, subs) = (urls(&prep.pub_targets), urls(&prep.sub_targets));
        if pubs == subs {
            self.setup("url", pubs.join(", "));
        } else {
            self.setup("publish url", pubs.join(", "));
            self.setup("subscribe url", subs.join(", "));
        }
        self.param("publish_urls", json!(pubs));
        self.param("subscribe_urls", json!(subs));
        self.setup(
            "duration",
            format!(
                "{} s measured after {} s warmup",
                c.duration.as_secs_f64(),
                c.warmup.as_secs_f64()
            ),
        );
        self.param("duration_s", json!(c.duration.as_secs_f64()));
        self.param("warmup_s", json!(c.warmup.as_secs_f64()));
        let driver = if c.uring() { "io_uring" } else { "epoll" };
        let pin = c
            .cpus
            .as_ref()
            .map_or("not pinned".into(), |v| format!("cpus {v:?}"));
        self.setup("threads", format!("{} ({pin}, {driver})", c.threads));
        self.param("threads", json!(c.threads));
        self.param("cpus", json!(c.cpus));
        self.param("driver", json!(driver));
        let src = c.source_ips.as_ref().map_or(0, |v| v.len());
        if src > 0 {
            self.setup("source ips", format!("{src} address(es)"));
        }
        self.param("source_ips", json!(src));
        if let Some(pid) = c.server_pid {
            self.param("server_pid", json!(pid));
        }
        match (&prep.auth, tokens) {
            (Some(auth), Some(tokens)) => {
                self.setup("auth", auth.describe(tokens));
                self.param("auth", auth.to_json(tokens));
                let over = ringhub::auth::token::now_secs().saturating_sub(tokens.expires_at);
                if over > 0 {
                    self.warn(format!(
                        "the connection tokens expired {over} s before the end of the run (the \
                         hub closes such connections, 4002): raise --token-ttl"
                    ));
                }
            }
            _ => {
                self.setup(
                    "auth",
                    "off (no token: --token-secret or --token-key turn it on)",
                );
                self.param("auth", json!({"enabled": false}));
            }
        }
    }

    /// With auth on: how many connections the hub accepted as their user (`connected` with
    /// a non-empty user), and how many it accepted as anonymous (a hub not checking tokens).
    pub fn set_auth(&mut self, authenticated: u64, anonymous: u64) {
        self.line(
            "authenticated",
            format!(
                "{authenticated} connection(s): the hub answered `connected` with their user \
                 before they were counted as established"
            ),
        );
        self.json_extra(
            "auth",
            json!({"authenticated": authenticated, "anonymous": anonymous}),
        );
        if anonymous > 0 {
            self.warn(format!(
                "the hub accepted {anonymous} connection(s) as anonymous (`connected` with an \
                 empty user): it does not check tokens (no [auth]), so this run was not \
                 authenticated"
            ));
        }
    }

    /// A result line (printed).
    pub fn line(&mut self, label: &str, text: impl Into<String>) {
        self.lines.push((label.into(), text.into()));
    }

    /// A result value (JSON, top level).
    pub fn json_extra(&mut self, key: &str, v: Value) {
        self.extra.insert(key.into(), v);
    }

    /// A lag histogram (ns) as a result line `p50 … p99 … max … (what)` and as JSON (µs).
    pub fn lag(&mut self, label: &str, key: &str, h: &Histogram<u64>, what: &str) {
        if h.is_empty() {
            return;
        }
        let q = |q: f64| h.value_at_quantile(q);
        self.line(
            label,
            format!(
                "p50 {}  p99 {}  max {}  ({what})",
                stats::us(q(0.5)),
                stats::us(q(0.99)),
                stats::us(h.max())
            ),
        );
        self.json_extra(
            key,
            json!({
                "p50": q(0.5) as f64 / 1000.0,
                "p99": q(0.99) as f64 / 1000.0,
                "max": h.max() as f64 / 1000.0,
            }),
        );
    }

    /// The offset checks of history channels: a result line and `"offsets"` in the JSON;
    /// warnings for offsets skipped, repeated or out of order, and for resets.
    pub fn set_offsets(&mut self, o: &OffsetCounts) {
        let mut v = serde_json::to_value(o).expect("plain counters");
        v["missing"] = json!(o.missing());
        self.json_extra("offsets", v);
        if o.checked == 0 && o.resets == 0 {
            self.line(
                "offsets",
                "not checked (no message carried one: channels without history)",
            );
            return;
        }
        self.line(
            "offsets",
            format!(
                "{} checked (history channels, per connection and channel): {} gap(s) ({} never \
                 arrived), {} duplicate(s), {} out of order, {} reset(s)",
                o.checked,
                o.gaps,
                o.missing(),
                o.duplicates,
                o.out_of_order,
                o.resets
            ),
        );
        if o.gaps > 0 || o.duplicates > 0 || o.out_of_order > 0 {
            self.warn(format!(
                "offsets were not each received once and in order: {} skipped ({} never \
                 arrived), {} duplicate(s), {} out of order",
                o.gaps,
                o.missing(),
                o.duplicates,
                o.out_of_order
            ));
        }
        if o.resets > 0 {
            self.warn(format!(
                "the hub reset {} channel subscription(s) (`reset`: the channel's history was \
                 lost and a new epoch began)",
                o.resets
            ));
        }
    }

    pub fn warn(&mut self, w: impl Into<String>) {
        self.warnings.push(w.into());
    }

    pub fn set_latency(&mut self, h: Histogram<u64>, what: &'static str) {
        self.latency = h;
        self.latency_what = what;
    }

    /// The main histogram measures something else than a latency: its label in the text.
    pub fn set_latency_label(&mut self, label: &'static str) {
        self.latency_label = label;
    }

    pub fn set_deliveries(&mut self, d: Deliveries) {
        self.deliveries = Some(d);
    }

    /// Failures by cause and server closes; explains an fd-limit hit with the limit and the
    /// number of connections that were open.
    pub fn set_errors(&mut self, e: &Tally, closes: &Closes, fd_limit: u64, open: u64) {
        self.errors = e.to_json();
        self.closes = closes.to_json();
        self.error_count = e.total();
        self.close_count = closes.total();
        self.error_lines = e.lines();
        if e.count("fd limit") > 0 {
            self.error_lines.push(format!(
                "(the open-file limit RLIMIT_NOFILE is {fd_limit}, already raised to the hard \
                 limit; {open} connections were open)"
            ));
        }
        if e.count("out of ephemeral ports") > 0 {
            self.error_lines.push(
                "(each source address has ~28k ephemeral ports per destination: add \
                 --source-ips 127.0.0.2-127.0.0.9)"
                    .into(),
            );
        }
        self.close_line = closes.line();
        if closes.total() > 0 {
            self.warn(format!(
                "the server closed {} connection(s) during the run: {}",
                closes.total(),
                closes.line()
            ));
        }
    }

    /// CPU figures; warns when the load generator may have been the bottleneck.
    pub fn set_cpu(&mut self, cpu: Cpu) {
        self.set_cpu_per(cpu, "delivery");
    }

    pub fn set_cpu_per(&mut self, cpu: Cpu, item: &'static str) {
        self.item = item;
        let wall = cpu.wall_s.max(1e-9);
        // The largest share of the wall time among the threads' figures.
        let max_share =
            |v: &[Option<f64>]| v.iter().flatten().fold(0.0f64, |m, &s| m.max(s / wall));
        let busiest = max_share(&cpu.threads_s);
        if busiest > 0.9 {
            self.warn(format!(
                "a load generator thread was busy {:.0}% of the time: the load generator may \
                 have been the bottleneck (its latency and throughput figures are then its \
                 own); add --threads, or pin them with --cpus to cores the hub does not use",
                busiest * 100.0
            ));
        } else if cpu.threads_s.iter().all(Option::is_none)
            && cpu.load_generator_s / wall > 0.9 * self.threads as f64
        {
            self.warn(format!(
                "the load generator used {:.0}% of its {} thread(s)' cores: it may have been \
                 the bottleneck",
                cpu.load_generator_s / wall * 100.0,
                self.threads
            ));
        }
        let waited = max_share(&cpu.threads_wait_s);
        if waited > 0.05 {
            self.warn(format!(
                "a load generator thread waited for a CPU {:.0}% of the run (other processes \
                 were running on its core): latencies include that wait",
                waited * 100.0
            ));
        }
        if let Some(w) = cpu.server_wait_s.filter(|w| w / wall > 0.05) {
            self.warn(format!(
                "the hub's threads waited for a CPU {:.0}% of the run (other processes were \
                 running on its cores): its latency includes that wait",
                w / wall * 100.0
            ));
        }
        if let (Some(pid), Some(ours)) = (self.server_pid, &self.pinned_cpus) {
            if let Some(theirs) = stats::allowed_cpus(pid) {
                if ours.iter().any(|c| theirs.contains(c)) {
                    self.warn(format!(
                        "the load generator's --cpus {ours:?} overlap the hub's cores \
                         {theirs:?}: they compete for the same CPU"
                    ));
                }
            }
        }
        self.cpu = Some(cpu);
    }

    /// The latency percentiles in µs (JSON object).
    pub fn latency_json(&self) -> Value {
        let h = &self.latency;
        let mut m = Map::new();
        for (q, label) in REPORTED {
            let key = label.replace('.', "_");
            m.insert(key, json!(h.value_at_quantile(q) as f64 / 1000.0));
        }
        m.insert("max".into(), json!(h.max() as f64 / 1000.0));
        m.insert("mean".into(), json!(h.mean() / 1000.0));
        m.insert("samples".into(), json!(h.len()));
        m.insert("measures".into(), json!(self.latency_what));
        m.into()
    }

    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("scenario".into(), json!(self.scenario));
        out.insert("setup".into(), Value::Object(self.params.clone()));
        if let Some(d) = &self.deliveries {
            out.insert("counts".into(), json!(d));
            out.insert("deliveries_per_s".into(), json!(d.deliveries_per_s));
        }
        out.insert("latency_us".into(), self.latency_json());
        out.insert("errors".into(), self.errors.clone());
        out.insert("server_closes".into(), self.closes.clone());
        if let Some(cpu) = &self.cpu {
            let per = |s: f64| (cpu.items > 0).then(|| s * 1e6 / cpu.items as f64);
            let server_total = cpu
                .server_s
                .map(|s| s + cpu.server_softirq_s.unwrap_or(0.0));
            out.insert(
                "cpu".into(),
                json!({
                    "wall_s": cpu.wall_s,
                    "load_generator_s": cpu.load_generator_s,
                    "load_generator_threads_s": cpu.threads_s,
                    "load_generator_threads_wait_s": cpu.threads_wait_s,
                    "server_wait_s": cpu.server_wait_s,
                    "load_generator_us_per_item": per(cpu.load_generator_s),
                    "server_s": cpu.server_s,
                    "server_softirq_s": cpu.server_softirq_s,
                    "server_cpus": cpu.server_cpus,
                    "server_us_per_item": server_total.and_then(per),
                    "items": cpu.items,
                    "item": self.item,
                }),
            );
        }
        for (k, v) in &self.extra {
            out.insert(k.clone(), v.clone());
        }
        out.insert("warnings".into(), json!(self.warnings));
        Value::Object(out)
    }

    /// The report as people read it.
    pub fn text(&self) -> String {
        let mut out = format!("ringhub-load {}\n", self.scenario);
        let w = self
            .setup
            .iter()
            .chain(&self.lines)
            .map(|(l, _)| l.chars().count())
            .max()
            .unwrap_or(0)
            .max(14);
        let mut put = |l: &str, t: &str| {
            out.push_str(&format!("  {l:<w$} {t}\n"));
        };
        for (l, t) in &self.setup {
            put(l, t);
        }
        let mut out2 = String::from("results\n");
        let mut put2 = |l: &str, t: &str| {
            out2.push_str(&format!("  {l:<w$} {t}\n"));
        };
        for (l, t) in &self.lines {
            put2(l, t);
        }
        let h = &self.latency;
        let mut lat: Vec<String> = REPORTED
            .iter()
            .map(|(q, label)| format!("{label} {}", stats::us(h.value_at_quantile(*q))))
            .collect();
        lat.push(format!("max {}", stats::us(h.max())));
        put2(
            self.latency_label,
            &format!(
                "{}  ({} samples; {})",
                lat.join("  "),
                h.len(),
                self.latency_what
            ),
        );
        put2("server closes", &self.close_line);
        if self.error_lines.is_empty() {
            put2("errors", "none");
        } else {
            put2("errors", "");
            for e in &self.error_lines {
                out2.push_str(&format!("    {e}\n"));
            }
        }
        if let Some(cpu) = &self.cpu {
            let wall = cpu.wall_s.max(1e-9);
            let per = |s: f64| {
                if cpu.items > 0 {
                    format!(", {:.2} µs per {}", s * 1e6 / cpu.items as f64, self.item)
                } else {
                    String::new()
                }
            };
            let threads: Vec<String> = cpu
                .threads_s
                .iter()
                .map(|t| t.map_or("?".into(), |s| format!("{:.0}%", s / wall * 100.0)))
                .collect();
            let waits: Vec<String> = cpu
                .threads_wait_s
                .iter()
                .map(|t| t.map_or("?".into(), |s| format!("{:.0}%", s / wall * 100.0)))
                .collect();
            let lg = cpu.load_generator_s;
            let text = format!(
                "{lg:.2} s in {wall:.2} s = {:.1}% of one core{} (threads busy: {}; waiting \
                 for a CPU: {})",
                lg / wall * 100.0,
                per(lg),
                threads.join(" "),
                waits.join(" ")
            );
            out2.push_str(&format!("  {:<w$} {text}\n", "load gen CPU"));
            if let Some(s) = cpu.server_s {
                let text = match cpu.server_softirq_s {
                    Some(k) => format!(
                        "{s:.2} s + {k:.2} s ksoftirqd on its cores {:?} = {:.1}% of one core{}",
                        cpu.server_cpus.as_deref().unwrap_or(&[]),
                        (s + k) / wall * 100.0,
                        per(s + k)
                    ),
                    None => format!(
                        "{s:.2} s = {:.1}% of one core{} (ksoftirqd not included: the hub is \
                         not pinned to cores of its own)",
                        s / wall * 100.0,
                        per(s)
                    ),
                };
                let wait = cpu.server_wait_s.map_or(String::new(), |w| {
                    format!(" (waiting for a CPU: {:.0}%)", w / wall * 100.0)
                });
                out2.push_str(&format!("  {:<w$} {text}{wait}\n", "hub CPU"));
            } else if let Some(pid) = self.server_pid {
                let text = format!("not readable (did pid {pid} exit during the run?)");
                out2.push_str(&format!("  {:<w$} {text}\n", "hub CPU"));
            }
        }
        out.push_str(&out2);
        for warning in &self.warnings {
            out.push_str(&format!("WARNING: {warning}\n"));
        }
        out
    }
}
