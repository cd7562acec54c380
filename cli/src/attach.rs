//! `basalt attach` / `basalt detach` / `basalt handover`: serve a volume over NBD or
//! vhost-user-blk on this host. `VOLUME@SNAPSHOT` serves a snapshot (read-only). A read-write
//! attachment also cuts the snapshots asked of it (`basalt_volume_client::snapshot_cut`); a
//! `--standby` one holds its writes until write access is handed to it (live migration).
//!
//! Without TLS the NBD side has no authentication of its own: a unix socket is guarded by its
//! file mode, a TCP listener by its address. A plaintext listener on a non-loopback address
//! would hand the volume's data to whoever reaches it; it is refused unless it requires NBD
//! STARTTLS (`--nbd-tls-dir`: clients present a certificate from that directory's CA) or
//! `--insecure-nbd` says the network is private. `--nbd-allow` limits who connects.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use basalt_security::cidr::AllowList;
use basalt_volume_client::crypt::Kek;
use basalt_volume_client::nbd::refusals::{RefusalLog, run_reporter};
use basalt_volume_client::nbd::{Export, NbdOptions, NbdServer};
use basalt_volume_client::reencrypt::{KekSource, KeyEvent, Reloader, keep_keys};
use basalt_volume_client::snapshot_cut::{CutEvent, run_snapshot_cutter};
use basalt_volume_client::vhost_user::{VhostUserError, VhostUserOptions, VhostUserServer};
use basalt_volume_client::{ClientError, Cluster, Volume};
use tokio::sync::watch;

use crate::admin::{Admin, Credentials};
use crate::commands::Out;
use crate::exit::CliError;

/// Where to listen.
pub enum Listen {
    /// A unix socket path.
    Socket(PathBuf),
    /// A TCP address.
    Tcp(String),
    /// A vhost-user-blk device on a unix socket.
    VhostUser {
        /// The socket path.
        path: PathBuf,
        /// Request queues offered.
        queues: u16,
    },
}

/// How to attach.
pub struct Options {
    /// Export read-only (no attachment recorded).
    pub read_only: bool,
    /// Take over from the current holder.
    pub force: bool,
    /// Open without write access and hold writes until write access is handed to this holder
    /// (`basalt handover`) or the current holder releases the volume (live migration).
    pub standby: bool,
    /// Key-encryption key of an encrypted volume.
    pub kek_file: Option<PathBuf>,
    /// Require NBD STARTTLS with the certificates in this directory.
    pub tls_dir: Option<PathBuf>,
    /// Allow a plaintext NBD listener on a non-loopback address.
    pub insecure_nbd: bool,
    /// Who may connect to an NBD TCP listener.
    pub allow: AllowList,
    /// Serve this attachment's metrics on this loopback address (`/metrics`, plain HTTP).
    pub metrics_listen: Option<String>,
}

fn client_err(e: ClientError) -> CliError {
    match e {
        ClientError::NoSuchVolume(_) | ClientError::NoSuchSnapshot { .. } => CliError { code: 3, message: e.to_string() },
        ClientError::Unreachable { .. } => CliError::unreachable(e.to_string()),
        ClientError::Unauthenticated(_) => CliError::unauthenticated(e.to_string()),
        ClientError::PermissionDenied(_) => CliError { code: 9, message: e.to_string() },
        ClientError::Admin(m) if m.contains("already attached") => CliError { code: 7, message: m },
        ClientError::Crypt(m) => CliError::invalid(m),
        other => CliError::other(other.to_string()),
    }
}

/// This host's name.
pub fn host() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

/// Who holds an attachment: this host and the export it serves (`HOST:nbd:ADDR`,
/// `HOST:nbd:PATH` or `HOST:vhost-user:PATH`). The same command line restarted on the same
/// host is the same holder and reclaims its attachment (the old process is fenced); a listener
/// on port 0 is never the same twice, so its holder is this process (`HOST:PID`).
pub fn holder(listen: &Listen) -> String {
    let host = host();
    match listen {
        Listen::Socket(path) => format!("{host}:nbd:{}", path.display()),
        Listen::Tcp(addr) if !addr.ends_with(":0") => format!("{host}:nbd:{addr}"),
        Listen::Tcp(_) => format!("{host}:{}", std::process::id()),
        Listen::VhostUser { path, .. } => format!("{host}:vhost-user:{}", path.display()),
    }
}

/// Connects, attaches (read-write unless `read_only`) and returns the volume. An encrypted
/// volume needs its key-encryption key: the data key is opened with it *before* the
/// attachment is taken, so a wrong or missing KEK fences nobody and writes nothing.
#[allow(clippy::too_many_arguments)]
pub async fn open(
    seeds: &[String],
    creds: &Credentials,
    name: &str,
    read_only: bool,
    force: bool,
    holder: &str,
    kek_file: Option<&std::path::Path>,
) -> Result<(Cluster, Volume), CliError> {
    let (name, snapshot) = if name.contains('@') {
        let (volume, snap) = crate::snapshot::parse_ref(name)?;
        (volume, Some(snap))
    } else {
        (name, None)
    };
    if snapshot.is_some() && !read_only {
        return Err(CliError::usage(format!(
            "{name}@{} is a snapshot, which is read-only: attach it with --read-only",
            snapshot.unwrap_or_default()
        )));
    }
    let cluster = Cluster::connect_with(seeds, creds.client_options()).await.map_err(client_err)?;
    let encrypted = match cluster.map().volume_by_name(name) {
        Some(v) => v.encrypted,
        None => return Err(client_err(ClientError::NoSuchVolume(name.to_string()))),
    };
    let cipher = match (encrypted, kek_file) {
        (true, None) => {
            return Err(CliError::invalid(format!("volume {name} is encrypted: give its key-encryption key with --kek-file")));
        }
        (false, Some(_)) => return Err(CliError::invalid(format!("volume {name} is not encrypted; --kek-file is for encrypted volumes"))),
        (true, Some(path)) => {
            let kek = basalt_volume_client::crypt::Kek::from_file(path).map_err(|e| CliError::invalid(e.to_string()))?;
            Some(cluster.volume_cipher(name, &kek).await.map_err(client_err)?)
        }
        (false, None) => None,
    };
    let volume = match snapshot {
        Some(snap) => cluster.open_snapshot(name, snap).await,
        None if read_only => cluster.open_volume(name).await,
        None => cluster.attach_volume(name, holder, force).await,
    }
    .map_err(client_err)?;
    Ok((
        cluster,
        match cipher {
            Some(c) => volume.with_cipher(c),
            None => volume,
        },
    ))
}

/// Refuses a plaintext NBD TCP listener that is not on loopback, unless the operator said the
/// network is private.
pub fn check_nbd_address(addr: &str, tls: bool, insecure_nbd: bool) -> Result<(), CliError> {
    let parsed: SocketAddr = addr.parse().map_err(|_| CliError::usage(format!("--nbd-listen {addr:?} is not an address like 127.0.0.1:10809")))?;
    if parsed.ip().is_loopback() || tls || insecure_nbd {
        return Ok(());
    }
    Err(CliError::usage(format!(
        "refusing to serve NBD in plaintext on {addr}: NBD carries the volume's data unencrypted and unauthenticated to anyone who reaches it. \
         Require TLS (--nbd-tls-dir DIR, see `basalt cert nbd`), listen on loopback or a unix socket (--nbd-socket), \
         or pass --insecure-nbd if that network is private"
    )))
}

/// The NBD TLS configuration from `dir`, or a usage error naming what is wrong with it.
pub fn load_nbd_tls(dir: &std::path::Path) -> Result<std::sync::Arc<rustls::ServerConfig>, CliError> {
    basalt_security::nbd_tls::server_config(dir).map_err(|e| CliError::invalid(format!("--nbd-tls-dir {}: {e}", dir.display())))
}

/// Starts serving `volume` on `listen`; returns the URI clients use (`vhost-user:PATH` for a
/// vhost-user-blk socket) and the server task.
pub async fn serve(
    volume: Volume,
    read_only: bool,
    listen: &Listen,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    allow: AllowList,
    refusals: Option<std::sync::Arc<RefusalLog>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(String, tokio::task::JoinHandle<()>), CliError> {
    let name = volume.export_name();
    let nbd = |volume: Volume| {
        let mut server = NbdServer::new(vec![Export { volume, read_only }], NbdOptions::default());
        if let Some(config) = tls.clone() {
            server = server.with_tls(config);
        }
        if let Some(log) = refusals.clone() {
            server = server.with_refusal_log(log);
        }
        server
    };
    // QEMU's and libnbd's URI scheme for TLS is nbds.
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    match listen {
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| CliError::other(format!("cannot listen on {addr}: {e}")))?;
            let local = listener.local_addr().map_err(|e| CliError::other(e.to_string()))?;
            Ok((format!("{scheme}://{local}/{name}"), tokio::spawn(nbd(volume).serve_tcp(listener, allow, shutdown))))
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
            Ok((format!("{scheme}+unix:///{name}?socket={}", path.display()), tokio::spawn(nbd(volume).serve_unix(listener, shutdown))))
        }
        Listen::VhostUser { path, queues } => {
            let options = VhostUserOptions { queues: *queues, read_only };
            let server = VhostUserServer::bind(volume, path, options).map_err(|e| match e {
                VhostUserError::NotASocket(_) => CliError::invalid(e.to_string()),
                other => CliError::other(other.to_string()),
            })?;
            server.spawn().map_err(|e| CliError::other(format!("cannot start the vhost-user thread: {e}")))?;
            // The device's threads live as long as the process; the task marks the serving time.
            let mut shutdown = shutdown;
            let task = tokio::spawn(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            });
            Ok((format!("vhost-user:{}", path.display()), task))
        }
    }
}

/// `basalt attach`: serves until Ctrl-C or SIGTERM, then detaches.
pub async fn attach(admin: &Admin, out: Out, name: &str, listen: Listen, opts: Options) -> Result<(), CliError> {
    if let Listen::Tcp(addr) = &listen {
        check_nbd_address(addr, opts.tls_dir.is_some(), opts.insecure_nbd)?;
    }
    // Certificates and the metrics address are checked before the volume is attached: a bad
    // one attaches nothing.
    let tls = opts.tls_dir.as_deref().map(load_nbd_tls).transpose()?;
    let metrics = match &opts.metrics_listen {
        Some(addr) => {
            let addr = basalt_metrics::loopback_listen(addr).map_err(|e| CliError::usage(format!("--metrics-listen: {e}")))?;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| CliError::other(format!("--metrics-listen {addr}: {e}")))?;
            Some(listener)
        }
        None => None,
    };
    let me = holder(&listen);
    // A standby opens the volume like a reader; its writes wait for the handover.
    let (cluster, volume) =
        open(admin.addrs(), admin.credentials(), name, opts.read_only || opts.standby, opts.force, &me, opts.kek_file.as_deref()).await?;
    if opts.standby {
        volume.hold_writes();
    }
    let holding = Arc::new(std::sync::atomic::AtomicBool::new(!opts.read_only && !opts.standby));
    let (tx, rx) = watch::channel(false);
    let (log, refusals) = RefusalLog::new();
    tokio::spawn(run_reporter(cluster.clone(), name.to_string(), log.clone(), refusals, rx.clone()));
    let volume = match &opts.kek_file {
        Some(path) => {
            // Follows key rotations; a read-write holder also moves the blocks of a re-encryption.
            let initial = Kek::from_file(path).map_err(|e| CliError::invalid(e.to_string()))?;
            let source = KekSource { path: path.clone(), initial };
            let reloader = Arc::new(Reloader::new(cluster.clone(), &volume, source).map_err(client_err)?);
            let volume = volume.with_key_reloader(reloader.clone());
            tokio::spawn(keep_keys(cluster.clone(), volume.clone(), reloader, !opts.read_only, key_event_printer(name), rx.clone()));
            volume
        }
        None => volume,
    };
    if !opts.read_only {
        let name = name.to_string();
        let report = move |e: CutEvent| match e {
            CutEvent::Cut { name: snap, write_epoch } => eprintln!("{name}: snapshot {snap} cut (writes now at epoch {write_epoch})"),
            CutEvent::Failed { name: snap, reason } => eprintln!("{name}: snapshot {snap} not cut: {reason}"),
        };
        tokio::spawn(run_snapshot_cutter(cluster.clone(), volume.clone(), report, rx.clone()));
    }
    let (uri, task) = serve(volume.clone(), opts.read_only, &listen, tls, opts.allow, Some(log), rx.clone()).await?;
    let mut metrics_url = None;
    if let Some(listener) = metrics {
        let at = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let (counters, labels) = (volume.metrics().clone(), vec![("volume", name.to_string())]);
        let render = Arc::new(move || {
            let mut e = basalt_metrics::Exposition::default();
            counters.expose(&mut e);
            e.render(labels.clone())
        });
        tokio::spawn(basalt_metrics::serve(listener, render, rx.clone()));
        // On stdout with the export's URI, before `ready`: where to scrape it.
        if !out.json {
            println!("http://{at}/metrics");
        }
        metrics_url = Some(format!("http://{at}/metrics"));
    }
    if opts.standby {
        eprintln!("standby for {name} as {me}: writes wait until `basalt handover {name} --to {me}` or the holder detaches");
        tokio::spawn(take_over(cluster.clone(), volume.clone(), name.to_string(), me.clone(), holding.clone(), rx.clone()));
    } else if !opts.read_only {
        eprintln!("attached {name} read-write (epoch {})", volume.epoch());
    }
    if out.json {
        // One line, for whatever supervises the process to parse.
        let mode = if opts.standby {
            "standby"
        } else if opts.read_only {
            "read-only"
        } else {
            "read-write"
        };
        let ready = serde_json::json!({
            "event": "ready", "volume": name, "export": uri, "metrics_url": metrics_url, "mode": mode,
            "holder": me, "epoch": volume.epoch(),
        });
        println!("{ready}");
    } else {
        println!("{uri}");
        println!("ready");
    }
    wait_for_stop().await;
    let _ = tx.send(true);
    let _ = task.await;
    if let Listen::Socket(path) | Listen::VhostUser { path, .. } = &listen {
        let _ = std::fs::remove_file(path);
    }
    if holding.load(std::sync::atomic::Ordering::Acquire) {
        cluster.detach_volume(&volume).await.map_err(client_err)?;
        eprintln!("detached {name}");
    }
    if out.json {
        println!("{}", serde_json::json!({"event": "stopped", "volume": name, "detached": holding.load(std::sync::atomic::Ordering::Acquire)}));
    }
    Ok(())
}

/// A standby's wait for write access: it is handed to this holder (`basalt handover`, which
/// fences the previous one), or the holder it saw releases the volume and this one attaches.
/// Then the held writes go, with the new epoch.
async fn take_over(
    cluster: Cluster,
    volume: Volume,
    name: String,
    me: String,
    holding: Arc<std::sync::atomic::AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    const WATCH: std::time::Duration = std::time::Duration::from_secs(2);
    let mut saw_holder = false;
    let mut known = 0;
    loop {
        match cluster.attachment(&name).await {
            Ok((Some(holder), epoch, write_epoch)) if holder == me => {
                volume.set_epoch(epoch);
                volume.set_write_epoch(write_epoch.max(1));
                break;
            }
            Ok((Some(_), _, _)) => saw_holder = true,
            Ok((None, _, _)) if saw_holder => match cluster.attach_volume(&name, &me, false).await {
                Ok(attached) => {
                    volume.set_epoch(attached.epoch());
                    volume.set_write_epoch(attached.write_epoch());
                    break;
                }
                Err(e) => eprintln!("{name}: standby could not attach after the holder left: {e}"),
            },
            Ok((None, _, _)) => {}
            Err(ClientError::NoSuchVolume(_)) => {
                eprintln!("{name}: the volume was deleted; this standby will never take over");
                return;
            }
            Err(e) => eprintln!("{name}: standby cannot read the attachment: {e}"),
        }
        // Every attachment change moves the map on: wait for one (or re-check now and then).
        tokio::select! {
            map = cluster.watch_map(known, WATCH) => known = map.version,
            _ = stop.changed() => return,
        }
    }
    holding.store(true, std::sync::atomic::Ordering::Release);
    volume.release_writes();
    eprintln!("attached {name} read-write (epoch {}): handed over to this standby", volume.epoch());
}

/// Prints what the key keeper does to stderr (re-encryption progress every 10%).
fn key_event_printer(name: &str) -> impl FnMut(KeyEvent) + Send + use<> {
    let name = name.to_string();
    let mut shown = u64::MAX;
    move |e| match e {
        KeyEvent::Sealing(v) => eprintln!("{name}: new writes are sealed with key version {v}"),
        KeyEvent::Moving(p) => {
            let tenth = p.percent() / 10;
            if tenth != shown {
                shown = tenth;
                eprintln!("{name}: re-encrypting: {}% ({} blocks moved by this process)", p.percent(), p.moved);
            }
        }
        KeyEvent::Done(v) => eprintln!("{name}: re-encrypted to key version {v}; older data keys erased"),
        KeyEvent::Problem(m) => eprintln!("{name}: {m}"),
    }
}

/// `basalt handover`: gives the volume's read-write attachment to `to` (a standby waiting for
/// it), fencing the previous holder.
pub async fn handover(admin: &Admin, out: Out, name: &str, to: &str) -> Result<(), CliError> {
    if to.trim().is_empty() {
        return Err(CliError::usage("--to needs the holder a standby attachment printed"));
    }
    let req = basalt_proto::admin::VolumeAttachRequest { name: name.to_string(), holder: to.to_string(), force: true };
    let reply = admin
        .call(|mut c| {
            let req = req.clone();
            async move { c.volume_attach(req).await }
        })
        .await?;
    let epoch = reply.volume.map(|v| v.attach_epoch).unwrap_or(0);
    out.print(serde_json::json!({"volume": name, "holder": to, "epoch": epoch}), || {
        format!("handed {name} over to {to} (epoch now {epoch}; the previous holder is fenced)")
    });
    Ok(())
}

/// `basalt detach`: ends whatever attachment the volume has (fencing its holder).
pub async fn detach(admin: &Admin, out: Out, name: &str) -> Result<(), CliError> {
    let req = basalt_proto::admin::VolumeDetachRequest { name: name.to_string(), epoch: 0 };
    let reply = admin
        .call(|mut c| {
            let req = req.clone();
            async move { c.volume_detach(req).await }
        })
        .await?;
    let epoch = reply.volume.map(|v| v.attach_epoch).unwrap_or(0);
    out.print(serde_json::json!({"volume": name, "detached": true, "epoch": epoch}), || {
        format!("detached {name} (epoch now {epoch}; earlier holders are fenced)")
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_nbd_off_loopback_needs_tls_or_an_explicit_opt_out() {
        assert!(check_nbd_address("127.0.0.1:10809", false, false).is_ok());
        assert!(check_nbd_address("[::1]:10809", false, false).is_ok());
        let e = check_nbd_address("0.0.0.0:10809", false, false).unwrap_err();
        assert!(e.message.contains("--nbd-tls-dir"), "{}", e.message);
        assert!(check_nbd_address("10.1.2.3:10809", true, false).is_ok(), "TLS required");
        assert!(check_nbd_address("10.1.2.3:10809", false, true).is_ok(), "--insecure-nbd");
        assert!(check_nbd_address("nonsense", true, true).is_err());
    }
}
