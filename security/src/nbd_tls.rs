//! TLS for NBD exports (NBD proto.md § TLS support): the certificate directory QEMU's
//! `tls-creds-x509` object and libnbd's `tls-certificates` read, and the server configuration
//! `basalt attach --nbd-tls-dir` serves NBD_OPT_STARTTLS with.
//!
//! The directory uses QEMU's x509 layout: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
//! `client-cert.pem`, `client-key.pem` (QEMU and libnbd read the files of their own side only).
//! Its CA is its own, not the cluster's: a certificate that lets a QEMU process read this host's
//! exports must not also be a client of the cluster. The CA key is not kept: the directory is
//! issued as a whole and replaced as a whole (`basalt cert nbd` again) to rotate it.
//!
//! The server requires a client certificate signed by that CA (QEMU's default `verify-peer=on`
//! for server endpoints): with TLS, the certificate is what authenticates an NBD client.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};

use crate::certs::{Validity, ca_params, gen_err, random_serial, write_atomically};
use crate::error::SecurityError;
use crate::identity::{CertSummary, unix_now};
use crate::tls::{provider, read_certs, read_key};

/// The CA certificate both sides trust.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate (what `basalt attach` presents).
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The client's certificate (what QEMU or nbdinfo presents).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client's key.
pub const CLIENT_KEY: &str = "client-key.pem";

/// A certificate directory that was just issued.
#[derive(Clone, Debug)]
pub struct NbdTlsDir {
    /// The directory.
    pub dir: PathBuf,
    /// End of validity of everything in it, Unix seconds.
    pub not_after: i64,
}

fn name(s: &str) -> Result<SanType, SecurityError> {
    Ok(match s.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => {
            // rcgen takes any ASCII; a name clients can dial is a valid DNS name.
            rustls_pki_types::DnsName::try_from(s).map_err(|_| SecurityError::Invalid(format!("{s:?} is neither an IP address nor a DNS name")))?;
            SanType::DnsName(s.to_string().try_into().map_err(|e| SecurityError::Invalid(format!("host name {s:?}: {e}")))?)
        }
    })
}

fn leaf(common_name: &str, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Basalt");
    params.distinguished_name = dn;
    // GnuTLS (QEMU, libnbd) refuses its own certificate when a critical key usage lacks
    // key encipherment, whatever the key type.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.is_ca = IsCa::ExplicitNoCa;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.from;
    params.not_after = validity.until;
    params
}

/// Issues a fresh CA, a server certificate for `hosts` (the names and addresses clients dial:
/// QEMU checks the one it dialled) and one client certificate into `dir`. Refuses to replace
/// any existing file.
pub fn create(dir: &Path, hosts: &[String], validity: Validity) -> Result<NbdTlsDir, SecurityError> {
    if hosts.is_empty() {
        return Err(SecurityError::Invalid("name at least one host the server is dialled by (an address or DNS name)".into()));
    }
    let sans = hosts.iter().map(|h| name(h)).collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(dir).map_err(|e| SecurityError::io(dir, e))?;
    for f in [CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY] {
        if dir.join(f).exists() {
            return Err(SecurityError::Exists(dir.join(f)));
        }
    }

    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let ca = ca_params("Basalt NBD CA", validity);
    let ca_cert = ca.self_signed(&ca_key).map_err(gen_err)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().map_err(gen_err)?;
    let mut server = leaf(&hosts[0], validity);
    server.subject_alt_names = sans;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer).map_err(gen_err)?;

    let client_key = KeyPair::generate().map_err(gen_err)?;
    let mut client = leaf("nbd-client", validity);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &issuer).map_err(gen_err)?;

    write_atomically(&dir.join(SERVER_KEY), server_key.serialize_pem().as_bytes(), true)?;
    write_atomically(&dir.join(CLIENT_KEY), client_key.serialize_pem().as_bytes(), true)?;
    write_atomically(&dir.join(SERVER_CERT), server_cert.pem().as_bytes(), false)?;
    write_atomically(&dir.join(CLIENT_CERT), client_cert.pem().as_bytes(), false)?;
    write_atomically(&dir.join(CA_CERT), ca_pem.as_bytes(), false)?;
    Ok(NbdTlsDir { dir: dir.to_path_buf(), not_after: validity.until.unix_timestamp() })
}

/// The server side's configuration from `dir`: its certificate and key, and the CA client
/// certificates must chain to. TLS 1.2 and 1.3 (proto.md § TLS versions: 1.2 is a MUST).
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, SecurityError> {
    let ca_path = dir.join(CA_CERT);
    let mut roots = RootCertStore::empty();
    for der in read_certs(&ca_path)? {
        let summary = CertSummary::from_der(&der, &ca_path.display().to_string())?;
        if !summary.is_ca {
            return Err(SecurityError::Certificate {
                what: ca_path.display().to_string(),
                message: format!("{} is not a CA certificate", summary.subject),
            });
        }
        roots.add(der).map_err(|e| SecurityError::Certificate { what: ca_path.display().to_string(), message: e.to_string() })?;
    }
    let cert_path = dir.join(SERVER_CERT);
    let chain = read_certs(&cert_path)?;
    CertSummary::from_der(&chain[0], &cert_path.display().to_string())?.check_valid_at(unix_now(), &cert_path.display().to_string())?;
    let key = read_key(&dir.join(SERVER_KEY))?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| SecurityError::Tls(format!("{}: {e}", ca_path.display())))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| SecurityError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| SecurityError::Tls(format!("{} and {SERVER_KEY}: {e}", cert_path.display())))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_issued_once_and_serves() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("nbd");
        create(&d, &["127.0.0.1".into(), "hv1.example".into()], Validity::days(30)).unwrap();
        assert!(server_config(&d).is_ok());
        assert!(matches!(create(&d, &["127.0.0.1".into()], Validity::days(30)), Err(SecurityError::Exists(_))), "never replaces files");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(d.join(SERVER_KEY)).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(create(&dir.path().join("x"), &[], Validity::days(1)), Err(SecurityError::Invalid(_))));
        assert!(matches!(create(&dir.path().join("y"), &["bad name!".into()], Validity::days(1)), Err(SecurityError::Invalid(_))));
        // A server key that does not belong to its certificate is refused by name.
        std::fs::copy(d.join(CLIENT_KEY), d.join(SERVER_KEY)).unwrap();
        let e = server_config(&d).unwrap_err().to_string();
        assert!(e.contains(SERVER_CERT), "{e}");
        // A missing directory names the file.
        let e = server_config(&dir.path().join("none")).unwrap_err().to_string();
        assert!(e.contains(CA_CERT), "{e}");
    }
}
