//! Redis mode against real `redis-server` processes: every test starts its own server on a free
//! port (see `common/redis_server.rs`; a missing `redis-server` fails the test) and one or two
//! 2-shard hubs pointed at it.
//!
//! Covered: cross-instance delivery and per-publisher order, messages published by a backend
//! straight into Redis, lazy subscriptions as Redis itself sees them (`PUBSUB NUMSUB` /
//! `PUBSUB CHANNELS`), the held `subscribed` ack (a client that publishes right after its ack gets
//! its own message), Redis dying and coming back on the same port, `/metrics`, and the links
//! staying up while idle.
//!
//! Every wait is bounded (10 s socket timeouts, explicit deadlines on polling loops) and no test
//! asserts an upper bound on speed: conditions that settle asynchronously are polled.

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use common::*;
use redis_server::RedisServer;
use ringhub::config::{Config, RedisConfig};
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tungstenite::Message;

/// How long the hubs get to reconnect once Redis is back (reconnect backoff is capped at 5 s).
const RECOVERY: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// Start a 2-shard hub in Redis mode and wait until `/readyz` says both links of every shard are
/// up (before that, subscribes are not yet sent to Redis and publishes are refused).
fn redis_hub(redis: &RedisServer, tweak: impl FnOnce(&mut Config)) -> Hub {
    let cfg = RedisConfig::from_url(&redis.url()).expect("valid Redis URL");
    let hub = Hub::start(|c| {
        c.redis = Some(cfg);
        tweak(c);
    });
    wait_until(WAIT, "the hub to become ready", || readyz(hub.addr) == 200);
    hub
}

fn instance_of(hub: &Hub) -> String {
    hub.handle.as_ref().unwrap().instance_id().to_owned()
}

/// `GET /readyz` status.
fn readyz(addr: SocketAddr) -> u16 {
    http(addr, "GET", "/readyz", &[], b"").0
}

/// Poll `cond` every 20 ms until it holds; fail after `timeout`.
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

/// Require `cond` to hold at every check during `period`.
fn holds_for(period: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + period;
    while Instant::now() < end {
        assert!(cond(), "{what} stopped holding");
        thread::sleep(Duration::from_millis(25));
    }
}

/// The next text frame, or `None` if none arrives before `deadline`.
fn recv_text_by(c: &mut Client, deadline: Instant) -> Option<String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let sock = c.ws.get_mut();
        sock.set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .unwrap();
        let res = c.ws.read();
        c.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
        match res {
            Ok(Message::Text(t)) => return Some(t.as_str().to_owned()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(other) => panic!("expected a text message, got {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                continue
            }
            Err(e) => panic!("read a message: {e}"),
        }
    }
}

/// Ping with a string id and require the very next reply to be that pong: the connection works
/// and nothing else was queued in front of the pong.
fn assert_alive(c: &mut Client, id: &str) {
    c.send_text(&format!(r#"{{"type":"ping","id":"{id}"}}"#));
    assert_eq!(
        c.recv_text(),
        format!(r#"{{"type":"pong","id":"{id}"}}"#),
        "expected only the pong for ping {id:?}"
    );
}

/// Queue several text frames and send them with one flush (one write, no waiting in between).
fn send_pipelined(c: &mut Client, texts: &[String]) {
    for t in texts {
        c.ws.write(Message::text(t.as_str()))
            .expect("queue a frame");
    }
    c.ws.flush().expect("flush frames");
}

/// The exact text of a delivered message (`data` is JSON text).
fn message(channel: &str, data: &str) -> String {
    format!(r#"{{"type":"message","channel":"{channel}","data":{data}}}"#)
}

fn publish_cmd(channel: &str, data: &str, id: Option<&str>) -> String {
    match id {
        Some(id) => {
            format!(r#"{{"type":"publish","channel":"{channel}","data":{data},"id":{id}}}"#)
        }
        None => format!(r#"{{"type":"publish","channel":"{channel}","data":{data}}}"#),
    }
}

fn subscribe_cmd(channel: &str, id: &str) -> String {
    format!(r#"{{"type":"subscribe","channel":"{channel}","id":{id}}}"#)
}

fn ack(kind: &str, channel: &str, id: &str) -> String {
    format!(r#"{{"type":"{kind}","channel":"{channel}","id":{id}}}"#)
}

/// Join a reader thread, re-raising its panic (with its message) in the test thread.
fn join<T>(h: JoinHandle<T>) -> T {
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

// ------------------------------------------------------------------------------------------------
// 1. Cross-instance delivery
// ------------------------------------------------------------------------------------------------

#[test]
fn cross_instance_delivery_both_directions() {
    let redis = RedisServer::start();
    let hub_a = redis_hub(&redis, |_| {});
    let hub_b = redis_hub(&redis, |_| {});
    let (inst_a, inst_b) = (instance_of(&hub_a), instance_of(&hub_b));
    assert_ne!(inst_a, inst_b, "each hub has its own instance id");

    // Subscribers on both shards of both hubs.
    let mut subs = clients_on_each_shard(hub_a.addr, 2);
    subs.extend(clients_on_each_shard(hub_b.addr, 2));
    for (i, s) in subs.iter_mut().enumerate() {
        let want = if i < 2 { &inst_a } else { &inst_b };
        assert_eq!(&s.instance, want, "welcome of subscriber {i}");
        s.subscribe("news");
    }
    let mut pub_a = Client::connect(hub_a.addr);
    let mut pub_b = Client::connect(hub_b.addr);
    assert_eq!(pub_a.instance, inst_a);
    assert_eq!(pub_b.instance, inst_b);
    assert_ne!(pub_a.instance, pub_b.instance, "welcome instance differs");

    // Both publishers, interleaved; neither is subscribed, so only acks come back to them.
    const N: usize = 25;
    for seq in 0..N {
        for (p, from) in [(&mut pub_a, "a"), (&mut pub_b, "b")] {
            let other = p.publish_acked("news", json!({"from": from, "seq": seq}));
            assert!(other.is_empty(), "publisher got {other:?}");
        }
    }
    let expected = |from: &str| -> Vec<String> {
        (0..N)
            .map(|seq| message("news", &format!(r#"{{"from":"{from}","seq":{seq}}}"#)))
            .collect()
    };
    for (i, s) in subs.iter_mut().enumerate() {
        let got: Vec<String> = (0..2 * N).map(|_| s.recv_text()).collect();
        for from in ["a", "b"] {
            let mine: Vec<String> = got
                .iter()
                .filter(|t| t.contains(&format!(r#""from":"{from}""#)))
                .cloned()
                .collect();
            assert_eq!(
                mine,
                expected(from),
                "subscriber {i} (shard {} of {}): messages of publisher {from}, in order",
                s.shard(),
                s.instance
            );
        }
        // Exactly 2N: nothing more (no duplicates) before the pong.
        assert_alive(s, "end");
    }
}

// ------------------------------------------------------------------------------------------------
// 2. Per-publisher order over 10,000 messages across instances
// ------------------------------------------------------------------------------------------------

#[test]
fn per_publisher_order_over_10k_messages_across_instances() {
    const N: usize = 10_000;
    let redis = RedisServer::start();
    let big = |c: &mut Config| {
        c.max_queued_bytes = 64 << 20;
        // One connection publishes 10,000 messages at full speed: no publish rate limit.
        c.max_publish_rate = 0;
    };
    let hub_a = redis_hub(&redis, big);
    let hub_b = redis_hub(&redis, big);

    let mut subs = clients_on_each_shard(hub_b.addr, 2);
    subs.push(Client::connect(hub_a.addr));
    for s in &mut subs {
        s.subscribe("order");
    }
    let readers: Vec<JoinHandle<Client>> = subs
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            thread::spawn(move || {
                for seq in 0..N {
                    let text = c.recv_text();
                    if text != message("order", &seq.to_string()) {
                        panic!(
                            "subscriber {i} (instance {}, shard {}): message {seq} is {text}",
                            c.instance,
                            c.shard()
                        );
                    }
                }
                c
            })
        })
        .collect();

    // Publish without ids (no replies), flushing periodically.
    let mut p = Client::connect(hub_a.addr);
    for seq in 0..N {
        p.ws.write(Message::text(publish_cmd("order", &seq.to_string(), None)))
            .expect("queue a publish");
        if seq % 100 == 99 {
            p.ws.flush().expect("flush publishes");
        }
    }
    p.ws.flush().expect("flush publishes");

    for r in readers {
        let mut c = join(r);
        // Exactly N: nothing else (no duplicate) is queued in front of the pong.
        assert_alive(&mut c, "after-10k");
    }
    assert_alive(&mut p, "publisher");
}

// ------------------------------------------------------------------------------------------------
// 3. A backend publishing straight into Redis
// ------------------------------------------------------------------------------------------------

#[test]
fn backend_publish_through_redis_reaches_websocket_subscribers() {
    let redis = RedisServer::start();
    let hub_a = redis_hub(&redis, |_| {});
    let hub_b = redis_hub(&redis, |_| {});
    let mut subs = clients_on_each_shard(hub_a.addr, 2);
    subs.extend(clients_on_each_shard(hub_b.addr, 2));
    for s in &mut subs {
        s.subscribe("news");
    }
    let mut rc = redis.client();

    // Valid JSON travels verbatim. One Redis subscriber per shard (acks wait for Redis).
    let receivers = rc.publish("ws:chan:news", br#"{"headline":"x"}"#);
    assert_eq!(receivers, 4, "PUBLISH reached one subscription per shard");
    for s in &mut subs {
        assert_eq!(
            s.recv_text(),
            r#"{"type":"message","channel":"news","data":{"headline":"x"}}"#
        );
    }
    // Surrounding JSON whitespace is trimmed, the value kept as sent.
    rc.publish("ws:chan:news", b" \t[1, 2]\r\n");
    for s in &mut subs {
        assert_eq!(s.recv_text(), message("news", "[1, 2]"));
    }

    // Anything that is not one JSON value arrives as a JSON string: never as broken JSON.
    let payloads: [&[u8]; 6] = [
        b"not json",
        b"a \"quoted\" \\ backslash and invalid UTF-8: \xff\xfe\xc3 end",
        b"{\"a\":\"\xc3\"}",
        b"{\"unterminated\":",
        b"1 2",
        b"",
    ];
    for payload in payloads {
        rc.publish("ws:chan:news", payload);
        let want = String::from_utf8_lossy(payload).into_owned();
        for s in &mut subs {
            let text = s.recv_text();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("server sent invalid JSON {text:?}: {e}"));
            assert_eq!(v["type"], "message", "{text}");
            assert_eq!(v["channel"], "news", "{text}");
            assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
            assert_eq!(
                v["data"],
                Value::String(want.clone()),
                "payload {payload:?} must arrive as a JSON string: {text}"
            );
        }
    }
    for s in &mut subs {
        assert_alive(s, "end");
    }
}

// ------------------------------------------------------------------------------------------------
// 4. Lazy subscriptions, as Redis sees them
// ------------------------------------------------------------------------------------------------

#[test]
fn redis_subscriptions_are_lazy_and_one_per_shard() {
    let redis = RedisServer::start();
    let hub_a = redis_hub(&redis, |_| {});
    let hub_b = redis_hub(&redis, |_| {});
    let mut rc = redis.client();

    // Connected but not subscribed: nothing in Redis.
    let _idle = (Client::connect(hub_a.addr), Client::connect(hub_b.addr));
    assert!(
        rc.pubsub_channels("ws:chan:*").is_empty(),
        "no Redis subscription before any client subscribes"
    );

    // Both shards of A, one shard of B, plus a second client on an already-subscribed shard.
    let numsub_is = |rc: &mut redis_server::RedisClient, ch: &str, n: i64| rc.numsub(ch) == n;
    for round in ["unsubscribe", "disconnect"] {
        let mut subs = clients_on_each_shard(hub_a.addr, 2);
        subs.push(Client::connect(hub_b.addr));
        let first_shard = subs[0].shard();
        subs.push(client_on_shard(hub_a.addr, first_shard));
        for s in &mut subs {
            s.subscribe("news");
        }
        wait_until(WAIT, "NUMSUB ws:chan:news == 3", || {
            numsub_is(&mut rc, "ws:chan:news", 3)
        });
        holds_for(
            Duration::from_millis(300),
            &format!("NUMSUB ws:chan:news == 3 ({round} round)"),
            || numsub_is(&mut rc, "ws:chan:news", 3),
        );
        assert_eq!(rc.pubsub_channels("ws:chan:*"), ["ws:chan:news"]);

        if round == "unsubscribe" {
            for s in &mut subs {
                s.send_text(r#"{"type":"unsubscribe","channel":"news","id":"u"}"#);
                assert_eq!(
                    s.recv_text(),
                    r#"{"type":"unsubscribed","channel":"news","id":"u"}"#
                );
            }
            for s in &mut subs {
                assert_alive(s, "still-connected");
            }
        } else {
            // Just drop the sockets: no unsubscribe, no close frame.
            drop(subs);
        }
        wait_until(WAIT, &format!("NUMSUB 0 after {round}"), || {
            numsub_is(&mut rc, "ws:chan:news", 0)
        });
        wait_until(
            WAIT,
            &format!("no ws:chan:* channels after {round}"),
            || rc.pubsub_channels("ws:chan:*").is_empty(),
        );
    }

    // Churn: 500 subscribe/unsubscribe pairs and a final subscribe, pipelined in one write.
    let mut churner = Client::connect(hub_a.addr);
    let mut frames = Vec::new();
    let mut want = Vec::new();
    for i in 0..500 {
        frames.push(subscribe_cmd("churn", &(2 * i).to_string()));
        frames.push(format!(
            r#"{{"type":"unsubscribe","channel":"churn","id":{}}}"#,
            2 * i + 1
        ));
        want.push(ack("subscribed", "churn", &(2 * i).to_string()));
        want.push(ack("unsubscribed", "churn", &(2 * i + 1).to_string()));
    }
    frames.push(subscribe_cmd("churn", r#""final""#));
    want.push(ack("subscribed", "churn", r#""final""#));
    send_pipelined(&mut churner, &frames);
    for (n, w) in want.iter().enumerate() {
        let deadline = Instant::now() + WAIT;
        let got = recv_text_by(&mut churner, deadline).unwrap_or_else(|| {
            panic!(
                "churn: no reply {n} of {} within {WAIT:?} (expected {w})",
                want.len()
            )
        });
        assert_eq!(&got, w, "churn reply {n}");
    }
    wait_until(WAIT, "NUMSUB ws:chan:churn == 1", || {
        numsub_is(&mut rc, "ws:chan:churn", 1)
    });
    holds_for(
        Duration::from_millis(500),
        "NUMSUB ws:chan:churn == 1 after churn",
        || numsub_is(&mut rc, "ws:chan:churn", 1),
    );
    // The surviving subscription works (published from the other instance).
    let mut p = Client::connect(hub_b.addr);
    p.publish_acked("churn", json!("after-churn"));
    assert_eq!(churner.recv_text(), message("churn", r#""after-churn""#));
    churner.send_text(r#"{"type":"unsubscribe","channel":"churn"}"#);
    assert_eq!(
        churner.recv_text(),
        r#"{"type":"unsubscribed","channel":"churn"}"#
    );
    wait_until(WAIT, "NUMSUB ws:chan:churn == 0 after unsubscribe", || {
        numsub_is(&mut rc, "ws:chan:churn", 0)
    });
    wait_until(WAIT, "no ws:chan:* channels at the end", || {
        rc.pubsub_channels("ws:chan:*").is_empty()
    });
}

// ------------------------------------------------------------------------------------------------
// 5. Subscribe, then publish: the ack means the subscription is live in Redis
// ------------------------------------------------------------------------------------------------

/// Read the three replies to a subscribe + publish (both with ids) on a fresh channel: the
/// `subscribed` ack must come first; then the `published` ack and the message, in either order.
fn expect_sub_pub_replies(c: &mut Client, channel: &str, data: &str, sid: &str, pid: &str) {
    assert_eq!(c.recv_text(), ack("subscribed", channel, sid));
    let mut got = [c.recv_text(), c.recv_text()];
    got.sort();
    let mut want = [message(channel, data), ack("published", channel, pid)];
    want.sort();
    assert_eq!(
        got, want,
        "after subscribing to {channel} the client must receive its own message"
    );
}

#[test]
fn subscribe_then_publish_receives_own_message() {
    let redis = RedisServer::start();
    let hubs = [redis_hub(&redis, |_| {}), redis_hub(&redis, |_| {})];
    for (h, hub) in hubs.iter().enumerate() {
        let mut clients = clients_on_each_shard(hub.addr, 2);
        // Wait for the ack, then publish at once.
        for i in 0..50 {
            let c = &mut clients[i % 2];
            let channel = format!("stp-{h}-{i}");
            let data = format!(r#"{{"i":{i}}}"#);
            c.send_text(&subscribe_cmd(&channel, "1"));
            assert_eq!(c.recv_text(), ack("subscribed", &channel, "1"));
            c.send_text(&publish_cmd(&channel, &data, Some("2")));
            let mut got = [c.recv_text(), c.recv_text()];
            got.sort();
            let mut want = [message(&channel, &data), ack("published", &channel, "2")];
            want.sort();
            assert_eq!(got, want, "hub {h}, iteration {i}");
        }
        // Pipelined: subscribe and publish in the same write, without waiting for the ack.
        for i in 0..50 {
            let c = &mut clients[i % 2];
            let channel = format!("pipe-{h}-{i}");
            let data = format!("[{i}]");
            send_pipelined(
                c,
                &[
                    subscribe_cmd(&channel, r#""s""#),
                    publish_cmd(&channel, &data, Some(r#""p""#)),
                ],
            );
            expect_sub_pub_replies(c, &channel, &data, r#""s""#, r#""p""#);
        }
        for c in &mut clients {
            assert_alive(c, "end");
        }
    }
}

/// Lua: keep Redis busy for ARGV[1] ms, then publish ARGV[3] messages of ARGV[2] bytes (a JSON
/// string) on KEYS[1], all in one go.
const BUSY_THEN_BACKLOG: &str = r#"
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local until_us = now_us() + tonumber(ARGV[1]) * 1000
while now_us() < until_us do end
local payload = '"' .. string.rep('x', tonumber(ARGV[2]) - 2) .. '"'
for i = 1, tonumber(ARGV[3]) do redis.call('PUBLISH', KEYS[1], payload) end
return tonumber(ARGV[3])
"#;

/// Commands pipelined behind a held `subscribe` run once its ack is released, also when the
/// release happens while the connection task is blocked writing to a full socket.
///
/// Set-up (deterministic): the client is subscribed to `busy` and stops reading. A Lua script
/// keeps Redis busy for a second and then publishes a 16 MB backlog on `busy`. Meanwhile the
/// client pipelines `subscribe x` + `publish x`: the hub holds the ack (and the publish), and its
/// SUBSCRIBE waits in Redis behind the script, so the confirmation comes after the backlog. The
/// backlog fills the client's socket, so the connection task is blocked in a write when the
/// confirmation releases the ack. Then the client reads everything: it must get the `subscribed`
/// ack, the `published` ack and its own message without sending anything more.
#[test]
fn commands_behind_a_held_subscribe_run_when_the_ack_is_released_during_a_write() {
    const BACKLOG: usize = 256;
    const SIZE: usize = 64_000;
    let redis = RedisServer::start();
    let hub = redis_hub(&redis, |c| {
        c.max_queued_bytes = 64 << 20;
        // No server ping during the test: the client's automatic pong would wake a stuck task.
        c.ping_interval = Duration::from_secs(60);
        c.idle_timeout = Duration::from_secs(120);
    });
    let mut c = Client::connect(hub.addr);
    c.subscribe("busy");

    let port = redis.port();
    let backend = thread::spawn(move || {
        let mut rc = redis_server::RedisClient::connect(port);
        rc.command(&[
            b"EVAL",
            BUSY_THEN_BACKLOG.as_bytes(),
            b"1",
            b"ws:chan:busy",
            b"1000",
            SIZE.to_string().as_bytes(),
            BACKLOG.to_string().as_bytes(),
        ])
    });
    // Redis is inside the script by now (were it not, the scenario would only be milder).
    thread::sleep(Duration::from_millis(300));
    send_pipelined(
        &mut c,
        &[
            subscribe_cmd("x", "1"),
            publish_cmd("x", r#""own""#, Some("2")),
        ],
    );
    let reply = join(backend);
    assert_eq!(
        reply,
        ringhub::resp::Frame::Integer(BACKLOG as i64),
        "the script ran"
    );
    // Let the hub take in the backlog and the confirmation while the client is not reading.
    thread::sleep(Duration::from_millis(500));

    let busy = message("busy", &format!(r#""{}""#, "x".repeat(SIZE - 2)));
    let (sub_ack, pub_ack, own) = (
        ack("subscribed", "x", "1"),
        ack("published", "x", "2"),
        message("x", r#""own""#),
    );
    let (mut n_busy, mut got_sub, mut got_pub, mut got_own) = (0, false, false, false);
    let deadline = Instant::now() + WAIT;
    while n_busy < BACKLOG || !(got_sub && got_pub && got_own) {
        let Some(t) = recv_text_by(&mut c, deadline) else {
            panic!(
                "within {WAIT:?}: {n_busy}/{BACKLOG} backlog messages, subscribed={got_sub} \
                 published={got_pub} own message={got_own}: the publish pipelined behind the \
                 held subscribe was never processed"
            );
        };
        if t == busy {
            n_busy += 1;
        } else if t == sub_ack {
            assert!(!got_sub, "a second subscribed ack");
            got_sub = true;
        } else if t == pub_ack || t == own {
            assert!(got_sub, "{t} before the subscribed ack");
            got_pub |= t == pub_ack;
            got_own |= t == own;
        } else {
            panic!("unexpected {}", &t[..t.len().min(200)]);
        }
    }
    assert_alive(&mut c, "end");
}

// ------------------------------------------------------------------------------------------------
// 6. Redis dies and comes back on the same port
// ------------------------------------------------------------------------------------------------

#[test]
fn redis_restart_on_same_port_recovers_without_client_reconnects() {
    let mut redis = RedisServer::start();
    let hubs = [redis_hub(&redis, |_| {}), redis_hub(&redis, |_| {})];
    let mut subs = clients_on_each_shard(hubs[0].addr, 2);
    subs.extend(clients_on_each_shard(hubs[1].addr, 2));
    for s in &mut subs {
        s.subscribe("live");
    }
    let mut p = Client::connect(hubs[0].addr);
    // Baseline: it works before the outage.
    p.publish_acked("live", json!("before"));
    for s in &mut subs {
        assert_eq!(s.recv_text(), message("live", r#""before""#));
    }

    redis.kill();

    for hub in &hubs {
        wait_until(WAIT, "/readyz 503 while Redis is down", || {
            readyz(hub.addr) == 503
        });
    }
    // Clients stay connected and served.
    for s in &mut subs {
        assert_alive(s, "during-outage");
    }
    assert_alive(&mut p, "during-outage");

    // A publish with an id is refused with `unavailable` (poll: every link notices on its own).
    let mut k = 0;
    wait_until(WAIT, "a publish to be refused with unavailable", || {
        k += 1;
        p.send_text(&publish_cmd("live", r#""outage""#, Some(&k.to_string())));
        let reply: Value = serde_json::from_str(&p.recv_text()).unwrap();
        match reply["type"].as_str() {
            Some("published") => false,
            Some("error") => {
                assert_eq!(reply["code"], "unavailable", "{reply}");
                assert_eq!(reply["id"], k, "{reply}");
                true
            }
            _ => panic!("unexpected reply {reply}"),
        }
    });
    p.send_text(&publish_cmd("live", r#""outage""#, Some(r#""again""#)));
    let reply: Value = serde_json::from_str(&p.recv_text()).unwrap();
    assert_eq!(
        (&reply["type"], &reply["code"], &reply["id"]),
        (&json!("error"), &json!("unavailable"), &json!("again")),
        "{reply}"
    );

    // POST /publish: 503 with an `unavailable` error body, on whichever shard takes it.
    let post = |addr| {
        http(
            addr,
            "POST",
            "/publish",
            &[("Content-Type", "application/json")],
            br#"{"channel":"live","data":"via-http"}"#,
        )
    };
    for hub in &hubs {
        wait_until(WAIT, "POST /publish 503 while Redis is down", || {
            post(hub.addr).0 == 503
        });
        for _ in 0..5 {
            let (status, body) = post(hub.addr);
            assert_eq!(status, 503, "POST /publish during the outage: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["code"], "unavailable", "{body}");
        }
    }

    // Back on the same port.
    redis.revive();
    for hub in &hubs {
        wait_until(RECOVERY, "/readyz 200 after Redis is back", || {
            readyz(hub.addr) == 200
        });
    }

    // Messages flow again everywhere, with the same connections. Subscribers report the first
    // probe they see, then expect seq 0..19 in order (probes still in flight are skipped).
    let (seen_tx, seen_rx) = mpsc::channel::<usize>();
    let readers: Vec<JoinHandle<Client>> = subs
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let seen_tx = seen_tx.clone();
            thread::spawn(move || {
                let deadline = Instant::now() + RECOVERY + WAIT;
                let mut next = 0;
                let mut probed = false;
                while next < 20 {
                    let t = recv_text_by(&mut c, deadline).unwrap_or_else(|| {
                        panic!(
                            "subscriber {i} (instance {}, shard {}): probed={probed}, \
                             got seq up to {next} before the deadline",
                            c.instance,
                            c.shard()
                        )
                    });
                    if t.starts_with(r#"{"type":"message","channel":"live","data":{"probe":"#) {
                        if !probed {
                            probed = true;
                            seen_tx.send(i).unwrap();
                        }
                        continue;
                    }
                    assert_eq!(
                        t,
                        message("live", &format!(r#"{{"seq":{next}}}"#)),
                        "subscriber {i} after the restart"
                    );
                    next += 1;
                }
                c
            })
        })
        .collect();
    drop(seen_tx);
    let mut seen = vec![false; readers.len()];
    let deadline = Instant::now() + RECOVERY;
    let mut probe = 0;
    while !seen.iter().all(|s| *s) {
        assert!(
            Instant::now() < deadline,
            "subscribers that saw no probe within {RECOVERY:?} after Redis came back: {:?}",
            seen.iter()
                .enumerate()
                .filter(|(_, s)| !**s)
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        );
        probe += 1;
        p.send_text(&publish_cmd(
            "live",
            &format!(r#"{{"probe":{probe}}}"#),
            Some("0"),
        ));
        let reply = p.recv_text();
        assert!(reply.contains(r#""type":"published""#), "probe: {reply}");
        thread::sleep(Duration::from_millis(200));
        while let Ok(i) = seen_rx.try_recv() {
            seen[i] = true;
        }
    }
    for seq in 0..20 {
        p.publish_acked("live", json!({"seq": seq}));
    }
    let mut subs: Vec<Client> = readers.into_iter().map(join).collect();

    // One Redis subscription per shard with subscribers (2 hubs x 2 shards).
    let mut rc = redis.client();
    wait_until(WAIT, "NUMSUB ws:chan:live == 4 after the restart", || {
        rc.numsub("ws:chan:live") == 4
    });
    assert_eq!(rc.pubsub_channels("ws:chan:*"), ["ws:chan:live"]);
    for s in &mut subs {
        assert_alive(s, "end");
    }
}

// ------------------------------------------------------------------------------------------------
// 7. Metrics
// ------------------------------------------------------------------------------------------------

#[test]
fn metrics_count_messages_received_from_redis() {
    let redis = RedisServer::start();
    let hub_a = redis_hub(&redis, |_| {});
    let hub_b = redis_hub(&redis, |_| {});
    let series = "ringhub_bus_messages_received_total";
    assert_eq!(metric(hub_a.addr, series), 0, "nothing received yet");

    // Subscribers on both shards of A and on one shard of B.
    let mut subs = clients_on_each_shard(hub_a.addr, 2);
    subs.push(Client::connect(hub_b.addr));
    let b_shard = subs[2].shard();
    for s in &mut subs {
        s.subscribe("metered");
    }
    const N: u64 = 7;
    let mut p = Client::connect(hub_b.addr);
    for i in 0..N {
        p.publish_acked("metered", json!(i));
    }
    for s in &mut subs {
        for i in 0..N {
            assert_eq!(s.recv_text(), message("metered", &i.to_string()));
        }
    }
    // Every shard with a subscriber received each message from Redis once.
    let a_total = metric(hub_a.addr, series);
    assert!(a_total > 0, "{series} on hub A is 0 after deliveries");
    assert_eq!(a_total, 2 * N, "{series} on hub A (2 subscribed shards)");
    for shard in 0..2 {
        assert_eq!(
            metric(hub_a.addr, &format!("{series}{{shard=\"{shard}\"}}")),
            N
        );
    }
    assert_eq!(metric(hub_b.addr, series), N, "{series} on hub B");
    assert_eq!(
        metric(hub_b.addr, &format!("{series}{{shard=\"{b_shard}\"}}")),
        N
    );
    assert_eq!(metric(hub_b.addr, "ringhub_messages_published_total"), N);
}

// ------------------------------------------------------------------------------------------------
// 8. Idle links stay up
// ------------------------------------------------------------------------------------------------

/// Links ping Redis when idle; a healthy Redis answers, so an idle hub must keep its connections
/// (and stay ready). A subscriber link with no subscriptions gets `+PONG` (not the pub/sub
/// `["pong", ""]` form), which must count as an answer too.
#[test]
fn idle_links_stay_connected() {
    let redis = RedisServer::start();
    let mut rc = redis.client();
    let hub = redis_hub(&redis, |_| {});
    // 2 shards x (publisher + subscriber) + the registry + this client.
    wait_until(WAIT, "the hub's 5 Redis connections", || {
        rc.info_int("clients", "connected_clients") == 6
    });
    let accepted = rc.info_int("stats", "total_connections_received");

    // PING_INTERVAL (5 s) + PING_TIMEOUT (10 s) + one timer period, with margin.
    let mut not_ready = 0;
    let end = Instant::now() + Duration::from_secs(22);
    while Instant::now() < end {
        if readyz(hub.addr) != 200 {
            not_ready += 1;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let reconnects = rc.info_int("stats", "total_connections_received") - accepted;
    assert_eq!(
        reconnects, 0,
        "the idle hub reconnected to Redis {reconnects} times in 22 s (it was not ready at \
         {not_ready} checks of /readyz)"
    );
    assert_eq!(not_ready, 0, "/readyz was not 200 at {not_ready} checks");
}
