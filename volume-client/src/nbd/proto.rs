//! NBD protocol constants and wire structures.
//!
//! Section names refer to the NBD protocol specification,
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

/// "NBDMAGIC" (§ Handshake, Newstyle negotiation).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic and option request magic (§ Newstyle negotiation).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic (§ Fixed newstyle negotiation).
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic (§ Transmission, Request message).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic (§ Simple reply message).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic (§ Structured reply chunk message).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// § Values, Handshake flags.
/// Server supports fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server can omit the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// § Client flags.
/// Client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client wants no zero padding.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// § Transmission flags.
/// Always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// NBD_CMD_FLUSH supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// NBD_CMD_FLAG_FUA supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// NBD_CMD_TRIM supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// NBD_CMD_WRITE_ZEROES supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// NBD_CMD_FLAG_DF supported (only with structured replies).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Several connections may serve one export; FLUSH/FUA effects are visible on all of them.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// NBD_CMD_CACHE supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// NBD_CMD_FLAG_FAST_ZERO supported (with NBD_CMD_WRITE_ZEROES).
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// § Option types.
/// Select export, enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade the connection to TLS (§ TLS support).
pub const OPT_STARTTLS: u32 = 5;
/// Query export information.
pub const OPT_INFO: u32 = 6;
/// Query and select export, enter transmission.
pub const OPT_GO: u32 = 7;
/// Negotiate structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts (§ Metadata querying).
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts for NBD_CMD_BLOCK_STATUS (§ Metadata querying).
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// The one metadata context served: which ranges hold data (§ Metadata querying, base:allocation).
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id `base:allocation` gets when selected.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Longest metadata context query accepted.
pub const MAX_META_QUERY: usize = 4096;

// § Option reply types.
/// Option accepted.
pub const REP_ACK: u32 = 1;
/// A metadata context (id, name) matching a query.
pub const REP_META_CONTEXT: u32 = 4;
/// An export description (NBD_OPT_LIST).
pub const REP_SERVER: u32 = 2;
/// Export information (NBD_OPT_INFO/GO).
pub const REP_INFO: u32 = 3;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Syntactically invalid option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// TLS must be initiated first (§ FORCEDTLS mode).
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;

// Information types of NBD_REP_INFO (§ NBD_OPT_INFO and NBD_OPT_GO).
/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// § Request types.
/// Read.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Prefetch a range (§ NBD_CMD_CACHE): a hint.
pub const CMD_CACHE: u16 = 5;
/// Report allocation of a range (§ NBD_CMD_BLOCK_STATUS).
pub const CMD_BLOCK_STATUS: u16 = 7;

// § Command flags.
/// Force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes must not deallocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Don't fragment the read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one descriptor is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes: fail at once (ENOTSUP) unless zeroing is faster than writing zeros.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// § Structured reply flags and types.
/// Final chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// No payload; final.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Block status descriptors for one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// base:allocation: the range is not allocated.
pub const STATE_HOLE: u32 = 1;
/// base:allocation: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// Error with message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// § Error values.
/// Operation not permitted (write to a read-only export).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// Server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Length of a request header (§ Request message).
pub const REQUEST_LEN: usize = 28;
/// Length of an option header after the magic (§ Fixed newstyle negotiation).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest option payload accepted (names are at most 4096 bytes; INFO adds a short list).
pub const MAX_OPTION_LEN: u32 = 8192;
