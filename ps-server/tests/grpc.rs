//! The shard over real gRPC on loopback (port 0): bad inputs, auth, dense
//! sync semantics, checkpoints, shutdown.

mod common;

use bytes::Bytes;
use ember_proto::codec::{decode_f32, encode_f32, encode_u32, encode_u64};
use ember_proto::v1::parameter_server_client::ParameterServerClient;
use ember_proto::v1::*;
use ember_ps::{spawn, RunningShard, ServerConfig};
use tonic::transport::Channel;
use tonic::Code;

type Client = ParameterServerClient<Channel>;

async fn start(cfg: ServerConfig) -> (RunningShard, Client) {
    let max = cfg.max_message_bytes;
    let rs = spawn(cfg).await.unwrap();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", rs.addr))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let c = ParameterServerClient::new(ch)
        .max_decoding_message_size(max * 2)
        .max_encoding_message_size(max * 2);
    (rs, c)
}

fn table(name: &str, dim: u32) -> TableConfig {
    TableConfig {
        name: name.into(),
        dim,
        init: Some(Initializer {
            kind: initializer::Kind::Uniform as i32,
            scale: 0.05,
        }),
        seed: 1,
        optimizer: Some(OptimizerConfig {
            kind: Some(optimizer_config::Kind::Adagrad(Adagrad {
                lr: 0.1,
                initial_accumulator: 0.1,
                eps: 1e-8,
            })),
        }),
        mba_lambda: 0.01,
        count_mode: CountMode::CountOnline as i32,
        ..Default::default()
    }
}

fn push_req(t: &str, ids: &[u64], grads: &[f32], counts: &[u32]) -> PushRequest {
    PushRequest {
        table: t.into(),
        ids: encode_u64(ids),
        grads: encode_f32(grads),
        counts: encode_u32(counts),
        step: 1,
        request_id: 0,
    }
}

async fn pull(c: &mut Client, t: &str, ids: &[u64]) -> Vec<f32> {
    let r = c
        .pull(PullRequest {
            table: t.into(),
            ids: encode_u64(ids),
        })
        .await
        .unwrap()
        .into_inner();
    decode_f32("rows", &r.rows).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_rejected_and_change_nothing() {
    let mut cfg = ServerConfig::local(0, 1);
    // Small enough that an oversized request still fits the HTTP/2 flow-control
    // window: a request far beyond the window is reset by h2 before the client
    // reads the RESOURCE_EXHAUSTED status (seen as INTERNAL by the client).
    cfg.max_message_bytes = 16 * 1024;
    let (rs, mut c) = start(cfg).await;
    let t = table("item", 4);
    assert!(
        c.create_table(CreateTableRequest {
            config: Some(t.clone())
        })
        .await
        .unwrap()
        .into_inner()
        .created
    );
    assert!(
        !c.create_table(CreateTableRequest {
            config: Some(t.clone())
        })
        .await
        .unwrap()
        .into_inner()
        .created
    );
    let ids = [1u64, 2, 3];
    c.push(push_req("item", &ids, &[0.5; 12], &[1, 2, 3]))
        .await
        .unwrap();
    let before_rows = pull(&mut c, "item", &[1, 2, 3, 4]).await;
    let before = c.stats(StatsRequest {}).await.unwrap().into_inner();

    let mut diff = t.clone();
    diff.dim = 8;
    let mut ragged = push_req("item", &ids, &[0.5; 12], &[]);
    ragged.ids = Bytes::from(vec![0u8; 23]);
    let mut ragged_grads = push_req("item", &ids, &[0.5; 12], &[]);
    ragged_grads.grads = Bytes::from(vec![0u8; 47]);
    let mut nan = vec![0.1f32; 12];
    nan[5] = f32::NAN;
    let mut inf = vec![0.1f32; 12];
    inf[0] = f32::INFINITY;
    let big: Vec<u64> = (0..2_500).collect();
    let cases: Vec<(Code, &str, PushRequest)> = vec![
        (
            Code::NotFound,
            "unknown table",
            push_req("nope", &ids, &[0.5; 12], &[]),
        ),
        (Code::InvalidArgument, "not a multiple of 8", ragged),
        (Code::InvalidArgument, "not a multiple of 4", ragged_grads),
        (
            Code::InvalidArgument,
            "expected ids",
            push_req("item", &ids, &[0.5; 8], &[]),
        ),
        (
            Code::InvalidArgument,
            "counts has 2",
            push_req("item", &ids, &[0.5; 12], &[1, 1]),
        ),
        (
            Code::InvalidArgument,
            "counts[1] is 0",
            push_req("item", &ids, &[0.5; 12], &[1, 0, 1]),
        ),
        (
            Code::InvalidArgument,
            "duplicate id 1",
            push_req("item", &[1, 2, 1], &[0.5; 12], &[]),
        ),
        (
            Code::InvalidArgument,
            "non-finite",
            push_req("item", &ids, &nan, &[]),
        ),
        (
            Code::InvalidArgument,
            "non-finite",
            push_req("item", &ids, &inf, &[]),
        ),
        (
            Code::ResourceExhausted,
            "",
            push_req("item", &big, &[], &[]),
        ),
    ];
    let n_cases = cases.len() as u64;
    for (code, msg, req) in cases {
        let e = c.push(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{msg}: {e:?}");
        assert!(e.message().contains(msg), "{msg}: {}", e.message());
    }
    let e = c
        .create_table(CreateTableRequest { config: Some(diff) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("different config"), "{}", e.message());
    let e = c
        .pull(PullRequest {
            table: "nope".into(),
            ids: encode_u64(&[1]),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .pull(PullRequest {
            table: "item".into(),
            ids: encode_u64(&big[..1100]),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = c
        .load_counts(LoadCountsRequest {
            table: "item".into(),
            ids: encode_u64(&[1, 2]),
            counts: encode_u32(&[1]),
            replace: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    assert_eq!(pull(&mut c, "item", &[1, 2, 3, 4]).await, before_rows);
    let after = c.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(after.tables, before.tables);
    assert_eq!(after.rows_pushed, before.rows_pushed);
    assert_eq!(after.rejected, before.rejected + n_cases + 4);
    rs.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shard_is_failed_precondition() {
    let (rs, mut c) = start(ServerConfig::local(0, 2)).await;
    c.create_table(CreateTableRequest {
        config: Some(table("item", 2)),
    })
    .await
    .unwrap();
    let router = ember_proto::Router::new(2);
    let other = (0..100u64)
        .find(|&id| router.shard_of("item", id) == 1)
        .unwrap();
    let mine = (0..100u64)
        .find(|&id| router.shard_of("item", id) == 0)
        .unwrap();
    let e = c
        .pull(PullRequest {
            table: "item".into(),
            ids: encode_u64(&[mine, other]),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(pull(&mut c, "item", &[mine]).await.len(), 2);
    rs.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_needs_the_token() {
    let mut cfg = ServerConfig::local(0, 1);
    cfg.auth_token = Some("s3cret".into());
    let (rs, mut c) = start(cfg).await;
    let req = || CreateTableRequest {
        config: Some(table("item", 2)),
    };
    let e = c.create_table(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(req());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        c.create_table(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        c.shutdown(ShutdownRequest { checkpoint_step: 0 })
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert!(rs.shard.list_tables().is_empty());
    let mut ok = tonic::Request::new(req());
    ok.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    assert!(c.create_table(ok).await.unwrap().into_inner().created);
    // Data-path RPCs need the token too, and a rejected push changes nothing.
    let pull_req = || PullRequest {
        table: "item".into(),
        ids: encode_u64(&[1]),
    };
    assert_eq!(
        c.pull(pull_req()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut authed = tonic::Request::new(pull_req());
    authed
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let before = c.pull(authed).await.unwrap().into_inner().rows;
    let e = c
        .push(PushRequest {
            table: "item".into(),
            ids: encode_u64(&[1]),
            grads: encode_f32(&[1.0, 1.0]),
            counts: Bytes::new(),
            step: 1,
            request_id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut authed = tonic::Request::new(pull_req());
    authed
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    assert_eq!(c.pull(authed).await.unwrap().into_inner().rows, before);
    assert_eq!(
        c.health(HealthRequest {}).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    rs.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_dense_push_and_min_step_wait() {
    let (rs, mut c) = start(ServerConfig::local(0, 1)).await;
    c.init_dense(InitDenseRequest {
        params: vec![DenseParam {
            name: "fc.w".into(),
            values: encode_f32(&[1.0, 1.0]),
        }],
        optimizer: Some(OptimizerConfig {
            kind: Some(optimizer_config::Kind::Sgd(Sgd { lr: 1.0 })),
        }),
    })
    .await
    .unwrap();
    let mut waiter = c.clone();
    let wait = tokio::spawn(async move {
        waiter
            .pull_dense(PullDenseRequest {
                names: vec![],
                min_step: 1,
                timeout_ms: 10_000,
            })
            .await
            .unwrap()
            .into_inner()
    });
    let push = |w: u32, g: f32| PushDenseRequest {
        grads: vec![DenseParam {
            name: "fc.w".into(),
            values: encode_f32(&[g, -g]),
        }],
        step: 0,
        num_workers: 2,
        worker_index: w,
    };
    assert_eq!(
        c.push_dense(push(0, 1.0)).await.unwrap().into_inner().step,
        0
    );
    assert_eq!(
        c.push_dense(push(0, 1.0)).await.unwrap().into_inner().step,
        0
    );
    assert_eq!(
        c.push_dense(push(1, 3.0)).await.unwrap().into_inner().step,
        1
    );
    let got = wait.await.unwrap();
    assert_eq!(got.step, 1);
    assert_eq!(
        decode_f32("v", &got.params[0].values).unwrap(),
        vec![-1.0, 3.0]
    );
    let e = c
        .pull_dense(PullDenseRequest {
            names: vec![],
            min_step: 5,
            timeout_ms: 30,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    let e = c
        .pull_dense(PullDenseRequest {
            names: vec!["nope".into()],
            min_step: 0,
            timeout_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    rs.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_restore_and_corrupt_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::local(0, 1);
    cfg.checkpoint_dir = Some(dir.path().to_path_buf());
    let (rs, mut c) = start(cfg.clone()).await;
    let mut t = table("item", 3);
    t.admit_min_count = 2;
    c.create_table(CreateTableRequest { config: Some(t) })
        .await
        .unwrap();
    c.init_dense(InitDenseRequest {
        params: vec![DenseParam {
            name: "w".into(),
            values: encode_f32(&[0.5]),
        }],
        optimizer: Some(OptimizerConfig {
            kind: Some(optimizer_config::Kind::Adam(Adam {
                lr: 0.1,
                ..Default::default()
            })),
        }),
    })
    .await
    .unwrap();
    let ids: Vec<u64> = (0..300).collect();
    c.push(push_req("item", &ids, &vec![0.25; 900], &vec![2; 300]))
        .await
        .unwrap();
    c.push(push_req("item", &[1000], &[0.25; 3], &[1]))
        .await
        .unwrap(); // not admitted
    c.push_dense(PushDenseRequest {
        grads: vec![DenseParam {
            name: "w".into(),
            values: encode_f32(&[1.0]),
        }],
        step: 0,
        num_workers: 1,
        worker_index: 0,
    })
    .await
    .unwrap();
    let all: Vec<u64> = (0..310).chain([1000]).collect();
    let rows1 = pull(&mut c, "item", &all).await;
    let stats1 = c.stats(StatsRequest {}).await.unwrap().into_inner();
    let dense1 = c
        .pull_dense(PullDenseRequest::default())
        .await
        .unwrap()
        .into_inner();
    let full1 = common::full_state(&rs.shard);
    assert_eq!(full1.rows(), 300, "admitted rows");
    assert_eq!(full1.tables[0].2, vec![(1000, 1)], "id 1000 is pending");
    let r = c
        .checkpoint(CheckpointRequest {
            step: 10,
            keep: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rows, 300);
    assert!(r.path.ends_with("shard-0-of-1/step-10.ckpt"), "{}", r.path);
    // Change state, write step 20.
    c.push(push_req("item", &ids, &vec![1.0; 900], &[]))
        .await
        .unwrap();
    c.checkpoint(CheckpointRequest {
        step: 20,
        keep: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let steps = c
        .list_checkpoints(ListCheckpointsRequest {})
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(steps, vec![10, 20]);

    // Corrupt a body byte of step 20: explicit restore refuses, naming the file.
    let p20 = dir.path().join("shard-0-of-1/step-20.ckpt");
    let mut bytes = std::fs::read(&p20).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&p20, &bytes).unwrap();
    let before = pull(&mut c, "item", &all).await;
    let full_before = common::full_state(&rs.shard);
    assert_ne!(full_before, full1);
    let e = c.restore(RestoreRequest { step: 20 }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("step-20.ckpt") && e.message().contains("checksum"),
        "{}",
        e.message()
    );
    assert_eq!(
        pull(&mut c, "item", &all).await,
        before,
        "failed restore changed nothing"
    );
    assert_eq!(common::full_state(&rs.shard), full_before);
    // Restore(0) skips the corrupt one and loads step 10.
    let r = c
        .restore(RestoreRequest { step: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.step, r.rows), (10, 300));
    assert_eq!(pull(&mut c, "item", &all).await, rows1);
    // Restored exactly: every row with its optimizer state, count and step,
    // the pending counts, the dense values and step.
    assert_eq!(common::full_state(&rs.shard), full1);
    let stats = c.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.tables[0].rows, stats1.tables[0].rows);
    assert_eq!(stats.tables[0].counted_ids, stats1.tables[0].counted_ids);
    assert_eq!(
        c.pull_dense(PullDenseRequest::default())
            .await
            .unwrap()
            .into_inner(),
        dense1
    );

    // Truncated file: not listed, explicit restore refuses.
    std::fs::write(&p20, &bytes[..bytes.len() - 7]).unwrap();
    let steps = c
        .list_checkpoints(ListCheckpointsRequest {})
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(steps, vec![10]);
    let e = c.restore(RestoreRequest { step: 20 }).await.unwrap_err();
    assert!(e.message().contains("truncated"), "{}", e.message());
    assert_eq!(
        c.restore(RestoreRequest { step: 99 })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Keep retention. Nothing changed since the restore of step 10: step 30
    // would be a delta on base 10, which keep = 1 could not drop; a forced
    // base stands alone.
    let r = c
        .checkpoint(CheckpointRequest {
            step: 30,
            keep: 1,
            force_base: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kind, "base");
    let steps = c
        .list_checkpoints(ListCheckpointsRequest {})
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(steps, vec![30]);

    // Shutdown RPC with a checkpoint; a new server with restore=true resumes.
    c.shutdown(ShutdownRequest {
        checkpoint_step: 40,
    })
    .await
    .unwrap();
    rs.join.await.unwrap().unwrap();
    cfg.restore = true;
    let (rs2, mut c2) = start(cfg).await;
    assert_eq!(rs2.shard.checkpoint_step(), 40);
    assert_eq!(pull(&mut c2, "item", &all).await, rows1);
    assert_eq!(common::full_state(&rs2.shard), full1);
    let h = c2.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!((h.status.as_str(), h.checkpoint_step), ("SERVING", 40));
    rs2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_prometheus_text() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Shard 3 of 4: other tests in this process share the global recorder
    // under shard="0".
    let mut cfg = ServerConfig::local(3, 4);
    cfg.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let (rs, mut c) = start(cfg).await;
    let r = ember_proto::Router::new(4);
    let ids: Vec<u64> = (0..1000u64)
        .filter(|&id| r.shard_of("item", id) == 3)
        .take(3)
        .collect();
    c.create_table(CreateTableRequest {
        config: Some(table("item", 2)),
    })
    .await
    .unwrap();
    c.push(push_req("item", &ids[..2], &[0.1; 4], &[]))
        .await
        .unwrap();
    pull(&mut c, "item", &ids).await;
    let _ = c
        .push(push_req("item", &[ids[0], ids[0]], &[0.1; 4], &[]))
        .await;
    let mut s = tokio::net::TcpStream::connect(rs.metrics_addr.unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    for want in [
        "ember_ps_rows_pulled_total{table=\"item\",shard=\"3\"} 3",
        "ember_ps_rows_pushed_total{table=\"item\",shard=\"3\"} 2",
        "ember_ps_requests_total{method=\"Pull\",table=\"item\",shard=\"3\"}",
        "ember_ps_request_seconds_bucket{method=\"Push\",shard=\"3\"",
        "ember_ps_resident_rows{table=\"item\",shard=\"3\"} 2",
        "ember_ps_rejected_total{reason=\"invalid_argument\",shard=\"3\"} 1",
    ] {
        assert!(body.contains(want), "missing {want} in\n{body}");
    }
    rs.shutdown().await.unwrap();
}

/// A sparse Push retried with the same request id (the client lost the
/// answer) is applied once: every copy gets the first answer and the full
/// state (rows, optimizer state, counts, steps) equals one application. A
/// new id, or id 0, is a new push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_push_with_the_same_request_id_is_applied_once() {
    let (rs, mut c) = start(ServerConfig::local(0, 1)).await;
    c.create_table(CreateTableRequest {
        config: Some(table("item", 2)),
    })
    .await
    .unwrap();
    let req = |request_id| PushRequest {
        request_id,
        ..push_req("item", &[1, 2, 3], &[0.5; 6], &[1, 2, 1])
    };
    let first = c.push(req(42)).await.unwrap().into_inner();
    assert_eq!(first.updated, 3);
    let once = common::full_state(&rs.shard);
    for _ in 0..3 {
        assert_eq!(c.push(req(42)).await.unwrap().into_inner(), first);
    }
    assert_eq!(
        common::full_state(&rs.shard),
        once,
        "a retry was applied again"
    );
    c.push(req(43)).await.unwrap();
    let twice = common::full_state(&rs.shard);
    assert_ne!(twice, once, "a new request id is a new push");
    c.push(req(0)).await.unwrap();
    c.push(req(0)).await.unwrap();
    assert_ne!(
        common::full_state(&rs.shard),
        twice,
        "id 0 is never deduplicated"
    );
    // A rejected request id is forgotten: a corrected copy is applied.
    let bad = PushRequest {
        request_id: 44,
        ..push_req("item", &[1], &[0.5; 3], &[1])
    };
    assert_eq!(c.push(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let before = common::full_state(&rs.shard);
    let good = PushRequest {
        request_id: 44,
        ..push_req("item", &[1], &[0.5; 2], &[1])
    };
    assert_eq!(c.push(good).await.unwrap().into_inner().updated, 1);
    assert_ne!(common::full_state(&rs.shard), before);
    rs.shutdown().await.unwrap();
}
