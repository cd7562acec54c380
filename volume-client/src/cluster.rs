//! A client's view of the cluster: the cached map, connections and leader hints.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use basalt_common::{NodeId, PgId};
use basalt_proto::admin::admin_client::AdminClient;
use basalt_proto::admin::{GetClusterMapRequest, VolumeAttachRequest, VolumeDetachRequest, VolumeShowRequest};
use basalt_proto::view::ClusterView;
use basalt_security::grpc::{AuthChannel, Bearer};
use basalt_security::{Dialer, Expect, Token};
use tonic::transport::Channel;

use crate::data_conn::{ConnectError, DataConn};
use crate::error::ClientError;
use crate::volume::Volume;

/// Tuning of a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Give up on an I/O after this long (retrying across leader changes meanwhile).
    pub op_timeout: Duration,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Requests in flight per volume at most (backpressure beyond).
    pub max_inflight: usize,
    /// Bytes of write payload in flight per volume at most.
    pub max_inflight_bytes: usize,
    /// How connections are opened (TLS against the cluster CA; plaintext only with the
    /// cluster's security off) and the credentials sent on them.
    pub security: ClientSecurity,
}

/// A client's TLS and credentials.
#[derive(Clone, Debug, Default)]
pub struct ClientSecurity {
    /// Opens connections: TLS verifying the nodes against the cluster CA (`Dialer::new(None)`:
    /// plaintext, for a cluster running with security off).
    pub dialer: Dialer,
    /// The bearer token sent with every request and data connection.
    pub token: Option<Token>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            op_timeout: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(10),
            max_inflight: 128,
            max_inflight_bytes: 64 << 20,
            security: ClientSecurity::default(),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) seeds: Vec<String>,
    pub(crate) options: ClientOptions,
    map: RwLock<Arc<ClusterView>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Framed data-protocol connections, one per node address.
    data_conns: Mutex<HashMap<String, Arc<DataConn>>>,
    leaders: Mutex<HashMap<PgId, NodeId>>,
    refresh: tokio::sync::Mutex<()>,
    /// Successful map fetches so far (lets a caller skip a fetch another one just made).
    fetches: std::sync::atomic::AtomicU64,
    /// This client's session id, stamped on writes with their connection's number: a node
    /// then drops writes of a connection this client gave up once a newer one arrived (see
    /// storage-node `pg::sessions`).
    session: u64,
    /// Data connections opened so far (the next one's number).
    connections: std::sync::atomic::AtomicU64,
}

/// A connection to a Basalt cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
}

fn channel_for(addr: &str, dialer: &Dialer) -> Result<Channel, ClientError> {
    basalt_security::grpc::channel(addr, dialer, Expect::AnyNode, |ep| {
        ep.connect_timeout(Duration::from_secs(2)).initial_stream_window_size(Some(8 << 20)).initial_connection_window_size(Some(32 << 20))
    })
    .map_err(ClientError::Invalid)
}

impl Cluster {
    /// Connects through `seeds` (any nodes' gRPC addresses) and fetches the cluster map.
    pub async fn connect(seeds: &[String]) -> Result<Self, ClientError> {
        Self::connect_with(seeds, ClientOptions::default()).await
    }

    /// Like [`Cluster::connect`] with explicit options.
    pub async fn connect_with(seeds: &[String], options: ClientOptions) -> Result<Self, ClientError> {
        let seeds: Vec<String> = seeds.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if seeds.is_empty() {
            return Err(ClientError::Invalid("no cluster address given (use --cluster or BASALT_CLUSTER)".into()));
        }
        let cluster = Cluster {
            inner: Arc::new(Inner {
                seeds,
                options,
                map: RwLock::new(Arc::new(ClusterView::default())),
                channels: Mutex::new(HashMap::new()),
                data_conns: Mutex::new(HashMap::new()),
                leaders: Mutex::new(HashMap::new()),
                refresh: tokio::sync::Mutex::new(()),
                fetches: std::sync::atomic::AtomicU64::new(0),
                session: rand::random::<u64>().max(1),
                connections: std::sync::atomic::AtomicU64::new(0),
            }),
        };
        cluster.refresh(0).await?;
        Ok(cluster)
    }

    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut channels = self.inner.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = channel_for(addr, &self.inner.options.security.dialer)?;
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// An admin client for one of the seeds (the cluster forwards to the meta leader), sending
    /// this client's token.
    pub fn admin(&self, seed_index: usize) -> Result<AdminClient<AuthChannel>, ClientError> {
        let seed = &self.inner.seeds[seed_index % self.inner.seeds.len()];
        let bearer = Bearer::new(self.inner.options.security.token.as_ref());
        Ok(AdminClient::with_interceptor(self.channel(seed)?, bearer)
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES))
    }

    /// The data connection to `addr`, opened (or reopened after a failure) on demand.
    pub(crate) async fn data_conn(&self, addr: &str) -> Result<Arc<DataConn>, ConnectError> {
        if let Some(c) = self.inner.data_conns.lock().unwrap_or_else(|p| p.into_inner()).get(addr)
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        // Connect outside the lock: a dead node's connect timeout must not hold up the others.
        // Two callers racing here both connect; the higher-numbered connection is kept and the
        // other dropped unused (a node would refuse writes on it once it saw the other).
        let number = self.inner.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let security = &self.inner.options.security;
        let conn = DataConn::connect(addr, &security.dialer, security.token.as_ref(), self.inner.session, number).await?;
        let mut conns = self.inner.data_conns.lock().unwrap_or_else(|p| p.into_inner());
        match conns.get(addr) {
            Some(other) if !other.is_dead() && other.number > conn.number => Ok(other.clone()),
            _ => {
                conns.insert(addr.to_string(), conn.clone());
                Ok(conn)
            }
        }
    }

    /// The cached map.
    pub fn map(&self) -> Arc<ClusterView> {
        self.inner.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fetches the map if the cached one is older than `min_version` (0: always fetch).
    pub async fn refresh(&self, min_version: u64) -> Result<Arc<ClusterView>, ClientError> {
        let _guard = self.inner.refresh.lock().await;
        let current = self.map();
        if min_version != 0 && current.version >= min_version {
            return Ok(current);
        }
        self.fetch().await
    }

    /// How many map fetches have succeeded (for [`Cluster::refresh_unless_fetched`]).
    pub(crate) fn fetch_count(&self) -> u64 {
        self.inner.fetches.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Fetches the map unless a fetch succeeded since the caller read `seen` from
    /// [`Cluster::fetch_count`]: many requests retrying at once cause one fetch, not one each.
    pub(crate) async fn refresh_unless_fetched(&self, seen: u64) -> Result<(), ClientError> {
        let _guard = self.inner.refresh.lock().await;
        if self.fetch_count() != seen {
            return Ok(());
        }
        self.fetch().await.map(|_| ())
    }

    /// Asks the seeds in turn for the map; call with the refresh lock held.
    async fn fetch(&self) -> Result<Arc<ClusterView>, ClientError> {
        let mut last = String::new();
        for i in 0..self.inner.seeds.len() * 2 {
            let mut admin = self.admin(i)?;
            let req = GetClusterMapRequest { known_version: 0, wait_ms: 0 };
            // A map request is answered at once; a seed silent for 3 s is cut off or frozen.
            match tokio::time::timeout(Duration::from_secs(3), admin.get_cluster_map(req)).await {
                Ok(Ok(resp)) => {
                    let view = Arc::new(ClusterView::from_proto(&resp.into_inner()));
                    *self.inner.map.write().unwrap_or_else(|p| p.into_inner()) = view.clone();
                    self.inner.fetches.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    return Ok(view);
                }
                Ok(Err(status))
                    if matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) =>
                {
                    return Err(ClientError::from_status(&status));
                }
                Ok(Err(status)) => last = status.message().to_string(),
                Err(_) => last = "timed out".into(),
            }
            if i + 1 >= self.inner.seeds.len() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Err(ClientError::Unreachable { seeds: self.inner.seeds.join(","), reason: last })
    }

    /// The meta group's view of volume `name` (`volume show` without usage).
    async fn show_volume(&self, name: &str) -> Result<basalt_proto::admin::VolumeReply, ClientError> {
        let mut admin = self.admin(0)?;
        match admin.volume_show(VolumeShowRequest { name: name.to_string(), usage: false }).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::NotFound => Err(ClientError::NoSuchVolume(name.to_string())),
            Err(s) => Err(ClientError::from_status(&s)),
        }
    }

    /// Opens the volume called `name`.
    pub async fn open_volume(&self, name: &str) -> Result<Volume, ClientError> {
        let reply = self.show_volume(name).await?;
        let map = self.refresh(reply.map_version).await?;
        let v = map.volume_by_name(name).ok_or_else(|| ClientError::NoSuchVolume(name.to_string()))?;
        Ok(Volume::new(self.clone(), v.id, v.placement, v.name.clone(), v.size))
    }

    /// Who holds volume `name`'s read-write attachment (None: nobody), its fencing epoch and
    /// the volume's snapshot write epoch.
    pub async fn attachment(&self, name: &str) -> Result<(Option<String>, u64, u64), ClientError> {
        let v = self.show_volume(name).await?.volume.ok_or_else(|| ClientError::NoSuchVolume(name.to_string()))?;
        Ok(((!v.attached_by.is_empty()).then_some(v.attached_by), v.attach_epoch, v.write_epoch))
    }

    /// Attaches the volume read-write for `holder` and opens it with the new fencing epoch.
    /// Refused while another holder has it, unless `force` (which fences that holder).
    pub async fn attach_volume(&self, name: &str, holder: &str, force: bool) -> Result<Volume, ClientError> {
        let mut admin = self.admin(0)?;
        let req = VolumeAttachRequest { name: name.to_string(), holder: holder.to_string(), force };
        let reply = match admin.volume_attach(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(ClientError::NoSuchVolume(name.to_string()));
            }
            Err(s) => return Err(ClientError::from_status(&s)),
        };
        let v = reply.volume.ok_or_else(|| ClientError::Internal("attach returned no volume".into()))?;
        self.refresh(reply.map_version).await?;
        let placement = basalt_common::VolumeId(if v.placement_id == 0 { v.id } else { v.placement_id });
        let vol = Volume::new(self.clone(), basalt_common::VolumeId(v.id), placement, v.name, v.size);
        vol.set_epoch(v.attach_epoch);
        vol.set_write_epoch(v.write_epoch.max(1));
        Ok(vol)
    }

    /// Opens snapshot `snapshot` of volume `name` (read-only: writes through the handle are
    /// refused).
    pub async fn open_snapshot(&self, name: &str, snapshot: &str) -> Result<Volume, ClientError> {
        let map = self.refresh(0).await?;
        let v = map.volume_by_name(name).ok_or_else(|| ClientError::NoSuchVolume(name.to_string()))?;
        let epoch =
            v.snapshot_epoch(snapshot).ok_or_else(|| ClientError::NoSuchSnapshot { volume: name.to_string(), snapshot: snapshot.to_string() })?;
        Ok(Volume::new(self.clone(), v.id, v.placement, v.name.clone(), v.size).at_snapshot(snapshot, epoch))
    }

    /// Opens volume `name` as the holder of its read-write attachment at `attach_epoch`,
    /// from the cluster map alone (a holder resuming its own attachment, such as a backup
    /// node's restore): writes carry that epoch and are fenced once the volume is attached
    /// again.
    pub async fn open_attached(&self, name: &str, attach_epoch: u64) -> Result<Volume, ClientError> {
        let map = self.refresh(0).await?;
        let v = map.volume_by_name(name).ok_or_else(|| ClientError::NoSuchVolume(name.to_string()))?;
        let vol = Volume::new(self.clone(), v.id, v.placement, v.name.clone(), v.size);
        vol.set_epoch(attach_epoch);
        vol.set_write_epoch(v.write_epoch.max(1));
        Ok(vol)
    }

    /// Waits up to `wait` for a map newer than `known` and caches it; returns the newest map
    /// (the cached one if nothing changed or no seed answered in time).
    pub async fn watch_map(&self, known: u64, wait: Duration) -> Arc<ClusterView> {
        let req = GetClusterMapRequest { known_version: known, wait_ms: wait.as_millis().min(30_000) as u32 };
        for i in 0..self.inner.seeds.len() {
            let Ok(mut admin) = self.admin(i) else { continue };
            if let Ok(Ok(resp)) = tokio::time::timeout(wait + Duration::from_secs(3), admin.get_cluster_map(req)).await {
                let view = Arc::new(ClusterView::from_proto(&resp.into_inner()));
                let mut cached = self.inner.map.write().unwrap_or_else(|p| p.into_inner());
                if view.version >= cached.version {
                    *cached = view;
                }
                return cached.clone();
            }
        }
        self.map()
    }

    /// The cipher of encrypted volume `name`: its wrapped data keys, fetched from the meta
    /// group and opened with `kek` here (nothing leaves this host unwrapped).
    pub async fn volume_cipher(&self, name: &str, kek: &crate::crypt::Kek) -> Result<crate::crypt::VolumeCipher, ClientError> {
        let (id, keys, current) = self.volume_keys(name, &[kek]).await?;
        Ok(crate::crypt::VolumeCipher::new(id, keys, current)?)
    }

    /// Encrypted volume `name`'s data keys, each opened with whichever of `keks` wrapped it
    /// (by fingerprint), and the version new blocks are sealed with.
    pub async fn volume_keys(
        &self,
        name: &str,
        keks: &[&crate::crypt::Kek],
    ) -> Result<(basalt_common::VolumeId, Vec<crate::crypt::DataKey>, u32), ClientError> {
        use crate::crypt::WrappedKey;
        let req = basalt_proto::admin::VolumeKeyRequest { name: name.to_string() };
        let reply = match self
            .admin_call(|mut c| {
                let req = req.clone();
                async move { c.volume_key(req).await }
            })
            .await
        {
            Ok(r) => r,
            Err(s) if s.code() == tonic::Code::NotFound => return Err(ClientError::NoSuchVolume(name.to_string())),
            Err(s) if s.code() == tonic::Code::FailedPrecondition || s.code() == tonic::Code::DataLoss => {
                return Err(ClientError::Crypt(s.message().to_string()));
            }
            Err(s) => return Err(ClientError::from_status(&s)),
        };
        let first = keks.first().ok_or_else(|| ClientError::Crypt(format!("volume {name}: no key-encryption key given")))?;
        let mut keys = Vec::with_capacity(reply.keys.len());
        for k in &reply.keys {
            let wrapped = WrappedKey::parse(name, &k.wrapped)?;
            if wrapped.version() != k.version {
                return Err(ClientError::Crypt(format!("volume {name}'s stored key v{} says it is v{}", k.version, wrapped.version())));
            }
            let kek = keks.iter().find(|kek| kek.fingerprint() == wrapped.kek_fingerprint()).unwrap_or(first);
            let key = wrapped.unwrap_with(kek, name)?;
            // An inherited version opens blocks bound to the volume that sealed them.
            keys.push(if k.sealed_as == 0 { key } else { key.inherited_from(basalt_common::VolumeId(k.sealed_as)) });
        }
        Ok((basalt_common::VolumeId(reply.volume_id), keys, reply.current_version))
    }

    /// Runs an admin call against the seeds in turn until one answers: a seed that is down,
    /// silent or without a meta leader is skipped; a refusal is returned as it is.
    pub async fn admin_call<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(AdminClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = tonic::Status::unavailable("no seed answered");
        let seeds = self.inner.seeds.len();
        for i in 0..seeds * 2 {
            let admin = self.admin(i).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            match tokio::time::timeout(Duration::from_secs(10), call(admin)).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown) => last = s,
                Ok(Err(s)) => return Err(s),
                Err(_) => last = tonic::Status::deadline_exceeded(format!("{} did not answer within 10 s", self.inner.seeds[i % seeds])),
            }
            if i + 1 >= seeds {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Err(last)
    }

    /// Ends the attachment `volume` holds (no-op if it was already superseded).
    pub async fn detach_volume(&self, volume: &Volume) -> Result<(), ClientError> {
        let mut admin = self.admin(0)?;
        let req = VolumeDetachRequest { name: volume.name().to_string(), epoch: volume.epoch() };
        admin.volume_detach(req).await.map_err(|s| ClientError::from_status(&s))?;
        Ok(())
    }

    pub(crate) fn leader_hint(&self, pg: PgId) -> Option<NodeId> {
        self.inner.leaders.lock().unwrap_or_else(|p| p.into_inner()).get(&pg).copied()
    }

    pub(crate) fn set_leader_hint(&self, pg: PgId, node: Option<NodeId>) {
        let mut leaders = self.inner.leaders.lock().unwrap_or_else(|p| p.into_inner());
        match node {
            Some(n) => leaders.insert(pg, n),
            None => leaders.remove(&pg),
        };
    }
}
