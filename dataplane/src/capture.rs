//! An opt-in wrapper over any transport that records real received datagrams as fuzzing seeds
//! (`rzab-dataplane --capture-corpus DIR`, a hidden option, or `RZAB_CAPTURE_CORPUS=DIR`).
//! Without a directory it forwards every call and records nothing.
//!
//! What it records, per worker: the first [`PER_KIND`] datagrams of each header kind byte (for
//! the `wire_decode` target) and the first [`SEQUENCE`] datagrams in arrival order (for the
//! `pipeline_input` target). Its buffers are allocated when it is created; on the receive path
//! it only copies a datagram into them while a quota is open, then only compares counters.
//! Nothing is written while the node runs: each transport hands its records to the node's
//! [`CaptureSink`] when it is dropped, and the sink writes the files when the last transport
//! and the node have let go of it (at shutdown):
//! - `DIR/wire_decode/KIND-HASH`: one datagram each;
//! - `DIR/pipeline_input/nodeN-HASH`: every pipeline's sequence, merged in arrival order, in
//!   [`crate::pipeline_input::encode_pipeline_input`]'s format (a leader's with a keep-up record
//!   after every few datagrams, standing in for the acks of its own prepares);
//! - `DIR/endpoint_decode/`: this node's endpoint records, as JSON and as the binary slot;
//! - `DIR/knobs_parse/`: the node's knob values, as a JSON object and as `NAME=VALUE` lines.
//!
//! File names carry a hash of the contents, so runs into one directory add to it without
//! clashing. Touches the wrapped transport, and the directory at shutdown.
//!
//! A node-layer module, not a transport: naming the seeds and building the leader's pipeline
//! input need the wire kinds, the leader's id and the pipeline input format, which
//! `transport/` must not know about (it imports nothing above itself).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rzab_shared::knobs::KNOBS;
use rzab_shared::{ControlBlock, EndpointAddress, EndpointRecord, Knob};

use crate::pipeline_input::{PipelineRecord, encode_pipeline_input};
use crate::transport::{
    Capabilities, MulticastGroup, RecvCompletion, SendRequest, Transport, TransportError,
    TransportStats,
};
use crate::zab::follower::LEADER_NODE;
use crate::zab::wire::Kind;

/// Datagrams kept per kind byte and worker.
pub const PER_KIND: usize = 12;
/// Datagrams kept in arrival order per worker.
pub const SEQUENCE: usize = 48;
/// In a leader's pipeline seed, a keep-up record after every this many datagrams.
const KEEP_UP_EVERY: usize = 8;
/// Kind bytes told apart; higher ones share the last bucket.
const KIND_BUCKETS: usize = 16;

/// One recorded datagram: where it is in the arena and why it was kept.
#[derive(Clone, Copy, Debug)]
struct Record {
    at: usize,
    len: usize,
    stamp: u64,
    kind_byte: u8,
    in_sequence: bool,
    as_sample: bool,
}

/// What one worker's transport recorded.
#[derive(Debug)]
struct Recording {
    worker: u8,
    arena: Vec<u8>,
    records: Vec<Record>,
    per_kind: [usize; KIND_BUCKETS],
    sequence: usize,
    local: EndpointAddress,
}

impl Recording {
    fn new(worker: u8, mtu: usize, local: EndpointAddress) -> Self {
        let most = SEQUENCE + KIND_BUCKETS * PER_KIND;
        Recording {
            worker,
            arena: Vec::with_capacity(most * mtu),
            records: Vec::with_capacity(most),
            per_kind: [0; KIND_BUCKETS],
            sequence: 0,
            local,
        }
    }

    fn full(&self) -> bool {
        self.sequence >= SEQUENCE && self.per_kind.iter().all(|count| *count >= PER_KIND)
    }

    /// Keeps `payload` if a quota is open and it fits the preallocated arena.
    fn offer(&mut self, payload: &[u8], stamps: &AtomicU64) {
        let kind_byte = payload.get(3).copied().unwrap_or(0);
        let bucket = usize::from(kind_byte).min(KIND_BUCKETS - 1);
        let in_sequence = self.sequence < SEQUENCE;
        let as_sample = self.per_kind[bucket] < PER_KIND;
        let fits = self.arena.len() + payload.len() <= self.arena.capacity()
            && self.records.len() < self.records.capacity();
        if !(in_sequence || as_sample) || !fits {
            return;
        }
        self.sequence += usize::from(in_sequence);
        self.per_kind[bucket] += usize::from(as_sample);
        self.records.push(Record {
            at: self.arena.len(),
            len: payload.len(),
            stamp: stamps.fetch_add(1, Ordering::Relaxed),
            kind_byte,
            in_sequence,
            as_sample,
        });
        self.arena.extend_from_slice(payload);
    }
}

/// Collects the recordings of one node's transports and writes them out when dropped.
#[derive(Debug)]
pub struct CaptureSink {
    dir: PathBuf,
    node: u8,
    /// Arrival order across the node's workers.
    stamps: AtomicU64,
    /// The node's knob values when it started.
    knobs: Vec<(Knob, u64)>,
    recordings: Mutex<Vec<Recording>>,
}

impl CaptureSink {
    /// A sink for `dir`, or `None` when capture is off.
    pub fn open(dir: Option<&Path>, node: u8, block: &ControlBlock) -> Option<Arc<CaptureSink>> {
        let dir = dir?;
        Some(Arc::new(CaptureSink {
            dir: dir.to_path_buf(),
            node,
            stamps: AtomicU64::new(0),
            knobs: KNOBS
                .iter()
                .map(|spec| (spec.knob, block.knob(spec.knob)))
                .collect(),
            recordings: Mutex::new(Vec::new()),
        }))
    }

    fn write_all(&self, recordings: &[Recording]) -> std::io::Result<usize> {
        let mut written = 0;
        let mut save = |target: &str, prefix: &str, bytes: &[u8]| -> std::io::Result<()> {
            let dir = self.dir.join(target);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(format!("{prefix}-{:016x}", hash(bytes))), bytes)?;
            written += 1;
            Ok(())
        };
        let mut sequence: Vec<(u64, &[u8])> = Vec::new();
        for recording in recordings {
            for record in &recording.records {
                let bytes = &recording.arena[record.at..record.at + record.len];
                if record.as_sample {
                    let kind = Kind::from_code(record.kind_byte).map_or_else(
                        || format!("kind{}", record.kind_byte),
                        |kind| kind.name().into(),
                    );
                    save("wire_decode", &kind, bytes)?;
                }
                if record.in_sequence {
                    sequence.push((record.stamp, bytes));
                }
            }
            let record = EndpointRecord::new(
                u16::from(self.node),
                u16::from(recording.worker),
                recording.local,
            );
            let json = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
            save("endpoint_decode", "record", &json)?;
            save("endpoint_decode", "slot", &recording.local.to_bytes())?;
        }
        sequence.sort_by_key(|(stamp, _)| *stamp);
        if !sequence.is_empty() {
            let mut records = Vec::new();
            for (index, (_, bytes)) in sequence.iter().enumerate() {
                records.push(PipelineRecord::Datagram(bytes));
                // The leader's own prepares are not in what it received: let the followers
                // acknowledge them now and then, so its seeds commit and apply too.
                if self.node == LEADER_NODE && index % KEEP_UP_EVERY == KEEP_UP_EVERY - 1 {
                    records.push(PipelineRecord::PeersKeepUp);
                }
            }
            let input = encode_pipeline_input(self.node, records);
            save("pipeline_input", &format!("node{}", self.node), &input)?;
        }
        let object: serde_json::Map<String, serde_json::Value> = self
            .knobs
            .iter()
            .map(|(knob, value)| (knob.spec().name.to_owned(), knob.spec().to_json(*value)))
            .collect();
        let json = serde_json::to_vec(&object).map_err(std::io::Error::other)?;
        save("knobs_parse", "object", &json)?;
        let lines: String = self
            .knobs
            .iter()
            .map(|(knob, value)| {
                let rendered = match knob.spec().to_json(*value) {
                    serde_json::Value::String(name) => name,
                    other => other.to_string(),
                };
                format!("{}={rendered}\n", knob.spec().name)
            })
            .collect();
        save("knobs_parse", "lines", lines.as_bytes())?;
        Ok(written)
    }
}

impl Drop for CaptureSink {
    fn drop(&mut self) {
        let recordings = match self.recordings.get_mut() {
            Ok(recordings) => std::mem::take(recordings),
            Err(poisoned) => std::mem::take(poisoned.into_inner()),
        };
        match self.write_all(&recordings) {
            Ok(files) => eprintln!(
                "node {}: captured {files} corpus files into {}",
                self.node,
                self.dir.display()
            ),
            Err(error) => eprintln!(
                "node {}: capturing a corpus into {} failed: {error}",
                self.node,
                self.dir.display()
            ),
        }
    }
}

/// FNV-1a, for content-derived file names.
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `T`, recording what it receives when a [`CaptureSink`] is given.
#[derive(Debug)]
pub struct CapturingTransport<T: Transport> {
    inner: T,
    capture: Option<(Arc<CaptureSink>, Recording)>,
}

impl<T: Transport> CapturingTransport<T> {
    /// Wraps `inner`, worker `worker`'s transport; records only when `sink` is given.
    pub fn new(inner: T, sink: Option<Arc<CaptureSink>>, worker: u8) -> Self {
        let capture = sink.map(|sink| {
            let recording = Recording::new(worker, inner.caps().mtu, inner.local_address());
            (sink, recording)
        });
        CapturingTransport { inner, capture }
    }

    pub fn inner(&self) -> &T {
        &self.inner
    }
}

impl<T: Transport> Drop for CapturingTransport<T> {
    fn drop(&mut self) {
        if let Some((sink, recording)) = self.capture.take() {
            match sink.recordings.lock() {
                Ok(mut recordings) => recordings.push(recording),
                Err(poisoned) => poisoned.into_inner().push(recording),
            }
        }
    }
}

impl<T: Transport> Transport for CapturingTransport<T> {
    type Address = T::Address;

    fn caps(&self) -> Capabilities {
        self.inner.caps()
    }

    fn local_address(&self) -> EndpointAddress {
        self.inner.local_address()
    }

    fn resolve(&mut self, peer: &EndpointAddress) -> Result<Self::Address, TransportError> {
        self.inner.resolve(peer)
    }

    fn join_multicast(&mut self, group: MulticastGroup) -> Result<(), TransportError> {
        self.inner.join_multicast(group)
    }

    fn multicast_address(
        &mut self,
        group: MulticastGroup,
    ) -> Result<Self::Address, TransportError> {
        self.inner.multicast_address(group)
    }

    fn send_buffer(&mut self, index: usize) -> &mut [u8] {
        self.inner.send_buffer(index)
    }

    fn post_send(&mut self, chain: &[SendRequest<Self::Address>]) -> Result<usize, TransportError> {
        self.inner.post_send(chain)
    }

    fn post_recv(&mut self, count: usize) -> usize {
        self.inner.post_recv(count)
    }

    fn posted_recvs(&self) -> usize {
        self.inner.posted_recvs()
    }

    fn poll_recv(&mut self, out: &mut [RecvCompletion]) -> usize {
        let received = self.inner.poll_recv(out);
        if let Some((sink, recording)) = &mut self.capture {
            if !recording.full() {
                for completion in &out[..received] {
                    recording.offer(self.inner.recv_payload(completion), &sink.stamps);
                }
            }
        }
        received
    }

    fn recv_payload(&self, completion: &RecvCompletion) -> &[u8] {
        self.inner.recv_payload(completion)
    }

    fn stats(&self) -> TransportStats {
        self.inner.stats()
    }
}
