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

/// One (publisher, channel) stream as seen by one subscriber.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    next: u64,
    /// Half-open ranges `[a, b)` of numbers below `next` not seen yet, ascending.
    missing: Vec<(u64, u64)>,
}

impl Stream {
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
        self.next - self.missing()
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
}
