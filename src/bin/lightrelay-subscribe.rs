//! `lightrelay-subscribe`: see `lightrelay::server`. Flags and their environment variables are in
//! `lightrelay::config::SubscribeArgs`; a bad one exits 2 with the problem on the first line.

use clap::Parser;
use lightrelay::config::SubscribeArgs;
use lightrelay::server::{self, Settings};

fn main() -> std::process::ExitCode {
    let args = SubscribeArgs::parse();
    lightrelay::telemetry::init(args.common.log_format);
    server::main(Settings::subscribe(args))
}
