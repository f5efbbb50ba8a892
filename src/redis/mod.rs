//! Connections to Redis: how they are built, kept alive, judged healthy and reported on.
//!
//! Owns: fred configuration, the health checks behind `/healthz` and `lightrelay_redis_up`,
//! and the reporting of connection errors (logs with Redis's own words, the reason shown by
//! `/healthz`, `lightrelay_redis_errors_total` and `lightrelay_redis_reconnects_total`).
//! Until a process first reaches Redis, the failures of all its connections are logged as
//! one: at once with the URL (password hidden), then reminders after 10 s, 30 s, 1 min and
//! every 5 min; once reached, each connection's errors are logged by kind with back-off.
//!
//! Rules that keep delivery honest under faults (fred 10.1.0, pinned in Cargo.toml; read its
//! `router/utils.rs` and `protocol/command.rs` before changing them):
//! - `max_command_attempts = 1`: fred never writes a command twice. With more attempts it
//!   re-sent every PUBLISH in flight on a new connection after a reconnect, while Redis also
//!   ran the originals it had buffered (a paused Redis duplicated a whole window).
//! - No unresponsive check and no forced reconnect of a connection that is only slow: a
//!   paused Redis is waited for (publishers by `--redis-timeout`, the subscriber by its PING),
//!   and shown as 503 meanwhile. Dead peers are found by TCP keepalive. Only the subscriber is
//!   reconnected by force, once its PING has failed for `--redis-timeout`: a deaf subscriber
//!   is the failure that silently stops delivery.
//! - The subscriber retries every 25 ms, the publishers back off from 100 ms to 2 s, so after a
//!   Redis restart the subscriber is usually subscribed again before the publishers flush what
//!   they held (`bench/restart_gap.sh`, an acked publisher, Redis SIGKILLed and restarted:
//!   before, a 2.7 s outage lost ~930 acknowledged messages at the subscriber in 5 of 8 runs
//!   and a 1.6 s one ~390 in 3 of 6; now 0 of 4 and ~420 in 2 of 6). Publishers retrying only
//!   every second made it 0 in 16 runs, but put a second's stall into acknowledged publishing
//!   (`bin/bench --only ingest`: ack p99 1.1 s instead of 0.2 s), so they do not.
//! - `--redis-mode sentinel`: fred asks the sentinels for the primary and checks its ROLE at
//!   every (re)connect, and Sentinel disconnects the clients of a server it demotes; the
//!   health check also asks the command connections ROLE (at least every second) and
//!   replaces one whose server became a replica some other way (see `Probe`): a PUBLISH
//!   answered there reaches no subscriber of the primary, so it must not be acknowledged.
//! - Subscriptions are the hub's (`hub`): fred's `manage_subscriptions` is not used
//!   (in 10.1.0 it sends an empty PSUBSCRIBE after every reconnect, whose error lands on the
//!   next command, our health PING).
//!
//! - Cluster (`--redis-mode cluster`, SPEC §11): pub/sub is sharded ([`sharded`]); fred
//!   discovers the cluster from the seeds and then from its cached routing table
//!   (`ClusterDiscoveryPolicy::UseCache`: after a failover the seeds may be the dead ones), and
//!   follows MOVED/ASK itself (redirections are not attempts: `max_command_attempts = 1`
//!   still holds). Each check PINGs every primary of fred's routing table on its own
//!   connection, so `/healthz` names the shard that does not answer.
//!
//! Must not: decide what to subscribe to (the hub does) or what to publish (sessions do).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::lock;
use std::time::Duration;

use fred::clients::{Pool, SubscriberClient};
use fred::interfaces::{ClientLike, ClusterInterface, EventInterface};
use fred::prelude::{Builder, ReconnectPolicy};
use fred::types::config::{Options, TlsConnector};
use fred::types::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::server::config::{CommonArgs, RedisMode};
use crate::server::metrics::{Metrics, RedisErrorKind};
use crate::Error;

/// How many messages fred may hold for the hub before it overwrites the oldest (counted as
/// `redis_lagged`). fred's default of 32 loses messages in any burst. fred allocates every
/// one of a client's event channels (messages, errors, reconnects, keyspace, …) at this size,
/// so it is set on the subscriber only: 16,384 costs ~12 MiB there (on all three clients it
/// cost 36 MiB). With 4,096, a 1,000 channels × 10 subscribers burst at full rate still lost
/// hundreds of messages even with the hub on its own thread.
pub(crate) const MESSAGE_BUFFER: usize = 16_384;

/// The publish server's downlink subscriber (SPEC §10): messages to devices come now and
/// then, not in bursts of thousands, and 16,384 slots cost its every process ~12 MiB (its
/// RSS at start went from 16 to 29 MiB); 1,024 cost under 1 MiB. A longer burst is counted
/// in `redis_lagged`, never lost silently.
pub(crate) const DOWNLINK_BUFFER: usize = 1_024;

/// Which connection a builder is for: they differ in how fast they reconnect.
#[derive(Clone, Copy)]
enum Purpose {
    Publish,
    Subscribe,
}

/// Whether this process talks to a Redis Cluster: set once, from `--redis-mode`, when its
/// first connection is built (every connection of a process shares the mode).
static SHARDED: AtomicBool = AtomicBool::new(false);

/// Whether pub/sub is sharded (`--redis-mode cluster`): SPUBLISH/SSUBSCRIBE instead of
/// PUBLISH/SUBSCRIBE, and names that must share a slot are hash-tagged.
pub(crate) fn sharded() -> bool {
    SHARDED.load(Ordering::Relaxed)
}

/// The cluster hash slot of `name` (a key or a shard channel), as Redis computes it.
pub(crate) fn slot(name: &[u8]) -> u16 {
    fred::util::redis_keyslot(name)
}

/// A hash tag (`{…}`) that puts any name starting with it on `name`'s cluster slot: the
/// tag `name` itself has, else `{name}` when it holds no `}`, else a short number whose own
/// slot is `name`'s (found once; every slot is reached by a number below a few hundred
/// thousand).
pub(crate) fn slot_tag(name: &str) -> String {
    let bytes = name.as_bytes();
    if let Some(open) = name.find('{') {
        if let Some(close) = name[open + 1..].find('}') {
            if close > 0 {
                return name[open..open + close + 2].to_string();
            }
        }
    }
    if !name.contains('}') {
        return format!("{{{name}}}");
    }
    let want = slot(bytes);
    (0u32..10_000_000)
        .map(|n| n.to_string())
        .find(|n| slot(n.as_bytes()) == want)
        .map_or_else(
            || format!("{{{}}}", name.replace('}', "")),
            |n| format!("{{{n}}}"),
        )
}

fn builder(args: &CommonArgs, purpose: Purpose) -> Result<Builder, Error> {
    let mut config = args
        .redis_url
        .config(args.redis_mode)
        .map_err(Error::Config)?;
    if let fred::types::config::ServerConfig::Clustered { policy, .. } = &mut config.server {
        SHARDED.store(true, Ordering::Relaxed);
        // After a failover the seed nodes may be the dead ones: look in the routing table too.
        *policy = fred::types::config::ClusterDiscoveryPolicy::UseCache;
    }
    // Keep retrying the first connection too: a relay starts (and listens) while Redis is down.
    config.fail_fast = false;
    // Empty (`LIGHTRELAY_REDIS_CA=` in the defaults file) means not set.
    if let Some(ca) = args
        .redis_ca
        .as_ref()
        .filter(|ca| !ca.as_os_str().is_empty())
    {
        if config.tls.is_none() {
            return Err(Error::Config(
                "--redis-ca is set but --redis-url is not rediss://".into(),
            ));
        }
        config.tls = Some(tls_with_ca(ca)?.into());
    }
    let policy = match purpose {
        Purpose::Subscribe => ReconnectPolicy::new_constant(0, 25),
        Purpose::Publish => ReconnectPolicy::new_exponential(0, 100, 2_000, 2),
    };
    let mut builder = Builder::from_config(config);
    builder.set_policy(policy).with_connection_config(|conn| {
        conn.connection_timeout = Duration::from_secs(5);
        // A command is written once, never again (see the module's doc).
        conn.max_command_attempts = 1;
        conn.unresponsive = Default::default();
        conn.tcp.nodelay = Some(true);
        conn.tcp.keepalive = Some(
            fred::socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(10))
                .with_interval(Duration::from_secs(5)),
        );
    });
    Ok(builder)
}

/// The system's roots plus the certificates in `path` (`--redis-ca`), for `rediss://`.
fn tls_with_ca(path: &Path) -> Result<TlsConnector, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad =
        |e: &dyn std::fmt::Display| Error::Config(format!("--redis-ca {}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no certificate found"));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| bad(&e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(config))
}

/// The PUBLISH connections, connecting (and reconnecting) in the background.
pub(crate) fn connect_publisher(args: &CommonArgs) -> Result<Pool, Error> {
    let pool = builder(args, Purpose::Publish)?.build_pool(args.redis_connections as usize)?;
    pool.connect_pool();
    Ok(pool)
}

/// The SUBSCRIBE connection, connecting in the background, holding up to `buffer` messages
/// the hub has not read yet ([`MESSAGE_BUFFER`], [`DOWNLINK_BUFFER`]). The hub subscribes
/// (and re-subscribes after every reconnect) what its clients need.
pub(crate) fn connect_subscriber(
    args: &CommonArgs,
    buffer: usize,
) -> Result<SubscriberClient, Error> {
    let client = builder(args, Purpose::Subscribe)?
        .with_performance_config(|perf| perf.broadcast_channel_capacity = buffer)
        .build_subscriber_client()?;
    client.connect();
    Ok(client)
}

/// The connection the subscribe server reads channel histories on (SPEC §9), connecting in
/// the background; it reconnects as fast as the subscriber does, since resuming a lost
/// subscription reads on it right after.
pub(crate) fn connect_reader(args: &CommonArgs) -> Result<fred::clients::Client, Error> {
    let client = builder(args, Purpose::Subscribe)?.build()?;
    client.connect();
    Ok(client)
}

/// What `/healthz` reports: one check per Redis connection this server uses.
pub(crate) struct Health {
    checks: Mutex<Vec<Arc<Check>>>,
    /// `--redis-mode sentinel`: command connections are checked with ROLE, not PING (see
    /// [`Probe`]).
    sentinel: bool,
    /// `--redis-url` with its password hidden, for logs.
    url: String,
    /// Whether any connection has reached Redis yet, and the reminders while none has.
    reach: Mutex<Reach>,
}

/// Until a process first reaches Redis, its connections' failures are reported together:
/// one line at the first, then reminders (see [`reminder_at`]), whatever the number of
/// connections failing.
enum Reach {
    Never(Option<Unreached>),
    Reached,
}

struct Unreached {
    first: Instant,
    failures: u64,
    reminders: u32,
}

/// When the `n`th reminder is due, counted from the first failure: after 10 s, 30 s and
/// 1 min, then every 5 min.
fn reminder_at(n: u32) -> Duration {
    match n {
        0 => Duration::from_secs(10),
        1 => Duration::from_secs(30),
        n => Duration::from_secs(60 + 300 * u64::from(n - 2)),
    }
}

struct Check {
    name: String,
    up: AtomicBool,
    reason: Mutex<String>,
    /// The last connection error fred reported, in Redis's (or the OS's) words.
    last_error: Mutex<Option<String>>,
    /// Wakes the PING loop at once: fred reported an error or a reconnect, so the verdict
    /// is not left to wait for the next `--ping-interval`.
    wake: tokio::sync::Notify,
    /// What the check asks the connection.
    probe: Probe,
}

/// How a health check treats a connection that stops answering.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnDeaf {
    /// Wait: it may be slow (a command connection: publish, history).
    Wait,
    /// Reconnect once it has not answered for this long (a subscriber).
    Reconnect(Duration),
}

/// What a health check asks its connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Probe {
    /// PING: the connection answers.
    Ping,
    /// ROLE (`--redis-mode sentinel`, command connections): the connection answers *and* its
    /// server is a primary. fred asks the sentinels and checks ROLE only when it connects
    /// (fred 10.1.0 `router/sentinel.rs`, `check_primary_node_role`); Sentinel disconnects
    /// the clients of a server it demotes (CLIENT KILL TYPE normal and pubsub), but a primary
    /// demoted otherwise (`FAILOVER`, `REPLICAOF` run by hand) keeps its clients, and a
    /// PUBLISH on a replica is answered (with its local receivers) yet reaches no subscriber
    /// of the primary. So such a connection is 503 and is replaced: fred asks the sentinels
    /// again, and publishing waits until it reaches a primary. ROLE is asked every
    /// `--ping-interval` but at least every second ([`ROLE_INTERVAL`]), so what such a
    /// connection acknowledges before it is replaced is at most a second's worth; a demotion
    /// by Sentinel disconnects at once and loses none. Subscribers keep PING (RESP2
    /// allows nothing else once subscribed) and may stay on a replica: it receives every
    /// PUBLISH of its primary through replication.
    Role,
}

impl Health {
    /// Checks of connections to the Redis of `--redis-url` (shown with its password hidden).
    pub(crate) fn new(args: &CommonArgs) -> Self {
        Health {
            checks: Mutex::default(),
            sentinel: args.redis_mode == RedisMode::Sentinel,
            url: args.redis_url.display.clone(),
            reach: Mutex::new(Reach::Never(None)),
        }
    }

    /// A connection that never reached Redis failed with `error`: said at the first failure
    /// of the process, then as reminders. `false` once some connection has reached Redis
    /// (its errors are then reported as a lost connection's are).
    fn unreachable(&self, error: &str) -> bool {
        let mut reach = lock(&self.reach);
        let Reach::Never(unreached) = &mut *reach else {
            return false;
        };
        let now = Instant::now();
        let Some(unreached) = unreached else {
            tracing::warn!(
                redis = %self.url,
                %error,
                "cannot connect to Redis; retrying (meanwhile publishing waits and /healthz \
                 answers 503)"
            );
            *unreached = Some(Unreached {
                first: now,
                failures: 1,
                reminders: 0,
            });
            return true;
        };
        unreached.failures += 1;
        let elapsed = now.duration_since(unreached.first);
        if elapsed >= reminder_at(unreached.reminders) {
            tracing::warn!(
                redis = %self.url,
                %error,
                failures = unreached.failures,
                since = %humantime::format_duration(Duration::from_secs(elapsed.as_secs())),
                "still cannot connect to Redis; retrying"
            );
            while elapsed >= reminder_at(unreached.reminders) {
                unreached.reminders += 1;
            }
        }
        true
    }

    /// A connection reached Redis: how long the process had failed to, if it had.
    fn reached(&self) -> Option<Duration> {
        let mut reach = lock(&self.reach);
        let was = std::mem::replace(&mut *reach, Reach::Reached);
        match was {
            Reach::Never(Some(unreached)) => Some(unreached.first.elapsed()),
            _ => None,
        }
    }

    /// `Ok` while every connection answered its last PING, else the first reason why not.
    pub(crate) fn status(&self) -> Result<(), String> {
        for check in lock(&self.checks).iter() {
            if !check.up.load(Ordering::Relaxed) {
                let reason = lock(&check.reason);
                return Err(match lock(&check.last_error).as_deref() {
                    Some(error) if reason.starts_with("not connected") => {
                        format!("redis {}: {} (last error: {error})", check.name, reason)
                    }
                    _ => format!("redis {}: {}", check.name, reason),
                });
            }
        }
        Ok(())
    }

    /// Each connection's state, for `/status.json`: its name, whether it answered its last
    /// PING and, when not, why.
    pub(crate) fn connections(&self) -> Vec<crate::server::status::RedisConnection> {
        lock(&self.checks)
            .iter()
            .map(|check| {
                let up = check.up.load(Ordering::Relaxed);
                crate::server::status::RedisConnection {
                    name: check.name.clone(),
                    up,
                    reason: (!up).then(|| lock(&check.reason).clone()),
                }
            })
            .collect()
    }

    /// Watch `client`: PING it every `interval` (every 500 ms while it fails) until shutdown,
    /// and report its connection errors and reconnects.
    pub(crate) fn watch<C>(
        self: &Arc<Self>,
        name: String,
        client: C,
        interval: Duration,
        on_deaf: OnDeaf,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) where
        C: ClientLike + ClusterInterface + EventInterface + Clone + Send + Sync + 'static,
    {
        // The command connections are the ones watched with `Wait` (subscribers reconnect).
        let probe = match on_deaf {
            OnDeaf::Wait if self.sentinel => Probe::Role,
            _ => Probe::Ping,
        };
        let check = Arc::new(Check {
            name,
            up: AtomicBool::new(false),
            reason: Mutex::new("not connected yet".into()),
            last_error: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            probe,
        });
        lock(&self.checks).push(check.clone());
        tokio::spawn(report_events(
            self.clone(),
            check.clone(),
            client.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(ping_loop(
            self.clone(),
            check,
            client,
            interval,
            on_deaf,
            metrics,
            shutdown,
        ));
    }
}

async fn ping_loop<C>(
    health: Arc<Health>,
    check: Arc<Check>,
    client: C,
    interval: Duration,
    on_deaf: OnDeaf,
    metrics: Metrics,
    shutdown: CancellationToken,
) where
    C: ClientLike + ClusterInterface + Clone + Send + Sync + 'static,
{
    let timeout = interval.clamp(Duration::from_millis(200), Duration::from_secs(5));
    let options = Options {
        timeout: Some(timeout),
        fail_fast: true,
        max_attempts: Some(1),
        ..Default::default()
    };
    // ROLE is asked at least every second: a connection on a replica acknowledges
    // PUBLISHes that reach nobody on the primary, so it must not wait for a 30 s PING.
    let probe = check.probe;
    let interval = match probe {
        Probe::Role => interval.min(ROLE_INTERVAL),
        Probe::Ping => interval,
    };
    // Since when the connection has looked open but not answered.
    let mut deaf_since: Option<Instant> = None;
    loop {
        // Its server answered ROLE as a replica's.
        let mut on_replica = false;
        let answer = if client.is_connected() {
            // fred does not apply `options.timeout` to every command on every kind of
            // connection (a PING on a subscriber waiting on a deaf Redis was seen to hang),
            // so the deadline is enforced here too.
            match probe {
                Probe::Ping if sharded() => ping_every_primary(&client, &options, timeout).await,
                Probe::Ping => ping_within(&client, &options, timeout).await,
                Probe::Role => {
                    let with_options = client.with_options(&options);
                    let role =
                        with_options.custom::<Value, _>(fred::cmd!("ROLE"), Vec::<Value>::new());
                    match tokio::time::timeout(timeout, role).await {
                        Ok(Ok(answer)) => {
                            on_replica = !is_primary(&answer);
                            if on_replica {
                                Err(replica_reason(&answer, &client))
                            } else {
                                Ok(())
                            }
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no answer to ROLE within {timeout:?}")),
                    }
                }
            }
        } else {
            Err("not connected".to_string())
        };
        let up = answer.is_ok();
        match &answer {
            Err(reason) if check.up.load(Ordering::Relaxed) => {
                tracing::warn!(connection = %check.name, %reason, "Redis stopped answering");
            }
            Ok(_) if !check.up.load(Ordering::Relaxed) => {
                tracing::info!(connection = %check.name, "Redis answers");
            }
            _ => {}
        }
        // Record the verdict before trying to repair anything: /healthz must say 503 while
        // Redis is deaf, not only once it answers again.
        if let Err(reason) = answer {
            *lock(&check.reason) = reason;
        }
        check.up.store(up, Ordering::Relaxed);
        metrics.redis_up.set(i64::from(health.status().is_ok()));
        deaf_since = match (up, client.is_connected()) {
            (false, true) => Some(deaf_since.unwrap_or_else(Instant::now)),
            _ => None,
        };
        if on_replica {
            tracing::warn!(
                connection = %check.name,
                "Redis connection on a replica: reconnecting through the sentinels"
            );
            // What is in flight fails, unacknowledged (max_command_attempts = 1).
            let _ = tokio::time::timeout(timeout, client.force_reconnection()).await;
        }
        if let (OnDeaf::Reconnect(patience), Some(since)) = (on_deaf, deaf_since) {
            if since.elapsed() >= patience {
                tracing::warn!(
                    connection = %check.name,
                    silent_for = ?since.elapsed(),
                    "Redis connection open but deaf past --redis-timeout: reconnecting"
                );
                // fred fails (does not re-send) what was in flight: max_command_attempts = 1.
                let _ = tokio::time::timeout(timeout, client.force_reconnection()).await;
                deaf_since = None;
            }
        }
        let wait = if up {
            interval
        } else {
            interval.min(Duration::from_millis(500))
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = check.wake.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// How often, at most, a command connection's ROLE is asked in sentinel mode ([`Probe`]).
const ROLE_INTERVAL: Duration = Duration::from_secs(1);

/// Whether `role` (a ROLE answer) is a primary's.
fn is_primary(role: &Value) -> bool {
    match role {
        Value::Array(values) => values
            .first()
            .and_then(Value::as_str)
            .is_some_and(|first| first == "master"),
        _ => false,
    }
}

/// `/healthz`'s reason for a connection whose server answered ROLE with `role`, not as a
/// primary.
fn replica_reason<C: ClientLike>(role: &Value, client: &C) -> String {
    let servers: Vec<String> = client
        .active_connections()
        .iter()
        .map(ToString::to_string)
        .collect();
    let said = match role {
        Value::Array(values) => values.first().and_then(Value::as_str),
        _ => None,
    };
    format!(
        "on a replica, not the primary ({} answers ROLE {}): reconnecting through the \
         sentinels",
        servers.join(", "),
        said.as_deref().unwrap_or("?")
    )
}

/// One PING with `options`, answered within `timeout`.
async fn ping_within<C: ClientLike>(
    client: &C,
    options: &Options,
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, client.with_options(options).ping::<Value>(None)).await {
        Ok(answer) => answer.map(drop).map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer to PING within {timeout:?}")),
    }
}

/// PING every primary of `client`'s cluster routing table, each on its own connection: `Ok`
/// when all answer, else the first that did not, named. When one fails, the routing table is
/// read again (CLUSTER SLOTS), so a failed-over shard is judged on its new primary next time.
async fn ping_every_primary<C>(
    client: &C,
    options: &Options,
    timeout: Duration,
) -> Result<(), String>
where
    C: ClientLike + ClusterInterface + Clone + Send + Sync + 'static,
{
    let primaries = client
        .cached_cluster_state()
        .map(|state| state.unique_primary_nodes())
        .unwrap_or_default();
    if primaries.is_empty() {
        return Err("the cluster's routing table is not known yet".into());
    }
    let pings = primaries.into_iter().map(|node| async move {
        let options = Options {
            cluster_node: Some(node.clone()),
            ..options.clone()
        };
        ping_within(client, &options, timeout)
            .await
            .map_err(|reason| format!("cluster node {node}: {reason}"))
    });
    let answer = futures_util::future::join_all(pings)
        .await
        .into_iter()
        .collect::<Result<Vec<()>, String>>()
        .map(drop);
    if answer.is_err() {
        let _ = tokio::time::timeout(timeout, client.sync_cluster()).await;
    }
    answer
}

/// The kind of a connection error, so that each kind is logged when it first happens, then
/// again with back-off, never as a flood.
fn error_class(error: &fred::error::Error) -> RedisErrorKind {
    use fred::error::ErrorKind;
    match error.kind() {
        ErrorKind::Auth => RedisErrorKind::auth,
        ErrorKind::Tls => RedisErrorKind::tls,
        ErrorKind::Timeout => RedisErrorKind::timeout,
        // fred 10.1.0 reports certificate failures as IO errors.
        ErrorKind::IO if error.details().contains("Certificate") => RedisErrorKind::tls,
        ErrorKind::IO if error.details().contains("refused") => RedisErrorKind::refused,
        ErrorKind::IO => RedisErrorKind::io,
        ErrorKind::Config | ErrorKind::Url => RedisErrorKind::config,
        _ => RedisErrorKind::other,
    }
}

/// When to log a repeated error of one kind again: 10 s after the first, then doubling to
/// 10 minutes.
struct Repeats {
    count: u64,
    next_log: Instant,
    gap: Duration,
}

/// Log connection errors and reconnects of `client` as they come, until shutdown.
async fn report_events<C>(
    health: Arc<Health>,
    check: Arc<Check>,
    client: C,
    metrics: Metrics,
    shutdown: CancellationToken,
) where
    C: EventInterface,
{
    let mut errors = client.error_rx();
    let mut reconnects = client.reconnect_rx();
    let mut seen: HashMap<RedisErrorKind, Repeats> = HashMap::new();
    let mut connected_once = false;
    loop {
        tokio::select! {
            error = errors.recv() => match error {
                Ok((error, server)) => {
                    let class = error_class(&error);
                    metrics.redis_error(class);
                    // In a cluster, which node failed matters: name it.
                    let text = match server.filter(|_| sharded()) {
                        Some(server) => format!("{error} (cluster node {server})"),
                        None => error.to_string(),
                    };
                    *lock(&check.last_error) = Some(text.clone());
                    // A lost connection is a verdict now, not at the next PING (up to
                    // --ping-interval later): /healthz and lightrelay_redis_up say so at once,
                    // and the PING loop checks again right away.
                    if check.up.swap(false, Ordering::Relaxed) {
                        *lock(&check.reason) = format!("connection error: {text}");
                        metrics.redis_up.set(0);
                        tracing::warn!(connection = %check.name, error = %text, "Redis connection lost");
                    }
                    check.wake.notify_one();
                    if !connected_once && health.unreachable(&text) {
                        continue;
                    }
                    let now = Instant::now();
                    match seen.get_mut(&class) {
                        None => {
                            tracing::warn!(connection = %check.name, kind = ?class, error = %text, "Redis connection error");
                            let gap = Duration::from_secs(10);
                            seen.insert(class, Repeats { count: 0, next_log: now + gap, gap });
                        }
                        Some(repeats) => {
                            repeats.count += 1;
                            if now >= repeats.next_log {
                                tracing::warn!(connection = %check.name, kind = ?class, error = %text, repeated = repeats.count, "Redis connection error (repeated)");
                                repeats.count = 0;
                                repeats.gap = (repeats.gap * 2).min(Duration::from_secs(600));
                                repeats.next_log = now + repeats.gap;
                            }
                        }
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
            server = reconnects.recv() => match server {
                Ok(server) => {
                    if connected_once {
                        metrics.redis_reconnect(&check.name);
                        tracing::info!(connection = %check.name, %server, "reconnected to Redis");
                    } else {
                        match health.reached() {
                            Some(after) => tracing::info!(
                                connection = %check.name,
                                %server,
                                redis = %health.url,
                                after = %humantime::format_duration(Duration::from_millis(after.as_millis() as u64)),
                                "connected to Redis"
                            ),
                            None => tracing::info!(connection = %check.name, %server, "connected to Redis"),
                        }
                    }
                    connected_once = true;
                    seen.clear();
                    // Confirm with a PING now rather than at the next interval.
                    check.wake.notify_one();
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever follows it, a name starting with `slot_tag(name)` is on `name`'s slot (CRC16,
    /// as Redis computes it), however `name` uses `{` and `}`.
    #[test]
    fn a_slot_tag_puts_a_name_on_the_slot_of_the_name_it_was_made_for() {
        for name in [
            "lightlevel/_presence",
            "{lightlevel}/_presence",
            "light{level}/_presence",
            "light}level/_presence",
            "light{}level}/_presence",
            "}",
            "{}",
        ] {
            let tag = slot_tag(name);
            for rest in [" instances", " instance gw1:8765", " presence x}{y"] {
                let key = format!("{tag}{rest}");
                assert_eq!(slot(key.as_bytes()), slot(name.as_bytes()), "{name}: {key}");
            }
        }
    }
}
