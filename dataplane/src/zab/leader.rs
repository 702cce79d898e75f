//! The leader's side of one pipeline: takes client writes (forwarded by followers or from its
//! own sessions, each (node, session, sequence) ordered at most once), gives them zxids,
//! broadcasts PREPAREs, counts cumulative ACKs, commits at a quorum, applies in zxid order and
//! broadcasts COMMITs. It retransmits what a follower has not acknowledged, serves NACKed gaps,
//! lets a quorum go on without a slow follower, and streams a snapshot to a restarted one.
//! Pure state machine; see the parent module.

use rzab_shared::limits::{MAX_NODES, MAX_PREPARES_PER_MSG, MAX_WRITES_PER_MSG};

use super::wire::{self, FLAG_RETRANSMIT, Kind, Message};
use super::{
    CatchupBoard, Completions, EntryMeta, EntryRing, FollowerWords, History, Limits,
    MAX_PREPARE_CREDITS, MAX_WRITE_CREDITS, Outbox, PipelineConfig, PipelineStats,
    RETRANSMIT_BURST, SNAPSHOT_MESSAGES_IN_FLIGHT, StateMachine, Target, Txn, ZxidSource, due_at,
    half, hello_words, leader_words,
};

/// Snapshot transfer towards one follower.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum SnapshotSend {
    #[default]
    Idle,
    /// Waiting for the leader's other pipelines to agree on the base zxid.
    WaitingForBase,
    Sending {
        base_zxid: u64,
        /// Next key position to send.
        next: u64,
        /// Key positions below this are installed at the follower.
        installed: u64,
        end: u64,
        /// Whether anything was sent yet (an empty range still sends one message).
        announced: bool,
    },
}

/// A forwarded write too large for one datagram, gathered fragment by fragment, in any order
/// (a bitmap says which are in; a lost one comes with the follower's repeat), until it is
/// whole and can be queued for ordering. One per follower session (a session has one write
/// outstanding): under loss a follower has several partly gathered at once, and one assembly
/// per follower would throw away the progress of each whenever another's fragment came.
#[derive(Debug, Default)]
struct WriteAssembly {
    /// The write being gathered (0: none), and its length.
    session_seq: u64,
    txn_len: u32,
    /// Fragments in, and which.
    received: u32,
    have: Vec<u64>,
    bytes: Vec<u8>,
}

impl WriteAssembly {
    fn restart(&mut self, session_seq: u64, txn_len: u32) {
        self.session_seq = session_seq;
        self.txn_len = txn_len;
        self.received = 0;
        self.have.fill(0);
    }
}

/// What the leader knows of one follower.
#[derive(Clone, Copy, Debug, Default)]
struct FollowerLink {
    /// The follower process this link serves; 0 until it said hello.
    instance: u64,
    /// Which join of that process (its hellos count them).
    join: u64,
    /// The pseq its pipeline started at, and whether it catches up by snapshot.
    start_pseq: u64,
    catch_up: bool,
    /// Every prepare below this pseq is held by the follower.
    acked: u64,
    /// The follower has applied every prepare below this pseq.
    applied: u64,
    prepare_seen: u64,
    commit_seen: u64,
    /// Highest WRITE message sequence received, and the value last sent back in a CREDIT.
    write_seen: u64,
    write_reported: u64,
    credit_sent_ns: u64,
    credit_due: bool,
    /// Last time the follower made progress (or was up to date), and the current timeout.
    progress_ns: u64,
    retransmit_timeout_ns: u64,
    /// A gap the follower reported, to fill.
    nack: Option<(u64, u64)>,
    /// Repairing: unicast prepares stream to the follower from `repair_next` until it
    /// reaches `next_pseq`, a bounded number ahead of what the follower acknowledged.
    repairing: bool,
    repair_next: u64,
    /// Last time anything came from the follower.
    heard_ns: u64,
    prepare_blocked_since: Option<u64>,
    commit_blocked_since: Option<u64>,
    hello_due: bool,
    snapshot: SnapshotSend,
    snapshot_progress_ns: u64,
}

/// Which queue of writes waiting for a zxid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    /// Writes of one entry.
    Small,
    /// Writes of several entries, and the writes of their sessions behind them.
    Bulk,
}

/// Writes waiting for a zxid, in arrival order: positions `head..tail` of a ring.
#[derive(Debug)]
struct WriteQueue {
    ring: EntryRing,
    head: u64,
    tail: u64,
}

impl WriteQueue {
    fn new(capacity: usize, slot_len: usize) -> Self {
        WriteQueue {
            ring: EntryRing::new(capacity, slot_len),
            head: 0,
            tail: 0,
        }
    }

    /// Entries waiting.
    fn len(&self) -> u64 {
        self.tail - self.head
    }

    fn has_room(&self, entries: u32) -> bool {
        self.len() + u64::from(entries) <= self.ring.capacity() as u64
    }

    /// Queues a whole transaction (room checked by the caller).
    fn push_txn(&mut self, meta: EntryMeta, txn: &[u8]) {
        self.tail += self.ring.put_txn(self.tail, meta, txn);
    }

    /// The entry at the head (the queue is not empty).
    fn head_meta(&self) -> &EntryMeta {
        self.ring.meta(self.head)
    }
}

/// The leader's state for one pipeline.
///
/// Writes wait for a zxid in two queues, so that a large transaction never holds small ones
/// behind it for longer than it takes to prepare one large transaction: writes of one entry
/// go to `incoming`, writes of several (and any later write of a session with one waiting, so
/// a session's writes keep their order) to `bulk`. Once a bulk transaction's last entry is
/// prepared, the small writes queued by then go before the next bulk one starts; so a small
/// write waits for at most the bulk transaction being prepared when it came, and a bulk one
/// for at most the small writes queued when the one before it ended (at most one per session).
#[derive(Debug)]
pub struct Leader {
    config: PipelineConfig,
    /// Writes of one entry waiting for a zxid.
    incoming: WriteQueue,
    /// Writes of several entries (and those behind them in their sessions) waiting for a
    /// zxid, whole.
    bulk: WriteQueue,
    /// Writes in `bulk` not yet begun, by origin node and session.
    bulk_waiting: Vec<u32>,
    /// Small writes below this position go before the next bulk transaction begins.
    small_turn_end: u64,
    /// Prepared writes by pseq, [`PipelineConfig::retained`] deep: the committed-transaction
    /// ring that retransmissions and DIFF catch-up are served from.
    pending: EntryRing,
    next_pseq: u64,
    committed: u64,
    applied: u64,
    commit_sent: u64,
    prepare_msgs_sent: u64,
    commit_msgs_sent: u64,
    links: [FollowerLink; MAX_NODES],
    /// Highest session sequence ordered, by origin node and session (exactly-once), and the
    /// highest applied here.
    ordered: Vec<u64>,
    ordered_applied: Vec<u64>,
    /// Nodes whose entries in `ordered` came with the history this leader took over (it was
    /// elected): the first hello of each is the same process rejoining, whose repeats the
    /// table must still recognise, so it does not clear them as a new process's.
    ordered_inherited: u64,
    /// The oldest pseq this leader holds (a leader that took over a history holds what it held
    /// as a follower, from the pseq its pipeline then started at).
    history_from: u64,
    /// Fragmented forwarded writes being gathered, by follower and session (empty unless
    /// transactions travel as fragments).
    assemblies: Vec<WriteAssembly>,
    /// Snapshot items too large for a datagram go in chunks, read once per item into this
    /// buffer: (item, zxid) of what it holds.
    snapshot_item: Vec<u8>,
    snapshot_cached: Option<(u64, u64)>,
    /// When the last PREPARE or COMMIT went to every follower.
    broadcast_ns: u64,
    /// The followers (and this node) heard from in this leader's epoch, by bit: a message
    /// passes [`Leader::knows`] only once its sender accepted the epoch. An elected leader
    /// orders no new write before a quorum has (Zab's ACKEPOCH): two nodes that each gathered
    /// a quorum of hellos for the same epoch (one answer lost) cannot both give its zxids.
    epoch_backers: u64,
    stats: PipelineStats,
}

impl Leader {
    pub fn new(config: PipelineConfig) -> Self {
        let history = History::empty(&config);
        Leader::with_history(config, history)
    }

    /// A leader that goes on from `history` (what this node held as a follower, or as the
    /// leader of an earlier epoch): its entries stay at their pseqs, those past its applied
    /// point are proposed again in `config.epoch` and committed once a quorum holds them.
    pub fn with_history(config: PipelineConfig, history: History) -> Self {
        // Each session has at most one write outstanding and repeats are dropped before they
        // are queued, so every node's sessions fit; the credit bound is kept as well.
        // A fragmented write is queued only once whole, so the sessions bound it too.
        let fragments = config.max_fragments();
        let incoming_capacity = (usize::from(config.nodes) * config.sessions.max(1))
            .max(config.followers() * MAX_WRITE_CREDITS * MAX_WRITES_PER_MSG + config.sessions);
        let bulk_capacity = if fragments > 1 {
            usize::from(config.nodes) * config.sessions.max(1) * fragments
        } else {
            1
        };
        let (assemblies, snapshot_item) = if fragments > 1 || config.snapshot_chunks() > 1 {
            let sessions = config.sessions.max(1);
            let assemblies = (0..usize::from(config.nodes) * sessions)
                .map(|slot| {
                    let node = slot / sessions;
                    let follower = fragments > 1
                        && node < usize::from(config.nodes)
                        && node != usize::from(config.node);
                    WriteAssembly {
                        bytes: if follower {
                            vec![0; config.max_txn_len]
                        } else {
                            Vec::new()
                        },
                        have: if follower {
                            vec![0; fragments.div_ceil(64)]
                        } else {
                            Vec::new()
                        },
                        ..WriteAssembly::default()
                    }
                })
                .collect();
            let item = if config.snapshot_chunks() > 1 {
                vec![0; config.item_len]
            } else {
                Vec::new()
            };
            (assemblies, item)
        } else {
            (Vec::new(), Vec::new())
        };
        // A follower's history may hold prepares it took beyond a gap, past its end: they
        // are no part of it, and must not pass for entries this leader prepares there.
        let mut ring = history.ring;
        if history.marked.1 > history.end {
            ring.clear_presence(history.end, history.marked.1);
        }
        Leader {
            incoming: WriteQueue::new(incoming_capacity.max(1), config.slot_len),
            bulk: WriteQueue::new(bulk_capacity, config.slot_len),
            bulk_waiting: vec![0; MAX_NODES * config.sessions.max(1)],
            small_turn_end: 0,
            pending: ring,
            next_pseq: history.end,
            committed: history.applied,
            applied: history.applied,
            commit_sent: 0,
            prepare_msgs_sent: 0,
            commit_msgs_sent: 0,
            links: [FollowerLink::default(); MAX_NODES],
            ordered: history.ordered_held,
            ordered_applied: history.ordered_applied,
            ordered_inherited: if history.end > history.from {
                u64::MAX
            } else {
                0
            },
            history_from: history.from,
            assemblies,
            snapshot_item,
            snapshot_cached: None,
            broadcast_ns: 0,
            // The leader of the start is backed by the start-up handshake, which every node
            // joins before it orders a write.
            epoch_backers: u64::MAX,
            stats: PipelineStats::default(),
            config,
        }
    }

    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// Prepares issued so far (the next pseq).
    pub fn prepared(&self) -> u64 {
        self.next_pseq
    }

    /// Writes committed so far (by pseq).
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The oldest pseq that can still be retransmitted.
    fn retained_from(&self) -> u64 {
        self.next_pseq
            .saturating_sub(self.pending.capacity() as u64)
            .max(self.history_from)
    }

    /// Whether everything ordered is committed, applied and held by every follower that is
    /// in touch (its link made progress within `within_ns`).
    pub fn settled(&self, now_ns: u64, within_ns: u64) -> bool {
        self.incoming_len() == 0
            && self.applied == self.next_pseq
            && self.commit_sent == self.committed
            && self.follower_ids().all(|follower| {
                let link = &self.links[follower];
                link.instance == 0
                    || now_ns.saturating_sub(link.progress_ns) > within_ns
                    || (link.applied == self.next_pseq
                        && matches!(link.snapshot, SnapshotSend::Idle))
            })
    }

    /// A one-line summary of the pipeline's positions and credits, for diagnostics.
    pub fn summary(&self) -> String {
        let links: Vec<String> = self
            .follower_ids()
            .map(|follower| {
                let link = &self.links[follower];
                format!(
                    "f{follower}[acked {} prep {}/{} commit {}/{} applied {} writes {}/{} snapshot {:?}]",
                    link.acked,
                    link.prepare_seen,
                    self.prepare_msgs_sent,
                    link.commit_seen,
                    self.commit_msgs_sent,
                    link.applied,
                    link.write_reported,
                    link.write_seen,
                    link.snapshot
                )
            })
            .collect();
        format!(
            "leader p{}: incoming {} next {} committed {} commit_sent {} applied {} {} {:?}",
            self.config.pipeline,
            self.incoming_len(),
            self.next_pseq,
            self.committed,
            self.commit_sent,
            self.applied,
            links.join(" "),
            self.stats
        )
    }

    /// Writes waiting for a zxid (entries, in both queues).
    fn incoming_len(&self) -> u64 {
        self.incoming.len() + self.bulk.len()
    }

    fn queue(&self, queue: Queue) -> &WriteQueue {
        match queue {
            Queue::Small => &self.incoming,
            Queue::Bulk => &self.bulk,
        }
    }

    /// The queue a write of `fragments` entries from `node`'s `session` goes to.
    fn queue_for(&self, node: u8, session: u16, fragments: u32) -> Queue {
        let waiting = self
            .bulk_waiting
            .get(usize::from(node) * self.config.sessions.max(1) + usize::from(session))
            .copied()
            .unwrap_or(0);
        if fragments > 1 || waiting > 0 {
            Queue::Bulk
        } else {
            Queue::Small
        }
    }

    /// Queues a whole transaction (room checked by the caller) with `meta`.
    fn enqueue(&mut self, queue: Queue, meta: EntryMeta, txn: &[u8]) {
        match queue {
            Queue::Small => self.incoming.push_txn(meta, txn),
            Queue::Bulk => {
                let index = usize::from(meta.origin_node) * self.config.sessions.max(1)
                    + usize::from(meta.session);
                if let Some(waiting) = self.bulk_waiting.get_mut(index) {
                    *waiting += 1;
                }
                self.bulk.push_txn(meta, txn);
            }
        }
    }

    /// Queues a transaction of one of this node's own sessions (1 to
    /// [`PipelineConfig::max_txn_len`] bytes); false when there is no room or it is empty or
    /// too long.
    pub fn submit_write(&mut self, session: u16, session_seq: u64, txn: &[u8]) -> bool {
        let fragments = self.config.fragments_of(txn.len());
        let queue = self.queue_for(self.config.node, session, fragments);
        if txn.is_empty()
            || txn.len() > self.config.max_txn_len
            || usize::from(session) >= self.config.sessions.max(1)
            || !self.queue(queue).has_room(fragments)
        {
            return false;
        }
        let ordered =
            usize::from(self.config.node) * self.config.sessions.max(1) + usize::from(session);
        if session_seq <= self.ordered[ordered] {
            // Sent again after a change of leader, and in this leader's history already: it
            // completes when that entry is applied.
            self.stats.duplicates_dropped += 1;
            return true;
        }
        self.ordered[ordered] = session_seq;
        let meta = EntryMeta::local_write(self.config.node, session, session_seq);
        self.enqueue(queue, meta, txn);
        true
    }

    /// A follower process said hello. A new instance restarts the link: at pseq 0 when the
    /// cluster is starting (`catch_up` false), or at this pipeline's applied point with a
    /// snapshot to follow. A repeated hello of the same instance is answered again. Returns the
    /// start pseq and whether a snapshot follows.
    ///
    /// A follower whose node has applied something (`applied_zxid` past the start) and whose
    /// every later transaction this leader still holds starts where its applied point lies in
    /// the ring (DIFF), with no snapshot, and skips what it applied already.
    #[allow(clippy::too_many_arguments)]
    pub fn accept_hello(
        &mut self,
        follower: u8,
        instance: u64,
        now_ns: u64,
        catch_up: bool,
        (applied_zxid, join): (u64, u64),
        board: &CatchupBoard,
        replica: &impl StateMachine,
    ) -> (u64, bool) {
        let index = usize::from(follower);
        if index >= usize::from(self.config.nodes) || follower == self.config.node {
            self.stats.dropped_unexpected += 1;
            return (0, false);
        }
        if self.links[index].instance == instance && self.links[index].join == join {
            let link = &mut self.links[index];
            link.hello_due = true;
            return (link.start_pseq, link.catch_up);
        }
        // The same process joining again (after an election of its own) keeps its sessions:
        // the exactly-once table must still know what they sent.
        let same_process = self.links[index].instance == instance;
        let diff = if catch_up && applied_zxid > super::ZXID_START {
            self.diff_start(applied_zxid, replica.applied_zxid())
        } else {
            None
        };
        let catch_up = catch_up && diff.is_none();
        let start_pseq = match diff {
            Some(start) => start,
            None if catch_up => self.applied,
            None => 0,
        };
        self.links[index] = FollowerLink {
            instance,
            join,
            start_pseq,
            catch_up,
            acked: start_pseq,
            applied: start_pseq,
            prepare_seen: self.prepare_msgs_sent,
            commit_seen: self.commit_msgs_sent,
            progress_ns: now_ns,
            heard_ns: now_ns,
            hello_due: true,
            snapshot: if catch_up {
                SnapshotSend::WaitingForBase
            } else {
                SnapshotSend::Idle
            },
            snapshot_progress_ns: now_ns,
            ..FollowerLink::default()
        };
        let sessions = self.config.sessions.max(1);
        if self.ordered_inherited & (1 << index) == 0 && !same_process {
            self.ordered[index * sessions..(index + 1) * sessions].fill(0);
        }
        self.ordered_inherited &= !(1 << index);
        // What the old process had partly sent must not mix with the new one's writes (which
        // may reuse its session sequences).
        if let Some(assemblies) = self
            .assemblies
            .get_mut(index * sessions..(index + 1) * sessions)
            .filter(|_| !same_process)
        {
            for assembly in assemblies {
                assembly.restart(0, 0);
            }
        }
        if catch_up {
            board.register(index, instance, self.config.pipeline, replica);
        }
        self.stats.diff_syncs += u64::from(diff.is_some());
        if start_pseq < self.next_pseq {
            self.start_repair(index, start_pseq);
        }
        (start_pseq, catch_up)
    }

    /// Whether this leader has heard, within `timeout_ns`, from enough followers to make a
    /// quorum with itself. A leader that has not cannot commit, and says so.
    pub fn quorum_visible(&self, now_ns: u64, timeout_ns: u64) -> bool {
        let heard = self
            .follower_ids()
            .filter(|follower| {
                let link = &self.links[*follower];
                link.instance != 0 && now_ns.saturating_sub(link.heard_ns) < timeout_ns
            })
            .count();
        heard >= self.config.quorum_followers()
    }

    /// Whether a message comes from a follower process that joined this pipeline (said
    /// hello), in this leader's epoch. Hellos are how instances become known: check them with
    /// [`Leader::accept_hello`] instead.
    /// Makes this an elected leader that waits for a quorum to accept its epoch before it
    /// orders a new write.
    pub fn await_epoch_backers(&mut self) {
        self.epoch_backers = 1u64 << u32::from(self.config.node).min(63);
    }

    /// Whether a quorum (this node included) has accepted this leader's epoch.
    pub fn epoch_backed(&self) -> bool {
        self.epoch_backers.count_ones() as usize > usize::from(self.config.nodes) / 2
    }

    pub fn knows(&self, header: &wire::Header) -> bool {
        let from = usize::from(header.from_node);
        from != usize::from(self.config.node)
            && header.epoch == self.config.epoch
            && self
                .links
                .get(from)
                .is_some_and(|link| link.instance != 0 && link.instance == header.instance)
    }

    /// Handles one decoded message from a follower (hellos go to [`Leader::accept_hello`]).
    pub fn handle(&mut self, message: &Message<'_>, now_ns: u64) {
        let from = usize::from(message.header.from_node);
        if from == usize::from(self.config.node) || from >= usize::from(self.config.nodes) {
            self.stats.dropped_unexpected += 1;
            return;
        }
        let words = FollowerWords::from_words(message.header.words);
        let next_pseq = self.next_pseq;
        let (prepares_sent, commits_sent) = (self.prepare_msgs_sent, self.commit_msgs_sent);
        if !self.knows(&message.header) {
            // From a process this pipeline has not (or no longer) joined: an old instance's
            // leftovers, or a foreign datagram.
            self.stats.dropped_unexpected += 1;
            return;
        }
        self.epoch_backers |= 1u64 << from.min(63);
        let link = &mut self.links[from];
        link.heard_ns = now_ns;
        link.prepare_seen = link.prepare_seen.max(words.prepare_seen.min(prepares_sent));
        link.commit_seen = link.commit_seen.max(words.commit_seen.min(commits_sent));
        let received = words.received.min(next_pseq);
        if received > link.acked {
            link.acked = received;
            link.progress_ns = now_ns;
            link.retransmit_timeout_ns = 0;
        }
        let applied = words.applied.min(next_pseq);
        if applied > link.applied {
            link.applied = applied;
            link.progress_ns = now_ns;
            link.retransmit_timeout_ns = 0;
        }
        if let SnapshotSend::Sending {
            next, installed, ..
        } = &mut link.snapshot
        {
            let reported = words.snapshot_installed.min(*next);
            if reported > *installed {
                *installed = reported;
                link.snapshot_progress_ns = now_ns;
            }
        }
        match message.header.kind {
            Kind::Write => self.accept_writes(message, from),
            Kind::Ack => {
                let (first, count) = message.range();
                if first.saturating_add(count) > next_pseq {
                    self.stats.dropped_unexpected += 1;
                }
            }
            Kind::Nack => {
                let (first, count) = message.range();
                let end = first.saturating_add(count).min(next_pseq);
                if first < end {
                    link.nack = Some((first, end));
                }
            }
            Kind::Credit => {}
            Kind::Prepare | Kind::Commit | Kind::Hello | Kind::Snapshot | Kind::Vote => {
                self.stats.dropped_unexpected += 1
            }
        }
    }

    fn accept_writes(&mut self, message: &Message<'_>, from: usize) {
        let sessions = self.config.sessions.max(1);
        let link = &mut self.links[from];
        link.write_seen = link.write_seen.max(message.write_seq());
        // The follower may be waiting for a CREDIT that was lost. A repeated fragmented write
        // may be many WRITEs: one CREDIT for the one that starts it, not one per WRITE, keeps
        // the CREDITs in flight within their budget.
        if message.header.is_retransmit() && message.first_entry().fragment == 0 {
            link.credit_due = true;
        }
        let slot_len = self.config.slot_len;
        for entry in message.entries() {
            let session = usize::from(entry.session);
            if session >= sessions {
                self.stats.dropped_unexpected += 1;
                continue;
            }
            if entry.fragments(slot_len) > 1 {
                self.accept_fragment(&entry, from);
                continue;
            }
            if entry.session_seq <= self.ordered[from * sessions + session] {
                self.stats.duplicates_dropped += 1;
                continue;
            }
            // The origin is the sender, whatever the entry says: it is whose sessions complete.
            let origin = message.header.from_node;
            let queue = self.queue_for(origin, entry.session, 1);
            if !self.queue(queue).has_room(1) {
                self.stats.dropped_unexpected += 1;
                break;
            }
            self.ordered[from * sessions + session] = entry.session_seq;
            let meta = EntryMeta::local_write(origin, entry.session, entry.session_seq);
            self.enqueue(queue, meta, entry.bytes);
        }
    }

    /// One fragment of a forwarded write too long for one entry, gathered in any order; the
    /// write is queued for ordering once its last fragment is in.
    fn accept_fragment(&mut self, entry: &wire::EntryView<'_>, from: usize) {
        let sessions = self.config.sessions.max(1);
        let slot_len = self.config.slot_len;
        let session = usize::from(entry.session);
        let fragments = entry.fragments(slot_len);
        let fragment = entry.fragment;
        if entry.session_seq <= self.ordered[from * sessions + session] {
            self.stats.duplicates_dropped += 1;
            return;
        }
        let Some(assembly) = self
            .assemblies
            .get_mut(from * sessions + session)
            .filter(|assembly| assembly.bytes.len() >= entry.txn_len as usize)
        else {
            self.stats.dropped_unexpected += 1;
            return;
        };
        if entry.session_seq < assembly.session_seq {
            // A late copy of a write the session has gone past.
            self.stats.duplicates_dropped += 1;
            return;
        }
        if entry.session_seq != assembly.session_seq || entry.txn_len != assembly.txn_len {
            // A new write (or, with another length under the same sequence, a new process's:
            // its hello restarted the assemblies, so the last one wins).
            assembly.restart(entry.session_seq, entry.txn_len);
        }
        let (word, bit) = (fragment as usize / 64, 1u64 << (fragment % 64));
        if assembly.have[word] & bit != 0 {
            self.stats.duplicates_dropped += 1;
            return;
        }
        let at = fragment as usize * slot_len;
        assembly.bytes[at..at + entry.bytes.len()].copy_from_slice(entry.bytes);
        assembly.have[word] |= bit;
        assembly.received += 1;
        if assembly.received != fragments {
            return;
        }
        if !self.bulk.has_room(fragments) {
            // No room to queue it: keep it whole but for this fragment, which comes again.
            assembly.have[word] &= !bit;
            assembly.received -= 1;
            self.stats.dropped_unexpected += 1;
            return;
        }
        self.ordered[from * sessions + session] = entry.session_seq;
        let origin = u8::try_from(from).unwrap_or(u8::MAX);
        let meta = EntryMeta::local_write(origin, entry.session, entry.session_seq);
        let txn_len = assembly.txn_len as usize;
        assembly.session_seq = 0;
        // Taken out for the copy (the assembly and the queue are both this leader's), then put
        // back: no allocation, only the two vectors swap places.
        let bytes = std::mem::take(&mut assembly.bytes);
        self.enqueue(Queue::Bulk, meta, &bytes[..txn_len]);
        if let Some(assembly) = self.assemblies.get_mut(from * sessions + session) {
            assembly.bytes = bytes;
        }
    }

    fn follower_ids(&self) -> impl Iterator<Item = usize> + use<> {
        let leader = usize::from(self.config.node);
        (0..usize::from(self.config.nodes)).filter(move |node| *node != leader)
    }

    /// The `needed`-th highest of a per-follower position.
    fn quorum_of(&self, position: impl Fn(&FollowerLink) -> u64) -> u64 {
        let needed = self.config.quorum_followers();
        if needed == 0 {
            return u64::MAX;
        }
        let mut values = [0u64; MAX_NODES];
        let mut count = 0;
        for follower in self.follower_ids() {
            values[count] = position(&self.links[follower]);
            count += 1;
        }
        let values = &mut values[..count];
        values.sort_unstable_by(|a, b| b.cmp(a));
        values[needed - 1]
    }

    /// Runs everything that can make progress: commit, apply, answer hellos, fill gaps,
    /// retransmit, send COMMITs, PREPAREs, CREDITs and snapshot chunks.
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
        self.committed = self
            .committed
            .max(self.quorum_of(|link| link.acked).min(self.next_pseq));
        self.apply(replica, completions);
        if self.config.followers() > 0 {
            self.send_hello_replies(outbox);
            self.retransmit(now_ns, outbox, limits);
            self.send_commits(now_ns, outbox, limits);
        } else {
            self.commit_sent = self.committed;
        }
        self.send_prepares(now_ns, outbox, zxids, limits);
        self.send_credits(now_ns, outbox, limits);
        self.send_snapshots(now_ns, outbox, replica, board, limits);
    }

    fn apply(&mut self, replica: &impl StateMachine, completions: &mut impl Completions) {
        // A transaction is applied once all its fragments are committed.
        while self.applied < self.committed {
            let meta = *self.pending.meta(self.applied);
            let fragments = u64::from(self.config.fragments_of(meta.txn_len as usize));
            if self.applied + fragments > self.committed {
                break;
            }
            let txn = self.pending.txn(self.applied);
            if !replica.try_apply(meta.zxid, txn) {
                self.stats.ordering_stalls += 1;
                break;
            }
            if meta.origin_node == self.config.node {
                completions.write_applied(meta.session, meta.session_seq, meta.zxid);
            }
            let index = usize::from(meta.origin_node) * self.config.sessions.max(1)
                + usize::from(meta.session);
            if let Some(seq) = self.ordered_applied.get_mut(index) {
                *seq = (*seq).max(meta.session_seq);
            }
            self.applied += fragments;
            self.stats.writes_applied += 1;
            self.stats.last_applied_zxid = meta.zxid;
            self.stats.leader_zxid = meta.zxid;
        }
    }

    /// Answers the hellos accepted since the last call.
    pub fn send_hello_replies(&mut self, outbox: &mut impl Outbox) {
        for follower in self.follower_ids() {
            let link = self.links[follower];
            if !link.hello_due {
                continue;
            }
            let Some(buffer) = outbox.buffer() else {
                return;
            };
            let mut words = [0u64; wire::WORDS];
            words[hello_words::FINGERPRINT] = self.config.fingerprint;
            words[hello_words::START_PSEQ] = link.start_pseq;
            words[hello_words::CATCH_UP] = u64::from(link.catch_up);
            wire::put_header(buffer, &self.config.header(Kind::Hello, 0, 0, words));
            outbox.send(
                follower_target(follower),
                Kind::Hello,
                wire::HEADER_BYTES,
                0,
            );
            self.links[follower].hello_due = false;
        }
    }

    fn broadcast_words(&self, seq: u64) -> [u64; wire::WORDS] {
        let mut words = [0u64; wire::WORDS];
        words[leader_words::SEQ] = seq;
        words[leader_words::COMMIT_POINT] = self.committed;
        words[leader_words::RETAINED_FROM] = self.retained_from();
        words
    }

    /// Sends up to `max_messages` PREPAREs to one follower from pseq `from` (below `to`);
    /// returns the pseq reached.
    fn retransmit_prepares(
        &mut self,
        follower: usize,
        from: u64,
        to: u64,
        max_messages: usize,
        outbox: &mut impl Outbox,
        limits: &Limits,
    ) -> u64 {
        let mut pseq = from.max(self.retained_from());
        let to = to.min(self.next_pseq);
        let fitting = (MAX_PREPARES_PER_MSG as u64).min(limits.prepare_batch.max(1) as u64);
        let room = self.config.mtu - wire::HEADER_BYTES - wire::PREPARE_PREFIX;
        for _ in 0..max_messages {
            if pseq >= to {
                break;
            }
            // One PREPARE carries consecutive zxids (the fragments of one transaction share
            // one): stop where a batch of zxids ended, or the datagram is full.
            let first_zxid = self.pending.meta(pseq).zxid;
            let mut zxid = first_zxid;
            let mut bytes = self.pending.wire_len(pseq);
            let mut count = 1;
            while count < fitting && pseq + count < to {
                let next = self.pending.meta(pseq + count);
                let next_zxid = if next.fragment == 0 { zxid + 1 } else { zxid };
                let next_bytes = self.pending.wire_len(pseq + count);
                if next.zxid != next_zxid || bytes + next_bytes > room {
                    break;
                }
                zxid = next_zxid;
                bytes += next_bytes;
                count += 1;
            }
            let words = self.broadcast_words(self.prepare_msgs_sent);
            let Some(buffer) = outbox.buffer() else {
                break;
            };
            let entries = usize::try_from(count).unwrap_or(0);
            wire::put_header(
                buffer,
                &self
                    .config
                    .header(Kind::Prepare, entries, FLAG_RETRANSMIT, words),
            );
            wire::put_prepare_prefix(buffer, pseq, first_zxid);
            let mut len = wire::HEADER_BYTES + wire::PREPARE_PREFIX;
            len += self.pending.encode_entries(pseq, count, &mut buffer[len..]);
            outbox.resend(follower_target(follower), Kind::Prepare, len);
            self.stats.retransmitted_prepares += 1;
            pseq += count;
        }
        pseq
    }

    /// How far a repair stream runs ahead of what its follower acknowledged: half a window,
    /// and never more datagrams than a follower's prepare credits allow (a datagram holds at
    /// least [`PipelineConfig::prepares_fitting`] entries, as no entry is longer than a slot).
    fn repair_in_flight_limit(&self) -> u64 {
        (self.config.window as u64 / 2)
            .min(MAX_PREPARE_CREDITS as u64 * self.config.prepares_fitting() as u64)
            .max(1)
    }

    /// Starts (or restarts from an earlier point) the repair stream towards a follower.
    fn start_repair(&mut self, follower: usize, from: u64) {
        let link = &mut self.links[follower];
        let from = from.max(link.acked);
        if !link.repairing || from < link.repair_next {
            link.repair_next = from;
        }
        link.repairing = true;
    }

    /// NACKed gaps start a repair at once; a follower silent for its timeout gets one from
    /// what it acknowledged (a COMMIT, when it holds everything). Repairs stream unicast
    /// prepares a bounded distance ahead of the follower's acknowledgements, so a follower
    /// that lost many catches up as fast as the network allows.
    fn retransmit(&mut self, now_ns: u64, outbox: &mut impl Outbox, limits: &Limits) {
        let in_flight_limit = self.repair_in_flight_limit();
        for follower in self.follower_ids() {
            if let Some((first, _end)) = self.links[follower].nack.take() {
                self.start_repair(follower, first);
            }
            let link = self.links[follower];
            if link.instance == 0 {
                continue;
            }
            let behind_prepares = link.acked < self.next_pseq;
            let behind_commits = link.applied < self.commit_sent;
            if !behind_prepares && !behind_commits {
                let link = &mut self.links[follower];
                link.progress_ns = now_ns;
                link.retransmit_timeout_ns = 0;
                link.repairing = false;
                continue;
            }
            let timeout = if link.retransmit_timeout_ns == 0 {
                limits.retransmit_timeout_ns
            } else {
                link.retransmit_timeout_ns
            };
            if now_ns >= link.progress_ns.saturating_add(timeout) {
                if behind_prepares {
                    // Lost prepares, lost repairs or a lost last ACK: go back to what it
                    // acknowledged and stream from there (bounded by its prepare credits, so a
                    // fragmented stream is a few dozen datagrams, not half a window).
                    self.links[follower].repairing = false;
                    self.start_repair(follower, link.acked);
                } else if let Some(buffer) = outbox.buffer() {
                    let words = self.broadcast_words(self.commit_msgs_sent);
                    wire::put_header(
                        buffer,
                        &self.config.header(Kind::Commit, 0, FLAG_RETRANSMIT, words),
                    );
                    let count = self.commit_sent - link.applied;
                    wire::put_range(buffer, link.applied, count);
                    outbox.resend(
                        follower_target(follower),
                        Kind::Commit,
                        wire::HEADER_BYTES + wire::RANGE_BODY,
                    );
                    self.stats.retransmitted_commits += 1;
                }
                let link = &mut self.links[follower];
                link.progress_ns = now_ns;
                link.retransmit_timeout_ns = timeout
                    .saturating_mul(2)
                    .min(limits.max_retransmit_timeout_ns());
            }
            let link = self.links[follower];
            if !link.repairing {
                continue;
            }
            // A follower that lacks prepares no longer kept gets the oldest kept ones: they
            // carry the retained point, from which it learns that it was left behind.
            let floor = link.acked.max(self.retained_from());
            let from = link.repair_next.max(floor);
            let room = (floor + in_flight_limit).saturating_sub(from);
            if room == 0 {
                continue;
            }
            let reached = self.retransmit_prepares(
                follower,
                from,
                from + room,
                RETRANSMIT_BURST,
                outbox,
                limits,
            );
            let link = &mut self.links[follower];
            link.repair_next = reached;
            if reached >= self.next_pseq {
                // Caught up with the broadcast: live prepares cover the rest.
                link.repairing = false;
            }
        }
    }

    /// Whether a broadcast may go: every follower has credit, or a quorum has and every one
    /// without has been without for the grace period.
    fn may_broadcast(
        &mut self,
        now_ns: u64,
        sent: u64,
        seen: fn(&FollowerLink) -> u64,
        blocked_since: fn(&mut FollowerLink) -> &mut Option<u64>,
        budget: u64,
        grace_ns: u64,
    ) -> bool {
        let mut with_credit = 0;
        let mut all = true;
        let mut waited_out = true;
        let next_pseq = self.next_pseq;
        for follower in self.follower_ids() {
            let link = &mut self.links[follower];
            let outstanding = sent.saturating_sub(seen(link));
            if outstanding < budget {
                with_credit += 1;
                // A follower once waited out stays excused until it holds every prepare, so
                // a persistently slow one does not cost a grace period per credit it regains.
                if link.acked >= next_pseq {
                    *blocked_since(link) = None;
                }
            } else {
                all = false;
                let since = *blocked_since(link).get_or_insert(now_ns);
                waited_out &= now_ns.saturating_sub(since) >= grace_ns;
            }
        }
        all || (with_credit >= self.config.quorum_followers() && waited_out)
    }

    fn send_commits(&mut self, now_ns: u64, outbox: &mut impl Outbox, limits: &Limits) {
        while self.commit_sent < self.committed {
            if !self.may_broadcast(
                now_ns,
                self.commit_msgs_sent,
                |link| link.commit_seen,
                |link| &mut link.commit_blocked_since,
                limits.commit_credits,
                limits.slow_follower_grace_ns,
            ) {
                self.stats.credit_stalls += 1;
                return;
            }
            let count = (self.committed - self.commit_sent).min(limits.commit_batch.max(1));
            let words = self.broadcast_words(self.commit_msgs_sent + 1);
            let Some(buffer) = outbox.buffer() else {
                return;
            };
            wire::put_header(buffer, &self.config.header(Kind::Commit, 0, 0, words));
            wire::put_range(buffer, self.commit_sent, count);
            outbox.send(
                Target::AllFollowers,
                Kind::Commit,
                wire::HEADER_BYTES + wire::RANGE_BODY,
                count,
            );
            self.broadcast_ns = now_ns;
            self.commit_sent += count;
            self.commit_msgs_sent += 1;
        }
    }

    /// How many more prepares can go before a live follower (one heard from recently) would
    /// miss prepares the leader no longer keeps. A slow follower gets several windows of
    /// slack; only a dead one (silent for [`Limits::follower_dead_after_ns`]) is left behind,
    /// to catch up by snapshot when it restarts. A follower that already lacks prepares the
    /// leader no longer keeps (it was left behind and is heard from again) cannot be saved by
    /// holding back: the leader goes on, and its next PREPARE tells the follower so.
    fn room_before_live_follower_falls_behind(&self, now_ns: u64, limits: &Limits) -> u64 {
        let keep = (self.pending.capacity() - self.config.window) as u64;
        let retained_from = self.retained_from();
        self.follower_ids()
            .map(|follower| &self.links[follower])
            .filter(|link| {
                link.instance != 0
                    && link.acked >= retained_from
                    && now_ns.saturating_sub(link.heard_ns) < limits.follower_dead_after_ns()
            })
            .map(|link| (link.acked + keep).saturating_sub(self.next_pseq))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The applied point of the leader and a quorum of followers: the window's base.
    fn window_base(&self) -> u64 {
        self.quorum_of(|link| link.applied).min(self.applied)
    }

    fn send_prepares(
        &mut self,
        now_ns: u64,
        outbox: &mut impl Outbox,
        zxids: &ZxidSource,
        limits: &Limits,
    ) {
        if !self.epoch_backed() {
            return;
        }
        let has_followers = self.config.followers() > 0;
        while self.incoming_len() > 0 {
            let in_window = self.next_pseq - self.window_base();
            let space = (self.config.window as u64)
                .saturating_sub(in_window)
                .min(self.room_before_live_follower_falls_behind(now_ns, limits));
            if space == 0 {
                self.stats.window_stalls += 1;
                return;
            }
            if has_followers
                && !self.may_broadcast(
                    now_ns,
                    self.prepare_msgs_sent,
                    |link| link.prepare_seen,
                    |link| &mut link.prepare_blocked_since,
                    limits.prepare_credits,
                    limits.slow_follower_grace_ns,
                )
            {
                self.stats.credit_stalls += 1;
                return;
            }
            let queue = self.next_queue();
            let (batch, starts) = self.next_prepare_batch(queue, space, limits);
            let words = self.broadcast_words(self.prepare_msgs_sent + 1);
            // Secure the buffer before taking zxids: zxids once taken cannot be given back.
            let buffer = match has_followers.then(|| outbox.buffer()) {
                Some(None) => return,
                Some(Some(buffer)) => Some(buffer),
                None => None,
            };
            // By field, not `self.queue()`: `self.pending` is written while this is borrowed.
            let waiting = match queue {
                Queue::Small => &self.incoming,
                Queue::Bulk => &self.bulk,
            };
            let (source, head) = (&waiting.ring, waiting.head);
            // The fragments of one transaction share its zxid, taken with the first. A batch
            // that goes on with a transaction holds nothing else (see `next_prepare_batch`),
            // so its zxids need no new ones.
            let first = *source.meta(head);
            let continues_txn = first.fragment != 0;
            let first_zxid = if continues_txn && self.next_pseq > 0 {
                self.pending.meta(self.next_pseq - 1).zxid
            } else {
                zxids.take(starts)
            };
            let first_pseq = self.next_pseq;
            let mut len = 0;
            if let Some(buffer) = buffer {
                let count = usize::try_from(batch).unwrap_or(0);
                wire::put_header(buffer, &self.config.header(Kind::Prepare, count, 0, words));
                wire::put_prepare_prefix(buffer, first_pseq, first_zxid);
                len = wire::HEADER_BYTES + wire::PREPARE_PREFIX;
                len += source.encode_entries(head, batch, &mut buffer[len..]);
            }
            let mut zxid = first_zxid;
            for offset in 0..batch {
                let from = head + offset;
                let meta = *source.meta(from);
                if offset > 0 && meta.fragment == 0 {
                    zxid += 1;
                }
                let prepared = EntryMeta {
                    zxid,
                    present: true,
                    ..meta
                };
                self.pending
                    .put_from(first_pseq + offset, prepared, source, from);
            }
            let last = *source.meta(head + batch - 1);
            match queue {
                Queue::Small => self.incoming.head += batch,
                Queue::Bulk => {
                    self.bulk.head += batch;
                    if !continues_txn {
                        let index = usize::from(first.origin_node) * self.config.sessions.max(1)
                            + usize::from(first.session);
                        if let Some(waiting) = self.bulk_waiting.get_mut(index) {
                            *waiting = waiting.saturating_sub(1);
                        }
                    }
                    if last.fragment + 1 >= self.config.fragments_of(last.txn_len as usize) {
                        // A bulk transaction ended: the small writes queued by now go next.
                        self.small_turn_end = self.incoming.tail;
                    }
                }
            }
            self.next_pseq += batch;
            if has_followers {
                self.prepare_msgs_sent += 1;
                outbox.send(Target::AllFollowers, Kind::Prepare, len, batch);
                self.broadcast_ns = now_ns;
            } else {
                self.committed = self.next_pseq;
            }
        }
    }

    /// The queue the next PREPARE takes from (one is not empty): the bulk transaction under
    /// way goes on; else the small writes whose turn it is; else the next bulk transaction;
    /// else small writes.
    fn next_queue(&self) -> Queue {
        let bulk = self.bulk.len() > 0;
        let small = self.incoming.len() > 0;
        if bulk && self.bulk.head_meta().fragment != 0 {
            Queue::Bulk
        } else if small && (!bulk || self.incoming.head < self.small_turn_end) {
            Queue::Small
        } else if bulk {
            Queue::Bulk
        } else {
            Queue::Small
        }
    }

    /// The next PREPARE's entries from the head of `queue`: as many as the batch knob, the
    /// window `space` and the datagram allow (at least one). A bulk batch holds one
    /// transaction's entries (or the rest of them), so that small writes can go between bulk
    /// transactions and a PREPARE's zxids are always one run of consecutive ones. Returns
    /// (entries, transactions they start).
    fn next_prepare_batch(&self, queue: Queue, space: u64, limits: &Limits) -> (u64, u64) {
        let waiting = self.queue(queue);
        let (source, head, len) = (&waiting.ring, waiting.head, waiting.len());
        let limit = len
            .min(limits.prepare_batch.max(1) as u64)
            .min(MAX_PREPARES_PER_MSG as u64)
            .min(space)
            .max(1);
        let room = self.config.mtu - wire::HEADER_BYTES - wire::PREPARE_PREFIX;
        let continues_txn = source.meta(head).fragment != 0;
        let mut bytes = source.wire_len(head);
        let mut starts = u64::from(!continues_txn);
        let mut count = 1;
        while count < limit {
            let meta = source.meta(head + count);
            let next_bytes = source.wire_len(head + count);
            let ends_batch = meta.fragment == 0 && (continues_txn || queue == Queue::Bulk);
            if bytes + next_bytes > room || ends_batch {
                break;
            }
            starts += u64::from(meta.fragment == 0);
            bytes += next_bytes;
            count += 1;
        }
        (count, starts)
    }

    fn send_credits(&mut self, now_ns: u64, outbox: &mut impl Outbox, limits: &Limits) {
        for follower in self.follower_ids() {
            let link = self.links[follower];
            let unreported = link.write_seen - link.write_reported.min(link.write_seen);
            // Silence must mean a dead or cut-off leader, never an idle one.
            let heartbeat_due = link.instance != 0
                && now_ns.saturating_sub(link.credit_sent_ns.max(self.broadcast_ns))
                    >= limits.heartbeat_interval_ns;
            let due = unreported >= half(limits.write_credits)
                || heartbeat_due
                || link.credit_due
                || (unreported > 0
                    && now_ns.saturating_sub(link.credit_sent_ns)
                        >= limits.retransmit_timeout_ns / 4);
            if !due {
                continue;
            }
            let Some(buffer) = outbox.buffer() else {
                return;
            };
            let mut words = self.broadcast_words(0);
            words[leader_words::WRITE_SEEN] = link.write_seen;
            wire::put_header(buffer, &self.config.header(Kind::Credit, 0, 0, words));
            outbox.send(
                follower_target(follower),
                Kind::Credit,
                wire::HEADER_BYTES,
                0,
            );
            let link = &mut self.links[follower];
            link.write_reported = link.write_seen;
            link.credit_due = false;
            link.credit_sent_ns = now_ns;
        }
    }

    fn send_snapshots(
        &mut self,
        now_ns: u64,
        outbox: &mut impl Outbox,
        replica: &impl StateMachine,
        board: &CatchupBoard,
        limits: &Limits,
    ) {
        let per_message = self.config.snapshot_entries_fitting() as u64;
        let (range_first, range_end) = self.config.snapshot_range();
        for follower in self.follower_ids() {
            let link = self.links[follower];
            let (base_zxid, mut next, installed, end, mut announced) = match link.snapshot {
                SnapshotSend::Idle => continue,
                SnapshotSend::WaitingForBase => match board.base_zxid(follower, link.instance) {
                    Some(base_zxid) => {
                        self.links[follower].snapshot_progress_ns = now_ns;
                        (base_zxid, range_first, range_first, range_end, false)
                    }
                    None => continue,
                },
                SnapshotSend::Sending {
                    base_zxid,
                    next,
                    installed,
                    end,
                    announced,
                } => (base_zxid, next, installed, end, announced),
            };
            if announced && installed >= end {
                self.links[follower].snapshot = SnapshotSend::Idle;
                continue;
            }
            if announced
                && now_ns.saturating_sub(self.links[follower].snapshot_progress_ns)
                    >= limits.retransmit_timeout_ns
            {
                // Go back to the first entry not installed.
                next = installed;
                self.links[follower].snapshot_progress_ns = now_ns;
            }
            let in_flight_limit = per_message * SNAPSHOT_MESSAGES_IN_FLIGHT;
            let mut sent = 0;
            while (next < end || !announced)
                && next - installed < in_flight_limit
                && sent < RETRANSMIT_BURST
            {
                let count = (end - next).min(per_message);
                let words = self.broadcast_words(self.prepare_msgs_sent);
                let Some(buffer) = outbox.buffer() else {
                    break;
                };
                let entries = usize::try_from(count).unwrap_or(0);
                wire::put_header(
                    buffer,
                    &self.config.header(Kind::Snapshot, entries, 0, words),
                );
                wire::put_snapshot_prefix(buffer, base_zxid, next, end);
                let slot_len = self.config.snapshot_slot_len();
                let chunks = self.config.snapshot_chunks();
                let mut len = wire::HEADER_BYTES + wire::SNAPSHOT_PREFIX;
                for position in next..next + count {
                    let slot_at = len + wire::SNAPSHOT_ENTRY_FIXED;
                    let slot = &mut buffer[slot_at..slot_at + slot_len];
                    let (item, zxid) = if chunks > 1 {
                        let (item, chunk) = (position / chunks, position % chunks);
                        let zxid = match self.snapshot_cached {
                            Some((cached, zxid)) if cached == item && chunk != 0 => zxid,
                            _ => {
                                // Read once per item; a chunk read after the item changed
                                // carries the newer zxid, and the follower skips the torn item
                                // (the change is after the base, so it applies it anyway).
                                let zxid = replica
                                    .read_for_snapshot(item, &mut self.snapshot_item)
                                    .unwrap_or(0);
                                self.snapshot_cached = Some((item, zxid));
                                zxid
                            }
                        };
                        let at = usize::try_from(chunk).unwrap_or(0) * slot_len;
                        let piece = &self.snapshot_item[at.min(self.snapshot_item.len())..];
                        let taken = piece.len().min(slot_len);
                        slot[..taken].copy_from_slice(&piece[..taken]);
                        slot[taken..].fill(0);
                        (item, zxid)
                    } else {
                        (
                            position,
                            replica.read_for_snapshot(position, slot).unwrap_or(0),
                        )
                    };
                    buffer[len..len + 8].copy_from_slice(&item.to_le_bytes());
                    buffer[len + 8..len + 16].copy_from_slice(&zxid.to_le_bytes());
                    len += wire::SNAPSHOT_ENTRY_FIXED + slot_len;
                }
                outbox.send(follower_target(follower), Kind::Snapshot, len, count);
                self.stats.snapshot_entries_sent += count;
                next += count;
                announced = true;
                sent += 1;
            }
            self.links[follower].snapshot = SnapshotSend::Sending {
                base_zxid,
                next,
                installed,
                end,
                announced,
            };
        }
    }

    /// The earliest time at which [`Leader::advance`] could do something it would not do at
    /// `now_ns` without new input (a message, a submitted write): `now_ns` or earlier when it
    /// has work at once, `u64::MAX` when only input can give it any. It mirrors every test
    /// `advance` makes: early only costs an advance that finds nothing, late would leave the
    /// pipeline standing still until some message happens to come. Reads the state only.
    pub fn next_deadline(&self, now_ns: u64, limits: &Limits) -> u64 {
        // A quorum acknowledged more, or committed entries wait to be applied (`try_apply`
        // may be waiting for another pipeline's zxid, which no message to this one announces:
        // it is polled).
        if self.quorum_of(|link| link.acked).min(self.next_pseq) > self.committed
            || self.applied < self.committed
        {
            return now_ns;
        }
        let has_followers = self.config.followers() > 0;
        let mut deadline = u64::MAX;
        if self.commit_sent < self.committed {
            deadline = if has_followers {
                self.broadcast_ready_at(
                    now_ns,
                    self.commit_msgs_sent,
                    |link| link.commit_seen,
                    |link| link.commit_blocked_since,
                    limits.commit_credits,
                    limits.slow_follower_grace_ns,
                )
            } else {
                now_ns
            };
        }
        if self.incoming_len() > 0 {
            deadline = deadline.min(self.prepares_ready_at(now_ns, limits));
        }
        for follower in self.follower_ids() {
            if deadline <= now_ns {
                break;
            }
            deadline = deadline.min(self.link_deadline(follower, now_ns, limits));
        }
        deadline
    }

    /// When `send_prepares` could send the next PREPARE, given writes waiting.
    fn prepares_ready_at(&self, now_ns: u64, limits: &Limits) -> u64 {
        let in_window = self.next_pseq - self.window_base();
        if (self.config.window as u64).saturating_sub(in_window) == 0 {
            // The window moves with applies: a quorum's come as messages, ours is polled above.
            return u64::MAX;
        }
        if self.room_before_live_follower_falls_behind(now_ns, limits) == 0 {
            // Held back for live followers near the end of what is kept: until they
            // acknowledge more (input) or are silent long enough to count as dead.
            let keep = (self.pending.capacity() - self.config.window) as u64;
            let retained_from = self.retained_from();
            let dead_after = limits.follower_dead_after_ns();
            return self
                .follower_ids()
                .map(|follower| &self.links[follower])
                .filter(|link| {
                    link.instance != 0
                        && link.acked >= retained_from
                        && now_ns.saturating_sub(link.heard_ns) < dead_after
                        && link.acked + keep <= self.next_pseq
                })
                .map(|link| due_at(now_ns, link.heard_ns, dead_after))
                .min()
                .unwrap_or(now_ns);
        }
        if self.config.followers() == 0 {
            return now_ns;
        }
        self.broadcast_ready_at(
            now_ns,
            self.prepare_msgs_sent,
            |link| link.prepare_seen,
            |link| link.prepare_blocked_since,
            limits.prepare_credits,
            limits.slow_follower_grace_ns,
        )
    }

    /// When `may_broadcast` would let a broadcast go: at once when every follower
    /// has credit (or a blocked one's grace period has yet to start, which `advance` starts),
    /// when the last blocked one's grace period ends if a quorum has credit, and only on
    /// input (credits come back in messages) otherwise.
    fn broadcast_ready_at(
        &self,
        now_ns: u64,
        sent: u64,
        seen: fn(&FollowerLink) -> u64,
        blocked_since: fn(&FollowerLink) -> Option<u64>,
        budget: u64,
        grace_ns: u64,
    ) -> u64 {
        let mut with_credit = 0;
        let mut waited_out_at = now_ns;
        for follower in self.follower_ids() {
            let link = &self.links[follower];
            if sent.saturating_sub(seen(link)) < budget {
                with_credit += 1;
            } else {
                let Some(since) = blocked_since(link) else {
                    return now_ns;
                };
                waited_out_at = waited_out_at.max(due_at(now_ns, since, grace_ns));
            }
        }
        if with_credit == self.config.followers() {
            now_ns
        } else if with_credit >= self.config.quorum_followers() {
            waited_out_at
        } else {
            u64::MAX
        }
    }

    /// The deadline of what `advance` does for one follower: the hello answer, NACKed gaps,
    /// the retransmission timeout, the repair stream, CREDITs and the snapshot stream.
    fn link_deadline(&self, follower: usize, now_ns: u64, limits: &Limits) -> u64 {
        let link = &self.links[follower];
        let mut deadline = u64::MAX;
        if link.hello_due || link.nack.is_some() {
            return now_ns;
        }
        if link.instance != 0 {
            let behind_prepares = link.acked < self.next_pseq;
            if behind_prepares || link.applied < self.commit_sent {
                let timeout = if link.retransmit_timeout_ns == 0 {
                    limits.retransmit_timeout_ns
                } else {
                    link.retransmit_timeout_ns
                };
                // `retransmit` tests `now >= progress + timeout`.
                deadline = deadline.min(link.progress_ns.saturating_add(timeout));
                if link.repairing {
                    // The bound of `retransmit`'s stream: room means prepares go at once.
                    let in_flight_limit = self.repair_in_flight_limit();
                    let floor = link.acked.max(self.retained_from());
                    let from = link.repair_next.max(floor);
                    if (floor + in_flight_limit).saturating_sub(from) > 0 {
                        return now_ns;
                    }
                }
            }
        }
        // CREDITs: half the budget unreported, or a repeat asked for, go at once; the rest of
        // the unreported after a quarter timeout; a heartbeat after the interval of silence.
        let unreported = link.write_seen - link.write_reported.min(link.write_seen);
        if link.credit_due || unreported >= half(limits.write_credits) {
            return now_ns;
        }
        if unreported > 0 {
            deadline = deadline.min(due_at(
                now_ns,
                link.credit_sent_ns,
                limits.retransmit_timeout_ns / 4,
            ));
        }
        if link.instance != 0 {
            deadline = deadline.min(due_at(
                now_ns,
                link.credit_sent_ns.max(self.broadcast_ns),
                limits.heartbeat_interval_ns,
            ));
        }
        match link.snapshot {
            SnapshotSend::Idle => {}
            // The base is agreed among this leader's pipelines, not by a message to this one:
            // polled.
            SnapshotSend::WaitingForBase => return now_ns,
            SnapshotSend::Sending {
                next,
                installed,
                end,
                announced,
                ..
            } => {
                let in_flight_limit =
                    self.config.snapshot_entries_fitting() as u64 * SNAPSHOT_MESSAGES_IN_FLIGHT;
                let room =
                    (next < end || !announced) && next.saturating_sub(installed) < in_flight_limit;
                if (announced && installed >= end) || room {
                    return now_ns;
                }
                if announced {
                    deadline = deadline.min(due_at(
                        now_ns,
                        link.snapshot_progress_ns,
                        limits.retransmit_timeout_ns,
                    ));
                }
            }
        }
        deadline
    }

    /// What this leader holds, for the role it takes next (an election): its ring, from the
    /// oldest retained pseq to the last prepared (its proposals past the commit point
    /// included: a leader re-elected proposes them again; one that follows another loses
    /// what that one's history lacks).
    pub fn into_history(mut self) -> History {
        let from = self.retained_from();
        // A transaction prepared only in part is no part of the history: it ends before it.
        let end =
            super::whole_end(&self.pending, &self.config, from, self.next_pseq).max(self.applied);
        // What this leader queued but never prepared is no part of its history: the table it
        // hands on holds what it applied and what it prepared past that.
        super::ordered_through(
            &mut self.ordered,
            &self.ordered_applied,
            &self.pending,
            &self.config,
            self.applied.max(from),
            end,
        );
        History {
            from: first_whole(&self.pending, from, end),
            ring: self.pending,
            applied: self.applied,
            end,
            marked: (from, self.next_pseq),
            ordered_held: self.ordered,
            ordered_applied: self.ordered_applied,
        }
    }

    /// The zxid of the last transaction prepared, if any is retained.
    pub fn last_zxid(&self) -> Option<u64> {
        (self.next_pseq > self.retained_from()).then(|| self.pending.meta(self.next_pseq - 1).zxid)
    }

    /// Calls `each` with every write of this node's sessions that is not applied yet (queued
    /// or prepared): (session, session sequence, transaction). A change of leader sends them
    /// to the new one, which orders each at most once.
    pub fn for_each_local_write(&self, mut each: impl FnMut(u16, u64, Txn<'_>)) {
        let own = self.config.node;
        for queue in [&self.incoming, &self.bulk] {
            let mut position = queue.head;
            while position < queue.tail {
                let meta = *queue.ring.meta(position);
                if meta.origin_node == own && meta.fragment == 0 {
                    each(meta.session, meta.session_seq, queue.ring.txn(position));
                }
                position += u64::from(self.config.fragments_of(meta.txn_len as usize));
            }
        }
        let mut position = self.applied.max(self.retained_from());
        while position < self.next_pseq {
            let meta = *self.pending.meta(position);
            if meta.origin_node == own && meta.fragment == 0 {
                each(meta.session, meta.session_seq, self.pending.txn(position));
            }
            position += u64::from(self.config.fragments_of(meta.txn_len as usize)).max(1);
        }
    }

    /// Where a follower that has applied up to `applied_zxid` can start from this leader's
    /// ring (DIFF): the first retained pseq past that zxid, when the ring holds everything
    /// after it; `None` when it does not (the follower needs a snapshot).
    fn diff_start(&self, applied_zxid: u64, leader_applied_zxid: u64) -> Option<u64> {
        let (low, high) = (self.retained_from(), self.next_pseq);
        if low >= high {
            return (applied_zxid == leader_applied_zxid).then_some(high);
        }
        // Zxids do not decrease along the pseqs (the fragments of one share it).
        let (mut first, mut last) = (low, high);
        while first < last {
            let middle = first + (last - first) / 2;
            if self.pending.meta(middle).zxid > applied_zxid {
                last = middle;
            } else {
                first = middle + 1;
            }
        }
        // The follower's last applied transaction must be one this leader holds: a follower
        // ahead of it, or with another transaction at that zxid, is no prefix of its history.
        if first > low {
            return (self.pending.meta(first - 1).zxid == applied_zxid).then_some(first);
        }
        if low == 0 {
            return Some(first);
        }
        let meta = self.pending.meta(low);
        (meta.fragment == 0 && super::zxid_follows(applied_zxid, meta.zxid)).then_some(low)
    }
}

/// The first position in `from..to` that begins a transaction (`to` if none does).
pub(crate) fn first_whole(ring: &EntryRing, from: u64, to: u64) -> u64 {
    let mut position = from;
    while position < to && ring.meta(position).fragment != 0 {
        position += 1;
    }
    position
}

fn follower_target(follower: usize) -> Target {
    Target::Follower(u8::try_from(follower).unwrap_or(u8::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;
    use crate::replica::NodeReplica;
    use crate::store::StoreConfig;
    use crate::zab::LEADER_EPOCH;
    use crate::zab::test_support::*;

    const TXN_LEN: usize = 10_000;

    fn config() -> PipelineConfig {
        PipelineConfig {
            node: 0,
            nodes: 3,
            pipeline: 0,
            pipelines: 1,
            max_txn_len: TXN_LEN,
            slot_len: PipelineConfig::default_slot_len(TXN_LEN, TXN_LEN, 4096),
            item_len: TXN_LEN - 8,
            cluster_tag: 1,
            run: 2,
            epoch: LEADER_EPOCH,
            integrity: wire::Integrity::Crc32c,
            sessions: 2,
            window: 64,
            retained: 128,
            mtu: 4096,
            keys: 4,
            instance: 1,
            fingerprint: 0,
        }
    }

    /// Fragment `fragment` of session 0's write `seq` from node 1's process `instance`.
    fn fragment(instance: u64, seq: u64, fragment: u32, fill: u8) -> Vec<u8> {
        let config = config();
        let slot = config.slot_len;
        let piece = wire::piece_len(TXN_LEN, fragment, slot);
        let mut datagram = vec![0u8; wire::write_len(1, piece)];
        let mut header = config.header(Kind::Write, 1, 0, [0; wire::WORDS]);
        header.from_node = 1;
        header.instance = instance;
        wire::put_header(&mut datagram, &header);
        wire::put_write_prefix(&mut datagram, u64::from(fragment) + 1);
        let at = wire::HEADER_BYTES + wire::WRITE_PREFIX;
        let bytes = vec![fill; piece];
        wire::put_entry(
            &mut datagram[at..],
            1,
            0,
            fragment,
            u32::try_from(TXN_LEN).unwrap(),
            seq,
            &bytes,
        );
        wire::seal(&mut datagram, &config.integrity);
        datagram
    }

    #[test]
    fn a_restarted_follower_never_completes_its_predecessors_partial_write() {
        let config = config();
        assert_eq!(config.max_fragments(), 3);
        let replica = NodeReplica::new(&StoreConfig {
            keys: 4,
            value_size: TXN_LEN - 8,
            hugepages: false,
        })
        .unwrap();
        let board = CatchupBoard::new(1);
        let mut leader = Leader::new(config);
        let context = config.wire_context();
        let deliver = |leader: &mut Leader, datagram: &[u8]| {
            leader.handle(&context.decode(datagram).unwrap(), 1_000);
        };
        leader.accept_hello(1, 7, 0, false, (0, 0), &board, &replica);
        // The old process sent the first two fragments of its write 5, then died.
        deliver(&mut leader, &fragment(7, 5, 0, 0xaa));
        deliver(&mut leader, &fragment(7, 5, 1, 0xaa));
        // Its successor reuses sequence 5 (a restart within the same second).
        leader.accept_hello(1, 8, 0, false, (0, 0), &board, &replica);
        for index in 0..3 {
            deliver(&mut leader, &fragment(8, 5, index, 0xbb));
        }
        assert_eq!(leader.incoming_len(), 3, "the new write is queued whole");
        let mut bytes = vec![0u8; TXN_LEN];
        leader.bulk.ring.txn(leader.bulk.head).copy_to(&mut bytes);
        assert!(
            bytes.iter().all(|byte| *byte == 0xbb),
            "the old process's fragments leaked into its successor's write"
        );
    }

    /// The sessions of the transactions the leader prepared, in pseq order.
    fn prepared_order(leader: &Leader) -> Vec<(u16, usize)> {
        let mut order = Vec::new();
        let mut pseq = 0;
        while pseq < leader.prepared() {
            let meta = leader.pending.meta(pseq);
            order.push((meta.session, meta.txn_len as usize));
            pseq += u64::from(leader.config.fragments_of(meta.txn_len as usize));
        }
        order
    }

    #[test]
    fn a_small_write_waits_for_at_most_one_large_transaction() {
        // A single node (it commits alone), 8 sessions, transactions of 3 fragments.
        let config = PipelineConfig {
            nodes: 1,
            sessions: 8,
            ..config()
        };
        let replica = NodeReplica::new(&StoreConfig {
            keys: 4,
            value_size: TXN_LEN - 8,
            hugepages: false,
        })
        .unwrap();
        let mut leader = Leader::new(config);
        let large = vec![0u8; TXN_LEN];
        let small = vec![0u8; 100];
        // Four large writes queued before a small one, then a large one after it, and a small
        // one of session 0, whose large write is still waiting: it must stay behind it.
        for session in 0..4 {
            assert!(leader.submit_write(session, 1, &large));
        }
        assert!(leader.submit_write(5, 1, &small));
        assert!(leader.submit_write(6, 1, &large));
        assert!(leader.submit_write(0, 2, &small));
        assert!(leader.submit_write(7, 1, &small));
        let zxids = ZxidSource::new();
        // Prepared (and committed, alone) in the first step, applied in the second.
        for now_ns in [1_000, 2_000] {
            leader.advance(
                now_ns,
                &mut Recording::new(config.mtu),
                &replica,
                &zxids,
                &CatchupBoard::new(1),
                &mut NoCompletions,
                &Limits::default(),
            );
        }
        assert_eq!(
            prepared_order(&leader),
            [
                (0, TXN_LEN),
                // The small writes queued by the time the first large one was prepared.
                (5, 100),
                (7, 100),
                (1, TXN_LEN),
                (2, TXN_LEN),
                (3, TXN_LEN),
                (6, TXN_LEN),
                // Behind its session's large write, in the bulk queue.
                (0, 100),
            ]
        );
        assert_eq!(leader.incoming_len(), 0);
        assert_eq!(leader.stats().writes_applied, 8);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod deadline_tests {
    use super::*;
    use crate::zab::test_support::*;

    /// Records the kinds sent.
    #[test]
    fn an_idle_leader_waits_for_its_heartbeat_and_a_submitted_write_is_due_at_once() {
        let config = small_config(0, 2, 1);
        let replica = small_replica();
        let board = CatchupBoard::new(1);
        let zxids = ZxidSource::new();
        let limits = Limits::default();
        let mut leader = Leader::new(config);
        let mut outbox = Recording(vec![0; 1024], Vec::new());
        let mut advance = |leader: &mut Leader, now_ns: u64| {
            outbox.1.clear();
            leader.advance(
                now_ns,
                &mut outbox,
                &replica,
                &zxids,
                &board,
                &mut NoCompletions,
                &limits,
            );
            std::mem::take(&mut outbox.1)
        };
        leader.accept_hello(1, 11, 0, false, (0, 0), &board, &replica);
        leader.accept_hello(2, 12, 0, false, (0, 0), &board, &replica);
        assert_eq!(
            leader.next_deadline(1_000, &limits),
            1_000,
            "answers are due"
        );
        assert_eq!(advance(&mut leader, 1_000), [Kind::Hello, Kind::Hello]);

        // Nothing in flight, nothing to answer: the heartbeat CREDITs, an interval after the
        // last broadcast (none yet).
        let heartbeat = limits.heartbeat_interval_ns;
        assert_eq!(leader.next_deadline(1_000, &limits), heartbeat);
        assert!(advance(&mut leader, heartbeat - 1).is_empty());
        assert_eq!(leader.next_deadline(heartbeat - 1, &limits), heartbeat);
        assert_eq!(
            advance(&mut leader, heartbeat),
            [Kind::Credit, Kind::Credit]
        );
        assert_eq!(leader.next_deadline(heartbeat, &limits), 2 * heartbeat);

        // A write of its own is work at once; once prepared, the followers' silence is timed.
        let now_ns = heartbeat + 5_000;
        assert_eq!(leader.next_deadline(now_ns, &limits), 2 * heartbeat);
        assert!(leader.submit_write(0, 1, &[7; 24]));
        assert_eq!(leader.next_deadline(now_ns, &limits), now_ns);
        assert_eq!(advance(&mut leader, now_ns), [Kind::Prepare]);
        assert_eq!(
            leader.next_deadline(now_ns, &limits),
            now_ns + limits.retransmit_timeout_ns
        );
    }
}
