//! `tessera`: the CLI. One clear line on stderr and exit 1 for any error.
#![deny(unsafe_code)]

use clap::Parser;

fn main() {
    // Signals keep their default action here so Ctrl-C stops any command;
    // `tessera up` blocks and collects SIGINT/SIGTERM itself.
    let cli = tessera_manager::cli::Cli::parse();
    if let Err(e) = tessera_manager::cli::run(cli) {
        eprintln!("tessera: {}", e.message);
        std::process::exit(1);
    }
}
