//! Whether freed memory goes back to the operating system (mimalloc, the allocator `main.rs`
//! installs).
//!
//! Training frees and reallocates the same large activation buffers every step; having the kernel
//! map and zero them again took about a quarter of a CPU training step (perf, pvlt_tiny 256 px,
//! batch 8: 1.1 -> 1.5 samples/s, peak RSS 2.6 -> 2.9 GB), so by default freed memory is kept. A
//! server must give it back instead: one large request would otherwise pin its peak for good.

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc v3's mimalloc.h;
/// libmimalloc-sys has no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc's own default purge delay, milliseconds.
const DEFAULT_PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Keep freed memory (`true`) or return it after mimalloc's default delay (`false`). The
/// `MIMALLOC_PURGE_DELAY` environment variable, when set, wins over both.
pub fn keep_freed_memory(keep: bool) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets a process-wide option of the allocator this binary links; any value is valid.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, if keep { -1 } else { DEFAULT_PURGE_DELAY_MS }) };
}
