//! The state every part of the control plane shares: its configuration, the attachment to the
//! control block, the registry status, and a few derived facts (role, data-plane liveness).
//!
//! Touches nothing by itself; it reads the attached block on request.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rzab_shared::{ControlBlock, Lifecycle, SyncState};

use crate::attach::Attachment;
use crate::options::Config;
use crate::registry::RegistryStatus;

/// The data plane counts as up while its heartbeat is at most this old (and it is running).
pub const DATAPLANE_FRESH: Duration = Duration::from_secs(2);

/// Everything the control plane's tasks share.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub attachment: Attachment,
    pub registry: RegistryStatus,
    /// The address the REST server is bound to (the published URLs use it).
    pub local_addr: SocketAddr,
    pub started: Instant,
}

impl Shared {
    pub fn new(config: Config, local_addr: SocketAddr) -> Self {
        Shared {
            attachment: Attachment::new(&config.block, &config.cluster, config.node),
            config,
            registry: RegistryStatus::default(),
            local_addr,
            started: Instant::now(),
        }
    }

    /// What this node is, as its data plane reports it: "leader" when its pipelines lead,
    /// "follower" when they follow another node, "electing" while they have no leader and
    /// elect one, "unknown" before any says (not attached, or not joined yet). No node is the
    /// leader by its number.
    pub fn role(&self) -> &'static str {
        self.attachment
            .block()
            .map_or(UNKNOWN_ROLE, |block| role(&block, self.config.node))
    }
}

/// The role of a node whose data plane has not said.
pub const UNKNOWN_ROLE: &str = "unknown";

/// What node `node` is in `block`: by the leader its first worker takes.
pub fn role(block: &ControlBlock, node: u32) -> &'static str {
    if block.worker_count() == 0 {
        return UNKNOWN_ROLE;
    }
    let gauges = &block.worker(0).gauges;
    match gauges.leader_node() {
        Some(leader) if leader == node => "leader",
        Some(_) => "follower",
        None if SyncState::from_code(gauges.sync_state.load(Ordering::Relaxed))
            == SyncState::Electing =>
        {
            "electing"
        }
        None => UNKNOWN_ROLE,
    }
}

/// Wall-clock nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
        })
}

/// Seconds since the data plane's last heartbeat, or `None` if it never beat.
pub fn dataplane_heartbeat_age(block: &ControlBlock) -> Option<f64> {
    match block.dataplane_silence_ns() {
        u64::MAX => None,
        silence => Some(silence as f64 / 1e9),
    }
}

/// Whether the data plane's heartbeat is fresh.
pub fn dataplane_fresh(block: &ControlBlock) -> bool {
    block.dataplane_silence_ns() <= u64::try_from(DATAPLANE_FRESH.as_nanos()).unwrap_or(u64::MAX)
}

/// What keeps the data plane's pipelines from serving, as they report it (a follower that
/// hears nothing from its leader, a leader that hears from no quorum, a follower left
/// behind), one clause per troubled pipeline; `None` when none is.
pub fn pipeline_trouble(block: &ControlBlock) -> Option<String> {
    let workers = usize::try_from(block.worker_count()).unwrap_or(0);
    let troubles: Vec<String> = (0..workers)
        .filter_map(|worker| {
            let state = block.worker(worker).sync_state();
            state
                .trouble()
                .map(|trouble| format!("pipeline {worker} is {}: {trouble}", state.name()))
        })
        .collect();
    (!troubles.is_empty()).then(|| troubles.join("; "))
}

/// Whether the data plane is running with a fresh heartbeat.
pub fn dataplane_up(block: &ControlBlock) -> bool {
    dataplane_fresh(block) && block.lifecycle() == Lifecycle::Running
}
