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
  lightrelay sub --last 10 --json ws://127.0.0.1:8767/office
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
    /// Print each message on its own line (binary as base64 unless --raw); after a reconnect,
    /// go on after the last message printed (a server with --history).
    Sub(SubArgs),
    /// Print one signed token (a JWT) for `--auth`: what it may publish, subscribe to and send
    /// down, and how long it lasts.
    Token(TokenArgs),
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

    /// Do not ask for acknowledgements (for a WebSocket endpoint other than a lightrelay
    /// publish server): a message counts as sent once written, and one in flight when a
    /// connection drops can be lost.
    #[arg(long, env = "LIGHTRELAY_NO_ACK")]
    pub no_ack: bool,

    /// Print what the server sends back on this connection (the device's downlink, SPEC §10)
    /// on standard output, one message per line: UTF-8 as is, anything else as base64.
    #[arg(long)]
    pub downlink: bool,

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
    #[arg(long, conflicts_with = "json")]
    pub raw: bool,

    /// First print up to N retained messages (oldest first), then the live ones (a server
    /// with --history; asks ?last=N on the first connection only).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub last: Option<u32>,

    /// Print each message's JSON envelope as received, one per line:
    /// {"channel":…,"id":…,"data":…} (binary data as base64 with "encoding":"base64").
    #[arg(long)]
    pub json: bool,

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

    /// Whether it can be a header's value. Checked here, not by clap: clap's error for a
    /// refused value repeats the value, and a token must never reach stderr.
    pub fn check(&self) -> Result<(), TokenError> {
        if self.0.is_empty() {
            return Err(TokenError::Empty);
        }
        if !self.0.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotPrintable);
        }
        Ok(())
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

/// Never fails (see [`Token::check`], which the commands run first).
fn parse_token(s: &str) -> Result<Token, std::convert::Infallible> {
    // A token file read with $(cat …) may end with a newline; nothing else is trimmed.
    Ok(Token(s.trim_end_matches(['\r', '\n']).to_string()))
}

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  lightrelay token --secret-file /etc/lightrelay/jwt-secret --pub '/sensors/*' --ttl 365d"
)]
pub struct TokenArgs {
    /// Sign with HS256 and a secret of this file (the servers' --jwt-secret-file): the line
    /// labelled --kid, else the first.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "private_key_file",
        required_unless_present = "private_key_file"
    )]
    pub secret_file: Option<PathBuf>,

    /// Sign with this PEM private key instead (PKCS#8): RS256, ES256 or EdDSA by its type.
    #[arg(long, value_name = "FILE")]
    pub private_key_file: Option<PathBuf>,

    /// The token's kid: the label of the secret's line, or the server's public key file name
    /// without its extension.
    #[arg(long, value_name = "LABEL")]
    pub kid: Option<String>,

    /// Paths it may publish on (Redis glob: *, ?, [..]; * also matches /).
    #[arg(long = "pub", value_name = "PATTERN", num_args = 1..)]
    pub publish: Vec<String>,

    /// Paths it may subscribe to.
    #[arg(long, value_name = "PATTERN", num_args = 1..)]
    pub sub: Vec<String>,

    /// Paths whose device it may send to (POST /down/PATH).
    #[arg(long, value_name = "PATTERN", num_args = 1..)]
    pub down: Vec<String>,

    /// How long it is valid (30d, 12h, 90m, 3600), or never.
    #[arg(long, default_value = "30d", value_parser = parse_ttl)]
    pub ttl: Ttl,

    /// Its iss (for servers started with --jwt-issuer).
    #[arg(long, value_name = "ISS")]
    pub issuer: Option<String>,

    /// Its aud (for servers started with --jwt-audience).
    #[arg(long, value_name = "AUD")]
    pub audience: Option<String>,
}

/// `--ttl`: how long a token lives; `None` for `never` (no exp).
#[derive(Debug, Clone, Copy)]
pub struct Ttl(pub Option<std::time::Duration>);

fn parse_ttl(s: &str) -> Result<Ttl, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("never") {
        return Ok(Ttl(None));
    }
    let ttl = match s.parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{e} (use 30d, 12h, 3600 or never)"))?,
    };
    if ttl.is_zero() {
        return Err("a token must live longer than 0 seconds (or use never)".into());
    }
    Ok(Ttl(Some(ttl)))
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
