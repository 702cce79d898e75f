//! The OpenAPI document against the live server, checked by schemathesis: it generates
//! requests from the document (valid ones, and invalid ones it expects refused with a 4xx)
//! and checks every response against it (`--checks all`: no 5xx, documented status codes,
//! content types, headers and schemas, valid data accepted, invalid data refused, 405 with
//! an `Allow` header for undocumented methods). It runs against an in-process control plane
//! attached to a fake single-node data plane with a real memcached, so cluster-scoped knob
//! changes succeed as they would in a running cluster.
//!
//! schemathesis comes from PyPI: scripts/test.sh installs it into a virtual environment and
//! names it in `RZAB_SCHEMATHESIS`; without that variable the test looks for `st` under
//! `target/schemathesis-venv/bin` and then on PATH, and fails (never skips) if it finds none.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

mod common;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{FakeDataPlane, Memcached, Peers, config, eventually, generation, get_json};
use rzab_controlplane::ControlPlane;
use serde_json::json;

/// Test cases per operation and phase: enough to walk every knob's boundaries and types.
const MAX_EXAMPLES: &str = "100";
/// Bound of the whole run (it normally takes well under a minute); the run is killed then.
const RUN_BOUND: Duration = Duration::from_secs(600);

fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("RZAB_SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let venv = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/schemathesis-venv/bin/st"
    ));
    if venv.exists() {
        return venv;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("st"))
            .find(|candidate| candidate.exists())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "schemathesis not found: run scripts/test.sh (which installs it), or `python3 -m venv target/schemathesis-venv && target/schemathesis-venv/bin/pip install schemathesis`, or set RZAB_SCHEMATHESIS to its `st`"
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_the_server_true_to_its_openapi_document() {
    let st = schemathesis();
    let memcached = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("block");
    let _data_plane = FakeDataPlane::start(&path, "schema", 0, 1, 2, 0, Peers::Static);
    let control_plane = ControlPlane::start(config(
        "schema",
        &generation("schema"),
        0,
        &path,
        &memcached.address(),
    ))
    .await
    .unwrap();
    let address = control_plane.local_addr();
    eventually("attached, running and registered", async || {
        let status = get_json(address, "/v1/status").await;
        status["lifecycle"] == "running" && status["registry"]["state"] == json!("ready")
    })
    .await;

    let work = dir.path().join("st");
    std::fs::create_dir(&work).unwrap();
    let log = dir.path().join("schemathesis.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(&st);
        command
            .args([
                "run",
                &format!("http://{address}/openapi.json"),
                "--checks",
                "all",
                "--max-examples",
                MAX_EXAMPLES,
                "--workers",
                "1",
                "--request-timeout",
                "20",
                "--no-color",
            ])
            // Its example database and any report stay in the temporary directory.
            .current_dir(&work)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        // SAFETY: only prctl (async-signal-safe) runs between fork and exec; the kernel kills
        // schemathesis if this test process dies first.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("starting {}: {error}", st.display()));
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if started.elapsed() > RUN_BOUND {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    control_plane.shutdown().await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("schemathesis ran past {RUN_BOUND:?}:\n{text}"));
    assert!(status.success(), "schemathesis failed ({status}):\n{text}");
    assert!(text.contains("No issues found"), "{text}");
    // It must have tested every operation of the document (but the document's own route,
    // which schemathesis leaves out).
    let document: serde_json::Value =
        serde_json::from_str(&rzab_controlplane::openapi::document().unwrap()).unwrap();
    let operations = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|path| path.as_object().unwrap().len())
        .sum::<usize>();
    let tested = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Tested: "))
        .and_then(|count| count.trim().parse::<usize>().ok());
    assert!(
        tested == Some(operations) || tested == Some(operations - 1),
        "{operations} operations documented, tested {tested:?}:\n{text}"
    );
}
