//! History and recovery in Redis mode, against real `redis-server` processes the tests start (see
//! `common/redis_server.rs`; never port 6379) and real 2-shard hubs with WebSocket clients.
//!
//! Covered: recovery with `since` across two instances, a publisher racing 100 resubscribes,
//! `recovered: false` (epoch changed, trimmed, expired, more than `max_recovery`), the keys and the
//! `ringhub_publish` function as a backend uses them (and a plain `PUBLISH`, which history channels
//! drop), Redis killed mid-stream with and without persistence, a shard's subscriber link killed
//! (`CLIENT KILL`) while messages flow, a quiet channel's lost tail (after a reconnect, and by the
//! periodic check), holes that cannot be filled (trimmed, more than `max_recovery`) announced with
//! `reset`, and the function library reloaded after `FUNCTION FLUSH` and a restart.
//!
//! Every wait is bounded (10 s socket timeouts, deadlines on polling loops).

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use common::*;
use redis_server::{RedisClient, RedisServer};
use ringhub::auth::namespaces::{Access, NamespaceRules};
use ringhub::config::{Config, RedisConfig};
use ringhub::resp::Frame;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tungstenite::Message;

/// How long hubs get to reconnect once Redis is back (reconnect backoff is capped at 5 s).
const RECOVERY: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

fn history_ns(size: usize) -> NamespaceRules {
    NamespaceRules {
        history_size: Some(size),
        history: Some(Access::Anonymous),
        ..NamespaceRules::default()
    }
}

/// A 2-shard hub in Redis mode whose `h` namespace keeps 1000 messages; waits for `/readyz`.
fn hub(redis: &RedisServer, tweak: impl FnOnce(&mut Config)) -> Hub {
    let cfg = RedisConfig::from_url(&redis.url()).expect("valid Redis URL");
    let hub = Hub::start(|c| {
        c.redis = Some(cfg);
        c.max_publish_rate = 0;
        c.namespaces.named.insert("h".into(), history_ns(1000));
        tweak(c);
    });
    wait_ready(&hub);
    hub
}

fn wait_ready(hub: &Hub) {
    wait_until(RECOVERY, "the hub to become ready", || {
        http(hub.addr, "GET", "/readyz", &[], b"").0 == 200
    });
}

fn instance_of(hub: &Hub) -> String {
    hub.handle.as_ref().unwrap().instance_id().to_owned()
}

fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `POST /publish`; the status.
fn publish(addr: SocketAddr, channel: &str, data: Value) -> u16 {
    let body = json!({"channel": channel, "data": data}).to_string();
    http(addr, "POST", "/publish", &[], body.as_bytes()).0
}

/// Publish `{"n":i}` for every `i` from one WebSocket client, in one write (no ids).
fn publish_ws(c: &mut Client, channel: &str, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        let cmd = json!({"type":"publish","channel":channel,"data":{"n":i}});
        c.ws.write(Message::text(cmd.to_string())).expect("queue");
    }
    c.ws.flush().expect("flush");
}

/// Subscribe (with `since` when given); the `subscribed` reply.
fn subscribe(c: &mut Client, channel: &str, since: Option<(u64, &str)>) -> Value {
    let mut cmd = json!({"type":"subscribe","channel":channel,"id":"s"});
    if let Some((offset, epoch)) = since {
        cmd["since"] = json!({"offset": offset, "epoch": epoch});
    }
    c.send_json(cmd);
    let r = c.recv_json();
    assert_eq!(r["type"], "subscribed", "{r}");
    assert_eq!(r["channel"], channel);
    r
}

fn epoch_of(v: &Value) -> String {
    v["epoch"].as_str().expect("epoch").to_owned()
}

fn offset_of(v: &Value) -> u64 {
    v["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset in {v}"))
}

/// The channel's epoch and top offset from `GET /history` (no messages).
fn top(addr: SocketAddr, channel: &str) -> (String, u64) {
    let (status, body) = http(
        addr,
        "GET",
        &format!("/history?channel={channel}&limit=0"),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    (epoch_of(&v), offset_of(&v))
}

/// Every kept message of `channel` (offset, data) from `GET /history`.
fn history(addr: SocketAddr, channel: &str) -> Vec<(u64, Value)> {
    let (status, body) = http(
        addr,
        "GET",
        &format!("/history?channel={channel}&since=0&limit=100000"),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (offset_of(m), m["data"].clone()))
        .collect()
}

/// Wait until the channel's top offset stops moving and equals `expected` (when given).
fn settled_top(addr: SocketAddr, channel: &str, expected: Option<u64>) -> (String, u64) {
    let mut last = top(addr, channel);
    let deadline = Instant::now() + WAIT;
    loop {
        thread::sleep(Duration::from_millis(100));
        let now = top(addr, channel);
        if now == last && expected.is_none_or(|e| now.1 == e) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the top of {channel} did not settle (at {now:?}, expected {expected:?})"
        );
        last = now;
    }
}

/// Read frames until the message with offset `to`; everything read (messages and resets).
fn read_through(c: &mut Client, to: u64) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let v = c.recv_json();
        let done = v["type"] == "message" && offset_of(&v) >= to;
        out.push(v);
        if done {
            return out;
        }
    }
}

/// Require `frames` to be exactly the messages `from`+1 ..= `to` of `channel`, in order.
fn assert_consecutive(frames: &[Value], channel: &str, from: u64, to: u64, who: &str) {
    let mut expect = from + 1;
    for f in frames {
        assert_eq!(f["type"], "message", "{who}: unexpected frame {f}");
        assert_eq!(f["channel"], channel, "{who}: {f}");
        assert_eq!(
            offset_of(f),
            expect,
            "{who}: expected offset {expect} (from {from} to {to}), got {f}"
        );
        expect += 1;
    }
    assert_eq!(expect, to + 1, "{who}: stopped at {}", expect - 1);
}

/// Ping and require the pong to be the very next frame: nothing else was queued.
fn assert_nothing_more(c: &mut Client, id: &str) {
    c.send_text(&format!(r#"{{"type":"ping","id":"{id}"}}"#));
    let v = c.recv_json();
    assert_eq!(
        v["type"], "pong",
        "expected nothing before the pong, got {v}"
    );
}

/// A thread publishing `{"i":n}` (n = 1, 2, …) with `POST /publish` until stopped, a pause
/// between requests. Joined, it returns every (n, status).
struct Publisher {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<(u64, u16)>>>,
}

impl Publisher {
    fn start(addr: SocketAddr, channel: &'static str, pause: Duration) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut sent = Vec::new();
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                sent.push((n, publish(addr, channel, json!({ "i": n }))));
                thread::sleep(pause);
            }
            sent
        });
        Publisher {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<(u64, u16)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("publisher thread")
    }
}

/// The `id` of the Redis client named `name` (`CLIENT LIST`).
fn client_id(redis: &mut RedisClient, name: &str) -> Option<String> {
    let Frame::Bulk(list) = redis.command(&[b"CLIENT", b"LIST"]) else {
        panic!("CLIENT LIST");
    };
    let list = String::from_utf8_lossy(&list).into_owned();
    list.lines().find_map(|line| {
        let mut id = None;
        let mut named = false;
        for kv in line.split(' ') {
            if let Some(v) = kv.strip_prefix("id=") {
                id = Some(v.to_owned());
            }
            if kv.strip_prefix("name=") == Some(name) {
                named = true;
            }
        }
        id.filter(|_| named)
    })
}

/// `CLIENT KILL ID` the subscriber link of `shard` of the instance.
fn kill_subscriber_link(redis: &mut RedisClient, instance: &str, shard: usize) -> String {
    let name = format!("ringhub-{instance}-{shard}-sub");
    let id = client_id(redis, &name).unwrap_or_else(|| panic!("no Redis client named {name}"));
    assert_eq!(
        redis.command(&[b"CLIENT", b"KILL", b"ID", id.as_bytes()]),
        Frame::Integer(1)
    );
    id
}

/// `FCALL ringhub_publish` as a backend would (history size 1000, 5 min TTL, 24 h meta TTL).
fn fcall_publish(redis: &mut RedisClient, channel: &str, data: &str) -> Frame {
    fcall_publish_sized(redis, channel, data, 1000)
}

fn fcall_publish_sized(redis: &mut RedisClient, channel: &str, data: &str, size: usize) -> Frame {
    let size = size.to_string();
    let stream = format!("ws:{{{channel}}}:stream");
    let meta = format!("ws:{{{channel}}}:meta");
    let chan = format!("ws:{{{channel}}}:pub");
    redis.command(&[
        b"FCALL",
        b"ringhub_publish",
        b"2",
        stream.as_bytes(),
        meta.as_bytes(),
        chan.as_bytes(),
        data.as_bytes(),
        size.as_bytes(),
        b"300000",
        b"86400000",
    ])
}

// ------------------------------------------------------------------------------------------------
// (a) recovery across instances
// ------------------------------------------------------------------------------------------------

#[test]
fn recovery_after_500_missed_across_two_instances_then_live() {
    let redis = RedisServer::start();
    let a = hub(&redis, |_| {});
    let b = hub(&redis, |_| {});
    let ch = "h:a";
    let mut s = Client::connect(a.addr);
    let r = subscribe(&mut s, ch, None);
    assert_eq!(offset_of(&r), 0, "a new channel starts at 0");
    assert!(r.get("recovered").is_none());
    let epoch = epoch_of(&r);
    let mut p = Client::connect(b.addr);
    publish_ws(&mut p, ch, 1..=10);
    let got = read_through(&mut s, 10);
    assert_consecutive(&got, ch, 0, 10, "before the disconnect");
    for f in &got {
        assert_eq!(f["data"]["n"], f["offset"], "{f}");
    }
    drop(s);

    publish_ws(&mut p, ch, 11..=510);
    assert_eq!(settled_top(a.addr, ch, Some(510)).0, epoch);

    // Back on instance A, and another client on instance B, both from offset 10.
    let mut back = [Client::connect(a.addr), Client::connect(b.addr)];
    for (i, c) in back.iter_mut().enumerate() {
        let r = subscribe(c, ch, Some((10, &epoch)));
        assert_eq!(r["recovered"], true, "{r}");
        assert_eq!(offset_of(&r), 510);
        assert_eq!(epoch_of(&r), epoch);
        let got = read_through(c, 510);
        assert_consecutive(&got, ch, 10, 510, &format!("recovered client {i}"));
        for f in &got {
            assert_eq!(f["data"]["n"], f["offset"], "{f}");
        }
    }
    // Then live, without a duplicate.
    publish_ws(&mut p, ch, 511..=515);
    for (i, c) in back.iter_mut().enumerate() {
        let got = read_through(c, 515);
        assert_consecutive(&got, ch, 510, 515, &format!("live client {i}"));
        assert_nothing_more(c, "end");
    }
}

// ------------------------------------------------------------------------------------------------
// (b) a publisher racing the resubscribes
// ------------------------------------------------------------------------------------------------

#[test]
fn racing_publisher_and_100_resubscribes_every_offset_exactly_once() {
    const N: usize = 100;
    let redis = RedisServer::start();
    let a = hub(&redis, |_| {});
    let b = hub(&redis, |_| {});
    let ch = "h:race";
    let publisher = Publisher::start(b.addr, ch, Duration::from_millis(2));

    // Subscribe, read a few messages each (so they leave at different offsets), disconnect.
    let mut left = Vec::with_capacity(N);
    let mut epoch = String::new();
    for i in 0..N {
        let mut c = Client::connect(if i % 2 == 0 { a.addr } else { b.addr });
        let r = subscribe(&mut c, ch, None);
        epoch = epoch_of(&r);
        let from = offset_of(&r);
        let to = from + 1 + (i as u64 % 4);
        let got = read_through(&mut c, to);
        assert_consecutive(&got, ch, from, to, &format!("client {i} before leaving"));
        left.push(to);
    }
    // Reconnect every client with `since` while the publisher keeps going.
    let mut back = Vec::with_capacity(N);
    for (i, &since) in left.iter().enumerate() {
        let mut c = Client::connect(if i % 2 == 0 { b.addr } else { a.addr });
        let r = subscribe(&mut c, ch, Some((since, &epoch)));
        assert_eq!(r["recovered"], true, "client {i}: {r}");
        back.push(c);
    }
    thread::sleep(Duration::from_millis(300));
    let sent = publisher.finish();
    assert!(sent.iter().all(|(_, status)| *status == 200));
    let (_, top) = settled_top(a.addr, ch, Some(sent.len() as u64));
    for (i, c) in back.iter_mut().enumerate() {
        let got = read_through(c, top);
        assert_consecutive(&got, ch, left[i], top, &format!("client {i} after since"));
        assert_nothing_more(c, "end");
    }
}

// ------------------------------------------------------------------------------------------------
// (c) recovered: false, and the names backends use
// ------------------------------------------------------------------------------------------------

#[test]
fn recovered_false_when_epoch_changed_trimmed_expired_or_too_many() {
    let redis = RedisServer::start();
    let a = hub(&redis, |c| {
        c.max_recovery = 20;
        c.namespaces.named.insert("t".into(), history_ns(5));
        let mut short = history_ns(1000);
        short.history_ttl = Some(Duration::from_millis(400));
        c.namespaces.named.insert("x".into(), short);
    });
    let mut redis_client = redis.client();

    // Leave a channel at offset 1 after `extra` more publishes; returns (epoch, the top).
    let leave_behind = |ch: &str, extra: u64| -> (String, u64) {
        let mut c = Client::connect(a.addr);
        let r = subscribe(&mut c, ch, None);
        assert_eq!(publish(a.addr, ch, json!(1)), 200);
        let got = read_through(&mut c, 1);
        assert_consecutive(&got, ch, 0, 1, ch);
        drop(c);
        for i in 0..extra {
            assert_eq!(publish(a.addr, ch, json!(i + 2)), 200);
        }
        let (epoch, top) = settled_top(a.addr, ch, Some(1 + extra));
        assert_eq!(epoch, epoch_of(&r));
        (epoch, top)
    };
    let resubscribe = |ch: &str, since: u64, epoch: &str| -> (Value, Client) {
        let mut c = Client::connect(a.addr);
        let r = subscribe(&mut c, ch, Some((since, epoch)));
        (r, c)
    };

    // The epoch changed: the channel's history was lost (keys deleted) and started again.
    let (old_epoch, _) = leave_behind("h:e", 2);
    let deleted = redis_client.command(&[b"DEL", b"ws:{h:e}:meta", b"ws:{h:e}:stream"]);
    assert_eq!(deleted, Frame::Integer(2));
    assert_eq!(publish(a.addr, "h:e", json!("new")), 200);
    let (r, mut c) = resubscribe("h:e", 3, &old_epoch);
    assert_eq!(r["recovered"], false, "{r}");
    assert_ne!(epoch_of(&r), old_epoch);
    assert_eq!(offset_of(&r), 1);
    assert_nothing_more(&mut c, "epoch");

    // Trimmed: `t` keeps 5 messages; 10 more were published.
    let (epoch, top) = leave_behind("t:1", 10);
    let (r, mut c) = resubscribe("t:1", 1, &epoch);
    assert_eq!((r["recovered"].clone(), offset_of(&r)), (json!(false), top));
    assert_nothing_more(&mut c, "trimmed");
    let (r, mut c) = resubscribe("t:1", top - 5, &epoch);
    assert_eq!(r["recovered"], true, "the 5 kept messages are enough: {r}");
    let got = read_through(&mut c, top);
    assert_consecutive(&got, "t:1", top - 5, top, "trimmed boundary");

    // Expired: `x` keeps messages 400 ms after the last publish.
    let (epoch, top) = leave_behind("x:1", 1);
    thread::sleep(Duration::from_millis(900));
    let (r, mut c) = resubscribe("x:1", 1, &epoch);
    assert_eq!(r["recovered"], false, "{r}");
    assert_eq!(offset_of(&r), top, "the position outlives the messages");
    assert_eq!(epoch_of(&r), epoch);
    assert_nothing_more(&mut c, "expired");

    // More than max_recovery (20) missing; exactly 20 is fine.
    let (epoch, top) = leave_behind("h:m", 24);
    let (r, mut c) = resubscribe("h:m", 1, &epoch);
    assert_eq!(r["recovered"], false, "24 missing: {r}");
    assert_nothing_more(&mut c, "too many");
    let (r, mut c) = resubscribe("h:m", top - 20, &epoch);
    assert_eq!(r["recovered"], true, "20 missing: {r}");
    let got = read_through(&mut c, top);
    assert_consecutive(&got, "h:m", top - 20, top, "max_recovery boundary");
}

#[test]
fn backend_publishes_with_fcall_and_plain_publish_is_dropped() {
    let redis = RedisServer::start();
    let a = hub(&redis, |_| {});
    let mut rc = redis.client();
    let ch = "h:b";
    let mut s = Client::connect(a.addr);
    let r = subscribe(&mut s, ch, None);
    let epoch = epoch_of(&r);
    // The hub subscribes the hash-tagged pub/sub name, not `ws:chan:h:b`.
    assert_eq!(rc.numsub("ws:{h:b}:pub"), 1);
    assert_eq!(rc.numsub("ws:chan:h:b"), 0);

    // A plain PUBLISH reaches the hub (one Redis subscriber) and is dropped: not numbered, not
    // kept.
    assert_eq!(rc.publish("ws:{h:b}:pub", br#"{"plain":1}"#), 1);
    assert_nothing_more(&mut s, "plain");

    // FCALL ringhub_publish: numbered, kept and delivered.
    match fcall_publish(&mut rc, ch, r#"{"backend":1}"#) {
        Frame::Array(v) => {
            assert_eq!(v[0], Frame::Integer(1));
            assert_eq!(v[1], Frame::Bulk(epoch.clone().into_bytes().into()));
        }
        other => panic!("FCALL replied {other:?}"),
    }
    let m = s.recv_json();
    assert_eq!(
        m,
        json!({"type":"message","channel":ch,"offset":1,"data":{"backend":1}})
    );
    // The keys: a stream with entry 0-1, the meta hash, both with TTLs.
    let Frame::Array(meta) = rc.command(&[b"HGETALL", b"ws:{h:b}:meta"]) else {
        panic!("HGETALL");
    };
    let meta: Vec<String> = meta
        .iter()
        .map(|f| match f {
            Frame::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(meta, ["epoch", epoch.as_str(), "top", "1"]);
    let Frame::Array(entries) = rc.command(&[b"XRANGE", b"ws:{h:b}:stream", b"-", b"+"]) else {
        panic!("XRANGE");
    };
    assert_eq!(entries.len(), 1);
    assert!(format!("{:?}", entries[0]).contains("0-1"));
    assert!(rc.pttl("ws:{h:b}:stream") > 0 && rc.pttl("ws:{h:b}:meta") > 0);
    // And a hub publish continues the numbering.
    assert_eq!(publish(a.addr, ch, json!("hub")), 200);
    let m = s.recv_json();
    assert_eq!(offset_of(&m), 2, "{m}");
    assert_nothing_more(&mut s, "end");
}

// ------------------------------------------------------------------------------------------------
// (d) Redis killed mid-stream
// ------------------------------------------------------------------------------------------------

#[test]
fn redis_restart_with_aof_loses_no_accepted_message() {
    let mut redis = RedisServer::start_persistent();
    let a = hub(&redis, |_| {});
    let b = hub(&redis, |_| {});
    let ch = "h:d";
    let mut stay = Client::connect(a.addr);
    let epoch = epoch_of(&subscribe(&mut stay, ch, None));
    let mut gone = Client::connect(b.addr);
    subscribe(&mut gone, ch, None);

    let publisher = Publisher::start(a.addr, ch, Duration::from_millis(1));
    let left = offset_of(read_through(&mut gone, 20).last().unwrap());
    drop(gone);
    thread::sleep(Duration::from_millis(300));
    redis.restart();
    wait_ready(&a);
    wait_ready(&b);
    thread::sleep(Duration::from_millis(500));
    let sent = publisher.finish();
    let refused = sent.iter().filter(|(_, s)| *s != 200).count();
    assert!(refused > 0, "the publisher saw the outage");

    let (e, top) = settled_top(a.addr, ch, None);
    assert_eq!(e, epoch, "the epoch survived the restart (AOF)");
    let kept = history(a.addr, ch);
    assert_eq!(kept.len() as u64, top, "nothing trimmed");
    // What Redis accepted: only messages the hub said 200 to, each once. (Each `POST /publish` is
    // a new connection, possibly to another shard: a publisher of its own, so no order between
    // them is promised.)
    let ok: BTreeSet<u64> = sent
        .iter()
        .filter(|(_, s)| *s == 200)
        .map(|(n, _)| *n)
        .collect();
    let mut seen = BTreeSet::new();
    for (offset, data) in &kept {
        let n = data["i"].as_u64().unwrap();
        assert!(
            ok.contains(&n),
            "offset {offset} holds {n}, which got no 200"
        );
        assert!(seen.insert(n), "{n} kept twice");
    }
    let lost_in_flight = ok.len() - kept.len();
    eprintln!(
        "{} published with 200, {} kept, {} were in flight when Redis died, {refused} refused",
        ok.len(),
        kept.len(),
        lost_in_flight
    );
    assert!(
        lost_in_flight <= 20,
        "{lost_in_flight} accepted publishes lost"
    );

    // The subscriber that stayed saw exactly what Redis kept, no reset.
    let got = read_through(&mut stay, top);
    assert_consecutive(&got, ch, 0, top, "stayed connected");
    for (f, (_, data)) in got.iter().zip(&kept) {
        assert_eq!(&f["data"], data);
    }
    assert_nothing_more(&mut stay, "stay");
    // The one that left recovers everything after where it left.
    let mut back = Client::connect(b.addr);
    let r = subscribe(&mut back, ch, Some((left, &epoch)));
    assert_eq!(r["recovered"], true, "{r}");
    let got = read_through(&mut back, top);
    assert_consecutive(&got, ch, left, top, "reconnected");
}

#[test]
fn redis_restart_without_persistence_resets_never_a_silent_gap() {
    let mut redis = RedisServer::start();
    let a = hub(&redis, |_| {});
    let b = hub(&redis, |_| {});
    let ch = "h:n";
    let mut stay = Client::connect(a.addr);
    let epoch = epoch_of(&subscribe(&mut stay, ch, None));
    let mut gone = Client::connect(b.addr);
    subscribe(&mut gone, ch, None);
    for i in 1..=20 {
        assert_eq!(publish(b.addr, ch, json!(i)), 200);
    }
    assert_consecutive(&read_through(&mut stay, 20), ch, 0, 20, "stay");
    assert_consecutive(&read_through(&mut gone, 20), ch, 0, 20, "gone");
    drop(gone);

    redis.restart();
    wait_ready(&a);
    wait_ready(&b);
    for i in 1..=5 {
        wait_until(WAIT, "a publish to be accepted", || {
            publish(b.addr, ch, json!(100 + i)) == 200
        });
    }
    // The subscriber that stayed is told (reset with the new epoch), then gets the new epoch's
    // messages from 1.
    let reset = stay.recv_json();
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["recovered"], false);
    let new_epoch = epoch_of(&reset);
    assert_ne!(new_epoch, epoch);
    assert_eq!(offset_of(&reset), 0);
    let got = read_through(&mut stay, 5);
    assert_consecutive(&got, ch, 0, 5, "after the reset");
    assert_eq!(got[0]["data"], 101);
    // The one that reconnects with its old position gets recovered: false.
    let mut back = Client::connect(a.addr);
    let r = subscribe(&mut back, ch, Some((20, &epoch)));
    assert_eq!(r["recovered"], false, "{r}");
    assert_eq!(epoch_of(&r), new_epoch);
    assert_eq!(offset_of(&r), 5);
    assert_nothing_more(&mut back, "back");
}

// ------------------------------------------------------------------------------------------------
// (e) a shard's subscriber link killed; lost tails
// ------------------------------------------------------------------------------------------------

#[test]
fn killed_subscriber_link_is_repaired_while_messages_flow() {
    let redis = RedisServer::start();
    let a = hub(&redis, |_| {});
    let b = hub(&redis, |_| {});
    let ch = "h:k";
    let mut subs = clients_on_each_shard(a.addr, 2);
    let mut from = Vec::new();
    for c in subs.iter_mut() {
        from.push(offset_of(&subscribe(c, ch, None)));
    }
    let publisher = Publisher::start(b.addr, ch, Duration::from_millis(1));
    thread::sleep(Duration::from_millis(300));
    let mut rc = redis.client();
    let instance = instance_of(&a);
    let old = kill_subscriber_link(&mut rc, &instance, 0);
    thread::sleep(Duration::from_millis(700));
    let sent = publisher.finish();
    assert!(sent.iter().all(|(_, s)| *s == 200));
    let (_, top) = settled_top(a.addr, ch, Some(sent.len() as u64));
    for (shard, c) in subs.iter_mut().enumerate() {
        let got = read_through(c, top);
        assert_consecutive(&got, ch, from[shard], top, &format!("shard {shard}"));
        assert_nothing_more(c, "end");
    }
    let new = client_id(&mut rc, &format!("ringhub-{instance}-0-sub")).expect("reconnected");
    assert_ne!(new, old);
    let repaired = metric(a.addr, "ringhub_history_repaired_total{shard=\"0\"}");
    assert!(repaired > 0, "shard 0 repaired its stream");
    assert_eq!(
        metric(a.addr, "ringhub_history_repaired_total{shard=\"1\"}"),
        0,
        "shard 1's link was never down"
    );
}

#[test]
fn a_quiet_channels_tail_lost_during_a_reconnect_is_delivered() {
    let redis = RedisServer::start();
    let a = hub(&redis, |_| {});
    let ch = "h:q";
    let mut s = Client::connect(a.addr);
    subscribe(&mut s, ch, None);
    let mut rc = redis.client();
    // The link is killed and the message published before it can come back (≥ 50 ms backoff).
    kill_subscriber_link(&mut rc, &instance_of(&a), s.shard());
    assert!(matches!(
        fcall_publish(&mut rc, ch, "\"tail\""),
        Frame::Array(_)
    ));
    let m = s.recv_json();
    assert_eq!(
        m,
        json!({"type":"message","channel":ch,"offset":1,"data":"tail"})
    );
    assert_nothing_more(&mut s, "end");
    assert_eq!(metric(a.addr, "ringhub_history_repaired_total"), 1);
}

#[test]
fn unrepairable_gaps_are_announced_with_reset() {
    let redis = RedisServer::start();
    let a = hub(&redis, |c| {
        c.max_recovery = 20;
        c.namespaces.named.insert("t".into(), history_ns(5));
    });
    let instance = instance_of(&a);
    let mut rc = redis.client();

    // Trimmed: 12 messages while the link is down, `t` keeps the last 5.
    let mut s = Client::connect(a.addr);
    let epoch = epoch_of(&subscribe(&mut s, "t:g", None));
    kill_subscriber_link(&mut rc, &instance, s.shard());
    for i in 1..=12 {
        assert!(matches!(
            fcall_publish_sized(&mut rc, "t:g", &i.to_string(), 5),
            Frame::Array(_)
        ));
    }
    let reset = s.recv_json();
    assert_eq!(
        reset,
        json!({"type":"reset","channel":"t:g","recovered":false,"epoch":epoch,"offset":7})
    );
    assert_consecutive(&read_through(&mut s, 12), "t:g", 7, 12, "after the reset");
    assert_nothing_more(&mut s, "trimmed");

    // Too many: `h` keeps them all, but 30 > max_recovery (20) are not fetched.
    let mut s = Client::connect(a.addr);
    let epoch = epoch_of(&subscribe(&mut s, "h:g", None));
    kill_subscriber_link(&mut rc, &instance, s.shard());
    for i in 1..=30 {
        assert!(matches!(
            fcall_publish(&mut rc, "h:g", &i.to_string()),
            Frame::Array(_)
        ));
    }
    let reset = s.recv_json();
    assert_eq!(
        reset,
        json!({"type":"reset","channel":"h:g","recovered":false,"epoch":epoch,"offset":30})
    );
    assert_eq!(publish(a.addr, "h:g", json!(31)), 200);
    assert_consecutive(&read_through(&mut s, 31), "h:g", 30, 31, "after the reset");
    assert_nothing_more(&mut s, "too many");
    assert_eq!(metric(a.addr, "ringhub_history_repaired_total"), 5);
    assert_eq!(metric(a.addr, "ringhub_history_resets_total"), 2);
}

#[test]
fn the_periodic_check_delivers_a_message_whose_publish_was_lost() {
    let redis = RedisServer::start();
    let a = hub(&redis, |_| {});
    let ch = "h:p";
    let mut s = Client::connect(a.addr);
    subscribe(&mut s, ch, None);
    assert_eq!(publish(a.addr, ch, json!(1)), 200);
    assert_consecutive(&read_through(&mut s, 1), ch, 0, 1, "live");
    // Number and keep a message without publishing it (as if the PUBLISH was lost).
    let mut rc = redis.client();
    assert_eq!(
        rc.command(&[b"HINCRBY", b"ws:{h:p}:meta", b"top", b"1"]),
        Frame::Integer(2)
    );
    assert!(matches!(
        rc.command(&[b"XADD", b"ws:{h:p}:stream", b"0-2", b"d", b"\"lost\""]),
        Frame::Bulk(_)
    ));
    let started = Instant::now();
    let m = s.recv_json();
    assert_eq!(
        m,
        json!({"type":"message","channel":ch,"offset":2,"data":"lost"})
    );
    eprintln!("repaired after {:?}", started.elapsed());
    assert_eq!(metric(a.addr, "ringhub_history_repaired_total"), 1);
    // The next live message continues the stream.
    assert_eq!(publish(a.addr, ch, json!(3)), 200);
    assert_consecutive(&read_through(&mut s, 3), ch, 2, 3, "after the repair");
}

// ------------------------------------------------------------------------------------------------
// (f) the function library comes back
// ------------------------------------------------------------------------------------------------

#[test]
fn functions_are_reloaded_after_flush_and_after_a_restart_without_persistence() {
    let mut redis = RedisServer::start();
    let a = hub(&redis, |_| {});
    let ch = "h:f";
    let mut s = Client::connect(a.addr);
    let epoch = epoch_of(&subscribe(&mut s, ch, None));
    let mut p = Client::connect(a.addr);
    publish_ws(&mut p, ch, 1..=50);
    assert_consecutive(&read_through(&mut s, 50), ch, 0, 50, "before the flush");

    // FUNCTION FLUSH, then 100 publishes in one write: the refused ones are re-sent after a
    // reload, in order; none is lost or duplicated.
    let mut rc = redis.client();
    let loads = rc.command_calls("function|load");
    assert_eq!(
        rc.command(&[b"FUNCTION", b"FLUSH"]),
        Frame::Simple("OK".into())
    );
    publish_ws(&mut p, ch, 51..=150);
    let got = read_through(&mut s, 150);
    assert_consecutive(&got, ch, 50, 150, "after the flush");
    for f in &got {
        assert_eq!(f["data"]["n"], f["offset"], "publish order: {f}");
    }
    let reloads = rc.command_calls("function|load");
    assert_eq!(reloads, loads + 1, "one reload by the publisher link");
    // A flush in the middle of a burst.
    publish_ws(&mut p, ch, 151..=250);
    rc.command(&[b"FUNCTION", b"FLUSH"]);
    publish_ws(&mut p, ch, 251..=350);
    let got = read_through(&mut s, 350);
    assert_consecutive(&got, ch, 150, 350, "flush mid-burst");
    for f in &got {
        assert_eq!(f["data"]["n"], f["offset"], "publish order: {f}");
    }
    assert!(rc.command_calls("function|load") > reloads);
    // Reads reload it too.
    let loads = rc.command_calls("function|load");
    rc.command(&[b"FUNCTION", b"FLUSH"]);
    let mut late = Client::connect(a.addr);
    let r = subscribe(&mut late, ch, Some((340, &epoch)));
    assert_eq!(r["recovered"], true, "{r}");
    assert_consecutive(
        &read_through(&mut late, 350),
        ch,
        340,
        350,
        "read after a flush",
    );
    assert_eq!(
        rc.command_calls("function|load"),
        loads + 1,
        "reloaded by the reader"
    );
    let Frame::Array(libs) = rc.command(&[b"FUNCTION", b"LIST", b"LIBRARYNAME", b"ringhub"]) else {
        panic!("FUNCTION LIST");
    };
    assert_eq!(libs.len(), 1, "the library is loaded again");

    // A restart without persistence: the links reconnect and load the library.
    redis.restart();
    wait_ready(&a);
    wait_until(WAIT, "a publish to be accepted", || {
        publish(a.addr, ch, json!({"n": 1})) == 200
    });
    let reset = s.recv_json();
    assert_eq!(reset["type"], "reset", "{reset}");
    let m = s.recv_json();
    assert_eq!(
        (m["type"].clone(), offset_of(&m)),
        (json!("message"), 1),
        "{m}"
    );
    assert_nothing_more(&mut s, "end");
}

// Regression tests from the review of the repair: a hole that cannot be filled (a frame of a
// foreign epoch; a new epoch's head that Redis no longer keeps) must not stall the channel
// (it used to loop the repair, then overflow the stack once 10,000 messages were held).

#[test]
fn a_frame_of_a_foreign_epoch_does_not_stall_the_channel() {
    let redis = RedisServer::start();
    let a = hub(&redis, |_| {});
    let ch = "h:f";
    let mut s = Client::connect(a.addr);
    subscribe(&mut s, ch, None);
    for i in 1..=3 {
        assert_eq!(publish(a.addr, ch, json!(i)), 200);
    }
    assert_consecutive(&read_through(&mut s, 3), ch, 0, 3, "before");
    let mut rc = redis.client();
    // One framed payload whose epoch is not the channel's (a replayed/forged/old-epoch frame).
    rc.publish("ws:{h:f}:pub", b"@5:0000bogus:{}");
    let before = rc.command_calls("fcall");
    // A legit publish after it.
    assert_eq!(publish(a.addr, ch, json!(4)), 200);
    thread::sleep(Duration::from_millis(1500));
    let after = rc.command_calls("fcall");
    eprintln!("FCALLs in 1.5 s after the stale frame: {}", after - before);
    s.ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let got = s.ws.read();
    eprintln!("next frame for the subscriber: {got:?}");
    assert!(
        got.is_ok(),
        "offset 4 was never delivered: the channel is stalled"
    );
}

#[test]
fn an_unrepairable_new_epoch_head_does_not_loop_the_repair() {
    let redis = RedisServer::start();
    let a = hub(&redis, |c| {
        c.namespaces.named.insert("h".into(), history_ns(1));
    });
    let ch = "h:s";
    let mut s = Client::connect(a.addr);
    subscribe(&mut s, ch, None);
    for i in 1..=3 {
        assert_eq!(publish(a.addr, ch, json!(i)), 200);
    }
    assert_consecutive(&read_through(&mut s, 3), ch, 0, 3, "before");
    let mut rc = redis.client();
    // The epoch is lost (as after a restart without persistence) ...
    rc.command(&[b"DEL", b"ws:{h:s}:meta", b"ws:{h:s}:stream"]);
    // ... and this shard misses the new epoch's first message (published while its
    // subscriber link was down: simulated by a pub/sub channel nobody listens to).
    let r = rc.command(&[
        b"FCALL",
        b"ringhub_publish",
        b"2",
        b"ws:{h:s}:stream",
        b"ws:{h:s}:meta",
        b"nobody",
        b"1",
        b"1",
        b"300000",
        b"86400000",
    ]);
    eprintln!("missed publish: {r:?}");
    let before = rc.command_calls("fcall");
    assert_eq!(publish(a.addr, ch, json!(2)), 200);
    thread::sleep(Duration::from_millis(1500));
    eprintln!("FCALLs in 1.5 s: {}", rc.command_calls("fcall") - before);
    s.ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(4)))
        .unwrap();
    let got = s.ws.read();
    eprintln!("next frame: {got:?}");
    assert!(got.is_ok(), "offset 2 of the new epoch never delivered");
}
