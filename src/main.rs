// glibc returns large blocks (a 256x256 image's floats) to the OS on free, so every new buffer
// page-faults again; mimalloc keeps them. Measured with `mvlt data bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The library's messages on stderr as before it logged through tracing: information as is,
/// warnings as `note: ...`, errors as `error: ...` (no time stamps or targets: a terminal reads
/// them between progress bars). `RUST_LOG` narrows or widens them (`RUST_LOG=warn`, `=debug`).
struct Plain;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Plain
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        match *event.metadata().level() {
            tracing::Level::ERROR => write!(w, "error: ")?,
            tracing::Level::WARN => write!(w, "note: ")?,
            _ => {}
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).event_format(Plain).init();
    // Keep freed memory for the training and evaluation loops (see `mvlt::memory`); the server
    // turns this off when it starts.
    mvlt::memory::keep_freed_memory(true);
    if let Err(e) = mvlt_cli::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
