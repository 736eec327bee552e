//! `POST /send` and `POST /disconnect` by connection and by user (`src/api.rs`), in embedded mode
//! and across two instances sharing a `redis-server` the test starts (the per-user registry keys
//! of `src/registry.rs`, docs/registry.md).
//!
//! Covered:
//! 1. embedded, open mode: `/send` by connection (and `"data":null`), `/disconnect` by connection
//!    with the default code and reason (4004), a custom code (4100) and a 123-byte UTF-8 reason,
//!    and every kind of bad body (400) or unknown connection (404);
//! 2. embedded, auth mode: `/send` and `/disconnect` by user reach the user's connections on
//!    every shard and no one else's; an unknown user is `connections: 0`;
//! 3. Redis mode, two instances, open mode: `/disconnect` by connection reaches a connection of
//!    the other instance, and the registry records anonymous connections with `"user":""`;
//! 4. Redis mode, two instances, auth mode: `ws:user:<user>`, `ws:instance:<id>:users` and the
//!    `user` of `ws:conn:<id>`; `/send` and `/disconnect` by user through either instance reach
//!    the connections on both (the count is the total); the user's set is gone once they closed;
//! 5. graceful shutdown of one instance removes its ids from the users' sets and its users set.
//!
//! The SIGKILL cleanup of the users' sets is in `tests/registry.rs` (it needs the real binary).
//!
//! Auth-mode clients authenticate with `{"type":"connect","token":<JWT>}`; the tokens are HS256,
//! minted here with `jsonwebtoken` (independently of the hub's own code).
//!
//! Every wait is bounded (10 s socket timeouts, explicit deadlines on polling loops).

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use common::*;
use redis_server::{RedisClient, RedisServer};
use ringhub::auth::AuthConfig;
use ringhub::config::RedisConfig;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// HMAC secret of the auth-mode hubs (long enough for any minimum a verifier may set).
const SECRET: &str = "ringhub-users-test-secret-0123456789abcdef";
/// How long registry state gets to settle.
const SETTLE: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// An HS256 connection token for `user`, valid for an hour.
fn token(user: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).expect("an HMAC key"),
    )
    .expect("mint a token")
}

fn auth_config() -> AuthConfig {
    AuthConfig {
        secret: Some(SECRET.into()),
        ..Default::default()
    }
}

/// Authenticate an open connection as `user` and wait for `connected`.
fn authenticate(c: &mut Client, user: &str) {
    c.send_json(json!({"type":"connect","token":token(user),"id":"auth"}));
    let v = c.recv_json();
    assert_eq!(v["type"], "connected", "connect as {user}: {v}");
    assert_eq!(v["user"], user, "{v}");
}

/// A connection authenticated as `user`.
fn connect_as(addr: SocketAddr, user: &str) -> Client {
    let mut c = Client::connect(addr);
    authenticate(&mut c, user);
    c
}

/// One connection per shard (shards 0 and 1), each authenticated as `user`.
fn connect_as_on_each_shard(addr: SocketAddr, user: &str) -> Vec<Client> {
    let mut clients = clients_on_each_shard(addr, 2);
    for c in &mut clients {
        authenticate(c, user);
    }
    clients
}

/// POST a JSON body; returns the status and the parsed reply.
fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = http(
        addr,
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer users-test-api-key"),
        ],
        body.as_bytes(),
    );
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("POST {path} {body}: reply {text:?} is not JSON: {e}"));
    (status, v)
}

/// `POST /send` or `POST /disconnect` that must succeed; the `connections` count it answers.
fn reached(addr: SocketAddr, path: &str, body: Value) -> u64 {
    let (status, v) = post(addr, path, &body.to_string());
    assert_eq!(status, 200, "POST {path} {body}: {v}");
    assert_eq!(v["ok"], true, "POST {path} {body}: {v}");
    v["connections"]
        .as_u64()
        .unwrap_or_else(|| panic!("POST {path} {body}: no count in {v}"))
}

/// The reply must be the JSON error `code` with HTTP `status`.
fn assert_error(what: &str, (status, v): (u16, Value), want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{what}: {v}");
    assert_eq!(v["ok"], false, "{what}: {v}");
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
}

/// Ping and require the very next frame to be the pong: the connection is open and nothing else
/// was queued for it.
fn ping_pong(c: &mut Client, id: &str) {
    c.send_text(&format!(r#"{{"type":"ping","id":"{id}"}}"#));
    assert_eq!(
        c.recv_text(),
        format!(r#"{{"type":"pong","id":"{id}"}}"#),
        "connection {}: expected only the pong",
        c.id
    );
}

/// Poll `check` every 25 ms until it returns `Ok`; fail after `timeout` with the last `Err`.
fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last seen: {last}"
            ),
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// A 2-shard hub in Redis mode (heartbeats every 200 ms), ready.
fn redis_hub(redis: &RedisServer, auth: bool) -> Hub {
    let cfg = RedisConfig::from_url(&redis.url()).expect("valid Redis URL");
    let hub = Hub::start(|c| {
        c.redis = Some(cfg);
        c.heartbeat_interval = Duration::from_millis(200);
        c.heartbeat_ttl = Duration::from_secs(5);
        c.connection_ttl = Duration::from_secs(60);
        if auth {
            {
                c.auth = Some(auth_config());
                c.api_key = Some("users-test-api-key".into());
            }
        }
    });
    eventually(WAIT, "the hub to become ready", || {
        match http(hub.addr, "GET", "/readyz", &[], b"") {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    hub
}

fn instance_of(hub: &Hub) -> String {
    hub.handle.as_ref().unwrap().instance_id().to_owned()
}

fn sorted_ids<'a>(clients: impl IntoIterator<Item = &'a Client>) -> Vec<String> {
    let mut ids: Vec<String> = clients.into_iter().map(|c| c.id.clone()).collect();
    ids.sort();
    ids
}

/// Wait until `SMEMBERS key` is exactly `want` (sorted).
fn wait_for_members(r: &mut RedisClient, key: &str, want: &[String]) {
    eventually(SETTLE, &format!("{key} to hold {want:?}"), || {
        let got = r.smembers(key);
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
}

/// The `user` field of `ws:conn:<id>`.
fn user_in_registry(r: &mut RedisClient, id: &str) -> Value {
    let key = format!("ws:conn:{id}");
    let text = r.get(&key).unwrap_or_else(|| panic!("{key} missing"));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{key}: {text:?}: {e}"));
    v["user"].clone()
}

// ------------------------------------------------------------------------------------------------
// 1. Embedded, open mode: by connection
// ------------------------------------------------------------------------------------------------

#[test]
fn send_by_connection_reaches_that_connection_only() {
    let hub = Hub::start(|_| {});
    let mut clients = clients_on_each_shard(hub.addr, 2);
    for i in 0..2 {
        let body = json!({"connection": clients[i].id, "data": {"n": i}}).to_string();
        let (status, v) = post(hub.addr, "/send", &body);
        assert_eq!((status, v), (200, json!({"ok": true})), "{body}");
        assert_eq!(
            clients[i].recv_text(),
            format!(r#"{{"type":"direct","data":{{"n":{i}}}}}"#)
        );
        ping_pong(&mut clients[1 - i], &format!("other{i}"));
    }
    // `null` is data too.
    let body = json!({"connection": clients[0].id, "data": null}).to_string();
    assert_eq!(post(hub.addr, "/send", &body).0, 200);
    assert_eq!(clients[0].recv_text(), r#"{"type":"direct","data":null}"#);
    assert_error(
        "no data",
        post(
            hub.addr,
            "/send",
            &json!({"connection": clients[0].id}).to_string(),
        ),
        400,
        "bad_request",
    );
    assert_error(
        "unknown connection",
        post(hub.addr, "/send", r#"{"connection":"nope-0-1-1","data":1}"#),
        404,
        "not_found",
    );
}

#[test]
fn disconnect_by_connection_closes_it_with_the_code_and_reason() {
    let hub = Hub::start(|_| {});
    // Default code and reason, on each shard (one of them through the other shard's inbox).
    for (i, mut c) in clients_on_each_shard(hub.addr, 2).into_iter().enumerate() {
        let n = reached(hub.addr, "/disconnect", json!({"connection": c.id}));
        assert_eq!(n, 1);
        assert_eq!(
            c.expect_close(),
            (4004, "disconnected by the server".to_string()),
            "shard {i}"
        );
        assert_eq!(4004, ringhub::auth::close::DISCONNECTED);
        // Gone: a second disconnect or a send finds nothing.
        let id = c.id.clone();
        drop(c);
        eventually(WAIT, "the closed connection to be unknown", || {
            match post(
                hub.addr,
                "/disconnect",
                &json!({"connection": id}).to_string(),
            ) {
                (404, _) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }

    // A custom code and reason; a reason of exactly 123 bytes of UTF-8.
    let mut c = Client::connect(hub.addr);
    let body = json!({"connection": c.id, "code": 4100, "reason": "kicked by an admin"});
    assert_eq!(reached(hub.addr, "/disconnect", body), 1);
    assert_eq!(c.expect_close(), (4100, "kicked by an admin".to_string()));
    let longest = format!("{}x", "é".repeat(61));
    assert_eq!(longest.len(), 123);
    let mut c = Client::connect(hub.addr);
    let body = json!({"connection": c.id, "code": 4999, "reason": longest});
    assert_eq!(reached(hub.addr, "/disconnect", body), 1);
    assert_eq!(c.expect_close(), (4999, longest.clone()));

    // Bad requests close nothing.
    let mut bystander = Client::connect(hub.addr);
    let id = bystander.id.clone();
    let too_long = format!("{longest}x");
    for (what, body) in [
        (
            "code 1000",
            json!({"connection": id, "code": 1000}).to_string(),
        ),
        (
            "code 3999",
            json!({"connection": id, "code": 3999}).to_string(),
        ),
        (
            "code 5000",
            json!({"connection": id, "code": 5000}).to_string(),
        ),
        (
            "code 70000",
            json!({"connection": id, "code": 70000}).to_string(),
        ),
        (
            "code as text",
            json!({"connection": id, "code": "4100"}).to_string(),
        ),
        (
            "reason of 124 bytes",
            json!({"connection": id, "reason": too_long}).to_string(),
        ),
        (
            "reason not text",
            json!({"connection": id, "reason": 5}).to_string(),
        ),
        (
            "both targets",
            json!({"connection": id, "user": "42"}).to_string(),
        ),
        ("no target", json!({"code": 4100}).to_string()),
        ("empty user", json!({"user": ""}).to_string()),
        ("user not text", json!({"user": 42}).to_string()),
        ("not JSON", "{".to_string()),
        ("not an object", "[1]".to_string()),
    ] {
        assert_error(
            what,
            post(hub.addr, "/disconnect", &body),
            400,
            "bad_request",
        );
    }
    ping_pong(&mut bystander, "still-open");
    assert_error(
        "unknown connection",
        post(hub.addr, "/disconnect", r#"{"connection":"nope-0-1-1"}"#),
        404,
        "not_found",
    );
    assert_error(
        "malformed id",
        post(hub.addr, "/disconnect", r#"{"connection":"x"}"#),
        404,
        "not_found",
    );
    // By user in open mode: nobody has a user.
    assert_eq!(reached(hub.addr, "/disconnect", json!({"user": "42"})), 0);
    assert_eq!(
        reached(hub.addr, "/send", json!({"user": "42", "data": 1})),
        0
    );
    ping_pong(&mut bystander, "still-open-2");
}

// ------------------------------------------------------------------------------------------------
// 2. Embedded, auth mode: by user
// ------------------------------------------------------------------------------------------------

#[test]
fn send_and_disconnect_by_user_reach_every_shard() {
    let hub = Hub::start(|c| {
        c.auth = Some(auth_config());
        c.api_key = Some("users-test-api-key".into());
    });
    let mut mine = connect_as_on_each_shard(hub.addr, "42");
    mine.push(connect_as(hub.addr, "42"));
    let mut other = connect_as(hub.addr, "7");

    let n = reached(
        hub.addr,
        "/send",
        json!({"user": "42", "data": {"hi": [1, 2]}}),
    );
    assert_eq!(n, 3);
    for c in &mut mine {
        assert_eq!(c.recv_text(), r#"{"type":"direct","data":{"hi":[1,2]}}"#);
    }
    ping_pong(&mut other, "not-42");
    assert_eq!(
        reached(hub.addr, "/send", json!({"user": "nobody", "data": 1})),
        0
    );
    // By connection still works in auth mode.
    let body = json!({"connection": other.id, "data": "just you"}).to_string();
    assert_eq!(post(hub.addr, "/send", &body).0, 200);
    assert_eq!(other.recv_text(), r#"{"type":"direct","data":"just you"}"#);

    let body = json!({"user": "42", "reason": "account suspended"});
    assert_eq!(reached(hub.addr, "/disconnect", body), 3);
    for c in &mut mine {
        assert_eq!(c.expect_close(), (4004, "account suspended".to_string()));
    }
    drop(mine);
    ping_pong(&mut other, "still-open");
    eventually(WAIT, "user 42 to have no connections", || {
        match reached(hub.addr, "/send", json!({"user": "42", "data": 1})) {
            0 => Ok(()),
            n => Err(format!("{n} connections")),
        }
    });
    assert_eq!(
        reached(hub.addr, "/disconnect", json!({"user": "7", "code": 4100})),
        1
    );
    assert_eq!(
        other.expect_close(),
        (4100, "disconnected by the server".to_string())
    );
}

// ------------------------------------------------------------------------------------------------
// 3. Redis mode, open: by connection across instances
// ------------------------------------------------------------------------------------------------

#[test]
fn disconnect_by_connection_reaches_another_instance() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let a = redis_hub(&redis, false);
    let b = redis_hub(&redis, false);
    let ib = instance_of(&b);
    let on_b = clients_on_each_shard(b.addr, 2);
    wait_for_members(
        &mut r,
        &format!("ws:instance:{ib}:conns"),
        &sorted_ids(&on_b),
    );
    for c in &on_b {
        assert_eq!(user_in_registry(&mut r, &c.id), "", "anonymous: empty user");
    }
    assert!(
        r.scan("ws:user:*").is_empty(),
        "no user sets for anonymous connections"
    );

    for (i, mut c) in on_b.into_iter().enumerate() {
        let reason = format!("from a, {i}");
        let body = json!({"connection": c.id, "code": 4100 + i, "reason": reason});
        assert_eq!(reached(a.addr, "/disconnect", body), 1);
        assert_eq!(c.expect_close(), (4100 + i as u16, reason));
    }
    wait_for_members(&mut r, &format!("ws:instance:{ib}:conns"), &[]);
    assert_error(
        "a closed connection of the other instance",
        post(
            a.addr,
            "/disconnect",
            &json!({"connection": format!("{ib}-0-1-1")}).to_string(),
        ),
        404,
        "not_found",
    );
}

// ------------------------------------------------------------------------------------------------
// 4. Redis mode, auth: by user across instances
// ------------------------------------------------------------------------------------------------

#[test]
fn send_and_disconnect_by_user_reach_both_instances() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let a = redis_hub(&redis, true);
    let b = redis_hub(&redis, true);
    let (ia, ib) = (instance_of(&a), instance_of(&b));

    let mut mine = connect_as_on_each_shard(a.addr, "42");
    mine.extend(connect_as_on_each_shard(b.addr, "42"));
    let mut seven = connect_as(b.addr, "7");
    let all_42 = sorted_ids(&mine);
    wait_for_members(&mut r, "ws:user:42", &all_42);
    wait_for_members(&mut r, "ws:user:7", std::slice::from_ref(&seven.id));
    wait_for_members(
        &mut r,
        &format!("ws:instance:{ia}:users"),
        &["42".to_string()],
    );
    wait_for_members(
        &mut r,
        &format!("ws:instance:{ib}:users"),
        &["42".to_string(), "7".to_string()],
    );
    for id in &all_42 {
        assert_eq!(user_in_registry(&mut r, id), "42", "{id}");
    }
    let ttl = r.pttl("ws:user:42");
    assert!(ttl > 0, "the user's set has a TTL: {ttl}");

    // Through either instance: every connection of the user, on both.
    for (via, name) in [(a.addr, "a"), (b.addr, "b")] {
        let n = reached(via, "/send", json!({"user": "42", "data": {"via": name}}));
        assert_eq!(n, 4, "via {name}");
        for c in &mut mine {
            assert_eq!(
                c.recv_text(),
                format!(r#"{{"type":"direct","data":{{"via":"{name}"}}}}"#),
                "{} via {name}",
                c.id
            );
        }
    }
    ping_pong(&mut seven, "not-42");
    for (i, c) in mine.iter_mut().enumerate() {
        ping_pong(c, &format!("once-{i}"));
    }
    assert_eq!(
        reached(a.addr, "/send", json!({"user": "nobody", "data": 1})),
        0
    );

    let body = json!({"user": "42", "code": 4100, "reason": "bye from b"});
    assert_eq!(reached(b.addr, "/disconnect", body), 4);
    for c in &mut mine {
        assert_eq!(
            c.expect_close(),
            (4100, "bye from b".to_string()),
            "{}",
            c.id
        );
    }
    drop(mine);
    eventually(SETTLE, "ws:user:42 to be gone", || {
        match r.exists(&["ws:user:42".to_string()]) {
            0 => Ok(()),
            _ => Err(format!("{:?}", r.smembers("ws:user:42"))),
        }
    });
    wait_for_members(&mut r, &format!("ws:instance:{ia}:users"), &[]);
    wait_for_members(
        &mut r,
        &format!("ws:instance:{ib}:users"),
        &["7".to_string()],
    );
    assert_eq!(
        reached(a.addr, "/send", json!({"user": "42", "data": 1})),
        0
    );

    // The user on the other instance only.
    assert_eq!(reached(a.addr, "/disconnect", json!({"user": "7"})), 1);
    assert_eq!(
        seven.expect_close(),
        (4004, "disconnected by the server".to_string())
    );
    drop(seven);
    eventually(SETTLE, "ws:user:7 to be gone", || {
        match r.exists(&["ws:user:7".to_string()]) {
            0 => Ok(()),
            _ => Err(format!("{:?}", r.smembers("ws:user:7"))),
        }
    });
}

// ------------------------------------------------------------------------------------------------
// 5. Graceful shutdown
// ------------------------------------------------------------------------------------------------

#[test]
fn graceful_shutdown_removes_the_instances_ids_from_users_sets() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let mut a = redis_hub(&redis, true);
    let b = redis_hub(&redis, true);
    let (ia, ib) = (instance_of(&a), instance_of(&b));
    let on_a: Vec<Client> = (0..3).map(|_| connect_as(a.addr, "42")).collect();
    let only_a = connect_as(a.addr, "9");
    let mut on_b = connect_as(b.addr, "42");
    let mut both = sorted_ids(&on_a);
    both.push(on_b.id.clone());
    both.sort();
    wait_for_members(&mut r, "ws:user:42", &both);
    wait_for_members(&mut r, "ws:user:9", std::slice::from_ref(&only_a.id));

    // Stop on another thread while this one lets the clients take their close frames.
    let handle = a.handle.take().unwrap();
    let stopper = thread::spawn(move || {
        handle.shutdown();
        handle.join();
    });
    for mut c in on_a.into_iter().chain([only_a]) {
        assert_eq!(c.expect_close().0, 1001);
    }
    stopper.join().unwrap();

    // join() returns after the registry removed the keys: no polling.
    assert_eq!(r.smembers("ws:user:42"), vec![on_b.id.clone()]);
    assert_eq!(r.exists(&["ws:user:9".to_string()]), 0);
    assert_eq!(r.exists(&[format!("ws:instance:{ia}:users")]), 0);
    assert_eq!(
        r.smembers(&format!("ws:instance:{ib}:users")),
        vec!["42".to_string()]
    );
    assert_eq!(
        reached(b.addr, "/send", json!({"user": "42", "data": 1})),
        1
    );
    assert_eq!(on_b.recv_text(), r#"{"type":"direct","data":1}"#);
}

// ------------------------------------------------------------------------------------------------
// 6. The full refresh after a reconnect repairs the users' sets
// ------------------------------------------------------------------------------------------------

#[test]
fn a_reconnecting_registry_repairs_the_users_sets() {
    let redis = RedisServer::start();
    let mut r = redis.client();
    let hub = redis_hub(&redis, true);
    let me = instance_of(&hub);
    let mine = vec![connect_as(hub.addr, "42"), connect_as(hub.addr, "42")];
    let seven = connect_as(hub.addr, "7");
    let users_key = format!("ws:instance:{me}:users");
    wait_for_members(&mut r, "ws:user:42", &sorted_ids(&mine));
    wait_for_members(&mut r, &users_key, &["42".to_string(), "7".to_string()]);

    // What a registry that lost events would leave: ids of ours that are gone, a user we no
    // longer have, a set Redis lost; and an id of another instance, which is not ours to touch.
    let stale = format!("{me}-0-999-1");
    let ghost = format!("{me}-1-7-7");
    let theirs = "someone-else-0-1-1".to_string();
    for (key, member) in [
        ("ws:user:42", stale.as_str()),
        ("ws:user:42", theirs.as_str()),
        ("ws:user:ghost", ghost.as_str()),
        (users_key.as_str(), "ghost"),
    ] {
        r.command(&[b"SADD", key.as_bytes(), member.as_bytes()]);
    }
    r.command(&[b"DEL", b"ws:user:7"]);

    // Drop every normal connection (the registry's among them): it reconnects and refreshes.
    r.command(&[b"CLIENT", b"KILL", b"TYPE", b"normal"]);
    let mut want_42 = sorted_ids(&mine);
    want_42.push(theirs);
    want_42.sort();
    wait_for_members(&mut r, "ws:user:42", &want_42);
    wait_for_members(&mut r, "ws:user:7", std::slice::from_ref(&seven.id));
    wait_for_members(&mut r, "ws:user:ghost", &[]);
    wait_for_members(&mut r, &users_key, &["42".to_string(), "7".to_string()]);
}
