//! TLS and the bearer token over real gRPC on loopback: a client needs the
//! right CA (and, with mTLS, a client certificate) and the token; plaintext
//! clients cannot talk to a TLS shard; the binary refuses to start insecure
//! unless told so explicitly.

use ember_proto::codec::encode_u64;
use ember_proto::pki::{write_test_pki, PkiFiles};
use ember_proto::security::{ClientSecurity, ClientTlsFiles};
use ember_proto::v1::parameter_server_client::ParameterServerClient;
use ember_proto::v1::*;
use ember_ps::{spawn, RunningShard, ServerConfig};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use tonic::Code;

fn pki(dir: &std::path::Path) -> PkiFiles {
    write_test_pki(dir, &["localhost".into(), "127.0.0.1".into()]).unwrap()
}

async fn tls_shard(files: &PkiFiles, mtls: bool) -> RunningShard {
    let mut cfg = ServerConfig::local(0, 1);
    cfg.tls_cert = Some(files.server_cert.clone());
    cfg.tls_key = Some(files.server_key.clone());
    if mtls {
        cfg.tls_client_ca = Some(files.ca.clone());
    }
    cfg.auth_token = Some("t0ken".into());
    spawn(cfg).await.unwrap()
}

fn client_tls(ca: &std::path::Path, identity: Option<(&PkiFiles,)>) -> ClientTlsFiles {
    ClientTlsFiles {
        ca: ca.to_path_buf(),
        domain: None,
        identity: identity.map(|(f,)| (f.client_cert.clone(), f.client_key.clone())),
    }
}

async fn health(sec: &ClientSecurity, addr: &str) -> Result<HealthResponse, tonic::Status> {
    let ep = sec
        .endpoint(addr)
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let ch = ep
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(ember_proto::security::error_chain(&e)))?;
    let mut c = ParameterServerClient::with_interceptor(ch, sec.interceptor());
    c.health(HealthRequest {}).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_with_ca_and_token_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let files = pki(dir.path());
    let rs = tls_shard(&files, false).await;
    let addr = rs.addr.to_string();
    let tls = client_tls(&files.ca, None).load().unwrap();
    let good = ClientSecurity::new(Some(tls.clone()), Some("t0ken")).unwrap();
    assert_eq!(health(&good, &addr).await.unwrap().shard_index, 0);

    // The right CA but no token: UNAUTHENTICATED.
    let no_token = ClientSecurity::new(Some(tls.clone()), None).unwrap();
    assert_eq!(
        health(&no_token, &addr).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // The name the certificate was issued for also verifies.
    let by_name = good
        .endpoint(&format!("localhost:{}", rs.addr.port()))
        .unwrap();
    let ch = by_name.connect().await.unwrap();
    let mut c = ParameterServerClient::with_interceptor(ch, good.interceptor());
    assert!(c.health(HealthRequest {}).await.is_ok());

    // A plaintext client cannot talk to a TLS shard.
    let plain = ClientSecurity::new(None, Some("t0ken")).unwrap();
    let e = health(&plain, &addr).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);

    // A client trusting another CA refuses the shard's certificate.
    let other = tempfile::tempdir().unwrap();
    let other_files = pki(other.path());
    let wrong_ca = ClientSecurity::new(
        Some(client_tls(&other_files.ca, None).load().unwrap()),
        Some("t0ken"),
    )
    .unwrap();
    let e = health(&wrong_ca, &addr).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    let msg = e.message().to_lowercase();
    assert!(
        msg.contains("certificate") || msg.contains("tls") || msg.contains("transport"),
        "{msg}"
    );

    // A certificate for another name is refused too.
    let mut wrong_name = client_tls(&files.ca, None);
    wrong_name.domain = Some("not-a-shard.example".into());
    let wrong_name = ClientSecurity::new(Some(wrong_name.load().unwrap()), Some("t0ken")).unwrap();
    assert!(health(&wrong_name, &addr).await.is_err());
    rs.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_needs_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let files = pki(dir.path());
    let rs = tls_shard(&files, true).await;
    let addr = rs.addr.to_string();
    let without = ClientSecurity::new(
        Some(client_tls(&files.ca, None).load().unwrap()),
        Some("t0ken"),
    )
    .unwrap();
    assert!(health(&without, &addr).await.is_err());
    let with = ClientSecurity::new(
        Some(client_tls(&files.ca, Some((&files,))).load().unwrap()),
        Some("t0ken"),
    )
    .unwrap();
    assert!(health(&with, &addr).await.is_ok());

    // Over TLS a rejected admin RPC (no token) changes nothing.
    let tls_only = ClientSecurity::new(
        Some(client_tls(&files.ca, Some((&files,))).load().unwrap()),
        None,
    )
    .unwrap();
    let ch = tls_only.endpoint(&addr).unwrap().connect().await.unwrap();
    let mut c = ParameterServerClient::new(ch);
    let e = c
        .create_table(CreateTableRequest {
            config: Some(TableConfig {
                name: "item".into(),
                dim: 4,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(rs.shard.list_tables().is_empty());
    let e = c
        .pull(PullRequest {
            table: "item".into(),
            ids: encode_u64(&[1]),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    rs.shutdown().await.unwrap();
}

/// Starts the binary, returns its exit status (if it exited within the
/// timeout) and everything it wrote to stderr, or the READY line.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<std::process::ExitStatus>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ps-server"));
    cmd.args(args)
        .env_remove("EMBER_AUTH_TOKEN")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut first = String::new();
    let _ = BufReader::new(stdout).read_line(&mut first);
    // Started: stop it. Otherwise it exits on its own with an error.
    let started = first.starts_with("EMBER_PS_READY");
    if started {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    if started {
        (None, format!("{first}{err}"))
    } else {
        (Some(status), err)
    }
}

#[test]
fn binary_refuses_insecure_unless_told() {
    let (status, err) = run_binary(&["--listen", "127.0.0.1:0"], &[]);
    assert!(matches!(status, Some(s) if !s.success()), "{err}");
    assert!(err.contains("--insecure") && err.contains("TLS"), "{err}");

    // TLS without a token is still insecure.
    let dir = tempfile::tempdir().unwrap();
    let files = pki(dir.path());
    let cert = files.server_cert.to_str().unwrap();
    let key = files.server_key.to_str().unwrap();
    let (status, err) = run_binary(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ],
        &[],
    );
    assert!(matches!(status, Some(s) if !s.success()), "{err}");
    assert!(err.contains("auth token"), "{err}");

    // --insecure starts and warns.
    let (status, out) = run_binary(&["--listen", "127.0.0.1:0", "--insecure"], &[]);
    assert!(status.is_none(), "did not start: {out}");
    assert!(out.contains("INSECURE"), "{out}");

    // TLS + token from the environment: starts without a warning, and the
    // token never appears in the logs.
    let (status, out) = run_binary(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ],
        &[("EMBER_AUTH_TOKEN", "very-secret-token")],
    );
    assert!(status.is_none(), "did not start: {out}");
    assert!(!out.contains("INSECURE"), "{out}");
    assert!(!out.contains("very-secret-token"), "{out}");

    // A key file that is not PEM: a clear error naming it.
    let bogus = dir.path().join("bogus.key");
    std::fs::write(&bogus, "nope").unwrap();
    let (status, err) = run_binary(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            bogus.to_str().unwrap(),
        ],
        &[("EMBER_AUTH_TOKEN", "x")],
    );
    assert!(matches!(status, Some(s) if !s.success()), "{err}");
    assert!(err.contains("bogus.key"), "{err}");
}

type AuthClient = ParameterServerClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        ember_proto::security::BearerAuth,
    >,
>;

/// A lazily connecting client of `addr` with `sec` (TLS or not, its token).
fn auth_client(sec: &ClientSecurity, addr: &str) -> AuthClient {
    let ch = sec
        .endpoint(addr)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    ParameterServerClient::with_interceptor(ch, sec.interceptor())
}

/// Calls every RPC of ember.v1.ParameterServer once (Shutdown last) and
/// returns each RPC's name and status code (`Ok` on success).
async fn call_every_ps_rpc(c: &mut AuthClient) -> Vec<(&'static str, Code)> {
    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
    }
    let ids = || encode_u64(&[1, 2]);
    let dense = || {
        vec![DenseParam {
            name: "w".into(),
            values: ember_proto::codec::encode_f32(&[0.5]),
        }]
    };
    vec![
        (
            "CreateTable",
            code(
                c.create_table(CreateTableRequest {
                    config: Some(TableConfig {
                        name: "item".into(),
                        dim: 2,
                        ..Default::default()
                    }),
                })
                .await,
            ),
        ),
        (
            "DescribeTable",
            code(
                c.describe_table(DescribeTableRequest {
                    table: "item".into(),
                })
                .await,
            ),
        ),
        (
            "ListTables",
            code(c.list_tables(ListTablesRequest {}).await),
        ),
        (
            "Pull",
            code(
                c.pull(PullRequest {
                    table: "item".into(),
                    ids: ids(),
                })
                .await,
            ),
        ),
        (
            "Push",
            code(
                c.push(PushRequest {
                    table: "item".into(),
                    ids: ids(),
                    grads: ember_proto::codec::encode_f32(&[0.1; 4]),
                    counts: ember_proto::codec::encode_u32(&[1, 1]),
                    step: 1,
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "InitDense",
            code(
                c.init_dense(InitDenseRequest {
                    params: dense(),
                    optimizer: None,
                })
                .await,
            ),
        ),
        (
            "PullDense",
            code(
                c.pull_dense(PullDenseRequest {
                    names: vec![],
                    min_step: 0,
                    timeout_ms: 0,
                })
                .await,
            ),
        ),
        (
            "PushDense",
            code(
                c.push_dense(PushDenseRequest {
                    grads: dense(),
                    step: 0,
                    num_workers: 1,
                    worker_index: 0,
                })
                .await,
            ),
        ),
        (
            "AssignDense",
            code(c.assign_dense(AssignDenseRequest { params: dense() }).await),
        ),
        (
            "LoadCounts",
            code(
                c.load_counts(LoadCountsRequest {
                    table: "item".into(),
                    ids: ids(),
                    counts: ember_proto::codec::encode_u32(&[3, 4]),
                    replace: true,
                })
                .await,
            ),
        ),
        (
            "Checkpoint",
            code(
                c.checkpoint(CheckpointRequest {
                    step: 1,
                    keep: 2,
                    ..Default::default()
                })
                .await,
            ),
        ),
        ("Restore", code(c.restore(RestoreRequest { step: 1 }).await)),
        (
            "ListCheckpoints",
            code(c.list_checkpoints(ListCheckpointsRequest {}).await),
        ),
        ("Health", code(c.health(HealthRequest {}).await)),
        ("Stats", code(c.stats(StatsRequest {}).await)),
        (
            "Shutdown",
            code(c.shutdown(ShutdownRequest { checkpoint_step: 0 }).await),
        ),
    ]
}

/// Every RPC of the shard x {no token, wrong token, plaintext client}: each
/// gets its exact status (UNAUTHENTICATED from the token check; UNAVAILABLE
/// for a plaintext client, which cannot even reach the service) and nothing
/// changes; then the right token reaches every RPC (none is
/// UNAUTHENTICATED), which shows the table covers the interceptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ps_rpc_x_every_bad_credential_gets_its_exact_status() {
    let dir = tempfile::tempdir().unwrap();
    let files = pki(dir.path());
    let mut cfg = ServerConfig::local(0, 1);
    cfg.tls_cert = Some(files.server_cert.clone());
    cfg.tls_key = Some(files.server_key.clone());
    cfg.auth_token = Some("t0ken".into());
    cfg.checkpoint_dir = Some(dir.path().join("ckpt"));
    let rs = spawn(cfg).await.unwrap();
    let addr = rs.addr.to_string();
    let tls = client_tls(&files.ca, None).load().unwrap();
    let cases = [
        (
            "no token",
            ClientSecurity::new(Some(tls.clone()), None).unwrap(),
            Code::Unauthenticated,
        ),
        (
            "wrong token",
            ClientSecurity::new(Some(tls.clone()), Some("t0ken-not")).unwrap(),
            Code::Unauthenticated,
        ),
        (
            "plaintext client",
            ClientSecurity::new(None, Some("t0ken")).unwrap(),
            // Never a service answer: the server's exact answer is a TLS
            // alert (`PLAINTEXT_ANSWER`, checked below byte for byte); the
            // client's code for it is one of `transport_failure`.
            Code::Unavailable,
        ),
    ];
    for (what, sec, want) in &cases {
        let results = call_every_ps_rpc(&mut auth_client(sec, &addr)).await;
        assert_eq!(results.len(), 16, "every RPC of ps.proto");
        for (rpc, got) in results {
            let ok = if *want == Code::Unavailable {
                transport_failure(got)
            } else {
                got == *want
            };
            assert!(ok, "{rpc} with {what}: {got:?}, expected {want:?}");
        }
    }
    // The plaintext client's exact answer, on the wire (deterministic).
    for _ in 0..5 {
        assert_eq!(plaintext_answer(rs.addr).await, PLAINTEXT_ANSWER);
    }
    // Nothing of the above reached the shard.
    assert!(rs.shard.list_tables().is_empty());
    assert_eq!(rs.shard.stats().dense_params, 0);
    assert_eq!(rs.shard.stats().rows_pushed, 0);
    let good = ClientSecurity::new(Some(tls), Some("t0ken")).unwrap();
    let results = call_every_ps_rpc(&mut auth_client(&good, &addr)).await;
    for (rpc, got) in &results {
        assert_ne!(*got, Code::Unauthenticated, "{rpc} with the right token");
        assert_ne!(*got, Code::Unavailable, "{rpc} with the right token");
    }
    let ok: Vec<&str> = results
        .iter()
        .filter(|(_, c)| *c == Code::Ok)
        .map(|(r, _)| *r)
        .collect();
    for rpc in ["CreateTable", "Pull", "Push", "Health", "Stats", "Shutdown"] {
        assert!(
            ok.contains(&rpc),
            "{rpc} failed with the right token: {results:?}"
        );
    }
    let tables: Vec<String> = rs
        .shard
        .list_tables()
        .into_iter()
        .filter_map(|t| t.config.map(|c| c.name))
        .collect();
    assert_eq!(tables, ["item"]);
    let _ = rs.shutdown().await;
}

/// The codes tonic gives a call whose connection the server closed before
/// answering (a plaintext client at a TLS port): UNAVAILABLE when the client
/// notices before sending, CANCELLED / UNKNOWN / INTERNAL when the HTTP/2
/// connection breaks under the request. None of them is a service's answer
/// (UNAUTHENTICATED, OK, INVALID_ARGUMENT, ...).
///
/// Which one is a race inside the client, not a choice of the server (whose
/// answer is always [`PLAINTEXT_ANSWER`]): INTERNAL when the client's HTTP/2
/// reader gets the alert while its request is open (the record's first bytes
/// read as a frame length of 0x150303 > the maximum frame size:
/// FRAME_SIZE_ERROR), CANCELLED when the connection is seen closed before
/// the request was dispatched, UNKNOWN when writing the request hits the
/// reset connection. Measured over 300 calls each (2-core machine):
/// fresh lazy channel 122 / 55 / 123, reused channel 158 / 40 / 102,
/// eager connect 49 / 112 / 139 (CANCELLED / INTERNAL / UNKNOWN).
fn transport_failure(c: Code) -> bool {
    matches!(
        c,
        Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal
    )
}

/// What the TLS server sends a plaintext HTTP/2 client, byte for byte: its
/// connection preface is not a TLS record (0x50 is no content type), so
/// rustls answers with one fatal alert record (type 21, version 3.3,
/// length 2: level fatal (2), `decode_error` (50)) and closes the
/// connection. Nothing reaches the service; no gRPC status is ever sent.
const PLAINTEXT_ANSWER: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32];

/// Sends the HTTP/2 connection preface in plaintext to `addr` and returns
/// everything the server answers until it closes the connection.
async fn plaintext_answer(addr: std::net::SocketAddr) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).unwrap();
        answer
    })
    .await
    .unwrap()
}
