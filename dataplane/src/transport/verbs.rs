//! RDMA UD verbs transport: the production backend of the data plane on RDMA-capable hosts
//! (InfiniBand or RoCE), built on the raw `rdma-sys` bindings of libibverbs and librdmacm.
//!
//! What it touches: one RDMA device (opened by name, or the first one), one port and one GID
//! of it; it creates a protection domain, one memory region, a send and a receive completion
//! queue, one UD queue pair, address handles for the peers it resolves, and, for multicast,
//! one librdmacm event channel with one `RDMA_PS_UDP` CM id per group (the CM joins the group
//! through the subnet manager, the queue pair is attached with `ibv_attach_mcast`). Everything
//! is released in [`Drop`]. No other global state is touched; on a machine without RDMA,
//! [`VerbsTransport::open`] fails with [`TransportError::Unavailable`] and the caller falls back
//! to the `shm` or `udp` transport.
//!
//! Memory: one anonymous mapping, registered once, holds
//! - the receive ring: `recv_slots` slots of `GRH_BYTES + mtu` bytes (rounded up to a cache
//!   line); a UD receive puts the 40-byte global route header (or room for it) first, so a
//!   payload starts [`GRH_BYTES`] into its slot;
//! - the send ring: [`SEND_RING_CHAINS`] chains of `max_chain` staging buffers of `mtu` bytes.
//!   [`Transport::send_buffer`] hands out the buffers of the *current* chain, so sends are
//!   zero-copy; posting a chain moves on to the next one. Completions are selectively
//!   signaled (every `signal_every` requests, plus the last request of a chain often enough
//!   that the chain reused next is always covered by a signaled request); `post_send` polls the
//!   send completion queue when the send queue or the next chain needs room.
//!
//! Requests no longer than the queue pair's `max_inline_data` go inline (`IBV_SEND_INLINE`);
//! one chain is one linked list of work requests and one `ibv_post_send` (one doorbell).
//!
//! Not observable here: datagrams dropped by the NIC because no receive was posted are not
//! reported to the queue pair (UD has no receiver-not-ready feedback), so
//! [`TransportStats::dropped_no_recv`] stays 0 on this backend; the drops show in the port
//! counters instead (`/sys/class/infiniband/<dev>/ports/<port>/counters/`, or the
//! `rx_discards_phy`-style counters of `ethtool -S` on RoCE).
//!
//! Multicast Q_Key: librdmacm gives `RDMA_PS_UDP` groups the Q_Key `0x01234567`, while the
//! queue pair of this transport uses the configured Q_Key for unicast and multicast alike. The
//! receiving NIC checks a datagram's Q_Key against the receiving queue pair's, not against the
//! group's, so multicast sends carry the configured Q_Key (which every member shares); the
//! group's own Q_Key is kept for diagnostics ([`VerbsTransport::multicast_group_qkey`]).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::io;
use std::net::Ipv4Addr;
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use rdma_sys::{
    ___ibv_query_port, ibv_access_flags, ibv_ah, ibv_ah_attr, ibv_alloc_pd, ibv_attach_mcast,
    ibv_close_device, ibv_context, ibv_cq, ibv_create_ah, ibv_create_cq, ibv_create_qp,
    ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_ah, ibv_destroy_cq, ibv_destroy_qp, ibv_detach_mcast,
    ibv_device, ibv_device_attr, ibv_free_device_list, ibv_get_device_list, ibv_get_device_name,
    ibv_gid, ibv_global_route, ibv_modify_qp, ibv_mr, ibv_mtu, ibv_open_device, ibv_pd,
    ibv_poll_cq, ibv_port_attr, ibv_port_state, ibv_post_recv, ibv_post_send, ibv_qp, ibv_qp_attr,
    ibv_qp_attr_mask, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type, ibv_query_device, ibv_query_gid,
    ibv_query_qp, ibv_recv_wr, ibv_reg_mr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc,
    ibv_wc_flags, ibv_wc_status, ibv_wc_status_str, ibv_wr_opcode, rdma_ack_cm_event,
    rdma_cm_event, rdma_cm_event_type, rdma_cm_id, rdma_create_event_channel, rdma_create_id,
    rdma_destroy_event_channel, rdma_destroy_id, rdma_event_channel, rdma_event_str,
    rdma_get_cm_event, rdma_join_multicast, rdma_leave_multicast, rdma_port_space,
    rdma_resolve_addr, rdma_ud_param, ud_t, wr_t,
};
use rzab_shared::EndpointAddress;

use super::{
    Capabilities, Destination, MulticastGroup, RecvCompletion, SendRequest, Transport,
    TransportError, TransportStats, validate_chain,
};

/// Bytes a UD receive reserves for the global route header in front of the payload.
pub const GRH_BYTES: usize = 40;
/// Chains' worth of staging buffers in the send ring.
pub const SEND_RING_CHAINS: usize = 8;
/// Largest UD payload any port supports (the 4096-byte IB MTU).
pub const MAX_UD_MTU: usize = 4096;

/// Alignment of every slot and staging buffer.
const CACHE_LINE: usize = 64;
/// Alignment of the send ring inside the region.
const PAGE: usize = 4096;
/// Start PSN of the send queue (any 24-bit value works for UD).
const SEND_PSN: u32 = 0x000a_11ce;
/// `IBV_LINK_LAYER_ETHERNET` (an anonymous enum in verbs.h, so not in the bindings).
const LINK_LAYER_ETHERNET: u8 = 2;
/// Inline sizes tried, largest first, when creating the queue pair.
const INLINE_CANDIDATES: [usize; 6] = [512, 256, 188, 128, 60, 0];
/// Send completions polled per `ibv_poll_cq` call.
const SEND_POLL_BATCH: usize = 16;
/// How long `post_send` busy-polls for send completions before declaring the queue stalled.
const SEND_STALL_TIMEOUT: Duration = Duration::from_secs(2);
/// librdmacm's address-resolution timeout.
const CM_RESOLVE_TIMEOUT_MS: c_int = 2_000;
/// How long to wait for one CM event (a join asks the subnet manager).
const CM_EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The fallback every "unavailable" message points at.
const FALLBACK_HINT: &str = "use --transport shm or --transport udp";

/// Distinguishes the addresses of different transports in one process.
static NEXT_OWNER: AtomicU32 = AtomicU32::new(1);

/// How to open a verbs endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerbsConfig {
    /// Device name as `ibv_devinfo` shows it (`mlx5_0`); `None` takes the first device.
    pub device: Option<String>,
    /// Port number, from 1.
    pub port: u8,
    /// Index into the port's GID table (RoCE v2 over IPv4 usually needs a non-zero one).
    pub gid_index: i32,
    /// Largest payload; at most the port's active MTU.
    pub mtu: usize,
    /// Receive buffers in the ring.
    pub recv_slots: usize,
    /// Most requests (and staging buffers) in one chain.
    pub max_chain: usize,
    /// Q_Key of the queue pair, shared by every endpoint of the cluster.
    pub qkey: u32,
    /// Signal one send completion every this many requests.
    pub signal_every: usize,
    /// Group `g` is joined through the IPv4 multicast address `multicast_base + g`.
    pub multicast_base: Ipv4Addr,
}

impl Default for VerbsConfig {
    fn default() -> Self {
        VerbsConfig {
            device: None,
            port: 1,
            gid_index: 0,
            mtu: 4096,
            recv_slots: 256,
            max_chain: 16,
            qkey: 0x1111_1111,
            signal_every: 32,
            multicast_base: Ipv4Addr::new(239, 255, 0, 0),
        }
    }
}

/// A resolved destination: an index into this transport's address handles plus the remote
/// queue pair number and Q_Key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VerbsAddress {
    owner: u32,
    handle: u32,
    qpn: u32,
    qkey: u32,
}

impl VerbsAddress {
    /// The remote queue pair number (`0xFFFFFF` for a multicast group).
    pub fn qpn(&self) -> u32 {
        self.qpn
    }
}

/// Offsets inside the registered region. Pure arithmetic, checked against overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RegionLayout {
    mtu: usize,
    recv_slots: usize,
    recv_stride: usize,
    send_offset: usize,
    send_stride: usize,
    send_chains: usize,
    max_chain: usize,
    total: usize,
}

fn round_up(value: usize, to: usize) -> Option<usize> {
    value.checked_add(to - 1).map(|sum| sum / to * to)
}

impl RegionLayout {
    fn new(mtu: usize, recv_slots: usize, max_chain: usize, send_chains: usize) -> Option<Self> {
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
    fn recv_slot(&self, slot: usize) -> usize {
        slot * self.recv_stride
    }

    /// Start of the payload in receive slot `slot`.
    fn recv_payload(&self, slot: usize) -> usize {
        self.recv_slot(slot) + GRH_BYTES
    }

    /// Bytes a receive request offers: the GRH room plus one MTU.
    fn recv_len(&self) -> usize {
        GRH_BYTES + self.mtu
    }

    /// Start of staging buffer `index` of chain `chain`.
    fn send_buffer(&self, chain: usize, index: usize) -> usize {
        self.send_offset + (chain * self.max_chain + index) * self.send_stride
    }
}

/// Which receive slots are posted: a ring consumed in order, as a UD receive queue is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RecvRing {
    slots: usize,
    /// Next slot to post (the oldest unposted one).
    next_post: usize,
    /// Slots posted and not yet completed.
    posted: usize,
}

impl RecvRing {
    fn new(slots: usize) -> Self {
        RecvRing {
            slots,
            next_post: 0,
            posted: 0,
        }
    }

    /// The first slot and the number of slots the next `post_recv(count)` covers.
    fn reserve(&self, count: usize) -> (usize, usize) {
        (self.next_post, count.min(self.slots - self.posted))
    }

    /// Records that `count` slots from `next_post` were posted.
    fn commit(&mut self, count: usize) {
        self.next_post = (self.next_post + count) % self.slots;
        self.posted += count;
    }

    /// Records one completion (in order: the oldest posted slot).
    fn complete(&mut self) {
        self.posted = self.posted.saturating_sub(1);
    }
}

/// Send-queue bookkeeping: sequence numbers of posted requests, how far completions have
/// come, and which chain of the send ring each staging buffer was last sent from. Pure logic,
/// so the signaling policy is testable without hardware.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SendTracker {
    /// For each chain of the send ring: one past the sequence number of the last request that
    /// read a staging buffer of that chain (0: none in flight).
    chain_ends: Box<[u64]>,
    /// The chain whose buffers `send_buffer` hands out.
    current: usize,
    /// Sequence number of the next request.
    next_seq: u64,
    /// Every request below this has completed.
    done_seq: u64,
    /// One past the last signaled request posted; completions can reach at most this.
    signaled_seq: u64,
    signal_every: u64,
    /// Uncovered chains (buffers in flight, no signaled request after them) tolerated before
    /// the last request of a chain is signaled.
    force_after: usize,
    /// Send queue depth.
    depth: u64,
}

/// Per-chain state while the requests of one chain are planned.
#[derive(Clone, Copy, Debug)]
struct ChainPlan {
    signaled_seq: u64,
    force_last: bool,
    uses_buffers: bool,
    last_buffered: Option<u64>,
}

impl SendTracker {
    fn new(chains: usize, signal_every: usize, depth: usize) -> Self {
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

    fn outstanding(&self) -> u64 {
        self.next_seq - self.done_seq
    }

    /// Chains other than the current one whose buffers no posted signaled request covers.
    fn uncovered(&self) -> usize {
        self.chain_ends
            .iter()
            .enumerate()
            .filter(|&(chain, &end)| chain != self.current && end > self.signaled_seq)
            .count()
    }

    fn begin_chain(&self) -> ChainPlan {
        ChainPlan {
            signaled_seq: self.signaled_seq,
            force_last: self.uncovered() >= self.force_after,
            uses_buffers: false,
            last_buffered: None,
        }
    }

    /// Plans request `offset` of a chain of `len`; `inline` requests do not hold their staging
    /// buffer. Returns whether the request is signaled. Call for every request in order.
    fn plan(&self, plan: &mut ChainPlan, offset: usize, len: usize, inline: bool) -> bool {
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
    fn commit(&mut self, plan: &ChainPlan, accepted: usize) {
        self.next_seq += accepted as u64;
        self.signaled_seq = plan.signaled_seq;
        self.chain_ends[self.current] = plan.last_buffered.map_or(0, |seq| seq + 1);
    }

    /// Moves to the next chain; returns the sequence number completions must reach before its
    /// buffers may be written.
    fn advance(&mut self) -> u64 {
        self.current = (self.current + 1) % self.chain_ends.len();
        self.chain_ends[self.current]
    }

    /// Whether completions up to `target` can arrive without posting anything more.
    fn reachable(&self, target: u64) -> bool {
        target <= self.signaled_seq
    }

    /// Records a signaled completion for request `seq`: it and everything before it are done.
    fn completed(&mut self, seq: u64) {
        self.done_seq = self.done_seq.max(seq + 1);
    }
}

/// One multicast group this endpoint went through the CM for.
struct GroupJoin {
    group: u16,
    id: *mut rdma_cm_id,
    address: libc::sockaddr_in,
    mgid: [u8; 16],
    mlid: u16,
    /// Whether the queue pair is attached (receives the group's datagrams).
    attached: bool,
    /// Address handle for sending to the group.
    handle: u32,
    qpn: u32,
    /// The Q_Key the CM reported for the group (see the module documentation).
    group_qkey: u32,
}

/// Every raw verbs and CM object, released in [`Drop`] whatever stage construction reached.
/// Null pointers are objects never created.
struct Resources {
    context: *mut ibv_context,
    pd: *mut ibv_pd,
    mr: *mut ibv_mr,
    send_cq: *mut ibv_cq,
    recv_cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    ahs: Vec<*mut ibv_ah>,
    channel: *mut rdma_event_channel,
    groups: Vec<GroupJoin>,
    /// The registered memory; dropped after `Drop::drop` deregistered it.
    region: Option<MmapMut>,
}

impl Resources {
    fn empty() -> Self {
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

/// One RDMA UD endpoint.
pub struct VerbsTransport {
    res: Resources,
    owner: u32,
    device_name: String,
    port: u8,
    gid_index: i32,
    is_roce: bool,
    lid: u16,
    gid: [u8; 16],
    qpn: u32,
    qkey: u32,
    multicast_base: Ipv4Addr,
    caps: Capabilities,
    layout: RegionLayout,
    /// Start of the registered region (owned by `res.region`).
    base: *mut u8,
    lkey: u32,
    /// Cache of unicast address handles: `(lid, gid)` of `res.ahs[handle]`.
    ah_keys: Vec<(u16, [u8; 16], u32)>,
    recv_ring: RecvRing,
    recv_wrs: Box<[ibv_recv_wr]>,
    recv_sges: Box<[ibv_sge]>,
    recv_wcs: Box<[ibv_wc]>,
    send_wrs: Box<[ibv_send_wr]>,
    send_sges: Box<[ibv_sge]>,
    send_wcs: Box<[ibv_wc]>,
    tracker: SendTracker,
    /// Set once the send queue failed; every later `post_send` is refused with it.
    failed: Option<String>,
    recv_errors: u64,
    stats: TransportStats,
}

// SAFETY: every raw pointer refers to verbs/CM objects or memory owned exclusively by this
// value; libibverbs and librdmacm are thread-safe and keep no per-thread state, so the owner
// may move to another thread. Not Sync: posting needs `&mut self`.
unsafe impl Send for VerbsTransport {}

impl std::fmt::Debug for VerbsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTransport")
            .field("device", &self.device_name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("roce", &self.is_roce)
            .field("lid", &self.lid)
            .field("qpn", &self.qpn)
            .field("qkey", &self.qkey)
            .field("caps", &self.caps)
            .field("groups", &self.res.groups.len())
            .field("address_handles", &self.res.ahs.len())
            .field("failed", &self.failed)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// A C string from the library as an owned string (empty for null).
///
/// # Safety
/// `text` is null or points at a NUL-terminated string that stays valid during the call.
unsafe fn c_text(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

fn unavailable(message: impl Into<String>) -> TransportError {
    TransportError::Unavailable(message.into())
}

fn os_error(context: impl Into<String>) -> TransportError {
    TransportError::Io {
        context: context.into(),
        source: io::Error::last_os_error(),
    }
}

fn errno_error(context: impl Into<String>, code: c_int) -> TransportError {
    TransportError::Io {
        context: context.into(),
        source: io::Error::from_raw_os_error(code),
    }
}

fn mtu_bytes(mtu: ibv_mtu::Type) -> usize {
    match mtu {
        ibv_mtu::IBV_MTU_256 => 256,
        ibv_mtu::IBV_MTU_512 => 512,
        ibv_mtu::IBV_MTU_1024 => 1024,
        ibv_mtu::IBV_MTU_2048 => 2048,
        ibv_mtu::IBV_MTU_4096 => 4096,
        _ => 0,
    }
}

fn wc_status_text(status: ibv_wc_status::Type) -> String {
    // SAFETY: ibv_wc_status_str returns a static string for any value.
    unsafe { c_text(ibv_wc_status_str(status)) }
}

fn cm_event_text(event: rdma_cm_event_type::Type) -> String {
    // SAFETY: rdma_event_str returns a static string for any value.
    unsafe { c_text(rdma_event_str(event)) }
}

/// The IPv4 address embedded in an IPv4-mapped GID (`::ffff:a.b.c.d`, RoCE v2).
fn ipv4_of_gid(gid: &[u8; 16]) -> Option<Ipv4Addr> {
    let mapped = gid[..10].iter().all(|&byte| byte == 0) && gid[10] == 0xff && gid[11] == 0xff;
    mapped.then(|| Ipv4Addr::new(gid[12], gid[13], gid[14], gid[15]))
}

/// Network interfaces that belong to `device`'s port, from sysfs: the netdev of the GID
/// entry (RoCE), else the netdevs of the PCI function (IPoIB).
fn device_netdevs(device: &str, port: u8, gid_index: i32) -> Vec<String> {
    let root = format!("/sys/class/infiniband/{device}");
    let mut names = Vec::new();
    if let Ok(name) =
        std::fs::read_to_string(format!("{root}/ports/{port}/gid_attrs/ndevs/{gid_index}"))
    {
        let name = name.trim();
        if !name.is_empty() {
            names.push(name.to_owned());
        }
    }
    if let Ok(entries) = std::fs::read_dir(format!("{root}/device/net")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// The first IPv4 address of any of `interfaces`.
fn interface_ipv4(interfaces: &[String]) -> Option<Ipv4Addr> {
    if interfaces.is_empty() {
        return None;
    }
    let mut list: *mut libc::ifaddrs = ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cursor = list;
    while !cursor.is_null() && found.is_none() {
        // SAFETY: cursor is a node of the list getifaddrs returned, alive until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points at a sockaddr of the list.
        let family = unsafe { (*entry.ifa_addr).sa_family };
        if c_int::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated name owned by the list.
        let name = unsafe { c_text(entry.ifa_name) };
        if interfaces.contains(&name) {
            // SAFETY: family AF_INET means the address is a sockaddr_in.
            let sin = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
            found = Some(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()));
        }
    }
    // SAFETY: list came from getifaddrs and is freed once; no reference into it survives.
    unsafe { libc::freeifaddrs(list) };
    found
}

fn sockaddr_v4(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default(),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Waits for the next CM event of `id` on `channel`; returns the UD parameters it carries
/// when it is of the `expected` kind, and an error message when it is another kind, or
/// nothing came within `timeout`. Events of other ids are acknowledged and skipped.
///
/// # Safety
/// `channel` and `id` are live librdmacm objects and `id` belongs to `channel`.
unsafe fn wait_cm_event(
    channel: *mut rdma_event_channel,
    id: *mut rdma_cm_id,
    expected: rdma_cm_event_type::Type,
    timeout: Duration,
) -> Result<rdma_ud_param, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no {} event within {} s",
                cm_event_text(expected),
                timeout.as_secs()
            ));
        }
        // SAFETY: channel is live per this function's contract.
        let fd = unsafe { (*channel).fd };
        let mut poll_fd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = c_int::try_from(left.as_millis().max(1)).unwrap_or(c_int::MAX);
        // SAFETY: poll_fd is one live pollfd.
        let ready = unsafe { libc::poll(&mut poll_fd, 1, millis) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll on the CM event channel: {error}"));
        }
        if ready == 0 {
            continue;
        }
        let mut event: *mut rdma_cm_event = ptr::null_mut();
        // SAFETY: channel is live; the event is readable (poll said so), so this returns.
        if unsafe { rdma_get_cm_event(channel, &mut event) } != 0 || event.is_null() {
            return Err(format!("rdma_get_cm_event: {}", io::Error::last_os_error()));
        }
        // SAFETY: event is a live event until rdma_ack_cm_event below; we copy what we need.
        let (event_id, kind, status) = unsafe { ((*event).id, (*event).event, (*event).status) };
        // SAFETY: as above; rdma_ud_param is plain data, valid to copy for any event kind
        // (it is only used for MULTICAST_JOIN, where the library filled it).
        let ud = unsafe { (*event).param.ud };
        // SAFETY: event came from rdma_get_cm_event and is acknowledged exactly once.
        unsafe { rdma_ack_cm_event(event) };
        if event_id != id {
            continue;
        }
        if kind == expected {
            return Ok(ud);
        }
        let detail = if status < 0 {
            io::Error::from_raw_os_error(-status).to_string()
        } else {
            format!("status {status}")
        };
        return Err(format!(
            "expected {}, got {} ({detail})",
            cm_event_text(expected),
            cm_event_text(kind)
        ));
    }
}

impl VerbsTransport {
    /// Opens the device, brings a UD queue pair to RTS and registers the buffers.
    pub fn open(config: &VerbsConfig) -> Result<VerbsTransport, TransportError> {
        if config.mtu == 0 || config.mtu > MAX_UD_MTU {
            return Err(unavailable(format!(
                "verbs mtu must be within 1..={MAX_UD_MTU}, got {}",
                config.mtu
            )));
        }
        if config.recv_slots == 0 || u32::try_from(config.recv_slots).is_err() {
            return Err(unavailable(
                "verbs recv_slots must be positive and fit in 32 bits",
            ));
        }
        if config.max_chain == 0 || config.max_chain > usize::from(u16::MAX) + 1 {
            return Err(unavailable("verbs max_chain must be within 1..=65536"));
        }
        if config.port == 0 {
            return Err(unavailable("verbs port numbers start at 1"));
        }
        if config.gid_index < 0 {
            return Err(unavailable(format!(
                "verbs gid_index {} is negative",
                config.gid_index
            )));
        }
        let layout = RegionLayout::new(
            config.mtu,
            config.recv_slots,
            config.max_chain,
            SEND_RING_CHAINS,
        )
        .ok_or_else(|| unavailable("verbs buffer region size overflows"))?;

        let mut res = Resources::empty();
        let device_name = open_device(config.device.as_deref(), &mut res)?;
        let context = res.context;

        // SAFETY: all-zero is a valid ibv_device_attr (plain integers and arrays).
        let mut device_attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: context is live; device_attr is a live out-parameter of the right type.
        let code = unsafe { ibv_query_device(context, &mut device_attr) };
        if code != 0 {
            return Err(errno_error(
                format!("ibv_query_device({device_name})"),
                code,
            ));
        }
        // SAFETY: all-zero is a valid ibv_port_attr (plain integers).
        let mut port_attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: context is live; port_attr is a live out-parameter of the full size.
        let code = unsafe { ___ibv_query_port(context, config.port, &mut port_attr) };
        if code != 0 {
            return Err(unavailable(format!(
                "cannot query port {} of RDMA device {device_name} ({}); {FALLBACK_HINT}",
                config.port,
                io::Error::from_raw_os_error(code)
            )));
        }
        if port_attr.state != ibv_port_state::IBV_PORT_ACTIVE
            && port_attr.state != ibv_port_state::IBV_PORT_ACTIVE_DEFER
        {
            return Err(unavailable(format!(
                "port {} of RDMA device {device_name} is not active (state {}); {FALLBACK_HINT}",
                config.port, port_attr.state
            )));
        }
        let port_mtu = mtu_bytes(port_attr.active_mtu);
        if config.mtu > port_mtu {
            return Err(unavailable(format!(
                "verbs mtu {} exceeds the active MTU {port_mtu} of {device_name} port {}",
                config.mtu, config.port
            )));
        }
        let is_roce = port_attr.link_layer == LINK_LAYER_ETHERNET;
        if config.gid_index >= port_attr.gid_tbl_len {
            return Err(unavailable(format!(
                "gid_index {} is beyond the {} GIDs of {device_name} port {}",
                config.gid_index, port_attr.gid_tbl_len, config.port
            )));
        }
        let mut gid = ibv_gid { raw: [0; 16] };
        // SAFETY: context is live; gid is a live out-parameter.
        let code = unsafe { ibv_query_gid(context, config.port, config.gid_index, &mut gid) };
        if code != 0 {
            return Err(os_error(format!(
                "ibv_query_gid({device_name}, port {}, index {})",
                config.port, config.gid_index
            )));
        }
        // SAFETY: every bit pattern of the union is a valid byte array.
        let gid = unsafe { gid.raw };

        let max_qp_wr = usize::try_from(device_attr.max_qp_wr).unwrap_or(0);
        let max_cqe = usize::try_from(device_attr.max_cqe).unwrap_or(0);
        if config.recv_slots > max_qp_wr || config.recv_slots > max_cqe {
            return Err(unavailable(format!(
                "recv_slots {} exceeds what {device_name} supports (max_qp_wr {max_qp_wr}, \
                 max_cqe {max_cqe})",
                config.recv_slots
            )));
        }
        let wanted_depth = (SEND_RING_CHAINS * config.max_chain)
            .max(config.signal_every.max(1) + config.max_chain);
        let depth = wanted_depth.min(max_qp_wr).min(max_cqe);
        if depth < config.max_chain {
            return Err(unavailable(format!(
                "max_chain {} exceeds the send queue depth {depth} of {device_name}",
                config.max_chain
            )));
        }
        // Completions must free room for a full chain: at most signal_every - 1 requests
        // stay unsignaled, so signal_every - 1 + max_chain <= depth.
        let signal_every = config.signal_every.max(1).min(depth + 1 - config.max_chain);

        // SAFETY: context is live.
        res.pd = unsafe { ibv_alloc_pd(context) };
        if res.pd.is_null() {
            return Err(os_error(format!("ibv_alloc_pd({device_name})")));
        }
        let mut region = MmapMut::map_anon(layout.total)
            .map_err(TransportError::io("mapping the verbs buffer region"))?;
        let base = region.as_mut_ptr();
        res.region = Some(region);
        // SAFETY: pd is live; [base, base + total) is the mapping owned by `res`, which
        // outlives the MR (Resources::drop deregisters before the mapping is dropped).
        res.mr = unsafe {
            ibv_reg_mr(
                res.pd,
                base.cast::<c_void>(),
                layout.total,
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as c_int,
            )
        };
        if res.mr.is_null() {
            return Err(os_error(format!(
                "ibv_reg_mr of {} bytes on {device_name} (is the memlock limit high enough?)",
                layout.total
            )));
        }
        // SAFETY: mr is live.
        let lkey = unsafe { (*res.mr).lkey };

        let send_cqe = c_int::try_from(depth).unwrap_or(c_int::MAX);
        let recv_cqe = c_int::try_from(config.recv_slots).unwrap_or(c_int::MAX);
        // SAFETY: context is live; no completion channel, no context pointer.
        res.send_cq =
            unsafe { ibv_create_cq(context, send_cqe, ptr::null_mut(), ptr::null_mut(), 0) };
        if res.send_cq.is_null() {
            return Err(os_error(format!(
                "ibv_create_cq({device_name}, {send_cqe})"
            )));
        }
        // SAFETY: as above.
        res.recv_cq =
            unsafe { ibv_create_cq(context, recv_cqe, ptr::null_mut(), ptr::null_mut(), 0) };
        if res.recv_cq.is_null() {
            return Err(os_error(format!(
                "ibv_create_cq({device_name}, {recv_cqe})"
            )));
        }

        let max_inline = create_qp(&mut res, depth, config, &device_name)?;
        let qp = res.qp;
        // SAFETY: qp is live.
        let qpn = unsafe { (*qp).qp_num };
        bring_up(qp, config, &device_name)?;

        let slots = config.recv_slots;
        // SAFETY: all-zero is a valid ibv_sge / ibv_recv_wr / ibv_send_wr / ibv_wc (integers,
        // null pointers and unions of such).
        let zeroed_sge = || -> ibv_sge { unsafe { std::mem::zeroed() } };
        let mut recv_sges: Box<[ibv_sge]> = (0..slots).map(|_| zeroed_sge()).collect();
        for (slot, sge) in recv_sges.iter_mut().enumerate() {
            sge.addr = base as u64 + layout.recv_slot(slot) as u64;
            sge.length = u32::try_from(layout.recv_len()).unwrap_or(u32::MAX);
            sge.lkey = lkey;
        }
        // SAFETY: as above.
        let recv_wrs: Box<[ibv_recv_wr]> =
            (0..slots).map(|_| unsafe { std::mem::zeroed() }).collect();
        // SAFETY: as above.
        let recv_wcs: Box<[ibv_wc]> = (0..slots).map(|_| unsafe { std::mem::zeroed() }).collect();
        // SAFETY: as above.
        let send_wrs: Box<[ibv_send_wr]> = (0..config.max_chain)
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let send_sges: Box<[ibv_sge]> = (0..config.max_chain).map(|_| zeroed_sge()).collect();
        // SAFETY: as above.
        let send_wcs: Box<[ibv_wc]> = (0..SEND_POLL_BATCH)
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();

        Ok(VerbsTransport {
            res,
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            device_name,
            port: config.port,
            gid_index: config.gid_index,
            is_roce,
            lid: port_attr.lid,
            gid,
            qpn,
            qkey: config.qkey,
            multicast_base: config.multicast_base,
            caps: Capabilities {
                mtu: config.mtu,
                max_inline: max_inline.min(config.mtu),
                max_chain: config.max_chain,
                recv_slots: config.recv_slots,
            },
            layout,
            base,
            lkey,
            ah_keys: Vec::new(),
            recv_ring: RecvRing::new(slots),
            recv_wrs,
            recv_sges,
            recv_wcs,
            send_wrs,
            send_sges,
            send_wcs,
            tracker: SendTracker::new(SEND_RING_CHAINS, signal_every, depth),
            failed: None,
            recv_errors: 0,
            stats: TransportStats::default(),
        })
    }

    /// The device this endpoint opened.
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// Whether the port runs RoCE (Ethernet link layer) rather than InfiniBand.
    pub fn is_roce(&self) -> bool {
        self.is_roce
    }

    /// Receive completions that came back with an error status (flushes included).
    pub fn recv_errors(&self) -> u64 {
        self.recv_errors
    }

    /// The Q_Key the CM reported for a group this endpoint joined or resolved.
    pub fn multicast_group_qkey(&self, group: MulticastGroup) -> Option<u32> {
        self.res
            .groups
            .iter()
            .find(|join| join.group == group.0)
            .map(|join| join.group_qkey)
    }

    /// Creates an address handle and returns its index.
    fn create_ah(&mut self, attr: &mut ibv_ah_attr) -> Result<u32, TransportError> {
        let handle = u32::try_from(self.res.ahs.len())
            .map_err(|_| unavailable("too many verbs address handles"))?;
        // SAFETY: pd is live; attr is a fully initialized ibv_ah_attr.
        let ah = unsafe { ibv_create_ah(self.res.pd, attr) };
        if ah.is_null() {
            return Err(os_error(format!("ibv_create_ah on {}", self.device_name)));
        }
        self.res.ahs.push(ah);
        Ok(handle)
    }

    fn check_address(&self, address: &VerbsAddress) -> Result<(), TransportError> {
        if address.owner != self.owner || address.handle as usize >= self.res.ahs.len() {
            return Err(TransportError::UnknownPeer(format!(
                "{address:?} was not resolved by this verbs endpoint"
            )));
        }
        Ok(())
    }

    fn group_address(&self, group: MulticastGroup) -> Result<Ipv4Addr, TransportError> {
        let address =
            Ipv4Addr::from(u32::from(self.multicast_base).wrapping_add(u32::from(group.0)));
        if address.is_multicast() {
            Ok(address)
        } else {
            Err(TransportError::Multicast(
                group.0,
                format!("{address} is not a multicast address"),
            ))
        }
    }

    /// Joins `group` through the CM (once) and returns the index of its record.
    fn cm_join(&mut self, group: MulticastGroup) -> Result<usize, TransportError> {
        if let Some(index) = self
            .res
            .groups
            .iter()
            .position(|join| join.group == group.0)
        {
            return Ok(index);
        }
        let group_ip = self.group_address(group)?;
        let fail = |reason: String| TransportError::Multicast(group.0, reason);
        if self.res.channel.is_null() {
            // SAFETY: plain constructor; the result is checked for null.
            self.res.channel = unsafe { rdma_create_event_channel() };
            if self.res.channel.is_null() {
                return Err(fail(format!(
                    "rdma_create_event_channel: {}",
                    io::Error::last_os_error()
                )));
            }
        }
        let mut id: *mut rdma_cm_id = ptr::null_mut();
        // SAFETY: the channel is live; id is an out-parameter.
        let code = unsafe {
            rdma_create_id(
                self.res.channel,
                &mut id,
                ptr::null_mut(),
                rdma_port_space::RDMA_PS_UDP,
            )
        };
        if code != 0 || id.is_null() {
            return Err(fail(format!(
                "rdma_create_id: {}",
                io::Error::last_os_error()
            )));
        }
        // Recorded at once so that Drop destroys the id whatever happens next.
        self.res.groups.push(GroupJoin {
            group: group.0,
            id,
            address: sockaddr_v4(group_ip),
            mgid: [0; 16],
            mlid: 0,
            attached: false,
            handle: u32::MAX,
            qpn: 0,
            group_qkey: 0,
        });
        let index = self.res.groups.len() - 1;
        match self.cm_join_steps(index, group_ip) {
            Ok(()) => Ok(index),
            Err(reason) => {
                if let Some(mut join) = self.res.groups.pop() {
                    // SAFETY: the id is live and owned by this record; leaving a group that
                    // was never joined just fails.
                    unsafe {
                        rdma_leave_multicast(join.id, (&raw mut join.address).cast());
                        rdma_destroy_id(join.id);
                    }
                }
                Err(fail(reason))
            }
        }
    }

    fn cm_join_steps(&mut self, index: usize, group_ip: Ipv4Addr) -> Result<(), String> {
        let id = self.res.groups[index].id;
        let channel = self.res.channel;
        let local_ip = ipv4_of_gid(&self.gid).or_else(|| {
            interface_ipv4(&device_netdevs(
                &self.device_name,
                self.port,
                self.gid_index,
            ))
        });
        let mut source = local_ip.map(sockaddr_v4);
        let source_ptr: *mut libc::sockaddr = source.as_mut().map_or(ptr::null_mut(), |sin| {
            (sin as *mut libc::sockaddr_in).cast()
        });
        let mut destination = sockaddr_v4(group_ip);
        // SAFETY: id is live; the socket addresses live on this frame through the call.
        let code = unsafe {
            rdma_resolve_addr(
                id,
                source_ptr,
                (&raw mut destination).cast(),
                CM_RESOLVE_TIMEOUT_MS,
            )
        };
        if code != 0 {
            return Err(format!(
                "rdma_resolve_addr({group_ip} from {}): {}",
                local_ip.map_or_else(|| "any".to_owned(), |ip| ip.to_string()),
                io::Error::last_os_error()
            ));
        }
        // SAFETY: channel and id are live and id belongs to channel.
        unsafe {
            wait_cm_event(
                channel,
                id,
                rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED,
                CM_EVENT_TIMEOUT,
            )
        }
        .map_err(|reason| format!("resolving {group_ip}: {reason}"))?;
        // SAFETY: after ADDR_RESOLVED the id is bound to a device context (checked non-null).
        let (cm_device, cm_port) = unsafe {
            let verbs = (*id).verbs;
            let name = if verbs.is_null() || (*verbs).device.is_null() {
                String::new()
            } else {
                c_text(ibv_get_device_name((*verbs).device))
            };
            (name, (*id).port_num)
        };
        if cm_device != self.device_name || cm_port != self.port {
            return Err(format!(
                "the CM resolved {group_ip} through {cm_device} port {cm_port}, not {} port {}; \
                 give the device's network interface an IPv4 address and a multicast route",
                self.device_name, self.port
            ));
        }
        // SAFETY: id is live and address-resolved; the address lives in the record.
        let code = unsafe {
            rdma_join_multicast(
                id,
                (&raw mut self.res.groups[index].address).cast(),
                ptr::null_mut(),
            )
        };
        if code != 0 {
            return Err(format!(
                "rdma_join_multicast: {}",
                io::Error::last_os_error()
            ));
        }
        // SAFETY: as above.
        let ud = unsafe {
            wait_cm_event(
                channel,
                id,
                rdma_cm_event_type::RDMA_CM_EVENT_MULTICAST_JOIN,
                CM_EVENT_TIMEOUT,
            )
        }
        .map_err(|reason| format!("joining {group_ip}: {reason}"))?;
        let mut ah_attr = ud.ah_attr;
        ah_attr.port_num = self.port;
        // SAFETY: every bit pattern of the union is a valid byte array.
        let mgid = unsafe { ah_attr.grh.dgid.raw };
        let handle = self
            .create_ah(&mut ah_attr)
            .map_err(|error| error.to_string())?;
        let join = &mut self.res.groups[index];
        join.mgid = mgid;
        join.mlid = ah_attr.dlid;
        join.handle = handle;
        join.qpn = ud.qp_num;
        join.group_qkey = ud.qkey;
        Ok(())
    }

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

/// Opens the named (or first) device into `res.context`; returns its name.
fn open_device(wanted: Option<&str>, res: &mut Resources) -> Result<String, TransportError> {
    let mut count: c_int = 0;
    // SAFETY: count is a live out-parameter; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut count) };
    if list.is_null() {
        return Err(unavailable(format!(
            "no RDMA device found (ibv_get_device_list: {}); {FALLBACK_HINT}",
            io::Error::last_os_error()
        )));
    }
    let count = usize::try_from(count).unwrap_or(0);
    // SAFETY: a non-null list holds `count` device pointers (followed by a null).
    let devices: &[*mut ibv_device] = unsafe { std::slice::from_raw_parts(list, count) };
    // SAFETY: each entry is a live device of the list.
    let names: Vec<String> = devices
        .iter()
        .map(|&device| unsafe { c_text(ibv_get_device_name(device)) })
        .collect();
    let chosen = match wanted {
        None => (!devices.is_empty()).then_some(0),
        Some(name) => names.iter().position(|candidate| candidate == name),
    };
    let result = match chosen {
        None if devices.is_empty() => Err(unavailable(format!(
            "no RDMA device found (ibv_get_device_list: 0 devices); {FALLBACK_HINT}"
        ))),
        None => Err(unavailable(format!(
            "RDMA device `{}` not found; available: {}; {FALLBACK_HINT}",
            wanted.unwrap_or_default(),
            names.join(", ")
        ))),
        Some(index) => {
            // SAFETY: the device pointer is live while the list is.
            res.context = unsafe { ibv_open_device(devices[index]) };
            if res.context.is_null() {
                Err(unavailable(format!(
                    "cannot open RDMA device {} ({}); {FALLBACK_HINT}",
                    names[index],
                    io::Error::last_os_error()
                )))
            } else {
                Ok(names[index].clone())
            }
        }
    };
    // SAFETY: the list came from ibv_get_device_list; an opened context stays valid after
    // the list is freed, and no reference into the list survives (names were copied).
    unsafe { ibv_free_device_list(list) };
    result
}

/// Creates the UD queue pair, trying smaller inline sizes until the device accepts one;
/// returns the inline size the queue pair really has.
fn create_qp(
    res: &mut Resources,
    depth: usize,
    config: &VerbsConfig,
    device: &str,
) -> Result<usize, TransportError> {
    let mut last_error = io::Error::from_raw_os_error(libc::EINVAL);
    for inline in INLINE_CANDIDATES.iter().map(|&size| size.min(config.mtu)) {
        // SAFETY: all-zero is a valid ibv_qp_init_attr (null pointers and integers).
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = res.send_cq;
        init.recv_cq = res.recv_cq;
        init.qp_type = ibv_qp_type::IBV_QPT_UD;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = u32::try_from(depth).unwrap_or(u32::MAX);
        init.cap.max_recv_wr = u32::try_from(config.recv_slots).unwrap_or(u32::MAX);
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.cap.max_inline_data = u32::try_from(inline).unwrap_or(0);
        // SAFETY: pd and both CQs are live; init is fully initialized.
        let qp = unsafe { ibv_create_qp(res.pd, &mut init) };
        if qp.is_null() {
            last_error = io::Error::last_os_error();
            continue;
        }
        res.qp = qp;
        // SAFETY: all-zero is valid for both (integers, null pointers, unions of such).
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut queried: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        let mask = ibv_qp_attr_mask::IBV_QP_CAP.0 as c_int;
        // SAFETY: qp is live; attr and queried are live out-parameters.
        let code = unsafe { ibv_query_qp(qp, &mut attr, mask, &mut queried) };
        let actual = if code == 0 {
            queried.cap.max_inline_data
        } else {
            init.cap.max_inline_data
        };
        return Ok(actual as usize);
    }
    Err(TransportError::Io {
        context: format!("ibv_create_qp(UD) on {device}"),
        source: last_error,
    })
}

/// Moves the UD queue pair through INIT and RTR to RTS.
fn bring_up(qp: *mut ibv_qp, config: &VerbsConfig, device: &str) -> Result<(), TransportError> {
    let steps: [(ibv_qp_state::Type, ibv_qp_attr_mask, &str); 3] = [
        (
            ibv_qp_state::IBV_QPS_INIT,
            ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ibv_qp_attr_mask::IBV_QP_PORT
                | ibv_qp_attr_mask::IBV_QP_QKEY,
            "INIT",
        ),
        (
            ibv_qp_state::IBV_QPS_RTR,
            ibv_qp_attr_mask::IBV_QP_STATE,
            "RTR",
        ),
        (
            ibv_qp_state::IBV_QPS_RTS,
            ibv_qp_attr_mask::IBV_QP_STATE | ibv_qp_attr_mask::IBV_QP_SQ_PSN,
            "RTS",
        ),
    ];
    for (state, mask, name) in steps {
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = state;
        attr.pkey_index = 0;
        attr.port_num = config.port;
        attr.qkey = config.qkey;
        attr.sq_psn = SEND_PSN;
        // SAFETY: qp is live; attr is initialized for every field the mask names.
        let code = unsafe { ibv_modify_qp(qp, &mut attr, mask.0 as c_int) };
        if code != 0 {
            return Err(errno_error(
                format!("ibv_modify_qp(UD -> {name}) on {device}"),
                code,
            ));
        }
    }
    Ok(())
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
        let EndpointAddress::Verbs {
            lid,
            gid,
            qpn,
            qkey,
        } = *peer
        else {
            return Err(TransportError::ForeignEndpoint(*peer));
        };
        if let Some(&(_, _, handle)) = self
            .ah_keys
            .iter()
            .find(|(known_lid, known_gid, _)| *known_lid == lid && *known_gid == gid)
        {
            return Ok(VerbsAddress {
                owner: self.owner,
                handle,
                qpn,
                qkey,
            });
        }
        let global = self.is_roce || gid.iter().any(|&byte| byte != 0);
        let mut attr = ibv_ah_attr {
            grh: ibv_global_route {
                dgid: ibv_gid { raw: gid },
                flow_label: 0,
                sgid_index: u8::try_from(self.gid_index).unwrap_or(0),
                hop_limit: 64,
                traffic_class: 0,
            },
            dlid: lid,
            sl: 0,
            src_path_bits: 0,
            static_rate: 0,
            is_global: u8::from(global),
            port_num: self.port,
        };
        let handle = self.create_ah(&mut attr)?;
        self.ah_keys.push((lid, gid, handle));
        Ok(VerbsAddress {
            owner: self.owner,
            handle,
            qpn,
            qkey,
        })
    }

    fn join_multicast(&mut self, group: MulticastGroup) -> Result<(), TransportError> {
        let index = self.cm_join(group)?;
        let join = &self.res.groups[index];
        if join.attached {
            return Ok(());
        }
        let gid = ibv_gid { raw: join.mgid };
        // SAFETY: the QP is live; gid/lid come from the CM's join of this group.
        let code = unsafe { ibv_attach_mcast(self.res.qp, &gid, join.mlid) };
        if code != 0 {
            return Err(TransportError::Multicast(
                group.0,
                format!("ibv_attach_mcast: {}", io::Error::from_raw_os_error(code)),
            ));
        }
        self.res.groups[index].attached = true;
        Ok(())
    }

    fn multicast_address(&mut self, group: MulticastGroup) -> Result<VerbsAddress, TransportError> {
        let index = self.cm_join(group)?;
        let join = &self.res.groups[index];
        // The configured Q_Key, not the group's: see the module documentation.
        Ok(VerbsAddress {
            owner: self.owner,
            handle: join.handle,
            qpn: join.qpn,
            qkey: self.qkey,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_unavailable_with_hint(result: Result<VerbsTransport, TransportError>) {
        match result {
            Err(TransportError::Unavailable(message)) => {
                eprintln!("{message}");
                assert!(message.contains("shm"), "{message}");
                assert!(message.contains("udp"), "{message}");
            }
            Err(other) => panic!("expected Unavailable, got {other}"),
            Ok(transport) => panic!("a device named like this should not exist: {transport:?}"),
        }
    }

    #[test]
    fn missing_device_is_unavailable_and_names_the_fallbacks() {
        let config = VerbsConfig {
            device: Some("rzab-no-such-device".to_owned()),
            ..VerbsConfig::default()
        };
        assert_unavailable_with_hint(VerbsTransport::open(&config));
    }

    #[test]
    fn first_device_opens_or_is_unavailable() {
        match VerbsTransport::open(&VerbsConfig::default()) {
            // A machine with RDMA: the endpoint must publish a verbs address.
            Ok(transport) => {
                assert!(matches!(
                    transport.local_address(),
                    EndpointAddress::Verbs { .. }
                ));
            }
            Err(TransportError::Unavailable(message)) if message.starts_with("no RDMA device") => {
                // No RDMA at all (ENOSYS on this build machine): the hint must be there.
                assert!(
                    message.contains("shm") && message.contains("udp"),
                    "{message}"
                );
            }
            // A device whose port or limits do not fit the default configuration.
            Err(other) => eprintln!("verbs device present but not usable by default: {other}"),
        }
    }

    #[test]
    fn invalid_configurations_are_refused_before_touching_a_device() {
        for config in [
            VerbsConfig {
                mtu: 0,
                ..VerbsConfig::default()
            },
            VerbsConfig {
                mtu: MAX_UD_MTU + 1,
                ..VerbsConfig::default()
            },
            VerbsConfig {
                recv_slots: 0,
                ..VerbsConfig::default()
            },
            VerbsConfig {
                max_chain: 0,
                ..VerbsConfig::default()
            },
            VerbsConfig {
                max_chain: 70_000,
                ..VerbsConfig::default()
            },
            VerbsConfig {
                port: 0,
                ..VerbsConfig::default()
            },
            VerbsConfig {
                gid_index: -1,
                ..VerbsConfig::default()
            },
        ] {
            assert!(
                matches!(
                    VerbsTransport::open(&config),
                    Err(TransportError::Unavailable(_))
                ),
                "{config:?}"
            );
        }
    }

    #[test]
    fn default_config_matches_the_documented_values() {
        let config = VerbsConfig::default();
        assert_eq!(config.device, None);
        assert_eq!(config.port, 1);
        assert_eq!(config.gid_index, 0);
        assert_eq!(config.qkey, 0x1111_1111);
        assert_eq!(config.multicast_base, Ipv4Addr::new(239, 255, 0, 0));
        assert!(config.signal_every > 0 && config.max_chain > 0 && config.recv_slots > 0);
    }

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

    #[test]
    fn ffi_layouts_match_the_c_abi() {
        // rdma-sys hand-writes these union-bearing structs; check them against verbs.h.
        assert_eq!(std::mem::size_of::<ibv_wc>(), 48);
        assert_eq!(std::mem::size_of::<ibv_send_wr>(), 128);
        assert_eq!(std::mem::size_of::<ibv_recv_wr>(), 32);
        assert_eq!(std::mem::size_of::<ibv_sge>(), 16);
        assert_eq!(std::mem::size_of::<ibv_ah_attr>(), 32);
        assert_eq!(std::mem::size_of::<rdma_ud_param>(), 56);
        assert_eq!(std::mem::size_of::<ibv_gid>(), 16);
    }

    #[test]
    fn helpers_decode_mtu_and_mapped_gids() {
        assert_eq!(mtu_bytes(ibv_mtu::IBV_MTU_1024), 1024);
        assert_eq!(mtu_bytes(ibv_mtu::IBV_MTU_4096), 4096);
        assert_eq!(mtu_bytes(99), 0);
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[10, 0, 0, 7]);
        assert_eq!(ipv4_of_gid(&gid), Some(Ipv4Addr::new(10, 0, 0, 7)));
        let link_local = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(ipv4_of_gid(&link_local), None);
        assert!(interface_ipv4(&[]).is_none());
        assert!(device_netdevs("rzab-no-such-device", 1, 0).is_empty());
    }
}
