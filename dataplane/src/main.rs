//! `tollgate-dataplane`: see [`tollgate_dataplane::app::Args`].

use clap::Parser;

/// mimalloc over glibc malloc: the request path allocates and frees many small buffers
/// (headers, body chunks) across threads, where glibc's arenas showed up at ~5% of CPU in
/// profiles. The allocator is the binary's choice, so it lives here, not in the library.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A config or start-up error is a message, not a crash: printed as the error and its causes
/// (`{:#}`), never with the backtrace `anyhow`'s `Debug` adds when `RUST_BACKTRACE` is set.
fn main() -> std::process::ExitCode {
    match tollgate_dataplane::app::run(tollgate_dataplane::app::Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
