//! `ringhub-load`: the binary. Everything is in the library (`ringhub_load`); see its docs and
//! `ringhub-load --help`.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = ringhub_load::cli::Cli::parse();
    match ringhub_load::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
