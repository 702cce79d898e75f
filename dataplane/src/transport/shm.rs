//! The shared-memory fabric: a UD NIC plus switch between processes on one host, busy-polled
//! with no syscall on the data path. It is the default transport for local runs and the
//! reference for the raw message rate.
//!
//! A fabric is one file (by default `/dev/shm/rzab-fabric-NAME`) holding a header, a control
//! record per port, the multicast membership masks and one receive ring per port. A port's ring
//! is its receive queue: the owner *posts* receives by advancing `posted_limit`; senders reserve
//! positions below that limit with a compare-and-swap on `tail`, copy the datagram in ("DMA")
//! and publish it by storing the position's sequence number. A datagram that finds no posted
//! position is dropped and counted on the receiving port, exactly as a UD NIC drops a message
//! for which no receive is posted. Sending to a multicast group copies into every member's ring
//! but the sender's, as a switch replicates.
//!
//! A sender killed between its reservation and its publication leaves a hole that would stop
//! the ring for good (the receiver takes positions in order): a position reserved but not
//! published for [`HOLE_TIMEOUT`] while later ones are reserved is skipped and counted
//! (`holes_skipped`). Should its sender have been merely descheduled, what it writes late is
//! refused by the datagram's check or by its stale sequence number, and the protocol repeats it.
//!
//! The data path touches only the mapped fabric and this endpoint's own staging buffers (and
//! the clock, while a hole is waited out). Opening
//! and closing touch the fabric file (created on first use under an `flock`, so concurrent first
//! opens agree) and `kill(pid, 0)` to decide whether a port's previous owner is still alive.

#![allow(
    clippy::cast_possible_truncation,
    reason = "lengths, slot indices and counts here are bounded by the MTU, ring and chain sizes checked when the transport is opened, all far below 2^32"
)]

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::MmapMut;
use rzab_shared::EndpointAddress;

use super::{
    Capabilities, Destination, RecvCompletion, SendRequest, Transport, TransportError,
    TransportStats, validate_chain,
};

const FABRIC_MAGIC: u64 = u64::from_le_bytes(*b"RZABFAB\0");
const FABRIC_VERSION: u32 = 1;
const CACHE_LINE: usize = 64;
const SLOT_HEADER: usize = 16;
/// Most ports of one fabric: multicast membership is a 64-bit mask.
pub const MAX_FABRIC_PORTS: u32 = 64;
/// Multicast groups of one fabric.
pub const FABRIC_GROUPS: usize = 64;
/// The fabric file is sized in multiples of this, so it can live on hugetlbfs.
const HUGE_PAGE: usize = 2 << 20;
/// How long a reserved, unpublished position holds up the ring before it is skipped: far
/// beyond a copy of the largest datagram, even by a sender descheduled in the middle of it.
pub const HOLE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(20);

/// How to open a fabric port. The geometry fields apply when this open creates the fabric;
/// opening an existing fabric checks them against it.
#[derive(Clone, Debug)]
pub struct ShmConfig {
    /// Fabric name; the file is `dir/rzab-fabric-NAME`.
    pub fabric: String,
    /// Directory of the fabric file: `/dev/shm`, or a hugetlbfs mount.
    pub dir: PathBuf,
    /// The port this endpoint takes.
    pub port: u32,
    pub ports: u32,
    pub ring_slots: u32,
    pub mtu: u32,
    /// Staging buffers, and so the longest chain.
    pub max_chain: usize,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            fabric: "rzab".into(),
            dir: PathBuf::from("/dev/shm"),
            port: 0,
            ports: 64,
            ring_slots: 256,
            mtu: 4096,
            max_chain: 32,
        }
    }
}

impl ShmConfig {
    /// Path of the fabric file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("rzab-fabric-{}", self.fabric))
    }
}

#[repr(C, align(64))]
struct FabricHeader {
    magic: AtomicU64,
    version: AtomicU32,
    ports: AtomicU32,
    ring_slots: AtomicU32,
    mtu: AtomicU32,
    slot_bytes: AtomicU32,
    groups: AtomicU32,
}

/// A port's shared state, one cache line per writer.
#[repr(C, align(64))]
struct PortControl {
    /// Next position to reserve; written by senders.
    tail: AtomicU64,
    _tail_pad: [u8; CACHE_LINE - 8],
    /// Positions below this are posted receives; written by the owner.
    posted_limit: AtomicU64,
    /// `pid << 32 | per-process sequence` of the owner, 0 when free.
    owner: AtomicU64,
    _owner_pad: [u8; CACHE_LINE - 16],
    /// Datagrams dropped for lack of a posted receive; written by senders.
    dropped_no_recv: AtomicU64,
}

#[repr(C)]
struct SlotHeader {
    /// Position + 1 once the datagram at this position is complete.
    sequence: AtomicU64,
    len: AtomicU32,
    source_port: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<SlotHeader>() == SLOT_HEADER);
const _: () = assert!(std::mem::size_of::<PortControl>() == 3 * CACHE_LINE);

/// Byte offsets of the fabric's parts, derived from its geometry.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    ports: usize,
    ring_slots: usize,
    mtu: usize,
    slot_bytes: usize,
    controls_at: usize,
    groups_at: usize,
    rings_at: usize,
    file_bytes: usize,
}

impl Geometry {
    fn new(ports: u32, ring_slots: u32, mtu: u32) -> Result<Self, String> {
        if ports == 0 || ports > MAX_FABRIC_PORTS {
            return Err(format!(
                "ports must be within 1..={MAX_FABRIC_PORTS}, got {ports}"
            ));
        }
        if !ring_slots.is_power_of_two() || ring_slots < 2 {
            return Err(format!(
                "ring slots must be a power of two >= 2, got {ring_slots}"
            ));
        }
        if mtu == 0 || mtu > 1 << 20 {
            return Err(format!("mtu must be within 1..=1 MiB, got {mtu}"));
        }
        let (ports, ring_slots, mtu) = (ports as usize, ring_slots as usize, mtu as usize);
        let slot_bytes = (SLOT_HEADER + mtu).next_multiple_of(CACHE_LINE);
        let controls_at = std::mem::size_of::<FabricHeader>().next_multiple_of(CACHE_LINE);
        let groups_at = controls_at + ports * std::mem::size_of::<PortControl>();
        let rings_at = (groups_at + FABRIC_GROUPS * 8).next_multiple_of(CACHE_LINE);
        let file_bytes = (rings_at + ports * ring_slots * slot_bytes).next_multiple_of(HUGE_PAGE);
        Ok(Geometry {
            ports,
            ring_slots,
            mtu,
            slot_bytes,
            controls_at,
            groups_at,
            rings_at,
            file_bytes,
        })
    }
}

/// A destination on the fabric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmAddress {
    Port(u32),
    Group(u16),
}

static NEXT_OWNER_SEQUENCE: AtomicU64 = AtomicU64::new(1);

/// One port of a shared-memory fabric.
#[derive(Debug)]
pub struct ShmTransport {
    mmap: MmapMut,
    geometry: Geometry,
    path: PathBuf,
    port: u32,
    owner_token: u64,
    /// Next position to poll.
    head: u64,
    /// Mirror of this port's `posted_limit` (this endpoint is its only writer).
    posted_limit: u64,
    /// The position the ring waits on while later ones are reserved, and since when.
    hole: Option<(u64, std::time::Instant)>,
    staging: Vec<u8>,
    max_chain: usize,
    joined_groups: u64,
    stats: TransportStats,
}

fn fabric_error(path: &Path, reason: impl Into<String>) -> TransportError {
    TransportError::Fabric {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission; it sends nothing.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl ShmTransport {
    /// Opens (creating the fabric if needed) and takes `config.port`.
    pub fn open(config: &ShmConfig) -> Result<Self, TransportError> {
        let path = config.path();
        let requested = Geometry::new(config.ports, config.ring_slots, config.mtu)
            .map_err(|reason| fabric_error(&path, reason))?;
        if config.max_chain == 0 {
            return Err(fabric_error(&path, "max_chain must be at least 1"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(TransportError::io(format!(
                "opening fabric {}",
                path.display()
            )))?;
        // SAFETY: flock on a descriptor we own; it serializes fabric creation between processes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(TransportError::Io {
                context: format!("locking fabric {}", path.display()),
                source: std::io::Error::last_os_error(),
            });
        }
        let length = file
            .metadata()
            .map_err(TransportError::io(format!(
                "reading fabric {}",
                path.display()
            )))?
            .len();
        let creating = length == 0;
        if creating {
            file.set_len(requested.file_bytes as u64)
                .map_err(TransportError::io(format!(
                    "sizing fabric {}",
                    path.display()
                )))?;
        }
        // SAFETY: the fabric file is shared with other processes that access it only through
        // atomics and through slots whose ownership the ring protocol hands over; this process
        // does the same, so no Rust reference to its bytes is ever aliased with a writer.
        let mmap = unsafe { MmapMut::map_mut(&file) }.map_err(TransportError::io(format!(
            "mapping fabric {}",
            path.display()
        )))?;
        let geometry = if creating {
            let header = header_of(&mmap);
            header.version.store(FABRIC_VERSION, Ordering::Relaxed);
            header.ports.store(config.ports, Ordering::Relaxed);
            header
                .ring_slots
                .store(config.ring_slots, Ordering::Relaxed);
            header.mtu.store(config.mtu, Ordering::Relaxed);
            header
                .slot_bytes
                .store(requested.slot_bytes as u32, Ordering::Relaxed);
            header.groups.store(FABRIC_GROUPS as u32, Ordering::Relaxed);
            header.magic.store(FABRIC_MAGIC, Ordering::Release);
            requested
        } else {
            if mmap.len() < std::mem::size_of::<FabricHeader>() {
                return Err(fabric_error(&path, "file too short to be a fabric"));
            }
            let header = header_of(&mmap);
            if header.magic.load(Ordering::Acquire) != FABRIC_MAGIC {
                return Err(fabric_error(&path, "not an rzab fabric (bad magic)"));
            }
            if header.version.load(Ordering::Relaxed) != FABRIC_VERSION {
                return Err(fabric_error(
                    &path,
                    "fabric layout version differs from this build",
                ));
            }
            let existing = Geometry::new(
                header.ports.load(Ordering::Relaxed),
                header.ring_slots.load(Ordering::Relaxed),
                header.mtu.load(Ordering::Relaxed),
            )
            .map_err(|reason| fabric_error(&path, reason))?;
            if mmap.len() < existing.file_bytes {
                return Err(fabric_error(&path, "file shorter than its geometry"));
            }
            if existing.mtu != requested.mtu || existing.ring_slots != requested.ring_slots {
                return Err(fabric_error(
                    &path,
                    format!(
                        "exists with mtu {} and {} ring slots, asked for mtu {} and {}: remove it or use another fabric name",
                        existing.mtu, existing.ring_slots, requested.mtu, requested.ring_slots
                    ),
                ));
            }
            existing
        };
        // SAFETY: unlocking the descriptor we locked above.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        drop(file);
        // Best effort: back the rings with transparent huge pages where the kernel allows it.
        // SAFETY: madvise on our own live mapping; an unsupported advice only returns EINVAL.
        unsafe {
            libc::madvise(
                mmap.as_ptr().cast_mut().cast(),
                mmap.len(),
                libc::MADV_HUGEPAGE,
            );
        }

        if config.port as usize >= geometry.ports {
            return Err(fabric_error(
                &path,
                format!(
                    "port {} does not exist: the fabric has {} ports",
                    config.port, geometry.ports
                ),
            ));
        }
        let owner_token = (u64::from(std::process::id()) << 32)
            | NEXT_OWNER_SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let mut transport = ShmTransport {
            mmap,
            geometry,
            path,
            port: config.port,
            owner_token,
            head: 0,
            posted_limit: 0,
            hole: None,
            staging: vec![0; config.max_chain * geometry.mtu],
            max_chain: config.max_chain,
            joined_groups: 0,
            stats: TransportStats::default(),
        };
        transport.claim_port()?;
        Ok(transport)
    }

    /// Removes a fabric file (after every endpoint on it has closed).
    pub fn unlink(config: &ShmConfig) -> std::io::Result<()> {
        std::fs::remove_file(config.path())
    }

    fn claim_port(&mut self) -> Result<(), TransportError> {
        let control = self.control(self.port);
        let mut current = control.owner.load(Ordering::Acquire);
        loop {
            if current != 0 {
                let pid = u32::try_from(current >> 32).unwrap_or(0);
                if pid == std::process::id() || process_alive(pid) {
                    return Err(fabric_error(
                        &self.path,
                        format!("port {} is in use by pid {pid}", self.port),
                    ));
                }
            }
            match control.owner.compare_exchange(
                current,
                self.owner_token,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        // A previous owner may have left datagrams and posted receives behind: start from the
        // current tail with nothing posted, so nothing stale is delivered.
        let tail = control.tail.load(Ordering::Acquire);
        control.posted_limit.store(tail, Ordering::Release);
        self.head = tail;
        self.posted_limit = tail;
        for group in 0..FABRIC_GROUPS {
            self.group_members(group)
                .fetch_and(!(1u64 << self.port), Ordering::AcqRel);
        }
        Ok(())
    }

    fn control(&self, port: u32) -> &PortControl {
        let at = self.geometry.controls_at + port as usize * std::mem::size_of::<PortControl>();
        // SAFETY: `port` is below the fabric's port count (checked by every caller), so the
        // record lies inside the mapping, 64-byte aligned (offsets are multiples of 64 from a
        // page-aligned base); PortControl holds only atomics and padding, valid for any bytes.
        unsafe { &*self.mmap.as_ptr().add(at).cast::<PortControl>() }
    }

    fn group_members(&self, group: usize) -> &AtomicU64 {
        let at = self.geometry.groups_at + group.min(FABRIC_GROUPS - 1) * 8;
        // SAFETY: inside the mapping (groups_at + 64 * 8 <= rings_at) and 8-byte aligned.
        unsafe { &*self.mmap.as_ptr().add(at).cast::<AtomicU64>() }
    }

    /// Pointer to the slot for `position` in `port`'s ring.
    fn slot_ptr(&self, port: u32, position: u64) -> *mut u8 {
        let ring = self.geometry.ring_slots;
        let index = usize::try_from(position).unwrap_or(0) & (ring - 1);
        let at = self.geometry.rings_at + (port as usize * ring + index) * self.geometry.slot_bytes;
        // SAFETY: port < ports and index < ring_slots, so the slot lies inside the mapping.
        unsafe { self.mmap.as_ptr().cast_mut().add(at) }
    }

    fn slot_header(&self, port: u32, position: u64) -> &SlotHeader {
        // SAFETY: slot_ptr is in bounds and 64-byte aligned; SlotHeader is atomics only.
        unsafe { &*self.slot_ptr(port, position).cast::<SlotHeader>() }
    }

    /// Delivers `payloads` (all for `port`) into its ring; returns how many found a posted
    /// receive. The rest are counted as drops at the receiver.
    fn deliver(&self, port: u32, payloads: &[(usize, usize)]) -> usize {
        let control = self.control(port);
        let wanted = payloads.len() as u64;
        let mut tail = control.tail.load(Ordering::Acquire);
        let granted = loop {
            let limit = control.posted_limit.load(Ordering::Acquire);
            let granted = limit.saturating_sub(tail).min(wanted);
            if granted == 0 {
                break 0;
            }
            match control.tail.compare_exchange_weak(
                tail,
                tail + granted,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break granted,
                Err(actual) => tail = actual,
            }
        };
        for (offset, &(start, len)) in payloads.iter().take(granted as usize).enumerate() {
            let position = tail + offset as u64;
            let slot = self.slot_ptr(port, position);
            // SAFETY: the reservation above gave this sender exclusive use of `position`,
            // which is posted and so not held by the receiver; the payload fits (len <= mtu,
            // checked by validate_chain) and the staging range is inside `self.staging`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.staging.as_ptr().add(start),
                    slot.add(SLOT_HEADER),
                    len,
                );
            }
            let header = self.slot_header(port, position);
            header.len.store(len as u32, Ordering::Relaxed);
            header.source_port.store(self.port, Ordering::Relaxed);
            header.sequence.store(position + 1, Ordering::Release);
        }
        if granted < wanted {
            control
                .dropped_no_recv
                .fetch_add(wanted - granted, Ordering::Relaxed);
        }
        usize::try_from(granted).unwrap_or(0)
    }

    fn check_port(&self, port: u32) -> Result<(), TransportError> {
        if (port as usize) < self.geometry.ports {
            Ok(())
        } else {
            Err(TransportError::UnknownPeer(format!(
                "fabric port {port} (the fabric has {} ports)",
                self.geometry.ports
            )))
        }
    }

    /// The port this endpoint owns.
    pub fn port(&self) -> u32 {
        self.port
    }
}

fn header_of(mmap: &MmapMut) -> &FabricHeader {
    // SAFETY: callers checked the mapping is at least a header long; mmap is page aligned and
    // FabricHeader is atomics only.
    unsafe { &*mmap.as_ptr().cast::<FabricHeader>() }
}

impl Transport for ShmTransport {
    type Address = ShmAddress;

    fn caps(&self) -> Capabilities {
        Capabilities {
            mtu: self.geometry.mtu,
            max_inline: self.geometry.mtu,
            max_chain: self.max_chain,
            recv_slots: self.geometry.ring_slots,
        }
    }

    fn local_address(&self) -> EndpointAddress {
        EndpointAddress::Shm { port: self.port }
    }

    fn resolve(&mut self, peer: &EndpointAddress) -> Result<ShmAddress, TransportError> {
        match *peer {
            EndpointAddress::Shm { port } => {
                self.check_port(port)?;
                Ok(ShmAddress::Port(port))
            }
            other => Err(TransportError::ForeignEndpoint(other)),
        }
    }

    fn join_multicast(&mut self, group: super::MulticastGroup) -> Result<(), TransportError> {
        let index = self.group_index(group)?;
        self.group_members(index)
            .fetch_or(1u64 << self.port, Ordering::AcqRel);
        self.joined_groups |= 1u64 << index;
        Ok(())
    }

    fn multicast_address(
        &mut self,
        group: super::MulticastGroup,
    ) -> Result<ShmAddress, TransportError> {
        self.group_index(group)?;
        Ok(ShmAddress::Group(group.0))
    }

    fn send_buffer(&mut self, index: usize) -> &mut [u8] {
        let mtu = self.geometry.mtu;
        let index = index.min(self.max_chain - 1);
        &mut self.staging[index * mtu..(index + 1) * mtu]
    }

    fn post_send(&mut self, chain: &[SendRequest<ShmAddress>]) -> Result<usize, TransportError> {
        if let Err(error) = validate_chain(chain, &self.caps()) {
            self.stats.sends_refused += 1;
            return Err(error);
        }
        let mtu = self.geometry.mtu;
        // Consecutive requests to the same port share one reservation.
        let mut run: [(usize, usize); 64] = [(0, 0); 64];
        let mut run_len = 0;
        let mut run_port = u32::MAX;
        let mut accepted = 0;
        for request in chain {
            let payload = (usize::from(request.buffer) * mtu, request.len as usize);
            let address = match request.destination {
                Destination::Unicast(address) | Destination::Multicast(address) => address,
            };
            match address {
                ShmAddress::Port(port) => {
                    if port != run_port || run_len == run.len() {
                        if run_len > 0 {
                            self.deliver(run_port, &run[..run_len]);
                        }
                        run_port = port;
                        run_len = 0;
                    }
                    run[run_len] = payload;
                    run_len += 1;
                }
                ShmAddress::Group(group) => {
                    let members = self
                        .group_members(usize::from(group))
                        .load(Ordering::Acquire)
                        & !(1u64 << self.port);
                    let mut remaining = members;
                    while remaining != 0 {
                        let member = remaining.trailing_zeros();
                        remaining &= remaining - 1;
                        if (member as usize) < self.geometry.ports {
                            self.deliver(member, std::slice::from_ref(&payload));
                        }
                    }
                }
            }
            accepted += 1;
        }
        if run_len > 0 {
            self.deliver(run_port, &run[..run_len]);
        }
        self.stats.datagrams_sent += accepted as u64;
        self.stats.doorbells += 1;
        Ok(accepted)
    }

    fn post_recv(&mut self, count: usize) -> usize {
        let ring = self.geometry.ring_slots as u64;
        let unposted = ring - (self.posted_limit - self.head);
        let granted = (count as u64).min(unposted);
        if granted > 0 {
            self.posted_limit += granted;
            self.control(self.port)
                .posted_limit
                .store(self.posted_limit, Ordering::Release);
        }
        usize::try_from(granted).unwrap_or(0)
    }

    fn posted_recvs(&self) -> usize {
        usize::try_from(self.posted_limit - self.head).unwrap_or(0)
    }

    fn poll_recv(&mut self, out: &mut [RecvCompletion]) -> usize {
        let mut polled = 0;
        let ring_mask = self.geometry.ring_slots as u64 - 1;
        while polled < out.len() && self.head < self.posted_limit {
            let header = self.slot_header(self.port, self.head);
            if header.sequence.load(Ordering::Acquire) != self.head + 1 {
                if self.skip_hole() {
                    continue;
                }
                break;
            }
            let len = header
                .len
                .load(Ordering::Relaxed)
                .min(self.geometry.mtu as u32);
            out[polled] = RecvCompletion {
                slot: (self.head & ring_mask) as u32,
                len,
            };
            self.head += 1;
            polled += 1;
        }
        self.stats.datagrams_received += polled as u64;
        polled
    }

    fn recv_payload(&self, completion: &RecvCompletion) -> &[u8] {
        let slot = u64::from(completion.slot) & (self.geometry.ring_slots as u64 - 1);
        let len = (completion.len as usize).min(self.geometry.mtu);
        let base = self.slot_ptr(self.port, slot);
        // SAFETY: the slot is in bounds; it was completed and not re-posted, so no sender may
        // reserve it (senders only write posted positions), and its bytes stay unchanged while
        // the caller holds this borrow of `self`.
        unsafe { std::slice::from_raw_parts(base.add(SLOT_HEADER), len) }
    }

    fn stats(&self) -> TransportStats {
        TransportStats {
            dropped_no_recv: self
                .control(self.port)
                .dropped_no_recv
                .load(Ordering::Relaxed),
            ..self.stats
        }
    }
}

impl ShmTransport {
    /// Whether the unpublished position at `head` is a hole to skip: later positions are
    /// reserved and it has waited for [`HOLE_TIMEOUT`]. Skipping moves `head` past it.
    fn skip_hole(&mut self) -> bool {
        let tail = self.control(self.port).tail.load(Ordering::Acquire);
        if tail <= self.head + 1 {
            // Nothing reserved after it: a sender still copying, or nothing at all.
            self.hole = None;
            return false;
        }
        let now = std::time::Instant::now();
        match self.hole {
            Some((position, since)) if position == self.head => {
                if now.duration_since(since) < HOLE_TIMEOUT {
                    return false;
                }
                self.hole = None;
                self.head += 1;
                self.stats.holes_skipped += 1;
                // The skipped receive is posted again, as a consumed one would be.
                self.post_recv(1);
                true
            }
            _ => {
                self.hole = Some((self.head, now));
                false
            }
        }
    }

    fn group_index(&self, group: super::MulticastGroup) -> Result<usize, TransportError> {
        let index = usize::from(group.0);
        if index < FABRIC_GROUPS {
            Ok(index)
        } else {
            Err(TransportError::Multicast(
                group.0,
                format!("the fabric has {FABRIC_GROUPS} groups"),
            ))
        }
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        for group in 0..FABRIC_GROUPS {
            if self.joined_groups & (1u64 << group) != 0 {
                self.group_members(group)
                    .fetch_and(!(1u64 << self.port), Ordering::AcqRel);
            }
        }
        let control = self.control(self.port);
        // Stop accepting: nothing stays posted, so later datagrams are dropped and counted.
        control
            .posted_limit
            .store(control.tail.load(Ordering::Acquire), Ordering::Release);
        let _ = control.owner.compare_exchange(
            self.owner_token,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;
    use crate::transport::{Destination, RecvCompletion, SendRequest, Transport};

    fn open(dir: &Path, port: u32) -> ShmTransport {
        ShmTransport::open(&ShmConfig {
            fabric: "holes".into(),
            dir: dir.to_owned(),
            port,
            ports: 2,
            ring_slots: 16,
            mtu: 256,
            max_chain: 4,
        })
        .unwrap()
    }

    #[test]
    fn a_position_a_killed_sender_reserved_is_skipped_after_the_hole_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let mut sender = open(dir.path(), 0);
        let mut receiver = open(dir.path(), 1);
        assert_eq!(receiver.post_recv(16), 16);
        let to = sender.resolve(&receiver.local_address()).unwrap();
        // A sender that reserved a position and died before publishing it.
        receiver.control(1).tail.fetch_add(1, Ordering::AcqRel);
        sender.send_buffer(0)[..5].copy_from_slice(b"after");
        let request = SendRequest {
            destination: Destination::Unicast(to),
            buffer: 0,
            len: 5,
        };
        assert_eq!(sender.post_send(&[request]).unwrap(), 1);
        let mut out = [RecvCompletion::default(); 4];
        assert_eq!(
            receiver.poll_recv(&mut out),
            0,
            "the hole holds the ring up at first"
        );
        std::thread::sleep(HOLE_TIMEOUT + std::time::Duration::from_millis(5));
        assert_eq!(receiver.poll_recv(&mut out), 1);
        assert_eq!(receiver.recv_payload(&out[0]), b"after");
        assert_eq!(receiver.stats().holes_skipped, 1);
        assert_eq!(
            receiver.posted_recvs(),
            15,
            "the skipped receive is posted again"
        );
    }
}
