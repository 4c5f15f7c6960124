//! Capped exponential backoff with jitter: the one retry schedule every reconnect loop uses.
//!
//! A [`BackoffPolicy`] is valid by construction (a zero minimum, a minimum above the maximum and a
//! jitter outside `0.0..=1.0` are refused), so a loop holding one can neither spin nor wait
//! longer than its maximum. Each loop keeps its own [`Backoff`]; a success resets it.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackoffError {
    #[error("minimum delay must be greater than zero")]
    ZeroMin,
    #[error("minimum delay {min:?} exceeds maximum delay {max:?}")]
    MinAboveMax { min: Duration, max: Duration },
    #[error("jitter {0} is outside 0.0..=1.0")]
    Jitter(f64),
}

/// A validated schedule: delays start at `min`, double each attempt up to `max`, and each is shortened
/// by a random fraction of at most `jitter`, so a fleet reconnecting at once spreads out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    min: Duration,
    max: Duration,
    jitter: f64,
}

impl Default for BackoffPolicy {
    /// 200 ms doubling to 5 s, each delay shortened by up to 20%.
    fn default() -> Self {
        Self {
            min: Duration::from_millis(200),
            max: Duration::from_secs(5),
            jitter: 0.2,
        }
    }
}

impl BackoffPolicy {
    /// A schedule from `min` doubling to `max`, each delay shortened by a random fraction of at
    /// most `jitter`. Refuses a zero `min`, `min > max` and `jitter` outside `0.0..=1.0`.
    pub fn new(min: Duration, max: Duration, jitter: f64) -> Result<Self, BackoffError> {
        if min.is_zero() {
            return Err(BackoffError::ZeroMin);
        }
        if min > max {
            return Err(BackoffError::MinAboveMax { min, max });
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(BackoffError::Jitter(jitter));
        }
        Ok(Self { min, max, jitter })
    }

    /// The first delay, before jitter.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The longest delay: no delay of this schedule exceeds it.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// A fresh schedule, starting at the first attempt.
    pub fn start(&self) -> Backoff {
        Backoff {
            policy: *self,
            attempt: 0,
        }
    }
}

/// The state of one retry loop. Guarantees `min * (1 - jitter) <= next_delay() <= max`, after any
/// number of failures (the attempt count saturates; no arithmetic overflows).
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
}

impl Backoff {
    /// The delay before the next attempt, without jitter: `min * 2^attempt`, capped at `max`.
    pub fn base_delay(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        self.policy
            .min
            .checked_mul(factor)
            .unwrap_or(self.policy.max)
            .min(self.policy.max)
    }

    /// The delay to wait before the next attempt, within `base_delay() * (1 - jitter)..=base_delay()`;
    /// advances the schedule.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base_delay();
        self.attempt = self.attempt.saturating_add(1);
        let cut = self.policy.jitter * rand::random::<f64>();
        base.mul_f64(1.0 - cut)
    }

    /// Call after a success: the next failure starts again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Delays handed out since the start or the last [`reset`](Self::reset).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_default_is_the_documented_schedule() {
        assert_eq!(
            BackoffPolicy::default(),
            BackoffPolicy::new(ms(200), Duration::from_secs(5), 0.2).unwrap()
        );
        let policy = BackoffPolicy::default();
        assert_eq!((policy.min(), policy.max()), (ms(200), ms(5000)));
        let mut b = policy.start();
        assert_eq!(b.attempt(), 0);
        let d = b.next_delay();
        assert!(d >= ms(160) && d <= ms(200), "{d:?}");
        assert_eq!(b.attempt(), 1);
    }

    #[test]
    fn refuses_bad_bounds() {
        assert_eq!(
            BackoffPolicy::new(Duration::ZERO, ms(1), 0.0),
            Err(BackoffError::ZeroMin)
        );
        assert!(matches!(
            BackoffPolicy::new(ms(10), ms(5), 0.0),
            Err(BackoffError::MinAboveMax { .. })
        ));
        assert_eq!(
            BackoffPolicy::new(ms(1), ms(5), 1.5),
            Err(BackoffError::Jitter(1.5))
        );
        assert!(BackoffPolicy::new(ms(1), ms(5), -0.1).is_err());
    }

    #[test]
    fn doubles_up_to_the_cap_without_jitter() {
        let mut b = BackoffPolicy::new(ms(100), ms(1000), 0.0).unwrap().start();
        let seen: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert_eq!(
            seen,
            [100, 200, 400, 800, 1000, 1000, 1000, 1000]
                .map(ms)
                .to_vec()
        );
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }

    #[test]
    fn jittered_delays_stay_within_bounds() {
        let policy = BackoffPolicy::new(ms(50), ms(2000), 0.5).unwrap();
        let mut b = policy.start();
        for _ in 0..10_000 {
            let base = b.base_delay();
            let d = b.next_delay();
            assert!(d <= base && d <= policy.max(), "{d:?} > {base:?}");
            assert!(d >= base.mul_f64(0.5), "{d:?} < half of {base:?}");
            assert!(d >= ms(25));
        }
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = BackoffPolicy::new(ms(1), Duration::from_secs(30), 0.0)
            .unwrap()
            .start();
        for _ in 0..1000 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), Duration::from_secs(30));
    }
}
