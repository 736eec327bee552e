//! The same hub on both monoio drivers: io_uring (the default here) and the epoll fallback that
//! the Fusion driver uses where io_uring is unavailable. The readiness + `recv` / `sendmsg` I/O
//! path must behave identically on both.

mod common;
use common::*;
use serde_json::json;
use std::io::{Read, Write};

fn cross_shard_delivery_and_order(epoll: bool) {
    let hub = Hub::start(|c| {
        c.epoll = epoll;
        c.max_publish_rate = 0;
    });
    let mut cs = clients_on_each_shard(hub.addr, 2);
    cs[1].subscribe("news");
    cs[0].subscribe("news");
    let extra = cs[0].publish_acked("news", json!({"n": 0}));
    // The publisher is subscribed too: its own message may arrive before the ack.
    assert!(extra.len() <= 1);
    let m = cs[1].recv_json();
    assert_eq!(m, json!({"type":"message","channel":"news","data":{"n":0}}));
    // 2,000 messages without acks: the other shard's subscriber gets them all, in order.
    for i in 1..=2000 {
        cs[0]
            .ws
            .write(tungstenite::Message::text(
                json!({"type":"publish","channel":"news","data":{"n":i}}).to_string(),
            ))
            .unwrap();
    }
    cs[0].ws.flush().unwrap();
    for i in 1..=2000 {
        let m = cs[1].recv_json();
        assert_eq!(m["data"]["n"], i, "driver epoll={epoll}");
    }
}

#[test]
fn io_uring_cross_shard_delivery_and_order() {
    cross_shard_delivery_and_order(false);
}

#[test]
fn epoll_cross_shard_delivery_and_order() {
    cross_shard_delivery_and_order(true);
}

/// A client that stops reading is cut off with 1013 while another keeps receiving (the write
/// path's full-socket handling: `write_blocked` and waiting for writability).
#[test]
fn epoll_slow_consumer_is_cut_off() {
    let hub = Hub::start(|c| {
        c.epoll = true;
        c.max_publish_rate = 0;
        c.max_queued_bytes = 256 << 10;
        c.close_timeout = std::time::Duration::from_secs(30);
    });
    let mut slow = raw(hub.addr);
    slow.write_all(upgrade_request(hub.addr).as_bytes())
        .unwrap();
    assert!(read_http_head(&mut slow).starts_with("HTTP/1.1 101"));
    let sub = masked_frame(0x1, true, br#"{"type":"subscribe","channel":"big"}"#);
    slow.write_all(&sub).unwrap();
    let mut healthy = Client::connect(hub.addr);
    healthy.subscribe("big");
    let mut publisher = Client::connect(hub.addr);
    let payload = "x".repeat(4000);
    let mut sent = 0;
    // Publish until the hub reports the cut-off (loopback buffers are large), keeping the healthy
    // subscriber drained.
    while metric(hub.addr, "ringhub_slow_consumer_closes_total") == 0 {
        for _ in 0..32 {
            publisher
                .send_json(json!({"type":"publish","channel":"big","data":{"s":sent,"p":payload}}));
            sent += 1;
        }
        for _ in 0..32 {
            let m = healthy.recv_json();
            assert_eq!(m["type"], "message");
        }
        assert!(sent < 40_000, "the slow client was never cut off");
    }
    // The slow client finds its data, then a close frame with 1013.
    assert_eq!(raw_expect_close(&mut slow), 1013);
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
}
