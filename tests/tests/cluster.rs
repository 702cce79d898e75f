//! Real multi-process clusters: three `rzab-dataplane` processes replicate over the shm fabric
//! and over UDP on loopback, the multicast knob flips live in both directions without losing or
//! duplicating anything, and inconsistent configurations are refused with a clear error.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use rzab_shared::{AttachedControlBlock, Counter, Knob};
use rzab_tests::ops::wait_until;
use rzab_tests::{
    Namespaces, NodeProcess, assert_identical_replicas, attach_running, cleanup, cluster_name,
    run_cluster, workers_applied,
};

fn common(cluster: &str, seconds: u64) -> Vec<String> {
    let mut args = rzab_tests::three_node_args(cluster);
    args.extend(["--duration".to_owned(), seconds.to_string()]);
    args
}

#[test]
fn three_node_shm_cluster_replicates_identically() {
    let cluster = cluster_name("shm");
    cleanup(&cluster, 3);
    let mut args = common(&cluster, 3);
    args.extend(["--workers".into(), "2".into()]);
    let outputs = run_cluster(3, &args);
    cleanup(&cluster, 3);
    assert_identical_replicas(&outputs);
    assert!(
        outputs[0].stdout.contains("ops/s"),
        "the stats line is missing:\n{}",
        outputs[0].stdout
    );
}

#[test]
fn three_node_udp_cluster_replicates_identically() {
    let cluster = cluster_name("udp");
    cleanup(&cluster, 3);
    let base = 20_000 + (std::process::id() % 1_000) as u16 * 10;
    let mut args = common(&cluster, 3);
    args.extend([
        "--transport".into(),
        "udp".into(),
        "--udp-port-base".into(),
        base.to_string(),
        "--multicast-port".into(),
        (base + 9).to_string(),
    ]);
    let outputs = run_cluster(3, &args);
    cleanup(&cluster, 3);
    assert_identical_replicas(&outputs);
}

fn prepares(block: &AttachedControlBlock) -> (u64, u64) {
    (
        block.counter_total(Counter::SentPrepareMulticast),
        block.counter_total(Counter::SentPrepareUnicast),
    )
}

/// Changes the multicast knob and waits until every leader worker has applied it: from then on
/// every PREPARE broadcast goes by the new path.
fn set_multicast(leader: &AttachedControlBlock, multicast: bool) {
    leader
        .set_knobs(&[(Knob::Multicast, u64::from(multicast))])
        .unwrap();
    let epoch = leader.knob_epoch();
    wait_until(
        &format!("the leader's workers apply multicast={multicast}"),
        || workers_applied(leader, epoch),
    );
}

/// Waits until the PREPAREs sent by the path that is on have grown by `growth`, then checks that
/// the other path sent none meanwhile.
fn only_path_grows(leader: &AttachedControlBlock, multicast: bool, growth: u64) {
    let (multicast_from, unicast_from) = prepares(leader);
    let path = if multicast { "multicast" } else { "unicast" };
    wait_until(&format!("{growth} more {path} prepares"), || {
        let (multicast_now, unicast_now) = prepares(leader);
        if multicast {
            multicast_now >= multicast_from + growth
        } else {
            unicast_now >= unicast_from + growth
        }
    });
    let (multicast_to, unicast_to) = prepares(leader);
    if multicast {
        assert_eq!(unicast_to, unicast_from, "unicast prepares must stop");
    } else {
        assert_eq!(multicast_to, multicast_from, "multicast prepares must stop");
    }
}

#[test]
fn multicast_flips_live_both_ways_without_loss() {
    let cluster = cluster_name("flip");
    cleanup(&cluster, 3);
    // The nodes run until stopped, so a slow machine cannot end the run between two steps.
    let args = common(&cluster, 0);
    let processes: Vec<NodeProcess> = (0..3).map(|node| NodeProcess::start(node, &args)).collect();
    let leader = attach_running(&PathBuf::from(format!("/dev/shm/rzab-{cluster}-n0")));
    only_path_grows(&leader, true, 1_000);
    assert_eq!(prepares(&leader).1, 0, "multicast is the default path");

    set_multicast(&leader, false);
    only_path_grows(&leader, false, 1_000);
    set_multicast(&leader, true);
    only_path_grows(&leader, true, 1_000);
    assert!(leader.header.dataplane_heartbeat_ns.load(Ordering::Relaxed) > 0);

    for process in &processes {
        process.terminate();
    }
    let outputs: Vec<_> = processes.into_iter().map(NodeProcess::finish).collect();
    cleanup(&cluster, 3);
    assert_identical_replicas(&outputs);
}

#[test]
fn incompatible_configurations_are_refused_clearly() {
    let cluster = cluster_name("bad");
    cleanup(&cluster, 2);
    let mut leader_args = common(&cluster, 30);
    leader_args.extend(["--join-timeout".into(), "20".into()]);
    leader_args[3] = "2".into();
    let mut follower_args = leader_args.clone();
    follower_args.extend(["--keys".into(), "40000".into()]);
    let leader = NodeProcess::start(0, &leader_args);
    let follower = NodeProcess::start(1, &follower_args).finish();
    drop(leader);
    cleanup(&cluster, 2);
    assert!(!follower.success);
    assert!(
        follower.stderr.contains("incompatible configuration"),
        "{}",
        follower.stderr
    );

    let bad = NodeProcess::start(
        0,
        &[
            "--nodes".into(),
            "3".into(),
            "--value-size".into(),
            "2000000".into(),
        ],
    )
    .finish();
    assert!(!bad.success);
    assert!(
        bad.stderr.contains("--value-size 2000000"),
        "{}",
        bad.stderr
    );
}

#[test]
fn udp_cluster_across_network_namespaces() {
    // Creating namespaces needs CAP_NET_ADMIN.
    if !rzab_tests::is_root() {
        eprintln!("skipped: creating network namespaces needs root");
        return;
    }
    let namespaces = Namespaces::create(3).expect("creating network namespaces with `ip` failed");
    let cluster = cluster_name("netns");
    let hosts = (0..3)
        .map(|node| namespaces.host(node))
        .collect::<Vec<_>>()
        .join(",");
    let binary = rzab_tests::binary("rzab-dataplane");
    let children: Vec<_> = (0..3u8)
        .map(|node| {
            let mut args = vec![
                "netns".to_owned(),
                "exec".to_owned(),
                namespaces.names[usize::from(node)].clone(),
                binary.display().to_string(),
                "--node".to_owned(),
                node.to_string(),
                "--transport".to_owned(),
                "udp".to_owned(),
                "--udp-hosts".to_owned(),
                hosts.clone(),
            ];
            args.extend(common(&cluster, 3));
            std::process::Command::new("ip")
                .args(&args)
                .env("RUST_BACKTRACE", "0")
                .env(rzab_tests::SECRET_ENV, rzab_tests::test_secret_file())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<rzab_tests::NodeOutput> = children
        .into_iter()
        .enumerate()
        .map(|(node, child)| {
            rzab_tests::NodeOutput::from_output(
                u8::try_from(node).unwrap(),
                child.wait_with_output().unwrap(),
            )
        })
        .collect();
    drop(namespaces);
    cleanup(&cluster, 3);
    assert_identical_replicas(&outputs);
}

/// Heartbeats never stop, so the drain at the end of a run must not wait for silence: it ends
/// once nothing but heartbeats has arrived for a while, well before its 5 s cap.
#[test]
fn workers_stop_draining_soon_after_the_run_ends() {
    let cluster = cluster_name("drain");
    cleanup(&cluster, 3);
    let outputs = run_cluster(3, &common(&cluster, 2));
    cleanup(&cluster, 3);
    assert_identical_replicas(&outputs);
    for output in &outputs {
        let drain = output.summary.as_ref().unwrap()["drain_seconds"]
            .as_f64()
            .unwrap();
        assert!(
            drain < 4.0,
            "node {} drained for {drain} s: it waited out the cap",
            output.node
        );
    }
}
