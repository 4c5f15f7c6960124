//! Address conflicts told to operators: as `address_conflict` events and WARN lines, a few at
//! once and none again within a minute, so a host flapping its addresses does not flood them. The
//! map and `address_conflicts` show every conflict all the time.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::model::Conflict;
use crate::events::Events;

/// Address conflicts announced at most at once (one snapshot, or the restore); the rest are
/// counted in one summary line. The map and `address_conflicts` show them all.
const CONFLICTS_SHOWN: usize = 3;

/// A conflict (address, claimant) announced is not announced again for this long: a host that
/// drops its addresses and claims them again on alternate snapshots is announced once a minute,
/// not once a cycle.
const CONFLICT_QUIET: Duration = Duration::from_secs(60);

/// Conflicts remembered at most; past it the oldest is forgotten, and may be announced again
/// sooner.
const CONFLICTS_REMEMBERED: usize = 4_096;

/// The conflicts announced within [`CONFLICT_QUIET`], oldest first.
#[derive(Default)]
pub(super) struct Announced {
    order: VecDeque<((IpAddr, String), Instant)>,
    recent: HashSet<(IpAddr, String)>,
}

impl Announced {
    /// Which of `conflicts` to announce at `now`: the first [`CONFLICTS_SHOWN`] not announced
    /// within [`CONFLICT_QUIET`]; and how many were left out as announced lately. Those left
    /// out past the limit are not remembered: a later claim may announce them.
    fn select<'a>(
        &mut self,
        conflicts: &'a [Conflict],
        now: Instant,
    ) -> (Vec<&'a Conflict>, usize) {
        while let Some((key, at)) = self.order.front() {
            if now.saturating_duration_since(*at) < CONFLICT_QUIET
                && self.order.len() < CONFLICTS_REMEMBERED
            {
                break;
            }
            self.recent.remove(key);
            self.order.pop_front();
        }
        let mut shown = Vec::new();
        let mut quiet = 0;
        for c in conflicts {
            let key = (c.address, c.claimant.clone());
            if self.recent.contains(&key) {
                quiet += 1;
                continue;
            }
            if shown.len() == CONFLICTS_SHOWN {
                continue;
            }
            if self.order.len() == CONFLICTS_REMEMBERED
                && let Some((old, _)) = self.order.pop_front()
            {
                self.recent.remove(&old);
            }
            self.recent.insert(key.clone());
            self.order.push_back((key, now));
            shown.push(c);
        }
        (shown, quiet)
    }

    /// Announces new address conflicts as `address_conflict` events and WARN lines: at most
    /// [`CONFLICTS_SHOWN`] per snapshot (`agent`), or per restore (`None`), and none announced
    /// within [`CONFLICT_QUIET`]; one summary line counts those held back.
    pub(super) fn announce(
        &mut self,
        events: &Events,
        agent: Option<&str>,
        conflicts: &[Conflict],
        now: Instant,
    ) {
        if conflicts.is_empty() {
            return;
        }
        let (shown, quiet) = self.select(conflicts, now);
        let when = if agent.is_some() {
            ""
        } else {
            "after a restart, "
        };
        for c in &shown {
            tracing::warn!(address = %c.address, owner = %c.owner, claimant = %c.claimant, restored = agent.is_none(), "address claimed by two hosts; the map keeps it on the owner");
            events.emit_with(
                "address_conflict",
                &c.claimant,
                format!(
                    "{when}agents {} and {} both claim address {}; the map keeps it on {}",
                    c.owner, c.claimant, c.address, c.owner
                ),
                BTreeMap::from([
                    ("address".to_string(), c.address.to_string()),
                    ("owner".to_string(), c.owner.clone()),
                    ("claimant".to_string(), c.claimant.clone()),
                ]),
            );
        }
        let over = conflicts.len() - shown.len() - quiet;
        let agent = agent.unwrap_or("(restore)");
        if over > 0 {
            tracing::warn!(%agent, conflicts = conflicts.len(), announced = shown.len(), not_announced = over + quiet, "address conflicts past the {CONFLICTS_SHOWN} announced at once; the map shows them all");
        } else if quiet > 0 {
            tracing::debug!(%agent, conflicts = conflicts.len(), announced = shown.len(), not_announced = quiet, "address conflicts announced within the last minute, not again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflict(address: u32, claimant: &str) -> Conflict {
        Conflict {
            address: IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + address)),
            owner: "db".into(),
            claimant: claimant.into(),
        }
    }

    #[test]
    fn a_conflict_is_announced_a_few_at_once_and_not_again_within_a_minute() {
        let mut a = Announced::default();
        let five: Vec<_> = (1..=5).map(|n| conflict(n, "rogue")).collect();
        let t0 = Instant::now();
        let (shown, quiet) = a.select(&five, t0);
        assert_eq!(shown, five[..3].iter().collect::<Vec<_>>());
        assert_eq!(quiet, 0);
        // The claims made again: the two held back by the limit now, the rest not again.
        let (shown, quiet) = a.select(&five, t0 + Duration::from_secs(1));
        assert_eq!(shown, five[3..].iter().collect::<Vec<_>>());
        assert_eq!(quiet, 3);
        let (shown, quiet) = a.select(&five, t0 + Duration::from_secs(30));
        assert!(shown.is_empty());
        assert_eq!(quiet, 5);
        // Another claimant of the same address is another conflict.
        let other = [conflict(1, "other")];
        assert_eq!(a.select(&other, t0 + Duration::from_secs(30)).0.len(), 1);
        // A minute after it was announced, a conflict is announced again.
        let (shown, quiet) = a.select(&five, t0 + CONFLICT_QUIET);
        assert_eq!(shown, five[..3].iter().collect::<Vec<_>>());
        assert_eq!(quiet, 2);
    }

    #[test]
    fn the_conflicts_remembered_are_bounded() {
        let mut a = Announced::default();
        let t0 = Instant::now();
        for n in 0..(CONFLICTS_REMEMBERED as u32 + 10) {
            let one = [conflict(n, "rogue")];
            assert_eq!(a.select(&one, t0).0.len(), 1);
        }
        assert_eq!(a.order.len(), CONFLICTS_REMEMBERED);
        assert_eq!(a.recent.len(), CONFLICTS_REMEMBERED);
        // The oldest were forgotten, the newest not.
        assert_eq!(a.select(&[conflict(0, "rogue")], t0).0.len(), 1);
        let newest = CONFLICTS_REMEMBERED as u32 + 9;
        assert_eq!(a.select(&[conflict(newest, "rogue")], t0).1, 1);
    }
}
