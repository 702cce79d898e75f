//! The registry's storage: the [`Store`] trait (the few memcached operations the registry
//! uses), [`MemcachedStore`] (the memcache crate's blocking client), [`Connector`] (how the
//! worker opens a store, so tests can hand it an in-memory one), and [`RegistryClient`], which
//! reads and writes the registry's documents through a store: the knobs document with
//! `gets`/`cas` merging, and its restoration with `add`.
//!
//! Touches: the memcached server through [`MemcachedStore`] (only the keys it is given); no
//! control block.

use std::collections::HashMap;
use std::sync::Arc;

use memcache::MemcacheError;

use super::cluster_knobs::{KnobsBase, KnobsDocument, next_version, now_ms};
use super::records::{Keys, decode, encode};
use super::{CAS_ATTEMPTS, CONNECT_TIMEOUT, KNOBS_TTL_SECONDS, RECORD_SCHEMA, RegistryError};
use crate::options::RegistryAddress;
use crate::state::now_ns;

/// The memcached operations the registry relies on, with memcached's semantics: a TTL of 0
/// never expires; `add` stores only when the key is absent (and does not say whether it
/// did); `cas` stores only when the key still has the CAS id `gets` returned, and answers
/// false when it does not (or the key is gone).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// One key's value.
    fn get(&self, key: &str) -> Result<Option<String>, MemcacheError>;
    /// One key's value and CAS id (`None` if the server gave none).
    fn gets(&self, key: &str) -> Result<Option<(String, Option<u64>)>, MemcacheError>;
    /// Several keys' values at once (missing keys are absent from the map).
    fn get_many(&self, keys: &[&str]) -> Result<HashMap<String, String>, MemcacheError>;
    fn set(&self, key: &str, value: &str, ttl_seconds: u32) -> Result<(), MemcacheError>;
    /// Stores `value` if `key` is absent.
    fn add(&self, key: &str, value: &str, ttl_seconds: u32) -> Result<(), MemcacheError>;
    /// Stores `value` if `key` still has the CAS id `cas`; whether it did.
    fn cas(
        &self,
        key: &str,
        value: &str,
        ttl_seconds: u32,
        cas: u64,
    ) -> Result<bool, MemcacheError>;
    /// Renews a key's lifetime; false if it does not exist.
    fn touch(&self, key: &str, ttl_seconds: u32) -> Result<bool, MemcacheError>;
    /// Deletes a key; false if it did not exist.
    fn delete(&self, key: &str) -> Result<bool, MemcacheError>;
}

/// A memcached server through the memcache crate's blocking client (ASCII protocol).
pub struct MemcachedStore {
    client: memcache::Client,
}

impl std::fmt::Debug for MemcachedStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MemcachedStore")
            .finish_non_exhaustive()
    }
}

impl MemcachedStore {
    /// Connects to `address` (one attempt, bounded by a short timeout) and checks the server
    /// answers.
    pub fn connect(address: &str) -> Result<Self, MemcacheError> {
        // ASCII protocol (gets/cas everywhere); socket timeouts so a hung server cannot stall
        // the worker for long.
        let url = format!("memcache://{address}?protocol=ascii&timeout=1&tcp_nodelay=true");
        let client = memcache::Client::builder()
            .add_server(url)?
            .with_max_pool_size(2)
            .with_min_idle_conns(1)
            .with_connection_timeout(CONNECT_TIMEOUT)
            .build()?;
        client.version()?;
        Ok(MemcachedStore { client })
    }
}

impl Store for MemcachedStore {
    fn get(&self, key: &str) -> Result<Option<String>, MemcacheError> {
        self.client.get(key)
    }

    fn gets(&self, key: &str) -> Result<Option<(String, Option<u64>)>, MemcacheError> {
        let found: Option<(String, u32, Option<u64>)> = self.client.get(key)?;
        Ok(found.map(|(text, _flags, cas)| (text, cas)))
    }

    fn get_many(&self, keys: &[&str]) -> Result<HashMap<String, String>, MemcacheError> {
        self.client.gets(keys)
    }

    fn set(&self, key: &str, value: &str, ttl_seconds: u32) -> Result<(), MemcacheError> {
        self.client.set(key, value, ttl_seconds)
    }

    fn add(&self, key: &str, value: &str, ttl_seconds: u32) -> Result<(), MemcacheError> {
        self.client.add(key, value, ttl_seconds)
    }

    fn cas(
        &self,
        key: &str,
        value: &str,
        ttl_seconds: u32,
        cas: u64,
    ) -> Result<bool, MemcacheError> {
        self.client.cas(key, value, ttl_seconds, cas)
    }

    fn touch(&self, key: &str, ttl_seconds: u32) -> Result<bool, MemcacheError> {
        self.client.touch(key, ttl_seconds)
    }

    fn delete(&self, key: &str) -> Result<bool, MemcacheError> {
        self.client.delete(key)
    }
}

/// How the registry worker opens its connection to the registry (once at start, and again
/// after losing it).
pub trait Connector: Send + std::fmt::Debug {
    fn connect(&mut self, address: &RegistryAddress) -> Result<RegistryClient, RegistryError>;
}

/// Connects to the memcached server at the configured address.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemcachedConnector;

impl Connector for MemcachedConnector {
    fn connect(&mut self, address: &RegistryAddress) -> Result<RegistryClient, RegistryError> {
        RegistryClient::connect(address)
    }
}

/// A blocking client for the registry's documents, over any [`Store`]; cheap to clone.
#[derive(Clone)]
pub struct RegistryClient {
    store: Arc<dyn Store>,
    address: String,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RegistryClient")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// Connects to memcached (one attempt, bounded by a short timeout) and checks the server
    /// answers.
    pub fn connect(address: &RegistryAddress) -> Result<Self, RegistryError> {
        let text = address.to_string();
        match MemcachedStore::connect(&text) {
            Ok(store) => Ok(RegistryClient::new(Arc::new(store), text)),
            Err(source) => Err(RegistryError::Memcache {
                address: text,
                source,
            }),
        }
    }

    /// A client over `store`; `address` names it in errors and logs.
    pub fn new(store: Arc<dyn Store>, address: String) -> Self {
        RegistryClient { store, address }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn failed(&self, source: MemcacheError) -> RegistryError {
        RegistryError::Memcache {
            address: self.address.clone(),
            source,
        }
    }

    /// One key's value.
    pub fn get(&self, key: &str) -> Result<Option<String>, RegistryError> {
        self.store.get(key).map_err(|error| self.failed(error))
    }

    /// Several keys' values at once (missing keys are absent from the map).
    pub fn get_many(&self, keys: &[String]) -> Result<HashMap<String, String>, RegistryError> {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.store
            .get_many(&keys)
            .map_err(|error| self.failed(error))
    }

    pub fn set(&self, key: &str, value: &str, ttl_seconds: u32) -> Result<(), RegistryError> {
        self.store
            .set(key, value, ttl_seconds)
            .map_err(|error| self.failed(error))
    }

    /// Renews a key's lifetime; false if it does not exist.
    pub fn touch(&self, key: &str, ttl_seconds: u32) -> Result<bool, RegistryError> {
        self.store
            .touch(key, ttl_seconds)
            .map_err(|error| self.failed(error))
    }

    /// Deletes a key (for tests and tools).
    pub fn delete(&self, key: &str) -> Result<bool, RegistryError> {
        self.store.delete(key).map_err(|error| self.failed(error))
    }

    /// The cluster knobs document, if there is one.
    pub fn read_knobs(&self, keys: &Keys) -> Result<Option<KnobsDocument>, RegistryError> {
        let key = keys.knobs();
        self.get(&key)?.map(|text| decode(&key, &text)).transpose()
    }

    /// Puts a knobs document back if the registry has none (`add`: if another control plane
    /// was first, its document stays).
    pub fn restore_knobs(
        &self,
        keys: &Keys,
        document: &KnobsDocument,
    ) -> Result<(), RegistryError> {
        let key = keys.knobs();
        self.store
            .add(&key, encode(&key, document)?.as_str(), KNOBS_TTL_SECONDS)
            .map_err(|error| self.failed(error))
    }

    /// Merges `changes` into the cluster knobs document as a new version (see
    /// [`next_version`]; `base` is what this control plane applied last), without losing a
    /// concurrent update: `gets` + `cas`. A missing document is first put back from
    /// `base.document` (or created empty, version 0) with `add`; it does not matter whose `add`
    /// wins (the memcache client does not say), the real write is always a `cas`.
    pub fn update_knobs(
        &self,
        keys: &Keys,
        changes: &serde_json::Map<String, serde_json::Value>,
        node: u32,
        base: &KnobsBase,
    ) -> Result<KnobsDocument, RegistryError> {
        let key = keys.knobs();
        for _ in 0..CAS_ATTEMPTS {
            let current = self.store.gets(&key).map_err(|error| self.failed(error))?;
            let Some((text, cas)) = current else {
                let seed = base.document.clone().unwrap_or_else(|| KnobsDocument {
                    schema: RECORD_SCHEMA,
                    version: 0,
                    values: serde_json::Map::new(),
                    updated_by: node,
                    updated_ns: now_ns(),
                });
                self.restore_knobs(keys, &seed)?;
                continue;
            };
            let Some(cas) = cas else {
                return Err(RegistryError::BadDocument {
                    key,
                    reason: "the server returned no CAS id".to_owned(),
                });
            };
            let previous: KnobsDocument = decode(&key, &text)?;
            let mut values = previous.values;
            for (name, value) in changes {
                values.insert(name.clone(), value.clone());
            }
            let document = KnobsDocument {
                schema: RECORD_SCHEMA,
                version: next_version(previous.version, base.highest, now_ms()),
                values,
                updated_by: node,
                updated_ns: now_ns(),
            };
            if self
                .store
                .cas(
                    &key,
                    encode(&key, &document)?.as_str(),
                    KNOBS_TTL_SECONDS,
                    cas,
                )
                .map_err(|error| self.failed(error))?
            {
                return Ok(document);
            }
        }
        Err(RegistryError::Contended {
            key,
            attempts: CAS_ATTEMPTS,
        })
    }
}
