//! Compiles the wire contract with protox (pure Rust): no protoc binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/switchyard/v1/types.proto",
        "proto/switchyard/v1/state.proto",
        "proto/switchyard/v1/raft.proto",
        "proto/switchyard/v1/admin.proto",
        "proto/switchyard/v1/uplink.proto",
        "proto/switchyard/v1/enrol.proto",
        "proto/switchyard/v1/local.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
