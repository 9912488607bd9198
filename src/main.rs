// glibc returns large blocks (a 256x256 image's floats) to the OS on free, so every new buffer
// page-faults again; mimalloc keeps them. Measured with `mvlt data bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Keep freed memory for the training and evaluation loops (see `mvlt::memory`); the server
    // turns this off when it starts.
    mvlt::memory::keep_freed_memory(true);
    if let Err(e) = mvlt::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
