//! One node's side of one pipeline as a single state machine: its role (the leader is state,
//! named at construction, not a constant), the leader it follows, the join handshake (hellos,
//! configuration fingerprints, refusals), and the routing of every accepted message to the
//! leader or follower logic. The worker loop, the fuzzing harness and the simulator all drive
//! this one type, in the style of quinn-proto: [`Node::handle`] a message, [`Node::advance`]
//! to `now`, read what it reports, and ask [`Node::next_deadline`] when advancing can next do
//! anything without new input, so a driver need not advance on every spin. Pure: no I/O, time
//! is an argument, nothing allocates after construction.

use rzab_shared::control_block::SyncState;
use rzab_shared::limits::MAX_NODES;

use super::election::{
    Election, ElectionLimits, ElectionStats, Notification, Outcome, PeerState, Vote,
};
use super::follower::{Follower, LeaderIdentity, Phase};
use super::leader::Leader;
use super::wire::{self, Kind, Message};
use super::{
    CatchupBoard, Completions, EntryMeta, EntryRing, History, LEADER_EPOCH, Limits, Outbox,
    PipelineConfig, PipelineStats, StateMachine, Target, ZXID_START, ZxidSource, hello_words,
    vote_words,
};

/// How often a joining follower says hello until the leader answers.
pub const HELLO_INTERVAL_NS: u64 = 1_000_000;

/// The role this node plays in the pipeline.
#[derive(Debug)]
pub enum Role {
    Leader(Box<Leader>),
    Follower(Box<Follower>),
}

impl Role {
    fn into_history(self) -> History {
        match self {
            Role::Leader(leader) => leader.into_history(),
            Role::Follower(follower) => follower.into_history(),
        }
    }

    fn last_zxid(&self) -> Option<u64> {
        match self {
            Role::Leader(leader) => leader.last_zxid(),
            Role::Follower(follower) => follower.last_zxid(),
        }
    }

    fn for_each_local_write(&self, each: impl FnMut(u16, u64, super::Txn<'_>)) {
        match self {
            Role::Leader(leader) => leader.for_each_local_write(each),
            Role::Follower(follower) => follower.for_each_local_write(each),
        }
    }
}

/// Where the node stands in ZAB's phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Broadcast: leading, or following (a follower that has not joined yet says hello).
    Broadcast,
    /// Electing a leader (the role of before is kept, not driven, for its history).
    Electing,
    /// Elected, waiting for a quorum to say hello (discovery) before it leads a new epoch.
    Discovering,
}

/// A follower's hello to this node, kept while it discovers.
#[derive(Clone, Copy, Debug)]
struct PeerHello {
    header: wire::Header,
    applied_zxid: u64,
    accepted_epoch: u32,
}

/// What the node counts of its elections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ElectionCounters {
    /// Elections this node started (its leader or its quorum lost).
    pub started: u64,
    /// Epochs this node began to lead after an election.
    pub won: u64,
    /// Nanoseconds this node spent without a leader it follows or a quorum it leads, in
    /// elections, discovery and joining.
    pub leaderless_ns: u64,
    /// Nanoseconds from the start of the last election to the broadcast phase.
    pub last_election_ns: u64,
    pub notifications: ElectionStats,
}

/// One node's state machine for one pipeline.
#[derive(Debug)]
pub struct Node {
    config: PipelineConfig,
    role: Role,
    leader_node: u8,
    /// Whether the cluster's start-up handshake is over: a hello after it comes from a
    /// restarted process, which catches up by snapshot.
    running: bool,
    /// Peers whose hello this node accepted (leader) or that answered it (follower), by bit.
    joined: u64,
    /// Followers whose hello carried another configuration: they get a refusal.
    refusals_due: u64,
    /// The last incompatible configuration seen: (node, its fingerprint).
    incompatible: Option<(u8, u64)>,
    refused_hellos: u64,
    last_hello_ns: Option<u64>,
    /// Leader election and recovery (one pipeline per node only: with several, node 0
    /// leads for good).
    election: Election,
    stage: Stage,
    stage_since_ns: u64,
    /// When the node lost its leader (or quorum), while it has none.
    leaderless_since_ns: Option<u64>,
    /// When the role of the moment began to join (a follower) or lead.
    role_since_ns: Option<u64>,
    /// Zab's acceptedEpoch (the highest epoch it agreed to follow or lead) and currentEpoch
    /// (the epoch whose history it holds).
    accepted_epoch: u32,
    current_epoch: u32,
    /// The node whose epoch `accepted_epoch` is: another node's answer in that same epoch is
    /// refused (two elected nodes that counted on this one may both have chosen it).
    accepted_from: Option<u8>,
    /// Discovery: the hellos of peers that follow this elected node.
    hellos: [Option<PeerHello>; MAX_NODES],
    /// This node's writes not yet applied when the role changed, to submit to the next role:
    /// by session, with their sequences.
    carried: EntryRing,
    carried_seqs: Vec<u64>,
    /// The zxids a follower held past its applied point when its role changed (counted as
    /// truncated if the new leader's history ends before them).
    held_unapplied: Vec<u64>,
    scratch: Vec<u8>,
    /// What this node applied when its role last changed: a joining follower's hellos say
    /// it (0 at the start: the leader of the start sends no snapshot then).
    hello_applied_zxid: u64,
    counters: ElectionCounters,
    /// When the last election began.
    election_began_ns: u64,
    truncated: u64,
    /// The leader of the start heard a hello from a follower that had applied transactions:
    /// it was restarted into a running cluster and elects (see [`Node::handle`]).
    history_seen: bool,
}

fn bit(node: u8) -> u64 {
    1u64 << u32::from(node).min(63)
}

/// The header words of a VOTE carrying `notification`.
fn vote_words_of(notification: &Notification, fingerprint: u64) -> [u64; wire::WORDS] {
    let state = match notification.state {
        PeerState::Looking => 0u64,
        PeerState::Following => 1,
        PeerState::Leading => 2,
    };
    let mut words = [0u64; wire::WORDS];
    words[vote_words::LEADER_STATE_EPOCH] = u64::from(notification.vote.leader)
        | (state << 8)
        | (u64::from(notification.vote.epoch) << 32);
    words[vote_words::ZXID] = notification.vote.zxid;
    words[vote_words::ROUND] = notification.round;
    words[vote_words::FINGERPRINT] = fingerprint;
    words
}

/// The notification a VOTE carries; `None` for one that cannot be (an unknown state).
fn notification_of(header: &wire::Header) -> Option<Notification> {
    let packed = header.words[vote_words::LEADER_STATE_EPOCH];
    let state = match (packed >> 8) & 0xff {
        0 => PeerState::Looking,
        1 => PeerState::Following,
        2 => PeerState::Leading,
        _ => return None,
    };
    if packed & 0xffff_0000 != 0 {
        return None;
    }
    Some(Notification {
        vote: Vote {
            leader: u8::try_from(packed & 0xff).ok()?,
            zxid: header.words[vote_words::ZXID],
            epoch: u32::try_from(packed >> 32).ok()?,
        },
        round: header.words[vote_words::ROUND],
        state,
        incarnation: header.instance,
    })
}

fn election_limits(limits: &Limits) -> ElectionLimits {
    let finalize_wait_ns = limits.finalize_wait_ns;
    ElectionLimits {
        finalize_wait_ns,
        retransmit_ns: (finalize_wait_ns / 4).max(50_000),
        round_timeout_ns: finalize_wait_ns
            .saturating_mul(50)
            .max(limits.election_timeout_ns)
            .max(50_000_000),
    }
}

impl Node {
    /// The state machine of `config.node` in a cluster led by `leader_node` at its start.
    pub fn new(config: PipelineConfig, leader_node: u8) -> Node {
        let role = if config.node == leader_node {
            Role::Leader(Box::new(Leader::new(config)))
        } else {
            Role::Follower(Box::new(Follower::new(config)))
        };
        let election = Election::new(
            config.node,
            config.nodes.max(1),
            ZXID_START,
            LEADER_EPOCH,
            election_limits(&Limits::default()),
        )
        .map_or_else(
            |_| {
                // Refused only for a node outside its cluster, which `validate` rules out.
                Election::new(0, 1, ZXID_START, LEADER_EPOCH, ElectionLimits::default())
                    .unwrap_or_else(|_| unreachable!("one node is a valid cluster"))
            },
            |election| election.with_incarnation(config.instance),
        )
        .established(leader_node, ZXID_START, LEADER_EPOCH);
        let sessions = config.sessions.max(1);
        let fragments = config.max_fragments();
        Node {
            config,
            role,
            leader_node,
            running: false,
            joined: bit(config.node),
            refusals_due: 0,
            incompatible: None,
            refused_hellos: 0,
            last_hello_ns: None,
            election,
            stage: Stage::Broadcast,
            stage_since_ns: 0,
            leaderless_since_ns: None,
            role_since_ns: None,
            accepted_epoch: 0,
            current_epoch: LEADER_EPOCH,
            accepted_from: None,
            hellos: [None; MAX_NODES],
            carried: EntryRing::new(sessions * fragments, config.slot_len),
            carried_seqs: vec![0; sessions],
            held_unapplied: Vec::with_capacity(config.window),
            scratch: vec![0; config.max_txn_len],
            hello_applied_zxid: 0,
            counters: ElectionCounters::default(),
            election_began_ns: 0,
            truncated: 0,
            history_seen: false,
        }
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_)) && self.stage == Stage::Broadcast
    }

    /// The node that leads this pipeline (the last known while electing).
    pub fn leader_node(&self) -> u8 {
        self.leader_node
    }

    /// The node this pipeline takes as its leader, once that is known: itself on the leader,
    /// the node that answered its hello on a follower.
    pub fn known_leader(&self) -> Option<u8> {
        if self.stage != Stage::Broadcast {
            return None;
        }
        match &self.role {
            Role::Leader(_) => Some(self.leader_node),
            Role::Follower(follower) => follower.leader().map(|leader| leader.node),
        }
    }

    /// The epoch this pipeline's messages speak in.
    pub fn epoch(&self) -> u32 {
        self.config.epoch
    }

    /// Where the node stands: broadcast, electing or discovering.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// What the node counted of its elections.
    pub fn election_counters(&self, now_ns: u64) -> ElectionCounters {
        let mut counters = self.counters;
        counters.notifications = self.election.stats();
        if let Some(since) = self.leaderless_since_ns {
            counters.leaderless_ns += now_ns.saturating_sub(since);
        }
        counters
    }

    /// The leader process this follower follows, once its hello was answered.
    pub fn leader(&self) -> Option<LeaderIdentity> {
        match &self.role {
            Role::Leader(_) => None,
            Role::Follower(follower) => follower.leader(),
        }
    }

    /// Whether `node` has joined this pipeline (its hello accepted, or its answer taken).
    pub fn joined(&self, node: u8) -> bool {
        self.joined & bit(node) != 0
    }

    /// The last peer seen with another configuration: (node, its fingerprint).
    pub fn incompatible(&self) -> Option<(u8, u64)> {
        self.incompatible
    }

    /// The start-up handshake is over: later hellos come from restarted processes.
    pub fn set_running(&mut self) {
        self.running = true;
    }

    /// Whether the node has a place in a cluster: a leader of the start whose every
    /// follower in `awaited` joined, an elected leader, or a follower its leader answered.
    pub fn handshake_done(&self, awaited: impl Fn(u8) -> bool) -> bool {
        if self.stage != Stage::Broadcast {
            return false;
        }
        match &self.role {
            Role::Leader(_) if self.counters.won > 0 => true,
            Role::Leader(_) => (0..self.config.nodes)
                .filter(|node| *node != self.config.node && awaited(*node))
                .all(|node| self.joined(node)),
            Role::Follower(follower) => follower.phase() != Phase::Joining,
        }
    }

    /// Whether a (non-hello) message comes from a process this pipeline joined; hellos and
    /// votes come from anyone (they are how processes become known).
    pub fn knows(&self, header: &wire::Header) -> bool {
        if matches!(header.kind, Kind::Hello | Kind::Vote) {
            return true;
        }
        if self.stage != Stage::Broadcast {
            return false;
        }
        match &self.role {
            Role::Leader(leader) => leader.knows(header),
            Role::Follower(follower) => follower.knows(header),
        }
    }

    /// Handles one accepted message: votes go to the election, hellos join (or are
    /// refused), the rest to the role.
    pub fn handle(
        &mut self,
        message: &Message<'_>,
        now_ns: u64,
        replica: &impl StateMachine,
        board: &CatchupBoard,
    ) {
        match message.header.kind {
            Kind::Vote => return self.handle_vote(&message.header, now_ns),
            Kind::Hello => {}
            _ if self.stage != Stage::Broadcast => {
                self.refused_hellos += 1;
                return;
            }
            // Repeated by their followers once the start-up handshake is over.
            Kind::Write if self.bootstrapping() => {
                self.refused_hellos += 1;
                return;
            }
            _ => {
                match &mut self.role {
                    Role::Leader(leader) => leader.handle(message, now_ns),
                    Role::Follower(follower) => follower.handle(message, now_ns, replica),
                }
                return;
            }
        }
        let header = &message.header;
        if header.from_node == self.config.node {
            // A hello in this node's own name (corrupt, or replayed from an earlier process of
            // it): never answered, as an answer would go to this node itself (found by
            // fuzzing: a refusal was sent to the leader's own node).
            self.refused_hellos += 1;
            return;
        }
        let theirs = header.words[hello_words::FINGERPRINT];
        if theirs != self.config.fingerprint {
            self.incompatible = Some((header.from_node, theirs));
            if self.is_leader() {
                // Answered, so the follower learns of it and stops with a clear error instead
                // of waiting out its timeout.
                self.refusals_due |= bit(header.from_node);
                if self.running {
                    self.refused_hellos += 1;
                }
            }
            return;
        }
        if self.bootstrapping() && header.words[hello_words::APPLIED_ZXID] > ZXID_START {
            // A follower that has applied transactions: the cluster ran before this process
            // started, so this is node 0 restarted, and it has no log. It must not lead epoch
            // 1 again (it would give zxids the cluster committed): it elects instead.
            self.history_seen = true;
            self.refused_hellos += 1;
            return;
        }
        if self.stage == Stage::Discovering {
            let Ok(accepted_epoch) = u32::try_from(header.words[hello_words::ACCEPTED_EPOCH])
            else {
                self.refused_hellos += 1;
                return;
            };
            self.hellos[usize::from(header.from_node)] = Some(PeerHello {
                header: *header,
                applied_zxid: header.words[hello_words::APPLIED_ZXID],
                accepted_epoch,
            });
            return;
        }
        if self.stage != Stage::Broadcast {
            self.refused_hellos += 1;
            return;
        }
        let takes_it = match &self.role {
            Role::Leader(_) => true,
            // Later answers repeat the first: nothing new. An answer in an epoch below one
            // this node accepted is from a leader a quorum has gone past (Zab's rule); one in
            // the epoch it accepted, only from the node it accepted it from (rejoining it).
            Role::Follower(follower) => {
                header.from_node == self.leader_node
                    && follower.phase() == Phase::Joining
                    && (header.epoch > self.accepted_epoch
                        || (header.epoch == self.accepted_epoch
                            && self.accepted_from == Some(header.from_node)))
            }
        };
        if takes_it {
            self.join(header, now_ns, self.running, replica, board);
        }
    }

    /// Joins the sender of a hello (a leader's: of its answer); `catch_up` makes a leader
    /// bring a new follower instance to its history (by DIFF or snapshot).
    fn join(
        &mut self,
        header: &wire::Header,
        now_ns: u64,
        catch_up: bool,
        replica: &impl StateMachine,
        board: &CatchupBoard,
    ) {
        match &mut self.role {
            Role::Leader(leader) => {
                // The start pseq it answers with is sent by `send_hello_replies`.
                let _ = leader.accept_hello(
                    header.from_node,
                    header.instance,
                    now_ns,
                    catch_up,
                    (
                        header.words[hello_words::APPLIED_ZXID],
                        header.words[hello_words::JOIN],
                    ),
                    board,
                    replica,
                );
            }
            Role::Follower(follower) => {
                follower.start(header, replica.applied_zxid());
                self.accepted_epoch = self.accepted_epoch.max(header.epoch);
                self.accepted_from = Some(header.from_node);
                self.config.epoch = header.epoch;
                let history_end = header.words[hello_words::HISTORY_END];
                let truncated = self
                    .held_unapplied
                    .iter()
                    .filter(|zxid| **zxid > history_end)
                    .count();
                self.truncated += truncated as u64;
                self.held_unapplied.clear();
                self.end_leaderless(now_ns);
            }
        }
        self.joined |= bit(header.from_node);
    }

    /// Joins the sender of `header` as if its hello (a leader's: its answer) had been taken
    /// during the start-up handshake, at pseq 0. Only for harnesses that replay traffic
    /// captured from another run, whose process instances they cannot know beforehand.
    #[doc(hidden)]
    pub fn introduce(
        &mut self,
        header: &wire::Header,
        now_ns: u64,
        replica: &impl StateMachine,
        board: &CatchupBoard,
    ) {
        // As an answer at the start: pseq 0, no snapshot.
        let mut answer = *header;
        answer.words = [0; wire::WORDS];
        self.accepted_epoch = 0;
        self.accepted_from = None;
        self.join(&answer, now_ns, false, replica, board);
    }

    /// The handshake's part of a step: a joining follower says hello (every
    /// [`HELLO_INTERVAL_NS`]); a leader refuses incompatible followers and answers hellos.
    pub fn advance_join(&mut self, now_ns: u64, outbox: &mut impl Outbox) {
        self.send_refusals(outbox);
        if self.stage != Stage::Broadcast {
            return;
        }
        match &mut self.role {
            Role::Leader(leader) => leader.send_hello_replies(outbox),
            Role::Follower(follower) => {
                if follower.phase() != Phase::Joining
                    || self
                        .last_hello_ns
                        .is_some_and(|sent| now_ns.saturating_sub(sent) < HELLO_INTERVAL_NS)
                {
                    return;
                }
                let Some(buffer) = outbox.buffer() else {
                    return;
                };
                // The applied zxid is the election's last known (set at each role change);
                // 0 lets the leader choose a snapshot, as for a new process.
                let words = follower.hello_words(
                    self.hello_applied_zxid,
                    self.accepted_epoch,
                    self.counters.started,
                );
                let header = self.config.header(Kind::Hello, 0, 0, words);
                wire::put_header(buffer, &header);
                outbox.send(Target::Leader, Kind::Hello, wire::HEADER_BYTES, 0);
                self.last_hello_ns = Some(now_ns);
            }
        }
    }

    fn send_refusals(&mut self, outbox: &mut impl Outbox) {
        while self.refusals_due != 0 {
            let node = self.refusals_due.trailing_zeros();
            let Some(buffer) = outbox.buffer() else {
                return;
            };
            let mut words = [0u64; wire::WORDS];
            words[hello_words::FINGERPRINT] = self.config.fingerprint;
            wire::put_header(buffer, &self.config.header(Kind::Hello, 0, 0, words));
            let target = Target::Follower(u8::try_from(node).unwrap_or(u8::MAX));
            outbox.send(target, Kind::Hello, wire::HEADER_BYTES, 0);
            self.refusals_due &= self.refusals_due - 1;
        }
    }

    /// Runs everything that can make progress at `now_ns`: the election (votes, failure
    /// detection, discovery) and the role's `advance`.
    #[allow(clippy::too_many_arguments)]
    pub fn advance(
        &mut self,
        now_ns: u64,
        outbox: &mut impl Outbox,
        replica: &impl StateMachine,
        zxids: &ZxidSource,
        board: &CatchupBoard,
        completions: &mut impl Completions,
        limits: &Limits,
    ) {
        self.send_refusals(outbox);
        if self.failover(limits) {
            self.advance_election(now_ns, outbox, replica, zxids, board, limits);
        }
        if self.stage != Stage::Broadcast {
            return;
        }
        match &mut self.role {
            Role::Leader(leader) => {
                leader.advance(now_ns, outbox, replica, zxids, board, completions, limits);
                if leader.epoch_backed() {
                    self.current_epoch = self.current_epoch.max(self.config.epoch);
                }
            }
            Role::Follower(follower) => {
                if follower.phase() == Phase::Joining {
                    self.advance_join(now_ns, outbox);
                    return;
                }
                follower.advance(now_ns, outbox, replica, completions, limits);
                if follower.phase() == Phase::Serving {
                    let epoch = self.config.epoch;
                    self.current_epoch = self.current_epoch.max(epoch);
                }
            }
        }
    }

    /// Queues a write of one of this node's sessions; false when it cannot be taken now.
    /// Submits a transaction of one of this node's sessions (exactly the configured length);
    /// false when it cannot be taken now.
    pub fn submit_write(&mut self, session: u16, session_seq: u64, txn: &[u8]) -> bool {
        if self.stage != Stage::Broadcast || self.bootstrapping() {
            return false;
        }
        match &mut self.role {
            Role::Leader(leader) => leader.submit_write(session, session_seq, txn),
            Role::Follower(follower) => follower.submit_write(session, session_seq, txn),
        }
    }

    pub fn stats(&self) -> PipelineStats {
        let mut stats = match &self.role {
            Role::Leader(leader) => leader.stats(),
            Role::Follower(follower) => follower.stats(),
        };
        stats.dropped_unexpected += self.refused_hellos;
        stats.truncated += self.truncated;
        stats
    }

    /// Whether this pipeline serves local reads (a follower once it has caught up).
    pub fn serving(&self) -> bool {
        if self.stage != Stage::Broadcast {
            return false;
        }
        match &self.role {
            Role::Leader(_) => true,
            Role::Follower(follower) => follower.phase() == Phase::Serving,
        }
    }

    /// Whether the leader left this follower behind: only a new process can catch up.
    pub fn fell_behind(&self) -> bool {
        match &self.role {
            Role::Leader(_) => false,
            Role::Follower(follower) => follower.phase() == Phase::FellBehind,
        }
    }

    /// Whether nothing is left in flight (a leader: towards followers heard from within
    /// `within_ns`).
    pub fn settled(&self, now_ns: u64, within_ns: u64) -> bool {
        if self.stage != Stage::Broadcast {
            return true;
        }
        match &self.role {
            Role::Leader(leader) => leader.settled(now_ns, within_ns),
            Role::Follower(follower) => follower.settled(),
        }
    }

    /// What the node reports of this pipeline: a leader that hears from no quorum, or a
    /// follower that hears nothing from its leader, within the peer timeout says so.
    pub fn sync_state(&self, now_ns: u64, limits: &Limits) -> SyncState {
        if self.stage != Stage::Broadcast {
            return SyncState::Electing;
        }
        match &self.role {
            Role::Leader(leader) => {
                if leader.quorum_visible(now_ns, limits.peer_timeout_ns) {
                    SyncState::Serving
                } else {
                    SyncState::NoQuorum
                }
            }
            Role::Follower(follower) => match follower.phase() {
                Phase::Joining if self.running => SyncState::Electing,
                Phase::Joining => SyncState::Starting,
                Phase::FellBehind => SyncState::FellBehind,
                _ if !follower.leader_visible(now_ns, limits.peer_timeout_ns) => {
                    SyncState::NoLeader
                }
                Phase::CatchingUp => SyncState::CatchingUp,
                Phase::Serving => SyncState::Serving,
            },
        }
    }

    /// A one-line summary of the pipeline's positions and credits, for diagnostics.
    pub fn summary(&self) -> String {
        let role = match &self.role {
            Role::Leader(leader) => leader.summary(),
            Role::Follower(follower) => follower.summary(),
        };
        format!(
            "{:?} epoch {} accepted {} current {} {:?} | {role}",
            self.stage, self.config.epoch, self.accepted_epoch, self.current_epoch, self.election
        )
    }

    /// The earliest time at which [`Node::advance`] (for a joining follower,
    /// [`Node::advance_join`]) could do something it would not do at `now_ns` without new
    /// input: a message handled or a write submitted. `now_ns` or earlier means there is work
    /// at once (refusals or hello answers due, writes to prepare or forward, commits to send,
    /// entries to apply, acknowledgements, CREDITs, NACKs, repairs, snapshot chunks, votes);
    /// otherwise it is the first of the timers (retransmission and credit timeouts,
    /// heartbeats, grace periods, write repeats, hellos, the election's), or `u64::MAX` when
    /// only input can bring work. A driver may skip the advance until then: an early deadline
    /// costs an advance that finds nothing, never a late one. Pure, and allocates nothing.
    pub fn next_deadline(&self, now_ns: u64, limits: &Limits) -> u64 {
        if self.refusals_due != 0 {
            return now_ns;
        }
        let election = if self.failover(limits) {
            self.election_deadline(now_ns, limits)
        } else {
            u64::MAX
        };
        if self.stage != Stage::Broadcast {
            return election;
        }
        let role = match &self.role {
            Role::Leader(leader) => leader.next_deadline(now_ns, limits),
            Role::Follower(follower) if follower.phase() == Phase::Joining => {
                self.last_hello_ns.map_or(now_ns, |sent| {
                    super::due_at(now_ns, sent, HELLO_INTERVAL_NS)
                })
            }
            Role::Follower(follower) => follower.next_deadline(now_ns, limits),
        };
        role.min(election)
    }
}

impl Node {
    /// Whether this node elects a new leader when it loses its own: with one pipeline per
    /// node and a timeout set (several pipelines would have to change roles together, which
    /// is not built yet: node 0 leads them for good).
    fn failover(&self, limits: &Limits) -> bool {
        limits.election_timeout_ns > 0 && self.config.pipelines == 1 && self.config.nodes > 1
    }

    /// Whether this is the leader of the start (node 0, epoch 1) before every node joined it.
    /// It orders no write until then: a process restarted without its log takes itself for
    /// that leader, and a restarted follower may join it; were the two to commit in epoch 1,
    /// they would reuse zxids the cluster already committed. A real start has every node.
    fn bootstrapping(&self) -> bool {
        matches!(self.role, Role::Leader(_)) && !self.running && self.counters.won == 0
    }

    /// How long a joining follower waits for its leader's answer before electing: the
    /// election timeout once the node ran or elected, the start-up grace before.
    fn startup_wait(&self, limits: &Limits) -> u64 {
        if self.running || self.counters.started > 0 {
            limits.election_timeout_ns
        } else {
            limits.startup_grace_ns.max(limits.election_timeout_ns)
        }
    }

    fn handle_vote(&mut self, header: &wire::Header, now_ns: u64) {
        if header.words[vote_words::FINGERPRINT] != self.config.fingerprint {
            self.incompatible = Some((header.from_node, header.words[vote_words::FINGERPRINT]));
            self.refused_hellos += 1;
            return;
        }
        match notification_of(header) {
            Some(notification) => self
                .election
                .handle(header.from_node, &notification, now_ns),
            None => self.refused_hellos += 1,
        }
    }

    /// Failure detection, the election's steps and discovery, and the votes they send.
    fn advance_election(
        &mut self,
        now_ns: u64,
        outbox: &mut impl Outbox,
        replica: &impl StateMachine,
        zxids: &ZxidSource,
        board: &CatchupBoard,
        limits: &Limits,
    ) {
        self.election.set_limits(election_limits(limits));
        let timeout = limits.election_timeout_ns;
        let expired = now_ns.saturating_sub(self.stage_since_ns) >= timeout;
        let lost = self.stage == Stage::Broadcast && self.leader_lost(now_ns, limits);
        match self.stage {
            Stage::Broadcast if lost => self.start_election(now_ns, replica),
            // Elected, but no quorum came to follow within the timeout: elect again.
            Stage::Discovering if expired => self.start_election(now_ns, replica),
            Stage::Discovering => self.try_lead(now_ns, replica, zxids, board),
            _ => {}
        }
        let outcome = self.election.advance(now_ns);
        if self.stage == Stage::Electing {
            match outcome {
                Some(Outcome::Lead { .. }) => {
                    self.stage = Stage::Discovering;
                    self.stage_since_ns = now_ns;
                    self.hellos = [None; MAX_NODES];
                    self.try_lead(now_ns, replica, zxids, board);
                }
                Some(Outcome::Follow { leader }) => self.follow(leader, now_ns, replica),
                None => {}
            }
        }
        self.send_votes(now_ns, outbox);
    }

    fn send_votes(&mut self, now_ns: u64, outbox: &mut impl Outbox) {
        let fingerprint = self.config.fingerprint;
        if self.election.next_deadline(now_ns) > now_ns {
            return;
        }
        if let Some(buffer) = outbox.buffer() {
            if let Some(notification) = self.election.outgoing(now_ns) {
                let words = vote_words_of(&notification, fingerprint);
                let header = self.config.header(Kind::Vote, 0, 0, words);
                wire::put_header(buffer, &header);
                outbox.send(Target::AllFollowers, Kind::Vote, wire::HEADER_BYTES, 0);
            }
        }
        loop {
            let Some(buffer) = outbox.buffer() else {
                return;
            };
            let Some((peer, notification)) = self.election.answer() else {
                return;
            };
            let words = vote_words_of(&notification, fingerprint);
            let header = self.config.header(Kind::Vote, 0, 0, words);
            wire::put_header(buffer, &header);
            outbox.send(Target::Follower(peer), Kind::Vote, wire::HEADER_BYTES, 0);
        }
    }

    /// Whether the node has lost its leader (a follower that hears nothing from it, or whose
    /// hello goes unanswered) or its quorum (a leader), for the election timeout.
    fn leader_lost(&mut self, now_ns: u64, limits: &Limits) -> bool {
        let timeout = limits.election_timeout_ns;
        let since = *self.role_since_ns.get_or_insert(now_ns);
        match &self.role {
            Role::Leader(leader) if self.running || self.counters.won > 0 => {
                now_ns.saturating_sub(since) >= timeout && !leader.quorum_visible(now_ns, timeout)
            }
            // The leader of the start that not every node joins: most likely node 0 restarted
            // into a cluster that elected another leader, which no follower's hello names.
            Role::Leader(_) => {
                self.history_seen
                    || (now_ns.saturating_sub(since) >= self.startup_wait(limits).saturating_mul(2)
                        && self.joined.count_ones() < u32::from(self.config.nodes))
            }
            Role::Follower(follower) => match follower.phase() {
                Phase::Joining => now_ns.saturating_sub(since) >= self.startup_wait(limits),
                Phase::FellBehind => false,
                Phase::CatchingUp | Phase::Serving => !follower.leader_visible(now_ns, timeout),
            },
        }
    }

    /// Gives up the leader (or the quorum) and looks for a new one, with this node's log.
    fn start_election(&mut self, now_ns: u64, replica: &impl StateMachine) {
        if self.stage == Stage::Broadcast {
            self.counters.started += 1;
            self.election_began_ns = now_ns;
            self.leaderless_since_ns.get_or_insert(now_ns);
            self.carry_local_writes();
        }
        let last_zxid = self
            .role
            .last_zxid()
            .unwrap_or(0)
            .max(replica.applied_zxid());
        self.election.update_log(last_zxid, self.current_epoch);
        self.election.start(now_ns);
        self.stage = Stage::Electing;
        self.stage_since_ns = now_ns;
    }

    /// Keeps this node's writes that are not applied yet, to submit to the next role.
    fn carry_local_writes(&mut self) {
        self.carried_seqs.fill(0);
        let fragments = self.config.max_fragments() as u64;
        let (carried, seqs, scratch) =
            (&mut self.carried, &mut self.carried_seqs, &mut self.scratch);
        self.role.for_each_local_write(|session, seq, txn| {
            let Some(slot) = seqs.get_mut(usize::from(session)) else {
                return;
            };
            let len = txn.copy_to(scratch);
            let meta = EntryMeta::local_write(0, session, seq);
            carried.put_txn(u64::from(session) * fragments, meta, &scratch[..len]);
            *slot = seq;
        });
    }

    /// Submits the carried writes to the role just built.
    fn resubmit_carried(&mut self) {
        let fragments = self.config.max_fragments() as u64;
        for session in 0..self.carried_seqs.len() {
            let seq = std::mem::take(&mut self.carried_seqs[session]);
            let Ok(session) = u16::try_from(session) else {
                break;
            };
            if seq == 0 {
                continue;
            }
            let position = u64::from(session) * fragments;
            let len = self.carried.txn(position).copy_to(&mut self.scratch);
            let txn = &self.scratch[..len];
            let _ = match &mut self.role {
                Role::Leader(leader) => leader.submit_write(session, seq, txn),
                Role::Follower(follower) => follower.submit_write(session, seq, txn),
            };
        }
    }

    /// The history of the role that ends; the zxids it held past its applied point are
    /// kept to count what the next leader truncates.
    fn take_history(&mut self) -> History {
        let placeholder = Role::Follower(Box::new(Follower::placeholder(&self.config)));
        let history = std::mem::replace(&mut self.role, placeholder).into_history();
        self.held_unapplied.clear();
        let mut position = history.applied;
        while position < history.end && self.held_unapplied.len() < self.held_unapplied.capacity() {
            let meta = history.ring.meta(position);
            self.held_unapplied.push(meta.zxid);
            position += u64::from(self.config.fragments_of(meta.txn_len as usize)).max(1);
        }
        history
    }

    /// Follows `leader`: a new follower pipeline that says hello to it.
    fn follow(&mut self, leader: u8, now_ns: u64, replica: &impl StateMachine) {
        let history = self.take_history();
        self.role = Role::Follower(Box::new(Follower::with_history(self.config, history)));
        self.resubmit_carried();
        self.leader_node = leader;
        self.stage = Stage::Broadcast;
        self.stage_since_ns = now_ns;
        self.role_since_ns = Some(now_ns);
        self.last_hello_ns = None;
        self.joined = bit(self.config.node);
        self.hello_applied_zxid = replica.applied_zxid();
    }

    /// Discovery: once a quorum (with this node) said hello, leads an epoch above every one
    /// they accepted, from this node's history, and brings each to it.
    fn try_lead(
        &mut self,
        now_ns: u64,
        replica: &impl StateMachine,
        zxids: &ZxidSource,
        board: &CatchupBoard,
    ) {
        let followers = self.hellos.iter().flatten().count();
        if followers + 1 < usize::from(self.config.nodes) / 2 + 1 {
            return;
        }
        let highest = self
            .hellos
            .iter()
            .flatten()
            .map(|hello| hello.accepted_epoch)
            .fold(
                self.accepted_epoch
                    .max(self.current_epoch)
                    .max(self.config.epoch),
                u32::max,
            );
        let Some(epoch) = highest.checked_add(1) else {
            // Epochs are spent (only a corrupt or hostile hello claims one so high): leading
            // one again would share it with another leader.
            return;
        };
        self.accepted_epoch = epoch;
        self.accepted_from = Some(self.config.node);
        self.config.epoch = epoch;
        let history = self.take_history();
        let mut leader = Leader::with_history(self.config, history);
        // Its current epoch once a quorum has accepted the epoch (see `advance`).
        leader.await_epoch_backers();
        zxids.begin_epoch(epoch);
        self.joined = bit(self.config.node);
        for hello in self.hellos.iter().flatten() {
            let _ = leader.accept_hello(
                hello.header.from_node,
                hello.header.instance,
                now_ns,
                true,
                (hello.applied_zxid, hello.header.words[hello_words::JOIN]),
                board,
                replica,
            );
            self.joined |= bit(hello.header.from_node);
        }
        self.hellos = [None; MAX_NODES];
        self.role = Role::Leader(Box::new(leader));
        self.resubmit_carried();
        self.leader_node = self.config.node;
        self.stage = Stage::Broadcast;
        self.stage_since_ns = now_ns;
        self.role_since_ns = Some(now_ns);
        self.running = true;
        self.counters.won += 1;
        self.end_leaderless(now_ns);
    }

    /// The node has a leader (or leads) again.
    fn end_leaderless(&mut self, now_ns: u64) {
        if let Some(since) = self.leaderless_since_ns.take() {
            self.counters.leaderless_ns += now_ns.saturating_sub(since);
            self.counters.last_election_ns = now_ns.saturating_sub(self.election_began_ns);
        }
    }

    /// When the election part of [`Node::advance`] next has something to do.
    fn election_deadline(&self, now_ns: u64, limits: &Limits) -> u64 {
        let timeout = limits.election_timeout_ns;
        let votes = self.election.next_deadline(now_ns);
        let stage = match self.stage {
            Stage::Electing => u64::MAX,
            Stage::Discovering => super::due_at(now_ns, self.stage_since_ns, timeout),
            Stage::Broadcast => {
                let Some(since) = self.role_since_ns else {
                    return now_ns;
                };
                match &self.role {
                    // Heard-from times move with every message: check at the heartbeat pace.
                    Role::Leader(_) => super::due_at(now_ns, since, timeout)
                        .max(now_ns.saturating_add(limits.heartbeat_interval_ns.min(timeout) / 2)),
                    Role::Follower(follower) => match follower.phase() {
                        Phase::Joining => super::due_at(now_ns, since, self.startup_wait(limits)),
                        Phase::FellBehind => u64::MAX,
                        _ => now_ns.saturating_add((timeout / 4).max(1)),
                    },
                }
            }
        };
        votes.min(stage)
    }
}

#[cfg(test)]
mod deadline_tests {
    use super::*;
    use crate::zab::test_support::*;

    #[test]
    fn a_joining_follower_is_due_at_each_hello_interval() {
        let config = small_config(1, 4, 7);
        let limits = Limits::default();
        let mut node = Node::new(config, 0);
        let mut outbox = Recording(vec![0; 1024], Vec::new());
        assert_eq!(node.next_deadline(500, &limits), 500);
        node.advance_join(500, &mut outbox);
        assert_eq!(outbox.1, [Kind::Hello]);
        assert_eq!(node.next_deadline(600, &limits), 500 + HELLO_INTERVAL_NS);
        node.advance_join(499 + HELLO_INTERVAL_NS, &mut outbox);
        assert_eq!(outbox.1.len(), 1, "no hello before the interval");
    }
}
