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
/// The one row of [`RULES`].
const RULES_KEY: &str = "operator";

/// Why operator rules were not set.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// A rule does not parse; the text names it and its key.
    #[error("{0}")]
    Invalid(String),
    /// The store refused the write: nothing changed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl From<RulesError> for tonic::Status {
    fn from(e: RulesError) -> Self {
        match e {
            RulesError::Invalid(m) => tonic::Status::invalid_argument(m),
            RulesError::Store(e) if e.is_unavailable() => tonic::Status::unavailable(e.to_string()),
            RulesError::Store(e) => tonic::Status::internal(e.to_string()),
        }
    }
}

/// The rules operators set with tapgraphctl: validated, persisted, then swapped in whole. The
/// store is shared by the replicas: [`OperatorRules::follow`] reads the rules again when another
/// replica sets them.
#[derive(Clone)]
pub struct OperatorRules {
    store: crate::store::Store,
    /// Read on every graph query, written by an operator now and then; never held across an await.
    current: std::sync::Arc<std::sync::RwLock<(RuleText, LabelRules)>>,
    /// Held from a write or a read of the store until its result is swapped in: a rule set here
    /// and one read back from another replica's change are swapped in the order they were stored.
    writing: std::sync::Arc<std::sync::Mutex<()>>,
}

impl OperatorRules {
    /// Loads the stored rules; stored rules that no longer parse are reported and ignored.
    pub fn load(store: crate::store::Store) -> Result<Self, crate::store::StoreError> {
        let current = read(&store)?;
        Ok(Self {
            store,
            current: std::sync::Arc::new(std::sync::RwLock::new(current)),
            writing: std::sync::Arc::default(),
        })
    }

    pub fn get(&self) -> (RuleText, LabelRules) {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the rules; a rule that does not parse, or a write the store refuses, leaves
    /// everything as it was.
    pub fn set(&self, text: RuleText) -> Result<(), RulesError> {
        let parsed = LabelRules::parse(&text.cidr, &text.hostname).map_err(|(key, e)| {
            RulesError::Invalid(format!("{}: {e}", key.replace("topology.", "")))
        })?;
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        self.store.put(RULES, RULES_KEY, &text)?;
        self.swap((text, parsed));
        Ok(())
    }

    fn swap(&self, rules: (RuleText, LabelRules)) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = rules;
    }

    /// Reads the rules again whenever another replica sets them (and after the store may have
    /// missed changes), until `stop`. Reads them once at its start: a change made between
    /// [`OperatorRules::load`] and the start is not missed.
    pub async fn follow(self, stop: tokio_util::sync::CancellationToken) {
        let mut changes = self.store.follow(&[RULES]);
        self.reread();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                reread = changes.next() => match reread {
                    // One row holds every rule: any change means reading it again.
                    Some(_) => self.reread(),
                    None => return,
                },
            }
        }
    }

    fn reread(&self) {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        match read(&self.store) {
            Ok(rules) => {
                if rules.0 != self.get().0 {
                    tracing::info!(cidr = %rules.0.cidr, hostname = %rules.0.hostname, "label rules set through another replica");
                    self.swap(rules);
                }
            }
            // The database is down: the read once it is back (a resync) catches up.
            Err(error) => tracing::warn!(%error, "cannot read the label rules again"),
        }
    }
}

/// The stored rules, parsed; rules that no longer parse are reported and ignored.
fn read(store: &crate::store::Store) -> Result<(RuleText, LabelRules), crate::store::StoreError> {
    let text = store.get::<RuleText>(RULES, RULES_KEY)?.unwrap_or_default();
    let parsed = match LabelRules::parse(&text.cidr, &text.hostname) {
        Ok(r) => r,
        Err((key, error)) => {
            tracing::error!(key, %error, "stored label rules no longer parse; ignoring them");
            LabelRules::default()
        }
    };
    Ok((text, parsed))
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

    use std::time::Duration;

    use crate::policies::testproxy::Proxy;
    use crate::store::{Store, StoreSettings, testpg};

    /// Waits up to 10 s for `check` to hold, polling.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not within 10 s: {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn zone(rules: &OperatorRules) -> Option<String> {
        rules
            .get()
            .1
            .for_address(&"10.1.1.1".parse().unwrap())
            .get("zone")
            .cloned()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_rules_set_through_one_replica_apply_on_another() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings::Postgres(pg);
        let a = Store::connect(&settings, dir.path(), "a").await.unwrap();
        let b = Store::connect(&settings, dir.path(), "b").await.unwrap();
        let (a, b) = (
            OperatorRules::load(a).unwrap(),
            OperatorRules::load(b).unwrap(),
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let following = [
            tokio::spawn(a.clone().follow(stop.clone())),
            tokio::spawn(b.clone().follow(stop.clone())),
        ];
        let rules = |zone: &str| RuleText {
            cidr: format!("10.0.0.0/8 zone={zone}"),
            hostname: "web-* role=web".into(),
        };
        a.set(rules("dc1")).unwrap();
        eventually("B labels 10.1.1.1 zone=dc1", || {
            zone(&b).as_deref() == Some("dc1")
        })
        .await;
        assert_eq!(b.get().0, rules("dc1"));
        assert_eq!(b.get().1.for_hostname("web-1")["role"], "web");
        b.set(rules("dc2")).unwrap();
        eventually("A labels 10.1.1.1 zone=dc2", || {
            zone(&a).as_deref() == Some("dc2")
        })
        .await;
        b.set(RuleText::default()).unwrap();
        eventually("A has no rules", || zone(&a).is_none()).await;
        stop.cancel();
        for f in following {
            f.await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_rules_the_database_refuses_are_unavailable_and_change_nothing() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let (proxy, through) = Proxy::start(&pg).await;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&StoreSettings::Postgres(through), dir.path(), "a")
            .await
            .unwrap();
        let rules = OperatorRules::load(store).unwrap();
        let dc1 = RuleText {
            cidr: "10.0.0.0/8 zone=dc1".into(),
            hostname: String::new(),
        };
        rules.set(dc1.clone()).unwrap();
        proxy.cut();
        let e = rules
            .set(RuleText {
                cidr: "10.0.0.0/8 zone=dc2".into(),
                hostname: String::new(),
            })
            .unwrap_err();
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains(&proxy.addr().to_string()),
            "names the database: {}",
            status.message()
        );
        assert_eq!(rules.get().0, dc1);
        assert_eq!(zone(&rules).as_deref(), Some("dc1"));
        let bad = rules
            .set(RuleText {
                cidr: "10.0.0.0/33 a=b".into(),
                hostname: String::new(),
            })
            .unwrap_err();
        assert_eq!(
            tonic::Status::from(bad).code(),
            tonic::Code::InvalidArgument,
            "a bad rule is refused before the store is asked"
        );
    }
}
