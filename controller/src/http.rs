//! Plain HTTP for probes, the read-only API and Prometheus: `/healthz`, `/readyz`,
//! `/api/v1/agents`, `/api/v1/topology/stats`, `/api/v1/mirror`, `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;

use crate::registry::Registry;
use crate::topology::Topology;

#[derive(Clone)]
pub struct HttpState {
    pub registry: Registry,
    pub topology: Topology,
    /// Set once the gRPC listener is bound and state is loaded.
    pub ready: Arc<AtomicBool>,
    /// The Neo4j sink, when one is configured.
    pub sink: Option<crate::sink::SinkHandle>,
    pub mirrors: crate::mirror::Mirrors,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/topology/stats", get(topology_stats))
        .route("/api/v1/mirror", get(mirror_stats))
        .route("/metrics", get(crate::metrics::serve))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn agents(State(state): State<HttpState>) -> impl IntoResponse {
    Json(state.registry.list().await)
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

/// Mirrored packets per agent and target: received, written, dropped by reason, delay.
async fn mirror_stats(State(state): State<HttpState>) -> impl IntoResponse {
    Json(state.mirrors.stats())
}
