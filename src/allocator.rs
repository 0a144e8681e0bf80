//! The process's allocator: mimalloc, told to keep the memory it frees.
//!
//! The engine allocates step-sized buffers many times a step. glibc's malloc returns large ones
//! to the kernel each time; mimalloc by default does so 10 ms after they are freed, which is
//! still shorter than a prefill step, so every step page-faults and zeroes its buffers afresh
//! (about a tenth of a batch-16 prefill on the engine benchmark). A serving process reaches
//! its high-water mark in the first steps and stays there, so it keeps what it frees.

use std::os::raw::c_int;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the `mi_option_e` of the mimalloc (v3) that libmimalloc-sys
/// builds; the crate has no constant for it.
const PURGE_DELAY: c_int = 15;

/// mimalloc's default purge delay, in milliseconds.
const DEFAULT_PURGE_DELAY_MS: std::os::raw::c_long = 10;

/// Turns off purging of freed memory, unless `MIMALLOC_PURGE_DELAY` already set the delay.
/// The option is changed only if it reads as mimalloc's documented default, so a different
/// option numbering in another mimalloc version leaves everything as it was.
pub fn retain_freed_memory() {
    // SAFETY: plain option reads and writes on the allocator linked into this binary; neither
    // touches memory the caller owns.
    unsafe {
        if libmimalloc_sys::mi_option_get(PURGE_DELAY) == DEFAULT_PURGE_DELAY_MS
            && std::env::var_os("MIMALLOC_PURGE_DELAY").is_none()
        {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
    }
}
