//! History in Redis: the `ringhub` function library, the key names, the payload framing, history
//! reads on the shard's reader link, and the self-healing of a shard's live stream.
//!
//! # Keys and the library
//! A history channel `h:1` lives in three Redis names that share one hash tag, so that they sit in
//! one Redis Cluster slot: `<prefix>{h:1}:stream` (a stream, entry id `0-<offset>`, one field `d`
//! with the data), `<prefix>{h:1}:meta` (a hash: `epoch`, `top`), and the pub/sub channel
//! `<prefix>{h:1}:pub`. Channels without history keep `<prefix>chan:<name>`. Every publish is one
//! `FCALL ringhub_publish` ([`LIBRARY`]): number, append, trim, expire and `PUBLISH` the framed
//! payload `@<offset>:<epoch>:<data>` in one atomic step; `FCALL ringhub_read` reads a page (and
//! creates the channel's epoch when it has none). The library is loaded with
//! `FUNCTION LOAD REPLACE` whenever the publisher or reader link connects.
//!
//! # Lost library
//! After `FUNCTION FLUSH` (or a Redis that restarted without persistence under a live link) an
//! `FCALL` fails with "Function not found". The publisher link then stops writing, lets every
//! command already sent answer, and re-sends — after one `FUNCTION LOAD REPLACE` — exactly the
//! refused publishes, in their order, ahead of anything queued later. A refused publish never ran,
//! so none is lost or duplicated. (Should another instance reload the library between two of our
//! in-flight commands, a later publish of ours can run before a refused earlier one: the only
//! case where per-publisher order can bend, and it needs a `FUNCTION FLUSH` during a publish.)
//!
//! # Self-healing
//! On one connection Redis delivers a channel's messages in offset order, so a shard's live stream
//! can only have holes where its subscriber link reconnected (or where Redis lost messages). Each
//! history channel the shard serves is *tracked* ([`Track`]):
//! - a live message whose offset skips (same epoch, offset > last + 1) starts a *repair*: the
//!   missing range is read from the stream and delivered first; the channel's newer live messages
//!   are held meanwhile and then delivered (duplicates are dropped by `Shard::deliver_numbered`);
//! - when the subscriber link has re-subscribed after a reconnect (and when the reader link
//!   comes back), one pipelined `HMGET meta epoch top` per channel compares Redis' top with the
//!   shard's position and repairs what is missing (a quiet channel has no next message to reveal
//!   the hole);
//! - every [`CHECK_INTERVAL`] the same check runs again; a channel whose position is still below
//!   the top seen by the *previous* check (so the message had two seconds to arrive) is repaired.
//!
//! A gap that can no longer be filled (trimmed past `history_size`, expired, or larger than
//! `max_recovery`) is not silent: the shard sends `reset` (same epoch, `offset` = the last offset
//! before what follows) to its subscribers, then continues.

use super::{LinkState, Links, Role, CONNECT_TIMEOUT};
use crate::broker::{BrokerError, HistoryFuture};
use crate::codec::{self, OpCode};
use crate::history::{HistoryOptions, Page};
use crate::recovery::HoldState;
use crate::resp::{self, Frame};
use crate::shard::{Shard, ShardRef};
use bytes::{Bytes, BytesMut};
use futures_channel::oneshot;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

/// The function library (Redis 7 Functions). Loaded with `FUNCTION LOAD REPLACE`.
///
/// `ringhub_publish 2 <stream> <meta> <pubsub channel> <data> <size> <ttl ms> <meta ttl ms>`
/// returns `{offset, epoch}`; `ringhub_read 2 <stream> <meta> <since> <limit> <meta ttl ms>`
/// returns `{epoch, top, complete (0/1), entries}` with at most `limit` entries after `since`.
/// A channel without meta gets a new epoch (from `TIME`) and an empty stream.
pub const LIBRARY: &str = r#"#!lua name=ringhub

-- The channel's epoch; a channel without meta starts a new epoch with an empty stream.
local function epoch_of(keys, meta_ttl)
  local epoch = redis.call('HGET', keys[2], 'epoch')
  if epoch then
    return epoch
  end
  local t = redis.call('TIME')
  epoch = string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
  redis.call('DEL', keys[1])
  redis.call('HSET', keys[2], 'epoch', epoch, 'top', 0)
  redis.call('PEXPIRE', keys[2], meta_ttl)
  return epoch
end

-- KEYS: stream, meta. ARGV: pub/sub channel, data, history size, ttl ms, meta ttl ms.
local function publish(keys, args)
  local epoch = epoch_of(keys, args[5])
  local top = redis.call('HINCRBY', keys[2], 'top', 1)
  local id = string.format('0-%d', top)
  redis.call('XADD', keys[1], 'MAXLEN', args[3], id, 'd', args[2])
  redis.call('PEXPIRE', keys[1], args[4])
  redis.call('PEXPIRE', keys[2], args[5])
  redis.call('PUBLISH', args[1], string.format('@%d:%s:', top, epoch) .. args[2])
  return {top, epoch}
end

-- KEYS: stream, meta. ARGV: since, limit, meta ttl ms.
local function read(keys, args)
  local epoch = epoch_of(keys, args[3])
  local top = tonumber(redis.call('HGET', keys[2], 'top') or '0')
  local since = tonumber(args[1])
  local limit = tonumber(args[2])
  local entries = {}
  local complete = 1
  if since < top then
    local first = string.format('0-%d', since + 1)
    local got = redis.call('XRANGE', keys[1], first, '+', 'COUNT', math.max(limit, 1))
    if #got == 0 or got[1][1] ~= first then
      complete = 0
    end
    if limit > 0 then
      entries = got
    end
  end
  return {epoch, top, complete, entries}
end

redis.register_function('ringhub_publish', publish)
redis.register_function('ringhub_read', read)
"#;

/// How often a shard compares its history channels' positions with Redis.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Live messages of one channel held behind a repair; beyond this the repair is abandoned
/// (`reset`) so that a reader link that stays down cannot grow memory without bound.
const MAX_HELD: usize = 10_000;
/// Attempts of one command refused with "function not found" (each after a reload).
const MAX_TRIES: u8 = 3;

/// `<prefix>{<channel>}:stream`
pub fn stream_key(prefix: &str, channel: &str) -> Vec<u8> {
    format!("{prefix}{{{channel}}}:stream").into_bytes()
}

/// `<prefix>{<channel>}:meta`
pub fn meta_key(prefix: &str, channel: &str) -> Vec<u8> {
    format!("{prefix}{{{channel}}}:meta").into_bytes()
}

/// `<prefix>{<channel>}:pub`: the pub/sub channel of a history channel.
pub fn pub_channel(prefix: &str, channel: &str) -> Vec<u8> {
    format!("{prefix}{{{channel}}}:pub").into_bytes()
}

/// The hub channel of a history pub/sub name (`<prefix>{<channel>}:pub`).
pub fn parse_pub_channel<'a>(prefix: &str, name: &'a [u8]) -> Option<&'a str> {
    let inner = name
        .strip_prefix(prefix.as_bytes())?
        .strip_prefix(b"{")?
        .strip_suffix(b"}:pub")?;
    let channel = std::str::from_utf8(inner).ok()?;
    (!channel.is_empty() && !channel.contains(['{', '}'])).then_some(channel)
}

/// Split a framed payload `@<offset>:<epoch>:<data>` into (offset, epoch, data). `None` for
/// anything else (a plain `PUBLISH`, which history channels drop).
pub fn parse_framed(payload: &[u8]) -> Option<(u64, &str, &[u8])> {
    let rest = payload.strip_prefix(b"@")?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let digits = &rest[..colon];
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let offset: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let rest = &rest[colon + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let epoch = std::str::from_utf8(&rest[..colon]).ok()?;
    if offset == 0 || epoch.is_empty() || epoch.len() > 64 {
        return None;
    }
    Some((offset, epoch, &rest[colon + 1..]))
}

/// A Redis error meaning the library is not loaded (after `FUNCTION FLUSH` or a restart).
fn is_not_found(e: &[u8]) -> bool {
    let e = String::from_utf8_lossy(e).to_ascii_lowercase();
    e.contains("function not found") || e.starts_with("noscript")
}

fn text(f: &Frame) -> Option<&[u8]> {
    match f {
        Frame::Bulk(b) | Frame::Simple(b) | Frame::VerbatimString(b) => Some(b),
        _ => None,
    }
}

fn int(f: &Frame) -> Option<u64> {
    match f {
        Frame::Integer(n) => u64::try_from(*n).ok(),
        other => std::str::from_utf8(text(other)?).ok()?.parse().ok(),
    }
}

/// The reply of `ringhub_read` as a [`Page`] (entries above `top` cannot occur: the read is
/// atomic). Data that is not JSON becomes a JSON string, as for live messages.
fn parse_page(f: &Frame) -> Option<Page> {
    let Frame::Array(items) = f else {
        return None;
    };
    let [epoch, top, complete, Frame::Array(entries)] = items.as_slice() else {
        return None;
    };
    let epoch = std::str::from_utf8(text(epoch)?).ok()?;
    let top = int(top)?;
    let mut messages = Vec::with_capacity(entries.len());
    for e in entries {
        let Frame::Array(parts) = e else {
            return None;
        };
        let [id, Frame::Array(fields)] = parts.as_slice() else {
            return None;
        };
        let offset: u64 = std::str::from_utf8(text(id)?.strip_prefix(b"0-")?)
            .ok()?
            .parse()
            .ok()?;
        let data = fields
            .chunks(2)
            .find(|kv| kv.len() == 2 && text(&kv[0]) == Some(b"d"))
            .and_then(|kv| text(&kv[1]))?;
        let data = crate::protocol::payload_to_json(data);
        messages.push((offset, Bytes::copy_from_slice(&data)));
    }
    Some(Page {
        epoch: Arc::from(epoch),
        top,
        messages,
        complete: int(complete)? == 1,
    })
}

/// What a publisher-link command was (replies come back in order).
#[derive(Debug)]
pub(super) enum PubSent {
    /// A `PUBLISH` of a channel without history.
    Publish,
    Ping,
    /// `FUNCTION LOAD REPLACE` after a "function not found".
    Load,
    /// An `FCALL ringhub_publish` (kept encoded, to be re-sent after a reload).
    Fcall {
        cmd: Bytes,
        tries: u8,
    },
}

/// A reader-link request.
enum Req {
    /// A page for the shard (subscribe with history, `history`, `GET /history`).
    Read {
        channel: Box<str>,
        since: u64,
        limit: usize,
        meta_ttl: u64,
        tries: u8,
        tx: oneshot::Sender<Result<Page, BrokerError>>,
    },
    /// Fill a hole in the shard's live stream (the repair `seq` of `channel`).
    Repair {
        channel: Box<str>,
        seq: u64,
        tries: u8,
    },
    /// `HMGET meta epoch top` for each channel.
    Check {
        channels: Vec<Box<str>>,
        immediate: bool,
    },
    Load,
    Ping,
}

/// A request sent on the reader link, with the replies it got so far.
struct InFlight {
    req: Req,
    need: usize,
    got: Vec<Frame>,
}

/// A live message held behind a repair.
type Held = (u64, Arc<str>, Bytes);

/// A repair of a tracked channel: offsets `after`+1 ..= `to` of `epoch` are fetched.
#[derive(Debug)]
struct Repair {
    seq: u64,
    epoch: Arc<str>,
    after: u64,
    to: u64,
    /// A hole in the subscribers' own epoch: what cannot be fetched is announced with `reset`.
    /// (False for the first messages of a new epoch: `deliver_numbered` announces the epoch.)
    announce: bool,
    /// Sent on the reader link (false: waiting for the link).
    sent: bool,
    /// The channel's live messages that arrived meanwhile, in arrival order.
    held: Vec<Held>,
}

/// A history channel this shard serves (has local subscribers of).
#[derive(Debug, Default)]
struct Track {
    /// A message was delivered since the shard began serving the channel: from then on the
    /// shard's position (`Shard::history_position`) is where its subscribers are.
    live: bool,
    /// Until then: the lowest top of the pages its subscribers read (each has everything up to
    /// its page's top).
    floor: Option<(Arc<str>, u64)>,
    /// Epoch and top seen by the previous periodic check.
    prev: Option<(Arc<str>, u64)>,
    repair: Option<Repair>,
    /// A hole up to this offset was given up on (`reset` sent): the baseline is at least here.
    skip_to: Option<(Arc<str>, u64)>,
    /// The epoch of the last message (reused, so no allocation per message).
    epoch: Option<Arc<str>>,
}

/// A shard's history state in Redis mode (part of [`Links`]).
#[derive(Default)]
pub(super) struct State {
    /// Publisher: every command queued or sent and not answered, oldest first.
    pub(super) pub_sent: VecDeque<PubSent>,
    /// How many of `pub_sent` (the newest) are still in the output buffer.
    pub(super) pub_unwritten: usize,
    /// Publishes refused with "function not found", re-sent after a reload.
    pub_retry: Vec<(Bytes, u8)>,
    /// Reader: requests queued or sent, oldest first.
    reads: VecDeque<InFlight>,
    tracks: HashMap<Box<str>, Track>,
    repair_seq: u64,
    /// A check should run now (after a re-subscribe or the reader's reconnect).
    check_now: bool,
    check_inflight: bool,
    check_waker: Option<Waker>,
    /// A plain PUBLISH on a history channel was logged (once per shard).
    logged_plain: bool,
    /// `max_recovery` of the config: larger holes are not fetched.
    pub(super) max_recovery: usize,
}

impl State {
    pub(super) fn track(&mut self, channel: &str) {
        self.tracks.entry(channel.into()).or_default();
    }

    pub(super) fn untrack(&mut self, channel: &str) {
        self.tracks.remove(channel);
    }

    /// Run a check at once (immediate mode: repair up to the top Redis reports).
    pub(super) fn request_check(&mut self) {
        if self.tracks.is_empty() {
            return;
        }
        self.check_now = true;
        if let Some(w) = self.check_waker.take() {
            w.wake();
        }
    }
}

impl Links {
    fn history_opts(&self, channel: &str) -> Option<HistoryOptions> {
        self.policy.as_ref()?.history(channel)
    }

    /// Queue a request on the reader link.
    fn send_read(&mut self, req: Req) {
        let prefix = &self.cfg.prefix;
        let mut args: Vec<Vec<u8>> = Vec::new();
        let need = match &req {
            Req::Read {
                channel,
                since,
                limit,
                meta_ttl,
                ..
            } => {
                push_read(&mut args, prefix, channel, *since, *limit, *meta_ttl);
                1
            }
            Req::Repair { channel, seq, .. } => {
                let Some(opts) = self.history_opts(channel) else {
                    return;
                };
                let Some(rep) = self
                    .hist
                    .tracks
                    .get(channel)
                    .and_then(|t| t.repair.as_ref())
                    .filter(|r| r.seq == *seq)
                else {
                    return;
                };
                let limit = ((rep.to - rep.after) as usize).min(opts.size);
                let meta_ttl = opts.meta_ttl.as_millis() as u64;
                push_read(&mut args, prefix, channel, rep.after, limit, meta_ttl);
                1
            }
            Req::Check { channels, .. } => {
                for c in channels {
                    let meta = meta_key(prefix, c);
                    resp::encode_command(
                        &mut self.reader.out,
                        &[b"HMGET", &meta, b"epoch", b"top"],
                    );
                }
                channels.len()
            }
            Req::Load => {
                args = vec![b"FUNCTION".to_vec(), b"LOAD".to_vec(), b"REPLACE".to_vec()];
                args.push(LIBRARY.as_bytes().to_vec());
                1
            }
            Req::Ping => {
                args.push(b"PING".to_vec());
                1
            }
        };
        if !args.is_empty() {
            let parts: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            resp::encode_command(&mut self.reader.out, &parts);
        }
        if let Some(w) = self.reader.waker.take() {
            w.wake();
        }
        self.hist.reads.push_back(InFlight {
            req,
            need,
            got: Vec::new(),
        });
    }

    /// The reader link pings while idle.
    pub(super) fn reader_ping(&mut self) {
        self.send_read(Req::Ping);
    }

    /// `Broker::read_history` in Redis mode.
    pub(super) fn read_history(
        &mut self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        opts: &HistoryOptions,
    ) -> HistoryFuture {
        if self.reader.state != LinkState::Ready {
            return Box::pin(async { Err(BrokerError::Unavailable) });
        }
        let (tx, rx) = oneshot::channel();
        self.send_read(Req::Read {
            channel: channel.into(),
            since: since.unwrap_or(0),
            limit,
            meta_ttl: opts.meta_ttl.as_millis() as u64,
            tries: 0,
            tx,
        });
        Box::pin(async move { rx.await.unwrap_or(Err(BrokerError::Unavailable)) })
    }

    /// `Broker::publish_history` in Redis mode: one `FCALL ringhub_publish`, pipelined in order
    /// with the shard's other publishes.
    pub(super) fn publish_history(
        &mut self,
        channel: &str,
        data: &[u8],
        opts: &HistoryOptions,
    ) -> Result<(), BrokerError> {
        if self.publisher.state != LinkState::Ready
            || self.publisher.out.len() > super::MAX_PENDING_PUBLISH_BYTES
        {
            return Err(BrokerError::Unavailable);
        }
        let prefix = &self.cfg.prefix;
        let (stream, meta, chan) = (
            stream_key(prefix, channel),
            meta_key(prefix, channel),
            pub_channel(prefix, channel),
        );
        let size = opts.size.to_string();
        let ttl = (opts.ttl.as_millis() as u64).max(1).to_string();
        let meta_ttl = (opts.meta_ttl.as_millis() as u64).max(1).to_string();
        let mut cmd = BytesMut::new();
        resp::encode_command(
            &mut cmd,
            &[
                b"FCALL",
                b"ringhub_publish",
                b"2",
                &stream,
                &meta,
                &chan,
                data,
                size.as_bytes(),
                ttl.as_bytes(),
                meta_ttl.as_bytes(),
            ],
        );
        let cmd = cmd.freeze();
        self.publisher.out.extend_from_slice(&cmd);
        self.hist
            .pub_sent
            .push_back(PubSent::Fcall { cmd, tries: 1 });
        self.hist.pub_unwritten += 1;
        self.publisher.awaiting += 1;
        if let Some(w) = self.publisher.waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// The reader link is up: re-send the repairs that waited for it, and check every channel.
    pub(super) fn reader_up(&mut self) {
        let waiting: Vec<(Box<str>, u64)> = self
            .hist
            .tracks
            .iter_mut()
            .filter_map(|(c, t)| {
                let r = t.repair.as_mut().filter(|r| !r.sent)?;
                r.sent = true;
                Some((c.clone(), r.seq))
            })
            .collect();
        for (channel, seq) in waiting {
            self.send_read(Req::Repair {
                channel,
                seq,
                tries: 0,
            });
        }
        self.hist.request_check();
    }

    /// A link failed: forget its history bookkeeping (reads fail; repairs wait for the reader).
    pub(super) fn history_down(&mut self, role: Role) {
        match role {
            Role::Publisher => {
                self.hist.pub_sent.clear();
                self.hist.pub_unwritten = 0;
                self.hist.pub_retry.clear();
                self.publisher.hold_output = false;
            }
            Role::Reader => {
                for f in std::mem::take(&mut self.hist.reads) {
                    if let Req::Read { tx, .. } = f.req {
                        let _ = tx.send(Err(BrokerError::Unavailable));
                    }
                }
                for t in self.hist.tracks.values_mut() {
                    if let Some(r) = t.repair.as_mut() {
                        r.sent = false;
                    }
                }
                self.hist.check_inflight = false;
            }
            Role::Subscriber => {}
        }
    }

    /// Queue a check of every tracked channel whose subscription is confirmed.
    fn send_check(&mut self, immediate: bool) {
        if self.reader.state != LinkState::Ready || self.subscriber.state != LinkState::Ready {
            return; // each link's return asks for a check
        }
        if self.hist.check_inflight {
            // Run right after the one in flight (which wakes the loop when it completes).
            self.hist.check_now |= immediate;
            return;
        }
        let channels: Vec<Box<str>> = self
            .hist
            .tracks
            .keys()
            .filter(|c| {
                self.channels
                    .get(&***c)
                    .is_some_and(|ch| ch.subscribed && ch.inflight.is_empty())
            })
            .cloned()
            .collect();
        if channels.is_empty() {
            return;
        }
        self.hist.check_inflight = true;
        self.send_read(Req::Check {
            channels,
            immediate,
        });
    }

    /// Start repairing `channel`: fetch `after`+1 ..= `to` of `epoch`, holding `held` (and the
    /// channel's later live messages) until it is done. Returns false when the hole is too large
    /// to fetch (more than `max_recovery`): the caller resets instead.
    fn start_repair(
        &mut self,
        channel: &str,
        epoch: Arc<str>,
        (after, to): (u64, u64),
        announce: bool,
        held: Vec<Held>,
    ) -> bool {
        if to - after > self.hist.max_recovery as u64 {
            return false;
        }
        self.hist.repair_seq += 1;
        let seq = self.hist.repair_seq;
        let sent = self.reader.state == LinkState::Ready;
        let Some(track) = self.hist.tracks.get_mut(channel) else {
            return false;
        };
        track.repair = Some(Repair {
            seq,
            epoch,
            after,
            to,
            announce,
            sent,
            held,
        });
        if sent {
            self.send_read(Req::Repair {
                channel: channel.into(),
                seq,
                tries: 0,
            });
        }
        true
    }
}

fn push_read(
    args: &mut Vec<Vec<u8>>,
    prefix: &str,
    channel: &str,
    since: u64,
    limit: usize,
    meta_ttl: u64,
) {
    args.extend([
        b"FCALL".to_vec(),
        b"ringhub_read".to_vec(),
        b"2".to_vec(),
        stream_key(prefix, channel),
        meta_key(prefix, channel),
        since.to_string().into_bytes(),
        limit.to_string().into_bytes(),
        meta_ttl.max(1).to_string().into_bytes(),
    ]);
}

/// `CLIENT SETNAME` (so operators, and tests, can find a link in `CLIENT LIST`) and, on the
/// publisher and reader links of a shard with history, `FUNCTION LOAD REPLACE`. Run once per
/// connection, before the link is ready.
pub(super) async fn prepare(
    conn: &mut super::RedisConn,
    links: &Rc<RefCell<Links>>,
    role: Role,
) -> io::Result<()> {
    let (name, load) = {
        let l = links.borrow();
        let suffix = match role {
            Role::Publisher => "pub",
            Role::Subscriber => "sub",
            Role::Reader => "read",
        };
        let name = l.name.as_ref().map(|n| format!("{n}-{suffix}"));
        let history = l.policy.as_ref().is_some_and(|p| p.any_history());
        (name, history && role != Role::Subscriber)
    };
    let mut cmds = BytesMut::new();
    let mut n = 0;
    if let Some(name) = &name {
        resp::encode_command(&mut cmds, &[b"CLIENT", b"SETNAME", name.as_bytes()]);
        n += 1;
    }
    if load {
        resp::encode_command(
            &mut cmds,
            &[b"FUNCTION", b"LOAD", b"REPLACE", LIBRARY.as_bytes()],
        );
        n += 1;
    }
    if n == 0 {
        return Ok(());
    }
    let replies = match monoio::time::timeout(CONNECT_TIMEOUT, conn.pipeline(cmds, n)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "Redis did not answer CLIENT SETNAME / FUNCTION LOAD",
            ))
        }
    };
    for r in replies {
        if let Frame::Error(e) = r {
            tracing::warn!(
                ?role,
                error = %String::from_utf8_lossy(&e),
                "Redis refused a link setup command (history needs Redis 7 Functions)"
            );
        }
    }
    Ok(())
}

/// One reply on the publisher link.
pub(super) fn on_publisher_reply(links: &Rc<RefCell<Links>>, frame: Frame) {
    let mut l = links.borrow_mut();
    let l = &mut *l;
    l.publisher.awaiting = l.publisher.awaiting.saturating_sub(1);
    let sent = l.hist.pub_sent.pop_front();
    match (sent, &frame) {
        (_, Frame::Simple(s)) if s.eq_ignore_ascii_case(b"PONG") => l.publisher.ping_sent = None,
        (Some(PubSent::Fcall { cmd, tries }), Frame::Error(e)) if is_not_found(e) => {
            if tries < MAX_TRIES {
                l.hist.pub_retry.push((cmd, tries + 1));
                l.publisher.hold_output = true;
            } else {
                tracing::error!(shard = l.shard, "a history publish was dropped: the ringhub function library could not be loaded");
            }
        }
        (Some(PubSent::Fcall { .. }), Frame::Error(e)) => {
            tracing::warn!(shard = l.shard, error = %String::from_utf8_lossy(e), "Redis refused a history publish");
        }
        (Some(PubSent::Load), Frame::Error(e)) => {
            tracing::warn!(shard = l.shard, error = %String::from_utf8_lossy(e), "Redis refused FUNCTION LOAD");
        }
        (_, Frame::Error(e)) => {
            tracing::warn!(shard = l.shard, error = %String::from_utf8_lossy(e), "Redis refused a PUBLISH");
        }
        _ => {}
    }
    // Once every command sent before the refusal has answered: reload the library, then the
    // refused publishes in their order, then whatever was queued meanwhile.
    if l.publisher.hold_output && l.hist.pub_sent.len() == l.hist.pub_unwritten {
        tracing::info!(
            shard = l.shard,
            publishes = l.hist.pub_retry.len(),
            "the ringhub function library was missing; reloading it and re-sending"
        );
        let mut out = BytesMut::new();
        resp::encode_command(
            &mut out,
            &[b"FUNCTION", b"LOAD", b"REPLACE", LIBRARY.as_bytes()],
        );
        let mut front = vec![PubSent::Load];
        for (cmd, tries) in l.hist.pub_retry.drain(..) {
            out.extend_from_slice(&cmd);
            front.push(PubSent::Fcall { cmd, tries });
        }
        l.publisher.awaiting += front.len();
        l.hist.pub_unwritten += front.len();
        for s in front.into_iter().rev() {
            l.hist.pub_sent.push_front(s);
        }
        out.extend_from_slice(&l.publisher.out);
        l.publisher.out = out;
        l.publisher.hold_output = false;
    }
}

/// One reply on the reader link.
pub(super) fn on_reader_reply(
    shard: &ShardRef,
    links: &Rc<RefCell<Links>>,
    frame: Frame,
) -> io::Result<()> {
    let done = {
        let mut l = links.borrow_mut();
        let Some(front) = l.hist.reads.front_mut() else {
            return Err(io::Error::other(
                "unexpected reply on the Redis reader link",
            ));
        };
        front.got.push(frame);
        if front.got.len() < front.need {
            return Ok(());
        }
        l.hist.reads.pop_front().expect("front exists")
    };
    let mut got = done.got;
    // A request refused because the library is missing: reload it and send the request again.
    let refused = |f: &Frame| matches!(f, Frame::Error(e) if is_not_found(e));
    match done.req {
        Req::Ping => links.borrow_mut().reader.ping_sent = None,
        Req::Load => {
            if let Some(Frame::Error(e)) = got.first() {
                tracing::warn!(error = %String::from_utf8_lossy(e), "Redis refused FUNCTION LOAD");
            }
        }
        Req::Read {
            channel,
            since,
            limit,
            meta_ttl,
            tries,
            tx,
        } => {
            let reply = got.pop().unwrap_or(Frame::Null);
            if refused(&reply) && tries < MAX_TRIES {
                let mut l = links.borrow_mut();
                l.send_read(Req::Load);
                l.send_read(Req::Read {
                    channel,
                    since,
                    limit,
                    meta_ttl,
                    tries: tries + 1,
                    tx,
                });
                return Ok(());
            }
            let page = parse_page(&reply);
            if page.is_none() {
                tracing::warn!(%channel, reply = ?reply, "unexpected reply to a history read");
            }
            if let Some(p) = &page {
                links.borrow_mut().note_page(&channel, p);
            }
            let _ = tx.send(page.ok_or(BrokerError::Unavailable));
        }
        Req::Repair {
            channel,
            seq,
            tries,
        } => {
            let reply = got.pop().unwrap_or(Frame::Null);
            if refused(&reply) && tries < MAX_TRIES {
                let mut l = links.borrow_mut();
                l.send_read(Req::Load);
                l.send_read(Req::Repair {
                    channel,
                    seq,
                    tries: tries + 1,
                });
                return Ok(());
            }
            let page = parse_page(&reply);
            if page.is_none() {
                tracing::warn!(%channel, reply = ?reply, "unexpected reply to a history repair");
            }
            finish_repair(shard, links, &channel, seq, page);
        }
        Req::Check {
            channels,
            immediate,
        } => {
            for (channel, reply) in channels.iter().zip(got.iter()) {
                check_one(shard, links, channel, reply, immediate);
            }
            let mut l = links.borrow_mut();
            l.hist.check_inflight = false;
            if l.hist.check_now {
                if let Some(w) = l.hist.check_waker.take() {
                    w.wake();
                }
            }
        }
    }
    Ok(())
}

impl Links {
    /// A page was read for the shard: while no message of the channel was delivered yet, its
    /// subscribers have at least everything up to the lowest page top.
    fn note_page(&mut self, channel: &str, page: &Page) {
        let Some(t) = self.hist.tracks.get_mut(channel) else {
            return;
        };
        if t.live {
            return;
        }
        t.floor = match t.floor.take() {
            Some((e, top)) if *e == *page.epoch => Some((e, top.min(page.top))),
            _ => Some((page.epoch.clone(), page.top)),
        };
    }

    /// Where the shard's subscribers of a tracked channel are: the shard's position once it has
    /// delivered, else the floor of their pages; past a hole given up on.
    fn baseline(
        &self,
        channel: &str,
        position: Option<(Arc<str>, u64)>,
    ) -> Option<(Arc<str>, u64)> {
        let t = self.hist.tracks.get(channel)?;
        let base = if t.live { position } else { t.floor.clone() };
        match (base, &t.skip_to) {
            (Some((e, last)), Some((se, to))) if *e == **se => Some((e, last.max(*to))),
            (None, Some(skip)) => Some(skip.clone()),
            (base, _) => base,
        }
    }

    /// Subscribers were told (`reset`) that `channel` lost messages up to `to`.
    fn skip_past(&mut self, channel: &str, epoch: &Arc<str>, to: u64) {
        if let Some(t) = self.hist.tracks.get_mut(channel) {
            t.skip_to = Some((epoch.clone(), to));
        }
    }
}

/// What to do with a live message of a tracked channel.
enum Step {
    Deliver(Arc<str>),
    /// Held behind a repair (in flight or just started).
    Held,
    /// A hole too large to fetch: reset after `to`, then deliver.
    Reset {
        epoch: Arc<str>,
        to: u64,
        missing: u64,
    },
}

/// A message arrived on a history channel's pub/sub channel.
pub(super) fn on_message(
    shard: &ShardRef,
    links: &Rc<RefCell<Links>>,
    channel: &str,
    payload: &[u8],
) {
    let Some((offset, epoch, data)) = parse_framed(payload) else {
        let mut l = links.borrow_mut();
        if !l.hist.logged_plain {
            l.hist.logged_plain = true;
            tracing::warn!(
                channel,
                "dropped a plain PUBLISH on a history channel: publish with FCALL ringhub_publish"
            );
        }
        return;
    };
    let data = crate::protocol::payload_to_json(data);
    shard.borrow_mut().metrics.bus_messages_received += 1;
    let epoch = {
        let mut l = links.borrow_mut();
        match l.hist.tracks.get_mut(channel) {
            Some(t) => match &t.epoch {
                Some(e) if **e == *epoch => e.clone(),
                _ => {
                    let e: Arc<str> = Arc::from(epoch);
                    t.epoch = Some(e.clone());
                    e
                }
            },
            None => Arc::from(epoch),
        }
    };
    live(shard, links, channel, offset, epoch, &data);
}

/// Deliver one live message of `channel` in order, repairing a hole in front of it first.
fn live(
    shard: &ShardRef,
    links: &Rc<RefCell<Links>>,
    channel: &str,
    offset: u64,
    epoch: Arc<str>,
    data: &[u8],
) {
    let position = shard.borrow().history_position(channel);
    let step = {
        let mut l = links.borrow_mut();
        let base = l.baseline(channel, position.clone());
        let Some(t) = l.hist.tracks.get_mut(channel) else {
            drop(l);
            shard
                .borrow_mut()
                .deliver_numbered(channel, data, offset, &epoch);
            return;
        };
        if let Some(r) = t.repair.as_mut() {
            r.held.push((offset, epoch, Bytes::copy_from_slice(data)));
            if r.held.len() <= MAX_HELD {
                return;
            }
            // The reader link has been gone too long: give up on this hole.
            let seq = r.seq;
            drop(l);
            tracing::warn!(
                channel,
                "abandoned a history repair: too many messages held"
            );
            finish_repair(shard, links, channel, seq, None);
            return;
        }
        match base {
            // Every subscriber has it already (its page, the shard's position, or a `reset` past
            // it).
            Some((e, last)) if *e == *epoch && offset <= last => return,
            Some((e, last)) if *e == *epoch && offset > last.saturating_add(1) => {
                let held = vec![(offset, epoch.clone(), Bytes::copy_from_slice(data))];
                if l.start_repair(channel, epoch.clone(), (last, offset - 1), true, held) {
                    Step::Held
                } else {
                    l.skip_past(channel, &epoch, offset - 1);
                    Step::Reset {
                        epoch,
                        to: offset - 1,
                        missing: offset - 1 - last,
                    }
                }
            }
            Some((e, _)) if *e != *epoch && offset > 1 => {
                // A new epoch whose first messages never reached this shard: fetch them too
                // (`deliver_numbered` sends the `reset` before the first).
                let held = vec![(offset, epoch.clone(), Bytes::copy_from_slice(data))];
                if l.start_repair(channel, epoch.clone(), (0, offset - 1), false, held) {
                    Step::Held
                } else {
                    if let Some(t) = l.hist.tracks.get_mut(channel) {
                        t.live = true;
                    }
                    Step::Deliver(epoch)
                }
            }
            _ => {
                t.live = true;
                Step::Deliver(epoch)
            }
        }
    };
    let mut s = shard.borrow_mut();
    match step {
        Step::Held => {}
        Step::Deliver(epoch) => s.deliver_numbered(channel, data, offset, &epoch),
        Step::Reset { epoch, to, missing } => {
            tracing::warn!(
                channel,
                missing,
                "a history gap larger than max_recovery: subscribers get reset"
            );
            s.reset_after_gap(channel, &epoch, to);
            s.deliver_numbered(channel, data, offset, &epoch);
            drop(s);
            if let Some(t) = links.borrow_mut().hist.tracks.get_mut(channel) {
                t.live = true;
            }
        }
    }
}

/// A repair's page arrived (or the repair was abandoned: `None`): deliver the missing messages
/// (with a `reset` first when some could not be fetched), then the held live ones.
fn finish_repair(
    shard: &ShardRef,
    links: &Rc<RefCell<Links>>,
    channel: &str,
    seq: u64,
    page: Option<Page>,
) {
    let rep = {
        let mut l = links.borrow_mut();
        let Some(t) = l.hist.tracks.get_mut(channel) else {
            return;
        };
        if t.repair.as_ref().is_none_or(|r| r.seq != seq) {
            return;
        }
        t.repair.take().expect("checked")
    };
    // The channel's epoch in Redis, when the read came back.
    let real_epoch = page.as_ref().map(|p| p.epoch.clone());
    let page = page.filter(|p| *p.epoch == *rep.epoch);
    let msgs: Vec<(u64, Bytes)> = page
        .map(|p| p.messages)
        .unwrap_or_default()
        .into_iter()
        .filter(|(o, _)| *o > rep.after && *o <= rep.to)
        .collect();
    // A hole within the subscribers' epoch that cannot be filled (trimmed, expired, the epoch
    // changed, or no page) is announced; a new epoch is announced by `deliver_numbered` itself.
    let reaches = msgs.first().is_some_and(|(o, _)| *o == rep.after + 1);
    if !reaches && rep.announce {
        let to = msgs.first().map_or(rep.to, |(o, _)| o - 1);
        tracing::warn!(
            channel,
            from = rep.after + 1,
            to,
            "a history gap could not be repaired (trimmed or expired): subscribers get reset"
        );
        links.borrow_mut().skip_past(channel, &rep.epoch, to);
        shard.borrow_mut().reset_after_gap(channel, &rep.epoch, to);
    }
    if !msgs.is_empty() {
        let mut s = shard.borrow_mut();
        let mut repaired = 0;
        for (offset, data) in &msgs {
            let new = match s.history_position(channel) {
                Some((e, p)) if *e == *rep.epoch => *offset > p,
                _ => true,
            };
            s.deliver_numbered(channel, data, *offset, &rep.epoch);
            repaired += new as u64;
        }
        s.metrics.history_repaired += repaired;
        drop(s);
        if let Some(t) = links.borrow_mut().hist.tracks.get_mut(channel) {
            t.live = true;
        }
    }
    if !reaches {
        // The hole cannot be filled. Deliver what was held directly: replaying it through
        // `live()` would start the same repair again (a loop that stalls the channel, and
        // recursion when too much is held). Held messages of an epoch that is not the
        // channel's epoch in Redis (a stale or forged frame) are dropped; `deliver_numbered`
        // announces a new epoch with `reset` and drops duplicates.
        let mut s = shard.borrow_mut();
        for (offset, epoch, data) in rep.held {
            if real_epoch.as_ref().is_some_and(|r| **r != *epoch) {
                continue;
            }
            s.deliver_numbered(channel, &data, offset, &epoch);
        }
        drop(s);
        if let Some(t) = links.borrow_mut().hist.tracks.get_mut(channel) {
            t.live = true;
        }
        return;
    }
    for (offset, epoch, data) in rep.held {
        live(shard, links, channel, offset, epoch, &data);
    }
}

/// One channel's `HMGET epoch top` of a check.
fn check_one(
    shard: &ShardRef,
    links: &Rc<RefCell<Links>>,
    channel: &str,
    reply: &Frame,
    immediate: bool,
) {
    let (epoch, top) = match reply {
        Frame::Array(v) if v.len() == 2 => match (text(&v[0]), int(&v[1])) {
            (Some(e), Some(t)) => (String::from_utf8_lossy(e).into_owned(), t),
            _ => return, // no meta: the next publish starts a new epoch (reset then)
        },
        _ => return,
    };
    let position = shard.borrow().history_position(channel);
    let reset = {
        let mut l = links.borrow_mut();
        let base = l.baseline(channel, position);
        let Some(t) = l.hist.tracks.get_mut(channel) else {
            return;
        };
        let prev = t.prev.replace((Arc::from(epoch.as_str()), top));
        if t.repair.is_some() {
            return;
        }
        // Immediate: repair up to the top now (messages still in flight are dropped as
        // duplicates). Periodic: only what the previous check already saw.
        let target = if immediate {
            Some(top)
        } else {
            prev.filter(|(e, _)| **e == *epoch).map(|(_, t)| t)
        };
        let Some(target) = target else {
            return;
        };
        let epoch: Arc<str> = Arc::from(epoch.as_str());
        match base {
            Some((e, last)) if *e == *epoch && last < target => {
                if l.start_repair(channel, epoch.clone(), (last, target), true, Vec::new()) {
                    None
                } else {
                    l.skip_past(channel, &epoch, target);
                    Some((epoch, target))
                }
            }
            Some((e, _)) if *e != *epoch && target > 0 => {
                // A new epoch whose messages never reached this shard.
                l.start_repair(channel, epoch, (0, target), false, Vec::new());
                None
            }
            _ => None,
        }
    };
    if let Some((epoch, to)) = reset {
        tracing::warn!(
            channel,
            "a history gap larger than max_recovery: subscribers get reset"
        );
        shard.borrow_mut().reset_after_gap(channel, &epoch, to);
    }
}

/// Run the checks: every [`CHECK_INTERVAL`], and at once when asked (after a re-subscribe or the
/// reader's reconnect).
pub(super) async fn check_loop(links: Rc<RefCell<Links>>) {
    loop {
        {
            let timer = std::pin::pin!(monoio::time::sleep(CHECK_INTERVAL));
            let now = std::pin::pin!(std::future::poll_fn(|cx| {
                let mut l = links.borrow_mut();
                if l.hist.check_now {
                    Poll::Ready(())
                } else {
                    l.hist.check_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }));
            futures_util::future::select(timer, now).await;
        }
        let mut l = links.borrow_mut();
        let immediate = std::mem::take(&mut l.hist.check_now);
        l.send_check(immediate);
    }
}

impl Shard {
    /// Redis mode: messages of `channel` up to `offset` could not be delivered to this shard
    /// (trimmed, expired, or too many). Tell its subscribers with `reset` (same epoch, `offset` =
    /// the last offset before what follows), except those whose page already reached past the
    /// hole. A connection still reading its page gets the frame in its hold at `offset`, so the
    /// page/held merge sends it in place (or drops it when the page covers the hole).
    pub(crate) fn reset_after_gap(&mut self, channel: &str, epoch: &Arc<str>, offset: u64) {
        let frame = codec::encode_frame(
            OpCode::Data(codec::Data::Text),
            crate::protocol::reset(channel, epoch, offset).as_bytes(),
        );
        let limit = self.cfg.max_queued_bytes;
        let keys: Vec<usize> = self.topics.subscribers(channel).collect();
        for key in keys {
            let hold = self
                .holds
                .get_mut(&key)
                .and_then(|hs| hs.iter_mut().find(|h| *h.channel == *channel));
            let send = match hold.map(|h| &mut h.state) {
                Some(HoldState::Reading { held, .. }) => {
                    held.push((offset, epoch.clone(), frame.clone()));
                    false
                }
                Some(HoldState::Skipping { through, epoch: e }) => {
                    **e != **epoch || *through < offset
                }
                None => true,
            };
            if send {
                self.queue_or_cut(key, frame.clone(), limit);
            }
        }
        self.metrics.history_resets += 1;
        self.flush_slow();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_share_the_hash_tag() {
        assert_eq!(stream_key("ws:", "h:1"), b"ws:{h:1}:stream");
        assert_eq!(meta_key("ws:", "h:1"), b"ws:{h:1}:meta");
        assert_eq!(pub_channel("ws:", "h:1"), b"ws:{h:1}:pub");
        assert_eq!(parse_pub_channel("ws:", b"ws:{h:1}:pub"), Some("h:1"));
        assert_eq!(parse_pub_channel("ws:", b"ws:chan:h:1"), None);
        assert_eq!(parse_pub_channel("ws:", b"ws:{}:pub"), None);
        assert_eq!(parse_pub_channel("ws:", b"ws:{a}b}:pub"), None);
        assert_eq!(parse_pub_channel("x:", b"ws:{h:1}:pub"), None);
    }

    #[test]
    fn framing() {
        assert_eq!(
            parse_framed(b"@42:18c0ffee:{\"a\":\"b:c\"}"),
            Some((42, "18c0ffee", &b"{\"a\":\"b:c\"}"[..]))
        );
        assert_eq!(parse_framed(b"@1:e:"), Some((1, "e", &b""[..])));
        for bad in [
            &b"{\"a\":1}"[..],
            b"@:e:1",
            b"@0:e:1",
            b"@1::1",
            b"@1:e",
            b"@x:e:1",
            b"@-1:e:1",
            b"@99999999999999999999999:e:1",
            b"",
        ] {
            assert_eq!(
                parse_framed(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn pages_parse_and_non_json_becomes_a_string() {
        let b = |s: &str| Frame::Bulk(Bytes::copy_from_slice(s.as_bytes()));
        let entry = |id: &str, d: &str| Frame::Array(vec![b(id), Frame::Array(vec![b("d"), b(d)])]);
        let f = Frame::Array(vec![
            b("ep"),
            Frame::Integer(7),
            Frame::Integer(1),
            Frame::Array(vec![entry("0-6", "{\"n\":6}"), entry("0-7", "hi")]),
        ]);
        let p = parse_page(&f).unwrap();
        assert_eq!(&*p.epoch, "ep");
        assert_eq!(p.top, 7);
        assert!(p.complete);
        assert_eq!(
            p.messages,
            vec![
                (6, Bytes::from_static(b"{\"n\":6}")),
                (7, Bytes::from_static(b"\"hi\""))
            ]
        );
        assert!(parse_page(&Frame::Null).is_none());
    }

    #[test]
    fn not_found_errors() {
        assert!(is_not_found(b"ERR Function not found"));
        assert!(is_not_found(b"NOSCRIPT No matching script."));
        assert!(!is_not_found(b"ERR wrong number of arguments"));
    }
}
