//! The cluster CA and the certificates it issues (`basalt cert init|issue`).
//!
//! A CA directory holds `ca.pem` (the certificate every node and client trusts) and `ca.key`
//! (mode 0600; only needed to issue). Issued pairs are `node-<id>.pem`/`.key` and
//! `client-<name>.pem`/`.key`. Keys are ECDSA P-256 (cheap handshakes). Files are written to a
//! temporary name and renamed, so a node reloading its certificate never reads half a file.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::error::SecurityError;
use crate::identity::{CertSummary, Identity};

/// File name of the CA certificate in a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// File name of the CA key in a CA directory.
pub const CA_KEY: &str = "ca.key";

/// Default lifetime of a CA: ten years.
pub const CA_DAYS: u32 = 3650;
/// Default lifetime of an issued certificate: one year.
pub const CERT_DAYS: u32 = 365;

/// A certificate and its key on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM private key (mode 0600).
    pub key: PathBuf,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

/// When an issued certificate is valid.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// Start.
    pub from: OffsetDateTime,
    /// End.
    pub until: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew between hosts) for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity { from: now - Duration::hours(1), until: now + Duration::days(i64::from(days)) }
    }
}

pub(crate) fn gen_err(e: rcgen::Error) -> SecurityError {
    SecurityError::Generate(e.to_string())
}

pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and never a leading zero byte that DER would strip.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Writes `contents` to `path` through a temporary file and a rename; `private` files get mode
/// 0600 before any byte is written.
pub fn write_atomically(path: &Path, contents: &[u8], private: bool) -> Result<(), SecurityError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|e| SecurityError::io(&tmp, e))?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(|e| SecurityError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| SecurityError::io(path, e))
}

/// The parameters of a self-signed CA that may sign end-entity certificates only, named
/// `name` and a random suffix (which tells two CAs apart in messages).
pub(crate) fn ca_params(name: &str, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{name} {:08x}", rand::random::<u32>()));
    dn.push(DnType::OrganizationName, "Basalt");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial());
    params.not_before = validity.from;
    params.not_after = validity.until;
    params
}

/// Creates a new CA in `dir` (created if missing); refuses to replace an existing one.
pub fn init_ca(dir: &Path, days: u32) -> Result<CertFiles, SecurityError> {
    std::fs::create_dir_all(dir).map_err(|e| SecurityError::io(dir, e))?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(SecurityError::Exists(p.clone()));
        }
    }
    let key = KeyPair::generate().map_err(gen_err)?;
    let validity = Validity::days(days);
    let cert = ca_params("Basalt cluster CA", validity).self_signed(&key).map_err(gen_err)?;
    write_atomically(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(CertFiles { cert: cert_path, key: key_path, not_after: validity.until.unix_timestamp() })
}

/// The file stem of an identity's certificate: `node-3`, `client-prometheus`.
pub fn file_stem(identity: &Identity) -> String {
    match identity {
        Identity::Node(id) => format!("node-{id}"),
        Identity::Client(name) => format!("client-{name}"),
    }
}

/// Issues a certificate for `identity` signed by the CA in `ca_dir`, written to `out_dir` as
/// `<stem>.pem` and `<stem>.key` (replacing an earlier pair: that is how certificates rotate).
/// `extra_names` are further DNS names or IP addresses a node answers to (for tools that
/// verify by address).
pub fn issue(ca_dir: &Path, identity: &Identity, validity: Validity, out_dir: &Path, extra_names: &[String]) -> Result<CertFiles, SecurityError> {
    if let Identity::Client(name) = identity {
        crate::identity::valid_client_name(name)?;
    }
    if let Identity::Node(0) = identity {
        return Err(SecurityError::Invalid("node ids start at 1".into()));
    }
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(|e| SecurityError::io(&ca_cert_path, e))?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(|e| SecurityError::io(&ca_key_path, e))?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).map_err(|e| SecurityError::Pem { path: ca_key_path.clone(), message: format!("not a private key: {e}") })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| SecurityError::Pem { path: ca_cert_path.clone(), message: format!("not a CA certificate: {e}") })?;

    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.to_string());
    dn.push(DnType::OrganizationName, "Basalt");
    params.distinguished_name = dn;
    let mut sans = vec![SanType::DnsName(identity.dns_name().try_into().map_err(gen_err)?)];
    for name in extra_names {
        sans.push(match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into().map_err(|e| SecurityError::Invalid(format!("name {name:?}: {e}")))?),
        });
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match identity {
        Identity::Node(_) => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        Identity::Client(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.from;
    params.not_after = validity.until;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;

    std::fs::create_dir_all(out_dir).map_err(|e| SecurityError::io(out_dir, e))?;
    let stem = file_stem(identity);
    let (cert_path, key_path) = (out_dir.join(format!("{stem}.pem")), out_dir.join(format!("{stem}.key")));
    // Key first: a reloader that sees the new certificate finds its key already there.
    write_atomically(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), false)?;
    Ok(CertFiles { cert: cert_path, key: key_path, not_after: validity.until.unix_timestamp() })
}

/// Reads the first certificate of a PEM file and summarises it.
pub fn summarize_file(path: &Path) -> Result<CertSummary, SecurityError> {
    let certs = crate::tls::read_certs(path)?;
    let first = certs.first().ok_or_else(|| SecurityError::Pem { path: path.to_path_buf(), message: "no certificate in the file".into() })?;
    CertSummary::from_der(first, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_node_and_client_certificates_that_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path(), 30).unwrap();
        assert!(matches!(init_ca(dir.path(), 30), Err(SecurityError::Exists(_))), "an existing CA is never replaced");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&ca.key).unwrap().permissions().mode() & 0o777, 0o600);
        let ca_summary = summarize_file(&ca.cert).unwrap();
        assert!(ca_summary.is_ca);
        assert_eq!(ca_summary.identity, None);

        let node = issue(dir.path(), &Identity::Node(7), Validity::days(10), &dir.path().join("out"), &["127.0.0.1".into()]).unwrap();
        let s = summarize_file(&node.cert).unwrap();
        assert_eq!(s.identity, Some(Identity::Node(7)));
        assert!(!s.is_ca);
        assert_eq!(std::fs::metadata(&node.key).unwrap().permissions().mode() & 0o777, 0o600);
        s.check_valid_at(crate::identity::unix_now(), "node-7").unwrap();
        assert!(s.check_valid_at(s.not_after + 1, "node-7").unwrap_err().to_string().contains("expired at"));

        let client = issue(dir.path(), &Identity::Client("ops".into()), Validity::days(1), dir.path(), &[]).unwrap();
        assert_eq!(summarize_file(&client.cert).unwrap().identity, Some(Identity::Client("ops".into())));
        assert!(issue(dir.path(), &Identity::Client("Bad Name".into()), Validity::days(1), dir.path(), &[]).is_err());
        assert!(issue(&dir.path().join("nowhere"), &Identity::Node(1), Validity::days(1), dir.path(), &[]).is_err());
    }
}
