//! The registry exchange against a real memcached (started by each test on a free loopback
//! port): in-process control planes over temporary control blocks with fake data planes.
//! Peers find each other and write the remote table; keys of an earlier generation and records
//! with a stale heartbeat are ignored; a restarted data plane's new endpoints reach its peers;
//! cluster-scoped knobs reach every node without losing concurrent updates; memcached being
//! down at start, or lost later, is reported and survived.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; test numbers are small"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::{
    FakeDataPlane, Memcached, Peers, config, eventually, free_port, generation, get_json,
    registry_state, request, shm_address,
};
use rzab_controlplane::ControlPlane;
use rzab_controlplane::options::RegistryAddress;
use rzab_controlplane::registry::{Keys, NodeRecord, RECORD_SCHEMA, ReadyRecord, RegistryClient};
use rzab_shared::{EndpointRecord, Knob, RegistryState, TransportKind};
use serde_json::json;

const WORKERS: u32 = 2;

/// One node: a fake data plane and an in-process control plane.
struct Node {
    data_plane: Option<FakeDataPlane>,
    control_plane: Option<ControlPlane>,
    path: PathBuf,
}

impl Node {
    fn address(&self) -> SocketAddr {
        self.control_plane.as_ref().unwrap().local_addr()
    }

    fn data_plane(&self) -> &FakeDataPlane {
        self.data_plane.as_ref().unwrap()
    }

    async fn stop(mut self) {
        if let Some(control_plane) = self.control_plane.take() {
            control_plane.shutdown().await;
        }
        drop(self.data_plane.take());
    }
}

#[allow(clippy::too_many_arguments, reason = "a test helper")]
async fn start_node(
    dir: &Path,
    cluster: &str,
    generation: &str,
    node: u32,
    nodes: u32,
    registry: &str,
    offset: u32,
) -> Node {
    let path = dir.join(format!("n{node}"));
    let data_plane = FakeDataPlane::start(
        &path,
        cluster,
        node,
        nodes,
        WORKERS,
        offset,
        Peers::ControlPlane,
    );
    let control_plane = ControlPlane::start(config(cluster, generation, node, &path, registry))
        .await
        .unwrap();
    Node {
        data_plane: Some(data_plane),
        control_plane: Some(control_plane),
        path,
    }
}

fn client(memcached: &Memcached) -> RegistryClient {
    RegistryClient::connect(&memcached.address().parse::<RegistryAddress>().unwrap()).unwrap()
}

/// A record for `node` as a control plane would write it, with its own endpoints and age.
fn record(
    cluster: &str,
    generation: &str,
    node: u32,
    nodes: u32,
    port_offset: u32,
    age_ns: u64,
) -> NodeRecord {
    NodeRecord {
        schema: RECORD_SCHEMA,
        cluster: cluster.to_owned(),
        generation: generation.to_owned(),
        node,
        nodes,
        workers: WORKERS,
        instance: 42,
        transport: TransportKind::Shm,
        endpoints: (0..WORKERS)
            .map(|worker| {
                EndpointRecord::new(
                    node as u16,
                    worker as u16,
                    shm_address(node, worker, WORKERS, port_offset),
                )
            })
            .collect(),
        rest_url: "http://127.0.0.1:1".to_owned(),
        metrics_url: "http://127.0.0.1:1/metrics".to_owned(),
        heartbeat_ns: rzab_controlplane::state::now_ns() - age_ns,
        knobs_version: 0,
        knobs_in_force: true,
        controlplane_pid: 1,
        dataplane_pid: 1,
    }
}

fn plant(client: &RegistryClient, keys: &Keys, record: &NodeRecord) {
    let ready = ReadyRecord {
        schema: RECORD_SCHEMA,
        node: record.node,
        instance: record.instance,
        heartbeat_ns: record.heartbeat_ns,
    };
    client
        .set(
            &keys.node(record.node),
            &serde_json::to_string(record).unwrap(),
            600,
        )
        .unwrap();
    client
        .set(
            &keys.ready(record.node),
            &serde_json::to_string(&ready).unwrap(),
            600,
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_exchange_endpoints_ignoring_earlier_runs_and_stale_records() {
    let memcached = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let cluster = "exch";
    let run = generation("exchange");
    let registry = client(&memcached);
    // An earlier run (another generation) left a fresh-looking record for node 1...
    plant(
        &registry,
        &Keys::new(cluster, "earlier-run"),
        &record(cluster, "earlier-run", 1, 2, 900, 0),
    );
    // ...and a dead process of this generation left one whose heartbeat is a minute old.
    plant(
        &registry,
        &Keys::new(cluster, &run),
        &record(cluster, &run, 1, 2, 800, 60_000_000_000),
    );

    let node0 = start_node(dir.path(), cluster, &run, 0, 2, &memcached.address(), 0).await;
    let address0 = node0.address();
    eventually("node 0 reports node 1's record as stale", async || {
        let status = get_json(address0, "/v1/status").await;
        // The peer list is published before the state within one registry step.
        status["peers"][0]["note"]
            .as_str()
            .is_some_and(|note| note.contains("stale"))
            && status["registry"]["state"] == "waiting_for_peers"
    })
    .await;
    let status = get_json(address0, "/v1/status").await;
    assert_eq!(status["peers"][0]["known"], false);
    assert_eq!(
        node0.data_plane().peers_generation(),
        0,
        "no table from stale records"
    );
    assert_eq!(node0.data_plane().remote(1, 0), None);

    let node1 = start_node(dir.path(), cluster, &run, 1, 2, &memcached.address(), 0).await;
    let address1 = node1.address();
    for address in [address0, address1] {
        eventually("both nodes are ready", async || {
            registry_state(address).await == "ready"
        })
        .await;
    }
    for node in [&node0, &node1] {
        let data_plane = node.data_plane();
        assert_eq!(
            data_plane.peers_generation(),
            1,
            "one complete table, written once"
        );
        for peer in 0..2 {
            for worker in 0..WORKERS {
                assert_eq!(
                    data_plane.remote(peer, worker),
                    Some(shm_address(peer, worker, WORKERS, 0))
                );
            }
        }
        assert_eq!(data_plane.block.registry_state(), RegistryState::Ready);
    }
    // The fake data plane's thread notices the table on its next 5 ms tick, which a loaded
    // machine may delay: wait for it rather than race it.
    eventually(
        "the fake data plane runs once peers are known",
        async || get_json(address0, "/v1/status").await["lifecycle"] == "running",
    )
    .await;
    let status = get_json(address0, "/v1/status").await;
    assert_eq!(status["peers"][0]["known"], true);
    assert_eq!(
        status["peers"][0]["instance"],
        format!("{:016x}", node1.data_plane().instance())
    );
    let endpoints = get_json(address1, "/v1/endpoints").await;
    assert_eq!(endpoints["peers_generation"], 1);
    assert_eq!(
        endpoints["remote"][0]["endpoints"][1]["address"],
        json!({"kind": "shm", "port": 1})
    );

    // The published record is what the brief promises.
    let text = registry
        .get(&Keys::new(cluster, &run).node(1))
        .unwrap()
        .unwrap();
    let published: NodeRecord = serde_json::from_str(&text).unwrap();
    assert_eq!(published.instance, node1.data_plane().instance());
    assert_eq!(published.rest_url, format!("http://{address1}"));
    assert_eq!(published.metrics_url, format!("http://{address1}/metrics"));
    assert!(
        registry
            .get(&Keys::new(cluster, &run).ready(1))
            .unwrap()
            .is_some()
    );

    node0.stop().await;
    node1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_data_plane_rejoins_with_new_endpoints_and_cluster_knobs() {
    let memcached = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let cluster = "rejoin";
    let run = generation("rejoin");
    let node0 = start_node(dir.path(), cluster, &run, 0, 2, &memcached.address(), 0).await;
    let mut node1 = start_node(dir.path(), cluster, &run, 1, 2, &memcached.address(), 0).await;
    let (address0, address1) = (node0.address(), node1.address());
    for address in [address0, address1] {
        eventually("both nodes are ready", async || {
            registry_state(address).await == "ready"
        })
        .await;
    }

    // A cluster-wide knob change through node 0 reaches node 1's block.
    let reply = request(
        address0,
        "PATCH",
        "/v1/knobs?scope=cluster",
        Some(r#"{"prepare_batch": 4}"#),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let response = reply.json();
    assert_eq!(response["scope"], "cluster");
    let version = response["registry_version"].as_u64().unwrap();
    assert!(version >= 1);
    assert!(
        response["nodes_applied"]
            .as_array()
            .unwrap()
            .contains(&json!(0))
    );
    assert_eq!(node0.data_plane().block.knob(Knob::PrepareBatch), 4);
    eventually("node 1 applies the cluster knob", async || {
        node1.data_plane().block.knob(Knob::PrepareBatch) == 4
    })
    .await;
    eventually("node 1 reports the knobs version", async || {
        get_json(address1, "/v1/status").await["registry"]["knobs_version"] == json!(version)
    })
    .await;

    // Node 1's data plane restarts: a new instance with new endpoints and default knobs.
    let old_instance = node1.data_plane().instance();
    let generation_before = node0.data_plane().peers_generation();
    node1.data_plane.take().unwrap().stop();
    let restarted = FakeDataPlane::start(
        &node1.path,
        cluster,
        1,
        2,
        WORKERS,
        500,
        Peers::ControlPlane,
    );
    assert_ne!(restarted.instance(), old_instance);
    node1.data_plane = Some(restarted);
    // The slots are written before the generation that announces them.
    eventually(
        "node 0 rewrites node 1's endpoints and announces it",
        async || {
            node0.data_plane().remote(1, 1) == Some(shm_address(1, 1, WORKERS, 500))
                && node0.data_plane().peers_generation() > generation_before
        },
    )
    .await;
    assert_eq!(
        node0.data_plane().remote(1, 0),
        Some(shm_address(1, 0, WORKERS, 500))
    );
    assert_eq!(
        node0.data_plane().remote(0, 0),
        Some(shm_address(0, 0, WORKERS, 0))
    );
    let data_plane1 = node1.data_plane();
    eventually(
        "the restarted node gets its table and the cluster knobs",
        async || {
            data_plane1.peers_generation() > 0 && data_plane1.block.knob(Knob::PrepareBatch) == 4
        },
    )
    .await;
    assert_eq!(
        data_plane1.remote(0, 1),
        Some(shm_address(0, 1, WORKERS, 0))
    );
    assert_eq!(
        data_plane1.remote(1, 1),
        Some(shm_address(1, 1, WORKERS, 500))
    );
    let status = get_json(address0, "/v1/status").await;
    assert_eq!(
        status["peers"][0]["instance"],
        format!("{:016x}", data_plane1.instance())
    );
    eventually("node 1 is ready again", async || {
        registry_state(address1).await == "ready"
    })
    .await;

    node0.stop().await;
    node1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cluster_knob_changes_do_not_lose_each_other() {
    let memcached = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let cluster = "cas";
    let run = generation("cas");
    let node0 = start_node(dir.path(), cluster, &run, 0, 2, &memcached.address(), 0).await;
    let node1 = start_node(dir.path(), cluster, &run, 1, 2, &memcached.address(), 0).await;
    let (address0, address1) = (node0.address(), node1.address());
    for address in [address0, address1] {
        eventually("both nodes are ready", async || {
            registry_state(address).await == "ready"
        })
        .await;
    }
    let changes0 = ["write_batch", "prepare_batch", "doorbell_batch"];
    let changes1 = ["commit_credits", "write_credits", "prepare_credits"];
    let mut tasks = Vec::new();
    for (address, names) in [(address0, changes0), (address1, changes1)] {
        tasks.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for (index, name) in names.iter().enumerate() {
                let body = format!(r#"{{"{name}": {}}}"#, index + 2);
                let reply = request(address, "PATCH", "/v1/knobs?scope=cluster", Some(&body)).await;
                // A concurrent update of another knob may be in force on a node before this
                // one is confirmed there: applied or pending, never refused.
                assert!(matches!(reply.status, 200 | 202), "{}", reply.body);
                versions.push(reply.json()["registry_version"].as_u64().unwrap());
            }
            versions
        }));
    }
    let mut versions = Vec::new();
    for task in tasks {
        versions.extend(task.await.unwrap());
    }
    let document = client(&memcached)
        .read_knobs(&Keys::new(cluster, &run))
        .unwrap()
        .unwrap();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), 6, "six updates, six versions: {versions:?}");
    assert_eq!(
        document.version,
        *versions.last().unwrap(),
        "the last update is the document"
    );
    for names in [changes0, changes1] {
        for (index, name) in names.iter().enumerate() {
            assert_eq!(document.values[*name], json!(index + 2), "{name}");
        }
    }
    for node in [&node0, &node1] {
        let block = &node.data_plane().block;
        eventually("every change reaches every node", async || {
            changes0
                .iter()
                .chain(changes1.iter())
                .enumerate()
                .all(|(position, name)| {
                    let index = position % 3;
                    block.knob(Knob::by_name(name).unwrap()) == (index + 2) as u64
                })
        })
        .await;
    }
    node0.stop().await;
    node1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_down_at_start_and_lost_later_is_reported_and_survived() {
    let port = free_port();
    let registry = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let cluster = "down";
    let run = generation("down");
    let node0 = start_node(dir.path(), cluster, &run, 0, 2, &registry, 0).await;
    let node1 = start_node(dir.path(), cluster, &run, 1, 2, &registry, 0).await;
    let (address0, address1) = (node0.address(), node1.address());
    eventually("the registry is reported unreachable", async || {
        registry_state(address0).await == "unreachable"
    })
    .await;
    let status = get_json(address0, "/v1/status").await;
    assert!(
        status["registry"]["detail"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{status}"
    );
    assert_eq!(
        node0.data_plane().block.registry_state(),
        RegistryState::Unreachable
    );
    assert_eq!(request(address0, "GET", "/metrics", None).await.status, 200);
    assert_eq!(
        request(address0, "GET", "/v1/knobs", None).await.status,
        200
    );

    let mut memcached = Memcached::start_on(port);
    for address in [address0, address1] {
        eventually("memcached came up: both nodes are ready", async || {
            registry_state(address).await == "ready"
        })
        .await;
    }
    let generation0 = node0.data_plane().peers_generation();

    // memcached is lost: the data plane keeps its table, REST and metrics keep answering.
    memcached.stop();
    for address in [address0, address1] {
        eventually("the loss is reported", async || {
            registry_state(address).await == "unreachable"
        })
        .await;
    }
    assert_eq!(request(address0, "GET", "/metrics", None).await.status, 200);
    let reply = request(
        address0,
        "PATCH",
        "/v1/knobs",
        Some(r#"{"write_batch": 2}"#),
    )
    .await;
    assert_eq!(
        reply.status, 200,
        "node-scoped knobs need no registry: {}",
        reply.body
    );
    let reply = request(
        address0,
        "PATCH",
        "/v1/knobs?scope=cluster",
        Some(r#"{"write_batch": 3}"#),
    )
    .await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(
        node0.data_plane().block.knob(Knob::WriteBatch),
        2,
        "the refused change applied nothing"
    );
    assert_eq!(node0.data_plane().peers_generation(), generation0);
    assert_eq!(
        node0.data_plane().remote(1, 0),
        Some(shm_address(1, 0, WORKERS, 0))
    );

    // memcached is back (empty): both republish and are ready again, with no needless bump.
    let _memcached = Memcached::start_on(port);
    for address in [address0, address1] {
        eventually("reconnected: ready again", async || {
            registry_state(address).await == "ready"
        })
        .await;
    }
    assert_eq!(node0.data_plane().peers_generation(), generation0);
    node0.stop().await;
    node1.stop().await;
}

/// Issue 14, finding 1: memcached loses its data (killed, started again empty) in a running
/// cluster whose knobs were changed a few times. The next cluster-wide change must still take
/// effect on every node (its version above every version applied before), be reported as
/// applied only where it is in force, and the values set before the loss must come back into
/// the registry for data planes that start later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_knobs_keep_working_after_memcached_restarts_empty() {
    let port = free_port();
    let mut memcached = Memcached::start_on(port);
    let dir = tempfile::tempdir().unwrap();
    let cluster = "wipe";
    let run = generation("wipe");
    let mut nodes = Vec::new();
    for node in 0..3 {
        nodes.push(start_node(dir.path(), cluster, &run, node, 3, &memcached.address(), 0).await);
    }
    let addresses: Vec<SocketAddr> = nodes.iter().map(Node::address).collect();
    for address in &addresses {
        eventually("every node is ready", async || {
            registry_state(*address).await == "ready"
        })
        .await;
    }
    let patch = async |body: &str| {
        let reply = request(addresses[0], "PATCH", "/v1/knobs?scope=cluster", Some(body)).await;
        assert_eq!(reply.status, 200, "{body}: {}", reply.body);
        let response = reply.json();
        assert_eq!(response["outcome"], "applied", "{response}");
        assert_eq!(response["nodes_applied"], json!([0, 1, 2]), "{response}");
        assert_eq!(response["nodes_pending"], json!([]), "{response}");
        response["registry_version"].as_u64().unwrap()
    };
    let mut before = 0;
    for body in [
        r#"{"write_batch": 3}"#,
        r#"{"commit_credits": 40}"#,
        r#"{"prepare_batch": 6}"#,
    ] {
        let version = patch(body).await;
        assert!(version > before, "versions grow: {version} after {before}");
        before = version;
    }
    let epochs: Vec<u64> = nodes
        .iter()
        .map(|node| node.data_plane().block.knob_epoch())
        .collect();

    // memcached loses everything; the control planes reconnect and republish.
    memcached.stop();
    for address in &addresses {
        eventually("the loss is reported", async || {
            registry_state(*address).await == "unreachable"
        })
        .await;
    }
    memcached = Memcached::start_on(port);
    for address in &addresses {
        eventually("ready again after the restart", async || {
            registry_state(*address).await == "ready"
        })
        .await;
    }

    let version = patch(r#"{"prepare_batch": 5}"#).await;
    assert!(
        version > before,
        "version {version} after the restart must exceed {before}, applied before it"
    );
    for (index, node) in nodes.iter().enumerate() {
        let block = &node.data_plane().block;
        assert_eq!(block.knob(Knob::PrepareBatch), 5, "node {index}");
        assert!(
            block.knob_epoch() > epochs[index],
            "node {index}'s epoch moved"
        );
        assert_eq!(
            block.knob(Knob::WriteBatch),
            3,
            "node {index} keeps earlier values"
        );
    }
    // The registry holds the earlier values again beside the new one, for data planes that
    // start later.
    let document = client(&memcached)
        .read_knobs(&Keys::new(cluster, &run))
        .unwrap()
        .unwrap();
    assert_eq!(document.version, version);
    assert_eq!(document.values["prepare_batch"], json!(5));
    assert_eq!(document.values["write_batch"], json!(3));
    assert_eq!(document.values["commit_credits"], json!(40));
    for node in nodes {
        node.stop().await;
    }
}
