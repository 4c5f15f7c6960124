//! The gRPC codec of every tapgraph service: prost, as tonic's default, with a small first buffer.
//!
//! tonic gives each call an 8 KiB encode and an 8 KiB decode buffer up front. A controller holds
//! one long-lived session call per agent, mostly idle, so at 5,000 agents those buffers alone
//! were 80 MB. Starting them at [`BUFFER_SIZE`] costs nothing on the busy streams: a buffer grows
//! to the largest message it carries (a snapshot, a mirror batch) and keeps that capacity.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::{ProstCodec, ProstDecoder};

/// First capacity of a call's encode and decode buffers: a control record, an ack or a policy
/// fits without growing.
pub const BUFFER_SIZE: usize = 256;
/// tonic's own: an encoder yields to the runtime after this many bytes.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Used by the generated clients and servers (`codec_path` in `build.rs`).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = LeanEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        LeanEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(buffer_settings())
    }
}

/// prost's encoder, but the buffer is grown once to the message's size before it is written.
/// Left to grow as it writes, a buffer starting at [`BUFFER_SIZE`] doubles its way up to a
/// 90 KB mirror batch: about one more copy of the batch, and fresh pages faulted in at each step.
#[derive(Debug)]
pub struct LeanEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for LeanEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

/// [`BUFFER_SIZE`] first, and tonic's yield threshold.
pub fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_small_and_keep_tonics_yield_threshold() {
        let mut codec = LeanCodec::<crate::proto::Hello, crate::proto::Hello>::default();
        let settings = format!("{:?}", codec.encoder().buffer_settings());
        assert!(settings.contains("buffer_size: 256"), "{settings}");
        assert!(settings.contains("yield_threshold: 32768"), "{settings}");
    }
}
