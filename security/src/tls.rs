//! TLS 1.3 for every Basalt link, on rustls with the *ring* provider (installed explicitly:
//! nothing depends on a process-wide default).
//!
//! One [`TlsContext`] per process holds the trusted CA bundle and, for nodes and clients that
//! have one, its own certificate. It builds:
//!
//! - server configurations: one where a client certificate is optional (verified against the CA
//!   when present; tokens authenticate the rest) for the data protocol, gRPC and metrics, and
//!   one that requires a node certificate, for the Raft transport;
//! - client configurations per protocol (ALPN), presenting this party's certificate if it has
//!   one and verifying the server as a Basalt node: webpki against the CA, for the DNS name
//!   `node-<id>.basalt` of the node it meant to reach, or any node's name when it does not know
//!   which node an address belongs to (a seed).
//!
//! A node's port speaks several protocols; the client says which in ALPN ([`Protocol`]) and
//! [`TlsContext::accept`] reads the ClientHello first, so an allow-list or a protocol the port
//! does not serve is refused before any key exchange. Certificate and CA files are re-read
//! when they change ([`TlsContext::reload_if_changed`]): new connections use the new material,
//! open ones keep theirs.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{Acceptor, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use crate::error::SecurityError;
use crate::identity::{CertSummary, Identity, unix_now};
use crate::stream::{BufferedTcp, buffered};

/// What a connection speaks, as named in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// The framed block-I/O protocol (`basalt_proto::wire`).
    Data,
    /// The Raft transport between nodes.
    Raft,
    /// gRPC (HTTP/2): the admin API, snapshots, internal calls.
    Grpc,
    /// HTTP/1.1: the metrics endpoint.
    Http,
}

/// Why a ClientHello offering only `names` in ALPN is refused: another version of one of
/// Basalt's protocols is named as such, with the version this build speaks.
fn unserved(names: &[String]) -> String {
    for name in names {
        if let Some((family, _)) = name.split_once('/')
            && let Some(ours) = [Protocol::Data, Protocol::Raft]
                .into_iter()
                .map(|p| String::from_utf8_lossy(p.alpn()).into_owned())
                .find(|p| p.starts_with(&format!("{family}/")))
        {
            return format!(
                "the peer speaks {name}, this node speaks {ours}: run builds that share a protocol version (docs/operations.md, \"Rolling restarts and upgrades\")"
            );
        }
    }
    format!("no protocol this port serves was offered in ALPN (offered: {names:?})")
}

impl Protocol {
    /// The ALPN identifier. The version in the name is the protocol's: a peer speaking another
    /// version finds no common protocol and is refused at the handshake.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Protocol::Data => b"basalt-data/3",
            Protocol::Raft => b"basalt-raft/3",
            Protocol::Grpc => b"h2",
            Protocol::Http => b"http/1.1",
        }
    }

    /// Name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Data => "data",
            Protocol::Raft => "raft",
            Protocol::Grpc => "admin",
            Protocol::Http => "metrics",
        }
    }

    fn from_alpn(alpn: &[u8]) -> Option<Protocol> {
        [Protocol::Data, Protocol::Raft, Protocol::Grpc, Protocol::Http].into_iter().find(|p| p.alpn() == alpn)
    }
}

/// Which server a client expects to reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// This node.
    Node(u64),
    /// Any node of the cluster (an address given by the operator).
    AnyNode,
}

/// The server name standing for "any node"; never a real certificate name.
const ANY_NODE: &str = "any-node.basalt";

/// How long a peer may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a party's TLS material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA bundle (PEM; several certificates while a CA is being replaced).
    pub ca: PathBuf,
    /// Own certificate (PEM), if this party has one.
    pub cert: Option<PathBuf>,
    /// Own private key (PEM).
    pub key: Option<PathBuf>,
}

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let bytes = std::fs::read(path).map_err(|e| SecurityError::io(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SecurityError::Pem { path: path.to_path_buf(), message: format!("malformed PEM: {e}") })?;
    if certs.is_empty() {
        return Err(SecurityError::Pem { path: path.to_path_buf(), message: "holds no certificate".into() });
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, SecurityError> {
    let bytes = std::fs::read(path).map_err(|e| SecurityError::io(path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| SecurityError::Pem { path: path.to_path_buf(), message: format!("holds no private key: {e}") })
}

/// The crypto provider every configuration uses: *ring*, with AES-128-GCM preferred.
///
/// The handshake's key exchange (X25519, P-256) and the certificates' P-256 signatures give
/// 128-bit security; AES-256 would not raise that, and costs 14 rounds per block where
/// AES-128 costs 10, on every byte of every link. AES-128-GCM is also TLS 1.3's
/// mandatory-to-implement suite (RFC 8446 § 9.1).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};
    let mut provider = rustls::crypto::ring::default_provider();
    let tls12: Vec<_> = provider.cipher_suites.iter().filter(|s| s.version() == &rustls::version::TLS12).copied().collect();
    provider.cipher_suites = [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256].into_iter().chain(tls12).collect();
    Arc::new(provider)
}

/// Files' identity at load time: a change of any re-reads them all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Stamp(Vec<Option<(std::time::SystemTime, u64, u64)>>);

impl Stamp {
    fn of(files: &TlsFiles) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let paths = [Some(&files.ca), files.cert.as_ref(), files.key.as_ref()];
        Stamp(paths.into_iter().flatten().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))).collect())
    }
}

/// Configurations built from one reading of the files.
struct Configs {
    /// One per protocol (indexed by `Protocol as usize`), each naming only its protocol in
    /// ALPN: the handshake confirms the protocol [`TlsContext::accept`] chose, never another the
    /// client also offered.
    servers: [Arc<ServerConfig>; 4],
    clients: [Arc<ClientConfig>; 4],
    own: Option<CertSummary>,
    ca: Vec<CertSummary>,
    stamp: Stamp,
}

/// A party's TLS: its trusted CA, its own certificate, the configurations built from them.
pub struct TlsContext {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    configs: RwLock<Arc<Configs>>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext").field("files", &self.files).finish_non_exhaustive()
    }
}

/// A connection accepted by [`TlsContext::accept`].
pub struct Accepted {
    /// The TLS stream.
    pub stream: tokio_rustls::server::TlsStream<BufferedTcp>,
    /// What the client asked to speak.
    pub protocol: Protocol,
    /// Who the client's certificate names, if it presented one.
    pub identity: Option<Identity>,
}

/// Why an incoming connection was refused before it could speak.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// Not TLS at all.
    #[error("plaintext connection refused (this port speaks TLS only)")]
    Plaintext,
    /// Its protocol is not served here, or its peer may not use it (an allow-list).
    #[error("{0}")]
    Refused(String),
    /// The handshake failed: wrong CA, expired certificate, no common protocol.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// The peer said nothing, or too slowly.
    #[error("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
}

impl TlsContext {
    /// Loads `files`; fails if anything is missing, malformed, expired or mismatched.
    pub fn load(files: TlsFiles) -> Result<TlsContext, SecurityError> {
        let provider = provider();
        let configs = build(&files, &provider)?;
        Ok(TlsContext { files, provider, configs: RwLock::new(Arc::new(configs)) })
    }

    fn current(&self) -> Arc<Configs> {
        self.configs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The files this context reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// This party's own certificate, as last loaded.
    pub fn own_certificate(&self) -> Option<CertSummary> {
        self.current().own.clone()
    }

    /// The trusted CA certificates, as last loaded.
    pub fn ca_certificates(&self) -> Vec<CertSummary> {
        self.current().ca.clone()
    }

    /// Re-reads the files if any changed since they were last loaded. `Ok(true)`: new material
    /// in use. An error leaves the previous material in use (a half-written rotation, an
    /// expired replacement); the caller logs it and tries again later.
    pub fn reload_if_changed(&self) -> Result<bool, SecurityError> {
        let stamp = Stamp::of(&self.files);
        if stamp == self.current().stamp {
            return Ok(false);
        }
        let configs = build(&self.files, &self.provider)?;
        *self.configs.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(configs);
        Ok(true)
    }

    /// Accepts a TLS connection: reads the ClientHello, takes the first protocol it offers that
    /// `admit` lets this peer speak on this port (before any key exchange), then completes the
    /// handshake. Raft connections must present a node certificate.
    pub async fn accept(&self, tcp: TcpStream, admit: impl Fn(Protocol) -> Result<(), String>) -> Result<Accepted, AcceptError> {
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        // A TLS connection opens with a handshake record (content type 22).
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Err(_) => return Err(AcceptError::Timeout),
            Ok(Ok(1)) if first[0] == 0x16 => {}
            Ok(Ok(1)) => return Err(AcceptError::Plaintext),
            Ok(Ok(_)) => return Err(AcceptError::Handshake("closed before the handshake".into())),
            Ok(Err(e)) => return Err(AcceptError::Handshake(e.to_string())),
        }
        let start = match tokio::time::timeout_at(deadline, LazyConfigAcceptor::new(Acceptor::default(), buffered(tcp))).await {
            Err(_) => return Err(AcceptError::Timeout),
            Ok(Err(e)) => return Err(AcceptError::Handshake(e.to_string())),
            Ok(Ok(s)) => s,
        };
        let hello = start.client_hello();
        // Metrics scrapers may offer no ALPN at all: that is HTTP/1.1. A client offering
        // several (an HTTP client offers h2 and http/1.1) gets the first this port takes.
        let names: Vec<String> = hello.alpn().map(|a| a.map(|p| String::from_utf8_lossy(p).into_owned()).collect()).unwrap_or_default();
        let offered: Vec<Protocol> = match hello.alpn() {
            None => vec![Protocol::Http],
            Some(offered) => offered.filter_map(Protocol::from_alpn).collect(),
        };
        let Some(&first) = offered.first() else {
            return Err(AcceptError::Refused(unserved(&names)));
        };
        let protocol = match offered.iter().copied().find(|p| admit(*p).is_ok()) {
            Some(p) => p,
            None => return Err(AcceptError::Refused(admit(first).err().unwrap_or_default())),
        };
        let config = self.current().servers[protocol as usize].clone();
        let stream = match tokio::time::timeout_at(deadline, start.into_stream(config)).await {
            Err(_) => return Err(AcceptError::Timeout),
            Ok(Err(e)) => return Err(AcceptError::Handshake(e.to_string())),
            Ok(Ok(s)) => s,
        };
        let identity = peer_identity(stream.get_ref().1.peer_certificates());
        if protocol == Protocol::Raft && identity.as_ref().and_then(Identity::node).is_none() {
            return Err(AcceptError::Refused("the Raft transport takes node certificates only".into()));
        }
        Ok(Accepted { stream, protocol, identity })
    }

    /// Opens a TLS connection to `addr` speaking `protocol`, to the node `expect` names.
    pub async fn connect(&self, tcp: TcpStream, expect: Expect, protocol: Protocol) -> io::Result<tokio_rustls::client::TlsStream<BufferedTcp>> {
        let name = match expect {
            Expect::Node(id) => Identity::Node(id).dns_name(),
            Expect::AnyNode => ANY_NODE.to_string(),
        };
        let name = ServerName::try_from(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let config = self.current().clients[protocol as usize].clone();
        tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(config).connect(name, buffered(tcp)))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")))?
    }
}

/// The Basalt identity in a verified peer's certificate chain.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    let first = certs?.first()?;
    CertSummary::from_der(first, "peer").ok()?.identity
}

fn tls_err(e: impl std::fmt::Display) -> SecurityError {
    SecurityError::Tls(e.to_string())
}

fn build(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<Configs, SecurityError> {
    let stamp = Stamp::of(files);
    let now = unix_now();
    let ca_certs = read_certs(&files.ca)?;
    let mut roots = RootCertStore::empty();
    let mut ca = Vec::new();
    for der in &ca_certs {
        let summary = CertSummary::from_der(der, &files.ca.display().to_string())?;
        if !summary.is_ca {
            return Err(SecurityError::Certificate {
                what: files.ca.display().to_string(),
                message: format!("{} is not a CA certificate", summary.subject),
            });
        }
        roots.add(der.clone()).map_err(|e| SecurityError::Certificate { what: files.ca.display().to_string(), message: e.to_string() })?;
        ca.push(summary);
    }
    let roots = Arc::new(roots);

    let own = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            let summary = CertSummary::from_der(&chain[0], &cert.display().to_string())?;
            summary.check_valid_at(now, &cert.display().to_string())?;
            if summary.identity.is_none() {
                return Err(SecurityError::Certificate {
                    what: cert.display().to_string(),
                    message: "names no Basalt node or client (issue it with `basalt cert issue`)".into(),
                });
            }
            let certified = CertifiedKey::from_der(chain, read_key(key)?, provider)
                .map_err(|e| SecurityError::Tls(format!("{} and {}: {e}", cert.display(), key.display())))?;
            Some((Arc::new(certified), summary))
        }
        (None, None) => None,
        _ => {
            return Err(SecurityError::Invalid("a certificate needs its key and a key its certificate".into()));
        }
    };

    let versions = &[&rustls::version::TLS13];
    let optional = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).allow_unauthenticated().build().map_err(tls_err)?;
    let required = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build().map_err(tls_err)?;
    let server = |verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>, alpn: Vec<Vec<u8>>| -> Result<Arc<ServerConfig>, SecurityError> {
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier);
        let mut config = match &own {
            Some((key, _)) => builder.with_cert_resolver(Arc::new(Own(key.clone()))),
            // A party without a certificate cannot serve; such a config is never used to.
            None => builder.with_cert_resolver(Arc::new(NoServerCert)),
        };
        config.alpn_protocols = alpn;
        Ok(Arc::new(config))
    };
    let only = |p: Protocol| vec![p.alpn().to_vec()];
    let servers = [
        server(optional.clone(), only(Protocol::Data))?,
        server(required, only(Protocol::Raft))?,
        server(optional.clone(), only(Protocol::Grpc))?,
        server(optional, only(Protocol::Http))?,
    ];

    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build().map_err(tls_err)?;
    let verifier = Arc::new(NodeVerifier { inner: webpki });
    let client = |protocol: Protocol| -> Result<Arc<ClientConfig>, SecurityError> {
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone());
        let mut config = match &own {
            Some((key, _)) => builder.with_client_cert_resolver(Arc::new(Own(key.clone()))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![protocol.alpn().to_vec()];
        Ok(Arc::new(config))
    };
    let clients = [client(Protocol::Data)?, client(Protocol::Raft)?, client(Protocol::Grpc)?, client(Protocol::Http)?];
    Ok(Configs { servers, clients, own: own.map(|(_, s)| s), ca, stamp })
}

/// This party's certificate, presented as server and as client. Reloading builds new
/// configurations around a new one.
#[derive(Debug)]
struct Own(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Own {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Own {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// For parties without a certificate (a CLI): refuses to serve.
#[derive(Debug)]
struct NoServerCert;

impl rustls::server::ResolvesServerCert for NoServerCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// webpki verification against the cluster CA, for the node the client meant to reach — or,
/// for [`Expect::AnyNode`], for whichever node the certificate names.
#[derive(Debug)]
struct NodeVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let any = matches!(server_name, ServerName::DnsName(n) if n.as_ref() == ANY_NODE);
        if !any {
            return self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        }
        let node = CertSummary::from_der(end_entity, "server")
            .ok()
            .and_then(|s| s.identity)
            .filter(|i| i.node().is_some())
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))?;
        let name = ServerName::try_from(node.dns_name()).map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_version_of_a_basalt_protocol_is_refused_naming_both() {
        let m = unserved(&["basalt-raft/4".to_string()]);
        assert!(m.contains("the peer speaks basalt-raft/4, this node speaks basalt-raft/3"), "{m}");
        let m = unserved(&["basalt-data/2".to_string(), "h2".to_string()]);
        assert!(m.contains("basalt-data/2") && m.contains("basalt-data/3"), "{m}");
        let m = unserved(&["spdy/3".to_string()]);
        assert!(m.contains("no protocol this port serves") && m.contains("spdy/3"), "{m}");
    }
}
