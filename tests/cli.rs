//! The real `ringhub` binary: flags and environment variables parse (including `--cpus`, which
//! once crashed clap), the hub serves (also from a config file, with flags on top), and SIGTERM
//! shuts it down gracefully with exit status 0. Config file details: tests/config.rs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Start `ringhub serve` on a free port with extra args/env; returns the child and its address.
fn spawn(args: &[&str], env: &[(&str, &str)]) -> (std::process::Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringhub"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--log", "info"])
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn ringhub");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        assert!(Instant::now() < deadline, "hub did not report its address");
        let line = lines.next().expect("hub exited early").unwrap();
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the hub never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn sigterm_and_wait(mut child: std::process::Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) with the PID of a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "hub did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_with_flags_then_sigterm_exits_zero() {
    let (child, addr) = spawn(
        &[
            "--shards",
            "2",
            "--cpus",
            "0,0",
            "--idle-timeout",
            "30s",
            "--max-message-size",
            "128KiB",
        ],
        &[],
    );
    assert!(get(&addr, "/healthz").starts_with("HTTP/1.1 200"));
    let status = sigterm_and_wait(child);
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
}

/// `POST /publish` with `Authorization: Bearer <key>`: the response's status line.
fn publish_with_key(addr: &str, key: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = r#"{"channel":"c","data":1}"#;
    write!(
        s,
        "POST /publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
fn serve_with_a_config_file_and_flags_on_top() {
    let dir = std::env::temp_dir().join(format!("ringhub-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("hub.toml");
    // `listen` is overridden by spawn's --listen 127.0.0.1:0.
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:1\"\nshards = 1\ncpus = [0]\napi_key = \"file-key\"\n",
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let (child, addr) = spawn(&["--config", path], &[]);
    assert!(publish_with_key(&addr, "file-key").starts_with("HTTP/1.1 2"));
    assert!(publish_with_key(&addr, "other").starts_with("HTTP/1.1 401"));
    assert_eq!(sigterm_and_wait(child).code(), Some(0));
    // The environment overrides the file.
    let (child, addr) = spawn(
        &[],
        &[("RINGHUB_CONFIG", path), ("RINGHUB_API_KEY", "env-key")],
    );
    assert!(publish_with_key(&addr, "env-key").starts_with("HTTP/1.1 2"));
    assert!(publish_with_key(&addr, "file-key").starts_with("HTTP/1.1 401"));
    assert_eq!(sigterm_and_wait(child).code(), Some(0));
}

#[test]
fn environment_variables_configure_the_hub() {
    let (child, addr) = spawn(
        &[],
        &[
            ("RINGHUB_SHARDS", "1"),
            ("RINGHUB_CPUS", "0"),
            ("RINGHUB_API_KEY", "k"),
        ],
    );
    // The API key from the environment is enforced.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = r#"{"channel":"c","data":1}"#;
    write!(s, "POST /publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert_eq!(sigterm_and_wait(child).code(), Some(0));
}

#[test]
fn bad_flags_fail_with_a_clear_message() {
    for (args, expect) in [
        (vec!["--cpus", "0,x"], "core list"),
        (vec!["--idle-timeout", "5 parsecs"], "duration"),
        (vec!["--max-queued-bytes", "12 apples"], "size"),
        (vec!["--redis", "http://nope"], "redis://"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ringhub"))
            .arg("serve")
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}

#[test]
fn help_documents_every_flag_with_its_default() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringhub"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--shards",
        "--cpus",
        "--no-pin",
        "--max-queued-bytes",
        "--max-message-size",
        "--max-subscriptions",
        "--ping-interval",
        "--idle-timeout",
        "--handshake-timeout",
        "--shutdown-timeout",
        "--close-timeout",
        "--max-connections",
        "--api-key",
        "--redis",
        "--config",
        "--print-config",
        "--auth-secret",
        "--allowed-origins",
    ] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
    assert!(
        help.contains("[default: 25s]") && help.contains("[env: RINGHUB_SHARDS"),
        "{help}"
    );
    assert!(help.contains("[env: RINGHUB_CONFIG"), "{help}");
    for sub in [vec!["config", "check", "--help"], vec!["token", "--help"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_ringhub"))
            .args(&sub)
            .output()
            .unwrap();
        assert!(out.status.success(), "{sub:?}");
    }
}
