//! The cluster knobs document (`...:knobs`, `{version, values}`): how a new version is chosen
//! so that versions never go backwards, how a document's values are validated, and what this
//! control plane has applied ([`KnobsApplied`]: per data-plane instance, the highest version
//! ever, and the newest document, which is put back if the registry loses it).
//!
//! Touches: the attached control block's knobs (when a document is applied) and the workers'
//! `knob_epoch_seen` gauges (read only); no I/O.

use std::sync::atomic::Ordering;

use rzab_shared::{AttachedControlBlock, ControlBlock, KnobError};
use serde::{Deserialize, Serialize};

use crate::knobs::parse_changes;
use crate::state::now_ns;

/// The cluster knobs: every cluster-scoped value set in this run, and a version that grows
/// with every update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KnobsDocument {
    pub schema: u32,
    pub version: u64,
    pub values: serde_json::Map<String, serde_json::Value>,
    pub updated_by: u32,
    pub updated_ns: u64,
}

/// The version a knobs update gets: above the registry's `previous` and above `applied_here`
/// (the highest version this control plane has applied, which the registry may have lost),
/// and at least the wall clock in milliseconds. The clock is what puts a version written
/// after the registry lost the document above versions that only other nodes applied: each
/// version written is the writer's clock or one above an earlier version, so with the
/// writers' clocks roughly in step the clock has passed them all. The other two terms keep
/// versions growing when a clock is behind.
pub fn next_version(previous: u64, applied_here: u64, now_ms: u64) -> u64 {
    previous.max(applied_here).saturating_add(1).max(now_ms)
}

/// Wall-clock milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// What this control plane has applied (kept in [`super::RegistryStatus`]).
#[derive(Debug, Default)]
pub(super) struct KnobsApplied {
    /// The data-plane instance `version` and `epoch` belong to.
    instance: u64,
    /// The cluster knobs version applied to that instance (0: none).
    version: u64,
    /// That block's knob epoch right after `version` was applied: once every worker has seen
    /// it, the version is in force.
    epoch: u64,
    /// The highest version applied to any instance: new versions must exceed it even when the
    /// registry has lost the document.
    highest: u64,
    /// The newest document applied, put back if the registry loses it.
    document: Option<KnobsDocument>,
}

/// highest version it applied.
#[derive(Clone, Debug, Default)]
pub struct KnobsBase {
    pub document: Option<KnobsDocument>,
    pub highest: u64,
}

/// What [`super::RegistryStatus::apply_knobs`] did with a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnobsApply {
    /// Newer than what the data plane had: written to the block.
    Applied,
    /// This very version was already applied (by the registry worker's poll, say).
    AlreadyApplied,
    /// Older than the version already applied, which stays in force.
    Superseded { applied: u64 },
}

/// The values of a knobs document, validated whole (same rules as a PATCH body).
pub fn document_changes(document: &KnobsDocument) -> Result<Vec<(rzab_shared::Knob, u64)>, String> {
    parse_changes(&serde_json::Value::Object(document.values.clone()))
        .map(|changes| {
            changes
                .into_iter()
                .map(|(knob, raw, _)| (knob, raw))
                .collect()
        })
        .map_err(|error| error.message)
}

impl KnobsApplied {
    /// The version applied to the data plane instance `instance` (0: none).
    pub(super) fn version_for(&self, instance: u64) -> u64 {
        if self.instance == instance {
            self.version
        } else {
            0
        }
    }

    /// The version applied to `block`'s data plane and whether every worker has picked it up
    /// (its knob epoch reached the one right after the apply).
    pub(super) fn in_force(&self, block: &ControlBlock) -> (u64, bool) {
        let instance = block.header.instance.load(Ordering::Relaxed);
        if self.instance != instance || self.version == 0 {
            return (0, true);
        }
        let seen = (0..block.worker_count()).all(|worker| {
            block
                .worker(worker as usize)
                .gauges
                .knob_epoch_seen
                .load(Ordering::Acquire)
                >= self.epoch
        });
        (self.version, seen)
    }

    /// What a knobs update builds on.
    pub(super) fn base(&self) -> KnobsBase {
        KnobsBase {
            document: self.document.clone(),
            highest: self.highest,
        }
    }

    /// Applies `document` to `block` if it is newer than what that data plane instance has,
    /// and says what it did. A document whose values are refused is skipped (and counted as
    /// seen) so that one bad write does not block later ones.
    pub(super) fn apply(
        &mut self,
        block: &AttachedControlBlock,
        document: &KnobsDocument,
    ) -> Result<KnobsApply, String> {
        let instance = block.header.instance.load(Ordering::Relaxed);
        if self.instance != instance {
            self.instance = instance;
            self.version = 0;
            self.epoch = 0;
        }
        if document.version == self.version {
            return Ok(KnobsApply::AlreadyApplied);
        }
        if document.version < self.version {
            return Ok(KnobsApply::Superseded {
                applied: self.version,
            });
        }
        self.version = document.version;
        self.highest = self.highest.max(document.version);
        let changes = document_changes(document)?;
        block
            .set_knobs(&changes)
            .map_err(|error: KnobError| error.to_string())?;
        self.epoch = block.knob_epoch();
        self.document = Some(document.clone());
        Ok(KnobsApply::Applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_grow_past_the_registry_what_was_applied_here_and_the_clock() {
        assert_eq!(next_version(3, 0, 0), 4);
        // The registry lost the document (previous 0) after version 3 was applied here.
        assert_eq!(next_version(0, 3, 0), 4);
        assert_eq!(next_version(0, 0, 1_700_000_000_000), 1_700_000_000_000);
        // A clock behind the versions written so far does not pull them back.
        assert_eq!(
            next_version(1_700_000_000_005, 0, 1_700_000_000_000),
            1_700_000_000_006
        );
        assert_eq!(next_version(u64::MAX, 0, 0), u64::MAX);
    }
}
