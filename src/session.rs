//! A connection's identity and the auth commands: `connect` (token in the first message or in
//! the upgrade URL), `refresh` (connection and channel tokens), channel tokens on `subscribe`,
//! and the expiry checks the sweep runs.
//!
//! Everything here is a cold path (once per connect, subscribe with a token, refresh or sweep
//! tick); the per-message path only reads [`Session::user`] when a namespace rule needs it.
//!
//! Invariants:
//! - In auth mode a connection has a [`Session`] iff it authenticated; only then is it
//!   registered (with its user) and indexed in `Shard::users`.
//! - A refused token never leaves the connection half-authenticated: the error is sent, and for
//!   `connect` the connection is closed with the close code that says what to do
//!   ([`crate::auth::close`]).
//! - A connection's `sub` never changes: a refresh for another user closes it (4003).

use crate::auth::close;
use crate::auth::namespaces::Denial;
use crate::auth::token::{now_secs, ConnectionClaims, TokenError};
use crate::protocol::{self, ErrorCode};
use crate::shard::{Phase, Shard};
use serde_json::value::RawValue;
use std::time::Duration;

/// How long a `connect` with an unknown `kid` waits for the JWKS refetch.
const JWKS_WAIT: Duration = Duration::from_secs(5);

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

impl Session {
    /// Record (or replace) the expiry of a channel token.
    pub fn set_channel_exp(&mut self, channel: &str, exp: u64) {
        match self.channel_exp.iter_mut().find(|(c, _)| **c == *channel) {
            Some(entry) => entry.1 = exp,
            None => self.channel_exp.push((Box::from(channel), exp)),
        }
    }
}

/// The protocol error code and close code for a refused token.
fn token_codes(e: &TokenError) -> (ErrorCode, u16) {
    if e.is_expired() {
        (ErrorCode::TokenExpired, close::TOKEN_EXPIRED)
    } else {
        (ErrorCode::Unauthorized, close::UNAUTHORIZED)
    }
}

/// Seconds from `now` until `exp` (0 when past).
fn expires_in(exp: Option<u64>, now: u64) -> Option<u64> {
    exp.map(|e| e.saturating_sub(now))
}

impl Shard {
    /// The connection's user (`""` when anonymous or not authenticated).
    pub fn user_of(&self, key: usize) -> &str {
        self.conns[key].session.as_ref().map_or("", |s| &s.user)
    }

    /// Send the error for a permission denial.
    pub(crate) fn send_denial(&mut self, key: usize, id: Option<&RawValue>, d: Denial) {
        match d {
            Denial::UnknownNamespace(ns) => {
                let msg = format!("namespace {ns:?} is not declared in the configuration");
                self.send_error(key, id, ErrorCode::UnknownNamespace, &msg);
            }
            Denial::PermissionDenied(why) => {
                self.send_error(key, id, ErrorCode::PermissionDenied, why)
            }
        }
    }

    /// Refuse a `connect`: error reply, then close with the code that says what to do.
    fn refuse_connect(&mut self, key: usize, id: Option<&RawValue>, e: &TokenError) {
        self.metrics.auth_failures += 1;
        let (code, close_code) = token_codes(e);
        self.send_error(key, id, code, &e.to_string());
        let reason = if close_code == close::TOKEN_EXPIRED {
            "token expired"
        } else {
            "unauthorized"
        };
        self.close(key, close_code, reason, false);
    }

    /// `{"type":"connect","token":..}` (or the upgrade URL's token, with `id` None).
    pub fn handle_connect(&mut self, key: usize, token: Option<&str>, id: Option<&RawValue>) {
        let Some(verifier) = self.shared.verifier.clone() else {
            // Open mode: there are no identities; every connection is anonymous.
            self.send_text(key, &protocol::connected(id, "", None));
            return;
        };
        if self.conns[key].session.is_some() {
            self.send_error(
                key,
                id,
                ErrorCode::BadRequest,
                "already connected; use refresh for a new token",
            );
            return;
        }
        let auth = self.cfg.auth.as_ref().expect("verifier implies [auth]");
        let claims = match token {
            None if auth.anonymous_connect => Ok(ConnectionClaims {
                user: String::new(),
                exp: None,
                info: None,
                channels: Vec::new(),
            }),
            None => Err(TokenError::Malformed("a token is required".into())),
            Some(token) => verifier.verify_connection(token, now_secs()),
        };
        match claims {
            Ok(claims) => self.accept_connect(key, id, claims),
            Err(TokenError::UnknownKid(kid)) => {
                // The JWKS may have a new key: refetch (at most once per 30 s) off this thread
                // and hold the connection's commands until then.
                let waiting = verifier.jwks().and_then(|j| j.request_refresh());
                let (Some(rx), Some(this), Some(token)) = (waiting, self.this.upgrade(), token)
                else {
                    return self.refuse_connect(key, id, &TokenError::UnknownKid(kid));
                };
                let seq = self.conns[key].seq;
                self.conns[key].awaiting_ack = true;
                let token = token.to_owned();
                let id = id.map(|id| id.to_owned());
                monoio::spawn(async move {
                    let _ = monoio::time::timeout(JWKS_WAIT, rx).await;
                    let mut s = this.borrow_mut();
                    let live = s
                        .conns
                        .get(key)
                        .is_some_and(|c| c.seq == seq && c.phase == Phase::Open);
                    if !live {
                        return;
                    }
                    s.conns[key].awaiting_ack = false;
                    Shard::kick_conn(&mut s.conns[key]);
                    let id = id.as_deref();
                    match verifier.verify_connection(&token, now_secs()) {
                        Ok(claims) => s.accept_connect(key, id, claims),
                        Err(e) => s.refuse_connect(key, id, &e),
                    }
                });
            }
            Err(e) => self.refuse_connect(key, id, &e),
        }
    }

    /// A verified connection token: the connection becomes its user's.
    fn accept_connect(&mut self, key: usize, id: Option<&RawValue>, claims: ConnectionClaims) {
        let now = now_secs();
        let ConnectionClaims {
            user,
            exp,
            info,
            channels,
        } = claims;
        let user: Box<str> = user.into_boxed_str();
        if !user.is_empty() {
            self.users.entry(user.clone()).or_default().push(key);
        }
        self.conns[key].session = Some(Box::new(Session {
            user: user.clone(),
            info,
            exp,
            channel_exp: Vec::new(),
        }));
        self.metrics.auth_successes += 1;
        self.register_authenticated(key);
        self.send_text(key, &protocol::connected(id, &user, expires_in(exp, now)));
        // Channels the backend put in the token: subscribed as if asked. The backend signed
        // them, so namespace rules are not applied; names and the subscription limit are.
        for channel in channels {
            if !protocol::is_valid_channel(&channel) {
                let msg = format!("token channel {channel:?} is not a valid channel name");
                self.send_error(key, None, ErrorCode::InvalidChannel, &msg);
                continue;
            }
            match self.policy.history(&channel) {
                Some(opts) => self.subscribe_history(key, &channel, None, None, opts, None),
                None => self.subscribe(key, &channel, None, None),
            }
        }
    }

    /// `{"type":"refresh","token":..}` (connection) or with `"channel"` (channel token).
    pub fn handle_refresh(
        &mut self,
        key: usize,
        channel: Option<&str>,
        token: &str,
        id: Option<&RawValue>,
    ) {
        let Some(verifier) = self.shared.verifier.clone() else {
            self.send_error(
                key,
                id,
                ErrorCode::BadRequest,
                "this hub has no [auth]: there is nothing to refresh",
            );
            return;
        };
        let now = now_secs();
        let user = self.user_of(key).to_owned();
        match channel {
            None => match verifier.verify_connection(token, now) {
                Ok(claims) if claims.user != user => {
                    self.metrics.auth_failures += 1;
                    self.send_error(
                        key,
                        id,
                        ErrorCode::PermissionDenied,
                        "the new token is for another user",
                    );
                    self.close(
                        key,
                        close::FORBIDDEN,
                        "refresh with another user's token",
                        false,
                    );
                }
                Ok(claims) => {
                    if let Some(s) = self.conns[key].session.as_mut() {
                        s.exp = claims.exp;
                        if claims.info.is_some() {
                            s.info = claims.info;
                        }
                    }
                    let reply = protocol::refreshed(id, None, expires_in(claims.exp, now));
                    self.send_text(key, &reply);
                }
                Err(e) => {
                    // The current token stays valid until it expires.
                    self.metrics.auth_failures += 1;
                    self.send_error(key, id, token_codes(&e).0, &e.to_string());
                }
            },
            Some(channel) => {
                if !self.topics.is_subscribed(key, channel) {
                    let msg = "not subscribed to this channel";
                    self.send_error(key, id, ErrorCode::BadRequest, msg);
                    return;
                }
                match self.check_channel_token(&verifier, key, channel, token, now) {
                    Ok(exp) => {
                        if let Some(s) = self.conns[key].session.as_mut() {
                            s.set_channel_exp(channel, exp);
                        }
                        let reply =
                            protocol::refreshed(id, Some(channel), expires_in(Some(exp), now));
                        self.send_text(key, &reply);
                    }
                    Err((code, msg)) => {
                        self.metrics.auth_failures += 1;
                        self.send_error(key, id, code, &msg);
                    }
                }
            }
        }
    }

    /// Verify a channel token for `key`'s user and `channel`. Ok: its expiry.
    fn check_channel_token(
        &self,
        verifier: &crate::auth::token::Verifier,
        key: usize,
        channel: &str,
        token: &str,
        now: u64,
    ) -> Result<u64, (ErrorCode, String)> {
        let claims = verifier
            .verify_channel(token, now)
            .map_err(|e| (token_codes(&e).0, e.to_string()))?;
        if claims.channel != channel {
            return Err((
                ErrorCode::Unauthorized,
                "the channel token is for another channel".into(),
            ));
        }
        if *claims.user != *self.user_of(key) {
            return Err((
                ErrorCode::Unauthorized,
                "the channel token is for another user".into(),
            ));
        }
        Ok(claims.exp)
    }

    /// Permission for a `subscribe` (with its channel token, if any). Ok: the channel token's
    /// expiry when one was given. Err: the error was sent.
    pub(crate) fn subscribe_allowed(
        &mut self,
        key: usize,
        channel: &str,
        token: Option<&str>,
        id: Option<&RawValue>,
    ) -> Result<Option<u64>, ()> {
        let mut exp = None;
        if let Some(token) = token {
            let Some(verifier) = self.shared.verifier.clone() else {
                let msg = "channel tokens need [auth] in the configuration";
                self.send_error(key, id, ErrorCode::Unauthorized, msg);
                return Err(());
            };
            match self.check_channel_token(&verifier, key, channel, token, now_secs()) {
                Ok(e) => exp = Some(e),
                Err((code, msg)) => {
                    self.metrics.auth_failures += 1;
                    self.send_error(key, id, code, &msg);
                    return Err(());
                }
            }
        }
        let user = self.user_of(key);
        match self.policy.check_subscribe(channel, user, exp.is_some()) {
            Ok(()) => Ok(exp),
            Err(d) => {
                self.send_denial(key, id, d);
                Err(())
            }
        }
    }

    /// Sweep part for auth mode: close connections that did not authenticate in time or whose
    /// token expired (plus the grace period) without a refresh, and end subscriptions whose
    /// channel token expired. Cost: one pass over the connections per tick, only in auth mode.
    pub(crate) fn sweep_auth(&mut self, now_tick: u32) {
        let Some(auth) = self.cfg.auth.as_ref() else {
            return;
        };
        // Tokens are accepted up to `leeway` after `exp`: never close one sooner than that.
        let grace = auth.expiry_grace.max(auth.leeway).as_secs();
        let now = now_secs();
        let mut late = Vec::new();
        let mut expired = Vec::new();
        let mut channels = Vec::new();
        for (key, c) in self.conns.iter() {
            if c.phase != Phase::Open || !c.upgraded || c.echo {
                continue;
            }
            match &c.session {
                None => {
                    if now_tick.wrapping_sub(c.deadline) as i32 >= 0 && !c.awaiting_ack {
                        late.push(key);
                    }
                }
                Some(s) => {
                    if s.exp.is_some_and(|exp| exp.saturating_add(grace) < now) {
                        expired.push(key);
                    } else {
                        for (channel, exp) in &s.channel_exp {
                            if exp.saturating_add(grace) < now {
                                channels.push((key, channel.clone()));
                            }
                        }
                    }
                }
            }
        }
        for key in late {
            self.metrics.auth_failures += 1;
            let reason = "no connect within the auth timeout";
            self.close(key, close::UNAUTHORIZED, reason, false);
        }
        for key in expired {
            self.metrics.expiry_closes += 1;
            let reason = "token expired, reconnect with a new token";
            self.close(key, close::TOKEN_EXPIRED, reason, false);
        }
        for (key, channel) in channels {
            if let crate::topics::Unsubscribed::Removed { last: true } =
                self.topics.unsubscribe(key, &channel)
            {
                self.broker.last_unsubscribed(&channel);
            }
            if let Some(s) = self.conns[key].session.as_mut() {
                s.channel_exp.retain(|(c, _)| *c != channel);
            }
            if !self.holds.is_empty() {
                self.drop_holds(key, Some(&channel));
            }
            let notice = protocol::unsubscribed_notice(&channel, "token expired");
            self.send_text(key, &notice);
        }
    }
}
