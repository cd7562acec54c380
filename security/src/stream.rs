//! Connections as the rest of Basalt sees them: plaintext (only with security switched off, for
//! A/B benchmarks) or TLS, on either side, with who the peer is.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::identity::Identity;
use crate::tls::{Expect, Protocol, TlsContext};

/// Who is on the other end of an accepted connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// Its address.
    pub addr: SocketAddr,
    /// Who its certificate names (`None`: no certificate, or security off).
    pub identity: Option<Identity>,
}

/// Both ends' streams: a TCP connection, with or without TLS on it.
pub enum Stream<T> {
    /// Plaintext (security off).
    Plain(TcpStream),
    /// TLS.
    Tls(Box<T>),
}

/// The TCP connection under TLS, read in large chunks: rustls asks for at most 4 KiB per read,
/// which without a buffer beneath it costs a system call per 4 KiB of ciphertext (a 1 MiB read
/// reply took 256 of them).
pub type BufferedTcp = tokio::io::BufReader<TcpStream>;

/// Read buffer beneath TLS: four full TLS records.
pub const TCP_READ_BUFFER: usize = 64 * 1024;

/// A TCP stream wrapped for TLS.
pub fn buffered(tcp: TcpStream) -> BufferedTcp {
    tokio::io::BufReader::with_capacity(TCP_READ_BUFFER, tcp)
}

/// An accepted connection.
pub type ServerStream = Stream<tokio_rustls::server::TlsStream<BufferedTcp>>;
/// An opened connection.
pub type ClientStream = Stream<tokio_rustls::client::TlsStream<BufferedTcp>>;

impl<T> Stream<T> {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream
    where
        T: TcpRef,
    {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.tcp(),
        }
    }
}

/// Reaches the TCP stream under a TLS stream.
pub trait TcpRef {
    /// The TCP stream.
    fn tcp(&self) -> &TcpStream;
}

impl TcpRef for tokio_rustls::server::TlsStream<BufferedTcp> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.get_ref()
    }
}

impl TcpRef for tokio_rustls::client::TlsStream<BufferedTcp> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.get_ref()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stream<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stream<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An accepted connection and its peer, as the gRPC server receives it: tonic puts the
/// [`PeerInfo`] into every request's extensions.
pub struct Incoming {
    /// The stream.
    pub stream: ServerStream,
    /// The peer.
    pub peer: PeerInfo,
}

impl AsyncRead for Incoming {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Incoming {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Incoming {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

/// Opens connections to nodes: TLS with this party's context, or plaintext with security off.
#[derive(Clone, Debug)]
pub struct Dialer {
    tls: Option<Arc<TlsContext>>,
    connect_timeout: Duration,
}

/// Plaintext: only for clusters with security off (a node with security on refuses it).
impl Default for Dialer {
    fn default() -> Dialer {
        Dialer::new(None)
    }
}

impl Dialer {
    /// A dialer using `tls` (`None`: plaintext).
    pub fn new(tls: Option<Arc<TlsContext>>) -> Dialer {
        Dialer { tls, connect_timeout: Duration::from_secs(3) }
    }

    /// The same dialer with another TCP connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Dialer {
        self.connect_timeout = timeout;
        self
    }

    /// The TLS context, if security is on.
    pub fn tls(&self) -> Option<&Arc<TlsContext>> {
        self.tls.as_ref()
    }

    /// Connects to `addr` (TCP_NODELAY set) and, with TLS, completes the handshake for
    /// `protocol` with the node `expect` names.
    pub async fn connect(&self, addr: &str, expect: Expect, protocol: Protocol) -> io::Result<ClientStream> {
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(io::Error::new(e.kind(), format!("cannot connect to {addr}: {e}")));
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("cannot connect to {addr}: no answer within {:?}", self.connect_timeout),
                ));
            }
        };
        // Small requests and replies must not wait out delayed ACKs.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Stream::Plain(tcp)),
            Some(tls) => match tls.connect(tcp, expect, protocol).await {
                Ok(s) => Ok(Stream::Tls(Box::new(s))),
                Err(e) => Err(io::Error::new(e.kind(), format!("TLS with {addr} failed: {e}"))),
            },
        }
    }
}
