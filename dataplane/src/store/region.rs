//! The store's memory: one anonymous mapping per array (bucket index, entries), allocated once
//! at construction, on explicit huge pages when the kernel has them reserved, otherwise on normal
//! pages advised for transparent huge pages.
//!
//! This module is the only part of the store that makes system calls (`mmap`, `madvise` and
//! `munmap`, at construction and drop only) and the only one that turns raw memory into
//! references. The memory is only ever exposed as `&[AtomicU64]`, so the rest of the store shares
//! it between threads with atomics alone.

use core::ptr::NonNull;
use core::sync::atomic::AtomicU64;

use super::StoreError;

/// The size of the explicit huge pages asked for (`MAP_HUGE_2MB`).
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// How a store's memory ended up backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageBacking {
    /// Explicit 2 MiB huge pages (`MAP_HUGETLB`), from the kernel's reserved pool.
    HugeTlb,
    /// Normal pages with `madvise(MADV_HUGEPAGE)` accepted: the kernel may back them with
    /// transparent huge pages (whether it does depends on its THP settings and on memory).
    TransparentHugeAdvised,
    /// Normal pages: huge pages were not asked for, or the kernel refused both kinds.
    SmallPages,
}

/// An anonymous, private, zero-filled mapping owned by this value, unmapped on drop.
pub(crate) struct Region {
    ptr: NonNull<u8>,
    /// Bytes mapped (what `munmap` is given back), at least what was asked for.
    mapped: usize,
    /// Bytes asked for, a multiple of 8: the extent exposed as words.
    len: usize,
    backing: PageBacking,
}

// SAFETY: a `Region` owns its mapping exclusively (nothing else holds the pointer) and only hands
// out `&[AtomicU64]` borrowed from `&self`; moving the owner to another thread is as safe as
// moving a `Box<[AtomicU64]>`.
unsafe impl Send for Region {}
// SAFETY: shared access only ever yields `&[AtomicU64]`, and `AtomicU64` is `Sync`: every
// concurrent access to the memory is atomic.
unsafe impl Sync for Region {}

impl core::fmt::Debug for Region {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Region")
            .field("len", &self.len)
            .field("mapped", &self.mapped)
            .field("backing", &self.backing)
            .finish()
    }
}

impl Region {
    /// Maps `len` zero-filled bytes (`len` a non-zero multiple of 8). With `hugepages`, tries
    /// `MAP_HUGETLB` first (Linux), then normal pages with `MADV_HUGEPAGE`.
    pub(crate) fn new(len: usize, hugepages: bool) -> Result<Self, StoreError> {
        if len == 0 || len % 8 != 0 {
            return Err(StoreError::InvalidConfig(
                "a store region must be a non-zero multiple of 8 bytes",
            ));
        }
        if hugepages {
            if let Some(region) = Self::map_hugetlb(len) {
                return Ok(region);
            }
        }
        let ptr =
            map_anonymous(len, 0).map_err(|source| StoreError::Alloc { bytes: len, source })?;
        let mut backing = PageBacking::SmallPages;
        if hugepages && advise_huge(ptr, len) {
            backing = PageBacking::TransparentHugeAdvised;
        }
        Ok(Self {
            ptr,
            mapped: len,
            len,
            backing,
        })
    }

    #[cfg(target_os = "linux")]
    fn map_hugetlb(len: usize) -> Option<Self> {
        let mapped = len.checked_next_multiple_of(HUGE_PAGE_BYTES)?;
        let ptr = map_anonymous(mapped, libc::MAP_HUGETLB | libc::MAP_HUGE_2MB).ok()?;
        Some(Self {
            ptr,
            mapped,
            len,
            backing: PageBacking::HugeTlb,
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn map_hugetlb(_len: usize) -> Option<Self> {
        let _ = HUGE_PAGE_BYTES;
        None
    }

    /// The memory as words; every access to it goes through these atomics.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` is the start of a live mapping of at least `len` bytes that lives as long
        // as `self`; it is page-aligned, so aligned for `AtomicU64`; `len` is a multiple of 8; the
        // mapping was zero-filled by the kernel and all-zero bytes are a valid `AtomicU64`; and
        // the memory is only ever reached through this atomic view (interior mutability through
        // `UnsafeCell`), so shared references to it never alias a plain mutable access.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }

    /// How the mapping is backed.
    pub(crate) fn backing(&self) -> PageBacking {
        self.backing
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `mapped` describe exactly the mapping created in `new`, which nothing
        // references any more (every borrow of `words()` ended before `&mut self` was available).
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
        debug_assert_eq!(rc, 0, "munmap of a store region failed");
    }
}

/// `mmap` of `len` anonymous, private, read-write bytes with extra `flags`.
fn map_anonymous(len: usize, flags: libc::c_int) -> std::io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing: it cannot
    // overlap or alias any memory Rust already knows about. The result is checked below.
    let ptr = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned null"))
}

/// Asks for transparent huge pages over `[ptr, ptr + len)`; true if the kernel accepted.
#[cfg(target_os = "linux")]
fn advise_huge(ptr: NonNull<u8>, len: usize) -> bool {
    // SAFETY: madvise on a mapping we just created and own; MADV_HUGEPAGE changes no contents,
    // and an unsupported advice only returns EINVAL.
    let rc = unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_ptr: NonNull<u8>, _len: usize) -> bool {
    false
}
