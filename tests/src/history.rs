//! Consistency checking of recorded client histories (`rzab-dataplane --history-dir`, format in
//! `docs/history-format.md`): reads every worker file of a run and verifies that
//!
//! - every replica applied the identical sequence: per node process, the apply records of its
//!   workers, merged by zxid, form one contiguous run (the first process of each node starting
//!   right after the zxid it started from; a restarted process, which caught up by a snapshot,
//!   from wherever it starts), and a zxid applied by two processes carries the same key and
//!   write id on both;
//! - every write was applied at most once: its write id is at one zxid only (a duplicated
//!   datagram must not be ordered twice), unless the id was invoked more than once (an older
//!   recorder reused ids across restarts);
//! - nothing was lost: every completed write is applied at its zxid with its key and write id,
//!   by its own node and in the leader's (node 0's) sequence; every process's applied sequence
//!   reaches the zxid its own records show the node had applied (so an earlier process of a
//!   node, stopped cleanly or not, cannot lose its last applies); and every node's last
//!   process reaches the cluster's last zxid (unless lagging replicas are allowed);
//! - sessions are FIFO: one operation at a time, every completion matching its invocation's
//!   seq, key and write id, writes' sequence numbers increasing in issue order, and each
//!   write's zxid above the session's frontier (its earlier writes' zxids and the zxids of the
//!   values it read);
//! - every read returned a value some write produced (write id 0: the initial value), applied at
//!   the zxid the store reported, by a write invoked before the read completed, and no older than
//!   what the session had seen (its frontier) or than what its node had applied when the read
//!   was issued;
//! - writes are linearizable: no write completed before another was invoked yet got a larger
//!   zxid;
//! - values arrive whole: where both lengths are known (format version 2 records a write's
//!   value length on its invocation, completion and applies; 0 is unknown), every apply of a
//!   write and its completion carry its invocation's length (else the value was torn or
//!   wrongly sized on the way). Reads carry no length: the store returns a value zero-padded
//!   to its item size.
//!
//! A worker records an apply before anything it does afterwards and every worker file is a
//! prefix, in time, of what that worker recorded, so a worker's file holds every apply the
//! worker made up to the largest zxid any of its records shows the node had applied; the least
//! of these over a process's files (its `complete_to`) is a zxid up to which its applied
//! sequence must be contiguous, which it must reach, and up to which it must hold its completed
//! writes. That holds for every process; for one that shut down cleanly its files hold
//! everything, so it is checked everywhere besides.
//!
//! A process killed without shutting down (SIGKILL) leaves files without a trailer whose last
//! buffers were never written: it is reported as crashed, its whole records are checked like
//! any others, and only what the lost tail makes unknowable is excused. Beyond its
//! `complete_to` nothing is required of its applies; its writes left without a completion are
//! not violations (no process's are); a value read whose write's invocation is missing is
//! accepted when the write's node has a crashed process (the invocation may have been in the
//! lost tail).
//!
//! Touches only the files it is pointed at, read-only.

// The crate allows unwrap for its test-support helpers; the checker reads untrusted input.
#![warn(clippy::unwrap_used)]

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use rzab_dataplane::history::format::{
    FileHeader, FormatError, HEADER_BYTES, RECORD_BYTES, Record,
};

/// Why histories could not be read at all (as opposed to a [`Violation`] found in them).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no history files (*.hist) in {0}")]
    NoFiles(String),
    #[error(
        "{0}: not a history file name (expected node<N>-worker<W>.hist or node<N>-worker<W>.<instance>.hist)"
    )]
    BadName(PathBuf),
    #[error("{path}: {source}")]
    Header { path: PathBuf, source: FormatError },
    #[error("{path}: the name says node {name_node} worker {name_worker}{}, the header node {} worker {} instance {:016x}", .name_instance.map(|instance| format!(" instance {instance:016x}")).unwrap_or_default(), .header.node, .header.worker, .header.instance)]
    NameMismatch {
        path: PathBuf,
        name_node: u8,
        name_worker: u8,
        name_instance: Option<u64>,
        header: FileHeader,
    },
    #[error("{path}: {bytes} bytes is shorter than the {HEADER_BYTES}-byte header")]
    Truncated { path: PathBuf, bytes: u64 },
    /// Only for in-memory histories ([`WorkerFile::from_records`]); a file without its trailer
    /// is read as a crashed process's.
    #[error("{path}: no trailer")]
    MissingTrailer { path: PathBuf },
    #[error("{path}: the trailer counts {trailer} records but the file holds {found}")]
    CountMismatch {
        path: PathBuf,
        trailer: u64,
        found: u64,
    },
    #[error("{path}: record {index}: {source}")]
    BadRecord {
        path: PathBuf,
        index: u64,
        source: FormatError,
    },
    #[error("{path}: a trailer at record {index}, before the end")]
    EarlyTrailer { path: PathBuf, index: u64 },
    #[error(
        "{first} and {second} disagree on the cluster shape ({} x {} and {} x {} nodes x workers)", .first_shape.0, .first_shape.1, .second_shape.0, .second_shape.1
    )]
    ShapeMismatch {
        first: String,
        second: String,
        first_shape: (u8, u8),
        second_shape: (u8, u8),
    },
    #[error("{first} and {second} are the same worker of the same node process")]
    DuplicateFile { first: String, second: String },
    #[error("node {node} process {instance:016x} has no file for worker {worker}")]
    MissingWorkerFile { node: u8, instance: u64, worker: u8 },
}

/// One emulated client session of one node process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId {
    pub node: u8,
    pub instance: u64,
    pub worker: u8,
    pub session: u16,
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} worker {} session {} (process {:016x})",
            self.node, self.worker, self.session, self.instance
        )
    }
}

/// One node process: a node id and the instance id of one start of its data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Process {
    pub node: u8,
    pub instance: u64,
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {} (process {:016x})", self.node, self.instance)
    }
}

/// Why a session's operations are out of order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionOrderError {
    #[error("write seq {seq} completed without being invoked")]
    CompletionWithoutInvocation { seq: u64 },
    #[error(
        "write seq {seq} completed as write {write_id:#x} to key {key}, but was invoked as write {invoked_write_id:#x} to key {invoked_key}"
    )]
    CompletionMismatch {
        seq: u64,
        key: u64,
        write_id: u64,
        invoked_key: u64,
        invoked_write_id: u64,
    },
    #[error("invoked write seq {seq} while seq {waiting} was outstanding")]
    InvokedWhileWaiting { waiting: u64, seq: u64 },
    #[error("read while write seq {waiting} was outstanding")]
    ReadWhileWaiting { waiting: u64 },
    #[error("write seq {seq} issued after seq {previous}")]
    SeqNotIncreasing { previous: u64, seq: u64 },
    #[error(
        "write seq {seq} got zxid {zxid:#x}, not above zxid {earlier_zxid:#x} of the earlier seq {earlier_seq}"
    )]
    ZxidNotIncreasing {
        earlier_seq: u64,
        earlier_zxid: u64,
        seq: u64,
        zxid: u64,
    },
    #[error(
        "write seq {seq} got zxid {zxid:#x}, not above zxid {read_zxid:#x} of a value the session had already read"
    )]
    ZxidNotAboveRead { seq: u64, zxid: u64, read_zxid: u64 },
}

/// Why a value read cannot have been produced by a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadValue {
    #[error("no session ever invoked that write")]
    NeverInvoked,
    #[error("the write was invoked at {invoke_ns} ns, after the read completed")]
    InvokedAfterRead { invoke_ns: u64 },
    #[error("no node applied anything at that zxid")]
    NotApplied,
    #[error("that zxid applied write {write_id:#x} to key {key}")]
    Mismatch { key: u64, write_id: u64 },
    #[error("the initial value carries a zxid")]
    InitialWithZxid,
}

/// Why a completed write counts as lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LostReason {
    #[error("no node applied its zxid")]
    NeverApplied,
    #[error("its zxid applied write {write_id:#x} to key {key} instead")]
    Replaced { key: u64, write_id: u64 },
    #[error("its own node's process did not apply it")]
    NotAppliedLocally,
    #[error("the leader's (node 0's) applied sequence does not hold it")]
    NotOnLeader,
}

/// Which record carries a value length unlike its write's invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LengthSite {
    /// An apply record of `worker` of `process`, at `zxid`.
    Apply {
        process: Process,
        worker: u8,
        zxid: u64,
    },
    /// The completion of write `seq` of `session`, at `zxid`.
    Completion {
        session: SessionId,
        seq: u64,
        zxid: u64,
    },
}

impl fmt::Display for LengthSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LengthSite::Apply {
                process,
                worker,
                zxid,
            } => write!(f, "{process} worker {worker}: the apply at zxid {zxid:#x}"),
            LengthSite::Completion { session, seq, zxid } => write!(
                f,
                "{session}: the completion of write seq {seq} (zxid {zxid:#x})"
            ),
        }
    }
}

/// A consistency violation found in a history.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("{file}: {dropped} records were dropped while recording: the history is incomplete")]
    DroppedRecords { file: String, dropped: u64 },
    #[error("{process}: zxid {zxid:#x} applied twice (workers {first_worker} and {second_worker})")]
    AppliedTwice {
        process: Process,
        zxid: u64,
        first_worker: u8,
        second_worker: u8,
    },
    #[error(
        "write {write_id:#x} applied at zxid {first_zxid:#x} (key {key}) and again at zxid {zxid:#x} (key {other_key}), more often than it was invoked ({invocations})"
    )]
    DuplicateWrite {
        write_id: u64,
        key: u64,
        first_zxid: u64,
        zxid: u64,
        other_key: u64,
        invocations: u64,
    },
    #[error("{process}: the applied sequence jumps from zxid {after:#x} to {next:#x}")]
    Gap {
        process: Process,
        after: u64,
        next: u64,
    },
    #[error(
        "{process}: applied zxids {first_applied:#x}..={last_applied:#x} but not {zxid:#x}, which another process applied (a committed write lost across a change of leader)"
    )]
    SkippedCommitted {
        process: Process,
        zxid: u64,
        first_applied: u64,
        last_applied: u64,
    },
    #[error(
        "{process}: the node's first process starts applying at zxid {first:#x}, not right after {initial:#x}"
    )]
    LateStart {
        process: Process,
        first: u64,
        initial: u64,
    },
    #[error(
        "zxid {zxid:#x}: {process} applied write {write_id:#x} to key {key}, but {other} applied write {other_write_id:#x} to key {other_key}"
    )]
    Diverged {
        zxid: u64,
        process: Process,
        key: u64,
        write_id: u64,
        other: Process,
        other_key: u64,
        other_write_id: u64,
    },
    #[error(
        "{process}: its records show the node had applied zxid {complete_to:#x}, but its applied sequence stops at {last:#x}: the applies after it are lost"
    )]
    LostApplies {
        process: Process,
        last: u64,
        complete_to: u64,
    },
    #[error("{process} stops at zxid {last:#x} but the cluster applied up to {expected:#x}")]
    ReplicaBehind {
        process: Process,
        last: u64,
        expected: u64,
    },
    #[error(
        "{session}: completed write seq {seq} ({write_id:#x} to key {key}) with zxid {zxid:#x} is lost: {reason}"
    )]
    LostWrite {
        session: SessionId,
        seq: u64,
        write_id: u64,
        key: u64,
        zxid: u64,
        reason: LostReason,
    },
    #[error("{session}: {reason}")]
    SessionOrder {
        session: SessionId,
        reason: SessionOrderError,
    },
    #[error(
        "{session}: read of key {key} completed at {complete_ns} ns returned write {write_id:#x} (zxid {value_zxid:#x}), which no write produced: {reason}"
    )]
    BadValue {
        session: SessionId,
        key: u64,
        write_id: u64,
        value_zxid: u64,
        complete_ns: u64,
        reason: BadValue,
    },
    #[error(
        "{session}: stale read of key {key} at {complete_ns} ns: returned zxid {value_zxid:#x} (write {write_id:#x}), but zxid {newer_zxid:#x} wrote the key and is within {}", if *.frontier_from_session { format!("the session's frontier {frontier:#x}") } else { format!("what the node had applied before the read, {frontier:#x}") }
    )]
    StaleRead {
        session: SessionId,
        key: u64,
        write_id: u64,
        value_zxid: u64,
        newer_zxid: u64,
        frontier: u64,
        /// The bound came from the session's own frontier (else from the node's applied zxid).
        frontier_from_session: bool,
        complete_ns: u64,
    },
    #[error(
        "write zxid {earlier_zxid:#x} of {later_session} was invoked at {invoke_ns} ns, after write zxid {later_zxid:#x} of {earlier_session} completed at {complete_ns} ns, yet ordered first"
    )]
    RealTimeOrder {
        /// The write with the smaller zxid, invoked after the other completed.
        later_session: SessionId,
        earlier_zxid: u64,
        invoke_ns: u64,
        /// The write with the larger zxid, completed first.
        earlier_session: SessionId,
        later_zxid: u64,
        complete_ns: u64,
    },
    #[error(
        "{site} carries a {value_len}-byte value of write {write_id:#x} to key {key}, but the write was invoked with a {invoked_len}-byte value: a torn or wrongly sized value"
    )]
    ValueLength {
        site: LengthSite,
        key: u64,
        write_id: u64,
        value_len: u32,
        invoked_len: u32,
    },
}

impl Violation {
    /// A short name of the kind of violation, for counts.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::DroppedRecords { .. } => "dropped records",
            Violation::AppliedTwice { .. } => "applied twice",
            Violation::DuplicateWrite { .. } => "duplicate write",
            Violation::Gap { .. } => "gap",
            Violation::SkippedCommitted { .. } => "skipped committed",
            Violation::LateStart { .. } => "late start",
            Violation::Diverged { .. } => "diverged",
            Violation::LostApplies { .. } => "lost applies",
            Violation::ReplicaBehind { .. } => "replica behind",
            Violation::LostWrite { .. } => "lost write",
            Violation::SessionOrder { .. } => "session order",
            Violation::BadValue { .. } => "bad value",
            Violation::StaleRead { .. } => "stale read",
            Violation::RealTimeOrder { .. } => "real-time order",
            Violation::ValueLength { .. } => "value length",
        }
    }
}

/// What the checker may tolerate and how much it keeps.
#[derive(Clone, Copy, Debug)]
pub struct CheckOptions {
    /// Accept node processes that stopped before the cluster's last zxid (a node stopped on
    /// purpose while the others went on).
    pub allow_lagging_replicas: bool,
    /// Violations kept in the report with their details (all are counted).
    pub keep_violations: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            allow_lagging_replicas: false,
            keep_violations: 100,
        }
    }
}

/// What was checked of one node process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessReport {
    pub process: Process,
    /// When it started (CLOCK_REALTIME ns, from its headers): orders a node's processes.
    pub started_unix_ns: u64,
    pub records: u64,
    pub reads: u64,
    pub writes_invoked: u64,
    pub writes_completed: u64,
    pub applies: u64,
    /// The first and last zxid it applied.
    pub zxids: Option<(u64, u64)>,
    /// Some file of it has no trailer: the process was killed (or still runs).
    pub crashed: bool,
    /// The zxid up to which its files must hold every apply it made, which its applied
    /// sequence must reach: the least, over its files, of the largest zxid each shows the node
    /// had applied. For a crashed process, also where its record stops being known complete.
    pub complete_to: Option<u64>,
}

impl fmt::Display for ProcessReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} records, reads {}, writes invoked {}, completed {}, applies {}",
            self.process,
            self.records,
            self.reads,
            self.writes_invoked,
            self.writes_completed,
            self.applies
        )?;
        if let Some((first, last)) = self.zxids {
            write!(f, ", zxids {first:#x}..={last:#x}")?;
        }
        if self.crashed {
            write!(f, ", crashed (no trailer)")?;
            if let Some(complete_to) = self.complete_to {
                write!(f, ", applies complete to {complete_to:#x}")?;
            }
        }
        Ok(())
    }
}

/// What was checked and what was found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub files: usize,
    pub nodes: usize,
    pub processes: usize,
    /// Every node process, by node and start time.
    pub process_reports: Vec<ProcessReport>,
    pub records: u64,
    pub reads: u64,
    pub writes_invoked: u64,
    pub writes_completed: u64,
    pub applies: u64,
    /// The first and last zxid any node applied.
    pub zxids: Option<(u64, u64)>,
    pub violation_count: u64,
    pub violations_by_kind: BTreeMap<&'static str, u64>,
    /// The first violations found, up to [`CheckOptions::keep_violations`].
    pub violations: Vec<Violation>,
    keep: usize,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.violation_count == 0
    }

    /// Client operations: reads and write invocations.
    pub fn operations(&self) -> u64 {
        self.reads + self.writes_invoked
    }

    /// The node processes that did not shut down cleanly (a file without its trailer).
    pub fn crashed(&self) -> Vec<Process> {
        self.process_reports
            .iter()
            .filter(|process| process.crashed)
            .map(|process| process.process)
            .collect()
    }

    /// `node`'s processes in start order.
    pub fn processes_of(&self, node: u8) -> Vec<&ProcessReport> {
        self.process_reports
            .iter()
            .filter(|process| process.process.node == node)
            .collect()
    }

    fn violation(&mut self, violation: Violation) {
        self.violation_count += 1;
        *self.violations_by_kind.entry(violation.kind()).or_default() += 1;
        if self.violations.len() < self.keep {
            self.violations.push(violation);
        }
    }

    /// Whether any violation of `kind` ([`Violation::kind`]) was found.
    pub fn has(&self, kind: &str) -> bool {
        self.violations_by_kind.contains_key(kind)
    }
}

impl Report {
    /// The summary with up to `shown` violations in detail.
    pub fn summary(&self, shown: usize) -> ReportSummary<'_> {
        ReportSummary {
            report: self,
            shown,
        }
    }
}

/// A [`Report`] as text (see [`Report::summary`]; `Display` of a report shows 10 violations).
#[derive(Debug)]
pub struct ReportSummary<'a> {
    report: &'a Report,
    shown: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.summary(10).fmt(f)
    }
}

impl fmt::Display for ReportSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let report = self.report;
        writeln!(
            f,
            "history: {} files, {} nodes, {} node processes, {} records",
            report.files, report.nodes, report.processes, report.records
        )?;
        for process in &report.process_reports {
            writeln!(f, "  {process}")?;
        }
        writeln!(
            f,
            "operations: {} (reads {}, writes invoked {}, writes completed {}); applies {}",
            report.operations(),
            report.reads,
            report.writes_invoked,
            report.writes_completed,
            report.applies
        )?;
        match report.zxids {
            Some((first, last)) => writeln!(
                f,
                "zxids: {first:#x}..={last:#x} ({} writes ordered)",
                // Saturating: corrupt zxids may span the whole range.
                (last - first).saturating_add(1)
            )?,
            None => writeln!(f, "zxids: none applied")?,
        }
        if report.is_clean() {
            return writeln!(f, "violations: none");
        }
        let kinds: Vec<String> = report
            .violations_by_kind
            .iter()
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect();
        writeln!(
            f,
            "violations: {} ({})",
            report.violation_count,
            kinds.join(", ")
        )?;
        let shown = report.violations.len().min(self.shown);
        writeln!(f, "first {shown}:")?;
        for violation in &report.violations[..shown] {
            writeln!(f, "  {violation}")?;
        }
        Ok(())
    }
}

/// Where a worker file's records are.
#[derive(Debug)]
enum Source {
    File(PathBuf),
    Memory(Vec<Record>),
}

/// One worker's history, with its header and trailer (if any) already validated.
#[derive(Debug)]
pub struct WorkerFile {
    name: String,
    header: FileHeader,
    /// Records before the trailer; without one, every whole record.
    records: u64,
    dropped: u64,
    /// The file ends with its trailer: the process shut down cleanly. Without one, the file
    /// is a prefix of what the worker recorded and its drops are unknown.
    clean: bool,
    source: Source,
}

/// Parses `node<N>-worker<W>[.<instance hex>].hist`.
fn parse_name(name: &str) -> Option<(u8, u8, Option<u64>)> {
    let stem = name.strip_suffix(".hist")?.strip_prefix("node")?;
    let (node, rest) = stem.split_once("-worker")?;
    let (worker, instance) = match rest.split_once('.') {
        Some((worker, instance)) => (worker, Some(u64::from_str_radix(instance, 16).ok()?)),
        None => (rest, None),
    };
    Some((node.parse().ok()?, worker.parse().ok()?, instance))
}

impl WorkerFile {
    /// Opens a history file: checks its name, header, length and trailer. A file without a
    /// trailer (its process was killed, or still runs) is accepted as a crashed process's: its
    /// whole records are read and a torn last record is ignored.
    pub fn open(path: &Path) -> Result<WorkerFile, CheckError> {
        let io = |source| CheckError::Io {
            path: path.to_owned(),
            source,
        };
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        let (name_node, name_worker, name_instance) =
            parse_name(name).ok_or_else(|| CheckError::BadName(path.to_owned()))?;
        let mut file = File::open(path).map_err(io)?;
        let bytes = file.metadata().map_err(io)?.len();
        let header_bytes = HEADER_BYTES as u64;
        let record_bytes = RECORD_BYTES as u64;
        if bytes < header_bytes {
            return Err(CheckError::Truncated {
                path: path.to_owned(),
                bytes,
            });
        }
        let mut header = [0u8; HEADER_BYTES];
        file.read_exact(&mut header).map_err(io)?;
        let header = FileHeader::decode(&header).map_err(|source| CheckError::Header {
            path: path.to_owned(),
            source,
        })?;
        if header.node != name_node
            || header.worker != name_worker
            || name_instance.is_some_and(|instance| instance != header.instance)
        {
            return Err(CheckError::NameMismatch {
                path: path.to_owned(),
                name_node,
                name_worker,
                name_instance,
                header,
            });
        }
        let count = (bytes - header_bytes) / record_bytes;
        let torn = (bytes - header_bytes) % record_bytes != 0;
        let mut trailer = None;
        if count > 0 && !torn {
            file.seek(SeekFrom::End(-(RECORD_BYTES as i64)))
                .map_err(io)?;
            let mut last = [0u8; RECORD_BYTES];
            file.read_exact(&mut last).map_err(io)?;
            if let Ok(Record::Trailer { records, dropped }) =
                Record::decode_version(&last, header.version)
            {
                trailer = Some((records, dropped));
            }
        }
        let (records, dropped, clean) = match trailer {
            Some((records, _)) if records != count - 1 => {
                return Err(CheckError::CountMismatch {
                    path: path.to_owned(),
                    trailer: records,
                    found: count - 1,
                });
            }
            Some((records, dropped)) => (records, dropped, true),
            None => (count, 0, false),
        };
        Ok(WorkerFile {
            name: path.display().to_string(),
            header,
            records,
            dropped,
            clean,
            source: Source::File(path.to_owned()),
        })
    }

    /// A history held in memory (for tests): `records` must end with its trailer.
    pub fn from_records(
        name: &str,
        header: FileHeader,
        mut records: Vec<Record>,
    ) -> Result<WorkerFile, CheckError> {
        let path = PathBuf::from(name);
        let Some(Record::Trailer {
            records: counted,
            dropped,
        }) = records.pop()
        else {
            return Err(CheckError::MissingTrailer { path });
        };
        let found = records.len() as u64;
        if counted != found {
            return Err(CheckError::CountMismatch {
                path,
                trailer: counted,
                found,
            });
        }
        Ok(WorkerFile {
            name: name.to_owned(),
            header,
            records: counted,
            dropped,
            clean: true,
            source: Source::Memory(records),
        })
    }

    /// A crashed process's history held in memory (for tests): `records` without a trailer.
    pub fn from_records_without_trailer(
        name: &str,
        header: FileHeader,
        records: Vec<Record>,
    ) -> WorkerFile {
        WorkerFile {
            name: name.to_owned(),
            header,
            records: records.len() as u64,
            dropped: 0,
            clean: false,
            source: Source::Memory(records),
        }
    }

    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// Whether the file ends with its trailer (its process shut down cleanly).
    pub fn is_clean(&self) -> bool {
        self.clean
    }

    fn process(&self) -> Process {
        Process {
            node: self.header.node,
            instance: self.header.instance,
        }
    }

    /// Calls `visit` with every record before the trailer, in file order.
    fn for_each_record(&self, mut visit: impl FnMut(&Record)) -> Result<(), CheckError> {
        match &self.source {
            Source::Memory(records) => {
                for (index, record) in records.iter().enumerate() {
                    if matches!(record, Record::Trailer { .. }) {
                        return Err(CheckError::EarlyTrailer {
                            path: PathBuf::from(&self.name),
                            index: index as u64,
                        });
                    }
                    visit(record);
                }
                Ok(())
            }
            Source::File(path) => {
                let io = |source| CheckError::Io {
                    path: path.clone(),
                    source,
                };
                let mut reader = BufReader::with_capacity(1 << 20, File::open(path).map_err(io)?);
                reader
                    .seek(SeekFrom::Start(HEADER_BYTES as u64))
                    .map_err(io)?;
                let mut bytes = [0u8; RECORD_BYTES];
                for index in 0..self.records {
                    reader.read_exact(&mut bytes).map_err(io)?;
                    let record =
                        Record::decode_version(&bytes, self.header.version).map_err(|source| {
                            CheckError::BadRecord {
                                path: path.clone(),
                                index,
                                source,
                            }
                        })?;
                    if matches!(record, Record::Trailer { .. }) {
                        return Err(CheckError::EarlyTrailer {
                            path: path.clone(),
                            index,
                        });
                    }
                    visit(&record);
                }
                Ok(())
            }
        }
    }
}

/// Opens every `*.hist` file in `dirs`.
pub fn open_dirs(dirs: &[PathBuf]) -> Result<Vec<WorkerFile>, CheckError> {
    let mut paths = Vec::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(|source| CheckError::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let path = entry
                .map_err(|source| CheckError::Io {
                    path: dir.clone(),
                    source,
                })?
                .path();
            if path
                .extension()
                .is_some_and(|extension| extension == "hist")
            {
                paths.push(path);
            }
        }
    }
    if paths.is_empty() {
        let names: Vec<String> = dirs.iter().map(|dir| dir.display().to_string()).collect();
        return Err(CheckError::NoFiles(names.join(", ")));
    }
    paths.sort();
    paths.iter().map(|path| WorkerFile::open(path)).collect()
}

/// Opens and checks every history file in `dirs`.
pub fn check_dirs(dirs: &[PathBuf], options: &CheckOptions) -> Result<Report, CheckError> {
    check(&open_dirs(dirs)?, options)
}

/// A write applied at some zxid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AppliedWrite {
    key: u64,
    write_id: u64,
}

/// One apply record.
#[derive(Clone, Copy, Debug)]
struct RecordedApply {
    zxid: u64,
    write: AppliedWrite,
    worker: u8,
    /// The value's length as recorded (0: unknown). Not part of [`AppliedWrite`]: a version 1
    /// file's unknown length must not make its process diverge from a version 2 one's.
    value_len: u32,
}

/// A write whose completion was recorded.
#[derive(Clone, Copy, Debug)]
struct CompletedWrite {
    session: SessionId,
    seq: u64,
    key: u64,
    write_id: u64,
    zxid: u64,
    invoke_ns: u64,
    complete_ns: u64,
}

/// What the first pass gathers about one node process.
#[derive(Debug, Default)]
struct ProcessGathered {
    /// In file order; taken by [`merge_sequences`].
    applies: Vec<RecordedApply>,
    /// Some file has no trailer: the process was killed (or still runs).
    crashed: bool,
    /// The zxid up to which every apply it made is in its files: the least, over its files,
    /// of the largest zxid each file shows the node had applied. Taken over every file, not
    /// only a crashed process's: a process that stopped cleanly and was followed by another
    /// is held to it as much as one that was killed.
    complete_to: Option<u64>,
    records: u64,
    reads: u64,
    writes_invoked: u64,
    writes_completed: u64,
    applies_recorded: u64,
}

/// The invocations of one write id.
#[derive(Clone, Copy, Debug)]
struct Invocations {
    earliest_ns: u64,
    count: u64,
    /// The invoked value's length; 0 if unknown (a version 1 file) or if the invocations of a
    /// repeated id disagree (an apply cannot tell which one it is).
    value_len: u32,
}

/// What the first pass over all files gathers.
#[derive(Debug, Default)]
struct Gathered {
    /// By node process.
    processes: BTreeMap<Process, ProcessGathered>,
    /// By write id.
    invocations: HashMap<u64, Invocations>,
    completed: Vec<CompletedWrite>,
    /// Nodes with a crashed process: invocations of their writes may be in a lost tail.
    crashed_nodes: BTreeSet<u8>,
}

/// The zxids one node process applied.
#[derive(Debug)]
struct Applied {
    /// Ascending, each once.
    zxids: Vec<u64>,
    /// The zxid up to which the record shows whether the process applied a zxid: `u64::MAX`
    /// unless the process crashed (a clean shutdown wrote every buffer).
    known_to: u64,
    /// [`ProcessGathered::complete_to`]: its sequence must reach this far.
    complete_to: u64,
    crashed: bool,
}

impl Applied {
    fn first(&self) -> Option<u64> {
        self.zxids.first().copied()
    }

    fn last(&self) -> Option<u64> {
        self.zxids.last().copied()
    }

    fn contains(&self, zxid: u64) -> bool {
        self.zxids.binary_search(&zxid).is_ok()
    }

    /// Whether the record shows whether the process applied `zxid`.
    fn knows(&self, zxid: u64) -> bool {
        zxid <= self.known_to
    }
}

/// The cluster's applied sequence, merged over node processes.
#[derive(Debug, Default)]
struct Sequence {
    /// By zxid: the write and the first process (in node order) that applied it. A map, not
    /// a vector over the zxid range, so a corrupt zxid cannot make the checker allocate
    /// without bound.
    writes: BTreeMap<u64, (AppliedWrite, Process)>,
    /// By node process: what it applied.
    applied: BTreeMap<Process, Applied>,
    /// By key: the zxids that wrote it, ascending.
    by_key: HashMap<u64, Vec<u64>>,
}

impl Sequence {
    fn get(&self, zxid: u64) -> Option<AppliedWrite> {
        self.writes.get(&zxid).map(|(write, _)| *write)
    }

    /// The first and last zxid any process applied.
    fn range(&self) -> Option<(u64, u64)> {
        self.applied
            .values()
            .filter_map(|applied| Some((applied.first()?, applied.last()?)))
            .reduce(|(first, last), (a, b)| (first.min(a), last.max(b)))
    }

    /// The first write to `key` with a zxid above `after`.
    fn next_write_to(&self, key: u64, after: u64) -> Option<u64> {
        let zxids = self.by_key.get(&key)?;
        zxids
            .get(zxids.partition_point(|zxid| *zxid <= after))
            .copied()
    }
}

/// Checks histories already opened (see [`open_dirs`], [`WorkerFile::from_records`]).
pub fn check(files: &[WorkerFile], options: &CheckOptions) -> Result<Report, CheckError> {
    let mut report = Report {
        keep: options.keep_violations,
        files: files.len(),
        ..Report::default()
    };
    let processes = group_processes(files)?;
    report.processes = processes.len();
    report.nodes = {
        let mut nodes: Vec<u8> = processes.keys().map(|process| process.node).collect();
        nodes.dedup();
        nodes.len()
    };
    for file in files {
        report.records += file.records;
        if file.dropped > 0 {
            report.violation(Violation::DroppedRecords {
                file: file.name.clone(),
                dropped: file.dropped,
            });
        }
    }
    let mut gathered = gather(files, &mut report)?;
    let sequence = merge_sequences(&mut gathered, &processes, files, options, &mut report);
    report.zxids = sequence.range();
    report.process_reports = process_reports(&processes, files, &gathered, &sequence);
    check_completed_writes(&gathered.completed, &sequence, &mut report);
    check_real_time_order(&gathered.completed, &mut report);
    for file in files {
        check_sessions(file, &gathered, &sequence, &mut report)?;
    }
    Ok(report)
}

/// What was checked of each process, by node and start time.
fn process_reports(
    processes: &BTreeMap<Process, Vec<usize>>,
    files: &[WorkerFile],
    gathered: &Gathered,
    sequence: &Sequence,
) -> Vec<ProcessReport> {
    let mut reports: Vec<ProcessReport> = processes
        .iter()
        .map(|(process, indices)| {
            let found = gathered.processes.get(process);
            let count = |field: fn(&ProcessGathered) -> u64| found.map_or(0, field);
            ProcessReport {
                process: *process,
                started_unix_ns: files[indices[0]].header.started_unix_ns,
                records: count(|found| found.records),
                reads: count(|found| found.reads),
                writes_invoked: count(|found| found.writes_invoked),
                writes_completed: count(|found| found.writes_completed),
                applies: count(|found| found.applies_recorded),
                zxids: sequence
                    .applied
                    .get(process)
                    .and_then(|applied| Some((applied.first()?, applied.last()?))),
                crashed: found.is_some_and(|found| found.crashed),
                complete_to: found.and_then(|found| found.complete_to),
            }
        })
        .collect();
    reports.sort_by_key(|report| {
        (
            report.process.node,
            report.started_unix_ns,
            report.process.instance,
        )
    });
    reports
}

/// The files of every node process, by worker; checks that every process has every worker.
fn group_processes(files: &[WorkerFile]) -> Result<BTreeMap<Process, Vec<usize>>, CheckError> {
    let Some(first) = files.first() else {
        return Err(CheckError::NoFiles("the given files".into()));
    };
    let shape = (first.header.nodes, first.header.workers);
    let mut processes: BTreeMap<Process, Vec<Option<usize>>> = BTreeMap::new();
    for (index, file) in files.iter().enumerate() {
        let file_shape = (file.header.nodes, file.header.workers);
        if file_shape != shape {
            return Err(CheckError::ShapeMismatch {
                first: first.name.clone(),
                second: file.name.clone(),
                first_shape: shape,
                second_shape: file_shape,
            });
        }
        let workers = processes
            .entry(file.process())
            .or_insert_with(|| vec![None; usize::from(shape.1)]);
        // Decoding refuses such a header; an in-memory one has not been decoded.
        let slot = workers
            .get_mut(usize::from(file.header.worker))
            .ok_or_else(|| CheckError::Header {
                path: PathBuf::from(&file.name),
                source: FormatError::OutOfRange {
                    node: file.header.node,
                    worker: file.header.worker,
                    nodes: file.header.nodes,
                    workers: file.header.workers,
                },
            })?;
        if let Some(other) = slot {
            return Err(CheckError::DuplicateFile {
                first: files[*other].name.clone(),
                second: file.name.clone(),
            });
        }
        *slot = Some(index);
    }
    processes
        .into_iter()
        .map(|(process, workers)| {
            let indices = workers
                .iter()
                .enumerate()
                .map(|(worker, index)| {
                    index.ok_or(CheckError::MissingWorkerFile {
                        node: process.node,
                        instance: process.instance,
                        worker: u8::try_from(worker).unwrap_or(u8::MAX),
                    })
                })
                .collect::<Result<Vec<usize>, CheckError>>()?;
            Ok((process, indices))
        })
        .collect()
}

/// First pass: applies and counts by process, how far each process's record is known
/// complete, invocations by write id, completed writes.
fn gather(files: &[WorkerFile], report: &mut Report) -> Result<Gathered, CheckError> {
    let mut gathered = Gathered::default();
    for file in files {
        let process = file.process();
        let worker = file.header.worker;
        let found = gathered.processes.entry(process).or_default();
        let invocations = &mut gathered.invocations;
        let completed = &mut gathered.completed;
        found.records += file.records;
        // The largest zxid this file shows the node had applied: the worker recorded every
        // apply of its own up to it before this point of its file.
        let mut horizon = file.header.initial_zxid;
        file.for_each_record(|record| match *record {
            Record::Apply {
                zxid,
                key,
                write_id,
                value_len,
            } => {
                report.applies += 1;
                found.applies_recorded += 1;
                found.applies.push(RecordedApply {
                    zxid,
                    write: AppliedWrite { key, write_id },
                    worker,
                    value_len,
                });
                horizon = horizon.max(zxid);
            }
            Record::WriteInvoke {
                write_id,
                invoke_ns,
                value_len,
                ..
            } => {
                report.writes_invoked += 1;
                found.writes_invoked += 1;
                // With unique write ids per run there is one invocation; should ids repeat
                // (an older recorder), the earliest keeps the read checks sound and the count
                // says how often the id may be applied.
                invocations
                    .entry(write_id)
                    .and_modify(|invoked| {
                        invoked.earliest_ns = invoked.earliest_ns.min(invoke_ns);
                        invoked.count += 1;
                        if invoked.value_len != value_len {
                            invoked.value_len = 0;
                        }
                    })
                    .or_insert(Invocations {
                        earliest_ns: invoke_ns,
                        count: 1,
                        value_len,
                    });
            }
            Record::WriteComplete {
                session,
                seq,
                invoke_ns,
                complete_ns,
                key,
                write_id,
                zxid,
                ..
            } => {
                report.writes_completed += 1;
                found.writes_completed += 1;
                completed.push(CompletedWrite {
                    session: SessionId {
                        node: process.node,
                        instance: process.instance,
                        worker,
                        session,
                    },
                    seq,
                    key,
                    write_id,
                    zxid,
                    invoke_ns,
                    complete_ns,
                });
                horizon = horizon.max(zxid);
            }
            Record::Read { applied_zxid, .. } => {
                report.reads += 1;
                found.reads += 1;
                horizon = horizon.max(applied_zxid);
            }
            Record::Trailer { .. } => {}
        })?;
        found.complete_to = Some(found.complete_to.map_or(horizon, |to| to.min(horizon)));
        if !file.clean {
            found.crashed = true;
            gathered.crashed_nodes.insert(process.node);
        }
    }
    Ok(gathered)
}

/// Checks each process's applied sequence and merges them into the cluster's.
fn merge_sequences(
    gathered: &mut Gathered,
    processes: &BTreeMap<Process, Vec<usize>>,
    files: &[WorkerFile],
    options: &CheckOptions,
    report: &mut Report,
) -> Sequence {
    let mut sequence = Sequence::default();
    for (process, found) in &mut gathered.processes {
        let complete_to = found.complete_to.unwrap_or(0);
        let known_to = if found.crashed { complete_to } else { u64::MAX };
        let mut applies = std::mem::take(&mut found.applies);
        applies.sort_by_key(|apply| apply.zxid);
        let mut zxids: Vec<u64> = Vec::with_capacity(applies.len());
        let mut previous: Option<RecordedApply> = None;
        for apply in applies {
            let RecordedApply {
                zxid,
                write,
                worker,
                ..
            } = apply;
            check_applied_length(*process, &apply, &gathered.invocations, report);
            if let Some(RecordedApply {
                zxid: last,
                worker: last_worker,
                ..
            }) = previous
            {
                if last == zxid {
                    report.violation(Violation::AppliedTwice {
                        process: *process,
                        zxid,
                        first_worker: last_worker,
                        second_worker: worker,
                    });
                    continue;
                }
                // Beyond what a crashed process's files are known to hold, a missing zxid
                // may have been in a lost buffer.
                // A new epoch numbers from its own first zxid on: the jump to it is no gap
                // (what an earlier epoch committed beyond it is checked across processes).
                if !rzab_dataplane::zab::zxid_follows(last, zxid) && last < known_to {
                    report.violation(Violation::Gap {
                        process: *process,
                        after: last,
                        next: zxid,
                    });
                }
            }
            previous = Some(apply);
            zxids.push(zxid);
            match sequence.writes.entry(zxid) {
                Entry::Vacant(slot) => {
                    slot.insert((write, *process));
                }
                Entry::Occupied(slot) if slot.get().0 != write => {
                    let (other_write, other) = *slot.get();
                    report.violation(Violation::Diverged {
                        zxid,
                        process: *process,
                        key: write.key,
                        write_id: write.write_id,
                        other,
                        other_key: other_write.key,
                        other_write_id: other_write.write_id,
                    });
                }
                Entry::Occupied(_) => {}
            }
        }
        sequence.applied.insert(
            *process,
            Applied {
                zxids,
                known_to,
                complete_to,
                crashed: found.crashed,
            },
        );
    }
    for (zxid, (write, _)) in &sequence.writes {
        sequence.by_key.entry(write.key).or_default().push(*zxid);
    }
    check_no_committed_skipped(&sequence, report);
    check_writes_applied_once(&sequence, &gathered.invocations, report);
    let cluster_last = sequence.range().map(|(_, last)| last);
    check_starts_and_ends(processes, files, &sequence, cluster_last, options, report);
    sequence
}

/// Every process applied every zxid any process applied within the span of its own applies
/// (up to what its files are known to hold): with epochs, a jump in a process's sequence is
/// allowed only where no other process applied anything (a truncated uncommitted suffix).
fn check_no_committed_skipped(sequence: &Sequence, report: &mut Report) {
    for (process, applied) in &sequence.applied {
        let (Some(first), Some(last)) = (applied.zxids.first(), applied.zxids.last()) else {
            continue;
        };
        let last = (*last).min(applied.known_to);
        for zxid in sequence.writes.range(*first..=last).map(|(zxid, _)| *zxid) {
            if applied.zxids.binary_search(&zxid).is_err() {
                report.violation(Violation::SkippedCommitted {
                    process: *process,
                    zxid,
                    first_applied: *first,
                    last_applied: last,
                });
                break;
            }
        }
    }
}

/// Where the apply's and its write's invocation's value lengths are both known, they agree:
/// a replica that applied a torn or wrongly sized value recorded another length.
fn check_applied_length(
    process: Process,
    apply: &RecordedApply,
    invocations: &HashMap<u64, Invocations>,
    report: &mut Report,
) {
    let Some(invoked) = invocations.get(&apply.write.write_id) else {
        return;
    };
    if let Some((value_len, invoked_len)) = length_mismatch(apply.value_len, invoked.value_len) {
        report.violation(Violation::ValueLength {
            site: LengthSite::Apply {
                process,
                worker: apply.worker,
                zxid: apply.zxid,
            },
            key: apply.write.key,
            write_id: apply.write.write_id,
            value_len,
            invoked_len,
        });
    }
}

/// `(recorded, invoked)` if both lengths are known (nonzero) and differ.
fn length_mismatch(recorded: u32, invoked: u32) -> Option<(u32, u32)> {
    (recorded != 0 && invoked != 0 && recorded != invoked).then_some((recorded, invoked))
}

/// No write id is at more zxids than it was invoked (once, with unique ids): a write ordered
/// twice, as a duplicated request datagram could make it, would be applied twice.
fn check_writes_applied_once(
    sequence: &Sequence,
    invocations: &HashMap<u64, Invocations>,
    report: &mut Report,
) {
    // By write id: the first zxid that applied it, with its key, and how many did.
    let mut seen: HashMap<u64, (u64, u64, u64)> = HashMap::with_capacity(sequence.writes.len());
    for (zxid, (write, _)) in &sequence.writes {
        let (first_zxid, key, applied) =
            seen.entry(write.write_id).or_insert((*zxid, write.key, 0));
        *applied += 1;
        // A write whose invocation was lost with a crashed process's tail was still invoked
        // once.
        let invoked = invocations
            .get(&write.write_id)
            .map_or(1, |invoked| invoked.count.max(1));
        if *applied > invoked {
            report.violation(Violation::DuplicateWrite {
                write_id: write.write_id,
                key: *key,
                first_zxid: *first_zxid,
                zxid: *zxid,
                other_key: write.key,
                invocations: invoked,
            });
        }
    }
}

/// Each node's first process starts right after its initial zxid; every process reaches its
/// `complete_to`; each node's last process reaches the cluster's last zxid (`cluster_last`,
/// `None` when nothing was applied), unless it crashed.
fn check_starts_and_ends(
    processes: &BTreeMap<Process, Vec<usize>>,
    files: &[WorkerFile],
    sequence: &Sequence,
    cluster_last: Option<u64>,
    options: &CheckOptions,
    report: &mut Report,
) {
    // By node: its processes in start order.
    let mut by_node: BTreeMap<u8, Vec<(u64, Process, u64)>> = BTreeMap::new();
    for (process, indices) in processes {
        let header = &files[indices[0]].header;
        by_node.entry(process.node).or_default().push((
            header.started_unix_ns,
            *process,
            header.initial_zxid,
        ));
    }
    for starts in by_node.values_mut() {
        starts.sort_unstable();
        if let Some((_, process, initial)) = starts.first() {
            let expected = initial.saturating_add(1);
            if let Some(applied) = sequence.applied.get(process) {
                if let Some(first) = applied.first() {
                    if first != expected && applied.knows(expected) {
                        report.violation(Violation::LateStart {
                            process: *process,
                            first,
                            initial: *initial,
                        });
                    }
                }
            }
        }
        for (index, (_, process, initial)) in starts.iter().enumerate() {
            let Some(applied) = sequence.applied.get(process) else {
                continue;
            };
            // A node's first process applies from its initial zxid on; a later one may have
            // caught up by a snapshot, so without applies it shows no end to check.
            let last = applied.last().or_else(|| (index == 0).then_some(*initial));
            if let Some(last) = last.filter(|last| *last < applied.complete_to) {
                report.violation(Violation::LostApplies {
                    process: *process,
                    last,
                    complete_to: applied.complete_to,
                });
            }
        }
        if let (Some((_, process, initial)), Some(cluster_last)) = (starts.last(), cluster_last) {
            let applied = sequence.applied.get(process);
            if applied.is_some_and(|applied| applied.crashed) {
                continue;
            }
            let last = applied.and_then(Applied::last).unwrap_or(*initial);
            if last != cluster_last && !options.allow_lagging_replicas {
                report.violation(Violation::ReplicaBehind {
                    process: *process,
                    last,
                    expected: cluster_last,
                });
            }
        }
    }
}

/// Every completed write is applied at its zxid, by its own process and by the leader (as
/// far as a crashed process's record shows).
fn check_completed_writes(completed: &[CompletedWrite], sequence: &Sequence, report: &mut Report) {
    let leaders: Vec<&Applied> = sequence
        .applied
        .iter()
        .filter(|(process, _)| process.node == 0)
        .map(|(_, applied)| applied)
        .collect();
    for write in completed {
        let own = sequence.applied.get(&Process {
            node: write.session.node,
            instance: write.session.instance,
        });
        let zxid = write.zxid;
        let reason = match sequence.get(zxid) {
            None => Some(LostReason::NeverApplied),
            Some(applied) if applied.key != write.key || applied.write_id != write.write_id => {
                Some(LostReason::Replaced {
                    key: applied.key,
                    write_id: applied.write_id,
                })
            }
            Some(_) if own.is_none_or(|own| own.knows(zxid) && !own.contains(zxid)) => {
                Some(LostReason::NotAppliedLocally)
            }
            Some(_)
                if !leaders
                    .iter()
                    .any(|leader| leader.contains(zxid) || !leader.knows(zxid)) =>
            {
                Some(LostReason::NotOnLeader)
            }
            Some(_) => None,
        };
        if let Some(reason) = reason {
            report.violation(Violation::LostWrite {
                session: write.session,
                seq: write.seq,
                write_id: write.write_id,
                key: write.key,
                zxid,
                reason,
            });
        }
    }
}

/// No write completed before another was invoked while ordered after it: sweeping in
/// decreasing zxid order, a write invoked after the earliest completion among larger zxids
/// is a violation.
fn check_real_time_order(completed: &[CompletedWrite], report: &mut Report) {
    let mut by_zxid: Vec<&CompletedWrite> = completed.iter().collect();
    by_zxid.sort_unstable_by_key(|write| std::cmp::Reverse(write.zxid));
    let mut earliest_completion: Option<&CompletedWrite> = None;
    for write in by_zxid {
        if let Some(done) = earliest_completion {
            if done.complete_ns < write.invoke_ns && done.zxid > write.zxid {
                report.violation(Violation::RealTimeOrder {
                    later_session: write.session,
                    earlier_zxid: write.zxid,
                    invoke_ns: write.invoke_ns,
                    earlier_session: done.session,
                    later_zxid: done.zxid,
                    complete_ns: done.complete_ns,
                });
            }
        }
        if earliest_completion.is_none_or(|done| write.complete_ns < done.complete_ns) {
            earliest_completion = Some(write);
        }
    }
}

/// One session's state during the second pass.
#[derive(Clone, Copy, Debug, Default)]
struct SessionState {
    /// The largest zxid the session has observed: of its completed writes and values read.
    frontier: u64,
    /// The largest zxid of a value it read (0: none, or only initial values).
    read_frontier: u64,
    /// The write it waits for.
    waiting: Option<Invoked>,
    last_seq: Option<u64>,
    /// The last completed write: (seq, zxid).
    last_completed: Option<(u64, u64)>,
}

/// A session's outstanding write, as its invocation recorded it.
#[derive(Clone, Copy, Debug)]
struct Invoked {
    seq: u64,
    key: u64,
    write_id: u64,
    value_len: u32,
}

/// Second pass over one file: session order, values read and staleness.
fn check_sessions(
    file: &WorkerFile,
    gathered: &Gathered,
    sequence: &Sequence,
    report: &mut Report,
) -> Result<(), CheckError> {
    let process = file.process();
    let session_id = |session| SessionId {
        node: process.node,
        instance: process.instance,
        worker: file.header.worker,
        session,
    };
    let mut sessions: HashMap<u16, SessionState> = HashMap::new();
    let mut found: Vec<Violation> = Vec::new();
    file.for_each_record(|record| match *record {
        Record::WriteInvoke {
            session,
            seq,
            key,
            write_id,
            value_len,
            ..
        } => {
            let state = sessions.entry(session).or_default();
            if let Some(waiting) = state.waiting {
                found.push(Violation::SessionOrder {
                    session: session_id(session),
                    reason: SessionOrderError::InvokedWhileWaiting {
                        waiting: waiting.seq,
                        seq,
                    },
                });
            }
            if let Some(previous) = state.last_seq.filter(|previous| *previous >= seq) {
                found.push(Violation::SessionOrder {
                    session: session_id(session),
                    reason: SessionOrderError::SeqNotIncreasing { previous, seq },
                });
            }
            state.waiting = Some(Invoked {
                seq,
                key,
                write_id,
                value_len,
            });
            state.last_seq = Some(seq);
        }
        Record::WriteComplete {
            session,
            seq,
            key,
            write_id,
            zxid,
            value_len,
            ..
        } => {
            let state = sessions.entry(session).or_default();
            let invocation = state.waiting.filter(|invoked| invoked.seq == seq);
            // The recorder copies the length from the invocation, as it does the key and
            // write id; a completion that disagrees was paired with the wrong value.
            if let Some((value_len, invoked_len)) =
                invocation.and_then(|invoked| length_mismatch(value_len, invoked.value_len))
            {
                found.push(Violation::ValueLength {
                    site: LengthSite::Completion {
                        session: session_id(session),
                        seq,
                        zxid,
                    },
                    key,
                    write_id,
                    value_len,
                    invoked_len,
                });
            }
            let reason = match invocation {
                None => Some(SessionOrderError::CompletionWithoutInvocation { seq }),
                // The seq alone could match another write's completion (a recorder mixing up
                // its pending writes).
                Some(invoked) if invoked.key != key || invoked.write_id != write_id => {
                    Some(SessionOrderError::CompletionMismatch {
                        seq,
                        key,
                        write_id,
                        invoked_key: invoked.key,
                        invoked_write_id: invoked.write_id,
                    })
                }
                Some(_) => None,
            };
            if let Some(reason) = reason {
                found.push(Violation::SessionOrder {
                    session: session_id(session),
                    reason,
                });
            }
            let reason = match state.last_completed {
                Some((earlier_seq, earlier_zxid)) if earlier_zxid >= zxid => {
                    Some(SessionOrderError::ZxidNotIncreasing {
                        earlier_seq,
                        earlier_zxid,
                        seq,
                        zxid,
                    })
                }
                // A value the session read was ordered before this write was even invoked,
                // so the leader must have ordered the write after it.
                _ if state.read_frontier > 0 && state.read_frontier >= zxid => {
                    Some(SessionOrderError::ZxidNotAboveRead {
                        seq,
                        zxid,
                        read_zxid: state.read_frontier,
                    })
                }
                _ => None,
            };
            if let Some(reason) = reason {
                found.push(Violation::SessionOrder {
                    session: session_id(session),
                    reason,
                });
            }
            state.waiting = None;
            state.last_completed = Some((seq, zxid));
            state.frontier = state.frontier.max(zxid);
        }
        Record::Read {
            session,
            complete_ns,
            key,
            write_id,
            value_zxid,
            applied_zxid,
            ..
        } => {
            let state = sessions.entry(session).or_default();
            if let Some(waiting) = state.waiting {
                found.push(Violation::SessionOrder {
                    session: session_id(session),
                    reason: SessionOrderError::ReadWhileWaiting {
                        waiting: waiting.seq,
                    },
                });
            }
            let bad_value = |reason| Violation::BadValue {
                session: session_id(session),
                key,
                write_id,
                value_zxid,
                complete_ns,
                reason,
            };
            if let Some(reason) =
                value_problem(gathered, sequence, key, write_id, value_zxid, complete_ns)
            {
                found.push(bad_value(reason));
            }
            let bound = state.frontier.max(applied_zxid);
            if let Some(newer_zxid) = sequence
                .next_write_to(key, value_zxid)
                .filter(|newer| *newer <= bound)
            {
                let frontier_from_session = newer_zxid <= state.frontier;
                found.push(Violation::StaleRead {
                    session: session_id(session),
                    key,
                    write_id,
                    value_zxid,
                    newer_zxid,
                    frontier: if frontier_from_session {
                        state.frontier
                    } else {
                        applied_zxid
                    },
                    frontier_from_session,
                    complete_ns,
                });
            }
            state.frontier = state.frontier.max(value_zxid);
            state.read_frontier = state.read_frontier.max(value_zxid);
        }
        Record::Apply { .. } | Record::Trailer { .. } => {}
    })?;
    for violation in found {
        report.violation(violation);
    }
    Ok(())
}

/// Why the value `write_id` at `value_zxid` cannot be what a read of `key` completed at
/// `complete_ns` returned, if it cannot.
fn value_problem(
    gathered: &Gathered,
    sequence: &Sequence,
    key: u64,
    write_id: u64,
    value_zxid: u64,
    complete_ns: u64,
) -> Option<BadValue> {
    if write_id == 0 {
        return (value_zxid != 0).then_some(BadValue::InitialWithZxid);
    }
    // Write ids carry their node in the top byte (`workload::write_id`).
    let writer = u8::try_from(write_id >> 56).unwrap_or(u8::MAX);
    match gathered.invocations.get(&write_id) {
        // A crashed process's invocation may have been in its lost tail: the value is still
        // checked against the applied sequence.
        None if gathered.crashed_nodes.contains(&writer) => {}
        None => return Some(BadValue::NeverInvoked),
        Some(invoked) if invoked.earliest_ns > complete_ns => {
            return Some(BadValue::InvokedAfterRead {
                invoke_ns: invoked.earliest_ns,
            });
        }
        Some(_) => {}
    }
    match sequence.get(value_zxid) {
        None => Some(BadValue::NotApplied),
        Some(applied) if applied.key != key || applied.write_id != write_id => {
            Some(BadValue::Mismatch {
                key: applied.key,
                write_id: applied.write_id,
            })
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests;
