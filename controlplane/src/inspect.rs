//! The one-shot inspector (`rzab-controlplane --inspect [--block PATH]`): attaches to a
//! control block, prints its state, handshake, knobs and counter totals as JSON, and returns.
//!
//! The block keeps the pids of the last data plane and control plane that used it, and those
//! stay after a process dies (a SIGKILLed one cannot clear them), so each comes with whether
//! that process is alive: the pid names a running process (not a zombie) in this pid namespace
//! and the process's heartbeat in the block is fresh. The heartbeat check keeps a reused pid
//! from passing for the old process.
//!
//! Touches: the control-block file (reads only), `/proc/{pid}/stat` of the two pids.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rzab_shared::counters::COUNTERS;
use rzab_shared::knobs::KNOBS;
use rzab_shared::{AttachedControlBlock, ControlBlockError};

use crate::state::{DATAPLANE_FRESH, now_ns};

/// A control plane beats every 100 ms; one silent for this long is not running.
pub const CONTROLPLANE_FRESH: Duration = Duration::from_secs(2);

/// Whether `pid` names a process that is running (any state but zombie or dead).
pub fn process_running(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the
    // last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X" | "x"))
}

/// A process recorded in the block: its pid, whether it is alive, its heartbeat's age.
fn holder(pid: u32, heartbeat_ns: u64, fresh: Duration) -> serde_json::Value {
    let age_ns = (heartbeat_ns != 0).then(|| now_ns().saturating_sub(heartbeat_ns));
    let beating =
        age_ns.is_some_and(|age| age <= u64::try_from(fresh.as_nanos()).unwrap_or(u64::MAX));
    serde_json::json!({
        "pid": pid,
        "alive": beating && process_running(pid),
        "heartbeat_age_seconds": age_ns.map(|age| age as f64 / 1e9),
    })
}

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
        "dataplane": holder(
            block.header.owner_pid.load(Ordering::Relaxed),
            block.header.dataplane_heartbeat_ns.load(Ordering::Relaxed),
            DATAPLANE_FRESH,
        ),
        "controlplane": holder(
            block.header.controlplane_pid.load(Ordering::Relaxed),
            block.header.controlplane_heartbeat_ns.load(Ordering::Relaxed),
            CONTROLPLANE_FRESH,
        ),
        "registry_state": block.registry_state().name(),
        "peers_generation": block.handshake.peers_generation.load(Ordering::Acquire),
        "knob_epoch": block.knob_epoch(),
        "knobs": knobs,
        "counters": counters,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_pid_zero_does_not() {
        assert!(process_running(std::process::id()));
        assert!(!process_running(0));
        assert!(!process_running(u32::MAX));
    }

    #[test]
    fn a_holder_is_alive_only_while_it_beats() {
        let me = std::process::id();
        assert_eq!(holder(me, now_ns(), CONTROLPLANE_FRESH)["alive"], true);
        let old = now_ns() - 60_000_000_000;
        assert_eq!(holder(me, old, CONTROLPLANE_FRESH)["alive"], false);
        assert_eq!(holder(me, 0, CONTROLPLANE_FRESH)["alive"], false);
        assert_eq!(holder(0, now_ns(), CONTROLPLANE_FRESH)["alive"], false);
    }
}
