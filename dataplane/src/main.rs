//! `tollgate-dataplane`: see [`tollgate_dataplane::cli::Args`].

use clap::Parser;

/// mimalloc over glibc malloc: the request path allocates and frees many small buffers
/// (headers, body chunks) across threads, where glibc's arenas showed up at ~5% of CPU in
/// profiles. The allocator is the binary's choice, so it lives here, not in the library.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tollgate_dataplane::cli::run(tollgate_dataplane::cli::Args::parse())
}
