//! Compiles the vault's `Tokenizer` API from `proto/` at the repository root
//! with protox (no system `protoc`). Messages that carry values get no
//! derived `Debug`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/piivault/v1/tokenizer.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .skip_debug([
            ".piivault.v1.TokenizeRequest",
            ".piivault.v1.DetokenizeResponse",
            ".piivault.v1.DetokenizeResult",
            ".piivault.v1.DetokenizeResult.outcome",
        ])
        .compile_fds(fds)?;
    Ok(())
}
