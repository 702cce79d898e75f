//! The transport layer: a trait that mirrors RDMA UD verbs so the protocol above runs unchanged
//! on every backend, and the backends themselves.
//!
//! Semantics every backend keeps (the conformance suite, `conformance` with the `testing`
//! feature, run by `tests/transport_conformance.rs`, checks them):
//! - **Registered buffers.** A transport allocates its send and receive buffers once, at
//!   creation. Nothing on the data path allocates.
//! - **Receive ring.** A transport owns `recv_slots` receive buffers used as a ring. Initially
//!   none is posted. [`Transport::post_recv`] posts the `n` oldest unposted buffers (all of them
//!   are unposted at the start; afterwards, the ones the caller has polled longest ago). A buffer
//!   returned by [`Transport::poll_recv`] stays readable through [`Transport::recv_payload`] until
//!   the caller posts it again, which happens after it has posted every buffer it polled before.
//!   Callers therefore re-post in the order they polled, as a verbs receive queue consumes.
//! - **Drop on no posted receive.** A datagram that arrives while its receiver has no posted
//!   buffer is dropped and counted in [`TransportStats::dropped_no_recv`]. Nothing retransmits.
//! - **Chained sends.** The caller fills up to `max_chain` staging buffers
//!   ([`Transport::send_buffer`]) and posts them as one chain of [`SendRequest`]s (one doorbell).
//!   Several requests may name the same staging buffer (unicast fan-out). Once `post_send`
//!   returns, the staging buffers may be refilled; backends that send zero-copy keep the data in
//!   their own rings until completion.
//! - **MTU.** A request longer than `caps().mtu` is refused with [`TransportError::Oversize`]
//!   before anything in the chain is sent.
//! - **Multicast.** [`Transport::join_multicast`] subscribes this endpoint to a group;
//!   [`Transport::multicast_address`] gives an address that reaches every member but the sender.
//!
//! Backends: [`shm`] (shared-memory fabric, the default for local runs), [`udp`] (kernel UDP),
//! `verbs` (feature `verbs`, RDMA UD queue pairs), and the [`fault`] wrapper over any of them.
//!
//! This layer imports nothing above it (no protocol, worker or node types): wrappers that need
//! to understand datagrams, like the corpus capture, live in the node layer
//! (`crate::capture`).

// Test support, out of the production library: see the `testing` feature in Cargo.toml.
#[cfg(feature = "testing")]
pub mod conformance;
pub mod fault;
pub mod shm;
pub mod udp;
#[cfg(feature = "verbs")]
pub mod verbs;

use rzab_shared::EndpointAddress;

/// A multicast group, numbered by the cluster configuration (each backend maps it to its own
/// addressing: a fabric group, an IPv4 class-D address, an IB multicast GID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MulticastGroup(pub u16);

/// What a transport can do; fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Largest payload of one datagram, in bytes.
    pub mtu: usize,
    /// Largest payload sent inline (copied at post time on hardware), in bytes.
    pub max_inline: usize,
    /// Most requests (and staging buffers) in one posted chain.
    pub max_chain: usize,
    /// Receive buffers in the ring.
    pub recv_slots: usize,
}

/// Where a send request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination<A> {
    /// One resolved peer.
    Unicast(A),
    /// Every member of a multicast group except the sender.
    Multicast(A),
}

/// One work request of a send chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendRequest<A> {
    pub destination: Destination<A>,
    /// Index of the staging buffer, below `caps().max_chain`.
    pub buffer: u16,
    /// Bytes of the staging buffer to send.
    pub len: u32,
}

/// One completed receive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvCompletion {
    /// The receive buffer holding the datagram; read it with [`Transport::recv_payload`].
    pub slot: u32,
    /// Bytes received.
    pub len: u32,
}

/// Running totals a transport keeps about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    /// Datagrams that arrived for this endpoint while it had no posted receive.
    pub dropped_no_recv: u64,
    /// Datagrams received but unusable: larger than the MTU (cut short by the kernel).
    pub dropped_malformed: u64,
    /// Receive positions a sender reserved and never wrote, skipped (shm: a sender killed
    /// mid-send).
    pub holes_skipped: u64,
    /// Send requests refused (oversize, unknown group, ...).
    pub sends_refused: u64,
    /// Doorbells rung (posted chains).
    pub doorbells: u64,
}

/// Errors of the transport layer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("datagram of {len} bytes exceeds the MTU of {mtu} bytes")]
    Oversize { len: usize, mtu: usize },
    #[error("chain of {len} requests exceeds the limit of {max}")]
    ChainTooLong { len: usize, max: usize },
    #[error("staging buffer {buffer} does not exist (the chain limit is {max})")]
    BadBuffer { buffer: usize, max: usize },
    #[error("endpoint {0:?} belongs to another transport")]
    ForeignEndpoint(EndpointAddress),
    #[error("no such peer: {0}")]
    UnknownPeer(String),
    #[error("multicast group {0}: {1}")]
    Multicast(u16, String),
    #[error("shared-memory fabric {path}: {reason}")]
    Fabric { path: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unavailable(String),
}

impl TransportError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TransportError {
        let context = context.into();
        move |source| TransportError::Io { context, source }
    }
}

/// A UD-like datagram endpoint. Workers are generic over it (static dispatch).
pub trait Transport {
    /// A resolved destination (an address handle); cheap to copy.
    type Address: Copy + Eq + std::fmt::Debug;

    fn caps(&self) -> Capabilities;

    /// This endpoint's address, to publish to peers.
    fn local_address(&self) -> EndpointAddress;

    /// Turns a peer's published address into a destination (creates an address handle).
    fn resolve(&mut self, peer: &EndpointAddress) -> Result<Self::Address, TransportError>;

    /// Subscribes this endpoint to a multicast group.
    fn join_multicast(&mut self, group: MulticastGroup) -> Result<(), TransportError>;

    /// A destination that reaches every member of the group but the sender.
    fn multicast_address(&mut self, group: MulticastGroup)
    -> Result<Self::Address, TransportError>;

    /// Staging buffer `index` (below `caps().max_chain`), `caps().mtu` bytes long.
    fn send_buffer(&mut self, index: usize) -> &mut [u8];

    /// Posts a chain of sends with one doorbell. Returns how many requests were accepted; the
    /// chain is checked whole first, so an error means nothing was sent.
    fn post_send(&mut self, chain: &[SendRequest<Self::Address>]) -> Result<usize, TransportError>;

    /// Posts the `count` oldest unposted receive buffers; returns how many were posted (fewer
    /// when fewer are unposted).
    fn post_recv(&mut self, count: usize) -> usize;

    /// Receive buffers posted and not yet completed.
    fn posted_recvs(&self) -> usize;

    /// Moves up to `out.len()` receive completions into `out`; returns how many.
    fn poll_recv(&mut self, out: &mut [RecvCompletion]) -> usize;

    /// The payload of a completed receive that has not been re-posted.
    fn recv_payload(&self, completion: &RecvCompletion) -> &[u8];

    fn stats(&self) -> TransportStats;
}

/// Checks a chain against the capabilities; shared by every backend so they refuse alike.
pub(crate) fn validate_chain<A>(
    chain: &[SendRequest<A>],
    caps: &Capabilities,
) -> Result<(), TransportError> {
    if chain.len() > caps.max_chain {
        return Err(TransportError::ChainTooLong {
            len: chain.len(),
            max: caps.max_chain,
        });
    }
    for request in chain {
        if usize::from(request.buffer) >= caps.max_chain {
            return Err(TransportError::BadBuffer {
                buffer: usize::from(request.buffer),
                max: caps.max_chain,
            });
        }
        let len = request.len as usize;
        if len > caps.mtu {
            return Err(TransportError::Oversize { len, mtu: caps.mtu });
        }
    }
    Ok(())
}
