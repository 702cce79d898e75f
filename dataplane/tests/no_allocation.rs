//! Steady-state post and poll allocate nothing, on shm and on udp: a counting global allocator
//! counts the allocations made by this thread while a sender and a receiver exchange
//! thousands of chained datagrams (after one warm-up round).

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a test fails by panicking; test indices and lengths are small"
)]

mod common;

use rzab_dataplane::transport::shm::{ShmConfig, ShmTransport};
use rzab_dataplane::transport::udp::{UdpConfig, UdpTransport};
use rzab_dataplane::transport::{Destination, RecvCompletion, SendRequest, Transport};

use common::thread_allocations;

/// Sends `rounds` chains of 16 from `a` to `b`, polling and re-posting on `b`, and returns how
/// many allocations this thread made meanwhile.
fn allocations_during_traffic<T: Transport>(a: &mut T, b: &mut T, rounds: usize) -> u64 {
    b.post_recv(b.caps().recv_slots);
    let to = a.resolve(&b.local_address()).unwrap();
    let mut chain = [SendRequest {
        destination: Destination::Unicast(to),
        buffer: 0,
        len: 64,
    }; 16];
    for (index, request) in chain.iter_mut().enumerate() {
        request.buffer = index as u16;
    }
    let mut completions = [RecvCompletion::default(); 32];
    let mut run = |rounds: usize| {
        let mut received = 0;
        for _ in 0..rounds {
            for (index, _) in chain.iter().enumerate() {
                a.send_buffer(index)[..8].copy_from_slice(&(index as u64).to_le_bytes());
            }
            a.post_send(&chain).unwrap();
            let mut spins = 0;
            let mut round_received = 0;
            while round_received < chain.len() && spins < 1_000_000 {
                let count = b.poll_recv(&mut completions);
                for completion in &completions[..count] {
                    assert_eq!(b.recv_payload(completion).len(), 64);
                }
                b.post_recv(count);
                round_received += count;
                spins += 1;
            }
            received += round_received;
        }
        received
    };
    run(10);
    let before = thread_allocations();
    let received = run(rounds);
    let after = thread_allocations();
    assert_eq!(received, rounds * chain.len(), "traffic must actually flow");
    after - before
}

#[test]
fn counting_allocator_counts() {
    let before = thread_allocations();
    let boxed = std::hint::black_box(Box::new(5u64));
    let after = thread_allocations();
    drop(boxed);
    assert!(
        after > before,
        "the allocator must see allocations, or the other tests prove nothing"
    );
}

#[test]
fn shm_steady_state_allocates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = |port| ShmConfig {
        fabric: "alloc".into(),
        dir: dir.path().to_owned(),
        port,
        ports: 4,
        ring_slots: 64,
        mtu: 256,
        max_chain: 16,
    };
    let mut a = ShmTransport::open(&config(0)).unwrap();
    let mut b = ShmTransport::open(&config(1)).unwrap();
    assert_eq!(allocations_during_traffic(&mut a, &mut b, 2_000), 0);
}

#[test]
fn udp_steady_state_allocates_nothing() {
    let config = UdpConfig {
        mtu: 256,
        recv_slots: 64,
        max_chain: 16,
        ..UdpConfig::default()
    };
    let mut a = UdpTransport::open(&config).unwrap();
    let mut b = UdpTransport::open(&config).unwrap();
    assert_eq!(allocations_during_traffic(&mut a, &mut b, 2_000), 0);
}
