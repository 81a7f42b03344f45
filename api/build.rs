fn main() -> Result<(), Box<dyn std::error::Error>> {
    // All files are package causeway.v1, so they compile into one module.
    tonic_prost_build::configure().compile_protos(
        &["proto/causeway/v1/mesh.proto", "proto/causeway/v1/egress.proto", "proto/causeway/v1/workload.proto"],
        &["proto"],
    )?;
    Ok(())
}
