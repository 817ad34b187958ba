//! The `ps-server` binary on SIGTERM with `--checkpoint-on-exit STEP`: it
//! writes the checkpoint of STEP before it exits (status 0), and a new
//! process started with `--restore` serves exactly the rows it held.
//! Expected time: ~2 s.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_proto::codec::{encode_f32, encode_u32, encode_u64};
use ember_proto::v1::parameter_server_client::ParameterServerClient;
use ember_proto::v1::*;

/// Starts the binary on a free port; returns it and its gRPC address.
fn start(dir: &std::path::Path, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ps-server"))
        .args(["--listen", "127.0.0.1:0", "--insecure", "--checkpoint-dir"])
        .arg(dir)
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|t| t.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no ready line: {line:?}"))
        .to_string();
    (child, addr)
}

async fn client(addr: &str) -> ParameterServerClient<tonic::transport::Channel> {
    ParameterServerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn rows(c: &mut ParameterServerClient<tonic::transport::Channel>, ids: &[u64]) -> Vec<u8> {
    c.pull(PullRequest {
        table: "item".into(),
        ids: encode_u64(ids),
    })
    .await
    .unwrap()
    .into_inner()
    .rows
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_the_exit_checkpoint_and_a_restart_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(dir.path(), &["--checkpoint-on-exit", "77"]);
    let mut c = client(&addr).await;
    c.create_table(CreateTableRequest {
        config: Some(TableConfig {
            name: "item".into(),
            dim: 2,
            init: Some(Initializer {
                kind: initializer::Kind::Uniform as i32,
                scale: 0.1,
            }),
            seed: 5,
            optimizer: Some(OptimizerConfig {
                kind: Some(optimizer_config::Kind::Adagrad(Adagrad {
                    lr: 0.1,
                    initial_accumulator: 0.1,
                    eps: 1e-8,
                })),
            }),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let ids: Vec<u64> = (0..50).collect();
    c.push(PushRequest {
        table: "item".into(),
        ids: encode_u64(&ids),
        grads: encode_f32(&[0.3; 100]),
        counts: encode_u32(&[1; 50]),
        step: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let before = rows(&mut c, &ids).await;
    drop(c);

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "ps-server did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    let ckpt = dir.path().join("shard-0-of-1/step-77.ckpt");
    assert!(ckpt.exists(), "{} missing", ckpt.display());

    let (mut child2, addr2) = start(dir.path(), &["--restore"]);
    let mut c2 = client(&addr2).await;
    let h = c2.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.checkpoint_step, 77);
    assert_eq!(rows(&mut c2, &ids).await, before, "restored rows differ");
    let _ = child2.kill();
    let _ = child2.wait();
}
