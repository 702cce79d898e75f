//! Wire formats of the ZAB messages: a fixed 96-byte header followed by a kind-specific body.
//! The header names the cluster (a tag of its name), the run (a generation every node of the
//! cluster is started with), the sender (node, pipeline, process instance) and the epoch it
//! speaks in; it carries the entry count, the entry slot length, flags, five 64-bit words whose meaning
//! depends on the direction (flow-control and progress counters), the body's length, and an
//! integrity check over everything else ([`Integrity`]: CRC32C, or a keyed MAC from the
//! cluster secret). All integers are little-endian.
//!
//! | bytes  | field |
//! |--------|-------|
//! | 0..2   | magic `ZB` |
//! | 2      | version (5) |
//! | 3      | kind |
//! | 4, 5   | sender node, pipeline |
//! | 6..8   | entry count |
//! | 8..12  | cluster tag |
//! | 12..14 | slot length of the entries, in 8-byte words |
//! | 14..16 | flags |
//! | 16..24 | run |
//! | 24..32 | sender's process instance |
//! | 32..36 | epoch the sender speaks in |
//! | 36..40 | body length |
//! | 40..80 | five words |
//! | 80..96 | check: CRC32C (4 bytes, 12 zero) or a 128-bit MAC, over bytes 0..80 and the body |
//!
//! Decoding never panics and never trusts a length it has not checked: a short, foreign,
//! corrupt, forged or malformed datagram yields a [`WireError`] that callers count and drop.
//! Identity (cluster, run) is checked before the check field, so a datagram of another run is
//! counted as foreign rather than as corrupt. Encoding writes into a caller-owned buffer and
//! returns the length used; [`seal`] completes a message once its body is written. Nothing
//! here allocates.

use std::fmt;

/// "ZB", little-endian.
pub const MAGIC: u16 = 0x425A;
pub const VERSION: u8 = 6;
pub const HEADER_BYTES: usize = 96;
/// Words in the header.
pub const WORDS: usize = 5;
/// Where the check field starts; it covers everything before it and the body.
const CHECK_AT: usize = 80;
const CHECK_BYTES: usize = HEADER_BYTES - CHECK_AT;
const BODY_LEN_AT: usize = 36;
/// Body prefix of PREPARE: first pipeline sequence and first zxid.
pub const PREPARE_PREFIX: usize = 16;
/// Body prefix of WRITE: the follower's message sequence (0 on a retransmission).
pub const WRITE_PREFIX: usize = 8;
/// Fixed part of every PREPARE or WRITE entry: origin node (byte 0), session (2..4), fragment
/// index (4..8), the whole transaction's length (8..12), session sequence (16..24). The
/// fragment's bytes follow, zero-padded to a multiple of 8: a transaction of `len` bytes takes
/// `len.div_ceil(slot)` entries, every one a full slot but the last.
pub const ENTRY_FIXED: usize = 24;
/// Body of ACK, NACK and COMMIT: a range (first pipeline sequence, count).
pub const RANGE_BODY: usize = 16;
/// Body prefix of SNAPSHOT: the zxid the snapshot stands on, the first key position it
/// carries, and the end of the key range being sent.
pub const SNAPSHOT_PREFIX: usize = 24;
/// Fixed part of every SNAPSHOT entry (item, zxid of its value); a slot of the item's bytes
/// follows (the whole item, or one chunk of one too large for a datagram).
pub const SNAPSHOT_ENTRY_FIXED: usize = 16;

const _: () = assert!(40 + WORDS * 8 == CHECK_AT && CHECK_BYTES == 16);

/// Header flag: this message repeats something already sent.
pub const FLAG_RETRANSMIT: u16 = 1;

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Follower to leader: client writes to order.
    Write = 1,
    /// Leader to followers: ordered writes to store.
    Prepare = 2,
    /// Follower to leader: "I hold every prepare below this point".
    Ack = 3,
    /// Leader to followers: "every prepare below this point is committed".
    Commit = 4,
    /// Either way: flow-control and progress counters only.
    Credit = 5,
    /// Follower to leader: "these prepares never reached me".
    Nack = 6,
    /// Either way: joining a pipeline (configuration fingerprint, process instance, start).
    Hello = 7,
    /// Leader to a catching-up follower: store entries.
    Snapshot = 8,
    /// Any node to any: an election notification (a vote, its round and the sender's state).
    Vote = 9,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Write,
        Kind::Prepare,
        Kind::Ack,
        Kind::Commit,
        Kind::Credit,
        Kind::Nack,
        Kind::Hello,
        Kind::Snapshot,
        Kind::Vote,
    ];

    pub fn from_code(code: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| *kind as u8 == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Write => "write",
            Kind::Prepare => "prepare",
            Kind::Ack => "ack",
            Kind::Commit => "commit",
            Kind::Credit => "credit",
            Kind::Nack => "nack",
            Kind::Hello => "hello",
            Kind::Snapshot => "snapshot",
            Kind::Vote => "vote",
        }
    }

    pub fn index(self) -> usize {
        self as usize - 1
    }
}

/// Why a datagram was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("datagram of {0} bytes is shorter than a header")]
    Short(usize),
    #[error("bad magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported version {0}")]
    BadVersion(u8),
    #[error("unknown kind {0}")]
    BadKind(u8),
    #[error("datagram from another cluster")]
    ForeignCluster,
    #[error("datagram from another run of the cluster (run {0:#x})")]
    ForeignRun(u64),
    #[error("header claims a {claimed}-byte body, the datagram has {found}")]
    Truncated { claimed: usize, found: usize },
    #[error("integrity check failed (corrupt, or not sealed with this cluster's secret)")]
    BadCheck,
    #[error("slot length {found} differs from the configured {expected}")]
    SlotLength { found: usize, expected: usize },
    #[error("entry {index}: {why}")]
    BadEntry { index: usize, why: &'static str },
    #[error("body of {found} bytes does not match {count} entries ({expected} bytes)")]
    BodyLength {
        found: usize,
        expected: usize,
        count: usize,
    },
    #[error("sender node {0} or pipeline {1} out of range")]
    BadSender(u8, u8),
    #[error("prepare zxids run past 2^64")]
    ZxidRange,
}

/// Why a datagram was refused, as the counters group the reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not a well-formed message of this protocol version.
    Malformed,
    /// Of another cluster or another run of this one.
    Foreign,
    /// Its check does not match: corrupted, or forged by a host without the secret.
    Integrity,
}

impl WireError {
    pub fn reason(self) -> DropReason {
        match self {
            WireError::ForeignCluster | WireError::ForeignRun(_) => DropReason::Foreign,
            WireError::BadCheck => DropReason::Integrity,
            _ => DropReason::Malformed,
        }
    }
}

/// Domain separation for the MAC key: a key derived for anything else never verifies here.
const MAC_KEY_CONTEXT: &str = "rzab 2026-12 datagram MAC key v1";

/// How datagrams are sealed and verified.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// CRC32C over header and body: catches corruption, not forgery. For fabrics that only
    /// the cluster's hosts can reach (shm; verbs, where the QKey and the fabric's CRC also
    /// guard).
    Crc32c,
    /// Keyed BLAKE3 truncated to 128 bits, with a key derived from the cluster secret and the
    /// run: a host without the secret can neither forge a datagram nor replay one of another
    /// run. For udp.
    Mac([u8; 32]),
    /// No check at all: only for fuzzing harnesses, which must reach the decoder behind it.
    #[doc(hidden)]
    Unchecked,
}

impl fmt::Debug for Integrity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.write_str(self.name())
    }
}

impl Integrity {
    /// The MAC of a cluster whose secret is `secret`, for run `run`.
    pub fn mac(secret: &[u8], run: u64) -> Self {
        let mut material = Vec::with_capacity(secret.len() + 8);
        material.extend_from_slice(&run.to_le_bytes());
        material.extend_from_slice(secret);
        Integrity::Mac(blake3::derive_key(MAC_KEY_CONTEXT, &material))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Integrity::Crc32c => "crc32c",
            Integrity::Mac(_) => "mac",
            Integrity::Unchecked => "unchecked",
        }
    }

    /// The check of a datagram whose header and body are written.
    fn check(&self, datagram: &[u8]) -> [u8; CHECK_BYTES] {
        let mut check = [0u8; CHECK_BYTES];
        let (covered, body) = (&datagram[..CHECK_AT], &datagram[HEADER_BYTES..]);
        match self {
            Integrity::Crc32c => {
                let crc = crc32c::crc32c_append(crc32c::crc32c(covered), body);
                check[..4].copy_from_slice(&crc.to_le_bytes());
            }
            Integrity::Mac(key) => {
                let mut hasher = blake3::Hasher::new_keyed(key);
                hasher.update(covered);
                hasher.update(body);
                hasher.finalize_xof().fill(&mut check);
            }
            Integrity::Unchecked => {}
        }
        check
    }

    fn verify(&self, datagram: &[u8]) -> bool {
        if *self == Integrity::Unchecked {
            return true;
        }
        let expected = self.check(datagram);
        // No early exit: the time taken says nothing about how much of a forged tag matched.
        expected
            .iter()
            .zip(&datagram[CHECK_AT..HEADER_BYTES])
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
    }
}

/// Completes a message whose header and body fill `datagram`: writes the body length and the
/// check. Outboxes call it on every message before it is posted. A buffer shorter than a
/// header is left alone (no receiver would take it anyway).
pub fn seal(datagram: &mut [u8], integrity: &Integrity) {
    if datagram.len() < HEADER_BYTES {
        return;
    }
    let body = u32::try_from(datagram.len().saturating_sub(HEADER_BYTES)).unwrap_or(u32::MAX);
    datagram[BODY_LEN_AT..BODY_LEN_AT + 4].copy_from_slice(&body.to_le_bytes());
    let check = integrity.check(datagram);
    datagram[CHECK_AT..HEADER_BYTES].copy_from_slice(&check);
}

/// What a receiver checks a datagram against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireContext {
    pub cluster_tag: u32,
    pub run: u64,
    /// Bytes of transaction per PREPARE or WRITE entry at most (a fragment's).
    pub slot_len: usize,
    /// The longest transaction of the run.
    pub max_txn_len: usize,
    /// Bytes of snapshot item per SNAPSHOT entry.
    pub snapshot_slot_len: usize,
    pub nodes: usize,
    pub pipelines: usize,
    pub integrity: Integrity,
}

impl WireContext {
    /// [`Message::decode`] under this context.
    pub fn decode<'a>(&self, datagram: &'a [u8]) -> Result<Message<'a>, WireError> {
        Message::decode(datagram, self)
    }
}

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub from_node: u8,
    pub pipeline: u8,
    pub count: u16,
    pub cluster_tag: u32,
    /// Entry slot length in 8-byte words (PREPARE, WRITE, SNAPSHOT; 0 otherwise).
    pub slot_words: u16,
    pub flags: u16,
    pub run: u64,
    /// The sender's process instance: a restarted process has a new one.
    pub instance: u64,
    /// The epoch the sender speaks in (its leader's).
    pub epoch: u32,
    /// Counters whose meaning depends on the direction (see the pipelines).
    pub words: [u64; WORDS],
}

impl Header {
    pub fn is_retransmit(&self) -> bool {
        self.flags & FLAG_RETRANSMIT != 0
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Encodes the header into `out[..HEADER_BYTES]` (body length and check stay for [`seal`]).
pub fn put_header(out: &mut [u8], header: &Header) {
    out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    out[2] = VERSION;
    out[3] = header.kind as u8;
    out[4] = header.from_node;
    out[5] = header.pipeline;
    out[6..8].copy_from_slice(&header.count.to_le_bytes());
    out[8..12].copy_from_slice(&header.cluster_tag.to_le_bytes());
    out[12..14].copy_from_slice(&header.slot_words.to_le_bytes());
    out[14..16].copy_from_slice(&header.flags.to_le_bytes());
    out[16..24].copy_from_slice(&header.run.to_le_bytes());
    out[24..32].copy_from_slice(&header.instance.to_le_bytes());
    out[32..36].copy_from_slice(&header.epoch.to_le_bytes());
    for (index, word) in header.words.iter().enumerate() {
        let at = 40 + index * 8;
        out[at..at + 8].copy_from_slice(&word.to_le_bytes());
    }
}

/// Size of a PREPARE carrying `count` entries of `piece_len` bytes each.
pub const fn prepare_len(count: usize, piece_len: usize) -> usize {
    HEADER_BYTES + PREPARE_PREFIX + count * entry_wire_len(piece_len)
}

/// Size of a WRITE carrying `count` entries of `piece_len` bytes each.
pub const fn write_len(count: usize, piece_len: usize) -> usize {
    HEADER_BYTES + WRITE_PREFIX + count * entry_wire_len(piece_len)
}

/// Size of a SNAPSHOT carrying `count` entries of `slot_len`-byte slots.
pub const fn snapshot_len(count: usize, slot_len: usize) -> usize {
    HEADER_BYTES + SNAPSHOT_PREFIX + count * (SNAPSHOT_ENTRY_FIXED + slot_len)
}

/// The header's slot length field for `slot_len` bytes (a multiple of 8).
pub fn slot_words(slot_len: usize) -> u16 {
    u16::try_from(slot_len / 8).unwrap_or(u16::MAX)
}

/// One entry inside a PREPARE or WRITE body: fragment `fragment` of a transaction of
/// `txn_len` bytes (fragment 0 of one, for a transaction that fits a slot), and its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryView<'a> {
    pub origin_node: u8,
    pub session: u16,
    pub fragment: u32,
    pub txn_len: u32,
    pub session_seq: u64,
    /// This fragment's bytes, without padding.
    pub bytes: &'a [u8],
}

impl EntryView<'_> {
    /// What [`Message::entries`] yields for a message that carries no entries.
    pub const EMPTY: EntryView<'static> = EntryView {
        origin_node: 0,
        session: 0,
        fragment: 0,
        txn_len: 0,
        session_seq: 0,
        bytes: &[],
    };

    /// Entries the transaction takes with `slot_len`-byte slots.
    pub fn fragments(&self, slot_len: usize) -> u32 {
        fragments_of(self.txn_len as usize, slot_len)
    }
}

/// Entries a transaction of `txn_len` bytes takes with `slot_len`-byte slots (at least one).
pub fn fragments_of(txn_len: usize, slot_len: usize) -> u32 {
    u32::try_from(txn_len.max(1).div_ceil(slot_len.max(1))).unwrap_or(u32::MAX)
}

/// Bytes of fragment `fragment` of a transaction of `txn_len` bytes, with `slot_len`-byte
/// slots.
pub fn piece_len(txn_len: usize, fragment: u32, slot_len: usize) -> usize {
    txn_len
        .saturating_sub(fragment as usize * slot_len)
        .min(slot_len)
}

/// Bytes one entry takes on the wire: its fixed part and its fragment, padded to 8.
pub const fn entry_wire_len(piece_len: usize) -> usize {
    ENTRY_FIXED + piece_len.next_multiple_of(8)
}

/// Writes one entry at `out`: its fixed part, `bytes` and zero padding to 8; returns the
/// bytes written ([`entry_wire_len`]).
pub fn put_entry(
    out: &mut [u8],
    origin_node: u8,
    session: u16,
    fragment: u32,
    txn_len: u32,
    session_seq: u64,
    bytes: &[u8],
) -> usize {
    out[0] = origin_node;
    out[1] = 0;
    out[2..4].copy_from_slice(&session.to_le_bytes());
    out[4..8].copy_from_slice(&fragment.to_le_bytes());
    out[8..12].copy_from_slice(&txn_len.to_le_bytes());
    out[12..16].fill(0);
    out[16..24].copy_from_slice(&session_seq.to_le_bytes());
    let len = entry_wire_len(bytes.len());
    out[ENTRY_FIXED..ENTRY_FIXED + bytes.len()].copy_from_slice(bytes);
    out[ENTRY_FIXED + bytes.len()..len].fill(0);
    len
}

/// The entry at the start of `body` (already validated by [`Message::decode`]) and the bytes
/// it takes; `None` when `body` cannot hold one.
fn entry_at(body: &[u8], slot_len: usize) -> Option<(EntryView<'_>, usize)> {
    if body.len() < ENTRY_FIXED {
        return None;
    }
    let txn_len = u32_at(body, 8);
    let fragment = u32_at(body, 4);
    let piece = piece_len(txn_len as usize, fragment, slot_len);
    let len = entry_wire_len(piece);
    if body.len() < len {
        return None;
    }
    Some((
        EntryView {
            origin_node: body[0],
            session: u16_at(body, 2),
            fragment,
            txn_len,
            session_seq: u64_at(body, 16),
            bytes: &body[ENTRY_FIXED..ENTRY_FIXED + piece],
        },
        len,
    ))
}

/// Checks the `count` entries of a PREPARE or WRITE body: each names a fragment its
/// transaction has, of a transaction of 1..=`max_txn_len` bytes, and together they fill the
/// body exactly. Returns the number of transaction starts (fragment-0 entries) after the
/// first entry, or why not.
fn check_entries(
    body: &[u8],
    count: usize,
    slot_len: usize,
    max_txn_len: usize,
) -> Result<u64, WireError> {
    let mut at = 0;
    let mut starts = 0u64;
    for index in 0..count {
        let rest = &body[at.min(body.len())..];
        if rest.len() < ENTRY_FIXED {
            return Err(WireError::BadEntry {
                index,
                why: "body ends before it",
            });
        }
        let txn_len = u32_at(rest, 8) as usize;
        if txn_len == 0 || txn_len > max_txn_len {
            return Err(WireError::BadEntry {
                index,
                why: "transaction length out of range",
            });
        }
        let fragment = u32_at(rest, 4);
        if fragment >= fragments_of(txn_len, slot_len) {
            return Err(WireError::BadEntry {
                index,
                why: "fragment index past the transaction",
            });
        }
        let len = entry_wire_len(piece_len(txn_len, fragment, slot_len));
        if rest.len() < len {
            return Err(WireError::BadEntry {
                index,
                why: "body ends inside it",
            });
        }
        if index > 0 && fragment == 0 {
            starts += 1;
        }
        at += len;
    }
    if at != body.len() {
        return Err(WireError::BodyLength {
            found: body.len(),
            expected: at,
            count,
        });
    }
    Ok(starts)
}

/// The entries of a PREPARE or WRITE, in order.
#[derive(Clone, Debug)]
pub struct Entries<'a> {
    body: &'a [u8],
    left: usize,
    slot_len: usize,
}

impl<'a> Iterator for Entries<'a> {
    type Item = EntryView<'a>;

    fn next(&mut self) -> Option<EntryView<'a>> {
        if self.left == 0 {
            return None;
        }
        let (entry, len) = entry_at(self.body, self.slot_len)?;
        self.body = &self.body[len..];
        self.left -= 1;
        Some(entry)
    }
}

/// A validated message.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub header: Header,
    body: &'a [u8],
}

impl<'a> Message<'a> {
    /// Validates a datagram: header, cluster and run, the body length the header claims, the
    /// integrity check, the sender range, the exact body length for the kind, and that a
    /// PREPARE's zxids do not run past 2^64.
    pub fn decode(datagram: &'a [u8], context: &WireContext) -> Result<Message<'a>, WireError> {
        if datagram.len() < HEADER_BYTES {
            return Err(WireError::Short(datagram.len()));
        }
        let magic = u16_at(datagram, 0);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if datagram[2] != VERSION {
            return Err(WireError::BadVersion(datagram[2]));
        }
        let kind = Kind::from_code(datagram[3]).ok_or(WireError::BadKind(datagram[3]))?;
        let header = Header {
            kind,
            from_node: datagram[4],
            pipeline: datagram[5],
            count: u16_at(datagram, 6),
            cluster_tag: u32_at(datagram, 8),
            slot_words: u16_at(datagram, 12),
            flags: u16_at(datagram, 14),
            run: u64_at(datagram, 16),
            instance: u64_at(datagram, 24),
            epoch: u32_at(datagram, 32),
            words: [
                u64_at(datagram, 40),
                u64_at(datagram, 48),
                u64_at(datagram, 56),
                u64_at(datagram, 64),
                u64_at(datagram, 72),
            ],
        };
        if header.cluster_tag != context.cluster_tag {
            return Err(WireError::ForeignCluster);
        }
        if header.run != context.run {
            return Err(WireError::ForeignRun(header.run));
        }
        let claimed = usize::try_from(u32_at(datagram, BODY_LEN_AT)).unwrap_or(usize::MAX);
        if claimed != datagram.len() - HEADER_BYTES {
            return Err(WireError::Truncated {
                claimed,
                found: datagram.len() - HEADER_BYTES,
            });
        }
        if !context.integrity.verify(datagram) {
            return Err(WireError::BadCheck);
        }
        let (nodes, pipelines) = (context.nodes, context.pipelines);
        if usize::from(header.from_node) >= nodes || usize::from(header.pipeline) >= pipelines {
            return Err(WireError::BadSender(header.from_node, header.pipeline));
        }
        let body = &datagram[HEADER_BYTES..];
        let count = usize::from(header.count);
        let slot_len = match kind {
            Kind::Write | Kind::Prepare => Some(context.slot_len),
            Kind::Snapshot => Some(context.snapshot_slot_len),
            _ => None,
        };
        if let Some(slot_len) = slot_len {
            if usize::from(header.slot_words) * 8 != slot_len {
                return Err(WireError::SlotLength {
                    found: usize::from(header.slot_words) * 8,
                    expected: slot_len,
                });
            }
        }
        let slot_len = slot_len.unwrap_or(0);
        if matches!(kind, Kind::Write | Kind::Prepare) {
            let prefix = if kind == Kind::Write {
                WRITE_PREFIX
            } else {
                PREPARE_PREFIX
            };
            if body.len() < prefix || count == 0 {
                return Err(WireError::BodyLength {
                    found: body.len(),
                    expected: prefix + entry_wire_len(1),
                    count,
                });
            }
            let starts = check_entries(&body[prefix..], count, slot_len, context.max_txn_len)?;
            // Zxids never wrap, and the follower numbers a PREPARE's transactions from its
            // first zxid: a range past 2^64 is corrupt (found by fuzzing: it overflowed in the
            // follower).
            if kind == Kind::Prepare && u64_at(body, 8).checked_add(starts).is_none() {
                return Err(WireError::ZxidRange);
            }
            return Ok(Message { header, body });
        }
        let expected = match kind {
            Kind::Snapshot => SNAPSHOT_PREFIX + count * (SNAPSHOT_ENTRY_FIXED + slot_len),
            Kind::Ack | Kind::Nack | Kind::Commit => RANGE_BODY,
            Kind::Credit | Kind::Hello | Kind::Vote | Kind::Write | Kind::Prepare => 0,
        };
        if body.len() != expected {
            return Err(WireError::BodyLength {
                found: body.len(),
                expected,
                count,
            });
        }
        Ok(Message { header, body })
    }

    /// PREPARE: (first pipeline sequence, first zxid).
    pub fn prepare_start(&self) -> (u64, u64) {
        if self.header.kind == Kind::Prepare {
            (u64_at(self.body, 0), u64_at(self.body, 8))
        } else {
            (0, 0)
        }
    }

    /// The entries of a PREPARE or WRITE, in order (none for other kinds).
    pub fn entries(&self) -> Entries<'a> {
        let slot_len = usize::from(self.header.slot_words) * 8;
        let prefix = match self.header.kind {
            Kind::Prepare => PREPARE_PREFIX,
            Kind::Write => WRITE_PREFIX,
            _ => self.body.len(),
        };
        Entries {
            body: &self.body[prefix.min(self.body.len())..],
            left: if prefix <= self.body.len() {
                usize::from(self.header.count)
            } else {
                0
            },
            slot_len,
        }
    }

    /// The first entry of a PREPARE or WRITE ([`EntryView::EMPTY`] for other kinds).
    pub fn first_entry(&self) -> EntryView<'a> {
        self.entries().next().unwrap_or(EntryView::EMPTY)
    }

    /// WRITE: the follower's message sequence (0 on a retransmission).
    pub fn write_seq(&self) -> u64 {
        if self.body.len() >= WRITE_PREFIX {
            u64_at(self.body, 0)
        } else {
            0
        }
    }

    /// ACK, NACK or COMMIT: (first pipeline sequence, count).
    pub fn range(&self) -> (u64, u64) {
        if self.body.len() >= RANGE_BODY {
            (u64_at(self.body, 0), u64_at(self.body, 8))
        } else {
            (0, 0)
        }
    }

    /// SNAPSHOT: (zxid the snapshot stands on, first key position, end of the range).
    pub fn snapshot_start(&self) -> (u64, u64, u64) {
        if self.body.len() >= SNAPSHOT_PREFIX {
            (
                u64_at(self.body, 0),
                u64_at(self.body, 8),
                u64_at(self.body, 16),
            )
        } else {
            (0, 0, 0)
        }
    }

    /// Entry `index` of a SNAPSHOT (index below `header.count`): (item, zxid, slot).
    pub fn snapshot_entry(&self, index: usize) -> (u64, u64, &'a [u8]) {
        let slot_len = usize::from(self.header.slot_words) * 8;
        let size = SNAPSHOT_ENTRY_FIXED + slot_len;
        let at = SNAPSHOT_PREFIX + index * size;
        if self.header.kind != Kind::Snapshot || at + size > self.body.len() {
            return (0, 0, &[]);
        }
        (
            u64_at(self.body, at),
            u64_at(self.body, at + 8),
            &self.body[at + SNAPSHOT_ENTRY_FIXED..at + size],
        )
    }
}

/// Writes a WRITE's body prefix after the header.
pub fn put_write_prefix(out: &mut [u8], seq: u64) {
    out[HEADER_BYTES..HEADER_BYTES + 8].copy_from_slice(&seq.to_le_bytes());
}

/// Writes a SNAPSHOT's body prefix after the header.
pub fn put_snapshot_prefix(out: &mut [u8], base_zxid: u64, first: u64, end: u64) {
    let at = HEADER_BYTES;
    out[at..at + 8].copy_from_slice(&base_zxid.to_le_bytes());
    out[at + 8..at + 16].copy_from_slice(&first.to_le_bytes());
    out[at + 16..at + 24].copy_from_slice(&end.to_le_bytes());
}

/// Writes one SNAPSHOT entry at `out[..SNAPSHOT_ENTRY_FIXED + slot.len()]`.
pub fn put_snapshot_entry(out: &mut [u8], item: u64, zxid: u64, slot: &[u8]) {
    out[0..8].copy_from_slice(&item.to_le_bytes());
    out[8..16].copy_from_slice(&zxid.to_le_bytes());
    out[SNAPSHOT_ENTRY_FIXED..SNAPSHOT_ENTRY_FIXED + slot.len()].copy_from_slice(slot);
}

/// Writes a PREPARE's body prefix after the header.
pub fn put_prepare_prefix(out: &mut [u8], first_seq: u64, first_zxid: u64) {
    out[HEADER_BYTES..HEADER_BYTES + 8].copy_from_slice(&first_seq.to_le_bytes());
    out[HEADER_BYTES + 8..HEADER_BYTES + 16].copy_from_slice(&first_zxid.to_le_bytes());
}

/// Writes an ACK or COMMIT body after the header.
pub fn put_range(out: &mut [u8], first: u64, count: u64) {
    out[HEADER_BYTES..HEADER_BYTES + 8].copy_from_slice(&first.to_le_bytes());
    out[HEADER_BYTES + 8..HEADER_BYTES + 16].copy_from_slice(&count.to_le_bytes());
}

/// The 64-bit run of a run id (the generation a cluster's nodes are started with; any
/// string): datagrams carry it, so those of an earlier run of a cluster with the same name
/// are dropped, and the MAC key is derived from it.
pub fn run_tag(run_id: &str) -> u64 {
    let hash = blake3::hash(run_id.as_bytes());
    u64_at(hash.as_bytes(), 0)
}

/// A 32-bit tag of a cluster name, carried by every message so that datagrams of another
/// cluster sharing a fabric or a multicast group are dropped (FNV-1a).
pub fn cluster_tag(name: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "the garbage generator keeps bytes on purpose"
)]
mod tests {
    use super::*;

    const RUN: u64 = 0xfeed;

    fn header(kind: Kind, count: u16) -> Header {
        Header {
            kind,
            from_node: 1,
            pipeline: 0,
            count,
            cluster_tag: 7,
            slot_words: 1,
            flags: 0,
            run: RUN,
            instance: 42,
            epoch: 3,
            words: [1, 2, 3, 4, 5],
        }
    }

    fn context(integrity: Integrity) -> WireContext {
        WireContext {
            cluster_tag: 7,
            run: RUN,
            slot_len: 8,
            max_txn_len: 64,
            snapshot_slot_len: 8,
            nodes: 3,
            pipelines: 1,
            integrity,
        }
    }

    fn ack(integrity: &Integrity) -> Vec<u8> {
        let mut buffer = vec![0u8; HEADER_BYTES + RANGE_BODY];
        put_header(&mut buffer, &header(Kind::Ack, 0));
        put_range(&mut buffer, 5, 6);
        seal(&mut buffer, integrity);
        buffer
    }

    #[test]
    fn prepare_round_trip() {
        // A whole 5-byte transaction, then fragment 6 (the last, 3 bytes) of a 51-byte one.
        let len = HEADER_BYTES + PREPARE_PREFIX + entry_wire_len(5) + entry_wire_len(3);
        let mut buffer = vec![0u8; len];
        put_header(&mut buffer, &header(Kind::Prepare, 2));
        put_prepare_prefix(&mut buffer, 10, 99);
        let body_at = HEADER_BYTES + PREPARE_PREFIX;
        let second = body_at + put_entry(&mut buffer[body_at..], 1, 3, 0, 5, 44, &[9; 5]);
        assert_eq!(second, body_at + ENTRY_FIXED + 8);
        put_entry(&mut buffer[second..], 2, 4, 6, 51, 45, &[8; 3]);
        seal(&mut buffer, &Integrity::Crc32c);
        let message = Message::decode(&buffer, &context(Integrity::Crc32c)).unwrap();
        assert_eq!(message.header, header(Kind::Prepare, 2));
        assert_eq!(message.prepare_start(), (10, 99));
        let entries: Vec<EntryView<'_>> = message.entries().collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].bytes, &[9; 5]);
        assert_eq!(
            entries[1],
            EntryView {
                origin_node: 2,
                session: 4,
                fragment: 6,
                txn_len: 51,
                session_seq: 45,
                bytes: &[8; 3]
            }
        );
        assert_eq!(entries[1].fragments(8), 7);
        // A transaction longer than the receiver takes, or a fragment it does not have.
        let shorter = WireContext {
            max_txn_len: 50,
            ..context(Integrity::Crc32c)
        };
        assert!(matches!(
            Message::decode(&buffer, &shorter).unwrap_err(),
            WireError::BadEntry { index: 1, .. }
        ));
        let mut past = buffer.clone();
        put_entry(&mut past[second..], 2, 4, 7, 51, 45, &[]);
        seal(&mut past, &Integrity::Crc32c);
        assert!(matches!(
            Message::decode(&past, &context(Integrity::Crc32c)).unwrap_err(),
            WireError::BadEntry { index: 1, .. }
        ));
        // A body longer than its entries.
        let mut longer = buffer.clone();
        longer.extend_from_slice(&[0; 8]);
        seal(&mut longer, &Integrity::Crc32c);
        assert!(matches!(
            Message::decode(&longer, &context(Integrity::Crc32c)).unwrap_err(),
            WireError::BodyLength { .. }
        ));
        let mut other_slot = header(Kind::Prepare, 2);
        other_slot.slot_words = 2;
        put_header(&mut buffer, &other_slot);
        seal(&mut buffer, &Integrity::Crc32c);
        assert_eq!(
            Message::decode(&buffer, &context(Integrity::Crc32c)).unwrap_err(),
            WireError::SlotLength {
                found: 16,
                expected: 8
            }
        );
    }

    #[test]
    fn every_flipped_bit_is_caught_by_crc_and_mac() {
        let mac = Integrity::mac(b"secret", RUN);
        for integrity in [Integrity::Crc32c, mac] {
            let good = ack(&integrity);
            assert!(Message::decode(&good, &context(integrity)).is_ok());
            for bit in 0..good.len() * 8 {
                let mut flipped = good.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    Message::decode(&flipped, &context(integrity)).is_err(),
                    "{} let a flip of bit {bit} through",
                    integrity.name()
                );
            }
        }
    }

    #[test]
    fn a_mac_of_another_secret_or_run_does_not_verify() {
        let ours = Integrity::mac(b"secret", RUN);
        let forged = ack(&Integrity::mac(b"guess", RUN));
        assert_eq!(
            Message::decode(&forged, &context(ours)).unwrap_err(),
            WireError::BadCheck
        );
        assert_eq!(
            Message::decode(&forged, &context(ours))
                .unwrap_err()
                .reason(),
            DropReason::Integrity
        );
        // The same secret in another run derives another key: a datagram sealed for run
        // RUN + 1 but relabelled as RUN fails the check.
        let mut replayed = ack(&Integrity::mac(b"secret", RUN + 1));
        replayed[16..24].copy_from_slice(&RUN.to_le_bytes());
        assert_eq!(
            Message::decode(&replayed, &context(ours)).unwrap_err(),
            WireError::BadCheck
        );
        // A CRC is not a MAC: a receiver that wants a MAC refuses it.
        assert_eq!(
            Message::decode(&ack(&Integrity::Crc32c), &context(ours)).unwrap_err(),
            WireError::BadCheck
        );
        assert!(!format!("{ours:?}").contains(|c: char| c.is_ascii_digit()));
    }

    #[test]
    fn identity_is_checked_before_integrity() {
        let mut other_run = header(Kind::Ack, 0);
        other_run.run = RUN + 1;
        let mut buffer = vec![0u8; HEADER_BYTES + RANGE_BODY];
        put_header(&mut buffer, &other_run);
        seal(&mut buffer, &Integrity::Crc32c);
        let error = Message::decode(&buffer, &context(Integrity::Crc32c)).unwrap_err();
        assert_eq!(error, WireError::ForeignRun(RUN + 1));
        assert_eq!(error.reason(), DropReason::Foreign);
        // A body length that disagrees with the datagram is refused before the check.
        let mut longer = ack(&Integrity::Crc32c);
        longer.push(0);
        assert!(matches!(
            Message::decode(&longer, &context(Integrity::Crc32c)),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn malformed_datagrams_are_refused_not_panicked_on() {
        let unchecked = context(Integrity::Unchecked);
        let buffer = ack(&Integrity::Unchecked);
        assert_eq!(
            Message::decode(&buffer, &unchecked).unwrap().range(),
            (5, 6)
        );
        assert_eq!(
            Message::decode(&buffer[..10], &unchecked).unwrap_err(),
            WireError::Short(10)
        );
        assert_eq!(
            Message::decode(
                &buffer,
                &WireContext {
                    cluster_tag: 8,
                    ..unchecked
                }
            )
            .unwrap_err(),
            WireError::ForeignCluster
        );
        let mut short_body = buffer[..HEADER_BYTES + 3].to_vec();
        seal(&mut short_body, &Integrity::Unchecked);
        assert!(matches!(
            Message::decode(&short_body, &unchecked),
            Err(WireError::BodyLength { .. })
        ));
        assert_eq!(
            Message::decode(
                &buffer,
                &WireContext {
                    nodes: 1,
                    ..unchecked
                }
            )
            .unwrap_err(),
            WireError::BadSender(1, 0)
        );
        let mut bad = buffer.clone();
        bad[3] = 77;
        assert_eq!(
            Message::decode(&bad, &unchecked).unwrap_err(),
            WireError::BadKind(77)
        );
        bad[0] = 0;
        assert!(matches!(
            Message::decode(&bad, &unchecked),
            Err(WireError::BadMagic(_))
        ));
        // A WRITE whose count claims more entries than the body holds.
        let mut write = vec![0u8; write_len(1, 8)];
        put_header(&mut write, &header(Kind::Write, 1));
        put_write_prefix(&mut write, 9);
        put_entry(
            &mut write[HEADER_BYTES + WRITE_PREFIX..],
            1,
            0,
            0,
            8,
            3,
            &[1; 8],
        );
        seal(&mut write, &Integrity::Unchecked);
        assert_eq!(Message::decode(&write, &unchecked).unwrap().write_seq(), 9);
        put_header(&mut write, &header(Kind::Write, 3));
        assert!(matches!(
            Message::decode(&write, &unchecked),
            Err(WireError::BadEntry { index: 1, .. })
        ));
        // Every prefix of a valid message and random garbage decode without panicking.
        for len in 0..write.len() {
            let _ = Message::decode(&write[..len], &unchecked);
        }
        let mut state = 12345u64;
        for _ in 0..10_000 {
            let mut garbage = [0u8; 200];
            for byte in &mut garbage {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *byte = (state >> 56) as u8;
            }
            garbage[0..2].copy_from_slice(&MAGIC.to_le_bytes());
            garbage[2] = VERSION;
            let len = state as usize % 200;
            let datagram = &mut garbage[..len];
            if len >= HEADER_BYTES {
                seal(datagram, &Integrity::Unchecked);
            }
            let own = WireContext {
                cluster_tag: u32_at(&garbage, 8),
                run: u64_at(&garbage, 16),
                slot_len: usize::from(u16_at(&garbage, 12)) * 8,
                max_txn_len: usize::from(garbage[1]) * 8,
                snapshot_slot_len: usize::from(u16_at(&garbage, 12)) * 8,
                nodes: 256,
                pipelines: 256,
                integrity: Integrity::Unchecked,
            };
            if let Ok(message) = Message::decode(&garbage[..len], &own) {
                let _ = message.entries().count();
                for index in 0..usize::from(message.header.count) {
                    let _ = message.snapshot_entry(index);
                }
                let _ = (
                    message.range(),
                    message.snapshot_start(),
                    message.write_seq(),
                );
            }
        }
    }
}
