//! The pipeline input format: the bytes the `pipeline_input` fuzz target reads, written by the
//! corpus capture (`--capture-corpus`) and read back by tests that replay captured datagrams.
//! Always built, because the production binary writes it; the harness that runs such inputs
//! is in `fuzzing` (feature `testing`), which re-exports these items.
//!
//! An input is the receiving node's id, a limits byte (0: the default limits), then records,
//! each introduced by a tag byte taken modulo 8. The tags below are the whole vocabulary; this
//! module encodes and decodes only the two a capture holds (datagrams and keep-ups).
//!
//! Pure functions over byte slices; touches nothing else.

/// A received datagram: `[0][length u16 LE][bytes]`.
pub const OP_DATAGRAM: u8 = 0;
/// A local write (read by the harness only).
pub const OP_LOCAL_WRITE: u8 = 1;
/// The outbox closes or opens (read by the harness only).
pub const OP_TOGGLE_OUTBOX: u8 = 2;
/// An idle iteration (read by the harness only).
pub const OP_IDLE: u8 = 3;
/// The peers keep up: `[4]`.
pub const OP_PEERS_KEEP_UP: u8 = 4;
/// A well-formed message with fuzzer-chosen fields (read by the harness only).
pub const OP_SYNTHESIZED: u8 = 5;

/// One record of a pipeline input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelineRecord<'a> {
    /// A received datagram.
    Datagram(&'a [u8]),
    /// The peers keep up: a leader node receives, from every follower, an ACK of everything it
    /// prepared that returns every credit; a follower node receives a COMMIT of everything and
    /// a CREDIT returning every WRITE credit. Real datagrams, encoded by the wire module and
    /// decoded like any other.
    PeersKeepUp,
}

/// Encodes a pipeline input: the receiving node's id, a zero byte (default limits), then each
/// record: a datagram as `[0][length u16 LE][bytes]` (cut at 65535 bytes), a keep-up as `[4]`.
pub fn encode_pipeline_input<'a>(
    node: u8,
    records: impl IntoIterator<Item = PipelineRecord<'a>>,
) -> Vec<u8> {
    let mut out = vec![node, 0];
    for record in records {
        match record {
            PipelineRecord::Datagram(datagram) => {
                let len = u16::try_from(datagram.len()).unwrap_or(u16::MAX);
                out.push(OP_DATAGRAM);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&datagram[..usize::from(len)]);
            }
            PipelineRecord::PeersKeepUp => out.push(OP_PEERS_KEEP_UP),
        }
    }
    out
}

/// Parses a pipeline input made of datagrams and keep-ups only (as captured) back into the
/// receiving node and its records; `None` for any other input.
pub fn decode_pipeline_input(input: &[u8]) -> Option<(u8, Vec<PipelineRecord<'_>>)> {
    let (&[node, 0], mut rest) = input.split_first_chunk::<2>()? else {
        return None;
    };
    let mut records = Vec::new();
    while let Some((&op, tail)) = rest.split_first() {
        if op == OP_PEERS_KEEP_UP {
            records.push(PipelineRecord::PeersKeepUp);
            rest = tail;
            continue;
        }
        if op != OP_DATAGRAM {
            return None;
        }
        let (len, tail) = tail.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_le_bytes(*len));
        let datagram = tail.get(..len)?;
        records.push(PipelineRecord::Datagram(datagram));
        rest = &tail[len..];
    }
    Some((node, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_inputs_round_trip() {
        let records = [
            PipelineRecord::Datagram(&[1u8, 2, 3]),
            PipelineRecord::PeersKeepUp,
            PipelineRecord::Datagram(&[]),
        ];
        let input = encode_pipeline_input(7, records);
        assert_eq!(input, vec![7, 0, 0, 3, 0, 1, 2, 3, 4, 0, 0, 0]);
        assert_eq!(decode_pipeline_input(&input), Some((7, records.to_vec())));
    }
}
