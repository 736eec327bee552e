//! Measurement plumbing shared by the scenarios: the monotonic clock, latency histograms and
//! their `.hgrm` export, counters that worker threads hand to the main thread, and process
//! figures (CPU time, resident memory) of this process or of the hub.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// CLOCK_MONOTONIC in nanoseconds: the clock of the `"t"` field in published messages.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A latency histogram in nanoseconds, 3 significant figures, 1 ns to 1 hour.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// Nanoseconds as microseconds with one decimal.
pub fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

/// Write `hist` (ns) as an HdrHistogram percentile distribution (`.hgrm`), values in µs.
pub fn write_hgrm(hist: &Histogram<u64>, path: &Path) -> std::io::Result<()> {
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !hist.is_empty() {
        for v in hist.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = v.value_iterated_to() as f64 / 1000.0;
            if q < 1.0 {
                let inv = 1.0 / (1.0 - q);
                let _ = writeln!(out, "{value:12.3} {q:1.12} {total:10} {inv:14.2}");
            } else {
                let _ = writeln!(out, "{value:12.3} {q:1.12} {total:10}");
            }
        }
    }
    let (mean, sd, max) = (
        hist.mean() / 1000.0,
        hist.stdev() / 1000.0,
        hist.max() as f64 / 1000.0,
    );
    let _ = writeln!(out, "#[Mean    = {mean:12.3}, StdDeviation   = {sd:12.3}]");
    let _ = writeln!(
        out,
        "#[Max     = {max:12.3}, Total count    = {:12}]",
        hist.len()
    );
    std::fs::write(path, out)
}

/// Failures grouped by kind, keeping the first message of each kind as the example to show.
#[derive(Default)]
pub struct Tally(BTreeMap<&'static str, (u64, String)>);

impl Tally {
    pub fn add(&mut self, kind: &'static str, message: impl FnOnce() -> String) {
        let e = self.0.entry(kind).or_insert_with(|| (0, message()));
        e.0 += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.values().map(|(n, _)| n).sum()
    }

    pub fn count(&self, kind: &str) -> u64 {
        self.0.get(kind).map_or(0, |e| e.0)
    }

    fn absorb(&mut self, other: &mut Tally) {
        for (kind, (n, msg)) in std::mem::take(&mut other.0) {
            self.0.entry(kind).or_insert((0, msg)).0 += n;
        }
    }

    /// One line per kind: `  kind: count  (e.g. message)`.
    pub fn lines(&self) -> Vec<String> {
        let w = self.0.keys().map(|k| k.len()).max().unwrap_or(0);
        self.0
            .iter()
            .map(|(k, (n, msg))| format!("{k:<w$}  {n:>8}   e.g. {msg}"))
            .collect()
    }
}

/// Counters one worker thread accumulates locally and periodically adds to the shared total
/// ([`Counts::absorb`] moves them, leaving zeros behind). `live` is a delta.
#[derive(Default)]
pub struct Counts {
    pub setup_ok: u64,
    pub setup_failed: u64,
    pub live: i64,
    pub publishers_done: u64,
    pub deliveries: u64,
    /// Deliveries that arrived inside the measurement window (for deliveries/s).
    pub window_deliveries: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Subscriptions confirmed, per channel.
    pub subs: Vec<u64>,
    /// Publishes written, per channel.
    pub sent: Vec<u64>,
    pub errors: Tally,
    /// Connections the server closed after setup, by close code (None: no close frame).
    pub closes: BTreeMap<Option<u16>, u64>,
}

impl Counts {
    pub fn with_channels(channels: usize) -> Self {
        Counts {
            subs: vec![0; channels],
            sent: vec![0; channels],
            ..Default::default()
        }
    }

    pub fn absorb(&mut self, o: &mut Counts) {
        use std::mem::take;
        self.setup_ok += take(&mut o.setup_ok);
        self.setup_failed += take(&mut o.setup_failed);
        self.live += take(&mut o.live);
        self.publishers_done += take(&mut o.publishers_done);
        self.deliveries += take(&mut o.deliveries);
        self.window_deliveries += take(&mut o.window_deliveries);
        self.duplicates += take(&mut o.duplicates);
        self.reordered += take(&mut o.reordered);
        for (d, s) in self.subs.iter_mut().zip(o.subs.iter_mut()) {
            *d += take(s);
        }
        for (d, s) in self.sent.iter_mut().zip(o.sent.iter_mut()) {
            *d += take(s);
        }
        self.errors.absorb(&mut o.errors);
        for (code, n) in take(&mut o.closes) {
            *self.closes.entry(code).or_default() += n;
        }
    }

    pub fn closes_line(&self) -> String {
        if self.closes.is_empty() {
            return "none".into();
        }
        let parts: Vec<String> = self
            .closes
            .iter()
            .map(|(code, n)| match code {
                Some(c) => format!("{n} with code {c}"),
                None => format!("{n} without a close frame"),
            })
            .collect();
        parts.join(", ")
    }
}

/// User + system CPU seconds of this process (all threads), from getrusage(RUSAGE_SELF).
pub fn self_cpu_s() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system CPU seconds of another process, from /proc/PID/stat (utime + stime).
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some(ticks as f64 / hz as f64)
}

/// VmRSS of a process (None: this one), from its /proc status file opened up front, so it
/// stays readable once every other file descriptor is taken.
pub struct Rss(std::fs::File);

impl Rss {
    pub fn open(pid: Option<u32>) -> Option<Self> {
        let path = pid.map_or("/proc/self/status".into(), |p| format!("/proc/{p}/status"));
        std::fs::File::open(path).ok().map(Rss)
    }

    /// Bytes resident now.
    pub fn read(&mut self) -> Option<u64> {
        use std::io::{Read, Seek};
        let mut status = String::new();
        self.0.rewind().ok()?;
        self.0.read_to_string(&mut status).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

/// Bytes as MiB with one decimal.
pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}
