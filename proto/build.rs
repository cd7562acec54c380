fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        // Block payloads stay `bytes::Bytes` end to end: no copy on decode.
        .bytes(".")
        .compile_protos(&["proto/raft.proto", "proto/admin.proto", "proto/data.proto"], &["proto"])?;
    Ok(())
}
