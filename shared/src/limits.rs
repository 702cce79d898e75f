//! Compile-time maxima that size every preallocated structure of rzab. Live knobs move within
//! these bounds; nothing is resized after start. Invariants between them are checked at compile
//! time so that a change to one constant cannot silently break another.

/// Most nodes a cluster may have (leader included).
pub const MAX_NODES: usize = 16;
/// Most worker threads per node.
pub const MAX_WORKERS: usize = 32;
/// Slots for knob values in the control block (more than there are knobs, to grow without a
/// layout change).
pub const MAX_KNOBS: usize = 32;
/// Slots for counters per worker in the control block.
pub const MAX_COUNTERS: usize = 96;
/// Linear sub-buckets per power of two in a latency histogram, as a power of two: 2^7 = 128, so
/// a bucket is at most 1/128 (0.78%) of the values it holds wide, HdrHistogram's layout for 2
/// significant digits (see `counters::Histogram`).
pub const HISTOGRAM_SUB_BUCKET_BITS: u32 = 7;
/// Values from `2^HISTOGRAM_RANGE_BITS` ns (about 68.7 s) up share one overflow bucket.
pub const HISTOGRAM_RANGE_BITS: u32 = 36;
/// Buckets of a latency histogram: values below `2^HISTOGRAM_SUB_BUCKET_BITS` exactly, then
/// `2^HISTOGRAM_SUB_BUCKET_BITS` linear buckets for each power of two up to the range, then
/// the overflow bucket.
pub const HISTOGRAM_BUCKETS: usize = ((HISTOGRAM_RANGE_BITS - HISTOGRAM_SUB_BUCKET_BITS + 1)
    << HISTOGRAM_SUB_BUCKET_BITS) as usize
    + 1;
/// Bytes of an encoded endpoint address.
pub const ENDPOINT_BYTES: usize = 64;
/// Bytes of the cluster name stored in the control block header.
pub const CLUSTER_NAME_BYTES: usize = 32;

/// Largest number of prepares a single PREPARE message may carry.
pub const MAX_PREPARES_PER_MSG: usize = 16;
/// Largest number of client writes a single forwarded WRITE message may carry.
pub const MAX_WRITES_PER_MSG: usize = 16;
/// Largest number of writes one ACK or COMMIT range may cover.
pub const MAX_RANGE_PER_MSG: usize = 4096;
/// Longest chain of send requests posted with one doorbell.
pub const MAX_DOORBELL_BATCH: usize = 32;
/// Most emulated client sessions per worker.
pub const MAX_SESSIONS_PER_WORKER: usize = 256;
/// Fewest prepares a pipeline's window may hold: two full PREPARE messages, so that the leader
/// can fill one while the other is acknowledged.
pub const MIN_WINDOW: usize = 2 * MAX_PREPARES_PER_MSG;
/// Most prepares a pipeline's window may hold. The leader keeps several windows of prepares for
/// retransmission, so this bounds the largest ring a node allocates (a few GiB at the largest
/// value size, which the start-up memory check weighs against the machine).
pub const MAX_WINDOW: usize = 1 << 20;
/// Most PREPARE messages the leader may have outstanding towards one follower (the top of the
/// `prepare_credits` knob): receive rings are sized for it, so the knob can never outgrow them.
pub const MAX_PREPARE_CREDITS: usize = 64;
/// Most forwarded WRITE messages a follower may have outstanding (the top of `write_credits`).
pub const MAX_WRITE_CREDITS: usize = 64;
/// Most COMMIT messages the leader may have outstanding per follower (the top of
/// `commit_credits`).
pub const MAX_COMMIT_CREDITS: usize = 512;

const _: () = assert!(MAX_NODES <= 64, "multicast membership is a 64-bit mask");
const _: () = assert!(MAX_WORKERS * MAX_NODES <= 1024);
const _: () = assert!(ENDPOINT_BYTES % 8 == 0);
const _: () = assert!(CLUSTER_NAME_BYTES % 8 == 0);
const _: () = assert!(MIN_WINDOW.is_power_of_two() && MAX_WINDOW.is_power_of_two());
const _: () = assert!(MIN_WINDOW <= MAX_WINDOW);
const _: () = assert!(HISTOGRAM_SUB_BUCKET_BITS >= 1 && HISTOGRAM_RANGE_BITS < 64);
const _: () = assert!(HISTOGRAM_SUB_BUCKET_BITS < HISTOGRAM_RANGE_BITS);
