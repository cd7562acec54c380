//! A backup-role node's service: it keeps backups in its store (`basalt_backup`), copies
//! snapshots into it and restores from it when the meta leader hands it the job, and reports
//! each job's end to the meta leader.
//!
//! It reads and writes volumes as a cluster client authenticated by this node's certificate.
//! A sweep every [`SWEEP_EVERY`] squares the store with the catalog: copies of deleted
//! backups are erased, a copy the catalog still calls running but that this node is not
//! running (the node restarted mid-copy) is reported failed, and restores given to this node
//! that are not running here are resumed from their last checkpoint.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_backup::jobs::{CopyJob, Progress};
use basalt_backup::{BackupError, BackupStore};
use basalt_common::NodeId;
use basalt_proto::admin::backup_node_server::BackupNode;
use basalt_proto::admin::{
    BackupCopyStats, BackupListRequest, BackupReportRequest, CopyBackupRequest, CopyRef, JobProgress, ProgressRequest, RunRestoreRequest,
    VerifyCopyReply,
};
use basalt_volume_client::{ClientOptions, ClientSecurity, Cluster};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::access::Access;
use crate::metrics::BackupMetrics;

/// How often the store is squared with the catalog.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// How long a job's end is retried to the meta leader before it is left to the sweep.
const REPORT_FOR: Duration = Duration::from_secs(300);

/// A job running on this node.
#[derive(Default)]
struct Job {
    progress: Progress,
    error: Mutex<Option<String>>,
}

/// The backup node's state: its store, the cluster client its jobs use, its running jobs.
pub struct BackupNodeService {
    id: NodeId,
    access: Arc<Access>,
    store: Arc<BackupStore>,
    seeds: Vec<String>,
    cluster: tokio::sync::OnceCell<Cluster>,
    copies: Mutex<HashMap<u64, Arc<Job>>>,
    restores: Mutex<HashMap<u64, Arc<Job>>>,
    /// Verifications running, by backup id.
    verifies: Mutex<HashMap<u64, Arc<Job>>>,
    metrics: Arc<BackupMetrics>,
}

fn progress_of(job: Option<&Arc<Job>>) -> JobProgress {
    let Some(job) = job else { return JobProgress::default() };
    let p = &job.progress;
    JobProgress {
        running: true,
        done: p.done.load(Relaxed),
        total: p.total.load(Relaxed),
        bytes: p.bytes.load(Relaxed),
        error: job.error.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default(),
    }
}

fn internal(e: BackupError) -> Status {
    Status::internal(e.to_string())
}

impl BackupNodeService {
    /// Opens the store in `dir`. `seeds` are meta nodes' addresses; `access` authenticates the
    /// meta leader's calls and provides this node's certificate for its own.
    pub fn open(id: NodeId, dir: PathBuf, seeds: Vec<String>, access: Arc<Access>, metrics: Arc<BackupMetrics>) -> Result<Arc<Self>, BackupError> {
        let store = Arc::new(BackupStore::open(&dir)?);
        Ok(Arc::new(Self {
            id,
            access,
            store,
            seeds,
            cluster: tokio::sync::OnceCell::new(),
            copies: Mutex::default(),
            restores: Mutex::default(),
            verifies: Mutex::default(),
            metrics,
        }))
    }

    async fn cluster(&self) -> Result<&Cluster, String> {
        self.cluster
            .get_or_try_init(|| async {
                // No token: the node's certificate is its credential.
                let options = ClientOptions { security: ClientSecurity { dialer: self.access.dialer(), token: None }, ..Default::default() };
                Cluster::connect_with(&self.seeds, options).await
            })
            .await
            .map_err(|e| e.to_string())
    }

    /// Tells the meta leader about a job's end (retried for a while; the sweep covers the rest).
    async fn report(&self, req: BackupReportRequest) {
        let deadline = Instant::now() + REPORT_FOR;
        let mut wait = Duration::from_millis(200);
        loop {
            let sent = match self.cluster().await {
                Ok(c) => c
                    .admin_call(|mut a| {
                        let req = req.clone();
                        async move { a.backup_report(req).await }
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.message().to_string()),
                Err(e) => Err(e),
            };
            match sent {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    tracing::warn!(error = %e, backup = req.backup, restore = req.restore_volume, "could not report a backup job to the meta leader");
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Starts the copy of backup `req.id` unless it runs already or is done.
    fn start_copy(self: &Arc<Self>, req: CopyBackupRequest) -> Arc<Job> {
        let mut copies = self.copies.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = copies.get(&req.id) {
            return job.clone();
        }
        if self.store.has(req.id) {
            // Written whole already (a repeated hand-over); the sweep reports it if need be.
            return Arc::new(Job::default());
        }
        let job = Arc::new(Job::default());
        copies.insert(req.id, job.clone());
        let (me, running) = (self.clone(), job.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let spec = CopyJob {
                backup: req.id,
                volume_id: req.volume_id,
                volume: req.volume.clone(),
                snapshot: req.snapshot.clone(),
                epoch: req.epoch,
                size: req.size,
            };
            let outcome = async {
                let cluster = me.cluster().await.map_err(|e| format!("cannot reach the cluster: {e}"))?;
                let snap = cluster.open_snapshot(&req.volume, &req.snapshot).await.map_err(|e| e.to_string())?;
                if snap.id().0 != req.volume_id {
                    return Err(format!("volume {} is not the volume backup {} was taken of any more", req.volume, req.id));
                }
                basalt_backup::jobs::copy(&snap, me.store.clone(), &spec, &running.progress).await.map_err(|e| e.to_string())
            }
            .await;
            let mut report = BackupReportRequest { node: me.id.0, backup: req.id, ..Default::default() };
            let m = &me.metrics;
            m.bytes_read.fetch_add(running.progress.bytes.load(Relaxed), Relaxed);
            match outcome {
                Ok(o) => {
                    m.copies_ok.fetch_add(1, Relaxed);
                    m.bytes_stored.fetch_add(o.stored_bytes, Relaxed);
                    tracing::info!(backup = req.id, volume = %req.volume, data = o.data_bytes, changed = o.changed_bytes, stored = o.stored_bytes, parent = o.parent, "backup copy written");
                    report.stats = Some(BackupCopyStats {
                        node: me.id.0,
                        data_bytes: o.data_bytes,
                        changed_bytes: o.changed_bytes,
                        stored_bytes: o.stored_bytes,
                        parent: o.parent,
                        duration_ms: started.elapsed().as_millis() as u64,
                    });
                }
                Err(e) => {
                    m.copies_failed.fetch_add(1, Relaxed);
                    tracing::warn!(backup = req.id, volume = %req.volume, error = %e, "backup copy failed");
                    report.error = e;
                }
            }
            me.report(report).await;
            me.copies.lock().unwrap_or_else(|e| e.into_inner()).remove(&req.id);
        });
        job
    }

    /// Starts (or resumes) the restore into `req.volume` unless it runs already.
    fn start_restore(self: &Arc<Self>, req: RunRestoreRequest) -> Arc<Job> {
        let mut restores = self.restores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = restores.get(&req.volume_id) {
            return job.clone();
        }
        let job = Arc::new(Job::default());
        restores.insert(req.volume_id, job.clone());
        let (me, running) = (self.clone(), job.clone());
        tokio::spawn(async move {
            let base = BackupReportRequest { node: me.id.0, restore_volume: req.volume_id, ..Default::default() };
            let outcome = async {
                let store = me.store.clone();
                let backup = req.backup;
                let manifest = tokio::task::spawn_blocking(move || store.manifest(backup))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| BackupError::NoCopy(req.backup).to_string())?;
                let cluster = me.cluster().await.map_err(|e| format!("cannot reach the cluster: {e}"))?;
                let volume = cluster.open_attached(&req.volume, req.attach_epoch).await.map_err(|e| e.to_string())?;
                if volume.id().0 != req.volume_id {
                    return Err(format!("volume {} is not the volume being restored any more", req.volume));
                }
                let checkpoint = |next_chunk: u64| {
                    let (me, base) = (me.clone(), base.clone());
                    async move { me.report(BackupReportRequest { next_chunk, ..base }).await }
                };
                basalt_backup::jobs::restore(&volume, me.store.clone(), &manifest, req.next_chunk, &running.progress, checkpoint)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            me.metrics.bytes_restored.fetch_add(running.progress.bytes.load(Relaxed), Relaxed);
            match outcome {
                Ok(()) => {
                    me.metrics.restores_ok.fetch_add(1, Relaxed);
                    tracing::info!(backup = req.backup, volume = %req.volume, "restore written");
                    me.report(BackupReportRequest { done: true, ..base }).await;
                }
                Err(e) => {
                    me.metrics.restores_failed.fetch_add(1, Relaxed);
                    tracing::warn!(backup = req.backup, volume = %req.volume, error = %e, "restore stopped");
                    *running.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                    me.report(BackupReportRequest { error: e, ..base }).await;
                }
            }
            me.restores.lock().unwrap_or_else(|e| e.into_inner()).remove(&req.volume_id);
        });
        job
    }

    /// Squares the store with the catalog (see the module doc). `first`: the node just
    /// started, so a copy the catalog calls running here was cut short.
    async fn sweep(self: &Arc<Self>, first: bool) -> Result<(), String> {
        let store = self.store.clone();
        if let Ok(Ok((pieces, bytes))) = tokio::task::spawn_blocking(move || store.usage()).await {
            self.metrics.store_pieces.store(pieces, Relaxed);
            self.metrics.store_bytes.store(bytes, Relaxed);
        }
        let cluster = self.cluster().await?;
        let list = cluster
            .admin_call(|mut a| async move { a.backup_list(BackupListRequest { volume: String::new(), running_only: false }).await })
            .await
            .map_err(|s| s.message().to_string())?;
        let store = self.store.clone();
        let held = tokio::task::spawn_blocking(move || store.backup_ids()).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        let listed: HashMap<u64, &basalt_proto::admin::Backup> = list.backups.iter().map(|b| (b.id, b)).collect();
        for &id in &held {
            if id < list.next_id && !listed.contains_key(&id) {
                let store = self.store.clone();
                let erased = tokio::task::spawn_blocking(move || store.delete(id)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
                tracing::info!(backup = id, erased, "erased the copy of a deleted backup");
            }
        }
        for b in list.backups.iter().filter(|b| b.state == "running" && b.nodes.contains(&self.id.0) && !b.copies.iter().any(|c| c.node == self.id.0))
        {
            let running = self.copies.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&b.id);
            if running {
                continue;
            }
            let manifest = match held.contains(&b.id) {
                true => {
                    let (store, id) = (self.store.clone(), b.id);
                    tokio::task::spawn_blocking(move || store.manifest(id)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?
                }
                false => None,
            };
            let report = match manifest {
                // Written whole, but the report was lost.
                Some(m) => BackupReportRequest {
                    node: self.id.0,
                    backup: b.id,
                    stats: Some(BackupCopyStats {
                        node: self.id.0,
                        data_bytes: m.chunks.iter().map(|c| u64::from(c.len)).sum(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                None if first => BackupReportRequest {
                    node: self.id.0,
                    backup: b.id,
                    error: format!("{} restarted while copying it; nothing of it is kept — take the backup again", self.id),
                    ..Default::default()
                },
                // Handed to this node while it was unreachable: copy it now.
                None => {
                    let req = CopyBackupRequest {
                        id: b.id,
                        volume: b.volume.clone(),
                        volume_id: b.volume_id,
                        snapshot: b.snapshot.clone(),
                        epoch: b.epoch,
                        size: b.size,
                    };
                    self.start_copy(req);
                    continue;
                }
            };
            self.report(report).await;
        }
        for r in list.restores.iter().filter(|r| r.node == self.id.0) {
            let Some(v) = &r.volume else { continue };
            let failed = r.progress.as_ref().is_some_and(|p| !p.error.is_empty());
            let running = self.restores.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&v.id);
            if !running && !failed {
                tracing::info!(volume = %v.name, backup = r.backup, "resuming a restore");
                let next_chunk = r.progress.as_ref().map_or(0, |p| p.done);
                self.start_restore(RunRestoreRequest {
                    backup: r.backup,
                    volume: v.name.clone(),
                    volume_id: v.id,
                    attach_epoch: v.attach_epoch,
                    next_chunk,
                });
            }
        }
        Ok(())
    }

    /// Runs the sweep until shutdown.
    pub async fn run_sweeper(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut first = true;
        loop {
            match self.sweep(first).await {
                Ok(()) => first = false,
                Err(e) => tracing::debug!(error = %e, "backup sweep deferred"),
            }
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The gRPC face of [`BackupNodeService`].
#[derive(Clone)]
pub struct BackupNodeApi(pub Arc<BackupNodeService>);

#[tonic::async_trait]
impl BackupNode for BackupNodeApi {
    async fn copy_backup(&self, request: Request<CopyBackupRequest>) -> Result<Response<JobProgress>, Status> {
        self.0.access.authorize_meta_call(&request, "CopyBackup").await?;
        let req = request.into_inner();
        let job = self.0.start_copy(req);
        Ok(Response::new(progress_of(Some(&job))))
    }

    async fn run_restore(&self, request: Request<RunRestoreRequest>) -> Result<Response<JobProgress>, Status> {
        self.0.access.authorize_meta_call(&request, "RunRestore").await?;
        let job = self.0.start_restore(request.into_inner());
        Ok(Response::new(progress_of(Some(&job))))
    }

    async fn verify_copy(&self, request: Request<CopyRef>) -> Result<Response<VerifyCopyReply>, Status> {
        self.0.access.authorize_meta_call(&request, "VerifyCopy").await?;
        let id = request.into_inner().id;
        let store = self.0.store.clone();
        let job = Arc::new(Job::default());
        // A second verify of the same copy while one runs shows the newer one's progress.
        self.0.verifies.lock().unwrap_or_else(|e| e.into_inner()).insert(id, job.clone());
        let progress = job.clone();
        let result = tokio::task::spawn_blocking(move || {
            let m = store.manifest(id)?.ok_or(BackupError::NoCopy(id))?;
            Ok::<_, BackupError>(basalt_backup::jobs::verify(&store, &m, &progress.progress))
        })
        .await;
        {
            let mut verifies = self.0.verifies.lock().unwrap_or_else(|e| e.into_inner());
            if verifies.get(&id).is_some_and(|j| Arc::ptr_eq(j, &job)) {
                verifies.remove(&id);
            }
        }
        let (pieces, bytes, bad) = result.map_err(|e| Status::internal(e.to_string()))?.map_err(internal)?;
        if !bad.is_empty() {
            tracing::error!(backup = id, bad = bad.len(), "backup verify found damaged pieces");
        }
        Ok(Response::new(VerifyCopyReply { pieces, bytes, bad }))
    }

    async fn drop_copy(&self, request: Request<CopyRef>) -> Result<Response<JobProgress>, Status> {
        self.0.access.authorize_meta_call(&request, "DropCopy").await?;
        let id = request.into_inner().id;
        let store = self.0.store.clone();
        let erased = tokio::task::spawn_blocking(move || store.delete(id)).await.map_err(|e| Status::internal(e.to_string()))?.map_err(internal)?;
        tracing::info!(backup = id, erased, "erased the copy of a deleted backup");
        Ok(Response::new(JobProgress::default()))
    }

    async fn progress(&self, request: Request<ProgressRequest>) -> Result<Response<JobProgress>, Status> {
        self.0.access.authorize_meta_call(&request, "Progress").await?;
        let req = request.into_inner();
        let job = if req.verify != 0 {
            self.0.verifies.lock().unwrap_or_else(|e| e.into_inner()).get(&req.verify).cloned()
        } else if req.backup != 0 {
            self.0.copies.lock().unwrap_or_else(|e| e.into_inner()).get(&req.backup).cloned()
        } else {
            self.0.restores.lock().unwrap_or_else(|e| e.into_inner()).get(&req.restore_volume).cloned()
        };
        Ok(Response::new(progress_of(job.as_ref())))
    }
}
