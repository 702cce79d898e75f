//! Recorded histories of real multi-process clusters pass the consistency checker: three
//! `rzab-dataplane` processes record with `--history-dir` (shm with two workers, udp with one),
//! and both the checker library and the `rzab-check-history` binary find no violation in a
//! history with reads and writes from every node; the binary fails the same history once one
//! follower's applied write is changed, and refuses what it cannot read.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use std::path::Path;
use std::process::Command;

use rzab_dataplane::history::format::{HEADER_BYTES, RECORD_BYTES, Record};
use rzab_tests::{
    NodeOutput, assert_identical_replicas, check_history, cleanup, cluster_name, run_cluster,
};

fn common(cluster: &str, history: &Path) -> Vec<String> {
    [
        "--cluster",
        cluster,
        "--nodes",
        "3",
        "--keys",
        "2000",
        "--duration",
        "3",
        "--write-ratio",
        "200",
        "--sessions",
        "16",
        "--knob",
        "stats_interval_ms=1000",
        "--join-timeout",
        "30",
        "--history-dir",
        history.to_str().unwrap(),
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect()
}

/// Runs the checker (library and binary) on a finished cluster's history and asserts it is
/// consistent and not trivial.
fn assert_consistent_history(outputs: &[NodeOutput], history: &Path, workers: usize) {
    assert_identical_replicas(outputs);
    for output in outputs {
        let recorded = &output.summary.as_ref().unwrap()["history"];
        assert_eq!(
            recorded["files"].as_u64(),
            Some(workers as u64),
            "node {}: {recorded}",
            output.node
        );
        assert_eq!(
            recorded["dropped"].as_u64(),
            Some(0),
            "node {} dropped records",
            output.node
        );
    }
    let report = check_history("history", history, outputs);
    assert_eq!(report.files, 3 * workers);
    assert_eq!(report.processes, 3);

    let binary = Command::new(env!("CARGO_BIN_EXE_rzab-check-history"))
        .arg(history)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&binary.stdout);
    assert!(binary.status.success(), "{stdout}");
    assert!(stdout.contains("violations: none"), "{stdout}");
}

#[test]
fn three_node_shm_cluster_history_is_consistent() {
    let cluster = cluster_name("hshm");
    cleanup(&cluster, 3);
    let history = tempfile::tempdir().unwrap();
    let mut args = common(&cluster, history.path());
    args.extend(["--workers".into(), "2".into()]);
    let outputs = run_cluster(3, &args);
    cleanup(&cluster, 3);
    assert_consistent_history(&outputs, history.path(), 2);

    // The same history with one write changed in one follower's applied sequence fails.
    plant_divergence(history.path());
    let binary = Command::new(env!("CARGO_BIN_EXE_rzab-check-history"))
        .arg(history.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&binary.stdout);
    assert_eq!(binary.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("diverged 1"), "{stdout}");
}

/// Changes the write id of the first apply record in node 2's worker-0 file.
fn plant_divergence(history: &Path) {
    let path = std::fs::read_dir(history)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("node2-worker0.")
        })
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let at = (HEADER_BYTES..bytes.len())
        .step_by(RECORD_BYTES)
        .find(|at| {
            let record: &[u8; RECORD_BYTES] = bytes[*at..*at + RECORD_BYTES].try_into().unwrap();
            matches!(Record::decode(record), Ok(Record::Apply { .. }))
        })
        .unwrap();
    bytes[at + 32] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn three_node_udp_cluster_history_is_consistent() {
    let cluster = cluster_name("hudp");
    cleanup(&cluster, 3);
    let history = tempfile::tempdir().unwrap();
    let base = 30_000 + (std::process::id() % 1_000) as u16 * 10;
    let mut args = common(&cluster, history.path());
    args.extend([
        "--workers".into(),
        "1".into(),
        "--transport".into(),
        "udp".into(),
        "--udp-port-base".into(),
        base.to_string(),
        "--multicast-port".into(),
        (base + 9).to_string(),
    ]);
    let outputs = run_cluster(3, &args);
    cleanup(&cluster, 3);
    assert_consistent_history(&outputs, history.path(), 1);
}

#[test]
fn the_checker_binary_refuses_what_it_cannot_read() {
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_rzab-check-history"))
        .arg(empty.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no history files"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let usage = Command::new(env!("CARGO_BIN_EXE_rzab-check-history"))
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}
