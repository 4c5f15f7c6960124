//! `EnrollmentService`: `Enroll` (token + CSR, no client certificate needed) and `Renew` (over the
//! agent's own mTLS connection).

use tapgraph::proto::{self, enrollment_service_server::EnrollmentService};
use tonic::{Request, Response, Status};

use super::{Enrolled, Enrollment};
use crate::auth;

pub struct EnrollmentApi {
    enrollment: Enrollment,
    limit: RateLimit,
}

impl EnrollmentApi {
    /// At most `rate` enrollments per second, `burst` at once.
    pub fn new(enrollment: Enrollment, rate: f64, burst: u32) -> Self {
        Self {
            enrollment,
            limit: RateLimit::new(rate, burst),
        }
    }
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
        if let Err(wait) = self.limit.take() {
            return Err(Status::resource_exhausted(format!(
                "enrollment rate limit ({}/s, enrollment.rate): retry in {} ms",
                self.limit.rate,
                wait.as_millis().max(1)
            )));
        }
        let req = request.into_inner();
        if req.hostname.is_empty() || req.hostname.len() > 255 {
            return Err(Status::invalid_argument("hostname must be 1 to 255 bytes"));
        }
        if req.machine_id.len() > 128 {
            return Err(Status::invalid_argument(
                "machine_id is longer than 128 bytes",
            ));
        }
        tracing::info!(peer = %peer.remote_addr, hostname = %req.hostname, "enrollment request");
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
}
