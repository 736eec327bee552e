//! Client protocol v1: JSON text frames in, JSON text frames out. Sans-IO.
//!
//! # Client → server
//!
//! ```text
//! {"type":"subscribe","channel":"news","id":1}             → {"type":"subscribed","channel":"news","id":1}
//! {"type":"unsubscribe","channel":"news","id":2}           → {"type":"unsubscribed","channel":"news","id":2}
//! {"type":"publish","channel":"news","data":<any>,"id":3}  → {"type":"published","channel":"news","id":3}
//! {"type":"ping","id":4}                                   → {"type":"pong","id":4}
//! ```
//!
//! `id` is optional; when present it must be a JSON number or string and is echoed back
//! *verbatim* (its exact source text, e.g. `1.50` stays `1.50`). `"id":null` is treated as no id.
//! Unknown extra fields are ignored. Duplicate fields are a `bad_request`. For `publish`, `data`
//! is required and may be any JSON value including `null` (a present `null` is kept, only an
//! absent `data` is an error); it is carried as the exact source text (no re-encoding).
//!
//! # Server → client
//!
//! `{"type":"welcome","connection":..,"instance":..}` after the upgrade,
//! `{"type":"message","channel":..,"data":..}` for deliveries, and
//! `{"type":"error","id":..,"code":..,"message":..}` (no `"id"` key when there is none), with the
//! codes of [`ErrorCode`].
//!
//! # Invariants
//!
//! - Every encoder in this module produces valid JSON in valid UTF-8, whatever its string
//!   arguments contain (they are escaped), given that any `&RawValue` / `data` argument is itself
//!   JSON text (guaranteed for `RawValue`; callers get `data` from [`parse_command`] or
//!   [`payload_to_json`]).
//! - A [`Command`] always carries a valid channel name ([`is_valid_channel`]); so message frames
//!   can write the channel without escaping.
//! - Errors carry the request's `id` whenever the text was a JSON object with a valid `id`.
//!
//! # Costs
//!
//! Parsing is one serde_json pass over the text that borrows everything (`&RawValue` for each
//! field); the channel string is then sliced out of its raw text, so a publish without escape
//! sequences in its channel name allocates nothing. Only the error path formats strings.

use std::borrow::Cow;
use std::fmt;

use bytes::BytesMut;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// Maximum length of a channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 256;

/// One parsed client command. Borrows from the frame text.
#[derive(Debug)]
pub enum Command<'a> {
    Subscribe {
        channel: Cow<'a, str>,
        /// A channel token (private channels).
        token: Option<Cow<'a, str>>,
        /// Recovery: the last offset the client has, in an epoch (history channels).
        since: Option<crate::history::Since>,
        id: Option<&'a RawValue>,
    },
    /// Read a history channel: messages after `since` (all kept ones without), at most `limit`.
    History {
        channel: Cow<'a, str>,
        since: Option<u64>,
        limit: Option<usize>,
        id: Option<&'a RawValue>,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
        id: Option<&'a RawValue>,
    },
    Publish {
        channel: Cow<'a, str>,
        /// The exact JSON text of `data` (no surrounding whitespace); may be `null`.
        data: &'a RawValue,
        id: Option<&'a RawValue>,
    },
    Ping {
        id: Option<&'a RawValue>,
    },
    /// Authenticate: `{"type":"connect","token":"<JWT>"}` (the token may be absent where
    /// anonymous connections are allowed, or when it came in the upgrade URL).
    Connect {
        token: Option<Cow<'a, str>>,
        id: Option<&'a RawValue>,
    },
    /// A new token before the current one expires: the connection's (no `channel`) or a
    /// channel's.
    Refresh {
        channel: Option<Cow<'a, str>>,
        token: Cow<'a, str>,
        id: Option<&'a RawValue>,
    },
}

impl<'a> Command<'a> {
    /// The request id, if any.
    pub fn id(&self) -> Option<&'a RawValue> {
        match self {
            Command::Subscribe { id, .. }
            | Command::Unsubscribe { id, .. }
            | Command::Publish { id, .. }
            | Command::Connect { id, .. }
            | Command::Refresh { id, .. }
            | Command::History { id, .. }
            | Command::Ping { id } => *id,
        }
    }

    /// The (valid) channel name, for the commands that have one.
    pub fn channel(&self) -> Option<&str> {
        match self {
            Command::Subscribe { channel, .. }
            | Command::Unsubscribe { channel, .. }
            | Command::Publish { channel, .. }
            | Command::History { channel, .. } => Some(channel),
            Command::Refresh { channel, .. } => channel.as_deref(),
            Command::Ping { .. } | Command::Connect { .. } => None,
        }
    }
}

/// Machine-readable error codes sent in `{"type":"error","code":...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    InvalidChannel,
    TooManySubscriptions,
    MessageTooLarge,
    Unavailable,
    RateLimited,
    NotFound,
    /// The token was refused (bad signature, malformed, wrong audience/issuer…), or a command
    /// other than `connect`/`ping` came before `connect`.
    Unauthorized,
    /// The token has expired.
    TokenExpired,
    /// The namespace's rules do not allow this.
    PermissionDenied,
    /// The channel's namespace is not declared in the config.
    UnknownNamespace,
}

impl ErrorCode {
    /// The wire name; plain ASCII identifiers that need no JSON escaping.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::UnknownNamespace => "unknown_namespace",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected client message: what to send back (see [`CommandError::to_json`]).
#[derive(Debug)]
pub struct CommandError<'a> {
    pub code: ErrorCode,
    /// Human-readable explanation (escaped when encoded).
    pub message: String,
    /// The request's id, when the text was an object with a valid id.
    pub id: Option<&'a RawValue>,
}

impl CommandError<'_> {
    /// The `{"type":"error",...}` reply for this error.
    pub fn to_json(&self) -> String {
        error(self.id, self.code, &self.message)
    }
}

impl fmt::Display for CommandError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for CommandError<'_> {}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Every field is kept as raw JSON so that a wrongly typed field does not abort the whole parse
/// (we still want the id for the error reply). `type`, `channel` and `data` use [`present`] so
/// that an explicit `null` is `Some("null")`; `id` uses the default `Option` handling, so
/// `"id":null` is `None`.
#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default)]
    limit: Option<&'a RawValue>,
}

/// Deserialize a field that is present as `Some(raw)`, even when its value is `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

fn is_json_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The decoded value of a raw JSON string, or `None` if `raw` is not a string. Borrows unless
/// the literal contains escape sequences.
fn raw_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        // A validated JSON string literal without backslashes has no escapes (and no control
        // characters), so its content is exactly the text between the quotes.
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(text).ok().map(Cow::Owned)
}

/// Whether a raw JSON value is acceptable as an `id`: a number or a string.
fn is_valid_id(raw: &RawValue) -> bool {
    matches!(
        raw.get().as_bytes().first(),
        Some(b'"' | b'-' | b'0'..=b'9')
    )
}

fn bad_request<'a>(id: Option<&'a RawValue>, message: impl Into<String>) -> CommandError<'a> {
    CommandError {
        code: ErrorCode::BadRequest,
        message: message.into(),
        id,
    }
}

/// Extract and validate the `channel` field.
fn take_channel<'a>(
    raw: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
) -> Result<Cow<'a, str>, CommandError<'a>> {
    let raw = raw.ok_or_else(|| bad_request(id, "missing field `channel`"))?;
    let channel = raw_str(raw).ok_or_else(|| bad_request(id, "`channel` must be a string"))?;
    if !is_valid_channel(&channel) {
        return Err(CommandError {
            code: ErrorCode::InvalidChannel,
            message: format!(
                "channel names are 1-{MAX_CHANNEL_LEN} bytes of ASCII letters, digits and _-.:/@#,$"
            ),
            id,
        });
    }
    Ok(channel)
}

/// Parse one client text message. Channel validity is checked here (invalid → `InvalidChannel`
/// with the id).
///
/// `text` must be valid UTF-8 (the codec validates text frames). serde_json checks the UTF-8 of
/// every field kept here (`type`, `channel`, `data`, `id`), so whatever this returns is UTF-8
/// and any invalid bytes there are a `bad_request`; bytes inside ignored unknown fields are not
/// checked. Never panics. Nesting depth of `data` is not limited here (serde_json skips raw
/// values without its recursion limit); the frame size limit bounds it.
///
/// Errors: not JSON / not an object / duplicate field → `bad_request` without id; `id` not a number or string → `bad_request` without id;
/// missing or non-string `type`, unknown `type`, missing or non-string `channel`, missing `data`
/// → `bad_request` with the id; bad channel name → `invalid_channel` with the id.
pub fn parse_command(text: &[u8]) -> Result<Command<'_>, CommandError<'_>> {
    // serde's derived struct visitor would also accept a JSON array; we only take objects.
    if text.iter().find(|&&b| !is_json_ws(b)) != Some(&b'{') {
        return Err(bad_request(None, "expected a JSON object"));
    }
    let raw: Raw<'_> = serde_json::from_slice(text)
        .map_err(|e| bad_request(None, format!("invalid JSON: {e}")))?;

    let id = raw.id;
    if id.is_some_and(|id| !is_valid_id(id)) {
        return Err(bad_request(None, "`id` must be a number or a string"));
    }

    let kind = raw
        .kind
        .ok_or_else(|| bad_request(id, "missing field `type`"))?;
    let kind = raw_str(kind).ok_or_else(|| bad_request(id, "`type` must be a string"))?;

    let token = |required: bool| -> Result<Option<Cow<'_, str>>, CommandError<'_>> {
        match raw.token {
            None if required => Err(bad_request(id, "missing field `token`")),
            None => Ok(None),
            Some(t) => raw_str(t)
                .map(Some)
                .ok_or_else(|| bad_request(id, "`token` must be a string")),
        }
    };
    let number =
        |raw: Option<&RawValue>, name: &str| -> Result<Option<u64>, CommandError<'_>> {
            match raw {
                None => Ok(None),
                Some(v) => v.get().parse::<u64>().map(Some).map_err(|_| {
                    bad_request(id, format!("`{name}` must be a non-negative integer"))
                }),
            }
        };
    match &*kind {
        "subscribe" => {
            let channel = take_channel(raw.channel, id)?;
            let since = match raw.since {
                None => None,
                Some(v) => {
                    #[derive(Deserialize)]
                    struct SinceRaw {
                        offset: u64,
                        epoch: String,
                    }
                    let s: SinceRaw = serde_json::from_str(v.get()).map_err(|_| {
                        bad_request(
                            id,
                            "`since` must be {\"offset\":<integer>,\"epoch\":<string>}",
                        )
                    })?;
                    Some(crate::history::Since {
                        offset: s.offset,
                        epoch: s.epoch,
                    })
                }
            };
            Ok(Command::Subscribe {
                channel,
                token: token(false)?,
                since,
                id,
            })
        }
        "history" => Ok(Command::History {
            channel: take_channel(raw.channel, id)?,
            since: number(raw.since, "since")?,
            limit: number(raw.limit, "limit")?.map(|n| n.min(usize::MAX as u64) as usize),
            id,
        }),
        "connect" => Ok(Command::Connect {
            token: token(false)?,
            id,
        }),
        "refresh" => Ok(Command::Refresh {
            channel: match raw.channel {
                None => None,
                some => Some(take_channel(some, id)?),
            },
            token: token(true)?.expect("required"),
            id,
        }),
        "unsubscribe" => Ok(Command::Unsubscribe {
            channel: take_channel(raw.channel, id)?,
            id,
        }),
        "publish" => {
            let channel = take_channel(raw.channel, id)?;
            let data = raw
                .data
                .ok_or_else(|| bad_request(id, "missing field `data`"))?;
            Ok(Command::Publish { channel, data, id })
        }
        "ping" => Ok(Command::Ping { id }),
        _ => Err(bad_request(
            id,
            "unknown `type` (expected connect, subscribe, unsubscribe, publish, history, refresh or ping)",
        )),
    }
}

/// Byte table for channel names: ASCII letters, digits and `_-.:/@#,$` (`,` separates the
/// users of a user-limited channel, `$` starts a private channel).
static CHANNEL_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'_' | b'-' | b'.' | b':' | b'/' | b'@' | b'#' | b',' | b'$'
            );
        b += 1;
    }
    t
};

/// Parse the body of `POST /publish`: `{"channel":"news","data":<any JSON value>}` (other fields
/// are ignored). Errors are `bad_request` or `invalid_channel`, as for a client publish.
pub fn parse_publish_body(body: &[u8]) -> Result<(Cow<'_, str>, &RawValue), CommandError<'_>> {
    if body.iter().find(|&&b| !is_json_ws(b)) != Some(&b'{') {
        return Err(bad_request(None, "expected a JSON object"));
    }
    let raw: Raw<'_> = serde_json::from_slice(body)
        .map_err(|e| bad_request(None, format!("invalid JSON: {e}")))?;
    let channel = take_channel(raw.channel, None)?;
    let data = raw
        .data
        .ok_or_else(|| bad_request(None, "missing field `data`"))?;
    Ok((channel, data))
}

/// Whether `name` is a valid channel name: 1–256 bytes, each an ASCII letter, digit or one of
/// `_-.:/@#,$`. Such a name never needs JSON escaping. Cost: one table lookup per byte.
pub fn is_valid_channel(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_CHANNEL_LEN
        && bytes.iter().all(|&b| CHANNEL_BYTES[b as usize])
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Whether byte `b` must be escaped inside a JSON string literal.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Append `s` as a quoted JSON string literal. Non-ASCII characters are kept as UTF-8; only
/// `"`, `\` and control characters are escaped. Unescaped runs are copied in one piece.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Small builder for the reply objects: every piece appended is either a fixed ASCII token, an
/// escaped string, or a `RawValue` (valid JSON), so the result is valid UTF-8 JSON.
struct Obj(Vec<u8>);

impl Obj {
    fn new(kind: &str, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(b"{\"type\":");
        push_json_str(&mut buf, kind);
        Obj(buf)
    }

    fn str_field(mut self, key: &str, value: &str) -> Self {
        self.0.push(b',');
        push_json_str(&mut self.0, key);
        self.0.push(b':');
        push_json_str(&mut self.0, value);
        self
    }

    fn id(mut self, id: Option<&RawValue>) -> Self {
        if let Some(id) = id {
            self.0.extend_from_slice(b",\"id\":");
            self.0.extend_from_slice(id.get().as_bytes());
        }
        self
    }

    fn finish(mut self) -> String {
        self.0.push(b'}');
        // Only escaped `&str`s, ASCII tokens and `RawValue` text (a `&str`) were appended.
        String::from_utf8(self.0).expect("JSON builder only appends UTF-8")
    }
}

/// `{"type":"welcome","connection":<connection>,"instance":<instance>}` (both escaped).
pub fn welcome(connection: &str, instance: &str) -> String {
    Obj::new("welcome", 48 + connection.len() + instance.len())
        .str_field("connection", connection)
        .str_field("instance", instance)
        .finish()
}

/// `{"type":<kind>,"channel":<channel>,"id":<id>}` (no `"id"` key when `id` is `None`). `kind`
/// is `"subscribed"`, `"unsubscribed"` or `"published"`; strings are escaped, `id` is verbatim.
pub fn ack(kind: &str, channel: &str, id: Option<&RawValue>) -> String {
    let id_len = id.map_or(0, |id| id.get().len() + 6);
    Obj::new(kind, 32 + kind.len() + channel.len() + id_len)
        .str_field("channel", channel)
        .id(id)
        .finish()
}

/// `{"type":"connected","id":<id>,"user":<user>,"expires_in":<seconds or null>}`.
pub fn connected(id: Option<&RawValue>, user: &str, expires_in: Option<u64>) -> String {
    let mut o = Obj::new("connected", 64 + user.len())
        .id(id)
        .str_field("user", user);
    o.0.extend_from_slice(b",\"expires_in\":");
    match expires_in {
        Some(n) => o.0.extend_from_slice(n.to_string().as_bytes()),
        None => o.0.extend_from_slice(b"null"),
    }
    o.finish()
}

/// `{"type":"refreshed","id":<id>,"expires_in":<seconds>}`, with `"channel"` for a channel
/// token.
pub fn refreshed(id: Option<&RawValue>, channel: Option<&str>, expires_in: Option<u64>) -> String {
    let mut o = Obj::new("refreshed", 64).id(id);
    if let Some(channel) = channel {
        o = o.str_field("channel", channel);
    }
    o.0.extend_from_slice(b",\"expires_in\":");
    match expires_in {
        Some(n) => o.0.extend_from_slice(n.to_string().as_bytes()),
        None => o.0.extend_from_slice(b"null"),
    }
    o.finish()
}

/// `{"type":"unsubscribed","channel":<channel>,"reason":<reason>}`: the server ended a
/// subscription (e.g. its channel token expired).
pub fn unsubscribed_notice(channel: &str, reason: &str) -> String {
    Obj::new("unsubscribed", 48 + channel.len() + reason.len())
        .str_field("channel", channel)
        .str_field("reason", reason)
        .finish()
}

/// `{"type":"subscribed","channel":..,"id":..,"epoch":..,"offset":<top>[,"recovered":..]}`: the
/// reply to a subscribe on a history channel (`recovered` only when it carried `since`).
pub fn subscribed_history(
    channel: &str,
    id: Option<&RawValue>,
    epoch: &str,
    top: u64,
    recovered: Option<bool>,
) -> String {
    let mut o = Obj::new("subscribed", 80 + channel.len() + epoch.len())
        .str_field("channel", channel)
        .id(id)
        .str_field("epoch", epoch);
    o.0.extend_from_slice(format!(",\"offset\":{top}").as_bytes());
    if let Some(r) = recovered {
        o.0.extend_from_slice(if r {
            b",\"recovered\":true"
        } else {
            b",\"recovered\":false"
        });
    }
    o.finish()
}

/// `{"type":"reset","channel":..,"recovered":false,"epoch":..,"offset":<top>}`: the channel's
/// history was lost (new epoch); the client should reload from its own source of truth.
pub fn reset(channel: &str, epoch: &str, top: u64) -> String {
    let mut o = Obj::new("reset", 80 + channel.len() + epoch.len()).str_field("channel", channel);
    o.0.extend_from_slice(b",\"recovered\":false");
    o = o.str_field("epoch", epoch);
    o.0.extend_from_slice(format!(",\"offset\":{top}").as_bytes());
    o.finish()
}

/// The body of a history read: `"epoch":..,"offset":<top>,"messages":[{"offset":..,"data":..},..]`
/// appended to `o`. `data` items must be JSON text.
fn history_fields(mut o: Obj, epoch: &str, top: u64, messages: &[(u64, bytes::Bytes)]) -> Obj {
    o = o.str_field("epoch", epoch);
    o.0.extend_from_slice(format!(",\"offset\":{top},\"messages\":[").as_bytes());
    for (i, (offset, data)) in messages.iter().enumerate() {
        if i > 0 {
            o.0.push(b',');
        }
        o.0.extend_from_slice(format!("{{\"offset\":{offset},\"data\":").as_bytes());
        o.0.extend_from_slice(data);
        o.0.push(b'}');
    }
    o.0.push(b']');
    o
}

/// `{"type":"history","channel":..,"id":..,"epoch":..,"offset":<top>,"messages":[..]}`.
pub fn history_reply(
    channel: &str,
    id: Option<&RawValue>,
    epoch: &str,
    top: u64,
    messages: &[(u64, bytes::Bytes)],
) -> String {
    let size = messages.iter().map(|(_, d)| d.len() + 32).sum::<usize>();
    let o = Obj::new("history", 96 + size)
        .str_field("channel", channel)
        .id(id);
    history_fields(o, epoch, top, messages).finish()
}

/// `{"channel":..,"epoch":..,"offset":<top>,"messages":[..]}` for `GET /history`.
pub fn history_body(
    channel: &str,
    epoch: &str,
    top: u64,
    messages: &[(u64, bytes::Bytes)],
) -> String {
    let mut buf =
        Vec::with_capacity(96 + messages.iter().map(|(_, d)| d.len() + 32).sum::<usize>());
    buf.extend_from_slice(b"{\"channel\":");
    push_json_str(&mut buf, channel);
    let o = history_fields(Obj(buf), epoch, top, messages);
    o.finish()
}

/// `{"type":"pong","id":<id>}`, or `{"type":"pong"}` without an id.
pub fn pong(id: Option<&RawValue>) -> String {
    Obj::new("pong", 24 + id.map_or(0, |id| id.get().len()))
        .id(id)
        .finish()
}

/// `{"type":"error","id":<id>,"code":<code>,"message":<message>}`; no `"id"` key without an id.
/// `message` is escaped.
pub fn error(id: Option<&RawValue>, code: ErrorCode, message: &str) -> String {
    Obj::new(
        "error",
        64 + message.len() + id.map_or(0, |id| id.get().len()),
    )
    .id(id)
    .str_field("code", code.as_str())
    .str_field("message", message)
    .finish()
}

const MESSAGE_PREFIX: &[u8] = b"{\"type\":\"message\",\"channel\":\"";
const MESSAGE_MIDDLE: &[u8] = b"\",\"data\":";
const MESSAGE_SUFFIX: &[u8] = b"}";

/// Exact length in bytes of what [`write_message_json`] writes for these arguments (e.g. to size
/// a WebSocket frame header before the payload). O(1).
pub fn message_json_len(channel: &str, data: &[u8]) -> usize {
    MESSAGE_PREFIX.len() + channel.len() + MESSAGE_MIDDLE.len() + data.len() + MESSAGE_SUFFIX.len()
}

/// Append `{"type":"message","channel":<channel>,"data":<data>}` to `dst`.
///
/// Contract: `channel` is a valid channel name (so it is written without escaping; checked by
/// `debug_assert!`), and `data` is JSON text (from [`parse_command`] or [`payload_to_json`]).
/// Cost: one `reserve` plus four copies; writes exactly [`message_json_len`] bytes.
pub fn write_message_json(dst: &mut BytesMut, channel: &str, data: &[u8]) {
    debug_assert!(is_valid_channel(channel), "invalid channel {channel:?}");
    dst.reserve(message_json_len(channel, data));
    dst.extend_from_slice(MESSAGE_PREFIX);
    dst.extend_from_slice(channel.as_bytes());
    dst.extend_from_slice(MESSAGE_MIDDLE);
    dst.extend_from_slice(data);
    dst.extend_from_slice(MESSAGE_SUFFIX);
}

const NUMBERED_MIDDLE: &[u8] = b"\",\"offset\":";
const NUMBERED_DATA: &[u8] = b",\"data\":";

/// Exact length of [`write_numbered_message_json`]'s output.
pub fn numbered_message_json_len(channel: &str, offset: u64, data: &[u8]) -> usize {
    let digits = offset.checked_ilog10().unwrap_or(0) as usize + 1;
    MESSAGE_PREFIX.len()
        + channel.len()
        + NUMBERED_MIDDLE.len()
        + digits
        + NUMBERED_DATA.len()
        + data.len()
        + MESSAGE_SUFFIX.len()
}

/// Append `{"type":"message","channel":<channel>,"offset":<offset>,"data":<data>}` (a message of
/// a history channel). Same contract as [`write_message_json`].
pub fn write_numbered_message_json(dst: &mut BytesMut, channel: &str, offset: u64, data: &[u8]) {
    debug_assert!(is_valid_channel(channel), "invalid channel {channel:?}");
    dst.reserve(numbered_message_json_len(channel, offset, data));
    dst.extend_from_slice(MESSAGE_PREFIX);
    dst.extend_from_slice(channel.as_bytes());
    dst.extend_from_slice(NUMBERED_MIDDLE);
    // The decimal digits without allocating.
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = offset;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    dst.extend_from_slice(&digits[i..]);
    dst.extend_from_slice(NUMBERED_DATA);
    dst.extend_from_slice(data);
    dst.extend_from_slice(MESSAGE_SUFFIX);
}

/// Turn an arbitrary payload (e.g. from Redis) into JSON text that can be used as `data`:
///
/// - if it is valid UTF-8 and one valid JSON value (surrounding JSON whitespace allowed), the
///   value's text with that whitespace trimmed, borrowed;
/// - otherwise the *whole* payload as a JSON string literal, with invalid UTF-8 sequences
///   replaced by U+FFFD and `"`, `\` and control characters escaped.
///
/// Never produces broken JSON. Cost: a UTF-8 check and a non-allocating serde_json validation
/// pass; allocation only in the string fallback.
pub fn payload_to_json(payload: &[u8]) -> Cow<'_, [u8]> {
    let start = payload
        .iter()
        .position(|&b| !is_json_ws(b))
        .unwrap_or(payload.len());
    let end = payload
        .iter()
        .rposition(|&b| !is_json_ws(b))
        .map_or(start, |i| i + 1);
    let trimmed = &payload[start..end];
    // serde_json does not check UTF-8 inside strings it skips over, so check it first.
    if let Ok(text) = std::str::from_utf8(trimmed) {
        if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            return Cow::Borrowed(trimmed);
        }
    }
    let text = String::from_utf8_lossy(payload);
    let mut out = Vec::new();
    push_json_str(&mut out, &text);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn parse_ok(text: &str) -> Command<'_> {
        match parse_command(text.as_bytes()) {
            Ok(cmd) => cmd,
            Err(e) => panic!("{text:?} rejected: {e}"),
        }
    }

    fn parse_err(text: &str) -> CommandError<'_> {
        match parse_command(text.as_bytes()) {
            Ok(cmd) => panic!("{text:?} accepted as {cmd:?}"),
            Err(e) => e,
        }
    }

    fn value(text: &str) -> Value {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON {text:?}: {e}"))
    }

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn subscribe_and_unsubscribe() {
        match parse_ok(r#"{"type":"subscribe","channel":"news","id":1}"#) {
            Command::Subscribe { channel, id, .. } => {
                assert!(matches!(channel, Cow::Borrowed("news")));
                assert_eq!(id.unwrap().get(), "1");
            }
            other => panic!("{other:?}"),
        }
        match parse_ok(r#"{"type":"unsubscribe","channel":"a:b/c@d#e.f-g_h","id":"x"}"#) {
            Command::Unsubscribe { channel, id } => {
                assert_eq!(channel, "a:b/c@d#e.f-g_h");
                assert_eq!(id.unwrap().get(), r#""x""#);
            }
            other => panic!("{other:?}"),
        }
        // No id.
        let cmd = parse_ok(r#"{"channel":"n","type":"subscribe"}"#);
        assert!(matches!(cmd, Command::Subscribe { id: None, .. }));
        assert_eq!(cmd.channel(), Some("n"));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        match parse_ok(r#"{"type":"sub\u0073cribe","channel":"a\/b"}"#) {
            Command::Subscribe { channel, .. } => {
                assert!(matches!(channel, Cow::Owned(_)));
                assert_eq!(channel, "a/b");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publish_data_kinds() {
        let cases = [
            ("null", Value::Null),
            (r#"{"a":[1,2,{"b":null}]}"#, json!({"a":[1,2,{"b":null}]})),
            ("[1,\"two\",3.5]", json!([1, "two", 3.5])),
            (r#""hi \"there\"""#, json!("hi \"there\"")),
            ("-12.5e3", json!(-12.5e3)),
            ("true", json!(true)),
        ];
        for (data_text, expected) in cases {
            let text =
                format!(r#"{{"type":"publish","channel":"news","data":{data_text},"id":3}}"#);
            match parse_ok(&text) {
                Command::Publish { channel, data, id } => {
                    assert!(matches!(channel, Cow::Borrowed("news")));
                    assert_eq!(data.get(), data_text);
                    assert_eq!(value(data.get()), expected);
                    assert_eq!(id.unwrap().get(), "3");
                }
                other => panic!("{other:?}"),
            }
        }
        // Data text is verbatim, without the surrounding whitespace.
        match parse_ok("{ \"type\" : \"publish\" , \"channel\":\"c\", \"data\" :  {\"a\" : 1}  }") {
            Command::Publish { data, id, .. } => {
                assert_eq!(data.get(), "{\"a\" : 1}");
                assert!(id.is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ping() {
        let cmd = parse_ok(r#"{"type":"ping","id":4}"#);
        assert!(matches!(cmd, Command::Ping { id: Some(id) } if id.get() == "4"));
        assert!(matches!(
            parse_ok(r#"{"type":"ping"}"#),
            Command::Ping { id: None }
        ));
        assert_eq!(cmd.channel(), None);
    }

    #[test]
    fn ids_are_kept_verbatim() {
        for id in [
            "0",
            "-1",
            "1.50",
            "1e400",
            "12345678901234567890123",
            r#""abc""#,
            r#""\u00e9\n""#,
        ] {
            let text = format!(r#"{{"type":"ping","id":{id}}}"#);
            let cmd = parse_ok(&text);
            let got = cmd.id().unwrap();
            assert_eq!(got.get(), id);
            assert_eq!(pong(Some(got)), format!(r#"{{"type":"pong","id":{id}}}"#));
        }
        // null id = no id.
        assert!(parse_ok(r#"{"type":"ping","id":null}"#).id().is_none());
    }

    #[test]
    fn id_of_wrong_type() {
        for id in ["true", "false", "{}", "[1]", r#"{"a":1}"#] {
            let text = format!(r#"{{"type":"subscribe","channel":"news","id":{id}}}"#);
            let e = parse_err(&text);
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.id.is_none());
        }
    }

    #[test]
    fn missing_fields_and_wrong_types_echo_id() {
        let cases = [
            r#"{"id":7}"#,
            r#"{"type":null,"id":7}"#,
            r#"{"type":5,"id":7}"#,
            r#"{"type":"subscribe","id":7}"#,
            r#"{"type":"unsubscribe","id":7}"#,
            r#"{"type":"subscribe","channel":null,"id":7}"#,
            r#"{"type":"subscribe","channel":["news"],"id":7}"#,
            r#"{"type":"publish","channel":"news","id":7}"#,
            r#"{"type":"publish","data":1,"id":7}"#,
            r#"{"type":"frobnicate","channel":"news","id":7}"#,
            r#"{"type":"Subscribe","channel":"news","id":7}"#,
        ];
        for text in cases {
            let e = parse_err(text);
            assert_eq!(e.code, ErrorCode::BadRequest, "{text}");
            assert_eq!(e.id.map(RawValue::get), Some("7"), "{text}");
            let reply = value(&e.to_json());
            assert_eq!(reply["type"], "error");
            assert_eq!(reply["id"], 7);
            assert_eq!(reply["code"], "bad_request");
            assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[test]
    fn not_json_or_not_object() {
        let cases = [
            "",
            "   ",
            "hello",
            "{",
            r#"{"type":"ping""#,
            r#"{"type":"ping"} x"#,
            r#"{"type":"ping",}"#,
            r#"["ping"]"#,
            r#"["subscribe","news",null,1]"#,
            "42",
            r#""ping""#,
            "null",
            r#"{"type":"ping","id":1,"id":2}"#,
        ];
        for text in cases {
            let e = parse_err(text);
            assert_eq!(e.code, ErrorCode::BadRequest, "{text:?}");
            assert!(e.id.is_none(), "{text:?}");
            assert!(!value(&e.to_json()).as_object().unwrap().contains_key("id"));
        }
        // Invalid UTF-8 in a field we keep is rejected, not a panic (the text of every kept
        // field is checked by serde_json; skipped fields are not, see `parse_command`).
        assert!(parse_command(b"{\"type\":\"ping\",\"id\":\"\xff\"}").is_err());
        assert!(
            parse_command(b"{\"type\":\"publish\",\"channel\":\"c\",\"data\":\"\xff\"}").is_err()
        );
        assert!(parse_command(b"{\"type\":\"\xc3\"}").is_err());
    }

    #[test]
    fn unknown_fields_ignored() {
        let cmd = parse_ok(r#"{"type":"ping","extra":{"deep":[1,2,3]},"v":"\u0000"}"#);
        assert!(matches!(cmd, Command::Ping { id: None }));
    }

    #[test]
    fn invalid_channel_names() {
        let long = "a".repeat(257);
        let max = "b".repeat(256);
        assert!(is_valid_channel(&max));
        assert!(!is_valid_channel(&long));
        let bad = [
            String::new(),
            long,
            "a b".into(),
            "caf\u{e9}".into(),
            "a\"b".into(),
            "a\\b".into(),
            "a\nb".into(),
            "a+b".into(),
            "a*".into(),
            "\u{1F600}".into(),
        ];
        for name in &bad {
            assert!(!is_valid_channel(name), "{name:?}");
            let channel_json = serde_json::to_string(name).unwrap();
            for kind in ["subscribe", "unsubscribe", "publish"] {
                let text =
                    format!(r#"{{"type":"{kind}","channel":{channel_json},"data":1,"id":"q"}}"#);
                let e = parse_err(&text);
                assert_eq!(e.code, ErrorCode::InvalidChannel, "{text}");
                assert_eq!(e.id.unwrap().get(), r#""q""#);
                let reply = value(&e.to_json());
                assert_eq!(reply["code"], "invalid_channel");
                assert_eq!(reply["id"], "q");
            }
        }
        for good in [
            "a",
            "A-Z_0.9:/@#",
            "user:42/inbox",
            "#",
            "$room",
            "dm:#17,42",
            &max,
        ] {
            assert!(is_valid_channel(good), "{good}");
        }
    }

    #[test]
    fn history_commands_and_frames() {
        match parse_ok(r#"{"type":"subscribe","channel":"c","since":{"offset":41,"epoch":"e"}}"#) {
            Command::Subscribe { since, .. } => assert_eq!(
                since,
                Some(crate::history::Since {
                    offset: 41,
                    epoch: "e".into()
                })
            ),
            other => panic!("{other:?}"),
        }
        for bad in [
            r#"{"type":"subscribe","channel":"c","since":41,"id":1}"#,
            r#"{"type":"subscribe","channel":"c","since":{"offset":-1,"epoch":"e"},"id":1}"#,
            r#"{"type":"subscribe","channel":"c","since":{"offset":1},"id":1}"#,
            r#"{"type":"history","channel":"c","since":"1","id":1}"#,
            r#"{"type":"history","channel":"c","limit":1.5,"id":1}"#,
        ] {
            let e = parse_err(bad);
            assert_eq!(
                (e.code, e.id.unwrap().get()),
                (ErrorCode::BadRequest, "1"),
                "{bad}"
            );
        }
        match parse_ok(r#"{"type":"history","channel":"c","since":41,"limit":100,"id":7}"#) {
            Command::History {
                since, limit, id, ..
            } => assert_eq!(
                (since, limit, id.unwrap().get()),
                (Some(41), Some(100), "7")
            ),
            other => panic!("{other:?}"),
        }
        let mut buf = BytesMut::new();
        write_numbered_message_json(&mut buf, "c", 42, b"{\"a\":1}");
        assert_eq!(
            &buf[..],
            br#"{"type":"message","channel":"c","offset":42,"data":{"a":1}}"#
        );
        for off in [0, 1, 9, 10, 99, 100, u64::MAX] {
            let mut buf = BytesMut::new();
            write_numbered_message_json(&mut buf, "ch", off, b"1");
            assert_eq!(
                buf.len(),
                numbered_message_json_len("ch", off, b"1"),
                "{off}"
            );
        }
        let one = raw("1");
        assert_eq!(
            subscribed_history("c", Some(&one), "ep", 41, Some(true)),
            r#"{"type":"subscribed","channel":"c","id":1,"epoch":"ep","offset":41,"recovered":true}"#
        );
        assert_eq!(
            subscribed_history("c", None, "ep", 0, None),
            r#"{"type":"subscribed","channel":"c","epoch":"ep","offset":0}"#
        );
        assert_eq!(
            reset("c", "e2", 3),
            r#"{"type":"reset","channel":"c","recovered":false,"epoch":"e2","offset":3}"#
        );
        let msgs = vec![
            (42, bytes::Bytes::from_static(b"1")),
            (43, bytes::Bytes::from_static(b"\"x\"")),
        ];
        assert_eq!(
            history_reply("c", Some(&one), "e", 43, &msgs),
            r#"{"type":"history","channel":"c","id":1,"epoch":"e","offset":43,"messages":[{"offset":42,"data":1},{"offset":43,"data":"x"}]}"#
        );
        let v: Value = serde_json::from_str(&history_body("c", "e", 43, &msgs)).unwrap();
        assert_eq!(
            v,
            json!({"channel":"c","epoch":"e","offset":43,"messages":[{"offset":42,"data":1},{"offset":43,"data":"x"}]})
        );
    }

    #[test]
    fn auth_commands() {
        match parse_ok(r#"{"type":"connect","token":"a.b.c","id":1}"#) {
            Command::Connect { token, id } => {
                assert_eq!(token.as_deref(), Some("a.b.c"));
                assert_eq!(id.unwrap().get(), "1");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_ok(r#"{"type":"connect"}"#),
            Command::Connect { token: None, .. }
        ));
        assert_eq!(
            parse_err(r#"{"type":"connect","token":5,"id":2}"#).code,
            ErrorCode::BadRequest
        );
        match parse_ok(r#"{"type":"refresh","token":"t"}"#) {
            Command::Refresh { channel, token, .. } => {
                assert_eq!((channel, &*token), (None, "t"));
            }
            other => panic!("{other:?}"),
        }
        match parse_ok(r#"{"type":"refresh","channel":"$r","token":"t"}"#) {
            Command::Refresh { channel, .. } => assert_eq!(channel.as_deref(), Some("$r")),
            other => panic!("{other:?}"),
        }
        let e = parse_err(r#"{"type":"refresh","id":3}"#);
        assert_eq!((e.code, e.id.unwrap().get()), (ErrorCode::BadRequest, "3"));
        match parse_ok(r#"{"type":"subscribe","channel":"$r","token":"t"}"#) {
            Command::Subscribe { token, .. } => assert_eq!(token.as_deref(), Some("t")),
            other => panic!("{other:?}"),
        }
        let one = raw("1");
        assert_eq!(
            connected(Some(&one), "42", Some(60)),
            r#"{"type":"connected","id":1,"user":"42","expires_in":60}"#
        );
        assert_eq!(
            connected(None, "", None),
            r#"{"type":"connected","user":"","expires_in":null}"#
        );
        assert_eq!(
            refreshed(None, Some("$r"), Some(5)),
            r#"{"type":"refreshed","channel":"$r","expires_in":5}"#
        );
        assert_eq!(
            unsubscribed_notice("$r", "token expired"),
            r#"{"type":"unsubscribed","channel":"$r","reason":"token expired"}"#
        );
    }

    #[test]
    fn reply_encoders_exact_text() {
        let one = raw("1");
        let s = raw(r#""req-2""#);
        assert_eq!(
            ack("subscribed", "news", Some(&one)),
            r#"{"type":"subscribed","channel":"news","id":1}"#
        );
        assert_eq!(
            ack("unsubscribed", "news", Some(&s)),
            r#"{"type":"unsubscribed","channel":"news","id":"req-2"}"#
        );
        assert_eq!(
            ack("published", "news", None),
            r#"{"type":"published","channel":"news"}"#
        );
        assert_eq!(pong(None), r#"{"type":"pong"}"#);
        assert_eq!(pong(Some(&one)), r#"{"type":"pong","id":1}"#);
        assert_eq!(
            welcome("c-1", "i-9"),
            r#"{"type":"welcome","connection":"c-1","instance":"i-9"}"#
        );
        assert_eq!(
            error(Some(&one), ErrorCode::TooManySubscriptions, "limit 100"),
            r#"{"type":"error","id":1,"code":"too_many_subscriptions","message":"limit 100"}"#
        );
        assert_eq!(
            error(None, ErrorCode::MessageTooLarge, "too big"),
            r#"{"type":"error","code":"message_too_large","message":"too big"}"#
        );
    }

    #[test]
    fn encoders_escape_strings() {
        let nasty = "q\"b\\s\n\r\t\u{8}\u{c}\u{1}\u{1f}é\u{2028}😀";
        let w = value(&welcome(nasty, nasty));
        assert_eq!(w["connection"], nasty);
        assert_eq!(w["instance"], nasty);
        let e = value(&error(None, ErrorCode::NotFound, nasty));
        assert_eq!(e["message"], nasty);
        assert_eq!(e["code"], "not_found");
        let a = value(&ack("subscribed", nasty, None));
        assert_eq!(a["channel"], nasty);
    }

    #[test]
    fn error_codes() {
        let all = [
            (ErrorCode::BadRequest, "bad_request"),
            (ErrorCode::InvalidChannel, "invalid_channel"),
            (ErrorCode::TooManySubscriptions, "too_many_subscriptions"),
            (ErrorCode::MessageTooLarge, "message_too_large"),
            (ErrorCode::Unavailable, "unavailable"),
            (ErrorCode::RateLimited, "rate_limited"),
            (ErrorCode::NotFound, "not_found"),
        ];
        for (code, name) in all {
            assert_eq!(code.as_str(), name);
            assert_eq!(code.to_string(), name);
            assert_eq!(value(&error(None, code, "m"))["code"], name);
        }
    }

    #[test]
    fn message_frames() {
        for data in [&b"null"[..], b"{\"a\":1}", b"[1,2]", b"\"s\"", b"-1.5"] {
            let mut buf = BytesMut::from(&b"prefix"[..]);
            write_message_json(&mut buf, "news:1", data);
            let written = &buf[6..];
            assert_eq!(written.len(), message_json_len("news:1", data));
            let v: Value = serde_json::from_slice(written).unwrap();
            assert_eq!(v["type"], "message");
            assert_eq!(v["channel"], "news:1");
            assert_eq!(v["data"], serde_json::from_slice::<Value>(data).unwrap());
        }
        let mut buf = BytesMut::new();
        write_message_json(&mut buf, "news", b"{\"x\":true}");
        assert_eq!(
            &buf[..],
            br#"{"type":"message","channel":"news","data":{"x":true}}"#
        );
    }

    #[test]
    fn payload_to_json_cases() {
        // Valid JSON: borrowed, trimmed.
        for (input, out) in [
            (&b"{\"a\":1}"[..], &b"{\"a\":1}"[..]),
            (b"  [1, 2]\n", b"[1, 2]"),
            (b"42", b"42"),
            (b"\t\"str\"\r\n", b"\"str\""),
            (b"null", b"null"),
        ] {
            let got = payload_to_json(input);
            assert!(matches!(got, Cow::Borrowed(_)));
            assert_eq!(&*got, out);
        }
        // Not JSON: a JSON string of the whole payload.
        for (input, expected) in [
            (&b"hello world"[..], "hello world"),
            (b"", ""),
            (b"   ", "   "),
            (b" {bad json ", " {bad json "),
            (b"1 2", "1 2"),
            (b"say \"hi\"\n", "say \"hi\"\n"),
            (b"NaN", "NaN"),
        ] {
            let got = payload_to_json(input);
            assert!(matches!(got, Cow::Owned(_)));
            assert_eq!(
                serde_json::from_slice::<Value>(&got).unwrap(),
                json!(expected)
            );
        }
        // Invalid UTF-8, including inside an otherwise valid JSON string.
        for input in [
            &b"\xff\xfe\x00"[..],
            b"\"\xff\"",
            b"{\"a\":\"\xc3\"}",
            b"\x80abc",
        ] {
            let got = payload_to_json(input);
            let s = std::str::from_utf8(&got).unwrap();
            assert!(serde_json::from_str::<Value>(s).unwrap().is_string());
        }
        // Validation skips values without serde_json's recursion limit, so deep nesting is
        // still recognised as JSON (it is valid JSON) and kept as is.
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        assert!(matches!(payload_to_json(deep.as_bytes()), Cow::Borrowed(_)));
        let unbalanced = format!("{}{}", "[".repeat(1000), "]".repeat(999));
        let got = payload_to_json(unbalanced.as_bytes());
        assert_eq!(
            serde_json::from_slice::<Value>(&got).unwrap(),
            json!(unbalanced)
        );
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            // Quarter-integers: exact in binary and short in decimal, so they survive a text
            // round trip without serde_json's `float_roundtrip` feature.
            any::<i32>().prop_map(|i| Value::from(f64::from(i) / 4.0)),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn payload_to_json_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let out = payload_to_json(&bytes);
            let text = std::str::from_utf8(&out).expect("output is UTF-8");
            prop_assert!(serde_json::from_str::<Value>(text).is_ok());
            if let Cow::Owned(_) = out {
                // Fallback: the string decodes to the lossy payload.
                let v: Value = serde_json::from_str(text).unwrap();
                let lossy = String::from_utf8_lossy(&bytes);
                prop_assert_eq!(v.as_str(), Some(&*lossy));
            }
        }

        #[test]
        fn payload_to_json_jsonish_text(s in "[ \t\n{}\\[\\]\",:0-9a-z\\\\.eE+-]{0,40}") {
            let out = payload_to_json(s.as_bytes());
            let text = std::str::from_utf8(&out).expect("output is UTF-8");
            let parsed = serde_json::from_str::<Value>(text);
            prop_assert!(parsed.is_ok());
            if serde_json::from_str::<Value>(&s).is_ok() {
                prop_assert_eq!(&*out, s.trim_matches([' ', '\t', '\n', '\r']).as_bytes());
            }
        }

        #[test]
        fn payload_to_json_keeps_valid_json(v in arb_json(), pretty in any::<bool>()) {
            let text = if pretty {
                format!("\n {} \n", serde_json::to_string_pretty(&v).unwrap())
            } else {
                serde_json::to_string(&v).unwrap()
            };
            let out = payload_to_json(text.as_bytes());
            prop_assert!(matches!(out, Cow::Borrowed(_)));
            prop_assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), v);
        }

        #[test]
        fn publish_roundtrip(v in arb_json(), channel in "[a-zA-Z0-9_.:/@#-]{1,40}", id in any::<u32>()) {
            let text = serde_json::to_string(
                &json!({"type": "publish", "channel": channel, "data": v, "id": id})
            ).unwrap();
            let cmd = parse_command(text.as_bytes()).unwrap();
            let Command::Publish { channel: ch, data, id: got_id } = cmd else {
                panic!("not a publish");
            };
            prop_assert_eq!(&*ch, channel.as_str());
            prop_assert_eq!(got_id.unwrap().get(), id.to_string());
            let mut buf = BytesMut::new();
            write_message_json(&mut buf, &ch, data.get().as_bytes());
            prop_assert_eq!(buf.len(), message_json_len(&ch, data.get().as_bytes()));
            let msg: Value = serde_json::from_slice(&buf).unwrap();
            prop_assert_eq!(&msg["data"], &v);
            prop_assert_eq!(&msg["channel"], &Value::from(channel));
        }

        #[test]
        fn parse_never_panics_and_errors_encode(s in "\\PC{0,60}|[{}\\[\\]\":, a-z0-9]{0,60}") {
            if let Err(e) = parse_command(s.as_bytes()) {
                let reply: Value = serde_json::from_str(&e.to_json()).unwrap();
                prop_assert_eq!(&reply["type"], "error");
            }
        }

        #[test]
        fn random_strings_encode_to_valid_json(a in any::<String>(), b in any::<String>()) {
            let w: Value = serde_json::from_str(&welcome(&a, &b)).unwrap();
            prop_assert_eq!(w["connection"].as_str(), Some(a.as_str()));
            let e: Value = serde_json::from_str(&error(None, ErrorCode::Unavailable, &b)).unwrap();
            prop_assert_eq!(e["message"].as_str(), Some(b.as_str()));
        }
    }

    #[test]
    fn publish_body() {
        let (c, d) = parse_publish_body(br#"{"channel":"news","data":{"a":[1,2]}}"#).unwrap();
        assert_eq!(c, "news");
        assert_eq!(d.get(), r#"{"a":[1,2]}"#);
        let (_, d) = parse_publish_body(br#"{"channel":"n","data":null}"#).unwrap();
        assert_eq!(d.get(), "null");
        let e = parse_publish_body(br#"{"channel":"bad name","data":1}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidChannel);
        let e = parse_publish_body(br#"{"channel":"n"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(parse_publish_body(b"[1]").is_err());
        assert!(parse_publish_body(b"nope").is_err());
    }
}
