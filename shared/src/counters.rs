//! Per-worker counters and log2 latency histograms that live in the control block.
//!
//! Each counter has exactly one writer (its worker), which updates it with a relaxed load and
//! store rather than a read-modify-write; readers (the control plane's exporter, stats lines)
//! load it relaxed and sum over workers. One definition per counter carries its Prometheus
//! family, labels and help text, so the exporter needs no second list.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::limits::{HISTOGRAM_BUCKETS, MAX_COUNTERS};

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

/// A fixed log2-bucket histogram of nanosecond values with one writer.
#[repr(C)]
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; HISTOGRAM_BUCKETS],
    sum: AtomicU64,
    count: AtomicU64,
}

/// A consistent-enough copy of a histogram for export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<u64>,
    pub sum: u64,
    pub count: u64,
}

impl Histogram {
    /// The bucket a value falls in: `floor(log2(value))`, clamped to the last bucket.
    #[inline]
    pub fn bucket_of(value: u64) -> usize {
        let log2 = 63 - (value | 1).leading_zeros() as usize;
        log2.min(HISTOGRAM_BUCKETS - 1)
    }

    /// Exclusive upper bound of bucket `index`, in the recorded unit.
    pub fn bucket_upper_bound(index: usize) -> u64 {
        if index + 1 >= 64 {
            u64::MAX
        } else {
            1u64 << (index + 1)
        }
    }

    /// Records one value; only the histogram's single writer may call this.
    #[inline]
    pub fn record(&self, value: u64) {
        add_single_writer(&self.buckets[Self::bucket_of(value)], 1);
        add_single_writer(&self.sum, value);
        add_single_writer(&self.count, 1);
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
            *mine += theirs;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    /// The upper bound of the bucket holding the given quantile (0.0..=1.0), or 0 when empty.
    pub fn quantile_upper_bound(&self, quantile: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // Rank of the wanted sample, 1-based; the float-to-int cast saturates by definition.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = ((self.count as f64) * quantile.clamp(0.0, 1.0))
            .ceil()
            .max(1.0) as u64;
        let mut seen = 0;
        for (index, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Histogram::bucket_upper_bound(index);
            }
        }
        u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2() {
        assert_eq!(Histogram::bucket_of(0), 0);
        assert_eq!(Histogram::bucket_of(1), 0);
        assert_eq!(Histogram::bucket_of(2), 1);
        assert_eq!(Histogram::bucket_of(1023), 9);
        assert_eq!(Histogram::bucket_of(1024), 10);
        assert_eq!(Histogram::bucket_of(u64::MAX), HISTOGRAM_BUCKETS - 1);
    }

    #[test]
    fn quantiles_from_buckets() {
        // SAFETY-free construction: all-zero atomics are a valid empty histogram.
        let histogram = Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        };
        for value in 1..=100u64 {
            histogram.record(value * 1000);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 100);
        assert_eq!(snapshot.sum, 5_050_000);
        assert_eq!(snapshot.quantile_upper_bound(0.5), 65_536);
        assert_eq!(snapshot.quantile_upper_bound(0.99), 131_072);
    }

    #[test]
    fn counter_slots_follow_declaration_order() {
        for (slot, spec) in COUNTERS.iter().enumerate() {
            assert_eq!(spec.counter.slot(), slot);
        }
    }
}
