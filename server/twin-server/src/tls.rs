//! TLS for the HTTP API: a rustls server configuration from a PEM certificate chain and key.
//!
//! rustls runs on the `ring` provider, named explicitly rather than left to a process-wide
//! default: the workspace builds no aws-lc-rs, and a default picked from whichever features
//! Cargo happened to unify would fail at the first handshake instead of at start. Errors name the
//! file at fault, so a wrong path or a key that belongs to another certificate stops the server
//! before it binds anything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_cert and tls_key go together: set both (--tls-cert and --tls-key) or neither")]
    Incomplete,
    #[error("reading TLS certificate {path}: {source}")]
    Cert {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS certificate {path} holds no PEM certificate")]
    NoCert { path: PathBuf },
    #[error("reading TLS key {path}: {source}")]
    Key {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS key {key} cannot serve certificate {cert}: {source}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// The certificate chain and key files, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Both paths or neither: one alone is a configuration mistake, not "TLS off".
    pub fn from_config(
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.to_owned(),
                key: key.to_owned(),
            })),
            (None, None) => Ok(None),
            _ => Err(TlsError::Incomplete),
        }
    }

    /// Reads both files and checks that the key belongs to the chain's first certificate.
    pub fn server_config(&self) -> Result<ServerConfig, TlsError> {
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Cert {
                path: self.cert.clone(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCert {
                path: self.cert.clone(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|source| TlsError::Key {
            path: self.key.clone(),
            source,
        })?;
        let mismatch = |source| TlsError::Mismatch {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        };
        ServerConfig::builder_with_provider(Arc::new(ring_provider()))
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_no_client_auth()
            // Fails when the key is not the one the leaf certificate was issued for.
            .with_single_cert(chain, key)
            .map_err(mismatch)
    }
}

/// rustls' ring provider. rustls 0.23.48 deprecated it because ring lacks the post-quantum
/// hybrid key exchange (X25519MLKEM768) that aws-lc-rs offers; ring is kept on purpose (its build
/// is a fraction of aws-lc-sys's C and CMake), with classical X25519 and ECDHE key exchange.
#[allow(deprecated)]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Whether tokens and data would cross a network in clear: a listener beyond loopback (the
/// unspecified address included) without TLS.
pub fn exposed_in_clear(listen: SocketAddr, tls: Option<&TlsFiles>) -> bool {
    tls.is_none() && !listen.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_pair(names: &[&str]) -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .expect("rcgen makes a certificate");
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, cert).expect("write cert");
        std::fs::write(&files.key, key).expect("write key");
        files
    }

    #[test]
    fn a_matching_certificate_and_key_make_a_configuration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = pem_pair(&["localhost"]);
        files(dir.path(), &cert, &key)
            .server_config()
            .expect("a matching pair is accepted");
    }

    #[test]
    fn each_bad_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = pem_pair(&["localhost"]);
        let (_, other_key) = pem_pair(&["localhost"]);
        let check = |files: TlsFiles, names: &Path, says: &str| {
            let err = files.server_config().unwrap_err().to_string();
            assert!(
                err.contains(&names.display().to_string()) && err.contains(says),
                "{err}"
            );
        };

        let good = files(dir.path(), &cert, &key);
        let missing = TlsFiles {
            cert: dir.path().join("absent.pem"),
            ..good.clone()
        };
        check(missing.clone(), &missing.cert, "No such file");

        let garbled = files(dir.path(), "not a certificate", &key);
        check(garbled.clone(), &garbled.cert, "no PEM certificate");

        let keyless = files(dir.path(), &cert, &cert);
        check(keyless.clone(), &keyless.key, "reading TLS key");

        let mismatched = files(dir.path(), &cert, &other_key);
        check(
            mismatched.clone(),
            &mismatched.key,
            "cannot serve certificate",
        );
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let only_cert = TlsFiles::from_config(Some(Path::new("c.pem")), None);
        assert!(matches!(only_cert, Err(TlsError::Incomplete)));
        assert_eq!(TlsFiles::from_config(None, None).expect("off"), None);
    }

    #[test]
    fn only_a_plain_listener_beyond_loopback_is_exposed() {
        let lan: SocketAddr = "0.0.0.0:7878".parse().expect("valid address");
        let local: SocketAddr = "[::1]:7878".parse().expect("valid address");
        let tls = TlsFiles {
            cert: "c.pem".into(),
            key: "k.pem".into(),
        };
        assert!(exposed_in_clear(lan, None));
        assert!(!exposed_in_clear(lan, Some(&tls)));
        assert!(!exposed_in_clear(local, None));
    }
}
