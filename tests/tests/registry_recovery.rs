//! Recovery through the control plane, with real processes and a real memcached: memcached
//! is restarted in the middle of a run (the data planes keep committing), then a follower's
//! data plane is killed and restarted as a new process that re-registers through its control
//! plane, whose peers re-point the leader at it; it catches up by snapshot, every store ends
//! identical, and the recorded history of the whole run passes the checker.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; ports are small"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rzab_shared::AttachedControlBlock;
use rzab_tests::ops::{free_port, listening, wait_until};
use rzab_tests::{
    NodeOutput, NodeProcess, assert_caught_up, check_history, cleanup, cluster_name, history_args,
    wait_serving_with_writes,
};

/// A child process killed when dropped.
struct Guard(Option<Child>);

impl Guard {
    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn memcached(port: u16) -> Guard {
    let child = Command::new("memcached")
        .args([
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-u",
            "root",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("memcached must be installed (scripts/test.sh installs it)");
    wait_until("memcached accepts connections", || {
        listening(SocketAddr::from(([127, 0, 0, 1], port)))
    });
    Guard(Some(child))
}

fn controlplane(
    binary: &PathBuf,
    cluster: &str,
    node: u8,
    registry: u16,
    generation: &str,
) -> Guard {
    let child = Command::new(binary)
        .args([
            "--cluster",
            cluster,
            "--node",
            &node.to_string(),
            "--registry",
            &format!("127.0.0.1:{registry}"),
            "--generation",
            generation,
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Guard(Some(child))
}

/// Samples the committed zxid for `span` and returns the longest time it stood still.
fn longest_stall(block: &AttachedControlBlock, span: Duration) -> Duration {
    let end = Instant::now() + span;
    let mut last = rzab_tests::applied_zxid(block);
    let mut since = Instant::now();
    let mut longest = Duration::ZERO;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
        let now = rzab_tests::applied_zxid(block);
        if now == last {
            longest = longest.max(since.elapsed());
        } else {
            last = now;
            since = Instant::now();
        }
    }
    longest
}

#[test]
fn memcached_restart_and_a_follower_rejoining_through_the_control_plane() {
    let cluster = cluster_name("reg");
    cleanup(&cluster, 3);
    let binary = rzab_tests::binary("rzab-controlplane");
    let registry_port = free_port();
    let generation = format!("{}", std::process::id());
    let mut registry = memcached(registry_port);
    let _control_planes: Vec<Guard> = (0..3)
        .map(|node| controlplane(&binary, &cluster, node, registry_port, &generation))
        .collect();
    let history = tempfile::tempdir().unwrap();
    let mut args = rzab_tests::three_node_args(&cluster);
    args.extend(["--workers", "2", "--peers", "control-plane"].map(str::to_owned));
    args.extend(history_args(history.path()));
    let mut nodes: Vec<NodeProcess> = (0..3).map(|node| NodeProcess::start(node, &args)).collect();
    let leader = rzab_tests::attach_running(&PathBuf::from(format!("/dev/shm/rzab-{cluster}-n0")));
    std::thread::sleep(Duration::from_millis(500));

    // memcached goes away and comes back: the data planes never notice.
    registry.kill();
    let stall = longest_stall(&leader, Duration::from_millis(1500));
    assert!(
        stall < Duration::from_secs(1),
        "committing stood still {stall:?} without memcached"
    );
    registry = memcached(registry_port);
    let stall = longest_stall(&leader, Duration::from_millis(1500));
    assert!(
        stall < Duration::from_secs(1),
        "committing stood still {stall:?} after memcached came back"
    );

    // Follower 2 dies; the leader keeps committing at a quorum.
    nodes.pop().unwrap().crash();
    let old_instance = rzab_tests::instance_of(&rzab_tests::attach_running(&PathBuf::from(
        format!("/dev/shm/rzab-{cluster}-n2"),
    )));
    let stall = longest_stall(&leader, Duration::from_millis(1500));
    assert!(
        stall < Duration::from_secs(1),
        "committing stood still {stall:?} with a follower dead"
    );

    // A new process of node 2 re-registers through its control plane and catches up.
    nodes.push(NodeProcess::start(2, &args));
    let restarted = rzab_tests::attach_running_instance(
        &PathBuf::from(format!("/dev/shm/rzab-{cluster}-n2")),
        Some(old_instance),
    );
    wait_serving_with_writes(&restarted, "the rejoined node");
    let stall = longest_stall(&leader, Duration::from_millis(1500));
    assert!(
        stall < Duration::from_secs(1),
        "committing stood still {stall:?} after the rejoin"
    );

    for node in &nodes {
        node.terminate();
    }
    let outputs: Vec<NodeOutput> = nodes.into_iter().map(NodeProcess::finish).collect();
    drop((leader, restarted, registry));
    cleanup(&cluster, 3);
    assert_caught_up(&outputs);

    // The whole run, across the registry outage, the crash and the rejoin, passes the checker;
    // the killed process left files without trailers and its successor wrote new ones.
    let report = check_history("registry recovery", history.path(), &outputs);
    assert_eq!(report.processes, 4, "{report}");
    let node2 = report.processes_of(2);
    assert_eq!(node2.len(), 2, "{report}");
    assert_eq!(report.crashed(), [node2[0].process], "{report}");
    assert!(
        node2[1].applies > 0 && node2[1].writes_completed > 0,
        "{report}"
    );
}
