//! Which CA roots the AWS API calls (Cognito, Secrets Manager, IoT) trust: the system's store
//! as the AWS SDK loads it, or, where the system has none (a static binary on Alpine,
//! Buildroot or Yocto without ca-certificates), the built-in Amazon roots every AWS endpoint
//! chains to. The MQTT side always uses the built-in ones (`publish::tls`).

use std::sync::OnceLock;

use aws_smithy_http_client::tls::{TlsContext, TrustStore};
use base64::Engine;
use rustls_pki_types::CertificateDer;

use crate::amazon_roots::is_amazon_root;

/// Where the AWS API calls' trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRoots {
    /// The system's CA store, with this many usable certificates.
    System { certificates: usize },
    /// The built-in Amazon roots, because the system store yielded no usable certificate
    /// (`why` says what the search found).
    BuiltIn { why: String },
}

impl ApiRoots {
    /// One line for `doctor` and the log.
    pub fn describe(&self) -> String {
        match self {
            ApiRoots::System { certificates } => {
                format!("the system's CA store ({certificates} certificates)")
            }
            ApiRoots::BuiltIn { why } => format!(
                "the built-in Amazon roots ({} certificates; no system CA store: {why})",
                amazon_root_certs().len()
            ),
        }
    }
}

/// The decision, from what the system store search returned: its certificates and the
/// errors met on the way. Any usable certificate means the system's store is used as is
/// (an operator's own roots, a TLS-inspecting proxy's CA); only an empty or unreadable store
/// falls back, so the built-in roots never widen a store the system has.
pub fn choose(system_certs: &[CertificateDer<'_>], errors: &[String]) -> ApiRoots {
    let mut store = rustls::RootCertStore::empty();
    let (usable, _unusable) = store.add_parsable_certificates(system_certs.iter().cloned());
    if usable > 0 {
        return ApiRoots::System {
            certificates: usable,
        };
    }
    let why = if !errors.is_empty() {
        errors.join("; ")
    } else if system_certs.is_empty() {
        "no certificate in the usual places (SSL_CERT_FILE or SSL_CERT_DIR name others)".to_owned()
    } else {
        format!("none of its {} certificates parses", system_certs.len())
    };
    ApiRoots::BuiltIn { why }
}

/// This process's choice: the system store is searched once (the SDK caches its own load
/// the same way) and a fallback is logged once.
pub fn api_roots() -> &'static ApiRoots {
    static ROOTS: OnceLock<ApiRoots> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        let roots = choose(&found.certs, &errors);
        if matches!(roots, ApiRoots::BuiltIn { .. }) {
            tracing::info!("AWS API calls trust {}", roots.describe());
        }
        roots
    })
}

/// The SDK's TLS settings for `roots`.
pub fn tls_context(roots: &ApiRoots) -> Result<TlsContext, ApiRootsError> {
    let store = match roots {
        ApiRoots::System { .. } => TrustStore::default(),
        ApiRoots::BuiltIn { .. } => amazon_root_certs()
            .iter()
            .fold(TrustStore::empty(), |store, cert| {
                store.with_pem_certificate(to_pem(cert))
            }),
    };
    TlsContext::builder()
        .with_trust_store(store)
        .build()
        .map_err(|e| ApiRootsError(e.to_string()))
}

/// The AWS SDK refused the trust store.
#[derive(Debug, thiserror::Error)]
#[error("the AWS SDK refused its TLS trust store: {0}")]
pub struct ApiRootsError(String);

/// Amazon Root CA 1–4 and Starfield Services Root G2 (which cross-signs Amazon Root CA 1), as
/// Mozilla ships them: the same roots the MQTT side trusts. Roots are self-signed, so a name
/// anywhere in the certificate is its subject's.
fn amazon_root_certs() -> Vec<&'static CertificateDer<'static>> {
    webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .filter(|cert| is_amazon_root(cert.as_ref()))
        .collect()
}

/// PEM, the only form the SDK's trust store takes.
fn to_pem(cert: &CertificateDer<'_>) -> String {
    let base64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in base64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn some_system_cert() -> CertificateDer<'static> {
        webpki_root_certs::TLS_SERVER_ROOT_CERTS[0].clone()
    }

    #[test]
    fn a_system_store_with_a_usable_certificate_is_used_as_is() {
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let roots = choose(
            &[some_system_cert(), garbage],
            &["failed to read one file".into()],
        );
        assert_eq!(roots, ApiRoots::System { certificates: 1 });
    }

    #[test]
    fn no_system_store_means_the_built_in_roots_and_says_why() {
        let ApiRoots::BuiltIn { why } = choose(&[], &[]) else {
            panic!("an empty store must fall back");
        };
        assert!(why.contains("no certificate in the usual places"), "{why}");

        let error = "failed to open file: /etc/ssl/cert.pem: Permission denied".to_owned();
        assert_eq!(
            choose(&[], std::slice::from_ref(&error)),
            ApiRoots::BuiltIn { why: error }
        );

        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let ApiRoots::BuiltIn { why } = choose(&[garbage], &[]) else {
            panic!("a store of unparsable certificates must fall back");
        };
        assert!(why.contains("none of its 1 certificates parses"), "{why}");
    }

    /// The five AWS roots, each also an anchor of the MQTT side's set (same key), and
    /// Starfield's other G2 root (not AWS's) left out.
    #[test]
    fn the_built_in_roots_are_the_amazon_ones_the_mqtt_side_trusts() {
        let certs = amazon_root_certs();
        assert_eq!(certs.len(), 5);
        let mqtt_keys: Vec<&[u8]> = webpki_roots::TLS_SERVER_ROOTS
            .iter()
            .filter(|anchor| is_amazon_root(anchor.subject.as_ref()))
            .map(|anchor| anchor.subject_public_key_info.as_ref())
            .collect();
        assert_eq!(mqtt_keys.len(), 5);
        for cert in &certs {
            let contains = |needle: &[u8]| cert.as_ref().windows(needle.len()).any(|w| w == needle);
            assert!(mqtt_keys.iter().any(|key| contains(key)));
            assert!(!contains(b"Starfield Root Certificate Authority"));
        }
        let names = [
            "Amazon Root CA 1",
            "Amazon Root CA 2",
            "Amazon Root CA 3",
            "Amazon Root CA 4",
            "Starfield Services Root Certificate Authority - G2",
        ];
        for name in names {
            let has_name = |cert: &&&CertificateDer<'_>| {
                cert.as_ref()
                    .windows(name.len())
                    .any(|w| w == name.as_bytes())
            };
            assert!(
                certs.iter().any(|cert| has_name(&cert)),
                "{name} is missing"
            );
        }
    }

    /// What the SDK does with the PEM (it panics on a certificate it cannot parse) gives back
    /// the same five roots.
    #[test]
    fn the_pem_form_parses_back_to_the_same_roots() {
        let mut store = rustls::RootCertStore::empty();
        for cert in amazon_root_certs() {
            let pem = to_pem(cert);
            assert!(pem.lines().all(|line| line.len() <= 64));
            let parsed: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("valid PEM");
            assert_eq!(parsed, vec![cert.clone()]);
            store.add(parsed[0].clone()).expect("a usable root");
        }
        assert_eq!(store.len(), 5);
        let built_in = ApiRoots::BuiltIn { why: "test".into() };
        assert!(tls_context(&built_in).is_ok());
        assert!(
            built_in
                .describe()
                .starts_with("the built-in Amazon roots (5 certificates")
        );
    }
}
