//! Address handling: the [`VerbsAddress`] a resolved destination is, the address handles
//! behind unicast peers (one per `(lid, gid)`, cached), and the check that an address was
//! resolved by this endpoint.
//!
//! May touch: `ibv_create_ah` on the endpoint's protection domain (the handles are stored in
//! `Resources::ahs`, which releases them), and the endpoint's address-handle cache.

use std::net::Ipv4Addr;
use std::sync::atomic::AtomicU32;

use rdma_sys::{ibv_ah_attr, ibv_create_ah, ibv_gid, ibv_global_route};
use rzab_shared::EndpointAddress;

use super::VerbsTransport;
use super::ffi::{os_error, unavailable};
use crate::transport::TransportError;

/// Distinguishes the addresses of different transports in one process.
pub(super) static NEXT_OWNER: AtomicU32 = AtomicU32::new(1);

/// A resolved destination: an index into this transport's address handles plus the remote
/// queue pair number and Q_Key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VerbsAddress {
    pub(super) owner: u32,
    pub(super) handle: u32,
    pub(super) qpn: u32,
    pub(super) qkey: u32,
}

impl VerbsAddress {
    /// The remote queue pair number (`0xFFFFFF` for a multicast group).
    pub fn qpn(&self) -> u32 {
        self.qpn
    }
}

/// The IPv4 address embedded in an IPv4-mapped GID (`::ffff:a.b.c.d`, RoCE v2).
pub(super) fn ipv4_of_gid(gid: &[u8; 16]) -> Option<Ipv4Addr> {
    let mapped = gid[..10].iter().all(|&byte| byte == 0) && gid[10] == 0xff && gid[11] == 0xff;
    mapped.then(|| Ipv4Addr::new(gid[12], gid[13], gid[14], gid[15]))
}

impl VerbsTransport {
    /// Creates an address handle and returns its index.
    pub(super) fn create_ah(&mut self, attr: &mut ibv_ah_attr) -> Result<u32, TransportError> {
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

    pub(super) fn check_address(&self, address: &VerbsAddress) -> Result<(), TransportError> {
        if address.owner != self.owner || address.handle as usize >= self.res.ahs.len() {
            return Err(TransportError::UnknownPeer(format!(
                "{address:?} was not resolved by this verbs endpoint"
            )));
        }
        Ok(())
    }

    /// Resolves a peer's published address to an address handle (one per `(lid, gid)`,
    /// cached); the remote QPN and Q_Key travel in the returned address.
    pub(super) fn resolve_peer(
        &mut self,
        peer: &EndpointAddress,
    ) -> Result<VerbsAddress, TransportError> {
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
}
