//! A strict reader of the OpenMetrics text format, for the unit tests of both `/metrics`
//! endpoints (each includes this file with `#[path]`). It refuses what a scraper would refuse, and
//! what our naming rules forbid: a family described twice, a HELP or TYPE line out of place, a
//! sample that belongs to no family, a counter sample without `_total`, a unit the name does not
//! end with, a histogram whose buckets are not cumulative up to `+Inf`, no `# EOF`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: String,
    pub unit: Option<String>,
    pub samples: Vec<Sample>,
}

impl Family {
    /// The value of the sample named `name` whose labels include every one of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    valid_name(name) && !name.contains(':')
}

/// Base units only: what Prometheus' naming guide asks (seconds, bytes; not ms, not kB).
const NOT_BASE_UNITS: &[&str] = &[
    "_ms",
    "_millis",
    "_milliseconds",
    "_micros",
    "_microseconds",
    "_us",
    "_ns",
    "_nanoseconds",
    "_minutes",
    "_hours",
    "_kb",
    "_kib",
    "_mb",
    "_mib",
    "_kilobytes",
    "_megabytes",
    "_bits",
    "_percent",
];

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        t => t.parse().map_err(|_| format!("`{t}` is not a number")),
    }
}

/// `name{k="v",...} value` → (name, labels, value).
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value in `{line}`"))?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("bad metric name `{name}`"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        loop {
            if let Some((i, '}')) = chars.peek().copied() {
                rest = &body[i + 1..];
                break;
            }
            let key_start = chars.peek().map(|(i, _)| *i).ok_or("unclosed label set")?;
            let key_end = loop {
                match chars.next() {
                    Some((i, '=')) => break i,
                    Some(_) => {}
                    None => return Err(format!("unclosed label set in `{line}`")),
                }
            };
            let key = &body[key_start..key_end];
            if !valid_label_name(key) {
                return Err(format!("bad label name `{key}` in `{line}`"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} is not quoted in `{line}`"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, '\\')) => value.push('\\'),
                        _ => return Err(format!("bad escape in label {key} of `{line}`")),
                    },
                    Some((_, '\n')) | None => {
                        return Err(format!("unterminated label {key} in `{line}`"));
                    }
                    Some((_, c)) => value.push(c),
                }
            }
            if labels.insert(key.to_string(), value).is_some() {
                return Err(format!("label {key} twice in `{line}`"));
            }
            match chars.peek().copied() {
                Some((_, ',')) => {
                    chars.next();
                }
                Some((_, '}')) => {}
                _ => return Err(format!("expected , or }} after label {key} in `{line}`")),
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("no space before the value in `{line}`"))?;
    // No timestamps or exemplars: we write neither.
    Ok(Sample {
        name: name.to_string(),
        labels,
        value: parse_value(value)?,
    })
}

/// The sample suffixes each type allows after the family name.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "gauge" | "unknown" => &[""],
        "histogram" => &["_bucket", "_sum", "_count", "_created"],
        "info" => &["_info"],
        _ => &[],
    }
}

fn check_histogram(family: &Family) -> Result<(), String> {
    // Per label set without `le`: the buckets, then the count.
    /// (le, cumulative count) per bucket, and `_count`.
    type Series = (Vec<(f64, f64)>, Option<f64>);
    let mut series: BTreeMap<Vec<(String, String)>, Series> = BTreeMap::new();
    for s in &family.samples {
        let key: Vec<_> = s
            .labels
            .iter()
            .filter(|(k, _)| *k != "le")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let entry = series.entry(key).or_default();
        if s.name.ends_with("_bucket") {
            let le = s
                .labels
                .get("le")
                .ok_or_else(|| format!("{}: a bucket without le", family.name))?;
            entry.0.push((parse_value(le)?, s.value));
        } else if s.name.ends_with("_count") {
            entry.1 = Some(s.value);
        }
    }
    for (labels, (buckets, count)) in series {
        let what = format!("{} {labels:?}", family.name);
        if !buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        {
            return Err(format!("{what}: buckets not ascending and cumulative"));
        }
        match buckets.last() {
            Some((le, n)) if le.is_infinite() && Some(*n) == count => {}
            _ => return Err(format!("{what}: no +Inf bucket equal to _count")),
        }
    }
    Ok(())
}

/// Parses a whole exposition; every problem is an error naming the line.
pub fn parse(text: &str) -> Result<Vec<Family>, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("the exposition does not end with `# EOF`")?;
    let mut families: Vec<Family> = Vec::new();
    let mut seen = BTreeSet::new();
    for line in body.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (keyword, name, rest) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next(),
            );
            if !valid_name(name) {
                return Err(format!("bad metric name in `{line}`"));
            }
            match keyword {
                "HELP" => {
                    let help = rest.unwrap_or("");
                    if help.trim().is_empty() {
                        return Err(format!("{name}: empty HELP"));
                    }
                    if !seen.insert(name.to_string()) {
                        return Err(format!("{name}: family described twice"));
                    }
                    families.push(Family {
                        name: name.to_string(),
                        kind: String::new(),
                        help: help.to_string(),
                        unit: None,
                        samples: Vec::new(),
                    });
                }
                "TYPE" | "UNIT" => {
                    let family = families
                        .last_mut()
                        .filter(|f| f.name == name && f.samples.is_empty())
                        .ok_or_else(|| format!("`{line}` does not follow its HELP"))?;
                    let value = rest.ok_or_else(|| format!("`{line}` has no value"))?;
                    if keyword == "TYPE" {
                        if !family.kind.is_empty() || suffixes(value).is_empty() {
                            return Err(format!("bad or second TYPE in `{line}`"));
                        }
                        family.kind = value.to_string();
                    } else {
                        if family.kind.is_empty() || !name.ends_with(&format!("_{value}")) {
                            return Err(format!(
                                "`{line}`: UNIT before TYPE, or not the name's suffix"
                            ));
                        }
                        family.unit = Some(value.to_string());
                    }
                }
                _ => return Err(format!("unknown comment `{line}`")),
            }
            continue;
        }
        let sample = parse_sample(line)?;
        let family = families
            .last_mut()
            .ok_or_else(|| format!("sample before any family: `{line}`"))?;
        if family.kind.is_empty() {
            return Err(format!("{}: samples before TYPE", family.name));
        }
        let belongs = suffixes(&family.kind)
            .iter()
            .any(|s| sample.name == format!("{}{s}", family.name));
        if !belongs {
            return Err(format!(
                "sample `{}` does not belong to {} family {}",
                sample.name, family.kind, family.name
            ));
        }
        if family
            .samples
            .iter()
            .any(|s| s.name == sample.name && s.labels == sample.labels)
        {
            return Err(format!("`{line}`: the same series twice"));
        }
        family.samples.push(sample);
    }
    for family in &families {
        let name = &family.name;
        if family.kind.is_empty() {
            return Err(format!("{name}: no TYPE"));
        }
        if name.ends_with("_total") {
            return Err(format!(
                "{name}: a family name ends with _total; the encoder adds it"
            ));
        }
        if let Some(bad) = NOT_BASE_UNITS
            .iter()
            .find(|u| name.ends_with(*u) || name.contains(&format!("{u}_")))
        {
            return Err(format!("{name}: `{bad}` is not a base unit"));
        }
        for unit in ["bytes", "seconds"] {
            if name.ends_with(&format!("_{unit}")) && family.unit.as_deref() != Some(unit) {
                return Err(format!(
                    "{name}: ends with _{unit} but declares no UNIT {unit}"
                ));
            }
        }
        if family.kind == "histogram" {
            check_histogram(family)?;
        }
    }
    Ok(families)
}

#[test]
fn the_reader_refuses_what_a_scraper_would() {
    let good = "# HELP a_packets Packets.\n# TYPE a_packets counter\na_packets_total{x=\"q\\\"\"} 1\n# EOF\n";
    let families = parse(good).unwrap();
    assert_eq!(families[0].samples[0].labels["x"], "q\"");
    for bad in [
        // no EOF
        "# HELP a Help.\n# TYPE a gauge\na 1\n",
        // a counter sample without _total
        "# HELP a Help.\n# TYPE a counter\na 1\n# EOF\n",
        // the same family twice
        "# HELP a Help.\n# TYPE a gauge\n# HELP a Help.\n# TYPE a gauge\n# EOF\n",
        // a sample of another family
        "# HELP a Help.\n# TYPE a gauge\nb 1\n# EOF\n",
        // _seconds without a UNIT
        "# HELP a_seconds Help.\n# TYPE a_seconds gauge\n# EOF\n",
        // a histogram without +Inf
        "# HELP h Help.\n# TYPE h histogram\nh_count 1\nh_sum 1\nh_bucket{le=\"1\"} 1\n# EOF\n",
        // milliseconds
        "# HELP a_ms Help.\n# TYPE a_ms gauge\n# EOF\n",
    ] {
        assert!(parse(bad).is_err(), "accepted: {bad}");
    }
}
