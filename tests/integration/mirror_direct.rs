//! Issue 22, direct mode: the agent sends the encapsulated stream to the analyzer itself, over a
//! link of its own; the controller stays off the packet path and shows the agent's counts.
//!
//! ```text
//!   peer ──lan0── src (agent) ──eth0── hub (controller) ──span0── span (analyzer, vx0)
//!                  └──────────an0──────────────────────────an1──┘
//! ```
//!
//! The lab of `mirror.rs`, with a veth from `src` to `span` and a route to the analyzer's
//! 10.99.0.2 through it: what reaches the analyzer never crosses `hub`.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{require_root, veth, wait_for};
use crate::mirror::{Dump, Lab, PORT, filter, hashes};
use crate::mirror_targets::{decode, inner_hashes};

const VXLAN: &str = "vxlan:10.99.0.2:4789";
const GRE: &str = "gre:10.99.0.2";

/// Agent src's entry of `tapgraphctl -o json mirror`.
fn ctl_mirror(lab: &Lab) -> Value {
    let (ok, out) = lab.ctl(&["-o", "json", "mirror", "--agent", "src"]);
    assert!(ok, "{out}");
    let agents: Value = serde_json::from_str(&out).expect(&out);
    agents[0].clone()
}

/// Waits until the agent's control record shows `sent` packets sent in all, `written` of them to
/// `target`.
fn wait_settled(lab: &Lab, target: &str, sent: u64, written: u64) -> (Value, Value) {
    wait_for(
        &format!("{sent} packets sent, {written} written to {target} directly"),
        Duration::from_secs(20),
        || {
            let a = ctl_mirror(lab);
            let t = a["targets"]
                .as_array()?
                .iter()
                .find(|t| t["target"] == target)?
                .clone();
            (a["sent"].as_u64() == Some(sent) && t["written"].as_u64() == Some(written))
                .then_some((a, t))
        },
    )
}

#[test]
fn direct_mode_sends_vxlan_and_gre_from_the_agent_and_the_controller_only_counts() {
    if !require_root(
        "direct_mode_sends_vxlan_and_gre_from_the_agent_and_the_controller_only_counts",
    ) {
        return;
    }
    let lab = Lab::new();
    veth(
        &lab.src,
        "an0",
        "10.99.0.5/30",
        &lab.span,
        "an1",
        "10.99.0.6/30",
    );
    let route = lab
        .src
        .command("ip")
        .args(["route", "add", "10.99.0.2/32", "via", "10.99.0.6"])
        .output()
        .unwrap();
    assert!(route.status.success(), "{route:?}");
    let f = filter(PORT);
    let policy = |target: &[&str]| {
        let mut args = vec![
            "--limit",
            "100Mbit",
            "--heartbeat-interval",
            "1s",
            "--direct",
        ];
        args.extend_from_slice(target);
        lab.capture(&f, &args)
    };

    // Refused where the agent cannot send: the offending target is named.
    let (ok, out) = lab.ctl(&[
        "policy",
        "set",
        "tap",
        "--all",
        "--capture",
        "--direct",
        "--target",
        "pcap:x.pcapng",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("pcap:x.pcapng cannot be sent from the agent"),
        "{out}"
    );

    // VXLAN: the analyzer's vx0 (VNI 42) decapsulates what crossed lan0, in order.
    assert_eq!(policy(&["--target", VXLAN, "--vni", "42"]), None);
    let at_src = Dump::start(&lab, &lab.src, "direct-src", "lan0", &f);
    let at_vx = Dump::start(&lab, &lab.span, "direct-vx", "vx0", &f);
    let on_hub = Dump::start(&lab, &lab.hub, "direct-hub", "any", "udp port 4789");
    lab.send(PORT, 200, 18..1400, Duration::from_micros(500));
    let (sent, seen) = (at_src.finish_at(200), at_vx.finish_at(200));
    assert_eq!(sent.len(), 200);
    assert_eq!(hashes(&seen), hashes(&sent));
    assert!(
        on_hub.finish().is_empty(),
        "VXLAN crossed the controller's host"
    );

    // The counts are the agent's: every packet it sent was written, none lost on the way.
    let (agent, row) = wait_settled(&lab, VXLAN, 200, 200);
    assert_eq!(row["direct"], true, "{row}");
    assert_eq!(row["note"], "direct", "{row}");
    assert_eq!(row["received"], 0, "the controller received nothing: {row}");
    assert_eq!(agent["dropped"]["queue"], 0, "{agent}");
    assert!(row["delay_p99_us"].as_u64() > Some(0), "{row}");
    // The hub never saw a batch of src's: its only rows are the direct ones.
    let rows = lab.get("/api/v1/mirror");
    let src_rows: Vec<&Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["agent"] == "src")
        .collect();
    assert!(!src_rows.is_empty(), "{rows:?}");
    for r in &src_rows {
        assert_eq!(r["direct"], true, "{r}");
        assert_eq!(r["packets_received"], 0, "{r}");
    }
    let (ok, table) = lab.ctl(&["mirror"]);
    assert!(
        ok && table.contains(&format!("{VXLAN} (direct)")),
        "{table}"
    );

    // GRE, cheaply: captured where it arrives (an1) and decoded by tshark.
    assert_eq!(policy(&["--target", GRE]), None);
    let at_src = Dump::start(&lab, &lab.src, "direct-src-gre", "lan0", &f);
    let at_an = Dump::start(&lab, &lab.span, "direct-gre", "an1", "ip proto 47");
    lab.send(PORT, 100, 18..1400, Duration::from_micros(500));
    let sent = at_src.finish_at(100);
    let path = at_an.path.clone();
    at_an.finish_at(100);
    let gre = decode(&path);
    assert_eq!(inner_hashes(&gre), hashes(&sent));
    let (_, row) = wait_settled(&lab, GRE, 300, 100);
    assert_eq!(
        (row["direct"].clone(), row["written"].clone()),
        (Value::Bool(true), 100.into())
    );
}
