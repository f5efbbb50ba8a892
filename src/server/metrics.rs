//! Prometheus metrics: one registry per server process, rendered by `GET /metrics`.
//!
//! Owns: metric names, help texts, label values and the handles the hot paths increment; the
//! two expositions (OpenMetrics as prometheus-client writes it, and Prometheus text 0.0.4
//! converted from it, [`Exposition`]); the totals the log summary reads ([`Totals`]).
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
    /// A query the subscribe server cannot serve (`format`, `last`, `since`, a pattern
    /// without `format=json`).
    bad_query,
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

impl Closed {
    /// Every reason: created at zero in [`Metrics::new`] and summed for the log summary
    /// (keep in step with the enum).
    const ALL: [Closed; 12] = [
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
    ];
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

    fn messages(&self) -> u64 {
        self.messages.get()
    }
}

/// What the periodic log summary compares from one interval to the next (read from the
/// counters the hot paths already keep; nothing is counted for it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// WebSocket connections open now.
    pub open: u64,
    /// WebSocket connections closed since start.
    pub closed: u64,
    /// Messages received (from clients and from Redis) since start.
    pub messages_in: u64,
    /// Messages sent (to Redis and to clients) since start.
    pub messages_out: u64,
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
    /// Retained messages sent to new clients before their live ones (`?last=`, `?since=`).
    pub replayed: Counter,
    /// Messages delivered from history after a lost subscription was made again.
    pub resumed: Counter,
    /// Resumptions that found messages no longer retained.
    pub history_gaps: Counter,
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
        let replayed = Counter::default();
        let resumed = Counter::default();
        let history_gaps = Counter::default();

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
            "lightrelay_replayed",
            "Retained messages sent to new clients before the live ones (?last=, ?since=)",
            replayed.clone(),
        );
        registry.register(
            "lightrelay_resumed",
            "Messages delivered from history after a lost subscription was made again",
            resumed.clone(),
        );
        registry.register(
            "lightrelay_history_gaps",
            "Resumptions after a lost subscription that found messages no longer retained",
            history_gaps.clone(),
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
            Refusal::bad_query,
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
        for reason in Closed::ALL {
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
            replayed,
            resumed,
            history_gaps,
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

    /// The counts the log summary reports.
    pub fn totals(&self) -> Totals {
        Totals {
            open: u64::try_from(self.connections.get()).unwrap_or(0),
            closed: Closed::ALL
                .iter()
                .filter_map(|&reason| Some(self.closed.get(&ClosedLabel { reason })?.get()))
                .sum(),
            messages_in: self.ws_in.messages() + self.redis_in.messages(),
            messages_out: self.ws_out.messages() + self.redis_out.messages(),
        }
    }

    /// Every metric, in `format`.
    pub fn render(&self, format: Exposition) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        match format {
            Exposition::OpenMetrics => out,
            Exposition::Text004 => openmetrics_to_text_004(&out),
        }
    }
}

/// The two expositions `/metrics` speaks (SPEC §5): Prometheus text 0.0.4 by default,
/// OpenMetrics 1.0.0 when the scraper's `Accept` prefers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    Text004,
    OpenMetrics,
}

impl Exposition {
    /// What the `Accept` header lines ask for: OpenMetrics when they name
    /// `application/openmetrics-text` with a quality above 0 and at least that of any
    /// `text/plain` (Prometheus itself asks for OpenMetrics first, text 0.0.4 after); else
    /// text 0.0.4, whatever else they name.
    pub fn asked_by<'a>(accept: impl IntoIterator<Item = &'a hyper::header::HeaderValue>) -> Self {
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept
            .into_iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
        {
            let mut params = range.split(';');
            let media = params.next().unwrap_or("").trim();
            let quality = params
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if media.eq_ignore_ascii_case("application/openmetrics-text") {
                openmetrics = openmetrics.max(quality);
            } else if media.eq_ignore_ascii_case("text/plain") {
                text = text.max(quality);
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Exposition::OpenMetrics
        } else {
            Exposition::Text004
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::Text004 => "text/plain; version=0.0.4; charset=utf-8",
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// prometheus-client writes only OpenMetrics; Prometheus's text format 0.0.4 differs in what
/// this converts: a counter's `# HELP`/`# TYPE` name its samples (`x_total`, where OpenMetrics
/// names the family `x`), `info` becomes a gauge named `x_info` and types 0.0.4 does not know
/// become `untyped`; `# UNIT` lines, a counter's `_created` samples, exemplars and `# EOF`
/// are left out. Label values and help texts are escaped alike in both, and this registry
/// writes no timestamps (which differ in unit).
pub(crate) fn openmetrics_to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The `# HELP` line of the family being read, held until its `# TYPE` names its type.
    let mut help: Option<(&str, &str)> = None;
    // The family being read: its OpenMetrics name and type.
    let mut family: (&str, &str) = ("", "");
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            family = (name, kind);
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "gauge" | "histogram" | "summary" => ("", kind),
                "info" => ("_info", "gauge"),
                _ => ("", "untyped"),
            };
            if let Some((help_name, text)) = help.take() {
                if help_name == name {
                    out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
                }
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            // `# UNIT`, `# EOF`, other comments.
            continue;
        }
        let (name, rest) = split_sample(line);
        if family.1 == "counter" && name.strip_suffix("_created") == Some(family.0) {
            continue;
        }
        // An exemplar follows the value (and optional timestamp) after ` # `.
        let value = rest.split_once(" # ").map_or(rest, |(value, _)| value);
        out.push_str(&line[..line.len() - rest.len()]);
        out.push_str(value);
        out.push('\n');
    }
    out
}

/// A sample line's metric name, and what follows its name and labels (` value …`).
fn split_sample(line: &str) -> (&str, &str) {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    if !line[name_end..].starts_with('{') {
        return (name, &line[name_end..]);
    }
    // Past the closing brace, minding quoted label values with escapes.
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line[name_end..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return (name, &line[name_end + i + 1..]),
            _ => {}
        }
    }
    (name, "")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn text_004_names_counters_by_their_samples_and_drops_what_it_does_not_know() {
        let openmetrics = "\
# HELP lightrelay_messages Messages relayed, by direction
# TYPE lightrelay_messages counter
lightrelay_messages_total{direction=\"ws_in\"} 3
lightrelay_messages_created{direction=\"ws_in\"} 1700000000.0
# HELP lightrelay_connections Open WebSocket connections
# TYPE lightrelay_connections gauge
lightrelay_connections 2
# HELP build Build, with an odd label
# TYPE build info
# UNIT build x
build_info{v=\"a}b \\\" # c\"} 1 # {trace=\"1\"} 0.5
# HELP lat Latency
# TYPE lat histogram
lat_bucket{le=\"+Inf\"} 1
lat_sum 0.25
lat_count 1
# EOF
";
        assert_eq!(
            openmetrics_to_text_004(openmetrics),
            "\
# HELP lightrelay_messages_total Messages relayed, by direction
# TYPE lightrelay_messages_total counter
lightrelay_messages_total{direction=\"ws_in\"} 3
# HELP lightrelay_connections Open WebSocket connections
# TYPE lightrelay_connections gauge
lightrelay_connections 2
# HELP build_info Build, with an odd label
# TYPE build_info gauge
build_info{v=\"a}b \\\" # c\"} 1
# HELP lat Latency
# TYPE lat histogram
lat_bucket{le=\"+Inf\"} 1
lat_sum 0.25
lat_count 1
"
        );
    }

    #[test]
    fn the_registry_renders_in_both_expositions() {
        let metrics = Metrics::new();
        metrics.ws_in.add(1, 2);
        let text = metrics.render(Exposition::Text004);
        assert!(
            text.contains("# TYPE lightrelay_messages_total counter\n"),
            "{text}"
        );
        assert!(text.contains("lightrelay_messages_total{direction=\"ws_in\"} 1\n"));
        assert!(!text.contains("# EOF"), "{text}");
        let open = metrics.render(Exposition::OpenMetrics);
        assert!(
            open.contains("# TYPE lightrelay_messages counter\n"),
            "{open}"
        );
        assert!(open.ends_with("# EOF\n"));
    }

    #[test]
    fn accept_chooses_openmetrics_only_when_asked_for_first() {
        let asked = |values: &[&'static str]| {
            let values: Vec<HeaderValue> =
                values.iter().map(|v| HeaderValue::from_static(v)).collect();
            Exposition::asked_by(&values)
        };
        assert_eq!(asked(&[]), Exposition::Text004);
        assert_eq!(asked(&["*/*"]), Exposition::Text004);
        assert_eq!(asked(&["text/plain;version=0.0.4"]), Exposition::Text004);
        // Prometheus 2.x and 3.x.
        assert_eq!(
            asked(&["application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"]),
            Exposition::OpenMetrics
        );
        assert_eq!(
            asked(&["text/plain;q=1.0, application/openmetrics-text;q=0.5"]),
            Exposition::Text004
        );
        assert_eq!(
            asked(&["application/openmetrics-text;q=0"]),
            Exposition::Text004
        );
        assert_eq!(
            asked(&["text/html", "Application/OpenMetrics-Text"]),
            Exposition::OpenMetrics
        );
    }
}
