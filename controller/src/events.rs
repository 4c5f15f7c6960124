//! Live events for operators (`tapgraphctl events`): enrollments (with the rule that gave the id),
//! agent connects and disconnects, one identity held by two processes, policy rollouts, acks and
//! refusals, revocations. A bounded broadcast: a watcher that falls behind is
//! told how many events it missed instead of slowing anyone down.

use std::collections::BTreeMap;

use tapgraph::proto;
use tokio::sync::broadcast;

#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<proto::Event>,
}

impl Events {
    pub fn new(capacity: usize) -> Self {
        Self {
            tx: broadcast::channel(capacity).0,
        }
    }

    /// Publishes an event; without watchers it is dropped at no cost.
    pub fn emit(&self, kind: &str, agent_id: &str, message: impl Into<String>) {
        self.emit_with(kind, agent_id, message, BTreeMap::new());
    }

    pub fn emit_with(
        &self,
        kind: &str,
        agent_id: &str,
        message: impl Into<String>,
        fields: BTreeMap<String, String>,
    ) {
        let _ = self.tx.send(proto::Event {
            at_unix_nanos: tapgraph::time::unix_nanos(),
            agent_id: agent_id.to_string(),
            kind: kind.to_string(),
            message: message.into(),
            fields: fields.into_iter().collect(),
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<proto::Event> {
        self.tx.subscribe()
    }
}
