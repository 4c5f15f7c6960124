//! The enrolled agents' records, as the enrollment task keeps them: each id's keys, labels and
//! revocation. A record is written to the store before the task answers, and what every agent
//! RPC checks (revoked or not, the keys that hold the id) is published to [`Revocations`].

use std::collections::BTreeMap;

use redb::TableHandle;
use serde::{Deserialize, Serialize};

use super::{AGENTS, EnrollError, Task, now_ms, revoked_status};
use crate::auth::Revocations;
use crate::store::{Batch, StoreError};

/// An agent this controller issued a certificate to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledAgent {
    pub id: String,
    pub hostname: String,
    pub machine_id: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled_at_ms: u64,
    pub token_id: String,
    pub cert_serial: String,
    pub cert_not_after_ms: u64,
    pub revoked_at_ms: Option<u64>,
    /// SHA-256 of the public key of the certificate issued last, and of the one issued before it
    /// (a renewal whose certificate the agent may never have installed). A host enrolling again
    /// keeps this id only with a CSR signed by one of them. Empty for records made before keys
    /// were recorded: the next renewal fills them in.
    #[serde(default)]
    pub key_sha256: String,
    #[serde(default)]
    pub previous_key_sha256: String,
}

impl EnrolledAgent {
    /// Whether the key `key_sha256` was issued a certificate for this id.
    pub(super) fn holds(&self, key_sha256: &str) -> bool {
        !key_sha256.is_empty()
            && (self.key_sha256 == key_sha256 || self.previous_key_sha256 == key_sha256)
    }

    /// Records that the certificate issued now is for `key_sha256`.
    pub(super) fn rotate_key(&mut self, key_sha256: String) {
        if self.key_sha256 != key_sha256 {
            self.previous_key_sha256 = std::mem::replace(&mut self.key_sha256, key_sha256);
        }
    }
}

/// What `agents` say every agent RPC must check: the revoked ids and each id's keys.
pub(super) fn revocations<'a>(agents: impl IntoIterator<Item = &'a EnrolledAgent>) -> Revocations {
    let revocations = Revocations::default();
    for agent in agents {
        if agent.revoked_at_ms.is_some() {
            revocations.revoke(&agent.id);
        }
        revocations.remember_keys(&agent.id, &agent.key_sha256, &agent.previous_key_sha256);
    }
    revocations
}

impl Task {
    /// The stored record of agent `id`: as this replica knows it, or as the store has it when this
    /// replica has not heard of it yet (enrolled through another replica a moment ago).
    pub(super) async fn agent(&mut self, id: &str) -> Result<Option<EnrolledAgent>, StoreError> {
        if !self.agents.contains_key(id) {
            self.reread(AGENTS.name(), id).await?;
        }
        Ok(self.agents.get(id).cloned())
    }

    /// The record of agent `id`; one is made for an agent that holds a certificate from this CA
    /// without having enrolled (issued by hand), as long as it has connected.
    pub(super) async fn record(&mut self, id: &str) -> Result<EnrolledAgent, EnrollError> {
        match self.agent(id).await? {
            Some(a) => Ok(a),
            None if self.registry.list().await.iter().any(|a| a.id == id) => Ok(EnrolledAgent {
                id: id.to_string(),
                hostname: String::new(),
                machine_id: String::new(),
                labels: BTreeMap::new(),
                enrolled_at_ms: 0,
                token_id: String::new(),
                cert_serial: String::new(),
                cert_not_after_ms: 0,
                revoked_at_ms: None,
                key_sha256: String::new(),
                previous_key_sha256: String::new(),
            }),
            None => Err(EnrollError::NotFound(id.to_string())),
        }
    }

    /// Writes `agent` as the record of its id if the stored one is still the one this replica
    /// holds (none, for a record made by [`Task::record`]), and then holds it.
    fn replace_agent(&mut self, agent: EnrolledAgent) -> Result<(), EnrollError> {
        let mut batch = Batch::default();
        batch.expect(AGENTS, &agent.id, self.agents.get(&agent.id))?;
        batch.put(AGENTS, &agent.id, &agent)?;
        self.store.commit(batch)?;
        self.agents.insert(agent.id.clone(), agent);
        Ok(())
    }

    pub(super) async fn set_labels(
        &mut self,
        id: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<BTreeMap<String, String>, EnrollError> {
        let mut attempt = 0;
        let labels = loop {
            attempt += 1;
            let mut agent = self.record(id).await?;
            for key in &remove {
                agent.labels.remove(key);
            }
            agent.labels.extend(set.clone());
            let labels = agent.labels.clone();
            let error = match self.replace_agent(agent) {
                Ok(()) => break labels,
                Err(error) => error,
            };
            if !self.retry(&error, attempt).await? {
                return Err(error);
            }
        };
        tracing::info!(agent = %id, labels = ?labels, "agent labels changed");
        Ok(labels)
    }

    pub(super) async fn revoke_agent(&mut self, id: &str) -> Result<(), EnrollError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let agent = self.record(id).await?;
            let revoked = EnrolledAgent {
                revoked_at_ms: Some(agent.revoked_at_ms.unwrap_or_else(now_ms)),
                ..agent
            };
            let error = match self.replace_agent(revoked) {
                Ok(()) => break,
                Err(error) => error,
            };
            if !self.retry(&error, attempt).await? {
                return Err(error);
            }
        }
        self.revocations.revoke(id);
        self.registry.close_agent(id, revoked_status(id)).await;
        tracing::info!(agent = %id, "agent revoked; its streams are closed and its certificate refused");
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::super::{EnrollRequest, Enrollment, limits::EnrollLimits};
    use super::*;
    use crate::events::Events;
    use crate::health::Health;
    use crate::registry::Registry;
    use crate::store::Store;

    pub(in crate::enrollment) fn record(
        id: &str,
        key: &str,
        previous: &str,
        revoked: bool,
    ) -> EnrolledAgent {
        EnrolledAgent {
            id: id.into(),
            hostname: id.into(),
            machine_id: String::new(),
            labels: BTreeMap::new(),
            enrolled_at_ms: 1,
            token_id: "t".into(),
            cert_serial: "1".into(),
            cert_not_after_ms: 2,
            revoked_at_ms: revoked.then_some(3),
            key_sha256: key.into(),
            previous_key_sha256: previous.into(),
        }
    }

    #[test]
    fn a_new_certificate_keeps_the_key_before_it_as_the_previous_one() {
        let mut agent = record("web", "k1", "k0", false);
        agent.rotate_key("k2".into());
        assert_eq!(
            (
                agent.key_sha256.as_str(),
                agent.previous_key_sha256.as_str()
            ),
            ("k2", "k1")
        );
        assert!(agent.holds("k2") && agent.holds("k1") && !agent.holds("k0"));
        // Renewed for the same key: the previous one is kept, not overwritten by it.
        agent.rotate_key("k2".into());
        assert_eq!(
            (
                agent.key_sha256.as_str(),
                agent.previous_key_sha256.as_str()
            ),
            ("k2", "k1")
        );
        assert!(!record("web", "", "", false).holds(""));
    }

    #[test]
    fn the_stored_records_say_what_every_agent_rpc_checks() {
        let agents = [
            record("web", "k1", "k0", false),
            record("db", "k5", "", true),
            record("old", "", "", false),
        ];
        let r = revocations(agents.iter());
        assert!(!r.is_revoked("web") && r.is_revoked("db") && !r.is_revoked("old"));
        assert!(r.key_is_current("web", Some("k0")));
        assert!(!r.key_is_current("web", Some("k9")));
        assert!(!r.key_is_current("db", Some("k9")));
        // A record without keys accepts any certificate for its id, as before keys were kept.
        assert!(r.key_is_current("old", Some("k9")));
    }

    /// Revoking writes the record (so a restart, which builds [`revocations`] from the store,
    /// still refuses the agent) as well as the shared set.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_is_stored_for_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("controller.redb")).unwrap();
        let events = Events::new(16);
        let (registry, registry_task) =
            Registry::spawn("test", events.clone(), Health::default(), 10);
        tokio::spawn(registry_task);
        let ca =
            tapgraph::pki::CertAuthority::generate("test CA", Duration::from_secs(3600)).unwrap();
        let (enrollment, task) = Enrollment::spawn(
            store.clone(),
            ca,
            Duration::from_secs(3600),
            registry,
            events,
            EnrollLimits::new(100.0, 100),
        )
        .unwrap();
        tokio::spawn(task);
        let token = enrollment
            .create_token(
                Duration::from_secs(60),
                1,
                BTreeMap::new(),
                String::new(),
                None,
            )
            .await
            .unwrap();
        let (_key, csr_pem) = tapgraph::pki::new_key_and_csr("web").unwrap();
        let enrolled = enrollment
            .enroll(EnrollRequest {
                peer: "127.0.0.1:1".parse().unwrap(),
                token: token.text,
                csr_pem,
                hostname: "web".into(),
                machine_id: String::new(),
                requested_id: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(enrolled.agent_id, "web");
        assert!(!enrollment.revocations().is_revoked("web"));
        enrollment.revoke_agent("web".into()).await.unwrap();
        assert!(enrollment.revocations().is_revoked("web"));
        let stored: Vec<EnrolledAgent> = store.load(AGENTS).unwrap();
        assert_eq!(stored.len(), 1);
        assert!(stored[0].revoked_at_ms.is_some(), "{:?}", stored[0]);
        assert!(revocations(stored.iter()).is_revoked("web"));
    }
}
