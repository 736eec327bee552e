//! Scenarios run through the library against hubs started in-process on 127.0.0.1:0: the
//! reports' counts are checked against what was sent (and, with the two halves of a fan-out
//! on two unconnected instances, that loss is detected rather than assumed away).

use ringhub::config::Config;
use ringhub::server::{self, ServerHandle};
use ringhub_load::cli::{Command, Common, ConnectArgs, FanoutArgs, RoomsArgs, Traffic};
use std::time::Duration;

fn hub() -> (ServerHandle, String) {
    let h = server::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        pin: false,
        ..Config::default()
    })
    .expect("hub starts");
    let url = format!("ws://{}/ws", h.local_addr());
    (h, url)
}

fn common(url: &str, warmup_ms: u64, duration_ms: u64) -> Common {
    let mut c = Common::new(url);
    c.warmup = Duration::from_millis(warmup_ms);
    c.duration = Duration::from_millis(duration_ms);
    c.quiet = true;
    c
}

fn open_loop(rate: f64) -> Traffic {
    Traffic {
        rate: Some(rate),
        max: false,
        window: None,
        payload_size: 64,
    }
}

fn stop(h: ServerHandle) {
    h.shutdown();
    h.join();
}

#[test]
fn fanout_delivers_every_publish_to_every_subscriber() {
    let (h, url) = hub();
    let args = FanoutArgs {
        common: common(&url, 500, 1500),
        traffic: open_loop(200.0),
        subscribers: 50,
        channels: 1,
        publishers: 1,
    };
    let r = ringhub_load::run_scenario(&Command::Fanout(args)).expect("fanout runs");
    let d = r.deliveries.clone().expect("delivery counts");
    // 200 msg/s for 2 s on a fixed schedule: exactly 400 publishes.
    assert_eq!(d.publishes_scheduled, Some(400));
    assert_eq!(d.publishes_sent, 400);
    assert_eq!(d.publishes_unsent, 0);
    assert_eq!(d.subscriptions, 50);
    assert_eq!(d.expected, 400 * 50);
    assert_eq!(d.received, d.expected, "{}", r.text());
    assert_eq!(d.delivered, d.expected);
    assert_eq!((d.lost, d.duplicates, d.reordered), (0, 0, 0));
    assert_eq!((d.unexpected, d.extra), (0, 0));
    // Latency samples: the messages intended after the 0.5 s warmup (300 of 400) × 50.
    assert_eq!(r.latency.len(), 300 * 50);
    assert_eq!((r.error_count, r.close_count), (0, 0), "{}", r.text());
    let json = r.to_json();
    assert_eq!(json["counts"]["delivered"], 20_000);
    assert_eq!(json["counts"]["lost"], 0);
    assert!(json["latency_us"]["p99"].as_f64().unwrap() > 0.0);
    assert!(json["cpu"]["load_generator_s"].as_f64().is_some());
    let text = r.text();
    assert!(text.contains("delivered      20000 (100.000%)"), "{text}");
    stop(h);
}

#[test]
fn rooms_closed_loop_accounts_every_member() {
    let (h, url) = hub();
    let args = RoomsArgs {
        common: common(&url, 200, 800),
        traffic: Traffic {
            rate: None,
            max: true,
            window: Some(4),
            payload_size: 100,
        },
        rooms: 8,
        members: 3,
    };
    let r = ringhub_load::run_scenario(&Command::Rooms(args)).expect("rooms runs");
    let d = r.deliveries.clone().unwrap();
    assert_eq!(d.subscriptions, 24);
    assert!(
        d.publishes_sent > 24,
        "closed loop publishes more than once per member"
    );
    // Every publish reaches the 3 members of its room, the publisher included.
    assert_eq!(d.expected, d.publishes_sent * 3);
    assert_eq!(d.delivered, d.expected, "{}", r.text());
    assert_eq!(
        (d.lost, d.duplicates, d.reordered, d.unexpected),
        (0, 0, 0, 0)
    );
    assert_eq!(r.error_count, 0, "{}", r.text());
    stop(h);
}

#[test]
fn loss_is_detected_when_subscribers_are_on_another_instance() {
    // Two embedded-mode hubs share nothing: what is published on A never reaches B.
    let (a, url_a) = hub();
    let (b, url_b) = hub();
    let mut c = common(&url_a, 0, 1000);
    c.publish_urls = vec![url_a.clone()];
    c.subscribe_urls = vec![url_b.clone()];
    let args = FanoutArgs {
        common: c,
        traffic: open_loop(50.0),
        subscribers: 10,
        channels: 2,
        publishers: 2,
    };
    let r = ringhub_load::run_scenario(&Command::Fanout(args)).expect("fanout runs");
    let d = r.deliveries.clone().unwrap();
    assert_eq!(d.publishes_sent, 50);
    assert_eq!(
        d.expected,
        50 * 5,
        "each publish has 5 subscribers on its channel"
    );
    assert_eq!(d.delivered, 0);
    assert_eq!(d.lost, d.expected);
    assert!(r.warnings.iter().any(|w| w.contains("did not arrive")));
    stop(a);
    stop(b);
}

#[test]
fn connect_opens_and_closes_at_the_rate() {
    let (h, url) = hub();
    let args = ConnectArgs {
        common: common(&url, 200, 800),
        rate: 100.0,
        connections: None,
        keep: false,
    };
    let r = ringhub_load::run_scenario(&Command::Connect(args)).expect("connect runs");
    let json = r.to_json();
    assert_eq!(json["counts"]["attempted"], 100);
    assert_eq!(json["counts"]["established"], 100, "{}", r.text());
    assert_eq!(json["counts"]["closed_clean"], 100);
    assert_eq!(json["counts"]["failed"], 0);
    // The 80 attempts intended after the warmup are the latency samples.
    assert_eq!(r.latency.len(), 80);
    stop(h);
}

#[test]
fn an_unreachable_url_is_one_clear_error() {
    // A port nothing listens on: bind one, note it, drop it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let args = FanoutArgs {
        common: common(&url, 0, 100),
        traffic: open_loop(10.0),
        subscribers: 10,
        channels: 1,
        publishers: 1,
    };
    let err = ringhub_load::run_scenario(&Command::Fanout(args))
        .err()
        .expect("no hub there");
    assert!(
        err.contains(&url) && err.contains("connection refused"),
        "{err}"
    );
}
