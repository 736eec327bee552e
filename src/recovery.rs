//! History on a shard: numbered delivery, subscribing to a history channel (with or without
//! `since`), the per-connection holds that make the seam between history and the live stream
//! gapless, history reads, and (embedded mode) the owner shard's store.
//!
//! # The seam
//! A subscribe to a history channel first subscribes the connection (so live messages reach the
//! shard), then reads the channel's history (the owner shard in embedded mode, Redis otherwise)
//! and answers only when the read returns. Meanwhile the connection's live messages of that
//! channel are *held* ([`HoldState::Reading`]). When the page arrives: the reply carries the
//! page's epoch and top offset `T`; the backlog (`since`+1 ..= `T`) is sent when recovery is
//! complete; held messages with offset > `T` follow in order; and the connection then *skips*
//! live messages with offset ≤ `T` still in flight ([`HoldState::Skipping`]) until the first one
//! above `T` passes. Every offset is therefore delivered once, in order.
//!
//! Why this is gapless: the connection is subscribed before the read starts, so every message
//! numbered after the read is delivered live; every message up to the read is in the page.
//! (Embedded mode: the shard's interest reaches the owner before the read request, both through
//! the owner's FIFO inbox. Redis mode: the read starts after Redis confirmed the SUBSCRIBE, and
//! the Redis layer repairs gaps in the shard's live stream from the stream.)
//!
//! Cost: only history channels pay (one map lookup for the channel's position, and a hold check
//! only while some connection of the shard is recovering).

use crate::broker::{BrokerError, HistoryFuture};
use crate::codec::{self, OpCode};
use crate::history::{self, HistoryOptions, Page, Recovery, Since};
use crate::inbox::ShardMsg;
use crate::protocol::{self, ErrorCode};
use crate::shard::{Phase, Shard, ShardRef};
use bytes::{Bytes, BytesMut};
use serde_json::value::RawValue;
use std::sync::Arc;

/// A connection's hold on one history channel.
#[derive(Debug)]
pub struct Hold {
    pub channel: Box<str>,
    pub state: HoldState,
}

/// Where a connection is in joining a history channel's live stream.
#[derive(Debug)]
pub enum HoldState {
    /// The history read is in flight: live messages wait here (offset, epoch, frame), in
    /// arrival order (increasing within an epoch); `bytes` counts them against the
    /// connection's outbox budget.
    Reading {
        held: Vec<(u64, Arc<str>, Bytes)>,
        bytes: usize,
    },
    /// The page went out up to `through`: skip live messages at or below it (same epoch).
    Skipping { through: u64, epoch: Arc<str> },
}

/// A history read, ready or in flight.
pub enum Read {
    Ready(Page),
    /// Embedded: the owner shard answers.
    Owner(futures_channel::oneshot::Receiver<Page>),
    /// Redis mode.
    Bus(HistoryFuture),
}

impl Read {
    /// Wait for the page.
    pub async fn page(self) -> Result<Page, BrokerError> {
        match self {
            Read::Ready(p) => Ok(p),
            Read::Owner(rx) => rx.await.map_err(|_| BrokerError::Unavailable),
            Read::Bus(f) => f.await,
        }
    }
}

/// A numbered message frame: built once per shard per message.
fn numbered_frame(channel: &str, offset: u64, data: &[u8]) -> Bytes {
    let len = protocol::numbered_message_json_len(channel, offset, data);
    let mut buf = BytesMut::with_capacity(codec::frame_header_len(len) + len);
    codec::write_frame_header(&mut buf, OpCode::Data(codec::Data::Text), len);
    protocol::write_numbered_message_json(&mut buf, channel, offset, data);
    buf.freeze()
}

fn text_frame(json: &str) -> Bytes {
    codec::encode_frame(OpCode::Data(codec::Data::Text), json.as_bytes())
}

/// What a subscribe to a history channel waits for.
pub(crate) struct PendingSubscribe {
    pub(crate) key: usize,
    seq: u64,
    channel: Box<str>,
    id: Option<Box<RawValue>>,
    since: Option<Since>,
    opts: HistoryOptions,
    /// Expiry of the channel token the subscribe came with.
    channel_exp: Option<u64>,
}

impl Shard {
    /// Whether history is kept in Redis (else by owner shards).
    fn history_in_redis(&self) -> bool {
        self.cfg.redis.is_some()
    }

    /// Publish on a history channel from this shard.
    pub(crate) fn publish_history(
        &mut self,
        channel: &str,
        data: &[u8],
        opts: HistoryOptions,
    ) -> Result<(), BrokerError> {
        if self.history_in_redis() {
            return self.broker.publish_history(channel, data, &opts);
        }
        let owner = history::owner_shard(channel, self.peers.len());
        let data = Bytes::copy_from_slice(data);
        if owner == self.id {
            self.append_history(channel, data, opts);
        } else {
            self.peers[owner].push(ShardMsg::HistoryPublish {
                channel: Arc::from(channel),
                data,
            });
        }
        Ok(())
    }

    /// Embedded mode, on the owner shard: number, keep, forward and deliver.
    pub(crate) fn append_history(&mut self, channel: &str, data: Bytes, opts: HistoryOptions) {
        let now = crate::registry::unix_ms();
        let (offset, epoch) = self.history.append(channel, data.clone(), &opts, now);
        self.broker.forward_numbered(channel, &data, offset, &epoch);
        self.deliver_numbered(channel, &data, offset, &epoch);
    }

    /// The last offset (and its epoch) this shard delivered on a history channel.
    pub fn history_position(&self, channel: &str) -> Option<(Arc<str>, u64)> {
        self.positions.get(channel).cloned()
    }

    /// Deliver a numbered message of a history channel to this shard's subscribers, once per
    /// offset and in order: an offset at or below the shard's position is a duplicate and
    /// dropped; a new epoch first sends `reset` to the subscribers. (Gaps are the Redis layer's
    /// to repair before it calls this.)
    pub fn deliver_numbered(&mut self, channel: &str, data: &[u8], offset: u64, epoch: &Arc<str>) {
        let subscribed = self.topics.subscriber_count(channel) > 0;
        let mut reset = false;
        match self.positions.get_mut(channel) {
            Some((e, last)) if **e == **epoch => {
                if offset <= *last {
                    return;
                }
                *last = offset;
            }
            Some(pos) => {
                *pos = (epoch.clone(), offset);
                reset = true;
            }
            None if subscribed => {
                self.positions
                    .insert(Box::from(channel), (epoch.clone(), offset));
            }
            None => {}
        }
        if !subscribed {
            return;
        }
        let mut reset_frame: Option<Bytes> = None;
        let frame = numbered_frame(channel, offset, data);
        let limit = self.cfg.max_queued_bytes;
        let mut delivered = 0u64;
        let Shard {
            topics,
            conns,
            holds,
            dirty,
            slow,
            ..
        } = self;
        for key in topics.subscribers(channel) {
            let c = &mut conns[key];
            if c.phase != Phase::Open {
                continue;
            }
            let mut send_reset = reset;
            if !holds.is_empty() {
                if let Some(hs) = holds.get_mut(&key) {
                    if let Some(i) = hs.iter().position(|h| *h.channel == *channel) {
                        match &mut hs[i].state {
                            HoldState::Reading { held, bytes } => {
                                *bytes += frame.len() + crate::shard::FRAME_OVERHEAD;
                                held.push((offset, epoch.clone(), frame.clone()));
                                if *bytes > limit {
                                    slow.push(key);
                                }
                                continue;
                            }
                            HoldState::Skipping { through, epoch: e } => {
                                if **e == **epoch {
                                    if offset <= *through {
                                        continue;
                                    }
                                    // The connection joined this epoch: nothing to reset.
                                    send_reset = false;
                                } else {
                                    send_reset = true;
                                }
                                hs.swap_remove(i);
                                if hs.is_empty() {
                                    holds.remove(&key);
                                }
                            }
                        }
                    }
                }
            }
            if send_reset {
                let f = reset_frame
                    .get_or_insert_with(|| {
                        text_frame(&protocol::reset(channel, epoch, offset.saturating_sub(1)))
                    })
                    .clone();
                if !Shard::enqueue(c, key, f, limit, dirty) {
                    slow.push(key);
                    continue;
                }
            }
            if Shard::enqueue(c, key, frame.clone(), limit, dirty) {
                delivered += 1;
            } else {
                slow.push(key);
            }
        }
        if reset {
            self.metrics.history_resets += 1;
        }
        self.metrics.messages_delivered += delivered;
        self.flush_slow();
    }

    /// Subscribe `key` to a history channel (permissions checked): subscribe, hold the channel's
    /// live messages, read the history, then answer ([`Shard::finish_history_subscribe`]).
    pub(crate) fn subscribe_history(
        &mut self,
        key: usize,
        channel: &str,
        id: Option<&RawValue>,
        since: Option<Since>,
        opts: HistoryOptions,
        channel_exp: Option<u64>,
    ) {
        if self.topics.is_subscribed(key, channel) {
            // Already subscribed: its live stream has no seam to make; acknowledged as any
            // repeated subscribe is (the epoch came with the first one).
            if let (Some(exp), Some(session)) = (channel_exp, self.conns[key].session.as_mut()) {
                session.set_channel_exp(channel, exp);
            }
            self.send_text(key, &protocol::ack("subscribed", channel, id));
            return;
        }
        if !self.add_subscription(key, channel, id) {
            return;
        }
        let holds = self.holds.entry(key).or_default();
        holds.retain(|h| *h.channel != *channel);
        holds.push(Hold {
            channel: Box::from(channel),
            state: HoldState::Reading {
                held: Vec::new(),
                bytes: 0,
            },
        });
        let c = &mut self.conns[key];
        c.awaiting_ack = true;
        let pending = PendingSubscribe {
            key,
            seq: c.seq,
            channel: Box::from(channel),
            id: id.map(|i| i.to_owned()),
            since,
            opts,
            channel_exp,
        };
        if self.broker.subscription_pending(channel) {
            // Redis mode: read only once Redis confirmed the SUBSCRIBE (see the module doc).
            self.pending_history
                .entry(Box::from(channel))
                .or_default()
                .push(pending);
        } else {
            self.start_history_subscribe(pending);
        }
    }

    /// The bus confirmed `channel` (or went down): start the reads waiting for it.
    pub(crate) fn start_pending_history(&mut self, channel: Option<&str>) {
        let waiting: Vec<PendingSubscribe> = match channel {
            Some(c) => self.pending_history.remove(c).unwrap_or_default(),
            None => std::mem::take(&mut self.pending_history)
                .into_values()
                .flatten()
                .collect(),
        };
        for p in waiting {
            self.start_history_subscribe(p);
        }
    }

    fn start_history_subscribe(&mut self, p: PendingSubscribe) {
        let limit = match &p.since {
            Some(_) => self.cfg.max_recovery,
            None => 0,
        };
        let since_offset = p.since.as_ref().map(|s| s.offset);
        let read = self.start_read(&p.channel, since_offset, limit, &p.opts);
        match read {
            Read::Ready(page) => self.finish_history_subscribe(p, Ok(page)),
            other => {
                let Some(this) = self.this.upgrade() else {
                    return;
                };
                monoio::spawn(async move {
                    let page = other.page().await;
                    this.borrow_mut().finish_history_subscribe(p, page);
                });
            }
        }
    }

    /// Start a history read of `channel` (embedded: the owner shard's store; Redis: the bus).
    pub fn start_read(
        &mut self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        opts: &HistoryOptions,
    ) -> Read {
        self.start_read_with(channel, since, limit, opts, true)
    }

    /// [`Shard::start_read`]; `create`: start the channel's epoch when it has none (a subscriber
    /// must learn the epoch the first message will carry; mere readers need not).
    pub fn start_read_with(
        &mut self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        opts: &HistoryOptions,
        create: bool,
    ) -> Read {
        self.metrics.history_reads += 1;
        if self.history_in_redis() {
            return match self.broker.read_history(channel, since, limit, opts) {
                Some(f) => Read::Bus(f),
                None => Read::Bus(Box::pin(async { Err(BrokerError::Unavailable) })),
            };
        }
        let owner = history::owner_shard(channel, self.peers.len());
        if owner == self.id {
            let now = crate::registry::unix_ms();
            return Read::Ready(self.history.read(channel, since, limit, opts, now, create));
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        self.peers[owner].push(ShardMsg::HistoryRead {
            channel: Arc::from(channel),
            since,
            limit,
            create,
            reply: tx,
        });
        Read::Owner(rx)
    }

    /// Owner shard: answer a read from another shard.
    pub(crate) fn serve_history_read(
        &mut self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        create: bool,
        reply: futures_channel::oneshot::Sender<Page>,
    ) {
        let Some(opts) = self.policy.history(channel) else {
            return; // dropped sender: the reader sees an error
        };
        let now = crate::registry::unix_ms();
        let _ = reply.send(self.history.read(channel, since, limit, &opts, now, create));
    }

    /// The page of a history subscribe arrived: reply, backlog, held messages, then live.
    fn finish_history_subscribe(&mut self, p: PendingSubscribe, page: Result<Page, BrokerError>) {
        let key = p.key;
        let live = self
            .conns
            .get(key)
            .is_some_and(|c| c.seq == p.seq && c.phase == Phase::Open);
        if !live {
            return;
        }
        let held = self.take_hold(key, &p.channel);
        // Commands wait until every history subscribe of the connection is answered.
        let still_reading = self.holds.get(&key).is_some_and(|hs| {
            hs.iter()
                .any(|h| matches!(h.state, HoldState::Reading { .. }))
        });
        if !still_reading {
            self.conns[key].awaiting_ack = false;
            Shard::kick_conn(&mut self.conns[key]);
        }
        let id = p.id.as_deref();
        let page = match page {
            Ok(page) => page,
            Err(_) => {
                // Without the page there is no seam: undo the subscribe.
                if let crate::topics::Unsubscribed::Removed { last: true } =
                    self.topics.unsubscribe(key, &p.channel)
                {
                    self.broker.last_unsubscribed(&p.channel);
                }
                let msg = "the history could not be read; the subscription was not made";
                self.send_error(key, id, ErrorCode::Unavailable, msg);
                return;
            }
        };
        // A backlog that would not fit in the outbox (which would cut the client off, again at
        // every retry) is not sent: the client reloads instead.
        let backlog_bytes: usize = page
            .messages
            .iter()
            .map(|(_, d)| d.len() + 64 + crate::shard::FRAME_OVERHEAD)
            .sum();
        let fits = backlog_bytes <= self.cfg.max_queued_bytes / 2;
        let max_recovery = self.cfg.max_recovery;
        let recovery = p
            .since
            .as_ref()
            .map(|s| match history::decide(s, &page, max_recovery) {
                Recovery::Complete if !fits => Recovery::Reset,
                r => r,
            });
        let reply = protocol::subscribed_history(
            &p.channel,
            id,
            &page.epoch,
            page.top,
            recovery.as_ref().map(|r| *r == Recovery::Complete),
        );
        self.send_text(key, &reply);
        let limit = self.cfg.max_queued_bytes;
        match (&recovery, &p.since) {
            (Some(Recovery::Complete), Some(since)) => {
                self.metrics.recoveries_complete += 1;
                for (offset, data) in &page.messages {
                    if *offset > since.offset && *offset <= page.top {
                        let f = numbered_frame(&p.channel, *offset, data);
                        self.queue_or_cut(key, f, limit);
                    }
                }
                self.metrics.messages_recovered += page.messages.len() as u64;
            }
            (Some(Recovery::Reset), _) => self.metrics.recoveries_reset += 1,
            _ => {}
        }
        // Live messages that arrived during the read, in order, above the page.
        let mut through = page.top;
        let mut epoch = page.epoch.clone();
        for (offset, e, frame) in held {
            if *e != *epoch {
                let f = text_frame(&protocol::reset(&p.channel, &e, offset.saturating_sub(1)));
                self.queue_or_cut(key, f, limit);
                epoch = e;
            } else if offset <= through {
                continue;
            }
            through = offset;
            self.queue_or_cut(key, frame, limit);
        }
        // Skip what is still in flight at or below `through` — unless the shard itself is
        // already past it in this epoch (then its own de-duplication covers it).
        let covered = self
            .positions
            .get(&*p.channel)
            .is_some_and(|(e, last)| **e == *epoch && *last >= through);
        if !covered {
            self.holds.entry(key).or_default().push(Hold {
                channel: p.channel.clone(),
                state: HoldState::Skipping { through, epoch },
            });
        }
        if let (Some(exp), Some(session)) = (p.channel_exp, self.conns[key].session.as_mut()) {
            session.set_channel_exp(&p.channel, exp);
        }
        self.flush_slow();
    }

    /// Remove `key`'s hold on `channel`, returning what was held.
    fn take_hold(&mut self, key: usize, channel: &str) -> Vec<(u64, Arc<str>, Bytes)> {
        let Some(holds) = self.holds.get_mut(&key) else {
            return Vec::new();
        };
        let Some(i) = holds.iter().position(|h| *h.channel == *channel) else {
            return Vec::new();
        };
        let hold = holds.swap_remove(i);
        if holds.is_empty() {
            self.holds.remove(&key);
        }
        match hold.state {
            HoldState::Reading { held, .. } => held,
            HoldState::Skipping { .. } => Vec::new(),
        }
    }

    /// Forget `key`'s holds (it closed) or its hold on one channel (it unsubscribed).
    pub(crate) fn drop_holds(&mut self, key: usize, channel: Option<&str>) {
        match channel {
            None => {
                self.holds.remove(&key);
            }
            Some(c) => {
                self.take_hold(key, c);
            }
        }
    }

    /// The client `history` command.
    pub(crate) fn handle_history(
        &mut self,
        key: usize,
        channel: &str,
        since: Option<u64>,
        limit: Option<usize>,
        id: Option<&RawValue>,
    ) {
        let rules = match self.policy.rules(channel) {
            Ok(r) => *r,
            Err(d) => return self.send_denial(key, id, d),
        };
        let Some(opts) = rules.history else {
            let msg = "this channel keeps no history (history_size is 0)";
            return self.send_error(key, id, ErrorCode::BadRequest, msg);
        };
        let subscribed = self.topics.is_subscribed(key, channel);
        let user = self.user_of(key);
        if let Err(d) = self.policy.check_history(channel, user, subscribed) {
            return self.send_denial(key, id, d);
        }
        let limit = limit.unwrap_or(opts.size).min(opts.size);
        let read = self.start_read_with(channel, since, limit, &opts, false);
        let budget = self.cfg.max_queued_bytes / 2;
        let seq = self.conns[key].seq;
        let channel: Box<str> = Box::from(channel);
        let id = id.map(|i| i.to_owned());
        let reply = move |s: &mut Shard, page: Result<Page, BrokerError>| {
            if s.conns
                .get(key)
                .is_none_or(|c| c.seq != seq || c.phase != Phase::Open)
            {
                return;
            }
            match page {
                Ok(mut p) => {
                    // At most half the outbox budget per reply; the client pages with `since`.
                    let mut size = 0;
                    let keep = p
                        .messages
                        .iter()
                        .take_while(|(_, d)| {
                            size += d.len() + 32;
                            size <= budget
                        })
                        .count();
                    p.messages.truncate(keep.max(1));
                    let json = protocol::history_reply(
                        &channel,
                        id.as_deref(),
                        &p.epoch,
                        p.top,
                        &p.messages,
                    );
                    s.send_text(key, &json);
                }
                Err(_) => {
                    let msg = "the history could not be read";
                    s.send_error(key, id.as_deref(), ErrorCode::Unavailable, msg);
                }
            }
        };
        match read {
            Read::Ready(page) => reply(self, Ok(page)),
            other => {
                let Some(this) = self.this.upgrade() else {
                    return;
                };
                monoio::spawn(async move {
                    let page = other.page().await;
                    reply(&mut this.borrow_mut(), page);
                });
            }
        }
    }

    /// Sweep part: expire the owner store (embedded mode). Cost: linear in kept channels.
    pub(crate) fn sweep_history(&mut self) {
        if !self.positions.is_empty() {
            // Forget the positions of channels this shard no longer serves.
            let topics = &self.topics;
            self.positions
                .retain(|channel, _| topics.subscriber_count(channel) > 0);
        }
        if self.history.is_empty() {
            return;
        }
        let now = crate::registry::unix_ms();
        let policy = &self.policy;
        self.history.expire(now, |c| policy.history(c));
    }
}

/// `GET /history?channel=c&since=41&limit=100` (the caller checked the API key): the same read
/// as the client command, for backends.
pub async fn http_history(shard: &ShardRef, query: Option<&str>) -> (u16, Vec<u8>) {
    let bad = |msg: &str| (400, crate::conn::err_body("bad_request", msg));
    let mut channel = None;
    let mut since = None;
    let mut limit = None;
    for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = crate::conn::percent_decode(v).unwrap_or_default();
        match k {
            "channel" => channel = Some(v),
            "since" => match v.parse::<u64>() {
                Ok(n) => since = Some(n),
                Err(_) => return bad("since must be a non-negative integer"),
            },
            "limit" => match v.parse::<usize>() {
                Ok(n) => limit = Some(n),
                Err(_) => return bad("limit must be a non-negative integer"),
            },
            _ => {}
        }
    }
    let Some(channel) = channel.filter(|c| protocol::is_valid_channel(c)) else {
        return bad("expected ?channel=<valid channel name>[&since=<offset>][&limit=<n>]");
    };
    let read = {
        let mut s = shard.borrow_mut();
        let opts = match s.policy.rules(&channel) {
            Ok(r) => r.history,
            Err(_) => None,
        };
        let Some(opts) = opts else {
            return (
                404,
                crate::conn::err_body("not_found", "this channel keeps no history"),
            );
        };
        let limit = limit.unwrap_or(opts.size).min(opts.size);
        s.start_read_with(&channel, since, limit, &opts, false)
    };
    match read.page().await {
        Ok(p) => (
            200,
            protocol::history_body(&channel, &p.epoch, p.top, &p.messages).into_bytes(),
        ),
        Err(_) => (
            503,
            crate::conn::err_body("unavailable", "the history could not be read"),
        ),
    }
}
