//! Fault injection with a history checker.
//!
//! A workload writes versioned blocks (each block owned by one writer, versions increasing)
//! and reads blocks at random, recording when every operation started and ended and what it
//! returned. Faults are injected while it runs: kill -9 of the meta leader, of a PG leader and of
//! a follower, SIGSTOP/SIGCONT, restarts. The checker then proves, per block:
//! - no acknowledged write is lost: every read returns at least the newest version whose write
//!   was acknowledged before the read started, and the final read after the faults returns at
//!   least the newest acknowledged version;
//! - nothing comes from nowhere: a read returns a version whose write started before the read
//!   ended (or zeros if none did), with intact content;
//! - reads do not go back in time: a read that starts after another ended returns at least
//!   the version the earlier one saw.
//!
//! Tests named `slow_*` (repeated kills for stall statistics, `BASALT_STALL_KILLS` of them) run
//! with `--profile slow`. Set `BASALT_TEST_SLOWEST=1` to list the slowest operations around each
//! fault.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_common::crc32c;
use basalt_proto::admin::{ClusterStatusReply, NodeDrainRequest, NodeRemoveRequest, VolumeCreateRequest};
use basalt_tests::{NodeSpec, Rng, TestCluster, find_block, find_marker, seed, simple_spec};
use basalt_volume_client::Volume;
use bytes::Bytes;

const VOLUME: &str = "hist";
const VOLUME_SIZE: u64 = 64 << 20;
const BLOCKS: u64 = 48;
const WRITERS: u64 = 4;
const READERS: u64 = 2;
const MAGIC: &[u8; 8] = b"BSLTHIST";

/// Where block `b` of the workload lives: spread over the volume so every PG gets some.
fn offset_of(b: u64) -> u64 {
    (b * (VOLUME_SIZE / BLOCKS)) / 4096 * 4096
}

/// Version `v` of block `b`: a header, filler that differs per version, and a crc32c.
fn encode(b: u64, v: u64) -> Bytes {
    let mut buf = vec![0u8; 4096];
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&b.to_le_bytes());
    buf[16..24].copy_from_slice(&v.to_le_bytes());
    let mut x = b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ v;
    for chunk in buf[24..4092].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let crc = crc32c(&buf[..4092]);
    buf[4092..].copy_from_slice(&crc.to_le_bytes());
    Bytes::from(buf)
}

/// The version a read of block `b` saw (0: never written), or what is wrong with the bytes.
fn decode(b: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|x| *x == 0) {
        return Ok(0);
    }
    if data.len() != 4096 || &data[..8] != MAGIC {
        return Err("neither zeros nor a workload block".into());
    }
    let crc = u32::from_le_bytes(data[4092..].try_into().unwrap_or_default());
    if crc32c(&data[..4092]) != crc {
        return Err("workload block with a bad checksum (torn or corrupted)".into());
    }
    let block = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
    if block != b {
        return Err(format!("holds block {block}'s data"));
    }
    Ok(u64::from_le_bytes(data[16..24].try_into().unwrap_or_default()))
}

#[derive(Clone, Debug)]
enum Outcome {
    /// Write acknowledged / read returned this version.
    Ok(u64),
    /// The operation failed with this error.
    Failed(String),
    /// The read returned bytes that are no version of the block.
    Garbage(String),
}

#[derive(Clone, Debug)]
struct Op {
    write: bool,
    block: u64,
    /// For writes: the version written.
    version: u64,
    start: Duration,
    end: Duration,
    outcome: Outcome,
}

/// Every operation of a run, with times relative to its start.
#[derive(Default)]
struct History {
    ops: Mutex<Vec<Op>>,
}

impl History {
    fn push(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    fn snapshot(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Checks a history (see the module docs); returns every violation found.
fn check(ops: &[Op]) -> Vec<String> {
    let mut violations = Vec::new();
    for b in 0..BLOCKS {
        let writes: Vec<&Op> = ops.iter().filter(|o| o.write && o.block == b).collect();
        let mut reads: Vec<(&Op, u64)> = Vec::new();
        for o in ops.iter().filter(|o| !o.write && o.block == b) {
            match &o.outcome {
                Outcome::Ok(v) => reads.push((o, *v)),
                Outcome::Garbage(why) => violations.push(format!("block {b}: read at {:?}..{:?} returned garbage: {why}", o.start, o.end)),
                Outcome::Failed(_) => {}
            }
        }
        for (r, v) in &reads {
            let acked_before = writes.iter().filter(|w| matches!(w.outcome, Outcome::Ok(_)) && w.end < r.start).map(|w| w.version).max().unwrap_or(0);
            if *v < acked_before {
                violations.push(format!(
                    "block {b}: read at {:?}..{:?} returned version {v}, but version {acked_before} was acknowledged before it started (lost or stale)",
                    r.start, r.end
                ));
            }
            if *v > 0 {
                match writes.iter().find(|w| w.version == *v) {
                    None => violations.push(format!("block {b}: read returned version {v}, which nobody wrote")),
                    Some(w) if w.start > r.end => violations.push(format!(
                        "block {b}: read at {:?}..{:?} returned version {v}, whose write started only at {:?}",
                        r.start, r.end, w.start
                    )),
                    Some(_) => {}
                }
            }
        }
        // Reads never go back in time.
        let mut by_end = reads.clone();
        by_end.sort_by_key(|(r, _)| r.end);
        for (r2, v2) in &reads {
            let earlier = by_end.iter().take_while(|(r1, _)| r1.end < r2.start).map(|(_, v)| *v).max();
            if let Some(v1) = earlier.filter(|v1| v1 > v2) {
                violations.push(format!("block {b}: read at {:?}..{:?} returned version {v2} after an earlier read had seen {v1}", r2.start, r2.end));
            }
        }
    }
    violations
}

/// Reads block `b` and records what it saw.
async fn read_op(vol: &Volume, b: u64, t0: Instant) -> Op {
    let start = t0.elapsed();
    let outcome = match vol.read(offset_of(b), 4096).await {
        Ok(data) => match decode(b, &data) {
            Ok(v) => Outcome::Ok(v),
            Err(why) => Outcome::Garbage(why),
        },
        Err(e) => Outcome::Failed(e.to_string()),
    };
    Op { write: false, block: b, version: 0, start, end: t0.elapsed(), outcome }
}

/// The workload running in the background, recording its history.
struct Workload {
    history: Arc<History>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Operation times in the history count from here.
    t0: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    /// Starts the workload on `vol`.
    fn start(vol: &Volume) -> Self {
        let history = Arc::new(History::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t0 = Instant::now();
        let tasks = start_workload(vol, &history, t0, &stop);
        Self { history, stop, t0, tasks }
    }

    /// Stops the workload and returns its history plus a final read of every block.
    async fn finish(self, vol: &Volume) -> Vec<Op> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let mut ops = self.history.snapshot();
        for b in 0..BLOCKS {
            ops.push(read_op(vol, b, self.t0).await);
        }
        ops
    }
}

/// Runs the workload until `stop` is set: writers own blocks `w, w + WRITERS, ...`.
fn start_workload(vol: &Volume, history: &Arc<History>, t0: Instant, stop: &Arc<std::sync::atomic::AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (vol, history, stop) = (vol.clone(), history.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mine: Vec<u64> = (0..BLOCKS).filter(|b| b % WRITERS == w).collect();
            let mut next = vec![1u64; BLOCKS as usize];
            let mut rng = Rng::new(seed() ^ w);
            while !stop.load(Relaxed) {
                let b = mine[rng.below(mine.len() as u64) as usize];
                let version = next[b as usize];
                next[b as usize] += 1;
                let start = t0.elapsed();
                let result = vol.write(offset_of(b), encode(b, version), false).await;
                let outcome = match result {
                    Ok(()) => Outcome::Ok(version),
                    Err(e) => Outcome::Failed(e.to_string()),
                };
                history.push(Op { write: true, block: b, version, start, end: t0.elapsed(), outcome });
            }
        }));
    }
    for r in 0..READERS {
        let (vol, history, stop) = (vol.clone(), history.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed() ^ (100 + r));
            while !stop.load(Relaxed) {
                let b = rng.below(BLOCKS);
                history.push(read_op(&vol, b, t0).await);
            }
        }));
    }
    tasks
}

/// Time from a fault at `at` until I/O flowed again: the latest completion among the
/// operations in flight at `at` (or started within 50 ms after it).
fn stall_after(ops: &[Op], at: Duration) -> Duration {
    ops.iter().filter(|o| o.start <= at + Duration::from_millis(50) && o.end >= at).map(|o| o.end - at).max().unwrap_or_default()
}

fn signal(cluster: &TestCluster, id: u64, sig: i32) {
    let pid = cluster.node(id).pid().expect("node is running");
    // SAFETY: signalling a child process this test's harness started, by its pid.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// Runs a workload through `faults` and checks its history; returns (history, fault times).
async fn run_with_faults(cluster: &mut TestCluster, vol: &Volume, faults: &[Fault]) -> (Vec<Op>, Vec<(String, Duration)>) {
    let workload = Workload::start(vol);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut injected = Vec::new();
    for fault in faults {
        let (name, at) = fault.inject(cluster, workload.t0).await;
        injected.push((name, at));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Ends with the final state, read after every fault healed.
    (workload.finish(vol).await, injected)
}

/// One injected fault.
enum Fault {
    /// kill -9 the meta leader, restart it after this long.
    KillMetaLeader(Duration),
    /// kill -9 the leader of block 0's PG, restart it after this long.
    KillPgLeader(Duration),
    /// kill -9 a node that does not lead block 0's PG, restart it after this long.
    KillFollower(Duration),
    /// SIGSTOP a node for a while, then SIGCONT.
    Freeze(u64, Duration),
    /// SIGSTOP the leader of block 0's PG for longer than its lease plus an election, so it
    /// wakes up deposed but still believing it leads: it must not answer reads from its stale
    /// state (the checker would see a read older than an acknowledged write).
    FreezePgLeader(Duration),
}

impl Fault {
    async fn inject(&self, cluster: &mut TestCluster, t0: Instant) -> (String, Duration) {
        let (name, at) = match self {
            Fault::KillMetaLeader(down) | Fault::KillPgLeader(down) | Fault::KillFollower(down) => {
                let victim = match self {
                    Fault::KillMetaLeader(_) => cluster.status().await.unwrap().meta_leader,
                    Fault::KillPgLeader(_) => cluster.pg_replicas(VOLUME, offset_of(0)).await.unwrap().1,
                    _ => {
                        let leader = cluster.pg_replicas(VOLUME, offset_of(0)).await.unwrap().1;
                        (1..=3).find(|n| *n != leader).unwrap_or(1)
                    }
                };
                assert_ne!(victim, 0, "no victim found");
                let at = t0.elapsed();
                cluster.kill9(victim);
                tokio::time::sleep(*down).await;
                cluster.restart(victim).await.unwrap();
                (
                    format!(
                        "kill -9 node-{victim} ({})",
                        match self {
                            Fault::KillMetaLeader(_) => "meta leader",
                            Fault::KillPgLeader(_) => "PG leader",
                            _ => "follower",
                        }
                    ),
                    at,
                )
            }
            Fault::Freeze(_, how_long) | Fault::FreezePgLeader(how_long) => {
                let (id, role) = match self {
                    Fault::Freeze(id, _) => (*id, ""),
                    _ => (cluster.pg_replicas(VOLUME, offset_of(0)).await.unwrap().1, " (PG leader)"),
                };
                assert_ne!(id, 0, "no PG leader found");
                let at = t0.elapsed();
                signal(cluster, id, libc::SIGSTOP);
                tokio::time::sleep(*how_long).await;
                signal(cluster, id, libc::SIGCONT);
                (format!("SIGSTOP node-{id}{role} for {how_long:?}"), at)
            }
        };
        cluster.wait_healthy(3, Duration::from_secs(90)).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        (name, at)
    }
}

async fn cluster_with_volume() -> (TestCluster, Volume) {
    let cluster = TestCluster::start(simple_spec(3)).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: VOLUME.into(), size: VOLUME_SIZE, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume(VOLUME).await.unwrap();
    (cluster, vol)
}

fn report(ops: &[Op], injected: &[(String, Duration)]) -> String {
    let writes = ops.iter().filter(|o| o.write).count();
    let acked = ops.iter().filter(|o| o.write && matches!(o.outcome, Outcome::Ok(_))).count();
    let reads = ops.iter().filter(|o| !o.write).count();
    let mut s = format!("{writes} writes ({acked} acknowledged), {reads} reads\n");
    for (name, at) in injected {
        s += &format!("  {name} at {at:?}: I/O resumed after {:?}\n", stall_after(ops, *at));
        if std::env::var("BASALT_TEST_SLOWEST").is_ok() {
            let mut slow: Vec<&Op> = ops.iter().filter(|o| o.start <= *at + Duration::from_millis(50) && o.end >= *at).collect();
            slow.sort_by_key(|o| std::cmp::Reverse(o.end - o.start));
            for o in slow.iter().take(6) {
                s += &format!("      {} block {} {:?}..{:?}\n", if o.write { "write" } else { "read" }, o.block, o.start, o.end);
            }
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_kills_and_freezes_lose_no_acknowledged_write_and_fail_no_io() {
    let (mut cluster, vol) = cluster_with_volume().await;
    // Each killed node stays down longer than an election takes, so the survivors must carry on.
    let down = Duration::from_secs(10);
    // A leader's lease is the election timeout's maximum (3 s) and an election takes up to
    // another 3 s, so a leader frozen for 8 s wakes up deposed.
    let faults = [
        Fault::KillFollower(down),
        Fault::KillPgLeader(down),
        Fault::KillMetaLeader(down),
        Fault::Freeze(2, Duration::from_secs(4)),
        Fault::FreezePgLeader(Duration::from_secs(8)),
    ];
    let (ops, injected) = run_with_faults(&mut cluster, &vol, &faults).await;
    let summary = report(&ops, &injected);
    println!("{summary}");
    assert_history_clean(&ops, &summary, "one node at a time failed", &cluster);
    // Every block's final read saw its newest acknowledged version (checked above) and the
    // workload wrote to every block.
    let unwritten = (0..BLOCKS).filter(|b| !ops.iter().any(|o| o.write && o.block == *b && matches!(o.outcome, Outcome::Ok(_)))).count();
    assert_eq!(unwritten, 0, "some blocks never got a write: {summary}");
}

/// A rolling upgrade under the history workload: each node in turn is stopped with SIGTERM
/// (handing its leaderships over first) and started again as a "newer build" that speaks
/// cluster versions 1..=2 (the test override of this build's range). The cluster stays at
/// version 1 while any node speaks only 1 and moves to 2 when the last one is upgraded; no
/// I/O fails and the history is clean. Afterwards the old build (1 only) and a build that no
/// longer speaks 2 are both refused by name and stop, and the upgraded build rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_restarts_every_node_under_load_with_no_io_error() {
    use basalt_common::version::TEST_OVERRIDE_ENV;
    let (mut cluster, vol) = cluster_with_volume().await;
    let s = cluster.status().await.unwrap();
    assert_eq!(s.cluster_version, 1);
    assert!(s.nodes.iter().all(|n| (n.version_min, n.version_max) == (1, 1)), "{:?}", s.nodes);
    let workload = Workload::start(&vol);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Node 3's Raft series start counting from this scrape.
    cluster.metrics(3).await.unwrap();
    let mut restarts = Vec::new();
    for id in 1..=3u64 {
        if id == 3 {
            // Nodes 1 and 2 handed their leaderships over and got some back: node 3 saw it.
            let m = cluster.metrics(3).await.unwrap();
            let value = |prefix: &str| m.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0);
            assert!(value("basalt_raft_leader_changes_total{node=\"3\",group=\"pg\"} ") >= 2.0, "{m}");
            assert!(value("basalt_raft_elections_total{node=\"3\",group=\"pg\"} ") >= 1.0, "{m}");
            assert!(value("basalt_raft_commit_duration_seconds_count{node=\"3\",group=\"pg\"} ") >= 1.0, "{m}");
        }
        let at = workload.t0.elapsed();
        let exit = cluster.stop(id).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(exit.success(), "node-{id} stopped with {exit} on SIGTERM:\n{}", cluster.node(id).log_tail());
        cluster.nodes.get_mut(&id).unwrap().env.insert(TEST_OVERRIDE_ENV.into(), "1-2".into());
        cluster.restart(id).await.unwrap_or_else(|e| panic!("{e}"));
        cluster.wait_healthy(3, Duration::from_secs(90)).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
        let s = cluster
            .wait_status(&format!("node-{id} registered as 1..=2"), Duration::from_secs(20), |s| {
                s.nodes.iter().any(|n| n.id == id && (n.version_min, n.version_max) == (1, 2))
            })
            .await
            .unwrap();
        if id < 3 {
            assert_eq!(s.cluster_version, 1, "raised while node-3 still speaks 1 only");
            let (code, out, _) = cluster.cli(&["status"]).await.unwrap();
            assert_eq!(code, Some(0), "an upgrade half done is healthy:\n{out}");
            assert!(out.contains("stays at version 1 until"), "{out}");
        }
        restarts.push((format!("SIGTERM node-{id}, start it as a 1..=2 build"), at));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    cluster.wait_status("cluster version 2", Duration::from_secs(20), |s| s.cluster_version == 2).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ops = workload.finish(&vol).await;
    let summary = report(&ops, &restarts);
    println!("{summary}");
    assert_history_clean(&ops, &summary, "nodes restarted one at a time", &cluster);
    let metrics = cluster.metrics(1).await.unwrap();
    assert!(metrics.contains("cluster_version_max=\"2\""), "basalt_build_info shows the upgraded build");

    // Going back is refused: the old build and one that dropped version 2 stop, naming both
    // sides' versions, before they serve anything.
    cluster.stop(3).await.unwrap();
    for (range, expect) in [
        ("1-1", "node-3 speaks cluster versions 1..=1, but the cluster runs at version 2"),
        ("3-4", "node-3 speaks cluster versions 3..=4, but the cluster still runs at version 2"),
    ] {
        cluster.nodes.get_mut(&3).unwrap().env.insert(TEST_OVERRIDE_ENV.into(), range.into());
        let (exit, log) = cluster.start_expecting_exit(3, Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(exit.code() == Some(3) && log.contains(expect), "a {range} build exits 3, saying why: {exit}\n{log}");
    }
    cluster.nodes.get_mut(&3).unwrap().env.insert(TEST_OVERRIDE_ENV.into(), "1-2".into());
    cluster.restart(3).await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(90)).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert_eq!(cluster.status().await.unwrap().cluster_version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_fault_repeated_leader_kills_stall_statistics() {
    let (mut cluster, vol) = cluster_with_volume().await;
    let down = Duration::from_secs(10);
    // BASALT_STALL_KILLS PG-leader kills (default 4), each followed by a follower kill.
    let kills: usize = std::env::var("BASALT_STALL_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(4).max(1);
    let faults: Vec<Fault> = (0..2 * kills).map(|i| if i % 2 == 0 { Fault::KillPgLeader(down) } else { Fault::KillFollower(down) }).collect();
    let (ops, injected) = run_with_faults(&mut cluster, &vol, &faults).await;
    let summary = report(&ops, &injected);
    let violations = check(&ops);
    assert!(violations.is_empty(), "history violations:\n{}\n{summary}", violations.join("\n"));
    let mut stalls: Vec<Duration> = injected.iter().filter(|(n, _)| n.contains("PG leader")).map(|(_, at)| stall_after(&ops, *at)).collect();
    stalls.sort();
    let pct = |p: usize| stalls[(stalls.len() * p / 100).min(stalls.len() - 1)];
    println!(
        "{summary}PG-leader kill → I/O resumed: p50 {:?}, p90 {:?}, p99 {:?}, max {:?} over {} kills",
        pct(50),
        pct(90),
        pct(99),
        stalls[stalls.len() - 1],
        stalls.len()
    );
}

/// A PG leader frozen past its lease wakes up deposed but still thinking it leads. Asked
/// directly (no client routing to steer the read away), it must refuse or answer with the write
/// the new leader acknowledged meanwhile, never with its own stale copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_serves_no_stale_read() {
    use basalt_proto::data::ReadRequest;
    let (cluster, vol) = cluster_with_volume().await;
    vol.write(offset_of(0), encode(0, 1), false).await.unwrap();
    let (pg, old_leader, _) = cluster.pg_replicas(VOLUME, offset_of(0)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let map = client.map();
    let volume_id = map.volume_by_name(VOLUME).unwrap().id.0;
    let mut data = cluster.data_client(&cluster.node(old_leader).addr).unwrap();
    let read = ReadRequest { pg: pg.0, volume_id, offset: offset_of(0), length: 4096, map_version: map.version, snapshot_epoch: 0 };
    // The fast path serves this read from the old leader's lease while it is healthy.
    let r = data.read(read).await.unwrap().into_inner();
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(decode(0, &r.data), Ok(1));

    signal(&cluster, old_leader, libc::SIGSTOP);
    // Acknowledged only once the other two elected a new leader (lease 3 s + election).
    let wrote = tokio::time::timeout(Duration::from_secs(60), vol.write(offset_of(0), encode(0, 2), false)).await;
    signal(&cluster, old_leader, libc::SIGCONT);
    wrote.expect("write during the freeze timed out").expect("write during the freeze failed");

    // Straight after waking, and for a while after, the old leader must not serve version 1.
    let mut answers = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(10), data.read(read)).await {
            Ok(Ok(r)) => match r.into_inner() {
                r if r.error.is_none() => answers.push(decode(0, &r.data).map(|v| format!("version {v}")).unwrap_or_else(|e| e)),
                r => answers.push(format!("refused: {}", r.error.map(|e| e.message).unwrap_or_default())),
            },
            Ok(Err(status)) => answers.push(format!("rpc error: {status}")),
            Err(_) => answers.push("timed out".into()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!answers.is_empty());
    assert!(!answers.iter().any(|a| a == "version 1"), "the deposed leader served a stale read: {answers:?}");
    assert!(answers.iter().all(|a| a == "version 2" || a.starts_with("refused")), "unexpected answers: {answers:?}");
}

/// Three storage+meta nodes in zones z1..z3 and storage-only node 4 in zone z4, 8 PGs placed
/// over all four (each node holds 6 of the 24 replicas), volume `hist` open.
async fn four_node_cluster(extra_config: &str) -> (TestCluster, Volume) {
    let mut specs = simple_spec(3);
    specs.push(NodeSpec { id: 4, labels: "zone=z4,host=h4".into(), roles: vec!["storage"] });
    let cluster = TestCluster::start_with(specs, extra_config).await.unwrap();
    // Before `cluster init` nodes heartbeat every meta node once a second: let node 4 be known.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    // Node 4 holds its share either from init or, had init missed it, through rebalancing.
    cluster
        .wait_status("node-4 holds its share", Duration::from_secs(120), |s| replicas_on(s, 4) == 6 && moves(s) == 0)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: VOLUME.into(), size: VOLUME_SIZE, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();
    let vol = cluster.client().await.unwrap().open_volume(VOLUME).await.unwrap();
    (cluster, vol)
}

/// PG replicas the map places on `node`.
fn replicas_on(s: &ClusterStatusReply, node: u64) -> usize {
    s.pgs.iter().filter(|p| p.replicas.contains(&node)).count()
}

/// Replica moves in progress.
fn moves(s: &ClusterStatusReply) -> usize {
    s.pgs.iter().filter(|p| p.moving_to != 0).count()
}

/// Every PG has a leader and three live replicas, none of them on `gone`, and nothing moves.
fn healed_without(s: &ClusterStatusReply, gone: u64) -> bool {
    moves(s) == 0 && s.pgs.iter().all(|p| p.leader != 0 && p.live_replicas.len() == 3 && p.replicas.len() == 3 && !p.replicas.contains(&gone))
}

/// Bytes [`fill`] writes into each gap between two workload blocks.
const FILL_PER_GAP: u64 = 192 << 10;

/// Where [`fill`] writes in the gap after workload block `b`.
fn fill_offset(b: u64) -> u64 {
    offset_of(b) + (64 << 10)
}

/// Fills part of every gap between the workload's blocks with a recognisable pattern (so
/// rebuilds move real data, ~9 MiB over every PG); returns what each gap got.
async fn fill(vol: &Volume) -> Vec<Bytes> {
    let mut written = Vec::new();
    for b in 0..BLOCKS {
        let mut data = vec![0u8; FILL_PER_GAP as usize];
        for (i, block) in data.chunks_mut(4096).enumerate() {
            block[..8].copy_from_slice(b"BSLTFILL");
            block[8..16].copy_from_slice(&(b * 1000 + i as u64).to_le_bytes());
            block[16..].fill(((b + i as u64) % 251) as u8);
        }
        let data = Bytes::from(data);
        vol.write(fill_offset(b), data.clone(), false).await.unwrap();
        written.push(data);
    }
    written
}

/// Reads the filled ranges back and compares them with what [`fill`] wrote.
async fn assert_fill_intact(vol: &Volume, filled: &[Bytes], when: &str) {
    for (b, want) in filled.iter().enumerate() {
        let got = vol.read(fill_offset(b as u64), FILL_PER_GAP).await.unwrap();
        assert!(got[..] == want[..], "{when}: the filled range after block {b} reads back different");
    }
}

/// Every operation that failed, described.
fn failures(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .filter_map(|o| match &o.outcome {
            Outcome::Failed(e) => Some(format!("{} of block {} at {:?}: {e}", if o.write { "write" } else { "read" }, o.block, o.start)),
            _ => None,
        })
        .collect()
}

/// Fails unless the history of a long fault run is consistent, no I/O failed `while` the
/// faults happened, and the workload ran (over 100 writes); messages carry `summary`.
fn assert_history_clean(ops: &[Op], summary: &str, while_: &str, cluster: &TestCluster) {
    let violations = check(ops);
    assert!(violations.is_empty(), "history violations:\n{}\n{summary}\n{}", violations.join("\n"), cluster.logs());
    let failed = failures(ops);
    assert!(failed.is_empty(), "I/O errors seen by the client while {while_}:\n{}\n{summary}", failed.join("\n"));
    assert!(ops.iter().filter(|o| o.write).count() > 100, "the workload barely ran: {summary}");
}

/// Fails unless every operation of the history is consistent and none failed.
fn assert_clean(ops: &[Op], what: &str, cluster: &TestCluster) {
    let violations = check(ops);
    assert!(violations.is_empty(), "{what}: history violations:\n{}\n{}", violations.join("\n"), cluster.logs());
    let failed = failures(ops);
    assert!(failed.is_empty(), "{what}: I/O errors seen by the client:\n{}", failed.join("\n"));
    assert!(ops.iter().filter(|o| o.write).count() > 50, "{what}: the workload barely ran");
}

/// Self-healing: a node killed for good has its replicas rebuilt on the others (failure
/// domains kept) while the workload runs without an error; when it comes back after all, it
/// retires its stale copies and their bytes are overwritten, and it can be removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_dead_nodes_replicas_are_rebuilt_elsewhere_and_its_return_is_retired() {
    let (mut cluster, vol) = four_node_cluster("[heal]\nreplace_down_after_secs = 3\n").await;
    let filled = fill(&vol).await;
    let workload = Workload::start(&vol);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let killed_at = Instant::now();
    cluster.kill9(4);
    let first_move = cluster.wait_status("a move starts", Duration::from_secs(60), |s| moves(s) > 0).await;
    let first_move = first_move.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let started = killed_at.elapsed();
    assert!(first_move.pgs.iter().filter(|p| p.moving_to != 0).all(|p| p.moving_from == 4 && p.move_reason == "node-down"), "{first_move:?}");
    let healed = cluster
        .wait_status("replicas rebuilt without node-4", Duration::from_secs(120), |s| healed_without(s, 4))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let rebuilt_in = killed_at.elapsed() - started;
    for p in &healed.pgs {
        let mut r = p.replicas.clone();
        r.sort_unstable();
        assert_eq!(r, vec![1, 2, 3], "pg-{}: with node-4 gone, zones z1..z3 hold every PG", p.id);
    }
    let ops = workload.finish(&vol).await;
    println!("node-4 killed: first move after {started:?}, all 6 replicas rebuilt {rebuilt_in:?} later; {} ops during the rebuild", ops.len());
    assert_clean(&ops, "while node-4's replicas were rebuilt", &cluster);
    assert_fill_intact(&vol, &filled, "after the rebuild").await;

    // It comes back after all: drained first, so the rebalancer leaves it empty, it retires
    // the copies it still has, and the scrubber overwrites them.
    let mut admin = cluster.admin().await.unwrap();
    admin.node_drain(NodeDrainRequest { id: 4, undo: false }).await.unwrap();
    let marker_before = find_marker(&cluster.node(4).data_dir, MAGIC).len() + find_marker(&cluster.node(4).data_dir, b"BSLTFILL").len();
    assert!(marker_before > 0, "node-4's files held no workload data before it returned: the check below would prove nothing");
    cluster.restart(4).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let leftovers = loop {
        let mut found = find_marker(&cluster.node(4).data_dir, MAGIC);
        found.extend(find_marker(&cluster.node(4).data_dir, b"BSLTFILL"));
        if found.is_empty() || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(leftovers.is_empty(), "node-4 still holds moved-away data in {leftovers:?}\n{}", cluster.node(4).log_tail());
    let log = std::fs::read_to_string(&cluster.node(4).log).unwrap_or_default();
    assert!(log.contains("retired this node's replica"), "node-4 never logged retiring a replica:\n{}", cluster.node(4).log_tail());
    admin.node_remove(NodeRemoveRequest { id: 4 }).await.unwrap();
    let s = cluster.status().await.unwrap();
    assert!(!s.nodes.iter().any(|n| n.id == 4), "a removed node is gone from the map");
    let err = admin.node_remove(NodeRemoveRequest { id: 4 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
}

/// A move's target dies while it is still being filled: node 5 joins, the rebalancer starts
/// moving a replica onto it (snapshots paced slowly, so the fill takes a while), and node 5 is
/// killed mid-snapshot. Once it counts as dead the move is abandoned, not left hanging, and
/// the PG keeps its three old replicas; the workload sees no error. Node 5 comes back, throws
/// away the half-filled replica and receives replicas afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_moves_target_dies_mid_fill_and_the_move_is_abandoned() {
    let (mut cluster, vol) = four_node_cluster("[heal]\nreplace_down_after_secs = 4\nrebuild_rate = \"256KiB\"\n").await;
    let filled = fill(&vol).await;
    let workload = Workload::start(&vol);
    cluster.add_node(NodeSpec { id: 5, labels: "zone=z5,host=h5".into(), roles: vec!["storage"] }).await.unwrap();
    let filling = cluster
        .wait_status("a replica is being filled on node-5", Duration::from_secs(90), |s| {
            s.pgs.iter().any(|p| p.moving_to == 5 && p.move_phase == "snapshot")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let pg = filling.pgs.iter().find(|p| p.moving_to == 5).unwrap().clone();
    cluster.kill9(5);
    let killed_at = Instant::now();

    let after = cluster
        .wait_status("the move to the dead node-5 is abandoned", Duration::from_secs(60), |s| s.pgs.iter().any(|p| p.id == pg.id && p.moving_to != 5))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let abandoned_in = killed_at.elapsed();
    let p = after.pgs.iter().find(|p| p.id == pg.id).unwrap();
    let (mut before, mut now) = (pg.replicas.clone(), p.replicas.clone());
    before.sort_unstable();
    now.sort_unstable();
    assert_eq!(before, now, "pg-{} changed replicas although its move was abandoned", pg.id);
    assert!(p.leader != 0 && p.live_replicas.len() == 3, "pg-{} is not whole after the abandoned move: {p:?}", pg.id);
    // The replicas node 5 had already received are rebuilt elsewhere (it is down for good).
    cluster
        .wait_status("node-5's replicas are re-placed", Duration::from_secs(120), |s| replicas_on(s, 5) == 0 && moves(s) == 0)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));

    // Back again: the half-filled copy goes, and the rebalancer moves replicas onto it again.
    cluster.restart(5).await.unwrap();
    cluster
        .wait_status("node-5 took a replica after returning", Duration::from_secs(180), |s| replicas_on(s, 5) >= 1 && moves(s) == 0)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let ops = workload.finish(&vol).await;
    let abandoned = (1..=3).any(|id| std::fs::read_to_string(&cluster.node(id).log).unwrap_or_default().contains("outcome=Cancelled"));
    assert!(abandoned, "no meta node logged an abandoned move\n{}", cluster.logs());
    println!("move of pg-{} to node-5 abandoned {abandoned_in:?} after the kill; {} ops", pg.id, ops.len());
    assert_clean(&ops, "while a move's target died and returned", &cluster);
    assert_fill_intact(&vol, &filled, "after the abandoned move").await;
}

/// A lost meta node is replaced: node 4 (storage and meta role) joins after `cluster init` as a
/// spare. Meta node 3 is killed for good; past the down timeout node 4 takes its vote in the
/// meta group (and its replicas). Then node 1 is killed too: meta nodes 2 and 4 are still a
/// majority, so the cluster still creates volumes, and the data still reads and writes.
/// Without the replacement, two of the three original meta nodes would be gone. Admin requests
/// keep working through a storage-only node 5 whose configured seeds were nodes 1-3 (the first
/// two now dead), and through node 3 when it comes back no longer a member of the meta group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_lost_meta_node_is_replaced_so_a_second_loss_is_survived() {
    let mut cluster = TestCluster::start_with(simple_spec(3), "[heal]\nreplace_down_after_secs = 3\n").await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: VOLUME.into(), size: VOLUME_SIZE, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();
    // Added first, so its seeds are nodes 1-3 only.
    cluster.add_node(NodeSpec { id: 5, labels: "zone=z5,host=h5".into(), roles: vec!["storage"] }).await.unwrap();
    cluster.add_node(NodeSpec { id: 4, labels: "zone=z4,host=h4".into(), roles: vec!["storage", "meta"] }).await.unwrap();
    cluster
        .wait_status("nodes 4 and 5 registered", Duration::from_secs(30), |s| {
            [4, 5].iter().all(|id| s.nodes.iter().any(|n| n.id == *id && n.state == "up"))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let before = cluster.status().await.unwrap();
    let mut members = before.meta_members.clone();
    members.sort_unstable();
    assert_eq!(members, vec![1, 2, 3], "a spare meta node must not join the meta group while its members are well");

    let vol = cluster.client().await.unwrap().open_volume(VOLUME).await.unwrap();
    let filled = fill(&vol).await;
    let workload = Workload::start(&vol);
    cluster.kill9(3);
    let killed_at = Instant::now();
    cluster
        .wait_status("node-4 took node-3's place in the meta group and its replicas", Duration::from_secs(120), |s| {
            let mut m = s.meta_members.clone();
            m.sort_unstable();
            m == [1, 2, 4] && healed_without(s, 3)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let replaced_in = killed_at.elapsed();

    cluster.kill9(1);
    let through_node5 = create_volume_through(&cluster, 5, "after").await;
    let ops = workload.finish(&vol).await;

    // Node 3 returns, no longer a member of the meta group: it hears from no meta leader, so it
    // passes admin requests on to another meta node.
    cluster.restart(3).await.unwrap();
    let through_node3 = create_volume_through(&cluster, 3, "returned").await;
    println!("volume created through storage-only node 5 {through_node5:?} after node 1's kill, through returned node 3 in {through_node3:?}");
    println!("node-3's meta vote and replicas moved to node-4 {replaced_in:?} after the kill; {} ops", ops.len());
    assert_clean(&ops, "while meta nodes were lost and replaced", &cluster);
    assert_fill_intact(&vol, &filled, "after nodes 1 and 3 were lost").await;
}

/// Creates volume `name` through node `via`'s admin service, retrying for up to 60 s (meta
/// elections, forwarding); returns how long it took.
async fn create_volume_through(cluster: &TestCluster, via: u64, name: &str) -> Duration {
    let started = Instant::now();
    let mut admin = cluster.admin_at(&cluster.node(via).addr).unwrap();
    loop {
        match admin
            .volume_create(VolumeCreateRequest { name: name.into(), size: 1 << 20, wrapped_key: Default::default(), unencrypted: false, qos: None })
            .await
        {
            Ok(_) => return started.elapsed(),
            Err(e) if e.code() == tonic::Code::AlreadyExists => return started.elapsed(),
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(60), "volume {name} cannot be created through node {via}: {e}\n{}", cluster.logs())
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Membership: draining a node under load moves every replica off it without an I/O error or
/// a lost write, removal is refused until it is empty, and a new node takes its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_then_remove_and_a_new_node_takes_its_share() {
    let (mut cluster, vol) = four_node_cluster("").await;
    let filled = fill(&vol).await;
    let workload = Workload::start(&vol);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut admin = cluster.admin().await.unwrap();
    let err = admin.node_remove(NodeRemoveRequest { id: 4 }).await.unwrap_err();
    assert!(err.message().contains("holds 6 replica"), "{err}");
    let led_by_4 = cluster.status().await.unwrap().pgs.iter().filter(|p| p.leader == 4).count();
    let drain_started = Instant::now();
    let r = admin.node_drain(NodeDrainRequest { id: 4, undo: false }).await.unwrap().into_inner();
    assert_eq!(r.replicas_left, 6);
    let mut saw_progress = false;
    let drained = cluster
        .wait_status("node-4 drained", Duration::from_secs(180), |s| {
            if s.pgs.iter().any(|p| p.moving_from == 4 && p.move_reason == "drain") {
                // Progress is visible while it runs.
                saw_progress = true;
            }
            replicas_on(s, 4) == 0 && moves(s) == 0
        })
        .await;
    let drained = drained.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let drain_took = drain_started.elapsed();
    assert!(saw_progress, "no drain move was ever visible in cluster status");
    assert!(drained.pgs.iter().all(|p| p.replicas.len() == 3 && !p.replicas.contains(&4)));
    let node4 = drained.nodes.iter().find(|n| n.id == 4).unwrap();
    assert!(node4.draining && node4.replicas == 0, "{node4:?}");
    // A leaving leader hands its leadership over before the change that removes it, so the
    // group does not wait out an election timeout.
    let log4 = std::fs::read_to_string(&cluster.node(4).log).unwrap_or_default();
    let handed_over = log4.matches("handing leadership over before leaving the group").count();
    assert!(led_by_4 == 0 || handed_over > 0, "node-4 led {led_by_4} PGs but never handed leadership over\n{}", cluster.logs());
    admin.node_remove(NodeRemoveRequest { id: 4 }).await.unwrap();

    // A new node joins (node 5, zone z5): the rebalancer gives it a fair share, one PG at a time.
    let add_started = Instant::now();
    cluster.add_node(NodeSpec { id: 5, labels: "zone=z5,host=h5".into(), roles: vec!["storage"] }).await.unwrap();
    cluster
        .wait_status("node-5 took its share", Duration::from_secs(180), |s| replicas_on(s, 5) == 6 && moves(s) == 0)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let add_took = add_started.elapsed();
    let ops = workload.finish(&vol).await;
    let slowest = ops.iter().map(|o| o.end - o.start).max().unwrap_or_default();
    println!(
        "drain of node-4 (6 replicas of a volume holding ~9 MiB, {led_by_4} led, {handed_over} hand-over requests): {drain_took:?}; node-5 took 6 replicas in {add_took:?}; {} ops, slowest {slowest:?}",
        ops.len()
    );
    assert_clean(&ops, "during drain, remove and add", &cluster);
    assert_fill_intact(&vol, &filled, "after the drain and the rebalance").await;
}

/// The user isolated nodes run as (see `Isolation`).
const ISOLATED_UID: u32 = 65534;

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("node address with a port")
}

/// A partition: node 3 (leading some PGs, maybe the meta group) is cut off from every other
/// node and from the client for 12 s while the workload runs, then reconnected. The majority
/// side elects new leaders and carries on; the cut-off node serves nothing stale meanwhile and
/// catches up afterwards; the checker finds no lost write, no stale read and no I/O error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_partitioned_node_loses_its_leaderships_and_rejoins() {
    let mut cluster = TestCluster::start(simple_spec(3)).await.unwrap();
    cluster.run_as(3, ISOLATED_UID).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: VOLUME.into(), size: VOLUME_SIZE, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();
    let vol = cluster.client().await.unwrap().open_volume(VOLUME).await.unwrap();
    let led = cluster.wait_status("node-3 leads a PG", Duration::from_secs(30), |s| s.pgs.iter().any(|p| p.leader == 3)).await.unwrap();
    let led_before = led.pgs.iter().filter(|p| p.leader == 3).count();

    let workload = Workload::start(&vol);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cut_at = workload.t0.elapsed();
    let cut = basalt_tests::Isolation::start(port_of(&cluster.node(3).addr), ISOLATED_UID).unwrap();
    let others = cluster
        .wait_status("the majority side leads every PG", Duration::from_secs(30), |s| s.pgs.iter().all(|p| p.leader != 0 && p.leader != 3))
        .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    drop(cut);
    others.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    cluster.wait_healthy(3, Duration::from_secs(90)).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    // The meta leader hands leaderships back until every node leads 2 or 3 of the 8 PGs.
    let rebalanced_from = Instant::now();
    let leads = |s: &ClusterStatusReply, n: u64| s.pgs.iter().filter(|p| p.leader == n).count();
    cluster
        .wait_status("leaderships evened out again", Duration::from_secs(90), |s| (1..=3).all(|n| (2..=3).contains(&leads(s, n))))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let rebalanced_in = rebalanced_from.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ops = workload.finish(&vol).await;
    println!(
        "node-3 (led {led_before} PGs) cut off at {cut_at:?} for ~10 s: I/O resumed after {:?}; leaderships even again {rebalanced_in:?} after healthy; {} ops",
        stall_after(&ops, cut_at),
        ops.len()
    );
    assert_clean(&ops, "across a partition", &cluster);
}

/// Fencing after a partition: an attachment on the cut-off side cannot write once the volume
/// has been attached elsewhere, not even after the partition heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_attachment_across_a_partition_is_fenced() {
    use std::process::{Command, Stdio};
    let mut cluster = TestCluster::start(simple_spec(3)).await.unwrap();
    cluster.run_as(3, ISOLATED_UID).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: "fence".into(), size: 16 << 20, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();
    // Attachment A runs as the isolated user, talking to node 3 only (its side of the cut).
    let listen_a = format!("127.0.0.1:{}", basalt_tests::free_port());
    let mut a = cluster.basalt_command(cluster.shared_bin("basalt").unwrap());
    std::os::unix::process::CommandExt::uid(&mut a, ISOLATED_UID);
    let mut a = a
        .args(["--cluster", &cluster.node(3).addr, "attach", "fence", "--nbd-listen", &listen_a])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let uri_a = format!("nbd://{listen_a}/fence");
    let qemu_io = |uri: &str, cmd: &str| {
        let out = Command::new("qemu-io").args(["-f", "raw", "-c", cmd, uri]).output().expect("qemu-io");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success() && !text.contains("failed"), text)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = qemu_io(&uri_a, "write -P 0x11 0 1M");
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "attachment A never served: {out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cut = basalt_tests::Isolation::start(port_of(&cluster.node(3).addr), ISOLATED_UID).unwrap();
    // On the majority side: take the volume over and write.
    let listen_b = format!("127.0.0.1:{}", basalt_tests::free_port());
    let mut b = cluster
        .basalt_cmd()
        .args(["--cluster", &cluster.node(1).addr, "attach", "fence", "--force", "--nbd-listen", &listen_b])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let uri_b = format!("nbd://{listen_b}/fence");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out) = qemu_io(&uri_b, "write -P 0x22 0 1M");
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "attachment B never served during the partition: {out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(cut);
    cluster.wait_healthy(3, Duration::from_secs(90)).await.unwrap();
    // A is on the healed network now, with the old epoch: every write must be refused.
    let (ok, out) = qemu_io(&uri_a, "write -P 0x33 0 1M");
    let (ok_b, read_b) = qemu_io(&uri_b, "read -P 0x22 0 1M");
    let _ = a.kill();
    let _ = a.wait();
    let _ = b.kill();
    let _ = b.wait();
    assert!(!ok, "the stale attachment wrote after the takeover: {out}");
    assert!(ok_b, "the new attachment's data was overwritten: {read_b}");
}

/// Flips one bit of a 4 KiB block equal to `block` in node `id`'s data file (behind the node's
/// back); false if the block is not there exactly once.
fn rot(cluster: &TestCluster, id: u64, block: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let path = cluster.node(id).data_dir.join("chunks.dat");
    let at = find_block(&path, block).unwrap_or_default();
    if at.len() != 1 {
        return false;
    }
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at[0] + 100).unwrap();
    byte[0] ^= 0x10;
    f.write_all_at(&byte, at[0] + 100).unwrap();
    f.sync_all().unwrap();
    true
}

/// Bit rot under load: bits flip in four blocks of each replica's data file while the workload
/// runs. No read ever returns a rotten block (reads are checked block by block and served
/// around it), the workload's history stays clean, and every rotten copy is repaired (on the
/// read path or by a scrub pass), none left unrepairable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_bit_flips_under_load_are_never_served_and_get_repaired() {
    let (cluster, vol) = cluster_with_volume().await;
    let filled = fill(&vol).await;
    let workload = Workload::start(&vol);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut rotted = 0;
    for id in 1..=3u64 {
        for k in 0..4u64 {
            // A different filled block on each node: gap `8 * id + k`, its block 3.
            let gap = (8 * id + k) as usize;
            if rot(&cluster, id, &filled[gap][3 * 4096..4 * 4096]) {
                rotted += 1;
            }
        }
    }
    assert_eq!(rotted, 12, "every chosen block sits once in each data file");
    assert_fill_intact(&vol, &filled, "right after the bit flips").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ops = workload.finish(&vol).await;
    assert_clean(&ops, "with rotten blocks on every replica", &cluster);
    // A local pass on every node finds the copies no read touched (followers') and repairs them.
    let (code, _, err) = cluster.cli(&["--json", "scrub", "start"]).await.unwrap();
    assert_eq!(code, Some(0), "scrub start: {err}");
    let mut found = 0;
    for id in 1..=3 {
        let st = cluster.scrub_status(id).await.unwrap();
        assert_eq!(st.unrepairable, 0, "node-{id}: {st:?}");
        found += st.corrupt_found;
    }
    assert!(found >= 12, "only {found} of 12 rotten copies were found");
    assert_fill_intact(&vol, &filled, "after the scrub").await;
    for id in 1..=3u64 {
        for k in 0..4u64 {
            let gap = (8 * id + k) as usize;
            let path = cluster.node(id).data_dir.join("chunks.dat");
            let at = find_block(&path, &filled[gap][3 * 4096..4 * 4096]).unwrap();
            assert_eq!(at.len(), 1, "node-{id}'s copy of gap {gap} was not repaired in place");
        }
    }
}

/// Node 3 has 64 MiB of chunk space, nodes 1 and 2 have 4 GiB, and every node holds a replica
/// of every PG. Once node 3 is short of room, writes that need new chunks are refused with
/// NoSpace by every leader, not acknowledged by leaders with room and then missing on node 3;
/// every acknowledged write reads back with node 3 leading its PG, and no apply waits for space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_full_replica_refuses_writes_instead_of_diverging() {
    let cluster = TestCluster::start_with_node_config(simple_spec(3), "", &[(3, "capacity = \"64MiB\"\n")]).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: "small".into(), size: 256 << 20, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();
    let vol = Arc::new(cluster.client().await.unwrap().open_volume("small").await.unwrap());
    let chunk = |i: u64| {
        let mut data = vec![(i % 251) as u8; 1 << 20];
        data[..8].copy_from_slice(&i.to_le_bytes());
        Bytes::from(data)
    };

    // 1 MiB writes into fresh chunks, four at a time, until well past node 3's capacity.
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    for batch in (0..128u64).collect::<Vec<_>>().chunks(4) {
        let writes: Vec<_> = batch
            .iter()
            .map(|&i| {
                let vol = vol.clone();
                let data = chunk(i);
                tokio::spawn(async move { (i, vol.write(i << 20, data, false).await) })
            })
            .collect();
        for w in writes {
            match w.await.unwrap() {
                (i, Ok(())) => acked.push(i),
                (i, Err(e)) => {
                    assert!(matches!(e, basalt_volume_client::ClientError::NoSpace(_)), "write of chunk {i} failed otherwise: {e}");
                    refused.push((i, e.to_string()));
                }
            }
        }
    }
    println!("acknowledged {} MiB, refused {} MiB; first refusal: {:?}", acked.len(), refused.len(), refused.first());
    assert!(acked.len() >= 40, "only {} MiB acknowledged before writes were refused", acked.len());
    assert!(
        refused.len() >= 64,
        "writes beyond node 3's 64 MiB were acknowledged: {} MiB acked\n{}",
        acked.len(),
        cluster.metrics(3).await.unwrap().lines().filter(|l| l.contains("space") || l.contains("bytes")).collect::<Vec<_>>().join("\n")
    );
    assert!(refused.iter().any(|(_, e)| e.contains("node-3")), "refusals do not name the full replica: {:?}", refused.first());

    // Every PG led by node 3 in turn: what was acknowledged is there too.
    let layout = cluster.client().await.unwrap().map().layout.unwrap();
    let id = vol.id();
    let status = cluster.status().await.unwrap();
    for pg in &status.pgs {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = cluster.status().await.unwrap();
            let p = s.pgs.iter().find(|p| p.id == pg.id).unwrap();
            if p.leader == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "pg-{} never moved its leadership to node 3", pg.id);
            if p.leader != 0 {
                // As the meta leader would (node 1 is a meta node): only meta nodes order this.
                let mut data = cluster.data_client_as_node(&cluster.node(p.leader).addr, 1).unwrap();
                let _ = data.transfer_leader(basalt_proto::data::TransferLeaderRequest { pg: pg.id, to: 3 }).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        for &i in &acked {
            if layout.pg_of(id, basalt_common::ExtentIndex((i << 20) / layout.extent_size)).0 != pg.id {
                continue;
            }
            let got = tokio::time::timeout(Duration::from_secs(20), vol.read(i << 20, 1 << 20)).await.expect("read hung").unwrap();
            assert!(got == chunk(i), "acknowledged chunk {i} of pg-{} reads back different with node 3 leading", pg.id);
        }
    }
    let metrics = cluster.metrics(3).await.unwrap();
    assert!(metrics.contains("basalt_pg_applies_waiting_for_space{node=\"3\"} 0"), "an apply on node 3 waits for space:\n{metrics}");
}

/// A tmpfs of a given size mounted for one test, unmounted when dropped (tests run as root).
struct Tmpfs {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("basalt-tmpfs-").tempdir_in(basalt_tests::test_root()).unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let status = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&path).status();
        assert!(status.is_ok_and(|s| s.success()), "mounting a {size} tmpfs at {} (needs root)", path.display());
        Tmpfs { path, _dir: dir }
    }

    /// Bytes still available.
    fn available(&self) -> u64 {
        let path = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: a NUL-terminated path; `st` is read only after statvfs succeeded.
        let st = unsafe {
            assert_eq!(libc::statvfs(path.as_ptr(), st.as_mut_ptr()), 0, "statvfs {}", self.path.display());
            st.assume_init()
        };
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A full disk under the Raft log: node 3's state directory (Raft log, chunk index) lives on
/// a 512 MiB filesystem that another file fills up while the workload runs. Writes are
/// refused with NoSpace naming node 3 (ENOSPC over NBD) while reads go on; the node neither
/// dies nor stops its Raft groups; once the file is deleted, writes are accepted again; and the
/// history shows nothing acknowledged lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_full_state_filesystem_refuses_writes_until_space_is_freed() {
    let state = Tmpfs::mount("512m");
    let chunks = tempfile::Builder::new().prefix("basalt-chunks-").tempdir_in(basalt_tests::test_root()).unwrap();
    let node3 = format!(
        "data_dir = \"{}\"\ndata_device = \"{}\"\nstate_reserve = \"64MiB\"\n",
        state.path.join("node-3").display(),
        chunks.path().join("chunks.dat").display()
    );
    let cluster = TestCluster::start_with_node_config(simple_spec(3), "", &[(3, &node3)]).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: VOLUME.into(), size: VOLUME_SIZE, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();
    let vol = cluster.client().await.unwrap().open_volume(VOLUME).await.unwrap();
    let workload = Workload::start(&vol);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Leave 48 MiB: 16 MiB under node 3's reserve.
    let ballast = state.path.join("ballast");
    let fill = state.available().saturating_sub(48 << 20);
    let ok = std::process::Command::new("fallocate").args(["-l", &fill.to_string()]).arg(&ballast).status().is_ok_and(|s| s.success());
    assert!(ok, "fallocate of {fill} bytes on the tmpfs failed");
    let full_at = workload.t0.elapsed();
    let refused_by_node3 =
        |ops: &[Op]| ops.iter().any(|o| o.write && matches!(&o.outcome, Outcome::Failed(e) if e.contains("node-3") && e.contains("state directory")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !refused_by_node3(&workload.history.snapshot()) {
        assert!(Instant::now() < deadline, "no write refused within 10 s of node 3's state filesystem filling\n{}", cluster.node(3).log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused_at = workload.t0.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = cluster.metrics(3).await.unwrap();
    assert!(metrics.contains("basalt_raft_log_waiting_for_space{node=\"3\"} 0"), "node 3's Raft log ran out after all:\n{metrics}");

    std::fs::remove_file(&ballast).unwrap();
    let freed_at = workload.t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    let resumed_at = loop {
        let ops = workload.history.snapshot();
        let first = ops.iter().filter(|o| o.write && o.start > freed_at && matches!(o.outcome, Outcome::Ok(_))).map(|o| o.end).min();
        if let Some(at) = first {
            break at;
        }
        assert!(Instant::now() < deadline, "writes still refused 10 s after node 3's state filesystem was freed\n{}", cluster.node(3).log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ops = workload.finish(&vol).await;

    let violations = check(&ops);
    assert!(violations.is_empty(), "history violations:\n{}\n{}", violations.join("\n"), cluster.logs());
    let during = |o: &&Op| o.start > refused_at && o.end < freed_at;
    let writes_during: Vec<&Op> = ops.iter().filter(|o| o.write).filter(during).collect();
    let acked_during = writes_during.iter().filter(|o| matches!(o.outcome, Outcome::Ok(_))).count();
    assert!(
        !writes_during.is_empty() && acked_during == 0,
        "{acked_during} of {} writes were acknowledged while node 3 was full",
        writes_during.len()
    );
    let reads_during: Vec<&Op> = ops.iter().filter(|o| !o.write).filter(during).collect();
    assert!(
        reads_during.iter().any(|o| matches!(o.outcome, Outcome::Ok(_))) && reads_during.iter().all(|o| !matches!(o.outcome, Outcome::Failed(_))),
        "reads failed or stopped while node 3's state filesystem was full: {:?}",
        failures(&ops).iter().filter(|f| f.starts_with("read")).take(5).collect::<Vec<_>>()
    );
    let other: Vec<String> = failures(&ops).into_iter().filter(|f| !(f.contains("node-3") && f.contains("state directory"))).collect();
    assert!(other.len() <= 1, "failures other than node 3's refusal (one write may race the fill):\n{}", other.join("\n"));
    let logs = cluster.node(3).log_tail();
    assert!(cluster.node(3).pid().is_some() && !logs.contains("raft log write failed"), "node 3's Raft log failed:\n{logs}");
    println!(
        "filled at {full_at:?}, first refusal at {refused_at:?}, {} writes refused, freed at {freed_at:?}, first write acknowledged at {resumed_at:?} ({:?} after)",
        writes_during.len(),
        resumed_at.saturating_sub(freed_at)
    );
    // The nodes stop before the tmpfs is unmounted.
    drop(cluster);
}

/// A drain that cannot finish says so. With node 1 down, node 4's replicas of PGs on nodes
/// 2, 3 and 4 have no target (a fourth zone that is up): `basalt node drain 4` moves what it
/// can, then reports the drain stuck (exit 7) naming the down node instead of waiting forever;
/// the drain stays recorded, and once node 1 is back the same command finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_no_target_up_is_reported_stuck_and_finishes_once_one_returns() {
    let (mut cluster, _vol) = four_node_cluster("").await;
    cluster.kill9(1);
    cluster
        .wait_status("node-1 seen down", Duration::from_secs(30), |s| s.nodes.iter().any(|n| n.id == 1 && n.state == "down"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let started = Instant::now();
    let (code, _, err) = cluster.cli(&["node", "drain", "4", "--stuck-after", "5"]).await.unwrap();
    let stuck_after = started.elapsed();
    assert_eq!(code, Some(7), "a drain with no target up should be reported stuck: {err}");
    assert!(err.contains("node-4's drain is stuck") && err.contains("down now: node-1"), "{err}");
    let s = cluster.status().await.unwrap();
    let n4 = s.nodes.iter().find(|n| n.id == 4).unwrap();
    assert!(n4.draining && n4.replicas > 0, "the drain stays recorded with replicas left: {n4:?}");

    cluster.restart(1).await.unwrap();
    let started = Instant::now();
    let (code, out, err) = cluster.cli(&["node", "drain", "4"]).await.unwrap();
    assert_eq!(code, Some(0), "with node 1 back the drain finishes: {out}{err}\n{}", cluster.logs());
    assert!(out.contains("node-4 drained"), "{out}");
    let s = cluster.status().await.unwrap();
    assert_eq!(s.nodes.iter().find(|n| n.id == 4).map(|n| n.replicas), Some(0));
    println!("stuck verdict after {stuck_after:?} ({} replica(s) left); drain finished {:?} after node 1 returned", n4.replicas, started.elapsed());
}

/// Used bytes node `id` reported in its last heartbeat.
fn used_on(s: &ClusterStatusReply, id: u64) -> u64 {
    s.nodes.iter().find(|n| n.id == id).map(|n| n.used_bytes).unwrap_or(0)
}

/// Numbers for the closing note, not assertions on speed: how long a drain, a rebalance onto a
/// new node and a rebuild after a node loss take for a volume holding `BASALT_REBUILD_MIB`
/// (default 192) MiB, at the default `heal.rebuild_rate` (64 MiB/s per sending node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_rebuild_drain_and_rebalance_throughput() {
    use futures::StreamExt;
    let mib: u64 = std::env::var("BASALT_REBUILD_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(192);
    let (mut cluster, _hist) = four_node_cluster("[heal]\nreplace_down_after_secs = 3\n").await;
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest {
            name: "bulk".into(),
            size: (mib + 64) << 20,
            wrapped_key: Default::default(),
            unencrypted: false,
            qos: None,
        })
        .await
        .unwrap();
    let bulk = cluster.client().await.unwrap().open_volume("bulk").await.unwrap();
    let piece = Bytes::from(Rng::new(seed()).bytes(1 << 20));
    futures::stream::iter(0..mib)
        .map(|i| {
            let (bulk, piece) = (bulk.clone(), piece.clone());
            async move { bulk.write(i << 20, piece, false).await.unwrap() }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let s = cluster.wait_status("heartbeats report the data", Duration::from_secs(10), |s| used_on(s, 4) >= (mib << 20) / 2).await.unwrap();
    let on4 = used_on(&s, 4);

    let t = Instant::now();
    admin.node_drain(NodeDrainRequest { id: 4, undo: false }).await.unwrap();
    cluster.wait_status("node-4 drained", Duration::from_secs(600), |s| replicas_on(s, 4) == 0 && moves(s) == 0).await.unwrap();
    let drain = t.elapsed();
    admin.node_remove(NodeRemoveRequest { id: 4 }).await.unwrap();

    let t = Instant::now();
    cluster.add_node(NodeSpec { id: 5, labels: "zone=z5,host=h5".into(), roles: vec!["storage"] }).await.unwrap();
    let s = cluster.wait_status("node-5 took its share", Duration::from_secs(600), |s| replicas_on(s, 5) == 6 && moves(s) == 0).await.unwrap();
    let rebalance = t.elapsed();
    let s = cluster.wait_status("node-5 reports its data", Duration::from_secs(10), |x| used_on(x, 5) >= used_on(&s, 5).max(1)).await.unwrap();
    let on5 = used_on(&s, 5);

    let t = Instant::now();
    cluster.kill9(5);
    cluster.wait_status("node-5's replicas rebuilt", Duration::from_secs(600), |s| healed_without(s, 5)).await.unwrap();
    let rebuild = t.elapsed();
    let rate = |bytes: u64, d: Duration| bytes as f64 / d.as_secs_f64() / (1 << 20) as f64;
    println!(
        "volume data {mib} MiB; drain of node-4 ({} MiB, 6 replicas): {drain:.1?} = {:.1} MiB/s; \
         new node-5 took 6 replicas ({} MiB) in {rebalance:.1?} = {:.1} MiB/s; \
         node-5 killed: rebuilt elsewhere in {rebuild:.1?} = {:.1} MiB/s including the {}s down timeout and 5 s liveness window",
        on4 >> 20,
        rate(on4, drain),
        on5 >> 20,
        rate(on5, rebalance),
        rate(on5, rebuild),
        3
    );
    for i in 0..mib {
        let back = bulk.read(i << 20, 1 << 20).await.unwrap();
        assert!(back[..] == piece[..], "bulk MiB {i} reads back different after drain, rebalance and rebuild");
    }
}

#[test]
fn the_checker_catches_lost_stale_phantom_and_backward_reads() {
    let d = Duration::from_millis;
    let w = |block, version, start, end| Op { write: true, block, version, start: d(start), end: d(end), outcome: Outcome::Ok(version) };
    let r = |block, v, start, end| Op { write: false, block, version: 0, start: d(start), end: d(end), outcome: Outcome::Ok(v) };
    // A clean history: a read concurrent with a write may see either version.
    let good = vec![w(0, 1, 0, 10), w(0, 2, 20, 30), r(0, 1, 11, 19), r(0, 1, 25, 35), r(0, 2, 26, 36), r(0, 2, 40, 41)];
    assert!(check(&good).is_empty(), "{:?}", check(&good));
    // Lost: version 2 was acknowledged at 30, a read starting at 40 sees 1.
    assert_eq!(check(&[w(0, 1, 0, 10), w(0, 2, 20, 30), r(0, 1, 40, 41)]).len(), 1);
    // Phantom: a version nobody wrote; a version from the future.
    assert_eq!(check(&[r(0, 7, 0, 1)]).len(), 1);
    assert_eq!(check(&[w(0, 1, 50, 60), r(0, 1, 0, 10)]).len(), 1);
    // Backward: one read saw 2, a later one sees 1 (write 2 still in flight for both).
    assert_eq!(check(&[w(0, 1, 0, 5), w(0, 2, 6, 100), r(0, 2, 10, 20), r(0, 1, 30, 40)]).len(), 1);
    // Garbage.
    let torn = Op { write: false, block: 0, version: 0, start: d(0), end: d(1), outcome: Outcome::Garbage("x".into()) };
    assert_eq!(check(&[torn]).len(), 1);
    // The codec round-trips and refuses damage.
    let block = encode(3, 9);
    assert_eq!(decode(3, &block), Ok(9));
    assert!(decode(4, &block).is_err());
    let mut bad = block.to_vec();
    bad[100] ^= 1;
    assert!(decode(3, &bad).is_err());
    assert_eq!(decode(3, &[0u8; 4096]), Ok(0));
}
