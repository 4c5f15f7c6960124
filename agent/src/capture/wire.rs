//! Mirror batches in their wire form. The capture thread writes each packet straight out of the
//! capture ring as an entry of `MirrorBatch.packets`: protobuf lets a message's fields come in any
//! order and a repeated field's entries anywhere, so a batch on the wire is its few other fields
//! followed by those bytes. No per-packet object exists between the ring and the socket, and
//! sending a batch encodes only its header (the generated client encoded every packet again); the
//! packets' bytes go to HTTP/2 as they are, not copied into tonic's encoder buffer.
//!
//! The controller decodes the same `MirrorBatch` either way; a test holds the two encodings equal.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tapgraph::codec::LeanCodec;
use tapgraph::proto;
use tokio_stream::Stream;
use tonic::Status;
use tonic::codec::Codec;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// Field numbers in `proto/tapgraph/v1/agent.proto`.
const BATCH_PACKETS: u32 = 5;
const PACKET_TIMESTAMP: u32 = 1;
const PACKET_ORIGINAL_LENGTH: u32 = 2;
const PACKET_DATA: u32 = 3;

/// The most bytes [`put_packet`] adds besides the payload: the entry's key and length, and the
/// packet's three keys, its timestamp and two lengths.
pub const PACKET_OVERHEAD: usize = 1 + 5 + (1 + 8) + (1 + 5) + (1 + 5);

/// Appends a packet to `buf` as one `MirrorBatch.packets` entry, byte for byte as prost encodes it.
pub fn put_packet(
    buf: &mut BytesMut,
    timestamp_unix_nanos: u64,
    original_length: u32,
    data: &[u8],
) {
    let ts_len = if timestamp_unix_nanos != 0 { 1 + 8 } else { 0 };
    let original_len = if original_length != 0 {
        1 + encoded_len_varint(u64::from(original_length))
    } else {
        0
    };
    let data_len = if data.is_empty() {
        0
    } else {
        1 + encoded_len_varint(data.len() as u64) + data.len()
    };
    let len = ts_len + original_len + data_len;
    buf.reserve(1 + encoded_len_varint(len as u64) + len);
    encode_key(BATCH_PACKETS, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
    if timestamp_unix_nanos != 0 {
        encode_key(PACKET_TIMESTAMP, WireType::SixtyFourBit, buf);
        buf.put_u64_le(timestamp_unix_nanos);
    }
    if original_length != 0 {
        encode_key(PACKET_ORIGINAL_LENGTH, WireType::Varint, buf);
        encode_varint(u64::from(original_length), buf);
    }
    if !data.is_empty() {
        encode_key(PACKET_DATA, WireType::LengthDelimited, buf);
        encode_varint(data.len() as u64, buf);
        buf.put_slice(data);
    }
}

/// A batch on its way out: every field but the packets in `head`, the packets as [`put_packet`]
/// wrote them.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub head: proto::MirrorBatch,
    pub packets: Bytes,
}

impl Outbound {
    fn encoded_len(&self) -> usize {
        self.head.encoded_len() + self.packets.len()
    }

    #[cfg(test)]
    fn encode(&self, buf: &mut impl BufMut) -> Result<(), prost::EncodeError> {
        debug_assert!(self.head.packets.is_empty(), "packets travel pre-encoded");
        self.head.encode(buf)?;
        buf.put_slice(&self.packets);
        Ok(())
    }
}

/// The summary the controller answers a `Mirror` call with.
type SummaryCodec = LeanCodec<proto::MirrorSummary, proto::MirrorSummary>;

/// The `Mirror` call's request body: each batch as two chunks, the gRPC message prefix with the
/// head's fields, then the packets' bytes as the capture thread wrote them. tonic's encoder would
/// copy each whole batch into its own buffer first (73 KB a millisecond at 50k packets/s of
/// 1,400 bytes); HTTP/2 and rustls take these chunks as they are.
struct BatchBody<S> {
    batches: std::pin::Pin<Box<S>>,
    /// The packets of the batch whose head went last.
    packets: Option<Bytes>,
}

impl<S: Stream<Item = Outbound>> http_body::Body for BatchBody<S> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if let Some(packets) = self.packets.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(packets))));
        }
        let Some(batch) = std::task::ready!(self.batches.as_mut().poll_next(cx)) else {
            return std::task::Poll::Ready(None);
        };
        std::task::Poll::Ready(Some(head_chunk(&batch).map(|head| {
            self.packets = Some(batch.packets).filter(|p| !p.is_empty());
            http_body::Frame::data(head)
        })))
    }
}

/// The gRPC length prefix (uncompressed) and the batch's fields other than its packets.
fn head_chunk(batch: &Outbound) -> Result<Bytes, Status> {
    debug_assert!(batch.head.packets.is_empty(), "packets travel pre-encoded");
    let len = u32::try_from(batch.encoded_len())
        .map_err(|_| Status::internal("a mirror batch over 4 GiB"))?;
    let mut head = BytesMut::with_capacity(5 + batch.head.encoded_len());
    head.put_u8(0);
    head.put_u32(len);
    batch
        .head
        .encode(&mut head)
        .map_err(|e| Status::internal(format!("encoding a mirror batch: {e}")))?;
    Ok(head.freeze())
}

/// The `Mirror` RPC, as tonic's generated client makes it (path, headers, the answer and its
/// status) but with [`BatchBody`] for its request.
pub async fn mirror(
    mut channel: Channel,
    batches: impl Stream<Item = Outbound> + Send + 'static,
) -> Result<tonic::Response<proto::MirrorSummary>, Status> {
    use tower::{Service, ServiceExt};
    channel
        .ready()
        .await
        .map_err(|e| Status::unavailable(format!("the connection is not ready: {e}")))?;
    let body = BatchBody {
        batches: Box::pin(batches),
        packets: None,
    };
    let request = http::Request::builder()
        .method(http::Method::POST)
        .version(http::Version::HTTP_2)
        .uri(PathAndQuery::from_static("/tapgraph.v1.AgentService/Mirror").as_str())
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .extension(tonic::GrpcMethod::new("tapgraph.v1.AgentService", "Mirror"))
        .body(tonic::body::Body::new(body))
        .map_err(|e| Status::internal(format!("building the Mirror request: {e}")))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    // A refusal comes as headers alone (trailers-only), with its status among them.
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() != tonic::Code::Ok
    {
        return Err(status);
    }
    let status_code = response.status();
    let (parts, body) = response.into_parts();
    let mut answer = tonic::Streaming::new_response(
        SummaryCodec::default().decoder(),
        body,
        status_code,
        None,
        None,
    );
    let summary = answer
        .message()
        .await?
        .ok_or_else(|| Status::internal("the Mirror call ended without a summary"))?;
    let mut headers = parts.headers;
    if let Some(trailers) = answer.trailers().await? {
        headers.extend(trailers.into_headers());
    }
    Ok(tonic::Response::from_parts(
        tonic::metadata::MetadataMap::from_headers(headers),
        summary,
        parts.extensions,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The request body is gRPC's framing of each batch, in order: a 0 flag, the length, and a
    /// message that decodes to the batch; the packets' chunk is the capture thread's own bytes.
    #[tokio::test]
    async fn the_request_body_frames_each_batch_as_grpc_does() {
        use http_body::Body as _;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut batches = Vec::new();
        for i in 0..5u64 {
            let packets: Vec<proto::Packet> = (0..i * 3).map(|_| packet(&mut rng)).collect();
            let mut arena = BytesMut::new();
            for p in &packets {
                put_packet(
                    &mut arena,
                    p.timestamp_unix_nanos,
                    p.original_length,
                    &p.data,
                );
            }
            let head = proto::MirrorBatch {
                sequence: i,
                interface: "eth0".into(),
                ..Default::default()
            };
            let whole = proto::MirrorBatch {
                packets,
                ..head.clone()
            };
            batches.push((
                Outbound {
                    head,
                    packets: arena.freeze(),
                },
                whole,
            ));
        }
        let outbound: Vec<Outbound> = batches.iter().map(|(o, _)| o.clone()).collect();
        let mut body = std::pin::pin!(BatchBody {
            batches: Box::pin(tokio_stream::iter(outbound)),
            packets: None,
        });
        let mut wire = Vec::new();
        let mut packet_chunks = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            let data = frame.unwrap().into_data().unwrap();
            packet_chunks.push(data.clone());
            wire.extend_from_slice(&data);
        }
        let mut rest = &wire[..];
        for (outbound, whole) in &batches {
            assert_eq!(rest[0], 0, "uncompressed");
            let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, outbound.encoded_len());
            assert_eq!(
                &proto::MirrorBatch::decode(&rest[5..5 + len]).unwrap(),
                whole
            );
            rest = &rest[5 + len..];
            if !outbound.packets.is_empty() {
                // Not copied: the very bytes the capture thread wrote.
                assert!(
                    packet_chunks
                        .iter()
                        .any(|c| c.as_ptr() == outbound.packets.as_ptr())
                );
            }
        }
        assert!(rest.is_empty());
    }

    fn packet(rng: &mut impl Rng) -> proto::Packet {
        let len = *[0usize, 1, 60, 127, 128, 1400, 16_384, 70_000]
            .get(rng.random_range(0..8))
            .unwrap();
        proto::Packet {
            timestamp_unix_nanos: if rng.random_bool(0.1) {
                0
            } else {
                rng.random()
            },
            original_length: *[0u32, 1, 127, 128, 65_535, u32::MAX]
                .get(rng.random_range(0..6))
                .unwrap(),
            data: (0..len).map(|_| rng.random()).collect::<Vec<u8>>().into(),
        }
    }

    #[test]
    fn a_pre_encoded_batch_is_byte_for_byte_what_prost_would_send() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let packets: Vec<proto::Packet> = (0..rng.random_range(0..20))
                .map(|_| packet(&mut rng))
                .collect();
            let mut arena = BytesMut::new();
            for p in &packets {
                let before = arena.len();
                put_packet(
                    &mut arena,
                    p.timestamp_unix_nanos,
                    p.original_length,
                    &p.data,
                );
                assert!(arena.len() - before <= PACKET_OVERHEAD + p.data.len());
            }
            let head = proto::MirrorBatch {
                sequence: rng.random(),
                sent_at_unix_nanos: rng.random(),
                policy_version: rng.random(),
                counters: Some(proto::Counters {
                    packets_captured: rng.random(),
                    ..Default::default()
                }),
                packets: Vec::new(),
                linktype: 1,
                interface: "eth0".into(),
                snaplen: 65_535,
            };
            let whole = proto::MirrorBatch {
                packets: packets.clone(),
                ..head.clone()
            };
            let outbound = Outbound {
                head,
                packets: arena.freeze(),
            };
            let mut wire = Vec::new();
            outbound.encode(&mut wire).unwrap();
            assert_eq!(wire.len(), outbound.encoded_len());
            assert_eq!(proto::MirrorBatch::decode(&wire[..]).unwrap(), whole);
            // The packets alone are exactly prost's encoding of the repeated field.
            let only_packets = proto::MirrorBatch {
                packets,
                ..Default::default()
            };
            assert_eq!(outbound.packets, only_packets.encode_to_vec());
        }
    }
}

/// Properties over generated batches: whatever the packets, the pre-encoded form is what prost
/// would send and decodes back to them; and bytes from the wire, valid or damaged, never make the
/// decoder panic, while whatever it accepts is a batch this encoder writes byte for byte.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Payloads of every length class: a few arbitrary bytes, or up to a jumbo frame of a
    /// pattern (generating each byte of a long payload would make a case slow, not better).
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            (0..9_100usize, any::<u8>())
                .prop_map(|(len, seed)| (0..len).map(|i| seed ^ i as u8).collect()),
        ]
    }

    fn packet() -> impl Strategy<Value = proto::Packet> {
        (any::<u64>(), any::<u32>(), payload()).prop_map(
            |(timestamp_unix_nanos, original_length, data)| proto::Packet {
                timestamp_unix_nanos,
                original_length,
                data: data.into(),
            },
        )
    }

    fn head() -> impl Strategy<Value = proto::MirrorBatch> {
        (
            any::<(u64, u64, u64, u32, u32)>(),
            proptest::option::of(any::<(u64, u64, u64)>()),
            "[a-z0-9]{0,15}",
        )
            .prop_map(
                |((sequence, sent_at, version, linktype, snaplen), counters, interface)| {
                    proto::MirrorBatch {
                        sequence,
                        sent_at_unix_nanos: sent_at,
                        policy_version: version,
                        counters: counters.map(|(captured, sent, in_flight)| proto::Counters {
                            packets_captured: captured,
                            packets_sent: sent,
                            packets_in_flight: in_flight,
                            ..Default::default()
                        }),
                        packets: Vec::new(),
                        linktype,
                        interface,
                        snaplen,
                    }
                },
            )
    }

    /// The batch as the agent sends it, `head` then the packets written by [`put_packet`]; and
    /// those packets alone.
    fn outbound(head: proto::MirrorBatch, packets: &[proto::Packet]) -> (Vec<u8>, Bytes) {
        let mut arena = BytesMut::new();
        for p in packets {
            put_packet(
                &mut arena,
                p.timestamp_unix_nanos,
                p.original_length,
                &p.data,
            );
        }
        let outbound = Outbound {
            head,
            packets: arena.freeze(),
        };
        let mut wire = Vec::new();
        outbound
            .encode(&mut wire)
            .expect("a Vec grows to any batch");
        assert_eq!(wire.len(), outbound.encoded_len());
        (wire, outbound.packets)
    }

    /// Whatever prost accepted, sent again the agent's way, decodes to the same batch.
    fn resent_equal(batch: proto::MirrorBatch) -> Result<(), TestCaseError> {
        let head = proto::MirrorBatch {
            packets: Vec::new(),
            ..batch.clone()
        };
        let (again, _) = outbound(head, &batch.packets);
        prop_assert_eq!(proto::MirrorBatch::decode(&again[..]).unwrap(), batch);
        Ok(())
    }

    proptest! {
        #[test]
        fn a_batch_round_trips_through_the_wire_form(
            head in head(),
            packets in proptest::collection::vec(packet(), 0..16),
        ) {
            let (wire, encoded) = outbound(head.clone(), &packets);
            let only_packets = proto::MirrorBatch { packets, ..Default::default() };
            prop_assert_eq!(&encoded[..], &only_packets.encode_to_vec()[..], "prost's bytes");
            let whole = proto::MirrorBatch { packets: only_packets.packets, ..head };
            prop_assert_eq!(proto::MirrorBatch::decode(&wire[..]).unwrap(), whole);
        }

        #[test]
        fn each_packet_costs_at_most_its_payload_and_the_overhead(packet in packet()) {
            let mut arena = BytesMut::new();
            put_packet(&mut arena, packet.timestamp_unix_nanos, packet.original_length, &packet.data);
            prop_assert!(arena.len() <= PACKET_OVERHEAD + packet.data.len());
        }

        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(batch) = proto::MirrorBatch::decode(&bytes[..]) {
                resent_equal(batch)?;
            }
        }

        /// A real batch cut short or with bytes changed, as a broken stream would deliver it.
        #[test]
        fn a_damaged_batch_decodes_without_panicking(
            head in head(),
            packets in proptest::collection::vec(packet(), 1..4),
            cut in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        ) {
            let (mut wire, _) = outbound(head, &packets);
            wire.truncate(cut.index(wire.len() + 1));
            for (at, xor) in flips {
                if !wire.is_empty() {
                    let i = at.index(wire.len());
                    wire[i] ^= xor;
                }
            }
            if let Ok(batch) = proto::MirrorBatch::decode(&wire[..]) {
                resent_equal(batch)?;
            }
        }
    }
}
