//! Unit tests of the registry worker's logic against the in-memory store: registration and
//! refresh, accepting peers (fresh, ready, compatible, this generation only), the remote table
//! and its generation, restarts of a peer, of this control plane and of the registry, cluster
//! knobs (applied, in force, superseded, refused, restored, versions that never go back), and
//! losing the registry. The same behaviour against a real memcached is in
//! `controlplane/tests/registry.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; test numbers are small"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use rzab_shared::{
    ControlBlockInit, EndpointAddress, EndpointRecord, Knob, OwnedControlBlock, RegistryState,
    TransportKind,
};
use serde_json::json;

use super::client::{RegistryClient, Store};
use super::cluster_knobs::{KnobsBase, KnobsDocument, now_ms};
use super::memory::{MemoryConnector, MemoryStore};
use super::records::{Keys, NodeRecord, ReadyRecord};
use super::worker::RegistryWorker;
use super::{KNOBS_TTL_SECONDS, RECORD_SCHEMA, RECORD_TTL_SECONDS, REFRESH_INTERVAL};
use super::{PeerView, RegistryError};
use crate::options::{Config, Options};
use crate::state::{Shared, now_ns};

const CLUSTER: &str = "unit";
const WORKERS: u32 = 2;
/// How long a test waits for the worker to get somewhere.
const PATIENCE: Duration = Duration::from_secs(5);

fn config(generation: &str, node: u32, block: &Path) -> Config {
    Options::try_parse_from([
        "rzab-controlplane",
        "--cluster",
        CLUSTER,
        "--generation",
        generation,
        "--node",
        &node.to_string(),
        "--block",
        block.to_str().unwrap(),
        "--registry",
        "127.0.0.1:11211",
        "--listen",
        "127.0.0.1:0",
        "--poll-ms",
        "1",
    ])
    .unwrap()
    .config()
    .unwrap()
}

/// Shm port of a node's worker, shifted by `offset` so restarts get new endpoints.
fn shm(node: u32, worker: u32, offset: u32) -> EndpointAddress {
    EndpointAddress::Shm {
        port: offset + node * WORKERS + worker,
    }
}

fn endpoints(node: u32, offset: u32) -> Vec<EndpointRecord> {
    (0..WORKERS)
        .map(|worker| EndpointRecord::new(node as u16, worker as u16, shm(node, worker, offset)))
        .collect()
}

/// One node: its control block (standing in for the data plane) and a registry worker on
/// the shared in-memory store.
struct Node {
    _dir: tempfile::TempDir,
    path: PathBuf,
    block: OwnedControlBlock,
    store: Arc<MemoryStore>,
    shared: Arc<Shared>,
    worker: RegistryWorker,
    attempts: Arc<AtomicU32>,
    keys: Keys,
}

impl Node {
    /// A node whose data plane has not published its endpoints yet.
    fn unpublished(store: &Arc<MemoryStore>, generation: &str, node: u32, nodes: u32) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("n{node}"));
        let block = OwnedControlBlock::create(
            &path,
            &ControlBlockInit {
                cluster: CLUSTER.to_owned(),
                node_id: node,
                node_count: nodes,
                worker_count: WORKERS,
                transport: TransportKind::Shm,
            },
        )
        .unwrap();
        let (shared, worker, attempts) = Node::control_plane(store, generation, node, &path);
        Node {
            _dir: dir,
            path,
            block,
            store: Arc::clone(store),
            shared,
            worker,
            attempts,
            keys: Keys::new(CLUSTER, generation),
        }
    }

    /// A node whose data plane has published its endpoints (at `offset`).
    fn start(store: &Arc<MemoryStore>, generation: &str, node: u32, nodes: u32) -> Node {
        let node = Node::unpublished(store, generation, node, nodes);
        node.publish_endpoints(0);
        node
    }

    fn control_plane(
        store: &Arc<MemoryStore>,
        generation: &str,
        node: u32,
        path: &Path,
    ) -> (Arc<Shared>, RegistryWorker, Arc<AtomicU32>) {
        let shared = Arc::new(Shared::new(
            config(generation, node, path),
            "127.0.0.1:7100".parse().unwrap(),
        ));
        let _ = shared.attachment.step();
        let connector = MemoryConnector::new(store);
        let attempts = Arc::clone(&connector.attempts);
        let worker = RegistryWorker::with_connector(Arc::clone(&shared), Box::new(connector));
        (shared, worker, attempts)
    }

    /// A new control plane process for the same block (the old one's state is gone).
    fn restart_control_plane(&mut self) {
        let generation = self.shared.config.generation.clone();
        let (shared, worker, attempts) =
            Node::control_plane(&self.store, &generation, self.node(), &self.path);
        self.shared = shared;
        self.worker = worker;
        self.attempts = attempts;
    }

    fn node(&self) -> u32 {
        self.shared.config.node
    }

    fn instance(&self) -> u64 {
        self.block.header.instance.load(Ordering::Relaxed)
    }

    fn publish_endpoints(&self, offset: u32) {
        for worker in 0..WORKERS {
            self.block
                .worker(worker as usize)
                .local_endpoint
                .store(Some(&shm(self.node(), worker, offset)));
        }
        self.block
            .handshake
            .endpoints_published
            .store(self.instance(), Ordering::Release);
    }

    fn step(&mut self) {
        let _ = self.worker.step();
    }

    /// Steps the worker until `done` holds; panics after [`PATIENCE`].
    fn step_until(&mut self, what: &str, done: impl Fn(&Node) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.step();
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: state {:?} ({}), peers {:?}",
                self.state(),
                self.shared.registry.detail(),
                self.shared.registry.peers()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn state(&self) -> RegistryState {
        self.shared.registry.state()
    }

    fn peers_generation(&self) -> u64 {
        self.block
            .handshake
            .peers_generation
            .load(Ordering::Acquire)
    }

    fn remote(&self, node: u32, worker: u32) -> Option<EndpointAddress> {
        self.block.remote[node as usize][worker as usize].load()
    }

    fn peer(&self, node: u32) -> PeerView {
        self.shared
            .registry
            .peers()
            .into_iter()
            .find(|peer| peer.node == node)
            .unwrap_or_default()
    }

    /// This node's record as published.
    fn record(&self) -> Option<NodeRecord> {
        self.store
            .value(&self.keys.node(self.node()))
            .map(|text| serde_json::from_str(&text).unwrap())
    }

    /// Every worker picks up the current knobs, as a running data plane does.
    fn see_knobs(&self) {
        let epoch = self.block.knob_epoch();
        for worker in 0..WORKERS {
            self.block
                .worker(worker as usize)
                .gauges
                .knob_epoch_seen
                .store(epoch, Ordering::Release);
        }
    }

    fn knobs_version(&self) -> u64 {
        self.shared.registry.knobs_version(self.instance())
    }

    fn client(&self) -> RegistryClient {
        RegistryClient::new(
            Arc::clone(&self.store) as Arc<dyn Store>,
            "memory".to_owned(),
        )
    }
}

/// A record for `node` as its control plane would write it.
fn peer_record(generation: &str, node: u32, nodes: u32, offset: u32, instance: u64) -> NodeRecord {
    NodeRecord {
        schema: RECORD_SCHEMA,
        cluster: CLUSTER.to_owned(),
        generation: generation.to_owned(),
        node,
        nodes,
        workers: WORKERS,
        instance,
        transport: TransportKind::Shm,
        endpoints: endpoints(node, offset),
        rest_url: "http://127.0.0.1:1".to_owned(),
        metrics_url: "http://127.0.0.1:1/metrics".to_owned(),
        heartbeat_ns: now_ns(),
        knobs_version: 0,
        knobs_in_force: true,
        controlplane_pid: 1,
        dataplane_pid: 1,
    }
}

/// Writes `record` and a ready key naming `ready_instance` (none: no ready key).
fn plant(store: &MemoryStore, keys: &Keys, record: &NodeRecord, ready_instance: Option<u64>) {
    store
        .set(
            &keys.node(record.node),
            &serde_json::to_string(record).unwrap(),
            600,
        )
        .unwrap();
    if let Some(instance) = ready_instance {
        let ready = ReadyRecord {
            schema: RECORD_SCHEMA,
            node: record.node,
            instance,
            heartbeat_ns: record.heartbeat_ns,
        };
        store
            .set(
                &keys.ready(record.node),
                &serde_json::to_string(&ready).unwrap(),
                600,
            )
            .unwrap();
    }
}

fn plant_ready(store: &MemoryStore, keys: &Keys, record: &NodeRecord) {
    plant(store, keys, record, Some(record.instance));
}

fn knobs_document(version: u64, values: serde_json::Value) -> KnobsDocument {
    KnobsDocument {
        schema: RECORD_SCHEMA,
        version,
        values: values.as_object().unwrap().clone(),
        updated_by: 9,
        updated_ns: now_ns(),
    }
}

fn put_knobs(store: &MemoryStore, keys: &Keys, document: &KnobsDocument) {
    store
        .set(
            &keys.knobs(),
            &serde_json::to_string(document).unwrap(),
            KNOBS_TTL_SECONDS,
        )
        .unwrap();
}

fn stored_knobs(store: &MemoryStore, keys: &Keys) -> Option<KnobsDocument> {
    store
        .value(&keys.knobs())
        .map(|text| serde_json::from_str(&text).unwrap())
}

#[test]
fn waits_for_the_control_block_then_for_the_endpoints_then_publishes_record_and_ready_key() {
    let store = MemoryStore::new();
    let dir = tempfile::tempdir().unwrap();
    let (shared, mut worker, _) = Node::control_plane(&store, "g", 0, &dir.path().join("none"));
    let _ = worker.step();
    assert_eq!(shared.registry.state(), RegistryState::Publishing);
    assert!(
        shared
            .registry
            .detail()
            .contains("waiting for the control block"),
        "{}",
        shared.registry.detail()
    );

    let mut node = Node::unpublished(&store, "g", 0, 2);
    node.step();
    assert_eq!(node.state(), RegistryState::Publishing);
    assert!(
        node.shared
            .registry
            .detail()
            .contains("waiting for the data plane to publish its endpoints")
    );
    assert_eq!(node.block.registry_state(), RegistryState::Publishing);
    assert!(node.record().is_none());

    node.publish_endpoints(0);
    node.step();
    let record = node.record().unwrap();
    assert_eq!(record.schema, RECORD_SCHEMA);
    assert_eq!(
        (record.cluster.as_str(), record.generation.as_str()),
        (CLUSTER, "g")
    );
    assert_eq!((record.node, record.nodes, record.workers), (0, 2, WORKERS));
    assert_eq!(record.instance, node.instance());
    assert_eq!(record.transport, TransportKind::Shm);
    assert_eq!(record.endpoints, endpoints(0, 0));
    assert_eq!((record.knobs_version, record.knobs_in_force), (0, true));
    assert_eq!(record.controlplane_pid, std::process::id());
    assert!(now_ns() - record.heartbeat_ns < 5_000_000_000);
    let ready: ReadyRecord =
        serde_json::from_str(&store.value(&node.keys.ready(0)).unwrap()).unwrap();
    assert_eq!((ready.node, ready.instance), (0, record.instance));
    assert_eq!(
        store.ttl(&node.keys.node(0)),
        Some(RECORD_TTL_SECONDS),
        "a dead control plane's record must expire"
    );
    assert_eq!(store.ttl(&node.keys.ready(0)), Some(RECORD_TTL_SECONDS));
    assert_eq!(node.state(), RegistryState::WaitingForPeers);
    assert!(
        node.shared
            .registry
            .detail()
            .contains("waiting for node(s) 1")
    );
    assert_eq!(node.block.registry_state(), RegistryState::WaitingForPeers);
    assert_eq!(
        node.peer(1).note.as_deref(),
        Some("no record in the registry")
    );

    // Quick rounds do not rewrite an unchanged record; the refresh interval does.
    for _ in 0..20 {
        node.step();
    }
    assert_eq!(store.sets(&node.keys.node(0)), 1);
    std::thread::sleep(REFRESH_INTERVAL);
    node.step();
    assert_eq!(store.sets(&node.keys.node(0)), 2);
    assert!(node.record().unwrap().heartbeat_ns > record.heartbeat_ns);
}

#[test]
fn two_nodes_find_each_other_and_write_their_remote_tables_once() {
    let store = MemoryStore::new();
    let mut a = Node::start(&store, "g", 0, 2);
    let mut b = Node::start(&store, "g", 1, 2);
    let deadline = Instant::now() + PATIENCE;
    while a.state() != RegistryState::Ready || b.state() != RegistryState::Ready {
        assert!(Instant::now() < deadline, "{:?} {:?}", a.state(), b.state());
        a.step();
        b.step();
        std::thread::sleep(Duration::from_millis(1));
    }
    for (node, peer) in [(&a, 1), (&b, 0)] {
        assert_eq!(node.peers_generation(), 1);
        assert_eq!(node.block.registry_state(), RegistryState::Ready);
        for worker in 0..WORKERS {
            assert_eq!(node.remote(peer, worker), Some(shm(peer, worker, 0)));
            // Its own endpoints are in its table too.
            assert_eq!(
                node.remote(node.node(), worker),
                Some(shm(node.node(), worker, 0))
            );
        }
        let view = node.peer(peer);
        assert!(view.known && view.record_present, "{view:?}");
        assert_eq!(view.note, None);
    }
    assert_eq!(
        a.peer(1).instance,
        Some(format!("{:016x}", b.instance())),
        "the accepted instance, in hex"
    );
    // Watching on: nothing changed, so no further bump.
    for _ in 0..50 {
        a.step();
        b.step();
    }
    assert_eq!((a.peers_generation(), b.peers_generation()), (1, 1));
}

#[test]
fn only_fresh_ready_compatible_records_of_this_generation_are_accepted() {
    let store = MemoryStore::new();
    let mut node = Node::start(&store, "g", 0, 2);
    let keys = node.keys.clone();
    let note_is = |expected: &'static str| {
        move |node: &Node| {
            node.peer(1)
                .note
                .as_deref()
                .is_some_and(|note| note.starts_with(expected))
        }
    };

    // A record of another generation is not this run's.
    let other = Keys::new(CLUSTER, "earlier");
    plant_ready(&store, &other, &peer_record("earlier", 1, 2, 0, 42));
    node.step_until("other generation", note_is("no record in the registry"));

    // A record without its ready key, or whose ready key names another instance.
    let record = peer_record("g", 1, 2, 0, 42);
    plant(&store, &keys, &record, None);
    node.step_until("no ready key", note_is("record not marked ready yet"));
    plant(&store, &keys, &record, Some(41));
    node.step_until(
        "ready for another instance",
        note_is("record not marked ready yet"),
    );

    // A record whose heartbeat is old: left by a dead process.
    let mut stale = record.clone();
    stale.heartbeat_ns = now_ns() - 60_000_000_000;
    plant_ready(&store, &keys, &stale);
    node.step_until("stale", note_is("stale record"));

    // Records that do not fit this node's block.
    let mut wrong_shape = record.clone();
    wrong_shape.workers = 3;
    plant_ready(&store, &keys, &wrong_shape);
    node.step_until("other shape", note_is("incompatible: 2 nodes x 3 workers"));
    let mut wrong_generation = record.clone();
    wrong_generation.generation = "earlier".to_owned();
    plant_ready(&store, &keys, &wrong_generation);
    node.step_until("generation inside", note_is("incompatible: record names"));
    store.set(&keys.node(1), "{not json", 600).unwrap();
    node.step_until("garbage", note_is("registry key"));

    assert!(!node.peer(1).known);
    assert_eq!(node.peers_generation(), 0);
    assert_eq!(node.remote(1, 0), None);
    assert_eq!(node.state(), RegistryState::WaitingForPeers);

    // The good one is taken.
    plant_ready(&store, &keys, &record);
    node.step_until("accepted", |node| node.state() == RegistryState::Ready);
    assert_eq!(node.peers_generation(), 1);
    assert_eq!(node.remote(1, 1), Some(shm(1, 1, 0)));

    // Once accepted, the same instance stays known even when its heartbeat ages (a slow peer
    // is not a dead one while its record is there).
    let mut aged = record.clone();
    aged.heartbeat_ns = now_ns() - 60_000_000_000;
    plant_ready(&store, &keys, &aged);
    for _ in 0..10 {
        node.step();
    }
    assert!(node.peer(1).known);
    assert_eq!(node.state(), RegistryState::Ready);
}

#[test]
fn a_restarted_peer_gets_its_new_endpoints_written_and_the_generation_bumped() {
    let store = MemoryStore::new();
    let mut node = Node::start(&store, "g", 0, 2);
    let keys = node.keys.clone();
    plant_ready(&store, &keys, &peer_record("g", 1, 2, 0, 42));
    node.step_until("ready", |node| node.state() == RegistryState::Ready);
    assert_eq!(node.peers_generation(), 1);

    plant_ready(&store, &keys, &peer_record("g", 1, 2, 100, 43));
    node.step_until("rewritten", |node| node.peers_generation() == 2);
    for worker in 0..WORKERS {
        assert_eq!(node.remote(1, worker), Some(shm(1, worker, 100)));
    }
    assert_eq!(node.peer(1).instance, Some(format!("{:016x}", 43)));
    assert_eq!(node.state(), RegistryState::Ready);
}

#[test]
fn a_restarted_control_plane_finds_its_table_written_and_does_not_bump_the_generation() {
    let store = MemoryStore::new();
    let mut node = Node::start(&store, "g", 0, 2);
    plant_ready(&store, &node.keys.clone(), &peer_record("g", 1, 2, 0, 42));
    node.step_until("ready", |node| node.state() == RegistryState::Ready);
    assert_eq!(node.peers_generation(), 1);

    node.restart_control_plane();
    node.step_until("ready again", |node| node.state() == RegistryState::Ready);
    assert_eq!(
        node.peers_generation(),
        1,
        "the data plane must not re-resolve an unchanged table"
    );
}

#[test]
fn cluster_knobs_are_applied_and_reported_in_force_once_every_worker_has_them() {
    let store = MemoryStore::new();
    let mut node = Node::start(&store, "g", 0, 2);
    let keys = node.keys.clone();
    let default = node.block.knob(Knob::WriteRatioPermille);
    assert_ne!(default, 200);
    put_knobs(
        &store,
        &keys,
        &knobs_document(5, json!({"write_ratio_permille": 200})),
    );
    node.step();
    assert_eq!(node.block.knob(Knob::WriteRatioPermille), 200);
    assert_eq!(node.knobs_version(), 5);
    let record = node.record().unwrap();
    assert_eq!((record.knobs_version, record.knobs_in_force), (5, false));

    node.see_knobs();
    node.step();
    let record = node.record().unwrap();
    assert_eq!(
        (record.knobs_version, record.knobs_in_force),
        (5, true),
        "a change of knobs_in_force is published at once"
    );
    // Every live control plane renews the document's lifetime.
    assert_eq!(store.ttl(&keys.knobs()), Some(KNOBS_TTL_SECONDS));
}

#[test]
fn an_older_or_refused_document_does_not_replace_the_applied_one() {
    let store = MemoryStore::new();
    let mut node = Node::start(&store, "g", 0, 2);
    let keys = node.keys.clone();
    put_knobs(
        &store,
        &keys,
        &knobs_document(10, json!({"write_ratio_permille": 300})),
    );
    node.step();
    assert_eq!(node.block.knob(Knob::WriteRatioPermille), 300);

    // Older: superseded, the applied version stays in force.
    put_knobs(
        &store,
        &keys,
        &knobs_document(7, json!({"write_ratio_permille": 100})),
    );
    node.step();
    assert_eq!(node.block.knob(Knob::WriteRatioPermille), 300);
    assert_eq!(node.knobs_version(), 10);

    // Not JSON: ignored, and the worker carries on publishing.
    store
        .set(&keys.knobs(), "{oops", KNOBS_TTL_SECONDS)
        .unwrap();
    node.step();
    assert_eq!(node.knobs_version(), 10);
    assert_eq!(node.state(), RegistryState::WaitingForPeers);

    // Newer but refused values: skipped (counted as seen so it does not block later ones).
    put_knobs(
        &store,
        &keys,
        &knobs_document(11, json!({"no_such_knob": 1})),
    );
    node.step();
    assert_eq!(node.block.knob(Knob::WriteRatioPermille), 300);
    assert_eq!(node.knobs_version(), 11);
    put_knobs(
        &store,
        &keys,
        &knobs_document(
            12,
            json!({"write_ratio_permille": 1001}), // out of range
        ),
    );
    node.step();
    assert_eq!(node.block.knob(Knob::WriteRatioPermille), 300);

    // A later good one applies.
    put_knobs(
        &store,
        &keys,
        &knobs_document(13, json!({"write_ratio_permille": 400})),
    );
    node.step();
    assert_eq!(node.block.knob(Knob::WriteRatioPermille), 400);
    assert_eq!(node.knobs_version(), 13);
}

#[test]
fn knob_versions_never_go_backwards_when_the_registry_restarts_empty() {
    let store = MemoryStore::new();
    let mut node = Node::start(&store, "g", 0, 2);
    let keys = node.keys.clone();
    // Written by a node whose clock is well ahead of this one's.
    let ahead = now_ms() + 1_000_000_000;
    put_knobs(
        &store,
        &keys,
        &knobs_document(ahead, json!({"write_ratio_permille": 200})),
    );
    node.step();
    assert_eq!(node.knobs_version(), ahead);

    // memcached restarts empty: the newest document applied here is put back, values and all,
    // so data planes that start later still get them.
    store.restart_empty();
    node.step();
    let restored = stored_knobs(&store, &keys).unwrap();
    assert_eq!(restored.version, ahead);
    assert_eq!(restored.values["write_ratio_permille"], json!(200));

    // Lost again (expired) right before an update: the update builds on what was applied here,
    // so its version is above it and the earlier values survive the merge.
    store.expire(&keys.knobs());
    let changes = json!({"doorbell_batch": 8});
    let updated = node
        .client()
        .update_knobs(
            &keys,
            changes.as_object().unwrap(),
            0,
            &node.shared.registry.knobs_base(),
        )
        .unwrap();
    assert_eq!(updated.version, ahead + 1);
    assert_eq!(updated.values["write_ratio_permille"], json!(200));
    assert_eq!(updated.values["doorbell_batch"], json!(8));
    node.step();
    assert_eq!(node.knobs_version(), ahead + 1);
    assert_eq!(node.block.knob(Knob::DoorbellBatch), 8);

    // Another control plane that had applied less puts its older document back first: the
    // next update still goes above what was applied here.
    put_knobs(
        &store,
        &keys,
        &knobs_document(ahead - 10, json!({"write_ratio_permille": 100})),
    );
    node.step();
    assert_eq!(
        node.knobs_version(),
        ahead + 1,
        "the older one is superseded"
    );
    let above = node
        .client()
        .update_knobs(
            &keys,
            json!({"doorbell_batch": 2}).as_object().unwrap(),
            0,
            &node.shared.registry.knobs_base(),
        )
        .unwrap();
    assert_eq!(above.version, ahead + 2);
    node.step();
    assert_eq!(node.knobs_version(), ahead + 2);

    // A restarted control plane has applied nothing, yet builds on the registry's version.
    node.restart_control_plane();
    node.step();
    assert_eq!(node.knobs_version(), ahead + 2);
    let next = node
        .client()
        .update_knobs(
            &keys,
            json!({"doorbell_batch": 4}).as_object().unwrap(),
            0,
            &node.shared.registry.knobs_base(),
        )
        .unwrap();
    assert_eq!(next.version, ahead + 3);
}

#[test]
fn an_update_with_nothing_applied_and_no_document_starts_at_the_clock() {
    let store = MemoryStore::new();
    let keys = Keys::new(CLUSTER, "g");
    let client = RegistryClient::new(Arc::clone(&store) as Arc<dyn Store>, "memory".to_owned());
    let before = now_ms();
    let document = client
        .update_knobs(
            &keys,
            json!({"doorbell_batch": 8}).as_object().unwrap(),
            3,
            &KnobsBase::default(),
        )
        .unwrap();
    assert!(
        document.version >= before,
        "{} < {before}",
        document.version
    );
    assert_eq!(document.updated_by, 3);
    assert_eq!(stored_knobs(&store, &keys), Some(document));
}

#[test]
fn concurrent_knob_updates_are_merged_not_lost() {
    let store = MemoryStore::new();
    let keys = Keys::new(CLUSTER, "g");
    let client = RegistryClient::new(Arc::clone(&store) as Arc<dyn Store>, "memory".to_owned());
    put_knobs(
        &store,
        &keys,
        &knobs_document(1, json!({"write_ratio_permille": 100})),
    );
    // Another node's update lands between this one's gets and cas.
    let theirs = knobs_document(2, json!({"write_ratio_permille": 100, "doorbell_batch": 4}));
    store.write_before_next_cas(&keys.knobs(), &serde_json::to_string(&theirs).unwrap());
    let ours = client
        .update_knobs(
            &keys,
            json!({"prepare_credits": 8}).as_object().unwrap(),
            0,
            &KnobsBase::default(),
        )
        .unwrap();
    assert!(ours.version > 2);
    assert_eq!(ours.values["doorbell_batch"], json!(4), "their change kept");
    assert_eq!(ours.values["prepare_credits"], json!(8));
    assert_eq!(ours.values["write_ratio_permille"], json!(100));
    assert_eq!(stored_knobs(&store, &keys), Some(ours));
}

#[test]
fn an_update_that_loses_every_compare_and_swap_round_says_so() {
    let store = MemoryStore::new();
    let keys = Keys::new(CLUSTER, "g");
    let client = RegistryClient::new(Arc::clone(&store) as Arc<dyn Store>, "memory".to_owned());
    let document = knobs_document(1, json!({"doorbell_batch": 4}));
    put_knobs(&store, &keys, &document);
    for _ in 0..super::CAS_ATTEMPTS {
        store.write_before_next_cas(&keys.knobs(), &serde_json::to_string(&document).unwrap());
    }
    match client.update_knobs(
        &keys,
        json!({"doorbell_batch": 8}).as_object().unwrap(),
        0,
        &KnobsBase::default(),
    ) {
        Err(RegistryError::Contended { attempts, .. }) => {
            assert_eq!(attempts, super::CAS_ATTEMPTS);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unreachable_registry_is_reported_and_retried_with_backoff() {
    let store = MemoryStore::new();
    let mut node = Node::start(&store, "g", 0, 2);
    plant_ready(&store, &node.keys.clone(), &peer_record("g", 1, 2, 0, 42));
    store.set_down(true);
    node.step();
    assert_eq!(node.state(), RegistryState::Unreachable);
    assert_eq!(node.block.registry_state(), RegistryState::Unreachable);
    assert!(
        node.shared
            .registry
            .detail()
            .contains("registry unreachable")
    );
    assert!(node.shared.registry.client().is_none());
    assert_eq!(node.attempts.load(Ordering::Relaxed), 1);
    // Backoff: an immediate round does not try again.
    node.step();
    assert_eq!(node.attempts.load(Ordering::Relaxed), 1);

    store.set_down(false);
    node.step_until("ready", |node| node.state() == RegistryState::Ready);
    assert_eq!(node.attempts.load(Ordering::Relaxed), 2);
    assert!(node.shared.registry.client().is_some());
    assert_eq!(node.peers_generation(), 1);
}

#[test]
fn losing_the_registry_midway_keeps_the_table_and_republishes_after_reconnecting() {
    let store = MemoryStore::new();
    let mut node = Node::start(&store, "g", 0, 2);
    let keys = node.keys.clone();
    let peer = peer_record("g", 1, 2, 0, 42);
    plant_ready(&store, &keys, &peer);
    node.step_until("ready", |node| node.state() == RegistryState::Ready);

    store.set_down(true);
    node.step();
    assert_eq!(node.state(), RegistryState::Unreachable);
    assert!(node.shared.registry.detail().contains("registry lost"));
    assert!(node.shared.registry.client().is_none());
    // The data plane keeps the table it has.
    assert_eq!(node.remote(1, 0), Some(shm(1, 0, 0)));

    // memcached comes back empty; the peer republishes, so must this node.
    store.restart_empty();
    store.set_down(false);
    plant_ready(&store, &keys, &peer);
    node.step_until("republished", |node| {
        node.record().is_some() && node.state() == RegistryState::Ready
    });
    assert_eq!(node.peers_generation(), 1, "nothing changed in the table");
}
