//! rzab-dataplane: the busy-polling data plane of an rzab node.
//!
//! Today it holds the transport layer ([`transport`]): a trait that mirrors RDMA UD verbs and
//! its backends (shared-memory fabric, kernel UDP, verbs) plus a fault-injecting wrapper.

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
