//! The virtual TAP's controller side: agents' mirrored packets, routed to their policy's targets.

pub mod check;
mod dedup;
mod hub;
pub mod targets;

pub use hub::{Mirrors, Route, Stats, StatsView, submit_all};
