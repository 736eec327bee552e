//! Starting and stopping a hub instance: one thread per shard, each pinned to its core with its own
//! monoio runtime and SO_REUSEPORT listener on the same address.
//!
//! - [`start`] binds every shard and returns a [`ServerHandle`] (address, instance id, shutdown)
//!   once all listeners are up; tests use it with `127.0.0.1:0`.
//! - [`run`] is what `ringhub serve` calls: [`start`], then SIGTERM/SIGINT handling (first signal:
//!   graceful shutdown; second: exit at once), then wait for the shards.
//!
//! A shard that panics takes the process down (`abort`): its listener would otherwise keep
//! receiving connections nobody serves.

use crate::broker::{Broker, MemoryBroker};
use crate::config::Config;
use crate::inbox::{Inbox, ShardMsg};
use crate::redis::{Links, Readiness, RedisBroker};
use crate::registry::{RegEvent, RegistryQueue, RegistryStart, Timing};
use crate::shard::{self, Shard, Shared};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// Why an instance could not start. All are fatal.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is inconsistent (the message says which setting).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen address is taken or not bindable.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A shard's runtime or thread could not be created.
    #[error("cannot start shard {shard}: {message}")]
    Shard { shard: usize, message: String },
}

/// A running instance.
pub struct ServerHandle {
    addr: SocketAddr,
    instance: Arc<str>,
    inboxes: Arc<[Arc<Inbox>]>,
    threads: Vec<JoinHandle<()>>,
    max_connections: usize,
    registry: Option<(Arc<RegistryQueue>, JoinHandle<()>)>,
}

impl ServerHandle {
    /// The address the shards listen on (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// This instance's id (part of every connection id).
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// The connection limit in force.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Begin graceful shutdown (idempotent): stop accepting, close clients with 1001, drain.
    pub fn shutdown(&self) {
        for inbox in self.inboxes.iter() {
            inbox.push(ShardMsg::Shutdown);
        }
    }

    /// A cloneable trigger for [`ServerHandle::shutdown`], e.g. for a signal thread.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger(self.inboxes.clone())
    }

    /// Wait until every shard has exited, then (Redis mode) until the registry has removed this
    /// instance's keys.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
        if let Some((queue, thread)) = self.registry {
            // The queue only fills if the registry is stuck; give it a moment, then give up.
            for _ in 0..200 {
                if queue.push(RegEvent::Shutdown).is_ok() {
                    // Its final cleanup is bounded (5 s); do not wait forever on a stuck Redis.
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
                    while !thread.is_finished() && std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    if thread.is_finished() {
                        let _ = thread.join();
                    } else {
                        tracing::warn!("the registry did not finish its cleanup in time");
                    }
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            tracing::warn!("the registry did not take the shutdown request");
        }
    }
}

/// Starts graceful shutdown of an instance from any thread.
#[derive(Clone)]
pub struct ShutdownTrigger(Arc<[Arc<Inbox>]>);

impl ShutdownTrigger {
    pub fn shutdown(&self) {
        for inbox in self.0.iter() {
            inbox.push(ShardMsg::Shutdown);
        }
    }
}

/// Raise RLIMIT_NOFILE's soft limit to the hard limit. Returns (before, after).
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the valid rlimit struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

/// Bind every shard and start serving. Returns once all listeners are up.
pub fn start(config: Config) -> Result<ServerHandle, ServerError> {
    config.validate().map_err(ServerError::Config)?;

    let nofile = match raise_nofile_limit() {
        Ok((before, after)) => {
            if after > before {
                tracing::info!(
                    before,
                    after,
                    "raised the open-file soft limit to the hard limit"
                );
            }
            after
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-file limit");
            1024
        }
    };
    let fd_budget = (nofile as usize).saturating_sub(64).max(16);
    let max_connections = match config.max_connections {
        Some(m) => {
            if m > fd_budget {
                tracing::warn!(
                    max_connections = m,
                    open_file_limit = nofile,
                    "max connections exceed the open-file limit: connections beyond about {fd_budget} will be refused by the kernel (EMFILE); raise the hard limit (ulimit -Hn) to serve more"
                );
            }
            m
        }
        None => fd_budget,
    };

    // SO_REUSEPORT lets a second bind to a port silently succeed, so first make sure the address
    // is really free (and resolve port 0) with a plain bind, then let every shard bind it.
    let probe = std::net::TcpListener::bind(config.listen).map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let addr = probe.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    drop(probe);

    // Keys are loaded before anything listens: a missing secret file or a bad PEM is fatal.
    let verifier = match &config.auth {
        Some(auth) => Some(Arc::new(
            crate::auth::token::Verifier::new(auth).map_err(ServerError::Config)?,
        )),
        None => {
            tracing::warn!(
                "no [auth] configured: open mode, anyone who can reach the port can subscribe and publish on any channel"
            );
            None
        }
    };
    if config.auth.is_some() && config.api_key.is_none() {
        tracing::warn!(
            "[auth] is on but api_key is not set: POST /publish, /send, /disconnect and GET /history are refused until it is"
        );
    }
    if config.allowed_origins.is_empty() && config.auth.is_some() {
        tracing::warn!("allowed_origins is not set: browser pages from any origin may connect");
    }

    let instance: Arc<str> = match &config.instance_id {
        Some(id) => Arc::from(id.as_str()),
        None => Arc::from(format!("{:016x}", rand::random::<u64>()).as_str()),
    };
    let registry_queue = config
        .redis
        .as_ref()
        .map(|_| RegistryQueue::new(crate::registry::QUEUE_CAPACITY));
    let shared = Arc::new(Shared {
        connections: AtomicUsize::new(0),
        max_connections,
        readiness: Readiness::new(config.shards, config.redis.is_none()),
        registry: registry_queue.clone(),
        addr,
        started_at: crate::registry::unix_ms(),
        verifier,
    });
    let inboxes: Arc<[Arc<Inbox>]> = (0..config.shards).map(|_| Inbox::new()).collect();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let config = Arc::new(config);

    let mut threads = Vec::with_capacity(config.shards);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), ServerError>>();
    for id in 0..config.shards {
        let core = if !config.pin {
            None
        } else if let Some(list) = &config.cpus {
            Some(core_affinity::CoreId { id: list[id] })
        } else if cores.is_empty() {
            None
        } else {
            Some(cores[id % cores.len()])
        };
        let ctx = ShardStart {
            id,
            core,
            addr,
            cfg: config.clone(),
            instance: instance.clone(),
            shared: shared.clone(),
            inboxes: inboxes.clone(),
            ready: ready_tx.clone(),
        };
        let t = std::thread::Builder::new()
            .name(format!("ringhub-shard-{id}"))
            .spawn(move || {
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard_main(ctx)));
                if result.is_err() {
                    eprintln!("ringhub: shard {id} panicked; aborting the process");
                    std::process::abort();
                }
            })
            .map_err(|e| ServerError::Shard {
                shard: id,
                message: e.to_string(),
            })?;
        threads.push(t);
    }
    drop(ready_tx);
    for _ in 0..config.shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                for inbox in inboxes.iter() {
                    inbox.push(ShardMsg::Shutdown);
                }
                return Err(e);
            }
            Err(_) => {
                return Err(ServerError::Shard {
                    shard: 0,
                    message: "a shard exited during start-up".into(),
                })
            }
        }
    }
    let registry = match (&config.redis, registry_queue) {
        (Some(redis), Some(queue)) => {
            let core = registry_core(&config, &cores);
            let thread = crate::registry::spawn(RegistryStart {
                redis: redis.clone(),
                timing: Timing {
                    heartbeat_interval: config.heartbeat_interval,
                    heartbeat_ttl: config.heartbeat_ttl,
                    conn_ttl: config.connection_ttl,
                },
                instance: instance.clone(),
                addr,
                shards: config.shards,
                inboxes: inboxes.clone(),
                queue: queue.clone(),
                core,
                started_at: crate::registry::unix_ms(),
            })
            .map_err(|e| ServerError::Shard {
                shard: 0,
                message: format!("registry thread: {e}"),
            })?;
            Some((queue, thread))
        }
        _ => None,
    };
    tracing::info!(
        %addr,
        shards = config.shards,
        instance = %instance,
        max_connections,
        mode = if config.redis.is_some() { "redis" } else { "embedded" },
        "ringhub listening"
    );
    Ok(ServerHandle {
        addr,
        instance,
        inboxes,
        threads,
        max_connections,
        registry,
    })
}

/// The registry's core: `--registry-core`, else the last core. Says so when it shares a core
/// with a shard.
fn registry_core(
    config: &Config,
    cores: &[core_affinity::CoreId],
) -> Option<core_affinity::CoreId> {
    if !config.pin || cores.is_empty() {
        return None;
    }
    let id = config
        .registry_core
        .unwrap_or_else(|| cores.iter().map(|c| c.id).max().unwrap_or(0));
    let shard_cores: Vec<usize> = match &config.cpus {
        Some(list) => list[..config.shards].to_vec(),
        None => (0..config.shards)
            .map(|i| cores[i % cores.len()].id)
            .collect(),
    };
    if shard_cores.contains(&id) {
        tracing::info!(
            core = id,
            cores = cores.len(),
            shards = config.shards,
            "the registry shares core {id} with a shard (fewer cores than shards + 1)"
        );
    }
    Some(core_affinity::CoreId { id })
}

struct ShardStart {
    id: usize,
    core: Option<core_affinity::CoreId>,
    addr: SocketAddr,
    cfg: Arc<Config>,
    instance: Arc<str>,
    shared: Arc<Shared>,
    inboxes: Arc<[Arc<Inbox>]>,
    ready: mpsc::Sender<Result<(), ServerError>>,
}

fn shard_main(ctx: ShardStart) {
    let id = ctx.id;
    if let Some(core) = ctx.core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(
                shard = id,
                core = core.id,
                "could not pin shard to its core"
            );
        }
    }
    let fail = |message: String| {
        let _ = ctx
            .ready
            .send(Err(ServerError::Shard { shard: id, message }));
    };
    let built = if ctx.cfg.epoll {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(Into::into)
    } else {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .with_entries(2048)
            .enable_timer()
            .build()
    };
    let mut rt = match built {
        Ok(rt) => rt,
        Err(e) => return fail(format!("runtime: {e}")),
    };
    if id == 0 {
        let driver = match &rt {
            monoio::FusionRuntime::Uring(_) => "io_uring",
            monoio::FusionRuntime::Legacy(_) => "epoll",
        };
        tracing::info!(driver, "I/O driver");
    }
    rt.block_on(async move {
        let opts = monoio::net::ListenerOpts::new()
            .reuse_port(true)
            .backlog(4096);
        let listener = match monoio::net::TcpListener::bind_with_config(ctx.addr, &opts) {
            Ok(l) => l,
            Err(source) => {
                let _ = ctx.ready.send(Err(ServerError::Bind {
                    addr: ctx.addr,
                    source,
                }));
                return;
            }
        };
        // Embedded mode: shards carry messages to each other. Redis mode: Redis is the bus and
        // shards do not talk to each other.
        let links = ctx.cfg.redis.as_ref().map(|r| {
            let inbox =
                (id == 0).then(|| crate::registry::Keys::new(&r.prefix).inbox(&ctx.instance));
            Links::new(Arc::new(r.clone()), id, ctx.shared.readiness.clone(), inbox)
        });
        let broker: Box<dyn Broker> = match &links {
            Some(links) => Box::new(RedisBroker::new(links.clone())),
            None => Box::new(MemoryBroker::new(id, ctx.inboxes.clone())),
        };
        let shard = Rc::new(RefCell::new(Shard::new(
            id,
            ctx.cfg.clone(),
            ctx.instance.clone(),
            ctx.shared.clone(),
            ctx.inboxes[id].clone(),
            ctx.inboxes.clone(),
            broker,
        )));
        shard.borrow_mut().this = Rc::downgrade(&shard);
        monoio::spawn(shard::accept_loop(shard.clone(), listener));
        monoio::spawn(shard::inbox_loop(shard.clone()));
        monoio::spawn(shard::flush_loop(shard.clone()));
        if let Some(links) = links {
            crate::redis::spawn_links(shard.clone(), links);
        }
        let _ = ctx.ready.send(Ok(()));
        shard::sweep_loop(shard).await;
        tracing::debug!(shard = id, "shard stopped");
    });
}

/// Run an instance until SIGTERM/SIGINT: the first signal starts graceful shutdown, a second one
/// exits at once (status 130).
pub fn run(config: Config) -> Result<(), ServerError> {
    // Block the signals before any thread exists so that every thread inherits the mask and only
    // the signal thread (via sigwait) receives them.
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset/pthread_sigmask get valid pointers.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let grace = config.shutdown_timeout + std::time::Duration::from_secs(3);
    let handle = start(config)?;
    let trigger = handle.shutdown_trigger();
    std::thread::Builder::new()
        .name("ringhub-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer.
            unsafe { libc::sigwait(&set, &mut sig) };
            tracing::info!(
                signal = sig,
                "shutting down: closing clients with 1001 (send the signal again to exit now)"
            );
            trigger.shutdown();
            // A second signal exits at once; and if the shards have not finished well after the
            // shutdown timeout (they should have), exit anyway rather than hang.
            let timeout = libc::timespec {
                tv_sec: grace.as_secs() as libc::time_t,
                tv_nsec: grace.subsec_nanos() as libc::c_long,
            };
            // SAFETY: valid pointers to an initialised sigset_t and timespec; a null siginfo is
            // allowed.
            let got = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
            if got > 0 {
                tracing::warn!(signal = got, "second signal: exiting now");
                std::process::exit(130);
            }
            tracing::error!("shutdown did not finish {grace:?} after the signal; exiting anyway");
            std::process::exit(1);
        })
        .map_err(|e| ServerError::Shard {
            shard: 0,
            message: format!("signal thread: {e}"),
        })?;
    handle.join();
    tracing::info!("ringhub stopped");
    Ok(())
}
