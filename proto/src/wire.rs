//! The block-I/O wire protocol: the data API's Write/Read/Zero messages framed directly on a
//! TCP connection, many requests in flight, replies in any order.
//!
//! gRPC costs an HTTP/2 stream per I/O (HPACK, flow control, window updates, several task hops):
//! on 4 KiB reads that was the largest single share of a node's CPU. This protocol keeps the
//! same protobuf messages — validation and error codes are shared with the gRPC `Data` service —
//! but frames them plainly:
//!
//! ```text
//! connection: TLS (ALPN basalt-data/3); the client sends MAGIC (8 bytes) and a Hello frame
//!             with its credentials, the node answers HelloReply; then frames flow both ways
//! frame:      body_len u32 BE | kind u8 | id u64 BE | body (protobuf, body_len bytes)
//! ```
//!
//! A reply carries its request's `id` and the request's kind with the high bit set; a request
//! the node cannot decode is answered with [`Kind::Error`] (a `DataError`). A node serves this
//! protocol, the Raft transport and gRPC on one port: TLS's ALPN says which a connection speaks
//! (with security off, the first byte: `MAGIC[0]` (`B`) for this protocol, an HTTP/2 preface
//! (`P`) for gRPC).

use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

/// Sent by the client first on every connection. Version 2 opened with a Hello frame; version
/// 3 writes carry the volume's snapshot write epoch. Older clients are refused by name.
pub const MAGIC: [u8; 8] = *b"BSLTDAT3";

/// The magic of version 2 (before snapshots), recognised to refuse it clearly.
pub const MAGIC_V2: [u8; 8] = *b"BSLTDAT2";

/// The magic of the protocol before credentials (version 1), recognised to refuse it clearly.
pub const MAGIC_V1: [u8; 8] = *b"BSLTDAT1";

/// Size of a frame header.
pub const HEADER_LEN: usize = 13;

/// Largest frame body either side accepts.
pub const MAX_BODY: usize = crate::MAX_MESSAGE_BYTES;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// `WriteRequest`.
    Write = 1,
    /// `ReadRequest`.
    Read = 2,
    /// `ZeroRequest`.
    Zero = 3,
    /// `Hello`: the connection's credentials (first frame only).
    Hello = 4,
    /// `WriteReply`.
    WriteReply = 0x81,
    /// `ReadReply`.
    ReadReply = 0x82,
    /// `ZeroReply`.
    ZeroReply = 0x83,
    /// `HelloReply`.
    HelloReply = 0x84,
    /// `DataError`: the request with this id could not be understood.
    Error = 0xFF,
}

impl Kind {
    /// The kind for a byte off the wire.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Write,
            2 => Kind::Read,
            3 => Kind::Zero,
            4 => Kind::Hello,
            0x81 => Kind::WriteReply,
            0x82 => Kind::ReadReply,
            0x83 => Kind::ZeroReply,
            0x84 => Kind::HelloReply,
            0xFF => Kind::Error,
            _ => return None,
        })
    }
}

/// One frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Body length in bytes.
    pub body_len: u32,
    /// Raw kind byte (unknown kinds are the receiver's to refuse).
    pub kind: u8,
    /// Request id chosen by the client, echoed in the reply.
    pub id: u64,
}

/// Encodes one frame carrying `msg`.
pub fn encode<M: Message>(kind: Kind, id: u64, msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    buf.put_u32(len as u32);
    buf.put_u8(kind as u8);
    buf.put_u64(id);
    // Cannot fail: the buffer was sized for the message.
    let _ = msg.encode(&mut buf);
    buf.freeze()
}

/// Reads a frame header. `Ok(None)` is a clean end of stream between frames; a body longer
/// than [`MAX_BODY`] is an `InvalidData` error (the connection cannot be resynchronised).
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Header>> {
    let mut h = [0u8; HEADER_LEN];
    // Distinguish EOF before a frame from EOF inside one.
    let n = r.read(&mut h).await?;
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut h[n..]).await?;
    let body_len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let id = u64::from_be_bytes([h[5], h[6], h[7], h[8], h[9], h[10], h[11], h[12]]);
    if body_len as usize > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame {id} announces a {body_len}-byte body, more than the {MAX_BODY}-byte limit"),
        ));
    }
    Ok(Some(Header { body_len, kind: h[4], id }))
}

/// Reads the body announced by `header`.
pub async fn read_body<R: AsyncRead + Unpin>(r: &mut R, header: &Header) -> io::Result<Bytes> {
    let mut body = BytesMut::zeroed(header.body_len as usize);
    r.read_exact(&mut body).await?;
    Ok(body.freeze())
}

/// Writes every frame `rx` yields until it closes, then shuts the stream down. Whatever is
/// already queued goes out with one flush (one syscall at high queue depth). Each item is
/// dropped once its bytes are written, so anything it carries along (budget permits) is
/// held until then.
pub async fn write_frames<W: AsyncWrite + Unpin, T: AsRef<[u8]>>(wr: W, mut rx: mpsc::Receiver<T>) -> io::Result<()> {
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(frame) = rx.recv().await {
        wr.write_all(frame.as_ref()).await?;
        drop(frame);
        while let Ok(frame) = rx.try_recv() {
            wr.write_all(frame.as_ref()).await?;
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DataError, ReadRequest};

    #[tokio::test]
    async fn frames_round_trip() {
        let req = ReadRequest { pg: 3, volume_id: 7, offset: 4096, length: 8192, map_version: 2, snapshot_epoch: 0 };
        let mut wire = encode(Kind::Read, 42, &req).to_vec();
        wire.extend_from_slice(&encode(Kind::Error, 43, &DataError::default()));
        let mut r = &wire[..];
        let h = read_header(&mut r).await.unwrap().unwrap();
        assert_eq!((Kind::from_u8(h.kind), h.id), (Some(Kind::Read), 42));
        let body = read_body(&mut r, &h).await.unwrap();
        assert_eq!(ReadRequest::decode(body).unwrap(), req);
        let h = read_header(&mut r).await.unwrap().unwrap();
        assert_eq!((Kind::from_u8(h.kind), h.id, h.body_len), (Some(Kind::Error), 43, 0));
        assert!(read_header(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let mut h = Vec::new();
        h.extend_from_slice(&(MAX_BODY as u32 + 1).to_be_bytes());
        h.push(1);
        h.extend_from_slice(&9u64.to_be_bytes());
        let err = read_header(&mut &h[..]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = read_header(&mut &h[..5]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(Kind::from_u8(0x42), None);
    }
}
