//! Loss, duplicate and reordering accounting per (publisher, channel) stream.
//!
//! Every message carries its publisher id and a sequence number that counts that publisher's
//! messages *on that channel* (0, 1, 2, …), so each subscriber expects, per (publisher,
//! channel), every number exactly once and in order. A [`Stream`] keeps the next expected
//! number and the ranges skipped over and not yet seen:
//!
//! - `s == next`: in order;
//! - `s > next`: in order after a gap; `next..s` become missing;
//! - `s < next` and missing: it arrived late, after a later one (reordered); it is delivered;
//! - `s < next` and not missing: a duplicate.
//!
//! Loss is not guessed from gaps here: the run's expected deliveries are Σ over channels of
//! publishes written × subscriptions the hub confirmed, and `lost = expected − unique
//! deliveries` (messages missing at the tail of a stream leave no gap, but are still counted).
//!
//! History channels add a second, independent check: the hub numbers every message of such a
//! channel (`"offset"`: 1, 2, 3, … per channel, the same for every subscriber), so each
//! connection expects, per channel, every offset after the top its `subscribed` reply gave,
//! exactly once and in order. [`Offsets`] runs the same [`Stream`] logic over offsets and
//! restarts a channel where the hub says the numbering continues elsewhere (a `reset` frame, a
//! recovery that answered `recovered:false`); [`OffsetCounts`] keeps gaps, duplicates,
//! out-of-order offsets and resets apart.

use serde::Serialize;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Most missing ranges kept per stream; past it the oldest range is forgotten (a message from
/// it arriving even later would then count as a duplicate).
const MAX_RANGES: usize = 1024;

/// How one message relates to its stream so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next expected one, or a later one after `skipped` numbers that did not arrive.
    InOrder {
        skipped: u64,
    },
    /// A number skipped earlier, arriving late.
    Late,
    Duplicate,
}

/// One (publisher, channel) stream as seen by one subscriber (or one channel's offsets).
#[derive(Debug, Default, Clone)]
pub struct Stream {
    /// The first number expected (0 for sequence numbers; top + 1 for offsets).
    first: u64,
    next: u64,
    /// Half-open ranges `[a, b)` of numbers below `next` not seen yet, ascending.
    missing: Vec<(u64, u64)>,
}

impl Stream {
    /// A stream whose numbers continue after `last` (an offset stream after a top offset).
    pub fn after(last: u64) -> Stream {
        Stream {
            first: last + 1,
            next: last + 1,
            missing: Vec::new(),
        }
    }

    /// The highest number seen, or the one the stream started after (None: a sequence stream
    /// that has seen nothing).
    pub fn last(&self) -> Option<u64> {
        self.next.checked_sub(1)
    }

    pub fn observe(&mut self, s: u64) -> Seen {
        if s >= self.next {
            let skipped = s - self.next;
            if skipped > 0 {
                if self.missing.len() == MAX_RANGES {
                    self.missing.remove(0);
                }
                self.missing.push((self.next, s));
            }
            self.next = s + 1;
            return Seen::InOrder { skipped };
        }
        // The last range starting at or before `s`.
        let i = self.missing.partition_point(|&(a, _)| a <= s);
        if i == 0 || s >= self.missing[i - 1].1 {
            return Seen::Duplicate;
        }
        let (a, b) = self.missing[i - 1];
        match (s == a, s + 1 == b) {
            (true, true) => {
                self.missing.remove(i - 1);
            }
            (true, false) => self.missing[i - 1].0 = s + 1,
            (false, true) => self.missing[i - 1].1 = s,
            (false, false) => {
                self.missing[i - 1].1 = s;
                self.missing.insert(i, (s + 1, b));
            }
        }
        Seen::Late
    }

    /// Numbers below the highest seen that have not arrived (yet).
    pub fn missing(&self) -> u64 {
        self.missing.iter().map(|(a, b)| b - a).sum()
    }

    /// Distinct numbers seen.
    pub fn unique(&self) -> u64 {
        self.next - self.first - self.missing()
    }
}

/// Totals of what the streams saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SeqCounts {
    /// Every message received, duplicates included.
    pub received: u64,
    pub duplicates: u64,
    /// Messages that arrived after a later one of their stream.
    pub reordered: u64,
    /// Numbers skipped at the moment a later one arrived (some may arrive late).
    pub gaps: u64,
}

impl SeqCounts {
    /// Distinct messages delivered.
    pub fn unique(&self) -> u64 {
        self.received - self.duplicates
    }

    pub fn add(&mut self, seen: Seen) {
        self.received += 1;
        match seen {
            Seen::InOrder { skipped } => self.gaps += skipped,
            Seen::Late => self.reordered += 1,
            Seen::Duplicate => self.duplicates += 1,
        }
    }

    pub fn absorb(&mut self, o: &mut SeqCounts) {
        let o = std::mem::take(o);
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.gaps += o.gaps;
    }
}

/// A multiply-shift hasher for the `u64` stream keys (the std SipHash is needlessly slow here).
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

/// The streams one subscriber connection hears, keyed by (publisher, channel).
#[derive(Default)]
pub struct Tracker {
    streams: HashMap<u64, Stream, BuildHasherDefault<KeyHasher>>,
}

impl Tracker {
    pub fn observe(&mut self, publisher: u32, channel: u32, seq: u64) -> Seen {
        let key = u64::from(publisher) << 32 | u64::from(channel);
        self.streams.entry(key).or_default().observe(seq)
    }

    /// Distinct messages delivered over all streams.
    pub fn unique(&self) -> u64 {
        self.streams.values().map(Stream::unique).sum()
    }
}

/// The offsets of the history channels one connection hears, per channel index.
#[derive(Default)]
pub struct Offsets {
    chans: HashMap<u32, Stream, BuildHasherDefault<KeyHasher>>,
}

impl Offsets {
    /// Expect the offsets of `channel` to continue after `top` (a `subscribed` reply's top, a
    /// `reset`, a recovery answered with `recovered:false`), forgetting what came before.
    pub fn restart(&mut self, channel: u32, top: u64) {
        self.chans.insert(channel, Stream::after(top));
    }

    /// Account a message of `channel` carrying `offset`. On a channel without a known top the
    /// first offset starts the stream.
    pub fn observe(&mut self, channel: u32, offset: u64) -> Seen {
        self.chans
            .entry(channel)
            .or_insert_with(|| Stream::after(offset.saturating_sub(1)))
            .observe(offset)
    }

    /// The highest offset seen on `channel`, or the top it (re)started after: what a
    /// resubscribe passes as `since`.
    pub fn last(&self, channel: u32) -> Option<u64> {
        self.chans.get(&channel).and_then(Stream::last)
    }
}

/// Totals of the offset checks (history channels).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OffsetCounts {
    /// Messages that carried an offset.
    pub checked: u64,
    /// Offsets skipped at the moment a later one arrived (some may arrive late).
    pub gaps: u64,
    /// Offsets that arrived after a later one of their channel (each fills a gap).
    pub out_of_order: u64,
    /// Offsets seen twice on one connection.
    pub duplicates: u64,
    /// `reset` frames: the channel's epoch was lost and its offsets restarted.
    pub resets: u64,
}

impl OffsetCounts {
    pub fn add(&mut self, seen: Seen) {
        self.checked += 1;
        match seen {
            Seen::InOrder { skipped } => self.gaps += skipped,
            Seen::Late => self.out_of_order += 1,
            Seen::Duplicate => self.duplicates += 1,
        }
    }

    /// Offsets skipped that never arrived.
    pub fn missing(&self) -> u64 {
        self.gaps.saturating_sub(self.out_of_order)
    }

    /// Whether every offset arrived once and in order, without a reset.
    pub fn clean(&self) -> bool {
        self.gaps == 0 && self.out_of_order == 0 && self.duplicates == 0 && self.resets == 0
    }

    pub fn absorb(&mut self, o: &mut OffsetCounts) {
        let o = std::mem::take(o);
        self.checked += o.checked;
        self.gaps += o.gaps;
        self.out_of_order += o.out_of_order;
        self.duplicates += o.duplicates;
        self.resets += o.resets;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64]) -> (SeqCounts, Stream) {
        let mut st = Stream::default();
        let mut c = SeqCounts::default();
        for &s in seqs {
            c.add(st.observe(s));
        }
        (c, st)
    }

    #[test]
    fn in_order_stream() {
        let (c, st) = run(&[0, 1, 2, 3]);
        assert_eq!(
            c,
            SeqCounts {
                received: 4,
                ..Default::default()
            }
        );
        assert_eq!(st.unique(), 4);
        assert_eq!(st.missing(), 0);
    }

    #[test]
    fn gaps_are_loss_until_filled() {
        let (c, st) = run(&[0, 1, 5, 6]);
        assert_eq!(c.gaps, 3);
        assert_eq!((c.duplicates, c.reordered), (0, 0));
        assert_eq!(st.missing(), 3);
        assert_eq!(st.unique(), 4);
    }

    #[test]
    fn late_messages_are_reordered_not_duplicates() {
        // 3 and 2 arrive after 4; 2 arrives twice (the second time a duplicate).
        let (c, st) = run(&[0, 1, 4, 3, 2, 2, 5]);
        assert_eq!(c.reordered, 2);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.unique(), 6);
        assert_eq!(st.unique(), 6);
        assert_eq!(st.missing(), 0);
    }

    #[test]
    fn duplicates_of_in_order_messages() {
        let (c, _) = run(&[0, 0, 1, 1, 1, 2]);
        assert_eq!(c.duplicates, 3);
        assert_eq!(c.reordered, 0);
        assert_eq!(c.unique(), 3);
    }

    #[test]
    fn a_late_message_splits_a_missing_range() {
        let mut st = Stream::default();
        assert_eq!(st.observe(10), Seen::InOrder { skipped: 10 });
        assert_eq!(st.observe(5), Seen::Late);
        assert_eq!(st.missing, vec![(0, 5), (6, 10)]);
        assert_eq!(st.observe(0), Seen::Late);
        assert_eq!(st.observe(9), Seen::Late);
        assert_eq!(st.missing, vec![(1, 5), (6, 9)]);
        assert_eq!(st.observe(5), Seen::Duplicate);
        assert_eq!(st.observe(10), Seen::Duplicate);
        assert_eq!(st.observe(12), Seen::InOrder { skipped: 1 });
        assert_eq!(st.missing, vec![(1, 5), (6, 9), (11, 12)]);
        assert_eq!(st.missing(), 8);
        assert_eq!(st.unique(), 13 - 8);
    }

    #[test]
    fn streams_are_independent_per_publisher_and_channel() {
        let mut t = Tracker::default();
        let mut c = SeqCounts::default();
        for (p, ch, s) in [
            (0, 0, 0),
            (1, 0, 0),
            (0, 1, 0),
            (0, 0, 1),
            (1, 0, 1),
            (0, 1, 0),
        ] {
            c.add(t.observe(p, ch, s));
        }
        assert_eq!(c.duplicates, 1, "only (0,1,0) twice is a duplicate");
        assert_eq!(c.gaps, 0);
        assert_eq!(t.unique(), 5);
    }

    #[test]
    fn many_gaps_stay_bounded() {
        let mut st = Stream::default();
        for k in 0..(MAX_RANGES as u64 + 10) {
            st.observe(2 * k + 1);
        }
        assert_eq!(st.missing.len(), MAX_RANGES);
        // The oldest gaps were forgotten: a very late message from them reads as a duplicate.
        assert_eq!(st.observe(0), Seen::Duplicate);
        assert_eq!(st.observe(2 * MAX_RANGES as u64), Seen::Late);
    }

    #[test]
    fn a_shuffled_stream_is_fully_accounted() {
        // Every number 0..1000 exactly once in a scrambled order, plus 100 re-sends.
        let n = 1000u64;
        let mut order: Vec<u64> = (0..n).map(|i| (i * 389) % n).collect();
        order.extend((0..100).map(|i| (i * 7) % n));
        let (c, st) = run(&order);
        assert_eq!(c.unique(), n);
        assert_eq!(c.duplicates, 100);
        assert_eq!(st.unique(), n);
        assert_eq!(st.missing(), 0);
    }

    fn offsets(seq: &[u64], top: u64) -> (OffsetCounts, Offsets) {
        let mut o = Offsets::default();
        o.restart(7, top);
        let mut c = OffsetCounts::default();
        for &x in seq {
            c.add(o.observe(7, x));
        }
        (c, o)
    }

    #[test]
    fn offsets_in_order_after_the_subscribe_top() {
        let (c, o) = offsets(&[41, 42, 43], 40);
        assert!(c.clean(), "{c:?}");
        assert_eq!(c.checked, 3);
        assert_eq!(o.last(7), Some(43));
        assert_eq!(o.last(8), None, "a channel never heard");
        // A first offset above top + 1 is a gap: the subscriber missed the message at top + 1.
        let (c, _) = offsets(&[42, 43], 40);
        assert_eq!((c.gaps, c.missing()), (1, 1));
    }

    #[test]
    fn offset_gaps_duplicates_and_reorders_are_apart() {
        // 3 skipped (gap of 1), 5 and 6 swapped, 6 again, 4 twice.
        let (c, o) = offsets(&[1, 2, 4, 4, 6, 5, 6, 7], 0);
        assert_eq!(c.checked, 8);
        assert_eq!(c.gaps, 2, "3 missing at 4, 5 missing at 6");
        assert_eq!(c.out_of_order, 1, "5 after 6");
        assert_eq!(c.duplicates, 2, "4 and 6 twice");
        assert_eq!(c.missing(), 1, "3 never came");
        assert_eq!(c.resets, 0);
        assert_eq!(o.last(7), Some(7));
    }

    #[test]
    fn a_reset_restarts_a_channel_and_only_that_one() {
        let mut o = Offsets::default();
        let mut c = OffsetCounts::default();
        o.restart(1, 0);
        o.restart(2, 10);
        for (ch, x) in [(1, 1), (1, 2), (2, 11), (1, 3)] {
            c.add(o.observe(ch, x));
        }
        // Channel 1's epoch is lost: the hub sends reset with top 0, numbering starts over.
        o.restart(1, 0);
        c.resets += 1;
        for (ch, x) in [(1, 1), (1, 2), (2, 12)] {
            c.add(o.observe(ch, x));
        }
        assert_eq!(c.resets, 1);
        assert_eq!(
            (c.gaps, c.duplicates, c.out_of_order),
            (0, 0, 0),
            "1 and 2 again after the reset are not duplicates"
        );
        assert!(!c.clean(), "a reset is reported");
        assert_eq!((o.last(1), o.last(2)), (Some(2), Some(12)));
        // Without the reset the same offsets are duplicates.
        let (c, _) = offsets(&[1, 2, 1, 2], 0);
        assert_eq!(c.duplicates, 2);
    }

    #[test]
    fn an_offset_stream_counts_unique_from_its_start() {
        let mut st = Stream::after(100);
        assert_eq!(st.last(), Some(100));
        assert_eq!(st.observe(101), Seen::InOrder { skipped: 0 });
        assert_eq!(st.observe(103), Seen::InOrder { skipped: 1 });
        assert_eq!(
            st.observe(100),
            Seen::Duplicate,
            "at or below the start top"
        );
        assert_eq!(st.unique(), 2);
        assert_eq!(Stream::default().last(), None);
    }
}
