//! rzab-tests: helpers for tests that run real multi-process rzab clusters. The tests live in
//! `tests/tests/`; this library finds (building if needed) the workspace's binaries, starts
//! node processes, and parses what they print. It touches only the processes it starts and
//! the control-block and fabric files of the clusters it names. [`history`] checks the
//! histories nodes record with `--history-dir` (also as the `rzab-check-history` binary);
//! [`ops`] runs clusters with their control planes, memcached and Prometheus.

#![allow(clippy::unwrap_used, reason = "test support fails by panicking")]

pub mod history;
pub mod ops;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;

/// The directory cargo builds binaries into for the current profile.
pub fn target_bin_dir() -> PathBuf {
    let mut path = std::env::current_exe().unwrap_or_default();
    path.pop();
    if path.ends_with("deps") {
        path.pop();
    }
    path
}

static BUILD: Once = Once::new();

/// The path of a workspace binary, built first if this test run has not built it.
pub fn binary(name: &str) -> PathBuf {
    let path = target_bin_dir().join(name);
    BUILD.call_once(|| {
        let release = target_bin_dir().ends_with("release");
        let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        command.args([
            "build",
            "--bins",
            "-p",
            "rzab-dataplane",
            "-p",
            "rzab-controlplane",
        ]);
        if release {
            command.arg("--release");
        }
        let status = command.status().unwrap();
        assert!(status.success(), "building the binaries failed");
    });
    path
}

/// The environment variable rzab-dataplane reads its cluster secret file from.
pub const SECRET_ENV: &str = "RZAB_CLUSTER_SECRET_FILE";

/// A cluster secret file for this test process (readable by its owner only), which every node
/// the helpers start is given through [`SECRET_ENV`]: udp needs one.
pub fn test_secret_file() -> PathBuf {
    static SECRET: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SECRET
        .get_or_init(|| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let path =
                std::env::temp_dir().join(format!("rzab-test-secret-{}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos())
                .unwrap_or(0);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap();
            file.write_all(format!("rzab test secret {seed:032x}").as_bytes())
                .unwrap();
            path
        })
        .clone()
}

/// A cluster name unique to this test process and label.
pub fn cluster_name(label: &str) -> String {
    format!("t{}{label}", std::process::id() % 100_000)
}

/// One node process; killed if still running when dropped.
#[derive(Debug)]
pub struct NodeProcess {
    pub node: u8,
    child: Option<Child>,
}

/// What a node printed.
#[derive(Debug)]
pub struct NodeOutput {
    pub node: u8,
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub summary: Option<serde_json::Value>,
}

impl NodeOutput {
    /// Reads a finished node process's exit status, output and summary line.
    pub fn from_output(node: u8, output: std::process::Output) -> NodeOutput {
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let summary = stdout
            .lines()
            .find_map(|line| line.strip_prefix("summary "))
            .and_then(|json| serde_json::from_str(json).ok());
        NodeOutput {
            node,
            success: output.status.success(),
            stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            summary,
        }
    }
}

impl NodeProcess {
    /// Starts `rzab-dataplane --node N` with the given extra arguments.
    pub fn start(node: u8, args: &[String]) -> NodeProcess {
        NodeProcess::start_with_prefix(&[], node, args)
    }

    /// Waits for the process and collects its output.
    pub fn finish(mut self) -> NodeOutput {
        let child = self.child.take().unwrap();
        NodeOutput::from_output(self.node, child.wait_with_output().unwrap())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `--history-dir DIR`.
pub fn history_args(history: &std::path::Path) -> Vec<String> {
    vec!["--history-dir".into(), history.to_str().unwrap().into()]
}

/// Checks a 3-node run's recorded history: no violation, reads and writes recorded on every
/// node, and the history reaching the leader's applied zxid.
pub fn check_history(
    label: &str,
    history: &std::path::Path,
    outputs: &[NodeOutput],
) -> history::Report {
    let report =
        history::check_dirs(&[history.to_owned()], &history::CheckOptions::default()).unwrap();
    eprintln!("{label}: {report}");
    assert!(report.is_clean(), "{label}: {report}");
    assert!(
        report.reads > 0 && report.writes_invoked > 0 && report.writes_completed > 0,
        "{label}: {report}"
    );
    assert_eq!(report.nodes, 3, "{label}: {report}");
    for node in 0..3 {
        let recorded: u64 = report
            .processes_of(node)
            .iter()
            .map(|process| process.reads + process.writes_completed)
            .sum();
        assert!(recorded > 0, "{label}: node {node} recorded no operation");
    }
    let applied = outputs[0].summary.as_ref().unwrap()["applied_zxid"]
        .as_u64()
        .unwrap();
    assert_eq!(
        report.zxids.map(|(_, last)| last),
        Some(applied),
        "{label}: the history must reach the leader's applied zxid"
    );
    report
}

/// Every node ended cleanly with the leader's applied zxid and store; node 1 applied the same
/// sequence as the leader, and node 2 (which caught up by snapshot, so applied only a suffix)
/// served writes.
pub fn assert_caught_up(outputs: &[NodeOutput]) {
    for output in outputs {
        assert!(
            output.success,
            "node {} failed:\n{}\n{}",
            output.node, output.stdout, output.stderr
        );
    }
    let summary = |node: usize| outputs[node].summary.as_ref().unwrap();
    for node in 1..3 {
        assert_eq!(
            summary(node)["applied_zxid"],
            summary(0)["applied_zxid"],
            "node {node} applied a different prefix"
        );
        assert_eq!(
            summary(node)["store_digest"],
            summary(0)["store_digest"],
            "node {node}'s store differs from the leader's"
        );
    }
    assert_eq!(summary(1)["digest"], summary(0)["digest"]);
    assert!(
        summary(2)["writes"].as_u64().unwrap() > 0,
        "the caught-up node served no writes"
    );
}

/// Whether every worker of the node has applied the knobs of `epoch` (its `knob_epoch_seen`).
pub fn workers_applied(block: &rzab_shared::AttachedControlBlock, epoch: u64) -> bool {
    (0..block.worker_count() as usize).all(|worker| {
        block
            .worker(worker)
            .gauges
            .knob_epoch_seen
            .load(std::sync::atomic::Ordering::Acquire)
            >= epoch
    })
}

/// Waits until every worker of the node serves local reads (it has caught up) and its sessions
/// have completed a write.
pub fn wait_serving_with_writes(block: &rzab_shared::AttachedControlBlock, node: &str) {
    ops::wait_until(&format!("{node} serves and completes writes"), || {
        serving(block) && block.counter_total(rzab_shared::Counter::WritesCompleted) > 0
    });
}

/// Waits until every worker of the node serves local reads and its sessions have completed
/// one (for a node whose sessions only read).
pub fn wait_serving_with_reads(block: &rzab_shared::AttachedControlBlock, node: &str) {
    ops::wait_until(&format!("{node} serves and completes reads"), || {
        serving(block) && block.counter_total(rzab_shared::Counter::ReadsCompleted) > 0
    });
}

/// Whether every worker of the node serves local reads (it has caught up).
fn serving(block: &rzab_shared::AttachedControlBlock) -> bool {
    (0..block.worker_count() as usize).all(|worker| {
        rzab_shared::SyncState::from_code(
            block
                .worker(worker)
                .gauges
                .sync_state
                .load(std::sync::atomic::Ordering::Acquire),
        ) == rzab_shared::SyncState::Serving
    })
}

/// Holds one cluster test of a test binary at a time: clusters busy-poll, the machine may have
/// two cores, and the tests measure progress (commit stalls) that a second cluster would starve.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes a cluster's control blocks and fabric from /dev/shm.
pub fn cleanup(cluster: &str, nodes: u8) {
    for node in 0..nodes {
        let _ = std::fs::remove_file(format!("/dev/shm/rzab-{cluster}-n{node}"));
    }
    let _ = std::fs::remove_file(format!("/dev/shm/rzab-fabric-{cluster}"));
}

/// Starts `nodes` nodes with common arguments, waits for all, and returns their outputs.
pub fn run_cluster(nodes: u8, args: &[String]) -> Vec<NodeOutput> {
    let processes: Vec<NodeProcess> = (0..nodes)
        .map(|node| NodeProcess::start(node, args))
        .collect();
    processes.into_iter().map(NodeProcess::finish).collect()
}

/// Asserts that every node succeeded, applied the same zxid and digest, and committed writes.
pub fn assert_identical_replicas(outputs: &[NodeOutput]) {
    for output in outputs {
        assert!(
            output.success,
            "node {} failed:\n{}\n{}",
            output.node, output.stdout, output.stderr
        );
    }
    let summaries: Vec<&serde_json::Value> = outputs
        .iter()
        .map(|output| output.summary.as_ref().unwrap())
        .collect();
    let zxid = summaries[0]["applied_zxid"].as_u64().unwrap();
    assert!(
        zxid > (1u64 << 32) + 1_000,
        "too few writes committed: zxid {zxid:#x}"
    );
    for (output, summary) in outputs.iter().zip(&summaries) {
        assert_eq!(
            summary["applied_zxid"], summaries[0]["applied_zxid"],
            "node {} applied a different prefix",
            output.node
        );
        assert_eq!(
            summary["digest"], summaries[0]["digest"],
            "node {} diverged",
            output.node
        );
        assert!(
            summary["writes"].as_u64().unwrap() > 0,
            "node {} completed no writes",
            output.node
        );
        assert!(
            summary["reads"].as_u64().unwrap() > 0,
            "node {} completed no reads",
            output.node
        );
    }
}

/// Whether this process runs as root (needed to create network namespaces).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0"))
}

/// Network namespaces joined by a bridge, torn down on drop.
#[derive(Debug)]
pub struct Namespaces {
    pub names: Vec<String>,
    bridge: String,
    veths: Vec<String>,
}

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|status| status.success())
}

impl Namespaces {
    pub fn create(count: usize) -> Option<Namespaces> {
        let id = std::process::id() % 100_000;
        let mut namespaces = Namespaces {
            names: Vec::new(),
            bridge: format!("rzb{id}"),
            veths: Vec::new(),
        };
        if !ip(&["link", "add", &namespaces.bridge, "type", "bridge"]) {
            return None;
        }
        ip(&["link", "set", &namespaces.bridge, "up"]);
        for node in 0..count {
            let name = format!("rzab-{id}-{node}");
            let veth = format!("rzv{id}x{node}");
            let address = format!("10.78.{}.{}/24", id % 200, node + 1);
            let ok = ip(&["netns", "add", &name])
                && ip(&[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
                ])
                && ip(&["link", "set", &veth, "master", &namespaces.bridge, "up"])
                && ip(&["-n", &name, "addr", "add", &address, "dev", "eth0"])
                && ip(&["-n", &name, "link", "set", "eth0", "up"])
                && ip(&["-n", &name, "link", "set", "lo", "up"]);
            namespaces.names.push(name);
            namespaces.veths.push(veth);
            if !ok {
                return None;
            }
        }
        Some(namespaces)
    }

    /// Takes `node`'s link to the bridge down or up again, as a pulled cable would.
    pub fn set_link(&self, node: usize, up: bool) {
        assert!(
            ip(&[
                "link",
                "set",
                &self.veths[node],
                if up { "up" } else { "down" }
            ]),
            "ip link set {} failed",
            self.veths[node]
        );
    }

    pub fn host(&self, node: usize) -> String {
        format!(
            "10.78.{}.{}",
            (std::process::id() % 100_000) % 200,
            node + 1
        )
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for (name, veth) in self.names.iter().zip(&self.veths) {
            ip(&["netns", "del", name]);
            ip(&["link", "del", veth]);
        }
        ip(&["link", "del", &self.bridge]);
    }
}

impl NodeProcess {
    /// Starts `rzab-dataplane --node N` behind a command prefix (for example
    /// `ip netns exec NAME`, which execs the binary, so the pid stays the data plane's).
    pub fn start_with_prefix(prefix: &[String], node: u8, args: &[String]) -> NodeProcess {
        let binary = binary("rzab-dataplane");
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("--node")
            .arg(node.to_string())
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .env(SECRET_ENV, test_secret_file())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        NodeProcess {
            node,
            child: Some(child),
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would, and reaps it.
    pub fn crash(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the process to stop (SIGTERM); collect it with [`NodeProcess::finish`].
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal named `name` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status();
        }
    }
}

/// Attaches to a node's control block once its data plane runs (waits up to 30 s).
pub fn attach_running(path: &std::path::Path) -> rzab_shared::AttachedControlBlock {
    attach_running_instance(path, None)
}

/// The data-plane instance a control block belongs to.
pub fn instance_of(block: &rzab_shared::AttachedControlBlock) -> u64 {
    block
        .header
        .instance
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Like [`attach_running`], but for a data plane other than instance `not` (a restarted
/// process: the block its killed predecessor left may still be at the path for a moment).
pub fn attach_running_instance(
    path: &std::path::Path,
    not: Option<u64>,
) -> rzab_shared::AttachedControlBlock {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(block) = rzab_shared::AttachedControlBlock::attach(path) {
            if block.lifecycle() == rzab_shared::Lifecycle::Running
                && Some(instance_of(&block)) != not
            {
                return block;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never ran",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

/// The highest zxid a node's workers report as applied.
pub fn applied_zxid(block: &rzab_shared::AttachedControlBlock) -> u64 {
    (0..block.worker_count() as usize)
        .map(|worker| {
            block
                .worker(worker)
                .gauges
                .applied_zxid
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .max()
        .unwrap_or(0)
}

/// The arguments every 3-node test cluster shares: cluster name, 50k keys, 20% writes, 16
/// sessions per worker, a stats line every 500 ms and a 30 s join timeout.
pub fn three_node_args(cluster: &str) -> Vec<String> {
    [
        "--cluster",
        cluster,
        "--nodes",
        "3",
        "--keys",
        "50000",
        "--write-ratio",
        "200",
        "--sessions",
        "16",
        "--knob",
        "stats_interval_ms=500",
        "--join-timeout",
        "30",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect()
}
