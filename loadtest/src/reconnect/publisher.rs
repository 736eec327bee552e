//! `reconnect`'s publishers: an open-loop schedule over the channels, every publish answered —
//! over WebSocket with an `id` (`published` or an error), or as `POST /publish` on a keep-alive
//! connection (200 or an error status). Answers come in order, so a FIFO of what was written
//! pairs each with its channel; only acknowledged publishes are owed to the subscribers.

use super::{Ctx, CHUNK, MAX_BATCH, SETUP_TIMEOUT};
use crate::auth;
use crate::client::{self, Conn, ConnError, Reader, Writer, PING, PONG, TEXT};
use crate::http::{self, Responses};
use crate::schedule::Schedule;
use crate::stats::mono_ns;
use crate::traffic::error_code;
use crate::worker::PreciseTimer;
use bytes::Bytes;
use monoio::io::{AsyncWriteRentExt, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

/// A publisher's sending side.
enum Out {
    /// Publish frames with an `id`.
    Ws(Writer),
    /// `POST /publish` requests on a keep-alive connection.
    Http {
        io: OwnedWriteHalf<TcpStream>,
        buf: Vec<u8>,
    },
}

/// What a publisher's reader and writer share.
#[derive(Default)]
struct PubState {
    /// (id, channel) of every publish written and not yet answered, oldest first (answers
    /// come in order).
    pending: RefCell<VecDeque<(u64, usize)>>,
    /// A ping payload to answer with the next write (WebSocket).
    pong: RefCell<Option<Bytes>>,
    /// The writer once publishing is over (kept: dropping it would shut the sending side).
    parked: RefCell<Option<Out>>,
}

/// A publisher's open connection: the sending side and what reads the answers.
enum PubConn {
    Ws(Conn),
    Http(TcpStream),
}

async fn pub_connect(ctx: &Ctx, p: usize) -> Result<PubConn, ConnError> {
    let plan = &ctx.plan;
    let target = plan.pub_target(p);
    let src = (!plan.source_ips.is_empty()).then(|| plan.source_ips[p % plan.source_ips.len()]);
    if target.http {
        return client::connect(target.addr, src, plan.uring)
            .await
            .map(PubConn::Http);
    }
    let seed = (p as u32).wrapping_mul(0x9e37_79b9) ^ 0x5555;
    let login = auth::login(plan.tokens.as_deref(), p);
    client::open(target, src, plan.uring, CHUNK, seed, login)
        .await
        .map(PubConn::Ws)
}

/// Publisher `p`: WebSocket ones connect during setup, HTTP ones at the start (an idle
/// keep-alive connection would be closed by the hub while the subscribers set up).
pub(super) async fn publisher(ctx: Rc<Ctx>, p: usize) {
    let _task = ctx.live.task();
    let http = ctx.plan.pub_target(p).http;
    let conn = if http {
        match ctx.start().await {
            Some(_) => monoio::time::timeout(SETUP_TIMEOUT, pub_connect(&ctx, p)).await,
            None => return,
        }
    } else {
        let res = monoio::time::timeout(SETUP_TIMEOUT, pub_connect(&ctx, p)).await;
        ctx.setup_done();
        res
    };
    let conn = match conn.unwrap_or(Err(ConnError::Timeout)) {
        Ok(c) => c,
        Err(e) => {
            let mut l = ctx.local.borrow_mut();
            if http {
                l.counts
                    .errors
                    .add(e.kind(), || format!("publisher {p}: {e}"));
                l.counts.publishers_done += 1;
            } else {
                l.counts.setup_failed += 1;
                l.counts
                    .errors
                    .add(e.kind(), || format!("publisher {p}: {e}"));
            }
            return;
        }
    };
    let st = Rc::new(PubState::default());
    let res = match conn {
        PubConn::Ws(conn) => {
            {
                let mut l = ctx.local.borrow_mut();
                l.counts.setup_ok += 1;
                l.counts.anonymous += u64::from(conn.anonymous);
            }
            let _fd = ctx.live.socket(conn.fd);
            let Conn {
                mut reader, writer, ..
            } = conn;
            monoio::spawn(publish_task(ctx.clone(), Out::Ws(writer), st.clone(), p));
            ws_acks(&ctx, &mut reader, &st).await
        }
        PubConn::Http(stream) => {
            let _fd = ctx.live.socket(stream.as_raw_fd());
            let (r, w) = stream.into_split();
            let out = Out::Http {
                io: w,
                buf: Vec::new(),
            };
            monoio::spawn(publish_task(ctx.clone(), out, st.clone(), p));
            http_acks(&ctx, &mut Responses::new(r), &st).await
        }
    };
    // Publishes never answered stay counted in `unanswered`: the drain does not wait for them.
    if let Err(e) = res {
        let idle = st.pending.borrow().is_empty();
        if !(http && idle && matches!(e, ConnError::Closed(_))) {
            ctx.ended(&format!("publisher {p}"), e);
        }
    }
}

/// Settle the oldest pending publish: acknowledged (`ok`) or refused.
fn settle(ctx: &Ctx, st: &PubState, id: Option<u64>, ok: bool, why: impl FnOnce() -> String) {
    let front = st.pending.borrow_mut().pop_front();
    let mut l = ctx.local.borrow_mut();
    let Some((want, c)) = front else {
        l.counts.errors.add("answer to no publish", why);
        return;
    };
    l.counts.unanswered -= 1;
    if id.is_some_and(|id| id != want) {
        l.counts.errors.add("answer out of order", || {
            format!("expected the answer to publish {want}, got {id:?}")
        });
    }
    if ok {
        l.counts.acked[c] += 1;
    } else {
        l.counts.refused += 1;
    }
}

/// The `"id"` number of a reply.
fn reply_id(text: &[u8]) -> Option<u64> {
    let at = client::find(text, br#""id":"#)? + 5;
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// A WebSocket publisher's answers: `published` or an error, in publish order.
async fn ws_acks(ctx: &Ctx, reader: &mut Reader, st: &PubState) -> Result<(), ConnError> {
    loop {
        let (op, t) = reader.next_frame().await?;
        match op {
            TEXT if client::is_type(&t, "published") => {
                settle(ctx, st, reply_id(&t), true, || "published".into());
            }
            TEXT if client::is_type(&t, "error") => {
                let code = error_code(&t);
                let text = || String::from_utf8_lossy(&t[..t.len().min(200)]).into_owned();
                ctx.local
                    .borrow_mut()
                    .counts
                    .errors
                    .add(&format!("publish refused: {code}"), text);
                settle(ctx, st, reply_id(&t), false, text);
            }
            TEXT => {
                let mut l = ctx.local.borrow_mut();
                l.counts.unexpected += 1;
                l.counts.errors.add("unexpected frame", || {
                    let t = String::from_utf8_lossy(&t[..t.len().min(160)]);
                    format!("publisher got {t}")
                });
            }
            PING => {
                let parked = st.parked.borrow_mut().take();
                match parked {
                    Some(Out::Ws(mut w)) => {
                        let res = w.send(PONG, &t).await;
                        *st.parked.borrow_mut() = Some(Out::Ws(w));
                        res?;
                    }
                    other => {
                        *st.parked.borrow_mut() = other;
                        *st.pong.borrow_mut() = Some(t);
                    }
                }
            }
            _ => {}
        }
    }
}

/// An HTTP publisher's answers: 200, or an error status, in request order.
async fn http_acks(ctx: &Ctx, rx: &mut Responses, st: &PubState) -> Result<(), ConnError> {
    loop {
        let (status, body) = rx.next().await?;
        let text = || format!("{status} {}", String::from_utf8_lossy(&body));
        if status != 200 {
            ctx.local
                .borrow_mut()
                .counts
                .errors
                .add(&format!("POST /publish answered {status}"), text);
        }
        settle(ctx, st, None, status == 200, text);
    }
}

async fn publish_task(ctx: Rc<Ctx>, mut out: Out, st: Rc<PubState>, p: usize) {
    let _task = ctx.live.task();
    if let Err(e) = publish(&ctx, &mut out, &st, p).await {
        ctx.ended(&format!("publisher {p}"), e);
    }
    ctx.local.borrow_mut().counts.publishers_done += 1;
    *st.parked.borrow_mut() = Some(out);
}

/// Publisher `p`'s schedule: message k on channel k mod K, sequence numbers per channel.
async fn publish(ctx: &Ctx, out: &mut Out, st: &PubState, p: usize) -> Result<(), ConnError> {
    let plan = &ctx.plan;
    let Some(start) = ctx.start().await else {
        return Ok(());
    };
    let end = start + plan.warmup_ns + plan.measure_ns;
    let mut timer = PreciseTimer::new(&ctx.live, plan.uring)?;
    let per_pub = plan.rate / plan.publishers as f64;
    let sched = Schedule::new(start, end, per_pub, p as f64 / plan.publishers as f64);
    ctx.local.borrow_mut().counts.scheduled += sched.count();
    let chans: Vec<usize> = (0..plan.channels)
        .map(|k| (k + p) % plan.channels)
        .collect();
    let mut seq = vec![0u64; chans.len()];
    let (mut data, mut frame) = (Vec::new(), Vec::new());
    let target = plan.pub_target(p);
    let mut k = 0u64;
    let stopped = || ctx.live.closing() || ctx.shared.stop_publishing.load(Relaxed);
    while k < sched.count() && !stopped() {
        let due = sched.due_by(mono_ns()).min(k + MAX_BATCH);
        if due == k {
            timer.sleep_until(sched.due(k)).await?;
            continue;
        }
        let first_due = sched.due(k);
        let mut batch = vec![0u64; plan.channels];
        while k < due {
            let ci = (k % chans.len() as u64) as usize;
            let c = chans[ci];
            let s = seq[ci];
            seq[ci] += 1;
            data.clear();
            let _ = write!(
                data,
                r#"{{"p":{p},"s":{s},"t":{},"x":"{}"}}"#,
                sched.due(k),
                plan.pad
            );
            let name = plan.channel_name(c);
            frame.clear();
            match out {
                Out::Ws(w) => {
                    frame.extend_from_slice(br#"{"type":"publish","channel":""#);
                    frame.extend_from_slice(name.as_bytes());
                    frame.extend_from_slice(br#"","data":"#);
                    frame.extend_from_slice(&data);
                    let _ = write!(frame, r#","id":{k}}}"#);
                    w.push(TEXT, &frame);
                }
                Out::Http { buf, .. } => {
                    frame.extend_from_slice(br#"{"channel":""#);
                    frame.extend_from_slice(name.as_bytes());
                    frame.extend_from_slice(br#"","data":"#);
                    frame.extend_from_slice(&data);
                    frame.push(b'}');
                    http::push_post(buf, target, plan.api_key.as_deref(), &frame);
                }
            }
            st.pending.borrow_mut().push_back((k, c));
            batch[c] += 1;
            k += 1;
        }
        let pong = st.pong.borrow_mut().take();
        let res = match out {
            Out::Ws(w) => {
                if let Some(ping) = pong {
                    w.push(PONG, &ping);
                }
                w.flush().await
            }
            Out::Http { io, buf } => {
                let (res, mut b) = io.write_all(std::mem::take(buf)).await;
                b.clear();
                *buf = b;
                res.map(|_| ()).map_err(|e| ConnError::Io("write", e))
            }
        };
        let mut l = ctx.local.borrow_mut();
        if first_due >= start + plan.warmup_ns {
            let lag = mono_ns().saturating_sub(first_due).max(1);
            l.send_lag.saturating_record(lag);
        }
        if let Err(e) = res {
            l.counts.unsent += sched.count() - k;
            return Err(e);
        }
        for (c, n) in batch.iter().enumerate() {
            l.counts.sent[c] += n;
            l.counts.unanswered += *n as i64;
        }
    }
    ctx.local.borrow_mut().counts.unsent += sched.count() - k;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_ids() {
        assert_eq!(
            reply_id(br#"{"type":"published","channel":"h:x","id":42}"#),
            Some(42)
        );
        assert_eq!(
            reply_id(br#"{"type":"error","id":7,"code":"rate_limited"}"#),
            Some(7)
        );
        assert_eq!(reply_id(br#"{"type":"published","channel":"c"}"#), None);
    }
}
