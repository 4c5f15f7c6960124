//! `AgentService`: the agent's control stream and mirror stream. The agent id always comes from the
//! verified client certificate, never from a message.

use std::time::Duration;

use tapgraph::proto::agent_service_server::AgentService;
use tapgraph::proto::{self, agent_message::Msg, controller_message};
use tapgraph::transport::PeerInfo;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth;
use crate::enrollment::Enrollment;
use crate::mirror::check::{Field, StreamCheck};
use crate::mirror::{Mirrors, Route, Stats, submit_all};
use crate::registry::Registry;
use crate::topology::Topology;

/// The `Connect` response stream, as the generated trait (with default stubs) names it.
type ControlStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<proto::ControllerMessage, Status>> + Send + 'static>,
>;

/// Limits applied to every agent stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// The first message must arrive within this.
    pub hello_timeout: Duration,
    /// A session with no message for this long is closed.
    pub idle_timeout: Duration,
    /// Mirror streams one agent may hold open (`session.max_streams`); more are refused with
    /// RESOURCE_EXHAUSTED. HTTP/2 must allow [`STREAM_HEADROOM`] more per connection, or the
    /// client would queue the extra streams until it times out instead of hearing why.
    pub max_mirror_streams: usize,
}

/// HTTP/2 streams a connection may open beyond `session.max_streams`: the agent's Connect stream
/// and a few Mirror streams over the limit, which reach the handler to be refused at once.
pub const STREAM_HEADROOM: u32 = 8;

pub struct AgentApi {
    registry: Registry,
    enrollment: Enrollment,
    topology: Topology,
    mirrors: Mirrors,
    limits: StreamLimits,
}

impl AgentApi {
    pub fn new(
        registry: Registry,
        enrollment: Enrollment,
        topology: Topology,
        mirrors: Mirrors,
        limits: StreamLimits,
    ) -> Self {
        Self {
            registry,
            enrollment,
            topology,
            mirrors,
            limits,
        }
    }
}

/// Largest packet a batch may carry: the largest snaplen a policy allows.
const MAX_PACKET: usize = tapgraph::policy::bounds::SNAPLEN.1 as usize;
/// Removes packets no target can take (empty, larger than any snaplen, or longer than their
/// original length); returns how many, and why.
fn drop_invalid(batch: &mut proto::MirrorBatch) -> Option<(u64, String)> {
    let before = batch.packets.len();
    let mut reason = None;
    batch.packets.retain(|p| {
        let bad = if p.data.is_empty() {
            Some("an empty packet".to_string())
        } else if p.data.len() > MAX_PACKET {
            Some(format!(
                "a packet of {} bytes (at most {MAX_PACKET})",
                p.data.len()
            ))
        } else if (p.original_length as usize) < p.data.len() {
            Some(format!(
                "a packet of {} bytes claiming an original length of {}",
                p.data.len(),
                p.original_length
            ))
        } else {
            None
        };
        if let Some(r) = bad {
            reason.get_or_insert(r);
            return false;
        }
        true
    });
    reason.map(|r| ((before - batch.packets.len()) as u64, r))
}

/// What a Mirror stream has already warned about: one warning per kind and stream, as a bad
/// agent repeats itself with every batch.
#[derive(Default)]
struct Warned {
    packets: bool,
    fields: Vec<Field>,
}

impl Warned {
    fn once(&mut self, agent_id: &str, field: Field, error: &dyn std::error::Error) {
        if self.fields.contains(&field) {
            return;
        }
        self.fields.push(field);
        let action = match field {
            Field::Sequence => "the batch is dropped",
            Field::Time => "its delay is not observed",
            Field::Counters => "its loss is not counted",
        };
        tracing::warn!(agent = %agent_id, field = field.label(), %error, "mirror batch header not believed; {action}, and it is counted as invalid");
    }
}

fn kind(msg: &Msg) -> &'static str {
    match msg {
        Msg::Hello(_) => "Hello",
        Msg::Snapshot(_) => "ConnectionSnapshot",
        Msg::Control(_) => "ControlRecord",
        Msg::PolicyStatus(_) => "PolicyStatus",
        Msg::TimeProbeReply(_) => "TimeProbeReply",
    }
}

fn check_hello(hello: &proto::Hello, agent_id: &str) -> Result<(), Status> {
    if !hello.agent_id.is_empty() && hello.agent_id != agent_id {
        return Err(Status::permission_denied(format!(
            "Hello claims agent id {}, but the certificate is agent {agent_id}",
            hello.agent_id
        )));
    }
    if hello.hostname.is_empty() || hello.hostname.len() > 255 {
        return Err(Status::invalid_argument(
            "Hello.hostname must be 1 to 255 bytes",
        ));
    }
    if hello.interfaces.len() > 4096 {
        return Err(Status::invalid_argument(format!(
            "Hello lists {} interfaces; at most 4096 are accepted",
            hello.interfaces.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn connect(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<ControlStream>, Status> {
        let (agent_id, peer) = auth::agent(&request, self.enrollment.revocations()).inspect_err(|status| {
            tracing::warn!(peer = ?request.extensions().get::<PeerInfo>().map(|p| p.remote_addr), error = %status.message(), "agent stream refused");
        })?;
        let mut inbound = request.into_inner();
        let refuse = |status: Status| {
            tracing::warn!(agent = %agent_id, peer = %peer.remote_addr, error = %status.message(), "agent stream refused");
            status
        };
        let first = tokio::time::timeout(self.limits.hello_timeout, inbound.message()).await;
        let hello = match first {
            Ok(Ok(Some(proto::AgentMessage {
                msg: Some(Msg::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(proto::AgentMessage { msg: Some(other) }))) => {
                return Err(refuse(Status::invalid_argument(format!(
                    "the first message on Connect must be Hello, got {}",
                    kind(&other)
                ))));
            }
            Ok(Ok(Some(proto::AgentMessage { msg: None }))) => {
                return Err(refuse(Status::invalid_argument(
                    "the first message on Connect must be Hello, got an empty message",
                )));
            }
            Ok(Ok(None)) => {
                return Err(refuse(Status::invalid_argument(
                    "stream closed before Hello",
                )));
            }
            Ok(Err(status)) => return Err(refuse(status)),
            Err(_) => {
                return Err(refuse(Status::deadline_exceeded(format!(
                    "no Hello within {:?}",
                    self.limits.hello_timeout
                ))));
            }
        };
        check_hello(&hello, &agent_id).map_err(refuse)?;
        tracing::info!(
            agent = %agent_id,
            hostname = %hello.hostname,
            peer = %peer.remote_addr,
            version = %hello.agent_version,
            interfaces = hello.interfaces.len(),
            "agent connected"
        );
        let (outbound, rx) = mpsc::channel(64);
        let labels = self.enrollment.labels(&agent_id).await;
        let hostname = hello.hostname.clone();
        let registered = self
            .registry
            .register(agent_id.clone(), hello, labels, peer.remote_addr, outbound)
            .await?;
        let mut guard = self.registry.guard(agent_id.clone(), registered.session);
        let registry = self.registry.clone();
        let topology = self.topology.clone();
        let idle = self.limits.idle_timeout;
        tokio::spawn(async move {
            let mut closed = registered.closed;
            let reason = loop {
                tokio::select! {
                    reason = &mut closed => {
                        break reason.map_or_else(|_| "registry gone".to_string(), |r| r.to_string());
                    }
                    next = tokio::time::timeout(idle, inbound.message()) => match next {
                        Ok(Ok(Some(proto::AgentMessage { msg: Some(Msg::Snapshot(snapshot)) }))) => {
                            let (sequence, full) = (snapshot.sequence, snapshot.full);
                            // Boxed, here and below: the task lives as long as the session, and these rare
                            // awaits would otherwise make every idle session's task larger.
                            if let Err(refusal) = Box::pin(topology.snapshot(&agent_id, &hostname, snapshot)).await
                                && refusal.asks_resync(full)
                            {
                                // The map keeps what it had; the agent starts over with a full table.
                                let resync = proto::ResyncRequest { reason: refusal.to_string() };
                                Box::pin(registry.send(&agent_id, registered.session, controller_message::Msg::Resync(resync)))
                                    .await;
                                tracing::info!(agent = %agent_id, sequence, %refusal, "asked the agent for a full snapshot");
                            }
                        }
                        Ok(Ok(Some(proto::AgentMessage { msg: Some(msg) }))) => {
                            Box::pin(registry.message(&agent_id, registered.session, msg)).await;
                        }
                        Ok(Ok(Some(proto::AgentMessage { msg: None }))) => {}
                        Ok(Ok(None)) => break "agent closed the stream".to_string(),
                        Ok(Err(status)) => break format!("stream error: {}", status.message()),
                        Err(_) => break format!("idle for {idle:?}"),
                    },
                }
            };
            tracing::info!(agent = %agent_id, peer = %peer.remote_addr, %reason, "agent disconnected");
            guard.set_reason(reason);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| *m))))
    }

    async fn mirror(
        &self,
        request: Request<Streaming<proto::MirrorBatch>>,
    ) -> Result<Response<proto::MirrorSummary>, Status> {
        let (agent_id, peer) = auth::agent(&request, self.enrollment.revocations())?;
        let limit = self.limits.max_mirror_streams;
        let _slot = self.mirrors.open_stream(&agent_id, limit).map_err(|open| {
            tracing::warn!(agent = %agent_id, peer = %peer.remote_addr, open, limit, "mirror stream refused: too many open");
            Status::resource_exhausted(format!(
                "agent {agent_id} already has {open} Mirror streams open; the limit (session.max_streams) is {limit}"
            ))
        })?;
        let mut inbound = request.into_inner();
        let mut summary = proto::MirrorSummary::default();
        let revocations = self.enrollment.revocations();
        let mut revoked = revocations.changed();
        // The target follows the agent's policy: looked up again when the batches' policy version
        // changes, and retried while it cannot be opened.
        let mut route: Option<Route> = None;
        // Sequences, in-band counters and times, judged against the stream's history.
        let mut check = StreamCheck::default();
        let mut warned = Warned::default();
        loop {
            let mut batch = tokio::select! {
                batch = inbound.message() => match batch? {
                    Some(batch) => batch,
                    None => break,
                },
                Ok(()) = revoked.changed() => {
                    if revocations.is_revoked(&agent_id) {
                        return Err(Status::permission_denied(format!(
                            "the certificate of agent {agent_id} was revoked"
                        )));
                    }
                    continue;
                }
            };
            summary.batches_received += 1;
            summary.packets_received += batch.packets.len() as u64;
            let lookup = async {
                let r = self.registry.mirror_route(&agent_id).await?;
                Some((r.hostname, r.targets, r.dedup))
            };
            let routed = self
                .mirrors
                .route(&mut route, &agent_id, batch.policy_version, lookup)
                .await;
            let Some(attachments) = routed else {
                continue;
            };
            // Every target counts the stream's batches, losses and refusals as its own.
            let each = |count: &dyn Fn(&Stats)| attachments.iter().for_each(|a| count(&a.stats));
            each(&|s| Stats::add(&s.batches, 1));
            let now = tapgraph::time::unix_nanos();
            let checked = match check.check(&batch, now, attachments[0].offset_ns()) {
                Ok(checked) => checked,
                Err(refusal) => {
                    // The whole batch is dropped: its packets may be a replay.
                    let n = batch.packets.len() as u64;
                    each(&|s| {
                        Stats::add(&s.received, n);
                        Stats::add(&s.dropped_invalid, n);
                        s.invalid(Field::Sequence);
                    });
                    warned.once(&agent_id, Field::Sequence, &refusal);
                    continue;
                }
            };
            each(&|s| {
                Stats::add(&s.batches_lost, checked.lost_batches);
                Stats::add(&s.lost_in_transit, checked.lost_packets);
            });
            if let Some(bad) = &checked.bad_time {
                each(&|s| s.invalid(Field::Time));
                warned.once(&agent_id, Field::Time, bad);
            }
            if let Some(bad) = &checked.bad_counters {
                each(&|s| s.invalid(Field::Counters));
                warned.once(&agent_id, Field::Counters, bad);
            }
            if let Some((n, reason)) = drop_invalid(&mut batch) {
                each(&|s| {
                    Stats::add(&s.dropped_invalid, n);
                    Stats::add(&s.received, n);
                });
                if !warned.packets {
                    tracing::warn!(agent = %agent_id, dropped = n, %reason, "mirror batch carried invalid packets; they are dropped and counted");
                    warned.packets = true;
                }
            }
            submit_all(attachments, batch, checked.bad_time.is_none());
        }
        tracing::info!(agent = %agent_id, batches = summary.batches_received, packets = summary.packets_received, "mirror stream ended");
        Ok(Response::new(summary))
    }
}
