//! The policy an agent runs: what to capture, how fast, where mirrored packets go, and how often to
//! report. Validated once, here, by the controller before it is accepted and by the agent before it
//! is applied, so both refuse the same things with the same words.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::config::Layered;
use crate::proto;
use crate::units::{self, format_bitrate, format_duration, format_size};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    /// libpcap immediate mode: each packet delivered at once.
    Immediate,
    /// Packets delivered when the kernel buffer fills or `buffer_timeout` passes.
    Buffered,
}

impl FromStr for CaptureMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "immediate" => Ok(Self::Immediate),
            "buffered" => Ok(Self::Buffered),
            other => Err(format!(
                "`{other}` is not a capture mode: use immediate or buffered"
            )),
        }
    }
}

/// Where the controller sends an agent's mirrored packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    None,
    /// Reinject into this interface, as a SPAN port.
    Interface(String),
    /// Write pcapng files.
    Pcap {
        path: String,
        rotate_bytes: u64,
        rotate_interval: Duration,
    },
    /// Encapsulate in VXLAN towards `host:port`.
    Vxlan {
        host: String,
        port: u16,
        vni: u32,
    },
    /// Write into this TAP device of the controller's host: the frames arrive on it as received.
    Tap(String),
    /// Encapsulate in GRE (transparent Ethernet bridging) towards `host`, with a key if given.
    Gre {
        host: String,
        key: Option<u32>,
    },
    /// Encapsulate in ERSPAN towards `host`, as a switch's remote SPAN session does.
    Erspan {
        host: String,
        kind: ErspanType,
        /// The 10-bit session id analyzers tell sessions apart by.
        session: u16,
    },
}

impl Target {
    /// Whether the target is a tunnel (`vxlan`, `gre`, `erspan`): frames encapsulated towards a
    /// remote host, which an agent in direct mode can send itself.
    pub fn is_tunnel(&self) -> bool {
        matches!(
            self,
            Self::Vxlan { .. } | Self::Gre { .. } | Self::Erspan { .. }
        )
    }
}

/// The capture ring's default size. libpcap cuts it into 256 KiB blocks, and the kernel retires a
/// block after the buffer timeout however little it holds, so the ring lasts (size / 256 KiB)
/// timeouts at any rate: 32 ms at 1 ms for 8 MiB (4 MiB, the size before, lasted 16 ms, which a
/// busy host's scheduler exceeded: bench/burst.sh). It is mapped whole into the agent, so all of
/// it counts in the agent's RSS.
pub const DEFAULT_BUFFER_SIZE: u64 = 8 << 20;

pub const TARGET_SYNTAX: &str =
    "interface:NAME, tap:NAME, pcap:PATH, vxlan:HOST:PORT, gre:HOST, erspan:HOST or none";
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
/// ERSPAN session ids have 10 bits.
pub const MAX_ERSPAN_SESSION: u16 = 1023;

/// The ERSPAN header a target sends. Named by type, as switches and Wireshark do: type II carries
/// version 1 in its header, type III version 2 (Linux's `erspan_ver` counts the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErspanType {
    /// Type II: a sequence number in the GRE header, an 8-byte ERSPAN header. The default:
    /// every analyzer and switch decodes it.
    #[default]
    TypeII,
    /// Type III: a 12-byte header with a timestamp (100 µs units) of the capture.
    TypeIII,
}

impl FromStr for ErspanType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "2" | "II" | "ii" => Ok(Self::TypeII),
            "3" | "III" | "iii" => Ok(Self::TypeIII),
            other => Err(format!(
                "`{other}` is not an ERSPAN type: use 2 (type II) or 3 (type III)"
            )),
        }
    }
}

impl fmt::Display for ErspanType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TypeII => "2",
            Self::TypeIII => "3",
        })
    }
}

/// The host of a `gre:` or `erspan:` target: a name or an address (IPv6 bare or bracketed), and
/// no port, as GRE has none.
fn tunnel_host(s: &str, scheme: &str, rest: &str) -> Result<String, String> {
    let host = match rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        Some(inner) if inner.parse::<std::net::Ipv6Addr>().is_ok() => inner,
        Some(_) => {
            return Err(format!(
                "target `{s}`: only an IPv6 address goes in brackets"
            ));
        }
        None => rest,
    };
    if host.is_empty() || host.contains(['[', ']']) {
        return Err(format!("target `{s}` has no host: use {scheme}:HOST"));
    }
    if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(format!(
            "target `{s}`: GRE has no port; use {scheme}:HOST (HOST a name or an IP address)"
        ));
    }
    if host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(format!(
            "target `{s}`: `{host}` is not a host name or address"
        ));
    }
    Ok(host.to_string())
}

impl FromStr for Target {
    type Err = String;

    /// Parses `interface:span0`, `pcap:/var/lib/x.pcapng`, `vxlan:10.0.0.9:4789`, `tap:span9`,
    /// `gre:10.0.0.9`, `erspan:10.0.0.9` or `none`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s.split_once(':').unwrap_or((s, ""));
        match scheme {
            "none" if rest.is_empty() => Ok(Self::None),
            "interface" => {
                check_interface_name(rest)?;
                Ok(Self::Interface(rest.to_string()))
            }
            "pcap" if !rest.is_empty() => Ok(Self::Pcap {
                path: rest.to_string(),
                rotate_bytes: 0,
                rotate_interval: Duration::ZERO,
            }),
            "vxlan" => {
                let (host, port) = match rest.rsplit_once(':') {
                    Some((h, p)) if !h.is_empty() => (
                        h.trim_start_matches('[').trim_end_matches(']'),
                        p.parse::<u16>()
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(|| format!("`{p}` is not a UDP port in target `{s}`"))?,
                    ),
                    _ if !rest.is_empty() => (rest, DEFAULT_VXLAN_PORT),
                    _ => return Err(format!("target `{s}` has no host: use vxlan:HOST:PORT")),
                };
                // `[` and `]` only bracket an IPv6 address; what is left must be a host.
                if host.is_empty() || host.contains(['[', ']']) {
                    return Err(format!("target `{s}` has no host: use vxlan:HOST:PORT"));
                }
                Ok(Self::Vxlan {
                    host: host.to_string(),
                    port,
                    vni: 0,
                })
            }
            "tap" => {
                check_interface_name(rest)?;
                Ok(Self::Tap(rest.to_string()))
            }
            "gre" => Ok(Self::Gre {
                host: tunnel_host(s, scheme, rest)?,
                key: None,
            }),
            "erspan" => Ok(Self::Erspan {
                host: tunnel_host(s, scheme, rest)?,
                kind: ErspanType::default(),
                session: 0,
            }),
            _ => Err(format!("unknown target `{s}`: use {TARGET_SYNTAX}")),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Interface(name) => write!(f, "interface:{name}"),
            Self::Pcap { path, .. } => write!(f, "pcap:{path}"),
            Self::Vxlan { host, port, .. } if host.contains(':') => {
                write!(f, "vxlan:[{host}]:{port}")
            }
            Self::Vxlan { host, port, .. } => write!(f, "vxlan:{host}:{port}"),
            Self::Tap(name) => write!(f, "tap:{name}"),
            Self::Gre { host, .. } => write!(f, "gre:{host}"),
            Self::Erspan { host, .. } => write!(f, "erspan:{host}"),
        }
    }
}

/// Several targets as one text: `interface:span0,pcap:/var/lib/web.pcapng`, and `none` or the empty
/// text for none (the configuration's `target` key and the policy's JSON). On the command line each
/// target is a `--target` of its own.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Targets(pub Vec<Target>);

impl FromStr for Targets {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut targets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<Target>()? {
                Target::None if s.trim() == "none" => {}
                Target::None => {
                    return Err(format!("`none` cannot be one of several targets in `{s}`"));
                }
                t => targets.push(t),
            }
        }
        Ok(Self(targets))
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

/// Linux interface names: 1 to 15 bytes, no `/`, no white space.
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\t', '\n', ':']) {
        return Err(format!(
            "`{name}` is not an interface name (1 to 15 characters, no '/', ':' or spaces)"
        ));
    }
    Ok(())
}

/// A complete, validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    pub capture: bool,
    pub interface: String,
    pub filter: String,
    pub snaplen: u32,
    pub mode: CaptureMode,
    pub buffer_timeout: Duration,
    /// The kernel ring libpcap reads, in bytes (tcpdump's `-B`): what absorbs a burst while the
    /// capture thread waits for a CPU.
    pub buffer_size: u64,
    pub batch_packets: u32,
    pub batch_delay: Duration,
    pub limit_bps: u64,
    pub check_interval: Duration,
    pub breach_intervals: u32,
    /// Where the mirrored packets go, each written whole: none, one, or several (reinjected and
    /// recorded at once). Never holds [`Target::None`] and never one target twice.
    pub targets: Vec<Target>,
    /// The agent sends to the targets itself, all of them tunnels (`vxlan`, `gre`, `erspan`): the
    /// controller stays off the packet path and learns the counts from control records.
    pub direct: bool,
    /// Whether a target fed by several agents gets each packet once: a copy another agent's
    /// capture brought first (the other end of the connection) is dropped, counted as duplicate.
    pub dedup: bool,
    pub snapshot_interval: Duration,
    pub heartbeat_interval: Duration,
}

impl Default for PolicySpec {
    fn default() -> Self {
        Self {
            capture: false,
            interface: "any".into(),
            filter: String::new(),
            snaplen: 262_144,
            mode: CaptureMode::Buffered,
            buffer_timeout: Duration::from_millis(1),
            buffer_size: DEFAULT_BUFFER_SIZE,
            batch_packets: 256,
            batch_delay: Duration::from_millis(1),
            limit_bps: 10_000_000,
            check_interval: Duration::from_secs(1),
            breach_intervals: 5,
            targets: Vec::new(),
            direct: false,
            dedup: true,
            snapshot_interval: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(5),
        }
    }
}

/// One field of a policy that is out of bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyIssue {
    pub field: &'static str,
    pub reason: String,
}

/// Every field of a policy that is out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError(pub Vec<PolicyIssue>);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|i| format!("{}: {}", i.field, i.reason))
            .collect();
        write!(f, "invalid policy: {}", parts.join("; "))
    }
}

/// Bounds of every policy field, shared by validation and `--help` texts.
pub mod bounds {
    use std::time::Duration;
    pub const SNAPLEN: (u32, u32) = (64, 262_144);
    pub const LIMIT_BPS: (u64, u64) = (8_000, 100_000_000_000);
    pub const CHECK_INTERVAL: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(3600));
    pub const BREACH_INTERVALS: u32 = 1000;
    /// libpcap's read timeout has millisecond resolution.
    pub const BUFFER_TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(1), Duration::from_secs(1));
    pub const BATCH_PACKETS: (u32, u32) = (1, 8192);
    /// Each target is a writer thread on the controller.
    pub const TARGETS: usize = 8;
    /// libpcap rounds the ring to whole 256 KiB blocks; above 1 GiB is memory no agent should pin.
    pub const BUFFER_SIZE: (u64, u64) = (1 << 20, 1 << 30);
    pub const BATCH_DELAY: (Duration, Duration) =
        (Duration::from_micros(50), Duration::from_secs(1));
    pub const SNAPSHOT_INTERVAL: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(3600));
    pub const HEARTBEAT_INTERVAL: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(300));
}

fn in_range<T: PartialOrd>(v: T, (lo, hi): (T, T)) -> bool {
    v >= lo && v <= hi
}

impl PolicySpec {
    /// Checks every bound; with `compile_filter`, also compiles the BPF filter with libpcap.
    pub fn validate(&self, compile_filter: bool) -> Result<(), PolicyError> {
        let mut issues = Vec::new();
        let mut fail = |field, reason: String| issues.push(PolicyIssue { field, reason });
        let dur_range = |d: Duration, (lo, hi): (Duration, Duration)| {
            format!(
                "{} is out of range {}..={}",
                format_duration(d),
                format_duration(lo),
                format_duration(hi)
            )
        };
        if self.interface != "any"
            && let Err(e) = check_interface_name(&self.interface)
        {
            fail("interface", e);
        }
        if compile_filter && let Err(e) = crate::bpf::check_filter(&self.filter) {
            fail("filter", e.reason);
        }
        if !in_range(self.snaplen, bounds::SNAPLEN) {
            fail(
                "snaplen",
                format!(
                    "{} is out of range {}..={}",
                    self.snaplen,
                    bounds::SNAPLEN.0,
                    bounds::SNAPLEN.1
                ),
            );
        }
        if !in_range(self.limit_bps, bounds::LIMIT_BPS) {
            fail(
                "limit",
                format!(
                    "{} is out of range {}..={}",
                    format_bitrate(self.limit_bps),
                    format_bitrate(bounds::LIMIT_BPS.0),
                    format_bitrate(bounds::LIMIT_BPS.1)
                ),
            );
        }
        if !in_range(self.check_interval, bounds::CHECK_INTERVAL) {
            fail(
                "check_interval",
                dur_range(self.check_interval, bounds::CHECK_INTERVAL),
            );
        }
        if self.breach_intervals > bounds::BREACH_INTERVALS {
            fail(
                "breach_intervals",
                format!(
                    "{} is above {} (0 disables the breach rule)",
                    self.breach_intervals,
                    bounds::BREACH_INTERVALS
                ),
            );
        }
        if !in_range(self.buffer_timeout, bounds::BUFFER_TIMEOUT) {
            fail(
                "buffer_timeout",
                dur_range(self.buffer_timeout, bounds::BUFFER_TIMEOUT),
            );
        }
        if !in_range(self.buffer_size, bounds::BUFFER_SIZE) {
            fail(
                "buffer_size",
                format!(
                    "{} is out of range {}..={}",
                    format_size(self.buffer_size),
                    format_size(bounds::BUFFER_SIZE.0),
                    format_size(bounds::BUFFER_SIZE.1)
                ),
            );
        }
        if !in_range(self.batch_packets, bounds::BATCH_PACKETS) {
            fail(
                "batch_packets",
                format!(
                    "{} is out of range {}..={}",
                    self.batch_packets,
                    bounds::BATCH_PACKETS.0,
                    bounds::BATCH_PACKETS.1
                ),
            );
        }
        if !in_range(self.batch_delay, bounds::BATCH_DELAY) {
            fail(
                "batch_delay",
                dur_range(self.batch_delay, bounds::BATCH_DELAY),
            );
        }
        if !in_range(self.snapshot_interval, bounds::SNAPSHOT_INTERVAL) {
            fail(
                "snapshot_interval",
                dur_range(self.snapshot_interval, bounds::SNAPSHOT_INTERVAL),
            );
        }
        if !in_range(self.heartbeat_interval, bounds::HEARTBEAT_INTERVAL) {
            fail(
                "heartbeat_interval",
                dur_range(self.heartbeat_interval, bounds::HEARTBEAT_INTERVAL),
            );
        }
        for (i, target) in self.targets.iter().enumerate() {
            if let Target::Vxlan { vni, .. } = target
                && *vni >= 1 << 24
            {
                fail("target", format!("VNI {vni} does not fit in 24 bits"));
            }
            if *target == Target::None {
                fail("target", "`none` cannot be one of several targets".into());
            }
            if self.targets[..i]
                .iter()
                .any(|t| t.to_string() == target.to_string())
            {
                fail("target", format!("{target} is listed twice"));
            }
        }
        if self.targets.len() > bounds::TARGETS {
            fail(
                "target",
                format!(
                    "{} targets, at most {} per policy",
                    self.targets.len(),
                    bounds::TARGETS
                ),
            );
        }
        for target in &self.targets {
            if let Target::Erspan { session, .. } = target
                && *session > MAX_ERSPAN_SESSION
            {
                fail(
                    "target",
                    format!(
                        "ERSPAN session {session} does not fit in 10 bits (0..={MAX_ERSPAN_SESSION})"
                    ),
                );
            }
        }
        if self.direct {
            if self.targets.is_empty() {
                fail(
                    "direct",
                    "needs a target: the agent sends to vxlan, gre or erspan targets itself".into(),
                );
            }
            for target in self.targets.iter().filter(|t| !t.is_tunnel()) {
                fail(
                    "direct",
                    format!(
                        "{target} cannot be sent from the agent: direct mode takes only vxlan, \
                         gre and erspan targets"
                    ),
                );
            }
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(PolicyError(issues))
        }
    }

    /// Reads a policy from configuration keys under `prefix` (e.g. `policy.filter`), recording
    /// problems in `cfg` under their full key. Missing keys keep the defaults.
    pub fn from_config(cfg: &mut Layered, prefix: &str) -> Self {
        let d = Self::default();
        let k = |name: &str| format!("{prefix}.{name}");
        let mut spec = Self {
            capture: cfg.bool(&k("capture"), d.capture),
            interface: cfg.string(&k("interface"), &d.interface),
            filter: cfg.string(&k("filter"), &d.filter),
            snaplen: cfg.value(&k("snaplen"), d.snaplen),
            mode: cfg.value(&k("mode"), d.mode),
            buffer_timeout: cfg.parse(
                &k("buffer_timeout"),
                d.buffer_timeout,
                units::parse_duration,
            ),
            buffer_size: cfg.parse(&k("buffer_size"), d.buffer_size, units::parse_size),
            batch_packets: cfg.value(&k("batch_packets"), d.batch_packets),
            batch_delay: cfg.parse(&k("batch_delay"), d.batch_delay, units::parse_duration),
            limit_bps: cfg.parse(&k("limit"), d.limit_bps, units::parse_bitrate),
            check_interval: cfg.parse(
                &k("check_interval"),
                d.check_interval,
                units::parse_duration,
            ),
            breach_intervals: cfg.value(&k("breach_intervals"), d.breach_intervals),
            targets: cfg.value(&k("target"), Targets(d.targets.clone())).0,
            direct: cfg.bool(&k("direct"), d.direct),
            dedup: cfg.bool(&k("dedup"), d.dedup),
            snapshot_interval: cfg.parse(
                &k("snapshot_interval"),
                d.snapshot_interval,
                units::parse_duration,
            ),
            heartbeat_interval: cfg.parse(
                &k("heartbeat_interval"),
                d.heartbeat_interval,
                units::parse_duration,
            ),
        };
        // The per-kind keys are read only when a target of that kind is there, and apply to
        // each such target.
        let has = |kind: fn(&Target) -> bool| spec.targets.iter().any(kind);
        let vni = has(|t| matches!(t, Target::Vxlan { .. })).then(|| cfg.value(&k("vni"), 0));
        let gre_key = has(|t| matches!(t, Target::Gre { .. })).then(|| {
            cfg.parse(&k("gre_key"), None, |s| {
                s.parse::<u32>()
                    .map(Some)
                    .map_err(|e| format!("`{s}`: {e}"))
            })
        });
        let erspan = has(|t| matches!(t, Target::Erspan { .. })).then(|| {
            (
                cfg.value(&k("erspan_type"), ErspanType::default()),
                cfg.value(&k("erspan_session"), 0),
            )
        });
        for t in &mut spec.targets {
            match t {
                Target::Vxlan { vni: v, .. } => *v = vni.unwrap_or_default(),
                Target::Gre { key, .. } => *key = gre_key.flatten(),
                Target::Erspan { kind, session, .. } => {
                    (*kind, *session) = erspan.unwrap_or_default();
                }
                _ => {}
            }
        }
        if let Err(errors) = spec.validate(true) {
            for issue in errors.0 {
                cfg.fail(&k(issue.field), issue.reason);
            }
            return d;
        }
        spec
    }

    /// Every configuration key [`PolicySpec::from_config`] reads, under `prefix`.
    pub fn config_keys(prefix: &str) -> Vec<String> {
        [
            "capture",
            "interface",
            "filter",
            "snaplen",
            "mode",
            "buffer_timeout",
            "buffer_size",
            "batch_packets",
            "batch_delay",
            "limit",
            "check_interval",
            "breach_intervals",
            "target",
            "vni",
            "snapshot_interval",
            "heartbeat_interval",
            "gre_key",
            "erspan_type",
            "erspan_session",
            "direct",
            "dedup",
        ]
        .iter()
        .map(|n| format!("{prefix}.{n}"))
        .collect()
    }

    /// The settings as operators write them (`10Mbit`, `15s`, `vxlan:HOST:PORT`), for
    /// `tapgraphctl policy … -o json` and the web console.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "capture": self.capture,
            "interface": self.interface,
            "filter": self.filter,
            "snaplen": self.snaplen,
            "mode": format!("{:?}", self.mode).to_lowercase(),
            "limit": format_bitrate(self.limit_bps),
            "check_interval": format_duration(self.check_interval),
            "breach_intervals": self.breach_intervals,
            "target": Targets(self.targets.clone()).to_string(),
            "dedup": self.dedup,
            "snapshot_interval": format_duration(self.snapshot_interval),
            "heartbeat_interval": format_duration(self.heartbeat_interval),
            "batch_packets": self.batch_packets,
            "batch_delay": format_duration(self.batch_delay),
            "buffer_timeout": format_duration(self.buffer_timeout),
            "buffer_size": format_size(self.buffer_size),
            "direct": self.direct,
        })
    }

    pub fn to_proto(&self, version: u64, name: &str) -> proto::Policy {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        proto::Policy {
            version,
            name: name.to_string(),
            capture: Some(proto::Capture {
                enabled: self.capture,
                interface: self.interface.clone(),
                filter: self.filter.clone(),
                snaplen: self.snaplen,
                mode: match self.mode {
                    CaptureMode::Immediate => proto::CaptureMode::Immediate,
                    CaptureMode::Buffered => proto::CaptureMode::Buffered,
                } as i32,
                buffer_timeout_us: us(self.buffer_timeout),
                batch_max_packets: self.batch_packets,
                batch_max_delay_us: us(self.batch_delay),
                buffer_bytes: self.buffer_size,
            }),
            limit: Some(proto::RateLimit {
                bits_per_second: self.limit_bps,
                check_interval_ms: ms(self.check_interval),
                breach_intervals: self.breach_intervals,
            }),
            // A controller sends the first target alone too, for agents that read only that.
            target: Some(
                self.targets
                    .first()
                    .map(target_to_proto)
                    .unwrap_or_else(|| target_to_proto(&Target::None)),
            ),
            targets: self.targets.iter().map(target_to_proto).collect(),
            direct: self.direct,
            dedup: Some(self.dedup),
            snapshot_interval_ms: ms(self.snapshot_interval),
            heartbeat_interval_ms: ms(self.heartbeat_interval),
        }
    }

    /// Converts and validates a received policy (the BPF filter is compiled where it is applied).
    pub fn from_proto(p: &proto::Policy) -> Result<Self, PolicyError> {
        let missing = |field| {
            PolicyError(vec![PolicyIssue {
                field,
                reason: "missing".into(),
            }])
        };
        let capture = p.capture.as_ref().ok_or_else(|| missing("capture"))?;
        let limit = p.limit.as_ref().ok_or_else(|| missing("limit"))?;
        // From a controller before several targets, `target` alone.
        let targets = if p.targets.is_empty() {
            p.target
                .iter()
                .map(target_from_proto)
                .collect::<Result<Vec<_>, _>>()?
        } else {
            p.targets
                .iter()
                .map(target_from_proto)
                .collect::<Result<Vec<_>, _>>()?
        };
        let targets: Vec<Target> = targets.into_iter().filter(|t| *t != Target::None).collect();
        let mode = match proto::CaptureMode::try_from(capture.mode) {
            Ok(proto::CaptureMode::Immediate) => CaptureMode::Immediate,
            Ok(proto::CaptureMode::Buffered) => CaptureMode::Buffered,
            _ => {
                return Err(PolicyError(vec![PolicyIssue {
                    field: "mode",
                    reason: format!("unknown capture mode {}", capture.mode),
                }]));
            }
        };
        let spec = Self {
            capture: capture.enabled,
            interface: capture.interface.clone(),
            filter: capture.filter.clone(),
            snaplen: capture.snaplen,
            mode,
            buffer_timeout: Duration::from_micros(u64::from(capture.buffer_timeout_us)),
            // A controller from before the field sends 0: the agent's default.
            buffer_size: match capture.buffer_bytes {
                0 => DEFAULT_BUFFER_SIZE,
                n => n,
            },
            batch_packets: capture.batch_max_packets,
            batch_delay: Duration::from_micros(u64::from(capture.batch_max_delay_us)),
            limit_bps: limit.bits_per_second,
            check_interval: Duration::from_millis(limit.check_interval_ms),
            breach_intervals: limit.breach_intervals,
            targets,
            direct: p.direct,
            // A controller from before the field sends none: on, the default.
            dedup: p.dedup.unwrap_or(true),
            snapshot_interval: Duration::from_millis(p.snapshot_interval_ms),
            heartbeat_interval: Duration::from_millis(p.heartbeat_interval_ms),
        };
        spec.validate(false)?;
        Ok(spec)
    }
}

fn target_to_proto(target: &Target) -> proto::MirrorTarget {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let kind = match target {
        Target::None => proto::mirror_target::Kind::None(proto::NoTarget {}),
        Target::Interface(name) => {
            proto::mirror_target::Kind::Interface(proto::InterfaceTarget { name: name.clone() })
        }
        Target::Pcap {
            path,
            rotate_bytes,
            rotate_interval,
        } => proto::mirror_target::Kind::Pcap(proto::PcapTarget {
            path: path.clone(),
            rotate_bytes: *rotate_bytes,
            rotate_interval_ms: ms(*rotate_interval),
        }),
        Target::Vxlan { host, port, vni } => {
            proto::mirror_target::Kind::Vxlan(proto::VxlanTarget {
                host: host.clone(),
                port: u32::from(*port),
                vni: *vni,
            })
        }
        Target::Tap(name) => {
            proto::mirror_target::Kind::Tap(proto::TapTarget { name: name.clone() })
        }
        Target::Gre { host, key } => proto::mirror_target::Kind::Gre(proto::GreTarget {
            host: host.clone(),
            key: *key,
        }),
        Target::Erspan {
            host,
            kind,
            session,
        } => proto::mirror_target::Kind::Erspan(proto::ErspanTarget {
            host: host.clone(),
            erspan_type: match kind {
                ErspanType::TypeII => 2,
                ErspanType::TypeIII => 3,
            },
            session_id: u32::from(*session),
        }),
    };
    proto::MirrorTarget { kind: Some(kind) }
}

fn target_from_proto(t: &proto::MirrorTarget) -> Result<Target, PolicyError> {
    Ok(match t.kind.as_ref() {
        None | Some(proto::mirror_target::Kind::None(_)) => Target::None,
        Some(proto::mirror_target::Kind::Interface(i)) => Target::Interface(i.name.clone()),
        Some(proto::mirror_target::Kind::Pcap(x)) => Target::Pcap {
            path: x.path.clone(),
            rotate_bytes: x.rotate_bytes,
            rotate_interval: Duration::from_millis(x.rotate_interval_ms),
        },
        Some(proto::mirror_target::Kind::Vxlan(v)) => Target::Vxlan {
            host: v.host.clone(),
            port: u16::try_from(v.port).map_err(|_| {
                PolicyError(vec![PolicyIssue {
                    field: "target",
                    reason: format!("port {} is not a UDP port", v.port),
                }])
            })?,
            vni: v.vni,
        },
        Some(proto::mirror_target::Kind::Tap(t)) => Target::Tap(t.name.clone()),
        Some(proto::mirror_target::Kind::Gre(g)) => Target::Gre {
            host: g.host.clone(),
            key: g.key,
        },
        Some(proto::mirror_target::Kind::Erspan(e)) => Target::Erspan {
            host: e.host.clone(),
            kind: match e.erspan_type {
                0 | 2 => ErspanType::TypeII,
                3 => ErspanType::TypeIII,
                other => {
                    return Err(PolicyError(vec![PolicyIssue {
                        field: "target",
                        reason: format!("ERSPAN type {other} is not 2 or 3"),
                    }]));
                }
            },
            // Out of range becomes a value validation refuses, naming the bound.
            session: u16::try_from(e.session_id).unwrap_or(u16::MAX),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print() {
        for s in [
            "none",
            "interface:span0",
            "pcap:/tmp/x.pcapng",
            "vxlan:10.0.0.9:4789",
            "vxlan:[fd00::9]:4790",
            "tap:span9",
            "gre:10.0.0.9",
            "gre:fd00::9",
            "gre:analyzer.example",
            "erspan:10.0.0.9",
            "erspan:fd00::9",
        ] {
            assert_eq!(s.parse::<Target>().unwrap().to_string(), s);
        }
        assert_eq!(
            "vxlan:analyzer".parse::<Target>().unwrap().to_string(),
            "vxlan:analyzer:4789"
        );
        for bad in [
            "span0",
            "ftp:host",
            "interface:",
            "interface:a/b",
            "vxlan:",
            "vxlan:h:0",
            "pcap:",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad} accepted");
        }
        let e = "sflow:10.0.0.1".parse::<Target>().unwrap_err();
        assert!(e.contains("unknown target `sflow:10.0.0.1`"), "{e}");
        assert!(e.contains("tap:NAME") && e.contains("erspan:HOST"), "{e}");
    }

    #[test]
    fn tap_gre_and_erspan_targets_parse_with_their_defaults() {
        assert_eq!(
            "tap:span9".parse::<Target>(),
            Ok(Target::Tap("span9".into()))
        );
        assert_eq!(
            "gre:[fd00::9]".parse::<Target>(),
            Ok(Target::Gre {
                host: "fd00::9".into(),
                key: None
            })
        );
        assert_eq!(
            "erspan:collector".parse::<Target>(),
            Ok(Target::Erspan {
                host: "collector".into(),
                kind: ErspanType::TypeII,
                session: 0
            })
        );
        assert_eq!("3".parse::<ErspanType>(), Ok(ErspanType::TypeIII));
        assert_eq!("II".parse::<ErspanType>(), Ok(ErspanType::TypeII));
        let e = "1".parse::<ErspanType>().unwrap_err();
        assert_eq!(
            e,
            "`1` is not an ERSPAN type: use 2 (type II) or 3 (type III)"
        );
    }

    #[test]
    fn tap_gre_and_erspan_refusals_name_the_input_and_the_syntax() {
        for (bad, says) in [
            ("tap:", "is not an interface name"),
            ("tap:a/b", "is not an interface name"),
            ("tap:sixteen-chars-xx", "is not an interface name"),
            ("gre:", "target `gre:` has no host: use gre:HOST"),
            ("gre:[]", "only an IPv6 address goes in brackets"),
            ("gre:[10.0.0.1]", "only an IPv6 address goes in brackets"),
            ("gre:]", "target `gre:]` has no host: use gre:HOST"),
            (
                "gre:10.0.0.1:4789",
                "target `gre:10.0.0.1:4789`: GRE has no port; use gre:HOST",
            ),
            ("erspan:", "target `erspan:` has no host: use erspan:HOST"),
            ("erspan:a b", "`a b` is not a host name or address"),
            ("erspan:h:1", "GRE has no port; use erspan:HOST"),
        ] {
            let e = bad.parse::<Target>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let spec = PolicySpec {
            targets: vec![Target::Erspan {
                host: "h".into(),
                kind: ErspanType::TypeIII,
                session: MAX_ERSPAN_SESSION + 1,
            }],
            ..PolicySpec::default()
        };
        assert_eq!(
            spec.validate(false).unwrap_err().to_string(),
            "invalid policy: target: ERSPAN session 1024 does not fit in 10 bits (0..=1023)"
        );
    }

    #[test]
    fn tap_gre_and_erspan_settings_survive_protobuf() {
        for target in [
            Target::Tap("span9".into()),
            Target::Gre {
                host: "10.0.0.9".into(),
                key: Some(0),
            },
            Target::Gre {
                host: "fd00::9".into(),
                key: None,
            },
            Target::Erspan {
                host: "10.0.0.9".into(),
                kind: ErspanType::TypeIII,
                session: MAX_ERSPAN_SESSION,
            },
        ] {
            let spec = PolicySpec {
                targets: vec![target],
                ..PolicySpec::default()
            };
            assert_eq!(PolicySpec::from_proto(&spec.to_proto(1, "p")), Ok(spec));
        }
        let mut wire = PolicySpec::default().to_proto(1, "p");
        wire.target = Some(proto::MirrorTarget {
            kind: Some(proto::mirror_target::Kind::Erspan(proto::ErspanTarget {
                host: "h".into(),
                erspan_type: 1,
                session_id: 5,
            })),
        });
        let e = PolicySpec::from_proto(&wire).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid policy: target: ERSPAN type 1 is not 2 or 3"
        );
    }

    #[test]
    fn proto_round_trip_keeps_everything() {
        let spec = PolicySpec {
            capture: true,
            filter: "tcp port 80".into(),
            mode: CaptureMode::Immediate,
            targets: vec![
                Target::Vxlan {
                    host: "10.0.0.9".into(),
                    port: 4789,
                    vni: 42,
                },
                Target::Interface("span0".into()),
            ],
            ..PolicySpec::default()
        };
        let wire = spec.to_proto(7, "web");
        let back = PolicySpec::from_proto(&wire).unwrap();
        assert_eq!(back, spec);
        // An agent or tool from before several targets reads the first.
        assert_eq!(wire.target, Some(target_to_proto(&spec.targets[0])));
        // A controller from before several targets sends `target` alone.
        let old = proto::Policy {
            targets: Vec::new(),
            ..wire
        };
        assert_eq!(
            PolicySpec::from_proto(&old).unwrap().targets,
            spec.targets[..1]
        );
    }

    #[test]
    fn several_targets_read_as_text_and_refuse_none_and_repeats() {
        let t: Targets = "interface:span0, pcap:/tmp/a.pcapng".parse().unwrap();
        assert_eq!(t.to_string(), "interface:span0,pcap:/tmp/a.pcapng");
        assert_eq!("none".parse::<Targets>().unwrap(), Targets(vec![]));
        assert_eq!("".parse::<Targets>().unwrap(), Targets(vec![]));
        assert_eq!(Targets(vec![]).to_string(), "none");
        let e = "interface:span0,none".parse::<Targets>().unwrap_err();
        assert!(e.contains("`none` cannot be one of several targets"), "{e}");
        let twice = PolicySpec {
            targets: vec![Target::Interface("span0".into()); 2],
            ..PolicySpec::default()
        };
        assert_eq!(
            twice.validate(false).unwrap_err().to_string(),
            "invalid policy: target: interface:span0 is listed twice"
        );
        let many = PolicySpec {
            targets: (0..9).map(|i| Target::Interface(format!("s{i}"))).collect(),
            ..PolicySpec::default()
        };
        assert_eq!(
            many.validate(false).unwrap_err().to_string(),
            "invalid policy: target: 9 targets, at most 8 per policy"
        );
    }

    #[test]
    fn validation_names_every_bad_field() {
        let spec = PolicySpec {
            filter: "tcp port banana".into(),
            snaplen: 10,
            limit_bps: 1,
            heartbeat_interval: Duration::ZERO,
            ..PolicySpec::default()
        };
        let e = spec.validate(true).unwrap_err();
        let fields: Vec<_> = e.0.iter().map(|i| i.field).collect();
        assert_eq!(fields, ["filter", "snaplen", "limit", "heartbeat_interval"]);
        assert!(e.to_string().contains("banana"), "{e}");
        // Without compiling, the filter is not judged.
        assert_eq!(spec.validate(false).unwrap_err().0.len(), 3);
    }

    #[test]
    fn buffer_sizes_outside_the_bounds_are_refused_with_their_unit() {
        let with = |buffer_size| PolicySpec {
            buffer_size,
            ..PolicySpec::default()
        };
        assert_eq!(with(bounds::BUFFER_SIZE.1).validate(false), Ok(()));
        let e = with(1000).validate(false).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid policy: buffer_size: 1000B is out of range 1MiB..=1GiB"
        );
        // A controller from before the field sends 0: the agent's default.
        let mut old = PolicySpec::default().to_proto(1, "old");
        old.capture.as_mut().unwrap().buffer_bytes = 0;
        assert_eq!(
            PolicySpec::from_proto(&old).unwrap().buffer_size,
            DEFAULT_BUFFER_SIZE
        );
    }

    #[test]
    fn breach_intervals_stop_at_the_bound_and_interface_names_are_checked() {
        let with = |breach_intervals, interface: &str| PolicySpec {
            breach_intervals,
            interface: interface.into(),
            ..PolicySpec::default()
        };
        assert_eq!(
            with(bounds::BREACH_INTERVALS, "eth0").validate(false),
            Ok(())
        );
        let e = with(bounds::BREACH_INTERVALS + 1, "any")
            .validate(false)
            .unwrap_err();
        assert_eq!(
            e.0.iter().map(|i| i.field).collect::<Vec<_>>(),
            ["breach_intervals"]
        );
        let e = with(0, "a/b").validate(false).unwrap_err();
        assert_eq!(
            e.0.iter().map(|i| i.field).collect::<Vec<_>>(),
            ["interface"]
        );
    }

    /// `config_keys` lists exactly what `from_config` reads: garbage under each listed key is
    /// reported under that key, and nothing else is.
    #[test]
    fn config_keys_are_the_keys_from_config_reads() {
        use crate::config::{Layered, Sources};
        let keys = PolicySpec::config_keys("policy");
        assert_eq!(keys.len(), 21);
        // Read only with their target kind, so garbage under them alone is not judged.
        let per_target = [
            "policy.vni",
            "policy.gre_key",
            "policy.erspan_type",
            "policy.erspan_session",
        ];
        let complaints = |overrides: Vec<(String, String)>| {
            let sources = Sources {
                overrides,
                ..Sources::default()
            };
            let mut cfg = Layered::load(&sources, &[]).unwrap();
            PolicySpec::from_config(&mut cfg, "policy");
            let mut flagged: Vec<String> = match cfg.finish(()) {
                Ok(()) => Vec::new(),
                Err(e) => e.0.into_iter().map(|i| i.key).collect(),
            };
            flagged.sort();
            flagged.dedup();
            flagged
        };
        // `/ :x` is no value of any key; as a filter it is a syntax error, with no name to resolve.
        let garbage = |key: &String| (key.clone(), "/ :x".to_string());
        let mut expected: Vec<String> = keys
            .iter()
            .filter(|k| !per_target.contains(&k.as_str()))
            .cloned()
            .collect();
        expected.sort();
        assert_eq!(
            complaints(
                keys.iter()
                    .filter(|k| !per_target.contains(&k.as_str()))
                    .map(garbage)
                    .collect()
            ),
            expected
        );
        // The VNI is read for a VXLAN target only.
        assert_eq!(
            complaints(vec![
                ("policy.target".into(), "vxlan:collector:4789".into()),
                garbage(&"policy.vni".to_string()),
            ]),
            ["policy.vni"]
        );
        assert_eq!(
            complaints(vec![
                ("policy.target".into(), "gre:collector".into()),
                garbage(&"policy.gre_key".to_string()),
            ]),
            ["policy.gre_key"]
        );
        assert_eq!(
            complaints(vec![
                ("policy.target".into(), "erspan:collector".into()),
                garbage(&"policy.erspan_type".to_string()),
                ("policy.erspan_session".into(), "1024".into()),
            ]),
            ["policy.erspan_type", "policy.target"]
        );
    }

    #[test]
    fn direct_takes_only_tunnel_targets_and_names_the_one_refused() {
        let vxlan = Target::Vxlan {
            host: "10.0.0.9".into(),
            port: 4789,
            vni: 42,
        };
        let gre = Target::Gre {
            host: "10.0.0.9".into(),
            key: None,
        };
        let direct = |targets: Vec<Target>| PolicySpec {
            capture: true,
            direct: true,
            targets,
            ..PolicySpec::default()
        };
        assert_eq!(direct(vec![vxlan.clone(), gre]).validate(false), Ok(()));
        let e = direct(vec![
            vxlan.clone(),
            Target::Pcap {
                path: "web.pcapng".into(),
                rotate_bytes: 0,
                rotate_interval: Duration::ZERO,
            },
        ])
        .validate(false)
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "invalid policy: direct: pcap:web.pcapng cannot be sent from the agent: direct mode \
             takes only vxlan, gre and erspan targets"
        );
        let e = direct(Vec::new()).validate(false).unwrap_err().to_string();
        assert!(e.contains("direct: needs a target"), "{e}");
        // Read from configuration, and across the wire.
        let read = properties::read;
        let (spec, result) = read(vec![
            ("policy.direct".into(), "true".into()),
            ("policy.target".into(), "vxlan:10.0.0.9:4789".into()),
            ("policy.vni".into(), "42".into()),
        ]);
        assert_eq!(result, Ok(()));
        assert!(spec.direct);
        assert_eq!(spec.to_json()["direct"], true);
        let back = PolicySpec::from_proto(&spec.to_proto(3, "p")).unwrap();
        assert_eq!(back, spec);
        let (_, result) = read(vec![
            ("policy.direct".into(), "true".into()),
            ("policy.target".into(), "interface:span0".into()),
        ]);
        assert!(
            result
                .unwrap_err()
                .contains("policy.direct: interface:span0 cannot be sent"),
            "policy.direct is named"
        );
    }

    #[test]
    fn targets_refuse_what_follows_none_and_never_yield_an_empty_host() {
        for bad in ["none:x", "none:interface:eth0"] {
            assert!(bad.parse::<Target>().is_err(), "{bad} accepted");
        }
        // `vxlan::80` has an empty host before the port: it is not read as host "" on port 80.
        for text in ["vxlan::80", "vxlan::4789", "vxlan::"] {
            if let Ok(Target::Vxlan { host, port, .. }) = text.parse::<Target>() {
                assert!(!host.is_empty(), "{text} gave an empty host on port {port}");
            }
        }
    }

    #[test]
    fn vxlan_targets_without_a_host_are_refused() {
        for bad in ["vxlan:[", "vxlan:[:80", "vxlan:[]:80", "vxlan:]"] {
            let e = bad.parse::<Target>().unwrap_err();
            assert!(e.contains("has no host"), "{bad}: {e}");
        }
    }

    mod properties {
        //! Property tests of policy text, as operators and the controller send it: no text panics
        //! a parser, and a valid policy reads back unchanged from what it prints. Longer runs:
        //! `PROPTEST_CASES=10000 cargo test -p tapgraph --lib policy::`.

        use super::*;
        use crate::config::{Layered, Sources};
        use proptest::prelude::*;

        /// Every key `from_config` reads except `filter`: libpcap resolves host names in a filter,
        /// so arbitrary filters would query DNS.
        fn keys() -> Vec<String> {
            PolicySpec::config_keys("policy")
                .into_iter()
                .filter_map(|k| k.strip_prefix("policy.").map(str::to_string))
                .filter(|k| k != "filter")
                .collect()
        }

        /// `from_config` over `overrides` (full keys), and the problems it recorded.
        pub(super) fn read(overrides: Vec<(String, String)>) -> (PolicySpec, Result<(), String>) {
            let sources = Sources {
                overrides,
                ..Sources::default()
            };
            let mut cfg = match Layered::load(&sources, &[]) {
                Ok(cfg) => cfg,
                Err(e) => return (PolicySpec::default(), Err(e.to_string())),
            };
            let spec = PolicySpec::from_config(&mut cfg, "policy");
            let result = cfg.finish(()).map_err(|e| e.to_string());
            (spec, result)
        }

        fn targetish() -> impl Strategy<Value = String> {
            "(none|interface|pcap|vxlan|tap|gre|erspan)?(:[a-z0-9.:\\[\\]/ -]{0,10}){0,3}"
        }

        fn duration_ms(lo: u64, hi: u64) -> impl Strategy<Value = Duration> {
            (lo..=hi).prop_map(Duration::from_millis)
        }

        fn duration_us(lo: u64, hi: u64) -> impl Strategy<Value = Duration> {
            (lo..=hi).prop_map(Duration::from_micros)
        }

        fn target() -> impl Strategy<Value = Target> {
            prop_oneof![
                Just(Target::None),
                "[a-z][a-z0-9.-]{0,14}".prop_map(Target::Interface),
                "/[a-z0-9/._-]{1,30}".prop_map(|path| Target::Pcap {
                    path,
                    rotate_bytes: 0,
                    rotate_interval: Duration::ZERO,
                }),
                (
                    prop_oneof!["[a-z][a-z0-9.-]{0,20}", "fd00::[0-9a-f]{1,4}"],
                    1u16..,
                    0u32..1 << 24
                )
                    .prop_map(|(host, port, vni)| Target::Vxlan {
                        host,
                        port,
                        vni
                    }),
                "[a-z][a-z0-9.-]{0,14}".prop_map(Target::Tap),
                (
                    prop_oneof!["[a-z][a-z0-9.-]{0,20}", "fd00::[0-9a-f]{1,4}"],
                    any::<Option<u32>>()
                )
                    .prop_map(|(host, key)| Target::Gre { host, key }),
                (
                    prop_oneof!["[a-z][a-z0-9.-]{0,20}", "fd00::[0-9a-f]{1,4}"],
                    prop_oneof![Just(ErspanType::TypeII), Just(ErspanType::TypeIII)],
                    0..=MAX_ERSPAN_SESSION
                )
                    .prop_map(|(host, kind, session)| Target::Erspan {
                        host,
                        kind,
                        session
                    }),
            ]
        }

        /// Up to three targets, none of them `none`, none twice, and the settings of each kind
        /// (VNI, GRE key, ERSPAN type and session) those of its first target: the configuration
        /// has one key each.
        fn targets() -> impl Strategy<Value = Vec<Target>> {
            prop::collection::vec(target(), 0..=3).prop_map(|all| {
                let mut out: Vec<Target> = Vec::new();
                let (mut first_vni, mut first_key, mut first_erspan) = (None, None, None);
                for mut t in all {
                    match &mut t {
                        Target::Vxlan { vni, .. } => *vni = *first_vni.get_or_insert(*vni),
                        Target::Gre { key, .. } => *key = *first_key.get_or_insert(*key),
                        Target::Erspan { kind, session, .. } => {
                            (*kind, *session) = *first_erspan.get_or_insert((*kind, *session));
                        }
                        _ => {}
                    }
                    if t != Target::None && !out.iter().any(|o| o.to_string() == t.to_string()) {
                        out.push(t);
                    }
                }
                out
            })
        }

        /// A bit rate `format_bitrate` writes without rounding: at most three decimals of its unit.
        fn limit() -> impl Strategy<Value = u64> {
            prop_oneof![
                8_000u64..=999_999,
                (1_000u64..=999_999).prop_map(|q| q * 1_000),
                (1_000u64..=100_000).prop_map(|q| q * 1_000_000),
            ]
        }

        /// A policy within every bound, at the resolution of its wire form (ms and µs).
        fn valid_policy() -> impl Strategy<Value = PolicySpec> {
            (
                (
                    any::<bool>(),
                    prop_oneof![Just("any".to_string()), "[a-z][a-z0-9]{0,14}"],
                    prop::sample::select(vec!["", "tcp port 80", "udp and not port 53"]),
                    64u32..=262_144,
                    prop_oneof![Just(CaptureMode::Immediate), Just(CaptureMode::Buffered)],
                    duration_us(1_000, 1_000_000),
                    1u32..=8192,
                ),
                (
                    duration_us(50, 1_000_000),
                    limit(),
                    duration_ms(100, 3_600_000),
                    0u32..=1000,
                    targets(),
                    duration_ms(1_000, 3_600_000),
                    duration_ms(100, 300_000),
                ),
                ((1u64 << 20)..=(1 << 30), any::<bool>(), any::<bool>()),
            )
                .prop_map(
                    |(
                        (capture, interface, filter, snaplen, mode, buffer_timeout, batch_packets),
                        (
                            batch_delay,
                            limit_bps,
                            check_interval,
                            breach_intervals,
                            targets,
                            snapshot_interval,
                            heartbeat_interval,
                        ),
                        (buffer_size, direct, dedup),
                    )| PolicySpec {
                        // Direct only where every target may be sent from the agent.
                        direct: direct
                            && !targets.is_empty()
                            && targets.iter().all(Target::is_tunnel),
                        capture,
                        interface,
                        filter: filter.to_string(),
                        snaplen,
                        mode,
                        buffer_timeout,
                        buffer_size,
                        batch_packets,
                        batch_delay,
                        limit_bps,
                        check_interval,
                        breach_intervals,
                        targets,
                        dedup,
                        snapshot_interval,
                        heartbeat_interval,
                    },
                )
        }

        proptest! {
            #[test]
            fn no_text_panics_the_target_parser(text in any::<String>()) {
                if let Ok(target) = text.parse::<Target>() {
                    prop_assert_eq!(target.to_string().parse::<Target>(), Ok(target));
                }
            }

            #[test]
            fn accepted_targets_print_what_parses_back(text in targetish()) {
                if let Ok(target) = text.parse::<Target>() {
                    prop_assert_eq!(target.to_string().parse::<Target>(), Ok(target));
                }
            }

            #[test]
            fn no_mode_text_panics(text in any::<String>()) {
                if let Ok(mode) = text.parse::<CaptureMode>() {
                    prop_assert_eq!(format!("{mode:?}").to_lowercase(), text);
                }
            }

            /// Whatever an operator writes, `from_config` returns a policy that validates (the
            /// default when theirs does not), and every problem names a `policy.` key.
            #[test]
            fn no_policy_text_panics(
                values in prop::collection::vec(
                    (prop::sample::select(keys()), prop_oneof![any::<String>(), "[0-9.]{0,12}[a-zA-Z/ ]{0,5}", targetish()]),
                    0..6,
                ),
            ) {
                let overrides = values
                    .into_iter()
                    .map(|(key, value)| (format!("policy.{key}"), value))
                    .collect();
                let (spec, result) = read(overrides);
                prop_assert!(spec.validate(false).is_ok(), "{spec:?}");
                if let Err(e) = result {
                    prop_assert!(e.contains("policy."), "{e}");
                }
            }

            /// A valid policy, written as an operator writes it (the form of `to_json`, which
            /// `tapgraphctl policy -o json` shows), reads back as the same policy.
            #[test]
            fn valid_policies_read_back_from_their_text(spec in valid_policy()) {
                let json = spec.to_json();
                let mut overrides: Vec<(String, String)> = json
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(key, value)| {
                        let text = value.as_str().map_or_else(|| value.to_string(), str::to_string);
                        (format!("policy.{key}"), text)
                    })
                    .collect();
                for target in &spec.targets {
                    match target {
                        Target::Vxlan { vni, .. } => {
                            overrides.push(("policy.vni".into(), vni.to_string()));
                        }
                        Target::Gre { key: Some(key), .. } => {
                            overrides.push(("policy.gre_key".into(), key.to_string()));
                        }
                        Target::Erspan { kind, session, .. } => {
                            overrides.push(("policy.erspan_type".into(), kind.to_string()));
                            overrides.push(("policy.erspan_session".into(), session.to_string()));
                        }
                        _ => {}
                    }
                }
                let (back, result) = read(overrides);
                prop_assert_eq!(result, Ok(()));
                prop_assert_eq!(back, spec);
            }

            #[test]
            fn valid_policies_round_trip_through_protobuf(
                spec in valid_policy(),
                rotate_bytes in any::<u64>(),
                rotate_ms in 0u64..1 << 40,
                version in any::<u64>(),
            ) {
                let mut spec = spec;
                for t in &mut spec.targets {
                    if let Target::Pcap { rotate_bytes: bytes, rotate_interval, .. } = t {
                        *bytes = rotate_bytes;
                        *rotate_interval = Duration::from_millis(rotate_ms);
                    }
                }
                let wire = spec.to_proto(version, "p");
                prop_assert_eq!(wire.version, version);
                prop_assert_eq!(PolicySpec::from_proto(&wire), Ok(spec));
            }
        }
    }
}
