//! Resource limits under attack, against a real hub running in this process.
//!
//! Every test runs an attack while a [`Watch`] keeps healthy clients busy on the attacked shard(s):
//! a subscriber per shard and a publisher sending numbered messages at a modest pace. The
//! subscribers must get every message, in order, and must keep getting them while the attack
//! runs. The process's resident memory (`VmRSS`: the hub plus this test's clients) is sampled
//! before, during and after the attack ([`Rss`]) and must stay within a bound each test justifies
//! from the hub's limits. The tests take a process-wide lock so that RSS figures are not mixed
//! up with another test's; each prints its figures (`cargo test --test limits -- --nocapture`).
//!
//! See docs/limits.md for what each limit bounds.

mod common;
use common::*;

use bytes::BytesMut;
use ringhub::codec::{self, Control, Data, OpCode};
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::Message;

const MIB: u64 = 1024;
/// RSS growth allowed on top of what the hub may hold for an attack by its limits: this test's own
/// threads (a malloc arena and stack pages each) and allocator slack. Measured growth was at most
/// 1 MiB in every test here, limits included.
const NOISE_MIB: u64 = 4;

/// One test at a time: RSS is process-wide.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A name no other test uses.
fn unique(prefix: &str) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

// ----- memory -----

/// Resident memory of this process in KiB (`VmRSS` in /proc/self/status).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// RSS samples around one attack.
struct Rss {
    test: &'static str,
    samples: Vec<(&'static str, u64)>,
}

impl Rss {
    fn before(test: &'static str) -> Rss {
        Rss {
            test,
            samples: vec![("before", rss_kib())],
        }
    }

    fn sample(&mut self, when: &'static str) {
        self.samples.push((when, rss_kib()));
    }

    /// Print the samples and assert that no sample exceeds the first by `bound_mib` MiB or more.
    fn check(&self, bound_mib: u64, counts: &str) {
        let base = self.samples[0].1;
        let figures: Vec<String> = self
            .samples
            .iter()
            .map(|(when, kib)| format!("{when} {:.1} MiB", *kib as f64 / 1024.0))
            .collect();
        println!(
            "limits: {}: RSS {} (bound: +{bound_mib} MiB); {counts}",
            self.test,
            figures.join(", ")
        );
        for (when, kib) in &self.samples {
            assert!(
                kib.saturating_sub(base) < bound_mib * MIB,
                "{}: RSS {when} is {kib} KiB, {} KiB above the {base} KiB before the attack \
                 (bound {bound_mib} MiB)",
                self.test,
                kib.saturating_sub(base)
            );
        }
    }
}

// ----- healthy clients -----

/// Time between two rounds of the watch's publisher (one message per watched channel per round):
/// 20 messages/s per channel, well under every publish rate limit used here.
const PACE: Duration = Duration::from_millis(50);

/// Healthy clients kept busy through an attack: one subscriber on each watched shard, each on its
/// own channel, and a publisher sending numbered messages to every channel every [`PACE`].
struct Watch {
    stop: Arc<AtomicBool>,
    publisher: JoinHandle<u64>,
    /// Per subscriber: (shard, messages received so far, reader thread returning the sequence).
    readers: Vec<(usize, Arc<AtomicU64>, JoinHandle<Vec<u64>>)>,
}

impl Watch {
    fn start(hub: &Hub, shards: &[usize]) -> Watch {
        let mut channels = Vec::new();
        let mut readers = Vec::new();
        for &shard in shards {
            let channel = unique("healthy");
            let mut c = client_on_shard(hub.addr, shard);
            c.subscribe(&channel);
            let count = Arc::new(AtomicU64::new(0));
            let seen = count.clone();
            let ch = channel.clone();
            let reader = thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    let v = c.recv_json();
                    assert_eq!(v["type"], "message", "healthy client on shard {shard}: {v}");
                    assert_eq!(v["channel"], ch.as_str());
                    if v["data"] == "end" {
                        return got;
                    }
                    got.push(v["data"].as_u64().expect("numbered message"));
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            });
            channels.push(channel);
            readers.push((shard, count, reader));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let mut p = Client::connect(hub.addr);
        let publisher = thread::spawn(move || {
            let publish = |p: &mut Client, ch: &str, data: Value| {
                p.send_json(json!({"type":"publish","channel":ch,"data":data}));
            };
            let mut n = 0;
            while !halt.load(Ordering::Relaxed) {
                for ch in &channels {
                    publish(&mut p, ch, json!(n));
                }
                n += 1;
                thread::sleep(PACE);
            }
            for ch in &channels {
                publish(&mut p, ch, json!("end"));
            }
            // Close politely so the publishes are all read before the connection ends.
            let _ = p.ws.close(None);
            let _ = p.ws.flush();
            n
        });
        Watch {
            stop,
            publisher,
            readers,
        }
    }

    /// Wait until every healthy subscriber has received `n` more messages (bounded by WAIT).
    fn wait_progress(&self, n: u64, during: &str) {
        let start: Vec<u64> = self
            .readers
            .iter()
            .map(|r| r.1.load(Ordering::Relaxed))
            .collect();
        let deadline = Instant::now() + WAIT;
        for ((shard, count, _), from) in self.readers.iter().zip(start) {
            while count.load(Ordering::Relaxed) < from + n {
                assert!(
                    Instant::now() < deadline,
                    "the healthy client on shard {shard} got no messages {during}"
                );
                thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// After the attack: the subscribers still get messages, then [`Watch::finish`], and the RSS
    /// samples stay within `bound_mib` of the first ([`Rss::check`]; `counts` describes the attack
    /// for the printed figures, given the messages each healthy subscriber got).
    fn conclude(self, mut rss: Rss, bound_mib: u64, counts: impl FnOnce(u64) -> String) {
        self.wait_progress(3, "after the attack");
        let sent = self.finish();
        rss.sample("after");
        rss.check(bound_mib, &counts(sent));
    }

    /// Stop publishing; every subscriber must have received every message, in order.
    /// Returns how many messages each subscriber received.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.publisher.join().expect("publisher thread");
        for (shard, _, reader) in self.readers {
            let got = reader.join().expect("healthy reader thread");
            assert_eq!(
                got,
                (0..sent).collect::<Vec<u64>>(),
                "the healthy client on shard {shard} lost or reordered messages"
            );
        }
        sent
    }
}

// ----- raw WebSocket clients -----

/// Upgrade a raw socket; returns it with the shard it landed on (read from the welcome).
fn raw_upgraded(addr: SocketAddr) -> (TcpStream, usize) {
    let mut s = raw(addr);
    s.set_nodelay(true).unwrap();
    s.write_all(upgrade_request(addr).as_bytes()).unwrap();
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head:?}");
    let mut buf = BytesMut::new();
    let welcome = loop {
        if let Some((op, _, payload)) = codec::decode_server_frame(&mut buf).unwrap() {
            assert_eq!(op, OpCode::Data(Data::Text));
            break serde_json::from_slice::<Value>(&payload).unwrap();
        }
        let mut chunk = [0u8; 512];
        let n = s.read(&mut chunk).expect("read the welcome");
        assert!(n > 0, "connection closed before the welcome");
        buf.extend_from_slice(&chunk[..n]);
    };
    let id = welcome["connection"].as_str().expect("connection id");
    (s, shard_of(id))
}

/// Read the frames a server sends to a raw client until a close frame, `want` other frames, or
/// the end of the stream; `each` sees every frame but the close. Returns (frames, close code).
fn read_server_frames(
    s: &mut TcpStream,
    want: usize,
    mut each: impl FnMut(OpCode, &[u8]),
) -> (usize, Option<u16>) {
    let mut buf = BytesMut::new();
    let mut frames = 0;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        while let Some((op, _, payload)) = codec::decode_server_frame(&mut buf).unwrap() {
            if op == OpCode::Control(Control::Close) {
                let code = match payload[..] {
                    [a, b, ..] => u16::from_be_bytes([a, b]),
                    _ => 1005,
                };
                return (frames, Some(code));
            }
            each(op, &payload);
            frames += 1;
        }
        if frames >= want {
            return (frames, None);
        }
        match s.read(&mut chunk) {
            Ok(0) => return (frames, None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (frames, None),
            Err(e) => panic!("reading server frames: {e}"),
        }
    }
}

/// Whether the server closed a raw connection (EOF or reset), without blocking.
fn is_closed(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 256];
    let closed = loop {
        match (&mut &*s).read(&mut b) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

// =============================================================================================
// --max-connections
// =============================================================================================

#[test]
fn max_connections_refuses_upgrades_beyond_the_limit_with_503() {
    let _serial = serial();
    const MAX: usize = 200;
    let hub = Hub::start(|c| c.max_connections = Some(MAX));
    let watch = Watch::start(&hub, &[0, 1]);
    // The watch holds 3 sockets (2 subscribers, 1 publisher); wait until the extra connections
    // made to land on each shard are gone.
    let healthy = 3;
    wait_for_open_connections(&hub, healthy as u64);
    let mut rss = Rss::before("max connections");

    // The limit counts open sockets (HTTP included); an upgrade is refused when the sockets
    // open, its own included, exceed the limit. With the watch's 3 open, 197 more fit.
    let small = || Some(WebSocketConfig::default().read_buffer_size(4096));
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for i in 0..MAX + 20 {
        match Client::try_connect(hub.addr, small()) {
            Ok(c) => {
                assert!(
                    refused.is_empty(),
                    "connection {i} accepted after a refusal"
                );
                open.push(c);
            }
            Err(status) => refused.push(status),
        }
    }
    rss.sample("at the limit");
    assert_eq!(open.len(), MAX - healthy, "connections accepted");
    assert_eq!(refused, vec![503; healthy + 20], "the rest get HTTP 503");
    assert_eq!(metric(hub.addr, "ringhub_connections"), MAX as u64);
    assert_eq!(metric(hub.addr, "ringhub_connections_refused_total"), 23);
    watch.wait_progress(3, "at the connection limit");

    // Existing clients keep working, first and last alike.
    for i in [0, open.len() - 1] {
        let c = &mut open[i];
        c.send_json(json!({"type":"ping","id":"alive"}));
        assert_eq!(c.recv_json(), json!({"type":"pong","id":"alive"}));
    }

    // Close 10: then exactly 10 new ones fit again (retrying while the hub notices the closes).
    for mut c in open.drain(..10) {
        c.ws.close(None).unwrap();
        let _ = c.expect_close();
    }
    let mut again = 0;
    let deadline = Instant::now() + WAIT;
    while again < 10 {
        assert!(
            Instant::now() < deadline,
            "only {again} of 10 freed slots usable"
        );
        match Client::try_connect(hub.addr, small()) {
            Ok(c) => {
                open.push(c);
                again += 1;
            }
            Err(status) => {
                assert_eq!(status, 503);
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert_eq!(
        Client::try_connect(hub.addr, small()).err(),
        Some(503),
        "the limit holds again"
    );
    drop(open);
    watch.conclude(
        rss,
        // 220 connections: the hub's ~1 KiB each (the kernel's ~4 KiB are not in RSS), and on
        // the test's side a tungstenite client each (4 KiB read buffer and handshake state).
        NOISE_MIB + 4,
        |sent| {
            format!(
                "{} accepted, {} refused with 503; healthy clients got {sent} messages each",
                MAX - healthy,
                healthy + 20
            )
        },
    );
}

// =============================================================================================
// Slow loris
// =============================================================================================

#[test]
fn slowloris_and_silent_connections_are_dropped_at_the_handshake_timeout() {
    let _serial = serial();
    let timeout = Duration::from_secs(1);
    let hub = Hub::start(|c| c.handshake_timeout = timeout);
    let watch = Watch::start(&hub, &[0, 1]);
    let mut rss = Rss::before("slowloris");
    let timeouts_before = metric(hub.addr, "ringhub_handshake_timeouts_total");

    // 50 clients trickle an upgrade request one byte every 200 ms; 50 send nothing.
    let request = upgrade_request(hub.addr).into_bytes();
    let started = Instant::now();
    let mut attackers: Vec<(TcpStream, Instant, Option<Duration>)> = (0..100)
        .map(|_| (raw(hub.addr), Instant::now(), None))
        .collect();

    // A new client connects fine while they hang.
    let mut fresh = Client::connect(hub.addr);
    let channel = unique("fresh");
    fresh.subscribe(&channel);
    let extra = Client::connect(hub.addr).publish_acked(&channel, json!("hi"));
    assert!(extra.is_empty());
    assert_eq!(fresh.recv_json()["data"], "hi");
    drop(fresh);
    let still_open = attackers.iter_mut().filter(|a| !is_closed(&a.0)).count();
    assert_eq!(still_open, 100, "attackers dropped before the timeout");
    watch.wait_progress(3, "while the slow clients hang");
    rss.sample("during");

    let mut sent_bytes = 0;
    let deadline = started + timeout + Duration::from_secs(5);
    while attackers.iter().any(|a| a.2.is_none()) {
        assert!(
            Instant::now() < deadline,
            "slow clients still connected 5 s after the timeout"
        );
        for (i, (s, at, closed)) in attackers.iter_mut().enumerate() {
            if closed.is_some() {
                continue;
            }
            if is_closed(s) {
                *closed = Some(at.elapsed());
            } else if i < 50 && sent_bytes < request.len() {
                let _ = s.write_all(&request[sent_bytes..sent_bytes + 1]);
            }
        }
        sent_bytes += 1;
        thread::sleep(Duration::from_millis(200));
    }
    let lived: Vec<Duration> = attackers.iter().map(|a| a.2.unwrap()).collect();
    let (min, max) = (lived.iter().min().unwrap(), lived.iter().max().unwrap());
    assert!(
        *min >= timeout / 2 && *max <= timeout + Duration::from_secs(2),
        "slow clients lived {min:?}..{max:?}; the handshake timeout is {timeout:?}"
    );
    assert!(
        sent_bytes < request.len(),
        "the whole request was trickled in"
    );
    let timeouts = metric(hub.addr, "ringhub_handshake_timeouts_total") - timeouts_before;
    assert_eq!(timeouts, 100, "ringhub_handshake_timeouts_total");
    wait_for_open_connections(&hub, 3);
    watch.conclude(
        rss,
        // 100 sockets in the HTTP phase hold at most an 8 KiB read buffer each on the hub.
        NOISE_MIB + 1,
        |sent| {
            format!(
                "100 slow clients dropped {min:?}..{max:?} after connecting ({timeouts} handshake \
                 timeouts); healthy clients got {sent} messages each"
            )
        },
    );
}

// =============================================================================================
// Publish flood
// =============================================================================================

#[test]
fn publish_flood_is_rate_limited_then_closed_with_1008() {
    let _serial = serial();
    const RATE: u64 = 100;
    const BURST: u64 = 200;
    let hub = Hub::start(|c| {
        c.max_publish_rate = RATE as u32;
        c.publish_burst = Some(BURST as u32);
    });
    let mut attacker = Client::connect(hub.addr);
    let watch = Watch::start(&hub, &[attacker.shard()]);
    let flood = unique("flood");
    let mut counter = Client::connect(hub.addr);
    counter.subscribe(&flood);
    let mut rss = Rss::before("publish flood");

    // 2,000 publishes as fast as possible, then read the replies.
    let started = Instant::now();
    for i in 0..2000 {
        let cmd = json!({"type":"publish","channel":flood,"data":i,"id":i});
        if attacker.ws.write(Message::text(cmd.to_string())).is_err() {
            break; // the hub closed the connection
        }
    }
    let _ = attacker.ws.flush();
    let (mut acked, mut limited) = (0u64, 0u64);
    let code = loop {
        match attacker.ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                match v["type"].as_str() {
                    Some("published") => acked += 1,
                    Some("error") => {
                        assert_eq!(v["code"], "rate_limited", "{v}");
                        assert!(v["id"].is_u64(), "the error carries the id: {v}");
                        limited += 1;
                    }
                    _ => panic!("unexpected reply {v}"),
                }
            }
            Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    };
    let elapsed = started.elapsed();
    rss.sample("during");
    assert_eq!(
        code,
        Some(1008),
        "persistent abuse closes with policy violation"
    );
    // More than 3 x burst rejections within 10 s is abuse: the 601st closes the connection.
    assert_eq!(
        limited,
        3 * BURST + 1,
        "rate_limited errors before the close"
    );
    let allowed_max = BURST + RATE * (elapsed.as_millis() as u64 + 999) / 1000;
    assert!(
        (BURST..=allowed_max).contains(&acked),
        "{acked} publishes accepted in {elapsed:?} (burst {BURST}, {RATE}/s)"
    );
    assert!(
        acked + limited < 2000,
        "publishes after the close were handled"
    );
    // Exactly the accepted publishes reach a subscriber: the whole burst, then refills.
    counter.send_json(json!({"type":"ping","id":"end"}));
    let mut delivered = Vec::new();
    loop {
        let v = counter.recv_json();
        if v["type"] == "pong" {
            break;
        }
        assert_eq!(v["channel"], flood.as_str());
        delivered.push(v["data"].as_u64().unwrap());
    }
    assert_eq!(delivered.len() as u64, acked);
    assert_eq!(
        delivered[..BURST as usize],
        (0..BURST).collect::<Vec<u64>>()
    );
    assert!(delivered.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(
        metric(hub.addr, "ringhub_errors_total{code=\"rate_limited\"}"),
        limited
    );
    assert_eq!(metric(hub.addr, "ringhub_rate_limit_closes_total"), 1);
    watch.conclude(
        rss,
        // The attacker's outbox holds ~800 short replies (< 200 KiB), its read buffer at most
        // the 256 KiB read budget.
        NOISE_MIB + 1,
        |sent| {
            format!(
                "{acked} accepted, {limited} rate_limited, closed 1008 after {elapsed:?}; healthy \
                 client got {sent} messages"
            )
        },
    );
}

// =============================================================================================
// Ping flood
// =============================================================================================

#[test]
fn ping_flood_from_a_client_that_never_reads() {
    let _serial = serial();
    const PINGS: usize = 20_000;
    let hub = Hub::start(|_| {});
    let (mut attacker, shard) = raw_upgraded(hub.addr);
    let watch = Watch::start(&hub, &[shard]);
    let mut rss = Rss::before("ping flood");

    // 20,000 pings with the largest control payload (125 bytes), as fast as possible, reading
    // nothing. The pongs (2.5 MB) fill the kernel's send buffer (up to tcp_wmem's maximum, 4 MiB
    // by default) and then the hub's outbox, where more than max_queued_bytes (1 MiB) is a slow
    // consumer (1013). On loopback the kernel usually takes them all: the attacker "keeps up".
    let payload = [0x5a; 125];
    let ping = masked_frame(0x9, true, &payload);
    let mut writer = attacker.try_clone().unwrap();
    writer.set_write_timeout(Some(WAIT)).unwrap();
    let flood = thread::spawn(move || {
        let mut batch = Vec::with_capacity(ping.len() * 100);
        for _ in 0..100 {
            batch.extend_from_slice(&ping);
        }
        let mut sent = 0;
        while sent < PINGS {
            if writer.write_all(&batch).is_err() {
                break;
            }
            sent += 100;
        }
        sent
    });
    watch.wait_progress(3, "during the ping flood");
    rss.sample("during");
    let pinged = flood.join().unwrap();
    rss.sample("flood sent");
    let (pongs, close) = read_server_frames(&mut attacker, PINGS, |op, p| {
        assert_eq!(op, OpCode::Control(Control::Pong));
        assert_eq!(p, payload);
    });
    match close {
        None => assert_eq!(pongs, PINGS, "the attacker kept up: every ping answered"),
        Some(code) => {
            assert_eq!(code, 1013, "closed as a slow consumer");
            assert!(pongs < PINGS);
            assert_eq!(metric(hub.addr, "ringhub_slow_consumer_closes_total"), 1);
        }
    }
    watch.conclude(
        rss,
        // The hub holds at most max_queued_bytes (1 MiB) of pongs for the attacker plus its
        // read budget (256 KiB); the kernel's send buffer (up to tcp_wmem, 4 MiB) is not RSS.
        NOISE_MIB + 2,
        |sent| {
            format!(
                "{pinged} pings sent, {pongs} pongs received, close {close:?}; healthy client got \
                 {sent} messages"
            )
        },
    );
}

// =============================================================================================
// Subscribe/unsubscribe churn
// =============================================================================================

#[test]
fn subscribe_unsubscribe_churn_without_reading_replies() {
    let _serial = serial();
    const OPS: usize = 20_000;
    let hub = Hub::start(|_| {});
    let mut attacker = Client::connect(hub.addr);
    let watch = Watch::start(&hub, &[attacker.shard()]);
    let mut rss = Rss::before("subscribe churn");

    // Alternating subscribe/unsubscribe, each pair on a new 200-byte channel name (every
    // subscribe is a first local subscriber, announced to the other shard), never reading.
    let channel = |i: usize| format!("{i:0>200}");
    let writer = thread::spawn(move || {
        attacker.ws.get_ref().set_write_timeout(Some(WAIT)).unwrap();
        for i in 0..OPS {
            let kind = if i % 2 == 0 {
                "subscribe"
            } else {
                "unsubscribe"
            };
            let cmd = json!({"type":kind,"channel":channel(i / 2),"id":i});
            if attacker.ws.write(Message::text(cmd.to_string())).is_err() {
                break;
            }
        }
        let _ = attacker.ws.flush();
        attacker
    });
    watch.wait_progress(3, "during the churn");
    rss.sample("during");
    let mut attacker = writer.join().unwrap();
    rss.sample("churn sent");

    // Every reply in order, or a slow-consumer close (the replies outgrew the outbox).
    let mut replies = 0;
    let close = loop {
        match attacker.ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                let kind = if replies % 2 == 0 {
                    "subscribed"
                } else {
                    "unsubscribed"
                };
                assert_eq!(v["type"], kind, "{v}");
                assert_eq!(v["id"], replies);
                assert_eq!(v["channel"], channel(replies / 2));
                replies += 1;
                if replies == OPS {
                    break None;
                }
            }
            Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    };
    match close {
        None => {
            attacker.send_json(json!({"type":"ping","id":"end"}));
            assert_eq!(attacker.recv_json(), json!({"type":"pong","id":"end"}));
        }
        Some(code) => assert_eq!(code, 1013, "closed as a slow consumer"),
    }
    watch.conclude(
        rss,
        // At most max_queued_bytes (1 MiB) of replies queued, the 256 KiB read budget, and one
        // subscription at a time in the registry: 5 MB of replies held in user space would not
        // fit.
        NOISE_MIB + 2,
        |sent| {
            format!(
                "{OPS} ops, {replies} replies read, close {close:?}; healthy client got {sent} \
                 messages"
            )
        },
    );
}

// =============================================================================================
// Huge headers
// =============================================================================================

#[test]
fn huge_request_heads_get_431() {
    let _serial = serial();
    let hub = Hub::start(|_| {});
    let watch = Watch::start(&hub, &[0, 1]);
    let mut rss = Rss::before("huge headers");

    // 16 headers of 4 KiB: 64 KiB of head, 8 times the 8 KiB limit.
    let mut head = format!("GET /ws HTTP/1.1\r\nHost: {}\r\n", hub.addr);
    for i in 0..16 {
        head.push_str(&format!("X-Pad-{i}: {}\r\n", "a".repeat(4096)));
    }
    head.push_str("\r\n");
    for i in 0..100 {
        let mut s = raw(hub.addr);
        // The hub answers after 8 KiB and discards the rest, so the whole write completes.
        s.write_all(head.as_bytes()).expect("write the head");
        let resp = read_http_head(&mut s);
        assert!(resp.starts_with("HTTP/1.1 431 "), "request {i}: {resp:?}");
        if i == 50 {
            rss.sample("during");
        }
    }
    watch.conclude(
        rss,
        // Each request holds at most an 8 KiB head buffer on the hub, one at a time: keeping
        // the 6.4 MB of heads would not fit.
        NOISE_MIB + 1,
        |sent| {
            format!(
                "100 requests of 64 KiB heads answered 431; healthy clients got {sent} messages"
            )
        },
    );
}

// =============================================================================================
// Pipelined garbage
// =============================================================================================

#[test]
fn ten_megabytes_of_garbage_after_the_upgrade_close_the_connection() {
    let _serial = serial();
    const GARBAGE: usize = 10_000_000;
    let hub = Hub::start(|_| {});
    let (mut attacker, shard) = raw_upgraded(hub.addr);
    let watch = Watch::start(&hub, &[shard]);
    let mut rss = Rss::before("pipelined garbage");

    // Random bytes (a fixed xorshift sequence, so a failure can be replayed), written in 64 KiB
    // chunks while the main thread reads the hub's answer.
    let mut writer = attacker.try_clone().unwrap();
    writer.set_write_timeout(Some(WAIT)).unwrap();
    let flood = thread::spawn(move || {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut chunk = vec![0u8; 64 << 10];
        let mut sent = 0;
        while sent < GARBAGE {
            for b in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            if writer.write_all(&chunk).is_err() {
                break; // the hub gave up on the connection
            }
            sent += chunk.len();
        }
        let _ = writer.shutdown(std::net::Shutdown::Write);
        sent
    });
    let (_, close) = read_server_frames(&mut attacker, usize::MAX, |op, p| {
        panic!("unexpected {op:?} frame before the close: {p:?}")
    });
    rss.sample("during");
    let code = close.expect("a close frame");
    assert!(
        [1002, 1007, 1009].contains(&code),
        "garbage closed with {code}"
    );
    let written = flood.join().unwrap();
    // Then the hub ends the connection (it saw our FIN, or its close deadline passed).
    let mut rest = Vec::new();
    match attacker.read_to_end(&mut rest) {
        Ok(_) => assert!(
            rest.is_empty(),
            "{} bytes after the close frame",
            rest.len()
        ),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    watch.conclude(
        rss,
        // The hub stops decoding at the first bad frame and discards the rest 4 KiB at a time:
        // buffering the 10 MB would not fit.
        NOISE_MIB + 1,
        |sent| {
            format!(
            "{written} bytes of garbage written, closed {code}; healthy client got {sent} messages"
        )
        },
    );
}
