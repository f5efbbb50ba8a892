//! `lightrelay-publish`: see `lightrelay::server`. Flags and their environment variables are in
//! `lightrelay::config::PublishArgs`; a bad one exits 2 with the problem on the first line.

use clap::Parser;
use lightrelay::config::PublishArgs;
use lightrelay::server::{self, Settings};

fn main() -> std::process::ExitCode {
    let args = PublishArgs::parse();
    lightrelay::telemetry::init(args.common.log_format);
    server::main(Settings::publish(args))
}
