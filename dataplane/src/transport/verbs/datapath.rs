//! The data path: the [`Transport`] implementation of [`VerbsTransport`]: handing out staging
//! buffers, posting send chains (one doorbell each) and receive batches, reaping send
//! completions, polling receive completions and filtering our own looped-back multicast.
//!
//! May touch: the queue pair, both completion queues, and the registered region through the
//! pre-built work-request and completion arrays; it allocates nothing and creates no verbs
//! object (resolving and joining are delegated to `address` and `multicast`).

use std::ffi::c_int;
use std::io;
use std::ptr;
use std::time::{Duration, Instant};

use rdma_sys::{
    ibv_poll_cq, ibv_post_recv, ibv_post_send, ibv_recv_wr, ibv_send_flags, ibv_send_wr, ibv_wc,
    ibv_wc_flags, ibv_wc_status, ibv_wr_opcode, ud_t, wr_t,
};
use rzab_shared::EndpointAddress;

use super::address::{VerbsAddress, ipv4_of_gid};
use super::ffi::{errno_error, unavailable, wc_status_text};
use super::{GRH_BYTES, VerbsTransport};
use crate::transport::{
    Capabilities, Destination, MulticastGroup, RecvCompletion, SendRequest, Transport,
    TransportError, TransportStats, validate_chain,
};

/// Send completions polled per `ibv_poll_cq` call.
pub(super) const SEND_POLL_BATCH: usize = 16;
/// How long `post_send` busy-polls for send completions before declaring the queue stalled.
pub(super) const SEND_STALL_TIMEOUT: Duration = Duration::from_secs(2);

impl VerbsTransport {
    /// Reaps send completions once; returns how many came back.
    fn poll_send_cq(&mut self) -> usize {
        let batch = c_int::try_from(self.send_wcs.len()).unwrap_or(1);
        // SAFETY: the CQ is live; send_wcs holds `batch` writable entries.
        let polled = unsafe { ibv_poll_cq(self.res.send_cq, batch, self.send_wcs.as_mut_ptr()) };
        let Ok(polled) = usize::try_from(polled) else {
            if self.failed.is_none() {
                self.failed = Some(format!("ibv_poll_cq on the send queue failed ({polled})"));
            }
            return 0;
        };
        for wc in &self.send_wcs[..polled] {
            self.tracker.completed(wc.wr_id);
            if wc.status != ibv_wc_status::IBV_WC_SUCCESS && self.failed.is_none() {
                self.failed = Some(format!(
                    "send completion error: {} (vendor error {:#x})",
                    wc_status_text(wc.status),
                    wc.vendor_err
                ));
            }
        }
        polled
    }

    /// Polls the send CQ until every request below `target` completed.
    fn reap_until(&mut self, target: u64) -> Result<(), TransportError> {
        if self.tracker.done_seq >= target {
            return Ok(());
        }
        if !self.tracker.reachable(target) {
            let reason = format!(
                "send ring bookkeeping: request {target} is not covered by a signaled send"
            );
            self.failed.get_or_insert(reason.clone());
            return Err(unavailable(reason));
        }
        let started = Instant::now();
        let mut spins = 0u32;
        while self.tracker.done_seq < target {
            if self.poll_send_cq() == 0 {
                spins = spins.wrapping_add(1);
                if spins % 4096 == 0 && started.elapsed() > SEND_STALL_TIMEOUT {
                    let reason = format!(
                        "send queue of {} stalled: no completion for {} ms",
                        self.device_name,
                        SEND_STALL_TIMEOUT.as_millis()
                    );
                    self.failed.get_or_insert(reason.clone());
                    return Err(unavailable(reason));
                }
                std::hint::spin_loop();
            }
        }
        Ok(())
    }

    /// Whether a completed receive is our own multicast datagram looped back by the NIC.
    fn is_own_multicast(&self, wc: &ibv_wc, slot: usize) -> bool {
        if wc.src_qp != self.qpn || wc.wc_flags & ibv_wc_flags::IBV_WC_GRH.0 == 0 {
            return false;
        }
        let start = self.layout.recv_slot(slot);
        // SAFETY: the slot lies inside the region and just completed, so the NIC no longer
        // writes it; GRH_BYTES are within the slot.
        let grh = unsafe { std::slice::from_raw_parts(self.base.add(start), GRH_BYTES) };
        if let Some(own_ip) = ipv4_of_gid(&self.gid) {
            // RoCE v2 over IPv4: the last 20 bytes are the IPv4 header.
            let destination_multicast = (224..=239).contains(&grh[36]);
            destination_multicast && grh[32..36] == own_ip.octets()
        } else {
            // IB / RoCE v1: a GRH with the source GID at 8 and destination GID at 24.
            grh[24] == 0xff && grh[8..24] == self.gid
        }
    }
}

impl Transport for VerbsTransport {
    type Address = VerbsAddress;

    fn caps(&self) -> Capabilities {
        self.caps
    }

    fn local_address(&self) -> EndpointAddress {
        EndpointAddress::Verbs {
            lid: self.lid,
            gid: self.gid,
            qpn: self.qpn,
            qkey: self.qkey,
        }
    }

    fn resolve(&mut self, peer: &EndpointAddress) -> Result<VerbsAddress, TransportError> {
        self.resolve_peer(peer)
    }

    fn join_multicast(&mut self, group: MulticastGroup) -> Result<(), TransportError> {
        self.attach_group(group)
    }

    fn multicast_address(&mut self, group: MulticastGroup) -> Result<VerbsAddress, TransportError> {
        self.group_destination(group)
    }

    fn send_buffer(&mut self, index: usize) -> &mut [u8] {
        let index = index.min(self.caps.max_chain - 1);
        let offset = self.layout.send_buffer(self.tracker.current, index);
        // SAFETY: the buffer lies inside the registered region, which lives as long as self;
        // `&mut self` keeps every other slice of the region borrowed out; the current chain's
        // buffers were reclaimed (their sends completed) before it became current, so the NIC
        // does not read them.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(offset), self.caps.mtu) }
    }

    fn post_send(&mut self, chain: &[SendRequest<VerbsAddress>]) -> Result<usize, TransportError> {
        if let Err(error) = validate_chain(chain, &self.caps) {
            self.stats.sends_refused += 1;
            return Err(error);
        }
        for request in chain {
            let (Destination::Unicast(address) | Destination::Multicast(address)) =
                request.destination;
            if let Err(error) = self.check_address(&address) {
                self.stats.sends_refused += 1;
                return Err(error);
            }
        }
        if let Some(reason) = &self.failed {
            self.stats.sends_refused += 1;
            return Err(unavailable(format!(
                "verbs send queue failed earlier: {reason}"
            )));
        }
        let len = chain.len();
        if len == 0 {
            return Ok(0);
        }
        // Room in the send queue for the whole chain.
        if self.tracker.outstanding() + len as u64 > self.tracker.depth {
            let target = self.tracker.next_seq + len as u64 - self.tracker.depth;
            self.reap_until(target)?;
        }
        let chain_index = self.tracker.current;
        let mut plan = self.tracker.begin_chain();
        for (offset, request) in chain.iter().enumerate() {
            let (Destination::Unicast(address) | Destination::Multicast(address)) =
                request.destination;
            let inline = request.len as usize <= self.caps.max_inline;
            let signaled = self.tracker.plan(&mut plan, offset, len, inline);
            let buffer = self
                .layout
                .send_buffer(chain_index, usize::from(request.buffer));
            let sge = &mut self.send_sges[offset];
            sge.addr = self.base as u64 + buffer as u64;
            sge.length = request.len;
            sge.lkey = self.lkey;
            let mut flags = 0;
            if signaled {
                flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            if inline {
                flags |= ibv_send_flags::IBV_SEND_INLINE.0;
            }
            let wr = &mut self.send_wrs[offset];
            wr.wr_id = self.tracker.next_seq + offset as u64;
            wr.num_sge = if request.len == 0 { 0 } else { 1 };
            wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
            wr.send_flags = flags;
            wr.wr = wr_t {
                ud: ud_t {
                    ah: self.res.ahs[address.handle as usize],
                    remote_qpn: address.qpn,
                    remote_qkey: address.qkey,
                },
            };
        }
        // Link the list through pointers taken after the last reference into the arrays.
        let wrs = self.send_wrs.as_mut_ptr();
        let sges = self.send_sges.as_mut_ptr();
        for offset in 0..len {
            // SAFETY: offset < len <= max_chain, the length of both arrays.
            unsafe {
                let wr = wrs.add(offset);
                (*wr).sg_list = sges.add(offset);
                (*wr).next = if offset + 1 < len {
                    wrs.add(offset + 1)
                } else {
                    ptr::null_mut()
                };
            }
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is live; wrs[..len] form a null-terminated list whose SGEs point into
        // the registered region (validated lengths) and whose AHs are live.
        let code = unsafe { ibv_post_send(self.res.qp, wrs, &mut bad) };
        let accepted = if code == 0 {
            len
        } else if bad.is_null() {
            0
        } else {
            ((bad as usize).saturating_sub(wrs as usize) / std::mem::size_of::<ibv_send_wr>())
                .min(len)
        };
        if accepted < len {
            // Re-plan the accepted prefix so the bookkeeping matches what was posted; the
            // queue is considered broken from here on.
            plan = self.tracker.begin_chain();
            for (offset, request) in chain.iter().take(accepted).enumerate() {
                let inline = request.len as usize <= self.caps.max_inline;
                self.tracker.plan(&mut plan, offset, len, inline);
            }
            self.failed = Some(format!(
                "ibv_post_send accepted {accepted} of {len} requests: {}",
                io::Error::from_raw_os_error(code)
            ));
        }
        self.tracker.commit(&plan, accepted);
        if accepted == 0 {
            self.stats.sends_refused += 1;
            return Err(errno_error(
                format!("ibv_post_send on {}", self.device_name),
                code,
            ));
        }
        self.stats.doorbells += 1;
        self.stats.datagrams_sent += accepted as u64;
        // Reclaim the chain the caller fills next. The chain just posted went out whatever
        // happens here: a stall is recorded in `failed` and refuses the next post instead.
        let target = self.tracker.advance();
        if accepted == len {
            let _ = self.reap_until(target);
        }
        Ok(accepted)
    }

    fn post_recv(&mut self, count: usize) -> usize {
        let (start, count) = self.recv_ring.reserve(count);
        if count == 0 {
            return 0;
        }
        let slots = self.recv_ring.slots;
        for step in 0..count {
            let slot = (start + step) % slots;
            let wr = &mut self.recv_wrs[slot];
            wr.wr_id = slot as u64;
            wr.num_sge = 1;
        }
        // Link the list through pointers taken after the last reference into the arrays.
        let wrs = self.recv_wrs.as_mut_ptr();
        let sges = self.recv_sges.as_mut_ptr();
        for step in 0..count {
            let slot = (start + step) % slots;
            // SAFETY: slot and (slot + 1) % slots are below slots, the length of both arrays.
            unsafe {
                let wr = wrs.add(slot);
                (*wr).sg_list = sges.add(slot);
                (*wr).next = if step + 1 < count {
                    wrs.add((slot + 1) % slots)
                } else {
                    ptr::null_mut()
                };
            }
        }
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the QP is live; the list starting at wrs[start] is null-terminated after
        // `count` entries, each naming one unposted slot of the registered region.
        let code = unsafe { ibv_post_recv(self.res.qp, wrs.wrapping_add(start), &mut bad) };
        let posted = if code == 0 {
            count
        } else if bad.is_null() {
            0
        } else {
            // The list follows the ring, so the refused request's slot gives the count.
            let bad_slot =
                (bad as usize).saturating_sub(wrs as usize) / std::mem::size_of::<ibv_recv_wr>();
            (bad_slot + slots - start) % slots
        };
        self.recv_ring.commit(posted.min(count));
        posted.min(count)
    }

    fn posted_recvs(&self) -> usize {
        self.recv_ring.posted
    }

    fn poll_recv(&mut self, out: &mut [RecvCompletion]) -> usize {
        let mut filled = 0;
        while filled < out.len() {
            let want = (out.len() - filled).min(self.recv_wcs.len());
            let want = c_int::try_from(want).unwrap_or(c_int::MAX);
            // SAFETY: the CQ is live; recv_wcs holds at least `want` writable entries.
            let polled = unsafe { ibv_poll_cq(self.res.recv_cq, want, self.recv_wcs.as_mut_ptr()) };
            let Ok(polled) = usize::try_from(polled) else {
                break;
            };
            if polled == 0 {
                break;
            }
            for index in 0..polled {
                let wc = &self.recv_wcs[index];
                self.recv_ring.complete();
                let slot = usize::try_from(wc.wr_id).unwrap_or(usize::MAX);
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS || slot >= self.recv_ring.slots {
                    self.recv_errors += 1;
                    continue;
                }
                if self.is_own_multicast(wc, slot) {
                    continue;
                }
                let len = (wc.byte_len as usize)
                    .saturating_sub(GRH_BYTES)
                    .min(self.caps.mtu);
                out[filled] = RecvCompletion {
                    slot: u32::try_from(slot).unwrap_or(u32::MAX),
                    len: u32::try_from(len).unwrap_or(u32::MAX),
                };
                filled += 1;
            }
        }
        self.stats.datagrams_received += filled as u64;
        filled
    }

    fn recv_payload(&self, completion: &RecvCompletion) -> &[u8] {
        let slot = completion.slot as usize;
        if slot >= self.recv_ring.slots {
            return &[];
        }
        let len = (completion.len as usize).min(self.caps.mtu);
        let offset = self.layout.recv_payload(slot);
        // SAFETY: the payload range lies inside the registered region, which lives as long
        // as self; a completed slot is not written by the NIC until the caller re-posts it,
        // which needs `&mut self` and so ends this borrow.
        unsafe { std::slice::from_raw_parts(self.base.add(offset), len) }
    }

    fn stats(&self) -> TransportStats {
        TransportStats {
            datagrams_sent: self.stats.datagrams_sent,
            datagrams_received: self.stats.datagrams_received,
            sends_refused: self.stats.sends_refused,
            doorbells: self.stats.doorbells,
            // Not observable on verbs: see the module documentation.
            ..TransportStats::default()
        }
    }
}
