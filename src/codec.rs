//! Sans-IO WebSocket (RFC 6455) frame codec, server side.
//!
//! This module never touches a socket: the connection task appends received bytes to a
//! [`BytesMut`] and calls [`Decoder::decode`], and writes the [`Bytes`] produced by
//! [`encode_frame`] / [`encode_close`].
//!
//! # Invariants
//! - **Client frames must be masked, server frames are never masked.** Server frames are
//!   always sent with FIN set (we never fragment outgoing messages).
//! - **No extensions are negotiated**, so RSV1..3 must be zero; reserved opcodes are rejected.
//! - **Every violation is fatal** ([`ProtocolError`]) and carries the close code to send
//!   (1002 protocol error, 1007 invalid UTF-8, 1009 too large). After an error the decoder
//!   state is unspecified: close the connection, do not decode again.
//! - **Limits before allocation.** A frame's length is checked against
//!   [`Limits::max_frame_size`] and the message's running total against
//!   [`Limits::max_message_size`] as soon as the frame *header* is complete, before its
//!   payload is awaited or any memory is reserved. The decoder also never reserves space in
//!   the caller's buffer for a declared length: memory grows only with bytes actually received.
//! - **Text fails fast.** UTF-8 is validated incrementally, fragment by fragment: a byte
//!   sequence that can never become valid is reported when the fragment containing it
//!   arrives; a code point merely split across fragments is carried over (at most 3 bytes).
//!   Validation granularity is the frame: a single frame is checked once complete.
//! - **Idle connections cost nothing.** [`Decoder::new`] allocates nothing and the
//!   reassembly buffer exists only while a fragmented message is in progress.
//! - **Zero copy where possible.** An unfragmented frame is unmasked in place and split off
//!   the caller's buffer; only fragmented messages are copied (into the reassembly buffer).
//!
//! Lengths are accepted even when not minimally encoded (the "minimal bytes" rule binds the
//! sender; rejecting it buys nothing).

use bytes::{Buf, BufMut, Bytes, BytesMut};
pub use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Size limits, checked BEFORE any allocation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted payload of one frame, in bytes.
    pub max_frame_size: usize,
    /// Largest accepted (reassembled) message payload, in bytes.
    pub max_message_size: usize,
}

/// A complete message or control frame received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Complete message, validated UTF-8.
    Text(Bytes),
    /// Complete message.
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// Close frame from the peer: None when the close frame had no payload; else (code, reason).
    /// The code is a valid code to receive and the reason is valid UTF-8.
    Close(Option<(u16, Bytes)>),
}

/// A protocol violation by the peer. Every variant is fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A client frame without the mask bit (RFC 6455 §5.1). Close 1002.
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// A server frame with the mask bit (seen by [`decode_server_frame`]). Close 1002.
    #[error("server frame is masked")]
    MaskedFrame,
    /// RSV1, RSV2 or RSV3 set, but no extension was negotiated (§5.2). Close 1002.
    #[error("reserved bits set")]
    ReservedBits,
    /// Opcode 0x3-0x7 or 0xB-0xF (§5.2). Close 1002.
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A control frame with a payload over 125 bytes (§5.5). Close 1002.
    #[error("control frame payload over 125 bytes")]
    ControlFrameTooLong,
    /// A control frame without FIN (§5.5). Close 1002.
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// A continuation frame while no fragmented message is in progress (§5.4). Close 1002.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A text or binary frame while a fragmented message is in progress (§5.4). Close 1002.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// A 64-bit payload length with the most significant bit set (§5.2). Close 1002.
    #[error("invalid 64-bit payload length")]
    InvalidLength,
    /// A frame payload over [`Limits::max_frame_size`]. Close 1009.
    #[error("frame too large")]
    FrameTooLarge,
    /// A message payload (all fragments so far) over [`Limits::max_message_size`]. Close 1009.
    #[error("message too large")]
    MessageTooLarge,
    /// A text message that is not valid UTF-8 (§8.1). Close 1007.
    #[error("invalid UTF-8 in text message")]
    InvalidUtf8,
    /// A close frame with a 1-byte payload (§5.5.1). Close 1002.
    #[error("close frame payload of 1 byte")]
    InvalidClosePayload,
    /// A close frame carrying a code that must not be received (§7.4). Close 1002.
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A close frame whose reason is not valid UTF-8 (§5.5.1). Close 1007.
    #[error("invalid UTF-8 in close reason")]
    InvalidCloseReason,
}

impl ProtocolError {
    /// The close code to send: 1002 protocol error, 1007 invalid UTF-8 (text or close reason),
    /// 1009 too large.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::InvalidUtf8 | Self::InvalidCloseReason => 1007,
            Self::FrameTooLarge | Self::MessageTooLarge => 1009,
            _ => 1002,
        }
    }

    /// Short human reason, <= 123 bytes, for the close frame.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnmaskedFrame => "unmasked client frame",
            Self::MaskedFrame => "masked server frame",
            Self::ReservedBits => "reserved bits set",
            Self::ReservedOpcode(_) => "reserved opcode",
            Self::ControlFrameTooLong => "control frame too long",
            Self::FragmentedControlFrame => "fragmented control frame",
            Self::UnexpectedContinuation => "unexpected continuation frame",
            Self::ExpectedContinuation => "expected continuation frame",
            Self::InvalidLength => "invalid payload length",
            Self::FrameTooLarge => "frame too large",
            Self::MessageTooLarge => "message too large",
            Self::InvalidUtf8 => "invalid UTF-8",
            Self::InvalidClosePayload => "invalid close payload",
            Self::InvalidCloseCode(_) => "invalid close code",
            Self::InvalidCloseReason => "invalid UTF-8 in close reason",
        }
    }
}

/// Largest payload of a control frame (§5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest close reason: a control payload minus the 2-byte code.
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// Kind of the fragmented message in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Partial {
    Idle,
    Binary,
    /// `carry`: trailing bytes of the reassembly buffer (0..=3) that form the incomplete
    /// start of a code point; everything before them is validated UTF-8.
    Text {
        carry: u8,
    },
}

/// Per-connection decoder state: 40 bytes, no allocation while idle.
#[derive(Debug)]
pub struct Decoder {
    /// Reassembly buffer of the fragmented message in progress; unallocated when idle.
    buf: BytesMut,
    partial: Partial,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A fresh decoder; allocates nothing.
    pub fn new() -> Self {
        Decoder {
            buf: BytesMut::new(),
            partial: Partial::Idle,
        }
    }

    /// true when no fragmented message is in progress.
    pub fn is_idle(&self) -> bool {
        self.partial == Partial::Idle
    }

    /// Consume complete frames from the front of `buf` (advancing it) and return the next
    /// complete message or control frame.
    ///
    /// `Ok(None)`: more bytes are needed; an incomplete frame is left in `buf` untouched
    /// (header included), so append more bytes and call again. Control frames arriving
    /// between fragments of a data message are returned immediately. Errors are detected as
    /// early as possible: header violations and size limits as soon as the header is complete.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Message>, ProtocolError> {
        loop {
            let Some(head) = parse_header(buf, true)? else {
                return Ok(None);
            };
            if head.payload_len > limits.max_frame_size as u64 {
                return Err(ProtocolError::FrameTooLarge);
            }
            let len = head.payload_len as usize;
            if let OpCode::Data(data) = head.opcode {
                match (data, self.partial) {
                    (Data::Continue, Partial::Idle) => {
                        return Err(ProtocolError::UnexpectedContinuation)
                    }
                    (Data::Text | Data::Binary, Partial::Binary | Partial::Text { .. }) => {
                        return Err(ProtocolError::ExpectedContinuation)
                    }
                    _ => {}
                }
                if self.buf.len().saturating_add(len) > limits.max_message_size {
                    return Err(ProtocolError::MessageTooLarge);
                }
            }
            if buf.len() - head.header_len < len {
                return Ok(None);
            }

            buf.advance(head.header_len);
            let mut payload = buf.split_to(len);
            apply_mask(&mut payload, head.mask);

            let data = match head.opcode {
                OpCode::Control(Control::Ping) => return Ok(Some(Message::Ping(payload.freeze()))),
                OpCode::Control(Control::Pong) => return Ok(Some(Message::Pong(payload.freeze()))),
                OpCode::Control(_) => return parse_close(payload.freeze()).map(Some),
                OpCode::Data(data) => data,
            };
            match data {
                // Unfragmented: the payload is the message, no copy.
                Data::Text if head.fin => {
                    check_utf8(&payload, true)?;
                    return Ok(Some(Message::Text(payload.freeze())));
                }
                Data::Binary if head.fin => return Ok(Some(Message::Binary(payload.freeze()))),
                // First fragment.
                Data::Text => self.partial = Partial::Text { carry: 0 },
                Data::Binary => self.partial = Partial::Binary,
                _ => {}
            }
            if let Partial::Text { carry } = self.partial {
                let start = self.buf.len() - carry as usize;
                self.buf.extend_from_slice(&payload);
                let carry = check_utf8(&self.buf[start..], head.fin)?;
                self.partial = Partial::Text { carry };
            } else {
                self.buf.extend_from_slice(&payload);
            }
            if head.fin {
                let body = std::mem::take(&mut self.buf).freeze();
                let text = matches!(self.partial, Partial::Text { .. });
                self.partial = Partial::Idle;
                return Ok(Some(if text {
                    Message::Text(body)
                } else {
                    Message::Binary(body)
                }));
            }
        }
    }
}

/// Validate `bytes`, which start at a code point boundary. Returns how many trailing bytes
/// are an incomplete (but so far valid) code point; at `fin` there must be none.
fn check_utf8(bytes: &[u8], fin: bool) -> Result<u8, ProtocolError> {
    match std::str::from_utf8(bytes) {
        Ok(_) => Ok(0),
        // error_len() == None: the input ends in the middle of a valid sequence (<= 3 bytes).
        Err(e) if e.error_len().is_none() && !fin => Ok((bytes.len() - e.valid_up_to()) as u8),
        Err(_) => Err(ProtocolError::InvalidUtf8),
    }
}

/// Validate a close frame payload (§5.5.1, §7.4.1).
fn parse_close(payload: Bytes) -> Result<Message, ProtocolError> {
    match payload.len() {
        0 => Ok(Message::Close(None)),
        1 => Err(ProtocolError::InvalidClosePayload),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(ProtocolError::InvalidCloseReason);
            }
            Ok(Message::Close(Some((code, payload.slice(2..)))))
        }
    }
}

/// A parsed frame header.
#[derive(Debug)]
struct Header {
    fin: bool,
    /// Never a reserved opcode.
    opcode: OpCode,
    /// All zero for unmasked frames (XOR with zero is the identity).
    mask: [u8; 4],
    header_len: usize,
    payload_len: u64,
}

/// Parse the frame header at the front of `buf` without consuming it. `Ok(None)` when
/// incomplete. Every rule decidable from the header is checked, each as soon as the bytes it
/// needs are present. `masked`: whether the mask bit must be set (client frames) or clear.
fn parse_header(buf: &[u8], masked: bool) -> Result<Option<Header>, ProtocolError> {
    let &[b0, b1, ..] = buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from(b0 & 0x0F);
    let len7 = b1 & 0x7F;
    match opcode {
        OpCode::Data(Data::Reserved(n)) | OpCode::Control(Control::Reserved(n)) => {
            return Err(ProtocolError::ReservedOpcode(n))
        }
        OpCode::Control(_) if usize::from(len7) > MAX_CONTROL_PAYLOAD => {
            return Err(ProtocolError::ControlFrameTooLong)
        }
        OpCode::Control(_) if !fin => return Err(ProtocolError::FragmentedControlFrame),
        _ => {}
    }
    if (b1 & 0x80 != 0) != masked {
        return Err(if masked {
            ProtocolError::UnmaskedFrame
        } else {
            ProtocolError::MaskedFrame
        });
    }
    let (payload_len, len_end) = match len7 {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let n = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                if n >> 63 != 0 {
                    return Err(ProtocolError::InvalidLength);
                }
                (n, 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let (mask, header_len) = if masked {
        match buf.get(len_end..len_end + 4) {
            Some(m) => (m.try_into().expect("4 bytes"), len_end + 4),
            None => return Ok(None),
        }
    } else {
        ([0; 4], len_end)
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len,
        payload_len,
    }))
}

/// XOR `data` with the repeating 4-byte `mask`, 8 bytes at a time.
fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    if mask == [0; 4] {
        return;
    }
    let [a, b, c, d] = mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, hence of 4: the mask phase restarts at 0.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Length of the header of an unmasked frame with this payload length: 2, 4 or 10.
pub fn frame_header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Write the 7/16/64-bit payload length field; `mask_bit` is OR-ed into its first byte.
fn put_len(dst: &mut impl BufMut, mask_bit: u8, payload_len: usize) {
    match payload_len {
        0..=125 => dst.put_u8(mask_bit | payload_len as u8),
        126..=0xFFFF => {
            dst.put_u8(mask_bit | 126);
            dst.put_u16(payload_len as u16);
        }
        _ => {
            dst.put_u8(mask_bit | 127);
            dst.put_u64(payload_len as u64);
        }
    }
}

/// Write the header of a server→client frame: unmasked, FIN set.
pub fn write_frame_header(dst: &mut BytesMut, opcode: OpCode, payload_len: usize) {
    debug_assert!(
        matches!(opcode, OpCode::Data(_)) || payload_len <= MAX_CONTROL_PAYLOAD,
        "control frame payload over 125 bytes"
    );
    dst.reserve(frame_header_len(payload_len));
    dst.put_u8(0x80 | u8::from(opcode));
    put_len(dst, 0, payload_len);
}

/// A complete server→client frame (unmasked, FIN set), in one allocation of the exact size.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut dst = BytesMut::with_capacity(frame_header_len(payload.len()) + payload.len());
    write_frame_header(&mut dst, opcode, payload.len());
    dst.extend_from_slice(payload);
    dst.freeze()
}

/// A close frame; `reason` is truncated to <= 123 bytes on a char boundary.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut dst = BytesMut::with_capacity(frame_header_len(2 + end) + 2 + end);
    write_frame_header(&mut dst, OpCode::Control(Control::Close), 2 + end);
    dst.put_u16(code);
    dst.extend_from_slice(reason);
    dst.freeze()
}

/// Client-side (masked) encoding, for tests and the load generator. Any opcode is written
/// as given (reserved ones included), so tests can build invalid frames.
pub fn encode_masked(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4], dst: &mut Vec<u8>) {
    dst.reserve(frame_header_len(payload.len()) + 4 + payload.len());
    dst.push(if fin { 0x80 } else { 0 } | u8::from(opcode));
    put_len(dst, 0x80, payload.len());
    dst.extend_from_slice(&mask);
    let start = dst.len();
    dst.extend_from_slice(payload);
    apply_mask(&mut dst[start..], mask);
}

/// A client-side decoder helper for tests/load generators: parse ONE unmasked server frame
/// from the front of `buf`: `Ok(Some((opcode, fin, payload)))` consuming it, `Ok(None)` when
/// incomplete (nothing consumed). Checks header rules only (no limits, no UTF-8, no
/// fragmentation state).
pub fn decode_server_frame(
    buf: &mut BytesMut,
) -> Result<Option<(OpCode, bool, Bytes)>, ProtocolError> {
    let Some(head) = parse_header(buf, false)? else {
        return Ok(None);
    };
    let len = usize::try_from(head.payload_len).map_err(|_| ProtocolError::FrameTooLarge)?;
    if buf.len() - head.header_len < len {
        return Ok(None);
    }
    buf.advance(head.header_len);
    Ok(Some((head.opcode, head.fin, buf.split_to(len).freeze())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TEXT: OpCode = OpCode::Data(Data::Text);
    const BINARY: OpCode = OpCode::Data(Data::Binary);
    const CONT: OpCode = OpCode::Data(Data::Continue);
    const CLOSE: OpCode = OpCode::Control(Control::Close);
    const PING: OpCode = OpCode::Control(Control::Ping);
    const PONG: OpCode = OpCode::Control(Control::Pong);
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    const BIG: Limits = Limits {
        max_frame_size: 1 << 20,
        max_message_size: 1 << 20,
    };

    fn frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_masked(opcode, fin, payload, MASK, &mut v);
        v
    }

    /// Decode everything in `bytes` (all must be consumed) with BIG limits.
    fn decode_all(bytes: &[u8]) -> Result<Vec<Message>, ProtocolError> {
        let mut dec = Decoder::new();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(m) = dec.decode(&mut buf, &BIG)? {
            out.push(m);
        }
        assert!(buf.is_empty(), "unconsumed bytes");
        Ok(out)
    }

    /// Feed `bytes` in the given chunks, decoding after each; returns all messages.
    fn decode_chunked(bytes: &[u8], cuts: &[usize]) -> Vec<Message> {
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pos = 0;
        for &cut in cuts.iter().chain([bytes.len()].iter()) {
            let cut = cut.clamp(pos, bytes.len());
            buf.extend_from_slice(&bytes[pos..cut]);
            pos = cut;
            while let Some(m) = dec.decode(&mut buf, &BIG).unwrap() {
                out.push(m);
            }
        }
        assert!(buf.is_empty() && dec.is_idle());
        out
    }

    fn err_of(bytes: &[u8]) -> ProtocolError {
        decode_all(bytes).expect_err("should fail")
    }

    fn text_of(len: usize) -> Vec<u8> {
        // Mixed 1-4 byte code points, trimmed to a char boundary and padded with ASCII.
        let s: String = "aé€😀".chars().cycle().take(len).collect();
        let mut end = len.min(s.len());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut v = s.as_bytes()[..end].to_vec();
        v.resize(len, b'x');
        v
    }

    #[test]
    fn decoder_is_small_and_unallocated() {
        assert!(std::mem::size_of::<Decoder>() <= 40);
        let dec = Decoder::new();
        assert_eq!(dec.buf.capacity(), 0);
        assert!(dec.is_idle());
    }

    #[test]
    fn round_trip_data() {
        for len in [0, 125, 126, 65535, 65536, 100_000] {
            let text = text_of(len);
            assert!(std::str::from_utf8(&text).is_ok());
            let bin: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut bytes = frame(TEXT, true, &text);
            bytes.extend(frame(BINARY, true, &bin));
            assert_eq!(
                decode_all(&bytes).unwrap(),
                vec![
                    Message::Text(Bytes::from(text)),
                    Message::Binary(Bytes::from(bin))
                ],
                "len {len}"
            );
        }
    }

    #[test]
    fn round_trip_control() {
        for len in [0, 1, 124, 125] {
            let p: Vec<u8> = (0..len as u8).collect();
            let mut bytes = frame(PING, true, &p);
            bytes.extend(frame(PONG, true, &p));
            assert_eq!(
                decode_all(&bytes).unwrap(),
                vec![
                    Message::Ping(Bytes::from(p.clone())),
                    Message::Pong(Bytes::from(p))
                ]
            );
        }
        assert_eq!(
            decode_all(&frame(CLOSE, true, b"")).unwrap(),
            vec![Message::Close(None)]
        );
        for reason in ["", "bye", &"r".repeat(123)] {
            let mut p = 1000u16.to_be_bytes().to_vec();
            p.extend_from_slice(reason.as_bytes());
            assert_eq!(
                decode_all(&frame(CLOSE, true, &p)).unwrap(),
                vec![Message::Close(Some((1000, Bytes::from(reason.to_owned()))))]
            );
        }
    }

    #[test]
    fn valid_close_codes() {
        for code in [1000, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 4999] {
            let f = frame(CLOSE, true, &u16::to_be_bytes(code));
            assert_eq!(
                decode_all(&f).unwrap(),
                vec![Message::Close(Some((code, Bytes::new())))]
            );
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let f = frame(CLOSE, true, &u16::to_be_bytes(code));
            let e = err_of(&f);
            assert_eq!(e, ProtocolError::InvalidCloseCode(code));
            assert_eq!(e.close_code(), 1002);
        }
    }

    fn multi_frame_stream() -> (Vec<u8>, Vec<Message>) {
        let mut s = frame(TEXT, false, "héllo ".as_bytes());
        s.extend(frame(PING, true, b"p"));
        s.extend(frame(CONT, true, "wörld".as_bytes()));
        s.extend(frame(BINARY, true, &[0u8; 300]));
        s.extend(frame(BINARY, false, &[1, 2]));
        s.extend(frame(CONT, false, &[]));
        s.extend(frame(CONT, true, &[3]));
        s.extend(frame(CLOSE, true, b"\x03\xe8ok"));
        let msgs = vec![
            Message::Ping(Bytes::from_static(b"p")),
            Message::Text(Bytes::from("héllo wörld")),
            Message::Binary(Bytes::from(vec![0u8; 300])),
            Message::Binary(Bytes::from_static(&[1, 2, 3])),
            Message::Close(Some((1000, Bytes::from_static(b"ok")))),
        ];
        (s, msgs)
    }

    #[test]
    fn rfc6455_section_5_7_examples() {
        // Masked "Hello" from a client.
        let hello = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
        assert_eq!(frame(TEXT, true, b"Hello"), hello);
        assert_eq!(
            decode_all(hello).unwrap(),
            vec![Message::Text(Bytes::from_static(b"Hello"))]
        );
        // Unmasked server frames: "Hello", and "Hel" + "lo" fragmented.
        assert_eq!(&encode_frame(TEXT, b"Hello")[..], b"\x81\x05Hello");
        let mut buf = BytesMut::from(&b"\x01\x03Hel\x80\x02lo"[..]);
        assert_eq!(
            decode_server_frame(&mut buf),
            Ok(Some((TEXT, false, Bytes::from_static(b"Hel"))))
        );
        assert_eq!(
            decode_server_frame(&mut buf),
            Ok(Some((CONT, true, Bytes::from_static(b"lo"))))
        );
        // 256 bytes and 64 KiB binary headers.
        assert_eq!(&encode_frame(BINARY, &[0; 256])[..4], b"\x82\x7e\x01\x00");
        assert_eq!(
            &encode_frame(BINARY, &[0; 65536])[..10],
            b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"
        );
    }

    #[test]
    fn unfragmented_payload_is_zero_copy() {
        let f = frame(BINARY, true, &[5; 1000]);
        let mut buf = BytesMut::from(&f[..]);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let Ok(Some(Message::Binary(p))) = Decoder::new().decode(&mut buf, &BIG) else {
            panic!("expected binary");
        };
        assert!(range.contains(&(p.as_ptr() as usize)), "payload was copied");
        assert_eq!(&p[..], &[5; 1000]);
    }

    #[test]
    fn every_split_point_and_byte_at_a_time() {
        let (stream, expected) = multi_frame_stream();
        for cut in 0..=stream.len() {
            assert_eq!(decode_chunked(&stream, &[cut]), expected, "cut {cut}");
        }
        let every: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(decode_chunked(&stream, &every), expected);
    }

    #[test]
    fn incomplete_frame_is_left_untouched() {
        let f = frame(BINARY, true, &[9; 200]);
        let mut dec = Decoder::new();
        let mut buf = BytesMut::from(&f[..f.len() - 1]);
        assert_eq!(dec.decode(&mut buf, &BIG), Ok(None));
        assert_eq!(&buf[..], &f[..f.len() - 1]);
    }

    #[test]
    fn ping_between_three_text_fragments() {
        let mut s = frame(TEXT, false, b"one ");
        s.extend(frame(CONT, false, b"two "));
        s.extend(frame(PING, true, b"hi"));
        s.extend(frame(CONT, true, b"three"));
        let mut dec = Decoder::new();
        let mut buf = BytesMut::from(&s[..]);
        assert_eq!(
            dec.decode(&mut buf, &BIG),
            Ok(Some(Message::Ping(Bytes::from_static(b"hi"))))
        );
        assert!(!dec.is_idle());
        assert_eq!(
            dec.decode(&mut buf, &BIG),
            Ok(Some(Message::Text(Bytes::from_static(b"one two three"))))
        );
        assert!(dec.is_idle());
        assert_eq!(dec.buf.capacity(), 0, "reassembly buffer released");
        assert!(buf.is_empty());
    }

    #[test]
    fn utf8_code_point_split_across_fragments() {
        // U+1F600 = F0 9F 98 80, split 1/2/1 over three fragments.
        let mut s = frame(TEXT, false, b"a\xf0");
        s.extend(frame(CONT, false, b"\x9f\x98"));
        s.extend(frame(CONT, true, b"\x80b"));
        assert_eq!(
            decode_all(&s).unwrap(),
            vec![Message::Text(Bytes::from("a😀b"))]
        );
    }

    /// Decode `frames` one at a time; returns the error and how many frames were fed.
    fn fail_at(frames: &[Vec<u8>]) -> (ProtocolError, usize) {
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        for (i, f) in frames.iter().enumerate() {
            buf.extend_from_slice(f);
            loop {
                match dec.decode(&mut buf, &BIG) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => return (e, i + 1),
                }
            }
        }
        panic!("no error");
    }

    #[test]
    fn utf8_fails_fast() {
        let valid_tail = frame(CONT, true, b"ok");
        // Invalid byte in the first fragment: reported before any other frame arrives.
        let (e, at) = fail_at(&[frame(TEXT, false, b"ab\xffcd"), valid_tail.clone()]);
        assert_eq!((e.close_code(), at), (1007, 1));
        // A prefix that can never be valid (F4 90 > U+10FFFF) at the end of a fragment.
        let (e, at) = fail_at(&[frame(TEXT, false, b"ab\xf4\x90"), valid_tail.clone()]);
        assert_eq!((e.close_code(), at), (1007, 1));
        // Carried prefix completed by an invalid continuation byte in the next fragment.
        let (e, at) = fail_at(&[
            frame(TEXT, false, b"\xe2\x82"),
            frame(CONT, false, b"A"),
            valid_tail.clone(),
        ]);
        assert_eq!((e, at), (ProtocolError::InvalidUtf8, 2));
        // Invalid middle fragment (Autobahn 6.4.1 shape).
        let (e, at) = fail_at(&[
            frame(TEXT, false, "κόσμε".as_bytes()),
            frame(CONT, false, b"\xf4\x90\x80\x80"),
            valid_tail,
        ]);
        assert_eq!((e, at), (ProtocolError::InvalidUtf8, 2));
    }

    #[test]
    fn utf8_truncated_at_fin() {
        let e = err_of(&frame(TEXT, true, b"ab\xe2\x82"));
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::InvalidUtf8, 1007)
        );
        let mut s = frame(TEXT, false, b"ab");
        s.extend(frame(CONT, true, b"\xe2\x82"));
        assert_eq!(err_of(&s).close_code(), 1007);
        // Invalid in an unfragmented frame.
        assert_eq!(err_of(&frame(TEXT, true, b"\xc0\xaf")).close_code(), 1007);
        // Binary is not validated.
        assert!(decode_all(&frame(BINARY, true, b"\xff")).is_ok());
    }

    #[test]
    fn close_payload_errors() {
        let e = err_of(&frame(CLOSE, true, b"\x03\xe8\xff"));
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::InvalidCloseReason, 1007)
        );
        let e = err_of(&frame(CLOSE, true, b"\x03"));
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::InvalidClosePayload, 1002)
        );
    }

    #[test]
    fn header_errors() {
        use ProtocolError::*;
        let with_b0 = |b0: u8| {
            let mut f = frame(BINARY, true, b"x");
            f[0] = b0;
            f
        };
        let mut unmasked = frame(BINARY, true, b"x");
        unmasked[1] &= 0x7F;
        let mut bad_len64 = vec![0x82, 0xFF];
        bad_len64.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 1]);
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (unmasked, UnmaskedFrame),
            (with_b0(0x80 | 0x40 | 2), ReservedBits),
            (with_b0(0x80 | 0x20 | 2), ReservedBits),
            (with_b0(0x80 | 0x10 | 2), ReservedBits),
            (bad_len64, InvalidLength),
            (frame(PING, true, &[0; 126]), ControlFrameTooLong),
            (frame(CLOSE, true, &[0; 126]), ControlFrameTooLong),
            (frame(PING, false, b""), FragmentedControlFrame),
            (frame(PONG, false, b""), FragmentedControlFrame),
            (frame(CONT, true, b"x"), UnexpectedContinuation),
            (
                [frame(TEXT, false, b"a"), frame(TEXT, true, b"b")].concat(),
                ExpectedContinuation,
            ),
            (
                [frame(BINARY, false, b"a"), frame(BINARY, true, b"b")].concat(),
                ExpectedContinuation,
            ),
        ];
        for (bytes, want) in cases {
            let got = err_of(&bytes);
            assert_eq!(got, want);
            assert_eq!(got.close_code(), 1002, "{want:?}");
        }
        for op in (3..=7).chain(0xB..=0xF) {
            let e = err_of(&frame(OpCode::from(op), true, b""));
            assert_eq!((e.clone(), e.close_code()), (ReservedOpcode(op), 1002));
        }
    }

    #[test]
    fn errors_detected_from_header_alone() {
        // Only the first two bytes of a too-long ping: rejected without waiting for more.
        let mut dec = Decoder::new();
        let mut buf = BytesMut::from(&[0x89u8, 0xFE][..]);
        assert_eq!(
            dec.decode(&mut buf, &BIG),
            Err(ProtocolError::ControlFrameTooLong)
        );
    }

    #[test]
    fn frame_over_limit_rejected_before_allocation() {
        let limits = Limits {
            max_frame_size: 1000,
            max_message_size: 1 << 20,
        };
        // Header only, declaring a 1 GiB binary frame.
        let mut header = vec![0x82, 0xFF];
        header.extend_from_slice(&(1u64 << 30).to_be_bytes());
        header.extend_from_slice(&MASK);
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&header);
        let mut dec = Decoder::new();
        let e = dec.decode(&mut buf, &limits).unwrap_err();
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::FrameTooLarge, 1009)
        );
        assert_eq!(&buf[..], &header[..], "nothing consumed");
        assert!(buf.capacity() <= 64, "buffer grew to {}", buf.capacity());
        assert_eq!(dec.buf.capacity(), 0);
        // Exactly at the limit is fine.
        let ok = frame(BINARY, true, &[7; 1000]);
        let mut buf = BytesMut::from(&ok[..]);
        assert!(matches!(
            Decoder::new().decode(&mut buf, &limits),
            Ok(Some(Message::Binary(_)))
        ));
    }

    #[test]
    fn message_over_limit_across_fragments() {
        let limits = Limits {
            max_frame_size: 100,
            max_message_size: 250,
        };
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(TEXT, false, &[b'a'; 100]));
        buf.extend_from_slice(&frame(CONT, false, &[b'b'; 100]));
        assert_eq!(dec.decode(&mut buf, &limits), Ok(None));
        // Third fragment header alone pushes the total to 300 > 250.
        let third = frame(CONT, true, &[b'c'; 100]);
        buf.extend_from_slice(&third[..6]);
        let e = dec.decode(&mut buf, &limits).unwrap_err();
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::MessageTooLarge, 1009)
        );
        assert!(dec.buf.capacity() < 300);
        // An unfragmented frame over the message limit.
        let limits = Limits {
            max_frame_size: 1000,
            max_message_size: 10,
        };
        let mut buf = BytesMut::from(&frame(BINARY, true, &[0; 11])[..]);
        assert_eq!(
            Decoder::new().decode(&mut buf, &limits),
            Err(ProtocolError::MessageTooLarge)
        );
    }

    #[test]
    fn mask_matches_bytewise() {
        let mask = [1, 2, 3, 250];
        for len in 0..40 {
            let orig: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(31)).collect();
            let mut fast = orig.clone();
            apply_mask(&mut fast, mask);
            let slow: Vec<u8> = orig
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn server_frames_round_trip() {
        for len in [0, 125, 126, 65535, 65536] {
            let p: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = encode_frame(BINARY, &p);
            assert_eq!(f.len(), frame_header_len(len) + len);
            let mut buf = BytesMut::from(&f[..f.len() - 1]);
            assert_eq!(decode_server_frame(&mut buf), Ok(None));
            buf.extend_from_slice(&f[f.len() - 1..]);
            buf.extend_from_slice(b"next");
            assert_eq!(
                decode_server_frame(&mut buf),
                Ok(Some((BINARY, true, Bytes::from(p))))
            );
            assert_eq!(&buf[..], b"next");
        }
        // Client frames are masked, hence rejected by the server-frame parser.
        let mut buf = BytesMut::from(&frame(TEXT, true, b"x")[..]);
        assert_eq!(
            decode_server_frame(&mut buf),
            Err(ProtocolError::MaskedFrame)
        );
    }

    #[test]
    fn header_lengths() {
        for (len, want) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            assert_eq!(frame_header_len(len), want);
            let mut dst = BytesMut::new();
            write_frame_header(&mut dst, TEXT, len);
            assert_eq!(dst.len(), want);
            assert_eq!(dst[0], 0x81);
        }
    }

    #[test]
    fn close_encoding_truncates_on_char_boundary() {
        let f = encode_close(1001, &"é".repeat(100));
        let mut buf = BytesMut::from(&f[..]);
        let (op, fin, p) = decode_server_frame(&mut buf).unwrap().unwrap();
        assert_eq!((op, fin), (CLOSE, true));
        assert_eq!(&p[..2], &1001u16.to_be_bytes());
        assert_eq!(p.len() - 2, 122);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        let f = encode_close(1000, "bye");
        assert_eq!(&f[..], b"\x88\x05\x03\xe8bye");
    }

    #[test]
    fn error_reasons_fit_close_frame() {
        use ProtocolError::*;
        for e in [
            UnmaskedFrame,
            MaskedFrame,
            ReservedBits,
            ReservedOpcode(3),
            ControlFrameTooLong,
            FragmentedControlFrame,
            UnexpectedContinuation,
            ExpectedContinuation,
            InvalidLength,
            FrameTooLarge,
            MessageTooLarge,
            InvalidUtf8,
            InvalidClosePayload,
            InvalidCloseCode(1),
            InvalidCloseReason,
        ] {
            assert!(e.reason().len() <= MAX_CLOSE_REASON);
        }
    }

    /// One message as sent: (text?, payload, fragment cut points, mask, ping after first fragment?)
    fn sent_message() -> impl Strategy<Value = (bool, Vec<u8>, Vec<usize>, [u8; 4], bool)> {
        let payload = prop_oneof![
            any::<String>().prop_map(|s| (true, s.into_bytes())),
            proptest::collection::vec(any::<u8>(), 0..400).prop_map(|v| (false, v)),
        ];
        (
            payload,
            proptest::collection::vec(any::<usize>(), 0..4),
            any::<[u8; 4]>(),
            any::<bool>(),
        )
            .prop_map(|((text, p), cuts, mask, ping)| (text, p, cuts, mask, ping))
    }

    proptest! {
        #[test]
        fn random_round_trip(
            msgs in proptest::collection::vec(sent_message(), 0..8),
            chunks in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for (text, payload, cuts, mask, ping) in msgs {
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (payload.len() + 1)).collect();
                cuts.sort_unstable();
                let bounds: Vec<usize> = [0].into_iter().chain(cuts).chain([payload.len()]).collect();
                let n = bounds.len() - 1;
                for (i, w) in bounds.windows(2).enumerate() {
                    let op = match (i, text) {
                        (0, true) => TEXT,
                        (0, false) => BINARY,
                        _ => CONT,
                    };
                    encode_masked(op, i + 1 == n, &payload[w[0]..w[1]], mask, &mut stream);
                    if i == 0 && ping && n > 1 {
                        encode_masked(PING, true, &mask, mask, &mut stream);
                        expected.push(Message::Ping(Bytes::copy_from_slice(&mask)));
                    }
                }
                let payload = Bytes::from(payload);
                expected.push(if text { Message::Text(payload) } else { Message::Binary(payload) });
            }
            let mut chunks: Vec<usize> =
                chunks.iter().map(|c| c % (stream.len() + 1)).collect();
            chunks.sort_unstable();
            prop_assert_eq!(decode_chunked(&stream, &chunks), expected);
        }
    }
}
