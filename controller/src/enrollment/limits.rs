//! The limits on `Enroll`, applied by the enrollment task in the order it handles requests, so a
//! flood sent all at once is counted as exactly as one sent request by request:
//! - failed attempts per source address (an IPv4 address, or an IPv6 /64): [`FAILURE_BURST`], then
//!   one per [`FAILURE_REFILL`]. A source past it is refused before its token is looked at and
//!   before it takes from the shared bucket, so a flood of bad tokens from one address does not
//!   hold up hosts elsewhere. Successful enrollments do not count: a fleet behind one NAT address
//!   enrolls at the shared rate.
//! - all attempts: one token bucket (`enrollment.rate`, `enrollment.burst`), the overall bound on
//!   the work (a CSR to sign and a store commit each).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Failed enrollments a source address may make at once…
pub const FAILURE_BURST: u32 = 10;
/// …and then one per this long.
pub const FAILURE_REFILL: Duration = Duration::from_secs(6);
/// Sources tracked at most; past it, a source with no failures left to earn back, or else the one
/// idle longest, is forgotten.
pub const MAX_SOURCES: usize = 4096;

/// Both limits, owned by the enrollment task.
pub struct EnrollLimits {
    rate: RateLimit,
    failures: FailureLimit,
    refused: Refused,
}

/// Attempts refused by each limit, for `/metrics`; read without asking the task.
#[derive(Clone, Debug, Default)]
pub struct Refused {
    per_source: Arc<AtomicU64>,
    rate: Arc<AtomicU64>,
}

impl Refused {
    /// (refused by the per-source failure limit, refused by `enrollment.rate`).
    pub fn read(&self) -> (u64, u64) {
        (
            self.per_source.load(Ordering::Relaxed),
            self.rate.load(Ordering::Relaxed),
        )
    }
}

impl EnrollLimits {
    /// At most `rate` enrollments per second, `burst` at once; failures per source as above.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate: RateLimit::new(rate, burst),
            failures: FailureLimit::new(FAILURE_BURST, FAILURE_REFILL, MAX_SOURCES),
            refused: Refused::default(),
        }
    }

    /// The refusal counters, shared.
    pub fn refused(&self) -> Refused {
        self.refused.clone()
    }

    /// Admits an attempt from `peer` at `now`, or says which limit refuses it and when to retry.
    pub fn admit(&mut self, peer: SocketAddr, now: Instant) -> Result<(), String> {
        let from = source(peer);
        if let Err(wait) = self.failures.check(from, now) {
            self.refused.per_source.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "too many failed enrollments from {from} (per-source limit: {FAILURE_BURST} \
                 failures, then one per {} s): retry in {} ms",
                FAILURE_REFILL.as_secs(),
                wait.as_millis().max(1)
            ));
        }
        self.rate.take(now).map_err(|wait| {
            self.refused.rate.fetch_add(1, Ordering::Relaxed);
            format!(
                "enrollment rate limit ({}/s, enrollment.rate): retry in {} ms",
                self.rate.rate,
                wait.as_millis().max(1)
            )
        })
    }

    /// Counts a failed attempt from `peer`; true when its source has just used up its failures.
    pub fn failed(&mut self, peer: SocketAddr, now: Instant) -> bool {
        self.failures.failed(source(peer), now)
    }
}

/// Where an enrollment comes from, as the failure limit counts it: an IPv4 address, or the /64 of
/// an IPv6 one (a single host often holds a whole /64).
pub fn source(addr: SocketAddr) -> IpAddr {
    match addr.ip().to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// A token bucket for enrollments: a fleet starting at once (thousands of CSRs to sign, each a
/// redb commit) is admitted at a steady rate, and the rest are told when to retry.
struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// A token bucket of failures per source, bounded in memory: at most `max_sources` are tracked,
/// and a full bucket is the same as none.
struct FailureLimit {
    burst: f64,
    refill: Duration,
    max_sources: usize,
    /// Failures each source may still make, as of the instant.
    sources: HashMap<IpAddr, (f64, Instant)>,
}

impl FailureLimit {
    fn new(burst: u32, refill: Duration, max_sources: usize) -> Self {
        Self {
            burst: f64::from(burst),
            refill,
            max_sources,
            sources: HashMap::new(),
        }
    }

    fn refilled(&self, (tokens, at): (f64, Instant), now: Instant) -> f64 {
        let gained = now.saturating_duration_since(at).as_secs_f64() / self.refill.as_secs_f64();
        (tokens + gained).min(self.burst)
    }

    /// Whether `source` may try; otherwise how long until it may.
    fn check(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let Some(&state) = self.sources.get(&source) else {
            return Ok(());
        };
        let tokens = self.refilled(state, now);
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(self.refill.mul_f64(1.0 - tokens))
        }
    }

    /// Counts a failure of `source`; true when it has just used up its failures.
    fn failed(&mut self, source: IpAddr, now: Instant) -> bool {
        if !self.sources.contains_key(&source) && self.sources.len() >= self.max_sources {
            let (burst, refill) = (self.burst, self.refill);
            let full = |(tokens, at): (f64, Instant)| {
                tokens + now.saturating_duration_since(at).as_secs_f64() / refill.as_secs_f64()
                    >= burst
            };
            self.sources.retain(|_, state| !full(*state));
            if self.sources.len() >= self.max_sources
                && let Some(oldest) = self
                    .sources
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(ip, _)| *ip)
            {
                self.sources.remove(&oldest);
            }
        }
        let state = self.sources.get(&source).copied();
        let tokens = self.refilled(state.unwrap_or((self.burst, now)), now) - 1.0;
        self.sources.insert(source, (tokens.max(0.0), now));
        (0.0..1.0).contains(&tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: [u8; 4]) -> SocketAddr {
        (ip, 40_000).into()
    }

    #[test]
    fn the_bucket_admits_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(10.0, 3);
        for _ in 0..3 {
            assert!(limit.take(t0).is_ok());
        }
        let wait = limit.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(
            limit.take(t0 + Duration::from_millis(120)).is_ok(),
            "a tenth of a second later, one more"
        );
    }

    #[test]
    fn failures_are_counted_per_source_and_successes_not_at_all() {
        let t0 = Instant::now();
        let mut limits = EnrollLimits::new(1000.0, 1000);
        let (flood, good) = (peer([127, 0, 0, 2]), peer([127, 0, 0, 1]));
        for n in 0..FAILURE_BURST {
            assert_eq!(limits.admit(flood, t0), Ok(()));
            assert_eq!(
                limits.failed(flood, t0),
                n + 1 == FAILURE_BURST,
                "failure {n}"
            );
        }
        let refused = limits.admit(flood, t0).unwrap_err();
        assert!(
            refused.starts_with("too many failed enrollments from 127.0.0.2"),
            "{refused}"
        );
        assert_eq!(limits.refused().read(), (1, 0), "counted, by reason");
        assert!(!limits.failed(flood, t0), "reported once");
        // Another source, admitted many times over (its attempts succeed), is never held back.
        for _ in 0..100 {
            assert_eq!(limits.admit(good, t0), Ok(()));
        }
        // The flooding source earns an attempt back per FAILURE_REFILL.
        let later = t0 + FAILURE_REFILL * 2;
        assert_eq!(limits.admit(flood, later), Ok(()));
    }

    #[test]
    fn rate_refusals_are_counted_apart() {
        let t0 = Instant::now();
        let mut limits = EnrollLimits::new(1.0, 2);
        let from = peer([127, 0, 0, 1]);
        assert_eq!(limits.admit(from, t0), Ok(()));
        assert_eq!(limits.admit(from, t0), Ok(()));
        let refused = limits.admit(from, t0).unwrap_err();
        assert!(refused.contains("enrollment.rate"), "{refused}");
        assert_eq!(limits.refused().read(), (0, 1));
    }

    #[test]
    fn tracked_sources_stay_bounded() {
        let t0 = Instant::now();
        let mut limit = FailureLimit::new(3, Duration::from_secs(3600), 4);
        for n in 0..100u8 {
            limit.failed(
                [10, 0, 0, n].into(),
                t0 + Duration::from_millis(u64::from(n)),
            );
            assert!(limit.sources.len() <= 4);
        }
        assert!(
            limit.sources.contains_key(&IpAddr::from([10, 0, 0, 99])),
            "the newest is kept, the idle longest went"
        );
    }

    #[test]
    fn an_ipv6_source_is_its_64() {
        let a: SocketAddr = "[2001:db8:1:2:aaaa::1]:1".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:bbbb::9]:2".parse().unwrap();
        let c: SocketAddr = "[2001:db8:1:3::1]:3".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(c));
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:4".parse().unwrap();
        assert_eq!(source(mapped), IpAddr::from([192, 0, 2, 7]));
    }
}
