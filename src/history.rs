//! The map's history read back: what was on it at a time, and what changed between two times,
//! from the changes the controller keeps (`GetHistory`). Pure, shared by `tapgraphctl` and
//! anything else that asks.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::proto::HistoryChange;

/// The items present at `at` (Unix ns), by id: each with the change that made it appear.
/// `changes` must be oldest first (as `GetHistory` sends them).
pub fn present_at(changes: &[HistoryChange], at: u64) -> BTreeMap<&str, &HistoryChange> {
    let mut present = BTreeMap::new();
    let changes = changes.iter().filter(|c| c.kind != TRAFFIC);
    for c in changes.take_while(|c| c.at_unix_nanos <= at) {
        if c.appeared {
            present.insert(c.id.as_str(), c);
        } else {
            present.remove(c.id.as_str());
        }
    }
    present
}

/// What changed between two times.
#[derive(Debug, Default, PartialEq)]
pub struct Diff<'a> {
    /// Present at the end and not at the start: each with the change that made it appear.
    pub new: Vec<&'a HistoryChange>,
    /// Present at the start and not at the end: each with the change that made it go.
    pub gone: Vec<&'a HistoryChange>,
    /// Present at neither end but in between (a cron job's connection): each with its first
    /// appearance in the window.
    pub between: Vec<&'a HistoryChange>,
}

/// What changed in `(from, to]` (Unix ns); `changes` oldest first.
pub fn diff(changes: &[HistoryChange], from: u64, to: u64) -> Diff<'_> {
    let before = present_at(changes, from);
    let after = present_at(changes, to);
    let window = || {
        changes
            .iter()
            .filter(move |c| c.kind != TRAFFIC && c.at_unix_nanos > from && c.at_unix_nanos <= to)
    };
    let mut gone_at: BTreeMap<&str, &HistoryChange> = BTreeMap::new();
    let mut first_in: BTreeMap<&str, &HistoryChange> = BTreeMap::new();
    for c in window() {
        if c.appeared {
            first_in.entry(c.id.as_str()).or_insert(c);
        } else {
            gone_at.insert(c.id.as_str(), c);
        }
    }
    let mut d = Diff {
        new: after
            .iter()
            .filter(|(id, _)| !before.contains_key(*id))
            .map(|(_, c)| *c)
            .collect(),
        gone: before
            .keys()
            .filter(|id| !after.contains_key(*id))
            .filter_map(|id| gone_at.get(id).copied())
            .collect(),
        between: first_in
            .iter()
            .filter(|(id, _)| !before.contains_key(*id) && !after.contains_key(*id))
            .map(|(_, c)| *c)
            .collect(),
    };
    for list in [&mut d.new, &mut d.gone, &mut d.between] {
        list.sort_by(|a, b| (a.at_unix_nanos, &a.id).cmp(&(b.at_unix_nanos, &b.id)));
    }
    d
}

/// The kind of a sum of an edge's traffic over an interval (not an item that appears or goes).
pub const TRAFFIC: &str = "traffic";

/// What each edge carried in `(from, to]`, from the interval sums ending in it (an interval that
/// ends inside counts whole): `(edge id, its last sum's change, bytes sent, bytes received)`,
/// the most first.
pub fn traffic_between(
    changes: &[HistoryChange],
    from: u64,
    to: u64,
) -> Vec<(String, &HistoryChange, u64, u64)> {
    let mut sums: BTreeMap<&str, (&HistoryChange, u64, u64)> = BTreeMap::new();
    for c in changes
        .iter()
        .filter(|c| c.kind == TRAFFIC && c.at_unix_nanos > from && c.at_unix_nanos <= to)
    {
        let id = c.id.strip_prefix("traffic:").unwrap_or(&c.id);
        let s = sums.entry(id).or_insert((c, 0, 0));
        s.0 = c;
        s.1 = s.1.saturating_add(c.bytes_sent);
        s.2 = s.2.saturating_add(c.bytes_received);
    }
    let mut out: Vec<_> = sums
        .into_iter()
        .map(|(id, (c, sent, received))| (id.to_string(), c, sent, received))
        .collect();
    out.sort_by(|a, b| (b.2 + b.3).cmp(&(a.2 + a.3)).then_with(|| a.0.cmp(&b.0)));
    out
}

/// The sum for edge `id` over the interval that holds `at`, if one was kept.
pub fn traffic_at<'a>(
    changes: &'a [HistoryChange],
    id: &str,
    at: u64,
) -> Option<&'a HistoryChange> {
    changes.iter().find(|c| {
        c.kind == TRAFFIC
            && c.id.strip_prefix("traffic:") == Some(id)
            && c.at_unix_nanos >= at
            && c.at_unix_nanos
                .saturating_sub(c.interval_ms.saturating_mul(1_000_000))
                < at
    })
}

/// A time as an operator writes it: RFC 3339 (`2026-12-07T04:00:00Z`), or a duration meaning
/// that long before `now` (`90m`, `24h`, `7d`).
pub fn parse_time(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    let text = text.trim();
    let days = text
        .strip_suffix('d')
        .and_then(|n| n.parse::<u64>().ok())
        .map(|n| Duration::from_secs(n.saturating_mul(86_400)));
    if let Some(ago) = days.or_else(|| crate::units::parse_duration(text).ok()) {
        return now
            .checked_sub(ago)
            .ok_or_else(|| format!("`{text}` ago is before 1970"));
    }
    let rfc = ::time::format_description::well_known::Rfc3339;
    match ::time::OffsetDateTime::parse(text, &rfc) {
        Ok(t) => {
            let ns = t.unix_timestamp_nanos();
            u64::try_from(ns)
                .map(|ns| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
                .map_err(|_| format!("`{text}` is before 1970"))
        }
        Err(e) => Err(format!(
            "`{text}` is neither a time (RFC 3339, e.g. 2026-12-07T04:00:00Z) nor a duration ago (e.g. 24h): {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(at: u64, appeared: bool, id: &str) -> HistoryChange {
        HistoryChange {
            at_unix_nanos: at,
            appeared,
            id: id.into(),
            kind: "edge".into(),
            ..Default::default()
        }
    }

    fn ids(list: &[&HistoryChange]) -> Vec<(u64, String)> {
        list.iter()
            .map(|c| (c.at_unix_nanos, c.id.clone()))
            .collect()
    }

    #[test]
    fn the_map_at_a_time_and_what_changed_between_two() {
        let changes = [
            change(1, true, "a"),
            change(2, true, "b"),
            change(5, false, "a"),
            change(6, true, "c"),
            change(7, false, "c"),
            change(8, true, "d"),
            change(9, false, "b"),
            change(9, true, "b"),
        ];
        let at = |t| present_at(&changes, t).into_keys().collect::<Vec<_>>();
        assert_eq!(at(0), Vec::<&str>::new());
        assert_eq!(at(4), ["a", "b"]);
        assert_eq!(at(6), ["b", "c"]);
        assert_eq!(at(9), ["b", "d"], "gone and back at once: still there");
        let d = diff(&changes, 4, 9);
        assert_eq!(ids(&d.new), [(8, "d".to_string())]);
        assert_eq!(ids(&d.gone), [(5, "a".to_string())]);
        assert_eq!(ids(&d.between), [(6, "c".to_string())]);
        assert_eq!(diff(&changes, 9, 9), Diff::default());
    }

    #[test]
    fn traffic_sums_are_kept_apart_and_added_per_edge() {
        let sum = |at: u64, id: &str, sent: u64| HistoryChange {
            at_unix_nanos: at,
            kind: TRAFFIC.into(),
            appeared: true,
            id: format!("traffic:{id}"),
            interval_ms: 2,
            bytes_sent: sent,
            bytes_received: 1,
            ..Default::default()
        };
        let changes = [
            change(1, true, "a"),
            sum(2_000_000, "a", 10),
            sum(4_000_000, "a", 5),
            sum(4_000_000, "b", 100),
        ];
        assert_eq!(
            present_at(&changes, 5_000_000).len(),
            1,
            "sums are not items"
        );
        assert_eq!(diff(&changes, 1, 5_000_000), Diff::default());
        let t = traffic_between(&changes, 0, 5_000_000);
        let t: Vec<_> = t
            .iter()
            .map(|(id, _, s, r)| (id.as_str(), *s, *r))
            .collect();
        assert_eq!(t, [("b", 100, 1), ("a", 15, 2)]);
        assert_eq!(traffic_at(&changes, "a", 3_000_000).unwrap().bytes_sent, 5);
        assert!(traffic_at(&changes, "a", 5_000_000).is_none());
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            parse_time("24h", now).unwrap(),
            now - Duration::from_secs(86_400)
        );
        assert_eq!(
            parse_time("7d", now).unwrap(),
            now - Duration::from_secs(7 * 86_400)
        );
        assert_eq!(
            parse_time("1970-01-02T00:00:00Z", now).unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(86_400)
        );
        let e = parse_time("yesterday", now).unwrap_err();
        assert!(e.contains("`yesterday`") && e.contains("RFC 3339"), "{e}");
        assert!(parse_time("1969-12-31T00:00:00Z", now).is_err());
    }
}
