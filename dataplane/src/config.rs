//! The data plane's configuration: command-line options (each documented in `--help`), an
//! optional TOML file whose keys are the long option names, and the checks that turn an
//! inconsistent configuration into a clear error before anything starts.
//!
//! Touches only the configuration file it is pointed at, and the cluster secret file.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use rzab_shared::TransportKind;
use rzab_shared::knobs::{Knob, KnobError};
use rzab_shared::limits::{MAX_NODES, MAX_SESSIONS_PER_WORKER, MAX_WORKERS};

use crate::store::MAX_VALUE_SIZE;
use crate::workload::KeyDistribution;
use crate::zab::wire::{Integrity, run_tag};

/// Where peers' endpoints come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PeerDiscovery {
    /// Derived from the configuration (shm ports and udp addresses are deterministic).
    Static,
    /// Written into the control block by rzab-controlplane from the registry.
    ControlPlane,
}

/// What a follower does when it has fallen further behind the leader than the leader keeps
/// prepares for (it was silent, stopped or descheduled, for longer than the leader waits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnFallBehind {
    /// Start again as a new process (same pid, same arguments), which catches up by snapshot.
    Rejoin,
    /// Exit with an error, for a supervisor to restart.
    Exit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Distribution {
    Uniform,
    Zipf,
}

/// rzab-dataplane: one node of an rzab cluster (ZAB over UD datagrams).
#[derive(Clone, Debug, Parser)]
#[command(version, about, args_override_self = true)]
pub struct Options {
    /// TOML file of options (keys are the long option names, e.g. `workers = 2`); options
    /// given on the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Cluster name: namespaces the control block, the shm fabric and the datagrams.
    #[arg(long, default_value = "rzab")]
    pub cluster: String,
    /// This node's id; node 0 is the leader.
    #[arg(long)]
    pub node: u8,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: u8,
    /// Worker threads (pipelines) per node; must be equal on every node.
    #[arg(long, default_value_t = 1)]
    pub workers: u8,
    /// Emulated client sessions per worker.
    #[arg(long, default_value_t = 32)]
    pub sessions: usize,
    /// Transport: shm (shared-memory fabric, one host), udp (kernel UDP), verbs (RDMA UD).
    #[arg(long, default_value = "shm")]
    pub transport: TransportKind,
    /// shm: fabric name (defaults to the cluster name).
    #[arg(long)]
    pub fabric: Option<String>,
    /// shm: directory of the fabric file (/dev/shm, or a hugetlbfs mount).
    #[arg(long, default_value = "/dev/shm")]
    pub shm_dir: PathBuf,
    /// udp: the address of every node, by node id, comma-separated (default: 127.0.0.1 for all).
    #[arg(long, value_delimiter = ',')]
    pub udp_hosts: Vec<Ipv4Addr>,
    /// udp: worker w of node n uses port base + n * workers + w.
    #[arg(long, default_value_t = 40_000)]
    pub udp_port_base: u16,
    /// udp: multicast group of pipeline w is this address + w.
    #[arg(long, default_value = "239.255.0.0")]
    pub multicast_base: Ipv4Addr,
    /// udp: the port of every multicast group.
    #[arg(long, default_value_t = 47_000)]
    pub multicast_port: u16,
    /// verbs: device name as ibv_devinfo shows it (default: the first).
    #[arg(long)]
    pub verbs_device: Option<String>,
    /// verbs: port number.
    #[arg(long, default_value_t = 1)]
    pub verbs_port: u8,
    /// verbs: GID index.
    #[arg(long, default_value_t = 0)]
    pub verbs_gid_index: i32,
    /// Control block path (default /dev/shm/rzab-CLUSTER-nNODE).
    #[arg(long)]
    pub control_block: Option<PathBuf>,
    /// Where peer endpoints come from; verbs needs control-plane.
    #[arg(long, value_enum, default_value = "static")]
    pub peers: PeerDiscovery,
    /// Keys in the store (populated at start).
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 32)]
    pub value_size: usize,
    /// Share of writes, per-mille (a live knob; this is its start value).
    #[arg(long, default_value_t = 50)]
    pub write_ratio: u64,
    /// Key distribution of the emulated clients.
    #[arg(long, value_enum, default_value = "uniform")]
    pub distribution: Distribution,
    /// Zipf exponent when --distribution zipf.
    #[arg(long, default_value_t = 0.99)]
    pub zipf_theta: f64,
    /// busy: spin on dedicated cores; adaptive: yield when idle (several nodes per core).
    #[arg(long, default_value = "adaptive")]
    pub poll_mode: String,
    /// Any live knob's start value, as NAME=VALUE (repeatable), e.g. multicast=false.
    #[arg(long = "knob", value_name = "NAME=VALUE")]
    pub knobs: Vec<String>,
    /// Pin worker w of node n to core (n * workers + w) mod cores: auto pins only when there
    /// are enough cores for every local worker.
    #[arg(long, default_value = "auto")]
    pub pin: String,
    /// Seconds to run (0: until SIGINT or SIGTERM).
    #[arg(long, default_value_t = 0)]
    pub duration: u64,
    /// A follower that fell behind what the leader retains: rejoin as a new process, or exit.
    #[arg(long, value_enum, default_value = "rejoin")]
    pub on_fall_behind: OnFallBehind,
    /// Seconds to wait for every peer before giving up.
    #[arg(long, default_value_t = 60)]
    pub join_timeout: u64,
    /// Prepares a pipeline may have outstanding (power of two).
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// Bytes of the leader's committed-transaction ring (split among the workers): a
    /// follower that lagged by less than it holds is brought back by DIFF (the prepares it
    /// missed), one that lagged by more by a snapshot.
    #[arg(long, default_value_t = crate::zab::DEFAULT_COMMITTED_RING_BYTES)]
    pub committed_ring_bytes: u64,
    /// Seed of the emulated clients' traces.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the stats line as JSON instead of text.
    #[arg(long)]
    pub json_stats: bool,
    /// Record received datagrams, endpoint records and knobs as fuzzing seeds into this
    /// directory at shutdown (see fuzz/capture-corpus.sh). Hidden: a developer's tool.
    #[arg(long, hide = true, env = "RZAB_CAPTURE_CORPUS", value_name = "DIR")]
    pub capture_corpus: Option<PathBuf>,
    /// Testing: drop this percentage of the datagrams this node sends (0-100).
    #[arg(long, default_value_t = 0.0)]
    pub inject_loss: f64,
    /// Testing: send this percentage of datagrams twice (0-100).
    #[arg(long, default_value_t = 0.0)]
    pub inject_duplicate: f64,
    /// Testing: hold back this percentage of datagrams so they arrive out of order (0-100).
    #[arg(long, default_value_t = 0.0)]
    pub inject_reorder: f64,
    // history hook (see crate::history)
    /// Record every worker's client operations and applied writes to
    /// DIR/node{N}-worker{W}.{instance}.hist, for rzab-check-history (off by default).
    #[arg(long, value_name = "DIR")]
    pub history_dir: Option<PathBuf>,
    /// The run this node belongs to: any text, the same on every node of one run of the
    /// cluster and new for each run (the scripts pass the registry generation). Datagrams of
    /// another run are dropped, and the MAC key is derived from it.
    #[arg(long, default_value = "", env = "RZAB_RUN_ID")]
    pub run_id: String,
    /// A file holding the cluster's secret (16 bytes or more, readable by its owner only):
    /// every datagram is then sealed with a keyed MAC (BLAKE3) instead of a CRC32C, so a host
    /// without the secret can neither forge nor replay one. Needed with --transport udp.
    #[arg(long, value_name = "FILE", env = "RZAB_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
}

/// Shortest cluster secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Knob(#[from] KnobError),
    #[error(transparent)]
    Options(#[from] clap::Error),
}

impl Options {
    /// How this node seals and checks datagrams: a MAC when a cluster secret is given (which
    /// udp requires), a CRC32C otherwise.
    pub fn integrity(&self) -> Result<Integrity, ConfigError> {
        let run = run_tag(&self.run_id);
        let Some(path) = &self.cluster_secret_file else {
            if self.transport == TransportKind::Udp {
                return Err(ConfigError::Invalid(
                    "--transport udp needs --cluster-secret-file FILE (or RZAB_CLUSTER_SECRET_FILE): any host that can reach the ports could otherwise forge datagrams; make one with `head -c 32 /dev/urandom > FILE && chmod 600 FILE`".into(),
                ));
            }
            return Ok(Integrity::Crc32c);
        };
        let read = |source| ConfigError::Read {
            path: path.clone(),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(read)?;
        if metadata.permissions().mode() & 0o077 != 0 {
            return Err(ConfigError::File {
                path: path.clone(),
                message: format!(
                    "the cluster secret is accessible to others (mode {:o}): chmod 600 it",
                    metadata.permissions().mode() & 0o777
                ),
            });
        }
        let secret = std::fs::read(path).map_err(read)?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::File {
                path: path.clone(),
                message: format!(
                    "a cluster secret of {} bytes is too short: at least {MIN_SECRET_BYTES}",
                    secret.len()
                ),
            });
        }
        Ok(Integrity::mac(&secret, run))
    }

    /// Parses the command line, with the `--config` file's options placed before it.
    pub fn load(args: Vec<String>) -> Result<Options, ConfigError> {
        let first = Options::try_parse_from(&args).map_err(ConfigError::Options);
        let config_path = match &first {
            Ok(options) => options.config.clone(),
            Err(_) => find_config_flag(&args),
        };
        let Some(path) = config_path else {
            return first;
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let table: toml::Table =
            text.parse()
                .map_err(|error: toml::de::Error| ConfigError::File {
                    path: path.clone(),
                    message: error.to_string(),
                })?;
        let mut merged = vec![args.first().cloned().unwrap_or_default()];
        for (key, value) in table {
            let flag = format!("--{}", key.replace('_', "-"));
            match value {
                toml::Value::Boolean(true) => merged.push(flag),
                toml::Value::Boolean(false) => {}
                toml::Value::Array(items) => {
                    for item in items {
                        merged.push(flag.clone());
                        merged.push(toml_scalar(&item).map_err(|message| ConfigError::File {
                            path: path.clone(),
                            message: format!("{key}: {message}"),
                        })?);
                    }
                }
                other => {
                    merged.push(flag);
                    merged.push(toml_scalar(&other).map_err(|message| ConfigError::File {
                        path: path.clone(),
                        message: format!("{key}: {message}"),
                    })?);
                }
            }
        }
        merged.extend(args.into_iter().skip(1));
        Ok(Options::try_parse_from(merged)?)
    }

    /// The control block path.
    pub fn control_block_path(&self) -> PathBuf {
        self.control_block.clone().unwrap_or_else(|| {
            PathBuf::from(format!("/dev/shm/rzab-{}-n{}", self.cluster, self.node))
        })
    }

    pub fn fabric_name(&self) -> String {
        self.fabric.clone().unwrap_or_else(|| self.cluster.clone())
    }

    /// The faults to inject into this node's sends, if any were asked for.
    pub fn faults(&self) -> Option<crate::transport::fault::FaultConfig> {
        if self.inject_loss == 0.0 && self.inject_duplicate == 0.0 && self.inject_reorder == 0.0 {
            return None;
        }
        Some(crate::transport::fault::FaultConfig {
            seed: self.seed ^ (u64::from(self.node) << 32),
            drop: self.inject_loss / 100.0,
            duplicate: self.inject_duplicate / 100.0,
            reorder: self.inject_reorder / 100.0,
            ..crate::transport::fault::FaultConfig::default()
        })
    }

    pub fn key_distribution(&self) -> KeyDistribution {
        match self.distribution {
            Distribution::Uniform => KeyDistribution::Uniform,
            Distribution::Zipf => KeyDistribution::Zipf {
                theta: self.zipf_theta,
            },
        }
    }

    /// The node address of `node` for udp.
    pub fn udp_host(&self, node: u8) -> Ipv4Addr {
        self.udp_hosts
            .get(usize::from(node))
            .copied()
            .unwrap_or(Ipv4Addr::LOCALHOST)
    }

    /// The start values of knobs given on the command line.
    pub fn knob_overrides(&self) -> Result<Vec<(Knob, u64)>, ConfigError> {
        let mut changes = vec![
            (
                Knob::WriteRatioPermille,
                Knob::WriteRatioPermille.spec().validate(self.write_ratio)?,
            ),
            (
                Knob::PollMode,
                Knob::PollMode.spec().parse_text(&self.poll_mode)?,
            ),
        ];
        for assignment in &self.knobs {
            let (name, value) = assignment.split_once('=').ok_or_else(|| {
                ConfigError::Invalid(format!("--knob {assignment}: expected NAME=VALUE"))
            })?;
            let knob = Knob::by_name(name.trim())?;
            changes.push((knob, knob.spec().parse_text(value.trim())?));
        }
        Ok(changes)
    }

    /// Checks everything that can be checked before start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if self.nodes == 0 || usize::from(self.nodes) > MAX_NODES {
            return invalid(format!(
                "--nodes {} must be within 1..={MAX_NODES}",
                self.nodes
            ));
        }
        if self.node >= self.nodes {
            return invalid(format!(
                "--node {} must be below --nodes {}",
                self.node, self.nodes
            ));
        }
        if self.workers == 0 || usize::from(self.workers) > MAX_WORKERS {
            return invalid(format!(
                "--workers {} must be within 1..={MAX_WORKERS}",
                self.workers
            ));
        }
        if self.sessions == 0 || self.sessions > MAX_SESSIONS_PER_WORKER {
            return invalid(format!(
                "--sessions {} must be within 1..={MAX_SESSIONS_PER_WORKER}",
                self.sessions
            ));
        }
        if self.value_size < 8 || self.value_size > MAX_VALUE_SIZE {
            return invalid(format!(
                "--value-size {} must be within 8..={MAX_VALUE_SIZE} (values start with an 8-byte write id)",
                self.value_size
            ));
        }
        if self.keys == 0 {
            return invalid("--keys must be positive".into());
        }
        for (name, percent) in [
            ("--inject-loss", self.inject_loss),
            ("--inject-duplicate", self.inject_duplicate),
            ("--inject-reorder", self.inject_reorder),
        ] {
            if !(0.0..=100.0).contains(&percent) {
                return invalid(format!(
                    "{name} {percent} must be a percentage within 0..=100"
                ));
            }
        }
        if !self.window.is_power_of_two() || self.window < 32 {
            return invalid(format!(
                "--window {} must be a power of two of at least 32",
                self.window
            ));
        }
        if self.distribution == Distribution::Zipf
            && !(self.zipf_theta > 0.0 && self.zipf_theta.is_finite())
        {
            return invalid(format!("--zipf-theta {} must be positive", self.zipf_theta));
        }
        if self.cluster.is_empty()
            || self.cluster.len() > 32
            || !self
                .cluster
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return invalid(format!(
                "--cluster `{}` must be 1 to 32 letters, digits, - or _",
                self.cluster
            ));
        }
        if self.transport == TransportKind::Verbs && self.peers == PeerDiscovery::Static {
            return invalid("--transport verbs needs --peers control-plane: queue pair numbers are only known at run time".into());
        }
        if self.transport == TransportKind::Shm
            && usize::from(self.nodes) * usize::from(self.workers) > 64
        {
            return invalid(
                "the shm fabric has at most 64 ports: --nodes times --workers must be at most 64"
                    .into(),
            );
        }
        if self.transport == TransportKind::Udp
            && !self.udp_hosts.is_empty()
            && self.udp_hosts.len() != usize::from(self.nodes)
        {
            return invalid(format!(
                "--udp-hosts lists {} addresses for {} nodes",
                self.udp_hosts.len(),
                self.nodes
            ));
        }
        if self.pin != "auto" && self.pin != "off" && self.pin != "on" {
            return invalid(format!("--pin {} must be auto, on or off", self.pin));
        }
        self.knob_overrides()?;
        Ok(())
    }

    /// A hash of everything that must be equal on every node.
    pub fn fingerprint(&self) -> u64 {
        // Sessions size the leader's exactly-once table and snapshot ranges follow the keys.
        configuration_fingerprint(&[
            &self.cluster,
            &self.nodes.to_string(),
            &self.workers.to_string(),
            &self.value_size.to_string(),
            &self.keys.to_string(),
            &self.window.to_string(),
            &self.sessions.to_string(),
        ])
    }
}

/// The fingerprint of the options every node must share (cluster, nodes, workers, value size,
/// keys, window, sessions, in that order): FNV-1a of them joined with `|`.
pub fn configuration_fingerprint(parts: &[&str]) -> u64 {
    parts
        .join("|")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

fn find_config_flag(args: &[String]) -> Option<PathBuf> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
}

fn toml_scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(text) => Ok(text.clone()),
        toml::Value::Integer(number) => Ok(number.to_string()),
        toml::Value::Float(number) => Ok(number.to_string()),
        toml::Value::Boolean(flag) => Ok(flag.to_string()),
        other => Err(format!("unsupported value {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, ConfigError> {
        Options::load(
            std::iter::once("rzab-dataplane")
                .chain(args.iter().copied())
                .map(String::from)
                .collect(),
        )
    }

    #[test]
    fn defaults_are_valid_and_file_is_overridden_by_flags() {
        let options = parse(&["--node", "1"]).unwrap();
        options.validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "workers = 2\nvalue_size = 64\nknob = [\"multicast=false\"]\nnode = 2\n",
        )
        .unwrap();
        let options = parse(&["--config", file.to_str().unwrap(), "--node", "1"]).unwrap();
        assert_eq!(
            (options.workers, options.value_size, options.node),
            (2, 64, 1)
        );
        assert_eq!(
            options.knob_overrides().unwrap().last(),
            Some(&(Knob::Multicast, 0))
        );
    }

    #[test]
    fn inconsistent_configurations_are_refused() {
        for (args, fragment) in [
            (vec!["--node", "3"], "--node 3 must be below"),
            (vec!["--node", "0", "--value-size", "4096"], "--value-size"),
            (vec!["--node", "0", "--workers", "0"], "--workers"),
            (vec!["--node", "0", "--transport", "verbs"], "control-plane"),
            (
                vec!["--node", "0", "--knob", "prepare_batch=99"],
                "prepare_batch",
            ),
            (vec!["--node", "0", "--knob", "nonsense"], "NAME=VALUE"),
            (vec!["--node", "0", "--window", "100"], "power of two"),
            (
                vec![
                    "--node",
                    "0",
                    "--transport",
                    "udp",
                    "--udp-hosts",
                    "10.0.0.1",
                ],
                "--udp-hosts",
            ),
        ] {
            let error = parse(&args)
                .and_then(|options| options.validate())
                .unwrap_err()
                .to_string();
            assert!(error.contains(fragment), "{args:?}: {error}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "workers = [").unwrap();
        assert!(matches!(
            parse(&["--config", file.to_str().unwrap(), "--node", "0"]),
            Err(ConfigError::File { .. })
        ));
    }
}
