//! `basalt-node`: runs one storage node until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use basalt_node::{Flags, Node, NodeConfig};
use clap::Parser;

/// mimalloc instead of glibc malloc: per-I/O buffers and futures made malloc/free ~9% of CPU
/// on the 4 KiB paths, with arena-lock contention between threads.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Rust allocations go to mimalloc (above); RocksDB's C++ code still uses glibc malloc.
    // glibc gives every thread that allocates its own arena and rarely returns freed memory
    // from them; with RocksDB's, io_uring's and tokio's threads all touching multi-megabyte
    // buffers that held ~200 MB per node under load. Two arenas keep memory bounded.
    // SAFETY: mallopt is called once, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let flags = Flags::parse();
    let config = match NodeConfig::load(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("basalt-node: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Also kept in memory for `basalt support-bundle` (basalt_node::diagnostics).
        .with_writer(basalt_node::diagnostics::TeeMaker)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(64).thread_name("basalt-node").build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("basalt-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let node = match Node::start(config).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("basalt-node: {e}");
                tracing::error!(error = %e, "startup failed");
                // A build the cluster's version rules out exits as a refused one does.
                return if matches!(e, basalt_node::NodeError::Version(_)) { ExitCode::from(3) } else { ExitCode::FAILURE };
            }
        };
        let refused = tokio::select! {
            _ = wait_for_signal() => None,
            reason = node.refused() => Some(reason),
        };
        node.shutdown().await;
        match refused {
            Some(reason) => {
                eprintln!("basalt-node: {reason}");
                // Distinct from a startup failure, and not worth an automatic restart.
                ExitCode::from(3)
            }
            None => ExitCode::SUCCESS,
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            // Without signal handlers, fall back to Ctrl-C only.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
