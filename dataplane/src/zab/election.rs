//! Leader election: which node should lead the next epoch, decided by ZooKeeper's
//! FastLeaderElection (FLE) as a pure state machine, the first step of replacing a dead or
//! cut-off leader. Discovery (the new epoch a quorum acknowledges) and synchronization (bringing
//! followers to the leader's history) come after it and are not here: an outcome is what FLE's
//! is, a node's belief about who leads, which the discovery phase confirms or refutes.
//!
//! Every node in an election broadcasts a [`Notification`]: the [`Vote`] it proposes (a leader,
//! that leader's last zxid and epoch), the election round it votes in (FLE's logical clock) and
//! its own state. A looking node adopts any better vote it hears in its round ([`Vote`]'s order
//! is FLE's `totalOrderPredicate`: epoch, then zxid, then node id), moves to a higher round when
//! it hears one (starting again from its own vote, as FLE does), and decides once a quorum
//! holds its vote in its round and no better vote has come for [`ElectionLimits::finalize_wait_ns`]
//! (FLE's `finalizeWait`). Nodes that have decided answer looking ones with their decision, so
//! a node that starts late, restarts or comes back from a partition joins the established
//! leader (FLE's `outofelection` and `checkLeader`) instead of electing another.
//!
//! Notifications are datagrams that may be lost, duplicated or reordered: a looking node
//! repeats its own every [`ElectionLimits::retransmit_ns`], every message is idempotent, and
//! a notification carries all its sender's state, so the newest one received from a peer is
//! all that is kept of it (newest by round, then decided over looking, then the better vote,
//! as a node's vote only gets better within a round; FLE has TCP's order, datagrams do not).
//!
//! Departures from FLE, each for a fault FLE's setting does not have: the round never goes
//! back (FLE sets it to an established leader's when it joins one, which let a node reuse a
//! round it had voted in with another vote); a looking peer's notification withdraws the
//! decision it reported before in that round or an earlier one, and of a peer's decisions
//! only the latest round's is kept; notifications carry the sender's incarnation, so a peer
//! restarted into a round it decided in is heard again (and its earlier life's late datagrams
//! are not); rounds past [`MAX_ROUND`] are refused; and a vote naming this node is taken with
//! this node's own credentials (one with others is from an earlier life of it). The last four
//! came from a review that found a connected quorum could otherwise stall for ever after a
//! restart. And a round that has not decided within [`ElectionLimits::round_timeout_ns`]
//! (far longer than an election takes) is given up for the next: a safety net for any other
//! way a round could fail to finish. Left out: observers, reconfiguration, vote weights, and the
//! exponential backoff of repeats (a cluster here is small and an election short).
//!
//! What an outcome is worth: FLE is not consensus. A node may finalize on a vote a peer has
//! since given up (its change of vote lost; hence a finalize wait of several repeats), or
//! follow a leader that died while its last notifications were still on their way. Such a
//! decision no quorum backs is found out by the next phases (a leader that no quorum follows
//! into its epoch, a follower whose leader is silent) which give it up and start again
//! ([`Election::start`]), and the next round has no such stale witnesses.
//!
//! Pure: no I/O, time is an argument, nothing allocates (all state is arrays sized by
//! [`MAX_NODES`]). It touches nothing but itself; the driver sends what [`Election::outgoing`]
//! and [`Election::answer`] return, hands it what arrives with [`Election::handle`], steps it
//! with [`Election::advance`] and may sleep until [`Election::next_deadline`].

use std::cmp::Ordering;

use rzab_shared::limits::MAX_NODES;

use super::due_at;

/// A proposed leader and the credentials it is ranked by: the last zxid in its log and its
/// epoch. The epoch is the node's current epoch (ZooKeeper's `currentEpoch`, the last epoch
/// whose history it holds, FLE's `peerEpoch`), not the last epoch it was merely asked to join
/// (Zab's accepted epoch): a node that accepted a NEWEPOCH whose leader then died holds no
/// history of that epoch and must not outrank one that does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Vote {
    pub leader: u8,
    pub zxid: u64,
    pub epoch: u32,
}

impl Ord for Vote {
    /// FLE's `totalOrderPredicate`: the later epoch wins, then the longer log, then the higher
    /// node id (only so that nodes with equal logs agree on one).
    fn cmp(&self, other: &Self) -> Ordering {
        (self.epoch, self.zxid, self.leader).cmp(&(other.epoch, other.zxid, other.leader))
    }
}

impl PartialOrd for Vote {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The state a notification's sender is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// In an election: its vote is a proposal.
    Looking,
    /// Decided to follow the vote's leader.
    Following,
    /// Decided to lead (its vote names itself).
    Leading,
}

/// What every node sends: its vote, the round it votes in and its state. The sender is not in
/// it: the transport names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Notification {
    pub vote: Vote,
    /// FLE's election epoch (logical clock): how many elections the sender has started or
    /// joined. Not persisted: a restarted node starts again from round 1 and catches up.
    pub round: u64,
    pub state: PeerState,
    /// The sender's life: a value that grows with every start of its process (rzab's process
    /// instance). A restarted node may come back into a round it voted or decided in before;
    /// what its earlier life said there must not make its new notifications look overtaken.
    pub incarnation: u64,
}

/// Rounds above this are refused: a round saturated at `u64::MAX` would be reused by every
/// later election, which the round rule exists to prevent.
pub const MAX_ROUND: u64 = 1 << 62;

/// What a node decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// This node should lead. `epoch_hint` is one past the highest epoch this election saw; the
    /// epoch it proposes in discovery must still exceed every epoch its quorum has accepted,
    /// which only discovery learns.
    Lead { epoch_hint: u32 },
    /// This node should follow `leader`.
    Follow { leader: u8 },
}

/// Where the election stands on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// No election started: nothing is sent and what arrives is ignored.
    Idle,
    Looking,
    Decided(Outcome),
}

/// Timers of an election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElectionLimits {
    /// How long a vote held by a quorum must go unchallenged by a better one before it is
    /// final (FLE's `finalizeWait`): long enough for the votes of nodes that started a little
    /// later to arrive, and for a lost change of vote to be repeated (several
    /// [`ElectionLimits::retransmit_ns`] and the network's longest delay); every election
    /// takes at least this long.
    pub finalize_wait_ns: u64,
    /// How often a looking node repeats its notification: notifications are datagrams and may
    /// be lost, and a peer that starts later learns of the election only from a repeat.
    pub retransmit_ns: u64,
    /// How long a node may look in one round without deciding before it starts the next: a
    /// safety net for a round that cannot finish (whatever the cause, a fresh round with
    /// nothing remembered ends it), far longer than an election takes (about 2 ms under 20%
    /// loss in the tests) so that it never cuts a healthy one short.
    pub round_timeout_ns: u64,
}

impl Default for ElectionLimits {
    /// A millisecond, not FLE's 200 ms: the goal is to replace a leader within milliseconds,
    /// and a notification crosses the data plane's network in tens of microseconds. The wait
    /// spans four repeats, so that a change of vote lost on its way is repeated before the
    /// wait ends: in the tests' network (20% loss and duplication, delays of 10-400 µs), a
    /// wait no longer than the repeat interval let the nodes of 3 and 5 node clusters decide
    /// on different leaders in about 2% of the runs (a node finalizing on a peer's vote the
    /// peer had since given up), a wait of two repeats in 0.2%, and these in none of 4,000.
    fn default() -> Self {
        ElectionLimits {
            finalize_wait_ns: 1_000_000,
            retransmit_ns: 250_000,
            round_timeout_ns: 50_000_000,
        }
    }
}

/// Why an election cannot be set up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ElectionError {
    #[error("node {node} of {nodes}: need 1..={MAX_NODES} nodes")]
    Nodes { node: u8, nodes: u8 },
    #[error("a retransmission interval of 0 ns would repeat notifications without pause")]
    Retransmit,
}

/// What an election counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ElectionStats {
    /// Notifications taken (handled, whether or not they changed anything).
    pub handled: u64,
    /// Notifications that made no sense: from or for a node outside the cluster, in this
    /// node's own name, or whose state contradicts its vote (leading another, following
    /// itself).
    pub dropped: u64,
    /// Well-formed notifications of no use here: from an earlier round, overtaken by a newer
    /// one of the same sender, before any election, or from decided peers once this node has
    /// decided too.
    pub ignored: u64,
    /// Notifications returned by [`Election::outgoing`] (first sends and repeats).
    pub broadcasts: u64,
    /// Notifications returned by [`Election::answer`].
    pub answers: u64,
    /// Rounds given up after [`ElectionLimits::round_timeout_ns`] without a decision.
    pub rounds_timed_out: u64,
}

/// One node's leader election.
#[derive(Debug)]
pub struct Election {
    node: u8,
    nodes: u8,
    limits: ElectionLimits,
    /// This node's own credentials, which it votes for when an election or round starts.
    last_zxid: u64,
    epoch: u32,
    status: Status,
    round: u64,
    vote: Vote,
    /// FLE's `recvset`: the latest notification of each peer in this round (of any state).
    heard: [Option<Notification>; MAX_NODES],
    /// FLE's `outofelection`: the latest notification of each peer that has decided, of any
    /// round, for joining an established leader.
    out_of_election: [Option<Notification>; MAX_NODES],
    /// Since when a quorum has held this node's vote in this round.
    quorum_since: Option<u64>,
    /// When this node entered its current round.
    round_since_ns: u64,
    /// Whether this node's notification must go out at once (its vote or state changed).
    send_due: bool,
    last_sent_ns: u64,
    /// Peers that sent something this node's notification should answer, by bit.
    answers_due: u64,
    /// The highest epoch in any vote seen since the election started, for the epoch hint.
    highest_epoch: u32,
    /// This process's life (see [`Notification::incarnation`]).
    incarnation: u64,
    stats: ElectionStats,
}

fn bit(node: u8) -> u64 {
    1u64 << u32::from(node).min(63)
}

/// Whether two notifications back the same leader, as FLE's `Vote.equals`: among looking
/// nodes a vote counts only in its own round and with the same credentials; among decided ones
/// the leader and its epoch are what they agree on (each may have joined in another round).
fn agrees(a: &Notification, b: &Notification) -> bool {
    if a.state == PeerState::Looking || b.state == PeerState::Looking {
        a.vote == b.vote && a.round == b.round
    } else {
        a.vote.leader == b.vote.leader && a.vote.epoch == b.vote.epoch
    }
}

impl Election {
    /// The election of `node` in a cluster of `nodes`, whose log ends at `last_zxid` and whose
    /// current epoch is `epoch`. Idle until [`Election::start`].
    pub fn new(
        node: u8,
        nodes: u8,
        last_zxid: u64,
        epoch: u32,
        limits: ElectionLimits,
    ) -> Result<Election, ElectionError> {
        if nodes == 0 || usize::from(nodes) > MAX_NODES || node >= nodes {
            return Err(ElectionError::Nodes { node, nodes });
        }
        if limits.retransmit_ns == 0 {
            return Err(ElectionError::Retransmit);
        }
        Ok(Election {
            node,
            nodes,
            limits,
            last_zxid,
            epoch,
            status: Status::Idle,
            round: 0,
            vote: Vote {
                leader: node,
                zxid: last_zxid,
                epoch,
            },
            heard: [None; MAX_NODES],
            out_of_election: [None; MAX_NODES],
            quorum_since: None,
            round_since_ns: 0,
            send_due: false,
            last_sent_ns: 0,
            answers_due: 0,
            highest_epoch: epoch,
            incarnation: 0,
            stats: ElectionStats::default(),
        })
    }

    /// This election with the process life its notifications carry (it must grow with every
    /// start of the node's process; the default, 0, suits a node that never restarts).
    pub fn with_incarnation(mut self, incarnation: u64) -> Election {
        self.incarnation = incarnation;
        self
    }

    /// A majority of the cluster.
    pub fn quorum(&self) -> usize {
        usize::from(self.nodes) / 2 + 1
    }

    pub fn status(&self) -> Status {
        self.status
    }

    /// The decision, once there is one.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.status {
            Status::Decided(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// This node's vote: its proposal while looking, the leader it decided on after.
    pub fn vote(&self) -> Vote {
        self.vote
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn stats(&self) -> ElectionStats {
        self.stats
    }

    /// The state this node reports in its notifications.
    pub fn peer_state(&self) -> PeerState {
        match self.status {
            Status::Idle | Status::Looking => PeerState::Looking,
            Status::Decided(Outcome::Lead { .. }) => PeerState::Leading,
            Status::Decided(Outcome::Follow { .. }) => PeerState::Following,
        }
    }

    /// What this node says of itself now.
    pub fn notification(&self) -> Notification {
        Notification {
            vote: self.vote,
            round: self.round,
            state: self.peer_state(),
            incarnation: self.incarnation,
        }
    }

    /// Records this node's log as it now stands (a follower that lost its leader has more of
    /// it than when it last voted); the next round or election it starts votes with it.
    pub fn update_log(&mut self, last_zxid: u64, epoch: u32) {
        self.last_zxid = last_zxid;
        self.epoch = epoch;
    }

    fn own_vote(&self) -> Vote {
        Vote {
            leader: self.node,
            zxid: self.last_zxid,
            epoch: self.epoch,
        }
    }

    /// Starts an election (at start-up, or when the leader is lost): a new round in which this
    /// node votes for itself and says so at once. What it heard in earlier elections is
    /// forgotten, as it may describe a leader that is gone.
    pub fn start(&mut self, now_ns: u64) {
        self.round = self.round.saturating_add(1);
        self.round_since_ns = now_ns;
        self.vote = self.own_vote();
        self.heard = [None; MAX_NODES];
        self.out_of_election = [None; MAX_NODES];
        self.quorum_since = None;
        self.highest_epoch = self.epoch;
        self.status = Status::Looking;
        self.send_due = true;
        // A cluster of one is its own quorum.
        self.check_quorum(now_ns);
    }

    /// Takes a notification from `from`.
    pub fn handle(&mut self, from: u8, notification: &Notification, now_ns: u64) {
        let leader = notification.vote.leader;
        let contradictory = match notification.state {
            PeerState::Looking => false,
            PeerState::Following => leader == from,
            PeerState::Leading => leader != from,
        };
        // A notification in this node's own name would count it twice toward a quorum; a round
        // past MAX_ROUND would pin every later election to one round.
        if from >= self.nodes
            || from == self.node
            || leader >= self.nodes
            || contradictory
            || notification.round > MAX_ROUND
        {
            self.stats.dropped += 1;
            return;
        }
        self.stats.handled += 1;
        let index = usize::from(from);
        let lives = [self.heard[index], self.out_of_election[index]];
        let known_life = lives.iter().flatten().map(|heard| heard.incarnation).max();
        match known_life {
            Some(life) if life > notification.incarnation => {
                // From an earlier life of the peer, arriving late.
                self.stats.ignored += 1;
                return;
            }
            Some(life) if life < notification.incarnation => {
                // The peer restarted: what its earlier life said is void.
                self.heard[index] = None;
                self.out_of_election[index] = None;
            }
            _ => {}
        }
        // A vote for this node with other credentials than its own is from an earlier life of
        // this node (or a log since truncated): it is taken as a vote for this node as it is.
        let mut notification = *notification;
        if notification.vote.leader == self.node {
            notification.vote = self.own_vote();
        }
        let notification = &notification;
        match (self.status, notification.state) {
            (Status::Idle, _) => self.stats.ignored += 1,
            // FLE's WorkerReceiver: a decided node tells a looking one whom it decided on, so
            // a node that starts late or comes back joins the leader instead of electing one.
            (Status::Decided(_), PeerState::Looking) => self.answers_due |= bit(from),
            (Status::Decided(_), _) => self.stats.ignored += 1,
            (Status::Looking, PeerState::Looking) => self.looking(from, notification, now_ns),
            (Status::Looking, _) => self.decided_peer(from, notification, now_ns),
        }
    }

    /// A looking peer's notification, on a looking node (FLE's LOOKING case).
    fn looking(&mut self, from: u8, notification: &Notification, now_ns: u64) {
        let index = usize::from(from);
        match notification.round.cmp(&self.round) {
            Ordering::Less => {
                // Ignored, but answered, so that it moves to this round.
                self.stats.ignored += 1;
                self.answers_due |= bit(from);
                return;
            }
            Ordering::Greater => {
                // A later election: what was heard in this one is void. FLE starts again from
                // the better of its own credentials and the peer's vote, not from its
                // proposal of the old round, which may name a node that is gone.
                self.round = notification.round;
                self.round_since_ns = now_ns;
                self.heard = [None; MAX_NODES];
                // A quorum of the old round is no quorum of this one, even for the same vote.
                self.quorum_since = None;
                self.set_vote(self.own_vote().max(notification.vote));
                self.send_due = true;
            }
            Ordering::Equal => {
                // Within a round a node's vote only gets better, and its decision comes after
                // all of them; a datagram that says otherwise was overtaken by a later one and
                // must not bring back a vote its sender has given up (FLE's TCP channels keep
                // order; datagrams do not).
                let overtaken = self.heard[index].is_some_and(|heard| {
                    heard.round == notification.round
                        && (heard.state != PeerState::Looking || heard.vote > notification.vote)
                });
                if overtaken {
                    self.stats.ignored += 1;
                    return;
                }
                if notification.vote > self.vote {
                    self.set_vote(notification.vote);
                }
            }
        }
        // It is looking, so it no longer backs the leader it reported in this round or an
        // earlier one (a decision of a later round, arriving first, stands).
        if self.out_of_election[index].is_some_and(|decided| decided.round <= notification.round) {
            self.out_of_election[index] = None;
        }
        self.heard[index] = Some(*notification);
        self.highest_epoch = self.highest_epoch.max(notification.vote.epoch);
        self.check_quorum(now_ns);
    }

    /// A decided peer's notification, on a looking node (FLE's FOLLOWING/LEADING case): it
    /// follows their leader once a quorum backs it and the leader itself says it leads, at
    /// once and without the finalize wait, as there is nothing left to wait for.
    fn decided_peer(&mut self, from: u8, notification: &Notification, now_ns: u64) {
        let index = usize::from(from);
        self.highest_epoch = self.highest_epoch.max(notification.vote.epoch);
        if notification.round == self.round {
            // Peers that decided in this round count with the looking ones (and this node).
            self.heard[index] = Some(*notification);
            if self.backed(&self.heard, notification, true)
                && self.leader_confirmed(&self.heard, notification)
            {
                self.decide(notification.vote);
                return;
            }
        }
        // Decided peers of any round: a node arriving late, in another round, joins an
        // established leader only when a quorum follows it (this node not counted, as it is
        // looking) and the leader is among them, leading (FLE's ZOOKEEPER-1732 path). Only the
        // peer's latest decision counts: one of an earlier round, arriving late, is not kept.
        if self.out_of_election[index].is_some_and(|decided| decided.round > notification.round) {
            self.stats.ignored += 1;
            return;
        }
        self.out_of_election[index] = Some(*notification);
        if self.backed(&self.out_of_election, notification, false)
            && self.leader_confirmed(&self.out_of_election, notification)
        {
            // FLE takes the leader's round as its clock; here the clock never goes back, as
            // a round this node voted in must not be used again with another vote: peers
            // may still hold its old vote of that round and count it (found by the
            // dead-leader test, where a survivor that briefly followed the dead leader of an
            // earlier round reused its round and a quorum formed on a withdrawn vote).
            self.round = self.round.max(notification.round);
            self.decide(notification.vote);
            return;
        }
        // A peer of this round that decided may have changed which votes match this node's.
        self.check_quorum(now_ns);
    }

    /// Whether a quorum of `set` (and this node, with `with_self`) backs `notification`'s leader.
    fn backed(
        &self,
        set: &[Option<Notification>; MAX_NODES],
        notification: &Notification,
        with_self: bool,
    ) -> bool {
        let peers = set
            .iter()
            .flatten()
            .filter(|heard| agrees(heard, notification))
            .count();
        let own = usize::from(with_self && agrees(&self.notification(), notification));
        peers + own >= self.quorum()
    }

    /// FLE's `checkLeader`: a quorum backing a leader is not enough, since it may have died
    /// since they decided; the leader itself must say it leads. If the leader is this node,
    /// the quorum must have decided in this node's round (a restarted leader must not take
    /// the word of followers of its previous life).
    fn leader_confirmed(
        &self,
        set: &[Option<Notification>; MAX_NODES],
        notification: &Notification,
    ) -> bool {
        let leader = notification.vote.leader;
        if leader == self.node {
            return notification.round == self.round;
        }
        set.get(usize::from(leader))
            .copied()
            .flatten()
            .is_some_and(|heard| heard.state == PeerState::Leading && agrees(&heard, notification))
    }

    /// Changes this node's proposal: it goes out at once, and its quorum (if any) starts
    /// anew, which is how a better vote interrupts the finalize wait.
    fn set_vote(&mut self, vote: Vote) {
        if vote != self.vote {
            self.vote = vote;
            self.send_due = true;
            self.quorum_since = None;
        }
    }

    /// Starts or stops the finalize wait as a quorum holds this node's vote in this round.
    fn check_quorum(&mut self, now_ns: u64) {
        if self.backed(&self.heard, &self.notification(), true) {
            self.quorum_since.get_or_insert(now_ns);
        } else {
            self.quorum_since = None;
        }
    }

    fn decide(&mut self, vote: Vote) {
        self.vote = vote;
        let outcome = if vote.leader == self.node {
            Outcome::Lead {
                epoch_hint: self.highest_epoch.max(self.epoch).saturating_add(1),
            }
        } else {
            Outcome::Follow {
                leader: vote.leader,
            }
        };
        self.status = Status::Decided(outcome);
        self.quorum_since = None;
        // Said once, so peers still looking in this round learn it without asking.
        self.send_due = true;
    }

    /// Decides if the finalize wait is over; returns the decision (on every call once there
    /// is one), `None` while idle or looking.
    pub fn advance(&mut self, now_ns: u64) -> Option<Outcome> {
        if self.status == Status::Looking
            && now_ns.saturating_sub(self.round_since_ns) >= self.limits.round_timeout_ns
        {
            self.stats.rounds_timed_out += 1;
            self.start(now_ns);
        }
        if self.status == Status::Looking {
            let finalized = self
                .quorum_since
                .is_some_and(|since| now_ns.saturating_sub(since) >= self.limits.finalize_wait_ns);
            if finalized {
                self.decide(self.vote);
            }
        }
        self.outcome()
    }

    /// The notification to broadcast to every peer now, if any: at once after a change of
    /// vote or state, and every [`ElectionLimits::retransmit_ns`] while looking. A decided
    /// node says its decision once, then only answers ([`Election::answer`]).
    pub fn outgoing(&mut self, now_ns: u64) -> Option<Notification> {
        let repeat = self.status == Status::Looking
            && now_ns.saturating_sub(self.last_sent_ns) >= self.limits.retransmit_ns;
        if self.status == Status::Idle || !(self.send_due || repeat) {
            return None;
        }
        self.send_due = false;
        if self.status == Status::Looking {
            self.last_sent_ns = now_ns;
        }
        self.stats.broadcasts += 1;
        Some(self.notification())
    }

    /// The next unicast answer owed, as (peer, notification): to a looking peer in an earlier
    /// round (so it moves to this one), and, once decided, to every looking peer (so it learns
    /// the leader). Call until `None`; each peer is owed one answer however often it asked.
    pub fn answer(&mut self) -> Option<(u8, Notification)> {
        if self.answers_due == 0 {
            return None;
        }
        let peer = u8::try_from(self.answers_due.trailing_zeros()).unwrap_or(u8::MAX);
        self.answers_due &= self.answers_due - 1;
        self.stats.answers += 1;
        Some((peer, self.notification()))
    }

    /// The earliest time at which [`Election::advance`], [`Election::outgoing`] or
    /// [`Election::answer`] could do something they would not do at `now_ns` without new
    /// input: `now_ns` when something is to be sent at once; while looking, the next repeat
    /// or the end of the finalize wait; `u64::MAX` when idle or decided (only input brings
    /// work then). Allocates nothing.
    pub fn next_deadline(&self, now_ns: u64) -> u64 {
        if self.status == Status::Idle {
            return u64::MAX;
        }
        if self.send_due || self.answers_due != 0 {
            return now_ns;
        }
        if self.status != Status::Looking {
            return u64::MAX;
        }
        let repeat = due_at(now_ns, self.last_sent_ns, self.limits.retransmit_ns).min(due_at(
            now_ns,
            self.round_since_ns,
            self.limits.round_timeout_ns,
        ));
        self.quorum_since.map_or(repeat, |since| {
            repeat.min(due_at(now_ns, since, self.limits.finalize_wait_ns))
        })
    }

    /// An election already decided, as at a cluster's start, where `leader` leads by
    /// configuration in `epoch` with nothing written yet: round 0, every node's vote for it.
    /// Looking peers are answered with it, so a process restarted into the cluster joins it.
    pub fn established(mut self, leader: u8, zxid: u64, epoch: u32) -> Election {
        let vote = Vote {
            leader,
            zxid,
            epoch,
        };
        self.decide(vote);
        self.send_due = false;
        self
    }

    /// New limits, from the next step on.
    pub fn set_limits(&mut self, limits: ElectionLimits) {
        if limits.retransmit_ns > 0 {
            self.limits = limits;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;

    const LIMITS: ElectionLimits = ElectionLimits {
        finalize_wait_ns: 1_000_000,
        retransmit_ns: 250_000,
        round_timeout_ns: 50_000_000,
    };

    #[test]
    fn the_defaults_are_the_tested_limits() {
        assert_eq!(ElectionLimits::default(), LIMITS);
    }

    /// splitmix64: a seeded generator small enough to write here, so that runs repeat exactly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, bound: u64) -> u64 {
            self.next() % bound.max(1)
        }

        fn percent(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    #[derive(Clone, Copy)]
    struct Faults {
        loss: u64,
        duplication: u64,
        min_delay_ns: u64,
        max_delay_ns: u64,
    }

    const CLEAN: Faults = Faults {
        loss: 0,
        duplication: 0,
        min_delay_ns: 20_000,
        max_delay_ns: 20_000,
    };

    const LOSSY: Faults = Faults {
        loss: 20,
        duplication: 20,
        // Delays this far apart reorder notifications sent within a fraction of a millisecond.
        min_delay_ns: 10_000,
        max_delay_ns: 400_000,
    };

    struct Flight {
        at: u64,
        seq: u64,
        from: u8,
        to: u8,
        notification: Notification,
    }

    /// A deterministic network of elections: datagrams with random delay, loss and
    /// duplication, partitions by group, and virtual time.
    struct Net {
        nodes: Vec<Election>,
        running: Vec<bool>,
        group: Vec<u8>,
        flights: Vec<Flight>,
        seq: u64,
        rng: Rng,
        faults: Faults,
        now: u64,
        /// Step every node every `tick` ns as well as at deadlines and on messages.
        tick: Option<u64>,
        /// What the broadcast layer does above the election: a node that follows a leader
        /// that is not running starts a new election after this long (its peer timeout).
        leader_timeout_ns: Option<u64>,
        decided_at: Vec<Option<u64>>,
    }

    impl Net {
        /// Nodes with the given (last zxid, epoch), none started.
        fn new(logs: &[(u64, u32)], faults: Faults, seed: u64) -> Net {
            Net::with_limits(logs, faults, seed, LIMITS)
        }

        fn with_limits(
            logs: &[(u64, u32)],
            faults: Faults,
            seed: u64,
            limits: ElectionLimits,
        ) -> Net {
            let nodes = u8::try_from(logs.len()).unwrap();
            Net {
                nodes: logs
                    .iter()
                    .enumerate()
                    .map(|(node, &(zxid, epoch))| {
                        Election::new(u8::try_from(node).unwrap(), nodes, zxid, epoch, limits)
                            .unwrap()
                    })
                    .collect(),
                running: vec![false; logs.len()],
                group: vec![0; logs.len()],
                flights: Vec::new(),
                seq: 0,
                rng: Rng(seed),
                faults,
                now: 0,
                tick: None,
                leader_timeout_ns: None,
                decided_at: vec![None; logs.len()],
            }
        }

        fn start(&mut self, node: usize) {
            self.running[node] = true;
            self.nodes[node].start(self.now);
            self.pump(node);
        }

        fn start_all(&mut self) {
            for node in 0..self.nodes.len() {
                self.start(node);
            }
        }

        fn send(&mut self, from: u8, to: u8, notification: Notification) {
            if self.group[usize::from(from)] != self.group[usize::from(to)] {
                return;
            }
            if self.rng.percent(self.faults.loss) {
                return;
            }
            let copies = if self.rng.percent(self.faults.duplication) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let spread = self.faults.max_delay_ns - self.faults.min_delay_ns;
                let at = self.now + self.faults.min_delay_ns + self.rng.below(spread + 1);
                self.seq += 1;
                self.flights.push(Flight {
                    at,
                    seq: self.seq,
                    from,
                    to,
                    notification,
                });
            }
        }

        /// Steps one node at the present time and sends what it has to send.
        fn pump(&mut self, node: usize) {
            let from = u8::try_from(node).unwrap();
            let now = self.now;
            let election = &mut self.nodes[node];
            election.advance(now);
            let broadcast = election.outgoing(now);
            let mut answers = Vec::new();
            while let Some(answer) = election.answer() {
                answers.push(answer);
            }
            assert!(
                election.next_deadline(now) > now,
                "node {node}: work left at its own deadline"
            );
            if let Some(notification) = broadcast {
                for to in 0..self.nodes.len() {
                    if to != node {
                        self.send(from, u8::try_from(to).unwrap(), notification);
                    }
                }
            }
            for (to, notification) in answers {
                self.send(from, to, notification);
            }
        }

        /// Runs until `end_ns`, waking each node only on a message or at its deadline (or at
        /// every tick, with `tick`), and checking that a node has nothing to do before its
        /// deadline.
        fn run_until(&mut self, end_ns: u64) {
            loop {
                let next_flight = self.flights.iter().map(|f| f.at).min().unwrap_or(u64::MAX);
                let mut next = next_flight;
                for node in 0..self.nodes.len() {
                    if self.running[node] {
                        next = next.min(self.nodes[node].next_deadline(self.now));
                    }
                }
                if let Some(tick) = self.tick {
                    next = next.min((self.now / tick + 1) * tick);
                }
                for node in 0..self.nodes.len() {
                    if let Some(at) = self.leader_lost_at(node) {
                        next = next.min(at);
                    }
                }
                if next > end_ns {
                    self.now = end_ns;
                    return;
                }
                self.now = self.now.max(next);
                let mut woken = vec![false; self.nodes.len()];
                // Deliver what is due, in order of arrival.
                self.flights.sort_by_key(|f| (f.at, f.seq));
                let due = self.flights.partition_point(|f| f.at <= self.now);
                let arrived: Vec<Flight> = self.flights.drain(..due).collect();
                for flight in arrived {
                    let to = usize::from(flight.to);
                    if !self.running[to] {
                        continue;
                    }
                    self.nodes[to].handle(flight.from, &flight.notification, self.now);
                    woken[to] = true;
                }
                for (node, woken) in woken.into_iter().enumerate() {
                    if !self.running[node] {
                        continue;
                    }
                    let deadline = self.nodes[node].next_deadline(self.now);
                    if woken || deadline <= self.now {
                        self.pump(node);
                    } else if self.tick.is_some() {
                        // Stepped before its deadline: it must find nothing to do.
                        let election = &mut self.nodes[node];
                        let before = election.status();
                        assert_eq!(election.advance(self.now), election.outcome());
                        assert_eq!(election.status(), before);
                        assert_eq!(election.outgoing(self.now), None);
                        assert_eq!(election.answer(), None);
                    }
                }
                for node in 0..self.nodes.len() {
                    let outcome = self.nodes[node].outcome();
                    if outcome.is_none() {
                        self.decided_at[node] = None;
                    } else if self.decided_at[node].is_none() {
                        self.decided_at[node] = Some(self.now);
                    }
                    if self.leader_lost_at(node).is_some_and(|at| at <= self.now) {
                        self.start(node);
                    }
                }
            }
        }

        /// Whether a node's decision holds, as the phases after the election would find: its
        /// leader runs, leads, and a quorum (with it) follows it.
        fn settled(&self, node: usize) -> bool {
            let leader = match self.nodes[node].outcome() {
                Some(Outcome::Lead { .. }) => node,
                Some(Outcome::Follow { leader }) => usize::from(leader),
                None => return false,
            };
            let leads = matches!(self.nodes[leader].outcome(), Some(Outcome::Lead { .. }));
            let followers = (0..self.nodes.len())
                .filter(|&other| {
                    self.running[other]
                        && self.nodes[other].outcome()
                            == Some(Outcome::Follow {
                                leader: u8::try_from(leader).unwrap(),
                            })
                })
                .count();
            self.running[leader] && leads && followers + 1 >= self.nodes[node].quorum()
        }

        /// When a node whose decision does not hold gives it up (with `leader_timeout_ns`).
        fn leader_lost_at(&self, node: usize) -> Option<u64> {
            if !self.running[node] || self.settled(node) {
                return None;
            }
            Some(self.decided_at[node]? + self.leader_timeout_ns?)
        }

        /// Whether every running node has decided, and their decisions hold.
        fn decided(&self) -> bool {
            (0..self.nodes.len())
                .filter(|&node| self.running[node])
                .all(|node| self.settled(node))
        }

        /// Runs until every running node has decided, or `limit_ns` passes; returns when.
        fn run_to_decision(&mut self, limit_ns: u64) -> Option<u64> {
            while self.now < limit_ns {
                if self.decided() {
                    return Some(self.now);
                }
                let step = (self.now + 100_000).min(limit_ns);
                self.run_until(step);
            }
            self.decided().then_some(self.now)
        }

        /// The one leader every decided node among `members` agrees on.
        fn leader(&self, members: &[usize]) -> u8 {
            let mut leaders: Vec<u8> = Vec::new();
            let mut leading = Vec::new();
            for &node in members {
                match self.nodes[node].outcome() {
                    Some(Outcome::Lead { .. }) => {
                        leaders.push(u8::try_from(node).unwrap());
                        leading.push(node);
                    }
                    Some(Outcome::Follow { leader }) => leaders.push(leader),
                    None => panic!("node {node} has not decided"),
                }
            }
            leaders.sort_unstable();
            leaders.dedup();
            assert_eq!(leaders.len(), 1, "nodes disagree: {leaders:?}");
            assert!(leading.len() <= 1, "more than one leader: {leading:?}");
            leaders[0]
        }
    }

    fn all(count: usize) -> Vec<usize> {
        (0..count).collect()
    }

    /// Equal logs of `count` nodes.
    fn equal_logs(count: usize) -> Vec<(u64, u32)> {
        vec![(100, 1); count]
    }

    #[test]
    fn votes_are_ordered_by_epoch_then_zxid_then_node() {
        let vote = |leader, zxid, epoch| Vote {
            leader,
            zxid,
            epoch,
        };
        assert!(vote(0, 1, 3) > vote(4, 1_000, 2), "a later epoch wins");
        assert!(vote(0, 11, 2) > vote(4, 10, 2), "then a longer log");
        assert!(vote(4, 10, 2) > vote(3, 10, 2), "then the higher id");
        assert_eq!(vote(1, 5, 5).cmp(&vote(1, 5, 5)), Ordering::Equal);
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert_eq!(
            Election::new(3, 3, 0, 1, LIMITS).err(),
            Some(ElectionError::Nodes { node: 3, nodes: 3 })
        );
        assert!(Election::new(0, 0, 0, 1, LIMITS).is_err());
        let too_many = u8::try_from(MAX_NODES + 1).unwrap();
        assert!(Election::new(0, too_many, 0, 1, LIMITS).is_err());
        let limits = ElectionLimits {
            retransmit_ns: 0,
            ..LIMITS
        };
        assert_eq!(
            Election::new(0, 3, 0, 1, limits).err(),
            Some(ElectionError::Retransmit)
        );
    }

    #[test]
    fn a_single_node_leads_after_the_finalize_wait() {
        let mut election = Election::new(0, 1, 7, 2, LIMITS).unwrap();
        election.start(10);
        assert_eq!(election.advance(10), None);
        assert_eq!(election.next_deadline(10), 10, "its vote is to be sent");
        assert!(election.outgoing(10).is_some());
        // Driven at its deadlines only: it repeats its vote until the wait is over.
        let mut now = 10;
        let mut deadlines = Vec::new();
        let outcome = loop {
            now = election.next_deadline(now);
            deadlines.push(now - 10);
            if let Some(outcome) = election.advance(now) {
                break outcome;
            }
            assert!(election.outgoing(now).is_some(), "a repeat at {now}");
        };
        assert_eq!(outcome, Outcome::Lead { epoch_hint: 3 });
        let r = LIMITS.retransmit_ns;
        assert_eq!(deadlines, [r, 2 * r, 3 * r, LIMITS.finalize_wait_ns]);
    }

    #[test]
    fn nonsense_is_dropped_and_counted() {
        let mut election = Election::new(1, 3, 10, 1, LIMITS).unwrap();
        election.start(0);
        let vote = Vote {
            leader: 2,
            zxid: 99,
            epoch: 9,
        };
        let looking = Notification {
            vote,
            round: 1,
            state: PeerState::Looking,
            incarnation: 0,
        };
        election.handle(3, &looking, 0);
        election.handle(1, &looking, 0);
        let foreign = Notification {
            vote: Vote { leader: 7, ..vote },
            ..looking
        };
        election.handle(0, &foreign, 0);
        let leading_another = Notification {
            state: PeerState::Leading,
            ..looking
        };
        election.handle(0, &leading_another, 0);
        let following_itself = Notification {
            state: PeerState::Following,
            ..looking
        };
        election.handle(2, &following_itself, 0);
        assert_eq!(election.stats().dropped, 5);
        assert_eq!(election.stats().handled, 0);
        assert_eq!(election.vote().leader, 1, "none of it changed the vote");
    }

    #[test]
    fn an_earlier_round_is_ignored_but_answered() {
        let mut election = Election::new(0, 3, 10, 1, LIMITS).unwrap();
        election.start(0);
        election.start(0);
        assert_eq!(election.round(), 2);
        let stale = Notification {
            vote: Vote {
                leader: 2,
                zxid: 1_000,
                epoch: 5,
            },
            round: 1,
            state: PeerState::Looking,
            incarnation: 0,
        };
        election.handle(2, &stale, 5);
        assert_eq!(
            election.vote().leader,
            0,
            "a better vote of an old round counts not"
        );
        assert_eq!(election.stats().ignored, 1);
        let (to, answer) = election.answer().unwrap();
        assert_eq!((to, answer.round, answer.state), (2, 2, PeerState::Looking));
        assert_eq!(election.answer(), None);
    }

    #[test]
    fn an_overtaken_datagram_does_not_bring_back_a_vote() {
        let mut election = Election::new(0, 3, 10, 1, LIMITS).unwrap();
        election.start(0);
        let looking = |leader, zxid| Notification {
            vote: Vote {
                leader,
                zxid,
                epoch: 1,
            },
            round: 1,
            state: PeerState::Looking,
            incarnation: 0,
        };
        // Node 1 voted for itself, then for node 2; the first datagram arrives last.
        election.handle(1, &looking(2, 50), 1);
        election.handle(1, &looking(1, 5), 2);
        assert_eq!(election.stats().ignored, 1);
        assert_eq!(
            election.advance(1 + LIMITS.finalize_wait_ns),
            Some(Outcome::Follow { leader: 2 }),
            "nodes 0 and 1 still hold vote 2"
        );
    }

    #[test]
    fn a_later_round_resets_and_starts_from_the_better_vote() {
        let mut election = Election::new(0, 3, 10, 1, LIMITS).unwrap();
        election.start(0);
        let _ = election.outgoing(0);
        // Node 1 backs node 2 in round 1: node 0 adopts it.
        let two = Vote {
            leader: 2,
            zxid: 50,
            epoch: 1,
        };
        let looking = |vote, round| Notification {
            vote,
            round,
            state: PeerState::Looking,
            incarnation: 0,
        };
        election.handle(1, &looking(two, 1), 1);
        assert_eq!(election.vote(), two);
        assert_eq!(
            election.next_deadline(1),
            1,
            "a changed vote goes out at once"
        );
        assert!(election.outgoing(1).is_some());
        assert!(election.quorum_since.is_some(), "nodes 0 and 1 hold vote 2");
        // Round 3 from node 1, with a worse vote than node 0's own: the old proposal (2) is
        // dropped for node 0's own credentials, and the quorum of round 1 is void.
        let one = Vote {
            leader: 1,
            zxid: 5,
            epoch: 1,
        };
        election.handle(1, &looking(one, 3), 2);
        assert_eq!(election.round(), 3);
        assert_eq!(election.vote().leader, 0);
        assert!(election.quorum_since.is_none());
    }

    #[test]
    fn three_and_five_nodes_elect_the_highest_together() {
        for count in [3, 5] {
            let mut net = Net::new(&equal_logs(count), CLEAN, 1);
            net.start_all();
            let at = net.run_to_decision(100_000_000).expect("all decide");
            let leader = net.leader(&all(count));
            assert_eq!(usize::from(leader), count - 1, "equal logs: the highest id");
            assert!(at <= 2 * LIMITS.finalize_wait_ns, "decided at {at} ns");
            assert!(matches!(
                net.nodes[count - 1].outcome(),
                Some(Outcome::Lead { epoch_hint: 2 })
            ));
        }
    }

    #[test]
    fn loss_duplication_and_reordering_still_elect_one_leader() {
        let mut slowest = 0;
        for count in [3, 5] {
            for seed in 0..200 {
                let mut net = Net::new(&equal_logs(count), LOSSY, seed);
                // Started within half a millisecond of each other.
                for node in 0..count {
                    let delay = net.rng.below(100_000);
                    net.run_until(net.now + delay);
                    net.start(node);
                }
                let at = net.run_to_decision(100_000_000);
                let at = at.unwrap_or_else(|| panic!("{count} nodes, seed {seed}: undecided"));
                slowest = slowest.max(at);
                net.leader(&all(count));
                // Later traffic changes no decision.
                let before: Vec<_> = net.nodes.iter().map(Election::outcome).collect();
                net.run_until(net.now + 20_000_000);
                let after: Vec<_> = net.nodes.iter().map(Election::outcome).collect();
                assert_eq!(before, after, "{count} nodes, seed {seed}");
            }
        }
        assert!(slowest <= 5_000_000, "slowest election: {slowest} ns");
    }

    #[test]
    fn a_minority_cannot_decide_and_the_majority_does() {
        let mut net = Net::new(&[(500, 3), (400, 3), (10, 1), (10, 1), (10, 1)], LOSSY, 7);
        // Nodes 0 and 1 (the best logs) are cut off from 2, 3 and 4.
        net.group = vec![1, 1, 0, 0, 0];
        net.start_all();
        net.run_until(500_000_000);
        assert_eq!(net.nodes[0].status(), Status::Looking);
        assert_eq!(net.nodes[1].status(), Status::Looking);
        assert_eq!(net.leader(&[2, 3, 4]), 4);
        // Healed, the minority joins the leader of the majority rather than its own best.
        net.group = vec![0; 5];
        net.run_to_decision(600_000_000)
            .expect("the minority joins");
        assert_eq!(net.leader(&all(5)), 4);
    }

    #[test]
    fn a_late_node_follows_the_established_leader() {
        for seed in 0..50 {
            // Node 4 has the best log, but starts after 0, 1 and 2 have elected 2; node 3
            // starts late in another round (it started elections twice before).
            let logs = [(10, 1), (10, 1), (10, 1), (10, 1), (900, 2)];
            let mut net = Net::new(&logs, LOSSY, seed);
            for node in 0..3 {
                net.start(node);
            }
            net.run_to_decision(100_000_000)
                .expect("the first three decide");
            assert_eq!(net.leader(&[0, 1, 2]), 2);
            net.nodes[3].start(net.now);
            net.nodes[3].start(net.now);
            net.start(3);
            net.start(4);
            net.run_to_decision(200_000_000)
                .expect("the late ones join");
            assert_eq!(net.leader(&all(5)), 2, "seed {seed}");
            assert!(net.nodes[3].round() >= 3, "its round never goes back");
        }
    }

    #[test]
    fn a_dead_leader_is_replaced() {
        let mut slowest = 0;
        for seed in 0..200 {
            let mut net = Net::new(&equal_logs(5), LOSSY, seed);
            net.start_all();
            net.run_to_decision(100_000_000).expect("all decide");
            assert_eq!(net.leader(&all(5)), 4);
            // Some time later (nothing of the election left in flight), node 4 dies.
            net.run_until(net.now + 50_000_000);
            // Nodes 0, 1 and 2 notice at once and elect among themselves; node 3
            // notices at its peer timeout, 5 ms later, with the best log of all by then.
            net.running[4] = false;
            let since = net.now;
            net.leader_timeout_ns = Some(5_000_000);
            net.decided_at = vec![Some(since); 5];
            net.nodes[3].update_log(300, 1);
            for node in 0..3 {
                net.nodes[node].update_log(200, 1);
                net.start(node);
            }
            // The survivors settle on node 2 before node 3 even notices: the quorum (of 5)
            // they need is all of them.
            let survivors = [0, 1, 2];
            while !survivors.iter().all(|&node| net.settled(node)) {
                assert!(
                    net.now < since + 5_000_000,
                    "seed {seed}: the survivors decide"
                );
                net.run_until(net.now + 10_000);
            }
            slowest = slowest.max(net.now - since);
            assert_eq!(net.leader(&survivors), 2, "seed {seed}");
            // Node 3 gives the dead leader up and joins node 2, though its log is better.
            net.run_to_decision(since + 100_000_000)
                .unwrap_or_else(|| panic!("seed {seed}: node 3 joins"));
            assert_eq!(net.leader(&[0, 1, 2, 3]), 2, "seed {seed}");
        }
        assert!(slowest <= 4_000_000, "slowest replacement: {slowest} ns");
    }

    #[test]
    fn a_quorum_of_followers_is_not_enough_without_their_leader() {
        // FLE's checkLeader: node 0 hears nodes 1 and 2 follow node 3 (a quorum of 5 with
        // node 3), but not node 3 itself: it keeps looking until node 3 says it leads.
        let mut election = Election::new(0, 5, 10, 1, LIMITS).unwrap();
        election.start(0);
        let three = Vote {
            leader: 3,
            zxid: 10,
            epoch: 1,
        };
        let following = Notification {
            vote: three,
            round: 4,
            state: PeerState::Following,
            incarnation: 0,
        };
        election.handle(1, &following, 1);
        election.handle(2, &following, 2);
        election.handle(4, &following, 3);
        assert_eq!(election.advance(4), None);
        let leading = Notification {
            state: PeerState::Leading,
            ..following
        };
        election.handle(3, &leading, 5);
        assert_eq!(election.advance(5), Some(Outcome::Follow { leader: 3 }));
        assert_eq!(election.round(), 4, "it joins the leader's round");
    }

    #[test]
    fn the_highest_log_wins_whatever_its_id() {
        // A later epoch beats a longer log; within an epoch the longer log wins; node 0 has
        // the lowest id in both.
        let cases: [&[(u64, u32)]; 2] = [
            &[(5, 3), (900, 2), (900, 2), (800, 2), (900, 2)],
            &[(901, 2), (900, 2), (900, 2), (10, 2), (900, 2)],
        ];
        for logs in cases {
            for seed in 0..50 {
                let mut net = Net::new(logs, LOSSY, seed);
                net.start_all();
                net.run_to_decision(100_000_000).expect("all decide");
                assert_eq!(net.leader(&all(5)), 0, "{logs:?}, seed {seed}");
            }
        }
        let mut net = Net::new(cases[0], CLEAN, 0);
        net.start_all();
        net.run_to_decision(100_000_000).expect("all decide");
        assert_eq!(
            net.nodes[0].outcome(),
            Some(Outcome::Lead { epoch_hint: 4 })
        );
    }

    #[test]
    fn deadlines_are_the_timers_and_driving_by_them_changes_nothing() {
        // A looking node with nothing to send is due at its next repeat; with a quorum, at
        // the end of the finalize wait; once decided, never.
        let mut election = Election::new(0, 3, 10, 1, LIMITS).unwrap();
        assert_eq!(election.next_deadline(0), u64::MAX, "idle");
        election.start(100);
        assert!(election.outgoing(100).is_some());
        assert_eq!(election.next_deadline(150), 100 + LIMITS.retransmit_ns);
        assert_eq!(election.outgoing(99 + LIMITS.retransmit_ns), None);
        let repeat = election.outgoing(100 + LIMITS.retransmit_ns);
        assert!(repeat.is_some(), "repeated at the interval");
        let sent = 100 + LIMITS.retransmit_ns;
        let backing = Notification {
            vote: election.vote(),
            round: 1,
            state: PeerState::Looking,
            incarnation: 0,
        };
        election.handle(1, &backing, sent + 10);
        // A quorum: due at each repeat and then at the end of the wait, whichever is first.
        let finalize_at = sent + 10 + LIMITS.finalize_wait_ns;
        let mut last_repeat = sent;
        loop {
            let deadline = election.next_deadline(last_repeat);
            assert_eq!(
                deadline,
                (last_repeat + LIMITS.retransmit_ns).min(finalize_at)
            );
            if deadline == finalize_at {
                break;
            }
            assert_eq!(election.advance(deadline), None);
            assert!(election.outgoing(deadline).is_some());
            last_repeat = deadline;
        }
        assert_eq!(election.advance(finalize_at - 1), None);
        let outcome = election.advance(sent + 10 + LIMITS.finalize_wait_ns);
        assert_eq!(outcome, Some(Outcome::Lead { epoch_hint: 2 }));
        let now = sent + 10 + LIMITS.finalize_wait_ns;
        assert_eq!(
            election.next_deadline(now),
            now,
            "the decision is to be said"
        );
        assert_eq!(election.outgoing(now).unwrap().state, PeerState::Leading);
        assert_eq!(election.next_deadline(now), u64::MAX);
        election.handle(
            2,
            &Notification {
                round: 9,
                ..backing
            },
            now + 1,
        );
        assert_eq!(
            election.next_deadline(now + 1),
            now + 1,
            "an answer is owed"
        );
        assert_eq!(election.answer().unwrap().0, 2);
        assert_eq!(election.next_deadline(now + 2), u64::MAX);

        // The same elections, stepped every 50 µs besides (checking at each step that a node
        // before its deadline finds nothing to do), decide alike.
        for count in [3, 5] {
            for seed in 0..20 {
                let run = |tick| {
                    let mut net = Net::new(&equal_logs(count), CLEAN, seed);
                    net.tick = tick;
                    net.start_all();
                    net.run_to_decision(100_000_000).expect("all decide");
                    (0..count)
                        .map(|node| net.nodes[node].outcome())
                        .collect::<Vec<_>>()
                };
                assert_eq!(run(None), run(Some(50_000)));
                let mut lossy = Net::new(&equal_logs(count), LOSSY, seed);
                lossy.tick = Some(50_000);
                lossy.start_all();
                lossy.run_to_decision(100_000_000).expect("all decide");
                lossy.leader(&all(count));
            }
        }
    }

    /// Delivers each election's notification to the others, `rounds` times, 50 µs apart,
    /// advancing each; returns the outcomes.
    fn exchange(elections: &mut [Election], rounds: u64, start_ns: u64) -> Vec<Option<Outcome>> {
        for step in 0..rounds {
            let now = start_ns + step * 50_000;
            let sent: Vec<(u8, Notification)> = elections
                .iter()
                .map(|election| (election.node, election.notification()))
                .collect();
            for election in elections.iter_mut() {
                for (from, notification) in &sent {
                    if *from != election.node {
                        election.handle(*from, notification, now);
                    }
                }
                election.advance(now);
            }
        }
        elections.iter().map(Election::outcome).collect()
    }

    #[test]
    fn a_peer_restarted_into_a_round_it_decided_in_is_heard_again() {
        // Node 0 looks in round 1 and holds node 1's decision of an earlier life (following
        // 2, which is gone). Node 1 restarts, looking in round 1 again: without incarnations
        // its new notifications looked overtaken by its old decision, and 0 and 1 (a quorum
        // of 3) never decided.
        let mut node0 = Election::new(0, 3, 10, 1, LIMITS)
            .unwrap()
            .with_incarnation(5);
        node0.start(0);
        let old_decision = Notification {
            vote: Vote {
                leader: 2,
                zxid: 10,
                epoch: 1,
            },
            round: 1,
            state: PeerState::Following,
            incarnation: 1,
        };
        node0.handle(1, &old_decision, 0);
        let mut node1 = Election::new(1, 3, 10, 1, LIMITS)
            .unwrap()
            .with_incarnation(2);
        node1.start(0);
        let mut pair = [node0, node1];
        let outcomes = exchange(&mut pair, 100, 10_000);
        assert_eq!(
            outcomes,
            [
                Some(Outcome::Follow { leader: 1 }),
                Some(Outcome::Lead { epoch_hint: 2 })
            ]
        );
        // A late datagram of node 1's earlier life changes nothing.
        let before = pair[0].stats().ignored;
        pair[0].handle(1, &old_decision, 6_000_000);
        assert_eq!(pair[0].stats().ignored, before + 1);
    }

    #[test]
    fn a_round_past_the_bound_is_dropped() {
        let mut election = Election::new(0, 3, 10, 1, LIMITS).unwrap();
        election.start(0);
        let far = Notification {
            vote: Vote {
                leader: 2,
                zxid: 99,
                epoch: 9,
            },
            round: u64::MAX,
            state: PeerState::Looking,
            incarnation: 0,
        };
        election.handle(1, &far, 0);
        assert_eq!(election.stats().dropped, 1);
        assert_eq!(election.round(), 1, "the round did not jump");
    }

    #[test]
    fn a_late_decision_of_an_earlier_round_does_not_replace_a_later_one() {
        let mut election = Election::new(0, 5, 10, 1, LIMITS).unwrap();
        election.start(0);
        let following = |leader, round| Notification {
            vote: Vote {
                leader,
                zxid: 10,
                epoch: 1,
            },
            round,
            state: PeerState::Following,
            incarnation: 0,
        };
        election.handle(1, &following(4, 3), 0);
        let before = election.stats().ignored;
        election.handle(1, &following(3, 2), 0);
        assert_eq!(election.stats().ignored, before + 1);
    }

    #[test]
    fn a_round_that_cannot_finish_is_given_up_for_the_next() {
        // The restart stall of `a_peer_restarted_into_a_round_it_decided_in_is_heard_again`,
        // with the restarted node's incarnation not told apart (as if it had not grown): the
        // round cannot finish, and the round timeout starts a fresh one that does.
        let mut node0 = Election::new(0, 3, 10, 1, LIMITS)
            .unwrap()
            .with_incarnation(1);
        node0.start(0);
        node0.handle(
            1,
            &Notification {
                vote: Vote {
                    leader: 2,
                    zxid: 10,
                    epoch: 1,
                },
                round: 1,
                state: PeerState::Following,
                incarnation: 1,
            },
            0,
        );
        let mut node1 = Election::new(1, 3, 10, 1, LIMITS)
            .unwrap()
            .with_incarnation(1);
        node1.start(0);
        let mut pair = [node0, node1];
        // 40 ms: stalled.
        assert_eq!(exchange(&mut pair, 800, 10_000), [None, None]);
        // Past the 50 ms round timeout: both start round 2 and decide.
        let outcomes = exchange(&mut pair, 800, 40_010_000);
        assert_eq!(
            outcomes,
            [
                Some(Outcome::Follow { leader: 1 }),
                Some(Outcome::Lead { epoch_hint: 2 })
            ]
        );
        assert!(pair[0].stats().rounds_timed_out >= 1);
    }
}
