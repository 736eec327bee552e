//! Publish→deliver latency across two instances, beside a bare Redis PUBLISH→subscriber round
//! trip measured the same way (same rate, payload and clock), for docs/benchmarks.md.
//!
//! ```sh
//! cargo run --release --example cross_latency -- hub ws://127.0.0.1:8081/ws ws://127.0.0.1:8082/ws
//! cargo run --release --example cross_latency -- redis 127.0.0.1:6400
//! ```
//! Optional env: RATE (messages/s, default 1000), SECONDS (default 10), WARMUP (default 2).
//!
//! Each message carries its INTENDED send time (CLOCK_MONOTONIC, shared by processes on one
//! host); latency is receive time minus intended time, so a stalled publisher cannot hide stalls.
//! Prints p50/p90/p99/p99.9/max in µs and the loss count.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Extract the intended send time `"t":<ns>` from a received text.
fn intended(text: &str) -> Option<u64> {
    let i = text.find("\"t\":")? + 4;
    let digits: String = text[i..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn report(label: &str, mut lat: Vec<u64>, sent: u64) {
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (lat.len() as f64 - 1.0)).round() as usize;
        lat[i] as f64 / 1000.0
    };
    println!(
        "{label}: measured {} of {sent} sent | p50 {:.1} µs  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        lat.len(),
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        pct(100.0)
    );
}

/// Run the publisher schedule: message k intended at start + k/rate; `send(k, intended_ns)`.
fn publish_loop(rate: u64, total: u64, mut send: impl FnMut(u64, u64)) {
    let start = now_ns() + 50_000_000;
    let period = 1_000_000_000 / rate.max(1);
    for k in 0..total {
        let due = start + k * period;
        loop {
            let now = now_ns();
            if now >= due {
                break;
            }
            let left = due - now;
            if left > 200_000 {
                std::thread::sleep(Duration::from_nanos(left - 100_000));
            } else {
                std::hint::spin_loop();
            }
        }
        send(k, due);
    }
}

fn ws_connect(url: &str) -> tungstenite::WebSocket<TcpStream> {
    let hostport = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .expect("host:port");
    let stream = TcpStream::connect(hostport).expect("connect to the hub");
    stream.set_nodelay(true).unwrap();
    let (mut ws, _) = tungstenite::client(url, stream).expect("upgrade");
    let _welcome = ws.read().expect("welcome");
    ws
}

fn hub(pub_url: &str, sub_url: &str, rate: u64, seconds: u64, warmup: u64) {
    let mut sub = ws_connect(sub_url);
    sub.send(tungstenite::Message::text(
        r#"{"type":"subscribe","channel":"lat","id":1}"#,
    ))
    .unwrap();
    let ack = sub.read().unwrap();
    assert!(ack.to_text().unwrap().contains("subscribed"), "{ack}");
    let total = rate * (seconds + warmup);
    let warm = rate * warmup;
    let reader = std::thread::spawn(move || {
        sub.get_mut()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut lat = Vec::with_capacity(total as usize);
        let mut got = 0u64;
        while got < total {
            let Ok(msg) = sub.read() else { break };
            let received = now_ns();
            let Ok(text) = msg.to_text() else { continue };
            if let Some(t) = intended(text) {
                got += 1;
                if got > warm {
                    lat.push(received.saturating_sub(t));
                }
            }
        }
        (lat, got)
    });
    let mut publ = ws_connect(pub_url);
    publish_loop(rate, total, |k, due| {
        let text = format!(
            r#"{{"type":"publish","channel":"lat","data":{{"k":{k},"t":{due},"x":"0123456789012345678901234567890123456789"}}}}"#
        );
        publ.send(tungstenite::Message::text(text)).unwrap();
    });
    let (lat, got) = reader.join().unwrap();
    println!("hub: received {got} of {total} (lost {})", total - got);
    report("hub publish→deliver across instances", lat, total - warm);
}

fn resp_cmd(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

fn redis(addr: &str, rate: u64, seconds: u64, warmup: u64) {
    let mut sub = TcpStream::connect(addr).expect("connect to Redis");
    sub.set_nodelay(true).unwrap();
    sub.write_all(&resp_cmd(&["SUBSCRIBE", "lat"])).unwrap();
    let total = rate * (seconds + warmup);
    let warm = rate * warmup;
    let mut reader = BufReader::new(sub);
    let mut line = String::new();
    // The subscribe confirmation: *3, $9, subscribe, $3, lat, :1.
    for _ in 0..6 {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    let handle = std::thread::spawn(move || {
        reader
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut lat = Vec::with_capacity(total as usize);
        let mut got = 0u64;
        let mut line = String::new();
        while got < total {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let received = now_ns();
            if let Some(t) = intended(&line) {
                got += 1;
                if got > warm {
                    lat.push(received.saturating_sub(t));
                }
            }
        }
        (lat, got)
    });
    let mut publ = TcpStream::connect(addr).unwrap();
    publ.set_nodelay(true).unwrap();
    let mut replies = publ.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = replies.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    publish_loop(rate, total, |k, due| {
        let data =
            format!(r#"{{"k":{k},"t":{due},"x":"0123456789012345678901234567890123456789"}}"#);
        publ.write_all(&resp_cmd(&["PUBLISH", "lat", &data]))
            .unwrap();
    });
    let (lat, got) = handle.join().unwrap();
    let _ = publ.shutdown(std::net::Shutdown::Both);
    let _ = drain.join();
    println!("redis: received {got} of {total} (lost {})", total - got);
    report("bare Redis PUBLISH→subscriber", lat, total - warm);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rate = env("RATE", 1000);
    let seconds = env("SECONDS", 10);
    let warmup = env("WARMUP", 2);
    let started = Instant::now();
    match args.get(1).map(String::as_str) {
        Some("hub") if args.len() >= 4 => hub(&args[2], &args[3], rate, seconds, warmup),
        Some("redis") if args.len() >= 3 => redis(&args[2], rate, seconds, warmup),
        _ => {
            eprintln!(
                "usage: cross_latency hub PUB_WS_URL SUB_WS_URL | cross_latency redis HOST:PORT"
            );
            std::process::exit(2);
        }
    }
    eprintln!(
        "(rate {rate}/s, {seconds} s measured after {warmup} s warm-up, {:.1} s total)",
        started.elapsed().as_secs_f64()
    );
}
