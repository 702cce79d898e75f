//! The table itself: construction and population, single and batched lookups, reads under the
//! entry seqlock, writes at commit, and the replica digest.
//!
//! It touches only the two [`Region`]s it maps in [`Store::new`] and buffers its callers lend it;
//! after construction it allocates nothing, takes no lock and makes no system call.
//!
//! Index slot (one `u64`, 8 per 64-byte bucket): `tag << 48 | (entry + 1)`, where `tag` is the top
//! 16 bits of the key hash and 0 marks a free slot. Slots of a bucket fill from the front and are
//! never freed, so a scan stops at the first free slot, and a probe stops at the first bucket that
//! has one.
//!
//! Entry (`stride` words, a multiple of 8 so that entries are cache-line aligned):
//! `[version | stored key | zxid | value words ... | padding]`. Values are kept as little-endian
//! words, zero-padded to the store's value size.

#![allow(
    clippy::cast_possible_truncation,
    reason = "the u64 -> usize casts are of bucket and entry numbers, which are below the lengths of \
              arrays mapped in memory and so fit in usize (checked once in Store::new)"
)]

use core::sync::atomic::{AtomicU64, Ordering};

use super::region::{PageBacking, Region};
use super::{BATCH_MAX, MAX_KEYS, MAX_VALUE_SIZE, StoreConfig, StoreError, seqlock};

/// Slots per bucket; a bucket is one 64-byte cache line.
const SLOTS: usize = 8;
/// Words in a cache line.
const LINE_WORDS: usize = 8;
/// Target average of keys per bucket: the index is sized so buckets are at most half full on
/// average (load factor <= 0.5), which keeps overflow into the next bucket rare.
const KEYS_PER_BUCKET: u64 = 4;
/// Entry word holding the seqlock version.
const VERSION: usize = 0;
/// Entry word holding the stored 8-byte key (the hash of the key id).
const KEY: usize = 1;
/// Entry word holding the zxid of the write that produced the current value.
const ZXID: usize = 2;
/// Entry word holding how many value words may be nonzero (those past it are zero): a
/// shorter value then zeroes only what the last longer one left, not the whole item, so a
/// 32-byte write to a store of 1 MiB items costs a 32-byte copy.
const DIRTY: usize = 3;
/// First value word of an entry.
const VALUE: usize = 4;
/// Bits of a slot that hold the entry number (plus one).
const ENTRY_BITS: u32 = 48;
const ENTRY_MASK: u64 = (1 << ENTRY_BITS) - 1;
/// Value words at most.
const _: () = assert!(SLOTS * 8 == 64 && LINE_WORDS * 8 == 64);
const _: () = assert!(
    VALUE + 4 <= LINE_WORDS,
    "a 32-byte value must fit a 64-byte entry"
);
const _: () = assert!(
    MAX_KEYS < ENTRY_MASK,
    "entry numbers plus one must fit a slot"
);

/// The murmur3 64-bit finalizer: a bijection on `u64`, so distinct key ids get distinct stored
/// keys, with well-mixed low bits (bucket) and high bits (tag).
#[inline]
const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// The 8-byte key stored for key id `id`.
#[inline]
const fn key_hash(id: u64) -> u64 {
    mix64(id)
}

#[inline]
const fn tag_of(hash: u64) -> u64 {
    hash >> ENTRY_BITS
}

/// A hint to bring the cache line at `p` into L1; never faults, no-op off x86_64.
#[inline(always)]
fn prefetch(p: &AtomicU64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` only needs SSE, which every x86_64 CPU has; a prefetch is a hint
    // that never faults and changes no memory, and `p` is a valid reference anyway.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            core::ptr::from_ref(p).cast::<i8>(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// What the index alone says about a key's entry (first step of a batched lookup).
#[derive(Clone, Copy, Debug)]
enum Candidate {
    /// The first entry of the home bucket with the key's tag (its stored key still to check).
    Entry(usize),
    /// The home bucket has a free slot and no matching tag: the key is not in the store.
    Absent,
    /// The home bucket is full with no matching tag: the key may have overflowed.
    Overflow,
}

/// Sizes and backing of a built store, for logs and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLayout {
    /// Keys inserted (ids `0..keys`).
    pub keys: u64,
    /// Buckets in the index (a power of two).
    pub buckets: usize,
    /// The most buckets past its home bucket that any key had to go (0 without overflow).
    pub max_probe: usize,
    /// Value size in bytes (the configured size rounded up to a multiple of 8).
    pub value_size: usize,
    /// Bytes per entry (a multiple of 64).
    pub entry_bytes: usize,
    /// Bytes of the bucket index.
    pub index_bytes: usize,
    /// Bytes of the entry array.
    pub entries_bytes: usize,
    /// How the index is backed.
    pub index_backing: PageBacking,
    /// How the entry array is backed.
    pub entries_backing: PageBacking,
}

/// The sizes of a store's regions, from its configuration alone ([`Store::size_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreSize {
    /// Buckets in the index (a power of two).
    pub buckets: usize,
    /// Words per value (the value size rounded up to a multiple of 8 bytes, in words).
    pub value_words: usize,
    /// Words per entry (a multiple of a cache line).
    pub stride: usize,
    /// Bytes of the bucket index.
    pub index_bytes: usize,
    /// Bytes of the entry array.
    pub entries_bytes: usize,
}

impl StoreSize {
    /// Bytes of both regions.
    pub fn total_bytes(&self) -> u64 {
        (self.index_bytes as u64).saturating_add(self.entries_bytes as u64)
    }
}

/// The MICA-style table; see the [module docs](super) for layout and sharing rules.
pub struct Store {
    index: Region,
    entries: Region,
    keys: u64,
    buckets: usize,
    bucket_mask: u64,
    max_probe: usize,
    value_size: usize,
    value_words: usize,
    stride: usize,
}

impl core::fmt::Debug for Store {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Store")
            .field("layout", &self.layout())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Maps the index and the entries once and inserts keys `0..config.keys`, each with a
    /// zero-filled value and zxid 0.
    pub fn new(config: &StoreConfig) -> Result<Self, StoreError> {
        let size = Self::size_for(config)?;
        let index = Region::new(size.index_bytes, config.hugepages)?;
        let entries = Region::new(size.entries_bytes, config.hugepages)?;
        let mut store = Self {
            index,
            entries,
            keys: config.keys,
            buckets: size.buckets,
            bucket_mask: (size.buckets as u64) - 1,
            max_probe: 0,
            value_size: size.value_words * 8,
            value_words: size.value_words,
            stride: size.stride,
        };
        store.populate()?;
        Ok(store)
    }

    /// What a store of `config` would map, computed without mapping anything: [`Store::new`]
    /// sizes its regions with it, and a node weighs it against the machine's memory before it
    /// builds anything (explicit huge pages round each region up to 2 MiB at most).
    pub fn size_for(config: &StoreConfig) -> Result<StoreSize, StoreError> {
        if config.keys == 0 || config.keys > MAX_KEYS {
            return Err(StoreError::InvalidConfig("keys must be in 1..=MAX_KEYS"));
        }
        if config.value_size == 0 || config.value_size > MAX_VALUE_SIZE {
            return Err(StoreError::InvalidConfig(
                "value_size must be in 1..=MAX_VALUE_SIZE",
            ));
        }
        let value_words = config.value_size.div_ceil(8);
        let stride = (VALUE + value_words).next_multiple_of(LINE_WORDS);
        let too_big = || StoreError::InvalidConfig("the store does not fit the address space");
        let n_entries = usize::try_from(config.keys).map_err(|_| too_big())?;
        let buckets = usize::try_from(config.keys.div_ceil(KEYS_PER_BUCKET).next_power_of_two())
            .map_err(|_| too_big())?;
        Ok(StoreSize {
            buckets,
            value_words,
            stride,
            index_bytes: buckets.checked_mul(SLOTS * 8).ok_or_else(too_big)?,
            entries_bytes: n_entries.checked_mul(stride * 8).ok_or_else(too_big)?,
        })
    }

    /// Inserts every key id with entry number = id. The mapping is zero-filled, so the version,
    /// zxid and value words already hold their initial zeros; only the stored key is written.
    fn populate(&mut self) -> Result<(), StoreError> {
        let index = self.index.words();
        let entries = self.entries.words();
        let mut max_probe = 0;
        for id in 0..self.keys {
            let hash = key_hash(id);
            let entry = id as usize;
            entries[entry * self.stride + KEY].store(hash, Ordering::Relaxed);
            let slot_value = (tag_of(hash) << ENTRY_BITS) | (id + 1);
            let mut bucket = (hash & self.bucket_mask) as usize;
            let mut probe = 0;
            'probe: loop {
                if probe >= self.buckets {
                    // Unreachable: the index has at least twice as many slots as keys.
                    return Err(StoreError::InvalidConfig("the bucket index is full"));
                }
                for slot in &index[bucket * SLOTS..(bucket + 1) * SLOTS] {
                    if slot.load(Ordering::Relaxed) == 0 {
                        slot.store(slot_value, Ordering::Relaxed);
                        break 'probe;
                    }
                }
                bucket = (bucket + 1) & (self.buckets - 1);
                probe += 1;
            }
            max_probe = max_probe.max(probe);
        }
        self.max_probe = max_probe;
        Ok(())
    }

    /// Sizes and page backing of this store.
    pub fn layout(&self) -> StoreLayout {
        StoreLayout {
            keys: self.keys,
            buckets: self.buckets,
            max_probe: self.max_probe,
            value_size: self.value_size,
            entry_bytes: self.stride * 8,
            index_bytes: self.buckets * SLOTS * 8,
            entries_bytes: self.entries.words().len() * 8,
            index_backing: self.index.backing(),
            entries_backing: self.entries.backing(),
        }
    }

    /// Keys in the store (ids `0..keys()`).
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// Bytes per value: the configured size rounded up to a multiple of 8.
    pub fn value_size(&self) -> usize {
        self.value_size
    }

    /// Copies the value of `key` into `out` (its first `min(out.len(), value_size())` bytes) and
    /// returns the zxid of the write that produced it (0 for the initial value), or `None` for an
    /// unknown key. Lock-free; retries only while a write to this very entry is in progress.
    /// `out` may be empty to ask for the zxid alone.
    pub fn read(&self, key: u64, out: &mut [u8]) -> Option<u64> {
        let hash = key_hash(key);
        let entry = self.locate(hash)?;
        Some(self.read_entry(entry, out))
    }

    /// Sets the value of `key` to `value` (zero-padded to `value_size()`), produced by the write
    /// with `zxid`. Errors, before changing anything, on an unknown key or a value longer than
    /// `value_size()`.
    ///
    /// Writes to one key must not overlap: the pipeline applies them at commit, one at a time, in
    /// zxid order, from whichever worker thread applies them (see [`seqlock`]).
    pub fn write(&self, key: u64, value: &[u8], zxid: u64) -> Result<(), StoreError> {
        if value.len() > self.value_size {
            return Err(StoreError::ValueTooLarge {
                len: value.len(),
                max: self.value_size,
            });
        }
        let entry = self
            .locate(key_hash(key))
            .ok_or(StoreError::UnknownKey(key))?;
        self.write_entry(entry, value, zxid);
        Ok(())
    }

    /// Like [`Store::write`], but leaves the entry alone (and returns false) when it already
    /// holds a write with a zxid of at least `zxid`. Safe to call from several threads at once
    /// for the same key: the check and the write happen under the entry's sequence lock. This
    /// is how a catching-up node merges the leader's snapshot with the writes it applies.
    pub fn write_if_newer(&self, key: u64, value: &[u8], zxid: u64) -> Result<bool, StoreError> {
        if value.len() > self.value_size {
            return Err(StoreError::ValueTooLarge {
                len: value.len(),
                max: self.value_size,
            });
        }
        let entry = self
            .locate(key_hash(key))
            .ok_or(StoreError::UnknownKey(key))?;
        Ok(self.write_entry_if_newer(entry, value, zxid))
    }

    /// [`Store::write_if_newer`] for a value given in pieces (`parts` in order), as a
    /// transaction lies in a ring that wrapped.
    pub fn write_parts_if_newer(
        &self,
        key: u64,
        parts: [&[u8]; 2],
        zxid: u64,
    ) -> Result<bool, StoreError> {
        let len = parts[0].len() + parts[1].len();
        if len > self.value_size {
            return Err(StoreError::ValueTooLarge {
                len,
                max: self.value_size,
            });
        }
        let entry = self
            .locate(key_hash(key))
            .ok_or(StoreError::UnknownKey(key))?;
        let words = self.entry(entry);
        let mut written = false;
        seqlock::write(&words[VERSION], || {
            if words[ZXID].load(Ordering::Relaxed) < zxid {
                self.fill_entry_parts(words, parts, zxid);
                written = true;
            }
        });
        Ok(written)
    }

    /// Hints the CPU to fetch the bucket of `key`, for callers that batch their own lookups
    /// (e.g. the commits of one message, prefetched before they are applied).
    #[inline]
    pub fn prefetch(&self, key: u64) {
        let bucket = (key_hash(key) & self.bucket_mask) as usize;
        prefetch(&self.index.words()[bucket * SLOTS]);
    }

    /// Reads `keys` in groups of [`BATCH_MAX`]: prefetches every bucket of a group, then every
    /// candidate entry, then reads them. The value of `keys[i]` goes to
    /// `out[i * value_size()..(i + 1) * value_size()]` and its zxid to `results[i]` (`None`, and
    /// its part of `out` untouched, for an unknown key). Equivalent to calling [`Store::read`]
    /// for each key.
    pub fn read_batch(
        &self,
        keys: &[u64],
        out: &mut [u8],
        results: &mut [Option<u64>],
    ) -> Result<(), StoreError> {
        let needed_out = keys.len().saturating_mul(self.value_size);
        if out.len() < needed_out || results.len() < keys.len() {
            return Err(StoreError::BatchBuffers {
                keys: keys.len(),
                needed_out,
                out: out.len(),
                results: results.len(),
            });
        }
        let index = self.index.words();
        let entries = self.entries.words();
        let group_out = BATCH_MAX * self.value_size;
        for ((group, outs), results) in keys
            .chunks(BATCH_MAX)
            .zip(out.chunks_mut(group_out))
            .zip(results.chunks_mut(BATCH_MAX))
        {
            let mut hashes = [0u64; BATCH_MAX];
            let mut candidates = [Candidate::Absent; BATCH_MAX];
            for (hash, &key) in hashes.iter_mut().zip(group) {
                *hash = key_hash(key);
                prefetch(&index[((*hash & self.bucket_mask) as usize) * SLOTS]);
            }
            for (candidate, &hash) in candidates.iter_mut().zip(&hashes[..group.len()]) {
                *candidate = self.candidate(hash);
                if let Candidate::Entry(entry) = *candidate {
                    for line in 0..self.stride / LINE_WORDS {
                        prefetch(&entries[entry * self.stride + line * LINE_WORDS]);
                    }
                }
            }
            for (((result, out), candidate), &hash) in results
                .iter_mut()
                .zip(outs.chunks_mut(self.value_size))
                .zip(&candidates[..group.len()])
                .zip(&hashes[..group.len()])
            {
                let entry = match *candidate {
                    Candidate::Entry(entry) if self.entry_key(entry) == hash => Some(entry),
                    // A tag collision, or a full home bucket: the full lookup.
                    Candidate::Entry(_) | Candidate::Overflow => self.locate(hash),
                    Candidate::Absent => None,
                };
                *result = entry.map(|entry| self.read_entry(entry, out));
            }
        }
        Ok(())
    }

    /// A hash of every (stored key, zxid, value) of the store, independent of entry order, to
    /// compare replicas: equal stores give equal digests. Each entry is read consistently, but
    /// the whole is a snapshot only when no write runs meanwhile.
    pub fn digest(&self) -> u64 {
        // Not on any fast path: a buffer the size of one value.
        let mut words = vec![0u64; self.value_words];
        let words = &mut words[..];
        let mut digest = mix64(self.keys ^ 0x5851_f42d_4c95_7f2d);
        for entry in 0..self.keys as usize {
            let (key, zxid) = self.snapshot_words(entry, words);
            let mut h = mix64(key ^ 0x9e37_79b9_7f4a_7c15);
            h = mix64(h ^ zxid).wrapping_add(0x2545_f491_4f6c_dd1d);
            for &word in words.iter() {
                h = mix64(h.rotate_left(23) ^ word).wrapping_add(0x2545_f491_4f6c_dd1d);
            }
            digest = digest.wrapping_add(h);
        }
        digest
    }

    /// The words of entry number `entry`.
    #[inline]
    fn entry(&self, entry: usize) -> &[AtomicU64] {
        &self.entries.words()[entry * self.stride..(entry + 1) * self.stride]
    }

    /// The stored key of entry number `entry` (never changes after construction).
    #[inline]
    fn entry_key(&self, entry: usize) -> u64 {
        self.entries.words()[entry * self.stride + KEY].load(Ordering::Relaxed)
    }

    /// The entry holding `hash`, if any: scans the home bucket and the overflow buckets after it
    /// until a bucket with a free slot.
    fn locate(&self, hash: u64) -> Option<usize> {
        let index = self.index.words();
        let tag = tag_of(hash);
        let mut bucket = (hash & self.bucket_mask) as usize;
        for _ in 0..=self.max_probe {
            for slot in &index[bucket * SLOTS..(bucket + 1) * SLOTS] {
                let slot = slot.load(Ordering::Relaxed);
                if slot == 0 {
                    return None;
                }
                if slot >> ENTRY_BITS == tag {
                    let entry = ((slot & ENTRY_MASK) - 1) as usize;
                    if self.entry_key(entry) == hash {
                        return Some(entry);
                    }
                }
            }
            bucket = (bucket + 1) & (self.buckets - 1);
        }
        None
    }

    /// The first lookup step of a batch, reading the home bucket only (so that the entry can be
    /// prefetched before its stored key is checked).
    fn candidate(&self, hash: u64) -> Candidate {
        let index = self.index.words();
        let tag = tag_of(hash);
        let bucket = (hash & self.bucket_mask) as usize;
        for slot in &index[bucket * SLOTS..(bucket + 1) * SLOTS] {
            let slot = slot.load(Ordering::Relaxed);
            if slot == 0 {
                return Candidate::Absent;
            }
            if slot >> ENTRY_BITS == tag {
                return Candidate::Entry(((slot & ENTRY_MASK) - 1) as usize);
            }
        }
        Candidate::Overflow
    }

    /// Reads entry number `entry` into `out` under its seqlock; returns its zxid.
    #[inline]
    fn read_entry(&self, entry: usize, out: &mut [u8]) -> u64 {
        let words = self.entry(entry);
        let len = out.len().min(self.value_size);
        let out = &mut out[..len];
        seqlock::read(&words[VERSION], || {
            for (word, bytes) in words[VALUE..].iter().zip(out.chunks_mut(8)) {
                let value = word.load(Ordering::Relaxed).to_le_bytes();
                bytes.copy_from_slice(&value[..bytes.len()]);
            }
            words[ZXID].load(Ordering::Relaxed)
        })
    }

    /// Reads entry number `entry` as words under its seqlock; returns (stored key, zxid).
    fn snapshot_words(&self, entry: usize, out: &mut [u64]) -> (u64, u64) {
        let words = self.entry(entry);
        seqlock::read(&words[VERSION], || {
            for (word, value) in words[VALUE..].iter().zip(out.iter_mut()) {
                *value = word.load(Ordering::Relaxed);
            }
            (
                words[KEY].load(Ordering::Relaxed),
                words[ZXID].load(Ordering::Relaxed),
            )
        })
    }

    /// Writes `value` (at most `value_size` bytes, zero-padded) and `zxid` into entry number
    /// `entry` under its seqlock.
    #[inline]
    fn write_entry(&self, entry: usize, value: &[u8], zxid: u64) {
        let words = self.entry(entry);
        seqlock::write(&words[VERSION], || self.fill_entry(words, value, zxid));
    }

    fn write_entry_if_newer(&self, entry: usize, value: &[u8], zxid: u64) -> bool {
        let words = self.entry(entry);
        let mut written = false;
        seqlock::write(&words[VERSION], || {
            if words[ZXID].load(Ordering::Relaxed) < zxid {
                self.fill_entry(words, value, zxid);
                written = true;
            }
        });
        written
    }

    fn fill_entry(&self, words: &[AtomicU64], value: &[u8], zxid: u64) {
        self.fill_entry_parts(words, [value, &[]], zxid);
    }

    /// Fills the value from `parts` in order (zero-padded), 8 bytes at a time; a part whose
    /// length is not a multiple of 8 carries its tail into the next word.
    fn fill_entry_parts(&self, words: &[AtomicU64], parts: [&[u8]; 2], zxid: u64) {
        let dirty = usize::try_from(words[DIRTY].load(Ordering::Relaxed))
            .unwrap_or(usize::MAX)
            .min(self.value_words);
        let written = (parts[0].len() + parts[1].len())
            .div_ceil(8)
            .min(self.value_words);
        let mut targets = words[VALUE..VALUE + dirty.max(written)].iter();
        let mut carry = [0u8; 8];
        let mut carried = 0;
        for part in parts {
            let mut bytes = part;
            if carried > 0 {
                let take = (8 - carried).min(bytes.len());
                carry[carried..carried + take].copy_from_slice(&bytes[..take]);
                carried += take;
                bytes = &bytes[take..];
                if carried == 8 {
                    if let Some(word) = targets.next() {
                        word.store(u64::from_le_bytes(carry), Ordering::Relaxed);
                    }
                    carry = [0; 8];
                    carried = 0;
                }
            }
            let mut chunks = bytes.chunks_exact(8);
            for (chunk, word) in (&mut chunks).zip(&mut targets) {
                let mut whole = [0u8; 8];
                whole.copy_from_slice(chunk);
                word.store(u64::from_le_bytes(whole), Ordering::Relaxed);
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                carry[carried..carried + rest.len()].copy_from_slice(rest);
                carried += rest.len();
            }
        }
        if carried > 0 {
            if let Some(word) = targets.next() {
                word.store(u64::from_le_bytes(carry), Ordering::Relaxed);
            }
        }
        for word in targets {
            word.store(0, Ordering::Relaxed);
        }
        words[DIRTY].store(written as u64, Ordering::Relaxed);
        words[ZXID].store(zxid, Ordering::Relaxed);
    }
}
