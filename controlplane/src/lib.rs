//! rzab-controlplane: the per-node control-plane process of rzab.
//!
//! One process per node, beside the node's data plane, meeting it only in the node's control
//! block. It attaches to the block (and re-attaches when either process restarts), exchanges
//! endpoints with the other nodes' control planes through memcached and writes the remote
//! table, applies cluster-scoped knobs, and serves a REST API (status, knobs, endpoints) and
//! Prometheus metrics read from the block at scrape time. The data plane never waits on it
//! after start-up.
//!
//! Modules: [`options`] (CLI and config), [`attach`] (control block attachment), [`registry`]
//! (memcached exchange), [`knobs`] (knob JSON and validation), [`rest`] (axum routes),
//! [`http`] (connections: timeouts, limit, lingering close, shutdown), [`metrics`]
//! (Prometheus collector), [`openapi`] (API document), [`server`] (wiring), [`state`] (what
//! the parts share), [`inspect`] (one-shot JSON dump).

pub mod attach;
pub mod http;
pub mod inspect;
pub mod knobs;
pub mod metrics;
pub mod openapi;
pub mod options;
pub mod registry;
pub mod rest;
pub mod server;
pub mod state;

pub use options::{Config, Options};
pub use server::ControlPlane;
