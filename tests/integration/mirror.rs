//! Issue 7: the virtual TAP end to end, in network-namespace hosts.
//!
//! ```text
//!   peer ──lan0── src (agent: captures on lan0) ──eth0── hub (controller) ──span0── span (analyzer)
//! ```
//!
//! UDP from `peer` to `src` is captured by the agent, streamed over mTLS to the controller in `hub`,
//! and reinjected into `span0`, recorded as pcapng, or sent in VXLAN to `span`. tcpdump at the
//! source and at the analyzer records both sides; packets are compared by their bytes' hashes.
//! The capture's limits, in the same lab, are in `mirror_rate.rs`.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::harness::{Netns, Proc, World, bin, http_get, require_root, veth, wait_for};

const HTTP: &str = "127.0.0.1:7080";
pub(crate) const PORT: u16 = 9999;

/// Fields drop in order: processes first, then the namespaces, then the directory with the logs.
pub(crate) struct Lab {
    procs: Vec<Proc>,
    peer: Netns,
    pub(crate) src: Netns,
    pub(crate) hub: Netns,
    pub(crate) span: Netns,
    ctl: PathBuf,
    pub(crate) world: World,
}

/// One packet as a pcap file holds it.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub(crate) ts_ns: u64,
    pub(crate) data: Vec<u8>,
}

pub(crate) fn hashes(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .map(|f| format!("{:x}", Sha256::digest(&f.data)))
        .collect()
}

/// Every frame of a pcap or pcapng file, with nanosecond timestamps; none while the file has no
/// header yet.
pub(crate) fn read_pcap(path: &Path) -> Vec<Frame> {
    let Ok(mut cap) = pcap::Capture::from_file_with_precision(path, pcap::Precision::Nano) else {
        return Vec::new();
    };
    let mut frames = Vec::new();
    while let Ok(p) = cap.next_packet() {
        #[allow(clippy::unnecessary_cast)]
        let ts_ns = p.header.ts.tv_sec as u64 * 1_000_000_000 + p.header.ts.tv_usec as u64;
        frames.push(Frame {
            ts_ns,
            data: p.data.to_vec(),
        });
    }
    frames
}

/// A tcpdump writing `filter` on `iface` of `ns` to a file, until stopped.
pub(crate) struct Dump {
    proc: Proc,
    pub(crate) path: PathBuf,
}

impl Dump {
    pub(crate) fn start(lab: &Lab, ns: &Netns, label: &str, iface: &str, filter: &str) -> Dump {
        Self::start_with(lab, ns, label, iface, &[], filter)
    }

    /// [`Dump::start`] with more tcpdump options (`-Q in`).
    pub(crate) fn start_with(
        lab: &Lab,
        ns: &Netns,
        label: &str,
        iface: &str,
        options: &[&str],
        filter: &str,
    ) -> Dump {
        let path = lab.world.path().join(format!("{label}.pcap"));
        let mut cmd = ns.command("tcpdump");
        cmd.args(["-i", iface, "--immediate-mode", "-U", "-n", "-s", "0"])
            .args(options)
            .args(["--time-stamp-precision=nano", "-w"])
            .arg(&path)
            .arg(filter);
        let proc = Proc::spawn(label, cmd, lab.world.path());
        wait_for(
            &format!("tcpdump {label} listening"),
            Duration::from_secs(10),
            || proc.log_text().contains("listening on").then_some(()),
        );
        Dump { proc, path }
    }

    /// Waits until the file holds `n` packets (tcpdump writes each as it comes), at most 10 s,
    /// then finishes: a packet tcpdump has not taken from its ring by then (a starved tcpdump
    /// on a busy CI machine once read 194 of the 200 its filter had passed) is written when
    /// SIGINT stops it. Callers check the count on what was written.
    pub(crate) fn finish_at(self, n: usize) -> Vec<Frame> {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while read_pcap(&self.path).len() < n && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.finish()
    }

    /// Stops tcpdump (it flushes on SIGINT) and reads what it recorded.
    pub(crate) fn finish(mut self) -> Vec<Frame> {
        self.proc.signal(Signal::SIGINT);
        self.proc.wait_exit(Duration::from_secs(10));
        read_pcap(&self.path)
    }
}

impl Lab {
    pub(crate) fn new() -> Lab {
        let world = World::new();
        let (peer, src, hub, span) = (
            Netns::new("peer"),
            Netns::new("src"),
            Netns::new("hub"),
            Netns::new("span"),
        );
        veth(
            &hub,
            "to-src",
            "198.18.1.1/30",
            &src,
            "eth0",
            "198.18.1.2/30",
        );
        veth(&peer, "eth0", "10.9.0.1/24", &src, "lan0", "10.9.0.2/24");
        veth(
            &hub,
            "span0",
            "10.99.0.1/30",
            &span,
            "span1",
            "10.99.0.2/30",
        );
        // A VXLAN endpoint on the analyzer: decapsulated frames appear on vx0.
        let vx = span
            .command("ip")
            .args([
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                "42",
                "dstport",
                "4789",
                "local",
                "10.99.0.2",
                "dev",
                "span1",
            ])
            .output()
            .unwrap();
        assert!(vx.status.success(), "{vx:?}");
        let up = span
            .command("ip")
            .args(["link", "set", "vx0", "up"])
            .output()
            .unwrap();
        assert!(up.status.success(), "{up:?}");
        // The operator's host resolves a name the capturing host does not (see the filter test).
        hub.hosts_file("127.0.0.1 localhost\n10.9.0.1 analyzer-only.example\n");
        let cmd =
            hub.wrap(world.controller_cmd("0.0.0.0:7443".parse().unwrap(), HTTP.parse().unwrap()));
        let controller = Proc::spawn("controller", cmd, world.path());
        let mut lab = Lab {
            procs: vec![controller],
            peer,
            src,
            hub,
            span,
            ctl: PathBuf::new(),
            world,
        };
        let http: SocketAddr = HTTP.parse().unwrap();
        wait_for("controller ready", Duration::from_secs(20), || {
            lab.hub
                .run(|| matches!(http_get(http, "/readyz"), Ok((200, _))).then_some(()))
        });
        lab.ctl = lab
            .world
            .operator("admin", "127.0.0.1:7443".parse().unwrap());
        lab.world.issue_agent("src");
        let mut cmd = lab
            .world
            .agent_cmd("src", "198.18.1.1:7443".parse().unwrap());
        cmd.args(["--server-name", "localhost"]);
        let agent = Proc::spawn("agent-src", lab.src.wrap(cmd), lab.world.path());
        lab.procs.push(agent);
        wait_for("agent connected", Duration::from_secs(20), || {
            lab.agent()
                .filter(|a| a["state"] == "connected")
                .map(|_| ())
        });
        lab
    }

    pub(crate) fn get(&self, path: &str) -> Value {
        let http: SocketAddr = HTTP.parse().unwrap();
        let (status, body) = self.hub.run(|| http_get(http, path)).expect(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The agent's process (started second, after the controller).
    pub(crate) fn agent_pid(&self) -> nix::unistd::Pid {
        self.procs[1].pid()
    }

    pub(crate) fn agent(&self) -> Option<Value> {
        self.get("/api/v1/agents")
            .as_array()?
            .iter()
            .find(|a| a["id"] == "src")
            .cloned()
    }

    /// The mirror counters of agent src towards `target`.
    pub(crate) fn mirror(&self, target: &str) -> Option<Value> {
        self.get("/api/v1/mirror")
            .as_array()?
            .iter()
            .find(|m| m["agent"] == "src" && m["target"] == target)
            .cloned()
    }

    pub(crate) fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = self
            .hub
            .command(bin("tapgraphctl"))
            .arg("--config")
            .arg(&self.ctl)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Sets policy `tap` for every agent and waits until src applied or refused it; returns the
    /// refusal, if any.
    pub(crate) fn policy(&self, args: &[&str]) -> Option<String> {
        let mut all = vec!["policy", "set", "tap", "--all"];
        all.extend_from_slice(args);
        let (ok, out) = self.ctl(&all);
        assert!(ok, "policy set {args:?}: {out}");
        // The registry records the push before `policy set` returns: wait for the agent's answer.
        wait_for("policy outcome", Duration::from_secs(20), || {
            let a = self.agent()?;
            if let Some(e) = a["policy_error"].as_str() {
                return Some(Some(e.to_string()));
            }
            (a["policy_version_applied"] == a["policy_version_sent"]).then_some(None)
        })
    }

    /// Sets policy `tap` to capture `filter` on src's lan0, with `more` flags (limit, targets…);
    /// returns the refusal, if any, as [`Lab::policy`].
    pub(crate) fn capture(&self, filter: &str, more: &[&str]) -> Option<String> {
        let mut args = vec!["--capture", "--interface", "lan0", "--filter", filter];
        args.extend_from_slice(more);
        self.policy(&args)
    }

    /// Sends `count` UDP datagrams from peer to src:`port`, `gap` apart, with random payloads of
    /// `sizes` bytes (seeded: the same run sends the same bytes).
    pub(crate) fn send(
        &self,
        port: u16,
        count: usize,
        sizes: std::ops::Range<usize>,
        gap: Duration,
    ) {
        self.peer.run(|| {
            let sock = UdpSocket::bind("10.9.0.1:0").unwrap();
            // Resolve the neighbour first, so no datagram waits for ARP.
            sock.send_to(b"warm-up", "10.9.0.2:9").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let mut rng = rand::rngs::StdRng::seed_from_u64(port as u64 + count as u64);
            let start = Instant::now();
            for i in 0..count {
                let len = rng.random_range(sizes.clone());
                let mut payload = vec![0u8; len];
                rng.fill(&mut payload[..]);
                payload[..8.min(len)].copy_from_slice(&(i as u64).to_be_bytes()[..8.min(len)]);
                sock.send_to(&payload, ("10.9.0.2", port)).unwrap();
                // Paced against the start, so the rate holds even when a sleep runs long.
                let due = gap * (i as u32 + 1);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        });
    }

    pub(crate) fn written(&self, target: &str) -> u64 {
        self.mirror(target)
            .and_then(|m| m["packets_written"].as_u64())
            .unwrap_or(0)
    }

    pub(crate) fn wait_written(&self, target: &str, at_least: u64) -> Value {
        wait_for(
            &format!("{at_least} packets written to {target}"),
            Duration::from_secs(20),
            || {
                self.mirror(target)
                    .filter(|m| m["packets_written"].as_u64() >= Some(at_least))
            },
        )
    }
}

pub(crate) fn filter(port: u16) -> String {
    format!("udp and dst port {port}")
}

#[test]
fn mirrored_packets_arrive_byte_identical_in_order_on_every_target() {
    if !require_root("mirrored_packets_arrive_byte_identical_in_order_on_every_target") {
        return;
    }
    let lab = Lab::new();
    let f = filter(PORT);

    // Reinjection into span0: the analyzer on span1 sees exactly what crossed lan0.
    let refused = lab.capture(&f, &["--limit", "100Mbit", "--target", "interface:span0"]);
    assert_eq!(refused, None);
    let at_src = Dump::start(&lab, &lab.src, "src-1", "lan0", &f);
    let at_span = Dump::start(&lab, &lab.span, "span-1", "span1", &f);
    lab.send(PORT, 300, 18..1400, Duration::from_micros(500));
    lab.wait_written("interface:span0", 300);
    let (sent, seen) = (at_src.finish_at(300), at_span.finish_at(300));
    assert_eq!(sent.len(), 300, "tcpdump at the source");
    assert_eq!(
        hashes(&seen),
        hashes(&sent),
        "the analyzer must see the same frames, byte for byte, in order"
    );
    let stats = lab.mirror("interface:span0").unwrap();
    assert!(stats["delay_p99_us"].as_u64().is_some(), "{stats}");
    let agent = lab.agent().unwrap();
    assert_eq!(agent["capture"]["state"], "running", "{agent}");
    // Operators read the same through tapgraphctl.
    let (ok, table) = lab.ctl(&["mirror"]);
    assert!(
        ok && table.contains("interface:span0") && table.contains("running"),
        "{table}"
    );
    // The agent's own counters come with its next control record (every 5 s).
    let json = wait_for("the agent's counters", Duration::from_secs(10), || {
        let (ok, json) = lab.ctl(&["-o", "json", "mirror", "--agent", "src"]);
        assert!(ok, "{json}");
        let json: Value = serde_json::from_str(&json).unwrap();
        (json[0]["captured"] == 300).then_some(json)
    });
    assert_eq!(json[0]["targets"][0]["written"], 300, "{json}");
    assert_eq!(json[0]["sent"], 300, "{json}");

    // pcapng: tshark opens it, and the timestamps are the capture's own, to the nanosecond.
    let file = lab.world.path().join("tap.pcapng");
    let target = format!("pcap:{}", file.display());
    assert_eq!(lab.policy(&["--target", &target]), None);
    let at_src = Dump::start(&lab, &lab.src, "src-2", "lan0", &f);
    lab.send(PORT, 100, 18..1400, Duration::from_micros(500));
    lab.wait_written(&target, 100);
    let sent = at_src.finish_at(100);
    // The writer flushes when idle; switching the target away closes the file.
    assert_eq!(lab.policy(&["--target", "none"]), None);
    wait_for("pcapng complete", Duration::from_secs(10), || {
        (read_pcap(&file).len() == 100).then_some(())
    });
    let recorded = read_pcap(&file);
    assert_eq!(hashes(&recorded), hashes(&sent));
    let sent_ts: Vec<u64> = sent.iter().map(|f| f.ts_ns).collect();
    let recorded_ts: Vec<u64> = recorded.iter().map(|f| f.ts_ns).collect();
    assert_eq!(recorded_ts.len(), sent_ts.len());
    // Source tcpdump and agent stamp the same packets independently (two sockets), within 1 ms;
    // and the recording keeps nanosecond digits (not rounded to µs).
    for (r, s) in recorded_ts.iter().zip(&sent_ts) {
        assert!(r.abs_diff(*s) < 1_000_000, "recorded {r} vs source {s}");
    }
    assert!(
        recorded_ts.iter().any(|t| t % 1000 != 0),
        "nanosecond timestamps"
    );
    let tshark = std::process::Command::new("tshark")
        .args(["-r"])
        .arg(&file)
        .args([
            "-T",
            "fields",
            "-e",
            "frame.interface_name",
            "-e",
            "frame.time_epoch",
        ])
        .output()
        .expect("tshark (scripts/install-deps installs it)");
    assert!(tshark.status.success(), "{tshark:?}");
    let lines = String::from_utf8_lossy(&tshark.stdout);
    assert_eq!(lines.lines().count(), 100, "{lines}");
    assert!(
        lines.lines().all(|l| l.starts_with("src:lan0")),
        "every packet names its agent and interface: {lines}"
    );

    // VXLAN: the analyzer's vx0 (VNI 42) decapsulates the same frames.
    assert_eq!(
        lab.policy(&["--target", "vxlan:10.99.0.2:4789", "--vni", "42"]),
        None
    );
    let at_src = Dump::start(&lab, &lab.src, "src-3", "lan0", &f);
    let at_vx = Dump::start(&lab, &lab.span, "span-vx", "vx0", &f);
    lab.send(PORT, 200, 18..1400, Duration::from_micros(500));
    lab.wait_written("vxlan:10.99.0.2:4789", 200);
    let (sent, seen) = (at_src.finish_at(200), at_vx.finish_at(200));
    assert_eq!(hashes(&seen), hashes(&sent));

    // Counters balance on the agent: captured = sent + dropped + in flight.
    let c = &lab.agent().unwrap()["capture"];
    let get = |k: &str| c[k].as_u64().unwrap();
    assert_eq!(
        get("packets_captured"),
        get("packets_sent")
            + get("packets_dropped_limiter")
            + get("packets_dropped_queue")
            + get("packets_in_flight"),
        "{c}"
    );
}

#[test]
fn filters_change_live_and_bad_ones_keep_the_previous_capture() {
    if !require_root("filters_change_live_and_bad_ones_keep_the_previous_capture") {
        return;
    }
    let lab = Lab::new();
    let target = "interface:span0";
    assert_eq!(
        lab.policy(&[
            "--capture",
            "--interface",
            "lan0",
            "--filter",
            &filter(PORT),
            "--target",
            target
        ]),
        None
    );
    lab.send(PORT, 50, 100..200, Duration::from_millis(1));
    lab.wait_written(target, 50);

    // A new filter applies live: the old port is no longer mirrored, the new one is.
    assert_eq!(lab.policy(&["--filter", &filter(PORT - 1)]), None);
    lab.send(PORT, 50, 100..200, Duration::from_millis(1));
    lab.send(PORT - 1, 30, 100..200, Duration::from_millis(1));
    lab.wait_written(target, 80);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.written(target), 80, "only the new filter's packets");

    // A filter the controller's host compiles but the agent's cannot (it names a host only the
    // operator's host resolves): refused with libpcap's words; the running capture goes on.
    let refused = lab
        .policy(&[
            "--filter",
            "udp and dst port 9998 and not host analyzer-only.example",
        ])
        .expect("the agent must refuse the filter");
    assert!(refused.contains("analyzer-only.example"), "{refused}");
    lab.send(PORT - 1, 20, 100..200, Duration::from_millis(1));
    lab.wait_written(target, 100);
    assert_eq!(lab.agent().unwrap()["capture"]["state"], "running");

    // A missing capture interface is refused the same way.
    let refused = lab
        .policy(&["--interface", "nosuch0", "--filter", &filter(PORT - 1)])
        .unwrap();
    assert!(refused.contains("nosuch0"), "{refused}");
    lab.send(PORT - 1, 20, 100..200, Duration::from_millis(1));
    lab.wait_written(target, 120);

    // A missing target interface on the controller: counted and reported, nothing breaks.
    assert_eq!(
        lab.policy(&["--interface", "lan0", "--target", "interface:nosuch1"]),
        None
    );
    lab.send(PORT - 1, 20, 100..200, Duration::from_millis(1));
    let m = wait_for("target_unavailable drops", Duration::from_secs(20), || {
        lab.mirror("interface:nosuch1")
            .filter(|m| m["dropped"]["target_unavailable"].as_u64() >= Some(20))
    });
    assert!(m["last_error"].as_str().unwrap().contains("nosuch1"), "{m}");

    // Oversize: frames above span0's MTU are counted with the fix; smaller ones still go out.
    let mtu = lab
        .hub
        .command("ip")
        .args(["link", "set", "span0", "mtu", "1000"])
        .output()
        .unwrap();
    assert!(mtu.status.success(), "{mtu:?}");
    assert_eq!(lab.policy(&["--target", target]), None);
    let before = lab.written(target);
    lab.send(PORT - 1, 10, 1200..1400, Duration::from_millis(1));
    lab.send(PORT - 1, 10, 100..200, Duration::from_millis(1));
    lab.wait_written(target, before + 10);
    let m = wait_for("oversize drops", Duration::from_secs(10), || {
        lab.mirror(target)
            .filter(|m| m["dropped"]["oversize"].as_u64() >= Some(10))
    });
    let error = m["last_error"].as_str().unwrap();
    assert!(error.contains("MTU") && error.contains("gro"), "{error}");
}

/// Packets no target can take are dropped and counted with the reason; the stream goes on and
/// the good packets of the same and later batches are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_mirrored_packets_are_counted_and_the_stream_goes_on() {
    use tapgraph::proto;
    let world = World::new();
    let controller = crate::harness::Controller::start(&world, &[]);
    // A session first, so the controller knows the agent and its policy (target none).
    let (_send, _inbound) = crate::topology::raw_agent_as(&world, &controller, "raw", "raw").await;
    let channel = crate::topology::raw_channel(&world, &controller, "raw").await;
    let packet = |len: usize, original: u32| proto::Packet {
        timestamp_unix_nanos: tapgraph::time::unix_nanos(),
        original_length: original,
        data: vec![0xab; len].into(),
    };
    let batches = vec![
        proto::MirrorBatch {
            sequence: 1,
            policy_version: 1,
            linktype: 1,
            packets: vec![
                packet(0, 0),
                packet(300_000, 300_000),
                packet(100, 60),
                packet(100, 100),
            ],
            ..Default::default()
        },
        proto::MirrorBatch {
            sequence: 2,
            policy_version: 1,
            linktype: 1,
            packets: vec![packet(60, 60), packet(1500, 9000)],
            ..Default::default()
        },
    ];
    let summary = proto::agent_service_client::AgentServiceClient::new(channel)
        .mirror(tokio_stream::iter(batches))
        .await
        .expect("the stream is not refused")
        .into_inner();
    assert_eq!(summary.batches_received, 2);
    let stats = wait_for("mirror stats", Duration::from_secs(10), || {
        let (_, body) = http_get(controller.http, "/api/v1/mirror").ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v.as_array()?
            .iter()
            .find(|m| m["agent"] == "raw" && m["packets_written"] == 3)
            .cloned()
    });
    assert_eq!(stats["dropped"]["invalid"], 3, "{stats}");
    assert_eq!(stats["packets_received"], 6, "{stats}");
    assert!(controller.proc.log_text().contains("invalid packets"));
}

/// Issue 22: both ends of a flow are monitored (peer's agent sees each datagram leave, src's sees
/// it arrive) and one policy sends both to one target: the analyzer sees each datagram once and
/// the controller counts the other copy as a duplicate; with dedup off it sees both.
#[test]
fn a_target_fed_by_both_ends_of_a_flow_delivers_each_packet_once() {
    if !require_root("a_target_fed_by_both_ends_of_a_flow_delivers_each_packet_once") {
        return;
    }
    let mut lab = Lab::new();
    // A second agent on peer, with its own link to the controller.
    veth(
        &lab.hub,
        "to-peer",
        "198.18.2.1/30",
        &lab.peer,
        "ctl0",
        "198.18.2.2/30",
    );
    lab.world.issue_agent("peer");
    let mut cmd = lab
        .world
        .agent_cmd("peer", "198.18.2.1:7443".parse().unwrap());
    cmd.args(["--server-name", "localhost"]);
    let agent = Proc::spawn("agent-peer", lab.peer.wrap(cmd), lab.world.path());
    lab.procs.push(agent);
    let peer = |lab: &Lab| -> Option<Value> {
        lab.get("/api/v1/agents")
            .as_array()?
            .iter()
            .find(|a| a["id"] == "peer")
            .cloned()
    };
    wait_for("peer agent connected", Duration::from_secs(20), || {
        peer(&lab).filter(|a| a["state"] == "connected").map(|_| ())
    });
    let set = |args: &[&str]| {
        assert_eq!(lab.policy(args), None);
        wait_for("peer applied the policy", Duration::from_secs(20), || {
            peer(&lab).filter(|a| {
                a["policy_version_applied"] == a["policy_version_sent"]
                    && a["policy_error"].is_null()
            })
        });
    };
    let (f, target, n) = (filter(PORT), "interface:span0", 100u64);
    let counter = |key: &str, reason: Option<&str>| -> u64 {
        lab.get("/api/v1/mirror")
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["target"] == target)
            .map(|m| match reason {
                Some(r) => m[key][r].as_u64().unwrap_or(0),
                None => m[key].as_u64().unwrap_or(0),
            })
            .sum()
    };
    // `any`: the interface names differ between the two hosts (lan0, eth0).
    set(&[
        "--capture",
        "--interface",
        "any",
        "--filter",
        &f,
        "--limit",
        "100Mbit",
        "--target",
        target,
    ]);
    // The UDP payload of every datagram, which no copy changes.
    let payloads = |frames: &[Frame]| {
        let mut p: Vec<Vec<u8>> = frames.iter().map(|f| f.data[42..].to_vec()).collect();
        p.sort();
        p
    };
    let at_src = Dump::start(&lab, &lab.src, "src-dedup", "lan0", &f);
    let at_span = Dump::start(&lab, &lab.span, "span-dedup", "span1", &f);
    lab.send(PORT, n as usize, 18..1400, Duration::from_micros(500));
    wait_for("both copies received", Duration::from_secs(20), || {
        (counter("packets_received", None) >= 2 * n).then_some(())
    });
    let sent = at_src.finish_at(n as usize);
    std::thread::sleep(Duration::from_millis(300));
    let seen = at_span.finish();
    assert_eq!(seen.len() as u64, n, "the analyzer sees each datagram once");
    assert_eq!(payloads(&seen), payloads(&sent));
    assert_eq!(counter("dropped", Some("duplicate")), n);
    assert_eq!(counter("packets_written", None), n);
    assert_eq!(counter("lost_in_transit", None), 0);

    // Off: every agent's copy is written.
    set(&["--dedup", "off"]);
    let at_span = Dump::start(&lab, &lab.span, "span-both", "span1", &f);
    lab.send(PORT, n as usize, 18..1400, Duration::from_micros(500));
    wait_for("both copies written", Duration::from_secs(20), || {
        (counter("packets_written", None) >= 3 * n).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let seen = at_span.finish();
    assert_eq!(seen.len() as u64, 2 * n, "with dedup off, both copies");
    assert_eq!(counter("dropped", Some("duplicate")), n);
    assert_eq!(counter("packets_written", None), 3 * n);
}
