//! Prometheus metrics: one registry per server process, rendered by `GET /metrics`.
//!
//! Owns: metric names, help texts, label values and the handles the hot paths increment.
//! Must not: compute anything on the message path beyond an atomic add per batch; gauges
//! that need a walk over the hub (queued messages and bytes) are filled in at scrape time.
//! Every label value of the counters alerts watch (drops, refusals, auth refusals, closes) is
//! created at zero up front.
//!
//! Directions of `lightrelay_messages_total` and `lightrelay_bytes_total`: `ws_in` (messages
//! read from WebSocket clients and POST bodies), `redis_out` (PUBLISHes Redis accepted),
//! `redis_in` (messages received on subscriptions), `ws_out` (frames written to clients).

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub(crate) use crate::auth::AuthRefusal;

// Label values are typed enums, encoded by prometheus-client's derive. The derive writes a
// variant's name as it is, so the variants are spelled as Prometheus shows them.

/// A direction of `lightrelay_messages_total` and `lightrelay_bytes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    ws_in,
    ws_out,
    redis_in,
    redis_out,
}

/// Why a message did not reach a client or Redis. Every loss has one of these reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DropReason {
    /// `--slow-consumer skip` dropped a client's backlog.
    slow_consumer_skip,
    /// `--slow-consumer close` discarded the queue of the client it closed.
    slow_consumer_close,
    /// The Redis reader outran the hub; fred's broadcast buffer overwrote messages.
    redis_lagged,
    /// A publish was abandoned (Redis unreachable past --redis-timeout, or an error).
    publish_failed,
}

/// Why a request was refused before any upgrade (`lightrelay_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Refusal {
    bad_path,
    over_capacity,
    post_budget,
    /// `--max-connections-per-ip`: the client address holds as many WebSockets as allowed.
    per_ip,
    /// `--allowed-origins`: a browser page from another origin.
    origin,
    /// `--max-publish-rate`: a `POST` over the rate of its client address.
    publish_rate,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuthRefusalLabel {
    reason: AuthRefusal,
}

/// How a WebSocket connection ended (`lightrelay_closed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Closed {
    client,
    broken,
    going_away,
    slow_consumer,
    idle_timeout,
    too_big,
    message_timeout,
    busy,
    redis_unavailable,
    protocol_error,
    token_expired,
    not_allowed,
}

/// The kind of a Redis connection error (`lightrelay_redis_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RedisErrorKind {
    auth,
    tls,
    timeout,
    refused,
    io,
    config,
    other,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabel {
    direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabel {
    reason: DropReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabel {
    reason: Refusal,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClosedLabel {
    reason: Closed,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorKindLabel {
    kind: RedisErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectionLabel {
    connection: String,
}

/// Messages and their payload bytes in one direction.
#[derive(Clone)]
pub struct Flow {
    messages: Counter,
    bytes: Counter,
}

impl Flow {
    fn new(
        messages: &Family<DirectionLabel, Counter>,
        bytes: &Family<DirectionLabel, Counter>,
        direction: Direction,
    ) -> Self {
        Flow {
            messages: messages
                .get_or_create(&DirectionLabel { direction })
                .clone(),
            bytes: bytes.get_or_create(&DirectionLabel { direction }).clone(),
        }
    }

    pub fn add(&self, messages: u64, bytes: u64) {
        self.messages.inc_by(messages);
        self.bytes.inc_by(bytes);
    }
}

/// The handles every part of a server increments, behind one `Arc`: a clone is one pointer,
/// which matters because every connection holds one.
#[derive(Clone)]
pub struct Metrics(std::sync::Arc<Handles>);

impl std::ops::Deref for Metrics {
    type Target = Handles;

    fn deref(&self) -> &Handles {
        &self.0
    }
}

pub struct Handles {
    pub connections: Gauge,
    /// `--max-connections`, set once at start, so an alert can compare `connections` with it.
    pub max_connections: Gauge,
    pub ws_in: Flow,
    pub ws_out: Flow,
    pub redis_in: Flow,
    pub redis_out: Flow,
    dropped: Family<DropLabel, Counter>,
    refused: Family<RefusalLabel, Counter>,
    auth_refused: Family<AuthRefusalLabel, Counter>,
    closed: Family<ClosedLabel, Counter>,
    redis_errors: Family<ErrorKindLabel, Counter>,
    redis_reconnects: Family<ConnectionLabel, Counter>,
    pub redis_up: Gauge,
    resubscribed: Counter,
    unsubscribed_seconds: Histogram,
    pub publish_latency: Histogram,
    pub channels: Gauge,
    pub queued_messages: Gauge,
    pub queued_bytes: Gauge,
    /// Frames the hub wrote straight into an idle subscriber's socket (no queue, no wake-up).
    pub direct_writes: Counter,
    /// Times a publishing connection was held back by `--max-publish-rate`.
    pub throttled: Counter,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connections = Gauge::default();
        let max_connections = Gauge::default();
        let messages = Family::<DirectionLabel, Counter>::default();
        let bytes = Family::<DirectionLabel, Counter>::default();
        let dropped = Family::<DropLabel, Counter>::default();
        let refused = Family::<RefusalLabel, Counter>::default();
        let auth_refused = Family::<AuthRefusalLabel, Counter>::default();
        let closed = Family::<ClosedLabel, Counter>::default();
        let redis_up = Gauge::default();
        let resubscribed = Counter::default();
        let unsubscribed_seconds = Histogram::new(exponential_buckets(0.001, 4.0, 10));
        let redis_errors = Family::<ErrorKindLabel, Counter>::default();
        let redis_reconnects = Family::<ConnectionLabel, Counter>::default();
        let publish_latency = Histogram::new(exponential_buckets(0.000_1, 2.0, 17));
        let channels = Gauge::default();
        let queued_messages = Gauge::default();
        let queued_bytes = Gauge::default();
        let direct_writes = Counter::default();
        let throttled = Counter::default();

        registry.register(
            "lightrelay_connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        registry.register(
            "lightrelay_max_connections",
            "The --max-connections limit of this server",
            max_connections.clone(),
        );
        registry.register(
            "lightrelay_messages",
            "Messages relayed, by direction",
            messages.clone(),
        );
        registry.register(
            "lightrelay_bytes",
            "Payload bytes relayed, by direction",
            bytes.clone(),
        );
        registry.register(
            "lightrelay_dropped",
            "Messages that did not reach their destination, by reason",
            dropped.clone(),
        );
        registry.register(
            "lightrelay_refused",
            "Requests refused before the upgrade, by reason",
            refused.clone(),
        );
        registry.register(
            "lightrelay_auth_refused",
            "Requests refused by the token check (401/403), by reason",
            auth_refused.clone(),
        );
        registry.register(
            "lightrelay_closed",
            "WebSocket connections closed, by close reason",
            closed.clone(),
        );
        registry.register(
            "lightrelay_redis_up",
            "1 while Redis answers on every connection this server uses",
            redis_up.clone(),
        );
        registry.register(
            "lightrelay_redis_errors",
            "Redis connection errors, by kind (auth, tls, refused, io, timeout, …)",
            redis_errors.clone(),
        );
        registry.register(
            "lightrelay_redis_reconnects",
            "Reconnections to Redis after a lost connection, by connection",
            redis_reconnects.clone(),
        );
        registry.register(
            "lightrelay_resubscribed",
            "Channels subscribed again after the subscriber connection was lost",
            resubscribed.clone(),
        );
        registry.register(
            "lightrelay_unsubscribed_seconds",
            "How long channels were without a Redis subscription after a lost connection",
            unsubscribed_seconds.clone(),
        );
        registry.register(
            "lightrelay_publish_latency_seconds",
            "From a message read off a client to Redis accepting its PUBLISH",
            publish_latency.clone(),
        );
        registry.register(
            "lightrelay_channels",
            "Channels this process is subscribed to",
            channels.clone(),
        );
        registry.register(
            "lightrelay_queued_messages",
            "Messages waiting in client queues",
            queued_messages.clone(),
        );
        registry.register(
            "lightrelay_queued_bytes",
            "Payload bytes waiting in client queues",
            queued_bytes.clone(),
        );

        registry.register(
            "lightrelay_direct_writes",
            "Frames written straight into an idle subscriber's socket by the hub",
            direct_writes.clone(),
        );
        registry.register(
            "lightrelay_throttled",
            "Times a publishing connection was not read for a while, over --max-publish-rate",
            throttled.clone(),
        );

        // Created up front so every series shows from the first scrape, at zero: a series that
        // first appears at 1 is invisible to `rate()` and `increase()`, so an alert on it would
        // miss the first event (deploy/prometheus/lightrelay.rules.yml relies on this).
        for reason in [
            DropReason::slow_consumer_skip,
            DropReason::slow_consumer_close,
            DropReason::redis_lagged,
            DropReason::publish_failed,
        ] {
            let _ = dropped.get_or_create(&DropLabel { reason });
        }
        for reason in [
            Refusal::bad_path,
            Refusal::over_capacity,
            Refusal::post_budget,
            Refusal::per_ip,
            Refusal::origin,
            Refusal::publish_rate,
        ] {
            let _ = refused.get_or_create(&RefusalLabel { reason });
        }
        for reason in [
            AuthRefusal::missing,
            AuthRefusal::malformed,
            AuthRefusal::bad_signature,
            AuthRefusal::unknown_kid,
            AuthRefusal::expired,
            AuthRefusal::not_yet_valid,
            AuthRefusal::wrong_issuer,
            AuthRefusal::wrong_audience,
            AuthRefusal::forbidden,
        ] {
            let _ = auth_refused.get_or_create(&AuthRefusalLabel { reason });
        }
        for reason in [
            Closed::client,
            Closed::broken,
            Closed::going_away,
            Closed::slow_consumer,
            Closed::idle_timeout,
            Closed::too_big,
            Closed::message_timeout,
            Closed::busy,
            Closed::redis_unavailable,
            Closed::protocol_error,
            Closed::token_expired,
            Closed::not_allowed,
        ] {
            let _ = closed.get_or_create(&ClosedLabel { reason });
        }
        Metrics(std::sync::Arc::new(Handles {
            connections,
            max_connections,
            ws_in: Flow::new(&messages, &bytes, Direction::ws_in),
            ws_out: Flow::new(&messages, &bytes, Direction::ws_out),
            redis_in: Flow::new(&messages, &bytes, Direction::redis_in),
            redis_out: Flow::new(&messages, &bytes, Direction::redis_out),
            dropped,
            refused,
            auth_refused,
            closed,
            redis_errors,
            redis_reconnects,
            redis_up,
            resubscribed,
            unsubscribed_seconds,
            publish_latency,
            channels,
            queued_messages,
            queued_bytes,
            direct_writes,
            throttled,
            registry,
        }))
    }
}

impl Handles {
    pub fn dropped(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped.get_or_create(&DropLabel { reason }).inc_by(n);
        }
    }

    /// A request refused before the upgrade.
    pub fn refused(&self, reason: Refusal) {
        self.refused.get_or_create(&RefusalLabel { reason }).inc();
    }

    /// A token check refused a request.
    pub fn auth_refused(&self, reason: AuthRefusal) {
        self.auth_refused
            .get_or_create(&AuthRefusalLabel { reason })
            .inc();
    }

    /// A WebSocket connection ended.
    pub fn closed(&self, reason: Closed) {
        self.closed.get_or_create(&ClosedLabel { reason }).inc();
    }

    /// A Redis connection error of `kind`.
    pub fn redis_error(&self, kind: RedisErrorKind) {
        self.redis_errors
            .get_or_create(&ErrorKindLabel { kind })
            .inc();
    }

    /// `channels` were subscribed again after the subscriber connection had been lost for
    /// `gap`.
    pub fn resubscribed(&self, channels: u64, gap: std::time::Duration) {
        self.resubscribed.inc_by(channels);
        self.unsubscribed_seconds.observe(gap.as_secs_f64());
    }

    /// A Redis connection came back after it was lost.
    pub fn redis_reconnect(&self, connection: &str) {
        self.redis_reconnects
            .get_or_create(&ConnectionLabel {
                connection: connection.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
