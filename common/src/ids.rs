//! Identifiers. Newtypes so a volume id is never passed where an extent index belongs, and so
//! every error message prints them the same way.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                Self(v)
            }
        }
    };
}

id_type!(
    /// A storage node (a `basalt-node` process). Chosen by the operator, unique in a cluster.
    NodeId(u64), "node-"
);
id_type!(
    /// A volume. Assigned by the meta group, never reused, so data of a deleted volume can
    /// never be mistaken for a new one's.
    VolumeId(u64), "vol-"
);
id_type!(
    /// A placement group: one Raft group replicated on three nodes.
    PgId(u32), "pg-"
);
id_type!(
    /// The index of an extent (the unit of placement) within a volume.
    ExtentIndex(u64), "extent-"
);
id_type!(
    /// The index of a chunk (the unit of allocation on a node) within a volume.
    ChunkIndex(u64), "chunk-"
);
