//! Compiles `proto/snakepit_bridge.proto` with protox (pure Rust, so no
//! `protoc` is needed on the build machine) and generates the prost messages
//! plus the tonic client and server. The server is used by the crate's own
//! tests, which run a real gRPC peer in process.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("snakepit_bridge.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let descriptors = protox::compile([&proto], [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
