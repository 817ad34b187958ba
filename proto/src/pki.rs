//! A throw-away PKI for tests, local clusters and first deployments: one CA,
//! a server certificate for the given host names / IP addresses, and a client
//! certificate (for mTLS), written as PEM files with private keys at mode
//! 0600. Built on `rcgen` (feature `pki`). Production deployments should use
//! their own CA (cert-manager, Vault, ...); the file layout is the same.

use std::path::{Path, PathBuf};

/// Errors while generating or writing the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused a name or failed to sign.
    #[error("generating certificates: {0}")]
    Generate(String),
    /// The OS random source failed.
    #[error("reading random bytes from /dev/urandom: {0}")]
    Random(std::io::Error),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Paths of the files written by [`write_test_pki`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiFiles {
    /// CA certificate (give it to clients as `--tls-ca`).
    pub ca: PathBuf,
    /// CA private key (keep it to sign more certificates; never deploy it).
    pub ca_key: PathBuf,
    /// Server certificate (signed by the CA).
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
    /// Client certificate for mTLS.
    pub client_cert: PathBuf,
    /// Client private key.
    pub client_key: PathBuf,
}

impl PkiFiles {
    /// The file names used under `dir`.
    pub fn under(dir: &Path) -> Self {
        PkiFiles {
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

fn gen_err(e: rcgen::Error) -> PkiError {
    PkiError::Generate(e.to_string())
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(path).map_err(err)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(err)
}

/// Generates a CA, a server certificate valid for `hosts` (DNS names,
/// wildcards such as `*.ps.default.svc.cluster.local`, or IP addresses) and a
/// client certificate, and writes them under `dir` (created if missing).
pub fn write_test_pki(dir: &Path, hosts: &[String]) -> Result<PkiFiles, PkiError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let files = PkiFiles::under(dir);

    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Ember test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(gen_err)?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut p = CertificateParams::new(names).map_err(gen_err)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.use_authority_key_identifier_extension = true;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &issuer).map_err(gen_err)?;
        Ok::<_, PkiError>((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(
        hosts.to_vec(),
        "ember server",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_pem, client_key) = leaf(
        vec!["ember-client".to_string()],
        "ember client",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    write(&files.ca, &ca_pem, false)?;
    write(&files.ca_key, &ca_key_pem, true)?;
    write(&files.server_cert, &server_pem, false)?;
    write(&files.server_key, &server_key, true)?;
    write(&files.client_cert, &client_pem, false)?;
    write(&files.client_key, &client_key, true)?;
    Ok(files)
}

/// Writes a random 256-bit bearer token (hex) to `path` with mode 0600.
pub fn write_token(path: &Path) -> Result<String, PkiError> {
    let mut bytes = [0u8; 32];
    {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(PkiError::Random)?;
    }
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write(path, &format!("{token}\n"), true)?;
    Ok(token)
}
