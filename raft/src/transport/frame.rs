//! The Raft pipe's framing on a plain TCP connection.
//!
//! Every node pair talks over one connection that carries [`RaftFrame`]s (many groups'
//! messages each) both ways. It used to be a bidirectional gRPC stream whose HTTP/2 framing,
//! flow control and keepalive it never needed (replacing it did not measurably change 4 KiB
//! write IOPS; failure detection is now explicit, see `peer`). The node's one port tells the
//! protocols apart by the first byte (see `basalt-node`'s listener).
//!
//! ```text
//! connection: the initiating node sends MAGIC (8 bytes), then frames flow both ways
//! frame:      body_len u32 BE | body (protobuf RaftFrame, body_len bytes)
//! ```
//!
//! Requests go from the initiator to the acceptor, replies (matched by message id) come back.

use std::io;

use basalt_proto::raft::RaftFrame;
use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Sent first by the node that opens a Raft connection. Its first byte differs from the data
/// protocol's (`B`) and from an HTTP/2 preface (`P`). Version 2: placement-group commands
/// carry snapshot write epochs; version 3: clones' commands carry their lineage (an older
/// node would not apply them).
pub const MAGIC: [u8; 8] = *b"RAFTBSL3";

/// Version 1's magic, recognised only to refuse such a peer by name.
pub const MAGIC_V1: [u8; 8] = *b"RAFTBSL1";

/// Version 2's magic (before clones), likewise.
pub const MAGIC_V2: [u8; 8] = *b"RAFTBSL2";

/// Most messages either side puts in one frame.
pub(crate) const MAX_MESSAGES: usize = 512;

/// Largest frame body either side accepts (the same bound gRPC enforced before).
pub const MAX_BODY: usize = basalt_proto::MAX_MESSAGE_BYTES;

/// Encodes one frame, length prefix included.
pub(crate) fn encode(frame: &RaftFrame) -> Bytes {
    let len = frame.encoded_len();
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.put_u32(len as u32);
    // Cannot fail: the buffer was sized for the message.
    let _ = frame.encode(&mut buf);
    buf.freeze()
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames; an oversized or
/// undecodable frame is an `InvalidData` error (the connection cannot be resynchronised).
pub(crate) async fn read<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<RaftFrame>> {
    let mut len = [0u8; 4];
    // Distinguish EOF before a frame from EOF inside one.
    let n = r.read(&mut len).await?;
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut len[n..]).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_BODY {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("raft frame of {len} bytes exceeds the {MAX_BODY}-byte limit")));
    }
    let mut body = BytesMut::zeroed(len);
    r.read_exact(&mut body).await?;
    // Decoding from `Bytes` lets message bodies share the buffer instead of copying.
    RaftFrame::decode(body.freeze()).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("undecodable raft frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_proto::raft::RaftMessage;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_errors() {
        let frame = RaftFrame {
            from_node: 3,
            space_left: Some(5 << 20),
            state_space_left: Some(7 << 20),
            messages: vec![RaftMessage { id: 9, group: 4, kind: 2, stream: 7, body: Bytes::from_static(b"entry") }],
        };
        let mut wire = encode(&frame).to_vec();
        wire.extend_from_slice(&encode(&RaftFrame::default()));
        let mut r = &wire[..];
        assert_eq!(read(&mut r).await.unwrap(), Some(frame));
        assert_eq!(read(&mut r).await.unwrap(), Some(RaftFrame::default()));
        assert_eq!(read(&mut r).await.unwrap(), None);

        let huge = ((MAX_BODY + 1) as u32).to_be_bytes();
        assert_eq!(read(&mut &huge[..]).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let truncated = &encode(&RaftFrame { from_node: 1, space_left: None, state_space_left: None, messages: vec![] })[..3];
        assert_eq!(read(&mut &truncated[..]).await.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let garbage = [0, 0, 0, 2, 0xff, 0xff];
        assert_eq!(read(&mut &garbage[..]).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
