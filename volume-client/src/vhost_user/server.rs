//! The vhost-user socket: accepts the front end (QEMU, Cloud Hypervisor), one at a time, and
//! again after it disconnects — a VMM that restarts, or that reconnects after this process
//! restarted (QEMU `reconnect-ms` on the chardev), gets a fresh device on the same socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;

use super::backend::{BlkBackend, Device};
use super::request::Memory;
use crate::Volume;

/// Why the vhost-user socket could not be served.
#[derive(Debug, Error)]
pub enum VhostUserError {
    /// The socket could not be created.
    #[error("cannot listen on vhost-user socket {path}: {reason}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
}

/// How a volume is offered over vhost-user-blk.
#[derive(Clone, Copy, Debug)]
pub struct VhostUserOptions {
    /// Request queues (the guest uses up to this many; each served by a task on the runtime).
    pub queues: u16,
    /// Offer a read-only device (VIRTIO_BLK_F_RO).
    pub read_only: bool,
}

/// Most request queues a device offers.
pub const MAX_QUEUES: u16 = 64;

/// Serves one volume on a vhost-user socket.
pub struct VhostUserServer {
    device: Arc<Device>,
    listener: Listener,
    path: PathBuf,
}

impl VhostUserServer {
    /// Binds `path` (replacing a stale socket, never another kind of file) for `volume`. Call
    /// from within the tokio runtime the volume client runs on.
    pub fn bind(volume: Volume, path: &Path, options: VhostUserOptions) -> Result<VhostUserServer, VhostUserError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(VhostUserError::NotASocket(path.to_path_buf()));
            }
        }
        let listener = Listener::new(path, true).map_err(|e| VhostUserError::Listen { path: path.to_path_buf(), reason: e.to_string() })?;
        let queues = options.queues.clamp(1, MAX_QUEUES);
        let device = Arc::new(Device::new(volume, options.read_only, queues, tokio::runtime::Handle::current()));
        tokio::spawn(announce_resizes(device.clone()));
        Ok(VhostUserServer { device, listener, path: path.to_path_buf() })
    }

    /// Accepts front ends until the process ends, each on a thread of its own (the vhost-user
    /// message loop is blocking), one after the other.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("vhost-user".into()).spawn(move || self.run())
    }

    fn run(mut self) {
        let name = self.device.volume().name().to_string();
        loop {
            // A new connection sees the volume's current size (after a resize).
            let volume = self.device.volume().clone();
            let _ = self.device.runtime().block_on(async move { tokio::time::timeout(Duration::from_secs(1), volume.refresh()).await });
            let mem = GuestMemoryAtomic::new(Memory::new());
            let backend = BlkBackend::new(self.device.clone(), mem.clone());
            let mut daemon = match VhostUserDaemon::new(format!("vhost-user-blk {name}"), backend.clone(), mem) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(volume = %name, "vhost-user-blk: cannot create the device: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            if let Err(e) = daemon.start(&mut self.listener) {
                tracing::warn!(volume = %name, socket = %self.path.display(), "vhost-user-blk: accepting a front end failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            tracing::info!(volume = %name, socket = %self.path.display(), "vhost-user-blk: front end connected");
            match daemon.wait() {
                Ok(()) => tracing::info!(volume = %name, "vhost-user-blk: front end disconnected"),
                Err(e) => tracing::warn!(volume = %name, "vhost-user-blk: front end connection ended: {e}"),
            }
            backend.close();
            // Dropping the daemon stops this connection's queue threads.
            drop(daemon);
        }
    }
}

/// Follows the volume's size for as long as the device exists and tells the connected front
/// end of each change, so a running guest sees `basalt volume resize` at once.
async fn announce_resizes(device: Arc<Device>) {
    let name = device.volume().name().to_string();
    let mut size = device.volume().size();
    loop {
        size = match device.volume().wait_for_resize(size).await {
            Ok(new) => new,
            Err(e) => {
                tracing::info!(volume = %name, "vhost-user-blk: no longer following the volume's size: {e}");
                return;
            }
        };
        let announcing = device.clone();
        match tokio::task::spawn_blocking(move || announcing.announce_config_change()).await {
            Ok(Ok(true)) => tracing::info!(volume = %name, size, "vhost-user-blk: resized; the front end was told"),
            Ok(Ok(false)) => tracing::info!(volume = %name, size, "vhost-user-blk: resized; no front end is connected to tell"),
            Ok(Err(e)) => tracing::warn!(volume = %name, size, "vhost-user-blk: resized, but the front end could not be told: {e}"),
            Err(e) => tracing::warn!(volume = %name, "vhost-user-blk: announcing the resize failed: {e}"),
        }
    }
}
