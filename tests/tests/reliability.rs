//! Reliability with real processes: 1% and 10% injected loss (with duplication and
//! reordering) on shm and on udp; a follower killed and restarted under load on shm, on udp
//! over loopback and on udp between network namespaces; and a follower stopped (SIGSTOP) until
//! the leader has left it behind, which must rejoin by itself as a new process. Every run must
//! end with identical
//! replicas (the restarted follower's store equal to the leader's), retransmissions and
//! catch-up must show in the counters, and the leader's committed zxid must never stand still
//! for longer than a second while clients are running. Every node records its history
//! (`--history-dir`, a temporary directory per run, the restarted follower's new process
//! writing new files next to the killed one's), and the consistency checker must find no
//! violation in it: the killed process's files have no trailer and are checked as a crashed
//! process's, every other process ends cleanly.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; port arithmetic is small"
)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rzab_shared::{AttachedControlBlock, Counter};
use rzab_tests::{
    Namespaces, NodeOutput, NodeProcess, assert_caught_up, assert_identical_replicas,
    check_history, cleanup, cluster_name, history_args, wait_serving_with_writes,
};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

/// UDP ports of one test: each test gets its own `slot` (0..3) so that tests of this process
/// never share a port, and each process its own 32 ports.
fn udp_args(slot: u16) -> Vec<String> {
    let base = 30_000 + (std::process::id() % 1_000) as u16 * 32 + slot * 10;
    vec![
        "--transport".into(),
        "udp".into(),
        "--udp-port-base".into(),
        base.to_string(),
        "--multicast-port".into(),
        (base + 9).to_string(),
    ]
}

/// Watches the leader's committed zxid while armed and reports the longest time it stood
/// still, with the counters read at the end.
struct ProgressWatch {
    armed: Arc<AtomicBool>,
    thread: JoinHandle<(Duration, AttachedControlBlock)>,
}

impl ProgressWatch {
    fn start(leader_block: PathBuf) -> ProgressWatch {
        let block = rzab_tests::attach_running(&leader_block);
        let armed = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&armed);
        let thread = std::thread::spawn(move || {
            let mut longest = Duration::ZERO;
            let mut last = rzab_tests::applied_zxid(&block);
            let mut since = Instant::now();
            while flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                let now = rzab_tests::applied_zxid(&block);
                if now != last {
                    last = now;
                    since = Instant::now();
                } else {
                    longest = longest.max(since.elapsed());
                }
            }
            (longest, block)
        });
        ProgressWatch { armed, thread }
    }

    fn stop(self) -> (Duration, AttachedControlBlock) {
        self.armed.store(false, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn assert_no_long_stall(longest: Duration) {
    assert!(
        longest < Duration::from_secs(1),
        "the leader committed nothing for {longest:?}"
    );
}

/// A fresh 3-node cluster name (leftovers of an earlier run removed), a history directory, and
/// the nodes' arguments, which record into it.
fn recorded_cluster(label: &str) -> (String, tempfile::TempDir, Vec<String>) {
    let cluster = cluster_name(label);
    cleanup(&cluster, 3);
    let history = tempfile::tempdir().unwrap();
    let mut args = rzab_tests::three_node_args(&cluster);
    args.extend(history_args(history.path()));
    (cluster, history, args)
}

/// Runs three nodes for a few seconds with injected faults on every node's sends.
fn lossy_run(label: &str, transport: &[String], loss: &str, duplicate: &str, reorder: &str) {
    let _serial = rzab_tests::serial();
    let (cluster, history, mut args) = recorded_cluster(label);
    args.extend(transport.iter().cloned());
    args.extend(strings(&[
        "--duration",
        "4",
        "--inject-loss",
        loss,
        "--inject-duplicate",
        duplicate,
        "--inject-reorder",
        reorder,
    ]));
    let processes: Vec<NodeProcess> = (0..3).map(|node| NodeProcess::start(node, &args)).collect();
    let watch = ProgressWatch::start(PathBuf::from(format!("/dev/shm/rzab-{cluster}-n0")));
    std::thread::sleep(Duration::from_secs(3));
    let (longest, leader) = watch.stop();
    let outputs: Vec<NodeOutput> = processes.into_iter().map(NodeProcess::finish).collect();
    let retransmitted = leader.counter_total(Counter::RetransmitPrepare)
        + leader.counter_total(Counter::RetransmitCommit);
    drop(leader);
    cleanup(&cluster, 3);
    assert_identical_replicas(&outputs);
    assert!(retransmitted > 0, "no retransmissions at {loss}% loss");
    assert_no_long_stall(longest);

    let report = check_history(label, history.path(), &outputs);
    assert_eq!(report.processes, 3, "{report}");
    assert!(
        report.crashed().is_empty(),
        "every node ends cleanly, with its trailers:\n{report}"
    );
}

#[test]
fn one_percent_loss_on_shm() {
    lossy_run("l1shm", &[], "1", "1", "1");
}

#[test]
fn ten_percent_loss_on_shm() {
    lossy_run("l10shm", &[], "10", "2", "2");
}

#[test]
fn one_percent_loss_on_udp() {
    lossy_run("l1udp", &udp_args(0), "1", "1", "1");
}

#[test]
fn ten_percent_loss_on_udp() {
    lossy_run("l10udp", &udp_args(1), "10", "2", "2");
}

/// Kills follower 2 under load, restarts it as a new process, and checks it caught up.
fn follower_restart(label: &str, prefixes: &[Vec<String>], extra: &[String]) {
    let _serial = rzab_tests::serial();
    let (cluster, history, mut args) = recorded_cluster(label);
    args.extend(extra.iter().cloned());
    let mut processes: Vec<NodeProcess> = (0..3u8)
        .map(|node| NodeProcess::start_with_prefix(&prefixes[usize::from(node)], node, &args))
        .collect();
    let watch = ProgressWatch::start(PathBuf::from(format!("/dev/shm/rzab-{cluster}-n0")));
    std::thread::sleep(Duration::from_millis(1500));
    processes.pop().unwrap().crash();
    let old_instance = rzab_tests::instance_of(&rzab_tests::attach_running(&PathBuf::from(
        format!("/dev/shm/rzab-{cluster}-n2"),
    )));
    // With the follower dead, the leader keeps committing at a quorum.
    std::thread::sleep(Duration::from_millis(1500));
    processes.push(NodeProcess::start_with_prefix(&prefixes[2], 2, &args));
    let restarted = rzab_tests::attach_running_instance(
        &PathBuf::from(format!("/dev/shm/rzab-{cluster}-n2")),
        Some(old_instance),
    );
    wait_serving_with_writes(&restarted, "the restarted follower");
    // Committing goes on after the rejoin, which the watch keeps measuring for a while.
    std::thread::sleep(Duration::from_millis(1500));
    let (longest, leader) = watch.stop();
    for process in &processes {
        process.terminate();
    }
    let outputs: Vec<NodeOutput> = processes.into_iter().map(NodeProcess::finish).collect();
    let installed = restarted.counter_total(Counter::CatchupEntriesReceived);
    let sent = leader.counter_total(Counter::CatchupEntriesSent);
    drop((leader, restarted));
    cleanup(&cluster, 3);
    assert_caught_up(&outputs);
    assert!(
        installed >= 50_000 && sent >= 50_000,
        "snapshot: sent {sent}, installed {installed}"
    );
    assert_no_long_stall(longest);

    // The killed process left files without trailers; its restart wrote new ones.
    let report = check_history(label, history.path(), &outputs);
    assert_eq!(report.processes, 4, "{report}");
    let node2 = report.processes_of(2);
    assert_eq!(node2.len(), 2, "{report}");
    let (killed, restarted) = (node2[0], node2[1]);
    assert_eq!(report.crashed(), [killed.process], "{report}");
    assert!(
        restarted.records > 0 && restarted.applies > 0 && restarted.writes_completed > 0,
        "the restarted node recorded nothing:\n{report}"
    );
    assert_eq!(
        restarted.zxids.map(|(_, last)| last),
        report.zxids.map(|(_, last)| last),
        "{report}"
    );
}

#[test]
fn follower_killed_and_restarted_on_shm() {
    follower_restart(
        "rshm",
        &[vec![], vec![], vec![]],
        &strings(&["--workers", "2"]),
    );
}

#[test]
fn follower_killed_and_restarted_on_udp() {
    follower_restart("rudp", &[vec![], vec![], vec![]], &udp_args(2));
}

#[test]
fn follower_killed_and_restarted_on_udp_between_namespaces() {
    if !rzab_tests::is_root() {
        eprintln!("skipped: creating network namespaces needs root");
        return;
    }
    let namespaces = Namespaces::create(3).expect("creating network namespaces with `ip` failed");
    let hosts = (0..3)
        .map(|node| namespaces.host(node))
        .collect::<Vec<_>>()
        .join(",");
    let prefixes: Vec<Vec<String>> = namespaces
        .names
        .iter()
        .map(|name| strings(&["ip", "netns", "exec", name]))
        .collect();
    let mut extra = strings(&["--transport", "udp", "--udp-hosts", &hosts]);
    extra.extend(strings(&["--inject-loss", "0.5"]));
    follower_restart("rns", &prefixes, &extra);
    drop(namespaces);
}

#[test]
fn a_stopped_follower_that_fell_behind_rejoins_as_a_new_process() {
    let _serial = rzab_tests::serial();
    let (cluster, history, mut args) = recorded_cluster("behind");
    // Mostly writes and a committed-transaction ring of a few MiB (about 64k prepares), so
    // that the ring runs out while node 2 is stopped.
    args.extend(strings(&[
        "--write-ratio",
        "800",
        "--committed-ring-bytes",
        "4194304",
    ]));
    let processes: Vec<NodeProcess> = (0..3u8)
        .map(|node| NodeProcess::start(node, &args))
        .collect();
    let block_of = |node: u8| PathBuf::from(format!("/dev/shm/rzab-{cluster}-n{node}"));
    let leader = rzab_tests::attach_running(&block_of(0));
    let old_instance = rzab_tests::instance_of(&rzab_tests::attach_running(&block_of(2)));
    std::thread::sleep(Duration::from_millis(500));

    // Stopped for far longer than the leader waits for a silent follower (100 ms): the leader
    // leaves it behind and keeps committing; once resumed it finds the prepares it lacks gone.
    processes[2].signal("STOP");
    let stopped_at = rzab_tests::applied_zxid(&leader);
    let deadline = Instant::now() + Duration::from_secs(60);
    while rzab_tests::applied_zxid(&leader) < stopped_at + 200_000 {
        assert!(
            Instant::now() < deadline,
            "the leader stopped committing without node 2"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    processes[2].signal("CONT");

    // The same pid comes back as a new instance, catches up by snapshot and serves again.
    let rejoined = rzab_tests::attach_running_instance(&block_of(2), Some(old_instance));
    wait_serving_with_writes(&rejoined, "the rejoined node 2");
    let installed = rejoined.counter_total(Counter::CatchupEntriesReceived);
    drop((leader, rejoined));
    for process in &processes {
        process.terminate();
    }
    let outputs: Vec<NodeOutput> = processes.into_iter().map(NodeProcess::finish).collect();
    cleanup(&cluster, 3);
    assert!(
        outputs[2]
            .stdout
            .contains("fell behind the leader: starting again"),
        "{}",
        outputs[2].stdout
    );
    assert!(installed > 0, "the rejoined process installed no snapshot");
    assert_caught_up(&outputs);

    // The left-behind process ended cleanly (its files have trailers) before its successor.
    let report = check_history("behind", history.path(), &outputs);
    assert_eq!(report.processes, 4, "{report}");
    assert_eq!(report.processes_of(2).len(), 2, "{report}");
    assert!(report.crashed().is_empty(), "{report}");
}

/// A follower stopped (SIGSTOP) for 2 s under a full write load, with the default
/// committed-transaction ring, comes back by DIFF: the leader repeats the prepares it missed
/// from the ring, with no restart and no snapshot, and it ends identical to the others.
#[test]
fn a_follower_stopped_for_two_seconds_under_full_write_load_comes_back_by_diff() {
    let _serial = rzab_tests::serial();
    let (cluster, history, mut args) = recorded_cluster("diff");
    args.extend(strings(&["--write-ratio", "1000", "--duration", "8"]));
    let processes: Vec<NodeProcess> = (0..3u8)
        .map(|node| NodeProcess::start(node, &args))
        .collect();
    let block_of = |node: u8| PathBuf::from(format!("/dev/shm/rzab-{cluster}-n{node}"));
    let leader = rzab_tests::attach_running(&block_of(0));
    let follower = rzab_tests::attach_running(&block_of(2));
    wait_serving_with_writes(&follower, "node 2");
    let instance = rzab_tests::instance_of(&follower);
    processes[2].signal("STOP");
    let stopped_at = rzab_tests::applied_zxid(&leader);
    std::thread::sleep(Duration::from_secs(2));
    let missed = rzab_tests::applied_zxid(&leader) - stopped_at;
    let repeated_before = leader.counter_total(Counter::RetransmitPrepare);
    processes[2].signal("CONT");
    let outputs: Vec<NodeOutput> = processes.into_iter().map(NodeProcess::finish).collect();
    cleanup(&cluster, 3);
    assert!(
        missed > 50_000,
        "the leader committed only {missed} writes while node 2 was stopped: not a full load"
    );
    assert_eq!(
        rzab_tests::instance_of(&follower),
        instance,
        "node 2 restarted instead of coming back by DIFF"
    );
    assert!(
        !outputs[2].stdout.contains("fell behind"),
        "{}",
        outputs[2].stdout
    );
    assert_eq!(
        follower.counter_total(Counter::CatchupEntriesReceived),
        0,
        "node 2 was sent a snapshot"
    );
    assert!(
        leader.counter_total(Counter::RetransmitPrepare) > repeated_before,
        "the leader repeated nothing to node 2"
    );
    // All writes, so no reads for `assert_identical_replicas` to require.
    for output in &outputs {
        assert!(
            output.success,
            "node {} failed:\n{}",
            output.node, output.stderr
        );
        let summary = output.summary.as_ref().unwrap();
        let leader = outputs[0].summary.as_ref().unwrap();
        for field in ["applied_zxid", "digest", "store_digest"] {
            assert_eq!(
                summary[field], leader[field],
                "node {}'s {field}",
                output.node
            );
        }
    }
    // `check_history` wants reads too; a write-only run is checked directly.
    let report = rzab_tests::history::check_dirs(
        &[history.path().to_owned()],
        &rzab_tests::history::CheckOptions::default(),
    )
    .unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.processes, 3, "{report}");
    assert!(report.crashed().is_empty(), "{report}");
    assert!(report.writes_completed > 0, "{report}");
}
