//! The registry's keys and the records a control plane publishes about its node: the node
//! record (endpoints, URLs, heartbeat, knobs applied) and the ready key written after it, with
//! their JSON encoding and the check that a peer's record fits this node's block.
//!
//! Pure data and pure functions: touches nothing.

use rzab_shared::endpoint::ENDPOINT_SCHEMA_VERSION;
use rzab_shared::{EndpointRecord, TransportKind};
use serde::{Deserialize, Serialize};

use super::{RECORD_SCHEMA, RegistryError};

/// The keys of one run: `rzab:{cluster}:{generation}:...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(cluster: &str, generation: &str) -> Self {
        Keys {
            prefix: format!("rzab:{cluster}:{generation}"),
        }
    }

    /// A node's record.
    pub fn node(&self, node: u32) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    /// A node's ready key, written after its record.
    pub fn ready(&self, node: u32) -> String {
        format!("{}:ready:{node}", self.prefix)
    }

    /// The cluster knobs document.
    pub fn knobs(&self) -> String {
        format!("{}:knobs", self.prefix)
    }
}

/// What a control plane publishes about its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub schema: u32,
    pub cluster: String,
    pub generation: String,
    pub node: u32,
    pub nodes: u32,
    pub workers: u32,
    /// The data plane's instance (changes with every data-plane start).
    pub instance: u64,
    pub transport: TransportKind,
    /// One record per worker, in worker order.
    pub endpoints: Vec<EndpointRecord>,
    pub rest_url: String,
    pub metrics_url: String,
    /// Wall-clock nanoseconds of the last refresh.
    pub heartbeat_ns: u64,
    /// The cluster knobs version this node has applied (0: none).
    pub knobs_version: u64,
    /// Whether every worker of this node's data plane has picked `knobs_version` up (true for
    /// version 0). Absent in older records: not in force.
    #[serde(default)]
    pub knobs_in_force: bool,
    pub controlplane_pid: u32,
    pub dataplane_pid: u32,
}

/// Written after the node record: the record of this instance is complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyRecord {
    pub schema: u32,
    pub node: u32,
    pub instance: u64,
    pub heartbeat_ns: u64,
}

impl NodeRecord {
    /// Why this record, read under `node`'s key, cannot be used with the node whose own
    /// record is `local`, if it cannot: another schema, node, cluster or generation, another
    /// shape (nodes x workers) or transport, or endpoint records that do not match.
    pub fn incompatibility(&self, node: u32, local: &NodeRecord) -> Option<String> {
        if self.schema != RECORD_SCHEMA {
            return Some(format!(
                "record schema {} (this build reads {RECORD_SCHEMA})",
                self.schema
            ));
        }
        if self.node != node || self.cluster != local.cluster || self.generation != local.generation
        {
            return Some(format!(
                "record names node {} of cluster `{}` generation `{}`",
                self.node, self.cluster, self.generation
            ));
        }
        if self.nodes != local.nodes || self.workers != local.workers {
            return Some(format!(
                "{} nodes x {} workers, this node has {} x {}",
                self.nodes, self.workers, local.nodes, local.workers
            ));
        }
        if self.transport != local.transport {
            return Some(format!(
                "transport {}, this node uses {}",
                self.transport.name(),
                local.transport.name()
            ));
        }
        let complete = self.endpoints.len() == self.workers as usize
            && self.endpoints.iter().enumerate().all(|(index, endpoint)| {
                endpoint.schema == ENDPOINT_SCHEMA_VERSION
                    && u32::from(endpoint.node) == node
                    && usize::from(endpoint.worker) == index
                    && endpoint.address.transport() == local.transport
            });
        if !complete {
            return Some("its endpoint records are incomplete or inconsistent".to_owned());
        }
        None
    }
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    text: &str,
) -> Result<T, RegistryError> {
    serde_json::from_str(text).map_err(|error| RegistryError::BadDocument {
        key: key.to_owned(),
        reason: error.to_string(),
    })
}

pub(super) fn encode<T: Serialize>(key: &str, value: &T) -> Result<String, RegistryError> {
    serde_json::to_string(value).map_err(|error| RegistryError::BadDocument {
        key: key.to_owned(),
        reason: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_by_cluster_and_generation() {
        let keys = Keys::new("c", "17");
        assert_eq!(keys.node(2), "rzab:c:17:node:2");
        assert_eq!(keys.ready(2), "rzab:c:17:ready:2");
        assert_eq!(keys.knobs(), "rzab:c:17:knobs");
        assert_ne!(Keys::new("c", "18").node(2), keys.node(2));
    }
}
