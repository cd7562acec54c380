//! Deterministic simulation of one Raft group's three replicas, in one thread, under paused
//! time.
//!
//! What runs is the real Raft layer — openraft, [`SmAdapter`], the message encoding and the
//! transport's [`GroupEndpoint`](crate::transport::server::GroupEndpoint) — with the in-memory
//! log engine ([`MemLogEngine`]: durable only once a simulated sync completes), a register state
//! machine that checkpoints like a placement group ([`registers`]), and a filterable in-process
//! transport ([`net`]). Writers and readers run a workload while a nemesis crashes nodes (one, or
//! all at once: a power loss, which erases every unsynced write), cuts a node off, and makes the
//! network lossy and slow (which reorders messages); then the network heals, every node
//! restarts, and the history is checked:
//! - no acknowledged write is missing from any replica;
//! - the replicas converge to the same state;
//! - every read is linearizable: it returns at least what was acknowledged before it started,
//!   only values written before it ended, and never less than a read that ended before it began.
//!
//! Everything random — workload, faults, message delays and losses, sync latencies, openraft's
//! election timeouts ([`crate::runtime`]) — comes from one seed ([`SimConfig::seed`]), and time is tokio's paused
//! clock, so a run is reproduced by its seed.

pub(crate) mod net;
pub(crate) mod registers;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::error::RaftError;
use crate::group::{RaftGroup, endpoint};
use crate::host::RaftTuning;
use crate::log_store::RaftLogEngine;
use crate::log_store::memory::{MemLogConfig, MemLogDisk, MemLogEngine};
use crate::state_machine::{SmAdapter, StateMachine};
use crate::types::{GroupId, NodeId, NodeInfo};
use net::{SimNet, SimNetworkFactory};
use registers::{RegisterDisk, Registers, State, write_command};

/// The simulated group's id.
const GROUP: GroupId = 1;
/// The replicas.
const NODES: [NodeId; 3] = [1, 2, 3];
/// How long a client keeps retrying one operation before calling its outcome unknown.
const OP_DEADLINE: Duration = Duration::from_secs(3);

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seeds everything random in the run.
    pub seed: u64,
    /// Simulated time of the workload under faults.
    pub duration: Duration,
    /// Concurrent writers (each owns its blocks, so its sequence numbers order its writes).
    pub writers: usize,
    /// Blocks per writer.
    pub blocks_per_writer: u32,
    /// Concurrent readers.
    pub readers: usize,
    /// Whether the nemesis runs.
    pub faults: bool,
    /// The log engine's behaviour (its seed is derived from [`SimConfig::seed`] per node).
    pub log: MemLogConfig,
}

impl SimConfig {
    /// The configuration CI runs, for `seed`.
    pub fn ci(seed: u64) -> Self {
        Self {
            seed,
            duration: Duration::from_secs(20),
            writers: 4,
            blocks_per_writer: 4,
            readers: 2,
            faults: true,
            log: MemLogConfig { seed, sync_latency_us: (200, 4000), ack_before_durable: false },
        }
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimReport {
    /// The seed, to reproduce the run.
    pub seed: u64,
    /// Writes acknowledged.
    pub writes_acked: u64,
    /// Writes whose outcome stayed unknown (no answer within the deadline).
    pub writes_unknown: u64,
    /// Reads answered.
    pub reads: u64,
    /// Single-node crashes.
    pub crashes: u64,
    /// Crashes of every node at once.
    pub power_losses: u64,
    /// Nodes cut off.
    pub partitions: u64,
    /// Periods of a lossy, slow network.
    pub degradations: u64,
    /// Raft messages sent and lost.
    pub messages: (u64, u64),
    /// Simulated log syncs over all nodes.
    pub syncs: u64,
    /// Simulated time the whole run took (workload, recovery and checks), in milliseconds.
    pub sim_millis: u64,
    /// What the checker found wrong; empty for a correct run.
    pub violations: Vec<String>,
}

struct Running {
    group: RaftGroup<Registers>,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct Node {
    log_disk: MemLogDisk,
    sm_disk: RegisterDisk,
    /// Bumped by every boot and every crash: a boot still starting when the node crashes
    /// again finds it changed and gives up.
    boots: u64,
    booting: bool,
    running: Option<Running>,
}

#[derive(Clone, Copy, Debug)]
struct WriteOp {
    block: u32,
    seq: u64,
    invoked: u64,
    acked: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
struct ReadOp {
    block: u32,
    value: u64,
    invoked: u64,
    completed: u64,
}

#[derive(Default)]
struct History {
    writes: Vec<WriteOp>,
    reads: Vec<ReadOp>,
}

struct Cluster {
    cfg: SimConfig,
    net: SimNet,
    nodes: Mutex<BTreeMap<NodeId, Node>>,
    history: Mutex<History>,
    /// Orders every invocation and completion (one thread: a total order).
    clock: AtomicU64,
    /// The node clients try first.
    leader_hint: AtomicU64,
    report: Mutex<SimReport>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs one simulation on a fresh single-threaded runtime with paused time.
pub fn run(cfg: &SimConfig) -> io::Result<SimReport> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build()?;
    // Every task runs on this thread, so openraft's election timeouts come from the seed too.
    crate::runtime::seed_thread_rng(Some(cfg.seed));
    let report = rt.block_on(simulate(cfg.clone()));
    crate::runtime::seed_thread_rng(None);
    report
}

/// The group's openraft configuration: the one real nodes run ([`RaftTuning`]), the same on
/// every node, with short timings (time is simulated) and frequent checkpoints, so snapshots
/// and purges happen.
fn raft_config() -> Result<openraft::Config, RaftError> {
    RaftTuning {
        heartbeat_ms: 50,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 600,
        checkpoint_every_entries: 64,
        keep_entries_after_checkpoint: 16,
        max_payload_entries: 64,
        ..RaftTuning::default()
    }
    .openraft_config()
}

impl Cluster {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn running(&self, node: NodeId) -> Option<(RaftGroup<Registers>, Arc<Mutex<State>>)> {
        lock(&self.nodes).get(&node).and_then(|n| n.running.as_ref()).map(|r| (r.group.clone(), r.state.clone()))
    }

    fn is_up(&self, node: NodeId) -> bool {
        lock(&self.nodes).get(&node).is_some_and(|n| n.running.is_some())
    }

    /// Boots `node` from what its disks hold.
    async fn boot(&self, node: NodeId) -> Result<(), RaftError> {
        let (log_disk, sm_disk, boot) = {
            let mut nodes = lock(&self.nodes);
            let n = nodes.entry(node).or_default();
            n.boots += 1;
            (n.log_disk.clone(), n.sm_disk.clone(), n.boots)
        };
        let stopped = |e: String| RaftError::Stopped { group: GROUP, reason: format!("node {node}: {e}") };
        let log_cfg = MemLogConfig { seed: self.cfg.seed ^ node.wrapping_mul(0x9e37_79b9), ..self.cfg.log.clone() };
        let log = MemLogEngine::open(&log_disk, log_cfg).group(GROUP)?;
        let sm = Registers::open(&sm_disk);
        let state = sm.state();
        let receiver = sm.receiver();
        let adapter = SmAdapter::new(sm).await.map_err(|e| stopped(e.to_string()))?;
        let network = SimNetworkFactory::<Registers> { net: self.net.clone(), from: node, boot, _sm: PhantomData };
        let config = Arc::new(raft_config()?);
        let raft = openraft::Raft::new(node, config, network, log, adapter).await.map_err(|e| stopped(e.to_string()))?;
        let group = RaftGroup { group: GROUP, raft };
        let current = {
            let mut nodes = lock(&self.nodes);
            match nodes.get_mut(&node) {
                Some(n) if n.boots == boot => {
                    self.net.register(node, boot, endpoint(&group, receiver));
                    n.running = Some(Running { group: group.clone(), state });
                    true
                }
                _ => false,
            }
        };
        if !current {
            // The node lost power again while starting.
            group.shutdown().await;
        }
        Ok(())
    }

    /// Power loss at `node`: unsynced writes are gone, the running boot can do nothing more.
    async fn crash(&self, node: NodeId) {
        let running = {
            let mut nodes = lock(&self.nodes);
            let Some(n) = nodes.get_mut(&node) else { return };
            n.log_disk.power_off();
            n.sm_disk.power_off();
            n.boots += 1;
            n.running.take()
        };
        self.net.unregister(node);
        if let Some(r) = running {
            r.group.shutdown().await;
        }
    }

    /// Runs `op` on whichever node leads: follows "not the leader" hints, moves on from nodes
    /// that are down or fail, until the operation's deadline. `None` if no node answered in time.
    async fn on_leader<T, F, Fut>(&self, mut op: F) -> Option<T>
    where
        F: FnMut(RaftGroup<Registers>, Arc<Mutex<State>>) -> Fut,
        Fut: std::future::Future<Output = Result<T, RaftError>>,
    {
        let deadline = Instant::now() + OP_DEADLINE;
        let mut target = self.leader_hint.load(Ordering::Relaxed);
        while Instant::now() < deadline {
            let Some((group, state)) = self.running(target) else {
                target = next_node(target);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            match tokio::time::timeout(Duration::from_millis(500), op(group, state)).await {
                Ok(Ok(value)) => {
                    self.leader_hint.store(target, Ordering::Relaxed);
                    return Some(value);
                }
                Ok(Err(RaftError::NotLeader { leader: Some(l), .. })) if l != target => target = l,
                _ => {
                    target = next_node(target);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        None
    }

    /// Proposes `command`; whether it was acknowledged.
    async fn propose(&self, command: bytes::Bytes) -> bool {
        self.on_leader(|group, _| {
            let command = command.clone();
            async move { group.propose(command).await.map(drop) }
        })
        .await
        .is_some()
    }

    /// A linearizable read of `block` (the highest sequence number applied to it), from the leader.
    async fn read(&self, block: u32) -> Option<u64> {
        self.on_leader(|group, state| async move {
            group.read_barrier().await?;
            Ok(lock(&state).get(&block).and_then(|s| s.last().copied()).unwrap_or(0))
        })
        .await
    }

    async fn writer(self: Arc<Self>, w: usize, stop: Arc<AtomicBool>) {
        let mut rng = StdRng::seed_from_u64(self.cfg.seed.wrapping_add(1000 + w as u64));
        let first = w as u32 * self.cfg.blocks_per_writer;
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let block = first + rng.random_range(0..self.cfg.blocks_per_writer);
            seq += 1;
            let invoked = self.tick();
            let ok = self.propose(write_command(block, seq)).await;
            let acked = ok.then(|| self.tick());
            lock(&self.history).writes.push(WriteOp { block, seq, invoked, acked });
            tokio::time::sleep(Duration::from_micros(rng.random_range(0..3000))).await;
        }
    }

    async fn reader(self: Arc<Self>, r: usize, stop: Arc<AtomicBool>) {
        let mut rng = StdRng::seed_from_u64(self.cfg.seed.wrapping_add(2000 + r as u64));
        let blocks = self.cfg.writers as u32 * self.cfg.blocks_per_writer;
        while !stop.load(Ordering::Relaxed) {
            let block = rng.random_range(0..blocks.max(1));
            let invoked = self.tick();
            if let Some(value) = self.read(block).await {
                let completed = self.tick();
                lock(&self.history).reads.push(ReadOp { block, value, invoked, completed });
            }
            tokio::time::sleep(Duration::from_micros(rng.random_range(0..5000))).await;
        }
    }

    /// Crashes, power losses, partitions and a bad network, until `until`.
    async fn nemesis(self: Arc<Self>, until: Instant) {
        let mut rng = StdRng::seed_from_u64(self.cfg.seed.wrapping_add(3000));
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
            let roll = rng.random_range(0..100);
            if roll < 35 {
                let node = NODES[rng.random_range(0..NODES.len())];
                if !self.is_up(node) {
                    continue;
                }
                self.crash(node).await;
                lock(&self.report).crashes += 1;
                let down = Duration::from_millis(rng.random_range(50..1500));
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(down).await;
                    me.restart(node).await;
                });
            } else if roll < 50 {
                for node in NODES {
                    self.crash(node).await;
                }
                lock(&self.report).power_losses += 1;
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
                for node in NODES {
                    self.restart(node).await;
                }
            } else if roll < 75 {
                let node = NODES[rng.random_range(0..NODES.len())];
                self.net.isolate(node, &NODES);
                lock(&self.report).partitions += 1;
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
                self.net.heal();
            } else {
                self.net.degrade(rng.random_range(0.02..0.2), (500, rng.random_range(2_000..20_000)));
                lock(&self.report).degradations += 1;
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
                self.net.heal();
            }
        }
    }

    /// Boots `node` if it is down; a failed boot is a finding.
    async fn restart(&self, node: NodeId) {
        {
            let mut nodes = lock(&self.nodes);
            let n = nodes.entry(node).or_default();
            if n.running.is_some() || n.booting {
                return;
            }
            n.booting = true;
        }
        let result = self.boot(node).await;
        if let Some(n) = lock(&self.nodes).get_mut(&node) {
            n.booting = false;
        }
        if let Err(e) = result {
            lock(&self.report).violations.push(format!("node {node} failed to restart: {e}"));
        }
    }

    /// After the faults: every node up, one more write acknowledged, and every replica applied
    /// as far as the leader. Returns each node's final state.
    async fn settle(&self) -> Result<BTreeMap<NodeId, State>, String> {
        self.net.heal();
        for node in NODES {
            self.restart(node).await;
        }
        if !self.propose(write_command(u32::MAX, 1)).await {
            // Give a slow election more time before calling the group stuck.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if self.propose(write_command(u32::MAX, 1)).await {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("the healed group accepted no write within 30 s".into());
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let applied: Vec<(u64, u64)> = NODES
                .iter()
                .filter_map(|&n| self.running(n))
                .map(|(g, _)| {
                    let s = g.status();
                    (s.applied_index, s.last_log_index)
                })
                .collect();
            let target = applied.iter().map(|(_, last)| *last).max().unwrap_or(0);
            if applied.len() == NODES.len() && applied.iter().all(|(a, _)| *a == target) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("replicas did not converge within 30 s: (applied, last log) per node {applied:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(NODES.iter().filter_map(|&n| self.running(n).map(|(_, s)| (n, lock(&s).clone()))).collect())
    }
}

fn next_node(n: NodeId) -> NodeId {
    NODES[(NODES.iter().position(|&x| x == n).unwrap_or(0) + 1) % NODES.len()]
}

async fn simulate(cfg: SimConfig) -> io::Result<SimReport> {
    let started = Instant::now();
    let cluster = Arc::new(Cluster {
        net: SimNet::new(cfg.seed),
        nodes: Mutex::new(BTreeMap::new()),
        history: Mutex::default(),
        clock: AtomicU64::new(1),
        leader_hint: AtomicU64::new(NODES[0]),
        report: Mutex::new(SimReport { seed: cfg.seed, ..Default::default() }),
        cfg,
    });
    let fail = |e: RaftError| io::Error::other(e.to_string());
    for node in NODES {
        cluster.restart(node).await;
    }
    if let Some(v) = lock(&cluster.report).violations.first() {
        return Err(io::Error::other(v.clone()));
    }
    let members: BTreeMap<NodeId, NodeInfo> = NODES.iter().map(|&n| (n, NodeInfo { addr: format!("sim-{n}") })).collect();
    if let Some((group, _)) = cluster.running(NODES[0]) {
        group.initialize(members).await.map_err(fail)?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..cluster.cfg.writers {
        tasks.push(tokio::spawn(cluster.clone().writer(w, stop.clone())));
    }
    for r in 0..cluster.cfg.readers {
        tasks.push(tokio::spawn(cluster.clone().reader(r, stop.clone())));
    }
    let until = Instant::now() + cluster.cfg.duration;
    if cluster.cfg.faults {
        cluster.clone().nemesis(until).await;
    } else {
        tokio::time::sleep_until(until).await;
    }
    stop.store(true, Ordering::Relaxed);
    // Clients finish their last operation (each gives up within its deadline).
    let settled = async {
        cluster.net.heal();
        for node in NODES {
            cluster.restart(node).await;
        }
        for t in tasks {
            let _ = t.await;
        }
        cluster.settle().await
    };
    let finals = settled.await;

    let mut report = lock(&cluster.report).clone();
    match finals {
        Ok(finals) => report.violations.extend(check(&lock(&cluster.history), &finals)),
        Err(e) => report.violations.push(e),
    }
    {
        let history = lock(&cluster.history);
        report.writes_acked = history.writes.iter().filter(|w| w.acked.is_some()).count() as u64;
        report.writes_unknown = history.writes.len() as u64 - report.writes_acked;
        report.reads = history.reads.len() as u64;
    }
    report.messages = cluster.net.counts();
    report.syncs = lock(&cluster.nodes).values().map(|n| n.log_disk.syncs()).sum();
    report.sim_millis = started.elapsed().as_millis() as u64;
    for node in NODES {
        cluster.crash(node).await;
    }
    Ok(report)
}

/// The history checks (see the module comment). Returns what is wrong, at most a few lines per
/// kind.
fn check(history: &History, finals: &BTreeMap<NodeId, State>) -> Vec<String> {
    const SHOW: usize = 5;
    let mut out = Vec::new();
    let user = |s: &State| -> State { s.iter().filter(|(b, _)| **b != u32::MAX).map(|(b, v)| (*b, v.clone())).collect() };

    // Durability: every acknowledged write is on every replica.
    let mut lost = 0;
    for w in history.writes.iter().filter(|w| w.acked.is_some()) {
        for (node, state) in finals {
            if !state.get(&w.block).is_some_and(|s| s.contains(&w.seq)) {
                lost += 1;
                if lost <= SHOW {
                    out.push(format!(
                        "lost write: block {} seq {} (acknowledged at event {}) is missing on node {node}",
                        w.block,
                        w.seq,
                        w.acked.unwrap_or(0)
                    ));
                }
            }
        }
    }
    // Convergence.
    let mut states = finals.iter();
    if let Some((first_node, first)) = states.next() {
        for (node, state) in states {
            if user(state) != user(first) {
                out.push(format!("replicas diverged: node {node}'s state differs from node {first_node}'s"));
            }
        }
    }
    // Nothing was applied that no writer wrote.
    let issued: BTreeSet<(u32, u64)> = history.writes.iter().map(|w| (w.block, w.seq)).collect();
    for (node, state) in finals {
        if let Some((b, s)) = user(state).iter().flat_map(|(b, set)| set.iter().map(move |s| (*b, *s))).find(|x| !issued.contains(x)) {
            out.push(format!("node {node} applied block {b} seq {s}, which nobody wrote"));
        }
    }

    // Linearizability of reads, per block.
    let mut bad_reads = 0;
    let mut by_block: BTreeMap<u32, (Vec<&WriteOp>, Vec<&ReadOp>)> = BTreeMap::new();
    for w in &history.writes {
        by_block.entry(w.block).or_default().0.push(w);
    }
    for r in &history.reads {
        by_block.entry(r.block).or_default().1.push(r);
    }
    for (block, (writes, reads)) in &by_block {
        let mut done: Vec<&ReadOp> = reads.clone();
        done.sort_by_key(|r| r.completed);
        for r in reads {
            let floor = writes.iter().filter(|w| w.acked.is_some_and(|a| a < r.invoked)).map(|w| w.seq).max().unwrap_or(0);
            let written = r.value == 0 || writes.iter().any(|w| w.seq == r.value && w.invoked < r.completed);
            let earlier = done.iter().take_while(|x| x.completed < r.invoked).map(|x| x.value).max().unwrap_or(0);
            let problem = if r.value < floor {
                Some(format!(
                    "stale read: block {block} read {} at events {}-{}, but seq {floor} was acknowledged before",
                    r.value, r.invoked, r.completed
                ))
            } else if !written {
                Some(format!("phantom read: block {block} read {} at events {}-{}, never written by then", r.value, r.invoked, r.completed))
            } else if r.value < earlier {
                Some(format!(
                    "read went back: block {block} read {} at events {}-{} after an earlier read saw {earlier}",
                    r.value, r.invoked, r.completed
                ))
            } else {
                None
            };
            if let Some(p) = problem {
                bad_reads += 1;
                if bad_reads <= SHOW {
                    out.push(p);
                }
            }
        }
    }
    if lost > SHOW {
        out.push(format!("… {} more lost writes", lost - SHOW));
    }
    if bad_reads > SHOW {
        out.push(format!("… {} more bad reads", bad_reads - SHOW));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(block: u32, seq: u64, invoked: u64, acked: Option<u64>) -> WriteOp {
        WriteOp { block, seq, invoked, acked }
    }

    fn read(block: u32, value: u64, invoked: u64, completed: u64) -> ReadOp {
        ReadOp { block, value, invoked, completed }
    }

    fn state(entries: &[(u32, &[u64])]) -> State {
        entries.iter().map(|(b, s)| (*b, s.iter().copied().collect())).collect()
    }

    /// The checker itself: each rule fires on a history that breaks it, and not on one that keeps it.
    #[test]
    fn the_checker_catches_each_kind_of_violation() {
        let good = History { writes: vec![write(0, 1, 1, Some(2)), write(0, 2, 3, None)], reads: vec![read(0, 1, 4, 5), read(0, 2, 6, 7)] };
        let finals: BTreeMap<NodeId, State> = [(1, state(&[(0, &[1, 2])])), (2, state(&[(0, &[1, 2])]))].into();
        assert!(check(&good, &finals).is_empty(), "{:?}", check(&good, &finals));

        let lost: BTreeMap<NodeId, State> = [(1, state(&[(0, &[2])])), (2, state(&[(0, &[1, 2])]))].into();
        let found = check(&good, &lost);
        assert!(found.iter().any(|v| v.starts_with("lost write") && v.contains("node 1")), "{found:?}");
        assert!(found.iter().any(|v| v.starts_with("replicas diverged")), "{found:?}");

        let stale = History { reads: vec![read(0, 0, 4, 5)], ..good_clone(&good) };
        assert!(check(&stale, &finals).iter().any(|v| v.starts_with("stale read")));
        let phantom = History { reads: vec![read(0, 2, 1, 2)], ..good_clone(&good) };
        assert!(check(&phantom, &finals).iter().any(|v| v.starts_with("phantom read")));
        let back = History { reads: vec![read(0, 2, 4, 5), read(0, 1, 6, 7)], ..good_clone(&good) };
        assert!(check(&back, &finals).iter().any(|v| v.starts_with("read went back")));
        let invented: BTreeMap<NodeId, State> = [(1, state(&[(0, &[1, 2, 9])]))].into();
        assert!(check(&good, &invented).iter().any(|v| v.contains("which nobody wrote")));
    }

    fn good_clone(h: &History) -> History {
        History { writes: h.writes.clone(), reads: h.reads.clone() }
    }
}
