//! A connection's identity (user, token expiry, channel tokens) and the auth commands.
//! STUB: being written.

use serde_json::value::RawValue;

/// Who a connection is, once authenticated.
#[derive(Debug)]
pub struct Session {
    /// `sub` of the connection token; empty = anonymous.
    pub user: Box<str>,
    /// `info` claim (a JSON object), shown by presence.
    pub info: Option<Box<RawValue>>,
    /// Connection token expiry (Unix seconds), if any.
    pub exp: Option<u64>,
    /// Channels subscribed with a channel token, and that token's expiry (Unix seconds).
    pub channel_exp: Vec<(Box<str>, u64)>,
}
