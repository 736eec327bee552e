//! The config file and the token tool, against the real binary: every key round-trips through
//! `ringhub config check`; errors name the key and the line, and `serve` exits before listening;
//! flags and environment variables override the file; the example is accepted; `ringhub token`
//! mints tokens that verify with the configured key.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a run of the binary left.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Run `ringhub ARGS` with only `env` among the `RINGHUB_*` variables; it must exit within 20 s.
fn ringhub(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringhub"));
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("RINGHUB_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn ringhub");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ringhub {args:?} did not exit: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// A fresh directory for one test's files.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringhub-config-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Every key with a value other than its default: (line in the file, line in the output).
/// `{dir}` is the test's directory.
const EVERY_KEY: &[(&str, &str)] = &[
    ("listen = \"0.0.0.0:9001\"", "listen = \"0.0.0.0:9001\""),
    ("shards = 3", "shards = 3"),
    ("cpus = \"0,2-3\"", "cpus = [0, 2, 3]"),
    ("no_pin = true", "no_pin = true"),
    ("max_queued_bytes = \"2MiB\"", "max_queued_bytes = \"2MiB\""),
    ("max_message_size = 4096", "max_message_size = \"4KiB\""),
    ("max_subscriptions = 7", "max_subscriptions = 7"),
    ("max_recovery = 8", "max_recovery = 8"),
    ("max_publish_rate = 9", "max_publish_rate = 9"),
    ("publish_burst = 11", "publish_burst = 11"),
    ("ping_interval = \"13s\"", "ping_interval = \"13s\""),
    ("idle_timeout = 17", "idle_timeout = \"17s\""),
    (
        "handshake_timeout = \"1500ms\"",
        "handshake_timeout = \"1500ms\"",
    ),
    ("shutdown_timeout = \"2m\"", "shutdown_timeout = \"2m\""),
    ("close_timeout = \"3s\"", "close_timeout = \"3s\""),
    ("max_connections = 19", "max_connections = 19"),
    ("max_http_body = \"8KiB\"", "max_http_body = \"8KiB\""),
    ("api_key = \"apikey-123\"", "api_key = \"<hidden>\""),
    ("instance_id = \"inst-a\"", "instance_id = \"inst-a\""),
    ("io_driver = \"epoll\"", "io_driver = \"epoll\""),
    ("echo = true", "echo = true"),
    (
        "redis = \"redis://r.example:6390/4\"",
        "redis = \"redis://r.example:6390/4\"",
    ),
    (
        "redis_password = \"redispw-123\"",
        "redis_password = \"<hidden>\"",
    ),
    ("redis_prefix = \"rh:\"", "redis_prefix = \"rh:\""),
    ("registry_core = 5", "registry_core = 5"),
    ("heartbeat_interval = \"4s\"", "heartbeat_interval = \"4s\""),
    ("heartbeat_ttl = \"12s\"", "heartbeat_ttl = \"12s\""),
    ("connection_ttl = \"1h\"", "connection_ttl = \"1h\""),
    ("log = \"debug\"", "log = \"debug\""),
    ("[auth]", "[auth]"),
    ("secret = \"inline-123\"", "secret = \"<hidden>\""),
    (
        "previous_secret = \"old-123\"",
        "previous_secret = \"<hidden>\"",
    ),
    (
        "public_key_files = [\"a.pem\", \"b.pem\"]",
        "public_key_files = [\"{dir}/a.pem\", \"{dir}/b.pem\"]",
    ),
    (
        "jwks_url = \"http://127.0.0.1:9/jwks.json\"",
        "jwks_url = \"http://127.0.0.1:9/jwks.json\"",
    ),
    (
        "algorithms = [\"HS256\", \"EdDSA\"]",
        "algorithms = [\"HS256\", \"EdDSA\"]",
    ),
    (
        "audience = [\"hub\", \"admin\"]",
        "audience = [\"hub\", \"admin\"]",
    ),
    (
        "issuer = \"https://idp.example\"",
        "issuer = \"https://idp.example\"",
    ),
    ("leeway = \"5s\"", "leeway = \"5s\""),
    ("require_exp = false", "require_exp = false"),
    ("query_token = false", "query_token = false"),
    ("auth_timeout = \"6s\"", "auth_timeout = \"6s\""),
    ("expiry_grace = \"7s\"", "expiry_grace = \"7s\""),
    ("max_token_size = \"4KiB\"", "max_token_size = \"4KiB\""),
    ("anonymous_connect = true", "anonymous_connect = true"),
    (
        "allowed_origins = [\"https://app.example.com\", \"https://*.example.org\"]",
        "allowed_origins = [\"https://app.example.com\", \"https://*.example.org\"]",
    ),
    ("[channels]", "[channels]"),
    ("subscribe = \"anonymous\"", "subscribe = \"anonymous\""),
    ("publish = \"subscribers\"", "publish = \"subscribers\""),
    ("user_limited = true", "user_limited = true"),
    ("[namespaces.chat]", "[namespaces.chat]"),
    ("subscribe = \"token\"", "subscribe = \"token\""),
    ("publish = \"authenticated\"", "publish = \"authenticated\""),
    ("history_size = 500", "history_size = 500"),
    ("history_ttl = \"10m\"", "history_ttl = \"10m\""),
    ("history_meta_ttl = \"2h\"", "history_meta_ttl = \"2h\""),
    ("history = \"authenticated\"", "history = \"authenticated\""),
    ("[namespaces.\"dm.v2\"]", "[namespaces.\"dm.v2\"]"),
    ("subscribe = \"none\"", "subscribe = \"none\""),
    ("publish = \"anonymous\"", "publish = \"anonymous\""),
    ("user_limited = true", "user_limited = true"),
];

/// The other HMAC secret sources (the hub takes one of secret, secret_file and secret_env).
const SECRET_SOURCES: &[(&str, &str)] = &[
    (
        "secret_file = \"secret.txt\"",
        "secret_file = \"{dir}/secret.txt\"",
    ),
    (
        "secret_env = \"RINGHUB_TEST_SECRET\"",
        "secret_env = \"RINGHUB_TEST_SECRET\"",
    ),
];

#[test]
fn every_key_round_trips_through_config_check() {
    let dir = temp_dir("every-key");
    let d = dir.display().to_string();
    write(
        &dir,
        "secret.txt",
        "file-secret-0123456789abcdef0123456789\n",
    );
    write(&dir, "a.pem", ED_PUBLIC);
    write(&dir, "b.pem", ED_PUBLIC);
    let text: String = EVERY_KEY
        .iter()
        .map(|(line, _)| format!("{line}\n"))
        .collect();
    let path = write(&dir, "every.toml", &text);
    let env = [("RINGHUB_TEST_SECRET", "env-secret")];
    let run = ringhub(&["config", "check", &path], &env);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // Each value, in order (so in its table).
    let mut lines = run.stdout.lines();
    for (_, expected) in EVERY_KEY {
        let expected = expected.replace("{dir}", &d);
        assert!(
            lines.any(|l| l == expected),
            "{expected:?} missing or out of order:\n{}",
            run.stdout
        );
    }
    for secret in [
        "apikey-123",
        "redispw-123",
        "inline-123",
        "old-123",
        "env-secret",
    ] {
        assert!(!run.stdout.contains(secret), "{secret} shown");
    }
    // The output is itself a config file, read back to the same configuration.
    let again = write(&dir, "again.toml", &run.stdout);
    let run2 = ringhub(&["config", "check", &again], &env);
    assert_eq!(run2.code, Some(0), "{}", run2.stderr);
    assert_eq!(run2.stdout, run.stdout);

    for (line, expected) in SECRET_SOURCES {
        let path = write(&dir, "source.toml", &format!("[auth]\n{line}\n"));
        let run = ringhub(&["config", "check", &path], &env);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let expected = expected.replace("{dir}", &d);
        assert!(has(&run.stdout, &expected), "{expected}:\n{}", run.stdout);
        assert!(!run.stdout.contains("env-secret") && !run.stdout.contains("file-secret"));
    }
}

#[test]
fn defaults_are_shown_for_every_key() {
    let dir = temp_dir("defaults");
    let path = write(&dir, "empty.toml", "");
    let run = ringhub(&["config", "check", &path], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for line in [
        "listen = \"127.0.0.1:8080\"",
        "max_queued_bytes = \"1MiB\"",
        "max_message_size = \"64KiB\"",
        "max_subscriptions = 1000",
        "max_publish_rate = 1000",
        "ping_interval = \"25s\"",
        "idle_timeout = \"1m\"",
        "io_driver = \"auto\"",
        "redis_prefix = \"ws:\"",
        "connection_ttl = \"2m\"",
        "log = \"info\"",
        "[channels]",
        "user_limited = false",
    ] {
        assert!(
            run.stdout.lines().any(|l| l == line),
            "{line}:\n{}",
            run.stdout
        );
    }
    // Unset optional keys are named too, and open mode is said.
    for (line, _) in EVERY_KEY.iter().take_while(|(l, _)| !l.starts_with('[')) {
        let key = line.split(' ').next().unwrap();
        assert!(
            run.stdout.contains(&format!("{key} = ")) || run.stdout.contains(&format!("# {key}:")),
            "{key} not shown:\n{}",
            run.stdout
        );
    }
    assert!(run.stdout.contains("open mode"), "{}", run.stdout);
}

#[test]
fn docs_describe_every_key() {
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    for (line, _) in EVERY_KEY.iter().chain(SECRET_SOURCES) {
        let key = line.split(' ').next().unwrap();
        let key = if key.starts_with("[namespaces.") {
            "[namespaces.NAME]"
        } else {
            key
        };
        assert!(
            docs.contains(&format!("`{key}`")),
            "docs/configuration.md lacks `{key}`"
        );
    }
}

/// A bad file: `config check` exits 2 and `serve` exits 2 before listening, both naming the file,
/// the line and the key.
fn assert_refused(dir: &std::path::Path, text: &str, expected: &str) {
    let path = write(dir, "bad.toml", text);
    let run = ringhub(&["config", "check", &path], &[]);
    assert_eq!(run.code, Some(2), "{text:?}: {}", run.stderr);
    let want = format!("ringhub: {path} {expected}");
    assert!(
        run.stderr.starts_with(&want),
        "{text:?}:\n{}\nwanted: {want}",
        run.stderr
    );
    assert!(run.stdout.is_empty());

    let run = ringhub(
        &["serve", "--config", &path, "--listen", "127.0.0.1:0"],
        &[],
    );
    assert_eq!(run.code, Some(2), "{text:?}: {}", run.stderr);
    assert!(run.stderr.starts_with(&want), "{text:?}:\n{}", run.stderr);
    assert!(
        !run.stderr.contains("addr="),
        "listened before refusing: {}",
        run.stderr
    );
}

#[test]
fn errors_name_the_key_and_the_line() {
    let dir = temp_dir("errors");
    write(&dir, "secret.txt", "not a PEM key\n");
    for (text, expected) in [
        (
            "listen = \"127.0.0.1:8080\"\n\n[auth]\nsecret = \"x\"\nbogus = true\n",
            "line 5: auth.bogus: unknown key `bogus`",
        ),
        (
            "shards = 2\nmax_subscriptions = \"lots\"\n",
            "line 2: max_subscriptions: invalid type: string \"lots\"",
        ),
        (
            "[namespaces.chat]\nhistory_size = 10\nhistory_ttl = \"soon\"\n",
            "line 3: namespaces.chat.history_ttl: invalid duration \"soon\"",
        ),
        (
            "[channels]\nhistory_size = -1\n",
            "line 2: channels.history_size:",
        ),
        (
            "# comment\n\n\n\n\n[auth]\nleeway = \"5 parsecs\"\nsecret = \"x\"\n",
            "line 7: auth.leeway: invalid duration \"5 parsecs\"",
        ),
        (
            "[channels]\npublish = \"none\"\n\n[namespaces.chat]\nsubscribe = \"everyone\"\n",
            "line 5: namespaces.chat.subscribe: invalid value \"everyone\": expected anonymous",
        ),
        (
            "idle_timeout = \"5 parsecs\"\n",
            "line 1: idle_timeout: invalid duration",
        ),
        (
            "[namespaces.\"a:b\"]\n",
            "line 1: namespaces.\"a:b\": invalid namespace name",
        ),
        ("listen = [\n", "line 1: "),
        (
            "\n[auth]\naudience = \"hub\"\n",
            "line 2: auth: no key configured (secret, secret_file, secret_env, public_key_files \
             or jwks_url)",
        ),
        (
            "heartbeat_interval = \"10s\"\nheartbeat_ttl = \"10s\"\n",
            "line 2: heartbeat_ttl: --heartbeat-ttl must be longer",
        ),
        (
            "[auth]\nsecret = \"a\"\nsecret_env = \"B\"\n",
            "line 3: auth.secret_env: set only one of secret, secret_file and secret_env",
        ),
        (
            "[auth]\njwks_url = \"https://idp.example/jwks\"\n",
            "line 2: auth.jwks_url: https is not supported",
        ),
        // Key loading: checked by `config check` (the hub reports it when loading its keys).
        (
            "[auth]\nsecret_file = \"missing.txt\"\n",
            "line 2: auth.secret_file: cannot read",
        ),
        (
            "[auth]\npublic_key_files = \"secret.txt\"\n",
            "line 2: auth.public_key_files: ",
        ),
        (
            "[auth]\nsecret = \"0123456789abcdef0123456789abcdef\"\nalgorithms = [\"RS256\"]\n",
            "line 3: auth.algorithms: RS256 is listed but no configured key",
        ),
    ] {
        if text.contains("secret_file") || text.contains("public_key") || text.contains("RS256") {
            let path = write(&dir, "bad.toml", text);
            let run = ringhub(&["config", "check", &path], &[]);
            assert_eq!(run.code, Some(2), "{}", run.stderr);
            assert!(
                run.stderr
                    .starts_with(&format!("ringhub: {path} {expected}")),
                "{}",
                run.stderr
            );
            continue;
        }
        assert_refused(&dir, text, expected);
    }
    let run = ringhub(&["config", "check", "/nonexistent/ringhub.toml"], &[]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("cannot read the config file"),
        "{}",
        run.stderr
    );
}

/// `serve ARGS --print-config` with `env`: the effective configuration.
fn effective(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut argv = vec!["serve"];
    argv.extend_from_slice(args);
    argv.push("--print-config");
    let run = ringhub(&argv, env);
    assert_eq!(run.code, Some(0), "{argv:?}: {}", run.stderr);
    run.stdout
}

fn has(out: &str, line: &str) -> bool {
    out.lines().any(|l| l == line)
}

#[test]
fn flags_and_environment_override_the_file() {
    let dir = temp_dir("precedence");
    let path = write(
        &dir,
        "hub.toml",
        "max_subscriptions = 2\nidle_timeout = \"9s\"\nmax_publish_rate = 7\necho = true\n\
         [auth]\nsecret = \"file-secret\"\nallowed_origins = [\"https://a.example\"]\n",
    );
    // File over defaults.
    let out = effective(&["--config", &path], &[]);
    for line in [
        "max_subscriptions = 2",
        "idle_timeout = \"9s\"",
        "max_publish_rate = 7",
        "echo = true",
        "allowed_origins = [\"https://a.example\"]",
        "max_message_size = \"64KiB\"",
    ] {
        assert!(has(&out, line), "{line}:\n{out}");
    }
    // Flag over environment over file; RINGHUB_CONFIG names the file.
    let out = effective(
        &[
            "--max-subscriptions",
            "5",
            "--allowed-origins",
            "https://b.example",
        ],
        &[
            ("RINGHUB_CONFIG", &path),
            ("RINGHUB_MAX_SUBSCRIPTIONS", "6"),
            ("RINGHUB_IDLE_TIMEOUT", "3s"),
            ("RINGHUB_ECHO", "false"),
        ],
    );
    for line in [
        "max_subscriptions = 5",
        "idle_timeout = \"3s\"",
        "max_publish_rate = 7",
        "echo = false",
        "allowed_origins = [\"https://b.example\"]",
        "secret = \"<hidden>\"",
    ] {
        assert!(has(&out, line), "{line}:\n{out}");
    }
    // Without a file, flags alone (as before).
    let out = effective(&["--max-subscriptions", "3", "--auth-secret", "s3"], &[]);
    assert!(
        has(&out, "max_subscriptions = 3") && has(&out, "[auth]"),
        "{out}"
    );
    assert!(!out.contains("s3\""), "{out}");
    // A flag can complete a file: the key comes from the environment.
    let partial = write(&dir, "partial.toml", "[auth]\naudience = \"hub\"\n");
    let out = effective(
        &["--config", &partial],
        &[("RINGHUB_AUTH_SECRET", "from-env")],
    );
    assert!(has(&out, "audience = [\"hub\"]"), "{out}");
}

#[test]
fn the_example_is_accepted() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/ringhub.toml");
    let run = ringhub(
        &["config", "check", example],
        &[(
            "RINGHUB_JWT_SECRET",
            "a-long-random-development-secret-0123456789",
        )],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    for ns in ["chat", "dm", "private", "news"] {
        assert!(
            run.stdout.contains(&format!("[namespaces.{ns}]")),
            "{}",
            run.stdout
        );
    }
    // Without the secret's variable: accepted, with a warning naming it.
    let run = ringhub(&["config", "check", example], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("auth.secret_env: RINGHUB_JWT_SECRET is not set"),
        "{}",
        run.stderr
    );
}

/// Decode base64url without padding.
fn base64url(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => panic!("not base64url: {c}"),
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &c in s.as_bytes() {
        acc = (acc << 6) | u32::from(value(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The token's header and payload.
fn parts(token: &str) -> (serde_json::Value, serde_json::Value) {
    let p: Vec<&str> = token.split('.').collect();
    assert_eq!(p.len(), 3, "{token}");
    assert!(!p[2].is_empty(), "signed");
    let json = |s: &str| serde_json::from_slice(&base64url(s)).unwrap();
    (json(p[0]), json(p[1]))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn mint(args: &[&str]) -> String {
    let mut argv = vec!["token"];
    argv.extend_from_slice(args);
    let run = ringhub(&argv, &[]);
    assert_eq!(run.code, Some(0), "{argv:?}: {}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 1, "one line: {}", run.stdout);
    run.stdout.trim_end().to_string()
}

#[test]
fn token_with_a_secret() {
    let token = mint(&[
        "--secret",
        "s3cret",
        "--user",
        "42",
        "--ttl",
        "1h",
        "--channel",
        "$room",
        "--info",
        r#"{"name":"Ada"}"#,
        "--kid",
        "k1",
        "--aud",
        "hub",
        "--iss",
        "me",
    ]);
    let (header, claims) = parts(&token);
    assert_eq!(header["alg"], "HS256");
    assert_eq!(header["kid"], "k1");
    assert_eq!(claims["sub"], "42");
    assert_eq!(claims["channel"], "$room");
    assert_eq!(claims["info"]["name"], "Ada");
    assert_eq!(
        (claims["aud"].as_str(), claims["iss"].as_str()),
        (Some("hub"), Some("me"))
    );
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 3600);
    assert!(iat.abs_diff(now()) < 60, "iat {iat}");
    // The signature verifies with the secret.
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_audience(&["hub"]);
    v.set_issuer(&["me"]);
    let key = jsonwebtoken::DecodingKey::from_secret(b"s3cret").unwrap();
    jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
    let wrong = jsonwebtoken::DecodingKey::from_secret(b"other").unwrap();
    assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &wrong, &v).is_err());

    // A connection token: no channel claim; HS512 on request.
    let (header, claims) = parts(&mint(&["--secret", "s", "--user", "7", "--alg", "HS512"]));
    assert_eq!(header["alg"], "HS512");
    assert!(claims.get("channel").is_none() && claims.get("aud").is_none());
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
}

#[test]
fn token_with_the_config_files_key() {
    let dir = temp_dir("token-config");
    let path = write(
        &dir,
        "hub.toml",
        "[auth]\nsecret = \"file-secret\"\naudience = [\"hub\", \"other\"]\nissuer = \"idp\"\n",
    );
    let token = mint(&["--config", &path, "--user", "9", "--ttl", "90s"]);
    let (_, claims) = parts(&token);
    assert_eq!(claims["sub"], "9");
    assert_eq!(
        (claims["aud"].as_str(), claims["iss"].as_str()),
        (Some("hub"), Some("idp"))
    );
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        90
    );
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_audience(&["hub"]);
    let key = jsonwebtoken::DecodingKey::from_secret(b"file-secret").unwrap();
    jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
}

/// A throw-away Ed25519 key pair for these tests only.
const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEINjLcRgcRr34dggM7wDY/hwvt12F6DqAU2mqS7E6/wW5
-----END PRIVATE KEY-----
";
const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA+uM7l0cj0Y20ltv3ag31Gdc6udVhYvXUvIr6hY3LQq8=
-----END PUBLIC KEY-----
";

#[test]
fn token_with_a_private_key() {
    let dir = temp_dir("token-key");
    let key = write(&dir, "ed.pem", ED_PRIVATE);
    let token = mint(&[
        "--key",
        &key,
        "--alg",
        "EdDSA",
        "--user",
        "5",
        "--channel",
        "priv:1",
    ]);
    let (header, claims) = parts(&token);
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(
        (claims["sub"].as_str(), claims["channel"].as_str()),
        (Some("5"), Some("priv:1"))
    );
    let public = jsonwebtoken::DecodingKey::from_ed_pem(ED_PUBLIC.as_bytes()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.validate_aud = false;
    jsonwebtoken::decode::<serde_json::Value>(&token, &public, &v).unwrap();
    // The algorithm is detected from the key.
    let token = mint(&["--key", &key, "--user", "5"]);
    assert_eq!(parts(&token).0["alg"], "EdDSA");
    jsonwebtoken::decode::<serde_json::Value>(&token, &public, &v).unwrap();
    // A key of another family than the algorithm is refused.
    let run = ringhub(
        &["token", "--key", &key, "--alg", "RS256", "--user", "5"],
        &[],
    );
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("RS256"), "{}", run.stderr);
}

#[test]
fn token_refuses_bad_requests() {
    for (args, expect) in [
        (vec!["--user", "1"], "--config"),
        (
            vec!["--user", "1", "--secret", "s", "--info", "[1]"],
            "JSON object",
        ),
        (
            vec!["--user", "1", "--secret", "s", "--alg", "RS256"],
            "not an HMAC algorithm",
        ),
        (
            vec!["--user", "1", "--secret", "s", "--channel", "a b"],
            "channel",
        ),
        (
            vec!["--user", "1", "--key", "/nonexistent.pem"],
            "cannot read",
        ),
        (
            vec![
                "--user", "1", "--secret", "s", "--key", "k.pem", "--alg", "EdDSA",
            ],
            "cannot be used",
        ),
    ] {
        let mut argv = vec!["token"];
        argv.extend_from_slice(&args);
        let run = ringhub(&argv, &[]);
        assert_ne!(run.code, Some(0), "{args:?}");
        assert!(run.stdout.is_empty(), "{args:?}");
        assert!(run.stderr.contains(expect), "{args:?}: {}", run.stderr);
    }
}
