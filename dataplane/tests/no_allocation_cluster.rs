//! After start-up, a running multi-node cluster allocates nothing: three nodes run in this
//! process (each with its own control block, worker threads and shm ports), recording their
//! histories (`--history-dir`: workers fill recycled buffers, a flusher thread per node writes
//! them), and a counting global allocator sees no allocation in any thread during a
//! steady-state window. It does so for small transactions, and for transactions of 64 KiB and
//! 1 MiB that travel as fragments, and for a run that mixes 32 B, 64 KiB and 1 MiB
//! transactions, under injected loss (so repairs and repeats run too).

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rzab_dataplane::config::Options;
use rzab_shared::{AttachedControlBlock, Counter, Lifecycle, SyncState};

use common::allocations;

#[test]
fn running_cluster_allocates_nothing() {
    // One after another: the allocator's count is global to the process.
    for (value_size, mix, keys, loss_percent, min_writes) in [
        ("32", None, "20000", "0", 1000),
        ("32", None, "20000", "1", 1000),
        ("65536", None, "256", "1", 20),
        ("1048576", None, "64", "0.2", 5),
        ("1048576", Some("32,65536,1048576"), "64", "0.5", 10),
    ] {
        allocates_nothing(value_size, mix, keys, loss_percent, min_writes);
    }
}

fn allocates_nothing(
    value_size: &str,
    mix: Option<&str>,
    keys: &str,
    loss_percent: &str,
    min_writes: u64,
) {
    let case = format!("{value_size}-byte values (mix {mix:?}), {loss_percent}% loss");
    let dir = tempfile::tempdir().unwrap();
    let cluster = format!("alloc{}", std::process::id() % 100_000);
    let history = dir.path().join("history");
    let nodes: Vec<_> = (0..3u8)
        .map(|node| {
            let args: Vec<String> = [
                "rzab-dataplane",
                "--cluster",
                &cluster,
                "--node",
                &node.to_string(),
                "--nodes",
                "3",
                "--keys",
                keys,
                "--value-size",
                value_size,
                "--inject-loss",
                loss_percent,
                "--duration",
                "8",
                "--write-ratio",
                "300",
                "--sessions",
                "8",
                "--shm-dir",
                dir.path().to_str().unwrap(),
                "--control-block",
                dir.path().join(format!("block{node}")).to_str().unwrap(),
                "--knob",
                "stats_interval_ms=60000",
                // Three unoptimized nodes in one process move 1 MiB transactions slowly enough
                // to be silent for more than the default 50 ms: a change of leader would
                // allocate (new roles), and this test is about the steady state.
                "--knob",
                "election_timeout_ms=3000",
                "--history-dir",
                history.to_str().unwrap(),
            ]
            .iter()
            .map(|arg| (*arg).to_owned())
            .chain(
                mix.into_iter()
                    .flat_map(|mix| ["--value-mix".to_owned(), mix.to_owned()]),
            )
            .collect();
            let options = Options::load(args).unwrap();
            std::thread::spawn(move || rzab_dataplane::node::run(&options).unwrap())
        })
        .collect();
    // Start-up may allocate (threads, the "running" lines, first messages): the window opens
    // only once every node runs, every worker serves, and the leader has committed writes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let blocks: Vec<AttachedControlBlock> = (0..3)
        .map(|node| {
            let path = dir.path().join(format!("block{node}"));
            loop {
                if let Ok(block) = AttachedControlBlock::attach(&path) {
                    break block;
                }
                assert!(Instant::now() < deadline, "node {node} never started");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .collect();
    while !blocks.iter().all(|block| {
        block.lifecycle() == Lifecycle::Running
            && (0..block.worker_count() as usize).all(|worker| {
                SyncState::from_code(
                    block
                        .worker(worker)
                        .gauges
                        .sync_state
                        .load(Ordering::Acquire),
                ) == SyncState::Serving
            })
            && block.counter_total(Counter::WritesApplied) > min_writes
    }) {
        assert!(
            Instant::now() < deadline,
            "{case}: the cluster never got going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let leader = &blocks[0];
    std::thread::sleep(Duration::from_millis(200));
    let writes_before = leader.counter_total(Counter::WritesApplied);
    let before = allocations();
    std::thread::sleep(Duration::from_millis(1500));
    let after = allocations();
    let writes_after = leader.counter_total(Counter::WritesApplied);
    assert!(
        writes_after > writes_before + min_writes,
        "{case}: the cluster must be replicating during the window ({} writes)",
        writes_after - writes_before
    );
    assert_eq!(
        after - before,
        0,
        "{case}: allocations in a running cluster"
    );
    let summaries: Vec<_> = nodes.into_iter().map(|node| node.join().unwrap()).collect();
    assert!(
        summaries
            .iter()
            .all(|summary| summary.digest == summaries[0].digest
                && summary.applied_zxid == summaries[0].applied_zxid)
    );
    for summary in &summaries {
        let recorded = summary.history.unwrap();
        assert!(
            recorded.records > min_writes && recorded.dropped == 0,
            "{case}: node {}: {recorded:?}",
            summary.node
        );
    }
}
