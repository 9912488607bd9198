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

/// Peak resident memory of this process, bytes (Linux's `VmHWM`; `None` elsewhere); reset it first
/// with [`reset_peak_rss`] to measure one phase.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Start [`peak_rss`] again from the current resident memory.
pub fn reset_peak_rss() {
    // Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
