//! The registry side of the control plane's shared state ([`RegistryStatus`]): the worker's
//! state and detail, the peers as it sees them, the live client for REST handlers, and the
//! cluster knobs applied here. Written by the worker (and by REST when it applies knobs),
//! read by REST and the metrics.
//!
//! Touches: the attached control block's knobs, through [`RegistryStatus::apply_knobs`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use rzab_shared::{AttachedControlBlock, ControlBlock, RegistryState};
use serde::Serialize;
use utoipa::ToSchema;

use super::RegistryClient;
use super::cluster_knobs::{KnobsApplied, KnobsApply, KnobsBase, KnobsDocument};

/// One peer as the status shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct PeerView {
    pub node: u32,
    /// True once this peer's record has been accepted (its endpoints are in the remote table
    /// once every node is known).
    pub known: bool,
    /// The accepted data-plane instance, in hex.
    pub instance: Option<String>,
    /// Whether the peer's record is in the registry right now.
    pub record_present: bool,
    /// Age of the newest record seen, in seconds.
    pub heartbeat_age_seconds: Option<f64>,
    pub rest_url: Option<String>,
    /// The cluster knobs version the peer reports having applied.
    pub knobs_version: Option<u64>,
    /// Why the peer's current record is not (or not yet) taken.
    pub note: Option<String>,
}

/// The registry side of the shared state: what the worker reports and what REST reads.
#[derive(Debug, Default)]
pub struct RegistryStatus {
    pub(super) state: AtomicU32,
    detail: Mutex<String>,
    peers: Mutex<Vec<PeerView>>,
    client: Mutex<Option<RegistryClient>>,
    knobs: Mutex<KnobsApplied>,
}

impl RegistryStatus {
    pub fn state(&self) -> RegistryState {
        RegistryState::from_code(self.state.load(Ordering::Acquire))
    }

    /// What the registry exchange is waiting for, or its last error.
    pub fn detail(&self) -> String {
        self.detail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn peers(&self) -> Vec<PeerView> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A client on the live registry connection, if there is one.
    pub fn client(&self) -> Option<RegistryClient> {
        self.client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn set_client(&self, client: Option<RegistryClient>) {
        *self.client.lock().unwrap_or_else(PoisonError::into_inner) = client;
    }

    pub(super) fn set_detail(&self, detail: String) {
        *self.detail.lock().unwrap_or_else(PoisonError::into_inner) = detail;
    }

    pub(super) fn set_peers(&self, peers: Vec<PeerView>) {
        *self.peers.lock().unwrap_or_else(PoisonError::into_inner) = peers;
    }

    /// The cluster knobs version applied to the data plane instance `instance` (0: none).
    pub fn knobs_version(&self, instance: u64) -> u64 {
        self.knobs().version_for(instance)
    }

    /// The cluster knobs version applied to `block`'s data plane and whether every worker has
    /// picked it up (its knob epoch reached the one right after the apply).
    pub fn knobs_in_force(&self, block: &ControlBlock) -> (u64, bool) {
        self.knobs().in_force(block)
    }

    /// What a knobs update builds on (see [`RegistryClient::update_knobs`]).
    pub fn knobs_base(&self) -> KnobsBase {
        self.knobs().base()
    }

    /// Applies a cluster knobs document to `block` if it is newer than what that data plane
    /// instance has, and says what it did. A document whose values are refused is skipped
    /// (and counted as seen) so that one bad write does not block later ones.
    pub fn apply_knobs(
        &self,
        block: &AttachedControlBlock,
        document: &KnobsDocument,
    ) -> Result<KnobsApply, String> {
        self.knobs().apply(block, document)
    }

    fn knobs(&self) -> std::sync::MutexGuard<'_, KnobsApplied> {
        self.knobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
