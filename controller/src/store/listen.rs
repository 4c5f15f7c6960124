//! The listener: a session of its own per replica that hears the other replicas' changes
//! (`tapgraph_changes`) and events (`tapgraph_events`), and says whether the database answers.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::Change;
use super::postgres::{CHANNEL, EVENTS};

/// A notification's payload.
#[derive(serde::Deserialize)]
struct Notified {
    r: String,
    t: String,
    k: String,
}

/// Listens for other replicas' changes on a session of its own, for as long as the store lives.
/// After every (re)connection it announces [`Change::Resync`]: what was missed meanwhile is read
/// again. Reconnects on the shared backoff; a lost session is logged once per outage.
pub(super) async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    replica: String,
    (changes, events): (
        broadcast::Sender<Change>,
        broadcast::Sender<(String, String)>,
    ),
    database: String,
    down: Arc<Mutex<Option<String>>>,
) {
    // The listener's session is the first to see the database go and come back.
    let set_down = |reason: Option<String>| {
        if let Ok(mut d) = down.lock() {
            *d = reason;
        }
    };
    let mut backoff = tapgraph::backoff::BackoffPolicy::default().start();
    let mut logged = false;
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let mut messages =
                    futures::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed();
                let listening = async {
                    client
                        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {EVENTS}"))
                        .await
                };
                // The LISTEN needs the connection driven while it runs.
                let mut listening = std::pin::pin!(listening);
                let subscribed = loop {
                    tokio::select! {
                        r = &mut listening => break r.map_err(|e| tapgraph::error_chain(&e)),
                        m = messages.next() => match m {
                            Some(Ok(_)) => {}
                            Some(Err(e)) => break Err(tapgraph::error_chain(&e)),
                            None => break Err("connection closed".into()),
                        },
                    }
                };
                match subscribed {
                    Ok(()) => {
                        set_down(None);
                        if logged {
                            tracing::info!(%database, "listening for other replicas' changes again");
                        }
                        backoff.reset();
                        let _ = changes.send(Change::Resync);
                        let reason = loop {
                            match messages.next().await {
                                Some(Ok(AsyncMessage::Notification(n)))
                                    if n.channel() == EVENTS =>
                                {
                                    // Only the sender is read here; the relay reads the rest.
                                    #[derive(serde::Deserialize)]
                                    struct From {
                                        replica: String,
                                    }
                                    match serde_json::from_str::<From>(n.payload()) {
                                        Ok(f) if f.replica != replica => {
                                            let _ =
                                                events.send((f.replica, n.payload().to_string()));
                                        }
                                        Ok(_) => {}
                                        Err(e) => {
                                            tracing::debug!(%e, "an event from another replica without its name; dropped")
                                        }
                                    }
                                }
                                Some(Ok(AsyncMessage::Notification(n))) => {
                                    match serde_json::from_str::<Notified>(n.payload()) {
                                        Ok(c) if c.r != replica => {
                                            let _ = changes.send(Change::Row {
                                                table: c.t,
                                                key: c.k,
                                            });
                                        }
                                        Ok(_) => {}
                                        Err(e) => {
                                            // Which row changed is unknown: the followers read
                                            // everything again rather than miss it.
                                            tracing::warn!(payload = n.payload(), %e, "unreadable change notification; reading everything again");
                                            let _ = changes.send(Change::Resync);
                                        }
                                    }
                                }
                                Some(Ok(_)) => {}
                                Some(Err(e)) => break tapgraph::error_chain(&e),
                                None => break "connection closed".to_string(),
                            }
                        };
                        tracing::warn!(%database, %reason, "lost the session that listens for other replicas' changes; reconnecting");
                        set_down(Some(reason));
                        logged = true;
                    }
                    Err(reason) => {
                        set_down(Some(reason.clone()));
                        if !logged {
                            tracing::warn!(%database, %reason, "cannot listen for other replicas' changes; retrying");
                            logged = true;
                        }
                    }
                }
            }
            Err(e) => {
                set_down(Some(tapgraph::error_chain(&e)));
                if !logged {
                    tracing::warn!(%database, reason = %tapgraph::error_chain(&e), "cannot listen for other replicas' changes; retrying");
                    logged = true;
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
