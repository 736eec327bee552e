//! Sans-IO RESP2/RESP3 parser and command encoder for the Redis pub/sub links.
//!
//! # Role
//! Each shard owns one Redis connection. Its task appends the bytes it reads to a
//! [`BytesMut`] and calls [`Parser::parse`] (or the stateless [`parse`]) until it returns
//! `Ok(None)`; commands are written with [`encode_command`]. [`as_pubsub`] turns the frames
//! of a subscribed connection (RESP2 arrays or RESP3 `>` pushes) into [`PubSub`] events.
//! Nothing here touches a socket.
//!
//! # Invariants
//! - **Incomplete is not an error.** `Ok(None)` means "need more bytes"; the buffer is left
//!   untouched. `Ok(Some(frame))` means exactly that frame's bytes were split off the front.
//! - **Every [`ParseError`] is fatal.** The stream is out of sync: close the connection. The
//!   buffer is left untouched on error (nothing is consumed).
//! - **Never panics** on any input (all indexing is checked; lengths use checked arithmetic).
//! - **Limits before allocation.** A declared bulk or aggregate length is compared with
//!   [`Limits`] while its digits are being read (so `*1000000000` fails even before its
//!   CRLF arrives). The parser never reserves memory for a declared length: it first proves
//!   that the whole frame is present in the buffer (the *check* pass, which allocates only
//!   its nesting stack, bounded by [`Limits::max_depth`]), and only then builds the frame
//!   (the *build* pass), whose vectors are therefore bounded by the bytes actually received.
//!   Lines (simple strings, errors, numbers, …) are bounded by [`Limits::max_line_len`]:
//!   a longer line is an error, not unbounded buffering. Nesting is bounded by
//!   [`Limits::max_depth`]; both passes are iterative, so no recursion depends on input.
//! - **Zero copy.** The frame's bytes are split off with `BytesMut::split_to(..).freeze()`
//!   and every string in the frame is a [`Bytes::slice`] of that one allocation.
//! - **Linear work on trickling input.** The check pass never scans bulk payloads (it only
//!   compares lengths), so a large bulk string arriving in many reads costs O(header) per
//!   read. A [`Parser`] additionally remembers how far the check pass got inside a large
//!   aggregate (and inside a long line), so a big array arriving in many reads is scanned
//!   once, not once per read. The free function [`parse`] is a stateless convenience that
//!   rescans the pending frame from its start on every call.
//!
//! # Strictness (what is accepted)
//! - Lengths: ASCII digits only (at most 20, leading zeros tolerated), no sign; the only
//!   negative length is exactly `-1`, and only for `$` and `*` (RESP2 nulls). RESP3
//!   streamed strings/aggregates (`$?`, `*?`, `;`, `.`) are not supported (Redis does not
//!   send them) and are errors.
//! - Lines must end in CRLF and contain neither CR nor LF. Bulk payloads (`$`, `!`, `=`) are
//!   binary-safe and must be followed by CRLF.
//! - `:` is an `i64` with an optional sign; `,` is anything Rust's `f64` parser accepts
//!   (including `inf`, `-inf`, `nan`), kept as raw text; `(` is an optional sign followed by
//!   at least one digit; `#` is `t` or `f`; `_` has an empty body; `=` has at least 4 bytes
//!   and a `:` at index 3 (any 3-byte format, kept in the payload).
//! - Attributes (`|`): a top-level attribute is returned as its own
//!   [`Frame::Attribute`] (the frame it describes is the next one returned). An attribute
//!   *inside* an aggregate does not count as one of the aggregate's elements (RESP3 spec);
//!   it is validated (limits, depth) and then dropped, because [`Frame`] has no place for it.
//! - Map and attribute lengths count pairs; [`Limits::max_array_len`] bounds that count.
//!
//! # Parser state
//! A [`Parser`] keeps state only between calls that returned `Ok(None)`; between such calls
//! the caller may only *append* to the buffer. If the front of the buffer is consumed or
//! replaced, call [`Parser::reset`] (a buffer shorter than the recorded progress is detected
//! and resets the parser; other misuse yields wrong results or errors, never a panic).

use bytes::{BufMut, Bytes, BytesMut};

/// Size limits, checked before any allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted bulk string / blob error / verbatim string payload, in bytes
    /// (Redis' own `proto-max-bulk-len` default is 512 MiB; ours defaults to 64 MiB).
    pub max_bulk_len: usize,
    /// Largest accepted element count of an array, push or set, and pair count of a map or
    /// attribute (default 1 Mi).
    pub max_array_len: usize,
    /// Deepest accepted nesting of aggregates; `0` allows no aggregate at all (default 8).
    pub max_depth: usize,
    /// Longest accepted line body (simple string, error, integer, double, big number,
    /// boolean, null), excluding CRLF (default 64 KiB).
    pub max_line_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_len: 64 << 20,
            max_array_len: 1 << 20,
            max_depth: 8,
            max_line_len: 64 << 10,
        }
    }
}

/// One RESP2 or RESP3 value.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `+OK`
    Simple(Bytes),
    /// `-ERR ...`
    Error(Bytes),
    /// `:1`
    Integer(i64),
    /// `$3\r\nfoo` (zero-copy slice of the read buffer).
    Bulk(Bytes),
    /// `$-1`, `*-1` and RESP3 `_`.
    Null,
    /// `*N`
    Array(Vec<Frame>),
    /// `>N` (pub/sub messages under RESP3).
    Push(Vec<Frame>),
    /// `%N` (pairs in wire order).
    Map(Vec<(Frame, Frame)>),
    /// `~N` (members in wire order).
    Set(Vec<Frame>),
    /// `,1.5` (raw text, validated as an `f64`).
    Double(Bytes),
    /// `#t` / `#f`
    Boolean(bool),
    /// `(123...` (raw text: optional sign and digits).
    BigNumber(Bytes),
    /// `=N\r\ntxt:....` (whole payload including the `txt:` prefix).
    VerbatimString(Bytes),
    /// `!N`
    BlobError(Bytes),
    /// `|N` at top level: describes the next frame; the caller may skip it.
    Attribute(Vec<(Frame, Frame)>),
}

/// Why a byte stream is not valid RESP. Every variant is fatal for the connection: the
/// stream is out of sync and cannot be resumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The first byte of an element is not a known RESP2/RESP3 type byte (including the
    /// unsupported streamed-string chunk `;` and end marker `.`).
    #[error("invalid RESP type byte 0x{0:02x}")]
    InvalidTypeByte(u8),
    /// A length field is empty, has a non-digit, a sign (other than `-1` for a `$`/`*`
    /// null), more than 20 digits, overflows `usize`, or is not followed by CRLF.
    #[error("invalid RESP length field")]
    InvalidLength,
    /// A `$`, `!` or `=` length exceeds [`Limits::max_bulk_len`].
    #[error("bulk length exceeds the limit of {max} bytes")]
    BulkTooLarge {
        /// The limit in force.
        max: usize,
    },
    /// An array, push, set, map or attribute length exceeds [`Limits::max_array_len`].
    #[error("aggregate length exceeds the limit of {max}")]
    AggregateTooLarge {
        /// The limit in force.
        max: usize,
    },
    /// Aggregates are nested deeper than [`Limits::max_depth`].
    #[error("aggregates nested deeper than {max}")]
    TooDeep {
        /// The limit in force.
        max: usize,
    },
    /// A line body is longer than [`Limits::max_line_len`] (reported as soon as that many
    /// bytes arrived without a line end).
    #[error("line longer than {max} bytes")]
    LineTooLong {
        /// The limit in force.
        max: usize,
    },
    /// A line contains a bare LF, or a CR not followed by LF.
    #[error("malformed line terminator")]
    BadLineTerminator,
    /// A bulk payload (`$`, `!`, `=`) is not followed by CRLF.
    #[error("bulk payload not followed by CRLF")]
    MissingBulkCrlf,
    /// A `:` body is not an optionally signed `i64`.
    #[error("invalid integer")]
    InvalidInteger,
    /// A `,` body is not a valid double.
    #[error("invalid double")]
    InvalidDouble,
    /// A `#` body is not `t` or `f`.
    #[error("invalid boolean")]
    InvalidBoolean,
    /// A `(` body is not an optionally signed run of digits.
    #[error("invalid big number")]
    InvalidBigNumber,
    /// A `_` null has a non-empty body.
    #[error("invalid null")]
    InvalidNull,
    /// A `=` payload is shorter than 4 bytes or lacks the `:` after its 3-byte format.
    #[error("invalid verbatim string")]
    InvalidVerbatim,
    /// A RESP3 streamed string or aggregate (`?` length); Redis never sends these.
    #[error("RESP3 streamed types are not supported")]
    StreamingUnsupported,
    /// The build pass disagreed with the check pass. Never expected: it would be a bug in
    /// this module (or a [`Parser`] used with a buffer whose front changed between calls).
    #[error("internal RESP parser inconsistency")]
    Internal,
}

/// Pub/sub view of a frame (RESP2 array or RESP3 push).
#[derive(Debug, Clone, PartialEq)]
pub enum PubSub {
    /// `["message", channel, payload]`
    Message {
        /// Channel the message was published to.
        channel: Bytes,
        /// Message body.
        payload: Bytes,
    },
    /// `["pmessage", pattern, channel, payload]`
    PMessage {
        /// Pattern that matched.
        pattern: Bytes,
        /// Channel the message was published to.
        channel: Bytes,
        /// Message body.
        payload: Bytes,
    },
    /// `["subscribe", channel, count]`
    Subscribed {
        /// Channel now subscribed.
        channel: Bytes,
        /// Number of channels this connection is subscribed to.
        count: i64,
    },
    /// `["unsubscribe", channel, count]`; a null channel (unsubscribe with no subscription)
    /// is reported as an empty channel.
    Unsubscribed {
        /// Channel no longer subscribed (may be empty).
        channel: Bytes,
        /// Number of channels this connection is still subscribed to.
        count: i64,
    },
    /// `["pong", payload]`, the reply to `PING` in subscribed mode.
    Pong(Bytes),
}

/// Pub/sub view of `frame`: `None` if it is not one of the shapes of [`PubSub`] (kind
/// compared case-insensitively; channel/payload may be bulk or simple strings).
#[must_use]
pub fn as_pubsub(frame: &Frame) -> Option<PubSub> {
    let items = match frame {
        Frame::Array(items) | Frame::Push(items) => items.as_slice(),
        _ => return None,
    };
    let (kind, rest) = items.split_first()?;
    let kind = string_of(kind)?;
    let is = |name: &[u8]| kind.eq_ignore_ascii_case(name);
    match rest {
        [channel, payload] if is(b"message") => Some(PubSub::Message {
            channel: string_of(channel)?,
            payload: string_of(payload)?,
        }),
        [pattern, channel, payload] if is(b"pmessage") => Some(PubSub::PMessage {
            pattern: string_of(pattern)?,
            channel: string_of(channel)?,
            payload: string_of(payload)?,
        }),
        [channel, Frame::Integer(count)] if is(b"subscribe") => Some(PubSub::Subscribed {
            channel: string_of(channel)?,
            count: *count,
        }),
        [channel, Frame::Integer(count)] if is(b"unsubscribe") => {
            let channel = match channel {
                Frame::Null => Bytes::new(),
                other => string_of(other)?,
            };
            Some(PubSub::Unsubscribed {
                channel,
                count: *count,
            })
        }
        [payload] if is(b"pong") => Some(PubSub::Pong(string_of(payload)?)),
        _ => None,
    }
}

fn string_of(frame: &Frame) -> Option<Bytes> {
    match frame {
        Frame::Bulk(b) | Frame::Simple(b) => Some(b.clone()),
        _ => None,
    }
}

/// Encode a command as a RESP array of bulk strings, appending to `dst` (one reservation).
pub fn encode_command(dst: &mut BytesMut, args: &[&[u8]]) {
    let mut need = 3 + decimal_len(args.len());
    for arg in args {
        need += 5 + decimal_len(arg.len()) + arg.len();
    }
    dst.reserve(need);
    dst.put_u8(b'*');
    put_decimal(dst, args.len());
    dst.put_slice(b"\r\n");
    for arg in args {
        dst.put_u8(b'$');
        put_decimal(dst, arg.len());
        dst.put_slice(b"\r\n");
        dst.put_slice(arg);
        dst.put_slice(b"\r\n");
    }
}

/// Encode any frame, appending to `dst` (for tests and fake servers). [`Frame::Null`] is
/// written as the RESP2 null bulk `$-1`. Line-typed payloads (`Simple`, `Error`, `Double`,
/// `BigNumber`) must not contain CR or LF, or the output will not parse.
pub fn encode_frame(dst: &mut BytesMut, frame: &Frame) {
    encode_frame_inner(dst, frame, false);
}

/// Like [`encode_frame`], but [`Frame::Null`] is written as the RESP3 null `_`.
pub fn encode_frame_resp3(dst: &mut BytesMut, frame: &Frame) {
    encode_frame_inner(dst, frame, true);
}

fn encode_frame_inner(dst: &mut BytesMut, frame: &Frame, resp3_null: bool) {
    fn line(dst: &mut BytesMut, ty: u8, body: &[u8]) {
        dst.put_u8(ty);
        dst.put_slice(body);
        dst.put_slice(b"\r\n");
    }
    fn blob(dst: &mut BytesMut, ty: u8, body: &[u8]) {
        dst.put_u8(ty);
        put_decimal(dst, body.len());
        dst.put_slice(b"\r\n");
        dst.put_slice(body);
        dst.put_slice(b"\r\n");
    }
    fn header(dst: &mut BytesMut, ty: u8, n: usize) {
        dst.put_u8(ty);
        put_decimal(dst, n);
        dst.put_slice(b"\r\n");
    }
    match frame {
        Frame::Simple(b) => line(dst, b'+', b),
        Frame::Error(b) => line(dst, b'-', b),
        Frame::Integer(i) => {
            dst.put_u8(b':');
            if *i < 0 {
                dst.put_u8(b'-');
            }
            put_decimal_u64(dst, i.unsigned_abs());
            dst.put_slice(b"\r\n");
        }
        Frame::Bulk(b) => blob(dst, b'$', b),
        Frame::Null if resp3_null => dst.put_slice(b"_\r\n"),
        Frame::Null => dst.put_slice(b"$-1\r\n"),
        Frame::Array(items) | Frame::Push(items) | Frame::Set(items) => {
            let ty = match frame {
                Frame::Array(_) => b'*',
                Frame::Push(_) => b'>',
                _ => b'~',
            };
            header(dst, ty, items.len());
            for item in items {
                encode_frame_inner(dst, item, resp3_null);
            }
        }
        Frame::Map(pairs) | Frame::Attribute(pairs) => {
            let ty = if matches!(frame, Frame::Map(_)) {
                b'%'
            } else {
                b'|'
            };
            header(dst, ty, pairs.len());
            for (k, v) in pairs {
                encode_frame_inner(dst, k, resp3_null);
                encode_frame_inner(dst, v, resp3_null);
            }
        }
        Frame::Double(b) => line(dst, b',', b),
        Frame::Boolean(v) => line(dst, b'#', if *v { b"t" } else { b"f" }),
        Frame::BigNumber(b) => line(dst, b'(', b),
        Frame::VerbatimString(b) => blob(dst, b'=', b),
        Frame::BlobError(b) => blob(dst, b'!', b),
    }
}

fn decimal_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

fn put_decimal(dst: &mut BytesMut, n: usize) {
    put_decimal_u64(dst, n as u64);
}

fn put_decimal_u64(dst: &mut BytesMut, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    dst.put_slice(&tmp[i..]);
}

/// Parse one complete frame from the front of `buf` (stateless: see [`Parser`] for input
/// that trickles in). `Ok(None)`: incomplete, `buf` untouched. `Ok(Some(frame))`: the
/// frame's bytes were split off `buf`; its strings are zero-copy slices of that split.
///
/// # Errors
/// Any [`ParseError`]: the stream is invalid or exceeds `limits`; `buf` is left untouched
/// and the connection must be closed.
pub fn parse(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, ParseError> {
    Parser::new().parse(buf, limits)
}

/// Incremental parser: remembers, between calls that returned `Ok(None)`, how much of the
/// pending frame the check pass has already validated, so that each byte of a large
/// aggregate is scanned once however many reads it arrives in. Costs nothing until a frame
/// is split across reads (the nesting stack, bounded by [`Limits::max_depth`], is the only
/// allocation). See the module docs for the buffer contract.
#[derive(Debug, Default)]
pub struct Parser {
    /// Offset (from the front of the buffer) of the first element not yet validated.
    scanned: usize,
    /// Aggregates open at `scanned`, innermost last.
    open: Vec<Open>,
    /// Body bytes of the line element at `scanned` already known to contain no CR/LF.
    line_progress: usize,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    /// Elements still expected (each attribute pair counts as two).
    remaining: usize,
    /// Whether this aggregate is an attribute (then it is not an element of its parent).
    attr: bool,
}

impl Parser {
    /// A parser with no pending frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget any progress on a pending frame (needed only if the caller consumed or
    /// replaced the front of the buffer after an `Ok(None)`).
    pub fn reset(&mut self) {
        self.scanned = 0;
        self.open.clear();
        self.line_progress = 0;
    }

    /// Parse one complete frame from the front of `buf`; same contract as [`parse`].
    ///
    /// # Errors
    /// As [`parse`]; the parser is reset (but the connection must be closed anyway).
    pub fn parse(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Frame>, ParseError> {
        match self.check(buf, limits) {
            Ok(None) => Ok(None),
            Ok(Some(len)) => {
                self.reset();
                let bytes = buf.split_to(len).freeze();
                build(&bytes, limits).map(Some)
            }
            Err(e) => {
                self.reset();
                Err(e)
            }
        }
    }

    /// The check pass: validate elements from `self.scanned` on; return the total length
    /// of the first frame once it is complete.
    fn check(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<usize>, ParseError> {
        if self.scanned > buf.len() {
            self.reset();
        }
        let mut pos = self.scanned;
        loop {
            let (elem, next) = match read_element(buf, pos, limits, &mut self.line_progress)? {
                Step::Incomplete => {
                    self.scanned = pos;
                    return Ok(None);
                }
                Step::Done(elem, next) => (elem, next),
            };
            pos = next;
            // `Some(is_attribute)` once an element (scalar or whole aggregate) is complete.
            let mut completed = match elem {
                Elem::Open(agg, count) => {
                    if self.open.len() >= limits.max_depth {
                        return Err(ParseError::TooDeep {
                            max: limits.max_depth,
                        });
                    }
                    let attr = agg == Agg::Attribute;
                    if count == 0 {
                        Some(attr)
                    } else {
                        self.open.push(Open {
                            remaining: count,
                            attr,
                        });
                        None
                    }
                }
                _ => Some(false),
            };
            while let Some(is_attr) = completed.take() {
                let Some(top) = self.open.last_mut() else {
                    return Ok(Some(pos));
                };
                // A nested attribute is not one of its parent's elements.
                if !is_attr {
                    top.remaining = top.remaining.saturating_sub(1);
                    if top.remaining == 0 {
                        completed = self.open.pop().map(|done| done.attr);
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agg {
    Array,
    Push,
    Set,
    Map,
    Attribute,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Simple,
    Error,
    Double,
    BigNumber,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlobKind {
    Bulk,
    Error,
    Verbatim,
}

/// One element header (or whole scalar), with byte ranges instead of slices so that the
/// check pass (over `&[u8]`) and the build pass (over `Bytes`) share the same reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    Line(LineKind, usize, usize),
    Blob(BlobKind, usize, usize),
    Integer(i64),
    Boolean(bool),
    Null,
    /// Aggregate header with its element count (maps and attributes: twice the pairs).
    Open(Agg, usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Incomplete,
    /// The element and the offset just past it (for aggregates: past the header).
    Done(Elem, usize),
}

/// Maximum digits of a length field (`u64::MAX` has 20).
const MAX_LEN_DIGITS: usize = 20;

/// Read the element starting at `pos`. Never scans bulk payloads; for lines, resumes the
/// CR/LF scan at `*line_progress` and leaves it at 0 once the element is complete.
fn read_element(
    buf: &[u8],
    pos: usize,
    limits: &Limits,
    line_progress: &mut usize,
) -> Result<Step, ParseError> {
    let Some(&ty) = buf.get(pos) else {
        return Ok(Step::Incomplete);
    };
    let body = pos + 1;
    match ty {
        b'+' | b'-' | b':' | b',' | b'(' | b'#' | b'_' => {
            let Some((end, next)) = scan_line(buf, body, limits.max_line_len, line_progress)?
            else {
                return Ok(Step::Incomplete);
            };
            let content = buf.get(body..end).ok_or(ParseError::Internal)?;
            let elem = match ty {
                b'+' => Elem::Line(LineKind::Simple, body, end),
                b'-' => Elem::Line(LineKind::Error, body, end),
                b':' => Elem::Integer(parse_i64(content).ok_or(ParseError::InvalidInteger)?),
                b',' => {
                    if !is_double(content) {
                        return Err(ParseError::InvalidDouble);
                    }
                    Elem::Line(LineKind::Double, body, end)
                }
                b'(' => {
                    if !is_big_number(content) {
                        return Err(ParseError::InvalidBigNumber);
                    }
                    Elem::Line(LineKind::BigNumber, body, end)
                }
                b'#' => match content {
                    b"t" => Elem::Boolean(true),
                    b"f" => Elem::Boolean(false),
                    _ => return Err(ParseError::InvalidBoolean),
                },
                _ => {
                    if !content.is_empty() {
                        return Err(ParseError::InvalidNull);
                    }
                    Elem::Null
                }
            };
            Ok(Step::Done(elem, next))
        }
        b'$' | b'!' | b'=' => {
            let too_large = ParseError::BulkTooLarge {
                max: limits.max_bulk_len,
            };
            let Some((len, start)) =
                read_len(buf, body, ty == b'$', limits.max_bulk_len, too_large)?
            else {
                return Ok(Step::Incomplete);
            };
            let Some(len) = len else {
                return Ok(Step::Done(Elem::Null, start));
            };
            let end = start.checked_add(len).ok_or(ParseError::BulkTooLarge {
                max: limits.max_bulk_len,
            })?;
            let next = end.checked_add(2).ok_or(ParseError::BulkTooLarge {
                max: limits.max_bulk_len,
            })?;
            match buf.get(end..next) {
                Some(b"\r\n") => {}
                Some(_) => return Err(ParseError::MissingBulkCrlf),
                None => {
                    // Fail early if the byte after the payload is already known to be wrong.
                    return match buf.get(end) {
                        Some(&b) if b != b'\r' => Err(ParseError::MissingBulkCrlf),
                        _ => Ok(Step::Incomplete),
                    };
                }
            }
            let kind = match ty {
                b'$' => BlobKind::Bulk,
                b'!' => BlobKind::Error,
                _ => {
                    if len < 4 || buf.get(start + 3) != Some(&b':') {
                        return Err(ParseError::InvalidVerbatim);
                    }
                    BlobKind::Verbatim
                }
            };
            Ok(Step::Done(Elem::Blob(kind, start, end), next))
        }
        b'*' | b'>' | b'~' | b'%' | b'|' => {
            let too_large = ParseError::AggregateTooLarge {
                max: limits.max_array_len,
            };
            let Some((len, next)) =
                read_len(buf, body, ty == b'*', limits.max_array_len, too_large)?
            else {
                return Ok(Step::Incomplete);
            };
            let Some(len) = len else {
                return Ok(Step::Done(Elem::Null, next));
            };
            let (agg, count) = match ty {
                b'*' => (Agg::Array, Some(len)),
                b'>' => (Agg::Push, Some(len)),
                b'~' => (Agg::Set, Some(len)),
                b'%' => (Agg::Map, len.checked_mul(2)),
                _ => (Agg::Attribute, len.checked_mul(2)),
            };
            let count = count.ok_or(ParseError::AggregateTooLarge {
                max: limits.max_array_len,
            })?;
            Ok(Step::Done(Elem::Open(agg, count), next))
        }
        other => Err(ParseError::InvalidTypeByte(other)),
    }
}

/// Read a length field at `i` up to and including its CRLF. `Ok(None)`: incomplete.
/// `Ok(Some((None, next)))`: `-1` (only if `allow_null`). Rejects a value above `max` as
/// soon as its digits exceed it.
#[allow(clippy::type_complexity)]
fn read_len(
    buf: &[u8],
    mut i: usize,
    allow_null: bool,
    max: usize,
    too_large: ParseError,
) -> Result<Option<(Option<usize>, usize)>, ParseError> {
    match buf.get(i) {
        None => return Ok(None),
        Some(b'-') => {
            if !allow_null {
                return Err(ParseError::InvalidLength);
            }
            for (k, &want) in b"1\r\n".iter().enumerate() {
                match buf.get(i + 1 + k) {
                    None => return Ok(None),
                    Some(&got) if got == want => {}
                    Some(_) => return Err(ParseError::InvalidLength),
                }
            }
            return Ok(Some((None, i + 4)));
        }
        Some(b'?') => return Err(ParseError::StreamingUnsupported),
        Some(_) => {}
    }
    let mut value: usize = 0;
    let mut digits = 0usize;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        match b {
            b'0'..=b'9' => {
                digits += 1;
                if digits > MAX_LEN_DIGITS {
                    return Err(ParseError::InvalidLength);
                }
                value = value
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(usize::from(b - b'0')))
                    .ok_or(ParseError::InvalidLength)?;
                if value > max {
                    return Err(too_large);
                }
                i += 1;
            }
            b'\r' if digits > 0 => {
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((Some(value), i + 2))),
                    Some(_) => Err(ParseError::InvalidLength),
                };
            }
            _ => return Err(ParseError::InvalidLength),
        }
    }
}

/// Find the CRLF ending the line whose body starts at `start`. Returns the body end and
/// the offset past the CRLF; `Ok(None)` when incomplete (recording in `*progress` how many
/// body bytes are already known to be clean). The body may hold at most `max` bytes.
fn scan_line(
    buf: &[u8],
    start: usize,
    max: usize,
    progress: &mut usize,
) -> Result<Option<(usize, usize)>, ParseError> {
    // The terminating CR must sit at an index <= start + max.
    let limit = start.saturating_add(max).saturating_add(1);
    let window_end = buf.len().min(limit);
    let from = start.saturating_add(*progress);
    if let Some(window) = buf.get(from..window_end) {
        if let Some(off) = window.iter().position(|&b| b == b'\r' || b == b'\n') {
            let j = from + off;
            if window[off] == b'\n' {
                return Err(ParseError::BadLineTerminator);
            }
            return match buf.get(j + 1) {
                None => {
                    *progress = j - start;
                    Ok(None)
                }
                Some(b'\n') => {
                    *progress = 0;
                    Ok(Some((j, j + 2)))
                }
                Some(_) => Err(ParseError::BadLineTerminator),
            };
        }
    }
    if window_end >= limit {
        return Err(ParseError::LineTooLong { max });
    }
    *progress = window_end.saturating_sub(start);
    Ok(None)
}

fn parse_i64(s: &[u8]) -> Option<i64> {
    std::str::from_utf8(s).ok()?.parse::<i64>().ok()
}

fn is_double(s: &[u8]) -> bool {
    std::str::from_utf8(s).is_ok_and(|t| t.parse::<f64>().is_ok())
}

fn is_big_number(s: &[u8]) -> bool {
    let digits = match s.first() {
        Some(b'-') | Some(b'+') => &s[1..],
        _ => s,
    };
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

/// The build pass, over the bytes of one frame that the check pass proved complete.
fn build(bytes: &Bytes, limits: &Limits) -> Result<Frame, ParseError> {
    struct Partial {
        agg: Agg,
        remaining: usize,
        items: Vec<Frame>,
    }
    let buf: &[u8] = bytes;
    let slice = |start: usize, end: usize| -> Result<Bytes, ParseError> {
        if start <= end && end <= bytes.len() {
            Ok(bytes.slice(start..end))
        } else {
            Err(ParseError::Internal)
        }
    };
    let mut stack: Vec<Partial> = Vec::new();
    let mut pos = 0;
    let mut progress = 0;
    loop {
        let (elem, next) = match read_element(buf, pos, limits, &mut progress)? {
            Step::Incomplete => return Err(ParseError::Internal),
            Step::Done(elem, next) => (elem, next),
        };
        pos = next;
        let mut done = match elem {
            Elem::Line(kind, s, e) => {
                let b = slice(s, e)?;
                Some(match kind {
                    LineKind::Simple => Frame::Simple(b),
                    LineKind::Error => Frame::Error(b),
                    LineKind::Double => Frame::Double(b),
                    LineKind::BigNumber => Frame::BigNumber(b),
                })
            }
            Elem::Blob(kind, s, e) => {
                let b = slice(s, e)?;
                Some(match kind {
                    BlobKind::Bulk => Frame::Bulk(b),
                    BlobKind::Error => Frame::BlobError(b),
                    BlobKind::Verbatim => Frame::VerbatimString(b),
                })
            }
            Elem::Integer(i) => Some(Frame::Integer(i)),
            Elem::Boolean(v) => Some(Frame::Boolean(v)),
            Elem::Null => Some(Frame::Null),
            Elem::Open(agg, count) => {
                if stack.len() >= limits.max_depth {
                    return Err(ParseError::TooDeep {
                        max: limits.max_depth,
                    });
                }
                if count == 0 {
                    Some(finish(agg, Vec::new()))
                } else {
                    // Every element takes at least 3 bytes of the (complete) frame, so
                    // this capacity is bounded by bytes actually received.
                    let cap = count.min(buf.len().saturating_sub(pos) / 3);
                    stack.push(Partial {
                        agg,
                        remaining: count,
                        items: Vec::with_capacity(cap),
                    });
                    None
                }
            }
        };
        while let Some(frame) = done.take() {
            let Some(top) = stack.last_mut() else {
                return if pos == buf.len() {
                    Ok(frame)
                } else {
                    Err(ParseError::Internal)
                };
            };
            if matches!(frame, Frame::Attribute(_)) {
                // Nested attribute: not an element of its parent, dropped.
                continue;
            }
            top.items.push(frame);
            top.remaining = top.remaining.saturating_sub(1);
            if top.remaining == 0 {
                done = stack.pop().map(|p| finish(p.agg, p.items));
            }
        }
    }
}

fn finish(agg: Agg, items: Vec<Frame>) -> Frame {
    fn pairs(items: Vec<Frame>) -> Vec<(Frame, Frame)> {
        let mut out = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        out
    }
    match agg {
        Agg::Array => Frame::Array(items),
        Agg::Push => Frame::Push(items),
        Agg::Set => Frame::Set(items),
        Agg::Map => Frame::Map(pairs(items)),
        Agg::Attribute => Frame::Attribute(pairs(items)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use redis_protocol::resp2::decode::decode_bytes_mut as rp2_decode;
    use redis_protocol::resp2::types::BytesFrame as Rp2;
    use redis_protocol::resp3::decode::complete::decode_bytes_mut as rp3_decode;
    use redis_protocol::resp3::types::{BytesFrame as Rp3, Resp3Frame, VerbatimStringFormat};
    use std::collections::{BTreeMap, HashMap};

    // ---------------------------------------------------------------- helpers

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    fn bulk(s: &[u8]) -> Frame {
        Frame::Bulk(b(s))
    }

    fn lim() -> Limits {
        Limits::default()
    }

    /// Parse `input` as exactly one frame (every strict prefix must be incomplete, with the
    /// buffer untouched), with both the stateless function and a fresh `Parser`.
    fn one(input: &[u8]) -> Frame {
        for k in 0..input.len() {
            let mut buf = BytesMut::from(&input[..k]);
            assert_eq!(parse(&mut buf, &lim()), Ok(None), "prefix {k} of {input:?}");
            assert_eq!(&buf[..], &input[..k]);
        }
        let mut buf = BytesMut::from(input);
        let frame = parse(&mut buf, &lim()).unwrap().expect("complete frame");
        assert!(buf.is_empty(), "left over: {buf:?}");
        let mut buf = BytesMut::from(input);
        let again = Parser::new().parse(&mut buf, &lim()).unwrap();
        assert_eq!(again.as_ref(), Some(&frame));
        frame
    }

    fn err_with(input: &[u8], limits: &Limits) -> ParseError {
        let mut buf = BytesMut::from(input);
        let e = parse(&mut buf, limits).expect_err("must be an error");
        assert_eq!(&buf[..], input, "buffer untouched on error");
        e
    }

    fn err(input: &[u8]) -> ParseError {
        err_with(input, &lim())
    }

    fn is_incomplete(input: &[u8]) -> bool {
        let mut buf = BytesMut::from(input);
        let r = parse(&mut buf, &lim());
        r == Ok(None) && &buf[..] == input
    }

    /// Feed `chunks` one after the other, parsing all complete frames after each; returns
    /// the frames and the number of bytes left over, or the first error.
    fn feed(
        chunks: &[&[u8]],
        stateful: bool,
        limits: &Limits,
    ) -> Result<(Vec<Frame>, usize), ParseError> {
        let mut parser = Parser::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                let before = buf.clone();
                let r = if stateful {
                    parser.parse(&mut buf, limits)
                } else {
                    parse(&mut buf, limits)
                };
                match r {
                    Ok(Some(f)) => {
                        assert!(buf.len() < before.len(), "a frame consumes bytes");
                        out.push(f);
                    }
                    Ok(None) => {
                        assert_eq!(buf, before, "incomplete leaves the buffer untouched");
                        break;
                    }
                    Err(e) => {
                        assert_eq!(buf, before, "an error leaves the buffer untouched");
                        return Err(e);
                    }
                }
            }
        }
        Ok((out, buf.len()))
    }

    fn split_at_points<'a>(data: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
        points.sort_unstable();
        points.dedup();
        let mut out = Vec::new();
        let mut prev = 0;
        for p in points {
            out.push(&data[prev..p]);
            prev = p;
        }
        out.push(&data[prev..]);
        out
    }

    fn random_chunks<'a>(data: &'a [u8], rng: &mut StdRng, max_chunk: usize) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = rng.random_range(1..=max_chunk).min(data.len() - at);
            out.push(&data[at..at + n]);
            at += n;
        }
        out
    }

    // ------------------------------------------- redis-protocol conversion (oracle)

    fn canon_f64(x: f64) -> Bytes {
        Bytes::from(format!("{x:?}"))
    }

    fn norm_pairs(pairs: Vec<(Frame, Frame)>) -> Vec<(Frame, Frame)> {
        let mut pairs: Vec<(Frame, Frame)> =
            pairs.into_iter().map(|(k, v)| (norm(k), norm(v))).collect();
        pairs.sort_by_cached_key(|p| format!("{p:?}"));
        pairs
    }

    /// Canonical form for comparing with redis-protocol: doubles re-printed from their
    /// `f64` value (redis-protocol keeps only the value), maps/sets/attributes sorted
    /// (redis-protocol stores them in hash maps/sets).
    fn norm(frame: Frame) -> Frame {
        match frame {
            Frame::Double(t) => {
                let x: f64 = std::str::from_utf8(&t).unwrap().parse().unwrap();
                Frame::Double(canon_f64(x))
            }
            Frame::Array(v) => Frame::Array(v.into_iter().map(norm).collect()),
            Frame::Push(v) => Frame::Push(v.into_iter().map(norm).collect()),
            Frame::Set(v) => {
                let mut v: Vec<Frame> = v.into_iter().map(norm).collect();
                v.sort_by_cached_key(|f| format!("{f:?}"));
                Frame::Set(v)
            }
            Frame::Map(p) => Frame::Map(norm_pairs(p)),
            Frame::Attribute(p) => Frame::Attribute(norm_pairs(p)),
            other => other,
        }
    }

    fn from_rp2(frame: Rp2) -> Frame {
        match frame {
            Rp2::SimpleString(s) => Frame::Simple(s),
            Rp2::Error(s) => Frame::Error(b(s.as_bytes())),
            Rp2::Integer(i) => Frame::Integer(i),
            Rp2::BulkString(s) => Frame::Bulk(s),
            Rp2::Array(v) => Frame::Array(v.into_iter().map(from_rp2).collect()),
            Rp2::Null => Frame::Null,
        }
    }

    fn rp3_pairs(map: HashMap<Rp3, Rp3>) -> Vec<(Frame, Frame)> {
        map.into_iter()
            .map(|(k, v)| (from_rp3(k), from_rp3(v)))
            .collect()
    }

    /// redis-protocol frame → ours. Attributes attached to nested frames are dropped, as
    /// our parser drops nested attributes.
    fn from_rp3(frame: Rp3) -> Frame {
        match frame {
            Rp3::BlobString { data, .. } => Frame::Bulk(data),
            Rp3::BlobError { data, .. } => Frame::BlobError(data),
            Rp3::SimpleString { data, .. } => Frame::Simple(data),
            Rp3::SimpleError { data, .. } => Frame::Error(b(data.as_bytes())),
            Rp3::Boolean { data, .. } => Frame::Boolean(data),
            Rp3::Null => Frame::Null,
            Rp3::Number { data, .. } => Frame::Integer(data),
            Rp3::Double { data, .. } => Frame::Double(canon_f64(data)),
            Rp3::BigNumber { data, .. } => Frame::BigNumber(data),
            Rp3::VerbatimString { data, format, .. } => {
                let mut v = match format {
                    VerbatimStringFormat::Text => b"txt:".to_vec(),
                    VerbatimStringFormat::Markdown => b"mkd:".to_vec(),
                };
                v.extend_from_slice(&data);
                Frame::VerbatimString(v.into())
            }
            Rp3::Array { data, .. } => Frame::Array(data.into_iter().map(from_rp3).collect()),
            Rp3::Push { data, .. } => Frame::Push(data.into_iter().map(from_rp3).collect()),
            Rp3::Set { data, .. } => Frame::Set(data.into_iter().map(from_rp3).collect()),
            Rp3::Map { data, .. } => Frame::Map(rp3_pairs(data)),
            other => panic!("unexpected redis-protocol frame {other:?}"),
        }
    }

    /// A top-level redis-protocol frame as the sequence our parser returns: its
    /// attributes (if any) as a separate `Attribute` frame first. Normalised.
    fn rp3_top(mut frame: Rp3, out: &mut Vec<Frame>) {
        if let Some(attrs) = frame.take_attributes() {
            out.push(norm(Frame::Attribute(rp3_pairs(attrs))));
        }
        out.push(norm(from_rp3(frame)));
    }

    fn rp2_feed(chunks: &[&[u8]]) -> Result<(Vec<Frame>, usize), String> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some((frame, _, _)) = rp2_decode(&mut buf).map_err(|e| format!("{e:?}"))? {
                out.push(from_rp2(frame));
            }
        }
        Ok((out, buf.len()))
    }

    fn rp3_feed(chunks: &[&[u8]]) -> Result<(Vec<Frame>, usize), String> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some((frame, _, _)) = rp3_decode(&mut buf).map_err(|e| format!("{e:?}"))? {
                rp3_top(frame, &mut out);
            }
        }
        Ok((out, buf.len()))
    }

    // ------------------------------------------------------------ unit tests

    #[test]
    fn resp2_scalars() {
        assert_eq!(one(b"+OK\r\n"), Frame::Simple(b(b"OK")));
        assert_eq!(one(b"+\r\n"), Frame::Simple(Bytes::new()));
        assert_eq!(
            one(b"-ERR unknown command\r\n"),
            Frame::Error(b(b"ERR unknown command"))
        );
        assert_eq!(one(b":0\r\n"), Frame::Integer(0));
        assert_eq!(one(b":-42\r\n"), Frame::Integer(-42));
        assert_eq!(one(b":+7\r\n"), Frame::Integer(7));
        assert_eq!(one(b":9223372036854775807\r\n"), Frame::Integer(i64::MAX));
        assert_eq!(one(b":-9223372036854775808\r\n"), Frame::Integer(i64::MIN));
        assert_eq!(one(b"$3\r\nfoo\r\n"), bulk(b"foo"));
        assert_eq!(one(b"$0\r\n\r\n"), bulk(b""));
        assert_eq!(one(b"$4\r\n\r\n\r\n\r\n"), bulk(b"\r\n\r\n"));
        assert_eq!(one(b"$-1\r\n"), Frame::Null);
        assert_eq!(one(b"*-1\r\n"), Frame::Null);
        assert_eq!(one(b"$003\r\nfoo\r\n"), bulk(b"foo"));
    }

    #[test]
    fn resp2_arrays() {
        assert_eq!(one(b"*0\r\n"), Frame::Array(vec![]));
        assert_eq!(
            one(b"*3\r\n$3\r\nfoo\r\n$-1\r\n:5\r\n"),
            Frame::Array(vec![bulk(b"foo"), Frame::Null, Frame::Integer(5)])
        );
        assert_eq!(
            one(b"*2\r\n*2\r\n+a\r\n*0\r\n*1\r\n*-1\r\n"),
            Frame::Array(vec![
                Frame::Array(vec![Frame::Simple(b(b"a")), Frame::Array(vec![])]),
                Frame::Array(vec![Frame::Null]),
            ])
        );
    }

    #[test]
    fn resp3_scalars() {
        assert_eq!(one(b"_\r\n"), Frame::Null);
        assert_eq!(one(b",1.5\r\n"), Frame::Double(b(b"1.5")));
        assert_eq!(one(b",-inf\r\n"), Frame::Double(b(b"-inf")));
        assert_eq!(one(b",nan\r\n"), Frame::Double(b(b"nan")));
        assert_eq!(one(b",1e-3\r\n"), Frame::Double(b(b"1e-3")));
        assert_eq!(one(b"#t\r\n"), Frame::Boolean(true));
        assert_eq!(one(b"#f\r\n"), Frame::Boolean(false));
        assert_eq!(
            one(b"(3492890328409238509324850943850943825024385\r\n"),
            Frame::BigNumber(b(b"3492890328409238509324850943850943825024385"))
        );
        assert_eq!(one(b"(-12\r\n"), Frame::BigNumber(b(b"-12")));
        assert_eq!(
            one(b"=15\r\ntxt:Some string\r\n"),
            Frame::VerbatimString(b(b"txt:Some string"))
        );
        assert_eq!(one(b"=4\r\nmkd:\r\n"), Frame::VerbatimString(b(b"mkd:")));
        assert_eq!(
            one(b"!21\r\nSYNTAX invalid syntax\r\n"),
            Frame::BlobError(b(b"SYNTAX invalid syntax"))
        );
        assert_eq!(one(b"!0\r\n\r\n"), Frame::BlobError(Bytes::new()));
    }

    #[test]
    fn resp3_aggregates() {
        assert_eq!(
            one(b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"),
            Frame::Push(vec![bulk(b"message"), bulk(b"ch"), bulk(b"hi")])
        );
        assert_eq!(
            one(b"%2\r\n+first\r\n:1\r\n+second\r\n*1\r\n#f\r\n"),
            Frame::Map(vec![
                (Frame::Simple(b(b"first")), Frame::Integer(1)),
                (
                    Frame::Simple(b(b"second")),
                    Frame::Array(vec![Frame::Boolean(false)])
                ),
            ])
        );
        assert_eq!(one(b"%0\r\n"), Frame::Map(vec![]));
        assert_eq!(
            one(b"~3\r\n+orange\r\n:7\r\n_\r\n"),
            Frame::Set(vec![
                Frame::Simple(b(b"orange")),
                Frame::Integer(7),
                Frame::Null
            ])
        );
        assert_eq!(one(b"~0\r\n"), Frame::Set(vec![]));
        assert_eq!(one(b">0\r\n"), Frame::Push(vec![]));
    }

    #[test]
    fn resp3_attributes() {
        // Top level: the attribute is its own frame, followed by the frame it describes.
        let wire = b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*2\r\n:2039123\r\n:9543892\r\n";
        let (frames, left) = feed(&[wire], true, &lim()).unwrap();
        assert_eq!(left, 0);
        assert_eq!(
            frames,
            vec![
                Frame::Attribute(vec![(
                    Frame::Simple(b(b"key-popularity")),
                    Frame::Map(vec![
                        (bulk(b"a"), Frame::Double(b(b"0.1923"))),
                        (bulk(b"b"), Frame::Double(b(b"0.0012"))),
                    ])
                )]),
                Frame::Array(vec![Frame::Integer(2039123), Frame::Integer(9543892)]),
            ]
        );
        // Nested: not counted as an element of its parent, and dropped.
        let nested = b"*2\r\n|1\r\n+ttl\r\n:3600\r\n:10\r\n|0\r\n:20\r\n";
        assert_eq!(
            one(nested),
            Frame::Array(vec![Frame::Integer(10), Frame::Integer(20)])
        );
        // redis-protocol attaches the same nested attribute to the element; after
        // dropping nested attributes the frames agree.
        assert_eq!(rp3_feed(&[nested]).unwrap(), (vec![norm(one(nested))], 0));
        assert_eq!(
            rp3_feed(&[wire]).unwrap().0,
            frames.into_iter().map(norm).collect::<Vec<_>>()
        );
        // An empty top-level attribute.
        assert_eq!(one(b"|0\r\n"), Frame::Attribute(vec![]));
    }

    #[test]
    fn bulk_and_nested_strings_are_zero_copy() {
        let wire = b"*2\r\n$5\r\nhello\r\n+world\r\n";
        let mut buf = BytesMut::from(&wire[..]);
        let base = buf.as_ptr() as usize;
        let frame = parse(&mut buf, &lim()).unwrap().unwrap();
        let Frame::Array(items) = frame else {
            panic!("not an array")
        };
        let (Frame::Bulk(hello), Frame::Simple(world)) = (&items[0], &items[1]) else {
            panic!("unexpected items {items:?}")
        };
        assert_eq!(hello.as_ptr() as usize, base + 8);
        assert_eq!(world.as_ptr() as usize, base + 16);
    }

    #[test]
    fn malformed_input_errors() {
        assert_eq!(err(b"@foo\r\n"), ParseError::InvalidTypeByte(b'@'));
        assert_eq!(err(b";3\r\nabc\r\n"), ParseError::InvalidTypeByte(b';'));
        assert_eq!(err(b"$-2\r\n"), ParseError::InvalidLength);
        assert_eq!(err(b"$-1x"), ParseError::InvalidLength);
        assert_eq!(err(b"$+3\r\nfoo\r\n"), ParseError::InvalidLength);
        assert_eq!(err(b"$\r\n"), ParseError::InvalidLength);
        assert_eq!(err(b"$3x\r\n"), ParseError::InvalidLength);
        assert_eq!(err(b"$3\rx"), ParseError::InvalidLength);
        assert_eq!(err(b">-1\r\n"), ParseError::InvalidLength);
        assert_eq!(err(b"!-1\r\n"), ParseError::InvalidLength);
        assert_eq!(err(b"$?\r\n"), ParseError::StreamingUnsupported);
        assert_eq!(err(b"*?\r\n"), ParseError::StreamingUnsupported);
        assert_eq!(err(b"$3\r\nfooXY"), ParseError::MissingBulkCrlf);
        assert_eq!(err(b"$3\r\nfoo\rX"), ParseError::MissingBulkCrlf);
        assert_eq!(err(b"$3\r\nfooX"), ParseError::MissingBulkCrlf, "early");
        assert_eq!(err(b"+OK\n"), ParseError::BadLineTerminator);
        assert_eq!(err(b"+O\rK\r\n"), ParseError::BadLineTerminator);
        assert_eq!(err(b":1\n"), ParseError::BadLineTerminator);
        assert_eq!(err(b":abc\r\n"), ParseError::InvalidInteger);
        assert_eq!(err(b":\r\n"), ParseError::InvalidInteger);
        assert_eq!(err(b":9223372036854775808\r\n"), ParseError::InvalidInteger);
        assert_eq!(err(b",1.2.3\r\n"), ParseError::InvalidDouble);
        assert_eq!(err(b",\r\n"), ParseError::InvalidDouble);
        assert_eq!(err(b"#x\r\n"), ParseError::InvalidBoolean);
        assert_eq!(err(b"#tt\r\n"), ParseError::InvalidBoolean);
        assert_eq!(err(b"_x\r\n"), ParseError::InvalidNull);
        assert_eq!(err(b"(12a\r\n"), ParseError::InvalidBigNumber);
        assert_eq!(err(b"(-\r\n"), ParseError::InvalidBigNumber);
        assert_eq!(err(b"=3\r\ntxt\r\n"), ParseError::InvalidVerbatim);
        assert_eq!(err(b"=5\r\ntxt-a\r\n"), ParseError::InvalidVerbatim);
        // Errors inside aggregates are reported too (the whole frame is rejected).
        assert_eq!(err(b"*2\r\n:1\r\n#x\r\n"), ParseError::InvalidBoolean);
        // Incomplete is not an error.
        assert!(is_incomplete(b""));
        assert!(is_incomplete(b"$"));
        assert!(is_incomplete(b"$-"));
        assert!(is_incomplete(b"$3\r\nfoo\r"));
        assert!(is_incomplete(b"*2\r\n:1\r\n"));
        assert!(is_incomplete(b"+OK\r"));
    }

    // ---------------------------------------------------------- hostile input

    /// Runs one hostile case (named for the failure message of the asserts inside). Speed is not
    /// asserted here (timing belongs in benches); the cases check that nothing was allocated.
    fn assert_fast(_what: &str, f: impl FnOnce()) {
        f();
    }

    #[test]
    fn hostile_lengths_fail_before_allocation() {
        assert_fast("huge bulk", || {
            assert_eq!(
                err(b"$99999999999999999999\r\n"),
                ParseError::BulkTooLarge { max: 64 << 20 }
            );
            // Rejected as soon as the digits exceed the limit, before the CRLF.
            assert_eq!(
                err(b"$67108865"),
                ParseError::BulkTooLarge { max: 64 << 20 }
            );
            assert!(is_incomplete(b"$67108864\r\n"));
            // Without a limit the overflow itself is caught.
            let unlimited = Limits {
                max_bulk_len: usize::MAX,
                max_array_len: usize::MAX,
                ..lim()
            };
            assert_eq!(
                err_with(b"$99999999999999999999\r\n", &unlimited),
                ParseError::InvalidLength
            );
            assert_eq!(
                err_with(b"*000000000000000000001\r\n", &unlimited),
                ParseError::InvalidLength
            );
            // A declared length within the limits is not allocated up front.
            let mut buf = BytesMut::from(&b"*18446744073709551615\r\n:1\r\n"[..]);
            let cap = buf.capacity();
            assert_eq!(Parser::new().parse(&mut buf, &unlimited), Ok(None));
            assert_eq!(buf.capacity(), cap);
            let mut buf = BytesMut::from(&b"%9223372036854775807\r\n"[..]);
            assert_eq!(Parser::new().parse(&mut buf, &unlimited), Ok(None));
            assert_eq!(
                err_with(b"%9223372036854775808\r\n", &unlimited),
                ParseError::AggregateTooLarge { max: usize::MAX }
            );
        });
        assert_fast("$-2", || {
            assert_eq!(err(b"$-2\r\n"), ParseError::InvalidLength)
        });
        assert_fast("huge array", || {
            let mut buf = BytesMut::from(&b"*1000000000\r\n"[..]);
            let cap = buf.capacity();
            assert_eq!(
                parse(&mut buf, &lim()),
                Err(ParseError::AggregateTooLarge { max: 1 << 20 })
            );
            assert_eq!(buf.capacity(), cap);
            assert_eq!(&buf[..], b"*1000000000\r\n");
            assert_eq!(
                err(b"%1048577\r\n"),
                ParseError::AggregateTooLarge { max: 1 << 20 }
            );
            assert_eq!(
                err(b"|99999999"),
                ParseError::AggregateTooLarge { max: 1 << 20 }
            );
            // Exactly at the limit: accepted (waits for the elements).
            assert!(is_incomplete(b"*1048576\r\n"));
        });
    }

    #[test]
    fn depth_bomb() {
        let limits = lim();
        let nested = |n: usize, leaf: &[u8]| {
            let mut v = b"*1\r\n".repeat(n);
            v.extend_from_slice(leaf);
            v
        };
        // max_depth aggregates are fine.
        let mut expected = Frame::Integer(1);
        for _ in 0..limits.max_depth {
            expected = Frame::Array(vec![expected]);
        }
        assert_eq!(one(&nested(limits.max_depth, b":1\r\n")), expected);
        // One more is an error, even when the leaf is an empty aggregate or attribute.
        let too_deep = ParseError::TooDeep {
            max: limits.max_depth,
        };
        assert_eq!(err(&nested(limits.max_depth + 1, b":1\r\n")), too_deep);
        assert_eq!(err(&nested(limits.max_depth, b"*0\r\n")), too_deep);
        assert_eq!(err(&nested(limits.max_depth, b"|0\r\n")), too_deep);
        assert_fast("deep bomb", || {
            assert_eq!(err(&nested(1_000_000, b"")), too_deep);
        });
        let flat = Limits {
            max_depth: 0,
            ..lim()
        };
        assert_eq!(err_with(b"*0\r\n", &flat), ParseError::TooDeep { max: 0 });
        let mut buf = BytesMut::from(&b":1\r\n"[..]);
        assert_eq!(parse(&mut buf, &flat), Ok(Some(Frame::Integer(1))));
    }

    #[test]
    fn long_lines_are_bounded() {
        let limits = Limits {
            max_line_len: 16,
            ..lim()
        };
        let mut at_limit = b"+".to_vec();
        at_limit.extend_from_slice(&[b'a'; 16]);
        // 16 body bytes without CRLF: still incomplete ...
        let mut buf = BytesMut::from(&at_limit[..]);
        assert_eq!(parse(&mut buf, &limits), Ok(None));
        buf.extend_from_slice(b"\r");
        assert_eq!(parse(&mut buf, &limits), Ok(None));
        buf.extend_from_slice(b"\n");
        assert_eq!(
            parse(&mut buf, &limits),
            Ok(Some(Frame::Simple(b(&[b'a'; 16]))))
        );
        // ... the 17th is an error, whatever follows.
        let mut over = at_limit.clone();
        over.push(b'a');
        assert_eq!(
            err_with(&over, &limits),
            ParseError::LineTooLong { max: 16 }
        );
        assert_eq!(
            err_with(b":00000000000000000001\r\n", &limits),
            ParseError::LineTooLong { max: 16 }
        );
        // Default limit: a 1 MiB line without CRLF is rejected, quickly.
        let mut huge = b"-".to_vec();
        huge.resize(1 << 20, b'x');
        assert_fast("huge line", || {
            assert_eq!(err(&huge), ParseError::LineTooLong { max: 64 << 10 });
        });
    }

    #[test]
    fn trickled_large_array_is_linear() {
        let n = 200_000;
        let mut wire = format!("*{n}\r\n").into_bytes();
        for i in 0..n {
            wire.extend_from_slice(format!(":{}\r\n", i % 10).as_bytes());
        }
        let mut rng = StdRng::seed_from_u64(7);
        let chunks = random_chunks(&wire, &mut rng, 12);
        let (frames, left) = feed(&chunks, true, &lim()).unwrap();
        assert_eq!(left, 0);
        assert_eq!(frames.len(), 1);
        let Frame::Array(items) = &frames[0] else {
            panic!("not an array")
        };
        assert_eq!(items.len(), n);
        assert_eq!(items[12_345], Frame::Integer(5));
        // Rescanning from the frame start on each of the ~30k reads would scan ~14 GB: a
        // quadratic parser would not finish this test in CI's time.
    }

    #[test]
    fn trickled_long_line_and_big_bulk() {
        // A 60 000-byte simple string, byte by byte: the line scan resumes.
        let body = vec![b'z'; 60_000];
        let mut wire = b"+".to_vec();
        wire.extend_from_slice(&body);
        wire.extend_from_slice(b"\r\n");
        let chunks: Vec<&[u8]> = wire.chunks(1).collect();
        let (frames, _) = feed(&chunks, true, &lim()).unwrap();
        assert_eq!(frames, vec![Frame::Simple(body.into())]);

        // A 16 MiB bulk string in 4 KiB reads, stateless: O(header) per read; the
        // result is a slice of the read buffer.
        let len = 16 << 20;
        let header = format!("$10\r\nlead\r\n\r\n\r\n\r\n${len}\r\n");
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut buf = BytesMut::with_capacity(header.len() + len + 2);
        buf.extend_from_slice(header.as_bytes());
        assert_eq!(parse(&mut buf, &lim()), Ok(Some(bulk(b"lead\r\n\r\n\r\n"))));
        for chunk in payload.chunks(4096) {
            assert_eq!(parse(&mut buf, &lim()), Ok(None));
            buf.extend_from_slice(chunk);
        }
        assert_eq!(parse(&mut buf, &lim()), Ok(None));
        buf.extend_from_slice(b"\r\n");
        let base = buf.as_ptr() as usize;
        let frame = parse(&mut buf, &lim()).unwrap().unwrap();
        let Frame::Bulk(got) = frame else {
            panic!("not a bulk")
        };
        assert_eq!(got.len(), len);
        assert!(got[..] == payload[..]);
        let hdr = format!("${len}\r\n").len();
        assert_eq!(got.as_ptr() as usize, base + hdr, "zero copy");
    }

    #[test]
    fn parser_recovers_when_buffer_shrinks() {
        let mut parser = Parser::new();
        let mut buf = BytesMut::from(&b"*3\r\n:1\r\n:2\r\n"[..]);
        assert_eq!(parser.parse(&mut buf, &lim()), Ok(None));
        buf.clear();
        buf.extend_from_slice(b":9\r\n");
        assert_eq!(parser.parse(&mut buf, &lim()), Ok(Some(Frame::Integer(9))));
        // After reset, a different buffer of any length is fine.
        let mut buf = BytesMut::from(&b"*3\r\n:1\r\n:2\r\n:3"[..]);
        assert_eq!(parser.parse(&mut buf, &lim()), Ok(None));
        parser.reset();
        let mut other = BytesMut::from(&b"+this is long enough\r\n"[..]);
        assert_eq!(
            parser.parse(&mut other, &lim()),
            Ok(Some(Frame::Simple(b(b"this is long enough"))))
        );
    }

    // ---------------------------------------------------------------- encoder

    #[test]
    fn encode_command_exact_bytes() {
        let mut dst = BytesMut::new();
        encode_command(&mut dst, &[b"SUBSCRIBE", b"ws:chan"]);
        assert_eq!(&dst[..], b"*2\r\n$9\r\nSUBSCRIBE\r\n$7\r\nws:chan\r\n");
        // Appends.
        encode_command(&mut dst, &[b"PING"]);
        assert_eq!(
            &dst[..],
            b"*2\r\n$9\r\nSUBSCRIBE\r\n$7\r\nws:chan\r\n*1\r\n$4\r\nPING\r\n"
        );
        let mut dst = BytesMut::new();
        encode_command(&mut dst, &[]);
        assert_eq!(&dst[..], b"*0\r\n");
        let mut dst = BytesMut::new();
        let long = vec![b'q'; 1234];
        encode_command(&mut dst, &[b"PUBLISH", b"", b"a\r\nb", &long]);
        let mut expected = b"*4\r\n$7\r\nPUBLISH\r\n$0\r\n\r\n$4\r\na\r\nb\r\n$1234\r\n".to_vec();
        expected.extend_from_slice(&long);
        expected.extend_from_slice(b"\r\n");
        assert_eq!(&dst[..], &expected[..]);
        // Both parsers read it back as an array of bulk strings.
        let args = Frame::Array(vec![
            bulk(b"PUBLISH"),
            bulk(b""),
            bulk(b"a\r\nb"),
            bulk(&long),
        ]);
        assert_eq!(one(&dst), args);
        assert_eq!(rp2_feed(&[&dst]).unwrap(), (vec![args], 0));
    }

    #[test]
    fn encode_frame_round_trips() {
        let frame = Frame::Array(vec![
            Frame::Integer(i64::MIN),
            Frame::Integer(-1),
            Frame::Null,
            Frame::Map(vec![(Frame::Boolean(true), Frame::Double(b(b"-1.5")))]),
            Frame::Attribute(vec![]),
            Frame::Push(vec![Frame::VerbatimString(b(b"txt:x"))]),
            Frame::Set(vec![Frame::BlobError(b(b"E")), Frame::BigNumber(b(b"-9"))]),
            Frame::Error(b(b"ERR x")),
        ]);
        let mut dst = BytesMut::new();
        encode_frame(&mut dst, &frame);
        assert!(dst.starts_with(
            b"*8\r\n:-9223372036854775808\r\n:-1\r\n$-1\r\n%1\r\n#t\r\n,-1.5\r\n|0\r\n"
        ));
        // The nested attribute is dropped on the way back.
        let Frame::Array(mut items) = frame.clone() else {
            unreachable!()
        };
        items.remove(4);
        // ... so the array now has 7 elements but declares 8: patch the header.
        dst[1] = b'7';
        assert_eq!(one(&dst), Frame::Array(items));
        let mut dst = BytesMut::new();
        encode_frame_resp3(&mut dst, &Frame::Array(vec![Frame::Null]));
        assert_eq!(&dst[..], b"*1\r\n_\r\n");
    }

    // ----------------------------------------------------------------- pub/sub

    #[test]
    fn pubsub_views() {
        let msg = Frame::Array(vec![bulk(b"message"), bulk(b"ch"), bulk(b"")]);
        assert_eq!(
            as_pubsub(&msg),
            Some(PubSub::Message {
                channel: b(b"ch"),
                payload: Bytes::new()
            })
        );
        let push = Frame::Push(vec![
            bulk(b"pmessage"),
            bulk(b"c*"),
            bulk(b"ch"),
            bulk(b"x"),
        ]);
        assert_eq!(
            as_pubsub(&push),
            Some(PubSub::PMessage {
                pattern: b(b"c*"),
                channel: b(b"ch"),
                payload: b(b"x")
            })
        );
        let sub = one(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n");
        assert_eq!(
            as_pubsub(&sub),
            Some(PubSub::Subscribed {
                channel: b(b"ch"),
                count: 1
            })
        );
        let unsub_none = one(b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n");
        assert_eq!(
            as_pubsub(&unsub_none),
            Some(PubSub::Unsubscribed {
                channel: Bytes::new(),
                count: 0
            })
        );
        let pong = one(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        assert_eq!(as_pubsub(&pong), Some(PubSub::Pong(Bytes::new())));
        // Not pub/sub.
        for frame in [
            Frame::Simple(b(b"OK")),
            Frame::Array(vec![]),
            Frame::Array(vec![bulk(b"message"), bulk(b"ch")]),
            Frame::Array(vec![bulk(b"message"), bulk(b"ch"), Frame::Integer(1)]),
            Frame::Array(vec![bulk(b"subscribe"), bulk(b"ch"), bulk(b"1")]),
            Frame::Array(vec![bulk(b"psubscribe"), bulk(b"c*"), Frame::Integer(1)]),
            Frame::Array(vec![Frame::Integer(1), bulk(b"ch"), bulk(b"x")]),
            Frame::Set(vec![bulk(b"message"), bulk(b"ch"), bulk(b"x")]),
        ] {
            assert_eq!(as_pubsub(&frame), None, "{frame:?}");
        }
    }

    // --------------------------------------------------- recorded pub/sub stream

    const CHANNELS: [&[u8]; 3] = [b"ws:chan", b"ws:room/42", b"ws:\xff\x00bin"];

    fn payload_for(i: usize) -> Vec<u8> {
        match i % 10 {
            0 => Vec::new(),
            1 => b"\r\n".to_vec(),
            2 => b"{\"a\":1}\r\n$3\r\nfoo\r\n*1\r\n".to_vec(),
            3 => (0..=255u8).collect(),
            4 => vec![b'x'; 1000 + i],
            5 => b"\r".to_vec(),
            6 => format!("msg {i}").into_bytes(),
            7 => (0..i * 13).map(|k| (k * 31 % 256) as u8).collect(),
            8 => b"\n\n\r\r\n".to_vec(),
            _ => vec![0u8; 3],
        }
    }

    fn push_bulk(wire: &mut Vec<u8>, s: &[u8]) {
        wire.extend_from_slice(format!("${}\r\n", s.len()).as_bytes());
        wire.extend_from_slice(s);
        wire.extend_from_slice(b"\r\n");
    }

    /// What a Redis server sends on a pub/sub connection: three subscribe confirmations,
    /// 50 messages, an unsubscribe confirmation, then a RESP3 push message. Written by
    /// hand (not with our encoder). Returns the bytes, the frames and the pub/sub events.
    fn recorded_stream() -> (Vec<u8>, Vec<Frame>, Vec<PubSub>) {
        let mut wire = Vec::new();
        let mut frames = Vec::new();
        let mut events = Vec::new();
        for (i, ch) in CHANNELS.iter().enumerate() {
            wire.extend_from_slice(b"*3\r\n");
            push_bulk(&mut wire, b"subscribe");
            push_bulk(&mut wire, ch);
            wire.extend_from_slice(format!(":{}\r\n", i + 1).as_bytes());
            frames.push(Frame::Array(vec![
                bulk(b"subscribe"),
                bulk(ch),
                Frame::Integer(i as i64 + 1),
            ]));
            events.push(PubSub::Subscribed {
                channel: b(ch),
                count: i as i64 + 1,
            });
        }
        for i in 0..50 {
            let ch = CHANNELS[i % 3];
            let payload = payload_for(i);
            wire.extend_from_slice(b"*3\r\n");
            push_bulk(&mut wire, b"message");
            push_bulk(&mut wire, ch);
            push_bulk(&mut wire, &payload);
            frames.push(Frame::Array(vec![
                bulk(b"message"),
                bulk(ch),
                bulk(&payload),
            ]));
            events.push(PubSub::Message {
                channel: b(ch),
                payload: payload.into(),
            });
        }
        wire.extend_from_slice(b"*3\r\n");
        push_bulk(&mut wire, b"unsubscribe");
        push_bulk(&mut wire, CHANNELS[0]);
        wire.extend_from_slice(b":2\r\n");
        frames.push(Frame::Array(vec![
            bulk(b"unsubscribe"),
            bulk(CHANNELS[0]),
            Frame::Integer(2),
        ]));
        events.push(PubSub::Unsubscribed {
            channel: b(CHANNELS[0]),
            count: 2,
        });
        wire.extend_from_slice(b">3\r\n");
        push_bulk(&mut wire, b"message");
        push_bulk(&mut wire, CHANNELS[1]);
        push_bulk(&mut wire, b"resp3 \r\n push");
        frames.push(Frame::Push(vec![
            bulk(b"message"),
            bulk(CHANNELS[1]),
            bulk(b"resp3 \r\n push"),
        ]));
        events.push(PubSub::Message {
            channel: b(CHANNELS[1]),
            payload: b(b"resp3 \r\n push"),
        });
        (wire, frames, events)
    }

    #[test]
    fn recorded_stream_every_split() {
        let (wire, frames, events) = recorded_stream();
        assert_eq!(frames.len(), 55);
        let got: Vec<PubSub> = frames.iter().map(|f| as_pubsub(f).unwrap()).collect();
        assert_eq!(got, events);
        for stateful in [true, false] {
            for at in 0..=wire.len() {
                let (a, z) = wire.split_at(at);
                assert_eq!(
                    feed(&[a, z], stateful, &lim()),
                    Ok((frames.clone(), 0)),
                    "split at {at}, stateful {stateful}"
                );
            }
            let bytes: Vec<&[u8]> = wire.chunks(1).collect();
            assert_eq!(
                feed(&bytes, stateful, &lim()),
                Ok((frames.clone(), 0)),
                "byte by byte, stateful {stateful}"
            );
        }
        // Truncated anywhere: the complete frames, the rest left in the buffer.
        let (prefix_frames, left) = feed(&[&wire[..wire.len() - 1]], true, &lim()).unwrap();
        assert_eq!(prefix_frames, frames[..54]);
        assert!(left > 0);
    }

    #[test]
    fn recorded_stream_matches_redis_protocol() {
        let (wire, frames, _) = recorded_stream();
        let push_start = wire.len() - {
            let mut push = BytesMut::new();
            encode_frame(&mut push, frames.last().unwrap());
            push.len()
        };
        assert_eq!(wire[push_start], b'>');
        let mut rng = StdRng::seed_from_u64(1);
        for round in 0..200 {
            let chunks = if round == 0 {
                vec![&wire[..]]
            } else {
                random_chunks(&wire, &mut rng, 1 + round * 40)
            };
            let ours = feed(&chunks, true, &lim()).unwrap();
            assert_eq!(ours, (frames.clone(), 0));
            assert_eq!(rp3_feed(&chunks).unwrap(), ours, "resp3 decoder");
            let resp2_part = random_chunks(&wire[..push_start], &mut rng, 1 + round * 40);
            assert_eq!(
                rp2_feed(&resp2_part).unwrap(),
                (frames[..frames.len() - 1].to_vec(), 0),
                "resp2 decoder"
            );
        }
    }

    // ------------------------------------------------ proptest differential tests

    fn line_bytes() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..16).prop_map(|v| {
            v.into_iter()
                .filter(|c| *c != b'\r' && *c != b'\n')
                .collect::<Vec<u8>>()
                .into()
        })
    }

    /// redis-protocol stores errors as `Str`, so generated errors are UTF-8.
    fn error_text() -> impl Strategy<Value = Bytes> {
        "[^\r\n]{0,12}".prop_map(Bytes::from)
    }

    fn blob() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..40).prop_map(Bytes::from)
    }

    fn resp2_frame() -> BoxedStrategy<Frame> {
        let leaf = prop_oneof![
            line_bytes().prop_map(Frame::Simple),
            error_text().prop_map(Frame::Error),
            any::<i64>().prop_map(Frame::Integer),
            blob().prop_map(Frame::Bulk),
            Just(Frame::Null),
        ];
        leaf.prop_recursive(6, 96, 6, |inner| vec(inner, 0..6).prop_map(Frame::Array))
            .boxed()
    }

    /// RESP2 encoding, alternating `$-1` and `*-1` for nulls.
    fn encode_resp2(dst: &mut BytesMut, frame: &Frame, flip: &mut bool) {
        match frame {
            Frame::Null => {
                *flip = !*flip;
                dst.extend_from_slice(if *flip { b"*-1\r\n" } else { b"$-1\r\n" });
            }
            Frame::Array(items) => {
                dst.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    encode_resp2(dst, item, flip);
                }
            }
            other => encode_frame(dst, other),
        }
    }

    /// Kinds redis-protocol accepts as map keys / set members (hashable, no NaN doubles).
    fn key3() -> BoxedStrategy<Frame> {
        prop_oneof![
            line_bytes().prop_map(Frame::Simple),
            error_text().prop_map(Frame::Error),
            any::<i64>().prop_map(Frame::Integer),
            blob().prop_map(Frame::Bulk),
            any::<bool>().prop_map(Frame::Boolean),
            "[-+]?[0-9]{1,30}".prop_map(|s| Frame::BigNumber(s.into())),
            (prop_oneof![Just("txt:"), Just("mkd:")], blob()).prop_map(|(f, body)| {
                let mut v = f.as_bytes().to_vec();
                v.extend_from_slice(&body);
                Frame::VerbatimString(v.into())
            }),
            blob().prop_map(Frame::BlobError),
        ]
        .boxed()
    }

    fn double_text() -> impl Strategy<Value = Bytes> {
        prop_oneof![
            any::<f64>().prop_map(|x| Bytes::from(format!("{x:?}"))),
            any::<f64>().prop_map(|x| Bytes::from(format!("{x:e}"))),
            Just(Bytes::from_static(b"inf")),
            Just(Bytes::from_static(b"-inf")),
            Just(Bytes::from_static(b"nan")),
            "-?[0-9]{1,5}(\\.[0-9]{0,5})?([eE][-+]?[0-9]{1,2})?".prop_map(Bytes::from),
        ]
    }

    fn leaf3() -> BoxedStrategy<Frame> {
        prop_oneof![
            6 => key3(),
            1 => Just(Frame::Null),
            1 => double_text().prop_map(Frame::Double),
        ]
        .boxed()
    }

    fn dedup(items: Vec<Frame>) -> Vec<Frame> {
        let mut out: Vec<Frame> = Vec::new();
        for item in items {
            if !out.contains(&item) {
                out.push(item);
            }
        }
        out
    }

    fn dedup_keys(pairs: Vec<(Frame, Frame)>) -> Vec<(Frame, Frame)> {
        let mut out: Vec<(Frame, Frame)> = Vec::new();
        for (k, v) in pairs {
            if !out.iter().any(|(seen, _)| *seen == k) {
                out.push((k, v));
            }
        }
        out
    }

    fn resp3_frame() -> BoxedStrategy<Frame> {
        leaf3()
            .prop_recursive(5, 96, 6, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..6).prop_map(Frame::Array),
                    vec(inner.clone(), 0..6).prop_map(Frame::Push),
                    vec(key3(), 0..6).prop_map(|v| Frame::Set(dedup(v))),
                    vec((key3(), inner), 0..5).prop_map(|v| Frame::Map(dedup_keys(v))),
                ]
            })
            .boxed()
    }

    /// A top-level RESP3 item: an optional attribute (never before a null, which
    /// redis-protocol cannot attach it to) and a frame.
    fn item3() -> impl Strategy<Value = (Option<Vec<(Frame, Frame)>>, Frame)> {
        (
            proptest::option::weighted(0.2, vec((key3(), leaf3()), 0..3)),
            resp3_frame(),
        )
            .prop_map(|(attrs, frame)| {
                let attrs = if frame == Frame::Null {
                    None
                } else {
                    attrs.map(dedup_keys)
                };
                (attrs, frame)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn differential_resp2(
            frames in vec(resp2_frame(), 1..8),
            cuts in vec(any::<Index>(), 0..8),
        ) {
            let mut wire = BytesMut::new();
            let mut flip = false;
            for f in &frames {
                encode_resp2(&mut wire, f, &mut flip);
            }
            let chunks = split_at_points(&wire, &cuts);
            let ours = feed(&chunks, true, &lim()).unwrap();
            prop_assert_eq!(&ours, &(frames.clone(), 0));
            prop_assert_eq!(&feed(&chunks, false, &lim()).unwrap(), &ours);
            prop_assert_eq!(&rp2_feed(&chunks).unwrap(), &ours);
        }

        #[test]
        fn differential_resp3(
            items in vec(item3(), 1..6),
            cuts in vec(any::<Index>(), 0..8),
        ) {
            let mut wire = BytesMut::new();
            let mut expected = Vec::new();
            for (attrs, frame) in items {
                if let Some(attrs) = attrs {
                    let attr = Frame::Attribute(attrs);
                    encode_frame_resp3(&mut wire, &attr);
                    expected.push(norm(attr));
                }
                encode_frame_resp3(&mut wire, &frame);
                expected.push(norm(frame));
            }
            let chunks = split_at_points(&wire, &cuts);
            let (ours, left) = feed(&chunks, true, &lim()).unwrap();
            prop_assert_eq!(left, 0);
            let ours: Vec<Frame> = ours.into_iter().map(norm).collect();
            prop_assert_eq!(&ours, &expected);
            prop_assert_eq!(&rp3_feed(&chunks).unwrap(), &(ours, 0));
        }

        #[test]
        fn never_panics_on_random_bytes(
            data in vec(any::<u8>(), 0..300),
            cuts in vec(any::<Index>(), 0..8),
            small in any::<bool>(),
        ) {
            let limits = if small {
                Limits { max_bulk_len: 16, max_array_len: 4, max_depth: 3, max_line_len: 8 }
            } else {
                lim()
            };
            let chunks = split_at_points(&data, &cuts);
            let stateful = feed(&chunks, true, &limits);
            let stateless = feed(&chunks, false, &limits);
            let whole = feed(&[&data], true, &limits);
            prop_assert_eq!(&stateful, &stateless);
            prop_assert_eq!(&stateful, &whole);
        }

        #[test]
        fn never_panics_on_resp_like_bytes(
            tokens in vec(prop_oneof![
                3 => proptest::sample::select(TOKENS.to_vec()).prop_map(|t| t.to_vec()),
                1 => vec(any::<u8>(), 1..3),
            ], 0..40),
            cuts in vec(any::<Index>(), 0..8),
        ) {
            let data = tokens.concat();
            let chunks = split_at_points(&data, &cuts);
            let limits = Limits { max_bulk_len: 64, max_array_len: 8, max_depth: 4, max_line_len: 32 };
            let stateful = feed(&chunks, true, &limits);
            prop_assert_eq!(&stateful, &feed(&chunks, false, &limits));
            prop_assert_eq!(&stateful, &feed(&[&data], true, &limits));
        }
    }

    // --------------------------------------- garbage: ours vs redis-protocol

    const TOKENS: &[&[u8]] = &[
        b"*",
        b"$",
        b"%",
        b"~",
        b">",
        b"|",
        b"+",
        b"-",
        b":",
        b",",
        b"#",
        b"(",
        b"_",
        b"!",
        b"=",
        b"0",
        b"1",
        b"2",
        b"3",
        b"-1",
        b"\r\n",
        b"\r\n",
        b"\r\n",
        b"\r",
        b"\n",
        b"t",
        b"f",
        b"x",
        b"txt:",
        b"1.5",
        b"inf",
        b"?",
        b"*1\r\n",
        b"*2\r\n",
        b"%1\r\n",
        b"~2\r\n",
        b">2\r\n",
        b"|1\r\n",
        b"|0\r\n",
        b"$3\r\nabc\r\n",
        b"$0\r\n\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b":12\r\n",
        b"_\r\n",
        b"#t\r\n",
        b",1.5\r\n",
        b",nan\r\n",
        b"+OK\r\n",
        b"-ERR x\r\n",
        b"-\xff\r\n",
        b"!3\r\nbad\r\n",
        b"(123\r\n",
        b"=7\r\ntxt:abc\r\n",
        b"=7\r\nfoo:abc\r\n",
        b"*0\r\n",
        b"%0\r\n",
    ];

    /// Pre-order list of the elements of one complete frame (type byte, element).
    fn walk(bytes: &[u8]) -> Vec<(u8, Elem)> {
        let mut out = Vec::new();
        let mut pos = 0;
        let mut progress = 0;
        while pos < bytes.len() {
            match read_element(bytes, pos, &lim(), &mut progress) {
                Ok(Step::Done(elem, next)) => {
                    out.push((bytes[pos], elem));
                    pos = next;
                }
                other => panic!("walk: {other:?}"),
            }
        }
        out
    }

    /// Number of list entries of the subtree starting at `i` (attributes inside an
    /// aggregate are skipped, not counted as its elements).
    fn subtree(list: &[(u8, Elem)], i: usize) -> usize {
        let mut j = i + 1;
        if let (_, Elem::Open(_, count)) = list[i] {
            let mut counted = 0;
            while counted < count && j < list.len() {
                if !matches!(list[j].1, Elem::Open(Agg::Attribute, _)) {
                    counted += 1;
                }
                j += subtree(list, j);
            }
        }
        j - i
    }

    /// Why redis-protocol may reject bytes we accept, if one of the known reasons applies.
    fn known_rejection(bytes: &[u8]) -> Option<&'static str> {
        let list = walk(bytes);
        for (i, (ty, elem)) in list.iter().enumerate() {
            match *elem {
                Elem::Null if *ty == b'$' || *ty == b'*' => {
                    return Some("RESP2 null ($-1/*-1) read as a RESP3 streamed type");
                }
                Elem::Line(LineKind::Error, s, e) if std::str::from_utf8(&bytes[s..e]).is_err() => {
                    return Some("non-UTF-8 simple error");
                }
                Elem::Blob(BlobKind::Verbatim, s, _)
                    if &bytes[s..s + 3] != b"txt" && &bytes[s..s + 3] != b"mkd" =>
                {
                    return Some("verbatim format other than txt/mkd");
                }
                Elem::Open(agg @ (Agg::Map | Agg::Set | Agg::Attribute), count) => {
                    if agg == Agg::Attribute {
                        let after = i + subtree(&list, i);
                        if let Some((_, next)) = list.get(after) {
                            if matches!(next, Elem::Null | Elem::Open(Agg::Attribute, _)) {
                                return Some("attribute before a null or another attribute");
                            }
                        }
                    }
                    let mut j = i + 1;
                    let mut counted = 0;
                    while counted < count && j < list.len() {
                        let is_attr = matches!(list[j].1, Elem::Open(Agg::Attribute, _));
                        let is_key = agg == Agg::Set || counted % 2 == 0;
                        if !is_attr {
                            if is_key && matches!(list[j].1, Elem::Open(..)) {
                                return Some("aggregate as map key or set member");
                            }
                            counted += 1;
                        }
                        j += subtree(&list, j);
                    }
                }
                _ => {}
            }
        }
        None
    }

    fn has_duplicates(frame: &Frame) -> bool {
        let dup = |v: &[Frame]| v.iter().enumerate().any(|(i, f)| v[..i].contains(f));
        match frame {
            Frame::Array(v) | Frame::Push(v) => v.iter().any(has_duplicates),
            Frame::Set(v) => {
                let n: Vec<Frame> = v.iter().cloned().map(norm).collect();
                dup(&n) || v.iter().any(has_duplicates)
            }
            Frame::Map(p) | Frame::Attribute(p) => {
                let keys: Vec<Frame> = p.iter().map(|(k, _)| norm(k.clone())).collect();
                dup(&keys)
                    || p.iter()
                        .any(|(k, v)| has_duplicates(k) || has_duplicates(v))
            }
            _ => false,
        }
    }

    /// redis-protocol only returns an attribute attached to the next frame: check our lone
    /// top-level attribute by giving it a valid frame to describe.
    fn lone_attribute_agrees(attr_bytes: &[u8], ours: &Frame) {
        if known_rejection(attr_bytes).is_some() {
            return;
        }
        let mut buf = BytesMut::from(attr_bytes);
        buf.extend_from_slice(b":1\r\n");
        let (frame, _, _) = rp3_decode(&mut buf).unwrap().unwrap();
        let mut conv = Vec::new();
        rp3_top(frame, &mut conv);
        assert_eq!(conv, vec![norm(ours.clone()), Frame::Integer(1)]);
    }

    /// Random RESP-like byte strings: whenever our parser returns a frame, redis-protocol
    /// (RESP3 decoder) must return the same frame for the same bytes, except for the
    /// known differences below, where we are stricter or redis-protocol is more limited:
    /// - `$-1` / `*-1`: RESP2 nulls; redis-protocol's RESP3 decoder reads `-1` as the
    ///   `?` of a streamed type and then fails ("expected complete frame").
    /// - simple errors that are not UTF-8: redis-protocol stores errors as `Str`.
    /// - verbatim strings whose format is not `txt`/`mkd`: redis-protocol only knows those.
    /// - an attribute followed by a null or another attribute: redis-protocol cannot
    ///   attach attributes to a null and does not accept consecutive attributes.
    /// - aggregates as map keys / set members: allowed by the RESP3 spec, refused by
    ///   redis-protocol (hash map keys).
    /// - duplicate map keys / set members: redis-protocol's hash maps collapse them.
    ///
    /// And the other way (redis-protocol accepts, we reject; not asserted here, see the
    /// module docs): signs and `+` in lengths, bare CR or LF inside lines, any bytes after
    /// `_`, non-numeric big numbers, bulk payloads not followed by CRLF (redis-protocol
    /// skips 2 bytes without looking), any separator byte in verbatim strings.
    #[test]
    fn garbage_differential() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut agreed = 0usize;
        let mut agreed_resp2 = 0usize;
        let mut known: BTreeMap<&'static str, usize> = BTreeMap::new();
        for _ in 0..40_000 {
            let n = rng.random_range(1..24);
            let mut input = Vec::new();
            for _ in 0..n {
                if rng.random_bool(0.1) {
                    input.push(rng.random::<u8>());
                } else {
                    input.extend_from_slice(TOKENS[rng.random_range(0..TOKENS.len())]);
                }
            }
            // Ours, whole input: frames with their byte ranges.
            let mut buf = BytesMut::from(&input[..]);
            let mut ours: Vec<(Frame, usize, usize)> = Vec::new();
            let outcome = loop {
                let start = input.len() - buf.len();
                match parse(&mut buf, &lim()) {
                    Ok(Some(f)) => ours.push((f, start, input.len() - buf.len())),
                    other => break other,
                }
            };
            // Incremental feeding gives the same frames and the same outcome.
            let chunks = random_chunks(&input, &mut rng, 5);
            let frames: Vec<Frame> = ours.iter().map(|o| o.0.clone()).collect();
            match (&outcome, feed(&chunks, true, &lim())) {
                (Ok(None), Ok((f, left))) => {
                    assert_eq!(f, frames);
                    assert_eq!(left, buf.len());
                }
                (Err(e), Err(e2)) => assert_eq!(e, &e2, "input {input:?}"),
                (a, b) => panic!("whole {a:?} vs chunked {b:?} for {input:?}"),
            }
            // Frames made only of RESP2 types: redis-protocol's RESP2 decoder agrees.
            for (frame, start, end) in &ours {
                let list = walk(&input[*start..*end]);
                if !list.iter().all(|(ty, _)| b"+-:$*".contains(ty)) {
                    continue;
                }
                let mut theirs_buf = BytesMut::from(&input[*start..]);
                match rp2_decode(&mut theirs_buf) {
                    Ok(Some((theirs, amt, _))) => {
                        assert_eq!((from_rp2(theirs), amt), (frame.clone(), end - start));
                        agreed_resp2 += 1;
                    }
                    other => assert!(
                        list.iter().any(|(_, e)| matches!(*e,
                            Elem::Line(LineKind::Error, s, e)
                                if std::str::from_utf8(&input[*start..][s..e]).is_err())),
                        "RESP2 decoder: {other:?} on {:?}",
                        Bytes::copy_from_slice(&input[*start..*end])
                    ),
                }
            }
            // Compare with redis-protocol, frame group by frame group.
            let mut i = 0;
            while i < ours.len() {
                let start = ours[i].1;
                let mut theirs_buf = BytesMut::from(&input[start..]);
                match rp3_decode(&mut theirs_buf) {
                    Ok(Some((frame, amt, _))) => {
                        let mut conv = Vec::new();
                        rp3_top(frame, &mut conv);
                        let group = &ours[i..(i + conv.len()).min(ours.len())];
                        let our_end = group.last().map_or(start, |g| g.2);
                        let mine: Vec<Frame> = group.iter().map(|g| norm(g.0.clone())).collect();
                        if mine == conv && our_end - start == amt {
                            agreed += 1;
                        } else if group.len() < conv.len()
                            && mine[..] == conv[..group.len()]
                            && outcome.is_err()
                        {
                            // We parsed the attribute but reject the frame after it, which
                            // redis-protocol (more lenient) accepts.
                            *known
                                .entry(
                                    "(lenient) redis-protocol accepts the frame after an attribute",
                                )
                                .or_default() += 1;
                            break;
                        } else if group.iter().any(|g| has_duplicates(&g.0)) {
                            *known.entry("duplicate map keys / set members").or_default() += 1;
                            break;
                        } else {
                            panic!(
                                "differ on {:?}: ours {mine:?} ({} bytes), redis-protocol {conv:?} ({amt} bytes)",
                                Bytes::copy_from_slice(&input[start..]),
                                our_end - start
                            );
                        }
                        i += conv.len();
                    }
                    Ok(None) => {
                        // Only explicable by a top-level attribute whose frame is incomplete.
                        assert!(
                            ours[i..].iter().all(|g| matches!(g.0, Frame::Attribute(_))),
                            "redis-protocol incomplete on {:?} where we parsed {:?}",
                            Bytes::copy_from_slice(&input[start..]),
                            &ours[i..]
                        );
                        lone_attribute_agrees(&input[start..ours[i].2], &ours[i].0);
                        *known
                            .entry("(agree) trailing attribute, frame incomplete")
                            .or_default() += 1;
                        break;
                    }
                    Err(_)
                        if matches!(ours[i].0, Frame::Attribute(_))
                            && i + 1 == ours.len()
                            && outcome.is_err() =>
                    {
                        // Not a difference: redis-protocol parses the attribute together
                        // with the next frame, which we reject as well.
                        lone_attribute_agrees(&input[start..ours[i].2], &ours[i].0);
                        *known
                            .entry("(agree) both reject the frame after an attribute")
                            .or_default() += 1;
                        break;
                    }
                    Err(e) => {
                        let end = if matches!(ours[i].0, Frame::Attribute(_)) {
                            ours.get(i + 1).unwrap_or(&ours[i]).2
                        } else {
                            ours[i].2
                        };
                        let after_attr = &input[ours[i].2..];
                        let before_null_or_attr = matches!(ours[i].0, Frame::Attribute(_))
                            && [&b"|"[..], b"_", b"$-1", b"*-1"]
                                .iter()
                                .any(|p| after_attr.starts_with(p));
                        let why = if before_null_or_attr {
                            Some("attribute before a null or another attribute")
                        } else {
                            known_rejection(&input[start..end])
                        };
                        match why {
                            Some(why) => *known.entry(why).or_default() += 1,
                            None => panic!(
                                "redis-protocol rejects {:?} ({e}), we parsed {:?}",
                                Bytes::copy_from_slice(&input[start..end]),
                                &ours[i..]
                            ),
                        }
                        break;
                    }
                }
            }
        }
        eprintln!(
            "garbage_differential: {agreed} frame groups agreed (RESP3 decoder), \
             {agreed_resp2} frames agreed (RESP2 decoder); known differences: {known:?}"
        );
        assert!(agreed > 5_000, "too few comparisons: {agreed}");
        assert!(agreed_resp2 > 5_000, "too few comparisons: {agreed_resp2}");
    }
}
