//! The on-disk format of history files (`docs/history-format.md` is the prose version): a
//! fixed 64-byte header, then fixed-size 56-byte little-endian records, the last of which is a
//! trailer written at clean shutdown. Both the recorder (this crate) and the checker
//! (`rzab-tests`) encode and decode through this module only. Version 2 added the value's
//! length to write and apply records; version 1 files still decode, with lengths unknown (0).
//!
//! Pure encoding and decoding: touches nothing but the byte slices it is handed.

/// The first eight bytes of every history file.
pub const MAGIC: [u8; 8] = *b"RZABHIST";
/// Bumped whenever the layout of the header or of a record changes. Version 2 records carry
/// the value's length in bytes 4..8 of write invoke, write complete and apply records.
pub const VERSION: u32 = 2;
/// The oldest version the reader accepts: version 1 records are version 2's with bytes 4..8
/// reserved, so they decode with every length 0 (unknown).
pub const MIN_VERSION: u32 = 1;
/// Bytes of the file header.
pub const HEADER_BYTES: usize = 64;
/// Bytes of every record, the trailer included.
pub const RECORD_BYTES: usize = 56;
/// The same sizes as the header stores them.
const HEADER_BYTES_U32: u32 = 64;
const RECORD_BYTES_U32: u32 = 56;
const _: () =
    assert!(HEADER_BYTES_U32 as usize == HEADER_BYTES && RECORD_BYTES_U32 as usize == RECORD_BYTES);
/// The `extra` field of a trailer record, so that a truncated file is never taken for a
/// complete one.
pub const TRAILER_MAGIC: u64 = u64::from_le_bytes(*b"RZABEND\0");
/// The header's clock id for Linux `CLOCK_MONOTONIC` (the only clock the recorder uses): one
/// clock for every process on a host, so timestamps of different nodes on one host compare.
pub const CLOCK_MONOTONIC_ID: u32 = 1;

const KIND_READ: u8 = 1;
const KIND_WRITE_INVOKE: u8 = 2;
const KIND_WRITE_COMPLETE: u8 = 3;
const KIND_APPLY: u8 = 4;
const KIND_TRAILER: u8 = 0xff;

/// Why bytes are not a valid header or record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a history file (bad magic)")]
    BadMagic,
    #[error(
        "format version {0} is not supported (this build reads versions {MIN_VERSION} to {VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error(
        "header says {header} header bytes and {record} record bytes; expected {HEADER_BYTES} and {RECORD_BYTES}"
    )]
    Sizes { header: u32, record: u32 },
    #[error("clock id {0} is unknown (expected {CLOCK_MONOTONIC_ID}, CLOCK_MONOTONIC)")]
    UnknownClock(u32),
    #[error("node {node} / worker {worker} is outside {nodes} nodes x {workers} workers")]
    OutOfRange {
        node: u8,
        worker: u8,
        nodes: u8,
        workers: u8,
    },
    #[error("unknown record kind {0:#04x}")]
    UnknownKind(u8),
    #[error("trailer record without the trailer magic")]
    BadTrailer,
}

/// What a history file says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// The format version of the file's records ([`VERSION`] for everything recorded now; the
    /// reader also accepts [`MIN_VERSION`] and up).
    pub version: u32,
    pub node: u8,
    pub worker: u8,
    pub nodes: u8,
    pub workers: u8,
    /// The data plane process's instance id (the control block's `instance`): differs for
    /// every start, so the files of a restarted node never collide with the earlier ones.
    pub instance: u64,
    /// Wall-clock (CLOCK_REALTIME) nanoseconds at which the data plane started; orders the
    /// instances of one node.
    pub started_unix_ns: u64,
    /// The node's applied zxid when recording began.
    pub initial_zxid: u64,
    /// Which clock the records' timestamps come from ([`CLOCK_MONOTONIC_ID`]).
    pub clock: u32,
}

impl FileHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&HEADER_BYTES_U32.to_le_bytes());
        out[16..20].copy_from_slice(&RECORD_BYTES_U32.to_le_bytes());
        out[20] = self.node;
        out[21] = self.worker;
        out[22] = self.nodes;
        out[23] = self.workers;
        out[24..32].copy_from_slice(&self.instance.to_le_bytes());
        out[32..40].copy_from_slice(&self.started_unix_ns.to_le_bytes());
        out[40..48].copy_from_slice(&self.initial_zxid.to_le_bytes());
        out[48..52].copy_from_slice(&self.clock.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<FileHeader, FormatError> {
        if bytes[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u32_at(bytes, 8);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let (header, record) = (u32_at(bytes, 12), u32_at(bytes, 16));
        if header != HEADER_BYTES_U32 || record != RECORD_BYTES_U32 {
            return Err(FormatError::Sizes { header, record });
        }
        let decoded = FileHeader {
            version,
            node: bytes[20],
            worker: bytes[21],
            nodes: bytes[22],
            workers: bytes[23],
            instance: u64_at(bytes, 24),
            started_unix_ns: u64_at(bytes, 32),
            initial_zxid: u64_at(bytes, 40),
            clock: u32_at(bytes, 48),
        };
        if decoded.clock != CLOCK_MONOTONIC_ID {
            return Err(FormatError::UnknownClock(decoded.clock));
        }
        if decoded.node >= decoded.nodes || decoded.worker >= decoded.workers {
            return Err(FormatError::OutOfRange {
                node: decoded.node,
                worker: decoded.worker,
                nodes: decoded.nodes,
                workers: decoded.workers,
            });
        }
        Ok(decoded)
    }
}

/// One recorded event. Timestamps are `CLOCK_MONOTONIC` nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// A read served from the local store. `invoke_ns` is taken before the worker's issue
    /// phase, `complete_ns` after the value was read.
    Read {
        session: u16,
        invoke_ns: u64,
        complete_ns: u64,
        key: u64,
        /// The first 8 bytes of the value read (0: the initial value).
        write_id: u64,
        /// The zxid the store keeps with the value read (0: the initial value).
        value_zxid: u64,
        /// The node's applied zxid before the read: every write up to it was in the store.
        applied_zxid: u64,
    },
    /// A write accepted by the pipeline.
    WriteInvoke {
        session: u16,
        seq: u64,
        invoke_ns: u64,
        key: u64,
        write_id: u64,
        /// The value's length in bytes (0: unknown, a version 1 file).
        value_len: u32,
    },
    /// A write of this worker's session applied locally: the session's call returns.
    WriteComplete {
        session: u16,
        seq: u64,
        invoke_ns: u64,
        complete_ns: u64,
        key: u64,
        write_id: u64,
        zxid: u64,
        /// The invocation's value length (0: unknown, a version 1 file or no invocation).
        value_len: u32,
    },
    /// A write this worker applied to the node's replica (any session's, any node's).
    Apply {
        zxid: u64,
        key: u64,
        write_id: u64,
        /// The applied value's length in bytes: the transaction's less its key (0: unknown,
        /// a version 1 file).
        value_len: u32,
    },
    /// The last record of a cleanly closed file.
    Trailer {
        /// Records in the file before the trailer.
        records: u64,
        /// Records the worker could not record (no empty buffer) or the flusher could not
        /// write. A history with drops is incomplete.
        dropped: u64,
    },
}

/// The raw fields of a record, in file order.
struct RawRecord {
    kind: u8,
    session: u16,
    value_len: u32,
    first_ns: u64,
    second_ns: u64,
    key: u64,
    write_id: u64,
    zxid: u64,
    extra: u64,
}

impl Record {
    pub fn encode(&self, out: &mut [u8; RECORD_BYTES]) {
        let raw = match *self {
            Record::Read {
                session,
                invoke_ns,
                complete_ns,
                key,
                write_id,
                value_zxid,
                applied_zxid,
            } => RawRecord {
                kind: KIND_READ,
                session,
                // The store returns a value zero-padded to its item size: a read cannot tell
                // the written length.
                value_len: 0,
                first_ns: invoke_ns,
                second_ns: complete_ns,
                key,
                write_id,
                zxid: value_zxid,
                extra: applied_zxid,
            },
            Record::WriteInvoke {
                session,
                seq,
                invoke_ns,
                key,
                write_id,
                value_len,
            } => RawRecord {
                kind: KIND_WRITE_INVOKE,
                session,
                value_len,
                first_ns: invoke_ns,
                second_ns: 0,
                key,
                write_id,
                zxid: 0,
                extra: seq,
            },
            Record::WriteComplete {
                session,
                seq,
                invoke_ns,
                complete_ns,
                key,
                write_id,
                zxid,
                value_len,
            } => RawRecord {
                kind: KIND_WRITE_COMPLETE,
                session,
                value_len,
                first_ns: invoke_ns,
                second_ns: complete_ns,
                key,
                write_id,
                zxid,
                extra: seq,
            },
            Record::Apply {
                zxid,
                key,
                write_id,
                value_len,
            } => RawRecord {
                kind: KIND_APPLY,
                session: 0,
                value_len,
                first_ns: 0,
                second_ns: 0,
                key,
                write_id,
                zxid,
                extra: 0,
            },
            Record::Trailer { records, dropped } => RawRecord {
                kind: KIND_TRAILER,
                session: 0,
                value_len: 0,
                first_ns: records,
                second_ns: dropped,
                key: 0,
                write_id: 0,
                zxid: 0,
                extra: TRAILER_MAGIC,
            },
        };
        out[0] = raw.kind;
        out[1] = 0;
        out[2..4].copy_from_slice(&raw.session.to_le_bytes());
        out[4..8].copy_from_slice(&raw.value_len.to_le_bytes());
        for (index, word) in [
            raw.first_ns,
            raw.second_ns,
            raw.key,
            raw.write_id,
            raw.zxid,
            raw.extra,
        ]
        .into_iter()
        .enumerate()
        {
            out[8 + index * 8..16 + index * 8].copy_from_slice(&word.to_le_bytes());
        }
    }

    /// Decodes a record of a file of the current [`VERSION`].
    pub fn decode(bytes: &[u8; RECORD_BYTES]) -> Result<Record, FormatError> {
        Record::decode_version(bytes, VERSION)
    }

    /// Decodes a record of a file of format `version` (its header's): version 1 files kept
    /// bytes 4..8 reserved, so their lengths decode as 0 (unknown) whatever those bytes hold.
    pub fn decode_version(bytes: &[u8; RECORD_BYTES], version: u32) -> Result<Record, FormatError> {
        let session = u16::from_le_bytes([bytes[2], bytes[3]]);
        let value_len = if version >= 2 { u32_at(bytes, 4) } else { 0 };
        let word = |index: usize| u64_at(bytes, 8 + index * 8);
        let (first_ns, second_ns, key, write_id, zxid, extra) =
            (word(0), word(1), word(2), word(3), word(4), word(5));
        Ok(match bytes[0] {
            KIND_READ => Record::Read {
                session,
                invoke_ns: first_ns,
                complete_ns: second_ns,
                key,
                write_id,
                value_zxid: zxid,
                applied_zxid: extra,
            },
            KIND_WRITE_INVOKE => Record::WriteInvoke {
                session,
                seq: extra,
                invoke_ns: first_ns,
                key,
                write_id,
                value_len,
            },
            KIND_WRITE_COMPLETE => Record::WriteComplete {
                session,
                seq: extra,
                invoke_ns: first_ns,
                complete_ns: second_ns,
                key,
                write_id,
                zxid,
                value_len,
            },
            KIND_APPLY => Record::Apply {
                zxid,
                key,
                write_id,
                value_len,
            },
            KIND_TRAILER if extra == TRAILER_MAGIC => Record::Trailer {
                records: first_ns,
                dropped: second_ns,
            },
            KIND_TRAILER => return Err(FormatError::BadTrailer),
            other => return Err(FormatError::UnknownKind(other)),
        })
    }
}

/// The write id a value carries: its first 8 bytes, little-endian (0 if shorter).
pub fn value_write_id(value: &[u8]) -> u64 {
    value
        .first_chunk::<8>()
        .map_or(0, |bytes| u64::from_le_bytes(*bytes))
}

/// A value's length as records carry it: saturated at `u32::MAX` (no value comes near it; a
/// saturated length still differs from every small one).
pub fn value_len_field(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_at_the_documented_offsets() {
        let read = Record::Read {
            session: 0x0102,
            invoke_ns: 10,
            complete_ns: 11,
            key: 12,
            write_id: 13,
            value_zxid: 14,
            applied_zxid: 15,
        };
        let mut bytes = [0u8; RECORD_BYTES];
        read.encode(&mut bytes);
        assert_eq!(bytes[0], 1, "kind at offset 0");
        assert_eq!(
            bytes[2..4],
            [0x02, 0x01],
            "session at offset 2, little-endian"
        );
        assert_eq!(u32_at(&bytes, 4), 0, "a read records no length");
        assert_eq!(u64_at(&bytes, 8), 10, "invoke at 8");
        assert_eq!(u64_at(&bytes, 16), 11, "complete at 16");
        assert_eq!(u64_at(&bytes, 24), 12, "key at 24");
        assert_eq!(u64_at(&bytes, 32), 13, "write id at 32");
        assert_eq!(u64_at(&bytes, 40), 14, "zxid at 40");
        assert_eq!(u64_at(&bytes, 48), 15, "extra at 48");
        assert_eq!(Record::decode(&bytes), Ok(read));
        for record in [
            Record::WriteInvoke {
                session: 3,
                seq: 4,
                invoke_ns: 5,
                key: 6,
                write_id: 7,
                value_len: 1 << 20,
            },
            Record::WriteComplete {
                session: 3,
                seq: 4,
                invoke_ns: 5,
                complete_ns: 6,
                key: 7,
                write_id: 8,
                zxid: 9,
                value_len: 65_536,
            },
            Record::Apply {
                zxid: 1,
                key: 2,
                write_id: 3,
                value_len: u32::MAX,
            },
            Record::Trailer {
                records: 100,
                dropped: 2,
            },
        ] {
            record.encode(&mut bytes);
            assert_eq!(Record::decode(&bytes), Ok(record));
            assert_eq!(Record::decode_version(&bytes, VERSION), Ok(record));
        }
        bytes[48] ^= 1;
        assert_eq!(Record::decode(&bytes), Err(FormatError::BadTrailer));
        bytes[0] = 9;
        assert_eq!(Record::decode(&bytes), Err(FormatError::UnknownKind(9)));
    }

    /// The table of `docs/history-format.md`: kind, session, the value length at offset 4,
    /// then the six words at offsets 8, 16, 24, 32, 40 and 48, for every kind.
    #[test]
    fn every_kind_puts_its_fields_where_the_format_page_says() {
        let cases = [
            (
                Record::Read {
                    session: 7,
                    invoke_ns: 10,
                    complete_ns: 11,
                    key: 12,
                    write_id: 13,
                    value_zxid: 14,
                    applied_zxid: 15,
                },
                (1, 7, None, [10, 11, 12, 13, 14, 15]),
            ),
            (
                Record::WriteInvoke {
                    session: 7,
                    seq: 20,
                    invoke_ns: 21,
                    key: 22,
                    write_id: 23,
                    value_len: 24,
                },
                (2, 7, Some(24), [21, 0, 22, 23, 0, 20]),
            ),
            (
                Record::WriteComplete {
                    session: 7,
                    seq: 30,
                    invoke_ns: 31,
                    complete_ns: 32,
                    key: 33,
                    write_id: 34,
                    zxid: 35,
                    value_len: 0x0102_0304,
                },
                (3, 7, Some(0x0102_0304), [31, 32, 33, 34, 35, 30]),
            ),
            (
                Record::Apply {
                    zxid: 40,
                    key: 41,
                    write_id: 42,
                    value_len: 43,
                },
                (4, 0, Some(43), [0, 0, 41, 42, 40, 0]),
            ),
            (
                Record::Trailer {
                    records: 50,
                    dropped: 51,
                },
                (0xff, 0, None, [50, 51, 0, 0, 0, 0x0044_4e45_4241_5a52]),
            ),
        ];
        for (record, (kind, session, value_len, words)) in cases {
            let mut bytes = [0xaau8; RECORD_BYTES];
            record.encode(&mut bytes);
            assert_eq!(bytes[0], kind, "{record:?}");
            assert_eq!(bytes[1], 0);
            assert_eq!(u16::from_le_bytes([bytes[2], bytes[3]]), session);
            assert_eq!(u32_at(&bytes, 4), value_len.unwrap_or(0), "{record:?}");
            for (index, word) in words.into_iter().enumerate() {
                assert_eq!(
                    u64_at(&bytes, 8 + 8 * index),
                    word,
                    "{record:?} word {index}"
                );
            }
            // Reserved bytes are not read back: byte 1 always, bytes 4..8 of the kinds
            // without a length.
            bytes[1] = 0xff;
            if value_len.is_none() {
                bytes[5] = 0xff;
            }
            assert_eq!(Record::decode(&bytes), Ok(record));
        }
        assert_eq!(TRAILER_MAGIC.to_le_bytes(), *b"RZABEND\0");
    }

    /// A version 1 file's records have bytes 4..8 reserved: whatever they hold, a length reads
    /// as 0 (unknown), and every other field as in version 2.
    #[test]
    fn version_1_records_decode_with_unknown_lengths() {
        let records = [
            Record::WriteInvoke {
                session: 1,
                seq: 2,
                invoke_ns: 3,
                key: 4,
                write_id: 5,
                value_len: 32,
            },
            Record::WriteComplete {
                session: 1,
                seq: 2,
                invoke_ns: 3,
                complete_ns: 4,
                key: 5,
                write_id: 6,
                zxid: 7,
                value_len: 32,
            },
            Record::Apply {
                zxid: 7,
                key: 5,
                write_id: 6,
                value_len: 32,
            },
        ];
        for record in records {
            let mut bytes = [0u8; RECORD_BYTES];
            record.encode(&mut bytes);
            let unknown = match record {
                Record::WriteInvoke {
                    session,
                    seq,
                    invoke_ns,
                    key,
                    write_id,
                    ..
                } => Record::WriteInvoke {
                    session,
                    seq,
                    invoke_ns,
                    key,
                    write_id,
                    value_len: 0,
                },
                Record::WriteComplete {
                    session,
                    seq,
                    invoke_ns,
                    complete_ns,
                    key,
                    write_id,
                    zxid,
                    ..
                } => Record::WriteComplete {
                    session,
                    seq,
                    invoke_ns,
                    complete_ns,
                    key,
                    write_id,
                    zxid,
                    value_len: 0,
                },
                Record::Apply {
                    zxid,
                    key,
                    write_id,
                    ..
                } => Record::Apply {
                    zxid,
                    key,
                    write_id,
                    value_len: 0,
                },
                other => other,
            };
            assert_eq!(Record::decode_version(&bytes, 1), Ok(unknown));
            // As a version 1 recorder wrote it: bytes 4..8 zero.
            bytes[4..8].fill(0);
            assert_eq!(Record::decode_version(&bytes, 1), Ok(unknown));
            assert_eq!(Record::decode(&bytes), Ok(unknown));
        }
    }

    #[test]
    fn headers_round_trip_and_reject_foreign_files() {
        let header = FileHeader {
            version: VERSION,
            node: 1,
            worker: 2,
            nodes: 3,
            workers: 4,
            instance: 0xdead_beef,
            started_unix_ns: 77,
            initial_zxid: 1 << 32,
            clock: CLOCK_MONOTONIC_ID,
        };
        let bytes = header.encode();
        // The offsets of `docs/history-format.md`.
        assert_eq!(bytes[0..8], *b"RZABHIST");
        assert_eq!(
            [u32_at(&bytes, 8), u32_at(&bytes, 12), u32_at(&bytes, 16)],
            [2, 64, 56]
        );
        assert_eq!(bytes[20..24], [1, 2, 3, 4]);
        assert_eq!(
            [u64_at(&bytes, 24), u64_at(&bytes, 32), u64_at(&bytes, 40)],
            [0xdead_beef, 77, 1 << 32]
        );
        assert_eq!(u32_at(&bytes, 48), CLOCK_MONOTONIC_ID);
        assert_eq!(bytes[52..64], [0; 12]);
        assert_eq!(FileHeader::decode(&bytes), Ok(header));
        let mut older = bytes;
        older[8] = 1;
        assert_eq!(
            FileHeader::decode(&older),
            Ok(FileHeader {
                version: 1,
                ..header
            }),
            "version 1 files are still read"
        );
        let mut foreign = bytes;
        foreign[0] = b'X';
        assert_eq!(FileHeader::decode(&foreign), Err(FormatError::BadMagic));
        for unsupported in [0, 3] {
            let mut other = bytes;
            other[8] = unsupported;
            assert_eq!(
                FileHeader::decode(&other),
                Err(FormatError::UnsupportedVersion(unsupported.into()))
            );
        }
        let mut outside = bytes;
        outside[20] = 3;
        assert!(matches!(
            FileHeader::decode(&outside),
            Err(FormatError::OutOfRange { .. })
        ));
        assert_eq!(value_write_id(&7u64.to_le_bytes()), 7);
        assert_eq!(value_write_id(&[1, 2]), 0);
        assert_eq!(value_len_field(1 << 20), 1 << 20);
    }
}
