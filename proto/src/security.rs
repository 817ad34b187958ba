//! Transport security shared by every Ember gRPC endpoint (shards and the
//! training coordinator): TLS from PEM files (rustls, through tonic) and a
//! shared bearer token that an interceptor checks on every RPC.
//!
//! Secrets never come from command lines: the token is read from a file or
//! from the [`TOKEN_ENV`] environment variable, and no `Debug` output here
//! prints it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// Environment variable holding the bearer token when no token file is given.
pub const TOKEN_ENV: &str = "EMBER_AUTH_TOKEN";

/// The gRPC metadata key that carries the token: `authorization: Bearer <token>`.
pub const AUTH_HEADER: &str = "authorization";

/// The scheme before the token in the [`AUTH_HEADER`] value.
const BEARER_PREFIX: &str = "Bearer ";

/// The [`AUTH_HEADER`] value for `token`: `Bearer <token>`. An error when the
/// token cannot be a header value (not visible ASCII).
pub fn bearer_value(token: &str) -> Result<MetadataValue<Ascii>> {
    format!("{BEARER_PREFIX}{token}")
        .parse()
        .map_err(|_| SecurityError::Token {
            source_name: "the configuration".into(),
            reason: "it is not a valid header value".into(),
        })
}

/// Whether `metadata` carries `authorization: Bearer <token>` for exactly
/// this token (compared in constant time).
pub fn has_bearer(metadata: &MetadataMap, token: &str) -> bool {
    metadata
        .get(AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(BEARER_PREFIX))
        .is_some_and(|v| ct_eq(v.as_bytes(), token.as_bytes()))
}

/// Errors while loading certificates, keys or the token.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A file could not be read.
    #[error("reading {what} {path}: {source}")]
    Read {
        /// What the file is ("TLS certificate", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file that must be PEM is not.
    #[error("{what} {path} is not PEM (no `-----BEGIN` line)")]
    NotPem {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The token is empty or not a valid header value.
    #[error("auth token from {source_name}: {reason}")]
    Token {
        /// Where the token came from (a path or the environment variable).
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// tonic/rustls refused the TLS configuration.
    #[error("TLS setup for {what}: {reason}")]
    Tls {
        /// The endpoint or server being configured.
        what: String,
        /// rustls' or tonic's message.
        reason: String,
    },
    /// An address could not be turned into an endpoint.
    #[error("bad address {addr:?}: {reason}")]
    Address {
        /// The address as given.
        addr: String,
        /// Why it is bad.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, SecurityError>;

/// Reads a PEM file, checking that it looks like PEM.
pub fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(SecurityError::NotPem {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Reads the shared bearer token: from `file` when given, else from the
/// [`TOKEN_ENV`] environment variable; `None` when neither is set. Surrounding
/// whitespace is trimmed; an empty token or one that is not visible ASCII is an
/// error.
pub fn read_token(file: Option<&Path>) -> Result<Option<String>> {
    let (raw, source_name) = match file {
        Some(p) => (
            std::fs::read_to_string(p).map_err(|source| SecurityError::Read {
                what: "auth token file",
                path: p.to_path_buf(),
                source,
            })?,
            p.display().to_string(),
        ),
        None => match std::env::var(TOKEN_ENV) {
            Ok(t) => (t, format!("${TOKEN_ENV}")),
            Err(_) => return Ok(None),
        },
    };
    let t = raw.trim();
    if t.is_empty() {
        return Err(SecurityError::Token {
            source_name,
            reason: "it is empty".into(),
        });
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SecurityError::Token {
            source_name,
            reason: "it must be printable ASCII without spaces".into(),
        });
    }
    Ok(Some(t.to_string()))
}

/// PEM files of a TLS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// Certificate chain (leaf first).
    pub cert: PathBuf,
    /// Private key of the leaf certificate.
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// Reads the files into a tonic server TLS configuration.
    pub fn load(&self) -> Result<ServerTlsConfig> {
        let cert = read_pem("TLS certificate", &self.cert)?;
        let key = read_pem("TLS private key", &self.key)?;
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read_pem("client CA", ca)?));
        }
        Ok(cfg)
    }
}

/// PEM files of a TLS client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA that signed the servers' certificates.
    pub ca: PathBuf,
    /// Name to verify the server certificate against (default: the host of
    /// each address, which may be an IP address).
    pub domain: Option<String>,
    /// Client certificate and key, for servers that require mTLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTlsFiles {
    /// Reads the files into a tonic client TLS configuration.
    pub fn load(&self) -> Result<ClientTlsConfig> {
        let ca = read_pem("TLS CA certificate", &self.ca)?;
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        if let Some((c, k)) = &self.identity {
            let cert = read_pem("TLS client certificate", c)?;
            let key = read_pem("TLS client key", k)?;
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        Ok(cfg)
    }
}

/// Request extension set by [`TokenCheck`] on requests that carried the right
/// token (or on every request when no token is configured).
#[derive(Debug, Clone, Copy)]
pub struct Authenticated;

/// Compares two byte strings in time independent of where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server interceptor: with a token configured, every request must carry
/// `authorization: Bearer <token>`, else it is answered UNAUTHENTICATED before
/// any handler runs (so nothing changes). Without a token every request passes.
#[derive(Clone, Default)]
pub struct TokenCheck {
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCheck")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TokenCheck {
    /// A check for `token` (`None` = no authentication).
    pub fn new(token: Option<Arc<str>>) -> Self {
        TokenCheck { token }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(tok) = &self.token {
            if !has_bearer(req.metadata(), tok) {
                return Err(Status::unauthenticated(
                    "missing or wrong bearer token (send `authorization: Bearer <token>`)",
                ));
            }
        }
        req.extensions_mut().insert(Authenticated);
        Ok(req)
    }
}

/// Debug output of a security setting: whether TLS and a token are set, never
/// the secrets.
fn debug_settings(
    f: &mut std::fmt::Formatter<'_>,
    name: &str,
    tls: bool,
    token: bool,
) -> std::fmt::Result {
    f.debug_struct(name)
        .field("tls", &tls)
        .field("token", &token)
        .finish()
}

/// What a side lacks to be secure ("TLS", "auth token"); empty = secure.
fn missing_parts(tls: bool, token: bool) -> Vec<&'static str> {
    let mut m = Vec::new();
    if !tls {
        m.push("TLS");
    }
    if !token {
        m.push("auth token");
    }
    m
}

/// Security of a gRPC server: optional TLS and optional token.
#[derive(Clone, Default)]
pub struct ServerSecurity {
    /// TLS configuration; `None` = plaintext.
    pub tls: Option<ServerTlsConfig>,
    /// Shared bearer token; `None` = no authentication.
    pub token: Option<Arc<str>>,
}

impl std::fmt::Debug for ServerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_settings(
            f,
            "ServerSecurity",
            self.tls.is_some(),
            self.token.is_some(),
        )
    }
}

impl ServerSecurity {
    /// Loads TLS files (if any) and the token (file, else [`TOKEN_ENV`]).
    pub fn load(tls: Option<&ServerTlsFiles>, token_file: Option<&Path>) -> Result<Self> {
        Ok(ServerSecurity {
            tls: tls.map(ServerTlsFiles::load).transpose()?,
            token: read_token(token_file)?.map(Arc::from),
        })
    }

    /// What is missing for a secure server ("TLS", "auth token"); empty = secure.
    pub fn missing(&self) -> Vec<&'static str> {
        missing_parts(self.tls.is_some(), self.token.is_some())
    }

    /// The interceptor to wrap every service in.
    pub fn interceptor(&self) -> TokenCheck {
        TokenCheck::new(self.token.clone())
    }

    /// Applies TLS (if configured) to a tonic server builder.
    pub fn apply(
        &self,
        builder: tonic::transport::Server,
        what: &str,
    ) -> Result<tonic::transport::Server> {
        match &self.tls {
            Some(t) => builder
                .tls_config(t.clone())
                .map_err(|e| SecurityError::Tls {
                    what: what.to_string(),
                    reason: error_chain(&e),
                }),
            None => Ok(builder),
        }
    }
}

/// Security of a gRPC client: optional TLS and optional token.
#[derive(Clone, Default)]
pub struct ClientSecurity {
    /// TLS configuration; `None` = plaintext (`http://`).
    pub tls: Option<ClientTlsConfig>,
    /// `Bearer <token>` header value; `None` = no token sent.
    pub token: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_settings(
            f,
            "ClientSecurity",
            self.tls.is_some(),
            self.token.is_some(),
        )
    }
}

impl ClientSecurity {
    /// Plaintext, no token.
    pub fn insecure() -> Self {
        ClientSecurity::default()
    }

    /// Loads TLS files (if any) and the token (file, else [`TOKEN_ENV`]).
    pub fn load(tls: Option<&ClientTlsFiles>, token_file: Option<&Path>) -> Result<Self> {
        let token = read_token(token_file)?;
        ClientSecurity::new(tls.map(ClientTlsFiles::load).transpose()?, token.as_deref())
    }

    /// From an already built TLS config and a token.
    pub fn new(tls: Option<ClientTlsConfig>, token: Option<&str>) -> Result<Self> {
        let token = token.map(bearer_value).transpose()?;
        Ok(ClientSecurity { tls, token })
    }

    /// What is missing for a secure client ("TLS", "auth token"); empty = secure.
    pub fn missing(&self) -> Vec<&'static str> {
        missing_parts(self.tls.is_some(), self.token.is_some())
    }

    /// An endpoint for `addr` (`host:port`, or with an `http://`/`https://`
    /// scheme, which must match whether TLS is configured), with TLS applied.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint> {
        let bad = |reason: String| SecurityError::Address {
            addr: addr.to_string(),
            reason,
        };
        let hostport = if let Some(rest) = addr.strip_prefix("https://") {
            if self.tls.is_none() {
                return Err(bad("https:// address but no TLS CA configured".into()));
            }
            rest
        } else if let Some(rest) = addr.strip_prefix("http://") {
            if self.tls.is_some() {
                return Err(bad("http:// address but TLS is configured".into()));
            }
            rest
        } else {
            addr
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let ep = Endpoint::from_shared(format!("{scheme}://{hostport}"))
            .map_err(|e| bad(e.to_string()))?;
        match &self.tls {
            Some(t) => ep.tls_config(t.clone()).map_err(|e| SecurityError::Tls {
                what: addr.to_string(),
                reason: error_chain(&e),
            }),
            None => Ok(ep),
        }
    }

    /// Adds the `authorization` header (when a token is configured).
    pub fn authorize<T>(&self, req: &mut Request<T>) {
        self.interceptor().authorize(req);
    }

    /// A client interceptor that adds the `authorization` header to every
    /// request (for generated clients built `with_interceptor`).
    pub fn interceptor(&self) -> BearerAuth {
        BearerAuth {
            token: self.token.clone(),
        }
    }
}

/// Client interceptor adding `authorization: Bearer <token>`.
#[derive(Clone, Default)]
pub struct BearerAuth {
    token: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl BearerAuth {
    /// Adds the [`AUTH_HEADER`] to `req` (when a token is configured): the
    /// one place a client attaches the token.
    pub fn authorize<T>(&self, req: &mut Request<T>) {
        if let Some(t) = &self.token {
            req.metadata_mut().insert(AUTH_HEADER, t.clone());
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        self.authorize(&mut req);
        Ok(req)
    }
}

/// An error and its sources, joined by ": " (tonic's transport errors keep the
/// useful part in the source chain).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn token_check_rejects_missing_and_wrong_tokens() {
        let mut c = TokenCheck::new(Some(Arc::from("s3cret")));
        let e = c.call(Request::new(())).err().map(|s| s.code());
        assert_eq!(e, Some(tonic::Code::Unauthenticated));
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", "Bearer s3creT".parse().unwrap());
        assert!(c.call(r).is_err());
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        let ok = c.call(r).unwrap();
        assert!(ok.extensions().get::<Authenticated>().is_some());
        // No token configured: everything passes and is marked.
        let mut open = TokenCheck::new(None);
        assert!(open
            .call(Request::new(()))
            .unwrap()
            .extensions()
            .get::<Authenticated>()
            .is_some());
    }

    #[test]
    fn bearer_value_round_trips_through_the_check() {
        let v = bearer_value("s3cret").unwrap();
        assert_eq!(v.to_str().unwrap(), "Bearer s3cret");
        let mut req = Request::new(());
        ClientSecurity::new(None, Some("s3cret"))
            .unwrap()
            .authorize(&mut req);
        assert!(has_bearer(req.metadata(), "s3cret"));
        assert!(!has_bearer(req.metadata(), "s3cre"));
        assert!(!has_bearer(&MetadataMap::new(), "s3cret"));
        let mut c = TokenCheck::new(Some(Arc::from("s3cret")));
        assert!(c.call(req).is_ok());
        // A token that cannot be a header value is refused up front.
        assert!(bearer_value("a\nb").is_err());
    }

    #[test]
    fn token_file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("ember-sec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("nope");
        let e = read_token(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let empty = dir.join("empty");
        std::fs::write(&empty, "  \n").unwrap();
        let e = read_token(Some(&empty)).unwrap_err().to_string();
        assert!(
            e.contains("empty") && e.contains(&*empty.to_string_lossy()),
            "{e}"
        );
        let good = dir.join("good");
        std::fs::write(&good, "abc123\n").unwrap();
        assert_eq!(read_token(Some(&good)).unwrap().as_deref(), Some("abc123"));
        let notpem = dir.join("cert.pem");
        std::fs::write(&notpem, "hello").unwrap();
        let e = read_pem("TLS certificate", &notpem)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not PEM") && e.contains("cert.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn endpoint_scheme_follows_tls() {
        let plain = ClientSecurity::insecure();
        assert_eq!(
            plain.endpoint("127.0.0.1:5").unwrap().uri().scheme_str(),
            Some("http")
        );
        assert!(plain.endpoint("https://127.0.0.1:5").is_err());
        let tls = ClientSecurity {
            tls: Some(ClientTlsConfig::new()),
            token: None,
        };
        assert!(tls.endpoint("http://127.0.0.1:5").is_err());
        assert_eq!(tls.missing(), vec!["auth token"]);
        let dbg = format!(
            "{:?}",
            ClientSecurity::new(None, Some("topsecret")).unwrap()
        );
        assert!(!dbg.contains("topsecret"), "{dbg}");
    }
}
