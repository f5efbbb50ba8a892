//! `lightrelay bench` flags. Owns: parsing and checking them (bad ones exit 2 through clap).
//! Must not: connect anywhere.

use std::time::Duration;

use clap::{Args, Subcommand};

const EXAMPLES: &str = "\
Examples (servers on loopback; the bench refuses any other address):
  lightrelay bench fanout --subscribe 'ws://127.0.0.1:8767/bench/{i}' \\
      --publish 'redis://127.0.0.1:6379/lightlevel/bench/{i}' --subscribers 1000 --pid 4242
  lightrelay bench latency --subscribe 'ws://127.0.0.1:8767/bench/{i}' \\
      --publish 'redis://127.0.0.1:6379/lightlevel/bench/{i}' --rate 20 --subscribers 1000
  lightrelay bench fanout --subscribe 'ws://127.0.0.1:8080/sub/b{i}' --publish 'http://127.0.0.1:8080/pub/b{i}'
  lightrelay bench fanout --subscribe 'wss://127.0.0.1:8443/subscribe/bench/{i}' --ca cert.pem \\
      --publish 'redis://127.0.0.1:6379/lightlevel/bench/{i}' --pid 4242 --pid 4300 --pid 4301
  lightrelay bench ingest --publish 'ws://127.0.0.1:8765/in/{i}' --publishers 50 --ack \\
      --redis redis://127.0.0.1:6379 --pid 4241
  lightrelay bench idle --subscribe 'ws://127.0.0.1:8767/idle/{i}' --connections 10000 --pid 4242
  lightrelay bench storm --url 'ws://127.0.0.1:8767/storm/{i}' --clients 10000 --concurrency 200 \
      --token \"$(lightrelay token --secret-file hs.secret --sub '*')\" --pid 4242
  lightrelay bench storm --url 'ws://127.0.0.1:8767/storm/{i}?last=1' --channels 10 \
      --clients 10000 --redis redis://127.0.0.1:6379 --pid 4242

`{i}` in a URL is replaced by the channel (or publisher, or storm client) number, from 0. A redis:// URL's path
is the channel name, not a database number. Messages are binary: an 8-byte sequence number,
an 8-byte send time, then padding to --size; with `format=json` in the --subscribe URL
(envelopes), text: both as 16 hex digits, then padding, read from each envelope's \"data\".
With --json, one JSON object on stdout.
Exit codes: 0 the run counts; 3 it ran but lost messages or a connection ended (figures do
not count; the report says why); 1 it could not run; 2 bad usage.";

#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Fan-out: --channels × --subscribers connections; messages published as fast as they are
    /// delivered (within --window per channel) or at --rate; deliveries/s, loss, latency.
    Fanout(FanoutArgs),
    /// Fan-out at a moderate fixed rate (default 20 messages/s), for latency percentiles.
    Latency(FanoutArgs),
    /// Ingest: --publishers connections publishing as fast as the server takes them;
    /// counts the messages that reached Redis.
    Ingest(IngestArgs),
    /// Idle: open --connections subscribers, hold them, report server RSS per connection.
    Idle(IdleArgs),
    /// Connection storm: --clients WebSocket handshakes, --concurrency at a time, as fast as
    /// the server answers them; connections per server CPU-second, time to all connected.
    Storm(StormArgs),
}

/// What every subcommand measures and how long.
#[derive(Args, Debug, Clone)]
pub struct Measure {
    /// A server process to measure (CPU time, RSS from /proc); repeat for several (nginx's
    /// master and worker). Their CPU time together is the server's.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Redis's process, measured apart (not counted as server CPU).
    #[arg(long, value_name = "PID")]
    pub redis_pid: Option<u32>,
    /// The server's name in the report.
    #[arg(long, default_value = "server")]
    pub label: String,
    /// How long to send (idle: how long to hold the connections before measuring).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// How long to wait, after sending stops, for the last deliveries, acks or PUBLISHes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Connections being opened at once during set-up.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_concurrency: u32,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// The subscribe URL: ws://HOST:PORT/PATH (or wss:// through a TLS terminator, trusting
    /// the system's roots and --ca FILE), `{i}` standing for the channel number; a query (`?format=json`, `?last=N`) goes to the server
    /// as it is, and `format=json` makes the bench send text and read each envelope's data.
    #[arg(long, value_name = "URL")]
    pub subscribe: String,
    /// More subscribe servers (SPEC §11, many instances on one Redis): each channel's
    /// subscribers are dealt in turn to --subscribe and these URLs (same form).
    #[arg(long, value_name = "URL")]
    pub also_subscribe: Vec<String>,
    /// Where messages go in: redis://HOST:PORT/CHANNEL (PUBLISH, pipelined), ws://HOST:PORT/PATH
    /// (binary frames) or http://HOST:PORT/PATH (POST, keep-alive, pipelined); `{i}` as above.
    #[arg(long, value_name = "URL")]
    pub publish: String,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub channels: u32,
    /// Subscribers per channel.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub subscribers: u32,
    /// Message size (bytes, or with KiB/MiB), at least 16.
    #[arg(long, default_value = "100", value_parser = parse_size)]
    pub size: usize,
    /// Messages per second in all; 0: as fast as they are delivered. [default: 0; latency: 20]
    #[arg(long)]
    pub rate: Option<f64>,
    /// At rate 0: messages in flight per subscriber of a channel, on average: the channel
    /// publishes while its deliveries still to come are fewer than this × its subscribers,
    /// and none of its subscribers is 4 × this behind.
    /// [default: 100, or 4 MiB / --size when smaller, at least 2]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub window: Option<u64>,
    /// Stop after this many messages in all (as well as at --duration).
    #[arg(long)]
    pub count: Option<u64>,
    /// PUBLISH commands or HTTP requests in flight per publishing connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub pipeline: u32,
    /// Publishing connections (redis, http) or lanes of per-channel connections (ws).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub publish_connections: u32,
    #[command(flatten)]
    pub measure: Measure,
}

#[derive(Args, Debug, Clone)]
pub struct IngestArgs {
    /// The publish URL: ws://HOST:PORT/PATH (or http://… for POST), `{i}` for the publisher number.
    #[arg(long, value_name = "URL")]
    pub publish: String,
    /// Count what reached this Redis (PUBLISH calls in INFO commandstats); without it, acks.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub publishers: u32,
    /// The server writes lightrelay's history (SPEC §9): each EVALSHA also PUBLISHed its
    /// batch's ids, which are not messages (with --redis). Without it every PUBLISH Redis ran
    /// is counted, scripts' too (nchan publishes from its own scripts).
    #[arg(long)]
    pub history: bool,
    /// Offer the lightrelay.ack subprotocol, keeping --pipeline messages unacknowledged per connection.
    #[arg(long)]
    pub ack: bool,
    #[arg(long, default_value = "100", value_parser = parse_size)]
    pub size: usize,
    #[arg(long)]
    pub count: Option<u64>,
    /// Unacknowledged messages (ack) or requests in flight (http) per connection; without
    /// acks, messages not yet in Redis per publisher (counted for all publishers together,
    /// every 5 ms). Deep enough that this gate, not the server, is never what waits: at 256
    /// it capped lightrelay ~25% below what the same server took at 1,024.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub pipeline: u32,
    #[command(flatten)]
    pub measure: Measure,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    /// The subscribe URL: ws://HOST:PORT/PATH, `{i}` for the channel number.
    #[arg(long, value_name = "URL")]
    pub subscribe: String,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub connections: u32,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub channels: u32,
    /// A token sent on every handshake as `Authorization: Bearer TOKEN` (servers run with --auth all).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    #[command(flatten)]
    pub measure: Measure,
}

#[derive(Args, Debug, Clone)]
pub struct StormArgs {
    /// The WebSocket URL: ws://HOST:PORT/PATH; `{i}` stands for the client number (modulo
    /// --channels when given), or one path for all.
    #[arg(long, value_name = "URL")]
    pub url: String,
    /// Connections to open, each held until every one is open (or refused, or failed).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub clients: u32,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// `{i}` runs over this many channels (client number modulo it). [default: one per client]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub channels: Option<u32>,
    /// A token sent on every handshake as `Authorization: Bearer TOKEN`.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// The server's Redis: count the commands the storm made it run (INFO commandstats
    /// before and after: XREVRANGE, XRANGE, SUBSCRIBE), e.g. the history reads of `?last=1`.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// After the last handshake, how long the server's CPU is still counted (it finishes
    /// what the storm asked of it: Redis subscriptions) before the connections are closed.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
    /// The whole storm ends by then: handshakes not finished count as failed.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// A server process to measure (CPU time, RSS from /proc); repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Redis's process, measured apart (not counted as server CPU).
    #[arg(long, value_name = "PID")]
    pub redis_pid: Option<u32>,
    /// The server's name in the report.
    #[arg(long, default_value = "server")]
    pub label: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// A flag value clap refuses (exit 2), printed after the flag's name.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error("not a duration: {0}")]
    Duration(#[from] humantime::DurationError),
    #[error("not a size: {0}")]
    Size(String),
    #[error("unknown unit {0} (B, KiB, MiB)")]
    Unit(String),
    #[error(
        "at least {} bytes (sequence number and timestamp)",
        super::stats::MIN_SIZE
    )]
    TooSmall,
}

fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    Ok(humantime::parse_duration(s)?)
}

fn parse_size(s: &str) -> Result<usize, ValueError> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, ""),
    };
    let n: usize = digits.parse().map_err(|_| ValueError::Size(s.into()))?;
    let size = match unit {
        "" | "B" => n,
        "KiB" => n * 1024,
        "MiB" => n * 1024 * 1024,
        other => return Err(ValueError::Unit(other.into())),
    };
    if size < super::stats::MIN_SIZE {
        return Err(ValueError::TooSmall);
    }
    Ok(size)
}
