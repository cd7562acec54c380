//! Failure-domain labels (`region/zone/rack/host`) and the level at which replicas must differ.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A level of the failure-domain hierarchy, outermost first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DomainLevel {
    /// A region: replicas in different regions.
    Region,
    /// A zone (availability zone).
    Zone,
    /// A rack.
    Rack,
    /// A host: the default; replicas on different machines.
    #[default]
    Host,
}

impl DomainLevel {
    /// Every level, outermost first.
    pub const ALL: [DomainLevel; 4] = [Self::Region, Self::Zone, Self::Rack, Self::Host];

    /// The label key for this level.
    pub fn key(self) -> &'static str {
        match self {
            Self::Region => "region",
            Self::Zone => "zone",
            Self::Rack => "rack",
            Self::Host => "host",
        }
    }
}

impl fmt::Display for DomainLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl FromStr for DomainLevel {
    type Err = LabelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|l| l.key() == s).ok_or_else(|| LabelError::UnknownLevel(s.to_string()))
    }
}

/// Why a label string was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LabelError {
    /// Not `key=value`.
    #[error("label {0:?} is not of the form key=value (e.g. zone=z1,rack=r2,host=h3)")]
    Malformed(String),
    /// A key other than region/zone/rack/host.
    #[error("unknown failure-domain level {0:?}; known levels are region, zone, rack, host")]
    UnknownLevel(String),
    /// The same key twice.
    #[error("failure-domain level {0:?} given twice")]
    Duplicate(String),
    /// An empty value or one with characters that would make domain keys ambiguous.
    #[error("label value {0:?} is invalid: use letters, digits, '.', '_' and '-'")]
    BadValue(String),
}

/// A node's position in the failure-domain hierarchy. Missing levels are empty; a missing host
/// is filled with the node's id when the node registers, so two unlabeled nodes never share a
/// host by accident.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Labels {
    /// Region label.
    pub region: String,
    /// Zone label.
    pub zone: String,
    /// Rack label.
    pub rack: String,
    /// Host label.
    pub host: String,
}

impl Labels {
    /// The value at one level.
    pub fn get(&self, level: DomainLevel) -> &str {
        match level {
            DomainLevel::Region => &self.region,
            DomainLevel::Zone => &self.zone,
            DomainLevel::Rack => &self.rack,
            DomainLevel::Host => &self.host,
        }
    }

    fn slot(&mut self, level: DomainLevel) -> &mut String {
        match level {
            DomainLevel::Region => &mut self.region,
            DomainLevel::Zone => &mut self.zone,
            DomainLevel::Rack => &mut self.rack,
            DomainLevel::Host => &mut self.host,
        }
    }

    /// The failure domain this node belongs to at `level`: the path of labels from the region
    /// down to `level`, e.g. `zone=z1/rack=r2`. Two nodes share a domain at a level exactly when
    /// these strings are equal.
    pub fn domain(&self, level: DomainLevel) -> String {
        DomainLevel::ALL
            .into_iter()
            .filter(|l| *l <= level)
            .filter(|l| !self.get(*l).is_empty())
            .map(|l| format!("{}={}", l.key(), self.get(l)))
            .collect::<Vec<_>>()
            .join("/")
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> =
            DomainLevel::ALL.into_iter().filter(|l| !self.get(*l).is_empty()).map(|l| format!("{}={}", l.key(), self.get(l))).collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for Labels {
    type Err = LabelError;

    /// Parses `zone=z1,rack=r2,host=h3` (any subset of the four levels, any order).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut labels = Labels::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| LabelError::Malformed(part.to_string()))?;
            let level: DomainLevel = key.trim().parse()?;
            let value = value.trim();
            let valid = !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid {
                return Err(LabelError::BadValue(value.to_string()));
            }
            let slot = labels.slot(level);
            if !slot.is_empty() {
                return Err(LabelError::Duplicate(level.key().to_string()));
            }
            *slot = value.to_string();
        }
        Ok(labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_domain() {
        let l: Labels = "zone=z1, rack=r2,host=h3".parse().unwrap();
        assert_eq!(l.zone, "z1");
        assert_eq!(l.domain(DomainLevel::Rack), "zone=z1/rack=r2");
        assert_eq!(l.domain(DomainLevel::Host), "zone=z1/rack=r2/host=h3");
        assert_eq!(l.domain(DomainLevel::Region), "");
        assert_eq!(l.to_string(), "zone=z1,rack=r2,host=h3");
    }

    #[test]
    fn rejects_bad_labels() {
        assert!(matches!("zone".parse::<Labels>(), Err(LabelError::Malformed(_))));
        assert!(matches!("planet=earth".parse::<Labels>(), Err(LabelError::UnknownLevel(_))));
        assert!(matches!("zone=a,zone=b".parse::<Labels>(), Err(LabelError::Duplicate(_))));
        assert!(matches!("zone=a/b".parse::<Labels>(), Err(LabelError::BadValue(_))));
        assert!(matches!("zone=".parse::<Labels>(), Err(LabelError::BadValue(_))));
    }
}
