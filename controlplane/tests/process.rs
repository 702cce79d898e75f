//! The `rzab-controlplane` binary as separate processes: two control planes started before
//! their data planes exist wait for the blocks, exchange endpoints through a real memcached
//! and reach ready; one is killed (SIGKILL) and started again, re-attaches and carries on
//! without disturbing its data plane; SIGTERM stops them cleanly. Also the one-shot modes.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; test numbers are small"
)]

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;

use common::{
    FakeDataPlane, Memcached, Peers, free_port, generation, http, shm_address, wait_until,
};
use rzab_shared::Lifecycle;

const BINARY: &str = env!("CARGO_BIN_EXE_rzab-controlplane");
const WORKERS: u32 = 2;

struct Process {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
}

impl Process {
    fn spawn(dir: &Path, name: &str, arguments: &[String]) -> Process {
        let port = free_port();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut command = Command::new(BINARY);
        // SAFETY: only prctl (async-signal-safe) runs between fork and exec; the kernel kills
        // the control plane if this test process dies without running Drop.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .args(arguments)
            .args(["--listen", &address.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process {
            child,
            address,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> Option<serde_json::Value> {
        std::net::TcpStream::connect(self.address).ok()?;
        Some(http(self.address, "GET", "/v1/status", None).json())
    }

    fn wait_ready(&self) {
        wait_until(&format!("{} is ready", self.address), || {
            self.status()
                .is_some_and(|status| status["registry"]["state"] == "ready")
        });
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn arguments(cluster: &str, run: &str, node: u32, block: &Path, registry: &str) -> Vec<String> {
    [
        "--cluster",
        cluster,
        "--generation",
        run,
        "--node",
        &node.to_string(),
        "--block",
        block.to_str().unwrap(),
        "--registry",
        registry,
        "--poll-ms",
        "20",
    ]
    .iter()
    .map(|argument| (*argument).to_owned())
    .collect()
}

#[test]
fn killed_control_plane_restarts_reattaches_and_carries_on() {
    let memcached = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let cluster = "proc";
    let run = generation("proc");
    let paths: Vec<PathBuf> = (0..2)
        .map(|node| dir.path().join(format!("n{node}")))
        .collect();
    let mut processes: Vec<Process> = (0..2u32)
        .map(|node| {
            Process::spawn(
                dir.path(),
                &format!("cp{node}"),
                &arguments(
                    cluster,
                    &run,
                    node,
                    &paths[node as usize],
                    &memcached.address(),
                ),
            )
        })
        .collect();
    // The control planes wait for blocks that do not exist yet, and say so.
    for process in &processes {
        wait_until("the control plane answers", || {
            process
                .status()
                .is_some_and(|status| status["attached"] == false)
        });
    }
    let data_planes: Vec<FakeDataPlane> = (0..2u32)
        .map(|node| {
            FakeDataPlane::start(
                &paths[node as usize],
                cluster,
                node,
                2,
                WORKERS,
                0,
                Peers::ControlPlane,
            )
        })
        .collect();
    for process in &processes {
        process.wait_ready();
    }
    assert!(
        processes[0].log().contains("waiting for the control block"),
        "{}",
        processes[0].log()
    );
    for data_plane in &data_planes {
        assert_eq!(data_plane.peers_generation(), 1);
        wait_until("the fake data plane runs", || {
            data_plane.block.lifecycle() == Lifecycle::Running
        });
    }
    let block0 = &data_planes[0].block;
    assert_eq!(
        block0.header.controlplane_pid.load(Ordering::Relaxed),
        processes[0].child.id()
    );

    // SIGKILL node 0's control plane: its data plane is unaffected.
    processes[0].child.kill().unwrap();
    processes[0].child.wait().unwrap();
    assert_eq!(block0.lifecycle(), Lifecycle::Running);
    assert_eq!(
        data_planes[0].remote(1, 1),
        Some(shm_address(1, 1, WORKERS, 0))
    );

    // Started again, it re-attaches, finds the table already in place, and is ready.
    processes[0] = Process::spawn(
        dir.path(),
        "cp0-again",
        &arguments(cluster, &run, 0, &paths[0], &memcached.address()),
    );
    let new_pid = processes[0].child.id();
    wait_until(
        "the new control plane announces itself in the block",
        || block0.header.controlplane_pid.load(Ordering::Relaxed) == new_pid,
    );
    let heartbeat = block0
        .header
        .controlplane_heartbeat_ns
        .load(Ordering::Relaxed);
    wait_until("its heartbeat advances", || {
        block0
            .header
            .controlplane_heartbeat_ns
            .load(Ordering::Relaxed)
            > heartbeat
    });
    processes[0].wait_ready();
    assert_eq!(
        data_planes[0].peers_generation(),
        1,
        "no needless re-resolve"
    );
    let status = processes[0].status().unwrap();
    assert_eq!(status["attached"], true);
    assert_eq!(status["controlplane"]["pid"], new_pid);
    assert_eq!(status["peers"][0]["known"], true);
    let health = http(processes[0].address, "GET", "/healthz", None);
    assert_eq!(health.status, 200, "{}", health.body);

    // SIGTERM: a clean exit.
    for process in &mut processes {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let sent = unsafe { libc::kill(process.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0);
        let exit = process.child.wait().unwrap();
        assert!(exit.success(), "{exit:?}: {}", process.log());
    }
}

#[test]
fn one_shot_modes_print_and_exit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("block");
    let data_plane = FakeDataPlane::start(&path, "oneshot", 1, 2, WORKERS, 0, Peers::Static);
    let output = Command::new(BINARY)
        .args(["--inspect", "--block", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let inspected: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(inspected["cluster"], "oneshot");
    assert_eq!(inspected["node"], 1);
    assert_eq!(inspected["workers"], WORKERS);
    assert_eq!(inspected["knobs"]["prepare_batch"], 16);
    assert_eq!(
        inspected["instance"],
        format!("{:016x}", data_plane.instance())
    );

    let output = Command::new(BINARY)
        .args([
            "--inspect",
            "--block",
            dir.path().join("missing").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing"));

    let output = Command::new(BINARY).arg("--openapi").output().unwrap();
    assert!(output.status.success());
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), checked_in);

    // Serving needs a node.
    let output = Command::new(BINARY).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--node"));
}
