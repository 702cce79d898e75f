//! The one-shot inspector (`rzab-controlplane --inspect [--block PATH]`): attaches to a
//! control block, prints its state, handshake, knobs and counter totals as JSON, and returns.
//!
//! Touches: the control-block file (reads only).

use std::path::Path;
use std::sync::atomic::Ordering;

use rzab_shared::counters::COUNTERS;
use rzab_shared::knobs::KNOBS;
use rzab_shared::{AttachedControlBlock, ControlBlockError};

/// The block's state as JSON.
pub fn inspect(path: &Path) -> Result<serde_json::Value, ControlBlockError> {
    let block = AttachedControlBlock::attach(path)?;
    let knobs: serde_json::Map<String, serde_json::Value> = KNOBS
        .iter()
        .map(|spec| (spec.name.to_owned(), spec.to_json(block.knob(spec.knob))))
        .collect();
    let counters: serde_json::Map<String, serde_json::Value> = COUNTERS
        .iter()
        .map(|spec| {
            (
                format!("{:?}", spec.counter),
                serde_json::Value::from(block.counter_total(spec.counter)),
            )
        })
        .collect();
    Ok(serde_json::json!({
        "cluster": block.cluster_name(),
        "node": block.node_id(),
        "nodes": block.node_count(),
        "workers": block.worker_count(),
        "lifecycle": block.lifecycle().name(),
        "transport": block.transport().map(|kind| kind.name()),
        "instance": format!("{:016x}", block.header.instance.load(Ordering::Relaxed)),
        "dataplane_pid": block.header.owner_pid.load(Ordering::Relaxed),
        "controlplane_pid": block.header.controlplane_pid.load(Ordering::Relaxed),
        "registry_state": block.registry_state().name(),
        "peers_generation": block.handshake.peers_generation.load(Ordering::Acquire),
        "knob_epoch": block.knob_epoch(),
        "knobs": knobs,
        "counters": counters,
    }))
}
