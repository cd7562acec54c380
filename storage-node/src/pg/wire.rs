//! The data service over [`basalt_proto::wire`]: one task reads frames, each request runs as
//! its own task (so replies leave in completion order, as the protocol allows), one task
//! writes replies, batching whatever is ready into one flush.
//!
//! A connection first authenticates: its Hello frame carries a token (or nothing, for a peer
//! with a certificate), and nothing is served before the node accepted it. Every request is
//! then authorised for its volume against the current token table, so a token revoked or
//! expired while its connection is open stops working within a map poll.
//!
//! Memory per connection is bounded before anything is buffered: at most [`MAX_INFLIGHT`]
//! requests, and [`CONN_BUDGET`] bytes of request bodies plus read payloads, are held at once.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use basalt_proto::data::data_error::Code;
use basalt_proto::data::{DataError, Hello, HelloReply, ReadRequest, WriteRequest, ZeroRequest};
use basalt_proto::wire::{self, Header, Kind};
use basalt_security::{Denied, PeerInfo, Principal, ServerStream};
use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::service::{DataService, Requester};
use crate::access::Access;

/// Requests in flight per connection.
pub const MAX_INFLIGHT: usize = 256;

/// Bytes of request bodies and read payloads held per connection.
pub const CONN_BUDGET: usize = 64 * 1024 * 1024;

const BUDGET_KIB: u32 = (CONN_BUDGET / 1024) as u32;

/// How long a new connection may take to send [`wire::MAGIC`].
const MAGIC_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a frame's body may take to arrive once its header has (its budget is held meanwhile).
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// A reply frame and the permits that must stay held until it is on the socket, so a client
/// that stops reading replies cannot make the node queue more than the connection's budget.
struct Outgoing {
    frame: Bytes,
    _slot: OwnedSemaphorePermit,
    _held: Option<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Outgoing {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).clamp(1, u64::from(BUDGET_KIB)) as u32
}

/// The refusal code for a credentials problem.
pub fn denied_error(d: &Denied) -> DataError {
    let code = if d.unauthenticated { Code::Unauthenticated } else { Code::PermissionDenied };
    DataError { code: code as i32, message: d.message.clone(), leader: 0, leader_addr: String::new() }
}

/// Reads the Hello frame and authenticates the connection's principal.
async fn hello<R: tokio::io::AsyncRead + Unpin>(access: &Access, rd: &mut R, peer: &PeerInfo) -> Result<(u64, Principal), (u64, Denied)> {
    let header = match tokio::time::timeout(MAGIC_TIMEOUT, wire::read_header(rd)).await {
        Ok(Ok(Some(h))) => h,
        _ => {
            return Err((0, Denied::unauthenticated("the connection sent no Hello frame")));
        }
    };
    if Kind::from_u8(header.kind) != Some(Kind::Hello) {
        return Err((header.id, Denied::unauthenticated("the first frame must be a Hello with the connection's credentials")));
    }
    let body = match tokio::time::timeout(MAGIC_TIMEOUT, wire::read_body(rd, &header)).await {
        Ok(Ok(b)) => b,
        _ => {
            return Err((header.id, Denied::unauthenticated("the Hello frame did not arrive whole")));
        }
    };
    let hello = Hello::decode(body).map_err(|e| (header.id, Denied::unauthenticated(format!("undecodable Hello: {e}"))))?;
    let principal = if !access.enabled() {
        Ok(Principal::Open)
    } else if !hello.token.is_empty() {
        access.authenticate_token(&hello.token, peer.addr.ip()).await
    } else {
        peer.identity
            .clone()
            .map(Principal::from)
            .ok_or_else(|| Denied::unauthenticated("no credentials: the Hello carried no token and the connection no certificate"))
    };
    // A principal that may read no volume at all has no business on a data connection.
    let principal = principal.and_then(|p| basalt_security::authorize(&p, basalt_security::Action::DataRead, None).map(|()| p));
    principal.map(|p| (header.id, p)).map_err(|d| (header.id, d))
}

/// Serves one client connection until it closes or the node shuts down. The caller accepted it
/// (TLS, ALPN `basalt-data/3`; or, with security off, saw the first byte of [`wire::MAGIC`]);
/// the magic and the Hello are checked here.
pub async fn serve_connection(
    service: Arc<DataService>,
    access: Arc<Access>,
    stream: ServerStream,
    peer: PeerInfo,
    mut shutdown: watch::Receiver<bool>,
) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut magic = [0u8; 8];
    match tokio::time::timeout(MAGIC_TIMEOUT, rd.read_exact(&mut magic)).await {
        Ok(Ok(_)) if magic == wire::MAGIC => {}
        Ok(Ok(_)) if magic == wire::MAGIC_V1 => {
            access.refuse_connection("data", "version", peer.addr, "a client of data protocol version 1 (before credentials); upgrade it");
            return;
        }
        Ok(Ok(_)) if magic == wire::MAGIC_V2 => {
            access.refuse_connection("data", "version", peer.addr, "a client of data protocol version 2 (before snapshots); upgrade it");
            return;
        }
        _ => {
            tracing::debug!(peer = %peer.addr, "closing a data connection that did not open with the protocol magic");
            return;
        }
    }
    let principal = match hello(&access, &mut rd, &peer).await {
        Ok((id, principal)) => {
            let reply = HelloReply { error: None, principal: principal.actor() };
            if wr.write_all(&wire::encode(Kind::HelloReply, id, &reply)).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            principal
        }
        Err((id, denied)) => {
            access.refuse_connection("data", "credentials", peer.addr, &denied.message);
            let reply = HelloReply { error: Some(denied_error(&denied)), principal: String::new() };
            let _ = wr.write_all(&wire::encode(Kind::HelloReply, id, &reply)).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    let requester = Arc::new(Requester { principal, peer: peer.addr });
    let peer = peer.addr;
    let (tx, rx) = mpsc::channel::<Outgoing>(MAX_INFLIGHT);
    // A failed write means the client is gone; its requests still finish, unanswered.
    let writer = tokio::spawn(wire::write_frames(wr, rx));
    // Set when the connection's reading side ends: writes not yet proposed are then dropped.
    let gone = Arc::new(AtomicBool::new(false));
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let budget = Arc::new(Semaphore::new(BUDGET_KIB as usize));
    let outcome = loop {
        let header = tokio::select! {
            h = wire::read_header(&mut rd) => h,
            _ = shutdown.changed() => break Ok(()),
        };
        let header = match header {
            Ok(Some(h)) => h,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        // Both bounds are taken before the body is read.
        let (Ok(slot), Ok(body_permit)) =
            (slots.clone().acquire_owned().await, budget.clone().acquire_many_owned(kib(u64::from(header.body_len))).await)
        else {
            break Ok(());
        };
        let body = match tokio::time::timeout(BODY_TIMEOUT, wire::read_body(&mut rd, &header)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => break Err(e),
            Err(_) => {
                break Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("frame {} body did not arrive within {BODY_TIMEOUT:?}", header.id),
                ));
            }
        };
        let (service, tx, budget, gone, requester) = (service.clone(), tx.clone(), budget.clone(), gone.clone(), requester.clone());
        tokio::spawn(async move {
            let (reply, held) = handle(&service, &requester, header, body, body_permit, &budget, &gone).await;
            // A closed writer means the client is gone; nothing to tell.
            let _ = tx.send(Outgoing { frame: reply, _slot: slot, _held: held }).await;
        });
    };
    if let Err(e) = outcome {
        tracing::debug!(%peer, error = %e, "data connection ended");
    }
    gone.store(true, std::sync::atomic::Ordering::Release);
    drop(tx);
    let _ = writer.await;
}

fn error_frame(id: u64, message: String) -> Bytes {
    let e = DataError { code: Code::Invalid as i32, message, leader: 0, leader_addr: String::new() };
    wire::encode(Kind::Error, id, &e)
}

/// Runs one request; returns its reply frame and the budget to hold until the frame is handed
/// to the writer.
async fn handle(
    service: &DataService,
    requester: &Requester,
    header: Header,
    body: Bytes,
    body_permit: OwnedSemaphorePermit,
    budget: &Arc<Semaphore>,
    gone: &AtomicBool,
) -> (Bytes, Option<OwnedSemaphorePermit>) {
    let id = header.id;
    match Kind::from_u8(header.kind) {
        Some(Kind::Write) => match WriteRequest::decode(body) {
            // The permit covers the payload until the write is answered.
            Ok(req) => {
                let reply = service.serve_write(req, requester, Some(gone)).await;
                drop(body_permit);
                (wire::encode(Kind::WriteReply, id, &reply), None)
            }
            Err(e) => (error_frame(id, format!("undecodable write request: {e}")), None),
        },
        Some(Kind::Read) => match ReadRequest::decode(body) {
            Ok(req) => {
                // Swap the small body's permit for one covering the data read.
                drop(body_permit);
                let Ok(payload) = budget.clone().acquire_many_owned(kib(u64::from(req.length))).await else {
                    return (error_frame(id, "connection closing".into()), None);
                };
                let reply = service.serve_read(req, requester).await;
                (wire::encode(Kind::ReadReply, id, &reply), Some(payload))
            }
            Err(e) => (error_frame(id, format!("undecodable read request: {e}")), None),
        },
        Some(Kind::Zero) => match ZeroRequest::decode(body) {
            Ok(req) => (wire::encode(Kind::ZeroReply, id, &service.serve_zero(req, requester, Some(gone)).await), None),
            Err(e) => (error_frame(id, format!("undecodable zero request: {e}")), None),
        },
        _ => (error_frame(id, format!("unknown request kind {:#04x}", header.kind)), None),
    }
}
