//! Test doubles the unit tests of the pipeline state machines share: outboxes that record
//! what is sent or have no buffer to give, completions that are ignored, and the small
//! pipeline configuration and replica most of those tests run on. Built for tests only.

use super::wire::{self, Kind};
use super::{Completions, LEADER_EPOCH, Outbox, PipelineConfig, Target};
use crate::replica::NodeReplica;
use crate::store::StoreConfig;

/// An outbox with no send buffer to give, as when a chain is full.
pub(crate) struct FullOutbox;

impl Outbox for FullOutbox {
    fn buffer(&mut self) -> Option<&mut [u8]> {
        None
    }
    fn send(&mut self, _: Target, _: Kind, _: usize, _: u64) {
        panic!("nothing can be sent without a buffer")
    }
    fn resend(&mut self, _: Target, _: Kind, _: usize) {
        panic!("nothing can be sent without a buffer")
    }
}

/// An outbox that accepts everything into one buffer and records the kinds sent.
pub(crate) struct Recording(pub Vec<u8>, pub Vec<Kind>);

impl Recording {
    pub(crate) fn new(mtu: usize) -> Self {
        Recording(vec![0; mtu], Vec::new())
    }
}

impl Outbox for Recording {
    fn buffer(&mut self) -> Option<&mut [u8]> {
        Some(&mut self.0)
    }
    fn send(&mut self, _: Target, kind: Kind, _: usize, _: u64) {
        self.1.push(kind);
    }
    fn resend(&mut self, _: Target, kind: Kind, _: usize) {
        self.1.push(kind);
    }
}

/// Completions nobody waits for.
pub(crate) struct NoCompletions;

impl Completions for NoCompletions {
    fn write_applied(&mut self, _: u16, _: u64, _: u64) {}
}

/// Pipeline 0 of node `node` of 3, with 24-byte transactions, 16-byte items and keys, a
/// window of 64, `sessions` sessions and process instance `instance`.
pub(crate) fn small_config(node: u8, sessions: usize, instance: u64) -> PipelineConfig {
    PipelineConfig {
        node,
        nodes: 3,
        pipeline: 0,
        pipelines: 1,
        max_txn_len: 24,
        slot_len: 24,
        item_len: 16,
        cluster_tag: 1,
        run: 2,
        epoch: LEADER_EPOCH,
        integrity: wire::Integrity::Crc32c,
        sessions,
        window: 64,
        retained: 128,
        mtu: 1024,
        keys: 16,
        instance,
        fingerprint: 0,
    }
}

/// A replica of 16 keys of 16-byte values, as [`small_config`] names.
pub(crate) fn small_replica() -> NodeReplica {
    match NodeReplica::new(&StoreConfig {
        keys: 16,
        value_size: 16,
        hugepages: false,
    }) {
        Ok(replica) => replica,
        Err(error) => panic!("a 16-key store: {error}"),
    }
}
