//! `ringhub-load`: a load generator for ringhub.
//!
//! - `fanout`: N subscribers, P publishers over C channels, open loop (`--rate`, latency from
//!   each message's intended send time) or closed loop (`--max --window W`); reports
//!   throughput, latency percentiles, loss/duplicates/reordering and CPU use.
//! - `idle`: opens many idle connections at a fixed rate and reports the server's (and our)
//!   memory per connection and every failure by cause.
//!
//! Connections are spread over `--threads` monoio runtimes (optionally pinned with `--cpus`)
//! and bound round-robin to `--source-ips` to go past one address's ephemeral ports.

mod client;
mod fanout;
mod idle;
mod stats;

use clap::{Args, Parser, Subcommand};
use ringhub::config::{parse_cpu_list, parse_duration, parse_size};
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ringhub-load",
    version,
    about = "Load generator for the ringhub WebSocket hub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fan-out: publishers → channels → subscribers; latency, loss and throughput.
    Fanout(FanoutArgs),
    /// Many idle connections: connect rate, failures and memory per connection.
    Idle(IdleArgs),
}

/// Flags every scenario has.
#[derive(Args, Clone)]
pub struct Common {
    /// Hub WebSocket URL.
    #[arg(
        long,
        env = "RINGHUB_LOAD_URL",
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    pub url: String,
    /// monoio threads the connections are spread over.
    #[arg(long, env = "RINGHUB_LOAD_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// Cores to pin the threads to, e.g. `1` or `2-3` [default: no pinning].
    #[arg(long, env = "RINGHUB_LOAD_CPUS", value_parser = parse_cpu_list)]
    pub cpus: Option<::std::vec::Vec<usize>>,
    /// Source addresses to bind client sockets to, round-robin: `127.0.0.2-127.0.0.9,127.0.1.1`.
    #[arg(long, env = "RINGHUB_LOAD_SOURCE_IPS", value_parser = parse_ip_list)]
    pub source_ips: Option<::std::vec::Vec<IpAddr>>,
    /// PID of the hub, to report its CPU time (and, for `idle`, its memory).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Use monoio's epoll driver even where io_uring is available.
    #[arg(long, env = "RINGHUB_LOAD_EPOLL")]
    pub epoll: bool,
}

impl Common {
    /// Whether the runtimes use io_uring (else epoll).
    pub fn uring(&self) -> bool {
        !self.epoll && monoio::utils::detect_uring()
    }
}

#[derive(Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscriber connections (spread round-robin over the channels).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Channels.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Publisher connections; each publishes round-robin over the channels and subscribes to
    /// all of them.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Open loop: total messages per second, on a fixed schedule.
    #[arg(long, required_unless_present = "max", conflicts_with = "max")]
    pub rate: Option<f64>,
    /// Closed loop: publish as fast as the window allows.
    #[arg(long)]
    pub max: bool,
    /// With --max: messages in flight per publisher (done when it gets its own message back).
    #[arg(long, default_value_t = 16, requires = "max")]
    pub window: u32,
    /// Measured time, after the warmup.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Time published (and checked for loss) before measuring latency.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Approximate size of each message's data, in bytes (`64`, `1KiB`).
    #[arg(long, default_value = "64", value_parser = parse_size)]
    pub payload_size: usize,
    /// Write the latency distribution (µs) as an HdrHistogram `.hgrm` text file.
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
}

#[derive(Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connects per second.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// How long to hold the connections once all are open.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Each connection subscribes to a channel of its own.
    #[arg(long)]
    pub subscribe: bool,
}

/// Parse `a`, `a-b` (IPv4 ranges) and comma-separated mixes of them.
fn parse_ip_list(s: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ip = |t: &str| {
            t.parse::<IpAddr>()
                .map_err(|e| format!("bad address {t:?}: {e}"))
        };
        match part.split_once('-') {
            None => out.push(ip(part)?),
            Some((a, b)) => match (ip(a)?, ip(b)?) {
                (IpAddr::V4(a), IpAddr::V4(b)) if u32::from(a) <= u32::from(b) => {
                    out.extend((u32::from(a)..=u32::from(b)).map(|n| IpAddr::from(n.to_be_bytes())))
                }
                _ => return Err(format!("bad range {part:?}: need ascending IPv4 addresses")),
            },
        }
    }
    if out.is_empty() {
        return Err("no address given".into());
    }
    Ok(out)
}

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
        rl.rlim_cur
    }
}

/// Start `threads` OS threads, each pinned to `cpus[i % len]` (if given) and running `f(i)`
/// on its own monoio runtime. The threads never return: a runtime with operations in flight
/// is never dropped; the process ends when `main` returns.
pub fn spawn_threads<F, Fut>(c: &Common, f: F)
where
    F: Fn(usize) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let uring = c.uring();
    for tid in 0..c.threads {
        let f = f.clone();
        let cpu = c
            .cpus
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(|c| c[tid % c.len()]);
        let spawned = std::thread::Builder::new()
            .name(format!("load-{tid}"))
            .spawn(move || {
                if let Some(id) = cpu {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                        eprintln!("warning: could not pin thread {tid} to CPU {id}");
                    }
                }
                let fail = |e: std::io::Error| -> ! {
                    eprintln!("error: cannot build a monoio runtime: {e}");
                    std::process::exit(1)
                };
                if uring {
                    let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                        .with_entries(4096)
                        .enable_timer()
                        .build();
                    rt.unwrap_or_else(|e| fail(e)).block_on(f(tid));
                } else {
                    let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                        .enable_timer()
                        .build();
                    rt.unwrap_or_else(|e| fail(e)).block_on(f(tid));
                }
                loop {
                    std::thread::park();
                }
            });
        if let Err(e) = spawned {
            eprintln!("error: cannot start thread {tid}: {e}");
            std::process::exit(1);
        }
    }
}

/// The settings shown in every report's header line for threads.
pub fn threads_desc(c: &Common) -> String {
    let driver = if c.uring() { "io_uring" } else { "epoll" };
    let pin = c
        .cpus
        .as_ref()
        .map_or("not pinned".into(), |v| format!("cpus {v:?}"));
    format!("{} ({pin}, {driver})", c.threads)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let common = match &cli.command {
        Command::Fanout(a) => &a.common,
        Command::Idle(a) => &a.common,
    };
    if common.threads == 0 {
        eprintln!("error: --threads must be at least 1");
        return ExitCode::FAILURE;
    }
    let target = match client::Target::parse(&common.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fd_limit = raise_fd_limit();
    let result = match cli.command {
        Command::Fanout(a) => fanout::run(a, target, fd_limit),
        Command::Idle(a) => idle::run(a, target, fd_limit),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
