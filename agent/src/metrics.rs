//! `GET /metrics` on the agent: OpenMetrics when the scraper asks for it (Prometheus does), else
//! the Prometheus text format 0.0.4 (`curl`, `promtool check metrics`); see [`tapgraph::exposition`].
//!
//! The numbers are the ones the controller gets: the session hands every control record it builds
//! to [`Metrics::observe`], and a scrape writes out the latest one, so the two views never
//! disagree. Only this process's memory and CPU are read at scrape time, from `/proc/self`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use tapgraph::metrics::{
    Field, Samples, Value, by, counter, counter_by, encode_table, gauge, gauge_by, one, opt,
};
use tapgraph::proto;
use tokio_util::sync::CancellationToken;

use tapgraph::exposition::Format;

/// The capture states, as label values, in `proto::CaptureState` order.
const CAPTURE_STATES: [(proto::CaptureState, &str); 4] = [
    (proto::CaptureState::Disabled, "disabled"),
    (proto::CaptureState::Running, "running"),
    (proto::CaptureState::StoppedBreach, "stopped_breach"),
    (proto::CaptureState::Failed, "failed"),
];

/// What the agent's `/metrics` shows; shared as `Arc<Metrics>` between the session (writer) and
/// the HTTP server (reader).
#[derive(Debug)]
pub struct Metrics {
    latest: Mutex<Option<proto::ControlRecord>>,
    records: AtomicU64,
    /// Connections to `/metrics` closed at once: [`Limits::max_connections`] were open.
    refused_connections: AtomicU64,
    /// Drops on the connection-table path; the session's reporter counts into them.
    pub snapshot_drops: crate::report::Drops,
    /// `/proc`, or a fixture in tests.
    proc: PathBuf,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            latest: Mutex::default(),
            records: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
            snapshot_drops: crate::report::Drops::default(),
            proc: PathBuf::from("/proc"),
        }
    }
}

impl Metrics {
    /// Keeps `record` as what the next scrape shows. Called for every control record built.
    pub fn observe(&self, record: &proto::ControlRecord) {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        *latest = Some(record.clone());
        self.records.fetch_add(1, Ordering::Relaxed);
    }

    fn latest(&self) -> Option<proto::ControlRecord> {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The exposition, `# EOF` included.
    pub fn render(self: &Arc<Self>) -> Result<String, fmt::Error> {
        tapgraph::metrics::render(Scrape(self.clone()))
    }
}

/// Serves `/metrics` on `addr` until `stop`. A listener that cannot be bound is logged as an
/// error and the agent goes on without it: metrics are never a reason to stop capturing.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, stop: CancellationToken) {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => serve_on(listener, metrics, Limits::default(), stop).await,
        Err(error) => {
            tracing::error!(%addr, %error, "cannot listen for /metrics (key metrics.listen); running without it");
        }
    }
}

/// What a scraper gets, so that an endpoint reachable beyond loopback cannot be held by slow or
/// many clients: a request head within `header_read_timeout` (also the longest a kept-alive
/// connection waits for the next one), at most `max_connections` at once (more are closed at once).
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_read_timeout: std::time::Duration,
    max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: std::time::Duration::from_secs(10),
            max_connections: 32,
        }
    }
}

async fn serve_on(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    limits: Limits,
    stop: CancellationToken,
) {
    // The bound address, which differs from the configured one when the port is 0.
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics");
    }
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics.clone());
    let places = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut refused_logged: Option<std::time::Instant> = None;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // No descriptor left, most likely: wait for connections to end.
                tracing::debug!(%error, "/metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            metrics.refused_connections.fetch_add(1, Ordering::Relaxed);
            drop(tcp);
            if refused_logged.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(10)) {
                tracing::warn!(%peer, limit = limits.max_connections, "/metrics connections refused past the cap");
                refused_logged = Some(std::time::Instant::now());
            }
            continue;
        };
        let app = app.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |request| {
                tower::ServiceExt::oneshot(app.clone(), request)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        // Reap finished connections as we go, so the set stays as small as the open ones.
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

async fn scrape(State(metrics): State<Arc<Metrics>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    match metrics.render() {
        Ok(text) => (
            [(header::CONTENT_TYPE, format.content_type())],
            format.render(text),
        )
            .into_response(),
        Err(fmt::Error) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// What `prometheus-client` asks to write out, once per scrape.
#[derive(Debug)]
struct Scrape(Arc<Metrics>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let view = View {
            metrics: self.0.clone(),
            record: self.0.latest(),
            process: process(&self.0.proc),
        };
        encode_table(&mut encoder, TABLE, [(Vec::new(), &view)])
    }
}

/// What one scrape reads: the latest control record, and this process as the kernel accounts it.
struct View {
    metrics: Arc<Metrics>,
    record: Option<proto::ControlRecord>,
    process: Process,
}

impl View {
    /// What `read` finds in the latest record; nothing before the first one (no session so far):
    /// the families stay, so the names are stable, and the series appear with the first heartbeat.
    fn latest(&self, read: impl FnOnce(&proto::ControlRecord) -> Samples) -> Samples {
        self.record.as_ref().map(read).unwrap_or_default()
    }

    /// What `read` finds in the latest record's capture counters (zeros when it has none).
    fn counters(&self, read: impl FnOnce(&proto::Counters) -> Samples) -> Samples {
        self.latest(|r| read(&r.counters.unwrap_or_default()))
    }
}

/// The agent's metrics, in the order a scrape shows them.
const TABLE: &[Field<View>] = &[
    counter(
        "tapgraph_capture_packets",
        "Packets captured (matching the policy's filter), before the speed limit.",
        |v| v.counters(|c| one(c.packets_captured)),
    ),
    counter(
        "tapgraph_capture_bytes",
        "Bytes captured, before the speed limit.",
        |v| v.counters(|c| one(c.bytes_captured)),
    ),
    counter(
        "tapgraph_capture_sent_packets",
        "Captured packets sent to the controller on the mirror stream.",
        |v| v.counters(|c| one(c.packets_sent)),
    ),
    counter(
        "tapgraph_capture_sent_bytes",
        "Captured bytes sent to the controller on the mirror stream.",
        |v| v.counters(|c| one(c.bytes_sent)),
    ),
    counter(
        "tapgraph_capture_sent_batches",
        "Mirror batches sent to the controller.",
        |v| v.counters(|c| one(c.batches_sent)),
    ),
    counter_by(
        "tapgraph_capture_dropped_packets",
        "Captured packets dropped, by stage: kernel (the capture ring overflowed), limiter (over the speed limit), queue (the mirror stream fell behind). Captured = sent + dropped + in flight.",
        "reason",
        |v| {
            v.counters(|c| {
                by(&[
                    ("kernel", c.packets_dropped_kernel),
                    ("limiter", c.packets_dropped_limiter),
                    ("queue", c.packets_dropped_queue),
                ])
            })
        },
    ),
    counter_by(
        "tapgraph_capture_dropped_bytes",
        "Captured bytes dropped, by stage: limiter, queue (the kernel reports packets only).",
        "reason",
        |v| {
            v.counters(|c| {
                by(&[
                    ("limiter", c.bytes_dropped_limiter),
                    ("queue", c.bytes_dropped_queue),
                ])
            })
        },
    ),
    gauge(
        "tapgraph_capture_in_flight_packets",
        "Captured packets neither sent nor dropped yet.",
        |v| v.counters(|c| one(c.packets_in_flight)),
    ),
    gauge_by(
        "tapgraph_capture_state",
        "The capture state: 1 for the current one (stopped_breach: stopped by the breach rule until a new policy).",
        "state",
        |v| {
            v.latest(|r| {
                CAPTURE_STATES
                    .iter()
                    .map(|(s, name)| (*name, Value::from(u64::from(*s as i32 == r.capture_state))))
                    .collect()
            })
        },
    ),
    counter(
        "tapgraph_control_records",
        "Control records built for the controller (one per heartbeat while connected); the other tapgraph_ metrics are the latest one's.",
        |v| one(v.metrics.records.load(Ordering::Relaxed)),
    ),
    gauge(
        "tapgraph_control_record_timestamp_seconds",
        "When the latest control record was built, in Unix time: how fresh the other tapgraph_ metrics are.",
        |v| v.latest(|r| one(r.sent_at_unix_nanos as f64 / 1e9)),
    ),
    gauge(
        "tapgraph_snapshot_entries",
        "Rows in the connection table last reported to the controller.",
        |v| v.latest(|r| one(r.snapshot_entries)),
    ),
    counter_by(
        "tapgraph_short_lived_dropped_catches",
        "Short-lived connections (SYN-ACKs) caught and dropped on the agent, by reason (queue_full: more new connections than the queue holds between two snapshots).",
        "reason",
        |v| {
            let short_lived = &v.metrics.snapshot_drops.short_lived;
            by(&[("queue_full", short_lived.dropped.load(Ordering::Relaxed))])
        },
    ),
    gauge(
        "tapgraph_closed_sockets_listening",
        "1 while the agent receives the kernel's closed-TCP-socket notifications (sock_diag destroy groups, needs CAP_NET_ADMIN), 0 without: then bytes a connection moves after the last table read before it closes are not counted.",
        |v| {
            one(v
                .metrics
                .snapshot_drops
                .closed
                .listening
                .load(Ordering::Relaxed))
        },
    ),
    counter_by(
        "tapgraph_closed_sockets",
        "Closed TCP sockets whose final counters the agent received (received), or lost: queue_full (more closes between two snapshots than the queue holds), kernel_overrun (notifications the kernel dropped, counted once per overrun), malformed.",
        "outcome",
        |v| {
            let c = &v.metrics.snapshot_drops.closed;
            by(&[
                ("received", c.received.load(Ordering::Relaxed)),
                ("queue_full", c.dropped_queue_full.load(Ordering::Relaxed)),
                ("kernel_overrun", c.kernel_overruns.load(Ordering::Relaxed)),
                ("malformed", c.malformed.load(Ordering::Relaxed)),
            ])
        },
    ),
    counter(
        "tapgraph_bpf_connects",
        "TCP connects the BPF tracer read with their process (0 where it does not run: see the agent's Hello capabilities).",
        |v| one(v.metrics.snapshot_drops.bpf.seen.load(Ordering::Relaxed)),
    ),
    counter_by(
        "tapgraph_bpf_dropped_connects",
        "TCP connects the BPF tracer saw and dropped, by reason (ring_full: the kernel's ring buffer was full; queue_full: more distinct connections, by process, addresses and server port, between two snapshots than the agent keeps (16,384); malformed: an event the agent could not read). A dropped connect's client may show no process.",
        "reason",
        |v| {
            let bpf = &v.metrics.snapshot_drops.bpf;
            by(&[
                ("ring_full", bpf.ring_full.load(Ordering::Relaxed)),
                ("queue_full", bpf.queue_full.load(Ordering::Relaxed)),
                ("malformed", bpf.malformed.load(Ordering::Relaxed)),
            ])
        },
    ),
    counter_by(
        "tapgraph_snapshot_read_failures",
        "Connection-table reads that failed, by source, one per table read: sock_diag (that table read from /proc/net instead), proc_net (a socket table; the snapshot or that namespace is skipped), procs (the process list; the snapshot is skipped), conntrack (the kernel's address translations; that snapshot shows connections through NAT as dialled).",
        "source",
        |v| {
            let reads = &v.metrics.snapshot_drops.table_reads;
            by(&[
                ("sock_diag", reads.sock_diag.load(Ordering::Relaxed)),
                ("proc_net", reads.proc_net.load(Ordering::Relaxed)),
                ("procs", reads.procs.load(Ordering::Relaxed)),
                ("conntrack", reads.conntrack.load(Ordering::Relaxed)),
            ])
        },
    ),
    counter_by(
        "tapgraph_snapshot_dropped_nat_flows",
        "Translated flows (conntrack DNAT) a snapshot left out, by reason (over_limit: more than one snapshot keeps; their connections show the address they dialled).",
        "reason",
        |v| {
            let reads = &v.metrics.snapshot_drops.table_reads;
            by(&[("over_limit", reads.nat_dropped.load(Ordering::Relaxed))])
        },
    ),
    gauge(
        "tapgraph_policy_version_applied",
        "Version of the policy the agent has applied.",
        |v| v.latest(|r| one(r.policy_version)),
    ),
    counter_by(
        "tapgraph_http_refused_connections",
        "Connections to this /metrics endpoint closed at once, by reason (capacity: as many as it serves at once were open).",
        "reason",
        |v| {
            by(&[(
                "capacity",
                v.metrics.refused_connections.load(Ordering::Relaxed),
            )])
        },
    ),
    counter(
        "process_cpu_seconds",
        "User and system CPU time spent by the agent.",
        |v| opt(v.process.cpu_seconds),
    ),
    gauge(
        "process_resident_memory_bytes",
        "Resident memory of the agent.",
        |v| opt(v.process.resident_bytes),
    ),
    gauge(
        "process_virtual_memory_bytes",
        "Virtual memory of the agent.",
        |v| opt(v.process.virtual_bytes),
    ),
    gauge(
        "process_start_time_seconds",
        "When the agent started, in Unix time.",
        |v| opt(v.process.start_time_seconds),
    ),
    gauge(
        "process_open_fds",
        "File descriptors the agent has open.",
        |v| opt(v.process.open_fds),
    ),
    gauge(
        "process_max_fds",
        "The agent's limit on open file descriptors.",
        |v| opt(v.process.max_fds),
    ),
];

/// This process as the kernel accounts it; `None` where it cannot be read.
#[derive(Debug, Default, PartialEq)]
struct Process {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    virtual_bytes: Option<u64>,
    start_time_seconds: Option<f64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

/// Fields of `/proc/PID/stat`, in clock ticks and pages.
#[derive(Debug, PartialEq)]
struct Stat {
    utime_ticks: u64,
    stime_ticks: u64,
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

/// Parses `/proc/PID/stat`. The command name is in parentheses and may hold spaces and
/// parentheses itself, so the fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 3.. of proc(5), so field n is at n - 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The boot time from `/proc/stat`, in Unix seconds.
fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn process(proc: &Path) -> Process {
    use nix::unistd::{SysconfVar, sysconf};
    let ticks = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map(|t| t as f64);
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .filter(|p| *p > 0)
        .map(|p| p as u64);
    let stat = std::fs::read_to_string(proc.join("self/stat"))
        .ok()
        .and_then(|t| parse_stat(&t));
    let btime = std::fs::read_to_string(proc.join("stat"))
        .ok()
        .and_then(|t| parse_btime(&t));
    let open_fds = std::fs::read_dir(proc.join("self/fd"))
        .ok()
        .map(|d| d.count() as u64);
    let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft);
    Process {
        cpu_seconds: stat
            .as_ref()
            .zip(ticks)
            .map(|(s, t)| (s.utime_ticks + s.stime_ticks) as f64 / t),
        resident_bytes: stat.as_ref().zip(page).map(|(s, p)| s.resident_pages * p),
        virtual_bytes: stat.as_ref().map(|s| s.virtual_bytes),
        start_time_seconds: stat
            .as_ref()
            .zip(ticks)
            .zip(btime)
            .map(|((s, t), b)| b as f64 + s.start_ticks as f64 / t),
        open_fds,
        max_fds,
    }
}

/// The strict OpenMetrics reader the controller's tests use too.
#[cfg(test)]
#[path = "../../tests/support/openmetrics.rs"]
mod openmetrics;

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line (from `cat`), and the same with a command name made to confuse a parser.
    const STAT: &str = "27059 (cat) R 27057 27057 13537 0 -1 4194304 99 0 0 0 7 3 0 0 20 0 1 0 1976996 3133440 363 18446744073709551615 94222223151104 94222223170985 140727836315312 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 94222223186992 94222223188608 94223097499648 140727836322528 140727836322548 140727836322548 140727836323819 0\n";

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let want = Stat {
            utime_ticks: 7,
            stime_ticks: 3,
            start_ticks: 1976996,
            virtual_bytes: 3133440,
            resident_pages: 363,
        };
        assert_eq!(parse_stat(STAT), Some(want));
        let odd = STAT.replace("(cat)", "(a) b (c 1 2)");
        assert_eq!(parse_stat(&odd).map(|s| s.resident_pages), Some(363));
        assert_eq!(parse_stat("27059 (cat) R 1 2"), None);
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1795322010\nprocesses 9\n"),
            Some(1795322010)
        );
    }

    #[test]
    fn this_process_is_read_from_proc() {
        let p = process(Path::new("/proc"));
        assert!(p.resident_bytes.is_some_and(|b| b > 1 << 20), "{p:?}");
        assert!(p.cpu_seconds.is_some_and(|s| s >= 0.0), "{p:?}");
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            p.start_time_seconds
                .is_some_and(|t| t <= now + 1.0 && t > now - 86400.0 * 365.0),
            "{p:?}"
        );
    }

    fn family<'a>(families: &'a [openmetrics::Family], name: &str) -> &'a openmetrics::Family {
        families
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no family {name}"))
    }

    #[test]
    fn names_are_stable_and_parse_before_any_record() {
        let text = Arc::new(Metrics::default()).render().unwrap();
        let families = openmetrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let names: Vec<&str> = families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names, EXPECTED,
            "renaming a metric breaks dashboards: on purpose?"
        );
        assert!(
            family(&families, "tapgraph_capture_packets")
                .samples
                .is_empty()
        );
        assert_eq!(
            family(&families, "tapgraph_control_records")
                .value("tapgraph_control_records_total", &[]),
            Some(0.0)
        );
    }

    #[test]
    fn the_latest_record_is_what_a_scrape_shows() {
        let metrics = Arc::new(Metrics::default());
        let record = |sequence: u64, captured: u64| proto::ControlRecord {
            sequence,
            sent_at_unix_nanos: 1_800_000_000_500_000_000,
            counters: Some(proto::Counters {
                packets_captured: captured,
                bytes_captured: captured * 100,
                packets_sent: captured - 6,
                bytes_sent: (captured - 6) * 100,
                packets_dropped_kernel: 1,
                packets_dropped_limiter: 2,
                bytes_dropped_limiter: 200,
                packets_dropped_queue: 3,
                bytes_dropped_queue: 300,
                batches_sent: 2,
                packets_in_flight: 0,
            }),
            capture_state: proto::CaptureState::StoppedBreach as i32,
            policy_version: 7,
            snapshot_entries: 42,
            ..Default::default()
        };
        metrics.observe(&record(1, 10));
        metrics.observe(&record(2, 20));
        let text = metrics.render().unwrap();
        let families = openmetrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let get = |name: &str, sample: &str, labels: &[(&str, &str)]| {
            family(&families, name)
                .value(sample, labels)
                .unwrap_or_else(|| panic!("no {sample} {labels:?} in\n{text}"))
        };
        assert_eq!(
            get(
                "tapgraph_capture_packets",
                "tapgraph_capture_packets_total",
                &[]
            ),
            20.0
        );
        assert_eq!(
            get(
                "tapgraph_capture_sent_bytes",
                "tapgraph_capture_sent_bytes_total",
                &[]
            ),
            1400.0
        );
        // Captured = sent + dropped + in flight, as the controller checks it.
        let dropped: f64 = family(&families, "tapgraph_capture_dropped_packets")
            .samples
            .iter()
            .map(|s| s.value)
            .sum();
        assert_eq!(
            get(
                "tapgraph_capture_sent_packets",
                "tapgraph_capture_sent_packets_total",
                &[]
            ) + dropped,
            20.0
        );
        assert_eq!(
            get(
                "tapgraph_capture_dropped_packets",
                "tapgraph_capture_dropped_packets_total",
                &[("reason", "queue")]
            ),
            3.0
        );
        assert_eq!(
            get(
                "tapgraph_capture_dropped_bytes",
                "tapgraph_capture_dropped_bytes_total",
                &[("reason", "limiter")]
            ),
            200.0
        );
        assert_eq!(
            get(
                "tapgraph_capture_state",
                "tapgraph_capture_state",
                &[("state", "stopped_breach")]
            ),
            1.0
        );
        assert_eq!(
            get(
                "tapgraph_capture_state",
                "tapgraph_capture_state",
                &[("state", "running")]
            ),
            0.0
        );
        assert_eq!(
            get(
                "tapgraph_control_records",
                "tapgraph_control_records_total",
                &[]
            ),
            2.0
        );
        assert_eq!(
            get(
                "tapgraph_control_record_timestamp_seconds",
                "tapgraph_control_record_timestamp_seconds",
                &[]
            ),
            1_800_000_000.5
        );
        assert_eq!(
            get(
                "tapgraph_snapshot_entries",
                "tapgraph_snapshot_entries",
                &[]
            ),
            42.0
        );
        assert_eq!(
            get(
                "tapgraph_policy_version_applied",
                "tapgraph_policy_version_applied",
                &[]
            ),
            7.0
        );
        assert!(
            get(
                "process_resident_memory_bytes",
                "process_resident_memory_bytes",
                &[]
            ) > 0.0
        );
        // In clock ticks (10 ms): a young process may show 0.
        assert!(get("process_cpu_seconds", "process_cpu_seconds_total", &[]) >= 0.0);
    }

    /// One scrape of a fresh server: its head and body.
    async fn scrape_with(accept: Option<&str>) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve_on(
            listener,
            Arc::new(Metrics::default()),
            Limits::default(),
            stop.clone(),
        ));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accept = accept
            .map(|a| format!("Accept: {a}\r\n"))
            .unwrap_or_default();
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).await.unwrap();
        stop.cancel();
        server.await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        (head.to_ascii_lowercase(), body.to_string())
    }

    /// A server with `limits`: its address, what it shows, what stops it.
    async fn server_with(
        limits: Limits,
    ) -> (
        SocketAddr,
        Arc<Metrics>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let server = tokio::spawn(serve_on(listener, metrics.clone(), limits, stop.clone()));
        (addr, metrics, stop, server)
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once_and_counted() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A header timeout far longer than the test: only the cap can close a connection.
        let (addr, metrics, stop, server) = server_with(Limits {
            header_read_timeout: std::time::Duration::from_secs(600),
            max_connections: 2,
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
                .await
                .unwrap();
            held.push(s);
        }
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut rest = Vec::new();
        let closing = third.read_to_end(&mut rest);
        tokio::time::timeout(std::time::Duration::from_secs(60), closing)
            .await
            .expect("the connection past the cap stayed open")
            .unwrap();
        assert!(rest.is_empty(), "closed without an answer");
        let text = metrics.render().unwrap();
        let families = openmetrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            family(&families, "tapgraph_http_refused_connections").value(
                "tapgraph_http_refused_connections_total",
                &[("reason", "capacity")]
            ),
            Some(1.0),
            "{text}"
        );
        drop(held);
        stop.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_slow_request_head_is_cut_off_and_its_place_freed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, _, stop, server) = server_with(Limits {
            header_read_timeout: std::time::Duration::from_millis(300),
            max_connections: 1,
        })
        .await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let closing = slow.read_to_end(&mut rest);
        tokio::time::timeout(std::time::Duration::from_secs(60), closing)
            .await
            .expect("the slow connection stayed open")
            .ok();
        // Its place is free again: a scrape is answered.
        let response = wait_for_scrape(addr).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        stop.cancel();
        server.await.unwrap();
    }

    /// Scrapes `addr` until a connection is answered (the freed place may take a moment).
    async fn wait_for_scrape(addr: SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for _ in 0..200 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut response = String::new();
            let _ = s.read_to_string(&mut response).await;
            if !response.is_empty() {
                return response;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("no scrape was answered");
    }

    #[tokio::test]
    async fn the_server_answers_openmetrics_to_whoever_asks_for_it() {
        let (head, body) = scrape_with(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        ))
        .await;
        let expected = tapgraph::exposition::OPENMETRICS;
        assert!(
            head.contains(&format!("content-type: {expected}")),
            "{head}"
        );
        openmetrics::parse(&body).unwrap();
    }

    #[tokio::test]
    async fn the_server_answers_prometheus_text_to_everyone_else() {
        for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
            let (head, body) = scrape_with(accept).await;
            let expected = tapgraph::exposition::PROMETHEUS_TEXT;
            assert!(
                head.contains(&format!("content-type: {expected}")),
                "{head}"
            );
            assert!(
                !body.contains("# EOF") && !body.contains("# UNIT"),
                "{body}"
            );
            assert!(
                body.contains("# TYPE tapgraph_control_records_total counter\n"),
                "{body}"
            );
        }
    }

    const EXPECTED: &[&str] = &[
        "tapgraph_capture_packets",
        "tapgraph_capture_bytes",
        "tapgraph_capture_sent_packets",
        "tapgraph_capture_sent_bytes",
        "tapgraph_capture_sent_batches",
        "tapgraph_capture_dropped_packets",
        "tapgraph_capture_dropped_bytes",
        "tapgraph_capture_in_flight_packets",
        "tapgraph_capture_state",
        "tapgraph_control_records",
        "tapgraph_control_record_timestamp_seconds",
        "tapgraph_snapshot_entries",
        "tapgraph_short_lived_dropped_catches",
        "tapgraph_closed_sockets_listening",
        "tapgraph_closed_sockets",
        "tapgraph_bpf_connects",
        "tapgraph_bpf_dropped_connects",
        "tapgraph_snapshot_read_failures",
        "tapgraph_snapshot_dropped_nat_flows",
        "tapgraph_policy_version_applied",
        "tapgraph_http_refused_connections",
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "process_max_fds",
    ];
}
