//! Placement-group commands: what a PG's Raft log carries, and the replies to them.
//!
//! A compact binary encoding, not serde: a write's payload is sliced out of the log entry
//! without copying, and decoding validates every length so a malformed entry is an error
//! reply, not a panic.
//!
//! ```text
//! Write:        [8][volume u64][epoch u64][write_epoch u64][offset u64][n u32][n × crc u32][data]
//! Sealed write: [9][volume u64][epoch u64][write_epoch u64][offset u64][n u32][n × crc u32][n × crypt 28 bytes][data]
//! Zero:         [10][volume u64][epoch u64][write_epoch u64][offset u64][len u64][keep_allocated u8]
//! DeleteVolume: [3][volume u64]
//! Probe:        [4][volume u64][chunk u64]
//! Repair:       [5][volume u64][probe_index u64][offset u64][crc u32][data: 4096 bytes]
//! Sealed repair:[7][volume u64][probe_index u64][offset u64][crc u32][crypt 28 bytes][data: 4096 bytes]
//! ReleaseVersions: [11][volume u64][n u32][n × live snapshot epoch u64]
//! Rollback:     [12][volume u64][to u64][at u64]
//! Of a clone:   [13][volume u64][n u8][n × (ancestor u64, epoch u64)][write, zero, rollback or release]
//! ```
//! Tags 1 (write), 6 (sealed write) and 2 (zero) are the same without `write_epoch`, from logs
//! written before snapshots; they decode with write epoch 1 and are no longer written.
//! Sealed writes and repairs are those of encrypted volumes: whole blocks of ciphertext, each
//! with its encryption context (nonce, tag: `basalt_common::CryptContext`), stored beside the
//! block so its reader can open it. Nodes never hold a key; the crcs cover the ciphertext.
//! All integers little-endian. A write's crcs cover `data` cut at 4 KiB volume boundaries.
//! `epoch` is the writer's attachment epoch: once a PG has applied a command of epoch `e` for a
//! volume, it refuses that volume's commands with a lower epoch (fencing). `write_epoch` is the
//! volume's snapshot write epoch the writer held (`basalt_chunk_store::versions`): a chunk whose
//! newest version is older is copied first, and once a PG applied a write of epoch `w` it
//! refuses the volume's writes of a lower one (they were issued before a snapshot cut).
//!
//! A clone's writes, zeroes, rollbacks and releases come wrapped in tag 13 with its lineage
//! (`basalt_chunk_store::Lineage`: the ancestors it reads where it wrote nothing, nearest
//! first), which never changes over the clone's life; the wrapped command names the same
//! volume.
//!
//! Probe and Repair are the integrity scrub's (see [`super::repair`]): a probe marks a log
//! position at which every replica's copy of a chunk is compared; a repair rewrites one block
//! on the replicas whose copy is bad, and only if nothing wrote the chunk since that probe.

use basalt_common::{BLOCK_SIZE, CryptContext, VolumeId};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A command in a PG's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgCommand {
    /// Write `data` at `offset`.
    Write {
        /// Volume.
        volume: VolumeId,
        /// Writer's attachment epoch.
        epoch: u64,
        /// The volume's snapshot write epoch the writer held.
        write_epoch: u64,
        /// Byte offset.
        offset: u64,
        /// crc32c per piece (see module docs).
        crcs: Vec<u32>,
        /// Encryption context per block (encrypted volumes: whole blocks only).
        crypt: Option<Vec<CryptContext>>,
        /// The bytes.
        data: Bytes,
    },
    /// Make a range read as zeros.
    Zero {
        /// Volume.
        volume: VolumeId,
        /// Writer's attachment epoch.
        epoch: u64,
        /// The volume's snapshot write epoch the writer held.
        write_epoch: u64,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Keep the space allocated (NBD NO_HOLE).
        keep_allocated: bool,
    },
    /// Release every chunk of a deleted volume and refuse its writes from now on.
    DeleteVolume {
        /// Volume.
        volume: VolumeId,
    },
    /// Marks this log position for comparing the replicas of one chunk.
    Probe {
        /// Volume.
        volume: VolumeId,
        /// Chunk index within the volume.
        chunk: u64,
    },
    /// Rewrites one block with a healthy replica's copy where the local copy is bad.
    Repair {
        /// Volume.
        volume: VolumeId,
        /// The probe whose comparison found the block bad; the repair is void on a replica
        /// where the chunk was written after it.
        probe_index: u64,
        /// Block-aligned byte offset in the volume.
        offset: u64,
        /// crc32c of `data`, the value every healthy replica holds.
        crc: u32,
        /// The block's encryption context on the healthy replica (encrypted volumes).
        crypt: Option<CryptContext>,
        /// The block (4 KiB).
        data: Bytes,
    },
    /// Releases the chunk versions of `volume` that are neither a chunk's newest version nor
    /// what a live snapshot reads (a snapshot was deleted). Idempotent.
    ReleaseVersions {
        /// Volume.
        volume: VolumeId,
        /// The write epochs of the volume's live snapshots.
        live: Vec<u64>,
    },
    /// Returns the volume to snapshot epoch `to`: each chunk changed since gets a version at
    /// write epoch `at` holding what `to` reads (a local copy, or a hole).
    Rollback {
        /// Volume.
        volume: VolumeId,
        /// The snapshot's epoch.
        to: u64,
        /// The volume's write epoch.
        at: u64,
    },
    /// A command on a clone, with the clone's lineage.
    OfClone {
        /// Ancestors and the snapshot epoch each is read at, nearest first (1 to
        /// [`MAX_LINEAGE`]).
        lineage: Vec<(VolumeId, u64)>,
        /// A write, zero, rollback or release of the clone.
        command: Box<PgCommand>,
    },
}

/// Most ancestors a clone has (a clone of a clone of ...).
pub const MAX_LINEAGE: usize = 16;

/// Most live snapshot epochs one release names (a volume's snapshot limit is far below it).
pub const MAX_RELEASE_EPOCHS: usize = 65_536;

/// How `data` at `offset` is cut into checksummed pieces: at every 4 KiB boundary of the volume.
pub fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let next = ((pos / BLOCK_SIZE) + 1) * BLOCK_SIZE;
        let piece_end = next.min(end);
        let piece = (pos, piece_end - pos);
        pos = piece_end;
        Some(piece)
    })
}

/// Number of pieces a write of `len` bytes at `offset` has.
pub fn piece_count(offset: u64, len: u64) -> usize {
    if len == 0 {
        return 0;
    }
    ((offset + len).div_ceil(BLOCK_SIZE) - offset / BLOCK_SIZE) as usize
}

impl PgCommand {
    /// Encodes the command.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode_into(&mut b);
        b.freeze()
    }

    /// Appends the command's encoding to `b` (a clone's wrapper writes its header first, so
    /// the payload is copied once).
    fn encode_into(&self, b: &mut BytesMut) {
        match self {
            PgCommand::Write { volume, epoch, write_epoch, offset, crcs, crypt, data } => {
                let sealed = crypt.as_ref().map_or(0, |c| c.len() * CryptContext::LEN);
                b.reserve(37 + crcs.len() * 4 + sealed + data.len());
                b.put_u8(if crypt.is_some() { 9 } else { 8 });
                b.put_u64_le(volume.0);
                b.put_u64_le(*epoch);
                b.put_u64_le(*write_epoch);
                b.put_u64_le(*offset);
                b.put_u32_le(crcs.len() as u32);
                for c in crcs {
                    b.put_u32_le(*c);
                }
                for c in crypt.iter().flatten() {
                    b.put_slice(&c.nonce);
                    b.put_slice(&c.tag);
                }
                b.put_slice(data);
            }
            PgCommand::Zero { volume, epoch, write_epoch, offset, len, keep_allocated } => {
                b.reserve(42);
                b.put_u8(10);
                b.put_u64_le(volume.0);
                b.put_u64_le(*epoch);
                b.put_u64_le(*write_epoch);
                b.put_u64_le(*offset);
                b.put_u64_le(*len);
                b.put_u8(u8::from(*keep_allocated));
            }
            PgCommand::DeleteVolume { volume } => {
                b.reserve(9);
                b.put_u8(3);
                b.put_u64_le(volume.0);
            }
            PgCommand::Probe { volume, chunk } => {
                b.reserve(17);
                b.put_u8(4);
                b.put_u64_le(volume.0);
                b.put_u64_le(*chunk);
            }
            PgCommand::Repair { volume, probe_index, offset, crc, crypt, data } => {
                b.reserve(29 + CryptContext::LEN + data.len());
                b.put_u8(if crypt.is_some() { 7 } else { 5 });
                b.put_u64_le(volume.0);
                b.put_u64_le(*probe_index);
                b.put_u64_le(*offset);
                b.put_u32_le(*crc);
                if let Some(c) = crypt {
                    b.put_slice(&c.nonce);
                    b.put_slice(&c.tag);
                }
                b.put_slice(data);
            }
            PgCommand::Rollback { volume, to, at } => {
                b.reserve(25);
                b.put_u8(12);
                b.put_u64_le(volume.0);
                b.put_u64_le(*to);
                b.put_u64_le(*at);
            }
            PgCommand::OfClone { lineage, command } => {
                b.reserve(10 + lineage.len() * 16);
                b.put_u8(13);
                b.put_u64_le(command.volume().0);
                b.put_u8(lineage.len() as u8);
                for (volume, epoch) in lineage {
                    b.put_u64_le(volume.0);
                    b.put_u64_le(*epoch);
                }
                command.encode_into(b);
            }
            PgCommand::ReleaseVersions { volume, live } => {
                b.reserve(13 + live.len() * 8);
                b.put_u8(11);
                b.put_u64_le(volume.0);
                b.put_u32_le(live.len() as u32);
                for e in live {
                    b.put_u64_le(*e);
                }
            }
        }
    }

    /// The volume the command is about.
    pub fn volume(&self) -> VolumeId {
        match self {
            PgCommand::Write { volume, .. }
            | PgCommand::Zero { volume, .. }
            | PgCommand::DeleteVolume { volume }
            | PgCommand::Probe { volume, .. }
            | PgCommand::Repair { volume, .. }
            | PgCommand::ReleaseVersions { volume, .. }
            | PgCommand::Rollback { volume, .. } => *volume,
            PgCommand::OfClone { command, .. } => command.volume(),
        }
    }

    /// Wraps a write, zero, rollback or release of a clone with its lineage (a volume that
    /// is not a clone, empty `lineage`: the command as it is).
    pub fn of_clone(self, lineage: &[(VolumeId, u64)]) -> PgCommand {
        if lineage.is_empty() {
            return self;
        }
        PgCommand::OfClone { lineage: lineage.to_vec(), command: Box::new(self) }
    }

    /// Decodes a command, validating lengths and checksum counts.
    pub fn decode(mut b: Bytes) -> Result<Self, String> {
        if b.remaining() < 9 {
            return Err("command shorter than its header".into());
        }
        let tag = b.get_u8();
        let volume = VolumeId(b.get_u64_le());
        match tag {
            1 | 6 | 8 | 9 => {
                let versioned = tag >= 8;
                if b.remaining() < if versioned { 28 } else { 20 } {
                    return Err("truncated write header".into());
                }
                let epoch = b.get_u64_le();
                let write_epoch = if versioned { b.get_u64_le() } else { 1 };
                let offset = b.get_u64_le();
                let n = b.get_u32_le() as usize;
                if b.remaining() < n.saturating_mul(4) {
                    return Err("truncated checksum list".into());
                }
                let crcs: Vec<u32> = (0..n).map(|_| b.get_u32_le()).collect();
                let crypt = if tag == 6 || tag == 9 {
                    if b.remaining() < n.saturating_mul(CryptContext::LEN) {
                        return Err("truncated encryption contexts".into());
                    }
                    let contexts = CryptContext::decode_all(&b.split_to(n * CryptContext::LEN), n).ok_or("malformed encryption contexts")?;
                    Some(contexts.into_iter().collect::<Option<Vec<_>>>().ok_or("a sealed block without an encryption context")?)
                } else {
                    None
                };
                let data = b;
                if data.is_empty() || offset.checked_add(data.len() as u64).is_none() {
                    return Err("empty or overflowing write".into());
                }
                if piece_count(offset, data.len() as u64) != n {
                    return Err(format!("{n} checksums for a write that has {} pieces", piece_count(offset, data.len() as u64)));
                }
                if crypt.is_some() && !(offset.is_multiple_of(BLOCK_SIZE) && (data.len() as u64).is_multiple_of(BLOCK_SIZE)) {
                    return Err(format!("sealed write at {offset} of {} bytes is not whole blocks", data.len()));
                }
                if write_epoch == 0 {
                    return Err("a write without a write epoch".into());
                }
                Ok(PgCommand::Write { volume, epoch, write_epoch, offset, crcs, crypt, data })
            }
            2 | 10 => {
                let versioned = tag == 10;
                if b.remaining() != if versioned { 33 } else { 25 } {
                    return Err("bad zero command length".into());
                }
                let epoch = b.get_u64_le();
                let write_epoch = if versioned { b.get_u64_le() } else { 1 };
                if write_epoch == 0 {
                    return Err("a zero command without a write epoch".into());
                }
                let offset = b.get_u64_le();
                let len = b.get_u64_le();
                let keep_allocated = b.get_u8() != 0;
                if len == 0 || offset.checked_add(len).is_none() {
                    return Err("empty or overflowing zero range".into());
                }
                Ok(PgCommand::Zero { volume, epoch, write_epoch, offset, len, keep_allocated })
            }
            3 if b.remaining() == 0 => Ok(PgCommand::DeleteVolume { volume }),
            3 => Err("trailing bytes after delete-volume".into()),
            4 if b.remaining() == 8 => Ok(PgCommand::Probe { volume, chunk: b.get_u64_le() }),
            4 => Err("bad probe command length".into()),
            5 | 7 => {
                let sealed = if tag == 7 { CryptContext::LEN } else { 0 };
                if b.remaining() != 20 + sealed + BLOCK_SIZE as usize {
                    return Err("bad repair command length".into());
                }
                let probe_index = b.get_u64_le();
                let offset = b.get_u64_le();
                let crc = b.get_u32_le();
                if !offset.is_multiple_of(BLOCK_SIZE) {
                    return Err(format!("repair offset {offset} is not block aligned"));
                }
                let crypt = if tag == 7 {
                    Some(CryptContext::get(&b.split_to(CryptContext::LEN)).ok_or("a sealed repair without an encryption context")?)
                } else {
                    None
                };
                Ok(PgCommand::Repair { volume, probe_index, offset, crc, crypt, data: b })
            }
            11 => {
                if b.remaining() < 4 {
                    return Err("truncated release command".into());
                }
                let n = b.get_u32_le() as usize;
                if n > MAX_RELEASE_EPOCHS || b.remaining() != n * 8 {
                    return Err(format!("bad release command: {n} epochs in {} bytes", b.remaining()));
                }
                Ok(PgCommand::ReleaseVersions { volume, live: (0..n).map(|_| b.get_u64_le()).collect() })
            }
            12 if b.remaining() == 16 => {
                let (to, at) = (b.get_u64_le(), b.get_u64_le());
                if to >= at {
                    return Err(format!("rollback to epoch {to} at epoch {at}: a rollback writes at an epoch after its snapshot's"));
                }
                Ok(PgCommand::Rollback { volume, to, at })
            }
            12 => Err("bad rollback command length".into()),
            13 => {
                if b.remaining() < 1 {
                    return Err("truncated clone command".into());
                }
                let n = b.get_u8() as usize;
                if n == 0 || n > MAX_LINEAGE || b.remaining() < n * 16 {
                    return Err(format!("bad clone command: a lineage of {n} ancestors"));
                }
                let lineage: Vec<(VolumeId, u64)> = (0..n).map(|_| (VolumeId(b.get_u64_le()), b.get_u64_le())).collect();
                if lineage.iter().any(|(v, e)| *v == volume || *e == 0) {
                    return Err(format!("bad clone command: {volume} with lineage {lineage:?}"));
                }
                // Checked before decoding it: nested wrappers would recurse without bound.
                if b.first() == Some(&13) {
                    return Err("bad clone command: a clone command inside another".into());
                }
                let command = PgCommand::decode(b)?;
                if !matches!(
                    command,
                    PgCommand::Write { .. } | PgCommand::Zero { .. } | PgCommand::Rollback { .. } | PgCommand::ReleaseVersions { .. }
                ) || command.volume() != volume
                {
                    return Err(format!("bad clone command for {volume}: it wraps a command of another kind or volume"));
                }
                Ok(PgCommand::OfClone { lineage, command: Box::new(command) })
            }
            other => Err(format!("unknown command tag {other}")),
        }
    }
}

/// The outcome of applying a command, as replicated state machines agree on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgReply {
    /// Applied.
    Ok,
    /// The volume was deleted: nothing applied.
    NoSuchVolume,
    /// The command failed to decode or validate.
    Invalid(String),
    /// No space on this replica.
    NoSpace(String),
    /// Stored data needed for a partial-block update failed its checksum.
    Corrupt(String),
    /// The writer's attachment was superseded.
    Fenced(String),
    /// Applied at this log index (the answer to a probe).
    Index(u64),
}

impl PgReply {
    /// Encodes the reply.
    pub fn encode(&self) -> Bytes {
        let index_bytes;
        let (code, body): (u8, &[u8]) = match self {
            PgReply::Ok => (0, b""),
            PgReply::NoSuchVolume => (1, b""),
            PgReply::Invalid(m) => (2, m.as_bytes()),
            PgReply::NoSpace(m) => (3, m.as_bytes()),
            PgReply::Corrupt(m) => (4, m.as_bytes()),
            PgReply::Fenced(m) => (5, m.as_bytes()),
            PgReply::Index(i) => {
                index_bytes = i.to_le_bytes();
                (6, &index_bytes)
            }
        };
        let mut b = BytesMut::with_capacity(1 + body.len());
        b.put_u8(code);
        b.put_slice(body);
        b.freeze()
    }

    /// Decodes a reply.
    pub fn decode(b: &[u8]) -> Self {
        let Some((&code, rest)) = b.split_first() else { return PgReply::Invalid("empty reply".into()) };
        let msg = String::from_utf8_lossy(rest).into_owned();
        match code {
            0 => PgReply::Ok,
            1 => PgReply::NoSuchVolume,
            3 => PgReply::NoSpace(msg),
            4 => PgReply::Corrupt(msg),
            5 => PgReply::Fenced(msg),
            6 => match <[u8; 8]>::try_from(rest) {
                Ok(i) => PgReply::Index(u64::from_le_bytes(i)),
                Err(_) => PgReply::Invalid("malformed index reply".into()),
            },
            _ => PgReply::Invalid(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc32c_of_zero_block() -> u32 {
        basalt_common::crc32c(&[0u8; 4096])
    }

    #[test]
    fn pieces_cut_at_block_boundaries() {
        let p: Vec<_> = pieces(4000, 200).collect();
        assert_eq!(p, vec![(4000, 96), (4096, 104)]);
        assert_eq!(piece_count(4000, 200), 2);
        assert_eq!(piece_count(0, 8192), 2);
        assert_eq!(piece_count(1, 8192), 3);
        assert_eq!(pieces(0, 8192).count(), 2);
    }

    #[test]
    fn roundtrip_and_rejects_garbage() {
        let cmds = [
            PgCommand::Write {
                volume: VolumeId(3),
                epoch: 2,
                write_epoch: 3,
                offset: 4000,
                crcs: vec![1, 2],
                crypt: None,
                data: Bytes::from(vec![9u8; 200]),
            },
            PgCommand::Write {
                volume: VolumeId(3),
                epoch: 2,
                write_epoch: 1,
                offset: 8192,
                crcs: vec![1, 2],
                crypt: Some(vec![CryptContext { nonce: [1; 12], tag: [2; 16] }, CryptContext { nonce: [3; 12], tag: [4; 16] }]),
                data: Bytes::from(vec![9u8; 8192]),
            },
            PgCommand::Zero { volume: VolumeId(3), epoch: 2, write_epoch: 3, offset: 0, len: 4096, keep_allocated: true },
            PgCommand::DeleteVolume { volume: VolumeId(3) },
            PgCommand::ReleaseVersions { volume: VolumeId(3), live: vec![2, 5, 9] },
            PgCommand::ReleaseVersions { volume: VolumeId(3), live: vec![] },
            PgCommand::Rollback { volume: VolumeId(3), to: 2, at: 5 },
            PgCommand::Probe { volume: VolumeId(3), chunk: 7 },
            PgCommand::Zero { volume: VolumeId(3), epoch: 2, write_epoch: 3, offset: 0, len: 4096, keep_allocated: false }
                .of_clone(&[(VolumeId(2), 4), (VolumeId(1), 7)]),
            PgCommand::Write {
                volume: VolumeId(3),
                epoch: 1,
                write_epoch: 1,
                offset: 0,
                crcs: vec![5],
                crypt: None,
                data: Bytes::from(vec![1u8; 9]),
            }
            .of_clone(&[(VolumeId(2), 4)]),
            PgCommand::Repair { volume: VolumeId(3), probe_index: 9, offset: 8192, crc: 5, crypt: None, data: Bytes::from(vec![1u8; 4096]) },
            PgCommand::Repair {
                volume: VolumeId(3),
                probe_index: 9,
                offset: 8192,
                crc: 5,
                crypt: Some(CryptContext { nonce: [5; 12], tag: [6; 16] }),
                data: Bytes::from(vec![1u8; 4096]),
            },
        ];
        for c in cmds {
            assert_eq!(PgCommand::decode(c.encode()).unwrap(), c);
            let enc = c.encode();
            for cut in 0..enc.len().min(30) {
                if cut < enc.len() {
                    let _ = PgCommand::decode(enc.slice(..cut)); // must not panic
                }
            }
        }
        let bad = PgCommand::Write {
            volume: VolumeId(1),
            epoch: 0,
            write_epoch: 1,
            offset: 0,
            crcs: vec![1],
            crypt: None,
            data: Bytes::from(vec![0u8; 8192]),
        };
        assert!(PgCommand::decode(bad.encode()).is_err(), "checksum count must match pieces");
        let ctx = CryptContext { nonce: [1; 12], tag: [1; 16] };
        let partial = PgCommand::Write {
            volume: VolumeId(1),
            epoch: 1,
            write_epoch: 1,
            offset: 100,
            crcs: vec![1],
            crypt: Some(vec![ctx]),
            data: Bytes::from(vec![0u8; 50]),
        };
        assert!(PgCommand::decode(partial.encode()).is_err(), "sealed writes are whole blocks");
        let none = PgCommand::Write {
            volume: VolumeId(1),
            epoch: 1,
            write_epoch: 1,
            offset: 0,
            crcs: vec![1],
            crypt: Some(vec![CryptContext { nonce: [0; 12], tag: [0; 16] }]),
            data: Bytes::from(vec![0u8; 4096]),
        };
        assert!(PgCommand::decode(none.encode()).is_err(), "every sealed block has a context");
        assert!(PgCommand::decode(Bytes::from_static(&[99, 0, 0, 0, 0, 0, 0, 0, 0])).is_err());
        // Commands from logs written before snapshots decode at write epoch 1.
        let mut old = vec![1u8];
        old.extend_from_slice(&3u64.to_le_bytes());
        old.extend_from_slice(&2u64.to_le_bytes());
        old.extend_from_slice(&0u64.to_le_bytes());
        old.extend_from_slice(&1u32.to_le_bytes());
        old.extend_from_slice(&crc32c_of_zero_block().to_le_bytes());
        old.extend_from_slice(&[0u8; 4096]);
        match PgCommand::decode(Bytes::from(old)).unwrap() {
            PgCommand::Write { epoch: 2, write_epoch: 1, offset: 0, .. } => {}
            other => panic!("{other:?}"),
        }
        let mut zero = vec![2u8];
        for v in [3u64, 2, 4096, 4096] {
            zero.extend_from_slice(&v.to_le_bytes());
        }
        zero.push(0);
        assert!(matches!(PgCommand::decode(Bytes::from(zero)).unwrap(), PgCommand::Zero { write_epoch: 1, len: 4096, .. }));
        let no_epoch = PgCommand::Zero { volume: VolumeId(1), epoch: 1, write_epoch: 0, offset: 0, len: 4096, keep_allocated: false };
        assert!(PgCommand::decode(no_epoch.encode()).is_err(), "write epoch 0 is not one");
        let mut huge = vec![11u8];
        huge.extend_from_slice(&3u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(PgCommand::decode(Bytes::from(huge)).is_err(), "a release naming more epochs than it carries");
        assert!(PgCommand::decode(PgCommand::Rollback { volume: VolumeId(3), to: 5, at: 5 }.encode()).is_err(), "a rollback at its own epoch");
        let unaligned =
            PgCommand::Repair { volume: VolumeId(1), probe_index: 1, offset: 100, crc: 0, crypt: None, data: Bytes::from(vec![0u8; 4096]) };
        assert!(PgCommand::decode(unaligned.encode()).is_err(), "repairs are whole blocks");
        // Clone wrappers: a known kind of the same volume, a sane lineage, never nested.
        let zero = PgCommand::Zero { volume: VolumeId(3), epoch: 2, write_epoch: 3, offset: 0, len: 4096, keep_allocated: false };
        assert_eq!(zero.clone().of_clone(&[]), zero, "not a clone: no wrapper");
        let bad_clones = [
            PgCommand::OfClone { lineage: vec![(VolumeId(2), 4)], command: Box::new(PgCommand::Probe { volume: VolumeId(3), chunk: 0 }) },
            PgCommand::OfClone { lineage: vec![(VolumeId(2), 4)], command: Box::new(PgCommand::DeleteVolume { volume: VolumeId(3) }) },
            PgCommand::OfClone { lineage: vec![(VolumeId(3), 4)], command: Box::new(zero.clone()) },
            PgCommand::OfClone { lineage: vec![(VolumeId(2), 0)], command: Box::new(zero.clone()) },
            PgCommand::OfClone { lineage: vec![], command: Box::new(zero.clone()) },
            PgCommand::OfClone { lineage: vec![(VolumeId(2), 1); MAX_LINEAGE + 1], command: Box::new(zero.clone()) },
            zero.clone().of_clone(&[(VolumeId(2), 4)]).of_clone(&[(VolumeId(2), 4)]),
        ];
        for bad in bad_clones {
            assert!(PgCommand::decode(bad.encode()).is_err(), "{bad:?}");
        }
        let mut other_volume = zero.clone().of_clone(&[(VolumeId(2), 4)]).encode().to_vec();
        other_volume[1] = 9;
        assert!(PgCommand::decode(Bytes::from(other_volume)).is_err(), "a wrapper naming another volume");
        let mut deep = Vec::new();
        for _ in 0..10_000 {
            deep.extend_from_slice(&[13, 3, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]);
        }
        assert!(PgCommand::decode(Bytes::from(deep)).is_err(), "deep nesting is refused, not recursed into");
        for r in [
            PgReply::Ok,
            PgReply::NoSuchVolume,
            PgReply::Invalid("x".into()),
            PgReply::NoSpace("y".into()),
            PgReply::Corrupt("z".into()),
            PgReply::Fenced("f".into()),
            PgReply::Index(u64::MAX - 3),
        ] {
            assert_eq!(PgReply::decode(&r.encode()), r);
        }
    }
}
