//! Who a certificate names. Basalt's CA issues two kinds of end-entity certificates, told apart
//! by the one DNS name each carries:
//!
//! - a node's: `node-<id>.basalt` (server and client authentication: nodes accept and open
//!   connections);
//! - a client's: `<name>.client.basalt` (client authentication only: an operator's bootstrap
//!   certificate, a Prometheus scraper, a hypervisor host that authenticates by certificate).
//!
//! A client checks a node's certificate with webpki against the DNS name of the node it means
//! to reach (`tls::expect`), so a client certificate can never pass for a node (it lacks both the
//! name and the serverAuth usage).

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::SecurityError;

/// The DNS suffix of every name in a Basalt certificate.
pub const DOMAIN: &str = "basalt";

/// Who a certificate (or the peer presenting it) is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A node, by id.
    Node(u64),
    /// A named client.
    Client(String),
}

impl Identity {
    /// The DNS name a certificate for this identity carries.
    pub fn dns_name(&self) -> String {
        match self {
            Identity::Node(id) => format!("node-{id}.{DOMAIN}"),
            Identity::Client(name) => format!("{name}.client.{DOMAIN}"),
        }
    }

    /// The identity a DNS name from a certificate stands for, if it is one of ours.
    pub fn from_dns_name(name: &str) -> Option<Identity> {
        let name = name.strip_suffix(DOMAIN)?.strip_suffix('.')?;
        if let Some(client) = name.strip_suffix(".client") {
            return valid_client_name(client).ok().map(|()| Identity::Client(client.to_string()));
        }
        let id = name.strip_prefix("node-")?;
        // Canonical decimal only: "node-007" must not alias node 7.
        if id.is_empty() || id.starts_with('0') || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        id.parse().ok().filter(|id| *id > 0).map(Identity::Node)
    }

    /// The node id, for a node.
    pub fn node(&self) -> Option<u64> {
        match self {
            Identity::Node(id) => Some(*id),
            Identity::Client(_) => None,
        }
    }
}

/// Parses what `Display` writes: `node-<id>` or `client:<name>`.
impl std::str::FromStr for Identity {
    type Err = SecurityError;
    fn from_str(s: &str) -> Result<Identity, SecurityError> {
        let bad = || SecurityError::Invalid(format!("{s:?} is not node-<id> or client:<name>"));
        if let Some(name) = s.strip_prefix("client:") {
            valid_client_name(name)?;
            return Ok(Identity::Client(name.to_string()));
        }
        let id = s.strip_prefix("node-").ok_or_else(bad)?;
        Identity::from_dns_name(&format!("node-{id}.{DOMAIN}")).ok_or_else(bad)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node-{id}"),
            Identity::Client(name) => write!(f, "client:{name}"),
        }
    }
}

/// Checks a client name: it becomes a DNS label, so 1-63 of `a-z`, `0-9`, `-`, not starting or
/// ending with `-`.
pub fn valid_client_name(name: &str) -> Result<(), SecurityError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(SecurityError::Invalid(format!("client name {name:?}: use 1-63 of a-z, 0-9 and '-', not starting or ending with '-'")))
    }
}

/// What Basalt reads from a certificate: whom it names and how long it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSummary {
    /// The Basalt identity it names (`None`: a CA, or a certificate Basalt did not issue).
    pub identity: Option<Identity>,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// A CA certificate.
    pub is_ca: bool,
    /// The subject, for messages.
    pub subject: String,
}

impl CertSummary {
    /// Reads a DER certificate; `what` names it in errors.
    pub fn from_der(der: &[u8], what: &str) -> Result<CertSummary, SecurityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| SecurityError::Certificate { what: what.to_string(), message: format!("not a valid X.509 certificate: {e}") })?;
        let mut identity = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(dns) = name
                    && let Some(id) = Identity::from_dns_name(dns)
                    && identity.replace(id).is_some()
                {
                    return Err(SecurityError::Certificate { what: what.to_string(), message: "names more than one Basalt identity".into() });
                }
            }
        }
        let validity = cert.validity();
        Ok(CertSummary {
            identity,
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            is_ca: cert.is_ca(),
            subject: cert.subject().to_string(),
        })
    }

    /// Checks that the certificate is valid at `now` (Unix seconds).
    pub fn check_valid_at(&self, now: i64, what: &str) -> Result<(), SecurityError> {
        if now > self.not_after {
            return Err(SecurityError::Certificate { what: what.to_string(), message: format!("expired at {}", format_unix(self.not_after)) });
        }
        if now < self.not_before {
            return Err(SecurityError::Certificate { what: what.to_string(), message: format!("not valid before {}", format_unix(self.not_before)) });
        }
        Ok(())
    }
}

/// A Unix time as RFC 3339 UTC, for messages and tables.
pub fn format_unix(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => {
            let t = t.replace_nanosecond(0).unwrap_or(t);
            t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| secs.to_string())
        }
        Err(_) => secs.to_string(),
    }
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_round_trip_and_near_misses_are_refused() {
        for id in [Identity::Node(1), Identity::Node(4096), Identity::Client("prometheus".into()), Identity::Client("ops-1".into())] {
            assert_eq!(Identity::from_dns_name(&id.dns_name()), Some(id.clone()), "{id}");
        }
        for id in [Identity::Node(3), Identity::Client("ops".into())] {
            assert_eq!(id.to_string().parse::<Identity>().unwrap(), id);
        }
        for bad in ["node-", "node-03", "client:", "client:Ops", "token:1", "node-1.basalt"] {
            assert!(bad.parse::<Identity>().is_err(), "{bad:?}");
        }
        for bad in [
            "node-0.basalt",
            "node-07.basalt",
            "node-.basalt",
            "node-1x.basalt",
            "node-1.basalt.evil",
            "node-1.other",
            "node-99999999999999999999999.basalt",
            ".client.basalt",
            "Ops.client.basalt",
            "a.b.client.basalt",
            "basalt",
            "",
        ] {
            assert_eq!(Identity::from_dns_name(bad), None, "{bad:?}");
        }
        assert!(valid_client_name("-x").is_err());
        assert!(valid_client_name(&"a".repeat(64)).is_err());
    }
}
