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

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{
    FakeDataPlane, Memcached, Peers, free_port, generation, http, raise_open_files, shm_address,
    wait_until,
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
        Self::spawn_limited(dir, name, arguments, None)
    }

    /// Spawns with RLIMIT_NOFILE (soft and hard) set to `open_files`, if given.
    fn spawn_limited(
        dir: &Path,
        name: &str,
        arguments: &[String],
        open_files: Option<u64>,
    ) -> Process {
        let port = free_port();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut command = Command::new(BINARY);
        // SAFETY: only prctl (async-signal-safe) runs between fork and exec; the kernel kills
        // the control plane if this test process dies without running Drop.
        // setrlimit is async-signal-safe too.
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(files) = open_files {
                    let limit = libc::rlimit {
                        rlim_cur: files,
                        rlim_max: files,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
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

    /// Sends SIGTERM.
    fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0);
    }

    /// Waits for the exit, up to `bound`; None if it is still running then.
    fn wait_exit(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// `--inspect` as a person would run it.
fn inspect(block: &Path) -> serde_json::Value {
    let output = Command::new(BINARY)
        .args(["--inspect", "--block", block.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Issue 14, finding 2: after its control plane is SIGKILLed, the block still names its pid;
/// `--inspect` must say that process is not alive.
#[test]
fn inspect_says_whether_the_recorded_processes_are_alive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("block");
    let data_plane = FakeDataPlane::start(&path, "alive", 0, 1, WORKERS, 0, Peers::Static);
    // No registry is needed for the attachment; nothing listens on this port.
    let registry = format!("127.0.0.1:{}", free_port());
    let mut process = Process::spawn(
        dir.path(),
        "cp",
        &arguments("alive", &generation("alive"), 0, &path, &registry),
    );
    let pid = process.child.id();
    wait_until("the control plane announces itself in the block", || {
        data_plane
            .block
            .header
            .controlplane_pid
            .load(Ordering::Relaxed)
            == pid
    });
    let inspected = inspect(&path);
    assert_eq!(inspected["controlplane"]["pid"], pid);
    assert_eq!(inspected["controlplane"]["alive"], true, "{inspected}");
    assert_eq!(inspected["dataplane"]["pid"], std::process::id());
    assert_eq!(inspected["dataplane"]["alive"], true, "{inspected}");

    process.child.kill().unwrap();
    process.child.wait().unwrap();
    let inspected = inspect(&path);
    assert_eq!(
        inspected["controlplane"]["pid"], pid,
        "the pid stays recorded"
    );
    assert_eq!(inspected["controlplane"]["alive"], false, "{inspected}");

    // A data plane whose heartbeat stops (hung, or gone) is not alive either.
    data_plane.alive.store(false, Ordering::Relaxed);
    wait_until("the data plane is reported dead", || {
        inspect(&path)["dataplane"]["alive"] == false
    });
}

/// Sends half a request (headers never finished) on a fresh connection.
fn stalled_connection(address: SocketAddr) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .write_all(b"PATCH /v1/knobs HTTP/1.1\r\nHost: x\r\nContent-Le")
        .unwrap();
    stream
}

/// Issue 14, finding 3: SIGTERM ends the control plane within its shutdown grace even while a
/// client that sent half a request is connected (the header timeout is set far beyond the
/// bound, so only the grace can end that connection).
#[test]
fn sigterm_exits_within_the_grace_with_a_stalled_client_connected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("block");
    let _data_plane = FakeDataPlane::start(&path, "term", 0, 1, WORKERS, 0, Peers::Static);
    let registry = format!("127.0.0.1:{}", free_port());
    let mut command = arguments("term", &generation("term"), 0, &path, &registry);
    command.extend(
        [
            "--header-timeout-ms",
            "600000",
            "--shutdown-grace-ms",
            "500",
        ]
        .map(str::to_owned),
    );
    let mut process = Process::spawn(dir.path(), "cp", &command);
    wait_until("the control plane answers", || process.status().is_some());
    let stalled = stalled_connection(process.address);
    // The server has the connection (a request behind it on another connection is answered).
    assert!(process.status().is_some());
    process.terminate();
    let exit = process.wait_exit(Duration::from_secs(15));
    let exit =
        exit.unwrap_or_else(|| panic!("still running 15 s after SIGTERM: {}", process.log()));
    assert!(exit.success(), "{exit:?}: {}", process.log());
    drop(stalled);
}

/// Issue 14, finding 3: a flood of stalled connections, more than the control plane has file
/// descriptors for, must not stop /v1/status from answering: a new connection displaces the
/// one that has waited longest for its headers.
#[test]
fn many_stalled_connections_do_not_stop_status_answering() {
    const OPEN_FILES: u64 = 256;
    const STALLED: usize = 2_000;
    let have = raise_open_files(STALLED as u64 + 256);
    assert!(
        have >= STALLED as u64 + 256,
        "this test needs {} open files, the hard limit allows {have}",
        STALLED + 256
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("block");
    let _data_plane = FakeDataPlane::start(&path, "flood", 0, 1, WORKERS, 0, Peers::Static);
    let registry = format!("127.0.0.1:{}", free_port());
    let mut command = arguments("flood", &generation("flood"), 0, &path, &registry);
    // Stalled connections would otherwise be closed by the header timeout before the status
    // request: this test is about the limit.
    command.extend(["--header-timeout-ms", "600000"].map(str::to_owned));
    let process = Process::spawn_limited(dir.path(), "cp", &command, Some(OPEN_FILES));
    wait_until("the control plane answers", || process.status().is_some());
    let stalled: Vec<std::net::TcpStream> = (0..STALLED)
        .map(|_| stalled_connection(process.address))
        .collect();
    for round in 0..3 {
        let mut stream = std::net::TcpStream::connect(process.address).unwrap();
        // A bound, not a speed requirement: without the limit the request is never accepted.
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(
            stream,
            "GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let reply = common::read_reply(&mut stream);
        assert_eq!(reply.status, 200, "round {round}: {}", reply.body);
        assert_eq!(reply.json()["attached"], true);
    }
    assert!(
        process.log().contains("lowered to fit the open-file limit"),
        "{}",
        process.log()
    );
    drop(stalled);
}
