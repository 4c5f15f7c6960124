//! Who may call what. The TLS layer has verified any certificate presented; here each RPC checks
//! that the caller holds the right kind of identity, and that an agent is not revoked and its
//! certificate's key still holds the id.

use tapgraph::identity::{Identity, IdentityError};
use tapgraph::transport::PeerInfo;
use tonic::{Request, Status};

use crate::enrollment::Revocations;

pub fn peer<T>(request: &Request<T>) -> Result<PeerInfo, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::internal("connection carries no peer information"))
}

fn unauthenticated(e: &IdentityError) -> Status {
    match e {
        IdentityError::NoCertificate => {
            Status::unauthenticated("a client certificate is required (enroll first)")
        }
        other => Status::unauthenticated(format!("client certificate refused: {other}")),
    }
}

/// The caller's agent id; refuses callers without an agent certificate, and revoked agents.
pub fn agent<T>(
    request: &Request<T>,
    revocations: &Revocations,
) -> Result<(String, PeerInfo), Status> {
    let peer = peer(request)?;
    match &peer.identity {
        Ok(Identity::Agent(id)) if revocations.is_revoked(id) => Err(Status::permission_denied(
            format!("the certificate of agent {id} was revoked"),
        )),
        Ok(Identity::Agent(id)) if !revocations.key_is_current(id, peer.key_sha256.as_deref()) => {
            Err(Status::permission_denied(format!(
                "this certificate's key no longer holds agent id {id}: an operator gave the id to \
                 another host (token create --replaces); enroll this host again"
            )))
        }
        Ok(Identity::Agent(id)) => Ok((id.clone(), peer)),
        Ok(other) => Err(Status::permission_denied(format!(
            "{other} may not open agent streams: an agent certificate is required"
        ))),
        Err(e) => Err(unauthenticated(e)),
    }
}

/// The caller's operator name; refuses everyone else.
pub fn operator<T>(request: &Request<T>) -> Result<String, Status> {
    let peer = peer(request)?;
    match &peer.identity {
        Ok(Identity::Operator(name)) => Ok(name.clone()),
        Ok(other) => Err(Status::permission_denied(format!(
            "{other} may not use the admin API: an operator certificate is required"
        ))),
        Err(e) => Err(unauthenticated(e)),
    }
}
