//! The node's one port, three protocols, told apart by the first byte: connections that open
//! with [`wire::MAGIC`] go to the framed data protocol ([`crate::pg::wire`]), those that open
//! with the Raft transport's magic to the groups hosted here; everything else (an HTTP/2
//! preface) goes to the gRPC server. One address per node keeps the cluster map,
//! configuration and firewalls simple.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::wire;
use basalt_raft::transport::{TransportService, frame as raft_frame};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::pg::service::DataService;

/// How long a new connection may stay silent before it is dropped unclassified.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// The next accepted connection, or `None` at shutdown. Failed accepts (out of file
/// descriptors and the like) are logged as `what` and retried after a pause rather than spun on.
pub async fn accept(listener: &TcpListener, shutdown: &mut watch::Receiver<bool>, what: &str) -> Option<TcpStream> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => return Some(s),
                Err(e) => tracing::warn!(error = %e, "{what} accept failed"),
            },
            _ = shutdown.changed() => return None,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Accepts connections until shutdown, handing gRPC ones to `grpc` (tonic's incoming stream).
pub async fn run(
    listener: TcpListener,
    data: Arc<DataService>,
    raft: TransportService,
    grpc: mpsc::Sender<io::Result<TcpStream>>,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some(stream) = accept(&listener, &mut shutdown, "data port").await {
        // Small replies must not wait out delayed ACKs (40 ms).
        let _ = stream.set_nodelay(true);
        let (data, raft, grpc, shutdown) = (data.clone(), raft.clone(), grpc.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == wire::MAGIC[0] => crate::pg::wire::serve_connection(data, stream, shutdown).await,
                Ok(Ok(1)) if first[0] == raft_frame::MAGIC[0] => raft.serve_connection(stream).await,
                Ok(Ok(1)) => {
                    // The gRPC server is gone only at shutdown.
                    let _ = grpc.send(Ok(stream)).await;
                }
                // Closed, failed or silent before saying anything.
                _ => {}
            }
        });
    }
}
