//! `basalt`: the Basalt admin CLI.

mod admin;
mod attach;
mod commands;
mod dev;
mod exit;
mod scrub;

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
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 failure, 2 usage, 3 not found, 4 already exists, 5 invalid argument, 6 cluster unreachable, 7 not possible in the cluster's state";

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster or show its state.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Storage nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Serve a volume over NBD on this host (one read-write attachment per volume).
    Attach {
        /// Volume name.
        volume: String,
        /// Listen on this unix socket.
        #[arg(long, conflicts_with = "nbd_listen", required_unless_present = "nbd_listen")]
        nbd_socket: Option<PathBuf>,
        /// Listen on this TCP address, e.g. 127.0.0.1:10809.
        #[arg(long)]
        nbd_listen: Option<String>,
        /// Export read-only (no attachment is recorded; writes are refused).
        #[arg(long)]
        read_only: bool,
        /// Take over a volume attached elsewhere (live migration); the previous holder is fenced.
        #[arg(long)]
        force: bool,
    },
    /// End a volume's read-write attachment, fencing its holder.
    Detach {
        /// Volume name.
        volume: String,
    },
    /// Scrubbing: freed space overwritten before reuse, stored blocks verified and repaired.
    #[command(subcommand)]
    Scrub(ScrubCmd),
    /// A local development cluster.
    #[command(subcommand)]
    Dev(DevCmd),
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
    /// Form the meta group over the --cluster nodes and place the placement groups.
    Init {
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
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show {
        /// Name.
        name: String,
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
        /// Placement groups. Two per storage node: on three nodes every PG has a replica on
        /// every node whatever the count, so more PGs only add Raft groups, each of which
        /// batches less (see docs/operations.md, "How many placement groups").
        #[arg(long, default_value_t = 6)]
        pgs: u32,
        /// The basalt-node binary (default: next to basalt, or BASALT_NODE_BIN).
        #[arg(long)]
        node_bin: Option<PathBuf>,
    },
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let out = Out { json: cli.json };
    if let Cmd::Dev(DevCmd::Up { dir, size, pgs, node_bin }) = cli.command {
        return dev::up(dev::DevUp { dir, size, pgs, node_bin }).await;
    }
    let admin = admin::Admin::new(cli.cluster)?;
    match cli.command {
        Cmd::Attach { volume, nbd_socket, nbd_listen, read_only, force } => {
            let listen = match (nbd_socket, nbd_listen) {
                (Some(p), _) => attach::Listen::Socket(p),
                (None, Some(a)) => attach::Listen::Tcp(a),
                (None, None) => return Err(CliError::usage("give --nbd-socket PATH or --nbd-listen ADDR")),
            };
            attach::attach(admin.addrs(), &volume, listen, read_only, force).await
        }
        Cmd::Detach { volume } => attach::detach(admin.addrs(), &volume).await,
        Cmd::Cluster(ClusterCmd::Init { pgs, extent_size, failure_domain }) => {
            commands::cluster_init(&admin, out, pgs, extent_size, failure_domain).await
        }
        Cmd::Cluster(ClusterCmd::Status) => commands::cluster_status(&admin, out).await,
        Cmd::Node(NodeCmd::List) => commands::node_list(&admin, out).await,
        Cmd::Node(NodeCmd::Drain { id, undo, no_wait, stuck_after }) => {
            commands::node_drain(&admin, out, id, undo, no_wait, std::time::Duration::from_secs(stuck_after)).await
        }
        Cmd::Node(NodeCmd::Remove { id }) => commands::node_remove(&admin, out, id).await,
        Cmd::Volume(VolumeCmd::Create { name, size }) => commands::volume_create(&admin, out, name, size).await,
        Cmd::Volume(VolumeCmd::List) => commands::volume_list(&admin, out).await,
        Cmd::Volume(VolumeCmd::Show { name }) => commands::volume_show(&admin, out, name).await,
        Cmd::Volume(VolumeCmd::Resize { name, size }) => commands::volume_resize(&admin, out, name, size).await,
        Cmd::Volume(VolumeCmd::Delete { name, no_wait }) => commands::volume_delete(&admin, out, name, no_wait).await,
        Cmd::Scrub(ScrubCmd::Status { node }) => scrub::status(&admin, out, node).await,
        Cmd::Scrub(ScrubCmd::Start { deep, node, rate, no_wait }) => scrub::start(&admin, out, node, deep, rate, no_wait).await,
        Cmd::Dev(_) => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
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
            if json {
                eprintln!("{}", serde_json::json!({"error": e.message, "exit_code": e.code}));
            } else {
                eprintln!("basalt: {}", e.message);
            }
            ExitCode::from(e.code)
        }
    }
}
