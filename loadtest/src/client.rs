//! A lean monoio WebSocket client connection for load generation.
//!
//! [`open`] connects (optionally from a chosen source address), sends the upgrade request,
//! checks for `101`, reads the hub's welcome and, with a token ([`Login`]), waits for the hub's
//! `connected`: a connection counts as established only once the hub accepted its token. The
//! connection is then split into a [`Reader`] — one owned buffer that is read into at its spare end and from which complete
//! frames are split off in place (no per-frame allocation in steady state) — and a [`Writer`]
//! that encodes masked frames into one reused buffer and writes it with `write_all`.
//! Every failure becomes a [`ConnError`] whose message tells the user what to do.
//!
//! [`subscribe`] returns each channel's [`Subscribed`] reply (epoch and top offset on history
//! channels); [`abort`] makes a connection end with a TCP reset. A [`Target`] may also be an
//! `http://` URL, for publishers that `POST /publish` ([`crate::http`]).

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use ringhub::codec::{decode_server_frame, encode_masked, Control, Data, OpCode};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::Duration;

pub const TEXT: OpCode = OpCode::Data(Data::Text);
pub const PING: OpCode = OpCode::Control(Control::Ping);
pub const PONG: OpCode = OpCode::Control(Control::Pong);
pub const CLOSE: OpCode = OpCode::Control(Control::Close);

/// Base64 of the 16 bytes "ringhub-load/0.1" (any 16-byte nonce is valid for the server).
const WS_KEY: &str = "cmluZ2h1Yi1sb2FkLzAuMQ==";

/// Where to connect: a `ws://host:port/path` URL (a hub's WebSocket endpoint) or an
/// `http://host:port[/path]` one (a hub's `POST /publish`, path `/publish` by default), resolved
/// once.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    /// `http://`: publish with `POST` requests instead of over a WebSocket.
    pub http: bool,
    pub host: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (rest, http) = match (url.strip_prefix("ws://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (rest, false),
            (None, Some(rest)) => (rest, true),
            _ => {
                return Err(format!(
                    "unsupported URL {url:?}: expected ws://host:port/path (or, to publish over \
                     HTTP, http://host:port)"
                ))
            }
        };
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = match path {
            "" | "/" if http => "/publish",
            "" => "/",
            p => p,
        };
        let has_port = host.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
        let with_port = if has_port {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host:?} resolves to no address"))?;
        Ok(Target {
            url: url.into(),
            addr,
            http,
            host: host.into(),
            path: path.into(),
        })
    }

    /// Check that something accepts TCP connections at the address (before a run starts, so
    /// an unreachable URL is one clear error instead of thousands of failed connections).
    pub fn probe(&self) -> Result<(), String> {
        match std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(3)) {
            Ok(_) => Ok(()),
            Err(e) => {
                let why = match e.raw_os_error() {
                    Some(libc::ECONNREFUSED) => "connection refused — is the hub running there?",
                    _ if e.kind() == io::ErrorKind::TimedOut => "no answer within 3 s",
                    _ => "",
                };
                let why = if why.is_empty() {
                    e.to_string()
                } else {
                    why.into()
                };
                Err(format!(
                    "cannot connect to {} ({}): {why}",
                    self.url, self.addr
                ))
            }
        }
    }
}

/// Longest wait for `connected` after the welcome (the hub answers at once, or after one JWKS
/// refetch).
const CONNECTED_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the close that follows a refused token (for its close code).
const REFUSED_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a connection authenticates (hubs with `[auth]`; [`crate::auth`] mints the tokens).
#[derive(Clone, Copy, Debug)]
pub enum Login<'a> {
    /// No token: the welcome ends the handshake (open-mode hubs, peers).
    None,
    /// `{"type":"connect","token":…,"id":0}` after the welcome, then wait for `connected`.
    Message(&'a str),
    /// `?token=…` in the upgrade URL; the hub sends `connected` right after the welcome.
    Query(&'a str),
}

/// Why a connection failed or ended. [`ConnError::kind`] groups them for the reports.
#[derive(Debug)]
pub enum ConnError {
    Refused(SocketAddr),
    FdLimit,
    /// No ephemeral port (or source address) was available on this source IP.
    NoPorts(Option<IpAddr>),
    /// bind(2) refused a --source-ips address (not configured on this machine).
    BadSource(IpAddr),
    Timeout,
    /// The server answered the upgrade with this HTTP status line instead of 101.
    Rejected(String),
    Handshake(String),
    /// The server closed the connection: its close code, None without a close frame.
    Closed(Option<u16>),
    /// The hub refused the token: the `code` and `message` of its error frame (None without
    /// one) and the close code that followed (4001 unauthorized, 4002 expired, …).
    Auth {
        code: Option<String>,
        message: Option<String>,
        close: Option<u16>,
    },
    Protocol(String),
    Io(&'static str, io::Error),
}

impl ConnError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnError::Refused(_) => "connect refused",
            ConnError::FdLimit => "fd limit",
            ConnError::NoPorts(_) => "out of ephemeral ports",
            ConnError::BadSource(_) => "bad source address",
            ConnError::Timeout => "timeout",
            ConnError::Rejected(_) => "upgrade refused (HTTP status)",
            ConnError::Handshake(_) => "handshake failed",
            ConnError::Closed(_) => "closed by server",
            ConnError::Auth { .. } => "auth refused",
            ConnError::Protocol(_) => "protocol error",
            ConnError::Io(..) => "i/o error",
        }
    }

    /// Map an OS error of a local operation (not connect) to the causes users can act on.
    pub fn from_os(op: &'static str, e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => ConnError::FdLimit,
            _ => ConnError::Io(op, e),
        }
    }

    /// Map an OS error of `op` to the causes users can act on.
    fn from_io(op: &'static str, e: io::Error, addr: SocketAddr, src: Option<IpAddr>) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => ConnError::Refused(addr),
            Some(libc::EMFILE | libc::ENFILE) => ConnError::FdLimit,
            Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE) => ConnError::NoPorts(src),
            Some(libc::ETIMEDOUT) => ConnError::Timeout,
            Some(libc::ECONNRESET | libc::EPIPE) => ConnError::Closed(None),
            _ => ConnError::Io(op, e),
        }
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Refused(a) => {
                write!(
                    f,
                    "cannot connect to {a}: connection refused — is the hub running?"
                )
            }
            ConnError::FdLimit => write!(
                f,
                "too many open files: the open-file limit (RLIMIT_NOFILE) is reached; \
                 raise the hard limit (ulimit -Hn, LimitNOFILE=) or open fewer connections"
            ),
            ConnError::NoPorts(Some(ip)) => {
                write!(f, "ran out of ephemeral ports on {ip}; add --source-ips")
            }
            ConnError::NoPorts(None) => write!(
                f,
                "ran out of ephemeral ports on the default source address; add --source-ips"
            ),
            ConnError::BadSource(ip) => {
                write!(
                    f,
                    "cannot bind to {ip}: not an address of this machine (--source-ips)"
                )
            }
            ConnError::Timeout => write!(f, "timed out (connect, upgrade or subscribe)"),
            ConnError::Rejected(s) => write!(f, "the server refused the upgrade: {s}"),
            ConnError::Handshake(s) => write!(f, "WebSocket handshake failed: {s}"),
            ConnError::Closed(Some(c)) => write!(f, "closed by server with code {c}"),
            ConnError::Closed(None) => write!(f, "closed by server (no close frame)"),
            ConnError::Auth {
                code,
                message,
                close,
            } => {
                write!(f, "the hub refused the token: ")?;
                match (code, message) {
                    (Some(c), Some(m)) => write!(f, "error {c} ({m})")?,
                    (Some(c), None) => write!(f, "error {c}")?,
                    (None, _) => write!(f, "no error frame")?,
                }
                match close {
                    Some(c) => write!(f, ", close {c} ({})", crate::stats::close_meaning(*c))?,
                    None => write!(f, ", no close code")?,
                }
                write!(
                    f,
                    "; check --token-secret/--token-key, --token-alg, --token-aud and \
                     --token-iss against the hub's [auth]"
                )
            }
            ConnError::Protocol(s) => write!(f, "protocol error: {s}"),
            ConnError::Io(op, e) => write!(f, "{op}: {e}"),
        }
    }
}

fn io_err(op: &'static str, e: io::Error) -> ConnError {
    match e.raw_os_error() {
        Some(libc::ECONNRESET | libc::EPIPE) => ConnError::Closed(None),
        _ => ConnError::Io(op, e),
    }
}

/// A socket address in the C layout, for bind(2) and connect(2).
fn raw_addr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage; we fill the family-specific prefix below.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Open a TCP connection to `addr`, bound to `src` first when given (with
/// IP_BIND_ADDRESS_NO_PORT, so the port is picked per destination at connect time).
pub(crate) async fn connect(
    addr: SocketAddr,
    src: Option<IpAddr>,
    uring: bool,
) -> Result<TcpStream, ConnError> {
    let fail = |e| ConnError::from_io("connect", e, addr, src);
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain socket(2); the fd is owned by `sock` right away (closed on every error path).
    let fd = unsafe { libc::socket(domain, flags, 0) };
    check(fd).map_err(fail)?;
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let sock = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    if let Some(ip) = src {
        let one: libc::c_int = 1;
        let p = &one as *const libc::c_int as *const libc::c_void;
        let n = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd and option buffer. Best effort: without it bind picks the port.
        unsafe { libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, p, n) };
        let (sa, len) = raw_addr(SocketAddr::new(ip, 0));
        // SAFETY: `sa` is a valid sockaddr of length `len`.
        check(unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) }).map_err(
            |e| match e.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => ConnError::BadSource(ip),
                _ => fail(e),
            },
        )?;
    }
    let (sa, len) = raw_addr(addr);
    // SAFETY: as above.
    let rc = unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len) };
    let in_progress = match check(rc) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
        Err(e) => return Err(fail(e)),
    };
    sock.set_nodelay(true).map_err(fail)?;
    let stream = TcpStream::from_std(sock).map_err(fail)?;
    if in_progress {
        stream.writable(false).await.map_err(fail)?;
        let mut err: libc::c_int = 0;
        let mut n = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let p = &mut err as *mut libc::c_int as *mut libc::c_void;
        // SAFETY: valid fd and output buffer of `n` bytes.
        check(unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, p, &mut n) })
            .map_err(fail)?;
        if err != 0 {
            return Err(fail(io::Error::from_raw_os_error(err)));
        }
    }
    if uring {
        // monoio's own sockets are blocking under io_uring; match that.
        // SAFETY: fcntl on our own valid fd.
        unsafe {
            let fl = libc::fcntl(stream.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(stream.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(stream)
}

/// An open WebSocket connection, split into its two directions.
pub struct Conn {
    pub reader: Reader,
    pub writer: Writer,
    /// The socket (for [`crate::worker::Live`]: shut down at the end of a run).
    pub fd: RawFd,
    /// The hub answered `connected` with an empty user: it did not check the token (a hub
    /// without `[auth]` accepts any `connect` as anonymous).
    pub anonymous: bool,
}

impl Conn {
    /// Client-initiated close: send a close frame (1000) and wait for the server's close.
    pub async fn close(mut self) -> Result<(), ConnError> {
        self.writer.send(CLOSE, &1000u16.to_be_bytes()).await?;
        loop {
            match self.reader.next_frame().await {
                Err(ConnError::Closed(_)) => return Ok(()),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
    }
}

/// Connect, upgrade, read the welcome and authenticate with `login`'s token (waiting for
/// `connected`). `chunk` is the read buffer size (small for idle connections: a pending read
/// pins its buffer). `seed` varies the frame masks.
pub async fn open(
    target: &Target,
    src: Option<IpAddr>,
    uring: bool,
    chunk: usize,
    seed: u32,
    login: Login<'_>,
) -> Result<Conn, ConnError> {
    if target.http {
        return Err(ConnError::Handshake(format!(
            "{} is an HTTP URL: only publishers of `reconnect` use one (POST /publish)",
            target.url
        )));
    }
    let mut stream = connect(target.addr, src, uring).await?;
    let fd = stream.as_raw_fd();
    let query = match login {
        Login::Query(token) => {
            let sep = if target.path.contains('?') { '&' } else { '?' };
            format!("{sep}token={token}")
        }
        _ => String::new(),
    };
    let request = format!(
        "GET {}{query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.host
    );
    let (res, _) = stream.write_all(request.into_bytes()).await;
    res.map_err(|e| io_err("send upgrade request", e))?;

    let mut buf = BytesMut::with_capacity(chunk);
    let head_len = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() >= 8192 {
            return Err(ConnError::Handshake("response head over 8 KiB".into()));
        }
        buf.reserve(chunk);
        let len = buf.len();
        let (res, slice) = stream.read(buf.slice_mut(len..)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => {
                let msg = "server closed the connection before answering the upgrade";
                return Err(ConnError::Handshake(msg.into()));
            }
            Ok(_) => {}
            Err(e) => return Err(io_err("read upgrade response", e)),
        }
    };
    let status = String::from_utf8_lossy(&buf[..find(&buf, b"\r\n").unwrap_or(0)]).into_owned();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(ConnError::Rejected(status));
    }
    buf.advance(head_len);
    let (r, w) = stream.into_split();
    let mut conn = Conn {
        reader: Reader {
            io: r,
            buf,
            chunk,
            read_ns: 0,
        },
        writer: Writer {
            io: w,
            buf: Vec::new(),
            mask: seed | 1,
        },
        fd,
        anonymous: false,
    };
    let (op, welcome) = conn.reader.next_frame().await?;
    if op != TEXT || !is_type(&welcome, "welcome") {
        let got = String::from_utf8_lossy(&welcome[..welcome.len().min(120)]).into_owned();
        return Err(ConnError::Handshake(format!(
            "expected a welcome, got {got:?}"
        )));
    }
    match login {
        Login::None => return Ok(conn),
        Login::Message(token) => {
            let cmd = format!(r#"{{"type":"connect","token":"{token}","id":0}}"#);
            conn.writer.send(TEXT, cmd.as_bytes()).await?;
        }
        Login::Query(_) => {}
    }
    let waited = monoio::time::timeout(CONNECTED_TIMEOUT, await_connected(&mut conn)).await;
    conn.anonymous = waited.unwrap_or_else(|_| {
        let why = match login {
            Login::Query(_) => "a hub without [auth] ignores ?token=: use --token-in message",
            _ => "the server does not answer `connect`: it does not speak ringhub's auth",
        };
        Err(ConnError::Handshake(format!(
            "no `connected` within {} s of the welcome ({why})",
            CONNECTED_TIMEOUT.as_secs()
        )))
    })?;
    Ok(conn)
}

/// Read until the hub's `connected` (answering pings); true when its user is empty. An error
/// frame or a 4xxx close before it is [`ConnError::Auth`].
async fn await_connected(conn: &mut Conn) -> Result<bool, ConnError> {
    loop {
        match conn.reader.next_frame().await {
            Ok((TEXT, t)) if is_type(&t, "connected") => {
                return Ok(find(&t, br#""user":"""#).is_some())
            }
            Ok((TEXT, t)) if is_type(&t, "error") => return Err(refused(conn, &t).await),
            Ok((TEXT, t)) => {
                let got = String::from_utf8_lossy(&t[..t.len().min(120)]).into_owned();
                return Err(ConnError::Handshake(format!(
                    "expected `connected` after the token, got {got:?}"
                )));
            }
            Ok((PING, p)) => conn.writer.send(PONG, &p).await?,
            Ok(_) => {}
            Err(ConnError::Closed(Some(c))) if (4000..5000).contains(&c) => {
                return Err(ConnError::Auth {
                    code: None,
                    message: None,
                    close: Some(c),
                })
            }
            Err(e) => return Err(e),
        }
    }
}

/// The hub's error frame `text` in answer to a token, and the close code that follows it.
async fn refused(conn: &mut Conn, text: &[u8]) -> ConnError {
    let v: serde_json::Value = serde_json::from_slice(text).unwrap_or_default();
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
    let close = async {
        loop {
            match conn.reader.next_frame().await {
                Ok(_) => {}
                Err(ConnError::Closed(code)) => return code,
                Err(_) => return None,
            }
        }
    };
    ConnError::Auth {
        code: field("code"),
        message: field("message"),
        close: monoio::time::timeout(REFUSED_CLOSE_TIMEOUT, close)
            .await
            .unwrap_or(None),
    }
}

/// The receiving half: frames are parsed in place from one owned buffer.
pub struct Reader {
    io: OwnedReadHalf<TcpStream>,
    buf: BytesMut,
    chunk: usize,
    /// CLOCK_MONOTONIC ns when the last read completed: the arrival time of its frames.
    pub read_ns: u64,
}

impl Reader {
    /// The next complete frame: text, binary, ping or pong. A close frame, end of stream or
    /// reset ends the connection with [`ConnError::Closed`].
    pub async fn next_frame(&mut self) -> Result<(OpCode, Bytes), ConnError> {
        loop {
            match decode_server_frame(&mut self.buf) {
                Ok(Some((OpCode::Control(Control::Close), _, p))) => {
                    let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                    return Err(ConnError::Closed(code));
                }
                Ok(Some((_, false, _))) => {
                    return Err(ConnError::Protocol("fragmented server message".into()))
                }
                Ok(Some((op, true, payload))) => return Ok((op, payload)),
                Ok(None) => self.fill().await?,
                Err(e) => return Err(ConnError::Protocol(e.to_string())),
            }
        }
    }

    /// Read more bytes after the unparsed ones. Once the frames split off earlier are dropped,
    /// `reserve` reclaims the same allocation, so steady state allocates nothing.
    async fn fill(&mut self) -> Result<(), ConnError> {
        if self.buf.capacity() - self.buf.len() < self.chunk / 2 {
            self.buf.reserve(self.chunk);
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        let (res, slice) = self.io.read(buf.slice_mut(len..)).await;
        self.buf = slice.into_inner();
        self.read_ns = crate::stats::mono_ns();
        match res {
            Ok(0) => Err(ConnError::Closed(None)),
            Ok(_) => Ok(()),
            Err(e) => Err(io_err("read", e)),
        }
    }
}

/// The sending half: frames are encoded (masked) into one reused buffer, then flushed.
pub struct Writer {
    io: OwnedWriteHalf<TcpStream>,
    buf: Vec<u8>,
    mask: u32,
}

impl Writer {
    /// Queue one frame (FIN set) for the next [`Writer::flush`].
    pub fn push(&mut self, op: OpCode, payload: &[u8]) {
        // xorshift32: masks only need to vary, not to be secret, in a load generator.
        self.mask ^= self.mask << 13;
        self.mask ^= self.mask >> 17;
        self.mask ^= self.mask << 5;
        encode_masked(op, true, payload, self.mask.to_ne_bytes(), &mut self.buf);
    }

    /// Write everything queued. The buffer travels with the write and comes back for reuse.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let (res, mut buf) = self.io.write_all(buf).await;
        buf.clear();
        self.buf = buf;
        res.map(|_| ()).map_err(|e| io_err("write", e))
    }

    pub async fn send(&mut self, op: OpCode, payload: &[u8]) -> Result<(), ConnError> {
        self.push(op, payload);
        self.flush().await
    }
}

/// What a `subscribed` reply says about a history channel (every field None on a channel
/// without history).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscribed {
    /// The channel's epoch.
    pub epoch: Option<String>,
    /// The channel's top offset: the next message has `offset + 1`.
    pub offset: Option<u64>,
    /// Only in answer to a subscribe with `since`: whether the missed messages follow.
    pub recovered: Option<bool>,
    /// The `id` echoed, when it is a number.
    pub id: Option<u64>,
}

impl Subscribed {
    /// Parse a `subscribed` reply (None for any other frame). Setup path: uses serde_json.
    pub fn parse(text: &[u8]) -> Option<Subscribed> {
        if !is_type(text, "subscribed") {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(text).ok()?;
        Some(Subscribed {
            epoch: v.get("epoch").and_then(|e| e.as_str()).map(String::from),
            offset: v.get("offset").and_then(|o| o.as_u64()),
            recovered: v.get("recovered").and_then(|r| r.as_bool()),
            id: v.get("id").and_then(|i| i.as_u64()),
        })
    }
}

/// Subscribe to each of `channels` (ids 1..) and wait for every confirmation; the replies in
/// the order of `channels`.
pub async fn subscribe(conn: &mut Conn, channels: &[String]) -> Result<Vec<Subscribed>, ConnError> {
    for (i, ch) in channels.iter().enumerate() {
        let cmd = serde_json::json!({"type": "subscribe", "channel": ch, "id": i + 1});
        conn.writer.push(TEXT, cmd.to_string().as_bytes());
    }
    conn.writer.flush().await?;
    let mut replies = vec![None; channels.len()];
    let mut confirmed = 0;
    while confirmed < channels.len() {
        match conn.reader.next_frame().await? {
            (TEXT, t) => {
                let got = || String::from_utf8_lossy(&t[..t.len().min(200)]).into_owned();
                let Some(s) = Subscribed::parse(&t) else {
                    return Err(ConnError::Protocol(format!(
                        "subscribe answered with {}",
                        got()
                    )));
                };
                let slot = s
                    .id
                    .and_then(|id| replies.get_mut((id as usize).wrapping_sub(1)))
                    .filter(|r| r.is_none())
                    .ok_or_else(|| ConnError::Protocol(format!("unexpected reply {}", got())))?;
                *slot = Some(s);
                confirmed += 1;
            }
            (PING, p) => conn.writer.send(PONG, &p).await?,
            _ => {}
        }
    }
    Ok(replies.into_iter().flatten().collect())
}

/// Abort a connection: the next close(2) of `fd` resets it (SO_LINGER 0: RST, no FIN, no
/// WebSocket close), and a pending read on it completes now (shutdown of the reading side,
/// which sends nothing to the peer).
pub fn abort(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket of ours; the option buffer is a valid `linger`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        libc::shutdown(fd, libc::SHUT_RD);
    }
}

/// Whether a JSON text frame from the hub has `"type":"<ty>"` as its first field.
pub fn is_type(text: &[u8], ty: &str) -> bool {
    let rest = text.strip_prefix(br#"{"type":""#).unwrap_or(&[]);
    rest.strip_prefix(ty.as_bytes())
        .is_some_and(|r| r.first() == Some(&b'"'))
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
