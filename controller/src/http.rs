//! Plain HTTP for probes, the web console, the read-only API and Prometheus: `/healthz`, `/readyz`,
//! `/metrics` (see [`scrape`]); `/` (the console, see [`console`]); `/api/v1/agents`, `/api/v1/graph`,
//! `/api/v1/graph/export`, `/api/v1/history`, `/api/v1/policies`, `/api/v1/topology/stats`, `/api/v1/mirror` and
//! `/api/v1/events` (server-sent events the console follows). How connections are accepted and
//! bounded: [`listener`].

pub mod console;
mod listener;
mod scrape;

pub use listener::{HttpSettings, HttpStats};

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use futures::Stream;
use serde::Deserialize;
use serde_json::json;
use tapgraph::policy::PolicySpec;
use tokio_util::sync::CancellationToken;

use crate::enrollment::Enrollment;
use crate::events::Events;
use crate::policies::Policies;
use crate::registry::Registry;
use crate::topology::{GraphQuery, Naming, Topology};

#[derive(Clone)]
pub struct HttpState {
    pub registry: Registry,
    pub topology: Topology,
    pub enrollment: Enrollment,
    pub naming: Naming,
    pub policies: Policies,
    pub events: Events,
    /// Set once the gRPC listener is bound and state is loaded.
    pub ready: Arc<AtomicBool>,
    /// The state store: not ready while the shared database is unavailable.
    pub store: crate::store::Store,
    /// The Neo4j sink, when one is configured.
    pub sink: Option<crate::sinks::SinkHandle>,
    pub mirrors: crate::mirror::Mirrors,
    pub access: console::Access,
    /// What the listener and the access guard counted.
    pub http_stats: Arc<HttpStats>,
    /// What the webhook alerts did.
    pub alert_stats: Arc<crate::alerts::AlertStats>,
    /// Ends the event streams at shutdown, which would otherwise hold it up.
    pub stop: CancellationToken,
    /// `/metrics` shows edges' traffic (`topology.traffic_metrics`).
    pub traffic_metrics: bool,
}

/// Serves the router on `listener` until `stop`; see [`listener`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    settings: &HttpSettings,
    stop: CancellationToken,
) {
    let stats = state.http_stats.clone();
    listener::serve(listener, router(state), settings, stats, stop).await;
}

pub use listener::tls_config;

pub fn router(state: HttpState) -> Router {
    let access = state.access.clone();
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/graph", get(graph))
        .route("/api/v1/graph/export", get(graph_export))
        .route("/api/v1/history", get(history))
        .route("/api/v1/policies", get(policies))
        .route("/api/v1/topology/stats", get(topology_stats))
        .route("/api/v1/mirror", get(mirror_stats))
        .route("/api/v1/events", get(events))
        .route("/metrics", get(scrape::serve))
        .fallback(console::asset)
        .layer(axum::middleware::from_fn_with_state(access, console::guard))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if !state.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_string());
    }
    match state.store.unavailable() {
        // Live sessions and mirrors go on, but enrollments and changes are refused: a load
        // balancer should send new work elsewhere.
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the database {} is unavailable: {reason}\n",
                state.store.database().unwrap_or("?")
            ),
        ),
        None => (StatusCode::OK, "ready\n".to_string()),
    }
}

async fn agents(State(state): State<HttpState>) -> impl IntoResponse {
    Json(state.registry.list().await)
}

#[derive(Deserialize, Default)]
struct GraphParams {
    /// Include edges not seen within the TTL.
    #[serde(default)]
    inactive: bool,
    /// Include the agents' own connections to the controller (exports leave them out unless asked).
    control: Option<bool>,
    format: Option<String>,
}

/// The decorated map in its wire form, which the JSON and the exports are made from
/// (`tapgraph::graph`, shared with `tapgraphctl`).
async fn decorated(
    state: &HttpState,
    include_control: bool,
    include_inactive: bool,
) -> tapgraph::proto::Graph {
    let map = crate::topology::view::map(
        &state.topology,
        &state.enrollment,
        &state.naming,
        GraphQuery {
            include_control,
            include_inactive,
        },
    )
    .await;
    tapgraph::proto::Graph::from(&map)
}

/// The decorated map with the control plane (the console hides it by default), and the
/// generation it was read at.
async fn graph(State(state): State<HttpState>, Query(p): Query<GraphParams>) -> impl IntoResponse {
    // Read before the graph: a change while it is built bumps it again and the console refetches.
    let generation = state.topology.generation();
    let g = decorated(&state, p.control.unwrap_or(true), p.inactive).await;
    let mut v = tapgraph::graph::to_json(&g);
    v["generation"] = json!(generation);
    Json(v)
}

/// What changed on the map (see `topology::history`), for the console's time slider and its
/// changes view: `{horizon, now, changes: [{at, kind, appeared, first, id, from, to, port,
/// protocol, process, via, agent, hostname, ip, interval_ms, bytes_sent, bytes_received}]}`,
/// times in Unix ms, oldest first; kind `traffic` is an edge's bytes over an interval.
async fn history(State(state): State<HttpState>) -> Response {
    let now = tapgraph::time::unix_nanos() / 1_000_000;
    match state.topology.history(now).await {
        Ok((changes, horizon)) => {
            let changes: Vec<_> = changes
                .iter()
                .map(|c| {
                    let c = tapgraph::proto::HistoryChange::from(c);
                    let e = c.edge.clone().unwrap_or_default();
                    json!({
                        "at": c.at_unix_nanos / 1_000_000,
                        "kind": c.kind,
                        "appeared": c.appeared,
                        "first": c.first,
                        "id": c.id,
                        "from": e.from,
                        "to": e.to,
                        "port": e.port,
                        "protocol": tapgraph::graph::protocol_name(e.protocol),
                        "process": e.process,
                        "via": e.via,
                        "agent": c.agent_id,
                        "hostname": c.hostname,
                        "ip": c.ip,
                        "interval_ms": c.interval_ms,
                        "bytes_sent": c.bytes_sent,
                        "bytes_received": c.bytes_received,
                    })
                })
                .collect();
            Json(json!({ "horizon": horizon, "now": now, "changes": changes })).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": format!("the map's history: {e}") })),
        )
            .into_response(),
    }
}

/// The whole map as a download: `format=json|graphml|dot`.
async fn graph_export(State(state): State<HttpState>, Query(p): Query<GraphParams>) -> Response {
    let format = match tapgraph::graph::Format::parse(p.format.as_deref().unwrap_or("json")) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({ "error": e }))).into_response(),
    };
    let g = decorated(&state, p.control.unwrap_or(false), p.inactive).await;
    let (extension, media) = format.file();
    (
        [
            (header::CONTENT_TYPE, media.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"tapgraph-map.{extension}\""),
            ),
        ],
        tapgraph::graph::export(&g, format),
    )
        .into_response()
}

/// Policies with their selectors and settings, and the rollout: which agent runs which version.
async fn policies(State(state): State<HttpState>) -> impl IntoResponse {
    let policies: Vec<_> = state
        .policies
        .list()
        .await
        .into_iter()
        .map(|p| {
            let spec = PolicySpec::from_proto(&p.spec.0)
                .map(|s| s.to_json())
                .unwrap_or_else(|e| json!({ "error": e.to_string() }));
            json!({
                "name": p.name,
                "selector": p.selector.to_string(),
                "version": p.version,
                "spec": spec,
                "updated_at": tapgraph::time::rfc3339(tapgraph::time::from_unix_nanos(
                    p.updated_at_ms.saturating_mul(1_000_000),
                )),
            })
        })
        .collect();
    let rollout: Vec<_> = state
        .registry
        .policy_status(None)
        .await
        .into_iter()
        .map(|s| {
            let status = if !s.error.is_empty() {
                "refused"
            } else if s.pending {
                "pending"
            } else {
                "applied"
            };
            json!({
                "agent_id": s.agent_id,
                "policy": s.policy_name,
                "version_wanted": s.version_wanted,
                "version_applied": s.version_applied,
                "state": status,
                "error": (!s.error.is_empty()).then_some(s.error),
                "target_error": (!s.target_error.is_empty()).then_some(s.target_error),
            })
        })
        .collect();
    Json(json!({ "policies": policies, "rollout": rollout }))
}

/// The map's counters, and the Neo4j sink's under `neo4j` when one is configured.
async fn topology_stats(State(state): State<HttpState>) -> impl IntoResponse {
    let mut stats = serde_json::to_value(state.topology.stats().await).unwrap_or_default();
    if let (Some(sink), Some(map)) = (&state.sink, stats.as_object_mut()) {
        map.insert(
            "neo4j".into(),
            serde_json::to_value(sink.stats()).unwrap_or_default(),
        );
    }
    Json(stats)
}

/// Mirrored packets per agent and target: received, written, dropped by reason, delay; the rows
/// of agents in direct mode from their control records (`direct`). With replicas, every replica's streams, each naming the replica it lands on (`replica`).
async fn mirror_stats(State(state): State<HttpState>) -> Response {
    let mut local = state.mirrors.stats();
    local.extend(crate::mirror::direct_rows(&state.registry.list().await));
    if state.registry.presence_stats().is_none() {
        return Json(local).into_response();
    }
    let replica = state.registry.replica();
    let mut all: Vec<serde_json::Value> = local
        .iter()
        .filter_map(|t| serde_json::to_value(t).ok())
        .map(|mut t| {
            t["replica"] = replica.into();
            t
        })
        .collect();
    let remote = state.registry.remote_mirrors().await;
    all.extend(remote.iter().filter_map(|t| serde_json::to_value(t).ok()));
    Json(all).into_response()
}

/// How often the stream looks at the map's generation.
const GRAPH_POLL: Duration = Duration::from_millis(250);
/// The fleet is announced at least this often, for its rates and last-seen times.
const FLEET_EVERY: Duration = Duration::from_secs(5);

struct Watch {
    events: tokio::sync::broadcast::Receiver<tapgraph::proto::Event>,
    topology: Topology,
    ticker: tokio::time::Interval,
    /// Generation last announced; 0 announces the current one first.
    generation: u64,
    graph_due: bool,
    fleet_due: bool,
    fleet_at: Instant,
    stop: CancellationToken,
}

/// Server-sent events: `graph` when the map changed (or an agent's state, which the map shows),
/// `fleet` when agents did and every 5 s, `event` for each live event (as `tapgraphctl events`).
async fn events(
    State(state): State<HttpState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut ticker = tokio::time::interval(GRAPH_POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watch = Watch {
        events: state.events.subscribe(),
        topology: state.topology.clone(),
        ticker,
        generation: 0,
        graph_due: false,
        fleet_due: true,
        fleet_at: Instant::now(),
        stop: state.stop.clone(),
    };
    let stream = futures::stream::unfold(watch, |mut w| async move {
        loop {
            if w.graph_due || w.topology.generation() != w.generation {
                w.graph_due = false;
                w.generation = w.topology.generation();
                let e = Event::default()
                    .event("graph")
                    .data(json!({ "generation": w.generation }).to_string());
                return Some((Ok(e), w));
            }
            if w.fleet_due || w.fleet_at.elapsed() >= FLEET_EVERY {
                w.fleet_due = false;
                w.fleet_at = Instant::now();
                return Some((Ok(Event::default().event("fleet").data("{}")), w));
            }
            tokio::select! {
                _ = w.stop.cancelled() => return None,
                received = w.events.recv() => match received {
                    Ok(ev) => {
                        w.graph_due = true;
                        w.fleet_due = true;
                        let data = json!({
                            "at": tapgraph::time::rfc3339(tapgraph::time::from_unix_nanos(ev.at_unix_nanos)),
                            "agent_id": ev.agent_id,
                            "kind": ev.kind,
                            "message": ev.message,
                            "fields": ev.fields,
                        });
                        return Some((Ok(Event::default().event("event").data(data.to_string())), w));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        w.graph_due = true;
                        w.fleet_due = true;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                },
                _ = w.ticker.tick() => {}
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
