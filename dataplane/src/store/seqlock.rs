//! The per-entry sequence lock of the store: lock-free readers that retry when a writer
//! interleaved, and a writer side that makes the version odd for the duration of a write.
//!
//! This module touches nothing but the [`AtomicU64`] words it is handed; it allocates nothing
//! and makes no system call. Every access to the protected data goes through atomics (relaxed
//! loads and stores ordered by fences and by the version word), so a reader that races a writer
//! sees stale or mixed words (which it then discards) but never commits a data race.
//!
//! Protocol (Boehm, "Can seqlocks get along with programming language memory models?", 2012):
//! - **Writer**: move the version from even `v` to odd `v + 1` (a compare-exchange with acquire
//!   ordering, which also synchronizes with the previous writer's release, whichever thread it
//!   ran on), `fence(Release)`, relaxed stores of the data, then store `v + 2` with release.
//! - **Reader**: load the version with acquire; if odd, a write is in progress: spin and retry.
//!   Relaxed loads of the data, `fence(Acquire)`, reload the version relaxed; if it changed,
//!   discard what was read and retry.
//!
//! If a reader's relaxed load observed a store made after a writer's release fence, its acquire
//! fence synchronizes with that fence, so the writer's odd version store happens before the
//! reader's second version load, which therefore differs from the first: torn reads are always
//! detected.
//!
//! **Writers.** The store's contract is one writer per entry at a time (writes are applied at
//! commit, in a single total zxid order, possibly by different worker threads over time). The
//! writer side needs nothing more: the acquire compare-exchange orders a write after the
//! previous one even when they ran on different threads. Should two writers ever overlap on one
//! entry anyway, the compare-exchange makes the second spin until the first has finished, so
//! readers still never see a torn value (only the order of the two writes is then unspecified).

use core::sync::atomic::{AtomicU64, Ordering, fence};

/// Runs `body` (which must only read the protected data, with relaxed atomic loads, and may write
/// into buffers the caller owns) until it ran without a writer interleaving, and returns the
/// result of that clean run. `body` may run several times; the results of torn runs are dropped.
#[inline]
pub(crate) fn read<R>(version: &AtomicU64, mut body: impl FnMut() -> R) -> R {
    loop {
        let before = version.load(Ordering::Acquire);
        if before & 1 == 1 {
            core::hint::spin_loop();
            continue;
        }
        let result = body();
        fence(Ordering::Acquire);
        let after = version.load(Ordering::Relaxed);
        if before == after {
            return result;
        }
        core::hint::spin_loop();
    }
}

/// Runs `body` (which must only write the protected data, with relaxed atomic stores, and must
/// not panic) as one write: readers either see all of it or none of it.
///
/// Correct with one writer per entry at a time, from any thread; see the module docs for what
/// happens when writers overlap.
#[inline]
pub(crate) fn write(version: &AtomicU64, body: impl FnOnce()) {
    let mut current = version.load(Ordering::Relaxed);
    let even = loop {
        if current & 1 == 1 {
            core::hint::spin_loop();
            current = version.load(Ordering::Relaxed);
            continue;
        }
        match version.compare_exchange_weak(
            current,
            current.wrapping_add(1),
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => break current,
            Err(actual) => current = actual,
        }
    };
    fence(Ordering::Release);
    body();
    version.store(even.wrapping_add(2), Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_advance_by_two_per_write() {
        let version = AtomicU64::new(0);
        let data = AtomicU64::new(0);
        write(&version, || data.store(7, Ordering::Relaxed));
        assert_eq!(version.load(Ordering::Relaxed), 2);
        assert_eq!(read(&version, || data.load(Ordering::Relaxed)), 7);
        write(&version, || data.store(9, Ordering::Relaxed));
        assert_eq!(version.load(Ordering::Relaxed), 4);
        assert_eq!(read(&version, || data.load(Ordering::Relaxed)), 9);
    }
}
