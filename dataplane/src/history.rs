//! Recorded client histories, for consistency checking (`rzab-check-history` in `rzab-tests`).
//!
//! With `--history-dir DIR`, every worker records what its emulated clients did (reads with the
//! write id and zxid of the value read, write invocations and completions with their zxids and
//! value lengths) and every write it applied to the node's replica (with its value's length),
//! to its own file
//! `DIR/node{N}-worker{W}.{instance:016x}.hist` (the instance differs for every start of a data
//! plane, so a restarted node never overwrites its earlier files). [`format`] defines the bytes;
//! `docs/history-format.md` describes them.
//!
//! Off the hot path: a worker's [`WorkerHistory`] encodes fixed-size records into a preallocated
//! buffer; a buffer that is full, or holds records and was last handed over more than
//! [`HAND_OVER_INTERVAL_NS`] ago (checked at the start of an issue phase, which reads the clock
//! anyway), goes over a bounded crossbeam channel to one flusher thread per node (not a worker),
//! which appends it to the file and sends it back over another channel for reuse. So a process
//! killed without a clean shutdown loses only its last fraction of a second of records. Nothing
//! is allocated per record and a worker never blocks: with no empty buffer at hand it counts
//! the record as dropped, and the file's trailer, written once every worker has let go of its
//! recorder and everything is written, carries that count.
//!
//! Timestamps are `CLOCK_MONOTONIC` nanoseconds: one clock for every process of a host, so the
//! histories of nodes on one host compare. A recording worker reads it once per issue phase (the
//! invocation time of what it issues) and once per completed operation (after the value was read
//! or the write applied), so an operation's recorded interval always contains the real one.
//!
//! Touches: the directory and files it creates, the thread it starts, its channels; from a
//! worker, only that worker's recorder (and the replica's applied zxid, read once per issue).

pub mod format;

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rzab_shared::control_block::ControlBlock;

use crate::config::Options;
use crate::replica::{KEY_BYTES, NodeReplica, kv_txn_key};
use crate::workload::ReadObservation;
use crate::zab::{StateMachine, Txn};
use format::{
    CLOCK_MONOTONIC_ID, FileHeader, RECORD_BYTES, Record, VERSION, value_len_field, value_write_id,
};

/// Records per buffer: a buffer is about 0.9 MiB.
pub const BUFFER_RECORDS: usize = 16_384;
/// Bytes per buffer.
pub const BUFFER_BYTES: usize = BUFFER_RECORDS * RECORD_BYTES;
/// Buffers in the pool per worker (shared by a node's workers): 16 give a worker about 14 MiB,
/// a quarter of a second of recording at the fastest rates seen on a loaded 2-core test
/// machine, before a stalled flusher would make it drop records.
pub const BUFFERS_PER_WORKER: usize = 16;
/// A worker hands over a partly filled buffer once this long has passed since its last hand
/// over: what a killed process loses is about this much recording.
pub const HAND_OVER_INTERVAL_NS: u64 = 100_000_000;

/// `CLOCK_MONOTONIC` now, in nanoseconds (0 if the clock cannot be read).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec passed, which outlives the call.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if result != 0 {
        return 0;
    }
    let seconds = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    seconds.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// The file name of one worker's history.
pub fn file_name(node: u8, worker: u8, instance: u64) -> String {
    format!("node{node}-worker{worker}.{instance:016x}.hist")
}

/// Why a history could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("creating history directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating history file {path}: {source}")]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing history file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the history flusher thread: {0}")]
    Spawn(std::io::Error),
    #[error("the history flusher thread panicked")]
    FlusherPanicked,
}

/// What the flusher wrote, for the node's summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HistoryReport {
    pub files: usize,
    pub records: u64,
    pub dropped: u64,
}

/// What goes from the recorders to the flusher.
#[derive(Debug)]
enum FlushMessage {
    /// A buffer of whole records to append to `worker`'s file.
    Filled { worker: u8, buffer: Vec<u8> },
    /// `worker`'s recorder is gone; it dropped `dropped` records.
    Finished { worker: u8, dropped: u64 },
}

/// A write of one session between its invocation and its completion.
#[derive(Clone, Copy, Debug, Default)]
struct PendingWrite {
    seq: u64,
    key: u64,
    write_id: u64,
    value_len: u32,
    invoke_ns: u64,
}

/// The recording state of one worker.
#[derive(Debug)]
struct Recorder {
    worker: u8,
    buffer: Option<Vec<u8>>,
    empty: Receiver<Vec<u8>>,
    full: Sender<FlushMessage>,
    dropped: u64,
    /// By session: the write it is waiting for.
    pending: Vec<PendingWrite>,
    issue_started_ns: u64,
    applied_at_issue: u64,
    /// When the worker last handed a buffer over (or started).
    handed_over_ns: u64,
}

impl Recorder {
    /// Hands the current buffer over if the last hand-over is [`HAND_OVER_INTERVAL_NS`] old.
    fn hand_over_if_due(&mut self, now_ns: u64) {
        if now_ns.saturating_sub(self.handed_over_ns) >= HAND_OVER_INTERVAL_NS {
            self.handed_over_ns = now_ns;
            self.hand_over();
        }
    }

    fn push(&mut self, record: &Record) {
        if self.buffer.is_none() {
            self.buffer = self.empty.try_recv().ok();
        }
        let Some(buffer) = self.buffer.as_mut() else {
            self.dropped += 1;
            return;
        };
        let mut bytes = [0u8; RECORD_BYTES];
        record.encode(&mut bytes);
        // Within capacity (a full buffer is handed over below), so this never reallocates.
        buffer.extend_from_slice(&bytes);
        if buffer.len() + RECORD_BYTES > buffer.capacity() {
            // The issue phase's clock reading is recent enough to time the next hand-over.
            self.handed_over_ns = self.issue_started_ns;
            self.hand_over();
        }
    }

    /// Sends the current buffer, if it holds anything, to the flusher.
    fn hand_over(&mut self) {
        let Some(buffer) = self.buffer.take_if(|buffer| !buffer.is_empty()) else {
            return;
        };
        let records = (buffer.len() / RECORD_BYTES) as u64;
        let message = FlushMessage::Filled {
            worker: self.worker,
            buffer,
        };
        // The channel holds every buffer of the pool, so it is never full; if the flusher
        // is gone the records are lost, and counted.
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.full.try_send(message)
        {
            self.dropped += records;
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.hand_over();
        let _ = self.full.try_send(FlushMessage::Finished {
            worker: self.worker,
            dropped: self.dropped,
        });
    }
}

/// One worker's history recorder; [`WorkerHistory::disabled`] records nothing. Its methods take
/// `&self` so the worker's session and pipeline callbacks can all hold it at once.
#[derive(Debug, Default)]
pub struct WorkerHistory {
    recorder: Option<RefCell<Recorder>>,
}

impl WorkerHistory {
    fn new(
        worker: u8,
        sessions: usize,
        first: Vec<u8>,
        empty: Receiver<Vec<u8>>,
        full: Sender<FlushMessage>,
    ) -> Self {
        WorkerHistory {
            recorder: Some(RefCell::new(Recorder {
                worker,
                buffer: Some(first),
                empty,
                full,
                dropped: 0,
                pending: vec![PendingWrite::default(); sessions],
                issue_started_ns: 0,
                applied_at_issue: 0,
                handed_over_ns: monotonic_ns(),
            })),
        }
    }

    pub fn disabled() -> Self {
        WorkerHistory { recorder: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.recorder.is_some()
    }

    /// The worker is about to let its sessions issue: takes the invocation time and the
    /// node's applied zxid for what they issue now.
    pub fn begin_issue(&self, replica: &NodeReplica) {
        if let Some(recorder) = &self.recorder {
            let mut recorder = recorder.borrow_mut();
            recorder.applied_at_issue = replica.applied_zxid();
            let now_ns = monotonic_ns();
            recorder.issue_started_ns = now_ns;
            recorder.hand_over_if_due(now_ns);
        }
    }

    /// A session handed a write to the pipeline (`accepted`) or was refused.
    pub fn write_issued(&self, session: u16, seq: u64, key: u64, value: &[u8], accepted: bool) {
        let Some(recorder) = self.recorder.as_ref().filter(|_| accepted) else {
            return;
        };
        let mut recorder = recorder.borrow_mut();
        let pending = PendingWrite {
            seq,
            key,
            write_id: value_write_id(value),
            value_len: value_len_field(value.len()),
            invoke_ns: recorder.issue_started_ns,
        };
        if let Some(slot) = recorder.pending.get_mut(usize::from(session)) {
            *slot = pending;
        }
        recorder.push(&Record::WriteInvoke {
            session,
            seq,
            invoke_ns: pending.invoke_ns,
            key,
            write_id: pending.write_id,
            value_len: pending.value_len,
        });
    }

    /// A session read a value from the local store.
    pub fn read_observed(&self, read: &ReadObservation<'_>) {
        if let Some(recorder) = &self.recorder {
            let mut recorder = recorder.borrow_mut();
            let record = Record::Read {
                session: read.session,
                invoke_ns: recorder.issue_started_ns,
                complete_ns: monotonic_ns(),
                key: read.key,
                write_id: value_write_id(read.value),
                value_zxid: read.zxid,
                applied_zxid: recorder.applied_at_issue,
            };
            recorder.push(&record);
        }
    }

    /// A session's write was applied locally and the session goes on.
    pub fn write_completed(&self, session: u16, seq: u64, zxid: u64) {
        if let Some(recorder) = &self.recorder {
            let mut recorder = recorder.borrow_mut();
            let pending = recorder
                .pending
                .get(usize::from(session))
                .copied()
                .filter(|pending| pending.seq == seq)
                .unwrap_or_default();
            recorder.push(&Record::WriteComplete {
                session,
                seq,
                invoke_ns: pending.invoke_ns,
                complete_ns: monotonic_ns(),
                key: pending.key,
                write_id: pending.write_id,
                zxid,
                value_len: pending.value_len,
            });
        }
    }

    /// This worker applied a write to the node's replica: `value_prefix` holds the value's
    /// first bytes (its write id), `value_len` its whole length.
    pub fn applied(&self, zxid: u64, key: u64, value_prefix: &[u8], value_len: usize) {
        if let Some(recorder) = &self.recorder {
            recorder.borrow_mut().push(&Record::Apply {
                zxid,
                key,
                write_id: value_write_id(value_prefix),
                value_len: value_len_field(value_len),
            });
        }
    }

    /// The node's replica, with every successful apply recorded.
    pub fn replica<'a>(&'a self, replica: &'a NodeReplica) -> RecordingReplica<'a> {
        RecordingReplica {
            replica,
            history: self,
        }
    }
}

/// A [`NodeReplica`] seen through a worker's recorder: what the pipeline applies through it
/// is recorded.
#[derive(Debug)]
pub struct RecordingReplica<'a> {
    replica: &'a NodeReplica,
    history: &'a WorkerHistory,
}

impl StateMachine for RecordingReplica<'_> {
    fn try_apply(&self, zxid: u64, txn: Txn<'_>) -> bool {
        let applied = self.replica.try_apply(zxid, txn);
        if applied {
            let value = txn.skip(KEY_BYTES);
            // Only the write id is copied (the value may be a megabyte); the length is the
            // transaction's less its key, as the session wrote it, not the store's item size.
            let mut write_id = [0u8; 8];
            let copied = value.copy_to(&mut write_id);
            self.history
                .applied(zxid, kv_txn_key(txn), &write_id[..copied], value.len());
        }
        applied
    }

    fn applied_zxid(&self) -> u64 {
        self.replica.applied_zxid()
    }

    fn read_for_snapshot(&self, key: u64, out: &mut [u8]) -> Option<u64> {
        self.replica.read_for_snapshot(key, out)
    }

    // Snapshot entries are state, not applied writes: the history records only applies.
    fn install(&self, key: u64, zxid: u64, value: &[u8]) {
        self.replica.install(key, zxid, value);
    }

    fn set_base(&self, zxid: u64) {
        self.replica.set_base(zxid);
    }
}

/// Where and what a node records.
#[derive(Clone, Debug)]
pub struct HistoryConfig {
    pub dir: PathBuf,
    pub node: u8,
    pub nodes: u8,
    pub workers: u8,
    pub sessions: usize,
    pub instance: u64,
    pub started_unix_ns: u64,
    pub initial_zxid: u64,
}

/// One history file, owned by the flusher.
#[derive(Debug)]
struct HistoryFile {
    path: PathBuf,
    file: File,
    records: u64,
    dropped: u64,
    error: Option<std::io::Error>,
}

impl HistoryFile {
    fn append(&mut self, bytes: &[u8]) {
        let records = (bytes.len() / RECORD_BYTES) as u64;
        if self.error.is_some() {
            self.dropped += records;
            return;
        }
        match self.file.write_all(bytes) {
            Ok(()) => self.records += records,
            Err(error) => {
                self.error = Some(error);
                self.dropped += records;
            }
        }
    }

    /// Writes the trailer; returns the file's counts or its first error.
    fn close(mut self) -> Result<(u64, u64), HistoryError> {
        if self.error.is_none() {
            let mut trailer = [0u8; RECORD_BYTES];
            Record::Trailer {
                records: self.records,
                dropped: self.dropped,
            }
            .encode(&mut trailer);
            if let Err(error) = self.file.write_all(&trailer) {
                self.error = Some(error);
            }
        }
        match self.error {
            Some(source) => Err(HistoryError::Write {
                path: self.path,
                source,
            }),
            None => Ok((self.records, self.dropped)),
        }
    }
}

/// The flusher: appends full buffers to their files and returns them to the pool until every
/// recorder is gone, then writes the trailers.
fn flush_until_recorders_gone(
    mut files: Vec<HistoryFile>,
    full: &Receiver<FlushMessage>,
    empty: &Sender<Vec<u8>>,
) -> Result<HistoryReport, HistoryError> {
    while let Ok(message) = full.recv() {
        match message {
            FlushMessage::Filled { worker, mut buffer } => {
                if let Some(file) = files.get_mut(usize::from(worker)) {
                    file.append(&buffer);
                }
                buffer.clear();
                // The pool's channel holds every buffer, so there is always room.
                let _ = empty.try_send(buffer);
            }
            FlushMessage::Finished { worker, dropped } => {
                if let Some(file) = files.get_mut(usize::from(worker)) {
                    file.dropped += dropped;
                }
            }
        }
    }
    let mut report = HistoryReport {
        files: files.len(),
        ..HistoryReport::default()
    };
    let mut first_error = None;
    for file in files {
        match file.close() {
            Ok((records, dropped)) => {
                report.records += records;
                report.dropped += dropped;
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(report), Err)
}

/// A node's history recording: the recorders still to hand to workers and the flusher thread.
#[derive(Debug, Default)]
pub struct NodeHistory {
    recorders: Vec<Option<WorkerHistory>>,
    flusher: Option<JoinHandle<Result<HistoryReport, HistoryError>>>,
}

impl NodeHistory {
    /// Starts recording if `options.history_dir` is set; otherwise every recorder is disabled.
    pub fn start(
        options: &Options,
        block: &ControlBlock,
        replica: &NodeReplica,
    ) -> Result<NodeHistory, HistoryError> {
        let Some(dir) = &options.history_dir else {
            return Ok(NodeHistory::default());
        };
        NodeHistory::start_with(&HistoryConfig {
            dir: dir.clone(),
            node: options.node,
            nodes: options.nodes,
            workers: options.workers,
            sessions: options.sessions,
            instance: block.header.instance.load(Ordering::Relaxed),
            started_unix_ns: block.header.started_ns.load(Ordering::Relaxed),
            initial_zxid: replica.applied_zxid(),
        })
    }

    /// Creates the files (headers written), the buffer pool and the flusher thread.
    pub fn start_with(config: &HistoryConfig) -> Result<NodeHistory, HistoryError> {
        std::fs::create_dir_all(&config.dir).map_err(|source| HistoryError::CreateDir {
            path: config.dir.clone(),
            source,
        })?;
        let mut files = Vec::with_capacity(usize::from(config.workers));
        for worker in 0..config.workers {
            files.push(create_file(&config.dir, config, worker)?);
        }
        let pool = usize::from(config.workers) * BUFFERS_PER_WORKER;
        let (empty_sender, empty) = crossbeam_channel::bounded(pool);
        // Room for every buffer and every recorder's last message: sends never find it full.
        let (full, full_receiver) = crossbeam_channel::bounded(pool + usize::from(config.workers));
        let mut recorders = Vec::with_capacity(usize::from(config.workers));
        for worker in 0..config.workers {
            recorders.push(Some(WorkerHistory::new(
                worker,
                config.sessions,
                touched_buffer(),
                empty.clone(),
                full.clone(),
            )));
        }
        for _ in usize::from(config.workers)..pool {
            let _ = empty_sender.try_send(touched_buffer());
        }
        drop(full);
        let flusher = std::thread::Builder::new()
            .name(format!("rzab-history-{}", config.node))
            .spawn(move || flush_until_recorders_gone(files, &full_receiver, &empty_sender))
            .map_err(HistoryError::Spawn)?;
        Ok(NodeHistory {
            recorders,
            flusher: Some(flusher),
        })
    }

    /// Worker `worker`'s recorder (disabled when not recording, or when already taken).
    pub fn recorder(&mut self, worker: usize) -> WorkerHistory {
        self.recorders
            .get_mut(worker)
            .and_then(Option::take)
            .unwrap_or_default()
    }

    /// Waits for the flusher once every handed-out recorder has been dropped (their workers
    /// finished); returns what was written, or `None` when not recording.
    pub fn finish(mut self) -> Result<Option<HistoryReport>, HistoryError> {
        self.recorders.clear();
        let Some(flusher) = self.flusher.take() else {
            return Ok(None);
        };
        flusher
            .join()
            .map_err(|_| HistoryError::FlusherPanicked)?
            .map(Some)
    }
}

/// An empty buffer of [`BUFFER_BYTES`] capacity whose pages are already mapped, so a worker
/// never takes the page faults.
fn touched_buffer() -> Vec<u8> {
    let mut buffer = Vec::with_capacity(BUFFER_BYTES);
    // A store into every page maps it now (calloc'ed zeroes would be mapped on first use).
    for page in buffer.spare_capacity_mut().chunks_mut(4096) {
        page[0].write(0);
    }
    buffer
}

fn create_file(
    dir: &Path,
    config: &HistoryConfig,
    worker: u8,
) -> Result<HistoryFile, HistoryError> {
    let path = dir.join(file_name(config.node, worker, config.instance));
    let header = FileHeader {
        version: VERSION,
        node: config.node,
        worker,
        nodes: config.nodes,
        workers: config.workers,
        instance: config.instance,
        started_unix_ns: config.started_unix_ns,
        initial_zxid: config.initial_zxid,
        clock: CLOCK_MONOTONIC_ID,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| HistoryError::CreateFile {
            path: path.clone(),
            source,
        })?;
    file.write_all(&header.encode())
        .map_err(|source| HistoryError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(HistoryFile {
        path,
        file,
        records: 0,
        dropped: 0,
        error: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::encode_kv_txn;
    use crate::store::StoreConfig;
    use format::HEADER_BYTES;

    fn config(dir: &Path, workers: u8) -> HistoryConfig {
        HistoryConfig {
            dir: dir.to_owned(),
            node: 1,
            nodes: 3,
            workers,
            sessions: 4,
            instance: 0xabc,
            started_unix_ns: 5,
            initial_zxid: 1 << 32,
        }
    }

    fn records_of(path: &Path) -> (FileHeader, Vec<Record>) {
        let bytes = std::fs::read(path).unwrap();
        let header = FileHeader::decode(bytes[..HEADER_BYTES].try_into().unwrap()).unwrap();
        let records = bytes[HEADER_BYTES..]
            .chunks_exact(RECORD_BYTES)
            .map(|chunk| Record::decode(chunk.try_into().unwrap()).unwrap())
            .collect();
        (header, records)
    }

    #[test]
    fn recorded_operations_reach_the_file_in_order_with_a_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = NodeHistory::start_with(&config(dir.path(), 2)).unwrap();
        let replica = NodeReplica::new(&StoreConfig {
            keys: 16,
            value_size: 16,
            hugepages: false,
        })
        .unwrap();
        let recorder = history.recorder(0);
        assert!(recorder.is_enabled());
        assert!(
            !history.recorder(0).is_enabled(),
            "a recorder is handed out once"
        );
        // Shorter than the store's items: the records carry the length written, 12.
        let mut value = [0u8; 12];
        value[..8].copy_from_slice(&42u64.to_le_bytes());
        recorder.begin_issue(&replica);
        recorder.write_issued(3, 1, 7, &value, false);
        recorder.write_issued(3, 1, 7, &value, true);
        let recording = recorder.replica(&replica);
        let mut txn = [0u8; 20];
        encode_kv_txn(&mut txn, 7, &value);
        assert!(recording.try_apply((1 << 32) + 1, Txn::whole(&txn)));
        assert!(
            !recording.try_apply((1 << 32) + 3, Txn::whole(&txn)),
            "out of order"
        );
        recorder.write_completed(3, 1, (1 << 32) + 1);
        recorder.read_observed(&ReadObservation {
            session: 2,
            key: 7,
            value: &value,
            zxid: (1 << 32) + 1,
        });
        drop(recorder);
        let report = history.finish().unwrap().unwrap();
        assert_eq!(
            report,
            HistoryReport {
                files: 2,
                records: 4,
                dropped: 0
            }
        );
        let (header, records) = records_of(&dir.path().join(file_name(1, 0, 0xabc)));
        assert_eq!((header.node, header.worker, header.workers), (1, 0, 2));
        assert_eq!(header.version, VERSION);
        assert!(matches!(
            records[..],
            [
                Record::WriteInvoke {
                    session: 3,
                    seq: 1,
                    key: 7,
                    write_id: 42,
                    value_len: 12,
                    ..
                },
                Record::Apply {
                    key: 7,
                    write_id: 42,
                    value_len: 12,
                    ..
                },
                Record::WriteComplete {
                    session: 3,
                    key: 7,
                    write_id: 42,
                    zxid: 0x1_0000_0001,
                    value_len: 12,
                    ..
                },
                Record::Read {
                    session: 2,
                    write_id: 42,
                    value_zxid: 0x1_0000_0001,
                    applied_zxid: 0x1_0000_0000,
                    ..
                },
                Record::Trailer {
                    records: 4,
                    dropped: 0
                },
            ]
        ));
        if let [
            Record::WriteInvoke { invoke_ns, .. },
            ..,
            Record::Read { complete_ns, .. },
            _,
        ] = records[..]
        {
            assert!(invoke_ns > 0 && complete_ns >= invoke_ns);
        }
        let (_, untouched) = records_of(&dir.path().join(file_name(1, 1, 0xabc)));
        assert_eq!(
            untouched,
            [Record::Trailer {
                records: 0,
                dropped: 0
            }],
            "a worker that recorded nothing still gets a trailer"
        );
    }

    #[test]
    fn a_recorder_without_buffers_drops_and_counts_instead_of_blocking() {
        let (_empty_sender, empty) = crossbeam_channel::bounded(1);
        let (full, full_receiver) = crossbeam_channel::bounded(4);
        let recorder = WorkerHistory::new(0, 1, touched_buffer(), empty, full);
        for zxid in 0..(BUFFER_RECORDS + 10) as u64 {
            recorder.applied(zxid, 1, &[0; 8], 8);
        }
        drop(recorder);
        let messages: Vec<FlushMessage> = full_receiver.try_iter().collect();
        assert!(matches!(
            &messages[..],
            [
                FlushMessage::Filled { worker: 0, buffer },
                FlushMessage::Finished {
                    worker: 0,
                    dropped: 10
                }
            ] if buffer.len() == BUFFER_BYTES
        ));

        // The flusher puts the worker's count into the trailer.
        let dir = tempfile::tempdir().unwrap();
        let file = create_file(dir.path(), &config(dir.path(), 1), 0).unwrap();
        let (full, full_receiver) = crossbeam_channel::bounded(4);
        let (empty, returned) = crossbeam_channel::bounded(4);
        for message in messages {
            full.send(message).unwrap();
        }
        drop(full);
        let report = flush_until_recorders_gone(vec![file], &full_receiver, &empty).unwrap();
        assert_eq!(report.records, BUFFER_RECORDS as u64);
        assert_eq!(report.dropped, 10);
        assert_eq!(returned.len(), 1, "the buffer goes back to the pool");
        let (_, records) = records_of(&dir.path().join(file_name(1, 0, 0xabc)));
        assert_eq!(records.len(), BUFFER_RECORDS + 1);
        assert_eq!(
            records.last(),
            Some(&Record::Trailer {
                records: BUFFER_RECORDS as u64,
                dropped: 10
            })
        );
    }

    #[test]
    fn a_partly_filled_buffer_is_handed_over_once_the_last_hand_over_is_old() {
        let (empty_sender, empty) = crossbeam_channel::bounded(1);
        let (full, full_receiver) = crossbeam_channel::bounded(4);
        let history = WorkerHistory::new(0, 1, touched_buffer(), empty, full);
        let _ = empty_sender.try_send(touched_buffer());
        history.applied(1, 1, &[0; 8], 8);
        let recorder = history.recorder.as_ref().unwrap();
        let start = recorder.borrow().handed_over_ns;
        recorder
            .borrow_mut()
            .hand_over_if_due(start + HAND_OVER_INTERVAL_NS - 1);
        assert!(full_receiver.is_empty(), "not due yet");
        recorder
            .borrow_mut()
            .hand_over_if_due(start + HAND_OVER_INTERVAL_NS);
        assert!(matches!(
            full_receiver.try_recv(),
            Ok(FlushMessage::Filled { worker: 0, buffer }) if buffer.len() == RECORD_BYTES
        ));
        // Nothing recorded since: nothing to hand over, however late.
        recorder
            .borrow_mut()
            .hand_over_if_due(start + 10 * HAND_OVER_INTERVAL_NS);
        assert!(full_receiver.is_empty());
        // The next record goes into a buffer from the pool.
        history.applied(2, 1, &[0; 8], 8);
        assert_eq!(
            recorder.borrow().buffer.as_ref().map(Vec::len),
            Some(RECORD_BYTES)
        );
        assert_eq!(recorder.borrow().dropped, 0);
    }

    #[test]
    fn disabled_history_records_nothing_and_existing_files_are_never_overwritten() {
        let disabled = WorkerHistory::disabled();
        disabled.applied(1, 1, &[0; 8], 8);
        assert!(!disabled.is_enabled());
        let dir = tempfile::tempdir().unwrap();
        let history = NodeHistory::start_with(&config(dir.path(), 1)).unwrap();
        assert!(matches!(
            NodeHistory::start_with(&config(dir.path(), 1)),
            Err(HistoryError::CreateFile { .. })
        ));
        assert_eq!(history.finish().unwrap().unwrap().files, 1);
        assert_eq!(NodeHistory::default().finish().unwrap(), None);
    }

    #[test]
    fn the_option_comes_from_the_command_line_or_the_toml_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "history_dir = \"/tmp/somewhere\"\n").unwrap();
        let load = |args: &[&str]| {
            Options::load(
                std::iter::once("rzab-dataplane")
                    .chain(args.iter().copied())
                    .map(String::from)
                    .collect(),
            )
            .unwrap()
        };
        assert_eq!(load(&["--node", "0"]).history_dir, None);
        assert_eq!(
            load(&["--config", file.to_str().unwrap(), "--node", "0"]).history_dir,
            Some(PathBuf::from("/tmp/somewhere"))
        );
        assert_eq!(
            load(&["--node", "0", "--history-dir", "/x"]).history_dir,
            Some(PathBuf::from("/x"))
        );
    }
}
