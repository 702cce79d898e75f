//! The REST API of one in-process control plane over a temporary control block: the
//! checked-in OpenAPI document matches the code, every documented route answers with a
//! documented status and the documented shape, knob changes are validated whole (errors name
//! the field and the allowed range, and change nothing), and health follows the data plane.
//! The registry is a closed port here, so these tests also show that REST answers without it.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; test numbers are small"
)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use common::{FakeDataPlane, Peers, config, eventually, free_port, generation, get_json, request};
use rzab_controlplane::ControlPlane;
use rzab_shared::knobs::KNOBS;
use rzab_shared::{Knob, Lifecycle};
use serde_json::{Value, json};

const OPENAPI_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    control_plane: ControlPlane,
}

impl Fixture {
    async fn start(name: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("block");
        // Nothing listens on this port: the registry is unreachable throughout.
        let registry = format!("127.0.0.1:{}", free_port());
        let control_plane =
            ControlPlane::start(config("rest", &generation(name), 0, &path, &registry))
                .await
                .unwrap();
        Fixture {
            _dir: dir,
            path,
            control_plane,
        }
    }

    fn address(&self) -> SocketAddr {
        self.control_plane.local_addr()
    }

    fn data_plane(&self, peers: Peers) -> FakeDataPlane {
        FakeDataPlane::start(&self.path, "rest", 0, 1, 2, 0, peers)
    }

    /// Waits until the control plane has attached and the fake data plane runs (it flips its
    /// lifecycle on its own 5 ms tick, which may come after the attach).
    async fn attached(&self) {
        let address = self.address();
        eventually(
            "the control plane attaches to a running data plane",
            async || {
                let status = get_json(address, "/v1/status").await;
                status["attached"] == json!(true) && status["lifecycle"] == "running"
            },
        )
        .await;
    }
}

#[test]
fn checked_in_openapi_document_matches_the_code() {
    let generated = rzab_controlplane::openapi::document().unwrap();
    if std::env::var_os("RZAB_UPDATE_OPENAPI").is_some() {
        std::fs::write(OPENAPI_FILE, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(OPENAPI_FILE).unwrap();
    assert!(
        checked_in == generated,
        "controlplane/openapi.json is out of date: rerun this test with RZAB_UPDATE_OPENAPI=1 (or `rzab-controlplane --openapi > controlplane/openapi.json`) and commit the result"
    );
}

/// Resolves a `$ref` into the document's components.
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.rsplit('/').next().unwrap();
            &document["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Checks a JSON value against the parts of a schema the generator uses: types, required
/// properties, nested objects and arrays.
fn check_shape(document: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(document, schema);
    if let Some(one_of) = schema["oneOf"].as_array() {
        if value.is_null() {
            return;
        }
        let inner = one_of.iter().find(|s| s["type"] != json!("null")).unwrap();
        return check_shape(document, inner, value, at);
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => return,
    };
    let matches = types.iter().any(|kind| match *kind {
        "null" => value.is_null(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_u64() || value.is_i64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    });
    assert!(matches, "{at}: {value} is not {types:?}");
    if let (Some(object), Some(properties)) = (value.as_object(), schema["properties"].as_object())
    {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap();
            assert!(object.contains_key(name), "{at}: missing required `{name}`");
        }
        for (name, property) in properties {
            if let Some(field) = object.get(name) {
                check_shape(document, property, field, &format!("{at}.{name}"));
            }
        }
    }
    if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
        for (index, item) in items.iter().enumerate() {
            check_shape(document, schema, item, &format!("{at}[{index}]"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_answers_as_documented() {
    let fixture = Fixture::start("routes").await;
    let _data_plane = fixture.data_plane(Peers::Static);
    fixture.attached().await;
    let document: Value =
        serde_json::from_str(&std::fs::read_to_string(OPENAPI_FILE).unwrap()).unwrap();
    let mut exercised = 0;
    for (path, operations) in document["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let body = (method == "patch").then_some(r#"{"prepare_batch": 8}"#);
            let reply = request(fixture.address(), &method.to_uppercase(), path, body).await;
            let documented = &operation["responses"][reply.status.to_string()];
            assert!(
                documented.is_object(),
                "{method} {path} answered {} which is not documented: {}",
                reply.status,
                reply.body
            );
            assert_eq!(reply.status, 200, "{method} {path}: {}", reply.body);
            let (content_type, content) = documented["content"]
                .as_object()
                .unwrap()
                .iter()
                .next()
                .unwrap();
            let essence = |text: &str| text.split(';').next().unwrap().trim().to_owned();
            assert_eq!(
                essence(&reply.content_type),
                essence(content_type),
                "{method} {path}"
            );
            if content_type == "application/json" {
                check_shape(
                    &document,
                    &content["schema"],
                    &reply.json(),
                    &format!("{method} {path}"),
                );
            }
            exercised += 1;
        }
    }
    assert_eq!(
        exercised, 7,
        "every route of the router is documented and exercised"
    );
    // Errors are JSON too.
    for (method, path, status) in [("GET", "/nope", 404), ("DELETE", "/v1/knobs", 405)] {
        let reply = request(fixture.address(), method, path, None).await;
        assert_eq!(reply.status, status);
        assert!(reply.json()["error"].is_string(), "{}", reply.body);
    }
    fixture.control_plane.shutdown().await;
}

fn knob_values(data_plane: &FakeDataPlane) -> Vec<u64> {
    KNOBS
        .iter()
        .map(|spec| data_plane.block.knob(spec.knob))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_knob_changes_name_the_field_and_range_and_change_nothing() {
    let fixture = Fixture::start("refusals").await;
    let data_plane = fixture.data_plane(Peers::Static);
    fixture.attached().await;
    let before = knob_values(&data_plane);
    let epoch = data_plane.block.knob_epoch();
    let cases: &[(&str, &str, u16, Option<&str>, &str)] = &[
        // (query, body, status, field, expected substring of allowed)
        (
            "",
            r#"{"prepare_batch": 99}"#,
            422,
            Some("prepare_batch"),
            "1..=16",
        ),
        (
            "",
            r#"{"prepare_batch": 0}"#,
            422,
            Some("prepare_batch"),
            "1..=16",
        ),
        (
            "",
            r#"{"ack_batch": 4097}"#,
            422,
            Some("ack_batch"),
            "16..=4096",
        ),
        (
            "",
            r#"{"poll_mode": "lazy"}"#,
            422,
            Some("poll_mode"),
            "busy, adaptive",
        ),
        (
            "",
            r#"{"multicast": 1}"#,
            400,
            Some("multicast"),
            "true or false",
        ),
        (
            "",
            r#"{"prepare_batch": "8"}"#,
            400,
            Some("prepare_batch"),
            "1..=16",
        ),
        (
            "",
            r#"{"prepare_batch": -1}"#,
            400,
            Some("prepare_batch"),
            "1..=16",
        ),
        (
            "",
            r#"{"prepare_batch": 2.5}"#,
            400,
            Some("prepare_batch"),
            "1..=16",
        ),
        (
            "",
            r#"{"no_such_knob": 1}"#,
            400,
            Some("no_such_knob"),
            "prepare_batch",
        ),
        // A valid change beside a refused one: nothing is applied.
        (
            "",
            r#"{"write_batch": 3, "prepare_batch": 99}"#,
            422,
            Some("prepare_batch"),
            "1..=16",
        ),
        (
            "",
            r#"{"multicast": false, "zzz": 1}"#,
            400,
            Some("zzz"),
            "multicast",
        ),
        ("", r#"[1, 2]"#, 400, Some("body"), "multicast"),
        ("", r#"{}"#, 400, Some("body"), "multicast"),
        ("", r#"not json"#, 400, Some("body"), "JSON object"),
        (
            "?scope=planet",
            r#"{"write_batch": 3}"#,
            400,
            Some("scope"),
            "node, cluster",
        ),
        (
            "?color=red",
            r#"{"write_batch": 3}"#,
            400,
            Some("color"),
            "scope",
        ),
        // The registry is unreachable: a cluster-wide change is refused whole.
        (
            "?scope=cluster",
            r#"{"write_batch": 3}"#,
            503,
            Some("scope"),
            "node",
        ),
    ];
    for (query, body, status, field, allowed) in cases {
        let reply = request(
            fixture.address(),
            "PATCH",
            &format!("/v1/knobs{query}"),
            Some(body),
        )
        .await;
        assert_eq!(reply.status, *status, "{query} {body}: {}", reply.body);
        assert!(reply.content_type.starts_with("application/json"), "{body}");
        let error = reply.json();
        assert!(
            error["error"].as_str().is_some_and(|text| !text.is_empty()),
            "{body}"
        );
        assert_eq!(error["field"].as_str(), *field, "{body}: {error}");
        assert!(
            error["allowed"].as_str().unwrap().contains(allowed),
            "{body}: {error}"
        );
        assert_eq!(knob_values(&data_plane), before, "{body} changed a knob");
        assert_eq!(
            data_plane.block.knob_epoch(),
            epoch,
            "{body} bumped the epoch"
        );
    }
    fixture.control_plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_knob_changes_apply_whole_and_report_the_workers() {
    let fixture = Fixture::start("accepted").await;
    let data_plane = fixture.data_plane(Peers::Static);
    fixture.attached().await;
    let epoch = data_plane.block.knob_epoch();
    let reply = request(
        fixture.address(),
        "PATCH",
        "/v1/knobs",
        Some(r#"{"multicast": false, "prepare_batch": 4, "poll_mode": "busy"}"#),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let response = reply.json();
    assert_eq!(response["scope"], "node");
    assert_eq!(
        response["applied"],
        json!({"multicast": false, "prepare_batch": 4, "poll_mode": "busy"})
    );
    assert_eq!(data_plane.block.knob(Knob::Multicast), 0);
    assert_eq!(data_plane.block.knob(Knob::PrepareBatch), 4);
    assert_eq!(data_plane.block.knob(Knob::PollMode), 0);
    let new_epoch = response["epoch"].as_u64().unwrap();
    assert!(new_epoch > epoch);
    assert_eq!(new_epoch, data_plane.block.knob_epoch());
    assert_eq!(response["dataplane"]["running"], true);
    assert_eq!(response["dataplane"]["workers"], 2);
    assert!(response["dataplane"]["waited_ms"].as_f64().is_some());
    // The fake data plane confirms every epoch within a few ms; this is the normal case, but a
    // loaded machine may take longer than the 100 ms wait, so only the consistency is checked.
    let seen = response["dataplane"]["workers_seen"].as_u64().unwrap();
    assert_eq!(response["dataplane"]["all_seen"], seen == 2);

    let knobs = get_json(fixture.address(), "/v1/knobs").await;
    assert_eq!(knobs["epoch"].as_u64(), Some(new_epoch));
    let listed: Vec<&str> = knobs["knobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|knob| knob["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        KNOBS.iter().map(|spec| spec.name).collect::<Vec<_>>()
    );
    let find = |name: &str| {
        knobs["knobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|knob| knob["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(find("multicast")["value"], false);
    assert_eq!(find("poll_mode")["value"], "busy");
    assert_eq!(find("poll_mode")["choices"], json!(["busy", "adaptive"]));
    assert_eq!(find("prepare_batch")["value"], 4);
    assert_eq!(find("prepare_batch")["allowed"], "1..=16");

    // A data plane that is not running: applied, and the response says so without waiting.
    data_plane.block.set_lifecycle(Lifecycle::Stopping);
    let reply = request(
        fixture.address(),
        "PATCH",
        "/v1/knobs?scope=node",
        Some(r#"{"write_batch": 2}"#),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let response = reply.json();
    assert_eq!(response["dataplane"]["running"], false);
    assert!(
        response["dataplane"]["note"]
            .as_str()
            .unwrap()
            .contains("not running")
    );
    assert_eq!(data_plane.block.knob(Knob::WriteBatch), 2);
    fixture.control_plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_attachment_and_the_data_plane_heartbeat() {
    let fixture = Fixture::start("health").await;
    let address = fixture.address();
    let reply = request(address, "GET", "/healthz", None).await;
    assert_eq!(reply.status, 503);
    let health = reply.json();
    assert_eq!(health["ok"], false);
    assert!(
        health["reason"].as_str().unwrap().contains("not attached"),
        "{health}"
    );
    // Without a block, knob changes are refused and status still answers.
    let reply = request(address, "PATCH", "/v1/knobs", Some(r#"{"write_batch": 2}"#)).await;
    assert_eq!(reply.status, 503);
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("not attached")
    );
    let status = get_json(address, "/v1/status").await;
    assert_eq!(status["attached"], false);
    assert!(status["attach_error"].is_string());
    assert_eq!(status["role"], "leader");
    assert_eq!(
        request(address, "GET", "/v1/endpoints", None).await.status,
        503
    );

    let data_plane = fixture.data_plane(Peers::Static);
    eventually("healthz turns 200 and the data plane runs", async || {
        request(address, "GET", "/healthz", None).await.status == 200
            && get_json(address, "/v1/status").await["lifecycle"] == "running"
    })
    .await;
    let status = get_json(address, "/v1/status").await;
    assert_eq!(status["dataplane"]["up"], true);
    assert_eq!(status["dataplane"]["pid"], std::process::id());
    assert_eq!(status["workers"], 2);
    assert_eq!(status["nodes"], 1);
    assert_eq!(status["transport"], "shm");
    assert_eq!(status["worker_status"].as_array().unwrap().len(), 2);
    // The control plane has announced itself in the block.
    assert_eq!(
        data_plane
            .block
            .header
            .controlplane_pid
            .load(Ordering::Relaxed),
        std::process::id()
    );

    // A silent data plane (heartbeat stops) is reported unhealthy.
    data_plane.alive.store(false, Ordering::Relaxed);
    eventually("healthz turns 503 for a silent data plane", async || {
        let reply = request(address, "GET", "/healthz", None).await;
        reply.status == 503
            && reply.json()["reason"]
                .as_str()
                .unwrap()
                .contains("heartbeat")
    })
    .await;
    fixture.control_plane.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_show_the_local_slots_and_the_remote_table() {
    let fixture = Fixture::start("endpoints").await;
    let data_plane = fixture.data_plane(Peers::Static);
    fixture.attached().await;
    data_plane.block.remote[0][1].store(Some(&rzab_shared::EndpointAddress::Shm { port: 1 }));
    let endpoints = get_json(fixture.address(), "/v1/endpoints").await;
    assert_eq!(endpoints["endpoints_published"], true);
    assert_eq!(
        endpoints["local"],
        json!([
            {"worker": 0, "address": {"kind": "shm", "port": 0}},
            {"worker": 1, "address": {"kind": "shm", "port": 1}},
        ])
    );
    assert_eq!(
        endpoints["remote"],
        json!([{"node": 0, "endpoints": [
            {"worker": 0, "address": null},
            {"worker": 1, "address": {"kind": "shm", "port": 1}},
        ]}])
    );
    fixture.control_plane.shutdown().await;
}
