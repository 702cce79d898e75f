//! Multicast join: a group's IPv4 address, the local address the CM resolves it from (GID or
//! sysfs netdev), the librdmacm join through the subnet manager, the group's address handle,
//! and the queue pair's attach.
//!
//! May touch: the endpoint's CM event channel and one `RDMA_PS_UDP` CM id per group (stored in
//! `Resources`, which leaves and destroys them), `ibv_attach_mcast` on the queue pair,
//! `getifaddrs` and `/sys/class/infiniband` (read only). Nothing on the data path.

use std::ffi::c_int;
use std::io;
use std::net::Ipv4Addr;
use std::ptr;
use std::time::{Duration, Instant};

use rdma_sys::{
    ibv_attach_mcast, ibv_get_device_name, ibv_gid, rdma_ack_cm_event, rdma_cm_event,
    rdma_cm_event_type, rdma_cm_id, rdma_create_event_channel, rdma_create_id, rdma_destroy_id,
    rdma_event_channel, rdma_get_cm_event, rdma_join_multicast, rdma_leave_multicast,
    rdma_port_space, rdma_resolve_addr, rdma_ud_param,
};

use super::VerbsTransport;
use super::address::{VerbsAddress, ipv4_of_gid};
use super::ffi::{c_text, cm_event_text};
use super::resources::GroupJoin;
use crate::transport::{MulticastGroup, TransportError};

/// librdmacm's address-resolution timeout.
pub(super) const CM_RESOLVE_TIMEOUT_MS: c_int = 2_000;
/// How long to wait for one CM event (a join asks the subnet manager).
pub(super) const CM_EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Network interfaces that belong to `device`'s port, from sysfs: the netdev of the GID
/// entry (RoCE), else the netdevs of the PCI function (IPoIB).
pub(super) fn device_netdevs(device: &str, port: u8, gid_index: i32) -> Vec<String> {
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
pub(super) fn interface_ipv4(interfaces: &[String]) -> Option<Ipv4Addr> {
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

pub(super) fn sockaddr_v4(ip: Ipv4Addr) -> libc::sockaddr_in {
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
pub(super) unsafe fn wait_cm_event(
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

    /// Joins `group` through the CM and attaches the queue pair, so it receives the group.
    pub(super) fn attach_group(&mut self, group: MulticastGroup) -> Result<(), TransportError> {
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

    /// The address that reaches every member of `group` (joining through the CM first).
    pub(super) fn group_destination(
        &mut self,
        group: MulticastGroup,
    ) -> Result<VerbsAddress, TransportError> {
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
}
