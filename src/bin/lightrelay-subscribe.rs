//! `lightrelay-subscribe`: see `lightrelay::subscribe`. Flags and their environment variables
//! are in `lightrelay::server::config::SubscribeArgs`; a bad one exits 2 with the problem on
//! the first line.

use clap::Parser;
use lightrelay::server::config::SubscribeArgs;

fn main() -> std::process::ExitCode {
    let args = SubscribeArgs::parse();
    lightrelay::server::telemetry::init(args.common.log_format);
    lightrelay::subscribe::main(args)
}
