//! One test suite, both backends: what every caller of [`Store`] relies on. The PostgreSQL runs
//! use a real server (`testpg`), and two handles on one database stand for two replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use super::{Batch, Change, Store, StoreError, StoreSettings, Table, testpg};

/// Tables the PostgreSQL schema has (the suite borrows them).
const T: Table = TableDefinition::new("tokens");
const U: Table = TableDefinition::new("agents");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Token {
    id: String,
    uses_left: u32,
}

/// Two handles on one store: for PostgreSQL two replicas ("a", "b") on one database; for the
/// embedded store (one process may open a file once) two clones of one handle.
async fn pair(postgres: bool, dir: &std::path::Path) -> Option<(Store, Store)> {
    if postgres {
        let settings = StoreSettings::Postgres(testpg::database().await?);
        let a = Store::connect(&settings, dir, "a").await.unwrap();
        let b = Store::connect(&settings, dir, "b").await.unwrap();
        Some((a, b))
    } else {
        let s = Store::connect(&StoreSettings::default(), dir, "a")
            .await
            .unwrap();
        Some((s.clone(), s))
    }
}

async fn writes_read_back_in_key_order(postgres: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Some((a, b)) = pair(postgres, dir.path()).await else {
        return;
    };
    assert!(a.load::<u32>(T).unwrap().is_empty());
    let mut batch = Batch::default();
    for (k, v) in [("b", 2u32), ("a", 1), ("B", 0), ("ab", 3)] {
        batch.put(T, k, &v).unwrap();
    }
    a.commit(batch).unwrap();
    // Byte order, as redb keeps it: "B" < "a" < "ab" < "b".
    assert_eq!(b.load::<u32>(T).unwrap(), [0, 1, 3, 2]);
    let keyed = b.load_keyed::<u32>(T).unwrap();
    assert_eq!(keyed[0], ("B".to_string(), 0));
    assert_eq!(b.get::<u32>(T, "ab").unwrap(), Some(3));
    assert_eq!(b.get::<u32>(T, "zz").unwrap(), None);
    let mut batch = Batch::default();
    batch.delete(T, "a");
    batch.put(T, "b", &20u32).unwrap();
    a.commit_deferred(batch).unwrap();
    a.sync().unwrap();
    assert_eq!(b.load::<u32>(T).unwrap(), [0, 3, 20]);
    assert!(b.load::<u32>(U).unwrap().is_empty(), "tables are apart");
}

async fn a_failed_precondition_writes_nothing(postgres: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Some((a, b)) = pair(postgres, dir.path()).await else {
        return;
    };
    let t = Token {
        id: "t1".into(),
        uses_left: 1,
    };
    a.put(T, "t1", &t).unwrap();
    // B took the use meanwhile.
    let mut batch = Batch::default();
    batch.expect(T, "t1", Some(&t)).unwrap();
    batch
        .put(
            T,
            "t1",
            &Token {
                uses_left: 0,
                ..t.clone()
            },
        )
        .unwrap();
    b.commit(batch).unwrap();
    // A, deciding from the old value, is refused, and its other write is not made either.
    let mut batch = Batch::default();
    batch.expect(T, "t1", Some(&t)).unwrap();
    batch
        .put(
            T,
            "t1",
            &Token {
                uses_left: 0,
                ..t.clone()
            },
        )
        .unwrap();
    batch.put(U, "agent-1", &"enrolled").unwrap();
    let e = a.commit(batch).unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict { table, key } if table == "tokens" && key == "t1"),
        "{e}"
    );
    assert!(a.load::<String>(U).unwrap().is_empty(), "all or nothing");
    // Expecting absence: the first insert wins, the second conflicts.
    let mut first = Batch::default();
    first.expect::<Token>(U, "new", None).unwrap();
    first.put(U, "new", &"one").unwrap();
    a.commit(first).unwrap();
    let mut second = Batch::default();
    second.expect::<Token>(U, "new", None).unwrap();
    second.put(U, "new", &"two").unwrap();
    assert!(b.commit(second).unwrap_err().is_conflict());
    assert_eq!(b.get::<String>(U, "new").unwrap().as_deref(), Some("one"));
}

/// Replicas racing for the last uses of a token: read, decide, write if unchanged, else read
/// again. Exactly as many win as there were uses.
async fn racing_for_the_last_uses_gives_exactly_that_many_winners(postgres: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Some((a, b)) = pair(postgres, dir.path()).await else {
        return;
    };
    const USES: u32 = 3;
    a.put(
        T,
        "t",
        &Token {
            id: "t".into(),
            uses_left: USES,
        },
    )
    .unwrap();
    let winners = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let winners = winners.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(t) = store.get::<Token>(T, "t").unwrap() else {
                    return;
                };
                if t.uses_left == 0 {
                    return;
                }
                let mut batch = Batch::default();
                batch.expect(T, "t", Some(&t)).unwrap();
                batch
                    .put(
                        T,
                        "t",
                        &Token {
                            uses_left: t.uses_left - 1,
                            ..t.clone()
                        },
                    )
                    .unwrap();
                match store.commit(batch) {
                    Ok(()) => {
                        winners.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(winners.load(Ordering::SeqCst), USES as usize);
    assert_eq!(a.get::<Token>(T, "t").unwrap().unwrap().uses_left, 0);
}

/// What agents report is stored as they sent it: quotes, escapes, any Unicode, and a NUL (which
/// PostgreSQL's jsonb cannot hold as text), all read back equal.
async fn any_text_reads_back_as_written(postgres: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Some((a, b)) = pair(postgres, dir.path()).await else {
        return;
    };
    let texts = [
        "plain".to_string(),
        "quote \" backslash \\ slash / tab \t newline \n".to_string(),
        "é ü 漢字 🦀 \u{7f} \u{1b}[31mred".to_string(),
        "nul \0 inside".to_string(),
        "\\u0000 written out".to_string(),
        "x".repeat(100_000),
    ];
    let mut batch = Batch::default();
    for (i, text) in texts.iter().enumerate() {
        batch
            .put(T, &format!("k{i}"), &(text, u64::MAX, -1.5f64))
            .unwrap();
    }
    a.commit(batch).unwrap();
    let back = b.load::<(String, u64, f64)>(T).unwrap();
    assert_eq!(back.len(), texts.len());
    for (text, (got, max, half)) in texts.iter().zip(back) {
        assert_eq!(&got, text);
        assert_eq!((max, half), (u64::MAX, -1.5));
    }
    assert_eq!(
        b.get::<(String, u64, f64)>(T, "k3").unwrap().unwrap().0,
        texts[3]
    );
}

/// Two writers each expecting many rows, named in opposite orders, both increment every row:
/// each batch applies whole or is refused as a conflict, never a deadlock or a lost update.
async fn many_preconditions_in_any_order_lose_no_update(postgres: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Some((a, b)) = pair(postgres, dir.path()).await else {
        return;
    };
    const KEYS: usize = 300;
    const ROUNDS: u32 = 20;
    let mut init = Batch::default();
    for k in 0..KEYS {
        init.put(T, &format!("k{k}"), &0u32).unwrap();
    }
    a.commit(init).unwrap();
    let writer = |store: Store, reversed: bool| {
        tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..ROUNDS {
                loop {
                    let mut rows = store.load_keyed::<u32>(T).unwrap();
                    if reversed {
                        rows.reverse();
                    }
                    let mut batch = Batch::default();
                    for (key, n) in &rows {
                        batch.expect(T, key, Some(n)).unwrap();
                        batch.put(T, key, &(n + 1)).unwrap();
                    }
                    match store.commit(batch) {
                        Ok(()) => break,
                        Err(e) if e.is_conflict() => conflicts += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            conflicts
        })
    };
    let (x, y) = (writer(a.clone(), false), writer(b.clone(), true));
    let _conflicts = x.await.unwrap() + y.await.unwrap();
    assert_eq!(b.load::<u32>(T).unwrap(), [2 * ROUNDS; KEYS]);
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(false).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(true).await;
                }
            )*
        }
    };
}

both!(
    writes_read_back_in_key_order,
    a_failed_precondition_writes_nothing,
    racing_for_the_last_uses_gives_exactly_that_many_winners,
    any_text_reads_back_as_written,
    many_preconditions_in_any_order_lose_no_update,
);

/// Receives the next change, skipping resyncs, within a few seconds.
async fn next_row(rx: &mut tokio::sync::broadcast::Receiver<Change>) -> Change {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a change within 5 s")
            .unwrap()
        {
            Change::Resync => continue,
            row => return row,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_other_replicas_hear_each_change_and_the_writer_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let Some((a, b)) = pair(true, dir.path()).await else {
        return;
    };
    let mut heard_by_a = a.changes();
    let mut heard_by_b = b.changes();
    // The listeners are (re)connecting in the background: wait until B hears anything.
    let probe = tokio::spawn(async move {
        loop {
            a.put(U, "probe", &1u32).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            if a.get::<u32>(U, "stop").unwrap().is_some() {
                return a;
            }
        }
    });
    assert_eq!(
        next_row(&mut heard_by_b).await,
        Change::Row {
            table: "agents".into(),
            key: "probe".into()
        }
    );
    b.put(U, "stop", &1u32).unwrap();
    let a = probe.await.unwrap();
    // Every probe heard (they arrive in commit order), not just those already in.
    until_listening(&a, &mut heard_by_b).await;
    let mut batch = Batch::default();
    batch.put(T, "t9", &1u32).unwrap();
    batch.delete(U, "probe");
    a.commit(batch).unwrap();
    let mut got = vec![
        next_row(&mut heard_by_b).await,
        next_row(&mut heard_by_b).await,
    ];
    got.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        got,
        [
            Change::Row {
                table: "agents".into(),
                key: "probe".into()
            },
            Change::Row {
                table: "tokens".into(),
                key: "t9".into()
            }
        ]
    );
    // A heard B's "stop", never its own writes.
    assert_eq!(
        next_row(&mut heard_by_a).await,
        Change::Row {
            table: "agents".into(),
            key: "stop".into()
        }
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(c) = heard_by_a.try_recv() {
        assert_eq!(c, Change::Resync, "A heard only B's change: {c:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_replicas_starting_at_once_make_one_schema() {
    let Some(pg) = testpg::database().await else {
        return;
    };
    let settings = StoreSettings::Postgres(pg);
    let dir = tempfile::tempdir().unwrap();
    let starts = (0..4).map(|i| {
        let settings = settings.clone();
        let dir = dir.path().to_path_buf();
        tokio::spawn(async move { Store::connect(&settings, &dir, &format!("r{i}")).await })
    });
    let stores: Vec<Store> = futures::future::join_all(starts)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    stores[0].put(T, "k", &1u32).unwrap();
    assert_eq!(stores[3].load::<u32>(T).unwrap(), [1]);
    let StoreSettings::Postgres(pg) = &settings else {
        unreachable!()
    };
    let client = crate::store::testpg::client(&pg.url).await;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM tapgraph.schema_migrations ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3], "each migration once");
}

/// A database made by an earlier controller (schema version 1, values as `jsonb`) is brought
/// forward at start, and what it held reads back the same.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_database_of_an_earlier_version_is_migrated_keeping_its_rows() {
    let Some(pg) = testpg::database().await else {
        return;
    };
    let client = crate::store::testpg::client(&pg.url).await;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA tapgraph; \
             CREATE TABLE tapgraph.schema_migrations (version integer PRIMARY KEY, \
               applied_at timestamptz NOT NULL DEFAULT now()); \
             {} \
             INSERT INTO tapgraph.schema_migrations (version) VALUES (1); \
             INSERT INTO tapgraph.tokens (key, value) VALUES ('t1', '{{\"id\": \"t1\", \"uses_left\": 2}}');",
            super::schema::migration_1()
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&StoreSettings::Postgres(pg), dir.path(), "a")
        .await
        .unwrap();
    let t1 = Token {
        id: "t1".into(),
        uses_left: 2,
    };
    assert_eq!(store.get::<Token>(T, "t1").unwrap(), Some(t1.clone()));
    // A precondition on the migrated row holds, and a NUL, which jsonb refused, is taken now.
    let mut batch = Batch::default();
    batch.expect(T, "t1", Some(&t1)).unwrap();
    batch
        .put(
            T,
            "t1",
            &Token {
                id: "t\0".into(),
                uses_left: 1,
            },
        )
        .unwrap();
    store.commit(batch).unwrap();
    assert_eq!(store.get::<Token>(T, "t1").unwrap().unwrap().id, "t\0");
    let kind: String = client
        .query_one(
            "SELECT data_type FROM information_schema.columns \
             WHERE table_schema = 'tapgraph' AND table_name = 'tokens' AND column_name = 'value'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kind, "json");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_unreachable_is_unavailable_naming_the_database() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = StoreSettings::Postgres(super::postgres::PostgresSettings {
        url: format!("postgres://tapgraph@127.0.0.1:{port}/tapgraph?sslmode=disable"),
        password_file: None,
    });
    let dir = tempfile::tempdir().unwrap();
    let e = Store::connect(&settings, dir.path(), "a")
        .await
        .err()
        .unwrap();
    assert!(e.is_unavailable(), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("127.0.0.1:{port}/tapgraph")),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_over_tls_verifies_the_server_certificate() {
    use tapgraph::identity::Identity;
    use tapgraph::pki::CertAuthority;
    let dir = tempfile::tempdir().unwrap();
    let day = Duration::from_secs(86_400);
    let ca = CertAuthority::generate("pg test CA", day).unwrap();
    let issued = ca
        .issue(&Identity::Controller, &["127.0.0.1".into()], day)
        .unwrap();
    let (cert, key, ca_pem) = (
        dir.path().join("server.crt"),
        dir.path().join("server.key"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
    let Some(server) = testpg::tls_server(&cert, &key) else {
        return;
    };
    let settings = |mode: &str, root: &std::path::Path| {
        StoreSettings::Postgres(super::postgres::PostgresSettings {
            url: format!(
                "{}tapgraph?sslmode={mode}&sslrootcert={}",
                server.base(),
                root.display()
            ),
            password_file: None,
        })
    };
    let s = Store::connect(&settings("verify-full", &ca_pem), dir.path(), "a")
        .await
        .unwrap();
    s.put(T, "over-tls", &1u32).unwrap();
    assert_eq!(s.get::<u32>(T, "over-tls").unwrap(), Some(1));
    // A server whose certificate another CA signed is refused, whatever the sslmode says.
    let other = CertAuthority::generate("another CA", day).unwrap();
    let other_pem = dir.path().join("other.pem");
    std::fs::write(&other_pem, other.cert_pem()).unwrap();
    for mode in ["require", "verify-full"] {
        let e = Store::connect(&settings(mode, &other_pem), dir.path(), "a")
            .await
            .err()
            .unwrap_or_else(|| panic!("sslmode={mode}: a certificate from another CA accepted"));
        assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_refusing_the_connection_is_a_failure_with_its_reason() {
    let Some(pg) = testpg::database().await else {
        return;
    };
    let (base, _) = pg.url.rsplit_once('/').unwrap();
    let settings = StoreSettings::Postgres(super::postgres::PostgresSettings {
        url: format!("{base}/no_such_database?sslmode=disable"),
        password_file: None,
    });
    let dir = tempfile::tempdir().unwrap();
    let e = Store::connect(&settings, dir.path(), "a")
        .await
        .err()
        .unwrap();
    assert!(!e.is_unavailable(), "the server answered: {e}");
    assert!(e.to_string().contains("no_such_database"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_live_state_and_edges_are_not_announced() {
    const PRESENCE: Table = TableDefinition::new("presence");
    const EDGES: Table = TableDefinition::new("topology_edges");
    let dir = tempfile::tempdir().unwrap();
    let Some((a, b)) = pair(true, dir.path()).await else {
        return;
    };
    let mut heard = b.changes();
    until_listening(&a, &mut heard).await;
    let mut batch = Batch::default();
    batch.put(PRESENCE, "agent-1", &1u32).unwrap();
    batch.put(EDGES, "edge-1", &1u32).unwrap();
    a.commit(batch).unwrap();
    a.put(T, "after", &1u32).unwrap();
    // Notifications arrive in commit order: the first B hears is the token written after.
    assert_eq!(
        next_row(&mut heard).await,
        Change::Row {
            table: "tokens".into(),
            key: "after".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_hears_its_tables_and_reads_all_after_a_resync_or_a_lag() {
    use super::Reread;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let mut follower = store.follow(&[T]);
    let row = |table: &str, key: &str| Change::Row {
        table: table.into(),
        key: key.into(),
    };
    store.changes.send(row("agents", "x")).unwrap();
    store.changes.send(row("tokens", "t1")).unwrap();
    store.changes.send(Change::Resync).unwrap();
    assert_eq!(
        follower.next().await,
        Some(Reread::Row {
            table: "tokens".into(),
            key: "t1".into()
        }),
        "another table's row is skipped"
    );
    assert_eq!(follower.next().await, Some(Reread::All));
    // Past the feed's backlog, the follower has missed changes: it reads everything.
    for i in 0..=super::CHANGE_BACKLOG {
        store.changes.send(row("tokens", &i.to_string())).unwrap();
    }
    assert_eq!(follower.next().await, Some(Reread::All));
    drop(store);
    while let Some(r) = follower.next().await {
        assert!(matches!(r, Reread::Row { .. }), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_an_unreadable_notification_means_reading_everything_again() {
    let Some(pg) = testpg::database().await else {
        return;
    };
    let url = pg.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let a = Store::connect(&StoreSettings::Postgres(pg.clone()), dir.path(), "a")
        .await
        .unwrap();
    let b = Store::connect(&StoreSettings::Postgres(pg), dir.path(), "b")
        .await
        .unwrap();
    let mut heard = b.changes();
    until_listening(&a, &mut heard).await;
    // Anyone may NOTIFY the channel: a payload that is not a change is not ignored silently.
    let client = crate::store::testpg::client(&url).await;
    client
        .batch_execute("NOTIFY tapgraph_changes, 'not json'")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), heard.recv())
        .await
        .expect("a change within 5 s")
        .unwrap();
    assert_eq!(got, Change::Resync);
}

/// Returns once `heard` (another replica's feed) hears `a`'s writes, with every notification of
/// the probing drained: probes are written until one is heard, then one last marker, and
/// everything up to the marker is read (notifications arrive in commit order).
async fn until_listening(a: &Store, heard: &mut tokio::sync::broadcast::Receiver<Change>) {
    let probe = Change::Row {
        table: "tokens".into(),
        key: "probe".into(),
    };
    loop {
        a.put(T, "probe", &1u32).unwrap();
        match tokio::time::timeout(Duration::from_millis(200), heard.recv()).await {
            Ok(Ok(c)) if c == probe => break,
            _ => continue,
        }
    }
    a.put(T, "listening", &1u32).unwrap();
    let marker = Change::Row {
        table: "tokens".into(),
        key: "listening".into(),
    };
    while next_row(heard).await != marker {}
}
