//! Leader failover with real processes (one pipeline per node, the default, with the default
//! election timeout): the leader killed (SIGKILL) under load on shm and on udp between network
//! namespaces, and restarted to rejoin as a follower; the leader stopped (SIGSTOP) until the
//! others elected another, then resumed (SIGCONT), when it must follow the new leader and drop
//! what it proposed alone; the leader's veth taken down and brought back; five leader kills in
//! a row, each old leader restarted; and five nodes losing their leader and a follower at
//! once. Every run records its history, which the checker must pass (epoch-aware: zxids of a
//! new epoch follow the old one's committed prefix, no committed zxid is skipped, every
//! completed write is applied once at its zxid), and the processes that end must end with
//! identical stores at the same zxid.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rzab_shared::{AttachedControlBlock, Counter};
use rzab_tests::{
    Namespaces, NodeOutput, NodeProcess, cleanup, cluster_name, history, history_args,
    wait_serving_with_writes,
};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

fn block_path(cluster: &str, node: u8) -> PathBuf {
    PathBuf::from(format!("/dev/shm/rzab-{cluster}-n{node}"))
}

/// A leader and its epoch.
type Leadership = (u32, u64);

/// The leader a node's pipeline follows, with its epoch (`None` while it elects).
fn leader_seen(block: &AttachedControlBlock) -> Option<Leadership> {
    let gauges = &block.worker(0).gauges;
    gauges.leader_node().map(|leader| {
        (
            leader,
            gauges.epoch.load(std::sync::atomic::Ordering::Relaxed),
        )
    })
}

/// Waits until every node in `blocks` takes the same leader other than `not`, in an epoch
/// above `above`, and returns it with the time it took.
fn wait_new_leader(
    blocks: &[&AttachedControlBlock],
    not: u8,
    above: u64,
) -> ((u32, u64), Duration) {
    new_leader_within(blocks, not, above)
        .unwrap_or_else(|seen| panic!("no new leader agreed on within 30 s: {seen:?}"))
}

/// [`wait_new_leader`], or what the nodes took for their leader after 30 s.
fn new_leader_within(
    blocks: &[&AttachedControlBlock],
    not: u8,
    above: u64,
) -> Result<(Leadership, Duration), Vec<Option<Leadership>>> {
    let began = Instant::now();
    let deadline = began + Duration::from_secs(30);
    loop {
        let seen: Vec<Option<(u32, u64)>> = blocks.iter().map(|block| leader_seen(block)).collect();
        if let Some(Some((leader, epoch))) = seen.first() {
            if *leader != u32::from(not)
                && *epoch > above
                && seen.iter().all(|other| *other == Some((*leader, *epoch)))
            {
                return Ok(((*leader, *epoch), began.elapsed()));
            }
        }
        if Instant::now() >= deadline {
            return Err(seen);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops every process and panics with `what` and their outputs.
fn fail_with_outputs(processes: &mut [Option<NodeProcess>], what: &str) -> ! {
    let outputs: Vec<String> = processes
        .iter_mut()
        .filter_map(Option::take)
        .map(|process| {
            process.terminate();
            let output = process.finish();
            format!("node {}:\n{}{}", output.node, output.stdout, output.stderr)
        })
        .collect();
    panic!("{what}:\n{}", outputs.join("\n"))
}

/// Whether every worker of the node serves and its sessions complete writes within `patience`.
fn serves_within(block: &AttachedControlBlock, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        let serving = (0..block.worker_count() as usize)
            .all(|worker| block.worker(worker).sync_state() == rzab_shared::SyncState::Serving);
        if serving && block.counter_total(Counter::WritesCompleted) > 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Waits until a node's sessions complete more writes than `before`.
fn wait_more_writes(block: &AttachedControlBlock, before: u64, node: &str) {
    rzab_tests::ops::wait_until(&format!("{node} completes writes again"), || {
        block.counter_total(Counter::WritesCompleted) > before
    });
}

/// A fresh cluster of `nodes` recording into a new history directory, with the shared test
/// arguments and `extra`.
fn recorded(label: &str, nodes: u8, extra: &[String]) -> (String, tempfile::TempDir, Vec<String>) {
    let cluster = cluster_name(label);
    cleanup(&cluster, nodes);
    let history = tempfile::tempdir().unwrap();
    let mut args = rzab_tests::three_node_args(&cluster);
    let position = args.iter().position(|arg| arg == "--nodes").unwrap();
    args[position + 1] = nodes.to_string();
    args.extend(history_args(history.path()));
    args.extend(extra.iter().cloned());
    (cluster, history, args)
}

/// Asks every process still held to stop (SIGTERM) and collects their outputs.
fn stop_all(processes: Vec<Option<NodeProcess>>) -> Vec<NodeOutput> {
    for process in processes.iter().flatten() {
        process.terminate();
    }
    processes
        .into_iter()
        .flatten()
        .map(NodeProcess::finish)
        .collect()
}

/// Starts `nodes` processes (behind their command prefixes), attaches to their control
/// blocks and waits until each serves and completes writes.
fn start_serving(
    cluster: &str,
    nodes: u8,
    prefixes: &[Vec<String>],
    args: &[String],
) -> (Vec<Option<NodeProcess>>, Vec<AttachedControlBlock>) {
    let processes: Vec<Option<NodeProcess>> = (0..nodes)
        .map(|node| {
            let prefix = prefixes.get(usize::from(node)).cloned().unwrap_or_default();
            Some(NodeProcess::start_with_prefix(&prefix, node, args))
        })
        .collect();
    let blocks: Vec<AttachedControlBlock> = (0..nodes)
        .map(|node| rzab_tests::attach_running(&block_path(cluster, node)))
        .collect();
    for (node, block) in blocks.iter().enumerate() {
        wait_serving_with_writes(block, &format!("node {node}"));
    }
    (processes, blocks)
}

/// Every process that ended did so cleanly at the same applied zxid with the same store, and
/// those that ran from the start to the end applied the same sequence.
fn assert_converged(outputs: &[NodeOutput], from_start: &[u8]) {
    for output in outputs {
        assert!(
            output.success,
            "node {} failed:\n{}\n{}",
            output.node, output.stdout, output.stderr
        );
    }
    let summary = |output: &NodeOutput| output.summary.clone().unwrap();
    let first = summary(&outputs[0]);
    for output in outputs {
        let this = summary(output);
        assert_eq!(
            this["applied_zxid"], first["applied_zxid"],
            "node {} ended at another zxid",
            output.node
        );
        assert_eq!(
            this["store_digest"], first["store_digest"],
            "node {}'s store differs",
            output.node
        );
    }
    let digests: Vec<&serde_json::Value> = outputs
        .iter()
        .filter(|output| from_start.contains(&output.node))
        .map(|output| &output.summary.as_ref().unwrap()["digest"])
        .collect();
    assert!(
        digests.windows(2).all(|pair| pair[0] == pair[1]),
        "the nodes that ran throughout applied different sequences: {digests:?}"
    );
}

/// Checks the run's history: clean, with `processes` processes of which `crashed` were
/// killed, reaching the zxid the nodes ended at.
fn check(
    label: &str,
    history: &std::path::Path,
    outputs: &[NodeOutput],
    processes: usize,
    crashed: usize,
) -> history::Report {
    let report =
        history::check_dirs(&[history.to_owned()], &history::CheckOptions::default()).unwrap();
    eprintln!("{label}: {report}");
    assert!(report.is_clean(), "{label}: {report}");
    assert_eq!(report.processes, processes, "{label}: {report}");
    assert_eq!(report.crashed().len(), crashed, "{label}: {report}");
    assert!(report.writes_completed > 0, "{label}: {report}");
    let applied = outputs[0].summary.as_ref().unwrap()["applied_zxid"]
        .as_u64()
        .unwrap();
    assert_eq!(
        report.zxids.map(|(_, last)| last),
        Some(applied),
        "{label}: the history must reach the zxid the nodes ended at"
    );
    assert!(
        applied >> 32 >= 2,
        "{label}: the run ended in epoch {}, not a later one",
        applied >> 32
    );
    report
}

/// Kills the leader (node 0) of a 3-node cluster under load, waits for the others to elect
/// one of them and commit again, restarts node 0 (which must find the new leader and catch
/// up as its follower), and checks that nothing was lost.
fn leader_killed(label: &str, prefixes: &[Vec<String>], extra: &[String]) {
    let _serial = rzab_tests::serial();
    let (cluster, history, args) = recorded(label, 3, extra);
    let (mut processes, blocks) = start_serving(&cluster, 3, prefixes, &args);
    std::thread::sleep(Duration::from_millis(1000));
    let old_instance = rzab_tests::instance_of(&blocks[0]);
    let writes = [1, 2].map(|node| blocks[node].counter_total(Counter::WritesCompleted));
    processes[0].take().unwrap().crash();
    let ((leader, epoch), took) = wait_new_leader(&[&blocks[1], &blocks[2]], 0, 1);
    eprintln!("{label}: node {leader} leads epoch {epoch} {took:?} after the kill");
    for node in [1, 2] {
        wait_more_writes(&blocks[node], writes[node - 1], &format!("node {node}"));
    }
    let elections = blocks[1].counter_total(Counter::ElectionsStarted);
    assert!(elections >= 1, "node 1 counted no election");

    processes[0] = Some(NodeProcess::start_with_prefix(&prefixes[0], 0, &args));
    let restarted =
        rzab_tests::attach_running_instance(&block_path(&cluster, 0), Some(old_instance));
    wait_serving_with_writes(&restarted, "the restarted node 0");
    assert_eq!(
        leader_seen(&restarted),
        Some((leader, epoch)),
        "the restarted node 0 follows another leader"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let outputs = stop_all(processes);
    drop((blocks, restarted));
    cleanup(&cluster, 3);
    assert_converged(&outputs, &[1, 2]);
    let report = check(label, history.path(), &outputs, 4, 1);
    assert_eq!(report.processes_of(0).len(), 2, "{report}");
    assert!(report.processes_of(0)[0].crashed, "{report}");
}

#[test]
fn the_leader_killed_under_load_on_shm_is_replaced_and_rejoins_as_a_follower() {
    leader_killed("fkshm", &[vec![], vec![], vec![]], &[]);
}

/// The namespaces' udp variants run only as root (creating namespaces needs it).
fn namespaced(count: usize) -> Option<(Namespaces, Vec<Vec<String>>, Vec<String>)> {
    if !rzab_tests::is_root() {
        eprintln!("skipped: creating network namespaces needs root");
        return None;
    }
    let namespaces =
        Namespaces::create(count).expect("creating network namespaces with `ip` failed");
    let hosts = (0..count)
        .map(|node| namespaces.host(node))
        .collect::<Vec<_>>()
        .join(",");
    let prefixes = namespaces
        .names
        .iter()
        .map(|name| strings(&["ip", "netns", "exec", name]))
        .collect();
    let extra = strings(&["--transport", "udp", "--udp-hosts", &hosts]);
    Some((namespaces, prefixes, extra))
}

#[test]
fn the_leader_killed_under_load_on_udp_between_namespaces_is_replaced() {
    let Some((namespaces, prefixes, extra)) = namespaced(3) else {
        return;
    };
    leader_killed("fkns", &prefixes, &extra);
    drop(namespaces);
}

/// Cuts the leader off (SIGSTOP, or its veth taken down) until the others elected another and
/// commit again, then lets it back: it must give up leading, follow the new leader and end
/// identical to the others, in the same process.
fn leader_cut_off(label: &str, cut: impl Fn(bool), prefixes: &[Vec<String>], extra: &[String]) {
    let (cluster, history, args) = recorded(label, 3, extra);
    let (processes, blocks) = start_serving(&cluster, 3, prefixes, &args);
    std::thread::sleep(Duration::from_millis(1000));
    let writes = blocks[1].counter_total(Counter::WritesCompleted);
    cut(true);
    let ((leader, epoch), took) = wait_new_leader(&[&blocks[1], &blocks[2]], 0, 1);
    eprintln!("{label}: node {leader} leads epoch {epoch} {took:?} after the cut");
    wait_more_writes(&blocks[1], writes, "node 1");
    std::thread::sleep(Duration::from_millis(500));
    cut(false);
    let ((back, back_epoch), took) = wait_new_leader(&[&blocks[0], &blocks[1], &blocks[2]], 3, 1);
    eprintln!(
        "{label}: node 0 follows node {back} in epoch {back_epoch} {took:?} after it came back"
    );
    assert_ne!(back, 0, "the cut-off leader leads again");
    wait_serving_with_writes(&blocks[0], "node 0, back");
    let before = blocks[0].counter_total(Counter::WritesCompleted);
    wait_more_writes(&blocks[0], before, "node 0, back");
    std::thread::sleep(Duration::from_millis(500));
    let outputs = stop_all(processes);
    drop(blocks);
    cleanup(&cluster, 3);
    assert_converged(&outputs, &[1, 2]);
    check(label, history.path(), &outputs, 3, 0);
}

#[test]
fn a_stopped_leader_resumes_as_a_follower_of_the_new_leader() {
    let _serial = rzab_tests::serial();
    let stopped = std::sync::Mutex::new(None::<u32>);
    let cluster = cluster_name("fstop");
    // The pid is only known once node 0 runs: read it from its control block.
    let cut = |on: bool| {
        let mut pid = stopped.lock().unwrap();
        let owner = *pid.get_or_insert_with(|| {
            let block = rzab_tests::attach_running(&block_path(&cluster, 0));
            block
                .header
                .owner_pid
                .load(std::sync::atomic::Ordering::Relaxed)
        });
        let signal = if on { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &owner.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {owner} failed");
    };
    leader_cut_off("fstop", cut, &[vec![], vec![], vec![]], &[]);
}

#[test]
fn a_leader_whose_link_went_down_comes_back_as_a_follower() {
    let _serial = rzab_tests::serial();
    let Some((namespaces, prefixes, extra)) = namespaced(3) else {
        return;
    };
    leader_cut_off("flink", |on| namespaces.set_link(0, !on), &prefixes, &extra);
    drop(namespaces);
}

/// Runs `nodes` nodes, kills `kills` times the leader (and `followers_too` more nodes with
/// it), each time waiting for the survivors to elect a new leader and commit again before
/// restarting the killed processes, and checks the history of it all.
fn kills_in_a_row(label: &str, nodes: u8, kills: usize, followers_too: u8) {
    let _serial = rzab_tests::serial();
    let (cluster, history, args) = recorded(label, nodes, &[]);
    let (mut processes, mut blocks) = start_serving(&cluster, nodes, &[], &args);
    let (mut leader, mut epoch) = (0u8, 1u64);
    let mut ever_killed: Vec<u8> = Vec::new();
    for kill in 0..kills {
        std::thread::sleep(Duration::from_millis(500));
        let victims: Vec<u8> = (0..=followers_too)
            .map(|offset| (leader + offset) % nodes)
            .collect();
        let others: Vec<u8> = (0..nodes).filter(|node| !victims.contains(node)).collect();
        let instances: Vec<u64> = victims
            .iter()
            .map(|victim| rzab_tests::instance_of(&blocks[usize::from(*victim)]))
            .collect();
        let writes: Vec<u64> = others
            .iter()
            .map(|node| blocks[usize::from(*node)].counter_total(Counter::WritesCompleted))
            .collect();
        for victim in &victims {
            processes[usize::from(*victim)].take().unwrap().crash();
        }
        ever_killed.extend(&victims);
        let survivors: Vec<&AttachedControlBlock> = others
            .iter()
            .map(|node| &blocks[usize::from(*node)])
            .collect();
        let ((next, next_epoch), took) = match new_leader_within(&survivors, leader, epoch) {
            Ok(found) => found,
            Err(seen) => {
                drop(survivors);
                fail_with_outputs(
                    &mut processes,
                    &format!("{label}, kill {kill}: no new leader within 30 s: {seen:?}"),
                )
            }
        };
        eprintln!(
            "{label}, kill {kill}: node {next} leads epoch {next_epoch} {took:?} after {victims:?} were killed"
        );
        for (node, before) in others.iter().zip(&writes) {
            wait_more_writes(
                &blocks[usize::from(*node)],
                *before,
                &format!("node {node}"),
            );
        }
        for (victim, instance) in victims.iter().zip(instances) {
            processes[usize::from(*victim)] = Some(NodeProcess::start(*victim, &args));
            blocks[usize::from(*victim)] =
                rzab_tests::attach_running_instance(&block_path(&cluster, *victim), Some(instance));
        }
        for victim in &victims {
            let block = &blocks[usize::from(*victim)];
            if !serves_within(block, Duration::from_secs(30)) {
                fail_with_outputs(
                    &mut processes,
                    &format!("{label}, kill {kill}: the restarted node {victim} does not serve"),
                );
            }
        }
        leader = u8::try_from(next).unwrap();
        epoch = next_epoch;
    }
    std::thread::sleep(Duration::from_millis(500));
    let outputs = stop_all(processes);
    drop(blocks);
    cleanup(&cluster, nodes);
    let throughout: Vec<u8> = (0..nodes)
        .filter(|node| !ever_killed.contains(node))
        .collect();
    assert_converged(&outputs, &throughout);
    let crashed = kills * usize::from(followers_too + 1);
    check(
        label,
        history.path(),
        &outputs,
        usize::from(nodes) + crashed,
        crashed,
    );
}

#[test]
fn five_leader_kills_in_a_row_each_old_leader_restarted() {
    kills_in_a_row("f5kill", 3, 5, 0);
}

#[test]
fn five_nodes_lose_their_leader_and_a_follower_at_once() {
    kills_in_a_row("f5node", 5, 1, 1);
}
