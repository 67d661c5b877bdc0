//! TLS for the gRPC port (rustls with the ring provider, through tonic): the `[tls]` settings
//! and the loading of the PEM certificate chain and private key they name.
//!
//! No certificate configured: the server speaks plaintext HTTP/2 (the default address is
//! loopback). Both files configured: every connection must complete a TLS handshake (ALPN
//! `h2`); a plaintext client fails to connect. The files are read and checked once, before the
//! database is opened, so a missing or malformed file stops `twin serve` with exit 2 naming the
//! file and the reason.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tonic::transport::{Identity, ServerTlsConfig};

/// The `[tls]` settings: both files or neither.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file with the server's certificate chain, leaf first (default: none, plaintext).
    pub cert_file: Option<PathBuf>,
    /// PEM file with the private key of the leaf certificate: PKCS#8, PKCS#1 (RSA) or SEC1 (EC)
    /// (default: none, plaintext).
    pub key_file: Option<PathBuf>,
}

/// Why the TLS settings or files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// One file is configured without the other.
    #[error("{missing}: must be set together with {present}")]
    Incomplete {
        /// The setting that is set, as `tls.cert_file`.
        present: &'static str,
        /// The setting that is missing.
        missing: &'static str,
    },
    /// A file could not be read.
    #[error("{path}: cannot read the tls {what}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not the PEM it should be.
    #[error("{path}: invalid tls {what}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the pair (for example a key that does not match the certificate).
    #[error("{cert_file} with {key_file}: tls refused the certificate and key: {reason}")]
    Refused {
        /// The certificate file.
        cert_file: PathBuf,
        /// The key file.
        key_file: PathBuf,
        /// rustls' reason, through tonic.
        reason: String,
    },
}

/// A certificate chain and key read from their files and checked to be PEM of the right kind.
#[derive(Debug, Clone)]
pub struct LoadedTls {
    /// The certificate file.
    pub cert_file: PathBuf,
    /// The key file.
    pub key_file: PathBuf,
    /// How many certificates the chain holds.
    pub chain_len: usize,
    config: ServerTlsConfig,
}

impl LoadedTls {
    /// The server TLS config for tonic.
    pub fn server_config(&self) -> ServerTlsConfig {
        self.config.clone()
    }
}

impl TlsConfig {
    /// Whether TLS is configured (both files set).
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }

    /// When one file is set without the other: the missing setting and the one set, as
    /// `("tls.key_file", "tls.cert_file")`.
    pub fn incomplete(&self) -> Option<(&'static str, &'static str)> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Some(("tls.key_file", "tls.cert_file")),
            (None, Some(_)) => Some(("tls.cert_file", "tls.key_file")),
            _ => None,
        }
    }

    /// Adds, under the `[tls]` table of `print-config`'s text, the unset settings as comments
    /// (an unset `Option` has no TOML form), so the output shows how to turn TLS on.
    pub fn annotate(&self, text: String) -> String {
        if self.cert_file.is_some() || self.key_file.is_some() {
            return text;
        }
        text.replacen(
            "[tls]\n",
            "[tls]\n# unset: plaintext gRPC; set both to serve TLS\n\
             # cert_file = \"/etc/twin/server.pem\"\n# key_file = \"/etc/twin/server.key\"\n",
            1,
        )
    }

    /// Reads and checks the files: `None` when TLS is not configured.
    ///
    /// # Errors
    /// `Incomplete`, `Read` for a file that cannot be read, `Invalid` for a certificate file
    /// without a PEM certificate or a key file without a PEM private key, `Refused` when rustls
    /// refuses the pair (a key that does not belong to the certificate).
    pub fn load(&self) -> Result<Option<LoadedTls>, TlsError> {
        if let Some((missing, present)) = self.incomplete() {
            return Err(TlsError::Incomplete { present, missing });
        }
        let (Some(cert_file), Some(key_file)) = (&self.cert_file, &self.key_file) else {
            return Ok(None);
        };
        let cert_pem = read(cert_file, "certificate")?;
        let key_pem = read(key_file, "private key")?;
        let chain_len = check_certificates(&cert_pem).map_err(|reason| TlsError::Invalid {
            path: cert_file.clone(),
            what: "certificate",
            reason,
        })?;
        check_private_key(&key_pem).map_err(|reason| TlsError::Invalid {
            path: key_file.clone(),
            what: "private key",
            reason,
        })?;
        let config = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
        let loaded = LoadedTls {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            chain_len,
            config,
        };
        // rustls checks the pair when the acceptor is built: do it now, before anything opens.
        loaded.apply(tonic::transport::Server::builder())?;
        Ok(Some(loaded))
    }
}

impl LoadedTls {
    /// Applies the TLS config to a server builder; rustls checks the pair here (a key that
    /// does not belong to the certificate is refused).
    ///
    /// # Errors
    /// `Refused` with rustls' reason.
    pub fn apply<L>(&self, builder: tonic::transport::Server<L>) -> Result<tonic::transport::Server<L>, TlsError> {
        builder
            .tls_config(self.server_config())
            .map_err(|error| TlsError::Refused {
                cert_file: self.cert_file.clone(),
                key_file: self.key_file.clone(),
                reason: error_chain(&error),
            })
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        what,
        source,
    })
}

/// How many PEM certificates `pem` holds; at least one, and nothing malformed.
fn check_certificates(pem: &[u8]) -> Result<usize, String> {
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(pem) {
        certificate.map_err(|error| format!("malformed PEM: {error}"))?;
        count += 1;
    }
    if count == 0 {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) found".to_owned());
    }
    Ok(count)
}

fn check_private_key(pem: &[u8]) -> Result<(), String> {
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(_) => Ok(()),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            Err("no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) found".to_owned())
        }
        Err(error) => Err(format!("malformed PEM: {error}")),
    }
}

/// The error and its sources, joined with `: ` (tonic's transport error hides the rustls
/// reason in its source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neither_file_is_plaintext_and_one_alone_names_the_missing_setting() {
        assert!(TlsConfig::default().load().expect("plaintext").is_none());
        let cert_only = TlsConfig {
            cert_file: Some(PathBuf::from("server.pem")),
            key_file: None,
        };
        let error = cert_only.load().expect_err("incomplete");
        assert_eq!(
            error.to_string(),
            "tls.key_file: must be set together with tls.cert_file"
        );
        let key_only = TlsConfig {
            cert_file: None,
            key_file: Some(PathBuf::from("server.key")),
        };
        assert_eq!(key_only.incomplete(), Some(("tls.cert_file", "tls.key_file")));
    }

    #[test]
    fn a_config_file_with_one_tls_file_names_the_missing_setting() {
        let path = Path::new("x.toml");
        let error = crate::serve::ServeConfig::parse("[tls]\nkey_file = \"k.pem\"\n", path).expect_err("incomplete");
        assert_eq!(
            error.to_string(),
            "x.toml: tls.cert_file: must be set together with tls.key_file"
        );
        let both = "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n";
        let config = crate::serve::ServeConfig::parse(both, path).expect("both");
        assert!(config.tls.enabled());
        assert!(!crate::serve::ServeConfig::default().tls.enabled());
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        let missing = TlsConfig {
            cert_file: Some(dir.path().join("missing.pem")),
            key_file: Some(garbage.clone()),
        };
        let error = missing.load().expect_err("missing").to_string();
        assert!(
            error.contains("missing.pem: cannot read the tls certificate"),
            "{error}"
        );
        let not_pem = TlsConfig {
            cert_file: Some(garbage.clone()),
            key_file: Some(garbage.clone()),
        };
        let error = not_pem.load().expect_err("not pem").to_string();
        assert!(
            error.contains("garbage.pem: invalid tls certificate: no PEM certificate"),
            "{error}"
        );
    }
}
