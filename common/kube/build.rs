//! Generates the client of the Kubernetes SnapshotMetadata API (changed-block tracking, served
//! by the csi-snapshot-metadata sidecar) from the vendored proto with protox (no `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/snapshot-metadata.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
