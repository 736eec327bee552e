//! `ringhub-load`: a load generator for ringhub (and any server speaking its protocol v1).
//!
//! Scenarios ([`cli::Command`]):
//! - `fanout`: publishers → channels → subscribers ([`traffic`]);
//! - `rooms`: chat rooms, every member publishing ([`traffic`]);
//! - `connect`: connections opened at a fixed rate, connect→welcome time ([`connect`]);
//! - `idle`: many idle connections, memory per connection ([`idle`]);
//! - `reconnect`: subscribers on history channels dropped and resubscribed with `since` while
//!   publishers run (over WebSocket, or `POST /publish` through [`http`]): recovered %,
//!   recovery time, loss across reconnects ([`reconnect`]);
//! - `compare`: .hgrm files side by side and as an SVG plot ([`compare`]).
//!
//! Messages on history channels carry the hub's offset; every scenario that receives them
//! checks, per connection and channel, that each arrives once and in order ([`track`]).
//!
//! Connections are spread over `--threads` monoio runtimes ([`worker`]), optionally pinned with
//! `--cpus`, bound round-robin to `--source-ips`, and spread over the `--url` instances. With
//! `--token-secret` or `--token-key` each authenticates with a token of its own, minted before
//! the timed part ([`auth`]).
//! [`run`] is the binary's entry point; [`run_scenario`] returns the [`report::Report`] (tests
//! use it to check counts).

pub mod auth;
pub mod cli;
pub mod client;
pub mod compare;
pub mod connect;
pub mod http;
pub mod idle;
pub mod reconnect;
pub mod report;
pub mod schedule;
pub mod stats;
pub mod track;
pub mod traffic;
pub mod worker;

use auth::{Auth, Tokens};
use cli::{Command, Common};
use client::Target;
use report::Report;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// A scenario's checked inputs: the URLs resolved, the token flags resolved, the open-file
/// limit raised.
pub struct Prepared {
    pub common: Common,
    /// Distinct targets.
    pub targets: Vec<Target>,
    /// Indexes into `targets` for publishers and subscribers, in the order given.
    pub pub_targets: Vec<usize>,
    pub sub_targets: Vec<usize>,
    /// RLIMIT_NOFILE in force (raised to the hard limit).
    pub fd_limit: u64,
    /// What signs the connection tokens (None: connections do not authenticate).
    pub auth: Option<Auth>,
}

impl Prepared {
    /// Resolve and probe every URL, check the source addresses, raise the open-file limit.
    pub fn new(common: &Common) -> Result<Prepared, String> {
        if common.threads == 0 {
            return Err("--threads must be at least 1".into());
        }
        if common.urls.is_empty() {
            return Err("give at least one --url".into());
        }
        let auth = Auth::new(&common.token)?;
        let mut targets: Vec<Target> = Vec::new();
        let mut index = |url: &str| -> Result<usize, String> {
            if let Some(i) = targets.iter().position(|t| t.url == url) {
                return Ok(i);
            }
            let t = Target::parse(url)?;
            t.probe()?;
            targets.push(t);
            Ok(targets.len() - 1)
        };
        fn pick<'a>(list: &'a [String], all: &'a [String]) -> &'a [String] {
            if list.is_empty() {
                all
            } else {
                list
            }
        }
        let pub_targets = pick(&common.publish_urls, &common.urls)
            .iter()
            .map(|u| index(u))
            .collect::<Result<Vec<_>, _>>()?;
        let sub_targets = pick(&common.subscribe_urls, &common.urls)
            .iter()
            .map(|u| index(u))
            .collect::<Result<Vec<_>, _>>()?;
        for ip in common.source_ips.iter().flatten() {
            check_source(*ip)?;
        }
        Ok(Prepared {
            common: common.clone(),
            targets,
            pub_targets,
            sub_targets,
            fd_limit: raise_fd_limit(),
            auth,
        })
    }

    /// An error for an `http://` URL: scenarios other than `reconnect` speak WebSocket only.
    pub fn require_ws(&self, scenario: &str) -> Result<(), String> {
        match self.targets.iter().find(|t| t.http) {
            Some(t) => Err(format!(
                "{scenario}: {} is an http:// URL; only `reconnect` publishes over HTTP \
                 (POST /publish): give ws:// URLs",
                t.url
            )),
            None => Ok(()),
        }
    }

    /// With auth on, one token for each of `n` connections (minted now, before the timed part).
    /// `need`: about how long the connections must stay authenticated from now (a token that
    /// expires sooner is announced on stderr).
    pub fn mint(&self, n: usize, need: Duration) -> Result<Option<Arc<Tokens>>, String> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let tokens = auth.mint_all(n, self.common.quiet)?;
        if let Some(w) = tokens.expiry_warning(need) {
            eprintln!("WARNING: {w}");
        }
        Ok(Some(Arc::new(tokens)))
    }

    /// Check that `per_target[i]` connections to each target fit in the open-file limit and
    /// in the ephemeral ports of the source addresses. `strict`: an error (else a warning, for
    /// scenarios that report such failures by cause).
    pub fn check_capacity(&self, per_target: &[usize], strict: bool) -> Result<(), String> {
        let total: usize = per_target.iter().sum();
        let need = total as u64 + 64;
        if need > self.fd_limit {
            let msg = format!(
                "{total} connections need about {need} open files, but the open-file limit \
                 (RLIMIT_NOFILE, already raised to the hard limit) is {}, so not all of them \
                 can be opened; raise the hard limit (ulimit -Hn as root, LimitNOFILE= in \
                 systemd)",
                self.fd_limit
            );
            if strict {
                return Err(msg);
            }
            eprintln!("NOTE: {msg}");
        }
        let ports = ephemeral_ports();
        let sources = self
            .common
            .source_ips
            .as_ref()
            .map_or(1, |v| v.len().max(1));
        for (t, &n) in self.targets.iter().zip(per_target) {
            if n as u64 > ports * sources as u64 {
                let need = (n as u64).div_ceil(ports);
                let msg = format!(
                    "{n} connections to {} need at least {need} source addresses (each has \
                     {ports} ephemeral ports per destination, net.ipv4.ip_local_port_range), \
                     but {sources} {} given: add --source-ips 127.0.0.2-127.0.0.{}",
                    t.addr,
                    if sources == 1 { "is" } else { "are" },
                    need + 1
                );
                if strict {
                    return Err(msg);
                }
                eprintln!("NOTE: {msg}");
            }
        }
        Ok(())
    }
}

/// Fail early when a `--source-ips` address is not one of this machine's.
fn check_source(ip: IpAddr) -> Result<(), String> {
    match std::net::TcpListener::bind(SocketAddr::new(ip, 0)) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "--source-ips: cannot bind to {ip} ({e}): not an address of this machine"
        )),
    }
}

/// Ports in net.ipv4.ip_local_port_range (28232 on Linux by default).
fn ephemeral_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
            let (lo, hi) = (it.next()??, it.next()??);
            Some(hi.saturating_sub(lo) + 1)
        })
        .unwrap_or(28232)
}

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
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

/// Run a load scenario and return its report (nothing printed but progress; no files
/// written). `compare` is not a load scenario: use [`compare::run`].
pub fn run_scenario(cmd: &Command) -> Result<Report, String> {
    let ws = |scenario: &str, common: &Common| -> Result<Prepared, String> {
        let prep = Prepared::new(common)?;
        prep.require_ws(scenario)?;
        Ok(prep)
    };
    match cmd {
        Command::Fanout(a) => traffic::fanout(a, &ws("fanout", &a.common)?),
        Command::Rooms(a) => traffic::rooms(a, &ws("rooms", &a.common)?),
        Command::Connect(a) => connect::run(a, &ws("connect", &a.common)?),
        Command::Idle(a) => idle::run(a, &ws("idle", &a.common)?),
        Command::Reconnect(a) => reconnect::run(a, &Prepared::new(&a.common)?),
        Command::Compare(_) => Err("compare is not a load scenario".into()),
    }
}

/// The binary: run the command, print the report, write `--hgrm` and `--json`.
pub fn run(cmd: Command) -> Result<(), String> {
    if let Command::Compare(a) = &cmd {
        return compare::run(a);
    }
    let report = run_scenario(&cmd)?;
    print!("{}", report.text());
    let common = match &cmd {
        Command::Fanout(a) => &a.common,
        Command::Rooms(a) => &a.common,
        Command::Connect(a) => &a.common,
        Command::Idle(a) => &a.common,
        Command::Reconnect(a) => &a.common,
        Command::Compare(_) => unreachable!("handled above"),
    };
    if let Some(path) = &common.hgrm {
        stats::write_hgrm(&report.latency, path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("histogram written to {} (values in µs)", path.display());
    }
    if let Some(path) = &common.json {
        let text = serde_json::to_string_pretty(&report.to_json()).expect("JSON values");
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("summary written to {}", path.display());
    }
    Ok(())
}
