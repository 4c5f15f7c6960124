//! Rollout bookkeeping: which policy resolves for each agent, sending it when that changes (new
//! policies, new labels, a new session), and what each agent reports back: applied, or refused
//! with its previous policy still running.

use std::collections::BTreeMap;
use std::time::Instant;

use tapgraph::proto::{self, controller_message};

use super::MirrorRoute;
use super::health::DEFAULT_HEARTBEAT_MS;
use super::presence::Interfaces;
use super::task::RegistryTask;
use super::view::AgentView;
use crate::policy_rules::{self as rules, StoredPolicy};

impl RegistryTask {
    /// Replaces the policies in force; every agent whose resolution changed gets its new one.
    pub(super) fn set_policies(&mut self, policies: Vec<StoredPolicy>, default: StoredPolicy) {
        self.policies = policies;
        self.default = default;
        let ids: Vec<String> = self.agents.keys().cloned().collect();
        for id in ids {
            self.push_policy(&id, true);
        }
    }

    /// Replaces agent `agent_id`'s labels; if that changes its policy, it gets the new one.
    pub(super) fn set_labels(&mut self, agent_id: &str, labels: BTreeMap<String, String>) {
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.view.labels = labels;
            self.push_policy(agent_id, true);
        }
    }

    pub(super) fn mirror_route(&self, id: &str) -> Option<MirrorRoute> {
        let agent = self.agents.get(id)?;
        let wanted = rules::resolve(&self.policies, &self.default, id, &agent.view.labels);
        let spec = tapgraph::policy::PolicySpec::from_proto(&wanted.message()).ok()?;
        Some(MirrorRoute {
            targets: spec.targets,
            hostname: agent.view.hostname.clone(),
            dedup: spec.dedup,
        })
    }

    /// Sends agent `id` the policy that resolves for it, if it is live and that is not what it has;
    /// with `announce`, as an event too.
    pub(super) fn push_policy(&mut self, id: &str, announce: bool) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        let Some(live) = &agent.live else {
            return;
        };
        let wanted = rules::resolve(&self.policies, &self.default, id, &agent.view.labels);
        let v = &mut agent.view;
        if v.policy_name == wanted.name && v.policy_version_sent == wanted.version {
            return;
        }
        let push = proto::ControllerMessage {
            msg: Some(controller_message::Msg::Policy(wanted.message())),
        };
        // The control channel holds 64 messages; an agent that lets it fill is not reading, and
        // its idle timeout will end the session. Its policy is resent when it reconnects.
        if !live.push(Box::new(Ok(push)), &self.dropped.policy) {
            tracing::warn!(agent = %id, policy = %wanted.name, "control channel full; policy not sent");
            return;
        }
        v.policy_name = wanted.name.clone();
        v.policy_version_sent = wanted.version;
        v.policy_error = None;
        // Lost is judged against the heartbeat interval of the policy sent.
        v.heartbeat_ms = match wanted.spec.0.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT_MS,
            ms => ms,
        };
        if announce {
            self.events.emit(
                "policy_sent",
                id,
                format!("policy {} v{} sent to {id}", wanted.name, wanted.version),
            );
        }
    }

    /// Rollout status of every live agent of this replica, for policy `name` or all.
    #[cfg(test)]
    pub(super) fn policy_status(&self, name: Option<&str>) -> Vec<proto::AgentPolicyStatus> {
        self.fleet_policy_status(name, &[], &Interfaces::new())
    }

    /// As [`RegistryTask::policy_status`], with `remote` too (agents live on other replicas, as
    /// they last wrote them), by agent id.
    pub(super) fn fleet_policy_status(
        &self,
        name: Option<&str>,
        remote: &[AgentView],
        interfaces: &Interfaces,
    ) -> Vec<proto::AgentPolicyStatus> {
        // With replicas, an ack counts once the others can read it.
        let published = self
            .published
            .as_ref()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()));
        let local = self.agents.values().filter(|a| a.live.is_some()).map(|a| {
            let applied = match &published {
                Some(p) => p.get(&a.view.id).copied().unwrap_or(0),
                None => a.view.policy_version_applied,
            };
            let mut status = self.status_of(&a.view, applied, false);
            status.target_error = self.target_error(&a.view, &self.replica, interfaces);
            status
        });
        let mut all: Vec<proto::AgentPolicyStatus> = local
            .chain(remote.iter().map(|v| {
                let mut status = self.status_of(v, v.policy_version_applied, true);
                status.target_error = self.target_error(v, &v.controller, interfaces);
                status
            }))
            .filter(|s| name.is_none_or(|n| n == s.policy_name))
            .collect();
        if !remote.is_empty() {
            all.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        }
        all
    }

    /// Why `v`'s mirror target cannot be delivered on `replica`, where its stream lands: an
    /// `interface:` that replica does not have (as its lease row says). Empty when it can, or
    /// when the replica's interfaces are not known.
    fn target_error(&self, v: &AgentView, replica: &str, interfaces: &Interfaces) -> String {
        let wanted = rules::resolve(&self.policies, &self.default, &v.id, &v.labels);
        let Some(present) = interfaces.get(replica) else {
            return String::new();
        };
        let targets = tapgraph::policy::PolicySpec::from_proto(&wanted.message())
            .map(|s| s.targets)
            .unwrap_or_default();
        targets
            .iter()
            .filter_map(|t| match t {
                tapgraph::policy::Target::Interface(name) if !present.contains(name) => {
                    Some(format!(
                        "mirror target interface:{name}: no interface {name} on replica {replica}, \
                     where this agent's stream lands"
                    ))
                }
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// An agent's rollout status against the policy that resolves for it here, `applied` being
    /// the version it applied as far as the status counts it. For an agent of another replica
    /// (`remote`), a refusal counts only if it was of that very policy: one of an older version
    /// is superseded by the one on its way.
    fn status_of(&self, v: &AgentView, applied: u64, remote: bool) -> proto::AgentPolicyStatus {
        let wanted = rules::resolve(&self.policies, &self.default, &v.id, &v.labels);
        let refused = v.policy_error.clone().filter(|_| {
            !remote || (v.policy_name == wanted.name && v.policy_version_sent == wanted.version)
        });
        proto::AgentPolicyStatus {
            agent_id: v.id.clone(),
            policy_name: wanted.name.clone(),
            version_wanted: wanted.version,
            version_applied: applied,
            pending: applied != wanted.version && refused.is_none(),
            error: refused.unwrap_or_default(),
            target_error: String::new(),
        }
    }

    /// Agent `agent_id` applied or refused a policy; a report on any but the version last sent
    /// is stale and ignored.
    pub(super) fn policy_report(&mut self, agent_id: &str, status: proto::PolicyStatus) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        let shared = agent.is_shared(Instant::now());
        let v = &mut agent.view;
        if status.version != v.policy_version_sent {
            tracing::debug!(agent = %agent_id, version = status.version, current = v.policy_version_sent, "status for a superseded policy ignored");
            return;
        }
        if status.applied {
            v.policy_version_applied = status.version;
            v.policy_error = None;
            tracing::info!(agent = %agent_id, version = status.version, "policy applied");
            // Each of two processes sharing an identity applies it per session.
            if !shared {
                self.events.emit(
                    "policy_applied",
                    agent_id,
                    format!(
                        "{agent_id} applied policy {} v{}",
                        v.policy_name, status.version
                    ),
                );
            }
        } else {
            tracing::warn!(agent = %agent_id, version = status.version, error = %status.error, "agent refused policy; its previous policy keeps running");
            self.events.emit(
                "policy_refused",
                agent_id,
                format!(
                    "{agent_id} refused policy {} v{}: {}",
                    v.policy_name, status.version, status.error
                ),
            );
            v.policy_error = Some(status.error);
        }
    }
}

#[cfg(test)]
mod tests {
    use tapgraph::policy::PolicySpec;
    use tapgraph::proto::controller_message::Msg;

    use super::super::fixture;
    use super::*;
    use crate::policy_rules::{Selector, StoredSpec};

    fn policy(name: &str, selector: Selector, version: u64, heartbeat_ms: u64) -> StoredPolicy {
        let mut spec = PolicySpec::default().to_proto(0, name);
        spec.heartbeat_interval_ms = heartbeat_ms;
        StoredPolicy {
            name: name.into(),
            selector,
            spec: StoredSpec(spec),
            version,
            updated_at_ms: 0,
        }
    }

    fn pushed_policy(
        rx: &mut tokio::sync::mpsc::Receiver<super::super::Pushed>,
    ) -> Option<(String, u64)> {
        std::iter::from_fn(|| rx.try_recv().ok()).find_map(|m| match (*m).ok()?.msg? {
            Msg::Policy(p) => Some((p.name, p.version)),
            _ => None,
        })
    }

    fn web() -> BTreeMap<String, String> {
        BTreeMap::from([("role".to_string(), "web".to_string())])
    }

    #[test]
    fn a_policy_for_a_full_control_channel_is_dropped_counted_and_not_recorded_as_sent() {
        let (mut task, _health, _events) = fixture::task();
        let (_registered, mut rx) = fixture::connect(&mut task, "vm", 1);
        let default = policy("default", Selector::All, 7, 0);
        task.set_policies(Vec::new(), default.clone());
        assert_eq!(task.dropped.read().policy, 1);
        assert_eq!(task.agents["vm"].view.policy_version_sent, 0);
        // Room again: the next change goes out.
        assert_eq!(pushed_policy(&mut rx), Some(("default".into(), 0)));
        task.set_policies(Vec::new(), default);
        assert_eq!(pushed_policy(&mut rx), Some(("default".into(), 7)));
        assert_eq!(task.dropped.read().policy, 1);
    }

    #[test]
    fn new_labels_push_the_policy_they_resolve_to_and_its_heartbeat() {
        let (mut task, _health, _events) = fixture::task();
        let (_registered, mut rx) = fixture::connect(&mut task, "vm", 8);
        let web_policy = policy("web", Selector::Labels(web()), 3, 1_500);
        task.set_policies(vec![web_policy], policy("default", Selector::All, 1, 0));
        assert_eq!(pushed_policy(&mut rx), Some(("default".into(), 0)));
        assert_eq!(pushed_policy(&mut rx), Some(("default".into(), 1)));
        assert_eq!(task.agents["vm"].view.heartbeat_ms, DEFAULT_HEARTBEAT_MS);
        task.set_labels("vm", web());
        assert_eq!(pushed_policy(&mut rx), Some(("web".into(), 3)));
        assert_eq!(task.agents["vm"].view.heartbeat_ms, 1_500);
        // Unchanged resolution: nothing is sent again.
        task.set_labels("vm", web());
        assert_eq!(pushed_policy(&mut rx), None);
        task.set_labels("unknown", web());
    }

    #[test]
    fn reports_on_the_version_sent_count_and_stale_ones_do_not() {
        let (mut task, _health, _events) = fixture::task();
        let (_registered, _rx) = fixture::connect(&mut task, "vm", 8);
        task.set_policies(Vec::new(), policy("default", Selector::All, 4, 0));
        let report = |version, applied, error: &str| proto::PolicyStatus {
            version,
            applied,
            error: error.into(),
        };
        let status = |task: &RegistryTask| task.policy_status(None).pop().unwrap();
        assert!(status(&task).pending);
        task.policy_report("vm", report(3, true, ""));
        assert_eq!(task.agents["vm"].view.policy_version_applied, 0, "stale");
        task.policy_report("vm", report(4, false, "bad filter"));
        let s = status(&task);
        assert_eq!((s.pending, s.error.as_str()), (false, "bad filter"));
        assert_eq!(
            task.agents["vm"].view.policy_error.as_deref(),
            Some("bad filter")
        );
        task.policy_report("vm", report(4, true, ""));
        let s = status(&task);
        assert_eq!(
            (s.version_wanted, s.version_applied, s.pending),
            (4, 4, false)
        );
        assert_eq!(s.error, "");
        assert_eq!(task.policy_status(Some("default")).len(), 1);
        assert!(task.policy_status(Some("web")).is_empty());
    }

    #[test]
    fn the_mirror_route_is_the_target_of_the_policy_in_force() {
        let (mut task, _health, _events) = fixture::task();
        let (_registered, _rx) = fixture::connect(&mut task, "vm", 8);
        assert!(task.mirror_route("unknown").is_none());
        let mut pinned = policy("pinned", Selector::Agent("vm".into()), 2, 0);
        let spec = PolicySpec {
            targets: vec![tapgraph::policy::Target::Interface("tap0".into())],
            ..PolicySpec::default()
        };
        pinned.spec = StoredSpec(spec.to_proto(0, "pinned"));
        task.set_policies(vec![pinned], policy("default", Selector::All, 1, 0));
        let route = task.mirror_route("vm").unwrap();
        assert_eq!(route.hostname, "vm.example");
        assert_eq!(
            route.targets,
            [tapgraph::policy::Target::Interface("tap0".into())]
        );
    }

    /// The status names the replica an `interface:` target is missing on, where the agent's
    /// stream lands; the agent's own rollout state is not changed by it.
    #[test]
    fn the_status_names_the_replica_an_interface_target_is_missing_on() {
        let (mut task, _health, _events) = fixture::task();
        let (_registered, _rx) = fixture::connect(&mut task, "vm", 8);
        let mut pinned = policy("pinned", Selector::Agent("vm".into()), 2, 0);
        let spec = PolicySpec {
            targets: vec![tapgraph::policy::Target::Interface("span0".into())],
            ..PolicySpec::default()
        };
        pinned.spec = StoredSpec(spec.to_proto(0, "pinned"));
        task.set_policies(vec![pinned], policy("default", Selector::All, 1, 0));
        let here = task.replica.to_string();
        let with = |ifaces: &[&str]| -> Interfaces {
            [(here.clone(), ifaces.iter().map(|s| s.to_string()).collect())].into()
        };
        let status = task.fleet_policy_status(None, &[], &with(&["lo", "eth0"]));
        assert_eq!(
            status[0].target_error,
            format!(
                "mirror target interface:span0: no interface span0 on replica {here}, where this \
                 agent's stream lands"
            )
        );
        assert!(status[0].error.is_empty());
        let status = task.fleet_policy_status(None, &[], &with(&["lo", "span0"]));
        assert_eq!(status[0].target_error, "");
        // A replica whose interfaces are not known is not blamed.
        let status = task.fleet_policy_status(None, &[], &Interfaces::new());
        assert_eq!(status[0].target_error, "");
    }
}
