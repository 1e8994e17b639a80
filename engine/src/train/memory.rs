//! Memory reuse while training (glibc malloc on Linux).
//!
//! A training step frees and re-allocates the same few hundred megabytes of activations each
//! step. glibc's defaults hand every large block back to the kernel on `free` (blocks above
//! the mmap threshold are unmapped, the heap top is trimmed), so the next step page-faults the
//! same memory in again: ~95 000 page faults per SmolLM2 step, and the faults serialise
//! the worker threads on the address-space lock. While a [`Reuse`] guard lives, freed memory
//! stays in the process for the next step (peak RSS is unchanged: it is the same memory);
//! when the last guard drops, the defaults come back and the free memory is returned
//! (`malloc_trim`). Elsewhere the guard does nothing.

use std::sync::Mutex;

/// Number of live guards (training jobs may run side by side).
static ACTIVE: Mutex<usize> = Mutex::new(0);

/// Keeps freed memory for reuse while it lives.
#[must_use = "memory is reused only while the guard lives"]
pub struct Reuse(());

impl Reuse {
    /// Starts reusing freed memory.
    pub fn begin() -> Self {
        let mut n = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 {
            set(true);
        }
        *n += 1;
        Reuse(())
    }
}

impl Drop for Reuse {
    fn drop(&mut self) {
        let mut n = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            set(false);
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set(keep: bool) {
    // glibc's defaults: 128 KiB for both thresholds.
    const DEFAULT: i32 = 128 * 1024;
    let (mmap, trim) = if keep {
        (1 << 30, i32::MAX)
    } else {
        (DEFAULT, DEFAULT)
    };
    // SAFETY: mallopt and malloc_trim only adjust and trim the allocator's own state.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
        if !keep {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set(_keep: bool) {}
