//! Measurement plumbing shared by the scenarios: the monotonic clock, latency histograms and
//! their `.hgrm` text form (writer and reader), failure tallies, and process figures (CPU time,
//! resident memory) of this process, its threads, or the hub.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// CLOCK_MONOTONIC in nanoseconds: the clock of the `"t"` field in published messages (shared
/// by every process on the host).
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

/// The percentiles every report shows (as quantiles), with their labels.
pub const REPORTED: [(f64, &str); 5] = [
    (0.5, "p50"),
    (0.9, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
    (0.9999, "p99.99"),
];

/// Quantiles that always get a row of their own in a `.hgrm` file, so that readers find their
/// exact values instead of the next iteration step's.
const EXACT_ROWS: [f64; 6] = [0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999];

/// `hist` (ns) as the standard HdrHistogram percentile distribution text, values in µs: the
/// rows of `iter_quantiles(5)` (what HdrHistogram's `outputPercentileDistribution` prints)
/// plus exact rows at `EXACT_ROWS`, then the `#[Mean…]`, `#[Max…]` and `#[Buckets…]` footer.
pub fn hgrm_text(hist: &Histogram<u64>) -> String {
    // (quantile, value ns, count at or below the value)
    let mut rows: Vec<(f64, u64, u64)> = Vec::new();
    if !hist.is_empty() {
        let mut total = 0u64;
        for v in hist.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            rows.push((v.quantile_iterated_to(), v.value_iterated_to(), total));
        }
        for q in EXACT_ROWS {
            if rows.iter().any(|r| (r.0 - q).abs() < 1e-12) {
                continue;
            }
            let v = hist.value_at_quantile(q);
            rows.push((q, v, hist.count_between(0, v)));
        }
        rows.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    }
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for (q, v, total) in rows {
        let value = v as f64 / 1000.0;
        if q < 1.0 {
            let inv = 1.0 / (1.0 - q);
            let _ = writeln!(out, "{value:12.3} {q:1.12} {total:10} {inv:14.2}");
        } else {
            let _ = writeln!(out, "{value:12.3} {q:1.12} {total:10}");
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
    // Sub-buckets per bucket for 3 significant figures: 2^(ceil(log2(2 × 10^3))) = 2048.
    let sub_buckets = 2u64 << (2_000f64.log2().ceil() as u32 - 1);
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {sub_buckets:12}]",
        hist.buckets()
    );
    out
}

/// Write [`hgrm_text`] of `hist` to `path`.
pub fn write_hgrm(hist: &Histogram<u64>, path: &Path) -> std::io::Result<()> {
    std::fs::write(path, hgrm_text(hist))
}

/// A parsed `.hgrm` percentile distribution (values in the file's unit, µs for ours).
#[derive(Debug, Clone)]
pub struct Hgrm {
    /// (value, quantile, count at or below) per row, in file order.
    pub rows: Vec<(f64, f64, u64)>,
    pub mean: Option<f64>,
    pub max: Option<f64>,
    pub total: Option<u64>,
}

impl Hgrm {
    /// Parse the text HdrHistogram writes (ours or Java's/others' `outputPercentileDistribution`).
    pub fn parse(text: &str) -> Result<Hgrm, String> {
        let mut h = Hgrm {
            rows: Vec::new(),
            mean: None,
            max: None,
            total: None,
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with("Value") {
                continue;
            }
            if let Some(footer) = line.strip_prefix("#[") {
                for item in footer.trim_end_matches(']').split(',') {
                    let Some((k, v)) = item.split_once('=') else {
                        continue;
                    };
                    let v = v.trim();
                    match k.trim() {
                        "Mean" => h.mean = v.parse().ok(),
                        "Max" => h.max = v.parse().ok(),
                        "Total count" => h.total = v.parse().ok(),
                        _ => {}
                    }
                }
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad = || format!("line {}: not a percentile row: {line:?}", n + 1);
            if f.len() < 3 {
                return Err(bad());
            }
            let value: f64 = f[0].parse().map_err(|_| bad())?;
            let q: f64 = f[1].parse().map_err(|_| bad())?;
            let total: u64 = f[2].parse().map_err(|_| bad())?;
            if !(0.0..=1.0).contains(&q) || !value.is_finite() {
                return Err(bad());
            }
            h.rows.push((value, q, total));
        }
        if h.rows.is_empty() {
            return Err("no percentile rows (empty histogram or not a .hgrm file)".into());
        }
        if h.rows
            .windows(2)
            .any(|w| w[1].1 < w[0].1 || w[1].0 < w[0].0)
        {
            return Err("percentile rows are not in ascending order".into());
        }
        Ok(h)
    }

    pub fn read(path: &Path) -> Result<Hgrm, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Hgrm::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The value at quantile `q`: that of the first row at or above it (the max for 1.0).
    pub fn value_at(&self, q: f64) -> f64 {
        if q >= 1.0 {
            return self.max_value();
        }
        self.rows
            .iter()
            .find(|r| r.1 >= q - 1e-12)
            .map_or_else(|| self.max_value(), |r| r.0)
    }

    /// The largest value: the footer's, else the last row's.
    pub fn max_value(&self) -> f64 {
        self.max
            .unwrap_or_else(|| self.rows.last().map_or(0.0, |r| r.0))
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.total
            .unwrap_or_else(|| self.rows.last().map_or(0, |r| r.2))
    }
}

/// Failures grouped by kind, keeping the first message of each kind as the example to show.
#[derive(Default, Debug)]
pub struct Tally(BTreeMap<String, (u64, String)>);

impl Tally {
    pub fn add(&mut self, kind: &str, message: impl FnOnce() -> String) {
        match self.0.get_mut(kind) {
            Some(e) => e.0 += 1,
            None => {
                self.0.insert(kind.to_string(), (1, message()));
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().map(|(n, _)| n).sum()
    }

    pub fn count(&self, kind: &str) -> u64 {
        self.0.get(kind).map_or(0, |e| e.0)
    }

    pub fn absorb(&mut self, other: &mut Tally) {
        for (kind, (n, msg)) in std::mem::take(&mut other.0) {
            self.0.entry(kind).or_insert((0, msg)).0 += n;
        }
    }

    /// One line per kind: `kind  count   e.g. message`.
    pub fn lines(&self) -> Vec<String> {
        let w = self.0.keys().map(|k| k.len()).max().unwrap_or(0);
        self.0
            .iter()
            .map(|(k, (n, msg))| format!("{k:<w$}  {n:>8}   e.g. {msg}"))
            .collect()
    }

    /// Kind → count, for JSON.
    pub fn to_json(&self) -> serde_json::Value {
        self.0
            .iter()
            .map(|(k, (n, _))| (k.clone(), serde_json::json!(n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// Connections the server closed, by close code (None: without a close frame).
#[derive(Default, Debug)]
pub struct Closes(pub BTreeMap<Option<u16>, u64>);

impl Closes {
    pub fn add(&mut self, code: Option<u16>) {
        *self.0.entry(code).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn absorb(&mut self, o: &mut Closes) {
        for (code, n) in std::mem::take(&mut o.0) {
            *self.0.entry(code).or_default() += n;
        }
    }

    pub fn line(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(code, n)| match code {
                Some(c) => format!("{n} with code {c} ({})", close_meaning(*c)),
                None => format!("{n} without a close frame"),
            })
            .collect();
        parts.join(", ")
    }

    pub fn to_json(&self) -> serde_json::Value {
        self.0
            .iter()
            .map(|(code, n)| {
                let k = code.map_or("none".to_string(), |c| c.to_string());
                (k, serde_json::json!(n))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// What a WebSocket close code sent by the hub means for a load test.
pub fn close_meaning(code: u16) -> &'static str {
    use ringhub::auth::close;
    match code {
        1000 => "normal",
        1001 => "going away: the hub is shutting down",
        1002 => "protocol error",
        1008 => "policy violation",
        1009 => "message too big: raise the hub's --max-message-size",
        1011 => "internal error in the hub",
        1013 => "try again later: a slow consumer over the hub's --max-queued-bytes",
        close::UNAUTHORIZED => "unauthorized: the token was refused",
        close::TOKEN_EXPIRED => "token expired: raise --token-ttl",
        close::FORBIDDEN => "forbidden",
        close::DISCONNECTED => "disconnected by a backend",
        _ => "see RFC 6455 §7.4",
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

/// User + system CPU seconds from a `/proc/…/stat` file (utime + stime, fields 14 and 15).
pub fn stat_cpu_s(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some(ticks as f64 / hz as f64)
}

/// Seconds a task spent runnable but waiting for a CPU (second field of a
/// `/proc/…/schedstat` file): time other processes took from it.
pub fn schedstat_wait_s(path: &str) -> Option<f64> {
    let s = std::fs::read_to_string(path).ok()?;
    let ns: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// [`schedstat_wait_s`] summed over every thread of a process.
pub fn proc_wait_s(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut sum = 0.0;
    for t in tasks.flatten() {
        sum += schedstat_wait_s(&t.path().join("schedstat").to_string_lossy()).unwrap_or(0.0);
    }
    Some(sum)
}

/// User + system CPU seconds of another process (all its threads).
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    stat_cpu_s(&format!("/proc/{pid}/stat"))
}

/// The CPUs a process's work runs on: the union of the CPU sets of its threads that are
/// pinned (a thread-per-core server pins its shard threads, while its main thread, which only
/// waits, keeps every CPU); every CPU it may use when no thread is pinned.
pub fn allowed_cpus(pid: u32) -> Option<Vec<usize>> {
    let allowed = |path: std::path::PathBuf| -> Option<Vec<usize>> {
        let status = std::fs::read_to_string(path).ok()?;
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
        ringhub::config::parse_cpu_list(line.trim()).ok()
    };
    let all = allowed(format!("/proc/{pid}/status").into())?;
    let mut pinned: Vec<usize> = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Some(cpus) = allowed(t.path().join("status")) {
                if cpus.len() < online_cpus() {
                    pinned.extend(cpus);
                }
            }
        }
    }
    pinned.sort_unstable();
    pinned.dedup();
    Some(if pinned.is_empty() { all } else { pinned })
}

/// Number of CPUs online.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

/// The PIDs of `ksoftirqd/N` for each of `cpus` (the kernel threads that run deferred network
/// work on a core when softirqs pile up).
pub fn ksoftirqd_pids(cpus: &[usize]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let wanted: Vec<String> = cpus.iter().map(|c| format!("ksoftirqd/{c}")).collect();
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| wanted.iter().any(|w| w == c.trim()))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A histogram with a long tail: many fast values, a few slow ones.
    fn sample() -> Histogram<u64> {
        let mut h = new_hist();
        let mut x = 0x2545_f491u64;
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let base = 20_000 + x % 30_000; // 20–50 µs
            let v = match i % 1000 {
                0 => base * 40,    // 0.1% at ~1–2 ms
                1..=9 => base * 4, // 0.9% at ~80–200 µs
                _ => base,
            };
            h.record(v).unwrap();
        }
        h.record(123_456_789).unwrap(); // one 123 ms outlier
        h
    }

    #[test]
    fn hgrm_rows_read_back_as_the_histograms_own_quantiles() {
        let h = sample();
        let dir = std::env::temp_dir().join(format!("ringhub-load-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sample.hgrm");
        write_hgrm(&h, &path).unwrap();
        let parsed = Hgrm::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        // The exact rows: the value printed (µs, 3 decimals) is value_at_quantile's.
        for q in EXACT_ROWS {
            let want = h.value_at_quantile(q) as f64 / 1000.0;
            let got = parsed.value_at(q);
            assert!(
                (got - want).abs() < 0.0006,
                "q {q}: file {got} µs, histogram {want} µs"
            );
        }
        // Every row: value = value_at_quantile(its percentile), and its count = values at or
        // below that value.
        // (value_at_quantile(0) is the lowest equivalent of the minimum; rows show highest.)
        for &(value, q, total) in &parsed.rows {
            let v = h.highest_equivalent(h.value_at_quantile(q));
            let want = v as f64 / 1000.0;
            assert!(
                (value - want).abs() < 0.0006,
                "row q {q}: {value} vs {want}"
            );
            assert_eq!(total, h.count_between(0, v), "row q {q}");
        }
        assert_eq!(parsed.count(), h.len());
        assert_eq!(parsed.rows.last().unwrap().2, h.len());
        assert!((parsed.max_value() - h.max() as f64 / 1000.0).abs() < 0.0006);
        assert!((parsed.mean.unwrap() - h.mean() / 1000.0).abs() < 0.0006);
        assert_eq!(parsed.value_at(1.0), parsed.max_value());
        // Rows are ascending in percentile and value, and reach 100%.
        assert_eq!(parsed.rows.last().unwrap().1, 1.0);
    }

    #[test]
    fn hgrm_layout_is_the_standard_one() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let text = hgrm_text(&h);
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            head,
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines.next(), Some(""));
        let first: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(first, ["1.000", "0.000000000000", "1", "1.00"]);
        let max = format!(
            "#[Max     = {:12.3}, Total count    =         1000]",
            h.max() as f64 / 1000.0
        );
        assert!(text.contains(&max), "{text}");
        assert!(text.contains("SubBuckets     =         2048]"));
        let p50 = text
            .lines()
            .find(|l| l.contains(" 0.500000000000 "))
            .unwrap();
        let want = format!("{:.3} ", h.value_at_quantile(0.5) as f64 / 1000.0);
        assert!(p50.trim_start().starts_with(&want), "{p50}");
    }

    #[test]
    fn hgrm_parser_rejects_what_is_not_a_distribution() {
        assert!(Hgrm::parse("").is_err());
        assert!(Hgrm::parse("Value Percentile\n\nhello world 3\n").is_err());
        assert!(
            Hgrm::parse("5.0 0.5 1\n4.0 0.9 2\n").is_err(),
            "values must ascend"
        );
        let h = Hgrm::parse("1.0 0.0 1 1.0\n2.0 0.5 2 2.0\n3.0 1.0 3\n").unwrap();
        assert_eq!(h.value_at(0.4), 2.0);
        assert_eq!(h.value_at(0.5), 2.0);
        assert_eq!(h.value_at(0.99), 3.0);
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn tally_and_closes() {
        let mut a = Tally::default();
        a.add("timeout", || "first".into());
        a.add("timeout", || {
            unreachable!("only the first message is built")
        });
        let mut b = Tally::default();
        b.add("fd limit", || "EMFILE".into());
        b.add("timeout", || "other".into());
        a.absorb(&mut b);
        assert_eq!(a.total(), 4);
        assert_eq!(a.count("timeout"), 3);
        assert_eq!(b.total(), 0);
        assert!(a.lines()[1].contains("e.g. first"));
        let mut c = Closes::default();
        c.add(Some(1013));
        c.add(None);
        assert!(c.line().contains("1 with code 1013 (try again later"));
        assert_eq!(c.total(), 2);
    }

    #[test]
    fn cpu_figures_are_readable() {
        assert!(stat_cpu_s("/proc/self/stat").is_some());
        assert!(schedstat_wait_s("/proc/self/schedstat").is_some());
        assert!(proc_wait_s(std::process::id()).is_some());
        assert!(self_cpu_s() >= 0.0);
        assert!(online_cpus() >= 1);
        assert!(allowed_cpus(std::process::id()).is_some_and(|c| !c.is_empty()));
    }
}
