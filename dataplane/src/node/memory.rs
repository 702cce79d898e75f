//! What a node's configuration costs in memory, computed from the options before anything is
//! allocated, and the check that refuses a configuration the machine cannot hold. Without it a
//! large `--window` or `--keys` ended in an abort inside the allocator (or in the OOM killer)
//! half-way through start-up, with no word about which option asked for too much.
//!
//! The plan counts what grows with the options: the store, every pipeline's rings (the
//! leader's holds its committed-transaction ring), traces, transport buffers, the
//! shm fabric file and the history buffers; the control block is counted too, the other small
//! fixed allocations are not. The ring sizes mirror `Leader::new` and `Follower::new`, and
//! `dataplane/tests/memory_plan.rs` measures a built pipeline against them, so a change to
//! either side that makes the plan wrong fails a test.
//!
//! The limit is `MemAvailable` from `/proc/meminfo` (what the kernel can hand out without
//! swapping), lowered by `--max-memory-mib`. With neither (no procfs, no option) nothing is
//! checked. Each node checks on its own: nodes started together on one host each see the same
//! `MemAvailable`, so give each an explicit share with `--max-memory-mib` when they crowd a host.
//!
//! Touches: reads `/proc/meminfo`, the metadata of the shm fabric file and `statvfs` of its
//! directory; allocates nothing that lasts.

use std::ffi::CString;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rzab_shared::TransportKind;
use rzab_shared::control_block::CONTROL_BLOCK_SIZE;
use rzab_shared::limits::{MAX_NODES, MAX_WRITES_PER_MSG};

use crate::config::Options;
use crate::history::{BUFFER_BYTES, BUFFERS_PER_WORKER};
use crate::store::{BATCH_MAX, Store, StoreConfig, StoreError};
use crate::transport::shm::ShmConfig;
use crate::zab::follower::LEADER_NODE;
use crate::zab::{EntryMeta, MAX_WRITE_CREDITS};

const MIB: u64 = 1 << 20;
/// Explicit huge pages round each store region up to this.
const HUGE_PAGE: u64 = 2 << 20;
/// Longest send chain, and so staging buffers per transport (node.rs opens them with 64).
const STAGING_BUFFERS: u64 = 64;
/// The udp transport's receive scratch: one largest datagram.
const UDP_SCRATCH: u64 = 65_507;
/// Bytes of one shm ring slot's header, and of one port's control block in the fabric file.
const SHM_SLOT_HEADER: u64 = 16;
const SHM_PORT_CONTROL: u64 = 3 * 64;
/// The fabric header and group table, rounded generously (the file is rounded to 2 MiB).
const SHM_FABRIC_OVERHEAD: u64 = 2 << 20;

/// Why a configuration was refused for its memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "this node needs {} of memory, more than the {} {source_of_limit}: {breakdown}. Lower the options named",
        Bytes(*needed),
        Bytes(*limit)
    )]
    TooLarge {
        needed: u64,
        limit: u64,
        /// Where the limit comes from (MemAvailable or --max-memory-mib).
        source_of_limit: String,
        breakdown: String,
    },
    #[error(
        "the shm fabric file {} needs {} but {} has only {} free: lower --nodes, --workers or --value-size, or use a larger --shm-dir",
        path.display(),
        Bytes(*needed),
        dir.display(),
        Bytes(*free)
    )]
    ShmSpace {
        path: PathBuf,
        dir: PathBuf,
        needed: u64,
        free: u64,
    },
    #[error("sizing the store: {0}")]
    Store(#[from] StoreError),
}

/// A byte count as people read it, with the exact number.
#[derive(Clone, Copy, Debug)]
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[allow(
            clippy::cast_precision_loss,
            reason = "a rounded figure for people; the exact count follows it"
        )]
        let value = self.0 as f64;
        let (scaled, unit) = match self.0 {
            bytes if bytes >= 1 << 30 => (value / f64::from(1u32 << 30), "GiB"),
            bytes if bytes >= 1 << 20 => (value / f64::from(1u32 << 20), "MiB"),
            bytes if bytes >= 1 << 10 => (value / f64::from(1u32 << 10), "KiB"),
            _ => return write!(f, "{} bytes", self.0),
        };
        write!(f, "{scaled:.1} {unit} ({} bytes)", self.0)
    }
}

/// One part of what a node allocates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub what: &'static str,
    /// The options that size it, with their values.
    pub options: String,
    pub bytes: u64,
}

/// What a node of a configuration allocates, by part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    pub items: Vec<Item>,
}

impl MemoryPlan {
    /// The plan of `options` (which [`Options::validate`] accepted).
    pub fn of(options: &Options) -> Result<MemoryPlan, MemoryError> {
        let workers = u64::from(options.workers);
        let mtu = super::needed_mtu(options) as u64;
        let slots = super::recv_slots(options.nodes) as u64;
        let store = Store::size_for(&StoreConfig {
            keys: options.keys,
            value_size: options.value_size,
            hugepages: true,
        })?;
        let round = |bytes: usize| (bytes as u64).next_multiple_of(HUGE_PAGE);
        let mut items = vec![
            Item {
                what: "the store",
                options: format!(
                    "--keys {}, --value-size {}",
                    options.keys, options.value_size
                ),
                bytes: round(store.index_bytes).saturating_add(round(store.entries_bytes)),
            },
            Item {
                what: if options.node == LEADER_NODE {
                    "the leader's rings, with its committed-transaction ring"
                } else {
                    "the follower's rings, with its committed-transaction ring"
                },
                options: format!(
                    "--window {}, --committed-ring-bytes {}, --value-size {}, --sessions {}, --nodes {}, times --workers {}",
                    options.window,
                    options.committed_ring_bytes,
                    options.value_size,
                    options.sessions,
                    options.nodes,
                    workers
                ),
                bytes: pipeline_bytes(options).saturating_mul(workers),
            },
            Item {
                what: "the clients' traces",
                options: format!("--workers {workers}"),
                bytes: (super::TRACE_LEN as u64 * (8 + 2)).saturating_mul(workers),
            },
            Item {
                what: "the transports' buffers",
                options: format!(
                    "--transport {}, --value-size {}, --nodes {}, --workers {workers}",
                    options.transport.name(),
                    options.value_size,
                    options.nodes
                ),
                bytes: transport_bytes(options.transport, mtu, slots).saturating_mul(workers),
            },
            Item {
                what: "the control block",
                options: String::new(),
                bytes: CONTROL_BLOCK_SIZE as u64,
            },
        ];
        if options.transport == TransportKind::Shm && !fabric_path(options).exists() {
            items.push(Item {
                what: "the shm fabric file, shared by the host's nodes and created by the first",
                options: format!(
                    "--nodes {}, --workers {workers}, --value-size {}",
                    options.nodes, options.value_size
                ),
                bytes: fabric_bytes(options, mtu, slots),
            });
        }
        if options.history_dir.is_some() {
            items.push(Item {
                what: "the history buffers",
                options: format!("--history-dir, --workers {workers}"),
                bytes: (BUFFERS_PER_WORKER as u64 * BUFFER_BYTES as u64).saturating_mul(workers),
            });
        }
        Ok(MemoryPlan { items })
    }

    /// Bytes of every part.
    pub fn total(&self) -> u64 {
        self.items
            .iter()
            .fold(0u64, |total, item| total.saturating_add(item.bytes))
    }

    /// The parts, largest first, for an error message.
    fn breakdown(&self) -> String {
        let mut items: Vec<&Item> = self.items.iter().collect();
        items.sort_by_key(|item| std::cmp::Reverse(item.bytes));
        items
            .iter()
            .map(|item| {
                if item.options.is_empty() {
                    format!("{}: {}", item.what, Bytes(item.bytes))
                } else {
                    format!(
                        "{}: {}, from {}",
                        item.what,
                        Bytes(item.bytes),
                        item.options
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Bytes of a ring of `capacity` writes: `EntryRing::new` rounds the capacity up to a power of
/// two and keeps a metadata record and a value per slot.
fn ring_bytes(capacity: u64, value_size: u64) -> u64 {
    let slots = capacity
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX);
    slots.saturating_mul(std::mem::size_of::<EntryMeta>() as u64 + value_size)
}

/// What one pipeline of this node allocates for its state machine and its sessions, as
/// `Node::new` and `Sessions::new` do. With one pipeline per node any node may lead or follow
/// after an election: it is planned for the larger of the two roles (a change of role frees
/// the old role's state, all but the history it hands on, before the new one is built).
pub fn pipeline_bytes(options: &Options) -> u64 {
    let shape = super::pipeline_shape(options, super::needed_mtu(options));
    let slot = shape.slot_len as u64;
    let fragments = shape.max_fragments() as u64;
    let txn = shape.max_txn_len as u64;
    let item = if shape.snapshot_chunks() > 1 {
        shape.item_len as u64
    } else {
        0
    };
    let sessions = options.sessions.max(1) as u64;
    let window = options.window as u64;
    let nodes = u64::from(options.nodes);
    let words = |count: u64| count.saturating_mul(8);
    // The history a role hands on to the next: the committed-transaction ring and the
    // exactly-once tables (what is held, what is applied).
    let history = ring_bytes((shape.retained as u64).max(window), slot)
        .saturating_add(words(2 * MAX_NODES as u64 * sessions));
    let leader = {
        // Writes of one entry waiting for a zxid: every node's sessions, or what the
        // followers' write credits allow, whichever is more; writes of several, apart; then
        // the bulk-waiting table and the fragment assemblies.
        let credit_bound = nodes
            .saturating_sub(1)
            .saturating_mul(MAX_WRITE_CREDITS as u64 * MAX_WRITES_PER_MSG as u64)
            .saturating_add(sessions);
        let incoming = nodes.saturating_mul(sessions).max(credit_bound);
        // Writes of several entries wait apart, whole: every node's sessions' longest.
        let bulk = if fragments > 1 {
            nodes.saturating_mul(sessions).saturating_mul(fragments)
        } else {
            1
        };
        // One assembly per node and session (with buffers for the followers' sessions).
        let assemblies = if fragments > 1 {
            let per_assembly = txn + fragments.div_ceil(64) * 8;
            nodes
                .saturating_sub(1)
                .saturating_mul(sessions)
                .saturating_mul(per_assembly)
        } else {
            0
        } + if fragments > 1 || item > 0 {
            nodes.saturating_mul(sessions).saturating_mul(80)
        } else {
            0
        };
        // The node keeps its role boxed: the leader's own fields (its follower links) too.
        ring_bytes(incoming, slot)
            .saturating_add(ring_bytes(bulk, slot))
            .saturating_add(4 * MAX_NODES as u64 * sessions)
            .saturating_add(assemblies)
            .saturating_add(std::mem::size_of::<crate::zab::leader::Leader>() as u64)
    };
    // The sessions' outgoing writes, their queue, confirmations, in-flight marks and timers.
    let follower = ring_bytes(sessions.saturating_mul(fragments), slot)
        .saturating_add(words(sessions.next_power_of_two()))
        .saturating_add(words(3 * sessions))
        .saturating_add(std::mem::size_of::<crate::zab::follower::Follower>() as u64);
    let role = if may_change_roles(options) {
        leader.max(follower)
    } else if options.node == LEADER_NODE {
        leader
    } else {
        follower
    };
    // What the node keeps across an election: the local writes it carries to the next
    // leader (a ring and their sequences), the zxids it held unapplied, a transaction's
    // scratch.
    let carried = ring_bytes(sessions.saturating_mul(fragments), slot)
        .saturating_add(words(sessions))
        .saturating_add(words(window))
        .saturating_add(txn);
    // Per session a state and a sequence; one transaction to write, a batch of values read,
    // and the value lengths writes take.
    let value = options.value_size as u64;
    let mix = options.value_mix.len().max(1) as u64;
    let session_txn = crate::replica::kv_txn_len(options.value_size) as u64;
    let clients = sessions * 32 + session_txn + value * BATCH_MAX as u64 + words(mix);
    history
        .saturating_add(role)
        .saturating_add(carried)
        .saturating_add(item)
        .saturating_add(clients)
}

/// Whether this node's pipeline may lead or follow as elections decide: with one pipeline
/// per node in a cluster of several (with more, node 0 leads them for good).
pub fn may_change_roles(options: &Options) -> bool {
    options.workers == 1 && options.nodes > 1
}

/// One worker's transport buffers outside the shm fabric file: staging for sends and, for
/// udp and verbs, the receive ring.
fn transport_bytes(transport: TransportKind, mtu: u64, slots: u64) -> u64 {
    let staging = STAGING_BUFFERS * mtu;
    match transport {
        TransportKind::Shm => staging,
        TransportKind::Udp => staging + slots * mtu + UDP_SCRATCH,
        TransportKind::Verbs => staging + slots * mtu,
    }
}

fn fabric_path(options: &Options) -> PathBuf {
    ShmConfig {
        fabric: options.fabric_name(),
        dir: options.shm_dir.clone(),
        ..ShmConfig::default()
    }
    .path()
}

/// The shm fabric file: a ring of `slots` slots per port, each a header and an MTU.
fn fabric_bytes(options: &Options, mtu: u64, slots: u64) -> u64 {
    let ports = u64::from(options.nodes) * u64::from(options.workers);
    let slot = (SHM_SLOT_HEADER + mtu).next_multiple_of(64);
    (ports * (slots * slot + SHM_PORT_CONTROL) + SHM_FABRIC_OVERHEAD).next_multiple_of(HUGE_PAGE)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let kib = line.strip_prefix("MemAvailable:")?.trim();
        kib.strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()?
            .checked_mul(1024)
    })
}

/// The memory this node may use, and where that figure comes from.
pub fn limit(options: &Options) -> Option<(u64, String)> {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .as_deref()
        .and_then(parse_mem_available)
        .map(|bytes| {
            (
                bytes,
                "available (MemAvailable in /proc/meminfo)".to_owned(),
            )
        });
    let cap = options.max_memory_mib.map(|mib| {
        (
            mib.saturating_mul(MIB),
            format!("allowed (--max-memory-mib {mib})"),
        )
    });
    match (available, cap) {
        (Some(available), Some(cap)) if available.0 < cap.0 => Some(available),
        (_, Some(cap)) => Some(cap),
        (available, None) => available,
    }
}

/// Free bytes of the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stats = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call, and `stats` is a
    // writable `statvfs`, the only memory statvfs writes.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled every field of `stats`.
    let stats = unsafe { stats.assume_init() };
    #[allow(
        clippy::useless_conversion,
        reason = "the field types differ between platforms"
    )]
    let free = u64::from(stats.f_bavail).saturating_mul(u64::from(stats.f_frsize));
    Some(free)
}

/// Refuses `options` when this node would need more memory than it may use, or when the shm
/// fabric file would not fit its directory (a full tmpfs kills the process with SIGBUS on the
/// first touch of a page it cannot back). Returns the plan it checked.
pub fn check(options: &Options) -> Result<MemoryPlan, MemoryError> {
    let plan = MemoryPlan::of(options)?;
    if let Some((limit, source_of_limit)) = limit(options) {
        if plan.total() > limit {
            return Err(MemoryError::TooLarge {
                needed: plan.total(),
                limit,
                source_of_limit,
                breakdown: plan.breakdown(),
            });
        }
    }
    if options.transport == TransportKind::Shm {
        let path = fabric_path(options);
        let mtu = super::needed_mtu(options) as u64;
        let needed = fabric_bytes(options, mtu, super::recv_slots(options.nodes) as u64);
        if !path.exists() {
            if let Some(free) = free_bytes(&options.shm_dir) {
                if needed > free {
                    return Err(MemoryError::ShmSpace {
                        path,
                        dir: options.shm_dir.clone(),
                        needed,
                        free,
                    });
                }
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(args: &[&str]) -> Options {
        Options::load(
            ["rzab-dataplane", "--shm-dir", "/nonexistent-rzab-dir"]
                .iter()
                .chain(args)
                .map(|arg| (*arg).to_owned())
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn the_leader_pays_for_its_ring_and_every_worker_for_its_own() {
        let ring = [
            "--window",
            "1048576",
            "--committed-ring-bytes",
            "4294967296",
        ];
        let leader = MemoryPlan::of(&options(&[&["--node", "0"][..], &ring].concat())).unwrap();
        let follower = MemoryPlan::of(&options(&[&["--node", "1"][..], &ring].concat())).unwrap();
        // A 4 GiB ring holds 2^25 prepares of (metadata + a 40-byte transaction: the 32-byte
        // value and its key) at the leader: the largest power of two that fits.
        let entry = std::mem::size_of::<EntryMeta>() as u64 + 40;
        let retained = (1u64 << 25) * entry;
        assert!(
            retained <= 4 << 30 && 2 * retained > 4 << 30,
            "a {entry}-byte entry"
        );
        assert!(leader.total() > retained && leader.total() < retained + (512 << 20));
        let rings = |plan: &MemoryPlan| plan.items[1].bytes;
        // Every node keeps the committed-transaction ring; the leader also queues writes.
        assert!(rings(&follower) > retained && rings(&follower) <= rings(&leader));
        assert!(rings(&leader) - rings(&follower) < 64 << 20, "{follower:?}");
        let two = MemoryPlan::of(&options(&["--node", "0", "--workers", "2"])).unwrap();
        let one = MemoryPlan::of(&options(&["--node", "0"])).unwrap();
        // The committed-transaction ring is split among the workers; the rest is per worker.
        assert!(rings(&two) > rings(&one) && rings(&two) < rings(&one) * 11 / 10);
    }

    #[test]
    fn a_plan_beyond_the_cap_is_refused_naming_the_options() {
        let large = options(&[
            "--node",
            "0",
            "--window",
            "1048576",
            "--value-size",
            "1024",
            "--max-memory-mib",
            "1024",
        ]);
        let error = check(&large).unwrap_err().to_string();
        assert!(error.contains("--window 1048576"), "{error}");
        assert!(error.contains("--max-memory-mib 1024"), "{error}");
        assert!(error.contains("(1073741824 bytes)"), "{error}");
        // The defaults fit a machine that has 1 GiB to spare.
        let defaults = MemoryPlan::of(&options(&["--node", "0"])).unwrap();
        assert!(defaults.total() < 1 << 30, "{defaults:?}");
    }
}
