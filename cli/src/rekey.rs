//! `basalt volume rekey`: rewrap an encrypted volume's data keys under a new KEK (instant), or
//! with `--reencrypt` also move every block to a new data key version
//! (`basalt_volume_client::reencrypt`): the volume's holder does the moving while it stays
//! attached and in use, and this command follows it with a progress bar; with nothing
//! attached, this command attaches and moves the blocks itself. Either way the position is
//! kept in the meta group: run the same command again to follow or resume.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use basalt_common::BLOCK_SIZE;
use basalt_proto::admin::{BackupShowRequest, VersionedKey, Volume, VolumeKeyReply, VolumeKeyRequest, VolumeRekeyRequest, VolumeShowRequest};
use basalt_volume_client::crypt::{CryptError, DataKey, Kek, WrappedKey, rewrap, rewrap_for};
use basalt_volume_client::reencrypt::{self, Progress};
use basalt_volume_client::{ClientError, Cluster};
use serde_json::json;

use crate::admin::Admin;
use crate::commands::{Out, volume_json};
use crate::exit::CliError;

/// How long a holder may go without moving before the command says so.
const STALL_WARNING: Duration = Duration::from_secs(60);

/// Percent of `v`'s re-encryption done.
pub fn percent(v: &Volume) -> u64 {
    Progress { next_block: v.reencrypt_next_block, total_blocks: v.size / BLOCK_SIZE, moved: 0 }.percent()
}

fn crypt_err(e: CryptError) -> CliError {
    CliError::invalid(e.to_string())
}

/// What `volume rekey` was asked to do.
pub struct Rekey<'a> {
    /// The volume.
    pub name: String,
    /// The KEK that opens its keys now.
    pub kek_file: &'a Path,
    /// The KEK to wrap them under (with `reencrypt`, default: the same).
    pub new_kek_file: Option<&'a Path>,
    /// Also move every block to a new data key version.
    pub reencrypt: bool,
    /// Bytes a second the move scans at most (0: the cluster's default).
    pub rate: u64,
}

/// `basalt volume rekey`.
pub async fn volume_rekey(admin: &Admin, out: Out, req: Rekey<'_>) -> Result<(), CliError> {
    let old_kek = Kek::from_file(req.kek_file).map_err(crypt_err)?;
    let new_kek = req.new_kek_file.map(Kek::from_file).transpose().map_err(crypt_err)?;
    if !req.reencrypt {
        let new_kek = new_kek.ok_or_else(|| CliError::usage("give --new-kek-file FILE (or --reencrypt to move the data to a new data key)"))?;
        if old_kek.fingerprint() == new_kek.fingerprint() {
            return Err(CliError::invalid("--new-kek-file holds the same key as --kek-file"));
        }
        let keys = rewrapped(admin, &req.name, &old_kek, &new_kek, false).await?;
        let v = propose(admin, &req.name, keys, false, 0).await?;
        out.print(volume_json(&v), || {
            format!(
                "rewrapped volume {}'s keys under the new KEK; the old wrapped keys are erased. Attach it with --kek-file {} from now on",
                v.name,
                req.new_kek_file.map(|p| p.display().to_string()).unwrap_or_default()
            )
        });
        return Ok(());
    }
    let shown = show(admin, &req.name).await?;
    if !shown.encrypted {
        return Err(CliError::invalid(format!("volume {} is not encrypted", req.name)));
    }
    // `kek_file` opens the keys now; every version (and the new one) ends up under `kek`.
    let kek = new_kek.as_ref().unwrap_or(&old_kek);
    if shown.reencrypting {
        eprintln!("volume {} is being re-encrypted to key version {} ({}% done): following it", req.name, shown.key_version, percent(&shown));
    } else {
        let keys = rewrapped(admin, &req.name, &old_kek, kek, true).await?;
        let v = propose(admin, &req.name, keys, true, req.rate).await?;
        let kek_note = if old_kek.fingerprint() == kek.fingerprint() { "" } else { " (the old KEK no longer opens the volume)" };
        eprintln!("volume {}: new writes are sealed with key version {}; moving the existing blocks to it{kek_note}", v.name, v.key_version);
    }
    let done = follow(admin, out, &req.name, kek).await?;
    out.print(volume_json(&done), || {
        format!("re-encrypted volume {} to key version {}; the older data keys are erased from every meta node", done.name, done.key_version)
    });
    Ok(())
}

async fn show(admin: &Admin, name: &str) -> Result<Volume, CliError> {
    let r = admin
        .call(|mut c| {
            let name = name.to_string();
            async move { c.volume_show(VolumeShowRequest { name, usage: false }).await }
        })
        .await?;
    r.volume.ok_or_else(|| CliError::other("the cluster returned no volume"))
}

/// Every key version of `name` opened with `old` and wrapped under `new`, plus (with
/// `add_version`) a fresh data key one version above the newest.
async fn rewrapped(admin: &Admin, name: &str, old: &Kek, new: &Kek, add_version: bool) -> Result<Vec<VersionedKey>, CliError> {
    let current = admin
        .call(|mut c| {
            let name = name.to_string();
            async move { c.volume_key(VolumeKeyRequest { name }).await }
        })
        .await?;
    let mut keys = Vec::with_capacity(current.keys.len() + 1);
    for k in &current.keys {
        let wrapped = WrappedKey::parse(name, &k.wrapped).map_err(crypt_err)?;
        let again = rewrap(&wrapped, old, new, name).map_err(crypt_err)?;
        keys.push(VersionedKey { version: k.version, wrapped: bytes::Bytes::copy_from_slice(again.as_bytes()), sealed_as: 0 });
    }
    if add_version {
        let next = keys.iter().map(|k| k.version).max().unwrap_or(0) + 1;
        let (_, wrapped) = DataKey::generate(next, new, name).map_err(crypt_err)?;
        keys.push(VersionedKey { version: next, wrapped: bytes::Bytes::copy_from_slice(wrapped.as_bytes()), sealed_as: 0 });
    }
    Ok(keys)
}

/// Every key version of encrypted volume `source`, opened with `kek` and wrapped again under it
/// for volume `target`, then a fresh data key one version above the newest: the keys a clone
/// of `source` starts with (it seals only with the fresh one).
pub async fn keys_for_clone(admin: &Admin, source: &str, target: &str, kek: &Kek) -> Result<Vec<VersionedKey>, CliError> {
    let theirs = admin
        .call(|mut c| {
            let name = source.to_string();
            async move { c.volume_key(VolumeKeyRequest { name }).await }
        })
        .await?;
    copied_keys(&theirs, source, target, kek)
}

/// The same for a restore of backup `id` of volume `source` into new volume `target`.
pub async fn keys_for_restore(admin: &Admin, id: u64, source: &str, target: &str, kek: &Kek) -> Result<Vec<VersionedKey>, CliError> {
    let theirs = admin.call(|mut c| async move { c.backup_key(BackupShowRequest { id }).await }).await?;
    copied_keys(&theirs, source, target, kek)
}

/// `theirs` (wrapped for volume `source`) opened with `kek` and wrapped for `target`, then a
/// fresh version one above the newest.
fn copied_keys(theirs: &VolumeKeyReply, source: &str, target: &str, kek: &Kek) -> Result<Vec<VersionedKey>, CliError> {
    let mut keys = Vec::with_capacity(theirs.keys.len() + 1);
    for k in &theirs.keys {
        let wrapped = WrappedKey::parse(source, &k.wrapped).map_err(crypt_err)?;
        let copy = rewrap_for(&wrapped, kek, source, target).map_err(crypt_err)?;
        keys.push(VersionedKey { version: k.version, wrapped: bytes::Bytes::copy_from_slice(copy.as_bytes()), sealed_as: 0 });
    }
    let next = keys.iter().map(|k| k.version).max().unwrap_or(0) + 1;
    let (_, wrapped) = DataKey::generate(next, kek, target).map_err(crypt_err)?;
    keys.push(VersionedKey { version: next, wrapped: bytes::Bytes::copy_from_slice(wrapped.as_bytes()), sealed_as: 0 });
    Ok(keys)
}

async fn propose(admin: &Admin, name: &str, keys: Vec<VersionedKey>, reencrypt: bool, rate: u64) -> Result<Volume, CliError> {
    let r = admin
        .call(|mut c| {
            let req = VolumeRekeyRequest { name: name.to_string(), keys: keys.clone(), reencrypt, reencrypt_rate: rate };
            async move { c.volume_rekey(req).await }
        })
        .await?;
    r.volume.ok_or_else(|| CliError::other("the cluster returned no volume"))
}

/// Shows the re-encryption's progress until it is done: while the volume is attached its
/// holder moves the blocks; while it is not, this process attaches and moves them.
async fn follow(admin: &Admin, out: Out, name: &str, kek: &Kek) -> Result<Volume, CliError> {
    let display = Display::new(out, name);
    let (mut last_block, mut moved_at) = (u64::MAX, std::time::Instant::now());
    let mut warned = false;
    loop {
        let v = show(admin, name).await?;
        if !v.reencrypting {
            display.finish();
            return Ok(v);
        }
        if v.attached_by.is_empty() {
            if let Err(e) = walk_here(admin, name, kek, &display).await {
                // Someone attached meanwhile (fencing this process): its holder goes on.
                // Anything else is this process's problem, and said so.
                if show(admin, name).await?.attached_by.is_empty() {
                    display.abandon();
                    return Err(CliError::other(format!("re-encrypting volume {name}: {e} (run the command again to resume)")));
                }
                eprintln!("volume {name}: {e}; following its new holder");
            }
            continue;
        } else {
            display.show(v.reencrypt_next_block, v.size / BLOCK_SIZE);
            if v.reencrypt_next_block != last_block {
                (last_block, moved_at) = (v.reencrypt_next_block, std::time::Instant::now());
            } else if moved_at.elapsed() >= STALL_WARNING && !warned {
                warned = true;
                eprintln!(
                    "volume {name}: its holder ({}) has not moved any block for {}s. It needs the new KEK in the --kek-file it was started with \
                     (its log says why not); interrupting this command does not stop the re-encryption",
                    v.attached_by,
                    STALL_WARNING.as_secs()
                );
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Attaches the volume here and moves its blocks.
async fn walk_here(admin: &Admin, name: &str, kek: &Kek, display: &Display) -> Result<(), String> {
    let cluster = Cluster::connect_with(admin.addrs(), admin.credentials().client_options()).await.map_err(|e| e.to_string())?;
    let (id, keys, current) = cluster.volume_keys(name, &[kek]).await.map_err(|e| e.to_string())?;
    let cipher = basalt_volume_client::crypt::VolumeCipher::new(id, keys, current).map_err(|e| e.to_string())?;
    let holder = format!("rekey:{}:{}", crate::attach::host(), std::process::id());
    let volume = match cluster.attach_volume(name, &holder, false).await {
        Ok(v) => v.with_cipher(cipher),
        Err(ClientError::Admin(m)) if m.contains("already attached") => return Err(m),
        Err(e) => return Err(e.to_string()),
    };
    let shown = show(admin, name).await.map_err(|e| e.message)?;
    let result = reencrypt::run(&cluster, &volume, shown.key_version, shown.reencrypt_next_block, shown.reencrypt_rate, |p| {
        display.show(p.next_block, p.total_blocks)
    })
    .await;
    // Detached either way: a failed walk resumes from its last report.
    let _ = cluster.detach_volume(&volume).await;
    result.map(|_| ()).map_err(|e| e.to_string())
}

/// A progress bar on a terminal, percentages otherwise (JSON lines with `--json`).
struct Display {
    bar: Option<indicatif::ProgressBar>,
    json: bool,
    name: String,
    last_pct: std::sync::atomic::AtomicU64,
}

impl Display {
    fn new(out: Out, name: &str) -> Display {
        let bar = (std::io::stderr().is_terminal() && !out.json).then(|| {
            let b = indicatif::ProgressBar::new(100);
            b.set_style(
                indicatif::ProgressStyle::with_template("re-encrypting {msg} [{bar:30}] {pos}% ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(name.to_string());
            b
        });
        Display { bar, json: out.json, name: name.to_string(), last_pct: std::sync::atomic::AtomicU64::new(u64::MAX) }
    }

    fn show(&self, next_block: u64, total_blocks: u64) {
        let pct = Progress { next_block, total_blocks, moved: 0 }.percent();
        if let Some(b) = &self.bar {
            b.set_position(pct);
            return;
        }
        if self.last_pct.swap(pct, std::sync::atomic::Ordering::Relaxed) == pct {
            return;
        }
        if self.json {
            eprintln!("{}", json!({"volume": self.name, "reencrypt_next_block": next_block, "progress_percent": pct}));
        } else {
            eprintln!("re-encrypting {}: {pct}%", self.name);
        }
    }

    fn abandon(&self) {
        if let Some(b) = &self.bar {
            b.abandon();
        }
    }

    fn finish(&self) {
        match &self.bar {
            Some(b) => {
                b.set_position(100);
                b.finish();
            }
            None => self.show(1, 1),
        }
    }
}
