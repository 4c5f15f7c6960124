//! Live events for operators (`tapgraphctl events`): enrollments (with the rule that gave the id),
//! agent connects and disconnects, one identity held by two processes, policy rollouts, acks and
//! refusals, revocations. A bounded broadcast: a watcher that falls behind is
//! told how many events it missed instead of slowing anyone down.
//!
//! With replicas, [`relay`] sends this replica's events to the others over PostgreSQL
//! (LISTEN/NOTIFY on `tapgraph_events`) and publishes theirs here, each with the field
//! `replica` naming where it happened: `tapgraphctl events` on any replica shows the whole fleet's.
//! Best effort, as events are: not stored, and an event sent while the database is down is lost.

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

    /// Publishes an event made elsewhere (another replica's).
    fn publish(&self, event: proto::Event) {
        let _ = self.tx.send(event);
    }
}

/// The field naming the replica an event was relayed from.
pub const RELAYED_FROM: &str = "replica";

/// An event on the wire between replicas.
#[derive(serde::Serialize, serde::Deserialize)]
struct Shared {
    replica: String,
    at_unix_nanos: u64,
    agent_id: String,
    kind: String,
    message: String,
    fields: BTreeMap<String, String>,
}

/// `event` as JSON from `replica`, its message cut to fit a notification.
fn encode(event: &proto::Event, replica: &str) -> Option<String> {
    let mut shared = Shared {
        replica: replica.to_string(),
        at_unix_nanos: event.at_unix_nanos,
        agent_id: event.agent_id.clone(),
        kind: event.kind.clone(),
        message: event.message.clone(),
        fields: event.fields.clone().into_iter().collect(),
    };
    loop {
        let json = serde_json::to_string(&shared).ok()?;
        let over = json
            .len()
            .saturating_sub(crate::store::postgres::EVENT_MAX_BYTES);
        if over == 0 {
            return Some(json);
        }
        if shared.message.is_empty() {
            return None;
        }
        let mut keep = shared.message.len().saturating_sub(over + 3);
        while !shared.message.is_char_boundary(keep) {
            keep -= 1;
        }
        shared.message.truncate(keep);
        shared.message.push('…');
    }
}

fn decode(payload: &str) -> Option<proto::Event> {
    let shared: Shared = serde_json::from_str(payload).ok()?;
    let mut fields = shared.fields;
    fields.insert(RELAYED_FROM.to_string(), shared.replica);
    Some(proto::Event {
        at_unix_nanos: shared.at_unix_nanos,
        agent_id: shared.agent_id,
        kind: shared.kind,
        message: shared.message,
        fields: fields.into_iter().collect(),
    })
}

/// Relays events between this replica (`replica`) and the others through `store`, until `stop`.
/// Events that came from another replica (they carry [`RELAYED_FROM`]) are not sent back.
pub async fn relay(
    events: Events,
    store: crate::store::Store,
    replica: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let Some(mut remote) = store.remote_events() else {
        return;
    };
    let mut local = events.subscribe();
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            e = local.recv() => match e {
                Ok(e) if e.fields.contains_key(RELAYED_FROM) => {}
                Ok(e) => {
                    let Some(payload) = encode(&e, &replica) else { continue };
                    // Known to be down: no waiting on the pool for each event.
                    let sent = match store.unavailable() {
                        Some(reason) => Err(crate::store::StoreError::Unavailable {
                            database: store.describe(),
                            reason,
                        }),
                        None => store.share_event(payload).await,
                    };
                    match sent {
                        Ok(()) if failing => {
                            tracing::info!("events reach the other replicas again");
                            failing = false;
                        }
                        Ok(()) => {}
                        Err(error) if !failing => {
                            tracing::warn!(%error, "cannot send events to the other replicas; they see this replica's events again once the database answers");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) if !failing => {
                    tracing::warn!(missed = n, "the event relay fell behind; the other replicas miss these events");
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            r = remote.recv() => match r {
                Ok((_, payload)) => {
                    if let Some(e) = decode(&payload) {
                        events.publish(e);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "missed other replicas' events (this replica was too busy)");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{Store, StoreSettings, testpg};

    #[test]
    fn a_long_event_is_cut_to_fit_a_notification_and_reads_back() {
        let events = Events::new(4);
        let mut rx = events.subscribe();
        events.emit_with(
            "policy",
            "vm-1",
            "é".repeat(6_000),
            [("policy".to_string(), "web".to_string())].into(),
        );
        let e = rx.try_recv().unwrap();
        let payload = encode(&e, "r1").unwrap();
        assert!(payload.len() <= crate::store::postgres::EVENT_MAX_BYTES);
        let back = decode(&payload).unwrap();
        assert!(back.message.ends_with('…') && back.message.starts_with("éé"));
        assert_eq!(back.fields[RELAYED_FROM], "r1");
        assert_eq!(back.fields["policy"], "web");
        assert_eq!(
            (back.kind.as_str(), back.agent_id.as_str()),
            ("policy", "vm-1")
        );
        assert!(decode("not json").is_none());
    }

    /// An event on replica a is seen on b, naming a, and is not sent back to a.
    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_each_replica_sees_the_others_events_once() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let settings = StoreSettings::Postgres(pg);
        let dir = tempfile::tempdir().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let mut sides = Vec::new();
        for name in ["a", "b"] {
            let store = Store::connect(&settings, dir.path(), name).await.unwrap();
            let events = Events::new(64);
            tokio::spawn(relay(events.clone(), store, name.into(), stop.clone()));
            sides.push(events);
        }
        let (a, b) = (&sides[0], &sides[1]);
        let (mut on_a, mut on_b) = (a.subscribe(), b.subscribe());
        // The listeners start at their own pace: send until one arrives.
        let mut heard = None;
        for i in 0..100 {
            a.emit("connect", "vm-1", format!("try {i}"));
            if let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(100), on_b.recv()).await {
                heard = Some(e);
                break;
            }
        }
        let e = heard.expect("b hears a's event within 10 s");
        assert_eq!(e.fields.get(RELAYED_FROM).map(String::as_str), Some("a"));
        assert_eq!((e.kind.as_str(), e.agent_id.as_str()), ("connect", "vm-1"));
        // b's own event reaches a once, and neither side hears its own back.
        b.emit("revoke", "vm-2", "revoked");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let from_b = loop {
            let e = tokio::time::timeout_at(deadline, on_a.recv())
                .await
                .unwrap()
                .unwrap();
            if e.kind == "revoke" {
                break e;
            }
            assert!(
                !e.fields.contains_key(RELAYED_FROM),
                "a heard its own event back: {e:?}"
            );
        };
        assert_eq!(from_b.fields[RELAYED_FROM], "b");
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Ok(e) = on_a.try_recv() {
            assert!(
                !e.fields.contains_key(RELAYED_FROM) || e.kind != "connect",
                "{e:?}"
            );
            assert_ne!(e.kind, "revoke", "b's event arrived twice");
        }
        while let Ok(e) = on_b.try_recv() {
            assert!(
                e.kind == "connect" || !e.fields.contains_key(RELAYED_FROM),
                "b heard something unexpected: {e:?}"
            );
        }
        stop.cancel();
    }
}
