//! `basalt`: the Basalt admin CLI.

mod admin;
mod attach;
mod backup;
mod commands;
mod dev;
mod exit;
mod health;
mod qos;
mod rekey;
mod schedule;
mod scrub;
mod security;
mod snapshot;
mod support;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands::Out;
use crate::exit::CliError;

/// mimalloc instead of glibc malloc: per-I/O buffers and futures made malloc/free ~9% of CPU
/// on the 4 KiB paths, with arena-lock contention between threads.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "basalt", version, about = "Administer a Basalt block-storage cluster", after_help = EXIT_CODES)]
struct Cli {
    /// Nodes' gRPC addresses (any nodes; meta nodes preferred), comma separated.
    #[arg(long, global = true, env = "BASALT_CLUSTER")]
    cluster: Option<String>,
    /// The cluster CA certificate (PEM) that nodes are verified against.
    #[arg(long, global = true, env = "BASALT_CA")]
    ca: Option<PathBuf>,
    /// A file holding the bearer token to authenticate with (else the BASALT_TOKEN variable).
    #[arg(long, global = true, env = "BASALT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// A client certificate (PEM) issued by the cluster CA (`cluster init` authenticates with one).
    #[arg(long, global = true, env = "BASALT_CERT")]
    cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, global = true, env = "BASALT_KEY")]
    key: Option<PathBuf>,
    /// Talk plaintext, without a CA: only to a cluster running with security off.
    #[arg(long, global = true)]
    insecure: bool,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 failure, 2 usage, 3 not found, 4 already exists, 5 invalid argument, 6 cluster unreachable, 7 not possible in the cluster's state, 8 unauthenticated, 9 permission denied, 10 verification failed";

#[derive(Subcommand)]
enum Cmd {
    /// Is the cluster healthy, and if not, what to do (exit 11 when something needs
    /// attention): nodes, placement groups, rebuilds, space, scrub findings, backups,
    /// certificates.
    Status,
    /// Gather what support needs into a new directory under DIR: health, cluster status,
    /// volumes, backups, and each node's log tail, configuration (secrets redacted), settings,
    /// metrics and scrubber. No token, key or volume data is included.
    SupportBundle {
        /// Where to create the bundle's directory.
        dir: PathBuf,
    },
    /// Create the cluster or show its state.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Storage nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Serve a volume on this host over NBD or vhost-user-blk (one read-write attachment per
    /// volume).
    #[command(group = clap::ArgGroup::new("export").required(true).args(["nbd_socket", "nbd_listen", "vhost_user_socket"]))]
    Attach {
        /// Volume name, or VOLUME@SNAPSHOT to serve a snapshot (with --read-only).
        volume: String,
        /// Serve NBD on this unix socket.
        #[arg(long)]
        nbd_socket: Option<PathBuf>,
        /// Serve NBD on this TCP address, e.g. 127.0.0.1:10809.
        #[arg(long)]
        nbd_listen: Option<String>,
        /// Serve a vhost-user-blk device on this unix socket (QEMU `-chardev socket,path=PATH`
        /// with `-device vhost-user-blk-pci`; guest memory must be shared, e.g. memfd).
        #[arg(long, value_name = "PATH")]
        vhost_user_socket: Option<PathBuf>,
        /// Request queues of the vhost-user-blk device (1-64; the guest uses up to this many).
        #[arg(long, value_name = "N", default_value_t = 4, requires = "vhost_user_socket")]
        queues: u16,
        /// Export read-only (no attachment is recorded; writes are refused).
        #[arg(long)]
        read_only: bool,
        /// Take over a volume attached elsewhere at once; the previous holder is fenced.
        #[arg(long, conflicts_with = "standby")]
        force: bool,
        /// Live-migration destination: serve the volume but hold its writes (they wait, they do
        /// not fail) until write access is handed to this attachment (`basalt handover`) or the
        /// current holder detaches.
        #[arg(long, conflicts_with = "read_only")]
        standby: bool,
        /// Key-encryption key of an encrypted volume (the file given at `volume create`).
        #[arg(long, value_name = "FILE")]
        kek_file: Option<PathBuf>,
        /// Require NBD STARTTLS on every connection with the certificates in DIR (QEMU's x509
        /// layout, made by `basalt cert nbd`); clients must present a certificate from DIR's CA.
        #[arg(long, value_name = "DIR")]
        nbd_tls_dir: Option<PathBuf>,
        /// Serve NBD over TCP on a non-loopback address in plaintext. NBD carries the volume's
        /// data unencrypted and unauthenticated: only on a network nobody else reaches.
        #[arg(long, conflicts_with = "nbd_tls_dir")]
        insecure_nbd: bool,
        /// Only these source addresses may connect to the NBD TCP listener (CIDR, repeatable;
        /// default: any that reach it).
        #[arg(long = "nbd-allow", value_name = "CIDR")]
        nbd_allow: Vec<String>,
        /// Serve this attachment's metrics (requests, bytes, errors and latency histograms per
        /// operation) at http://ADDR/metrics; a loopback IP:PORT (plain HTTP).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// Move a volume's write access to another holder (a `--standby` attachment, at the
    /// moment the VMM switches over in a live migration); the previous holder is fenced.
    Handover {
        /// Volume name.
        volume: String,
        /// The holder to hand over to, as its standby printed it (HOST:nbd:... or
        /// HOST:vhost-user:PATH).
        #[arg(long)]
        to: String,
    },
    /// End a volume's read-write attachment, fencing its holder.
    Detach {
        /// Volume name.
        volume: String,
    },
    /// Scrubbing: freed space overwritten before reuse, stored blocks verified and repaired.
    #[command(subcommand)]
    Scrub(ScrubCmd),
    /// Snapshots: read-only, stable images of a volume, crash-consistent under live writes.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Backups: snapshots copied to backup-role nodes, incrementally.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Backup schedules, run by the meta leader.
    #[command(subcommand)]
    Schedule(ScheduleCmd),
    /// A local development cluster.
    #[command(subcommand)]
    Dev(DevCmd),
    /// The cluster CA and the certificates it issues (no cluster needed).
    #[command(subcommand)]
    Cert(CertCmd),
    /// Bearer tokens: roles, volume grants, expiry, source blocks.
    #[command(subcommand)]
    Auth(AuthCmd),
    /// The audit log: who did what, when, from where, with what outcome.
    #[command(subcommand)]
    Audit(AuditCmd),
}

#[derive(Subcommand)]
enum CertCmd {
    /// Create a cluster CA in DIR (ca.pem, and ca.key readable only by its owner).
    Init {
        /// Directory for the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = basalt_security::certs::CA_DAYS)]
        days: u32,
    },
    /// Issue a node's or a client's certificate from the CA in DIR (replacing an earlier one:
    /// that is how certificates rotate; nodes pick the new files up without a restart).
    Issue {
        /// Directory of the CA.
        #[arg(long)]
        dir: PathBuf,
        /// A node's certificate, for node id N.
        #[arg(long, conflicts_with = "client", required_unless_present = "client")]
        node: Option<u64>,
        /// A client's certificate (a-z, 0-9, '-').
        #[arg(long)]
        client: Option<String>,
        /// Where to write NAME.pem and NAME.key (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = basalt_security::certs::CERT_DAYS)]
        days: u32,
        /// Further DNS names or IP addresses the certificate names (repeatable).
        #[arg(long)]
        san: Vec<String>,
    },
    /// Create a certificate directory for NBD STARTTLS in QEMU's x509 layout (its own CA, a
    /// server certificate for `basalt attach --nbd-tls-dir`, a client certificate for QEMU's
    /// `tls-creds-x509` or nbdinfo's `tls-certificates`). Replace the whole directory to rotate.
    Nbd {
        /// Directory to create the files in (none of them may exist).
        #[arg(long)]
        out: PathBuf,
        /// Address or DNS name clients dial the NBD listener by (repeatable; QEMU checks it).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = basalt_security::certs::CERT_DAYS)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum AuthCmd {
    /// Tokens.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token; it is shown once (or written to --out) and stored only as a hash.
    Create {
        /// admin, operator, hypervisor, backup or reader.
        #[arg(long)]
        role: String,
        /// Limit the token to this volume (repeatable; default: every volume its role reaches).
        #[arg(long)]
        volume: Vec<String>,
        /// Lifetime, e.g. 30d, 12h (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
        /// Accept the token only from this source block (CIDR, repeatable).
        #[arg(long)]
        allow_from: Vec<String>,
        /// A description for people.
        #[arg(long, default_value = "")]
        name: String,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List tokens (never the tokens themselves).
    List,
    /// Revoke a token: it stops working everywhere, on open connections too, within seconds.
    Revoke {
        /// The token's id (as in `auth token list`).
        id: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Records, oldest first.
    List {
        /// Only records since then: a time like 2026-12-04T10:00:00Z, or an age like 1h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// Only records whose actor contains this.
        #[arg(long)]
        actor: Option<String>,
        /// Only records whose action contains this.
        #[arg(long)]
        action: Option<String>,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Check every meta node's copy of the log's hash chain (exit 10 if one is broken).
    Verify,
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Copy a snapshot to the backup nodes (taking one if none is named); only chunks changed
    /// since the volume's previous backup are read and stored.
    Create {
        /// Volume.
        volume: String,
        /// Back up this snapshot instead of taking a new one.
        #[arg(long)]
        snapshot: Option<String>,
        /// Return once the backup is started, without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// List backups, of one volume or all.
    List {
        /// Only this volume's.
        volume: Option<String>,
        /// Only backups being copied, with their progress.
        #[arg(long)]
        running: bool,
    },
    /// One backup: size, changed and stored bytes, duration, snapshot, nodes.
    Show {
        /// Backup id.
        id: u64,
    },
    /// Read every piece of the backup back on each node keeping it and check it (exit 10 if
    /// one is damaged).
    Verify {
        /// Backup id.
        id: u64,
    },
    /// Delete a backup; the pieces no other backup holds are overwritten.
    Delete {
        /// Backup id.
        id: u64,
    },
    /// Keep a backup after its volume's deletion (past backup.retain_after_delete) until
    /// unpinned.
    Pin {
        /// Backup id.
        id: u64,
        /// Let it expire again.
        #[arg(long)]
        unpin: bool,
    },
    /// Restore a backup into a new volume (run again to resume an interrupted restore).
    Restore {
        /// Backup id.
        id: u64,
        /// The new volume's name.
        #[arg(long)]
        to: String,
        /// For a backup of an encrypted volume: the key-encryption key that opened that volume.
        /// The new volume is encrypted under it too.
        #[arg(long)]
        kek_file: Option<PathBuf>,
        /// Return once the restore is started, without following it.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum ScheduleCmd {
    /// Back up volumes every interval; each run snapshots, backs up, then prunes the
    /// schedule's backups to --keep per volume and --max-age.
    Create {
        /// Schedule name.
        name: String,
        /// A volume (repeatable).
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// Every volume, including ones created later.
        #[arg(long)]
        all: bool,
        /// Interval: 90s, 30m, 6h, 1d, 1w.
        #[arg(long)]
        every: String,
        /// Align the runs to this time of day (UTC, HH:MM).
        #[arg(long)]
        at: Option<String>,
        /// Backups kept per volume.
        #[arg(long)]
        keep: u32,
        /// Backups older than this are pruned.
        #[arg(long)]
        max_age: String,
    },
    /// List schedules: interval, retention, last and next run.
    List,
    /// Delete a schedule (its backups stay).
    Delete {
        /// Schedule name.
        name: String,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Take a snapshot (copies nothing: one metadata round, whatever the volume's size). An
    /// attached volume's read-write holder cuts it between writes.
    Create {
        /// Volume.
        volume: String,
        /// Snapshot name: letters, digits, '.', '_', '-'.
        name: String,
    },
    /// List snapshots, of one volume or all.
    List {
        /// Only this volume's.
        volume: Option<String>,
    },
    /// Delete a snapshot; the blocks only it held are released and overwritten.
    Delete {
        /// Volume.
        volume: String,
        /// Snapshot name.
        name: String,
    },
}

#[derive(Subcommand)]
enum ScrubCmd {
    /// Per node: freed bytes waiting to be overwritten, overwritten so far, errors, settings.
    Status {
        /// Only this node (its id).
        #[arg(long)]
        node: Option<u64>,
    },
    /// Start an integrity pass now and follow it: every stored block read back and checked
    /// against its checksum, bad copies repaired from healthy replicas.
    Start {
        /// Compare the replicas of each chunk with each other (finds a replica whose block
        /// differs with a valid checksum); runs on the PG leaders among the chosen nodes.
        #[arg(long)]
        deep: bool,
        /// Only this node (its id).
        #[arg(long)]
        node: Option<u64>,
        /// Read rate for this pass per node, e.g. 200MiB (default: the nodes' configured
        /// scrub.integrity_rate).
        #[arg(long)]
        rate: Option<String>,
        /// Return once started instead of following the pass.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Form the meta group over the --cluster nodes and place the placement groups. Needs a
    /// client certificate of the cluster CA (--cert/--key); writes the first admin token to
    /// --admin-token-file.
    Init {
        /// Where to write the first admin token (mode 0600; an existing file is not replaced).
        #[arg(long, default_value = "basalt-admin.token")]
        admin_token_file: PathBuf,
        /// Placement groups (default 32).
        #[arg(long, default_value_t = 32)]
        pgs: u32,
        /// Extent size, a power of two ≥ 1MiB (default 4MiB).
        #[arg(long)]
        extent_size: Option<String>,
        /// Level at which replicas must differ: region, zone, rack or host.
        #[arg(long, default_value = "host")]
        failure_domain: String,
    },
    /// Meta leader, nodes, placement-group health.
    Status,
    /// Change cluster-wide settings (an audited admin action).
    Configure {
        /// Whether new volumes must be encrypted (on: `volume create` needs --encrypt
        /// --kek-file, or an explicit --no-encrypt).
        #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
        encryption_default: Option<bool>,
        /// QoS limits of volumes without their own (`--qos-iops`, `--qos-bps`, `--qos-burst`;
        /// the dimensions not given are unlimited).
        #[command(flatten)]
        qos_default: qos::QosFlags,
        /// Storage nodes export series per volume (requests, bytes, latency, QoS waits; see
        /// docs/operations.md, "Metrics"). Off by default: each volume adds dozens of series
        /// on every node that leads a part of it.
        #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
        per_volume_metrics: Option<bool>,
    },
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?}: say on or off")),
    }
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Registered nodes and whether they are up.
    List,
    /// Move every replica off a node (gradually, with progress), leaving it removable.
    Drain {
        /// Node id (as in `node list`, without the `node-` prefix).
        id: u64,
        /// Stop draining: the node keeps what it still holds and may receive replicas again.
        #[arg(long)]
        undo: bool,
        /// Return once the drain is recorded, without following it.
        #[arg(long)]
        no_wait: bool,
        /// Give up following (exit 7; the drain stays recorded) when no replica has left the
        /// node and no replica move has run anywhere in the cluster for this many seconds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        stuck_after: u64,
    },
    /// Remove a node that holds no replicas (drain it first) from the cluster for good.
    Remove {
        /// Node id.
        id: u64,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume.
    Create {
        /// Name: letters, digits, '.', '_', '-'.
        name: String,
        /// Size, e.g. 10GiB.
        #[arg(long)]
        size: String,
        /// Encrypt the volume's blocks on the attaching host (AES-256-GCM); needs --kek-file.
        #[arg(long, requires = "kek_file")]
        encrypt: bool,
        /// Leave the volume unencrypted on a cluster that encrypts new volumes by default.
        #[arg(long, conflicts_with = "encrypt")]
        no_encrypt: bool,
        /// Key-encryption key (a file of exactly 32 random bytes) that wraps the volume's data
        /// key; every attach needs the same file. Lose it and the volume's data is lost.
        #[arg(long, value_name = "FILE")]
        kek_file: Option<PathBuf>,
        #[command(flatten)]
        qos: qos::QosFlags,
    },
    /// Set a volume's QoS limits, live: wherever it is attached (however many connections or
    /// attachments), the storage nodes hold its I/O to them within a second. Limits not given
    /// are unlimited; throttled requests wait, they never fail.
    SetQos {
        /// Volume.
        name: String,
        #[command(flatten)]
        qos: qos::QosFlags,
        /// Follow the cluster's default limits (`cluster configure --qos-iops ...`) again.
        #[arg(long)]
        default: bool,
    },
    /// Create a writable volume from a snapshot, at once: it shares the snapshot's data and
    /// copies a chunk only when it first writes to it. Attach it like any volume.
    Clone {
        /// The snapshot, as VOLUME@SNAPSHOT.
        source: String,
        /// The new volume's name.
        name: String,
        /// The key-encryption key that opens an encrypted source's keys: the clone gets its
        /// own copies, wrapped under the same KEK, and a fresh data key for its own writes.
        #[arg(long)]
        kek_file: Option<PathBuf>,
    },
    /// Return a volume to a snapshot (refused while it is attached read-write): every chunk
    /// changed since is copied back from the snapshot on each replica, then the volume can be
    /// attached again. The snapshot, and any newer ones, stay.
    Rollback {
        /// Volume.
        name: String,
        /// Snapshot.
        snapshot: String,
        /// Return once the rollback is recorded, without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Rewrap an encrypted volume's data keys under a new key-encryption key (instant; the data
    /// is not rewritten), or with --reencrypt also move every block to a new data key while the
    /// volume stays attached and in use. Attachments keep working; later attaches need the new
    /// KEK file.
    Rekey {
        /// Name.
        name: String,
        /// The current key-encryption key.
        #[arg(long, value_name = "FILE")]
        kek_file: PathBuf,
        /// The new key-encryption key (32 random bytes); with --reencrypt, default: the same.
        #[arg(long, value_name = "FILE", required_unless_present = "reencrypt")]
        new_kek_file: Option<PathBuf>,
        /// Also seal every block again under a new data key (in the background: the attach
        /// process moves them; with nothing attached, this command does). The older data keys
        /// are erased when it finishes. Run the same command again to follow or resume it.
        #[arg(long)]
        reencrypt: bool,
        /// Most bytes a second the re-encryption reads, e.g. 64MiB (default 32MiB).
        #[arg(long, value_name = "SIZE", requires = "reencrypt")]
        max_rate: Option<String>,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show {
        /// Name.
        name: String,
    },
    /// Space: each volume's provisioned size, what it has written, and what its snapshots
    /// hold on top (bytes of one replica; every byte is kept on three nodes).
    Du {
        /// One volume (default: all, with a total).
        name: Option<String>,
    },
    /// Grow a volume (shrinking is refused).
    Resize {
        /// Name.
        name: String,
        /// New size, e.g. 20GiB.
        #[arg(long)]
        size: String,
    },
    /// Delete a volume and release (then overwrite) its data.
    Delete {
        /// Name.
        name: String,
        /// Return once the volume is marked deleted, without following the release.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum DevCmd {
    /// Start a local cluster: 3 storage+meta nodes in 3 zones and 1 backup node, volume `demo`.
    Up {
        /// Directory for the cluster's state.
        #[arg(long, default_value = "basalt-dev")]
        dir: PathBuf,
        /// Size of volume `demo`.
        #[arg(long, default_value = "4GiB")]
        size: String,
        /// Placement groups. 64, a production-like count (a real cluster has tens to hundreds
        /// per node), so what the dev cluster shows is what a provider's cluster costs; see
        /// docs/operations.md, "How many placement groups".
        #[arg(long, default_value_t = 64)]
        pgs: u32,
        /// The basalt-node binary (default: next to basalt, or BASALT_NODE_BIN).
        #[arg(long)]
        node_bin: Option<PathBuf>,
        /// Plaintext and no authentication (nodes run with `security.off`): only to measure
        /// what security costs (benches/macro/run.sh), never for data that matters.
        #[arg(long)]
        security_off: bool,
    },
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let out = Out { json: cli.json };
    match cli.command {
        Cmd::Dev(DevCmd::Up { dir, size, pgs, node_bin, security_off }) => {
            return dev::up(dev::DevUp { dir, size, pgs, node_bin, security_off, json: out.json }).await;
        }
        Cmd::Cert(CertCmd::Init { dir, days }) => return security::cert_init(out, &dir, days),
        Cmd::Cert(CertCmd::Issue { dir, node, client, out: out_dir, days, san }) => {
            return security::cert_issue(out, &dir, node, client, out_dir, days, &san);
        }
        Cmd::Cert(CertCmd::Nbd { out: dir, hosts, days }) => return security::cert_nbd(out, &dir, &hosts, days),
        _ => {}
    }
    let flags = admin::CredentialFlags { ca: cli.ca, token_file: cli.token_file, cert: cli.cert, key: cli.key, insecure: cli.insecure };
    let admin = admin::Admin::new(cli.cluster, admin::Credentials::load(&flags)?)?;
    match cli.command {
        Cmd::Attach {
            volume,
            nbd_socket,
            nbd_listen,
            vhost_user_socket,
            queues,
            read_only,
            force,
            standby,
            kek_file,
            nbd_tls_dir,
            insecure_nbd,
            nbd_allow,
            metrics_listen,
        } => {
            let listen = match (nbd_socket, nbd_listen, vhost_user_socket) {
                (Some(p), _, _) => attach::Listen::Socket(p),
                (None, Some(a), _) => attach::Listen::Tcp(a),
                (None, None, Some(p)) => {
                    if nbd_tls_dir.is_some() || insecure_nbd || !nbd_allow.is_empty() {
                        return Err(CliError::usage("--nbd-tls-dir, --insecure-nbd and --nbd-allow are for NBD, not --vhost-user-socket"));
                    }
                    if !(1..=basalt_volume_client::vhost_user::MAX_QUEUES).contains(&queues) {
                        return Err(CliError::usage(format!("--queues {queues}: give 1 to {}", basalt_volume_client::vhost_user::MAX_QUEUES)));
                    }
                    attach::Listen::VhostUser { path: p, queues }
                }
                (None, None, None) => {
                    return Err(CliError::usage("give --nbd-socket PATH, --nbd-listen ADDR or --vhost-user-socket PATH"));
                }
            };
            let allow = basalt_security::cidr::AllowList::parse(&nbd_allow).map_err(|e| CliError::usage(format!("--nbd-allow: {e}")))?;
            attach::attach(
                &admin,
                out,
                &volume,
                listen,
                attach::Options { read_only, force, standby, kek_file, tls_dir: nbd_tls_dir, insecure_nbd, allow, metrics_listen },
            )
            .await
        }
        Cmd::Handover { volume, to } => attach::handover(&admin, out, &volume, &to).await,
        Cmd::Detach { volume } => attach::detach(&admin, out, &volume).await,
        Cmd::Cluster(ClusterCmd::Init { pgs, extent_size, failure_domain, admin_token_file }) => {
            commands::cluster_init(&admin, out, pgs, extent_size, failure_domain, &admin_token_file).await
        }
        Cmd::Cluster(ClusterCmd::Status) => commands::cluster_status(&admin, out).await,
        Cmd::Status => health::status(&admin, out).await,
        Cmd::SupportBundle { dir } => support::bundle(&admin, out, &dir).await,
        Cmd::Cluster(ClusterCmd::Configure { encryption_default, qos_default, per_volume_metrics }) => {
            commands::cluster_configure(&admin, out, encryption_default, qos_default.proto()?, per_volume_metrics).await
        }
        Cmd::Node(NodeCmd::List) => commands::node_list(&admin, out).await,
        Cmd::Node(NodeCmd::Drain { id, undo, no_wait, stuck_after }) => {
            commands::node_drain(&admin, out, id, undo, no_wait, std::time::Duration::from_secs(stuck_after)).await
        }
        Cmd::Node(NodeCmd::Remove { id }) => commands::node_remove(&admin, out, id).await,
        Cmd::Volume(VolumeCmd::Create { name, size, encrypt, no_encrypt, kek_file, qos }) => {
            if kek_file.is_some() && !encrypt {
                return Err(CliError::usage("--kek-file is for an encrypted volume: add --encrypt"));
            }
            commands::volume_create(&admin, out, name, size, kek_file, no_encrypt, qos.proto()?).await
        }
        Cmd::Volume(VolumeCmd::Rekey { name, kek_file, new_kek_file, reencrypt, max_rate }) => {
            let rate = max_rate.as_deref().map(commands::size_arg).transpose()?.unwrap_or(0);
            let req = rekey::Rekey { name, kek_file: &kek_file, new_kek_file: new_kek_file.as_deref(), reencrypt, rate };
            rekey::volume_rekey(&admin, out, req).await
        }
        Cmd::Volume(VolumeCmd::List) => commands::volume_list(&admin, out).await,
        Cmd::Volume(VolumeCmd::Rollback { name, snapshot, no_wait }) => snapshot::rollback(&admin, out, name, snapshot, no_wait).await,
        Cmd::Volume(VolumeCmd::Clone { source, name, kek_file }) => snapshot::clone(&admin, out, source, name, kek_file.as_deref()).await,
        Cmd::Volume(VolumeCmd::Show { name }) => commands::volume_show(&admin, out, name).await,
        Cmd::Volume(VolumeCmd::Du { name }) => commands::volume_du(&admin, out, name).await,
        Cmd::Volume(VolumeCmd::Resize { name, size }) => commands::volume_resize(&admin, out, name, size).await,
        Cmd::Volume(VolumeCmd::SetQos { name, qos, default }) => qos::set(&admin, out, name, qos, default).await,
        Cmd::Volume(VolumeCmd::Delete { name, no_wait }) => commands::volume_delete(&admin, out, name, no_wait).await,
        Cmd::Scrub(ScrubCmd::Status { node }) => scrub::status(&admin, out, node).await,
        Cmd::Backup(BackupCmd::Create { volume, snapshot, no_wait }) => backup::create(&admin, out, volume, snapshot, no_wait).await,
        Cmd::Backup(BackupCmd::List { volume, running }) => backup::list(&admin, out, volume, running).await,
        Cmd::Backup(BackupCmd::Show { id }) => backup::show(&admin, out, id).await,
        Cmd::Backup(BackupCmd::Verify { id }) => backup::verify(&admin, out, id).await,
        Cmd::Backup(BackupCmd::Delete { id }) => backup::delete(&admin, out, id).await,
        Cmd::Backup(BackupCmd::Pin { id, unpin }) => backup::pin(&admin, out, id, unpin).await,
        Cmd::Schedule(ScheduleCmd::Create { name, volumes, all, every, at, keep, max_age }) => {
            schedule::create(&admin, out, schedule::NewSchedule { name, volumes, all, every, at, keep, max_age }).await
        }
        Cmd::Schedule(ScheduleCmd::List) => schedule::list(&admin, out).await,
        Cmd::Schedule(ScheduleCmd::Delete { name }) => schedule::delete(&admin, out, name).await,
        Cmd::Backup(BackupCmd::Restore { id, to, kek_file, no_wait }) => backup::restore(&admin, out, id, to, kek_file.as_deref(), no_wait).await,
        Cmd::Snapshot(SnapshotCmd::Create { volume, name }) => snapshot::create(&admin, out, volume, name).await,
        Cmd::Snapshot(SnapshotCmd::List { volume }) => snapshot::list(&admin, out, volume).await,
        Cmd::Snapshot(SnapshotCmd::Delete { volume, name }) => snapshot::delete(&admin, out, volume, name).await,
        Cmd::Scrub(ScrubCmd::Start { deep, node, rate, no_wait }) => scrub::start(&admin, out, node, deep, rate, no_wait).await,
        Cmd::Auth(AuthCmd::Token(TokenCmd::Create { role, volume, expires, allow_from, name, out: file })) => {
            security::token_create(&admin, out, security::NewToken { role, volumes: volume, expires, allow_from, name, file }).await
        }
        Cmd::Auth(AuthCmd::Token(TokenCmd::List)) => security::token_list(&admin, out).await,
        Cmd::Auth(AuthCmd::Token(TokenCmd::Revoke { id })) => security::token_revoke(&admin, out, &id).await,
        Cmd::Audit(AuditCmd::List { since, actor, action, limit }) => security::audit_list(&admin, out, since, actor, action, limit).await,
        Cmd::Audit(AuditCmd::Verify) => security::audit_verify(&admin, out).await,
        Cmd::Dev(_) | Cmd::Cert(_) => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    if matches!(cli.command, Cmd::Attach { .. }) {
        // A long-running attach process reports what its device sees (front ends connecting,
        // malformed requests, resizes, requests resubmitted after a restart) on stderr, as a
        // node does; RUST_LOG overrides. Its stdout stays the export and `ready`.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,basalt_volume_client=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init();
    }
    // One thread: `basalt attach` (NBD server + volume client) is a stream of small network
    // events, and waking a second worker per event cost more than it gained (4k reads at QD32
    // went from 18.9k to 24.2k IOPS with one thread). Nothing here blocks the thread.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("basalt: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // An empty message: the command printed its own account (`basalt status`).
            if !e.message.is_empty() {
                if json {
                    eprintln!("{}", serde_json::json!({"error": e.message, "exit_code": e.code}));
                } else {
                    eprintln!("basalt: {}", e.message);
                }
            }
            ExitCode::from(e.code)
        }
    }
}
