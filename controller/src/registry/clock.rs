//! Time probes and the clock offset: every heartbeat interval the registry sends a live agent a
//! `TimeProbe`, and from the four timestamps of its answer estimates the agent's clock minus the
//! controller's, as NTP does. The mirror hub reads the estimate to measure capture-to-write delay.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tapgraph::proto::{self, controller_message};

use super::task::RegistryTask;

/// The sample with the shortest round trip among the last this many wins (NTP's clock filter).
const PROBE_SAMPLES: usize = 8;
/// The first probe waits this long after a session starts: the agent is busy with its policy and
/// first snapshot.
const FIRST_PROBE_AFTER: Duration = Duration::from_secs(1);
/// Probes come at most this often, whatever the heartbeat.
const MIN_PROBE_INTERVAL_MS: u64 = 100;
/// An answer later than this after its probe is not believed.
const MAX_ANSWER_NS: i128 = 60_000_000_000;

/// One probe's measurement, in ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sample {
    /// Time on the wire both ways: the whole round trip minus the agent's time answering.
    pub(super) rtt: i64,
    /// The agent's clock minus the controller's.
    pub(super) offset: i64,
}

impl Sample {
    /// From t1 sent here, t2 received there, t3 answered there, t4 received here (Unix ns). `None`
    /// for what is not an answer to a probe of ours (no t1), or a nonsensical one: a negative
    /// round trip, or an answer more than a minute after its probe.
    pub(super) fn from_times(t1: i128, t2: i128, t3: i128, t4: i128) -> Option<Self> {
        let rtt = (t4 - t1) - (t3 - t2);
        if t1 == 0 || rtt < 0 || t4 - t1 > MAX_ANSWER_NS {
            return None;
        }
        let offset = ((t2 - t1) + (t3 - t4)) / 2;
        Some(Self {
            rtt: rtt as i64,
            offset: offset as i64,
        })
    }
}

/// One agent's probes: when the next is due, its id, and the latest samples.
pub(super) struct Clock {
    samples: VecDeque<Sample>,
    next_probe: Instant,
    probe_id: u64,
}

impl Clock {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            samples: VecDeque::new(),
            next_probe: now,
            probe_id: 0,
        }
    }

    /// A session started at `now`: its first probe waits [`FIRST_PROBE_AFTER`].
    pub(super) fn session_started(&mut self, now: Instant) {
        self.next_probe = now + FIRST_PROBE_AFTER;
    }

    /// The id of the probe to send at `now`, if one is due; the next is due a heartbeat later.
    pub(super) fn due(&mut self, now: Instant, heartbeat_ms: u64) -> Option<u64> {
        if now < self.next_probe {
            return None;
        }
        self.probe_id += 1;
        self.next_probe = now + Duration::from_millis(heartbeat_ms.max(MIN_PROBE_INTERVAL_MS));
        Some(self.probe_id)
    }

    /// Keeps `sample` among the last [`PROBE_SAMPLES`]; the estimate now: the one among them with
    /// the shortest round trip (the earliest of equals), whose offset suffered least from
    /// asymmetric delays.
    pub(super) fn add(&mut self, sample: Sample) -> Sample {
        self.samples.push_back(sample);
        while self.samples.len() > PROBE_SAMPLES {
            self.samples.pop_front();
        }
        self.samples
            .iter()
            .copied()
            .min_by_key(|s| s.rtt)
            .unwrap_or(sample)
    }
}

impl RegistryTask {
    /// Sends live agent `id` a time probe if one is due at `now`. A full control channel skips
    /// it (counted); the next one comes a heartbeat later.
    pub(super) fn probe(&mut self, id: &str, now: Instant) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        let Some(live) = &agent.live else {
            return;
        };
        let Some(probe_id) = agent.clock.due(now, agent.view.heartbeat_ms) else {
            return;
        };
        let probe = proto::ControllerMessage {
            msg: Some(controller_message::Msg::TimeProbe(proto::TimeProbe {
                id: probe_id,
                sent_at_unix_nanos: tapgraph::time::unix_nanos(),
            })),
        };
        live.push(Box::new(Ok(probe)), &self.dropped.time_probe);
    }

    /// One probe's answer, received now: a believable one updates the agent's offset estimate.
    pub(super) fn probe_reply(&mut self, id: &str, reply: &proto::TimeProbeReply) {
        let t4 = tapgraph::time::unix_nanos() as i128;
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        let Some(sample) = Sample::from_times(
            reply.probe_sent_at_unix_nanos as i128,
            reply.received_at_unix_nanos as i128,
            reply.sent_at_unix_nanos as i128,
            t4,
        ) else {
            return;
        };
        let best = agent.clock.add(sample);
        agent.view.clock_offset_ms = Some(best.offset as f64 / 1e6);
        agent.view.probe_rtt_ms = Some(best.rtt as f64 / 1e6);
        self.health.set_offset(id, best.offset);
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    /// A probe sent at 1 000 s on the controller's clock.
    const T1: i128 = 1_000_000_000_000;

    /// The four times of a probe to an agent whose clock is `offset` ahead, `out` and `back` ns on
    /// the wire each way, `busy` ns answering.
    fn times(offset: i128, out: i128, back: i128, busy: i128) -> (i128, i128, i128, i128) {
        let t2 = T1 + out + offset;
        let t3 = t2 + busy;
        let t4 = T1 + out + busy + back;
        (T1, t2, t3, t4)
    }

    fn sample(t: (i128, i128, i128, i128)) -> Option<Sample> {
        Sample::from_times(t.0, t.1, t.2, t.3)
    }

    #[test]
    fn equal_delays_give_the_exact_offset_and_the_wire_time() {
        for offset in [0, 1_500_000, -2_750_000_000] {
            let s = sample(times(offset, 300_000, 300_000, 5_000_000));
            assert_eq!(
                s,
                Some(Sample {
                    rtt: 600_000,
                    offset: offset as i64
                }),
                "offset {offset}"
            );
        }
    }

    #[test]
    fn unequal_delays_err_by_half_their_difference() {
        let s = sample(times(1_000_000, 900_000, 100_000, 0)).unwrap();
        assert_eq!(s.rtt, 1_000_000);
        assert_eq!(s.offset, 1_000_000 + (900_000 - 100_000) / 2);
        let s = sample(times(1_000_000, 100_000, 900_000, 0)).unwrap();
        assert_eq!(s.offset, 1_000_000 - 400_000);
    }

    #[test]
    fn odd_answers_are_not_believed() {
        let (_, t2, t3, t4) = times(0, 100, 100, 0);
        assert_eq!(
            Sample::from_times(0, t2, t3, t4),
            None,
            "not a probe of ours"
        );
        // The agent claims it took longer to answer than the whole round trip.
        let (t1, t2, _, t4) = times(0, 100, 100, 0);
        assert_eq!(Sample::from_times(t1, t2, t2 + 201, t4), None);
        let zero = Sample::from_times(t1, t2, t2 + 200, t4).unwrap();
        assert_eq!(
            zero.rtt, 0,
            "an instant round trip is possible, on one host"
        );
        // An answer a minute after its probe is the limit.
        let minute = 60_000_000_000;
        let late = |extra| Sample::from_times(T1, T1 + 1, T1 + 1, T1 + minute + extra);
        assert!(late(0).is_some());
        assert_eq!(late(1), None);
    }

    #[test]
    fn the_estimate_is_the_shortest_round_trip_of_the_last_eight() {
        let mut clock = Clock::new(Instant::now());
        let s = |rtt, offset| Sample { rtt, offset };
        assert_eq!(clock.add(s(500, 1)), s(500, 1));
        assert_eq!(clock.add(s(100, 2)), s(100, 2));
        assert_eq!(clock.add(s(300, 3)), s(100, 2));
        // Equal round trips: the earlier stands.
        assert_eq!(clock.add(s(100, 4)), s(100, 2));
        for n in 5..=9 {
            assert_eq!(clock.add(s(900, n)), s(100, 2), "sample {n}");
        }
        // Eight samples later the best one has left the window; its equal is next.
        assert_eq!(clock.add(s(900, 10)), s(100, 4));
        assert_eq!(clock.add(s(900, 11)), s(100, 4));
        assert_eq!(clock.add(s(900, 12)), s(900, 5));
    }

    #[test]
    fn probes_come_one_per_heartbeat_after_a_first_wait() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        assert_eq!(clock.due(t0, 2_000), Some(1), "a new clock is due at once");
        assert_eq!(clock.due(t0 + 1_999 * MS, 2_000), None);
        assert_eq!(clock.due(t0 + 2_000 * MS, 2_000), Some(2));
        clock.session_started(t0 + 3_000 * MS);
        assert_eq!(clock.due(t0 + 3_999 * MS, 2_000), None);
        assert_eq!(clock.due(t0 + 4_000 * MS, 2_000), Some(3));
        // A heartbeat below 100 ms does not make probes come faster.
        assert_eq!(clock.due(t0 + 6_000 * MS, 10), Some(4));
        assert_eq!(clock.due(t0 + 6_099 * MS, 10), None);
        assert_eq!(clock.due(t0 + 6_100 * MS, 10), Some(5));
    }

    #[test]
    fn an_answer_sets_the_offset_shown_and_shared() {
        let (mut task, health, _events) = fixture::task();
        let (_registered, _rx) = fixture::connect(&mut task, "vm", 8);
        let now = tapgraph::time::unix_nanos();
        // An agent 2 s ahead, the probe sent 1 s ago and answered at once, half way.
        let reply = proto::TimeProbeReply {
            id: 1,
            probe_sent_at_unix_nanos: now - 1_000_000_000,
            received_at_unix_nanos: now + 2_000_000_000 - 500_000_000,
            sent_at_unix_nanos: now + 2_000_000_000 - 500_000_000,
        };
        task.probe_reply("vm", &reply);
        let offset = health
            .offset("vm")
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!((offset - 2_000_000_000).abs() < 50_000_000, "{offset}");
        let view = &task.agents["vm"].view;
        let shown = view.clock_offset_ms.unwrap();
        assert!((shown - 2_000.0).abs() < 50.0, "{shown}");
        let rtt = view.probe_rtt_ms.unwrap();
        assert!((1_000.0..1_050.0).contains(&rtt), "{rtt}");
        // Not an answer to a probe: nothing changes.
        task.probe_reply(
            "vm",
            &proto::TimeProbeReply {
                probe_sent_at_unix_nanos: 0,
                ..reply
            },
        );
        assert_eq!(task.agents["vm"].view.clock_offset_ms, Some(shown));
    }

    #[test]
    fn a_probe_goes_out_when_due_and_a_full_channel_skips_it_counted() {
        let (mut task, _health, _events) = fixture::task();
        let (_registered, mut rx) = fixture::connect(&mut task, "vm", 2);
        let t0 = Instant::now();
        task.probe("vm", t0);
        task.probe("unknown", t0 + 2 * FIRST_PROBE_AFTER);
        let probes = |rx: &mut tokio::sync::mpsc::Receiver<super::super::Pushed>| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .filter_map(|m| match (*m).ok()?.msg? {
                    controller_message::Msg::TimeProbe(p) => Some(p.id),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            probes(&mut rx),
            Vec::<u64>::new(),
            "the first waits a second"
        );
        task.probe("vm", t0 + 2 * FIRST_PROBE_AFTER);
        assert_eq!(probes(&mut rx), vec![1]);
        assert_eq!(task.dropped.read().time_probe, 0);
        // The policy and a probe fill the channel; the next probe is skipped and counted.
        let mut newer = task.default.clone();
        newer.version = 9;
        task.set_policies(Vec::new(), newer);
        let later = t0 + Duration::from_secs(60);
        task.probe("vm", later);
        task.probe("vm", later + Duration::from_secs(60));
        assert_eq!(task.dropped.read().time_probe, 1);
        assert_eq!(probes(&mut rx), vec![2]);
    }
}
