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
    /// With replicas: this replica's events the others did not get, (send failed or the database
    /// was down, the relay fell behind) ([`relay`]).
    not_relayed: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
}

impl Events {
    pub fn new(capacity: usize) -> Self {
        Self {
            tx: broadcast::channel(capacity).0,
            not_relayed: Default::default(),
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

    /// This replica's events the other replicas did not get: (the send failed or the database was
    /// down, the relay fell behind).
    pub fn not_relayed(&self) -> (u64, u64) {
        let [failed, lagged] = &*self.not_relayed;
        (
            failed.load(std::sync::atomic::Ordering::Relaxed),
            lagged.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn count_not_relayed(&self, lagged: bool, n: u64) {
        self.not_relayed[usize::from(lagged)].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
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
    at_unix_nanos: u64,
    agent_id: String,
    kind: String,
    message: String,
    fields: BTreeMap<String, String>,
}

/// One notification: events of one replica, as many as fit.
#[derive(serde::Deserialize)]
struct Notification {
    replica: String,
    events: Vec<Shared>,
}

/// `event` as JSON of at most `room` bytes, its message cut to fit; `None` if nothing fits.
fn encode(event: &proto::Event, room: usize) -> Option<String> {
    let mut shared = Shared {
        at_unix_nanos: event.at_unix_nanos,
        agent_id: event.agent_id.clone(),
        kind: event.kind.clone(),
        message: event.message.clone(),
        fields: event.fields.clone().into_iter().collect(),
    };
    loop {
        let json = serde_json::to_string(&shared).ok()?;
        let over = json.len().saturating_sub(room);
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

/// `events` of `replica` as notification payloads, each at most
/// [`EVENT_MAX_BYTES`](crate::store::postgres::EVENT_MAX_BYTES), as many events in each as fit:
/// a rollout to thousands of agents is tens of notifications, not thousands.
fn pack(events: &[proto::Event], replica: &str) -> Vec<String> {
    let max = crate::store::postgres::EVENT_MAX_BYTES;
    let head = format!(
        "{{\"replica\":{},\"events\":[",
        serde_json::Value::from(replica)
    );
    let room = max.saturating_sub(head.len() + 2);
    let mut payloads = Vec::new();
    let mut current = head.clone();
    for e in events {
        let Some(json) = encode(e, room) else {
            continue;
        };
        if current.len() + json.len() + 3 > max && current.len() > head.len() {
            current.push_str("]}");
            payloads.push(std::mem::replace(&mut current, head.clone()));
        }
        if current.len() > head.len() {
            current.push(',');
        }
        current.push_str(&json);
    }
    if current.len() > head.len() {
        current.push_str("]}");
        payloads.push(current);
    }
    payloads
}

/// The events of one notification, each with [`RELAYED_FROM`] naming its replica.
fn decode(payload: &str) -> Vec<proto::Event> {
    let Ok(n) = serde_json::from_str::<Notification>(payload) else {
        return Vec::new();
    };
    n.events
        .into_iter()
        .map(|shared| {
            let mut fields = shared.fields;
            fields.insert(RELAYED_FROM.to_string(), n.replica.clone());
            proto::Event {
                at_unix_nanos: shared.at_unix_nanos,
                agent_id: shared.agent_id,
                kind: shared.kind,
                message: shared.message,
                fields: fields.into_iter().collect(),
            }
        })
        .collect()
}

/// The most events taken at once from the local stream before sending.
const BATCH: usize = 512;

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
                    // With whatever else is waiting already: one notification for many events.
                    let mut batch = vec![e];
                    while batch.len() < BATCH {
                        match local.try_recv() {
                            Ok(e) if e.fields.contains_key(RELAYED_FROM) => {}
                            Ok(e) => batch.push(e),
                            Err(_) => break,
                        }
                    }
                    // Known to be down: no waiting on the pool for each event.
                    let sent = match store.unavailable() {
                        Some(reason) => Err(crate::store::StoreError::Unavailable {
                            database: store.describe(),
                            reason,
                        }),
                        None => async {
                            for payload in pack(&batch, &replica) {
                                store.share_event(payload).await?;
                            }
                            Ok(())
                        }
                        .await,
                    };
                    if sent.is_err() {
                        events.count_not_relayed(false, batch.len() as u64);
                    }
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
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    events.count_not_relayed(true, n);
                    if !failing {
                        tracing::warn!(missed = n, "the event relay fell behind; the other replicas miss these events");
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            r = remote.recv() => match r {
                Ok((_, payload)) => {
                    for e in decode(&payload) {
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
    fn events_are_packed_into_notifications_a_long_one_cut_to_fit() {
        let events = Events::new(600);
        let mut rx = events.subscribe();
        events.emit_with(
            "policy",
            "vm-1",
            "é".repeat(6_000),
            [("policy".to_string(), "web".to_string())].into(),
        );
        for i in 0..500 {
            events.emit("connect", &format!("vm-{i}"), "connected");
        }
        let all: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        let payloads = pack(&all, "r1");
        let max = crate::store::postgres::EVENT_MAX_BYTES;
        assert!(
            payloads.iter().all(|p| p.len() <= max),
            "a payload over {max}"
        );
        assert!(
            payloads.len() < 20,
            "501 events in {} notifications",
            payloads.len()
        );
        let back: Vec<_> = payloads.iter().flat_map(|p| decode(p)).collect();
        assert_eq!(back.len(), 501);
        assert!(back[0].message.ends_with('…') && back[0].message.starts_with("éé"));
        assert_eq!(back[0].fields["policy"], "web");
        assert!(back.iter().all(|e| e.fields[RELAYED_FROM] == "r1"));
        assert_eq!(
            (back[500].kind.as_str(), back[500].agent_id.as_str()),
            ("connect", "vm-499")
        );
        assert!(decode("not json").is_empty());
    }

    /// An event on replica a is seen on b, naming a, and is not sent back to a.
    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_each_replica_sees_the_others_events_once() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        // A session on the server's `postgres` database, to refuse the test database's sessions.
        let (base, database) = pg.url.rsplit_once('/').unwrap();
        let database = database.split('?').next().unwrap().to_string();
        let admin = testpg::client(&format!("{base}/postgres")).await;
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
        assert_eq!(a.not_relayed(), (0, 0));

        // The database turns a's sessions away: a's events are lost to b, and counted.
        admin
            .batch_execute(&format!(
                "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false; \
                     SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = '{database}';"
            ))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while a.not_relayed().0 == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no event counted as not relayed within 15 s"
            );
            a.emit("connect", "vm-3", "while the database is away");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.cancel();
    }
}
