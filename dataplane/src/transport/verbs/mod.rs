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
//!
//! # Where things are
//!
//! Setup is kept apart from the data path, as eRPC keeps it:
//! - `setup`: [`VerbsTransport::open`]: device discovery, port and limit checks, the protection
//!   domain, registered region, completion queues and queue pair brought to RTS;
//! - `resources`: ownership of every raw verbs and CM object, and its release in [`Drop`];
//! - `address`: address handles for unicast peers, and what a [`VerbsAddress`] carries;
//! - `multicast`: joining a group through the CM and attaching the queue pair to it;
//! - `datapath`: the [`Transport`] implementation: posting sends and receives, reaping
//!   completions;
//! - `bookkeeping`: the pure arithmetic and ring logic the data path relies on (region layout,
//!   receive ring, send tracker), tested without hardware;
//! - `ffi`: small helpers around the C libraries (C strings, errno, enum names).
//!
//! This file holds the public face (configuration, the transport type and its accessors); it
//! calls no verbs function itself.

mod address;
mod bookkeeping;
mod datapath;
mod ffi;
mod multicast;
mod resources;
mod setup;

use std::net::Ipv4Addr;

use rdma_sys::{ibv_recv_wr, ibv_send_wr, ibv_sge, ibv_wc};

pub use address::VerbsAddress;
use bookkeeping::{RecvRing, RegionLayout, SendTracker};
use resources::Resources;

use super::{Capabilities, MulticastGroup, TransportStats};

/// Bytes a UD receive reserves for the global route header in front of the payload.
pub const GRH_BYTES: usize = 40;
/// Chains' worth of staging buffers in the send ring.
pub const SEND_RING_CHAINS: usize = 8;
/// Largest UD payload any port supports (the 4096-byte IB MTU).
pub const MAX_UD_MTU: usize = 4096;
/// The fallback every "unavailable" message points at.
const FALLBACK_HINT: &str = "use --transport shm or --transport udp";

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

impl VerbsTransport {
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
}

#[cfg(test)]
mod tests {
    use rdma_sys::{ibv_ah_attr, ibv_gid, ibv_mtu, rdma_ud_param};

    use super::address::ipv4_of_gid;
    use super::ffi::mtu_bytes;
    use super::multicast::{device_netdevs, interface_ipv4};
    use super::*;

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
