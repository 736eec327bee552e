//! The backend HTTP API that reaches connections: `POST /send` and `POST /disconnect`, by
//! connection id or by user, on this instance (through the shards' inboxes) or on any other
//! (Redis mode, through the registry and the target instance's inbox channel).
//!
//! The caller (`conn.rs`) has checked the API key; these functions only parse and route.

use crate::conn::err_body;
use crate::inbox::ShardMsg;
use crate::shard::ShardRef;

/// `POST /send` with `{"connection":"<id>","data":<JSON>}`: deliver
/// `{"type":"direct","data":..}` to that one connection, on this instance or (Redis mode)
/// any other, via the registry and the target instance's inbox channel.
pub async fn send(shard: &ShardRef, body: &[u8]) -> (u16, Vec<u8>) {
    use crate::registry::{parse_conn_id, RegEvent, SendOutcome};
    #[derive(serde::Deserialize)]
    struct SendBody<'a> {
        #[serde(borrow)]
        connection: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        data: Option<&'a serde_json::value::RawValue>,
    }
    let parsed: Result<SendBody, _> = serde_json::from_slice(body);
    let (connection, data) = match parsed {
        Ok(SendBody {
            connection: Some(c),
            data: Some(d),
        }) => (c, d),
        Ok(_) => {
            let msg = "expected {\"connection\":\"<id>\",\"data\":<JSON>}";
            return (400, err_body("bad_request", msg));
        }
        Err(e) => return (400, err_body("bad_request", &format!("invalid JSON: {e}"))),
    };
    let not_found = || (404, err_body("not_found", "no such connection"));
    let Some((instance, target, key, seq)) = parse_conn_id(&connection) else {
        return not_found();
    };
    let (local, peers, registry) = {
        let s = shard.borrow();
        (
            instance == &*s.instance,
            s.peers.clone(),
            s.shared.registry.clone(),
        )
    };
    if local {
        let Some(inbox) = peers.get(target) else {
            return not_found();
        };
        let (tx, rx) = futures_channel::oneshot::channel();
        inbox.push(ShardMsg::Direct {
            key,
            seq,
            data: bytes::Bytes::copy_from_slice(data.get().as_bytes()),
            reply: Some(tx),
        });
        return match rx.await {
            Ok(true) => (200, b"{\"ok\":true}".to_vec()),
            _ => not_found(),
        };
    }
    let Some(registry) = registry else {
        return not_found();
    };
    let (tx, rx) = futures_channel::oneshot::channel();
    let ev = RegEvent::Send {
        connection: connection.into_owned(),
        data: data.get().to_owned(),
        reply: tx,
    };
    if registry.push(ev).is_err() {
        return (503, err_body("unavailable", "the registry is overloaded"));
    }
    match rx.await {
        Ok(SendOutcome::Sent) => (200, b"{\"ok\":true}".to_vec()),
        Ok(SendOutcome::NotFound) => not_found(),
        _ => (
            503,
            err_body("unavailable", "the registry cannot reach Redis"),
        ),
    }
}


/// `POST /disconnect`: not built yet.
pub async fn disconnect(_shard: &ShardRef, _body: &[u8]) -> (u16, Vec<u8>) {
    (501, err_body("not_implemented", "not yet"))
}
