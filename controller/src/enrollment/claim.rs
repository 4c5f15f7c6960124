//! Which agent id an enrolling host gets, and why. An id is an identity: a host keeps one only by
//! proving it holds the key of a certificate issued for it, or with a join token an operator made
//! for that id; anyone else gets the next free id.

use std::collections::BTreeMap;

use super::{EnrollError, EnrolledAgent, Task};
use crate::auth::Revocations;

/// How an enrollment came by its agent id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Claim {
    /// No agent had the id asked for (from the hostname or `--name`).
    Fresh,
    /// The host proved it holds the key of a certificate issued for the id: it keeps it.
    ProvedKey,
    /// A join token made for this id (`token create --replaces`): an operator approved it.
    Approved,
    /// The id asked for is another host's (or revoked): the next free one was given.
    Taken { asked: String, why: &'static str },
}

impl Claim {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::Fresh => "new",
            Self::ProvedKey => "kept_key",
            Self::Approved => "approved",
            Self::Taken { .. } => "new_id_taken",
        }
    }

    /// Why the host got `id`, for the log and the event.
    pub(super) fn explain(&self, id: &str, token: &str) -> String {
        match self {
            Self::Fresh => format!("{id} was free"),
            Self::ProvedKey => {
                format!("the host proved it holds the key of a certificate issued for {id}")
            }
            Self::Approved => format!("join token {token} was created to replace agent {id}"),
            Self::Taken { asked, why } => format!(
                "{asked} {why}, so this host got a new id; if it is {asked} reinstalled, let it take \
                 the id back with a token from `tapgraphctl token create --replaces {asked}`"
            ),
        }
    }
}

/// An agent id from a hostname: lowercase, safe characters, at most 48 of them.
pub(super) fn id_base(hostname: &str) -> String {
    let mut s: String = hostname
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect();
    s = s
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    s.truncate(48);
    if s.is_empty() { "agent".into() } else { s }
}

/// The id for a host holding key `key_sha256` that asks for `base`: the first of `base`,
/// `base-2`, `base-3`… that is free or was issued to that key. A revoked id is never reused.
pub(super) fn allocate_id(
    agents: &BTreeMap<String, EnrolledAgent>,
    revocations: &Revocations,
    base: &str,
    key_sha256: &str,
) -> (String, Claim) {
    let mut taken: Option<&'static str> = None;
    for n in 1u64.. {
        let candidate = if n == 1 {
            base.to_string()
        } else {
            format!("{base}-{n}")
        };
        let revoked = revocations.is_revoked(&candidate);
        let claim = match agents.get(&candidate) {
            _ if revoked => None,
            Some(a) if a.revoked_at_ms.is_some() => None,
            Some(a) if a.holds(key_sha256) => Some(Claim::ProvedKey),
            Some(_) => None,
            None => Some(match taken {
                None => Claim::Fresh,
                Some(why) => Claim::Taken {
                    asked: base.to_string(),
                    why,
                },
            }),
        };
        match claim {
            Some(claim) => return (candidate, claim),
            None if n == 1 => {
                taken = Some(
                    if revoked || agents.get(base).is_some_and(|a| a.revoked_at_ms.is_some()) {
                        "was revoked"
                    } else {
                        "belongs to another host (its enrollment was not signed by that agent's key)"
                    },
                );
            }
            None => {}
        }
    }
    unreachable!("the id space is unbounded")
}

impl Task {
    /// [`allocate_id`] against this task's agents and revocations.
    pub(super) fn allocate_id(&self, base: &str, key_sha256: &str) -> (String, Claim) {
        allocate_id(&self.agents, &self.revocations, base, key_sha256)
    }

    /// The id a token made by `token create --replaces` gives: its agent's, unless that agent is
    /// connected now (stop it first) or was revoked since.
    pub(super) async fn approved_id(&self, id: &str, token: &str) -> Result<String, EnrollError> {
        if self.revocations.is_revoked(id) {
            return Err(EnrollError::Revoked(id.to_string()));
        }
        if self.registry.is_connected(id).await {
            return Err(EnrollError::Precondition(format!(
                "join token {token} replaces agent {id}, which is connected now: stop that agent \
                 first, or enroll this host with another token to give it a new id"
            )));
        }
        Ok(id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrollment::agents::tests::record;

    #[test]
    fn ids_come_from_hostnames() {
        assert_eq!(id_base("Web-01.Prod"), "web-01.prod");
        assert_eq!(id_base("-weird host!"), "weird-host-");
        assert_eq!(id_base("..."), "agent");
        assert_eq!(id_base(&"a".repeat(100)).len(), 48);
    }

    fn agent(id: &str, key: &str, revoked: bool) -> (String, EnrolledAgent) {
        (id.into(), record(id, key, "old", revoked))
    }

    fn taken(asked: &str, why: &'static str) -> Claim {
        Claim::Taken {
            asked: asked.into(),
            why,
        }
    }

    const OTHER_HOST: &str =
        "belongs to another host (its enrollment was not signed by that agent's key)";

    #[test]
    fn a_host_keeps_an_id_only_with_its_key() {
        let none = Revocations::default();
        let agents = BTreeMap::from([agent("web", "k1", false)]);
        assert_eq!(
            allocate_id(&BTreeMap::new(), &none, "web", "k1"),
            ("web".into(), Claim::Fresh)
        );
        assert_eq!(
            allocate_id(&agents, &none, "web", "k1"),
            ("web".into(), Claim::ProvedKey)
        );
        // The key of the certificate issued before the current one proves it too.
        assert_eq!(
            allocate_id(&agents, &none, "web", "old"),
            ("web".into(), Claim::ProvedKey)
        );
        assert_eq!(
            allocate_id(&agents, &none, "web", "k2"),
            ("web-2".into(), taken("web", OTHER_HOST))
        );
        // A record made before keys were recorded proves nothing, even to an empty key.
        let mut unkeyed = BTreeMap::from([agent("web", "", false)]);
        if let Some(a) = unkeyed.get_mut("web") {
            a.previous_key_sha256.clear();
        }
        assert_eq!(
            allocate_id(&unkeyed, &none, "web", ""),
            ("web-2".into(), taken("web", OTHER_HOST))
        );
    }

    #[test]
    fn a_revoked_id_is_never_given_again_even_to_its_key() {
        let none = Revocations::default();
        let agents = BTreeMap::from([agent("web", "k1", true)]);
        assert_eq!(
            allocate_id(&agents, &none, "web", "k1"),
            ("web-2".into(), taken("web", "was revoked"))
        );
        // Revoked in the shared set only (no record): the same.
        let revoked = Revocations::default();
        revoked.revoke("web");
        assert_eq!(
            allocate_id(&BTreeMap::new(), &revoked, "web", "k1"),
            ("web-2".into(), taken("web", "was revoked"))
        );
    }

    #[test]
    fn the_next_free_id_skips_taken_and_revoked_ones_or_is_the_keys_own() {
        let none = Revocations::default();
        let agents = BTreeMap::from([
            agent("web", "k1", false),
            agent("web-2", "k2", true),
            agent("web-3", "k3", false),
        ]);
        assert_eq!(
            allocate_id(&agents, &none, "web", "k9"),
            ("web-4".into(), taken("web", OTHER_HOST))
        );
        // The host that holds web-3's key gets web-3 back, as a proven key.
        assert_eq!(
            allocate_id(&agents, &none, "web", "k3"),
            ("web-3".into(), Claim::ProvedKey)
        );
        let revoked = Revocations::default();
        revoked.revoke("web-4");
        assert_eq!(
            allocate_id(&agents, &revoked, "web", "k9"),
            ("web-5".into(), taken("web", OTHER_HOST))
        );
    }
}
