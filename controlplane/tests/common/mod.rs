//! Helpers shared by the control plane's integration tests: a real memcached on a free
//! loopback port, a fake data plane (a control block created with `OwnedControlBlock::create`
//! whose endpoints, lifecycle, heartbeat and knob confirmations a thread maintains), a tiny
//! HTTP/1.1 client, and polling until a condition holds (never a wall-clock assertion).

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "each test file uses a subset; a test fails by panicking; test numbers are small"
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;
use rzab_controlplane::{Config, Options};
use rzab_shared::{ControlBlockInit, EndpointAddress, Lifecycle, OwnedControlBlock, TransportKind};

/// Generous bound for anything that should happen "soon"; tests only fail when it passes.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A free TCP port on loopback (bound once, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A memcached child process on 127.0.0.1, killed on drop.
pub struct Memcached {
    pub port: u16,
    child: Option<Child>,
}

pub const MEMCACHED: &str = "/usr/bin/memcached";

impl Memcached {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        assert!(
            Path::new(MEMCACHED).exists(),
            "{MEMCACHED} not found: install it (apt-get install memcached)"
        );
        let mut command = Command::new(MEMCACHED);
        command.args([
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-m",
            "16",
            "-t",
            "1",
        ]);
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } == 0 {
            command.args(["-u", "root"]);
        }
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe; it makes the kernel kill memcached if this test process dies
        // without running Drop (a crash must not leave servers behind).
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let memcached = Memcached {
            port,
            child: Some(child),
        };
        wait_until("memcached accepts connections", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        memcached
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Raises this process's soft open-file limit to at least `wanted` (up to the hard limit);
/// returns the soft limit in force.
pub fn raise_open_files(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
    limit.rlim_cur
}

/// Polls `condition` every 20 ms until it holds; panics after [`PATIENCE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The async version of [`wait_until`], for tests running control planes in-process.
pub async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a fake data plane behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peers {
    /// Like `--peers static`: running at once.
    Static,
    /// Like `--peers control-plane`: running once peers_generation > 0.
    ControlPlane,
}

/// A control block with a thread that plays the data plane's part of the handshake.
pub struct FakeDataPlane {
    pub block: Arc<OwnedControlBlock>,
    pub path: PathBuf,
    stop: Arc<AtomicBool>,
    /// While false, the fake stops beating its heartbeat (a hung data plane).
    pub alive: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Shm port of a node's worker, shifted by `offset` so restarts get new endpoints.
pub fn shm_address(node: u32, worker: u32, workers: u32, offset: u32) -> EndpointAddress {
    EndpointAddress::Shm {
        port: offset + node * workers + worker,
    }
}

impl FakeDataPlane {
    pub fn start(
        path: &Path,
        cluster: &str,
        node: u32,
        nodes: u32,
        workers: u32,
        offset: u32,
        peers: Peers,
    ) -> Self {
        let block = Arc::new(
            OwnedControlBlock::create(
                path,
                &ControlBlockInit {
                    cluster: cluster.to_owned(),
                    node_id: node,
                    node_count: nodes,
                    worker_count: workers,
                    transport: TransportKind::Shm,
                },
            )
            .unwrap(),
        );
        for worker in 0..workers {
            block
                .worker(worker as usize)
                .local_endpoint
                .store(Some(&shm_address(node, worker, workers, offset)));
            // As a cluster that has just started: node 0 leads, in epoch 1.
            block.worker(worker as usize).gauges.set_leader(Some(0), 1);
        }
        block.handshake.endpoints_published.store(
            block.header.instance.load(Ordering::Relaxed),
            Ordering::Release,
        );
        block.set_lifecycle(Lifecycle::WaitingForPeers);
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let thread = {
            let block = Arc::clone(&block);
            let stop = Arc::clone(&stop);
            let alive = Arc::clone(&alive);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if alive.load(Ordering::Relaxed) {
                        block.dataplane_heartbeat();
                        let running = peers == Peers::Static
                            || block.handshake.peers_generation.load(Ordering::Acquire) > 0;
                        if running && block.lifecycle() == Lifecycle::WaitingForPeers {
                            block.set_lifecycle(Lifecycle::Running);
                        }
                        if block.lifecycle() == Lifecycle::Running {
                            let epoch = block.knob_epoch();
                            for worker in 0..workers {
                                block
                                    .worker(worker as usize)
                                    .gauges
                                    .knob_epoch_seen
                                    .store(epoch, Ordering::Release);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        FakeDataPlane {
            block,
            path: path.to_owned(),
            stop,
            alive,
            thread: Some(thread),
        }
    }

    pub fn instance(&self) -> u64 {
        self.block.header.instance.load(Ordering::Relaxed)
    }

    pub fn peers_generation(&self) -> u64 {
        self.block
            .handshake
            .peers_generation
            .load(Ordering::Acquire)
    }

    pub fn remote(&self, node: u32, worker: u32) -> Option<EndpointAddress> {
        self.block.remote[node as usize][worker as usize].load()
    }

    /// Stops the thread and drops the block (lifecycle Stopped), like an exiting data plane.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for FakeDataPlane {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A control plane's config, as its command line would give it.
pub fn config(cluster: &str, generation: &str, node: u32, block: &Path, registry: &str) -> Config {
    Options::try_parse_from([
        "rzab-controlplane",
        "--cluster",
        cluster,
        "--generation",
        generation,
        "--node",
        &node.to_string(),
        "--block",
        block.to_str().unwrap(),
        "--registry",
        registry,
        "--listen",
        "127.0.0.1:0",
        "--poll-ms",
        "20",
    ])
    .unwrap()
    .config()
    .unwrap()
}

/// A unique-enough generation for one test.
pub fn generation(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// A response: status code, content type, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.body))
    }
}

fn decode_chunked(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = body.split_once("\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// One HTTP/1.1 request over a fresh connection (blocking), with a JSON Content-Type.
pub fn http(address: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    http_with(address, method, path, Some("application/json"), body)
}

/// One HTTP/1.1 request over a fresh connection (blocking) with the Content-Type given (none
/// if `None`).
pub fn http_with(
    address: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Option<&str>,
) -> Reply {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.unwrap_or("");
    let content_type = content_type
        .map(|value| format!("Content-Type: {value}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    read_reply(&mut stream)
}

/// Reads a whole response (the server closes the connection after it).
pub fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, rest) = response.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut content_type = String::new();
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        match name.to_ascii_lowercase().as_str() {
            "content-type" => content_type = value.trim().to_owned(),
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let body = if chunked {
        decode_chunked(rest)
    } else {
        rest.to_owned()
    };
    Reply {
        status,
        content_type,
        body,
    }
}

/// [`http`] from async code, off the runtime's worker threads.
pub async fn request(address: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    let method = method.to_owned();
    let path = path.to_owned();
    let body = body.map(str::to_owned);
    tokio::task::spawn_blocking(move || http(address, &method, &path, body.as_deref()))
        .await
        .unwrap()
}

/// GET a JSON document.
pub async fn get_json(address: SocketAddr, path: &str) -> serde_json::Value {
    request(address, "GET", path, None).await.json()
}

/// The registry state a control plane reports.
pub async fn registry_state(address: SocketAddr) -> String {
    get_json(address, "/v1/status").await["registry"]["state"]
        .as_str()
        .unwrap()
        .to_owned()
}
