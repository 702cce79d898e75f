//! The registry exchange's state machine ([`RegistryWorker`]) and its thread ([`spawn`]):
//! connect (with backoff), apply newer cluster knobs (and put the document back if the
//! registry lost it), publish this node's record and ready key, poll the peers' records,
//! accept fresh and compatible ones, and write the control block's remote table.
//!
//! Touches: the registry through a [`RegistryClient`] its [`Connector`] opened, the attached
//! control block's registry state, handshake, remote table and knobs, [`RegistryStatus`], and
//! the log.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rzab_shared::{AttachedControlBlock, ControlBlock, EndpointRecord, RegistryState};

use super::client::{Connector, MemcachedConnector, RegistryClient};
use super::cluster_knobs::KnobsApply;
use super::records::{Keys, NodeRecord, ReadyRecord, decode, encode};
use super::status::{PeerView, RegistryStatus};
use super::{
    KNOBS_TTL_SECONDS, LOG_REPEAT, MAX_PEER_BACKOFF, RECONNECT_MAX, RECONNECT_MIN, RECORD_SCHEMA,
    RECORD_TTL_SECONDS, REFRESH_INTERVAL, RegistryError, WATCH_INTERVAL,
};
use crate::state::{Shared, now_ns};

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
    connector: Box<dyn Connector>,
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
    /// A worker that connects to the configured memcached server.
    pub fn new(shared: Arc<Shared>) -> Self {
        RegistryWorker::with_connector(shared, Box::new(MemcachedConnector))
    }

    /// A worker that opens its registry connections with `connector`.
    pub fn with_connector(shared: Arc<Shared>, connector: Box<dyn Connector>) -> Self {
        let keys = Keys::new(&shared.config.cluster, &shared.config.generation);
        let now = Instant::now();
        RegistryWorker {
            shared,
            keys,
            connector,
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
        match self.connector.connect(&self.shared.config.registry) {
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
                if let Some(reason) = record.incompatibility(node, local) {
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
