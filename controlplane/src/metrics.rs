//! Prometheus metrics, read from the control block at scrape time.
//!
//! [`BlockCollector`] is a custom `prometheus::core::Collector`: each scrape reads the attached
//! block's counters, histograms, gauges and knobs directly (there is no background copy), so a
//! scrape always shows the data plane's current numbers. Families and labels:
//! every counter of `rzab_shared::counters::COUNTERS` as `rzab_{family}` (labels node, worker,
//! role plus the counter's own), `rzab_write_latency_seconds` (a histogram per node, labels node
//! and role: the workers' log-linear histograms merged and exported at
//! `rzab_shared::counters::export_bounds`, 64 buckets per power of two from 256 ns to 4.29 s,
//! fine enough that `histogram_quantile` lands within 1.6% of the data plane's own percentiles),
//! `rzab_write_latency_max_seconds` (the exact maximum, per node), the per-worker gauges
//! `rzab_applied_zxid`, `rzab_leader_zxid`, `rzab_replication_lag`, `rzab_sync_state`,
//! `rzab_epoch`, `rzab_last_election_seconds`, and
//! the per-node `rzab_knob_value`, `rzab_knob_epoch`, `rzab_dataplane_up`,
//! `rzab_dataplane_heartbeat_age_seconds`, `rzab_registry_state`, `rzab_controlplane_up`,
//! `rzab_peers_known`. Without an attached block only the per-node liveness families are
//! exported, with `rzab_dataplane_up` 0.
//!
//! Touches: the attached control block (reads only), the registry status (reads only).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};
use rzab_shared::counters::{COUNTERS, HistogramSnapshot};
use rzab_shared::knobs::KNOBS;
use rzab_shared::limits::MAX_WORKERS;
use rzab_shared::{ControlBlock, SyncState};

use crate::state::{Shared, dataplane_heartbeat_age, dataplane_up};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const WORKER_LABELS: &[&str] = &["node", "worker", "role"];
const NODE_LABELS: &[&str] = &["node", "role"];

/// The families that are not counters: name, type, help, labels.
const FAMILIES: &[(&str, MetricType, &str, &[&str])] = &[
    (
        "rzab_write_latency_seconds",
        MetricType::HISTOGRAM,
        "Write latency from a session issuing a write to its local apply, in seconds, over the node's workers: 64 linear buckets per power of two from 256 ns to 4.29 s (at most 1.56% wide, so histogram_quantile is within 1.6% of the data plane's percentiles); a bound is exclusive for integer nanoseconds.",
        NODE_LABELS,
    ),
    (
        "rzab_write_latency_max_seconds",
        MetricType::GAUGE,
        "Largest write latency the node's workers recorded since the data plane started, in seconds (exact).",
        NODE_LABELS,
    ),
    (
        "rzab_applied_zxid",
        MetricType::GAUGE,
        "Highest zxid this worker's node has applied, as seen by the worker.",
        WORKER_LABELS,
    ),
    (
        "rzab_leader_zxid",
        MetricType::GAUGE,
        "Highest zxid the worker knows the leader to have committed (the leader's own on the leader).",
        WORKER_LABELS,
    ),
    (
        "rzab_replication_lag",
        MetricType::GAUGE,
        "rzab_leader_zxid minus rzab_applied_zxid, 0 when not behind.",
        WORKER_LABELS,
    ),
    (
        "rzab_sync_state",
        MetricType::GAUGE,
        "Whether the worker's pipeline is in step with the leader: 0 starting, 1 catching_up, 2 serving; in trouble: 3 no_leader, 4 no_quorum, 5 fell_behind, 6 electing (also named by the state label).",
        &["node", "worker", "role", "state"],
    ),
    (
        "rzab_epoch",
        MetricType::GAUGE,
        "The epoch the worker's pipeline speaks in (the high 32 bits of the zxids its leader gives); it rises with every elected leader.",
        WORKER_LABELS,
    ),
    (
        "rzab_last_election_seconds",
        MetricType::GAUGE,
        "How long the worker's last election took, from giving up its leader to following (or leading) the next, in seconds (0 before any).",
        WORKER_LABELS,
    ),
    (
        "rzab_knob_value",
        MetricType::GAUGE,
        "Current value of each live knob (booleans 0/1, choices as their index).",
        &["node", "knob"],
    ),
    (
        "rzab_knob_epoch",
        MetricType::GAUGE,
        "Knob epoch: changes after every knob update.",
        &["node"],
    ),
    (
        "rzab_dataplane_up",
        MetricType::GAUGE,
        "1 when the data plane is running and its heartbeat is at most 2 s old.",
        &["node", "role"],
    ),
    (
        "rzab_dataplane_heartbeat_age_seconds",
        MetricType::GAUGE,
        "Seconds since the data plane's last heartbeat (+Inf if it never beat).",
        &["node"],
    ),
    (
        "rzab_registry_state",
        MetricType::GAUGE,
        "Registry exchange state: 0 unknown, 1 connecting, 2 unreachable, 3 publishing, 4 waiting_for_peers, 5 ready.",
        &["node"],
    ),
    (
        "rzab_controlplane_up",
        MetricType::GAUGE,
        "1 while this control plane answers.",
        &["node"],
    ),
    (
        "rzab_peers_known",
        MetricType::GAUGE,
        "Other nodes whose registry records this control plane has accepted.",
        &["node"],
    ),
];

/// One counter family: its help and label names.
#[derive(Debug)]
struct CounterFamily {
    help: String,
    labels: Vec<String>,
}

/// Counter families in name order, with their help texts merged when members differ.
fn counter_families() -> BTreeMap<String, CounterFamily> {
    let mut families: BTreeMap<String, CounterFamily> = BTreeMap::new();
    for spec in COUNTERS {
        let name = format!("rzab_{}", spec.family);
        let family = families.entry(name).or_insert_with(|| CounterFamily {
            help: String::new(),
            labels: WORKER_LABELS
                .iter()
                .chain(spec.labels.iter().map(|(key, _)| key))
                .map(|label| (*label).to_owned())
                .collect(),
        });
        if !family.help.contains(spec.help) {
            if !family.help.is_empty() {
                family.help.push(' ');
            }
            family.help.push_str(spec.help);
        }
    }
    families
}

/// Every family name this exporter can produce.
pub fn family_names() -> Vec<String> {
    counter_families()
        .into_keys()
        .chain(FAMILIES.iter().map(|(name, ..)| (*name).to_owned()))
        .collect()
}

/// Reads the control block at scrape time.
#[derive(Debug)]
pub struct BlockCollector {
    shared: Arc<Shared>,
    descs: Vec<Desc>,
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.to_owned());
    pair.set_value(value.to_owned());
    pair
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| label(name, value))
        .collect()
}

fn gauge(pairs: &[(&str, &str)], value: f64) -> Metric {
    let mut gauge = proto::Gauge::default();
    gauge.set_value(value);
    let mut metric = Metric::from_label(labels(pairs));
    metric.set_gauge(gauge);
    metric
}

fn counter(pairs: Vec<LabelPair>, value: u64) -> Metric {
    let mut counter = proto::Counter::default();
    counter.set_value(value as f64);
    let mut metric = Metric::from_label(pairs);
    metric.set_counter(counter);
    metric
}

/// A node's write latencies as a Prometheus histogram: the cumulative counts at the exported
/// bounds (exact, as each bound is a bucket boundary of the block's histograms), and `+Inf`
/// (added by the encoder from the sample count).
fn histogram(pairs: &[(&str, &str)], snapshot: &HistogramSnapshot) -> Metric {
    let buckets = snapshot
        .export_buckets()
        .into_iter()
        .map(|(bound, below)| {
            let mut bucket = proto::Bucket::default();
            bucket.set_cumulative_count(below);
            bucket.set_upper_bound(bound as f64 / 1e9);
            bucket
        })
        .collect();
    let mut histogram = proto::Histogram::default();
    // The buckets and the count are read one after another while the worker records; the
    // bucket total keeps +Inf and _count consistent.
    histogram.set_sample_count(snapshot.total());
    histogram.set_sample_sum(snapshot.sum as f64 / 1e9);
    histogram.set_bucket(buckets);
    let mut metric = Metric::from_label(labels(pairs));
    metric.set_histogram(histogram);
    metric
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

impl BlockCollector {
    pub fn new(shared: Arc<Shared>) -> Result<Self, prometheus::Error> {
        let mut descs = Vec::new();
        for (name, family) in counter_families() {
            descs.push(Desc::new(name, family.help, family.labels, HashMap::new())?);
        }
        for (name, _, help, label_names) in FAMILIES {
            descs.push(Desc::new(
                (*name).to_owned(),
                (*help).to_owned(),
                label_names
                    .iter()
                    .map(|label| (*label).to_owned())
                    .collect(),
                HashMap::new(),
            )?);
        }
        Ok(BlockCollector { shared, descs })
    }

    fn help(&self, name: &str) -> &str {
        self.descs
            .iter()
            .find(|desc| desc.fq_name == name)
            .map_or("", |desc| desc.help.as_str())
    }

    fn gauge_family(&self, name: &str, metrics: Vec<Metric>) -> MetricFamily {
        family(name, self.help(name), MetricType::GAUGE, metrics)
    }

    fn worker_families(&self, block: &ControlBlock, node: &str, role: &str) -> Vec<MetricFamily> {
        let workers = (block.worker_count() as usize).min(MAX_WORKERS);
        let mut counters: BTreeMap<String, Vec<Metric>> = BTreeMap::new();
        let mut latency = HistogramSnapshot::default();
        let mut applied = Vec::with_capacity(workers);
        let mut leader = Vec::with_capacity(workers);
        let mut lag = Vec::with_capacity(workers);
        let mut sync = Vec::with_capacity(workers);
        let mut epochs = Vec::with_capacity(workers);
        let mut elections = Vec::with_capacity(workers);
        for index in 0..workers {
            let worker_block = block.worker(index);
            let worker = index.to_string();
            let base = [("node", node), ("worker", worker.as_str()), ("role", role)];
            for spec in COUNTERS {
                let mut pairs = labels(&base);
                pairs.extend(spec.labels.iter().map(|(key, value)| label(key, value)));
                counters
                    .entry(format!("rzab_{}", spec.family))
                    .or_default()
                    .push(counter(pairs, worker_block.counter(spec.counter)));
            }
            latency.merge(&worker_block.write_latency_ns.snapshot());
            let gauges = &worker_block.gauges;
            let applied_zxid = gauges.applied_zxid.load(Ordering::Relaxed);
            let leader_zxid = gauges.leader_zxid.load(Ordering::Relaxed);
            applied.push(gauge(&base, applied_zxid as f64));
            leader.push(gauge(&base, leader_zxid as f64));
            epochs.push(gauge(&base, gauges.epoch.load(Ordering::Relaxed) as f64));
            elections.push(gauge(
                &base,
                gauges.last_election_ns.load(Ordering::Relaxed) as f64 / 1e9,
            ));
            lag.push(gauge(
                &base,
                leader_zxid.saturating_sub(applied_zxid) as f64,
            ));
            let code = gauges.sync_state.load(Ordering::Relaxed);
            let state = SyncState::from_code(code);
            sync.push(gauge(
                &[
                    ("node", node),
                    ("worker", worker.as_str()),
                    ("role", role),
                    ("state", state.name()),
                ],
                state as u64 as f64,
            ));
        }
        let mut families: Vec<MetricFamily> = counters
            .into_iter()
            .map(|(name, metrics)| {
                let help = self.help(&name).to_owned();
                family(&name, &help, MetricType::COUNTER, metrics)
            })
            .collect();
        families.push(family(
            "rzab_write_latency_seconds",
            self.help("rzab_write_latency_seconds"),
            MetricType::HISTOGRAM,
            vec![histogram(&[("node", node), ("role", role)], &latency)],
        ));
        families.push(self.gauge_family(
            "rzab_write_latency_max_seconds",
            vec![gauge(
                &[("node", node), ("role", role)],
                latency.max as f64 / 1e9,
            )],
        ));
        families.push(self.gauge_family("rzab_applied_zxid", applied));
        families.push(self.gauge_family("rzab_leader_zxid", leader));
        families.push(self.gauge_family("rzab_replication_lag", lag));
        families.push(self.gauge_family("rzab_sync_state", sync));
        families.push(self.gauge_family("rzab_epoch", epochs));
        families.push(self.gauge_family("rzab_last_election_seconds", elections));
        families
    }
}

impl Collector for BlockCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let shared = &self.shared;
        let node = shared.config.node.to_string();
        let node = node.as_str();
        let role = shared.role();
        let block = shared.attachment.block();
        let known = shared
            .registry
            .peers()
            .iter()
            .filter(|peer| peer.known)
            .count();
        let mut families = vec![
            self.gauge_family("rzab_controlplane_up", vec![gauge(&[("node", node)], 1.0)]),
            self.gauge_family(
                "rzab_registry_state",
                vec![gauge(
                    &[("node", node)],
                    f64::from(shared.registry.state().code()),
                )],
            ),
            self.gauge_family(
                "rzab_peers_known",
                vec![gauge(&[("node", node)], known as f64)],
            ),
            self.gauge_family(
                "rzab_dataplane_up",
                vec![gauge(
                    &[("node", node), ("role", role)],
                    if block.as_deref().is_some_and(|block| dataplane_up(block)) {
                        1.0
                    } else {
                        0.0
                    },
                )],
            ),
        ];
        let Some(block) = block else {
            return families;
        };
        families.push(self.gauge_family(
            "rzab_dataplane_heartbeat_age_seconds",
            vec![gauge(
                &[("node", node)],
                dataplane_heartbeat_age(&block).unwrap_or(f64::INFINITY),
            )],
        ));
        families.push(self.gauge_family(
            "rzab_knob_epoch",
            vec![gauge(&[("node", node)], block.knob_epoch() as f64)],
        ));
        families.push(
            self.gauge_family(
                "rzab_knob_value",
                KNOBS
                    .iter()
                    .map(|spec| {
                        gauge(
                            &[("node", node), ("knob", spec.name)],
                            block.knob(spec.knob) as f64,
                        )
                    })
                    .collect(),
            ),
        );
        families.extend(self.worker_families(&block, node, role));
        families
    }
}

/// A Prometheus registry holding the block collector.
pub fn registry(shared: Arc<Shared>) -> Result<prometheus::Registry, prometheus::Error> {
    let registry = prometheus::Registry::new();
    registry.register(Box::new(BlockCollector::new(shared)?))?;
    Ok(registry)
}

/// Gathers and encodes every family in the text exposition format.
pub fn render(registry: &prometheus::Registry) -> Result<String, prometheus::Error> {
    let families = registry.gather();
    let mut buffer = Vec::new();
    TextEncoder::new().encode(&families, &mut buffer)?;
    String::from_utf8(buffer).map_err(|error| prometheus::Error::Msg(error.to_string()))
}
