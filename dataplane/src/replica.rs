//! A node's replica: the store plus the node-wide apply order. Every worker of a node applies
//! committed writes through it; a write is applied only when its zxid is the next one, so the
//! node applies one total order whichever worker holds which write. It also keeps an
//! order-sensitive digest of everything applied, so replicas can be compared cheaply (a node
//! that caught up by snapshot has applied only a suffix: compare its store digest instead).
//!
//! Touches only the store and its own atomics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::store::{Store, StoreConfig, StoreError};
use crate::zab::{Replica, ZXID_START};

/// The store and apply order of one node.
#[derive(Debug)]
pub struct NodeReplica {
    store: Store,
    applied: AtomicU64,
    digest: AtomicU64,
    base_set: AtomicBool,
}

/// One step of the digest: an FNV-style fold of zxid, key and value.
fn fold(mut digest: u64, zxid: u64, key: u64, value: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    for word in [zxid, key] {
        digest = (digest ^ word).wrapping_mul(PRIME);
    }
    for byte in value {
        digest = (digest ^ u64::from(*byte)).wrapping_mul(PRIME);
    }
    digest
}

impl NodeReplica {
    pub fn new(config: &StoreConfig) -> Result<Self, StoreError> {
        Ok(NodeReplica {
            store: Store::new(config)?,
            applied: AtomicU64::new(ZXID_START),
            digest: AtomicU64::new(0xcbf2_9ce4_8422_2325),
            base_set: AtomicBool::new(false),
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

impl Replica for NodeReplica {
    fn try_apply(&self, zxid: u64, key: u64, value: &[u8]) -> bool {
        if self.applied.load(Ordering::Acquire) != zxid.wrapping_sub(1) {
            return false;
        }
        // Only the holder of the next zxid gets here, so applies come one at a time; snapshot
        // installs may run at once on a catching-up node, so the newer zxid wins per key. A
        // write to a key outside the store would only leave the store unchanged.
        let _ = self.store.write_if_newer(key, value, zxid);
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
        if !self.base_set.swap(true, Ordering::AcqRel) {
            self.applied.store(zxid, Ordering::Release);
        }
    }
}
