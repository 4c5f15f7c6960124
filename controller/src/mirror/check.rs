//! Checks of a Mirror stream's batch headers, so that no batch can wreck the counters operators
//! read: the sequence numbers behind `lost_batches`, the in-band counters behind `lost_in_transit`,
//! and the times behind the delay histogram.
//!
//! - **sequence**: batches are numbered from 1 by the agent, across its streams. On one stream each
//!   batch must come after the last one accepted and at most [`MAX_SEQUENCE_GAP`] batches past it.
//!   A replay or a jump is refused: the batch is dropped and its packets counted as `invalid`. A
//!   stream's first batch may carry any number, as the agent's numbering goes on across streams
//!   and starts again at 1 when the agent restarts.
//! - **time**: `sent_at`, moved to our clock by the agent's measured offset, must lie within
//!   [now − [`MAX_AGE`], now + [`MAX_AHEAD`]], and each packet's capture time within the same
//!   bounds around `sent_at`. Otherwise the batch is delivered, but its delay is not observed.
//! - **counters**: what the in-band `packets_sent` says went missing on this stream can only be
//!   packets of its lost batches, at most [`MAX_BATCH_PACKETS`] each. A claim beyond that is not
//!   counted as lost; the batch is delivered.
//!
//! Each refusal is counted per agent and target as an invalid batch, by the field at fault.

use std::time::Duration;

use tapgraph::proto;

/// Batches one stream may skip at once. The agent numbers a batch only once it is handed to its
/// stream (a queue of 4), so on one stream only the batches in that queue when it failed can go
/// missing; 1024 leaves room for other agents and bounds what one batch can add to the count.
pub const MAX_SEQUENCE_GAP: u64 = 1024;
/// How old a batch (on arrival) or a packet (when its batch was sent) may be for its delay to be
/// believed: far above any queue an agent keeps, far below the histogram's 71 minutes.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// How far ahead of our clock, after the agent's offset, a batch's `sent_at` may be (and a packet
/// ahead of its `sent_at`): the error of the offset until the first probe, and clock steps.
pub const MAX_AHEAD: Duration = Duration::from_secs(60);
/// The most packets a batch can hold: the largest `batch_packets` a policy allows.
pub const MAX_BATCH_PACKETS: u64 = tapgraph::policy::bounds::BATCH_PACKETS.1 as u64;

/// The header field an invalid batch was refused for, as its metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Sequence,
    Time,
    Counters,
}

impl Field {
    pub fn label(self) -> &'static str {
        match self {
            Field::Sequence => "sequence",
            Field::Time => "time",
            Field::Counters => "counters",
        }
    }
}

/// Why a batch is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSequence {
    #[error("batch sequence 0: batches are numbered from 1")]
    Unnumbered,
    #[error("batch sequence {got} after {last}: a replay (sequences only go up on a stream)")]
    Replay { got: u64, last: u64 },
    #[error(
        "batch sequence {got} after {last} skips {} batches; at most {MAX_SEQUENCE_GAP} can be lost on one stream",
        .got - .last - 1
    )]
    Jump { got: u64, last: u64 },
}

/// Why a batch's delay is not observed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadTime {
    #[error(
        "batch sent_at {sent_at} is {}s ahead of the controller's clock (after the agent's offset of {offset_ns} ns); at most {}s is believed",
        seconds(.ahead_ns),
        MAX_AHEAD.as_secs()
    )]
    SentAhead {
        sent_at: u64,
        offset_ns: i64,
        ahead_ns: i128,
    },
    #[error(
        "batch sent_at {sent_at} is {}s behind the controller's clock (after the agent's offset of {offset_ns} ns); at most {}s is believed",
        seconds(.behind_ns),
        MAX_AGE.as_secs()
    )]
    SentStale {
        sent_at: u64,
        offset_ns: i64,
        behind_ns: i128,
    },
    #[error(
        "a packet captured at {captured} in a batch sent at {sent_at}: more than {}s before or {}s after it",
        MAX_AGE.as_secs(),
        MAX_AHEAD.as_secs()
    )]
    Packet { captured: u64, sent_at: u64 },
}

/// Why a batch's in-band counters are not counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "batch counters say {missing} packets never arrived on this stream, but its {lost_batches} lost batches held at most {most}"
)]
pub struct BadCounters {
    missing: u64,
    lost_batches: u64,
    most: u64,
}

fn seconds(ns: &i128) -> String {
    format!("{:.3}", *ns as f64 / 1e9)
}

/// What a batch that was not refused adds to the counters, and which of its claims were not
/// believed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Batches numbered before this one that never came.
    pub lost_batches: u64,
    /// Packets newly missing by the in-band counters.
    pub lost_packets: u64,
    /// Set: its delay is not observed.
    pub bad_time: Option<BadTime>,
    /// Set: its counters were not counted.
    pub bad_counters: Option<BadCounters>,
}

/// One Mirror stream's history, against which each batch is judged.
#[derive(Debug, Default)]
pub struct StreamCheck {
    /// The sequence of the last batch accepted.
    last: Option<u64>,
    /// Batches the accepted sequences skipped, in all.
    lost_batches: u64,
    /// In-band accounting: `packets_sent` before this stream's first batch, the packets that came
    /// in accepted batches, and the packets counted as lost so far.
    sent_base: Option<u64>,
    received: u64,
    lost_packets: u64,
}

impl StreamCheck {
    /// Judges `batch`, arriving at `now_ns` on our clock from an agent whose clock is `offset_ns`
    /// ahead of ours. A refused batch leaves the history as it was.
    pub fn check(
        &mut self,
        batch: &proto::MirrorBatch,
        now_ns: u64,
        offset_ns: i64,
    ) -> Result<Checked, BadSequence> {
        let lost_batches = self.sequence(batch.sequence)?;
        self.last = Some(batch.sequence);
        self.lost_batches += lost_batches;
        self.received += batch.packets.len() as u64;
        let mut checked = Checked {
            lost_batches,
            bad_time: time(batch, now_ns, offset_ns).err(),
            ..Checked::default()
        };
        if let Some(c) = &batch.counters {
            match self.counters(c.packets_sent, batch.packets.len() as u64) {
                Ok(lost) => checked.lost_packets = lost,
                Err(bad) => checked.bad_counters = Some(bad),
            }
        }
        Ok(checked)
    }

    /// The batches skipped before `got`.
    fn sequence(&self, got: u64) -> Result<u64, BadSequence> {
        if got == 0 {
            return Err(BadSequence::Unnumbered);
        }
        let Some(last) = self.last else {
            return Ok(0);
        };
        if got <= last {
            return Err(BadSequence::Replay { got, last });
        }
        let gap = got - last - 1;
        if gap > MAX_SEQUENCE_GAP {
            return Err(BadSequence::Jump { got, last });
        }
        Ok(gap)
    }

    /// The packets newly missing by an accepted batch's `packets_sent` (it counts the batch's own
    /// `packets`); `self.received` already holds them.
    fn counters(&mut self, sent: u64, packets: u64) -> Result<u64, BadCounters> {
        // The first batch's counter includes itself: everything before it was sent on earlier
        // streams.
        let base = *self.sent_base.get_or_insert(sent.saturating_sub(packets));
        let missing = sent.saturating_sub(base).saturating_sub(self.received);
        let most = self.lost_batches.saturating_mul(MAX_BATCH_PACKETS);
        if missing > most {
            return Err(BadCounters {
                missing,
                lost_batches: self.lost_batches,
                most,
            });
        }
        let new = missing.saturating_sub(self.lost_packets);
        self.lost_packets = self.lost_packets.max(missing);
        Ok(new)
    }
}

/// Whether the batch's times are plausible enough for its delay to be observed.
fn time(batch: &proto::MirrorBatch, now_ns: u64, offset_ns: i64) -> Result<(), BadTime> {
    let ahead = MAX_AHEAD.as_nanos() as i128;
    let age = MAX_AGE.as_nanos() as i128;
    let sent = i128::from(batch.sent_at_unix_nanos);
    let ours = sent - i128::from(offset_ns);
    let now = i128::from(now_ns);
    if ours > now + ahead {
        return Err(BadTime::SentAhead {
            sent_at: batch.sent_at_unix_nanos,
            offset_ns,
            ahead_ns: ours - now,
        });
    }
    if ours < now - age {
        return Err(BadTime::SentStale {
            sent_at: batch.sent_at_unix_nanos,
            offset_ns,
            behind_ns: now - ours,
        });
    }
    let bad = batch.packets.iter().find(|p| {
        let captured = i128::from(p.timestamp_unix_nanos);
        captured > sent + ahead || captured < sent - age
    });
    match bad {
        Some(p) => Err(BadTime::Packet {
            captured: p.timestamp_unix_nanos,
            sent_at: batch.sent_at_unix_nanos,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000_000_000;
    const SECOND: u64 = 1_000_000_000;

    /// A batch of `packets` packets captured 1 ms before it was sent, `packets_sent` in-band.
    fn batch(sequence: u64, packets: u64, packets_sent: Option<u64>) -> proto::MirrorBatch {
        proto::MirrorBatch {
            sequence,
            sent_at_unix_nanos: NOW,
            counters: packets_sent.map(|packets_sent| proto::Counters {
                packets_sent,
                ..proto::Counters::default()
            }),
            packets: (0..packets)
                .map(|_| proto::Packet {
                    timestamp_unix_nanos: NOW - 1_000_000,
                    original_length: 60,
                    data: vec![0; 60].into(),
                })
                .collect(),
            ..proto::MirrorBatch::default()
        }
    }

    /// The lost batches each sequence adds, or why it is refused.
    fn run(check: &mut StreamCheck, sequences: &[u64]) -> Vec<Result<u64, BadSequence>> {
        sequences
            .iter()
            .map(|&s| {
                check
                    .check(&batch(s, 1, None), NOW, 0)
                    .map(|c| c.lost_batches)
            })
            .collect()
    }

    #[test]
    fn a_jump_to_the_top_and_back_adds_no_lost_batches() {
        let mut check = StreamCheck::default();
        let got = run(&mut check, &[1, 2, u64::MAX, 3, 4]);
        assert_eq!(
            got,
            [
                Ok(0),
                Ok(0),
                Err(BadSequence::Jump {
                    got: u64::MAX,
                    last: 2
                }),
                Ok(0),
                Ok(0)
            ]
        );
        assert_eq!(check.lost_batches, 0);
    }

    #[test]
    fn replays_and_unnumbered_batches_are_refused_and_the_stream_goes_on() {
        let mut check = StreamCheck::default();
        let got = run(&mut check, &[7, 8, 8, 5, 0, 9]);
        assert_eq!(
            got,
            [
                Ok(0),
                Ok(0),
                Err(BadSequence::Replay { got: 8, last: 8 }),
                Err(BadSequence::Replay { got: 5, last: 8 }),
                Err(BadSequence::Unnumbered),
                Ok(0)
            ]
        );
    }

    #[test]
    fn gaps_up_to_the_limit_are_lost_batches() {
        let mut check = StreamCheck::default();
        let at_limit = 13 + MAX_SEQUENCE_GAP + 1;
        let got = run(
            &mut check,
            &[10, 13, at_limit, at_limit + MAX_SEQUENCE_GAP + 2],
        );
        assert_eq!(
            got,
            [
                Ok(0),
                Ok(2),
                Ok(MAX_SEQUENCE_GAP),
                Err(BadSequence::Jump {
                    got: at_limit + MAX_SEQUENCE_GAP + 2,
                    last: at_limit
                })
            ]
        );
        assert_eq!(check.lost_batches, 2 + MAX_SEQUENCE_GAP);
        // A stream's first batch may carry any number: the agent's numbering spans its streams.
        assert_eq!(run(&mut StreamCheck::default(), &[u64::MAX]), [Ok(0)]);
    }

    #[test]
    fn sent_at_is_believed_only_within_the_window_around_our_clock() {
        let check = |sent_at: u64, offset_ns: i64| {
            let mut b = batch(1, 1, None);
            b.sent_at_unix_nanos = sent_at;
            b.packets[0].timestamp_unix_nanos = sent_at;
            StreamCheck::default()
                .check(&b, NOW, offset_ns)
                .unwrap()
                .bad_time
        };
        assert_eq!(check(NOW, 0), None);
        assert_eq!(check(NOW - MAX_AGE.as_nanos() as u64, 0), None);
        assert_eq!(check(NOW + MAX_AHEAD.as_nanos() as u64, 0), None);
        assert!(matches!(
            check(NOW - MAX_AGE.as_nanos() as u64 - 1, 0),
            Some(BadTime::SentStale { .. })
        ));
        assert!(matches!(
            check(NOW + MAX_AHEAD.as_nanos() as u64 + 1, 0),
            Some(BadTime::SentAhead { .. })
        ));
        assert!(matches!(check(0, 0), Some(BadTime::SentStale { .. })));
        assert!(matches!(
            check(u64::MAX, 0),
            Some(BadTime::SentAhead { .. })
        ));
        // An agent clock an hour ahead, with its offset measured, is believed.
        let hour = 3600 * SECOND;
        assert_eq!(check(NOW + hour, hour as i64), None);
        assert!(matches!(
            check(NOW + hour, 0),
            Some(BadTime::SentAhead { .. })
        ));
        // The message names the value and the bound.
        let text = check(0, 0).unwrap().to_string();
        assert!(
            text.contains("sent_at 0") && text.contains("600s"),
            "{text}"
        );
    }

    #[test]
    fn a_capture_time_far_from_sent_at_is_not_believed() {
        let check = |captured: u64| {
            let mut b = batch(1, 3, None);
            b.packets[1].timestamp_unix_nanos = captured;
            StreamCheck::default().check(&b, NOW, 0).unwrap().bad_time
        };
        assert_eq!(check(NOW - 5 * SECOND), None);
        assert_eq!(
            check(1),
            Some(BadTime::Packet {
                captured: 1,
                sent_at: NOW
            })
        );
        assert!(check(NOW + MAX_AHEAD.as_nanos() as u64 + 1).is_some());
        // A bogus time does not refuse the batch: its sequence still counts.
        let mut stream = StreamCheck::default();
        let mut b = batch(1, 1, None);
        b.sent_at_unix_nanos = 0;
        assert!(stream.check(&b, NOW, 0).unwrap().bad_time.is_some());
        assert_eq!(
            run(&mut stream, &[1, 3]),
            [Err(BadSequence::Replay { got: 1, last: 1 }), Ok(1)]
        );
    }

    #[test]
    fn in_band_loss_is_bounded_by_the_lost_batches() {
        let mut stream = StreamCheck::default();
        // 100 packets sent on earlier streams; this stream's first batch of 10.
        let c = stream.check(&batch(5, 10, Some(110)), NOW, 0).unwrap();
        assert_eq!((c.lost_packets, c.bad_counters), (0, None));
        // No batch lost: a counter claiming loss is not believed, and adds nothing.
        let c = stream.check(&batch(6, 10, Some(u64::MAX)), NOW, 0).unwrap();
        assert_eq!(c.lost_packets, 0);
        assert_eq!(
            c.bad_counters.map(|b| b.to_string()),
            Some(format!(
                "batch counters say {} packets never arrived on this stream, but its 0 lost batches held at most 0",
                u64::MAX - 100 - 20
            ))
        );
        // Batch 7 lost with its 10 packets: batch 8 says so, and it is counted once.
        let c = stream.check(&batch(8, 10, Some(140)), NOW, 0).unwrap();
        assert_eq!(
            (c.lost_batches, c.lost_packets, c.bad_counters),
            (1, 10, None)
        );
        let c = stream.check(&batch(9, 10, Some(150)), NOW, 0).unwrap();
        assert_eq!((c.lost_packets, c.bad_counters), (0, None));
        // One lost batch can hold MAX_BATCH_PACKETS, not more.
        let c = stream
            .check(&batch(10, 1, Some(151 + MAX_BATCH_PACKETS)), NOW, 0)
            .unwrap();
        assert!(c.bad_counters.is_some());
        // A counter that goes backwards claims no loss.
        let c = stream.check(&batch(11, 1, Some(3)), NOW, 0).unwrap();
        assert_eq!((c.lost_packets, c.bad_counters), (0, None));
    }
}

/// Properties over any run of batch headers an agent could send: judging never panics, a refused
/// batch leaves the stream's history as it was, and what is counted as lost stays within what
/// the accepted sequences allow.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000_000_000_000;
    const WINDOW: i64 = 1_200_000_000_000; // 20 min: both sides of MAX_AGE and MAX_AHEAD

    /// A header's next sequence: mostly a small step from the last one sent (forward, a replay,
    /// a gap around MAX_SEQUENCE_GAP), sometimes any number.
    fn step() -> impl Strategy<Value = Option<i64>> {
        prop_oneof![
            4 => (-3i64..6).prop_map(Some),
            1 => (1_000i64..1_050).prop_map(Some),
            1 => Just(None),
        ]
    }

    /// A time near `around`, or any time at all.
    fn near(around: u64) -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => (-WINDOW..WINDOW).prop_map(move |d| around.saturating_add_signed(d)),
            1 => any::<u64>(),
        ]
    }

    #[derive(Debug, Clone)]
    struct Header {
        step: Option<i64>,
        any_sequence: u64,
        sent_at: u64,
        offset_ns: i64,
        captured: Vec<u64>,
        packets_sent: Option<u64>,
    }

    fn header() -> impl Strategy<Value = Header> {
        (
            step(),
            any::<u64>(),
            near(NOW),
            prop_oneof![3 => -WINDOW..WINDOW, 1 => any::<i64>()],
            proptest::collection::vec(near(NOW), 0..4),
            proptest::option::of(prop_oneof![0u64..20_000, any::<u64>()]),
        )
            .prop_map(
                |(step, any_sequence, sent_at, offset_ns, captured, packets_sent)| Header {
                    step,
                    any_sequence,
                    sent_at,
                    offset_ns,
                    captured,
                    packets_sent,
                },
            )
    }

    fn history(c: &StreamCheck) -> (Option<u64>, u64, Option<u64>, u64, u64) {
        (
            c.last,
            c.lost_batches,
            c.sent_base,
            c.received,
            c.lost_packets,
        )
    }

    proptest! {
        #[test]
        fn any_stream_of_headers_is_judged_within_its_bounds(
            headers in proptest::collection::vec(header(), 1..40),
        ) {
            let mut check = StreamCheck::default();
            let mut sequence = 1u64;
            let (mut lost_batches, mut lost_packets) = (0u64, 0u64);
            for h in headers {
                sequence = match h.step {
                    Some(step) => sequence.saturating_add_signed(step),
                    None => h.any_sequence,
                };
                let batch = proto::MirrorBatch {
                    sequence,
                    sent_at_unix_nanos: h.sent_at,
                    counters: h.packets_sent.map(|packets_sent| proto::Counters {
                        packets_sent,
                        ..proto::Counters::default()
                    }),
                    packets: h
                        .captured
                        .iter()
                        .map(|&t| proto::Packet {
                            timestamp_unix_nanos: t,
                            original_length: 1,
                            data: vec![0].into(),
                        })
                        .collect(),
                    ..proto::MirrorBatch::default()
                };
                let before = history(&check);
                match check.check(&batch, NOW, h.offset_ns) {
                    Err(_) => prop_assert_eq!(history(&check), before, "a refusal changes nothing"),
                    Ok(c) => {
                        prop_assert!(sequence > 0);
                        if let Some(last) = before.0 {
                            prop_assert!(sequence > last);
                            prop_assert_eq!(c.lost_batches, sequence - last - 1);
                        } else {
                            prop_assert_eq!(c.lost_batches, 0);
                        }
                        prop_assert!(c.lost_batches <= MAX_SEQUENCE_GAP);
                        lost_batches += c.lost_batches;
                        lost_packets += c.lost_packets;
                        prop_assert_eq!(check.last, Some(sequence));
                        // Believed times lie in the windows the module doc states.
                        if c.bad_time.is_none() {
                            let ours = i128::from(h.sent_at) - i128::from(h.offset_ns);
                            let now = i128::from(NOW);
                            prop_assert!(ours <= now + MAX_AHEAD.as_nanos() as i128);
                            prop_assert!(ours >= now - MAX_AGE.as_nanos() as i128);
                        }
                    }
                }
            }
            prop_assert_eq!(check.lost_batches, lost_batches);
            prop_assert!(lost_packets <= lost_batches.saturating_mul(MAX_BATCH_PACKETS));
        }
    }
}
