//! Publishing over HTTP: `POST /publish` requests on one keep-alive connection, pipelined (each
//! written as soon as it is due, the answers read in order by [`Responses`]).
//!
//! [`push_post`] and [`parse_response`] are sans-IO (bytes in, bytes out): what the socket
//! halves do with them is in [`Responses::next`] and the publisher of [`crate::reconnect`].
//! Only what the hub sends is understood: a status line, headers with `Content-Length`, a body.

use crate::client::{find, ConnError, Target};
use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, OwnedReadHalf};
use monoio::net::TcpStream;
use std::io::Write as _;

/// Longest response head accepted.
const MAX_HEAD: usize = 8192;
/// Read buffer growth step.
const CHUNK: usize = 16 * 1024;

/// Append a `POST` of `body` (JSON) to `target`'s path, keeping the connection alive.
pub fn push_post(buf: &mut Vec<u8>, target: &Target, api_key: Option<&str>, body: &[u8]) {
    let _ = write!(
        buf,
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        target.path,
        target.host,
        body.len()
    );
    if let Some(key) = api_key {
        let _ = write!(buf, "Authorization: Bearer {key}\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(body);
}

/// A complete response at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Bytes of the head, blank line included.
    pub head_len: usize,
    pub body_len: usize,
}

impl Response {
    /// Bytes the whole response takes.
    pub fn len(&self) -> usize {
        self.head_len + self.body_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The response at the start of `buf`: `Ok(None)` while it is incomplete (a normal outcome:
/// read more), an error for what is not an HTTP/1.x response with a `Content-Length` body.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response>, String> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err(format!("response head over {MAX_HEAD} bytes"))
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP response: {status_line:?}"))?;
    let mut body_len = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            body_len = value
                .trim()
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("unsupported Transfer-Encoding {value:?}"));
        }
    }
    let r = Response {
        status,
        head_len: end + 4,
        body_len,
    };
    Ok((buf.len() >= r.len()).then_some(r))
}

/// The reading half of a publisher's HTTP connection: its responses, in order.
pub struct Responses {
    io: OwnedReadHalf<TcpStream>,
    buf: BytesMut,
}

impl Responses {
    pub fn new(io: OwnedReadHalf<TcpStream>) -> Self {
        Responses {
            io,
            buf: BytesMut::with_capacity(CHUNK),
        }
    }

    /// The next response: its status and body. End of stream is [`ConnError::Closed`].
    pub async fn next(&mut self) -> Result<(u16, Bytes), ConnError> {
        loop {
            if let Some(r) = parse_response(&self.buf).map_err(ConnError::Protocol)? {
                self.buf.advance(r.head_len);
                let body = self.buf.split_to(r.body_len).freeze();
                return Ok((r.status, body));
            }
            if self.buf.capacity() - self.buf.len() < CHUNK / 2 {
                self.buf.reserve(CHUNK);
            }
            let buf = std::mem::take(&mut self.buf);
            let len = buf.len();
            let (res, slice) = self.io.read(buf.slice_mut(len..)).await;
            self.buf = slice.into_inner();
            match res {
                Ok(0) => return Err(ConnError::Closed(None)),
                Ok(_) => {}
                Err(e) => return Err(ConnError::Io("read", e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_post_carries_the_key_and_the_length() {
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(t.path, "/publish");
        let mut buf = Vec::new();
        push_post(&mut buf, &t, Some("k1"), br#"{"channel":"c","data":1}"#);
        let text = String::from_utf8(buf).unwrap();
        assert!(text.starts_with("POST /publish HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(text.contains("Content-Length: 24\r\n"));
        assert!(text.contains("Authorization: Bearer k1\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"channel\":\"c\",\"data\":1}"));
    }

    #[test]
    fn responses_complete_incomplete_and_pipelined() {
        let one = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\
                    Connection: keep-alive\r\n\r\n{\"ok\":true}";
        let r = parse_response(one).unwrap().unwrap();
        assert_eq!((r.status, r.body_len, r.len()), (200, 11, one.len()));
        for cut in 0..one.len() {
            assert_eq!(parse_response(&one[..cut]), Ok(None), "cut at {cut}");
        }
        let mut two = one.to_vec();
        two.extend_from_slice(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(parse_response(&two).unwrap().unwrap().len(), one.len());
        let rest = &two[one.len()..];
        assert_eq!(parse_response(rest).unwrap().unwrap().status, 503);
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_response(&[b'a'; MAX_HEAD + 1]).is_err());
    }
}
