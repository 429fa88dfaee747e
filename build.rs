//! Compiles the gRPC API. protoc comes from `protoc-bin-vendored`, so a fresh
//! machine needs nothing but cargo.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/crisis/v1/crisis.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Small per-stream buffers: see src/api/codec.rs.
        .codec_path("crate::api::codec::SmallBuffers")
        // For the reflection service.
        .file_descriptor_set_path(out.join("crisis_descriptor.bin"))
        .compile_with_config(
            config,
            &[PathBuf::from(proto)],
            // google/protobuf/timestamp.proto ships with the vendored protoc.
            &[PathBuf::from("proto"), protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
