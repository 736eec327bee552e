//! The per-shard topic registry: channel name → local subscribers, connection → its channels.
//!
//! One [`TopicRegistry`] lives on each shard and is only touched by that shard's thread, so it
//! has no locks and does no I/O. Its job is bookkeeping plus reporting *transitions*: the first
//! local subscriber of a channel ([`Subscribed::Added`] with `first == true`) and the last one
//! leaving ([`Unsubscribed::Removed`] with `last == true`, or the `on_last` callback of
//! [`TopicRegistry::remove_conn`]). The Redis layer uses those to SUBSCRIBE / UNSUBSCRIBE lazily.
//!
//! # Data layout
//!
//! Subscriptions are edges of a bipartite graph stored twice, once on each side, and each copy
//! knows the position of its twin:
//!
//! - a topic (in a [`Slab`], addressed by [`TopicId`]) holds `members: Vec<Member>`, where a
//!   member is `(conn, slot)` and `slot` is the index of the twin edge in that connection's list;
//! - a connection holds `Vec<Sub>`, where a sub is `(topic, slot)` and `slot` is the index of the
//!   twin edge in that topic's `members`.
//!
//! Removing an edge is a `swap_remove` on both vectors; the element that moved into the hole has
//! its twin's back-pointer rewritten. That makes removal O(1) once the edge has been found, and
//! keeps `members` a dense slice, so fan-out ([`TopicRegistry::subscribers`]) is a plain linear
//! walk with no hashing and no allocation.
//!
//! # Invariants (checked with `debug_assert!` on every mutation, and exhaustively in tests)
//!
//! 1. For every topic `t` and index `i`: `conns[t.members[i].conn][t.members[i].slot]` is
//!    `Sub { topic: t, slot: i }`, and symmetrically for every connection's subs.
//! 2. A connection appears at most once in a topic's `members` (no duplicate edges).
//! 3. No topic is empty: a topic is removed from the slab and from the name index the moment its
//!    last member leaves, so channel churn does not leak. `by_name` and the slab hold exactly the
//!    same set of topics.
//! 4. No connection entry is empty: the per-connection side is a `HashMap` that only holds
//!    connections with at least one subscription. An idle connection costs nothing here, and a
//!    connection's entry (and its `Vec`) is freed when its last subscription goes.
//!
//! # Costs
//!
//! - name lookup: one hash of the channel name (`HashMap<Box<str>, TopicId>`).
//! - finding an edge (needed by subscribe to detect a duplicate, and by unsubscribe): a scan of
//!   the *shorter* of the connection's list and the topic's member list, i.e.
//!   O(min(subscriptions of conn, subscribers of channel)). The server caps subscriptions per
//!   connection, so this is bounded by a small constant in practice.
//! - memory: per channel, one slab slot plus the name stored twice (slab entry and index key);
//!   per subscription, two 16-byte edge records.

use std::collections::HashMap;

use slab::Slab;

/// A connection, identified by its key in the shard's connection slab.
pub type ConnKey = usize;

/// Index of a topic in the registry's slab. Only meaningful inside one registry, and reused
/// after the topic is removed.
pub type TopicId = usize;

/// Result of [`TopicRegistry::subscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    /// Newly subscribed; `first` = the channel had no local subscriber before.
    Added { first: bool },
    /// The connection was already subscribed; nothing changed.
    AlreadySubscribed,
}

/// Result of [`TopicRegistry::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsubscribed {
    /// Removed; `last` = the channel has no local subscriber now (and was dropped).
    Removed { last: bool },
    /// The connection was not subscribed (or the channel is unknown); nothing changed.
    NotSubscribed,
}

/// Topic side of an edge: `conns[conn][slot]` is the twin [`Sub`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Member {
    conn: ConnKey,
    slot: usize,
}

/// Connection side of an edge: `topics[topic].members[slot]` is the twin [`Member`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sub {
    topic: TopicId,
    slot: usize,
}

#[derive(Debug)]
struct Topic {
    /// The channel name; kept here so that removing a topic found by id (in `remove_conn`)
    /// can also remove it from the name index.
    name: Box<str>,
    /// Local subscribers, dense, in no particular order. Never empty while in the slab.
    members: Vec<Member>,
}

/// The per-shard channel ↔ connection index. See the module docs for layout, invariants and
/// costs.
#[derive(Debug, Default)]
pub struct TopicRegistry {
    topics: Slab<Topic>,
    by_name: HashMap<Box<str>, TopicId>,
    /// Only connections with at least one subscription have an entry.
    conns: HashMap<ConnKey, Vec<Sub>>,
}

impl TopicRegistry {
    /// An empty registry. Allocates nothing until the first subscription.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribe `conn` to `channel`. Idempotent: a second call reports
    /// [`Subscribed::AlreadySubscribed`] and changes nothing.
    ///
    /// Cost: one hash lookup, plus an edge search bounded by the connection's subscription count
    /// (see module docs); allocates only when the channel or the connection is new, or when a
    /// `Vec` grows.
    pub fn subscribe(&mut self, conn: ConnKey, channel: &str) -> Subscribed {
        let (tid, first) = match self.by_name.get(channel) {
            Some(&tid) => {
                if self.find_edge(conn, tid).is_some() {
                    return Subscribed::AlreadySubscribed;
                }
                (tid, false)
            }
            None => {
                let tid = self.topics.insert(Topic {
                    name: channel.into(),
                    members: Vec::new(),
                });
                self.by_name.insert(channel.into(), tid);
                (tid, true)
            }
        };

        let subs = self.conns.entry(conn).or_default();
        let topic = &mut self.topics[tid];
        let conn_slot = subs.len();
        let topic_slot = topic.members.len();
        subs.push(Sub {
            topic: tid,
            slot: topic_slot,
        });
        topic.members.push(Member {
            conn,
            slot: conn_slot,
        });
        self.debug_check_edge(conn, conn_slot);
        Subscribed::Added { first }
    }

    /// Unsubscribe `conn` from `channel`. Unknown channels and non-members report
    /// [`Unsubscribed::NotSubscribed`]. When the last member leaves, the topic is dropped.
    ///
    /// Cost: one hash lookup plus the edge search (see module docs); the removal itself is O(1).
    /// Never allocates.
    pub fn unsubscribe(&mut self, conn: ConnKey, channel: &str) -> Unsubscribed {
        let Some(&tid) = self.by_name.get(channel) else {
            return Unsubscribed::NotSubscribed;
        };
        let Some((conn_slot, topic_slot)) = self.find_edge(conn, tid) else {
            return Unsubscribed::NotSubscribed;
        };

        // Connection side.
        let subs = self
            .conns
            .get_mut(&conn)
            .expect("edge found, so the connection has an entry");
        let removed = subs.swap_remove(conn_slot);
        debug_assert_eq!(removed.topic, tid);
        debug_assert_eq!(removed.slot, topic_slot);
        if let Some(moved) = subs.get(conn_slot).copied() {
            // The connection's former last edge now lives at `conn_slot`: repoint its twin.
            self.topics[moved.topic].members[moved.slot].slot = conn_slot;
        }
        if subs.is_empty() {
            self.conns.remove(&conn);
        } else if conn_slot < self.conns[&conn].len() {
            self.debug_check_edge(conn, conn_slot);
        }

        // Topic side.
        let last = self.remove_member(tid, topic_slot);
        if last {
            let topic = self.topics.remove(tid);
            self.by_name.remove(&*topic.name);
        }
        Unsubscribed::Removed { last }
    }

    /// Remove every subscription of `conn` (connection closed); calls `on_last(channel)` for each
    /// channel that became empty (those channels are dropped from the registry before the call
    /// returns). Cost: linear in the connection's subscriptions; O(1) for an idle connection.
    pub fn remove_conn(&mut self, conn: ConnKey, mut on_last: impl FnMut(&str)) {
        let Some(subs) = self.conns.remove(&conn) else {
            return;
        };
        for sub in subs {
            // The connection's own entry is already gone, so no back-pointer into it needs
            // fixing; `remove_member` only repoints edges of *other* connections (a connection
            // is in a topic at most once).
            debug_assert_eq!(self.topics[sub.topic].members[sub.slot].conn, conn);
            if self.remove_member(sub.topic, sub.slot) {
                let topic = self.topics.remove(sub.topic);
                self.by_name.remove(&*topic.name);
                on_last(&topic.name);
            }
        }
    }

    /// Hot path: the local subscribers of `channel`, in no particular order (empty if none).
    /// Cost: one hash lookup; iteration walks a dense slice. No allocation.
    pub fn subscribers<'a>(&'a self, channel: &str) -> impl ExactSizeIterator<Item = ConnKey> + 'a {
        self.members_of(channel).iter().map(|m| m.conn)
    }

    /// Number of local subscribers of `channel` (0 if unknown). One hash lookup.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.members_of(channel).len()
    }

    /// How many channels `conn` is subscribed to. One hash lookup.
    pub fn subscriptions_of(&self, conn: ConnKey) -> usize {
        self.conns.get(&conn).map_or(0, Vec::len)
    }

    /// The channels `conn` is subscribed to, in no particular order.
    pub fn channels_of(&self, conn: ConnKey) -> impl Iterator<Item = &str> {
        self.conns
            .get(&conn)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(|s| &*self.topics[s.topic].name)
    }

    /// Whether `conn` is subscribed to `channel`. Same cost as the edge search (module docs).
    pub fn is_subscribed(&self, conn: ConnKey, channel: &str) -> bool {
        self.by_name
            .get(channel)
            .is_some_and(|&tid| self.find_edge(conn, tid).is_some())
    }

    /// Number of channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        debug_assert_eq!(self.topics.len(), self.by_name.len());
        self.topics.len()
    }

    /// Number of connections with at least one subscription.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Every channel with at least one local subscriber, in no particular order (e.g. to
    /// re-subscribe after a Redis reconnect). Cost: linear in the slab's capacity.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.topics.iter().map(|(_, t)| &*t.name)
    }

    /// True when there are no subscriptions at all.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    // ---- internals ----

    fn members_of(&self, channel: &str) -> &[Member] {
        match self.by_name.get(channel) {
            Some(&tid) => &self.topics[tid].members,
            None => &[],
        }
    }

    /// Locate the edge `conn`–`tid`, returning `(slot in conn's list, slot in topic's members)`.
    /// Scans whichever side is shorter.
    fn find_edge(&self, conn: ConnKey, tid: TopicId) -> Option<(usize, usize)> {
        let subs = self.conns.get(&conn)?;
        let members = &self.topics[tid].members;
        let edge = if subs.len() <= members.len() {
            let conn_slot = subs.iter().position(|s| s.topic == tid)?;
            (conn_slot, subs[conn_slot].slot)
        } else {
            let topic_slot = members.iter().position(|m| m.conn == conn)?;
            (members[topic_slot].slot, topic_slot)
        };
        debug_assert_eq!(
            subs[edge.0],
            Sub {
                topic: tid,
                slot: edge.1
            }
        );
        debug_assert_eq!(members[edge.1], Member { conn, slot: edge.0 });
        Some(edge)
    }

    /// `swap_remove` the member at `topic_slot` of topic `tid` and repoint the twin of the member
    /// that moved into the hole. Returns whether the topic is now empty (the caller removes it).
    /// The removed member's own connection-side edge must already be gone or be removed by the
    /// caller.
    fn remove_member(&mut self, tid: TopicId, topic_slot: usize) -> bool {
        let members = &mut self.topics[tid].members;
        members.swap_remove(topic_slot);
        if let Some(moved) = members.get(topic_slot).copied() {
            let twin = &mut self
                .conns
                .get_mut(&moved.conn)
                .expect("every member's connection has an entry")[moved.slot];
            debug_assert_eq!(twin.topic, tid);
            twin.slot = topic_slot;
        }
        self.topics[tid].members.is_empty()
    }

    /// Debug-only: the edge at `conns[conn][conn_slot]` and its twin agree.
    fn debug_check_edge(&self, conn: ConnKey, conn_slot: usize) {
        if cfg!(debug_assertions) {
            let sub = self.conns[&conn][conn_slot];
            let member = self.topics[sub.topic].members[sub.slot];
            debug_assert_eq!(
                member,
                Member {
                    conn,
                    slot: conn_slot
                }
            );
        }
    }

    /// Test-only: check every invariant listed in the module docs. O(total edges).
    #[cfg(test)]
    fn assert_invariants(&self) {
        use std::collections::HashSet;
        assert_eq!(self.topics.len(), self.by_name.len());
        for (name, &tid) in &self.by_name {
            assert_eq!(&self.topics[tid].name, name);
        }
        let mut edges = 0;
        for (tid, topic) in &self.topics {
            assert!(
                !topic.members.is_empty(),
                "empty topic {:?} kept",
                topic.name
            );
            let mut seen = HashSet::new();
            for (i, m) in topic.members.iter().enumerate() {
                assert!(seen.insert(m.conn), "duplicate member");
                assert_eq!(
                    self.conns[&m.conn][m.slot],
                    Sub {
                        topic: tid,
                        slot: i
                    }
                );
            }
            edges += topic.members.len();
        }
        for (&conn, subs) in &self.conns {
            assert!(!subs.is_empty(), "empty connection entry kept");
            for (i, s) in subs.iter().enumerate() {
                assert_eq!(
                    self.topics[s.topic].members[s.slot],
                    Member { conn, slot: i }
                );
            }
            edges -= subs.len();
        }
        assert_eq!(edges, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    fn sorted_subs(r: &TopicRegistry, ch: &str) -> Vec<ConnKey> {
        let mut v: Vec<_> = r.subscribers(ch).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn empty_registry() {
        let r = TopicRegistry::new();
        assert_eq!(r.channel_count(), 0);
        assert_eq!(r.subscribers("a").len(), 0);
        assert_eq!(r.subscriber_count("a"), 0);
        assert_eq!(r.subscriptions_of(1), 0);
        assert!(!r.is_subscribed(1, "a"));
        assert!(r.is_empty());
        assert_eq!(r.channels().count(), 0);
    }

    #[test]
    fn first_and_last_transitions() {
        let mut r = TopicRegistry::new();
        assert_eq!(r.subscribe(1, "a"), Subscribed::Added { first: true });
        assert_eq!(r.subscribe(2, "a"), Subscribed::Added { first: false });
        assert_eq!(r.subscribe(3, "a"), Subscribed::Added { first: false });
        assert_eq!(sorted_subs(&r, "a"), vec![1, 2, 3]);
        assert_eq!(r.subscriber_count("a"), 3);
        assert_eq!(r.unsubscribe(2, "a"), Unsubscribed::Removed { last: false });
        assert_eq!(r.unsubscribe(1, "a"), Unsubscribed::Removed { last: false });
        assert_eq!(sorted_subs(&r, "a"), vec![3]);
        assert_eq!(r.unsubscribe(3, "a"), Unsubscribed::Removed { last: true });
        assert_eq!(r.channel_count(), 0);
        assert_eq!(r.conn_count(), 0);
        r.assert_invariants();
    }

    #[test]
    fn double_subscribe_is_idempotent() {
        let mut r = TopicRegistry::new();
        assert_eq!(r.subscribe(7, "a"), Subscribed::Added { first: true });
        assert_eq!(r.subscribe(7, "a"), Subscribed::AlreadySubscribed);
        assert_eq!(r.subscriber_count("a"), 1);
        assert_eq!(r.subscriptions_of(7), 1);
        // Also when the topic side is the shorter one to scan.
        r.subscribe(7, "b");
        r.subscribe(7, "c");
        assert_eq!(r.subscribe(7, "b"), Subscribed::AlreadySubscribed);
        assert_eq!(r.subscriptions_of(7), 3);
        r.assert_invariants();
    }

    #[test]
    fn unsubscribe_unknown() {
        let mut r = TopicRegistry::new();
        assert_eq!(r.unsubscribe(1, "nope"), Unsubscribed::NotSubscribed);
        r.subscribe(1, "a");
        assert_eq!(r.unsubscribe(2, "a"), Unsubscribed::NotSubscribed);
        assert_eq!(r.unsubscribe(1, "b"), Unsubscribed::NotSubscribed);
        assert_eq!(r.unsubscribe(1, "a"), Unsubscribed::Removed { last: true });
        assert_eq!(r.unsubscribe(1, "a"), Unsubscribed::NotSubscribed);
        r.assert_invariants();
    }

    #[test]
    fn remove_conn_reports_exactly_emptied_channels() {
        let mut r = TopicRegistry::new();
        for ch in ["a", "b", "c", "d"] {
            r.subscribe(1, ch);
        }
        r.subscribe(2, "b");
        r.subscribe(2, "d");
        r.subscribe(3, "e");
        let mut emptied = Vec::new();
        r.remove_conn(1, |ch| emptied.push(ch.to_owned()));
        emptied.sort();
        assert_eq!(emptied, vec!["a", "c"]);
        assert_eq!(r.subscriptions_of(1), 0);
        let mut chans: Vec<_> = r.channels().collect();
        chans.sort();
        assert_eq!(chans, vec!["b", "d", "e"]);
        assert_eq!(sorted_subs(&r, "b"), vec![2]);
        r.assert_invariants();

        // Unknown / idle connection: nothing reported.
        r.remove_conn(99, |_| panic!("no channel should empty"));
        r.remove_conn(1, |_| panic!("no channel should empty"));

        let mut emptied = Vec::new();
        r.remove_conn(2, |ch| emptied.push(ch.to_owned()));
        emptied.sort();
        assert_eq!(emptied, vec!["b", "d"]);
        assert_eq!(r.channels().collect::<Vec<_>>(), vec!["e"]);
        r.assert_invariants();
    }

    #[test]
    fn churn_gives_first_again() {
        let mut r = TopicRegistry::new();
        for _ in 0..3 {
            assert_eq!(r.subscribe(1, "a"), Subscribed::Added { first: true });
            assert_eq!(r.unsubscribe(1, "a"), Unsubscribed::Removed { last: true });
        }
        assert_eq!(r.subscribe(1, "a"), Subscribed::Added { first: true });
        r.remove_conn(1, |_| {});
        assert_eq!(r.subscribe(2, "a"), Subscribed::Added { first: true });
        assert_eq!(r.channel_count(), 1);
        r.assert_invariants();
    }

    #[test]
    fn swap_remove_fixups_keep_edges_consistent() {
        let mut r = TopicRegistry::new();
        for c in 0..6 {
            for ch in ["a", "b", "c"] {
                r.subscribe(c, ch);
            }
        }
        // Remove from the middle on both sides so both fix-up paths run.
        assert_eq!(r.unsubscribe(2, "b"), Unsubscribed::Removed { last: false });
        r.assert_invariants();
        assert_eq!(r.unsubscribe(0, "a"), Unsubscribed::Removed { last: false });
        r.assert_invariants();
        r.remove_conn(3, |_| panic!());
        r.assert_invariants();
        assert_eq!(sorted_subs(&r, "a"), vec![1, 2, 4, 5]);
        assert_eq!(sorted_subs(&r, "b"), vec![0, 1, 4, 5]);
        assert_eq!(sorted_subs(&r, "c"), vec![0, 1, 2, 4, 5]);
        let mut of2: Vec<_> = r.channels_of(2).collect();
        of2.sort();
        assert_eq!(of2, vec!["a", "c"]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Sub(ConnKey, usize),
        Unsub(ConnKey, usize),
        Remove(ConnKey),
    }

    const CHANNELS: [&str; 5] = ["a", "b", "news", "x:y", "long/channel@name"];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0..6usize, 0..CHANNELS.len()).prop_map(|(c, t)| Op::Sub(c, t)),
            3 => (0..6usize, 0..CHANNELS.len()).prop_map(|(c, t)| Op::Unsub(c, t)),
            1 => (0..6usize).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 0..200)) {
            let mut reg = TopicRegistry::new();
            let mut model: HashMap<String, BTreeSet<ConnKey>> = HashMap::new();
            for op in ops {
                match op {
                    Op::Sub(c, t) => {
                        let ch = CHANNELS[t];
                        let set = model.entry(ch.to_owned()).or_default();
                        let expected = if set.contains(&c) {
                            Subscribed::AlreadySubscribed
                        } else {
                            let first = set.is_empty();
                            set.insert(c);
                            Subscribed::Added { first }
                        };
                        prop_assert_eq!(reg.subscribe(c, ch), expected);
                    }
                    Op::Unsub(c, t) => {
                        let ch = CHANNELS[t];
                        let set = model.entry(ch.to_owned()).or_default();
                        let expected = if set.remove(&c) {
                            Unsubscribed::Removed { last: set.is_empty() }
                        } else {
                            Unsubscribed::NotSubscribed
                        };
                        prop_assert_eq!(reg.unsubscribe(c, ch), expected);
                    }
                    Op::Remove(c) => {
                        let mut expected = BTreeSet::new();
                        for (ch, set) in model.iter_mut() {
                            if set.remove(&c) && set.is_empty() {
                                expected.insert(ch.clone());
                            }
                        }
                        let mut got = BTreeSet::new();
                        reg.remove_conn(c, |ch| {
                            assert!(got.insert(ch.to_owned()), "reported twice: {ch}");
                        });
                        prop_assert_eq!(got, expected);
                    }
                }
                model.retain(|_, set| !set.is_empty());

                reg.assert_invariants();
                for ch in CHANNELS {
                    let want: Vec<ConnKey> =
                        model.get(ch).map(|s| s.iter().copied().collect()).unwrap_or_default();
                    prop_assert_eq!(reg.subscribers(ch).len(), want.len());
                    prop_assert_eq!(sorted_subs(&reg, ch), want.clone());
                    prop_assert_eq!(reg.subscriber_count(ch), want.len());
                    for c in 0..6 {
                        prop_assert_eq!(reg.is_subscribed(c, ch), want.contains(&c));
                    }
                }
                for c in 0..6 {
                    let n = model.values().filter(|s| s.contains(&c)).count();
                    prop_assert_eq!(reg.subscriptions_of(c), n);
                    prop_assert_eq!(reg.channels_of(c).count(), n);
                }
                let got: BTreeSet<&str> = reg.channels().collect();
                let want: BTreeSet<&str> = model.keys().map(String::as_str).collect();
                prop_assert_eq!(reg.channel_count(), want.len());
                prop_assert_eq!(got, want);
            }
        }
    }
}
