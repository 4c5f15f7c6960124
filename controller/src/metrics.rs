//! What the controller's `GET /metrics` shows: a [`Scrape`] of the state, and the tables that
//! write it as OpenMetrics with [`tapgraph::metrics`]. The HTTP module gathers the scrape and
//! answers in the format the scraper asked for (see [`tapgraph::exposition`]).
//!
//! Nothing is counted twice: every scrape asks the owners (the registry task, the topology task,
//! the mirror hub, the Neo4j sink) for what the JSON API shows, and a `prometheus-client`
//! [`Collector`] writes it out. Names follow Prometheus' conventions: base units (`_seconds`,
//! `_bytes`) declared as the family's unit, `_total` on counters (the encoder adds it), and what
//! varies within one family (a reason, a state) in a label. Label values are bounded: agent ids,
//! mirror targets, and fixed lists of reasons and states.

use std::collections::BTreeMap;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use tapgraph::metrics::{
    Field, Histogram, Value, counter, counter_by, encode_histograms, encode_table, gauge, gauge_by,
    one, opt,
};

use crate::mirror::{Mirrors, StatsView};
use crate::registry::{AgentState, AgentView};
use crate::sinks::SinkStats;
use crate::topology;

/// Every agent state, so each shows as a series even when no agent is in it.
const AGENT_STATES: [AgentState; 3] = [
    AgentState::Connected,
    AgentState::Degraded,
    AgentState::Lost,
];
/// `CaptureView::state`'s values.
const CAPTURE_STATES: [&str; 4] = ["disabled", "running", "stopped_breach", "failed"];
/// The delay histogram's `le` bounds: 2^k µs, 64 µs to 16.8 s. Each is one of the hub's own bucket
/// bounds, so the counts are exact, not interpolated.
const DELAY_BOUNDS_LOG2_MICROS: std::ops::RangeInclusive<u32> = 6..=24;

/// What one scrape shows, read from the owners of the state.
#[derive(Debug, Default)]
pub struct Scrape {
    /// The replica answering: `tapgraph_controller_info`'s `replica` label.
    pub replica: String,
    pub agents: Vec<AgentView>,
    /// Messages to agents the registry dropped: their control channel was full.
    pub registry_dropped: crate::registry::Dropped,
    pub mirrors: Vec<StatsView>,
    /// Keyed by (agent, target), like `mirrors`.
    pub delays: BTreeMap<(String, String), Delays>,
    pub topology: topology::Stats,
    /// `None` when no Neo4j sink is configured.
    pub sink: Option<SinkStats>,
    /// The HTTP listener's and the access guard's counters.
    pub http: HttpCounts,
    /// Mirror streams refused: their agent had `session.max_streams` open.
    pub mirror_streams_refused: u64,
    /// Mirror batches dropped whole: their agent had no route to a target.
    pub mirror_batches_no_route: u64,
    /// Enrollments refused by a limit: (per source, `enrollment.rate`).
    pub enrollments_refused: (u64, u64),
    /// Webhook alerts: delivered, failed, suppressed (past `alerts.per_minute`), missed.
    pub alerts: [u64; 4],
    /// With a shared store: the fleet's agents per replica and state (`registry/presence.rs`).
    pub fleet: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// With a shared store: presence (writes, reads) that failed.
    pub presence_errors: Option<(u64, u64)>,
    /// With a shared store: this replica's events the others did not get (failed, lagged).
    pub events_not_relayed: Option<(u64, u64)>,
    /// With `topology.traffic_metrics`: each active edge's traffic; `None` leaves the families
    /// out.
    pub traffic: Option<Vec<TrafficRow>>,
}

/// One edge's traffic for `/metrics`: its ends (a host or address, a service or address).
#[derive(Debug, Clone)]
pub struct TrafficRow {
    pub from: String,
    pub to: String,
    pub traffic: topology::graph::Traffic,
}

/// The rows of the active `CONNECTS_TO` edges that carry traffic; an edge joins one client
/// host (or address) to one service (or address), so a row is a host and service pair.
pub fn traffic_rows(graph: &topology::graph::Graph) -> Vec<TrafficRow> {
    graph
        .edges
        .iter()
        .filter_map(|e| {
            Some(TrafficRow {
                from: e.from.clone(),
                to: e.to.clone(),
                traffic: e.traffic.clone()?,
            })
        })
        .collect()
}

/// Per edge, labelled `from` and `to` (node ids); only with `topology.traffic_metrics`.
const TRAFFIC: &[Field<TrafficRow>] = &[
    counter(
        "tapgraph_edge_sent_bytes",
        "Payload bytes client to server on an edge, counted once (each direction by its sender's agent when measured).",
        |r| one(r.traffic.bytes_sent),
    ),
    counter(
        "tapgraph_edge_received_bytes",
        "Payload bytes server to client on an edge.",
        |r| one(r.traffic.bytes_received),
    ),
    counter(
        "tapgraph_edge_retransmits",
        "TCP segments retransmitted on an edge, by the measured sides.",
        |r| one(r.traffic.retransmits),
    ),
    gauge(
        "tapgraph_edge_rtt_seconds",
        "Smoothed TCP round-trip time of an edge (mean over its measured flows).",
        |r| one(f64::from(r.traffic.srtt_us) / 1e6),
    ),
];

/// One delay histogram: per bucket, (every delay in it is below this many µs, count), ascending,
/// the last bound `None` for "longer"; and the sum of all delays.
#[derive(Debug, Default, Clone)]
pub struct Delays {
    pub buckets: Vec<(Option<u64>, u64)>,
    pub sum_micros: u64,
}

/// The HTTP listener's and the access guard's counters, read at one moment (the listener's
/// `HttpStats::read`).
#[derive(Debug, Default, Clone, Copy)]
pub struct HttpCounts {
    pub open: u64,
    pub limit: u64,
    pub refused_capacity: u64,
    pub refused_per_source: u64,
    pub accept_errors: u64,
    pub header_timeouts: u64,
    pub idle_timeouts: u64,
    pub evicted: u64,
    pub tls_failures: u64,
    pub auth_failures: u64,
    pub auth_limited: u64,
}

impl Scrape {
    /// With what the mirror hub holds now.
    pub fn with_mirrors(mut self, mirrors: &Mirrors) -> Self {
        self.mirrors = mirrors.stats();
        self.mirror_streams_refused = mirrors.streams_refused();
        self.mirror_batches_no_route = mirrors.batches_no_route();
        self.delays = mirrors
            .delays()
            .into_iter()
            .map(|(key, h)| {
                let delays = Delays {
                    buckets: h.buckets,
                    sum_micros: h.sum_micros,
                };
                (key, delays)
            })
            .collect();
        self
    }

    /// The exposition, `# EOF` included.
    pub fn render(self) -> Result<String, fmt::Error> {
        tapgraph::metrics::render(self)
    }
}

// The tables: a metric for a new field is one line in one of them. A family's name is written in
// full; a `_seconds` or `_bytes` ending becomes its declared unit, and counters get `_total` on
// their samples from the encoder.

/// Read once per scrape; no labels but the split's.
const FLEET: &[Field<Scrape>] = &[
    gauge_by(
        "tapgraph_agents",
        "Agents known to the controller, by state (connected, degraded: dropping, stopped by the breach rule or refusing its policy; lost: silent for 3 heartbeats, or its stream gone).",
        "state",
        |s| {
            let mut n: BTreeMap<&'static str, u64> =
                AGENT_STATES.iter().map(|st| (st.name(), 0)).collect();
            for a in &s.agents {
                *n.entry(a.state.name()).or_default() += 1;
            }
            n.into_iter().map(|(st, n)| (st, Value::from(n))).collect()
        },
    ),
    counter_by(
        "tapgraph_registry_dropped_messages",
        "Messages to agents dropped because the agent's control channel was full, by what they were: policy (resent when it reconnects), time_probe (the next comes a heartbeat later), forwarded (a session's resync request), close_status (why its session was closed; it ends anyway).",
        "reason",
        |s| {
            let d = &s.registry_dropped;
            vec![
                ("policy", Value::from(d.policy)),
                ("time_probe", Value::from(d.time_probe)),
                ("forwarded", Value::from(d.forwarded)),
                ("close_status", Value::from(d.close_status)),
            ]
        },
    ),
    counter(
        "tapgraph_topology_snapshots_applied",
        "Connection snapshots applied to the map.",
        |s| one(s.topology.snapshots_applied),
    ),
    counter_by(
        "tapgraph_topology_snapshots_refused",
        "Connection snapshots refused (gap: a delta whose base is not the last one applied; size: too many rows; budget: the fleet's map would pass topology.max_rows; busy: shed, topology.queue was full); the map keeps what it had.",
        "reason",
        |s| {
            vec![
                ("gap", s.topology.snapshots_refused_gap.into()),
                ("size", s.topology.snapshots_refused_size.into()),
                ("budget", s.topology.snapshots_refused_budget.into()),
                ("busy", s.topology.snapshots_shed_busy.into()),
            ]
        },
    ),
    counter_by(
        "tapgraph_topology_rows_skipped",
        "Snapshot rows, listeners and addresses refused and skipped, by reason (malformed: cannot be parsed; address: broadcast, unspecified or multicast where no host has one; port: 0; sockets: more than 65535 in a row; name: longer than 255 bytes).",
        "reason",
        |s| {
            topology::ingest::REASONS
                .iter()
                .map(|r| {
                    let n = s.topology.rows_skipped_by_reason.get(r).copied();
                    (*r, Value::from(n.unwrap_or(0)))
                })
                .collect()
        },
    ),
    gauge(
        "tapgraph_topology_rows",
        "Rows the map holds: every agent's entries, listeners and addresses (topology.max_rows bounds it).",
        |s| one(s.topology.rows),
    ),
    gauge(
        "tapgraph_topology_address_conflicts",
        "Addresses claimed by more than one agent.",
        |s| one(s.topology.address_conflicts),
    ),
    counter(
        "tapgraph_topology_store_errors",
        "Failed writes of the map to the embedded store.",
        |s| one(s.topology.store_errors),
    ),
    counter(
        "tapgraph_topology_history_dropped_changes",
        "Changes of the map's history (appearances, goings, traffic sums) dropped: the store refused them until more than 100,000 waited; the oldest went first.",
        |s| one(s.topology.history_dropped),
    ),
    counter(
        "tapgraph_topology_remote_tables_applied",
        "Agents' tables other replicas wrote, applied to this replica's map (0 with the embedded store).",
        |s| one(s.topology.remote_tables_applied),
    ),
    gauge(
        "tapgraph_neo4j_lag_seconds",
        "Seconds since the Neo4j database last equalled the map (0 when it does now). Only with a sink configured.",
        |s| opt(s.sink.as_ref().map(|k| k.lag_seconds)),
    ),
    gauge(
        "tapgraph_neo4j_delay_seconds",
        "How long, at most, a change to the map waited for Neo4j in the last pass that wrote changes. Only with a sink configured.",
        |s| opt(s.sink.as_ref().map(|k| k.delay_seconds)),
    ),
    gauge_by(
        "tapgraph_neo4j_state",
        "The Neo4j sink's state: 1 for the current one.",
        "state",
        |s| match &s.sink {
            Some(k) => [
                "connecting",
                "in_sync",
                "writing",
                "unreachable",
                "auth_failed",
                "failing",
                "standby",
            ]
            .into_iter()
            .map(|st| (st, Value::from(u64::from(k.state == st))))
            .collect(),
            None => Vec::new(),
        },
    ),
    counter(
        "tapgraph_neo4j_transactions",
        "Write transactions committed to Neo4j.",
        |s| opt(s.sink.as_ref().map(|k| k.transactions)),
    ),
    counter(
        "tapgraph_neo4j_rows_written",
        "Nodes and relationships created or updated in Neo4j.",
        |s| opt(s.sink.as_ref().map(|k| k.rows_written)),
    ),
    counter(
        "tapgraph_neo4j_rows_deleted",
        "Nodes and relationships deleted from Neo4j.",
        |s| opt(s.sink.as_ref().map(|k| k.rows_deleted)),
    ),
    counter("tapgraph_neo4j_errors", "Failed Neo4j passes.", |s| {
        opt(s.sink.as_ref().map(|k| k.errors))
    }),
    counter(
        "tapgraph_neo4j_reconciliations",
        "Full reads of what Neo4j holds (at start, after failures, every 10 minutes).",
        |s| opt(s.sink.as_ref().map(|k| k.reconciliations)),
    ),
    counter(
        "tapgraph_neo4j_write_seconds",
        "Time spent in Neo4j write transactions.",
        |s| opt(s.sink.as_ref().map(|k| k.write_seconds)),
    ),
    gauge(
        "tapgraph_neo4j_nodes",
        "Nodes the sink holds in Neo4j.",
        |s| opt(s.sink.as_ref().map(|k| k.nodes)),
    ),
    gauge(
        "tapgraph_neo4j_relationships",
        "Relationships the sink holds in Neo4j.",
        |s| opt(s.sink.as_ref().map(|k| k.relationships)),
    ),
    gauge_by(
        "tapgraph_leader",
        "1 where this replica runs the task that one replica runs at a time, by role: neo4j_sink (only with a sink configured), topology_cleanup (removes expired edges from the store). Always 1 with the embedded store.",
        "role",
        |s| {
            let mut roles = vec![(
                "topology_cleanup",
                Value::from(u64::from(s.topology.leader)),
            )];
            if let Some(k) = &s.sink {
                roles.insert(0, ("neo4j_sink", Value::from(u64::from(k.leader))));
            }
            roles
        },
    ),
    gauge(
        "tapgraph_http_connections",
        "Open HTTP connections (console, API, probes, scrapes).",
        |s| one(s.http.open),
    ),
    gauge(
        "tapgraph_http_connection_limit",
        "HTTP connections allowed at once (http.max_connections, or derived from the descriptor limit).",
        |s| one(s.http.limit),
    ),
    counter_by(
        "tapgraph_http_refused_connections",
        "HTTP connections closed at once (capacity: http.max_connections reached; per_source: http.max_connections_per_source reached; accept_error: accept failed, e.g. no descriptor left).",
        "reason",
        |s| {
            vec![
                ("capacity", Value::from(s.http.refused_capacity)),
                ("per_source", Value::from(s.http.refused_per_source)),
                ("accept_error", Value::from(s.http.accept_errors)),
            ]
        },
    ),
    counter_by(
        "tapgraph_http_closed_connections",
        "HTTP connections closed by the server (header_timeout: no whole request head or TLS handshake within http.header_read_timeout; idle_timeout: nothing moved for http.idle_timeout; evicted: at capacity, closed before sending a whole request head to make room for a newer connection; tls_handshake: the handshake failed).",
        "reason",
        |s| {
            vec![
                ("header_timeout", Value::from(s.http.header_timeouts)),
                ("idle_timeout", Value::from(s.http.idle_timeouts)),
                ("evicted", Value::from(s.http.evicted)),
                ("tls_handshake", Value::from(s.http.tls_failures)),
            ]
        },
    ),
    counter(
        "tapgraph_http_auth_failures",
        "Requests that presented a wrong, expired or malformed console or /metrics token.",
        |s| one(s.http.auth_failures),
    ),
    counter(
        "tapgraph_http_auth_limited_requests",
        "Requests answered 429: their source presented more than http.auth_failures_per_minute bad tokens.",
        |s| one(s.http.auth_limited),
    ),
    counter_by(
        "tapgraph_mirror_streams_refused",
        "Mirror streams refused with RESOURCE_EXHAUSTED (limit: the agent had session.max_streams open).",
        "reason",
        |s| vec![("limit", Value::from(s.mirror_streams_refused))],
    ),
    counter_by(
        "tapgraph_mirror_dropped_batches",
        "Mirror batches dropped whole before reaching a target (no_route: the registry does not know the agent, or its policy does not parse into a target).",
        "reason",
        |s| vec![("no_route", Value::from(s.mirror_batches_no_route))],
    ),
    counter_by(
        "tapgraph_enrollments_refused",
        "Enrollments refused with RESOURCE_EXHAUSTED before their token was checked: the source used up its failed attempts (per_source), or enrollment.rate (rate).",
        "reason",
        |s| {
            vec![
                ("per_source", Value::from(s.enrollments_refused.0)),
                ("rate", Value::from(s.enrollments_refused.1)),
            ]
        },
    ),
    counter_by(
        "tapgraph_alerts",
        "Webhook alerts on the map's changes ([alerts]), by outcome: delivered, failed (refused by the receiver, or still failing after alerts.retries), suppressed (past alerts.per_minute; the next delivery counts them), missed (changes not looked at: the alerts fell behind the events).",
        "outcome",
        |s| {
            ["delivered", "failed", "suppressed", "missed"]
                .into_iter()
                .zip(s.alerts)
                .map(|(k, v)| (k, Value::from(v)))
                .collect()
        },
    ),
    counter_by(
        "tapgraph_presence_errors",
        "Writes of this replica's lease and agents' presence (write: retried the next second; its sessions go on) and reads of the other replicas' agents (read: the query answered with them as last read) that failed. Only with a shared store.",
        "operation",
        |s| match s.presence_errors {
            Some((write, read)) => vec![("write", write.into()), ("read", read.into())],
            None => Vec::new(),
        },
    ),
    counter_by(
        "tapgraph_events_not_relayed",
        "Events of this replica the other replicas did not get: the database was down or the send failed (failed), or the relay fell behind this replica's events (lagged). Events are not stored; these are lost to the others. Only with a shared store.",
        "reason",
        |s| match s.events_not_relayed {
            Some((failed, lagged)) => vec![("failed", failed.into()), ("lagged", lagged.into())],
            None => Vec::new(),
        },
    ),
];

/// Per replica (the one holding, or last holding, each agent's session); only with a shared store.
const FLEET_AGENTS: &[Field<BTreeMap<&'static str, u64>>] = &[gauge_by(
    "tapgraph_fleet_agents",
    "Agents of the whole fleet, by the replica holding (or last holding) their session and state, as every replica sees them; a replica whose lease ran out shows its agents lost. Only with a shared store.",
    "state",
    |counts| {
        counts
            .iter()
            .map(|(st, n)| (*st, Value::from(*n)))
            .collect()
    },
)];

/// Per agent, label `agent`. Capture counters are the agent's own, as its last control record
/// reported them (cumulative since the agent started).
const AGENT: &[Field<AgentView>] = &[
    gauge_by(
        "tapgraph_agent_state",
        "The agent's state: 1 for the current one.",
        "state",
        |a| {
            AGENT_STATES
                .iter()
                .map(|st| (st.name(), Value::from(u64::from(a.state == *st))))
                .collect()
        },
    ),
    counter(
        "tapgraph_agent_sessions",
        "Sessions the agent has opened since the controller started.",
        |a| one(a.sessions),
    ),
    gauge(
        "tapgraph_agent_last_seen_timestamp_seconds",
        "When the controller last heard from the agent, in Unix time.",
        |a| one(a.last_seen_unix_ms as f64 / 1e3),
    ),
    gauge(
        "tapgraph_agent_heartbeat_interval_seconds",
        "The heartbeat (control record) interval of the agent's policy.",
        |a| one(a.heartbeat_ms as f64 / 1e3),
    ),
    counter(
        "tapgraph_agent_control_records",
        "Control records (heartbeats) received from the agent since the controller started.",
        |a| one(a.control_records),
    ),
    gauge(
        "tapgraph_agent_clock_offset_seconds",
        "The agent's clock minus the controller's, estimated from time probes (absent until measured).",
        |a| opt(a.clock_offset_ms.map(|ms| ms / 1e3)),
    ),
    gauge(
        "tapgraph_agent_probe_round_trip_seconds",
        "Round trip of the time probe the clock offset comes from.",
        |a| opt(a.probe_rtt_ms.map(|ms| ms / 1e3)),
    ),
    gauge(
        "tapgraph_agent_policy_version_sent",
        "Version of the policy last sent to the agent.",
        |a| one(a.policy_version_sent),
    ),
    gauge(
        "tapgraph_agent_policy_version_applied",
        "Version of the policy the agent reports applied.",
        |a| one(a.policy_version_applied),
    ),
    gauge(
        "tapgraph_agent_snapshot_entries",
        "Rows in the agent's connection table, as it last reported.",
        |a| one(a.snapshot_entries),
    ),
    counter(
        "tapgraph_agent_captured_packets",
        "Packets the agent captured, as it reported.",
        |a| one(a.capture.packets_captured),
    ),
    counter(
        "tapgraph_agent_captured_bytes",
        "Bytes the agent captured, as it reported.",
        |a| one(a.capture.bytes_captured),
    ),
    counter(
        "tapgraph_agent_sent_packets",
        "Packets the agent sent on its mirror stream, as it reported.",
        |a| one(a.capture.packets_sent),
    ),
    counter(
        "tapgraph_agent_sent_bytes",
        "Bytes the agent sent on its mirror stream, as it reported.",
        |a| one(a.capture.bytes_sent),
    ),
    counter_by(
        "tapgraph_agent_dropped_packets",
        "Packets the agent dropped, as it reported, by stage: kernel (the capture ring overflowed), limiter (over the speed limit), queue (the mirror stream fell behind).",
        "reason",
        |a| {
            let c = &a.capture;
            vec![
                ("kernel", c.packets_dropped_kernel.into()),
                ("limiter", c.packets_dropped_limiter.into()),
                ("queue", c.packets_dropped_queue.into()),
            ]
        },
    ),
    gauge(
        "tapgraph_agent_in_flight_packets",
        "Packets captured but neither sent nor dropped yet, as the agent reported.",
        |a| one(a.capture.packets_in_flight),
    ),
    gauge_by(
        "tapgraph_agent_capture_state",
        "The agent's capture state: 1 for the current one.",
        "state",
        |a| {
            CAPTURE_STATES
                .iter()
                .map(|st| (*st, Value::from(u64::from(a.capture.state == *st))))
                .collect()
        },
    ),
];

/// Per agent and mirror target, labels `agent` and `target`: what the controller received and did.
const MIRROR: &[Field<StatsView>] = &[
    counter("tapgraph_mirror_batches", "Mirror batches received.", |m| {
        one(m.batches)
    }),
    counter(
        "tapgraph_mirror_lost_batches",
        "Mirror batches the agent numbered that never arrived.",
        |m| one(m.batches_lost),
    ),
    counter(
        "tapgraph_mirror_lost_packets",
        "Packets the agent counted as sent (in-band, in its batches) that never arrived.",
        |m| one(m.lost_in_transit),
    ),
    counter(
        "tapgraph_mirror_received_packets",
        "Mirrored packets received.",
        |m| one(m.packets_received),
    ),
    counter(
        "tapgraph_mirror_received_bytes",
        "Mirrored bytes received.",
        |m| one(m.bytes_received),
    ),
    counter(
        "tapgraph_mirror_written_packets",
        "Mirrored packets written to the target.",
        |m| one(m.packets_written),
    ),
    counter(
        "tapgraph_mirror_written_bytes",
        "Mirrored bytes written to the target.",
        |m| one(m.bytes_written),
    ),
    counter_by(
        "tapgraph_mirror_dropped_packets",
        "Mirrored packets dropped at the controller, by reason: invalid (malformed), target_unavailable (the target could not be opened), queue (the writer fell behind), oversize (larger than the target's MTU), failed (the write failed), duplicate (a copy of a packet another agent sent the target first; the policy's dedup).",
        "reason",
        |m| {
            m.dropped
                .iter()
                .map(|(reason, n)| (*reason, Value::from(*n)))
                .collect()
        },
    ),
    counter(
        "tapgraph_mirror_dedup_evicted_packets",
        "Packets the target's dedup table forgot before their hold (1 s) to make room for this agent's: a copy of one arriving later is delivered again.",
        |m| one(m.dedup_evicted),
    ),
    counter_by(
        "tapgraph_mirror_invalid_batches",
        "Mirror batches whose header was not believed, by field: sequence (a replay or a jump of more than 1024; the batch is dropped, its packets counted as dropped for reason invalid), time (sent_at or a capture time implausibly old or ahead; delivered, its delay not observed), counters (in-band counters claiming more loss than the lost batches held; delivered, the loss not counted).",
        "field",
        |m| {
            m.invalid_batches
                .iter()
                .map(|(field, n)| (*field, Value::from(*n)))
                .collect()
        },
    ),
];

const DELAY_NAME: &str = "tapgraph_mirror_delay_seconds";
const DELAY_HELP: &str = "Capture (on the agent's clock, corrected by its offset) to write at the target, per mirrored packet.";

const INFO_NAME: &str = "tapgraph_controller";
const INFO_HELP: &str = "The controller that answered this scrape: its replica name (the replica setting) and its version. Always 1.";

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let info = vec![
            ("replica", self.replica.as_str()),
            ("version", tapgraph::VERSION),
        ];
        encoder
            .encode_descriptor(INFO_NAME, INFO_HELP, None, MetricType::Info)?
            .encode_info(&info)?;
        encode_table(&mut encoder, FLEET, [(Vec::new(), self)])?;
        let fleet = self
            .fleet
            .iter()
            .map(|(replica, counts)| (vec![("replica", replica.as_str())], counts));
        encode_table(&mut encoder, FLEET_AGENTS, fleet)?;
        let agents = self
            .agents
            .iter()
            .map(|a| (vec![("agent", a.id.as_str())], a));
        encode_table(&mut encoder, AGENT, agents)?;
        let mirrors = self.mirrors.iter().map(|m| {
            let labels = vec![("agent", m.agent.as_str()), ("target", m.target.as_str())];
            (labels, m)
        });
        encode_table(&mut encoder, MIRROR, mirrors)?;
        if let Some(traffic) = &self.traffic {
            let rows = traffic
                .iter()
                .map(|r| (vec![("from", r.from.as_str()), ("to", r.to.as_str())], r));
            encode_table(&mut encoder, TRAFFIC, rows)?;
        }
        self.encode_delays(&mut encoder)
    }
}

impl Scrape {
    fn encode_delays(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let bounds: Vec<u64> = DELAY_BOUNDS_LOG2_MICROS.map(|k| 1u64 << k).collect();
        let series = self.delays.iter().map(|((agent, target), delays)| {
            // Per `le` bound, then +Inf: the hub's buckets whose every delay is below that bound
            // and not below the one before (the encoder accumulates).
            let mut counts = vec![0u64; bounds.len() + 1];
            for (below, n) in &delays.buckets {
                let slot = below
                    .and_then(|b| bounds.iter().position(|le| b <= *le))
                    .unwrap_or(bounds.len());
                counts[slot] += n;
            }
            let buckets = bounds
                .iter()
                .map(|le| *le as f64 / 1e6)
                .chain([f64::INFINITY])
                .zip(counts)
                .collect();
            let labels = vec![("agent", agent.as_str()), ("target", target.as_str())];
            let histogram = Histogram {
                buckets,
                sum: delays.sum_micros as f64 / 1e6,
            };
            (labels, histogram)
        });
        encode_histograms(encoder, DELAY_NAME, DELAY_HELP, series)
    }
}

/// The strict OpenMetrics reader the agent's tests use too.
#[cfg(test)]
#[path = "../../tests/support/openmetrics.rs"]
mod openmetrics;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tapgraph::policy::Target;
    use tapgraph::proto::{self, agent_message::Msg};

    use super::openmetrics::{self, Family};
    use super::*;
    use crate::registry::Registry;

    fn family<'a>(families: &'a [Family], name: &str) -> &'a Family {
        families
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no family {name}"))
    }

    #[test]
    fn names_are_stable_and_parse() {
        let text = Scrape::default().render().unwrap();
        let families = openmetrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let names: Vec<&str> = families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names, EXPECTED,
            "renaming a metric breaks dashboards: on purpose?"
        );
    }

    /// Which replica runs the tasks one replica runs at a time: a sample per role, the sink's
    /// only with a sink configured.
    #[test]
    fn leadership_is_shown_by_role() {
        let mut scrape = Scrape::default();
        scrape.topology.leader = true;
        let text = scrape.render().unwrap();
        assert!(
            text.contains("tapgraph_leader{role=\"topology_cleanup\"} 1"),
            "{text}"
        );
        assert!(!text.contains("role=\"neo4j_sink\""), "{text}");
        let scrape = Scrape {
            sink: Some(SinkStats {
                state: "standby".into(),
                ..Default::default()
            }),
            ..Scrape::default()
        };
        let text = scrape.render().unwrap();
        assert!(
            text.contains("tapgraph_leader{role=\"neo4j_sink\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tapgraph_neo4j_state{state=\"standby\"} 1"),
            "{text}"
        );
    }

    /// A snapshot the topology shed because its queue was full is a refusal for the reason "busy".
    #[test]
    fn shed_snapshots_are_refusals_for_the_reason_busy() {
        let mut scrape = Scrape::default();
        scrape.topology.snapshots_shed_busy = 1;
        let text = scrape.render().unwrap();
        assert!(
            text.contains("tapgraph_topology_snapshots_refused_total{reason=\"busy\"} 1"),
            "{text}"
        );
    }

    /// Off by default: no traffic family at all. On: one series per edge, by its two ends.
    #[test]
    fn edge_traffic_is_shown_per_pair_only_when_asked() {
        assert!(
            !Scrape::default()
                .render()
                .unwrap()
                .contains("tapgraph_edge_")
        );
        let traffic = topology::graph::Traffic {
            bytes_sent: 1_234_567,
            bytes_received: 89_012,
            segments_sent: 10,
            segments_received: 9,
            retransmits: 3,
            srtt_us: 10_500,
            min_rtt_us: 10_100,
            sent_per_second: 0,
            received_per_second: 0,
            closed: 0,
            measured_by: topology::graph::MeasuredBy::Both,
        };
        let scrape = Scrape {
            traffic: Some(vec![TrafficRow {
                from: "host:web".into(),
                to: "svc:db/tcp/5432".into(),
                traffic,
            }]),
            ..Scrape::default()
        };
        let text = scrape.render().unwrap();
        let families = openmetrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let pair = [("from", "host:web"), ("to", "svc:db/tcp/5432")];
        let value = |family_name: &str, sample: &str| {
            family(&families, family_name).value(sample, &pair).unwrap()
        };
        assert_eq!(
            value("tapgraph_edge_sent_bytes", "tapgraph_edge_sent_bytes_total"),
            1_234_567.0
        );
        assert_eq!(
            value(
                "tapgraph_edge_received_bytes",
                "tapgraph_edge_received_bytes_total"
            ),
            89_012.0
        );
        assert_eq!(
            value(
                "tapgraph_edge_retransmits",
                "tapgraph_edge_retransmits_total"
            ),
            3.0
        );
        assert_eq!(
            value("tapgraph_edge_rtt_seconds", "tapgraph_edge_rtt_seconds"),
            0.0105
        );
    }

    /// One agent with a control record, one mirrored packet written to a pcapng file whose name
    /// needs escaping, a Neo4j sink: the numbers come out where an operator looks for them.
    #[tokio::test]
    async fn a_scrape_shows_what_the_owners_hold() {
        let health = crate::health::Health::default();
        let (registry, task) =
            Registry::spawn("ctl-1", crate::events::Events::new(16), health.clone(), 10);
        tokio::spawn(task);
        let (outbound, _pushed) = tokio::sync::mpsc::channel(16);
        let hello = proto::Hello {
            hostname: "web-1".into(),
            ..Default::default()
        };
        let addr = "127.0.0.1:40000".parse().unwrap();
        let registered = registry
            .register("web-1".into(), hello, BTreeMap::new(), addr, outbound)
            .await
            .unwrap();
        let record = proto::ControlRecord {
            sequence: 1,
            counters: Some(proto::Counters {
                packets_captured: 10,
                bytes_captured: 1000,
                packets_sent: 4,
                bytes_sent: 400,
                packets_dropped_kernel: 1,
                packets_dropped_limiter: 2,
                packets_dropped_queue: 3,
                ..Default::default()
            }),
            capture_state: proto::CaptureState::Running as i32,
            snapshot_entries: 42,
            ..Default::default()
        };
        registry
            .message("web-1", registered.session, Msg::Control(record))
            .await;

        let dir = tempfile::tempdir().unwrap();
        let mirrors = Mirrors::new(dir.path().to_path_buf(), health);
        let target = Target::Pcap {
            path: "odd \"name\" \\ here.pcapng".into(),
            rotate_bytes: 0,
            rotate_interval: Duration::ZERO,
        };
        let attachment = mirrors.attach("web-1", "web-1", &target, true).await;
        assert!(
            attachment.unavailable.is_none(),
            "{:?}",
            attachment.unavailable
        );
        let frame = [[0xffu8; 12].as_slice(), &[0x08, 0x00], &[0u8; 46]].concat();
        attachment.submit(
            proto::MirrorBatch {
                sequence: 1,
                packets: vec![proto::Packet {
                    timestamp_unix_nanos: tapgraph::time::unix_nanos() - 40_000_000,
                    original_length: frame.len() as u32,
                    data: frame.into(),
                }],
                linktype: 1,
                interface: "eth0".into(),
                snaplen: 65535,
                ..Default::default()
            },
            true,
        );
        for _ in 0..500 {
            if mirrors.stats().iter().any(|m| m.packets_written == 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let scrape = Scrape {
            replica: registry.replica().to_string(),
            agents: registry.list().await,
            sink: Some(SinkStats {
                state: "in_sync".into(),
                lag_seconds: 1.5,
                delay_seconds: 2.25,
                nodes: 3,
                ..Default::default()
            }),
            ..Scrape::default()
        }
        .with_mirrors(&mirrors);
        let text = scrape.render().unwrap();
        let families = openmetrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let get = |name: &str, sample: &str, labels: &[(&str, &str)]| {
            family(&families, name)
                .value(sample, labels)
                .unwrap_or_else(|| panic!("no {sample} {labels:?} in\n{text}"))
        };

        let agents: f64 = family(&families, "tapgraph_agents")
            .samples
            .iter()
            .map(|s| s.value)
            .sum();
        assert_eq!(agents, 1.0);
        let controller = [("replica", "ctl-1"), ("version", tapgraph::VERSION)];
        assert_eq!(get(INFO_NAME, "tapgraph_controller_info", &controller), 1.0);
        let web = ("agent", "web-1");
        let states = &family(&families, "tapgraph_agent_state").samples;
        assert_eq!(states.len(), AGENT_STATES.len());
        assert_eq!(states.iter().map(|s| s.value).sum::<f64>(), 1.0);
        for (reason, n) in [("kernel", 1.0), ("limiter", 2.0), ("queue", 3.0)] {
            let labels = [web, ("reason", reason)];
            assert_eq!(
                get(
                    "tapgraph_agent_dropped_packets",
                    "tapgraph_agent_dropped_packets_total",
                    &labels
                ),
                n
            );
        }
        assert_eq!(
            get(
                "tapgraph_agent_captured_bytes",
                "tapgraph_agent_captured_bytes_total",
                &[web]
            ),
            1000.0
        );
        assert_eq!(
            get(
                "tapgraph_agent_snapshot_entries",
                "tapgraph_agent_snapshot_entries",
                &[web]
            ),
            42.0
        );
        assert_eq!(
            get(
                "tapgraph_agent_capture_state",
                "tapgraph_agent_capture_state",
                &[web, ("state", "running")]
            ),
            1.0
        );
        assert_eq!(
            get(
                "tapgraph_agent_capture_state",
                "tapgraph_agent_capture_state",
                &[web, ("state", "failed")]
            ),
            0.0
        );

        // The label value comes back byte for byte after the reader unescapes it.
        let at = [web, ("target", "pcap:odd \"name\" \\ here.pcapng")];
        assert_eq!(
            get(
                "tapgraph_mirror_received_packets",
                "tapgraph_mirror_received_packets_total",
                &at
            ),
            1.0
        );
        assert_eq!(
            get(
                "tapgraph_mirror_written_bytes",
                "tapgraph_mirror_written_bytes_total",
                &at
            ),
            60.0
        );
        let dropped = family(&families, "tapgraph_mirror_dropped_packets");
        let reasons: Vec<&str> = dropped
            .samples
            .iter()
            .map(|s| s.labels["reason"].as_str())
            .collect();
        for reason in [
            "queue",
            "oversize",
            "failed",
            "invalid",
            "target_unavailable",
            "duplicate",
        ] {
            assert!(reasons.contains(&reason), "{reasons:?}");
        }
        let delay = "tapgraph_mirror_delay_seconds";
        assert_eq!(get(delay, "tapgraph_mirror_delay_seconds_count", &at), 1.0);
        assert!(get(delay, "tapgraph_mirror_delay_seconds_sum", &at) >= 0.04);
        let bucket = |le: &str| {
            get(
                delay,
                "tapgraph_mirror_delay_seconds_bucket",
                &[at[0], at[1], ("le", le)],
            )
        };
        assert_eq!(bucket("0.032768"), 0.0, "{text}");
        assert_eq!(bucket("+Inf"), 1.0);

        assert_eq!(
            get(
                "tapgraph_neo4j_lag_seconds",
                "tapgraph_neo4j_lag_seconds",
                &[]
            ),
            1.5
        );
        assert_eq!(
            get(
                "tapgraph_neo4j_delay_seconds",
                "tapgraph_neo4j_delay_seconds",
                &[]
            ),
            2.25
        );
        assert_eq!(
            get(
                "tapgraph_neo4j_state",
                "tapgraph_neo4j_state",
                &[("state", "in_sync")]
            ),
            1.0
        );
    }

    #[test]
    fn without_a_sink_its_families_stay_but_hold_nothing() {
        let text = Scrape::default().render().unwrap();
        let families = openmetrics::parse(&text).unwrap();
        assert!(
            family(&families, "tapgraph_neo4j_lag_seconds")
                .samples
                .is_empty()
        );
        assert_eq!(
            family(&families, "tapgraph_agents").value("tapgraph_agents", &[("state", "lost")]),
            Some(0.0)
        );
    }

    const EXPECTED: &[&str] = &[
        "tapgraph_controller",
        "tapgraph_agents",
        "tapgraph_registry_dropped_messages",
        "tapgraph_topology_snapshots_applied",
        "tapgraph_topology_snapshots_refused",
        "tapgraph_topology_rows_skipped",
        "tapgraph_topology_rows",
        "tapgraph_topology_address_conflicts",
        "tapgraph_topology_store_errors",
        "tapgraph_topology_history_dropped_changes",
        "tapgraph_topology_remote_tables_applied",
        "tapgraph_neo4j_lag_seconds",
        "tapgraph_neo4j_delay_seconds",
        "tapgraph_neo4j_state",
        "tapgraph_neo4j_transactions",
        "tapgraph_neo4j_rows_written",
        "tapgraph_neo4j_rows_deleted",
        "tapgraph_neo4j_errors",
        "tapgraph_neo4j_reconciliations",
        "tapgraph_neo4j_write_seconds",
        "tapgraph_neo4j_nodes",
        "tapgraph_neo4j_relationships",
        "tapgraph_leader",
        "tapgraph_http_connections",
        "tapgraph_http_connection_limit",
        "tapgraph_http_refused_connections",
        "tapgraph_http_closed_connections",
        "tapgraph_http_auth_failures",
        "tapgraph_http_auth_limited_requests",
        "tapgraph_mirror_streams_refused",
        "tapgraph_mirror_dropped_batches",
        "tapgraph_enrollments_refused",
        "tapgraph_alerts",
        "tapgraph_presence_errors",
        "tapgraph_events_not_relayed",
        "tapgraph_fleet_agents",
        "tapgraph_agent_state",
        "tapgraph_agent_sessions",
        "tapgraph_agent_last_seen_timestamp_seconds",
        "tapgraph_agent_heartbeat_interval_seconds",
        "tapgraph_agent_control_records",
        "tapgraph_agent_clock_offset_seconds",
        "tapgraph_agent_probe_round_trip_seconds",
        "tapgraph_agent_policy_version_sent",
        "tapgraph_agent_policy_version_applied",
        "tapgraph_agent_snapshot_entries",
        "tapgraph_agent_captured_packets",
        "tapgraph_agent_captured_bytes",
        "tapgraph_agent_sent_packets",
        "tapgraph_agent_sent_bytes",
        "tapgraph_agent_dropped_packets",
        "tapgraph_agent_in_flight_packets",
        "tapgraph_agent_capture_state",
        "tapgraph_mirror_batches",
        "tapgraph_mirror_lost_batches",
        "tapgraph_mirror_lost_packets",
        "tapgraph_mirror_received_packets",
        "tapgraph_mirror_received_bytes",
        "tapgraph_mirror_written_packets",
        "tapgraph_mirror_written_bytes",
        "tapgraph_mirror_dropped_packets",
        "tapgraph_mirror_dedup_evicted_packets",
        "tapgraph_mirror_invalid_batches",
        "tapgraph_mirror_delay_seconds",
    ];
}
