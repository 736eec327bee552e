//! A `reconnect` subscriber across its connections — set up, live, dropped, away,
//! resubscribed with `since`, recovering — and the per-thread drop scheduler.
//!
//! The hot path is [`read_frames`] → [`on_text`]; a reply to a subscribe with `since` goes
//! through [`on_reply`]. Each subscriber's [`Ledger`] (sequence numbers, offsets, epoch) lives
//! as long as the subscriber, not the connection.

use super::{Counts, Ctx, Local, CHUNK, CLOSE_WRITER_TRIES, SETUP_TIMEOUT};
use crate::auth;
use crate::cli::DropMode;
use crate::client::{self, Conn, ConnError, Reader, Subscribed, Writer, CLOSE, PING, PONG, TEXT};
use crate::stats::mono_ns;
use crate::track::{Offsets, Seen, Tracker};
use crate::traffic::{error_code, parse_message, parse_reset};
use crate::worker::PreciseTimer;
use serde_json::json;
use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// One subscriber, across its connections, as the drop scheduler sees it.
pub(super) struct Sub {
    /// The connection now open (None while away).
    link: RefCell<Option<Rc<Link>>>,
}

/// An open subscriber connection.
struct Link {
    fd: RawFd,
    /// The sending half, parked (pongs and our close frame borrow it).
    writer: RefCell<Option<Writer>>,
    /// The scheduler dropped it: its end is ours.
    dropped: Cell<bool>,
}

/// What a subscriber received on its channel, kept across its connections.
struct Ledger {
    chan: usize,
    /// Sequence numbers per (publisher, channel): duplicates and loss across reconnects.
    seqs: Tracker,
    /// Offsets of the channel: `since` for the next resubscribe.
    offsets: Offsets,
    epoch: String,
    /// Left out of the loss accounting (a window that cannot be sized).
    unaccounted: bool,
    /// Messages of this subscriber's `recovered:false` windows so far.
    windows: u64,
}

impl Ledger {
    /// What the next resubscribe passes as `since`: the last offset received (or the top the
    /// stream restarted after).
    fn since(&self) -> u64 {
        self.offsets.last(self.chan as u32).unwrap_or(0)
    }

    /// Leave the loss accounting, taking along what was counted so far.
    fn exclude(&mut self, c: &mut Counts) {
        if self.unaccounted {
            return;
        }
        self.unaccounted = true;
        c.unaccounted += 1;
        c.excluded_subs[self.chan] += 1;
        c.excluded_unique += self.seqs.unique();
        c.excluded_window_msgs += self.windows;
    }
}

/// Where a connection stands in its resubscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Subscribe with `since` written at `sent`; waiting for the reply.
    Reply { sent: u64, since: u64 },
    /// `recovered:true`: the backlog `since+1..=top` is arriving.
    Backlog { sent: u64, since: u64, top: u64 },
    /// Receiving live messages (the first connection, or recovery done).
    Live,
}

/// How a subscriber connection ended.
enum End {
    /// Dropped by the scheduler.
    Dropped,
    /// Closed by the hub or failed.
    Lost(ConnError),
}

/// Open subscriber `i`'s connection number `n`: upgraded and authenticated.
async fn open(ctx: &Ctx, i: usize, n: usize) -> Result<Conn, ConnError> {
    let plan = &ctx.plan;
    let k = plan.publishers + i;
    let src = (!plan.source_ips.is_empty()).then(|| plan.source_ips[k % plan.source_ips.len()]);
    let target = &plan.targets[plan.sub_target(i, n)];
    let seed = (k as u32 ^ (n as u32) << 20).wrapping_mul(0x9e37_79b9);
    let login = auth::login(plan.tokens.as_deref(), k);
    client::open(target, src, plan.uring, CHUNK, seed, login).await
}

/// Reconnect: open connection `n` and write the subscribe with `since`.
async fn resubscribe(
    ctx: &Ctx,
    i: usize,
    n: usize,
    name: &str,
    st: &Ledger,
) -> Result<(Conn, Phase), ConnError> {
    let mut conn = open(ctx, i, n).await?;
    let since = st.since();
    let cmd = json!({
        "type": "subscribe",
        "channel": name,
        "since": {"offset": since, "epoch": st.epoch},
        "id": 1,
    });
    let sent = mono_ns();
    conn.writer.send(TEXT, cmd.to_string().as_bytes()).await?;
    Ok((conn, Phase::Reply { sent, since }))
}

/// Subscriber `i`: set up, then live / dropped / away / reconnected until the run ends.
pub(super) async fn subscriber(ctx: Rc<Ctx>, i: usize) {
    let _task = ctx.live.task();
    let plan = ctx.plan.clone();
    let chan = plan.sub_channel(i);
    let name = plan.channel_name(chan);
    let setup = async {
        let mut conn = open(&ctx, i, 0).await?;
        let reply = client::subscribe(&mut conn, std::slice::from_ref(&name)).await?;
        match reply.into_iter().next() {
            Some(Subscribed {
                epoch: Some(epoch),
                offset: Some(top),
                ..
            }) => Ok((conn, epoch, top)),
            _ => Err(ConnError::Protocol(format!(
                "{name} has no history (its `subscribed` carries no epoch and offset): give \
                 --channel-prefix a namespace with history_size > 0"
            ))),
        }
    };
    let res = monoio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .unwrap_or(Err(ConnError::Timeout));
    ctx.setup_done();
    let (conn, epoch, top) = match res {
        Ok(r) => r,
        Err(e) => {
            let mut l = ctx.local.borrow_mut();
            l.counts.setup_failed += 1;
            l.counts.errors.add(e.kind(), || e.to_string());
            return;
        }
    };
    {
        let mut l = ctx.local.borrow_mut();
        l.counts.setup_ok += 1;
        l.counts.anonymous += u64::from(conn.anonymous);
        l.counts.subs[chan] += 1;
    }
    let sub = Rc::new(Sub {
        link: RefCell::new(None),
    });
    ctx.subs.borrow_mut().insert(i, sub.clone());
    let mut st = Ledger {
        chan,
        seqs: Tracker::default(),
        offsets: Offsets::default(),
        epoch,
        unaccounted: false,
        windows: 0,
    };
    st.offsets.restart(chan as u32, top);
    let mut next = Some((conn, Phase::Live));
    let mut n = 0;
    while let Some((conn, phase)) = next.take() {
        let end = connected(&ctx, &sub, &mut st, conn, phase).await;
        if ctx.live.closing() {
            break;
        }
        if let End::Lost(e) = end {
            ctx.local.borrow_mut().counts.lost_conns += 1;
            ctx.ended(&format!("subscriber {i}"), e);
        }
        // Away for the down time, then reconnect (again after each failed attempt).
        ctx.local.borrow_mut().counts.away += 1;
        while ctx.nap(plan.down_ns).await {
            n += 1;
            let attempt = resubscribe(&ctx, i, n, &name, &st);
            let res = monoio::time::timeout(SETUP_TIMEOUT, attempt)
                .await
                .unwrap_or(Err(ConnError::Timeout));
            match res {
                Ok(c) => {
                    let mut l = ctx.local.borrow_mut();
                    l.counts.reconnects += 1;
                    l.counts.recovering += 1;
                    next = Some(c);
                    break;
                }
                Err(e) => {
                    let mut l = ctx.local.borrow_mut();
                    l.counts.failed_attempts += 1;
                    l.counts.errors.add(e.kind(), || format!("reconnect: {e}"));
                }
            }
        }
        ctx.local.borrow_mut().counts.away -= 1;
    }
}

/// Run one connection of a subscriber until it ends: account its frames, finish a recovery.
async fn connected(ctx: &Ctx, sub: &Sub, st: &mut Ledger, conn: Conn, mut phase: Phase) -> End {
    let Conn {
        mut reader,
        writer,
        fd,
        ..
    } = conn;
    let _fd = ctx.live.socket(fd);
    let link = Rc::new(Link {
        fd,
        writer: RefCell::new(Some(writer)),
        dropped: Cell::new(false),
    });
    *sub.link.borrow_mut() = Some(link.clone());
    ctx.local.borrow_mut().counts.connected += 1;
    let end = read_frames(ctx, &link, st, &mut reader, &mut phase).await;
    *sub.link.borrow_mut() = None;
    let mut l = ctx.local.borrow_mut();
    l.counts.connected -= 1;
    if phase != Phase::Live {
        l.counts.incomplete += 1;
        l.counts.recovering -= 1;
    }
    end
}

/// The hot path of a subscriber: frames until the connection ends.
async fn read_frames(
    ctx: &Ctx,
    link: &Link,
    st: &mut Ledger,
    reader: &mut Reader,
    phase: &mut Phase,
) -> End {
    loop {
        let res = reader.next_frame().await;
        if link.dropped.get() && (ctx.plan.drop_mode == DropMode::Abort || res.is_err()) {
            // Aborted: whatever is still buffered is lost with the connection.
            return End::Dropped;
        }
        match res {
            Ok((TEXT, t)) => {
                if let Err(e) = on_text(ctx, st, &t, reader.read_ns, phase) {
                    return End::Lost(e);
                }
            }
            Ok((PING, p)) => {
                let parked = link.writer.borrow_mut().take();
                if let Some(mut w) = parked {
                    let res = w.send(PONG, &p).await;
                    *link.writer.borrow_mut() = Some(w);
                    if let Err(e) = res {
                        return End::Lost(e);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => return End::Lost(e),
        }
    }
}

/// Account one text frame of a subscriber, read at `at`. An error ends the connection.
fn on_text(
    ctx: &Ctx,
    st: &mut Ledger,
    text: &[u8],
    at: u64,
    phase: &mut Phase,
) -> Result<(), ConnError> {
    let plan = &ctx.plan;
    let prefix = plan.prefix.as_bytes();
    let mut l = ctx.local.borrow_mut();
    let l = &mut *l;
    let chan = st.chan as u32;
    if let Some(m) = parse_message(text, prefix) {
        if m.chan != st.chan || m.p as usize >= plan.publishers {
            l.counts.unexpected += 1;
            l.counts.errors.add("unexpected message", || {
                format!(
                    "message from publisher {} on {} (subscribed to {})",
                    m.p,
                    plan.channel_name(m.chan),
                    plan.channel_name(st.chan)
                )
            });
            return Ok(());
        }
        let seen = st.seqs.observe(m.p, chan, m.s);
        l.counts.seq.add(seen);
        if st.unaccounted && seen != Seen::Duplicate {
            l.counts.excluded_unique += 1;
        }
        let warm_end = ctx.shared.start_ns.load(Relaxed) + plan.warmup_ns;
        if at >= warm_end && at < warm_end + plan.measure_ns {
            l.counts.window_deliveries += 1;
        }
        let Some(o) = m.offset else {
            l.counts.errors.add("message without offset", || {
                format!(
                    "{} carries no offset: not a history channel",
                    plan.channel_name(m.chan)
                )
            });
            return Ok(());
        };
        l.counts.offsets.add(st.offsets.observe(chan, o));
        if let Phase::Backlog { sent, since, top } = *phase {
            if o > since && o <= top {
                l.counts.backlog_received += 1;
            }
            if o >= top {
                l.recovery.saturating_record(at.saturating_sub(sent).max(1));
                l.counts.recovering -= 1;
                *phase = Phase::Live;
            }
        }
        return Ok(());
    }
    if let Phase::Reply { sent, since } = *phase {
        if let Some(r) = Subscribed::parse(text) {
            on_reply(l, st, r, at, sent, since, phase);
            return Ok(());
        }
    }
    if let Some((c, top, epoch)) = parse_reset(text, prefix) {
        if c == st.chan {
            st.offsets.restart(chan, top);
            st.epoch = epoch;
            l.counts.offsets.resets += 1;
            return Ok(());
        }
    }
    if client::is_type(text, "error") {
        let code = error_code(text);
        l.counts.errors.add(&format!("hub error {code}"), || {
            String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned()
        });
        if matches!(phase, Phase::Reply { .. }) {
            return Err(ConnError::Protocol(format!(
                "the subscribe with since was refused: {code}"
            )));
        }
        return Ok(());
    }
    l.counts.unexpected += 1;
    l.counts.errors.add("unexpected frame", || {
        let t = String::from_utf8_lossy(&text[..text.len().min(160)]);
        format!("unexpected text frame: {t}")
    });
    Ok(())
}

/// The reply to a subscribe with `since`, written at `sent`, read at `at`.
fn on_reply(
    l: &mut Local,
    st: &mut Ledger,
    r: Subscribed,
    at: u64,
    sent: u64,
    since: u64,
    phase: &mut Phase,
) {
    let chan = st.chan as u32;
    l.counts.replies += 1;
    l.reply.saturating_record(at.saturating_sub(sent).max(1));
    let same_epoch = r.epoch.as_deref() == Some(st.epoch.as_str());
    let top = r.offset.unwrap_or(since);
    if let Some(e) = r.epoch {
        st.epoch = e;
    }
    match r.recovered {
        Some(true) => {
            l.counts.recovered += 1;
            let backlog = top.saturating_sub(since);
            l.counts.backlog.push(backlog);
            if backlog == 0 {
                l.recovery.saturating_record(at.saturating_sub(sent).max(1));
                l.counts.recovering -= 1;
                *phase = Phase::Live;
            } else {
                *phase = Phase::Backlog { sent, since, top };
            }
        }
        not => {
            // Nothing missed is coming: live messages follow from top + 1.
            l.counts.not_recoverable += u64::from(not == Some(false));
            if not.is_none() {
                l.counts.errors.add("reply without recovered", || {
                    "the hub answered a subscribe with since without `recovered`: it does not \
                     recover history"
                        .into()
                });
            }
            if not.is_some() && same_epoch && top >= since {
                let window = top - since;
                st.windows += window;
                l.counts.window_msgs += window;
                if st.unaccounted {
                    l.counts.excluded_window_msgs += window;
                }
            } else {
                st.exclude(&mut l.counts);
            }
            st.offsets.restart(chan, top);
            l.counts.recovering -= 1;
            *phase = Phase::Live;
        }
    }
}

/// Thread `tid`'s drop scheduler: drops each due subscriber that is connected.
pub(super) async fn dropper(ctx: Rc<Ctx>, drops: Vec<(u64, usize)>) {
    let _task = ctx.live.task();
    let plan = ctx.plan.clone();
    let Some(start) = ctx.start().await else {
        return;
    };
    let mut timer = match PreciseTimer::new(&ctx.live, plan.uring) {
        Ok(t) => t,
        Err(e) => return ctx.ended("drop scheduler", e),
    };
    for (t, i) in drops {
        if timer.sleep_until(start + t).await.is_err() || ctx.live.closing() {
            return;
        }
        let link = ctx
            .subs
            .borrow()
            .get(&i)
            .and_then(|s| s.link.borrow().clone());
        let mut l = ctx.local.borrow_mut();
        match link {
            Some(link) if !link.dropped.get() => {
                l.counts.drops += 1;
                link.dropped.set(true);
                match plan.drop_mode {
                    DropMode::Abort => client::abort(link.fd),
                    DropMode::Close => {
                        monoio::spawn(send_close(ctx.clone(), link));
                    }
                }
            }
            _ => l.counts.drops_skipped += 1,
        }
    }
}

/// Start a close handshake on `link`; its reader reads on until the hub's close.
async fn send_close(ctx: Rc<Ctx>, link: Rc<Link>) {
    let _task = ctx.live.task();
    for _ in 0..CLOSE_WRITER_TRIES {
        let parked = link.writer.borrow_mut().take();
        if let Some(mut w) = parked {
            // A failed write ends the reader too (the connection is gone).
            let _ = w.send(CLOSE, &1000u16.to_be_bytes()).await;
            *link.writer.borrow_mut() = Some(w);
            return;
        }
        if ctx.live.closing() {
            return;
        }
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
}
