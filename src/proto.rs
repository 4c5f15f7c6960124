//! Generated protobuf and gRPC code. Nothing hand-written lives here: the rest of the code converts
//! at the edge into its own types.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("tapgraph.v1");

/// The encoded file descriptor set of every tapgraph proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tapgraph_descriptor");
