//! rzab-controlplane: the per-node control-plane process. At this stage it can inspect a
//! node's control block; the registry exchange, REST API and metrics exporter build on it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use rzab_shared::{AttachedControlBlock, counters::COUNTERS, knobs::KNOBS};

/// Inspect an rzab node's control block.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Options {
    /// Path of the node's control block (for example /dev/shm/rzab-CLUSTER-n0).
    #[arg(long)]
    block: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let block = AttachedControlBlock::attach(&options.block)
        .with_context(|| format!("attaching to {}", options.block.display()))?;
    let knobs: serde_json::Map<String, serde_json::Value> = KNOBS
        .iter()
        .map(|spec| (spec.name.to_owned(), spec.to_json(block.knob(spec.knob))))
        .collect();
    let counters: serde_json::Map<String, serde_json::Value> = COUNTERS
        .iter()
        .map(|spec| {
            let name = format!("{:?}", spec.counter);
            (
                name,
                serde_json::Value::from(block.counter_total(spec.counter)),
            )
        })
        .collect();
    let status = serde_json::json!({
        "cluster": block.cluster_name(),
        "node": block.node_id(),
        "nodes": block.node_count(),
        "workers": block.worker_count(),
        "lifecycle": block.lifecycle().name(),
        "transport": block.transport().map(|kind| kind.name()),
        "knobs": knobs,
        "counters": counters,
    });
    println!("{}", serde_json::to_string_pretty(&status)?);
    Ok(())
}
