//! Wall-clock helpers for the wire format (Unix nanoseconds).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in Unix nanoseconds.
pub fn unix_nanos() -> u64 {
    to_unix_nanos(SystemTime::now())
}

pub fn to_unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn from_unix_nanos(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// RFC 3339 UTC text of `t`, for messages and tables.
pub fn rfc3339(t: SystemTime) -> String {
    let odt: ::time::OffsetDateTime = t.into();
    odt.format(&::time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}
