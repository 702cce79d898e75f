//! Device discovery and setup: [`VerbsTransport::open`] checks the configuration, finds and
//! opens the device, checks its port (state, MTU, GID) and limits, and creates the protection
//! domain, the registered region, both completion queues and the UD queue pair, brought
//! through INIT and RTR to RTS; the work-request arrays of the data path are built here once.
//!
//! May touch: the device list, `ibv_open_device`, the query functions, and the creation of
//! the objects listed, each stored in `Resources` as soon as it exists so that a failure
//! releases what was made. It posts nothing.

use std::ffi::{c_int, c_void};
use std::io;
use std::ptr;
use std::sync::atomic::Ordering;

use memmap2::MmapMut;
use rdma_sys::{
    ___ibv_query_port, ibv_access_flags, ibv_alloc_pd, ibv_create_cq, ibv_create_qp, ibv_device,
    ibv_device_attr, ibv_free_device_list, ibv_get_device_list, ibv_get_device_name, ibv_gid,
    ibv_modify_qp, ibv_open_device, ibv_port_attr, ibv_port_state, ibv_qp, ibv_qp_attr,
    ibv_qp_attr_mask, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type, ibv_query_device, ibv_query_gid,
    ibv_query_qp, ibv_recv_wr, ibv_reg_mr, ibv_send_wr, ibv_sge, ibv_wc,
};

use super::address::NEXT_OWNER;
use super::bookkeeping::{RecvRing, RegionLayout, SendTracker};
use super::datapath::SEND_POLL_BATCH;
use super::ffi::{c_text, errno_error, mtu_bytes, os_error, unavailable};
use super::resources::Resources;
use super::{FALLBACK_HINT, MAX_UD_MTU, SEND_RING_CHAINS, VerbsConfig, VerbsTransport};
use crate::transport::{Capabilities, TransportError, TransportStats};

/// Start PSN of the send queue (any 24-bit value works for UD).
pub(super) const SEND_PSN: u32 = 0x000a_11ce;
/// `IBV_LINK_LAYER_ETHERNET` (an anonymous enum in verbs.h, so not in the bindings).
pub(super) const LINK_LAYER_ETHERNET: u8 = 2;
/// Inline sizes tried, largest first, when creating the queue pair.
pub(super) const INLINE_CANDIDATES: [usize; 6] = [512, 256, 188, 128, 60, 0];

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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rzab_shared::EndpointAddress;

    use super::*;
    use crate::transport::Transport;

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
}
