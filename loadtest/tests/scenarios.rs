//! Scenarios run through the library against hubs started in-process on 127.0.0.1:0: the
//! reports' counts are checked against what was sent (and, with the two halves of a fan-out
//! on two unconnected instances, that loss is detected rather than assumed away). With auth on
//! (a hub with `[auth]`), the hub's own metrics confirm that every connection authenticated.
//! On a hub with a history namespace, `fanout` checks offsets and `reconnect` drops and
//! resubscribes with `since`: recovered, not recoverable (a tiny `max_recovery`), over
//! WebSocket and over `POST /publish`.

use jsonwebtoken::Algorithm;
use ringhub::auth::namespaces::{Access, NamespaceRules};
use ringhub::auth::AuthConfig;
use ringhub::config::Config;
use ringhub::server::{self, ServerHandle};
use ringhub_load::cli::{
    Command, Common, ConnectArgs, DropMode, FanoutArgs, IdleArgs, ReconnectArgs, RoomsArgs,
    TokenIn, Traffic,
};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

const SECRET: &str = "load-test-secret-0123456789abcdef";

fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        pin: false,
        // Closed-loop runs publish faster than the default 1,000/s per connection.
        max_publish_rate: 0,
        ..Config::default()
    }
}

fn start(cfg: Config) -> (ServerHandle, String) {
    let h = server::start(cfg).expect("hub starts");
    let url = format!("ws://{}/ws", h.local_addr());
    (h, url)
}

fn hub() -> (ServerHandle, String) {
    start(config())
}

/// A hub with `[auth]` (`auth`) on which authenticated clients may publish (the message
/// scenarios publish over WebSocket; with auth, clients may not publish by default).
fn auth_hub(auth: AuthConfig) -> (ServerHandle, String) {
    let mut cfg = config();
    cfg.auth = Some(auth);
    cfg.namespaces.default = NamespaceRules {
        subscribe: None,
        publish: Some(Access::Authenticated),
        user_limited: false,
        ..Default::default()
    };
    start(cfg)
}

fn hmac_hub() -> (ServerHandle, String) {
    auth_hub(AuthConfig {
        secret: Some(SECRET.into()),
        ..AuthConfig::default()
    })
}

fn key(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

/// `common` with tokens signed by `SECRET`.
fn with_secret(mut c: Common, secret: &str) -> Common {
    c.token.token_secret = Some(secret.into());
    c
}

/// A counter of the hub's `GET /metrics` (one series, no labels).
fn metric(h: &ServerHandle, name: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(h.local_addr()).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics:\n{text}"))
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
        channel_prefix: String::new(),
    }
}

/// A hub whose namespace `h` keeps 100,000 messages per channel; `max_recovery` as given.
fn history_hub(max_recovery: usize) -> (ServerHandle, String) {
    let mut cfg = config();
    cfg.shards = 2;
    cfg.max_recovery = max_recovery;
    cfg.namespaces.named.insert(
        "h".into(),
        NamespaceRules {
            history_size: Some(100_000),
            ..Default::default()
        },
    );
    start(cfg)
}

/// `reconnect` on `h:` channels: 1 publisher, drops every `drop_every_ms`, back after
/// `down_ms`.
fn reconnect_args(
    url: &str,
    subscribers: usize,
    drop_every_ms: u64,
    down_ms: u64,
) -> ReconnectArgs {
    ReconnectArgs {
        common: common(url, 200, 2000),
        subscribers,
        channels: 1,
        channel_prefix: "h:".into(),
        publishers: 1,
        rate: 200.0,
        payload_size: 64,
        drop_every: Duration::from_millis(drop_every_ms),
        drop_fraction: None,
        drop_mode: DropMode::Close,
        down_time: Duration::from_millis(down_ms),
        sticky: false,
        api_key: None,
    }
}

/// The report's warnings, less those about CPU contention (tests run in parallel).
fn warnings(r: &ringhub_load::report::Report) -> Vec<&String> {
    r.warnings
        .iter()
        .filter(|w| !w.contains("waited for a CPU") && !w.contains("may have been the bottleneck"))
        .collect()
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
            channel_prefix: String::new(),
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

#[test]
fn fanout_with_auth_authenticates_every_connection() {
    let (h, url) = hmac_hub();
    let args = FanoutArgs {
        common: with_secret(common(&url, 300, 700), SECRET),
        traffic: open_loop(200.0),
        subscribers: 30,
        channels: 1,
        publishers: 1,
    };
    let r = ringhub_load::run_scenario(&Command::Fanout(args)).expect("fanout runs");
    let d = r.deliveries.clone().unwrap();
    assert_eq!(d.publishes_sent, 200);
    assert_eq!(d.subscriptions, 30);
    assert_eq!(d.delivered, 200 * 30, "{}", r.text());
    assert_eq!((d.lost, d.duplicates, d.reordered), (0, 0, 0));
    assert_eq!((r.error_count, r.close_count), (0, 0), "{}", r.text());
    assert!(r.warnings.is_empty(), "{}", r.text());
    // The hub verified one token per connection: 30 subscribers and the publisher.
    assert_eq!(metric(&h, "ringhub_auth_successes_total"), 31);
    assert_eq!(metric(&h, "ringhub_auth_failures_total"), 0);
    let json = r.to_json();
    assert_eq!(json["setup"]["auth"]["enabled"], true);
    assert_eq!(json["setup"]["auth"]["algorithm"], "HS256");
    assert_eq!(json["setup"]["auth"]["token_in"], "message");
    assert_eq!(json["setup"]["auth"]["tokens"], 31);
    assert_eq!(json["auth"]["authenticated"], 31);
    assert_eq!(json["auth"]["anonymous"], 0);
    let text = r.text();
    assert!(text.contains("auth           on: HS256 tokens"), "{text}");
    assert!(text.contains("authenticated  31 connection(s)"), "{text}");
    stop(h);
}

#[test]
fn rooms_with_tokens_in_the_url() {
    let (h, url) = hmac_hub();
    let mut c = with_secret(common(&url, 200, 600), SECRET);
    c.token.token_in = TokenIn::Query;
    c.token.token_user_prefix = "member-".into();
    let args = RoomsArgs {
        common: c,
        traffic: Traffic {
            rate: None,
            max: true,
            window: Some(4),
            payload_size: 64,
            channel_prefix: String::new(),
        },
        rooms: 4,
        members: 3,
    };
    let r = ringhub_load::run_scenario(&Command::Rooms(args)).expect("rooms runs");
    let d = r.deliveries.clone().unwrap();
    assert_eq!(d.subscriptions, 12);
    assert_eq!(d.delivered, d.expected, "{}", r.text());
    assert_eq!((d.lost, d.unexpected), (0, 0));
    assert_eq!(r.error_count, 0, "{}", r.text());
    assert_eq!(metric(&h, "ringhub_auth_successes_total"), 12);
    assert_eq!(r.to_json()["setup"]["auth"]["token_in"], "query");
    stop(h);
}

#[test]
fn connect_with_an_es256_key_counts_connects_once_connected() {
    let (h, url) = auth_hub(AuthConfig {
        public_key_files: vec![key("es256_public.pem")],
        ..AuthConfig::default()
    });
    let mut c = common(&url, 200, 800);
    c.token.token_key = Some(key("es256_private.pem"));
    c.token.token_alg = Some(Algorithm::ES256);
    let args = ConnectArgs {
        common: c,
        rate: 100.0,
        connections: None,
        keep: false,
    };
    let r = ringhub_load::run_scenario(&Command::Connect(args)).expect("connect runs");
    let json = r.to_json();
    assert_eq!(json["counts"]["established"], 100, "{}", r.text());
    assert_eq!(json["counts"]["closed_clean"], 100);
    assert_eq!(json["counts"]["failed"], 0);
    assert_eq!(json["auth"]["authenticated"], 100);
    assert_eq!(json["setup"]["auth"]["algorithm"], "ES256");
    assert_eq!(json["setup"]["auth"]["key"], "pem");
    assert!(json["connections_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(r.latency.len(), 80);
    assert!(r.latency_what.starts_with("connect→connected"));
    assert_eq!(metric(&h, "ringhub_auth_successes_total"), 100);
    stop(h);
}

#[test]
fn idle_with_auth_holds_authenticated_subscribed_connections() {
    let (h, url) = hmac_hub();
    let args = IdleArgs {
        common: with_secret(common(&url, 100, 300), SECRET),
        connections: 40,
        rate: 400.0,
        subscribe: true,
    };
    let r = ringhub_load::run_scenario(&Command::Idle(args)).expect("idle runs");
    let json = r.to_json();
    assert_eq!(json["counts"]["established"], 40, "{}", r.text());
    assert!(
        r.text().contains(" 40 after the 0.3 s hold"),
        "{}",
        r.text()
    );
    assert_eq!(json["auth"]["authenticated"], 40);
    assert_eq!(r.error_count, 0, "{}", r.text());
    assert_eq!(metric(&h, "ringhub_auth_successes_total"), 40);
    stop(h);
}

#[test]
fn a_wrong_secret_fails_the_run_with_the_hubs_answer() {
    let (h, url) = hmac_hub();
    let args = FanoutArgs {
        common: with_secret(common(&url, 0, 300), "not-the-hubs-secret"),
        traffic: open_loop(10.0),
        subscribers: 5,
        channels: 1,
        publishers: 1,
    };
    let err = ringhub_load::run_scenario(&Command::Fanout(args))
        .err()
        .expect("the hub refuses every token");
    assert!(
        err.contains("6 of 6 connections failed during setup")
            && err.contains("auth refused")
            && err.contains("error unauthorized")
            && err.contains("close 4001"),
        "{err}"
    );
    assert_eq!(metric(&h, "ringhub_auth_successes_total"), 0);
    assert_eq!(metric(&h, "ringhub_auth_failures_total"), 6);
    stop(h);
}

#[test]
fn tokens_sent_to_an_open_hub_are_reported_as_not_checked() {
    let (h, url) = hub();
    let args = ConnectArgs {
        common: with_secret(common(&url, 0, 200), SECRET),
        rate: 100.0,
        connections: Some(10),
        keep: false,
    };
    let r = ringhub_load::run_scenario(&Command::Connect(args)).expect("connect runs");
    let json = r.to_json();
    assert_eq!(json["counts"]["established"], 10, "{}", r.text());
    assert_eq!(json["auth"]["anonymous"], 10);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("does not check tokens")),
        "{}",
        r.text()
    );
    stop(h);
}

#[test]
fn fanout_on_a_history_channel_checks_every_offset() {
    let (h, url) = history_hub(1000);
    let mut traffic = open_loop(200.0);
    traffic.channel_prefix = "h:".into();
    let args = FanoutArgs {
        common: common(&url, 200, 800),
        traffic,
        subscribers: 20,
        channels: 2,
        publishers: 2,
    };
    let r = ringhub_load::run_scenario(&Command::Fanout(args)).expect("fanout runs");
    let d = r.deliveries.clone().unwrap();
    assert_eq!(d.publishes_sent, 200);
    assert_eq!(d.delivered, 200 * 10, "{}", r.text());
    assert_eq!((d.lost, d.duplicates, d.reordered), (0, 0, 0));
    let o = &r.to_json()["offsets"];
    assert_eq!(o["checked"], 2000, "every delivery carried an offset: {o}");
    for k in ["gaps", "missing", "duplicates", "out_of_order", "resets"] {
        assert_eq!(o[k], 0, "{k}: {o}");
    }
    assert!(
        r.text().contains(" 2000 checked (history channels"),
        "{}",
        r.text()
    );
    assert!(warnings(&r).is_empty(), "{}", r.text());
    // Channels without history: nothing to check, and said so.
    let (h2, url2) = hub();
    let args = FanoutArgs {
        common: common(&url2, 0, 300),
        traffic: open_loop(100.0),
        subscribers: 2,
        channels: 1,
        publishers: 1,
    };
    let r = ringhub_load::run_scenario(&Command::Fanout(args)).expect("fanout runs");
    assert_eq!(r.to_json()["offsets"]["checked"], 0);
    assert!(
        r.text().contains(" not checked (no message carried one"),
        "{}",
        r.text()
    );
    stop(h);
    stop(h2);
}

#[test]
fn reconnect_recovers_every_missed_message_exactly_once() {
    let (h, url) = history_hub(1000);
    // 50 subscribers, each dropped every 0.9 s during 2 s: twice each (the second drop of the
    // last ones would reconnect after the end and is not made).
    let args = reconnect_args(&url, 50, 900, 200);
    let r = ringhub_load::run_scenario(&Command::Reconnect(args)).expect("reconnect runs");
    let text = r.text();
    let j = r.to_json();
    let rc = &j["reconnect"];
    let d = r.deliveries.clone().unwrap();
    // 200 msg/s for 2.2 s on a fixed schedule, every publish acknowledged.
    assert_eq!(d.publishes_sent, 440, "{text}");
    assert_eq!(rc["publishes_acknowledged"], 440);
    let drops = rc["drops"].as_u64().unwrap();
    assert!((50..=100).contains(&drops), "once or twice each: {text}");
    assert_eq!(rc["drops_skipped"], 0, "{text}");
    assert_eq!(rc["reconnects"], drops, "every drop reconnected: {text}");
    assert_eq!(rc["replies"], drops);
    assert_eq!(rc["recovered"], drops);
    assert_eq!(rc["recovered_pct"], 100.0);
    assert_eq!(rc["not_recoverable"], 0);
    assert_eq!(rc["incomplete"], 0);
    // Away ≥ 200 ms at 200 msg/s: about 40 messages missed per reconnect, all recovered.
    let m = &rc["messages_recovered"];
    assert!(m["p50"].as_u64().unwrap() >= 38, "{text}");
    assert_eq!(
        m["total"], m["received"],
        "every backlog message arrived: {text}"
    );
    assert!(m["total"].as_u64().unwrap() >= 38 * drops);
    // End to end: every acknowledged message reached every subscriber once, live or recovered.
    assert_eq!(d.expected, 440 * 50);
    assert_eq!(d.delivered, d.expected, "{text}");
    assert_eq!((d.lost, d.duplicates, d.reordered), (0, 0, 0), "{text}");
    assert_eq!((d.unexpected, d.extra), (0, 0));
    let o = &j["offsets"];
    assert_eq!(o["checked"], d.received);
    for k in ["gaps", "duplicates", "out_of_order", "resets"] {
        assert_eq!(o[k], 0, "{k}: {text}");
    }
    // One recovery time per reconnect, in the main histogram (what --hgrm writes).
    assert_eq!(r.latency.len(), drops, "{text}");
    assert_eq!(rc["recovery_time_us"]["samples"], drops);
    assert!(j["latency_us"]["p99"].as_f64().unwrap() > 0.0);
    assert!(j["latency_us"]["measures"]
        .as_str()
        .unwrap()
        .starts_with("recovery time"));
    assert_eq!((r.error_count, r.close_count), (0, 0), "{text}");
    assert!(warnings(&r).is_empty(), "{text}");
    assert!(text.contains("recovered       "), "{text}");
    assert!(text.contains("(100.000%)"), "{text}");
    assert!(text.contains("recovery µs"), "{text}");
    stop(h);
}

#[test]
fn reconnect_beyond_max_recovery_is_not_recoverable_not_lost() {
    // The hub recovers at most 2 messages; away 400 ms at 200 msg/s misses about 80.
    let (h, url) = history_hub(2);
    let mut args = reconnect_args(&url, 20, 1000, 400);
    args.drop_mode = DropMode::Abort;
    let r = ringhub_load::run_scenario(&Command::Reconnect(args)).expect("reconnect runs");
    let text = r.text();
    let rc = &r.to_json()["reconnect"];
    let d = r.deliveries.clone().unwrap();
    let replies = rc["replies"].as_u64().unwrap();
    assert!(replies >= 20, "{text}");
    assert_eq!(rc["not_recoverable"], replies, "{text}");
    assert_eq!(rc["recovered"], 0);
    assert_eq!(rc["recovered_pct"], 0.0);
    assert_eq!(rc["unaccounted_subscribers"], 0);
    let window = rc["not_recoverable_messages"].as_u64().unwrap();
    assert!(window >= 70 * replies, "{text}");
    // The windows are left out of what is owed, so nothing is silently lost or doubled.
    assert_eq!(d.expected, 440 * 20 - window, "{text}");
    assert_eq!(d.delivered, d.expected, "{text}");
    assert_eq!((d.lost, d.duplicates), (0, 0), "{text}");
    assert_eq!(
        r.to_json()["offsets"]["gaps"],
        0,
        "windows restart the offsets"
    );
    assert!(r.latency.is_empty(), "no recovery time without recovery");
    assert!(
        text.contains(&format!(
            "{window} message(s) in {replies} recovered:false window(s)"
        )),
        "{text}"
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("not recoverable")),
        "{text}"
    );
    assert!(
        !r.warnings.iter().any(|w| w.contains("did not arrive")),
        "{text}"
    );
    stop(h);
}

#[test]
fn reconnect_with_http_publishers_and_waves() {
    let (h, url) = history_hub(1000);
    let addr = url.trim_start_matches("ws://").trim_end_matches("/ws");
    let mut args = reconnect_args(&url, 30, 800, 150);
    args.common.publish_urls = vec![format!("http://{addr}")];
    args.publishers = 2;
    args.channels = 3;
    args.drop_fraction = Some(0.5);
    args.drop_mode = DropMode::Abort;
    let r = ringhub_load::run_scenario(&Command::Reconnect(args)).expect("reconnect runs");
    let text = r.text();
    let j = r.to_json();
    let rc = &j["reconnect"];
    let d = r.deliveries.clone().unwrap();
    assert_eq!(j["setup"]["publishers_http"], 2);
    assert_eq!(rc["publishes_acknowledged"], 440, "{text}");
    // Waves at 0.6 s and 1.4 s after the start (the one at 2.2 s would reconnect after the
    // end), 15 subscribers each.
    assert_eq!(rc["drops"], 30, "{text}");
    assert_eq!(rc["recovered"], 30, "{text}");
    assert_eq!(d.delivered, d.expected, "{text}");
    assert_eq!(d.expected, 440 * 10);
    assert_eq!((d.lost, d.duplicates, d.reordered), (0, 0, 0), "{text}");
    assert_eq!(j["offsets"]["gaps"], 0);
    assert_eq!(r.error_count, 0, "{text}");
    stop(h);
}

#[test]
fn reconnect_with_auth_authenticates_every_connection() {
    let mut cfg = config();
    cfg.auth = Some(AuthConfig {
        secret: Some(SECRET.into()),
        ..AuthConfig::default()
    });
    cfg.namespaces.named.insert(
        "h".into(),
        NamespaceRules {
            publish: Some(Access::Authenticated),
            history_size: Some(100_000),
            ..Default::default()
        },
    );
    let (h, url) = start(cfg);
    let mut args = reconnect_args(&url, 10, 1000, 100);
    args.common = with_secret(args.common, SECRET);
    let r = ringhub_load::run_scenario(&Command::Reconnect(args)).expect("reconnect runs");
    let text = r.text();
    let j = r.to_json();
    let rc = &j["reconnect"];
    let d = r.deliveries.clone().unwrap();
    let reconnects = rc["reconnects"].as_u64().unwrap();
    assert!(reconnects >= 10, "{text}");
    assert_eq!(rc["recovered"], reconnects, "{text}");
    assert_eq!(d.delivered, d.expected, "{text}");
    assert_eq!((d.lost, d.duplicates), (0, 0), "{text}");
    assert_eq!(j["auth"]["authenticated"], 11);
    assert_eq!(j["setup"]["auth"]["tokens"], 11);
    // The publisher, the 10 subscribers, and every reconnect (with the subscriber's token).
    assert_eq!(
        metric(&h, "ringhub_auth_successes_total"),
        11 + reconnects,
        "{text}"
    );
    assert!(warnings(&r).is_empty(), "{text}");
    stop(h);
}
