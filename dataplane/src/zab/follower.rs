//! The follower's side of one pipeline: forwards its sessions' writes to the leader in
//! coalesced WRITE messages (repeating those that do not come back in a PREPARE in time),
//! stores PREPAREs by pseq (duplicates and reordering are harmless), reports gaps with NACKs,
//! acknowledges the contiguous prefix it holds, applies committed writes in zxid order, and,
//! after a restart, installs the leader's snapshot before it serves. Pure state machine; see
//! the parent module.

use super::wire::{self, FLAG_RETRANSMIT, Kind, Message};
use super::{
    Completions, EntryMeta, EntryRing, FollowerWords, History, Limits, Outbox, PipelineConfig,
    PipelineStats, RETRANSMIT_BURST, StateMachine, Target, Txn, due_at, half, hello_words,
    leader_words,
};

/// The node that leads every pipeline.
pub const LEADER_NODE: u8 = 0;

/// Where the follower's pipeline stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not started: waiting for the leader's answer to its hello.
    Joining,
    /// Joined a running cluster: installing the snapshot, not serving reads yet.
    CatchingUp,
    /// In step with the leader.
    Serving,
    /// The leader no longer holds prepares this follower misses: only a restart (which
    /// catches up by snapshot) can bring it back.
    FellBehind,
}

/// The leader process a follower follows, and the epoch it leads in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderIdentity {
    pub node: u8,
    pub instance: u64,
    pub epoch: u32,
}

/// The follower's state for one pipeline.
#[derive(Debug)]
pub struct Follower {
    config: PipelineConfig,
    phase: Phase,
    leader: Option<LeaderIdentity>,
    /// When a message of the leader was last taken.
    leader_heard_ns: Option<u64>,
    /// Prepares by pseq; `present` marks the ones held and not applied yet. It is this node's
    /// committed-transaction ring, [`PipelineConfig::retained`] deep like the leader's: applied
    /// transactions stay in it until a later pseq reuses their slot, so that a follower that
    /// becomes leader (the election issue) can bring laggards back by DIFF. Prepares are taken
    /// only a window ahead of the applied point, so a slot is never reused under one not applied.
    pending: EntryRing,
    /// Highest session sequence held and applied, by origin node and session: what a leader
    /// this node becomes starts its exactly-once table from.
    ordered_held: Vec<u64>,
    ordered_applied: Vec<u64>,
    /// Every prepare below this pseq is held.
    received: u64,
    /// The pseq this pipeline started at: nothing below it was ever held here.
    start_pseq: u64,
    committed: u64,
    applied: u64,
    acked_sent: u64,
    acks_sent: u64,
    prepare_msgs_consumed: u64,
    prepare_seen: u64,
    commit_seen: u64,
    /// Words last reported to the leader, when, and whether a report is due regardless.
    reported: FollowerWords,
    reported_ns: u64,
    report_due: bool,
    /// A gap in the prepares to report, and when the next NACK may go.
    gap: Option<(u64, u64)>,
    nack_not_before_ns: u64,
    /// This node's writes by session, the sessions waiting for a first send, and the
    /// sequence (0 = none) and send time of each session's unconfirmed write.
    outgoing: EntryRing,
    queue: Vec<u16>,
    queue_head: u64,
    queue_tail: u64,
    unconfirmed: Vec<u64>,
    /// Per session: the write submitted and not yet applied here (0 = none). Unlike
    /// `unconfirmed`, a write stays in flight once prepared, until it is applied: what a
    /// change of leader must send again to the new one.
    in_flight: Vec<u64>,
    sent_ns: Vec<u64>,
    next_write_scan_ns: u64,
    write_msgs_sent: u64,
    write_seen_by_leader: u64,
    write_stalled_since: Option<u64>,
    /// The write being sent, when a WRITE filled up inside it (a transaction of several
    /// entries may span WRITEs): (session, next fragment, whether it is a repeat).
    write_cursor: Option<(u16, u32, bool)>,
    /// Catch-up: a snapshot item too large for a datagram is gathered chunk by chunk here,
    /// with its (item, zxid) and whether every chunk so far carried that zxid.
    snapshot_item: Vec<u8>,
    snapshot_gathering: (u64, u64, bool),
    /// Catch-up: writes up to the base zxid are in the snapshot; snapshot progress.
    base_zxid: Option<u64>,
    snapshot_installed: u64,
    snapshot_end: u64,
    /// Once the snapshot is installed: the commit point to apply before serving.
    serve_at: Option<u64>,
    stats: PipelineStats,
}

impl Follower {
    pub fn new(config: PipelineConfig) -> Self {
        let history = History::empty(&config);
        Follower::with_history(config, history)
    }

    /// A follower that reuses the memory of `history` (this node's earlier role) and keeps
    /// what it says was applied and ordered; it joins its leader like a new one, and the
    /// leader brings it to its history by DIFF or snapshot. What `history` held beyond its
    /// applied point is dropped (and comes again if the new leader's history has it).
    pub fn with_history(config: PipelineConfig, history: History) -> Self {
        let sessions = config.sessions.max(1);
        let History {
            mut ring,
            marked,
            mut ordered_held,
            ordered_applied,
            ..
        } = history;
        ring.clear_presence(marked.0, marked.1);
        // What was held unapplied is dropped with the entries: held is what was applied.
        ordered_held.clear();
        ordered_held.extend_from_slice(&ordered_applied);
        Follower {
            phase: Phase::Joining,
            leader: None,
            leader_heard_ns: None,
            pending: ring,
            ordered_held,
            ordered_applied,
            received: 0,
            start_pseq: 0,
            committed: 0,
            applied: 0,
            acked_sent: 0,
            acks_sent: 0,
            prepare_msgs_consumed: 0,
            prepare_seen: 0,
            commit_seen: 0,
            reported: FollowerWords::default(),
            reported_ns: 0,
            report_due: false,
            gap: None,
            nack_not_before_ns: 0,
            outgoing: EntryRing::new(sessions * config.max_fragments(), config.slot_len),
            queue: vec![0; sessions.next_power_of_two()],
            queue_head: 0,
            queue_tail: 0,
            unconfirmed: vec![0; sessions],
            in_flight: vec![0; sessions],
            sent_ns: vec![0; sessions],
            next_write_scan_ns: 0,
            write_msgs_sent: 0,
            write_seen_by_leader: 0,
            write_stalled_since: None,
            write_cursor: None,
            snapshot_item: if config.snapshot_chunks() > 1 {
                vec![0; config.item_len]
            } else {
                Vec::new()
            },
            snapshot_gathering: (0, 0, false),
            base_zxid: None,
            snapshot_installed: 0,
            snapshot_end: 0,
            serve_at: None,
            stats: PipelineStats::default(),
            config,
        }
    }

    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Prepares below this pseq have been applied here.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Whether nothing is left to do: every forwarded write confirmed, everything received
    /// applied.
    pub fn settled(&self) -> bool {
        self.queue_head == self.queue_tail
            && self.unconfirmed.iter().all(|seq| *seq == 0)
            && self.applied == self.received
    }

    /// Starts the pipeline as the leader's answer to its hello says: at the pseq it names,
    /// with a snapshot of this pipeline's share of the store to follow if it says so. From
    /// then on this follower takes messages only from the process (node, instance) that
    /// answered, in the epoch it answered in.
    ///
    /// `applied_zxid` is what the node applied already: entries up to it that come again (a
    /// new leader's DIFF starts at or before it) are skipped, not applied twice.
    pub fn start(&mut self, answer: &wire::Header, applied_zxid: u64) {
        let start_pseq = answer.words[hello_words::START_PSEQ];
        let catch_up = answer.words[hello_words::CATCH_UP] != 0;
        self.leader = Some(LeaderIdentity {
            node: answer.from_node,
            instance: answer.instance,
            epoch: answer.epoch,
        });
        // This follower's messages speak in its leader's epoch.
        self.config.epoch = answer.epoch;
        self.received = start_pseq;
        self.start_pseq = start_pseq;
        self.committed = start_pseq;
        self.applied = start_pseq;
        self.acked_sent = start_pseq;
        if catch_up {
            let (first, end) = self.config.snapshot_range();
            self.snapshot_installed = first;
            self.snapshot_end = end;
            self.phase = Phase::CatchingUp;
        } else {
            self.base_zxid = Some(applied_zxid);
            self.phase = Phase::Serving;
        }
    }

    /// Queues a transaction of one of this node's sessions for the leader (1 to
    /// [`PipelineConfig::max_txn_len`] bytes); false if the session already has one
    /// outstanding, is out of range, or the transaction is empty or too long.
    pub fn submit_write(&mut self, session: u16, session_seq: u64, txn: &[u8]) -> bool {
        let index = usize::from(session);
        if index >= self.unconfirmed.len()
            || self.unconfirmed[index] != 0
            || session_seq == 0
            || txn.is_empty()
            || txn.len() > self.config.max_txn_len
        {
            return false;
        }
        let meta = EntryMeta::local_write(self.config.node, session, session_seq);
        self.outgoing
            .put_txn(self.outgoing_position(session, 0), meta, txn);
        self.unconfirmed[index] = session_seq;
        self.in_flight[index] = session_seq;
        self.sent_ns[index] = 0;
        let mask = self.queue.len() - 1;
        let slot = usize::try_from(self.queue_tail).unwrap_or(0) & mask;
        self.queue[slot] = session;
        self.queue_tail += 1;
        true
    }

    /// Where fragment `fragment` of `session`'s outgoing write lies.
    fn outgoing_position(&self, session: u16, fragment: u32) -> u64 {
        u64::from(session) * self.config.max_fragments() as u64 + u64::from(fragment)
    }

    /// Whether a message comes from the leader this follower follows: the node and process
    /// instance that answered its hello, in that answer's epoch.
    pub fn knows(&self, header: &wire::Header) -> bool {
        self.leader.is_some_and(|leader| {
            leader.node == header.from_node
                && leader.instance == header.instance
                && leader.epoch == header.epoch
        })
    }

    /// Whether this follower has heard from its leader within `timeout_ns` (counting from its
    /// first step after joining, for a leader that never spoke since).
    pub fn leader_visible(&self, now_ns: u64, timeout_ns: u64) -> bool {
        self.leader_heard_ns
            .is_none_or(|heard| now_ns.saturating_sub(heard) < timeout_ns)
    }

    /// The leader this follower follows, once its hello was answered.
    pub fn leader(&self) -> Option<LeaderIdentity> {
        self.leader
    }

    /// Handles one decoded message from the leader.
    pub fn handle(&mut self, message: &Message<'_>, now_ns: u64, replica: &impl StateMachine) {
        if !self.knows(&message.header) || self.phase == Phase::Joining {
            // Not from the leader process and epoch this follower follows: a prepare from
            // anyone else is never stored, let alone applied.
            self.stats.dropped_unexpected += 1;
            return;
        }
        self.leader_heard_ns = Some(now_ns);
        let words = message.header.words;
        match message.header.kind {
            Kind::Prepare => {
                self.prepare_seen = self.prepare_seen.max(words[leader_words::SEQ]);
                self.committed = self.committed.max(words[leader_words::COMMIT_POINT]);
                if self.received < words[leader_words::RETAINED_FROM] {
                    self.phase = Phase::FellBehind;
                    return;
                }
                self.store_prepares(message);
                self.prepare_msgs_consumed += 1;
            }
            Kind::Commit => {
                self.commit_seen = self.commit_seen.max(words[leader_words::SEQ]);
                // Commits carry the retained point too, so a follower left behind learns it
                // even while no write is prepared.
                if self.received < words[leader_words::RETAINED_FROM] {
                    self.phase = Phase::FellBehind;
                    return;
                }
                let (first, count) = message.range();
                let end = first.saturating_add(count);
                if end <= self.committed {
                    self.stats.duplicates_dropped += 1;
                    self.report_due = true;
                }
                self.committed = self.committed.max(end);
            }
            Kind::Credit => {
                self.write_seen_by_leader = self
                    .write_seen_by_leader
                    .max(words[leader_words::WRITE_SEEN].min(self.write_msgs_sent));
                self.write_stalled_since = None;
            }
            Kind::Snapshot => self.install_snapshot(message, replica),
            Kind::Hello => {
                // A repeated answer to our hello: nothing new.
                self.stats.duplicates_dropped += 1;
            }
            Kind::Write | Kind::Ack | Kind::Nack | Kind::Vote => self.stats.dropped_unexpected += 1,
        }
    }

    fn store_prepares(&mut self, message: &Message<'_>) {
        let (first_pseq, first_zxid) = message.prepare_start();
        let limit = self.applied + self.config.window as u64;
        let count = u64::from(message.header.count);
        let mut stored = 0;
        // A PREPARE's transactions have consecutive zxids from its first; the fragments of
        // one share its zxid (and a PREPARE may go on with one begun in an earlier PREPARE).
        let mut zxid = first_zxid;
        for (index, entry) in message.entries().enumerate() {
            let pseq = first_pseq.saturating_add(index as u64);
            if index > 0 && entry.fragment == 0 {
                zxid = zxid.saturating_add(1);
            }
            if pseq >= limit {
                // Beyond the window this follower can hold: the leader went on without it,
                // and will send these again.
                self.stats.dropped_unexpected += 1;
                break;
            }
            if pseq < self.received || pseq < self.applied || self.pending.meta(pseq).present {
                continue;
            }
            let meta = EntryMeta {
                zxid,
                ..EntryMeta::received(&entry)
            };
            self.pending.put(pseq, meta, entry.bytes);
            stored += 1;
            if entry.fragment == 0 {
                let index = usize::from(entry.origin_node) * self.config.sessions.max(1)
                    + usize::from(entry.session);
                if let Some(seq) = self.ordered_held.get_mut(index) {
                    *seq = (*seq).max(entry.session_seq);
                }
            }
            if entry.origin_node == self.config.node {
                // Our forwarded write is ordered: no need to send it again.
                if let Some(seq) = self.unconfirmed.get_mut(usize::from(entry.session)) {
                    if *seq != 0 && *seq <= entry.session_seq {
                        *seq = 0;
                    }
                }
            }
        }
        if stored == 0 {
            self.stats.duplicates_dropped += 1;
            self.report_due = true;
        }
        while self.received < limit && self.pending.meta(self.received).present {
            self.received += 1;
        }
        if first_pseq > self.received {
            self.gap = Some((self.received, first_pseq.min(limit)));
        }
        if count > 0 {
            self.stats.leader_zxid = self.stats.leader_zxid.max(zxid);
        }
    }

    fn install_snapshot(&mut self, message: &Message<'_>, replica: &impl StateMachine) {
        if self.phase != Phase::CatchingUp {
            self.stats.duplicates_dropped += 1;
            return;
        }
        let (base_zxid, first, end) = message.snapshot_start();
        if self.base_zxid.is_none() {
            replica.set_base(base_zxid);
            self.base_zxid = Some(base_zxid);
        }
        let count = u64::from(message.header.count);
        if first != self.snapshot_installed || end != self.snapshot_end {
            // Snapshot chunks are installed in order; the leader goes back after a timeout.
            self.stats.duplicates_dropped += 1;
            self.report_due = true;
            return;
        }
        let chunks = self.config.snapshot_chunks();
        for index in 0..usize::from(message.header.count) {
            let (item, zxid, slot) = message.snapshot_entry(index);
            if chunks == 1 {
                replica.install(item, zxid, &slot[..self.config.item_len.min(slot.len())]);
                self.stats.snapshot_entries_installed += 1;
                continue;
            }
            let chunk = (first + index as u64) % chunks;
            let gathering = &mut self.snapshot_gathering;
            if chunk == 0 {
                *gathering = (item, zxid, true);
            } else if gathering.0 != item || gathering.1 != zxid {
                // The item changed between its chunks: the change is after the base zxid, so
                // the stream applies it; installing torn bytes would be wrong.
                gathering.2 = false;
            }
            let at = usize::try_from(chunk).unwrap_or(0) * slot.len();
            let taken = slot.len().min(self.snapshot_item.len().saturating_sub(at));
            self.snapshot_item[at..at + taken].copy_from_slice(&slot[..taken]);
            if chunk == chunks - 1 {
                if gathering.2 {
                    replica.install(item, zxid, &self.snapshot_item);
                }
                self.stats.snapshot_entries_installed += 1;
            }
        }
        self.snapshot_installed = (first + count).min(end);
        self.report_due = true;
    }

    /// A one-line summary of the pipeline's positions and credits, for diagnostics.
    pub fn summary(&self) -> String {
        format!(
            "follower n{} p{} {:?}: received {} committed {} applied {} acked {} acks {}/{} seen {}/{} reported {:?} queued {} writes sent {} seen {} snapshot {}/{} {:?}",
            self.config.node,
            self.config.pipeline,
            self.phase,
            self.received,
            self.committed,
            self.applied,
            self.acked_sent,
            self.acks_sent,
            self.prepare_msgs_consumed,
            self.prepare_seen,
            self.commit_seen,
            self.reported,
            self.queue_tail - self.queue_head,
            self.write_msgs_sent,
            self.write_seen_by_leader,
            self.snapshot_installed,
            self.snapshot_end,
            self.stats
        )
    }

    fn words(&self) -> FollowerWords {
        FollowerWords {
            prepare_seen: self.prepare_seen,
            commit_seen: self.commit_seen,
            received: self.received,
            applied: self.applied,
            snapshot_installed: self.snapshot_installed,
        }
    }

    /// The header of a message about to be sent, marking its words as reported: call it only
    /// once the send buffer is secured, or words that never left would count as reported.
    fn header(&mut self, kind: Kind, count: usize, flags: u16, now_ns: u64) -> wire::Header {
        let words = self.words();
        self.reported = words;
        self.reported_ns = now_ns;
        self.report_due = false;
        self.config.header(kind, count, flags, words.to_words())
    }

    /// Runs everything that can make progress: apply, NACK, ACK, forward writes, repeat
    /// unconfirmed ones, report counters.
    pub fn advance(
        &mut self,
        now_ns: u64,
        outbox: &mut impl Outbox,
        replica: &impl StateMachine,
        completions: &mut impl Completions,
        limits: &Limits,
    ) {
        if matches!(self.phase, Phase::Joining | Phase::FellBehind) {
            return;
        }
        // A leader that never spoke since the join is timed from here.
        self.leader_heard_ns.get_or_insert(now_ns);
        self.apply(replica, completions);
        if self.phase == Phase::CatchingUp {
            if self.serve_at.is_none() && self.snapshot_installed >= self.snapshot_end {
                self.serve_at = Some(self.committed);
            }
            if self.serve_at.is_some_and(|point| self.applied >= point) {
                self.phase = Phase::Serving;
                self.abandon_carried_writes(completions);
            }
        }
        let mut sent = self.send_nack(now_ns, outbox, limits);
        sent |= self.send_ack(now_ns, outbox, limits);
        sent |= self.send_writes(now_ns, outbox, limits);
        if !sent {
            self.send_credit_if_due(now_ns, outbox, limits);
        }
    }

    fn apply(&mut self, replica: &impl StateMachine, completions: &mut impl Completions) {
        let Some(base_zxid) = self.base_zxid else {
            return;
        };
        // A transaction is applied once all its fragments are held and committed.
        let ready = self.committed.min(self.received);
        while self.applied < ready {
            let meta = *self.pending.meta(self.applied);
            let fragments = u64::from(self.config.fragments_of(meta.txn_len as usize));
            if self.applied + fragments > ready {
                break;
            }
            if !self.whole_at_applied(&meta, fragments) {
                // Entries that do not make one transaction (the leader prepares whole ones
                // from fragment 0 on): applying them would apply torn bytes. Drop them; they
                // come again from the leader.
                for position in self.applied..self.applied + fragments {
                    self.pending.meta_mut(position).present = false;
                }
                self.received = self.applied;
                self.stats.dropped_unexpected += 1;
                break;
            }
            if meta.zxid > base_zxid {
                let txn = self.pending.txn(self.applied);
                if replica.try_apply(meta.zxid, txn) {
                    if meta.origin_node == self.config.node {
                        if let Some(seq) = self.in_flight.get_mut(usize::from(meta.session)) {
                            if *seq <= meta.session_seq {
                                *seq = 0;
                            }
                        }
                        completions.write_applied(meta.session, meta.session_seq, meta.zxid);
                    }
                    let index = usize::from(meta.origin_node) * self.config.sessions.max(1)
                        + usize::from(meta.session);
                    if let Some(seq) = self.ordered_applied.get_mut(index) {
                        *seq = (*seq).max(meta.session_seq);
                    }
                    self.stats.writes_applied += 1;
                    self.stats.last_applied_zxid = meta.zxid;
                } else if meta.zxid <= replica.applied_zxid() {
                    // Applied here already (zxids are one total order): a new leader's
                    // history overlaps what this node applied under the one before.
                    self.stats.duplicates_dropped += 1;
                } else {
                    self.stats.ordering_stalls += 1;
                    break;
                }
            }
            for position in self.applied..self.applied + fragments {
                self.pending.meta_mut(position).present = false;
            }
            self.applied += fragments;
        }
    }

    /// Whether the `fragments` entries from the applied point are one transaction's, in order:
    /// the first is its fragment 0 and each next one its next fragment, with its zxid, origin
    /// and length.
    fn whole_at_applied(&self, first: &EntryMeta, fragments: u64) -> bool {
        first.fragment == 0
            && (1..fragments).all(|offset| {
                let meta = self.pending.meta(self.applied + offset);
                u64::from(meta.fragment) == offset
                    && meta.zxid == first.zxid
                    && meta.txn_len == first.txn_len
                    && meta.origin_node == first.origin_node
                    && meta.session == first.session
                    && meta.session_seq == first.session_seq
            })
    }

    fn send_nack(&mut self, now_ns: u64, outbox: &mut impl Outbox, limits: &Limits) -> bool {
        let Some((first, end)) = self.gap else {
            return false;
        };
        let first = first.max(self.received);
        if first >= end {
            self.gap = None;
            return false;
        }
        if now_ns < self.nack_not_before_ns {
            return false;
        }
        let Some(buffer) = outbox.buffer() else {
            return false;
        };
        // Only now that the message will go are its words taken as reported.
        let header = self.header(Kind::Nack, 0, 0, now_ns);
        wire::put_header(buffer, &header);
        wire::put_range(buffer, first, end - first);
        outbox.send(
            Target::Leader,
            Kind::Nack,
            wire::HEADER_BYTES + wire::RANGE_BODY,
            0,
        );
        self.gap = None;
        self.stats.gaps_detected += 1;
        self.nack_not_before_ns = now_ns + limits.retransmit_timeout_ns / 2;
        true
    }

    fn send_ack(&mut self, now_ns: u64, outbox: &mut impl Outbox, limits: &Limits) -> bool {
        if self.received <= self.acked_sent || self.acks_sent >= self.prepare_msgs_consumed {
            return false;
        }
        let count = (self.received - self.acked_sent).min(limits.ack_batch.max(1));
        let Some(buffer) = outbox.buffer() else {
            return false;
        };
        // Only now that the message will go are its words taken as reported.
        let header = self.header(Kind::Ack, 0, 0, now_ns);
        wire::put_header(buffer, &header);
        wire::put_range(buffer, self.acked_sent, count);
        outbox.send(
            Target::Leader,
            Kind::Ack,
            wire::HEADER_BYTES + wire::RANGE_BODY,
            count,
        );
        self.acked_sent += count;
        self.acks_sent += 1;
        true
    }

    /// Whether the leader has consumed enough WRITE messages for one more to go; a CREDIT
    /// missing for a whole timeout is taken as lost.
    fn write_credit(&mut self, now_ns: u64, limits: &Limits) -> bool {
        if self.write_msgs_sent - self.write_seen_by_leader < limits.write_credits {
            return true;
        }
        let since = *self.write_stalled_since.get_or_insert(now_ns);
        if now_ns.saturating_sub(since) < limits.retransmit_timeout_ns {
            self.stats.credit_stalls += 1;
            return false;
        }
        // No CREDIT for a whole timeout: it was lost. Unconfirmed writes are repeated
        // anyway, so assume the messages were consumed.
        self.write_seen_by_leader = self.write_msgs_sent;
        self.write_stalled_since = None;
        true
    }

    /// The next write to send when none is under way: a new one first, then a repeat of one
    /// not ordered within the timeout. Sets the cursor; false when there is none.
    fn next_write(&mut self, now_ns: u64, limits: &Limits) -> bool {
        while self.write_cursor.is_none() {
            if self.queue_tail > self.queue_head {
                let mask = self.queue.len() - 1;
                let slot = usize::try_from(self.queue_head).unwrap_or(0) & mask;
                self.queue_head += 1;
                self.write_cursor = Some((self.queue[slot], 0, false));
            } else if let Some(session) = self.repeat_due(now_ns, limits) {
                self.stats.retransmitted_writes += 1;
                self.write_cursor = Some((session, 0, true));
            } else {
                return false;
            }
        }
        true
    }

    /// Forwards writes to the leader: new ones first, then repeats of those not ordered within
    /// the timeout, as many entries to a WRITE as the batch knob and the datagram allow (a
    /// transaction of several entries may span WRITEs), every WRITE within the credits (a
    /// repeat too: it is as many datagrams). A WRITE holds new writes or repeats, not both.
    fn send_writes(&mut self, now_ns: u64, outbox: &mut impl Outbox, limits: &Limits) -> bool {
        let mut sent = false;
        let mut repeats = 0;
        let room = self.config.mtu - wire::HEADER_BYTES - wire::WRITE_PREFIX;
        let batch = limits
            .write_batch
            .clamp(1, rzab_shared::limits::MAX_WRITES_PER_MSG);
        while repeats < RETRANSMIT_BURST && self.next_write(now_ns, limits) {
            if !self.write_credit(now_ns, limits) {
                break;
            }
            let Some(buffer) = outbox.buffer() else {
                break;
            };
            let mut len = wire::HEADER_BYTES + wire::WRITE_PREFIX;
            let mut count = 0usize;
            let mut message_repeats = None;
            while count < batch {
                let Some((session, fragment, repeat)) = self.write_cursor else {
                    if self.next_write(now_ns, limits) {
                        continue;
                    }
                    break;
                };
                if repeat && self.unconfirmed[usize::from(session)] == 0 {
                    // Ordered meanwhile: the rest need not go.
                    self.write_cursor = None;
                    continue;
                }
                if *message_repeats.get_or_insert(repeat) != repeat {
                    break;
                }
                let position = self.outgoing_position(session, fragment);
                if len + self.outgoing.wire_len(position)
                    > wire::HEADER_BYTES + wire::WRITE_PREFIX + room
                {
                    break;
                }
                len += self
                    .outgoing
                    .encode_entries(position, 1, &mut buffer[len..]);
                count += 1;
                self.sent_ns[usize::from(session)] = now_ns;
                let fragments = self
                    .config
                    .fragments_of(self.outgoing.meta(position).txn_len as usize);
                self.write_cursor =
                    (fragment + 1 < fragments).then_some((session, fragment + 1, repeat));
            }
            if count == 0 {
                break;
            }
            let repeat = message_repeats.unwrap_or(false);
            let seq = self.write_msgs_sent + 1;
            let flags = if repeat { FLAG_RETRANSMIT } else { 0 };
            // Only now that the message will go are its words taken as reported.
            let header = self.header(Kind::Write, count, flags, now_ns);
            wire::put_header(buffer, &header);
            wire::put_write_prefix(buffer, seq);
            if repeat {
                outbox.resend(Target::Leader, Kind::Write, len);
                repeats += 1;
            } else {
                outbox.send(Target::Leader, Kind::Write, len, count as u64);
            }
            self.write_msgs_sent = seq;
            sent = true;
        }
        sent
    }

    /// A session whose write has waited a whole timeout since it was last sent (looked for at
    /// most every half timeout).
    fn repeat_due(&mut self, now_ns: u64, limits: &Limits) -> Option<u16> {
        if now_ns < self.next_write_scan_ns {
            return None;
        }
        let due = (0..self.unconfirmed.len()).find(|session| {
            self.unconfirmed[*session] != 0
                && self.sent_ns[*session] != 0
                && now_ns.saturating_sub(self.sent_ns[*session]) >= limits.retransmit_timeout_ns
        });
        if due.is_none() {
            self.next_write_scan_ns = now_ns + (limits.retransmit_timeout_ns / 2).max(1);
        }
        due.and_then(|session| u16::try_from(session).ok())
    }

    fn send_credit_if_due(&mut self, now_ns: u64, outbox: &mut impl Outbox, limits: &Limits) {
        // One rule for when a report is due, shared with `next_deadline`.
        if self.credit_report_at(now_ns, limits) > now_ns {
            return;
        }
        let Some(buffer) = outbox.buffer() else {
            return;
        };
        // Only now that the message will go are its words taken as reported.
        let header = self.header(Kind::Credit, 0, 0, now_ns);
        wire::put_header(buffer, &header);
        outbox.send(Target::Leader, Kind::Credit, wire::HEADER_BYTES, 0);
    }

    /// The words of a hello from this follower, whose node has applied up to
    /// `applied_zxid` and accepted epochs up to `accepted_epoch`.
    pub fn hello_words(
        &self,
        applied_zxid: u64,
        accepted_epoch: u32,
        join: u64,
    ) -> [u64; wire::WORDS] {
        let mut words = [0u64; wire::WORDS];
        words[hello_words::FINGERPRINT] = self.config.fingerprint;
        words[hello_words::APPLIED_ZXID] = applied_zxid;
        words[hello_words::ACCEPTED_EPOCH] = u64::from(accepted_epoch);
        words[hello_words::JOIN] = join;
        words
    }

    /// The earliest time at which [`Follower::advance`] could do something it would not do at
    /// `now_ns` without new input (a message, a submitted write): `now_ns` or earlier when it
    /// has work at once, `u64::MAX` when only input can give it any. It mirrors every test
    /// `advance` makes: early only costs an advance that finds nothing, late would leave the
    /// pipeline standing still until some message happens to come. Reads the state only.
    pub fn next_deadline(&self, now_ns: u64, limits: &Limits) -> u64 {
        if matches!(self.phase, Phase::Joining | Phase::FellBehind) {
            return u64::MAX;
        }
        // The first step after the join starts the leader's silence clock; committed entries
        // wait to be applied (`try_apply` may be waiting for another pipeline's zxid, which
        // no message to this one announces: it is polled); an installed snapshot or a reached
        // commit point moves a catching-up follower on; held prepares wait to be acknowledged.
        if self.leader_heard_ns.is_none()
            || (self.base_zxid.is_some() && self.applied < self.committed.min(self.received))
            || (self.phase == Phase::CatchingUp
                && match self.serve_at {
                    None => self.snapshot_installed >= self.snapshot_end,
                    Some(point) => self.applied >= point,
                })
            || (self.received > self.acked_sent && self.acks_sent < self.prepare_msgs_consumed)
        {
            return now_ns;
        }
        let mut deadline = u64::MAX;
        // A gap goes in a NACK once the last one's pause is over; one filled meanwhile needs
        // nothing.
        if let Some((first, end)) = self.gap {
            if first.max(self.received) < end {
                deadline = deadline.min(self.nack_not_before_ns);
            }
        }
        // Writes waiting to go (new ones, or the rest of one a full WRITE cut short) need a write credit.
        if self.queue_tail > self.queue_head || self.write_cursor.is_some() {
            deadline = deadline.min(self.write_credit_at(now_ns, limits));
        }
        // Unconfirmed writes are looked for from `next_write_scan_ns` on (unless a fragmented
        // write is still going), and each scan sets the next: kept even with nothing
        // unconfirmed, as the schedule decides when later repeats go, so a driver that
        // advances only at deadlines repeats exactly when one advancing every spin would.
        if self.write_cursor.is_none() {
            deadline = deadline.min(self.next_write_scan_ns);
        }
        deadline.min(self.credit_report_at(now_ns, limits))
    }

    /// When [`Follower::write_credit`] lets the next WRITE go: at once with credit left (or
    /// when the stall has yet to be timed, which `advance` starts), else when the missing
    /// CREDIT is taken as lost.
    fn write_credit_at(&self, now_ns: u64, limits: &Limits) -> u64 {
        if self.write_msgs_sent - self.write_seen_by_leader < limits.write_credits {
            return now_ns;
        }
        self.write_stalled_since.map_or(now_ns, |since| {
            due_at(now_ns, since, limits.retransmit_timeout_ns)
        })
    }

    /// When `send_credit_if_due` reports: at once when asked to or when enough moved, after a
    /// quarter timeout for anything unreported, after the heartbeat interval regardless
    /// (silence must mean a dead or cut-off follower, never an idle one).
    fn credit_report_at(&self, now_ns: u64, limits: &Limits) -> u64 {
        let words = self.words();
        let reported = self.reported;
        if self.report_due
            || words.prepare_seen - reported.prepare_seen.min(words.prepare_seen)
                >= half(limits.prepare_credits)
            || words.commit_seen - reported.commit_seen.min(words.commit_seen)
                >= half(limits.commit_credits)
            || words.applied - reported.applied.min(words.applied)
                >= (self.config.window as u64 / 4).max(1)
        {
            return now_ns;
        }
        let heartbeat = due_at(now_ns, self.reported_ns, limits.heartbeat_interval_ns);
        if words != reported {
            heartbeat.min(due_at(
                now_ns,
                self.reported_ns,
                limits.retransmit_timeout_ns / 4,
            ))
        } else {
            heartbeat
        }
    }

    /// What this follower holds, for the role it takes next (an election): its ring, whole
    /// transactions from its start (or the oldest not yet overwritten) to the last held whole.
    pub fn into_history(mut self) -> History {
        let capacity = self.pending.capacity() as u64;
        let oldest = self.start_pseq.max(self.received.saturating_sub(capacity));
        let from = super::leader::first_whole(&self.pending, oldest, self.received);
        // A transaction held only in part is not history yet: it ends before it.
        let end =
            super::whole_end(&self.pending, &self.config, from, self.received).max(self.applied);
        // The table handed on holds what was applied and what the history holds past that,
        // not prepares taken beyond a gap or a transaction's first fragments, which it drops.
        super::ordered_through(
            &mut self.ordered_held,
            &self.ordered_applied,
            &self.pending,
            &self.config,
            self.applied.max(from),
            end,
        );
        History {
            from,
            applied: self.applied,
            end,
            marked: (self.applied, self.applied + self.config.window as u64),
            ring: self.pending,
            ordered_held: self.ordered_held,
            ordered_applied: self.ordered_applied,
        }
    }

    /// A follower holding nothing, in rings of one slot: what a node's role is for the
    /// instant its roles change (its memory is then handed from the old role to the new).
    pub fn placeholder(config: &PipelineConfig) -> Follower {
        let tiny = PipelineConfig {
            retained: 1,
            window: 1,
            sessions: 1,
            max_txn_len: config.slot_len,
            item_len: 0,
            ..*config
        };
        Follower::new(tiny)
    }

    /// At the end of a catch-up by snapshot: the writes still in flight were sent again
    /// from an earlier role (sessions issue nothing while the node catches up), and any of
    /// them the new leader ordered before the snapshot's base will never be seen applied
    /// here; the leader drops their repeats as ordered. They are given up.
    fn abandon_carried_writes(&mut self, completions: &mut impl Completions) {
        for (session, seq) in self.in_flight.iter_mut().enumerate() {
            if *seq == 0 {
                continue;
            }
            if let Ok(session) = u16::try_from(session) {
                completions.write_abandoned(session, *seq);
            }
            if let Some(unconfirmed) = self.unconfirmed.get_mut(session) {
                *unconfirmed = 0;
            }
            self.stats.writes_abandoned += 1;
            *seq = 0;
        }
    }

    /// The zxid of the last transaction held whole, if this pipeline holds any.
    pub fn last_zxid(&self) -> Option<u64> {
        let capacity = self.pending.capacity() as u64;
        let oldest = self.start_pseq.max(self.received.saturating_sub(capacity));
        (self.received > oldest).then(|| self.pending.meta(self.received - 1).zxid)
    }

    /// Calls `each` with every write of this node's sessions submitted and not applied yet:
    /// (session, session sequence, transaction). A change of leader sends them to the new one.
    pub fn for_each_local_write(&self, mut each: impl FnMut(u16, u64, Txn<'_>)) {
        for (session, seq) in self.in_flight.iter().enumerate() {
            let Ok(session) = u16::try_from(session) else {
                break;
            };
            let position = self.outgoing_position(session, 0);
            if *seq != 0 && self.outgoing.meta(position).session_seq == *seq {
                each(session, *seq, self.outgoing.txn(position));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;
    use crate::zab::test_support::*;

    #[test]
    fn words_count_as_reported_only_once_a_message_carries_them() {
        let config = small_config(1, 4, 7);
        let replica = small_replica();
        let mut follower = Follower::new(config);
        let mut answer = config.header(Kind::Hello, 0, 0, [0; wire::WORDS]);
        answer.from_node = 0;
        answer.instance = 1;
        follower.start(&answer, 0);
        follower.report_due = true;
        let limits = Limits::default();
        follower.advance(
            1_000,
            &mut FullOutbox,
            &replica,
            &mut NoCompletions,
            &limits,
        );
        assert!(
            follower.report_due && follower.reported_ns == 0,
            "words were marked reported although no message could carry them"
        );
        let mut outbox = Recording(vec![0; 1024], Vec::new());
        follower.advance(2_000, &mut outbox, &replica, &mut NoCompletions, &limits);
        assert_eq!(outbox.1, [Kind::Credit]);
        assert!(!follower.report_due && follower.reported_ns == 2_000);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod deadline_tests {
    use super::*;
    use crate::zab::test_support::*;

    /// Records the kinds sent.
    fn started_follower() -> Follower {
        let config = small_config(1, 4, 7);
        let mut follower = Follower::new(config);
        let mut answer = config.header(Kind::Hello, 0, 0, [0; wire::WORDS]);
        answer.from_node = 0;
        answer.instance = 1;
        follower.start(&answer, 0);
        follower
    }

    #[test]
    fn an_idle_follower_waits_for_its_heartbeat_and_a_submitted_write_is_due_at_once() {
        let replica = small_replica();
        // Scans for writes to repeat (every half timeout) come later than the heartbeat here.
        let limits = Limits {
            retransmit_timeout_ns: 100_000_000,
            ..Limits::default()
        };
        let heartbeat = limits.heartbeat_interval_ns;
        let mut follower = started_follower();
        let mut outbox = Recording(vec![0; 1024], Vec::new());
        let mut advance = |follower: &mut Follower, now_ns: u64| {
            outbox.1.clear();
            follower.advance(now_ns, &mut outbox, &replica, &mut NoCompletions, &limits);
            std::mem::take(&mut outbox.1)
        };
        assert_eq!(
            follower.next_deadline(1_000, &limits),
            1_000,
            "the first step after the join starts timing the leader's silence"
        );
        assert!(advance(&mut follower, 1_000).is_empty());

        // Nothing to forward, acknowledge or report: the heartbeat CREDIT, an interval after
        // the last report (none yet).
        assert_eq!(follower.next_deadline(1_000, &limits), heartbeat);
        assert!(advance(&mut follower, heartbeat - 1).is_empty());
        assert_eq!(advance(&mut follower, heartbeat), [Kind::Credit]);
        assert_eq!(follower.next_deadline(heartbeat, &limits), 2 * heartbeat);

        // A write is forwarded at once; then the next step is the scan for writes to repeat.
        let now_ns = heartbeat + 5_000;
        assert!(follower.submit_write(2, 1, &[7; 24]));
        assert_eq!(follower.next_deadline(now_ns, &limits), now_ns);
        assert_eq!(advance(&mut follower, now_ns), [Kind::Write]);
        assert_eq!(
            follower.next_deadline(now_ns, &limits),
            (1_000 + limits.retransmit_timeout_ns / 2).min(now_ns + heartbeat)
        );
    }

    #[test]
    fn with_default_limits_an_idle_follower_wakes_for_the_write_scan() {
        let replica = small_replica();
        let limits = Limits::default();
        let mut follower = started_follower();
        let mut outbox = Recording(vec![0; 1024], Vec::new());
        follower.advance(1_000, &mut outbox, &replica, &mut NoCompletions, &limits);
        // The scan's schedule decides when later repeats go, so it is kept even when idle.
        let scan = 1_000 + limits.retransmit_timeout_ns / 2;
        assert!(outbox.1.is_empty());
        assert_eq!(follower.next_deadline(1_000, &limits), scan);
        follower.advance(scan, &mut outbox, &replica, &mut NoCompletions, &limits);
        assert!(outbox.1.is_empty());
        assert_eq!(
            follower.next_deadline(scan, &limits),
            scan + limits.retransmit_timeout_ns / 2
        );
    }
}
