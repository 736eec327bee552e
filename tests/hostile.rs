//! Hostile-client integration tests: malformed handshakes, protocol violations, oversized and
//! invalid input, floods and slow-loris connections. In every test a healthy subscriber (the
//! "sentinel") stays connected through the attack and must still get its messages afterwards, and
//! two fresh clients must still be able to subscribe and publish ([`assert_healthy`]).

mod common;
use common::*;

use bytes::{Bytes, BytesMut};
use ringhub::codec::{Control, Data, OpCode};
use ringhub::config::Config;
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use tungstenite::Message;

// Client frame opcodes.
const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

const TEXT_OP: OpCode = OpCode::Data(Data::Text);
const CLOSE_OP: OpCode = OpCode::Control(Control::Close);
const PING_OP: OpCode = OpCode::Control(Control::Ping);
const PONG_OP: OpCode = OpCode::Control(Control::Pong);

/// A name no other test (or other part of this test) uses.
fn unique(prefix: &str) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

// ----- healthy clients -----

/// Two fresh clients: one subscribes, the other publishes, the first gets the message.
fn assert_healthy(hub: &Hub) {
    let channel = unique("healthy");
    let mut sub = Client::connect(hub.addr);
    let mut publisher = Client::connect(hub.addr);
    sub.subscribe(&channel);
    let extra = publisher.publish_acked(&channel, json!({"healthy": true}));
    assert!(
        extra.is_empty(),
        "publisher got unexpected messages: {extra:?}"
    );
    assert_eq!(
        sub.recv_json(),
        json!({"type":"message","channel":channel,"data":{"healthy":true}})
    );
}

/// A subscriber connected before the attack and checked after it.
struct Sentinel {
    client: Client,
    channel: String,
}

impl Sentinel {
    fn new(hub: &Hub) -> Sentinel {
        let channel = unique("sentinel");
        let mut client = Client::connect(hub.addr);
        client.subscribe(&channel);
        Sentinel { client, channel }
    }

    /// The sentinel still receives publishes and still answers commands.
    fn check(&mut self, hub: &Hub) {
        let mut publisher = Client::connect(hub.addr);
        let extra = publisher.publish_acked(&self.channel, json!({"still": "here"}));
        assert!(
            extra.is_empty(),
            "publisher got unexpected messages: {extra:?}"
        );
        assert_eq!(
            self.client.recv_json(),
            json!({"type":"message","channel":self.channel,"data":{"still":"here"}}),
            "the long-lived healthy client lost its subscription"
        );
        self.client
            .send_json(json!({"type":"ping","id":"sentinel"}));
        assert_eq!(
            self.client.recv_json(),
            json!({"type":"pong","id":"sentinel"})
        );
    }
}

/// Start a hub, connect the sentinel, run the attack, then check that the hub still serves both
/// the sentinel and fresh clients, and that no WebSocket connection leaked: once every attacking
/// client is gone, the sentinel is the only one the hub counts.
fn under_attack(tweak: impl FnOnce(&mut Config), attack: impl FnOnce(&Hub)) {
    let hub = Hub::start(tweak);
    let mut sentinel = Sentinel::new(&hub);
    attack(&hub);
    assert_healthy(&hub);
    sentinel.check(&hub);
    wait_for_open_connections(&hub, 1);
    sentinel.check(&hub);
}

// ----- raw WebSocket client -----

/// A WebSocket client over a raw socket: frames are built and parsed by hand.
struct RawWs {
    s: TcpStream,
    buf: BytesMut,
}

impl RawWs {
    /// Upgrade by hand and read the welcome.
    fn open(hub: &Hub) -> RawWs {
        let mut s = raw(hub.addr);
        s.set_nodelay(true).unwrap();
        s.write_all(upgrade_request(hub.addr).as_bytes()).unwrap();
        let head = read_http_head(&mut s);
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "upgrade failed: {head:?}"
        );
        let mut ws = RawWs {
            s,
            buf: BytesMut::new(),
        };
        let welcome = ws.recv_json();
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        ws
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write to the hub");
    }

    fn send_frame(&mut self, opcode: u8, fin: bool, payload: &[u8]) {
        self.send(&masked_frame(opcode, fin, payload));
    }

    fn send_text(&mut self, text: &str) {
        self.send_frame(TEXT, true, text.as_bytes());
    }

    /// The next frame from the server; None at a clean end of stream.
    fn next_frame(&mut self) -> Option<(OpCode, bool, Bytes)> {
        loop {
            if let Some(frame) =
                ringhub::codec::decode_server_frame(&mut self.buf).expect("valid server frame")
            {
                return Some(frame);
            }
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk) {
                Ok(0) => {
                    assert!(
                        self.buf.is_empty(),
                        "stream ended inside a frame: {:?}",
                        &self.buf[..]
                    );
                    return None;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("reading from the hub failed (timeout or reset): {e}"),
            }
        }
    }

    /// The next text message, parsed (ping/pong frames are skipped).
    fn recv_json(&mut self) -> Value {
        loop {
            match self.next_frame() {
                Some((op, fin, payload)) if op == TEXT_OP => {
                    assert!(fin, "server frames are never fragmented");
                    return serde_json::from_slice(&payload)
                        .unwrap_or_else(|e| panic!("server sent invalid JSON {payload:?}: {e}"));
                }
                Some((op, _, _)) if op == PING_OP || op == PONG_OP => continue,
                Some(other) => panic!("expected a text message, got {other:?}"),
                None => panic!("connection ended while waiting for a text message"),
            }
        }
    }

    /// Read up to the server's close frame; returns its code (1005 when it has no payload) and
    /// the text messages that came before it.
    fn expect_close(&mut self) -> (u16, Vec<Value>) {
        let mut texts = Vec::new();
        loop {
            match self.next_frame() {
                Some((op, _, payload)) if op == CLOSE_OP => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        assert!(payload.is_empty(), "1-byte close payload");
                        1005
                    };
                    return (code, texts);
                }
                Some((op, _, payload)) if op == TEXT_OP => texts.push(
                    serde_json::from_slice(&payload)
                        .unwrap_or_else(|e| panic!("invalid JSON {payload:?}: {e}")),
                ),
                Some((op, _, _)) if op == PING_OP || op == PONG_OP => continue,
                Some(other) => panic!("unexpected frame before the close frame: {other:?}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// After the close frame the server closes the TCP connection cleanly (FIN, not RST) and
    /// sends nothing else.
    fn expect_eof(&mut self) {
        assert!(
            self.buf.is_empty(),
            "bytes after the close frame: {:?}",
            &self.buf[..]
        );
        let mut chunk = [0u8; 1024];
        match self.s.read(&mut chunk) {
            Ok(0) => {}
            Ok(n) => panic!("data after the close frame: {:?}", &chunk[..n]),
            Err(e) => panic!("expected a clean end of stream after the close frame, got {e}"),
        }
    }

    /// The connection is failed with `code` and nothing else is sent.
    fn expect_failed(&mut self, code: u16, what: &str) {
        let (got, texts) = self.expect_close();
        assert_eq!(got, code, "{what}: close code");
        assert!(texts.is_empty(), "{what}: unexpected replies {texts:?}");
        self.expect_eof();
    }

    /// A JSON ping round trip: the connection is open and in sync.
    fn ping_pong(&mut self, id: &str) {
        self.send_text(&json!({"type":"ping","id":id}).to_string());
        assert_eq!(self.recv_json(), json!({"type":"pong","id":id}));
    }
}

/// Send `bytes` on a fresh raw WebSocket and expect the server to fail the connection with `code`.
fn violation(hub: &Hub, bytes: &[u8], code: u16, what: &str) {
    let mut ws = RawWs::open(hub);
    ws.send(bytes);
    ws.expect_failed(code, what);
}

/// A masked client frame with the given first byte (FIN, RSV bits and opcode as is).
fn frame_with_b0(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = masked_frame(b0 & 0x0F, b0 & 0x80 != 0, payload);
    f[0] = b0;
    f
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

fn expect_too_large(ws: &mut RawWs, what: &str) {
    let (code, texts) = ws.expect_close();
    assert_eq!(code, 1009, "{what}: close code");
    assert_eq!(
        texts.len(),
        1,
        "{what}: expected one error reply, got {texts:?}"
    );
    assert_eq!(texts[0]["type"], "error", "{what}: {}", texts[0]);
    assert_eq!(
        texts[0]["code"], "message_too_large",
        "{what}: {}",
        texts[0]
    );
    assert!(texts[0]["message"].is_string(), "{what}: {}", texts[0]);
    ws.expect_eof();
}

// ----- raw HTTP -----

fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status line in {head:?}"))
}

fn has_header(head: &str, name: &str, value: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case(name) && v.trim().eq_ignore_ascii_case(value)
        })
    })
}

/// Send raw request bytes; returns the response head and the socket.
fn request(hub: &Hub, bytes: &[u8]) -> (String, TcpStream) {
    let mut s = raw(hub.addr);
    // The server may answer (and stop reading) before it has everything: a failed write is fine,
    // the response must still arrive.
    let _ = s.write_all(bytes);
    let head = read_http_head(&mut s);
    (head, s)
}

/// After a `Connection: close` response, the rest (the body) arrives and then a clean end of
/// stream (no reset, so the response cannot have been destroyed).
fn expect_response_then_eof(s: &mut TcpStream, head: &str, what: &str) {
    assert!(has_header(head, "connection", "close"), "{what}: {head:?}");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("{what}: no clean end of stream after the response: {e}"));
    let body = String::from_utf8_lossy(&rest);
    assert!(body.contains("\"ok\":false"), "{what}: body {body:?}");
}

fn upgrade_with(path: &str, method: &str, headers: &[&str]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

const UPGRADE: &str = "Upgrade: websocket";
const CONN_UPGRADE: &str = "Connection: Upgrade";
const GOOD_KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";
const V13: &str = "Sec-WebSocket-Version: 13";

/// Read until the server closes the connection (EOF or error). Panics if it is still open
/// after WAIT. Returns the bytes received.
fn read_until_closed(s: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the server did not close the connection within {WAIT:?}")
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return got,
        }
    }
}

// =============================================================================================
// 1. Malformed upgrade requests
// =============================================================================================

#[test]
fn malformed_upgrade_requests_are_rejected() {
    under_attack(
        |_| {},
        |hub| {
            // (what, request, expected status)
            let rejected: Vec<(&str, Vec<u8>, u16)> = vec![
                (
                    "missing Sec-WebSocket-Key",
                    upgrade_with("/ws", "GET", &[UPGRADE, CONN_UPGRADE, V13]),
                    400,
                ),
                (
                    "key of 10 bytes",
                    upgrade_with(
                        "/ws",
                        "GET",
                        &[
                            UPGRADE,
                            CONN_UPGRADE,
                            "Sec-WebSocket-Key: dGhlIHNhbXBsZQ==",
                            V13,
                        ],
                    ),
                    400,
                ),
                (
                    "key of 17 bytes",
                    upgrade_with(
                        "/ws",
                        "GET",
                        &[
                            UPGRADE,
                            CONN_UPGRADE,
                            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZTE=",
                            V13,
                        ],
                    ),
                    400,
                ),
                (
                    "key not base64",
                    upgrade_with(
                        "/ws",
                        "GET",
                        &[
                            UPGRADE,
                            CONN_UPGRADE,
                            "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==",
                            V13,
                        ],
                    ),
                    400,
                ),
                (
                    "missing Sec-WebSocket-Version",
                    upgrade_with("/ws", "GET", &[UPGRADE, CONN_UPGRADE, GOOD_KEY]),
                    400,
                ),
                (
                    "no Connection: upgrade token",
                    upgrade_with(
                        "/ws",
                        "GET",
                        &[UPGRADE, "Connection: keep-alive", GOOD_KEY, V13],
                    ),
                    400,
                ),
                (
                    "garbage request line",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(),
                    400,
                ),
                (
                    "garbage text",
                    b"HELLO THERE\x00\x01\x02 WORLD\r\n\r\n".to_vec(),
                    400,
                ),
            ];
            for (what, req, status) in rejected {
                let (head, mut s) = request(hub, &req);
                assert_eq!(status_of(&head), status, "{what}: {head:?}");
                expect_response_then_eof(&mut s, &head, what);
            }

            // Version 8 → 426 naming the supported version.
            let req = upgrade_with(
                "/ws",
                "GET",
                &[UPGRADE, CONN_UPGRADE, GOOD_KEY, "Sec-WebSocket-Version: 8"],
            );
            let (head, mut s) = request(hub, &req);
            assert_eq!(status_of(&head), 426, "{head:?}");
            assert!(
                has_header(&head, "sec-websocket-version", "13"),
                "426 without Sec-WebSocket-Version: 13: {head:?}"
            );
            expect_response_then_eof(&mut s, &head, "version 8");

            // Not 101, and a client error.
            let not_upgraded: Vec<(&str, Vec<u8>)> = vec![
                (
                    "POST upgrade",
                    upgrade_with("/ws", "POST", &[UPGRADE, CONN_UPGRADE, GOOD_KEY, V13]),
                ),
                (
                    "no Upgrade header",
                    upgrade_with("/ws", "GET", &[CONN_UPGRADE, GOOD_KEY, V13]),
                ),
                (
                    "Upgrade: h2c",
                    upgrade_with("/ws", "GET", &["Upgrade: h2c", CONN_UPGRADE, GOOD_KEY, V13]),
                ),
            ];
            for (what, req) in not_upgraded {
                let (head, _s) = request(hub, &req);
                let status = status_of(&head);
                assert!((400..500).contains(&status), "{what}: {head:?}");
            }

            // HTTP/1.0 cannot upgrade.
            let req = format!(
                "GET /ws HTTP/1.0\r\n{UPGRADE}\r\n{CONN_UPGRADE}\r\n{GOOD_KEY}\r\n{V13}\r\n\r\n"
            );
            let (head, mut s) = request(hub, req.as_bytes());
            assert_eq!(status_of(&head), 400, "HTTP/1.0 upgrade: {head:?}");
            expect_response_then_eof(&mut s, &head, "HTTP/1.0 upgrade");

            // Two keys are not one valid key.
            let req = upgrade_with(
                "/ws",
                "GET",
                &[UPGRADE, CONN_UPGRADE, GOOD_KEY, GOOD_KEY, V13],
            );
            let (head, mut s) = request(hub, &req);
            assert_eq!(status_of(&head), 400, "duplicate key: {head:?}");
            expect_response_then_eof(&mut s, &head, "duplicate key");

            // Transfer-Encoding is not supported (501), also on an upgrade.
            let req = upgrade_with(
                "/ws",
                "GET",
                &[
                    UPGRADE,
                    CONN_UPGRADE,
                    GOOD_KEY,
                    V13,
                    "Transfer-Encoding: chunked",
                ],
            );
            let (head, mut s) = request(hub, &req);
            assert_eq!(status_of(&head), 501, "chunked upgrade: {head:?}");
            expect_response_then_eof(&mut s, &head, "chunked upgrade");

            // Unknown path → 404.
            let (head, _s) = request(
                hub,
                &upgrade_with("/nope", "GET", &[UPGRADE, CONN_UPGRADE, GOOD_KEY, V13]),
            );
            assert_eq!(status_of(&head), 404, "{head:?}");

            // A 20 KiB header block → 431, and the response is not destroyed by a reset even
            // though the server stops reading the head at its limit.
            let mut big = String::from("GET /ws HTTP/1.1\r\nHost: localhost\r\n");
            big.push_str(&format!("X-Padding: {}\r\n", "a".repeat(20 << 10)));
            big.push_str("Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
            let (head, mut s) = request(hub, big.as_bytes());
            assert_eq!(status_of(&head), 431, "{head:?}");
            expect_response_then_eof(&mut s, &head, "20 KiB head");

            // Many small headers (over the header count limit) → 431 too.
            let mut many = String::from("GET /ws HTTP/1.1\r\n");
            for i in 0..100 {
                many.push_str(&format!("X-H{i}: {i}\r\n"));
            }
            many.push_str("\r\n");
            let (head, mut s) = request(hub, many.as_bytes());
            assert_eq!(status_of(&head), 431, "{head:?}");
            expect_response_then_eof(&mut s, &head, "100 headers");

            // A correct request still upgrades (the validation is not simply rejecting all).
            let (head, _s) = request(
                hub,
                &upgrade_with("/ws", "GET", &[UPGRADE, CONN_UPGRADE, GOOD_KEY, V13]),
            );
            assert_eq!(status_of(&head), 101, "{head:?}");
            assert!(
                has_header(
                    &head,
                    "sec-websocket-accept",
                    "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
                ),
                "{head:?}"
            );
        },
    );
}

// =============================================================================================
// 2. Unmasked client frame
// =============================================================================================

#[test]
fn unmasked_client_frame_closes_1002() {
    under_attack(
        |_| {},
        |hub| {
            let mut ws = RawWs::open(hub);
            assert!(ws.buf.is_empty(), "only the welcome was expected");
            // A valid text frame, FIN set, mask bit clear.
            let payload = br#"{"type":"ping","id":1}"#;
            let mut frame = vec![0x81, payload.len() as u8];
            frame.extend_from_slice(payload);
            ws.send(&frame);
            assert_eq!(raw_expect_close(&mut ws.s), 1002);

            // Unmasked ping control frame too.
            violation(hub, &[0x89, 0x02, b'h', b'i'], 1002, "unmasked ping");
        },
    );
}

// =============================================================================================
// 3. Invalid UTF-8
// =============================================================================================

#[test]
fn invalid_utf8_in_single_frame_closes_1007() {
    under_attack(
        |_| {},
        |hub| {
            let cases: [(&str, &[u8]); 4] = [
                ("0xFF byte", b"{\"type\":\"ping\",\"id\":\"\xff\"}"),
                (
                    "overlong encoding",
                    b"{\"type\":\"ping\",\"id\":\"\xc0\xaf\"}",
                ),
                ("surrogate", b"{\"type\":\"ping\",\"id\":\"\xed\xa0\x80\"}"),
                ("truncated at end", b"{\"type\":\"ping\"}\xe2\x82"),
            ];
            for (what, payload) in cases {
                violation(hub, &masked_frame(TEXT, true, payload), 1007, what);
            }
        },
    );
}

#[test]
fn invalid_utf8_across_fragments_closes_1007() {
    under_attack(
        |_| {},
        |hub| {
            // The first fragment is already invalid: the server fails the connection without
            // waiting for the rest of the message (which is never sent).
            let mut ws = RawWs::open(hub);
            ws.send_frame(TEXT, false, b"{\"type\":\"ping\",\"id\":\"\xff");
            ws.expect_failed(1007, "invalid first fragment");

            // A code point started in one fragment, broken by the next.
            let mut bytes = masked_frame(TEXT, false, b"{\"type\":\"ping\",\"id\":\"\xe2\x82");
            bytes.extend(masked_frame(CONT, false, b"A\"}"));
            violation(hub, &bytes, 1007, "code point broken across fragments");

            // A code point that is still incomplete at the final fragment.
            let mut bytes = masked_frame(TEXT, false, b"{\"type\":\"ping\"}");
            bytes.extend(masked_frame(CONT, true, b"\xf0\x9f\x98"));
            violation(hub, &bytes, 1007, "truncated at the final fragment");
        },
    );
}

#[test]
fn multibyte_char_split_across_fragments_is_accepted() {
    under_attack(
        |_| {},
        |hub| {
            let mut ws = RawWs::open(hub);

            // "é" = C3 A9, split between two fragments.
            let msg = "{\"type\":\"ping\",\"id\":\"é\"}".as_bytes();
            let cut = msg.iter().position(|&b| b == 0xC3).unwrap() + 1;
            ws.send_frame(TEXT, false, &msg[..cut]);
            ws.send_frame(CONT, true, &msg[cut..]);
            assert_eq!(ws.recv_json(), json!({"type":"pong","id":"é"}));

            // U+1F600 = F0 9F 98 80 split 1/2/1 over three fragments, in one write, with a ping
            // control frame between fragments.
            let msg = "{\"type\":\"ping\",\"id\":\"a😀b\"}".as_bytes();
            let at = msg.iter().position(|&b| b == 0xF0).unwrap();
            let mut bytes = masked_frame(TEXT, false, &msg[..at + 1]);
            bytes.extend(masked_frame(PING, true, b"mid"));
            bytes.extend(masked_frame(CONT, false, &msg[at + 1..at + 3]));
            bytes.extend(masked_frame(CONT, true, &msg[at + 3..]));
            ws.send(&bytes);
            let (op, _, payload) = ws.next_frame().expect("pong frame");
            assert_eq!((op, &payload[..]), (PONG_OP, &b"mid"[..]));
            assert_eq!(ws.recv_json(), json!({"type":"pong","id":"a😀b"}));

            ws.ping_pong("after");
        },
    );
}

// =============================================================================================
// 4. Oversized frames and messages
// =============================================================================================

#[test]
fn oversized_single_frame_closes_1009() {
    under_attack(
        |_| {},
        |hub| {
            let mut ws = RawWs::open(hub);
            ws.send_frame(TEXT, true, &vec![b'a'; (64 << 10) + 1]);
            expect_too_large(&mut ws, "64 KiB + 1 frame");

            // Exactly at the limit is accepted (a valid command padded to 64 KiB).
            let mut ws = RawWs::open(hub);
            let prefix = "{\"type\":\"ping\",\"id\":\"";
            let pad = (64 << 10) - prefix.len() - 2;
            let msg = format!("{prefix}{}\"}}", "x".repeat(pad));
            assert_eq!(msg.len(), 64 << 10);
            ws.send_text(&msg);
            let pong = ws.recv_json();
            assert_eq!(pong["type"], "pong");
            assert_eq!(pong["id"].as_str().unwrap().len(), pad);
        },
    );
}

#[test]
fn oversized_fragmented_message_closes_1009() {
    under_attack(
        |_| {},
        |hub| {
            let chunk = vec![b'a'; 30 << 10];
            let mut bytes = masked_frame(TEXT, false, &chunk);
            bytes.extend(masked_frame(CONT, false, &chunk));
            bytes.extend(masked_frame(CONT, true, &chunk));
            let mut ws = RawWs::open(hub);
            ws.send(&bytes);
            expect_too_large(&mut ws, "3 x 30 KiB fragments");

            // A frame header alone declaring a huge length is enough (no payload is sent).
            let mut ws = RawWs::open(hub);
            let mut header = vec![0x81, 0xFF];
            header.extend_from_slice(&(1u64 << 40).to_be_bytes());
            header.extend_from_slice(&[1, 2, 3, 4]);
            ws.send(&header);
            expect_too_large(&mut ws, "1 TiB frame header");
        },
    );
}

#[test]
fn oversized_on_a_hub_with_1kib_limit() {
    under_attack(
        |c| c.max_message_size = 1024,
        |hub| {
            let mut ws = RawWs::open(hub);
            ws.send_frame(TEXT, true, &[b'a'; 1025]);
            expect_too_large(&mut ws, "1025-byte frame");

            let mut ws = RawWs::open(hub);
            let mut bytes = masked_frame(TEXT, false, &[b'a'; 400]);
            bytes.extend(masked_frame(CONT, false, &[b'b'; 400]));
            bytes.extend(masked_frame(CONT, true, &[b'c'; 400]));
            ws.send(&bytes);
            expect_too_large(&mut ws, "3 x 400-byte fragments");

            // Exactly 1 KiB, fragmented, is accepted.
            let mut ws = RawWs::open(hub);
            let prefix = "{\"type\":\"ping\",\"id\":\"";
            let msg = format!("{prefix}{}\"}}", "y".repeat(1024 - prefix.len() - 2));
            assert_eq!(msg.len(), 1024);
            ws.send_frame(TEXT, false, &msg.as_bytes()[..500]);
            ws.send_frame(CONT, true, &msg.as_bytes()[500..]);
            assert_eq!(ws.recv_json()["type"], "pong");

            // A publish over the limit from a normal client.
            let mut c = Client::connect(hub.addr);
            c.send_json(json!({"type":"publish","channel":"big","data":"z".repeat(2000)}));
            assert_eq!(c.recv_json()["code"], "message_too_large");
            assert_eq!(c.expect_close().0, 1009);
        },
    );
}

// =============================================================================================
// 5. Control-frame, opcode and framing violations
// =============================================================================================

#[test]
fn fragmented_ping_closes_1002() {
    under_attack(
        |_| {},
        |hub| violation(hub, &masked_frame(PING, false, b"x"), 1002, "ping FIN=0"),
    );
}

#[test]
fn ping_with_126_byte_payload_closes_1002() {
    under_attack(
        |_| {},
        |hub| {
            violation(hub, &masked_frame(PING, true, &[7; 126]), 1002, "ping 126");
            // 125 is the largest allowed payload and is echoed.
            let mut ws = RawWs::open(hub);
            ws.send_frame(PING, true, &[7; 125]);
            let (op, _, payload) = ws.next_frame().unwrap();
            assert_eq!((op, &payload[..]), (PONG_OP, &[7u8; 125][..]));
        },
    );
}

#[test]
fn reserved_opcode_closes_1002() {
    under_attack(
        |_| {},
        |hub| {
            violation(hub, &masked_frame(0x3, true, b"{}"), 1002, "opcode 0x3");
            violation(hub, &masked_frame(0xB, true, b""), 1002, "opcode 0xB");
            violation(hub, &masked_frame(0xF, true, b"x"), 1002, "opcode 0xF");
        },
    );
}

#[test]
fn rsv1_bit_closes_1002() {
    under_attack(
        |_| {},
        |hub| {
            // FIN + RSV1 + text.
            let frame = frame_with_b0(0xC1, br#"{"type":"ping"}"#);
            assert_eq!(frame[0], 0xC1);
            violation(hub, &frame, 1002, "RSV1");
            violation(hub, &frame_with_b0(0xA1, b"{}"), 1002, "RSV2");
            violation(hub, &frame_with_b0(0x91, b"{}"), 1002, "RSV3");
        },
    );
}

#[test]
fn continuation_without_start_closes_1002() {
    under_attack(
        |_| {},
        |hub| {
            violation(
                hub,
                &masked_frame(CONT, true, b"{}"),
                1002,
                "lone continuation",
            );
            // A new text frame while a fragmented message is in progress.
            let mut bytes = masked_frame(TEXT, false, b"{\"type\":");
            bytes.extend(masked_frame(TEXT, true, b"\"ping\"}"));
            violation(hub, &bytes, 1002, "text inside a fragmented message");
        },
    );
}

#[test]
fn binary_frame_closes_1003() {
    under_attack(
        |_| {},
        |hub| {
            violation(
                hub,
                &masked_frame(BINARY, true, b"\x00\x01\x02"),
                1003,
                "binary",
            );
            let mut bytes = masked_frame(BINARY, false, b"\x00");
            bytes.extend(masked_frame(CONT, true, b"\x01"));
            violation(hub, &bytes, 1003, "fragmented binary");

            // In one write: a command, a binary frame, another command. The reply to the first is
            // delivered before the close; nothing after the violation is processed.
            let mut ws = RawWs::open(hub);
            let mut bytes = masked_frame(TEXT, true, br#"{"type":"ping","id":"before"}"#);
            bytes.extend(masked_frame(BINARY, true, b"\x00"));
            bytes.extend(masked_frame(TEXT, true, br#"{"type":"ping","id":"after"}"#));
            ws.send(&bytes);
            let (code, texts) = ws.expect_close();
            assert_eq!(code, 1003);
            assert_eq!(texts, vec![json!({"type":"pong","id":"before"})]);
            ws.expect_eof();
        },
    );
}

#[test]
fn invalid_close_and_length_fields_are_protocol_errors() {
    under_attack(
        |_| {},
        |hub| {
            let cases: Vec<(&str, Vec<u8>, u16)> = vec![
                (
                    "1-byte close payload",
                    masked_frame(CLOSE, true, &[3]),
                    1002,
                ),
                (
                    "close code 1005 (must not be sent)",
                    masked_frame(CLOSE, true, &close_payload(1005, b"")),
                    1002,
                ),
                (
                    "close code 999",
                    masked_frame(CLOSE, true, &close_payload(999, b"")),
                    1002,
                ),
                (
                    "close reason not UTF-8",
                    masked_frame(CLOSE, true, &close_payload(1000, b"\xff\xfe")),
                    1007,
                ),
                (
                    "close of 126 bytes",
                    masked_frame(CLOSE, true, &[0x03; 126]),
                    1002,
                ),
                (
                    "fragmented close",
                    masked_frame(CLOSE, false, &close_payload(1000, b"")),
                    1002,
                ),
                (
                    "64-bit length with the top bit set",
                    {
                        let mut h = vec![0x81, 0xFF];
                        h.extend_from_slice(&(1u64 << 63).to_be_bytes());
                        h.extend_from_slice(&[1, 2, 3, 4]);
                        h
                    },
                    1002,
                ),
            ];
            for (what, bytes, code) in cases {
                violation(hub, &bytes, code, what);
            }
        },
    );
}

// =============================================================================================
// 6. Garbage after the client's close frame
// =============================================================================================

#[test]
fn garbage_after_close_does_not_destroy_the_close_reply() {
    under_attack(
        |_| {},
        |hub| {
            let garbage: Vec<u8> = (0..1024u32).map(|i| (i * 151 + 7) as u8).collect();
            for round in 0..20 {
                let mut ws = RawWs::open(hub);
                let mut bytes = masked_frame(CLOSE, true, &close_payload(1000, b"bye"));
                bytes.extend_from_slice(&garbage);
                ws.send(&bytes);
                let (code, texts) = ws.expect_close();
                assert_eq!(code, 1000, "round {round}");
                assert!(texts.is_empty(), "round {round}: {texts:?}");
                ws.expect_eof();
            }

            // A much larger burst of garbage behind the close frame (more than the server reads
            // in one go, so some is still unread when it has sent its close): it must keep
            // draining input until we are done, instead of closing with unread input (a RST).
            for round in 0..3 {
                let mut ws = RawWs::open(hub);
                let mut bytes = masked_frame(CLOSE, true, &close_payload(1000, b""));
                bytes.extend(std::iter::repeat_n(0xAB, 2 << 20));
                let mut writer = ws.s.try_clone().unwrap();
                let t = thread::spawn(move || writer.write_all(&bytes));
                let (code, _) = ws.expect_close();
                assert_eq!(code, 1000, "2 MiB of garbage, round {round}");
                ws.expect_eof();
                t.join()
                    .unwrap()
                    .expect("the server reset the connection while we were still sending");
            }

            // Other codes are echoed; an empty close is answered with an empty close.
            let mut ws = RawWs::open(hub);
            ws.send(&masked_frame(CLOSE, true, &close_payload(4000, b"app")));
            assert_eq!(ws.expect_close().0, 4000);
            ws.expect_eof();
            let mut ws = RawWs::open(hub);
            ws.send(&masked_frame(CLOSE, true, b""));
            assert_eq!(ws.expect_close().0, 1005);
            ws.expect_eof();
        },
    );
}

#[test]
fn half_closed_client_still_gets_replies_and_close() {
    under_attack(
        |_| {},
        |hub| {
            // The client sends commands and its close frame, then shuts its sending side
            // (allowed by TCP: it still reads). What the server queued before it saw the end of
            // stream must still be written: the pongs and the close reply.
            for round in 0..20 {
                let mut ws = RawWs::open(hub);
                let mut bytes = masked_frame(TEXT, true, br#"{"type":"ping","id":"hc"}"#);
                bytes.extend(masked_frame(CLOSE, true, &close_payload(1000, b"")));
                ws.send(&bytes);
                ws.s.shutdown(Shutdown::Write).unwrap();
                let (code, texts) = ws.expect_close();
                assert_eq!(
                    texts,
                    vec![json!({"type":"pong","id":"hc"})],
                    "round {round}"
                );
                assert_eq!(code, 1000, "round {round}");
                ws.expect_eof();
            }

            // The same with everything (request, 100 KiB of commands, close, end of stream)
            // sent before the server has even answered the upgrade, so the server reads the
            // close frame and the end of stream together.
            for round in 0..20 {
                let long_id = "L".repeat(50_000);
                let big = json!({"type":"ping","id":long_id}).to_string();
                let mut bytes = upgrade_request(hub.addr).into_bytes();
                bytes.extend(masked_frame(TEXT, true, big.as_bytes()));
                bytes.extend(masked_frame(TEXT, true, big.as_bytes()));
                bytes.extend(masked_frame(TEXT, true, br#"{"type":"ping","id":"last"}"#));
                bytes.extend(masked_frame(CLOSE, true, &close_payload(1000, b"")));
                let mut s = raw(hub.addr);
                s.write_all(&bytes).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let head = read_http_head(&mut s);
                assert_eq!(status_of(&head), 101, "{head:?}");
                let mut ws = RawWs {
                    s,
                    buf: BytesMut::new(),
                };
                let (code, texts) = ws.expect_close();
                let types: Vec<&Value> = texts.iter().map(|t| &t["type"]).collect();
                assert_eq!(
                    types,
                    ["welcome", "pong", "pong", "pong"],
                    "round {round}: replies before the close frame"
                );
                assert_eq!(texts[1]["id"], long_id.as_str());
                assert_eq!(texts[3], json!({"type":"pong","id":"last"}));
                assert_eq!(code, 1000, "round {round}");
                ws.expect_eof();
            }
        },
    );
}

// =============================================================================================
// 7. Bad JSON and bad commands
// =============================================================================================

#[test]
fn bad_commands_get_error_replies_and_the_connection_stays_usable() {
    under_attack(
        |_| {},
        |hub| {
            let mut c = Client::connect(hub.addr);
            let long = "a".repeat(257);
            let deep = format!(
                "{{\"type\":\"ping\",\"id\":\"deep\",\"x\":{}{}}}",
                "[".repeat(20_000),
                "]".repeat(20_000)
            );
            // (text, expected code, expected id)
            let cases: Vec<(String, &str, Value)> = vec![
                ("not json".into(), "bad_request", Value::Null),
                ("".into(), "bad_request", Value::Null),
                ("{\"type\":\"ping\"".into(), "bad_request", Value::Null),
                ("[1,2,3]".into(), "bad_request", Value::Null),
                ("\"subscribe\"".into(), "bad_request", Value::Null),
                ("42".into(), "bad_request", Value::Null),
                ("null".into(), "bad_request", Value::Null),
                (r#"{"type":"dance","id":5}"#.into(), "bad_request", json!(5)),
                (
                    r#"{"channel":"x","id":"t"}"#.into(),
                    "bad_request",
                    json!("t"),
                ),
                (r#"{"type":7,"id":1}"#.into(), "bad_request", json!(1)),
                (
                    r#"{"type":"subscribe","id":2}"#.into(),
                    "bad_request",
                    json!(2),
                ),
                (
                    r#"{"type":"subscribe","channel":5,"id":3}"#.into(),
                    "bad_request",
                    json!(3),
                ),
                (
                    r#"{"type":"publish","channel":"ok","id":4}"#.into(),
                    "bad_request",
                    json!(4),
                ),
                (
                    r#"{"type":"ping","id":{"a":1}}"#.into(),
                    "bad_request",
                    Value::Null,
                ),
                (
                    r#"{"type":"ping","type":"ping"}"#.into(),
                    "bad_request",
                    Value::Null,
                ),
                (
                    r#"{"type":"subscribe","channel":"","id":10}"#.into(),
                    "invalid_channel",
                    json!(10),
                ),
                (
                    r#"{"type":"subscribe","channel":"has space","id":11}"#.into(),
                    "invalid_channel",
                    json!(11),
                ),
                (
                    format!(r#"{{"type":"subscribe","channel":"{long}","id":12}}"#),
                    "invalid_channel",
                    json!(12),
                ),
                (
                    r#"{"type":"subscribe","channel":"ça","id":13}"#.into(),
                    "invalid_channel",
                    json!(13),
                ),
                (
                    r#"{"type":"subscribe","channel":"a\"b","id":14}"#.into(),
                    "invalid_channel",
                    json!(14),
                ),
                (
                    r#"{"type":"publish","channel":"new\nline","data":1,"id":15}"#.into(),
                    "invalid_channel",
                    json!(15),
                ),
                (
                    r#"{"type":"unsubscribe","channel":"\u0000","id":16}"#.into(),
                    "invalid_channel",
                    json!(16),
                ),
            ];
            for (i, (text, code, id)) in cases.iter().enumerate() {
                c.send_text(text);
                let v = c.recv_json();
                assert_eq!(v["type"], "error", "{text:?} → {v}");
                assert_eq!(v["code"], *code, "{text:?} → {v}");
                assert_eq!(v["id"], *id, "{text:?} → {v}");
                assert!(v["message"].is_string(), "{text:?} → {v}");
                c.send_json(json!({"type":"ping","id":i}));
                assert_eq!(
                    c.recv_json(),
                    json!({"type":"pong","id":i}),
                    "after {text:?}"
                );
            }

            // Deeply nested unknown field (60 KB of brackets): ignored without recursion, the
            // command is still understood.
            c.send_text(&deep);
            assert_eq!(c.recv_json(), json!({"type":"pong","id":"deep"}));

            // Pipelined: many bad commands in a row, then one good one; all answered in order.
            for i in 0..100 {
                c.ws.write(Message::text(format!("{{bad {i}"))).unwrap();
            }
            c.ws.write(Message::text(r#"{"type":"ping","id":"end"}"#))
                .unwrap();
            c.ws.flush().unwrap();
            for _ in 0..100 {
                assert_eq!(c.recv_json()["code"], "bad_request");
            }
            assert_eq!(c.recv_json(), json!({"type":"pong","id":"end"}));

            // The connection is fully usable: subscribe and receive.
            let ch = unique("after-errors");
            c.subscribe(&ch);
            let mut p = Client::connect(hub.addr);
            p.publish_acked(&ch, json!(1));
            assert_eq!(
                c.recv_json(),
                json!({"type":"message","channel":ch,"data":1})
            );
        },
    );
}

// =============================================================================================
// 8. Subscription flood and churn
// =============================================================================================

#[test]
fn subscription_flood_is_capped_at_max_subscriptions() {
    under_attack(
        |c| c.max_subscriptions = 50,
        |hub| {
            let prefix = unique("flood");
            let ch = |i: usize| format!("{prefix}-{i}");
            let mut c = Client::connect(hub.addr);
            // 200 subscribes written back to back, no waiting for acks.
            for i in 0..200 {
                let cmd = json!({"type":"subscribe","channel":ch(i),"id":i});
                c.ws.write(Message::text(cmd.to_string())).unwrap();
            }
            c.ws.flush().unwrap();
            let (mut acks, mut refused) = (0, 0);
            for i in 0..200 {
                let v = c.recv_json();
                assert_eq!(v["id"], i, "replies in order: {v}");
                match v["type"].as_str() {
                    Some("subscribed") => {
                        assert_eq!(v["channel"], ch(i), "{v}");
                        assert!(i < 50, "subscription {i} accepted over the limit");
                        acks += 1;
                    }
                    Some("error") => {
                        assert_eq!(v["code"], "too_many_subscriptions", "{v}");
                        refused += 1;
                    }
                    _ => panic!("unexpected reply {v}"),
                }
            }
            assert_eq!((acks, refused), (50, 150));

            // A publish to one of the accepted channels still arrives.
            let mut p = Client::connect(hub.addr);
            p.publish_acked(&ch(7), json!("seven"));
            assert_eq!(
                c.recv_json(),
                json!({"type":"message","channel":ch(7),"data":"seven"})
            );

            // A refused channel really is not subscribed: a publish from the same connection is
            // delivered locally before its ack, so only the ack comes back.
            c.send_json(json!({"type":"publish","channel":ch(150),"data":0,"id":"self"}));
            assert_eq!(
                c.recv_json(),
                json!({"type":"published","channel":ch(150),"id":"self"})
            );

            // At the limit: re-subscribing an existing channel is fine; a new one is refused
            // until a slot is freed.
            c.send_json(json!({"type":"subscribe","channel":ch(0),"id":"again"}));
            assert_eq!(c.recv_json()["type"], "subscribed");
            c.send_json(json!({"type":"subscribe","channel":ch(199),"id":"new"}));
            assert_eq!(c.recv_json()["code"], "too_many_subscriptions");
            c.send_json(json!({"type":"unsubscribe","channel":ch(0),"id":"free"}));
            assert_eq!(c.recv_json()["type"], "unsubscribed");
            c.send_json(json!({"type":"subscribe","channel":ch(199),"id":"new"}));
            assert_eq!(c.recv_json()["type"], "subscribed");

            // The limit is per connection: another client may subscribe freely.
            let mut other = Client::connect(hub.addr);
            for i in 0..50 {
                other.subscribe(&ch(i));
            }
        },
    );
}

#[test]
fn subscribe_unsubscribe_churn_acks_in_order() {
    under_attack(
        |_| {},
        |hub| {
            const OPS: usize = 10_000;
            let channel = unique("churn");
            let mut ws = RawWs::open(hub);
            let mut bytes = Vec::with_capacity(OPS * 80);
            for i in 0..OPS {
                let kind = if i % 2 == 0 {
                    "subscribe"
                } else {
                    "unsubscribe"
                };
                let cmd = json!({"type":kind,"channel":channel,"id":i}).to_string();
                bytes.extend(masked_frame(TEXT, true, cmd.as_bytes()));
            }
            // Write everything from another thread while this one reads the replies.
            let mut writer = ws.s.try_clone().unwrap();
            let t = thread::spawn(move || writer.write_all(&bytes));
            for i in 0..OPS {
                let v = ws.recv_json();
                let kind = if i % 2 == 0 {
                    "subscribed"
                } else {
                    "unsubscribed"
                };
                assert_eq!(
                    v,
                    json!({"type":kind,"channel":channel,"id":i}),
                    "reply {i}"
                );
            }
            t.join().unwrap().expect("writing the churn");

            // Ends unsubscribed: a self-publish brings only the ack.
            ws.send_text(
                &json!({"type":"publish","channel":channel,"data":1,"id":"x"}).to_string(),
            );
            assert_eq!(
                ws.recv_json(),
                json!({"type":"published","channel":channel,"id":"x"})
            );
            // And a final subscribe works across shards.
            ws.send_text(&json!({"type":"subscribe","channel":channel}).to_string());
            assert_eq!(ws.recv_json()["type"], "subscribed");
            let mut p = Client::connect(hub.addr);
            p.publish_acked(&channel, json!(2));
            assert_eq!(
                ws.recv_json(),
                json!({"type":"message","channel":channel,"data":2})
            );
        },
    );
}

// =============================================================================================
// 9. Silent and slow-loris connections
// =============================================================================================

#[test]
fn silent_and_slowloris_connections_are_dropped() {
    under_attack(
        |c| c.handshake_timeout = Duration::from_millis(300),
        |hub| {
            // Slow loris: the upgrade request one byte every 100 ms (about 20 s in total).
            let mut req = upgrade_request(hub.addr);
            req.insert_str(
                req.len() - 2,
                "User-Agent: slowloris/1.0 (one byte at a time)\r\n",
            );
            let req_len = req.len();
            let mut slow = raw(hub.addr);
            let mut slow_writer = slow.try_clone().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let writer = thread::spawn(move || {
                let mut sent = 0;
                for b in req.bytes() {
                    if stop2.load(Ordering::Relaxed) || slow_writer.write_all(&[b]).is_err() {
                        break;
                    }
                    sent += 1;
                    thread::sleep(Duration::from_millis(100));
                }
                sent
            });

            // Silent connections.
            let mut silent: Vec<TcpStream> = (0..20).map(|_| raw(hub.addr)).collect();

            // The hub keeps serving while they hang around.
            assert_healthy(hub);

            for (i, s) in silent.iter_mut().enumerate() {
                let got = read_until_closed(s, &format!("silent connection {i}"));
                assert!(
                    got.is_empty() || !got.starts_with(b"HTTP/1.1 101"),
                    "{got:?}"
                );
            }
            let got = read_until_closed(&mut slow, "slowloris connection");
            stop.store(true, Ordering::Relaxed);
            let sent = writer.join().unwrap();
            let got = String::from_utf8_lossy(&got);
            assert!(
                !got.contains(" 101 "),
                "the slow loris was upgraded: {got:?}"
            );
            assert!(
                sent < req_len,
                "the whole request ({req_len} bytes) was sent before the server dropped it"
            );

            // An idle keep-alive HTTP connection is dropped the same way.
            let mut idle = raw(hub.addr);
            idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let head = read_http_head(&mut idle);
            assert_eq!(status_of(&head), 200, "{head:?}");
            let got = read_until_closed(&mut idle, "idle keep-alive connection");
            assert_eq!(got, b"{\"status\":\"ok\"}", "only the body remains");

            let timeouts = metric(hub.addr, "ringhub_handshake_timeouts_total");
            assert!(
                timeouts >= 22,
                "ringhub_handshake_timeouts_total = {timeouts}"
            );
        },
    );
}

// =============================================================================================
// 10. Frames pipelined behind the upgrade request
// =============================================================================================

#[test]
fn frames_pipelined_behind_the_upgrade_request_are_processed() {
    under_attack(
        |_| {},
        |hub| {
            let channel = unique("pipelined");
            let mut bytes = upgrade_request(hub.addr).into_bytes();
            let sub = json!({"type":"subscribe","channel":channel,"id":"s"}).to_string();
            bytes.extend(masked_frame(TEXT, true, sub.as_bytes()));
            bytes.extend(masked_frame(TEXT, true, br#"{"type":"ping","id":"p"}"#));
            bytes.extend(masked_frame(PING, true, b"raw"));
            let mut s = raw(hub.addr);
            s.write_all(&bytes).unwrap();
            let head = read_http_head(&mut s);
            assert_eq!(status_of(&head), 101, "{head:?}");
            let mut ws = RawWs {
                s,
                buf: BytesMut::new(),
            };
            let frames: Vec<(OpCode, Bytes)> = (0..4)
                .map(|_| {
                    let (op, _, p) = ws.next_frame().expect("a frame");
                    (op, p)
                })
                .collect();
            let json_of = |i: usize| -> Value {
                assert_eq!(frames[i].0, TEXT_OP, "frame {i}: {frames:?}");
                serde_json::from_slice(&frames[i].1).unwrap()
            };
            assert_eq!(json_of(0)["type"], "welcome");
            assert_eq!(
                json_of(1),
                json!({"type":"subscribed","channel":channel,"id":"s"})
            );
            assert_eq!(json_of(2), json!({"type":"pong","id":"p"}));
            assert_eq!((frames[3].0, &frames[3].1[..]), (PONG_OP, &b"raw"[..]));

            // The subscription made in the pipeline is live.
            let mut p = Client::connect(hub.addr);
            p.publish_acked(&channel, json!("piped"));
            assert_eq!(
                ws.recv_json(),
                json!({"type":"message","channel":channel,"data":"piped"})
            );

            // A frame cut in half behind the request: the rest comes later.
            let mut bytes = upgrade_request(hub.addr).into_bytes();
            let ping = masked_frame(TEXT, true, br#"{"type":"ping","id":"half"}"#);
            bytes.extend_from_slice(&ping[..7]);
            let mut s = raw(hub.addr);
            s.write_all(&bytes).unwrap();
            let head = read_http_head(&mut s);
            assert_eq!(status_of(&head), 101, "{head:?}");
            let mut ws = RawWs {
                s,
                buf: BytesMut::new(),
            };
            assert_eq!(ws.recv_json()["type"], "welcome");
            ws.send(&ping[7..]);
            assert_eq!(ws.recv_json(), json!({"type":"pong","id":"half"}));

            // A protocol violation pipelined behind the request fails the connection after the
            // upgrade (not the handshake).
            let mut bytes = upgrade_request(hub.addr).into_bytes();
            bytes.extend(masked_frame(BINARY, true, b"\x00"));
            let mut s = raw(hub.addr);
            s.write_all(&bytes).unwrap();
            let head = read_http_head(&mut s);
            assert_eq!(status_of(&head), 101, "{head:?}");
            let mut ws = RawWs {
                s,
                buf: BytesMut::new(),
            };
            assert_eq!(ws.recv_json()["type"], "welcome");
            ws.expect_failed(1003, "pipelined binary frame");
        },
    );
}

#[test]
fn upgrade_request_body_is_not_read_as_websocket_frames() {
    under_attack(
        |_| {},
        |hub| {
            // A GET upgrade with a 2-byte body, then a valid masked frame. The body belongs to the
            // HTTP request (RFC 9110: the new protocol starts after the request, content
            // included): the server must either refuse the request or skip the body — never
            // decode it as WebSocket frames.
            let mut bytes = upgrade_with(
                "/ws",
                "GET",
                &[UPGRADE, CONN_UPGRADE, GOOD_KEY, V13, "Content-Length: 2"],
            );
            bytes.extend_from_slice(b"{}");
            bytes.extend(masked_frame(TEXT, true, br#"{"type":"ping","id":"cl"}"#));
            let mut s = raw(hub.addr);
            s.write_all(&bytes).unwrap();
            let head = read_http_head(&mut s);
            let status = status_of(&head);
            if status == 101 {
                let mut ws = RawWs {
                    s,
                    buf: BytesMut::new(),
                };
                assert_eq!(ws.recv_json()["type"], "welcome");
                match ws.next_frame() {
                    Some((op, _, p)) if op == TEXT_OP => assert_eq!(
                        serde_json::from_slice::<Value>(&p).unwrap(),
                        json!({"type":"pong","id":"cl"})
                    ),
                    other => panic!(
                        "the request body was decoded as WebSocket frames; got {other:?} \
                         instead of the pong"
                    ),
                }
            } else {
                assert!((400..500).contains(&status), "{head:?}");
            }
        },
    );
}

// =============================================================================================
// 11. Ping / pong
// =============================================================================================

#[test]
fn ping_frame_is_answered_with_the_same_payload() {
    under_attack(
        |_| {},
        |hub| {
            let mut ws = RawWs::open(hub);
            for payload in [&b"hello"[..], b"", &[0xFF, 0x00, 0x80], &[b'z'; 125]] {
                ws.send_frame(PING, true, payload);
                let (op, fin, got) = ws.next_frame().expect("pong");
                assert_eq!(op, PONG_OP, "reply to ping {payload:?}");
                assert!(fin);
                assert_eq!(&got[..], payload);
            }
            // Unsolicited pongs are ignored.
            ws.send_frame(0xA, true, b"unsolicited");
            ws.ping_pong("after-pong");

            // Many pings in one write: one pong each, in order.
            let mut bytes = Vec::new();
            for i in 0..200u32 {
                bytes.extend(masked_frame(PING, true, &i.to_be_bytes()));
            }
            ws.send(&bytes);
            for i in 0..200u32 {
                let (op, _, got) = ws.next_frame().expect("pong");
                assert_eq!((op, &got[..]), (PONG_OP, &i.to_be_bytes()[..]));
            }
        },
    );
}

// =============================================================================================
// Extras: abrupt resets, many tiny fragments
// =============================================================================================

/// Make `close` on this socket send a RST instead of a FIN.
fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a valid `linger` struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt(SO_LINGER)");
}

#[test]
fn abrupt_resets_are_cleaned_up() {
    under_attack(
        |_| {},
        |hub| {
            let channel = unique("reset");
            let mut publisher = Client::connect(hub.addr);
            // Subscribers that vanish with a RST while messages are on their way to them.
            let mut doomed = Vec::new();
            for _ in 0..20 {
                let mut ws = RawWs::open(hub);
                ws.send_text(&json!({"type":"subscribe","channel":channel}).to_string());
                assert_eq!(ws.recv_json()["type"], "subscribed");
                doomed.push(ws);
            }
            for i in 0..50 {
                publisher.send_json(json!({"type":"publish","channel":channel,"data":i}));
            }
            for ws in doomed {
                set_linger_zero(&ws.s);
            }
            for i in 50..100 {
                publisher.send_json(json!({"type":"publish","channel":channel,"data":i}));
            }
            publisher.publish_acked(&channel, json!("sync"));

            // Resets during the handshake: after half a request, and right after a full one
            // (before the 101 is read).
            let req = upgrade_request(hub.addr);
            for _ in 0..20 {
                let mut s = raw(hub.addr);
                s.write_all(&req.as_bytes()[..req.len() / 2]).unwrap();
                set_linger_zero(&s);
            }
            for _ in 0..20 {
                let mut s = raw(hub.addr);
                s.write_all(req.as_bytes()).unwrap();
                set_linger_zero(&s);
            }
            // Resets in the middle of a fragmented message and in the middle of a frame.
            for _ in 0..10 {
                let mut ws = RawWs::open(hub);
                ws.send_frame(TEXT, false, b"{\"type\":");
                set_linger_zero(&ws.s);
                let mut ws = RawWs::open(hub);
                let f = masked_frame(TEXT, true, &[b' '; 1000]);
                ws.send(&f[..500]);
                set_linger_zero(&ws.s);
            }
            // Everything above is gone; only the publisher (and the sentinel) remain.
            wait_for_open_connections(hub, 2);
            publisher.send_json(json!({"type":"ping","id":"alive"}));
            assert_eq!(publisher.recv_json(), json!({"type":"pong","id":"alive"}));
        },
    );
}

#[test]
fn many_tiny_fragments_are_reassembled() {
    under_attack(
        |_| {},
        |hub| {
            let mut ws = RawWs::open(hub);
            // One byte per fragment, with a ping control frame between fragments.
            let msg = "{\"type\":\"ping\",\"id\":\"tiny·ñ\"}".as_bytes();
            let mut bytes = Vec::new();
            for (i, b) in msg.iter().enumerate() {
                let op = if i == 0 { TEXT } else { CONT };
                let last = i + 1 == msg.len();
                bytes.extend(masked_frame(op, last, &[*b]));
                if !last {
                    bytes.extend(masked_frame(PING, true, &(i as u16).to_be_bytes()));
                }
            }
            ws.send(&bytes);
            for i in 0..msg.len() - 1 {
                let (op, _, p) = ws.next_frame().expect("pong");
                assert_eq!((op, &p[..]), (PONG_OP, &(i as u16).to_be_bytes()[..]));
            }
            assert_eq!(ws.recv_json(), json!({"type":"pong","id":"tiny·ñ"}));

            // Ten thousand empty continuation frames inside one message.
            let mut bytes = masked_frame(TEXT, false, b"{\"type\":\"ping\",");
            for _ in 0..10_000 {
                bytes.extend(masked_frame(CONT, false, b""));
            }
            bytes.extend(masked_frame(CONT, true, b"\"id\":\"empty\"}"));
            ws.send(&bytes);
            assert_eq!(ws.recv_json(), json!({"type":"pong","id":"empty"}));
        },
    );
}
