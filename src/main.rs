fn main() {
    if let Err(e) = mvlt::cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
