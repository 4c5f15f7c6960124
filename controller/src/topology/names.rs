//! Reverse-DNS names for external and agentless endpoints, when `topology.reverse_dns` is on.
//!
//! A lookup can block a thread for the resolver's whole timeout, so lookups run on the blocking
//! pool, a few at a time, and every answer (a name, or none) is cached for a while: an unreachable
//! DNS server slows the first query that needs a name, never the map, and never twice.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// Lookups in flight at once.
const CONCURRENCY: usize = 4;

#[derive(Clone, Default)]
pub struct Names {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    /// A plain cache (no invariant beyond its entries), so a mutex never held across an await.
    cache: Mutex<Cache>,
    permits: Semaphore,
    ttl: Duration,
}

#[derive(Default)]
struct Cache {
    answers: HashMap<IpAddr, (Option<String>, Instant)>,
    pending: HashSet<IpAddr>,
}

fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, Cache> {
    // A poisoned cache only means a panic mid-insert; its entries are still usable.
    inner.cache.lock().unwrap_or_else(|p| p.into_inner())
}

impl Names {
    /// Names are looked up and kept for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            inner: Some(Arc::new(Inner {
                cache: Mutex::new(Cache::default()),
                permits: Semaphore::new(CONCURRENCY),
                ttl,
            })),
        }
    }

    /// No reverse DNS.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// The names of `ips` that resolve, waiting at most `wait` for lookups not cached yet. Lookups
    /// still running then finish in the background and serve the next query.
    pub async fn lookup(&self, ips: &[IpAddr], wait: Duration) -> HashMap<IpAddr, String> {
        let Some(inner) = &self.inner else {
            return HashMap::new();
        };
        let mut started = Vec::new();
        {
            let mut cache = lock(inner);
            let now = Instant::now();
            for ip in ips {
                let fresh = cache
                    .answers
                    .get(ip)
                    .is_some_and(|(_, at)| now.duration_since(*at) < inner.ttl);
                if !fresh && cache.pending.insert(*ip) {
                    started.push(*ip);
                }
            }
        }
        let handles: Vec<_> = started
            .into_iter()
            .map(|ip| {
                let inner = inner.clone();
                tokio::spawn(async move {
                    let Ok(_permit) = inner.permits.acquire().await else {
                        return;
                    };
                    let name =
                        tokio::task::spawn_blocking(move || dns_lookup::lookup_addr(&ip).ok())
                            .await
                            .ok()
                            .flatten()
                            .filter(|n| n.parse::<IpAddr>().is_err());
                    let mut cache = lock(&inner);
                    cache.pending.remove(&ip);
                    cache.answers.insert(ip, (name, Instant::now()));
                })
            })
            .collect();
        let _ = tokio::time::timeout(wait, futures::future::join_all(handles)).await;
        let cache = lock(inner);
        ips.iter()
            .filter_map(|ip| {
                let (name, _) = cache.answers.get(ip)?;
                Some((*ip, name.clone()?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn loopback_resolves_and_disabled_resolves_nothing() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let names = Names::new(Duration::from_secs(60));
        let got = names.lookup(&[ip], Duration::from_secs(5)).await;
        // /etc/hosts names 127.0.0.1 on every Debian machine.
        assert_eq!(got.get(&ip).map(String::as_str), Some("localhost"));
        assert!(
            Names::disabled()
                .lookup(&[ip], Duration::from_secs(1))
                .await
                .is_empty()
        );
    }
}
