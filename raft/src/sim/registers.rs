//! The simulated state machine: per block, the set of write sequence numbers applied to it.
//!
//! A grow-only set makes every acknowledged write checkable on its own (a lost write is missing
//! whatever came after it), and its maximum is what a read of the block returns (it only grows,
//! which is what the linearizability check relies on). Like a placement group it applies without
//! making anything durable and makes its state durable at checkpoints; after a crash it
//! restarts from the last checkpoint and Raft replays the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::state_machine::{Checkpoint, SnapshotReceiver, SnapshotSink, SnapshotStream, StateMachine};
use crate::types::{ApplyItem, CheckpointRecord};

/// Format version of a register command.
const COMMAND_V1: u8 = 1;

/// The applied state: block → sequence numbers written to it.
pub(crate) type State = BTreeMap<u32, BTreeSet<u64>>;

/// A write of sequence number `seq` to `block`, as a Raft command.
pub(crate) fn write_command(block: u32, seq: u64) -> Bytes {
    let mut b = Vec::with_capacity(13);
    b.push(COMMAND_V1);
    b.extend_from_slice(&block.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    Bytes::from(b)
}

fn parse_command(b: &[u8]) -> io::Result<(u32, u64)> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("register command: {why}"));
    match b.first() {
        Some(&COMMAND_V1) if b.len() == 13 => {
            let block = u32::from_le_bytes(b[1..5].try_into().map_err(|_| bad("short"))?);
            let seq = u64::from_le_bytes(b[5..13].try_into().map_err(|_| bad("short"))?);
            Ok((block, seq))
        }
        Some(&COMMAND_V1) => Err(bad("wrong length")),
        Some(v) => Err(bad(&format!("unknown version {v}"))),
        None => Err(bad("empty")),
    }
}

fn encode_state(state: &State) -> Bytes {
    Bytes::from(bincode::serialize(state).expect("register state serialises"))
}

fn decode_state(b: &[u8]) -> io::Result<State> {
    bincode::deserialize(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("register snapshot: {e}")))
}

#[derive(Default)]
struct DiskState {
    /// Bumped at every power-off: checkpoints captured before it are not written.
    boot: u64,
    saved: Option<(CheckpointRecord, Bytes)>,
}

/// The state machine's durable part: the last checkpoint. Survives crashes; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct RegisterDisk {
    state: Arc<Mutex<DiskState>>,
}

impl RegisterDisk {
    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node lost power: nothing of the running boot is written any more.
    pub(crate) fn power_off(&self) {
        self.lock().boot += 1;
    }

    fn save(&self, boot: u64, record: CheckpointRecord, data: Bytes) -> io::Result<()> {
        let mut st = self.lock();
        if st.boot != boot {
            return Err(io::Error::other("the node crashed before this checkpoint was written"));
        }
        let newer = st.saved.as_ref().is_none_or(|(r, _)| r.meta.last_log_id <= record.meta.last_log_id);
        if newer {
            st.saved = Some((record, data));
        }
        Ok(())
    }
}

/// The register state machine of one boot of one node.
pub(crate) struct Registers {
    state: Arc<Mutex<State>>,
    disk: RegisterDisk,
    boot: u64,
}

impl Registers {
    /// Boots on `disk` with an empty live state; [`StateMachine::recover`] loads the checkpoint.
    pub(crate) fn open(disk: &RegisterDisk) -> Self {
        let boot = disk.lock().boot;
        Self { state: Arc::default(), disk: disk.clone(), boot }
    }

    /// The live state, for reads.
    pub(crate) fn state(&self) -> Arc<Mutex<State>> {
        self.state.clone()
    }

    fn live(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A snapshot: the encoded state, in one piece.
pub(crate) struct RegisterSnapshot(Option<Bytes>);

impl SnapshotStream for RegisterSnapshot {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        Ok(self.0.take())
    }
}

/// A captured checkpoint, written to the disk when it runs.
pub(crate) struct RegisterCheckpoint {
    disk: RegisterDisk,
    boot: u64,
    record: CheckpointRecord,
    data: Bytes,
}

impl Checkpoint for RegisterCheckpoint {
    type Snapshot = RegisterSnapshot;

    async fn run(self) -> io::Result<RegisterSnapshot> {
        self.disk.save(self.boot, self.record, self.data.clone())?;
        Ok(RegisterSnapshot(Some(self.data)))
    }
}

/// Stages incoming snapshots.
#[derive(Clone)]
pub(crate) struct RegisterReceiver;

/// One incoming snapshot.
pub(crate) struct RegisterSink(Vec<u8>);

impl SnapshotReceiver for RegisterReceiver {
    type Snapshot = RegisterSnapshot;
    type Sink = RegisterSink;

    async fn begin(&self, _record: &CheckpointRecord) -> io::Result<RegisterSink> {
        Ok(RegisterSink(Vec::new()))
    }
}

impl SnapshotSink for RegisterSink {
    type Snapshot = RegisterSnapshot;

    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.0.extend_from_slice(&chunk);
        Ok(())
    }

    async fn finish(self) -> io::Result<RegisterSnapshot> {
        Ok(RegisterSnapshot(Some(Bytes::from(self.0))))
    }
}

impl StateMachine for Registers {
    type Snapshot = RegisterSnapshot;
    type Checkpoint = RegisterCheckpoint;
    type Receiver = RegisterReceiver;

    async fn recover(&mut self) -> io::Result<Option<CheckpointRecord>> {
        let saved = self.disk.lock().saved.clone();
        match saved {
            Some((record, data)) => {
                *self.live() = decode_state(&data)?;
                Ok(Some(record))
            }
            None => Ok(None),
        }
    }

    async fn apply(&mut self, items: Vec<ApplyItem>) -> io::Result<Vec<Bytes>> {
        let mut state = self.live();
        let mut replies = Vec::with_capacity(items.len());
        for item in items {
            if let Some(cmd) = item.command {
                let (block, seq) = parse_command(&cmd)?;
                state.entry(block).or_default().insert(seq);
            }
            replies.push(Bytes::new());
        }
        Ok(replies)
    }

    fn checkpoint(&mut self, record: CheckpointRecord) -> RegisterCheckpoint {
        let data = encode_state(&self.live());
        RegisterCheckpoint { disk: self.disk.clone(), boot: self.boot, record, data }
    }

    async fn open_snapshot(&mut self, _record: &CheckpointRecord) -> io::Result<RegisterSnapshot> {
        let saved = self.disk.lock().saved.clone();
        let data = saved.map(|(_, d)| d).ok_or_else(|| io::Error::other("no checkpoint to send"))?;
        Ok(RegisterSnapshot(Some(data)))
    }

    async fn install(&mut self, record: CheckpointRecord, mut snapshot: RegisterSnapshot) -> io::Result<()> {
        let data = snapshot.next_chunk().await?.unwrap_or_default();
        let state = decode_state(&data)?;
        self.disk.save(self.boot, record, data)?;
        *self.live() = state;
        Ok(())
    }

    fn receiver(&self) -> RegisterReceiver {
        RegisterReceiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_bad_ones_are_refused() {
        let c = write_command(7, 42);
        assert_eq!(parse_command(&c).expect("parses"), (7, 42));
        assert!(parse_command(&[]).is_err());
        assert!(parse_command(&c[..5]).is_err());
        let mut v2 = c.to_vec();
        v2[0] = 2;
        let err = parse_command(&v2).expect_err("unknown version");
        assert!(err.to_string().contains("unknown version 2"), "{err}");
    }
}
