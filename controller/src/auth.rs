//! Who may call what. The TLS layer has verified any certificate presented; here each RPC checks
//! that the caller holds the right kind of identity, and that an agent is not revoked and its
//! certificate's key still holds the id. The enrollment task keeps the [`Revocations`] those
//! checks read.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use tapgraph::identity::{Identity, IdentityError};
use tapgraph::transport::PeerInfo;
use tokio::sync::watch;
use tonic::{Request, Status};

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

/// The revoked agent ids, and the keys each id's certificates may hold: what every agent RPC is
/// checked against, readable without asking the enrollment task (their only writer);
/// `changed()` fires on every revocation.
#[derive(Clone)]
pub struct Revocations {
    set: Arc<RwLock<HashSet<String>>>,
    /// Per agent id, the keys (current, previous) its certificates were issued for. After an
    /// operator's `--replaces`, the replaced host's certificate holds neither and is refused.
    keys: Arc<RwLock<HashMap<String, (String, String)>>>,
    tx: Arc<watch::Sender<()>>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            set: Arc::default(),
            keys: Arc::default(),
            tx: Arc::new(watch::channel(()).0),
        }
    }
}

impl Revocations {
    /// Whether a certificate of agent `id` with public key `key_sha256` may act as that agent:
    /// it holds one of the id's recorded keys. An id enrolled before keys were recorded (or issued
    /// by hand) has none, and then any certificate for it is accepted, as before.
    pub fn key_is_current(&self, id: &str, key_sha256: Option<&str>) -> bool {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        match keys.get(id) {
            None => true,
            Some((current, previous)) => {
                key_sha256.is_some_and(|k| !k.is_empty() && (k == current || k == previous))
            }
        }
    }

    /// Records that the certificates of agent `id` are issued for the keys `current` and
    /// `previous`; an empty `current` forgets the id's keys (then any certificate for it is
    /// accepted).
    pub fn remember_keys(&self, id: &str, current: &str, previous: &str) {
        // A poisoned lock only means a writer panicked mid-insert; the map is still usable.
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if current.is_empty() {
            keys.remove(id);
        } else {
            keys.insert(id.to_string(), (current.to_string(), previous.to_string()));
        }
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        // A poisoned lock only means a writer panicked mid-insert; the set is still usable.
        self.set
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    pub fn changed(&self) -> watch::Receiver<()> {
        self.tx.subscribe()
    }

    pub fn revoke(&self, id: &str) {
        self.set
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
        // Wakes every watcher, even with nothing new to read.
        self.tx.send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_acts_as_its_agent_only_with_a_recorded_key() {
        let r = Revocations::default();
        // An id without recorded keys (issued by hand, or enrolled before keys were kept).
        assert!(r.key_is_current("web", None));
        assert!(r.key_is_current("web", Some("any")));
        r.remember_keys("web", "k1", "k0");
        assert!(r.key_is_current("web", Some("k1")));
        assert!(r.key_is_current("web", Some("k0")));
        assert!(!r.key_is_current("web", Some("k2")));
        assert!(!r.key_is_current("web", None));
        assert!(
            r.key_is_current("db", Some("k2")),
            "another id is not affected"
        );
        // A first certificate has no previous key: an empty key does not match it.
        r.remember_keys("web", "k1", "");
        assert!(!r.key_is_current("web", Some("")));
        assert!(!r.key_is_current("web", Some("k0")));
        // No current key forgets the id's keys.
        r.remember_keys("web", "", "k1");
        assert!(r.key_is_current("web", Some("k2")));
    }

    #[test]
    fn a_revocation_is_seen_by_every_clone_and_wakes_watchers() {
        let r = Revocations::default();
        let seen = r.clone();
        let changed = seen.changed();
        assert!(!seen.is_revoked("web"));
        assert!(!changed.has_changed().unwrap());
        r.revoke("web");
        assert!(seen.is_revoked("web"));
        assert!(!seen.is_revoked("db"));
        assert!(changed.has_changed().unwrap());
    }
}
