//! Endpoints exchanged between two separate processes: this test and an
//! `rzab-transport-tool peer` child swap their serde endpoint records over pipes, then
//! exchange unicast and multicast datagrams, on shm and on udp.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; test indices and lengths are small"
)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use rzab_dataplane::transport::conformance::receive;
use rzab_dataplane::transport::shm::{ShmConfig, ShmTransport};
use rzab_dataplane::transport::udp::{UdpConfig, UdpTransport};
use rzab_dataplane::transport::{Destination, MulticastGroup, SendRequest, Transport};
use rzab_shared::EndpointRecord;

const TOOL: &str = env!("CARGO_BIN_EXE_rzab-transport-tool");

/// Spawns a peer that echoes `count` datagrams, swaps endpoint records with it, sends `count`
/// datagrams (to its unicast address, or to `group` when given) and checks the echoes.
fn exchange_with_child<T: Transport>(mut local: T, peer_args: &[&str], group: Option<u16>) {
    let count = 10;
    let mut command = Command::new(TOOL);
    command.args([
        "peer",
        "--mode",
        "echo",
        "--count",
        &count.to_string(),
        "--timeout",
        "20",
    ]);
    command.args(peer_args);
    if let Some(group) = group {
        command.args(["--join", &group.to_string()]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let published: serde_json::Value = serde_json::from_str(&line).unwrap();
    let record: EndpointRecord = serde_json::from_value(published["endpoint"].clone()).unwrap();
    assert_eq!(
        record.schema,
        rzab_shared::endpoint::ENDPOINT_SCHEMA_VERSION
    );

    local.post_recv(local.caps().recv_slots);
    let destination = match group {
        Some(group) => {
            Destination::Multicast(local.multicast_address(MulticastGroup(group)).unwrap())
        }
        None => Destination::Unicast(local.resolve(&record.address).unwrap()),
    };
    let stdin = child.stdin.as_mut().unwrap();
    writeln!(
        stdin,
        "{}",
        serde_json::to_string(&EndpointRecord::new(0, 0, local.local_address())).unwrap()
    )
    .unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(100));

    for number in 0..count {
        let payload = format!("datagram {number}");
        local.send_buffer(0)[..payload.len()].copy_from_slice(payload.as_bytes());
        let request = SendRequest {
            destination,
            buffer: 0,
            len: payload.len() as u32,
        };
        local.post_send(&[request]).unwrap();
    }
    let echoes = receive(&mut local, count, Duration::from_secs(10));
    let echoes: Vec<String> = echoes
        .into_iter()
        .map(|bytes| String::from_utf8(bytes).unwrap())
        .collect();
    let expected: Vec<String> = (0..count)
        .map(|number| format!("datagram {number}"))
        .collect();
    assert_eq!(echoes, expected);

    line.clear();
    stdout.read_line(&mut line).unwrap();
    let report: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(report["handled"], count as u64);
    assert!(child.wait().unwrap().success());
}

fn shm_local(dir: &std::path::Path, fabric: &str) -> ShmTransport {
    let config = ShmConfig {
        fabric: fabric.into(),
        dir: dir.to_owned(),
        port: 0,
        ports: 8,
        ring_slots: 256,
        mtu: 1024,
        max_chain: 32,
    };
    ShmTransport::open(&config).unwrap()
}

fn shm_peer_args<'a>(dir: &'a str, fabric: &'a str) -> Vec<&'a str> {
    vec![
        "--transport",
        "shm",
        "--shm-dir",
        dir,
        "--fabric",
        fabric,
        "--port",
        "1",
        "--recv-slots",
        "256",
    ]
}

#[test]
fn shm_endpoints_exchanged_between_processes() {
    let dir = tempfile::tempdir().unwrap();
    let dir_text = dir.path().display().to_string();
    exchange_with_child(
        shm_local(dir.path(), "xproc"),
        &shm_peer_args(&dir_text, "xproc"),
        None,
    );
}

#[test]
fn shm_multicast_between_processes() {
    let dir = tempfile::tempdir().unwrap();
    let dir_text = dir.path().display().to_string();
    exchange_with_child(
        shm_local(dir.path(), "xmcast"),
        &shm_peer_args(&dir_text, "xmcast"),
        Some(5),
    );
}

fn udp_pair(multicast_port: u16) -> (UdpTransport, String) {
    let config = UdpConfig {
        multicast_port,
        ..UdpConfig::default()
    };
    (
        UdpTransport::open(&config).unwrap(),
        multicast_port.to_string(),
    )
}

#[test]
fn udp_endpoints_exchanged_between_processes() {
    let port = 30_000 + (std::process::id() % 1_000) as u16 * 2;
    let (local, port_text) = udp_pair(port);
    exchange_with_child(
        local,
        &[
            "--transport",
            "udp",
            "--multicast-port",
            &port_text,
            "--recv-slots",
            "256",
        ],
        None,
    );
}

#[test]
fn udp_multicast_between_processes() {
    let port = 30_001 + (std::process::id() % 1_000) as u16 * 2;
    let (local, port_text) = udp_pair(port);
    let args = [
        "--transport",
        "udp",
        "--multicast-port",
        &port_text,
        "--recv-slots",
        "256",
        "--mtu",
        "4096",
    ];
    exchange_with_child(local, &args, Some(6));
}
