//! Per-connection publish rate limit (`--max-publish-rate`, `--publish-burst`): a token bucket
//! refilled lazily when a publish arrives, plus a count of rejected publishes that tells a client
//! which is merely bursty from one that keeps hammering.
//!
//! Sans-IO and allocation-free: the caller passes the time (milliseconds of a coarse monotonic
//! clock, [`now_ms`]). No timer runs per connection: the refill owed since the last publish is
//! computed from the elapsed time. The state ([`Bucket`], 16 bytes, all-zero = full bucket) lives
//! in the connection's slab entry; the limits ([`PublishLimit`]) once per shard.
//!
//! Units: a token is 1000 milli-tokens, so a rate of `r` publishes/s refills exactly `r`
//! milli-tokens per millisecond, integers only.
//!
//! Abuse rule: a connection with more than [`ABUSE_FACTOR`] × burst rejected publishes within one
//! window of [`ABUSE_WINDOW_MS`] (starting at the first rejection after the previous window ended)
//! is abusive and gets closed (1008). A client that keeps publishing at twice the rate collects
//! about 5 × burst rejections in 10 s (with the default burst of 2 × rate) and is closed; a client
//! that overshoots only now and then is merely told `rate_limited`.

/// Milli-tokens per token (the cost of one publish).
const MILLI: u32 = 1000;
/// Largest burst: `burst × 1000` milli-tokens must fit the bucket's `u32`.
pub const MAX_BURST: u32 = 4_000_000;
/// Rejections beyond `ABUSE_FACTOR × burst` within one window mark a connection abusive.
pub const ABUSE_FACTOR: u32 = 3;
/// Length of the abuse window, in milliseconds.
pub const ABUSE_WINDOW_MS: u32 = 10_000;

/// The limits, computed once per shard from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishLimit {
    /// Publishes per second = milli-tokens refilled per millisecond.
    rate: u32,
    /// Bucket size in milli-tokens (`burst × 1000`).
    capacity: u32,
    /// Rejections tolerated per window.
    abuse_threshold: u32,
}

/// One connection's bucket. All-zero (`Default`) is a full bucket with no rejections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Milli-tokens taken and not yet refilled (0 = full).
    spent: u32,
    /// [`now_ms`] at the last publish.
    last_ms: u32,
    /// Rejected publishes in the current abuse window.
    rejected: u32,
    /// [`now_ms`] at which the current abuse window started.
    window_ms: u32,
}

/// What to do with one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit: publish it.
    Allowed,
    /// Over the limit: drop it and tell the client (`rate_limited`).
    Limited,
    /// Over the limit, persistently: drop it and close the connection (1008).
    Abusive,
}

impl PublishLimit {
    /// `rate` publishes per second with bursts of `burst` (clamped to 1..=[`MAX_BURST`]).
    /// `None` when `rate` is 0 (unlimited).
    pub fn new(rate: u32, burst: u32) -> Option<PublishLimit> {
        if rate == 0 {
            return None;
        }
        let burst = burst.clamp(1, MAX_BURST);
        Some(PublishLimit {
            rate,
            capacity: burst * MILLI,
            abuse_threshold: burst * ABUSE_FACTOR,
        })
    }

    /// Account one publish at time `now_ms`. Cost: a few integer operations.
    pub fn check(&self, b: &mut Bucket, now_ms: u32) -> Verdict {
        // Wrapping difference: the clock is monotonic, a u32 of milliseconds wraps every 49 days
        // (a connection silent that long at most gets a smaller refill once).
        let refill = u64::from(now_ms.wrapping_sub(b.last_ms)) * u64::from(self.rate);
        b.last_ms = now_ms;
        b.spent = u64::from(b.spent).saturating_sub(refill) as u32;
        if b.spent + MILLI <= self.capacity {
            b.spent += MILLI;
            return Verdict::Allowed;
        }
        if b.rejected == 0 || now_ms.wrapping_sub(b.window_ms) >= ABUSE_WINDOW_MS {
            b.window_ms = now_ms;
            b.rejected = 0;
        }
        b.rejected += 1;
        if b.rejected > self.abuse_threshold {
            Verdict::Abusive
        } else {
            Verdict::Limited
        }
    }
}

/// Milliseconds of a coarse monotonic clock (wrapping). On Linux `CLOCK_MONOTONIC_COARSE`: a read
/// of the last timer tick's time (1–4 ms resolution), a few nanoseconds, no system call.
#[cfg(target_os = "linux")]
pub fn now_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts);
    }
    (ts.tv_sec as u64)
        .wrapping_mul(1000)
        .wrapping_add(ts.tv_nsec as u64 / 1_000_000) as u32
}

/// Milliseconds since the first call (wrapping).
#[cfg(not(target_os = "linux"))]
pub fn now_ms() -> u32 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publishes allowed out of `n` made at time `t`.
    fn allowed(l: &PublishLimit, b: &mut Bucket, t: u32, n: u32) -> u32 {
        (0..n).filter(|_| l.check(b, t) == Verdict::Allowed).count() as u32
    }

    #[test]
    fn unlimited_when_rate_is_zero() {
        assert_eq!(PublishLimit::new(0, 10), None);
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let l = PublishLimit::new(100, 200).unwrap();
        let mut b = Bucket::default();
        let t0 = 5_000;
        assert_eq!(
            allowed(&l, &mut b, t0, 500),
            200,
            "a full bucket holds the burst"
        );
        // 100/s: one token every 10 ms.
        assert_eq!(allowed(&l, &mut b, t0 + 9, 5), 0);
        assert_eq!(allowed(&l, &mut b, t0 + 10, 5), 1);
        assert_eq!(allowed(&l, &mut b, t0 + 510, 100), 50);
        // A long pause refills the bucket only up to the burst.
        assert_eq!(allowed(&l, &mut b, t0 + 600_000, 1000), 200);
    }

    #[test]
    fn fractional_refills_accumulate() {
        // 3/s: a token every 333.3 ms; 1 ms steps must not lose the fractions (while the bucket
        // is below its size; a full bucket takes no more).
        let l = PublishLimit::new(3, 2).unwrap();
        let mut b = Bucket::default();
        assert_eq!(allowed(&l, &mut b, 0, 3), 2);
        let mut got = 0;
        for ms in 1..=3000 {
            got += allowed(&l, &mut b, ms, 1);
        }
        assert_eq!(got, 9, "3 per second over 3 s");
    }

    #[test]
    fn persistent_abuse_is_detected_and_occasional_overshoot_is_not() {
        let l = PublishLimit::new(100, 200).unwrap();
        // Twice the rate, one publish every 5 ms: about 100 rejections per second; the 601st
        // rejection (more than 3 x burst) comes within the 10 s window.
        let mut b = Bucket::default();
        let mut t = 0u32;
        let verdict = loop {
            match l.check(&mut b, t) {
                Verdict::Abusive => break t,
                _ if t > 60_000 => panic!("never flagged"),
                _ => t += 5,
            }
        };
        assert!((7_000..9_000).contains(&verdict), "flagged at {verdict} ms");

        // 1.25 x the rate: about 25 rejections per second, 250 per window: never abusive.
        let mut b = Bucket::default();
        for i in 0..100_000u32 {
            assert_ne!(l.check(&mut b, i * 8), Verdict::Abusive, "at {} ms", i * 8);
        }
    }

    #[test]
    fn the_abuse_window_restarts() {
        let l = PublishLimit::new(1, 1).unwrap();
        let mut b = Bucket::default();
        assert_eq!(l.check(&mut b, 0), Verdict::Allowed);
        // 3 rejections are tolerated per window; the 4th within 10 s is abuse.
        for _ in 0..3 {
            assert_eq!(l.check(&mut b, 1), Verdict::Limited);
        }
        let mut b2 = b;
        assert_eq!(l.check(&mut b, 2), Verdict::Abusive);
        // The same 4th rejection after the window ended starts a new window.
        assert_eq!(l.check(&mut b2, 10_001), Verdict::Allowed, "refilled");
        assert_eq!(l.check(&mut b2, 10_002), Verdict::Limited);
    }

    #[test]
    fn clock_wrap_is_harmless() {
        let l = PublishLimit::new(1000, 2).unwrap();
        let mut b = Bucket::default();
        let t = u32::MAX - 1;
        assert_eq!(allowed(&l, &mut b, t, 5), 2);
        assert_eq!(
            allowed(&l, &mut b, t.wrapping_add(2), 5),
            2,
            "2 ms later, across the wrap"
        );
    }

    #[test]
    fn largest_burst_fits() {
        let l = PublishLimit::new(u32::MAX, u32::MAX).unwrap();
        let mut b = Bucket::default();
        assert_eq!(l.check(&mut b, 1), Verdict::Allowed);
        assert_eq!(std::mem::size_of::<Bucket>(), 16);
    }

    #[test]
    fn coarse_clock_moves_forward() {
        let a = now_ms();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let d = now_ms().wrapping_sub(a);
        assert!((10..60_000).contains(&d), "{d} ms");
    }
}
