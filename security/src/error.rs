//! The crate's one error type.

use std::path::PathBuf;

use thiserror::Error;

/// Why certificate, key, token or policy material could not be used.
#[derive(Debug, Error)]
pub enum SecurityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable, or something malformed.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A certificate is not one Basalt issued, or is malformed, expired or not yet valid.
    #[error("certificate {what}: {message}")]
    Certificate {
        /// Which certificate (a path or a peer).
        what: String,
        /// What is wrong.
        message: String,
    },
    /// Generating a key or certificate failed.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// rustls refused the configuration (a key that does not match its certificate, say).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A file that would be overwritten already exists.
    #[error("{0} already exists; remove it first or pick another directory")]
    Exists(PathBuf),
    /// Bad input: a name, CIDR, duration or token that does not parse.
    #[error("{0}")]
    Invalid(String),
}

impl SecurityError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SecurityError::Io { path: path.into(), source }
    }
}
