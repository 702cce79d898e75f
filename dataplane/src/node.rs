//! One data-plane node: creates the control block, the replica and the transports, publishes
//! the local endpoints, learns the peers' (from the configuration or from the control plane
//! through the control block), starts one pinned worker per pipeline, prints a stats line
//! every few seconds and a JSON summary at the end.
//!
//! Touches: the control block file, the transports it opens, the worker threads it starts,
//! stdout (stats lines), SIGINT/SIGTERM (to stop cleanly), and, with `--capture-corpus`, the
//! corpus directory at shutdown.

pub mod memory;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rzab_shared::control_block::{ControlBlock, Lifecycle, SyncState};
use rzab_shared::counters::{HistogramSnapshot, Percentiles};
use rzab_shared::limits::{MAX_NODES, MAX_WORKERS};
use rzab_shared::{
    ControlBlockInit, Counter, EndpointAddress, Knob, OwnedControlBlock, TransportKind,
};

use crate::capture::{CaptureSink, CapturingTransport};
use crate::config::{Options, PeerDiscovery};
use crate::replica::NodeReplica;
use crate::store::StoreConfig;
use crate::transport::fault::{FaultConfig, FaultyTransport};
use crate::transport::shm::{ShmConfig, ShmTransport};
use crate::transport::udp::{UdpConfig, UdpTransport};
use crate::transport::{MulticastGroup, Transport, TransportError};
use crate::worker::{MAX_CHAIN, NodeShared, Peers, Worker};
use crate::workload::{Sessions, Trace};
use crate::zab::follower::LEADER_NODE;
use crate::zab::wire::{self, Integrity, cluster_tag, run_tag};
use crate::zab::{
    CatchupBoard, LEADER_EPOCH, PipelineConfig, ZxidSource, follower_recv_slots, leader_recv_slots,
};

/// Requests pre-built per worker.
const TRACE_LEN: usize = 1 << 18;

/// What a node reports when it stops.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub node: u8,
    pub seconds: f64,
    pub reads: u64,
    pub writes: u64,
    pub ops_per_second: f64,
    /// Write latency (issue to local apply) over the run, in ns: p50, p99 and p99.9 from the
    /// log-linear histogram (within 0.78% of the exact sample), and the exact maximum.
    pub write_p50_ns: u64,
    pub write_p99_ns: u64,
    pub write_p999_ns: u64,
    pub write_max_ns: u64,
    pub applied_zxid: u64,
    /// Digest of the applied sequence (differs on a node that caught up by snapshot).
    pub digest: u64,
    /// Digest of the store's contents: equal on every replica that applied the same prefix.
    pub store_digest: u64,
    /// Messages this node sent again (prepares, commits, forwarded writes).
    pub retransmissions: u64,
    /// How long the workers drained after clients stopped (they stop once nothing but
    /// heartbeats has arrived for a while, or after `worker::DRAIN_MAX`).
    pub drain_seconds: f64,
    /// Elections this node started (its leader, or as leader its quorum, silent for the
    /// election timeout), and the epoch it ended in.
    pub elections: u64,
    pub epoch: u64,
    // history hook: what --history-dir recorded (absent when off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<crate::history::HistoryReport>,
}

/// The largest datagram a node sends unless `--datagram-bytes` says otherwise: over shared
/// memory a large datagram costs one copy like a small one, so fewer fragments are cheaper;
/// over the network 4 KiB stays within one jumbo frame and a UD MTU.
fn datagram_cap(options: &Options) -> usize {
    options.datagram_bytes.unwrap_or(match options.transport {
        TransportKind::Shm => 64 << 10,
        TransportKind::Udp | TransportKind::Verbs => 4 << 10,
    })
}

/// The datagram size the protocol needs for the transactions of `options`: room for 16 of
/// the shortest, and for an entry of the longest's default slot, capped at [`datagram_cap`]
/// (larger ones just mean fewer per message, and one too large for a datagram travels as
/// fragments).
fn needed_mtu(options: &Options) -> usize {
    let (shortest, longest) = txn_lengths(options);
    let share = longest.div_ceil(crate::zab::DEFAULT_MAX_FRAGMENTS);
    let largest = wire::prepare_len(16, shortest)
        .max(wire::write_len(16, shortest))
        .max(wire::prepare_len(1, share));
    largest.next_multiple_of(64).clamp(
        wire::prepare_len(1, 8).next_multiple_of(64),
        datagram_cap(options).max(wire::prepare_len(1, 8).next_multiple_of(64)),
    )
}

/// The shortest and longest transaction of a run of `options`: the key-value store's "set K
/// to V", for the shortest and longest value its sessions write.
fn txn_lengths(options: &Options) -> (usize, usize) {
    let (shortest, longest) = options.value_lengths();
    (
        crate::replica::kv_txn_len(shortest),
        crate::replica::kv_txn_len(longest),
    )
}

/// The pipeline configuration every worker of a node of `options` shares but for the fields
/// that name the worker, its process and its transport (`pipeline`, `instance`, `mtu`, `run`,
/// `integrity`), which the caller sets: the memory plan sizes the rings from it.
fn pipeline_shape(options: &Options, mtu: usize) -> PipelineConfig {
    let (shortest, longest) = txn_lengths(options);
    PipelineConfig {
        node: options.node,
        nodes: options.nodes,
        pipeline: 0,
        pipelines: options.workers,
        max_txn_len: longest,
        slot_len: PipelineConfig::default_slot_len(shortest, longest, mtu),
        item_len: options.value_size.next_multiple_of(8),
        cluster_tag: cluster_tag(&options.cluster),
        run: run_tag(&options.run_id),
        epoch: LEADER_EPOCH,
        integrity: Integrity::Crc32c,
        sessions: options.sessions,
        window: options.window,
        retained: 0,
        mtu,
        keys: options.keys,
        instance: 1,
        fingerprint: options.fingerprint(),
    }
    .with_retained(options.committed_ring_bytes)
}

// The receive rings are sized by zab's credit maxima, which must be the tops of the credit
// knobs' ranges (shared/src/limits.rs): a knob set above them would overrun the rings.
const _: () = assert!(
    crate::zab::MAX_PREPARE_CREDITS == rzab_shared::limits::MAX_PREPARE_CREDITS
        && crate::zab::MAX_WRITE_CREDITS == rzab_shared::limits::MAX_WRITE_CREDITS
        && crate::zab::MAX_COMMIT_CREDITS == rzab_shared::limits::MAX_COMMIT_CREDITS
);

fn recv_slots(nodes: u8) -> usize {
    leader_recv_slots(usize::from(nodes).saturating_sub(1).max(1)).max(follower_recv_slots())
}

/// Runs a node until its duration ends or it is signalled.
pub fn run(options: &Options) -> anyhow::Result<Summary> {
    options.validate()?;
    // Refuse a missing or unsafe cluster secret before anything is created.
    options.integrity()?;
    // Before anything is allocated: a configuration the machine cannot hold is refused with
    // the sizes and the options that ask for them, not aborted in the allocator.
    memory::check(options)?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))
        .context("installing SIGINT handler")?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))
        .context("installing SIGTERM handler")?;

    let block_path = options.control_block_path();
    let block = OwnedControlBlock::create(
        &block_path,
        &ControlBlockInit {
            cluster: options.cluster.clone(),
            node_id: u32::from(options.node),
            node_count: u32::from(options.nodes),
            worker_count: u32::from(options.workers),
            transport: options.transport,
        },
    )
    .with_context(|| format!("creating control block {}", block_path.display()))?;
    block.set_knobs(&options.knob_overrides()?)?;

    let replica = NodeReplica::new(&StoreConfig {
        keys: options.keys,
        value_size: options.value_size,
        hugepages: true,
    })
    .context("building the store")?;
    let zxids = ZxidSource::new();
    let mtu = needed_mtu(options);
    let slots = recv_slots(options.nodes);

    match options.transport {
        TransportKind::Shm => {
            let fabric = options.fabric_name();
            let workers = options.workers;
            let open = |worker: u8| {
                ShmTransport::open(&ShmConfig {
                    fabric: fabric.clone(),
                    dir: options.shm_dir.clone(),
                    port: u32::from(options.node) * u32::from(workers) + u32::from(worker),
                    ports: u32::from(options.nodes) * u32::from(workers),
                    ring_slots: u32::try_from(slots).unwrap_or(u32::MAX),
                    mtu: u32::try_from(mtu).unwrap_or(u32::MAX),
                    max_chain: MAX_CHAIN,
                })
            };
            let address = |node: u8, worker: u8| EndpointAddress::Shm {
                port: u32::from(node) * u32::from(workers) + u32::from(worker),
            };
            run_maybe_faulty(options, &block, &replica, &zxids, &stop, open, address)
        }
        TransportKind::Udp => {
            // Every node's ports, computed once: validate() refused a base whose ports would
            // pass 65535, and a port that still did not fit is an error, never a wrapped sum.
            let mut ports = [[0u16; MAX_WORKERS]; MAX_NODES];
            for node in 0..options.nodes {
                for worker in 0..options.workers {
                    ports[usize::from(node)][usize::from(worker)] =
                        options.udp_port(node, worker).with_context(|| {
                            format!(
                                "udp port of node {node} worker {worker} is past 65535 (--udp-port-base {})",
                                options.udp_port_base
                            )
                        })?;
                }
            }
            let port = |node: u8, worker: u8| ports[usize::from(node)][usize::from(worker)];
            let open = |worker: u8| {
                UdpTransport::open(&UdpConfig {
                    bind: std::net::SocketAddrV4::new(
                        options.udp_host(options.node),
                        port(options.node, worker),
                    ),
                    multicast_base: options.multicast_base,
                    multicast_port: options.multicast_port,
                    mtu,
                    recv_slots: slots,
                    max_chain: MAX_CHAIN,
                    socket_buffer: 8 << 20,
                })
            };
            let address = |node: u8, worker: u8| EndpointAddress::Udp {
                ip: options.udp_host(node),
                port: port(node, worker),
            };
            run_maybe_faulty(options, &block, &replica, &zxids, &stop, open, address)
        }
        TransportKind::Verbs => run_verbs(options, &block, &replica, &zxids, &stop, mtu, slots),
    }
}

#[cfg(feature = "verbs")]
fn run_verbs(
    options: &Options,
    block: &ControlBlock,
    replica: &NodeReplica,
    zxids: &ZxidSource,
    stop: &Arc<AtomicBool>,
    mtu: usize,
    slots: usize,
) -> anyhow::Result<Summary> {
    use crate::transport::verbs::{VerbsConfig, VerbsTransport};
    let open = |_worker: u8| {
        VerbsTransport::open(&VerbsConfig {
            device: options.verbs_device.clone(),
            port: options.verbs_port,
            gid_index: options.verbs_gid_index,
            mtu,
            recv_slots: slots,
            max_chain: MAX_CHAIN,
            ..VerbsConfig::default()
        })
    };
    let no_static = |_node: u8, _worker: u8| EndpointAddress::Shm { port: u32::MAX };
    run_maybe_faulty(options, block, replica, zxids, stop, open, no_static)
}

#[cfg(not(feature = "verbs"))]
fn run_verbs(
    _options: &Options,
    _block: &ControlBlock,
    _replica: &NodeReplica,
    _zxids: &ZxidSource,
    _stop: &Arc<AtomicBool>,
    _mtu: usize,
    _slots: usize,
) -> anyhow::Result<Summary> {
    bail!(
        "this rzab-dataplane was built without the verbs transport: rebuild with `cargo build --release --features verbs` (needs libibverbs-dev and librdmacm-dev), or use --transport shm or --transport udp"
    )
}

/// Runs over the transport `open` gives, wrapped in a fault injector when the options ask
/// for injected loss, duplication or reordering. Every backend enters through here, so the
/// wrappers (this one, and the capture that `run_with` puts outermost) stack alike on all of
/// them; calling `run_with` directly would silently drop the `--inject-*` options.
fn run_maybe_faulty<T, Open, Address>(
    options: &Options,
    block: &ControlBlock,
    replica: &NodeReplica,
    zxids: &ZxidSource,
    stop: &Arc<AtomicBool>,
    open: Open,
    static_address: Address,
) -> anyhow::Result<Summary>
where
    T: Transport + Send,
    T::Address: Send,
    Open: Fn(u8) -> Result<T, TransportError>,
    Address: Fn(u8, u8) -> EndpointAddress,
{
    match options.faults() {
        None => run_with(options, block, replica, zxids, stop, open, static_address),
        Some(faults) => {
            let open_faulty = |worker: u8| {
                open(worker).map(|transport| {
                    FaultyTransport::new(
                        transport,
                        FaultConfig {
                            seed: faults.seed ^ u64::from(worker),
                            ..faults
                        },
                    )
                })
            };
            run_with(
                options,
                block,
                replica,
                zxids,
                stop,
                open_faulty,
                static_address,
            )
        }
    }
}

/// Waits for the control plane to publish the remote table.
fn wait_for_control_plane(
    block: &ControlBlock,
    stop: &AtomicBool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut announced = false;
    while block.handshake.peers_generation.load(Ordering::Acquire) == 0 {
        if stop.load(Ordering::Relaxed) {
            bail!("stopped while waiting for the control plane");
        }
        if Instant::now() > deadline {
            bail!(
                "no peer table from rzab-controlplane within {} s: is it running for this node's control block?",
                timeout.as_secs()
            );
        }
        if !announced {
            println!("waiting for rzab-controlplane to publish the peers' endpoints");
            announced = true;
        }
        block.dataplane_heartbeat();
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn run_with<T, Open, Address>(
    options: &Options,
    block: &ControlBlock,
    replica: &NodeReplica,
    zxids: &ZxidSource,
    stop: &Arc<AtomicBool>,
    open: Open,
    static_address: Address,
) -> anyhow::Result<Summary>
where
    T: Transport + Send,
    T::Address: Send,
    Open: Fn(u8) -> Result<T, TransportError>,
    Address: Fn(u8, u8) -> EndpointAddress,
{
    let node = options.node;
    let capture = CaptureSink::open(options.capture_corpus.as_deref(), node, block);
    // Open every endpoint and post its receives before anyone can learn its address.
    let mut transports = Vec::with_capacity(usize::from(options.workers));
    for worker in 0..options.workers {
        let opened = open(worker).with_context(|| {
            format!(
                "opening the {} transport for worker {worker}",
                options.transport.name()
            )
        })?;
        let mut transport = CapturingTransport::new(opened, capture.clone(), worker);
        transport.post_recv(transport.caps().recv_slots);
        // Every node is a member: whichever leads sends to the others through it.
        transport
            .join_multicast(MulticastGroup(u16::from(worker)))
            .with_context(|| format!("joining multicast group {worker}"))?;
        block
            .worker(usize::from(worker))
            .local_endpoint
            .store(Some(&transport.local_address()));
        transports.push(transport);
    }
    block.handshake.endpoints_published.store(
        block.header.instance.load(Ordering::Relaxed),
        Ordering::Release,
    );
    block.set_lifecycle(Lifecycle::WaitingForPeers);

    match options.peers {
        PeerDiscovery::Static => {
            for peer in 0..options.nodes {
                for worker in 0..options.workers {
                    block.remote[usize::from(peer)][usize::from(worker)]
                        .store(Some(&static_address(peer, worker)));
                }
            }
        }
        PeerDiscovery::ControlPlane => {
            wait_for_control_plane(block, stop, Duration::from_secs(options.join_timeout))?
        }
    }

    // The table the workers resolve now; a later generation (a restarted peer) is re-read.
    let peers_generation = block.handshake.peers_generation.load(Ordering::Acquire);
    let mut history = crate::history::NodeHistory::start(options, block, replica)?; // history hook
    let tag = cluster_tag(&options.cluster);
    let integrity = options.integrity()?;
    // A process starts its sessions' sequences at its start time in microseconds. A session
    // has one write outstanding and a commit takes longer than a microsecond, so a restarted
    // process's sequences are above every one its predecessor used: the leader's exactly-once
    // table, which a new leader inherits without knowing which process of a node filled a row,
    // takes them as new (sequences of the same second were once dropped as repeats). Write ids
    // hold the sequence's low 32 bits, which repeat only after 71 minutes.
    let first_sequence = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX >> 1))
        .unwrap_or(1)
        .max(1);
    let mut workers = Vec::with_capacity(transports.len());
    for (worker, mut transport) in (0..options.workers).zip(transports) {
        let remote = |peer: u8| {
            block.remote[usize::from(peer)][usize::from(worker)]
                .load()
                .with_context(|| format!("no endpoint known for node {peer} worker {worker}"))
        };
        // Any node may lead: every one resolves every other, and the group.
        let mut peers = Peers {
            followers: [None; MAX_NODES],
            group: None,
        };
        for peer in (0..options.nodes).filter(|peer| *peer != node) {
            peers.followers[usize::from(peer)] = Some(transport.resolve(&remote(peer)?)?);
        }
        if options.nodes > 1 {
            peers.group = transport
                .multicast_address(MulticastGroup(u16::from(worker)))
                .ok();
        }
        let config = PipelineConfig {
            node,
            pipeline: worker,
            cluster_tag: tag,
            integrity,
            instance: block.header.instance.load(Ordering::Relaxed).max(1),
            ..pipeline_shape(options, transport.caps().mtu)
        }
        .with_retained(options.committed_ring_bytes);
        config.validate().context("the pipeline configuration")?;
        let seed = options.seed ^ (u64::from(node) << 16) ^ (u64::from(worker) << 8);
        let trace = Trace::build(options.keys, options.key_distribution(), TRACE_LEN, seed)?;
        let sessions = Sessions::new(node, worker, options.sessions, trace, options.value_size)
            .with_value_mix(&options.value_mix)
            .with_first_sequence(first_sequence);
        let mut worker = Worker::new(config, LEADER_NODE, transport, sessions, peers);
        worker.set_peers_generation(peers_generation);
        workers.push(worker);
    }
    for (index, worker) in workers.iter_mut().enumerate() {
        worker.record_history(history.recorder(index)); // history hook
    }

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let pin = match options.pin.as_str() {
        "on" => !cores.is_empty(),
        "off" => false,
        _ => cores.len() >= usize::from(options.nodes) * usize::from(options.workers),
    };
    let board = CatchupBoard::new(usize::from(options.workers));
    let serving = AtomicUsize::new(0);
    let shared = NodeShared {
        block,
        replica,
        zxids,
        board: &board,
        serving: &serving,
        pipelines: usize::from(options.workers),
        stop,
    };
    let joined = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let failure: std::sync::Mutex<Option<anyhow::Error>> = std::sync::Mutex::new(None);
    let started = Instant::now();
    let mut summary = None;
    std::thread::scope(|scope| {
        for (index, mut worker) in workers.into_iter().enumerate() {
            let shared = &shared;
            let joined = &joined;
            let finished = &finished;
            let failure = &failure;
            let core = cores
                .get(
                    (usize::from(node) * usize::from(options.workers) + index) % cores.len().max(1),
                )
                .copied();
            let timeout = Duration::from_secs(options.join_timeout);
            let spawned = std::thread::Builder::new()
                .name(format!("rzab-worker-{index}"))
                .spawn_scoped(scope, move || {
                    if let (true, Some(core)) = (pin, core) {
                        core_affinity::set_for_current(core);
                    }
                    if let Err(error) = worker.join(shared, timeout) {
                        if let Ok(mut slot) = failure.lock() {
                            slot.get_or_insert(error.into());
                        }
                        shared.stop.store(true, Ordering::Relaxed);
                        return;
                    }
                    joined.fetch_add(1, Ordering::AcqRel);
                    if let Err(error) = worker.run(shared) {
                        if let Ok(mut slot) = failure.lock() {
                            slot.get_or_insert(error.into());
                        }
                        shared.stop.store(true, Ordering::Relaxed);
                    }
                    finished.fetch_add(1, Ordering::AcqRel);
                });
            if let Err(error) = spawned {
                // The node cannot run short of a pipeline: stop the started workers and
                // report why, instead of exiting as if the run had ended.
                if let Ok(mut slot) = failure.lock() {
                    slot.get_or_insert(
                        anyhow::Error::new(error)
                            .context(format!("starting the thread of worker {index}")),
                    );
                }
                stop.store(true, Ordering::Relaxed);
                break;
            }
        }
        summary = Some(report_until_stopped(
            options, &shared, &joined, &finished, started,
        ));
    });
    block.set_lifecycle(Lifecycle::Stopping);
    let history_report = history.finish(); // history hook: every worker has dropped its recorder
    if let Ok(mut slot) = failure.lock() {
        if let Some(error) = slot.take() {
            return Err(error);
        }
    }
    let mut summary = summary.context("the node stopped before reporting")?;
    summary.history = history_report?; // history hook
    Ok(summary)
}

/// Totals over the node's workers, for the stats line.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    reads: u64,
    writes: u64,
    batch: [(u64, u64); 4],
}

impl Totals {
    fn read(block: &ControlBlock) -> Self {
        let total = |counter| block.counter_total(counter);
        Totals {
            reads: total(Counter::ReadsCompleted),
            writes: total(Counter::WritesCompleted),
            batch: [
                (
                    total(Counter::BatchEntriesPrepare),
                    total(Counter::BatchMessagesPrepare),
                ),
                (
                    total(Counter::BatchEntriesWrite),
                    total(Counter::BatchMessagesWrite),
                ),
                (
                    total(Counter::BatchEntriesAck),
                    total(Counter::BatchMessagesAck),
                ),
                (
                    total(Counter::BatchEntriesCommit),
                    total(Counter::BatchMessagesCommit),
                ),
            ],
        }
    }
}

fn latency(block: &ControlBlock) -> HistogramSnapshot {
    let mut merged = HistogramSnapshot::default();
    for worker in 0..usize::try_from(block.worker_count()).unwrap_or(0) {
        merged.merge(&block.worker(worker).write_latency_ns.snapshot());
    }
    merged
}

/// What this node is, by what its first pipeline says of the leader.
fn role_name(options: &Options, block: &ControlBlock) -> &'static str {
    match block.worker(0).gauges.leader_node() {
        Some(leader) if leader == u32::from(options.node) => "leader",
        Some(_) => "follower",
        None => "electing",
    }
}

/// Prints a line whenever the node's first pipeline takes another leader or epoch: who leads
/// now, and how long the election took.
fn report_leader_changes(options: &Options, block: &ControlBlock, last: &mut (Option<u32>, u64)) {
    let gauges = &block.worker(0).gauges;
    let now = (gauges.leader_node(), gauges.epoch.load(Ordering::Relaxed));
    if now == *last || now.0.is_none() {
        return;
    }
    if last.0.is_some() {
        let took = gauges.last_election_ns.load(Ordering::Relaxed);
        println!(
            "node {}: node {} leads epoch {} (was node {} in epoch {}); the election took {:.1} ms",
            options.node,
            now.0.unwrap_or(0),
            now.1,
            last.0.unwrap_or(0),
            last.1,
            took as f64 / 1e6
        );
    }
    *last = now;
}

/// Prints a line whenever a pipeline enters or leaves a state of trouble (no leader heard, no
/// quorum heard, left behind), so that an operator sees it in the log as well as in the
/// status, health and metrics.
fn report_state_changes(options: &Options, block: &ControlBlock, states: &mut [SyncState]) {
    for (worker, last) in states.iter_mut().enumerate() {
        let state = block.worker(worker).sync_state();
        if state == *last {
            continue;
        }
        match (last.trouble(), state.trouble()) {
            (_, Some(trouble)) => {
                let timeout = if state == SyncState::Electing {
                    Knob::ElectionTimeoutMs
                } else {
                    Knob::PeerTimeoutMs
                };
                println!(
                    "node {} pipeline {worker}: {} ({trouble}; {} = {})",
                    options.node,
                    state.name(),
                    timeout.spec().name,
                    block.knob(timeout)
                );
            }
            (Some(_), None) => println!(
                "node {} pipeline {worker}: {} again (was {})",
                options.node,
                state.name(),
                last.name()
            ),
            (None, None) => {}
        }
        *last = state;
    }
}

fn report_until_stopped(
    options: &Options,
    shared: &NodeShared<'_>,
    joined: &AtomicUsize,
    finished: &AtomicUsize,
    started: Instant,
) -> Summary {
    let block = shared.block;
    let mut leadership = (None, 0u64);
    let mut running_since: Option<Instant> = None;
    let mut last = Totals::read(block);
    let mut last_print = Instant::now();
    let mut start_totals = last;
    let mut last_latency = latency(block);
    let mut announced_serving = false;
    let mut states = vec![SyncState::Starting; usize::from(options.workers)];
    loop {
        std::thread::sleep(Duration::from_millis(50));
        block.dataplane_heartbeat();
        report_state_changes(options, block, &mut states);
        report_leader_changes(options, block, &mut leadership);
        let role = role_name(options, block);
        if running_since.is_none() && joined.load(Ordering::Acquire) == usize::from(options.workers)
        {
            running_since = Some(Instant::now());
            start_totals = Totals::read(block);
            block.set_lifecycle(Lifecycle::Running);
            println!(
                "node {} ({role}) running: {} workers, {} transport, cluster {}",
                options.node,
                options.workers,
                options.transport.name(),
                options.cluster
            );
        }
        if let (Some(since), false) = (running_since, announced_serving) {
            if shared.serving.load(Ordering::Acquire) >= shared.pipelines {
                announced_serving = true;
                let installed = block.counter_total(Counter::CatchupEntriesReceived);
                if installed > 0 {
                    println!(
                        "node {} caught up: {installed} store entries installed from the leader's snapshot; serving after {} ms",
                        options.node,
                        since.elapsed().as_millis()
                    );
                }
            }
        }
        let duration_over = running_since.is_some_and(|since| {
            options.duration > 0 && since.elapsed() >= Duration::from_secs(options.duration)
        });
        if duration_over {
            shared.stop.store(true, Ordering::Relaxed);
        }
        let stopping = shared.stop.load(Ordering::Relaxed);
        let interval = Duration::from_millis(block.knob(Knob::StatsIntervalMs));
        if running_since.is_some() && (last_print.elapsed() >= interval) && !stopping {
            let now = Totals::read(block);
            let now_latency = latency(block);
            let seconds = last_print.elapsed().as_secs_f64();
            let interval_latency = now_latency.since(&last_latency).percentiles();
            print_stats_line(
                options,
                role,
                block,
                (&last, &now),
                interval_latency,
                seconds,
            );
            last = now;
            last_latency = now_latency;
            last_print = Instant::now();
        }
        if stopping {
            break;
        }
    }
    // Clients stop issuing here; what follows is the drain.
    let stopped_at = Instant::now();
    // Workers drain what is in flight (at most DRAIN_MAX) before they return; workers that
    // never joined return at once.
    let running = joined.load(Ordering::Acquire);
    let drain_deadline = Instant::now() + crate::worker::DRAIN_MAX + Duration::from_secs(1);
    while finished.load(Ordering::Acquire) < running && Instant::now() < drain_deadline {
        block.dataplane_heartbeat();
        std::thread::sleep(Duration::from_millis(10));
    }
    let end = Totals::read(block);
    // Rates are over the time clients ran: the drain issues nothing.
    let seconds = running_since
        .map_or(started.elapsed(), |since| stopped_at.duration_since(since))
        .as_secs_f64();
    let write_latency = latency(block).percentiles();
    let reads = end.reads - start_totals.reads;
    let writes = end.writes - start_totals.writes;
    Summary {
        node: options.node,
        seconds,
        reads,
        writes,
        ops_per_second: if seconds > 0.0 {
            (reads + writes) as f64 / seconds
        } else {
            0.0
        },
        write_p50_ns: write_latency.p50,
        write_p99_ns: write_latency.p99,
        write_p999_ns: write_latency.p999,
        write_max_ns: write_latency.max,
        applied_zxid: shared.replica.applied_zxid(),
        digest: shared.replica.digest(),
        store_digest: shared.replica.store().digest(),
        drain_seconds: stopped_at.elapsed().as_secs_f64(),
        retransmissions: [
            Counter::RetransmitPrepare,
            Counter::RetransmitCommit,
            Counter::RetransmitWrite,
        ]
        .into_iter()
        .map(|counter| block.counter_total(counter))
        .sum(),
        elections: block.counter_total(Counter::ElectionsStarted),
        epoch: block.worker(0).gauges.epoch.load(Ordering::Relaxed),
        history: None, // history hook: filled in once the flusher is done
    }
}

fn average(delta_entries: u64, delta_messages: u64) -> f64 {
    if delta_messages == 0 {
        0.0
    } else {
        delta_entries as f64 / delta_messages as f64
    }
}

/// Nanoseconds as microseconds with three significant digits (two below 1 us).
fn micros(ns: u64) -> String {
    let us = ns as f64 / 1000.0;
    if us < 10.0 {
        format!("{us:.2}")
    } else if us < 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// The stats line over the last interval: rates from the totals `(before, now)` and the write
/// latency percentiles of the writes completed in the interval.
fn print_stats_line(
    options: &Options,
    role: &str,
    block: &ControlBlock,
    (before, now): (&Totals, &Totals),
    write_latency: Percentiles,
    seconds: f64,
) {
    let reads = (now.reads - before.reads) as f64 / seconds;
    let writes = (now.writes - before.writes) as f64 / seconds;
    let batches: Vec<f64> = now
        .batch
        .iter()
        .zip(&before.batch)
        .map(|(n, b)| average(n.0 - b.0, n.1 - b.1))
        .collect();
    let path = if block.knob(Knob::Multicast) != 0 {
        "multicast"
    } else {
        "unicast"
    };
    let zxid = block.worker(0).gauges.applied_zxid.load(Ordering::Relaxed);
    if options.json_stats {
        println!(
            "{}",
            serde_json::json!({
                "node": options.node, "ops_per_second": reads + writes, "reads_per_second": reads, "writes_per_second": writes,
                "batch": {"prepare": batches[0], "write": batches[1], "ack": batches[2], "commit": batches[3]},
                "path": path, "zxid": zxid, "write_p50_ns": write_latency.p50,
                "write_p99_ns": write_latency.p99, "write_p999_ns": write_latency.p999, "write_max_ns": write_latency.max,
            })
        );
    } else {
        println!(
            "node {} ({role}): {:.2} M ops/s (reads {:.2} M, writes {:.3} M) | batch prepare {:.1} write {:.1} ack {:.1} commit {:.1} | {path} | zxid {}:{} | write us p50 {} p99 {} p99.9 {} max {}",
            options.node,
            (reads + writes) / 1e6,
            reads / 1e6,
            writes / 1e6,
            batches[0],
            batches[1],
            batches[2],
            batches[3],
            zxid >> 32,
            zxid & 0xffff_ffff,
            micros(write_latency.p50),
            micros(write_latency.p99),
            micros(write_latency.p999),
            micros(write_latency.max),
        );
    }
}
