//! Authentication and permissions on the wire: a real hub (`ringhub::server::start` on
//! 127.0.0.1:0) with `[auth]` configured, real WebSocket clients (tungstenite), real tokens
//! (HMAC, RSA, ECDSA, EdDSA keys from tests/keys/, minted with `ringhub::auth::token::mint`).
//!
//! Every hostile case checks the documented error code and close code, and that a healthy
//! authenticated subscriber on the same shard keeps receiving.

mod common;

use common::{http, metric, Client, Hub, WAIT};
use jsonwebtoken::Algorithm;
use ringhub::auth::namespaces::{Access, NamespaceRules, SubscribeRule};
use ringhub::auth::token::{mint, now_secs, MintKey};
use ringhub::auth::AuthConfig;
use ringhub::config::Config;
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;

const SECRET: &str = "test-secret-0123456789abcdef0123456789";
/// With `[auth]`, the backend API needs an API key.
const API_KEY: &str = "auth-test-api-key";

fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

fn hmac() -> MintKey {
    MintKey::Hmac {
        secret: SECRET.as_bytes().to_vec(),
        alg: Algorithm::HS256,
    }
}

fn pem(name: &str, alg: Algorithm) -> MintKey {
    MintKey::Pem {
        pem: std::fs::read(key_path(name)).unwrap(),
        alg,
    }
}

/// A connection token for `user`, valid for an hour.
fn token(user: &str) -> String {
    mint(
        &hmac(),
        &json!({"sub": user, "exp": now_secs() + 3600}),
        None,
    )
    .unwrap()
}

fn channel_token(user: &str, channel: &str, ttl: u64) -> String {
    let claims = json!({"sub": user, "channel": channel, "exp": now_secs() + ttl});
    mint(&hmac(), &claims, None).unwrap()
}

fn hmac_auth() -> AuthConfig {
    AuthConfig {
        secret: Some(SECRET.into()),
        ..AuthConfig::default()
    }
}

fn rules(subscribe: SubscribeRule, publish: Access) -> NamespaceRules {
    NamespaceRules {
        subscribe: Some(subscribe),
        publish: Some(publish),
        user_limited: false,
        ..Default::default()
    }
}

/// A hub with HMAC auth on `shards` shards.
fn auth_hub(shards: usize, tweak: impl FnOnce(&mut Config)) -> Hub {
    Hub::start(|c| {
        c.shards = shards;
        c.auth = Some(hmac_auth());
        c.api_key = Some(API_KEY.into());
        tweak(c);
    })
}

/// Send `connect` with `token`; return the reply.
fn connect_with(c: &mut Client, token: &str) -> Value {
    c.send_json(json!({"type":"connect","token":token,"id":1}));
    c.recv_json()
}

/// An authenticated client of `user`.
fn authed(addr: SocketAddr, user: &str) -> Client {
    let mut c = Client::connect(addr);
    let reply = connect_with(&mut c, &token(user));
    assert_eq!(reply["type"], "connected", "{reply}");
    assert_eq!(reply["user"], user);
    c
}

/// Expect an error reply with `code`.
fn expect_error(c: &mut Client, code: &str) -> Value {
    let v = c.recv_json();
    assert_eq!(v["type"], "error", "expected {code}, got {v}");
    assert_eq!(v["code"], code, "{v}");
    v
}

/// The next frame that is not a `message` (deliveries from the other client's publishes may
/// arrive at any time).
fn recv_reply(c: &mut Client) -> Value {
    loop {
        let v = c.recv_json();
        if v["type"] != "message" {
            return v;
        }
    }
}

/// Upgrade with a custom path+query and headers; Err(status) when refused.
fn upgrade(addr: SocketAddr, path: &str, headers: &[(&'static str, &str)]) -> Result<Client, u16> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut()
            .insert(*k, tungstenite::http::HeaderValue::from_str(v).unwrap());
    }
    let (ws, _) = match tungstenite::client::client_with_config(req, stream, None) {
        Ok(ok) => ok,
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            return Err(resp.status().as_u16())
        }
        Err(e) => panic!("upgrade: {e}"),
    };
    let mut c = Client {
        ws,
        id: String::new(),
        instance: String::new(),
    };
    let welcome = c.recv_json();
    assert_eq!(welcome["type"], "welcome");
    c.id = welcome["connection"].as_str().unwrap().to_string();
    Ok(c)
}

/// Publish from the backend API.
fn backend_publish(addr: SocketAddr, channel: &str, data: Value) {
    let body = json!({"channel": channel, "data": data}).to_string();
    let auth = format!("Bearer {API_KEY}");
    let headers = [("Authorization", auth.as_str())];
    let (status, resp) = http(addr, "POST", "/publish", &headers, body.as_bytes());
    assert_eq!(status, 200, "{resp}");
}

/// The healthy subscriber still gets messages: publish `n` from the backend and read it.
fn still_receives(addr: SocketAddr, healthy: &mut Client, channel: &str, n: u64) {
    backend_publish(addr, channel, json!(n));
    let v = healthy.recv_json();
    assert_eq!(v["type"], "message", "{v}");
    assert_eq!(v["data"], n);
}

#[test]
fn hmac_connect_subscribe_and_default_rules() {
    let hub = auth_hub(2, |_| {});
    let mut c = Client::connect(hub.addr);
    let reply = connect_with(&mut c, &token("42"));
    assert_eq!(reply["type"], "connected");
    assert_eq!(reply["id"], 1);
    assert_eq!(reply["user"], "42");
    let expires_in = reply["expires_in"].as_u64().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{reply}");
    // Default rules with [auth]: authenticated users subscribe, clients do not publish.
    c.subscribe("news");
    c.send_json(json!({"type":"publish","channel":"news","data":1,"id":2}));
    let e = expect_error(&mut c, "permission_denied");
    assert_eq!(e["id"], 2);
    backend_publish(hub.addr, "news", json!({"x": 1}));
    let m = c.recv_json();
    assert_eq!(
        (m["type"].as_str(), &m["data"]),
        (Some("message"), &json!({"x":1}))
    );
    // A second connect on an authenticated connection is a bad request.
    c.send_json(json!({"type":"connect","token":token("42"),"id":3}));
    expect_error(&mut c, "bad_request");
    assert!(metric(hub.addr, "ringhub_auth_successes_total") >= 1);
}

#[test]
fn only_connect_and_ping_before_connect() {
    let hub = auth_hub(1, |_| {});
    let mut c = Client::connect(hub.addr);
    for cmd in [
        json!({"type":"subscribe","channel":"news","id":1}),
        json!({"type":"publish","channel":"news","data":1,"id":2}),
        json!({"type":"unsubscribe","channel":"news","id":3}),
        json!({"type":"refresh","token":"x","id":4}),
    ] {
        c.send_json(cmd.clone());
        let e = expect_error(&mut c, "unauthorized");
        assert_eq!(e["id"], cmd["id"]);
    }
    c.send_json(json!({"type":"ping","id":5}));
    assert_eq!(c.recv_json()["type"], "pong");
    // Still open: connecting now works.
    assert_eq!(connect_with(&mut c, &token("7"))["type"], "connected");
    c.subscribe("news");
}

#[test]
fn public_key_families() {
    for (public, private, alg) in [
        ("rsa_public.pem", "rsa_private.pem", Algorithm::RS256),
        ("rsa_public.pem", "rsa_private.pem", Algorithm::PS256),
        ("ec_public.pem", "ec_private.pem", Algorithm::ES256),
        ("ec384_public.pem", "ec384_private.pem", Algorithm::ES384),
        ("ed_public.pem", "ed_private.pem", Algorithm::EdDSA),
    ] {
        let hub = Hub::start(|c| {
            c.shards = 1;
            c.api_key = Some(API_KEY.into());
            c.auth = Some(AuthConfig {
                public_key_files: vec![key_path(public)],
                ..AuthConfig::default()
            });
        });
        let claims = json!({"sub": "u1", "exp": now_secs() + 60});
        let t = mint(&pem(private, alg), &claims, None).unwrap();
        let mut c = Client::connect(hub.addr);
        let reply = connect_with(&mut c, &t);
        assert_eq!(reply["type"], "connected", "{alg:?}: {reply}");
        assert_eq!(reply["user"], "u1");
        // An HMAC token is refused: no secret is configured.
        let mut c = Client::connect(hub.addr);
        let reply = connect_with(&mut c, &token("u1"));
        assert_eq!(reply["code"], "unauthorized", "{alg:?}: {reply}");
        assert_eq!(c.expect_close().0, 4001);
    }
}

/// base64url without padding.
fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with a hand-made header and payload, signed with HS256 over SECRET.
fn hand_signed(header: &Value, payload: &Value, secret: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes())
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
}

#[test]
fn hostile_tokens_get_their_codes_and_the_shard_keeps_serving() {
    let hub = Hub::start(|c| {
        c.shards = 1;
        c.api_key = Some(API_KEY.into());
        c.auth = Some(AuthConfig {
            secret: Some(SECRET.into()),
            public_key_files: vec![key_path("rsa_public.pem")],
            algorithms: vec!["HS256".into(), "RS256".into()],
            audience: vec!["ringhub".into()],
            issuer: Some("https://issuer.test".into()),
            leeway: Duration::from_secs(5),
            max_token_size: 2048,
            ..AuthConfig::default()
        });
    });
    let now = now_secs();
    let good = json!({"sub":"ok","exp":now+60,"aud":"ringhub","iss":"https://issuer.test"});
    let mut healthy = Client::connect(hub.addr);
    let t = mint(&hmac(), &good, None).unwrap();
    assert_eq!(connect_with(&mut healthy, &t)["type"], "connected");
    healthy.subscribe("feed");
    let with = |patch: Value| {
        let mut claims = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    };
    let hs = |claims: Value| mint(&hmac(), &claims, None).unwrap();
    let rsa_public = std::fs::read(key_path("rsa_public.pem")).unwrap();
    let header = json!({"alg":"HS256","typ":"JWT"});
    let cases: Vec<(&str, String, &str, u16)> = vec![
        (
            "expired",
            hs(with(json!({"exp": now - 60}))),
            "token_expired",
            4002,
        ),
        (
            "nbf in the future",
            hs(with(json!({"nbf": now + 600}))),
            "unauthorized",
            4001,
        ),
        (
            "bad signature",
            {
                let t = hs(good.clone());
                let (head, sig) = t.rsplit_once('.').unwrap();
                let mut sig = sig.to_string();
                let flipped = if sig.starts_with('A') { "B" } else { "A" };
                sig.replace_range(0..1, flipped);
                format!("{head}.{sig}")
            },
            "unauthorized",
            4001,
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(good.to_string().as_bytes())
            ),
            "unauthorized",
            4001,
        ),
        (
            "HS256 signed with the RSA public key",
            hand_signed(&header, &good, &rsa_public),
            "unauthorized",
            4001,
        ),
        (
            "algorithm not configured (HS512)",
            mint(
                &MintKey::Hmac {
                    secret: SECRET.as_bytes().to_vec(),
                    alg: Algorithm::HS512,
                },
                &good,
                None,
            )
            .unwrap(),
            "unauthorized",
            4001,
        ),
        (
            "missing exp",
            hs(with(json!({"exp": null}))),
            "unauthorized",
            4001,
        ),
        (
            "exp as a string",
            hand_signed(
                &header,
                &with(json!({"exp": (now + 60).to_string()})),
                SECRET.as_bytes(),
            ),
            "unauthorized",
            4001,
        ),
        (
            "nbf as a string",
            hand_signed(&header, &with(json!({"nbf": "0"})), SECRET.as_bytes()),
            "unauthorized",
            4001,
        ),
        (
            "wrong aud",
            hs(with(json!({"aud": "other"}))),
            "unauthorized",
            4001,
        ),
        (
            "missing aud",
            hs(with(json!({"aud": null}))),
            "unauthorized",
            4001,
        ),
        (
            "wrong iss",
            hs(with(json!({"iss": "https://evil.test"}))),
            "unauthorized",
            4001,
        ),
        (
            "missing iss",
            hs(with(json!({"iss": null}))),
            "unauthorized",
            4001,
        ),
        (
            "sub not a string",
            hs(with(json!({"sub": 42}))),
            "unauthorized",
            4001,
        ),
        (
            "oversized",
            hs(with(json!({"pad": "x".repeat(3000)}))),
            "unauthorized",
            4001,
        ),
        ("garbage", "this is not a JWT".into(), "unauthorized", 4001),
        ("empty", String::new(), "unauthorized", 4001),
        (
            "channel token as connection token",
            hs(with(json!({"channel": "$room"}))),
            "unauthorized",
            4001,
        ),
    ];
    for (i, (what, t, code, close)) in cases.into_iter().enumerate() {
        let mut c = Client::connect(hub.addr);
        let reply = connect_with(&mut c, &t);
        assert_eq!(reply["type"], "error", "{what}: {reply}");
        assert_eq!(reply["code"], code, "{what}: {reply}");
        assert_eq!(reply["id"], 1, "{what}");
        let message = reply["message"].as_str().unwrap();
        assert!(
            t.len() < 20 || !message.contains(&t[t.len() - 20..]),
            "{what}: the token must not be echoed: {message}"
        );
        assert_eq!(c.expect_close().0, close, "{what}");
        still_receives(hub.addr, &mut healthy, "feed", i as u64);
    }
    assert!(metric(hub.addr, "ringhub_auth_failures_total") >= 18);
}

#[test]
fn channel_tokens() {
    let hub = auth_hub(1, |c| {
        c.namespaces.named.insert(
            "priv".into(),
            rules(SubscribeRule::Token, Access::Subscribers),
        );
        c.namespaces
            .named
            .insert("pub".into(), rules(SubscribeRule::Anonymous, Access::None));
    });
    let mut c = authed(hub.addr, "17");
    // `$` channels and `token` namespaces need a channel token.
    for channel in ["$room", "priv:1"] {
        c.send_json(json!({"type":"subscribe","channel":channel,"id":1}));
        expect_error(&mut c, "permission_denied");
        let t = channel_token("17", channel, 60);
        c.send_json(json!({"type":"subscribe","channel":channel,"token":t,"id":2}));
        assert_eq!(c.recv_json()["type"], "subscribed");
    }
    // For another channel, another user, expired, or a connection token: refused.
    let cases = [
        (channel_token("17", "$other", 60), "unauthorized"),
        (channel_token("18", "$room2", 60), "unauthorized"),
        (
            mint(
                &hmac(),
                &json!({"sub":"17","channel":"$room2","exp":now_secs()-100}),
                None,
            )
            .unwrap(),
            "token_expired",
        ),
        (token("17"), "unauthorized"),
    ];
    for (t, code) in cases {
        c.send_json(json!({"type":"subscribe","channel":"$room2","token":t,"id":3}));
        expect_error(&mut c, code);
    }
    // A channel token is never a connection token (checked in the hostile test) and the
    // subscriber may publish on the priv namespace (rule: subscribers).
    let echoed = c.publish_acked("priv:1", json!("hi"));
    assert_eq!(echoed.len(), 1, "{echoed:?}");
    assert_eq!(echoed[0]["data"], "hi");
}

#[test]
fn permission_matrix() {
    let subs = [
        SubscribeRule::Anonymous,
        SubscribeRule::Authenticated,
        SubscribeRule::Token,
        SubscribeRule::None,
    ];
    let pubs = [
        Access::None,
        Access::Subscribers,
        Access::Authenticated,
        Access::Anonymous,
    ];
    let hub = Hub::start(|c| {
        c.shards = 2;
        c.max_subscriptions = 100;
        c.api_key = Some(API_KEY.into());
        c.auth = Some(AuthConfig {
            anonymous_connect: true,
            ..hmac_auth()
        });
        for (i, s) in subs.iter().enumerate() {
            for (j, p) in pubs.iter().enumerate() {
                c.namespaces.named.insert(format!("n{i}{j}"), rules(*s, *p));
            }
        }
    });
    let mut anon = Client::connect(hub.addr);
    anon.send_json(json!({"type":"connect","id":1}));
    let r = anon.recv_json();
    assert_eq!(
        (r["type"].as_str(), r["user"].as_str()),
        (Some("connected"), Some(""))
    );
    let mut user = authed(hub.addr, "5");
    let mut checked = 0;
    for (i, s) in subs.iter().enumerate() {
        for (j, p) in pubs.iter().enumerate() {
            let channel = format!("n{i}{j}:x");
            for (who, c, authenticated) in
                [("anonymous", &mut anon, false), ("user", &mut user, true)]
            {
                // Subscribe.
                let may_subscribe = match s {
                    SubscribeRule::Anonymous => true,
                    SubscribeRule::Authenticated => authenticated,
                    SubscribeRule::Token | SubscribeRule::None => false,
                };
                c.send_json(json!({"type":"subscribe","channel":channel,"id":"s"}));
                let r = recv_reply(c);
                let subscribed = r["type"] == "subscribed";
                assert_eq!(subscribed, may_subscribe, "{who} subscribe {channel}: {r}");
                if !subscribed {
                    assert_eq!(r["code"], "permission_denied", "{r}");
                }
                // Publish (as a subscriber when the subscribe worked).
                // On private (`token`) channels only subscribers may publish, whatever the rule.
                let private_ok = *s != SubscribeRule::Token || subscribed;
                let may_publish = private_ok
                    && match p {
                        Access::None => false,
                        Access::Subscribers => subscribed,
                        Access::Authenticated => authenticated,
                        Access::Anonymous => true,
                    };
                c.send_json(json!({"type":"publish","channel":channel,"data":1,"id":"p"}));
                let r = recv_reply(c);
                assert_eq!(
                    r["type"] == "published",
                    may_publish,
                    "{who} publish {channel}: {r}"
                );
                if !may_publish {
                    assert_eq!(r["code"], "permission_denied", "{r}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 32);
    // Undeclared namespace; the default namespace (no ':') follows [channels] defaults.
    user.send_json(json!({"type":"subscribe","channel":"nope:x","id":9}));
    let e = expect_error(&mut user, "unknown_namespace");
    assert_eq!(e["id"], 9);
    user.subscribe("plain");
    anon.send_json(json!({"type":"subscribe","channel":"plain","id":9}));
    expect_error(&mut anon, "permission_denied");
}

#[test]
fn user_limited_channels() {
    let hub = auth_hub(2, |c| {
        c.namespaces.named.insert(
            "dm".into(),
            NamespaceRules {
                subscribe: Some(SubscribeRule::Authenticated),
                publish: Some(Access::Subscribers),
                user_limited: true,
                ..Default::default()
            },
        );
    });
    let mut a = authed(hub.addr, "17");
    let mut b = authed(hub.addr, "42");
    let mut eve = authed(hub.addr, "4");
    a.subscribe("dm:#17,42");
    b.subscribe("dm:#17,42");
    eve.send_json(json!({"type":"subscribe","channel":"dm:#17,42","id":1}));
    expect_error(&mut eve, "permission_denied");
    a.publish_acked("dm:#17,42", json!("hello"));
    let m = b.recv_json();
    assert_eq!(
        (m["channel"].as_str(), &m["data"]),
        (Some("dm:#17,42"), &json!("hello"))
    );
}

#[test]
fn refresh_and_expiry() {
    let hub = auth_hub(1, |c| {
        let a = c.auth.as_mut().unwrap();
        a.expiry_grace = Duration::from_secs(1);
        a.leeway = Duration::from_secs(0);
    });
    // Refresh extends the connection; a token for another user closes it with 4003.
    let short = |user: &str, ttl: u64| {
        mint(
            &hmac(),
            &json!({"sub": user, "exp": now_secs() + ttl}),
            None,
        )
        .unwrap()
    };
    let mut c = Client::connect(hub.addr);
    assert!(
        connect_with(&mut c, &short("9", 2))["expires_in"]
            .as_u64()
            .unwrap()
            <= 2
    );
    c.subscribe("news");
    c.send_json(json!({"type":"refresh","token":short("9", 3600),"id":2}));
    let r = c.recv_json();
    assert_eq!(r["type"], "refreshed", "{r}");
    assert!(r["expires_in"].as_u64().unwrap() > 3000);
    // A bad refresh token is an error; the connection stays.
    c.send_json(json!({"type":"refresh","token":"garbage","id":3}));
    expect_error(&mut c, "unauthorized");
    // After the old expiry plus grace the refreshed connection is still open.
    std::thread::sleep(Duration::from_millis(4500));
    still_receives(hub.addr, &mut c, "news", 1);
    c.send_json(json!({"type":"refresh","token":short("10", 3600),"id":4}));
    expect_error(&mut c, "permission_denied");
    assert_eq!(c.expect_close().0, 4003);

    // Not refreshed: closed with 4002 after exp + grace.
    let mut c = Client::connect(hub.addr);
    connect_with(&mut c, &short("9", 1));
    let start = Instant::now();
    let (code, reason) = c.expect_close();
    assert_eq!(code, 4002, "{reason}");
    assert!(start.elapsed() < Duration::from_secs(6));
    assert!(metric(hub.addr, "ringhub_expiry_closes_total") >= 1);

    // A channel token that expires ends its subscription with a notice.
    let mut c = authed(hub.addr, "9");
    let t = channel_token("9", "$room", 1);
    c.send_json(json!({"type":"subscribe","channel":"$room","token":t,"id":5}));
    assert_eq!(c.recv_json()["type"], "subscribed");
    let t2 = channel_token("9", "$keep", 2);
    c.send_json(json!({"type":"subscribe","channel":"$keep","token":t2,"id":6}));
    assert_eq!(c.recv_json()["type"], "subscribed");
    let t3 = channel_token("9", "$keep", 3600);
    c.send_json(json!({"type":"refresh","channel":"$keep","token":t3,"id":7}));
    let r = c.recv_json();
    assert_eq!(
        (r["type"].as_str(), r["channel"].as_str()),
        (Some("refreshed"), Some("$keep"))
    );
    let notice = c.recv_json();
    assert_eq!(notice["type"], "unsubscribed", "{notice}");
    assert_eq!(notice["channel"], "$room");
    assert_eq!(notice["reason"], "token expired");
    backend_publish(hub.addr, "$room", json!("gone"));
    backend_publish(hub.addr, "$keep", json!("kept"));
    let m = c.recv_json();
    assert_eq!(
        (m["channel"].as_str(), &m["data"]),
        (Some("$keep"), &json!("kept"))
    );
}

#[test]
fn auth_timeout_closes_with_4001() {
    let hub = auth_hub(1, |c| {
        c.auth.as_mut().unwrap().auth_timeout = Duration::from_secs(1);
    });
    let mut c = Client::connect(hub.addr);
    let start = Instant::now();
    assert_eq!(c.expect_close().0, 4001);
    assert!(start.elapsed() >= Duration::from_millis(900));
}

#[test]
fn query_token_and_origins() {
    let hub = auth_hub(1, |c| {
        c.allowed_origins = vec![
            "https://app.example.com".into(),
            "https://*.example.org".into(),
        ];
    });
    let t = token("q1");
    let mut c = upgrade(hub.addr, &format!("/ws?token={t}"), &[]).unwrap();
    let r = c.recv_json();
    assert_eq!(
        (r["type"].as_str(), r["user"].as_str()),
        (Some("connected"), Some("q1"))
    );
    c.subscribe("news");
    let mut bad = upgrade(hub.addr, "/ws?token=nope", &[]).unwrap();
    assert_eq!(bad.recv_json()["code"], "unauthorized");
    assert_eq!(bad.expect_close().0, 4001);
    // Origins: allowed exact and wildcard; others refused with 403 before any frame.
    assert!(upgrade(hub.addr, "/ws", &[("Origin", "https://app.example.com")]).is_ok());
    assert!(upgrade(hub.addr, "/ws", &[("Origin", "https://a.example.org")]).is_ok());
    assert_eq!(
        upgrade(hub.addr, "/ws", &[("Origin", "https://evil.test")]).err(),
        Some(403)
    );
    assert_eq!(
        upgrade(
            hub.addr,
            "/ws",
            &[("Origin", "https://app.example.com.evil.test")]
        )
        .err(),
        Some(403)
    );
    assert!(metric(hub.addr, "ringhub_origin_refusals_total") >= 2);

    let hub = auth_hub(1, |c| c.auth.as_mut().unwrap().query_token = false);
    let mut c = upgrade(hub.addr, &format!("/ws?token={t}"), &[]).unwrap();
    assert_eq!(c.recv_json()["code"], "unauthorized");
    assert_eq!(c.expect_close().0, 4001);
}

#[test]
fn token_channels_are_subscribed_at_connect() {
    let hub = auth_hub(2, |_| {});
    let claims =
        json!({"sub":"c1","exp":now_secs()+60,"channels":["a","b:c"],"info":{"name":"Ann"}});
    let t = mint(&hmac(), &claims, None).unwrap();
    let mut c = Client::connect(hub.addr);
    assert_eq!(connect_with(&mut c, &t)["type"], "connected");
    let mut acked: Vec<String> = (0..2)
        .map(|_| {
            let v = c.recv_json();
            assert_eq!(v["type"], "subscribed", "{v}");
            v["channel"].as_str().unwrap().to_string()
        })
        .collect();
    acked.sort();
    assert_eq!(acked, ["a", "b:c"]);
    backend_publish(hub.addr, "b:c", json!(5));
    assert_eq!(c.recv_json()["data"], 5);
}

#[test]
fn without_an_api_key_the_backend_api_is_closed() {
    let hub = Hub::start(|c| {
        c.shards = 1;
        c.auth = Some(hmac_auth());
    });
    for (method, path, body) in [
        ("POST", "/publish", r#"{"channel":"a","data":1}"#),
        ("POST", "/send", r#"{"user":"1","data":1}"#),
        ("POST", "/disconnect", r#"{"user":"1"}"#),
        ("GET", "/history?channel=a", ""),
    ] {
        let (status, text) = http(hub.addr, method, path, &[], body.as_bytes());
        assert_eq!(status, 401, "{method} {path}: {text}");
        assert!(text.contains("api_key"), "{text}");
    }
    // Open mode without a key: open, as before.
    let hub = Hub::start(|c| c.shards = 1);
    let (status, _) = http(
        hub.addr,
        "POST",
        "/publish",
        &[],
        br#"{"channel":"a","data":1}"#,
    );
    assert_eq!(status, 200);
}

#[test]
fn open_mode_is_unchanged_and_refuses_private_channels() {
    let hub = Hub::start(|c| c.shards = 1);
    let mut c = Client::connect(hub.addr);
    c.subscribe("a:b");
    c.publish_acked("a:b", json!(1));
    c.send_json(json!({"type":"connect","id":1}));
    let r = c.recv_json();
    assert_eq!(
        (r["type"].as_str(), r["user"].as_str()),
        (Some("connected"), Some(""))
    );
    c.send_json(json!({"type":"subscribe","channel":"$x","id":2}));
    expect_error(&mut c, "permission_denied");
}

/// A JWKS endpoint on a free loopback port: serves the current key set, counts requests, and
/// can be taken down (the listener is closed: connections are refused).
struct JwksServer {
    addr: SocketAddr,
    body: std::sync::Arc<std::sync::Mutex<String>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JwksServer {
    fn start(keys: &[Value]) -> JwksServer {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let body = std::sync::Arc::new(std::sync::Mutex::new(json!({"keys": keys}).to_string()));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, r, s) = (body.clone(), requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let mut conn = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                r.fetch_add(1, Ordering::SeqCst);
                let body = b.lock().unwrap().clone();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes());
            }
        });
        JwksServer {
            addr,
            body,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn set_keys(&self, keys: &[Value]) {
        *self.body.lock().unwrap() = json!({"keys": keys}).to_string();
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Close the listener: fetches fail with "connection refused".
    fn take_down(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.take_down();
    }
}

fn jwk(public: &str, kid: &str, alg: Algorithm) -> Value {
    let pem = std::fs::read(key_path(public)).unwrap();
    ringhub::auth::jwks::jwk_from_public_pem(&pem, kid, alg).unwrap()
}

#[test]
fn jwks_lookup_rotation_flood_and_outage() {
    let k1 = jwk("rsa_public.pem", "k1", Algorithm::RS256);
    let k2 = jwk("rsa2_public.pem", "k2", Algorithm::RS256);
    let k3 = jwk("ec_public.pem", "k3", Algorithm::ES256);
    let mut jwks = JwksServer::start(std::slice::from_ref(&k1));
    let url = format!("http://{}/.well-known/jwks.json", jwks.addr);
    let hub = Hub::start(|c| {
        c.shards = 1;
        c.api_key = Some(API_KEY.into());
        c.auth = Some(AuthConfig {
            jwks_url: Some(url),
            ..AuthConfig::default()
        });
    });
    assert_eq!(jwks.requests(), 1, "the key set is fetched at start");
    let signed = |private: &str, alg: Algorithm, kid: &str, user: &str| {
        let claims = json!({"sub": user, "exp": now_secs() + 60});
        mint(&pem(private, alg), &claims, Some(kid)).unwrap()
    };
    let mut healthy = Client::connect(hub.addr);
    let t = signed("rsa_private.pem", Algorithm::RS256, "k1", "h");
    assert_eq!(connect_with(&mut healthy, &t)["type"], "connected");
    healthy.subscribe("feed");

    // Rotation: the issuer publishes k2 and k3; the first token naming k2 makes the hub refetch.
    jwks.set_keys(&[k1.clone(), k2, k3]);
    let mut c = Client::connect(hub.addr);
    let t = signed("rsa2_private.pem", Algorithm::RS256, "k2", "u2");
    let r = connect_with(&mut c, &t);
    assert_eq!(
        (r["type"].as_str(), r["user"].as_str()),
        (Some("connected"), Some("u2")),
        "{r}"
    );
    assert_eq!(jwks.requests(), 2);
    let mut c = Client::connect(hub.addr);
    let t = signed("ec_private.pem", Algorithm::ES256, "k3", "u3");
    assert_eq!(
        connect_with(&mut c, &t)["type"],
        "connected",
        "k3 came with the same fetch"
    );
    // A token naming k1 but signed with another key is refused.
    let mut c = Client::connect(hub.addr);
    let t = signed("rsa2_private.pem", Algorithm::RS256, "k1", "x");
    assert_eq!(connect_with(&mut c, &t)["code"], "unauthorized");
    assert_eq!(c.expect_close().0, 4001);

    // A flood of unknown kids: refused cleanly, and no more than one fetch per 30 s.
    for i in 0..20 {
        let mut c = Client::connect(hub.addr);
        let t = signed(
            "rsa_private.pem",
            Algorithm::RS256,
            &format!("nope-{i}"),
            "f",
        );
        let r = connect_with(&mut c, &t);
        assert_eq!(r["code"], "unauthorized", "{r}");
        assert_eq!(c.expect_close().0, 4001);
    }
    still_receives(hub.addr, &mut healthy, "feed", 1);
    assert_eq!(jwks.requests(), 2, "the flood caused no fetch");

    // The JWKS URL goes down: the last good keys keep working, a new kid is refused cleanly.
    jwks.take_down();
    let mut c = Client::connect(hub.addr);
    let t = signed("rsa_private.pem", Algorithm::RS256, "k1", "after");
    assert_eq!(connect_with(&mut c, &t)["type"], "connected");
    let mut c = Client::connect(hub.addr);
    let t = signed("rsa_private.pem", Algorithm::RS256, "k9", "after");
    assert_eq!(connect_with(&mut c, &t)["code"], "unauthorized");
    assert_eq!(c.expect_close().0, 4001);
    still_receives(hub.addr, &mut healthy, "feed", 2);
}
