//! Worker threads: one monoio runtime per thread (pinned with `--cpus`), plus what a thread
//! needs to end cleanly and to be measured.
//!
//! - [`spawn_threads`] starts the runtimes and returns [`Workers`]: the threads' kernel ids (for
//!   their CPU time, read from `/proc/self/task`) and a count of threads that have finished.
//! - [`Live`] is a thread's registry of open sockets and timers and of running tasks. At the end
//!   of a run [`Live::shut_all`] shuts every socket down (pending reads complete with end of
//!   stream, blocked writes fail) and fires every timer, so every task ends by itself; only then
//!   is the runtime dropped. A runtime whose tasks did not end in time is leaked instead of
//!   dropped: dropping it with io_uring operations in flight could let the kernel write into
//!   freed buffers.
//! - [`Signal`] wakes one waiting task on the same thread.
//! - [`PreciseTimer`] sleeps to an absolute CLOCK_MONOTONIC time with µs precision.

use crate::cli::Common;
use crate::client::ConnError;
use crate::stats::mono_ns;
use monoio::buf::VecBuf;
use monoio::io::AsyncReadRent;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

/// The running worker threads of one scenario.
pub struct Workers {
    /// Kernel thread ids, filled in as the threads start.
    tids: Arc<Mutex<Vec<i32>>>,
    finished: Arc<AtomicUsize>,
    count: usize,
}

impl Workers {
    /// Wait until every thread has finished, at most `timeout`; false on timeout.
    pub fn wait(&self, timeout: Duration) -> bool {
        let end = mono_ns() + timeout.as_nanos() as u64;
        loop {
            if self.finished.load(Ordering::Acquire) == self.count {
                return true;
            }
            if mono_ns() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// CPU seconds (user + system) used so far by each worker thread that is still running
    /// (a finished thread's entry is `None`).
    pub fn cpu_s(&self) -> Vec<Option<f64>> {
        let tids = self.tids.lock().unwrap().clone();
        tids.iter()
            .map(|t| crate::stats::stat_cpu_s(&format!("/proc/self/task/{t}/stat")))
            .collect()
    }

    /// Seconds each worker thread has waited for a CPU while runnable (other processes on
    /// its core).
    pub fn wait_s(&self) -> Vec<Option<f64>> {
        let tids = self.tids.lock().unwrap().clone();
        tids.iter()
            .map(|t| crate::stats::schedstat_wait_s(&format!("/proc/self/task/{t}/schedstat")))
            .collect()
    }
}

/// Start `c.threads` OS threads, each pinned to `cpus[i % len]` (if given) and running `f(i)`
/// on its own monoio runtime. `f` returns whether every task it started has ended (then the
/// runtime is dropped; otherwise it is leaked, see the module docs).
pub fn spawn_threads<F, Fut>(c: &Common, f: F) -> Result<Workers, String>
where
    F: Fn(usize) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = bool> + 'static,
{
    let uring = c.uring();
    let tids = Arc::new(Mutex::new(Vec::new()));
    let finished = Arc::new(AtomicUsize::new(0));
    for tid in 0..c.threads {
        let f = f.clone();
        let cpu = c
            .cpus
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(|c| c[tid % c.len()]);
        let (tids2, finished2) = (tids.clone(), finished.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("load-{tid}"))
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let kernel_tid = unsafe { libc::gettid() };
                tids2.lock().unwrap().push(kernel_tid);
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
                    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                        .with_entries(4096)
                        .enable_timer()
                        .build()
                        .unwrap_or_else(|e| fail(e));
                    if !rt.block_on(f(tid)) {
                        std::mem::forget(rt);
                    }
                } else {
                    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                        .enable_timer()
                        .build()
                        .unwrap_or_else(|e| fail(e));
                    if !rt.block_on(f(tid)) {
                        std::mem::forget(rt);
                    }
                }
                finished2.fetch_add(1, Ordering::Release);
            });
        if let Err(e) = spawned {
            return Err(format!("cannot start thread {tid}: {e}"));
        }
    }
    Ok(Workers {
        tids,
        finished,
        count: c.threads,
    })
}

/// What a registered descriptor is, so [`Live::shut_all`] knows how to end its wait.
#[derive(Clone, Copy)]
enum Kind {
    Socket,
    Timer,
}

/// One thread's open sockets, timers and running tasks.
#[derive(Default)]
pub struct Live {
    fds: RefCell<HashMap<u64, (RawFd, Kind)>>,
    next_key: Cell<u64>,
    tasks: Cell<usize>,
    closing: Cell<bool>,
    all_ended: Signal,
}

/// Removes its descriptor from the registry when dropped. Create it right after the object
/// that owns the descriptor, in the same scope, so it is dropped first.
pub struct FdGuard {
    live: Rc<Live>,
    key: u64,
}

impl Drop for FdGuard {
    fn drop(&mut self) {
        self.live.fds.borrow_mut().remove(&self.key);
    }
}

/// Counts a running task; dropped when the task ends.
pub struct TaskGuard(Rc<Live>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let n = self.0.tasks.get() - 1;
        self.0.tasks.set(n);
        if n == 0 {
            self.0.all_ended.notify();
        }
    }
}

impl Live {
    fn register(self: &Rc<Self>, fd: RawFd, kind: Kind) -> FdGuard {
        let key = self.next_key.get();
        self.next_key.set(key + 1);
        self.fds.borrow_mut().insert(key, (fd, kind));
        FdGuard {
            live: self.clone(),
            key,
        }
    }

    /// Register an open socket (shut down by [`Live::shut_all`]).
    pub fn socket(self: &Rc<Self>, fd: RawFd) -> FdGuard {
        self.register(fd, Kind::Socket)
    }

    /// Count a task until the guard is dropped.
    pub fn task(self: &Rc<Self>) -> TaskGuard {
        self.tasks.set(self.tasks.get() + 1);
        TaskGuard(self.clone())
    }

    /// Whether the run is over: connections ending now are ours, not the server's doing.
    pub fn closing(&self) -> bool {
        self.closing.get()
    }

    /// End every wait of every task: shut down every socket and fire every timer.
    pub fn shut_all(&self) {
        self.closing.set(true);
        let fired = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 1,
            },
        };
        for &(fd, kind) in self.fds.borrow().values() {
            // SAFETY: a registered fd is open (its guard is dropped before its owner closes it).
            unsafe {
                match kind {
                    Kind::Socket => libc::shutdown(fd, libc::SHUT_RDWR),
                    Kind::Timer => libc::timerfd_settime(fd, 0, &fired, std::ptr::null_mut()),
                };
            }
        }
    }

    /// Wait until every counted task has ended, at most `timeout`; false on timeout.
    pub async fn wait_ended(&self, timeout: Duration) -> bool {
        let wait = async {
            while self.tasks.get() > 0 {
                self.all_ended.wait().await;
            }
        };
        monoio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// A wake-up for one waiting task on the same thread (level-triggered: a notify before the
/// wait is not lost).
#[derive(Default)]
pub struct Signal {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Signal {
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// A timerfd read through monoio: sleeps to an absolute CLOCK_MONOTONIC time with µs
/// precision (monoio's own timer has 1 ms granularity, too coarse for a send schedule).
pub struct PreciseTimer {
    fd: monoio::net::TcpStream,
    buf: Option<VecBuf>,
    _guard: FdGuard,
}

impl PreciseTimer {
    pub fn new(live: &Rc<Live>, uring: bool) -> Result<Self, ConnError> {
        // io_uring polls blocking fds itself; the epoll driver needs a non-blocking one.
        let flags = libc::TFD_CLOEXEC | if uring { 0 } else { libc::TFD_NONBLOCK };
        // SAFETY: plain timerfd_create; the fd is owned by `std` right away.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, flags) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(ConnError::from_os("timerfd_create", e));
        }
        // SAFETY: fresh fd owned by nobody else. monoio only reads it with readv, which works
        // on any readable fd (the socket type is just the owner of the fd).
        let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        let fd = monoio::net::TcpStream::from_std(std).map_err(|e| ConnError::Io("timerfd", e))?;
        let guard = live.register(fd.as_raw_fd(), Kind::Timer);
        Ok(PreciseTimer {
            fd,
            buf: Some(VecBuf::from(vec![vec![0u8; 8]])),
            _guard: guard,
        })
    }

    /// Sleep until CLOCK_MONOTONIC `t` (ns), or until [`Live::shut_all`] fires the timer.
    pub async fn sleep_until(&mut self, t: u64) -> Result<(), ConnError> {
        if t <= mono_ns() {
            return Ok(());
        }
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let value = libc::timespec {
            tv_sec: (t / 1_000_000_000) as libc::time_t,
            tv_nsec: (t % 1_000_000_000) as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: zero,
            it_value: value,
        };
        let fd = self.fd.as_raw_fd();
        // SAFETY: valid timerfd and itimerspec; the old value is not wanted.
        let rc = unsafe {
            libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
        if rc < 0 {
            return Err(ConnError::Io(
                "timerfd_settime",
                std::io::Error::last_os_error(),
            ));
        }
        let buf = self
            .buf
            .take()
            .expect("timer buffer is returned after every read");
        let (res, buf) = self.fd.readv(buf).await;
        self.buf = Some(buf);
        res.map(|_| ())
            .map_err(|e| ConnError::Io("timerfd read", e))
    }
}
