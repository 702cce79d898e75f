//! The transport conformance suite: checks, generic over [`Transport`], that a backend keeps
//! the UD semantics described in the parent module. Integration tests run it against every
//! backend this machine has (shm and udp; verbs when `RZAB_VERBS_DEVICE` names a device).
//!
//! Each check takes already-open endpoints, returns `Err` with a description on the first
//! violation, and leaves every receive it posted polled. It touches only the given endpoints.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test patterns deliberately wrap bytes; lengths and indices are below the MTU and chain limits"
)]

use std::time::{Duration, Instant};

use super::{Destination, MulticastGroup, RecvCompletion, SendRequest, Transport};

/// Result of one conformance check.
pub type Check = Result<(), String>;

macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(format!($($message)+));
        }
    };
}

/// How long a check waits for datagrams that should arrive.
pub const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Polls `endpoint` until `want` datagrams arrived or the timeout passed; copies them out and
/// re-posts their buffers.
pub fn receive<T: Transport>(endpoint: &mut T, want: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let mut received = Vec::with_capacity(want);
    let mut completions = [RecvCompletion::default(); 32];
    let deadline = Instant::now() + timeout;
    while received.len() < want && Instant::now() < deadline {
        let count = endpoint.poll_recv(&mut completions);
        for completion in &completions[..count] {
            received.push(endpoint.recv_payload(completion).to_vec());
        }
        endpoint.post_recv(count);
        if count == 0 {
            std::thread::yield_now();
        }
    }
    received
}

/// Expects nothing to arrive within `quiet`.
pub fn expect_silence<T: Transport>(endpoint: &mut T, quiet: Duration) -> Check {
    let extra = receive(endpoint, 1, quiet);
    ensure!(
        extra.is_empty(),
        "unexpected datagram of {} bytes",
        extra.first().map_or(0, Vec::len)
    );
    Ok(())
}

fn pattern(tag: u8, index: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|offset| tag ^ (index as u8).wrapping_mul(31) ^ (offset as u8))
        .collect()
}

fn send_one<T: Transport>(sender: &mut T, to: Destination<T::Address>, payload: &[u8]) -> Check {
    sender.send_buffer(0)[..payload.len()].copy_from_slice(payload);
    let request = SendRequest {
        destination: to,
        buffer: 0,
        len: payload.len() as u32,
    };
    let accepted = sender
        .post_send(&[request])
        .map_err(|error| error.to_string())?;
    ensure!(accepted == 1, "post_send accepted {accepted} of 1");
    Ok(())
}

/// One datagram from `a` to `b` arrives intact, with its length.
pub fn unicast<T: Transport>(a: &mut T, b: &mut T) -> Check {
    b.post_recv(b.caps().recv_slots);
    let to = a
        .resolve(&b.local_address())
        .map_err(|error| error.to_string())?;
    for len in [1, 64, a.caps().mtu.min(b.caps().mtu)] {
        let payload = pattern(1, len, len);
        send_one(a, Destination::Unicast(to), &payload)?;
        let got = receive(b, 1, ARRIVAL_TIMEOUT);
        ensure!(got.len() == 1, "{len}-byte datagram did not arrive");
        ensure!(got[0] == payload, "{len}-byte datagram arrived altered");
    }
    ensure!(
        a.stats().datagrams_sent >= 3,
        "sender did not count its datagrams"
    );
    ensure!(
        b.stats().datagrams_received >= 3,
        "receiver did not count its datagrams"
    );
    Ok(())
}

/// A chain of `max_chain` requests posted with one doorbell arrives whole and in order, and
/// the receiver gets several completions from one poll.
pub fn chained_send_and_batched_completions<T: Transport>(a: &mut T, b: &mut T) -> Check {
    b.post_recv(b.caps().recv_slots);
    let to = a
        .resolve(&b.local_address())
        .map_err(|error| error.to_string())?;
    let chain_len = a.caps().max_chain.min(16);
    let doorbells_before = a.stats().doorbells;
    let mut chain = Vec::with_capacity(chain_len);
    for index in 0..chain_len {
        let payload = pattern(2, index, 100);
        a.send_buffer(index)[..100].copy_from_slice(&payload);
        chain.push(SendRequest {
            destination: Destination::Unicast(to),
            buffer: index as u16,
            len: 100,
        });
    }
    let accepted = a.post_send(&chain).map_err(|error| error.to_string())?;
    ensure!(
        accepted == chain_len,
        "accepted {accepted} of a chain of {chain_len}"
    );
    ensure!(
        a.stats().doorbells == doorbells_before + 1,
        "a chain must ring one doorbell"
    );

    // Give the datagrams time to land, then expect more than one completion from one poll.
    std::thread::sleep(Duration::from_millis(50));
    let mut completions = [RecvCompletion::default(); 64];
    let first_poll = b.poll_recv(&mut completions);
    ensure!(
        first_poll > 1,
        "one poll returned {first_poll} completions; batching expected"
    );
    let mut received: Vec<Vec<u8>> = completions[..first_poll]
        .iter()
        .map(|c| b.recv_payload(c).to_vec())
        .collect();
    b.post_recv(first_poll);
    received.extend(receive(b, chain_len - first_poll, ARRIVAL_TIMEOUT));
    ensure!(
        received.len() == chain_len,
        "{} of {chain_len} chained datagrams arrived",
        received.len()
    );
    for (index, payload) in received.iter().enumerate() {
        ensure!(
            *payload == pattern(2, index, 100),
            "chained datagram {index} out of order or altered"
        );
    }
    Ok(())
}

/// A datagram to a group reaches every member but the sender.
pub fn multicast_fan_out<T: Transport>(
    sender: &mut T,
    members: &mut [T],
    group: MulticastGroup,
) -> Check {
    for member in members.iter_mut() {
        member
            .join_multicast(group)
            .map_err(|error| error.to_string())?;
        member.post_recv(member.caps().recv_slots);
    }
    // The sender joins too: it must still not hear itself.
    sender
        .join_multicast(group)
        .map_err(|error| error.to_string())?;
    sender.post_recv(sender.caps().recv_slots);
    let to = sender
        .multicast_address(group)
        .map_err(|error| error.to_string())?;
    let payload = pattern(3, 0, 200);
    // Multicast joins may take a moment to settle in the kernel.
    std::thread::sleep(Duration::from_millis(20));
    send_one(sender, Destination::Multicast(to), &payload)?;
    for (index, member) in members.iter_mut().enumerate() {
        let got = receive(member, 1, ARRIVAL_TIMEOUT);
        ensure!(
            got.len() == 1,
            "member {index} did not receive the multicast datagram"
        );
        ensure!(
            got[0] == payload,
            "member {index} received an altered datagram"
        );
    }
    expect_silence(sender, Duration::from_millis(100))?;
    Ok(())
}

/// With `posted` receives posted, of `sent` datagrams only `posted` arrive and the rest are
/// counted as dropped; posting again later does not resurrect them.
pub fn drop_without_posted_receive<T: Transport>(a: &mut T, b: &mut T) -> Check {
    let (posted, sent) = (2usize, 5usize);
    ensure!(
        b.posted_recvs() == 0,
        "fresh endpoint must start with nothing posted"
    );
    ensure!(
        b.post_recv(posted) == posted,
        "could not post {posted} receives"
    );
    let to = a
        .resolve(&b.local_address())
        .map_err(|error| error.to_string())?;
    let drops_before = b.stats().dropped_no_recv;
    for index in 0..sent {
        send_one(a, Destination::Unicast(to), &pattern(4, index, 32))?;
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut completions = [RecvCompletion::default(); 16];
    let mut got = 0;
    let deadline = Instant::now() + ARRIVAL_TIMEOUT;
    while got < posted && Instant::now() < deadline {
        got += b.poll_recv(&mut completions[got..]);
    }
    ensure!(
        got == posted,
        "{got} datagrams arrived into {posted} posted receives"
    );
    // Nothing is posted now: what is still on its way must be dropped (polling with nothing
    // posted is where a kernel-backed transport notices).
    let extra = b.poll_recv(&mut completions[got..]);
    ensure!(
        extra == 0,
        "{extra} datagrams arrived with no posted receive"
    );
    let dropped = b.stats().dropped_no_recv - drops_before;
    ensure!(
        dropped == (sent - posted) as u64,
        "counted {dropped} drops, expected {}",
        sent - posted
    );
    b.post_recv(posted);
    expect_silence(b, Duration::from_millis(100))?;
    Ok(())
}

/// A request longer than the MTU is refused and nothing of its chain is sent.
pub fn oversize_refused<T: Transport>(a: &mut T, b: &mut T) -> Check {
    b.post_recv(b.caps().recv_slots);
    let to = a
        .resolve(&b.local_address())
        .map_err(|error| error.to_string())?;
    let mtu = a.caps().mtu;
    let refused_before = a.stats().sends_refused;
    let chain = [
        SendRequest {
            destination: Destination::Unicast(to),
            buffer: 0,
            len: 10,
        },
        SendRequest {
            destination: Destination::Unicast(to),
            buffer: 1,
            len: mtu as u32 + 1,
        },
    ];
    let result = a.post_send(&chain);
    ensure!(
        matches!(result, Err(super::TransportError::Oversize { .. })),
        "an oversize request must be refused with Oversize, got {result:?}"
    );
    ensure!(
        a.stats().sends_refused > refused_before,
        "the refusal was not counted"
    );
    expect_silence(b, Duration::from_millis(100))?;
    Ok(())
}

/// Many more datagrams than receive slots flow through when the receiver re-posts as it
/// polls: the ring wraps, and every payload is read intact before its slot is reused.
pub fn ring_wraps_with_reposting<T: Transport>(a: &mut T, b: &mut T) -> Check {
    let slots = b.caps().recv_slots;
    b.post_recv(slots);
    let to = a
        .resolve(&b.local_address())
        .map_err(|error| error.to_string())?;
    let total = slots * 4;
    let window = (slots / 2).clamp(1, 8);
    let mut received = 0usize;
    let mut completions = [RecvCompletion::default(); 16];
    let deadline = Instant::now() + ARRIVAL_TIMEOUT;
    for index in (0..total).step_by(window) {
        let burst = window.min(total - index);
        for offset in 0..burst {
            send_one(a, Destination::Unicast(to), &pattern(5, index + offset, 48))?;
        }
        let mut burst_received = 0;
        while burst_received < burst && Instant::now() < deadline {
            let count = b.poll_recv(&mut completions);
            for completion in &completions[..count] {
                let expected = pattern(5, received, 48);
                ensure!(
                    b.recv_payload(completion) == expected,
                    "datagram {received} altered after wrap"
                );
                received += 1;
                burst_received += 1;
            }
            b.post_recv(count);
        }
    }
    ensure!(received == total, "{received} of {total} datagrams arrived");
    Ok(())
}
