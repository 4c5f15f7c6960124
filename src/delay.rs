//! A latency histogram that threads record into without a lock: log-spaced buckets of whole
//! microseconds, read as quantiles (p50, p99) or as a snapshot for `/metrics`. The mirror's
//! capture-to-write delay, on the controller per agent and target, and on an agent in direct mode
//! per target.

use std::sync::atomic::{AtomicU64, Ordering};

/// Delay histogram: bucket `i` holds delays up to 2^(i/16) µs, so a quantile is within 4.4% (2 ms at
/// 40 ms), up to 2^32 µs.
const PER_OCTAVE: f64 = 16.0;
const BUCKETS: usize = 512;

#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    /// Every delay recorded, added up, for the Prometheus histogram's `_sum`.
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

/// A histogram's contents at one moment, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct HistogramSnapshot {
    /// Per bucket, ascending: (every delay in it is below this many µs, count). The last bound is
    /// `None`: that bucket also holds every longer delay. Exact for whole µs, as `record` takes them.
    pub buckets: Vec<(Option<u64>, u64)>,
    pub sum_micros: u64,
}

impl Histogram {
    fn bucket(micros: u64) -> usize {
        // 16·log2(µs+1), rounded up: the first bucket whose bound is ≥ the delay.
        let x = (micros + 1) as f64;
        ((PER_OCTAVE * x.log2()).ceil() as usize).min(BUCKETS - 1)
    }

    fn bound(i: usize) -> u64 {
        (2f64.powf(i as f64 / PER_OCTAVE) - 1.0).ceil() as u64
    }

    pub fn record(&self, micros: u64) {
        self.counts[Self::bucket(micros)].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Records many delays, as [`Histogram::record`] each: a batch's packets, written at one
    /// moment, mostly fall in a few neighbouring buckets, so each run of one bucket is one atomic
    /// add (two atomic adds a packet were a tenth of the controller's own mirror work).
    pub fn record_all(&self, micros: impl IntoIterator<Item = u64>) {
        let mut sum = 0u64;
        let mut run: Option<(usize, u64)> = None;
        for m in micros {
            sum = sum.wrapping_add(m);
            let b = Self::bucket(m);
            match &mut run {
                Some((bucket, n)) if *bucket == b => *n += 1,
                _ => {
                    if let Some((bucket, n)) = run.replace((b, 1)) {
                        self.counts[bucket].fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        }
        if let Some((bucket, n)) = run {
            self.counts[bucket].fetch_add(n, Ordering::Relaxed);
        }
        if sum != 0 {
            self.sum_micros.fetch_add(sum, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // Bucket i holds the whole µs m with m + 1 ≤ 2^(i/P), i.e. delays below
                // ⌊2^(i/P)⌋ µs; a bound that is a power of two is computed exactly.
                let octave = PER_OCTAVE as usize;
                let below = if i % octave == 0 {
                    1u64 << (i / octave)
                } else {
                    2f64.powf(i as f64 / PER_OCTAVE).floor() as u64
                };
                (
                    (i < BUCKETS - 1).then_some(below),
                    c.load(Ordering::Relaxed),
                )
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
        }
    }

    /// The upper bound of the bucket holding quantile `q`, in µs; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::bound(i));
            }
        }
        Some(Self::bound(BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_many_at_once_is_recording_each() {
        let (each, all) = (Histogram::default(), Histogram::default());
        let delays: Vec<u64> = (0..5_000u64)
            .map(|i| (i * 7919) % 3_000 + if i % 97 == 0 { 1 << 40 } else { 0 })
            .chain([0, 0, 5, 5, 5, 1 << 33])
            .collect();
        for &d in &delays {
            each.record(d);
        }
        all.record_all(delays.iter().copied());
        all.record_all([]);
        let (a, b) = (each.snapshot(), all.snapshot());
        assert_eq!(a.buckets, b.buckets);
        assert_eq!(a.sum_micros, b.sum_micros);
    }

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.99), None);
        for _ in 0..990 {
            h.record(100);
        }
        for _ in 0..10 {
            h.record(5_000);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((100..=105).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((100..=105).contains(&p99), "{p99}");
        let p999 = h.quantile(0.999).unwrap();
        assert!((5_000..=5_250).contains(&p999), "{p999}");
        h.record(0);
        assert_eq!(Histogram::bound(Histogram::bucket(0)), 0);
    }

    #[test]
    fn snapshot_bounds_hold_exactly_what_falls_below_them() {
        let h = Histogram::default();
        // Either side of 1024 µs and of 2^24 µs, then one past the last bucket.
        for micros in [1023, 1024, (1 << 24) - 1, 1 << 24, u64::MAX / 2] {
            h.record(micros);
        }
        let s = h.snapshot();
        let below = |limit: u64| -> u64 {
            s.buckets
                .iter()
                .filter(|(b, _)| b.is_some_and(|b| b <= limit))
                .map(|(_, c)| c)
                .sum()
        };
        assert_eq!(below(1024), 1);
        assert_eq!(below(1 << 24), 3);
        assert_eq!(s.buckets.iter().map(|(_, c)| c).sum::<u64>(), 5);
        assert_eq!(s.buckets.last(), Some(&(None, 1)));
        assert!(
            s.buckets
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 || w[1].0.is_none())
        );
        assert_eq!(
            s.sum_micros,
            1023 + 1024 + (1 << 24) - 1 + (1 << 24) + u64::MAX / 2
        );
    }
}
