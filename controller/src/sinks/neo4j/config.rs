//! What the Neo4j sink is told: where the database is, as whom, and how it writes.

use std::time::Duration;

use crate::sinks::Secret;

#[derive(Debug, Clone)]
pub struct Neo4jSettings {
    /// What neo4rs connects to: `bolt://host:port` and the like, or `host:port`.
    pub address: String,
    pub user: String,
    pub password: Secret,
    /// Empty: the server's default database.
    pub database: String,
    pub batch_size: usize,
    pub interval: Duration,
    pub last_seen_step: Duration,
}

/// Checks `graph.neo4j.uri`: `bolt://`, `neo4j://` (with `+s` or `+ssc`), or a bare `host:port`.
pub fn bolt_address(uri: &str) -> Result<String, String> {
    const SCHEMES: [&str; 6] = [
        "bolt://",
        "neo4j://",
        "bolt+s://",
        "neo4j+s://",
        "bolt+ssc://",
        "neo4j+ssc://",
    ];
    let rest = SCHEMES
        .iter()
        .find_map(|s| uri.strip_prefix(s))
        .unwrap_or(uri);
    if rest.contains("://") {
        return Err(format!(
            "`{uri}`: unknown scheme; use bolt://HOST:PORT or neo4j://HOST:PORT (+s, +ssc for TLS)"
        ));
    }
    let hostport = rest.trim_end_matches('/');
    let ok = hostport
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        return Err(format!(
            "`{uri}`: expected HOST:PORT, e.g. bolt://neo4j.db:7687"
        ));
    }
    Ok(uri.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        assert_eq!(bolt_address("bolt://db:7687").unwrap(), "bolt://db:7687");
        assert_eq!(bolt_address("127.0.0.1:7687/").unwrap(), "127.0.0.1:7687");
        assert!(bolt_address("neo4j+s://graph.example:7687").is_ok());
        assert!(
            bolt_address("http://db:7474")
                .unwrap_err()
                .contains("scheme")
        );
        assert!(bolt_address("bolt://db").unwrap_err().contains("HOST:PORT"));
        assert!(bolt_address("db:0").is_err());
    }
}
