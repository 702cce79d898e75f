//! Emulated clients: pre-built request traces and the sessions that replay them inside a
//! worker, as the original system did.
//!
//! A trace is built once at start (keys from a uniform or zipfian distribution, and a per-mille
//! die per request, so the live write-ratio knob decides reads from writes without rebuilding
//! anything). A session issues one request per iteration when idle: a read is served from the
//! local store at once (batched with prefetch); a write is handed to the pipeline and the
//! session stalls until that write is applied locally (FIFO per session, read-your-writes).
//! Every written value starts with a unique write id, so a checker can tell which write
//! produced any value read. Touches only its own memory and the store (reads).

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use crate::store::{BATCH_MAX, Store};

/// How keys are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KeyDistribution {
    Uniform,
    /// Zipfian with exponent `theta` (0.99 is the usual "skewed").
    Zipf {
        theta: f64,
    },
}

/// Requests pre-built for one worker.
#[derive(Debug)]
pub struct Trace {
    keys: Vec<u64>,
    dice: Vec<u16>,
}

/// Why a trace could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("key count must be positive")]
    NoKeys,
    #[error("zipf theta {0} must be positive and finite")]
    BadTheta(f64),
}

impl Trace {
    pub fn build(
        keys: u64,
        distribution: KeyDistribution,
        len: usize,
        seed: u64,
    ) -> Result<Self, WorkloadError> {
        if keys == 0 {
            return Err(WorkloadError::NoKeys);
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut key_list = Vec::with_capacity(len);
        match distribution {
            KeyDistribution::Uniform => {
                for _ in 0..len {
                    key_list.push(rng.random_range(0..keys));
                }
            }
            KeyDistribution::Zipf { theta } => {
                #[allow(clippy::cast_precision_loss, reason = "key counts far below 2^52")]
                let zipf =
                    Zipf::new(keys as f64, theta).map_err(|_| WorkloadError::BadTheta(theta))?;
                for _ in 0..len {
                    // Zipf yields 1..=keys as a float; rank 1 is the hottest key.
                    #[allow(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "within 1..=keys"
                    )]
                    let rank = zipf.sample(&mut rng) as u64;
                    key_list.push(rank.saturating_sub(1).min(keys - 1));
                }
            }
        }
        let dice = (0..len).map(|_| rng.random_range(0..1000u16)).collect();
        Ok(Trace {
            keys: key_list,
            dice,
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A write id: node, pipeline, session and sequence, packed; never 0 (the initial value).
pub fn write_id(node: u8, pipeline: u8, session: u16, seq: u64) -> u64 {
    (u64::from(node) << 56)
        | (u64::from(pipeline) << 48)
        | (u64::from(session) << 32)
        | (seq & 0xffff_ffff)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionState {
    Idle,
    Writing { seq: u64, issued_at_ns: u64 },
}

/// What one call to [`Sessions::issue`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Issued {
    pub reads: u64,
    pub writes: u64,
    /// Writes the pipeline had no room for (retried next time).
    pub writes_refused: u64,
}

/// One read as a checker sees it.
#[derive(Clone, Copy, Debug)]
pub struct ReadObservation<'a> {
    pub session: u16,
    pub key: u64,
    pub value: &'a [u8],
    pub zxid: u64,
}

/// Values up to this long repeat their write id in every 8 bytes.
const FULL_PATTERN_BYTES: usize = 1024;

use crate::replica::KEY_BYTES;

/// The emulated sessions of one worker.
#[derive(Debug)]
pub struct Sessions {
    node: u8,
    pipeline: u8,
    states: Vec<SessionState>,
    next_seq: Vec<u64>,
    trace: Trace,
    cursor: usize,
    value_len: usize,
    /// The value lengths writes take in turn, by session sequence (one: `value_len`).
    value_mix: Vec<usize>,
    /// The transaction being issued: "set key K to V" ([`crate::replica::encode_kv_txn`]).
    txn: Vec<u8>,
    read_keys: [u64; BATCH_MAX],
    read_sessions: [u16; BATCH_MAX],
    read_results: [Option<u64>; BATCH_MAX],
    read_values: Vec<u8>,
}

impl Sessions {
    pub fn new(node: u8, pipeline: u8, sessions: usize, trace: Trace, value_len: usize) -> Self {
        Sessions {
            node,
            pipeline,
            states: vec![SessionState::Idle; sessions],
            next_seq: vec![1; sessions],
            trace,
            cursor: 0,
            value_len,
            value_mix: vec![value_len],
            txn: vec![0; crate::replica::kv_txn_len(value_len)],
            read_keys: [0; BATCH_MAX],
            read_sessions: [0; BATCH_MAX],
            read_results: [None; BATCH_MAX],
            read_values: vec![0; BATCH_MAX * value_len],
        }
    }

    /// Lets writes take the value lengths of `mix` in turn, by session sequence (each at most
    /// the `value_len` the sessions were made with; an empty mix leaves them all that long).
    pub fn with_value_mix(mut self, mix: &[usize]) -> Self {
        let longest = self.value_len;
        let mix: Vec<usize> = mix.iter().map(|len| (*len).clamp(1, longest)).collect();
        if !mix.is_empty() {
            self.value_mix = mix;
        }
        self
    }

    /// Starts every session's sequence at `first` (at least 1): a restarted process picks a
    /// new range, so its write ids differ from those of the process it replaces.
    pub fn with_first_sequence(mut self, first: u64) -> Self {
        self.next_seq.fill(first.max(1));
        self
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Sessions waiting for a write.
    pub fn writing(&self) -> usize {
        self.states
            .iter()
            .filter(|state| matches!(state, SessionState::Writing { .. }))
            .count()
    }

    /// Lets every idle session issue its next request. Writes go to `submit` (session, seq,
    /// key, the transaction that sets it; false = no room); reads are served from `store` in prefetched batches and
    /// shown to `observe`.
    pub fn issue(
        &mut self,
        now_ns: u64,
        write_ratio_permille: u64,
        store: &Store,
        mut submit: impl FnMut(u16, u64, u64, &[u8]) -> bool,
        mut observe: impl FnMut(ReadObservation<'_>),
    ) -> Issued {
        let mut issued = Issued::default();
        let mut pending_reads = 0;
        for session in 0..self.states.len() {
            if self.states[session] != SessionState::Idle {
                continue;
            }
            let key = self.trace.keys[self.cursor];
            let die = self.trace.dice[self.cursor];
            let session_id = u16::try_from(session).unwrap_or(u16::MAX);
            if u64::from(die) < write_ratio_permille {
                let seq = self.next_seq[session];
                let id = write_id(self.node, self.pipeline, session_id, seq).to_le_bytes();
                self.txn[..KEY_BYTES].copy_from_slice(&key.to_le_bytes());
                // Every mix length is at most `value_len`, the buffer's; the index is reduced
                // modulo the mix's length, so it never runs past it.
                #[allow(clippy::cast_possible_truncation)]
                let turn = (seq % self.value_mix.len() as u64) as usize;
                let txn_len = KEY_BYTES + self.value_mix[turn];
                let value = &mut self.txn[KEY_BYTES..txn_len];
                if value.len() <= FULL_PATTERN_BYTES {
                    for (index, byte) in value.iter_mut().enumerate() {
                        *byte = id[index % 8];
                    }
                } else {
                    // A large value carries its id at both ends (a torn value shows), not in
                    // every byte: rewriting a megabyte per write would cost more than sending it.
                    let len = value.len();
                    value[..8].copy_from_slice(&id);
                    value[len - 8..].copy_from_slice(&id);
                }
                if submit(session_id, seq, key, &self.txn[..txn_len]) {
                    self.states[session] = SessionState::Writing {
                        seq,
                        issued_at_ns: now_ns,
                    };
                    self.next_seq[session] = seq + 1;
                    issued.writes += 1;
                } else {
                    issued.writes_refused += 1;
                    continue;
                }
            } else {
                self.read_keys[pending_reads] = key;
                self.read_sessions[pending_reads] = session_id;
                pending_reads += 1;
                if pending_reads == BATCH_MAX {
                    issued.reads += self.serve_reads(store, pending_reads, &mut observe);
                    pending_reads = 0;
                }
            }
            self.cursor += 1;
            if self.cursor == self.trace.len() {
                self.cursor = 0;
            }
        }
        if pending_reads > 0 {
            issued.reads += self.serve_reads(store, pending_reads, &mut observe);
        }
        issued
    }

    fn serve_reads(
        &mut self,
        store: &Store,
        count: usize,
        observe: &mut impl FnMut(ReadObservation<'_>),
    ) -> u64 {
        let value_len = store.value_size().min(self.value_len.max(1));
        let stride = store.value_size();
        let buffer_len = count * stride;
        if self.read_values.len() < buffer_len {
            // Only when the store's rounded value size exceeds the configured one; sized once.
            self.read_values.resize(BATCH_MAX * stride, 0);
        }
        if store
            .read_batch(
                &self.read_keys[..count],
                &mut self.read_values[..buffer_len],
                &mut self.read_results[..count],
            )
            .is_err()
        {
            return 0;
        }
        for index in 0..count {
            if let Some(zxid) = self.read_results[index] {
                observe(ReadObservation {
                    session: self.read_sessions[index],
                    key: self.read_keys[index],
                    value: &self.read_values[index * stride..index * stride + value_len],
                    zxid,
                });
            }
        }
        count as u64
    }

    /// A write of `session` was applied locally: the session may go on. Returns the write's
    /// latency in nanoseconds, or `None` if the session was not waiting for that write.
    pub fn complete(&mut self, session: u16, seq: u64, now_ns: u64) -> Option<u64> {
        let state = self.states.get_mut(usize::from(session))?;
        match *state {
            SessionState::Writing {
                seq: waiting,
                issued_at_ns,
            } if waiting == seq => {
                *state = SessionState::Idle;
                Some(now_ns.saturating_sub(issued_at_ns))
            }
            _ => None,
        }
    }
}

impl Sessions {
    /// `session` gives up its write `seq`, whose fate its node cannot learn: it may go on.
    /// Returns whether it was waiting for that write.
    pub fn abandon(&mut self, session: u16, seq: u64) -> bool {
        let Some(state) = self.states.get_mut(usize::from(session)) else {
            return false;
        };
        match *state {
            SessionState::Writing { seq: waiting, .. } if waiting == seq => {
                *state = SessionState::Idle;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[test]
    fn traces_respect_key_range_and_skew() {
        let uniform = Trace::build(1000, KeyDistribution::Uniform, 10_000, 1).unwrap();
        assert!(uniform.keys.iter().all(|key| *key < 1000));
        let skewed = Trace::build(1000, KeyDistribution::Zipf { theta: 0.99 }, 10_000, 1).unwrap();
        assert!(skewed.keys.iter().all(|key| *key < 1000));
        let hottest = skewed.keys.iter().filter(|key| **key == 0).count();
        assert!(
            hottest > 500,
            "zipf 0.99 should make key 0 hot, saw {hottest}"
        );
        assert!(Trace::build(0, KeyDistribution::Uniform, 10, 1).is_err());
        assert!(Trace::build(10, KeyDistribution::Zipf { theta: -1.0 }, 10, 1).is_err());
    }

    #[test]
    fn sessions_stall_on_writes_and_not_on_reads() {
        let store = Store::new(&StoreConfig {
            keys: 100,
            value_size: 16,
            hugepages: false,
        })
        .unwrap();
        let trace = Trace::build(100, KeyDistribution::Uniform, 1000, 3).unwrap();
        let mut sessions = Sessions::new(1, 0, 4, trace, 16);
        let mut submitted = Vec::new();
        let issued = sessions.issue(
            0,
            1000,
            &store,
            |session, seq, key, txn| {
                assert_eq!(txn[..8], key.to_le_bytes());
                assert_eq!(txn[8..16], write_id(1, 0, session, seq).to_le_bytes());
                submitted.push((session, seq));
                true
            },
            |_| {},
        );
        assert_eq!(issued.writes, 4);
        // Everyone waits now: nothing more is issued.
        let again = sessions.issue(1, 0, &store, |_, _, _, _| true, |_| {});
        assert_eq!(again, Issued::default());
        assert_eq!(sessions.complete(2, 1, 50), Some(50));
        assert_eq!(sessions.complete(2, 1, 60), None, "a write completes once");
        let reads = sessions.issue(
            60,
            0,
            &store,
            |_, _, _, _| true,
            |read| assert_eq!(read.zxid, 0),
        );
        assert_eq!(reads.reads, 1);
        assert_eq!(sessions.writing(), 3);
    }
}
