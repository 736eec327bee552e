//! The backend HTTP API that reaches connections: `POST /send` and `POST /disconnect`, by
//! connection id or by user, on this instance (through the shards' inboxes) or on any other
//! (Redis mode, through the registry and the target instance's inbox channel).
//!
//! | request | reply |
//! |---|---|
//! | `POST /send {"connection":"<id>","data":<JSON>}` | `{"ok":true}`; 404 if unknown |
//! | `POST /send {"user":"<user>","data":<JSON>}` | `{"ok":true,"connections":N}` (N may be 0) |
//! | `POST /disconnect {"connection":"<id>"}` | `{"ok":true,"connections":1}`; 404 if unknown |
//! | `POST /disconnect {"user":"<user>"}` | `{"ok":true,"connections":N}` (N may be 0) |
//!
//! `/disconnect` takes an optional `"code"` (4000–4999, default 4004) and `"reason"` (≤ 123
//! bytes, default "disconnected by the server"). A bad body or code is 400.
//!
//! By user, this instance's connections are reached through every shard's inbox and the other
//! instances' through the registry, which leaves this instance out: no connection gets a message
//! twice. The count of another instance's connections is what the registry lists for it (a
//! connection that closed meanwhile is counted but not reached).
//!
//! The caller (`conn.rs`) has checked the API key; these functions only parse and route.

use crate::conn::err_body;
use crate::inbox::ShardMsg;
use crate::registry::{parse_conn_id, Action, Fields, Reached, RegEvent, Request, Target};
use crate::shard::ShardRef;
use bytes::Bytes;
use std::sync::Arc;

type Reply = (u16, Vec<u8>);

/// `POST /send`: deliver `{"type":"direct","data":..}` to one connection or to every connection
/// of a user, on any instance.
pub async fn send(shard: &ShardRef, body: &[u8]) -> Reply {
    let usage = "expected {\"connection\":\"<id>\",\"data\":<JSON>} or {\"user\":\"<user>\",\"data\":<JSON>}";
    let (target, action) = match parse(body, usage, |f| {
        f.data
            .map(|d| Action::Send(d.get().to_owned()))
            .ok_or_else(|| "missing field `data`".to_owned())
    }) {
        Ok(ok) => ok,
        Err(reply) => return reply,
    };
    let by_user = matches!(target, Target::User(_));
    match reach(shard, target, action).await {
        // The reply to a send to one connection is as it always was.
        Ok(_) if !by_user => (200, b"{\"ok\":true}".to_vec()),
        Ok(n) => ok(n),
        Err(reply) => reply,
    }
}

/// `POST /disconnect`: close one connection or every connection of a user, on any instance.
pub async fn disconnect(shard: &ShardRef, body: &[u8]) -> Reply {
    let usage = "expected {\"connection\":\"<id>\"} or {\"user\":\"<user>\"}, with optional \"code\" (4000-4999) and \"reason\"";
    let (target, action) = match parse(body, usage, |f| {
        Action::disconnect(f.code, f.reason.as_deref())
    }) {
        Ok(ok) => ok,
        Err(reply) => return reply,
    };
    match reach(shard, target, action).await {
        Ok(n) => ok(n),
        Err(reply) => reply,
    }
}

/// Parse a request body into its target and action (400 with what is wrong).
fn parse(
    body: &[u8],
    usage: &str,
    action: impl FnOnce(&Fields) -> Result<Action, String>,
) -> Result<(Target, Action), Reply> {
    let bad = |why: &str| (400, err_body("bad_request", &format!("{why}; {usage}")));
    let fields: Fields = serde_json::from_slice(body)
        .map_err(|e| (400, err_body("bad_request", &format!("invalid JSON: {e}"))))?;
    let target = fields.target().map_err(bad)?;
    let action = action(&fields).map_err(|why| bad(&why))?;
    Ok((target, action))
}

fn ok(connections: usize) -> Reply {
    (
        200,
        format!("{{\"ok\":true,\"connections\":{connections}}}").into_bytes(),
    )
}

fn not_found() -> Reply {
    (404, err_body("not_found", "no such connection"))
}

/// Apply `action` to `target` wherever it is; the number of connections reached.
async fn reach(shard: &ShardRef, target: Target, action: Action) -> Result<usize, Reply> {
    let (me, peers, registry) = {
        let s = shard.borrow();
        (
            s.instance.clone(),
            s.peers.clone(),
            s.shared.registry.clone(),
        )
    };
    let ask_registry = |target: Target, action: Action| async {
        let Some(registry) = &registry else {
            return Ok(Reached::NotFound);
        };
        let (tx, rx) = futures_channel::oneshot::channel();
        let req = Request {
            target,
            action,
            reply: tx,
        };
        if registry.push(RegEvent::Request(req)).is_err() {
            return Err((503, err_body("unavailable", "the registry is overloaded")));
        }
        match rx.await {
            Ok(Reached::Unavailable) | Err(_) => Err((
                503,
                err_body("unavailable", "the registry cannot reach Redis"),
            )),
            Ok(reached) => Ok(reached),
        }
    };
    match target {
        Target::Connection(id) => {
            let Some((instance, target, key, seq)) = parse_conn_id(&id) else {
                return Err(not_found());
            };
            if instance != &*me {
                return match ask_registry(Target::Connection(id.clone()), action).await? {
                    Reached::Connections(n) if n > 0 => Ok(n),
                    _ => Err(not_found()),
                };
            }
            let Some(inbox) = peers.get(target) else {
                return Err(not_found());
            };
            let (tx, rx) = futures_channel::oneshot::channel();
            inbox.push(match action {
                Action::Send(data) => ShardMsg::Direct {
                    key,
                    seq,
                    data: Bytes::from(data),
                    reply: Some(tx),
                },
                Action::Disconnect { code, reason } => ShardMsg::Disconnect {
                    key,
                    seq,
                    code,
                    reason: Arc::from(reason),
                    reply: Some(tx),
                },
            });
            match rx.await {
                Ok(true) => Ok(1),
                _ => Err(not_found()),
            }
        }
        Target::User(user) => {
            // Other instances first: if Redis is unreachable, nobody got anything.
            let elsewhere = match ask_registry(Target::User(user.clone()), action.clone()).await? {
                Reached::Connections(n) => n,
                Reached::NotFound | Reached::Unavailable => 0,
            };
            let user: Arc<str> = Arc::from(user);
            let mut replies = Vec::with_capacity(peers.len());
            match action {
                Action::Send(data) => {
                    let data = Bytes::from(data);
                    for inbox in peers.iter() {
                        let (tx, rx) = futures_channel::oneshot::channel();
                        inbox.push(ShardMsg::UserDirect {
                            user: user.clone(),
                            data: data.clone(),
                            reply: tx,
                        });
                        replies.push(rx);
                    }
                }
                Action::Disconnect { code, reason } => {
                    let reason: Arc<str> = Arc::from(reason);
                    for inbox in peers.iter() {
                        let (tx, rx) = futures_channel::oneshot::channel();
                        inbox.push(ShardMsg::UserDisconnect {
                            user: user.clone(),
                            code,
                            reason: reason.clone(),
                            reply: Some(tx),
                        });
                        replies.push(rx);
                    }
                }
            }
            let mut here = 0;
            for rx in replies {
                here += rx.await.unwrap_or(0);
            }
            Ok(elsewhere + here)
        }
    }
}
