//! Wire-level integration tests of protocol v1 and the HTTP API against a real 2-shard hub:
//! exact reply texts, error replies, cross-shard delivery and ordering, unsubscribe, slow
//! consumers, keepalive, graceful shutdown and the HTTP endpoints.
//!
//! Every wait is bounded (10 s socket read timeouts, explicit deadlines on loops) and no test
//! asserts an upper bound on speed.

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::Message;

// ------------------------------------------------------------------------------------------------
// Helpers (local to this file)
// ------------------------------------------------------------------------------------------------

/// Send `text` and return the next text frame.
fn roundtrip(c: &mut Client, text: &str) -> String {
    c.send_text(text);
    c.recv_text()
}

/// Ping with a string id and require the very next reply to be that pong: proves the
/// connection still works and that nothing else was queued in front of the pong.
fn assert_alive(c: &mut Client, id: &str) {
    let reply = roundtrip(c, &format!(r#"{{"type":"ping","id":"{id}"}}"#));
    assert_eq!(
        reply,
        format!(r#"{{"type":"pong","id":"{id}"}}"#),
        "expected only the pong for ping {id:?}"
    );
}

/// `GET /metrics` text.
fn metrics(addr: SocketAddr) -> String {
    let (status, body) = http(addr, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// Poll `/metrics` until `series` has the value `want` (or fail after WAIT).
fn wait_metric(addr: SocketAddr, series: &str, want: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = metrics(addr);
        let got = series_value(&text, series);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {got}, expected {want} within {WAIT:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The next text frame from a raw (hand-upgraded) socket, parsed from `buf` plus what is read.
/// Pings are skipped; any other non-text frame fails the test.
fn raw_next_text(s: &mut TcpStream, buf: &mut bytes::BytesMut) -> String {
    use ringhub::codec::{decode_server_frame, Control, Data, OpCode};
    let deadline = Instant::now() + WAIT;
    loop {
        while let Some((op, fin, payload)) = decode_server_frame(buf).expect("valid server frame") {
            match op {
                OpCode::Data(Data::Text) => {
                    assert!(fin, "unexpected fragmented server message");
                    return String::from_utf8(payload.to_vec()).expect("UTF-8 text frame");
                }
                OpCode::Control(Control::Ping) => continue,
                other => panic!("expected a text frame, got {other:?} {payload:?}"),
            }
        }
        assert!(Instant::now() < deadline, "no text frame within {WAIT:?}");
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => panic!("connection ended while waiting for a text frame"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// One HTTP response read from a keep-alive connection: (status, head, body). The body is read
/// by its Content-Length.
fn read_http_response(s: &mut TcpStream) -> (u16, String, String) {
    let head = read_http_head(s);
    assert!(
        head.ends_with("\r\n\r\n"),
        "incomplete response head {head:?}"
    );
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response head {head:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("read HTTP body");
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// Send a complete raw HTTP request (which should say `Connection: close`) and return
/// (status, head, body).
fn http_raw(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = raw(addr);
    s.write_all(request).expect("write request");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read HTTP response");
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("bad HTTP response {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP status line {text:?}"));
    (status, head.to_owned(), body.to_owned())
}

/// Assert an HTTP JSON error body `{"ok":false,"error":{"code":..,"message":..}}`.
fn assert_http_error(body: &str, code: &str) {
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("error body {body:?}: {e}"));
    assert_eq!(v["ok"], false, "{body}");
    assert_eq!(v["error"]["code"], code, "{body}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn publish_text(channel: &str, data: &str, id: Option<&str>) -> String {
    match id {
        Some(id) => {
            format!(r#"{{"type":"publish","channel":"{channel}","data":{data},"id":{id}}}"#)
        }
        None => format!(r#"{{"type":"publish","channel":"{channel}","data":{data}}}"#),
    }
}

// ------------------------------------------------------------------------------------------------
// 1. Replies byte for byte
// ------------------------------------------------------------------------------------------------

#[test]
fn replies_are_exact_text() {
    let hub = Hub::start(|_| {});
    let instance = hub.handle.as_ref().unwrap().instance_id().to_owned();

    // The welcome, exactly.
    {
        let stream = TcpStream::connect(hub.addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (mut ws, resp) = tungstenite::client(hub.url(), stream).expect("upgrade");
        assert_eq!(resp.status(), 101);
        let text = match ws.read().expect("welcome") {
            Message::Text(t) => t.as_str().to_owned(),
            other => panic!("expected the welcome, got {other:?}"),
        };
        let v: Value = serde_json::from_str(&text).expect("welcome is JSON");
        let conn = v["connection"].as_str().expect("connection id");
        assert_eq!(
            text,
            format!(r#"{{"type":"welcome","connection":"{conn}","instance":"{instance}"}}"#)
        );
        assert!(conn.starts_with(&format!("{instance}-")), "{conn}");
    }

    let mut c = Client::connect(hub.addr);
    let cases: &[(&str, &str)] = &[
        (
            r#"{"type":"subscribe","channel":"news","id":1}"#,
            r#"{"type":"subscribed","channel":"news","id":1}"#,
        ),
        // Subscribing twice is not an error: acknowledged again.
        (
            r#"{"type":"subscribe","channel":"news","id":"again"}"#,
            r#"{"type":"subscribed","channel":"news","id":"again"}"#,
        ),
        (
            r#"{"type":"subscribe","channel":"a-Z_0.9:/@#"}"#,
            r#"{"type":"subscribed","channel":"a-Z_0.9:/@#"}"#,
        ),
        // Field order does not matter; unknown fields are ignored.
        (
            r#"{"id":9,"extra":[1,{"x":null}],"channel":"sport","type":"subscribe"}"#,
            r#"{"type":"subscribed","channel":"sport","id":9}"#,
        ),
        (r#"{"type":"ping","id":4}"#, r#"{"type":"pong","id":4}"#),
        (
            r#"{"type":"ping","id":"p-4"}"#,
            r#"{"type":"pong","id":"p-4"}"#,
        ),
        (r#"{"type":"ping"}"#, r#"{"type":"pong"}"#),
        (r#"{"type":"ping","id":null}"#, r#"{"type":"pong"}"#),
        // Ids are echoed verbatim (source text, not re-encoded).
        (
            r#"{"type":"ping","id":1.50}"#,
            r#"{"type":"pong","id":1.50}"#,
        ),
        (
            r#"{"type":"ping","id":-7e3}"#,
            r#"{"type":"pong","id":-7e3}"#,
        ),
        (
            r#"{"type":"ping","id":"q\"\u00e9\n"}"#,
            r#"{"type":"pong","id":"q\"\u00e9\n"}"#,
        ),
        // Unsubscribing a channel never subscribed is acknowledged.
        (
            r#"{"type":"unsubscribe","channel":"never-subscribed","id":"u"}"#,
            r#"{"type":"unsubscribed","channel":"never-subscribed","id":"u"}"#,
        ),
        (
            r#"{"type":"unsubscribe","channel":"sport"}"#,
            r#"{"type":"unsubscribed","channel":"sport"}"#,
        ),
        // Publish with an id on a channel nobody listens to: only the ack.
        (
            r#"{"type":"publish","channel":"nobody","data":1,"id":3}"#,
            r#"{"type":"published","channel":"nobody","id":3}"#,
        ),
        (
            r#"{"type":"publish","channel":"nobody","data":null,"id":"p3"}"#,
            r#"{"type":"published","channel":"nobody","id":"p3"}"#,
        ),
    ];
    for (req, want) in cases {
        assert_eq!(roundtrip(&mut c, req), *want, "reply to {req}");
    }

    // Publish without id gets no reply: the client is not subscribed to "nobody", so the next
    // frame can only be the pong of the following ping.
    c.send_text(&publish_text("nobody", r#"{"x":1}"#, None));
    assert_alive(&mut c, "after-unacked-publish");

    // The subscriber receives its own publish (data carried as its exact text), plus the ack.
    let data = r#"{"k":[1,2.50,"x"],"e":{},"n":null}"#;
    c.send_text(&publish_text("news", data, Some("3")));
    let mut got = [c.recv_text(), c.recv_text()];
    got.sort();
    let mut want = [
        format!(r#"{{"type":"message","channel":"news","data":{data}}}"#),
        r#"{"type":"published","channel":"news","id":3}"#.to_owned(),
    ];
    want.sort();
    assert_eq!(got, want);

    // Own publish without id: the message, and no ack before the pong.
    c.send_text(&publish_text("news", "[true,false]", None));
    assert_eq!(
        c.recv_text(),
        r#"{"type":"message","channel":"news","data":[true,false]}"#
    );
    assert_alive(&mut c, "after-own-publish");

    // Unsubscribe, then the own publish only gets its ack.
    assert_eq!(
        roundtrip(&mut c, r#"{"type":"unsubscribe","channel":"news","id":2}"#),
        r#"{"type":"unsubscribed","channel":"news","id":2}"#
    );
    assert_eq!(
        roundtrip(&mut c, &publish_text("news", "5", Some(r#""after""#))),
        r#"{"type":"published","channel":"news","id":"after"}"#
    );
    assert_alive(&mut c, "end");
}

// ------------------------------------------------------------------------------------------------
// 2. Error replies
// ------------------------------------------------------------------------------------------------

/// Send `req`, require an error reply with `code` and exactly the id text `id` (or no id key),
/// then require the connection to still answer a ping.
fn expect_error(c: &mut Client, req: &str, id: Option<&str>, code: &str) {
    let reply = roundtrip(c, req);
    let prefix = match id {
        Some(id) => format!(r#"{{"type":"error","id":{id},"code":"{code}","message":""#),
        None => format!(r#"{{"type":"error","code":"{code}","message":""#),
    };
    assert!(
        reply.starts_with(&prefix),
        "reply to {req:?}: {reply}\nexpected it to start with {prefix}"
    );
    let v: Value = serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply}: {e}"));
    let keys = v.as_object().unwrap().len();
    assert_eq!(keys, if id.is_some() { 4 } else { 3 }, "{reply}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    assert_alive(c, "still-alive");
}

#[test]
fn error_replies_keep_connection_usable() {
    let hub = Hub::start(|c| c.max_subscriptions = 3);
    let mut c = Client::connect(hub.addr);
    let mut counts: HashMap<&str, u64> = HashMap::new();

    let bad: &[(&str, Option<&str>)] = &[
        ("hello", None),
        ("", None),
        ("[1,2]", None),
        ("42", None),
        (r#"{"type":"ping""#, None),
        (r#"{"type":"ping","id":1,"id":2}"#, None),
        // An id that is neither a number nor a string is not echoed.
        (r#"{"type":"ping","id":true}"#, None),
        (r#"{"type":"ping","id":{"a":1}}"#, None),
        (r#"{"type":"dance","id":7}"#, Some("7")),
        (r#"{"type":7,"id":"t"}"#, Some(r#""t""#)),
        (r#"{"channel":"news","id":"no-type"}"#, Some(r#""no-type""#)),
        (r#"{"type":"subscribe","id":8}"#, Some("8")),
        (r#"{"type":"unsubscribe","id":"m"}"#, Some(r#""m""#)),
        (r#"{"type":"publish","data":1,"id":10}"#, Some("10")),
        (r#"{"type":"subscribe","channel":42,"id":11}"#, Some("11")),
        (
            r#"{"type":"subscribe","channel":null,"id":11.5}"#,
            Some("11.5"),
        ),
        (r#"{"type":"publish","channel":"news","id":12}"#, Some("12")),
    ];
    for (req, id) in bad {
        expect_error(&mut c, req, *id, "bad_request");
        *counts.entry("bad_request").or_default() += 1;
    }

    let long = "a".repeat(257);
    let invalid_names: Vec<&str> = vec!["a b", &long, "", "café", "😀", "a+b", "tab\there", "a\"b"];
    for name in &invalid_names {
        let ch = serde_json::to_string(name).unwrap();
        let reqs = [
            (
                format!(r#"{{"type":"subscribe","channel":{ch},"id":21}}"#),
                "21",
            ),
            (
                format!(r#"{{"type":"unsubscribe","channel":{ch},"id":"u-22"}}"#),
                r#""u-22""#,
            ),
            (
                format!(r#"{{"type":"publish","channel":{ch},"data":{{"a":1}},"id":"p-23"}}"#),
                r#""p-23""#,
            ),
        ];
        for (req, id) in &reqs {
            expect_error(&mut c, req, Some(id), "invalid_channel");
            *counts.entry("invalid_channel").or_default() += 1;
        }
        // Without an id the error has no id key.
        let req = format!(r#"{{"type":"subscribe","channel":{ch}}}"#);
        expect_error(&mut c, &req, None, "invalid_channel");
        *counts.entry("invalid_channel").or_default() += 1;
    }

    // A 256-byte name is valid; it is one of the three allowed subscriptions.
    let max_name = "m".repeat(256);
    for ch in ["one", "two", max_name.as_str()] {
        assert_eq!(
            roundtrip(
                &mut c,
                &format!(r#"{{"type":"subscribe","channel":"{ch}","id":1}}"#)
            ),
            format!(r#"{{"type":"subscribed","channel":"{ch}","id":1}}"#)
        );
    }
    expect_error(
        &mut c,
        r#"{"type":"subscribe","channel":"four","id":"s4"}"#,
        Some(r#""s4""#),
        "too_many_subscriptions",
    );
    *counts.entry("too_many_subscriptions").or_default() += 1;
    // Re-subscribing an existing channel at the limit is still acknowledged.
    assert_eq!(
        roundtrip(&mut c, r#"{"type":"subscribe","channel":"one","id":5}"#),
        r#"{"type":"subscribed","channel":"one","id":5}"#
    );
    // Freeing a slot makes room again.
    assert_eq!(
        roundtrip(&mut c, r#"{"type":"unsubscribe","channel":"two","id":6}"#),
        r#"{"type":"unsubscribed","channel":"two","id":6}"#
    );
    assert_eq!(
        roundtrip(&mut c, r#"{"type":"subscribe","channel":"four","id":7}"#),
        r#"{"type":"subscribed","channel":"four","id":7}"#
    );
    expect_error(
        &mut c,
        r#"{"type":"subscribe","channel":"five","id":8}"#,
        Some("8"),
        "too_many_subscriptions",
    );
    *counts.entry("too_many_subscriptions").or_default() += 1;
    // The limit is per connection: another client subscribes freely.
    let mut other = Client::connect(hub.addr);
    for ch in ["five", "six", "seven"] {
        other.subscribe(ch);
    }

    // Every error reply was counted, by code.
    let text = metrics(hub.addr);
    for code in ["bad_request", "invalid_channel", "too_many_subscriptions"] {
        assert_eq!(
            series_value(&text, &format!(r#"ringhub_errors_total{{code="{code}"}}"#)),
            counts[code],
            "errors counted for {code}"
        );
    }
    assert_eq!(
        series_value(&text, r#"ringhub_errors_total{code="message_too_large"}"#),
        0
    );
}

// ------------------------------------------------------------------------------------------------
// 3. Delivery across shards
// ------------------------------------------------------------------------------------------------

#[test]
fn delivery_across_shards() {
    const N: u64 = 50;
    let hub = Hub::start(|_| {});
    // Two subscribers on each shard, one publisher on each shard.
    let mut subs = clients_on_each_shard(hub.addr, 2);
    subs.extend(clients_on_each_shard(hub.addr, 2));
    let mut pubs = clients_on_each_shard(hub.addr, 2);
    for s in subs.iter_mut() {
        s.subscribe("fanout");
    }
    for i in 0..N {
        for (p, client) in pubs.iter_mut().enumerate() {
            let extra = client.publish_acked("fanout", json!({"from": p, "seq": i}));
            assert!(extra.is_empty(), "publisher is not subscribed: {extra:?}");
        }
    }
    for s in subs.iter_mut() {
        let shard = s.shard();
        let mut next = [0u64; 2];
        for _ in 0..2 * N {
            let m = s.recv_json();
            assert_eq!(m["type"], "message", "{m}");
            assert_eq!(m["channel"], "fanout", "{m}");
            let from = m["data"]["from"].as_u64().expect("from") as usize;
            let seq = m["data"]["seq"].as_u64().expect("seq");
            assert_eq!(
                seq, next[from],
                "subscriber on shard {shard}: publisher {from} out of order"
            );
            next[from] += 1;
        }
        assert_eq!(next, [N, N], "subscriber on shard {shard}");
        // Nothing more (no duplicates) is queued.
        assert_alive(s, "done");
    }

    let text = metrics(hub.addr);
    for shard in 0..2 {
        // Each shard queued every message (2N) to its two local subscribers.
        let delivered = series_value(
            &text,
            &format!(r#"ringhub_messages_delivered_total{{shard="{shard}"}}"#),
        );
        assert!(delivered > 0, "shard {shard} delivered nothing");
        assert_eq!(delivered, 2 * 2 * N, "shard {shard} deliveries");
        let published = series_value(
            &text,
            &format!(r#"ringhub_messages_published_total{{shard="{shard}"}}"#),
        );
        assert_eq!(published, N, "shard {shard} publishes");
    }
    assert_eq!(
        series_value(&text, "ringhub_messages_delivered_total"),
        8 * N
    );
}

// ------------------------------------------------------------------------------------------------
// 4. Per-publisher ordering over 10,000 messages
// ------------------------------------------------------------------------------------------------

#[test]
fn per_publisher_order_10k() {
    const COUNT: u64 = 10_000;
    let hub = Hub::start(|c| {
        c.max_queued_bytes = 64 << 20;
        // One connection publishes 10,000 messages at full speed: no publish rate limit.
        c.max_publish_rate = 0;
    });
    let subs = clients_on_each_shard(hub.addr, 2);
    let mut publisher = clients_on_each_shard(hub.addr, 2).swap_remove(0);
    assert_eq!(publisher.shard(), 0);

    let mut readers = Vec::new();
    for mut s in subs {
        s.subscribe("seq");
        readers.push(thread::spawn(move || {
            let shard = s.shard();
            for i in 0..COUNT {
                let m = s.recv_json();
                assert_eq!(
                    m,
                    json!({"type":"message","channel":"seq","data":{"seq":i}}),
                    "subscriber on shard {shard}: message {i}"
                );
            }
            // Exactly COUNT: nothing else is queued behind them.
            assert_alive(&mut s, "end");
            shard
        }));
    }

    for i in 0..COUNT {
        let text = publish_text("seq", &format!(r#"{{"seq":{i}}}"#), None);
        publisher.ws.write(Message::text(text)).expect("write");
        if i % 128 == 127 {
            publisher.ws.flush().expect("flush");
        }
    }
    publisher.ws.flush().expect("flush");
    // The publisher gets no reply to its publishes: the next frame is its pong.
    assert_alive(&mut publisher, "sent");

    let mut shards: Vec<usize> = readers
        .into_iter()
        .map(|r| r.join().expect("subscriber thread failed"))
        .collect();
    shards.sort();
    assert_eq!(shards, [0, 1]);
}

// ------------------------------------------------------------------------------------------------
// 5. Unsubscribe stops delivery
// ------------------------------------------------------------------------------------------------

#[test]
fn unsubscribe_stops_delivery() {
    let hub = Hub::start(|_| {});
    let mut subs = clients_on_each_shard(hub.addr, 2);
    let mut pubs = clients_on_each_shard(hub.addr, 2);
    // Same shard (0/0, 1/1) and cross shard (0/1, 1/0).
    for (si, pi) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
        let u = format!("u-{si}-{pi}");
        let m = format!("marker-{si}-{pi}");
        let sub = &mut subs[si];
        sub.subscribe(&u);
        sub.subscribe(&m);
        assert!(pubs[pi].publish_acked(&u, json!({"n": 0})).is_empty());
        assert_eq!(
            sub.recv_json(),
            json!({"type":"message","channel":u,"data":{"n":0}}),
            "sub shard {si}, pub shard {pi}"
        );
        assert_eq!(
            roundtrip(
                sub,
                &format!(r#"{{"type":"unsubscribe","channel":"{u}","id":"un"}}"#)
            ),
            format!(r#"{{"type":"unsubscribed","channel":"{u}","id":"un"}}"#)
        );
        for n in 1..=5 {
            assert!(pubs[pi].publish_acked(&u, json!({ "n": n })).is_empty());
        }
        assert!(pubs[pi].publish_acked(&m, json!("marker")).is_empty());
        assert_eq!(
            sub.recv_json(),
            json!({"type":"message","channel":m,"data":"marker"}),
            "sub shard {si}, pub shard {pi}: a message of the unsubscribed channel arrived"
        );
        assert_alive(sub, "after-marker");
    }
}

// ------------------------------------------------------------------------------------------------
// 6. Slow consumer
// ------------------------------------------------------------------------------------------------

#[test]
fn slow_consumer_closed_1013_others_unaffected() {
    /// Most publishes the healthy subscriber may lag behind: 32 × ~4.1 KiB stays well under the
    /// 256 KiB outbox limit whatever the socket buffers hold, so it can never be cut off.
    const WINDOW: usize = 32;
    /// Give up if the slow client is not cut off after this many 4 KiB publishes (160 MiB).
    const CAP: usize = 40_000;
    let hub = Hub::start(|c| {
        c.max_queued_bytes = 256 << 10;
        // The slow client reads its close frame only at the end of the test: don't let the
        // close deadline shut its socket before then.
        c.close_timeout = Duration::from_secs(60);
    });

    // The slow client: upgrade by hand, read the welcome and the subscribe ack, then stop reading.
    let mut slow = raw(hub.addr);
    slow.write_all(upgrade_request(hub.addr).as_bytes())
        .unwrap();
    let head = read_http_head(&mut slow);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut buf = bytes::BytesMut::new();
    let welcome = raw_next_text(&mut slow, &mut buf);
    assert!(welcome.starts_with(r#"{"type":"welcome""#), "{welcome}");
    slow.write_all(&masked_frame(
        0x1,
        true,
        br#"{"type":"subscribe","channel":"flood","id":1}"#,
    ))
    .unwrap();
    assert_eq!(
        raw_next_text(&mut slow, &mut buf),
        r#"{"type":"subscribed","channel":"flood","id":1}"#
    );
    assert!(buf.is_empty(), "nothing else was sent yet");

    // The healthy subscriber reads everything in its own thread until the end marker.
    let mut healthy = Client::connect(hub.addr);
    healthy.subscribe("flood");
    let received = Arc::new(AtomicUsize::new(0));
    let reader = {
        let received = received.clone();
        thread::spawn(move || {
            let mut seqs = Vec::new();
            loop {
                let m = healthy.recv_json();
                assert_eq!(m["type"], "message", "{m}");
                if m["data"]["end"] == true {
                    return seqs;
                }
                seqs.push(m["data"]["seq"].as_u64().expect("seq"));
                received.fetch_add(1, Ordering::Release);
            }
        })
    };

    let mut publisher = Client::connect(hub.addr);
    let pad = "x".repeat(4096);
    let mut sent = 0usize;
    let mut after_cut = None;
    loop {
        // Pace against the healthy subscriber (never against the slow one).
        let deadline = Instant::now() + WAIT;
        while received.load(Ordering::Acquire) + WINDOW < sent {
            assert!(
                Instant::now() < deadline,
                "healthy subscriber stalled at {} of {sent}",
                received.load(Ordering::Acquire)
            );
            thread::sleep(Duration::from_micros(200));
        }
        let data = format!(r#"{{"seq":{sent},"pad":"{pad}"}}"#);
        publisher.send_text(&publish_text("flood", &data, None));
        sent += 1;
        match after_cut {
            None if sent.is_multiple_of(128) => {
                let closes = series_value(&metrics(hub.addr), "ringhub_slow_consumer_closes_total");
                if closes > 0 {
                    after_cut = Some(sent);
                }
                assert!(
                    sent < CAP,
                    "the slow client was not cut off after {sent} publishes"
                );
            }
            // Keep publishing a while after the cut: the others must keep receiving.
            Some(at) if sent >= at + 200 => break,
            _ => {}
        }
    }
    publisher.send_text(&publish_text("flood", r#"{"end":true}"#, None));

    let seqs = reader.join().expect("healthy subscriber failed");
    assert_eq!(seqs.len(), sent, "healthy subscriber lost messages");
    assert!(
        seqs.iter().enumerate().all(|(i, &s)| s == i as u64),
        "healthy subscriber got messages out of order"
    );
    assert_alive(&mut publisher, "publisher-alive");

    let text = metrics(hub.addr);
    assert_eq!(series_value(&text, "ringhub_slow_consumer_closes_total"), 1);

    // The slow client finally drains its socket: messages, then the 1013 close frame.
    assert_eq!(raw_expect_close(&mut slow), 1013);
}

// ------------------------------------------------------------------------------------------------
// 7. Idle timeout and keepalive
// ------------------------------------------------------------------------------------------------

#[test]
fn idle_timeout_closes_silent_client_1001() {
    let hub = Hub::start(|c| {
        c.idle_timeout = Duration::from_millis(300);
        c.ping_interval = Duration::from_secs(10);
    });
    let tick = hub_tick(Duration::from_millis(300), Duration::from_secs(10));
    let started = Instant::now();
    let mut c = Client::connect(hub.addr);
    let (code, reason) = c.expect_close();
    assert_eq!(code, 1001, "reason {reason:?}");
    assert!(reason.contains("idle"), "reason {reason:?}");
    // Not before the timeout (timeouts fire within one sweep tick of their nominal time).
    assert!(
        started.elapsed() + tick >= Duration::from_millis(300),
        "closed after only {:?}",
        started.elapsed()
    );
    let text = metrics(hub.addr);
    assert_eq!(series_value(&text, "ringhub_idle_closes_total"), 1);
}

/// The sweep period for the given ping/idle settings with the other defaults.
fn hub_tick(idle: Duration, ping: Duration) -> Duration {
    ringhub::config::Config {
        idle_timeout: idle,
        ping_interval: ping,
        ..ringhub::config::Config::default()
    }
    .tick()
}

#[test]
fn keepalive_pings_keep_responsive_client_open() {
    // A pong within ~1 s of each 100 ms ping keeps the connection: generous enough that a
    // descheduled test thread does not make it flaky, short enough to be exceeded 3 times over.
    let idle = Duration::from_secs(1);
    let hub = Hub::start(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.idle_timeout = idle;
    });
    let mut c = Client::connect(hub.addr);
    c.ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut pings = 0;
    let until = Instant::now() + 3 * idle;
    while Instant::now() < until {
        // tungstenite answers each ping with a pong, flushed by the next read.
        match c.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(Message::Close(f)) => panic!("closed despite answering pings: {f:?}"),
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("connection failed: {e}"),
        }
    }
    assert!(pings >= 1, "no ping from the server in {:?}", 3 * idle);
    c.ws.get_ref().set_read_timeout(Some(WAIT)).unwrap();
    assert_alive(&mut c, "still-open");
    let text = metrics(hub.addr);
    assert_eq!(series_value(&text, "ringhub_idle_closes_total"), 0);
}

// ------------------------------------------------------------------------------------------------
// 8. Graceful shutdown
// ------------------------------------------------------------------------------------------------

#[test]
fn graceful_shutdown_closes_everyone_1001() {
    let mut hub = Hub::start(|_| {});
    let addr = hub.addr;
    let instance = hub.handle.as_ref().unwrap().instance_id().to_owned();
    let mut clients = clients_on_each_shard(addr, 2);
    for _ in 0..4 {
        clients.push(Client::connect(addr));
    }
    let shards: std::collections::HashSet<usize> = clients.iter().map(|c| c.shard()).collect();
    assert_eq!(shards.len(), 2, "clients on both shards");
    for c in clients.iter_mut() {
        c.subscribe("bye");
    }
    // Queued before the shutdown: delivered before the close frame.
    let extra = clients[0].publish_acked("bye", json!("last words"));
    assert!(extra.len() <= 1, "{extra:?}");
    let own_delivered_early = extra.len() == 1;
    if own_delivered_early {
        assert_eq!(
            extra[0],
            json!({"type":"message","channel":"bye","data":"last words"})
        );
    }

    let (done_tx, done_rx) = mpsc::channel();
    let stopper = thread::spawn(move || {
        hub.stop();
        let _ = done_tx.send(());
    });

    for (i, c) in clients.iter_mut().enumerate() {
        if i != 0 || !own_delivered_early {
            assert_eq!(
                c.recv_json(),
                json!({"type":"message","channel":"bye","data":"last words"}),
                "client {i}"
            );
        }
        let (code, reason) = c.expect_close();
        assert_eq!(code, 1001, "client {i}: reason {reason:?}");
        assert_eq!(reason, "going away", "client {i}");
        // Flush tungstenite's close reply and read to the end.
        let _ = c.ws.flush();
        let deadline = Instant::now() + WAIT;
        while c.ws.read().is_ok() {
            assert!(Instant::now() < deadline, "client {i}: no end of stream");
        }
    }
    drop(clients);
    done_rx
        .recv_timeout(WAIT)
        .expect("stop() did not return (shards did not exit)");
    stopper.join().unwrap();

    // The port no longer serves this hub: refused, or (if another test's hub reused the port)
    // no welcome from this instance.
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let Ok((mut ws, _)) = tungstenite::client(format!("ws://{addr}/ws"), stream) else {
        return;
    };
    if let Ok(Message::Text(t)) = ws.read() {
        let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
        assert_ne!(
            v["instance"].as_str(),
            Some(instance.as_str()),
            "the stopped hub still welcomes clients"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 9. HTTP API
// ------------------------------------------------------------------------------------------------

#[test]
fn http_endpoints() {
    let hub = Hub::start(|_| {});
    let addr = hub.addr;

    let (status, body) = http(addr, "GET", "/healthz", &[], b"");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status":"ok"})
    );
    let (status, _) = http(addr, "GET", "/readyz", &[], b"");
    assert_eq!(status, 200);
    let (status, _) = http(addr, "GET", "/healthz?probe=1", &[], b"");
    assert_eq!(status, 200, "query strings are ignored");

    // POST /publish reaches WebSocket subscribers on both shards.
    let mut subs = clients_on_each_shard(addr, 2);
    for s in subs.iter_mut() {
        s.subscribe("h");
    }
    let (status, body) = http(
        addr,
        "POST",
        "/publish",
        &[("Content-Type", "application/json")],
        br#"{"channel":"h","data":{"x":[1,"two"]}}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"ok":true})
    );
    for s in subs.iter_mut() {
        assert_eq!(
            s.recv_json(),
            json!({"type":"message","channel":"h","data":{"x":[1,"two"]}})
        );
    }

    // Bad input: 400 with a JSON error body.
    let bad: &[(&[u8], &str)] = &[
        (b"not json", "bad_request"),
        (b"{\"channel\":\"h\",\"data\":", "bad_request"),
        (b"[1,2]", "bad_request"),
        (b"{\"channel\":\"h\"}", "bad_request"),
        (b"{\"data\":1}", "bad_request"),
        (b"{\"channel\":\"bad name\",\"data\":1}", "invalid_channel"),
        (b"{\"channel\":\"\",\"data\":1}", "invalid_channel"),
    ];
    for (body_in, code) in bad {
        let (status, body) = http(addr, "POST", "/publish", &[], body_in);
        assert_eq!(
            status,
            400,
            "{:?} → {body}",
            String::from_utf8_lossy(body_in)
        );
        assert_http_error(&body, code);
    }

    // Unknown path 404; wrong method on a known path 405.
    let (status, body) = http(addr, "GET", "/nope", &[], b"");
    assert_eq!(status, 404, "{body}");
    assert_http_error(&body, "not_found");
    for (method, path) in [
        ("POST", "/healthz"),
        ("POST", "/readyz"),
        ("POST", "/metrics"),
        ("GET", "/publish"),
        ("PUT", "/publish"),
        ("DELETE", "/metrics"),
    ] {
        let (status, body) = http(addr, method, path, &[], b"");
        assert_eq!(status, 405, "{method} {path}: {body}");
    }

    // Body limit: max_message_size + 1 KiB by default. At the limit is fine, one byte over is 413.
    let limit = ringhub::config::Config::default().http_body_limit();
    let frame = r#"{"channel":"big","data":""}"#;
    let at_limit = format!(
        r#"{{"channel":"big","data":"{}"}}"#,
        "y".repeat(limit - frame.len())
    );
    assert_eq!(at_limit.len(), limit);
    let (status, body) = http(addr, "POST", "/publish", &[], at_limit.as_bytes());
    assert_eq!(status, 200, "body of exactly the limit: {body}");
    let over = format!(
        r#"{{"channel":"big","data":"{}"}}"#,
        "y".repeat(limit + 1 - frame.len())
    );
    let (status, _) = http(addr, "POST", "/publish", &[], over.as_bytes());
    assert_eq!(status, 413);

    // A header block over 8 KiB: 431.
    let filler = "f".repeat(9 * 1024);
    let (status, _) = http(addr, "GET", "/healthz", &[("X-Filler", &filler)], b"");
    assert_eq!(status, 431);

    // Subscribers saw exactly the one message on "h" (nothing from the failed requests).
    for s in subs.iter_mut() {
        assert_alive(s, "after-http");
    }

    // Metrics: Prometheus text with the documented series.
    wait_metric(addr, "ringhub_connections", 2);
    let text = metrics(addr);
    for needle in [
        "# TYPE ringhub_connections gauge",
        "# TYPE ringhub_messages_delivered_total counter",
        "ringhub_messages_delivered_total{shard=\"0\"} ",
        "ringhub_messages_delivered_total{shard=\"1\"} ",
        "ringhub_slow_consumer_closes_total ",
        "ringhub_errors_total{code=\"invalid_channel\"} ",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert_eq!(series_value(&text, "ringhub_messages_delivered_total"), 2);
    assert_eq!(series_value(&text, "ringhub_messages_published_total"), 2);
    assert_eq!(series_value(&text, "ringhub_slow_consumer_closes_total"), 0);
    assert_eq!(series_value(&text, "ringhub_connections"), 2);
}

#[test]
fn http_publish_requires_api_key_when_set() {
    let hub = Hub::start(|c| c.api_key = Some("s3cret-key".into()));
    let addr = hub.addr;
    let mut sub = Client::connect(addr);
    sub.subscribe("secure");
    let body = br#"{"channel":"secure","data":"hi"}"#;
    for auth in [
        None,
        Some("Bearer wrong-key"),
        Some("Bearer s3cret-ke"),
        Some("Basic s3cret-key"),
        Some("s3cret-key"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let (status, resp) = http(addr, "POST", "/publish", &headers, body);
        assert_eq!(status, 401, "Authorization {auth:?}: {resp}");
        assert_http_error(&resp, "unauthorized");
    }
    // Nothing was published by the rejected requests.
    assert_alive(&mut sub, "nothing-yet");

    let (status, resp) = http(
        addr,
        "POST",
        "/publish",
        &[("Authorization", "Bearer s3cret-key")],
        body,
    );
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        serde_json::from_str::<Value>(&resp).unwrap(),
        json!({"ok":true})
    );
    assert_eq!(
        sub.recv_json(),
        json!({"type":"message","channel":"secure","data":"hi"})
    );
    // The other endpoints stay open.
    assert_eq!(http(addr, "GET", "/healthz", &[], b"").0, 200);
    assert_eq!(http(addr, "GET", "/metrics", &[], b"").0, 200);
}

/// RFC 9110 §15.5.2: a server generating a 401 response MUST send a WWW-Authenticate header
/// field (here `Bearer`, the scheme the API expects).
#[test]
fn http_401_carries_www_authenticate() {
    let hub = Hub::start(|c| c.api_key = Some("s3cret-key".into()));
    let addr = hub.addr;
    let body = br#"{"channel":"secure","data":"hi"}"#;
    let req = format!(
        "POST /publish HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    let (status, head, _) = http_raw(addr, &bytes);
    assert_eq!(status, 401);
    assert!(
        head.lines().any(|l| l
            .to_ascii_lowercase()
            .starts_with("www-authenticate: bearer")),
        "401 without a WWW-Authenticate: Bearer header:\n{head}"
    );
}

#[test]
fn http_keep_alive_serves_several_requests() {
    let hub = Hub::start(|_| {});
    let addr = hub.addr;
    let mut s = raw(addr);

    // Two requests one after the other on one connection.
    for path in ["/healthz", "/readyz"] {
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let (status, head, body) = read_http_response(&mut s);
        assert_eq!(status, 200, "{path}: {head}{body}");
        assert!(
            head.to_ascii_lowercase().contains("connection: keep-alive"),
            "{head}"
        );
    }
    // A publish on the same connection, then two pipelined requests in one write.
    let body = r#"{"channel":"ka","data":1}"#;
    write!(
        s,
        "POST /publish HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let (status, _, resp) = read_http_response(&mut s);
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        serde_json::from_str::<Value>(&resp).unwrap(),
        json!({"ok":true})
    );
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\nGET /nope HTTP/1.1\r\nHost: {addr}\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_http_response(&mut s).0, 200);
    assert_eq!(read_http_response(&mut s).0, 404);

    // Connection: close ends it after the response.
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let (status, head, _) = read_http_response(&mut s);
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("server closes the connection");
    assert!(rest.is_empty(), "unexpected bytes after the last response");
}

/// RFC 9110 §15.5.6: a 405 response MUST carry an `Allow` header listing the methods the
/// resource supports.
#[test]
fn http_405_names_allowed_methods() {
    let hub = Hub::start(|_| {});
    for (method, path, allowed) in [
        ("POST", "/healthz", "GET"),
        ("POST", "/metrics", "GET"),
        ("GET", "/publish", "POST"),
    ] {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            hub.addr
        );
        let (status, head, _) = http_raw(hub.addr, req.as_bytes());
        assert_eq!(status, 405, "{method} {path}");
        let allow = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("allow")
                .then(|| v.trim().to_owned())
        });
        let allow =
            allow.unwrap_or_else(|| panic!("405 for {method} {path} without Allow:\n{head}"));
        assert!(
            allow.split(',').any(|m| m.trim() == allowed),
            "{method} {path}: Allow: {allow} does not list {allowed}"
        );
    }
}

/// A response to HEAD never has a body (RFC 9110 §9.3.2, RFC 9112 §6.3): on a keep-alive
/// connection a body would be read as the start of the next response.
#[test]
fn http_head_response_has_no_body() {
    let hub = Hub::start(|_| {});
    let addr = hub.addr;
    let mut s = raw(addr);
    write!(
        s,
        "HEAD /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\nGET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 "), "{head:?}");
    // Whatever the status of the HEAD response, the next bytes must be the GET's response.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("read the rest");
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 200"),
        "HEAD response {head:?} was followed by a body instead of the next response: {rest:?}"
    );
}
