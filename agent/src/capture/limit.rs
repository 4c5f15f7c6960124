//! Rate control of the virtual TAP (issue 7): the token bucket that keeps the mirror under the
//! policy's speed limit, and the breach watchdog that stops capture when the offered rate stays
//! above it.
//!
//! Both are pure: time comes in as nanoseconds from the caller (the capture thread passes the
//! packets' kernel timestamps), so their behaviour is exact and testable.
//!
//! - **Token bucket.** Tokens are bytes on the wire, added at the limit's rate up to a burst; a
//!   packet that finds too few is dropped (and counted by the caller), never queued. The burst is
//!   100 ms of traffic at the limit ([`BURST`]), and at least one largest frame (65,553 bytes), so
//!   a limit below one such frame per burst still lets them through at the average rate.
//! - **Breach watchdog.** Time is cut into check intervals from the first packet. At the end of
//!   each, the offered rate (every captured byte, before the bucket) is compared with the limit;
//!   `N` consecutive intervals above it is a breach, reported once with the last interval's rate.
//!   An interval with nothing offered, including one skipped over by a silence, is under the limit;
//!   but a burst of exactly `N` intervals that then stops is still a breach, although its last
//!   interval is only closed by the first packet after the silence (or the read timeout).
//!   `N = 0` turns the rule off.

use std::time::Duration;

/// How much traffic at the limit the bucket holds: 100 ms.
pub const BURST: Duration = Duration::from_millis(100);

/// Largest frame the burst must always admit: 65,553 bytes, the largest IP packet (65,535 bytes)
/// behind an Ethernet header with a VLAN tag (18 bytes).
const MAX_FRAME: u64 = 65_535 + 18;

const NANOS: u128 = 1_000_000_000;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: u64,
    /// Capacity, in bytes.
    burst: u64,
    /// Tokens, in byte-nanoseconds per second (bytes × 10⁹), so refills never round away.
    tokens: u128,
    last_ns: Option<u64>,
}

impl TokenBucket {
    /// A bucket at `limit_bps` bits per second, full.
    pub fn new(limit_bps: u64) -> Self {
        let rate = limit_bps / 8;
        let burst = ((u128::from(rate) * BURST.as_nanos() / NANOS) as u64).max(MAX_FRAME);
        Self {
            rate,
            burst,
            tokens: u128::from(burst) * NANOS,
            last_ns: None,
        }
    }

    #[cfg(test)]
    pub fn burst_bytes(&self) -> u64 {
        self.burst
    }

    /// Whether a packet of `len` bytes seen at `now_ns` fits the budget; if so its tokens are
    /// spent. Time that runs backwards (clock steps) refills nothing.
    pub fn admit(&mut self, now_ns: u64, len: u32) -> bool {
        if let Some(last) = self.last_ns {
            let elapsed = u128::from(now_ns.saturating_sub(last));
            self.tokens =
                (self.tokens + elapsed * u128::from(self.rate)).min(u128::from(self.burst) * NANOS);
        }
        self.last_ns = Some(self.last_ns.map_or(now_ns, |last| last.max(now_ns)));
        let cost = u128::from(len) * NANOS;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// What the watchdog reports when the offered rate stayed above the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breach {
    /// Offered rate in the interval that completed the breach.
    pub measured_bps: u64,
    pub limit_bps: u64,
    /// Consecutive intervals above the limit: the policy's `breach_intervals`.
    pub intervals: u32,
    /// End of that interval.
    pub at_ns: u64,
}

#[derive(Debug, Clone)]
pub struct BreachWatchdog {
    limit_bps: u64,
    interval_ns: u64,
    needed: u32,
    /// Start of the current interval; set by the first packet.
    start_ns: Option<u64>,
    offered_bytes: u64,
    consecutive: u32,
    breached: bool,
}

impl BreachWatchdog {
    /// `intervals == 0` disables the rule.
    pub fn new(limit_bps: u64, check_interval: Duration, intervals: u32) -> Self {
        Self {
            limit_bps,
            interval_ns: check_interval.as_nanos().clamp(1, u128::from(u64::MAX)) as u64,
            needed: intervals,
            start_ns: None,
            offered_bytes: 0,
            consecutive: 0,
            breached: false,
        }
    }

    /// Counts a captured packet of `len` bytes at `now_ns`, first closing every interval that
    /// ended before it. Returns the breach the moment it happens, once.
    pub fn offer(&mut self, now_ns: u64, len: u32) -> Option<Breach> {
        let breach = self.advance(now_ns);
        self.offered_bytes += u64::from(len);
        breach
    }

    /// Closes every interval that ended by `now_ns`; call it when no packet comes for a while
    /// (the capture thread's read timeout), so a breach is not waited on.
    pub fn advance(&mut self, now_ns: u64) -> Option<Breach> {
        if self.needed == 0 || self.breached {
            return None;
        }
        let Some(start) = self.start_ns else {
            self.start_ns = Some(now_ns);
            return None;
        };
        if now_ns < start.saturating_add(self.interval_ns) {
            return None;
        }
        // The interval that just ended.
        let end = start + self.interval_ns;
        let measured_bps = (u128::from(self.offered_bytes) * 8 * NANOS
            / u128::from(self.interval_ns))
        .min(u128::from(u64::MAX)) as u64;
        if measured_bps > self.limit_bps {
            self.consecutive += 1;
        } else {
            self.consecutive = 0;
        }
        self.offered_bytes = 0;
        // Whole intervals skipped over by a silence offered nothing.
        let skipped = (now_ns - end) / self.interval_ns;
        self.start_ns = Some(end + skipped * self.interval_ns);
        // Judged before the silence breaks the run: the interval that completes a breach may be
        // closed late, by the first packet after a burst has stopped.
        if self.consecutive >= self.needed {
            self.breached = true;
            return Some(Breach {
                measured_bps,
                limit_bps: self.limit_bps,
                intervals: self.consecutive,
                at_ns: end,
            });
        }
        if skipped > 0 {
            self.consecutive = 0;
        }
        None
    }

    #[cfg(test)]
    pub fn breached(&self) -> bool {
        self.breached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000 * MS;

    /// Offers `bps` for `seconds` in 1 ms steps from `from_ns`; returns the first breach and the
    /// time reached.
    fn offer_for(
        w: &mut BreachWatchdog,
        from_ns: u64,
        seconds: u64,
        bps: u64,
    ) -> (Option<Breach>, u64) {
        let per_ms = (bps / 8 / 1000) as u32;
        let mut breach = None;
        let mut t = from_ns;
        for _ in 0..seconds * 1000 {
            if let Some(b) = w.offer(t, per_ms) {
                breach.get_or_insert(b);
            }
            t += MS;
        }
        (breach, t)
    }

    #[test]
    fn a_breach_takes_exactly_n_intervals_above_the_limit() {
        for n in [1u32, 3, 5] {
            let mut w = BreachWatchdog::new(8_000_000, Duration::from_secs(1), n);
            // N−1 intervals at twice the limit: no breach yet.
            let (b, t) = offer_for(&mut w, 0, u64::from(n) - 1, 16_000_000);
            assert_eq!(b, None, "n={n}");
            // The Nth interval ends when the first packet after it comes: then, not before.
            let (b, t) = offer_for(&mut w, t, 1, 16_000_000);
            assert_eq!(b, None, "n={n}: the Nth interval has not been closed yet");
            let b = w.advance(t).expect("breach after exactly N intervals");
            assert_eq!(b.intervals, n);
            assert_eq!(b.limit_bps, 8_000_000);
            assert_eq!(b.measured_bps, 16_000_000);
            assert_eq!(b.at_ns, u64::from(n) * SEC);
            // Reported once; nothing more after it.
            assert_eq!(offer_for(&mut w, t, 2, 16_000_000).0, None);
            assert!(w.breached());
        }
    }

    #[test]
    fn one_interval_under_the_limit_starts_the_count_again() {
        let mut w = BreachWatchdog::new(8_000_000, Duration::from_secs(1), 3);
        let (b, t) = offer_for(&mut w, 0, 2, 16_000_000);
        assert_eq!(b, None);
        let (b, t) = offer_for(&mut w, t, 1, 4_000_000);
        assert_eq!(b, None);
        let (b, t) = offer_for(&mut w, t, 2, 16_000_000);
        assert_eq!(b, None, "2 + 2 intervals above, not 3 in a row");
        // Exactly at the limit is not above it.
        let (b, t) = offer_for(&mut w, t, 3, 8_000_000);
        assert_eq!(b, None);
        assert_eq!(w.advance(t), None);
        // A silence of whole intervals counts as under the limit.
        let (b, t) = offer_for(&mut w, t, 2, 16_000_000);
        assert_eq!(b, None);
        let (b, t) = offer_for(&mut w, t + 5 * SEC, 2, 16_000_000);
        assert_eq!(b, None);
        assert_eq!(w.advance(t), None, "the silence broke the run");
        // While a third interval above makes it.
        let (b, t) = offer_for(&mut w, t, 1, 16_000_000);
        assert_eq!(b, None);
        assert!(w.advance(t).is_some());
    }

    /// A burst of exactly N intervals that then stops is a breach: the interval that completes it
    /// is closed late (by the first packet after the silence, or by the read timeout's call),
    /// and the silence after it does not undo what it completed.
    #[test]
    fn a_burst_of_exactly_n_intervals_then_a_silence_is_a_breach() {
        for n in [1u32, 2, 3] {
            for silence in [0, SEC / 2, SEC, SEC + SEC / 2, 5 * SEC] {
                for by_packet in [true, false] {
                    let mut w = BreachWatchdog::new(8_000_000, Duration::from_secs(1), n);
                    let (b, t) = offer_for(&mut w, 0, u64::from(n), 16_000_000);
                    assert_eq!(b, None, "n={n}: the Nth interval is still open");
                    let closed_at = t + silence;
                    let b = if by_packet {
                        w.offer(closed_at, 100)
                    } else {
                        w.advance(closed_at)
                    };
                    let b = b.unwrap_or_else(|| {
                        panic!("n={n}, closed {silence} ns late (packet: {by_packet}): no breach")
                    });
                    assert_eq!(b.intervals, n);
                    assert_eq!(b.measured_bps, 16_000_000);
                    assert_eq!(b.limit_bps, 8_000_000);
                    assert_eq!(b.at_ns, u64::from(n) * SEC, "the end of the Nth interval");
                    assert!(w.breached());
                }
            }
        }
    }

    #[test]
    fn the_rule_can_be_off() {
        let mut w = BreachWatchdog::new(8_000_000, Duration::from_secs(1), 0);
        let (b, t) = offer_for(&mut w, 0, 10, 80_000_000);
        assert_eq!(b, None);
        assert_eq!(w.advance(t + SEC), None);
    }

    #[test]
    fn the_bucket_passes_traffic_under_the_limit_whole() {
        let mut bucket = TokenBucket::new(8_000_000); // 1 MB/s
        let mut t = 0;
        for _ in 0..10_000 {
            // 1,000 B every 2 ms: 500 kB/s.
            assert!(bucket.admit(t, 1_000));
            t += 2 * MS;
        }
    }

    #[test]
    fn the_bucket_holds_the_limit_and_drops_the_rest() {
        let limit_bps = 8_000_000; // 1 MB/s
        let mut bucket = TokenBucket::new(limit_bps);
        let (mut admitted, mut dropped) = (0u64, 0u64);
        let mut t = 0;
        // 1,500 B every 0.5 ms for 10 s: 3 MB/s offered.
        for _ in 0..20_000 {
            if bucket.admit(t, 1_500) {
                admitted += 1_500;
            } else {
                dropped += 1_500;
            }
            t += MS / 2;
        }
        let allowed = limit_bps / 8 * 10 + bucket.burst_bytes();
        assert!(admitted <= allowed, "{admitted} > {allowed}");
        assert!(
            admitted >= allowed - 1_500 * 2,
            "the budget is used: {admitted}"
        );
        assert_eq!(admitted + dropped, 1_500 * 20_000);
    }

    #[test]
    fn a_tiny_limit_still_admits_a_large_frame_and_time_never_runs_back() {
        let mut bucket = TokenBucket::new(8_000); // 1 kB/s
        assert!(bucket.burst_bytes() >= MAX_FRAME);
        for _ in 0..7 {
            assert!(bucket.admit(0, 9_000), "jumbo frames fit the burst");
        }
        assert!(!bucket.admit(0, 9_000), "the burst is spent");
        assert!(!bucket.admit(SEC, 9_000), "1 kB refilled in a second");
        // A clock step backwards refills nothing.
        assert!(!bucket.admit(0, 9_000));
        assert!(bucket.admit(20 * SEC, 9_000));
    }

    /// After a silence the intervals keep their grid: the next one starts at the last whole
    /// interval boundary before the packet that ends the silence, not at the packet.
    #[test]
    fn after_a_silence_the_interval_start_moves_forward_on_its_grid() {
        let mut w = BreachWatchdog::new(8_000_000, Duration::from_secs(1), 1);
        assert_eq!(w.offer(0, 100), None);
        // 2 MB at 5.5 s: the interval [0, 1 s) closes under the limit, and [5 s, 6 s) begins.
        assert_eq!(w.offer(5 * SEC + SEC / 2, 2_000_000), None);
        assert_eq!(w.advance(6 * SEC - 1), None, "[5 s, 6 s) is still open");
        let b = w
            .advance(6 * SEC)
            .expect("2 MB in [5 s, 6 s) is above 1 MB/s");
        assert_eq!(b.at_ns, 6 * SEC);
        assert_eq!(
            b.measured_bps, 16_000_000,
            "measured over the whole interval"
        );
    }

    #[test]
    fn the_burst_is_100_ms_at_the_limit() {
        assert_eq!(BURST, Duration::from_millis(100));
        // 8 Mbit/s is 1 MB/s: a full bucket admits 100 kB at once and not a byte more.
        let mut bucket = TokenBucket::new(8_000_000);
        assert_eq!(bucket.burst_bytes(), 100_000);
        assert!(bucket.admit(0, 60_000));
        assert!(bucket.admit(0, 40_000));
        assert!(!bucket.admit(0, 1), "the burst is spent");
        // 1 ms refills 1 kB.
        assert!(bucket.admit(MS, 1_000));
        assert!(!bucket.admit(MS, 1));
        // A long silence refills 100 kB, never more.
        assert!(bucket.admit(60 * SEC, 100_000));
        assert!(!bucket.admit(60 * SEC, 1));
    }

    #[test]
    fn a_limit_below_one_frame_per_burst_admits_a_full_65_553_byte_frame() {
        let mut bucket = TokenBucket::new(8_000); // 1 kB/s: 100 B per 100 ms
        assert_eq!(bucket.burst_bytes(), 65_553);
        assert!(bucket.admit(0, 65_553), "a full frame fits");
        assert!(!bucket.admit(0, 1), "and fills the burst exactly");
        let mut bucket = TokenBucket::new(8_000);
        assert!(
            !bucket.admit(0, 65_554),
            "a byte more than the burst never fits"
        );
        // 65,553 bytes at 1 kB/s take 65.553 s to come back.
        let mut bucket = TokenBucket::new(8_000);
        assert!(bucket.admit(0, 65_553));
        assert!(!bucket.admit(65_552 * MS, 65_553));
        let mut bucket = TokenBucket::new(8_000);
        assert!(bucket.admit(0, 65_553));
        assert!(bucket.admit(65_553 * MS, 65_553));
    }

    /// Intervals are cut from the first packet, not from a grid of whole seconds: with real
    /// Unix timestamps the first interval is a whole one.
    #[test]
    fn the_first_interval_starts_at_the_first_packet() {
        let first = 1_800_000_000 * SEC + SEC / 2;
        let mut w = BreachWatchdog::new(8_000_000, Duration::from_secs(1), 1);
        let (b, t) = offer_for(&mut w, first, 1, 16_000_000);
        assert_eq!(b, None);
        assert_eq!(w.advance(first + SEC - 1), None);
        let b = w.advance(t).expect("one whole interval at twice the limit");
        assert_eq!(b.at_ns, first + SEC);
        assert_eq!(b.measured_bps, 16_000_000);
    }

    /// Policies forbid a zero check interval; the watchdog still never divides by it.
    #[test]
    fn a_zero_check_interval_is_one_nanosecond() {
        let mut w = BreachWatchdog::new(8_000_000, Duration::ZERO, 2);
        assert_eq!(w.offer(0, 1_000), None);
        assert_eq!(w.offer(1, 1_000), None);
        let b = w
            .offer(2, 1_000)
            .expect("two 1 ns intervals far above the limit");
        assert_eq!(b.at_ns, 2);
    }
}
