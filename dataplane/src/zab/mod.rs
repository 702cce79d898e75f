//! ZAB without recovery, as a pure state machine per pipeline.
//!
//! Worker `t` of every node forms pipeline `t`: the leader's worker `t` orders the writes of
//! the followers' workers `t` and of its own sessions. Each pipeline numbers its prepares with
//! a contiguous 64-bit sequence (`pseq`), used by ACK and COMMIT ranges; the leader also gives
//! every write a zxid from one counter shared by all of its workers (one fetch-add per batch),
//! and every node applies writes in zxid order across all its workers through a [`Replica`].
//!
//! The state machines do no I/O: they are handed decoded messages, the time, buffers to write
//! outgoing messages into (an [`Outbox`]) and the replica to apply to; the worker loop and the
//! deterministic simulator drive them alike. Nothing here allocates after construction.
//!
//! Flow control (credits) keeps every receiver within its posted receives. Every follower
//! message carries three cumulative counters for the leader: PREPARE messages consumed, COMMIT
//! messages consumed, and the pseq below which it has applied (which bounds the leader's
//! window). Leader CREDIT messages carry WRITE messages consumed for one follower. A follower
//! sends at most one ACK per PREPARE message it consumed, so ACKs never outnumber prepares.

pub mod follower;
pub mod leader;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};

use rzab_shared::limits::{
    MAX_DOORBELL_BATCH, MAX_NODES, MAX_PREPARES_PER_MSG, MAX_WRITES_PER_MSG,
};

pub use wire::Kind;

/// zxid of the state before any write: epoch 1, counter 0. A counter that overflows its low
/// 32 bits carries into the epoch (as ZooKeeper forces a new epoch on rollover), so the 64-bit
/// zxid keeps increasing and never wraps in any real run.
pub const ZXID_START: u64 = 1 << 32;

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
}

/// The node-wide, zxid-ordered application of committed writes.
pub trait Replica {
    /// Applies the write if `zxid` is the next in the node's total order; returns false (and
    /// changes nothing) if an earlier zxid has not been applied yet.
    fn try_apply(&self, zxid: u64, key: u64, value: &[u8]) -> bool;
}

/// Reports writes of local origin that became applied here.
pub trait Completions {
    fn write_applied(&mut self, session: u16, session_seq: u64, zxid: u64);
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
        }
    }
}

/// Fixed facts about one pipeline.
#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    pub node: u8,
    pub nodes: u8,
    pub pipeline: u8,
    pub pipelines: u8,
    pub value_len: usize,
    pub cluster_tag: u32,
    pub sessions: usize,
    /// Prepares that may be outstanding (prepared, not yet applied everywhere); a power of two.
    pub window: usize,
    pub mtu: usize,
}

impl PipelineConfig {
    pub fn followers(&self) -> usize {
        usize::from(self.nodes) - 1
    }

    /// Acks needed besides the leader's own.
    pub fn quorum_followers(&self) -> usize {
        usize::from(self.nodes) / 2
    }

    /// Entries one PREPARE can carry within the MTU.
    pub fn prepares_fitting(&self) -> usize {
        ((self.mtu - wire::HEADER_BYTES - wire::PREPARE_PREFIX)
            / (wire::ENTRY_FIXED + self.value_len))
            .min(MAX_PREPARES_PER_MSG)
    }

    /// Entries one WRITE can carry within the MTU.
    pub fn writes_fitting(&self) -> usize {
        ((self.mtu - wire::HEADER_BYTES) / (wire::ENTRY_FIXED + self.value_len))
            .min(MAX_WRITES_PER_MSG)
    }

    /// Checks that the configuration can work at all.
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes == 0 || usize::from(self.nodes) > MAX_NODES || self.node >= self.nodes {
            return Err(format!(
                "node {} of {}: need 1..={MAX_NODES} nodes",
                self.node, self.nodes
            ));
        }
        if !self.window.is_power_of_two() || self.window < 2 * MAX_PREPARES_PER_MSG {
            return Err(format!(
                "window {} must be a power of two of at least 32",
                self.window
            ));
        }
        if self.mtu < wire::prepare_len(1, self.value_len) {
            return Err(format!(
                "value size {} does not fit the transport MTU of {} bytes (one prepare needs {})",
                self.value_len,
                self.mtu,
                wire::prepare_len(1, self.value_len)
            ));
        }
        if self.sessions > usize::from(u16::MAX) {
            return Err("too many sessions".into());
        }
        Ok(())
    }

    fn header(&self, kind: Kind, count: usize, credits: [u64; 3]) -> wire::Header {
        wire::Header {
            kind,
            from_node: self.node,
            pipeline: self.pipeline,
            count: u16::try_from(count).unwrap_or(u16::MAX),
            cluster_tag: self.cluster_tag,
            value_len: u16::try_from(self.value_len).unwrap_or(u16::MAX),
            credits,
        }
    }
}

/// Metadata of one write held in a ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryMeta {
    pub zxid: u64,
    pub key: u64,
    pub session_seq: u64,
    pub session: u16,
    pub origin_node: u8,
    pub present: bool,
    /// Leader's incoming ring: the last write of a follower's WRITE message.
    pub ends_message: bool,
}

impl EntryMeta {
    /// A write of one of this node's sessions, not yet ordered.
    pub fn local_write(node: u8, session: u16, session_seq: u64, key: u64) -> Self {
        EntryMeta {
            zxid: 0,
            key,
            session_seq,
            session,
            origin_node: node,
            present: true,
            ends_message: false,
        }
    }
}

/// A fixed ring of writes (metadata plus values), indexed by a 64-bit position.
#[derive(Debug)]
pub struct EntryRing {
    metas: Vec<EntryMeta>,
    values: Vec<u8>,
    value_len: usize,
    mask: usize,
}

impl EntryRing {
    pub fn new(capacity: usize, value_len: usize) -> Self {
        let capacity = capacity.next_power_of_two();
        EntryRing {
            metas: vec![EntryMeta::default(); capacity],
            values: vec![0; capacity * value_len],
            value_len,
            mask: capacity - 1,
        }
    }

    pub fn capacity(&self) -> usize {
        self.mask + 1
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

    pub fn value(&self, position: u64) -> &[u8] {
        let at = self.index(position) * self.value_len;
        &self.values[at..at + self.value_len]
    }

    /// Stores a write at `position`.
    pub fn put(&mut self, position: u64, meta: EntryMeta, value: &[u8]) {
        let index = self.index(position);
        self.metas[index] = meta;
        let at = index * self.value_len;
        let len = value.len().min(self.value_len);
        self.values[at..at + len].copy_from_slice(&value[..len]);
    }

    /// Encodes the `count` entries from `first` on as wire entries into `out`; returns the
    /// bytes written.
    pub fn encode_entries(&self, first: u64, count: u64, out: &mut [u8]) -> usize {
        let mut len = 0;
        for position in first..first + count {
            let meta = self.meta(position);
            wire::put_entry(
                &mut out[len..],
                meta.origin_node,
                meta.session,
                meta.session_seq,
                meta.key,
                self.value(position),
            );
            len += wire::ENTRY_FIXED + self.value_len;
        }
        len
    }

    /// Copies the entry at `from` in `source` to `to` in this ring, with new metadata.
    pub fn put_from(&mut self, to: u64, meta: EntryMeta, source: &EntryRing, from: u64) {
        let index = self.index(to);
        self.metas[index] = meta;
        let at = index * self.value_len;
        let from_at = source.index(from) * source.value_len;
        self.values[at..at + self.value_len]
            .copy_from_slice(&source.values[from_at..from_at + self.value_len]);
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
