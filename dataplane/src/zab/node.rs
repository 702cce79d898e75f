//! One node's side of one pipeline as a single state machine: its role (the leader is state,
//! named at construction, not a constant), the leader it follows, the join handshake (hellos,
//! configuration fingerprints, refusals), and the routing of every accepted message to the
//! leader or follower logic. The worker loop, the fuzzing harness and the simulator all drive
//! this one type, in the style of quinn-proto: [`Node::handle`] a message, [`Node::advance`]
//! to `now`, read what it reports, and ask [`Node::next_deadline`] when advancing can next do
//! anything without new input, so a driver need not advance on every spin. Pure: no I/O, time
//! is an argument, nothing allocates after construction.

use rzab_shared::control_block::SyncState;

use super::follower::{Follower, LeaderIdentity, Phase};
use super::leader::Leader;
use super::wire::{self, Kind, Message};
use super::{
    CatchupBoard, Completions, Limits, Outbox, PipelineConfig, PipelineStats, StateMachine, Target,
    ZxidSource, hello_words,
};

/// How often a joining follower says hello until the leader answers.
pub const HELLO_INTERVAL_NS: u64 = 10_000_000;

/// The role this node plays in the pipeline.
#[derive(Debug)]
pub enum Role {
    Leader(Box<Leader>),
    Follower(Box<Follower>),
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
}

fn bit(node: u8) -> u64 {
    1u64 << u32::from(node).min(63)
}

impl Node {
    /// The state machine of `config.node` in a cluster led by `leader_node`.
    pub fn new(config: PipelineConfig, leader_node: u8) -> Node {
        let role = if config.node == leader_node {
            Role::Leader(Box::new(Leader::new(config)))
        } else {
            Role::Follower(Box::new(Follower::new(config)))
        };
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
        }
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_))
    }

    /// The node that leads this pipeline.
    pub fn leader_node(&self) -> u8 {
        self.leader_node
    }

    /// The node this pipeline takes as its leader, once that is known: itself on the leader,
    /// the node that answered its hello on a follower.
    pub fn known_leader(&self) -> Option<u8> {
        match &self.role {
            Role::Leader(_) => Some(self.leader_node),
            Role::Follower(follower) => follower.leader().map(|leader| leader.node),
        }
    }

    /// The epoch this pipeline's messages speak in.
    pub fn epoch(&self) -> u32 {
        self.config.epoch
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

    /// Whether a (non-hello) message comes from a process this pipeline joined.
    pub fn knows(&self, header: &wire::Header) -> bool {
        match &self.role {
            Role::Leader(leader) => leader.knows(header),
            Role::Follower(follower) => follower.knows(header),
        }
    }

    /// Handles one accepted message: hellos join (or are refused), the rest go to the role.
    pub fn handle(
        &mut self,
        message: &Message<'_>,
        now_ns: u64,
        replica: &impl StateMachine,
        board: &CatchupBoard,
    ) {
        if message.header.kind != Kind::Hello {
            match &mut self.role {
                Role::Leader(leader) => leader.handle(message, now_ns),
                Role::Follower(follower) => follower.handle(message, now_ns, replica),
            }
            return;
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
        let takes_it = match &self.role {
            Role::Leader(_) => true,
            // Later answers repeat the first: nothing new.
            Role::Follower(follower) => {
                header.from_node == self.leader_node && follower.phase() == Phase::Joining
            }
        };
        if takes_it {
            self.join(header, now_ns, self.running, replica, board);
        }
    }

    /// Joins the sender of a hello (a leader's: of its answer); `catch_up` makes a leader
    /// bring a new follower instance up to date by snapshot.
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
                    board,
                    replica,
                );
            }
            Role::Follower(follower) => follower.start(header),
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
        self.join(&answer, now_ns, false, replica, board);
    }

    /// The handshake's part of a step: a joining follower says hello (every
    /// [`HELLO_INTERVAL_NS`]); a leader refuses incompatible followers and answers hellos.
    pub fn advance_join(&mut self, now_ns: u64, outbox: &mut impl Outbox) {
        self.send_refusals(outbox);
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
                let words = follower.hello_words();
                let Some(buffer) = outbox.buffer() else {
                    return;
                };
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

    /// Runs everything that can make progress at `now_ns` (see the roles' `advance`).
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
        match &mut self.role {
            Role::Leader(leader) => {
                leader.advance(now_ns, outbox, replica, zxids, board, completions, limits)
            }
            Role::Follower(follower) => {
                follower.advance(now_ns, outbox, replica, completions, limits)
            }
        }
    }

    /// Queues a write of one of this node's sessions; false when it cannot be taken now.
    /// Submits a transaction of one of this node's sessions (exactly the configured length);
    /// false when it cannot be taken now.
    pub fn submit_write(&mut self, session: u16, session_seq: u64, txn: &[u8]) -> bool {
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
        stats
    }

    /// Whether this pipeline serves local reads (a follower once it has caught up).
    pub fn serving(&self) -> bool {
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
        match &self.role {
            Role::Leader(leader) => leader.settled(now_ns, within_ns),
            Role::Follower(follower) => follower.settled(),
        }
    }

    /// What the node reports of this pipeline: a leader that hears from no quorum, or a
    /// follower that hears nothing from its leader, within the peer timeout says so.
    pub fn sync_state(&self, now_ns: u64, limits: &Limits) -> SyncState {
        match &self.role {
            Role::Leader(leader) => {
                if leader.quorum_visible(now_ns, limits.peer_timeout_ns) {
                    SyncState::Serving
                } else {
                    SyncState::NoQuorum
                }
            }
            Role::Follower(follower) => match follower.phase() {
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
        match &self.role {
            Role::Leader(leader) => leader.summary(),
            Role::Follower(follower) => follower.summary(),
        }
    }

    /// The earliest time at which [`Node::advance`] (for a joining follower,
    /// [`Node::advance_join`]) could do something it would not do at `now_ns` without new
    /// input: a message handled or a write submitted. `now_ns` or earlier means there is work
    /// at once (refusals or hello answers due, writes to prepare or forward, commits to send,
    /// entries to apply, acknowledgements, CREDITs, NACKs, repairs, snapshot chunks);
    /// otherwise it is the first of the timers (retransmission and credit timeouts,
    /// heartbeats, grace periods, write repeats, hellos), or `u64::MAX` when only input can
    /// bring work. A driver may skip the advance until then: an early deadline costs an
    /// advance that finds nothing, never a late one. Pure, and allocates nothing.
    pub fn next_deadline(&self, now_ns: u64, limits: &Limits) -> u64 {
        if self.refusals_due != 0 {
            return now_ns;
        }
        match &self.role {
            Role::Leader(leader) => leader.next_deadline(now_ns, limits),
            Role::Follower(follower) if follower.phase() == Phase::Joining => {
                self.last_hello_ns.map_or(now_ns, |sent| {
                    super::due_at(now_ns, sent, HELLO_INTERVAL_NS)
                })
            }
            Role::Follower(follower) => follower.next_deadline(now_ns, limits),
        }
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
