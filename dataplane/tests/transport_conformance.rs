//! Runs the transport conformance suite against every backend this machine has: the
//! shared-memory fabric and kernel UDP on loopback (verbs lives in `verbs_hardware.rs`), and
//! checks the fault-injecting wrapper.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; test indices and lengths are small"
)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};

use rzab_dataplane::transport::conformance::{self, receive};
use rzab_dataplane::transport::fault::{FaultConfig, FaultyTransport};
use rzab_dataplane::transport::shm::{ShmConfig, ShmTransport};
use rzab_dataplane::transport::udp::{UdpConfig, UdpTransport};
use rzab_dataplane::transport::{Destination, MulticastGroup, SendRequest, Transport};

fn shm_endpoints(dir: &Path, fabric: &str, count: u32) -> Vec<ShmTransport> {
    (0..count)
        .map(|port| {
            let config = ShmConfig {
                fabric: fabric.into(),
                dir: dir.to_owned(),
                port,
                ports: 8,
                ring_slots: 16,
                mtu: 1024,
                max_chain: 16,
            };
            ShmTransport::open(&config).unwrap()
        })
        .collect()
}

/// A multicast port per test in this process, offset by the pid so parallel runs differ.
fn multicast_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 2_000) as u16 * 16;
    base + NEXT.fetch_add(1, Ordering::Relaxed)
}

fn udp_endpoints(count: usize) -> Vec<UdpTransport> {
    let multicast_port = multicast_port();
    (0..count)
        .map(|_| {
            let config = UdpConfig {
                bind: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
                multicast_base: Ipv4Addr::new(239, 255, 42, 0),
                multicast_port,
                mtu: 1024,
                recv_slots: 16,
                max_chain: 16,
                socket_buffer: 1 << 20,
            };
            UdpTransport::open(&config).unwrap()
        })
        .collect()
}

fn pair<T>(mut endpoints: Vec<T>) -> (T, T) {
    let b = endpoints.pop().unwrap();
    let a = endpoints.pop().unwrap();
    (a, b)
}

macro_rules! conformance_tests {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn unicast() {
                let dir = tempfile::tempdir().unwrap();
                let (mut a, mut b) = pair($make(dir.path(), "unicast", 2));
                conformance::unicast(&mut a, &mut b).unwrap();
            }

            #[test]
            fn chained_send_and_batched_completions() {
                let dir = tempfile::tempdir().unwrap();
                let (mut a, mut b) = pair($make(dir.path(), "chain", 2));
                conformance::chained_send_and_batched_completions(&mut a, &mut b).unwrap();
            }

            #[test]
            fn multicast_fan_out() {
                let dir = tempfile::tempdir().unwrap();
                let mut endpoints = $make(dir.path(), "multicast", 4);
                let mut sender = endpoints.remove(0);
                conformance::multicast_fan_out(&mut sender, &mut endpoints, MulticastGroup(3))
                    .unwrap();
            }

            #[test]
            fn drop_without_posted_receive() {
                let dir = tempfile::tempdir().unwrap();
                let (mut a, mut b) = pair($make(dir.path(), "drop", 2));
                conformance::drop_without_posted_receive(&mut a, &mut b).unwrap();
            }

            #[test]
            fn oversize_refused() {
                let dir = tempfile::tempdir().unwrap();
                let (mut a, mut b) = pair($make(dir.path(), "oversize", 2));
                conformance::oversize_refused(&mut a, &mut b).unwrap();
            }

            #[test]
            fn ring_wraps_with_reposting() {
                let dir = tempfile::tempdir().unwrap();
                let (mut a, mut b) = pair($make(dir.path(), "wrap", 2));
                conformance::ring_wraps_with_reposting(&mut a, &mut b).unwrap();
            }
        }
    };
}

conformance_tests!(shm, |dir: &Path, name: &str, count: u32| shm_endpoints(
    dir, name, count
));
conformance_tests!(udp, |_dir: &Path, _name: &str, count: u32| udp_endpoints(
    count as usize
));

#[test]
fn shm_port_in_use_is_refused_and_freed_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let first = shm_endpoints(dir.path(), "claim", 1);
    let config = ShmConfig {
        fabric: "claim".into(),
        dir: dir.path().to_owned(),
        port: 0,
        ports: 8,
        ring_slots: 16,
        mtu: 1024,
        max_chain: 16,
    };
    let error = ShmTransport::open(&config).unwrap_err().to_string();
    assert!(error.contains("in use"), "{error}");
    drop(first);
    ShmTransport::open(&config).unwrap();
}

#[test]
fn shm_geometry_mismatch_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _first = shm_endpoints(dir.path(), "geometry", 1);
    let config = ShmConfig {
        fabric: "geometry".into(),
        dir: dir.path().to_owned(),
        port: 1,
        ports: 8,
        ring_slots: 32,
        mtu: 1024,
        max_chain: 16,
    };
    let error = ShmTransport::open(&config).unwrap_err().to_string();
    assert!(error.contains("ring slots"), "{error}");
}

#[test]
fn unknown_peers_and_foreign_endpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut shm, _other) = pair(shm_endpoints(dir.path(), "foreign", 2));
    assert!(
        shm.resolve(&rzab_shared::EndpointAddress::Shm { port: 99 })
            .is_err()
    );
    let (mut udp, _) = pair(udp_endpoints(2));
    assert!(udp.resolve(&shm.local_address()).is_err());
    assert!(shm.resolve(&udp.local_address()).is_err());
}

/// Sends `count` numbered datagrams from `a` to `b` in chains of 8 through the fault wrapper.
fn send_numbered<T: Transport>(a: &mut FaultyTransport<T>, to: T::Address, count: u32) {
    let mut chain = Vec::new();
    for number in 0..count {
        let slot = chain.len();
        a.send_buffer(slot)[..4].copy_from_slice(&number.to_le_bytes());
        chain.push(SendRequest {
            destination: Destination::Unicast(to),
            buffer: slot as u16,
            len: 4,
        });
        if chain.len() == 8 || number + 1 == count {
            a.post_send(&chain).unwrap();
            chain.clear();
        }
    }
}

fn numbers(payloads: &[Vec<u8>]) -> Vec<u32> {
    payloads
        .iter()
        .map(|payload| u32::from_le_bytes(payload[..4].try_into().unwrap()))
        .collect()
}

#[test]
fn fault_wrapper_drops_duplicates_and_reorders_deterministically() {
    let run = |seed: u64| {
        let dir = tempfile::tempdir().unwrap();
        let mut endpoints = shm_endpoints(dir.path(), "faults", 2);
        let mut b = endpoints.pop().unwrap();
        let inner = endpoints.pop().unwrap();
        let config = FaultConfig {
            seed,
            drop: 0.1,
            duplicate: 0.1,
            reorder: 0.1,
            ..FaultConfig::default()
        };
        let mut a = FaultyTransport::new(inner, config);
        b.post_recv(16);
        let to = a.resolve(&b.local_address()).unwrap();
        let mut received = Vec::new();
        for _ in 0..50 {
            send_numbered(&mut a, to, 8);
            received.extend(receive(&mut b, 64, std::time::Duration::from_millis(5)));
        }
        // Flush whatever is still held back.
        for _ in 0..20 {
            let mut scratch = [Default::default(); 4];
            let _ = a.poll_recv(&mut scratch);
        }
        received.extend(receive(&mut b, 64, std::time::Duration::from_millis(50)));
        (numbers(&received), a.fault_stats())
    };
    let (first, stats) = run(7);
    let (again, stats_again) = run(7);
    assert_eq!(first, again, "the same seed must inject the same faults");
    assert_eq!(stats, stats_again);
    assert!(
        stats.dropped > 0 && stats.duplicated > 0 && stats.reordered > 0,
        "{stats:?}"
    );
    assert_eq!(first.len() as u64, 400 - stats.dropped + stats.duplicated);
    assert!(
        first.windows(2).any(|pair| pair[1] < pair[0]),
        "nothing was reordered"
    );
    let (other, _) = run(8);
    assert_ne!(
        first, other,
        "a different seed must inject different faults"
    );
}

#[test]
fn fault_wrapper_without_faults_is_transparent() {
    let dir = tempfile::tempdir().unwrap();
    let (inner, mut b) = pair(shm_endpoints(dir.path(), "clean", 2));
    let mut a = FaultyTransport::new(inner, FaultConfig::default());
    b.post_recv(16);
    let to = a.resolve(&b.local_address()).unwrap();
    send_numbered(&mut a, to, 12);
    let received = numbers(&receive(&mut b, 12, conformance::ARRIVAL_TIMEOUT));
    assert_eq!(received, (0..12).collect::<Vec<_>>());
}
