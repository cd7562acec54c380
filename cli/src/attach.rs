//! `basalt attach` / `basalt detach`: serve a volume over NBD on this host.

use std::path::PathBuf;

use basalt_volume_client::nbd::{Export, NbdOptions, NbdServer};
use basalt_volume_client::{Cluster, Volume};
use tokio::sync::watch;

use crate::exit::CliError;

/// Where to listen.
pub enum Listen {
    /// A unix socket path.
    Socket(PathBuf),
    /// A TCP address.
    Tcp(String),
}

fn client_err(e: basalt_volume_client::ClientError) -> CliError {
    match e {
        basalt_volume_client::ClientError::NoSuchVolume(_) => CliError { code: 3, message: e.to_string() },
        basalt_volume_client::ClientError::Unreachable { .. } => CliError::unreachable(e.to_string()),
        basalt_volume_client::ClientError::Admin(m) if m.contains("already attached") => CliError { code: 7, message: m },
        other => CliError::other(other.to_string()),
    }
}

/// This host's name, for attachment records.
pub fn holder() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Connects, attaches (read-write unless `read_only`) and returns the volume.
pub async fn open(seeds: &[String], name: &str, read_only: bool, force: bool, holder: &str) -> Result<(Cluster, Volume), CliError> {
    let cluster = Cluster::connect(seeds).await.map_err(client_err)?;
    let volume = if read_only { cluster.open_volume(name).await } else { cluster.attach_volume(name, holder, force).await }.map_err(client_err)?;
    Ok((cluster, volume))
}

/// Starts serving `volume` on `listen`; returns the URI clients use and the server task.
pub async fn serve(
    volume: Volume,
    read_only: bool,
    listen: &Listen,
    shutdown: watch::Receiver<bool>,
) -> Result<(String, tokio::task::JoinHandle<()>), CliError> {
    let name = volume.name().to_string();
    let server = NbdServer::new(vec![Export { volume, read_only }], NbdOptions::default());
    match listen {
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| CliError::other(format!("cannot listen on {addr}: {e}")))?;
            let local = listener.local_addr().map_err(|e| CliError::other(e.to_string()))?;
            Ok((format!("nbd://{local}/{name}"), tokio::spawn(server.serve_tcp(listener, shutdown))))
        }
        Listen::Socket(path) => {
            // Replace a stale socket from an earlier run, never any other kind of file.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    let _ = std::fs::remove_file(path);
                } else {
                    return Err(CliError::invalid(format!("{} exists and is not a socket", path.display())));
                }
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(|e| CliError::other(format!("cannot listen on {}: {e}", path.display())))?;
            Ok((format!("nbd+unix:///{name}?socket={}", path.display()), tokio::spawn(server.serve_unix(listener, shutdown))))
        }
    }
}

/// `basalt attach`: serves until Ctrl-C or SIGTERM, then detaches.
pub async fn attach(seeds: &[String], name: &str, listen: Listen, read_only: bool, force: bool) -> Result<(), CliError> {
    let (cluster, volume) = open(seeds, name, read_only, force, &holder()).await?;
    let (tx, rx) = watch::channel(false);
    let (uri, task) = serve(volume.clone(), read_only, &listen, rx).await?;
    if !read_only {
        eprintln!("attached {name} read-write (epoch {})", volume.epoch());
    }
    println!("{uri}");
    println!("ready");
    wait_for_stop().await;
    let _ = tx.send(true);
    let _ = task.await;
    if let Listen::Socket(path) = &listen {
        let _ = std::fs::remove_file(path);
    }
    if !read_only {
        cluster.detach_volume(&volume).await.map_err(client_err)?;
        eprintln!("detached {name}");
    }
    Ok(())
}

/// `basalt detach`: ends whatever attachment the volume has (fencing its holder).
pub async fn detach(seeds: &[String], name: &str) -> Result<(), CliError> {
    let cluster = Cluster::connect(seeds).await.map_err(client_err)?;
    let mut admin = cluster.admin(0).map_err(client_err)?;
    let reply = admin
        .volume_detach(basalt_proto::admin::VolumeDetachRequest { name: name.to_string(), epoch: 0 })
        .await
        .map_err(|s| CliError::from_status(&s))?
        .into_inner();
    let epoch = reply.volume.map(|v| v.attach_epoch).unwrap_or(0);
    println!("detached {name} (epoch now {epoch}; earlier holders are fenced)");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn wait_for_stop() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
