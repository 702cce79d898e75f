//! The fuzzing corpora as a regression test on the stable toolchain: every committed input in
//! `fuzz/corpus/` (captured from real clusters by `fuzz/capture-corpus.sh`, plus inputs that
//! once crashed a target) and a few thousand variants of them from a seeded generator
//! (truncations, bit flips, replays, drops, reorders, foreign cluster tags) go through the same
//! harnesses the cargo-fuzz targets run (`rzab_dataplane::fuzzing`), which check invariants,
//! not only the absence of panics. On top, replayed, dropped, reordered, truncated and foreign
//! datagrams must never make a follower apply anything but what the original stream applies.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; the generator keeps bytes and indices on purpose"
)]

use std::path::{Path, PathBuf};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rzab_dataplane::fuzzing::{
    self, Applied, CAPTURE, PipelineOutcome, PipelineRecord, Violation, decode_pipeline_input,
    encode_pipeline_input,
};
use rzab_dataplane::zab::wire::{self, Kind};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn expect_ok<T>(result: Result<T, Violation>, what: impl std::fmt::Display) -> T {
    result.unwrap_or_else(|violation| panic!("{what}: {violation}"))
}

/// Common byte-level mutations.
fn mutate(rng: &mut SmallRng, input: &[u8], donor: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    match rng.random_range(0..7) {
        0 => out.truncate(rng.random_range(0..=input.len())),
        1 => {
            for _ in 0..rng.random_range(1..=4) {
                if !out.is_empty() {
                    let at = rng.random_range(0..out.len());
                    out[at] ^= 1 << rng.random_range(0..8);
                }
            }
        }
        2 => {
            if !out.is_empty() {
                let at = rng.random_range(0..out.len());
                out[at] = rng.random();
            }
        }
        3 => {
            // Foreign cluster tag.
            if out.len() >= 12 {
                out[8] ^= 0x5a;
            }
        }
        4 => {
            // Splice: the head of one input on the tail of another.
            let cut = rng.random_range(0..=out.len());
            let from = rng.random_range(0..=donor.len());
            out.truncate(cut);
            out.extend_from_slice(&donor[from..]);
        }
        5 => {
            for _ in 0..rng.random_range(1..64) {
                out.push(rng.random());
            }
        }
        _ => {
            // Interesting counts and lengths in the header.
            if out.len() >= wire::HEADER_BYTES {
                let at = [6usize, 7, 12, 13, 16, 24, 32][rng.random_range(0..7)];
                out[at] = [0u8, 1, 0x7f, 0x80, 0xff][rng.random_range(0..5)];
            }
        }
    }
    out
}

#[test]
fn wire_decode_corpus_and_variants() {
    let files = corpus("wire_decode");
    let mut kinds = Vec::new();
    let mut decoded = 0;
    for (path, bytes) in &files {
        let outcome = expect_ok(fuzzing::wire_decode(bytes), name(path));
        if let Some(kind) = outcome.capture_kind {
            decoded += 1;
            // Captured from real runs: sealed with the shm run's CRC32C or the udp run's MAC.
            assert_eq!(
                outcome.verified,
                1,
                "{} passes neither the capture's CRC32C nor its MAC",
                name(path)
            );
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
            // No strict prefix of a valid datagram decodes, and no other cluster's does.
            for len in 0..bytes.len() {
                let prefix = expect_ok(fuzzing::wire_decode(&bytes[..len]), name(path));
                assert_eq!(prefix.capture_kind, None, "{} cut to {len}", name(path));
            }
            let mut foreign = bytes.clone();
            foreign[8..12].copy_from_slice(&wire::cluster_tag("another").to_le_bytes());
            let outcome = expect_ok(fuzzing::wire_decode(&foreign), name(path));
            assert_eq!(
                outcome.capture_kind,
                None,
                "{} from another cluster",
                name(path)
            );
        }
    }
    assert!(
        decoded * 2 >= files.len(),
        "only {decoded} of {} wire_decode seeds decode under the capture configuration: was the corpus captured with fuzzing::CAPTURE?",
        files.len()
    );
    // A lossless capture run has no gaps and no restarted follower, so no NACK or SNAPSHOT:
    // the pipeline target synthesizes those.
    for kind in Kind::ALL {
        if kind != Kind::Nack && kind != Kind::Snapshot {
            assert!(kinds.contains(&kind), "no captured {} seed", kind.name());
        }
    }

    let mut rng = SmallRng::seed_from_u64(0x5eed_0001);
    for round in 0..4000 {
        let (path, bytes) = &files[rng.random_range(0..files.len())];
        let donor = &files[rng.random_range(0..files.len())].1;
        let mut variant = mutate(&mut rng, bytes, donor);
        if round % 3 == 0 {
            variant = mutate(&mut rng, &variant, donor);
        }
        expect_ok(
            fuzzing::wire_decode(&variant),
            format!("variant {round} of {}: {variant:02x?}", name(path)),
        );
    }
}

/// A captured pipeline input's records: `Some(datagram)`, or `None` for a keep-up record.
type Stream = Vec<Option<Vec<u8>>>;

fn records(input: &[u8]) -> (u8, Stream) {
    let (node, records) = decode_pipeline_input(input).expect("a captured pipeline input");
    let records = records
        .into_iter()
        .map(|record| match record {
            PipelineRecord::Datagram(datagram) => Some(datagram.to_vec()),
            PipelineRecord::PeersKeepUp => None,
        })
        .collect();
    (node, records)
}

fn encode(node: u8, stream: &[Option<Vec<u8>>]) -> Vec<u8> {
    encode_pipeline_input(
        node,
        stream.iter().map(|record| match record {
            Some(datagram) => PipelineRecord::Datagram(datagram),
            None => PipelineRecord::PeersKeepUp,
        }),
    )
}

fn run(node: u8, stream: &[Option<Vec<u8>>], what: &str) -> PipelineOutcome {
    expect_ok(fuzzing::pipeline_input(&encode(node, stream)), what)
}

/// Two replicas fed from one leader agree on every zxid both have applied.
fn assert_consistent(original: &[Applied], variant: &[Applied], what: &str) {
    let common = original.len().min(variant.len());
    assert_eq!(
        original[..common],
        variant[..common],
        "{what}: the variant applied something else"
    );
}

fn foreign_tag(datagram: &mut [u8]) -> bool {
    if datagram.len() < 12 {
        return false;
    }
    datagram[8..12].copy_from_slice(&wire::cluster_tag("another").to_le_bytes());
    true
}

#[test]
fn pipeline_corpus_and_variants() {
    let files = corpus("pipeline_input");
    let (mut follower_applied, mut leader_handled, mut leader_applied) = (0, 0, 0);
    for (path, bytes) in &files {
        let outcome = expect_ok(fuzzing::pipeline_input(bytes), name(path));
        println!(
            "{}: {} datagrams, {} handled, {} malformed, {} sent, {} applied",
            name(path),
            outcome.datagrams,
            outcome.handled,
            outcome.malformed,
            outcome.sent,
            outcome.applied.len()
        );
        if outcome.leader {
            leader_handled += outcome.handled;
            leader_applied += outcome.applied.len();
        } else {
            follower_applied += outcome.applied.len();
        }
    }
    assert!(
        follower_applied > 0,
        "no captured follower stream applies anything: the corpus does not exercise the pipeline"
    );
    assert!(
        leader_handled > 0,
        "no captured leader stream reaches the leader"
    );
    assert!(
        leader_applied > 0,
        "no captured leader stream applies anything"
    );

    let captured: Vec<(String, u8, Stream)> = files
        .iter()
        .filter(|(path, _)| !name(path).starts_with("regression-"))
        .map(|(path, bytes)| {
            let (node, stream) = records(bytes);
            (name(path), node, stream)
        })
        .collect();
    let mut rng = SmallRng::seed_from_u64(0x5eed_0002);
    let mut checked = 0;
    for (file, node, stream) in &captured {
        let original = run(*node, stream, file);
        // A whole stream from another cluster: all dropped, all counted, nothing applied.
        let mut foreign = stream.clone();
        let mut spoiled = 0;
        for datagram in foreign.iter_mut().flatten() {
            spoiled += u64::from(foreign_tag(datagram));
        }
        let outcome = run(*node, &foreign, file);
        assert!(
            outcome.foreign == spoiled && outcome.applied.is_empty(),
            "{file} from another cluster: {outcome:?}"
        );

        for round in 0..250 {
            let what = format!("{file} variant {round}");
            // Each record with whether it was spoiled (cut or made foreign).
            let mut variant: Vec<(Option<Vec<u8>>, bool)> = stream
                .iter()
                .map(|record| (record.clone(), false))
                .collect();
            // Faults a network or a stale peer can cause: none may change what is applied.
            for _ in 0..rng.random_range(1..=8) {
                if variant.is_empty() {
                    break;
                }
                let at = rng.random_range(0..variant.len());
                match (rng.random_range(0..5), &mut variant[at]) {
                    (0, _) => {
                        variant.remove(at);
                    }
                    (1, _) => {
                        // Replay, now or later.
                        let copy = variant[at].clone();
                        let to = rng.random_range(at..=variant.len());
                        variant.insert(to, copy);
                    }
                    (2, _) => {
                        let other = rng.random_range(0..variant.len());
                        variant.swap(at, other);
                    }
                    (3, (Some(datagram), spoiled)) => {
                        datagram.truncate(rng.random_range(0..datagram.len().max(1)));
                        *spoiled = true;
                    }
                    (_, (Some(datagram), spoiled)) => *spoiled |= foreign_tag(datagram),
                    (_, (None, _)) => {}
                }
            }
            let spoiled = variant.iter().filter(|(_, spoiled)| *spoiled).count() as u64;
            let variant: Stream = variant.into_iter().map(|(record, _)| record).collect();
            let outcome = run(*node, &variant, &what);
            assert!(
                outcome.malformed >= spoiled,
                "{what}: {spoiled} spoiled datagrams, {} counted malformed",
                outcome.malformed
            );
            if !outcome.leader {
                assert_consistent(&original.applied, &outcome.applied, &what);
            }
            // Corruption the network would not cause: only the structural invariants hold.
            let index = rng.random_range(0..stream.len());
            let mut corrupted = stream.clone();
            if let Some(datagram) = &mut corrupted[index] {
                *datagram = mutate(&mut rng, datagram, &[]);
            }
            run(*node, &corrupted, &format!("{what} corrupted"));
            checked += 2;
        }
        // Byte-level mutations of the encoded input (other records, limits, other nodes).
        let encoded = encode(*node, stream);
        for round in 0..100 {
            let variant = mutate(&mut rng, &encoded, &encoded);
            expect_ok(
                fuzzing::pipeline_input(&variant),
                format!("{file} byte variant {round}"),
            );
            checked += 1;
        }
    }
    assert!(checked >= 1000, "only {checked} variants checked");
}

#[test]
fn endpoint_and_knob_corpora_and_variants() {
    for (target, harness) in [
        (
            "endpoint_decode",
            fuzzing::endpoint_decode as fn(&[u8]) -> _,
        ),
        ("knobs_parse", fuzzing::knobs_parse),
    ] {
        let files = corpus(target);
        for (path, bytes) in &files {
            expect_ok(harness(bytes), name(path));
        }
        let mut rng = SmallRng::seed_from_u64(0x5eed_0003);
        for round in 0..2000 {
            let (path, bytes) = &files[rng.random_range(0..files.len())];
            let donor = &files[rng.random_range(0..files.len())].1;
            let variant = mutate(&mut rng, bytes, donor);
            expect_ok(
                harness(&variant),
                format!("{target} variant {round} of {}: {variant:02x?}", name(path)),
            );
        }
    }
    // Hand-written edges besides the captured records.
    for text in [
        &b"{\"prepare_batch\": 17, \"multicast\": 1, \"poll_mode\": \"lazy\"}"[..],
        b"write_ratio_permille=18446744073709551616\nprepare_credits= 64 \n=\n",
        b"\x07-1",
        b"{\"schema\":1,\"node\":70000,\"worker\":0,\"address\":{\"kind\":\"udp\",\"ip\":\"1.2.3\",\"port\":1}}",
    ] {
        expect_ok(fuzzing::knobs_parse(text), String::from_utf8_lossy(text));
        expect_ok(fuzzing::endpoint_decode(text), String::from_utf8_lossy(text));
    }
    // The captured configuration is the one the seeds were made with.
    assert_eq!(CAPTURE.cluster, "fuzzcap");
}

/// The first finding of the `pipeline_input` target: a PREPARE whose zxids run past 2^64
/// overflowed the follower's `first_zxid + index`. The decoder refuses it now: a PREPARE of
/// two whole transactions needs two zxids from its first.
#[test]
fn a_prepare_whose_zxids_wrap_is_refused() {
    let params = fuzzing::capture_params();
    let prepare = |first_zxid: u64| {
        let txn = [7u8; 40];
        let mut datagram = vec![0u8; wire::prepare_len(2, txn.len())];
        wire::put_header(
            &mut datagram,
            &wire::Header {
                kind: Kind::Prepare,
                from_node: 0,
                pipeline: 0,
                count: 2,
                cluster_tag: params.cluster_tag,
                slot_words: wire::slot_words(params.slot_len),
                flags: 0,
                run: params.run,
                instance: 1,
                epoch: rzab_dataplane::zab::LEADER_EPOCH,
                words: [0; wire::WORDS],
            },
        );
        wire::put_prepare_prefix(&mut datagram, 0, first_zxid);
        let mut at = wire::HEADER_BYTES + wire::PREPARE_PREFIX;
        for seq in 1..=2 {
            at += wire::put_entry(&mut datagram[at..], 1, 0, 0, 40, seq, &txn);
        }
        wire::seal(&mut datagram, &params.integrity);
        datagram
    };
    let decode = |datagram: &[u8]| {
        params
            .decode(datagram)
            .map(|message| message.prepare_start())
    };
    assert_eq!(decode(&prepare(u64::MAX)), Err(wire::WireError::ZxidRange));
    assert_eq!(decode(&prepare(u64::MAX - 1)), Ok((0, u64::MAX - 1)));
    for first_zxid in [u64::MAX, u64::MAX - 1] {
        let datagram = prepare(first_zxid);
        let records = [
            PipelineRecord::Datagram(&datagram),
            PipelineRecord::PeersKeepUp,
        ];
        let outcome = expect_ok(
            fuzzing::pipeline_input(&encode_pipeline_input(1, records)),
            format!("prepare from {first_zxid:#x}"),
        );
        assert!(outcome.applied.is_empty(), "{outcome:?}");
    }
}
