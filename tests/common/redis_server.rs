//! Test support for Redis mode: a private `redis-server` process per test, on a free port, and a
//! tiny blocking Redis client (std `TcpStream` + the crate's own RESP encoder and parser).
//!
//! Every test starts its own server (`RedisServer::start`); none ever touches port 6379. The
//! process is killed by its PID when the `RedisServer` is dropped (and, should the test process
//! die first, by the kernel: the child asks for SIGKILL when its parent thread exits).

#![allow(dead_code)]

use bytes::BytesMut;
use ringhub::resp::{encode_command, parse, Frame, Limits};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server gets to accept connections after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket timeouts of [`RedisClient`].
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

const NOT_FOUND: &str = "redis-server not found: install it with `sudo apt-get install \
                         redis-server` (Debian/Ubuntu) or `brew install redis`";

/// A `redis-server` child process listening on `127.0.0.1:<port>`.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    /// Arguments after the defaults (later ones win), kept for restarts.
    extra: Vec<String>,
    /// The private data directory of a persistent server (removed on drop).
    dir: Option<PathBuf>,
}

impl RedisServer {
    /// Start a server on a free port and wait until it answers PING. Panics (never skips) when
    /// `redis-server` is not installed.
    pub fn start() -> RedisServer {
        let mut last_err = String::new();
        // A port found free can be taken by someone else before Redis binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            let log = log_path(port);
            match spawn(port, &log, &[]) {
                Ok(child) => {
                    return RedisServer {
                        child: Some(child),
                        port,
                        log,
                        extra: Vec::new(),
                        dir: None,
                    }
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&log);
                    last_err = e;
                }
            }
        }
        panic!("could not start redis-server: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A new plain client connection to this server.
    pub fn client(&self) -> RedisClient {
        RedisClient::connect(self.port)
    }

    /// Kill the process (SIGKILL) and reap it. The port stays reserved for [`RedisServer::revive`]
    /// only by convention.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start a server again on the same port (after [`RedisServer::kill`]) and wait until it
    /// answers PING.
    pub fn revive(&mut self) {
        assert!(self.child.is_none(), "revive() needs a killed server");
        // The port was just released; retry briefly in case the bind races with something.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawn(self.port, &self.log, &self.extra) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!(
                        "restarting redis-server on port {}: {e}; retrying",
                        self.port
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("could not restart redis-server on port {}: {e}", self.port),
            }
        }
    }

    /// Kill the process and start a new one on the SAME port (waits until it accepts).
    pub fn restart(&mut self) {
        self.kill();
        self.revive();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A port that was free a moment ago (bind 127.0.0.1:0, read it, release it). Never 0: for
/// Redis `--port 0` means "no TCP listener".
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = l.local_addr().unwrap().port();
    assert_ne!(port, 0);
    port
}

fn log_path(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!(
        "ringhub-test-redis-{}-{port}.log",
        std::process::id()
    ))
}

/// Spawn `redis-server` on `port` and wait until it answers PING; on failure the process is
/// reaped and the error includes the tail of its log.
fn spawn(port: u16, log: &PathBuf, extra: &[String]) -> Result<Child, String> {
    assert_ne!(port, 6379, "tests must never use the default Redis port");
    let _ = std::fs::remove_file(log);
    let mut cmd = Command::new("redis-server");
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .arg("--logfile")
        .arg(log)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Die with the thread that started us, should the test process be killed.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!("{NOT_FOUND}"),
        Err(e) => panic!("cannot run redis-server: {e}"),
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "redis-server on port {port} exited with {status}; log:\n{}",
                log_tail(log)
            ));
        }
        if ping(port) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "redis-server on port {port} did not answer PING within {START_TIMEOUT:?}; \
                 log:\n{}",
                log_tail(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_tail(log: &PathBuf) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// One PING over a fresh connection: true on `+PONG`.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    s.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A minimal blocking Redis client: one command, one reply.
pub struct RedisClient {
    stream: TcpStream,
    buf: BytesMut,
}

impl RedisClient {
    pub fn connect(port: u16) -> RedisClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to redis on port {port}: {e}"));
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        RedisClient {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Send one command and read its reply (an error reply is returned as `Frame::Error`).
    pub fn command(&mut self, args: &[&[u8]]) -> Frame {
        let mut out = BytesMut::new();
        encode_command(&mut out, args);
        self.stream.write_all(&out).expect("write a Redis command");
        self.read_frame()
    }

    fn read_frame(&mut self) -> Frame {
        loop {
            match parse(&mut self.buf, &Limits::default()) {
                Ok(Some(frame)) => return frame,
                Ok(None) => {}
                Err(e) => panic!("invalid reply from Redis: {e}"),
            }
            let mut chunk = [0u8; 16 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("Redis closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("reading a Redis reply: {e}"),
            }
        }
    }

    /// `PUBLISH channel payload`: the number of Redis subscribers that received it.
    pub fn publish(&mut self, channel: &str, payload: &[u8]) -> i64 {
        match self.command(&[b"PUBLISH", channel.as_bytes(), payload]) {
            Frame::Integer(n) => n,
            other => panic!("PUBLISH replied {other:?}"),
        }
    }

    /// `PUBSUB CHANNELS pattern`, sorted.
    pub fn pubsub_channels(&mut self, pattern: &str) -> Vec<String> {
        match self.command(&[b"PUBSUB", b"CHANNELS", pattern.as_bytes()]) {
            Frame::Array(items) => {
                let mut names: Vec<String> = items.iter().map(text_of).collect();
                names.sort();
                names
            }
            other => panic!("PUBSUB CHANNELS replied {other:?}"),
        }
    }

    /// `PUBSUB NUMSUB channel`: the number of connections subscribed to `channel`.
    pub fn numsub(&mut self, channel: &str) -> i64 {
        match self.command(&[b"PUBSUB", b"NUMSUB", channel.as_bytes()]) {
            Frame::Array(items) => match items.as_slice() {
                [name, Frame::Integer(n)] if text_of(name) == channel => *n,
                _ => panic!("unexpected PUBSUB NUMSUB reply {items:?}"),
            },
            other => panic!("PUBSUB NUMSUB replied {other:?}"),
        }
    }

    /// One `field:value` line of `INFO section`, as an integer.
    pub fn info_int(&mut self, section: &str, field: &str) -> i64 {
        let text = match self.command(&[b"INFO", section.as_bytes()]) {
            Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
            other => panic!("INFO replied {other:?}"),
        };
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no integer field {field} in INFO {section}:\n{text}"))
    }
}

fn text_of(frame: &Frame) -> String {
    match frame {
        Frame::Bulk(b) | Frame::Simple(b) => String::from_utf8_lossy(b).into_owned(),
        other => panic!("expected a string, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Registry helpers (tests/registry.rs): typed replies for the key commands the registry uses.
// ------------------------------------------------------------------------------------------------

impl RedisServer {
    /// The PID of the running `redis-server` (None after [`RedisServer::kill`]).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl RedisClient {
    /// `GET key` as text; `None` when the key does not exist.
    pub fn get(&mut self, key: &str) -> Option<String> {
        match self.command(&[b"GET", key.as_bytes()]) {
            Frame::Bulk(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            Frame::Null => None,
            other => panic!("GET {key} replied {other:?}"),
        }
    }

    /// `PTTL key` in milliseconds: -2 when the key does not exist, -1 when it has no TTL.
    pub fn pttl(&mut self, key: &str) -> i64 {
        self.integer(&[b"PTTL", key.as_bytes()])
    }

    /// `EXISTS key...`: how many of `keys` exist (0 for an empty list).
    pub fn exists(&mut self, keys: &[String]) -> i64 {
        keys.chunks(500)
            .map(|chunk| {
                let mut args: Vec<&[u8]> = vec![b"EXISTS"];
                args.extend(chunk.iter().map(|k| k.as_bytes()));
                self.integer(&args)
            })
            .sum()
    }

    /// `SMEMBERS key`, sorted (empty when the key does not exist).
    pub fn smembers(&mut self, key: &str) -> Vec<String> {
        match self.command(&[b"SMEMBERS", key.as_bytes()]) {
            Frame::Array(items) | Frame::Set(items) => {
                let mut v: Vec<String> = items.iter().map(text_of).collect();
                v.sort();
                v
            }
            other => panic!("SMEMBERS {key} replied {other:?}"),
        }
    }

    /// Every key matching `pattern`, by a full `SCAN` iteration, sorted.
    pub fn scan(&mut self, pattern: &str) -> Vec<String> {
        let mut cursor = "0".to_string();
        let mut keys = Vec::new();
        loop {
            let reply = self.command(&[
                b"SCAN",
                cursor.as_bytes(),
                b"MATCH",
                pattern.as_bytes(),
                b"COUNT",
                b"1000",
            ]);
            let Frame::Array(parts) = reply else {
                panic!("SCAN replied {reply:?}");
            };
            let [next, Frame::Array(batch)] = parts.as_slice() else {
                panic!("unexpected SCAN reply {parts:?}");
            };
            keys.extend(batch.iter().map(text_of));
            cursor = text_of(next);
            if cursor == "0" {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// `calls` of one command in `INFO commandstats` (0 if it was never called).
    pub fn command_calls(&mut self, command: &str) -> i64 {
        let text = match self.command(&[b"INFO", b"commandstats"]) {
            Frame::Bulk(b) => String::from_utf8_lossy(&b).into_owned(),
            other => panic!("INFO commandstats replied {other:?}"),
        };
        let prefix = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    fn integer(&mut self, args: &[&[u8]]) -> i64 {
        match self.command(args) {
            Frame::Integer(n) => n,
            other => panic!("{} replied {other:?}", String::from_utf8_lossy(args[0])),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Persistence (tests/history_redis.rs): a server whose writes survive a kill and restart.
// ------------------------------------------------------------------------------------------------

impl RedisServer {
    /// Start a server with AOF persistence and `appendfsync always` in a private directory: after
    /// [`RedisServer::restart`] (SIGKILL, then a new process on the same port) it has every write
    /// it acknowledged.
    pub fn start_persistent() -> RedisServer {
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let log = log_path(port);
            let dir = log.with_extension("d");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create the Redis data directory");
            let extra: Vec<String> = ["--appendonly", "yes", "--appendfsync", "always", "--dir"]
                .iter()
                .map(|s| s.to_string())
                .chain([dir.to_string_lossy().into_owned()])
                .collect();
            match spawn(port, &log, &extra) {
                Ok(child) => {
                    return RedisServer {
                        child: Some(child),
                        port,
                        log,
                        extra,
                        dir: Some(dir),
                    }
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&log);
                    let _ = std::fs::remove_dir_all(&dir);
                    last_err = e;
                }
            }
        }
        panic!("could not start a persistent redis-server: {last_err}");
    }
}
