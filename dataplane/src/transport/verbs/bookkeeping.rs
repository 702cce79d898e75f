//! The pure logic behind the data path: where receive slots and staging buffers lie in the
//! registered region ([`RegionLayout`]), which receive slots are posted ([`RecvRing`]), and the
//! send queue's sequence numbers and selective signaling ([`SendTracker`]).
//!
//! Touches nothing: no FFI, no unsafe code, no allocation after construction, so every rule
//! here is unit-tested without hardware.

use super::GRH_BYTES;

/// Alignment of every slot and staging buffer.
pub(super) const CACHE_LINE: usize = 64;
/// Alignment of the send ring inside the region.
pub(super) const PAGE: usize = 4096;

/// Offsets inside the registered region. Pure arithmetic, checked against overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RegionLayout {
    pub(super) mtu: usize,
    pub(super) recv_slots: usize,
    pub(super) recv_stride: usize,
    pub(super) send_offset: usize,
    pub(super) send_stride: usize,
    pub(super) send_chains: usize,
    pub(super) max_chain: usize,
    pub(super) total: usize,
}

pub(super) fn round_up(value: usize, to: usize) -> Option<usize> {
    value.checked_add(to - 1).map(|sum| sum / to * to)
}

impl RegionLayout {
    pub(super) fn new(
        mtu: usize,
        recv_slots: usize,
        max_chain: usize,
        send_chains: usize,
    ) -> Option<Self> {
        let recv_stride = round_up(GRH_BYTES.checked_add(mtu)?, CACHE_LINE)?;
        let send_offset = round_up(recv_stride.checked_mul(recv_slots)?, PAGE)?;
        let send_stride = round_up(mtu, CACHE_LINE)?;
        let send_bytes = send_stride
            .checked_mul(max_chain)?
            .checked_mul(send_chains)?;
        let total = round_up(send_offset.checked_add(send_bytes)?, PAGE)?.max(PAGE);
        Some(RegionLayout {
            mtu,
            recv_slots,
            recv_stride,
            send_offset,
            send_stride,
            send_chains,
            max_chain,
            total,
        })
    }

    /// Start of receive slot `slot` (where the GRH lands).
    pub(super) fn recv_slot(&self, slot: usize) -> usize {
        slot * self.recv_stride
    }

    /// Start of the payload in receive slot `slot`.
    pub(super) fn recv_payload(&self, slot: usize) -> usize {
        self.recv_slot(slot) + GRH_BYTES
    }

    /// Bytes a receive request offers: the GRH room plus one MTU.
    pub(super) fn recv_len(&self) -> usize {
        GRH_BYTES + self.mtu
    }

    /// Start of staging buffer `index` of chain `chain`.
    pub(super) fn send_buffer(&self, chain: usize, index: usize) -> usize {
        self.send_offset + (chain * self.max_chain + index) * self.send_stride
    }
}

/// Which receive slots are posted: a ring consumed in order, as a UD receive queue is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RecvRing {
    pub(super) slots: usize,
    /// Next slot to post (the oldest unposted one).
    pub(super) next_post: usize,
    /// Slots posted and not yet completed.
    pub(super) posted: usize,
}

impl RecvRing {
    pub(super) fn new(slots: usize) -> Self {
        RecvRing {
            slots,
            next_post: 0,
            posted: 0,
        }
    }

    /// The first slot and the number of slots the next `post_recv(count)` covers.
    pub(super) fn reserve(&self, count: usize) -> (usize, usize) {
        (self.next_post, count.min(self.slots - self.posted))
    }

    /// Records that `count` slots from `next_post` were posted.
    pub(super) fn commit(&mut self, count: usize) {
        self.next_post = (self.next_post + count) % self.slots;
        self.posted += count;
    }

    /// Records one completion (in order: the oldest posted slot).
    pub(super) fn complete(&mut self) {
        self.posted = self.posted.saturating_sub(1);
    }
}

/// Send-queue bookkeeping: sequence numbers of posted requests, how far completions have
/// come, and which chain of the send ring each staging buffer was last sent from. Pure logic,
/// so the signaling policy is testable without hardware.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SendTracker {
    /// For each chain of the send ring: one past the sequence number of the last request that
    /// read a staging buffer of that chain (0: none in flight).
    pub(super) chain_ends: Box<[u64]>,
    /// The chain whose buffers `send_buffer` hands out.
    pub(super) current: usize,
    /// Sequence number of the next request.
    pub(super) next_seq: u64,
    /// Every request below this has completed.
    pub(super) done_seq: u64,
    /// One past the last signaled request posted; completions can reach at most this.
    pub(super) signaled_seq: u64,
    pub(super) signal_every: u64,
    /// Uncovered chains (buffers in flight, no signaled request after them) tolerated before
    /// the last request of a chain is signaled.
    pub(super) force_after: usize,
    /// Send queue depth.
    pub(super) depth: u64,
}

/// Per-chain state while the requests of one chain are planned.
#[derive(Clone, Copy, Debug)]
pub(super) struct ChainPlan {
    pub(super) signaled_seq: u64,
    pub(super) force_last: bool,
    pub(super) uses_buffers: bool,
    pub(super) last_buffered: Option<u64>,
}

impl SendTracker {
    pub(super) fn new(chains: usize, signal_every: usize, depth: usize) -> Self {
        SendTracker {
            chain_ends: vec![0; chains].into_boxed_slice(),
            current: 0,
            next_seq: 0,
            done_seq: 0,
            signaled_seq: 0,
            signal_every: signal_every.max(1) as u64,
            force_after: (chains / 2).max(1),
            depth: depth as u64,
        }
    }

    pub(super) fn outstanding(&self) -> u64 {
        self.next_seq - self.done_seq
    }

    /// Chains other than the current one whose buffers no posted signaled request covers.
    pub(super) fn uncovered(&self) -> usize {
        self.chain_ends
            .iter()
            .enumerate()
            .filter(|&(chain, &end)| chain != self.current && end > self.signaled_seq)
            .count()
    }

    pub(super) fn begin_chain(&self) -> ChainPlan {
        ChainPlan {
            signaled_seq: self.signaled_seq,
            force_last: self.uncovered() >= self.force_after,
            uses_buffers: false,
            last_buffered: None,
        }
    }

    /// Plans request `offset` of a chain of `len`; `inline` requests do not hold their staging
    /// buffer. Returns whether the request is signaled. Call for every request in order.
    pub(super) fn plan(
        &self,
        plan: &mut ChainPlan,
        offset: usize,
        len: usize,
        inline: bool,
    ) -> bool {
        let seq = self.next_seq + offset as u64;
        if !inline {
            plan.uses_buffers = true;
            plan.last_buffered = Some(seq);
        }
        let periodic = seq + 1 - plan.signaled_seq >= self.signal_every;
        let closing = offset + 1 == len && plan.force_last && plan.uses_buffers;
        if periodic || closing {
            plan.signaled_seq = seq + 1;
            true
        } else {
            false
        }
    }

    /// Records that the first `accepted` requests of the planned chain were posted. `plan`
    /// must cover exactly those requests: after a partial post the caller re-plans the
    /// accepted prefix (with the original chain length, so the flags match what was posted).
    pub(super) fn commit(&mut self, plan: &ChainPlan, accepted: usize) {
        self.next_seq += accepted as u64;
        self.signaled_seq = plan.signaled_seq;
        self.chain_ends[self.current] = plan.last_buffered.map_or(0, |seq| seq + 1);
    }

    /// Moves to the next chain; returns the sequence number completions must reach before its
    /// buffers may be written.
    pub(super) fn advance(&mut self) -> u64 {
        self.current = (self.current + 1) % self.chain_ends.len();
        self.chain_ends[self.current]
    }

    /// Whether completions up to `target` can arrive without posting anything more.
    pub(super) fn reachable(&self, target: u64) -> bool {
        target <= self.signaled_seq
    }

    /// Records a signaled completion for request `seq`: it and everything before it are done.
    pub(super) fn completed(&mut self, seq: u64) {
        self.done_seq = self.done_seq.max(seq + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::verbs::SEND_RING_CHAINS;

    #[test]
    fn region_layout_places_slots_and_buffers_without_overlap() {
        let layout = RegionLayout::new(4096, 8, 4, SEND_RING_CHAINS).unwrap();
        assert_eq!(layout.recv_stride, 4160); // 40 + 4096 rounded up to 64
        assert_eq!(layout.recv_slot(0), 0);
        assert_eq!(layout.recv_slot(3), 3 * 4160);
        assert_eq!(layout.recv_payload(3), 3 * 4160 + GRH_BYTES);
        assert_eq!(layout.recv_len(), 4136);
        // Receive slots end before the send ring, which starts on a page.
        assert!(layout.recv_slot(7) + layout.recv_len() <= layout.send_offset);
        assert_eq!(layout.send_offset % PAGE, 0);
        assert_eq!(layout.send_stride, 4096);
        assert_eq!(layout.send_buffer(0, 0), layout.send_offset);
        assert_eq!(layout.send_buffer(0, 1), layout.send_offset + 4096);
        assert_eq!(layout.send_buffer(1, 0), layout.send_offset + 4 * 4096);
        let last = layout.send_buffer(SEND_RING_CHAINS - 1, 3);
        assert!(last + layout.mtu <= layout.total);
        assert_eq!(layout.total % PAGE, 0);

        // Small MTUs keep cache-line alignment of every slot and buffer.
        let small = RegionLayout::new(100, 3, 2, 2).unwrap();
        assert_eq!(small.recv_stride, 192);
        assert_eq!(small.recv_payload(1) - GRH_BYTES, 192);
        assert_eq!(small.send_stride, 128);
        assert_eq!(small.send_buffer(1, 1), small.send_offset + 3 * 128);
        assert_eq!(small.send_offset, PAGE);
        assert_eq!(small.total, 2 * PAGE);
        for slot in 0..3 {
            assert_eq!(small.recv_slot(slot) % CACHE_LINE, 0);
        }

        assert_eq!(RegionLayout::new(usize::MAX / 2, 4, 1, 1), None);
        assert_eq!(RegionLayout::new(4096, usize::MAX / 1024, 1, 1), None);
    }

    #[test]
    fn recv_ring_posts_oldest_unposted_slots_and_wraps() {
        let mut ring = RecvRing::new(4);
        assert_eq!(ring.reserve(10), (0, 4));
        ring.commit(3);
        assert_eq!(ring.reserve(10), (3, 1));
        ring.complete();
        ring.complete();
        assert_eq!(ring.posted, 1);
        assert_eq!(ring.reserve(3), (3, 3));
        ring.commit(3);
        assert_eq!(ring.next_post, 2);
        assert_eq!(ring.posted, 4);
        assert_eq!(ring.reserve(1), (2, 0));
        ring.complete();
        ring.complete();
        ring.complete();
        ring.complete();
        ring.complete();
        assert_eq!(ring.posted, 0);
    }

    /// Plans and commits one chain; completes instantly everything signaled when `complete`.
    fn post(tracker: &mut SendTracker, inline: &[bool], complete: bool) -> Vec<bool> {
        let len = inline.len();
        let mut plan = tracker.begin_chain();
        let signals: Vec<bool> = inline
            .iter()
            .enumerate()
            .map(|(offset, &is_inline)| tracker.plan(&mut plan, offset, len, is_inline))
            .collect();
        tracker.commit(&plan, len);
        if complete && tracker.signaled_seq > 0 {
            tracker.completed(tracker.signaled_seq - 1);
        }
        signals
    }

    #[test]
    fn send_tracker_signals_every_n_requests() {
        let mut tracker = SendTracker::new(8, 4, 64);
        let mut signals = Vec::new();
        for _ in 0..3 {
            signals.extend(post(&mut tracker, &[true; 4], true));
            let _ = tracker.advance();
        }
        // All inline: only the periodic signal, on every 4th request.
        let expected: Vec<bool> = (0..12).map(|seq| seq % 4 == 3).collect();
        assert_eq!(signals, expected);
    }

    #[test]
    fn send_tracker_always_covers_the_chain_reused_next() {
        // Single-request chains with buffers: the periodic rule alone would leave the chain
        // reused next uncovered; the chain-end rule must signal often enough.
        for signal_every in [1, 3, 32, 1000] {
            let mut tracker = SendTracker::new(SEND_RING_CHAINS, signal_every, 4096);
            let mut signaled = 0;
            for round in 0..200 {
                let len = 1 + round % 5;
                let inline: Vec<bool> = (0..len).map(|i| (round + i) % 3 == 0).collect();
                signaled += post(&mut tracker, &inline, false)
                    .iter()
                    .filter(|&&s| s)
                    .count();
                let target = tracker.advance();
                assert!(
                    tracker.reachable(target),
                    "round {round}, signal_every {signal_every}"
                );
                if target > 0 {
                    tracker.completed(target - 1);
                }
                // The unsignaled run never exceeds signal_every - 1.
                assert!(tracker.next_seq - tracker.signaled_seq < signal_every as u64);
            }
            assert!(signaled > 0);
            if signal_every >= 32 {
                // Selective: far fewer signals than requests.
                assert!(signaled as u64 * 2 < tracker.next_seq, "{signaled}");
            }
        }
    }

    #[test]
    fn send_tracker_counts_outstanding_requests() {
        let mut tracker = SendTracker::new(2, 2, 8);
        post(&mut tracker, &[false; 3], false);
        assert_eq!(tracker.outstanding(), 3);
        assert_eq!(tracker.signaled_seq, 2);
        tracker.completed(1);
        assert_eq!(tracker.outstanding(), 1);
        // A stale completion never moves progress backwards.
        tracker.completed(0);
        assert_eq!(tracker.done_seq, 2);
    }
}
