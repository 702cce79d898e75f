//! A fault-injecting wrapper over any transport, in the style of smoltcp's `FaultInjector`:
//! with seeded probabilities it drops, duplicates or delays (reorders) outgoing datagrams.
//! Everything it needs is allocated when it is created; injecting faults allocates nothing.
//!
//! Reordering holds a datagram back in a private pool and sends it after the datagrams of the
//! next post (or after a few idle polls, so a quiet sender does not hold it forever).
//! It touches nothing but the wrapped transport.

#![allow(
    clippy::cast_possible_truncation,
    reason = "lengths, slot indices and counts here are bounded by the MTU, ring and chain sizes checked when the transport is opened, all far below 2^32"
)]

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rzab_shared::EndpointAddress;

use super::{
    Capabilities, MulticastGroup, RecvCompletion, SendRequest, Transport, TransportError,
    TransportStats,
};

/// Probabilities (0.0..=1.0) of each fault, per send request, and the seed that makes a run
/// repeatable.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultConfig {
    pub seed: u64,
    pub drop: f64,
    pub duplicate: f64,
    pub reorder: f64,
    /// Datagrams that can be held back at once.
    pub reorder_capacity: usize,
    /// Polls after which a held datagram goes out even without new sends.
    pub reorder_max_polls: u32,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            seed: 1,
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_capacity: 64,
            reorder_max_polls: 8,
        }
    }
}

/// Faults injected so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

#[derive(Clone, Copy, Debug)]
struct Held<A> {
    request: SendRequest<A>,
    polls: u32,
}

/// `T` with faults injected into its sends.
#[derive(Debug)]
pub struct FaultyTransport<T: Transport> {
    inner: T,
    config: FaultConfig,
    rng: SmallRng,
    /// The chain actually posted (filtered and duplicated), reused every post.
    outgoing: Vec<SendRequest<T::Address>>,
    held: Vec<Held<T::Address>>,
    /// Payloads of held datagrams, `reorder_capacity` slots of one MTU each.
    held_payloads: Vec<u8>,
    stats: FaultStats,
}

impl<T: Transport> FaultyTransport<T> {
    pub fn new(inner: T, config: FaultConfig) -> Self {
        let caps = inner.caps();
        FaultyTransport {
            inner,
            rng: SmallRng::seed_from_u64(config.seed),
            outgoing: Vec::with_capacity(caps.max_chain * 2),
            held: Vec::with_capacity(config.reorder_capacity),
            held_payloads: vec![0; config.reorder_capacity * caps.mtu],
            stats: FaultStats::default(),
            config,
        }
    }

    pub fn fault_stats(&self) -> FaultStats {
        self.stats
    }

    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// Posts `self.outgoing` in chains no longer than the inner limit.
    fn post_outgoing(&mut self) -> Result<(), TransportError> {
        let max_chain = self.inner.caps().max_chain;
        for chunk in self.outgoing.chunks(max_chain) {
            self.inner.post_send(chunk)?;
        }
        self.outgoing.clear();
        Ok(())
    }

    /// Sends every held datagram whose time has come (all of them when `all`).
    fn release_held(&mut self, all: bool) -> Result<(), TransportError> {
        let mtu = self.inner.caps().mtu;
        let max_chain = self.inner.caps().max_chain;
        let mut index = 0;
        while index < self.held.len() {
            if !all && self.held[index].polls < self.config.reorder_max_polls {
                index += 1;
                continue;
            }
            // Fill at most one inner chain of staging buffers per round.
            self.outgoing.clear();
            while index < self.held.len() && self.outgoing.len() < max_chain {
                if !all && self.held[index].polls < self.config.reorder_max_polls {
                    index += 1;
                    continue;
                }
                let held = self.held.swap_remove(index);
                let slot = held.request.buffer as usize;
                let len = held.request.len as usize;
                let staging = self.outgoing.len();
                self.inner.send_buffer(staging)[..len]
                    .copy_from_slice(&self.held_payloads[slot * mtu..slot * mtu + len]);
                self.outgoing.push(SendRequest {
                    buffer: staging as u16,
                    ..held.request
                });
            }
            self.post_outgoing()?;
        }
        Ok(())
    }

    fn free_held_slot(&self) -> Option<usize> {
        (0..self.config.reorder_capacity).find(|slot| {
            !self
                .held
                .iter()
                .any(|held| held.request.buffer as usize == *slot)
        })
    }
}

impl<T: Transport> Transport for FaultyTransport<T> {
    type Address = T::Address;

    fn caps(&self) -> Capabilities {
        self.inner.caps()
    }

    fn local_address(&self) -> EndpointAddress {
        self.inner.local_address()
    }

    fn resolve(&mut self, peer: &EndpointAddress) -> Result<Self::Address, TransportError> {
        self.inner.resolve(peer)
    }

    fn join_multicast(&mut self, group: MulticastGroup) -> Result<(), TransportError> {
        self.inner.join_multicast(group)
    }

    fn multicast_address(
        &mut self,
        group: MulticastGroup,
    ) -> Result<Self::Address, TransportError> {
        self.inner.multicast_address(group)
    }

    fn send_buffer(&mut self, index: usize) -> &mut [u8] {
        self.inner.send_buffer(index)
    }

    fn post_send(&mut self, chain: &[SendRequest<Self::Address>]) -> Result<usize, TransportError> {
        super::validate_chain(chain, &self.inner.caps())?;
        let mtu = self.inner.caps().mtu;
        // Held datagrams from earlier posts go after this post's: that is the reordering.
        let had_held = !self.held.is_empty();
        self.outgoing.clear();
        for request in chain {
            if self.rng.random_bool(self.config.drop) {
                self.stats.dropped += 1;
                continue;
            }
            if self.rng.random_bool(self.config.reorder) {
                if let Some(slot) = self.free_held_slot() {
                    let source = request.buffer as usize;
                    let len = request.len as usize;
                    let payload = &self.inner.send_buffer(source)[..len];
                    self.held_payloads[slot * mtu..slot * mtu + len].copy_from_slice(payload);
                    self.held.push(Held {
                        request: SendRequest {
                            buffer: slot as u16,
                            ..*request
                        },
                        polls: 0,
                    });
                    self.stats.reordered += 1;
                    continue;
                }
            }
            self.outgoing.push(*request);
            if self.rng.random_bool(self.config.duplicate) {
                self.outgoing.push(*request);
                self.stats.duplicated += 1;
            }
        }
        self.post_outgoing()?;
        if had_held {
            self.release_held(true)?;
        }
        Ok(chain.len())
    }

    fn post_recv(&mut self, count: usize) -> usize {
        self.inner.post_recv(count)
    }

    fn posted_recvs(&self) -> usize {
        self.inner.posted_recvs()
    }

    fn poll_recv(&mut self, out: &mut [RecvCompletion]) -> usize {
        if !self.held.is_empty() {
            for held in &mut self.held {
                held.polls += 1;
            }
            // A failure here loses the held datagrams, which is a fault this wrapper may inject.
            let _ = self.release_held(false);
        }
        self.inner.poll_recv(out)
    }

    fn recv_payload(&self, completion: &RecvCompletion) -> &[u8] {
        self.inner.recv_payload(completion)
    }

    fn stats(&self) -> TransportStats {
        self.inner.stats()
    }
}
