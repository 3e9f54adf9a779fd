//! `tessera`: the CLI. One clear line on stderr and exit 1 for any error.
#![deny(unsafe_code)]

use clap::Parser;

fn main() {
    // `tessera up` collects SIGINT/SIGTERM itself; other commands are short.
    tessera_manager::sys::block_termination_signals();
    let cli = tessera_manager::cli::Cli::parse();
    if let Err(e) = tessera_manager::cli::run(cli) {
        eprintln!("tessera: {}", e.0);
        std::process::exit(1);
    }
}
