//! The Neo4j sink: the map, as operators see it ([`view::map`], typed), mirrored into a Bolt
//! graph database so that Cypher, Neo4j Browser and Bloom work on it.
//!
//! One writer task ([`Sink`], in `driver.rs`). Every `interval` it takes the view, turns it into
//! rows (`rows.rs`), diffs them against what it knows the database holds (a hash per node and
//! relationship id, `diff.rs`), and writes only the difference: nodes upserted, then
//! relationships upserted, then relationships deleted, then nodes deleted, each in `UNWIND`
//! batches of `batch_size` rows inside an explicit transaction. Values travel as parameters
//! only; labels and relationship types come from `rows.rs`'s enums, never from data; every
//! statement is in `cypher.rs`. Nodes are `MERGE`d on a unique `id`, under uniqueness
//! constraints created at start (`IF NOT EXISTS`); relationships, which Cypher cannot constrain
//! portably, carry a unique `id` too, indexed, and are created only when the session knows the
//! database lacks them.
//!
//! What the database holds is known only while the connection lasts: at start, after any failed
//! write, and every 10 minutes, the sink reads every id back from the database before diffing
//! (and removes copies of an id, should another writer have made any). That one read is
//! the reconciliation: whatever the model lacks is deleted, whatever differs or is missing is
//! written. So after a restart of either side, or an outage during which the map changed,
//! the database ends up equal to the model, without duplicates or stale edges. Failures are
//! classed (`failure.rs`: credentials, unreachable, refused) to decide how long to wait and what
//! to log.
//!
//! Every snapshot refreshes the `last_seen` of every live edge, and rewriting all of them every
//! few seconds would make the "changes" the whole graph. So a change of `last_seen` alone is
//! written only when it enters a new `last_seen_step` (10 min by default); whatever is written is
//! the model's real `last_seen` at that pass, never before `first_seen`. An edge is rewritten,
//! with its exact `last_seen`, whenever anything else of it changes, `active` included: so an
//! inactive edge's `last_seen` is exact, and an active edge's trails the truth by less than a
//! step. `active` is exact: the sink wakes when the next active edge turns inactive (`ttl` after
//! its `last_seen`), the model's generation being unchanged by that.
//!
//! A pass costs a diff of the whole map (0.18 s for 100,000 edges), so it is skipped while the
//! model's generation is unchanged, no edge turned inactive and no event came (labels set, rules
//! changed, an agent connected or lost: they change the view without changing the model), for up
//! to a minute (reverse-DNS names), and diffing never takes more than a twentieth of the time.
//!
//! [`view::map`]: crate::topology::view::map

mod config;
mod cypher;
mod diff;
mod driver;
mod failure;
mod rows;

pub use config::{Neo4jSettings, bolt_address};
pub use driver::{ROLE, Sink};
