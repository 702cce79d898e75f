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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{
    FakeDataPlane, Peers, config, eventually, free_port, generation, get_json, http_with,
    read_reply, request,
};
use rzab_controlplane::rest::MAX_BODY_BYTES;
use rzab_controlplane::{Config, ControlPlane};
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
        Self::start_with(name, |_| {}).await
    }

    /// Starts with the config adjusted by `adjust` (HTTP limits, say).
    async fn start_with(name: &str, adjust: impl FnOnce(&mut Config)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("block");
        // Nothing listens on this port: the registry is unreachable throughout.
        let registry = format!("127.0.0.1:{}", free_port());
        let mut config = config("rest", &generation(name), 0, &path, &registry);
        adjust(&mut config);
        let control_plane = ControlPlane::start(config).await.unwrap();
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
    // The fake data plane confirms every epoch within a few ms, well inside the wait.
    assert_eq!(reply.status, 200, "{}", reply.body);
    let response = reply.json();
    assert_eq!(response["outcome"], "applied");
    assert_eq!(response["scope"], "node");
    assert_eq!(
        response["values"],
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
    assert_eq!(response["dataplane"]["workers_seen"], 2);
    assert_eq!(response["dataplane"]["all_seen"], true);

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

    // A data plane that is not running: stored in the block but in force nowhere yet, so
    // pending (202), and the response says so without waiting.
    data_plane.block.set_lifecycle(Lifecycle::Stopping);
    let reply = request(
        fixture.address(),
        "PATCH",
        "/v1/knobs?scope=node",
        Some(r#"{"write_batch": 2}"#),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let response = reply.json();
    assert_eq!(response["outcome"], "pending");
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
    // Nobody leads by number: without a data plane to say, the role is not known.
    assert_eq!(status["role"], "unknown");
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

/// Issue 14, findings 4 and 5: a body must be JSON (415 otherwise, whatever it holds) and at
/// most MAX_BODY_BYTES (413 otherwise); both refusals reach the client cleanly even when it
/// sends a 10 MB body before reading the answer, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_must_be_json_and_small_and_refusals_arrive_whole() {
    let fixture = Fixture::start("bodies").await;
    let data_plane = fixture.data_plane(Peers::Static);
    fixture.attached().await;
    let address = fixture.address();
    let before = knob_values(&data_plane);
    let epoch = data_plane.block.knob_epoch();
    let change = r#"{"write_batch": 3}"#;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/jsonx"),
        None,
    ] {
        let reply = tokio::task::spawn_blocking(move || {
            http_with(address, "PATCH", "/v1/knobs", content_type, Some(change))
        })
        .await
        .unwrap();
        assert_eq!(reply.status, 415, "{content_type:?}: {}", reply.body);
        assert_eq!(reply.json()["field"], "content-type");
        assert_eq!(reply.json()["allowed"], "application/json");
    }
    assert_eq!(
        knob_values(&data_plane),
        before,
        "a refused body changed a knob"
    );
    assert_eq!(data_plane.block.knob_epoch(), epoch);

    // Declared too large: refused from the header, and the 10 MB the client sends anyway
    // (without waiting for 100-continue, as many clients do) are read and discarded so that
    // the 413 is not destroyed by a connection reset.
    for size in [MAX_BODY_BYTES + 1, 3 << 20, 10 << 20] {
        let reply = tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(address).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            write!(
                stream,
                "PATCH /v1/knobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
            )
            .unwrap();
            let chunk = vec![b' '; 64 << 10];
            let mut sent = 0;
            while sent < size {
                let part = chunk.len().min(size - sent);
                stream
                    .write_all(&chunk[..part])
                    .unwrap_or_else(|error| panic!("sending byte {sent} of {size}: {error}"));
                sent += part;
            }
            read_reply(&mut stream)
        })
        .await
        .unwrap();
        assert_eq!(reply.status, 413, "{size} bytes: {}", reply.body);
        assert_eq!(reply.json()["field"], "body");
    }
    // Chunked, with no length to refuse up front: refused once the limit is passed.
    let reply = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "PATCH /v1/knobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .unwrap();
        let chunk = vec![b' '; 32 << 10];
        for _ in 0..(4 * MAX_BODY_BYTES / chunk.len()) {
            write!(stream, "{:x}\r\n", chunk.len()).unwrap();
            stream.write_all(&chunk).unwrap();
            stream.write_all(b"\r\n").unwrap();
        }
        stream.write_all(b"0\r\n\r\n").unwrap();
        read_reply(&mut stream)
    })
    .await
    .unwrap();
    assert_eq!(reply.status, 413, "chunked: {}", reply.body);
    assert_eq!(
        knob_values(&data_plane),
        before,
        "a refused body changed a knob"
    );
    assert_eq!(data_plane.block.knob_epoch(), epoch);

    // JSON with parameters, in any case, is JSON.
    let reply = tokio::task::spawn_blocking(move || {
        http_with(
            address,
            "PATCH",
            "/v1/knobs",
            Some("Application/JSON; charset=utf-8"),
            Some(change),
        )
    })
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(data_plane.block.knob(Knob::WriteBatch), 3);
    fixture.control_plane.shutdown().await;
}

/// Reads until the server closes the connection; panics if it is still open after `bound`.
/// Returns what was read.
fn read_until_closed(stream: &mut TcpStream, bound: Duration) -> String {
    stream.set_read_timeout(Some(bound)).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => panic!(
                "the connection was not closed within {bound:?} ({error}); received {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Issue 14, finding 3: a client that sends half a request and stalls is cut off: by the
/// header timeout while the headers are incomplete (and when it sends nothing at all), by the
/// body timeout with a 408 once the headers are in but the body stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_requests_are_cut_off_by_the_header_and_body_timeouts() {
    let fixture = Fixture::start_with("stalls", |config| {
        config.http.header_timeout = Duration::from_millis(300);
        config.http.body_timeout = Duration::from_millis(300);
    })
    .await;
    let _data_plane = fixture.data_plane(Peers::Static);
    fixture.attached().await;
    let address = fixture.address();
    // Bounds only: the server must close well before these pass.
    let bound = Duration::from_secs(20);
    tokio::task::spawn_blocking(move || {
        let mut silent = TcpStream::connect(address).unwrap();
        read_until_closed(&mut silent, bound);

        let mut half_headers = TcpStream::connect(address).unwrap();
        half_headers
            .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        read_until_closed(&mut half_headers, bound);

        let mut half_body = TcpStream::connect(address).unwrap();
        half_body
            .write_all(
                b"PATCH /v1/knobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"write_",
            )
            .unwrap();
        let answer = read_until_closed(&mut half_body, bound);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("did not arrive"), "{answer}");

        // A keep-alive connection is served, then closed once idle for the header timeout.
        let mut kept = TcpStream::connect(address).unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let answer = read_until_closed(&mut kept, bound);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    })
    .await
    .unwrap();
    // The server still answers.
    assert_eq!(
        request(address, "GET", "/v1/status", None).await.status,
        200
    );
    fixture.control_plane.shutdown().await;
}
