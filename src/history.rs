//! History: per-channel offsets and epochs, the in-memory store of embedded mode, and the
//! recovery decision. Sans-IO (time is passed in).
//!
//! Every message on a history-enabled channel gets an `offset` (1, 2, 3, … per channel, no gaps)
//! within an `epoch` (a random string that changes whenever the channel's history is lost). In
//! embedded mode one shard per channel owns its [`ChannelHistory`] (the owner is
//! [`owner_shard`]): every publish on the channel goes through the owner, which numbers it,
//! keeps it, and forwards it to the shards with subscribers. In Redis mode the same numbers come
//! from a Redis Function (`redis.rs`) and the stream lives in Redis.
//!
//! Invariants: offsets of a channel within one epoch are strictly increasing by one; the store
//! keeps at most `size` messages per channel, none older than `ttl`; a channel silent for
//! `meta_ttl` is forgotten (its next message starts a new epoch at offset 1).

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A namespace's history settings (from `history_size`, `history_ttl`, `history_meta_ttl`).
pub use crate::auth::namespaces::History as HistoryOptions;

/// The owner shard of `channel` in embedded mode (FNV-1a of the name, modulo the shards).
pub fn owner_shard(channel: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in channel.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// A fresh epoch: 16 random hex digits.
pub fn new_epoch() -> Arc<str> {
    Arc::from(format!("{:016x}", rand::random::<u64>()).as_str())
}

/// One kept message.
#[derive(Debug, Clone)]
struct Entry {
    offset: u64,
    data: Bytes,
    at_ms: u64,
}

/// One channel's history (embedded mode, on its owner shard).
#[derive(Debug)]
pub struct ChannelHistory {
    pub epoch: Arc<str>,
    pub top: u64,
    entries: VecDeque<Entry>,
    last_ms: u64,
}

/// A read of a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub epoch: Arc<str>,
    /// The channel's current top offset (0: nothing published in this epoch).
    pub top: u64,
    /// Messages with offset > since, oldest first, at most `limit`.
    pub messages: Vec<(u64, Bytes)>,
    /// Whether `since + 1` was still kept (false: trimmed or expired past it).
    pub complete: bool,
}

/// Where a client says it is: "the last offset I have" in an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub offset: u64,
    pub epoch: String,
}

/// The outcome of a recovery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Every missed message is in the page (possibly none).
    Complete,
    /// The client must reload: the epoch changed, the history no longer reaches back to
    /// `since + 1`, or more than `max_recovery` messages are missing.
    Reset,
}

/// Decide a recovery from a page read with `since` (and a limit of `max_recovery`).
pub fn decide(since: &Since, page: &Page, max_recovery: usize) -> Recovery {
    if *page.epoch != *since.epoch || since.offset > page.top {
        return Recovery::Reset;
    }
    let missing = page.top - since.offset;
    if missing > max_recovery as u64 || !page.complete || page.messages.len() as u64 != missing {
        return Recovery::Reset;
    }
    Recovery::Complete
}

/// The embedded-mode store of one owner shard.
#[derive(Debug, Default)]
pub struct Store {
    channels: HashMap<Box<str>, ChannelHistory>,
}

impl ChannelHistory {
    fn new(now_ms: u64) -> ChannelHistory {
        ChannelHistory {
            epoch: new_epoch(),
            top: 0,
            entries: VecDeque::new(),
            last_ms: now_ms,
        }
    }

    fn trim(&mut self, opts: &HistoryOptions, now_ms: u64) {
        let ttl = opts.ttl.as_millis() as u64;
        while self.entries.len() > opts.size {
            self.entries.pop_front();
        }
        while self
            .entries
            .front()
            .is_some_and(|e| now_ms.saturating_sub(e.at_ms) >= ttl)
        {
            self.entries.pop_front();
        }
    }
}

impl Store {
    /// Number a new message of `channel` and keep it. Returns (offset, epoch).
    pub fn append(
        &mut self,
        channel: &str,
        data: Bytes,
        opts: &HistoryOptions,
        now_ms: u64,
    ) -> (u64, Arc<str>) {
        let h = self.live(channel, opts, now_ms);
        h.top += 1;
        h.last_ms = now_ms;
        h.entries.push_back(Entry {
            offset: h.top,
            data,
            at_ms: now_ms,
        });
        h.trim(opts, now_ms);
        (h.top, h.epoch.clone())
    }

    /// The channel's history, created (new epoch, offset 0) when unknown or forgotten.
    fn live(&mut self, channel: &str, opts: &HistoryOptions, now_ms: u64) -> &mut ChannelHistory {
        let meta_ttl = opts.meta_ttl.as_millis() as u64;
        let stale = self
            .channels
            .get(channel)
            .is_some_and(|h| now_ms.saturating_sub(h.last_ms) >= meta_ttl);
        if stale {
            self.channels.remove(channel);
        }
        self.channels
            .entry(Box::from(channel))
            .or_insert_with(|| ChannelHistory::new(now_ms))
    }

    /// Messages of `channel` after `since` (all kept ones when `None`), at most `limit`.
    /// With `create`, reading an unknown channel creates its epoch (so a subscriber learns the
    /// epoch the channel's first message will carry); without, it answers an empty page with an
    /// empty epoch and keeps nothing.
    pub fn read(
        &mut self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        opts: &HistoryOptions,
        now_ms: u64,
        create: bool,
    ) -> Page {
        if !create && !self.channels.contains_key(channel) {
            // A mere reader of an unknown channel: an empty page, nothing kept.
            return Page {
                epoch: Arc::from(""),
                top: 0,
                messages: Vec::new(),
                complete: since.unwrap_or(0) == 0,
            };
        }
        let h = self.live(channel, opts, now_ms);
        h.trim(opts, now_ms);
        let from = since.unwrap_or(0);
        let first_kept = h.entries.front().map_or(h.top + 1, |e| e.offset);
        let complete = from >= h.top || first_kept <= from + 1;
        let messages = h
            .entries
            .iter()
            .filter(|e| e.offset > from)
            .take(limit)
            .map(|e| (e.offset, e.data.clone()))
            .collect();
        Page {
            epoch: h.epoch.clone(),
            top: h.top,
            messages,
            complete,
        }
    }

    /// Drop expired messages and forget channels silent for their meta TTL. `opts` gives each
    /// channel's options (`None`: history is no longer configured for it).
    pub fn expire(&mut self, now_ms: u64, opts: impl Fn(&str) -> Option<HistoryOptions>) {
        self.channels.retain(|name, h| match opts(name) {
            None => false,
            Some(o) => {
                h.trim(&o, now_ms);
                now_ms.saturating_sub(h.last_ms) < o.meta_ttl.as_millis() as u64
            }
        });
    }

    /// Channels kept (for metrics and tests).
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(size: usize) -> HistoryOptions {
        HistoryOptions {
            size,
            ttl: std::time::Duration::from_secs(60),
            meta_ttl: std::time::Duration::from_secs(600),
        }
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn offsets_are_gapless_per_channel() {
        let mut s = Store::default();
        let o = opts(10);
        let (o1, e1) = s.append("a", b("1"), &o, 0);
        let (o2, e2) = s.append("a", b("2"), &o, 1);
        let (x1, ex) = s.append("b", b("x"), &o, 1);
        assert_eq!((o1, o2, x1), (1, 2, 1));
        assert_eq!(e1, e2);
        assert_ne!(e1, ex, "epochs are random per channel");
        let p = s.read("a", Some(0), 100, &o, 2, true);
        assert_eq!(p.top, 2);
        assert!(p.complete);
        assert_eq!(p.messages, vec![(1, b("1")), (2, b("2"))]);
        let p = s.read("a", Some(1), 100, &o, 2, true);
        assert_eq!(p.messages, vec![(2, b("2"))]);
        let p = s.read("a", Some(2), 100, &o, 2, true);
        assert!(p.messages.is_empty() && p.complete);
    }

    #[test]
    fn trimming_and_expiry_make_recovery_incomplete() {
        let mut s = Store::default();
        let o = opts(3);
        for i in 1..=5 {
            s.append("a", b(&i.to_string()), &o, i);
        }
        let p = s.read("a", Some(1), 100, &o, 6, true);
        assert!(!p.complete, "2 was trimmed");
        let since = Since {
            offset: 1,
            epoch: p.epoch.to_string(),
        };
        assert_eq!(decide(&since, &p, 1000), Recovery::Reset);
        let p = s.read("a", Some(2), 100, &o, 6, true);
        assert!(p.complete);
        assert_eq!(p.messages.len(), 3);
        let since = Since {
            offset: 2,
            epoch: p.epoch.to_string(),
        };
        assert_eq!(decide(&since, &p, 1000), Recovery::Complete);
        assert_eq!(decide(&since, &p, 2), Recovery::Reset, "over max_recovery");
        let other = Since {
            offset: 2,
            epoch: "other".into(),
        };
        assert_eq!(decide(&other, &p, 1000), Recovery::Reset);
        // history_ttl: everything older than 60 s is gone.
        let p = s.read("a", Some(2), 100, &o, 61_000, true);
        assert!(!p.complete && p.messages.is_empty());
        assert_eq!(p.top, 5, "the position survives the messages");
    }

    #[test]
    fn a_forgotten_channel_starts_a_new_epoch() {
        let mut s = Store::default();
        let o = opts(3);
        let (_, e1) = s.append("a", b("1"), &o, 0);
        let (off, e2) = s.append("a", b("2"), &o, 600_000);
        assert_ne!(e1, e2);
        assert_eq!(off, 1);
        s.expire(1_300_000, |_| Some(o));
        assert!(s.is_empty());
        s.append("a", b("1"), &o, 0);
        s.expire(1, |_| None);
        assert!(s.is_empty(), "history no longer configured");
    }

    #[test]
    fn a_client_ahead_of_the_channel_resets() {
        let mut s = Store::default();
        let o = opts(3);
        s.append("a", b("1"), &o, 0);
        let p = s.read("a", Some(5), 10, &o, 1, true);
        let since = Since {
            offset: 5,
            epoch: p.epoch.to_string(),
        };
        assert_eq!(decide(&since, &p, 1000), Recovery::Reset);
    }

    #[test]
    fn readers_do_not_create_channels() {
        let mut s = Store::default();
        let o = opts(3);
        let p = s.read("nope", None, 10, &o, 0, false);
        assert_eq!((p.top, &*p.epoch, p.messages.len()), (0, "", 0));
        assert!(s.is_empty());
        let p = s.read("nope", None, 10, &o, 0, true);
        assert!(!p.epoch.is_empty());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn owners_spread() {
        let mut seen = [0; 4];
        for i in 0..1000 {
            seen[owner_shard(&format!("chan{i}"), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
        assert_eq!(owner_shard("x", 1), 0);
    }
}
