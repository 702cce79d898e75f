//! rzab-dataplane: the busy-polling data plane of an rzab node, from the wire to the store.
//!
//! - [`transport`]: a trait that mirrors RDMA UD verbs and its backends (shared-memory fabric,
//!   kernel UDP, verbs with the `verbs` feature) plus a fault-injecting wrapper; it imports
//!   nothing above it;
//! - [`zab`]: ZAB's broadcast with loss recovery and follower catch-up, as a pure state machine
//!   per pipeline, and its wire format; it applies writes through its `Replica` trait;
//! - [`store`]: the replicated key-value table every worker reads locally, lock-free;
//! - [`replica`]: the node-wide apply order over the store (zab's `Replica`), with a digest of
//!   everything applied;
//! - [`workload`]: the emulated clients (pre-built traces replayed by sessions in each worker);
//! - [`worker`]: one pinned thread per pipeline running the poll loop over a transport;
//! - [`node`]: one node: the control block, replica, transports and workers, stats and the
//!   summary; configured by [`config`] (options, TOML file, checks).
//!
//! Beside them: [`history`] (recorded client histories for the consistency checker),
//! [`capture`] and [`pipeline_input`] (recording real datagrams as fuzzing seeds, and their
//! format), and, with the `testing` feature only, the fuzzing harnesses (`fuzzing`) and the
//! transport conformance suite (`transport::conformance`).

pub mod capture;
pub mod config;
// Test support, out of the production library: see the `testing` feature in Cargo.toml.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod node;
pub mod pipeline_input;
pub mod replica;
pub mod store;
pub mod transport;
pub mod worker;
pub mod workload;
pub mod zab;
