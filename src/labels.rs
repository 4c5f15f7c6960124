//! Labels (`role=web`), as on tokens, agents and graph nodes, and selectors (`role=web,env=prod`).

use std::collections::BTreeMap;

/// Checks a label key and value: keys are 1–63 characters of `a-z A-Z 0-9 . _ / -` starting with a
/// letter or digit; values are at most 255 characters without control characters.
pub fn check(key: &str, value: &str) -> Result<(), String> {
    let key_ok = (1..=63).contains(&key.len())
        && key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
    if !key_ok {
        return Err(format!(
            "`{key}` is not a label key (1 to 63 of a-z, A-Z, 0-9, '.', '_', '/', '-', starting with a letter or digit)"
        ));
    }
    if value.len() > 255 || value.chars().any(char::is_control) {
        return Err(format!(
            "the value of label `{key}` must be at most 255 characters without control characters"
        ));
    }
    Ok(())
}

/// Parses `key=value`.
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not a label: write key=value"))?;
    check(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// Parses a selector `k=v,k2=v2` (empty selects everything). A key given twice is an error.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = parse_pair(part)?;
        if out.insert(k.clone(), v).is_some() {
            return Err(format!("label `{k}` appears twice in selector `{text}`"));
        }
    }
    Ok(out)
}

/// Whether `labels` carry every pair of `selector`.
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_and_selectors() {
        assert_eq!(
            parse_pair("role=web").unwrap(),
            ("role".into(), "web".into())
        );
        assert_eq!(parse_pair("empty=").unwrap().1, "");
        assert!(parse_pair("novalue").is_err());
        assert!(parse_pair("=x").is_err());
        assert!(parse_pair("bad key=x").is_err());
        let sel = parse_selector("role=web, env=prod").unwrap();
        assert_eq!(sel.len(), 2);
        assert!(parse_selector("a=1,a=2").is_err());
        let mut labels = sel.clone();
        labels.insert("zone".into(), "a".into());
        assert!(matches(&sel, &labels));
        labels.insert("env".into(), "dev".into());
        assert!(!matches(&sel, &labels));
        assert!(matches(&BTreeMap::new(), &labels));
    }
}
