//! The two text formats `/metrics` speaks, and which one a scraper asked for.
//!
//! `prometheus-client` writes only OpenMetrics. Prometheus asks for it first, but `curl`,
//! `promtool check metrics` and older scrapers ask for (or default to) the Prometheus text format
//! 0.0.4, which has no `# UNIT` and no `# EOF` and names a counter's family after its `_total`
//! sample. [`to_prometheus_text`] converts the one into the other, for the expositions tapgraph
//! renders (no exemplars, no timestamps).

/// The OpenMetrics media type, as served.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format, as served.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which format a request's `Accept` header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    /// OpenMetrics when `accept` lists `application/openmetrics-text` with a quality at least
    /// that of every other type it lists; otherwise (no header, `*/*`, `text/plain`) the
    /// Prometheus text format, which is what scrapers that do not ask for OpenMetrics read.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::PrometheusText;
        };
        let mut openmetrics = 0.0f32;
        let mut other = 0.0f32;
        for range in accept.split(',') {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or_default().to_ascii_lowercase();
            let quality = params
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if media == "application/openmetrics-text" {
                openmetrics = openmetrics.max(quality);
            } else if !media.is_empty() {
                other = other.max(quality);
            }
        }
        if openmetrics > 0.0 && openmetrics >= other {
            Format::OpenMetrics
        } else {
            Format::PrometheusText
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS,
            Format::PrometheusText => PROMETHEUS_TEXT,
        }
    }

    /// `openmetrics` (an OpenMetrics exposition) in this format.
    pub fn render(self, openmetrics: String) -> String {
        match self {
            Format::OpenMetrics => openmetrics,
            Format::PrometheusText => to_prometheus_text(&openmetrics),
        }
    }
}

/// An OpenMetrics exposition in the Prometheus text format 0.0.4: `# UNIT` and `# EOF` dropped,
/// a counter's family named with `_total` (as its samples are) and its `_created` samples
/// dropped, `info` and `stateset` families typed as gauges (`unknown` as untyped), and HELP text
/// unescaped of `\"`, which 0.0.4 does not escape. Samples are copied as they are: both formats
/// write names, labels and values alike.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE; both are written once TYPE says what the family's name becomes.
    let mut help: Option<(&str, String)> = None;
    // (family name as written in OpenMetrics, its samples' suffixes to drop)
    let mut family: Option<(&str, &[&str])> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, unescape_help(text)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (written, kind, dropped): (String, &str, &[&str]) = match kind {
                "counter" => (format!("{name}_total"), "counter", &["_created"]),
                "histogram" | "gaugehistogram" => (name.into(), "histogram", &["_created"]),
                "summary" => (name.into(), "summary", &["_created"]),
                "gauge" | "stateset" => (name.into(), "gauge", &[]),
                "info" => (format!("{name}_info"), "gauge", &[]),
                _ => (name.into(), "untyped", &[]),
            };
            if let Some((_, text)) = help.take().filter(|(n, _)| *n == name) {
                out.push_str(&format!("# HELP {written} {text}\n"));
            }
            out.push_str(&format!("# TYPE {written} {kind}\n"));
            family = Some((name, dropped));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
        } else if !line.is_empty() {
            let sample = line.split(['{', ' ']).next().unwrap_or_default();
            let drop = family.is_some_and(|(name, dropped)| {
                dropped
                    .iter()
                    .any(|suffix| sample.strip_suffix(suffix) == Some(name))
            });
            if !drop {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// OpenMetrics escapes `\`, newline and `"` in HELP text; the 0.0.4 format only `\` and newline.
fn unescape_help(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('"')) => {
                out.push('"');
                chars.next();
            }
            ('\\', Some(next)) => {
                out.push('\\');
                out.push(next);
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers_choose_the_format() {
        use Format::*;
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            PrometheusText
        );
        assert_eq!(Format::negotiate(Some("*/*")), PrometheusText);
        assert_eq!(Format::negotiate(None), PrometheusText);
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0")),
            PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text")),
            OpenMetrics
        );
    }

    #[test]
    fn an_openmetrics_exposition_becomes_prometheus_text() {
        let om = "\
# HELP tapgraph_agents Agents, by \\\"state\\\"\\nper line.
# TYPE tapgraph_agents gauge
tapgraph_agents{state=\"connected\"} 2
# HELP tapgraph_dropped_packets Packets dropped.
# TYPE tapgraph_dropped_packets counter
tapgraph_dropped_packets_total{reason=\"a b\"} 5
tapgraph_dropped_packets_created 1700000000.0
# HELP tapgraph_delay_seconds Delay.
# TYPE tapgraph_delay_seconds histogram
# UNIT tapgraph_delay_seconds seconds
tapgraph_delay_seconds_bucket{le=\"+Inf\"} 1
tapgraph_delay_seconds_sum 0.5
tapgraph_delay_seconds_count 1
# HELP build Build.
# TYPE build info
build_info{version=\"1\"} 1
# EOF
";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "\
# HELP tapgraph_agents Agents, by \"state\"\\nper line.
# TYPE tapgraph_agents gauge
tapgraph_agents{state=\"connected\"} 2
# HELP tapgraph_dropped_packets_total Packets dropped.
# TYPE tapgraph_dropped_packets_total counter
tapgraph_dropped_packets_total{reason=\"a b\"} 5
# HELP tapgraph_delay_seconds Delay.
# TYPE tapgraph_delay_seconds histogram
tapgraph_delay_seconds_bucket{le=\"+Inf\"} 1
tapgraph_delay_seconds_sum 0.5
tapgraph_delay_seconds_count 1
# HELP build_info Build.
# TYPE build_info gauge
build_info{version=\"1\"} 1
"
        );
        assert_eq!(Format::OpenMetrics.render(om.into()), om);
    }
}
