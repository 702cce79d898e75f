//! Real multi-process clusters: three `rzab-dataplane` processes replicate over the shm fabric
//! and over UDP on loopback, the multicast knob flips live in both directions without losing or
//! duplicating anything, and inconsistent configurations are refused with a clear error.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rzab_shared::{AttachedControlBlock, Counter, Knob};
use rzab_tests::{
    Namespaces, NodeProcess, assert_identical_replicas, cleanup, cluster_name, run_cluster,
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

fn attach(path: &std::path::Path) -> AttachedControlBlock {
    for _ in 0..200 {
        if let Ok(block) = AttachedControlBlock::attach(path) {
            return block;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("control block {} never appeared", path.display());
}

fn prepares(block: &AttachedControlBlock) -> (u64, u64) {
    (
        block.counter_total(Counter::SentPrepareMulticast),
        block.counter_total(Counter::SentPrepareUnicast),
    )
}

#[test]
fn multicast_flips_live_both_ways_without_loss() {
    let cluster = cluster_name("flip");
    cleanup(&cluster, 3);
    let args = common(&cluster, 7);
    let processes: Vec<NodeProcess> = (0..3).map(|node| NodeProcess::start(node, &args)).collect();
    let leader = attach(&PathBuf::from(format!("/dev/shm/rzab-{cluster}-n0")));
    while leader.lifecycle() != rzab_shared::Lifecycle::Running {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let (multicast_before, unicast_before) = prepares(&leader);
    assert!(multicast_before > 0, "multicast is the default path");
    assert_eq!(unicast_before, 0);

    leader.set_knobs(&[(Knob::Multicast, 0)]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (multicast_off, unicast_off) = prepares(&leader);
    assert!(unicast_off > 0, "unicast prepares must start");
    std::thread::sleep(Duration::from_millis(500));
    let (multicast_later, unicast_later) = prepares(&leader);
    assert_eq!(
        multicast_later, multicast_off,
        "multicast prepares must stop"
    );
    assert!(unicast_later > unicast_off);

    leader.set_knobs(&[(Knob::Multicast, 1)]).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let (multicast_on, unicast_on) = prepares(&leader);
    std::thread::sleep(Duration::from_millis(500));
    let (multicast_end, unicast_end) = prepares(&leader);
    assert!(
        multicast_end > multicast_on,
        "multicast prepares must resume"
    );
    assert_eq!(unicast_end, unicast_on, "unicast prepares must stop again");
    assert!(leader.header.dataplane_heartbeat_ns.load(Ordering::Relaxed) > 0);

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
            "5000".into(),
        ],
    )
    .finish();
    assert!(!bad.success);
    assert!(bad.stderr.contains("--value-size 5000"), "{}", bad.stderr);
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
