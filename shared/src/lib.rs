//! rzab-shared: the one definition of everything the data plane and the control plane of a node
//! agree on. It holds the control block (a versioned `#[repr(C)]` layout of atomics in a
//! shared-memory file), the live knobs with their validation, the per-worker counters and
//! histograms, and the typed endpoint records that nodes exchange through the registry.
//!
//! This crate touches only files it is told to open (the control block) and memory; it never
//! does network I/O and never starts threads.

pub mod control_block;
pub mod counters;
pub mod endpoint;
pub mod knobs;
pub mod limits;

pub use control_block::{
    AttachedControlBlock, ControlBlock, ControlBlockError, ControlBlockInit, Lifecycle,
    OwnedControlBlock, RegistryState, SyncState,
};
pub use counters::{Counter, Histogram, HistogramSnapshot, Percentiles};
pub use endpoint::{EndpointAddress, EndpointDecodeError, EndpointRecord, TransportKind};
pub use knobs::{Knob, KnobError, KnobKind, KnobSpec};
