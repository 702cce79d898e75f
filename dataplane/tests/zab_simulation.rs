//! Deterministic simulation of the ZAB pipelines: 3 and 5 nodes, several pipelines each, the
//! real leader/follower state machines, replicas and sessions, driven on a virtual clock with
//! seeded random delays (so messages reorder) — no threads, no I/O.
//!
//! Checked for every seed: every node applies the identical zxid sequence (digests equal);
//! zxids strictly increase per node (the replica applies only the next one, and we record the
//! order); every read returns a value some write produced; every session reads its own writes;
//! no receiver ever has more messages in flight than it has receive slots (credits work).

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; simulation indices are small"
)]

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rzab_dataplane::replica::NodeReplica;
use rzab_dataplane::store::StoreConfig;
use rzab_dataplane::workload::{KeyDistribution, Sessions, Trace};
use rzab_dataplane::zab::follower::Follower;
use rzab_dataplane::zab::leader::Leader;
use rzab_dataplane::zab::wire::{self, Message};
use rzab_dataplane::zab::{
    Completions, Kind, Limits, Outbox, PipelineConfig, Replica, Target, ZXID_START, ZxidSource,
    follower_recv_slots, leader_recv_slots,
};

const VALUE_LEN: usize = 16;
const KEYS: u64 = 2_000;
const MTU: usize = 1024;
const TAG: u32 = 0xfeed;

struct Datagram {
    to_node: usize,
    pipeline: usize,
    bytes: Vec<u8>,
}

/// Collects a pipeline's outgoing messages.
struct SimOutbox {
    buffer: Vec<u8>,
    sent: Vec<(Target, Vec<u8>)>,
    batches: HashMap<Kind, (u64, u64)>,
}

impl Outbox for SimOutbox {
    fn buffer(&mut self) -> Option<&mut [u8]> {
        Some(&mut self.buffer)
    }

    fn send(&mut self, target: Target, kind: Kind, len: usize, batch: u64) {
        self.sent.push((target, self.buffer[..len].to_vec()));
        let entry = self.batches.entry(kind).or_default();
        entry.0 += batch;
        entry.1 += 1;
    }
}

/// Records completions and the replica's apply order.
struct Done(Vec<(u16, u64, u64)>);

impl Completions for Done {
    fn write_applied(&mut self, session: u16, seq: u64, zxid: u64) {
        self.0.push((session, seq, zxid));
    }
}

/// The replica plus a log of the applied zxids, to check they strictly increase.
struct LoggedReplica {
    inner: NodeReplica,
    log: RefCell<Vec<u64>>,
}

impl Replica for LoggedReplica {
    fn try_apply(&self, zxid: u64, key: u64, value: &[u8]) -> bool {
        let applied = self.inner.try_apply(zxid, key, value);
        if applied {
            self.log.borrow_mut().push(zxid);
        }
        applied
    }
}

enum Role {
    Leader(Box<Leader>),
    Follower(Box<Follower>),
}

struct Pipeline {
    role: Role,
    sessions: Sessions,
    /// Per session: key -> zxid of its last completed write.
    own_writes: Vec<HashMap<u64, u64>>,
    /// Per session: seq -> key of its in-flight write.
    in_flight: Vec<HashMap<u64, u64>>,
}

struct Scenario {
    nodes: usize,
    pipelines: usize,
    sessions: usize,
    operations: u64,
    write_permille: u64,
    max_delay: u64,
    limits: Limits,
}

struct Outcome {
    completed: u64,
    applied: u64,
    batches: HashMap<Kind, (u64, u64)>,
}

fn run(scenario: &Scenario, seed: u64) -> Outcome {
    let mut rng = SmallRng::seed_from_u64(seed);
    let zxids = ZxidSource::new();
    let replicas: Vec<LoggedReplica> = (0..scenario.nodes)
        .map(|_| LoggedReplica {
            inner: NodeReplica::new(&StoreConfig {
                keys: KEYS,
                value_size: VALUE_LEN,
                hugepages: false,
            })
            .unwrap(),
            log: RefCell::new(Vec::new()),
        })
        .collect();
    let mut pipelines: Vec<Vec<Pipeline>> = (0..scenario.nodes)
        .map(|node| {
            (0..scenario.pipelines)
                .map(|pipeline| {
                    let config = PipelineConfig {
                        node: node as u8,
                        nodes: scenario.nodes as u8,
                        pipeline: pipeline as u8,
                        pipelines: scenario.pipelines as u8,
                        value_len: VALUE_LEN,
                        cluster_tag: TAG,
                        sessions: scenario.sessions,
                        window: 256,
                        mtu: MTU,
                    };
                    config.validate().unwrap();
                    let role = if node == 0 {
                        Role::Leader(Box::new(Leader::new(config)))
                    } else {
                        Role::Follower(Box::new(Follower::new(config)))
                    };
                    let trace = Trace::build(
                        KEYS,
                        KeyDistribution::Zipf { theta: 0.9 },
                        4096,
                        seed * 1000 + (node * 10 + pipeline) as u64,
                    )
                    .unwrap();
                    Pipeline {
                        role,
                        sessions: Sessions::new(
                            node as u8,
                            pipeline as u8,
                            scenario.sessions,
                            trace,
                            VALUE_LEN,
                        ),
                        own_writes: vec![HashMap::new(); scenario.sessions],
                        in_flight: vec![HashMap::new(); scenario.sessions],
                    }
                })
                .collect()
        })
        .collect();

    let mut network: BinaryHeap<Reverse<(u64, u64, usize)>> = BinaryHeap::new();
    let mut datagrams: HashMap<usize, Datagram> = HashMap::new();
    let mut next_id = 0usize;
    let mut in_flight_to: HashMap<(usize, usize), usize> = HashMap::new();
    let mut produced: HashSet<u64> = HashSet::new();
    produced.insert(0);
    let mut outbox = SimOutbox {
        buffer: vec![0; MTU],
        sent: Vec::new(),
        batches: HashMap::new(),
    };
    let mut completed = 0u64;
    let mut now = 0u64;
    let mut order: Vec<(usize, usize)> = (0..scenario.nodes)
        .flat_map(|n| (0..scenario.pipelines).map(move |p| (n, p)))
        .collect();
    let mut quiet_steps = 0;

    loop {
        now += 1;
        if now >= 5_000_000 {
            for node in &pipelines {
                for pipeline in node {
                    match &pipeline.role {
                        Role::Leader(leader) => eprintln!("{}", leader.summary()),
                        Role::Follower(follower) => eprintln!("{}", follower.summary()),
                    }
                }
            }
            for (node, replica) in replicas.iter().enumerate() {
                eprintln!(
                    "node {node} applied zxid {:#x}",
                    replica.inner.applied_zxid()
                );
            }
            panic!(
                "simulation did not finish by step {now}: a stall (completed {completed}, in flight {})",
                network.len()
            );
        }
        // Deliver what is due.
        while let Some(Reverse((due, _, id))) = network.peek().copied() {
            if due > now {
                break;
            }
            network.pop();
            let datagram = datagrams.remove(&id).unwrap();
            *in_flight_to
                .get_mut(&(datagram.to_node, datagram.pipeline))
                .unwrap() -= 1;
            let message = Message::decode(
                &datagram.bytes,
                TAG,
                VALUE_LEN,
                scenario.nodes,
                scenario.pipelines,
            )
            .unwrap();
            match &mut pipelines[datagram.to_node][datagram.pipeline].role {
                Role::Leader(leader) => leader.handle(&message),
                Role::Follower(follower) => follower.handle(&message),
            }
        }
        // Step every pipeline, in a random order.
        for index in (1..order.len()).rev() {
            order.swap(index, rng.random_range(0..=index));
        }
        let issuing = completed < scenario.operations;
        let mut busy = false;
        for &(node, pipeline) in &order {
            let replica = &replicas[node];
            let state = &mut pipelines[node][pipeline];
            let mut done = Done(Vec::new());
            match &mut state.role {
                Role::Leader(leader) => {
                    leader.advance(&mut outbox, replica, &zxids, &mut done, &scenario.limits)
                }
                Role::Follower(follower) => {
                    follower.advance(&mut outbox, replica, &mut done, &scenario.limits)
                }
            }
            for (session, seq, zxid) in done.0 {
                let key = state.in_flight[usize::from(session)]
                    .remove(&seq)
                    .expect("completion of an unknown write");
                state.own_writes[usize::from(session)].insert(key, zxid);
                assert!(state.sessions.complete(session, seq, now).is_some());
                completed += 1;
            }
            if issuing {
                let Pipeline {
                    role,
                    sessions,
                    own_writes,
                    in_flight,
                } = state;
                let mut submissions = Vec::new();
                let issued = sessions.issue(now, scenario.write_permille, replica.inner.store(), |session, seq, key, value| {
                    let accepted = match role {
                        Role::Leader(leader) => leader.submit_write(session, seq, key, value),
                        Role::Follower(follower) => follower.submit_write(session, seq, key, value),
                    };
                    if accepted {
                        submissions.push((session, seq, key, u64::from_le_bytes(value[..8].try_into().unwrap())));
                    }
                    accepted
                }, |read| {
                    let id = u64::from_le_bytes(read.value[..8].try_into().unwrap());
                    assert!(produced.contains(&id), "read of key {} returned {id:#x}, which no write produced", read.key);
                    if let Some(own) = own_writes[usize::from(read.session)].get(&read.key) {
                        assert!(read.zxid >= *own, "session {} read its own key {} at zxid {} after writing it at {own}", read.session, read.key, read.zxid);
                    }
                });
                for (session, seq, key, id) in submissions {
                    in_flight[usize::from(session)].insert(seq, key);
                    produced.insert(id);
                }
                completed += issued.reads;
            }
            for (target, bytes) in outbox.sent.drain(..) {
                busy = true;
                let destinations: Vec<usize> = match target {
                    Target::Leader => vec![0],
                    Target::Follower(follower) => vec![usize::from(follower)],
                    Target::AllFollowers => (1..scenario.nodes).collect(),
                };
                for to_node in destinations {
                    let slots = if to_node == 0 {
                        leader_recv_slots(scenario.nodes - 1)
                    } else {
                        follower_recv_slots()
                    };
                    let queued = in_flight_to.entry((to_node, pipeline)).or_default();
                    *queued += 1;
                    assert!(
                        *queued <= slots,
                        "{queued} messages in flight to node {to_node} pipeline {pipeline}, which has {slots} receive slots"
                    );
                    let delay = rng.random_range(1..=scenario.max_delay);
                    datagrams.insert(
                        next_id,
                        Datagram {
                            to_node,
                            pipeline,
                            bytes: bytes.clone(),
                        },
                    );
                    network.push(Reverse((now + delay, next_id as u64, next_id)));
                    next_id += 1;
                }
            }
        }
        if !issuing && network.is_empty() && !busy {
            quiet_steps += 1;
            if quiet_steps > 3 {
                break;
            }
        } else {
            quiet_steps = 0;
        }
    }

    // Every node applied the same sequence.
    let first_log = replicas[0].log.borrow().clone();
    assert!(
        first_log.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "zxids must increase by one"
    );
    assert_eq!(
        first_log.first().copied().unwrap_or(ZXID_START + 1),
        ZXID_START + 1
    );
    for (node, replica) in replicas.iter().enumerate() {
        assert_eq!(
            *replica.log.borrow(),
            first_log,
            "node {node} applied a different sequence"
        );
        assert_eq!(
            replica.inner.digest(),
            replicas[0].inner.digest(),
            "node {node} digest differs"
        );
        assert_eq!(
            replica.inner.store().digest(),
            replicas[0].inner.store().digest(),
            "node {node} store differs"
        );
    }
    assert_eq!(
        first_log.len() as u64,
        zxids.last_issued() - ZXID_START,
        "every zxid issued was applied"
    );
    for node in &pipelines {
        for pipeline in node {
            assert_eq!(pipeline.sessions.writing(), 0, "a write never completed");
        }
    }
    Outcome {
        completed,
        applied: first_log.len() as u64,
        batches: outbox.batches,
    }
}

fn scenario(nodes: usize, operations: u64) -> Scenario {
    Scenario {
        nodes,
        pipelines: 2,
        sessions: 12,
        operations,
        write_permille: 300,
        max_delay: 40,
        limits: Limits::default(),
    }
}

#[test]
fn three_nodes_many_seeds() {
    for seed in 1..=6 {
        let outcome = run(&scenario(3, 200_000), seed);
        assert!(outcome.completed >= 200_000);
        assert!(
            outcome.applied > 10_000,
            "seed {seed}: only {} writes",
            outcome.applied
        );
    }
}

#[test]
fn five_nodes_many_seeds() {
    for seed in 100..=103 {
        let outcome = run(&scenario(5, 200_000), seed);
        assert!(
            outcome.applied > 10_000,
            "seed {seed}: only {} writes",
            outcome.applied
        );
    }
}

#[test]
fn tight_credits_and_small_batches_still_converge() {
    let mut tight = scenario(3, 60_000);
    tight.limits = Limits {
        prepare_batch: 2,
        write_batch: 1,
        ack_batch: 16,
        commit_batch: 1,
        prepare_credits: 1,
        write_credits: 1,
        commit_credits: 1,
    };
    tight.max_delay = 200;
    let outcome = run(&tight, 9);
    let (prepares, prepare_msgs) = outcome.batches[&Kind::Prepare];
    assert!(
        prepares <= prepare_msgs * 2,
        "prepare batch limit not respected"
    );
    let (commits, commit_msgs) = outcome.batches[&Kind::Commit];
    assert_eq!(
        commits, commit_msgs,
        "commit batch of 1 must cover one write per message"
    );
}

#[test]
fn single_node_commits_alone() {
    let outcome = run(
        &Scenario {
            nodes: 1,
            ..scenario(1, 20_000)
        },
        5,
    );
    assert!(outcome.applied > 1_000);
}

#[test]
fn batching_coalesces_under_load() {
    let mut heavy = scenario(3, 100_000);
    heavy.write_permille = 1000;
    heavy.sessions = 64;
    let outcome = run(&heavy, 11);
    let (prepares, prepare_msgs) = outcome.batches[&Kind::Prepare];
    assert!(
        prepares as f64 / prepare_msgs as f64 > 2.0,
        "prepares were not coalesced: {prepares}/{prepare_msgs}"
    );
    let (_, ack_msgs) = outcome.batches[&Kind::Ack];
    assert!(
        ack_msgs <= prepare_msgs * 2,
        "at most one ack per prepare message per follower"
    );
    let _ = wire::HEADER_BYTES;
}
