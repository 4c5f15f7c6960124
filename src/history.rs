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
    for c in changes.iter().take_while(|c| c.at_unix_nanos <= at) {
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
            .filter(move |c| c.at_unix_nanos > from && c.at_unix_nanos <= to)
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
