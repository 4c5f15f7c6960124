//! Join tokens: `tgj.<id>.<secret>`. Only a SHA-256 of the secret is stored; the id names the token
//! in listings and revocations without revealing it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const PREFIX: &str = "tgj";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "malformed join token: expected tgj.<16 hex>.<32 hex>, as `tapgraphctl token create` prints"
    )]
    Malformed,
    #[error("unknown join token {0}")]
    Unknown(String),
    #[error("join token {id} expired at {at}")]
    Expired { id: String, at: String },
    #[error("join token {0} has no uses left")]
    Exhausted(String),
    #[error("join token {0} was revoked")]
    Revoked(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    /// SHA-256 of the secret part, hex.
    pub secret_sha256: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub uses_left: u32,
    pub labels: BTreeMap<String, String>,
    pub description: String,
    pub revoked: bool,
    /// The agent id this token was made for (`token create --replaces`): the host enrolling with it
    /// takes that id over, with its new key, as an operator approved.
    #[serde(default)]
    pub replaces: Option<String>,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Formats Unix milliseconds as RFC 3339 UTC, for messages.
fn rfc3339(ms: u64) -> String {
    tapgraph::time::rfc3339(tapgraph::time::from_unix_nanos(
        ms.saturating_mul(1_000_000),
    ))
}

impl Token {
    /// A new token and its text, shown once.
    pub fn generate(
        now_ms: u64,
        ttl_ms: u64,
        uses: u32,
        labels: BTreeMap<String, String>,
        description: String,
        replaces: Option<String>,
    ) -> (String, Token) {
        let id = hex(&rand::random::<[u8; 8]>());
        let secret = hex(&rand::random::<[u8; 16]>());
        let token = Token {
            secret_sha256: hash(&secret),
            id: id.clone(),
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
            uses_left: uses,
            labels,
            description,
            revoked: false,
            replaces,
        };
        (format!("{PREFIX}.{id}.{secret}"), token)
    }

    /// Checks `secret` and the token's state at `now_ms`, without consuming a use.
    pub fn check(&self, secret: &str, now_ms: u64) -> Result<(), TokenError> {
        // The comparison is on hashes of a 128-bit secret: timing reveals nothing usable.
        if hash(secret) != self.secret_sha256 {
            return Err(TokenError::Unknown(self.id.clone()));
        }
        if self.revoked {
            return Err(TokenError::Revoked(self.id.clone()));
        }
        if now_ms >= self.expires_at_ms {
            return Err(TokenError::Expired {
                id: self.id.clone(),
                at: rfc3339(self.expires_at_ms),
            });
        }
        if self.uses_left == 0 {
            return Err(TokenError::Exhausted(self.id.clone()));
        }
        Ok(())
    }
}

/// Splits a token text into (id, secret).
pub fn parse(text: &str) -> Result<(&str, &str), TokenError> {
    split(PREFIX, text).ok_or(TokenError::Malformed)
}

/// `PREFIX.<16 hex>.<32 hex>` into (id, secret); `None` for anything else.
pub(crate) fn split<'a>(prefix: &str, text: &'a str) -> Option<(&'a str, &'a str)> {
    let mut parts = text.trim().split('.');
    let (Some(p), Some(id), Some(secret), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let is_hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    (p == prefix && is_hex(id, 16) && is_hex(secret, 32)).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(uses: u32) -> (String, Token) {
        Token::generate(1_000, 60_000, uses, BTreeMap::new(), String::new(), None)
    }

    #[test]
    fn a_fresh_token_checks_and_only_its_hash_is_kept() {
        let (text, t) = token(1);
        let (id, secret) = parse(&text).unwrap();
        assert_eq!(id, t.id);
        assert!(!serde_json::to_string(&t).unwrap().contains(secret));
        assert_eq!(t.check(secret, 2_000), Ok(()));
    }

    #[test]
    fn every_bad_state_is_named() {
        let (text, mut t) = token(1);
        let (_, secret) = parse(&text).unwrap();
        assert!(matches!(
            t.check(&"0".repeat(32), 2_000),
            Err(TokenError::Unknown(_))
        ));
        assert!(matches!(
            t.check(secret, 61_000),
            Err(TokenError::Expired { .. })
        ));
        t.uses_left = 0;
        assert!(matches!(
            t.check(secret, 2_000),
            Err(TokenError::Exhausted(_))
        ));
        t.revoked = true;
        assert!(matches!(
            t.check(secret, 2_000),
            Err(TokenError::Revoked(_))
        ));
    }

    #[test]
    fn malformed_texts_are_refused() {
        for bad in [
            "",
            "tgj",
            "tgj.abc.def",
            "xyz.0123456789abcdef.0123456789abcdef0123456789abcdef",
            "tgj.0123456789abcdef.0123456789abcdef0123456789abcdeg",
            "tgj.0123456789abcdef.0123456789abcdef0123456789abcdef.x",
        ] {
            assert_eq!(parse(bad), Err(TokenError::Malformed), "{bad}");
        }
    }

    #[test]
    fn expiry_is_printed_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
