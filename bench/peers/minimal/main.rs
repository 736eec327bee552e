//! `minimal-peer`: the benchmark suite's reference "minimal io_uring fan-out sender".
//!
//! One thread, one monoio runtime (io_uring where available), protocol v1 just far enough for
//! `ringhub-load`: upgrade on `GET /ws`, welcome, subscribe/unsubscribe/publish/ping, message
//! fan-out. What it keeps from a real hub is only the part that costs: each message frame is built
//! ONCE and a refcounted clone is queued per subscriber; each connection has a writer task that
//! hands everything queued for it to the kernel in one `writev` (io_uring), so a burst of messages
//! to one subscriber is coalesced. No limits beyond a 1 MiB outbox cut-off, no timers, no metrics.
//!
//! Usage: `minimal-peer PORT [CPU]` (listens on 127.0.0.1:PORT; pins to CPU if given).

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedWriteHalf, Splitable};
use monoio::net::{TcpListener, TcpStream};
use ringhub::codec::{self, Data, Message, OpCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Outbox bytes above which a subscriber is dropped (like ringhub's default `--max-queued-bytes`).
const MAX_QUEUED: usize = 1 << 20;

/// One connection's outgoing side, shared between fan-out and the connection's writer task.
#[derive(Default)]
struct Out {
    queue: Vec<Bytes>,
    queued: usize,
    waker: Option<Waker>,
    closed: bool,
}

type OutRef = Rc<RefCell<Out>>;

impl Out {
    /// Queue a frame; wake the writer if it was idle. Returns false if the connection is over budget.
    fn push(&mut self, frame: Bytes) -> bool {
        if self.closed {
            return true;
        }
        if self.queued + frame.len() > MAX_QUEUED {
            self.close();
            return false;
        }
        self.queued += frame.len();
        self.queue.push(frame);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        true
    }

    fn close(&mut self) {
        self.closed = true;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Everything the thread owns: channel → subscribers (connection id → outbox).
#[derive(Default)]
struct Hub {
    channels: HashMap<Box<str>, HashMap<u64, OutRef>>,
    instance: String,
    next_id: u64,
}

type HubRef = Rc<RefCell<Hub>>;

#[derive(Deserialize)]
struct Cmd<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    channel: Option<&'a str>,
    data: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
}

fn text_frame(json: &[u8]) -> Bytes {
    codec::encode_frame(OpCode::Data(Data::Text), json)
}

/// `{"type":"<kind>","channel":"<channel>"[,"id":<id>]}` (channel names are ASCII without quotes
/// in what ringhub-load sends; anything else is escaped through serde_json).
fn ack(kind: &str, channel: &str, id: Option<&RawValue>) -> Bytes {
    let ch = serde_json::to_string(channel).unwrap_or_default();
    let json = match id {
        Some(id) => format!(r#"{{"type":"{kind}","channel":{ch},"id":{}}}"#, id.get()),
        None => format!(r#"{{"type":"{kind}","channel":{ch}}}"#),
    };
    text_frame(json.as_bytes())
}

/// Deliver `data` on `channel`: one frame, one clone per subscriber.
fn publish(hub: &HubRef, channel: &str, data: &[u8]) {
    let hub = hub.borrow();
    let Some(subs) = hub.channels.get(channel) else {
        return;
    };
    let prefix = br#"{"type":"message","channel":"#;
    let ch = serde_json::to_string(channel).unwrap_or_default();
    let json_len = prefix.len() + ch.len() + 8 + data.len() + 1;
    let mut buf = BytesMut::with_capacity(codec::frame_header_len(json_len) + json_len);
    codec::write_frame_header(&mut buf, OpCode::Data(Data::Text), json_len);
    buf.extend_from_slice(prefix);
    buf.extend_from_slice(ch.as_bytes());
    buf.extend_from_slice(br#","data":"#);
    buf.extend_from_slice(data);
    buf.extend_from_slice(b"}");
    let frame = buf.freeze();
    for out in subs.values() {
        out.borrow_mut().push(frame.clone());
    }
}

/// The frames being written by one `writev`, with their iovecs: owned together by the operation.
struct Batch {
    frames: Vec<Bytes>,
    iov: Vec<libc::iovec>,
}

// SAFETY: `iov` points into `frames`, whose heap data does not move while the batch exists (the
// `Bytes` handles may move, their buffers do not); both are owned by the batch for the whole op.
unsafe impl monoio::buf::IoVecBuf for Batch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr()
    }
    fn read_iovec_len(&self) -> usize {
        self.iov.len()
    }
}

impl Batch {
    fn fill_iov(&mut self) {
        self.iov.clear();
        for f in self.frames.iter().take(512) {
            self.iov.push(libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            });
        }
    }
}

/// Writer task: waits for queued frames, writes them all with one `writev` (more if short).
async fn writer(mut wr: OwnedWriteHalf<TcpStream>, out: OutRef) {
    let mut batch = Batch {
        frames: Vec::new(),
        iov: Vec::new(),
    };
    loop {
        let closed = std::future::poll_fn(|cx| {
            let mut o = out.borrow_mut();
            if !o.queue.is_empty() {
                std::mem::swap(&mut o.queue, &mut batch.frames);
                o.queued = 0;
                Poll::Ready(false)
            } else if o.closed {
                Poll::Ready(true)
            } else {
                o.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if closed {
            break;
        }
        while !batch.frames.is_empty() {
            batch.fill_iov();
            let (res, b) = wr.writev(batch).await;
            batch = b;
            let Ok(mut n) = res else {
                out.borrow_mut().close();
                let _ = wr.shutdown().await;
                return;
            };
            let mut done = 0;
            while n > 0 {
                let f = &mut batch.frames[done];
                if f.len() <= n {
                    n -= f.len();
                    done += 1;
                } else {
                    bytes::Buf::advance(f, n);
                    n = 0;
                }
            }
            batch.frames.drain(..done);
        }
    }
    let _ = wr.shutdown().await;
}

/// Read the HTTP request head and answer the upgrade. Returns leftover bytes, or None.
async fn handshake(stream: &mut TcpStream) -> Option<BytesMut> {
    let mut head = BytesMut::new();
    let mut buf = vec![0u8; 2048];
    let end = loop {
        let (res, b) = stream.read(buf).await;
        buf = b;
        let n = res.ok().filter(|&n| n > 0)?;
        head.extend_from_slice(&buf[..n]);
        if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if head.len() > 8192 {
            return None;
        }
    };
    let text = std::str::from_utf8(&head[..end]).ok()?;
    let mut lines = text.split("\r\n");
    let ok = lines
        .next()
        .is_some_and(|l| l.starts_with("GET /ws ") || l.starts_with("GET /ws?"));
    let key = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_owned())
    });
    let reply = match (ok, key) {
        (true, Some(key)) => format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            tungstenite::handshake::derive_accept_key(key.as_bytes())
        ),
        _ => "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    };
    let failed = !reply.starts_with("HTTP/1.1 101");
    let (res, _) = stream.write_all(reply.into_bytes()).await;
    if res.is_err() || failed {
        return None;
    }
    Some(head.split_off(end))
}

/// One connection: upgrade, then read and handle commands until the peer goes.
async fn serve(hub: HubRef, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Some(mut rbuf) = handshake(&mut stream).await else {
        return;
    };
    let (mut rd, wr) = stream.into_split();
    let out: OutRef = Rc::default();
    let id = {
        let mut h = hub.borrow_mut();
        h.next_id += 1;
        let welcome = format!(
            r#"{{"type":"welcome","connection":"{0}-0-{1}","instance":"{0}"}}"#,
            h.instance, h.next_id
        );
        out.borrow_mut().push(text_frame(welcome.as_bytes()));
        h.next_id
    };
    monoio::spawn(writer(wr, out.clone()));
    let limits = codec::Limits {
        max_frame_size: 64 << 10,
        max_message_size: 64 << 10,
    };
    let mut decoder = codec::Decoder::new();
    let mut subs: Vec<Box<str>> = Vec::new();
    // Small read buffer: frames larger than it accumulate in `rbuf` across reads.
    let mut chunk = vec![0u8; 512];
    'conn: loop {
        loop {
            match decoder.decode(&mut rbuf, &limits) {
                Ok(None) => break,
                Ok(Some(Message::Text(t))) => handle(&hub, &out, id, &mut subs, &t),
                Ok(Some(Message::Ping(p))) => {
                    out.borrow_mut().push(codec::encode_frame(
                        OpCode::Control(codec::Control::Pong),
                        &p,
                    ));
                }
                Ok(Some(Message::Pong(_))) | Ok(Some(Message::Binary(_))) => {}
                Ok(Some(Message::Close(_))) | Err(_) => {
                    out.borrow_mut().push(codec::encode_close(1000, ""));
                    break 'conn;
                }
            }
        }
        if out.borrow().closed {
            break;
        }
        let (res, b) = rd.read(chunk).await;
        chunk = b;
        match res {
            Ok(n) if n > 0 => rbuf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let mut h = hub.borrow_mut();
    for ch in subs {
        if let Some(set) = h.channels.get_mut(&ch) {
            set.remove(&id);
            if set.is_empty() {
                h.channels.remove(&ch);
            }
        }
    }
    out.borrow_mut().close();
}

fn handle(hub: &HubRef, out: &OutRef, id: u64, subs: &mut Vec<Box<str>>, text: &[u8]) {
    let Ok(cmd) = serde_json::from_slice::<Cmd>(text) else {
        out.borrow_mut().push(text_frame(
            br#"{"type":"error","code":"bad_request","message":"not a command"}"#,
        ));
        return;
    };
    let channel = cmd.channel.unwrap_or("");
    match cmd.kind {
        "publish" => {
            publish(
                hub,
                channel,
                cmd.data.map_or(&b"null"[..], |d| d.get().as_bytes()),
            );
            if cmd.id.is_some() {
                out.borrow_mut().push(ack("published", channel, cmd.id));
            }
        }
        "subscribe" => {
            let mut h = hub.borrow_mut();
            let set = h.channels.entry(Box::from(channel)).or_default();
            if set.insert(id, out.clone()).is_none() {
                subs.push(Box::from(channel));
            }
            out.borrow_mut().push(ack("subscribed", channel, cmd.id));
        }
        "unsubscribe" => {
            let mut h = hub.borrow_mut();
            if let Some(set) = h.channels.get_mut(channel) {
                set.remove(&id);
                if set.is_empty() {
                    h.channels.remove(channel);
                }
            }
            subs.retain(|s| &**s != channel);
            out.borrow_mut().push(ack("unsubscribed", channel, cmd.id));
        }
        "ping" => {
            let json = match cmd.id {
                Some(i) => format!(r#"{{"type":"pong","id":{}}}"#, i.get()),
                None => r#"{"type":"pong"}"#.to_owned(),
            };
            out.borrow_mut().push(text_frame(json.as_bytes()));
        }
        _ => {
            out.borrow_mut().push(text_frame(
                br#"{"type":"error","code":"bad_request","message":"unknown type"}"#,
            ));
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or_else(|| {
        eprintln!("usage: minimal-peer PORT [CPU]");
        std::process::exit(2)
    });
    if let Some(cpu) = args.next().and_then(|c| c.parse().ok()) {
        core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
    }
    // Many connections: raise the open-file soft limit to the hard limit.
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .with_entries(32768)
        .enable_timer()
        .build()
        .expect("monoio runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
        let hub: HubRef = Rc::new(RefCell::new(Hub {
            instance: format!("{:016x}", std::process::id() as u64 * 0x9e37_79b9_7f4a_7c15),
            ..Hub::default()
        }));
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    monoio::spawn(serve(hub.clone(), stream));
                }
                Err(e) => {
                    eprintln!("accept: {e}");
                    monoio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
}
