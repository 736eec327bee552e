//! History and recovery in embedded mode: a real hub (`ringhub::server::start` on 127.0.0.1:0,
//! several shards), real WebSocket clients. Offsets, epochs, recovery with `since` (complete and
//! not), the seam between history and live messages under a racing publisher, `reset` on a lost
//! epoch, the `history` command and `GET /history`.

mod common;

use common::{http, metric, Client, Hub};
use ringhub::auth::namespaces::{Access, NamespaceRules};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A hub whose `h` namespace keeps `size` messages.
fn history_hub(
    shards: usize,
    size: usize,
    tweak: impl FnOnce(&mut ringhub::config::Config),
) -> Hub {
    Hub::start(|c| {
        c.shards = shards;
        c.max_publish_rate = 0;
        c.namespaces.named.insert(
            "h".into(),
            NamespaceRules {
                history_size: Some(size),
                history: Some(Access::Anonymous),
                ..NamespaceRules::default()
            },
        );
        c.namespaces
            .named
            .insert("plain".into(), NamespaceRules::default());
        tweak(c);
    })
}

fn publish(addr: SocketAddr, channel: &str, data: Value) {
    let body = json!({"channel": channel, "data": data}).to_string();
    let (status, resp) = http(addr, "POST", "/publish", &[], body.as_bytes());
    assert_eq!(status, 200, "{resp}");
}

/// Subscribe (optionally with `since`) and return the `subscribed` reply.
fn subscribe(c: &mut Client, channel: &str, since: Option<(u64, &str)>) -> Value {
    let mut cmd = json!({"type":"subscribe","channel":channel,"id":"s"});
    if let Some((offset, epoch)) = since {
        cmd["since"] = json!({"offset": offset, "epoch": epoch});
    }
    c.send_json(cmd);
    let r = c.recv_json();
    assert_eq!(r["type"], "subscribed", "{r}");
    assert_eq!(r["id"], "s");
    r
}

/// Read `n` messages of `channel`; return their (offset, data).
fn read_messages(c: &mut Client, channel: &str, n: usize) -> Vec<(u64, Value)> {
    (0..n)
        .map(|_| {
            let m = c.recv_json();
            assert_eq!(m["type"], "message", "{m}");
            assert_eq!(m["channel"], channel);
            (m["offset"].as_u64().expect("offset"), m["data"].clone())
        })
        .collect()
}

#[test]
fn offsets_and_recovery_after_a_disconnect() {
    let hub = history_hub(2, 1000, |_| {});
    // Subscribers on both shards; the publisher publishes over HTTP (any shard).
    let mut subs = common::clients_on_each_shard(hub.addr, 2);
    let mut epoch = String::new();
    for c in subs.iter_mut() {
        let r = subscribe(c, "h:room", None);
        assert_eq!(r["offset"], 0, "a new channel starts at 0");
        assert!(r.get("recovered").is_none(), "no since, no recovered");
        epoch = r["epoch"].as_str().unwrap().to_string();
    }
    for i in 1..=10 {
        publish(hub.addr, "h:room", json!(i));
    }
    for c in subs.iter_mut() {
        let got = read_messages(c, "h:room", 10);
        let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
        assert_eq!(got[0].1, json!(1));
    }
    // Disconnect one, publish 500, reconnect with since = 10 on each shard.
    drop(subs);
    for i in 11..=510 {
        publish(hub.addr, "h:room", json!(i));
    }
    for shard in 0..2 {
        let mut c = common::client_on_shard(hub.addr, shard);
        let r = subscribe(&mut c, "h:room", Some((10, &epoch)));
        assert_eq!(r["recovered"], true, "{r}");
        assert_eq!(r["epoch"], epoch.as_str());
        let top = 510 + shard as u64;
        assert_eq!(r["offset"], top);
        let got = read_messages(&mut c, "h:room", top as usize - 10);
        for (i, (offset, data)) in got.iter().enumerate() {
            assert_eq!(*offset, 11 + i as u64);
            assert_eq!(*data, json!(11 + i as u64));
        }
        // Then live, no duplicate.
        publish(hub.addr, "h:room", json!(511 + shard));
        let live = read_messages(&mut c, "h:room", 1);
        assert_eq!(live[0].0, 511 + shard as u64);
    }
    assert!(metric(hub.addr, "ringhub_recoveries_complete_total") >= 2);
    assert!(metric(hub.addr, "ringhub_messages_recovered_total") >= 1000);
    // Non-history channels are unchanged: no offset.
    let mut c = Client::connect(hub.addr);
    c.subscribe("plain:x");
    publish(hub.addr, "plain:x", json!(1));
    let m = c.recv_json();
    assert!(m.get("offset").is_none(), "{m}");
}

#[test]
fn a_racing_publisher_never_causes_a_gap_or_a_duplicate() {
    let hub = history_hub(2, 100_000, |c| c.max_recovery = 100_000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A publisher on its own WebSocket connection, publishing as fast as acks come back.
    let addr = hub.addr;
    let s = stop.clone();
    let publisher = std::thread::spawn(move || {
        let mut p = Client::connect(addr);
        let mut n = 0u64;
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
            n += 1;
            p.send_json(json!({"type":"publish","channel":"h:race","data":n,"id":n}));
            std::thread::sleep(Duration::from_micros(500));
            loop {
                let v = p.recv_json();
                if v["type"] == "published" {
                    break;
                }
                assert_ne!(v["type"], "error", "{v}");
            }
        }
        n
    });
    // 100 clients: subscribe, read a little, drop, resubscribe with since, read on.
    let mut clients: Vec<(Client, String, u64, Vec<u64>)> = (0..100)
        .map(|_| {
            let mut c = Client::connect(hub.addr);
            let r = subscribe(&mut c, "h:race", None);
            let epoch = r["epoch"].as_str().unwrap().to_string();
            let top = r["offset"].as_u64().unwrap();
            (c, epoch, top, Vec::new())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for (c, epoch, top, seen) in clients.iter_mut() {
        // Read a few live messages, then reconnect with since = the last one seen.
        for (o, _) in read_messages(c, "h:race", 3) {
            seen.push(o);
        }
        let last = *seen.last().unwrap();
        let mut fresh = Client::connect(hub.addr);
        let r = subscribe(&mut fresh, "h:race", Some((last, epoch)));
        assert_eq!(r["recovered"], true, "{r}");
        *c = fresh;
        *top = r["offset"].as_u64().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let published = publisher.join().unwrap();
    for (i, (c, _, _, seen)) in clients.iter_mut().enumerate() {
        let first = seen[0];
        let want = (published - seen.last().unwrap()) as usize;
        for (o, _) in read_messages(c, "h:race", want) {
            seen.push(o);
        }
        let expected: Vec<u64> = (first..=published).collect();
        assert_eq!(*seen, expected, "client {i}: every offset once, in order");
    }
}

#[test]
fn recovered_false_cases() {
    let hub = history_hub(2, 10, |c| {
        c.max_recovery = 5;
        c.namespaces.named.insert(
            "short".into(),
            NamespaceRules {
                history_size: Some(100),
                history_ttl: Some(Duration::from_secs(1)),
                ..NamespaceRules::default()
            },
        );
    });
    let mut c = Client::connect(hub.addr);
    let r = subscribe(&mut c, "h:t", None);
    let epoch = r["epoch"].as_str().unwrap().to_string();
    drop(c);
    for i in 1..=20 {
        publish(hub.addr, "h:t", json!(i));
    }
    let check = |since: (u64, &str), why: &str| {
        let mut c = Client::connect(hub.addr);
        let r = subscribe(&mut c, "h:t", Some(since));
        assert_eq!(r["recovered"], false, "{why}: {r}");
        assert_eq!(r["epoch"], epoch.as_str(), "{why}");
        assert_eq!(r["offset"], 20, "{why}");
        // No backlog: the next message is live.
        publish(hub.addr, "h:other-unrelated", json!(0));
        c.send_json(json!({"type":"ping","id":"p"}));
        assert_eq!(
            c.recv_json()["type"],
            "pong",
            "{why}: no backlog before the pong"
        );
    };
    check((19, "another-epoch"), "epoch changed");
    check((5, &epoch), "trimmed past the offset (10 kept)");
    check((12, &epoch), "more than max_recovery (8 > 5)");
    check((25, &epoch), "ahead of the channel");
    // Within max_recovery and kept: recovered.
    let mut c = Client::connect(hub.addr);
    let r = subscribe(&mut c, "h:t", Some((16, &epoch)));
    assert_eq!(r["recovered"], true, "{r}");
    let got = read_messages(&mut c, "h:t", 4);
    assert_eq!(
        got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        [17, 18, 19, 20]
    );

    // Expired by history_ttl.
    let mut c = Client::connect(hub.addr);
    let r = subscribe(&mut c, "short:x", None);
    let e = r["epoch"].as_str().unwrap().to_string();
    drop(c);
    publish(hub.addr, "short:x", json!(1));
    publish(hub.addr, "short:x", json!(2));
    std::thread::sleep(Duration::from_millis(1300));
    let mut c = Client::connect(hub.addr);
    let r = subscribe(&mut c, "short:x", Some((1, &e)));
    assert_eq!(r["recovered"], false, "expired: {r}");
    assert_eq!(r["offset"], 2);
    assert!(metric(hub.addr, "ringhub_recoveries_reset_total") >= 5);
}

#[test]
fn a_lost_epoch_resets_live_subscribers() {
    let hub = history_hub(2, 10, |c| {
        c.namespaces.named.insert(
            "brief".into(),
            NamespaceRules {
                history_size: Some(10),
                history_meta_ttl: Some(Duration::from_secs(1)),
                ..NamespaceRules::default()
            },
        );
    });
    let mut subs = common::clients_on_each_shard(hub.addr, 2);
    let mut epoch = Value::Null;
    for c in subs.iter_mut() {
        epoch = subscribe(c, "brief:x", None)["epoch"].clone();
    }
    publish(hub.addr, "brief:x", json!(1));
    for c in subs.iter_mut() {
        assert_eq!(read_messages(c, "brief:x", 1)[0].0, 1);
    }
    // Silent for longer than the meta TTL: the position is forgotten, a new epoch starts.
    std::thread::sleep(Duration::from_millis(2500));
    publish(hub.addr, "brief:x", json!(2));
    for c in subs.iter_mut() {
        let reset = c.recv_json();
        assert_eq!(reset["type"], "reset", "{reset}");
        assert_eq!(reset["recovered"], false);
        assert_eq!(reset["channel"], "brief:x");
        assert_ne!(reset["epoch"], epoch);
        assert_eq!(reset["offset"], 0);
        let m = read_messages(c, "brief:x", 1);
        assert_eq!(m[0], (1, json!(2)));
    }
}

#[test]
fn history_command_and_http() {
    let hub = history_hub(2, 100, |c| {
        c.namespaces.named.insert(
            "subs".into(),
            NamespaceRules {
                history_size: Some(100),
                ..NamespaceRules::default()
            },
        );
    });
    for i in 1..=5 {
        publish(hub.addr, "h:log", json!({"n": i}));
    }
    let mut c = Client::connect(hub.addr);
    c.send_json(json!({"type":"history","channel":"h:log","since":2,"limit":2,"id":7}));
    let r = c.recv_json();
    assert_eq!(r["type"], "history", "{r}");
    assert_eq!(r["id"], 7);
    assert_eq!(r["offset"], 5);
    assert_eq!(
        r["messages"],
        json!([{"offset":3,"data":{"n":3}},{"offset":4,"data":{"n":4}}])
    );
    // All kept messages without since.
    c.send_json(json!({"type":"history","channel":"h:log","id":8}));
    assert_eq!(c.recv_json()["messages"].as_array().unwrap().len(), 5);
    // Default rule `subscribers`: a non-subscriber is refused, a subscriber is not.
    publish(hub.addr, "subs:a", json!(1));
    c.send_json(json!({"type":"history","channel":"subs:a","id":9}));
    let e = c.recv_json();
    assert_eq!(e["code"], "permission_denied", "{e}");
    subscribe(&mut c, "subs:a", None);
    c.send_json(json!({"type":"history","channel":"subs:a","id":10}));
    assert_eq!(c.recv_json()["messages"], json!([{"offset":1,"data":1}]));
    // A channel without history.
    c.send_json(json!({"type":"history","channel":"plain:a","id":11}));
    assert_eq!(c.recv_json()["code"], "bad_request");

    let (status, body) = http(hub.addr, "GET", "/history?channel=h:log&since=3", &[], b"");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["channel"], "h:log");
    assert_eq!(v["offset"], 5);
    assert!(v["epoch"].is_string());
    assert_eq!(
        v["messages"],
        json!([{"offset":4,"data":{"n":4}},{"offset":5,"data":{"n":5}}])
    );
    let (status, _) = http(hub.addr, "GET", "/history?channel=plain:a", &[], b"");
    assert_eq!(status, 404);
    let (status, _) = http(hub.addr, "GET", "/history?since=1", &[], b"");
    assert_eq!(status, 400);
    let (status, _) = http(hub.addr, "GET", "/history?channel=h:log&since=x", &[], b"");
    assert_eq!(status, 400);
    assert!(metric(hub.addr, "ringhub_history_reads_total") >= 4);

    // With an API key, GET /history needs it.
    let hub = history_hub(1, 10, |c| c.api_key = Some("k".into()));
    let (status, _) = http(hub.addr, "GET", "/history?channel=h:log", &[], b"");
    assert_eq!(status, 401);
    let (status, _) = http(
        hub.addr,
        "GET",
        "/history?channel=h:log",
        &[("Authorization", "Bearer k")],
        b"",
    );
    assert_eq!(status, 200);
}

#[test]
fn every_shard_sees_the_same_offsets() {
    let hub = history_hub(3, 1000, |_| {});
    let mut subs = common::clients_on_each_shard(hub.addr, 3);
    for c in subs.iter_mut() {
        subscribe(c, "h:order", None);
    }
    // Publishers on every shard at once.
    let mut pubs = common::clients_on_each_shard(hub.addr, 3);
    for round in 0..50 {
        for (i, p) in pubs.iter_mut().enumerate() {
            p.send_json(
                json!({"type":"publish","channel":"h:order","data":format!("{i}-{round}")}),
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut orders: Vec<HashMap<u64, Value>> = Vec::new();
    for c in subs.iter_mut() {
        let got = read_messages(c, "h:order", 150);
        let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, (1..=150).collect::<Vec<_>>());
        orders.push(got.into_iter().collect());
    }
    assert!(Instant::now() < deadline);
    assert_eq!(
        orders[0], orders[1],
        "same data at the same offset on every shard"
    );
    assert_eq!(orders[1], orders[2]);
    drop(pubs);
}
