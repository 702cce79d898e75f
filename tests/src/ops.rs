//! Support for the operator-facing tests (`tests/tests/operations.rs`): a real memcached on a
//! free loopback port, clusters of real `rzab-dataplane --peers control-plane` and
//! `rzab-controlplane` processes meeting through it, a real Prometheus, a small HTTP/1.1
//! client, a parser for the Prometheus text format, and polling until a condition holds
//! (never a wall-clock assertion).
//!
//! Touches: the processes it starts (each killed on drop, and by the kernel if the test thread
//! dies first: `PR_SET_PDEATHSIG`), loopback ports, temporary directories, and the control
//! blocks and fabric of the clusters it names in `/dev/shm`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{NodeOutput, binary, cleanup};

/// Generous bound for anything that should happen "soon"; a test only fails when it passes.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The memcached binary of the Debian package.
pub const MEMCACHED: &str = "/usr/bin/memcached";
/// The Prometheus binary of the Debian package.
pub const PROMETHEUS: &str = "/usr/bin/prometheus";

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Polls `condition` every 50 ms until it holds; panics after [`PATIENCE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on loopback (bound once, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free loopback address.
pub fn free_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Whether something accepts connections at `address`.
pub fn listening(address: SocketAddr) -> bool {
    TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
}

/// Makes the kernel SIGKILL the child when the thread that started it ends, so a test that
/// panics past its guards still leaves nothing behind.
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and calls only prctl, which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// Sends a signal to a process (or, with a negative id, a process group).
pub fn signal(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) takes plain integers and touches no memory.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The live processes whose command line contains every one of `needles`.
pub fn processes_mentioning(needles: &[&str]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|bytes| {
                let line = String::from_utf8_lossy(&bytes).replace('\0', " ");
                needles.iter().all(|needle| line.contains(needle))
            })
        })
        .filter(|pid| process_alive(*pid))
        .collect()
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Guarded {
    pub child: Child,
    pub log: PathBuf,
}

impl Guarded {
    /// Starts `command` with stdout and stderr going to `log`.
    pub fn spawn(mut command: Command, log: &Path) -> Guarded {
        let file = std::fs::File::create(log).unwrap();
        let child = die_with_parent(&mut command)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {command:?}: {error}"));
        Guarded {
            child,
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash would; reaps the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit; true if it exited successfully.
    pub fn terminate(&mut self) -> bool {
        signal(i32::try_from(self.pid()).unwrap(), libc::SIGTERM);
        self.child.wait().is_ok_and(|status| status.success())
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A memcached on a free loopback port.
#[derive(Debug)]
pub struct Memcached {
    pub port: u16,
    process: Guarded,
}

impl Memcached {
    pub fn start(dir: &Path) -> Memcached {
        assert!(
            Path::new(MEMCACHED).exists(),
            "{MEMCACHED} not found: install it (apt-get install memcached, or run scripts/test.sh)"
        );
        let port = free_port();
        let mut command = Command::new(MEMCACHED);
        command.args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0"]);
        command.args(["-m", "16", "-t", "1"]);
        if is_root() {
            command.args(["-u", "root"]);
        }
        let process = Guarded::spawn(command, &dir.join(format!("memcached-{port}.log")));
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until("memcached accepts connections", || listening(address));
        Memcached { port, process }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The value of a key, read with the text protocol.
    pub fn get(&self, key: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "get {key}\r\n").ok()?;
        let mut reply = Vec::new();
        let mut buffer = [0u8; 4096];
        while !reply.ends_with(b"END\r\n") {
            let read = stream.read(&mut buffer).ok()?;
            if read == 0 {
                break;
            }
            reply.extend_from_slice(&buffer[..read]);
        }
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let (header, rest) = reply.split_once("\r\n")?;
        header
            .starts_with("VALUE ")
            .then(|| rest.strip_suffix("\r\nEND\r\n").unwrap_or(rest).to_owned())
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
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
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

/// One HTTP/1.1 request over a fresh connection; `None` when nothing answers.
pub fn try_http(
    address: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Option<Reply> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, rest) = response.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("transfer-encoding") && value.trim() == "chunked"
        })
    });
    let body = if chunked {
        decode_chunked(rest)
    } else {
        rest.to_owned()
    };
    Some(Reply { status, body })
}

/// [`try_http`] with a JSON body; panics when nothing answers.
pub fn http(address: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    try_http(address, method, path, "application/json", body)
        .unwrap_or_else(|| panic!("no answer from {address} to {method} {path}"))
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(byte));
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// One sample of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text exposition format (label values without escaped quotes suffice here).
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap();
                    let labels = inner
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair.split_once('=').unwrap();
                            (key.to_owned(), value.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                other => other.parse().unwrap(),
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Metrics { samples }
    }

    /// The sum of a family's samples whose labels include every `(key, value)` given.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|sample| sample.name == name)
            .filter(|sample| {
                labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
            })
            .map(|sample| sample.value)
            .sum()
    }

    /// Whether the family has any sample.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|sample| sample.name == name)
    }
}

/// How to start a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub label: &'static str,
    pub nodes: u8,
    pub workers: u8,
    /// Writes in per-mille.
    pub write_ratio: u32,
    /// Extra data-plane arguments.
    pub extra: Vec<String>,
}

impl ClusterSpec {
    pub fn new(label: &'static str) -> ClusterSpec {
        ClusterSpec {
            label,
            nodes: 3,
            workers: 1,
            write_ratio: 200,
            extra: Vec::new(),
        }
    }
}

/// One node's control plane.
#[derive(Debug)]
pub struct ControlPlane {
    pub node: u8,
    pub address: SocketAddr,
    arguments: Vec<String>,
    pub process: Option<Guarded>,
    restarts: u32,
    dir: PathBuf,
}

impl ControlPlane {
    fn spawn(&mut self) {
        let mut command = Command::new(binary("rzab-controlplane"));
        command
            .args(&self.arguments)
            .args(["--listen", &self.address.to_string()]);
        let log = self
            .dir
            .join(format!("controlplane-{}.{}.log", self.node, self.restarts));
        self.restarts += 1;
        self.process = Some(Guarded::spawn(command, &log));
        wait_until(&format!("control plane {} listens", self.node), || {
            listening(self.address) || !self.process.as_mut().unwrap().running()
        });
        let process = self.process.as_mut().unwrap();
        assert!(
            process.running(),
            "control plane {} exited:\n{}",
            self.node,
            process.output()
        );
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts it again with the same arguments and address.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Guarded::pid)
    }

    pub fn get(&self, path: &str) -> Reply {
        http(self.address, "GET", path, "")
    }

    pub fn status(&self) -> serde_json::Value {
        self.get("/v1/status").json()
    }

    pub fn metrics(&self) -> Metrics {
        let reply = self.get("/metrics");
        assert_eq!(reply.status, 200, "{}", reply.body);
        Metrics::parse(&reply.body)
    }

    /// PATCH /v1/knobs with a raw body and an optional query string.
    pub fn patch_knobs(&self, query: &str, body: &str) -> Reply {
        http(self.address, "PATCH", &format!("/v1/knobs{query}"), body)
    }

    /// The knob values and epoch this node reports.
    pub fn knobs(&self) -> (BTreeMap<String, serde_json::Value>, serde_json::Value) {
        let reply = self.get("/v1/knobs").json();
        let values = reply["knobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|knob| {
                (
                    knob["name"].as_str().unwrap().to_owned(),
                    knob["value"].clone(),
                )
            })
            .collect();
        (values, reply["epoch"].clone())
    }

    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .map(Guarded::output)
            .unwrap_or_default()
    }
}

/// A cluster of real processes: per node a data plane (`--peers control-plane`) and a control
/// plane, meeting through a memcached. Everything is killed and the cluster's /dev/shm files
/// removed on drop.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub generation: String,
    pub spec: ClusterSpec,
    pub data_planes: Vec<Option<Guarded>>,
    pub control_planes: Vec<ControlPlane>,
}

/// A generation unique to this process and moment.
pub fn fresh_generation(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{label}-{}-{nanos}", std::process::id())
}

impl Cluster {
    /// Starts a cluster named after the spec's label with a fresh generation.
    pub fn start(spec: ClusterSpec, registry: &Memcached, dir: &Path) -> Cluster {
        let generation = fresh_generation(spec.label);
        Cluster::start_with(spec, registry, dir, &generation)
    }

    /// Starts a cluster with the given generation.
    pub fn start_with(
        spec: ClusterSpec,
        registry: &Memcached,
        dir: &Path,
        generation: &str,
    ) -> Cluster {
        let name = crate::cluster_name(spec.label);
        cleanup(&name, spec.nodes);
        let mut cluster = Cluster {
            name: name.clone(),
            generation: generation.to_owned(),
            spec: spec.clone(),
            data_planes: Vec::new(),
            control_planes: Vec::new(),
        };
        for node in 0..spec.nodes {
            let mut command = Command::new(binary("rzab-dataplane"));
            command
                .args(["--cluster", &name, "--node", &node.to_string()])
                .args(["--nodes", &spec.nodes.to_string()])
                .args(["--workers", &spec.workers.to_string()])
                .args(["--peers", "control-plane", "--keys", "50000"])
                .args(["--sessions", "16", "--join-timeout", "60"])
                .args(["--write-ratio", &spec.write_ratio.to_string()])
                .args(["--knob", "stats_interval_ms=1000"])
                .args(["--run-id", generation])
                .args(&spec.extra)
                .env("RUST_BACKTRACE", "0")
                .env(crate::SECRET_ENV, crate::test_secret_file());
            let log = dir.join(format!("{name}-dataplane-{node}.log"));
            cluster
                .data_planes
                .push(Some(Guarded::spawn(command, &log)));
            let arguments = [
                "--cluster",
                &name,
                "--node",
                &node.to_string(),
                "--registry",
                &registry.address(),
                "--generation",
                generation,
                "--poll-ms",
                "20",
            ]
            .iter()
            .map(|argument| (*argument).to_owned())
            .collect();
            let mut control_plane = ControlPlane {
                node,
                address: free_address(),
                arguments,
                process: None,
                restarts: 0,
                dir: dir.join(format!("{name}-cp")),
            };
            std::fs::create_dir_all(&control_plane.dir).unwrap();
            control_plane.spawn();
            cluster.control_planes.push(control_plane);
        }
        cluster
    }

    /// Waits until every control plane is ready and reports its data plane running.
    pub fn wait_running(&mut self) {
        for node in 0..usize::from(self.spec.nodes) {
            let what = format!("node {node} of {} runs", self.name);
            let deadline = Instant::now() + PATIENCE;
            loop {
                let status = self.control_planes[node].status();
                if status["registry"]["state"] == "ready"
                    && status["lifecycle"] == "running"
                    && status["dataplane"]["up"] == true
                {
                    break;
                }
                let data_plane = self.data_planes[node].as_mut().unwrap();
                assert!(
                    data_plane.running(),
                    "the data plane of node {node} exited:\n{}",
                    data_plane.output()
                );
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting until {what}: {status}\ncontrol plane log:\n{}",
                    self.control_planes[node].log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn control_plane(&self, node: u8) -> &ControlPlane {
        &self.control_planes[usize::from(node)]
    }

    pub fn metrics(&self, node: u8) -> Metrics {
        self.control_plane(node).metrics()
    }

    /// The control-block path of a node.
    pub fn block_path(&self, node: u8) -> PathBuf {
        PathBuf::from(format!("/dev/shm/rzab-{}-n{node}", self.name))
    }

    /// Waits until every node has applied at least `writes` more writes than now.
    pub fn wait_for_writes(&self, writes: f64) {
        for node in 0..self.spec.nodes {
            let start = self.metrics(node).sum("rzab_writes_applied_total", &[]);
            wait_until(&format!("node {node} applies {writes} writes"), || {
                self.metrics(node).sum("rzab_writes_applied_total", &[]) >= start + writes
            });
        }
    }

    /// Stops the data planes with SIGTERM and returns what they printed.
    pub fn stop_data_planes(&mut self) -> Vec<NodeOutput> {
        for data_plane in self.data_planes.iter().flatten() {
            signal(i32::try_from(data_plane.pid()).unwrap(), libc::SIGTERM);
        }
        let mut outputs = Vec::new();
        for (node, slot) in self.data_planes.iter_mut().enumerate() {
            let mut process = slot.take().unwrap();
            let status = process.child.wait().unwrap();
            let stdout = process.output();
            let summary = stdout
                .lines()
                .find_map(|line| line.strip_prefix("summary "))
                .and_then(|json| serde_json::from_str(json).ok());
            outputs.push(NodeOutput {
                node: u8::try_from(node).unwrap(),
                success: status.success(),
                stdout,
                stderr: String::new(),
                summary,
            });
        }
        outputs
    }

    /// SIGKILLs every process of the cluster (records stay in the registry).
    pub fn crash(&mut self) {
        for control_plane in &mut self.control_planes {
            control_plane.kill();
        }
        for process in self.data_planes.iter_mut().flatten() {
            process.kill();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.crash();
        cleanup(&self.name, self.spec.nodes);
    }
}

/// A Prometheus server with its own configuration and storage, killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    pub address: SocketAddr,
    process: Guarded,
}

impl Prometheus {
    /// Starts Prometheus with the configuration text `config` in `dir`.
    pub fn start(dir: &Path, config: &str) -> Prometheus {
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let address = free_address();
        let mut command = Command::new(PROMETHEUS);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn");
        let mut process = Guarded::spawn(command, &dir.join("prometheus.log"));
        wait_until("prometheus is ready", || {
            assert!(
                process.running(),
                "prometheus exited:\n{}",
                process.output()
            );
            try_http(address, "GET", "/-/ready", "text/plain", "")
                .is_some_and(|reply| reply.status == 200)
        });
        Prometheus { address, process }
    }

    /// An instant query through the HTTP API: the `data.result` array.
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let body = format!("query={}", form_encode(expr));
        let reply = try_http(
            self.address,
            "POST",
            "/api/v1/query",
            "application/x-www-form-urlencoded",
            &body,
        )
        .unwrap_or_else(|| panic!("prometheus did not answer:\n{}", self.process.output()));
        let json = reply.json();
        assert_eq!(json["status"], "success", "query `{expr}`: {json}");
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The scrape targets' health, by scrape URL.
    pub fn targets(&self) -> BTreeMap<String, String> {
        let reply = http(self.address, "GET", "/api/v1/targets", "").json();
        reply["data"]["activeTargets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|target| {
                (
                    target["scrapeUrl"].as_str().unwrap().to_owned(),
                    target["health"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}
