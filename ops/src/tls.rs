//! TLS for every gRPC hop, from PEM files named by flags: a server's certificate and key
//! (`--tls-cert`, `--tls-key`), the CA its clients must present a certificate from
//! (`--tls-client-ca`, mutual TLS), and a client's trust (a CA file, or the system's roots)
//! and optional certificate. rustls underneath (tonic's `tls-ring`), so no OpenSSL.
//!
//! Files are read once, at start: a missing or malformed file stops the process with its
//! path and the flag that named it, instead of failing the first handshake.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {path}: no PEM block `-----BEGIN {want}` in it")]
    NotPem {
        flag: &'static str,
        path: PathBuf,
        want: &'static str,
    },
    #[error("{flag} {path}: {reason}")]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0} is given without {1}: both are needed")]
    Pair(&'static str, &'static str),
}

fn read_pem(flag: &'static str, path: &Path, want: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    // "CERTIFICATE" or any "... PRIVATE KEY" (PKCS#8, RSA, EC).
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.contains(want));
    if !found {
        return Err(TlsError::NotPem {
            flag,
            path: path.to_path_buf(),
            want,
        });
    }
    Ok(bytes)
}

/// A certificate chain and its key, as given by a pair of flags.
fn identity(
    cert: &Path,
    key: &Path,
    flags: (&'static str, &'static str),
) -> Result<Identity, TlsError> {
    Ok(Identity::from_pem(
        read_pem(flags.0, cert, "CERTIFICATE")?,
        read_pem(flags.1, key, "PRIVATE KEY")?,
    ))
}

/// What a server's TLS flags say.
#[derive(Clone, Debug, Default)]
pub struct ServerTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// tonic's config, or `None` for plaintext (no certificate given).
    pub fn config(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let (cert, key) = match (&self.cert, &self.key) {
            (None, None) if self.client_ca.is_some() => {
                return Err(TlsError::Pair(
                    "--tls-client-ca",
                    "--tls-cert and --tls-key",
                ));
            }
            (None, None) => return Ok(None),
            (Some(_), None) => return Err(TlsError::Pair("--tls-cert", "--tls-key")),
            (None, Some(_)) => return Err(TlsError::Pair("--tls-key", "--tls-cert")),
            (Some(c), Some(k)) => (c, k),
        };
        let mut config =
            ServerTlsConfig::new().identity(identity(cert, key, ("--tls-cert", "--tls-key"))?);
        if let Some(ca) = &self.client_ca {
            let ca = read_pem("--tls-client-ca", ca, "CERTIFICATE")?;
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(Some(config))
    }

    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

/// What a client's TLS flags say (used for `https://` servers only).
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// Trust this CA; the system's roots otherwise.
    pub ca: Option<PathBuf>,
    /// Our certificate and key, for a server that asks for one (mutual TLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The flags these came from, for messages (`--tls-ca` or `--features-tls-ca`, ...).
    pub flags: ClientTlsFlags,
}

/// The flag names of a [`ClientTls`], so that an error names what the user typed.
#[derive(Clone, Copy, Debug)]
pub struct ClientTlsFlags {
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
}

impl Default for ClientTlsFlags {
    fn default() -> Self {
        Self {
            ca: "--tls-ca",
            cert: "--tls-cert",
            key: "--tls-key",
        }
    }
}

impl ClientTls {
    /// tonic's config for a server whose certificate must name `domain`.
    pub fn config(&self, domain: &str) -> Result<ClientTlsConfig, TlsError> {
        let f = self.flags;
        let mut config = ClientTlsConfig::new().domain_name(domain);
        config = match &self.ca {
            Some(ca) => {
                config.ca_certificate(Certificate::from_pem(read_pem(f.ca, ca, "CERTIFICATE")?))
            }
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (None, None) => {}
            (Some(c), Some(k)) => config = config.identity(identity(c, k, (f.cert, f.key))?),
            (Some(_), None) => return Err(TlsError::Pair(f.cert, f.key)),
            (None, Some(_)) => return Err(TlsError::Pair(f.key, f.cert)),
        }
        Ok(config)
    }

    /// Checks the files now (a server validates its flags at start, before any connection).
    pub fn check(&self) -> Result<(), TlsError> {
        self.config("localhost").map(drop)
    }
}

/// A rustls server config from the same flags, for faces that tonic does not serve (the
/// HTTP API): the same certificate, and the same client CA when mutual TLS is asked for.
/// `None` for plaintext.
pub fn rustls_server_config(
    tls: &ServerTls,
    alpn: &[&[u8]],
) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;

    // Same checks, same messages as the gRPC face.
    if tls.config()?.is_none() {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Ok(None);
    };
    let invalid = |flag: &'static str, path: &Path, e: String| TlsError::Invalid {
        flag,
        path: path.to_path_buf(),
        reason: e,
    };
    let chain = CertificateDer::pem_slice_iter(&read_pem("--tls-cert", cert, "CERTIFICATE")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("--tls-cert", cert, e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&read_pem("--tls-key", key, "PRIVATE KEY")?)
        .map_err(|e| invalid("--tls-key", key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("--tls-cert", cert, e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in
                CertificateDer::pem_slice_iter(&read_pem("--tls-client-ca", ca, "CERTIFICATE")?)
            {
                let c = c.map_err(|e| invalid("--tls-client-ca", ca, e.to_string()))?;
                roots
                    .add(c)
                    .map_err(|e| invalid("--tls-client-ca", ca, e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| invalid("--tls-client-ca", ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| invalid("--tls-key", key, e.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Some(Arc::new(config)))
}
