//! The `lightrelay` client: `pub` (stdin or files → acknowledged publishing) and `sub`
//! (messages → stdout), over `ws://` or `wss://` (SPEC §6).
//!
//! Owns: the client's flags ([`args`]), connecting with TLS and back-off ([`connect`]), the
//! resend-until-acknowledged publisher ([`publisher`]), the printing subscriber
//! ([`subscriber`]), minting tokens ([`token`]) and the load generator ([`bench`], issue 6). Must not: depend on the server modules; it speaks only the wire
//! protocol (WebSocket + the `lightrelay.ack` subprotocol), like any third-party client.
//!
//! Exit codes: 0 done (end of input all acknowledged, `--count` reached, `--once` closed
//! normally); 1 failure (could not connect with `--once`, unreadable input, a TLS or I/O
//! error); 2 bad usage; 130 interrupted by Ctrl-C.

pub mod args;
pub use crate::bench;
pub mod connect;
pub mod publisher;
pub mod subscriber;
pub mod token;

use std::process::ExitCode;

use args::{Cli, Command};

/// Exit code for Ctrl-C, as shells report a process killed by SIGINT.
pub const INTERRUPTED: u8 = 130;

/// Run the client. This is all `src/bin/lightrelay.rs` calls.
pub fn main(cli: Cli) -> ExitCode {
    // `bench` drives thousands of connections: it gets every core. `pub` and `sub` are one
    // connection each: one thread is plenty.
    let runtime = match &cli.command {
        Command::Bench(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("lightrelay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let tls = match connect::Tls::new(cli.ca.as_deref()) {
            Ok(tls) => tls,
            Err(e) => {
                eprintln!("lightrelay: {e}");
                return ExitCode::from(2);
            }
        };
        let token = match &cli.command {
            Command::Pub(args) => args.token.value.as_ref(),
            Command::Sub(args) => args.token.value.as_ref(),
            _ => None,
        };
        if let Some(Err(e)) = token.map(args::Token::check) {
            eprintln!("error: --token: {e} (the token is not shown)");
            return ExitCode::from(2);
        }
        match cli.command {
            Command::Pub(args) => publisher::run(args, tls).await,
            Command::Sub(args) => subscriber::run(args, tls).await,
            Command::Bench(args) => bench::run(args, tls).await,
            Command::Token(args) => token::run(args),
        }
    });
    // Not a plain drop: that waits for blocking tasks, and a read of standard input that is
    // still open (a sensor pipe, a terminal) never ends: the client would hang after saying
    // why it stops.
    runtime.shutdown_background();
    code
}
