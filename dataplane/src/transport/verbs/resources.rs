//! Ownership of every raw verbs and CM object of one endpoint ([`Resources`]) and of the
//! registered memory, and their release in [`Drop`], children before parents, whatever stage
//! construction reached.
//!
//! May touch: the destroy/dealloc/close/leave functions of libibverbs and librdmacm, and
//! nothing else. Objects are created by `setup`, `address` and `multicast`, which store them
//! here at once so that an error half-way leaks nothing.

use std::ptr;

use memmap2::MmapMut;
use rdma_sys::{
    ibv_ah, ibv_close_device, ibv_context, ibv_cq, ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_ah,
    ibv_destroy_cq, ibv_destroy_qp, ibv_detach_mcast, ibv_gid, ibv_mr, ibv_pd, ibv_qp, rdma_cm_id,
    rdma_destroy_event_channel, rdma_destroy_id, rdma_event_channel, rdma_leave_multicast,
};

/// One multicast group this endpoint went through the CM for.
pub(super) struct GroupJoin {
    pub(super) group: u16,
    pub(super) id: *mut rdma_cm_id,
    pub(super) address: libc::sockaddr_in,
    pub(super) mgid: [u8; 16],
    pub(super) mlid: u16,
    /// Whether the queue pair is attached (receives the group's datagrams).
    pub(super) attached: bool,
    /// Address handle for sending to the group.
    pub(super) handle: u32,
    pub(super) qpn: u32,
    /// The Q_Key the CM reported for the group (see the module documentation).
    pub(super) group_qkey: u32,
}

/// Every raw verbs and CM object, released in [`Drop`] whatever stage construction reached.
/// Null pointers are objects never created.
pub(super) struct Resources {
    pub(super) context: *mut ibv_context,
    pub(super) pd: *mut ibv_pd,
    pub(super) mr: *mut ibv_mr,
    pub(super) send_cq: *mut ibv_cq,
    pub(super) recv_cq: *mut ibv_cq,
    pub(super) qp: *mut ibv_qp,
    pub(super) ahs: Vec<*mut ibv_ah>,
    pub(super) channel: *mut rdma_event_channel,
    pub(super) groups: Vec<GroupJoin>,
    /// The registered memory; dropped after `Drop::drop` deregistered it.
    pub(super) region: Option<MmapMut>,
}

impl Resources {
    pub(super) fn empty() -> Self {
        Resources {
            context: ptr::null_mut(),
            pd: ptr::null_mut(),
            mr: ptr::null_mut(),
            send_cq: ptr::null_mut(),
            recv_cq: ptr::null_mut(),
            qp: ptr::null_mut(),
            ahs: Vec::new(),
            channel: ptr::null_mut(),
            groups: Vec::new(),
            region: None,
        }
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        // Verbs objects, children before parents: QP (detached from its groups first), AHs,
        // CQs, MR, PD, device. Failures cannot be reported from drop and are ignored.
        if !self.qp.is_null() {
            for join in self.groups.iter().filter(|join| join.attached) {
                let gid = ibv_gid { raw: join.mgid };
                // SAFETY: the QP is live and was attached to this (gid, lid) by us.
                unsafe { ibv_detach_mcast(self.qp, &gid, join.mlid) };
            }
            // SAFETY: the QP was created by ibv_create_qp and is destroyed exactly once.
            unsafe { ibv_destroy_qp(self.qp) };
            self.qp = ptr::null_mut();
        }
        for ah in self.ahs.drain(..) {
            // SAFETY: every entry came from ibv_create_ah and no QP references it any more.
            unsafe { ibv_destroy_ah(ah) };
        }
        for cq in [&mut self.send_cq, &mut self.recv_cq] {
            if !cq.is_null() {
                // SAFETY: the CQ was created by ibv_create_cq; the QP using it is gone.
                unsafe { ibv_destroy_cq(*cq) };
                *cq = ptr::null_mut();
            }
        }
        if !self.mr.is_null() {
            // SAFETY: the MR came from ibv_reg_mr; the mapping it covers is still alive (it
            // is dropped after this function returns).
            unsafe { ibv_dereg_mr(self.mr) };
            self.mr = ptr::null_mut();
        }
        if !self.pd.is_null() {
            // SAFETY: the PD came from ibv_alloc_pd and every object in it is destroyed.
            unsafe { ibv_dealloc_pd(self.pd) };
            self.pd = ptr::null_mut();
        }
        if !self.context.is_null() {
            // SAFETY: the context came from ibv_open_device and nothing of it is left.
            unsafe { ibv_close_device(self.context) };
            self.context = ptr::null_mut();
        }
        // CM objects: ids (leaving their groups) before the event channel.
        for mut join in self.groups.drain(..) {
            if !join.id.is_null() {
                // SAFETY: the id is live and joined the group at `join.address`.
                unsafe {
                    rdma_leave_multicast(join.id, (&raw mut join.address).cast());
                    rdma_destroy_id(join.id);
                }
            }
        }
        if !self.channel.is_null() {
            // SAFETY: the channel came from rdma_create_event_channel; its ids are destroyed.
            unsafe { rdma_destroy_event_channel(self.channel) };
            self.channel = ptr::null_mut();
        }
    }
}
