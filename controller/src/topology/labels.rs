//! Label rules from configuration: CIDR → labels for addresses (name the SaaS range, the partner
//! network, the old DC), hostname pattern → labels for hosts (`web-*` → role=web).
//!
//! Written as `CIDR k=v,k=v; CIDR k=v` and `PATTERN k=v; PATTERN k=v` so that one string carries a
//! whole rule set in a file, an environment variable or a Helm value alike.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use wildmatch::WildMatch;

type Labels = BTreeMap<String, String>;

#[derive(Debug, Default, Clone)]
pub struct LabelRules {
    cidr: Vec<(IpNet, Labels)>,
    hostname: Vec<(String, WildMatch, Labels)>,
}

fn rules<T>(
    text: &str,
    what: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<(T, Labels)>, String> {
    let mut out = Vec::new();
    for rule in text.split(';').map(str::trim).filter(|r| !r.is_empty()) {
        let (head, labels) = rule.split_once(char::is_whitespace).ok_or_else(|| {
            format!("rule `{rule}` has no labels: write `{what} key=value,key=value`")
        })?;
        let labels = tapgraph::labels::parse_selector(labels.trim())
            .map_err(|e| format!("rule `{rule}`: {e}"))?;
        if labels.is_empty() {
            return Err(format!("rule `{rule}` has no labels"));
        }
        out.push((
            parse(head).map_err(|e| format!("rule `{rule}`: {e}"))?,
            labels,
        ));
    }
    Ok(out)
}

impl LabelRules {
    /// Parses the two rule sets; the error names the rule that is wrong.
    pub fn parse(cidr: &str, hostname: &str) -> Result<Self, (&'static str, String)> {
        let cidr = rules(cidr, "CIDR", |c| {
            c.parse::<IpNet>()
                .map_err(|_| format!("`{c}` is not a CIDR such as 10.0.0.0/8"))
        })
        .map_err(|e| ("topology.cidr_labels", e))?;
        let hostname = rules(hostname, "PATTERN", |p| {
            Ok((p.to_string(), WildMatch::new(p)))
        })
        .map_err(|e| ("topology.hostname_labels", e))?
        .into_iter()
        .map(|((text, m), l)| (text, m, l))
        .collect();
        Ok(Self { cidr, hostname })
    }

    /// Labels of an address: every matching CIDR rule, the longest prefix winning a conflict.
    pub fn for_address(&self, ip: &IpAddr) -> Labels {
        let mut matching: Vec<&(IpNet, Labels)> = self
            .cidr
            .iter()
            .filter(|(net, _)| net.contains(ip))
            .collect();
        matching.sort_by_key(|(net, _)| net.prefix_len());
        matching.into_iter().flat_map(|(_, l)| l.clone()).collect()
    }

    /// Labels of a host by its hostname: every matching pattern, later rules winning a conflict.
    pub fn for_hostname(&self, hostname: &str) -> Labels {
        self.hostname
            .iter()
            .filter(|(_, m, _)| m.matches(hostname))
            .flat_map(|(_, _, l)| l.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_rules_label_addresses_longest_prefix_last() {
        let r = LabelRules::parse(
            "10.0.0.0/8 zone=dc1,env=prod; 10.9.0.0/16 env=test; fd00::/8 zone=v6",
            "",
        )
        .unwrap();
        let l = r.for_address(&"10.9.1.1".parse().unwrap());
        assert_eq!(l.get("zone").map(String::as_str), Some("dc1"));
        assert_eq!(
            l.get("env").map(String::as_str),
            Some("test"),
            "the /16 beats the /8"
        );
        assert_eq!(r.for_address(&"fd00::1".parse().unwrap()).len(), 1);
        assert!(r.for_address(&"192.0.2.1".parse().unwrap()).is_empty());
    }

    #[test]
    fn hostname_patterns_label_hosts() {
        let r = LabelRules::parse("", "web-* role=web; *-prod env=prod; db? role=db").unwrap();
        let l = r.for_hostname("web-prod");
        assert_eq!(l.len(), 2);
        assert_eq!(
            r.for_hostname("db1").get("role").map(String::as_str),
            Some("db")
        );
        assert!(r.for_hostname("db10").is_empty());
    }

    #[test]
    fn bad_rules_name_the_rule_and_the_key() {
        let (key, e) = LabelRules::parse("10.0.0.0/33 a=b", "").unwrap_err();
        assert_eq!(key, "topology.cidr_labels");
        assert!(e.contains("`10.0.0.0/33` is not a CIDR"), "{e}");
        let (key, e) = LabelRules::parse("", "web-*").unwrap_err();
        assert_eq!(key, "topology.hostname_labels");
        assert!(e.contains("has no labels"), "{e}");
        assert!(LabelRules::parse("10.0.0.0/8 bad key=x", "").is_err());
    }
}

impl LabelRules {
    /// These rules, then `later`'s: on a conflict between rules of equal weight, `later` wins.
    pub fn then(&self, later: &LabelRules) -> LabelRules {
        LabelRules {
            cidr: self.cidr.iter().chain(&later.cidr).cloned().collect(),
            hostname: self
                .hostname
                .iter()
                .chain(&later.hostname)
                .cloned()
                .collect(),
        }
    }
}

/// Rules as operators write them (the configuration's syntax), stored as text.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleText {
    pub cidr: String,
    pub hostname: String,
}

const RULES: crate::store::Table = redb::TableDefinition::new("label_rules");

/// The rules operators set with tapgraphctl: validated, persisted, then swapped in whole.
#[derive(Clone)]
pub struct OperatorRules {
    store: crate::store::Store,
    /// Read on every graph query, written by an operator now and then; never held across an await.
    current: std::sync::Arc<std::sync::RwLock<(RuleText, LabelRules)>>,
}

impl OperatorRules {
    /// Loads the stored rules; stored rules that no longer parse are reported and ignored.
    pub fn load(store: crate::store::Store) -> Result<Self, crate::store::StoreError> {
        let text = store.load::<RuleText>(RULES)?.pop().unwrap_or_default();
        let parsed = match LabelRules::parse(&text.cidr, &text.hostname) {
            Ok(r) => r,
            Err((key, error)) => {
                tracing::error!(key, %error, "stored label rules no longer parse; ignoring them");
                LabelRules::default()
            }
        };
        Ok(Self {
            store,
            current: std::sync::Arc::new(std::sync::RwLock::new((text, parsed))),
        })
    }

    pub fn get(&self) -> (RuleText, LabelRules) {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the rules; a rule that does not parse is refused with the reason and nothing changes.
    pub fn set(&self, text: RuleText) -> Result<(), String> {
        let parsed = LabelRules::parse(&text.cidr, &text.hostname)
            .map_err(|(key, e)| format!("{}: {e}", key.replace("topology.", "")))?;
        self.store
            .put(RULES, "operator", &text)
            .map_err(|e| e.to_string())?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (text, parsed);
        Ok(())
    }
}

#[cfg(test)]
mod operator_tests {
    use super::*;

    #[test]
    fn later_rules_win_ties() {
        let config = LabelRules::parse("10.0.0.0/8 zone=dc1", "web-* role=web").unwrap();
        let ops = LabelRules::parse("10.0.0.0/8 zone=dc2", "web-* role=frontend").unwrap();
        let all = config.then(&ops);
        assert_eq!(all.for_address(&"10.1.1.1".parse().unwrap())["zone"], "dc2");
        assert_eq!(all.for_hostname("web-1")["role"], "frontend");
    }
}
