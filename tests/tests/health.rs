//! Health that does not lie, with real processes (data planes, control planes, memcached): a
//! follower whose leader's data plane is SIGKILLed, and a leader whose followers are, must say
//! so in every place an operator looks: the data plane's log, the control plane's `/v1/status`
//! and `/healthz` (503 with the reason), and `/metrics`. With failover off
//! (`election_timeout_ms=0`, as with several workers per node) they report `no_leader` and
//! `no_quorum` within the peer timeout; with it on (the default) they report `electing` within
//! the election timeout, and the followers of a dead leader serve again under the one they
//! elect. Before, they kept reporting `serving`, healthz 200 and lag 0 while nothing committed.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use rzab_tests::ops::{Cluster, ClusterSpec, Memcached, wait_until};
use rzab_tests::serial;

/// A short peer timeout keeps the test quick; the default is one second. `failover` leaves
/// the election timeout at its default, else turns failover off.
fn started(label: &'static str, failover: bool) -> (tempfile::TempDir, Memcached, Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let memcached = Memcached::start(dir.path());
    let mut spec = ClusterSpec::new(label);
    spec.extra = vec!["--knob".into(), "peer_timeout_ms=300".into()];
    if !failover {
        spec.extra
            .extend(["--knob".into(), "election_timeout_ms=0".into()]);
    }
    let mut cluster = Cluster::start(spec, &memcached, dir.path());
    cluster.wait_running();
    cluster.wait_for_writes(2_000.0);
    for node in 0..3 {
        let health = cluster.control_plane(node).get("/healthz");
        assert_eq!(health.status, 200, "node {node} before: {}", health.body);
    }
    (dir, memcached, cluster)
}

/// Waits until `node` reports `state` in its health, status and metrics, and its data plane's
/// log says so.
fn wait_reported(cluster: &Cluster, node: u8, state: &str) {
    let reason = if state == "electing" {
        "electing"
    } else {
        "peer_timeout_ms"
    };
    let control_plane = cluster.control_plane(node);
    wait_until(&format!("node {node}'s healthz reports {state}"), || {
        let health = control_plane.get("/healthz");
        health.status == 503 && health.body.contains(state)
    });
    let health = control_plane.get("/healthz").json();
    assert_eq!(health["ok"], false, "{health}");
    assert!(
        health["reason"].as_str().unwrap().contains(reason),
        "the reason must say what timed out: {health}"
    );
    let status = control_plane.status();
    assert!(
        status.to_string().contains(&format!("\"{state}\"")),
        "/v1/status does not show {state}: {status}"
    );
    let metrics = cluster.metrics(node);
    assert!(
        metrics.sum("rzab_sync_state", &[("state", state)]) > 0.0,
        "rzab_sync_state{{state=\"{state}\"}} is missing"
    );
    // The log line comes from the data plane's reporting thread, which looks every 50 ms.
    let data_plane = cluster.data_planes[usize::from(node)].as_ref().unwrap();
    wait_until(&format!("node {node}'s data plane logs {state}"), || {
        data_plane
            .output()
            .lines()
            .any(|line| line.contains(&format!("pipeline 0: {state}")))
    });
}

#[test]
fn without_failover_followers_of_a_dead_leader_report_it_everywhere() {
    let _serial = serial();
    let (_dir, _memcached, mut cluster) = started("noleader", false);
    cluster.data_planes[0].as_mut().unwrap().kill();
    for node in 1..3 {
        wait_reported(&cluster, node, "no_leader");
    }
}

#[test]
fn without_failover_a_leader_that_hears_no_quorum_reports_it_everywhere() {
    let _serial = serial();
    let (_dir, _memcached, mut cluster) = started("noquorum", false);
    for node in 1..3 {
        cluster.data_planes[node].as_mut().unwrap().kill();
    }
    wait_reported(&cluster, 0, "no_quorum");
}

/// With failover on, a leader whose followers are dead gives up leading (it could commit
/// nothing) and says it is electing, everywhere, for as long as no quorum is back.
#[test]
fn a_leader_that_loses_its_quorum_steps_down_and_reports_electing_everywhere() {
    let _serial = serial();
    let (_dir, _memcached, mut cluster) = started("fquorum", true);
    for node in 1..3 {
        cluster.data_planes[node].as_mut().unwrap().kill();
    }
    wait_reported(&cluster, 0, "electing");
    let status = cluster.control_plane(0).status();
    assert_eq!(status["role"], "electing", "{status}");
}

/// With failover on, the followers of a dead leader report that they elect, then elect one
/// of them, and both serve again: healthz 200, one leader, writes completing.
#[test]
fn followers_of_a_dead_leader_elect_another_and_serve_again() {
    let _serial = serial();
    let (_dir, _memcached, mut cluster) = started("felect", true);
    cluster.data_planes[0].as_mut().unwrap().kill();
    for node in 1..3 {
        let data_plane = cluster.data_planes[usize::from(node)].as_ref().unwrap();
        wait_until(&format!("node {node} logs the new leader"), || {
            data_plane.output().contains("leads epoch 2")
        });
        let control_plane = cluster.control_plane(node);
        wait_until(&format!("node {node}'s healthz is 200 again"), || {
            control_plane.get("/healthz").status == 200
        });
    }
    let mut roles: Vec<String> = (1..3)
        .map(|node| {
            cluster.control_plane(node).status()["role"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    roles.sort_unstable();
    assert_eq!(roles, ["follower", "leader"], "{roles:?}");
    let metrics = cluster.metrics(1);
    assert!(
        metrics.sum("rzab_elections_total", &[("event", "started")]) >= 1.0,
        "node 1 counted no election"
    );
    assert!(
        metrics.sum("rzab_epoch", &[]) >= 2.0,
        "node 1 is not in epoch 2"
    );
}

/// A node whose link is cut (its veth down, between network namespaces) hears nothing from
/// its leader: it gives it up and reports `electing` (it cannot win alone), and serves again
/// under the same leader once the link is back (catching up, by rejoining as a new process if
/// the leader left it behind).
#[test]
fn a_follower_cut_off_from_its_leader_reports_it_and_recovers() {
    use rzab_shared::SyncState;
    use std::sync::atomic::Ordering;

    let _serial = serial();
    assert!(
        rzab_tests::is_root(),
        "network namespaces need root (CI runs as root)"
    );
    let namespaces = rzab_tests::Namespaces::create(3).expect("creating network namespaces");
    let cluster = rzab_tests::cluster_name("cut");
    rzab_tests::cleanup(&cluster, 3);
    let hosts = (0..3)
        .map(|node| namespaces.host(node))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = rzab_tests::three_node_args(&cluster);
    args.extend(
        [
            "--transport",
            "udp",
            "--udp-hosts",
            &hosts,
            "--knob",
            "peer_timeout_ms=300",
            "--duration",
            "30",
        ]
        .iter()
        .map(|arg| (*arg).to_owned()),
    );
    let processes: Vec<rzab_tests::NodeProcess> = (0..3u8)
        .map(|node| {
            let prefix: Vec<String> = ["ip", "netns", "exec", &namespaces.names[usize::from(node)]]
                .iter()
                .map(|arg| (*arg).to_owned())
                .collect();
            rzab_tests::NodeProcess::start_with_prefix(&prefix, node, &args)
        })
        .collect();
    let path = std::path::PathBuf::from(format!("/dev/shm/rzab-{cluster}-n2"));
    let state_of = |block: &rzab_shared::AttachedControlBlock| {
        SyncState::from_code(block.worker(0).gauges.sync_state.load(Ordering::Acquire))
    };
    let block = rzab_tests::attach_running(&path);
    rzab_tests::wait_serving_with_writes(&block, "node 2");
    namespaces.set_link(2, false);
    wait_until("node 2 reports electing with its link down", || {
        state_of(&block) == SyncState::Electing
    });
    // The data plane's reporting thread looks every 50 ms: give it time to log the state.
    std::thread::sleep(std::time::Duration::from_millis(500));
    namespaces.set_link(2, true);
    wait_until("node 2 serves again with its link back", || {
        // A node left behind rejoins as a new process with a new control block.
        let current = rzab_tests::attach_running(&path);
        state_of(&current) == SyncState::Serving
    });
    for process in &processes {
        process.terminate();
    }
    let outputs: Vec<rzab_tests::NodeOutput> = processes
        .into_iter()
        .map(rzab_tests::NodeProcess::finish)
        .collect();
    rzab_tests::cleanup(&cluster, 3);
    assert!(
        outputs[2].stdout.contains("pipeline 0: electing"),
        "node 2 did not log it:\n{}",
        outputs[2].stdout
    );
    for output in &outputs {
        assert!(
            output.success,
            "node {} failed:\n{}",
            output.node, output.stderr
        );
    }
    drop(namespaces);
}
