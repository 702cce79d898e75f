//! The control block: the only meeting point of a node's data plane and control plane.
//!
//! It is a shared-memory file (for example `/dev/shm/rzab-CLUSTER-nNODE`) that holds one
//! `#[repr(C)]` [`ControlBlock`] made only of atomics, so both processes can read and write it
//! through shared references without locks. The data plane creates it and holds an exclusive
//! `flock` on it for its lifetime, which is how a second data plane is refused while the first
//! lives, and how a restarted one can take over a block whose owner died. A takeover builds the
//! new block in a fresh file renamed over the old one (never shrinking a file someone may still
//! map) and clears the old block's magic. The control plane attaches to an existing block and
//! validates its magic, layout version and size.
//!
//! This module touches the control-block file (and, during a takeover, a temporary file beside
//! it) and their mappings, nothing else.

use std::fs::{File, OpenOptions};
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::MmapMut;

use crate::counters::{Counter, Histogram, add_single_writer};
use crate::endpoint::{EndpointAddress, TransportKind};
use crate::knobs::{KNOBS, Knob, KnobError};
use crate::limits::{
    CLUSTER_NAME_BYTES, ENDPOINT_BYTES, MAX_COUNTERS, MAX_KNOBS, MAX_NODES, MAX_WORKERS,
};

/// "RZABCTL" followed by a zero byte, little-endian.
pub const CONTROL_BLOCK_MAGIC: u64 = u64::from_le_bytes(*b"RZABCTL\0");
/// Bumped whenever the layout of [`ControlBlock`] changes.
pub const LAYOUT_VERSION: u32 = 6;

/// The lifecycle of the data plane that owns a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Lifecycle {
    /// Mapped, not yet initialized.
    Uninitialized = 0,
    /// The data plane is setting up its transport.
    Starting = 1,
    /// Local endpoints are published; waiting for the remote table.
    WaitingForPeers = 2,
    /// Workers are running.
    Running = 3,
    /// The data plane is shutting down.
    Stopping = 4,
    /// The data plane has exited.
    Stopped = 5,
}

impl Lifecycle {
    pub fn from_code(code: u32) -> Lifecycle {
        match code {
            1 => Lifecycle::Starting,
            2 => Lifecycle::WaitingForPeers,
            3 => Lifecycle::Running,
            4 => Lifecycle::Stopping,
            5 => Lifecycle::Stopped,
            _ => Lifecycle::Uninitialized,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Uninitialized => "uninitialized",
            Lifecycle::Starting => "starting",
            Lifecycle::WaitingForPeers => "waiting_for_peers",
            Lifecycle::Running => "running",
            Lifecycle::Stopping => "stopping",
            Lifecycle::Stopped => "stopped",
        }
    }
}

/// Where the control plane is in its registry exchange; stored as a code in
/// [`Handshake::registry_state`] so the data plane's status line (and anyone inspecting the
/// block) can tell why the remote table is not there yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RegistryState {
    /// No control plane has reported yet (the zeroed state).
    Unknown = 0,
    /// Connecting to the registry.
    Connecting = 1,
    /// The registry could not be reached; the control plane retries with backoff.
    Unreachable = 2,
    /// Waiting for the data plane's endpoints, or writing this node's record.
    Publishing = 3,
    /// This node's record is published; not every peer's is known yet.
    WaitingForPeers = 4,
    /// Every node is known and the remote table is written.
    Ready = 5,
}

impl RegistryState {
    pub const ALL: [RegistryState; 6] = [
        RegistryState::Unknown,
        RegistryState::Connecting,
        RegistryState::Unreachable,
        RegistryState::Publishing,
        RegistryState::WaitingForPeers,
        RegistryState::Ready,
    ];

    pub fn from_code(code: u32) -> RegistryState {
        RegistryState::ALL
            .into_iter()
            .find(|state| state.code() == code)
            .unwrap_or(RegistryState::Unknown)
    }

    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            RegistryState::Unknown => "unknown",
            RegistryState::Connecting => "connecting",
            RegistryState::Unreachable => "unreachable",
            RegistryState::Publishing => "publishing",
            RegistryState::WaitingForPeers => "waiting_for_peers",
            RegistryState::Ready => "ready",
        }
    }
}

/// Everything that can go wrong opening a control block.
#[derive(Debug, thiserror::Error)]
pub enum ControlBlockError {
    #[error("control block {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control block {path} is held by a live data plane (pid {pid})")]
    HeldByLiveProcess { path: PathBuf, pid: u32 },
    #[error(
        "control block {path} has magic {found:#018x}, expected {CONTROL_BLOCK_MAGIC:#018x}: not an rzab control block, or not initialized yet"
    )]
    BadMagic { path: PathBuf, found: u64 },
    #[error(
        "control block {path} has layout version {found}, this build expects {LAYOUT_VERSION}: rebuild both processes from the same tree"
    )]
    VersionMismatch { path: PathBuf, found: u32 },
    #[error("control block {path} is {found} bytes, this build expects {expected}")]
    SizeMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("invalid control block setting: {0}")]
    InvalidInit(String),
    #[error(transparent)]
    Knob(#[from] KnobError),
}

/// Fixed facts about a node, written once when the data plane creates its block.
#[derive(Clone, Debug)]
pub struct ControlBlockInit {
    pub cluster: String,
    pub node_id: u32,
    pub node_count: u32,
    pub worker_count: u32,
    pub transport: TransportKind,
}

/// The header: identity and liveness.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct Header {
    pub magic: AtomicU64,
    pub layout_version: AtomicU32,
    pub node_id: AtomicU32,
    pub size: AtomicU64,
    pub worker_count: AtomicU32,
    pub node_count: AtomicU32,
    pub lifecycle: AtomicU32,
    pub owner_pid: AtomicU32,
    pub transport: AtomicU32,
    pub controlplane_pid: AtomicU32,
    /// Differs for every start of a data plane, so an attached control plane notices a restart.
    pub instance: AtomicU64,
    pub cluster_name: [AtomicU64; CLUSTER_NAME_BYTES / 8],
    /// Wall-clock nanoseconds of the data plane's last sign of life.
    pub dataplane_heartbeat_ns: AtomicU64,
    /// Wall-clock nanoseconds of the control plane's last sign of life.
    pub controlplane_heartbeat_ns: AtomicU64,
    /// Wall-clock nanoseconds at which the data plane started.
    pub started_ns: AtomicU64,
}

/// The ready handshake between the two processes.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct Handshake {
    /// Set by the data plane to its `instance` once every local endpoint is final.
    pub endpoints_published: AtomicU64,
    /// Bumped by the control plane each time it has written a complete remote table.
    pub peers_generation: AtomicU64,
    /// The control plane's registry state, for the data plane's status line.
    pub registry_state: AtomicU32,
}

/// The live knob values and an epoch that changes with every update.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct KnobBlock {
    pub values: [AtomicU64; MAX_KNOBS],
    /// Bumped after every change, so a worker can check one word per iteration.
    pub epoch: AtomicU64,
}

/// One endpoint address behind a sequence lock (odd while being written).
#[repr(C)]
#[derive(Debug)]
pub struct EndpointSlot {
    sequence: AtomicU64,
    words: [AtomicU64; ENDPOINT_BYTES / 8],
}

/// Gauges a worker publishes besides its counters.
#[repr(C)]
#[derive(Debug)]
pub struct WorkerGauges {
    /// The highest zxid this worker's node has applied, as seen by this worker.
    pub applied_zxid: AtomicU64,
    /// Wall-clock nanoseconds of this worker's last loop iteration report.
    pub heartbeat_ns: AtomicU64,
    /// The highest zxid this worker knows the leader to have committed (on the leader, its
    /// own); replication lag is this minus `applied_zxid`.
    pub leader_zxid: AtomicU64,
    /// The knob epoch this worker has last applied, so a knob change can be seen to land.
    pub knob_epoch_seen: AtomicU64,
    /// A [`SyncState`] code: whether this worker's pipeline serves local reads yet.
    pub sync_state: AtomicU64,
    /// The node this worker's pipeline takes as its leader, plus one (0: not known yet). The
    /// leader is the data plane's state, not a constant: read it with
    /// [`WorkerGauges::leader_node`].
    pub leader_node_plus_one: AtomicU64,
    /// The epoch that leader leads in.
    pub epoch: AtomicU64,
    /// Nanoseconds the last election took, from its start to a leader followed (0: none).
    pub last_election_ns: AtomicU64,
}

impl WorkerGauges {
    /// The node this worker follows (or is, on the leader), once known.
    pub fn leader_node(&self) -> Option<u32> {
        let stored = self.leader_node_plus_one.load(Ordering::Relaxed);
        stored
            .checked_sub(1)
            .and_then(|node| u32::try_from(node).ok())
    }

    /// Publishes the leader this worker takes (`None`: not known).
    pub fn set_leader(&self, node: Option<u32>, epoch: u32) {
        self.leader_node_plus_one.store(
            node.map_or(0, |node| u64::from(node) + 1),
            Ordering::Relaxed,
        );
        self.epoch.store(u64::from(epoch), Ordering::Relaxed);
    }
}

/// Whether a worker's pipeline is in step with the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum SyncState {
    /// Not started, or waiting for peers.
    Starting = 0,
    /// A restarted follower receiving the leader's state; local reads are refused.
    CatchingUp = 1,
    /// In step: local reads are served.
    Serving = 2,
    /// A follower that has heard nothing from its leader for `peer_timeout_ms`.
    NoLeader = 3,
    /// A leader that has heard from fewer than a quorum of followers for `peer_timeout_ms`.
    NoQuorum = 4,
    /// A follower the leader left behind: it restarts (or exits) to catch up by snapshot.
    FellBehind = 5,
    /// The node has no leader: it is electing one, or joining the one elected.
    Electing = 6,
}

impl SyncState {
    pub fn from_code(code: u64) -> SyncState {
        match code {
            1 => SyncState::CatchingUp,
            2 => SyncState::Serving,
            3 => SyncState::NoLeader,
            4 => SyncState::NoQuorum,
            5 => SyncState::FellBehind,
            6 => SyncState::Electing,
            _ => SyncState::Starting,
        }
    }

    /// Why a node in this state does not serve as it should, for health checks; `None` for
    /// the states of a healthy node (starting and catching up are on the way to serving).
    pub fn trouble(self) -> Option<&'static str> {
        match self {
            SyncState::NoLeader => Some("no word from the leader within peer_timeout_ms"),
            SyncState::NoQuorum => {
                Some("fewer than a quorum of followers heard from within peer_timeout_ms")
            }
            SyncState::FellBehind => {
                Some("left behind by the leader; restarting to catch up by snapshot")
            }
            SyncState::Electing => Some("no leader: electing one, or joining the one elected"),
            SyncState::Starting | SyncState::CatchingUp | SyncState::Serving => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SyncState::Starting => "starting",
            SyncState::CatchingUp => "catching_up",
            SyncState::Serving => "serving",
            SyncState::NoLeader => "no_leader",
            SyncState::NoQuorum => "no_quorum",
            SyncState::FellBehind => "fell_behind",
            SyncState::Electing => "electing",
        }
    }
}

impl WorkerBlock {
    /// The state this worker's pipeline reports.
    pub fn sync_state(&self) -> SyncState {
        SyncState::from_code(self.gauges.sync_state.load(Ordering::Relaxed))
    }
}

/// Everything one worker publishes.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct WorkerBlock {
    pub counters: [AtomicU64; MAX_COUNTERS],
    pub write_latency_ns: Histogram,
    pub gauges: WorkerGauges,
    pub local_endpoint: EndpointSlot,
}

/// The whole shared layout.
#[repr(C)]
#[derive(Debug)]
pub struct ControlBlock {
    pub header: Header,
    pub handshake: Handshake,
    pub knobs: KnobBlock,
    pub workers: [WorkerBlock; MAX_WORKERS],
    /// `remote[node][worker]`: filled by the control plane from the registry.
    pub remote: [[EndpointSlot; MAX_WORKERS]; MAX_NODES],
}

/// Size of the control block file in bytes.
pub const CONTROL_BLOCK_SIZE: usize = std::mem::size_of::<ControlBlock>();

const _: () = assert!(
    std::mem::align_of::<ControlBlock>() <= 4096,
    "mmap gives page alignment"
);

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
        })
}

impl EndpointSlot {
    /// Writes an address; one writer at a time.
    pub fn store(&self, address: Option<&EndpointAddress>) {
        let bytes = address.map_or([0u8; ENDPOINT_BYTES], EndpointAddress::to_bytes);
        let sequence = self.sequence.load(Ordering::Relaxed);
        self.sequence.store(sequence | 1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        for (word, chunk) in self.words.iter().zip(bytes.chunks_exact(8)) {
            let mut value = [0u8; 8];
            value.copy_from_slice(chunk);
            word.store(u64::from_le_bytes(value), Ordering::Relaxed);
        }
        self.sequence.store((sequence | 1) + 1, Ordering::Release);
    }

    /// Reads the address, retrying while a writer is active. `None` when the slot is empty or
    /// holds something this build cannot decode.
    pub fn load(&self) -> Option<EndpointAddress> {
        loop {
            let before = self.sequence.load(Ordering::Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let mut bytes = [0u8; ENDPOINT_BYTES];
            for (word, chunk) in self.words.iter().zip(bytes.chunks_exact_mut(8)) {
                chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
            }
            std::sync::atomic::fence(Ordering::Acquire);
            if self.sequence.load(Ordering::Relaxed) == before {
                return EndpointAddress::from_bytes(&bytes).ok();
            }
        }
    }
}

impl ControlBlock {
    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle::from_code(self.header.lifecycle.load(Ordering::Acquire))
    }

    pub fn set_lifecycle(&self, lifecycle: Lifecycle) {
        self.header
            .lifecycle
            .store(lifecycle as u32, Ordering::Release);
    }

    /// The control plane's registry state, as last reported.
    pub fn registry_state(&self) -> RegistryState {
        RegistryState::from_code(self.handshake.registry_state.load(Ordering::Acquire))
    }

    pub fn set_registry_state(&self, state: RegistryState) {
        self.handshake
            .registry_state
            .store(state.code(), Ordering::Release);
    }

    pub fn node_id(&self) -> u32 {
        self.header.node_id.load(Ordering::Relaxed)
    }

    pub fn node_count(&self) -> u32 {
        self.header.node_count.load(Ordering::Relaxed)
    }

    pub fn worker_count(&self) -> u32 {
        self.header.worker_count.load(Ordering::Relaxed)
    }

    pub fn transport(&self) -> Option<TransportKind> {
        TransportKind::from_code(self.header.transport.load(Ordering::Relaxed))
    }

    pub fn cluster_name(&self) -> String {
        let mut bytes = Vec::with_capacity(CLUSTER_NAME_BYTES);
        for word in &self.header.cluster_name {
            bytes.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        let end = bytes
            .iter()
            .position(|byte| *byte == 0)
            .unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }

    /// The current value of a knob.
    #[inline]
    pub fn knob(&self, knob: Knob) -> u64 {
        self.knobs.values[knob.slot()].load(Ordering::Relaxed)
    }

    /// The knob epoch: changes after every successful [`ControlBlock::set_knobs`].
    #[inline]
    pub fn knob_epoch(&self) -> u64 {
        self.knobs.epoch.load(Ordering::Acquire)
    }

    /// Validates every value first, then stores them all and bumps the epoch: either all
    /// changes apply or none does.
    pub fn set_knobs(&self, changes: &[(Knob, u64)]) -> Result<(), KnobError> {
        for (knob, value) in changes {
            knob.spec().validate(*value)?;
        }
        for (knob, value) in changes {
            self.knobs.values[knob.slot()].store(*value, Ordering::Relaxed);
        }
        self.knobs.epoch.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The block of one worker.
    pub fn worker(&self, worker: usize) -> &WorkerBlock {
        &self.workers[worker.min(MAX_WORKERS - 1)]
    }

    /// The sum of a counter over all of this node's workers.
    pub fn counter_total(&self, counter: Counter) -> u64 {
        let workers = usize::try_from(self.worker_count())
            .unwrap_or(0)
            .min(MAX_WORKERS);
        self.workers[..workers]
            .iter()
            .map(|block| block.counter(counter))
            .fold(0u64, u64::wrapping_add)
    }

    /// Records the data plane's liveness.
    pub fn dataplane_heartbeat(&self) {
        self.header
            .dataplane_heartbeat_ns
            .store(now_ns(), Ordering::Relaxed);
    }

    /// Nanoseconds since the data plane's last heartbeat (u64::MAX if it never beat).
    pub fn dataplane_silence_ns(&self) -> u64 {
        let last = self.header.dataplane_heartbeat_ns.load(Ordering::Relaxed);
        if last == 0 {
            u64::MAX
        } else {
            now_ns().saturating_sub(last)
        }
    }

    /// Records the control plane's liveness and pid.
    pub fn controlplane_heartbeat(&self) {
        self.header
            .controlplane_pid
            .store(std::process::id(), Ordering::Relaxed);
        self.header
            .controlplane_heartbeat_ns
            .store(now_ns(), Ordering::Relaxed);
    }

    fn initialize(&self, init: &ControlBlockInit) {
        let header = &self.header;
        header
            .layout_version
            .store(LAYOUT_VERSION, Ordering::Relaxed);
        header.node_id.store(init.node_id, Ordering::Relaxed);
        header
            .size
            .store(CONTROL_BLOCK_SIZE as u64, Ordering::Relaxed);
        header
            .worker_count
            .store(init.worker_count, Ordering::Relaxed);
        header.node_count.store(init.node_count, Ordering::Relaxed);
        header
            .owner_pid
            .store(std::process::id(), Ordering::Relaxed);
        header
            .transport
            .store(init.transport.code(), Ordering::Relaxed);
        let started = now_ns();
        header.started_ns.store(started, Ordering::Relaxed);
        header.instance.store(
            started ^ (u64::from(std::process::id()) << 40),
            Ordering::Relaxed,
        );
        let mut name = [0u8; CLUSTER_NAME_BYTES];
        name[..init.cluster.len()].copy_from_slice(init.cluster.as_bytes());
        for (word, chunk) in header.cluster_name.iter().zip(name.chunks_exact(8)) {
            let mut value = [0u8; 8];
            value.copy_from_slice(chunk);
            word.store(u64::from_le_bytes(value), Ordering::Relaxed);
        }
        for spec in KNOBS {
            self.knobs.values[spec.knob.slot()].store(spec.default, Ordering::Relaxed);
        }
        self.set_lifecycle(Lifecycle::Starting);
        self.dataplane_heartbeat();
        header.magic.store(CONTROL_BLOCK_MAGIC, Ordering::Release);
    }
}

impl WorkerBlock {
    /// Adds to a counter; only this worker's thread may call it.
    #[inline]
    pub fn add(&self, counter: Counter, amount: u64) {
        add_single_writer(&self.counters[counter.slot()], amount);
    }

    /// Sets a counter that mirrors a running total kept elsewhere; only this worker's thread
    /// may call it.
    #[inline]
    pub fn set(&self, counter: Counter, value: u64) {
        self.counters[counter.slot()].store(value, Ordering::Relaxed);
    }

    #[inline]
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters[counter.slot()].load(Ordering::Relaxed)
    }
}

/// A mapped control block file.
#[derive(Debug)]
struct Mapping {
    mmap: MmapMut,
    file: File,
    path: PathBuf,
}

impl Mapping {
    fn block(&self) -> &ControlBlock {
        // SAFETY: the mapping is at least CONTROL_BLOCK_SIZE bytes (checked by both
        // constructors), page aligned (mmap), and ControlBlock consists only of atomics and
        // arrays of atomics, for which every bit pattern (including all zeros) is valid.
        // Shared access through atomics is sound across processes.
        unsafe { &*self.mmap.as_ptr().cast::<ControlBlock>() }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ControlBlockError + '_ {
    move |source| ControlBlockError::Io {
        path: path.to_owned(),
        source,
    }
}

fn map_file(file: &File, path: &Path) -> Result<MmapMut, ControlBlockError> {
    // SAFETY: the file is a shared-memory control block; other processes only modify it through
    // atomics, which we also use for every access, so the aliasing rules of &[u8] are never
    // relied on for its contents.
    unsafe { MmapMut::map_mut(file) }.map_err(io_error(path))
}

/// Takes the exclusive lock of a block file, or says which live process holds it.
fn lock_exclusive(file: &File, path: &Path) -> Result<(), ControlBlockError> {
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        let pid = AttachedControlBlock::attach(path)
            .map(|block| block.header.owner_pid.load(Ordering::Relaxed))
            .unwrap_or(0);
        return Err(ControlBlockError::HeldByLiveProcess {
            path: path.to_owned(),
            pid,
        });
    }
    Err(ControlBlockError::Io {
        path: path.to_owned(),
        source: error,
    })
}

/// The data plane's handle: creates (or takes over) the block and holds its lock.
#[derive(Debug)]
pub struct OwnedControlBlock {
    mapping: Mapping,
    /// The block file this one replaced, kept locked (see [`OwnedControlBlock::create`]).
    _previous: Option<File>,
}

impl OwnedControlBlock {
    /// Creates the block at `path`, or takes over a block whose owner has exited.
    pub fn create(path: &Path, init: &ControlBlockInit) -> Result<Self, ControlBlockError> {
        if init.cluster.len() > CLUSTER_NAME_BYTES || init.cluster.contains('\0') {
            return Err(ControlBlockError::InvalidInit(format!(
                "cluster name `{}` must be at most {CLUSTER_NAME_BYTES} bytes",
                init.cluster
            )));
        }
        if init.worker_count == 0 || init.worker_count as usize > MAX_WORKERS {
            return Err(ControlBlockError::InvalidInit(format!(
                "worker count {} must be within 1..={MAX_WORKERS}",
                init.worker_count
            )));
        }
        if init.node_count == 0
            || init.node_count as usize > MAX_NODES
            || init.node_id >= init.node_count
        {
            return Err(ControlBlockError::InvalidInit(format!(
                "node {} of {} nodes: need 1..={MAX_NODES} nodes and an id below the count",
                init.node_id, init.node_count
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_error(path))?;
        lock_exclusive(&file, path)?;
        let length = file.metadata().map_err(io_error(path))?.len();
        if length == 0 {
            // A new file: nobody can be attached to it (attach refuses its size).
            file.set_len(CONTROL_BLOCK_SIZE as u64)
                .map_err(io_error(path))?;
            let mapping = Mapping {
                mmap: map_file(&file, path)?,
                file,
                path: path.to_owned(),
            };
            mapping.block().initialize(init);
            return Ok(OwnedControlBlock {
                mapping,
                _previous: None,
            });
        }
        // Taking over from an exited owner. The old file is never shrunk: a process that still
        // maps it (an attached control plane) would fault with SIGBUS on its next access. The
        // new block is built in a fresh file and renamed over the path; then the old block's
        // magic is cleared, so whoever is still attached to it sees it vanish and re-attaches.
        let file_name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temporary = path.with_file_name(format!(".{file_name}.{}.new", std::process::id()));
        let built = (|| {
            let fresh = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)
                .map_err(io_error(&temporary))?;
            lock_exclusive(&fresh, &temporary)?;
            fresh
                .set_len(CONTROL_BLOCK_SIZE as u64)
                .map_err(io_error(&temporary))?;
            let mapping = Mapping {
                mmap: map_file(&fresh, &temporary)?,
                file: fresh,
                path: path.to_owned(),
            };
            mapping.block().initialize(init);
            std::fs::rename(&temporary, path).map_err(io_error(path))?;
            Ok(mapping)
        })();
        let mapping = match built {
            Ok(mapping) => mapping,
            Err(error) => {
                let _ = std::fs::remove_file(&temporary);
                return Err(error);
            }
        };
        let old = map_file(&file, path)?;
        if old.len() >= std::mem::size_of::<AtomicU64>() {
            // SAFETY: the mapping is page aligned and at least 8 bytes long; the magic is the
            // first field of every layout, only ever accessed as an AtomicU64.
            let magic = unsafe { &*old.as_ptr().cast::<AtomicU64>() };
            magic.store(0, Ordering::Release);
        }
        // The old file stays open and locked: a process that opened it just before the rename
        // must still find it held by a live owner.
        Ok(OwnedControlBlock {
            mapping,
            _previous: Some(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.mapping.path
    }
}

impl Drop for OwnedControlBlock {
    fn drop(&mut self) {
        self.set_lifecycle(Lifecycle::Stopped);
    }
}

impl Deref for OwnedControlBlock {
    type Target = ControlBlock;
    fn deref(&self) -> &ControlBlock {
        self.mapping.block()
    }
}

/// The control plane's handle: attaches to a block the data plane created.
#[derive(Debug)]
pub struct AttachedControlBlock {
    mapping: Mapping,
    instance: u64,
}

impl AttachedControlBlock {
    /// Attaches to an initialized block, validating magic, layout version and size.
    pub fn attach(path: &Path) -> Result<Self, ControlBlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_error(path))?;
        let length = file.metadata().map_err(io_error(path))?.len();
        if length != CONTROL_BLOCK_SIZE as u64 {
            return Err(ControlBlockError::SizeMismatch {
                path: path.to_owned(),
                found: length,
                expected: CONTROL_BLOCK_SIZE as u64,
            });
        }
        let mmap = map_file(&file, path)?;
        let mapping = Mapping {
            mmap,
            file,
            path: path.to_owned(),
        };
        let block = mapping.block();
        let magic = block.header.magic.load(Ordering::Acquire);
        if magic != CONTROL_BLOCK_MAGIC {
            return Err(ControlBlockError::BadMagic {
                path: path.to_owned(),
                found: magic,
            });
        }
        let version = block.header.layout_version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(ControlBlockError::VersionMismatch {
                path: path.to_owned(),
                found: version,
            });
        }
        let recorded = block.header.size.load(Ordering::Relaxed);
        if recorded != CONTROL_BLOCK_SIZE as u64 {
            return Err(ControlBlockError::SizeMismatch {
                path: path.to_owned(),
                found: recorded,
                expected: CONTROL_BLOCK_SIZE as u64,
            });
        }
        let instance = block.header.instance.load(Ordering::Relaxed);
        Ok(AttachedControlBlock { mapping, instance })
    }

    /// False once the data plane that this handle attached to has been replaced or has
    /// re-created the block: the caller should attach again.
    pub fn is_current(&self) -> bool {
        self.header.magic.load(Ordering::Acquire) == CONTROL_BLOCK_MAGIC
            && self.header.instance.load(Ordering::Relaxed) == self.instance
    }

    pub fn path(&self) -> &Path {
        &self.mapping.path
    }

    /// False once the file at this handle's path is no longer the file it mapped (removed, or
    /// replaced by a new file): the mapping then shows a block nobody writes any more, and the
    /// caller should attach again.
    pub fn is_file_at_path(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (
            std::fs::metadata(&self.mapping.path),
            self.mapping.file.metadata(),
        ) {
            (Ok(at_path), Ok(mapped)) => {
                at_path.dev() == mapped.dev() && at_path.ino() == mapped.ino()
            }
            _ => false,
        }
    }
}

impl Deref for AttachedControlBlock {
    type Target = ControlBlock;
    fn deref(&self) -> &ControlBlock {
        self.mapping.block()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> ControlBlockInit {
        ControlBlockInit {
            cluster: "test".into(),
            node_id: 1,
            node_count: 3,
            worker_count: 2,
            transport: TransportKind::Shm,
        }
    }

    #[test]
    fn create_attach_share_knobs_and_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("block");
        let owned = OwnedControlBlock::create(&path, &init()).unwrap();
        let attached = AttachedControlBlock::attach(&path).unwrap();
        assert_eq!(attached.cluster_name(), "test");
        assert_eq!(attached.node_id(), 1);
        assert_eq!(
            attached.knob(Knob::PrepareBatch),
            Knob::PrepareBatch.spec().default
        );

        let epoch = owned.knob_epoch();
        attached
            .set_knobs(&[(Knob::Multicast, 0), (Knob::PrepareBatch, 4)])
            .unwrap();
        assert_eq!(owned.knob(Knob::Multicast), 0);
        assert_eq!(owned.knob(Knob::PrepareBatch), 4);
        assert!(owned.knob_epoch() > epoch);

        // A refused change applies nothing, not even its valid part.
        assert!(
            attached
                .set_knobs(&[(Knob::WriteBatch, 3), (Knob::PrepareBatch, 999)])
                .is_err()
        );
        assert_eq!(
            owned.knob(Knob::WriteBatch),
            Knob::WriteBatch.spec().default
        );
        assert_eq!(owned.knob(Knob::PrepareBatch), 4);

        let address = EndpointAddress::Shm { port: 5 };
        owned.worker(1).local_endpoint.store(Some(&address));
        assert_eq!(attached.worker(1).local_endpoint.load(), Some(address));
        assert_eq!(attached.worker(0).local_endpoint.load(), None);

        owned.worker(0).add(Counter::ReadsCompleted, 3);
        owned.worker(1).add(Counter::ReadsCompleted, 4);
        assert_eq!(attached.counter_total(Counter::ReadsCompleted), 7);
    }

    #[test]
    fn second_owner_is_refused_and_takeover_after_exit_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("block");
        let first = OwnedControlBlock::create(&path, &init()).unwrap();
        let attached = AttachedControlBlock::attach(&path).unwrap();
        match OwnedControlBlock::create(&path, &init()) {
            Err(ControlBlockError::HeldByLiveProcess { pid, .. }) => {
                assert_eq!(pid, std::process::id())
            }
            other => panic!("expected HeldByLiveProcess, got {other:?}"),
        }
        drop(first);
        assert_eq!(attached.lifecycle(), Lifecycle::Stopped);
        let _second = OwnedControlBlock::create(&path, &init()).unwrap();
        assert!(
            !attached.is_current(),
            "the old attachment must notice the new instance"
        );
        assert!(AttachedControlBlock::attach(&path).unwrap().is_current());
    }

    #[test]
    fn wrong_magic_version_and_size_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, b"hello").unwrap();
        let error = AttachedControlBlock::attach(&short).unwrap_err();
        assert!(
            matches!(error, ControlBlockError::SizeMismatch { found: 5, .. }),
            "{error}"
        );

        let zeroed = dir.path().join("zeroed");
        std::fs::write(&zeroed, vec![0u8; CONTROL_BLOCK_SIZE]).unwrap();
        let error = AttachedControlBlock::attach(&zeroed).unwrap_err();
        assert!(
            matches!(error, ControlBlockError::BadMagic { found: 0, .. }),
            "{error}"
        );

        let path = dir.path().join("block");
        let owned = OwnedControlBlock::create(&path, &init()).unwrap();
        owned
            .header
            .layout_version
            .store(LAYOUT_VERSION + 1, Ordering::Relaxed);
        let error = AttachedControlBlock::attach(&path).unwrap_err();
        assert!(error.to_string().contains("layout version"), "{error}");
    }

    #[test]
    fn registry_state_codes_round_trip_and_replaced_files_are_noticed() {
        for state in RegistryState::ALL {
            assert_eq!(RegistryState::from_code(state.code()), state);
        }
        assert_eq!(RegistryState::from_code(99), RegistryState::Unknown);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("block");
        let owned = OwnedControlBlock::create(&path, &init()).unwrap();
        let attached = AttachedControlBlock::attach(&path).unwrap();
        assert_eq!(attached.registry_state(), RegistryState::Unknown);
        attached.set_registry_state(RegistryState::Ready);
        assert_eq!(owned.registry_state(), RegistryState::Ready);
        assert!(attached.is_file_at_path());
        drop(owned);
        std::fs::remove_file(&path).unwrap();
        assert!(!attached.is_file_at_path());
        let _new = OwnedControlBlock::create(&path, &init()).unwrap();
        assert!(!attached.is_file_at_path());
        assert!(
            AttachedControlBlock::attach(&path)
                .unwrap()
                .is_file_at_path()
        );
    }

    #[test]
    fn takeover_never_faults_a_process_still_reading_the_old_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("block");
        let mut owner = OwnedControlBlock::create(&path, &init()).unwrap();
        let attached = AttachedControlBlock::attach(&path).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let owner = std::thread::scope(|scope| {
            scope.spawn(|| {
                // Reads every part of the old mapping while the owner is replaced: with a
                // shrinking takeover this faults (SIGBUS) and kills the test process.
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(attached.remote[MAX_NODES - 1][MAX_WORKERS - 1].load());
                    std::hint::black_box(attached.knob(Knob::StatsIntervalMs));
                    attached.controlplane_heartbeat();
                }
            });
            for _ in 0..20 {
                drop(owner);
                owner = OwnedControlBlock::create(&path, &init()).unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            owner
        });
        assert!(!attached.is_current());
        let again = AttachedControlBlock::attach(&path).unwrap();
        assert!(again.is_current() && again.is_file_at_path());
        assert_eq!(
            again.header.instance.load(Ordering::Relaxed),
            owner.header.instance.load(Ordering::Relaxed)
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn bad_init_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad = init();
        bad.worker_count = 0;
        assert!(OwnedControlBlock::create(&dir.path().join("a"), &bad).is_err());
        let mut bad = init();
        bad.node_id = 3;
        assert!(OwnedControlBlock::create(&dir.path().join("b"), &bad).is_err());
        let mut bad = init();
        bad.cluster = "x".repeat(40);
        assert!(OwnedControlBlock::create(&dir.path().join("c"), &bad).is_err());
    }
}
