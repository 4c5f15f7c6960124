//! Direct mode: the agent sends each batch to the policy's tunnel targets itself (VXLAN, GRE,
//! ERSPAN, with the writers the controller uses, `tapgraph-encap`), as cloud traffic mirroring
//! does, instead of on the `Mirror` stream. The capture thread, the limit and the queue are the
//! same; only the forwarder's last step changes, and the counts the controller can no longer make
//! itself (written, oversize, failed, capture-to-send delay) go out in control records.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tapgraph::delay::Histogram;
use tapgraph::policy::Target;
use tapgraph::proto;
use tapgraph_encap::{OpenError, Origin, Writer, Written};

/// One target's counters, cumulative since the agent started: a capture that replaces another
/// with the same target goes on counting in the same row.
#[derive(Debug, Default)]
pub struct TargetCounters {
    batches: AtomicU64,
    written: AtomicU64,
    bytes: AtomicU64,
    oversize: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Capture to send, on the agent's clock, in µs.
    delay: Histogram,
}

impl TargetCounters {
    fn count(&self, w: &Written) {
        let add = |c: &AtomicU64, n| c.fetch_add(n, Ordering::Relaxed);
        add(&self.batches, 1);
        add(&self.written, w.packets);
        add(&self.bytes, w.bytes);
        add(&self.oversize, w.oversize);
        add(&self.failed, w.failed);
        if let (Some(e), Ok(mut last)) = (&w.error, self.last_error.lock()) {
            *last = Some(e.clone());
        }
    }
}

/// Every target's counters this agent has sent to, by target text; what control records carry.
#[derive(Debug, Default)]
pub struct DirectStats {
    targets: BTreeMap<String, Arc<TargetCounters>>,
}

impl DirectStats {
    fn of(&mut self, target: &Target) -> Arc<TargetCounters> {
        self.targets.entry(target.to_string()).or_default().clone()
    }

    pub fn snapshot(&self) -> Vec<proto::DirectTarget> {
        self.targets
            .iter()
            .map(|(target, c)| {
                let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
                proto::DirectTarget {
                    target: target.clone(),
                    batches: get(&c.batches),
                    packets_written: get(&c.written),
                    bytes_written: get(&c.bytes),
                    packets_oversize: get(&c.oversize),
                    packets_failed: get(&c.failed),
                    last_error: c
                        .last_error
                        .lock()
                        .ok()
                        .and_then(|e| e.clone())
                        .unwrap_or_default(),
                    delay_p50_us: c.delay.quantile(0.5).unwrap_or(0),
                    delay_p99_us: c.delay.quantile(0.99).unwrap_or(0),
                }
            })
            .collect()
    }
}

struct Open {
    writer: Box<dyn Writer>,
    counters: Arc<TargetCounters>,
}

/// The open writers of one capture's targets. Batches of that capture carry it to the forwarder,
/// so batches still queued from a replaced capture go where that one said.
pub struct Direct {
    targets: Mutex<Vec<Open>>,
    hostname: String,
}

impl fmt::Debug for Direct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Direct").finish_non_exhaustive()
    }
}

impl Direct {
    /// Opens every target (resolving its host: may block). One that cannot open refuses the
    /// policy, as a bad filter does, with the target and the fix.
    pub fn open(targets: &[Target], stats: &mut DirectStats) -> Result<Self, OpenError> {
        let opened = targets
            .iter()
            .map(|t| {
                Ok(Open {
                    writer: tapgraph_encap::open(t)?,
                    counters: stats.of(t),
                })
            })
            .collect::<Result<_, OpenError>>()?;
        Ok(Self {
            targets: Mutex::new(opened),
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
        })
    }

    /// Writes `packets` (captured on `interface` as `linktype`) to every target, in order, and
    /// counts what became of each on its own row. Blocks on the sockets: call on a blocking thread.
    pub fn write(&self, interface: &str, linktype: u32, snaplen: u32, packets: &[proto::Packet]) {
        let origin = Origin {
            agent_id: "",
            hostname: &self.hostname,
            interface,
            linktype,
            snaplen,
        };
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        for open in targets.iter_mut() {
            let written = open.writer.write(&origin, packets);
            if written.packets > 0 {
                let now = tapgraph::time::unix_nanos();
                open.counters.delay.record_all(
                    packets
                        .iter()
                        .map(|p| now.saturating_sub(p.timestamp_unix_nanos) / 1_000),
                );
            }
            open.counters.count(&written);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_batch_arrives_as_vxlan_and_is_counted_on_its_target() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let port = rx.local_addr().unwrap().port();
        let target = Target::Vxlan {
            host: "127.0.0.1".into(),
            port,
            vni: 42,
        };
        let mut stats = DirectStats::default();
        let direct = Direct::open(std::slice::from_ref(&target), &mut stats).unwrap();
        let frame: Vec<u8> = (0..60u8).collect();
        let captured = tapgraph::time::unix_nanos();
        let packets = [
            proto::Packet {
                timestamp_unix_nanos: captured,
                original_length: 60,
                data: frame.clone().into(),
            },
            proto::Packet {
                timestamp_unix_nanos: captured,
                original_length: 3,
                data: vec![1, 2, 3].into(),
            },
        ];
        direct.write("eth0", 1, 65535, &packets);

        let mut buf = [0u8; 2048];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..8],
            &[0x08, 0, 0, 0, 0, 0, 42, 0],
            "VXLAN header, VNI 42"
        );
        assert_eq!(&buf[8..n], &frame[..]);

        let [row] = &stats.snapshot()[..] else {
            panic!("one row: {:?}", stats.snapshot());
        };
        assert_eq!(row.target, format!("vxlan:127.0.0.1:{port}"));
        assert_eq!(
            (row.batches, row.packets_written, row.bytes_written),
            (1, 1, 60)
        );
        assert_eq!((row.packets_failed, row.packets_oversize), (1, 0));
        assert!(row.last_error.contains("shorter than its 14-byte header"));
        assert!(row.delay_p99_us >= row.delay_p50_us);

        // A later capture with the same target counts on the same row.
        let again = Direct::open(std::slice::from_ref(&target), &mut stats).unwrap();
        again.write("eth0", 1, 65535, &packets[..1]);
        assert_eq!(stats.snapshot()[0].packets_written, 2);
    }

    #[test]
    fn a_target_that_cannot_open_is_named() {
        let target = Target::Vxlan {
            host: "nosuch.invalid".into(),
            port: 4789,
            vni: 1,
        };
        let err = Direct::open(&[target], &mut DirectStats::default())
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .starts_with("mirror target vxlan:nosuch.invalid:4789: cannot resolve"),
            "{err}"
        );
    }
}
