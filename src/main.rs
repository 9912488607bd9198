// glibc returns large blocks (a 256x256 image's floats) to the OS on free, so every new buffer
// page-faults again; mimalloc keeps them. Measured with `mvlt data bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc v3's mimalloc.h;
/// libmimalloc-sys has no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Keep freed memory rather than returning it to the OS a moment later: training frees and
    // reallocates the same large activation buffers every step, and having the kernel map and zero
    // them again took about a quarter of a CPU training step (perf, pvlt_tiny 256 px, batch 8).
    // Measured 1.1 -> 1.5 samples/s there, peak RSS 2.6 -> 2.9 GB. MIMALLOC_PURGE_DELAY still wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide option of the allocator this binary links; any value is valid.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    if let Err(e) = mvlt::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
