//! Per-worker counters and log-linear latency histograms that live in the control block.
//!
//! Each counter has exactly one writer (its worker), which updates it with a relaxed load and
//! store rather than a read-modify-write; readers (the control plane's exporter, stats lines)
//! load it relaxed and sum over workers. One definition per counter carries its Prometheus
//! family, labels and help text, so the exporter needs no second list.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::limits::{
    HISTOGRAM_BUCKETS, HISTOGRAM_RANGE_BITS, HISTOGRAM_SUB_BUCKET_BITS, MAX_COUNTERS,
};

/// The definition of one counter: the Prometheus family it belongs to and its label values.
#[derive(Clone, Copy, Debug)]
pub struct CounterSpec {
    pub counter: Counter,
    /// Metric family without the `rzab_` prefix.
    pub family: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    pub help: &'static str,
}

macro_rules! counters {
    ($( $variant:ident { $family:literal, [$( $key:literal = $value:literal ),*], $help:literal } )*) => {
        /// Every per-worker counter; the discriminant is its slot in the worker's block.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Counter { $( #[doc = $help] $variant, )* }

        /// All counter definitions, in slot order.
        pub const COUNTERS: &[CounterSpec] = &[
            $( CounterSpec { counter: Counter::$variant, family: $family, labels: &[$(($key, $value)),*], help: $help }, )*
        ];
    };
}

counters! {
    ReadsCompleted { "operations_total", ["kind" = "read"], "Reads completed by emulated clients." }
    WritesCompleted { "operations_total", ["kind" = "write"], "Writes completed (applied locally) for emulated clients." }
    WritesApplied { "writes_applied_total", [], "Committed writes applied to the local store, from any node." }
    SentWriteUnicast { "messages_sent_total", ["type" = "write", "path" = "unicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    SentPrepareUnicast { "messages_sent_total", ["type" = "prepare", "path" = "unicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    SentPrepareMulticast { "messages_sent_total", ["type" = "prepare", "path" = "multicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    SentAckUnicast { "messages_sent_total", ["type" = "ack", "path" = "unicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    SentCommitUnicast { "messages_sent_total", ["type" = "commit", "path" = "unicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    SentCommitMulticast { "messages_sent_total", ["type" = "commit", "path" = "multicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    SentCreditUnicast { "messages_sent_total", ["type" = "credit", "path" = "unicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    SentNackUnicast { "messages_sent_total", ["type" = "nack", "path" = "unicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    SentSnapshotUnicast { "messages_sent_total", ["type" = "snapshot", "path" = "unicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    BytesWriteUnicast { "bytes_sent_total", ["type" = "write", "path" = "unicast"], "Bytes sent, by type and path." }
    BytesPrepareUnicast { "bytes_sent_total", ["type" = "prepare", "path" = "unicast"], "Bytes sent, by type and path." }
    BytesPrepareMulticast { "bytes_sent_total", ["type" = "prepare", "path" = "multicast"], "Bytes sent, by type and path." }
    BytesAckUnicast { "bytes_sent_total", ["type" = "ack", "path" = "unicast"], "Bytes sent, by type and path." }
    BytesCommitUnicast { "bytes_sent_total", ["type" = "commit", "path" = "unicast"], "Bytes sent, by type and path." }
    BytesCommitMulticast { "bytes_sent_total", ["type" = "commit", "path" = "multicast"], "Bytes sent, by type and path." }
    BytesCreditUnicast { "bytes_sent_total", ["type" = "credit", "path" = "unicast"], "Bytes sent, by type and path." }
    BytesNackUnicast { "bytes_sent_total", ["type" = "nack", "path" = "unicast"], "Bytes sent, by type and path." }
    BytesSnapshotUnicast { "bytes_sent_total", ["type" = "snapshot", "path" = "unicast"], "Bytes sent, by type and path." }
    ReceivedWrite { "messages_received_total", ["type" = "write"], "Messages received, by type." }
    ReceivedPrepare { "messages_received_total", ["type" = "prepare"], "Messages received, by type." }
    ReceivedAck { "messages_received_total", ["type" = "ack"], "Messages received, by type." }
    ReceivedCommit { "messages_received_total", ["type" = "commit"], "Messages received, by type." }
    ReceivedCredit { "messages_received_total", ["type" = "credit"], "Messages received, by type." }
    ReceivedNack { "messages_received_total", ["type" = "nack"], "Messages received, by type." }
    ReceivedSnapshot { "messages_received_total", ["type" = "snapshot"], "Messages received, by type." }
    BytesReceived { "bytes_received_total", [], "Bytes received in valid messages." }
    BatchEntriesWrite { "batch_entries_total", ["type" = "write"], "Entries carried by messages of a type (sum; divide by batch_messages_total for the average)." }
    BatchEntriesPrepare { "batch_entries_total", ["type" = "prepare"], "Entries carried by messages of a type (sum; divide by batch_messages_total for the average)." }
    BatchEntriesAck { "batch_entries_total", ["type" = "ack"], "Entries carried by messages of a type (sum; divide by batch_messages_total for the average)." }
    BatchEntriesCommit { "batch_entries_total", ["type" = "commit"], "Entries carried by messages of a type (sum; divide by batch_messages_total for the average)." }
    BatchMessagesWrite { "batch_messages_total", ["type" = "write"], "Logical messages of a type (a broadcast counts once)." }
    BatchMessagesPrepare { "batch_messages_total", ["type" = "prepare"], "Logical messages of a type (a broadcast counts once)." }
    BatchMessagesAck { "batch_messages_total", ["type" = "ack"], "Logical messages of a type (a broadcast counts once)." }
    BatchMessagesCommit { "batch_messages_total", ["type" = "commit"], "Logical messages of a type (a broadcast counts once)." }
    Doorbells { "doorbells_total", [], "Send chains posted (one doorbell each)." }
    CreditStalls { "stalls_total", ["reason" = "credits"], "Sends held back for lack of credits." }
    OrderingStalls { "stalls_total", ["reason" = "ordering"], "Committed writes held back until an earlier zxid was applied." }
    WindowStalls { "stalls_total", ["reason" = "window"], "Prepares held back because the pipeline window was full." }
    TransportDropsNoReceive { "drops_total", ["reason" = "no_posted_receive"], "Datagrams dropped because the receiver had no posted receive." }
    DropsMalformed { "drops_total", ["reason" = "malformed"], "Datagrams dropped because they could not be decoded." }
    DropsUnexpected { "drops_total", ["reason" = "unexpected"], "Accepted messages (or entries of them) the pipeline ignored because they made no sense in its state." }
    TransportSendsRefused { "drops_total", ["reason" = "send_refused"], "Send requests the transport refused." }
    DropsDuplicate { "drops_total", ["reason" = "duplicate"], "Valid datagrams dropped because everything they carry was already held (duplicates and retransmissions)." }
    RetransmitPrepare { "retransmissions_total", ["type" = "prepare"], "Messages sent again because an earlier copy was not acknowledged in time or was reported missing." }
    RetransmitCommit { "retransmissions_total", ["type" = "commit"], "Messages sent again because an earlier copy was not acknowledged in time or was reported missing." }
    RetransmitWrite { "retransmissions_total", ["type" = "write"], "Messages sent again because an earlier copy was not acknowledged in time or was reported missing." }
    GapsDetected { "gaps_detected_total", [], "Gaps in the prepare sequence a follower found and asked the leader to fill." }
    CatchupEntriesSent { "catchup_entries_total", ["direction" = "sent"], "Store entries sent or installed while bringing a restarted follower up to date." }
    CatchupEntriesReceived { "catchup_entries_total", ["direction" = "received"], "Store entries sent or installed while bringing a restarted follower up to date." }
    DatagramsReceived { "datagrams_received_total", [], "Datagrams the worker took from its transport: each is counted once more, in messages_received_total if accepted or in drops_total by the reason it was refused (malformed, foreign, integrity, unknown_sender, misrouted)." }
    DropsForeign { "drops_total", ["reason" = "foreign"], "Datagrams dropped because they belong to another cluster or another run of this one." }
    DropsIntegrity { "drops_total", ["reason" = "integrity"], "Datagrams dropped because their CRC32C or MAC did not match: corrupted, or not sealed with this cluster's secret." }
    DropsUnknownSender { "drops_total", ["reason" = "unknown_sender"], "Datagrams dropped because their sender's process instance or epoch is not the one this pipeline joined (an old process, or not the leader this node follows)." }
    DropsMisrouted { "drops_total", ["reason" = "misrouted"], "Datagrams dropped because they name another pipeline than the worker's that received them." }
    SentHelloUnicast { "messages_sent_total", ["type" = "hello", "path" = "unicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    BytesHelloUnicast { "bytes_sent_total", ["type" = "hello", "path" = "unicast"], "Bytes sent, by type and path." }
    ReceivedHello { "messages_received_total", ["type" = "hello"], "Messages received, by type." }
    TransportDropsOversize { "drops_total", ["reason" = "oversize"], "Datagrams the transport dropped because they were larger than its MTU." }
    SentVoteUnicast { "messages_sent_total", ["type" = "vote", "path" = "unicast"], "Messages sent, by type and path (repeats are counted in retransmissions_total)." }
    BytesVoteUnicast { "bytes_sent_total", ["type" = "vote", "path" = "unicast"], "Bytes sent, by type and path." }
    ReceivedVote { "messages_received_total", ["type" = "vote"], "Messages received, by type." }
    ElectionsStarted { "elections_total", ["event" = "started"], "Elections this node started (its leader, or as leader its quorum, silent for election_timeout_ms), and epochs it began to lead after one." }
    ElectionsWon { "elections_total", ["event" = "won"], "Elections this node started (its leader, or as leader its quorum, silent for election_timeout_ms), and epochs it began to lead after one." }
    LeaderlessMicros { "leaderless_microseconds_total", [], "Time this node spent without a leader (electing, discovering, joining the elected one), in microseconds." }
    DiffSyncs { "follower_syncs_total", ["method" = "diff"], "Followers brought to this leader's history from its committed-transaction ring (DIFF)." }
    TruncatedTxns { "truncated_transactions_total", [], "Transactions this node held that its new leader's history lacks, dropped (TRUNC)." }
    TransportDropsHole { "drops_total", ["reason" = "hole"], "Receive positions a sender reserved and never wrote (over shm: a sender killed mid-send), skipped after 20 ms." }
}

const _: () = assert!(COUNTERS.len() <= MAX_COUNTERS);

impl Counter {
    /// The counter's definition.
    pub fn spec(self) -> &'static CounterSpec {
        &COUNTERS[self as usize]
    }

    /// The counter's slot in a worker block.
    pub fn slot(self) -> usize {
        self as usize
    }
}

/// Adds to a single-writer counter without a read-modify-write instruction.
#[inline]
pub fn add_single_writer(cell: &AtomicU64, amount: u64) {
    cell.store(
        cell.load(Ordering::Relaxed).wrapping_add(amount),
        Ordering::Relaxed,
    );
}

/// A fixed log-linear histogram of nanosecond values with one writer: HdrHistogram's layout
/// for 2 significant digits.
///
/// With `S = HISTOGRAM_SUB_BUCKET_BITS` (7): every value below `2^S` has a bucket of its own;
/// each range `[2^e, 2^(e+1))` with `S <= e < HISTOGRAM_RANGE_BITS` is cut into `2^S` equal
/// buckets of width `2^(e-S)`; everything from `2^HISTOGRAM_RANGE_BITS` ns (68.7 s) up falls
/// in one overflow bucket. A bucket is thus at most `1/2^S` (0.78%) of its lowest value wide,
/// and a quantile read as the highest value of its bucket is within 0.78% of the sample it
/// stands for (see [`HistogramSnapshot::value_at_quantile`]). The exact maximum is kept too.
/// Recording is a shift, a few compares and four single-writer stores: no allocation, no
/// read-modify-write instruction.
#[repr(C)]
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; HISTOGRAM_BUCKETS],
    sum: AtomicU64,
    count: AtomicU64,
    max: AtomicU64,
}

const SUB_BITS: u32 = HISTOGRAM_SUB_BUCKET_BITS;
const SUB_MASK: u64 = (1 << SUB_BITS) - 1;

/// Linear buckets per power of two in the exported (Prometheus) histogram, as a power of two:
/// 2^6 = 64, so an exported bucket is at most 1/64 (1.56%) of its lowest value wide and
/// `histogram_quantile`'s linear interpolation inside it lands within 1.6% of
/// [`HistogramSnapshot::value_at_quantile`] (both lie in the same exported bucket).
pub const EXPORT_SUB_BUCKET_BITS: u32 = 6;
/// The lowest exported bound is `2^EXPORT_LOW_BITS` ns (256 ns): faster writes all fall in the
/// first exported bucket.
pub const EXPORT_LOW_BITS: u32 = 8;
/// The highest finite exported bound is `2^EXPORT_HIGH_BITS` ns (4.29 s): slower writes are
/// only in `+Inf` (where `histogram_quantile` answers with this bound).
pub const EXPORT_HIGH_BITS: u32 = 32;
/// How many finite buckets are exported.
pub const EXPORT_BUCKETS: usize =
    1 + ((EXPORT_HIGH_BITS - EXPORT_LOW_BITS) << EXPORT_SUB_BUCKET_BITS) as usize;

// Every exported bound must be a bucket boundary of the full histogram, so that its cumulative
// count is exact.
const _: () = assert!(EXPORT_SUB_BUCKET_BITS <= SUB_BITS);
const _: () = assert!(EXPORT_LOW_BITS >= SUB_BITS);
const _: () = assert!(EXPORT_LOW_BITS < EXPORT_HIGH_BITS);
const _: () = assert!(EXPORT_HIGH_BITS <= HISTOGRAM_RANGE_BITS);

/// The exported buckets' upper bounds in nanoseconds, ascending: `2^EXPORT_LOW_BITS`, then
/// `2^EXPORT_SUB_BUCKET_BITS` equal steps through each power of two up to
/// `2^EXPORT_HIGH_BITS`. A bound is exclusive for integer nanoseconds (the bucket `le = b`
/// counts values below `b`), as it is the lowest value of a bucket of [`Histogram`].
pub fn export_bounds() -> impl Iterator<Item = u64> {
    std::iter::once(1u64 << EXPORT_LOW_BITS).chain((EXPORT_LOW_BITS..EXPORT_HIGH_BITS).flat_map(
        |exponent| {
            let step = 1u64 << (exponent - EXPORT_SUB_BUCKET_BITS);
            (1..=1u64 << EXPORT_SUB_BUCKET_BITS).map(move |k| (1u64 << exponent) + k * step)
        },
    ))
}

/// p50, p99, p99.9 and the maximum of a latency histogram, in nanoseconds (0 when empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// A consistent-enough copy of a histogram for export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<u64>,
    pub sum: u64,
    pub count: u64,
    /// The largest value recorded (exact for a whole histogram; within a bucket for
    /// [`HistogramSnapshot::since`]).
    pub max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// The overflow bucket: values from `2^HISTOGRAM_RANGE_BITS` up.
    pub const OVERFLOW_BUCKET: usize = HISTOGRAM_BUCKETS - 1;

    /// The bucket a value falls in.
    #[inline]
    pub fn bucket_of(value: u64) -> usize {
        if value >> HISTOGRAM_RANGE_BITS != 0 {
            return Self::OVERFLOW_BUCKET;
        }
        // Below 2^RANGE_BITS (< 2^36), so every index here is below HISTOGRAM_BUCKETS and
        // fits a usize.
        #[allow(
            clippy::cast_possible_truncation,
            reason = "the value and the index are below 2^36"
        )]
        if value <= SUB_MASK {
            value as usize
        } else {
            let exponent = 63 - value.leading_zeros();
            let first = u64::from(exponent - SUB_BITS + 1) << SUB_BITS;
            (first + ((value >> (exponent - SUB_BITS)) & SUB_MASK)) as usize
        }
    }

    /// The lowest value of bucket `index` (for the overflow bucket, `2^HISTOGRAM_RANGE_BITS`).
    pub fn bucket_lower_bound(index: usize) -> u64 {
        let index = index.min(Self::OVERFLOW_BUCKET) as u64;
        let power = index >> SUB_BITS;
        if power == 0 {
            return index;
        }
        // `power` counts the powers of two from 2^SUB_BITS; it is at most RANGE_BITS - SUB_BITS + 1.
        #[allow(
            clippy::cast_possible_truncation,
            reason = "power is at most HISTOGRAM_RANGE_BITS"
        )]
        let exponent = power as u32 + SUB_BITS - 1;
        (1u64 << exponent) + ((index & SUB_MASK) << (exponent - SUB_BITS))
    }

    /// Exclusive upper bound of bucket `index`: the lowest value of the next one (`u64::MAX`
    /// for the overflow bucket).
    pub fn bucket_upper_bound(index: usize) -> u64 {
        if index >= Self::OVERFLOW_BUCKET {
            u64::MAX
        } else {
            Self::bucket_lower_bound(index + 1)
        }
    }

    /// Records one value; only the histogram's single writer may call this.
    #[inline]
    pub fn record(&self, value: u64) {
        add_single_writer(&self.buckets[Self::bucket_of(value)], 1);
        add_single_writer(&self.sum, value);
        add_single_writer(&self.count, 1);
        if value > self.max.load(Ordering::Relaxed) {
            self.max.store(value, Ordering::Relaxed);
        }
    }

    /// Copies the histogram out.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|cell| cell.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    /// Adds another snapshot into this one (for summing workers).
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine = mine.wrapping_add(*theirs);
        }
        self.sum = self.sum.wrapping_add(other.sum);
        self.count = self.count.wrapping_add(other.count);
        self.max = self.max.max(other.max);
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram): for a live line
    /// over an interval. Its `max` is the highest value of the highest bucket that grew (no
    /// higher than the whole histogram's maximum), so within 0.78% of the interval's maximum.
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(index, now)| {
                now.saturating_sub(earlier.buckets.get(index).copied().unwrap_or(0))
            })
            .collect();
        let mut interval = HistogramSnapshot {
            buckets,
            sum: self.sum.saturating_sub(earlier.sum),
            count: self.count.saturating_sub(earlier.count),
            max: self.max,
        };
        interval.max = interval
            .buckets
            .iter()
            .rposition(|count| *count > 0)
            .map_or(0, |index| interval.representative(index));
        interval
    }

    /// Values counted in the buckets (equal to `count` unless read while the writer records).
    pub fn total(&self) -> u64 {
        self.buckets
            .iter()
            .fold(0u64, |total, count| total.wrapping_add(*count))
    }

    /// The value reported for bucket `index`: its highest value, no higher than the maximum
    /// recorded (and no lower than the bucket's lowest, should the maximum be read before the
    /// bucket's count). The overflow bucket reports the maximum.
    fn representative(&self, index: usize) -> u64 {
        let lowest = Histogram::bucket_lower_bound(index);
        let highest = Histogram::bucket_upper_bound(index).saturating_sub(1);
        highest.min(self.max).max(lowest)
    }

    /// The value at a quantile (0.0..=1.0), or 0 when empty: the sample of rank
    /// `ceil(quantile * total)` (at least 1) in sorted order, read as the highest value of the
    /// bucket it fell in (capped at the maximum). It is never below that sample and at most
    /// 0.78% above it, for samples below `2^HISTOGRAM_RANGE_BITS` ns.
    pub fn value_at_quantile(&self, quantile: f64) -> u64 {
        let total = self.total();
        if total == 0 {
            return 0;
        }
        // The float-to-int cast saturates by definition; the rank is clamped to the total.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a saturating cast of a non-negative rank"
        )]
        let rank = ((total as f64) * quantile.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let rank = rank.min(total);
        let mut seen = 0u64;
        for (index, count) in self.buckets.iter().enumerate() {
            seen = seen.wrapping_add(*count);
            if seen >= rank {
                return self.representative(index);
            }
        }
        self.max
    }

    /// p50, p99, p99.9 and the maximum.
    pub fn percentiles(&self) -> Percentiles {
        if self.total() == 0 {
            return Percentiles::default();
        }
        Percentiles {
            p50: self.value_at_quantile(0.5),
            p99: self.value_at_quantile(0.99),
            p999: self.value_at_quantile(0.999),
            max: self.max.max(self.value_at_quantile(1.0)),
        }
    }

    /// The exported buckets: `(upper bound in ns, values below it)` for every bound of
    /// [`export_bounds`], ascending; the count for `+Inf` is [`HistogramSnapshot::total`].
    pub fn export_buckets(&self) -> Vec<(u64, u64)> {
        let mut exported = Vec::with_capacity(EXPORT_BUCKETS);
        let mut below = 0u64;
        let mut next = 0usize;
        for bound in export_bounds() {
            let end = Histogram::bucket_of(bound).min(self.buckets.len());
            for count in self.buckets.get(next..end).unwrap_or(&[]) {
                below = below.wrapping_add(*count);
            }
            next = next.max(end);
            exported.push((bound, below));
        }
        exported
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test ranks are small and non-negative"
)]
mod tests {
    use super::*;

    /// splitmix64: a deterministic stream for sample sets.
    fn random(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value spread log-uniformly over `[1, 2^bits)`.
    fn log_uniform(state: &mut u64, bits: u32) -> u64 {
        let exponent = random(state) % u64::from(bits);
        let low = 1u64 << exponent;
        low + random(state) % low
    }

    #[test]
    fn buckets_tile_the_range_in_order() {
        assert_eq!(Histogram::bucket_of(0), 0);
        assert_eq!(Histogram::bucket_of(127), 127);
        assert_eq!(Histogram::bucket_of(128), 128);
        assert_eq!(Histogram::bucket_of(255), 255);
        // 256..512 has 128 buckets of width 2.
        assert_eq!(Histogram::bucket_of(256), 256);
        assert_eq!(Histogram::bucket_of(257), 256);
        assert_eq!(Histogram::bucket_of(258), 257);
        assert_eq!(Histogram::bucket_of(511), 383);
        assert_eq!(Histogram::bucket_of(512), 384);
        assert_eq!(
            Histogram::bucket_of((1 << HISTOGRAM_RANGE_BITS) - 1),
            Histogram::OVERFLOW_BUCKET - 1
        );
        assert_eq!(
            Histogram::bucket_of(1 << HISTOGRAM_RANGE_BITS),
            Histogram::OVERFLOW_BUCKET
        );
        assert_eq!(Histogram::bucket_of(u64::MAX), Histogram::OVERFLOW_BUCKET);
        assert_eq!(Histogram::bucket_lower_bound(0), 0);
        for index in 0..Histogram::OVERFLOW_BUCKET {
            let lower = Histogram::bucket_lower_bound(index);
            let upper = Histogram::bucket_upper_bound(index);
            assert!(lower < upper, "bucket {index}");
            assert_eq!(Histogram::bucket_of(lower), index);
            assert_eq!(Histogram::bucket_of(upper - 1), index);
            assert_eq!(
                Histogram::bucket_lower_bound(index + 1),
                upper,
                "contiguous"
            );
        }
        assert_eq!(
            Histogram::bucket_lower_bound(Histogram::OVERFLOW_BUCKET),
            1 << HISTOGRAM_RANGE_BITS
        );
        assert_eq!(
            Histogram::bucket_upper_bound(Histogram::OVERFLOW_BUCKET),
            u64::MAX
        );
    }

    #[test]
    fn relative_error_is_below_one_percent_over_the_whole_range() {
        let bound = 1.0 / f64::from(1u32 << HISTOGRAM_SUB_BUCKET_BITS);
        assert!(bound < 0.01);
        let mut state = 1;
        let mut values: Vec<u64> = (0..200_000)
            .map(|_| log_uniform(&mut state, HISTOGRAM_RANGE_BITS))
            .collect();
        // Every bucket edge, and both sides of every power of two.
        for bits in 1..HISTOGRAM_RANGE_BITS {
            values.extend([(1 << bits) - 1, 1 << bits, (1 << bits) + 1]);
        }
        let mut worst = 0.0f64;
        for value in values {
            let index = Histogram::bucket_of(value);
            let lowest = Histogram::bucket_lower_bound(index);
            let highest = Histogram::bucket_upper_bound(index) - 1;
            assert!(lowest <= value && value <= highest, "{value}");
            // What a quantile reports for it: the bucket's highest value.
            let error = (highest - value) as f64 / value.max(1) as f64;
            assert!(error <= bound, "{value}: {error}");
            // And any value of the bucket stands for any other within the bound.
            assert!(((highest - lowest) as f64 / lowest.max(1) as f64) <= bound);
            worst = worst.max(error);
        }
        assert!(worst > bound / 2.0, "the test reaches the bound ({worst})");
    }

    fn recorded(values: &[u64]) -> HistogramSnapshot {
        let histogram = Histogram::default();
        for value in values {
            histogram.record(*value);
        }
        histogram.snapshot()
    }

    #[test]
    fn quantiles_match_a_sorted_sample_oracle() {
        let mut state = 7;
        for (samples, bits) in [(1usize, 20u32), (10, 12), (1000, 30), (100_003, 34)] {
            let mut values: Vec<u64> = (0..samples)
                .map(|_| 1000 + log_uniform(&mut state, bits))
                .collect();
            let snapshot = recorded(&values);
            values.sort_unstable();
            assert_eq!(snapshot.count, samples as u64);
            assert_eq!(snapshot.total(), samples as u64);
            assert_eq!(snapshot.sum, values.iter().sum::<u64>());
            assert_eq!(snapshot.max, values[samples - 1]);
            for quantile in [0.0, 0.001, 0.25, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0] {
                let rank = ((samples as f64 * quantile).ceil() as usize).clamp(1, samples);
                let oracle = values[rank - 1];
                let reported = snapshot.value_at_quantile(quantile);
                assert!(reported >= oracle, "q{quantile}: {reported} < {oracle}");
                assert!(
                    (reported - oracle) as f64 / oracle as f64 <= 1.0 / 128.0,
                    "q{quantile} of {samples}: {reported} against {oracle}"
                );
            }
            let percentiles = snapshot.percentiles();
            assert_eq!(percentiles.max, values[samples - 1], "the maximum is exact");
            assert_eq!(percentiles.p50, snapshot.value_at_quantile(0.5));
            assert_eq!(percentiles.p999, snapshot.value_at_quantile(0.999));
        }
        assert_eq!(recorded(&[]).percentiles(), Percentiles::default());
        // A single value in a wide bucket reads as itself (capped at the maximum).
        assert_eq!(recorded(&[1_000_001]).value_at_quantile(0.5), 1_000_001);
        // Overflowed values read as the maximum.
        let huge = recorded(&[5, 1 << 40, 3 << 40]);
        assert_eq!(huge.value_at_quantile(1.0), 3 << 40);
        assert_eq!(huge.percentiles().max, 3 << 40);
    }

    #[test]
    fn merged_and_interval_snapshots() {
        let mut merged = recorded(&[1000, 2000]);
        merged.merge(&recorded(&[3000, 50_000]));
        assert_eq!((merged.count, merged.sum, merged.max), (4, 56_000, 50_000));
        // 2000 is in [2000, 2008), width 8 between 1024 and 2048.
        assert_eq!(merged.value_at_quantile(0.5), 2007);

        let histogram = Histogram::default();
        for value in [10_000, 20_000, 1_000_000] {
            histogram.record(value);
        }
        let before = histogram.snapshot();
        for value in [30_000, 40_000, 40_001] {
            histogram.record(value);
        }
        let interval = histogram.snapshot().since(&before);
        assert_eq!((interval.count, interval.sum), (3, 110_001));
        assert_eq!(
            interval.value_at_quantile(0.0),
            // 30 000 is in [29 952, 30 080), width 128 between 16 384 and 32 768.
            30_079
        );
        let max = interval.percentiles().max;
        assert!((40_001..=40_001 + 40_001 / 128).contains(&max), "{max}");
        assert_eq!(
            histogram
                .snapshot()
                .since(&histogram.snapshot())
                .percentiles(),
            Percentiles::default()
        );
    }

    /// Prometheus's `histogram_quantile` over `(le, cumulative count)` pairs ending with
    /// `+Inf`: linear interpolation inside the bucket the rank falls in.
    fn histogram_quantile(quantile: f64, buckets: &[(f64, f64)]) -> f64 {
        let total = buckets[buckets.len() - 1].1;
        let rank = quantile * total;
        let found = buckets
            .iter()
            .position(|(_, count)| *count >= rank)
            .unwrap_or(buckets.len() - 1);
        if found == buckets.len() - 1 {
            return buckets[buckets.len() - 2].0;
        }
        let (lower, below) = if found == 0 {
            (0.0, 0.0)
        } else {
            buckets[found - 1]
        };
        let (upper, count) = buckets[found];
        lower + (upper - lower) * ((rank - below) / (count - below))
    }

    #[test]
    fn exported_buckets_are_exact_and_fine_enough_for_histogram_quantile() {
        let bounds: Vec<u64> = export_bounds().collect();
        assert_eq!(bounds.len(), EXPORT_BUCKETS);
        assert_eq!(bounds[0], 1 << EXPORT_LOW_BITS);
        assert_eq!(bounds[bounds.len() - 1], 1 << EXPORT_HIGH_BITS);
        assert!(bounds.windows(2).all(|pair| pair[0] < pair[1]));
        for pair in bounds.windows(2) {
            // A bucket boundary of the full histogram, and at most 1/64 of its lowest value wide.
            assert_eq!(
                Histogram::bucket_lower_bound(Histogram::bucket_of(pair[1])),
                pair[1]
            );
            assert!((pair[1] - pair[0]) as f64 / pair[0] as f64 <= 1.0 / 64.0);
        }

        let mut state = 11;
        for spread in [4u32, 10, 20] {
            // Latencies from 2 us up, spread over `spread` powers of two.
            let mut values: Vec<u64> = (0..50_000)
                .map(|_| 2000 + log_uniform(&mut state, 11 + spread))
                .collect();
            let snapshot = recorded(&values);
            values.sort_unstable();
            let exported = snapshot.export_buckets();
            assert_eq!(exported.len(), EXPORT_BUCKETS);
            for (bound, below) in &exported {
                assert_eq!(*below, values.partition_point(|value| value < bound) as u64);
            }
            let mut series: Vec<(f64, f64)> = exported
                .iter()
                .map(|(bound, below)| (*bound as f64, *below as f64))
                .collect();
            series.push((f64::INFINITY, snapshot.total() as f64));
            for quantile in [0.5, 0.9, 0.99, 0.999] {
                let ours = snapshot.value_at_quantile(quantile) as f64;
                let prometheus = histogram_quantile(quantile, &series);
                assert!(
                    (prometheus - ours).abs() / ours <= 0.02,
                    "q{quantile}: histogram_quantile {prometheus} against {ours}"
                );
            }
        }
    }

    #[test]
    fn counter_slots_follow_declaration_order() {
        for (slot, spec) in COUNTERS.iter().enumerate() {
            assert_eq!(spec.counter.slot(), slot);
        }
    }
}
