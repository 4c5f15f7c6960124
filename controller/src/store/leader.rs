//! Leader election among replicas: a task that runs on exactly one replica at a time (the Neo4j
//! sink, the map's cleanup) asks [`Store::leadership`](super::Store::leadership) and works only
//! while it says `true`.
//!
//! On PostgreSQL the leader is the replica whose session holds a session-level advisory lock named
//! after the role. The lock lives exactly as long as that session: a replica that stops or is
//! killed closes it and the server releases the lock at once; the others try for it every second,
//! so one of them leads within a second. A holder whose host vanished leaves a half-open
//! connection: the session is made to end on the server after [`LEASE`] without a word from the
//! holder (`idle_session_timeout`, and TCP keepalives and `tcp_user_timeout` for older servers), and
//! the holder pings every second and steps down as soon as a ping fails or takes over
//! [`PING_TIMEOUT`], before the server can give the lock to another replica. So a dead holder is
//! replaced within one lease (five seconds) plus a retry, and two replicas lead at once only if a
//! holder's process is frozen past the lease, until its next ping after it wakes.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The longest the server keeps a silent holder's session, and so its lock.
pub const LEASE: Duration = Duration::from_secs(5);
/// How often a holder pings its session and a non-holder tries for the lock.
const RETRY: Duration = Duration::from_secs(1);
/// A ping slower than this counts as a lost session: the holder steps down.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// The advisory locks' class ("tgld"): the two-key form, apart from the one-key locks the store
/// takes for migrations and preconditions.
const CLASS: i32 = 0x7467_6c64;

/// The server ends the session when the holder goes silent for a lease: these settings of the
/// session do it (each is tried alone: an older server lacks some).
fn session_settings() -> [String; 5] {
    let ms = LEASE.as_millis();
    [
        format!("SET idle_session_timeout = {ms}"),
        format!("SET tcp_user_timeout = {ms}"),
        "SET tcp_keepalives_idle = 2".to_string(),
        "SET tcp_keepalives_interval = 1".to_string(),
        "SET tcp_keepalives_count = 3".to_string(),
    ]
}

/// Holds or tries for the lock of `role` on a session of its own until every receiver of
/// `leading` is gone, telling them whether this replica leads.
pub(super) async fn hold(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    role: String,
    database: String,
    leading: watch::Sender<bool>,
) {
    let mut logged = false;
    loop {
        let reason = tokio::select! {
            _ = leading.closed() => return,
            reason = session(&config, &tls, &role, &leading) => reason,
        };
        if *leading.borrow() {
            tracing::warn!(%role, %database, %reason, "lost the database session that made this replica the leader; stepping down");
            leading.send_replace(false);
        } else if !logged {
            tracing::warn!(%role, %database, %reason, "cannot try for leadership; retrying");
        }
        logged = true;
        tokio::select! {
            _ = leading.closed() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// One session: tries for the lock every [`RETRY`] and, once held, pings it as often. Returns why
/// the session is no longer usable; dropping it releases the lock.
async fn session(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    role: &str,
    leading: &watch::Sender<bool>,
) -> String {
    let (client, connection) = match config.connect(tls.clone()).await {
        Ok(c) => c,
        Err(e) => return tapgraph::error_chain(&e),
    };
    // The connection is driven beside the client; it ends when the client is dropped.
    let driver = tokio::spawn(connection);
    let _driver = AbortOnDrop(driver);
    for set in session_settings() {
        // An older server lacks some of them; the others still bound a silent holder.
        if let Err(e) = client.batch_execute(&set).await
            && e.as_db_error().is_none()
        {
            return tapgraph::error_chain(&e);
        }
    }
    let mut ticks = tokio::time::interval(RETRY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let leads = *leading.borrow();
        let asked = if leads {
            tokio::time::timeout(PING_TIMEOUT, client.query_one("SELECT true", &[])).await
        } else {
            tokio::time::timeout(
                PING_TIMEOUT,
                client.query_one(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))",
                    &[&CLASS, &role],
                ),
            )
            .await
        };
        match asked {
            Ok(Ok(row)) => {
                let held: bool = row.get(0);
                if held && !leads {
                    tracing::info!(%role, "this replica leads now");
                    leading.send_replace(true);
                }
            }
            Ok(Err(e)) => return tapgraph::error_chain(&e),
            Err(_) => return format!("no answer within {PING_TIMEOUT:?}"),
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate::store::{Store, StoreSettings, testpg};

    /// Waits until `f` holds, for at most 15 s.
    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + std::time::Duration::from_secs(15);
        while !f() {
            assert!(Instant::now() < deadline, "{what}: not within 15 s");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_embedded_store_always_leads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let mut leading = store.leadership("x");
        assert!(*leading.borrow_and_update());
        assert!(leading.changed().await.is_err(), "it never changes");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_one_replica_leads_and_another_takes_over_when_it_goes() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings::Postgres(pg);
        let a = Store::connect(&settings, dir.path(), "a").await.unwrap();
        let b = Store::connect(&settings, dir.path(), "b").await.unwrap();
        let la = a.leadership("x");
        let lb = b.leadership("x");
        // Another role is a lock of its own.
        let other = b.leadership("y");
        until("one leader", || *la.borrow() || *lb.borrow()).await;
        until("the other role has a leader", || *other.borrow()).await;
        // Several tries later, still exactly one.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert!(*la.borrow() ^ *lb.borrow(), "exactly one leads");
        let (holder, holder_rx, follower) = if *la.borrow() {
            (a, la, lb)
        } else {
            (b, lb, la)
        };
        assert!(!*follower.borrow());
        drop(holder_rx);
        drop(holder);
        until("the other replica takes over", || *follower.borrow()).await;
    }
}
