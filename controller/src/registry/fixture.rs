//! What the registry's unit tests build on: a task without its loop, agents with a live session,
//! and the control records they send.

use std::collections::BTreeMap;
use std::sync::Arc;

use tapgraph::proto;
use tokio::sync::{mpsc, oneshot};

use super::agents::{Agent, Live};
use super::task::RegistryTask;
use super::{Pushed, Registered};
use crate::events::Events;
use crate::health::Health;

/// The replica the fixture's registry runs on.
pub(super) const REPLICA: &str = "replica-a";

/// A registry task, driven by calling its methods; the shared health it writes; its events.
pub(super) fn task() -> (RegistryTask, Health, Events) {
    let (events, health) = (Events::new(64), Health::default());
    let task = RegistryTask::new(
        REPLICA.into(),
        events.clone(),
        health.clone(),
        10,
        Arc::default(),
    );
    (task, health, events)
}

/// Registers agent `id` with a control channel of `capacity` messages.
pub(super) fn connect(
    task: &mut RegistryTask,
    id: &str,
    capacity: usize,
) -> (Registered, mpsc::Receiver<Pushed>) {
    let (tx, rx) = mpsc::channel(capacity);
    let hello = proto::Hello {
        hostname: format!("{id}.example"),
        ..Default::default()
    };
    let remote = "192.0.2.1:40000".parse().unwrap();
    let registered = task
        .register(id.into(), hello, BTreeMap::new(), remote, tx)
        .unwrap();
    (registered, rx)
}

/// An agent with a live session, as registering leaves it (its last control record: now).
pub(super) fn live_agent(id: &str) -> (Agent, mpsc::Receiver<Pushed>) {
    let mut agent = Agent::new(id);
    let (outbound, rx) = mpsc::channel(4);
    let (close, _) = oneshot::channel();
    agent.live = Some(Live {
        session: 1,
        outbound,
        close,
    });
    (agent, rx)
}

/// A control record with these drops (kernel, limiter, queue) and capture state.
pub(super) fn record(drops: (u64, u64, u64), state: proto::CaptureState) -> proto::ControlRecord {
    proto::ControlRecord {
        counters: Some(proto::Counters {
            packets_dropped_kernel: drops.0,
            packets_dropped_limiter: drops.1,
            packets_dropped_queue: drops.2,
            ..Default::default()
        }),
        capture_state: state as i32,
        ..Default::default()
    }
}
