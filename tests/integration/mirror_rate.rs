//! Issue 7: the capture's limits end to end, in the namespace lab of `mirror.rs`: the breach rule
//! stops capture after exactly N intervals over the limit, and the token bucket holds the delivered
//! rate to the limit.

use std::time::Duration;

use crate::harness::{require_root, wait_for};
use crate::mirror::{Dump, Lab, PORT, filter};

/// The breach rule: at 4× the limit, capture stops at the end of exactly the configured number of
/// check intervals, counted from the first packet as the source's own tcpdump timestamps it.
#[test]
fn over_the_limit_capture_stops_after_exactly_n_intervals() {
    if !require_root("over_the_limit_capture_stops_after_exactly_n_intervals") {
        return;
    }
    let lab = Lab::new();
    let f = filter(PORT);
    let (interval_ms, n) = (400u64, 3u64);
    let at_src = Dump::start(&lab, &lab.src, "src", "lan0", &f);
    assert_eq!(
        lab.capture(
            &f,
            &[
                "--limit",
                "2Mbit",
                "--check-interval",
                &format!("{interval_ms}ms"),
                "--breach-intervals",
                &n.to_string(),
                "--target",
                "none",
            ],
        ),
        None
    );
    // 1,000 B every 1 ms: 8 Mbit/s for 3 s, well past the breach.
    lab.send(PORT, 3000, 1000..1001, Duration::from_millis(1));
    let agent = wait_for("breach reported", Duration::from_secs(20), || {
        lab.agent()
            .filter(|a| a["capture"]["state"] == "stopped_breach")
    });
    let sent = at_src.finish();
    let c = &agent["capture"];
    let breach = &c["breach"];
    assert_eq!(breach["intervals"], n, "{agent}");
    let measured = breach["measured_bps"].as_u64().unwrap();
    assert!((6_000_000..=10_000_000).contains(&measured), "{breach}");
    assert!(c["error"].as_str().unwrap().contains("limit"), "{c}");
    // Capture ended n intervals after the first packet: not n-1, not n+1.
    let first = sent[0].ts_ns;
    let at = breach["at_unix_ns"].as_u64().unwrap();
    let expected = first + n * interval_ms * 1_000_000;
    assert!(
        at.abs_diff(expected) < interval_ms * 1_000_000 / 2,
        "breach at {at}, expected {expected} (first packet {first})"
    );
    // What the agent captured is what crossed lan0 until then (one packet's slack each side).
    let until: u64 = sent.iter().filter(|f| f.ts_ns < at).count() as u64;
    let captured = c["packets_captured"].as_u64().unwrap();
    assert!(
        captured.abs_diff(until) <= 2,
        "captured {captured}, on the wire before the breach {until}"
    );

    // A reconnect does not resume it; a new policy does.
    assert_eq!(lab.policy(&["--limit", "50Mbit"]), None);
    wait_for("capture resumed", Duration::from_secs(10), || {
        lab.agent().filter(|a| a["capture"]["state"] == "running")
    });
}

/// The token bucket alone (no breach rule): at 4× the limit, the delivered rate stays within 5%
/// of the limit.
#[test]
fn the_token_bucket_holds_the_delivered_rate_to_the_limit() {
    if !require_root("the_token_bucket_holds_the_delivered_rate_to_the_limit") {
        return;
    }
    let lab = Lab::new();
    let f = filter(PORT);
    let limit_bps = 2_000_000u64;
    assert_eq!(
        lab.capture(
            &f,
            &[
                "--limit",
                "2Mbit",
                "--breach-intervals",
                "0",
                "--target",
                "interface:span0",
            ],
        ),
        None
    );
    let at_src = Dump::start(&lab, &lab.src, "src", "lan0", &f);
    let at_span = Dump::start(&lab, &lab.span, "span", "span1", &f);
    lab.send(PORT, 4000, 1000..1001, Duration::from_micros(1000));
    std::thread::sleep(Duration::from_secs(1));
    let (sent, seen) = (at_src.finish(), at_span.finish());
    // Everything delivered was captured at the source within its span of time.
    let span_s = (sent.last().unwrap().ts_ns - sent[0].ts_ns) as f64 / 1e9;
    let delivered_bits: u64 = seen.iter().map(|f| f.data.len() as u64 * 8).sum();
    // The bucket starts full: one burst (100 ms at the limit) on top of the rate.
    let expected = limit_bps as f64 * (span_s + 0.1);
    let ratio = delivered_bits as f64 / expected;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "delivered {delivered_bits} bits in {span_s:.3} s, expected {expected:.0}: ratio {ratio:.3}"
    );
    // The counters balance exactly over the limit too, once the next control record is in: every
    // packet on the wire was captured, and is sent, dropped by the limiter or the queue; what the
    // agent sent is what the controller received, with nothing lost in transit.
    let agent = wait_for("the agent's counters", Duration::from_secs(15), || {
        lab.agent()
            .filter(|a| a["capture"]["packets_captured"] == sent.len() as u64)
    });
    let c = &agent["capture"];
    let get = |k: &str| c[k].as_u64().unwrap();
    assert!(get("packets_dropped_limiter") > 2000, "{c}");
    assert_eq!(
        get("packets_captured"),
        get("packets_sent")
            + get("packets_dropped_limiter")
            + get("packets_dropped_queue")
            + get("packets_in_flight"),
        "{c}"
    );
    assert_eq!(c["state"], "running");
    let m = lab.mirror("interface:span0").unwrap();
    assert_eq!(m["packets_received"], get("packets_sent"), "{m} vs {c}");
    assert_eq!(m["lost_in_transit"], 0, "{m}");
    // A real agent's headers are all believed: nothing refused, every delay observed.
    assert_eq!(
        m["invalid_batches"],
        serde_json::json!({"sequence": 0, "time": 0, "counters": 0}),
        "{m}"
    );
    assert_eq!(
        m["packets_written"].as_u64().unwrap(),
        seen.len() as u64,
        "{m}"
    );
    // Degraded while it drops, with the reason.
    let state = lab.agent().unwrap();
    assert!(
        state["state"] == "degraded" || state["state"] == "connected",
        "{state}"
    );
}
