//! The registry exchange through memcached.
//!
//! Every control plane publishes its node's record (`rzab:{cluster}:{generation}:node:{n}`,
//! then the ready key `...:ready:{n}` naming the same data-plane instance) once its data plane
//! has published its endpoints, refreshes both every [`REFRESH_INTERVAL`] with a TTL so a dead
//! run's keys expire, and polls every peer's pair. When every node is known it writes the
//! control block's remote table and bumps `handshake.peers_generation`; afterwards it keeps
//! watching, and rewrites a node's slots (bumping the generation again) when that node's data
//! plane restarts with a new instance or new endpoints. The generation in every key keeps runs
//! apart; within a run, a record that is new to this control plane is accepted only while its
//! heartbeat is fresh, so a record left by a dead process is never taken for a live one.
//!
//! Cluster-scoped knobs live in `...:knobs` as `{version, values}`; every control plane polls
//! it every poll interval and applies newer versions to its own block. Writers merge their
//! changes with `gets`/`cas`, so concurrent updates from different nodes never lose each
//! other. Versions never go backwards, even when memcached loses the document (restarted
//! empty, or the key expired): a new version exceeds the registry's, the highest this control
//! plane has applied, and the wall clock in milliseconds ([`next_version`]), so it is newer
//! than anything a node applied before; and a control plane that finds the document missing
//! puts back the newest one it applied (`add`, so the first one back wins), so the values
//! set before the loss keep reaching data planes that start later. Each node's record says
//! which version it applied and whether every worker has picked it up (`knobs_in_force`).
//!
//! The memcache crate is blocking: [`RegistryWorker`] runs on its own thread, and REST
//! handlers call [`RegistryClient`] from `spawn_blocking`. If memcached is unreachable, at
//! start or later, the worker reports [`RegistryState::Unreachable`], retries with backoff and
//! carries on where it was; the data plane and the remote table it already has are untouched.
//!
//! Touches: the memcached server (only keys under `rzab:{cluster}:{generation}:`), the
//!
//! Modules: [`client`] (the [`Store`] trait the registry's memcached operations go through,
//! its memcached implementation, and [`RegistryClient`], which reads and writes the documents
//! with it), [`records`] (keys and the node and ready records), [`cluster_knobs`] (the knobs
//! document, its versions and what was applied here), [`status`] (what the worker reports and
//! REST reads) and [`worker`] (the state machine). The worker reaches memcached only through a
//! [`Connector`], so its logic is unit-tested against an in-memory store (`memory`, in the
//! crate's tests only; the tests are in `tests`).

pub mod client;
pub mod cluster_knobs;
#[cfg(test)]
mod memory;
pub mod records;
pub mod status;
#[cfg(test)]
mod tests;
pub mod worker;

use std::time::Duration;

use memcache::MemcacheError;

pub use client::{Connector, MemcachedConnector, MemcachedStore, RegistryClient, Store};
pub use cluster_knobs::{KnobsApply, KnobsBase, KnobsDocument, document_changes, next_version};
pub use records::{Keys, NodeRecord, ReadyRecord};
pub use status::{PeerView, RegistryStatus};
pub use worker::{RegistryWorker, spawn};

/// Schema version of [`NodeRecord`], [`ReadyRecord`] and [`KnobsDocument`].
pub const RECORD_SCHEMA: u32 = 1;
/// How often this node's record and ready key are rewritten.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Lifetime of a node record and ready key; a dead control plane's keys vanish after it.
pub const RECORD_TTL_SECONDS: u32 = 10;
/// Lifetime of the cluster knobs document, renewed by every live control plane.
pub const KNOBS_TTL_SECONDS: u32 = 3600;
/// How often peers are polled once every node is known.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Longest pause between peer polls while waiting for peers.
pub const MAX_PEER_BACKOFF: Duration = Duration::from_secs(1);
/// First and longest pause between reconnection attempts.
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How many compare-and-swap rounds a knobs update tries before giving up.
const CAS_ATTEMPTS: u32 = 32;
/// How often a repeated warning is logged again.
const LOG_REPEAT: Duration = Duration::from_secs(10);

/// Everything that can go wrong talking to the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {address}: {source}")]
    Memcache {
        address: String,
        source: MemcacheError,
    },
    #[error("registry key {key}: {reason}")]
    BadDocument { key: String, reason: String },
    #[error("registry key {key}: {attempts} compare-and-swap rounds lost to concurrent updates")]
    Contended { key: String, attempts: u32 },
}
