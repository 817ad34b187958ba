//! Running a shard as a gRPC server: [`ServerConfig`], [`serve`] on a given
//! listener, and [`spawn`] which binds (port 0 allowed) and returns a
//! [`RunningShard`] with the bound addresses, for launchers and tests.

use crate::error::{PsError, Result};
use crate::service::PsService;
use crate::shard::{Shard, ShardConfig};
use ember_proto::security::{ServerSecurity, ServerTlsFiles};
use ember_proto::transport::{
    tune_endpoint, CONNECTION_WINDOW_BYTES, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, STREAM_WINDOW_BYTES,
};
use ember_proto::v1::parameter_server_server::ParameterServerServer;
use serde::Deserialize;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

/// A client endpoint for `http://addr` with the transport settings the
/// server uses ([`tune_endpoint`]: TCP_NODELAY, large HTTP/2 windows and
/// frames). Connect with `.connect().await` and raise the client's message
/// limits to match the server's `max_message_bytes`.
pub fn client_endpoint(addr: SocketAddr) -> Result<tonic::transport::Endpoint> {
    Ok(tune_endpoint(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| PsError::invalid(format!("endpoint for {addr}: {e}")))?,
    ))
}

/// The smallest non-zero `max_bytes`: one row of the narrowest table (a
/// dim-1 row and its index bucket). Tables check their own row size on creation.
pub const MIN_MAX_BYTES: u64 = 32;

/// Parses a byte size: a plain number of bytes or one with a suffix
/// `K`/`M`/`G`/`T` (powers of 1000) or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        u => {
            return Err(format!(
                "`{s}`: unknown unit `{u}` (use B, K, M, G, T, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a byte size (e.g. 8GiB, 500M, 1048576)"))?;
    let bytes = v * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// Everything a shard server needs. Deserializable from TOML (the
/// `--config` file uses these field names); every field has a default.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address (port 0 = any free port).
    pub listen: SocketAddr,
    /// Index of this shard.
    pub shard_index: u32,
    /// Number of shards.
    pub num_shards: u32,
    /// Checkpoint root directory.
    pub checkpoint_dir: Option<PathBuf>,
    /// Prometheus `/metrics` address (port 0 allowed); `None` = no exporter.
    pub metrics_addr: Option<SocketAddr>,
    /// Largest gRPC message in either direction.
    pub max_message_bytes: usize,
    /// Shared bearer token required on every RPC (`None` = no authentication).
    pub auth_token: Option<String>,
    /// File holding the token (read by [`ServerConfig::resolve_token`]).
    pub auth_token_file: Option<PathBuf>,
    /// Restore the latest good checkpoint at start (none found = start empty).
    pub restore: bool,
    /// Write a checkpoint with this step when the server stops.
    pub checkpoint_on_exit: Option<u64>,
    /// Delta checkpoints after a base before the next base (0 = bases only).
    pub max_deltas: u32,
    /// A base replaces a delta once the chain's delta rows would pass this
    /// percentage of the base's rows.
    pub delta_chain_percent: u32,
    /// Log format of the binary: "text" or "compact" (library ignores it).
    pub log_format: String,
    /// TLS certificate chain (PEM); with `tls_key`, the server speaks TLS only.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA for client certificates: when set, clients need one (mTLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Allow serving without TLS or without a token (the binary refuses to
    /// start otherwise; the library only warns).
    pub insecure: bool,
    /// Memory budget of the sparse tables in bytes (0 = unlimited); past it
    /// new rows replace cold ones instead of growing the shard.
    pub max_bytes: u64,
    /// Half-life in steps of a row's count in the eviction score (0 = default).
    pub evict_half_life_steps: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            shard_index: 0,
            num_shards: 1,
            checkpoint_dir: None,
            metrics_addr: None,
            max_message_bytes: MAX_MESSAGE_BYTES,
            auth_token: None,
            auth_token_file: None,
            restore: false,
            checkpoint_on_exit: None,
            max_deltas: crate::ckpt_chain::DeltaPolicy::default().max_deltas,
            delta_chain_percent: crate::ckpt_chain::DeltaPolicy::default().max_chain_percent,
            log_format: "text".into(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            insecure: false,
            max_bytes: 0,
            evict_half_life_steps: 0,
        }
    }
}

impl ServerConfig {
    /// A config for an in-process shard on `127.0.0.1:0`.
    pub fn local(shard_index: u32, num_shards: u32) -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            shard_index,
            num_shards,
            ..Default::default()
        }
    }

    /// Checks the config; the error names the bad field.
    pub fn validate(&self) -> Result<()> {
        if self.num_shards == 0 || self.shard_index >= self.num_shards {
            return Err(PsError::invalid(format!(
                "shard_index {} must be < num_shards {}",
                self.shard_index, self.num_shards
            )));
        }
        if self.max_message_bytes < 1024 {
            return Err(PsError::invalid("max_message_bytes must be >= 1024"));
        }
        if self.max_bytes > 0 && self.max_bytes < MIN_MAX_BYTES {
            return Err(PsError::invalid(format!(
                "max_bytes {} is smaller than one row (use 0 for no budget, or at least {MIN_MAX_BYTES})",
                self.max_bytes
            )));
        }
        if !matches!(self.log_format.as_str(), "text" | "compact") {
            return Err(PsError::invalid(format!(
                "log_format `{}` is not text or compact",
                self.log_format
            )));
        }
        if self.checkpoint_on_exit.is_some() && self.checkpoint_dir.is_none() {
            return Err(PsError::invalid("checkpoint_on_exit needs checkpoint_dir"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(PsError::invalid(
                "tls_cert and tls_key must be given together",
            ));
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(PsError::invalid(
                "tls_client_ca (mTLS) needs tls_cert and tls_key",
            ));
        }
        Ok(())
    }

    /// The TLS files, when TLS is configured.
    pub fn tls_files(&self) -> Option<ServerTlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            _ => None,
        }
    }

    /// Loads the TLS files and takes the (resolved) token. Errors name the file.
    pub fn security(&self) -> Result<ServerSecurity> {
        let tls = self
            .tls_files()
            .map(|f| f.load())
            .transpose()
            .map_err(|e| PsError::invalid(e.to_string()))?;
        Ok(ServerSecurity {
            tls,
            token: self.auth_token.as_deref().map(Arc::from),
        })
    }

    /// The binary's policy: TLS and a token, or an explicit `insecure`.
    /// Returns what is missing (empty = secure), or an error naming it when
    /// something is missing and `insecure` is off.
    pub fn check_secure(&self) -> Result<Vec<&'static str>> {
        let mut missing = Vec::new();
        if self.tls_cert.is_none() {
            missing.push("TLS (--tls-cert/--tls-key)");
        }
        if self.auth_token.is_none() {
            missing.push("an auth token (--auth-token-file or EMBER_AUTH_TOKEN)");
        }
        if !missing.is_empty() && !self.insecure {
            return Err(PsError::invalid(format!(
                "refusing to serve without {}; pass --insecure to allow it (testing or a trusted private network only)",
                missing.join(" and ")
            )));
        }
        Ok(missing)
    }

    /// Fills `auth_token` from `auth_token_file` (or the `EMBER_AUTH_TOKEN`
    /// environment variable when neither is set). Surrounding whitespace is
    /// trimmed; an empty token is an error naming its source.
    pub fn resolve_token(&mut self) -> Result<()> {
        if self.auth_token.is_none() {
            self.auth_token = ember_proto::security::read_token(self.auth_token_file.as_deref())
                .map_err(|e| PsError::invalid(e.to_string()))?;
        }
        if self
            .auth_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(PsError::invalid("auth token is empty"));
        }
        Ok(())
    }

    fn shard_config(&self) -> ShardConfig {
        ShardConfig {
            shard_index: self.shard_index,
            num_shards: self.num_shards,
            checkpoint_dir: self.checkpoint_dir.clone(),
            max_bytes: self.max_bytes,
            evict_half_life_steps: self.evict_half_life_steps,
            delta: crate::ckpt_chain::DeltaPolicy {
                max_deltas: self.max_deltas,
                max_chain_percent: self.delta_chain_percent,
            },
        }
    }
}

/// Loads and checks the TLS files (a bad certificate or key fails here, before
/// the server reports ready, with an error naming the file), then logs a
/// warning when `config` serves without TLS or without a token.
fn check_security(config: &ServerConfig) -> Result<()> {
    config
        .security()?
        .apply(tonic::transport::Server::builder(), "the shard server")
        .map_err(|e| {
            PsError::invalid(format!(
                "{e} (files: {:?}, {:?})",
                config.tls_cert, config.tls_key
            ))
        })?;
    let mut missing = Vec::new();
    if config.tls_cert.is_none() {
        missing.push("TLS");
    }
    if config.auth_token.is_none() {
        missing.push("an auth token");
    }
    if !missing.is_empty() {
        tracing::warn!(
            shard = config.shard_index,
            "INSECURE: serving without {} (every RPC, admin RPCs included, is open to anyone who can reach the port)",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// Builds the shard of a config, restoring the latest checkpoint if asked.
pub fn build_shard(config: &ServerConfig) -> Result<Arc<Shard>> {
    config.validate()?;
    let shard = Arc::new(Shard::new(config.shard_config())?);
    if config.restore {
        match shard.restore(0) {
            Ok((step, rows)) => tracing::info!(step, rows, "restored at start"),
            Err(PsError::NoCheckpoint(m)) => {
                tracing::warn!("--restore: no checkpoint {m}; starting empty")
            }
            Err(e) => return Err(e),
        }
    }
    crate::metrics::register_shard(&shard);
    Ok(shard)
}

/// Serves `shard` on `listener` until `shutdown` resolves or a Shutdown RPC
/// arrives; in-flight requests finish first. Writes the exit checkpoint if
/// configured. Does not start a metrics exporter (see [`spawn`]).
pub async fn serve_shard(
    shard: Arc<Shard>,
    config: &ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let security = config.security()?;
    let svc = PsService::new(
        shard.clone(),
        security.token.is_some(),
        config.max_message_bytes,
        stop_tx,
    );
    let server = ParameterServerServer::new(svc)
        .max_decoding_message_size(config.max_message_bytes.saturating_mul(2))
        .max_encoding_message_size(config.max_message_bytes);
    let svc = InterceptedService::new(server, security.interceptor());
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let signal = async move {
        tokio::select! {
            _ = shutdown => {},
            _ = stop_rx.wait_for(|v| *v) => {},
        }
    };
    let builder = security
        .apply(tonic::transport::Server::builder(), "the shard server")
        .map_err(|e| PsError::invalid(e.to_string()))?;
    builder
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, signal)
        .await
        .map_err(|e| PsError::Internal(format!("gRPC server failed: {e}")))?;
    if let Some(step) = config.checkpoint_on_exit {
        let s = shard.clone();
        tokio::task::spawn_blocking(move || s.checkpoint(step, 0))
            .await
            .map_err(|e| PsError::Internal(format!("exit checkpoint task failed: {e}")))??;
    }
    tracing::info!(shard = config.shard_index, "server stopped");
    Ok(())
}

/// Builds the shard of `config` (restoring if asked) and serves it on
/// `listener` until `shutdown` resolves (see [`serve_shard`]).
pub async fn serve(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    check_security(&config)?;
    let shard = build_shard(&config)?;
    serve_shard(shard, &config, listener, shutdown).await
}

/// A shard server started by [`spawn`].
pub struct RunningShard {
    /// Bound gRPC address.
    pub addr: SocketAddr,
    /// Bound metrics address, when an exporter was requested.
    pub metrics_addr: Option<SocketAddr>,
    /// The shard, for in-process access.
    pub shard: Arc<Shard>,
    stop: watch::Sender<bool>,
    /// The server task; resolves when the server stopped.
    pub join: JoinHandle<Result<()>>,
}

/// A cloneable handle that stops a [`RunningShard`].
#[derive(Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    /// Asks the server to stop (in-flight requests finish).
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

impl RunningShard {
    /// A handle that stops the server, usable after `join` is moved out.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.stop.clone())
    }

    /// Asks the server to stop (in-flight requests finish) without waiting.
    pub fn request_shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Stops the server and waits for it (and its exit checkpoint).
    pub async fn shutdown(self) -> Result<()> {
        self.stop.send_replace(true);
        self.join
            .await
            .map_err(|e| PsError::Internal(format!("server task failed: {e}")))?
    }
}

/// Binds `config.listen` (and `config.metrics_addr`), builds the shard and
/// serves it on a background task. Returns once the sockets are bound, so
/// clients may connect right away. Installs the process-wide metrics
/// exporter when `metrics_addr` is set (idempotent across shards).
pub async fn spawn(config: ServerConfig) -> Result<RunningShard> {
    check_security(&config)?;
    let shard = build_shard(&config)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| PsError::io(format!("binding {}", config.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| PsError::io("local address of the gRPC listener", e))?;
    let (stop, stop_rx) = watch::channel(false);
    let metrics_addr = match config.metrics_addr {
        Some(ma) => {
            let handle = crate::metrics::install_exporter()?;
            let ml = TcpListener::bind(ma)
                .await
                .map_err(|e| PsError::io(format!("binding metrics address {ma}"), e))?;
            let bound = ml
                .local_addr()
                .map_err(|e| PsError::io("local address of the metrics listener", e))?;
            let mut rx = stop_rx.clone();
            tokio::spawn(crate::metrics::serve_metrics(ml, handle, async move {
                let _ = rx.wait_for(|v| *v).await;
            }));
            Some(bound)
        }
        None => None,
    };
    let s = shard.clone();
    let mut rx = stop_rx;
    let stop_all = stop.clone();
    let join = tokio::spawn(async move {
        let r = serve_shard(s, &config, listener, async move {
            let _ = rx.wait_for(|v| *v).await;
        })
        .await;
        // Also stops the metrics endpoint after a Shutdown RPC.
        stop_all.send_replace(true);
        r
    });
    Ok(RunningShard {
        addr,
        metrics_addr,
        shard,
        stop,
        join,
    })
}
