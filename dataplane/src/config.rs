//! The data plane's configuration: command-line options (each documented in `--help`), an
//! optional TOML file whose keys are the long option names, and the checks that turn an
//! inconsistent configuration into a clear error before anything starts.
//!
//! Every numeric option has its range in [`ranges`], used by its parser (so a value out of
//! range is a usage error naming the option), by its `--help` line and by
//! [`Options::validate`] (for options built in code). A `--config` file is checked key by key
//! against the options' definitions, so a wrong type or value names the file and the key.
//! Port schemes (`--udp-port-base`) are checked for every node's port to exist; what the
//! configuration costs in memory is checked against the machine by [`crate::node::memory`].
//!
//! Touches only the configuration file it is pointed at, and the cluster secret file.

use std::any::TypeId;
use std::ffi::OsStr;
use std::marker::PhantomData;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser, ValueEnum};
use rzab_shared::TransportKind;
use rzab_shared::knobs::{KNOBS, Knob, KnobError, POLL_MODES};

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

/// The accepted values of one integer option. Each option's range is defined once, in
/// [`ranges`]; its parser, its `--help` text, the TOML reader (through the parser) and
/// [`Options::validate`] all read it from there, so they cannot disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntRange {
    pub min: u64,
    pub max: u64,
    /// Only powers of two within `min..=max`.
    pub power_of_two: bool,
}

impl IntRange {
    pub const fn new(min: u64, max: u64) -> Self {
        IntRange {
            min,
            max,
            power_of_two: false,
        }
    }

    pub const fn powers_of_two(min: u64, max: u64) -> Self {
        IntRange {
            min,
            max,
            power_of_two: true,
        }
    }

    pub fn contains(self, value: u64) -> bool {
        (self.min..=self.max).contains(&value) && (!self.power_of_two || value.is_power_of_two())
    }

    /// What a value must be, e.g. `an integer in 1..=16`.
    pub fn expected(self) -> String {
        match (self.power_of_two, self.min, self.max) {
            (false, 0, u64::MAX) => "any 64-bit unsigned integer".to_owned(),
            (false, min, max) => format!("an integer in {min}..={max}"),
            (true, min, max) => format!("a power of two in {min}..={max}"),
        }
    }

    /// The range as `--help` shows it, e.g. `1..=16`.
    pub fn shown(self) -> String {
        match (self.power_of_two, self.min, self.max) {
            (false, 0, u64::MAX) => "any 64-bit unsigned integer".to_owned(),
            (false, min, max) => format!("{min}..={max}"),
            (true, min, max) => format!("powers of two in {min}..={max}"),
        }
    }

    /// An option's help line: `text` and its range.
    pub fn help(self, text: &str) -> String {
        format!("{text} [range: {}]", self.shown())
    }

    /// The parser of an option of type `T` (which holds every value of the range).
    pub fn parser<T>(self) -> IntParser<T> {
        IntParser {
            range: self,
            value: PhantomData,
        }
    }
}

/// A clap parser of an integer option of type `T` within its [`IntRange`]. A refusal reads
/// `--window 100: expected a power of two in 32..=1048576`, as [`Options::validate`]'s do.
#[derive(Clone, Copy, Debug)]
pub struct IntParser<T> {
    range: IntRange,
    value: PhantomData<fn() -> T>,
}

impl<T> clap::builder::TypedValueParser for IntParser<T>
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
{
    type Value = T;

    fn parse_ref(
        &self,
        command: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let text = value.to_string_lossy();
        text.trim()
            .parse::<u64>()
            .ok()
            .filter(|number| self.range.contains(*number))
            .and_then(|number| T::try_from(number).ok())
            .ok_or_else(|| refusal(command, arg, &text, &self.range.expected()))
    }
}

/// A clap parser of a floating-point option within its [`FloatRange`].
#[derive(Clone, Copy, Debug)]
pub struct FloatParser {
    range: FloatRange,
}

impl clap::builder::TypedValueParser for FloatParser {
    type Value = f64;

    fn parse_ref(
        &self,
        command: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<f64, clap::Error> {
        let text = value.to_string_lossy();
        text.trim()
            .parse::<f64>()
            .ok()
            .filter(|number| self.range.contains(*number))
            .ok_or_else(|| refusal(command, arg, &text, &self.range.expected()))
    }
}

/// The usage error for `text`, out of range for `arg`.
fn refusal(
    command: &clap::Command,
    arg: Option<&clap::Arg>,
    text: &str,
    expected: &str,
) -> clap::Error {
    let name = arg
        .and_then(clap::Arg::get_long)
        .map_or_else(|| "a value".to_owned(), |long| format!("--{long}"));
    clap::Error::raw(
        clap::error::ErrorKind::ValueValidation,
        format!("{name} {text}: expected {expected}\n"),
    )
    .with_cmd(command)
}

/// The accepted values of one floating-point option; see [`IntRange`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FloatRange {
    pub min: f64,
    pub max: f64,
}

impl FloatRange {
    pub const fn new(min: f64, max: f64) -> Self {
        FloatRange { min, max }
    }

    /// False for NaN, which no range holds.
    pub fn contains(self, value: f64) -> bool {
        (self.min..=self.max).contains(&value)
    }

    pub fn expected(self) -> String {
        format!("a number in {}..={}", self.min, self.max)
    }

    pub fn help(self, text: &str) -> String {
        format!("{text} [range: {}..={}]", self.min, self.max)
    }

    pub fn parser(self) -> FloatParser {
        FloatParser { range: self }
    }
}

/// The range of every numeric option, the one place each is defined.
pub mod ranges {
    use rzab_shared::Knob;
    use rzab_shared::limits::{
        MAX_NODES, MAX_SESSIONS_PER_WORKER, MAX_WINDOW, MAX_WORKERS, MIN_WINDOW,
    };

    use super::{FloatRange, IntRange};
    use crate::store::{MAX_KEYS, MAX_VALUE_SIZE};

    pub const NODE: IntRange = IntRange::new(0, MAX_NODES as u64 - 1);
    pub const NODES: IntRange = IntRange::new(1, MAX_NODES as u64);
    pub const WORKERS: IntRange = IntRange::new(1, MAX_WORKERS as u64);
    /// At least one: a node without sessions would complete no operation, which a run must
    /// not do silently (see main.rs), and every node must run the same number.
    pub const SESSIONS: IntRange = IntRange::new(1, MAX_SESSIONS_PER_WORKER as u64);
    /// Port 0 would have the kernel pick a port no peer can know.
    pub const PORT: IntRange = IntRange::new(1, u16::MAX as u64);
    /// ibverbs numbers a device's ports from 1, in a `u8`.
    pub const VERBS_PORT: IntRange = IntRange::new(1, u8::MAX as u64);
    /// The address handle takes the GID index as a `u8`.
    pub const VERBS_GID_INDEX: IntRange = IntRange::new(0, u8::MAX as u64);
    /// The store's own bound; memory is the real one (checked at start).
    pub const KEYS: IntRange = IntRange::new(1, MAX_KEYS);
    /// Values start with an 8-byte write id.
    pub const VALUE_SIZE: IntRange = IntRange::new(8, MAX_VALUE_SIZE as u64);
    /// The knob's own range: the option only gives the knob its start value.
    pub const WRITE_RATIO: IntRange = IntRange::new(
        Knob::WriteRatioPermille.spec().min,
        Knob::WriteRatioPermille.spec().max,
    );
    /// Wider than any skew of interest (YCSB's 0.99 is the usual); a theta of 0 would be
    /// uniform, which --distribution uniform already is.
    pub const ZIPF_THETA: FloatRange = FloatRange::new(0.01, 10.0);
    /// Up to a year (0: until SIGINT or SIGTERM), as the run scripts allow.
    pub const DURATION: IntRange = IntRange::new(0, 31_536_000);
    /// Up to a day: a deadline is a point in time, which must stay representable.
    pub const JOIN_TIMEOUT: IntRange = IntRange::new(1, 86_400);
    pub const WINDOW: IntRange = IntRange::powers_of_two(MIN_WINDOW as u64, MAX_WINDOW as u64);
    pub const SEED: IntRange = IntRange::new(0, u64::MAX);
    pub const PERCENT: FloatRange = FloatRange::new(0.0, 100.0);
    /// 1 MiB to 1 PiB.
    pub const MAX_MEMORY_MIB: IntRange = IntRange::new(1, 1 << 30);
    /// 64 KiB to 1 TiB (the leader's ring is at least two windows whatever it is given).
    pub const COMMITTED_RING_BYTES: IntRange = IntRange::new(1 << 16, 1 << 40);
    /// From room for one small entry to the shm fabric's largest slot.
    pub const DATAGRAM_BYTES: IntRange = IntRange::new(512, 1 << 20);
    /// 1 KiB to the store's largest value.
    pub const MAX_TXN_BYTES: IntRange = IntRange::new(1 << 10, MAX_VALUE_SIZE as u64);
}

/// Where --pin's choices are spelled, for its parser and node.rs.
pub const PIN_CHOICES: [&str; 3] = ["auto", "on", "off"];

/// rzab-dataplane: one node of an rzab cluster (ZAB over UD datagrams).
#[derive(Clone, Debug, Parser)]
#[command(version, about, args_override_self = true, after_long_help = knob_table())]
pub struct Options {
    /// TOML file of options (keys are the long option names, e.g. `workers = 2`); options
    /// given on the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Cluster name (1 to 32 letters, digits, - or _): namespaces the control block, the shm
    /// fabric and the datagrams.
    #[arg(long, default_value = "rzab")]
    pub cluster: String,
    #[arg(long, value_parser = ranges::NODE.parser::<u8>(),
          help = ranges::NODE.help("This node's id, below --nodes; node 0 is the leader"))]
    pub node: u8,
    #[arg(long, default_value_t = 3, value_parser = ranges::NODES.parser::<u8>(),
          help = ranges::NODES.help("Nodes in the cluster"))]
    pub nodes: u8,
    #[arg(long, default_value_t = 1, value_parser = ranges::WORKERS.parser::<u8>(),
          help = ranges::WORKERS.help("Worker threads (pipelines) per node; must be equal on every node"))]
    pub workers: u8,
    #[arg(long, default_value_t = 32, value_parser = ranges::SESSIONS.parser::<usize>(),
          help = ranges::SESSIONS.help("Emulated client sessions per worker"))]
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
    #[arg(long, default_value_t = 40_000, value_parser = ranges::PORT.parser::<u16>(),
          help = ranges::PORT.help("udp: worker w of node n uses port base + n * workers + w; every such port must be at most 65535"))]
    pub udp_port_base: u16,
    /// udp: multicast group of pipeline w is this address + w (every group within
    /// 224.0.0.0/4).
    #[arg(long, default_value = "239.255.0.0")]
    pub multicast_base: Ipv4Addr,
    #[arg(long, default_value_t = 47_000, value_parser = ranges::PORT.parser::<u16>(),
          help = ranges::PORT.help("udp: the port of every multicast group, outside the nodes' ports"))]
    pub multicast_port: u16,
    /// verbs: device name as ibv_devinfo shows it (default: the first).
    #[arg(long)]
    pub verbs_device: Option<String>,
    #[arg(long, default_value_t = 1, value_parser = ranges::VERBS_PORT.parser::<u8>(),
          help = ranges::VERBS_PORT.help("verbs: port number"))]
    pub verbs_port: u8,
    #[arg(long, default_value_t = 0, value_parser = ranges::VERBS_GID_INDEX.parser::<i32>(),
          help = ranges::VERBS_GID_INDEX.help("verbs: GID index"))]
    pub verbs_gid_index: i32,
    /// Control block path (default /dev/shm/rzab-CLUSTER-nNODE).
    #[arg(long)]
    pub control_block: Option<PathBuf>,
    /// Where peer endpoints come from; verbs needs control-plane.
    #[arg(long, value_enum, default_value = "static")]
    pub peers: PeerDiscovery,
    #[arg(long, default_value_t = 1_000_000, value_parser = ranges::KEYS.parser::<u64>(),
          help = ranges::KEYS.help("Keys in the store (populated at start; the memory check bounds them further)"))]
    pub keys: u64,
    #[arg(long, default_value_t = 32, value_parser = ranges::VALUE_SIZE.parser::<usize>(),
          help = ranges::VALUE_SIZE.help("Bytes per value (at most --max-txn-bytes)"))]
    pub value_size: usize,
    #[arg(long, value_delimiter = ',', value_name = "BYTES,...",
          value_parser = ranges::VALUE_SIZE.parser::<usize>(),
          help = ranges::VALUE_SIZE.help("Value lengths of the writes, comma-separated (say 32,65536,1048576): the sessions' writes take them in turn, so one run mixes transaction sizes; each at most --value-size, the store's item size (default: every value --value-size long)"))]
    pub value_mix: Vec<usize>,
    #[arg(long, default_value_t = 50, value_parser = ranges::WRITE_RATIO.parser::<u64>(),
          help = ranges::WRITE_RATIO.help("Share of writes, per-mille (a live knob; this is its start value)"))]
    pub write_ratio: u64,
    /// Key distribution of the emulated clients.
    #[arg(long, value_enum, default_value = "uniform")]
    pub distribution: Distribution,
    #[arg(long, default_value_t = 0.99, value_parser = ranges::ZIPF_THETA.parser(),
          help = ranges::ZIPF_THETA.help("Zipf exponent when --distribution zipf"))]
    pub zipf_theta: f64,
    /// busy: spin on dedicated cores; adaptive: yield when idle (several nodes per core).
    #[arg(long, default_value = "adaptive",
          value_parser = clap::builder::PossibleValuesParser::new(POLL_MODES))]
    pub poll_mode: String,
    /// Any live knob's start value, as NAME=VALUE (repeatable), e.g. multicast=false; --help
    /// lists the knobs and their ranges.
    #[arg(long = "knob", value_name = "NAME=VALUE")]
    pub knobs: Vec<String>,
    /// Pin worker w of node n to core (n * workers + w) mod cores: auto pins only when there
    /// are enough cores for every local worker.
    #[arg(long, default_value = "auto",
          value_parser = clap::builder::PossibleValuesParser::new(PIN_CHOICES))]
    pub pin: String,
    #[arg(long, default_value_t = 0, value_parser = ranges::DURATION.parser::<u64>(),
          help = ranges::DURATION.help("Seconds to run (0: until SIGINT or SIGTERM); a run of some seconds that completes no operation fails"))]
    pub duration: u64,
    /// A follower that fell behind what the leader retains: rejoin as a new process, or exit.
    #[arg(long, value_enum, default_value = "rejoin")]
    pub on_fall_behind: OnFallBehind,
    #[arg(long, default_value_t = 60, value_parser = ranges::JOIN_TIMEOUT.parser::<u64>(),
          help = ranges::JOIN_TIMEOUT.help("Seconds to wait for every peer before giving up"))]
    pub join_timeout: u64,
    #[arg(long, default_value_t = 1024, value_parser = ranges::WINDOW.parser::<usize>(),
          help = ranges::WINDOW.help("Prepares a pipeline may have outstanding (the leader keeps at least two windows of them in its committed-transaction ring)"))]
    pub window: usize,
    #[arg(long, default_value_t = crate::zab::DEFAULT_COMMITTED_RING_BYTES,
          value_parser = ranges::COMMITTED_RING_BYTES.parser::<u64>(),
          help = ranges::COMMITTED_RING_BYTES.help("Bytes of the leader's committed-transaction ring (split among the workers): a follower that lagged by less than it holds is brought back by DIFF (the prepares it missed), one that lagged by more by a snapshot"))]
    pub committed_ring_bytes: u64,

    #[arg(long, default_value_t = crate::zab::DEFAULT_MAX_TXN_BYTES,
          value_parser = ranges::MAX_TXN_BYTES.parser::<usize>(),
          help = ranges::MAX_TXN_BYTES.help("Largest transaction payload the cluster replicates (ZooKeeper's jute.maxbuffer; the key-value store's transaction is its value, plus the key); larger ones travel as fragments"))]
    pub max_txn_bytes: usize,
    #[arg(long, value_name = "BYTES", value_parser = ranges::DATAGRAM_BYTES.parser::<usize>(),
          help = ranges::DATAGRAM_BYTES.help("Largest datagram a node sends (default: 64 KiB on shm, 4 KiB on udp and verbs); transactions too large for one travel as fragments, so larger datagrams mean fewer of them"))]
    pub datagram_bytes: Option<usize>,
    #[arg(long, default_value_t = 1, value_parser = ranges::SEED.parser::<u64>(),
          help = ranges::SEED.help("Seed of the emulated clients' traces"))]
    pub seed: u64,
    #[arg(long, value_name = "MIB", value_parser = ranges::MAX_MEMORY_MIB.parser::<u64>(),
          help = ranges::MAX_MEMORY_MIB.help("Refuse to start when this node's store, rings, traces and buffers need more than this many MiB (default: the MemAvailable of /proc/meminfo, which also bounds this)"))]
    pub max_memory_mib: Option<u64>,
    /// Print the stats line as JSON instead of text.
    #[arg(long)]
    pub json_stats: bool,
    /// Record received datagrams, endpoint records and knobs as fuzzing seeds into this
    /// directory at shutdown (see fuzz/capture-corpus.sh). Hidden: a developer's tool.
    #[arg(long, hide = true, env = "RZAB_CAPTURE_CORPUS", value_name = "DIR")]
    pub capture_corpus: Option<PathBuf>,
    #[arg(long, default_value_t = 0.0, value_parser = ranges::PERCENT.parser(),
          help = ranges::PERCENT.help("Testing: drop this percentage of the datagrams this node sends"))]
    pub inject_loss: f64,
    #[arg(long, default_value_t = 0.0, value_parser = ranges::PERCENT.parser(),
          help = ranges::PERCENT.help("Testing: send this percentage of datagrams twice"))]
    pub inject_duplicate: f64,
    #[arg(long, default_value_t = 0.0, value_parser = ranges::PERCENT.parser(),
          help = ranges::PERCENT.help("Testing: hold back this percentage of datagrams so they arrive out of order"))]
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

/// Lengths `--value-mix` may name.
pub const MAX_VALUE_MIX: usize = 16;

/// The knobs and the values they take, for `--help`.
fn knob_table() -> String {
    let mut table = String::from(
        "Knobs (start values with --knob NAME=VALUE; live through rzab-controlplane):",
    );
    for spec in KNOBS {
        table.push_str(&format!(
            "\n  {:<24} {} [default: {}]",
            spec.name,
            spec.accepted(),
            match spec.to_json(spec.default) {
                serde_json::Value::String(name) => name,
                other => other.to_string(),
            }
        ));
    }
    table
}

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
    #[error("{path}: unknown key `{key}`: the keys are rzab-dataplane's long option names")]
    UnknownKey { path: PathBuf, key: String },
    #[error("{path}: key `{key}` must be {expected}, not {found} ({help})")]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
        /// The option's help line, which names its range.
        help: String,
    },
    #[error("{path}: key `{key}`: {message}")]
    BadValue {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Knob(#[from] KnobError),
    #[error(transparent)]
    Options(#[from] clap::Error),
}

/// The TOML type an option's value must have, from the option's definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TomlType {
    /// A flag (`json_stats = true`).
    Boolean,
    Integer,
    /// An integer or a float.
    Number,
    /// A string: names, paths, addresses and choices.
    Text,
}

impl TomlType {
    fn of(arg: &clap::Arg) -> TomlType {
        if matches!(
            arg.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
        ) {
            return TomlType::Boolean;
        }
        let parsed = arg.get_value_parser().type_id();
        let integers = [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
        ];
        if integers.into_iter().any(|integer| parsed == integer) {
            TomlType::Integer
        } else if parsed == TypeId::of::<f64>() {
            TomlType::Number
        } else {
            TomlType::Text
        }
    }

    fn expected(self) -> &'static str {
        match self {
            TomlType::Boolean => "a boolean",
            TomlType::Integer => "an integer",
            TomlType::Number => "a number",
            TomlType::Text => "a string",
        }
    }

    /// The command-line text of `value`, if it is of this type.
    fn text(self, value: &toml::Value) -> Option<String> {
        match (self, value) {
            (TomlType::Integer | TomlType::Number, toml::Value::Integer(number)) => {
                Some(number.to_string())
            }
            (TomlType::Number, toml::Value::Float(number)) => Some(number.to_string()),
            (TomlType::Text, toml::Value::String(text)) => Some(text.clone()),
            _ => None,
        }
    }
}

/// How a TOML value is named in an error.
fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => format!("the string {text:?}"),
        toml::Value::Integer(number) => format!("the integer {number}"),
        toml::Value::Float(number) => format!("the float {number}"),
        toml::Value::Boolean(flag) => format!("the boolean {flag}"),
        toml::Value::Datetime(when) => format!("the date-time {when}"),
        toml::Value::Array(_) => "an array".to_owned(),
        toml::Value::Table(_) => "a table".to_owned(),
    }
}

/// Turns a `--config` file into command-line arguments (`--name=value`, so that a value such
/// as `-1` is never taken for an option), checking each key on its own first: its type against
/// the option's definition, then its value with the option's own parser, so that whatever is
/// wrong in the file is reported with the file and the key rather than as a command-line error.
fn file_arguments(path: &Path, program: &str) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|error: toml::de::Error| ConfigError::File {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
    let command = Options::command();
    // The probe parses one key's arguments alone: --node, required on the command line, may
    // well come from another key or from the command line.
    let probe = Options::command().mut_arg("node", |arg| arg.required(false));
    let mut arguments = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let Some(arg) = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long.as_str()) && long != "config")
        else {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                key,
            });
        };
        let wanted = TomlType::of(arg);
        let wrong_type = |found: &toml::Value| ConfigError::WrongType {
            path: path.to_owned(),
            key: key.clone(),
            expected: wanted.expected(),
            found: describe(found),
            help: format!(
                "--{long}: {}",
                arg.get_help().map(ToString::to_string).unwrap_or_default()
            ),
        };
        let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
        let items: Vec<&toml::Value> = match &value {
            toml::Value::Array(items) if repeatable => items.iter().collect(),
            single => vec![single],
        };
        let mut key_arguments = Vec::new();
        for item in items {
            match (wanted, item) {
                (TomlType::Boolean, toml::Value::Boolean(true)) => {
                    key_arguments.push(format!("--{long}"));
                }
                (TomlType::Boolean, toml::Value::Boolean(false)) => {}
                _ => {
                    let text = wanted.text(item).ok_or_else(|| wrong_type(item))?;
                    key_arguments.push(format!("--{long}={text}"));
                }
            }
        }
        probe
            .clone()
            .try_get_matches_from(std::iter::once(program.to_owned()).chain(key_arguments.clone()))
            .map_err(|error| ConfigError::BadValue {
                path: path.to_owned(),
                key: key.clone(),
                message: first_line(&error.to_string()),
            })?;
        arguments.extend(key_arguments);
    }
    Ok(arguments)
}

/// The message of a rendered clap error, without its `error: ` prefix and usage lines.
fn first_line(rendered: &str) -> String {
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
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
        let program = args.first().cloned().unwrap_or_default();
        let mut merged = vec![program.clone()];
        merged.extend(file_arguments(&path, &program)?);
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

    /// The udp port of worker `worker` of node `node`: `--udp-port-base + node * workers +
    /// worker`, the one definition of the scheme. `None` past 65535, where a `u16` sum would
    /// wrap (to port 0, an ephemeral port no peer knows).
    pub fn udp_port(&self, node: u8, worker: u8) -> Option<u16> {
        let port = u32::from(self.udp_port_base)
            + u32::from(node) * u32::from(self.workers)
            + u32::from(worker);
        u16::try_from(port).ok()
    }

    /// The multicast group address of pipeline `worker`: `--multicast-base + worker`, as the
    /// udp transport computes it; `None` past 255.255.255.255.
    pub fn multicast_group(&self, worker: u8) -> Option<Ipv4Addr> {
        u32::from(self.multicast_base)
            .checked_add(u32::from(worker))
            .map(Ipv4Addr::from)
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

    /// Every integer option with its value and range. The parsers already hold the command
    /// line and the file to these ranges; this holds options built or changed in code to them.
    fn integer_options(&self) -> [(&'static str, i128, IntRange); 20] {
        let max_memory = self.max_memory_mib.unwrap_or(ranges::MAX_MEMORY_MIB.min);
        let datagram = self
            .datagram_bytes
            .map_or(ranges::DATAGRAM_BYTES.min.into(), wide);
        let longest_mixed = self
            .value_mix
            .iter()
            .copied()
            .max()
            .map_or(ranges::VALUE_SIZE.min.into(), wide);
        [
            ("--node", self.node.into(), ranges::NODE),
            ("--value-mix", longest_mixed, ranges::VALUE_SIZE),
            ("--nodes", self.nodes.into(), ranges::NODES),
            ("--workers", self.workers.into(), ranges::WORKERS),
            ("--sessions", wide(self.sessions), ranges::SESSIONS),
            ("--udp-port-base", self.udp_port_base.into(), ranges::PORT),
            ("--multicast-port", self.multicast_port.into(), ranges::PORT),
            ("--verbs-port", self.verbs_port.into(), ranges::VERBS_PORT),
            (
                "--verbs-gid-index",
                self.verbs_gid_index.into(),
                ranges::VERBS_GID_INDEX,
            ),
            ("--keys", self.keys.into(), ranges::KEYS),
            ("--value-size", wide(self.value_size), ranges::VALUE_SIZE),
            (
                "--write-ratio",
                self.write_ratio.into(),
                ranges::WRITE_RATIO,
            ),
            ("--duration", self.duration.into(), ranges::DURATION),
            (
                "--join-timeout",
                self.join_timeout.into(),
                ranges::JOIN_TIMEOUT,
            ),
            ("--window", wide(self.window), ranges::WINDOW),
            (
                "--committed-ring-bytes",
                self.committed_ring_bytes.into(),
                ranges::COMMITTED_RING_BYTES,
            ),
            (
                "--max-txn-bytes",
                wide(self.max_txn_bytes),
                ranges::MAX_TXN_BYTES,
            ),
            ("--seed", self.seed.into(), ranges::SEED),
            ("--datagram-bytes", datagram, ranges::DATAGRAM_BYTES),
            (
                "--max-memory-mib",
                max_memory.into(),
                ranges::MAX_MEMORY_MIB,
            ),
        ]
    }

    /// Every floating-point option with its value and range.
    fn float_options(&self) -> [(&'static str, f64, FloatRange); 4] {
        [
            ("--zipf-theta", self.zipf_theta, ranges::ZIPF_THETA),
            ("--inject-loss", self.inject_loss, ranges::PERCENT),
            ("--inject-duplicate", self.inject_duplicate, ranges::PERCENT),
            ("--inject-reorder", self.inject_reorder, ranges::PERCENT),
        ]
    }

    /// Checks everything that can be checked before start, except memory (see
    /// [`crate::node::memory`], which reads the machine).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        for (name, value, range) in self.integer_options() {
            if !u64::try_from(value).is_ok_and(|value| range.contains(value)) {
                return invalid(format!("{name} {value}: expected {}", range.expected()));
            }
        }
        for (name, value, range) in self.float_options() {
            if !range.contains(value) {
                return invalid(format!("{name} {value}: expected {}", range.expected()));
            }
        }
        if self.node >= self.nodes {
            return invalid(format!(
                "--node {} must be below --nodes {}",
                self.node, self.nodes
            ));
        }
        if self.value_mix.len() > MAX_VALUE_MIX {
            return invalid(format!(
                "--value-mix has {} lengths: at most {MAX_VALUE_MIX}",
                self.value_mix.len()
            ));
        }
        if let Some(bad) = self
            .value_mix
            .iter()
            .find(|len| **len < 8 || **len > self.value_size)
        {
            return invalid(format!(
                "--value-mix length {bad}: expected 8..={} (--value-size, the store's item size, bounds it; a value carries its 8-byte write id)",
                self.value_size
            ));
        }
        if self.value_size > self.max_txn_bytes {
            return invalid(format!(
                "--value-size {} exceeds --max-txn-bytes {}: raise --max-txn-bytes",
                self.value_size, self.max_txn_bytes
            ));
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
        if self.transport == TransportKind::Udp {
            self.validate_udp()?;
        }
        if !PIN_CHOICES.contains(&self.pin.as_str()) {
            return invalid(format!("--pin {} must be auto, on or off", self.pin));
        }
        self.knob_overrides()?;
        Ok(())
    }

    /// The udp transport's addresses: every node's and every group's must exist.
    fn validate_udp(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if !self.udp_hosts.is_empty() && self.udp_hosts.len() != usize::from(self.nodes) {
            return invalid(format!(
                "--udp-hosts lists {} addresses for {} nodes",
                self.udp_hosts.len(),
                self.nodes
            ));
        }
        let ports = u32::from(self.nodes) * u32::from(self.workers);
        let last = self.nodes.checked_sub(1).zip(self.workers.checked_sub(1));
        let Some(highest) = last.and_then(|(node, worker)| self.udp_port(node, worker)) else {
            return invalid(format!(
                "--udp-port-base {} with --nodes {} and --workers {} needs ports {}..={} (base + nodes * workers - 1), past 65535: use a base of at most {}",
                self.udp_port_base,
                self.nodes,
                self.workers,
                self.udp_port_base,
                u32::from(self.udp_port_base) + ports - 1,
                65_536 - ports
            ));
        };
        if (self.udp_port_base..=highest).contains(&self.multicast_port) {
            return invalid(format!(
                "--multicast-port {} lies among the nodes' ports {}..={highest} (--udp-port-base {} + nodes * workers): choose a port outside them",
                self.multicast_port, self.udp_port_base, self.udp_port_base
            ));
        }
        let top = self.workers.saturating_sub(1);
        match (self.multicast_group(0), self.multicast_group(top)) {
            (Some(first), Some(last)) if first.is_multicast() && last.is_multicast() => Ok(()),
            _ => invalid(format!(
                "--multicast-base {} with --workers {} needs groups {}..=+{top}, which must all lie within the multicast range 224.0.0.0/4",
                self.multicast_base, self.workers, self.multicast_base
            )),
        }
    }

    /// The shortest and longest value the sessions write.
    pub fn value_lengths(&self) -> (usize, usize) {
        let shortest = self.value_mix.iter().copied().min();
        let longest = self.value_mix.iter().copied().max();
        (
            shortest.unwrap_or(self.value_size),
            longest.unwrap_or(self.value_size),
        )
    }

    /// The value size as the fingerprint names it: with the mix, if there is one (a run
    /// without one fingerprints as before).
    fn value_size_fingerprint(&self) -> String {
        if self.value_mix.is_empty() {
            return self.value_size.to_string();
        }
        let mix: Vec<String> = self.value_mix.iter().map(usize::to_string).collect();
        format!("{}/{}", self.value_size, mix.join(","))
    }

    /// A hash of everything that must be equal on every node.
    pub fn fingerprint(&self) -> u64 {
        // Sessions size the leader's exactly-once table and snapshot ranges follow the keys.
        configuration_fingerprint(&[
            &self.cluster,
            &self.nodes.to_string(),
            &self.workers.to_string(),
            &self.value_size_fingerprint(),
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

/// A `usize` option's value for [`Options::integer_options`] (lossless: `usize` is at most 64
/// bits on every target rzab builds for).
fn wide(value: usize) -> i128 {
    i128::try_from(value).unwrap_or(i128::MAX)
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
            (
                vec!["--node", "0", "--value-size", "2097152"],
                "exceeds --max-txn-bytes",
            ),
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

    fn file_error(text: &str) -> ConfigError {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, text).unwrap();
        parse(&["--config", file.to_str().unwrap(), "--node", "0"]).unwrap_err()
    }

    #[test]
    fn a_file_value_of_the_wrong_type_names_the_file_key_and_type() {
        let error = file_error("window = -1\n");
        assert!(matches!(&error, ConfigError::BadValue { key, .. } if key == "window"));
        let text = error.to_string();
        assert!(text.contains("node.toml: key `window`"), "{text}");
        assert!(
            text.contains("expected a power of two in 32..=1048576"),
            "{text}"
        );
        assert!(!text.contains("unexpected argument"), "{text}");

        let error = file_error("workers = \"two\"\n").to_string();
        assert!(
            error.contains("key `workers` must be an integer, not the string \"two\""),
            "{error}"
        );
        assert!(error.contains("[range: 1..=32]"), "{error}");
        let error = file_error("json_stats = 1\n").to_string();
        assert!(
            error.contains("key `json_stats` must be a boolean, not the integer 1"),
            "{error}"
        );
        let error = file_error("inject_loss = \"5\"\n").to_string();
        assert!(error.contains("must be a number"), "{error}");
        let error = file_error("sessions = [1, 2]\n").to_string();
        assert!(error.contains("not an array"), "{error}");
        let error = file_error("udp_hosts = [\"127.0.0.1\", \"nowhere\"]\n").to_string();
        assert!(error.contains("key `udp_hosts`"), "{error}");
        let error = file_error("sessions = 257\n").to_string();
        assert!(
            error.contains("key `sessions`") && error.contains("1..=256"),
            "{error}"
        );
        assert!(matches!(
            file_error("windwo = 64\n"),
            ConfigError::UnknownKey { .. }
        ));
        assert!(matches!(
            file_error("config = \"other.toml\"\n"),
            ConfigError::UnknownKey { .. }
        ));
        // Right types pass, negative floats included where the range allows them not.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("good.toml");
        std::fs::write(
            &file,
            "window = 64\nzipf_theta = 1\ninject_loss = 0.5\nknob = \"multicast=false\"\njson_stats = true\nudp_hosts = [\"127.0.0.1\"]\nnodes = 1\n",
        )
        .unwrap();
        let options = parse(&["--config", file.to_str().unwrap(), "--node", "0"]).unwrap();
        assert_eq!(
            (options.window, options.zipf_theta, options.inject_loss),
            (64, 1.0, 0.5)
        );
        assert!(options.json_stats && options.knobs == ["multicast=false"]);
    }

    #[test]
    fn every_numeric_option_has_its_range_in_help_and_in_validate() {
        let options = parse(&["--node", "0"]).unwrap();
        let checked: Vec<&str> = options
            .integer_options()
            .iter()
            .map(|(name, _, _)| *name)
            .chain(options.float_options().iter().map(|(name, _, _)| *name))
            .collect();
        let command = Options::command();
        let mut numeric = 0;
        for arg in command.get_arguments() {
            if !matches!(TomlType::of(arg), TomlType::Integer | TomlType::Number) {
                continue;
            }
            numeric += 1;
            let long = format!("--{}", arg.get_long().unwrap());
            let help = arg.get_help().unwrap().to_string();
            assert!(help.contains("[range: "), "{long}: {help}");
            assert!(checked.contains(&long.as_str()), "{long} is not validated");
        }
        assert_eq!(numeric, checked.len());
    }

    #[test]
    fn ranges_take_their_ends_and_refuse_past_them() {
        for (option, low, high, below, above) in [
            ("--nodes", "1", "16", "0", "17"),
            ("--workers", "1", "32", "0", "33"),
            ("--sessions", "1", "256", "0", "257"),
            ("--window", "32", "1048576", "16", "2097152"),
            // Values up to the default --max-txn-bytes pass; the range itself ends at 64 MiB.
            ("--value-size", "8", "1048576", "7", "67108865"),
            ("--max-txn-bytes", "1024", "67108864", "1023", "67108865"),
            ("--join-timeout", "1", "86400", "0", "86401"),
            ("--duration", "0", "31536000", "-1", "31536001"),
            ("--verbs-gid-index", "0", "255", "-1", "256"),
            ("--inject-loss", "0", "100", "-0.5", "100.5"),
            ("--zipf-theta", "0.01", "10", "0", "NaN"),
        ] {
            for good in [low, high] {
                let arg = format!("{option}={good}");
                // udp, whose ports are many: 16 nodes of 32 workers pass the shm fabric's 64.
                let options = parse(&[
                    "--node",
                    "0",
                    "--nodes",
                    "16",
                    "--transport",
                    "udp",
                    "--udp-port-base",
                    "1000",
                    &arg,
                ])
                .unwrap();
                options
                    .validate()
                    .unwrap_or_else(|error| panic!("{arg}: {error}"));
            }
            for bad in [below, above] {
                let arg = format!("{option}={bad}");
                let error = parse(&["--node", "0", &arg]).unwrap_err().to_string();
                assert!(error.contains(option), "{arg}: {error}");
            }
        }
        // Built in code past a range, validate still refuses it.
        let mut options = parse(&["--node", "0"]).unwrap();
        options.window = 1 << 62;
        let error = options.validate().unwrap_err().to_string();
        assert!(error.contains("--window 4611686018427387904"), "{error}");
    }

    #[test]
    fn udp_ports_and_groups_must_exist() {
        let udp = |extra: &[&str]| {
            let mut args = vec!["--node", "0", "--transport", "udp"];
            args.extend_from_slice(extra);
            parse(&args).unwrap().validate()
        };
        let error = udp(&["--udp-port-base", "65535", "--nodes", "2"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--udp-port-base 65535"), "{error}");
        assert!(error.contains("65535..=65536"), "{error}");
        assert!(error.contains("at most 65534"), "{error}");
        udp(&["--udp-port-base", "65534", "--nodes", "2"]).unwrap();
        udp(&["--udp-port-base", "65533", "--nodes", "1", "--workers", "3"]).unwrap();
        assert!(udp(&["--udp-port-base", "65533", "--nodes", "2", "--workers", "2"]).is_err());
        let options = parse(&["--node", "1", "--nodes", "2", "--udp-port-base", "65534"]).unwrap();
        assert_eq!(options.udp_port(1, 0), Some(65535));
        assert_eq!(options.udp_port(1, 1), None);
        let error = udp(&["--multicast-port", "40001"]).unwrap_err().to_string();
        assert!(error.contains("--multicast-port 40001"), "{error}");
        let error = udp(&["--multicast-base", "239.255.255.255", "--workers", "2"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--multicast-base"), "{error}");
        assert!(udp(&["--multicast-base", "10.0.0.1"]).is_err());
        // Other transports do not use the udp options.
        parse(&["--node", "0", "--udp-port-base", "65535"])
            .unwrap()
            .validate()
            .unwrap();
    }
}
