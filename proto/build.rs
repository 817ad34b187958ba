//! Compiles the `ember.v1` contract (`proto/ember/v1/ps.proto` and
//! `coordinator.proto`) with protox (pure Rust: no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/ember/v1/ps.proto",
        "proto/ember/v1/coordinator.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".ember.v1")
        .compile_fds(fds)?;
    Ok(())
}
