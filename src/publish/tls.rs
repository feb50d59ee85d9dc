//! TLS for the broker connection: which roots are trusted. Apart from the connection so that
//! `check-config` and `doctor` can check a CA bundle without connecting.

use std::sync::Arc;

use crate::amazon_roots::is_amazon_root;
use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `mqtt.ca_file` could not be read or parsed.
    #[error("cannot read CA bundle {path}: {reason}")]
    CaFile {
        /// The bundle's path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// `mqtt.ca_file` parsed, but holds no certificate.
    #[error("CA bundle {0} holds no certificate")]
    EmptyCaFile(String),
    /// rustls refused the setup.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS client config: the built-in Amazon roots, or the operator's PEM bundle instead.
pub fn tls_config(ca_file: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    if ca_file.is_empty() {
        roots.extend(
            webpki_roots::TLS_SERVER_ROOTS
                .iter()
                .filter(|anchor| is_amazon_root(anchor.subject.as_ref()))
                .cloned(),
        );
    } else {
        let read_error = |reason: String| TlsError::CaFile {
            path: ca_file.to_owned(),
            reason,
        };
        for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| read_error(e.to_string()))? {
            let cert = cert.map_err(|e| read_error(e.to_string()))?;
            roots.add(cert).map_err(|e| read_error(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsError::EmptyCaFile(ca_file.to_owned()));
        }
    }
    client_config(roots)
}

/// A client config trusting `roots`, with ring (the crypto the AWS SDK side uses too).
fn client_config(roots: rustls::RootCertStore) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// TLS to an `https://` proxy: the system's roots, as the AWS SDK side uses them.
pub fn proxy_tls_config() -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(TlsError::EmptyCaFile("the system's CA bundle".into()));
    }
    client_config(roots)
}
