//! Datagrams that cannot lie, with real processes on udp over loopback. Each test is a finding
//! of an adversarial review that the wire format now rules out, or the accounting that shows
//! it:
//! - forged PREPAREs (right cluster, run, sender and epoch; no secret) sent to a follower's
//!   port made its store diverge while it reported `serving`: now every one is dropped as an
//!   integrity failure and the replicas stay identical;
//! - single-bit-flipped copies of real datagrams made followers fall behind and restart:
//!   now each is dropped (integrity, or malformed or foreign where the flip hit those fields),
//!   and unmodified copies from an earlier process of the same run are dropped as coming from
//!   an unknown sender instance;
//! - datagrams recorded from an earlier run of a cluster with the same name: now dropped as
//!   foreign;
//! - random datagrams (empty, oversize, garbage): every one is counted exactly once, and the
//!   counters add up (datagrams taken = messages accepted + drops by reason).
//!
//! The real datagrams are captured by a first run with `--capture-corpus` (what node 1
//! received), then replayed into a second run.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; port arithmetic is small"
)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rzab_dataplane::pipeline_input::{PipelineRecord, decode_pipeline_input};
use rzab_dataplane::zab::LEADER_EPOCH;
use rzab_dataplane::zab::wire::{self, Integrity, Kind};
use rzab_shared::{AttachedControlBlock, Counter};
use rzab_tests::{
    NodeOutput, NodeProcess, assert_identical_replicas, cleanup, cluster_name, instance_of,
    wait_serving_with_writes,
};

const VALUE_SIZE: usize = 32;

/// Ports of one test: `slot` keeps the tests of this process apart.
fn udp_base(slot: u16) -> u16 {
    31_000 + (std::process::id() % 500) as u16 * 40 + slot * 10
}

fn node_args(cluster: &str, run_id: &str, base: u16, seconds: u64, extra: &[&str]) -> Vec<String> {
    let mut args = rzab_tests::three_node_args(cluster);
    args.extend(
        [
            "--transport",
            "udp",
            "--udp-port-base",
            &base.to_string(),
            "--multicast-port",
            &(base + 9).to_string(),
            "--run-id",
            run_id,
            "--duration",
            &seconds.to_string(),
            "--value-size",
            &VALUE_SIZE.to_string(),
        ]
        .iter()
        .chain(extra)
        .map(|arg| (*arg).to_owned()),
    );
    args
}

fn block_path(cluster: &str, node: u8) -> PathBuf {
    PathBuf::from(format!("/dev/shm/rzab-{cluster}-n{node}"))
}

/// A 3-node cluster, started; its blocks attached once every node serves.
struct Running {
    cluster: String,
    nodes: Vec<NodeProcess>,
    blocks: Vec<AttachedControlBlock>,
}

impl Running {
    fn start(cluster: &str, args: &[String]) -> Running {
        cleanup(cluster, 3);
        let nodes: Vec<NodeProcess> = (0..3).map(|node| NodeProcess::start(node, args)).collect();
        let blocks: Vec<AttachedControlBlock> = (0..3)
            .map(|node| {
                let block = rzab_tests::attach_running(&block_path(cluster, node));
                wait_serving_with_writes(&block, &format!("node {node}"));
                block
            })
            .collect();
        Running {
            cluster: cluster.to_owned(),
            nodes,
            blocks,
        }
    }

    fn finish(self) -> (Vec<NodeOutput>, Vec<AttachedControlBlock>) {
        let outputs: Vec<NodeOutput> = self.nodes.into_iter().map(NodeProcess::finish).collect();
        cleanup(&self.cluster, 3);
        (outputs, self.blocks)
    }
}

/// What a follower's drop counters say, summed over its workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Drops {
    malformed: u64,
    foreign: u64,
    integrity: u64,
    unknown_sender: u64,
    misrouted: u64,
    oversize: u64,
    no_receive: u64,
}

impl Drops {
    fn read(block: &AttachedControlBlock) -> Drops {
        Drops {
            malformed: block.counter_total(Counter::DropsMalformed),
            foreign: block.counter_total(Counter::DropsForeign),
            integrity: block.counter_total(Counter::DropsIntegrity),
            unknown_sender: block.counter_total(Counter::DropsUnknownSender),
            misrouted: block.counter_total(Counter::DropsMisrouted),
            oversize: block.counter_total(Counter::TransportDropsOversize),
            no_receive: block.counter_total(Counter::TransportDropsNoReceive),
        }
    }

    fn since(self, before: Drops) -> Drops {
        Drops {
            malformed: self.malformed - before.malformed,
            foreign: self.foreign - before.foreign,
            integrity: self.integrity - before.integrity,
            unknown_sender: self.unknown_sender - before.unknown_sender,
            misrouted: self.misrouted - before.misrouted,
            oversize: self.oversize - before.oversize,
            no_receive: self.no_receive - before.no_receive,
        }
    }

    fn total(self) -> u64 {
        self.malformed
            + self.foreign
            + self.integrity
            + self.unknown_sender
            + self.misrouted
            + self.oversize
            + self.no_receive
    }
}

/// Every datagram a worker took from its transport is counted once more: accepted (by kind)
/// or refused (by reason).
fn assert_counted_once(block: &AttachedControlBlock, node: u8) {
    let accepted: u64 = [
        Counter::ReceivedWrite,
        Counter::ReceivedPrepare,
        Counter::ReceivedAck,
        Counter::ReceivedCommit,
        Counter::ReceivedCredit,
        Counter::ReceivedNack,
        Counter::ReceivedSnapshot,
        Counter::ReceivedHello,
    ]
    .iter()
    .map(|counter| block.counter_total(*counter))
    .sum();
    let refused: u64 = [
        Counter::DropsMalformed,
        Counter::DropsForeign,
        Counter::DropsIntegrity,
        Counter::DropsUnknownSender,
        Counter::DropsMisrouted,
    ]
    .iter()
    .map(|counter| block.counter_total(*counter))
    .sum();
    assert_eq!(
        block.counter_total(Counter::DatagramsReceived),
        accepted + refused,
        "node {node}: {accepted} accepted and {refused} refused do not add up to the datagrams taken"
    );
}

/// Sends datagrams to one port, paced so that the kernel's socket buffer never overflows
/// (a datagram the kernel drops would reach no counter).
fn send_paced(port: u16, datagrams: &[Vec<u8>]) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for datagram in datagrams {
        socket.send_to(datagram, ("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    // Let the worker take the last ones before the counters are read.
    std::thread::sleep(Duration::from_millis(300));
}

/// The run's end: every node succeeded, replicas are identical, and node 1 ran as one
/// process throughout (no fall-behind, no rejoin).
fn assert_unharmed(outputs: &[NodeOutput], follower_instance: u64, block: &AttachedControlBlock) {
    assert_identical_replicas(outputs);
    assert_eq!(
        instance_of(block),
        follower_instance,
        "node 1 restarted during the run"
    );
    assert!(
        !outputs[1].stdout.contains("fell behind") && !outputs[1].stderr.contains("fell behind"),
        "node 1 fell behind:\n{}\n{}",
        outputs[1].stdout,
        outputs[1].stderr
    );
    assert_counted_once(block, 1);
}

/// What node 1 received in a short capture run (run id `trust-a`): hellos left out, since
/// hellos are how instances become known and are accepted from any sender.
fn captured_run() -> &'static (String, Vec<Vec<u8>>) {
    static CAPTURED: OnceLock<(String, Vec<Vec<u8>>)> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let cluster = cluster_name("trustcap");
        let dir = tempfile::tempdir().unwrap();
        let capture = dir.path().join("corpus");
        let args = node_args(
            &cluster,
            "trust-a",
            udp_base(0),
            3,
            &["--capture-corpus", capture.to_str().unwrap()],
        );
        let running = Running::start(&cluster, &args);
        let (outputs, _) = running.finish();
        assert_identical_replicas(&outputs);
        let datagrams = node_datagrams(&capture.join("pipeline_input"), 1);
        assert!(
            datagrams.len() >= 16,
            "only {} datagrams captured at node 1",
            datagrams.len()
        );
        (cluster, datagrams)
    })
}

fn node_datagrams(dir: &Path, node: u8) -> Vec<Vec<u8>> {
    let mut datagrams = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with(&format!("node{node}-")) {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let (_, records) = decode_pipeline_input(&bytes).unwrap();
        for record in records {
            if let PipelineRecord::Datagram(datagram) = record {
                if datagram.get(3) != Some(&(Kind::Hello as u8)) {
                    datagrams.push(datagram.to_vec());
                }
            }
        }
    }
    datagrams
}

#[test]
fn forged_prepares_without_the_secret_are_dropped_and_counted() {
    let _serial = rzab_tests::serial();
    let cluster = cluster_name("forge");
    let run_id = "trust-forge";
    let base = udp_base(1);
    let running = Running::start(&cluster, &node_args(&cluster, run_id, base, 6, &[]));
    let follower_instance = instance_of(&running.blocks[1]);
    let leader_instance = instance_of(&running.blocks[0]);
    let before = Drops::read(&running.blocks[1]);
    // Everything a forger can see or guess is right: cluster, run, the leader's node, process
    // instance and epoch, pipeline sequences just ahead of the live ones. Only the secret is
    // missing: half are sealed with a guessed key, half with a plain CRC32C.
    let run = wire::run_tag(run_id);
    let guessed = Integrity::mac(b"a guess at the cluster secret", run);
    let committed = rzab_tests::applied_zxid(&running.blocks[1]);
    let forged: Vec<Vec<u8>> = (0..600u64)
        .map(|index| {
            // A transaction of the key-value store: its 8-byte key, then the value.
            let slot = VALUE_SIZE + 8;
            let mut datagram = vec![0u8; wire::prepare_len(1, slot)];
            wire::put_header(
                &mut datagram,
                &wire::Header {
                    kind: Kind::Prepare,
                    from_node: 0,
                    pipeline: 0,
                    count: 1,
                    cluster_tag: wire::cluster_tag(&cluster),
                    slot_words: wire::slot_words(slot),
                    flags: 0,
                    run,
                    instance: leader_instance,
                    epoch: LEADER_EPOCH,
                    words: [0, u64::MAX / 2, 0, 0, 0],
                },
            );
            let pseq = (committed & 0xffff_ffff) + index;
            wire::put_prepare_prefix(&mut datagram, pseq, committed + index + 1);
            let body = wire::HEADER_BYTES + wire::PREPARE_PREFIX;
            let mut txn = vec![0xee; slot];
            txn[..8].copy_from_slice(&7u64.to_le_bytes());
            wire::put_entry(
                &mut datagram[body..],
                1,
                0,
                0,
                u32::try_from(slot).unwrap(),
                1 << 40,
                &txn,
            );
            let integrity = if index % 2 == 0 {
                guessed
            } else {
                Integrity::Crc32c
            };
            wire::seal(&mut datagram, &integrity);
            datagram
        })
        .collect();
    send_paced(base + 1, &forged);
    let dropped = Drops::read(&running.blocks[1]).since(before);
    let (outputs, blocks) = running.finish();
    assert_eq!(
        dropped,
        Drops {
            integrity: forged.len() as u64,
            ..Drops::default()
        },
        "every forged prepare must be dropped as an integrity failure, and nothing else"
    );
    assert_unharmed(&outputs, follower_instance, &blocks[1]);
}

#[test]
fn flipped_and_replayed_datagrams_of_a_real_run_are_dropped_and_counted() {
    let _serial = rzab_tests::serial();
    let (cluster, captured) = captured_run();
    let base = udp_base(0);
    // The same cluster and run id as the capture: only the secret and instances protect it.
    let running = Running::start(cluster, &node_args(cluster, "trust-a", base, 6, &[]));
    let follower_instance = instance_of(&running.blocks[1]);
    let mut rng = SmallRng::seed_from_u64(0x0f11_b175);
    let flipped: Vec<Vec<u8>> = (0..4)
        .flat_map(|_| captured.iter())
        .map(|datagram| {
            let mut copy = datagram.clone();
            let bit = rng.random_range(0..copy.len() * 8);
            copy[bit / 8] ^= 1 << (bit % 8);
            copy
        })
        .collect();
    let before = Drops::read(&running.blocks[1]);
    send_paced(base + 1, &flipped);
    let after_flips = Drops::read(&running.blocks[1]);
    let dropped = after_flips.since(before);
    assert_eq!(
        dropped.integrity + dropped.malformed + dropped.foreign,
        flipped.len() as u64,
        "every flipped datagram must be dropped once: {dropped:?}"
    );
    assert!(
        dropped.integrity * 2 > flipped.len() as u64,
        "most flips must fail the check: {dropped:?}"
    );
    // Unmodified copies: sealed with this cluster's secret for this run, but from processes
    // (the capture run's) that no longer exist.
    send_paced(base + 1, captured);
    let replayed = Drops::read(&running.blocks[1]).since(after_flips);
    let (outputs, blocks) = running.finish();
    assert_eq!(
        replayed,
        Drops {
            unknown_sender: captured.len() as u64,
            ..Drops::default()
        },
        "every replayed datagram must be dropped as from an unknown sender instance"
    );
    assert_unharmed(&outputs, follower_instance, &blocks[1]);
}

#[test]
fn datagrams_of_an_earlier_run_are_dropped_as_foreign() {
    let _serial = rzab_tests::serial();
    let (cluster, captured) = captured_run();
    let base = udp_base(0);
    let running = Running::start(cluster, &node_args(cluster, "trust-b", base, 5, &[]));
    let follower_instance = instance_of(&running.blocks[1]);
    let before = Drops::read(&running.blocks[1]);
    send_paced(base + 1, captured);
    let dropped = Drops::read(&running.blocks[1]).since(before);
    let (outputs, blocks) = running.finish();
    assert_eq!(
        dropped,
        Drops {
            foreign: captured.len() as u64,
            ..Drops::default()
        },
        "every datagram of the earlier run must be dropped as foreign"
    );
    assert_unharmed(&outputs, follower_instance, &blocks[1]);
}

#[test]
fn every_hostile_datagram_is_counted_exactly_once() {
    let _serial = rzab_tests::serial();
    let cluster = cluster_name("hostile");
    let base = udp_base(2);
    let running = Running::start(&cluster, &node_args(&cluster, "trust-h", base, 5, &[]));
    let follower_instance = instance_of(&running.blocks[1]);
    let mut rng = SmallRng::seed_from_u64(0x4057_11e5);
    let tag = wire::cluster_tag(&cluster).to_le_bytes();
    let hostile: Vec<Vec<u8>> = (0..1000)
        .map(|index| {
            let len = match index % 10 {
                0 => 0,
                1 => 9000,
                2 => rng.random_range(1..wire::HEADER_BYTES),
                // Within the MTU (about 1 KiB for 32-byte values): only the 9000-byte ones are oversize.
                _ => rng.random_range(wire::HEADER_BYTES..900),
            };
            let mut datagram: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if len >= wire::HEADER_BYTES && index % 2 == 0 {
                // Past the magic, version and cluster checks, so deeper ones see it too.
                datagram[0..2].copy_from_slice(&wire::MAGIC.to_le_bytes());
                datagram[2] = wire::VERSION;
                datagram[3] = rng.random_range(1..=8);
                datagram[8..12].copy_from_slice(&tag);
            }
            datagram
        })
        .collect();
    let before = Drops::read(&running.blocks[1]);
    send_paced(base + 1, &hostile);
    let dropped = Drops::read(&running.blocks[1]).since(before);
    let (outputs, blocks) = running.finish();
    assert_eq!(
        dropped.total(),
        hostile.len() as u64,
        "every hostile datagram must land in exactly one drop counter: {dropped:?}"
    );
    assert_eq!(
        dropped.oversize,
        hostile.len() as u64 / 10,
        "the oversize ones: {dropped:?}"
    );
    assert_unharmed(&outputs, follower_instance, &blocks[1]);
    for (node, block) in blocks.iter().enumerate() {
        assert_counted_once(block, node as u8);
    }
}
