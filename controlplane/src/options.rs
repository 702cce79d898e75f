//! Command-line options (with environment fallbacks) and the validated [`Config`] the rest of
//! the control plane runs on.
//!
//! Touches nothing: it parses and checks text. Defaults that depend on other options (the
//! control-block path, the listen address) are resolved here, once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rzab_shared::limits::{CLUSTER_NAME_BYTES, MAX_NODES};

/// The generation used when none is given; every run should pass a fresh one.
pub const DEFAULT_GENERATION: &str = "default";
/// First REST port: node N listens on 127.0.0.1:(7100 + N) unless told otherwise.
pub const DEFAULT_PORT_BASE: u16 = 7100;
/// Longest run generation accepted (it is part of every registry key).
pub const MAX_GENERATION_BYTES: usize = 64;

/// rzab's per-node control plane: attaches to the node's control block, exchanges endpoints
/// through memcached, serves REST knobs and status, and exports Prometheus metrics.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Options {
    /// Cluster name (as given to rzab-dataplane).
    #[arg(long, env = "RZAB_CLUSTER", default_value = "local")]
    pub cluster: String,

    /// This node's id (0 is the leader).
    #[arg(long, env = "RZAB_NODE")]
    pub node: Option<u32>,

    /// The node's control block [default: /dev/shm/rzab-{cluster}-n{node}].
    #[arg(long, env = "RZAB_BLOCK")]
    pub block: Option<PathBuf>,

    /// memcached registry, HOST:PORT.
    #[arg(long, env = "RZAB_REGISTRY", default_value = "127.0.0.1:11211")]
    pub registry: String,

    /// Run generation: namespaces this run's registry keys, so keys left by an earlier run are
    /// never mistaken for this one's. Pass a fresh value per run (for example `date +%s%N`).
    #[arg(long, env = "RZAB_GENERATION")]
    pub generation: Option<String>,

    /// REST and metrics listen address [default: 127.0.0.1:{7100 + node}].
    #[arg(long, env = "RZAB_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// How often to poll the registry (cluster knobs every poll; peers with backoff from it).
    #[arg(long, env = "RZAB_POLL_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub poll_ms: u64,

    /// A peer record whose heartbeat is older than this is ignored until it is refreshed.
    #[arg(long, env = "RZAB_PEER_STALE_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub peer_stale_ms: u64,

    /// How long a client may take to send a request's headers (and how long an idle
    /// keep-alive connection is kept); the connection is closed after it.
    #[arg(long, env = "RZAB_HEADER_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub header_timeout_ms: u64,

    /// How long a client may take to send a request's whole body; 408 after it.
    #[arg(long, env = "RZAB_BODY_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub body_timeout_ms: u64,

    /// Most HTTP connections open at once (lowered to fit the open-file limit). At the limit
    /// a new connection displaces the oldest one that is not inside a request, or gets 503.
    #[arg(long, env = "RZAB_MAX_CONNECTIONS", default_value_t = 1_024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// On SIGTERM/SIGINT, how long requests in flight may take to finish before their
    /// connections are dropped.
    #[arg(long, env = "RZAB_SHUTDOWN_GRACE_MS", default_value_t = 3_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub shutdown_grace_ms: u64,

    /// Print the control block's state, knobs and counters as JSON once, and exit.
    #[arg(long)]
    pub inspect: bool,

    /// Print the REST API's OpenAPI document and exit.
    #[arg(long)]
    pub openapi: bool,
}

/// Why the options cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error("--node is required (or RZAB_NODE)")]
    MissingNode,
    #[error("--node {0}: node ids go from 0 to {max}", max = MAX_NODES - 1)]
    NodeOutOfRange(u32),
    #[error(
        "--cluster `{0}`: need 1 to {CLUSTER_NAME_BYTES} bytes without whitespace, control characters or ':'"
    )]
    BadCluster(String),
    #[error(
        "--generation `{0}`: need 1 to {MAX_GENERATION_BYTES} bytes without whitespace, control characters or ':'"
    )]
    BadGeneration(String),
    #[error("--registry `{0}`: expected HOST:PORT, for example 127.0.0.1:11211")]
    BadRegistry(String),
}

/// A memcached address, checked to be HOST:PORT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryAddress {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for RegistryAddress {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for RegistryAddress {
    type Err = OptionsError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || OptionsError::BadRegistry(text.to_owned());
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !host_ok || port == 0 {
            return Err(bad());
        }
        Ok(RegistryAddress {
            host: host.to_owned(),
            port,
        })
    }
}

/// Limits of the REST server's connections (see [`crate::http`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest time to receive a request's headers, and longest idle keep-alive.
    pub header_timeout: Duration,
    /// Longest time to receive a request's whole body.
    pub body_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// How long a stop waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(5),
            max_connections: 1_024,
            shutdown_grace: Duration::from_secs(3),
        }
    }
}

/// Everything the control plane runs on, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub cluster: String,
    pub node: u32,
    pub block: PathBuf,
    pub registry: RegistryAddress,
    pub generation: String,
    /// True when no generation was given and [`DEFAULT_GENERATION`] is used.
    pub generation_defaulted: bool,
    pub listen: SocketAddr,
    pub poll: Duration,
    pub peer_stale: Duration,
    pub http: HttpLimits,
}

/// Whether a name can be part of a registry key (memcached keys have no whitespace or control
/// characters; ':' separates the key's parts).
fn key_safe(text: &str, max: usize) -> bool {
    !text.is_empty()
        && text.len() <= max
        && !text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ':')
}

/// The default control-block path of a node, as the data plane creates it.
pub fn default_block_path(cluster: &str, node: u32) -> PathBuf {
    PathBuf::from(format!("/dev/shm/rzab-{cluster}-n{node}"))
}

impl Options {
    /// The control block to inspect: `--block`, or the default path of `--node`.
    pub fn inspect_path(&self) -> Result<PathBuf, OptionsError> {
        match (&self.block, self.node) {
            (Some(path), _) => Ok(path.clone()),
            (None, Some(node)) => Ok(default_block_path(&self.cluster, node)),
            (None, None) => Err(OptionsError::MissingNode),
        }
    }

    /// Validates the options and resolves their defaults.
    pub fn config(&self) -> Result<Config, OptionsError> {
        let node = self.node.ok_or(OptionsError::MissingNode)?;
        if node as usize >= MAX_NODES {
            return Err(OptionsError::NodeOutOfRange(node));
        }
        if !key_safe(&self.cluster, CLUSTER_NAME_BYTES) {
            return Err(OptionsError::BadCluster(self.cluster.clone()));
        }
        let (generation, generation_defaulted) = match &self.generation {
            Some(generation) => (generation.clone(), false),
            None => (DEFAULT_GENERATION.to_owned(), true),
        };
        if !key_safe(&generation, MAX_GENERATION_BYTES) {
            return Err(OptionsError::BadGeneration(generation));
        }
        let registry = self.registry.parse()?;
        let port = DEFAULT_PORT_BASE.saturating_add(u16::try_from(node).unwrap_or(0));
        Ok(Config {
            cluster: self.cluster.clone(),
            node,
            block: self
                .block
                .clone()
                .unwrap_or_else(|| default_block_path(&self.cluster, node)),
            registry,
            generation,
            generation_defaulted,
            listen: self
                .listen
                .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
            poll: Duration::from_millis(self.poll_ms),
            peer_stale: Duration::from_millis(self.peer_stale_ms),
            http: HttpLimits {
                header_timeout: Duration::from_millis(self.header_timeout_ms),
                body_timeout: Duration::from_millis(self.body_timeout_ms),
                max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
                shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arguments: &[&str]) -> Options {
        let mut all = vec!["rzab-controlplane"];
        all.extend_from_slice(arguments);
        Options::try_parse_from(all).unwrap()
    }

    #[test]
    fn defaults_follow_the_node() {
        let config = parse(&["--node", "2"]).config().unwrap();
        assert_eq!(config.block, PathBuf::from("/dev/shm/rzab-local-n2"));
        assert_eq!(config.listen, "127.0.0.1:7102".parse().unwrap());
        assert_eq!(config.registry.to_string(), "127.0.0.1:11211");
        assert_eq!(config.generation, "default");
        assert!(config.generation_defaulted);
        assert_eq!(config.poll, Duration::from_millis(50));
        assert_eq!(config.http, HttpLimits::default());
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(parse(&[]).config().unwrap_err(), OptionsError::MissingNode);
        assert_eq!(
            parse(&["--node", "16"]).config().unwrap_err(),
            OptionsError::NodeOutOfRange(16)
        );
        assert!(matches!(
            parse(&["--node", "0", "--generation", "a b"]).config(),
            Err(OptionsError::BadGeneration(_))
        ));
        assert!(matches!(
            parse(&["--node", "0", "--cluster", "x:y"]).config(),
            Err(OptionsError::BadCluster(_))
        ));
        for bad in ["nohost", ":1", "host:", "host:0", "host:99999", "a b:1"] {
            assert!(
                matches!(
                    parse(&["--node", "0", "--registry", bad]).config(),
                    Err(OptionsError::BadRegistry(_))
                ),
                "{bad}"
            );
        }
        assert!(Options::try_parse_from(["x", "--poll-ms", "0"]).is_err());
    }

    #[test]
    fn inspect_needs_a_block_or_a_node() {
        assert!(parse(&["--inspect"]).inspect_path().is_err());
        assert_eq!(
            parse(&["--inspect", "--block", "/tmp/b"])
                .inspect_path()
                .unwrap(),
            PathBuf::from("/tmp/b")
        );
    }
}
