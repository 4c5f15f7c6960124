//! The virtual TAP's controller side: agents' mirrored packets, routed to their policy's targets.

pub mod check;
mod dedup;
mod hub;
pub mod targets;

pub use hub::{Mirrors, Route, Stats, StatsView, submit_all};

/// The rows of the targets agents in direct mode send to themselves, from their control records:
/// the hub never sees those packets.
pub fn direct_rows(agents: &[crate::registry::AgentView]) -> Vec<StatsView> {
    agents
        .iter()
        .flat_map(|a| a.capture.direct.iter().map(|d| StatsView::direct(&a.id, d)))
        .collect()
}
