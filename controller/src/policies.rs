//! Stored policies: which policy each agent runs. A policy applies to all agents, to a label
//! selector, or to one agent; the most specific match wins (agent > more labels > fewer labels >
//! all). Ties are refused when a policy is set, so resolution is never ambiguous, whatever labels
//! agents get later.
//!
//! One task owns the policies and their version counter; every accepted change is persisted and
//! then handed to the registry, which pushes the new resolution to the affected agents.

use std::collections::BTreeMap;
use std::fmt;

use redb::TableDefinition;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tapgraph::policy::PolicySpec;
use tapgraph::proto;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::events::Events;
use crate::registry::Registry;
use crate::store::{Batch, Store, StoreError, Table};

const POLICIES: Table = TableDefinition::new("policies");
const META: Table = TableDefinition::new("policy_meta");

/// Name of the policy from configuration that applies when nothing else matches.
pub const DEFAULT_NAME: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selector {
    All,
    Labels(BTreeMap<String, String>),
    Agent(String),
}

impl Selector {
    /// Higher is more specific: (kind rank, number of labels).
    fn specificity(&self) -> (u8, usize) {
        match self {
            Selector::All => (0, 0),
            Selector::Labels(l) => (1, l.len()),
            Selector::Agent(_) => (2, 0),
        }
    }

    pub fn matches(&self, agent_id: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::All => true,
            Selector::Labels(sel) => tapgraph::labels::matches(sel, labels),
            Selector::Agent(id) => id == agent_id,
        }
    }

    /// Whether some agent could match both with equal specificity.
    fn ties_with(&self, other: &Selector) -> bool {
        match (self, other) {
            (Selector::All, Selector::All) => true,
            (Selector::Agent(a), Selector::Agent(b)) => a == b,
            (Selector::Labels(a), Selector::Labels(b)) => {
                a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_none_or(|w| w == v))
            }
            _ => false,
        }
    }

    pub fn to_proto(&self) -> proto::Selector {
        let kind = match self {
            Selector::All => proto::selector::Kind::All(true),
            Selector::Labels(l) => proto::selector::Kind::Labels(proto::Labels {
                labels: l.clone().into_iter().collect(),
            }),
            Selector::Agent(id) => proto::selector::Kind::AgentId(id.clone()),
        };
        proto::Selector { kind: Some(kind) }
    }

    pub fn from_proto(p: Option<&proto::Selector>) -> Result<Self, String> {
        match p.and_then(|s| s.kind.as_ref()) {
            None => Err("a selector is required: all agents, labels, or one agent".into()),
            Some(proto::selector::Kind::All(_)) => Ok(Selector::All),
            Some(proto::selector::Kind::AgentId(id)) => {
                tapgraph::identity::validate_name("agent", id).map_err(|e| e.to_string())?;
                Ok(Selector::Agent(id.clone()))
            }
            Some(proto::selector::Kind::Labels(l)) => {
                if l.labels.is_empty() {
                    return Err("a label selector needs at least one label".into());
                }
                for (k, v) in &l.labels {
                    tapgraph::labels::check(k, v)?;
                }
                Ok(Selector::Labels(l.labels.clone().into_iter().collect()))
            }
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => f.write_str("all agents"),
            Selector::Agent(id) => write!(f, "agent {id}"),
            Selector::Labels(l) => {
                let parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "labels {}", parts.join(","))
            }
        }
    }
}

/// A policy as stored: its name, selector, contents and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub name: String,
    pub selector: Selector,
    pub spec: StoredSpec,
    pub version: u64,
    pub updated_at_ms: u64,
}

/// The spec in its wire form (prost messages are not serde types; the proto is the stable form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSpec(#[serde(with = "proto_bytes")] pub proto::Policy);

mod proto_bytes {
    use prost::Message;
    use serde::{Deserialize, Deserializer, Serializer};
    use tapgraph::proto::Policy;

    pub fn serialize<S: Serializer>(p: &Policy, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&p.encode_to_vec())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Policy, D::Error> {
        let bytes: Vec<u8> = Deserialize::deserialize(d)?;
        Policy::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
    }
}

impl StoredPolicy {
    /// The message pushed to agents.
    pub fn message(&self) -> proto::Policy {
        let mut p = self.spec.0.clone();
        p.version = self.version;
        p.name = self.name.clone();
        p
    }

    pub fn to_proto(&self) -> proto::StoredPolicy {
        proto::StoredPolicy {
            name: self.name.clone(),
            selector: Some(self.selector.to_proto()),
            policy: Some(self.message()),
            updated_at_unix_nanos: self.updated_at_ms.saturating_mul(1_000_000),
        }
    }
}

/// The policy that applies to an agent: the most specific match, else `default`.
pub fn resolve<'a>(
    policies: &'a [StoredPolicy],
    default: &'a StoredPolicy,
    agent_id: &str,
    labels: &BTreeMap<String, String>,
) -> &'a StoredPolicy {
    policies
        .iter()
        .filter(|p| p.selector.matches(agent_id, labels))
        .max_by_key(|p| p.selector.specificity())
        .unwrap_or(default)
}

/// Refuses `candidate` if it could tie with another policy for some agent.
pub fn check_ties(
    policies: &[StoredPolicy],
    name: &str,
    selector: &Selector,
) -> Result<(), String> {
    match policies
        .iter()
        .find(|p| p.name != name && p.selector.ties_with(selector))
    {
        Some(other) => Err(format!(
            "policy {name} ({selector}) would tie with policy {} ({}) for an agent matching both; \
             make one more specific or delete one",
            other.name, other.selector
        )),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Meta {
    /// Last version handed out.
    counter: u64,
    /// Hash and version of the configured default policy, to bump its version when it changes.
    default_hash: String,
    default_version: u64,
}

fn now_ms() -> u64 {
    tapgraph::time::unix_nanos() / 1_000_000
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("no policy named {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<PolicyStoreError> for Status {
    fn from(e: PolicyStoreError) -> Status {
        match e {
            PolicyStoreError::Invalid(m) => Status::invalid_argument(m),
            PolicyStoreError::NotFound(_) => Status::not_found(e.to_string()),
            PolicyStoreError::Store(_) => Status::unavailable(e.to_string()),
        }
    }
}

enum Command {
    Set {
        name: String,
        selector: Selector,
        spec: Box<proto::Policy>,
        reply: oneshot::Sender<Result<StoredPolicy, PolicyStoreError>>,
    },
    Delete {
        name: String,
        reply: oneshot::Sender<Result<(), PolicyStoreError>>,
    },
    List {
        reply: oneshot::Sender<Vec<StoredPolicy>>,
    },
}

/// A handle to the policy task.
#[derive(Clone)]
pub struct Policies {
    tx: mpsc::Sender<Command>,
}

/// Validates a policy name: it is shown in tables and used as a key.
pub fn check_name(name: &str) -> Result<(), String> {
    if name == DEFAULT_NAME {
        return Err(format!(
            "`{DEFAULT_NAME}` is the policy from the controller's configuration; choose another name"
        ));
    }
    tapgraph::identity::validate_name("policy", name).map_err(|e| e.to_string())
}

impl Policies {
    /// Loads the stored policies, versions the configured default, hands both to the registry and
    /// starts the task.
    pub async fn spawn(
        store: Store,
        default: &PolicySpec,
        registry: Registry,
        events: Events,
    ) -> Result<(Self, impl std::future::Future<Output = ()> + use<>), StoreError> {
        let mut policies: Vec<StoredPolicy> = store.load(POLICIES)?;
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let mut meta = store.load::<Meta>(META)?.pop().unwrap_or_default();
        let default_msg = default.to_proto(0, DEFAULT_NAME);
        let hash: String = Sha256::digest(prost::Message::encode_to_vec(&default_msg))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if meta.default_hash != hash {
            meta.counter += 1;
            meta.default_version = meta.counter;
            meta.default_hash = hash;
            store.put(META, "meta", &meta)?;
        }
        let default = StoredPolicy {
            name: DEFAULT_NAME.into(),
            selector: Selector::All,
            spec: StoredSpec(default_msg),
            version: meta.default_version,
            updated_at_ms: 0,
        };
        registry
            .set_policies(policies.clone(), default.clone())
            .await;
        let (tx, rx) = mpsc::channel(64);
        let task = Task {
            store,
            policies,
            default,
            meta,
            registry,
            events,
        };
        Ok((Self { tx }, task.run(rx)))
    }

    pub async fn set(
        &self,
        name: String,
        selector: Selector,
        spec: proto::Policy,
    ) -> Result<StoredPolicy, PolicyStoreError> {
        let (reply, rx) = oneshot::channel();
        let gone = || PolicyStoreError::Store(StoreError::closed());
        self.tx
            .send(Command::Set {
                name,
                selector,
                spec: Box::new(spec),
                reply,
            })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn delete(&self, name: String) -> Result<(), PolicyStoreError> {
        let (reply, rx) = oneshot::channel();
        let gone = || PolicyStoreError::Store(StoreError::closed());
        self.tx
            .send(Command::Delete { name, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn list(&self) -> Vec<StoredPolicy> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::List { reply }).await;
        rx.await.unwrap_or_default()
    }
}

struct Task {
    store: Store,
    policies: Vec<StoredPolicy>,
    default: StoredPolicy,
    meta: Meta,
    registry: Registry,
    events: Events,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            let changed = match cmd {
                Command::Set {
                    name,
                    selector,
                    spec,
                    reply,
                } => {
                    let result = self.set(name, selector, *spec);
                    let ok = result.is_ok();
                    let _ = reply.send(result);
                    ok
                }
                Command::Delete { name, reply } => {
                    let result = self.delete(&name);
                    let ok = result.is_ok();
                    let _ = reply.send(result);
                    ok
                }
                Command::List { reply } => {
                    let mut all = self.policies.clone();
                    all.push(self.default.clone());
                    let _ = reply.send(all);
                    false
                }
            };
            if changed {
                self.registry
                    .set_policies(self.policies.clone(), self.default.clone())
                    .await;
            }
        }
    }

    fn set(
        &mut self,
        name: String,
        selector: Selector,
        spec: proto::Policy,
    ) -> Result<StoredPolicy, PolicyStoreError> {
        check_name(&name).map_err(PolicyStoreError::Invalid)?;
        // Everything is validated before anything changes: bounds, and the BPF filter compiled
        // with libpcap.
        let parsed =
            PolicySpec::from_proto(&spec).map_err(|e| PolicyStoreError::Invalid(e.to_string()))?;
        parsed
            .validate(true)
            .map_err(|e| PolicyStoreError::Invalid(e.to_string()))?;
        check_ties(&self.policies, &name, &selector).map_err(PolicyStoreError::Invalid)?;
        let mut meta = self.meta.clone();
        meta.counter += 1;
        let stored = StoredPolicy {
            name: name.clone(),
            selector,
            spec: StoredSpec(parsed.to_proto(0, &name)),
            version: meta.counter,
            updated_at_ms: now_ms(),
        };
        let mut batch = Batch::default();
        batch.put(POLICIES, &name, &stored)?;
        batch.put(META, "meta", &meta)?;
        self.store.commit(batch)?;
        self.meta = meta;
        self.policies.retain(|p| p.name != name);
        self.policies.push(stored.clone());
        self.policies.sort_by(|a, b| a.name.cmp(&b.name));
        self.events.emit(
            "policy_set",
            "",
            format!(
                "policy {name} v{} set for {}",
                stored.version, stored.selector
            ),
        );
        Ok(stored)
    }

    fn delete(&mut self, name: &str) -> Result<(), PolicyStoreError> {
        if !self.policies.iter().any(|p| p.name == name) {
            return Err(PolicyStoreError::NotFound(name.to_string()));
        }
        let mut batch = Batch::default();
        batch.delete(POLICIES, name);
        self.store.commit(batch)?;
        self.policies.retain(|p| p.name != name);
        self.events
            .emit("policy_deleted", "", format!("policy {name} deleted"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn policy(name: &str, selector: Selector) -> StoredPolicy {
        StoredPolicy {
            name: name.into(),
            selector,
            spec: StoredSpec(PolicySpec::default().to_proto(0, name)),
            version: 1,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn the_most_specific_policy_wins() {
        let default = policy("default", Selector::All);
        let ps = vec![
            policy("fleet", Selector::All),
            policy("web", Selector::Labels(labels(&[("role", "web")]))),
            policy(
                "web-prod",
                Selector::Labels(labels(&[("role", "web"), ("env", "prod")])),
            ),
            policy("pinned", Selector::Agent("a7".into())),
        ];
        let pick =
            |id: &str, l: &[(&str, &str)]| resolve(&ps, &default, id, &labels(l)).name.clone();
        assert_eq!(pick("a1", &[]), "fleet");
        assert_eq!(pick("a1", &[("role", "web")]), "web");
        assert_eq!(pick("a1", &[("role", "web"), ("env", "prod")]), "web-prod");
        assert_eq!(pick("a7", &[("role", "web"), ("env", "prod")]), "pinned");
        assert_eq!(
            resolve(&ps[1..2], &default, "a1", &labels(&[])).name,
            "default"
        );
    }

    #[test]
    fn ties_are_refused_at_set_time() {
        let ps = vec![
            policy("fleet", Selector::All),
            policy("web", Selector::Labels(labels(&[("role", "web")]))),
            policy("pinned", Selector::Agent("a7".into())),
        ];
        let tie = |name: &str, s: Selector| check_ties(&ps, name, &s).is_err();
        assert!(tie("fleet2", Selector::All));
        assert!(
            tie("prod", Selector::Labels(labels(&[("env", "prod")]))),
            "role=web,env=prod matches both"
        );
        assert!(tie("pinned2", Selector::Agent("a7".into())));
        assert!(
            !tie("db", Selector::Labels(labels(&[("role", "db")]))),
            "disjoint"
        );
        assert!(!tie(
            "web-prod",
            Selector::Labels(labels(&[("role", "web"), ("env", "prod")]))
        ));
        assert!(
            !tie("web", Selector::Labels(labels(&[("env", "prod")]))),
            "replacing itself"
        );
        let e = check_ties(&ps, "prod", &Selector::Labels(labels(&[("env", "prod")]))).unwrap_err();
        assert!(
            e.contains("would tie with policy web (labels role=web)"),
            "{e}"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("web").is_ok());
        assert!(check_name("default").is_err());
        assert!(check_name("bad name").is_err());
    }
}
