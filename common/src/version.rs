//! Cluster versions: which formats a cluster may use while nodes of several builds run in it.
//!
//! Each build speaks a range of cluster versions ([`VersionRange::BUILD`]). Every node
//! advertises its range in its heartbeats; the meta leader records it and runs the cluster at
//! the lowest version every node speaks. Once every node's range reaches a higher version (all
//! of them upgraded) the leader raises the cluster version; it never lowers it. A node whose
//! range does not include the cluster's version is refused by name ([`VersionMismatch`]) and
//! stops instead of misreading what the others write.
//!
//! Anything a build writes that older builds cannot read (a new meta command or snapshot
//! format, a new wire message) is gated on the cluster version: written only once
//! `cluster_version >= N`, where N is the version that introduced it. Formats also carry their
//! own versions and refuse what they do not know; the cluster version is what keeps a mixed
//! cluster from ever producing such data in the first place.
//!
//! | version | introduced |
//! |---------|------------|
//! | 1       | version ranges in heartbeats (data protocol `basalt-data/3`, Raft `basalt-raft/3`, meta snapshot format 10) |

use std::fmt;

/// A cluster version.
pub type ClusterVersion = u32;

/// Environment variable that replaces this build's range, `MIN-MAX` (tests of rolling upgrades
/// only: it makes one binary act as an older or newer build).
pub const TEST_OVERRIDE_ENV: &str = "BASALT_TEST_CLUSTER_VERSIONS";

/// The cluster versions a node speaks, both ends included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct VersionRange {
    /// Oldest version it still speaks.
    pub min: ClusterVersion,
    /// Newest version it speaks.
    pub max: ClusterVersion,
}

/// A node and a cluster that share no version.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum VersionMismatch {
    /// The node is older than the cluster.
    #[error(
        "{who} speaks cluster versions {range}, but the cluster runs at version {cluster} (raised once every node was upgraded): start a build that speaks version {cluster}"
    )]
    TooOld {
        /// The node, e.g. `node-4`.
        who: String,
        /// Its range.
        range: VersionRange,
        /// The cluster's version.
        cluster: ClusterVersion,
    },
    /// The node no longer speaks the cluster's version.
    #[error(
        "{who} speaks cluster versions {range}, but the cluster still runs at version {cluster}: upgrade every node through a build that speaks both (see docs/operations.md, \"Rolling restarts and upgrades\")"
    )]
    TooNew {
        /// The node.
        who: String,
        /// Its range.
        range: VersionRange,
        /// The cluster's version.
        cluster: ClusterVersion,
    },
}

impl VersionRange {
    /// What this build speaks.
    pub const BUILD: VersionRange = VersionRange { min: 1, max: 1 };

    /// This build's range, or the test override in [`TEST_OVERRIDE_ENV`].
    pub fn of_this_process() -> Result<VersionRange, String> {
        match std::env::var(TEST_OVERRIDE_ENV) {
            Ok(v) => v.parse().map_err(|e| format!("{TEST_OVERRIDE_ENV}={v}: {e}")),
            Err(_) => Ok(VersionRange::BUILD),
        }
    }

    /// True if `v` is in the range.
    pub fn contains(&self, v: ClusterVersion) -> bool {
        self.min <= v && v <= self.max
    }

    /// Checks that `who`, speaking this range, may join a cluster at version `cluster`.
    pub fn check(&self, who: &str, cluster: ClusterVersion) -> Result<(), VersionMismatch> {
        if self.max < cluster {
            Err(VersionMismatch::TooOld { who: who.to_string(), range: *self, cluster })
        } else if self.min > cluster {
            Err(VersionMismatch::TooNew { who: who.to_string(), range: *self, cluster })
        } else {
            Ok(())
        }
    }

    /// The version a cluster of nodes with these ranges may run at: the newest every one of
    /// them speaks (`None` if there are none).
    pub fn common_max<'a>(ranges: impl IntoIterator<Item = &'a VersionRange>) -> Option<ClusterVersion> {
        ranges.into_iter().map(|r| r.max).min()
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

impl std::str::FromStr for VersionRange {
    type Err = String;

    /// `MIN-MAX` or a single version.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let num = |p: &str| p.trim().parse::<ClusterVersion>().map_err(|_| format!("{p:?} is not a version number"));
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if min == 0 || min > max {
            return Err(format!("{s:?} is not a range MIN-MAX with 1 <= MIN <= MAX"));
        }
        Ok(VersionRange { min, max })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        assert_eq!("1-2".parse::<VersionRange>(), Ok(VersionRange { min: 1, max: 2 }));
        assert_eq!("3".parse::<VersionRange>(), Ok(VersionRange { min: 3, max: 3 }));
        for bad in ["", "0-1", "2-1", "a-b", "1-", "-1", "1-2-3"] {
            assert!(bad.parse::<VersionRange>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_node_joins_only_a_cluster_at_a_version_it_speaks_and_is_told_why_not() {
        let r = VersionRange { min: 2, max: 3 };
        assert!(r.check("node-4", 2).is_ok() && r.check("node-4", 3).is_ok());
        let old = r.check("node-4", 4).unwrap_err().to_string();
        assert!(old.contains("node-4 speaks cluster versions 2..=3") && old.contains("runs at version 4"), "{old}");
        let new = r.check("node-4", 1).unwrap_err().to_string();
        assert!(new.contains("2..=3") && new.contains("still runs at version 1"), "{new}");
    }

    #[test]
    fn the_cluster_runs_at_the_newest_version_all_nodes_speak() {
        let rs = [VersionRange { min: 1, max: 1 }, VersionRange { min: 1, max: 2 }];
        assert_eq!(VersionRange::common_max(&rs), Some(1));
        assert_eq!(VersionRange::common_max(&rs[1..]), Some(2));
        assert_eq!(VersionRange::common_max(&[]), None);
    }
}
