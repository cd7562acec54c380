//! Encrypted volumes' wrapped keys across the meta nodes: a new volume's key is stored in the
//! key stores of a majority of the meta group before the volume is recorded, and an attaching
//! client's request is answered from this node's store, healed from another meta node's copy
//! when this one is missing or damaged (every copy is checked against the digest the meta
//! state holds).
//!
//! The wrapped keys never enter the Raft log, a snapshot or RocksDB: they travel between meta
//! nodes in `KeyPut`/`KeyGet` calls over mutually authenticated TLS, and rest only in the key
//! stores ([`super::key_store`]), which erase them when the volume is deleted.

use std::time::Duration;

use basalt_proto::admin::{KeyGetRequest, KeyPutRequest};
use sha2::{Digest, Sha256};
use tonic::Status;

use super::key_store::{KeyStore, KeyStoreError, MAX_WRAPPED};
use super::state::VolumeKeys;
use crate::node::{MetaHandle, NodeCtx};

/// The wrapped-key format this node accepts (volume-client `crypt::WRAPPED_FORMAT`): it does
/// not read keys, but refuses bytes that are not one.
const WRAPPED_FORMAT: u8 = 1;

/// How long a meta node may take to store or return a key copy.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// SHA-256 of a wrapped key, as the meta state records it.
pub fn digest(wrapped: &[u8]) -> [u8; 32] {
    Sha256::digest(wrapped).into()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn store_err(e: KeyStoreError) -> Status {
    Status::internal(e.to_string())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, KeyStoreError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))?.map_err(store_err)
}

/// Checks that `wrapped` looks like a wrapped key of `version`.
pub fn check_wrapped(wrapped: &[u8], version: u32) -> Result<(), Status> {
    if wrapped.len() > MAX_WRAPPED || wrapped.len() < 5 {
        return Err(Status::invalid_argument(format!("a wrapped key of {} bytes is not one", wrapped.len())));
    }
    if wrapped[0] != WRAPPED_FORMAT {
        return Err(Status::invalid_argument(format!(
            "wrapped-key format {} is unknown to this node (it stores format {WRAPPED_FORMAT})",
            wrapped[0]
        )));
    }
    let v = u32::from_be_bytes([wrapped[1], wrapped[2], wrapped[3], wrapped[4]]);
    if v != version {
        return Err(Status::invalid_argument(format!("the wrapped key is of version {v}, not {version}")));
    }
    Ok(())
}

/// Stores a new volume's wrapped key (version 1) on this node and on enough other meta nodes
/// that a majority of the meta group holds it; the references to record with the volume.
pub async fn store_new(ctx: &NodeCtx, meta: &MetaHandle, wrapped: &[u8]) -> Result<VolumeKeys, Status> {
    check_wrapped(wrapped, 1)?;
    let (key_id, digests) = store_copies(ctx, meta, &[(1, wrapped.to_vec())]).await?;
    Ok(VolumeKeys { key_id, current: 1, digests })
}

/// Stores `versions` (each checked) under a fresh key id on this node and on enough other meta
/// nodes that a majority of the meta group holds them: what a rekey records in place of the
/// volume's current copies, which are erased once it applies. The same data keys keep their
/// versions; the volume's current version is unchanged.
pub async fn store_rewrapped(ctx: &NodeCtx, meta: &MetaHandle, current: u32, versions: &[(u32, Vec<u8>)]) -> Result<VolumeKeys, Status> {
    for (v, w) in versions {
        check_wrapped(w, *v)?;
    }
    let (key_id, digests) = store_copies(ctx, meta, versions).await?;
    Ok(VolumeKeys { key_id, current, digests })
}

async fn store_copies(
    ctx: &NodeCtx,
    meta: &MetaHandle,
    versions: &[(u32, Vec<u8>)],
) -> Result<(u64, std::collections::BTreeMap<u32, [u8; 32]>), Status> {
    let key_id = rand::random::<u64>().max(1);
    let (keys, copies, now) = (meta.keys.clone(), versions.to_vec(), now_ms());
    blocking(move || copies.iter().try_for_each(|(v, w)| keys.put(key_id, *v, w, now))).await?;
    let voters = meta.group.status().voters.clone();
    let needed = voters.len() / 2 + 1;
    let me = ctx.config.id.0;
    let puts = voters.iter().filter(|id| **id != me).map(|id| {
        let addr = meta.group.member_addr(*id);
        async move {
            let addr = addr.ok_or_else(|| format!("node-{id}: address unknown"))?;
            let mut client = ctx.clients.admin(&addr).map_err(|e| format!("node-{id}: {}", e.message()))?;
            for (version, wrapped) in versions {
                let req = KeyPutRequest { key_id, version: *version, wrapped: wrapped.clone().into() };
                match tokio::time::timeout(PEER_TIMEOUT, client.key_put(req)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(s)) => return Err(format!("node-{id}: {}", s.message())),
                    Err(_) => return Err(format!("node-{id}: no answer within {PEER_TIMEOUT:?}")),
                }
            }
            Ok(())
        }
    });
    let results = futures::future::join_all(puts).await;
    let stored = 1 + results.iter().filter(|r| r.is_ok()).count();
    if stored < needed {
        // The copies made are orphans the key-store sweep erases.
        let why: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        return Err(Status::unavailable(format!(
            "the volume's keys could be stored on only {stored} of {} meta nodes ({needed} needed): {}",
            voters.len(),
            why.join("; ")
        )));
    }
    for e in results.into_iter().filter_map(Result::err) {
        tracing::warn!(error = %e, "a meta node did not take a copy of a volume's key; it fetches one when asked");
    }
    Ok((key_id, versions.iter().map(|(v, w)| (*v, digest(w))).collect()))
}

/// Version `version` of a volume's wrapped key: this node's copy if it matches its digest,
/// else another meta node's (which then replaces this one's).
pub async fn fetch(ctx: &NodeCtx, meta: &MetaHandle, volume: &str, keys: &VolumeKeys, version: u32) -> Result<Vec<u8>, Status> {
    let want = *keys.digests.get(&version).ok_or_else(|| Status::not_found(format!("volume {volume} has no key version {version}")))?;
    let store = meta.keys.clone();
    let key_id = keys.key_id;
    let local = tokio::task::spawn_blocking(move || store.get(key_id, version)).await.map_err(|e| Status::internal(e.to_string()))?;
    let mut problems = Vec::new();
    match local {
        Ok(Some(w)) if digest(&w) == want => return Ok(w),
        Ok(Some(_)) => problems.push(format!("node-{}: its copy does not match the recorded digest", ctx.config.id.0)),
        Ok(None) => problems.push(format!("node-{}: no copy", ctx.config.id.0)),
        Err(e) => problems.push(format!("node-{}: {e}", ctx.config.id.0)),
    }
    let me = ctx.config.id.0;
    for id in meta.group.status().voters.iter().filter(|id| **id != me) {
        let Some(addr) = meta.group.member_addr(*id) else { continue };
        let Ok(mut client) = ctx.clients.admin(&addr) else { continue };
        match tokio::time::timeout(PEER_TIMEOUT, client.key_get(KeyGetRequest { key_id, version })).await {
            Ok(Ok(r)) if digest(&r.get_ref().wrapped) == want => {
                let wrapped = r.into_inner().wrapped.to_vec();
                let (store, copy, now) = (meta.keys.clone(), wrapped.clone(), now_ms());
                match blocking(move || store.put(key_id, version, &copy, now)).await {
                    Ok(()) => {
                        tracing::warn!(volume, key_id = format!("{key_id:016x}"), version, from = id, "healed this node's copy of a volume key")
                    }
                    Err(e) => tracing::error!(volume, error = %e.message(), "could not store a healed volume key"),
                }
                // The volume may have been deleted while the copy travelled: a deletion erases
                // after it publishes the state, so one of the two erasures catches the copy.
                if !meta.shared.with(|s| s.references_key(key_id)) {
                    let store = meta.keys.clone();
                    let _ = blocking(move || store.erase(key_id)).await;
                    return Err(Status::not_found(format!("volume {volume} was deleted")));
                }
                return Ok(wrapped);
            }
            Ok(Ok(_)) => problems.push(format!("node-{id}: its copy does not match the recorded digest")),
            Ok(Err(s)) => problems.push(format!("node-{id}: {}", s.message())),
            Err(_) => problems.push(format!("node-{id}: no answer within {PEER_TIMEOUT:?}")),
        }
    }
    Err(Status::data_loss(format!(
        "volume {volume}'s stored data key (version {version}) is missing or corrupt on every meta node: {}",
        problems.join("; ")
    )))
}

/// This node's copy (the `KeyGet` handler's body): exactly what is stored, or not found.
pub async fn local(store: &std::sync::Arc<KeyStore>, key_id: u64, version: u32) -> Result<Vec<u8>, Status> {
    let store = store.clone();
    blocking(move || store.get(key_id, version)).await?.ok_or_else(|| Status::not_found(format!("no copy of key {key_id:016x} v{version} here")))
}

/// Stores a copy (the `KeyPut` handler's body).
pub async fn put(store: &std::sync::Arc<KeyStore>, key_id: u64, version: u32, wrapped: Vec<u8>) -> Result<(), Status> {
    check_wrapped(&wrapped, version)?;
    let (store, now) = (store.clone(), now_ms());
    blocking(move || store.put(key_id, version, &wrapped, now)).await
}

/// How often a meta node checks that it holds a good copy of every key the meta state names.
const REPAIR_EVERY: Duration = Duration::from_secs(10);
/// How often it erases copies no volume references.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// On meta nodes, keeps the key store in step with the meta state: every [`REPAIR_EVERY`], a
/// key this node lacks or holds damaged (it was down when the volume was created — creation
/// needs only a majority — or its disk rotted) is copied from another meta node, checked
/// against its digest, so every meta node holds every key, as it holds every other piece of
/// metadata; every [`SWEEP_EVERY`], copies no volume references any more are erased (creations
/// that failed after storing their key; deletions applied while the store could not be
/// written). Deletions erase their key as they apply; the sweep is the safety net.
pub async fn run_key_keeper(ctx: std::sync::Arc<NodeCtx>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(meta) = &ctx.meta else { return };
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPAIR_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        let wanted: Vec<(String, VolumeKeys)> = meta.shared.with(|s| s.key_references());
        for (name, keys) in &wanted {
            for version in keys.digests.keys() {
                // `fetch` checks this node's copy first and replaces a missing or bad one.
                if let Err(e) = fetch(&ctx, meta, name, keys, *version).await {
                    tracing::warn!(volume = %name, version, error = %e.message(), "could not get a good copy of a volume key; retrying");
                }
            }
        }
        if last_sweep.elapsed() < SWEEP_EVERY {
            continue;
        }
        last_sweep = tokio::time::Instant::now();
        let referenced = meta.shared.with(super::key_store::referenced);
        let store = meta.keys.clone();
        match blocking(move || super::key_store::sweep(&store, &referenced, now_ms())).await {
            Ok(erased) if !erased.is_empty() => tracing::info!(count = erased.len(), "erased wrapped keys no volume references"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e.message(), "sweeping the key store failed"),
        }
    }
}
