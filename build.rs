//! Compiles `proto/` with protox (pure Rust: no system `protoc`) and
//! generates the tonic services. Messages that carry values get no derived
//! `Debug`; `src/grpc/proto.rs` gives them a redacting one.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos =
        ["proto/piivault/v1/tokenizer.proto", "proto/piivault/v1/audit.proto", "proto/piivault/v1/admin.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("piivault_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // INVALID_ARGUMENT, not INTERNAL, for a message that does not decode.
        .codec_path("crate::grpc::codec::StrictCodec")
        .skip_debug([
            ".piivault.v1.TokenizeRequest",
            ".piivault.v1.DetokenizeResponse",
            ".piivault.v1.DetokenizeResult",
            ".piivault.v1.DetokenizeResult.outcome",
            ".piivault.v1.RotateRootKeyRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
