//! Compiles `proto/ember/v1/ps.proto` with protox (pure Rust: no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/ember/v1/ps.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".ember.v1")
        .compile_fds(fds)?;
    Ok(())
}
