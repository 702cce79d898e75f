//! Recorded histories of real multi-process clusters pass the consistency checker: three
//! `rzab-dataplane` processes record with `--history-dir` (shm with two workers and values of
//! three lengths by `--value-mix`, udp with one worker), and both the checker library and the
//! `rzab-check-history` binary find no violation in a history with reads and writes from every
//! node; the binary fails the same history once one follower's applied write is changed, and
//! refuses what it cannot read.
//!
//! A real history, recorded once per test process from a short run in which a follower falls
//! behind and rejoins as a new process, is edited to hold one violation at a time that an
//! earlier checker let pass: a write applied at two zxids, a write ordered below a value its
//! session had read, the earlier process of the rejoined node losing its last applies, a
//! completion unlike its invocation, and an apply whose value length is not its invocation's.
//! Library and binary must fail each edited copy, naming that violation and no other.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use rzab_dataplane::history::format::{FileHeader, HEADER_BYTES, RECORD_BYTES, Record};
use rzab_tests::history::{
    CheckOptions, LengthSite, Report, SessionId, SessionOrderError, Violation, check_dirs,
};
use rzab_tests::{
    NodeOutput, NodeProcess, assert_identical_replicas, check_history, cleanup, cluster_name,
    history_args, run_cluster, wait_serving_with_reads,
};

fn common(cluster: &str, history: &Path) -> Vec<String> {
    [
        "--cluster",
        cluster,
        "--nodes",
        "3",
        "--keys",
        "2000",
        "--duration",
        "3",
        "--write-ratio",
        "200",
        "--sessions",
        "16",
        "--knob",
        "stats_interval_ms=1000",
        "--join-timeout",
        "30",
        "--history-dir",
        history.to_str().unwrap(),
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect()
}

/// Runs the checker (library and binary) on a finished cluster's history and asserts it is
/// consistent and not trivial.
fn assert_consistent_history(outputs: &[NodeOutput], history: &Path, workers: usize) {
    assert_identical_replicas(outputs);
    for output in outputs {
        let recorded = &output.summary.as_ref().unwrap()["history"];
        assert_eq!(
            recorded["files"].as_u64(),
            Some(workers as u64),
            "node {}: {recorded}",
            output.node
        );
        assert_eq!(
            recorded["dropped"].as_u64(),
            Some(0),
            "node {} dropped records",
            output.node
        );
    }
    let report = check_history("history", history, outputs);
    assert_eq!(report.files, 3 * workers);
    assert_eq!(report.processes, 3);

    let binary = Command::new(env!("CARGO_BIN_EXE_rzab-check-history"))
        .arg(history)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&binary.stdout);
    assert!(binary.status.success(), "{stdout}");
    assert!(stdout.contains("violations: none"), "{stdout}");
}

#[test]
fn three_node_shm_cluster_history_is_consistent() {
    let _serial = rzab_tests::serial();
    let cluster = cluster_name("hshm");
    cleanup(&cluster, 3);
    let history = tempfile::tempdir().unwrap();
    let mut args = common(&cluster, history.path());
    // Values of three lengths in one run: the shortest is the write id alone, the longest
    // fills the store's items, and one in between is shorter than them but too long for the
    // sessions to write the id into every byte.
    args.extend(
        [
            "--workers",
            "2",
            "--value-size",
            "4096",
            "--value-mix",
            "8,4096,1500",
        ]
        .iter()
        .map(|arg| (*arg).to_owned()),
    );
    let outputs = run_cluster(3, &args);
    cleanup(&cluster, 3);
    assert_consistent_history(&outputs, history.path(), 2);
    // Every length was invoked, applied and completed, and recorded as such.
    let mut lengths: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir(history.path()).unwrap() {
        for record in decode_file(&entry.unwrap().path()).records {
            let (kind, value_len) = match record {
                Record::WriteInvoke { value_len, .. } => ("invoke", value_len),
                Record::WriteComplete { value_len, .. } => ("complete", value_len),
                Record::Apply { value_len, .. } => ("apply", value_len),
                Record::Read { .. } | Record::Trailer { .. } => continue,
            };
            lengths.entry(kind).or_default().insert(value_len);
        }
    }
    let mix = BTreeSet::from([8, 1500, 4096]);
    assert_eq!(
        lengths,
        BTreeMap::from([
            ("apply", mix.clone()),
            ("complete", mix.clone()),
            ("invoke", mix)
        ])
    );

    // The same history with one write changed in one follower's applied sequence fails.
    plant_divergence(history.path());
    let binary = Command::new(env!("CARGO_BIN_EXE_rzab-check-history"))
        .arg(history.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&binary.stdout);
    assert_eq!(binary.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("diverged 1"), "{stdout}");
}

/// Changes the write id of the first apply record in node 2's worker-0 file.
fn plant_divergence(history: &Path) {
    let path = std::fs::read_dir(history)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("node2-worker0.")
        })
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let at = (HEADER_BYTES..bytes.len())
        .step_by(RECORD_BYTES)
        .find(|at| {
            let record: &[u8; RECORD_BYTES] = bytes[*at..*at + RECORD_BYTES].try_into().unwrap();
            matches!(Record::decode(record), Ok(Record::Apply { .. }))
        })
        .unwrap();
    bytes[at + 32] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn three_node_udp_cluster_history_is_consistent() {
    let _serial = rzab_tests::serial();
    let cluster = cluster_name("hudp");
    cleanup(&cluster, 3);
    let history = tempfile::tempdir().unwrap();
    let base = 30_000 + (std::process::id() % 1_000) as u16 * 10;
    let mut args = common(&cluster, history.path());
    args.extend([
        "--workers".into(),
        "1".into(),
        "--transport".into(),
        "udp".into(),
        "--udp-port-base".into(),
        base.to_string(),
        "--multicast-port".into(),
        (base + 9).to_string(),
    ]);
    let outputs = run_cluster(3, &args);
    cleanup(&cluster, 3);
    assert_consistent_history(&outputs, history.path(), 1);
}

#[test]
fn the_checker_binary_refuses_what_it_cannot_read() {
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_rzab-check-history"))
        .arg(empty.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no history files"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let usage = Command::new(env!("CARGO_BIN_EXE_rzab-check-history"))
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

/// One worker file of a recorded history, decoded.
#[derive(Clone, Debug)]
struct HistoryFile {
    name: String,
    header: FileHeader,
    /// Every record before the trailer.
    records: Vec<Record>,
}

impl HistoryFile {
    fn process(&self) -> (u8, u64) {
        (self.header.node, self.header.instance)
    }
}

/// A short recorded run of three shm nodes with two workers and one session per worker, in
/// which node 2 (reading only, so that none of the writes it applies are its own) is stopped
/// (SIGSTOP) until the leader has left it behind, so that it stops cleanly and rejoins as a
/// new process that catches up by snapshot. Recorded and decoded once per test process; each
/// case edits its own copy.
fn recorded_run() -> &'static [HistoryFile] {
    static RUN: OnceLock<Vec<HistoryFile>> = OnceLock::new();
    RUN.get_or_init(record_run)
}

fn record_run() -> Vec<HistoryFile> {
    let _serial = rzab_tests::serial();
    let cluster = cluster_name("hedit");
    cleanup(&cluster, 3);
    let history = tempfile::tempdir().unwrap();
    let mut args = rzab_tests::three_node_args(&cluster);
    args.extend(history_args(history.path()));
    // A window of 64 prepares and a committed-transaction ring of 256 KiB (2,048 prepares per
    // pipeline): the leader leaves a stopped follower behind after a few thousand writes, and
    // the history stays small.
    args.extend(
        [
            "--workers",
            "2",
            "--keys",
            "2000",
            "--sessions",
            "1",
            "--window",
            "64",
            "--committed-ring-bytes",
            "262144",
        ]
        .iter()
        .map(|arg| (*arg).to_owned()),
    );
    let mut reader_args = args.clone();
    reader_args.extend(["--write-ratio".to_owned(), "0".to_owned()]);
    let processes: Vec<NodeProcess> = (0..3u8)
        .map(|node| NodeProcess::start(node, if node == 2 { &reader_args } else { &args }))
        .collect();
    let block_of = |node: u8| PathBuf::from(format!("/dev/shm/rzab-{cluster}-n{node}"));
    let leader = rzab_tests::attach_running(&block_of(0));
    let first = rzab_tests::attach_running(&block_of(2));
    wait_serving_with_reads(&first, "node 2");
    let first_instance = rzab_tests::instance_of(&first);
    drop(first);
    // A stretch of traffic for the first process to record before it is stopped.
    std::thread::sleep(Duration::from_millis(200));

    processes[2].signal("STOP");
    let stopped_at = rzab_tests::applied_zxid(&leader);
    rzab_tests::ops::wait_until("the leader commits without node 2", || {
        rzab_tests::applied_zxid(&leader) >= stopped_at + 20_000
    });
    processes[2].signal("CONT");
    let rejoined = rzab_tests::attach_running_instance(&block_of(2), Some(first_instance));
    wait_serving_with_reads(&rejoined, "the rejoined node 2");
    drop((leader, rejoined));
    // And for its successor.
    std::thread::sleep(Duration::from_millis(200));
    for process in &processes {
        process.terminate();
    }
    let outputs: Vec<NodeOutput> = processes.into_iter().map(NodeProcess::finish).collect();
    cleanup(&cluster, 3);
    for output in &outputs {
        assert!(
            output.success,
            "node {} failed:\n{}\n{}",
            output.node, output.stdout, output.stderr
        );
    }
    assert!(
        outputs[2]
            .stdout
            .contains("fell behind the leader: starting again"),
        "{}",
        outputs[2].stdout
    );
    let report = check_history("hedit", history.path(), &outputs);
    assert_eq!(report.processes_of(2).len(), 2, "{report}");
    assert!(report.crashed().is_empty(), "{report}");
    let mut files: Vec<HistoryFile> = std::fs::read_dir(history.path())
        .unwrap()
        .map(|entry| decode_file(&entry.unwrap().path()))
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files
}

/// Reads a history file that ends with its trailer.
fn decode_file(path: &Path) -> HistoryFile {
    let bytes = std::fs::read(path).unwrap();
    let header = FileHeader::decode(bytes[..HEADER_BYTES].try_into().unwrap()).unwrap();
    let mut records: Vec<Record> = bytes[HEADER_BYTES..]
        .chunks_exact(RECORD_BYTES)
        .map(|chunk| Record::decode(chunk.try_into().unwrap()).unwrap())
        .collect();
    assert!(
        matches!(records.pop(), Some(Record::Trailer { dropped: 0, .. })),
        "{}",
        path.display()
    );
    HistoryFile {
        name: path.file_name().unwrap().to_string_lossy().into_owned(),
        header,
        records,
    }
}

/// Writes `files` into `dir`, each with a trailer counting its records (as a clean shutdown
/// would have written it).
fn write_files(dir: &Path, files: &[HistoryFile]) {
    for file in files {
        let mut bytes = file.header.encode().to_vec();
        let trailer = Record::Trailer {
            records: file.records.len() as u64,
            dropped: 0,
        };
        for record in file.records.iter().chain([&trailer]) {
            let mut encoded = [0u8; RECORD_BYTES];
            record.encode(&mut encoded);
            bytes.extend_from_slice(&encoded);
        }
        std::fs::write(dir.join(&file.name), bytes).unwrap();
    }
}

/// Writes `files` into a fresh directory and checks it with the library and with the binary,
/// which must fail it with violations of `kind` only; returns the library's report.
fn check_edited(files: &[HistoryFile], kind: &str) -> Report {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), files);
    let report = check_dirs(&[dir.path().to_owned()], &CheckOptions::default()).unwrap();
    let binary = Command::new(env!("CARGO_BIN_EXE_rzab-check-history"))
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&binary.stdout);
    assert_eq!(binary.status.code(), Some(1), "{stdout}");
    let count = report.violation_count;
    assert!(
        stdout.contains(&format!("violations: {count} ({kind} {count})")),
        "expected only {kind} violations:\n{stdout}"
    );
    report
}

/// The leader's (node 0's) applied sequence: by zxid, (key, write id).
fn leader_sequence(files: &[HistoryFile]) -> BTreeMap<u64, (u64, u64)> {
    files
        .iter()
        .filter(|file| file.header.node == 0)
        .flat_map(|file| &file.records)
        .filter_map(|record| match *record {
            Record::Apply {
                zxid,
                key,
                write_id,
                ..
            } => Some((zxid, (key, write_id))),
            _ => None,
        })
        .collect()
}

/// By key: the zxids that wrote it, ascending.
fn writes_by_key(sequence: &BTreeMap<u64, (u64, u64)>) -> HashMap<u64, Vec<u64>> {
    let mut by_key: HashMap<u64, Vec<u64>> = HashMap::new();
    for (zxid, (key, _)) in sequence {
        by_key.entry(*key).or_default().push(*zxid);
    }
    by_key
}

/// The first zxid above `after` that wrote `key`.
fn next_write_to(by_key: &HashMap<u64, Vec<u64>>, key: u64, after: u64) -> Option<u64> {
    let zxids = by_key.get(&key)?;
    zxids
        .get(zxids.partition_point(|zxid| *zxid <= after))
        .copied()
}

#[test]
fn a_write_applied_at_two_zxids_fails_a_recorded_history() {
    // As if a duplicated request datagram had made the leader order write X a second time:
    // the next write Y to X's key is replaced by X everywhere, at its zxid, in every replica
    // and in every read of it, and Y's own invocation and completion are gone.
    let mut files = recorded_run().to_vec();
    let sequence = leader_sequence(&files);
    let by_key = writes_by_key(&sequence);
    let completed: HashSet<u64> = files
        .iter()
        .flat_map(|file| &file.records)
        .filter_map(|record| match *record {
            Record::WriteComplete { write_id, .. } => Some(write_id),
            _ => None,
        })
        .collect();
    let ((x_zxid, x), (y_zxid, y), key) = sequence
        .iter()
        .skip(sequence.len() / 2)
        .find_map(|(zxid, (key, id))| {
            let next = next_write_to(&by_key, *key, *zxid)?;
            let (_, next_id) = sequence[&next];
            (completed.contains(id) && completed.contains(&next_id)).then_some((
                (*zxid, *id),
                (next, next_id),
                *key,
            ))
        })
        .expect("two completed writes to one key");
    for file in &mut files {
        file.records.retain(|record| {
            !matches!(
                *record,
                Record::WriteInvoke { write_id, .. } | Record::WriteComplete { write_id, .. }
                    if write_id == y
            )
        });
        for record in &mut file.records {
            match record {
                Record::Apply { zxid, write_id, .. } if *zxid == y_zxid => *write_id = x,
                Record::Read {
                    write_id,
                    value_zxid,
                    ..
                } if *value_zxid == y_zxid => *write_id = x,
                _ => {}
            }
        }
    }
    let report = check_edited(&files, "duplicate write");
    assert!(
        matches!(
            report.violations[..],
            [Violation::DuplicateWrite { write_id, key: first_key, first_zxid, zxid, other_key, invocations: 1 }]
                if write_id == x && first_zxid == x_zxid && zxid == y_zxid && first_key == key && other_key == key
        ),
        "{report}"
    );
}

/// One session's record, with where it is in its file.
#[derive(Clone, Copy, Debug)]
struct SessionRecord {
    index: usize,
    record: Record,
}

/// By session: its records in file order.
fn sessions_of(file: &HistoryFile) -> BTreeMap<u16, Vec<SessionRecord>> {
    let mut sessions: BTreeMap<u16, Vec<SessionRecord>> = BTreeMap::new();
    for (index, record) in file.records.iter().enumerate() {
        let session = match *record {
            Record::Read { session, .. }
            | Record::WriteInvoke { session, .. }
            | Record::WriteComplete { session, .. } => session,
            Record::Apply { .. } | Record::Trailer { .. } => continue,
        };
        sessions.entry(session).or_default().push(SessionRecord {
            index,
            record: *record,
        });
    }
    sessions
}

/// A read to turn into a read of a later value: the read is at `index` in file `file`, its
/// session's next write completed as `seq` at `write_zxid`, and the write at `value_zxid`
/// (above it) was invoked before the read completed.
#[derive(Debug)]
struct ReadFromAbove {
    file: usize,
    index: usize,
    session: u16,
    seq: u64,
    write_zxid: u64,
    value_zxid: u64,
}

/// Finds a session's read followed by its write, and the first write above that write's zxid
/// invoked before the read completed, such that no later operation of the session would be
/// judged differently with that write's zxid in its frontier (so that the edit breaks nothing
/// else).
fn read_from_above(files: &[HistoryFile]) -> ReadFromAbove {
    let sequence = leader_sequence(files);
    let by_key = writes_by_key(&sequence);
    let invoked: HashMap<u64, u64> = files
        .iter()
        .flat_map(|file| &file.records)
        .filter_map(|record| match *record {
            Record::WriteInvoke {
                write_id,
                invoke_ns,
                ..
            } => Some((write_id, invoke_ns)),
            _ => None,
        })
        .collect();
    for (file_index, file) in files.iter().enumerate() {
        for (session, records) in sessions_of(file) {
            for (position, pair) in records.windows(3).enumerate() {
                let (
                    Record::Read { complete_ns, .. },
                    Record::WriteInvoke { .. },
                    Record::WriteComplete {
                        seq,
                        zxid: write_zxid,
                        ..
                    },
                ) = (pair[0].record, pair[1].record, pair[2].record)
                else {
                    continue;
                };
                // Writes invoked before the read are ordered soon after the session's write,
                // if at all.
                let Some(value_zxid) =
                    sequence
                        .range(write_zxid + 1..)
                        .take(64)
                        .find_map(|(zxid, (_, id))| {
                            invoked
                                .get(id)
                                .is_some_and(|invoke_ns| *invoke_ns < complete_ns)
                                .then_some(*zxid)
                        })
                else {
                    continue;
                };
                let later = &records[position + 3..];
                let unaffected = later
                    .iter()
                    .map_while(|later| match later.record {
                        // Beyond this, the session's own frontier covers the value.
                        Record::WriteComplete { zxid, .. } if zxid > value_zxid => None,
                        Record::Read {
                            value_zxid: seen, ..
                        } if seen >= value_zxid => None,
                        other => Some(other),
                    })
                    .all(|later| match later {
                        Record::WriteComplete { .. } => false,
                        Record::Read {
                            key,
                            value_zxid: seen,
                            ..
                        } => next_write_to(&by_key, key, seen).is_none_or(|next| next > value_zxid),
                        _ => true,
                    });
                if unaffected && records.len() / 4 < position {
                    return ReadFromAbove {
                        file: file_index,
                        index: pair[0].index,
                        session,
                        seq,
                        write_zxid,
                        value_zxid,
                    };
                }
            }
        }
    }
    panic!("no read followed by its session's write");
}

#[test]
fn a_write_ordered_below_a_value_its_session_read_fails_a_recorded_history() {
    // A session's read is changed to have returned a value ordered after the session's next
    // write (a value whose write was invoked before the read completed): the write, invoked
    // after the read, cannot have been ordered before it.
    let mut files = recorded_run().to_vec();
    let found = read_from_above(&files);
    let (key, write_id) = leader_sequence(&files)[&found.value_zxid];
    let file = &mut files[found.file];
    let Record::Read {
        key: read_key,
        write_id: read_write_id,
        value_zxid: read_zxid,
        ..
    } = &mut file.records[found.index]
    else {
        unreachable!("read_from_above finds reads");
    };
    (*read_key, *read_write_id, *read_zxid) = (key, write_id, found.value_zxid);
    let (node, instance, worker) = (file.header.node, file.header.instance, file.header.worker);
    let report = check_edited(&files, "session order");
    assert!(
        matches!(
            report.violations[..],
            [Violation::SessionOrder {
                session,
                reason: SessionOrderError::ZxidNotAboveRead { seq, zxid, read_zxid },
            }] if session == SessionId { node, instance, worker, session: found.session }
                && seq == found.seq && zxid == found.write_zxid && read_zxid == found.value_zxid
        ),
        "{found:?}: {report}"
    );
}

/// The least, over `files`, of the largest zxid each file's records show the node had
/// applied: how far the checker knows a process's applies complete.
fn complete_to(files: &[&HistoryFile]) -> u64 {
    files
        .iter()
        .map(|file| {
            file.records
                .iter()
                .filter_map(|record| match *record {
                    Record::Apply { zxid, .. } | Record::WriteComplete { zxid, .. } => Some(zxid),
                    Record::Read { applied_zxid, .. } => Some(applied_zxid),
                    Record::WriteInvoke { .. } | Record::Trailer { .. } => None,
                })
                .fold(file.header.initial_zxid, u64::max)
        })
        .min()
        .unwrap()
}

#[test]
fn an_earlier_process_losing_its_last_applies_fails_a_recorded_history() {
    // Node 2's first process, which stopped cleanly when it fell behind and was followed by
    // the rejoined one, loses its last applies: its reads show the node had applied them.
    // None were of its own writes (it only read), so no completion goes missing with them.
    let mut files = recorded_run().to_vec();
    let first = files
        .iter()
        .filter(|file| file.header.node == 2)
        .min_by_key(|file| file.header.started_unix_ns)
        .unwrap()
        .process();
    let of_first = |file: &&mut HistoryFile| file.process() == first;
    let shown = complete_to(
        &files
            .iter()
            .filter(|file| file.process() == first)
            .collect::<Vec<_>>(),
    );
    let cut = shown - 64;
    for file in files.iter_mut().filter(of_first) {
        file.records
            .retain(|record| !matches!(*record, Record::Apply { zxid, .. } if zxid > cut));
    }
    let still_shown = complete_to(
        &files
            .iter()
            .filter(|file| file.process() == first)
            .collect::<Vec<_>>(),
    );
    assert!(
        still_shown > cut,
        "its reads show the node had applied beyond the cut"
    );
    let report = check_edited(&files, "lost applies");
    assert!(
        matches!(
            report.violations[..],
            [Violation::LostApplies { process, last, complete_to }]
                if (process.node, process.instance) == first && last == cut && complete_to == still_shown
        ),
        "{report}"
    );
}

#[test]
fn a_completion_unlike_its_invocation_fails_a_recorded_history() {
    // A write invocation in the middle of node 1's worker-0 file names another key than its
    // completion (which has the same session and seq).
    let mut files = recorded_run().to_vec();
    let file = files
        .iter_mut()
        .find(|file| (file.header.node, file.header.worker) == (1, 0))
        .unwrap();
    let invocations: Vec<usize> = file
        .records
        .iter()
        .enumerate()
        .filter(|(_, record)| matches!(record, Record::WriteInvoke { .. }))
        .map(|(index, _)| index)
        .collect();
    let Record::WriteInvoke {
        seq: changed_seq,
        key,
        ..
    } = &mut file.records[invocations[invocations.len() / 2]]
    else {
        unreachable!("an invocation");
    };
    let (seq, original) = (*changed_seq, *key);
    *key = original ^ 1;
    let report = check_edited(&files, "session order");
    assert!(
        matches!(
            report.violations[..],
            [Violation::SessionOrder {
                reason: SessionOrderError::CompletionMismatch { seq: completed_seq, key, invoked_key, write_id, invoked_write_id },
                ..
            }] if completed_seq == seq && key == original && invoked_key == original ^ 1 && write_id == invoked_write_id
        ),
        "{report}"
    );
}

#[test]
fn an_apply_of_another_length_than_its_invocation_fails_a_recorded_history() {
    // One apply in the middle of node 1's worker-1 file records one byte more than the write
    // was invoked with, as if the replica had applied a wrongly sized value (every other
    // process applied that zxid with the invoked length).
    let mut files = recorded_run().to_vec();
    let file = files
        .iter_mut()
        .find(|file| (file.header.node, file.header.worker) == (1, 1))
        .unwrap();
    let instance = file.header.instance;
    let applies: Vec<usize> = file
        .records
        .iter()
        .enumerate()
        .filter(|(_, record)| matches!(record, Record::Apply { .. }))
        .map(|(index, _)| index)
        .collect();
    let Record::Apply {
        zxid,
        write_id,
        value_len,
        ..
    } = &mut file.records[applies[applies.len() / 2]]
    else {
        unreachable!("an apply");
    };
    let (changed_zxid, changed_id, invoked) = (*zxid, *write_id, *value_len);
    assert!(invoked > 0, "a version 2 history records lengths");
    *value_len += 1;
    let report = check_edited(&files, "value length");
    assert!(
        matches!(
            report.violations[..],
            [Violation::ValueLength {
                site: LengthSite::Apply { process, worker: 1, zxid },
                write_id,
                value_len,
                invoked_len,
                ..
            }] if (process.node, process.instance) == (1, instance) && zxid == changed_zxid
                && write_id == changed_id && value_len == invoked + 1 && invoked_len == invoked
        ),
        "{report}"
    );
}
