//! `EnrollmentService`: `Enroll` (token + CSR, no client certificate needed) and `Renew` (over the
//! agent's own mTLS connection). The enrollment task applies the limits (`limits.rs`), in the
//! order it handles requests; the handler only translates.

use tapgraph::proto::{self, enrollment_service_server::EnrollmentService};
use tonic::{Request, Response, Status};

use super::{Enrolled, Enrollment};
use crate::auth;

pub struct EnrollmentApi {
    enrollment: Enrollment,
}

impl EnrollmentApi {
    pub fn new(enrollment: Enrollment) -> Self {
        Self { enrollment }
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
        let peer = auth::peer(&request)?.remote_addr;
        let req = request.into_inner();
        let Enrolled {
            agent_id,
            cert_pem,
            ca_pem,
            labels,
            not_after_ms,
        } = self
            .enrollment
            .enroll(super::EnrollRequest {
                peer,
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
