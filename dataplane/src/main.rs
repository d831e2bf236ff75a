//! `tollgate-dataplane`: see [`tollgate_dataplane::cli::Args`].

use clap::Parser;

fn main() -> anyhow::Result<()> {
    tollgate_dataplane::cli::run(tollgate_dataplane::cli::Args::parse())
}
