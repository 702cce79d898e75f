//! ZAB's broadcast with loss recovery and follower catch-up, as a pure state machine per
//! pipeline.
//!
//! Worker `t` of every node forms pipeline `t`: the leader's worker `t` orders the writes of
//! the followers' workers `t` and of its own sessions. Each pipeline numbers its prepares with
//! a contiguous 64-bit sequence (`pseq`), used by ACK and COMMIT ranges; the leader also gives
//! every write a zxid from one counter shared by all of its workers (one fetch-add per batch),
//! and every node applies writes in zxid order across all its workers through a [`StateMachine`].
//!
//! The state machines do no I/O: they are handed decoded messages, the time, buffers to write
//! outgoing messages into (an [`Outbox`]) and the replica to apply to; the worker loop and the
//! deterministic simulator drive them alike. Nothing here allocates after construction.
//!
//! Flow control (credits) keeps receivers within their posted receives as long as nothing is
//! lost; it is a high-water scheme, so a lost message never leaks a credit. Multicast PREPAREs
//! and COMMITs carry a per-type message sequence, and every follower message reports the
//! highest of each it consumed, the pseq below which it holds every prepare (the cumulative
//! ACK), the pseq below which it has applied (which bounds the window) and its snapshot
//! progress ([`FollowerWords`]). WRITEs carry the follower's own message sequence, which the
//! leader's CREDITs report back.
//!
//! Trust: every datagram names its run, its sender's process instance and its epoch, and is
//! sealed ([`wire::Integrity`]). A leader takes messages only from the follower instances that
//! said hello; a follower only from the leader instance and epoch that answered its hello
//! ([`Follower::knows`](follower::Follower::knows)), so nothing it applies came from anyone else.
//!
//! Loss recovery: the leader retransmits, by unicast, the prepares a follower has not
//! acknowledged after a timeout (doubling while the follower stays silent) or at once when the
//! follower reports a gap with a NACK; every PREPARE also carries the commit point, and a COMMIT
//! is repeated for a follower that holds everything but has not applied it. Followers repeat
//! forwarded writes that have not come back in a PREPARE, and the leader orders each
//! (node, session, sequence) at most once. Duplicates are dropped and counted. The leader sends
//! while a quorum of followers has credit; one that stays out of credit longer than a grace
//! period is left to catch up by retransmission, and the window follows the quorum's applied
//! point, so a slow or dead follower does not hold the cluster back.
//!
//! A restarted follower says hello with a new instance; the leader's workers each restart
//! their pipeline towards it at their applied point, agree on a base zxid (the leader's applied
//! zxid once every worker has) through a [`CatchupBoard`], and stream their share of the store
//! (entries with the zxid of their value) in SNAPSHOT messages; the follower installs entries
//! that are newer than what it holds and applies the pipelines' writes after the base zxid.

pub mod election;
pub mod follower;
pub mod leader;
pub mod node;
#[cfg(test)]
pub(crate) mod test_support;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};

use rzab_shared::limits::{
    MAX_DOORBELL_BATCH, MAX_NODES, MAX_PREPARES_PER_MSG, MAX_WRITES_PER_MSG,
};

pub use wire::Kind;

use std::sync::Mutex;

/// zxid of the state before any write: epoch 1, counter 0. A counter that overflows its low
/// 32 bits carries into the epoch (as ZooKeeper forces a new epoch on rollover), so the 64-bit
/// zxid keeps increasing and never wraps in any real run.
pub const ZXID_START: u64 = 1 << 32;

/// The epoch node 0 leads in: the only one until leader election lands.
pub const LEADER_EPOCH: u32 = 1;

/// The most entries [`PipelineConfig::default_slot_len`] lets the longest transaction take.
pub const DEFAULT_MAX_FRAGMENTS: usize = 64;

/// Credit maxima (the knob ranges' upper ends), which size the receive rings.
pub const MAX_PREPARE_CREDITS: usize = 64;
pub const MAX_WRITE_CREDITS: usize = 64;
pub const MAX_COMMIT_CREDITS: usize = 512;
/// CREDIT messages that can be in flight from one peer: each reports at least half a credit
/// budget or a quarter of the window, so at most this many can be outstanding.
pub const MAX_CREDIT_MESSAGES: usize = 8;

const _: () = assert!(MAX_PREPARES_PER_MSG <= 64 && MAX_WRITES_PER_MSG <= 64);
const _: () = assert!(MAX_DOORBELL_BATCH <= 64);

/// Receive slots a follower needs so that no message ever finds none posted.
pub const fn follower_recv_slots() -> usize {
    (MAX_PREPARE_CREDITS + MAX_COMMIT_CREDITS + MAX_CREDIT_MESSAGES).next_power_of_two()
}

/// Receive slots the leader needs for `followers` followers.
pub const fn leader_recv_slots(followers: usize) -> usize {
    (followers * (MAX_WRITE_CREDITS + MAX_PREPARE_CREDITS + MAX_CREDIT_MESSAGES))
        .next_power_of_two()
}

/// Where a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Leader,
    Follower(u8),
    /// Every follower: by multicast or by one unicast each, as the worker's knob says.
    AllFollowers,
}

/// Receives outgoing messages from a pipeline.
pub trait Outbox {
    /// A buffer for the next message (at least the MTU long), or `None` when nothing more can
    /// be sent this iteration.
    fn buffer(&mut self) -> Option<&mut [u8]>;
    /// Sends the first `len` bytes of the buffer last returned. `batch` is how many entries
    /// (prepares, writes, acked or committed writes) the message carries, for the statistics.
    fn send(&mut self, target: Target, kind: Kind, len: usize, batch: u64);
    /// Sends a repeat of something sent before: like [`Outbox::send`], but counted only as a
    /// retransmission (by the pipeline), not as a message of its path or batch.
    fn resend(&mut self, target: Target, kind: Kind, len: usize);
}

/// One transaction's bytes, as they lie in a ring: in one piece, or in two where the ring
/// wrapped. The protocol never interprets them; a [`StateMachine`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Txn<'a> {
    head: &'a [u8],
    tail: &'a [u8],
}

impl<'a> Txn<'a> {
    /// A transaction in one piece.
    pub fn whole(bytes: &'a [u8]) -> Self {
        Txn {
            head: bytes,
            tail: &[],
        }
    }

    /// A transaction whose bytes are `head` followed by `tail`.
    pub fn split(head: &'a [u8], tail: &'a [u8]) -> Self {
        Txn { head, tail }
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its pieces, in order (the second empty unless the ring wrapped).
    pub fn parts(&self) -> [&'a [u8]; 2] {
        [self.head, self.tail]
    }

    /// The transaction without its first `count` bytes.
    pub fn skip(&self, count: usize) -> Txn<'a> {
        if count <= self.head.len() {
            Txn {
                head: &self.head[count..],
                tail: self.tail,
            }
        } else {
            let rest = (count - self.head.len()).min(self.tail.len());
            Txn::whole(&self.tail[rest..])
        }
    }

    /// The little-endian u64 at byte `at` (bytes past the end read as 0).
    pub fn u64_at(&self, at: usize) -> u64 {
        let mut word = [0u8; 8];
        for (index, byte) in word.iter_mut().enumerate() {
            let position = at + index;
            *byte = if position < self.head.len() {
                self.head[position]
            } else {
                self.tail
                    .get(position - self.head.len())
                    .copied()
                    .unwrap_or(0)
            };
        }
        u64::from_le_bytes(word)
    }

    /// Copies the bytes into the front of `out` (as many as fit); returns how many.
    pub fn copy_to(&self, out: &mut [u8]) -> usize {
        let first = self.head.len().min(out.len());
        out[..first].copy_from_slice(&self.head[..first]);
        let second = self.tail.len().min(out.len() - first);
        out[first..first + second].copy_from_slice(&self.tail[..second]);
        first + second
    }
}

/// What applies transactions: the node-wide, zxid-ordered state machine every pipeline of a
/// node applies through (the key-value store of the benchmark is one; the znode tree will be
/// another). It also produces and installs the snapshot a joining follower catches up from:
/// a sequence of items `0..keys`, each with the zxid of the write that produced it.
pub trait StateMachine {
    /// Applies the transaction if `zxid` is the next in the node's total order; returns false
    /// (and changes nothing) if an earlier zxid has not been applied yet.
    fn try_apply(&self, zxid: u64, txn: Txn<'_>) -> bool;
    /// The last zxid applied on this node.
    fn applied_zxid(&self) -> u64;
    /// Copies snapshot item `item` into `out` and returns the zxid that wrote it; `None` for
    /// an item the state machine does not hold.
    fn read_for_snapshot(&self, item: u64, out: &mut [u8]) -> Option<u64>;
    /// Installs a snapshot item unless the state already holds a newer write to it.
    fn install(&self, item: u64, zxid: u64, bytes: &[u8]);
    /// Catch-up: every write up to `zxid` is (or will be, by snapshot) in the state; applying
    /// resumes after it. Only the first call on a node counts.
    fn set_base(&self, zxid: u64);
}

/// Reports writes of local origin that became applied here.
pub trait Completions {
    fn write_applied(&mut self, session: u16, session_seq: u64, zxid: u64);
    /// A write whose fate this node cannot learn (it was sent again across a change of
    /// leader, and this node then caught up by snapshot, which holds no sessions): it was
    /// ordered at most once, but it may never be reported applied here. The session gives it
    /// up, as a ZooKeeper client does a request whose connection was lost.
    fn write_abandoned(&mut self, _session: u16, _session_seq: u64) {}
}

/// Live limits, read from the knobs by the worker (or set by the simulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub prepare_batch: usize,
    pub write_batch: usize,
    pub ack_batch: u64,
    pub commit_batch: u64,
    pub prepare_credits: u64,
    pub write_credits: u64,
    pub commit_credits: u64,
    /// The first retransmission timeout.
    pub retransmit_timeout_ns: u64,
    /// How long a follower out of credits may hold the leader back while a quorum could go on.
    pub slow_follower_grace_ns: u64,
    /// Longest a pipeline sends its peer nothing before it sends a heartbeat.
    pub heartbeat_interval_ns: u64,
    /// Longest a follower may hear nothing from its leader (a leader from a quorum) before
    /// it reports so.
    pub peer_timeout_ns: u64,
    /// Longest a follower may hear nothing from its leader, or a leader from a quorum, before
    /// it gives it up and starts an election (0: never; the leader of the start leads for
    /// good). Also how long an elected leader waits for a quorum to follow it.
    pub election_timeout_ns: u64,
    /// How long an election waits, once a quorum agrees, for a better vote before deciding.
    pub finalize_wait_ns: u64,
    /// How long a process that has not joined a cluster yet waits for the cluster of the
    /// start (node 0 leading) before it looks for another leader by election: a follower for
    /// its hello's answer, node 0 for a quorum to join it (twice as long). Long enough for
    /// every node of a cluster starting together; what a process restarted into a cluster that
    /// elected another leader waits before it finds that leader.
    pub startup_grace_ns: u64,
}

impl Limits {
    /// The longest a backed-off retransmission timeout grows.
    pub fn max_retransmit_timeout_ns(&self) -> u64 {
        self.retransmit_timeout_ns.saturating_mul(32)
    }

    /// How long a silent follower is still waited for before the leader stops keeping
    /// prepares for it (it will catch up by snapshot when it restarts).
    pub fn follower_dead_after_ns(&self) -> u64 {
        self.max_retransmit_timeout_ns()
            .saturating_mul(4)
            .max(100_000_000)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            prepare_batch: MAX_PREPARES_PER_MSG,
            write_batch: MAX_WRITES_PER_MSG,
            ack_batch: 4096,
            commit_batch: 4096,
            prepare_credits: 16,
            write_credits: 8,
            commit_credits: 64,
            retransmit_timeout_ns: 500_000,
            slow_follower_grace_ns: 1_000_000,
            heartbeat_interval_ns: 20_000_000,
            peer_timeout_ns: 1_000_000_000,
            election_timeout_ns: 0,
            finalize_wait_ns: 1_000_000,
            startup_grace_ns: 1_000_000_000,
        }
    }
}

/// Why a pipeline configuration cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PipelineConfigError {
    #[error("node {node} of {nodes}: need 1..={MAX_NODES} nodes")]
    Nodes { node: u8, nodes: u8 },
    #[error(
        "window {window} must be a power of two of at least {least} (two of the largest batches, and two transactions of {fragments} fragments)"
    )]
    Window {
        window: usize,
        least: usize,
        fragments: usize,
    },
    #[error(
        "the committed-transaction ring of {retained} entries must be a power of two of at least two windows ({least})"
    )]
    Retained { retained: usize, least: usize },
    #[error("the transport MTU of {mtu} bytes is below the {least} one entry needs")]
    Mtu { mtu: usize, least: usize },
    #[error("transactions of up to {0} bytes cannot be carried")]
    TxnLength(usize),
    #[error(
        "entry slots of {slot} bytes: need a multiple of 8 in 8..={most} (what one datagram's entry can carry)"
    )]
    SlotLength { slot: usize, most: usize },
    #[error("{0} sessions: at most 65535")]
    Sessions(usize),
}

/// Fixed facts about one pipeline.
#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    pub node: u8,
    pub nodes: u8,
    pub pipeline: u8,
    pub pipelines: u8,
    /// Bytes of the longest transaction of this run (fixed at start; any length from 1 up to
    /// it may be submitted).
    pub max_txn_len: usize,
    /// Bytes of transaction one ring slot, and so one entry, holds: a longer transaction takes
    /// several consecutive entries (its fragments). See [`PipelineConfig::default_slot_len`].
    pub slot_len: usize,
    /// Bytes of every snapshot item (fixed at start; a multiple of 8).
    pub item_len: usize,
    pub cluster_tag: u32,
    /// The run every node of the cluster was started with ([`wire::run_tag`]).
    pub run: u64,
    /// The epoch this node's messages speak in (its leader's; fixed until election lands).
    pub epoch: u32,
    /// How this node's datagrams are sealed and checked.
    pub integrity: wire::Integrity,
    pub sessions: usize,
    /// Prepares that may be outstanding (prepared, not yet applied everywhere); a power of two.
    pub window: usize,
    /// Prepares the leader keeps, committed or not, to repeat them to a follower that missed
    /// them (the committed-transaction ring: a lagging follower is brought back from it, by
    /// DIFF, and only one that fell out of it needs a snapshot); a power of two of at least
    /// two windows. See [`retained_for_bytes`].
    pub retained: usize,
    pub mtu: usize,
    /// Snapshot items (the store's keys, ids `0..keys`), which the catch-up snapshot covers.
    pub keys: u64,
    /// This process's instance: a restarted process has a new one.
    pub instance: u64,
    /// The configuration fingerprint every node of the cluster must share.
    pub fingerprint: u64,
}

impl PipelineConfig {
    pub fn followers(&self) -> usize {
        usize::from(self.nodes) - 1
    }

    /// Acks needed besides the leader's own.
    pub fn quorum_followers(&self) -> usize {
        usize::from(self.nodes) / 2
    }

    /// The most transaction bytes one PREPARE or WRITE entry can carry within `mtu` (a
    /// multiple of 8 the header's slot field can name).
    pub fn slot_capacity(mtu: usize) -> usize {
        let prefix = wire::PREPARE_PREFIX.max(wire::WRITE_PREFIX);
        let room = mtu.saturating_sub(wire::HEADER_BYTES + prefix + wire::ENTRY_FIXED);
        (room.min(usize::from(u16::MAX) * 8) / 8) * 8
    }

    /// The slot length for transactions of `shortest..=longest` bytes within `mtu`: the
    /// shortest whole (so the common small transaction takes one slot and batches many to a
    /// datagram), but no shorter than a [`DEFAULT_MAX_FRAGMENTS`]th of the longest (so the
    /// longest takes few entries, and the window and gathering bitmaps stay small), and no
    /// longer than a datagram's entry. A run of one transaction length gets slots of exactly
    /// that length, rounded up to 8.
    pub fn default_slot_len(shortest: usize, longest: usize, mtu: usize) -> usize {
        let shortest = shortest.clamp(1, longest.max(1)).next_multiple_of(8);
        let share = longest
            .max(1)
            .div_ceil(DEFAULT_MAX_FRAGMENTS)
            .next_multiple_of(8);
        shortest.max(share).min(Self::slot_capacity(mtu)).max(8)
    }

    /// Entries (consecutive pseqs) a transaction of `txn_len` bytes takes: 1, or its fragments.
    pub fn fragments_of(&self, txn_len: usize) -> u32 {
        wire::fragments_of(txn_len, self.slot_len)
    }

    /// Entries the longest transaction takes.
    pub fn max_fragments(&self) -> usize {
        self.fragments_of(self.max_txn_len) as usize
    }

    /// Entries of full slots one PREPARE can carry within the MTU (at least 1): a PREPARE
    /// carries at least this many whenever it has them to send, as no entry is longer.
    pub fn prepares_fitting(&self) -> usize {
        ((self
            .mtu
            .saturating_sub(wire::HEADER_BYTES + wire::PREPARE_PREFIX))
            / wire::entry_wire_len(self.slot_len))
        .clamp(1, MAX_PREPARES_PER_MSG)
    }

    /// Bytes of snapshot item per SNAPSHOT entry: the whole item, or a chunk that fills the
    /// datagram.
    pub fn snapshot_slot_len(&self) -> usize {
        let capacity = (self.mtu.saturating_sub(
            wire::HEADER_BYTES + wire::SNAPSHOT_PREFIX + wire::SNAPSHOT_ENTRY_FIXED,
        ) / 8)
            * 8;
        let whole = self.item_len.max(8).next_multiple_of(8);
        if whole <= capacity {
            whole
        } else {
            capacity.max(8)
        }
    }

    /// Snapshot positions one item takes: 1, or its chunks.
    pub fn snapshot_chunks(&self) -> u64 {
        self.item_len.max(1).div_ceil(self.snapshot_slot_len()) as u64
    }

    /// Entries one SNAPSHOT can carry within the MTU.
    pub fn snapshot_entries_fitting(&self) -> usize {
        if self.snapshot_chunks() > 1 {
            return 1;
        }
        ((self.mtu - wire::HEADER_BYTES - wire::SNAPSHOT_PREFIX)
            / (wire::SNAPSHOT_ENTRY_FIXED + self.snapshot_slot_len()))
        .min(MAX_SNAPSHOT_ENTRIES_PER_MSG)
    }

    /// The snapshot positions `[first, end)` this pipeline sends or installs: its share of the
    /// items, each [`PipelineConfig::snapshot_chunks`] positions long.
    pub fn snapshot_range(&self) -> (u64, u64) {
        let pipelines = u64::from(self.pipelines.max(1));
        let share = |pipeline: u64| {
            u64::try_from(u128::from(self.keys) * u128::from(pipeline) / u128::from(pipelines))
                .unwrap_or(u64::MAX)
        };
        let pipeline = u64::from(self.pipeline);
        let chunks = self.snapshot_chunks();
        (
            share(pipeline).saturating_mul(chunks),
            share(pipeline + 1).saturating_mul(chunks),
        )
    }

    /// Checks that the configuration can work at all.
    pub fn validate(&self) -> Result<(), PipelineConfigError> {
        if self.nodes == 0 || usize::from(self.nodes) > MAX_NODES || self.node >= self.nodes {
            return Err(PipelineConfigError::Nodes {
                node: self.node,
                nodes: self.nodes,
            });
        }
        let most_slot = Self::slot_capacity(self.mtu);
        if self.slot_len == 0 || self.slot_len % 8 != 0 || self.slot_len > most_slot {
            return Err(PipelineConfigError::SlotLength {
                slot: self.slot_len,
                most: most_slot,
            });
        }
        if self.max_txn_len == 0 || self.max_txn_len > u32::MAX as usize {
            return Err(PipelineConfigError::TxnLength(self.max_txn_len));
        }
        let least_window = (2 * MAX_PREPARES_PER_MSG).max(2 * self.max_fragments());
        if !self.window.is_power_of_two() || self.window < least_window {
            return Err(PipelineConfigError::Window {
                window: self.window,
                least: least_window.next_power_of_two(),
                fragments: self.max_fragments(),
            });
        }
        if !self.retained.is_power_of_two() || self.retained < 2 * self.window {
            return Err(PipelineConfigError::Retained {
                retained: self.retained,
                least: 2 * self.window,
            });
        }
        let least_mtu = wire::prepare_len(1, 8).max(wire::snapshot_len(1, 8));
        if self.mtu < least_mtu {
            return Err(PipelineConfigError::Mtu {
                mtu: self.mtu,
                least: least_mtu,
            });
        }
        if self.sessions > usize::from(u16::MAX) {
            return Err(PipelineConfigError::Sessions(self.sessions));
        }
        Ok(())
    }

    /// This configuration with the committed-transaction ring [`retained_for_bytes`] gives
    /// for `bytes` in all.
    pub fn with_retained(self, bytes: u64) -> Self {
        PipelineConfig {
            retained: retained_for_bytes(
                bytes,
                usize::from(self.pipelines),
                self.slot_len,
                self.window,
            ),
            ..self
        }
    }

    /// The header of a message of this pipeline's node (sealed later by the outbox).
    pub fn header(
        &self,
        kind: Kind,
        count: usize,
        flags: u16,
        words: [u64; wire::WORDS],
    ) -> wire::Header {
        wire::Header {
            kind,
            from_node: self.node,
            pipeline: self.pipeline,
            count: u16::try_from(count).unwrap_or(u16::MAX),
            cluster_tag: self.cluster_tag,
            slot_words: match kind {
                Kind::Prepare | Kind::Write => wire::slot_words(self.slot_len),
                Kind::Snapshot => wire::slot_words(self.snapshot_slot_len()),
                _ => 0,
            },
            flags,
            run: self.run,
            instance: self.instance,
            epoch: self.epoch,
            words,
        }
    }

    /// What this node checks received datagrams against.
    pub fn wire_context(&self) -> wire::WireContext {
        wire::WireContext {
            cluster_tag: self.cluster_tag,
            run: self.run,
            slot_len: self.slot_len,
            max_txn_len: self.max_txn_len,
            snapshot_slot_len: self.snapshot_slot_len(),
            nodes: usize::from(self.nodes),
            pipelines: usize::from(self.pipelines),
            integrity: self.integrity,
        }
    }
}

/// Prepares each of `pipelines` leader pipelines keeps in a committed-transaction ring of
/// `bytes` in all, for entries of `slot_len`-byte slots ([`PipelineConfig::slot_len`]): the
/// largest power of two that fits, and at least two windows (the least the leader works with).
pub fn retained_for_bytes(bytes: u64, pipelines: usize, slot_len: usize, window: usize) -> usize {
    let entry = (std::mem::size_of::<EntryMeta>() + slot_len) as u64;
    let per_pipeline = bytes / (pipelines.max(1) as u64) / entry;
    let entries = usize::try_from(per_pipeline).unwrap_or(usize::MAX);
    let floor = 2 * window.max(1);
    if entries <= floor {
        return floor.next_power_of_two();
    }
    // The largest power of two not above `entries`.
    1usize << (usize::BITS - 1 - entries.leading_zeros())
}

/// The committed-transaction ring's default, in bytes per node: at 32-byte values about
/// 3.7 million prepares, seconds of full write load on this machine.
pub const DEFAULT_COMMITTED_RING_BYTES: u64 = 256 << 20;

/// The default largest transaction: ZooKeeper's default request limit (jute.maxbuffer).
pub const DEFAULT_MAX_TXN_BYTES: usize = 1 << 20;

/// Most entries one SNAPSHOT message carries.
pub const MAX_SNAPSHOT_ENTRIES_PER_MSG: usize = 64;
/// SNAPSHOT messages the leader keeps in flight towards one catching-up follower.
pub const SNAPSHOT_MESSAGES_IN_FLIGHT: u64 = 16;
/// Messages one retransmission round sends to one follower at most.
pub const RETRANSMIT_BURST: usize = 8;

/// The header words of every follower-to-leader message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FollowerWords {
    /// Highest multicast PREPARE message sequence consumed.
    pub prepare_seen: u64,
    /// Highest multicast COMMIT message sequence consumed.
    pub commit_seen: u64,
    /// Every prepare below this pseq is held (the cumulative ACK).
    pub received: u64,
    /// Every prepare below this pseq is applied.
    pub applied: u64,
    /// Snapshot entries installed: the next key position expected.
    pub snapshot_installed: u64,
}

impl FollowerWords {
    pub fn to_words(self) -> [u64; wire::WORDS] {
        [
            self.prepare_seen,
            self.commit_seen,
            self.received,
            self.applied,
            self.snapshot_installed,
        ]
    }

    pub fn from_words(words: [u64; wire::WORDS]) -> Self {
        FollowerWords {
            prepare_seen: words[0],
            commit_seen: words[1],
            received: words[2],
            applied: words[3],
            snapshot_installed: words[4],
        }
    }
}

/// Header words of leader-to-follower PREPARE and COMMIT messages.
pub mod leader_words {
    /// This message's per-type sequence (0 on a unicast retransmission).
    pub const SEQ: usize = 0;
    /// The leader's commit point (pseq) when it sent the message.
    pub const COMMIT_POINT: usize = 1;
    /// The oldest pseq the leader can still retransmit.
    pub const RETAINED_FROM: usize = 2;
    /// CREDIT: the highest WRITE message sequence of this follower the leader has consumed.
    pub const WRITE_SEEN: usize = 0;
}

/// Header words of HELLO messages (the sender's instance and epoch are in the header).
pub mod hello_words {
    /// The sender's configuration fingerprint.
    pub const FINGERPRINT: usize = 0;
    /// Leader's answer: the pseq the follower's pipeline starts at.
    pub const START_PSEQ: usize = 1;
    /// Leader's answer: 1 if a snapshot follows (a follower joining a running cluster).
    pub const CATCH_UP: usize = 2;
    /// Leader's answer: the last zxid of its history (what a follower held beyond it is
    /// truncated).
    pub const HISTORY_END: usize = 3;
    /// Follower's hello: the last zxid its node applied (the leader chooses DIFF or SNAP by it).
    pub const APPLIED_ZXID: usize = 1;
    /// Follower's hello: the highest epoch its node accepted (discovery: the new leader's
    /// epoch is above every one a quorum accepted).
    pub const ACCEPTED_EPOCH: usize = 2;
    /// Follower's hello: how many times this process has begun to join a leader (a hello
    /// with a new count is a new join of the same process, not a repeat).
    pub const JOIN: usize = 4;
}

/// Header words of VOTE messages (election notifications; the sender's node and process
/// instance are in the header).
pub mod vote_words {
    /// The proposed leader (bits 0..8), the sender's state (8..16: 0 looking, 1 following,
    /// 2 leading) and the proposed leader's epoch (32..64).
    pub const LEADER_STATE_EPOCH: usize = 0;
    /// The proposed leader's last zxid.
    pub const ZXID: usize = 1;
    /// The election round the sender votes in.
    pub const ROUND: usize = 2;
    /// The sender's configuration fingerprint (votes of another configuration are refused).
    pub const FINGERPRINT: usize = 3;
}

/// How the leader's workers agree on the base zxid of a restarted follower's snapshot: each
/// registers once it has restarted its pipeline towards the follower's new instance, and the
/// last to register reads the leader's applied zxid. Every write after that zxid is in some
/// pipeline's stream from its restart point on; every write up to it is in the store when the
/// snapshots are read. Used only when a follower joins, never on the data path.
#[derive(Debug)]
pub struct CatchupBoard {
    pipelines: u32,
    slots: Mutex<[CatchupSlot; MAX_NODES]>,
}

#[derive(Clone, Copy, Debug, Default)]
struct CatchupSlot {
    instance: u64,
    registered: u64,
    base_zxid: Option<u64>,
}

impl CatchupBoard {
    pub fn new(pipelines: usize) -> Self {
        CatchupBoard {
            pipelines: u32::try_from(pipelines.min(64)).unwrap_or(64),
            slots: Mutex::new([CatchupSlot::default(); MAX_NODES]),
        }
    }

    /// Pipeline `pipeline` has restarted towards `follower`'s `instance`.
    pub fn register(
        &self,
        follower: usize,
        instance: u64,
        pipeline: u8,
        replica: &impl StateMachine,
    ) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        let Some(slot) = slots.get_mut(follower) else {
            return;
        };
        if slot.instance != instance {
            *slot = CatchupSlot {
                instance,
                ..CatchupSlot::default()
            };
        }
        slot.registered |= 1u64 << u32::from(pipeline).min(63);
        let all = if self.pipelines >= 64 {
            u64::MAX
        } else {
            (1u64 << self.pipelines) - 1
        };
        if slot.registered & all == all && slot.base_zxid.is_none() {
            slot.base_zxid = Some(replica.applied_zxid());
        }
    }

    /// The base zxid agreed for `follower`'s `instance`, once every pipeline has registered.
    pub fn base_zxid(&self, follower: usize, instance: u64) -> Option<u64> {
        let slots = self.slots.lock().ok()?;
        let slot = slots.get(follower)?;
        if slot.instance == instance {
            slot.base_zxid
        } else {
            None
        }
    }
}

/// Metadata of one entry (a transaction, or one fragment of one) held in a ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryMeta {
    pub zxid: u64,
    pub session_seq: u64,
    /// Which fragment of its transaction this entry is (0 for an unfragmented one).
    pub fragment: u32,
    /// Bytes of the whole transaction.
    pub txn_len: u32,
    pub session: u16,
    pub origin_node: u8,
    pub present: bool,
}

impl EntryMeta {
    /// A write of session `session` of node `node`, not yet ordered (its fragment and length
    /// are set as it is stored: [`EntryRing::put_txn`]).
    pub fn local_write(node: u8, session: u16, session_seq: u64) -> Self {
        EntryMeta {
            zxid: 0,
            session_seq,
            fragment: 0,
            txn_len: 0,
            session,
            origin_node: node,
            present: true,
        }
    }

    /// A received entry, not yet ordered (zxid 0).
    pub fn received(entry: &wire::EntryView<'_>) -> Self {
        EntryMeta {
            zxid: 0,
            session_seq: entry.session_seq,
            fragment: entry.fragment,
            txn_len: entry.txn_len,
            session: entry.session,
            origin_node: entry.origin_node,
            present: true,
        }
    }
}

/// A fixed ring of entries (metadata plus a slot of transaction bytes each), indexed by a
/// 64-bit position. A transaction of several fragments takes consecutive positions, every
/// slot full but the last's, so its bytes lie contiguously but for a wrap at the ring's end
/// ([`EntryRing::txn`]).
#[derive(Debug)]
pub struct EntryRing {
    metas: Vec<EntryMeta>,
    slots: Vec<u8>,
    slot_len: usize,
    mask: usize,
}

impl EntryRing {
    pub fn new(capacity: usize, slot_len: usize) -> Self {
        let capacity = capacity.next_power_of_two();
        EntryRing {
            metas: vec![EntryMeta::default(); capacity],
            slots: vec![0; capacity * slot_len],
            slot_len,
            mask: capacity - 1,
        }
    }

    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Marks the entries at positions `from..to` (at most the whole ring) as not held.
    pub fn clear_presence(&mut self, from: u64, to: u64) {
        let count = to.saturating_sub(from).min(self.capacity() as u64);
        for position in from..from + count {
            self.meta_mut(position).present = false;
        }
    }

    fn index(&self, position: u64) -> usize {
        // Only the low bits select the slot; truncation is the point.
        #[allow(clippy::cast_possible_truncation)]
        let low = position as usize;
        low & self.mask
    }

    pub fn meta(&self, position: u64) -> &EntryMeta {
        &self.metas[self.index(position)]
    }

    pub fn meta_mut(&mut self, position: u64) -> &mut EntryMeta {
        let index = self.index(position);
        &mut self.metas[index]
    }

    /// Bytes of the fragment held at `position`.
    pub fn piece_len(&self, position: u64) -> usize {
        let meta = self.meta(position);
        wire::piece_len(meta.txn_len as usize, meta.fragment, self.slot_len)
    }

    /// Bytes the entry at `position` takes on the wire.
    pub fn wire_len(&self, position: u64) -> usize {
        wire::entry_wire_len(self.piece_len(position))
    }

    /// The fragment's bytes held at `position`.
    pub fn piece(&self, position: u64) -> &[u8] {
        let at = self.index(position) * self.slot_len;
        &self.slots[at..at + self.piece_len(position)]
    }

    /// The transaction whose first entry is at `position` (its length from that entry).
    pub fn txn(&self, position: u64) -> Txn<'_> {
        let at = self.index(position) * self.slot_len;
        let len = (self.meta(position).txn_len as usize).min(self.slots.len());
        let first = (self.slots.len() - at).min(len);
        Txn::split(&self.slots[at..at + first], &self.slots[..len - first])
    }

    /// Stores one entry at `position`: its metadata, and `bytes` (its fragment's, at most a
    /// slot) in its slot.
    pub fn put(&mut self, position: u64, meta: EntryMeta, bytes: &[u8]) {
        let index = self.index(position);
        self.metas[index] = meta;
        let at = index * self.slot_len;
        let len = bytes.len().min(self.slot_len);
        self.slots[at..at + len].copy_from_slice(&bytes[..len]);
    }

    /// Stores a whole transaction from `position` on, a slot per fragment, each with `meta`
    /// but for its fragment index and the transaction's length; returns the entries it took.
    pub fn put_txn(&mut self, position: u64, meta: EntryMeta, txn: &[u8]) -> u64 {
        let txn_len = u32::try_from(txn.len()).unwrap_or(u32::MAX);
        let mut fragment = 0u32;
        for (offset, piece) in txn.chunks(self.slot_len.max(1)).enumerate() {
            self.put(
                position + offset as u64,
                EntryMeta {
                    fragment,
                    txn_len,
                    ..meta
                },
                piece,
            );
            fragment = fragment.saturating_add(1);
        }
        u64::from(fragment.max(1))
    }

    /// Encodes the `count` entries from `first` on as wire entries into `out`; returns the
    /// bytes written.
    pub fn encode_entries(&self, first: u64, count: u64, out: &mut [u8]) -> usize {
        let mut len = 0;
        for position in first..first + count {
            let meta = self.meta(position);
            len += wire::put_entry(
                &mut out[len..],
                meta.origin_node,
                meta.session,
                meta.fragment,
                meta.txn_len,
                meta.session_seq,
                self.piece(position),
            );
        }
        len
    }

    /// Copies the entry at `from` in `source` to `to` in this ring, with new metadata (of the
    /// same fragment of the same transaction).
    pub fn put_from(&mut self, to: u64, meta: EntryMeta, source: &EntryRing, from: u64) {
        let index = self.index(to);
        self.metas[index] = meta;
        let at = index * self.slot_len;
        let len = source.piece_len(from).min(self.slot_len);
        let from_at = source.index(from) * source.slot_len;
        self.slots[at..at + len].copy_from_slice(&source.slots[from_at..from_at + len]);
    }
}

/// What a node holds of a pipeline's history when its role changes (an election): the ring
/// of transactions by pseq and how far it is held and applied, and which session writes it
/// saw ordered. A leader goes on from it; a follower keeps the ring's memory and what was
/// applied, and is brought to the new leader's history by DIFF or snapshot.
#[derive(Debug)]
pub struct History {
    pub ring: EntryRing,
    /// Positions from here to `end` hold whole transactions (below, nothing or overwritten).
    pub from: u64,
    /// Positions below this are applied on this node.
    pub applied: u64,
    /// Positions below this are held.
    pub end: u64,
    /// Positions whose entries may still be marked as held (cleared by a follower that
    /// reuses the ring).
    pub marked: (u64, u64),
    /// Highest session sequence held and applied, by origin node and session.
    pub ordered_held: Vec<u64>,
    pub ordered_applied: Vec<u64>,
}

impl History {
    /// Nothing held: a pipeline's start.
    pub fn empty(config: &PipelineConfig) -> History {
        let sessions = config.sessions.max(1);
        History {
            ring: EntryRing::new(config.retained.max(config.window), config.slot_len),
            from: 0,
            applied: 0,
            end: 0,
            marked: (0, 0),
            ordered_held: vec![0; MAX_NODES * sessions],
            ordered_applied: vec![0; MAX_NODES * sessions],
        }
    }

    /// The zxid of the last transaction held, if any.
    pub fn last_zxid(&self) -> Option<u64> {
        (self.end > self.from).then(|| self.ring.meta(self.end - 1).zxid)
    }
}

/// Where the whole transactions of `ring` in `from..end` end: `end`, or the first fragment
/// of a transaction held only in part at the end (which is no part of a history yet).
pub(crate) fn whole_end(ring: &EntryRing, config: &PipelineConfig, from: u64, end: u64) -> u64 {
    if end <= from {
        return end;
    }
    let last = ring.meta(end - 1);
    let fragments = u64::from(config.fragments_of(last.txn_len as usize));
    if u64::from(last.fragment) + 1 == fragments {
        end
    } else {
        (end - 1).saturating_sub(u64::from(last.fragment)).max(from)
    }
}

/// Fills `held`, the exactly-once table a history hands on, with `applied` raised by the
/// writes of the transactions of `ring` in `from..end`: what the history holds, not what a
/// role queued or took beyond it.
pub(crate) fn ordered_through(
    held: &mut Vec<u64>,
    applied: &[u64],
    ring: &EntryRing,
    config: &PipelineConfig,
    from: u64,
    end: u64,
) {
    let sessions = config.sessions.max(1);
    held.clear();
    held.extend_from_slice(applied);
    let mut position = from;
    while position < end {
        let meta = *ring.meta(position);
        let index = usize::from(meta.origin_node) * sessions + usize::from(meta.session);
        if let Some(seq) = held.get_mut(index) {
            *seq = (*seq).max(meta.session_seq);
        }
        position += u64::from(config.fragments_of(meta.txn_len as usize)).max(1);
    }
}

/// Statistics a pipeline keeps about its own stalls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Sends held back for lack of credits.
    pub credit_stalls: u64,
    /// Committed writes held back because an earlier zxid was not applied yet.
    pub ordering_stalls: u64,
    /// Prepares held back because the window was full.
    pub window_stalls: u64,
    /// Messages that made no sense in this state (wrong direction, out-of-window sequence).
    pub dropped_unexpected: u64,
    pub writes_applied: u64,
    pub last_applied_zxid: u64,
    pub retransmitted_prepares: u64,
    pub retransmitted_commits: u64,
    pub retransmitted_writes: u64,
    /// Gaps a follower found in the prepare sequence (and asked to be filled).
    pub gaps_detected: u64,
    /// Messages, or entries of them, already held.
    pub duplicates_dropped: u64,
    pub snapshot_entries_sent: u64,
    pub snapshot_entries_installed: u64,
    /// Followers a leader brought to its history from its ring (DIFF), not by snapshot.
    pub diff_syncs: u64,
    /// Transactions a follower held that its new leader's history lacks, dropped (TRUNC).
    pub truncated: u64,
    /// Writes given up after a catch-up by snapshot ([`Completions::write_abandoned`]).
    pub writes_abandoned: u64,
    /// The highest zxid known to be committed by the leader.
    pub leader_zxid: u64,
}

/// A shared zxid source: the leader node's workers take one batch each with a fetch-add.
#[derive(Debug)]
pub struct ZxidSource(AtomicU64);

impl ZxidSource {
    pub fn new() -> Self {
        ZxidSource(AtomicU64::new(ZXID_START))
    }

    /// Takes `count` consecutive zxids; returns the first.
    pub fn take(&self, count: u64) -> u64 {
        self.0.fetch_add(count, Ordering::AcqRel) + 1
    }

    /// Starts numbering epoch `epoch`'s transactions: the next zxid taken is its first
    /// (`epoch << 32 | 1`). Never moves back.
    pub fn begin_epoch(&self, epoch: u32) {
        self.0.fetch_max(u64::from(epoch) << 32, Ordering::AcqRel);
    }

    pub fn last_issued(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

impl Default for ZxidSource {
    fn default() -> Self {
        Self::new()
    }
}

/// A half-budget threshold for returning credits: at least one.
pub(crate) fn half(budget: u64) -> u64 {
    (budget / 2).max(1)
}

/// When a timer that `advance` tests as `now_ns - since >= after` fires: `now_ns` if it
/// already has. The same saturating test as `advance`'s, so a deadline is never later than
/// the step that would act on it (a `since` in the future counts as fired once `after` is 0).
/// Whether `zxid` is the one applied right after `applied` in the total order: the next
/// counter value of the same epoch, or the first transaction of a later epoch (a new leader
/// numbers from `epoch << 32 | 1`, after whatever the epoch before it reached).
pub fn zxid_follows(applied: u64, zxid: u64) -> bool {
    zxid == applied.wrapping_add(1) || (zxid & 0xffff_ffff == 1 && zxid >> 32 > applied >> 32)
}

pub(crate) fn due_at(now_ns: u64, since: u64, after: u64) -> u64 {
    if now_ns.saturating_sub(since) >= after {
        now_ns
    } else {
        since.saturating_add(after)
    }
}
