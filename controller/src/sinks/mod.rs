//! Sinks: outside stores the map is mirrored into, each kept equal to the map by one writer task.
//!
//! One folder per kind of store. Today there is one, [`neo4j`] (any Bolt server that speaks Neo4j's
//! Cypher); the next kind sits beside it and reports through the same [`SinkHandle`], so the JSON
//! API and `/metrics` show it without knowing which store it writes to. What every sink shares
//! lives here: its stats and how secrets are kept out of logs.

pub mod neo4j;

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// A password: kept out of logs and debug output.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// What the sink has done, for `/api/v1/topology/stats` and logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkStats {
    /// `connecting`, `in_sync`, `writing`, `unreachable`, `auth_failed`, `failing`, or
    /// `standby` on a replica that does not run the sink (another one does).
    pub state: String,
    /// Whether this replica runs the sink: exactly one replica does (always this one with the
    /// embedded store).
    pub leader: bool,
    pub last_error: String,
    /// Seconds since the database last equalled the model (0 when it does now).
    pub lag_seconds: f64,
    /// How long, at most, a change to the map waited for the database in the last pass that
    /// wrote changes: from just after the pass before read the map until this one committed.
    pub delay_seconds: f64,
    pub transactions: u64,
    pub rows_written: u64,
    pub rows_deleted: u64,
    pub last_batch_rows: u64,
    pub largest_batch_rows: u64,
    pub errors: u64,
    /// Full reads of the database's ids (at start and after failures).
    pub reconciliations: u64,
    /// Passes that read the map and wrote its difference to the database (often none).
    pub passes: u64,
    pub nodes: u64,
    pub relationships: u64,
    /// Time the last pass took to find the difference (view and diff, before writing; waits for
    /// the topology task included).
    pub last_diff_seconds: f64,
    /// Time spent in write transactions, in all.
    pub write_seconds: f64,
}

/// The read side of a running sink: a copy of its [`SinkStats`] on demand, for the JSON API and
/// `/metrics`. Only the sink's own task writes them; reading never waits for the database (the
/// lock is held for a copy, never across a write), so a sink stuck on an outage still answers
/// here with its state, its last error and how far behind the map it is.
#[derive(Clone, Default)]
pub struct SinkHandle(Arc<Mutex<SinkStats>>);

impl SinkHandle {
    pub fn stats(&self) -> SinkStats {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut SinkStats)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }

    fn set_state(&self, state: &str) {
        self.update(|s| s.state = state.into());
    }

    /// One committed transaction of `rows` rows, deletions or writes.
    fn record_batch(&self, rows: u64, deleted: bool, took: std::time::Duration) {
        self.update(|s| {
            s.transactions += 1;
            s.write_seconds += took.as_secs_f64();
            if deleted {
                s.rows_deleted += rows;
            } else {
                s.rows_written += rows;
            }
            s.last_batch_rows = rows;
            s.largest_batch_rows = s.largest_batch_rows.max(rows);
        });
    }

    /// A pass left the database equal to the map; `delay` is how long its oldest change waited,
    /// when it wrote any.
    fn record_in_sync(&self, delay: Option<f64>) {
        self.update(|s| {
            s.state = "in_sync".into();
            s.passes += 1;
            s.lag_seconds = 0.0;
            if let Some(delay) = delay {
                s.delay_seconds = delay;
            }
        });
    }

    /// A pass failed, leaving the database `lag` seconds behind the map.
    fn record_failure(&self, state: &str, error: &str, lag: f64) {
        self.update(|s| {
            s.state = state.into();
            s.last_error = error.to_string();
            s.errors += 1;
            s.lag_seconds = lag;
        });
    }
}
