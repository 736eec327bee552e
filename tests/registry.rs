//! The connection registry and instance heartbeats (Redis mode, `src/registry.rs`) against real
//! `redis-server` processes: every test starts its own server on a free port (see
//! `common/redis_server.rs`) and in-process hubs, or the real binary where a process must die.
//!
//! Covered:
//! 1. `ws:conn:*`, the per-instance index and `ws:instance:*` hold the right JSON and TTLs after
//!    1,000 connections open and 500 close;
//! 2. heartbeats keep `ws:instance:<id>` alive across several TTLs, and connection keys are
//!    refreshed before they expire;
//! 3. SIGKILL of one of two instances: the survivor removes every key of the dead one long
//!    before the connection TTL, and keeps serving with its own keys intact; with auth, the dead
//!    one's ids leave the users' sets (`ws:user:<user>`) even when their connection keys are gone;
//! 4. graceful shutdown removes every key of the instance (and none of another's);
//! 5. `POST /send` across instances and across shards, 404s, `GET /instances`, the
//!    `ringhub instances` CLI, and the embedded (no Redis) variants;
//! 6. a backend publishing straight into `ws:inbox:<instance>` (direct messages and disconnects);
//! 7. a Redis outage never blocks a shard, and the registry is right again after Redis returns.
//!
//! Not covered: the repair after a full registry queue (capacity 65,536 events, drained
//! continuously by its own thread) — there is no clean way to fill it from a test.
//!
//! `registry_cost_10k` (ignored; run with `--ignored`) measures the Redis commands, round trips
//! and registry-thread CPU of 10,000 registrations and prints them.
//!
//! Every wait is bounded (10 s socket timeouts, explicit deadlines on polling loops) and no test
//! asserts an upper bound on speed beyond generous "did not hang" limits.

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use common::*;
use redis_server::{RedisClient, RedisServer};
use ringhub::config::RedisConfig;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long registry state gets to settle (a few turns of the registry, or its reconnect backoff,
/// capped at 5 s, after an outage).
const SETTLE: Duration = Duration::from_secs(20);

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// Registry timings of a test hub.
#[derive(Clone, Copy)]
struct Timing {
    heartbeat: Duration,
    heartbeat_ttl: Duration,
    conn_ttl: Duration,
}

/// Heartbeats every 200 ms (counts settle fast) and TTLs no test outlives.
const STEADY: Timing = Timing {
    heartbeat: ms(200),
    heartbeat_ttl: secs(5),
    conn_ttl: secs(60),
};

/// Start a 2-shard hub in Redis mode with the given registry timings and wait until `/readyz`
/// says its Redis links are up.
fn registry_hub(redis: &RedisServer, t: Timing) -> Hub {
    let cfg = RedisConfig::from_url(&redis.url()).expect("valid Redis URL");
    let hub = Hub::start(|c| {
        c.redis = Some(cfg);
        c.heartbeat_interval = t.heartbeat;
        c.heartbeat_ttl = t.heartbeat_ttl;
        c.connection_ttl = t.conn_ttl;
    });
    eventually(WAIT, "the hub to become ready", || {
        match http(hub.addr, "GET", "/readyz", &[], b"") {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    hub
}

fn instance_of(hub: &Hub) -> String {
    hub.handle.as_ref().unwrap().instance_id().to_owned()
}

fn conn_key(id: &str) -> String {
    format!("ws:conn:{id}")
}

fn instance_key(instance: &str) -> String {
    format!("ws:instance:{instance}")
}

fn index_key(instance: &str) -> String {
    format!("ws:instance:{instance}:conns")
}

fn conn_keys<'a>(ids: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    ids.into_iter().map(|id| conn_key(id)).collect()
}

fn sorted<'a>(ids: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let set: BTreeSet<String> = ids.into_iter().cloned().collect();
    set.into_iter().collect()
}

/// Poll `check` every 25 ms until it returns `Ok`; fail after `timeout` with the last `Err`
/// (what was observed instead).
fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last seen: {last}"
            ),
        }
        thread::sleep(ms(25));
    }
}

/// The JSON value of a key (None if it does not exist).
fn json_at(r: &mut RedisClient, key: &str) -> Option<Value> {
    r.get(key).map(|text| {
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{key} holds invalid JSON {text:?}: {e}"))
    })
}

/// Wait until this instance's index and `ws:conn:*` keys are exactly `ids`.
fn wait_for_conn_keys(r: &mut RedisClient, instance: &str, ids: &[String]) {
    let want = sorted(ids);
    eventually(
        SETTLE,
        "the index to list exactly the open connections",
        || {
            let got = r.smembers(&index_key(instance));
            if got == want {
                Ok(())
            } else {
                Err(format!("{} members (want {})", got.len(), want.len()))
            }
        },
    );
    eventually(SETTLE, "exactly the open connections to have keys", || {
        let n = r.exists(&conn_keys(&want));
        if n == want.len() as i64 {
            Ok(())
        } else {
            Err(format!("{n} of {} keys", want.len()))
        }
    });
}

/// Wait until the instance key says `connections == n`; returns its JSON.
fn wait_for_instance_count(r: &mut RedisClient, instance: &str, n: u64) -> Value {
    eventually(
        SETTLE,
        &format!("{instance}'s key to count {n} connections"),
        || match json_at(r, &instance_key(instance)) {
            Some(v) if v["connections"] == n => Ok(v),
            other => Err(format!("{other:?}")),
        },
    )
}

/// Ping and require the very next frame to be the pong: the connection works and nothing else
/// (no stray direct message) was queued for it.
fn ping_pong(c: &mut Client, id: &str) {
    c.send_text(&format!(r#"{{"type":"ping","id":"{id}"}}"#));
    assert_eq!(
        c.recv_text(),
        format!(r#"{{"type":"pong","id":"{id}"}}"#),
        "connection {}: expected only the pong",
        c.id
    );
}

/// `POST /send` with a compact body; returns (status, body).
fn send(addr: SocketAddr, connection: &str, data: &str) -> (u16, String) {
    let body = format!(r#"{{"connection":{},"data":{data}}}"#, json!(connection));
    http(
        addr,
        "POST",
        "/send",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

/// The body must be the JSON error `not_found`.
fn assert_not_found(what: &str, (status, body): (u16, String)) {
    assert_eq!(status, 404, "{what}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {body:?}: {e}"));
    assert_eq!(v["ok"], false, "{what}: {body}");
    assert_eq!(v["error"]["code"], "not_found", "{what}: {body}");
}

/// `GET /instances` as JSON (status must be 200).
fn instances(addr: SocketAddr) -> Vec<Value> {
    let (status, body) = http(addr, "GET", "/instances", &[], b"");
    assert_eq!(status, 200, "GET /instances: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /instances: {body:?}: {e}"))
}

/// Close a client: the close handshake when `handshake`, else just drop the TCP connection.
fn close_client(mut c: Client, handshake: bool) {
    if handshake {
        c.ws.close(None).expect("send a close frame");
        // Read until the server's close and the end of the stream (bounded by the read timeout).
        while c.ws.read().is_ok() {}
    }
}

/// A `ringhub serve` child process, killed (SIGKILL) and reaped when dropped.
struct HubProcess {
    child: Child,
    addr: SocketAddr,
    instance: String,
}

impl HubProcess {
    /// Run the real binary with `serve --listen 127.0.0.1:0 --log info` plus `args`; returns
    /// once it has logged its address.
    fn spawn(args: &[&str]) -> HubProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringhub"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--log", "info"])
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // Die with the test thread that started us, should the test process be killed.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn ringhub");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let field = |line: &str, name: &str| -> Option<String> {
            let rest = line.split(&format!(" {name}=")).nth(1)?;
            Some(rest.split_whitespace().next()?.to_string())
        };
        let (addr, instance) = loop {
            // The hub logs its address within moments; if it exits, `next` ends the loop.
            let line = match lines.next() {
                Some(Ok(l)) => l,
                _ => {
                    let _ = child.kill();
                    panic!("ringhub exited before reporting its address");
                }
            };
            if let (Some(a), Some(i)) = (field(&line, "addr"), field(&line, "instance")) {
                break (a.parse().expect("a socket address"), i);
            }
        };
        // Keep draining stderr so the hub never blocks on a full pipe.
        thread::spawn(move || for _ in lines {});
        HubProcess {
            child,
            addr,
            instance,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL and reap.
    fn kill9(&mut self) {
        // SAFETY: kill(2) with the PID of a child we own and have not reaped.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 {}", self.pid());
        self.child.wait().expect("reap the killed hub");
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------------------------
// 1. Keys, JSON and TTLs after 1,000 open and 500 closed
// ------------------------------------------------------------------------------------------------

#[test]
fn keys_hold_the_right_json_and_ttls_after_1000_open_and_500_closed() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let timing = STEADY;
    let t_start = unix_ms();
    let hub = registry_hub(&redis, timing);
    let me = instance_of(&hub);

    let clients: Vec<Client> = (0..1000).map(|_| Client::connect(hub.addr)).collect();
    let t_open = unix_ms();
    let mut per_shard = [0usize; 2];
    for c in &clients {
        assert_eq!(c.instance, me);
        per_shard[c.shard()] += 1;
    }
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "connections on both shards: {per_shard:?}"
    );

    // Close every second one: half of those with the close handshake, half by dropping TCP.
    let mut open = Vec::new();
    let mut closed_ids = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            open.push(c);
        } else {
            closed_ids.push(c.id.clone());
            close_client(c, i % 4 == 1);
        }
    }
    assert_eq!(open.len(), 500);
    let open_ids: Vec<String> = open.iter().map(|c| c.id.clone()).collect();

    // The index, and every ws:conn key in the database, are exactly the open connections.
    wait_for_conn_keys(&mut r, &me, &open_ids);
    assert_eq!(r.smembers(&index_key(&me)), sorted(&open_ids), "index");
    assert_eq!(
        r.scan("ws:conn:*"),
        sorted(&conn_keys(&open_ids)),
        "SCAN ws:conn:* lists exactly the open connections"
    );
    assert_eq!(
        r.exists(&conn_keys(&closed_ids)),
        0,
        "closed connections' keys"
    );

    // Each value: the right fields, this client's address, a plausible time, a bounded TTL.
    let fields: BTreeSet<&str> = [
        "connection",
        "instance",
        "shard",
        "remote",
        "connected_at",
        "user",
    ]
    .into_iter()
    .collect();
    for c in &open {
        let key = conn_key(&c.id);
        let v = json_at(&mut r, &key).unwrap_or_else(|| panic!("{key} missing"));
        let got: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(got, fields, "{key}: {v}");
        assert_eq!(v["connection"], c.id.as_str(), "{key}: {v}");
        assert_eq!(v["instance"], me.as_str(), "{key}: {v}");
        assert_eq!(v["shard"], c.shard(), "{key}: {v}");
        assert_eq!(v["user"], "", "{key}: anonymous: {v}");
        let local = c.ws.get_ref().local_addr().unwrap().to_string();
        assert_eq!(v["remote"], local.as_str(), "{key}: {v}");
        let at = v["connected_at"]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {v}"));
        // Whole seconds are fine: the window starts at the second the test started in.
        assert!(
            (t_start / 1000 * 1000..=t_open).contains(&at),
            "{key}: connected_at {at} outside [{t_start}, {t_open}]"
        );
        let ttl = r.pttl(&key);
        assert!(
            ttl > 0 && ttl <= timing.conn_ttl.as_millis() as i64,
            "{key}: PTTL {ttl}"
        );
    }

    // The instance key after the next heartbeat.
    let v = wait_for_instance_count(&mut r, &me, 500);
    assert_eq!(v["instance"], me.as_str(), "{v}");
    assert_eq!(v["addr"], hub.addr.to_string(), "{v}");
    assert_eq!(v["shards"], 2, "{v}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{v}");
    let started = v["started_at"].as_u64().unwrap_or_else(|| panic!("{v}"));
    assert!(
        (t_start..=t_open).contains(&started),
        "started_at {started} outside [{t_start}, {t_open}]"
    );
    let ttl = r.pttl(&instance_key(&me));
    assert!(
        ttl > 0 && ttl <= timing.heartbeat_ttl.as_millis() as i64,
        "instance key PTTL {ttl}"
    );
    assert_eq!(r.smembers("ws:instances"), vec![me.clone()]);
    // The index itself expires if the instance dies without cleanup.
    assert!(r.pttl(&index_key(&me)) > 0, "the index has a TTL");
}

// ------------------------------------------------------------------------------------------------
// 2. Heartbeats and connection-key refresh
// ------------------------------------------------------------------------------------------------

#[test]
fn heartbeats_keep_the_instance_key_alive_and_connection_keys_are_refreshed() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let timing = Timing {
        heartbeat_ttl: ms(600),
        conn_ttl: secs(1),
        ..STEADY
    };
    let hub = registry_hub(&redis, timing);
    let me = instance_of(&hub);
    let mut c = Client::connect(hub.addr);
    let (ikey, ckey) = (instance_key(&me), conn_key(&c.id));
    eventually(SETTLE, "both keys to exist", || {
        match r.exists(&[ikey.clone(), ckey.clone()]) {
            2 => Ok(()),
            n => Err(format!("{n} of 2")),
        }
    });

    // 21 checks over 3 s: five heartbeat TTLs and three connection TTLs.
    let start = Instant::now();
    for i in 0..=20u32 {
        let at = start + ms(150) * i;
        thread::sleep(at.saturating_duration_since(Instant::now()));
        let ittl = r.pttl(&ikey);
        assert!(
            ittl > 0 && ittl <= 600,
            "check {i} at {:?}: instance key PTTL {ittl}",
            start.elapsed()
        );
        let cttl = r.pttl(&ckey);
        assert!(
            cttl > 0 && cttl <= 1000,
            "check {i} at {:?}: connection key PTTL {cttl}",
            start.elapsed()
        );
    }
    assert!(start.elapsed() >= Duration::from_secs(3));
    ping_pong(&mut c, "still-here");

    // Closing deletes the key (it does not just stop being refreshed).
    close_client(c, true);
    eventually(SETTLE, "the closed connection's key to go", || {
        match (
            r.exists(std::slice::from_ref(&ckey)),
            r.smembers(&index_key(&me)),
        ) {
            (0, m) if m.is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(r.pttl(&ikey) > 0, "the instance key stays");
}

// ------------------------------------------------------------------------------------------------
// 3. SIGKILL one of two instances
// ------------------------------------------------------------------------------------------------

#[test]
fn a_sigkilled_instance_is_cleaned_up_by_the_survivor() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let survivor = registry_hub(
        &redis,
        Timing {
            heartbeat_ttl: secs(1),
            conn_ttl: secs(30),
            ..STEADY
        },
    );
    let sid = instance_of(&survivor);
    let url = redis.url();
    let mut victim = HubProcess::spawn(&[
        "--shards",
        "2",
        "--no-pin",
        "--redis",
        &url,
        "--heartbeat-interval",
        "200ms",
        "--heartbeat-ttl",
        "1s",
        "--connection-ttl",
        "30s",
    ]);
    let vid = victim.instance.clone();
    assert_ne!(vid, sid);
    eventually(WAIT, "the victim to become ready", || {
        match http(victim.addr, "GET", "/readyz", &[], b"") {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    let victims: Vec<Client> = (0..50).map(|_| Client::connect(victim.addr)).collect();
    let victim_ids: Vec<String> = victims.iter().map(|c| c.id.clone()).collect();
    assert!(victims.iter().all(|c| c.instance == vid));
    let mut mine = clients_on_each_shard(survivor.addr, 2);
    let my_ids: Vec<String> = mine.iter().map(|c| c.id.clone()).collect();

    wait_for_conn_keys(&mut r, &vid, &victim_ids);
    wait_for_conn_keys(&mut r, &sid, &my_ids);
    wait_for_instance_count(&mut r, &vid, 50);
    assert_eq!(
        r.smembers("ws:instances"),
        sorted(&[sid.clone(), vid.clone()])
    );

    victim.kill9();
    let killed = Instant::now();
    drop(victims);

    // The connection TTL is 30 s: within 15 s only the survivor can have removed them.
    let victim_keys = conn_keys(&victim_ids);
    eventually(
        Duration::from_secs(15),
        "the survivor to remove every key of the dead instance",
        || {
            let state = (
                r.exists(&[instance_key(&vid)]),
                r.exists(&victim_keys),
                r.exists(&[index_key(&vid)]),
                r.smembers("ws:instances"),
            );
            if state == (0, 0, 0, vec![sid.clone()]) {
                Ok(())
            } else {
                Err(format!(
                    "(instance key, conn keys, index, ws:instances) = {state:?}"
                ))
            }
        },
    );
    eprintln!(
        "dead instance cleaned up {:?} after SIGKILL (heartbeat TTL 1 s, interval 200 ms)",
        killed.elapsed()
    );
    // Exactly one live instance did it, holding the lock.
    assert_eq!(r.get(&format!("ws:cleanup:{vid}")), Some(sid.clone()));

    // The survivor keeps serving, its own keys intact.
    for (i, c) in mine.iter_mut().enumerate() {
        c.subscribe("after");
        ping_pong(c, &format!("s{i}"));
    }
    let mut publisher = Client::connect(survivor.addr);
    let other = publisher.publish_acked("after", json!({"still": "serving"}));
    assert!(other.is_empty(), "{other:?}");
    for c in &mut mine {
        assert_eq!(
            c.recv_text(),
            r#"{"type":"message","channel":"after","data":{"still":"serving"}}"#
        );
    }
    let mut all_mine = my_ids.clone();
    all_mine.push(publisher.id.clone());
    wait_for_conn_keys(&mut r, &sid, &all_mine);
    wait_for_instance_count(&mut r, &sid, 3);
    assert_eq!(r.smembers("ws:instances"), vec![sid.clone()]);
    let listed = instances(survivor.addr);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["instance"], sid.as_str());
}

/// HMAC secret of the auth-mode hubs.
const SECRET: &str = "ringhub-registry-test-secret-0123456789abcdef";

/// A connection authenticated as `user` with an HS256 token (minted here with `jsonwebtoken`).
fn connect_as(addr: SocketAddr, user: &str) -> Client {
    let exp = unix_ms() / 1000 + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).expect("an HMAC key"),
    )
    .expect("mint a token");
    let mut c = Client::connect(addr);
    c.send_json(json!({"type":"connect","token":token}));
    let v = c.recv_json();
    assert_eq!(v["type"], "connected", "connect as {user}: {v}");
    assert_eq!(v["user"], user, "{v}");
    c
}

/// Wait until `SMEMBERS key` is exactly `want` (sorted).
fn wait_for_members(r: &mut RedisClient, key: &str, want: &[String]) {
    eventually(SETTLE, &format!("{key} to hold {want:?}"), || {
        let got = r.smembers(key);
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
}

#[test]
fn a_sigkilled_instances_ids_leave_the_users_sets() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let cfg = RedisConfig::from_url(&redis.url()).expect("valid Redis URL");
    let survivor = Hub::start(|c| {
        c.redis = Some(cfg);
        c.heartbeat_interval = ms(200);
        c.heartbeat_ttl = secs(1);
        c.connection_ttl = secs(30);
        c.auth = Some(ringhub::auth::AuthConfig {
            secret: Some(SECRET.into()),
            ..Default::default()
        });
        c.api_key = Some("registry-test-api-key".into());
    });
    let sid = instance_of(&survivor);
    let url = redis.url();
    let mut victim = HubProcess::spawn(&[
        "--shards",
        "2",
        "--no-pin",
        "--redis",
        &url,
        "--heartbeat-interval",
        "200ms",
        "--heartbeat-ttl",
        "1s",
        "--connection-ttl",
        "30s",
        "--auth-secret",
        SECRET,
        "--api-key",
        "registry-test-api-key",
    ]);
    let vid = victim.instance.clone();
    for addr in [survivor.addr, victim.addr] {
        eventually(WAIT, "both hubs to become ready", || {
            match http(addr, "GET", "/readyz", &[], b"") {
                (200, _) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }

    let victims_42: Vec<Client> = (0..3).map(|_| connect_as(victim.addr, "42")).collect();
    let victim_9 = connect_as(victim.addr, "9");
    let mut mine = connect_as(survivor.addr, "42");
    let mut victim_ids: Vec<String> = victims_42.iter().map(|c| c.id.clone()).collect();
    let mut all_42 = victim_ids.clone();
    all_42.push(mine.id.clone());
    wait_for_members(&mut r, "ws:user:42", &sorted(&all_42));
    wait_for_members(&mut r, "ws:user:9", std::slice::from_ref(&victim_9.id));
    let victim_users = format!("ws:instance:{vid}:users");
    wait_for_members(&mut r, &victim_users, &["42".to_string(), "9".to_string()]);
    victim_ids.push(victim_9.id.clone());

    victim.kill9();
    // As if the connection keys had expired before anyone noticed the death (the heartbeat TTL
    // is 1 s; this runs within moments): the cleanup must not need them.
    let keys = conn_keys(&victim_ids);
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    del.extend(keys.iter().map(|k| k.as_bytes()));
    let deleted = r.command(&del);
    assert_eq!(
        deleted,
        ringhub::resp::Frame::Integer(4),
        "the victim's connection keys existed until now"
    );
    drop(victims_42);
    drop(victim_9);

    // The users' sets live 32 s (connection TTL + 2 heartbeat TTLs): within 15 s only the
    // survivor's cleanup can have emptied them.
    eventually(
        Duration::from_secs(15),
        "the survivor to remove the dead instance's ids from the users' sets",
        || {
            let state = (
                r.smembers("ws:user:42"),
                r.exists(&["ws:user:9".to_string(), victim_users.clone()]),
            );
            if state == (vec![mine.id.clone()], 0) {
                Ok(())
            } else {
                Err(format!("(ws:user:42, ws:user:9 + users set) = {state:?}"))
            }
        },
    );
    assert_eq!(r.get(&format!("ws:cleanup:{vid}")), Some(sid.clone()));
    assert_eq!(
        r.smembers(&format!("ws:instance:{sid}:users")),
        vec!["42".to_string()]
    );
    let body = json!({"user": "42", "data": "still here"}).to_string();
    let key = [("Authorization", "Bearer registry-test-api-key")];
    let (status, reply) = http(survivor.addr, "POST", "/send", &key, body.as_bytes());
    assert_eq!(
        (status, reply.as_str()),
        (200, r#"{"ok":true,"connections":1}"#)
    );
    assert_eq!(mine.recv_text(), r#"{"type":"direct","data":"still here"}"#);
}

// ------------------------------------------------------------------------------------------------
// 4. Graceful shutdown
// ------------------------------------------------------------------------------------------------

#[test]
fn graceful_shutdown_leaves_no_keys_of_the_instance() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    // Long TTLs: nothing can disappear by expiry during the test.
    let timing = Timing {
        heartbeat_ttl: secs(30),
        conn_ttl: secs(120),
        ..STEADY
    };
    let mut hub = registry_hub(&redis, timing);
    let other = registry_hub(&redis, timing);
    let me = instance_of(&hub);
    let them = instance_of(&other);

    let mut clients: Vec<Client> = (0..20).map(|_| Client::connect(hub.addr)).collect();
    let ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    let theirs: Vec<Client> = (0..3).map(|_| Client::connect(other.addr)).collect();
    let their_ids: Vec<String> = theirs.iter().map(|c| c.id.clone()).collect();
    wait_for_conn_keys(&mut r, &me, &ids);
    wait_for_conn_keys(&mut r, &them, &their_ids);
    wait_for_instance_count(&mut r, &me, 20);

    // Stop on another thread while this one takes the close frames.
    let handle = hub.handle.take().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let stopper = thread::spawn(move || {
        handle.shutdown();
        handle.join();
        let _ = done_tx.send(());
    });
    for c in &mut clients {
        let (code, reason) = c.expect_close();
        assert_eq!(code, 1001, "close of {}: {reason}", c.id);
    }
    drop(clients);
    done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("shutdown finished (join returned)");
    stopper.join().unwrap();

    // join() returns after the registry removed the keys: no polling.
    let left: Vec<String> = r
        .scan("ws:conn:*")
        .into_iter()
        .filter(|k| k.starts_with(&format!("ws:conn:{me}-")))
        .collect();
    assert!(left.is_empty(), "connection keys left: {left:?}");
    assert_eq!(r.exists(&[instance_key(&me)]), 0, "instance key");
    assert_eq!(r.exists(&[index_key(&me)]), 0, "index");
    assert_eq!(r.smembers("ws:instances"), vec![them.clone()]);
    // The other instance's keys are untouched.
    assert_eq!(r.smembers(&index_key(&them)), sorted(&their_ids));
    assert_eq!(r.exists(&conn_keys(&their_ids)), 3);
    assert_eq!(r.exists(&[instance_key(&them)]), 1);
}

// ------------------------------------------------------------------------------------------------
// 5. POST /send, GET /instances, `ringhub instances`
// ------------------------------------------------------------------------------------------------

#[test]
fn send_reaches_a_connection_on_any_instance_and_instances_lists_both() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let timing = STEADY;
    let a = registry_hub(&redis, timing);
    let b = registry_hub(&redis, timing);
    let (ia, ib) = (instance_of(&a), instance_of(&b));
    let mut on_a = clients_on_each_shard(a.addr, 2);
    let mut on_b = clients_on_each_shard(b.addr, 2);
    let a_ids: Vec<String> = on_a.iter().map(|c| c.id.clone()).collect();
    let b_ids: Vec<String> = on_b.iter().map(|c| c.id.clone()).collect();
    wait_for_conn_keys(&mut r, &ia, &a_ids);
    wait_for_conn_keys(&mut r, &ib, &b_ids);

    // A → B (through the registry and B's inbox), to both of B's shards; B → A likewise.
    for (i, c) in on_b.iter_mut().enumerate() {
        assert_eq!(
            send(a.addr, &c.id, r#"{"n":1}"#),
            (200, r#"{"ok":true}"#.to_string()),
            "send from A to {} (shard {i} of B)",
            c.id
        );
        assert_eq!(c.recv_text(), r#"{"type":"direct","data":{"n":1}}"#);
    }
    for c in on_a.iter_mut() {
        assert_eq!(send(b.addr, &c.id, "[true,null]").0, 200, "B → {}", c.id);
        assert_eq!(c.recv_text(), r#"{"type":"direct","data":[true,null]}"#);
    }
    // Local sends on A: one of the two targets is on the other shard than the HTTP request.
    for c in on_a.iter_mut() {
        assert_eq!(
            send(a.addr, &c.id, r#""local""#),
            (200, r#"{"ok":true}"#.to_string()),
            "local send to {}",
            c.id
        );
        assert_eq!(c.recv_text(), r#"{"type":"direct","data":"local"}"#);
    }
    // Exactly the addressed connection got each message.
    for (i, c) in on_a.iter_mut().chain(on_b.iter_mut()).enumerate() {
        ping_pong(c, &format!("only{i}"));
    }

    // Unknown ids: not an id at all, an id of an unknown instance (looked up in Redis).
    assert_not_found("malformed id", send(a.addr, "nope", "1"));
    assert_not_found(
        "unknown instance",
        send(a.addr, "ffffffffffffffff-0-1-1", "1"),
    );
    assert_not_found(
        "unknown key on A",
        send(a.addr, &format!("{ia}-1-999999-1"), "1"),
    );
    // Well-formed ids of closed connections: on B (remote lookup) and on A (local).
    for (hub, name) in [(&b, "B"), (&a, "A")] {
        let c = Client::connect(hub.addr);
        let id = c.id.clone();
        let key = conn_key(&id);
        eventually(SETTLE, "the new connection's key", || match r.get(&key) {
            Some(_) => Ok(()),
            None => Err("missing".into()),
        });
        close_client(c, true);
        eventually(SETTLE, "the closed connection's key to go", || {
            match r.exists(std::slice::from_ref(&key)) {
                0 => Ok(()),
                n => Err(format!("{n}")),
            }
        });
        assert_not_found(
            &format!("closed connection on {name}"),
            send(a.addr, &id, "1"),
        );
    }
    // A wrong sequence number on a live key is another (closed) connection.
    let (inst, shard, key, seq) = parse_id(&on_a[0].id);
    assert_not_found(
        "stale sequence number",
        send(a.addr, &format!("{inst}-{shard}-{key}-{}", seq + 1000), "1"),
    );
    for (i, c) in on_a.iter_mut().enumerate() {
        ping_pong(c, &format!("after404-{i}"));
    }

    // GET /instances on A lists both, with their connection counts once a heartbeat counted them.
    let listed = eventually(SETTLE, "/instances to list both with 2 connections", || {
        let list = instances(a.addr);
        let counts: BTreeMap<String, Value> = list
            .iter()
            .map(|v| {
                (
                    v["instance"].as_str().unwrap_or("?").to_string(),
                    v["connections"].clone(),
                )
            })
            .collect();
        let want: BTreeMap<String, Value> = [(ia.clone(), json!(2)), (ib.clone(), json!(2))]
            .into_iter()
            .collect();
        if counts == want {
            Ok(list)
        } else {
            Err(format!("{list:?}"))
        }
    });
    for v in &listed {
        let addr = if v["instance"] == ia.as_str() {
            a.addr
        } else {
            b.addr
        };
        assert_eq!(v["addr"], addr.to_string(), "{v}");
        assert_eq!(v["shards"], 2, "{v}");
    }
    // B says the same.
    assert_eq!(instances(b.addr).len(), 2);

    // The CLI: a table and, with --json, the same array.
    let out = Command::new(env!("CARGO_BIN_EXE_ringhub"))
        .args(["instances", "--redis", &redis.url()])
        .output()
        .expect("run ringhub instances");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (id, addr) in [(&ia, a.addr), (&ib, b.addr)] {
        let row = table
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"));
        assert!(row.contains(&addr.to_string()), "{row}");
    }
    assert!(table.contains("2 live instance(s)"), "{table}");
    let out = Command::new(env!("CARGO_BIN_EXE_ringhub"))
        .args(["instances", "--json", "--redis", &redis.url()])
        .output()
        .expect("run ringhub instances --json");
    assert!(out.status.success());
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("a JSON array");
    let ids: BTreeSet<&str> = list.iter().filter_map(|v| v["instance"].as_str()).collect();
    assert_eq!(ids, [ia.as_str(), ib.as_str()].into_iter().collect());
}

/// `<instance>-<shard>-<key>-<seq>`
fn parse_id(id: &str) -> (String, usize, usize, u64) {
    let mut parts = id.rsplitn(4, '-');
    let seq = parts.next().unwrap().parse().unwrap();
    let key = parts.next().unwrap().parse().unwrap();
    let shard = parts.next().unwrap().parse().unwrap();
    (parts.next().unwrap().to_string(), shard, key, seq)
}

#[test]
fn embedded_mode_sends_locally_and_lists_itself() {
    let hub = Hub::start(|_| {});
    let me = instance_of(&hub);
    let mut clients = clients_on_each_shard(hub.addr, 2);
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            send(hub.addr, &c.id, &format!(r#"{{"n":{i}}}"#)),
            (200, r#"{"ok":true}"#.to_string()),
            "send to {}",
            c.id
        );
        assert_eq!(
            c.recv_text(),
            format!(r#"{{"type":"direct","data":{{"n":{i}}}}}"#)
        );
    }
    for (i, c) in clients.iter_mut().enumerate() {
        ping_pong(c, &format!("e{i}"));
    }
    assert_not_found("malformed id", send(hub.addr, "x", "1"));
    assert_not_found(
        "other instance",
        send(hub.addr, "0000000000000000-0-1-1", "1"),
    );
    let closed = Client::connect(hub.addr);
    let closed_id = closed.id.clone();
    close_client(closed, true);
    eventually(
        SETTLE,
        "a send to the closed connection to be refused",
        || match send(hub.addr, &closed_id, "1") {
            (404, _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    let list = eventually(SETTLE, "/instances to count 2 connections", || {
        let list = instances(hub.addr);
        match list.as_slice() {
            [v] if v["connections"] == 2 => Ok(list),
            _ => Err(format!("{list:?}")),
        }
    });
    assert_eq!(list[0]["instance"], me.as_str());
    assert_eq!(list[0]["addr"], hub.addr.to_string());
    assert_eq!(list[0]["shards"], 2);
}

// ------------------------------------------------------------------------------------------------
// 6. A backend publishing to an instance's inbox
// ------------------------------------------------------------------------------------------------

#[test]
fn a_backend_can_publish_to_an_instance_inbox() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let hub = registry_hub(&redis, STEADY);
    let me = instance_of(&hub);
    let inbox = format!("ws:inbox:{me}");
    eventually(
        SETTLE,
        "the instance to subscribe to its inbox",
        || match r.numsub(&inbox) {
            1 => Ok(()),
            n => Err(format!("{n} subscribers")),
        },
    );
    let mut clients = clients_on_each_shard(hub.addr, 2);
    for c in clients.iter_mut() {
        let payload = format!(r#"{{"connection":"{}","data":[1,2]}}"#, c.id);
        assert_eq!(r.publish(&inbox, payload.as_bytes()), 1, "one subscriber");
        assert_eq!(
            c.recv_text(),
            r#"{"type":"direct","data":[1,2]}"#,
            "{}",
            c.id
        );
    }
    // Payloads that match nobody here are ignored; the hub carries on.
    let (inst, shard, key, seq) = parse_id(&clients[1].id);
    for junk in [
        "not json".to_string(),
        r#"{"data":1}"#.to_string(),
        r#"{"connection":"ffffffffffffffff-0-1-1","data":1}"#.to_string(),
        format!(
            r#"{{"connection":"{inst}-{shard}-{key}-{}","data":1}}"#,
            seq + 1
        ),
        format!(r#"{{"connection":"{inst}-7-{key}-{seq}","data":1}}"#),
    ] {
        assert_eq!(r.publish(&inbox, junk.as_bytes()), 1);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        ping_pong(c, &format!("b{i}"));
    }
    // And the next good one still arrives.
    let payload = format!(r#"{{"connection":"{}","data":"again"}}"#, clients[0].id);
    r.publish(&inbox, payload.as_bytes());
    assert_eq!(
        clients[0].recv_text(),
        r#"{"type":"direct","data":"again"}"#
    );
}

#[test]
fn a_backend_can_disconnect_through_an_instance_inbox() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let hub = registry_hub(&redis, STEADY);
    let inbox = format!("ws:inbox:{}", instance_of(&hub));
    eventually(
        SETTLE,
        "the instance to subscribe to its inbox",
        || match r.numsub(&inbox) {
            1 => Ok(()),
            n => Err(format!("{n} subscribers")),
        },
    );
    let mut clients = clients_on_each_shard(hub.addr, 2);
    let id = clients[0].id.clone();
    // Ignored: a code or reason out of range, no action, both actions, an empty user.
    for junk in [
        json!({"connection": id, "disconnect": true, "code": 1000}),
        json!({"connection": id, "disconnect": true, "code": 5000}),
        json!({"connection": id, "disconnect": true, "reason": "r".repeat(124)}),
        json!({"connection": id, "disconnect": false}),
        json!({"connection": id}),
        json!({"connection": id, "disconnect": true, "data": 1}),
        json!({"user": "", "disconnect": true}),
    ] {
        assert_eq!(r.publish(&inbox, junk.to_string().as_bytes()), 1);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        ping_pong(c, &format!("d{i}"));
    }
    // Shard 0 receives the inbox: one connection is closed there, the other on shard 1.
    let payloads = [
        json!({"connection": clients[0].id, "disconnect": true}),
        json!({"connection": clients[1].id, "disconnect": true, "code": 4321, "reason": "backend"}),
    ];
    let expected = [(4004, "disconnected by the server"), (4321, "backend")];
    for ((c, payload), (code, reason)) in clients.iter_mut().zip(payloads).zip(expected) {
        assert_eq!(r.publish(&inbox, payload.to_string().as_bytes()), 1);
        assert_eq!(c.expect_close(), (code, reason.to_string()), "{payload}");
    }
}

// ------------------------------------------------------------------------------------------------
// 7. A Redis outage never blocks a shard
// ------------------------------------------------------------------------------------------------

#[test]
fn a_redis_outage_never_blocks_a_shard_and_the_registry_recovers() {
    let mut redis = RedisServer::start();
    let timing = Timing {
        heartbeat_ttl: ms(600),
        ..STEADY
    };
    let hub = registry_hub(&redis, timing);
    let me = instance_of(&hub);
    // Ten connections from before the outage: five stay open (the restarted Redis has lost their
    // keys, so the registry must rewrite them), five close during it (their keys must not return).
    let mut before: Vec<Client> = (0..10).map(|_| Client::connect(hub.addr)).collect();
    let before_ids: Vec<String> = before.iter().map(|c| c.id.clone()).collect();
    wait_for_conn_keys(&mut redis.client(), &me, &before_ids);
    let closing = before.split_off(5);
    let closed_ids: Vec<String> = closing.iter().map(|c| c.id.clone()).collect();

    redis.kill();
    let addr = hub.addr;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for (i, c) in closing.into_iter().enumerate() {
            close_client(c, i % 2 == 0);
        }
        // Each connect is bounded by the client's 10 s read timeout.
        let fresh: Vec<Client> = (0..100).map(|_| Client::connect(addr)).collect();
        let mut open = Vec::new();
        for (i, c) in fresh.into_iter().enumerate() {
            if i % 2 == 0 {
                open.push(c);
            } else {
                close_client(c, i % 4 == 1);
            }
        }
        let _ = tx.send(open);
    });
    let fresh_open = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("100 connects and 55 disconnects during the outage finished");
    assert_eq!(fresh_open.len(), 50);
    let mut open = before;
    open.extend(fresh_open);
    for (i, c) in open.iter_mut().enumerate() {
        assert_eq!(c.instance, me);
        ping_pong(c, &format!("o{i}"));
    }
    // HTTP requests that need the registry fail fast instead of hanging.
    let (status, body) = http(addr, "GET", "/instances", &[], b"");
    assert_eq!(status, 503, "{body}");
    let (status, body) = send(addr, "ffffffffffffffff-0-1-1", "1");
    assert_eq!(status, 503, "{body}");
    // Local sends do not need Redis.
    assert_eq!(send(addr, &open[0].id, "0").0, 200);
    assert_eq!(open[0].recv_text(), r#"{"type":"direct","data":0}"#);

    redis.revive();
    let mut r = redis.client();
    let open_ids: Vec<String> = open.iter().map(|c| c.id.clone()).collect();
    wait_for_conn_keys(&mut r, &me, &open_ids);
    wait_for_instance_count(&mut r, &me, 55);
    assert_eq!(r.scan("ws:conn:*"), sorted(&conn_keys(&open_ids)));
    assert_eq!(r.exists(&conn_keys(&closed_ids)), 0);
    assert_eq!(r.smembers("ws:instances"), vec![me.clone()]);
    for (i, c) in open.iter_mut().enumerate() {
        ping_pong(c, &format!("after{i}"));
    }
}

// ------------------------------------------------------------------------------------------------
// Measurement: 10,000 registrations (ignored; `cargo test --release --test registry -- --ignored`)
// ------------------------------------------------------------------------------------------------

/// Per-connection counters of [`CountingProxy`].
#[derive(Default)]
struct ProxyConn {
    /// Commands the hub sent (complete RESP arrays).
    commands: AtomicI64,
    /// Replies Redis sent.
    replies: AtomicI64,
    /// Times the hub started sending while no reply was outstanding: its round trips (the hub
    /// never writes a pipeline before every reply of the previous one arrived).
    round_trips: AtomicI64,
    /// Wrote registry keys (`conn:` / `instance:`): the registry's connection.
    registry: AtomicBool,
}

/// A TCP proxy in front of Redis that parses both directions and counts, per connection,
/// commands, replies and round trips. Counting happens before forwarding, so a reply can never
/// overtake the count of its command.
struct CountingProxy {
    port: u16,
    conns: Arc<Mutex<Vec<Arc<ProxyConn>>>>,
}

impl CountingProxy {
    fn start(redis_port: u16) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Arc<ProxyConn>>>> = Arc::default();
        let list = conns.clone();
        thread::spawn(move || {
            for hub_side in listener.incoming() {
                let Ok(hub_side) = hub_side else { return };
                let redis_side = TcpStream::connect(("127.0.0.1", redis_port)).unwrap();
                let stats = Arc::new(ProxyConn::default());
                list.lock().unwrap().push(stats.clone());
                let (h2, r2, s2) = (
                    hub_side.try_clone().unwrap(),
                    redis_side.try_clone().unwrap(),
                    stats.clone(),
                );
                thread::spawn(move || pump(hub_side, redis_side, &stats, true));
                thread::spawn(move || pump(r2, h2, &s2, false));
            }
        });
        CountingProxy { port, conns }
    }

    /// (commands, round trips) of the registry's connection(s), summed.
    fn registry_totals(&self) -> (i64, i64) {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.registry.load(Ordering::Relaxed))
            .fold((0, 0), |(c, r), s| {
                (
                    c + s.commands.load(Ordering::Relaxed),
                    r + s.round_trips.load(Ordering::Relaxed),
                )
            })
    }
}

/// Copy `from` → `to`, counting RESP frames (commands when `upstream`, else replies).
fn pump(mut from: TcpStream, mut to: TcpStream, stats: &ProxyConn, upstream: bool) {
    let mut buf = bytes::BytesMut::new();
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &chunk[..n];
        if upstream {
            if buf.is_empty()
                && stats.commands.load(Ordering::SeqCst) == stats.replies.load(Ordering::SeqCst)
            {
                stats.round_trips.fetch_add(1, Ordering::SeqCst);
            }
            if contains(data, b"conn:") || contains(data, b"instance:") {
                stats.registry.store(true, Ordering::Relaxed);
            }
        }
        buf.extend_from_slice(data);
        let mut frames = 0;
        while let Ok(Some(_)) = ringhub::resp::parse(&mut buf, &ringhub::resp::Limits::default()) {
            frames += 1;
        }
        let counter = if upstream {
            &stats.commands
        } else {
            &stats.replies
        };
        counter.fetch_add(frames, Ordering::SeqCst);
        if to.write_all(data).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// CPU time of one thread of process `pid` (by name, as `comm` shows it): (utime + stime in clock
/// ticks, nanoseconds on CPU from schedstat).
fn thread_cpu(pid: u32, comm: &str) -> (u64, u64) {
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = entry.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.trim() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let after = stat.rsplit_once(") ").unwrap().1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat; `after` starts at field 3.
        let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        let sched = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        let ns = sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return (ticks, ns);
    }
    panic!("no thread named {comm} in process {pid}");
}

/// A raw WebSocket client: TCP connect, upgrade request, read until the welcome arrived.
fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut s = raw(addr);
    s.write_all(upgrade_request(addr).as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 512];
    while !contains(&got, b"\"welcome\"") {
        match s.read(&mut chunk) {
            Ok(0) => panic!(
                "closed before the welcome: {}",
                String::from_utf8_lossy(&got)
            ),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("reading the welcome: {e}"),
        }
    }
    s
}

/// What the measurement reads before and after.
struct Sample {
    /// `INFO commandstats` calls of [`REGISTRY_COMMANDS`].
    calls: BTreeMap<&'static str, i64>,
    /// (commands, round trips) of the registry's connection, from [`CountingProxy`].
    registry: (i64, i64),
    /// The registry thread's (clock ticks, schedstat ns).
    cpu: (u64, u64),
    at: Instant,
}

impl Sample {
    fn report_since(&self, what: &str, before: &Sample) {
        let calls: Vec<String> = self
            .calls
            .iter()
            .map(|(k, v)| format!("{k}={}", v - before.calls[k]))
            .filter(|s| !s.ends_with("=0"))
            .collect();
        // SAFETY: sysconf has no preconditions.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let ticks = self.cpu.0 - before.cpu.0;
        eprintln!(
            "{what}: {:?} wall; registry connection: {} commands in {} round trips; Redis \
             commandstats deltas: {}; registry thread CPU: {ticks} ticks ({} ms by stat), \
             {:.1} ms by schedstat",
            self.at - before.at,
            self.registry.0 - before.registry.0,
            self.registry.1 - before.registry.1,
            calls.join(" "),
            ticks * 1000 / tck,
            (self.cpu.1 - before.cpu.1) as f64 / 1e6,
        );
    }
}

/// Redis-side command counts the registry uses.
const REGISTRY_COMMANDS: [&str; 8] = [
    "set", "sadd", "srem", "del", "pexpire", "smembers", "exists", "get",
];

fn command_counts(r: &mut RedisClient) -> BTreeMap<&'static str, i64> {
    REGISTRY_COMMANDS
        .iter()
        .map(|c| (*c, r.command_calls(c)))
        .collect()
}

#[test]
#[ignore = "measurement: run with --ignored (prints the registry's cost of 10,000 registrations)"]
fn registry_cost_10k() {
    const N: usize = 10_000;
    const THREADS: usize = 8;
    let redis = RedisServer::start();
    let mut r = redis.client();
    let proxy = CountingProxy::start(redis.port());
    let proxy_url = format!("redis://127.0.0.1:{}", proxy.port);
    // A separate process: 10,000 client sockets here and 10,000 server sockets there.
    let hub = HubProcess::spawn(&[
        "--shards",
        "2",
        "--no-pin",
        "--redis",
        &proxy_url,
        "--heartbeat-interval",
        "10s",
        "--connection-ttl",
        "120s",
    ]);
    let index = index_key(&hub.instance);
    eventually(SETTLE, "the first heartbeat", || {
        match r.exists(&[instance_key(&hub.instance)]) {
            1 => Ok(()),
            n => Err(format!("{n}")),
        }
    });
    thread::sleep(ms(500));

    let sample = |r: &mut RedisClient| Sample {
        calls: command_counts(r),
        registry: proxy.registry_totals(),
        cpu: thread_cpu(hub.child.id(), "ringhub-registr"),
        at: Instant::now(),
    };

    // Open 10,000 connections as fast as 8 threads can.
    let before = sample(&mut r);
    let addr = hub.addr;
    let workers: Vec<_> = (0..THREADS)
        .map(|_| thread::spawn(move || (0..N / THREADS).map(|_| raw_ws(addr)).collect::<Vec<_>>()))
        .collect();
    let mut socks = Vec::with_capacity(N);
    for w in workers {
        socks.extend(w.join().unwrap());
    }
    let connected = before.at.elapsed();
    eventually(Duration::from_secs(60), "10,000 registrations", || match r
        .command(&[b"SCARD", index.as_bytes()])
    {
        ringhub::resp::Frame::Integer(n) if n == N as i64 => Ok(()),
        other => Err(format!("{other:?}")),
    });
    eprintln!("10,000 connections opened in {connected:?}");
    sample(&mut r).report_since("register 10,000", &before);
    assert_eq!(r.exists(&[instance_key(&hub.instance)]), 1);

    // And closing them all.
    let before = sample(&mut r);
    drop(socks);
    eventually(
        Duration::from_secs(60),
        "10,000 unregistrations",
        || match r.command(&[b"SCARD", index.as_bytes()]) {
            ringhub::resp::Frame::Integer(0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    sample(&mut r).report_since("unregister 10,000", &before);
    assert!(r.scan("ws:conn:*").is_empty());
}
