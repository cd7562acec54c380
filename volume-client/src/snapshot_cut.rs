//! The read-write holder's part in crash-consistent snapshots (docs/architecture.md,
//! "Snapshots, clones and backups"). When a snapshot of an attached volume is asked for, the
//! meta group records it as pending and waits; the holder, watching the cluster map, drains its
//! writes, has the meta group freeze the current write epoch, and writes on under the next
//! ([`crate::Volume::cut_snapshot`]). Everything acknowledged before the cut is in the
//! snapshot, nothing issued after it is.

use std::time::Duration;

use tokio::sync::watch;

use crate::{Cluster, Volume};

/// How long one map watch waits for a change.
const WATCH: Duration = Duration::from_secs(20);

/// What the cutter did, for the attach process to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CutEvent {
    /// Snapshot cut; writes go on at this write epoch.
    Cut {
        /// The snapshot.
        name: String,
        /// The new write epoch.
        write_epoch: u64,
    },
    /// A cut failed (the snapshot command reports it too).
    Failed {
        /// The snapshot.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Cuts the snapshots asked of `volume`'s attachment until `shutdown` is set.
pub async fn run_snapshot_cutter(cluster: Cluster, volume: Volume, mut on_event: impl FnMut(CutEvent) + Send, mut shutdown: watch::Receiver<bool>) {
    let mut known = 0;
    loop {
        let map = tokio::select! {
            m = cluster.watch_map(known, WATCH) => m,
            _ = shutdown.changed() => return,
        };
        if map.version <= known {
            // No seed answered, or nothing changed: do not spin.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return,
            }
        }
        known = map.version;
        let Some(v) = map.volumes.get(&volume.id()) else { continue };
        if v.attach_epoch != volume.epoch() {
            // Superseded or detached: the next holder cuts.
            continue;
        }
        // A cut whose answer was lost still moved the epoch on: follow the map.
        if v.write_epoch > volume.write_epoch() {
            volume.set_write_epoch(v.write_epoch);
        }
        let Some(name) = v.snapshot_pending.clone() else { continue };
        match volume.cut_snapshot(&name).await {
            Ok(write_epoch) => {
                tracing::info!(volume = %volume.name(), snapshot = %name, write_epoch, "snapshot cut");
                on_event(CutEvent::Cut { name, write_epoch });
            }
            Err(e) => {
                tracing::warn!(volume = %volume.name(), snapshot = %name, error = %e, "snapshot cut failed");
                on_event(CutEvent::Failed { name, reason: e.to_string() });
            }
        }
    }
}
