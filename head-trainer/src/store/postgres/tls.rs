//! TLS to the database, with rustls.
//!
//! Whether TLS is used is the URL's `sslmode` (`disable`, `prefer` (the default) or
//! `require`), as with libpq. Unlike libpq's `prefer` and `require`, the server's certificate
//! is always verified (against `--database-ca-file` when given, the system's trust store
//! otherwise) and its name must match the URL's host: libpq's unverified modes would let
//! anyone on the path read every tenant's embeddings. A managed database whose certificate
//! comes from its own CA (RDS, Cloud SQL) needs that CA's file; a server with TLS off is
//! reached in plain text under `prefer`, and refused under `require`.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{Error, Result};

/// The connector every connection of the store (pool and listener) uses.
pub fn connector(ca_file: Option<&Path>) -> Result<MakeRustlsConnect> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<std::result::Result<Vec<_>, _>>)
                .map_err(|e| {
                    Error::InvalidArgument(format!("--database-ca-file {}: {e}", path.display()))
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::InvalidArgument(format!(
                    "--database-ca-file {}: no certificate in it",
                    path.display()
                )));
            }
        }
        None => {
            // Missing system certificates are not an error until a server asks for TLS.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidArgument(format!("database TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}
