//! Kernel UDP transport: the correctness path where there is no RDMA, and the one that runs
//! between network namespaces for multi-host tests on one machine.
//!
//! Sends go out with one `sendmmsg` per chain (the doorbell); receives come in with
//! `recvmmsg` straight into the posted slots of the receive ring. Multicast uses IPv4 groups
//! (`multicast_base + group`) on one port, always with the outgoing interface set
//! (`IP_MULTICAST_IF`) to the endpoint's own address, and one extra socket per joined group
//! bound to the group address. Loopback of our own multicast is filtered by source address,
//! so a sender never receives its own broadcast, as on a UD NIC.
//!
//! UD semantics over a kernel socket: datagrams wait in the socket buffer until polled; when
//! the endpoint polls with no posted receive, whatever waits is drained and counted as dropped.
//! This module touches only its sockets.

#![allow(
    clippy::cast_possible_truncation,
    reason = "lengths, slot indices and counts here are bounded by the MTU, ring and chain sizes checked when the transport is opened, all far below 2^32"
)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};

use rzab_shared::EndpointAddress;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{
    Capabilities, Destination, MulticastGroup, RecvCompletion, SendRequest, Transport,
    TransportError, TransportStats, validate_chain,
};

/// Most datagrams per `sendmmsg`/`recvmmsg` call.
const MAX_MMSG: usize = 64;
/// Largest UDP payload over IPv4.
const MAX_UDP_PAYLOAD: usize = 65_507;

/// How to open a UDP endpoint.
#[derive(Clone, Debug)]
pub struct UdpConfig {
    /// Address to bind; port 0 picks a free one.
    pub bind: SocketAddrV4,
    /// Group `g` is `multicast_base + g`.
    pub multicast_base: Ipv4Addr,
    /// The UDP port every multicast group uses.
    pub multicast_port: u16,
    pub mtu: usize,
    pub recv_slots: usize,
    pub max_chain: usize,
    /// Kernel socket buffer size in bytes.
    pub socket_buffer: usize,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            bind: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            multicast_base: Ipv4Addr::new(239, 255, 0, 0),
            multicast_port: 47_000,
            mtu: 4096,
            recv_slots: 256,
            max_chain: 32,
            socket_buffer: 4 << 20,
        }
    }
}

/// A destination: an IPv4 socket address (a peer, or a group at the multicast port).
pub type UdpAddress = SocketAddrV4;

/// One kernel UDP endpoint.
#[derive(Debug)]
pub struct UdpTransport {
    socket: Socket,
    local: SocketAddrV4,
    config: UdpConfig,
    /// `(group, socket)` for every joined group.
    group_sockets: Vec<(u16, Socket)>,
    staging: Vec<u8>,
    ring: Vec<u8>,
    /// Next position to poll (= next to fill, since polling fills synchronously).
    head: u64,
    posted_limit: u64,
    /// Lengths of the datagrams the current `recvmmsg` kept, by offset from `head`.
    received_lengths: [u32; MAX_MMSG],
    /// Where drained datagrams go.
    scratch: Vec<u8>,
    stats: TransportStats,
}

fn sockaddr_in(address: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: address.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(address.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr_in(raw: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(raw.sin_addr.s_addr.to_ne_bytes()),
        u16::from_be(raw.sin_port),
    )
}

impl UdpTransport {
    /// Binds the endpoint.
    pub fn open(config: &UdpConfig) -> Result<Self, TransportError> {
        if config.mtu == 0 || config.mtu > MAX_UDP_PAYLOAD {
            return Err(TransportError::Unavailable(format!(
                "udp mtu must be within 1..={MAX_UDP_PAYLOAD}, got {}",
                config.mtu
            )));
        }
        if config.max_chain == 0 || config.max_chain > MAX_MMSG || config.recv_slots == 0 {
            return Err(TransportError::Unavailable(format!(
                "udp max_chain must be within 1..={MAX_MMSG} and recv_slots positive"
            )));
        }
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .map_err(TransportError::io("creating udp socket"))?;
        socket
            .set_nonblocking(true)
            .map_err(TransportError::io("udp nonblocking"))?;
        // Buffer sizes are a hint the kernel may clamp; failing to raise them is not fatal.
        let _ = socket.set_recv_buffer_size(config.socket_buffer);
        let _ = socket.set_send_buffer_size(config.socket_buffer);
        socket
            .bind(&SockAddr::from(config.bind))
            .map_err(TransportError::io(format!("binding udp {}", config.bind)))?;
        socket
            .set_multicast_if_v4(config.bind.ip())
            .map_err(TransportError::io(format!(
                "IP_MULTICAST_IF {}",
                config.bind.ip()
            )))?;
        socket
            .set_multicast_loop_v4(true)
            .map_err(TransportError::io("IP_MULTICAST_LOOP"))?;
        socket
            .set_multicast_ttl_v4(1)
            .map_err(TransportError::io("IP_MULTICAST_TTL"))?;
        let local = socket
            .local_addr()
            .map_err(TransportError::io("udp local address"))?
            .as_socket_ipv4()
            .ok_or_else(|| TransportError::Unavailable("udp socket is not IPv4".into()))?;
        Ok(UdpTransport {
            socket,
            local,
            config: config.clone(),
            group_sockets: Vec::with_capacity(8),
            staging: vec![0; config.max_chain * config.mtu],
            ring: vec![0; config.recv_slots * config.mtu],
            head: 0,
            posted_limit: 0,
            received_lengths: [0; MAX_MMSG],
            scratch: vec![0; MAX_UDP_PAYLOAD],
            stats: TransportStats::default(),
        })
    }

    /// The bound address.
    pub fn local_socket_address(&self) -> SocketAddrV4 {
        self.local
    }

    fn group_address(&self, group: MulticastGroup) -> Result<Ipv4Addr, TransportError> {
        let base = u32::from(self.config.multicast_base);
        let address = Ipv4Addr::from(base.wrapping_add(u32::from(group.0)));
        if address.is_multicast() {
            Ok(address)
        } else {
            Err(TransportError::Multicast(
                group.0,
                format!("{address} is not a multicast address"),
            ))
        }
    }

    /// Receives into ring positions `[head, head + count)` from one socket; returns how many
    /// datagrams arrived (datagrams looped back from ourselves excluded).
    fn receive_into_ring(&mut self, fd: RawFd, count: usize, filter_self: bool) -> usize {
        let count = count.min(MAX_MMSG);
        if count == 0 {
            return 0;
        }
        let mtu = self.config.mtu;
        let slots = self.config.recv_slots as u64;
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut headers: [libc::mmsghdr; MAX_MMSG] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut iovecs: [libc::iovec; MAX_MMSG] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut sources: [libc::sockaddr_in; MAX_MMSG] = unsafe { std::mem::zeroed() };
        let ring = self.ring.as_mut_ptr();
        for index in 0..count {
            let slot = usize::try_from((self.head + index as u64) % slots).unwrap_or(0);
            // SAFETY: slot < recv_slots, so the range lies inside the ring allocation.
            iovecs[index].iov_base = unsafe { ring.add(slot * mtu) }.cast();
            iovecs[index].iov_len = mtu;
            headers[index].msg_hdr.msg_iov = &mut iovecs[index];
            headers[index].msg_hdr.msg_iovlen = 1;
            headers[index].msg_hdr.msg_name = (&raw mut sources[index]).cast();
            headers[index].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        }
        // SAFETY: headers[..count] point at live iovecs, ring slots and source buffers owned by
        // this frame or by `self`, sized as declared; the call writes only within them.
        let received = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                count as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let Ok(received) = usize::try_from(received) else {
            return 0;
        };
        let mut kept = 0;
        for index in 0..received {
            if filter_self && from_sockaddr_in(&sources[index]) == self.local {
                continue;
            }
            let len = headers[index].msg_len as usize;
            if headers[index].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                // Larger than our MTU: a peer with another configuration, or garbage.
                self.stats.dropped_malformed += 1;
                continue;
            }
            if kept != index {
                let from = usize::try_from((self.head + index as u64) % slots).unwrap_or(0) * mtu;
                let to = usize::try_from((self.head + kept as u64) % slots).unwrap_or(0) * mtu;
                self.ring.copy_within(from..from + len.min(mtu), to);
            }
            self.received_lengths[kept] = len.min(mtu) as u32;
            kept += 1;
        }
        kept
    }

    /// Reads and discards everything queued on one socket; returns how many were discarded.
    fn drain(&mut self, fd: RawFd, filter_self: bool) -> u64 {
        let mut dropped = 0;
        loop {
            // SAFETY: all-zero is a valid sockaddr_in.
            let mut source: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            let mut source_len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: scratch is a live buffer of the given length; source is a live
            // sockaddr_in whose size is passed in source_len.
            let received = unsafe {
                libc::recvfrom(
                    fd,
                    self.scratch.as_mut_ptr().cast(),
                    self.scratch.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut source).cast(),
                    &mut source_len,
                )
            };
            if received < 0 {
                return dropped;
            }
            if !(filter_self && from_sockaddr_in(&source) == self.local) {
                dropped += 1;
            }
        }
    }
}

impl Transport for UdpTransport {
    type Address = UdpAddress;

    fn caps(&self) -> Capabilities {
        Capabilities {
            mtu: self.config.mtu,
            max_inline: self.config.mtu,
            max_chain: self.config.max_chain,
            recv_slots: self.config.recv_slots,
        }
    }

    fn local_address(&self) -> EndpointAddress {
        EndpointAddress::Udp {
            ip: *self.local.ip(),
            port: self.local.port(),
        }
    }

    fn resolve(&mut self, peer: &EndpointAddress) -> Result<UdpAddress, TransportError> {
        match *peer {
            EndpointAddress::Udp { ip, port } => Ok(SocketAddrV4::new(ip, port)),
            other => Err(TransportError::ForeignEndpoint(other)),
        }
    }

    fn join_multicast(&mut self, group: MulticastGroup) -> Result<(), TransportError> {
        if self
            .group_sockets
            .iter()
            .any(|(joined, _)| *joined == group.0)
        {
            return Ok(());
        }
        let address = self.group_address(group)?;
        let context = format!(
            "joining multicast group {address}:{}",
            self.config.multicast_port
        );
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .map_err(TransportError::io(context.clone()))?;
        socket
            .set_reuse_address(true)
            .map_err(TransportError::io(context.clone()))?;
        socket
            .set_nonblocking(true)
            .map_err(TransportError::io(context.clone()))?;
        let _ = socket.set_recv_buffer_size(self.config.socket_buffer);
        socket
            .bind(&SockAddr::from(SocketAddrV4::new(
                address,
                self.config.multicast_port,
            )))
            .map_err(TransportError::io(context.clone()))?;
        socket
            .join_multicast_v4(&address, self.local.ip())
            .map_err(TransportError::io(context))?;
        self.group_sockets.push((group.0, socket));
        Ok(())
    }

    fn multicast_address(&mut self, group: MulticastGroup) -> Result<UdpAddress, TransportError> {
        Ok(SocketAddrV4::new(
            self.group_address(group)?,
            self.config.multicast_port,
        ))
    }

    fn send_buffer(&mut self, index: usize) -> &mut [u8] {
        let mtu = self.config.mtu;
        let index = index.min(self.config.max_chain - 1);
        &mut self.staging[index * mtu..(index + 1) * mtu]
    }

    fn post_send(&mut self, chain: &[SendRequest<UdpAddress>]) -> Result<usize, TransportError> {
        if let Err(error) = validate_chain(chain, &self.caps()) {
            self.stats.sends_refused += 1;
            return Err(error);
        }
        let count = chain.len();
        if count == 0 {
            return Ok(0);
        }
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut headers: [libc::mmsghdr; MAX_MMSG] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut iovecs: [libc::iovec; MAX_MMSG] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut destinations: [libc::sockaddr_in; MAX_MMSG] = unsafe { std::mem::zeroed() };
        let mtu = self.config.mtu;
        for (index, request) in chain.iter().enumerate() {
            let address = match request.destination {
                Destination::Unicast(address) | Destination::Multicast(address) => address,
            };
            destinations[index] = sockaddr_in(address);
            // SAFETY: validate_chain checked buffer < max_chain and len <= mtu, so the range
            // lies inside the staging allocation.
            iovecs[index].iov_base = unsafe {
                self.staging
                    .as_mut_ptr()
                    .add(usize::from(request.buffer) * mtu)
            }
            .cast();
            iovecs[index].iov_len = request.len as usize;
            headers[index].msg_hdr.msg_iov = &mut iovecs[index];
            headers[index].msg_hdr.msg_iovlen = 1;
            headers[index].msg_hdr.msg_name = (&raw mut destinations[index]).cast();
            headers[index].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        }
        let mut sent = 0;
        while sent < count {
            // SAFETY: headers[sent..count] point at live iovecs, staging ranges and addresses.
            let result = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    headers.as_mut_ptr().add(sent),
                    (count - sent) as u32,
                    0,
                )
            };
            match usize::try_from(result) {
                Ok(0) | Err(_) => {
                    let error = std::io::Error::last_os_error();
                    if error.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    // A full socket buffer or an unreachable peer loses the datagram, as a
                    // UD send to nowhere would: count it as sent-but-lost and carry on.
                    sent += 1;
                }
                Ok(done) => sent += done,
            }
        }
        self.stats.datagrams_sent += count as u64;
        self.stats.doorbells += 1;
        Ok(count)
    }

    fn post_recv(&mut self, count: usize) -> usize {
        let ring = self.config.recv_slots as u64;
        let unposted = ring - (self.posted_limit - self.head);
        let granted = (count as u64).min(unposted);
        self.posted_limit += granted;
        usize::try_from(granted).unwrap_or(0)
    }

    fn posted_recvs(&self) -> usize {
        usize::try_from(self.posted_limit - self.head).unwrap_or(0)
    }

    fn poll_recv(&mut self, out: &mut [RecvCompletion]) -> usize {
        let unicast_fd = self.socket.as_raw_fd();
        if self.posted_limit == self.head {
            let mut dropped = self.drain(unicast_fd, false);
            for index in 0..self.group_sockets.len() {
                let fd = self.group_sockets[index].1.as_raw_fd();
                dropped += self.drain(fd, true);
            }
            self.stats.dropped_no_recv += dropped;
            return 0;
        }
        let slots = self.config.recv_slots as u64;
        let mut completed = 0;
        let mut source = 0;
        while completed < out.len() && source <= self.group_sockets.len() {
            let room = usize::try_from(self.posted_limit - self.head)
                .unwrap_or(0)
                .min(out.len() - completed);
            if room == 0 {
                break;
            }
            let (fd, filter_self) = if source == 0 {
                (unicast_fd, false)
            } else {
                (self.group_sockets[source - 1].1.as_raw_fd(), true)
            };
            let received = self.receive_into_ring(fd, room, filter_self);
            for offset in 0..received {
                out[completed] = RecvCompletion {
                    slot: u32::try_from(self.head % slots).unwrap_or(0),
                    len: self.received_lengths[offset],
                };
                self.head += 1;
                completed += 1;
            }
            if received < room.min(MAX_MMSG) {
                source += 1;
            }
        }
        self.stats.datagrams_received += completed as u64;
        completed
    }

    fn recv_payload(&self, completion: &RecvCompletion) -> &[u8] {
        let mtu = self.config.mtu;
        let slot = (completion.slot as usize).min(self.config.recv_slots - 1);
        &self.ring[slot * mtu..slot * mtu + (completion.len as usize).min(mtu)]
    }

    fn stats(&self) -> TransportStats {
        self.stats
    }
}
