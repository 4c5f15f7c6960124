//! Which policy an agent runs, as pure rules: the selectors, the stored form of a policy, how the
//! most specific match is chosen ([`resolve`]), and what is refused when a policy is set (ties,
//! reserved names). Both the policy task and the registry use these; this module depends on
//! neither, so neither depends on the other through it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use tapgraph::proto;

/// Name of the policy from configuration that applies when nothing else matches.
pub const DEFAULT_NAME: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selector {
    All,
    Labels(BTreeMap<String, String>),
    Agent(String),
}

impl Selector {
    /// Higher is more specific: (kind rank, number of labels).
    fn specificity(&self) -> (u8, usize) {
        match self {
            Selector::All => (0, 0),
            Selector::Labels(l) => (1, l.len()),
            Selector::Agent(_) => (2, 0),
        }
    }

    pub fn matches(&self, agent_id: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::All => true,
            Selector::Labels(sel) => tapgraph::labels::matches(sel, labels),
            Selector::Agent(id) => id == agent_id,
        }
    }

    /// Whether some agent could match both with equal specificity.
    fn ties_with(&self, other: &Selector) -> bool {
        match (self, other) {
            (Selector::All, Selector::All) => true,
            (Selector::Agent(a), Selector::Agent(b)) => a == b,
            (Selector::Labels(a), Selector::Labels(b)) => {
                a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_none_or(|w| w == v))
            }
            _ => false,
        }
    }

    pub fn to_proto(&self) -> proto::Selector {
        let kind = match self {
            Selector::All => proto::selector::Kind::All(true),
            Selector::Labels(l) => proto::selector::Kind::Labels(proto::Labels {
                labels: l.clone().into_iter().collect(),
            }),
            Selector::Agent(id) => proto::selector::Kind::AgentId(id.clone()),
        };
        proto::Selector { kind: Some(kind) }
    }

    pub fn from_proto(p: Option<&proto::Selector>) -> Result<Self, String> {
        match p.and_then(|s| s.kind.as_ref()) {
            None => Err("a selector is required: all agents, labels, or one agent".into()),
            Some(proto::selector::Kind::All(_)) => Ok(Selector::All),
            Some(proto::selector::Kind::AgentId(id)) => {
                tapgraph::identity::validate_name("agent", id).map_err(|e| e.to_string())?;
                Ok(Selector::Agent(id.clone()))
            }
            Some(proto::selector::Kind::Labels(l)) => {
                if l.labels.is_empty() {
                    return Err("a label selector needs at least one label".into());
                }
                for (k, v) in &l.labels {
                    tapgraph::labels::check(k, v)?;
                }
                Ok(Selector::Labels(l.labels.clone().into_iter().collect()))
            }
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => f.write_str("all agents"),
            Selector::Agent(id) => write!(f, "agent {id}"),
            Selector::Labels(l) => {
                let parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "labels {}", parts.join(","))
            }
        }
    }
}

/// A policy as stored: its name, selector, contents and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub name: String,
    pub selector: Selector,
    pub spec: StoredSpec,
    pub version: u64,
    pub updated_at_ms: u64,
}

/// The spec in its wire form (prost messages are not serde types; the proto is the stable form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSpec(#[serde(with = "proto_bytes")] pub proto::Policy);

// prost derives `Eq` for no message with a repeated message field; its `PartialEq` is structural
// all the same (no floats anywhere in a policy).
impl Eq for StoredSpec {}

mod proto_bytes {
    use prost::Message;
    use serde::{Deserialize, Deserializer, Serializer};
    use tapgraph::proto::Policy;

    pub fn serialize<S: Serializer>(p: &Policy, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&p.encode_to_vec())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Policy, D::Error> {
        let bytes: Vec<u8> = Deserialize::deserialize(d)?;
        Policy::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
    }
}

impl StoredPolicy {
    /// The message pushed to agents.
    pub fn message(&self) -> proto::Policy {
        let mut p = self.spec.0.clone();
        p.version = self.version;
        p.name = self.name.clone();
        p
    }

    pub fn to_proto(&self) -> proto::StoredPolicy {
        proto::StoredPolicy {
            name: self.name.clone(),
            selector: Some(self.selector.to_proto()),
            policy: Some(self.message()),
            updated_at_unix_nanos: self.updated_at_ms.saturating_mul(1_000_000),
        }
    }
}

/// The policy that applies to an agent: the most specific match, else `default`.
pub fn resolve<'a>(
    policies: &'a [StoredPolicy],
    default: &'a StoredPolicy,
    agent_id: &str,
    labels: &BTreeMap<String, String>,
) -> &'a StoredPolicy {
    policies
        .iter()
        .filter(|p| p.selector.matches(agent_id, labels))
        .max_by_key(|p| p.selector.specificity())
        .unwrap_or(default)
}

/// Refuses `candidate` if it could tie with another policy for some agent.
pub fn check_ties(
    policies: &[StoredPolicy],
    name: &str,
    selector: &Selector,
) -> Result<(), String> {
    match policies
        .iter()
        .find(|p| p.name != name && p.selector.ties_with(selector))
    {
        Some(other) => Err(format!(
            "policy {name} ({selector}) would tie with policy {} ({}) for an agent matching both; \
             make one more specific or delete one",
            other.name, other.selector
        )),
        None => Ok(()),
    }
}

/// Validates a policy name: it is shown in tables and used as a key.
pub fn check_name(name: &str) -> Result<(), String> {
    if name == DEFAULT_NAME {
        return Err(format!(
            "`{DEFAULT_NAME}` is the policy from the controller's configuration; choose another name"
        ));
    }
    tapgraph::identity::validate_name("policy", name).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use tapgraph::policy::PolicySpec;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn policy(name: &str, selector: Selector) -> StoredPolicy {
        StoredPolicy {
            name: name.into(),
            selector,
            spec: StoredSpec(PolicySpec::default().to_proto(0, name)),
            version: 1,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn the_most_specific_policy_wins() {
        let default = policy("default", Selector::All);
        let ps = vec![
            policy("fleet", Selector::All),
            policy("web", Selector::Labels(labels(&[("role", "web")]))),
            policy(
                "web-prod",
                Selector::Labels(labels(&[("role", "web"), ("env", "prod")])),
            ),
            policy("pinned", Selector::Agent("a7".into())),
        ];
        let pick =
            |id: &str, l: &[(&str, &str)]| resolve(&ps, &default, id, &labels(l)).name.clone();
        assert_eq!(pick("a1", &[]), "fleet");
        assert_eq!(pick("a1", &[("role", "web")]), "web");
        assert_eq!(pick("a1", &[("role", "web"), ("env", "prod")]), "web-prod");
        assert_eq!(pick("a7", &[("role", "web"), ("env", "prod")]), "pinned");
        assert_eq!(
            resolve(&ps[1..2], &default, "a1", &labels(&[])).name,
            "default"
        );
    }

    /// `max_by_key` keeps the last of equal keys, so a list written least to most specific would
    /// pass even if specificity were a constant: the same choices, from the list reversed.
    #[test]
    fn the_most_specific_policy_wins_whatever_the_order() {
        let default = policy("default", Selector::All);
        let mut ps = vec![
            policy("pinned", Selector::Agent("a7".into())),
            policy(
                "web-prod",
                Selector::Labels(labels(&[("role", "web"), ("env", "prod")])),
            ),
            policy("web", Selector::Labels(labels(&[("role", "web")]))),
            policy("fleet", Selector::All),
        ];
        for _ in 0..2 {
            let pick =
                |id: &str, l: &[(&str, &str)]| resolve(&ps, &default, id, &labels(l)).name.clone();
            assert_eq!(pick("a1", &[]), "fleet");
            assert_eq!(pick("a1", &[("role", "web")]), "web");
            assert_eq!(pick("a1", &[("role", "web"), ("env", "prod")]), "web-prod");
            assert_eq!(pick("a7", &[("role", "web"), ("env", "prod")]), "pinned");
            assert_eq!(pick("a7", &[]), "pinned");
            ps.reverse();
        }
    }

    #[test]
    fn specificity_ranks_agent_over_labels_over_all() {
        let all = Selector::All.specificity();
        let none = Selector::Labels(BTreeMap::new()).specificity();
        let one = Selector::Labels(labels(&[("a", "1")])).specificity();
        let three = Selector::Labels(labels(&[("a", "1"), ("b", "2"), ("c", "3")])).specificity();
        let agent = Selector::Agent("a7".into()).specificity();
        assert!(
            all < none,
            "a label selector, even empty, is more specific than all"
        );
        assert!(none < one && one < three, "more labels are more specific");
        assert!(three < agent, "one agent is more specific than any labels");
        assert_eq!(all, Selector::All.specificity());
    }

    #[test]
    fn ties_are_refused_at_set_time() {
        let ps = vec![
            policy("fleet", Selector::All),
            policy("web", Selector::Labels(labels(&[("role", "web")]))),
            policy("pinned", Selector::Agent("a7".into())),
        ];
        let tie = |name: &str, s: Selector| check_ties(&ps, name, &s).is_err();
        assert!(tie("fleet2", Selector::All));
        assert!(
            tie("prod", Selector::Labels(labels(&[("env", "prod")]))),
            "role=web,env=prod matches both"
        );
        assert!(tie("pinned2", Selector::Agent("a7".into())));
        assert!(
            !tie("db", Selector::Labels(labels(&[("role", "db")]))),
            "disjoint"
        );
        assert!(!tie(
            "web-prod",
            Selector::Labels(labels(&[("role", "web"), ("env", "prod")]))
        ));
        assert!(
            !tie("web", Selector::Labels(labels(&[("env", "prod")]))),
            "replacing itself"
        );
        let e = check_ties(&ps, "prod", &Selector::Labels(labels(&[("env", "prod")]))).unwrap_err();
        assert!(
            e.contains("would tie with policy web (labels role=web)"),
            "{e}"
        );
    }

    #[test]
    fn only_selectors_of_one_kind_and_rank_tie() {
        let web = Selector::Labels(labels(&[("role", "web")]));
        let web_prod = Selector::Labels(labels(&[("role", "web"), ("env", "prod")]));
        let db_prod = Selector::Labels(labels(&[("role", "db"), ("env", "prod")]));
        let web_eu = Selector::Labels(labels(&[("role", "web"), ("zone", "eu")]));
        assert!(
            web_prod.ties_with(&web_eu),
            "an agent may carry all three labels"
        );
        assert!(web_prod.ties_with(&web_prod.clone()));
        assert!(
            !web_prod.ties_with(&db_prod),
            "role=web and role=db exclude each other"
        );
        assert!(!web.ties_with(&web_prod) && !web_prod.ties_with(&web));
        let a7 = Selector::Agent("a7".into());
        assert!(!a7.ties_with(&Selector::Agent("a8".into())));
        for (a, b) in [(&a7, &Selector::All), (&web, &Selector::All), (&a7, &web)] {
            assert!(!a.ties_with(b) && !b.ties_with(a), "{a} and {b}");
        }
    }

    #[test]
    fn selectors_match_by_agent_labels_or_all() {
        let web = Selector::Labels(labels(&[("role", "web")]));
        assert!(web.matches("a1", &labels(&[("role", "web"), ("env", "prod")])));
        assert!(!web.matches("a1", &labels(&[("role", "db")])));
        assert!(!web.matches("a1", &labels(&[])));
        assert!(Selector::All.matches("a1", &labels(&[])));
        assert!(Selector::Agent("a7".into()).matches("a7", &labels(&[])));
        assert!(!Selector::Agent("a7".into()).matches("a1", &labels(&[])));
    }

    #[test]
    fn selectors_round_trip_through_the_wire_and_bad_ones_are_refused() {
        for s in [
            Selector::All,
            Selector::Agent("a7".into()),
            Selector::Labels(labels(&[("role", "web"), ("env", "prod")])),
        ] {
            assert_eq!(Selector::from_proto(Some(&s.to_proto())), Ok(s));
        }
        let e = Selector::from_proto(None).unwrap_err();
        assert!(e.contains("a selector is required"), "{e}");
        let empty = proto::Selector { kind: None };
        assert!(Selector::from_proto(Some(&empty)).is_err());
        let wire = |kind| Some(proto::Selector { kind: Some(kind) });
        let no_labels = wire(proto::selector::Kind::Labels(proto::Labels::default()));
        let e = Selector::from_proto(no_labels.as_ref()).unwrap_err();
        assert!(e.contains("at least one label"), "{e}");
        let bad_key = wire(proto::selector::Kind::Labels(proto::Labels {
            labels: [("-bad".to_string(), "x".to_string())]
                .into_iter()
                .collect(),
        }));
        assert!(Selector::from_proto(bad_key.as_ref()).is_err());
        let bad_id = wire(proto::selector::Kind::AgentId("bad id".into()));
        assert!(Selector::from_proto(bad_id.as_ref()).is_err());
    }

    #[test]
    fn selectors_read_as_operators_write_them() {
        assert_eq!(Selector::All.to_string(), "all agents");
        assert_eq!(Selector::Agent("a7".into()).to_string(), "agent a7");
        let l = Selector::Labels(labels(&[("role", "web"), ("env", "prod")]));
        assert_eq!(l.to_string(), "labels env=prod,role=web");
    }

    #[test]
    fn the_pushed_message_carries_the_stored_name_and_version() {
        let mut p = policy("web", Selector::Labels(labels(&[("role", "web")])));
        p.spec.0.name = "stale".into();
        p.version = 7;
        p.updated_at_ms = 1_500;
        let m = p.message();
        assert_eq!((m.name.as_str(), m.version), ("web", 7));
        let wire = p.to_proto();
        assert_eq!(wire.name, "web");
        assert_eq!(wire.policy, Some(m));
        assert_eq!(wire.updated_at_unix_nanos, 1_500_000_000);
        assert_eq!(wire.selector, Some(p.selector.to_proto()));
    }

    #[test]
    fn a_stored_policy_survives_its_json_form() {
        let mut p = policy("web", Selector::Labels(labels(&[("role", "web")])));
        p.spec.0.heartbeat_interval_ms = 1_234;
        let json = serde_json::to_vec(&p).unwrap();
        let back: StoredPolicy = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, p);
        let garbage =
            br#"{"name":"x","selector":"All","spec":[255,255,255],"version":1,"updated_at_ms":0}"#;
        assert!(serde_json::from_slice::<StoredPolicy>(garbage).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("web").is_ok());
        assert!(check_name("default").is_err());
        assert!(check_name("bad name").is_err());
        assert!(
            check_name(DEFAULT_NAME)
                .unwrap_err()
                .contains("configuration")
        );
    }
}
