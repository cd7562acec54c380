//! The NBD server: listeners, connections, and the transmission phase (§ Transmission).
//!
//! Each connection reads requests in a loop and runs each one as its own task (up to
//! [`NbdOptions::max_inflight`] requests and [`NbdOptions::max_inflight_bytes`] of payload per
//! connection; reading stops while either is used up, so a client cannot make the server
//! buffer without bound). Replies go through a bounded
//! channel to a writer task and leave in completion order (§ Transmission: replies need not be
//! in request order). Several connections may serve one export (`NBD_FLAG_CAN_MULTI_CONN`):
//! every acknowledged write is already durable on a majority of replicas, so FLUSH and FUA
//! hold across connections.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use basalt_common::CHUNK_SIZE;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc, watch};

use super::handshake::{ExportInfo, HandshakeError, Negotiated, Outcome, TlsMode, negotiate, negotiate_over_tls};
use super::proto::*;
use super::refusals::RefusalLog;
use super::request::{Command, Limits, Request, RequestError, parse_request};
use crate::error::ClientError;
use crate::volume::Volume;

/// Largest request payload the server accepts (advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// A listening socket the server accepts NBD connections on.
trait Listener: Send + Sync + 'static {
    /// The connection type.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection, ready to use, and a name for its peer (for logs).
    fn accept_stream(&self) -> impl std::future::Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = self.accept().await?;
        // Replies are small and latency-bound: no Nagle delay.
        let _ = stream.set_nodelay(true);
        Ok((stream, peer.to_string()))
    }
}

/// A TCP listener that drops peers outside its allow-list at accept, before they say anything.
struct Guarded {
    listener: TcpListener,
    allow: basalt_security::cidr::AllowList,
    refusals: Option<Arc<RefusalLog>>,
}

impl Listener for Guarded {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> io::Result<(Self::Stream, String)> {
        loop {
            let (stream, peer) = self.listener.accept_stream().await?;
            match peer.parse::<std::net::SocketAddr>() {
                Ok(addr) if !self.allow.allows(addr.ip()) => {
                    let reason = format!("outside the allow-list ({})", self.allow);
                    match &self.refusals {
                        Some(log) => log.record(&peer, reason),
                        None => tracing::warn!(%peer, %reason, "refused an NBD connection"),
                    }
                }
                _ => return Ok((stream, peer)),
            }
        }
    }
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> io::Result<(Self::Stream, String)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, "unix".into()))
    }
}

/// How long shutdown waits for connections to finish their in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Server tuning.
#[derive(Clone, Debug)]
pub struct NbdOptions {
    /// Requests one connection may have in flight.
    pub max_inflight: usize,
    /// Read and write payload bytes one connection may have in flight (at least
    /// [`MAX_REQUEST`], so any single valid request fits).
    pub max_inflight_bytes: usize,
    /// Connections served at once (further ones wait in the listen queue).
    pub max_connections: usize,
    /// Give up on a connection whose handshake takes longer than this.
    pub handshake_timeout: Duration,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self { max_inflight: 64, max_inflight_bytes: 64 << 20, max_connections: 64, handshake_timeout: Duration::from_secs(30) }
    }
}

/// One exported volume.
#[derive(Clone)]
pub struct Export {
    /// The volume.
    pub volume: Volume,
    /// Refuse writes.
    pub read_only: bool,
}

impl Export {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            name: self.volume.export_name(),
            description: match self.volume.snapshot() {
                Some((snap, _)) => format!("Basalt volume {} ({}), snapshot {snap} (read-only)", self.volume.name(), self.volume.id()),
                None => format!("Basalt volume {} ({})", self.volume.name(), self.volume.id()),
            },
            size: self.volume.size(),
            read_only: self.read_only,
            // An encrypted volume is sealed in whole blocks: clients that honour the minimum
            // (QEMU does) merge partial writes themselves instead of making this side read,
            // open and reseal a block; smaller requests still work.
            min_block: if self.volume.is_encrypted() { 4096 } else { 1 },
            preferred_block: 4096,
            max_block: MAX_REQUEST,
        }
    }
}

/// Serves a set of exports.
#[derive(Clone)]
pub struct NbdServer {
    exports: Arc<Vec<Export>>,
    options: NbdOptions,
    connections: Arc<Semaphore>,
    /// With TLS, every connection must upgrade with NBD_OPT_STARTTLS before anything else.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Where refused connections are recorded (for the audit log).
    refusals: Option<Arc<RefusalLog>>,
}

/// A connection after negotiation: on the stream it arrived on, or inside TLS.
enum Negotiation<S> {
    Plain(S, Negotiated),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::io::BufReader<S>>>, Negotiated),
}

enum Reply {
    Ok {
        handle: u64,
    },
    Data {
        handle: u64,
        offset: u64,
        data: Bytes,
    },
    Error {
        handle: u64,
        errno: u32,
        message: String,
    },
    /// base:allocation descriptors (length, state flags) from the request's offset on.
    BlockStatus {
        handle: u64,
        descriptors: Vec<(u32, u32)>,
    },
}

impl NbdServer {
    /// A server for `exports`.
    pub fn new(exports: Vec<Export>, options: NbdOptions) -> Self {
        let connections = Arc::new(Semaphore::new(options.max_connections));
        Self { exports: Arc::new(exports), options, connections, tls: None, refusals: None }
    }

    /// Records refused connections (allow-list, TLS handshake) in `log`.
    pub fn with_refusal_log(mut self, log: Arc<RefusalLog>) -> Self {
        self.refusals = Some(log);
        self
    }

    /// Requires TLS on every connection (FORCEDTLS mode, § TLS support), with `config`
    /// (see `basalt_security::nbd_tls`).
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tokio_rustls::TlsAcceptor::from(config));
        self
    }

    /// The handshake, with the TLS upgrade in the middle of it when this server requires TLS.
    async fn handshake<S>(&self, mut stream: S, infos: &[ExportInfo]) -> Result<Negotiation<S>, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mode = if self.tls.is_some() { TlsMode::Forced } else { TlsMode::Off };
        match negotiate(&mut stream, infos, mode).await? {
            Outcome::Export(n) => Ok(Negotiation::Plain(stream, n)),
            Outcome::StartTls { no_zeroes } => {
                let Some(acceptor) = &self.tls else {
                    return Err(HandshakeError::Protocol("STARTTLS accepted without TLS configured".into()));
                };
                // rustls reads at most one record per call: a buffer beneath it saves system
                // calls on large writes.
                let buffered = tokio::io::BufReader::with_capacity(64 * 1024, stream);
                let mut tls = acceptor.accept(buffered).await.map_err(|e| HandshakeError::Tls(e.to_string()))?;
                let n = negotiate_over_tls(&mut tls, infos, no_zeroes).await?;
                Ok(Negotiation::Tls(Box::new(tls), n))
            }
        }
    }

    /// After shutdown: waits (bounded) for every connection to finish the requests it has in
    /// flight and close (§ Terminating the transmission phase), so none is cut off without a
    /// reply. Each connection task holds a connection permit until it ends.
    async fn drain(&self) {
        let all = self.options.max_connections as u32;
        if tokio::time::timeout(DRAIN_TIMEOUT, self.connections.acquire_many(all)).await.is_err() {
            tracing::warn!("NBD connections still busy {DRAIN_TIMEOUT:?} after shutdown; closing them");
        }
    }

    /// Accepts TCP connections until `shutdown` turns true.
    /// Peers outside `allow` are dropped at accept.
    pub async fn serve_tcp(self, listener: TcpListener, allow: basalt_security::cidr::AllowList, shutdown: watch::Receiver<bool>) {
        let refusals = self.refusals.clone();
        self.serve(Guarded { listener, allow, refusals }, shutdown).await
    }

    /// Accepts connections on a unix socket until `shutdown` turns true.
    pub async fn serve_unix(self, listener: UnixListener, shutdown: watch::Receiver<bool>) {
        self.serve(listener, shutdown).await
    }

    /// The accept loop both listener kinds share: at most `max_connections` served at once,
    /// each on its own task; on shutdown, drains them.
    async fn serve<L: Listener>(self, listener: L, mut shutdown: watch::Receiver<bool>) {
        loop {
            let permit = tokio::select! {
                p = self.connections.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = shutdown.changed() => return self.drain().await,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept_stream() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => {
                    // The permit taken for this accept counts as a busy connection.
                    drop(permit);
                    return self.drain().await;
                }
            };
            let server = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                server.serve_connection(stream, peer, shutdown).await;
            });
        }
    }

    /// Runs one connection: handshake, then transmission until the client disconnects.
    pub async fn serve_connection<S>(&self, stream: S, peer: String, shutdown: watch::Receiver<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // A new connection sees the size the volume has now (a resize since the attach);
        // connections already open keep the size they negotiated (§ Transmission phase).
        for e in self.exports.iter() {
            if tokio::time::timeout(Duration::from_secs(1), e.volume.refresh()).await.is_err() {
                tracing::debug!(export = %e.volume.export_name(), "size refresh timed out; advertising the size known");
            }
        }
        let infos: Vec<ExportInfo> = self.exports.iter().map(Export::info).collect();
        let negotiation = match tokio::time::timeout(self.options.handshake_timeout, self.handshake(stream, &infos)).await {
            Ok(Ok(n)) => n,
            Ok(Err(HandshakeError::Aborted)) => return,
            Ok(Err(e @ HandshakeError::Tls(_))) => {
                match &self.refusals {
                    Some(log) => log.record(&peer, e.to_string()),
                    None => tracing::warn!(%peer, error = %e, "refused an NBD connection"),
                }
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "NBD handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "NBD handshake timed out");
                return;
            }
        };
        let negotiated = match &negotiation {
            Negotiation::Plain(_, n) | Negotiation::Tls(_, n) => n.clone(),
        };
        let Some(export) = self.exports.iter().find(|e| e.volume.export_name() == negotiated.export).cloned() else {
            return;
        };
        tracing::debug!(%peer, export = %negotiated.export, structured = negotiated.structured, tls = self.tls.is_some(), "NBD client attached");
        let result = match negotiation {
            Negotiation::Plain(stream, _) => self.transmission(stream, export, &negotiated, shutdown).await,
            Negotiation::Tls(stream, _) => self.transmission(stream, export, &negotiated, shutdown).await,
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "NBD connection closed");
        }
    }

    async fn transmission<S>(&self, stream: S, export: Export, negotiated: &Negotiated, mut shutdown: watch::Receiver<bool>) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let structured = negotiated.structured;
        let (mut reader, writer) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel::<Reply>(self.options.max_inflight * 2);
        let writer_task = tokio::spawn(write_replies(writer, rx, structured));
        let inflight = Arc::new(Semaphore::new(self.options.max_inflight));
        // Payload budget in KiB permits (a Semaphore counts in u32).
        let budget_kib = (self.options.max_inflight_bytes.max(MAX_REQUEST as usize) / 1024) as u32;
        let bytes_inflight = Arc::new(Semaphore::new(budget_kib as usize));
        let limits =
            Limits { size: export.volume.size(), max_len: MAX_REQUEST, read_only: export.read_only, block_status: negotiated.base_allocation };

        let result: io::Result<()> = async {
            loop {
                let mut header = [0u8; REQUEST_LEN];
                tokio::select! {
                    r = reader.read_exact(&mut header) => { r?; }
                    _ = shutdown.changed() => return Ok(()),
                }
                let req = match parse_request(&header, &limits) {
                    Ok(r) => r,
                    Err(RequestError::Refused { handle, errno, message, skip }) => {
                        discard(&mut reader, skip).await?;
                        let _ = tx.send(Reply::Error { handle, errno, message }).await;
                        continue;
                    }
                    Err(e) => {
                        // Out of sync with the client: the only safe move is to close (§ Terminating the transmission phase).
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                    }
                };
                if req.command == Command::Disconnect {
                    return Ok(());
                }
                // Reserve the payload's memory before reading it (writes) or allocating it
                // (reads).
                let kib = match req.command {
                    Command::Write | Command::Read => req.length.div_ceil(1024).clamp(1, budget_kib),
                    _ => 1,
                };
                let Ok(bytes_permit) = bytes_inflight.clone().acquire_many_owned(kib).await else {
                    return Ok(());
                };
                let payload = if req.command == Command::Write {
                    let mut buf = BytesMut::zeroed(req.length as usize);
                    reader.read_exact(&mut buf).await?;
                    buf.freeze()
                } else {
                    Bytes::new()
                };
                let Ok(permit) = inflight.clone().acquire_owned().await else {
                    return Ok(());
                };
                let tx = tx.clone();
                let volume = export.volume.clone();
                tokio::spawn(async move {
                    let reply = execute(&volume, req, payload).await;
                    let _ = tx.send(reply).await;
                    drop(permit);
                    drop(bytes_permit);
                });
            }
        }
        .await;
        // Finish what is in flight before closing (§ NBD_CMD_DISC: handle outstanding requests).
        let _ = inflight.acquire_many(self.options.max_inflight as u32).await;
        drop(tx);
        let _ = writer_task.await;
        result
    }
}

async fn discard<R: AsyncRead + Unpin>(reader: &mut R, mut n: u32) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let take = (n as usize).min(buf.len());
        reader.read_exact(&mut buf[..take]).await?;
        n -= take as u32;
    }
    Ok(())
}

fn errno_of(e: &ClientError) -> u32 {
    match e {
        ClientError::OutOfRange { .. } | ClientError::Invalid(_) => EINVAL,
        ClientError::NoSpace(_) => ENOSPC,
        ClientError::Unauthenticated(_) | ClientError::PermissionDenied(_) => EPERM,
        _ => EIO,
    }
}

async fn execute(volume: &Volume, req: Request, payload: Bytes) -> Reply {
    let handle = req.handle;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let result = match req.command {
        Command::Read => match volume.read(req.offset, u64::from(req.length)).await {
            Ok(data) => {
                return Reply::Data { handle, offset: req.offset, data };
            }
            Err(e) => Err(e),
        },
        Command::Write => volume.write(req.offset, payload, fua).await,
        // Every acknowledged write is durable on a majority already.
        Command::Flush => volume.flush().await,
        Command::Trim => volume.trim(req.offset, u64::from(req.length)).await,
        // § NBD_CMD_FLAG_FAST_ZERO: zeroing that keeps the blocks allocated writes zeros, no
        // faster than the client would; without NO_HOLE it trims (index only), which is fast.
        Command::WriteZeroes if req.flags & CMD_FLAG_FAST_ZERO != 0 && req.flags & CMD_FLAG_NO_HOLE != 0 => {
            return Reply::Error {
                handle,
                errno: ENOTSUP,
                message: "zeroing while keeping the blocks allocated is no faster than writing zeros".into(),
            };
        }
        Command::WriteZeroes => volume.write_zeroes(req.offset, u64::from(req.length), req.flags & CMD_FLAG_NO_HOLE != 0).await,
        // A hint: every read goes to its PG's leader, which keeps hot blocks cached itself.
        Command::Cache => Ok(()),
        Command::Disconnect => Ok(()),
        Command::BlockStatus => match block_status(volume, req.offset, req.length, req.flags & CMD_FLAG_REQ_ONE != 0).await {
            Ok(descriptors) => return Reply::BlockStatus { handle, descriptors },
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => Reply::Ok { handle },
        Err(e) => {
            tracing::warn!(command = ?req.command, offset = req.offset, length = req.length, error = %e, "NBD request failed");
            Reply::Error { handle, errno: errno_of(&e), message: e.to_string() }
        }
    }
}

/// base:allocation of `length` bytes at `offset` (§ NBD_CMD_BLOCK_STATUS): chunks no version
/// of which holds data are holes reading as zeros, the rest data. Chunk-granular (1 MiB): a
/// partly written chunk is all data, which the protocol allows (data may read as zeros).
async fn block_status(volume: &Volume, offset: u64, length: u32, req_one: bool) -> Result<Vec<(u32, u32)>, ClientError> {
    let end = offset + u64::from(length);
    let allocated = volume.allocated_chunks(offset, u64::from(length)).await?;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let chunk = pos / CHUNK_SIZE;
        let next = ((chunk + 1) * CHUNK_SIZE).min(end);
        let state = if allocated.contains(&chunk) { 0 } else { STATE_HOLE | STATE_ZERO };
        let len = (next - pos) as u32;
        match out.last_mut() {
            Some((l, s)) if *s == state => *l += len,
            _ => {
                if req_one && !out.is_empty() {
                    break;
                }
                out.push((len, state));
            }
        }
        pos = next;
    }
    Ok(out)
}

fn encode(reply: Reply, structured: bool, out: &mut BytesMut) -> Option<Bytes> {
    match reply {
        Reply::BlockStatus { handle, descriptors } => {
            // Only sent on connections that negotiated structured replies and base:allocation.
            out.put_u32(STRUCTURED_REPLY_MAGIC);
            out.put_u16(REPLY_FLAG_DONE);
            out.put_u16(REPLY_TYPE_BLOCK_STATUS);
            out.put_u64(handle);
            out.put_u32(4 + 8 * descriptors.len() as u32);
            out.put_u32(BASE_ALLOCATION_ID);
            for (len, state) in descriptors {
                out.put_u32(len);
                out.put_u32(state);
            }
            None
        }
        Reply::Ok { handle } => {
            // A simple reply is allowed for payload-free answers even with structured replies.
            out.put_u32(SIMPLE_REPLY_MAGIC);
            out.put_u32(0);
            out.put_u64(handle);
            None
        }
        Reply::Data { handle, offset, data } => {
            if structured {
                out.put_u32(STRUCTURED_REPLY_MAGIC);
                out.put_u16(REPLY_FLAG_DONE);
                out.put_u16(REPLY_TYPE_OFFSET_DATA);
                out.put_u64(handle);
                out.put_u32(8 + data.len() as u32);
                out.put_u64(offset);
            } else {
                out.put_u32(SIMPLE_REPLY_MAGIC);
                out.put_u32(0);
                out.put_u64(handle);
            }
            Some(data)
        }
        Reply::Error { handle, errno, message } => {
            if structured {
                let msg = &message.as_bytes()[..message.len().min(4096)];
                out.put_u32(STRUCTURED_REPLY_MAGIC);
                out.put_u16(REPLY_FLAG_DONE);
                out.put_u16(REPLY_TYPE_ERROR);
                out.put_u64(handle);
                out.put_u32(6 + msg.len() as u32);
                out.put_u32(errno);
                out.put_u16(msg.len() as u16);
                out.put_slice(msg);
            } else {
                out.put_u32(SIMPLE_REPLY_MAGIC);
                out.put_u32(errno);
                out.put_u64(handle);
            }
            None
        }
    }
}

/// Writes replies as they complete; whatever is ready goes out in one flush.
async fn write_replies<W: AsyncWrite + Unpin>(writer: W, mut rx: mpsc::Receiver<Reply>, structured: bool) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, writer);
    let mut header = BytesMut::with_capacity(64);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            header.clear();
            let data = encode(reply, structured, &mut header);
            w.write_all(&header).await?;
            if let Some(d) = data {
                w.write_all(&d).await?;
            }
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await
}
