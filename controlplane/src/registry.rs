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
//! attached control block's handshake, remote table and knobs, the log.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use memcache::MemcacheError;
use rzab_shared::endpoint::ENDPOINT_SCHEMA_VERSION;
use rzab_shared::{
    AttachedControlBlock, ControlBlock, EndpointRecord, KnobError, RegistryState, TransportKind,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::knobs::parse_changes;
use crate::options::RegistryAddress;
use crate::state::{Shared, now_ns};

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

/// The keys of one run: `rzab:{cluster}:{generation}:...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(cluster: &str, generation: &str) -> Self {
        Keys {
            prefix: format!("rzab:{cluster}:{generation}"),
        }
    }

    /// A node's record.
    pub fn node(&self, node: u32) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    /// A node's ready key, written after its record.
    pub fn ready(&self, node: u32) -> String {
        format!("{}:ready:{node}", self.prefix)
    }

    /// The cluster knobs document.
    pub fn knobs(&self) -> String {
        format!("{}:knobs", self.prefix)
    }
}

/// What a control plane publishes about its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub schema: u32,
    pub cluster: String,
    pub generation: String,
    pub node: u32,
    pub nodes: u32,
    pub workers: u32,
    /// The data plane's instance (changes with every data-plane start).
    pub instance: u64,
    pub transport: TransportKind,
    /// One record per worker, in worker order.
    pub endpoints: Vec<EndpointRecord>,
    pub rest_url: String,
    pub metrics_url: String,
    /// Wall-clock nanoseconds of the last refresh.
    pub heartbeat_ns: u64,
    /// The cluster knobs version this node has applied (0: none).
    pub knobs_version: u64,
    /// Whether every worker of this node's data plane has picked `knobs_version` up (true for
    /// version 0). Absent in older records: not in force.
    #[serde(default)]
    pub knobs_in_force: bool,
    pub controlplane_pid: u32,
    pub dataplane_pid: u32,
}

/// Written after the node record: the record of this instance is complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyRecord {
    pub schema: u32,
    pub node: u32,
    pub instance: u64,
    pub heartbeat_ns: u64,
}

/// The cluster knobs: every cluster-scoped value set in this run, and a version that grows
/// with every update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KnobsDocument {
    pub schema: u32,
    pub version: u64,
    pub values: serde_json::Map<String, serde_json::Value>,
    pub updated_by: u32,
    pub updated_ns: u64,
}

/// A blocking memcached client for the registry's documents.
#[derive(Clone)]
pub struct RegistryClient {
    client: memcache::Client,
    address: String,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RegistryClient")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The version a knobs update gets: above the registry's `previous` and above `applied_here`
/// (the highest version this control plane has applied, which the registry may have lost),
/// and at least the wall clock in milliseconds. The clock is what puts a version written
/// after the registry lost the document above versions that only other nodes applied: each
/// version written is the writer's clock or one above an earlier version, so with the
/// writers' clocks roughly in step the clock has passed them all. The other two terms keep
/// versions growing when a clock is behind.
pub fn next_version(previous: u64, applied_here: u64, now_ms: u64) -> u64 {
    previous.max(applied_here).saturating_add(1).max(now_ms)
}

/// Wall-clock milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, text: &str) -> Result<T, RegistryError> {
    serde_json::from_str(text).map_err(|error| RegistryError::BadDocument {
        key: key.to_owned(),
        reason: error.to_string(),
    })
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<String, RegistryError> {
    serde_json::to_string(value).map_err(|error| RegistryError::BadDocument {
        key: key.to_owned(),
        reason: error.to_string(),
    })
}

impl RegistryClient {
    /// Connects (one attempt, bounded by a short timeout) and checks the server answers.
    pub fn connect(address: &RegistryAddress) -> Result<Self, RegistryError> {
        let text = address.to_string();
        let failed = |source| RegistryError::Memcache {
            address: text.clone(),
            source,
        };
        // ASCII protocol (gets/cas everywhere); socket timeouts so a hung server cannot stall
        // the worker for long.
        let url = format!("memcache://{text}?protocol=ascii&timeout=1&tcp_nodelay=true");
        let client = memcache::Client::builder()
            .add_server(url)
            .map_err(failed)?
            .with_max_pool_size(2)
            .with_min_idle_conns(1)
            .with_connection_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(failed)?;
        client.version().map_err(failed)?;
        Ok(RegistryClient {
            client,
            address: text,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn failed(&self, source: MemcacheError) -> RegistryError {
        RegistryError::Memcache {
            address: self.address.clone(),
            source,
        }
    }

    /// One key's value.
    pub fn get(&self, key: &str) -> Result<Option<String>, RegistryError> {
        self.client.get(key).map_err(|error| self.failed(error))
    }

    /// Several keys' values at once (missing keys are absent from the map).
    pub fn get_many(&self, keys: &[String]) -> Result<HashMap<String, String>, RegistryError> {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.client.gets(&keys).map_err(|error| self.failed(error))
    }

    pub fn set(&self, key: &str, value: &str, ttl_seconds: u32) -> Result<(), RegistryError> {
        self.client
            .set(key, value, ttl_seconds)
            .map_err(|error| self.failed(error))
    }

    /// Renews a key's lifetime; false if it does not exist.
    pub fn touch(&self, key: &str, ttl_seconds: u32) -> Result<bool, RegistryError> {
        self.client
            .touch(key, ttl_seconds)
            .map_err(|error| self.failed(error))
    }

    /// Deletes a key (for tests and tools).
    pub fn delete(&self, key: &str) -> Result<bool, RegistryError> {
        self.client.delete(key).map_err(|error| self.failed(error))
    }

    /// The cluster knobs document, if there is one.
    pub fn read_knobs(&self, keys: &Keys) -> Result<Option<KnobsDocument>, RegistryError> {
        let key = keys.knobs();
        self.get(&key)?.map(|text| decode(&key, &text)).transpose()
    }

    /// Puts a knobs document back if the registry has none (`add`: if another control plane
    /// was first, its document stays).
    pub fn restore_knobs(
        &self,
        keys: &Keys,
        document: &KnobsDocument,
    ) -> Result<(), RegistryError> {
        let key = keys.knobs();
        self.client
            .add(&key, encode(&key, document)?.as_str(), KNOBS_TTL_SECONDS)
            .map_err(|error| self.failed(error))
    }

    /// Merges `changes` into the cluster knobs document as a new version (see
    /// [`next_version`]; `base` is what this control plane applied last), without losing a
    /// concurrent update: `gets` + `cas`. A missing document is first put back from
    /// `base.document` (or created empty, version 0) with `add`; it does not matter whose `add`
    /// wins (the memcache client does not say), the real write is always a `cas`.
    pub fn update_knobs(
        &self,
        keys: &Keys,
        changes: &serde_json::Map<String, serde_json::Value>,
        node: u32,
        base: &KnobsBase,
    ) -> Result<KnobsDocument, RegistryError> {
        let key = keys.knobs();
        for _ in 0..CAS_ATTEMPTS {
            let current: Option<(String, u32, Option<u64>)> =
                self.client.get(&key).map_err(|error| self.failed(error))?;
            let Some((text, _flags, cas)) = current else {
                let seed = base.document.clone().unwrap_or_else(|| KnobsDocument {
                    schema: RECORD_SCHEMA,
                    version: 0,
                    values: serde_json::Map::new(),
                    updated_by: node,
                    updated_ns: now_ns(),
                });
                self.restore_knobs(keys, &seed)?;
                continue;
            };
            let Some(cas) = cas else {
                return Err(RegistryError::BadDocument {
                    key,
                    reason: "the server returned no CAS id".to_owned(),
                });
            };
            let previous: KnobsDocument = decode(&key, &text)?;
            let mut values = previous.values;
            for (name, value) in changes {
                values.insert(name.clone(), value.clone());
            }
            let document = KnobsDocument {
                schema: RECORD_SCHEMA,
                version: next_version(previous.version, base.highest, now_ms()),
                values,
                updated_by: node,
                updated_ns: now_ns(),
            };
            if self
                .client
                .cas(
                    &key,
                    encode(&key, &document)?.as_str(),
                    KNOBS_TTL_SECONDS,
                    cas,
                )
                .map_err(|error| self.failed(error))?
            {
                return Ok(document);
            }
        }
        Err(RegistryError::Contended {
            key,
            attempts: CAS_ATTEMPTS,
        })
    }
}

/// One peer as the status shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct PeerView {
    pub node: u32,
    /// True once this peer's record has been accepted (its endpoints are in the remote table
    /// once every node is known).
    pub known: bool,
    /// The accepted data-plane instance, in hex.
    pub instance: Option<String>,
    /// Whether the peer's record is in the registry right now.
    pub record_present: bool,
    /// Age of the newest record seen, in seconds.
    pub heartbeat_age_seconds: Option<f64>,
    pub rest_url: Option<String>,
    /// The cluster knobs version the peer reports having applied.
    pub knobs_version: Option<u64>,
    /// Why the peer's current record is not (or not yet) taken.
    pub note: Option<String>,
}

#[derive(Debug, Default)]
struct KnobsApplied {
    /// The data-plane instance `version` and `epoch` belong to.
    instance: u64,
    /// The cluster knobs version applied to that instance (0: none).
    version: u64,
    /// That block's knob epoch right after `version` was applied: once every worker has seen
    /// it, the version is in force.
    epoch: u64,
    /// The highest version applied to any instance: new versions must exceed it even when the
    /// registry has lost the document.
    highest: u64,
    /// The newest document applied, put back if the registry loses it.
    document: Option<KnobsDocument>,
}

/// What a knobs update builds on: this control plane's newest applied document and the
/// highest version it applied.
#[derive(Clone, Debug, Default)]
pub struct KnobsBase {
    pub document: Option<KnobsDocument>,
    pub highest: u64,
}

/// What [`RegistryStatus::apply_knobs`] did with a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnobsApply {
    /// Newer than what the data plane had: written to the block.
    Applied,
    /// This very version was already applied (by the registry worker's poll, say).
    AlreadyApplied,
    /// Older than the version already applied, which stays in force.
    Superseded { applied: u64 },
}

/// The registry side of the shared state: what the worker reports and what REST reads.
#[derive(Debug, Default)]
pub struct RegistryStatus {
    state: AtomicU32,
    detail: Mutex<String>,
    peers: Mutex<Vec<PeerView>>,
    client: Mutex<Option<RegistryClient>>,
    knobs: Mutex<KnobsApplied>,
}

/// The values of a knobs document, validated whole (same rules as a PATCH body).
pub fn document_changes(document: &KnobsDocument) -> Result<Vec<(rzab_shared::Knob, u64)>, String> {
    parse_changes(&serde_json::Value::Object(document.values.clone()))
        .map(|changes| {
            changes
                .into_iter()
                .map(|(knob, raw, _)| (knob, raw))
                .collect()
        })
        .map_err(|error| error.message)
}

impl RegistryStatus {
    pub fn state(&self) -> RegistryState {
        RegistryState::from_code(self.state.load(Ordering::Acquire))
    }

    /// What the registry exchange is waiting for, or its last error.
    pub fn detail(&self) -> String {
        self.detail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn peers(&self) -> Vec<PeerView> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A client on the live registry connection, if there is one.
    pub fn client(&self) -> Option<RegistryClient> {
        self.client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_client(&self, client: Option<RegistryClient>) {
        *self.client.lock().unwrap_or_else(PoisonError::into_inner) = client;
    }

    fn set_detail(&self, detail: String) {
        *self.detail.lock().unwrap_or_else(PoisonError::into_inner) = detail;
    }

    fn set_peers(&self, peers: Vec<PeerView>) {
        *self.peers.lock().unwrap_or_else(PoisonError::into_inner) = peers;
    }

    /// The cluster knobs version applied to the data plane instance `instance` (0: none).
    pub fn knobs_version(&self, instance: u64) -> u64 {
        let applied = self.knobs.lock().unwrap_or_else(PoisonError::into_inner);
        if applied.instance == instance {
            applied.version
        } else {
            0
        }
    }

    /// The cluster knobs version applied to `block`'s data plane and whether every worker has
    /// picked it up (its knob epoch reached the one right after the apply).
    pub fn knobs_in_force(&self, block: &ControlBlock) -> (u64, bool) {
        let instance = block.header.instance.load(Ordering::Relaxed);
        let applied = self.knobs.lock().unwrap_or_else(PoisonError::into_inner);
        if applied.instance != instance || applied.version == 0 {
            return (0, true);
        }
        let seen = (0..block.worker_count()).all(|worker| {
            block
                .worker(worker as usize)
                .gauges
                .knob_epoch_seen
                .load(Ordering::Acquire)
                >= applied.epoch
        });
        (applied.version, seen)
    }

    /// What a knobs update builds on (see [`RegistryClient::update_knobs`]).
    pub fn knobs_base(&self) -> KnobsBase {
        let applied = self.knobs.lock().unwrap_or_else(PoisonError::into_inner);
        KnobsBase {
            document: applied.document.clone(),
            highest: applied.highest,
        }
    }

    /// Applies a cluster knobs document to `block` if it is newer than what that data plane
    /// instance has, and says what it did. A document whose values are refused is skipped
    /// (and counted as seen) so that one bad write does not block later ones.
    pub fn apply_knobs(
        &self,
        block: &AttachedControlBlock,
        document: &KnobsDocument,
    ) -> Result<KnobsApply, String> {
        let instance = block.header.instance.load(Ordering::Relaxed);
        let mut applied = self.knobs.lock().unwrap_or_else(PoisonError::into_inner);
        if applied.instance != instance {
            applied.instance = instance;
            applied.version = 0;
            applied.epoch = 0;
        }
        if document.version == applied.version {
            return Ok(KnobsApply::AlreadyApplied);
        }
        if document.version < applied.version {
            return Ok(KnobsApply::Superseded {
                applied: applied.version,
            });
        }
        applied.version = document.version;
        applied.highest = applied.highest.max(document.version);
        let changes = document_changes(document)?;
        block
            .set_knobs(&changes)
            .map_err(|error: KnobError| error.to_string())?;
        applied.epoch = block.knob_epoch();
        applied.document = Some(document.clone());
        Ok(KnobsApply::Applied)
    }
}

/// What this control plane last wrote for its own node.
#[derive(Debug)]
struct Published {
    instance: u64,
    endpoints: Vec<EndpointRecord>,
    knobs_version: u64,
    knobs_in_force: bool,
    at: Instant,
}

/// The remote table as written into one data-plane instance's block.
#[derive(Debug, Default)]
struct Table {
    instance: u64,
    complete: bool,
    written: BTreeMap<u32, (u64, Vec<EndpointRecord>)>,
}

/// Logs a warning when it changes, and again every [`LOG_REPEAT`] while it persists.
#[derive(Debug, Default)]
struct Throttle {
    last: HashMap<String, (String, Instant)>,
}

impl Throttle {
    fn due(&mut self, topic: &str, message: &str) -> bool {
        let now = Instant::now();
        match self.last.get(topic) {
            Some((last, at)) if last == message && now.duration_since(*at) < LOG_REPEAT => false,
            _ => {
                self.last
                    .insert(topic.to_owned(), (message.to_owned(), now));
                true
            }
        }
    }

    fn clear(&mut self, topic: &str) {
        self.last.remove(topic);
    }
}

/// The registry exchange's state machine; [`RegistryWorker::step`] does one round.
#[derive(Debug)]
pub struct RegistryWorker {
    shared: Arc<Shared>,
    keys: Keys,
    client: Option<RegistryClient>,
    attempted: bool,
    reconnect_at: Instant,
    reconnect_delay: Duration,
    published: Option<Published>,
    accepted: BTreeMap<u32, NodeRecord>,
    views: BTreeMap<u32, PeerView>,
    table: Table,
    peer_poll_at: Instant,
    peer_delay: Duration,
    throttle: Throttle,
}

fn age_seconds(then_ns: u64) -> f64 {
    now_ns().saturating_sub(then_ns) as f64 / 1e9
}

fn instance_hex(instance: u64) -> String {
    format!("{instance:016x}")
}

impl RegistryWorker {
    pub fn new(shared: Arc<Shared>) -> Self {
        let keys = Keys::new(&shared.config.cluster, &shared.config.generation);
        let now = Instant::now();
        RegistryWorker {
            shared,
            keys,
            client: None,
            attempted: false,
            reconnect_at: now,
            reconnect_delay: RECONNECT_MIN,
            published: None,
            accepted: BTreeMap::new(),
            views: BTreeMap::new(),
            table: Table::default(),
            peer_poll_at: now,
            peer_delay: Duration::ZERO,
            throttle: Throttle::default(),
        }
    }

    fn status(&self) -> &RegistryStatus {
        &self.shared.registry
    }

    /// The block and the detail are written before the state REST reports, so whoever sees a
    /// state in `/v1/status` also finds it in the block, with its detail.
    fn set_state(&mut self, state: RegistryState, detail: String, block: Option<&ControlBlock>) {
        if let Some(block) = block {
            block.set_registry_state(state);
        }
        let changed = self.status().state.load(Ordering::Acquire) != state.code();
        if changed {
            tracing::info!(
                state = state.name(),
                "registry state: {} ({detail})",
                state.name()
            );
        }
        self.status().set_detail(detail);
        self.status().state.store(state.code(), Ordering::Release);
    }

    fn lose_connection(&mut self, error: &RegistryError, block: Option<&ControlBlock>) {
        tracing::warn!(
            "lost the registry ({error}); the data plane is unaffected, reconnecting with backoff"
        );
        self.client = None;
        self.status().set_client(None);
        self.reconnect_delay = RECONNECT_MIN;
        self.reconnect_at = Instant::now() + self.reconnect_delay;
        self.published = None;
        self.set_state(
            RegistryState::Unreachable,
            format!("registry lost: {error}"),
            block,
        );
    }

    fn ensure_client(&mut self, block: Option<&ControlBlock>) -> bool {
        if self.client.is_some() {
            return true;
        }
        let now = Instant::now();
        if now < self.reconnect_at {
            return false;
        }
        if !self.attempted {
            self.set_state(
                RegistryState::Connecting,
                format!("connecting to {}", self.shared.config.registry),
                block,
            );
        }
        self.attempted = true;
        match RegistryClient::connect(&self.shared.config.registry) {
            Ok(client) => {
                tracing::info!(registry = %client.address(), "registry reachable");
                self.status().set_client(Some(client.clone()));
                self.client = Some(client);
                self.reconnect_delay = RECONNECT_MIN;
                self.throttle.clear("connect");
                self.peer_poll_at = now;
                true
            }
            Err(error) => {
                let message = error.to_string();
                if self.throttle.due("connect", &message) {
                    tracing::warn!(
                        "registry unreachable: {message}; retrying (every {} ms at most)",
                        RECONNECT_MAX.as_millis()
                    );
                }
                self.reconnect_at = Instant::now() + self.reconnect_delay;
                self.set_state(
                    RegistryState::Unreachable,
                    format!(
                        "registry unreachable: {message}; next attempt in {} ms",
                        self.reconnect_delay.as_millis()
                    ),
                    block,
                );
                self.reconnect_delay = (self.reconnect_delay * 2).min(RECONNECT_MAX);
                false
            }
        }
    }

    /// This node's record as the block describes it, once the data plane has published its
    /// endpoints.
    fn local_record(&self, block: &AttachedControlBlock) -> Option<NodeRecord> {
        let instance = block.header.instance.load(Ordering::Relaxed);
        if block.handshake.endpoints_published.load(Ordering::Acquire) != instance {
            return None;
        }
        let node = u16::try_from(self.shared.config.node).ok()?;
        let workers = block.worker_count();
        let mut endpoints = Vec::with_capacity(workers as usize);
        for worker in 0..workers {
            let address = block.worker(worker as usize).local_endpoint.load()?;
            endpoints.push(EndpointRecord::new(
                node,
                u16::try_from(worker).ok()?,
                address,
            ));
        }
        let base = format!("http://{}", self.shared.local_addr);
        let (knobs_version, knobs_in_force) = self.status().knobs_in_force(block);
        Some(NodeRecord {
            schema: RECORD_SCHEMA,
            cluster: self.shared.config.cluster.clone(),
            generation: self.shared.config.generation.clone(),
            node: self.shared.config.node,
            nodes: block.node_count(),
            workers,
            instance,
            transport: block.transport()?,
            endpoints,
            rest_url: base.clone(),
            metrics_url: format!("{base}/metrics"),
            heartbeat_ns: now_ns(),
            knobs_version,
            knobs_in_force,
            controlplane_pid: std::process::id(),
            dataplane_pid: block.header.owner_pid.load(Ordering::Relaxed),
        })
    }

    fn publish(
        &mut self,
        client: &RegistryClient,
        record: &NodeRecord,
    ) -> Result<(), RegistryError> {
        let due = match &self.published {
            None => true,
            Some(published) => {
                published.instance != record.instance
                    || published.endpoints != record.endpoints
                    || published.knobs_version != record.knobs_version
                    || published.knobs_in_force != record.knobs_in_force
                    || published.at.elapsed() >= REFRESH_INTERVAL
            }
        };
        if !due {
            return Ok(());
        }
        let node_key = self.keys.node(record.node);
        let ready_key = self.keys.ready(record.node);
        let ready = ReadyRecord {
            schema: RECORD_SCHEMA,
            node: record.node,
            instance: record.instance,
            heartbeat_ns: record.heartbeat_ns,
        };
        client.set(&node_key, &encode(&node_key, record)?, RECORD_TTL_SECONDS)?;
        client.set(&ready_key, &encode(&ready_key, &ready)?, RECORD_TTL_SECONDS)?;
        client.touch(&self.keys.knobs(), KNOBS_TTL_SECONDS)?;
        let first = self
            .published
            .as_ref()
            .is_none_or(|published| published.instance != record.instance);
        if first {
            tracing::info!(
                key = %node_key,
                instance = %instance_hex(record.instance),
                workers = record.workers,
                "published this node's endpoints"
            );
        }
        self.published = Some(Published {
            instance: record.instance,
            endpoints: record.endpoints.clone(),
            knobs_version: record.knobs_version,
            knobs_in_force: record.knobs_in_force,
            at: Instant::now(),
        });
        Ok(())
    }

    /// Why a peer's record cannot be used with this node's block, if it cannot.
    fn incompatibility(
        &self,
        node: u32,
        record: &NodeRecord,
        local: &NodeRecord,
    ) -> Option<String> {
        if record.schema != RECORD_SCHEMA {
            return Some(format!(
                "record schema {} (this build reads {RECORD_SCHEMA})",
                record.schema
            ));
        }
        if record.node != node
            || record.cluster != local.cluster
            || record.generation != local.generation
        {
            return Some(format!(
                "record names node {} of cluster `{}` generation `{}`",
                record.node, record.cluster, record.generation
            ));
        }
        if record.nodes != local.nodes || record.workers != local.workers {
            return Some(format!(
                "{} nodes x {} workers, this node has {} x {}",
                record.nodes, record.workers, local.nodes, local.workers
            ));
        }
        if record.transport != local.transport {
            return Some(format!(
                "transport {}, this node uses {}",
                record.transport.name(),
                local.transport.name()
            ));
        }
        let complete = record.endpoints.len() == record.workers as usize
            && record
                .endpoints
                .iter()
                .enumerate()
                .all(|(index, endpoint)| {
                    endpoint.schema == ENDPOINT_SCHEMA_VERSION
                        && u32::from(endpoint.node) == node
                        && usize::from(endpoint.worker) == index
                        && endpoint.address.transport() == local.transport
                });
        if !complete {
            return Some("its endpoint records are incomplete or inconsistent".to_owned());
        }
        None
    }

    /// Reads every peer's record and ready key and updates the accepted set.
    fn poll_peers(
        &mut self,
        client: &RegistryClient,
        local: &NodeRecord,
    ) -> Result<bool, RegistryError> {
        let me = self.shared.config.node;
        let peers: Vec<u32> = (0..local.nodes).filter(|node| *node != me).collect();
        let keys: Vec<String> = peers
            .iter()
            .flat_map(|node| [self.keys.node(*node), self.keys.ready(*node)])
            .collect();
        let found = client.get_many(&keys)?;
        let stale_ns = u64::try_from(self.shared.config.peer_stale.as_nanos()).unwrap_or(u64::MAX);
        let mut progress = false;
        for node in peers {
            let node_key = self.keys.node(node);
            let ready_key = self.keys.ready(node);
            let mut view = self.views.remove(&node).unwrap_or_default();
            view.node = node;
            view.note = None;
            view.record_present = false;
            let record = match found
                .get(&node_key)
                .map(|text| decode::<NodeRecord>(&node_key, text))
            {
                None => {
                    view.note = Some("no record in the registry".to_owned());
                    None
                }
                Some(Err(error)) => {
                    view.note = Some(error.to_string());
                    None
                }
                Some(Ok(record)) => Some(record),
            };
            if let Some(record) = record {
                view.record_present = true;
                view.heartbeat_age_seconds = Some(age_seconds(record.heartbeat_ns));
                view.rest_url = Some(record.rest_url.clone());
                view.knobs_version = Some(record.knobs_version);
                let ready = found
                    .get(&ready_key)
                    .and_then(|text| decode::<ReadyRecord>(&ready_key, text).ok());
                let same_as_accepted = self.accepted.get(&node).is_some_and(|accepted| {
                    accepted.instance == record.instance && accepted.endpoints == record.endpoints
                });
                if let Some(reason) = self.incompatibility(node, &record, local) {
                    if self.throttle.due(&format!("peer{node}"), &reason) {
                        tracing::warn!(peer = node, "ignoring node {node}'s record: {reason}");
                    }
                    view.note = Some(format!("incompatible: {reason}"));
                } else if ready
                    .as_ref()
                    .is_none_or(|ready| ready.instance != record.instance)
                {
                    view.note = Some("record not marked ready yet".to_owned());
                } else if same_as_accepted {
                    self.accepted.insert(node, record);
                } else if now_ns().saturating_sub(record.heartbeat_ns) > stale_ns {
                    let reason = format!(
                        "stale record (heartbeat {:.1} s old, instance {}): left by an earlier process?",
                        age_seconds(record.heartbeat_ns),
                        instance_hex(record.instance)
                    );
                    if self.throttle.due(&format!("peer{node}"), &reason) {
                        tracing::info!(peer = node, "ignoring node {node}'s {reason}");
                    }
                    view.note = Some(reason);
                } else {
                    tracing::info!(
                        peer = node,
                        instance = %instance_hex(record.instance),
                        "accepted node {node}'s record"
                    );
                    self.throttle.clear(&format!("peer{node}"));
                    self.accepted.insert(node, record);
                    progress = true;
                }
            }
            if let Some(accepted) = self.accepted.get(&node) {
                view.known = true;
                view.instance = Some(instance_hex(accepted.instance));
            }
            self.views.insert(node, view);
        }
        self.status()
            .set_peers(self.views.values().cloned().collect());
        Ok(progress)
    }

    fn store_node(block: &ControlBlock, node: u32, endpoints: &[EndpointRecord]) {
        let Some(row) = block.remote.get(node as usize) else {
            return;
        };
        for endpoint in endpoints {
            if let Some(slot) = row.get(usize::from(endpoint.worker)) {
                slot.store(Some(&endpoint.address));
            }
        }
    }

    fn node_matches(block: &ControlBlock, node: u32, endpoints: &[EndpointRecord]) -> bool {
        block.remote.get(node as usize).is_some_and(|row| {
            endpoints.iter().all(|endpoint| {
                row.get(usize::from(endpoint.worker))
                    .is_some_and(|slot| slot.load() == Some(endpoint.address))
            })
        })
    }

    /// Writes the remote table once every node is known, and rewrites nodes whose record
    /// changed since; bumps `peers_generation` after each complete write.
    fn sync_table(&mut self, block: &AttachedControlBlock, local: &NodeRecord) {
        if self.table.instance != local.instance {
            self.table = Table {
                instance: local.instance,
                ..Table::default()
            };
        }
        let me = self.shared.config.node;
        let all_known =
            (0..local.nodes).all(|node| node == me || self.accepted.contains_key(&node));
        if !self.table.complete && !all_known {
            return;
        }
        let mut rewritten = Vec::new();
        let mut entries: Vec<(u32, u64, &[EndpointRecord])> =
            vec![(me, local.instance, &local.endpoints)];
        for (node, record) in &self.accepted {
            if *node < local.nodes && *node != me {
                entries.push((*node, record.instance, &record.endpoints));
            }
        }
        if !self.table.complete
            && block.handshake.peers_generation.load(Ordering::Acquire) > 0
            && entries
                .iter()
                .all(|(node, _, endpoints)| Self::node_matches(block, *node, endpoints))
        {
            // A restarted control plane finds the table it (or its predecessor) wrote: no
            // bump, so the data plane has nothing to re-resolve.
            for (node, instance, endpoints) in entries {
                self.table
                    .written
                    .insert(node, (instance, endpoints.to_vec()));
            }
            self.table.complete = true;
            tracing::info!("the remote table in the control block is already up to date");
            return;
        }
        for (node, instance, endpoints) in entries {
            let unchanged =
                self.table.written.get(&node).is_some_and(|(written, old)| {
                    *written == instance && old.as_slice() == endpoints
                });
            if !unchanged {
                Self::store_node(block, node, endpoints);
                self.table
                    .written
                    .insert(node, (instance, endpoints.to_vec()));
                rewritten.push(node);
            }
        }
        if rewritten.is_empty() {
            return;
        }
        let generation = block
            .handshake
            .peers_generation
            .fetch_add(1, Ordering::AcqRel)
            + 1;
        if self.table.complete {
            tracing::info!(
                nodes = ?rewritten,
                peers_generation = generation,
                "peer restarted: rewrote its remote endpoints"
            );
        } else {
            tracing::info!(
                nodes = local.nodes,
                peers_generation = generation,
                "every node is known: remote table written"
            );
        }
        self.table.complete = true;
    }

    fn poll_knobs(
        &mut self,
        client: &RegistryClient,
        block: Option<&AttachedControlBlock>,
    ) -> Result<(), RegistryError> {
        let document = match client.read_knobs(&self.keys) {
            Ok(document) => document,
            Err(RegistryError::BadDocument { key, reason }) => {
                if self.throttle.due("knobs", &reason) {
                    tracing::warn!("ignoring the cluster knobs at {key}: {reason}");
                }
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        let Some(document) = document else {
            // Lost by the registry (restarted empty, or expired): put back the newest document
            // applied here, so nodes whose data plane starts later still get those values and
            // versions keep growing from there.
            if let Some(applied) = self.status().knobs_base().document {
                client.restore_knobs(&self.keys, &applied)?;
                tracing::info!(
                    version = applied.version,
                    "the registry had no cluster knobs: put back the version applied here"
                );
            }
            return Ok(());
        };
        let Some(block) = block else {
            return Ok(());
        };
        match self.status().apply_knobs(block, &document) {
            Ok(KnobsApply::Applied) => tracing::info!(
                version = document.version,
                values = %serde_json::Value::Object(document.values.clone()),
                "applied cluster knobs"
            ),
            Ok(KnobsApply::AlreadyApplied) => {}
            Ok(KnobsApply::Superseded { applied }) => {
                if self.throttle.due("knobs-old", &applied.to_string()) {
                    tracing::warn!(
                        version = document.version,
                        applied,
                        "the registry's cluster knobs are older than the version applied here"
                    );
                }
            }
            Err(reason) => tracing::warn!(
                version = document.version,
                "skipping cluster knobs version {}: {reason}",
                document.version
            ),
        }
        Ok(())
    }

    /// One round: connect if needed, apply newer cluster knobs, publish this node, poll peers,
    /// write the remote table. Returns how long to wait before the next round.
    pub fn step(&mut self) -> Duration {
        let poll = self.shared.config.poll;
        let block = self.shared.attachment.block();
        let block_ref = block.as_deref();
        let control: Option<&ControlBlock> = block_ref.map(|block| &**block);
        if !self.ensure_client(control) {
            return poll.min(self.reconnect_at.saturating_duration_since(Instant::now()));
        }
        let Some(client) = self.client.clone() else {
            return poll;
        };
        if let Err(error) = self.poll_knobs(&client, block_ref) {
            self.lose_connection(&error, control);
            return poll;
        }
        let Some(block) = block_ref else {
            let reason = self.shared.attachment.waiting_reason();
            self.set_state(
                RegistryState::Publishing,
                format!("waiting for the control block: {reason}"),
                None,
            );
            return poll;
        };
        let Some(local) = self.local_record(block) else {
            self.set_state(
                RegistryState::Publishing,
                "waiting for the data plane to publish its endpoints".to_owned(),
                control,
            );
            return poll;
        };
        if let Err(error) = self.publish(&client, &local) {
            self.lose_connection(&error, control);
            return poll;
        }
        let now = Instant::now();
        if now >= self.peer_poll_at {
            match self.poll_peers(&client, &local) {
                Ok(progress) => {
                    self.sync_table(block, &local);
                    self.peer_delay =
                        if self.table.complete && self.table.instance == local.instance {
                            WATCH_INTERVAL.max(poll)
                        } else if progress || self.peer_delay.is_zero() {
                            poll
                        } else {
                            (self.peer_delay * 2).min(MAX_PEER_BACKOFF.max(poll))
                        };
                    self.peer_poll_at = now + self.peer_delay;
                }
                Err(error) => {
                    self.lose_connection(&error, control);
                    return poll;
                }
            }
        }
        if self.table.complete && self.table.instance == local.instance {
            self.set_state(
                RegistryState::Ready,
                format!("{} nodes known; remote table written", local.nodes),
                control,
            );
        } else {
            let missing: Vec<String> = (0..local.nodes)
                .filter(|node| {
                    *node != self.shared.config.node && !self.accepted.contains_key(node)
                })
                .map(|node| node.to_string())
                .collect();
            self.set_state(
                RegistryState::WaitingForPeers,
                format!("published; waiting for node(s) {}", missing.join(", ")),
                control,
            );
        }
        poll
    }
}

/// Runs the registry worker on its own thread until `stop` is dropped or signalled.
pub fn spawn(
    shared: Arc<Shared>,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rzab-registry".to_owned())
        .spawn(move || {
            let mut worker = RegistryWorker::new(shared);
            loop {
                let pause = worker.step();
                match stop.recv_timeout(pause) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_by_cluster_and_generation() {
        let keys = Keys::new("c", "17");
        assert_eq!(keys.node(2), "rzab:c:17:node:2");
        assert_eq!(keys.ready(2), "rzab:c:17:ready:2");
        assert_eq!(keys.knobs(), "rzab:c:17:knobs");
        assert_ne!(Keys::new("c", "18").node(2), keys.node(2));
    }

    #[test]
    fn versions_grow_past_the_registry_what_was_applied_here_and_the_clock() {
        assert_eq!(next_version(3, 0, 0), 4);
        // The registry lost the document (previous 0) after version 3 was applied here.
        assert_eq!(next_version(0, 3, 0), 4);
        assert_eq!(next_version(0, 0, 1_700_000_000_000), 1_700_000_000_000);
        // A clock behind the versions written so far does not pull them back.
        assert_eq!(
            next_version(1_700_000_000_005, 0, 1_700_000_000_000),
            1_700_000_000_006
        );
        assert_eq!(next_version(u64::MAX, 0, 0), u64::MAX);
    }

    #[test]
    fn throttle_repeats_only_changes_or_after_a_while() {
        let mut throttle = Throttle::default();
        assert!(throttle.due("a", "x"));
        assert!(!throttle.due("a", "x"));
        assert!(throttle.due("a", "y"));
        assert!(throttle.due("b", "y"));
        throttle.clear("a");
        assert!(throttle.due("a", "y"));
    }
}
