//! The subscribe side (SPEC §4, §7): Redis SUBSCRIBE in, WebSocket frames out.
//!
//! Owns: the subscribe server's [`Role`] (a connection's query — `format`, `last`, `since`, a
//! pattern path — read into what it asks the [`hub`]; the connection joins the hub on its
//! channel or pattern with its outbox before its 101; with `--accept-publish` it also
//! publishes through the publish side's window), the process's hub and its history reader,
//! and the live page's files ([`page`]); what `/status.json` shows of it (the hub's topics,
//! the Redis connections, the connection the fleet is read on);
//! and `POST /down/PATH` (SPEC §10: one PUBLISH on the
//! path's downlink channel and one read of the fleet's presence, on a connection of its own).
//! Must not: write to a client's socket outside the outbox's rules (`server::outbox`), or
//! block the hub on a client.

pub(crate) mod page;

use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::auth::Grant;
use crate::hub::{self, Format, Hub, Membership, Replay, Topic};
use crate::presence;
use crate::publish::{self, Publisher};
use crate::redis::{connect_reader, connect_subscriber, Health, OnDeaf};
use crate::server::channel::ChannelName;
use crate::server::config::{CommonArgs, SlowConsumer, SubscribeArgs};
use crate::server::history::StreamId;
use crate::server::http::{self, Reply};
use crate::server::metrics::Metrics;
use crate::server::session::{self, Ending};
use crate::server::status::RoleStatus;
use crate::server::write::outbox::{Limits, Outbox};
use crate::server::{Relay, Role, Upgraded};
use crate::Error;

/// Run `lightrelay-subscribe` until SIGTERM/SIGINT. This is all its binary calls.
pub fn main(args: SubscribeArgs) -> ExitCode {
    let SubscribeArgs {
        listen,
        client_queue,
        client_queue_bytes,
        slow_consumer_grace,
        slow_consumer,
        accept_publish,
        common,
    } = args;
    let limits = Limits::new(
        client_queue as usize,
        client_queue_bytes,
        slow_consumer_grace,
    );
    crate::server::main(listen, common, move |common, metrics, shutdown| {
        SubscribeRole::start(
            common,
            metrics,
            shutdown,
            limits,
            slow_consumer,
            accept_publish,
        )
    })
}

/// What the subscribe server shares between its connections.
pub(crate) struct SubscribeRole {
    hub: Arc<Hub>,
    limits: Limits,
    slow_consumer: SlowConsumer,
    /// `--accept-publish`: the PUBLISH pool subscribers' frames (and POSTs) go through, each
    /// subscriber's publish window made from it.
    windows: Option<Arc<publish::Windows>>,
    /// `POST /down/PATH`'s connection: its PUBLISH and the presence read.
    downlink: fred::clients::Client,
    health: Arc<Health>,
    /// Presence's own connection (SPEC §10): this instance is in the fleet with no paths.
    presence: Option<fred::clients::Client>,
}

impl SubscribeRole {
    fn start(
        common: &CommonArgs,
        metrics: &Metrics,
        shutdown: &CancellationToken,
        limits: Limits,
        slow_consumer: SlowConsumer,
        accept_publish: bool,
    ) -> Result<Self, Error> {
        let health = Arc::new(Health::new(common));
        let publisher = accept_publish
            .then(|| Publisher::start(common, &health, metrics, shutdown))
            .transpose()?;
        let subscriber = connect_subscriber(common, crate::redis::MESSAGE_BUFFER)?;
        health.watch(
            "subscriber".into(),
            subscriber.clone(),
            common.ping_interval,
            OnDeaf::Reconnect(common.redis_timeout),
            metrics.clone(),
            shutdown.clone(),
        );
        let history = (common.history > 0)
            .then(|| -> Result<hub::History, Error> {
                let reader = connect_reader(common)?;
                health.watch(
                    "history".into(),
                    reader.clone(),
                    common.ping_interval,
                    OnDeaf::Wait,
                    metrics.clone(),
                    shutdown.clone(),
                );
                Ok(hub::History {
                    reader,
                    limit: limits.messages,
                    // Loopback answers in well under a millisecond; a read this slow means
                    // the connection is being replaced, and the hub must not wait on it.
                    patience: common.redis_timeout.min(std::time::Duration::from_secs(2)),
                })
            })
            .transpose()?;
        let hub = Hub::new(metrics.clone(), history);
        if common.redis_mode == crate::server::config::RedisMode::Cluster {
            hub.read_slots_on(connect_reader(common)?);
        }
        hub::thread::spawn(hub.clone(), subscriber, shutdown.clone())?;
        let presence = publish::presence_client(common)?;
        // Not one of /healthz's checks: subscribers do not need it, and a POST /down it
        // cannot serve is answered 503 within --redis-timeout.
        let downlink = connect_reader(common)?;
        let windows = publisher.map(|publisher| publish::Windows::new(publisher, common, metrics));
        Ok(SubscribeRole {
            windows,
            presence,
            hub,
            limits,
            slow_consumer,
            downlink,
            health,
        })
    }
}

impl Role for SubscribeRole {
    const NAME: &'static str = "subscribe";
    const GRANT: Grant = Grant::Subscribe;

    fn publishes(&self) -> bool {
        self.windows.is_some()
    }

    async fn publish_once(
        relay: &Relay<Self>,
        channel: ChannelName,
        body: Bytes,
    ) -> Result<i64, String> {
        match &relay.role.windows {
            Some(windows) => windows.post(channel, body).await,
            None => Err("this server does not publish (--accept-publish is off)".into()),
        }
    }

    fn sends_downlink(&self) -> bool {
        true
    }

    async fn downlink(relay: &Relay<Self>, path: &str, channel: ChannelName, body: Bytes) -> Reply {
        use fred::interfaces::PubsubInterface;
        let common = &relay.common;
        let client = &relay.role.downlink;
        // In a cluster the device's downlink subscriber listens with SSUBSCRIBE (its hub).
        let published = tokio::time::timeout(common.redis_timeout, async {
            if crate::redis::sharded() {
                client
                    .spublish::<i64, _, _>(channel.to_string(), body)
                    .await
            } else {
                client.publish::<i64, _, _>(channel.to_string(), body).await
            }
        })
        .await;
        let relays = match published {
            Ok(Ok(relays)) => relays,
            Ok(Err(e)) => return unavailable(format!("Redis did not take the downlink: {e}")),
            Err(_) => {
                return unavailable(format!(
                    "Redis did not take the downlink within {:?} (--redis-timeout)",
                    common.redis_timeout
                ))
            }
        };
        if relays == 0 {
            return http::reply(
                hyper::StatusCode::NOT_FOUND,
                format!("no device is connected on {path}\n"),
            );
        }
        // How many publisher connections the fleet's presence lists on the path (null when
        // it cannot be read: the downlink went out all the same).
        let read = presence::fleet(client, &common.channel_prefix, common.presence_interval);
        let devices = match tokio::time::timeout(common.redis_timeout, read).await {
            Ok(Ok(fleet)) => {
                let on: u64 = fleet.on(path).iter().map(|d| d.connections).sum();
                on.to_string()
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not read the presence for a downlink's count");
                "null".into()
            }
            Err(_) => "null".into(),
        };
        let mut response = http::reply(
            hyper::StatusCode::OK,
            format!("{{\"relays\":{relays},\"devices\":{devices}}}\n"),
        );
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        response
    }

    fn page(&self, path: &str) -> Option<Reply> {
        page::serve(path)
    }

    fn health(&self) -> Result<(), String> {
        self.health.status()
    }

    fn presence_client(&self) -> Option<fred::clients::Client> {
        self.presence.clone()
    }

    fn before_scrape(&self, metrics: &Metrics) {
        let (_, messages, bytes) = self.hub.stats();
        metrics.queued_messages.set(messages as i64);
        metrics.queued_bytes.set(bytes as i64);
    }

    fn status(&self) -> RoleStatus {
        RoleStatus {
            channels: self.hub.channels(),
            redis: self.health.connections(),
            // The fleet is read on presence's connection (none with presence off: no fleet).
            reader: self.presence.clone(),
        }
    }

    /// The client's outbox, in the hub from before its 101.
    type Prepared = (Arc<Outbox>, Membership);

    async fn prepare(
        relay: &Arc<Relay<Self>>,
        channel: &ChannelName,
        query: Option<&str>,
    ) -> Result<Self::Prepared, String> {
        let role = &relay.role;
        let pattern = is_pattern(channel);
        if pattern && crate::redis::sharded() {
            // Sharded pub/sub has no PSUBSCRIBE, and a PSUBSCRIBE sees no SPUBLISH.
            return Err(
                "a path with '*', '?' or '[' subscribes to a pattern, which Redis Cluster's \
                 sharded pub/sub cannot serve (--redis-mode cluster)"
                    .into(),
            );
        }
        let asked = Asked::parse(query, pattern)?;
        let outbox = Arc::new(Outbox::new(role.limits, role.slow_consumer));
        let topic = match pattern {
            true => Topic::Pattern(channel.clone()),
            false => Topic::Channel(channel.clone()),
        };
        let replaying = asked.replay != Replay::Nothing;
        let membership = role
            .hub
            .join(topic.clone(), asked.format, outbox.clone(), replaying);
        // One round trip, only for a channel this process was not subscribed to yet. If Redis
        // is away, the client is answered anyway and gets what comes once it is back.
        let patience = relay.common.redis_timeout;
        if !role.hub.wait_active(&topic, patience).await {
            tracing::debug!(channel = %channel, "answering an upgrade before its subscription is active");
        }
        if replaying {
            // Read after the subscription is active: whatever the replay does not hold
            // arrives live.
            role.hub
                .replay(&membership, outbox.clone(), asked.replay, patience)
                .await;
        }
        Ok((outbox, membership))
    }

    fn serve(
        relay: Arc<Relay<Self>>,
        connection: Upgraded,
        (outbox, membership): Self::Prepared,
    ) -> impl std::future::Future<Output = Ending> + Send + 'static {
        let role = &relay.role;
        let mut settings =
            session::SessionSettings::new(&relay.common, connection.ack, connection.expires);
        outbox.set_socket(connection.socket);
        // With --accept-publish, what a subscriber sends is published only when its token
        // allows it; otherwise its first data frame closes it with 1008 (never dropped
        // unseen).
        settings.refuse_data = role.windows.is_some() && !connection.may_publish;
        let inbound = role
            .windows
            .as_ref()
            .filter(|_| connection.may_publish)
            .map(|windows| windows.on(connection.channel.clone(), None));
        // Only a connection whose messages are published has a publish rate.
        let throttle = inbound.as_ref().and_then(|_| relay.limits.throttle());
        let session = session::run(
            connection.ws,
            outbox,
            inbound,
            throttle,
            settings,
            relay.shutdown.clone(),
            relay.metrics.clone(),
        );
        // A combinator, not an async block (see `Relay::serve`): the session is kept once.
        futures_util::FutureExt::map(session, move |ending| {
            drop(membership);
            ending
        })
    }
}

/// A downlink Redis did not take: 503 with why.
fn unavailable(why: String) -> Reply {
    http::reply(hyper::StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
}

/// Whether a channel name holds a glob character, making its path a pattern (SPEC §9).
fn is_pattern(channel: &ChannelName) -> bool {
    channel
        .to_bytes()
        .iter()
        .any(|b| matches!(b, b'*' | b'?' | b'['))
}

/// What a subscriber's query asks for (SPEC §9): `format=json`, `last=N`, `since=ID`.
/// Other parameters (a `token`) are not its business.
#[derive(Debug, PartialEq, Eq)]
struct Asked {
    format: Format,
    replay: Replay,
}

/// The most `last` may ask for; more is not an error, it is what is retained.
const LAST_MAX: usize = 1_000_000;

impl Asked {
    /// The query's request, or the reason of its 400.
    fn parse(query: Option<&str>, pattern: bool) -> Result<Asked, String> {
        let mut format = Format::Raw;
        let (mut last, mut since) = (None, None);
        for (name, value) in query
            .unwrap_or("")
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        {
            match name {
                "format" => {
                    format = match value {
                        "json" => Format::Json,
                        "raw" => Format::Raw,
                        other => {
                            return Err(format!(
                                "format must be json or raw, not '{}'",
                                other.chars().take(32).collect::<String>()
                            ))
                        }
                    }
                }
                "last" => {
                    let n: usize = value.parse().map_err(|_| {
                        format!(
                            "last must be a count of messages, not '{}'",
                            value.chars().take(32).collect::<String>()
                        )
                    })?;
                    last = Some(n.min(LAST_MAX));
                }
                "since" => {
                    since = Some(
                        value
                            .parse::<StreamId>()
                            .map_err(|e| format!("since: {e}"))?,
                    );
                }
                _ => {}
            }
        }
        if pattern && format != Format::Json {
            return Err(
                "a pattern path (holding *, ? or [) needs ?format=json, so each \
                        message says its channel"
                    .into(),
            );
        }
        if pattern && (last.is_some() || since.is_some()) {
            return Err("last and since need a channel path, not a pattern".into());
        }
        let replay = match (last, since) {
            (Some(_), Some(_)) => return Err("ask for last or since, not both".into()),
            (Some(0), None) | (None, None) => Replay::Nothing,
            (Some(n), None) => Replay::Last(n),
            (None, Some(_)) if format != Format::Json => {
                return Err("since needs ?format=json: ids are only in the envelopes".into())
            }
            (None, Some(id)) => Replay::Since(id),
        };
        Ok(Asked { format, replay })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_asks_for_a_format_and_a_replay_or_gets_a_reason() {
        let ok = |q: &str, pattern| Asked::parse(Some(q), pattern).unwrap();
        assert_eq!(
            ok("", false),
            Asked {
                format: Format::Raw,
                replay: Replay::Nothing
            }
        );
        assert_eq!(ok("token=x&last=3", false).replay, Replay::Last(3));
        assert_eq!(ok("last=0", false).replay, Replay::Nothing);
        let since = ok("format=json&since=17-2", false);
        assert_eq!(since.format, Format::Json);
        assert_eq!(since.replay, Replay::Since(StreamId { ms: 17, seq: 2 }));
        assert_eq!(ok("format=json", true).format, Format::Json);
        for (q, pattern, why) in [
            ("since=1-0", false, "needs ?format=json"),
            ("format=json&since=x", false, "not a stream id"),
            ("last=-1", false, "count of messages"),
            ("format=xml", false, "json or raw"),
            ("last=1&since=1-0&format=json", false, "not both"),
            ("", true, "pattern path"),
            ("format=json&last=1", true, "not a pattern"),
        ] {
            let e = Asked::parse(Some(q), pattern).unwrap_err();
            assert!(e.contains(why), "{q}: {e}");
        }
    }
}
