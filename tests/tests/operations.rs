//! The operator-facing parts with real processes: clusters of `rzab-dataplane --peers
//! control-plane` and `rzab-controlplane` meeting through a real memcached (started here on a
//! free loopback port), knobs changed through the REST API and observed in `/metrics`, a
//! control plane killed and restarted under a running data plane, a registry left by an earlier
//! run, a real Prometheus scraping every node and answering every query of the Grafana
//! dashboard, and the scripts (`run-local.sh` end to end, `run-cluster.sh --dry-run` and its
//! prerequisite checks against stub tools, shellcheck).
//!
//! Every process is stopped by a guard on drop (and by the kernel if the test thread dies).
//! Tests run one at a time (each starts a whole cluster on a shared machine) and assert
//! behaviour, never speed: they wait, with a generous bound, for a condition to hold.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::float_cmp,
    reason = "a test fails by panicking; counters in tests are small; batch averages of exactly 1 are compared exactly"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rzab_shared::{AttachedControlBlock, Counter};
use rzab_tests::ops::{
    Cluster, ClusterSpec, Guarded, Memcached, Metrics, PATIENCE, Prometheus, die_with_parent,
    free_port, listening, process_alive, processes_mentioning, signal, wait_until, workspace_root,
};
use rzab_tests::{assert_identical_replicas, binary, serial, workers_applied};

fn started(label: &'static str) -> (tempfile::TempDir, Memcached, Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let memcached = Memcached::start(dir.path());
    let mut cluster = Cluster::start(ClusterSpec::new(label), &memcached, dir.path());
    cluster.wait_running();
    (dir, memcached, cluster)
}

#[test]
fn three_nodes_come_up_through_memcached_and_commit_on_every_node() {
    let _serial = serial();
    let (_dir, memcached, mut cluster) = started("up");
    for node in 0..3u8 {
        let status = cluster.control_plane(node).status();
        assert_eq!(status["registry"]["state"], "ready", "{status}");
        assert_eq!(status["transport"], "shm", "{status}");
        assert!(
            status["peers_generation"].as_u64().unwrap() >= 1,
            "{status}"
        );
        let peers = status["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 2, "{status}");
        assert!(peers.iter().all(|peer| peer["known"] == true), "{status}");
        // The node's record is in memcached, under this run's generation.
        let key = format!("rzab:{}:{}:node:{node}", cluster.name, cluster.generation);
        let record: serde_json::Value =
            serde_json::from_str(&memcached.get(&key).unwrap_or_else(|| panic!("{key}"))).unwrap();
        assert_eq!(record["node"], node);
        assert_eq!(record["endpoints"].as_array().unwrap().len(), 1, "{record}");
        let health = cluster.control_plane(node).get("/healthz");
        assert_eq!(health.status, 200, "{}", health.body);
    }
    cluster.wait_for_writes(5_000.0);
    for node in 0..3u8 {
        let metrics = cluster.metrics(node);
        assert!(metrics.sum("rzab_operations_total", &[("kind", "write")]) > 0.0);
        assert!(metrics.sum("rzab_operations_total", &[("kind", "read")]) > 0.0);
        assert_eq!(metrics.sum("rzab_dataplane_up", &[]), 1.0);
        assert_eq!(metrics.sum("rzab_peers_known", &[]), 2.0);
    }
    let outputs = cluster.stop_data_planes();
    assert_identical_replicas(&outputs);
}

/// PREPARE and COMMIT datagrams the leader sent: (multicast, unicast).
fn broadcasts(metrics: &Metrics) -> (f64, f64) {
    let sent = |path| {
        ["prepare", "commit"]
            .iter()
            .map(|kind| {
                metrics.sum(
                    "rzab_messages_sent_total",
                    &[("type", kind), ("path", path)],
                )
            })
            .sum::<f64>()
    };
    (sent("multicast"), sent("unicast"))
}

/// Sets the multicast knob cluster-wide and checks that the leader's broadcasts move to the
/// chosen path and stop on the other one.
fn flip_multicast(cluster: &Cluster, multicast: bool) {
    let leader = cluster.control_plane(0);
    let reply = leader.patch_knobs(
        "?scope=cluster",
        &format!(r#"{{"multicast": {multicast}}}"#),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["values"]["multicast"], multicast);
    for node in 0..3u8 {
        wait_until(
            &format!("node {node} reports multicast={multicast}"),
            || {
                cluster
                    .metrics(node)
                    .sum("rzab_knob_value", &[("knob", "multicast")])
                    == f64::from(u8::from(multicast))
            },
        );
    }
    let rising = |(multicast_sent, unicast_sent): (f64, f64)| {
        if multicast {
            multicast_sent
        } else {
            unicast_sent
        }
    };
    let before = broadcasts(&leader.metrics());
    wait_until("the new path carries broadcasts", || {
        rising(broadcasts(&leader.metrics())) > rising(before) + 100.0
    });
    let settled = broadcasts(&leader.metrics());
    wait_until("the new path carries many more broadcasts", || {
        rising(broadcasts(&leader.metrics())) > rising(settled) + 2_000.0
    });
    let later = broadcasts(&leader.metrics());
    if multicast {
        assert_eq!(later.1, settled.1, "unicast broadcasts must stop");
    } else {
        assert_eq!(later.0, settled.0, "multicast broadcasts must stop");
    }
}

#[test]
fn turning_multicast_off_moves_broadcasts_to_unicast_and_back() {
    let _serial = serial();
    let (_dir, _memcached, mut cluster) = started("mcast");
    let leader = cluster.control_plane(0);
    let start = broadcasts(&leader.metrics());
    wait_until("multicast broadcasts flow", || {
        broadcasts(&leader.metrics()).0 > start.0 + 1_000.0
    });
    assert_eq!(
        broadcasts(&leader.metrics()).1,
        0.0,
        "multicast is the default path"
    );
    flip_multicast(&cluster, false);
    flip_multicast(&cluster, true);
    assert_identical_replicas(&cluster.stop_data_planes());
}

/// (entries, messages) of PREPARE batches on the leader.
fn prepare_batches(cluster: &Cluster) -> (f64, f64) {
    let metrics = cluster.metrics(0);
    (
        metrics.sum("rzab_batch_entries_total", &[("type", "prepare")]),
        metrics.sum("rzab_batch_messages_total", &[("type", "prepare")]),
    )
}

/// The average PREPARE batch over an interval of at least `messages` messages.
fn average_prepare_batch(cluster: &Cluster, messages: f64) -> f64 {
    let before = prepare_batches(cluster);
    let mut after = before;
    wait_until("enough PREPARE messages for an average", || {
        after = prepare_batches(cluster);
        after.1 >= before.1 + messages
    });
    (after.0 - before.0) / (after.1 - before.1)
}

fn set_prepare_batch(cluster: &Cluster, value: u32) {
    let reply = cluster.control_plane(0).patch_knobs(
        "?scope=cluster",
        &format!(r#"{{"prepare_batch": {value}}}"#),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Let the messages formed under the old limit go out before measuring.
    let (_, messages) = prepare_batches(cluster);
    wait_until("PREPAREs under the new limit", || {
        prepare_batches(cluster).1 > messages + 200.0
    });
}

#[test]
fn changing_a_batch_limit_changes_the_average_batch_size() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let memcached = Memcached::start(dir.path());
    let mut spec = ClusterSpec::new("batch");
    spec.write_ratio = 900;
    let mut cluster = Cluster::start(spec, &memcached, dir.path());
    cluster.wait_running();

    let default = average_prepare_batch(&cluster, 2_000.0);
    assert!(
        default > 1.0 && default <= 16.05,
        "with prepare_batch 16 and 90% writes, PREPAREs carry several writes: {default}"
    );
    set_prepare_batch(&cluster, 1);
    let one = average_prepare_batch(&cluster, 2_000.0);
    // A scrape reads the entries and messages counters one after the other, so a message
    // being counted at that moment may be in one and not yet the other: over 2,000 messages
    // that shifts the average by at most a few parts in a thousand.
    assert!(
        (one - 1.0).abs() < 0.005,
        "prepare_batch 1: one write per PREPARE: {one}"
    );
    set_prepare_batch(&cluster, 4);
    let four = average_prepare_batch(&cluster, 2_000.0);
    assert!(
        (0.99..=4.02).contains(&four),
        "prepare_batch 4: at most four writes per PREPARE: {four}"
    );
    set_prepare_batch(&cluster, 16);
    let again = average_prepare_batch(&cluster, 2_000.0);
    assert!(again > 1.0, "back at 16, batches grow again: {again}");
    eprintln!("average PREPARE batch: limit 16 {default:.2}, 1 {one}, 4 {four:.2}, 16 {again:.2}");
    assert_identical_replicas(&cluster.stop_data_planes());
}

#[test]
fn bad_knob_requests_are_refused_and_change_nothing() {
    let _serial = serial();
    let (_dir, _memcached, cluster) = started("badknob");
    let before: Vec<_> = (0..3u8)
        .map(|node| cluster.control_plane(node).knobs())
        .collect();
    let metrics_before: Vec<f64> = (0..3u8)
        .map(|node| cluster.metrics(node).sum("rzab_knob_epoch", &[]))
        .collect();
    let block = AttachedControlBlock::attach(&cluster.block_path(0)).unwrap();
    let block_epoch = block.knob_epoch();

    let cases: &[(&str, &str, u16, Option<&str>)] = &[
        ("", r#"{"nonsense": 1}"#, 400, Some("nonsense")),
        (
            "",
            r#"{"prepare_batch": "big"}"#,
            400,
            Some("prepare_batch"),
        ),
        ("", r#"{"prepare_batch": -1}"#, 400, Some("prepare_batch")),
        ("", r#"{"prepare_batch": 1.5}"#, 400, Some("prepare_batch")),
        ("", r#"{"multicast": 1}"#, 400, Some("multicast")),
        ("", r#"{"prepare_batch": 99}"#, 422, Some("prepare_batch")),
        ("", r#"{"poll_mode": "lazy"}"#, 422, Some("poll_mode")),
        // One bad value refuses the whole change: prepare_batch stays as it was.
        (
            "",
            r#"{"prepare_batch": 4, "commit_batch": 0}"#,
            422,
            Some("commit_batch"),
        ),
        (
            "",
            r#"{"prepare_batch": 4, "bogus": true}"#,
            400,
            Some("bogus"),
        ),
        ("", "{", 400, None),
        ("", "[]", 400, None),
        ("", "{}", 400, None),
        (
            "?scope=galaxy",
            r#"{"prepare_batch": 4}"#,
            400,
            Some("scope"),
        ),
        (
            "?scope=cluster",
            r#"{"prepare_batch": 4, "write_batch": 17}"#,
            422,
            Some("write_batch"),
        ),
        (
            "?scope=cluster",
            r#"{"multicast": "no"}"#,
            400,
            Some("multicast"),
        ),
    ];
    for (query, body, status, field) in cases {
        for node in [0u8, 2] {
            let reply = cluster.control_plane(node).patch_knobs(query, body);
            assert_eq!(
                reply.status, *status,
                "PATCH /v1/knobs{query} {body} on node {node}: {}",
                reply.body
            );
            let error = reply.json();
            assert!(error["error"].is_string(), "{error}");
            if let Some(field) = field {
                assert_eq!(error["field"], *field, "{body}: {error}");
            }
        }
    }
    let reply = cluster.control_plane(0).get("/v1/knobs?scope=cluster");
    assert_eq!(reply.status, 200, "a GET with a scope is harmless");
    let put = rzab_tests::ops::http(
        cluster.control_plane(0).address,
        "PUT",
        "/v1/knobs",
        r#"{"prepare_batch": 4}"#,
    );
    assert_eq!(put.status, 405, "{}", put.body);

    // Nothing changed anywhere: values, epochs, metrics, the data plane's block.
    for node in 0..3u8 {
        assert_eq!(
            cluster.control_plane(node).knobs(),
            before[usize::from(node)],
            "node {node}"
        );
        assert_eq!(
            cluster.metrics(node).sum("rzab_knob_epoch", &[]),
            metrics_before[usize::from(node)],
            "node {node}"
        );
    }
    assert_eq!(block.knob_epoch(), block_epoch);
    assert_eq!(before[0].0["prepare_batch"], 16);

    // And the API still works.
    let reply = cluster
        .control_plane(0)
        .patch_knobs("", r#"{"prepare_batch": 8}"#);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(cluster.control_plane(0).knobs().0["prepare_batch"], 8);
}

/// Reads plus writes the node's sessions completed, straight from its control block.
fn operations(block: &AttachedControlBlock) -> u64 {
    block.counter_total(Counter::ReadsCompleted) + block.counter_total(Counter::WritesCompleted)
}

#[test]
fn a_killed_control_plane_leaves_the_data_plane_running_and_a_restarted_one_reattaches() {
    let _serial = serial();
    let (_dir, _memcached, mut cluster) = started("cpkill");
    let blocks: Vec<AttachedControlBlock> = (0..3u8)
        .map(|node| AttachedControlBlock::attach(&cluster.block_path(node)).unwrap())
        .collect();
    let generations: Vec<u64> = (0..3u8)
        .map(|node| {
            cluster.control_plane(node).status()["peers_generation"]
                .as_u64()
                .unwrap()
        })
        .collect();

    for node in [1u8, 0] {
        let index = usize::from(node);
        let scraped = cluster.metrics(node).sum("rzab_operations_total", &[]);
        cluster.control_planes[index].kill();
        assert!(!listening(cluster.control_plane(node).address));
        // The data plane keeps serving its sessions, and the cluster keeps committing.
        let ops = operations(&blocks[index]);
        let committed = blocks[0].counter_total(Counter::WritesApplied);
        wait_until(
            &format!("node {node} keeps serving without its control plane"),
            || operations(&blocks[index]) > ops + 100_000,
        );
        wait_until("the leader keeps committing", || {
            blocks[0].counter_total(Counter::WritesApplied) > committed + 1_000
        });
        assert!(
            cluster.data_planes[index].as_mut().unwrap().running(),
            "the data plane of node {node} must survive its control plane"
        );

        // Restarted on the same address, it re-attaches and picks up where the block is.
        cluster.control_planes[index].restart();
        let new_pid = cluster.control_plane(node).pid().unwrap();
        wait_until(&format!("node {node}'s new control plane is ready"), || {
            let status = cluster.control_plane(node).status();
            status["attached"] == true
                && status["registry"]["state"] == "ready"
                && status["dataplane"]["up"] == true
                && status["controlplane"]["pid"] == new_pid
        });
        let status = cluster.control_plane(node).status();
        assert_eq!(
            status["peers_generation"].as_u64().unwrap(),
            generations[index],
            "the data plane's peer table is left alone: {status}"
        );
        let metrics = cluster.metrics(node);
        assert!(metrics.sum("rzab_operations_total", &[]) > scraped);
        assert_eq!(metrics.sum("rzab_dataplane_up", &[]), 1.0);
        // Knobs reach the data plane through the new control plane.
        let reply = cluster
            .control_plane(node)
            .patch_knobs("", r#"{"stats_interval_ms": 900}"#);
        // 200 once every worker confirmed the change, 202 if one had not within the wait
        // (busy-polling neighbours on 2 cores may outlast it): the workers must still confirm.
        assert!(matches!(reply.status, 200 | 202), "{}", reply.body);
        assert_eq!(blocks[index].knob(rzab_shared::Knob::StatsIntervalMs), 900);
        let epoch = reply.json()["epoch"].as_u64().unwrap();
        wait_until(
            &format!("node {node}'s workers confirm epoch {epoch}"),
            || workers_applied(&blocks[index], epoch),
        );
    }
    cluster.wait_for_writes(1_000.0);
    assert_identical_replicas(&cluster.stop_data_planes());
}

#[test]
fn a_registry_left_by_an_earlier_run_does_not_break_a_new_one() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let memcached = Memcached::start(dir.path());

    // An earlier run sets cluster-wide knobs and dies without cleaning up: its node records,
    // ready keys and knobs document stay in memcached.
    let mut earlier = Cluster::start(ClusterSpec::new("reuse"), &memcached, dir.path());
    earlier.wait_running();
    let reply = earlier.control_plane(0).patch_knobs(
        "?scope=cluster",
        r#"{"prepare_batch": 2, "multicast": false}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let earlier_generation = earlier.generation.clone();
    let key = format!("rzab:{}:{}:knobs", earlier.name, earlier_generation);
    earlier.crash();
    drop(earlier);
    assert!(
        memcached.get(&key).is_some(),
        "the earlier run's knobs stay"
    );

    // A new run (fresh generation, same cluster name, same memcached) comes up with its own
    // defaults and commits on every node.
    let mut next = Cluster::start(ClusterSpec::new("reuse"), &memcached, dir.path());
    next.wait_running();
    next.wait_for_writes(2_000.0);
    for node in 0..3u8 {
        let (knobs, _) = next.control_plane(node).knobs();
        assert_eq!(knobs["prepare_batch"], 16, "node {node}");
        assert_eq!(knobs["multicast"], true, "node {node}");
    }
    assert_identical_replicas(&next.stop_data_planes());
    next.crash();
    drop(next);

    // Even a run that reuses the crashed run's generation (and so its knobs, by design)
    // comes up: the stale records name data-plane instances that no longer exist.
    let mut same = Cluster::start_with(
        ClusterSpec::new("reuse"),
        &memcached,
        dir.path(),
        &earlier_generation,
    );
    same.wait_running();
    same.wait_for_writes(2_000.0);
    assert_eq!(same.control_plane(1).knobs().0["prepare_batch"], 2);
    assert_identical_replicas(&same.stop_data_planes());
}

/// Every query of the dashboard: (where, expression).
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn panels(list: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let reference = target["refId"].as_str().unwrap_or("?");
                    out.push((format!("panel `{title}` ({reference})"), expr.to_owned()));
                }
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            let name = annotation["name"].as_str().unwrap_or("?");
            out.push((format!("annotation `{name}`"), expr.to_owned()));
        }
    }
    out
}

fn dashboard() -> serde_json::Value {
    let path = workspace_root().join("dashboards/rzab.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The expression as Grafana would send it with `$node` set to `node` (a regex).
fn substitute(expr: &str, node: &str) -> String {
    let text = expr
        .replace("${node}", node)
        .replace("$node", node)
        .replace("$__rate_interval", "10s")
        .replace("$__interval", "2m");
    assert!(!text.contains('$'), "unknown template variable in `{expr}`");
    text
}

/// Whether an instant-query result has at least one finite sample.
fn has_data(result: &[serde_json::Value]) -> bool {
    result.iter().any(|series| {
        series["value"][1]
            .as_str()
            .and_then(|value| value.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

#[test]
fn dashboard_is_well_formed_and_covers_what_operators_watch() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|variable| variable["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` variable"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    let node = variable("node");
    assert_eq!(node["type"], "query");
    assert_eq!(node["definition"], "label_values(rzab_dataplane_up, node)");
    assert_eq!(node["multi"], true);
    assert_eq!(node["includeAll"], true);
    assert_eq!(node["allValue"], ".*");
    assert_eq!(node["datasource"]["uid"], "${datasource}");

    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "duplicate id");
        assert!(panel["gridPos"]["w"].as_u64().is_some());
        let title = panel["title"].as_str().unwrap().to_owned();
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{title}");
            for target in targets {
                assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
                let expr = target["expr"].as_str().unwrap();
                assert!(expr.contains(r#"node=~"$node""#), "{title}: {expr}");
            }
        }
        titles.push(title.to_lowercase());
    }
    for topic in [
        "throughput",
        "reads and writes",
        "p50 / p99",
        "batch size",
        "multicast against unicast",
        "stalls",
        "drops",
        "retransmissions",
        "replication lag",
        "knob values",
    ] {
        assert!(
            titles.iter().any(|title| title.contains(topic)),
            "no panel about {topic}"
        );
    }

    // Every metric the dashboard names is one the exporter produces.
    let families: BTreeSet<String> = rzab_controlplane::metrics::family_names()
        .into_iter()
        .collect();
    let queries = dashboard_queries(&dashboard);
    for (place, expr) in &queries {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(name) = word.strip_prefix("rzab_") {
                let family = name.strip_suffix("_bucket").unwrap_or(name).to_owned();
                assert!(
                    families.contains(&format!("rzab_{family}")),
                    "{place}: `{word}` is not exported"
                );
            }
        }
    }
    for family in [
        "rzab_operations_total",
        "rzab_write_latency_seconds_bucket",
        "rzab_batch_entries_total",
        "rzab_batch_messages_total",
        "rzab_messages_sent_total",
        "rzab_stalls_total",
        "rzab_drops_total",
        "rzab_retransmissions_total",
        "rzab_replication_lag",
        "rzab_knob_value",
    ] {
        assert!(
            queries.iter().any(|(_, expr)| expr.contains(family)),
            "{family} is on no panel"
        );
    }
}

#[test]
fn promtool_accepts_the_scrape_config() {
    let promtool = Path::new("/usr/bin/promtool");
    if !promtool.exists() {
        eprintln!("skipped: promtool not installed (apt-get install prometheus)");
        return;
    }
    let root = workspace_root();
    let output = Command::new(promtool)
        .args(["check", "config"])
        .arg(root.join("dashboards/prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let config = std::fs::read_to_string(root.join("dashboards/prometheus.yml")).unwrap();
    for node in 0..3 {
        assert!(config.contains(&format!("127.0.0.1:{}", 7100 + node)));
    }
    assert!(config.contains("scrape_interval: 1s"));
}

#[test]
fn prometheus_scrapes_every_node_and_every_dashboard_query_returns_data() {
    assert!(
        Path::new(rzab_tests::ops::PROMETHEUS).exists(),
        "prometheus not found: apt-get install prometheus (scripts/test.sh does)"
    );
    let _serial = serial();
    let (dir, _memcached, cluster) = started("prom");
    let targets: Vec<String> = cluster
        .control_planes
        .iter()
        .map(|control_plane| format!("'{}'", control_plane.address))
        .collect();
    // The scrape settings of dashboards/prometheus.yml, pointed at this cluster.
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: rzab\n    metrics_path: /metrics\n    static_configs:\n      \
         - targets: [{}]\n        labels:\n          cluster: {}\n",
        targets.join(", "),
        cluster.name
    );
    let prometheus_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).unwrap();
    let prometheus = Prometheus::start(&prometheus_dir, &config);
    wait_until("prometheus scrapes every node", || {
        let health = prometheus.targets();
        health.len() == 3 && health.values().all(|state| state == "up")
    });
    for control_plane in &cluster.control_planes {
        assert!(
            prometheus
                .targets()
                .contains_key(&format!("http://{}/metrics", control_plane.address))
        );
    }
    wait_until("rates have data", || {
        has_data(&prometheus.query("sum(rate(rzab_operations_total[10s])) > 0"))
    });
    // The node variable's values: label_values(rzab_dataplane_up, node).
    let nodes: BTreeSet<String> = prometheus
        .query("rzab_dataplane_up")
        .iter()
        .map(|series| series["metric"]["node"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(nodes, ["0", "1", "2"].map(String::from).into());

    // A knob change, so that the knob graphs and the annotation have something to show.
    let reply = cluster
        .control_plane(0)
        .patch_knobs("?scope=cluster", r#"{"prepare_batch": 8}"#);
    assert_eq!(reply.status, 200, "{}", reply.body);
    wait_until("prometheus sees the knob change", || {
        prometheus
            .query(r#"rzab_knob_value{knob="prepare_batch"} == 8"#)
            .len()
            == 3
    });

    let mut queries = dashboard_queries(&dashboard());
    assert!(queries.len() >= 30, "{} queries", queries.len());
    // Annotations first: theirs look back one `$__interval` for the knob change just made.
    queries.sort_by_key(|(place, _)| !place.starts_with("annotation"));
    let deadline = Instant::now() + PATIENCE;
    let mut verified = 0;
    let mut empty = Vec::new();
    // "All", single nodes and a multi-selection, as Grafana would send them.
    for node in [".*", "0", "1", "2", "(0|2)"] {
        for (place, expr) in &queries {
            if place.starts_with("annotation") && node != ".*" {
                continue;
            }
            let query = substitute(expr, node);
            let mut ok = has_data(&prometheus.query(&query));
            while !ok && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(500));
                ok = has_data(&prometheus.query(&query));
            }
            if ok {
                verified += 1;
            } else {
                empty.push(format!("{place} with node={node}: {query}"));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
    eprintln!(
        "verified {verified} dashboard queries ({} expressions, 5 node selections)",
        queries.len()
    );
}

/// The dashboard's latency panels, evaluated by a real Prometheus, give the data plane's own
/// p50/p99/p99.9/max within 2%: this test plays the data plane (it creates the control block
/// and records a known set of latencies into two workers' histograms), a real
/// `rzab-controlplane` exports it and Prometheus scrapes it every second. The latencies are
/// recorded in one burst after a scrape that saw none, so every `rate(...[window])` of the
/// panels covers exactly that burst.
#[test]
fn dashboard_latency_quantiles_match_the_data_plane_within_two_percent() {
    use rzab_shared::{ControlBlockInit, HistogramSnapshot, OwnedControlBlock, TransportKind};
    assert!(
        Path::new(rzab_tests::ops::PROMETHEUS).exists(),
        "prometheus not found: apt-get install prometheus (scripts/test.sh does)"
    );
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let memcached = Memcached::start(dir.path());
    let cluster = rzab_tests::cluster_name("latq");
    let block_path = dir.path().join("block");
    let block = OwnedControlBlock::create(
        &block_path,
        &ControlBlockInit {
            cluster: cluster.clone(),
            node_id: 0,
            node_count: 1,
            worker_count: 2,
            transport: TransportKind::Shm,
        },
    )
    .unwrap();
    let address = rzab_tests::ops::free_address();
    let mut command = Command::new(binary("rzab-controlplane"));
    command
        .args(["--cluster", &cluster, "--node", "0", "--registry"])
        .arg(memcached.address())
        .arg("--block")
        .arg(&block_path)
        .args(["--generation", &rzab_tests::ops::fresh_generation("latq")])
        .args(["--listen", &address.to_string()]);
    let mut control_plane = Guarded::spawn(command, &dir.path().join("controlplane.log"));
    wait_until("the control plane listens", || {
        assert!(control_plane.running(), "{}", control_plane.output());
        listening(address)
    });
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: rzab\n    metrics_path: /metrics\n    static_configs:\n      \
         - targets: ['{address}']\n"
    );
    let prometheus_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).unwrap();
    let prometheus = Prometheus::start(&prometheus_dir, &config);
    let count = |prometheus: &Prometheus| {
        prometheus
            .query("sum(rzab_write_latency_seconds_count)")
            .first()
            .and_then(|series| series["value"][1].as_str()?.parse::<f64>().ok())
    };
    wait_until("prometheus scrapes the empty histogram", || {
        count(&prometheus) == Some(0.0)
    });

    // 40 000 latencies, log-uniform from 4 us to about 4 ms, over two workers.
    let mut state = 0x5eed_u64;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    const SAMPLES: u64 = 40_000;
    for sample in 0..SAMPLES {
        let exponent = 12 + next() % 10;
        let value = (1u64 << exponent) + next() % (1u64 << exponent);
        block
            .worker(usize::from(sample % 3 == 0))
            .write_latency_ns
            .record(value);
    }
    let mut snapshot = HistogramSnapshot::default();
    snapshot.merge(&block.worker(0).write_latency_ns.snapshot());
    snapshot.merge(&block.worker(1).write_latency_ns.snapshot());
    let ours = snapshot.percentiles();
    wait_until("prometheus scrapes the recorded latencies", || {
        count(&prometheus) == Some(SAMPLES as f64)
    });

    let expected = |quantile: f64| {
        let ns = if quantile >= 1.0 {
            ours.max
        } else if quantile >= 0.999 {
            ours.p999
        } else if quantile >= 0.99 {
            ours.p99
        } else {
            assert_eq!(quantile, 0.5, "a quantile this test knows");
            ours.p50
        };
        ns as f64 / 1e9
    };
    let mut compared = Vec::new();
    let queries = dashboard_queries(&dashboard());
    let mut latency_queries: Vec<&(String, String)> = queries
        .iter()
        .filter(|(_, expr)| expr.contains("rzab_write_latency"))
        .collect();
    assert!(latency_queries.len() >= 6, "{latency_queries:?}");
    // The whole-run form, without rate().
    let whole_run = (
        "whole run".to_owned(),
        r#"histogram_quantile(0.999, sum by (le) (rzab_write_latency_seconds_bucket{node=~"$node"}))"#
            .to_owned(),
    );
    latency_queries.push(&whole_run);
    for (place, expr) in latency_queries {
        // The window covers the scrape before the burst and the ones after it.
        let query = expr
            .replace("$node", ".*")
            .replace("$__rate_interval", "1m");
        let result = prometheus.query(&query);
        let value: f64 = result
            .first()
            .and_then(|series| series["value"][1].as_str()?.parse().ok())
            .unwrap_or_else(|| panic!("{place}: no value for {query}: {result:?}"));
        let want = match expr
            .strip_prefix("histogram_quantile(")
            .and_then(|rest| rest.split(',').next())
        {
            Some(quantile) => expected(quantile.trim().parse().unwrap()),
            // max(rzab_write_latency_max_seconds{...}): the exact maximum.
            None => ours.max as f64 / 1e9,
        };
        let error = (value - want).abs() / want;
        assert!(
            error <= 0.02,
            "{place}: Prometheus says {value} s, the data plane {want} s ({:.2}%): {query}",
            error * 100.0
        );
        compared.push(format!(
            "{place}: {value:.4e} s against {want:.4e} s ({:.2}%)",
            error * 100.0
        ));
    }
    eprintln!("{}", compared.join("\n"));
    drop(prometheus);
    control_plane.kill();
    drop(block);
}

/// `scripts/run-local.sh` in its own process group (as a terminal runs it); the whole group is
/// killed on drop.
struct Script {
    process: Guarded,
}

impl Script {
    fn start(dir: &Path, arguments: &[String]) -> Script {
        let mut command = Command::new(workspace_root().join("scripts/run-local.sh"));
        command.args(arguments).process_group(0);
        Script {
            process: Guarded::spawn(command, &dir.join("run-local.out")),
        }
    }

    fn output(&self) -> String {
        self.process.output()
    }

    /// Waits for the script to exit and returns whether it succeeded.
    fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.process.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "run-local.sh did not stop:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        signal(-i32::try_from(self.process.pid()).unwrap(), libc::SIGKILL);
    }
}

/// A base port with `count` free ports from it.
fn free_ports(count: u16) -> u16 {
    loop {
        let base = free_port();
        if base < 65_000
            && (0..count)
                .all(|offset| !listening(SocketAddr::from(([127, 0, 0, 1], base + offset))))
        {
            return base;
        }
    }
}

fn run_local_arguments(cluster: &str, extra: &[&str]) -> (Vec<String>, u16) {
    let bin_dir = binary("rzab-controlplane").parent().unwrap().to_owned();
    assert!(binary("rzab-dataplane").exists());
    let base = free_ports(3);
    let mut arguments: Vec<String> = [
        "--bin-dir",
        bin_dir.to_str().unwrap(),
        "--cluster",
        cluster,
        "--rest-port-base",
        &base.to_string(),
        "--registry-port",
        &free_port().to_string(),
    ]
    .iter()
    .map(|argument| (*argument).to_owned())
    .collect();
    arguments.extend(extra.iter().map(|argument| (*argument).to_owned()));
    arguments.extend(["--", "--keys", "50000", "--sessions", "16"].map(String::from));
    (arguments, base)
}

/// Checks that nothing the script started is left: processes, ports, shm files, run dir.
fn assert_nothing_left(output: &str, cluster: &str, base: u16) {
    let pids: Vec<u32> = output
        .lines()
        .find_map(|line| line.trim().strip_prefix("pids:"))
        .unwrap_or_else(|| panic!("no pids line:\n{output}"))
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|number| number.parse().ok())
        .collect();
    assert!(pids.len() >= 7, "{pids:?}");
    for pid in pids {
        assert!(
            !process_alive(pid),
            "process {pid} is left behind:\n{output}"
        );
    }
    for node in 0..3 {
        assert!(!listening(SocketAddr::from(([127, 0, 0, 1], base + node))));
        assert!(!Path::new(&format!("/dev/shm/rzab-{cluster}-n{node}")).exists());
    }
    assert!(!Path::new(&format!("/dev/shm/rzab-fabric-{cluster}")).exists());
    let run_dir = output
        .lines()
        .find_map(|line| line.split_once("logs in ").map(|(_, dir)| dir.trim()))
        .unwrap();
    assert!(!Path::new(run_dir).exists(), "{run_dir} is left behind");
}

#[test]
fn run_local_runs_a_cluster_for_its_duration_and_leaves_nothing_behind() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let cluster = rzab_tests::cluster_name("rl");
    let (arguments, base) = run_local_arguments(&cluster, &["--duration", "4", "--prometheus"]);
    let mut script = Script::start(dir.path(), &arguments);
    let code = script.wait();
    let output = script.output();
    assert_eq!(code, Some(0), "{output}");
    for node in 0..3 {
        let url = format!("http://127.0.0.1:{}", base + u16::try_from(node).unwrap());
        assert!(
            output.contains(&format!("REST {url}/v1/status")),
            "{output}"
        );
        assert!(
            output.contains(&format!("metrics {url}/metrics")),
            "{output}"
        );
        assert!(
            output.contains(&format!("node {node} summary: {{")),
            "{output}"
        );
    }
    assert!(output.contains("prometheus: http://127.0.0.1:"), "{output}");
    let live: Vec<&str> = output
        .lines()
        .filter(|line| line.starts_with("cluster "))
        .collect();
    assert!(!live.is_empty(), "no live line:\n{output}");
    for line in &live {
        for part in [
            "ops/s",
            "reads",
            "writes",
            "batch prepare",
            "broadcasts by multicast",
        ] {
            assert!(line.contains(part), "{line}");
        }
    }
    // Write latency percentiles, on the lines of intervals with writes.
    assert!(
        live.iter().any(|line| {
            ["write us p50 ", " p99 ", " p99.9 ", " max "]
                .iter()
                .all(|part| line.contains(part))
        }),
        "no write latency on the live line:\n{output}"
    );
    assert!(output.contains("--duration 4 s is over"), "{output}");
    assert_nothing_left(&output, &cluster, base);
}

#[test]
fn run_local_stops_everything_on_ctrl_c_and_on_sigterm() {
    let _serial = serial();
    for (signal_number, group) in [(libc::SIGINT, true), (libc::SIGTERM, false)] {
        let dir = tempfile::tempdir().unwrap();
        let cluster = rzab_tests::cluster_name(if group { "rlint" } else { "rlterm" });
        let (arguments, base) = run_local_arguments(&cluster, &["--transport", "udp"]);
        let arguments: Vec<String> = arguments
            .into_iter()
            .chain(["--udp-port-base".to_owned(), free_ports(3).to_string()])
            .chain(["--multicast-port".to_owned(), free_port().to_string()])
            .collect();
        let mut script = Script::start(dir.path(), &arguments);
        wait_until("the live line", || {
            script
                .output()
                .lines()
                .any(|line| line.starts_with("cluster "))
        });
        let pid = i32::try_from(script.process.pid()).unwrap();
        // Ctrl-C signals the terminal's whole process group; SIGTERM only the script.
        assert!(signal(if group { -pid } else { pid }, signal_number));
        let code = script.wait();
        let output = script.output();
        assert!(
            matches!(code, Some(0 | 130 | 143)),
            "exit {code:?}:\n{output}"
        );
        assert!(output.contains("==> stopped"), "{output}");
        assert_nothing_left(&output, &cluster, base);
    }
}

#[test]
fn run_local_refuses_bad_options_clearly() {
    let script = workspace_root().join("scripts/run-local.sh");
    for (arguments, message) in [
        (
            vec!["--nodes", "0"],
            "--nodes 0: expected an integer from 1 to 16",
        ),
        (vec!["--nodes"], "--nodes needs a value"),
        (
            vec!["--transport", "carrier-pigeon"],
            "expected shm, udp or verbs",
        ),
        (vec!["--write-ratio", "1001"], "--write-ratio"),
        (vec!["--write-ratio", "150%"], "--write-ratio 150"),
        (vec!["--cluster", "a b"], "--cluster a b"),
        (vec!["--frobnicate"], "unknown option --frobnicate"),
        (vec!["--bin-dir", "/nonexistent"], "not found there"),
    ] {
        let output = Command::new(&script).args(&arguments).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{arguments:?}: {stderr}");
        assert!(stderr.contains(message), "{arguments:?}: {stderr}");
    }
    let help = Command::new(&script).arg("-h").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for option in [
        "--nodes",
        "--workers",
        "--transport",
        "--write-ratio",
        "--duration",
        "--prometheus",
    ] {
        assert!(text.contains(option), "{text}");
    }
}

/// Stub RDMA tools and an ssh that runs the command here, for run-cluster.sh.
struct Stubs {
    dir: tempfile::TempDir,
}

impl Stubs {
    fn new() -> Stubs {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let status = Command::new("chmod").arg("+x").arg(&path).status().unwrap();
            assert!(status.success());
        };
        write(
            "fake-ssh",
            "#!/bin/bash\n# ssh HOST COMMAND...: runs COMMAND here\nshift\nexec bash -c \"$*\"\n",
        );
        write(
            "ibv_devinfo",
            "#!/bin/bash\n\
             if [ \"$1\" = -l ]; then printf '1 HCA found:\\n\\tmlx5_0\\n'; exit 0; fi\n\
             [ \"$2\" = mlx5_0 ] || { echo 'Failed to get IB devices list' >&2; exit 255; }\n\
             printf 'hca_id:\\tmlx5_0\\n\\t\\tport:\\t1\\n\\t\\t\\tstate:\\t\\t%s (4)\\n\\t\\t\\tsm_lid:\\t\\t%s\\n\\t\\t\\tport_lid:\\t\\t3\\n\\t\\t\\tlink_layer:\\t\\tInfiniBand\\n' \"${STUB_STATE:-PORT_ACTIVE}\" \"${STUB_SM_LID:-1}\"\n",
        );
        std::fs::write(
            dir.path().join("meminfo-ok"),
            "HugePages_Total:    1024\nHugePages_Free:     1000\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("meminfo-none"),
            "HugePages_Total:       0\nHugePages_Free:        0\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        for binary in ["rzab-dataplane", "rzab-controlplane"] {
            write(&format!("bin/{binary}"), "#!/bin/sh\n");
        }
        Stubs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs run-cluster.sh --check with the stubs and the given environment.
    fn check(&self, hosts: &str, registry: &str, env: &[(&str, &str)]) -> (bool, String) {
        let path = format!(
            "{}:{}",
            self.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = Command::new(workspace_root().join("scripts/run-cluster.sh"));
        command
            .args(["--check", "--hosts", hosts, "--registry-host", registry])
            .args(["--device", "mlx5_0", "--ssh"])
            .arg(self.path().join("fake-ssh"))
            .arg("--bin-dir")
            .arg(self.path().join("bin"))
            .env("PATH", path)
            .env("RZAB_MEMINFO", self.path().join("meminfo-ok"));
        for (key, value) in env {
            command.env(key, value);
        }
        let output = command.stdin(Stdio::null()).output().unwrap();
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    }
}

#[test]
fn run_cluster_dry_run_prints_every_command() {
    let script = workspace_root().join("scripts/run-cluster.sh");
    let output = Command::new(&script)
        .args([
            "--dry-run",
            "--hosts",
            "ib0,ib1,ib2",
            "--registry-host",
            "ib0",
        ])
        .args(["--device", "mlx5_1", "--ib-port", "2", "--gid-index", "3"])
        .args(["--workers", "2", "--write-ratio", "10%", "--duration", "30"])
        .args([
            "--cluster",
            "lab",
            "--bin-dir",
            "/opt/rzab/bin",
            "--run-dir",
            "/var/tmp/rz",
        ])
        .args(["--", "--keys", "2000000"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let ssh_to = |host: &str| -> Vec<&str> {
        lines
            .iter()
            .copied()
            .filter(|line| {
                line.starts_with(&format!(
                    "ssh -o BatchMode=yes -o ConnectTimeout=10 {host} "
                ))
            })
            .collect()
    };
    // Checks on every host; memcached on the registry host.
    assert!(
        ssh_to("ib0")
            .iter()
            .any(|line| line.contains("bash -s -- ib0 node+rdma+registry mlx5_1 2 /opt/rzab/bin"))
    );
    assert!(
        ssh_to("ib1")
            .iter()
            .any(|line| line.contains("bash -s -- ib1 node+rdma mlx5_1 2 /opt/rzab/bin"))
    );
    assert!(
        ssh_to("ib0")
            .iter()
            .any(|line| line.contains("memcached") && line.contains("-l ib0 -p 11211"))
    );
    let generation = text
        .split("--generation ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    for (node, host) in ["ib0", "ib1", "ib2"].iter().enumerate() {
        let start = ssh_to(host)
            .into_iter()
            .find(|line| line.contains("rzab-dataplane"))
            .unwrap_or_else(|| panic!("no start command for {host}:\n{text}"));
        for part in [
            "/opt/rzab/bin/rzab-dataplane --cluster lab".to_owned(),
            format!("--node {node} --nodes 3 --workers 2"),
            "--transport verbs --verbs-device mlx5_1 --verbs-port 2 --verbs-gid-index 3".to_owned(),
            "--peers control-plane --write-ratio 100 --duration 30 --keys 2000000".to_owned(),
            format!("/opt/rzab/bin/rzab-controlplane --cluster lab --node {node}"),
            format!("--registry ib0:11211 --generation {generation}"),
            format!("--run-id {generation}"),
            format!("getent ahostsv4 {host}"),
            ":7100".to_owned(),
            "cd /var/tmp/rz".to_owned(),
            format!("dataplane-{node}.pid"),
        ] {
            assert!(start.contains(&part), "`{part}` missing from: {start}");
        }
        assert!(
            ssh_to(host).iter().any(|line| line.contains("kill -TERM")
                && line.contains(&format!("dataplane-{node} controlplane-{node}"))),
            "no stop command for {host}"
        );
        assert!(text.contains(&format!("curl http://{host}:7100/v1/status")));
    }

    // Kernel UDP between the hosts: each data plane learns every host's address.
    let output = Command::new(&script)
        .args([
            "--dry-run",
            "--transport",
            "udp",
            "--hosts",
            "127.0.0.1,127.0.0.2",
        ])
        .args(["--registry-host", "127.0.0.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("--transport udp --udp-hosts 127.0.0.1,127.0.0.2 --peers control-plane"),
        "{text}"
    );
    assert!(!text.contains("--verbs-device"), "{text}");
    // udp datagrams carry a MAC keyed by a secret made for the run, written on each host
    // readable by its owner only; a dry run never prints the secret itself.
    assert!(
        text.contains("--cluster-secret-file /tmp/rzab-rdma/cluster-secret")
            && text.contains("umask 077")
            && text.contains("<32 random bytes, base64>"),
        "{text}"
    );

    for (arguments, message) in [
        (
            vec!["--dry-run", "--registry-host", "a", "--device", "d"],
            "--hosts is required",
        ),
        (
            vec!["--dry-run", "--hosts", "a", "--device", "d"],
            "--registry-host is required",
        ),
        (
            vec!["--dry-run", "--hosts", "a", "--registry-host", "a"],
            "--device is required",
        ),
        (
            vec![
                "--dry-run",
                "--hosts",
                "a;rm",
                "--registry-host",
                "a",
                "--device",
                "d",
            ],
            "expected a host name",
        ),
        (
            vec![
                "--dry-run",
                "--hosts",
                "a",
                "--registry-host",
                "a",
                "--device",
                "d",
                "--ib-port",
                "x",
            ],
            "--ib-port x",
        ),
        (vec!["--bogus"], "unknown option --bogus"),
    ] {
        let output = Command::new(&script).args(&arguments).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{arguments:?}: {stderr}");
        assert!(stderr.contains(message), "{arguments:?}: {stderr}");
    }
}

/// Kills, on drop, every process whose command line mentions one of the given texts (for
/// processes started through the fake ssh, which are nobody's children here).
struct KillMentioning(Vec<Vec<String>>);

impl Drop for KillMentioning {
    fn drop(&mut self) {
        for needles in &self.0 {
            let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
            for pid in processes_mentioning(&needles) {
                signal(i32::try_from(pid).unwrap(), libc::SIGKILL);
            }
        }
    }
}

#[test]
fn run_cluster_runs_a_cluster_over_ssh_on_loopback_addresses() {
    // Three "hosts" that are this machine (127.0.0.1-3), reached through the fake ssh, with
    // the shm transport: the real start, live-line and stop paths of run-cluster.sh.
    let _serial = serial();
    let stubs = Stubs::new();
    let run_dir = tempfile::tempdir().unwrap();
    let cluster = rzab_tests::cluster_name("rc");
    let registry_port = free_port().to_string();
    let rest_port = loop {
        let port = free_port();
        if (2..=3).all(|host| !listening(SocketAddr::from(([127, 0, 0, host], port)))) {
            break port;
        }
    };
    let _guard = KillMentioning(vec![
        vec![format!("--cluster {cluster} ")],
        vec!["memcached".to_owned(), format!("-p {registry_port} ")],
    ]);
    let bin_dir = binary("rzab-controlplane").parent().unwrap().to_owned();
    assert!(binary("rzab-dataplane").exists());
    let mut command = Command::new(workspace_root().join("scripts/run-cluster.sh"));
    command
        .args([
            "--hosts",
            "127.0.0.1,127.0.0.2,127.0.0.3",
            "--registry-host",
            "127.0.0.1",
        ])
        .args([
            "--registry-port",
            &registry_port,
            "--rest-port",
            &rest_port.to_string(),
        ])
        .args([
            "--transport",
            "shm",
            "--cluster",
            &cluster,
            "--duration",
            "4",
        ])
        .arg("--ssh")
        .arg(stubs.path().join("fake-ssh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--run-dir")
        .arg(run_dir.path())
        .args([
            "--allow-no-hugepages",
            "--",
            "--keys",
            "50000",
            "--sessions",
            "16",
        ])
        .env("RZAB_MEMINFO", stubs.path().join("meminfo-ok"))
        .stdin(Stdio::null());
    let output = die_with_parent(&mut command).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    for (node, host) in ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().enumerate() {
        assert!(
            text.contains(&format!("REST http://{host}:{rest_port}/v1/status")),
            "{text}"
        );
        assert!(text.contains(&format!("node {node} summary: {{")), "{text}");
    }
    assert!(
        text.lines()
            .any(|line| line.starts_with("cluster ") && line.contains("ops/s")),
        "{text}"
    );
    assert!(text.contains("--duration 4 s is over"), "{text}");
    // Nothing left: processes, pid files, shm files.
    wait_until("every started process has exited", || {
        processes_mentioning(&[&format!("--cluster {cluster} ")]).is_empty()
            && processes_mentioning(&["memcached", &format!("-p {registry_port} ")]).is_empty()
    });
    let pid_files: Vec<_> = std::fs::read_dir(run_dir.path())
        .unwrap()
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().into_string().unwrap();
            name.ends_with(".pid").then_some(name)
        })
        .collect();
    assert!(pid_files.is_empty(), "{pid_files:?}");
    for node in 0..3 {
        assert!(!Path::new(&format!("/dev/shm/rzab-{cluster}-n{node}")).exists());
    }
    assert!(!Path::new(&format!("/dev/shm/rzab-fabric-{cluster}")).exists());
}

#[test]
fn run_cluster_checks_and_explains_the_prerequisites() {
    let stubs = Stubs::new();
    let (ok, text) = stubs.check("h0,h1", "h0", &[]);
    assert!(ok, "{text}");
    assert!(text.contains("PORT_ACTIVE"), "{text}");
    assert!(text.contains("subnet manager at LID 1"), "{text}");
    assert!(text.contains("huge pages: 1000 of 1024 free"), "{text}");
    assert!(text.contains("every host is ready"), "{text}");

    let (ok, text) = stubs.check(
        "h0",
        "h0",
        &[("STUB_STATE", "PORT_INIT"), ("STUB_SM_LID", "0")],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("PORT_INIT") && text.contains("opensm"),
        "{text}"
    );

    let (ok, text) = stubs.check("h0", "h0", &[("STUB_SM_LID", "0")]);
    assert!(!ok, "{text}");
    assert!(text.contains("no subnet manager"), "{text}");

    let none = stubs.path().join("meminfo-none");
    let (ok, text) = stubs.check("h0", "h0", &[("RZAB_MEMINFO", none.to_str().unwrap())]);
    assert!(!ok, "{text}");
    assert!(text.contains("vm.nr_hugepages"), "{text}");

    let (ok, text) = stubs.check("h0", "h0", &[("STUB_STATE", "PORT_DOWN")]);
    assert!(!ok, "{text}");
    assert!(text.contains("PORT_DOWN: no link"), "{text}");

    // A device ibv_devinfo does not know.
    let (ok, text) = {
        let mut command = Command::new(workspace_root().join("scripts/run-cluster.sh"));
        command
            .args([
                "--check",
                "--hosts",
                "h0",
                "--registry-host",
                "r",
                "--device",
                "mlx9",
            ])
            .arg("--ssh")
            .arg(stubs.path().join("fake-ssh"))
            .arg("--bin-dir")
            .arg(stubs.path().join("bin"))
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    stubs.path().display(),
                    std::env::var("PATH").unwrap()
                ),
            )
            .env("RZAB_MEMINFO", stubs.path().join("meminfo-ok"));
        let output = command.output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    assert!(!ok, "{text}");
    assert!(
        text.contains("device mlx9 port 1 not found") && text.contains("mlx5_0"),
        "{text}"
    );
    assert!(text.contains("r ("), "the registry host is checked: {text}");
}

#[test]
fn shell_scripts_pass_shellcheck() {
    let Ok(output) = Command::new("shellcheck").arg("--version").output() else {
        eprintln!(
            "skipped: shellcheck not installed (apt-get install shellcheck; scripts/test.sh does)"
        );
        return;
    };
    assert!(output.status.success());
    let root = workspace_root();
    let scripts: Vec<PathBuf> = std::fs::read_dir(root.join("scripts"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "sh"))
        .collect();
    assert!(scripts.len() >= 5);
    let mut command = Command::new("shellcheck");
    die_with_parent(&mut command);
    let output = command
        .current_dir(&root)
        .arg("-x")
        .args(scripts.iter().map(|path| path.strip_prefix(&root).unwrap()))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn metrics_text_parser_reads_labels_and_values() {
    let metrics = Metrics::parse(
        "# HELP x y\nrzab_a_total{kind=\"read\",node=\"0\"} 5\nrzab_a_total{kind=\"write\",node=\"0\"} 2.5\nrzab_b 1\n",
    );
    assert_eq!(metrics.sum("rzab_a_total", &[]), 7.5);
    assert_eq!(metrics.sum("rzab_a_total", &[("kind", "write")]), 2.5);
    assert_eq!(metrics.sum("rzab_b", &[]), 1.0);
    let labels: BTreeMap<String, String> = metrics.samples[0].labels.clone();
    assert_eq!(labels["node"], "0");
}
