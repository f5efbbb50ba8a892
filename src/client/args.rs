//! The client's flags. Owns: parsing and validating them (bad ones exit 2 through clap).
//! Must not: connect or read input.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::bench::args::BenchArgs;

const EXAMPLES: &str = "\
Examples:
  sensor-reader | lightrelay pub ws://127.0.0.1:8765/office
  lightrelay pub wss://relay.example/publish/cam --binary still-*.jpg
  lightrelay sub ws://127.0.0.1:8767/office
  lightrelay sub --count 1 --raw wss://relay.example/subscribe/cam > frame.jpg
  LIGHTRELAY_TOKEN=$(cat pi.token) lightrelay pub wss://relay.example/publish/office

Exit codes: 0 done, 1 failure, 2 bad usage, 130 interrupted (Ctrl-C).";

/// The lightrelay client: publish to and subscribe from a lightrelay server.
#[derive(Parser, Debug)]
#[command(name = "lightrelay", version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// Also trust the certificates in this PEM file (a self-signed relay) for wss://.
    #[arg(long, global = true, env = "LIGHTRELAY_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Publish each line of standard input (or each --binary file) as one message; resend
    /// what was not acknowledged after a reconnect; exit 0 once everything was acknowledged.
    Pub(PubArgs),
    /// Print each message on its own line (binary as base64 unless --raw).
    Sub(SubArgs),
    /// The load generator: fan-out, latency, ingest and idle-connection runs against a relay
    /// (or a peer), with loss, latency and the server's CPU time and memory.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
pub struct PubArgs {
    /// The publish URL: ws://host:port/path or wss://…
    #[arg(value_parser = parse_url)]
    pub url: String,

    /// Messages kept while disconnected; beyond that the oldest are dropped (and counted on stderr).
    #[arg(long, env = "LIGHTRELAY_BUFFER", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub buffer: u32,

    /// Send these files, each as one binary message, instead of reading standard input.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub binary: Vec<PathBuf>,

    #[command(flatten)]
    pub token: TokenArg,
}

#[derive(Args, Debug)]
pub struct SubArgs {
    /// The subscribe URL: ws://host:port/path or wss://…
    #[arg(value_parser = parse_url)]
    pub url: String,

    /// Stop after this many messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// Exit when the connection ends instead of reconnecting.
    #[arg(long)]
    pub once: bool,

    /// Write binary payloads as they are (no base64, no newline); text lines keep their newline.
    #[arg(long)]
    pub raw: bool,

    #[command(flatten)]
    pub token: TokenArg,
}

/// `--token`, shared by `pub` and `sub`.
#[derive(Args, Debug)]
pub struct TokenArg {
    /// A token from `lightrelay token` (SPEC §8), sent as `Authorization: Bearer TOKEN`.
    /// Prefer the environment variable: a command line is visible to every user of the host.
    #[arg(
        long = "token",
        env = "LIGHTRELAY_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        value_parser = parse_token
    )]
    pub value: Option<Token>,
}

/// A bearer token. Its `Debug` shows nothing of it, so no log or panic message can leak it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// The token itself, for the `Authorization` header only.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

/// Why a `--token` is refused (exit 2). The message never repeats the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is empty")]
    Empty,
    #[error("a token is one line of printable ASCII without spaces")]
    NotPrintable,
}

fn parse_token(s: &str) -> Result<Token, TokenError> {
    // A token file read with $(cat …) may end with a newline; nothing else is trimmed.
    let s = s.trim_end_matches(['\r', '\n']);
    if s.is_empty() {
        return Err(TokenError::Empty);
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotPrintable);
    }
    Ok(Token(s.to_string()))
}

/// Why a URL argument is refused (clap prints it after the argument's name, exit 2).
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("not a URL: {0}")]
    Invalid(#[from] hyper::http::uri::InvalidUri),
    #[error("the URL must start with ws:// or wss://")]
    Scheme,
    #[error("the URL has no host")]
    NoHost,
}

fn parse_url(s: &str) -> Result<String, UrlError> {
    let uri: hyper::Uri = s.parse()?;
    match uri.scheme_str() {
        Some("ws") | Some("wss") => {}
        _ => return Err(UrlError::Scheme),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(UrlError::NoHost);
    }
    Ok(s.to_string())
}
