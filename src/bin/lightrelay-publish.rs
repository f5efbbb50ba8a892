//! `lightrelay-publish`: see `lightrelay::publish`. Flags and their environment variables are
//! in `lightrelay::server::config::PublishArgs`; a bad one exits 2 with the problem on the
//! first line.

use clap::Parser;
use lightrelay::server::config::PublishArgs;

fn main() -> std::process::ExitCode {
    let args = PublishArgs::parse();
    lightrelay::server::telemetry::init(args.common.log_format);
    lightrelay::publish::main(args)
}
