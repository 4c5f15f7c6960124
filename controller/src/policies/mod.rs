//! Stored policies: which policy each agent runs. A policy applies to all agents, to a label
//! selector, or to one agent; the most specific match wins (agent > more labels > fewer labels >
//! all). Ties are refused when a policy is set, so resolution is never ambiguous, whatever labels
//! agents get later.
//!
//! One task owns the policies and their version counter; every accepted change is persisted and
//! then handed to the registry, which pushes the new resolution to the affected agents. The pure rules (selectors,
//! `resolve`, ties) are in [`crate::policy_rules`], which the registry uses too.

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

pub use crate::policy_rules::{DEFAULT_NAME, Selector, StoredPolicy};
use crate::policy_rules::{StoredSpec, check_name, check_ties};

const POLICIES: Table = TableDefinition::new("policies");
const META: Table = TableDefinition::new("policy_meta");

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

/// A handle to the policy task; cheap to clone. A change it accepts was validated (bounds, the
/// filter compiled, no tie, a free name), given the next version and persisted before the answer,
/// and the registry has the new set before the task takes its next command. A refused change
/// leaves everything as it was, the version counter included.
#[derive(Clone)]
pub struct Policies {
    tx: mpsc::Sender<Command>,
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
    /// One command at a time; an accepted change is handed to the registry before the next.
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            let changed = match cmd {
                Command::Set {
                    name,
                    selector,
                    spec,
                    reply,
                } => answer(reply, self.set(name, selector, *spec)),
                Command::Delete { name, reply } => answer(reply, self.delete(&name)),
                Command::List { reply } => {
                    let _ = reply.send(self.list());
                    false
                }
            };
            if changed {
                self.publish().await;
            }
        }
    }

    /// Hands the registry every policy now in force.
    async fn publish(&self) {
        self.registry
            .set_policies(self.policies.clone(), self.default.clone())
            .await;
    }

    /// The stored policies by name, then the configured default.
    fn list(&self) -> Vec<StoredPolicy> {
        let mut all = self.policies.clone();
        all.push(self.default.clone());
        all
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

/// Replies with `result`; whether it was a success (a change to hand on).
fn answer<T>(
    reply: oneshot::Sender<Result<T, PolicyStoreError>>,
    result: Result<T, PolicyStoreError>,
) -> bool {
    let ok = result.is_ok();
    let _ = reply.send(result);
    ok
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use tokio::task::JoinHandle;

    use super::*;
    use crate::health::Health;

    fn web() -> Selector {
        Selector::Labels(BTreeMap::from([("role".to_string(), "web".to_string())]))
    }

    fn spec(heartbeat_ms: u64) -> proto::Policy {
        let spec = PolicySpec {
            heartbeat_interval: Duration::from_millis(heartbeat_ms),
            ..PolicySpec::default()
        };
        spec.to_proto(0, "")
    }

    /// A controller's policy task over the store at `path`, and the registry it hands policies to.
    struct Controller {
        policies: Policies,
        registry: Registry,
        task: JoinHandle<()>,
    }

    impl Controller {
        async fn start(path: &Path, default: &PolicySpec) -> Self {
            let (registry, registry_task) =
                Registry::spawn("test", Events::new(16), Health::default(), 10);
            tokio::spawn(registry_task);
            let store = Store::open(path).unwrap();
            let (policies, task) =
                Policies::spawn(store, default, registry.clone(), Events::new(16))
                    .await
                    .unwrap();
            let task = tokio::spawn(task);
            Self {
                policies,
                registry,
                task,
            }
        }

        /// Stops the task; the store is closed once it returns.
        async fn stop(self) {
            drop(self.policies);
            self.task.await.unwrap();
        }

        /// (name, version) of every policy listed, the default last.
        async fn listed(&self) -> Vec<(String, u64)> {
            let all = self.policies.list().await;
            all.into_iter().map(|p| (p.name, p.version)).collect()
        }

        /// (name, version) of the policy the registry resolves for a new agent with `labels`.
        async fn resolved_for(&self, id: &str, labels: &[(&str, &str)]) -> (String, u64) {
            // A change is answered, then handed to the registry before the next command: once
            // this is answered, the registry has every change before it.
            self.policies.list().await;
            let (tx, _rx) = mpsc::channel(16);
            let labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let remote = "192.0.2.1:1".parse().unwrap();
            self.registry
                .register(id.into(), Default::default(), labels, remote, tx)
                .await
                .unwrap();
            let status = self.registry.policy_status(None).await;
            let s = status.iter().find(|s| s.agent_id == id).unwrap();
            (s.policy_name.clone(), s.version_wanted)
        }
    }

    fn state() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        (dir, path)
    }

    fn named(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn policies_are_set_replaced_and_deleted_each_with_a_new_version() {
        let (_dir, path) = state();
        let c = Controller::start(&path, &PolicySpec::default()).await;
        assert_eq!(c.listed().await, named(&[("default", 1)]));
        let web_v2 = c
            .policies
            .set("web".into(), web(), spec(1_000))
            .await
            .unwrap();
        assert_eq!((web_v2.version, &web_v2.selector), (2, &web()));
        assert_eq!(web_v2.spec.0.heartbeat_interval_ms, 1_000);
        c.policies
            .set("alpha".into(), Selector::Agent("a7".into()), spec(1_000))
            .await
            .unwrap();
        assert_eq!(
            c.listed().await,
            named(&[("alpha", 3), ("web", 2), ("default", 1)])
        );
        let replaced = c
            .policies
            .set("web".into(), web(), spec(2_000))
            .await
            .unwrap();
        assert_eq!(replaced.version, 4);
        assert_eq!(replaced.spec.0.heartbeat_interval_ms, 2_000);
        assert_eq!(
            c.listed().await,
            named(&[("alpha", 3), ("web", 4), ("default", 1)])
        );
        c.policies.delete("web".into()).await.unwrap();
        assert_eq!(c.listed().await, named(&[("alpha", 3), ("default", 1)]));
        let again = c.policies.delete("web".into()).await.unwrap_err();
        assert!(
            matches!(again, PolicyStoreError::NotFound(ref n) if n == "web"),
            "{again}"
        );
        let web_again = c
            .policies
            .set("web".into(), web(), spec(1_000))
            .await
            .unwrap();
        assert_eq!(web_again.version, 5, "a version is never handed out twice");
        c.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_registry_gets_every_accepted_change() {
        let (_dir, path) = state();
        let c = Controller::start(&path, &PolicySpec::default()).await;
        assert_eq!(
            c.resolved_for("a1", &[("role", "web")]).await,
            ("default".into(), 1)
        );
        c.policies
            .set("web".into(), web(), spec(1_000))
            .await
            .unwrap();
        assert_eq!(
            c.resolved_for("a2", &[("role", "web")]).await,
            ("web".into(), 2)
        );
        assert_eq!(c.resolved_for("a3", &[]).await, ("default".into(), 1));
        c.policies.delete("web".into()).await.unwrap();
        assert_eq!(
            c.resolved_for("a4", &[("role", "web")]).await,
            ("default".into(), 1)
        );
        c.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_policy_is_refused_and_the_previous_one_stays_in_force() {
        let (_dir, path) = state();
        let c = Controller::start(&path, &PolicySpec::default()).await;
        c.policies
            .set("web".into(), web(), spec(1_000))
            .await
            .unwrap();
        let mut bad = spec(3_000);
        bad.capture.as_mut().unwrap().snaplen = 0;
        let refused = [
            c.policies.set("web".into(), web(), bad).await,
            c.policies.set("web".into(), web(), spec(0)).await,
            c.policies.set("default".into(), web(), spec(3_000)).await,
            c.policies.set("bad name".into(), web(), spec(3_000)).await,
            c.policies.set("web2".into(), web(), spec(3_000)).await,
        ];
        for (n, r) in refused.into_iter().enumerate() {
            let e = r.unwrap_err();
            assert!(matches!(e, PolicyStoreError::Invalid(_)), "{n}: {e}");
        }
        assert_eq!(c.listed().await, named(&[("web", 2), ("default", 1)]));
        let web = c.policies.list().await.remove(0);
        assert_eq!(web.spec.0.heartbeat_interval_ms, 1_000);
        assert_eq!(
            c.resolved_for("a1", &[("role", "web")]).await,
            ("web".into(), 2)
        );
        // Nothing refused was stored, and no version was spent on it.
        c.stop().await;
        let c = Controller::start(&path, &PolicySpec::default()).await;
        assert_eq!(c.listed().await, named(&[("web", 2), ("default", 1)]));
        let next = c
            .policies
            .set("db".into(), Selector::Agent("a9".into()), spec(1_000));
        assert_eq!(next.await.unwrap().version, 3);
        c.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn policies_and_the_version_counter_survive_a_restart() {
        let (_dir, path) = state();
        let c = Controller::start(&path, &PolicySpec::default()).await;
        let web_v2 = c
            .policies
            .set("web".into(), web(), spec(1_000))
            .await
            .unwrap();
        c.policies
            .set("gone".into(), Selector::All, spec(1_000))
            .await
            .unwrap();
        c.policies.delete("gone".into()).await.unwrap();
        let before = c.policies.list().await;
        c.stop().await;

        let c = Controller::start(&path, &PolicySpec::default()).await;
        assert_eq!(
            c.policies.list().await,
            before,
            "as stored, the default unchanged"
        );
        assert_eq!(c.policies.list().await[0], web_v2);
        assert_eq!(
            c.resolved_for("a1", &[("role", "web")]).await,
            ("web".into(), 2)
        );
        let next = c
            .policies
            .set("db".into(), Selector::Agent("a9".into()), spec(1_000));
        assert_eq!(
            next.await.unwrap().version,
            4,
            "after the deleted policy's 3"
        );
        c.stop().await;

        // A changed default in the configuration gets the next version.
        let changed = PolicySpec {
            heartbeat_interval: Duration::from_secs(2),
            ..PolicySpec::default()
        };
        let c = Controller::start(&path, &changed).await;
        let listed = c.listed().await;
        assert_eq!(listed.last(), Some(&("default".to_string(), 5)));
        c.stop().await;
        let c = Controller::start(&path, &changed).await;
        assert_eq!(c.listed().await.last(), Some(&("default".to_string(), 5)));
        let next = c
            .policies
            .set("x".into(), Selector::Agent("a8".into()), spec(1_000));
        assert_eq!(next.await.unwrap().version, 6);
        c.stop().await;
    }

    #[test]
    fn refusals_map_to_grpc_codes() {
        let code = |e: PolicyStoreError| Status::from(e).code();
        assert_eq!(
            code(PolicyStoreError::Invalid("x".into())),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(PolicyStoreError::NotFound("x".into())),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(PolicyStoreError::Store(StoreError::closed())),
            tonic::Code::Unavailable
        );
        let s = Status::from(PolicyStoreError::NotFound("web".into()));
        assert_eq!(s.message(), "no policy named web");
        let s = Status::from(PolicyStoreError::Invalid("too big".into()));
        assert_eq!(s.message(), "too big");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_task_answers_unavailable() {
        let (_dir, path) = state();
        let c = Controller::start(&path, &PolicySpec::default()).await;
        c.task.abort();
        let _ = c.task.await;
        let e = c
            .policies
            .set("web".into(), web(), spec(1_000))
            .await
            .unwrap_err();
        assert!(matches!(e, PolicyStoreError::Store(_)), "{e}");
        assert!(c.policies.delete("web".into()).await.is_err());
        assert!(c.policies.list().await.is_empty());
    }
}
