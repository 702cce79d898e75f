//! Harnesses for fuzzing every decoder of untrusted input, shared by the cargo-fuzz targets in
//! `fuzz/` and by the stable regression test `tests/fuzz_corpus.rs`, so both check exactly the
//! same thing. Not part of the data plane's API (hidden from the docs), and not in the
//! production library: built only with the `testing` feature, which the fuzz crate and the
//! data plane's own tests enable.
//!
//! Each harness takes raw bytes, never panics on its own account, and returns a
//! [`Violation`] when an invariant does not hold; a panic inside the code under test is a
//! finding too. The harnesses check, besides "no panic":
//! - [`wire_decode`]: a decoded message has the header fields the configuration allows, every
//!   accessor of its kind reads within the datagram, and encoding it again decodes to the same.
//! - [`pipeline_input`]: a sequence of datagrams (and local writes) goes through the worker's
//!   decode-and-route into the real state machines of one node (every pipeline, a real
//!   [`NodeReplica`] and store); the node applies zxids strictly one after another, the store
//!   holds exactly what was applied through the replica, every message the state machines emit
//!   decodes under their own configuration, and their counters only move forward.
//! - [`endpoint_decode`]: binary and JSON endpoint decoding; what decodes, round-trips.
//! - [`knobs_parse`]: knob values as JSON (the REST body) and as text (`NAME=VALUE`); what is
//!   accepted is within the knob's range and round-trips through its rendering.
//!
//! The capture configuration ([`CAPTURE`]) is the one `fuzz/capture-corpus.sh` runs a real
//! cluster with, so the committed corpus decodes under it. The pipeline input format is
//! [`encode_pipeline_input`]'s, defined in the always-built [`crate::pipeline_input`] because
//! the capturing transport writes it.
//!
//! Touches only memory it allocates (a small store per pipeline run).

use std::cell::RefCell;

use arbitrary::Unstructured;
use rzab_shared::knobs::{KNOBS, KnobKind, KnobSpec};
use rzab_shared::limits::{ENDPOINT_BYTES, MAX_NODES};
use rzab_shared::{EndpointAddress, EndpointDecodeError, EndpointRecord, Knob};

use crate::replica::NodeReplica;
use crate::replica::{KEY_BYTES, encode_kv_txn, kv_txn_key, kv_txn_len};
use crate::store::StoreConfig;
use crate::zab::follower::LEADER_NODE;
use crate::zab::node::{Node, Role};
use crate::zab::wire::{self, Kind, Message};
use crate::zab::{
    CatchupBoard, Completions, FollowerWords, LEADER_EPOCH, Limits, Outbox, PipelineConfig,
    StateMachine, Target, Txn, ZXID_START, ZxidSource, leader_words,
};

/// An invariant that did not hold, with what was seen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invariant violated: {0}")]
pub struct Violation(pub String);

macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(Violation(format!($($message)+)));
        }
    };
}

/// The configuration the committed corpus was captured with (`fuzz/capture-corpus.sh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    pub cluster: &'static str,
    /// `--run-id` of the capture runs.
    pub run_id: &'static str,
    /// The cluster secret of the udp capture run: public on purpose, so that the harnesses
    /// can check its MACs. Never use it for anything else.
    pub secret: &'static [u8],
    pub nodes: u8,
    pub pipelines: u8,
    /// `--value-size`: the store's item size, and the longest value.
    pub value_len: usize,
    /// `--value-mix`: the value lengths writes take in turn, so the capture holds small
    /// transactions batched many to a datagram and large ones in fragments.
    pub value_mix: &'static [usize],
    pub keys: u64,
    pub window: usize,
    pub sessions: usize,
}

/// See [`CaptureConfig`]; `fuzz/capture-corpus.sh` passes the same values to rzab-dataplane.
pub const CAPTURE: CaptureConfig = CaptureConfig {
    cluster: "fuzzcap",
    run_id: "fuzzcap",
    secret: b"fuzzcap: a published test secret",
    nodes: 3,
    pipelines: 2,
    value_len: 4096,
    value_mix: &[32, 4096],
    keys: 1024,
    window: 1024,
    sessions: 32,
};

/// The parameters of [`Message::decode`] besides the datagram.
pub type WireParams = wire::WireContext;

/// The decoding context of the capture configuration, with no integrity check: mutated
/// datagrams must reach the decoder and the state machines behind it (the checks have their
/// own harness part, [`check_integrity`]).
pub fn capture_params() -> WireParams {
    wire::WireContext {
        cluster_tag: wire::cluster_tag(CAPTURE.cluster),
        run: wire::run_tag(CAPTURE.run_id),
        slot_len: capture_config().slot_len,
        max_txn_len: capture_config().max_txn_len,
        snapshot_slot_len: capture_config().snapshot_slot_len(),
        nodes: usize::from(CAPTURE.nodes),
        pipelines: usize::from(CAPTURE.pipelines),
        integrity: wire::Integrity::Unchecked,
    }
}

/// The MAC the udp capture run sealed with.
pub fn capture_mac() -> wire::Integrity {
    wire::Integrity::mac(CAPTURE.secret, wire::run_tag(CAPTURE.run_id))
}

/// Whatever `datagram` is, checking it under the capture's CRC32C and MAC never panics and
/// either refuses it as [`wire::WireError::BadCheck`] or decodes it exactly as the unchecked
/// decoder does; and a datagram the unchecked decoder accepts, sealed again with either,
/// decodes to the same contents under it. Returns how many checks passed as they were.
fn check_integrity(datagram: &[u8], params: &WireParams) -> Result<u32, Violation> {
    let unchecked = params.decode(datagram);
    let mut verified = 0;
    for integrity in [wire::Integrity::Crc32c, capture_mac()] {
        let checked = WireParams {
            integrity,
            ..*params
        };
        match (checked.decode(datagram), &unchecked) {
            (Ok(message), Ok(plain)) => {
                ensure!(
                    contents(&message) == contents(plain),
                    "{} changed what a datagram decodes to",
                    integrity.name()
                );
                verified += 1;
            }
            (Ok(_), Err(error)) => {
                return Err(Violation(format!(
                    "{} accepted what the decoder refuses ({error})",
                    integrity.name()
                )));
            }
            (Err(wire::WireError::BadCheck), Ok(_)) => {}
            (Err(error), Ok(_)) => {
                return Err(Violation(format!(
                    "{} refused a decodable datagram as {error}",
                    integrity.name()
                )));
            }
            (Err(_), Err(_)) => {}
        }
        if let Ok(plain) = &unchecked {
            let mut sealed = datagram.to_vec();
            wire::seal(&mut sealed, &integrity);
            match checked.decode(&sealed) {
                Ok(message) => ensure!(
                    contents(&message) == contents(plain),
                    "sealing with {} changed the contents",
                    integrity.name()
                ),
                Err(error) => {
                    return Err(Violation(format!(
                        "sealed with {} but refused: {error}",
                        integrity.name()
                    )));
                }
            }
        }
    }
    Ok(verified)
}

// ---------------------------------------------------------------------------------------------
// wire_decode

/// What [`wire_decode`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireOutcome {
    /// The kind decoded under the capture configuration, if any.
    pub capture_kind: Option<Kind>,
    /// Decodes (of the three parameter choices) that succeeded.
    pub decoded: u32,
    /// Of the capture's CRC32C and MAC, how many the datagram passed as it was.
    pub verified: u32,
}

/// Decodes `data` three ways: under the capture configuration; under parameters chosen by its
/// first bytes (the rest is the datagram); and under the tag and value length its own header
/// claims (so random headers get past those two checks). Checks every decoded message.
pub fn wire_decode(data: &[u8]) -> Result<WireOutcome, Violation> {
    let mut outcome = WireOutcome::default();
    let capture = capture_params();
    if let Some(kind) = check_datagram(data, &capture)? {
        outcome.capture_kind = Some(kind);
        outcome.decoded += 1;
    }
    outcome.verified = check_integrity(data, &capture)?;

    let mut input = Unstructured::new(data);
    let chosen = (|| -> arbitrary::Result<WireParams> {
        let tag = if input.arbitrary::<bool>()? {
            capture.cluster_tag
        } else {
            input.arbitrary::<u32>()?
        };
        Ok(WireParams {
            cluster_tag: tag,
            slot_len: input.int_in_range(0..=140usize)? * 8,
            max_txn_len: input.int_in_range(0..=1usize << 21)?,
            snapshot_slot_len: input.int_in_range(0..=140usize)? * 8,
            nodes: input.int_in_range(0..=256usize)?,
            pipelines: input.int_in_range(0..=256usize)?,
            ..capture
        })
    })();
    if let Ok(params) = chosen {
        let rest = input.take_rest();
        if check_datagram(rest, &params)?.is_some() {
            outcome.decoded += 1;
        }
    }

    if data.len() >= wire::HEADER_BYTES {
        let own = WireParams {
            cluster_tag: u32::from_le_bytes([data[8], data[9], data[10], data[11]]),
            run: wire::u64_at(data, 16),
            slot_len: usize::from(u16::from_le_bytes([data[12], data[13]])) * 8,
            max_txn_len: usize::from(u16::from_le_bytes([data[12], data[13]])) * 8 * 64,
            snapshot_slot_len: usize::from(u16::from_le_bytes([data[12], data[13]])) * 8,
            nodes: 256,
            pipelines: 256,
            integrity: wire::Integrity::Unchecked,
        };
        if check_datagram(data, &own)?.is_some() {
            outcome.decoded += 1;
        }
    }
    Ok(outcome)
}

/// Everything a reader can get out of a decoded message, for comparisons.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Contents<'a> {
    header: wire::Header,
    prepare_start: Option<(u64, u64)>,
    range: Option<(u64, u64)>,
    write_seq: Option<u64>,
    entries: Vec<wire::EntryView<'a>>,
}

fn contents<'a>(message: &Message<'a>) -> Contents<'a> {
    let kind = message.header.kind;
    let has_entries = kind == Kind::Prepare || kind == Kind::Write;
    Contents {
        header: message.header,
        prepare_start: (kind == Kind::Prepare).then(|| message.prepare_start()),
        range: (kind == Kind::Ack || kind == Kind::Commit || kind == Kind::Nack)
            .then(|| message.range()),
        write_seq: (kind == Kind::Write).then(|| message.write_seq()),
        entries: if has_entries {
            message.entries().collect()
        } else {
            Vec::new()
        },
    }
}

/// Encodes decoded contents again with the wire module's own encoders; `None` for a kind this
/// harness does not know how to encode (checked by decoding only).
fn reencode(contents: &Contents<'_>, slot_len: usize) -> Option<Vec<u8>> {
    let header = &contents.header;
    let count = usize::from(header.count);
    // Not a `match`: kinds added later are checked by decoding alone until they are taught here.
    let kind = header.kind;
    let entries_len: usize = contents
        .entries
        .iter()
        .map(|entry| wire::entry_wire_len(entry.bytes.len()))
        .sum();
    let (len, entries_at) = if kind == Kind::Prepare {
        (
            wire::prepare_len(0, 0) + entries_len,
            wire::HEADER_BYTES + wire::PREPARE_PREFIX,
        )
    } else if kind == Kind::Write {
        (
            wire::write_len(0, 0) + entries_len,
            wire::HEADER_BYTES + wire::WRITE_PREFIX,
        )
    } else if kind == Kind::Ack || kind == Kind::Commit || kind == Kind::Nack {
        (wire::HEADER_BYTES + wire::RANGE_BODY, 0)
    } else if kind == Kind::Credit || kind == Kind::Hello {
        (wire::HEADER_BYTES, 0)
    } else {
        return None;
    };
    let mut out = vec![0u8; len];
    wire::put_header(&mut out, header);
    if let Some((first_seq, first_zxid)) = contents.prepare_start {
        wire::put_prepare_prefix(&mut out, first_seq, first_zxid);
    }
    if let Some((first, count)) = contents.range {
        wire::put_range(&mut out, first, count);
    }
    if let Some(seq) = contents.write_seq {
        wire::put_write_prefix(&mut out, seq);
    }
    let _ = (count, slot_len);
    let mut at = entries_at;
    for entry in &contents.entries {
        at += wire::put_entry(
            &mut out[at..],
            entry.origin_node,
            entry.session,
            entry.fragment,
            entry.txn_len,
            entry.session_seq,
            entry.bytes,
        );
    }
    wire::seal(&mut out, &wire::Integrity::Unchecked);
    Some(out)
}

/// Decodes one datagram and, when it decodes, checks it; returns its kind.
fn check_datagram(datagram: &[u8], params: &WireParams) -> Result<Option<Kind>, Violation> {
    let Ok(message) = params.decode(datagram) else {
        return Ok(None);
    };
    let header = message.header;
    let kind = header.kind;
    ensure!(
        datagram.len() >= wire::HEADER_BYTES,
        "a {}-byte datagram decoded",
        datagram.len()
    );
    ensure!(
        header.cluster_tag == params.cluster_tag,
        "foreign tag {:#x} accepted for {:#x}",
        header.cluster_tag,
        params.cluster_tag
    );
    ensure!(
        usize::from(header.from_node) < params.nodes
            && usize::from(header.pipeline) < params.pipelines,
        "sender {}/{} accepted with {} nodes and {} pipelines",
        header.from_node,
        header.pipeline,
        params.nodes,
        params.pipelines
    );
    let contents = contents(&message);
    if kind == Kind::Prepare || kind == Kind::Write {
        ensure!(header.count > 0, "an empty {} decoded", kind.name());
        ensure!(
            usize::from(header.slot_words) * 8 == params.slot_len,
            "slot length {} accepted for {}",
            usize::from(header.slot_words) * 8,
            params.slot_len
        );
        ensure!(
            contents.entries.len() == usize::from(header.count),
            "{} entries of {} decoded",
            contents.entries.len(),
            header.count
        );
        for (index, entry) in contents.entries.iter().enumerate() {
            let txn_len = entry.txn_len as usize;
            ensure!(
                (1..=params.max_txn_len).contains(&txn_len),
                "entry {index} of a {txn_len}-byte transaction decoded (at most {})",
                params.max_txn_len
            );
            ensure!(
                entry.fragment < entry.fragments(params.slot_len),
                "entry {index}: fragment {} of a {txn_len}-byte transaction in {}-byte slots",
                entry.fragment,
                params.slot_len
            );
            ensure!(
                entry.bytes.len() == wire::piece_len(txn_len, entry.fragment, params.slot_len),
                "entry {index} has {} bytes",
                entry.bytes.len()
            );
        }
        if let Some((_, first_zxid)) = contents.prepare_start {
            let starts = contents
                .entries
                .iter()
                .skip(1)
                .filter(|entry| entry.fragment == 0);
            ensure!(
                first_zxid.checked_add(starts.count() as u64).is_some(),
                "a prepare of zxids past 2^64 from {first_zxid:#x} decoded"
            );
        }
        ensure!(
            message.first_entry() == contents.entries[0],
            "first_entry() is not the first entry"
        );
    }
    if let Some(again) = reencode(&contents, params.slot_len) {
        ensure!(
            again.len() == datagram.len(),
            "{} of {} bytes re-encodes to {} bytes",
            kind.name(),
            datagram.len(),
            again.len()
        );
        match params.decode(&again) {
            Ok(decoded) => ensure!(
                self::contents(&decoded) == contents,
                "{} does not survive a re-encode",
                kind.name()
            ),
            Err(error) => {
                return Err(Violation(format!(
                    "re-encoded {} does not decode: {error}",
                    kind.name()
                )));
            }
        }
    }
    Ok(Some(kind))
}

// ---------------------------------------------------------------------------------------------
// pipeline_input

// The format (record tags, encoding, decoding) is always built: the corpus capture writes it.
use crate::pipeline_input::{
    OP_IDLE, OP_LOCAL_WRITE, OP_PEERS_KEEP_UP, OP_SYNTHESIZED, OP_TOGGLE_OUTBOX,
};
pub use crate::pipeline_input::{PipelineRecord, decode_pipeline_input, encode_pipeline_input};

/// One write applied through the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    pub zxid: u64,
    pub key: u64,
    /// FNV-1a of the value.
    pub value_hash: u64,
}

/// What [`pipeline_input`] saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineOutcome {
    pub leader: bool,
    pub datagrams: u64,
    /// Refused by the decoder (counted as the worker's `drops_malformed`).
    pub malformed: u64,
    /// Of those, refused as another cluster's.
    pub foreign: u64,
    /// Join hellos, which the worker keeps from the pipeline.
    pub hellos: u64,
    /// Refused because their sender's instance or epoch is not the one the pipeline joined.
    pub unknown_sender: u64,
    /// Handed to a state machine.
    pub handled: u64,
    /// Messages the state machines emitted.
    pub sent: u64,
    /// The state machines' own `dropped_unexpected`, summed.
    pub dropped_unexpected: u64,
    /// Every write the node applied, in order.
    pub applied: Vec<Applied>,
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A [`NodeReplica`] that checks and records every apply, and a shadow of what the store must
/// hold.
#[derive(Debug)]
struct CheckingReplica {
    inner: NodeReplica,
    value_len: usize,
    keys: u64,
    log: RefCell<Vec<Applied>>,
    /// Per key: the zxid of its last applied write (0: never written) and its value.
    shadow_zxids: RefCell<Vec<u64>>,
    shadow_values: RefCell<Vec<u8>>,
    violation: RefCell<Option<Violation>>,
}

impl CheckingReplica {
    fn new(keys: u64, value_len: usize) -> Result<Self, Violation> {
        let inner = NodeReplica::new(&StoreConfig {
            keys,
            value_size: value_len,
            hugepages: false,
        })
        .map_err(|error| Violation(format!("cannot build the store: {error}")))?;
        let slots = usize::try_from(keys).map_err(|_| Violation("too many keys".into()))?;
        Ok(CheckingReplica {
            inner,
            value_len,
            keys,
            log: RefCell::new(Vec::new()),
            shadow_zxids: RefCell::new(vec![0; slots]),
            shadow_values: RefCell::new(vec![0; slots * value_len]),
            violation: RefCell::new(None),
        })
    }

    fn flag(&self, violation: String) {
        self.violation
            .borrow_mut()
            .get_or_insert(Violation(violation));
    }

    fn take_violation(&self) -> Result<(), Violation> {
        match self.violation.borrow_mut().take() {
            Some(violation) => Err(violation),
            None => Ok(()),
        }
    }

    /// The store holds exactly the shadow: what was applied through the replica, and zeros.
    fn check_store(&self) -> Result<(), Violation> {
        let store = self.inner.store();
        let zxids = self.shadow_zxids.borrow();
        let values = self.shadow_values.borrow();
        let mut value = vec![0u8; self.value_len];
        for key in 0..self.keys {
            let slot = usize::try_from(key).unwrap_or(usize::MAX);
            let Some(zxid) = store.read(key, &mut value) else {
                return Err(Violation(format!("key {key} vanished from the store")));
            };
            let expected = &values[slot * self.value_len..(slot + 1) * self.value_len];
            ensure!(
                zxid == zxids[slot] && value == expected,
                "key {key} holds zxid {zxid:#x} {value:?}, but the replica applied zxid {:#x} {expected:?}",
                zxids[slot]
            );
        }
        Ok(())
    }
}

impl StateMachine for CheckingReplica {
    fn try_apply(&self, zxid: u64, txn: Txn<'_>) -> bool {
        let before = self.inner.applied_zxid();
        let applied = self.inner.try_apply(zxid, txn);
        let key = kv_txn_key(txn);
        let mut bytes = vec![0u8; txn.len().saturating_sub(KEY_BYTES)];
        txn.skip(KEY_BYTES).copy_to(&mut bytes);
        let value = &bytes[..];
        if !applied {
            if self.inner.applied_zxid() != before {
                self.flag(format!(
                    "a refused apply of zxid {zxid:#x} moved the replica"
                ));
            }
            return false;
        }
        if zxid != before.wrapping_add(1) || self.inner.applied_zxid() != zxid {
            self.flag(format!(
                "zxid {zxid:#x} applied after {before:#x} (applied zxids must go up by one)"
            ));
        }
        if value.len() > self.value_len {
            self.flag(format!("a {}-byte value applied", value.len()));
        }
        self.log.borrow_mut().push(Applied {
            zxid,
            key,
            value_hash: fnv(value),
        });
        let slot = usize::try_from(key).ok().filter(|_| key < self.keys);
        if let (Some(slot), true) = (slot, value.len() <= self.value_len) {
            // A shorter value is the store's zero-padded to the item size.
            self.shadow_zxids.borrow_mut()[slot] = zxid;
            let mut values = self.shadow_values.borrow_mut();
            let item = &mut values[slot * self.value_len..(slot + 1) * self.value_len];
            item[..value.len()].copy_from_slice(value);
            item[value.len()..].fill(0);
        }
        true
    }

    fn applied_zxid(&self) -> u64 {
        self.inner.applied_zxid()
    }

    fn read_for_snapshot(&self, key: u64, out: &mut [u8]) -> Option<u64> {
        self.inner.read_for_snapshot(key, out)
    }

    // The harness's nodes joined at the start of the cluster: none catches up by snapshot, so
    // a datagram that makes one install snapshot entries or move its base is a bug.
    fn install(&self, key: u64, zxid: u64, _value: &[u8]) {
        self.flag(format!(
            "a snapshot entry (key {key}, zxid {zxid:#x}) was installed outside a catch-up"
        ));
    }

    fn set_base(&self, zxid: u64) {
        self.flag(format!(
            "the base zxid was set to {zxid:#x} outside a catch-up"
        ));
    }
}

/// An outbox that accepts everything (unless closed) and checks every message sent.
#[derive(Debug)]
struct CheckingOutbox {
    buffer: Vec<u8>,
    params: WireParams,
    node: u8,
    pipeline: u8,
    leader: bool,
    closed: bool,
    sent: u64,
    violation: Option<Violation>,
}

impl CheckingOutbox {
    /// Seals the message as the worker's outbox does, and checks that it decodes under the
    /// same check.
    fn check(
        &mut self,
        target: Target,
        kind: Kind,
        len: usize,
        batch: u64,
    ) -> Result<(), Violation> {
        ensure!(
            len <= self.buffer.len(),
            "a {len}-byte message exceeds the MTU"
        );
        let sealed = WireParams {
            integrity: wire::Integrity::Crc32c,
            ..self.params
        };
        wire::seal(&mut self.buffer[..len], &sealed.integrity);
        let message = sealed.decode(&self.buffer[..len]).map_err(|error| {
            Violation(format!(
                "node {} pipeline {} sent a {} that does not decode: {error}",
                self.node,
                self.pipeline,
                kind.name()
            ))
        })?;
        let header = message.header;
        ensure!(
            header.kind == kind
                && header.from_node == self.node
                && header.pipeline == self.pipeline,
            "sent {:?} as a {} of node {} pipeline {}",
            header,
            kind.name(),
            self.node,
            self.pipeline
        );
        let target_ok = match target {
            Target::Leader => !self.leader,
            Target::Follower(node) => {
                self.leader && node != self.node && usize::from(node) < self.params.nodes
            }
            Target::AllFollowers => self.leader,
        };
        ensure!(
            target_ok,
            "node {} sent a {} to {target:?}",
            self.node,
            kind.name()
        );
        if (kind == Kind::Prepare || kind == Kind::Write) && !header.is_retransmit() {
            ensure!(
                u64::from(header.count) == batch,
                "a {} of {} entries counted as {batch}",
                kind.name(),
                header.count
            );
        }
        Ok(())
    }
}

impl Outbox for CheckingOutbox {
    fn buffer(&mut self) -> Option<&mut [u8]> {
        (!self.closed).then_some(&mut self.buffer[..])
    }

    fn send(&mut self, target: Target, kind: Kind, len: usize, batch: u64) {
        self.sent += 1;
        if self.violation.is_none() {
            self.violation = self.check(target, kind, len, batch).err();
        }
    }

    fn resend(&mut self, target: Target, kind: Kind, len: usize) {
        self.send(target, kind, len, 0);
    }
}

#[derive(Debug, Default)]
struct CountingCompletions(u64);

impl Completions for CountingCompletions {
    fn write_applied(&mut self, _session: u16, _session_seq: u64, _zxid: u64) {
        self.0 += 1;
    }
}

/// Positions that may only move forward, per pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Progress {
    prepared: u64,
    committed: u64,
    applied: u64,
    writes_applied: u64,
    dropped_unexpected: u64,
}

impl Progress {
    fn of(node: &Node) -> Progress {
        match node.role() {
            Role::Leader(leader) => Progress {
                prepared: leader.prepared(),
                committed: leader.committed(),
                applied: 0,
                writes_applied: leader.stats().writes_applied,
                dropped_unexpected: leader.stats().dropped_unexpected,
            },
            Role::Follower(follower) => Progress {
                prepared: 0,
                committed: 0,
                applied: follower.applied(),
                writes_applied: follower.stats().writes_applied,
                dropped_unexpected: follower.stats().dropped_unexpected,
            },
        }
    }
}

/// A join hello: the worker handles it, not the pipeline's `handle`.
fn is_hello(message: &Message<'_>) -> bool {
    message.header.kind == Kind::Hello
}

/// One node of the capture configuration: every pipeline's state machine, the shared replica
/// and zxid source, and the checks.
#[derive(Debug)]
struct NodeHarness {
    params: WireParams,
    machines: Vec<Node>,
    progress: Vec<Progress>,
    replica: CheckingReplica,
    zxids: ZxidSource,
    board: CatchupBoard,
    /// A virtual clock, moved on by every record, so timers fire.
    now_ns: u64,
    outbox: CheckingOutbox,
    completions: CountingCompletions,
    limits: Limits,
    outcome: PipelineOutcome,
    /// Per pipeline and sender node: whether a datagram of that sender was seen yet, and the
    /// instance the pipeline joined.
    introduced: Vec<[bool; MAX_NODES]>,
    instances: Vec<[u64; MAX_NODES]>,
}

/// The process instance the harness gives follower `node` (as its hello would say).
fn follower_instance(node: u8) -> u64 {
    u64::from(node) + 1
}

/// The process instance the harness gives the leader.
const LEADER_INSTANCE: u64 = 1;

/// The leader's answer to a follower's hello at the start of the cluster.
fn join_answer(pipeline: u8, instance: u64) -> wire::Header {
    capture_header(
        Kind::Hello,
        LEADER_NODE,
        pipeline,
        instance,
        [0; wire::WORDS],
    )
}

/// A header of the capture configuration's run, from `instance` of `from_node`.
fn capture_header(
    kind: Kind,
    from_node: u8,
    pipeline: u8,
    instance: u64,
    words: [u64; wire::WORDS],
) -> wire::Header {
    let params = capture_params();
    wire::Header {
        kind,
        from_node,
        pipeline,
        count: 0,
        cluster_tag: params.cluster_tag,
        slot_words: match kind {
            Kind::Prepare | Kind::Write => wire::slot_words(params.slot_len),
            Kind::Snapshot => wire::slot_words(params.snapshot_slot_len),
            _ => 0,
        },
        flags: 0,
        run: params.run,
        instance,
        epoch: LEADER_EPOCH,
        words,
    }
}

/// The configuration fingerprint of the capture runs (as `Options::fingerprint`), so that
/// their captured hellos are taken, not refused.
fn capture_fingerprint() -> u64 {
    crate::config::configuration_fingerprint(&[
        CAPTURE.cluster,
        &CAPTURE.nodes.to_string(),
        &CAPTURE.pipelines.to_string(),
        &capture_value_fingerprint(),
        &CAPTURE.keys.to_string(),
        &CAPTURE.window.to_string(),
        &CAPTURE.sessions.to_string(),
    ])
}

/// The value part of the capture runs' fingerprint (as `Options::fingerprint` names a mix).
fn capture_value_fingerprint() -> String {
    let mix: Vec<String> = CAPTURE.value_mix.iter().map(usize::to_string).collect();
    format!("{}/{}", CAPTURE.value_len, mix.join(","))
}

/// The shortest and longest transaction of the capture runs.
fn capture_txn_lengths() -> (usize, usize) {
    let shortest = CAPTURE
        .value_mix
        .iter()
        .copied()
        .min()
        .unwrap_or(CAPTURE.value_len);
    let longest = CAPTURE
        .value_mix
        .iter()
        .copied()
        .max()
        .unwrap_or(CAPTURE.value_len);
    (kv_txn_len(shortest), kv_txn_len(longest))
}

/// The MTU a node of the capture configuration runs with (as `node::needed_mtu`: room for 16
/// of the shortest transactions and for one entry of the longest's default slot).
fn capture_mtu() -> usize {
    let (shortest, longest) = capture_txn_lengths();
    let share = longest.div_ceil(crate::zab::DEFAULT_MAX_FRAGMENTS);
    wire::prepare_len(16, shortest)
        .max(wire::write_len(16, shortest))
        .max(wire::prepare_len(1, share))
        .next_multiple_of(64)
}

/// The pipeline configuration of node `node`, pipeline `pipeline` of the capture runs.
pub fn capture_pipeline(node: u8, pipeline: u8, instance: u64) -> PipelineConfig {
    PipelineConfig {
        node,
        nodes: CAPTURE.nodes,
        pipeline,
        pipelines: CAPTURE.pipelines,
        max_txn_len: capture_txn_lengths().1,
        slot_len: PipelineConfig::default_slot_len(
            capture_txn_lengths().0,
            capture_txn_lengths().1,
            capture_mtu(),
        ),
        item_len: CAPTURE.value_len,
        cluster_tag: wire::cluster_tag(CAPTURE.cluster),
        run: wire::run_tag(CAPTURE.run_id),
        epoch: LEADER_EPOCH,
        integrity: wire::Integrity::Crc32c,
        sessions: CAPTURE.sessions,
        window: CAPTURE.window,
        retained: CAPTURE.window * 32,
        mtu: capture_mtu(),
        keys: CAPTURE.keys,
        instance,
        fingerprint: capture_fingerprint(),
    }
}

fn capture_config() -> PipelineConfig {
    capture_pipeline(LEADER_NODE, 0, 1)
}

impl NodeHarness {
    fn new(node: u8, limits: Limits) -> Result<Self, Violation> {
        let params = capture_params();
        let leader = node == LEADER_NODE;
        let mut machines = Vec::new();
        for pipeline in 0..CAPTURE.pipelines {
            let config = capture_pipeline(
                node,
                pipeline,
                if leader { 1 } else { follower_instance(node) },
            );
            config
                .validate()
                .map_err(|error| Violation(error.to_string()))?;
            machines.push(Node::new(config, LEADER_NODE));
        }
        let replica = CheckingReplica::new(CAPTURE.keys, CAPTURE.value_len)?;
        let board = CatchupBoard::new(usize::from(CAPTURE.pipelines));
        // Joined at the start of the cluster, as the workers' handshake does.
        for (pipeline, machine) in (0u8..).zip(&mut machines) {
            if machine.is_leader() {
                for follower in (0..CAPTURE.nodes).filter(|node| *node != LEADER_NODE) {
                    let mut hello = join_answer(pipeline, follower_instance(follower));
                    hello.from_node = follower;
                    machine.introduce(&hello, 0, &replica, &board);
                }
            } else {
                machine.introduce(&join_answer(pipeline, LEADER_INSTANCE), 0, &replica, &board);
            }
            machine.set_running();
        }
        Ok(NodeHarness {
            params,
            progress: machines.iter().map(Progress::of).collect(),
            machines,
            replica,
            zxids: ZxidSource::new(),
            board,
            now_ns: 0,
            outbox: CheckingOutbox {
                buffer: vec![0; capture_mtu()],
                params,
                node,
                pipeline: 0,
                leader,
                closed: false,
                sent: 0,
                violation: None,
            },
            completions: CountingCompletions::default(),
            limits,
            outcome: PipelineOutcome {
                leader,
                ..PipelineOutcome::default()
            },
            introduced: vec![[false; MAX_NODES]; usize::from(CAPTURE.pipelines)],
            instances: vec![
                std::array::from_fn(|node| match u8::try_from(node) {
                    Ok(LEADER_NODE) => LEADER_INSTANCE,
                    Ok(node) => follower_instance(node),
                    Err(_) => 0,
                });
                usize::from(CAPTURE.pipelines)
            ],
        })
    }

    /// As the worker's receive path: decode, count and drop what is refused, keep hellos from
    /// the pipeline, hand the rest to the pipeline it names.
    fn receive(&mut self, datagram: &[u8]) {
        self.outcome.datagrams += 1;
        match self.params.decode(datagram) {
            Err(error) => {
                self.outcome.malformed += 1;
                if error == wire::WireError::ForeignCluster {
                    self.outcome.foreign += 1;
                }
            }
            Ok(message) if is_hello(&message) => {
                self.outcome.hellos += 1;
                // As the running worker: a leader takes a follower's hello (a restarted
                // process, to catch up) or refuses another configuration's; a follower
                // ignores repeated answers.
                if let Some(machine) = self.machines.get_mut(usize::from(message.header.pipeline)) {
                    machine.handle(&message, self.now_ns, &self.replica, &self.board);
                }
            }
            Ok(message) => {
                let pipeline = usize::from(message.header.pipeline);
                let from = usize::from(message.header.from_node);
                // Captured datagrams carry the instances of the captured run: the first one
                // seen of each sender joins, as that sender's hello did in the run.
                if let (Some(machine), Some(introduced)) = (
                    self.machines.get_mut(pipeline),
                    self.introduced
                        .get_mut(pipeline)
                        .and_then(|nodes| nodes.get_mut(from)),
                ) {
                    let role_fits =
                        machine.is_leader() == (message.header.from_node != LEADER_NODE);
                    if role_fits && !*introduced && !machine.knows(&message.header) {
                        machine.introduce(&message.header, self.now_ns, &self.replica, &self.board);
                    }
                    *introduced = true;
                    if let Some(instance) = self
                        .instances
                        .get_mut(pipeline)
                        .and_then(|nodes| nodes.get_mut(from))
                    {
                        if machine.knows(&message.header) {
                            *instance = message.header.instance;
                        }
                    }
                }
                // The decoder bounds the pipeline by the configuration's pipeline count.
                if let Some(machine) = self.machines.get_mut(pipeline) {
                    if !machine.knows(&message.header) {
                        // As the worker: not a process this pipeline joined.
                        self.outcome.unknown_sender += 1;
                        return;
                    }
                    self.outcome.handled += 1;
                    machine.handle(&message, self.now_ns, &self.replica, &self.board);
                }
            }
        }
    }

    /// See [`PipelineRecord::PeersKeepUp`].
    fn peers_keep_up(&mut self) {
        let mut datagram = [0u8; wire::HEADER_BYTES + wire::RANGE_BODY];
        let params = self.params;
        for pipeline in 0..CAPTURE.pipelines {
            let instances = self.instances[usize::from(pipeline)];
            let header = |kind, from_node: u8, words| {
                capture_header(
                    kind,
                    from_node,
                    pipeline,
                    instances[usize::from(from_node)],
                    words,
                )
            };
            match self.machines.get(usize::from(pipeline)).map(Node::role) {
                Some(Role::Leader(leader)) => {
                    let prepared = leader.prepared();
                    for follower in (0..CAPTURE.nodes).filter(|node| *node != LEADER_NODE) {
                        // The leader clamps the counters to what it has sent.
                        let words = FollowerWords {
                            prepare_seen: u64::MAX,
                            commit_seen: u64::MAX,
                            received: u64::MAX,
                            applied: u64::MAX,
                            snapshot_installed: 0,
                        };
                        wire::put_header(
                            &mut datagram,
                            &header(Kind::Ack, follower, words.to_words()),
                        );
                        wire::put_range(&mut datagram, 0, prepared);
                        wire::seal(&mut datagram, &params.integrity);
                        self.receive(&datagram);
                    }
                }
                Some(Role::Follower(_)) => {
                    wire::put_header(
                        &mut datagram,
                        &header(Kind::Commit, LEADER_NODE, [0; wire::WORDS]),
                    );
                    wire::put_range(&mut datagram, 0, u64::MAX / 2);
                    wire::seal(&mut datagram, &params.integrity);
                    self.receive(&datagram);
                    let mut words = [0; wire::WORDS];
                    words[leader_words::WRITE_SEEN] = u64::MAX;
                    let credit = header(Kind::Credit, LEADER_NODE, words);
                    wire::put_header(&mut datagram, &credit);
                    wire::seal(&mut datagram[..wire::HEADER_BYTES], &params.integrity);
                    self.receive(&datagram[..wire::HEADER_BYTES]);
                }
                None => {}
            }
        }
    }

    fn local_write(&mut self, pipeline: usize, session: u16, seq: u64, key: u64) {
        let mix = CAPTURE.value_mix;
        let value_len = mix[usize::try_from(seq).unwrap_or(0) % mix.len()];
        let mut value = [0u8; CAPTURE.value_len];
        value[..8].copy_from_slice(&seq.to_le_bytes());
        value[8..16].copy_from_slice(&key.to_le_bytes());
        let mut txn = [0u8; kv_txn_len(CAPTURE.value_len)];
        let txn = &mut txn[..kv_txn_len(value_len)];
        encode_kv_txn(txn, key, &value[..value_len]);
        let session = session % u16::try_from(CAPTURE.sessions).unwrap_or(u16::MAX);
        if let Some(machine) = self.machines.get_mut(pipeline) {
            let _ = machine.submit_write(session, seq, txn);
        }
    }

    /// One iteration of every worker: commit, apply, send.
    fn advance(&mut self) {
        // Each step is 100 us of virtual time: retransmission timers fire within a few dozen.
        self.now_ns += 100_000;
        for (pipeline, machine) in self.machines.iter_mut().enumerate() {
            self.outbox.pipeline = u8::try_from(pipeline).unwrap_or(u8::MAX);
            machine.advance(
                self.now_ns,
                &mut self.outbox,
                &self.replica,
                &self.zxids,
                &self.board,
                &mut self.completions,
                &self.limits,
            );
        }
    }

    /// The invariants that hold between steps.
    fn check(&mut self) -> Result<(), Violation> {
        self.replica.take_violation()?;
        if let Some(violation) = self.outbox.violation.take() {
            return Err(violation);
        }
        let applied = self.replica.log.borrow().len() as u64;
        ensure!(
            self.replica.inner.applied_zxid() == ZXID_START + applied,
            "the replica is at zxid {:#x} after {applied} applies",
            self.replica.inner.applied_zxid()
        );
        let mut writes_applied = 0;
        for (index, machine) in self.machines.iter().enumerate() {
            let now = Progress::of(machine);
            let before = self.progress[index];
            ensure!(
                now.prepared >= before.prepared
                    && now.committed >= before.committed
                    && now.applied >= before.applied
                    && now.writes_applied >= before.writes_applied
                    && now.dropped_unexpected >= before.dropped_unexpected,
                "pipeline {index} went back from {before:?} to {now:?}"
            );
            ensure!(
                now.committed <= now.prepared,
                "pipeline {index} committed {} of {} prepared",
                now.committed,
                now.prepared
            );
            writes_applied += now.writes_applied;
            self.progress[index] = now;
        }
        ensure!(
            writes_applied == applied,
            "the pipelines count {writes_applied} writes applied, the replica {applied}"
        );
        if self.outcome.leader {
            ensure!(
                self.replica.inner.applied_zxid() <= self.zxids.last_issued(),
                "zxid {:#x} applied, but only {:#x} issued",
                self.replica.inner.applied_zxid(),
                self.zxids.last_issued()
            );
        }
        Ok(())
    }

    fn finish(mut self) -> Result<PipelineOutcome, Violation> {
        self.check()?;
        self.replica.check_store()?;
        self.outcome.sent = self.outbox.sent;
        self.outcome.dropped_unexpected = self.progress.iter().map(|p| p.dropped_unexpected).sum();
        self.outcome.applied = self.replica.log.take();
        Ok(self.outcome)
    }
}

/// A number for a message field: small, near the first zxid, near the top of the range, or any,
/// as the input chooses (edges are where arithmetic on untrusted fields goes wrong).
fn field(input: &mut Unstructured<'_>) -> arbitrary::Result<u64> {
    let choice = input.arbitrary::<u8>()?;
    let small = u64::from(input.arbitrary::<u16>()?);
    Ok(match choice % 4 {
        0 => small,
        1 => ZXID_START + small,
        2 => u64::MAX - small,
        _ => (small << 48) | (u64::from(input.arbitrary::<u32>()?) << 16) | small,
    })
}

/// A well-formed message with fields the input chooses, encoded with the wire module's
/// encoders into `out`; returns its length. Lets the fuzzer reach the state machines with any
/// field values without first finding a valid header, tag and body length.
fn synthesize(input: &mut Unstructured<'_>, out: &mut [u8]) -> arbitrary::Result<usize> {
    let kind = Kind::ALL[usize::from(input.arbitrary::<u8>()?) % Kind::ALL.len()];
    let count = if kind == Kind::Prepare || kind == Kind::Write {
        input.int_in_range(1..=4u16)?
    } else {
        u16::from(input.arbitrary::<bool>()?)
    };
    let from_node = input.arbitrary::<u8>()? % CAPTURE.nodes;
    let params = capture_params();
    let header = wire::Header {
        kind,
        from_node,
        pipeline: input.arbitrary::<u8>()? % CAPTURE.pipelines,
        count,
        cluster_tag: params.cluster_tag,
        slot_words: wire::slot_words(params.slot_len),
        flags: u16::from(input.arbitrary::<bool>()?),
        run: params.run,
        // Mostly the sender's real instance and epoch, so the pipelines take its messages.
        instance: if input.arbitrary::<bool>()? {
            field(input)?
        } else if from_node == LEADER_NODE {
            LEADER_INSTANCE
        } else {
            follower_instance(from_node)
        },
        epoch: if input.arbitrary::<bool>()? {
            u32::try_from(field(input)? & 0xffff_ffff).unwrap_or(0)
        } else {
            LEADER_EPOCH
        },
        words: [
            field(input)?,
            field(input)?,
            field(input)?,
            field(input)?,
            field(input)?,
        ],
    };
    wire::put_header(out, &header);
    let slot_len = params.slot_len;
    // Not a `match`, as in `reencode`: a kind added later gets a bare header here.
    let (mut len, entries_at) = if kind == Kind::Prepare {
        wire::put_prepare_prefix(out, field(input)?, field(input)?);
        (
            wire::prepare_len(0, 0),
            wire::HEADER_BYTES + wire::PREPARE_PREFIX,
        )
    } else if kind == Kind::Write {
        wire::put_write_prefix(out, field(input)?);
        (
            wire::write_len(0, 0),
            wire::HEADER_BYTES + wire::WRITE_PREFIX,
        )
    } else if kind == Kind::Ack || kind == Kind::Commit || kind == Kind::Nack {
        wire::put_range(out, field(input)?, field(input)?);
        (wire::HEADER_BYTES + wire::RANGE_BODY, 0)
    } else {
        (wire::HEADER_BYTES, 0)
    };
    if entries_at > 0 {
        // Transactions of the capture's lengths (or any up to the maximum), and any fragment
        // of them: the follower must gather and check them, and drop torn ones.
        let mut piece = vec![0u8; slot_len];
        for _ in 0..usize::from(count) {
            let fill = input.arbitrary::<u8>()?;
            let txn_len = if input.arbitrary::<bool>()? {
                let (shortest, longest) = capture_txn_lengths();
                if input.arbitrary::<bool>()? {
                    shortest
                } else {
                    longest
                }
            } else {
                input.int_in_range(1..=params.max_txn_len.max(1))?
            };
            let fragments = wire::fragments_of(txn_len, slot_len);
            let fragment = if input.arbitrary::<bool>()? {
                0
            } else {
                input.int_in_range(0..=fragments - 1)?
            };
            let bytes = &mut piece[..wire::piece_len(txn_len, fragment, slot_len)];
            bytes.fill(fill);
            let key = (field(input)? % (CAPTURE.keys + 1)).to_le_bytes();
            let head = bytes.len().min(8);
            bytes[..head].copy_from_slice(&key[..head]);
            len += wire::put_entry(
                &mut out[len..],
                input.arbitrary::<u8>()?,
                input.arbitrary::<u16>()?,
                fragment,
                u32::try_from(txn_len).unwrap_or(u32::MAX),
                field(input)?,
                bytes,
            );
        }
    }
    wire::seal(&mut out[..len], &params.integrity);
    Ok(len)
}

fn take<const N: usize>(input: &mut Unstructured<'_>) -> Option<[u8; N]> {
    let bytes = input.bytes(N).ok()?;
    <[u8; N]>::try_from(bytes).ok()
}

/// Limits within the knobs' ranges, chosen by the input.
fn limits_from(input: &mut Unstructured<'_>) -> arbitrary::Result<Limits> {
    let mut knob = |knob: Knob| {
        let spec = knob.spec();
        input.int_in_range(spec.min..=spec.max)
    };
    let as_usize = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
    Ok(Limits {
        prepare_batch: as_usize(knob(Knob::PrepareBatch)?),
        write_batch: as_usize(knob(Knob::WriteBatch)?),
        ack_batch: knob(Knob::AckBatch)?,
        commit_batch: knob(Knob::CommitBatch)?,
        prepare_credits: knob(Knob::PrepareCredits)?,
        write_credits: knob(Knob::WriteCredits)?,
        commit_credits: knob(Knob::CommitCredits)?,
        retransmit_timeout_ns: knob(Knob::RetransmitTimeoutUs)?.saturating_mul(1000),
        slow_follower_grace_ns: knob(Knob::SlowFollowerGraceUs)?.saturating_mul(1000),
        heartbeat_interval_ns: knob(Knob::HeartbeatIntervalMs)?.saturating_mul(1_000_000),
        peer_timeout_ns: knob(Knob::PeerTimeoutMs)?.saturating_mul(1_000_000),
        election_timeout_ns: knob(Knob::ElectionTimeoutMs)?.saturating_mul(1_000_000),
        finalize_wait_ns: knob(Knob::FinalizeWaitUs)?.saturating_mul(1000),
        startup_grace_ns: input.int_in_range(0..=2_000_000_000)?,
    })
}

/// Runs one node of the capture configuration over the input (see [`encode_pipeline_input`]):
/// byte 0 picks the node (0 leads), byte 1 the limits (0: the knobs' defaults, else chosen by
/// the next bytes), then records: a datagram (received), a local write, closing or opening the
/// outbox, an idle iteration, peers that keep up ([`PipelineRecord::PeersKeepUp`]), a
/// well-formed message whose fields the input chooses (received); every pipeline advances
/// after each. Checks the invariants after every record and the store at the
/// end.
pub fn pipeline_input(data: &[u8]) -> Result<PipelineOutcome, Violation> {
    let mut input = Unstructured::new(data);
    let Some([node, limits_choice]) = take::<2>(&mut input) else {
        return Ok(PipelineOutcome::default());
    };
    let node = node % CAPTURE.nodes;
    let limits = if limits_choice == 0 {
        Limits::default()
    } else {
        match limits_from(&mut input) {
            Ok(limits) => limits,
            Err(_) => return Ok(PipelineOutcome::default()),
        }
    };
    let mut harness = NodeHarness::new(node, limits)?;
    while let Some([op]) = take::<1>(&mut input) {
        match op % 8 {
            OP_LOCAL_WRITE => {
                let Some(record) = take::<19>(&mut input) else {
                    break;
                };
                let pipeline = usize::from(record[0]) % usize::from(CAPTURE.pipelines);
                let session = u16::from_le_bytes([record[1], record[2]]);
                let mut word = [0u8; 8];
                word.copy_from_slice(&record[3..11]);
                let seq = u64::from_le_bytes(word);
                word.copy_from_slice(&record[11..19]);
                // Mostly keys of the store, some beyond it.
                let key = u64::from_le_bytes(word) % (CAPTURE.keys + CAPTURE.keys / 8);
                harness.local_write(pipeline, session, seq, key);
            }
            OP_TOGGLE_OUTBOX => harness.outbox.closed = !harness.outbox.closed,
            OP_IDLE => {}
            OP_PEERS_KEEP_UP => harness.peers_keep_up(),
            OP_SYNTHESIZED => {
                let mut datagram = vec![0u8; capture_mtu()];
                let Ok(len) = synthesize(&mut input, &mut datagram) else {
                    break;
                };
                harness.receive(&datagram[..len]);
            }
            _ => {
                // OP_DATAGRAM, and the spare tags.
                let Some(len) = take::<2>(&mut input) else {
                    break;
                };
                let len = usize::from(u16::from_le_bytes(len)).min(input.len());
                let datagram = input.bytes(len).unwrap_or_default();
                harness.receive(datagram);
            }
        }
        harness.advance();
        harness.check()?;
    }
    harness.finish()
}

// ---------------------------------------------------------------------------------------------
// endpoint_decode

/// Decodes `data` as a binary endpoint slot (its first 64 bytes, zero-padded) and as JSON
/// endpoint records and addresses; what decodes must round-trip.
pub fn endpoint_decode(data: &[u8]) -> Result<(), Violation> {
    let mut slot = [0u8; ENDPOINT_BYTES];
    let used = data.len().min(ENDPOINT_BYTES);
    slot[..used].copy_from_slice(&data[..used]);
    match EndpointAddress::from_bytes(&slot) {
        Ok(address) => {
            ensure!(
                u32::from(slot[0]) == address.transport().code(),
                "kind byte {} decoded as {:?}",
                slot[0],
                address
            );
            check_address(&address)?;
        }
        Err(EndpointDecodeError::Empty) => {
            ensure!(slot[0] == 0, "a kind byte {} is 'empty'", slot[0])
        }
        Err(EndpointDecodeError::UnknownKind(kind)) => {
            ensure!(
                kind == slot[0] && kind != 0,
                "kind {kind} reported for byte {}",
                slot[0]
            )
        }
    }
    if let Ok(record) = serde_json::from_slice::<EndpointRecord>(data) {
        check_address(&record.address)?;
        let text = serde_json::to_string(&record)
            .map_err(|error| Violation(format!("{record:?} does not serialize: {error}")))?;
        ensure!(
            serde_json::from_str::<EndpointRecord>(&text).ok() == Some(record),
            "{record:?} does not round-trip through {text}"
        );
    }
    if let Ok(address) = serde_json::from_slice::<EndpointAddress>(data) {
        check_address(&address)?;
        let text = serde_json::to_string(&address)
            .map_err(|error| Violation(format!("{address:?} does not serialize: {error}")))?;
        ensure!(
            serde_json::from_str::<EndpointAddress>(&text).ok() == Some(address),
            "{address:?} does not round-trip through {text}"
        );
    }
    Ok(())
}

fn check_address(address: &EndpointAddress) -> Result<(), Violation> {
    let bytes = address.to_bytes();
    ensure!(
        EndpointAddress::from_bytes(&bytes) == Ok(*address),
        "{address:?} does not round-trip through its binary form"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// knobs_parse

/// Parses `data` as knob input: as JSON (an object of `name: value`, as a REST body carries,
/// or a bare value for the knob byte 0 picks, and for every knob), and as text (lines of
/// `NAME=VALUE`, as `--knob` takes, or a bare value). Every accepted value is within its
/// knob's range and round-trips through the knob's JSON and text renderings.
pub fn knobs_parse(data: &[u8]) -> Result<(), Violation> {
    let Some(&first) = data.first() else {
        return Ok(());
    };
    let picked = &KNOBS[usize::from(first) % KNOBS.len()];
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        if let serde_json::Value::Object(map) = &value {
            for (name, value) in map {
                if let Ok(knob) = Knob::by_name(name) {
                    check_knob(knob.spec(), knob.spec().parse_json(value))?;
                }
            }
        }
        for spec in KNOBS {
            check_knob(spec, spec.parse_json(&value))?;
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines() {
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            if let Ok(knob) = Knob::by_name(name.trim()) {
                check_knob(knob.spec(), knob.spec().parse_text(value.trim()))?;
            }
        }
        if let Some(rest) = text.get(1..) {
            check_knob(picked, picked.parse_text(rest))?;
        }
        check_knob(picked, picked.parse_text(text))?;
    }
    Ok(())
}

fn check_knob(
    spec: &KnobSpec,
    parsed: Result<u64, rzab_shared::KnobError>,
) -> Result<(), Violation> {
    let Ok(value) = parsed else {
        return Ok(());
    };
    ensure!(
        spec.min <= value && value <= spec.max,
        "knob {} accepted {value} outside {}..={}",
        spec.name,
        spec.min,
        spec.max
    );
    let json = spec.to_json(value);
    ensure!(
        spec.parse_json(&json) == Ok(value),
        "knob {}: {value} does not round-trip through {json}",
        spec.name
    );
    let text = match (&json, spec.kind) {
        (serde_json::Value::String(name), KnobKind::Choice(_)) => name.clone(),
        _ => json.to_string(),
    };
    ensure!(
        spec.parse_text(&text) == Ok(value),
        "knob {}: {value} does not round-trip through the text {text}",
        spec.name
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_key_3() -> [u8; 40] {
        let mut txn = [0u8; 40];
        encode_kv_txn(&mut txn, 3, &[7; 32]);
        txn
    }

    #[test]
    fn a_store_written_behind_the_replica_is_caught() {
        let replica = CheckingReplica::new(64, 32).unwrap_or_else(|error| panic!("{error}"));
        assert!(replica.try_apply(ZXID_START + 1, Txn::whole(&set_key_3())));
        assert_eq!(replica.check_store(), Ok(()));
        // A write that bypasses the replica.
        let _ = replica.inner.store().write(5, &[1; 32], ZXID_START + 9);
        assert!(replica.check_store().is_err());
    }

    #[test]
    fn out_of_order_applies_are_refused_and_counted() {
        let replica = CheckingReplica::new(64, 32).unwrap_or_else(|error| panic!("{error}"));
        assert!(!replica.try_apply(ZXID_START + 2, Txn::whole(&set_key_3())));
        assert_eq!(replica.take_violation(), Ok(()));
        assert!(replica.log.borrow().is_empty());
    }

    #[test]
    fn a_message_that_does_not_decode_is_a_violation() {
        let mut harness = NodeHarness::new(1, Limits::default()).unwrap_or_else(|e| panic!("{e}"));
        harness.outbox.send(Target::Leader, Kind::Ack, 10, 0);
        assert!(harness.check().is_err());
    }

    #[test]
    fn encoded_inputs_run_through_the_harness() {
        // The format's round trip is pipeline_input's own test; here the harness reads it.
        let records = [
            PipelineRecord::Datagram(&[1u8, 2, 3]),
            PipelineRecord::PeersKeepUp,
            PipelineRecord::Datagram(&[]),
        ];
        let input = encode_pipeline_input(7, records);
        let outcome = pipeline_input(&input).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(outcome.malformed, 2);
        assert!(outcome.leader == (7 % CAPTURE.nodes == LEADER_NODE));
    }
}
