//! Parsing of transmission-phase requests (§ Request message, § Request types). Pure, so it can
//! be fuzzed and tested without a socket.

use thiserror::Error;

use super::proto::*;

/// A command the server understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read,
    /// Write; `length` bytes of payload follow the header.
    Write,
    /// Disconnect.
    Disconnect,
    /// Flush.
    Flush,
    /// Trim.
    Trim,
    /// Write zeroes.
    WriteZeroes,
    /// Report which parts of a range hold data (base:allocation).
    BlockStatus,
    /// Prefetch hint (answered at once: reads go to the PG leaders whatever was hinted).
    Cache,
}

/// A parsed request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The command.
    pub command: Command,
    /// Command flags.
    pub flags: u16,
    /// The client's handle, echoed in the reply.
    pub handle: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u32,
}

/// What the server knows of the export when it validates a request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Largest request payload.
    pub max_len: u32,
    /// Writes refused.
    pub read_only: bool,
    /// The client selected `base:allocation` (NBD_CMD_BLOCK_STATUS allowed).
    pub block_status: bool,
}

/// Why a request header is unusable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// Not a request at all: the stream is out of sync and the connection must close.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    /// A write whose payload cannot be accepted: closing is the only way to stay in sync.
    #[error("write of {0} bytes exceeds the {1}-byte maximum")]
    WriteTooLarge(u32, u32),
    /// A well-formed request the server refuses with an error reply.
    #[error("{message}")]
    Refused {
        /// The handle to reply to.
        handle: u64,
        /// NBD error value.
        errno: u32,
        /// Why (sent in structured error replies).
        message: String,
        /// Payload bytes that follow the header and must be skipped.
        skip: u32,
    },
}

/// Parses and validates one request header.
pub fn parse_request(h: &[u8; REQUEST_LEN], limits: &Limits) -> Result<Request, RequestError> {
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if magic != REQUEST_MAGIC {
        return Err(RequestError::BadMagic(magic));
    }
    let flags = u16::from_be_bytes([h[4], h[5]]);
    let typ = u16::from_be_bytes([h[6], h[7]]);
    let handle = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
    let offset = u64::from_be_bytes(h[16..24].try_into().expect("8 bytes"));
    let length = u32::from_be_bytes(h[24..28].try_into().expect("4 bytes"));
    let skip = if typ == CMD_WRITE { length } else { 0 };
    let refuse = |errno, message: String| RequestError::Refused { handle, errno, message, skip };

    let command = match typ {
        CMD_READ => Command::Read,
        CMD_WRITE => Command::Write,
        CMD_DISC => Command::Disconnect,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim,
        CMD_WRITE_ZEROES => Command::WriteZeroes,
        CMD_CACHE => Command::Cache,
        // § NBD_CMD_BLOCK_STATUS: only after a metadata context was selected.
        CMD_BLOCK_STATUS if limits.block_status => Command::BlockStatus,
        CMD_BLOCK_STATUS => return Err(refuse(EINVAL, "block status needs a metadata context (NBD_OPT_SET_META_CONTEXT base:allocation)".into())),
        other => return Err(refuse(EINVAL, format!("unsupported command {other}"))),
    };
    if command == Command::Write && length > limits.max_len {
        return Err(RequestError::WriteTooLarge(length, limits.max_len));
    }
    let allowed = match command {
        Command::Read => CMD_FLAG_FUA | CMD_FLAG_DF,
        Command::Write | Command::Trim => CMD_FLAG_FUA,
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        Command::Cache => 0,
        Command::Flush | Command::Disconnect => CMD_FLAG_FUA,
        Command::BlockStatus => CMD_FLAG_REQ_ONE,
    };
    if flags & !allowed != 0 {
        return Err(refuse(EINVAL, format!("flags {flags:#06x} not valid for {command:?}")));
    }
    match command {
        Command::Disconnect | Command::Flush => {
            // Offset and length are reserved (zero); tolerate what clients send anyway.
        }
        _ => {
            if length == 0 {
                return Err(refuse(EINVAL, format!("{command:?} of zero length")));
            }
            let end = offset.checked_add(u64::from(length));
            if end.is_none_or(|e| e > limits.size) {
                // § NBD_CMD_WRITE / NBD_CMD_WRITE_ZEROES: a write past the end SHOULD get ENOSPC.
                let errno = if matches!(command, Command::Write | Command::WriteZeroes) { ENOSPC } else { EINVAL };
                return Err(refuse(errno, format!("{command:?} at {offset}+{length} is beyond the end of the export ({} bytes)", limits.size)));
            }
            // A block status length is no payload: any length inside the export goes.
            if command == Command::Read && length > limits.max_len {
                return Err(refuse(EINVAL, format!("read of {length} bytes exceeds the {}-byte maximum", limits.max_len)));
            }
            if limits.read_only && matches!(command, Command::Write | Command::Trim | Command::WriteZeroes) {
                return Err(refuse(EPERM, "the export is read-only".into()));
            }
        }
    }
    Ok(Request { command, flags, handle, offset, length })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(typ: u16, flags: u16, offset: u64, length: u32) -> [u8; REQUEST_LEN] {
        let mut h = [0u8; REQUEST_LEN];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&typ.to_be_bytes());
        h[8..16].copy_from_slice(&7u64.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&length.to_be_bytes());
        h
    }

    const L: Limits = Limits { size: 1 << 20, max_len: 64 << 10, read_only: false, block_status: false };

    #[test]
    fn valid_requests_parse() {
        let r = parse_request(&header(CMD_WRITE, CMD_FLAG_FUA, 4096, 512), &L).unwrap();
        assert_eq!((r.command, r.handle, r.offset, r.length), (Command::Write, 7, 4096, 512));
        assert_eq!(parse_request(&header(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20), &L).unwrap().command, Command::WriteZeroes);
        assert_eq!(parse_request(&header(CMD_FLUSH, 0, 0, 0), &L).unwrap().command, Command::Flush);
    }

    #[test]
    fn bad_requests_are_refused_or_fatal() {
        let mut h = header(CMD_READ, 0, 0, 512);
        h[0] = 0;
        assert!(matches!(parse_request(&h, &L), Err(RequestError::BadMagic(_))));
        let e = |h| match parse_request(&h, &L) {
            Err(RequestError::Refused { errno, skip, .. }) => (errno, skip),
            other => panic!("{other:?}"),
        };
        assert_eq!(e(header(99, 0, 0, 1)), (EINVAL, 0));
        assert_eq!(e(header(CMD_READ, 0, (1 << 20) - 1, 2)), (EINVAL, 0));
        assert_eq!(e(header(CMD_READ, 0, u64::MAX, 2)), (EINVAL, 0));
        assert_eq!(e(header(CMD_WRITE, 0, 1 << 20, 16)), (ENOSPC, 16), "payload of a refused write is skipped");
        assert_eq!(e(header(CMD_READ, 0, 0, 0)), (EINVAL, 0));
        assert_eq!(e(header(CMD_READ, 0, 0, 128 << 10)), (EINVAL, 0));
        assert_eq!(e(header(CMD_WRITE, 1 << 9, 0, 16)), (EINVAL, 16), "unknown flag");
        assert!(matches!(parse_request(&header(CMD_WRITE, 0, 0, 1 << 30), &L), Err(RequestError::WriteTooLarge(..))));
        let ro = Limits { read_only: true, ..L };
        // Block status: only with base:allocation selected; any length inside the export.
        assert_eq!(e(header(CMD_BLOCK_STATUS, 0, 0, 4096)), (EINVAL, 0), "no metadata context");
        let bs = Limits { block_status: true, ..L };
        let r = parse_request(&header(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20), &bs).unwrap();
        assert_eq!((r.command, r.length), (Command::BlockStatus, 1 << 20), "longer than a read may be");
        assert!(matches!(parse_request(&header(CMD_BLOCK_STATUS, 0, 4096, 1 << 20), &bs), Err(RequestError::Refused { errno: EINVAL, .. })));
        assert!(matches!(parse_request(&header(CMD_BLOCK_STATUS, CMD_FLAG_FUA, 0, 4096), &bs), Err(RequestError::Refused { errno: EINVAL, .. })));
        // Cache: a hint inside the export, any length; fast zero only on write zeroes.
        assert_eq!(parse_request(&header(CMD_CACHE, 0, 0, 1 << 20), &L).unwrap().command, Command::Cache);
        assert_eq!(e(header(CMD_CACHE, 0, 4096, 1 << 20)), (EINVAL, 0));
        let fast = parse_request(&header(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE, 0, 4096), &L).unwrap();
        assert_eq!(fast.command, Command::WriteZeroes);
        assert_eq!(e(header(CMD_READ, CMD_FLAG_FAST_ZERO, 0, 4096)), (EINVAL, 0));
        assert!(matches!(parse_request(&header(CMD_TRIM, 0, 0, 512), &ro), Err(RequestError::Refused { errno: EPERM, .. })));
        assert!(parse_request(&header(CMD_READ, 0, 0, 512), &ro).is_ok());
    }
}
