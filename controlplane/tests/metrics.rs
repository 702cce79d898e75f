//! /metrics of an in-process control plane over a temporary control block: the output parses
//! as the Prometheus text format (checked by a strict parser written here), holds every family
//! with its type and exact label names, and shows the block's current numbers at scrape time.
//! Without a block, it still answers, with rzab_dataplane_up 0.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; test numbers are small"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use common::{FakeDataPlane, Peers, config, eventually, free_port, generation, get_json, request};
use rzab_controlplane::ControlPlane;
use rzab_controlplane::metrics::family_names;
use rzab_shared::counters::{COUNTERS, EXPORT_BUCKETS, export_bounds};
use rzab_shared::knobs::KNOBS;
use rzab_shared::{Counter, RegistryState};

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: String,
    samples: Vec<Sample>,
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(text: &str) -> f64 {
    match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        other => other
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value `{other}`")),
    }
}

/// Parses one sample line: `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Sample {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value in `{line}`"));
    let name = &line[..name_end];
    assert!(valid_metric_name(name), "bad metric name in `{line}`");
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let bytes = after.as_bytes();
        let mut index = 0;
        loop {
            if bytes.get(index) == Some(&b'}') {
                index += 1;
                break;
            }
            let equals = after[index..]
                .find('=')
                .unwrap_or_else(|| panic!("no = in `{line}`"))
                + index;
            let label = &after[index..equals];
            assert!(
                valid_label_name(label),
                "bad label name `{label}` in `{line}`"
            );
            assert_eq!(
                bytes.get(equals + 1),
                Some(&b'"'),
                "unquoted label value in `{line}`"
            );
            index = equals + 2;
            let mut value = String::new();
            loop {
                match bytes.get(index) {
                    Some(b'\\') => {
                        value.push(match bytes.get(index + 1) {
                            Some(b'n') => '\n',
                            Some(b'\\') => '\\',
                            Some(b'"') => '"',
                            _ => panic!("bad escape in `{line}`"),
                        });
                        index += 2;
                    }
                    Some(b'"') => break,
                    Some(_) => {
                        let c = after[index..].chars().next().unwrap();
                        value.push(c);
                        index += c.len_utf8();
                    }
                    None => panic!("unterminated label value in `{line}`"),
                }
            }
            assert!(
                labels.insert(label.to_owned(), value).is_none(),
                "duplicate label `{label}` in `{line}`"
            );
            index += 1;
            match bytes.get(index) {
                Some(b',') => index += 1,
                Some(b'}') => {}
                _ => panic!("expected , or }} in `{line}`"),
            }
        }
        rest = &after[index..];
    }
    assert!(
        rest.starts_with(' '),
        "no space before the value in `{line}`"
    );
    let mut fields = rest.split_whitespace();
    let value = parse_value(
        fields
            .next()
            .unwrap_or_else(|| panic!("no value in `{line}`")),
    );
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<i64>().unwrap();
    }
    assert!(fields.next().is_none(), "trailing text in `{line}`");
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

/// Parses the text exposition format strictly: HELP/TYPE before a family's samples, each
/// family contiguous and typed once, histogram samples only with their suffixes.
fn parse_exposition(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(valid_metric_name(name), "{line}");
            let family = families.entry(name.to_owned()).or_default();
            assert!(family.samples.is_empty(), "HELP after samples: {line}");
            family.help = help.to_owned();
            current = Some(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            let family = families.entry(name.to_owned()).or_default();
            assert!(family.kind.is_empty(), "second TYPE: {line}");
            assert!(family.samples.is_empty(), "TYPE after samples: {line}");
            family.kind = kind.to_owned();
            current = Some(name.to_owned());
        } else if line.starts_with('#') {
            continue;
        } else {
            let sample = parse_sample(line);
            let family_name = current
                .clone()
                .unwrap_or_else(|| panic!("sample before TYPE: {line}"));
            let family = families.get_mut(&family_name).unwrap();
            let allowed = if family.kind == "histogram" {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| sample.name == format!("{family_name}{suffix}"))
            } else {
                sample.name == family_name
            };
            assert!(
                allowed,
                "sample {} inside family {family_name}",
                sample.name
            );
            family.samples.push(sample);
        }
    }
    families
}

/// Prometheus's `histogram_quantile` over `(le, cumulative count)` pairs ending with `+Inf`:
/// linear interpolation inside the bucket the rank falls in.
fn histogram_quantile(quantile: f64, buckets: &[(f64, f64)]) -> f64 {
    let total = buckets[buckets.len() - 1].1;
    let rank = quantile * total;
    let found = buckets
        .iter()
        .position(|(_, count)| *count >= rank)
        .unwrap_or(buckets.len() - 1);
    if found == buckets.len() - 1 {
        return buckets[buckets.len() - 2].0;
    }
    let (lower, below) = if found == 0 {
        (0.0, 0.0)
    } else {
        buckets[found - 1]
    };
    let (upper, count) = buckets[found];
    lower + (upper - lower) * ((rank - below) / (count - below))
}

fn find<'a>(family: &'a Family, name: &str, labels: &[(&str, &str)]) -> &'a Sample {
    family
        .samples
        .iter()
        .find(|sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

fn label_names(sample: &Sample) -> BTreeSet<&str> {
    sample.labels.keys().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_show_the_block_at_scrape_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("block");
    let registry = format!("127.0.0.1:{}", free_port());
    let control_plane = ControlPlane::start(config(
        "metrics",
        &generation("metrics"),
        0,
        &path,
        &registry,
    ))
    .await
    .unwrap();
    let address = control_plane.local_addr();

    // Not attached: /metrics still answers, with the data plane down.
    let reply = request(address, "GET", "/metrics", None).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.content_type.starts_with("text/plain"),
        "{}",
        reply.content_type
    );
    let families = parse_exposition(&reply.body);
    let down = &families["rzab_dataplane_up"];
    assert_eq!(down.kind, "gauge");
    assert_eq!(
        find(
            down,
            "rzab_dataplane_up",
            &[("node", "0"), ("role", "unknown")]
        )
        .value,
        0.0
    );
    assert_eq!(families["rzab_controlplane_up"].samples[0].value, 1.0);
    assert!(!families.contains_key("rzab_operations_total"));

    let data_plane = FakeDataPlane::start(&path, "metrics", 0, 1, 2, 0, Peers::Static);
    let block = &data_plane.block;
    block.worker(1).add(Counter::ReadsCompleted, 7);
    block.worker(0).add(Counter::SentPrepareMulticast, 3);
    block.worker(0).write_latency_ns.record(1500);
    block.worker(0).write_latency_ns.record(3000);
    block.worker(0).write_latency_ns.record(3000);
    // Worker 1: 9 997 latencies spread from 10 us to about 5 ms, merged with worker 0's.
    for step in 0..9_997u64 {
        block
            .worker(1)
            .write_latency_ns
            .record(10_000 + step * step / 20);
    }
    let gauges = &block.worker(0).gauges;
    gauges.applied_zxid.store(5, Ordering::Relaxed);
    gauges.leader_zxid.store(9, Ordering::Relaxed);
    gauges.sync_state.store(2, Ordering::Relaxed);
    let gauges = &block.worker(1).gauges;
    gauges.applied_zxid.store(10, Ordering::Relaxed);
    gauges.leader_zxid.store(3, Ordering::Relaxed);
    eventually("the data plane is up in /metrics", async || {
        let text = request(address, "GET", "/metrics", None).await.body;
        parse_exposition(&text)
            .get("rzab_dataplane_up")
            .is_some_and(|family| family.samples[0].value == 1.0)
    })
    .await;

    let text = request(address, "GET", "/metrics", None).await.body;
    let families = parse_exposition(&text);
    for name in family_names() {
        let family = families
            .get(&name)
            .unwrap_or_else(|| panic!("family {name} missing"));
        assert!(!family.help.is_empty(), "{name} has no help");
        let expected = if name == "rzab_write_latency_seconds" {
            "histogram"
        } else if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        assert_eq!(family.kind, expected, "{name}");
    }
    assert_eq!(
        families.len(),
        family_names().len(),
        "no unexpected families"
    );

    // Counters: one family per COUNTERS family, labels node, worker, role and their own.
    for spec in COUNTERS {
        let family = &families[&format!("rzab_{}", spec.family)];
        for worker in ["0", "1"] {
            let mut labels = vec![("node", "0"), ("worker", worker), ("role", "leader")];
            labels.extend(spec.labels.iter().copied());
            let sample = find(family, &format!("rzab_{}", spec.family), &labels);
            let mut names: BTreeSet<&str> = ["node", "worker", "role"].into();
            names.extend(spec.labels.iter().map(|(key, _)| *key));
            assert_eq!(label_names(sample), names, "{}", spec.family);
        }
    }
    let operations = &families["rzab_operations_total"];
    assert_eq!(
        find(
            operations,
            "rzab_operations_total",
            &[("worker", "1"), ("kind", "read")]
        )
        .value,
        7.0
    );
    assert_eq!(
        find(
            operations,
            "rzab_operations_total",
            &[("worker", "0"), ("kind", "read")]
        )
        .value,
        0.0
    );
    let sent = &families["rzab_messages_sent_total"];
    assert_eq!(
        find(
            sent,
            "rzab_messages_sent_total",
            &[("worker", "0"), ("type", "prepare"), ("path", "multicast")]
        )
        .value,
        3.0
    );

    // The histogram, per node over its workers: cumulative buckets in seconds at the exported
    // log-linear bounds, +Inf equal to the count.
    let latency = &families["rzab_write_latency_seconds"];
    let node0 = [("node", "0")];
    let buckets: Vec<&Sample> = latency
        .samples
        .iter()
        .filter(|sample| sample.name.ends_with("_bucket"))
        .collect();
    assert_eq!(buckets.len(), EXPORT_BUCKETS + 1, "one series per bound");
    assert!(
        buckets
            .windows(2)
            .all(|pair| pair[0].value <= pair[1].value)
    );
    let bound = |sample: &Sample| parse_value(&sample.labels["le"]);
    assert!(
        buckets
            .windows(2)
            .all(|pair| bound(pair[0]) < bound(pair[1]))
    );
    for (sample, exported) in buckets.iter().zip(export_bounds()) {
        assert_eq!(bound(sample), exported as f64 / 1e9);
    }
    let at = |seconds: f64| {
        buckets
            .iter()
            .find(|sample| bound(sample) == seconds)
            .unwrap_or_else(|| panic!("no bucket le={seconds}"))
            .value
    };
    // 1500 ns is in [1488, 1504) (16 ns steps from 1024 ns), 3000 ns in [2976, 3008).
    assert_eq!(at(1488.0 / 1e9), 0.0);
    assert_eq!(at(1504.0 / 1e9), 1.0);
    assert_eq!(at(2976.0 / 1e9), 1.0);
    assert_eq!(at(3008.0 / 1e9), 3.0);
    assert_eq!(at(9984.0 / 1e9), 3.0, "below worker 1's 10 us");
    assert_eq!(at(f64::INFINITY), 10_000.0);
    assert_eq!(
        find(latency, "rzab_write_latency_seconds_count", &node0).value,
        10_000.0
    );
    let mut snapshot = block.worker(0).write_latency_ns.snapshot();
    snapshot.merge(&block.worker(1).write_latency_ns.snapshot());
    assert!(
        (find(latency, "rzab_write_latency_seconds_sum", &node0).value - snapshot.sum as f64 / 1e9)
            .abs()
            < 1e-9
    );
    assert_eq!(
        label_names(find(latency, "rzab_write_latency_seconds_count", &node0)),
        ["node", "role"].into()
    );
    // histogram_quantile over the exported buckets gives the data plane's figures within 2%.
    let series: Vec<(f64, f64)> = buckets
        .iter()
        .map(|sample| (bound(sample), sample.value))
        .collect();
    let percentiles = snapshot.percentiles();
    for (quantile, ours) in [
        (0.5, percentiles.p50),
        (0.99, percentiles.p99),
        (0.999, percentiles.p999),
        (1.0, percentiles.max),
    ] {
        let ours = ours as f64 / 1e9;
        let prometheus = histogram_quantile(quantile, &series);
        assert!(
            (prometheus - ours).abs() / ours <= 0.02,
            "q{quantile}: histogram_quantile {prometheus} against {ours}"
        );
    }
    assert_eq!(
        find(
            &families["rzab_write_latency_max_seconds"],
            "rzab_write_latency_max_seconds",
            &node0
        )
        .value,
        snapshot.max as f64 / 1e9
    );

    // Gauges.
    let value =
        |family: &str, labels: &[(&str, &str)]| find(&families[family], family, labels).value;
    assert_eq!(value("rzab_applied_zxid", &[("worker", "0")]), 5.0);
    assert_eq!(value("rzab_leader_zxid", &[("worker", "0")]), 9.0);
    assert_eq!(value("rzab_replication_lag", &[("worker", "0")]), 4.0);
    assert_eq!(
        value("rzab_replication_lag", &[("worker", "1")]),
        0.0,
        "saturates at 0"
    );
    assert_eq!(
        value("rzab_sync_state", &[("worker", "0"), ("state", "serving")]),
        2.0
    );
    assert_eq!(
        value("rzab_sync_state", &[("worker", "1"), ("state", "starting")]),
        0.0
    );
    for spec in KNOBS {
        assert_eq!(
            value("rzab_knob_value", &[("node", "0"), ("knob", spec.name)]),
            block.knob(spec.knob) as f64,
            "{}",
            spec.name
        );
    }
    assert_eq!(
        value("rzab_knob_epoch", &[("node", "0")]),
        block.knob_epoch() as f64
    );
    assert_eq!(
        value("rzab_dataplane_up", &[("node", "0"), ("role", "leader")]),
        1.0
    );
    let age = value("rzab_dataplane_heartbeat_age_seconds", &[("node", "0")]);
    assert!(age.is_finite() && age >= 0.0);
    assert_eq!(value("rzab_controlplane_up", &[("node", "0")]), 1.0);
    assert_eq!(value("rzab_peers_known", &[("node", "0")]), 0.0);
    let state = get_json(address, "/v1/status").await["registry"]["state"].clone();
    let code = RegistryState::ALL
        .into_iter()
        .find(|candidate| candidate.name() == state)
        .unwrap()
        .code();
    // The registry is a closed port: unreachable (the state may move between the two reads
    // only between connecting and unreachable).
    assert!(
        [
            RegistryState::Unreachable.code(),
            RegistryState::Connecting.code(),
            code
        ]
        .contains(&(value("rzab_registry_state", &[("node", "0")]) as u32))
    );
    for (name, family) in &families {
        for sample in &family.samples {
            assert_eq!(
                sample.labels.get("node").map(String::as_str),
                Some("0"),
                "{name}"
            );
        }
    }

    // Scrape time, not a copy: a change shows in the very next scrape.
    block.worker(1).add(Counter::ReadsCompleted, 5);
    let text = request(address, "GET", "/metrics", None).await.body;
    let families = parse_exposition(&text);
    assert_eq!(
        find(
            &families["rzab_operations_total"],
            "rzab_operations_total",
            &[("worker", "1"), ("kind", "read")]
        )
        .value,
        12.0
    );
    control_plane.shutdown().await;
}

#[test]
fn the_parser_refuses_malformed_text() {
    for bad in [
        "rzab_x 1\n",
        "# TYPE rzab_x gauge\nrzab_x{a=1} 1\n",
        "# TYPE rzab_x gauge\nrzab_y 1\n",
        "# TYPE rzab_x gauge\nrzab_x one\n",
        "# TYPE rzab_x gauge\n# TYPE rzab_x gauge\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_exposition(bad)).is_err(),
            "accepted: {bad}"
        );
    }
    let families = parse_exposition(
        "# HELP rzab_x a \\\\ help\n# TYPE rzab_x gauge\nrzab_x{a=\"q\\\"\\\\\",b=\"\"} +Inf\n",
    );
    let sample = &families["rzab_x"].samples[0];
    assert_eq!(sample.labels["a"], "q\"\\");
    assert_eq!(sample.value, f64::INFINITY);
}
