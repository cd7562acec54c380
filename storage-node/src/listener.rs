//! The node's one port, three protocols. With security on (the default) every connection is
//! TLS and its ClientHello's ALPN says what it speaks: the framed data protocol
//! ([`crate::pg::wire`]), the Raft transport (node certificates only), or gRPC (admin API, Raft
//! snapshots, node-to-node calls). A source address outside every allow-list of the port is
//! dropped at accept, one outside its protocol's list on the ClientHello, both before any key
//! exchange. With security off the first byte tells the protocols apart (`B`: data, `R`: Raft,
//! anything else: gRPC). One address per node keeps the cluster map, configuration and firewalls
//! simple.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::wire;
use basalt_raft::transport::{TransportService, frame as raft_frame};
use basalt_security::stream::{Incoming, Stream};
use basalt_security::tls::AcceptError;
use basalt_security::{PeerInfo, Protocol};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::access::Access;
use crate::pg::service::DataService;

/// How long a new connection may stay silent before it is dropped unclassified.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// The next accepted connection, or `None` at shutdown. Failed accepts (out of file
/// descriptors and the like) are logged as `what` and retried after a pause rather than spun on.
pub async fn accept(listener: &TcpListener, shutdown: &mut watch::Receiver<bool>, what: &str) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => return Some(s),
                Err(e) => tracing::warn!(error = %e, "{what} accept failed"),
            },
            _ = shutdown.changed() => return None,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The reason label of a refused handshake, for metrics.
pub fn refusal_reason(e: &AcceptError) -> &'static str {
    match e {
        AcceptError::Plaintext => "plaintext",
        AcceptError::Refused(_) => "refused",
        AcceptError::Handshake(_) => "handshake",
        AcceptError::Timeout => "timeout",
    }
}

/// Accepts connections until shutdown, handing gRPC ones to `grpc` (tonic's incoming stream).
pub async fn run(
    listener: TcpListener,
    access: Arc<Access>,
    data: Arc<DataService>,
    raft: TransportService,
    grpc: mpsc::Sender<std::io::Result<Incoming>>,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((stream, peer)) = accept(&listener, &mut shutdown, "node port").await {
        if !access.admit_address(peer.ip()) {
            access.refuse_connection("port", "allow-list", peer, &format!("{} is in no allow-list of this port", peer.ip()));
            continue;
        }
        // Small replies must not wait out delayed ACKs (40 ms).
        let _ = stream.set_nodelay(true);
        let (access, data, raft, grpc, shutdown) = (access.clone(), data.clone(), raft.clone(), grpc.clone(), shutdown.clone());
        tokio::spawn(async move {
            match access.tls().cloned() {
                Some(tls) => {
                    let accepted = tls.accept(stream, |p| access.admit_protocol(p, peer.ip())).await;
                    let a = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            access.refuse_connection("port", refusal_reason(&e), peer, &e.to_string());
                            return;
                        }
                    };
                    let info = PeerInfo { addr: peer, identity: a.identity.clone() };
                    match a.protocol {
                        Protocol::Data => crate::pg::wire::serve_connection(data, access, Stream::Tls(Box::new(a.stream)), info, shutdown).await,
                        Protocol::Raft => {
                            if let Err(e) = basalt_raft::transport::tune_socket(a.stream.get_ref().0.get_ref()) {
                                tracing::debug!(%peer, error = %e, "cannot tune a raft connection's socket");
                            }
                            let node = a.identity.as_ref().and_then(|i| i.node());
                            raft.serve_connection(a.stream, peer.to_string(), node).await
                        }
                        Protocol::Grpc => {
                            // The gRPC server is gone only at shutdown.
                            let _ = grpc.send(Ok(Incoming { stream: Stream::Tls(Box::new(a.stream)), peer: info })).await;
                        }
                        Protocol::Http => {}
                    }
                }
                None => serve_plain(stream, peer, access, data, raft, grpc, shutdown).await,
            }
        });
    }
}

/// Security off: the first byte tells the protocols apart.
async fn serve_plain(
    stream: TcpStream,
    peer: SocketAddr,
    access: Arc<Access>,
    data: Arc<DataService>,
    raft: TransportService,
    grpc: mpsc::Sender<std::io::Result<Incoming>>,
    shutdown: watch::Receiver<bool>,
) {
    let mut first = [0u8; 1];
    let info = PeerInfo { addr: peer, identity: None };
    match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == wire::MAGIC[0] => crate::pg::wire::serve_connection(data, access, Stream::Plain(stream), info, shutdown).await,
        Ok(Ok(1)) if first[0] == raft_frame::MAGIC[0] => {
            let _ = basalt_raft::transport::tune_socket(&stream);
            raft.serve_connection(stream, peer.to_string(), None).await
        }
        Ok(Ok(1)) => {
            let _ = grpc.send(Ok(Incoming { stream: Stream::Plain(stream), peer: info })).await;
        }
        // Closed, failed or silent before saying anything.
        _ => {}
    }
}
