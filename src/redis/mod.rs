//! Connections to Redis: how they are built, kept alive and judged healthy.
//!
//! Owns: fred configuration (a reconnect policy, without which fred never reconnects; a
//! broadcast buffer large enough for bursts; unresponsive-connection detection), the
//! subscriber client that re-subscribes its channels after every reconnect, and the health
//! checks behind `/healthz` and `lightrelay_redis_up`: a PING on each connection this server
//! uses, at least every `--ping-interval`, with a forced reconnect when a connection that
//! looks open does not answer (a deaf subscriber is the failure that matters most).
//! Must not: decide what to subscribe to (the hub does) or what to publish (sessions do).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::clients::{Pool, SubscriberClient};
use fred::interfaces::ClientLike;
use fred::prelude::{Builder, ReconnectPolicy};
use fred::types::config::{Options, UnresponsiveConfig};
use fred::types::Value;
use tokio_util::sync::CancellationToken;

use crate::server::config::CommonArgs;
use crate::server::metrics::Metrics;

/// How many messages fred may hold for the hub before it overwrites the oldest (counted as
/// `redis_lagged`). fred's default of 32 loses messages in any burst. fred allocates every
/// one of a client's event channels (messages, errors, reconnects, keyspace, …) at this size,
/// so it is set on the subscriber only: 16,384 costs ~12 MiB there (on all three clients it
/// cost 36 MiB). With 4,096, a 1,000 channels × 10 subscribers burst at full rate still lost
/// hundreds of messages even with the hub on its own thread.
const MESSAGE_BUFFER: usize = 16_384;

fn builder(args: &CommonArgs) -> Builder {
    let mut config = args.redis_url.config.clone();
    // Keep retrying the first connection too: a relay starts (and listens) while Redis is down.
    config.fail_fast = false;
    let mut builder = Builder::from_config(config);
    builder
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .with_connection_config(|conn| {
            conn.connection_timeout = Duration::from_secs(5);
            // Retries are bounded by --redis-timeout in the publish window, not by a count.
            conn.max_command_attempts = 1_000;
            conn.unresponsive = UnresponsiveConfig {
                max_timeout: Some((args.redis_timeout / 2).max(Duration::from_secs(1))),
                interval: Duration::from_millis(500),
            };
            conn.tcp.nodelay = Some(true);
        });
    builder
}

/// The PUBLISH connections, connecting (and reconnecting) in the background.
pub fn connect_publisher(args: &CommonArgs) -> Result<Pool, fred::error::Error> {
    let pool = builder(args).build_pool(args.redis_connections as usize)?;
    pool.connect_pool();
    Ok(pool)
}

/// The SUBSCRIBE connection, connecting in the background and re-subscribing every tracked
/// channel after each reconnect.
pub fn connect_subscriber(args: &CommonArgs) -> Result<SubscriberClient, fred::error::Error> {
    let client = builder(args)
        .with_performance_config(|perf| perf.broadcast_channel_capacity = MESSAGE_BUFFER)
        .build_subscriber_client()?;
    client.connect();
    client.manage_subscriptions();
    Ok(client)
}

/// What `/healthz` reports: one check per Redis connection this server uses.
#[derive(Default)]
pub struct Health {
    checks: Mutex<Vec<Arc<Check>>>,
}

struct Check {
    name: String,
    up: AtomicBool,
    reason: Mutex<String>,
}

impl Health {
    /// `Ok` while every connection answered its last PING, else the first reason why not.
    pub fn status(&self) -> Result<(), String> {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        for check in checks.iter() {
            if !check.up.load(Ordering::Relaxed) {
                let reason = check.reason.lock().unwrap_or_else(|e| e.into_inner());
                return Err(format!("redis {}: {}", check.name, reason));
            }
        }
        Ok(())
    }

    /// PING `client` every `interval` (every 500 ms while it fails) until shutdown.
    pub fn watch<C>(
        self: &Arc<Self>,
        name: String,
        client: C,
        interval: Duration,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) where
        C: ClientLike + Clone + Send + Sync + 'static,
    {
        let check = Arc::new(Check {
            name,
            up: AtomicBool::new(false),
            reason: Mutex::new("not connected yet".into()),
        });
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(check.clone());
        let health = self.clone();
        let timeout = interval.clamp(Duration::from_millis(200), Duration::from_secs(5));
        tokio::spawn(async move {
            let options = Options {
                timeout: Some(timeout),
                fail_fast: true,
                max_attempts: Some(1),
                ..Default::default()
            };
            loop {
                let answer = if client.is_connected() {
                    // fred does not apply `options.timeout` to every command on every kind of
                    // connection (a PING on a subscriber waiting on a deaf Redis was seen to
                    // hang), so the deadline is enforced here too.
                    let with_options = client.with_options(&options);
                    match tokio::time::timeout(timeout, with_options.ping::<Value>(None)).await {
                        Ok(answer) => answer.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("no answer to PING within {timeout:?}")),
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
                // Record the verdict before trying to repair anything: /healthz must say 503
                // while Redis is deaf, not only once it answers again.
                if let Err(reason) = answer {
                    *check.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
                }
                check.up.store(up, Ordering::Relaxed);
                metrics.redis_up.set(i64::from(health.status().is_ok()));
                if !up && client.is_connected() {
                    // Open but deaf: reconnecting is the only way back to a live subscription
                    // (fred re-subscribes every tracked channel once connected again).
                    let _ = tokio::time::timeout(timeout, client.force_reconnection()).await;
                }
                let wait = if up {
                    interval
                } else {
                    interval.min(Duration::from_millis(500))
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }
}
