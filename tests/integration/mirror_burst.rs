//! Issue 22: a burst the old capture ring lost is delivered whole with the new default.
//!
//! A busy host makes the capture thread wait for a CPU; while it waits, only the kernel ring holds
//! what arrives. libpcap cuts the ring into 256 KiB blocks and the kernel retires each after the
//! buffer timeout (1 ms) however little it holds, so the ring lasts (its size / 256 KiB) ms at any
//! rate: 16 ms for the old 4 MiB, 32 ms for the 8 MiB default. Here the wait is made on purpose and
//! exactly: the agent is stopped (SIGSTOP) for 24 ms in the middle of a steady stream.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};

use crate::harness::{require_root, wait_for};
use crate::mirror::{Lab, PORT};

const STALL: Duration = Duration::from_millis(24);
const COUNT: usize = 1000;

/// Sends COUNT datagrams at 5,000 a second while the agent is stopped for STALL after 100 ms of
/// them; returns the agent's kernel drops for the policy now in force and what the target wrote
/// of them.
fn stalled_burst(lab: &Lab, round: usize) -> (u64, u64) {
    let agent = lab.agent_pid();
    let written = lab.written("interface:span0");
    let kernel = |lab: &Lab| {
        lab.agent().unwrap()["capture"]["packets_dropped_kernel"]
            .as_u64()
            .unwrap_or(0)
    };
    let dropped = kernel(lab);
    let stall = std::thread::spawn(move || {
        // The stall is the test's one timing: a busy test machine must not lengthen it past
        // what the default ring holds, so this thread takes a CPU as the capture thread does.
        tapgraph::runtime::realtime_thread("stall");
        // `send` warms the neighbour up for 100 ms first.
        std::thread::sleep(Duration::from_millis(200));
        kill(agent, Signal::SIGSTOP).unwrap();
        std::thread::sleep(STALL);
        kill(agent, Signal::SIGCONT).unwrap();
    });
    lab.send(
        PORT + round as u16,
        COUNT,
        100..200,
        Duration::from_micros(200),
    );
    stall.join().unwrap();
    // Until every packet is written or counted as a kernel drop: the capture thread reads the
    // kernel's counter every second even when idle, and the agent reports it with its next
    // control record (every 1 s with this policy).
    let (lost, delivered) = wait_for("the burst accounted for", Duration::from_secs(15), || {
        let lost = kernel(lab) - dropped;
        let delivered = lab.written("interface:span0") - written;
        (delivered + lost == COUNT as u64).then_some((lost, delivered))
    });
    eprintln!("round {round}: {lost} lost in the kernel ring, {delivered} delivered");
    (lost, delivered)
}

#[test]
fn a_stalled_capture_loses_nothing_with_the_default_ring_and_the_old_one_counts_its_drops() {
    if !require_root(
        "a_stalled_capture_loses_nothing_with_the_default_ring_and_the_old_one_counts_its_drops",
    ) {
        return;
    }
    let lab = Lab::new();
    // Each round sends to its own port (`stalled_burst`).
    let f = format!("udp and dst portrange {}-{}", PORT, PORT + 1);
    let set = |ring: &str| {
        lab.capture(
            &f,
            &[
                "--limit",
                "100Mbit",
                "--heartbeat-interval",
                "1s",
                "--target",
                "interface:span0",
                "--buffer-size",
                ring,
            ],
        )
    };
    // The old ring: 16 blocks last 16 ms, and the agent is away for 24.
    assert_eq!(set("4MiB"), None);
    let (lost, delivered) = stalled_burst(&lab, 0);
    // Every packet is delivered or counted (`stalled_burst` waits for that, or fails).
    assert!(
        lost > 0,
        "the old ring should have overflowed while the agent was stopped (delivered {delivered})"
    );

    // The default ring: 32 blocks last 32 ms.
    let default = tapgraph::units::format_size(tapgraph::policy::DEFAULT_BUFFER_SIZE);
    assert_eq!(set(&default), None);
    let (lost, delivered) = stalled_burst(&lab, 1);
    assert_eq!(lost, 0, "the default ring lasts the stall");
    assert_eq!(delivered, COUNT as u64);
}
