//! Options that size memory or ports, tried on the built `rzab-dataplane` as a user would: a
//! window, a port base or a memory cap the machine cannot honour is refused before anything
//! starts, with the option and its range; a `--config` file's wrong value names the file, the
//! key and the type; a timed run that completed no operation fails; `--help` names the ranges.
//!
//! Every process gets its control block and shm fabric in a temporary directory (removed at the
//! end) and is killed if a test fails before it exits.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DATAPLANE: &str = env!("CARGO_BIN_EXE_rzab-dataplane");

/// Runs the data plane to its end with `args`, its files in `dir`.
fn run(dir: &Path, args: &[&str]) -> Output {
    let child = start(dir, "0", args);
    finish(child, Duration::from_secs(60))
}

/// Starts node `node` with its control block and fabric in `dir`.
fn start(dir: &Path, node: &str, args: &[&str]) -> Child {
    Command::new(DATAPLANE)
        .args(["--cluster", "limits", "--node", node, "--shm-dir"])
        .arg(dir)
        .arg("--control-block")
        .arg(dir.join(format!("block{node}")))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` at most `limit`, killing it past that.
fn finish(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "rzab-dataplane did not exit within {limit:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Asserts a refusal before start: status 2, `fragments` in stderr, no control block made.
fn assert_refused(dir: &Path, output: &Output, fragments: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for fragment in fragments {
        assert!(stderr.contains(fragment), "no `{fragment}` in: {stderr}");
    }
    assert!(!dir.join("block0").exists(), "a control block was created");
    assert!(
        !dir.join("rzab-fabric-limits").exists(),
        "a fabric was created"
    );
}

#[test]
fn a_window_past_its_range_is_refused_instead_of_aborting() {
    let dir = tempfile::tempdir().unwrap();
    for window in ["4611686018427387904", "16777216", "100", "0"] {
        let output = run(dir.path(), &["--nodes", "1", "--window", window]);
        assert_refused(
            dir.path(),
            &output,
            &["--window", "expected a power of two in 32..=1048576"],
        );
    }
}

#[test]
fn a_configuration_larger_than_memory_is_refused_with_its_size() {
    let dir = tempfile::tempdir().unwrap();
    // Against an explicit cap: 32 windows of 65536 prepares of 64 bytes and more are 128 MiB.
    let output = run(
        dir.path(),
        &[
            "--nodes",
            "1",
            "--window",
            "65536",
            "--max-memory-mib",
            "64",
        ],
    );
    assert_refused(
        dir.path(),
        &output,
        &[
            "more than the 64.0 MiB (67108864 bytes) allowed (--max-memory-mib 64)",
            "--window 65536",
            "the leader's rings",
        ],
    );
    // Against what the machine has: over a TiB of rings fits no test machine.
    let output = run(
        dir.path(),
        &[
            "--nodes",
            "1",
            "--workers",
            "32",
            "--window",
            "1048576",
            "--value-size",
            "1024",
        ],
    );
    assert_refused(
        dir.path(),
        &output,
        &["MemAvailable in /proc/meminfo", "--window 1048576"],
    );
}

#[test]
fn udp_ports_past_65535_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for node in ["0", "1"] {
        let output = finish(
            start(
                dir.path(),
                node,
                &[
                    "--nodes",
                    "2",
                    "--transport",
                    "udp",
                    "--udp-port-base",
                    "65535",
                    "--duration",
                    "2",
                    "--join-timeout",
                    "3",
                ],
            ),
            Duration::from_secs(60),
        );
        assert_refused(
            dir.path(),
            &output,
            &[
                "--udp-port-base 65535",
                "65535..=65536",
                "use a base of at most 65534",
            ],
        );
        assert!(!dir.path().join(format!("block{node}")).exists());
    }
}

#[test]
fn a_config_file_value_of_the_wrong_type_names_file_key_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    for (text, fragments) in [
        (
            "nodes = 1\nwindow = -1\n",
            vec![
                "node.toml: key `window`",
                "expected a power of two in 32..=1048576",
            ],
        ),
        (
            "nodes = 1\nsessions = \"many\"\n",
            vec![
                "node.toml: key `sessions` must be an integer, not the string \"many\"",
                "[range: 1..=256]",
            ],
        ),
        (
            "nodes = 1\njson_stats = \"yes\"\n",
            vec!["node.toml: key `json_stats` must be a boolean"],
        ),
        (
            "nodes = 1\nwidow = 64\n",
            vec!["node.toml: unknown key `widow`"],
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let output = run(dir.path(), &["--config", file.to_str().unwrap()]);
        assert_refused(dir.path(), &output, &fragments);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("unexpected argument"), "{stderr}");
    }
}

#[test]
fn a_timed_run_that_completes_no_operation_fails() {
    let dir = tempfile::tempdir().unwrap();
    // The leader hears the follower's hello, so it runs, but every datagram it sends is
    // dropped: no write (they all are) ever commits. The follower never hears back and stops
    // on its join timeout, which is an error already.
    let common = ["--nodes", "2", "--write-ratio", "1000", "--keys", "1000"];
    let leader = start(
        dir.path(),
        "0",
        &[&common[..], &["--duration", "2", "--inject-loss", "100"]].concat(),
    );
    let follower = start(
        dir.path(),
        "1",
        &[&common[..], &["--duration", "2", "--join-timeout", "3"]].concat(),
    );
    let follower = finish(follower, Duration::from_secs(60));
    let leader = finish(leader, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&leader.stdout);
    let stderr = String::from_utf8_lossy(&leader.stderr);
    assert!(
        stdout.contains("running"),
        "the leader never ran: {stdout}{stderr}"
    );
    assert!(stdout.contains("\"reads\":0,\"writes\":0"), "{stdout}");
    assert_eq!(leader.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("completed no operation"), "{stderr}");
    assert!(!follower.status.success());
}

#[test]
fn help_names_every_range() {
    let output = Command::new(DATAPLANE).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for fragment in [
        "Nodes in the cluster [range: 1..=16]",
        "[range: powers of two in 32..=1048576]",
        "Bytes per value (at most --max-txn-bytes) [range: 8..=67108864]",
        "--datagram-bytes",
        "[range: 0..=31536000]",
        "--max-memory-mib",
        "prepare_batch            1..=16 [default: 16]",
        "poll_mode                busy or adaptive [default: adaptive]",
    ] {
        assert!(help.contains(fragment), "no `{fragment}` in --help");
    }
}
