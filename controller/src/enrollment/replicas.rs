//! Two replicas of the enrollment task on one PostgreSQL database: two store handles, two tasks,
//! one CA. What one decides the other must see, and races between them have one winner.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tapgraph::pki::CertAuthority;
use tonic::{Code, Status};

use crate::store::{Batch, Table};

use super::{
    EnrollError, EnrollRequest, Enrollment, TOKENS,
    limits::EnrollLimits,
    tokens::{Token, TokenError},
};
use crate::events::Events;
use crate::health::Health;
use crate::registry::Registry;
use crate::store::postgres::PostgresSettings;
use crate::store::{Store, StoreError, StoreSettings, testpg};

struct Replica {
    enrollment: Enrollment,
    registry: Registry,
    store: Store,
}

async fn replica(pg: &PostgresSettings, name: &str, ca: &CertAuthority) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&StoreSettings::Postgres(pg.clone()), dir.path(), name)
        .await
        .unwrap();
    let events = Events::new(64);
    let (registry, registry_task) = Registry::spawn(name, events.clone(), Health::default(), 100);
    tokio::spawn(registry_task);
    let ca = CertAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
    let (enrollment, task) = Enrollment::spawn(
        store.clone(),
        ca,
        Duration::from_secs(3600),
        registry.clone(),
        events,
        EnrollLimits::new(1000.0, 1000),
    )
    .unwrap();
    tokio::spawn(task);
    Replica {
        enrollment,
        registry,
        store,
    }
}

/// Two replicas ("a", "b") on a fresh database; `None` when PostgreSQL is not installed.
async fn two_replicas() -> Option<(Replica, Replica, PostgresSettings)> {
    let pg = testpg::database().await?;
    let ca = CertAuthority::generate("test CA", Duration::from_secs(3600)).unwrap();
    let a = replica(&pg, "a", &ca).await;
    let b = replica(&pg, "b", &ca).await;
    Some((a, b, pg))
}

async fn token(on: &Replica, uses: u32) -> String {
    on.enrollment
        .create_token(
            Duration::from_secs(600),
            uses,
            BTreeMap::new(),
            String::new(),
            None,
        )
        .await
        .unwrap()
        .text
}

/// An enrollment request from host `hostname` with a key of its own, from a source of its own
/// (`n`), so the per-source failure limit does not decide anything.
fn request(token: &str, hostname: &str, n: u8) -> EnrollRequest {
    let (_key, csr_pem) = tapgraph::pki::new_key_and_csr(hostname).unwrap();
    EnrollRequest {
        peer: format!("10.0.{n}.1:5000").parse().unwrap(),
        token: token.to_string(),
        csr_pem,
        hostname: hostname.to_string(),
        machine_id: String::new(),
        requested_id: String::new(),
    }
}

/// Polls `done` until it holds, or fails the test after a few seconds.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the requests on the replicas at once (request i on replica i % 2); their results in order.
async fn enroll_at_once(
    replicas: [&Replica; 2],
    requests: Vec<EnrollRequest>,
) -> Vec<Result<String, EnrollError>> {
    let handles: Vec<_> = requests
        .into_iter()
        .enumerate()
        .map(|(i, request)| {
            let enrollment = replicas[i % 2].enrollment.clone();
            tokio::spawn(async move { enrollment.enroll(request).await.map(|e| e.agent_id) })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.unwrap());
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_racing_for_a_tokens_uses_enroll_exactly_that_many_agents() {
    let Some((a, b, _pg)) = two_replicas().await else {
        return;
    };
    let text = token(&a, 3).await;
    let requests = (0..12)
        .map(|n| request(&text, &format!("host-{n}"), n))
        .collect();
    let results = enroll_at_once([&a, &b], requests).await;
    let enrolled: BTreeSet<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    assert_eq!(enrolled.len(), 3, "{results:?}");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(refused, EnrollError::Token(TokenError::Exhausted(_))),
            "{refused}"
        );
    }
    let stored: Vec<Token> = a.store.load(TOKENS).unwrap();
    assert_eq!(stored[0].uses_left, 0);
    let agents: Vec<super::EnrolledAgent> = b.store.load(super::AGENTS).unwrap();
    let ids: BTreeSet<String> = agents.into_iter().map(|a| a.id).collect();
    assert_eq!(ids, enrolled, "the stored agents are the enrolled ones");
    // Each replica learns the other's agents, and both see the token used up.
    for r in [&a, &b] {
        eventually("both replicas list the three agents", async || {
            r.enrollment.list_agents().await.len() == 3
        })
        .await;
        eventually("both replicas see the token used up", async || {
            r.enrollment
                .list_tokens()
                .await
                .iter()
                .all(|t| t.uses_left == 0)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_enrolling_one_hostname_at_once_give_each_host_its_own_id() {
    let Some((a, b, _pg)) = two_replicas().await else {
        return;
    };
    let text = token(&a, 8).await;
    let requests = (0..8).map(|n| request(&text, "web", n)).collect();
    let results = enroll_at_once([&a, &b], requests).await;
    let ids: Vec<String> = results.into_iter().map(|r| r.unwrap()).collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 8, "two hosts got one id: {ids:?}");
    let expected: BTreeSet<String> = std::iter::once("web".to_string())
        .chain((2..=8).map(|n| format!("web-{n}")))
        .collect();
    assert_eq!(
        distinct.into_iter().cloned().collect::<BTreeSet<_>>(),
        expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_new_key_or_labels_through_one_replica_reach_the_other() {
    let Some((a, b, _pg)) = two_replicas().await else {
        return;
    };
    let text = token(&a, 1).await;
    // Enrolled through B with a token made through A: B reads the token it has not heard of.
    let id = b
        .enrollment
        .enroll(request(&text, "db", 1))
        .await
        .unwrap()
        .agent_id;
    let ra = a.enrollment.revocations().clone();
    let rb = b.enrollment.revocations().clone();
    // Renewed through A for a new key: B accepts only certificates for A's keys.
    let (_key, csr) = tapgraph::pki::new_key_and_csr("db").unwrap();
    let new_key = tapgraph::pki::csr_key_sha256(&csr).unwrap();
    a.enrollment.renew(id.clone(), csr).await.unwrap();
    eventually("B holds the renewed key", async || {
        rb.key_is_current(&id, Some(&new_key)) && !rb.key_is_current(&id, Some("other"))
    })
    .await;
    // The agent's Connect stream is on B.
    let (outbound, _pushed) = tokio::sync::mpsc::channel(8);
    let hello = tapgraph::proto::Hello {
        hostname: "db".into(),
        ..Default::default()
    };
    let session = b
        .registry
        .register(
            id.clone(),
            hello,
            BTreeMap::new(),
            "192.0.2.1:40000".parse().unwrap(),
            outbound,
        )
        .await
        .unwrap();
    // Labels set through A are B's too, and B's registry re-resolves the agent's policy.
    let tier = BTreeMap::from([("tier".to_string(), "db".to_string())]);
    a.enrollment
        .set_labels(id.clone(), tier.clone(), Vec::new())
        .await
        .unwrap();
    eventually("B has the labels set through A", async || {
        b.enrollment.labels(&id).await == tier
            && b.registry
                .list()
                .await
                .iter()
                .any(|v| v.id == id && v.labels == tier)
    })
    .await;
    let mut changed = rb.changed();
    changed.borrow_and_update();
    assert!(!rb.is_revoked(&id));
    let revoked_at = Instant::now();
    a.enrollment.revoke_agent(id.clone()).await.unwrap();
    assert!(ra.is_revoked(&id));
    let closed = tokio::time::timeout(Duration::from_secs(5), session.closed)
        .await
        .expect("B closes the revoked agent's stream")
        .unwrap();
    eprintln!(
        "revoked through A, stream closed on B after {:?}",
        revoked_at.elapsed()
    );
    assert!(closed.to_string().contains("revoked"), "{closed}");
    assert!(rb.is_revoked(&id), "B refuses the agent's certificate");
    assert!(
        changed.has_changed().unwrap(),
        "B's Mirror streams were woken"
    );
    // B refuses the revoked agent's renewal.
    let (_key, csr) = tapgraph::pki::new_key_and_csr("db").unwrap();
    let refused = b.enrollment.renew(id.clone(), csr).await.err().unwrap();
    assert!(matches!(refused, EnrollError::Revoked(_)), "{refused}");
}

/// Changes B was not told of (written under its own name, as if while its listening session was
/// down) are read when that session comes back: a revocation closes streams, a deleted record goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_lost_listening_session_a_replica_reads_everything_again() {
    let Some((a, b, pg)) = two_replicas().await else {
        return;
    };
    let text = token(&a, 2).await;
    for (n, host) in ["web", "db"].into_iter().enumerate() {
        a.enrollment
            .enroll(request(&text, host, n as u8))
            .await
            .unwrap();
    }
    eventually("B knows both agents", async || {
        b.enrollment.list_agents().await.len() == 2
    })
    .await;
    // Written by a handle that calls itself "b": B's listener ignores its notices.
    let dir = tempfile::tempdir().unwrap();
    let quiet = Store::connect(&StoreSettings::Postgres(pg.clone()), dir.path(), "b")
        .await
        .unwrap();
    const AGENTS: Table = super::AGENTS;
    let mut web: super::EnrolledAgent = quiet.get(AGENTS, "web").unwrap().unwrap();
    web.revoked_at_ms = Some(1);
    let mut batch = Batch::default();
    batch.put(AGENTS, "web", &web).unwrap();
    batch.delete(AGENTS, "db");
    quiet.commit(batch).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !b.enrollment.revocations().is_revoked("web"),
        "B was not told"
    );
    // B's listening session is lost, and comes back.
    let client = crate::store::testpg::client(&pg.url).await;
    client
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'b' AND query LIKE 'LISTEN%'",
        )
        .await
        .unwrap();
    let rb = b.enrollment.revocations().clone();
    eventually("B reads the revocation again", async || {
        rb.is_revoked("web")
    })
    .await;
    let listed: Vec<String> = b
        .enrollment
        .list_agents()
        .await
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(listed, ["web"], "the deleted record is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_the_store_refuses_changes_nothing() {
    let Some((a, _b, pg)) = two_replicas().await else {
        return;
    };
    let text = token(&a, 2).await;
    let before = a.enrollment.list_tokens().await;
    // The database refuses every write to the tokens table from now on.
    let client = crate::store::testpg::client(&pg.url).await;
    client
        .batch_execute("ALTER TABLE tapgraph.tokens RENAME TO tokens_gone")
        .await
        .unwrap();
    let refused = a.enrollment.enroll(request(&text, "web", 1)).await;
    let status = Status::from(refused.err().unwrap());
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(a.enrollment.list_agents().await.is_empty());
    let id = before[0].id.clone();
    assert!(a.enrollment.revoke_token(id).await.is_err());
    assert!(
        a.enrollment
            .create_token(
                Duration::from_secs(60),
                1,
                BTreeMap::new(),
                String::new(),
                None
            )
            .await
            .is_err()
    );
    assert_eq!(a.enrollment.list_tokens().await, before, "nothing changed");
}

#[test]
fn an_unavailable_database_is_unavailable_naming_it_and_a_lost_race_is_aborted() {
    let down = EnrollError::Store(StoreError::Unavailable {
        database: "10.0.0.5:5432/tapgraph".into(),
        reason: "connection refused".into(),
    });
    assert!(!down.is_callers_fault());
    let status = Status::from(down);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("10.0.0.5:5432/tapgraph")
            && status.message().contains("connection refused"),
        "{status:?}"
    );
    let lost = Status::from(EnrollError::Store(StoreError::Conflict {
        table: "tokens".into(),
        key: "abc".into(),
    }));
    assert_eq!(lost.code(), Code::Aborted, "{lost:?}");
}
