//! Open-loop send schedules.
//!
//! An open-loop sender does not wait for the system under test: message `k` of a sender is
//! *intended* at `start + offset + k × interval`, whatever happened to earlier messages. The
//! message carries that intended time and latency is measured from it, so when the server (or
//! the socket) stalls, the messages that piled up behind the stall are charged the time they
//! waited: a stall cannot hide by slowing the sender down (no coordinated omission).
//!
//! Several senders sharing one total rate get phases spread evenly over one interval
//! ([`Schedule::new`]'s `phase`), so their union is an even stream at the total rate instead of
//! synchronised bursts.
//!
//! Times are CLOCK_MONOTONIC nanoseconds. Offsets from `start` are computed in `f64` (exact to
//! the nanosecond for runs shorter than ~100 days) and rounded, so the k-th due time does not
//! drift with k.

/// The intended send times of one sender.
#[derive(Clone, Debug)]
pub struct Schedule {
    start: u64,
    /// Nanoseconds between two messages.
    interval: f64,
    /// Nanoseconds from `start` to message 0.
    offset: f64,
    /// Messages intended before the end of the run.
    count: u64,
}

impl Schedule {
    /// Messages at `rate` per second from `start` (plus `phase` × one interval, phase in
    /// [0, 1)), every one intended strictly before `end`.
    pub fn new(start: u64, end: u64, rate: f64, phase: f64) -> Schedule {
        assert!(rate > 0.0 && rate.is_finite(), "rate must be positive");
        assert!((0.0..1.0).contains(&phase), "phase must be in [0, 1)");
        let interval = 1e9 / rate;
        let offset = phase * interval;
        let span = end.saturating_sub(start) as f64 - offset;
        let mut s = Schedule {
            start,
            interval,
            offset,
            count: 0,
        };
        if span > 0.0 {
            // Candidates around span / interval, then exact against `due` (rounding).
            let mut n = (span / interval).ceil() as u64;
            while n > 0 && s.due(n - 1) >= end {
                n -= 1;
            }
            while s.due(n) < end {
                n += 1;
            }
            s.count = n;
        }
        s
    }

    /// Number of messages in the schedule.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Nanoseconds between two messages.
    pub fn interval_ns(&self) -> f64 {
        self.interval
    }

    /// Intended send time of message `k` (defined for any k, also past `count`).
    pub fn due(&self, k: u64) -> u64 {
        self.start + (self.offset + k as f64 * self.interval).round() as u64
    }

    /// How many messages are due at `now` (intended at or before it), at most `count`.
    pub fn due_by(&self, now: u64) -> u64 {
        if now < self.due(0) {
            return 0;
        }
        let x = (now - self.start) as f64 - self.offset;
        let mut k = (x / self.interval).floor() as u64 + 1;
        while k > 0 && self.due(k - 1) > now {
            k -= 1;
        }
        while self.due(k) <= now {
            k += 1;
        }
        k.min(self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn due_times_are_exact_multiples_of_the_interval() {
        let s = Schedule::new(5 * S, 6 * S, 1000.0, 0.0);
        assert_eq!(s.count(), 1000);
        assert_eq!(s.due(0), 5 * S);
        assert_eq!(s.due(1), 5 * S + 1_000_000);
        assert_eq!(s.due(999), 5 * S + 999_000_000);
        // No drift after many steps with an interval that is not a whole number of ns.
        let s = Schedule::new(0, 3600 * S, 3.0, 0.0);
        assert_eq!(s.due(3), S);
        assert_eq!(s.due(3 * 3599), 3599 * S);
        assert_eq!(s.due(1), 333_333_333);
        assert_eq!(s.due(2), 666_666_667);
    }

    #[test]
    fn count_covers_exactly_the_messages_before_the_end() {
        for (rate, secs, phase, want) in [
            (200.0, 2, 0.0, 400),
            (200.0, 2, 0.5, 400),
            (3.0, 1, 0.0, 3),
            (3.0, 1, 0.99, 3),
            (0.5, 1, 0.0, 1),
            (0.5, 1, 0.5, 0), // first message intended at 1 s = the end: not in the run
            (0.4, 10, 0.25, 4),
        ] {
            let s = Schedule::new(7 * S, (7 + secs) * S, rate, phase);
            assert_eq!(s.count(), want, "rate {rate} secs {secs} phase {phase}");
            if want > 0 {
                assert!(s.due(want - 1) < (7 + secs) * S);
            }
            assert!(s.due(want) >= (7 + secs) * S);
        }
        assert_eq!(Schedule::new(5 * S, 5 * S, 100.0, 0.0).count(), 0);
        assert_eq!(Schedule::new(5 * S, 4 * S, 100.0, 0.0).count(), 0);
    }

    #[test]
    fn due_by_counts_messages_at_or_before_now() {
        let s = Schedule::new(10 * S, 11 * S, 100.0, 0.25);
        // Message k is due at 10 s + 2.5 ms + k × 10 ms.
        assert_eq!(s.due(0), 10 * S + 2_500_000);
        assert_eq!(s.due_by(0), 0);
        assert_eq!(s.due_by(10 * S), 0);
        assert_eq!(s.due_by(10 * S + 2_499_999), 0);
        assert_eq!(s.due_by(10 * S + 2_500_000), 1);
        assert_eq!(s.due_by(10 * S + 12_499_999), 1);
        assert_eq!(s.due_by(10 * S + 12_500_000), 2);
        assert_eq!(s.due_by(11 * S), 100);
        assert_eq!(s.due_by(100 * S), 100, "never more than the schedule holds");
        // Against a brute-force count at many instants.
        let brute = |now: u64| (0..s.count()).filter(|&k| s.due(k) <= now).count() as u64;
        for i in 0..2000 {
            let now = 10 * S + i * 617_283;
            assert_eq!(s.due_by(now), brute(now), "now {now}");
        }
    }

    #[test]
    fn a_stalled_sender_catches_up_with_its_intended_times() {
        // A sender blocked from 0.1 s to 0.5 s (server not reading) finds 40 messages due when
        // it resumes, and they keep their intended times: the stall is charged to them.
        let s = Schedule::new(0, S, 100.0, 0.0);
        let before = s.due_by(S / 10);
        let after = s.due_by(S / 2);
        assert_eq!(after - before, 40);
        let waited: Vec<u64> = (before..after).map(|k| S / 2 - s.due(k)).collect();
        assert_eq!(waited[0], 390_000_000);
        assert_eq!(*waited.last().unwrap(), 0);
    }

    #[test]
    fn phases_spread_senders_into_one_even_stream() {
        // 4 senders sharing 400 msg/s: together one message every 2.5 ms.
        let n = 4;
        let mut all: Vec<u64> = (0..n)
            .flat_map(|p| {
                let s = Schedule::new(0, S, 100.0, p as f64 / n as f64);
                (0..s.count()).map(move |k| s.due(k))
            })
            .collect();
        all.sort_unstable();
        assert_eq!(all.len(), 400);
        for (i, t) in all.iter().enumerate() {
            assert_eq!(*t, i as u64 * 2_500_000);
        }
    }
}
