//! Stored policies: which policy each agent runs. A policy applies to all agents, to a label
//! selector, or to one agent; the most specific match wins (agent > more labels > fewer labels >
//! all). Ties are refused when a policy is set, so resolution is never ambiguous, whatever labels
//! agents get later.
//!
//! One task per replica owns the policies; every accepted change is persisted and then handed to
//! the registry, which pushes the new resolution to the affected agents. The store is shared by
//! the replicas: the task hears the changes others make, reads them again and hands them to its
//! registry the same way, so a policy set through any replica reaches the agents of every one.
//! The version counter is taken with a precondition (read, increment, write if unchanged, else
//! again), so no two replicas ever hand out one version. The pure rules (selectors, `resolve`,
//! ties) are in [`crate::policy_rules`], which the registry uses too.

use redb::{TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tapgraph::policy::PolicySpec;
use tapgraph::proto;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::events::Events;
use crate::registry::Registry;
use crate::store::{Batch, Change, Store, StoreError, Table};

pub use crate::policy_rules::{DEFAULT_NAME, Selector, StoredPolicy};
use crate::policy_rules::{StoredSpec, check_name, check_ties};

const POLICIES: Table = TableDefinition::new("policies");
const META: Table = TableDefinition::new("policy_meta");
/// The one row of [`META`].
const META_KEY: &str = "meta";
/// Attempts at a change whose precondition another replica keeps changing first.
const ATTEMPTS: u32 = 16;

/// Before attempt `n` (from 1) again: a random pause of up to 2^n ms (at most 128), so replicas
/// racing in step fall out of step.
async fn pause_before(n: u32) {
    let most = 1u64 << n.min(7);
    tokio::time::sleep(std::time::Duration::from_millis(
        rand::random::<u64>() % most + 1,
    ))
    .await;
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
            PolicyStoreError::Store(StoreError::Conflict { .. }) => {
                Status::aborted(format!("{e}; try again"))
            }
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
    /// starts the task, which follows the other replicas' changes from then on.
    pub async fn spawn(
        store: Store,
        default: &PolicySpec,
        registry: Registry,
        events: Events,
    ) -> Result<(Self, impl std::future::Future<Output = ()> + use<>), StoreError> {
        // Subscribed before the first read: a change another replica makes meanwhile is heard.
        let changes = store.changes();
        let policies = load(&store)?;
        let default_msg = default.to_proto(0, DEFAULT_NAME);
        let default_hash: String = Sha256::digest(prost::Message::encode_to_vec(&default_msg))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let default_version = version_default(&store, &default_hash).await?;
        let default = StoredPolicy {
            name: DEFAULT_NAME.into(),
            selector: Selector::All,
            spec: StoredSpec(default_msg),
            version: default_version,
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
            default_hash,
            registry,
            events,
        };
        Ok((Self { tx }, task.run(rx, changes)))
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

/// The stored policies, by name.
fn load(store: &Store) -> Result<Vec<StoredPolicy>, StoreError> {
    let mut policies: Vec<StoredPolicy> = store.load(POLICIES)?;
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(policies)
}

/// The version of the configured default policy whose hash is `hash`: the stored one while the
/// hash is unchanged, else the next of the counter. Replicas starting at once with one new
/// default take one version between them: the one that loses the race reads the winner's.
async fn version_default(store: &Store, hash: &str) -> Result<u64, StoreError> {
    let mut last = None;
    for n in 0..ATTEMPTS {
        if n > 0 {
            pause_before(n).await;
        }
        let (stored, mut meta) = read_meta(store)?;
        if meta.default_hash == hash {
            return Ok(meta.default_version);
        }
        meta.counter += 1;
        meta.default_version = meta.counter;
        meta.default_hash = hash.to_string();
        let mut batch = Batch::default();
        batch.expect(META, META_KEY, stored.as_ref())?;
        batch.put(META, META_KEY, &meta)?;
        match store.commit(batch) {
            Ok(()) => return Ok(meta.default_version),
            Err(e) if e.is_conflict() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| conflict(META_KEY)))
}

/// The counter's row as stored (what a change expects to find unchanged: the stored form, so a
/// field this version does not know is no reason for a conflict), and as read.
fn read_meta(store: &Store) -> Result<(Option<serde_json::Value>, Meta), StoreError> {
    let stored: Option<serde_json::Value> = store.get(META, META_KEY)?;
    let meta = match &stored {
        Some(value) => serde_json::from_value(value.clone())
            .map_err(|e| StoreError::Failed(format!("{}/{META_KEY}: {e}", META.name())))?,
        None => Meta::default(),
    };
    Ok((stored, meta))
}

fn conflict(key: &str) -> StoreError {
    StoreError::Conflict {
        table: META.name().to_string(),
        key: key.to_string(),
    }
}

struct Task {
    store: Store,
    /// The stored policies, by name.
    policies: Vec<StoredPolicy>,
    default: StoredPolicy,
    /// The hash of this replica's configured default (its version is shared through the store).
    default_hash: String,
    registry: Registry,
    events: Events,
}

impl Task {
    /// One command or one change of another replica at a time; an accepted change is handed to
    /// the registry before the next.
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut changes: broadcast::Receiver<Change>,
    ) {
        let mut following = true;
        loop {
            let changed = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => break,
                },
                change = changes.recv(), if following => match change {
                    Ok(Change::Row { table, key }) if table == POLICIES.name() => {
                        self.reread(&key)
                    }
                    Ok(Change::Row { table, .. }) if table == META.name() => self.reread_default(),
                    Ok(Change::Row { .. }) => false,
                    Ok(Change::Resync) | Err(RecvError::Lagged(_)) => self.reread_all(),
                    Err(RecvError::Closed) => {
                        following = false;
                        false
                    }
                },
            };
            if changed {
                self.publish().await;
            }
        }
    }

    /// Answers `cmd`; whether it changed the policies in force.
    async fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Set {
                name,
                selector,
                spec,
                reply,
            } => answer(reply, self.set(name, selector, *spec).await),
            Command::Delete { name, reply } => answer(reply, self.delete(&name)),
            Command::List { reply } => {
                let _ = reply.send(self.list());
                false
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

    async fn set(
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
        let mut last = None;
        for n in 0..ATTEMPTS {
            if n > 0 {
                pause_before(n).await;
            }
            // Every set writes the counter: with the counter read first and expected unchanged
            // at the commit, the policies read after it are every one set before this one, on
            // any replica, so the tie check cannot miss one this replica has not heard of yet.
            let (stored_meta, mut meta) = read_meta(&self.store)?;
            let mut policies = load(&self.store)?;
            check_ties(&policies, &name, &selector).map_err(PolicyStoreError::Invalid)?;
            meta.counter += 1;
            let stored = StoredPolicy {
                name: name.clone(),
                selector: selector.clone(),
                spec: StoredSpec(parsed.to_proto(0, &name)),
                version: meta.counter,
                updated_at_ms: now_ms(),
            };
            let mut batch = Batch::default();
            batch.expect(META, META_KEY, stored_meta.as_ref())?;
            batch.put(POLICIES, &name, &stored)?;
            batch.put(META, META_KEY, &meta)?;
            match self.store.commit(batch) {
                Ok(()) => {}
                Err(e) if e.is_conflict() => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            policies.retain(|p| p.name != name);
            policies.push(stored.clone());
            policies.sort_by(|a, b| a.name.cmp(&b.name));
            self.replace(policies, false);
            self.events.emit(
                "policy_set",
                "",
                format!(
                    "policy {name} v{} set for {}",
                    stored.version, stored.selector
                ),
            );
            return Ok(stored);
        }
        Err(last.unwrap_or_else(|| conflict(META_KEY)).into())
    }

    fn delete(&mut self, name: &str) -> Result<(), PolicyStoreError> {
        // As stored: another replica may have set or deleted it a moment ago.
        if self.store.get::<StoredPolicy>(POLICIES, name)?.is_none() {
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

    /// Another replica wrote or deleted policy `name`: reads it again. Whether that changed the
    /// policies in force.
    fn reread(&mut self, name: &str) -> bool {
        let stored = match self.store.get::<StoredPolicy>(POLICIES, name) {
            Ok(stored) => stored,
            Err(error) => {
                // The database is down: the read after it is back (a resync) catches up.
                tracing::warn!(policy = name, %error, "cannot read a policy another replica changed");
                return false;
            }
        };
        let mut policies: Vec<StoredPolicy> = self
            .policies
            .iter()
            .filter(|p| p.name != name)
            .cloned()
            .collect();
        policies.extend(stored);
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        self.replace(policies, true)
    }

    /// Changes may have been missed: reads every policy and the default's version again.
    fn reread_all(&mut self) -> bool {
        let policies = match load(&self.store) {
            Ok(policies) => policies,
            Err(error) => {
                tracing::warn!(%error, "cannot read the policies again");
                return false;
            }
        };
        let default = self.reread_default();
        self.replace(policies, true) || default
    }

    /// The default's version as stored, if another replica with the same configured default
    /// versioned it anew (a replica with another default keeps its own).
    fn reread_default(&mut self) -> bool {
        match read_meta(&self.store) {
            Ok((Some(_), meta))
                if meta.default_hash == self.default_hash
                    && meta.default_version != self.default.version =>
            {
                self.default.version = meta.default_version;
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(%error, "cannot read the policy version counter");
                false
            }
        }
    }

    /// Puts `policies` in force; with `heard`, the differences came from another replica and are
    /// told as events here too. Whether anything changed.
    fn replace(&mut self, policies: Vec<StoredPolicy>, heard: bool) -> bool {
        if policies == self.policies {
            return false;
        }
        if heard {
            for p in &policies {
                if !self.policies.contains(p) {
                    self.events.emit(
                        "policy_set",
                        "",
                        format!(
                            "policy {} v{} set for {} (through another replica)",
                            p.name, p.version, p.selector
                        ),
                    );
                }
            }
            for old in &self.policies {
                if !policies.iter().any(|p| p.name == old.name) {
                    self.events.emit(
                        "policy_deleted",
                        "",
                        format!("policy {} deleted (through another replica)", old.name),
                    );
                }
            }
        }
        self.policies = policies;
        true
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
pub(crate) mod testproxy;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use tokio::task::JoinHandle;

    use super::*;
    use crate::health::Health;
    use crate::store::StoreSettings;
    use crate::store::postgres::PostgresSettings;

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
            Self::on(Store::open(path).unwrap(), default).await
        }

        /// A controller (a replica) on `store`.
        async fn on(store: Store, default: &PolicySpec) -> Self {
            let (registry, registry_task) =
                Registry::spawn("test", Events::new(16), Health::default(), 10);
            tokio::spawn(registry_task);
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

    /// Two replicas, "a" and "b", on one new PostgreSQL database (through `proxy` for "a" when
    /// given); `None` when PostgreSQL is not installed.
    async fn replicas(
        default: &PolicySpec,
    ) -> Option<(tempfile::TempDir, PostgresSettings, Controller, Controller)> {
        let pg = crate::store::testpg::database().await?;
        let dir = tempfile::tempdir().unwrap();
        let connect = |name: &'static str| {
            let settings = StoreSettings::Postgres(pg.clone());
            let dir = dir.path().to_path_buf();
            async move { Store::connect(&settings, &dir, name).await.unwrap() }
        };
        let (a, b) = tokio::join!(connect("a"), connect("b"));
        // Started at once, with one configured default, each in a task of its own as each
        // replica is a process of its own.
        let start = |store| {
            let default = default.clone();
            tokio::spawn(async move { Controller::on(store, &default).await })
        };
        let (a, b) = (start(a), start(b));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        Some((dir, pg, a, b))
    }

    /// Waits up to 10 s for `check` to hold, polling.
    async fn eventually<F: std::future::Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not within 10 s: {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The (policy name, version) the registry wants agent `id` to run.
    async fn wanted(registry: &Registry, id: &str) -> Option<(String, u64)> {
        let status = registry.policy_status(None).await;
        let s = status.iter().find(|s| s.agent_id == id)?;
        Some((s.policy_name.clone(), s.version_wanted))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_a_policy_set_through_one_replica_reaches_the_agents_of_another() {
        let Some((_dir, _pg, a, b)) = replicas(&PolicySpec::default()).await else {
            return;
        };
        assert_eq!(a.listed().await, named(&[("default", 1)]));
        assert_eq!(b.listed().await, named(&[("default", 1)]), "one version");
        // An agent connected to B.
        let (tx, mut pushed) = mpsc::channel(16);
        let labels = BTreeMap::from([("role".to_string(), "web".to_string())]);
        let remote = "192.0.2.1:1".parse().unwrap();
        b.registry
            .register("b1".into(), Default::default(), labels, remote, tx)
            .await
            .unwrap();
        assert_eq!(wanted(&b.registry, "b1").await, Some(("default".into(), 1)));

        let web = a
            .policies
            .set("web".into(), web(), spec(1_000))
            .await
            .unwrap();
        assert_eq!(web.version, 2);
        eventually("B's registry resolves web v2 for b1", || async {
            wanted(&b.registry, "b1").await == Some(("web".into(), 2))
        })
        .await;
        // ... and pushed it to the agent.
        let mut versions = Vec::new();
        while let Ok(m) = pushed.try_recv() {
            if let Ok(proto::ControllerMessage {
                msg: Some(proto::controller_message::Msg::Policy(p)),
            }) = *m
            {
                versions.push((p.name, p.version));
            }
        }
        assert_eq!(
            versions.last(),
            Some(&("web".to_string(), 2)),
            "{versions:?}"
        );
        assert_eq!(b.listed().await, named(&[("web", 2), ("default", 1)]));

        // Deleted through B: A's agents go back to the default.
        b.policies.delete("web".into()).await.unwrap();
        eventually("A forgets web", || async {
            a.listed().await == named(&[("default", 1)])
        })
        .await;
        assert_eq!(
            a.resolved_for("a1", &[("role", "web")]).await,
            ("default".into(), 1)
        );
        // A policy that would tie with one set through the other replica is refused, even
        // before this replica has heard of it.
        a.policies
            .set("pinned".into(), Selector::Agent("x".into()), spec(1_000))
            .await
            .unwrap();
        let e = b
            .policies
            .set("pinned2".into(), Selector::Agent("x".into()), spec(1_000))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("would tie with policy pinned"),
            "{e}"
        );
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_replicas_setting_policies_at_once_never_share_a_version() {
        let Some((_dir, _pg, a, b)) = replicas(&PolicySpec::default()).await else {
            return;
        };
        const EACH: usize = 12;
        let run = |c: &Controller, prefix: &'static str| {
            let policies = c.policies.clone();
            tokio::spawn(async move {
                let mut versions = Vec::new();
                for i in 0..EACH {
                    let name = format!("{prefix}{i}");
                    let p = policies
                        .set(name.clone(), Selector::Agent(name), spec(1_000))
                        .await
                        .unwrap();
                    versions.push(p.version);
                }
                versions
            })
        };
        let (from_a, from_b) = tokio::join!(run(&a, "a"), run(&b, "b"));
        let mut all: Vec<u64> = from_a.unwrap().into_iter().chain(from_b.unwrap()).collect();
        all.sort();
        let expected: Vec<u64> = (2..2 + 2 * EACH as u64).collect();
        assert_eq!(all, expected, "every version once, none skipped");
        // Both replicas end with the same policies, once each has heard the other's.
        eventually("A lists every policy", || async {
            a.policies.list().await.len() == 2 * EACH + 1
        })
        .await;
        let want = a.policies.list().await;
        eventually("B lists what A lists", || async {
            b.policies.list().await == want
        })
        .await;
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_a_policy_change_the_database_refuses_is_unavailable_and_changes_nothing() {
        let Some(pg) = crate::store::testpg::database().await else {
            return;
        };
        let (proxy, through) = testproxy::Proxy::start(&pg).await;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&StoreSettings::Postgres(through), dir.path(), "a")
            .await
            .unwrap();
        let c = Controller::on(store, &PolicySpec::default()).await;
        c.policies
            .set("web".into(), web(), spec(1_000))
            .await
            .unwrap();
        proxy.cut();
        let e = c
            .policies
            .set("web".into(), web(), spec(2_000))
            .await
            .unwrap_err();
        let status = Status::from(e);
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains(&proxy.addr().to_string()),
            "names the database: {}",
            status.message()
        );
        let e = c.policies.delete("web".into()).await.unwrap_err();
        assert_eq!(Status::from(e).code(), tonic::Code::Unavailable);
        assert_eq!(c.listed().await, named(&[("web", 2), ("default", 1)]));
        assert_eq!(
            c.policies.list().await[0].spec.0.heartbeat_interval_ms,
            1_000
        );
        assert_eq!(
            c.resolved_for("a1", &[("role", "web")]).await,
            ("web".into(), 2)
        );
        c.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_a_new_default_gets_one_version_and_replicas_with_it_agree() {
        let Some((dir, pg, a, b)) = replicas(&PolicySpec::default()).await else {
            return;
        };
        a.policies
            .set("web".into(), web(), spec(1_000))
            .await
            .unwrap();
        // A third replica with a new default versions it; the others keep theirs.
        let changed = PolicySpec {
            heartbeat_interval: Duration::from_secs(2),
            ..PolicySpec::default()
        };
        let store = Store::connect(&StoreSettings::Postgres(pg.clone()), dir.path(), "c")
            .await
            .unwrap();
        let c = Controller::on(store, &changed).await;
        assert_eq!(c.listed().await, named(&[("web", 2), ("default", 3)]));
        assert_eq!(b.listed().await.last(), Some(&("default".to_string(), 1)));
        let next = b
            .policies
            .set("db".into(), Selector::Agent("a9".into()), spec(1_000));
        assert_eq!(next.await.unwrap().version, 4, "after the default's 3");
        for r in [a, b, c] {
            r.stop().await;
        }
    }
}
