//! Fuzz harness shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`, which include this
//! file with `#[path]`) and the stable replay test (`tests/fuzz_corpus.rs`).
//!
//! Each public function takes arbitrary bytes, drives one sans-IO parser with them and panics
//! when an invariant breaks. The first one or two input bytes select a mode, the limits and a
//! seed for chunk sizes, so the same input always exercises the same path (replayable).
//!
//! - [`ws_frames`]: `codec::Decoder` over raw bytes (chunked vs. whole), or over a stream of
//!   masked frames generated from the input, checked against a small model of RFC 6455.
//! - [`resp`]: `resp::Parser::parse` and `resp::parse`, chunked vs. whole, `as_pubsub`,
//!   re-encoding round trips, and the `encode_command` round trip.
//! - [`protocol`]: `parse_command`, `parse_publish_body`, the reply encoders and
//!   `payload_to_json`: every output is valid JSON carrying the expected fields.
//! - [`http_head`]: `parse_head` over growing prefixes (monotonic, consistent with the whole
//!   input), `accept_upgrade` and the response builders (no header injection).
//! - [`token`]: JWT `inspect`, the claim checks and `Verifier::verify_*` (HMAC) over raw tokens
//!   and over arbitrary payloads signed by the harness; verification agrees with the checks.
#![allow(dead_code)]

use std::collections::BTreeMap;

use bytes::BytesMut;
use ringhub::auth::token::{
    self, Algorithm, ChannelClaims, ClaimRules, ConnectionClaims, MintKey, TokenError, Verifier,
};
use ringhub::auth::AuthConfig;
use ringhub::codec::{self, Decoder, Message, OpCode, ProtocolError};
use ringhub::http::{self, HttpLimits, RequestHead};
use ringhub::protocol::{self, Command, CommandError, ErrorCode};
use ringhub::resp::{self, Frame, ParseError};
use serde_json::value::RawValue;

// ---------------------------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------------------------

/// Deterministic source of chunk sizes (xorshift32), so a split schedule is part of the input.
pub struct Chunker {
    state: u32,
    /// Largest chunk; `usize::MAX` feeds everything at once.
    max: usize,
}

impl Chunker {
    /// Everything in one chunk.
    pub fn whole() -> Self {
        Chunker {
            state: 1,
            max: usize::MAX,
        }
    }

    /// `selector` (any byte, only its low 3 bits count) picks the largest chunk size; `seed`
    /// varies the sizes below it.
    pub fn new(selector: u8, seed: u8) -> Self {
        const MAX: [usize; 8] = [1, 2, 3, 5, 8, 17, 64, usize::MAX];
        Chunker {
            state: 0x9E37_79B9 ^ u32::from(seed).wrapping_mul(0x0101_0101),
            max: MAX[usize::from(selector & 7)],
        }
    }

    /// Next chunk size, >= 1.
    pub fn next_len(&mut self) -> usize {
        if self.max == usize::MAX {
            return usize::MAX;
        }
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        1 + (x as usize) % self.max
    }

    /// Split `input` into consecutive chunks (at least one, possibly empty).
    pub fn split<'a>(&mut self, input: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut rest = input;
        loop {
            let n = self.next_len().min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            out.push(chunk);
            rest = tail;
            if rest.is_empty() {
                return out;
            }
        }
    }
}

/// Take up to `n` bytes from the front of `input`.
fn take<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = input.split_at(n.min(input.len()));
    *input = tail;
    head
}

// ---------------------------------------------------------------------------------------------
// WebSocket frames
// ---------------------------------------------------------------------------------------------

/// The two limit sets: the normal one, and a tiny one so that size errors are easy to reach.
const WS_LIMITS: [codec::Limits; 2] = [
    codec::Limits {
        max_frame_size: 4096,
        max_message_size: 16384,
    },
    codec::Limits {
        max_frame_size: 64,
        max_message_size: 200,
    },
];

/// What decoding a byte stream produced.
#[derive(Debug, PartialEq, Eq)]
pub struct WsOutcome {
    pub messages: Vec<Message>,
    pub error: Option<ProtocolError>,
    /// Bytes left in the buffer at the end (0 after an error: unspecified there).
    pub leftover: usize,
    /// `Decoder::is_idle` at the end (false after an error).
    pub idle: bool,
}

/// Input layout: `[mode, seed, rest..]`. Mode bit 0: raw (0) or generated frames (1); bits
/// 4..=6: chunk-size selector; bit 7: tiny limits.
pub fn ws_frames(data: &[u8]) {
    let [mode, seed, rest @ ..] = data else {
        return;
    };
    let limits = WS_LIMITS[usize::from(mode >> 7)];
    let mut chunks = Chunker::new(mode >> 4, *seed);
    if mode & 1 == 0 {
        // Raw bytes: the chunking must not change anything.
        let chunked = ws_decode(rest, &limits, &mut chunks);
        let whole = ws_decode(rest, &limits, &mut Chunker::whole());
        assert_eq!(chunked, whole, "chunked decoding differs from whole");
    } else {
        let frames = ws_generate(rest);
        let mut stream = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let i = i as u8;
            let mask = [f.opcode ^ 0x5A, i, i.wrapping_mul(37), 0xC3 ^ i];
            codec::encode_masked(OpCode::from(f.opcode), f.fin, &f.payload, mask, &mut stream);
        }
        let got = ws_decode(&stream, &limits, &mut chunks);
        let want = ws_model(&frames, &limits);
        assert_eq!(got, want, "decoder disagrees with the model for {frames:?}");
    }
}

/// Feed `input` to a fresh decoder in the chunks given by `chunks`, decoding after each chunk
/// until `Ok(None)` or an error; checks every message against `limits`.
pub fn ws_decode(input: &[u8], limits: &codec::Limits, chunks: &mut Chunker) -> WsOutcome {
    let mut dec = Decoder::new();
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    for chunk in chunks.split(input) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf, limits) {
                Ok(Some(m)) => {
                    assert!(
                        buf.len() < before,
                        "Ok(Some) without consuming bytes: {m:?}"
                    );
                    check_ws_message(&m, limits);
                    messages.push(m);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(matches!(e.close_code(), 1002 | 1007 | 1009), "{e:?}");
                    assert!(e.reason().len() <= 123, "{e:?}");
                    return WsOutcome {
                        messages,
                        error: Some(e),
                        leftover: 0,
                        idle: false,
                    };
                }
            }
        }
    }
    WsOutcome {
        messages,
        error: None,
        leftover: buf.len(),
        idle: dec.is_idle(),
    }
}

fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn check_ws_message(m: &Message, limits: &codec::Limits) {
    match m {
        Message::Text(t) => {
            assert!(std::str::from_utf8(t).is_ok(), "Text is not UTF-8");
            assert!(t.len() <= limits.max_message_size);
        }
        Message::Binary(b) => assert!(b.len() <= limits.max_message_size),
        Message::Ping(p) | Message::Pong(p) => assert!(p.len() <= 125),
        Message::Close(None) => {}
        Message::Close(Some((code, reason))) => {
            assert!(valid_close_code(*code), "close code {code}");
            assert!(
                std::str::from_utf8(reason).is_ok(),
                "close reason not UTF-8"
            );
            assert!(reason.len() <= 123);
        }
    }
}

/// One client frame, before masking.
#[derive(Debug, Clone)]
pub struct GenFrame {
    /// 0..=15 (reserved opcodes included).
    pub opcode: u8,
    pub fin: bool,
    pub payload: Vec<u8>,
}

/// Build a frame sequence from the input: each step reads a control byte `c` and a length
/// byte `l`. `c & 7` picks the kind (text, binary, continuation, ping, pong, close, a valid
/// UTF-8 message fragmented at arbitrary byte positions, or a raw opcode `c >> 4`), bit 3 is
/// FIN, bit 6 repeats data payloads to `l * 64` bytes (to reach the size limits).
pub fn ws_generate(mut input: &[u8]) -> Vec<GenFrame> {
    const CODES: [u16; 16] = [
        1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999, 999, 1004, 1005, 1006, 1015, 2999,
        5000,
    ];
    let mut frames: Vec<GenFrame> = Vec::new();
    // Bounded so that one input costs little however it repeats payloads.
    let mut total = 0;
    while let [c, l, rest @ ..] = input {
        if frames.len() >= 512 || total > 1 << 16 {
            break;
        }
        let (c, l) = (*c, *l);
        input = rest;
        let before = frames.len();
        let fin = c & 0x08 != 0;
        let data_payload = |input: &mut &[u8]| {
            let mut p = take(input, usize::from(l)).to_vec();
            if c & 0x10 != 0 {
                p = String::from_utf8_lossy(&p).into_owned().into_bytes();
            }
            if c & 0x40 != 0 {
                let n = usize::from(l) * 64;
                p = if p.is_empty() {
                    vec![b'x'; n]
                } else {
                    p.iter().copied().cycle().take(n).collect()
                };
            }
            p
        };
        let frame = |opcode: u8, fin: bool, payload: Vec<u8>| GenFrame {
            opcode,
            fin,
            payload,
        };
        match c & 7 {
            0 => frames.push(frame(1, fin, data_payload(&mut input))),
            1 => frames.push(frame(2, fin, data_payload(&mut input))),
            2 => frames.push(frame(0, fin, data_payload(&mut input))),
            // Control frames: FIN is set unless bit 4 asks for an (invalid) fragment.
            3 | 4 => {
                let op = if c & 7 == 3 { 9 } else { 10 };
                let p = take(&mut input, usize::from(l % 128)).to_vec();
                frames.push(frame(op, c & 0x10 == 0, p));
            }
            5 => {
                let p = if c & 0x10 != 0 {
                    let mut p = CODES[usize::from(l & 15)].to_be_bytes().to_vec();
                    p.extend_from_slice(take(&mut input, usize::from(l >> 4) * 8));
                    p
                } else {
                    take(&mut input, usize::from(l % 130)).to_vec()
                };
                frames.push(frame(8, true, p));
            }
            6 => {
                // A valid UTF-8 message cut at arbitrary byte offsets (code points may straddle
                // fragments), optionally with a ping after the first fragment.
                let text = String::from_utf8_lossy(take(&mut input, usize::from(l))).into_owned();
                let bytes = text.as_bytes();
                let pieces = 1 + usize::from((c >> 4) & 3);
                let mut cuts: Vec<usize> = take(&mut input, pieces - 1)
                    .iter()
                    .map(|&b| usize::from(b) % (bytes.len() + 1))
                    .collect();
                cuts.sort_unstable();
                let bounds: Vec<usize> = std::iter::once(0)
                    .chain(cuts)
                    .chain(std::iter::once(bytes.len()))
                    .collect();
                let n = bounds.len() - 1;
                for (i, w) in bounds.windows(2).enumerate() {
                    let op = if i == 0 { 1 } else { 0 };
                    frames.push(frame(op, i + 1 == n, bytes[w[0]..w[1]].to_vec()));
                    if i == 0 && n > 1 && c & 0x80 != 0 {
                        frames.push(frame(9, true, vec![l]));
                    }
                }
            }
            _ => {
                let p = take(&mut input, usize::from(l)).to_vec();
                frames.push(frame(c >> 4, fin, p));
            }
        }
        total += frames[before..]
            .iter()
            .map(|f| f.payload.len())
            .sum::<usize>();
    }
    frames
}

/// Reference model of the decoder's contract (RFC 6455 §5 rules, checked in the documented
/// order: header rules, frame limit, fragmentation state, message limit, payload rules).
pub fn ws_model(frames: &[GenFrame], limits: &codec::Limits) -> WsOutcome {
    let mut messages = Vec::new();
    // (is_text, bytes so far) of the fragmented message in progress.
    let mut partial: Option<(bool, Vec<u8>)> = None;
    let fail = |messages: Vec<Message>, e: ProtocolError| WsOutcome {
        messages,
        error: Some(e),
        leftover: 0,
        idle: false,
    };
    for f in frames {
        let len = f.payload.len();
        let control = f.opcode >= 8;
        if matches!(f.opcode, 3..=7 | 11..=15) {
            return fail(messages, ProtocolError::ReservedOpcode(f.opcode));
        }
        if control && len > 125 {
            return fail(messages, ProtocolError::ControlFrameTooLong);
        }
        if control && !f.fin {
            return fail(messages, ProtocolError::FragmentedControlFrame);
        }
        if len > limits.max_frame_size {
            return fail(messages, ProtocolError::FrameTooLarge);
        }
        if !control {
            match (f.opcode, &partial) {
                (0, None) => return fail(messages, ProtocolError::UnexpectedContinuation),
                (1 | 2, Some(_)) => return fail(messages, ProtocolError::ExpectedContinuation),
                _ => {}
            }
            let so_far = partial.as_ref().map_or(0, |p| p.1.len());
            if so_far + len > limits.max_message_size {
                return fail(messages, ProtocolError::MessageTooLarge);
            }
        }
        let payload = bytes::Bytes::from(f.payload.clone());
        match f.opcode {
            9 => messages.push(Message::Ping(payload)),
            10 => messages.push(Message::Pong(payload)),
            8 => match len {
                0 => messages.push(Message::Close(None)),
                1 => return fail(messages, ProtocolError::InvalidClosePayload),
                _ => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    if !valid_close_code(code) {
                        return fail(messages, ProtocolError::InvalidCloseCode(code));
                    }
                    if std::str::from_utf8(&payload[2..]).is_err() {
                        return fail(messages, ProtocolError::InvalidCloseReason);
                    }
                    messages.push(Message::Close(Some((code, payload.slice(2..)))));
                }
            },
            _ => {
                let (text, mut acc) = partial.take().unwrap_or((f.opcode == 1, Vec::new()));
                acc.extend_from_slice(&f.payload);
                if text {
                    match std::str::from_utf8(&acc) {
                        Ok(_) => {}
                        Err(e) if e.error_len().is_none() && !f.fin => {}
                        Err(_) => return fail(messages, ProtocolError::InvalidUtf8),
                    }
                }
                if f.fin {
                    let body = bytes::Bytes::from(acc);
                    messages.push(if text {
                        Message::Text(body)
                    } else {
                        Message::Binary(body)
                    });
                } else {
                    partial = Some((text, acc));
                }
            }
        }
    }
    WsOutcome {
        messages,
        error: None,
        leftover: 0,
        idle: partial.is_none(),
    }
}

// ---------------------------------------------------------------------------------------------
// RESP
// ---------------------------------------------------------------------------------------------

/// A small and a medium limit set (the defaults are far beyond what a fuzz input reaches).
const RESP_LIMITS: [resp::Limits; 2] = [
    resp::Limits {
        max_bulk_len: 1024,
        max_array_len: 64,
        max_depth: 8,
        max_line_len: 256,
    },
    resp::Limits {
        max_bulk_len: 16,
        max_array_len: 4,
        max_depth: 2,
        max_line_len: 8,
    },
];

/// What parsing a byte stream produced.
#[derive(Debug, PartialEq)]
pub struct RespOutcome {
    pub frames: Vec<Frame>,
    pub error: Option<ParseError>,
    /// Bytes left in the buffer at the end (0 after an error).
    pub leftover: usize,
}

/// Input layout: `[mode, seed, rest..]`. Mode bit 0: parse (0) or `encode_command` round trip
/// (1); bits 4..=6: chunk-size selector; bit 7: tiny limits.
pub fn resp(data: &[u8]) {
    let [mode, seed, rest @ ..] = data else {
        return;
    };
    if mode & 1 == 1 {
        resp_command_round_trip(rest, Chunker::new(mode >> 4, *seed));
        return;
    }
    let limits = RESP_LIMITS[usize::from(mode >> 7)];
    let whole = resp_parse(rest, &limits, &mut Chunker::whole(), true);
    let chunked = resp_parse(rest, &limits, &mut Chunker::new(mode >> 4, *seed), true);
    assert_eq!(
        chunked, whole,
        "stateful Parser: chunked differs from whole"
    );
    let free = resp_parse(rest, &limits, &mut Chunker::new(mode >> 4, *seed), false);
    assert_eq!(free, whole, "free parse: chunked differs from whole");
    for frame in &whole.frames {
        check_pubsub(frame);
        // Re-encoding a parsed frame and parsing it again gives the same frame.
        for resp3 in [false, true] {
            let mut buf = BytesMut::new();
            if resp3 {
                resp::encode_frame_resp3(&mut buf, frame);
            } else {
                resp::encode_frame(&mut buf, frame);
            }
            let again = resp::parse(&mut buf, &limits);
            assert_eq!(
                again,
                Ok(Some(frame.clone())),
                "re-encoded (resp3: {resp3})"
            );
            assert!(buf.is_empty(), "re-encoded frame left bytes");
        }
    }
}

/// Parse `input` fed in chunks, with one [`resp::Parser`] (`stateful`) or the free
/// [`resp::parse`]; checks the buffer contract of every call.
pub fn resp_parse(
    input: &[u8],
    limits: &resp::Limits,
    chunks: &mut Chunker,
    stateful: bool,
) -> RespOutcome {
    let mut parser = resp::Parser::new();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks.split(input) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            let result = if stateful {
                parser.parse(&mut buf, limits)
            } else {
                resp::parse(&mut buf, limits)
            };
            match result {
                Ok(Some(frame)) => {
                    assert!(buf.len() < before, "Ok(Some) without consuming bytes");
                    frames.push(frame);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                    break;
                }
                Err(e) => {
                    assert_eq!(buf.len(), before, "error consumed bytes");
                    assert_ne!(e, ParseError::Internal, "internal inconsistency");
                    // How much was fed before the error depends on the chunking: not compared.
                    return RespOutcome {
                        frames,
                        error: Some(e),
                        leftover: 0,
                    };
                }
            }
        }
    }
    RespOutcome {
        frames,
        error: None,
        leftover: buf.len(),
    }
}

/// `as_pubsub` on `frame` and every frame nested in it; arrays and pushes agree.
fn check_pubsub(frame: &Frame) {
    let view = resp::as_pubsub(frame);
    let items = match frame {
        Frame::Array(items) | Frame::Push(items) | Frame::Set(items) => items.as_slice(),
        Frame::Map(pairs) | Frame::Attribute(pairs) => {
            for (k, v) in pairs {
                check_pubsub(k);
                check_pubsub(v);
            }
            return;
        }
        _ => {
            assert_eq!(view, None, "scalar as pub/sub: {frame:?}");
            return;
        }
    };
    match frame {
        Frame::Array(_) => assert_eq!(view, resp::as_pubsub(&Frame::Push(items.to_vec()))),
        Frame::Set(_) => assert_eq!(view, None, "set as pub/sub"),
        _ => {}
    }
    for item in items {
        check_pubsub(item);
    }
}

/// Build arguments from the input (a count byte, then length-prefixed args), encode them with
/// `encode_command` and parse them back (whole and chunked).
fn resp_command_round_trip(rest: &[u8], mut chunks: Chunker) {
    let mut input = rest;
    let count = take(&mut input, 1).first().map_or(0, |n| n % 17);
    let mut args: Vec<&[u8]> = Vec::new();
    for _ in 0..count {
        let Some(&len) = take(&mut input, 1).first() else {
            break;
        };
        args.push(take(&mut input, usize::from(len)));
    }
    let mut encoded = BytesMut::new();
    resp::encode_command(&mut encoded, &args);
    let expected = Frame::Array(
        args.iter()
            .map(|a| Frame::Bulk(bytes::Bytes::copy_from_slice(a)))
            .collect(),
    );
    let bytes = encoded.to_vec();
    let parsed = resp::parse(&mut encoded, &resp::Limits::default());
    assert_eq!(parsed, Ok(Some(expected.clone())));
    assert!(encoded.is_empty(), "encode_command wrote trailing bytes");
    let chunked = resp_parse(&bytes, &resp::Limits::default(), &mut chunks, true);
    assert_eq!(
        chunked,
        RespOutcome {
            frames: vec![expected],
            error: None,
            leftover: 0
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Client protocol
// ---------------------------------------------------------------------------------------------

/// `s` must be one valid JSON value in valid UTF-8 (no depth limit).
fn assert_json(s: &[u8]) {
    let text = std::str::from_utf8(s).unwrap_or_else(|e| panic!("not UTF-8 ({e}): {s:?}"));
    if let Err(e) = serde_json::from_str::<&RawValue>(text) {
        panic!("invalid JSON ({e}): {text}");
    }
}

/// The top-level fields of a JSON object reply, as raw JSON text.
fn fields(s: &str) -> BTreeMap<String, &RawValue> {
    assert_json(s.as_bytes());
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not an object ({e}): {s}"))
}

/// The decoded string value of a raw JSON field.
fn string_field(map: &BTreeMap<String, &RawValue>, key: &str) -> String {
    let raw = map
        .get(key)
        .unwrap_or_else(|| panic!("no {key:?} in {map:?}"));
    serde_json::from_str(raw.get()).unwrap_or_else(|e| panic!("{key:?} not a string: {e}"))
}

fn check_id(map: &BTreeMap<String, &RawValue>, id: Option<&RawValue>) {
    assert_eq!(map.get("id").map(|r| r.get()), id.map(RawValue::get), "id");
}

fn is_valid_id(id: &RawValue) -> bool {
    matches!(id.get().as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9'))
}

/// Input: any bytes. `parse_command` runs only on valid UTF-8 (the codec guarantees it),
/// `parse_publish_body` and `payload_to_json` on everything.
pub fn protocol(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        match protocol::parse_command(text.as_bytes()) {
            Ok(cmd) => check_command(&cmd),
            Err(e) => check_command_error(&e),
        }
    }
    match protocol::parse_publish_body(data) {
        Ok((channel, raw)) => {
            assert!(protocol::is_valid_channel(&channel), "{channel:?}");
            check_message_json(&channel, raw.get().as_bytes());
        }
        Err(e) => {
            assert!(e.id.is_none(), "publish body errors carry no id");
            check_command_error(&e);
        }
    }

    let json = protocol::payload_to_json(data);
    assert_json(&json);
    match &json {
        std::borrow::Cow::Borrowed(b) => {
            let ws = |c: &u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r');
            let start = data.iter().position(|c| !ws(c)).unwrap_or(data.len());
            let end = data.iter().rposition(|c| !ws(c)).map_or(start, |i| i + 1);
            assert_eq!(
                *b,
                &data[start..end],
                "borrowed payload is not the trimmed input"
            );
        }
        std::borrow::Cow::Owned(o) => {
            let s: String = serde_json::from_slice(o).expect("fallback is a JSON string");
            assert_eq!(
                s,
                String::from_utf8_lossy(data),
                "string fallback changed the text"
            );
        }
    }
    check_message_json("fuzz/channel", &json);

    // Escaping of arbitrary strings.
    let lossy = String::from_utf8_lossy(data);
    let err = protocol::error(None, ErrorCode::RateLimited, &lossy);
    let map = fields(&err);
    assert_eq!(string_field(&map, "message"), lossy);
    assert_eq!(string_field(&map, "code"), "rate_limited");
    check_id(&map, None);
    let welcome = protocol::welcome(&lossy, "instance");
    let map = fields(&welcome);
    assert_eq!(string_field(&map, "type"), "welcome");
    assert_eq!(string_field(&map, "connection"), lossy);
}

fn check_command(cmd: &Command<'_>) {
    let id = cmd.id();
    if let Some(id) = id {
        assert!(is_valid_id(id), "bad id accepted: {}", id.get());
    }
    let pong = protocol::pong(id);
    let map = fields(&pong);
    assert_eq!(string_field(&map, "type"), "pong");
    check_id(&map, id);
    let err = protocol::error(id, ErrorCode::TooManySubscriptions, "limit");
    check_id(&fields(&err), id);

    let kind = match cmd {
        Command::Subscribe { .. } => "subscribed",
        Command::Unsubscribe { .. } => "unsubscribed",
        Command::Publish { .. } => "published",
        Command::Ping { .. } => {
            assert_eq!(cmd.channel(), None);
            return;
        }
        // The commands without an ack of their own (connect, refresh, history, …; the list
        // grows with the protocol): a channel, when they name one, is valid.
        _ => {
            if let Some(channel) = cmd.channel() {
                assert!(protocol::is_valid_channel(channel), "{channel:?}");
            }
            return;
        }
    };
    let channel = cmd.channel().expect("command with a channel");
    assert!(protocol::is_valid_channel(channel), "{channel:?}");
    let ack = protocol::ack(kind, channel, id);
    let map = fields(&ack);
    assert_eq!(string_field(&map, "type"), kind);
    assert_eq!(string_field(&map, "channel"), channel);
    check_id(&map, id);
    if let Command::Publish { data, .. } = cmd {
        check_message_json(channel, data.get().as_bytes());
    }
}

/// `write_message_json` with `data` (JSON text) writes exactly `message_json_len` bytes of a
/// JSON object whose `data` is `data` verbatim.
fn check_message_json(channel: &str, data: &[u8]) {
    assert_json(data);
    let mut dst = BytesMut::new();
    protocol::write_message_json(&mut dst, channel, data);
    assert_eq!(dst.len(), protocol::message_json_len(channel, data));
    let text = std::str::from_utf8(&dst).expect("message frame is UTF-8");
    let map = fields(text);
    assert_eq!(string_field(&map, "type"), "message");
    assert_eq!(string_field(&map, "channel"), channel);
    assert_eq!(map.get("data").map(|r| r.get().as_bytes()), Some(data));
}

fn check_command_error(e: &CommandError<'_>) {
    if let Some(id) = e.id {
        assert!(is_valid_id(id), "error echoes a bad id: {}", id.get());
    }
    let json = e.to_json();
    let map = fields(&json);
    assert_eq!(string_field(&map, "type"), "error");
    assert_eq!(string_field(&map, "code"), e.code.as_str());
    assert_eq!(string_field(&map, "message"), e.message);
    check_id(&map, e.id);
}

// ---------------------------------------------------------------------------------------------
// HTTP request heads
// ---------------------------------------------------------------------------------------------

/// The normal limits (scaled down) and tiny ones so that every limit error is reachable.
const HTTP_LIMITS: [HttpLimits; 2] = [
    HttpLimits {
        max_head_size: 1024,
        max_headers: 16,
        max_body_size: 4096,
    },
    HttpLimits {
        max_head_size: 64,
        max_headers: 2,
        max_body_size: 10,
    },
];

/// Input layout: `[mode, seed, request..]`. Mode bit 0: tiny limits; bits 4..=6: the
/// chunk-size selector for the prefixes tried on long inputs (short ones try every prefix).
pub fn http_head(data: &[u8]) {
    let [mode, seed, input @ ..] = data else {
        return;
    };
    let limits = HTTP_LIMITS[usize::from(mode & 1)];
    let whole = http::parse_head(input, &limits);
    check_head_result(&whole, input, &limits);

    let mut cuts: Vec<usize> = if input.len() <= 300 {
        (0..=input.len()).collect()
    } else {
        let mut chunks = Chunker::new(mode >> 4, *seed);
        let mut pos = 0;
        let mut cuts = vec![0];
        for chunk in chunks.split(input).into_iter().take(64) {
            pos += chunk.len();
            cuts.push(pos);
        }
        cuts
    };
    cuts.push(input.len());
    for edge in [limits.max_head_size - 1, limits.max_head_size] {
        cuts.push(edge.min(input.len()));
    }
    if let Ok(Some(head)) = &whole {
        cuts.extend([head.head_len - 1, head.head_len]);
    }
    cuts.sort_unstable();
    cuts.dedup();

    // Prefixes: incomplete until some length, then exactly the whole input's result.
    let mut settled_at = None;
    for cut in cuts {
        let result = http::parse_head(&input[..cut], &limits);
        match &result {
            Ok(None) => assert_eq!(
                settled_at, None,
                "prefix {cut} incomplete after a result at a shorter prefix"
            ),
            _ => {
                assert_eq!(result, whole, "prefix {cut} disagrees with the whole input");
                settled_at.get_or_insert(cut);
            }
        }
    }
}

fn check_head_result(
    result: &Result<Option<RequestHead>, http::HttpError>,
    input: &[u8],
    limits: &HttpLimits,
) {
    match result {
        Ok(None) => assert!(input.len() < limits.max_head_size, "Ok(None) at the limit"),
        Ok(Some(head)) => {
            assert!(head.head_len >= 1 && head.head_len <= input.len());
            assert!(head.head_len <= limits.max_head_size);
            assert!(head.content_length <= limits.max_body_size);
            assert!(head.version_minor <= 1);
            assert!(!head.path.contains('?'));
            check_upgrade(head);
            // Request-supplied strings echoed in headers cannot inject header lines.
            let mut extra: Vec<(&str, &str)> = vec![("X-Path", &head.path)];
            if let Some(q) = &head.query {
                extra.push(("X-Query", q));
            }
            if let Some(a) = &head.authorization {
                extra.push((a, a));
            }
            let out = http::response_with_headers(
                200,
                &head.path,
                &extra,
                head.path.as_bytes(),
                head.keep_alive,
            );
            check_response(&out, 3 + extra.len(), head.path.len());
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 413 | 431 | 501), "{e:?}");
            let out = e.to_response();
            let body = http::json_error_body(e.code(), &e.to_string());
            assert_json(body.as_bytes());
            check_response(&out, 3, body.len());
        }
    }
}

fn check_upgrade(head: &RequestHead) {
    match http::accept_upgrade(head) {
        Ok(accept) => {
            assert_eq!(accept.len(), 28, "{accept:?}");
            let up = head.upgrade.as_ref().expect("accepted without Upgrade");
            let protocol = up.protocols.first().map(String::as_str);
            let out = http::switching_protocols_with_protocol(&accept, protocol);
            check_response(&out, 3 + usize::from(protocol.is_some()), 0);
        }
        Err((status, message)) => {
            assert!(matches!(status, 400 | 426), "{status}");
            let out = http::upgrade_error_response(status, message);
            let code = if status == 426 {
                "upgrade_required"
            } else {
                "bad_request"
            };
            let body = http::json_error_body(code, message);
            check_response(&out, 3 + usize::from(status == 426), body.len());
        }
    }
}

/// `out` is a status line, exactly `headers` header lines without stray CR/LF, a blank line
/// and a body of `body_len` bytes.
fn check_response(out: &[u8], headers: usize, body_len: usize) {
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head ends with a blank line");
    let head = &out[..end];
    let lines: Vec<&[u8]> = head.split(|&b| b == b'\n').collect();
    assert_eq!(
        lines.len(),
        1 + headers,
        "header lines of {:?}",
        String::from_utf8_lossy(head)
    );
    for (i, line) in lines.iter().enumerate() {
        let line = if i + 1 < lines.len() {
            line.strip_suffix(b"\r").expect("CRLF line ending")
        } else {
            line
        };
        assert!(!line.contains(&b'\r'), "stray CR in {line:?}");
    }
    assert!(out.starts_with(b"HTTP/1.1 "));
    assert_eq!(out.len() - end - 4, body_len, "body length");
}

// ---------------------------------------------------------------------------------------------
// Tokens (JWT)
// ---------------------------------------------------------------------------------------------

/// The clock of every token check (the seeds' `exp`/`nbf`/`iat` are around it).
pub const TOKEN_NOW: u64 = 1_700_000_000;
/// The HMAC secrets of the token harness (the seeds are signed with them).
pub const TOKEN_SECRET: &str = "fuzz-secret-0123456789abcdef-0123";
pub const TOKEN_PREVIOUS_SECRET: &str = "fuzz-previous-secret";

/// One HMAC verifier per rule set: mode bits 1..=3 (tiny size limit, audience and issuer
/// required, `exp` optional).
fn token_verifier(mode: u8) -> &'static (Verifier, AuthConfig) {
    static VERIFIERS: std::sync::OnceLock<Vec<(Verifier, AuthConfig)>> = std::sync::OnceLock::new();
    let all = VERIFIERS.get_or_init(|| {
        (0..8u8)
            .map(|bits| {
                let cfg = AuthConfig {
                    secret: Some(TOKEN_SECRET.into()),
                    previous_secret: Some(TOKEN_PREVIOUS_SECRET.into()),
                    max_token_size: if bits & 1 != 0 { 256 } else { 8 << 10 },
                    audience: if bits & 2 != 0 {
                        vec!["hub".into(), "hub2".into()]
                    } else {
                        Vec::new()
                    },
                    issuer: (bits & 2 != 0).then(|| "issuer".into()),
                    require_exp: bits & 4 == 0,
                    ..AuthConfig::default()
                };
                (Verifier::new(&cfg).expect("harness verifier"), cfg)
            })
            .collect()
    });
    &all[usize::from((mode >> 1) & 7)]
}

/// Input layout: `[mode, rest..]`. Mode bit 0: `rest` is a token (0), or a payload the harness
/// signs (1) so that the claim checks run behind a valid signature; bits 1..=3: the verifier's
/// rules (see `token_verifier`); bits 4..=5 (signed mode): HS256, HS384, HS512, or HS256 with
/// a wrong secret; bit 6 (signed mode): sign with the previous secret; bit 7 (signed mode):
/// put a `kid` in the header.
///
/// Checks: `verify_*` agrees with `inspect` + `check_*_claims` (the same error at the same
/// step, the same claims); accepted claims obey the rules (no `channel` in a connection
/// token, `exp` in time, `info` ≤ 1 KiB and an object, ≤ 1000 channels, …); an HMAC-only
/// verifier never answers `NoKey`/`UnknownKid`; error messages stay short (no token echo).
pub fn token(data: &[u8]) {
    let [mode, rest @ ..] = data else {
        return;
    };
    let (verifier, cfg) = token_verifier(*mode);
    let signed = mode & 1 != 0;
    let mut wrong_secret = false;
    let token = if signed {
        let (secret, alg) = match (mode >> 4) & 3 {
            0 => (TOKEN_SECRET, Algorithm::HS256),
            1 => (TOKEN_SECRET, Algorithm::HS384),
            2 => (TOKEN_SECRET, Algorithm::HS512),
            _ => {
                wrong_secret = true;
                ("not-the-secret", Algorithm::HS256)
            }
        };
        let secret = if mode & 0x40 != 0 && !wrong_secret {
            TOKEN_PREVIOUS_SECRET
        } else {
            secret
        };
        let key = MintKey::Hmac {
            secret: secret.as_bytes().to_vec(),
            alg,
        };
        let kid = (mode & 0x80 != 0).then_some("some-kid");
        token::mint_raw(&key, rest, kid).expect("HMAC signing cannot fail")
    } else {
        String::from_utf8_lossy(rest).into_owned()
    };

    let rules = verifier.rules();
    assert_eq!(rules, &ClaimRules::from_config(cfg));
    let inspected = token::inspect(&token, cfg.max_token_size);
    if inspected.is_ok() {
        assert!(token.len() <= cfg.max_token_size);
    }
    if signed && token.len() <= cfg.max_token_size {
        // Our own header is always fine; the payload decides.
        let is_object =
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(rest).is_ok();
        assert_eq!(inspected.is_ok(), is_object, "{inspected:?}");
    }

    // What verification must say: inspect's error, or the claim checks' verdict once the
    // signature is known to be good (signed mode with the right secret); with a token of
    // unknown origin, only that an accepted token passes the same claim checks.
    let connection = verifier.verify_connection(&token, TOKEN_NOW);
    let channel = verifier.verify_channel(&token, TOKEN_NOW);
    for err in [connection.as_ref().err(), channel.as_ref().err()]
        .into_iter()
        .flatten()
    {
        assert!(
            !matches!(err, TokenError::NoKey | TokenError::UnknownKid(_)),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.len() <= 160, "long error message: {text}");
    }
    match &inspected {
        Err(e) => {
            assert_eq!(connection.as_ref().unwrap_err(), e);
            assert_eq!(channel.as_ref().unwrap_err(), e);
        }
        Ok((header, claims)) => {
            let want_connection = token::check_connection_claims(claims, rules, TOKEN_NOW);
            let want_channel = token::check_channel_claims(claims, rules, TOKEN_NOW);
            if let Ok(c) = &want_connection {
                check_connection_claims(c, claims, rules);
            }
            if let Ok(c) = &want_channel {
                check_channel_claims(c, claims, rules);
            }
            let hmac = matches!(
                header.alg,
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
            );
            if !hmac {
                let name = token::algorithm_name(header.alg).to_string();
                assert_eq!(
                    connection.as_ref().unwrap_err(),
                    &TokenError::Algorithm(name)
                );
            } else if signed && !wrong_secret {
                assert_eq!(format!("{connection:?}"), format!("{want_connection:?}"));
                assert_eq!(format!("{channel:?}"), format!("{want_channel:?}"));
            } else if signed {
                assert_eq!(connection.as_ref().unwrap_err(), &TokenError::BadSignature);
                assert_eq!(channel.as_ref().unwrap_err(), &TokenError::BadSignature);
            } else {
                // A token from the input: accepted only if the claim checks accept it too.
                if connection.is_ok() {
                    assert_eq!(format!("{connection:?}"), format!("{want_connection:?}"));
                }
                if channel.is_ok() {
                    assert_eq!(format!("{channel:?}"), format!("{want_channel:?}"));
                }
            }
        }
    }
}

fn check_connection_claims(
    c: &ConnectionClaims,
    claims: &serde_json::Map<String, serde_json::Value>,
    rules: &ClaimRules,
) {
    assert!(!claims.contains_key("channel"));
    assert_eq!(
        claims.get("sub").and_then(|s| s.as_str()),
        Some(c.user.as_str())
    );
    check_times(c.exp, claims, rules);
    if rules.require_exp {
        assert!(c.exp.is_some());
    }
    if let Some(info) = &c.info {
        assert!(info.get().len() <= token::MAX_INFO_BYTES);
        let value: serde_json::Value = serde_json::from_str(info.get()).expect("info is JSON");
        assert!(value.is_object());
        assert_eq!(Some(&value), claims.get("info"));
    }
    assert!(c.channels.len() <= token::MAX_CHANNELS);
}

fn check_channel_claims(
    c: &ChannelClaims,
    claims: &serde_json::Map<String, serde_json::Value>,
    rules: &ClaimRules,
) {
    assert!(!c.channel.is_empty());
    assert_eq!(
        claims.get("channel").and_then(|s| s.as_str()),
        Some(c.channel.as_str())
    );
    assert_eq!(
        claims.get("sub").and_then(|s| s.as_str()),
        Some(c.user.as_str())
    );
    check_times(Some(c.exp), claims, rules);
}

/// Accepted time claims are numbers, in time with the leeway; audience and issuer match.
fn check_times(
    exp: Option<u64>,
    claims: &serde_json::Map<String, serde_json::Value>,
    rules: &ClaimRules,
) {
    for name in ["exp", "nbf", "iat"] {
        if let Some(v) = claims.get(name) {
            assert!(v.as_f64().is_some_and(|f| f >= 0.0), "{name}: {v}");
        }
    }
    if let Some(exp) = exp {
        assert!(
            exp.saturating_add(rules.leeway) >= TOKEN_NOW,
            "expired token accepted"
        );
    }
    if let Some(nbf) = claims.get("nbf").and_then(|v| v.as_f64()) {
        assert!(nbf - rules.leeway as f64 <= TOKEN_NOW as f64);
    }
    if !rules.audience.is_empty() {
        let aud = claims.get("aud").expect("aud required");
        let names: Vec<&str> = match aud {
            serde_json::Value::String(s) => vec![s.as_str()],
            serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str()).collect(),
            other => panic!("aud {other}"),
        };
        assert!(names.iter().any(|n| rules.audience.iter().any(|a| a == n)));
    }
    if let Some(iss) = &rules.issuer {
        assert_eq!(
            claims.get("iss").and_then(|v| v.as_str()),
            Some(iss.as_str())
        );
    }
}
