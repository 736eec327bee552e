//! Test support: a real hub on 127.0.0.1:0 (`ringhub::server::start`) and real WebSocket clients
//! (tungstenite over blocking std sockets, with read timeouts so no test can hang).
#![allow(dead_code)]

use ringhub::config::Config;
use ringhub::server::{self, ServerHandle};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// How long a test waits for any single expected event before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running hub; shut down (gracefully) when dropped.
pub struct Hub {
    pub handle: Option<ServerHandle>,
    pub addr: SocketAddr,
}

impl Hub {
    /// Start a hub with 2 shards, not pinned (tests run in parallel), on a free port.
    pub fn start(tweak: impl FnOnce(&mut Config)) -> Hub {
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            shards: 2,
            pin: false,
            ..Config::default()
        };
        tweak(&mut cfg);
        let handle = server::start(cfg).expect("hub starts");
        let addr = handle.local_addr();
        Hub {
            handle: Some(handle),
            addr,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Graceful shutdown and wait for every shard to exit.
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
            h.join();
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A WebSocket client of the hub.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    /// The connection id from the welcome message.
    pub id: String,
    pub instance: String,
}

impl Client {
    /// Connect, upgrade, and read the welcome message.
    pub fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr, None)
            .unwrap_or_else(|status| panic!("websocket upgrade refused with HTTP {status}"))
    }

    /// Connect and upgrade (with a tungstenite configuration, e.g. a small read buffer), and read
    /// the welcome message; `Err(status)` when the upgrade is answered with an HTTP error.
    pub fn try_connect(
        addr: SocketAddr,
        config: Option<tungstenite::protocol::WebSocketConfig>,
    ) -> Result<Client, u16> {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let (ws, resp) = match tungstenite::client::client_with_config(
            format!("ws://{addr}/ws"),
            stream,
            config,
        ) {
            Ok(ok) => ok,
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                return Err(resp.status().as_u16())
            }
            Err(e) => panic!("websocket upgrade: {e}"),
        };
        assert_eq!(resp.status(), 101);
        let mut c = Client {
            ws,
            id: String::new(),
            instance: String::new(),
        };
        let welcome = c.recv_json();
        assert_eq!(welcome["type"], "welcome", "first message: {welcome}");
        c.id = welcome["connection"]
            .as_str()
            .expect("connection id")
            .to_string();
        c.instance = welcome["instance"]
            .as_str()
            .expect("instance id")
            .to_string();
        Ok(c)
    }

    /// The shard this connection landed on.
    pub fn shard(&self) -> usize {
        shard_of(&self.id)
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("send");
    }

    pub fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string());
    }

    /// The next text frame as its exact text (pings and pongs are skipped).
    pub fn recv_text(&mut self) -> String {
        loop {
            match self.ws.read().expect("read a message") {
                Message::Text(t) => return t.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The next text message, parsed (pings are answered by tungstenite and skipped).
    pub fn recv_json(&mut self) -> Value {
        loop {
            match self.ws.read().expect("read a message") {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("server sent invalid JSON {t:?}: {e}"))
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Subscribe and wait for the acknowledgement.
    pub fn subscribe(&mut self, channel: &str) {
        self.send_json(serde_json::json!({"type":"subscribe","channel":channel,"id":"s"}));
        let ack = self.recv_json();
        assert_eq!(ack["type"], "subscribed", "{ack}");
        assert_eq!(ack["channel"], channel);
    }

    /// Publish with an id and wait for the acknowledgement (messages arriving first are returned).
    pub fn publish_acked(&mut self, channel: &str, data: Value) -> Vec<Value> {
        self.send_json(
            serde_json::json!({"type":"publish","channel":channel,"data":data,"id":"p"}),
        );
        let mut other = Vec::new();
        loop {
            let v = self.recv_json();
            if v["type"] == "published" {
                assert_eq!(v["id"], "p");
                return other;
            }
            other.push(v);
        }
    }

    /// Read until the server's close frame; returns (code, reason).
    pub fn expect_close(&mut self) -> (u16, String) {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no close frame within {WAIT:?}");
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
                Ok(Message::Close(None)) => return (1005, String::new()),
                Ok(_) => continue,
                Err(e) => panic!("connection ended without a close frame: {e}"),
            }
        }
    }
}

/// The value of one exact series line (`name{labels} value`) in Prometheus text.
pub fn series_value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("series {series} not found in metrics:\n{text}"))
}

/// The value of one series of the hub's `GET /metrics`, written as it appears there:
/// `ringhub_connections`, `ringhub_errors_total{code="rate_limited"}`.
pub fn metric(addr: SocketAddr, series: &str) -> u64 {
    let (status, text) = http(addr, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200, "GET /metrics: {text}");
    series_value(&text, series)
}

/// Wait (up to WAIT) until the hub counts exactly `n` open WebSocket connections: closed and
/// reset clients must be noticed and forgotten.
pub fn wait_for_open_connections(hub: &Hub, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let open = metric(hub.addr, "ringhub_connections");
        if open == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ringhub_connections stays at {open}, expected {n}: connections leaked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that landed on `shard` (the kernel spreads connections by hash; others are dropped).
pub fn client_on_shard(addr: SocketAddr, shard: usize) -> Client {
    for _ in 0..500 {
        let c = Client::connect(addr);
        if c.shard() == shard {
            return c;
        }
    }
    panic!("could not get a connection on shard {shard} in 500 tries");
}

/// The shard part of a connection id (`<instance>-<shard>-<key>-<seq>`).
pub fn shard_of(connection_id: &str) -> usize {
    connection_id.rsplit('-').nth(2).unwrap().parse().unwrap()
}

/// Connect clients until one lands on each of the wanted shards (the kernel spreads connections
/// over the SO_REUSEPORT listeners by hash). Returns one client per shard, in shard order.
pub fn clients_on_each_shard(addr: SocketAddr, shards: usize) -> Vec<Client> {
    let mut found: Vec<Option<Client>> = (0..shards).map(|_| None).collect();
    for _ in 0..500 {
        let c = Client::connect(addr);
        let s = c.shard();
        if found[s].is_none() {
            found[s] = Some(c);
        }
        if found.iter().all(Option::is_some) {
            return found.into_iter().map(Option::unwrap).collect();
        }
    }
    panic!("could not get a connection on every shard in 500 tries");
}

/// A raw TCP connection for hostile-input tests.
pub fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// A valid upgrade request for `/ws`.
pub fn upgrade_request(addr: SocketAddr) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Read an HTTP response head (until the blank line) from a raw socket.
pub fn read_http_head(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => out.push(b[0]),
            Err(e) => panic!("reading HTTP response: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A plain HTTP/1.1 request (Connection: close); returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = raw(addr);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read HTTP response");
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A client-side masked frame (RSV clear), for hand-built hostile input.
pub fn masked_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ringhub::codec::encode_masked(
        ringhub::codec::OpCode::from(opcode),
        fin,
        payload,
        [0x12, 0x34, 0x56, 0x78],
        &mut out,
    );
    out
}

/// Parse server frames from a raw socket until a close frame; returns its code (1005 if none).
/// Panics if the connection ends first.
pub fn raw_expect_close(s: &mut TcpStream) -> u16 {
    let mut buf = bytes::BytesMut::new();
    let deadline = Instant::now() + WAIT;
    loop {
        while let Some((op, _fin, payload)) =
            ringhub::codec::decode_server_frame(&mut buf).expect("valid server frame")
        {
            if op == ringhub::codec::OpCode::Control(ringhub::codec::Control::Close) {
                return if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                };
            }
        }
        assert!(Instant::now() < deadline, "no close frame");
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => panic!("connection ended without a close frame"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Close code helper for tungstenite's enum.
pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}
