//! The roots AWS endpoints chain to, for both TLS clients: IoT Core's ATS endpoints (MQTT) and
//! the AWS APIs (Cognito, Secrets Manager, IoT) alike.

/// Amazon Root CA 1–4, and Starfield Services Root G2, which cross-signs Amazon Root CA 1.
/// Matched in a root's subject (or, roots being self-signed, anywhere in its certificate).
pub fn is_amazon_root(subject_der: &[u8]) -> bool {
    [b"Amazon Root CA".as_slice(), b"Starfield Services Root"]
        .iter()
        .any(|name| {
            subject_der
                .windows(name.len())
                .any(|window| window == *name)
        })
}
