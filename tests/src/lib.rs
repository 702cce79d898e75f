//! rzab-tests: helpers for tests that run real multi-process rzab clusters. The tests
//! themselves live in `tests/tests/`; this library finds the workspace's built binaries.

use std::path::PathBuf;

/// The directory cargo builds binaries into for the current profile.
pub fn target_bin_dir() -> PathBuf {
    let mut path = std::env::current_exe().unwrap_or_default();
    path.pop();
    if path.ends_with("deps") {
        path.pop();
    }
    path
}
