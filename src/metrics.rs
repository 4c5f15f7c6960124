//! Writing a `/metrics` exposition, for the controller and the agent alike.
//!
//! Each program declares its metrics as tables of [`Field`]s, each read from one kind of row of
//! its own state (the fleet, an agent, a mirror target), and [`encode_table`] writes them in the
//! order declared, one family per field and one series per row. The writing itself is
//! `prometheus-client`'s: HELP, TYPE and UNIT lines, label values escaped, `_total` on counters'
//! samples. The result is OpenMetrics; [`crate::exposition`] turns it into the Prometheus text
//! format for the scrapers that ask for that.
//!
//! Names follow Prometheus' conventions: a family's name is written in full, a `_seconds` or
//! `_bytes` ending becomes its declared unit, counters get `_total` on their samples, and what
//! varies within one family (a reason, a state) is one label, the field's split.

use std::borrow::Cow;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// What a family counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (until the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One sample's number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

/// What a field reads from one row: per series, (the value of the field's split label, or `""`
/// without one; the number). Empty: the row has no value now, and shows no series.
pub type Samples = Vec<(&'static str, Value)>;

/// A row's labels, written before the field's split: (name, value).
pub type Labels<'r> = Vec<(&'static str, &'r str)>;

/// One metric family, read from each row of type `T`.
pub struct Field<T> {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// The label that tells this family's series of one row apart (`reason`, `state`), if any.
    pub split: Option<&'static str>,
    pub read: fn(&T) -> Samples,
}

/// A counter with one series per row.
pub const fn counter<T>(
    name: &'static str,
    help: &'static str,
    read: fn(&T) -> Samples,
) -> Field<T> {
    Field {
        name,
        help,
        kind: Kind::Counter,
        split: None,
        read,
    }
}

/// A gauge with one series per row.
pub const fn gauge<T>(name: &'static str, help: &'static str, read: fn(&T) -> Samples) -> Field<T> {
    Field {
        name,
        help,
        kind: Kind::Gauge,
        split: None,
        read,
    }
}

/// A counter with one series per row and value of `split` (`reason` for drops and refusals).
pub const fn counter_by<T>(
    name: &'static str,
    help: &'static str,
    split: &'static str,
    read: fn(&T) -> Samples,
) -> Field<T> {
    Field {
        name,
        help,
        kind: Kind::Counter,
        split: Some(split),
        read,
    }
}

/// A gauge with one series per row and value of `split` (`state`: 1 for the current one).
pub const fn gauge_by<T>(
    name: &'static str,
    help: &'static str,
    split: &'static str,
    read: fn(&T) -> Samples,
) -> Field<T> {
    Field {
        name,
        help,
        kind: Kind::Gauge,
        split: Some(split),
        read,
    }
}

/// One unsplit sample.
pub fn one(v: impl Into<Value>) -> Samples {
    vec![("", v.into())]
}

/// One unsplit sample, or none when there is no value.
pub fn opt(v: Option<impl Into<Value>>) -> Samples {
    v.map(one).unwrap_or_default()
}

/// One sample per `(split value, number)`.
pub fn by(values: &[(&'static str, u64)]) -> Samples {
    values.iter().map(|(v, n)| (*v, Value::Int(*n))).collect()
}

/// `tapgraph_x_seconds` → (`tapgraph_x`, seconds): the encoder writes the unit back, and declares it.
pub fn split_unit(name: &'static str) -> (&'static str, Option<Unit>) {
    if let Some(base) = name.strip_suffix("_seconds") {
        (base, Some(Unit::Seconds))
    } else if let Some(base) = name.strip_suffix("_bytes") {
        (base, Some(Unit::Bytes))
    } else {
        (name, None)
    }
}

/// Writes every field of `table` as one family, in order, with one series per row (and split
/// value), rows in the order given. A family whose rows have no samples is still declared.
pub fn encode_table<'r, T: 'r>(
    encoder: &mut DescriptorEncoder<'_>,
    table: &[Field<T>],
    rows: impl IntoIterator<Item = (Labels<'r>, &'r T)> + Clone,
) -> fmt::Result {
    for field in table {
        let (base, unit) = split_unit(field.name);
        let kind = match field.kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
        };
        let help = escape_help(field.help);
        let mut family = encoder.encode_descriptor(base, &help, unit.as_ref(), kind)?;
        for (labels, row) in rows.clone() {
            for (split_value, value) in (field.read)(row) {
                let mut labels = labels.clone();
                if let Some(split) = field.split {
                    labels.push((split, split_value));
                }
                if labels.is_empty() {
                    encode_value(&mut family, field.kind, value)?;
                } else {
                    encode_value(&mut family.encode_family(&labels)?, field.kind, value)?;
                }
            }
        }
    }
    Ok(())
}

/// HELP text as OpenMetrics writes it (`\\`, `\n` and `\"` escaped), which `prometheus-client`
/// leaves to its caller: a newline would otherwise end the line in the middle of the text.
fn escape_help(help: &str) -> Cow<'_, str> {
    if !help.contains(['\\', '\n', '"']) {
        return Cow::Borrowed(help);
    }
    let mut out = String::with_capacity(help.len() + 8);
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn encode_value(metric: &mut MetricEncoder<'_>, kind: Kind, value: Value) -> fmt::Result {
    match (kind, value) {
        (Kind::Counter, Value::Int(v)) => metric.encode_counter::<NoLabelSet, _, u64>(&v, None),
        (Kind::Counter, Value::Float(v)) => metric.encode_counter::<NoLabelSet, _, f64>(&v, None),
        (Kind::Gauge, Value::Int(v)) => metric.encode_gauge(&v),
        (Kind::Gauge, Value::Float(v)) => metric.encode_gauge(&v),
    }
}

/// One labelled series of a histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Per bucket, ascending: (its upper bound `le`, how many observations fell in it and not in
    /// the one before). The encoder accumulates; the last bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
}

/// Writes one histogram family `name`, one series per `(labels, histogram)`, in the order given.
pub fn encode_histograms<'r>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &'static str,
    help: &'static str,
    series: impl IntoIterator<Item = (Labels<'r>, Histogram)>,
) -> fmt::Result {
    let (base, unit) = split_unit(name);
    let help = escape_help(help);
    let mut family =
        encoder.encode_descriptor(base, &help, unit.as_ref(), MetricType::Histogram)?;
    for (labels, h) in series {
        let count = h.buckets.iter().map(|(_, n)| n).sum();
        family
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(h.sum, count, &h.buckets, None)?;
    }
    Ok(())
}

/// The OpenMetrics exposition of what `collector` writes, `# EOF` included.
pub fn render(collector: impl Collector + 'static) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of the tests' tables.
    #[derive(Debug)]
    struct Row {
        sent: u64,
        lag: Option<f64>,
        dropped: [(&'static str, u64); 2],
    }

    const TABLE: &[Field<Row>] = &[
        counter("t_sent_bytes", "Bytes sent.", |r| one(r.sent)),
        gauge("t_lag_seconds", "Lag.", |r| opt(r.lag)),
        counter_by("t_dropped", "Dropped, by reason.", "reason", |r| {
            by(&r.dropped)
        }),
        gauge_by("t_state", "State: 1 for the current one.", "state", |_| {
            vec![("up", Value::Int(1)), ("down", Value::Int(0))]
        }),
    ];

    /// Renders `TABLE` over `rows` (leaked: a collector must be `'static`).
    fn render_rows(rows: Vec<(Labels<'static>, Row)>) -> String {
        let rows: &'static [(Labels<'static>, Row)] = Box::leak(rows.into_boxed_slice());
        #[derive(Debug)]
        struct Rows(&'static [(Labels<'static>, Row)]);
        impl Collector for Rows {
            fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
                encode_table(
                    &mut encoder,
                    TABLE,
                    self.0.iter().map(|(l, r)| (l.clone(), r)),
                )
            }
        }
        render(Rows(rows)).unwrap()
    }

    fn row(sent: u64, lag: Option<f64>) -> Row {
        Row {
            sent,
            lag,
            dropped: [("queue", 3), ("limit", 4)],
        }
    }

    #[test]
    fn a_table_is_written_in_order_with_units_and_totals() {
        let text = render_rows(vec![(vec![], row(5, Some(1.5)))]);
        assert_eq!(
            text,
            "\
# HELP t_sent_bytes Bytes sent.
# TYPE t_sent_bytes counter
# UNIT t_sent_bytes bytes
t_sent_bytes_total 5
# HELP t_lag_seconds Lag.
# TYPE t_lag_seconds gauge
# UNIT t_lag_seconds seconds
t_lag_seconds 1.5
# HELP t_dropped Dropped, by reason.
# TYPE t_dropped counter
t_dropped_total{reason=\"queue\"} 3
t_dropped_total{reason=\"limit\"} 4
# HELP t_state State: 1 for the current one.
# TYPE t_state gauge
t_state{state=\"up\"} 1
t_state{state=\"down\"} 0
# EOF
"
        );
    }

    #[test]
    fn rows_keep_their_order_and_their_labels_come_before_the_split() {
        let text = render_rows(vec![
            (vec![("agent", "b")], row(2, None)),
            (vec![("agent", "a")], row(1, Some(0.25))),
        ]);
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "t_sent_bytes_total{agent=\"b\"} 2",
                "t_sent_bytes_total{agent=\"a\"} 1",
                // Row b has no lag: no series, and no gap.
                "t_lag_seconds{agent=\"a\"} 0.25",
                "t_dropped_total{agent=\"b\",reason=\"queue\"} 3",
                "t_dropped_total{agent=\"b\",reason=\"limit\"} 4",
                "t_dropped_total{agent=\"a\",reason=\"queue\"} 3",
                "t_dropped_total{agent=\"a\",reason=\"limit\"} 4",
                "t_state{agent=\"b\",state=\"up\"} 1",
                "t_state{agent=\"b\",state=\"down\"} 0",
                "t_state{agent=\"a\",state=\"up\"} 1",
                "t_state{agent=\"a\",state=\"down\"} 0",
            ]
        );
    }

    #[test]
    fn a_family_without_samples_is_still_declared() {
        let text = render_rows(Vec::new());
        let expected = [
            "# HELP t_sent_bytes Bytes sent.",
            "# TYPE t_sent_bytes counter",
            "# UNIT t_sent_bytes bytes",
            "# HELP t_lag_seconds Lag.",
            "# TYPE t_lag_seconds gauge",
            "# UNIT t_lag_seconds seconds",
            "# HELP t_dropped Dropped, by reason.",
            "# TYPE t_dropped counter",
            "# HELP t_state State: 1 for the current one.",
            "# TYPE t_state gauge",
            "# EOF",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render_rows(vec![(
            vec![("target", "pcap:odd \"name\" \\ here\nnext")],
            row(1, None),
        )]);
        assert!(
            text.contains(
                "t_sent_bytes_total{target=\"pcap:odd \\\"name\\\" \\\\ here\\nnext\"} 1\n"
            ),
            "{text}"
        );
        // Every sample line stays one line.
        assert_eq!(text.lines().count(), 16, "{text}");
    }

    #[test]
    fn help_text_is_escaped() {
        #[derive(Debug)]
        struct Help;
        impl Collector for Help {
            fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
                let table: &[Field<()>] =
                    &[gauge("t", "A \\ and \"quotes\"\na line.", |_| one(1u64))];
                encode_table(&mut encoder, table, [(Vec::new(), &())])
            }
        }
        let text = render(Help).unwrap();
        assert!(
            text.starts_with("# HELP t A \\\\ and \\\"quotes\\\"\\na line.\n"),
            "{text}"
        );
        // The Prometheus text format unescapes the quotes only.
        let prometheus = crate::exposition::to_prometheus_text(&text);
        assert!(
            prometheus.starts_with("# HELP t A \\\\ and \"quotes\"\\na line.\n"),
            "{prometheus}"
        );
    }

    #[test]
    fn floats_and_integers_are_written_as_such() {
        #[derive(Debug)]
        struct Numbers;
        impl Collector for Numbers {
            fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
                let table: &[Field<()>] = &[
                    counter("c_int", "", |_| one(7u64)),
                    counter("c_float", "", |_| one(0.5)),
                    gauge("g_int", "", |_| one(u64::MAX)),
                    gauge("g_float", "", |_| one(2.0)),
                ];
                encode_table(&mut encoder, table, [(Vec::new(), &())])
            }
        }
        let text = render(Numbers).unwrap();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "c_int_total 7",
                "c_float_total 0.5",
                "g_int 18446744073709551615",
                "g_float 2.0",
            ]
        );
    }

    #[test]
    fn histograms_accumulate_their_buckets() {
        #[derive(Debug)]
        struct Delays;
        impl Collector for Delays {
            fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
                let h = |a, b| Histogram {
                    buckets: vec![(0.001, a), (0.01, b), (f64::INFINITY, 1)],
                    sum: 0.5,
                };
                let series = [
                    (vec![("agent", "b")], h(2, 0)),
                    (vec![("agent", "a\"")], h(0, 3)),
                ];
                encode_histograms(&mut encoder, "t_delay_seconds", "Delay.", series)
            }
        }
        let text = render(Delays).unwrap();
        assert_eq!(
            text,
            "\
# HELP t_delay_seconds Delay.
# TYPE t_delay_seconds histogram
# UNIT t_delay_seconds seconds
t_delay_seconds_sum{agent=\"b\"} 0.5
t_delay_seconds_count{agent=\"b\"} 3
t_delay_seconds_bucket{le=\"0.001\",agent=\"b\"} 2
t_delay_seconds_bucket{le=\"0.01\",agent=\"b\"} 2
t_delay_seconds_bucket{le=\"+Inf\",agent=\"b\"} 3
t_delay_seconds_sum{agent=\"a\\\"\"} 0.5
t_delay_seconds_count{agent=\"a\\\"\"} 4
t_delay_seconds_bucket{le=\"0.001\",agent=\"a\\\"\"} 0
t_delay_seconds_bucket{le=\"0.01\",agent=\"a\\\"\"} 3
t_delay_seconds_bucket{le=\"+Inf\",agent=\"a\\\"\"} 4
# EOF
"
        );
    }

    #[test]
    fn only_seconds_and_bytes_are_units() {
        assert!(matches!(
            split_unit("a_seconds"),
            ("a", Some(Unit::Seconds))
        ));
        assert!(matches!(split_unit("a_bytes"), ("a", Some(Unit::Bytes))));
        assert!(matches!(split_unit("a_packets"), ("a_packets", None)));
        assert!(matches!(split_unit("a_seconds_x"), ("a_seconds_x", None)));
    }
}
