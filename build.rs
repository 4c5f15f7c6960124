//! Compiles `proto/tapgraph/v1/*.proto` with protox (pure Rust: no system protoc) and keeps the
//! descriptor set for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("proto/tapgraph/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(&files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("tapgraph_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .bytes(".tapgraph.v1.Packet.data")
        // The generated `connect()` constructor would clash with the `Connect` rpc; we build channels
        // ourselves (mTLS connector), so it is not needed.
        .build_transport(false)
        // Small first buffers per call: see src/codec.rs.
        .codec_path("crate::codec::LeanCodec")
        // RPCs a later issue implements answer UNIMPLEMENTED until then.
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
