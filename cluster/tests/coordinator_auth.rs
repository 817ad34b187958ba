//! The coordinator service (ember.v1.Coordinator) over real gRPC with TLS and
//! a bearer token: every RPC x {no token, wrong token, plaintext client} gets
//! its exact status and reaches nothing; the right token reaches every RPC.

use std::time::{Duration, Instant};

use ember_cluster::coordinator::{serve, Coordinator, CoordinatorSettings};
use ember_proto::pki::write_test_pki;
use ember_proto::security::{
    BearerAuth, ClientSecurity, ClientTlsFiles, ServerSecurity, ServerTlsFiles,
};
use ember_proto::v1::coordinator_client::CoordinatorClient;
use ember_proto::v1::*;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

type Client = CoordinatorClient<InterceptedService<Channel, BearerAuth>>;

fn client(sec: &ClientSecurity, addr: &str) -> Client {
    let ch = sec
        .endpoint(addr)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    CoordinatorClient::with_interceptor(ch, sec.interceptor())
}

/// Calls every RPC of the coordinator once; each RPC's name and status code.
async fn call_every_rpc(c: &mut Client, attempt: u64) -> Vec<(&'static str, Code)> {
    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
    }
    vec![
        (
            "NextTask",
            code(
                c.next_task(NextTaskRequest {
                    worker_index: 0,
                    num_workers: 1,
                    worker_id: "w0".into(),
                })
                .await,
            ),
        ),
        (
            "ReportProgress",
            code(
                c.report_progress(ReportProgressRequest {
                    worker_index: 0,
                    attempt,
                    steps: 1,
                    samples: 1,
                    loss: 0.5,
                })
                .await,
            ),
        ),
        (
            "ReportDone",
            code(
                c.report_done(ReportDoneRequest {
                    worker_index: 0,
                    attempt,
                    report: Some(TaskReport::default()),
                })
                .await,
            ),
        ),
        (
            "ReportFailure",
            code(
                c.report_failure(ReportFailureRequest {
                    worker_index: 0,
                    attempt,
                    error: "x".into(),
                    deterministic: false,
                })
                .await,
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_coordinator_rpc_x_every_bad_credential_gets_its_exact_status() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_test_pki(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "c00rd-token\n").unwrap();
    let security = ServerSecurity::load(
        Some(&ServerTlsFiles {
            cert: files.server_cert.clone(),
            key: files.server_key.clone(),
            client_ca: None,
        }),
        Some(&token),
    )
    .unwrap();
    let coord = Coordinator::new(CoordinatorSettings {
        num_workers: 1,
        worker_timeout: Duration::from_secs(60),
        start_timeout: Duration::from_secs(60),
        wait_ms: 100,
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let attempt = coord.publish(1, 0, 5, 0, &["s:1".into()], tx, Instant::now());
    let server = serve(coord.clone(), "127.0.0.1:0", &security)
        .await
        .unwrap();
    let addr = server.addr.to_string();
    let tls = ClientTlsFiles {
        ca: files.ca.clone(),
        domain: None,
        identity: None,
    }
    .load()
    .unwrap();
    let cases = [
        (
            "no token",
            ClientSecurity::new(Some(tls.clone()), None).unwrap(),
            Code::Unauthenticated,
        ),
        (
            "wrong token",
            ClientSecurity::new(Some(tls.clone()), Some("c00rd-token-not")).unwrap(),
            Code::Unauthenticated,
        ),
        (
            "plaintext client",
            ClientSecurity::new(None, Some("c00rd-token")).unwrap(),
            // The TLS server drops the plaintext HTTP/2 connection during
            // its handshake; the client's code depends on when it notices
            // (see `transport_failure`). Never a service answer.
            Code::Unavailable,
        ),
    ];
    for (what, sec, want) in &cases {
        let results = call_every_rpc(&mut client(sec, &addr), attempt).await;
        assert_eq!(results.len(), 4, "every RPC of coordinator.proto");
        for (rpc, got) in results {
            let ok = if *want == Code::Unavailable {
                transport_failure(got)
            } else {
                got == *want
            };
            assert!(ok, "{rpc} with {what}: {got:?}, expected {want:?}");
        }
    }
    // Nothing reached the coordinator: no event, nobody holds the task.
    assert!(rx.try_recv().is_err());
    assert!(coord
        .unsettled(Instant::now(), Duration::from_secs(5))
        .is_empty());
    let good = ClientSecurity::new(Some(tls), Some("c00rd-token")).unwrap();
    let results = call_every_rpc(&mut client(&good, &addr), attempt).await;
    for (rpc, got) in &results {
        assert_eq!(*got, Code::Ok, "{rpc} with the right token: {results:?}");
    }
    // ... and they arrived: a progress event and the task handed out.
    assert!(rx.try_iter().count() >= 1);
    drop(server);
}

/// The codes tonic gives a call whose connection the server closed before
/// answering (a plaintext client at a TLS port): UNAVAILABLE when the client
/// notices before sending, CANCELLED / UNKNOWN / INTERNAL when the HTTP/2
/// connection breaks under the request. None of them is a service's answer
/// (UNAUTHENTICATED, OK, INVALID_ARGUMENT, ...).
fn transport_failure(c: Code) -> bool {
    matches!(
        c,
        Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal
    )
}
