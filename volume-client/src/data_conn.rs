//! One framed data-protocol connection ([`basalt_proto::wire`]) to a node: many requests in
//! flight, matched to replies by id.
//!
//! A writer task batches queued frames into one flush; a reader task hands each reply to its
//! waiting caller. When either side of the socket fails, every waiting caller gets the error
//! at once and the connection reports itself dead so [`crate::Cluster`] opens a new one. A
//! watchdog does the same when requests are outstanding and nothing has arrived for
//! [`STALL_AFTER`]: the node is frozen or cut off, and its waiting callers should try the
//! PG's other replicas (one of which leads soon) instead of waiting out the attempt timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_proto::data::{DataError, Hello, HelloReply};
use basalt_proto::wire::{self, Kind};
use basalt_security::{ClientStream, Dialer, Expect, Protocol, Token};
use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};

/// Frames queued for the writer at most (callers wait beyond: backpressure).
const QUEUE: usize = 256;

type Reply = Result<(u8, Bytes), String>;

/// Requests outstanding and nothing received for this long: the connection is given up. Far
/// above any reply time of a live node (milliseconds; a 1 MiB write at queue depth 8 under
/// load, ~0.3 s at p99), and short next to an election timeout plus the 10 s attempt timeout
/// it used to take a caller to notice a frozen or partitioned leader.
pub(crate) const STALL_AFTER: Duration = Duration::from_secs(3);

/// When the connection last made progress: a reply arrived, or a request was sent while none
/// was outstanding.
struct Progress {
    base: Instant,
    at_ms: AtomicU64,
}

impl Progress {
    fn mark(&self) {
        self.at_ms.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        self.base.elapsed().saturating_sub(Duration::from_millis(self.at_ms.load(Ordering::Relaxed)))
    }
}

/// Why a data connection could not be opened.
pub(crate) enum ConnectError {
    /// The node could not be reached or spoke nonsense: try again or elsewhere.
    Failed(String),
    /// The node refused the credentials (an `UNAUTHENTICATED` or `PERMISSION_DENIED` error).
    Denied(DataError),
}

/// Callers waiting for replies; `None` once the connection failed.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;

/// A connection to one node's data port.
pub(crate) struct DataConn {
    addr: String,
    /// The client session this connection belongs to, and its number in it (stamped on
    /// writes: storage-node `pg::sessions`).
    pub(crate) session: u64,
    pub(crate) number: u64,
    tx: mpsc::Sender<Bytes>,
    pending: Pending,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
    progress: Arc<Progress>,
}

/// Fails every waiting caller with `why` and marks the connection unusable.
fn fail_all(pending: &Pending, dead: &AtomicBool, why: &str) {
    dead.store(true, Ordering::Release);
    let waiting = pending.lock().unwrap_or_else(|p| p.into_inner()).take();
    for (_, tx) in waiting.into_iter().flatten() {
        let _ = tx.send(Err(why.to_string()));
    }
}

/// Removes a caller's entry if it stops waiting (attempt timeout), so the map cannot grow.
struct Waiting<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(map) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            map.remove(&self.id);
        }
    }
}

impl DataConn {
    /// Connects to `addr` through `dialer` (TLS), opens the protocol and presents `token`, as
    /// connection `number` of `session`. A refused credential is [`ConnectError::Denied`].
    pub(crate) async fn connect(
        addr: &str,
        dialer: &Dialer,
        token: Option<&Token>,
        session: u64,
        number: u64,
    ) -> Result<Arc<DataConn>, ConnectError> {
        let dialer = dialer.clone().with_connect_timeout(Duration::from_secs(2));
        let stream = dialer.connect(addr, Expect::AnyNode, Protocol::Data).await.map_err(|e| ConnectError::Failed(e.to_string()))?;
        {
            // A node that vanishes without closing (power loss, partition) must not leave a
            // connection that looks alive: keepalive probes on an idle one, and a bound on how
            // long sent data may stay unacknowledged.
            let sock = socket2::SockRef::from(stream.tcp());
            let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(5)).with_interval(Duration::from_secs(2)).with_retries(3);
            let _ = sock.set_tcp_keepalive(&keepalive);
            let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(10)));
        }
        let (mut rd, mut wr) = tokio::io::split(stream);
        let opened = async {
            wr.write_all(&wire::MAGIC).await?;
            let hello = Hello { token: token.map(|t| t.expose()).unwrap_or_default() };
            wr.write_all(&wire::encode(Kind::Hello, 0, &hello)).await?;
            wr.flush().await?;
            let header = wire::read_header(&mut rd).await?.ok_or_else(|| std::io::Error::other("closed before answering the Hello"))?;
            let body = wire::read_body(&mut rd, &header).await?;
            if header.kind != Kind::HelloReply as u8 {
                return Err(std::io::Error::other(format!("answered the Hello with frame kind {:#04x}", header.kind)));
            }
            HelloReply::decode(body).map_err(|e| std::io::Error::other(format!("undecodable Hello reply: {e}")))
        };
        let reply = tokio::time::timeout(Duration::from_secs(5), opened)
            .await
            .map_err(|_| ConnectError::Failed(format!("{addr} did not answer the data protocol's Hello within 5s")))?
            .map_err(|e| ConnectError::Failed(format!("cannot open the data protocol with {addr}: {e}")))?;
        if let Some(e) = reply.error {
            return Err(ConnectError::Denied(e));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let dead = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress { base: Instant::now(), at_ms: AtomicU64::new(0) });
        tokio::spawn(write_frames(wr, rx, pending.clone(), dead.clone(), addr.to_string()));
        let reader = tokio::spawn(read_replies(rd, pending.clone(), dead.clone(), progress.clone(), addr.to_string()));
        tokio::spawn(watch_for_stall(tx.downgrade(), pending.clone(), dead.clone(), progress.clone(), reader, addr.to_string()));
        Ok(Arc::new(DataConn { addr: addr.to_string(), session, number, tx, pending, next_id: AtomicU64::new(1), dead, progress }))
    }

    /// Whether the connection has failed (a new one is needed).
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Sends `msg` as a `kind` request and decodes the `reply` it gets. `Err` is a transport
    /// failure or a request the node could not understand; refusals travel inside `R`.
    pub(crate) async fn call<M: Message, R: Message + Default>(&self, kind: Kind, reply: Kind, msg: &M) -> Result<R, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let Some(map) = pending.as_mut() else {
                return Err(format!("connection to {} is closed", self.addr));
            };
            if map.is_empty() {
                // The stall clock starts now, not at the last reply of an idle connection.
                self.progress.mark();
            }
            map.insert(id, done_tx);
        }
        let _waiting = Waiting { pending: &self.pending, id };
        if self.tx.send(wire::encode(kind, id, msg)).await.is_err() {
            return Err(format!("connection to {} is closed", self.addr));
        }
        let (got, body) = match done_rx.await {
            Ok(r) => r?,
            Err(_) => {
                return Err(format!("connection to {} closed before replying", self.addr));
            }
        };
        if got == Kind::Error as u8 {
            let e = DataError::decode(body).unwrap_or_default();
            return Err(format!("{} refused a request it could not parse: {}", self.addr, e.message));
        }
        if got != reply as u8 {
            return Err(format!("{} answered with frame kind {got:#04x} where {:#04x} was expected", self.addr, reply as u8));
        }
        R::decode(body).map_err(|e| format!("undecodable reply from {}: {e}", self.addr))
    }
}

async fn write_frames(wr: WriteHalf<ClientStream>, rx: mpsc::Receiver<Bytes>, pending: Pending, dead: Arc<AtomicBool>, addr: String) {
    if let Err(e) = wire::write_frames(wr, rx).await {
        fail_all(&pending, &dead, &format!("sending to {addr} failed: {e}"));
    }
}

/// Gives the connection up when requests wait and nothing arrives for [`STALL_AFTER`]; ends
/// when the connection fails or its [`DataConn`] is dropped.
async fn watch_for_stall(
    conn: mpsc::WeakSender<Bytes>,
    pending: Pending,
    dead: Arc<AtomicBool>,
    progress: Arc<Progress>,
    reader: tokio::task::JoinHandle<()>,
    addr: String,
) {
    let mut tick = tokio::time::interval(STALL_AFTER / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if dead.load(Ordering::Acquire) || conn.upgrade().is_none() {
            break;
        }
        let waiting = pending.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|m| !m.is_empty());
        if waiting && progress.idle() >= STALL_AFTER {
            fail_all(&pending, &dead, &format!("{addr} sent nothing for {STALL_AFTER:?} while requests waited (frozen or cut off)"));
            break;
        }
    }
    // The reader may be blocked on a socket that never delivers again.
    reader.abort();
}

async fn read_replies(rd: ReadHalf<ClientStream>, pending: Pending, dead: Arc<AtomicBool>, progress: Arc<Progress>, addr: String) {
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let why = loop {
        let header = match wire::read_header(&mut rd).await {
            Ok(Some(h)) => h,
            Ok(None) => break format!("{addr} closed the connection"),
            Err(e) => break format!("reading from {addr} failed: {e}"),
        };
        let body = match wire::read_body(&mut rd, &header).await {
            Ok(b) => b,
            Err(e) => break format!("reading from {addr} failed: {e}"),
        };
        progress.mark();
        let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).as_mut().and_then(|m| m.remove(&header.id));
        // No waiter: the caller timed out and left.
        if let Some(tx) = waiter {
            let _ = tx.send(Ok((header.kind, body)));
        }
    };
    fail_all(&pending, &dead, &why);
}
