//! The replicated key-value store: a MICA-style table (a bucket index with tags over fixed-size
//! entries) that every worker thread of a node reads locally and lock-free, and into which
//! committed writes are applied in zxid order.
//!
//! What it may touch: only memory it maps itself, once, in [`Store::new`] ([`region`] makes the
//! only system calls, at construction and drop). After construction nothing allocates, locks or
//! makes a system call: reads are lock-free under a per-entry sequence lock ([`seqlock`]), writes
//! take the entry's sequence lock for the few stores they make.
//!
//! Layout (see [`table`] for the details):
//! - **Keys** are `u64` ids `0..keys`, all inserted at construction with a zero-filled value and
//!   zxid 0. The 8-byte key stored in an entry is a bijective 64-bit hash of the id (as the
//!   original stored a hash of the key id), so the stored key identifies the id exactly.
//! - **Index**: `buckets` (a power of two, at least `keys / 4`) cache-line buckets of 8 slots;
//!   a slot holds a 16-bit tag (the hash's top bits) and the entry number. The bucket is chosen by
//!   the hash's low bits; a full bucket overflows into the next one (linear probing), and a lookup
//!   stops at the first bucket with a free slot. The index never changes after construction.
//! - **Entries**: one array of fixed-size, cache-line aligned entries: the seqlock version, the
//!   stored key, the zxid of the write that produced the value, then the value, padded to a
//!   multiple of 64 bytes (64 bytes for the default 32-byte values).
//! - **Batches**: [`Store::read_batch`] looks keys up in groups of [`BATCH_MAX`], prefetching
//!   every bucket of the group, then every entry, before reading any of them, as MICA does.
//!
//! Sharing: a [`Store`] is `Send + Sync` and is shared through an `Arc` by the workers. Reads
//! may run on any number of threads at once. Writes must be applied one at a time per entry (the
//! pipeline applies commits in one total zxid order, from whichever worker applies them); the
//! seqlock's writer side needs no other synchronization between successive writers.

pub mod region;
pub mod seqlock;
pub mod table;

#[cfg(test)]
mod tests;

pub use region::PageBacking;
pub use table::{Store, StoreLayout, StoreSize};

/// The largest value a store can be configured for, in bytes (the largest transaction
/// maximum, `--max-txn-bytes`).
pub const MAX_VALUE_SIZE: usize = 64 << 20;
/// Default number of keys, as the original (1M keys inserted at start).
pub const DEFAULT_KEYS: u64 = 1_000_000;
/// Default value size in bytes, as the original.
pub const DEFAULT_VALUE_SIZE: usize = 32;
/// Keys looked up together by [`Store::read_batch`]: every bucket of a group is prefetched, then
/// every entry, before the first is read (MICA's batch size).
pub const BATCH_MAX: usize = 16;
/// The most keys a store can hold (the index slot keeps the entry number in 48 bits).
pub const MAX_KEYS: u64 = (1 << 48) - 2;

const _: () = assert!(MAX_VALUE_SIZE % 8 == 0 && MAX_VALUE_SIZE >= 1024);
const _: () = assert!(DEFAULT_VALUE_SIZE <= MAX_VALUE_SIZE && DEFAULT_VALUE_SIZE % 8 == 0);
const _: () = assert!(BATCH_MAX > 0);

/// How to build a [`Store`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Keys `0..keys` are inserted at construction (at least 1, at most [`MAX_KEYS`]).
    pub keys: u64,
    /// Bytes per value, `1..=MAX_VALUE_SIZE`; rounded up to a multiple of 8.
    pub value_size: usize,
    /// Try explicit huge pages, then transparent huge pages; [`Store::layout`] reports which.
    pub hugepages: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            keys: DEFAULT_KEYS,
            value_size: DEFAULT_VALUE_SIZE,
            hugepages: true,
        }
    }
}

/// Why building or using a [`Store`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration is out of range.
    #[error("invalid store configuration: {0}")]
    InvalidConfig(&'static str),
    /// The kernel refused the memory.
    #[error("cannot map {bytes} bytes for the store: {source}")]
    Alloc {
        /// Bytes asked for.
        bytes: usize,
        /// What `mmap` said.
        source: std::io::Error,
    },
    /// The key was not inserted at construction (the store never inserts afterwards).
    #[error("unknown key {0}")]
    UnknownKey(u64),
    /// The value is longer than the store's value size.
    #[error("value of {len} bytes exceeds the store's value size of {max} bytes")]
    ValueTooLarge {
        /// Bytes given.
        len: usize,
        /// The store's (rounded) value size.
        max: usize,
    },
    /// The output buffers of a batch are too short for its keys.
    #[error(
        "batch of {keys} keys needs {needed_out} output bytes and {keys} result slots, got {out} and {results}"
    )]
    BatchBuffers {
        /// Keys in the batch.
        keys: usize,
        /// Output bytes needed (`keys * value_size`).
        needed_out: usize,
        /// Output bytes given.
        out: usize,
        /// Result slots given.
        results: usize,
    },
}
