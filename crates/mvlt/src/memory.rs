//! Whether freed memory goes back to the operating system: mimalloc's (the allocator `main.rs`
//! installs for Rust, so for flex's tensors) and glibc's (which libtorch's tensors come from).
//!
//! Training frees and reallocates the same large activation buffers every step; having the kernel
//! map and zero them again took about a quarter of a CPU training step on flex (perf, pvlt_tiny
//! 256 px, batch 8: 1.1 -> 1.5 samples/s, peak RSS 2.6 -> 2.9 GB), and a sixth of the CPU time of
//! a libtorch step (system time 4.7-5.8 s of 33-41 s over 5 steps; with glibc keeping its blocks,
//! 1.7-2.0 s, and the step 2.7 s instead of 3.0 s, peak RSS 2.7 -> 3.1 GB), so by default freed
//! memory is kept. A server must give it back instead: one large request would otherwise pin its
//! peak for good.

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc v3's mimalloc.h;
/// libmimalloc-sys has no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc's own default purge delay, milliseconds.
const DEFAULT_PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Keep freed memory (`true`) or return it promptly (`false`: mimalloc's default delay, glibc's
/// default thresholds held fixed rather than left to grow). The
/// `MIMALLOC_PURGE_DELAY` environment variable, when set, wins over both for mimalloc, and
/// `GLIBC_TUNABLES` or `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` for glibc.
pub fn keep_freed_memory(keep: bool) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide option of the allocator this binary links; any value is valid.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, if keep { -1 } else { DEFAULT_PURGE_DELAY_MS })
        };
    }
    glibc::keep_freed_memory(keep);
}

/// Give memory that is already free back to the system now (both allocators): after a burst of
/// large temporary buffers, such as a server preprocessing its catalogue.
pub fn release_freed() {
    // SAFETY: asks mimalloc to return the free pages it holds; no pointer is involved.
    unsafe { libmimalloc_sys::mi_collect(true) };
    glibc::release_freed();
}

/// glibc's malloc, which libtorch allocates its tensors from. By default it serves every block
/// above its mmap threshold (128 KiB, rising to at most 32 MiB as blocks are freed) with a fresh
/// `mmap`, and unmaps it on free, so each step's activations (up to 70 MB for pvlt_tiny's MLP at
/// batch 8) were faulted in and zeroed by the kernel again. Keeping: blocks up to 1 GiB come from
/// the heap, and the heap is not trimmed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    /// glibc's defaults (malloc.c's DEFAULT_MMAP_THRESHOLD_MIN and DEFAULT_TRIM_THRESHOLD).
    const DEFAULT_THRESHOLD: i32 = 128 * 1024;

    pub fn keep_freed_memory(keep: bool) {
        let env = ["GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"];
        if env.iter().any(|v| std::env::var_os(v).is_some()) {
            return;
        }
        let (mmap, trim) = if keep { (1 << 30, i32::MAX) } else { (DEFAULT_THRESHOLD, DEFAULT_THRESHOLD) };
        // SAFETY: mallopt only sets allocator parameters; an out-of-range value is refused (returns 0).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, mmap);
            libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
        }
    }

    pub fn release_freed() {
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe { libc::malloc_trim(0) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod glibc {
    pub fn keep_freed_memory(_keep: bool) {}
    pub fn release_freed() {}
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
