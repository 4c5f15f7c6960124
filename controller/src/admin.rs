//! `AdminService`: the operator's API. Every call requires an operator certificate: tokens, agents,
//! policies, events and the dependency map.

use std::collections::BTreeMap;
use std::time::Duration;

use tapgraph::proto::{self, admin_service_server::AdminService};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::auth;
use crate::enrollment::tokens::Token;
use crate::enrollment::{EnrolledAgent, Enrollment};
use crate::events::Events;
use crate::policies::{self, Policies, Selector};
use crate::registry::{AgentState, AgentView, ConnectProcess, Registry};
use crate::topology::labels::RuleText;
use crate::topology::{GraphQuery, Naming, Topology};

pub struct AdminApi {
    pub enrollment: Enrollment,
    pub registry: Registry,
    pub policies: Policies,
    pub topology: Topology,
    pub events: Events,
    pub naming: Naming,
    pub mirrors: crate::mirror::Mirrors,
    pub console: crate::http::console::Access,
    /// `http://HOST:PORT/`, where operators open the console.
    pub console_url: String,
}

/// Console tokens live from a minute to a month.
const CONSOLE_TTL: (Duration, Duration) =
    (Duration::from_secs(60), Duration::from_secs(30 * 86_400));

/// A store's refusal as operators see it: UNAVAILABLE naming the database while it is down.
fn store_status(e: crate::store::StoreError) -> Status {
    if e.is_unavailable() {
        Status::unavailable(e.to_string())
    } else {
        Status::internal(e.to_string())
    }
}

fn console_token(t: crate::http::console::ConsoleToken) -> proto::ConsoleToken {
    proto::ConsoleToken {
        id: t.id,
        created_by: t.created_by,
        created_at_unix_nanos: t.created_at_ms.saturating_mul(1_000_000),
        expires_at_unix_nanos: t.expires_at_ms.saturating_mul(1_000_000),
        description: t.description,
    }
}

type EventStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<proto::Event, Status>> + Send + 'static>,
>;

type GraphStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<proto::Graph, Status>> + Send + 'static>,
>;

/// The size StreamGraph's parts stay under: far below any client's message limit. A single node
/// or edge larger than this still goes, alone in its part.
const GRAPH_PART_BYTES: usize = 1 << 20;

/// `graph` cut into parts of at most `max_bytes` encoded: its nodes, then its edges, in order,
/// and every other field of the graph in the first part. There is always at least one part.
fn graph_parts(mut graph: proto::Graph, max_bytes: usize) -> Vec<proto::Graph> {
    use prost::Message;
    /// What one element of a repeated message field adds: tag, length, body.
    fn field_len(body: usize) -> usize {
        1 + prost::encoding::encoded_len_varint(body as u64) + body
    }
    let nodes = std::mem::take(&mut graph.nodes);
    let edges = std::mem::take(&mut graph.edges);
    let mut size = graph.encoded_len();
    let mut part = graph;
    let mut parts = Vec::new();
    let mut start_new = |part: &mut proto::Graph, size: &mut usize, adding: usize| {
        let empty = part.nodes.is_empty() && part.edges.is_empty();
        if !empty && *size + adding > max_bytes {
            parts.push(std::mem::take(part));
            *size = 0;
        }
        *size += adding;
    };
    for node in nodes {
        start_new(&mut part, &mut size, field_len(node.encoded_len()));
        part.nodes.push(node);
    }
    for edge in edges {
        start_new(&mut part, &mut size, field_len(edge.encoded_len()));
        part.edges.push(edge);
    }
    parts.push(part);
    parts
}

impl AdminApi {
    /// Every agent known by enrollment or by a session, joined by id.
    async fn agents(&self) -> Vec<proto::AgentInfo> {
        let enrolled: BTreeMap<String, EnrolledAgent> = self
            .enrollment
            .list_agents()
            .await
            .into_iter()
            .map(|a| (a.id.clone(), a))
            .collect();
        let mut live: BTreeMap<String, AgentView> = self
            .registry
            .list()
            .await
            .into_iter()
            .map(|a| (a.id.clone(), a))
            .collect();
        let mirror = self.mirrors.stats();
        let mut ids: Vec<String> = enrolled.keys().chain(live.keys()).cloned().collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let mut info = agent_info(&id, enrolled.get(&id), live.remove(&id));
                add_mirror(&mut info, &mirror);
                info
            })
            .collect()
    }
}

const MS: u64 = 1_000_000;

fn agent_info(
    id: &str,
    enrolled: Option<&EnrolledAgent>,
    live: Option<AgentView>,
) -> proto::AgentInfo {
    let revoked = enrolled.is_some_and(|a| a.revoked_at_ms.is_some());
    let state = match (&live, revoked) {
        (_, true) => proto::AgentState::Revoked,
        (Some(v), _) => match v.state {
            AgentState::Connected => proto::AgentState::Connected,
            AgentState::Degraded => proto::AgentState::Degraded,
            AgentState::Lost => proto::AgentState::Lost,
        },
        (None, _) => proto::AgentState::Unspecified,
    };
    let mut info = proto::AgentInfo {
        id: id.to_string(),
        state: state as i32,
        ..Default::default()
    };
    if let Some(a) = enrolled {
        info.hostname = a.hostname.clone();
        info.labels = a.labels.clone().into_iter().collect();
        info.cert_not_after_unix_nanos = a.cert_not_after_ms * MS;
    }
    if let Some(v) = live {
        if !v.hostname.is_empty() {
            info.hostname = v.hostname;
        }
        info.last_seen_unix_nanos = v.last_seen_unix_ms * MS;
        info.policy_version_applied = v.policy_version_applied;
        info.policy_error = v.policy_error.unwrap_or_default();
        info.agent_version = v.agent_version;
        info.remote_addr = v.remote_addr;
        info.controller = v.controller;
        info.state_reason = v.state_reason.unwrap_or_default();
        info.capture_state = v.capture.state.clone();
        info.capture_packets_per_second = v.capture_pps;
        info.send_packets_per_second = v.send_pps;
        info.send_bits_per_second = v.send_bps;
        info.snapshot_entries = v.snapshot_entries;
        info.connect_process = match v.connect_process {
            ConnectProcess::Unknown => None,
            ConnectProcess::Bpf => Some(proto::ConnectProcess {
                bpf: true,
                off_reason: String::new(),
            }),
            ConnectProcess::Off(reason) => Some(proto::ConnectProcess {
                bpf: false,
                off_reason: reason,
            }),
        };
        info.policy_version_sent = v.policy_version_sent;
        info.clock_offset_known = v.clock_offset_ms.is_some();
        info.clock_offset_ms = v.clock_offset_ms.unwrap_or(0.0);
        info.counters = Some(v.capture.counters());
    }
    info
}

/// Adds what the controller measured of an agent's mirrored packets: loss in transit, drops at the
/// targets, and the delay at its busiest target.
fn add_mirror(info: &mut proto::AgentInfo, stats: &[crate::mirror::StatsView]) {
    let mine = stats.iter().filter(|s| s.agent == info.id);
    let mut busiest: Option<&crate::mirror::StatsView> = None;
    for s in mine {
        info.packets_lost_in_transit += s.lost_in_transit;
        // A duplicate is delivered once, from another agent: no loss.
        for (reason, n) in s.dropped.iter().filter(|(r, _)| **r != "duplicate") {
            *info
                .dropped_at_targets
                .entry(reason.to_string())
                .or_default() += n;
        }
        if busiest.is_none_or(|b| s.packets_written > b.packets_written) {
            busiest = Some(s);
        }
    }
    if let Some(b) = busiest {
        info.delay_p50_ms = b.delay_p50_us.unwrap_or(0) as f64 / 1e3;
        info.delay_p99_ms = b.delay_p99_us.unwrap_or(0) as f64 / 1e3;
    }
}

fn token_info(t: &Token) -> proto::TokenInfo {
    proto::TokenInfo {
        id: t.id.clone(),
        expires_at_unix_nanos: t.expires_at_ms * MS,
        uses_left: t.uses_left,
        labels: t.labels.clone().into_iter().collect(),
        description: t.description.clone(),
        revoked: t.revoked,
        replaces: t.replaces.clone().unwrap_or_default(),
    }
}

/// Bounds of a join token.
const TTL: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(365 * 86_400));
const MAX_USES: u32 = 1_000_000;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_token(
        &self,
        request: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        let operator = auth::operator(&request)?;
        let req = request.into_inner();
        let ttl = Duration::from_millis(req.ttl_ms);
        if ttl < TTL.0 || ttl > TTL.1 {
            return Err(Status::invalid_argument(format!(
                "ttl {} is out of range 1s..=365d",
                tapgraph::units::format_duration(ttl)
            )));
        }
        if req.uses == 0 || req.uses > MAX_USES {
            return Err(Status::invalid_argument(format!(
                "uses {} is out of range 1..={MAX_USES}",
                req.uses
            )));
        }
        for (k, v) in &req.labels {
            tapgraph::labels::check(k, v).map_err(Status::invalid_argument)?;
        }
        if req.description.len() > 256 {
            return Err(Status::invalid_argument(
                "description is longer than 256 bytes",
            ));
        }
        let new = self
            .enrollment
            .create_token(
                ttl,
                req.uses,
                req.labels.into_iter().collect(),
                req.description,
                (!req.replaces.is_empty()).then_some(req.replaces),
            )
            .await?;
        tracing::info!(%operator, token = %new.token.id, "token issued");
        Ok(Response::new(proto::CreateTokenResponse {
            token: new.text,
            info: Some(token_info(&new.token)),
            ca_fingerprint: self.enrollment.ca_fingerprint().to_string(),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        auth::operator(&request)?;
        let tokens = self.enrollment.list_tokens().await;
        Ok(Response::new(proto::ListTokensResponse {
            tokens: tokens.iter().map(token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::RevokeTokenResponse>, Status> {
        let operator = auth::operator(&request)?;
        let id = request.into_inner().id;
        self.enrollment.revoke_token(id.clone()).await?;
        tracing::info!(%operator, token = %id, "token revoked by operator");
        Ok(Response::new(proto::RevokeTokenResponse {}))
    }

    async fn list_agents(
        &self,
        request: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        auth::operator(&request)?;
        let selector: BTreeMap<String, String> =
            request.into_inner().selector.into_iter().collect();
        let agents = self
            .agents()
            .await
            .into_iter()
            .filter(|a| {
                let labels: BTreeMap<String, String> = a.labels.clone().into_iter().collect();
                tapgraph::labels::matches(&selector, &labels)
            })
            .collect();
        Ok(Response::new(proto::ListAgentsResponse { agents }))
    }

    async fn get_agent(
        &self,
        request: Request<proto::GetAgentRequest>,
    ) -> Result<Response<proto::AgentInfo>, Status> {
        auth::operator(&request)?;
        let id = request.into_inner().id;
        self.agents()
            .await
            .into_iter()
            .find(|a| a.id == id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no agent {id}")))
    }

    async fn revoke_agent(
        &self,
        request: Request<proto::RevokeAgentRequest>,
    ) -> Result<Response<proto::RevokeAgentResponse>, Status> {
        let operator = auth::operator(&request)?;
        let id = request.into_inner().id;
        self.enrollment.revoke_agent(id.clone()).await?;
        tracing::info!(%operator, agent = %id, "agent revoked by operator");
        self.events
            .emit("revoked", &id, format!("agent {id} revoked by {operator}"));
        Ok(Response::new(proto::RevokeAgentResponse {}))
    }

    async fn label_agent(
        &self,
        request: Request<proto::LabelAgentRequest>,
    ) -> Result<Response<proto::AgentInfo>, Status> {
        let operator = auth::operator(&request)?;
        let req = request.into_inner();
        for (k, v) in &req.set {
            tapgraph::labels::check(k, v).map_err(Status::invalid_argument)?;
        }
        if let Some(both) = req.remove.iter().find(|k| req.set.contains_key(*k)) {
            return Err(Status::invalid_argument(format!(
                "label `{both}` is both set and removed"
            )));
        }
        let labels = self
            .enrollment
            .set_labels(req.id.clone(), req.set.into_iter().collect(), req.remove)
            .await?;
        // The registry re-resolves the agent's policy with its new labels and pushes a change.
        self.registry.set_labels(&req.id, labels.clone()).await;
        let text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.events.emit(
            "labels",
            &req.id,
            format!(
                "labels of {} set to {} by {operator}",
                req.id,
                text.join(",")
            ),
        );
        self.agents()
            .await
            .into_iter()
            .find(|a| a.id == req.id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no agent {}", req.id)))
    }

    async fn set_policy(
        &self,
        request: Request<proto::SetPolicyRequest>,
    ) -> Result<Response<proto::StoredPolicy>, Status> {
        let operator = auth::operator(&request)?;
        let req = request.into_inner();
        let selector =
            Selector::from_proto(req.selector.as_ref()).map_err(Status::invalid_argument)?;
        let spec = req
            .policy
            .ok_or_else(|| Status::invalid_argument("policy is required"))?;
        let stored = self.policies.set(req.name, selector, spec).await?;
        tracing::info!(%operator, policy = %stored.name, version = stored.version, selector = %stored.selector, "policy set");
        Ok(Response::new(stored.to_proto()))
    }

    async fn get_policy(
        &self,
        request: Request<proto::GetPolicyRequest>,
    ) -> Result<Response<proto::StoredPolicy>, Status> {
        auth::operator(&request)?;
        let name = request.into_inner().name;
        self.policies
            .list()
            .await
            .into_iter()
            .find(|p| p.name == name)
            .map(|p| Response::new(p.to_proto()))
            .ok_or_else(|| Status::not_found(format!("no policy named {name}")))
    }

    async fn list_policies(
        &self,
        request: Request<proto::ListPoliciesRequest>,
    ) -> Result<Response<proto::ListPoliciesResponse>, Status> {
        auth::operator(&request)?;
        let policies = self
            .policies
            .list()
            .await
            .iter()
            .map(|p| p.to_proto())
            .collect();
        Ok(Response::new(proto::ListPoliciesResponse { policies }))
    }

    async fn delete_policy(
        &self,
        request: Request<proto::DeletePolicyRequest>,
    ) -> Result<Response<proto::DeletePolicyResponse>, Status> {
        let operator = auth::operator(&request)?;
        let name = request.into_inner().name;
        if name == policies::DEFAULT_NAME {
            return Err(Status::invalid_argument(
                "the default policy comes from the controller's configuration and cannot be deleted",
            ));
        }
        self.policies.delete(name.clone()).await?;
        tracing::info!(%operator, policy = %name, "policy deleted");
        Ok(Response::new(proto::DeletePolicyResponse {}))
    }

    async fn get_policy_status(
        &self,
        request: Request<proto::GetPolicyStatusRequest>,
    ) -> Result<Response<proto::PolicyStatusResponse>, Status> {
        auth::operator(&request)?;
        let name = Some(request.into_inner().name).filter(|n| !n.is_empty());
        if let Some(n) = &name
            && !self.policies.list().await.iter().any(|p| &p.name == n)
        {
            return Err(Status::not_found(format!("no policy named {n}")));
        }
        let agents = self.registry.policy_status(name).await;
        Ok(Response::new(proto::PolicyStatusResponse { agents }))
    }

    async fn get_mirror_stats(
        &self,
        request: Request<proto::GetMirrorStatsRequest>,
    ) -> Result<Response<proto::MirrorStats>, Status> {
        auth::operator(&request)?;
        let only = request.into_inner().agent_id;
        let mut targets = self.mirrors.stats();
        let listed = self.registry.list().await;
        targets.extend(crate::mirror::direct_rows(&listed));
        targets.retain(|t| only.is_empty() || t.agent == only);
        let mut agents: Vec<proto::AgentMirror> = listed
            .into_iter()
            .filter(|a| only.is_empty() || a.id == only)
            .map(|a| {
                let c = &a.capture;
                proto::AgentMirror {
                    agent_id: a.id.clone(),
                    hostname: a.hostname.clone(),
                    capture_state: c.state.clone(),
                    capture_error: c.error.clone().unwrap_or_default(),
                    counters: Some(c.counters()),
                    targets: Vec::new(),
                }
            })
            .collect();
        if !only.is_empty() && agents.is_empty() {
            return Err(Status::not_found(format!("no agent {only}")));
        }
        for t in targets {
            let Some(agent) = agents.iter_mut().find(|a| a.agent_id == t.agent) else {
                continue;
            };
            agent.targets.push(proto::MirrorTargetStats {
                target: t.target,
                batches: t.batches,
                batches_lost: t.batches_lost,
                packets_received: t.packets_received,
                bytes_received: t.bytes_received,
                packets_written: t.packets_written,
                bytes_written: t.bytes_written,
                dropped: t
                    .dropped
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                last_error: t.last_error.unwrap_or_default(),
                delay_p50_us: t.delay_p50_us.unwrap_or(0),
                delay_p99_us: t.delay_p99_us.unwrap_or(0),
                target_note: t.target_note.unwrap_or_default().to_string(),
                direct: t.direct,
            });
        }
        // With replicas, the streams of agents connected to the others land there.
        for t in self.registry.remote_mirrors().await {
            if let Some(agent) = agents.iter_mut().find(|a| a.agent_id == t.agent) {
                agent.targets.push(t.into_proto());
            }
        }
        Ok(Response::new(proto::MirrorStats { agents }))
    }

    async fn get_graph(
        &self,
        request: Request<proto::GetGraphRequest>,
    ) -> Result<Response<proto::Graph>, Status> {
        auth::operator(&request)?;
        let req = request.into_inner();
        let map = crate::topology::view::map(
            &self.topology,
            &self.enrollment,
            &self.naming,
            GraphQuery {
                include_control: req.include_control,
                include_inactive: req.include_inactive,
            },
        )
        .await;
        Ok(Response::new(proto::Graph::from(&map)))
    }

    async fn get_history(
        &self,
        request: Request<proto::GetHistoryRequest>,
    ) -> Result<Response<proto::History>, Status> {
        auth::operator(&request)?;
        let to = match request.into_inner().to_unix_nanos {
            0 => tapgraph::time::unix_nanos(),
            t => t,
        };
        let (changes, horizon) = self
            .topology
            .history(to / 1_000_000)
            .await
            .map_err(|e| Status::unavailable(format!("the map's history: {e}")))?;
        Ok(Response::new(proto::History {
            changes: changes.iter().map(Into::into).collect(),
            horizon_unix_nanos: horizon.saturating_mul(1_000_000),
        }))
    }

    async fn stream_graph(
        &self,
        request: Request<proto::GetGraphRequest>,
    ) -> Result<Response<GraphStream>, Status> {
        let response = self.get_graph(request).await?;
        let parts = graph_parts(response.into_inner(), GRAPH_PART_BYTES);
        Ok(Response::new(Box::pin(tokio_stream::iter(
            parts.into_iter().map(Ok),
        ))))
    }

    async fn create_console_token(
        &self,
        request: Request<proto::CreateConsoleTokenRequest>,
    ) -> Result<Response<proto::CreateConsoleTokenResponse>, Status> {
        let operator = auth::operator(&request)?;
        let req = request.into_inner();
        let ttl = Duration::from_millis(req.ttl_ms);
        if ttl < CONSOLE_TTL.0 || ttl > CONSOLE_TTL.1 {
            return Err(Status::invalid_argument(format!(
                "ttl {} is out of range 1m..=30d",
                tapgraph::units::format_duration(ttl)
            )));
        }
        if req.description.len() > 256 {
            return Err(Status::invalid_argument(
                "description is longer than 256 bytes",
            ));
        }
        let (text, token) = self
            .console
            .tokens
            .create(ttl, req.description, operator.clone())
            .map_err(store_status)?;
        tracing::info!(%operator, token = %token.id, ttl = ?ttl, "console token created");
        Ok(Response::new(proto::CreateConsoleTokenResponse {
            id: token.id.clone(),
            url: format!("{}?token={text}", self.console_url),
            token: text,
            expires_at_unix_nanos: token.expires_at_ms.saturating_mul(1_000_000),
            required: self.console.required,
        }))
    }

    async fn list_console_tokens(
        &self,
        request: Request<proto::ListConsoleTokensRequest>,
    ) -> Result<Response<proto::ListConsoleTokensResponse>, Status> {
        auth::operator(&request)?;
        let tokens = self
            .console
            .tokens
            .list()
            .into_iter()
            .map(console_token)
            .collect();
        Ok(Response::new(proto::ListConsoleTokensResponse { tokens }))
    }

    async fn revoke_console_token(
        &self,
        request: Request<proto::RevokeConsoleTokenRequest>,
    ) -> Result<Response<proto::RevokeConsoleTokenResponse>, Status> {
        let operator = auth::operator(&request)?;
        let id = request.into_inner().id;
        match self.console.tokens.revoke(&id) {
            Ok(true) => {
                tracing::info!(%operator, token = %id, "console token revoked");
                Ok(Response::new(proto::RevokeConsoleTokenResponse {}))
            }
            Ok(false) => Err(Status::not_found(format!("no console token {id}"))),
            Err(e) => Err(store_status(e)),
        }
    }

    async fn get_label_rules(
        &self,
        request: Request<proto::GetLabelRulesRequest>,
    ) -> Result<Response<proto::LabelRules>, Status> {
        auth::operator(&request)?;
        let (text, _) = self.naming.operator_rules.get();
        Ok(Response::new(proto::LabelRules {
            cidr: text.cidr,
            hostname: text.hostname,
        }))
    }

    async fn set_label_rules(
        &self,
        request: Request<proto::LabelRules>,
    ) -> Result<Response<proto::LabelRules>, Status> {
        let operator = auth::operator(&request)?;
        let req = request.into_inner();
        let text = RuleText {
            cidr: req.cidr.clone(),
            hostname: req.hostname.clone(),
        };
        self.naming.operator_rules.set(text)?;
        tracing::info!(%operator, cidr = %req.cidr, hostname = %req.hostname, "label rules set");
        self.events
            .emit("label_rules", "", format!("label rules set by {operator}"));
        Ok(Response::new(req))
    }

    async fn watch_events(
        &self,
        request: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let operator = auth::operator(&request)?;
        // Subscribed before anything is said: every event after the log line reaches the watcher.
        let events = self.events.subscribe();
        tracing::info!(%operator, "event watcher connected");
        let stream = tokio_stream::wrappers::BroadcastStream::new(events).map(|item| match item {
            Ok(event) => Ok(event),
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Ok(proto::Event {
                    at_unix_nanos: tapgraph::time::unix_nanos(),
                    kind: "lagged".into(),
                    message: format!("{n} events were dropped: this watcher fell behind"),
                    ..Default::default()
                })
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn graph(nodes: usize, edges: usize) -> proto::Graph {
        proto::Graph {
            nodes: (0..nodes)
                .map(|i| proto::GraphNode {
                    id: format!("addr:10.0.{}.{}", i / 256, i % 256),
                    kind: "address".into(),
                    name: format!("10.0.{}.{}", i / 256, i % 256),
                    ..Default::default()
                })
                .collect(),
            edges: (0..edges)
                .map(|i| proto::GraphEdge {
                    from: "host:web".into(),
                    to: format!("addr:10.0.{}.{}", i / 256, i % 256),
                    kind: "CONNECTS_TO".into(),
                    port: 443,
                    process: "x".repeat(i % 100),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn graph_parts_stay_under_the_size_and_add_up_to_the_graph() {
        let whole = graph(5_000, 7_000);
        let max = 16 << 10;
        let parts = graph_parts(whole.clone(), max);
        assert!(parts.len() > 10, "{} parts", parts.len());
        let mut joined = proto::Graph::default();
        for part in &parts {
            assert!(part.encoded_len() <= max, "{}", part.encoded_len());
            assert!(!part.nodes.is_empty() || !part.edges.is_empty());
            joined.nodes.extend(part.nodes.iter().cloned());
            joined.edges.extend(part.edges.iter().cloned());
        }
        assert_eq!(joined, whole);
    }

    #[test]
    fn an_empty_graph_is_one_part_and_a_huge_element_goes_alone() {
        assert_eq!(
            graph_parts(proto::Graph::default(), 1024),
            [proto::Graph::default()]
        );
        let mut g = graph(2, 0);
        g.nodes[0].name = "n".repeat(4096);
        let parts = graph_parts(g.clone(), 1024);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].nodes, g.nodes[..1]);
        assert_eq!(parts[1].nodes, g.nodes[1..]);
    }
}
