//! `lightrelay`: the client (`pub`, `sub`). See `lightrelay::client`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    lightrelay::client::main(lightrelay::client::args::Cli::parse())
}
