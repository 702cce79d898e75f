//! The worker: one pinned thread that runs one pipeline's poll loop over a transport, driving
//! that pipeline's [`Node`] state machine (role, join handshake, leader and follower logic).
//!
//! One iteration, in named steps: [`Worker::receive`] (poll a batch of completions, count each
//! datagram once, hand the accepted ones to the node, re-post the receives before anything
//! that could trigger more traffic); issue (idle sessions issue requests: reads served locally
//! at once, writes handed to the node); advance (the node commits, applies and fills outgoing
//! messages, posted as doorbell-batched chains; only when the spin brought input, the last
//! advance sent, the knobs changed, the worker drains or the node's [`Node::next_deadline`]
//! has come, as otherwise it would find nothing to do); publish (counters every iteration,
//! gauges and peers every 1024); idle (an adaptive worker yields its core after a run of empty
//! iterations). One clock read per iteration; no allocation, lock or syscall (the udp
//! transport's own aside) after start-up. Counters go to this worker's block of the control
//! block with relaxed single-writer stores; knobs are re-read only when the knob epoch changes.
//!
//! Before the loop, [`Worker::join`] runs the node's start-up handshake until every peer of the
//! pipeline has its receives posted and runs a compatible configuration: followers send HELLOs
//! (configuration fingerprint, process instance) until the leader answers with the pseq to
//! start at. A follower that says hello to a running leader (a restarted process) is brought
//! up to date by snapshot; its node serves reads only once every pipeline has caught up.
//!
//! Touches: its transport, the node replica (through the node), its control-block block and
//! the remote endpoint table (re-read when the control plane publishes a new one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicUsize;

use rzab_shared::control_block::{ControlBlock, WorkerBlock};
use rzab_shared::knobs::{Knob, POLL_MODE_BUSY};
use rzab_shared::limits::MAX_NODES;
use rzab_shared::{Counter, EndpointAddress};

use crate::history::WorkerHistory; // history hook
use crate::replica::{KEY_BYTES, NodeReplica};
use crate::transport::{Destination, RecvCompletion, SendRequest, Transport};
use crate::workload::Sessions;
use crate::zab::node::{ElectionCounters, Node};
use crate::zab::wire::{self, DropReason, Integrity, Kind, Message};
use crate::zab::{
    CatchupBoard, Completions, Limits, Outbox, PipelineConfig, PipelineStats, Target, ZxidSource,
};

/// Completions polled per iteration.
const RECV_BATCH: usize = 64;
/// Longest send chain a worker builds; the node opens its transports with this many staging
/// buffers, so a worker never builds a chain its transport would refuse.
pub const MAX_CHAIN: usize = 64;
/// Idle iterations before an adaptive worker yields its core.
const SPINS_BEFORE_YIELD: u32 = 32;

/// The resolved destinations of one pipeline.
#[derive(Clone, Copy, Debug)]
pub struct Peers<A> {
    /// By node id, every other node of the cluster (any may lead; votes go to all);
    /// `None` for this node.
    pub followers: [Option<A>; MAX_NODES],
    /// The pipeline's multicast group, when the transport has one (every node is a member;
    /// whichever leads sends to it).
    pub group: Option<A>,
}

/// Everything the workers of a node share.
#[derive(Debug)]
pub struct NodeShared<'a> {
    pub block: &'a ControlBlock,
    pub replica: &'a NodeReplica,
    pub zxids: &'a ZxidSource,
    pub board: &'a CatchupBoard,
    /// Pipelines of this node that serve (caught up); sessions run only when all do.
    pub serving: &'a AtomicUsize,
    pub pipelines: usize,
    /// Set to end the run: workers stop issuing requests, finish what is in flight, and
    /// return once their pipeline has been quiet for [`DRAIN_QUIET`] (or after [`DRAIN_MAX`]).
    pub stop: &'a AtomicBool,
}

/// How long a draining pipeline must see no traffic before its worker returns.
pub const DRAIN_QUIET: Duration = Duration::from_millis(300);
/// The longest a worker drains.
pub const DRAIN_MAX: Duration = Duration::from_secs(5);

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(
        "pipeline {pipeline}: no answer from {waiting} within {seconds} s; are all nodes started with the same --nodes, --workers and --cluster, and is the leader (node 0) up?"
    )]
    JoinTimeout {
        pipeline: usize,
        waiting: String,
        seconds: u64,
    },
    #[error(
        "pipeline {pipeline}: node {node} runs an incompatible configuration (fingerprint {theirs:#x}, ours {ours:#x}): --nodes, --workers, --value-size, --keys, --window and --sessions must match on every node"
    )]
    Incompatible {
        pipeline: usize,
        node: u8,
        theirs: u64,
        ours: u64,
    },
    #[error("pipeline {0}: stopped before the cluster was joined")]
    Stopped(usize),
    #[error(
        "pipeline {0}: this follower fell further behind the leader than the leader keeps prepares for; restart this node: it will catch up by snapshot"
    )]
    FellBehind(usize),
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The counter for messages of `kind` sent by `multicast` or not.
fn sent_counters(kind: Kind, multicast: bool) -> (Counter, Counter) {
    match (kind, multicast) {
        (Kind::Write, _) => (Counter::SentWriteUnicast, Counter::BytesWriteUnicast),
        (Kind::Prepare, false) => (Counter::SentPrepareUnicast, Counter::BytesPrepareUnicast),
        (Kind::Prepare, true) => (
            Counter::SentPrepareMulticast,
            Counter::BytesPrepareMulticast,
        ),
        (Kind::Ack, _) => (Counter::SentAckUnicast, Counter::BytesAckUnicast),
        (Kind::Commit, false) => (Counter::SentCommitUnicast, Counter::BytesCommitUnicast),
        (Kind::Commit, true) => (Counter::SentCommitMulticast, Counter::BytesCommitMulticast),
        (Kind::Credit, _) => (Counter::SentCreditUnicast, Counter::BytesCreditUnicast),
        (Kind::Hello, _) => (Counter::SentHelloUnicast, Counter::BytesHelloUnicast),
        (Kind::Nack, _) => (Counter::SentNackUnicast, Counter::BytesNackUnicast),
        (Kind::Snapshot, _) => (Counter::SentSnapshotUnicast, Counter::BytesSnapshotUnicast),
        (Kind::Vote, _) => (Counter::SentVoteUnicast, Counter::BytesVoteUnicast),
    }
}

fn batch_counters(kind: Kind) -> Option<(Counter, Counter)> {
    match kind {
        Kind::Write => Some((Counter::BatchEntriesWrite, Counter::BatchMessagesWrite)),
        Kind::Prepare => Some((Counter::BatchEntriesPrepare, Counter::BatchMessagesPrepare)),
        Kind::Ack => Some((Counter::BatchEntriesAck, Counter::BatchMessagesAck)),
        Kind::Commit => Some((Counter::BatchEntriesCommit, Counter::BatchMessagesCommit)),
        Kind::Credit | Kind::Nack | Kind::Hello | Kind::Snapshot | Kind::Vote => None,
    }
}

fn received_counter(kind: Kind) -> Counter {
    match kind {
        Kind::Write => Counter::ReceivedWrite,
        Kind::Prepare => Counter::ReceivedPrepare,
        Kind::Ack => Counter::ReceivedAck,
        Kind::Commit => Counter::ReceivedCommit,
        Kind::Credit => Counter::ReceivedCredit,
        Kind::Hello => Counter::ReceivedHello,
        Kind::Nack => Counter::ReceivedNack,
        Kind::Snapshot => Counter::ReceivedSnapshot,
        Kind::Vote => Counter::ReceivedVote,
    }
}

/// Fills a transport's staging buffers and posts them as doorbell-batched chains.
struct TransportOutbox<'a, T: Transport> {
    transport: &'a mut T,
    peers: &'a Peers<T::Address>,
    /// The node `Target::Leader` names.
    leader_node: u8,
    counters: &'a WorkerBlock,
    /// Filled by push within its fixed capacity ([`MAX_CHAIN`]) and cleared by flush, so it
    /// never reallocates.
    chain: &'a mut Vec<SendRequest<T::Address>>,
    buffers_used: usize,
    max_buffers: usize,
    doorbell: usize,
    multicast: bool,
    fan_out: usize,
    sent: u64,
    integrity: Integrity,
}

impl<T: Transport> TransportOutbox<'_, T> {
    /// Seals the message in the buffer last handed out, before it is queued.
    fn seal(&mut self, len: usize) {
        let buffer = self.transport.send_buffer(self.buffers_used);
        let len = len.min(buffer.len());
        wire::seal(&mut buffer[..len], &self.integrity);
    }

    fn flush(&mut self) {
        if self.chain.is_empty() {
            return;
        }
        match self.transport.post_send(self.chain) {
            Ok(_) => self.counters.add(Counter::Doorbells, 1),
            Err(_) => self
                .counters
                .add(Counter::TransportSendsRefused, self.chain.len() as u64),
        }
        self.chain.clear();
        self.buffers_used = 0;
    }

    /// Queues a send to the leader or to one follower (nothing if its address is unknown).
    fn push_unicast(&mut self, target: Target, len: usize) {
        let node = match target {
            Target::Leader => self.leader_node,
            Target::Follower(node) => node,
            Target::AllFollowers => return,
        };
        let address = self
            .peers
            .followers
            .get(usize::from(node))
            .copied()
            .flatten();
        if let Some(address) = address {
            self.push(Destination::Unicast(address), len);
        }
    }

    fn push(&mut self, destination: Destination<T::Address>, len: usize) {
        self.chain.push(SendRequest {
            destination,
            buffer: u16::try_from(self.buffers_used).unwrap_or(u16::MAX),
            len: u32::try_from(len).unwrap_or(u32::MAX),
        });
    }
}

impl<T: Transport> Outbox for TransportOutbox<'_, T> {
    fn buffer(&mut self) -> Option<&mut [u8]> {
        let requests = if self.multicast {
            1
        } else {
            self.fan_out.max(1)
        };
        if self.buffers_used >= self.max_buffers
            || self.chain.len() + requests > MAX_CHAIN
            || self.chain.len() >= self.doorbell
        {
            self.flush();
        }
        Some(self.transport.send_buffer(self.buffers_used))
    }

    fn resend(&mut self, target: Target, _kind: Kind, len: usize) {
        // Repeats go to one peer; the pipeline counts them as retransmissions.
        if !matches!(target, Target::AllFollowers) {
            self.seal(len);
            self.push_unicast(target, len);
            self.buffers_used += 1;
            self.sent += 1;
        }
    }

    fn send(&mut self, target: Target, kind: Kind, len: usize, batch: u64) {
        self.seal(len);
        let mut multicast_path = false;
        match target {
            Target::Leader | Target::Follower(_) => self.push_unicast(target, len),
            // Votes go to every node, leader or not: one unicast each.
            Target::AllFollowers => {
                match (self.multicast && kind != Kind::Vote, self.peers.group) {
                    (true, Some(group)) => {
                        multicast_path = true;
                        self.push(Destination::Multicast(group), len);
                    }
                    _ => {
                        for follower in self.peers.followers.iter().flatten() {
                            self.push(Destination::Unicast(*follower), len);
                        }
                    }
                }
            }
        }
        let copies = if multicast_path || !matches!(target, Target::AllFollowers) {
            1
        } else {
            self.fan_out as u64
        };
        let (messages, bytes) = sent_counters(kind, multicast_path);
        self.counters.add(messages, copies);
        self.counters.add(bytes, copies * len as u64);
        if let Some((entries, logical)) = batch_counters(kind) {
            self.counters.add(entries, batch);
            self.counters.add(logical, 1);
        }
        self.buffers_used += 1;
        self.sent += 1;
    }
}

/// Copies a pipeline's own statistics into its counters (single writer, relaxed).
fn publish_stats(counters: &WorkerBlock, stats: &PipelineStats) {
    counters.set(Counter::CreditStalls, stats.credit_stalls);
    counters.set(Counter::OrderingStalls, stats.ordering_stalls);
    counters.set(Counter::WindowStalls, stats.window_stalls);
    counters.set(Counter::WritesApplied, stats.writes_applied);
    counters.set(Counter::DropsUnexpected, stats.dropped_unexpected);
    counters.set(Counter::DropsDuplicate, stats.duplicates_dropped);
    counters.set(Counter::RetransmitPrepare, stats.retransmitted_prepares);
    counters.set(Counter::RetransmitCommit, stats.retransmitted_commits);
    counters.set(Counter::RetransmitWrite, stats.retransmitted_writes);
    counters.set(Counter::GapsDetected, stats.gaps_detected);
    counters.set(Counter::CatchupEntriesSent, stats.snapshot_entries_sent);
    counters.set(
        Counter::CatchupEntriesReceived,
        stats.snapshot_entries_installed,
    );
    counters.set(Counter::DiffSyncs, stats.diff_syncs);
    counters.set(Counter::TruncatedTxns, stats.truncated);
}

/// Copies what the node counts of its elections into its counters and gauges.
fn publish_elections(counters: &WorkerBlock, elections: &ElectionCounters) {
    counters.set(Counter::ElectionsStarted, elections.started);
    counters.set(Counter::ElectionsWon, elections.won);
    counters.set(Counter::LeaderlessMicros, elections.leaderless_ns / 1000);
    counters
        .gauges
        .last_election_ns
        .store(elections.last_election_ns, Ordering::Relaxed);
}

/// Completes sessions and records write latency.
struct SessionCompletions<'a> {
    sessions: &'a mut Sessions,
    counters: &'a WorkerBlock,
    now_ns: u64,
    history: &'a WorkerHistory, // history hook
}

impl Completions for SessionCompletions<'_> {
    fn write_applied(&mut self, session: u16, session_seq: u64, zxid: u64) {
        if let Some(latency) = self.sessions.complete(session, session_seq, self.now_ns) {
            self.history.write_completed(session, session_seq, zxid); // history hook
            self.counters.write_latency_ns.record(latency);
            self.counters.add(Counter::WritesCompleted, 1);
        }
    }

    fn write_abandoned(&mut self, session: u16, session_seq: u64) {
        let _ = self.sessions.abandon(session, session_seq);
    }
}

/// The idle step: an adaptive worker that found nothing to do for [`SPINS_BEFORE_YIELD`]
/// iterations in a row yields its core (processes outnumber cores on small machines); returns
/// the new count of idle iterations.
fn yield_when_idle(idle: bool, idle_spins: u32) -> u32 {
    if !idle {
        return 0;
    }
    if idle_spins + 1 >= SPINS_BEFORE_YIELD {
        std::thread::yield_now();
        return 0;
    }
    idle_spins + 1
}

/// Live settings the worker re-reads when the knob epoch changes.
#[derive(Clone, Copy, Debug)]
struct LiveSettings {
    limits: Limits,
    doorbell: usize,
    multicast: bool,
    busy_poll: bool,
    write_ratio_permille: u64,
}

impl LiveSettings {
    fn read(block: &ControlBlock) -> Self {
        let knob = |knob: Knob| block.knob(knob);
        let as_usize = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
        LiveSettings {
            limits: Limits {
                prepare_batch: as_usize(knob(Knob::PrepareBatch)),
                write_batch: as_usize(knob(Knob::WriteBatch)),
                ack_batch: knob(Knob::AckBatch),
                commit_batch: knob(Knob::CommitBatch),
                prepare_credits: knob(Knob::PrepareCredits),
                write_credits: knob(Knob::WriteCredits),
                commit_credits: knob(Knob::CommitCredits),
                retransmit_timeout_ns: knob(Knob::RetransmitTimeoutUs).saturating_mul(1000),
                slow_follower_grace_ns: knob(Knob::SlowFollowerGraceUs).saturating_mul(1000),
                heartbeat_interval_ns: knob(Knob::HeartbeatIntervalMs).saturating_mul(1_000_000),
                peer_timeout_ns: knob(Knob::PeerTimeoutMs).saturating_mul(1_000_000),
                election_timeout_ns: knob(Knob::ElectionTimeoutMs).saturating_mul(1_000_000),
                finalize_wait_ns: knob(Knob::FinalizeWaitUs).saturating_mul(1000),
                startup_grace_ns: Limits::default().startup_grace_ns,
            },
            doorbell: as_usize(knob(Knob::DoorbellBatch)).clamp(1, MAX_CHAIN),
            multicast: knob(Knob::Multicast) != 0,
            busy_poll: knob(Knob::PollMode) == POLL_MODE_BUSY,
            write_ratio_permille: knob(Knob::WriteRatioPermille),
        }
    }
}

/// One worker thread's state.
#[derive(Debug)]
pub struct Worker<T: Transport> {
    index: usize,
    config: PipelineConfig,
    transport: T,
    node: Node,
    /// The clock every `now_ns` of this worker is read from.
    clock: Instant,
    sessions: Sessions,
    peers: Peers<T::Address>,
    completions: Vec<RecvCompletion>,
    chain: Vec<SendRequest<T::Address>>,
    peers_generation: u64,
    counted_serving: bool,
    /// What received datagrams are checked against.
    wire: wire::WireContext,
    history: WorkerHistory, // history hook
}

const _: () = assert!(
    MAX_CHAIN >= MAX_NODES,
    "a unicast broadcast must fit one chain"
);

impl<T: Transport> Worker<T> {
    /// A worker for pipeline `config.pipeline` of a cluster led by `leader_node`, whose
    /// transport already has its receives posted and its peers resolved.
    pub fn new(
        config: PipelineConfig,
        leader_node: u8,
        transport: T,
        sessions: Sessions,
        peers: Peers<T::Address>,
    ) -> Self {
        Worker {
            index: usize::from(config.pipeline),
            config,
            transport,
            node: Node::new(config, leader_node),
            clock: Instant::now(),
            sessions,
            peers,
            completions: vec![RecvCompletion::default(); RECV_BATCH],
            chain: Vec::with_capacity(MAX_CHAIN),
            peers_generation: 0,
            counted_serving: false,
            wire: config.wire_context(),
            history: WorkerHistory::disabled(), // history hook
        }
    }

    /// Remembers which remote table the peers were resolved from.
    pub fn set_peers_generation(&mut self, generation: u64) {
        self.peers_generation = generation;
    }

    /// Re-resolves the peers when the control plane has published a new remote table (a
    /// restarted peer has new endpoints). Resolution may allocate (address handles): this
    /// happens once per change, never in steady state.
    fn refresh_peers(&mut self, block: &ControlBlock) {
        let generation = block.handshake.peers_generation.load(Ordering::Acquire);
        if generation == self.peers_generation || generation == 0 {
            return;
        }
        self.peers_generation = generation;
        let resolve = |transport: &mut T, node: u8| -> Option<T::Address> {
            let address: EndpointAddress =
                block.remote.get(usize::from(node))?[self.index].load()?;
            transport.resolve(&address).ok()
        };
        for node in 0..self.config.nodes {
            if node != self.config.node {
                if let Some(address) = resolve(&mut self.transport, node) {
                    self.peers.followers[usize::from(node)] = Some(address);
                }
            }
        }
    }

    // history hook
    /// Records this worker's operations and applies (see [`crate::history`]).
    pub fn record_history(&mut self, history: WorkerHistory) {
        self.history = history;
    }

    /// Decides whether a received datagram goes to the pipeline, and counts it exactly once:
    /// in `messages_received_total` if accepted, or in `drops_total` by the first reason it
    /// was refused. Hellos are accepted from any instance: they are how a pipeline learns one.
    fn accept<'m>(
        wire_context: &wire::WireContext,
        index: usize,
        node: &Node,
        counters: &WorkerBlock,
        payload: &'m [u8],
    ) -> Option<Message<'m>> {
        counters.add(Counter::DatagramsReceived, 1);
        let message = match Message::decode(payload, wire_context) {
            Ok(message) => message,
            Err(error) => {
                counters.add(
                    match error.reason() {
                        DropReason::Malformed => Counter::DropsMalformed,
                        DropReason::Foreign => Counter::DropsForeign,
                        DropReason::Integrity => Counter::DropsIntegrity,
                    },
                    1,
                );
                return None;
            }
        };
        if usize::from(message.header.pipeline) != index {
            counters.add(Counter::DropsMisrouted, 1);
            return None;
        }
        if !node.knows(&message.header) {
            counters.add(Counter::DropsUnknownSender, 1);
            return None;
        }
        counters.add(received_counter(message.header.kind), 1);
        counters.add(Counter::BytesReceived, payload.len() as u64);
        Some(message)
    }

    /// Runs the join handshake: returns once this pipeline has a place in the cluster (the
    /// leader of the start: every follower joined; a follower: its leader answered, the one
    /// of the start or, for a process restarted into a cluster that elected another, the one
    /// an election finds).
    pub fn join(&mut self, shared: &NodeShared<'_>, timeout: Duration) -> Result<(), WorkerError> {
        let deadline = Instant::now() + timeout;
        let counters = shared.block.worker(self.index);
        let settings = LiveSettings::read(shared.block);
        let max_buffers = self.transport.caps().max_chain.min(MAX_CHAIN);
        let fan_out = self.peers.followers.iter().flatten().count();
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return Err(WorkerError::Stopped(self.index));
            }
            let timed_out = Instant::now() > deadline;
            // A follower stops at its leader's refusal; a leader keeps waiting for the others
            // and names the incompatible node only if the join times out.
            if !self.node.is_leader() || timed_out {
                if let Some((node, theirs)) = self.node.incompatible() {
                    return Err(WorkerError::Incompatible {
                        pipeline: self.index,
                        node,
                        theirs,
                        ours: self.config.fingerprint,
                    });
                }
            }
            let peers = &self.peers;
            let awaited = |node: u8| peers.followers[usize::from(node)].is_some();
            if self.node.handshake_done(awaited) {
                self.node.set_running();
                return Ok(());
            }
            if timed_out {
                let waiting: Vec<String> = (0..self.config.nodes)
                    .filter(|node| {
                        *node != self.config.node
                            && (self.node.is_leader() || *node == self.node.leader_node())
                            && !self.node.joined(*node)
                    })
                    .map(|node| format!("node {node}"))
                    .collect();
                return Err(WorkerError::JoinTimeout {
                    pipeline: self.index,
                    waiting: waiting.join(", "),
                    seconds: timeout.as_secs(),
                });
            }
            let now_ns = self.now_ns();
            let (received, _) = self.receive(now_ns, shared, counters);
            // The whole step, as the loop runs it: it says hello, answers hellos and votes,
            // and elects if the leader of the start does not answer.
            let sent = self.advance(now_ns, &settings, shared, counters, max_buffers, fan_out);
            if received == 0 && sent == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// The issue step: idle sessions issue requests; reads are served from the local store at
    /// once, writes are handed to the node.
    fn issue(
        &mut self,
        now_ns: u64,
        settings: &LiveSettings,
        shared: &NodeShared<'_>,
    ) -> crate::workload::Issued {
        let node = &mut self.node;
        let history = &self.history; // history hook
        history.begin_issue(shared.replica); // history hook
        self.sessions.issue(
            now_ns,
            settings.write_ratio_permille,
            shared.replica.store(),
            |session, seq, key, txn| {
                let accepted = node.submit_write(session, seq, txn);
                let value = txn.get(KEY_BYTES..).unwrap_or_default();
                history.write_issued(session, seq, key, value, accepted); // history hook
                accepted
            },
            |read| history.read_observed(&read), // history hook
        )
    }

    /// The advance step: the node commits, applies (completing this node's sessions) and
    /// fills outgoing messages, posted as doorbell-batched chains; returns the messages sent.
    fn advance(
        &mut self,
        now_ns: u64,
        settings: &LiveSettings,
        shared: &NodeShared<'_>,
        counters: &WorkerBlock,
        max_buffers: usize,
        fan_out: usize,
    ) -> u64 {
        let mut outbox = TransportOutbox {
            transport: &mut self.transport,
            peers: &self.peers,
            leader_node: self.node.leader_node(),
            counters,
            chain: &mut self.chain,
            buffers_used: 0,
            max_buffers,
            doorbell: settings.doorbell,
            multicast: settings.multicast,
            fan_out,
            sent: 0,
            integrity: self.config.integrity,
        };
        let mut completions = SessionCompletions {
            sessions: &mut self.sessions,
            counters,
            now_ns,
            history: &self.history, // history hook
        };
        let replica = self.history.replica(shared.replica); // history hook
        self.node.advance(
            now_ns,
            &mut outbox,
            &replica, // history hook
            shared.zxids,
            shared.board,
            &mut completions,
            &settings.limits,
        );
        outbox.flush();
        outbox.sent
    }

    /// Nanoseconds on this worker's clock.
    fn now_ns(&self) -> u64 {
        duration_ns(self.clock.elapsed())
    }

    /// Polls one batch of receive completions, hands every accepted message to the state
    /// machine and re-posts the receives; returns how many datagrams came and how many of
    /// them were more than a CREDIT (which heartbeats are: they say a peer lives, not that
    /// anything is still moving).
    fn receive(
        &mut self,
        now_ns: u64,
        shared: &NodeShared<'_>,
        counters: &WorkerBlock,
    ) -> (usize, usize) {
        let received = self.transport.poll_recv(&mut self.completions);
        let mut moving = 0;
        for index in 0..received {
            let completion = self.completions[index];
            let payload = self.transport.recv_payload(&completion);
            if let Some(message) =
                Self::accept(&self.wire, self.index, &self.node, counters, payload)
            {
                moving += usize::from(message.header.kind != Kind::Credit);
                self.node
                    .handle(&message, now_ns, shared.replica, shared.board);
            }
        }
        // Receives go back before anything that can make peers send more.
        self.transport.post_recv(received);
        (received, moving)
    }

    /// The poll loop; once `shared.stop` is set it drains (see [`NodeShared::stop`]) and returns.
    pub fn run(&mut self, shared: &NodeShared<'_>) -> Result<(), WorkerError> {
        let counters = shared.block.worker(self.index);
        let mut settings = LiveSettings::read(shared.block);
        let mut knob_epoch = shared.block.knob_epoch();
        counters
            .gauges
            .knob_epoch_seen
            .store(knob_epoch, Ordering::Relaxed);
        let max_buffers = self.transport.caps().max_chain.min(MAX_CHAIN);
        let fan_out = self.peers.followers.iter().flatten().count();
        let mut idle_spins = 0u32;
        let mut iteration = 0u64;
        let mut drain_started_ns: Option<u64> = None;
        let mut last_received_ns = 0u64;
        let mut fell_behind = false;
        let mut node_serving = false;
        // When the node next has something to do without new input (0: at once), and what the
        // last advance sent.
        let mut next_deadline = 0u64;
        let mut last_sent = 0u64;
        loop {
            iteration += 1;
            let now_ns = self.now_ns();
            if shared.stop.load(Ordering::Relaxed) || fell_behind {
                let started = *drain_started_ns.get_or_insert(now_ns);
                let quiet = now_ns.saturating_sub(last_received_ns) >= duration_ns(DRAIN_QUIET)
                    && self.sessions.writing() == 0;
                let settled = self.node.settled(now_ns, duration_ns(DRAIN_QUIET));
                if (quiet && settled)
                    || fell_behind
                    || now_ns.saturating_sub(started) >= duration_ns(DRAIN_MAX)
                {
                    break;
                }
            }
            let epoch = shared.block.knob_epoch();
            let knobs_changed = epoch != knob_epoch;
            if knobs_changed {
                knob_epoch = epoch;
                settings = LiveSettings::read(shared.block);
                counters
                    .gauges
                    .knob_epoch_seen
                    .store(epoch, Ordering::Relaxed);
            }

            let (received, moving) = self.receive(now_ns, shared, counters);

            if !self.counted_serving && self.node.serving() {
                self.counted_serving = true;
                shared.serving.fetch_add(1, Ordering::AcqRel);
            }
            // Once every pipeline serves, the node does for good: stop reading the counter.
            node_serving =
                node_serving || shared.serving.load(Ordering::Relaxed) >= shared.pipelines;
            // A draining worker issues nothing new; a node catching up serves nothing yet.
            let issued = if drain_started_ns.is_some() || !node_serving {
                crate::workload::Issued::default()
            } else {
                self.issue(now_ns, &settings, shared)
            };
            counters.add(Counter::ReadsCompleted, issued.reads);
            // Advance only when it can do something: input came (a datagram, a write), the
            // last advance sent (it may have stopped at a full chain), the limits changed, the
            // worker drains, or a timer of the node's is due. A spin with none of these would
            // find nothing to do.
            let wake = received > 0
                || issued.writes > 0
                || last_sent > 0
                || knobs_changed
                || drain_started_ns.is_some()
                || now_ns >= next_deadline;
            let sent = if wake {
                let sent = self.advance(now_ns, &settings, shared, counters, max_buffers, fan_out);
                next_deadline = self.node.next_deadline(now_ns, &settings.limits);
                sent
            } else {
                0
            };
            last_sent = sent;
            fell_behind = self.node.fell_behind();
            let stats = self.node.stats();
            publish_stats(counters, &stats);
            if iteration % 1024 == 0 {
                self.publish_gauges(counters, shared.replica, &stats, now_ns, &settings.limits);
                self.refresh_peers(shared.block);
            }
            // Heartbeats never stop: the drain waits for the rest of the traffic to.
            if moving > 0 {
                last_received_ns = now_ns;
            }
            let idle = received == 0 && sent == 0 && issued.writes == 0;
            idle_spins = yield_when_idle(idle && !settings.busy_poll, idle_spins);
        }
        let now_ns = self.now_ns();
        let stats = self.node.stats();
        self.publish_gauges(counters, shared.replica, &stats, now_ns, &settings.limits);
        if std::env::var_os("RZAB_DEBUG_SUMMARY").is_some() {
            eprintln!(
                "{} | transport {:?}",
                self.summary(),
                self.transport.stats()
            );
        }
        if fell_behind {
            return Err(WorkerError::FellBehind(self.index));
        }
        Ok(())
    }

    /// Publishes what changes too slowly to be worth a store every iteration: the transport's
    /// drop count, the committed zxid and the heartbeat.
    fn publish_gauges(
        &self,
        counters: &WorkerBlock,
        replica: &NodeReplica,
        stats: &PipelineStats,
        now_ns: u64,
        limits: &Limits,
    ) {
        publish_elections(counters, &self.node.election_counters(now_ns));
        let applied = replica.applied_zxid();
        counters
            .gauges
            .leader_zxid
            .store(stats.leader_zxid.max(applied), Ordering::Relaxed);
        counters
            .gauges
            .set_leader(self.node.known_leader().map(u32::from), self.node.epoch());
        counters.gauges.sync_state.store(
            self.node.sync_state(now_ns, limits) as u64,
            Ordering::Relaxed,
        );
        let transport = self.transport.stats();
        counters.set(Counter::TransportDropsNoReceive, transport.dropped_no_recv);
        counters.set(Counter::TransportDropsOversize, transport.dropped_malformed);
        counters.set(Counter::TransportDropsHole, transport.holes_skipped);
        counters
            .gauges
            .applied_zxid
            .store(applied, Ordering::Relaxed);
        // Wall-clock time, so another process can tell how fresh it is.
        let wall_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(now_ns, |elapsed| {
                u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
            });
        counters
            .gauges
            .heartbeat_ns
            .store(wall_ns, Ordering::Relaxed);
    }

    /// A one-line summary of the pipeline, for diagnostics.
    pub fn summary(&self) -> String {
        self.node.summary()
    }
}
