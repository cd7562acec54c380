//! Re-encryption: moving an encrypted volume's blocks to a new data key version while the
//! volume stays attached and in use (`basalt volume rekey --reencrypt`).
//!
//! The rekey command stores the new version (wrapped under the new KEK, beside every older
//! version rewrapped) and makes it current in the meta group. From then on:
//!
//! 1. every process that has the volume open notices within [`POLL`] ([`keep_keys`]), fetches
//!    the keys again, opens them with the KEK file it was started with (read again, so a KEK
//!    installed there for the rotation is used) or the KEK it read at start, and seals every
//!    new write under the new version;
//! 2. the read-write holder (the attach process, or the rekey command itself when nothing is
//!    attached) walks the volume chunk by chunk ([`run`]): blocks still sealed under an older
//!    version are read, opened, sealed under the new one and written back while their stripes
//!    are held exclusively ([`Volume::reseal`]), so a guest write never lands in between;
//!    unwritten blocks stay unwritten; the walk is throttled to a byte rate;
//! 3. the holder records how far it got every [`REPORT_EVERY`] (and the meta group refuses a
//!    report from a holder that was superseded); a new holder — the same attach command run
//!    again after a crash — resumes from there, repeating at most one report's worth;
//! 4. past the end, the holder reports it done: the meta group drops the older versions and
//!    every meta node erases their wrapped copies; no key the cluster holds opens an old block.
//!
//! Why the holder's walk is complete: it switches its own writes to the new version before it
//! starts, every earlier write of its own finished before the walk took that write's stripe,
//! and an earlier holder was fenced when this one attached.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use basalt_common::BLOCK_SIZE;
use basalt_proto::admin::{VolumeReencryptProgressRequest, VolumeShowRequest};
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::crypt::{Kek, VolumeCipher};
use crate::error::ClientError;
use crate::volume::{KeyReloader, Volume};

/// How often an attached process looks for a change of its volume's keys.
pub const POLL: Duration = Duration::from_secs(2);

/// How often the walk records its position.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Blocks moved per step (one chunk, one stripe of the volume's locks).
const STEP_BLOCKS: u64 = 256;

/// Where a re-encryption stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Every block before this one is done.
    pub next_block: u64,
    /// Blocks in the volume.
    pub total_blocks: u64,
    /// Blocks this run moved (the rest were unwritten or already moved).
    pub moved: u64,
}

impl Progress {
    /// Percent done.
    pub fn percent(&self) -> u64 {
        (self.next_block.min(self.total_blocks) * 100).checked_div(self.total_blocks).unwrap_or(100)
    }
}

/// Runs (or resumes, from `from_block`) `volume`'s re-encryption to `to_version`, scanning at
/// most `rate` bytes a second, recording its position in the meta group as it goes and calling
/// `on_progress` after every step. `volume` must be attached read-write and seal with
/// `to_version` already. Returns when every block is done and the meta group has dropped the
/// older versions.
pub async fn run(
    cluster: &Cluster,
    volume: &Volume,
    to_version: u32,
    from_block: u64,
    rate: u64,
    mut on_progress: impl FnMut(Progress),
) -> Result<Progress, ClientError> {
    let cipher = volume.cipher().ok_or_else(|| ClientError::Crypt(format!("volume {} is not encrypted", volume.name())))?;
    if cipher.current_version() != to_version {
        return Err(ClientError::Crypt(format!(
            "volume {}: this process seals with key version {}, not {to_version}: it cannot re-encrypt to it",
            volume.name(),
            cipher.current_version()
        )));
    }
    let rate = rate.max(BLOCK_SIZE);
    let mut next = from_block / STEP_BLOCKS * STEP_BLOCKS;
    let mut progress = Progress { next_block: next, total_blocks: volume.size() / BLOCK_SIZE, moved: 0 };
    let (started, mut scanned) = (tokio::time::Instant::now(), 0u64);
    let mut reported = tokio::time::Instant::now();
    loop {
        let mut total = volume.size() / BLOCK_SIZE;
        if next >= total {
            // The volume may have grown meanwhile: what lies beyond was written under the new
            // version, but look before calling it done.
            total = volume.refresh().await? / BLOCK_SIZE;
            if next >= total {
                break;
            }
        }
        let count = STEP_BLOCKS.min(total - next);
        progress.moved += volume.reseal(next, count).await?;
        next += count;
        scanned += count * BLOCK_SIZE;
        progress.next_block = next;
        progress.total_blocks = total;
        on_progress(progress);
        if reported.elapsed() >= REPORT_EVERY {
            report(cluster, volume, to_version, next, false).await?;
            reported = tokio::time::Instant::now();
        }
        // Throttle: never ahead of `rate` since the start.
        let due = Duration::from_secs_f64(scanned as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    report(cluster, volume, to_version, next, true).await?;
    cipher.retire_older();
    Ok(progress)
}

/// Records the walk's position (`done`: it passed the end). A refusal — this holder was
/// superseded, or the re-encryption ended elsewhere — ends the walk; an unreachable meta group
/// is waited for.
async fn report(cluster: &Cluster, volume: &Volume, to_version: u32, next_block: u64, done: bool) -> Result<(), ClientError> {
    let req =
        VolumeReencryptProgressRequest { name: volume.name().to_string(), attach_epoch: volume.epoch(), key_version: to_version, next_block, done };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match cluster
            .admin_call(|mut c| {
                let req = req.clone();
                async move { c.volume_reencrypt_progress(req).await }
            })
            .await
        {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => return Err(ClientError::Admin(format!("recording volume {}'s re-encryption: {}", volume.name(), s.message()))),
        }
    }
}

/// Where an attached process finds its KEK again when the volume's keys change.
pub struct KekSource {
    /// The KEK file it was started with, read again (a KEK installed there for a rotation).
    pub path: PathBuf,
    /// The KEK it read at start.
    pub initial: Kek,
}

/// After a failed load, how long until the next attempt, unless the KEK file changes.
const RETRY_FAILED_LOAD: Duration = Duration::from_secs(30);

/// Fetches an open volume's keys again ([`KeyReloader`]): when its key version changes (the
/// poll in [`keep_keys`]) and when a read meets a block moved to a version not loaded yet
/// (before the next poll), so that read does not fail. A failed load is not retried for
/// [`RETRY_FAILED_LOAD`] unless the KEK file changes: every load is an audited key fetch.
pub struct Reloader {
    cluster: Cluster,
    name: String,
    cipher: Arc<VolumeCipher>,
    kek: KekSource,
    /// One load at a time; the last failure (when, with which KEK file contents).
    failed: tokio::sync::Mutex<Option<(tokio::time::Instant, Option<[u8; 8]>)>>,
}

impl Reloader {
    /// A reloader for `volume` (encrypted: its cipher is the one reloaded).
    pub fn new(cluster: Cluster, volume: &Volume, kek: KekSource) -> Result<Reloader, ClientError> {
        let cipher = volume.cipher().cloned().ok_or_else(|| ClientError::Crypt(format!("volume {} is not encrypted", volume.name())))?;
        Ok(Reloader { cluster, name: volume.name().to_string(), cipher, kek, failed: tokio::sync::Mutex::new(None) })
    }

    /// Loads the keys unless `version` is held already; afterwards the cipher seals with the
    /// volume's current version.
    async fn load(&self, version: u32) -> Result<(), ClientError> {
        let mut failed = self.failed.lock().await;
        if self.cipher.holds(version) && self.cipher.current_version() >= version {
            return Ok(());
        }
        let file = Kek::from_file(&self.kek.path).ok();
        let fingerprint = file.as_ref().map(Kek::fingerprint);
        if let Some((at, with)) = *failed
            && at.elapsed() < RETRY_FAILED_LOAD
            && with == fingerprint
        {
            return Err(ClientError::Crypt(format!(
                "volume {}: key version {version} could not be loaded; tried again every {}s, or when {} changes",
                self.name,
                RETRY_FAILED_LOAD.as_secs(),
                self.kek.path.display()
            )));
        }
        let keks: Vec<&Kek> = file.iter().chain([&self.kek.initial]).collect();
        let loaded = match self.cluster.volume_keys(&self.name, &keks).await {
            Ok((_, keys, current)) => self.cipher.update(keys, current).map_err(ClientError::from),
            Err(e) => Err(e),
        };
        *failed = loaded.is_err().then(|| (tokio::time::Instant::now(), fingerprint));
        loaded
    }
}

impl KeyReloader for Reloader {
    fn reload(&self, version: u32) -> futures::future::BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(self.load(version))
    }
}

/// What [`keep_keys`] tells its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyEvent {
    /// New writes are sealed with this version from now on.
    Sealing(u32),
    /// The re-encryption made progress.
    Moving(Progress),
    /// The re-encryption finished; older versions are gone.
    Done(u32),
    /// Something failed; retried at the next poll.
    Problem(String),
}

/// Keeps an open encrypted volume's keys current (see the module docs) until `shutdown`; a
/// read-write holder also runs the volume's re-encryption while one is in progress, at the
/// rate the rekey set. Never fails: problems are reported through `events` and retried.
pub async fn keep_keys(
    cluster: Cluster,
    volume: Volume,
    keys: Arc<Reloader>,
    read_write: bool,
    mut events: impl FnMut(KeyEvent) + Send,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(cipher) = volume.cipher().cloned() else { return };
    let mut last_problem = String::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => return,
        }
        let req = VolumeShowRequest { name: volume.name().to_string(), usage: false };
        let shown = match cluster
            .admin_call(|mut c| {
                let req = req.clone();
                async move { c.volume_show(req).await }
            })
            .await
        {
            Ok(r) => r.volume.unwrap_or_default(),
            Err(s) => {
                problem(&mut events, &mut last_problem, format!("looking up volume {}: {}", volume.name(), s.message()));
                continue;
            }
        };
        if shown.key_version != cipher.current_version() {
            match keys.load(shown.key_version).await {
                Ok(()) => events(KeyEvent::Sealing(cipher.current_version())),
                Err(e) => {
                    problem(
                        &mut events,
                        &mut last_problem,
                        format!(
                            "volume {} moved to key version {} and this process cannot open it ({e}); its writes stay on version {}. Install the new KEK in {}",
                            volume.name(),
                            shown.key_version,
                            cipher.current_version(),
                            keys.kek.path.display()
                        ),
                    );
                    continue;
                }
            }
        }
        if !read_write || !shown.reencrypting || shown.attach_epoch != volume.epoch() || cipher.current_version() != shown.key_version {
            continue;
        }
        let walk = run(&cluster, &volume, shown.key_version, shown.reencrypt_next_block, shown.reencrypt_rate, |p| events(KeyEvent::Moving(p)));
        let outcome = tokio::select! {
            r = walk => r,
            _ = shutdown.changed() => return,
        };
        match outcome {
            Ok(_) => events(KeyEvent::Done(shown.key_version)),
            Err(e) => problem(&mut events, &mut last_problem, format!("re-encrypting volume {}: {e}", volume.name())),
        }
    }
}

/// Reports a problem once until it changes.
fn problem(events: &mut impl FnMut(KeyEvent), last: &mut String, what: String) {
    if *last != what {
        events(KeyEvent::Problem(what.clone()));
        *last = what;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_a_percentage_of_the_volume() {
        assert_eq!(Progress { next_block: 0, total_blocks: 0, moved: 0 }.percent(), 100);
        assert_eq!(Progress { next_block: 256, total_blocks: 1024, moved: 3 }.percent(), 25);
        assert_eq!(Progress { next_block: 2048, total_blocks: 1024, moved: 3 }.percent(), 100);
    }
}
