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
