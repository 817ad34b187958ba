//! `ember-healthcheck`: the container HEALTHCHECK of the Ember images.
//!
//! Neither image has a shell-less way to probe a port (the local image is
//! `FROM scratch`: no shell, no curl), so this std-only program is compiled
//! with plain `rustc` next to the other binaries (Dockerfile builder stage,
//! `scripts/build-image.sh`).
//!
//! Usage: `ember-healthcheck [TARGET...]`, where a TARGET is
//! - `host:port`: a TCP connect must succeed (the shard's gRPC port), or
//! - `http://host:port/path`: a GET must answer `200` (the metrics endpoint).
//!
//! Without arguments the targets come from `$EMBER_HEALTHCHECK`
//! (space-separated), else `127.0.0.1:50051 http://127.0.0.1:9100/metrics`,
//! i.e. a `ps-server` started with the image's default ports. Exit status 0
//! when every target is healthy, 1 otherwise (the reason goes to stderr).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT: &str = "127.0.0.1:50051 http://127.0.0.1:9100/metrics";

fn connect(hostport: &str) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{hostport}: cannot resolve: {e}"))?
        .collect();
    let mut last = format!("{hostport}: no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("{hostport} ({a}): {e}"),
        }
    }
    Err(last)
}

fn check_http(url: &str) -> Result<(), String> {
    let rest = &url["http://".len()..];
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = connect(hostport)?;
    s.set_read_timeout(Some(TIMEOUT)).ok();
    s.set_write_timeout(Some(TIMEOUT)).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{url}: {e}"))?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| format!("{url}: {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status == "200" {
        Ok(())
    } else {
        Err(format!(
            "{url}: status {:?}",
            line.lines().next().unwrap_or("")
        ))
    }
}

fn check(target: &str) -> Result<(), String> {
    if target.starts_with("http://") {
        check_http(target)
    } else {
        connect(target).map(drop)
    }
}

fn main() {
    let mut targets: Vec<String> = std::env::args().skip(1).collect();
    if targets.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: ember-healthcheck [host:port | http://host:port/path]...");
        println!("default: $EMBER_HEALTHCHECK or \"{DEFAULT}\"");
        return;
    }
    if targets.is_empty() {
        let env = std::env::var("EMBER_HEALTHCHECK").unwrap_or_else(|_| DEFAULT.to_string());
        targets = env.split_whitespace().map(String::from).collect();
    }
    let mut ok = true;
    for t in &targets {
        if let Err(e) = check(t) {
            eprintln!("unhealthy: {e}");
            ok = false;
        }
    }
    std::process::exit(if ok { 0 } else { 1 });
}
