//! Turning one virtio-blk descriptor chain into a request (virtio 1.2 §5.2.6, §2.7.4). Pure
//! over guest memory — no socket, no volume — so it can be fuzzed and tested with crafted
//! chains.
//!
//! Layout is not assumed (VIRTIO_F_VERSION_1 implies ANY_LAYOUT, §2.7.4.1): the 16-byte header
//! is the first 16 device-readable bytes wherever the descriptors split them, the status is the
//! last device-writable byte, and data is what lies between. A chain the device cannot use
//! becomes a [`Parsed::Fail`] (answered with IOERR or UNSUPP) or, if it has nowhere to put a
//! status, [`Parsed::NoStatus`] (returned to the driver with nothing written). Nothing here
//! panics on guest input.

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::proto::*;

/// Guest memory as the vhost-user handler maps it, with the dirty-page log a live migration
/// reads (every write into guest memory through it is logged once QEMU sets a log).
pub type Memory = GuestMemoryMmap<BitmapMmapRegion>;

/// One descriptor of a chain as the driver posted it (after indirect tables are followed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// VIRTQ_DESC_F_WRITE: the device writes this buffer.
    pub writable: bool,
}

/// A contiguous piece of guest memory a request reads from or writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A byte range of the volume for discard or write-zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// Write-zeroes may deallocate (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP); always true for discard.
    pub unmap: bool,
}

/// What a well-formed request asks of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into `into`.
    Read {
        /// Byte offset in the volume.
        offset: u64,
        /// Bytes to read (the total of `into`).
        len: u64,
        /// Where they go.
        into: Vec<Segment>,
    },
    /// Write the `len` bytes of `from` at `offset`.
    Write {
        /// Byte offset in the volume.
        offset: u64,
        /// Bytes to write (the total of `from`).
        len: u64,
        /// Where they come from.
        from: Vec<Segment>,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the device id into `into` (at most 20 bytes).
    GetId {
        /// Where it goes.
        into: Vec<Segment>,
    },
    /// Discard ranges.
    Discard(Vec<Range>),
    /// Zero ranges.
    WriteZeroes(Vec<Range>),
}

/// A request the device can carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Guest address of the status byte.
    pub status: u64,
}

/// What one chain comes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A request to carry out.
    Request(Request),
    /// A request refused: write `code` at `status` and return the chain.
    Fail {
        /// Guest address of the status byte.
        status: u64,
        /// VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP.
        code: u8,
        /// Why (logged).
        reason: String,
    },
    /// A chain with no writable byte in guest memory to put a status in: returned to the driver
    /// with nothing written.
    NoStatus {
        /// Why (logged).
        reason: String,
    },
}

/// What the device knows when it validates a request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Volume size in bytes.
    pub capacity: u64,
    /// Writes, discards and write-zeroes refused.
    pub read_only: bool,
    /// Largest read or write payload in bytes.
    pub max_transfer: u64,
    /// Most discard / write-zeroes segments in one request.
    pub max_ranges: u32,
    /// Largest discard / write-zeroes segment in bytes.
    pub max_range_bytes: u64,
}

impl Parsed {
    fn fail(status: u64, code: u8, reason: impl Into<String>) -> Parsed {
        Parsed::Fail { status, code, reason: reason.into() }
    }
}

/// The descriptor chain starting at `head` in the split descriptor table at `desc_table` of a
/// queue of `queue_size` entries (§2.7.5), indirect tables followed (§2.7.5.3): what the ring
/// would yield for that head. Used to resubmit a request a previous back end took from the
/// ring and never completed (its head recorded in the inflight area), which the ring itself
/// cannot yield again. A loop, an address outside guest memory, a nested indirect table or an
/// index past the table is an error naming it.
pub fn chain_at(mem: &Memory, desc_table: u64, queue_size: u16, head: u16) -> Result<Vec<Desc>, String> {
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;
    let read = |table: u64, i: u16| -> Result<(u64, u32, u16, u16), String> {
        let at = table.checked_add(16 * u64::from(i)).ok_or_else(|| format!("descriptor {i} address overflows"))?;
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, GuestAddress(at)).map_err(|e| format!("descriptor {i} at {at:#x}: {e}"))?;
        let word = |r: std::ops::Range<usize>| raw[r].iter().rev().fold(0u64, |v, b| v << 8 | u64::from(*b));
        Ok((word(0..8), word(8..12) as u32, word(12..14) as u16, word(14..16) as u16))
    };
    let mut descs = Vec::new();
    let (mut table, mut size, mut i, mut indirect) = (desc_table, queue_size, head, false);
    loop {
        if i >= size {
            return Err(format!("descriptor index {i} is past a table of {size}"));
        }
        if descs.len() > usize::from(queue_size).max(usize::from(size)) {
            return Err(format!("the chain from head {head} loops"));
        }
        let (addr, len, flags, next) = read(table, i)?;
        if flags & F_INDIRECT != 0 {
            if indirect {
                return Err("an indirect table inside an indirect table".into());
            }
            if len == 0 || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                return Err(format!("indirect table of {len} bytes"));
            }
            (table, size, i, indirect) = (addr, (len / 16) as u16, 0, true);
            continue;
        }
        descs.push(Desc { addr, len, writable: flags & F_WRITE != 0 });
        if flags & F_NEXT == 0 {
            return Ok(descs);
        }
        i = next;
    }
}

/// Parses the chain `descs` (in chain order) over guest memory `mem`.
pub fn parse(descs: &[Desc], mem: &Memory, limits: &Limits) -> Parsed {
    // The status byte: the last byte of the last descriptor, which must be device-writable.
    let Some(last) = descs.last() else {
        return Parsed::NoStatus { reason: "empty descriptor chain".into() };
    };
    if !last.writable || last.len == 0 {
        return Parsed::NoStatus { reason: "the chain does not end in a device-writable status byte".into() };
    }
    let Some(status) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return Parsed::NoStatus { reason: format!("status byte address overflows ({:#x} + {})", last.addr, last.len) };
    };
    if !GuestMemoryBackend::check_range(mem, GuestAddress(status), 1) {
        return Parsed::NoStatus { reason: format!("status byte at {status:#x} is outside guest memory") };
    }

    // Device-readable descriptors first, then device-writable ones (§2.7.4.2).
    let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.writable) {
        return Parsed::fail(status, S_IOERR, "a device-readable descriptor follows a device-writable one");
    }
    for (i, d) in descs.iter().enumerate() {
        if !in_memory(mem, d.addr, d.len) {
            return Parsed::fail(status, S_IOERR, format!("descriptor {i} ({:#x}, {} bytes) is outside guest memory", d.addr, d.len));
        }
    }
    let readable: Vec<Segment> = descs[..first_writable].iter().map(|d| Segment { addr: d.addr, len: d.len }).collect();
    // Writable data: every writable byte but the status.
    let mut writable: Vec<Segment> = descs[first_writable..].iter().map(|d| Segment { addr: d.addr, len: d.len }).collect();
    if let Some(tail) = writable.last_mut() {
        tail.len -= 1;
        if tail.len == 0 {
            writable.pop();
        }
    }

    let mut header = [0u8; HEADER_LEN];
    if total(&readable) < HEADER_LEN as u64 || !gather(mem, &readable, 0, &mut header) {
        return Parsed::fail(status, S_IOERR, format!("request header is shorter than {HEADER_LEN} bytes"));
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let payload = skip(&readable, HEADER_LEN as u64);
    let payload_len = total(&payload);
    let writable_len = total(&writable);

    let op = match kind {
        T_IN => {
            if payload_len != 0 {
                return Parsed::fail(status, S_IOERR, "read request with device-readable data buffers");
            }
            if let Err(reason) = check_io(sector, writable_len, limits) {
                return Parsed::fail(status, S_IOERR, format!("read: {reason}"));
            }
            Op::Read { offset: sector * SECTOR, len: writable_len, into: writable }
        }
        T_OUT => {
            if limits.read_only {
                return Parsed::fail(status, S_IOERR, "write to a read-only device");
            }
            if writable_len != 0 {
                return Parsed::fail(status, S_IOERR, "write request with device-writable data buffers");
            }
            if let Err(reason) = check_io(sector, payload_len, limits) {
                return Parsed::fail(status, S_IOERR, format!("write: {reason}"));
            }
            Op::Write { offset: sector * SECTOR, len: payload_len, from: payload }
        }
        T_FLUSH => Op::Flush,
        T_GET_ID => Op::GetId { into: truncate(&writable, ID_LEN as u64) },
        T_DISCARD | T_WRITE_ZEROES => {
            let name = if kind == T_DISCARD { "discard" } else { "write-zeroes" };
            if limits.read_only {
                return Parsed::fail(status, S_IOERR, format!("{name} on a read-only device"));
            }
            match ranges(mem, &payload, payload_len, kind == T_DISCARD, limits) {
                Ok(r) if kind == T_DISCARD => Op::Discard(r),
                Ok(r) => Op::WriteZeroes(r),
                Err((code, reason)) => return Parsed::fail(status, code, format!("{name}: {reason}")),
            }
        }
        other => return Parsed::fail(status, S_UNSUPP, format!("request type {other} is not supported")),
    };
    Parsed::Request(Request { op, status })
}

/// A read or write of `len` bytes at `sector`: sector-sized, bounded, inside the volume.
fn check_io(sector: u64, len: u64, limits: &Limits) -> Result<(), String> {
    if !len.is_multiple_of(SECTOR) {
        return Err(format!("{len} bytes is not a whole number of {SECTOR}-byte sectors"));
    }
    if len > limits.max_transfer {
        return Err(format!("{len} bytes exceeds the {}-byte maximum", limits.max_transfer));
    }
    let inside = sector.checked_mul(SECTOR).and_then(|o| o.checked_add(len)).is_some_and(|end| end <= limits.capacity);
    if !inside {
        return Err(format!("sector {sector} + {len} bytes lies outside the {}-byte device", limits.capacity));
    }
    Ok(())
}

/// The segments of a discard or write-zeroes payload (§5.2.6 `virtio_blk_discard_write_zeroes`).
fn ranges(mem: &Memory, payload: &[Segment], len: u64, discard: bool, limits: &Limits) -> Result<Vec<Range>, (u8, String)> {
    if len == 0 || !len.is_multiple_of(RANGE_LEN as u64) {
        return Err((S_IOERR, format!("{len} bytes of segments is not a positive multiple of {RANGE_LEN}")));
    }
    let count = len / RANGE_LEN as u64;
    if count > u64::from(limits.max_ranges) {
        return Err((S_IOERR, format!("{count} segments exceeds the maximum of {}", limits.max_ranges)));
    }
    let mut raw = vec![0u8; len as usize];
    if !gather(mem, payload, 0, &mut raw) {
        return Err((S_IOERR, "segments unreadable".into()));
    }
    let mut out = Vec::with_capacity(count as usize);
    for seg in raw.chunks_exact(RANGE_LEN) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        // Discard defines no flags; write-zeroes only UNMAP (§5.2.6.2: unknown flags → UNSUPP).
        let allowed = if discard { 0 } else { WRITE_ZEROES_FLAG_UNMAP };
        if flags & !allowed != 0 {
            return Err((S_UNSUPP, format!("unsupported flags {flags:#x}")));
        }
        let bytes = u64::from(sectors) * SECTOR;
        if bytes > limits.max_range_bytes {
            return Err((S_IOERR, format!("{sectors} sectors exceeds the maximum of {}", limits.max_range_bytes / SECTOR)));
        }
        let inside = sector.checked_mul(SECTOR).and_then(|o| o.checked_add(bytes)).is_some_and(|end| end <= limits.capacity);
        if !inside {
            return Err((S_IOERR, format!("sector {sector} + {sectors} sectors lies outside the {}-byte device", limits.capacity)));
        }
        out.push(Range { offset: sector * SECTOR, len: bytes, unmap: discard || flags & WRITE_ZEROES_FLAG_UNMAP != 0 });
    }
    Ok(out)
}

fn in_memory(mem: &Memory, addr: u64, len: u32) -> bool {
    len == 0 || (addr.checked_add(u64::from(len)).is_some() && GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize))
}

/// Total bytes of `segs`.
pub fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// `segs` without their first `n` bytes.
fn skip(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        let len = u64::from(s.len);
        if n >= len {
            n -= len;
            continue;
        }
        out.push(Segment { addr: s.addr + n, len: (len - n) as u32 });
        n = 0;
    }
    out
}

/// The first `n` bytes of `segs`.
fn truncate(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if n == 0 {
            break;
        }
        let take = u64::from(s.len).min(n);
        out.push(Segment { addr: s.addr, len: take as u32 });
        n -= take;
    }
    out
}

/// Copies `buf.len()` bytes of `segs`, starting `from` bytes in, out of guest memory. False if
/// the segments are too short or unreadable.
pub fn gather(mem: &Memory, segs: &[Segment], from: u64, buf: &mut [u8]) -> bool {
    let mut at = 0usize;
    for s in skip(segs, from) {
        if at == buf.len() {
            break;
        }
        let take = (s.len as usize).min(buf.len() - at);
        if mem.read_slice(&mut buf[at..at + take], GuestAddress(s.addr)).is_err() {
            return false;
        }
        at += take;
    }
    at == buf.len()
}

/// Copies `data` into `segs` in guest memory. False if they are too short or unwritable.
pub fn scatter(mem: &Memory, segs: &[Segment], data: &[u8]) -> bool {
    let mut at = 0usize;
    for s in segs {
        if at == data.len() {
            break;
        }
        let take = (s.len as usize).min(data.len() - at);
        if mem.write_slice(&data[at..at + take], GuestAddress(s.addr)).is_err() {
            return false;
        }
        at += take;
    }
    at == data.len()
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    fn put(mem: &Memory, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    #[test]
    fn chains_direct_indirect_and_broken() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // Head 3 -> 5 (direct), then head 6: an indirect table of two at 0x8000.
        put(&mem, 16 * 3, 0x1000, 16, 1, 5);
        put(&mem, 16 * 5, 0x2000, 1, 2, 0);
        assert_eq!(
            chain_at(&mem, 0, 8, 3).unwrap(),
            vec![Desc { addr: 0x1000, len: 16, writable: false }, Desc { addr: 0x2000, len: 1, writable: true }]
        );
        put(&mem, 16 * 6, 0x8000, 32, 4, 0);
        put(&mem, 0x8000, 0x3000, 16, 1, 1);
        put(&mem, 0x8010, 0x4000, 1, 2, 0);
        assert_eq!(
            chain_at(&mem, 0, 8, 6).unwrap(),
            vec![Desc { addr: 0x3000, len: 16, writable: false }, Desc { addr: 0x4000, len: 1, writable: true }]
        );
        // A loop, an index past the table, a nested indirect table, a table outside memory.
        put(&mem, 16, 0x1000, 16, 1, 2);
        put(&mem, 16 * 2, 0x1000, 16, 1, 1);
        assert!(chain_at(&mem, 0, 8, 1).unwrap_err().contains("loops"));
        put(&mem, 16 * 4, 0x1000, 16, 1, 9);
        assert!(chain_at(&mem, 0, 8, 4).unwrap_err().contains("past a table"));
        put(&mem, 0x8010, 0x8000, 32, 4, 0);
        put(&mem, 0x8000, 0x3000, 16, 1, 1);
        assert!(chain_at(&mem, 0, 8, 6).unwrap_err().contains("indirect table inside"));
        assert!(chain_at(&mem, 1 << 40, 8, 0).is_err());
        assert!(chain_at(&mem, 0, 8, 8).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 1 << 20;
    const LIMITS: Limits = Limits { capacity: 1 << 30, read_only: false, max_transfer: 32 << 20, max_ranges: 16, max_range_bytes: 1 << 30 };

    fn memory() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory")
    }

    fn header(mem: &Memory, at: u64, kind: u32, sector: u64) -> Desc {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
        Desc { addr: at, len: 16, writable: false }
    }

    fn r(addr: u64, len: u32) -> Desc {
        Desc { addr, len, writable: false }
    }

    fn w(addr: u64, len: u32) -> Desc {
        Desc { addr, len, writable: true }
    }

    fn failed(p: Parsed, code: u8, needle: &str) {
        match p {
            Parsed::Fail { code: c, reason, .. } => {
                assert_eq!(c, code, "{reason}");
                assert!(reason.contains(needle), "{reason:?} should mention {needle:?}");
            }
            other => panic!("expected a failure mentioning {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn reads_and_writes_in_the_usual_layout() {
        let mem = memory();
        let p = parse(&[header(&mem, 0, T_IN, 8), w(0x1000, 4096), w(0x3000, 1)], &mem, &LIMITS);
        let Parsed::Request(req) = p else { panic!("{p:?}") };
        assert_eq!(req.status, 0x3000);
        assert_eq!(req.op, Op::Read { offset: 4096, len: 4096, into: vec![Segment { addr: 0x1000, len: 4096 }] });

        let p = parse(&[header(&mem, 0, T_OUT, 1), r(0x1000, 512), r(0x2000, 512), w(0x3000, 1)], &mem, &LIMITS);
        let Parsed::Request(req) = p else { panic!("{p:?}") };
        assert_eq!(req.op, Op::Write { offset: 512, len: 1024, from: vec![Segment { addr: 0x1000, len: 512 }, Segment { addr: 0x2000, len: 512 }] });
    }

    #[test]
    fn any_layout_header_split_and_merged_with_data_and_status() {
        let mem = memory();
        // Header split over two descriptors, the second also carrying the first data bytes;
        // the status byte shares the read buffer's descriptor.
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&2u64.to_le_bytes());
        mem.write_slice(&h[..10], GuestAddress(0x100)).unwrap();
        mem.write_slice(&h[10..], GuestAddress(0x200)).unwrap();
        let p = parse(&[r(0x100, 10), r(0x200, 6 + 512), w(0x5000, 1)], &mem, &LIMITS);
        let Parsed::Request(req) = p else { panic!("{p:?}") };
        assert_eq!(req.op, Op::Write { offset: 1024, len: 512, from: vec![Segment { addr: 0x206, len: 512 }] });

        let p = parse(&[header(&mem, 0, T_IN, 0), w(0x1000, 513)], &mem, &LIMITS);
        let Parsed::Request(req) = p else { panic!("{p:?}") };
        assert_eq!(req.status, 0x1000 + 512);
        assert_eq!(req.op, Op::Read { offset: 0, len: 512, into: vec![Segment { addr: 0x1000, len: 512 }] });
    }

    #[test]
    fn a_chain_without_a_status_byte_gets_nothing_written() {
        let mem = memory();
        assert!(matches!(parse(&[], &mem, &LIMITS), Parsed::NoStatus { .. }));
        assert!(matches!(parse(&[header(&mem, 0, T_FLUSH, 0)], &mem, &LIMITS), Parsed::NoStatus { .. }), "status must be writable");
        assert!(matches!(parse(&[header(&mem, 0, T_FLUSH, 0), w(0x1000, 0)], &mem, &LIMITS), Parsed::NoStatus { .. }));
        assert!(matches!(parse(&[header(&mem, 0, T_FLUSH, 0), w(MEM, 1)], &mem, &LIMITS), Parsed::NoStatus { .. }), "status outside memory");
        assert!(matches!(parse(&[header(&mem, 0, T_FLUSH, 0), w(u64::MAX, 2)], &mem, &LIMITS), Parsed::NoStatus { .. }), "overflow");
    }

    #[test]
    fn malformed_chains_fail_with_ioerr() {
        let mem = memory();
        // Header short.
        failed(parse(&[r(0, 8), w(0x1000, 1)], &mem, &LIMITS), S_IOERR, "header");
        // A buffer outside guest memory, and one wrapping the address space.
        failed(parse(&[header(&mem, 0, T_IN, 0), w(MEM - 100, 512), w(0x1000, 1)], &mem, &LIMITS), S_IOERR, "outside guest memory");
        failed(parse(&[header(&mem, 0, T_OUT, 0), r(u64::MAX - 10, 512), w(0x1000, 1)], &mem, &LIMITS), S_IOERR, "outside guest memory");
        // A read whose data buffer is device-readable (the device would write a read-only buffer).
        failed(parse(&[header(&mem, 0, T_IN, 0), r(0x1000, 512), w(0x3000, 1)], &mem, &LIMITS), S_IOERR, "device-readable data");
        // A write whose data buffer is device-writable.
        failed(parse(&[header(&mem, 0, T_OUT, 0), w(0x1000, 512), w(0x3000, 1)], &mem, &LIMITS), S_IOERR, "device-writable data");
        // Readable after writable.
        failed(parse(&[header(&mem, 0, T_OUT, 0), w(0x1000, 512), r(0x2000, 512), w(0x3000, 1)], &mem, &LIMITS), S_IOERR, "follows");
        // Not whole sectors, past the end, sector overflow, too large.
        failed(parse(&[header(&mem, 0, T_IN, 0), w(0x1000, 100), w(0x3000, 1)], &mem, &LIMITS), S_IOERR, "sectors");
        failed(parse(&[header(&mem, 0, T_IN, (1 << 30) / 512), w(0x1000, 512), w(0x3000, 1)], &mem, &LIMITS), S_IOERR, "outside");
        failed(parse(&[header(&mem, 0, T_IN, u64::MAX / 256), w(0x1000, 512), w(0x3000, 1)], &mem, &LIMITS), S_IOERR, "outside");
        let small = Limits { max_transfer: 1024, ..LIMITS };
        failed(parse(&[header(&mem, 0, T_IN, 0), w(0x1000, 2048), w(0x3000, 1)], &mem, &small), S_IOERR, "maximum");
        // Writes on a read-only device.
        let ro = Limits { read_only: true, ..LIMITS };
        failed(parse(&[header(&mem, 0, T_OUT, 0), r(0x1000, 512), w(0x3000, 1)], &mem, &ro), S_IOERR, "read-only");
        failed(parse(&[header(&mem, 0, T_WRITE_ZEROES, 0), r(0x1000, 16), w(0x3000, 1)], &mem, &ro), S_IOERR, "read-only");
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let mem = memory();
        for kind in [2u32, 3, 14, 15, 16, 0x8000_0000, u32::MAX] {
            failed(parse(&[header(&mem, 0, kind, 0), w(0x1000, 1)], &mem, &LIMITS), S_UNSUPP, "not supported");
        }
    }

    fn range(mem: &Memory, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&sector.to_le_bytes());
        b[8..12].copy_from_slice(&sectors.to_le_bytes());
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&b, GuestAddress(at)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let mem = memory();
        range(&mem, 0x1000, 8, 16, 0);
        range(&mem, 0x1010, 100, 1, WRITE_ZEROES_FLAG_UNMAP);
        let p = parse(&[header(&mem, 0, T_WRITE_ZEROES, 0), r(0x1000, 32), w(0x3000, 1)], &mem, &LIMITS);
        assert_eq!(
            p,
            Parsed::Request(Request {
                op: Op::WriteZeroes(vec![Range { offset: 4096, len: 8192, unmap: false }, Range { offset: 51200, len: 512, unmap: true }]),
                status: 0x3000
            })
        );
        // Discard defines no flags.
        failed(parse(&[header(&mem, 0, T_DISCARD, 0), r(0x1000, 32), w(0x3000, 1)], &mem, &LIMITS), S_UNSUPP, "flags");
        range(&mem, 0x1010, 100, 1, 0);
        assert!(matches!(parse(&[header(&mem, 0, T_DISCARD, 0), r(0x1000, 32), w(0x3000, 1)], &mem, &LIMITS), Parsed::Request(_)));
        // Unknown write-zeroes flags, partial segments, none, too many, past the end, too long.
        range(&mem, 0x1000, 8, 16, 2);
        failed(parse(&[header(&mem, 0, T_WRITE_ZEROES, 0), r(0x1000, 16), w(0x3000, 1)], &mem, &LIMITS), S_UNSUPP, "flags");
        failed(parse(&[header(&mem, 0, T_WRITE_ZEROES, 0), r(0x1000, 20), w(0x3000, 1)], &mem, &LIMITS), S_IOERR, "multiple");
        failed(parse(&[header(&mem, 0, T_DISCARD, 0), w(0x3000, 1)], &mem, &LIMITS), S_IOERR, "multiple");
        failed(parse(&[header(&mem, 0, T_DISCARD, 0), r(0x1000, 16 * 17), w(0x3000, 1)], &mem, &LIMITS), S_IOERR, "segments exceeds");
        range(&mem, 0x1000, (1 << 30) / 512, 1, 0);
        failed(parse(&[header(&mem, 0, T_DISCARD, 0), r(0x1000, 16), w(0x3000, 1)], &mem, &LIMITS), S_IOERR, "outside");
        range(&mem, 0x1000, 0, 16, 0);
        let short = Limits { max_range_bytes: 4096, ..LIMITS };
        failed(parse(&[header(&mem, 0, T_DISCARD, 0), r(0x1000, 16), w(0x3000, 1)], &mem, &short), S_IOERR, "maximum");
    }

    #[test]
    fn get_id_writes_at_most_twenty_bytes() {
        let mem = memory();
        let p = parse(&[header(&mem, 0, T_GET_ID, 0), w(0x1000, 64), w(0x3000, 1)], &mem, &LIMITS);
        let Parsed::Request(Request { op: Op::GetId { into }, .. }) = p else { panic!("{p:?}") };
        assert_eq!(total(&into), 20);
    }

    #[test]
    fn gather_and_scatter_cross_segments() {
        let mem = memory();
        let segs = [Segment { addr: 0x100, len: 3 }, Segment { addr: 0x200, len: 5 }];
        assert!(scatter(&mem, &segs, b"abcdefgh"));
        let mut back = [0u8; 6];
        assert!(gather(&mem, &segs, 2, &mut back));
        assert_eq!(&back, b"cdefgh");
        let mut too_much = [0u8; 9];
        assert!(!gather(&mem, &segs, 0, &mut too_much));
    }
}
