//! The start-up memory plan (`node::memory`) against what a pipeline really allocates: a
//! counting allocator measures `Node::new` (in each role a node may take) and `Sessions::new` for a few
//! configurations, and the plan must cover each without overstating it much. A change to the
//! pipeline's rings that the plan does not follow fails here, not on a machine out of memory.
//!
//! One test only: the allocator counts every thread, so nothing else may run beside it.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use rzab_dataplane::config::Options;
use rzab_dataplane::node::memory::pipeline_bytes;
use rzab_dataplane::workload::{KeyDistribution, Sessions, Trace};
use rzab_dataplane::zab::PipelineConfig;
use rzab_dataplane::zab::node::Node;

struct CountingAllocator;

static ALLOCATED: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only adds up sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller upholds GlobalAlloc's contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(pointer, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Bytes allocated while `build` runs (what it returns is dropped afterwards).
fn measure<T>(build: impl FnOnce() -> T) -> u64 {
    let before = ALLOCATED.load(Ordering::Relaxed);
    let built = build();
    let bytes = ALLOCATED.load(Ordering::Relaxed) - before;
    drop(built);
    bytes
}

#[test]
fn the_plan_covers_what_a_pipeline_allocates() {
    for (node, nodes, window, value_size, sessions) in [
        (0u8, 3u8, 1024usize, 32usize, 32usize),
        (1, 3, 1024, 32, 32),
        (0, 16, 4096, 1024, 256),
        (2, 16, 65536, 1024, 256),
        (0, 1, 32, 8, 1),
        (0, 5, 65536, 200, 7),
        // Transactions too large for a datagram: fragments, assemblies, chunked snapshots.
        (0, 3, 1024, 65536, 4),
        (1, 3, 1024, 1 << 20, 4),
        (0, 3, 2048, 1 << 20, 2),
    ] {
        let args: Vec<String> = [
            "rzab-dataplane",
            "--node",
            &node.to_string(),
            "--nodes",
            &nodes.to_string(),
            "--window",
            &window.to_string(),
            "--value-size",
            &value_size.to_string(),
            "--sessions",
            &sessions.to_string(),
            // The MTU the configuration below is built with.
            "--datagram-bytes",
            "4096",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        let options = Options::load(args).unwrap();
        options.validate().unwrap();
        let config = PipelineConfig {
            node,
            nodes,
            pipeline: 0,
            pipelines: 1,
            max_txn_len: rzab_dataplane::replica::kv_txn_len(value_size),
            slot_len: PipelineConfig::default_slot_len(
                rzab_dataplane::replica::kv_txn_len(value_size),
                rzab_dataplane::replica::kv_txn_len(value_size),
                4096,
            ),
            item_len: value_size,
            cluster_tag: 1,
            run: 1,
            epoch: rzab_dataplane::zab::LEADER_EPOCH,
            integrity: rzab_dataplane::zab::wire::Integrity::Crc32c,
            sessions,
            window,
            retained: 0,
            mtu: 4096,
            keys: options.keys,
            instance: 1,
            fingerprint: options.fingerprint(),
        }
        .with_retained(options.committed_ring_bytes);
        config.validate().unwrap();
        // A node that may change roles is planned for the larger; else for the one it has.
        let roles: Vec<u8> = if rzab_dataplane::node::memory::may_change_roles(&options) {
            vec![node, (node + 1) % nodes]
        } else {
            vec![0]
        };
        let measured = roles
            .into_iter()
            .map(|leader| {
                let trace = Trace::build(options.keys, KeyDistribution::Uniform, 16, 1).unwrap();
                measure(|| {
                    (
                        Node::new(config, leader),
                        Sessions::new(node, 0, sessions, trace, value_size),
                    )
                })
            })
            .max()
            .unwrap();
        let planned = pipeline_bytes(&options);
        let case = format!(
            "node {node} of {nodes}, window {window}, values of {value_size} bytes, {sessions} sessions: planned {planned}, allocated {measured}"
        );
        assert!(planned >= measured, "the plan falls short: {case}");
        assert!(
            planned <= measured + measured / 20 + (64 << 10),
            "the plan overstates: {case}"
        );
    }
}
