//! `EnrollmentService`: `Enroll` (token + CSR, no client certificate needed) and `Renew` (over the
//! agent's own mTLS connection).
//!
//! Two limits guard `Enroll`: failed attempts are counted per source address, so a flood of bad
//! tokens from one address is refused before it costs anything, and one bucket bounds all attempts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tapgraph::proto::{self, enrollment_service_server::EnrollmentService};
use tonic::{Request, Response, Status};

use super::{Enrolled, Enrollment};
use crate::auth;

pub struct EnrollmentApi {
    enrollment: Enrollment,
    limit: RateLimit,
    failures: FailureLimit,
}

impl EnrollmentApi {
    /// At most `rate` enrollments per second, `burst` at once, and per source address
    /// [`FAILURE_BURST`] failed ones, then one per [`FAILURE_REFILL`].
    pub fn new(enrollment: Enrollment, rate: f64, burst: u32) -> Self {
        Self {
            enrollment,
            limit: RateLimit::new(rate, burst),
            failures: FailureLimit::new(FAILURE_BURST, FAILURE_REFILL, MAX_SOURCES),
        }
    }
}

/// Failed enrollments a source address may make at once…
const FAILURE_BURST: u32 = 10;
/// …and then one per this long.
const FAILURE_REFILL: Duration = Duration::from_secs(6);
/// Sources tracked at most; past it, the one idle longest is forgotten.
const MAX_SOURCES: usize = 4096;

/// Where an enrollment comes from, as the failure limit counts it: an IPv4 address, or the /64 of
/// an IPv6 one (a single host often holds a whole /64).
fn source(addr: SocketAddr) -> IpAddr {
    match addr.ip().to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// A token bucket of failed enrollments per source address, bounded in memory: at most
/// `max_sources` are tracked, and a full bucket is the same as none. An attempt takes a token
/// before it is tried and gets it back if it succeeds: a flood sent all at once is bounded as
/// surely as one sent request by request.
struct FailureLimit {
    burst: f64,
    refill: Duration,
    max_sources: usize,
    sources: Mutex<HashMap<IpAddr, Source>>,
}

#[derive(Debug, Clone, Copy)]
struct Source {
    /// Attempts the source may still make, as of `at`.
    tokens: f64,
    at: Instant,
    /// Refusing it now (logged once per episode).
    refusing: bool,
}

/// A refused attempt: when the source may try again, and whether this is the first refusal since
/// it last could.
#[derive(Debug, PartialEq)]
struct Refused {
    wait: Duration,
    first: bool,
}

impl FailureLimit {
    fn new(burst: u32, refill: Duration, max_sources: usize) -> Self {
        Self {
            burst: f64::from(burst),
            refill,
            max_sources,
            sources: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, s: &Source, now: Instant) -> f64 {
        let gained = now.saturating_duration_since(s.at).as_secs_f64() / self.refill.as_secs_f64();
        (s.tokens + gained).min(self.burst)
    }

    /// Takes a token for an attempt from `source`, or says how long until it may try.
    fn take(&self, source: IpAddr) -> Result<(), Refused> {
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if !sources.contains_key(&source) && sources.len() >= self.max_sources {
            // Full buckets carry nothing; if none is full, forget the source idle longest.
            sources.retain(|_, s| self.refilled(s, now) < self.burst);
            let oldest = sources.iter().min_by_key(|(_, s)| s.at).map(|(ip, _)| *ip);
            if sources.len() >= self.max_sources
                && let Some(oldest) = oldest
            {
                sources.remove(&oldest);
            }
        }
        let fresh = Source {
            tokens: self.burst,
            at: now,
            refusing: false,
        };
        let s = sources.entry(source).or_insert(fresh);
        let tokens = self.refilled(s, now);
        if tokens >= 1.0 {
            *s = Source {
                tokens: tokens - 1.0,
                at: now,
                refusing: false,
            };
            return Ok(());
        }
        let first = !s.refusing;
        *s = Source {
            tokens,
            at: now,
            refusing: true,
        };
        Err(Refused {
            wait: self.refill.mul_f64(1.0 - tokens),
            first,
        })
    }

    /// Gives back the token of an attempt that did not fail by the caller's fault.
    fn refund(&self, source: IpAddr) {
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sources.get_mut(&source) {
            s.tokens = (self.refilled(s, now) + 1.0).min(self.burst);
            s.at = now;
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Whether a refusal was the caller's doing (a bad token, CSR or request), which the failure
/// limit counts; the controller's own trouble (its store) is not.
fn callers_fault(status: &Status) -> bool {
    !matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::ResourceExhausted
    )
}

/// A token bucket for enrollments: a fleet starting at once (thousands of CSRs to sign, each a
/// redb commit) is admitted at a steady rate, and the rest are told when to retry.
struct RateLimit {
    rate: f64,
    burst: f64,
    state: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl RateLimit {
    fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            state: std::sync::Mutex::new((f64::from(burst), std::time::Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&self) -> Result<(), std::time::Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = &mut *state;
        let now = std::time::Instant::now();
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64(
                (1.0 - *tokens) / self.rate,
            ))
        }
    }
}

fn nanos(ms: u64) -> u64 {
    ms.saturating_mul(1_000_000)
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<proto::EnrollRequest>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        let peer = auth::peer(&request)?;
        let from = source(peer.remote_addr);
        if let Err(refused) = self.failures.take(from) {
            if refused.first {
                tracing::warn!(source = %from, peer = %peer.remote_addr, limit = FAILURE_BURST, "enrollment source used up its failed attempts; its attempts are refused until it waits");
            }
            return Err(Status::resource_exhausted(format!(
                "too many failed enrollments from {from} (per-source limit: {FAILURE_BURST} \
                 failures, then one per {} s): retry in {} ms",
                FAILURE_REFILL.as_secs(),
                refused.wait.as_millis().max(1)
            )));
        }
        if let Err(wait) = self.limit.take() {
            self.failures.refund(from);
            return Err(Status::resource_exhausted(format!(
                "enrollment rate limit ({}/s, enrollment.rate): retry in {} ms",
                self.limit.rate,
                wait.as_millis().max(1)
            )));
        }
        let result = self
            .enroll_checked(peer.remote_addr, request.into_inner())
            .await;
        match &result {
            Err(status) if callers_fault(status) => {}
            _ => self.failures.refund(from),
        }
        result
    }

    async fn renew(
        &self,
        request: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::RenewResponse>, Status> {
        let (agent_id, _) = auth::agent(&request, self.enrollment.revocations())?;
        let renewed = self
            .enrollment
            .renew(agent_id, request.into_inner().csr_pem)
            .await?;
        Ok(Response::new(proto::RenewResponse {
            certificate_pem: renewed.cert_pem,
            ca_bundle_pem: renewed.ca_pem,
            not_after_unix_nanos: nanos(renewed.not_after_ms),
        }))
    }
}

impl EnrollmentApi {
    /// An enrollment past the limits: the request checked, then handed to the enrollment task.
    async fn enroll_checked(
        &self,
        peer: SocketAddr,
        req: proto::EnrollRequest,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        if req.hostname.is_empty() || req.hostname.len() > 255 {
            return Err(Status::invalid_argument("hostname must be 1 to 255 bytes"));
        }
        if req.machine_id.len() > 128 {
            return Err(Status::invalid_argument(
                "machine_id is longer than 128 bytes",
            ));
        }
        tracing::info!(%peer, hostname = %req.hostname, "enrollment request");
        let Enrolled {
            agent_id,
            cert_pem,
            ca_pem,
            labels,
            not_after_ms,
        } = self
            .enrollment
            .enroll(super::EnrollRequest {
                token: req.token,
                csr_pem: req.csr_pem,
                hostname: req.hostname,
                machine_id: req.machine_id,
                requested_id: req.requested_id,
            })
            .await?;
        Ok(Response::new(proto::EnrollResponse {
            agent_id,
            certificate_pem: cert_pem,
            ca_bundle_pem: ca_pem,
            labels: labels.into_iter().collect(),
            not_after_unix_nanos: nanos(not_after_ms),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_admits_the_burst_then_the_rate() {
        let limit = RateLimit::new(10.0, 3);
        for _ in 0..3 {
            assert!(limit.take().is_ok());
        }
        let wait = limit.take().unwrap_err();
        assert!(wait <= std::time::Duration::from_millis(100), "{wait:?}");
        std::thread::sleep(std::time::Duration::from_millis(120));
        assert!(limit.take().is_ok(), "a tenth of a second later, one more");
    }

    #[test]
    fn failures_are_counted_per_source_and_memory_stays_bounded() {
        let limit = FailureLimit::new(3, Duration::from_secs(3600), 4);
        let flood: IpAddr = [127, 0, 0, 2].into();
        let good: IpAddr = [127, 0, 0, 1].into();
        for _ in 0..3 {
            assert_eq!(limit.take(flood), Ok(()));
        }
        let refused = limit.take(flood).unwrap_err();
        assert!(
            refused.first && refused.wait > Duration::from_secs(3000),
            "{refused:?}"
        );
        assert!(!limit.take(flood).unwrap_err().first, "reported once");
        for _ in 0..10 {
            // Successes give their token back.
            assert_eq!(limit.take(good), Ok(()));
            limit.refund(good);
        }

        for n in 0..100u8 {
            let _ = limit.take([10, 0, 0, n].into());
            assert!(limit.tracked() <= 4);
        }
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
