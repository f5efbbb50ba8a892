//! The publish side (SPEC §3): WebSocket frames and `POST` bodies in, Redis PUBLISH out.
//!
//! Owns: the publish server's [`Role`] (what `lightrelay-publish` does with a connection: a
//! [`PublishWindow`] on the client's channel, acks through its outbox, a seat in its
//! channel's tally for `/status.json`) and the publish path
//! itself ([`window`]: the pool of pipelining Redis connections and one client's window;
//! with `--history`, the stream writes of SPEC §9 too).
//! Owns too the downlink's delivery (SPEC §10): a hub of its own (the same [`crate::hub`] as
//! the subscribe server's, on its own subscriber connection), which each publisher joins
//! with its outbox on `PREFIX + PATH + --downlink-suffix` for as long as it is connected, so
//! there is one subscription per path with a live publisher and none without.
//! Must not: drop a message silently, or know who subscribes. The subscribe side uses
//! [`window`] for `--accept-publish`; nothing here uses the subscribe side.

pub(crate) mod window;

use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::auth::Grant;
use crate::hub::{self, Format, Hub, Topic};
use crate::redis::{connect_publisher, connect_reader, connect_subscriber, Health, OnDeaf};
use crate::server::channel::ChannelName;
use crate::server::config::{CommonArgs, PublishArgs, SlowConsumer};
use crate::server::metrics::Metrics;
use crate::server::session::{self, Ending, SessionSettings};
use crate::server::status::{Channels, RoleStatus};
use crate::server::write::outbox::{Limits, Outbox};
use crate::server::{Relay, Role, Upgraded};
use crate::Error;
pub(crate) use window::{Publisher, Windows};

/// Run `lightrelay-publish` until SIGTERM/SIGINT. This is all its binary calls.
pub fn main(args: PublishArgs) -> ExitCode {
    crate::server::main(args.listen, args.common, PublishRole::start)
}

/// What the publish server shares between its connections.
pub(crate) struct PublishRole {
    /// Each connection's publish window is made from this when it has messages; POSTs
    /// publish through it too.
    windows: Arc<Windows>,
    /// The downlink's hub: publishers join it on their downlink channel.
    hub: Arc<Hub>,
    health: Arc<Health>,
    /// The channels with a publisher connected, with their messages (`/status.json`).
    channels: Arc<Channels>,
    /// Presence's own connection (SPEC §10), unless `--presence-interval 0`.
    presence: Option<fred::clients::Client>,
}

impl PublishRole {
    fn start(
        common: &CommonArgs,
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) -> Result<Self, Error> {
        let health = Arc::new(Health::new(common));
        let publisher = Publisher::start(common, &health, metrics, shutdown)?;
        let subscriber = connect_subscriber(common, crate::redis::DOWNLINK_BUFFER)?;
        health.watch(
            "downlink".into(),
            subscriber.clone(),
            common.ping_interval,
            OnDeaf::Reconnect(common.redis_timeout),
            metrics.clone(),
            shutdown.clone(),
        );
        let hub = Hub::new(metrics.clone(), None);
        if common.redis_mode == crate::server::config::RedisMode::Cluster {
            hub.read_slots_on(connect_reader(common)?);
        }
        hub::thread::spawn(hub.clone(), subscriber, shutdown.clone())?;
        let presence = presence_client(common)?;
        let windows = Windows::new(publisher, common, metrics);
        Ok(PublishRole {
            windows,
            hub,
            health,
            channels: Arc::default(),
            presence,
        })
    }
}

impl Publisher {
    /// Connect the PUBLISH pool (in the background) and watch each connection's health. With
    /// `--history N`, every batch it publishes is also written to the channel's stream.
    pub(crate) fn start(
        common: &CommonArgs,
        health: &Arc<Health>,
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) -> Result<Self, Error> {
        let sharded = common.redis_mode == crate::server::config::RedisMode::Cluster;
        let history = window::History::new(common.history, common.history_ttl, sharded);
        let publisher = Publisher::new(connect_publisher(common)?, history);
        for (i, client) in publisher.clients().iter().enumerate() {
            health.watch(
                format!("publish#{i}"),
                client.clone(),
                common.ping_interval,
                OnDeaf::Wait,
                metrics.clone(),
                shutdown.clone(),
            );
        }
        Ok(publisher)
    }
}

/// The connection presence is written and read on (SPEC §10), connecting in the
/// background; `None` with `--presence-interval 0` (then nothing of presence reaches Redis).
pub(crate) fn presence_client(common: &CommonArgs) -> Result<Option<fred::clients::Client>, Error> {
    if common.presence_interval.is_zero() {
        return Ok(None);
    }
    Ok(Some(connect_reader(common)?))
}

impl Role for PublishRole {
    const NAME: &'static str = "publish";
    const GRANT: Grant = Grant::Publish;

    fn publishes(&self) -> bool {
        true
    }

    async fn publish_once(
        relay: &Relay<Self>,
        channel: ChannelName,
        body: Bytes,
    ) -> Result<i64, String> {
        relay.role.windows.post(channel, body).await
    }

    fn health(&self) -> Result<(), String> {
        self.health.status()
    }

    fn status(&self) -> RoleStatus {
        RoleStatus {
            channels: self.channels.counts(),
            redis: self.health.connections(),
            // The fleet is read on presence's connection (none with presence off: no fleet).
            reader: self.presence.clone(),
        }
    }

    fn presence_client(&self) -> Option<fred::clients::Client> {
        self.presence.clone()
    }

    type Prepared = ();

    async fn prepare(
        _relay: &Arc<Relay<Self>>,
        _channel: &ChannelName,
        _query: Option<&str>,
    ) -> Result<(), String> {
        Ok(())
    }

    fn serve(
        relay: Arc<Relay<Self>>,
        connection: Upgraded,
        (): (),
    ) -> impl std::future::Future<Output = Ending> + Send + 'static {
        let common = &relay.common;
        let settings = SessionSettings::new(common, connection.ack, connection.expires);
        // A publisher's outbox holds its acks, at most one per message in flight, and what
        // its downlink brings; one that never reads them is closed like any slow consumer.
        let acks = common.publish_window as usize * 4;
        let limits = Limits::publisher(acks, common.max_message_bytes);
        let outbox = Arc::new(Outbox::new(limits, SlowConsumer::Close));
        // Its downlink, for as long as it is connected. Acks are text frames, so on an ack
        // connection every downlink message is a binary frame.
        let downlink = Topic::Channel(connection.channel.with_suffix(&common.downlink_suffix));
        let format = match connection.ack {
            true => Format::Binary,
            false => Format::Raw,
        };
        let membership = relay.role.hub.join(downlink, format, outbox.clone(), false);
        let seat = relay.role.channels.open(&connection.channel);
        let window = relay
            .role
            .windows
            .on(connection.channel.clone(), Some(seat));
        // Presence (SPEC §10): the path is marked open now and closed when the session ends;
        // the heartbeat writes what changed, nothing here touches Redis.
        let marked = relay.presence.as_ref().map(|presence| {
            let channel = connection.channel.to_bytes();
            let prefix = relay.common.channel_prefix.len();
            presence.open(&String::from_utf8_lossy(
                &channel[prefix.min(channel.len())..],
            ))
        });
        let session = session::run(
            connection.ws,
            outbox,
            window,
            relay.limits.throttle(),
            settings,
            relay.shutdown.clone(),
            relay.metrics.clone(),
        );
        // A combinator, not an async block (see `Relay::serve`): the session is kept once.
        futures_util::FutureExt::map(session, move |ending| {
            drop(membership);
            drop(marked);
            ending
        })
    }
}
