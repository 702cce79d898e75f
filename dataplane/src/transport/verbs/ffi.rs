//! Small helpers around the C libraries: owned strings from C strings, errno values and the
//! library's enum names turned into [`TransportError`]s and text.
//!
//! Touches no verbs or CM object; the only unsafe code reads NUL-terminated strings the
//! libraries return.

use std::ffi::{CStr, c_char, c_int};
use std::io;

use rdma_sys::{ibv_mtu, ibv_wc_status, ibv_wc_status_str, rdma_cm_event_type, rdma_event_str};

use crate::transport::TransportError;

/// A C string from the library as an owned string (empty for null).
///
/// # Safety
/// `text` is null or points at a NUL-terminated string that stays valid during the call.
pub(super) unsafe fn c_text(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

pub(super) fn unavailable(message: impl Into<String>) -> TransportError {
    TransportError::Unavailable(message.into())
}

pub(super) fn os_error(context: impl Into<String>) -> TransportError {
    TransportError::Io {
        context: context.into(),
        source: io::Error::last_os_error(),
    }
}

pub(super) fn errno_error(context: impl Into<String>, code: c_int) -> TransportError {
    TransportError::Io {
        context: context.into(),
        source: io::Error::from_raw_os_error(code),
    }
}

pub(super) fn mtu_bytes(mtu: ibv_mtu::Type) -> usize {
    match mtu {
        ibv_mtu::IBV_MTU_256 => 256,
        ibv_mtu::IBV_MTU_512 => 512,
        ibv_mtu::IBV_MTU_1024 => 1024,
        ibv_mtu::IBV_MTU_2048 => 2048,
        ibv_mtu::IBV_MTU_4096 => 4096,
        _ => 0,
    }
}

pub(super) fn wc_status_text(status: ibv_wc_status::Type) -> String {
    // SAFETY: ibv_wc_status_str returns a static string for any value.
    unsafe { c_text(ibv_wc_status_str(status)) }
}

pub(super) fn cm_event_text(event: rdma_cm_event_type::Type) -> String {
    // SAFETY: rdma_event_str returns a static string for any value.
    unsafe { c_text(rdma_event_str(event)) }
}
