//! Wire formats of the ZAB messages: a fixed 64-byte header (magic, kind, sender, pipeline,
//! entry count, cluster tag, value length, flags, and six 64-bit words whose meaning depends on
//! the direction: flow-control and progress counters) followed by a kind-specific body. All
//! integers are little-endian.
//!
//! Decoding never panics and never trusts a length it has not checked: a short, foreign or
//! malformed datagram yields a [`WireError`] that callers count and drop. Encoding writes into
//! a caller-owned buffer and returns the length used. Nothing here allocates.

/// "ZB", little-endian.
pub const MAGIC: u16 = 0x425A;
pub const VERSION: u8 = 2;
pub const HEADER_BYTES: usize = 64;
/// Words in the header.
pub const WORDS: usize = 6;
/// Body prefix of PREPARE: first pipeline sequence and first zxid.
pub const PREPARE_PREFIX: usize = 16;
/// Body prefix of WRITE: the follower's message sequence (0 on a retransmission).
pub const WRITE_PREFIX: usize = 8;
/// Fixed part of every PREPARE or WRITE entry (origin, session, sequence, key); the value follows.
pub const ENTRY_FIXED: usize = 24;
/// Body of ACK, NACK and COMMIT: a range (first pipeline sequence, count).
pub const RANGE_BODY: usize = 16;
/// Body prefix of SNAPSHOT: the zxid the snapshot stands on, the first key position it
/// carries, and the end of the key range being sent.
pub const SNAPSHOT_PREFIX: usize = 24;
/// Fixed part of every SNAPSHOT entry (key, zxid of its value); the value follows.
pub const SNAPSHOT_ENTRY_FIXED: usize = 16;

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
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Write,
        Kind::Prepare,
        Kind::Ack,
        Kind::Commit,
        Kind::Credit,
        Kind::Nack,
        Kind::Hello,
        Kind::Snapshot,
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
    #[error("value length {found} differs from the configured {expected}")]
    ValueLength { found: usize, expected: usize },
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

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub from_node: u8,
    pub pipeline: u8,
    pub count: u16,
    pub cluster_tag: u32,
    pub value_len: u16,
    pub flags: u16,
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

/// Encodes the header into `out[..HEADER_BYTES]`.
pub fn put_header(out: &mut [u8], header: &Header) {
    out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    out[2] = VERSION;
    out[3] = header.kind as u8;
    out[4] = header.from_node;
    out[5] = header.pipeline;
    out[6..8].copy_from_slice(&header.count.to_le_bytes());
    out[8..12].copy_from_slice(&header.cluster_tag.to_le_bytes());
    out[12..14].copy_from_slice(&header.value_len.to_le_bytes());
    out[14..16].copy_from_slice(&header.flags.to_le_bytes());
    for (index, word) in header.words.iter().enumerate() {
        let at = 16 + index * 8;
        out[at..at + 8].copy_from_slice(&word.to_le_bytes());
    }
}

/// Size of a PREPARE carrying `count` entries of `value_len`-byte values.
pub const fn prepare_len(count: usize, value_len: usize) -> usize {
    HEADER_BYTES + PREPARE_PREFIX + count * (ENTRY_FIXED + value_len)
}

/// Size of a WRITE carrying `count` entries.
pub const fn write_len(count: usize, value_len: usize) -> usize {
    HEADER_BYTES + WRITE_PREFIX + count * (ENTRY_FIXED + value_len)
}

/// Size of a SNAPSHOT carrying `count` entries.
pub const fn snapshot_len(count: usize, value_len: usize) -> usize {
    HEADER_BYTES + SNAPSHOT_PREFIX + count * (SNAPSHOT_ENTRY_FIXED + value_len)
}

/// One client write inside a PREPARE or WRITE body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryView<'a> {
    pub origin_node: u8,
    pub session: u16,
    pub session_seq: u64,
    pub key: u64,
    pub value: &'a [u8],
}

impl EntryView<'_> {
    /// What [`Message::entry`] returns for a message that carries no entries.
    pub const EMPTY: EntryView<'static> = EntryView {
        origin_node: 0,
        session: 0,
        session_seq: 0,
        key: 0,
        value: &[],
    };
}

/// Writes one entry at `out[..ENTRY_FIXED + value.len()]`.
pub fn put_entry(
    out: &mut [u8],
    origin_node: u8,
    session: u16,
    session_seq: u64,
    key: u64,
    value: &[u8],
) {
    out[0] = origin_node;
    out[1] = 0;
    out[2..4].copy_from_slice(&session.to_le_bytes());
    out[4..8].copy_from_slice(&[0; 4]);
    out[8..16].copy_from_slice(&session_seq.to_le_bytes());
    out[16..24].copy_from_slice(&key.to_le_bytes());
    out[ENTRY_FIXED..ENTRY_FIXED + value.len()].copy_from_slice(value);
}

fn entry_at(body: &[u8], index: usize, value_len: usize) -> EntryView<'_> {
    let at = index * (ENTRY_FIXED + value_len);
    EntryView {
        origin_node: body[at],
        session: u16_at(body, at + 2),
        session_seq: u64_at(body, at + 8),
        key: u64_at(body, at + 16),
        value: &body[at + ENTRY_FIXED..at + ENTRY_FIXED + value_len],
    }
}

/// A validated message.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub header: Header,
    body: &'a [u8],
}

impl<'a> Message<'a> {
    /// Validates a datagram: header, cluster, sender range, the exact body length, and that a
    /// PREPARE's zxids do not run past 2^64.
    pub fn decode(
        datagram: &'a [u8],
        cluster_tag: u32,
        value_len: usize,
        nodes: usize,
        pipelines: usize,
    ) -> Result<Message<'a>, WireError> {
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
            value_len: u16_at(datagram, 12),
            flags: u16_at(datagram, 14),
            words: [
                u64_at(datagram, 16),
                u64_at(datagram, 24),
                u64_at(datagram, 32),
                u64_at(datagram, 40),
                u64_at(datagram, 48),
                u64_at(datagram, 56),
            ],
        };
        if header.cluster_tag != cluster_tag {
            return Err(WireError::ForeignCluster);
        }
        if usize::from(header.from_node) >= nodes || usize::from(header.pipeline) >= pipelines {
            return Err(WireError::BadSender(header.from_node, header.pipeline));
        }
        let body = &datagram[HEADER_BYTES..];
        let count = usize::from(header.count);
        let carries_values = matches!(kind, Kind::Write | Kind::Prepare | Kind::Snapshot);
        if carries_values && usize::from(header.value_len) != value_len {
            return Err(WireError::ValueLength {
                found: usize::from(header.value_len),
                expected: value_len,
            });
        }
        let expected = match kind {
            Kind::Write => WRITE_PREFIX + count * (ENTRY_FIXED + value_len),
            Kind::Prepare => PREPARE_PREFIX + count * (ENTRY_FIXED + value_len),
            Kind::Snapshot => SNAPSHOT_PREFIX + count * (SNAPSHOT_ENTRY_FIXED + value_len),
            Kind::Ack | Kind::Nack | Kind::Commit => RANGE_BODY,
            Kind::Credit | Kind::Hello => 0,
        };
        if body.len() != expected || (matches!(kind, Kind::Write | Kind::Prepare) && count == 0) {
            return Err(WireError::BodyLength {
                found: body.len(),
                expected,
                count,
            });
        }
        // Zxids never wrap, and the follower numbers a PREPARE's entries from its first zxid:
        // a range past 2^64 is corrupt (found by fuzzing: it overflowed in the follower).
        if kind == Kind::Prepare
            && u64_at(body, 8)
                .checked_add(u64::from(header.count))
                .is_none()
        {
            return Err(WireError::ZxidRange);
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

    /// Entry `index` of a PREPARE or WRITE (index below `header.count`).
    pub fn entry(&self, index: usize) -> EntryView<'a> {
        let value_len = usize::from(self.header.value_len);
        let prefix = match self.header.kind {
            Kind::Prepare => PREPARE_PREFIX,
            Kind::Write => WRITE_PREFIX,
            _ => return EntryView::EMPTY,
        };
        let body = &self.body[prefix..];
        entry_at(
            body,
            index.min(usize::from(self.header.count).saturating_sub(1)),
            value_len,
        )
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

    /// Entry `index` of a SNAPSHOT (index below `header.count`): (key, zxid, value).
    pub fn snapshot_entry(&self, index: usize) -> (u64, u64, &'a [u8]) {
        let value_len = usize::from(self.header.value_len);
        let size = SNAPSHOT_ENTRY_FIXED + value_len;
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

/// Writes one SNAPSHOT entry at `out[..SNAPSHOT_ENTRY_FIXED + value.len()]`.
pub fn put_snapshot_entry(out: &mut [u8], key: u64, zxid: u64, value: &[u8]) {
    out[0..8].copy_from_slice(&key.to_le_bytes());
    out[8..16].copy_from_slice(&zxid.to_le_bytes());
    out[SNAPSHOT_ENTRY_FIXED..SNAPSHOT_ENTRY_FIXED + value.len()].copy_from_slice(value);
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

    fn header(kind: Kind, count: u16) -> Header {
        Header {
            kind,
            from_node: 1,
            pipeline: 0,
            count,
            cluster_tag: 7,
            value_len: 8,
            flags: 0,
            words: [1, 2, 3, 4, 5, 6],
        }
    }

    #[test]
    fn prepare_round_trip() {
        let mut buffer = vec![0u8; prepare_len(2, 8)];
        put_header(&mut buffer, &header(Kind::Prepare, 2));
        put_prepare_prefix(&mut buffer, 10, 99);
        let body_at = HEADER_BYTES + PREPARE_PREFIX;
        put_entry(&mut buffer[body_at..], 1, 3, 44, 5, &[9; 8]);
        put_entry(
            &mut buffer[body_at + ENTRY_FIXED + 8..],
            2,
            4,
            45,
            6,
            &[8; 8],
        );
        let message = Message::decode(&buffer, 7, 8, 3, 1).unwrap();
        assert_eq!(message.header.words, [1, 2, 3, 4, 5, 6]);
        assert_eq!(message.prepare_start(), (10, 99));
        assert_eq!(
            message.entry(1),
            EntryView {
                origin_node: 2,
                session: 4,
                session_seq: 45,
                key: 6,
                value: &[8; 8]
            }
        );
    }

    #[test]
    fn malformed_datagrams_are_refused_not_panicked_on() {
        let mut buffer = vec![0u8; HEADER_BYTES + RANGE_BODY];
        put_header(&mut buffer, &header(Kind::Ack, 0));
        put_range(&mut buffer, 5, 6);
        assert_eq!(
            Message::decode(&buffer, 7, 8, 3, 1).unwrap().range(),
            (5, 6)
        );
        assert_eq!(
            Message::decode(&buffer[..10], 7, 8, 3, 1).unwrap_err(),
            WireError::Short(10)
        );
        assert_eq!(
            Message::decode(&buffer, 8, 8, 3, 1).unwrap_err(),
            WireError::ForeignCluster
        );
        assert!(matches!(
            Message::decode(&buffer[..HEADER_BYTES + 3], 7, 8, 3, 1),
            Err(WireError::BodyLength { .. })
        ));
        assert_eq!(
            Message::decode(&buffer, 7, 8, 1, 1).unwrap_err(),
            WireError::BadSender(1, 0)
        );
        let mut bad = buffer.clone();
        bad[3] = 77;
        assert_eq!(
            Message::decode(&bad, 7, 8, 3, 1).unwrap_err(),
            WireError::BadKind(77)
        );
        bad[0] = 0;
        assert!(matches!(
            Message::decode(&bad, 7, 8, 3, 1),
            Err(WireError::BadMagic(_))
        ));
        // A WRITE whose count claims more entries than the body holds.
        let mut write = vec![0u8; write_len(1, 8)];
        put_header(&mut write, &header(Kind::Write, 1));
        put_write_prefix(&mut write, 9);
        assert_eq!(Message::decode(&write, 7, 8, 3, 1).unwrap().write_seq(), 9);
        put_header(&mut write, &header(Kind::Write, 3));
        assert!(matches!(
            Message::decode(&write, 7, 8, 3, 1),
            Err(WireError::BodyLength { .. })
        ));
        // Every prefix of a valid message and random garbage decode without panicking.
        for len in 0..write.len() {
            let _ = Message::decode(&write[..len], 7, 8, 3, 1);
        }
        let mut state = 12345u64;
        for _ in 0..10_000 {
            let mut garbage = [0u8; 160];
            for byte in &mut garbage {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *byte = (state >> 56) as u8;
            }
            garbage[0..2].copy_from_slice(&MAGIC.to_le_bytes());
            garbage[2] = VERSION;
            if let Ok(message) = Message::decode(
                &garbage[..(state as usize % 160)],
                u32_at(&garbage, 8),
                usize::from(u16_at(&garbage, 12)),
                256,
                256,
            ) {
                for index in 0..usize::from(message.header.count) {
                    let _ = message.entry(index);
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
