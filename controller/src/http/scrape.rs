//! `GET /metrics`: a [`Scrape`] gathered from the owners of the state, written by
//! [`crate::metrics`], in OpenMetrics when the scraper asks for it and otherwise in the text
//! format 0.0.4 (see [`tapgraph::exposition`]).

use std::fmt;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tapgraph::exposition::Format;

use super::HttpState;
use crate::metrics::Scrape;

/// The response to one scrape.
pub async fn serve(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let scrape = gather(&state).await;
    match scrape.render() {
        Ok(text) => (
            [(header::CONTENT_TYPE, format.content_type())],
            format.render(text),
        )
            .into_response(),
        Err(fmt::Error) => {
            tracing::warn!("cannot encode /metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// What one scrape shows, asked of each owner in turn.
async fn gather(state: &HttpState) -> Scrape {
    Scrape {
        replica: state.registry.replica().to_string(),
        // This replica's agents; the fleet's show as `fleet`, per replica.
        agents: state.registry.list_local().await,
        fleet: match state.registry.fleet().await {
            Some(fleet) => fleet.counts(),
            None => Default::default(),
        },
        presence_errors: state.registry.presence_stats().map(|p| p.errors()),
        // Presence is written only with a shared store, as events are relayed.
        events_not_relayed: state
            .registry
            .presence_stats()
            .map(|_| state.events.not_relayed()),
        registry_dropped: state.registry.dropped(),
        topology: state.topology.stats().await,
        sink: state.sink.as_ref().map(|s| s.stats()),
        http: state.http_stats.read(),
        enrollments_refused: state.enrollment.refused(),
        alerts: state.alert_stats.read(),
        traffic: if state.traffic_metrics {
            Some(crate::metrics::traffic_rows(
                &state
                    .topology
                    .map(crate::topology::GraphQuery::default())
                    .await,
            ))
        } else {
            None
        },
        ..Scrape::default()
    }
    .with_mirrors(&state.mirrors)
}
