//! A node's replica of the key-value store, the benchmark's [`StateMachine`]: the store plus
//! the node-wide apply order. Its transaction is "set key K to V": K as 8 little-endian bytes,
//! then V ([`kv_txn_len`] bytes in all). Every worker of a node applies committed writes
//! through it; a write is applied only when its zxid is the next one, so the
//! node applies one total order whichever worker holds which write. It also keeps an
//! order-sensitive digest of everything applied, so replicas can be compared cheaply (a node
//! that caught up by snapshot has applied only a suffix: compare its store digest instead).
//!
//! Touches only the store and its own atomics.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{Store, StoreConfig, StoreError};
use crate::zab::{StateMachine, Txn, ZXID_START, zxid_follows};

/// The store and apply order of one node.
#[derive(Debug)]
pub struct NodeReplica {
    store: Store,
    applied: AtomicU64,
    digest: AtomicU64,
}

/// Bytes of the transaction that sets a key to a `value_size`-byte value.
pub const fn kv_txn_len(value_size: usize) -> usize {
    KEY_BYTES + value_size
}

/// The key's bytes at the start of a transaction.
pub const KEY_BYTES: usize = 8;

/// Writes the transaction "set `key` to `value`" into `out` (at least [`kv_txn_len`] long).
pub fn encode_kv_txn(out: &mut [u8], key: u64, value: &[u8]) {
    out[..KEY_BYTES].copy_from_slice(&key.to_le_bytes());
    out[KEY_BYTES..KEY_BYTES + value.len()].copy_from_slice(value);
}

/// The key a transaction sets.
pub fn kv_txn_key(txn: Txn<'_>) -> u64 {
    txn.u64_at(0)
}

const PRIME: u64 = 0x0000_0100_0000_01b3;

/// Values up to this long enter the order digest whole; longer ones by their length and their
/// first and last 8 bytes (the write id the workload puts at both ends), so that a megabyte
/// apply does not pay a pass over the value. The store digest ([`Store::digest`], compared
/// at the end of a run) still covers every byte of every value.
const DIGEST_WHOLE_VALUE: usize = 4096;

/// One step of the digest: an FNV-style fold of zxid, key, the value's length and a CRC32C
/// of the value (of its ends, for a long one).
fn fold(mut digest: u64, zxid: u64, key: u64, value: Txn<'_>) -> u64 {
    let crc = if value.len() <= DIGEST_WHOLE_VALUE {
        let [head, tail] = value.parts();
        crc32c::crc32c_append(crc32c::crc32c(head), tail)
    } else {
        let ends = (value.u64_at(0), value.u64_at(value.len() - 8));
        crc32c::crc32c_append(crc32c::crc32c(&ends.0.to_le_bytes()), &ends.1.to_le_bytes())
    };
    for word in [zxid, key, value.len() as u64, u64::from(crc)] {
        digest = (digest ^ word).wrapping_mul(PRIME);
    }
    digest
}

impl NodeReplica {
    pub fn new(config: &StoreConfig) -> Result<Self, StoreError> {
        Ok(NodeReplica {
            store: Store::new(config)?,
            applied: AtomicU64::new(ZXID_START),
            digest: AtomicU64::new(0xcbf2_9ce4_8422_2325),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The last zxid applied on this node.
    pub fn applied_zxid(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Digest of the applied sequence (zxid, key, value), in order.
    pub fn digest(&self) -> u64 {
        // Read after `applied` so a caller that saw a zxid sees at least its digest.
        let _ = self.applied.load(Ordering::Acquire);
        self.digest.load(Ordering::Relaxed)
    }
}

impl StateMachine for NodeReplica {
    fn try_apply(&self, zxid: u64, txn: Txn<'_>) -> bool {
        if !zxid_follows(self.applied.load(Ordering::Acquire), zxid) {
            return false;
        }
        let key = kv_txn_key(txn);
        let value = txn.skip(KEY_BYTES);
        // Only the holder of the next zxid gets here, so applies come one at a time; snapshot
        // installs may run at once on a catching-up node, so the newer zxid wins per key. A
        // write to a key outside the store, or a transaction too short to name a key, would
        // only leave the store unchanged.
        let _ = self.store.write_parts_if_newer(key, value.parts(), zxid);
        let digest = fold(self.digest.load(Ordering::Relaxed), zxid, key, value);
        self.digest.store(digest, Ordering::Relaxed);
        self.applied.store(zxid, Ordering::Release);
        true
    }

    fn applied_zxid(&self) -> u64 {
        NodeReplica::applied_zxid(self)
    }

    fn read_for_snapshot(&self, key: u64, out: &mut [u8]) -> Option<u64> {
        self.store.read(key, out)
    }

    fn install(&self, key: u64, zxid: u64, value: &[u8]) {
        // A key the store does not hold (a foreign snapshot) changes nothing.
        let _ = self.store.write_if_newer(key, value, zxid);
    }

    fn set_base(&self, zxid: u64) {
        // Never back: a node synchronized with a new leader may have applied past that
        // leader's snapshot point (what it applied is in the leader's history too).
        self.applied.fetch_max(zxid, Ordering::AcqRel);
    }
}
