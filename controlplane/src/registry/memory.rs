//! An in-memory [`Store`] for unit tests, with memcached's semantics for the operations the
//! registry uses (TTLs, `add` only when absent, CAS ids that change with every write), and the
//! failures the tests need: a server that is down, a server restarted empty, a key that
//! expired, and another writer slipping in between a `gets` and its `cas`. [`MemoryConnector`]
//! opens clients on one such store for a [`super::RegistryWorker`].
//!
//! Touches nothing outside itself.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use memcache::MemcacheError;

use super::RegistryError;
use super::client::{Connector, RegistryClient, Store};
use crate::options::RegistryAddress;

#[derive(Debug)]
struct Entry {
    value: String,
    cas: u64,
    ttl_seconds: u32,
    expires: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    next_cas: u64,
    down: bool,
    /// Writes another client makes right before the next `cas` calls, one per call.
    before_cas: VecDeque<(String, String)>,
    /// `set` calls per key.
    sets: HashMap<String, u32>,
}

impl Inner {
    fn live(&mut self, key: &str) -> Option<&Entry> {
        let expired = self
            .entries
            .get(key)
            .is_some_and(|entry| entry.expires.is_some_and(|at| at <= Instant::now()));
        if expired {
            self.entries.remove(key);
        }
        self.entries.get(key)
    }

    fn store(&mut self, key: &str, value: &str, ttl_seconds: u32) {
        self.next_cas += 1;
        let expires =
            (ttl_seconds > 0).then(|| Instant::now() + Duration::from_secs(u64::from(ttl_seconds)));
        self.entries.insert(
            key.to_owned(),
            Entry {
                value: value.to_owned(),
                cas: self.next_cas,
                ttl_seconds,
                expires,
            },
        );
    }
}

/// The in-memory registry.
#[derive(Debug, Default)]
pub(super) struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(MemoryStore::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reachable(&self) -> Result<MutexGuard<'_, Inner>, MemcacheError> {
        let inner = self.lock();
        if inner.down {
            return Err(MemcacheError::from(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the in-memory registry is down",
            )));
        }
        Ok(inner)
    }

    /// Makes every operation (and every connection attempt) fail, or work again.
    pub(super) fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    pub(super) fn is_down(&self) -> bool {
        self.lock().down
    }

    /// Forgets every key, as a restarted memcached does.
    pub(super) fn restart_empty(&self) {
        self.lock().entries.clear();
    }

    /// Lets `key` expire now.
    pub(super) fn expire(&self, key: &str) {
        self.lock().entries.remove(key);
    }

    /// `key`'s value, if it is there (whether the store is down or not).
    pub(super) fn value(&self, key: &str) -> Option<String> {
        self.lock().live(key).map(|entry| entry.value.clone())
    }

    /// The TTL `key` was last written or touched with.
    pub(super) fn ttl(&self, key: &str) -> Option<u32> {
        self.lock().live(key).map(|entry| entry.ttl_seconds)
    }

    /// How many times `key` was `set`.
    pub(super) fn sets(&self, key: &str) -> u32 {
        self.lock().sets.get(key).copied().unwrap_or(0)
    }

    /// Writes `value` under `key`, as another client does, right before the next `cas`.
    pub(super) fn write_before_next_cas(&self, key: &str, value: &str) {
        self.lock()
            .before_cas
            .push_back((key.to_owned(), value.to_owned()));
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<String>, MemcacheError> {
        Ok(self.reachable()?.live(key).map(|entry| entry.value.clone()))
    }

    fn gets(&self, key: &str) -> Result<Option<(String, Option<u64>)>, MemcacheError> {
        Ok(self
            .reachable()?
            .live(key)
            .map(|entry| (entry.value.clone(), Some(entry.cas))))
    }

    fn get_many(&self, keys: &[&str]) -> Result<HashMap<String, String>, MemcacheError> {
        let mut inner = self.reachable()?;
        Ok(keys
            .iter()
            .filter_map(|key| {
                inner
                    .live(key)
                    .map(|entry| ((*key).to_owned(), entry.value.clone()))
            })
            .collect())
    }

    fn set(&self, key: &str, value: &str, ttl_seconds: u32) -> Result<(), MemcacheError> {
        let mut inner = self.reachable()?;
        *inner.sets.entry(key.to_owned()).or_default() += 1;
        inner.store(key, value, ttl_seconds);
        Ok(())
    }

    fn add(&self, key: &str, value: &str, ttl_seconds: u32) -> Result<(), MemcacheError> {
        let mut inner = self.reachable()?;
        if inner.live(key).is_none() {
            inner.store(key, value, ttl_seconds);
        }
        Ok(())
    }

    fn cas(
        &self,
        key: &str,
        value: &str,
        ttl_seconds: u32,
        cas: u64,
    ) -> Result<bool, MemcacheError> {
        let mut inner = self.reachable()?;
        if let Some((other_key, other_value)) = inner.before_cas.pop_front() {
            inner.store(&other_key, &other_value, ttl_seconds);
        }
        if inner.live(key).is_some_and(|entry| entry.cas == cas) {
            inner.store(key, value, ttl_seconds);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn touch(&self, key: &str, ttl_seconds: u32) -> Result<bool, MemcacheError> {
        let mut inner = self.reachable()?;
        if inner.live(key).is_none() {
            return Ok(false);
        }
        let expires =
            (ttl_seconds > 0).then(|| Instant::now() + Duration::from_secs(u64::from(ttl_seconds)));
        if let Some(entry) = inner.entries.get_mut(key) {
            entry.ttl_seconds = ttl_seconds;
            entry.expires = expires;
        }
        Ok(true)
    }

    fn delete(&self, key: &str) -> Result<bool, MemcacheError> {
        let mut inner = self.reachable()?;
        let existed = inner.live(key).is_some();
        inner.entries.remove(key);
        Ok(existed)
    }
}

/// Opens clients on one [`MemoryStore`], failing as memcached's connect does while it is down;
/// counts the attempts.
#[derive(Debug)]
pub(super) struct MemoryConnector {
    pub(super) store: Arc<MemoryStore>,
    pub(super) attempts: Arc<AtomicU32>,
}

impl MemoryConnector {
    pub(super) fn new(store: &Arc<MemoryStore>) -> Self {
        MemoryConnector {
            store: Arc::clone(store),
            attempts: Arc::new(AtomicU32::new(0)),
        }
    }
}

impl Connector for MemoryConnector {
    fn connect(&mut self, address: &RegistryAddress) -> Result<RegistryClient, RegistryError> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if self.store.is_down() {
            return Err(RegistryError::Memcache {
                address: address.to_string(),
                source: MemcacheError::from(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "the in-memory registry is down",
                )),
            });
        }
        Ok(RegistryClient::new(
            Arc::clone(&self.store) as Arc<dyn Store>,
            address.to_string(),
        ))
    }
}
