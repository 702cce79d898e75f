//! Deterministic simulation of leader election and recovery: 3 and 5 nodes of one pipeline
//! each, the real [`Node`] state machines (election, discovery, synchronization by DIFF or
//! snapshot, broadcast), replicas and closed-loop client sessions, on a virtual clock with
//! seeded delays (so datagrams reorder), loss and duplication, and faults: leaders killed
//! (and restarted as new, empty processes), stopped and resumed, cut off alone or with a
//! minority, links that flap, two nodes failing at once, and leader after leader killed.
//!
//! Checked after every step, the invariants of ZooKeeper's TLA+ specification of Zab
//! (zookeeper-specifications) as they show in what nodes lead and apply:
//! - Leadership: at most one node leads any epoch (commits in it as its leader).
//! - Integrity: a node applies only transactions a client submitted.
//! - Agreement and TotalOrder: two nodes that applied the same zxid applied the same
//!   transaction, and each node's zxids increase (by one within an epoch).
//! - PrimaryIntegrity and Local/Global PrimaryOrder: no transaction is applied twice by a node
//!   (each (node, session, sequence) is ordered once, across changes of leader), and no node
//!   skips, within the span of what it applied, a zxid another node applied.
//!
//! And at the end: no write a client saw complete is lost (every surviving original node
//! applied it), every live node applied the same sequence, and liveness: once the faults are
//! over, every session completes writes again within a bound.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; simulation indices are small"
)]

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rzab_dataplane::replica::NodeReplica;
use rzab_dataplane::store::StoreConfig;
use rzab_dataplane::zab::node::{Node, Stage};
use rzab_dataplane::zab::wire::{self, Message};
use rzab_dataplane::zab::{
    CatchupBoard, Completions, Kind, LEADER_EPOCH, Limits, Outbox, PipelineConfig, StateMachine,
    Target, Txn, ZxidSource, zxid_follows,
};

const KEYS: u64 = 64;
const VALUE: usize = 16;
const TAG: u32 = 0xfa11;
const RUN: u64 = 0x0fa1_10fe;
const INTEGRITY: wire::Integrity = wire::Integrity::Crc32c;
/// The write id of the log entry that marks a snapshot's base (its zxid: where applies go on).
const SNAPSHOT_BASE: u64 = u64::MAX;
/// One virtual step is this many nanoseconds.
const STEP_NS: u64 = 1_000;

/// The replica plus the log of what it applied: (zxid, write id).
struct LoggedReplica {
    inner: NodeReplica,
    log: RefCell<Vec<(u64, u64)>>,
}

impl LoggedReplica {
    fn new() -> Self {
        LoggedReplica {
            inner: NodeReplica::new(&StoreConfig {
                keys: KEYS,
                value_size: VALUE,
                hugepages: false,
            })
            .unwrap(),
            log: RefCell::new(Vec::new()),
        }
    }
}

impl StateMachine for LoggedReplica {
    fn try_apply(&self, zxid: u64, txn: Txn<'_>) -> bool {
        let applied = self.inner.try_apply(zxid, txn);
        if applied {
            self.log.borrow_mut().push((zxid, txn.u64_at(8)));
        }
        applied
    }

    fn applied_zxid(&self) -> u64 {
        self.inner.applied_zxid()
    }

    fn read_for_snapshot(&self, key: u64, out: &mut [u8]) -> Option<u64> {
        self.inner.read_for_snapshot(key, out)
    }

    fn install(&self, key: u64, zxid: u64, value: &[u8]) {
        self.inner.install(key, zxid, value)
    }

    fn set_base(&self, zxid: u64) {
        self.inner.set_base(zxid);
        // A snapshot's base: the applies that follow go on from there.
        self.log
            .borrow_mut()
            .push((self.inner.applied_zxid(), SNAPSHOT_BASE));
    }
}

struct SimOutbox {
    buffer: Vec<u8>,
    sent: Vec<(Target, Vec<u8>)>,
}

impl Outbox for SimOutbox {
    fn buffer(&mut self) -> Option<&mut [u8]> {
        Some(&mut self.buffer)
    }

    fn send(&mut self, target: Target, _kind: Kind, len: usize, _batch: u64) {
        wire::seal(&mut self.buffer[..len], &INTEGRITY);
        self.sent.push((target, self.buffer[..len].to_vec()));
    }

    fn resend(&mut self, target: Target, _kind: Kind, len: usize) {
        wire::seal(&mut self.buffer[..len], &INTEGRITY);
        self.sent.push((target, self.buffer[..len].to_vec()));
    }
}

/// Completions (session, seq, zxid), and writes given up (zxid 0).
struct Done(Vec<(u16, u64, u64)>);

impl Completions for Done {
    fn write_applied(&mut self, session: u16, seq: u64, zxid: u64) {
        self.0.push((session, seq, zxid));
    }

    fn write_abandoned(&mut self, session: u16, seq: u64) {
        self.0.push((session, seq, 0));
    }
}

/// A fault, from `at` for `steps`.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The node leading at `at` dies; after `steps` a new, empty process starts in its place.
    KillLeader,
    /// Node `n` dies, and restarts after `steps`.
    Kill(usize),
    /// The node leading at `at` stops (SIGSTOP) and resumes with its state after `steps`.
    PauseLeader,
    /// The node leading at `at` is cut off from every other (its datagrams and theirs lost).
    IsolateLeader,
    /// The node leading at `at` and the next `n` nodes are cut off from the rest.
    LeaderWithMinority(usize),
    /// Every link between two distinct nodes goes down with this per-mille chance at every
    /// 500th step, and up again at the next (flapping).
    Flap(u32),
}

#[derive(Clone, Debug)]
struct Scenario {
    nodes: usize,
    sessions: usize,
    max_delay: u64,
    loss_permille: u32,
    duplicate_permille: u32,
    faults: Vec<(u64, u64, Fault)>,
    /// Writes every session completes after the last fault ends.
    writes_after: u64,
    limits: Limits,
}

fn scenario(nodes: usize, faults: Vec<(u64, u64, Fault)>) -> Scenario {
    Scenario {
        nodes,
        sessions: 4,
        max_delay: 30,
        loss_permille: 0,
        duplicate_permille: 0,
        faults,
        writes_after: 20,
        limits: Limits {
            retransmit_timeout_ns: 200_000,
            heartbeat_interval_ns: 300_000,
            peer_timeout_ns: 2_000_000,
            election_timeout_ns: 2_000_000,
            finalize_wait_ns: 200_000,
            // As long, against the election timeout, as the real processes' 1 s is against
            // their 50 ms, so that restarted processes wait it out as they do.
            startup_grace_ns: 20_000_000,
            ..Limits::default()
        },
    }
}

fn config(scenario: &Scenario, node: usize, instance: u64) -> PipelineConfig {
    let config = PipelineConfig {
        node: node as u8,
        nodes: scenario.nodes as u8,
        pipeline: 0,
        pipelines: 1,
        max_txn_len: 8 + VALUE,
        slot_len: PipelineConfig::default_slot_len(8 + VALUE, 8 + VALUE, 1024),
        item_len: VALUE,
        cluster_tag: TAG,
        run: RUN,
        epoch: LEADER_EPOCH,
        integrity: INTEGRITY,
        sessions: scenario.sessions,
        window: 128,
        retained: 128 * 8,
        mtu: 1024,
        keys: KEYS,
        instance,
        fingerprint: 99,
    };
    config.validate().unwrap();
    config
}

/// A client session: one write outstanding at a time, retried while the node refuses it.
#[derive(Clone, Copy, Default)]
struct Client {
    next_seq: u64,
    pending: Option<(u64, u64)>,
    /// Whether the node took the pending write (it sends it on, to a new leader too).
    accepted: bool,
    completed: u64,
}

struct SimNode {
    node: Node,
    replica: LoggedReplica,
    zxids: ZxidSource,
    board: CatchupBoard,
    instance: u64,
    clients: Vec<Client>,
}

/// A process of `node` as the binary starts one, at a cluster's start or restarted into a
/// running cluster alike: taking node 0 for the leader until the start-up grace runs out.
fn start_node(scenario: &Scenario, node: usize, instance: u64) -> SimNode {
    SimNode {
        node: Node::new(config(scenario, node, instance), 0),
        replica: LoggedReplica::new(),
        zxids: ZxidSource::new(),
        board: CatchupBoard::new(1),
        instance,
        clients: vec![
            Client {
                next_seq: (instance << 20) | 1,
                ..Client::default()
            };
            scenario.sessions
        ],
    }
}

fn write_id(node: usize, instance: u64, session: usize, seq: u64) -> u64 {
    ((node as u64) << 56) | (instance << 44) | ((session as u64) << 36) | (seq & 0xf_ffff_ffff)
}

struct Datagram {
    to: usize,
    bytes: Vec<u8>,
}

/// What the run saw, for the tests' own assertions.
#[derive(Debug, Default)]
struct Outcome {
    epochs: usize,
    completed: u64,
}

/// The invariants checked as nodes apply and lead.
#[derive(Default)]
struct Checker {
    /// zxid -> write id, over every node's applies.
    by_zxid: BTreeMap<u64, u64>,
    /// Per node process (node, instance): write ids applied, and how far its log was checked.
    applied_ids: HashMap<(usize, u64), HashSet<u64>>,
    checked: HashMap<(usize, u64), usize>,
    /// Epoch -> the node that led it.
    leaders: HashMap<u32, usize>,
    /// Write ids submitted, and those completed: write id -> zxid.
    submitted: HashSet<u64>,
    completed: HashMap<u64, u64>,
}

impl Checker {
    fn after_step(&mut self, nodes: &[Option<SimNode>], step: u64) {
        for (index, node) in nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            // An established leader: it committed in its own epoch (an elected node that
            // never got a quorum to follow it is only a prospective one).
            let established = u32::try_from(node.replica.inner.applied_zxid() >> 32)
                .is_ok_and(|applied_epoch| applied_epoch == node.node.epoch());
            if node.node.is_leader() && established {
                let epoch = node.node.epoch();
                let leader = *self.leaders.entry(epoch).or_insert(index);
                assert_eq!(
                    leader, index,
                    "step {step}: Leadership: nodes {leader} and {index} both lead epoch {epoch}"
                );
            }
            let key = (index, node.instance);
            let log = node.replica.log.borrow();
            let from = self.checked.get(&key).copied().unwrap_or(0);
            let ids = self.applied_ids.entry(key).or_default();
            for position in from..log.len() {
                let (zxid, id) = log[position];
                if id == SNAPSHOT_BASE {
                    continue;
                }
                assert!(
                    self.submitted.contains(&id),
                    "step {step}: Integrity: node {index} applied write {id:#x}, never submitted"
                );
                if position > 0 {
                    let (previous, previous_id) = log[position - 1];
                    assert!(
                        zxid_follows(previous, zxid)
                            || (previous_id == SNAPSHOT_BASE && zxid > previous),
                        "step {step}: TotalOrder: node {index} applied {zxid:#x} after {previous:#x}"
                    );
                }
                let agreed = *self.by_zxid.entry(zxid).or_insert(id);
                assert_eq!(
                    agreed, id,
                    "step {step}: Agreement: node {index} applied write {id:#x} at zxid {zxid:#x}, another node write {agreed:#x}"
                );
                assert!(
                    ids.insert(id),
                    "step {step}: PrimaryIntegrity: node {index} applied write {id:#x} twice"
                );
            }
            self.checked.insert(key, log.len());
        }
    }

    /// No node skipped a zxid another applied, within the span of its own applies.
    fn no_gaps(&self, nodes: &[Option<SimNode>]) {
        for (index, node) in nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            let log = node.replica.log.borrow();
            // What it applied since its last snapshot (the snapshot holds what came before).
            let since = log
                .iter()
                .rposition(|(_, id)| *id == SNAPSHOT_BASE)
                .map_or(0, |base| base + 1);
            let log = &log[since..];
            let (Some(first), Some(last)) = (log.first(), log.last()) else {
                continue;
            };
            let mine: HashSet<u64> = log.iter().map(|(zxid, _)| *zxid).collect();
            for zxid in self.by_zxid.range(first.0..=last.0).map(|(zxid, _)| *zxid) {
                assert!(
                    mine.contains(&zxid),
                    "PrimaryOrder: node {index} applied {:#x}..={:#x} but not {zxid:#x}, which another node applied",
                    first.0,
                    last.0
                );
            }
        }
    }
}

fn current_leader(nodes: &[Option<SimNode>]) -> Option<usize> {
    nodes
        .iter()
        .enumerate()
        .filter_map(|(index, node)| {
            let node = node.as_ref()?;
            node.node.is_leader().then_some((node.node.epoch(), index))
        })
        .max()
        .map(|(_, index)| index)
}

fn dump(nodes: &[Option<SimNode>]) {
    for (index, node) in nodes.iter().enumerate() {
        match node {
            Some(node) => eprintln!(
                "node {index}: applied {:#x} | {}",
                node.replica.inner.applied_zxid(),
                node.node.summary()
            ),
            None => eprintln!("node {index}: down"),
        }
    }
}

fn run(scenario: &Scenario, seed: u64) -> Outcome {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut nodes: Vec<Option<SimNode>> = (0..scenario.nodes)
        .map(|node| Some(start_node(scenario, node, node as u64 + 1)))
        .collect();
    let context = config(scenario, 0, 1).wire_context();
    let mut outbox = SimOutbox {
        buffer: vec![0; 1024],
        sent: Vec::new(),
    };
    let mut queue: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut datagrams: HashMap<usize, Datagram> = HashMap::new();
    let mut next_id = 0usize;
    let mut checker = Checker::default();
    let mut paused: HashSet<usize> = HashSet::new();
    // Links down, as (from, to).
    let mut cut: HashSet<(usize, usize)> = HashSet::new();
    let mut flapping: HashSet<(usize, usize)> = HashSet::new();
    // The node each fault struck, once it began.
    let mut struck: HashMap<usize, Vec<usize>> = HashMap::new();
    let faults_end = scenario
        .faults
        .iter()
        .map(|(at, steps, _)| at + steps)
        .max()
        .unwrap_or(0);
    let mut completed_after = vec![vec![0u64; scenario.sessions]; scenario.nodes];
    let mut instances: Vec<u64> = (0..scenario.nodes).map(|node| node as u64 + 1).collect();
    let mut step = 0u64;
    let limit = faults_end + 3_000_000;
    let mut started_all = false;
    loop {
        step += 1;
        let now_ns = step * STEP_NS;
        if step > limit {
            dump(&nodes);
            panic!("seed {seed}: the cluster did not recover by step {step} ({scenario:?})");
        }
        // Faults begin and end.
        for (index, (at, steps, fault)) in scenario.faults.iter().enumerate() {
            if step == *at {
                let leader = current_leader(&nodes).unwrap_or(0);
                let mut victims = vec![leader];
                match *fault {
                    Fault::KillLeader => nodes[leader] = None,
                    Fault::Kill(node) => {
                        victims = vec![node];
                        nodes[node] = None;
                    }
                    Fault::PauseLeader => {
                        paused.insert(leader);
                    }
                    Fault::IsolateLeader => {}
                    Fault::LeaderWithMinority(more) => {
                        for offset in 1..=more {
                            victims.push((leader + offset) % scenario.nodes);
                        }
                    }
                    Fault::Flap(_) => victims.clear(),
                }
                if matches!(fault, Fault::IsolateLeader | Fault::LeaderWithMinority(_)) {
                    for a in 0..scenario.nodes {
                        for b in 0..scenario.nodes {
                            if victims.contains(&a) != victims.contains(&b) {
                                cut.insert((a, b));
                            }
                        }
                    }
                }
                struck.insert(index, victims);
            }
            if step == at + steps {
                let victims = struck.get(&index).cloned().unwrap_or_default();
                match *fault {
                    Fault::KillLeader | Fault::Kill(_) => {
                        for victim in victims {
                            instances[victim] += 100;
                            nodes[victim] = Some(start_node(scenario, victim, instances[victim]));
                        }
                    }
                    Fault::PauseLeader => {
                        for victim in victims {
                            paused.remove(&victim);
                        }
                    }
                    Fault::IsolateLeader | Fault::LeaderWithMinority(_) => cut.clear(),
                    Fault::Flap(_) => flapping.clear(),
                }
            }
            if let Fault::Flap(permille) = *fault {
                if step >= *at && step < at + steps && step % 500 == 0 {
                    flapping.clear();
                    for a in 0..scenario.nodes {
                        for b in 0..scenario.nodes {
                            if a != b && rng.random_range(0..1000) < permille {
                                flapping.insert((a, b));
                            }
                        }
                    }
                }
            }
        }
        // Deliveries.
        while let Some(Reverse((due, id))) = queue.peek().copied() {
            if due > step {
                break;
            }
            queue.pop();
            let datagram = datagrams.remove(&id).unwrap();
            if paused.contains(&datagram.to) {
                // A stopped process's posted receives fill; the rest is dropped. Keep it
                // simple: what comes while stopped is lost.
                continue;
            }
            let Some(node) = nodes[datagram.to].as_mut() else {
                continue;
            };
            let message = Message::decode(&datagram.bytes, &context).unwrap();
            if node.node.knows(&message.header) {
                node.node
                    .handle(&message, now_ns, &node.replica, &node.board);
            }
        }
        // Steps of every live node, in a random order.
        let mut order: Vec<usize> = (0..scenario.nodes).collect();
        for index in (1..order.len()).rev() {
            order.swap(index, rng.random_range(0..=index));
        }
        let mut sends: Vec<(usize, Target, Vec<u8>)> = Vec::new();
        for &index in &order {
            if paused.contains(&index) {
                continue;
            }
            let Some(node) = nodes[index].as_mut() else {
                continue;
            };
            let mut done = Done(Vec::new());
            node.node.advance(
                now_ns,
                &mut outbox,
                &node.replica,
                &node.zxids,
                &node.board,
                &mut done,
                &scenario.limits,
            );
            for (session, seq, zxid) in done.0 {
                let client = &mut node.clients[usize::from(session)];
                if client.pending.map(|(pending, _)| pending) == Some(seq) {
                    let (_, id) = client.pending.take().unwrap();
                    if zxid == 0 {
                        continue;
                    }
                    checker.completed.insert(id, zxid);
                    client.completed += 1;
                    if step > faults_end {
                        completed_after[index][usize::from(session)] += 1;
                    }
                }
            }
            if node.node.serving() {
                started_all = true;
            }
            // As the worker does once its start-up handshake is over.
            if node.node.handshake_done(|_| true) {
                node.node.set_running();
            }
            for (session, client) in node.clients.iter_mut().enumerate() {
                let (seq, id) = match client.pending {
                    Some(pending) => pending,
                    None => {
                        let seq = client.next_seq;
                        client.next_seq += 1;
                        let id = write_id(index, node.instance, session, seq);
                        checker.submitted.insert(id);
                        client.pending = Some((seq, id));
                        client.accepted = false;
                        (seq, id)
                    }
                };
                if client.accepted || !node.node.serving() {
                    continue;
                }
                let mut txn = [0u8; 8 + VALUE];
                txn[..8].copy_from_slice(&(seq % KEYS).to_le_bytes());
                txn[8..16].copy_from_slice(&id.to_le_bytes());
                txn[16..24].copy_from_slice(&id.to_le_bytes());
                // Refused (no room, or the node is between leaders): tried again next step.
                client.accepted = node.node.submit_write(session as u16, seq, &txn);
            }
            for (target, bytes) in outbox.sent.drain(..) {
                sends.push((index, target, bytes));
            }
        }
        for (from, target, bytes) in sends {
            let destinations: Vec<usize> = match target {
                Target::Leader => vec![
                    nodes[from]
                        .as_ref()
                        .map_or(0, |node| usize::from(node.node.leader_node())),
                ],
                Target::Follower(node) => vec![usize::from(node)],
                Target::AllFollowers => (0..scenario.nodes).filter(|to| *to != from).collect(),
            };
            for to in destinations {
                if to == from
                    || cut.contains(&(from, to))
                    || flapping.contains(&(from, to))
                    || paused.contains(&from)
                    || rng.random_range(0..1000) < scenario.loss_permille
                {
                    continue;
                }
                let copies = if rng.random_range(0..1000) < scenario.duplicate_permille {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let delay = rng.random_range(1..=scenario.max_delay);
                    datagrams.insert(
                        next_id,
                        Datagram {
                            to,
                            bytes: bytes.clone(),
                        },
                    );
                    queue.push(Reverse((step + delay, next_id)));
                    next_id += 1;
                }
            }
        }
        checker.after_step(&nodes, step);
        let recovered = step > faults_end
            && started_all
            && nodes.iter().enumerate().all(|(index, node)| {
                node.as_ref().is_none_or(|_| {
                    completed_after[index]
                        .iter()
                        .all(|done| *done >= scenario.writes_after)
                })
            });
        if recovered {
            break;
        }
    }
    // Let the followers apply what the leader committed last, then compare.
    let leader = current_leader(&nodes).expect("a leader at the end");
    let final_zxid = nodes[leader].as_ref().unwrap().replica.inner.applied_zxid();
    for _ in 0..200_000 {
        step += 1;
        let now_ns = step * STEP_NS;
        while let Some(Reverse((due, id))) = queue.peek().copied() {
            if due > step {
                break;
            }
            queue.pop();
            let datagram = datagrams.remove(&id).unwrap();
            if let Some(node) = nodes[datagram.to].as_mut() {
                let message = Message::decode(&datagram.bytes, &context).unwrap();
                if node.node.knows(&message.header) {
                    node.node
                        .handle(&message, now_ns, &node.replica, &node.board);
                }
            }
        }
        let mut sends = Vec::new();
        for (index, node) in nodes.iter_mut().enumerate() {
            let Some(node) = node.as_mut() else { continue };
            node.node.advance(
                now_ns,
                &mut outbox,
                &node.replica,
                &node.zxids,
                &node.board,
                &mut Done(Vec::new()),
                &scenario.limits,
            );
            for (target, bytes) in outbox.sent.drain(..) {
                sends.push((index, target, bytes));
            }
        }
        for (from, target, bytes) in sends {
            let destinations: Vec<usize> = match target {
                Target::Leader => vec![
                    nodes[from]
                        .as_ref()
                        .map_or(0, |node| usize::from(node.node.leader_node())),
                ],
                Target::Follower(node) => vec![usize::from(node)],
                Target::AllFollowers => (0..scenario.nodes).filter(|to| *to != from).collect(),
            };
            for to in destinations {
                datagrams.insert(
                    next_id,
                    Datagram {
                        to,
                        bytes: bytes.clone(),
                    },
                );
                queue.push(Reverse((step + 1, next_id)));
                next_id += 1;
            }
        }
        checker.after_step(&nodes, step);
        let leader_zxid = nodes[leader].as_ref().unwrap().replica.inner.applied_zxid();
        let caught_up = queue.is_empty()
            && nodes
                .iter()
                .flatten()
                .all(|node| node.replica.inner.applied_zxid() == leader_zxid);
        if caught_up {
            break;
        }
    }
    let final_zxid = final_zxid.max(nodes[leader].as_ref().unwrap().replica.inner.applied_zxid());
    checker.no_gaps(&nodes);
    for (index, node) in nodes.iter().enumerate() {
        let Some(node) = node else { continue };
        assert!(
            node.replica.inner.applied_zxid() >= final_zxid,
            "seed {seed}: node {index} stopped at {:#x}, the leader applied {final_zxid:#x}",
            node.replica.inner.applied_zxid()
        );
        assert_eq!(
            node.replica.inner.store().digest(),
            nodes[leader]
                .as_ref()
                .unwrap()
                .replica
                .inner
                .store()
                .digest(),
            "seed {seed}: node {index}'s store differs from the leader's"
        );
        // Every write a client saw complete is in the log of every node that applied past it
        // since its last snapshot (the snapshot holds what came before), at the zxid the
        // client was told.
        let base = node
            .replica
            .log
            .borrow()
            .iter()
            .filter(|(_, id)| *id == SNAPSHOT_BASE)
            .map(|(zxid, _)| *zxid)
            .max()
            .unwrap_or(0);
        let log: HashMap<u64, u64> = node.replica.log.borrow().iter().copied().collect();
        for (id, zxid) in &checker.completed {
            if *zxid <= base {
                continue;
            }
            assert_eq!(
                log.get(zxid),
                Some(id),
                "seed {seed}: node {index} lost completed write {id:#x} at zxid {zxid:#x}"
            );
        }
    }
    Outcome {
        epochs: checker.leaders.len(),
        completed: checker.completed.len() as u64,
    }
}

fn seeds(default: u64) -> std::ops::RangeInclusive<u64> {
    let count = std::env::var("RZAB_FAILOVER_SEEDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default);
    1..=count
}

#[test]
fn a_killed_leader_is_replaced_and_nothing_completed_is_lost() {
    for seed in seeds(40) {
        let outcome = run(
            &scenario(3, vec![(20_000, 30_000, Fault::KillLeader)]),
            seed,
        );
        assert!(outcome.epochs >= 2, "seed {seed}: {outcome:?}");
    }
}

#[test]
fn a_killed_leader_is_replaced_under_loss_duplication_and_reordering() {
    for seed in seeds(30) {
        let mut scenario = scenario(3, vec![(20_000, 30_000, Fault::KillLeader)]);
        scenario.loss_permille = 20;
        scenario.duplicate_permille = 20;
        scenario.max_delay = 80;
        let outcome = run(&scenario, seed);
        assert!(outcome.epochs >= 2, "seed {seed}: {outcome:?}");
    }
}

#[test]
fn a_stopped_leader_comes_back_as_a_follower() {
    for seed in seeds(30) {
        let outcome = run(
            &scenario(3, vec![(20_000, 20_000, Fault::PauseLeader)]),
            seed,
        );
        assert!(outcome.epochs >= 2, "seed {seed}: {outcome:?}");
    }
}

#[test]
fn an_isolated_leader_is_replaced_and_rejoins() {
    for seed in seeds(30) {
        let outcome = run(
            &scenario(3, vec![(20_000, 20_000, Fault::IsolateLeader)]),
            seed,
        );
        assert!(outcome.epochs >= 2, "seed {seed}: {outcome:?}");
    }
}

#[test]
fn a_leader_with_a_minority_of_five_is_replaced() {
    for seed in seeds(20) {
        let outcome = run(
            &scenario(5, vec![(20_000, 20_000, Fault::LeaderWithMinority(1))]),
            seed,
        );
        assert!(outcome.epochs >= 2, "seed {seed}: {outcome:?}");
    }
}

#[test]
fn five_nodes_survive_two_failures_at_once() {
    for seed in seeds(20) {
        let outcome = run(
            &scenario(
                5,
                vec![
                    (20_000, 30_000, Fault::KillLeader),
                    (20_000, 30_000, Fault::Kill(3)),
                ],
            ),
            seed,
        );
        assert!(outcome.epochs >= 2, "seed {seed}: {outcome:?}");
    }
}

#[test]
fn five_leader_kills_in_a_row() {
    for seed in seeds(10) {
        // Each killed leader is restarted 15 ms later and has rejoined (its 20 ms start-up
        // grace, an election, a snapshot) before the next kill: with no durability a
        // restarted process has no log, so a kill while another is still empty would leave
        // no quorum that remembers the history.
        let faults = (0..5)
            .map(|kill| (20_000 + kill * 100_000, 15_000, Fault::KillLeader))
            .collect();
        let outcome = run(&scenario(3, faults), seed);
        assert!(outcome.epochs >= 6, "seed {seed}: {outcome:?}");
    }
}

#[test]
fn flapping_links_never_break_an_invariant() {
    for seed in seeds(20) {
        let mut scenario = scenario(3, vec![(10_000, 60_000, Fault::Flap(300))]);
        scenario.loss_permille = 10;
        let outcome = run(&scenario, seed);
        assert!(outcome.completed > 0, "seed {seed}: {outcome:?}");
    }
}

#[test]
fn without_faults_node_zero_leads_epoch_one_for_good() {
    let outcome = run(&scenario(3, Vec::new()), 7);
    assert_eq!(outcome.epochs, 1, "{outcome:?}");
    let _ = Stage::Broadcast;
}
