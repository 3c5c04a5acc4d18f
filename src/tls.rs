//! TLS for the registry listener: the certificate chain and key are read and checked once, at
//! config load, so a bad file is an error naming it (pingora's own loader panics instead), and
//! the listener is handed the parsed identity through a resolver. rustls with ring only.
//! Never imports the registry or the store.

use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// A certificate chain with its private key, ready to serve. Debug never shows the key.
#[derive(Clone)]
pub struct Identity(Arc<CertifiedKey>);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({} certificate(s), key <redacted>)", self.0.cert.len())
    }
}

fn provider() -> Arc<CryptoProvider> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default().cloned().expect("a crypto provider was just installed")
}

/// Reads and checks a PEM certificate chain and its PEM private key. Errors name the file at
/// fault: `Err((path, message))`.
pub fn load_identity(cert_path: &Path, key_path: &Path) -> Result<Identity, (String, String)> {
    let at = |p: &Path, m: String| (p.display().to_string(), m);
    let cert_pem = std::fs::read(cert_path).map_err(|e| at(cert_path, format!("cannot read: {e}")))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| at(cert_path, format!("not a PEM certificate chain: {e:?}")))?;
    if certs.is_empty() {
        return Err(at(cert_path, "contains no PEM certificate".into()));
    }
    let key_pem = std::fs::read(key_path).map_err(|e| at(key_path, format!("cannot read: {e}")))?;
    // The parse error is not shown: it could quote key material.
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| at(key_path, "contains no PEM private key (PKCS#8, PKCS#1 or SEC1)".into()))?;
    let provider = provider();
    let signing = provider.key_provider.load_private_key(key).map_err(|e| at(key_path, format!("private key not usable: {e}")))?;
    let ck = CertifiedKey::new(certs, signing);
    match ck.keys_match() {
        // A key type whose public half rustls cannot derive: the handshake will tell.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Identity(Arc::new(ck))),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err(at(key_path, format!("does not match the first certificate in {}", cert_path.display())))
        }
        Err(e) => Err(at(cert_path, format!("first certificate is not valid X.509: {e}"))),
    }
}

/// Serves the one identity to every client, whatever name it asks for.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// pingora listener settings for `identity`, offering h2 and http/1.1 by ALPN.
pub fn listener_settings(identity: &Identity) -> pingora::listeners::tls::TlsSettings {
    // The paths are never read: the resolver takes their place.
    let mut settings = pingora::listeners::tls::TlsSettings::intermediate("", "").expect("settings without files");
    settings.set_cert_resolver(Arc::new(Fixed(identity.0.clone())));
    settings.enable_h2();
    settings
}

/// Completes a TLS handshake with `addr`: the listener is bound and its TLS stack answers.
/// The certificate is not judged; this only tells that berth's own listener is up, and a bare
/// TCP connect would make it log a failed handshake.
pub async fn probe(addr: std::net::SocketAddr) -> bool {
    use pingora::tls::{ClientConfig, TlsConnector};
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.dangerous().with_custom_certificate_verifier(Arc::new(AnyCert(provider()))).with_no_client_auth());
    let Ok(config) = config else { return false };
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else { return false };
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let connect = TlsConnector::from(Arc::new(config)).connect(name, tcp);
    matches!(tokio::time::timeout(std::time::Duration::from_secs(2), connect).await, Ok(Ok(_)))
}

#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl pingora::tls::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<pingora::tls::ServerCertVerified, pingora::tls::RusTlsError> {
        Ok(pingora::tls::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &pingora::tls::DigitallySignedStruct,
    ) -> Result<pingora::tls::HandshakeSignatureValid, pingora::tls::RusTlsError> {
        Ok(pingora::tls::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &pingora::tls::DigitallySignedStruct,
    ) -> Result<pingora::tls::HandshakeSignatureValid, pingora::tls::RusTlsError> {
        Ok(pingora::tls::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<pingora::tls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let (path, msg) = load_identity(&cert, &key).unwrap_err();
        assert!(path.ends_with("cert.pem") && msg.contains("cannot read"), "{path}: {msg}");
        std::fs::write(&cert, "not pem\n").unwrap();
        let (path, msg) = load_identity(&cert, &key).unwrap_err();
        assert!(path.ends_with("cert.pem") && msg.contains("no PEM certificate"), "{path}: {msg}");
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let (path, msg) = load_identity(&cert, &key).unwrap_err();
        assert!(path.ends_with("key.pem") && msg.contains("not usable"), "{path}: {msg}");
    }
}
