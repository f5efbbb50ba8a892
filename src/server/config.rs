//! Command-line flags and their environment variables, for both servers.
//!
//! Owns: every flag's name, default, environment variable, parsing (durations, sizes, Redis
//! URLs, `--listen` forms) and allowed range, so a bad value is refused by clap with exit
//! code 2 and one line naming the flag and its range before anything starts; each server's
//! `--help` (what it does, examples); and [`CommonArgs::check`], the one rule that spans two
//! flags (`--idle-timeout` longer than `--ping-interval`).
//! Must not: open sockets, talk to Redis or read files; it only describes what to do.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

/// Flags shared by `lightrelay-publish` and `lightrelay-subscribe`, defined once and
/// flattened into both.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Redis to use: redis://[user:pass@]host:port[/db], or rediss:// for TLS. With
    /// `--redis-mode cluster`, seed nodes: redis://[user:pass@]host:port,host:port,…; with
    /// `--redis-mode sentinel`, the sentinels and the master's name:
    /// redis://[user:pass@]host:port,host:port/MASTER[/db].
    #[arg(long, env = "LIGHTRELAY_REDIS_URL", default_value = "redis://127.0.0.1:6379",
          value_parser = parse_redis_url)]
    pub redis_url: RedisUrl,

    /// What --redis-url names: one Redis (`standalone`), a Redis Cluster's seed nodes
    /// (`cluster`: sharded pub/sub, SPUBLISH and SSUBSCRIBE) or Sentinels (`sentinel`).
    #[arg(long, env = "LIGHTRELAY_REDIS_MODE", value_enum, default_value_t = RedisMode::Standalone)]
    pub redis_mode: RedisMode,

    /// A PEM file of certificates to trust for rediss:// besides the system's roots (for a
    /// Redis with a self-signed certificate).
    /// (An empty value, as an environment file may hold, means none.)
    #[arg(long, env = "LIGHTRELAY_REDIS_CA", value_name = "FILE", value_parser = parse_path)]
    pub redis_ca: Option<std::path::PathBuf>,

    /// How long publishing may wait for an unreachable Redis before the client is closed
    /// with 1013.
    #[arg(long, env = "LIGHTRELAY_REDIS_TIMEOUT", default_value = "10s", value_parser = redis_timeout)]
    pub redis_timeout: Duration,

    /// Prepended to the request path to name the Redis channel.
    #[arg(long, env = "LIGHTRELAY_CHANNEL_PREFIX", default_value = "lightlevel")]
    pub channel_prefix: String,

    /// Longest accepted request path, in bytes (longer: HTTP 400). 1 to 8192.
    #[arg(long, env = "LIGHTRELAY_MAX_PATH_BYTES", default_value_t = 256, value_parser = max_path_bytes)]
    pub max_path_bytes: usize,

    /// Largest WebSocket message or POST body, in bytes (also 64KiB, 1MiB), 1 to 256MiB.
    /// Larger: close 1009 / HTTP 413.
    #[arg(long, env = "LIGHTRELAY_MAX_MESSAGE_BYTES", default_value = "1MiB", value_parser = max_message_bytes)]
    pub max_message_bytes: usize,

    /// Interval between WebSocket pings to each client, and between health PINGs to Redis.
    #[arg(long, env = "LIGHTRELAY_PING_INTERVAL", default_value = "30s", value_parser = ping_interval)]
    pub ping_interval: Duration,

    /// A client silent for this long (no frame, no pong) is closed. Longer than --ping-interval.
    #[arg(long, env = "LIGHTRELAY_IDLE_TIMEOUT", default_value = "90s", value_parser = idle_timeout)]
    pub idle_timeout: Duration,

    /// A connection that has not finished its HTTP request or WebSocket handshake by then is dropped.
    #[arg(long, env = "LIGHTRELAY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = handshake_timeout)]
    pub handshake_timeout: Duration,

    /// Most TCP connections at once (WebSocket clients and plain HTTP requests alike); past
    /// it, a new connection is answered 503 and closed. 1 to 1000000.
    #[arg(long, env = "LIGHTRELAY_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = max_connections)]
    pub max_connections: usize,

    /// Publishes in flight per client before the server stops reading from it (back-pressure).
    #[arg(long, env = "LIGHTRELAY_PUBLISH_WINDOW", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub publish_window: u32,

    /// Redis connections used for PUBLISH (each client sticks to one, keeping its order).
    #[arg(long, env = "LIGHTRELAY_REDIS_CONNECTIONS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub redis_connections: u32,

    /// Threads that serve connections (the runtime's workers), 1 to 1024; default: the CPUs
    /// this process may run on (taskset and cgroup limits count). Plus the hub's own thread,
    /// which subscribes to Redis and fans out.
    /// (An empty value, as an environment file may hold, means the default.)
    // Kept as 0 when empty: `listener` reads 0 as the default (the flag itself refuses 0).
    #[arg(long, env = "LIGHTRELAY_WORKER_THREADS", value_name = "N", value_parser = worker_threads)]
    pub worker_threads: Option<usize>,

    /// How long SIGTERM/SIGINT waits for clients to be closed and publishes to finish.
    #[arg(long, env = "LIGHTRELAY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = shutdown_timeout)]
    pub shutdown_timeout: Duration,

    /// Interval of the info summary line (connections opened, closed and open, messages in
    /// and out); 0: none. An interval with no connection and no message logs nothing.
    #[arg(long, env = "LIGHTRELAY_LOG_SUMMARY_INTERVAL", default_value = "1m",
          value_parser = log_summary_interval)]
    pub log_summary_interval: Duration,

    /// Log format on stderr (the filter comes from RUST_LOG, default info).
    #[arg(long, env = "LIGHTRELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Keep the last N messages of each channel in a Redis stream beside it (SPEC §9), for
    /// `?last=`, `?since=` and resuming after a lost subscription; 0: off. Set it on both
    /// servers: the publish server writes the streams, the subscribe server reads them.
    #[arg(long, env = "LIGHTRELAY_HISTORY", default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub history: u32,

    /// How long a channel's stream outlives its last message (0: forever); with --history.
    #[arg(long, env = "LIGHTRELAY_HISTORY_TTL", default_value = "1d", value_name = "D",
          value_parser = history_ttl)]
    pub history_ttl: Duration,

    /// How often this instance writes its heartbeat and what changed in its presence (SPEC
    /// §10); an instance is gone three intervals after its last heartbeat. 1s to 1h; 0: no
    /// presence (nothing written, `/presence` answers 404).
    #[arg(long, env = "LIGHTRELAY_PRESENCE_INTERVAL", default_value = "10s", value_name = "D",
          value_parser = presence_interval)]
    pub presence_interval: Duration,

    /// This instance's name in the fleet's presence (SPEC §10); default HOSTNAME:PORT of
    /// --listen. 1 to 128 printable ASCII bytes. Two live instances must not share one.
    /// (An empty value, as an environment file may hold, means the default.)
    #[arg(long, env = "LIGHTRELAY_INSTANCE_ID", value_name = "ID", value_parser = instance_id)]
    pub instance_id: Option<String>,

    /// What follows a channel's name in the name of its downlink channel (SPEC §10): a message
    /// published on PREFIX + PATH + this reaches the publishers connected on PATH.
    #[arg(long, env = "LIGHTRELAY_DOWNLINK_SUFFIX", default_value = ":down", value_name = "SUFFIX",
          value_parser = downlink_suffix)]
    pub downlink_suffix: String,

    /// Token checks (SPEC §8); their flags are defined with them, in `auth`.
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,

    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Abuse limits (SPEC §8): client addresses behind proxies, connections per address, publish
/// rates, allowed browser origins.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Peers whose X-Real-IP / X-Forwarded-For names the client (CIDRs, comma-separated).
    #[arg(long, env = "LIGHTRELAY_TRUSTED_PROXIES", value_name = "CIDRS",
          default_value = "127.0.0.1/32,::1/128", value_delimiter = ',', value_parser = parse_cidr)]
    pub trusted_proxies: Vec<Option<ipnet::IpNet>>,

    /// Most WebSocket connections from one client address (0 = no limit); past it, 429.
    #[arg(long, env = "LIGHTRELAY_MAX_CONNECTIONS_PER_IP", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_connections_per_ip: u32,

    /// Messages per second one connection may publish (0 = no limit); a faster one is read
    /// more slowly (nothing is lost). A POST over the rate of its address gets 429.
    #[arg(long, env = "LIGHTRELAY_MAX_PUBLISH_RATE", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub max_publish_rate: u32,

    /// Messages a connection may publish at once above --max-publish-rate (0 = the rate).
    #[arg(long, env = "LIGHTRELAY_PUBLISH_BURST", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub publish_burst: u32,

    /// Origins a browser's WebSocket upgrade may come from (comma-separated, e.g.
    /// https://example.org); others get 403. Empty: any origin.
    // Kept normalised (see `normalise_origin`); an empty item is "".
    #[arg(
        long,
        env = "LIGHTRELAY_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ',',
        value_parser = parse_origin
    )]
    pub allowed_origins: Vec<String>,
}

const PUBLISH_ABOUT: &str = "\
lightrelay-publish: WebSocket and HTTP POST in, Redis PUBLISH out.

Every message a client sends on ws://HOST:PORT/PATH (or POSTs to /PATH) is published on the
Redis channel PREFIX + PATH (e.g. lightlevel/office), bytes unchanged, in order. GET /healthz
and GET /metrics answer plain HTTP.";

const PUBLISH_EXAMPLES: &str = "\
Examples:
  lightrelay-publish
  lightrelay-publish --listen :8765 --redis-url redis://:secret@10.0.0.5:6379/0
  curl -d 42 http://127.0.0.1:8765/office      (publishes 42 on lightlevel/office)

--listen takes ADDR:PORT, [IPv6]:PORT, localhost:PORT (127.0.0.1) or :PORT (all interfaces,
like nginx's `listen PORT`). Every flag can also be set by its environment variable.";

const SUBSCRIBE_ABOUT: &str = "\
lightrelay-subscribe: Redis SUBSCRIBE in, WebSocket out.

A client of ws://HOST:PORT/PATH receives every message published on the Redis channel
PREFIX + PATH (e.g. lightlevel/office), one frame per message. GET / is the live page;
GET /healthz and GET /metrics answer plain HTTP. Publishing goes to lightrelay-publish
(or, with --accept-publish, through a subscriber's own WebSocket).";

const SUBSCRIBE_EXAMPLES: &str = "\
Examples:
  lightrelay-subscribe
  lightrelay-subscribe --listen :8767 --redis-url redis://10.0.0.5:6379 --slow-consumer skip
  lightrelay sub ws://127.0.0.1:8767/office      (prints what is published on lightlevel/office)

--listen takes ADDR:PORT, [IPv6]:PORT, localhost:PORT (127.0.0.1) or :PORT (all interfaces,
like nginx's `listen PORT`). Every flag can also be set by its environment variable.";

/// `lightrelay-publish`: WebSocket and HTTP POST in, Redis PUBLISH out.
#[derive(Parser, Debug, Clone)]
#[command(name = "lightrelay-publish", version, about = PUBLISH_ABOUT, after_help = PUBLISH_EXAMPLES)]
pub struct PublishArgs {
    /// Address to listen on: ADDR:PORT, localhost:PORT or :PORT (all interfaces).
    #[arg(long, env = "LIGHTRELAY_LISTEN", default_value = "127.0.0.1:8765", value_parser = parse_listen)]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `lightrelay-subscribe`: Redis SUBSCRIBE in, WebSocket out.
#[derive(Parser, Debug, Clone)]
#[command(name = "lightrelay-subscribe", version, about = SUBSCRIBE_ABOUT, after_help = SUBSCRIBE_EXAMPLES)]
pub struct SubscribeArgs {
    /// Address to listen on: ADDR:PORT, localhost:PORT or :PORT (all interfaces).
    #[arg(long, env = "LIGHTRELAY_LISTEN", default_value = "127.0.0.1:8767", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Most messages a client may have queued: past it, --slow-consumer applies at once
    /// (a memory ceiling, with 4 × --client-queue-bytes).
    #[arg(long, env = "LIGHTRELAY_CLIENT_QUEUE", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub client_queue: u32,

    /// Bytes a client may have queued (payload + 64 per message) for --slow-consumer-grace
    /// while its socket takes nothing, before --slow-consumer applies (also 64KiB, 8MiB).
    #[arg(long, env = "LIGHTRELAY_CLIENT_QUEUE_BYTES", default_value = "8MiB", value_parser = parse_queue_bytes)]
    pub client_queue_bytes: usize,

    /// How long a client's queue may stay over --client-queue-bytes, with its socket full,
    /// before --slow-consumer applies.
    #[arg(long, env = "LIGHTRELAY_SLOW_CONSUMER_GRACE", default_value = "60s", value_parser = parse_duration)]
    pub slow_consumer_grace: Duration,

    /// What to do with a slow client: close it (1008) or skip to the newest message.
    #[arg(long, env = "LIGHTRELAY_SLOW_CONSUMER", value_enum, default_value_t = SlowConsumer::Close)]
    pub slow_consumer: SlowConsumer,

    /// Publish what subscribers send on their own channel (otherwise it is read and discarded).
    #[arg(long, env = "LIGHTRELAY_ACCEPT_PUBLISH")]
    pub accept_publish: bool,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The `--slow-consumer` policy.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Close the client with 1008 `slow consumer`.
    Close,
    /// Drop its backlog but the newest message, and count what was dropped.
    Skip,
}

/// `--listen`: `ADDR:PORT` (`[::1]:PORT` for IPv6), `localhost:PORT` (127.0.0.1) or `:PORT`,
/// which means every interface (0.0.0.0), as nginx's `listen PORT` does.
pub(crate) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "'{s}' is not an address to listen on: expected ADDR:PORT (127.0.0.1:8765, \
             [::1]:8765), localhost:PORT or :PORT (all interfaces)"
        )
    };
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    match host {
        "" => Ok(SocketAddr::from(([0, 0, 0, 0], port))),
        h if h.eq_ignore_ascii_case("localhost") => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        _ => Err(bad()),
    }
}

/// Which Redis deployment `--redis-url` names (SPEC §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisMode {
    /// One Redis server.
    Standalone,
    /// A Redis Cluster (7+): the URL lists seed nodes; pub/sub is sharded.
    Cluster,
    /// A primary found through Redis Sentinel: the URL lists sentinels and the master's name.
    Sentinel,
}

/// `--redis-url` as given, kept with its text for logs (password hidden). What it means
/// depends on `--redis-mode`: [`CommonArgs::redis_config`] reads it.
#[derive(Debug, Clone)]
pub struct RedisUrl {
    raw: String,
    pub display: String,
}

fn parse_redis_url(s: &str) -> Result<RedisUrl, String> {
    if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
        return Err("expected redis://[user:pass@]host:port[/db] or rediss://…".into());
    }
    // The standalone reading checks what every mode shares (scheme, credentials, a port);
    // a host list is checked by `redis_config` once the mode is known.
    if !s.contains(',') {
        fred::types::config::Config::from_url(s).map_err(|e| e.details().to_string())?;
    }
    let display = match (s.find("://"), s.rfind('@')) {
        (Some(scheme), Some(at)) => format!("{}://***{}", &s[..scheme], &s[at..]),
        _ => s.to_string(),
    };
    Ok(RedisUrl {
        raw: s.to_string(),
        display,
    })
}

impl RedisUrl {
    /// fred's configuration for this URL under `mode`. Cluster and sentinel URLs are
    /// rewritten into fred's own forms (`redis-cluster://first?node=second&…`,
    /// `redis-sentinel://first/db?sentinelServiceName=MASTER&node=second&…`).
    pub fn config(&self, mode: RedisMode) -> Result<fred::types::config::Config, String> {
        let url = &self.raw;
        let (scheme, rest) = url.split_once("://").expect("checked by parse_redis_url");
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (format!("{auth}@"), rest),
            None => (String::new(), rest),
        };
        let (hosts, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty()) {
            return Err(format!("--redis-url {}: an empty host", self.display));
        }
        let nodes = |rest: &[&str]| -> String {
            rest.iter()
                .map(|h| format!("node={h}"))
                .collect::<Vec<_>>()
                .join("&")
        };
        let fred_url = match mode {
            RedisMode::Standalone if hosts.len() > 1 => {
                return Err(format!(
                    "--redis-url {} lists {} hosts: use --redis-mode cluster or sentinel",
                    self.display,
                    hosts.len()
                ))
            }
            RedisMode::Standalone => url.clone(),
            RedisMode::Cluster => {
                if !path.is_empty() && path != "0" {
                    return Err(format!(
                        "--redis-url {}: a cluster has only database 0",
                        self.display
                    ));
                }
                let mut u = format!("{scheme}-cluster://{auth}{}", hosts[0]);
                if hosts.len() > 1 {
                    u = format!("{u}?{}", nodes(&hosts[1..]));
                }
                u
            }
            RedisMode::Sentinel => {
                let (master, db) = match path.split_once('/') {
                    Some((master, db)) => (master, db),
                    None => (path, "0"),
                };
                if master.is_empty() {
                    return Err(format!(
                        "--redis-url {}: name the master after the sentinels \
                         (redis://host:26379,host:26380/MASTER)",
                        self.display
                    ));
                }
                let mut u = format!(
                    "{scheme}-sentinel://{auth}{}/{db}?sentinelServiceName={master}",
                    hosts[0]
                );
                if hosts.len() > 1 {
                    u = format!("{u}&{}", nodes(&hosts[1..]));
                }
                u
            }
        };
        fred::types::config::Config::from_url(&fred_url)
            .map_err(|e| format!("--redis-url {}: {}", self.display, e.details()))
    }
}

/// A CIDR (`10.0.0.0/8`, `::1/128`) or a bare address (one host); an empty item (as a
/// trailing comma or an empty environment value leaves) is `None`.
fn parse_cidr(s: &str) -> Result<Option<ipnet::IpNet>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(net) = s.parse::<ipnet::IpNet>() {
        return Ok(Some(net));
    }
    s.parse::<std::net::IpAddr>()
        .map(|ip| Some(ipnet::IpNet::from(ip)))
        .map_err(|_| format!("'{s}' is not an address or CIDR (e.g. 10.0.0.0/8, ::1/128)"))
}

/// An `--allowed-origins` item, normalised; an empty item (a trailing comma, an empty
/// environment value) is "".
fn parse_origin(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Ok(String::new());
    }
    normalise_origin(s)
}

/// An origin as compared: `scheme://host:port` in lower case, the port written out when the
/// scheme has a default one (`https://Example.org` → `https://example.org:443`); `null` as it
/// is. Used for `--allowed-origins` (a trailing `/` is allowed there) and for the `Origin`
/// header. The reason when it is not an origin.
pub(crate) fn normalise_origin(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text == "null" {
        return Ok(text.to_string());
    }
    let bad =
        || format!("'{text}' is not an origin (scheme://host[:port], e.g. https://example.org)");
    let (scheme, rest) = text.split_once("://").ok_or_else(bad)?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok || authority.is_empty() || authority.contains(['/', '@', '?', '#', ' ']) {
        return Err(bad());
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            let port = match after {
                "" => None,
                after => Some(after.strip_prefix(':').ok_or_else(bad)?),
            };
            (format!("[{host}]"), port)
        }
        None => match authority.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => return Err(bad()),
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (authority.to_string(), None),
        },
    };
    if host.is_empty() {
        return Err(bad());
    }
    let scheme = scheme.to_ascii_lowercase();
    let port = match port {
        Some(port) => Some(port.parse::<u16>().map_err(|_| bad())?),
        None => match scheme.as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        },
    };
    let host = host.to_ascii_lowercase();
    Ok(match port {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

/// A path, empty allowed (clap's own path parser refuses an empty value).
fn parse_path(s: &str) -> Result<std::path::PathBuf, String> {
    Ok(s.into())
}

// Allowed ranges. Each keeps a value from breaking the server rather than from being unusual:
// a zero interval spins every session and floods Redis with PINGs, a huge size or duration
// overflows arithmetic at the first connection. README's flag table lists the same numbers.

/// `--ping-interval`: below 100 ms pings would be most of the traffic (and a PING to Redis per
/// interval and connection); above an hour no proxy keeps an idle connection open anyway.
pub(crate) const PING_INTERVAL: (Duration, Duration) = (ms(100), secs(3_600));
/// `--idle-timeout`: at least a second, at most a day (and longer than `--ping-interval`).
pub(crate) const IDLE_TIMEOUT: (Duration, Duration) = (secs(1), secs(86_400));
/// `--handshake-timeout`: a request needs at least a round trip; ten minutes is generous for
/// the slowest link, and past it a stalled request only holds a connection slot.
pub(crate) const HANDSHAKE_TIMEOUT: (Duration, Duration) = (ms(100), secs(600));
/// `--redis-timeout`: shorter than 100 ms would close clients on a Redis hiccup.
pub(crate) const REDIS_TIMEOUT: (Duration, Duration) = (ms(100), secs(3_600));
/// `--shutdown-timeout`: 0 drops clients at once; an hour bounds a stop that systemd waits for.
pub(crate) const SHUTDOWN_TIMEOUT: (Duration, Duration) = (secs(0), secs(3_600));
/// `--log-summary-interval`: 0 (none), else from 100 ms (for tests) to a day.
pub(crate) const LOG_SUMMARY_INTERVAL: (Duration, Duration) = (ms(100), secs(86_400));
/// `--max-message-bytes`: a message is held several times on its way (read buffer, frame,
/// Redis command; per POST, the POST body budget holds eight of them), and Redis refuses bulk
/// strings over 512 MB by default: 256 MiB stays clear of both.
pub(crate) const MAX_MESSAGE_BYTES: (usize, usize) = (1, 256 << 20);
/// `--max-path-bytes`: a request line must fit in 8 KiB (nginx's and our header buffer).
pub(crate) const MAX_PATH_BYTES: (usize, usize) = (1, 8_192);
/// `--worker-threads`: at least one; past 1024, threads would only wait on each other (and
/// each costs a stack).
pub(crate) const WORKER_THREADS: (usize, usize) = (1, 1_024);
/// `--max-connections`: a million is past what one process serves (and its file descriptors).
pub(crate) const MAX_CONNECTIONS: (usize, usize) = (1, 1_000_000);

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ping_interval(s: &str) -> Result<Duration, String> {
    duration_in(s, PING_INTERVAL)
}

fn idle_timeout(s: &str) -> Result<Duration, String> {
    duration_in(s, IDLE_TIMEOUT)
}

fn handshake_timeout(s: &str) -> Result<Duration, String> {
    duration_in(s, HANDSHAKE_TIMEOUT)
}

fn redis_timeout(s: &str) -> Result<Duration, String> {
    duration_in(s, REDIS_TIMEOUT)
}

fn log_summary_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Ok(Duration::ZERO),
        _ => duration_in(s, LOG_SUMMARY_INTERVAL).map_err(|e| format!("{e} (or 0: none)")),
    }
}

fn presence_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Ok(Duration::ZERO),
        d if (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d) => Ok(d),
        _ => Err(format!("'{s}' is out of range (1s to 1h, or 0: off)")),
    }
}

/// `--instance-id`: 1 to 128 printable ASCII bytes (it is part of Redis key names); empty
/// means the default.
fn instance_id(s: &str) -> Result<String, String> {
    if s.len() > 128 {
        return Err("must be 1 to 128 bytes".into());
    }
    if let Some(b) = s.bytes().find(|b| !(0x21..=0x7E).contains(b)) {
        return Err(format!(
            "holds byte 0x{b:02X}: only printable ASCII (0x21-0x7E) is allowed"
        ));
    }
    Ok(s.to_string())
}

/// `--downlink-suffix`: 1 to 64 printable ASCII bytes, none of them a glob character (the
/// publish server subscribes to the downlink channel by name).
fn downlink_suffix(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 {
        return Err("must be 1 to 64 bytes".into());
    }
    if let Some(b) = s
        .bytes()
        .find(|b| !(0x21..=0x7E).contains(b) || matches!(b, b'*' | b'?' | b'['))
    {
        return Err(format!(
            "holds byte 0x{b:02X}: only printable ASCII without * ? [ is allowed"
        ));
    }
    Ok(s.to_string())
}

/// `--history-ttl`: 0 (forever) or 1 s to 10 years.
fn history_ttl(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Ok(Duration::ZERO),
        d if (Duration::from_secs(1)..=Duration::from_secs(10 * 365 * 86_400)).contains(&d) => {
            Ok(d)
        }
        _ => Err(format!(
            "'{s}' is out of range (1s to 10 years, or 0: forever)"
        )),
    }
}

fn shutdown_timeout(s: &str) -> Result<Duration, String> {
    duration_in(s, SHUTDOWN_TIMEOUT)
}

fn max_message_bytes(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    within(n, MAX_MESSAGE_BYTES, |n| match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n => n.to_string(),
    })
}

fn max_path_bytes(s: &str) -> Result<usize, String> {
    within(parse_count(s)?, MAX_PATH_BYTES, |n| n.to_string())
}

fn max_connections(s: &str) -> Result<usize, String> {
    within(parse_count(s)?, MAX_CONNECTIONS, |n| n.to_string())
}

/// `--worker-threads`: 1 to 1024, or empty (0, the default).
fn worker_threads(s: &str) -> Result<usize, String> {
    if s.trim().is_empty() {
        return Ok(0);
    }
    within(parse_count(s)?, WORKER_THREADS, |n| n.to_string())
}

fn parse_count(s: &str) -> Result<usize, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))
}

fn duration_in(s: &str, range: (Duration, Duration)) -> Result<Duration, String> {
    within(parse_duration(s)?, range, |d| {
        humantime::format_duration(d).to_string()
    })
}

/// `value`, or the one-line reason naming the allowed range (clap puts the flag before it).
fn within<T: PartialOrd + Copy>(
    value: T,
    (min, max): (T, T),
    show: impl Fn(T) -> String,
) -> Result<T, String> {
    if value < min || value > max {
        return Err(format!("allowed: {} to {}", show(min), show(max)));
    }
    Ok(value)
}

impl CommonArgs {
    /// The rule no single flag can check: a client that only answers pings (a browser, an
    /// idle subscriber) must not be closed as idle between two of them. A broken rule is
    /// one line for stderr, naming both flags; the server exits 2 with it.
    pub fn check(&self) -> Result<(), String> {
        self.redis_url.config(self.redis_mode)?;
        if self.idle_timeout <= self.ping_interval {
            return Err(format!(
                "--idle-timeout ({}) must be longer than --ping-interval ({})",
                humantime::format_duration(self.idle_timeout),
                humantime::format_duration(self.ping_interval),
            ));
        }
        Ok(())
    }
}

/// Seconds (`30`) or a number with a unit (`30s`, `500ms`, `2m`, `1h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (use 30, 30s, 500ms, 2m)"))
}

/// `--client-queue-bytes`: a size from 1 KiB to 64 MiB (16 times that is one client's ceiling).
fn parse_queue_bytes(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    if !(1024..=64 << 20).contains(&n) {
        return Err(format!("'{s}' is out of range (1KiB to 64MiB)"));
    }
    Ok(n)
}

/// Bytes (`1048576`) or with a binary unit (`64KiB`, `1MiB`; `K`/`M` mean the same).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (use 1048576, 64KiB, 1MiB)"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "K" | "k" | "KiB" | "KB" | "kB" => 1024,
        "M" | "MiB" | "MB" => 1024 * 1024,
        other => return Err(format!("unknown size unit '{other}' (use KiB or MiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_bare_seconds_and_units() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn sizes_accept_bytes_and_binary_units() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert!(parse_size("1GiB").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn bounded_flags_refuse_values_outside_their_range_and_name_it() {
        assert_eq!(ping_interval("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(ping_interval("0").unwrap_err(), "allowed: 100ms to 1h");
        assert!(idle_timeout("999ms").is_err());
        assert!(idle_timeout("2d").is_err());
        assert_eq!(shutdown_timeout("0").unwrap(), Duration::ZERO);
        assert_eq!(
            max_message_bytes("257MiB").unwrap_err(),
            "allowed: 1 to 256MiB"
        );
        assert_eq!(max_message_bytes("256MiB").unwrap(), 256 << 20);
        assert!(max_message_bytes("0").is_err());
        assert!(max_path_bytes("8193").is_err());
        assert!(max_connections("0").is_err());
        assert!(max_connections("18446744073709551616").is_err());
        assert_eq!(worker_threads("0").unwrap_err(), "allowed: 1 to 1024");
        assert!(worker_threads("1025").is_err());
        assert_eq!(worker_threads("1024").unwrap(), 1024);
        assert_eq!(worker_threads("").unwrap(), 0, "empty: the default");
    }

    #[test]
    fn listen_accepts_addr_port_colon_port_and_localhost() {
        let addr = |s: &str| parse_listen(s).map(|a| a.to_string());
        assert_eq!(addr("127.0.0.1:8765").unwrap(), "127.0.0.1:8765");
        assert_eq!(addr("[::1]:8765").unwrap(), "[::1]:8765");
        assert_eq!(addr(":8865").unwrap(), "0.0.0.0:8865");
        assert_eq!(addr("localhost:8865").unwrap(), "127.0.0.1:8865");
        assert_eq!(addr("LOCALHOST:8865").unwrap(), "127.0.0.1:8865");
        for bad in [
            "8865",
            "localhost",
            "example.org:8865",
            ":99999",
            ":",
            "1.2.3:80",
        ] {
            let why = parse_listen(bad).unwrap_err();
            assert!(why.contains(":PORT") && !why.contains('\n'), "{bad}: {why}");
        }
    }

    #[test]
    fn redis_urls_hide_passwords_and_refuse_other_schemes() {
        let url = parse_redis_url("redis://user:secret@127.0.0.1:6380/2").unwrap();
        assert!(!url.display.contains("secret"));
        assert!(parse_redis_url("http://127.0.0.1").is_err());
        assert!(parse_redis_url("redis://127.0.0.1:notaport").is_err());
    }

    #[test]
    fn redis_urls_are_read_by_mode() {
        use fred::types::config::ServerConfig;
        let url = parse_redis_url("redis://u:p@10.0.0.1:7000,10.0.0.2:7001").unwrap();
        assert!(url.config(RedisMode::Standalone).is_err());
        let config = url.config(RedisMode::Cluster).unwrap();
        match config.server {
            ServerConfig::Clustered { hosts, .. } => {
                let mut ports: Vec<u16> = hosts.iter().map(|h| h.port).collect();
                ports.sort_unstable();
                assert_eq!(ports, [7000, 7001]);
            }
            other => panic!("not a cluster: {other:?}"),
        }
        assert_eq!(config.password.as_deref(), Some("p"));
        let url = parse_redis_url("redis://10.0.0.1:26379,10.0.0.2:26380/mymaster/2").unwrap();
        let config = url.config(RedisMode::Sentinel).unwrap();
        assert_eq!(config.database, Some(2));
        match config.server {
            ServerConfig::Sentinel {
                hosts,
                service_name,
                ..
            } => {
                assert_eq!(service_name, "mymaster");
                assert_eq!(hosts.len(), 2);
            }
            other => panic!("not sentinel: {other:?}"),
        }
        let no_master = parse_redis_url("redis://10.0.0.1:26379").unwrap();
        assert!(no_master.config(RedisMode::Sentinel).is_err());
        let db = parse_redis_url("redis://10.0.0.1:7000/3").unwrap();
        assert!(db.config(RedisMode::Cluster).is_err());
        let one = parse_redis_url("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!(one.config(RedisMode::Standalone).unwrap().database, Some(2));
    }
}
