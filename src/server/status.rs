//! The status page (SPEC §10): `GET /status.json` and `GET /status`, on both servers.
//!
//! Owns: what `/status.json` says (this instance, its connections and their limit, its Redis
//! connections, messages in and out per second, its channels with their rates, and the fleet
//! read from presence), the publish server's per-channel tallies ([`Channels`]: a [`Seat`]
//! per publisher connection), the small ring of samples rates are computed from, and the
//! page itself (`web/status.html`, embedded at build time).
//! Rates cost nothing until asked: the hot paths only add to counters they already hold (a
//! publisher's window adds its batch to its channel's tally with one relaxed add; the hub
//! adds one to a topic's count under the lock it takes anyway). A request reads the
//! counters, keeps what it read in the ring (at most one sample a second, [`RING`] of them)
//! and divides by the time since the oldest sample within [`WINDOW`].
//! Must not: count anything more on the hot path than that, hold a lock across an await, or
//! let the page reach the network (it asks `status.json` relatively, so it works behind a
//! proxy's path prefix).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

use super::channel::ChannelName;
use super::http::{reply, Reply};
use super::relay::{Relay, Role};
use crate::lock;
use crate::presence;

/// Rates are computed over about this long (the oldest sample within it).
pub(crate) const WINDOW: Duration = Duration::from_secs(10);
/// Samples taken closer together than this are not kept (a busy page does not fill the ring).
const SPACING: Duration = Duration::from_secs(1);
/// The most samples kept.
pub(crate) const RING: usize = 12;
/// The most channels `/status.json` lists (the busiest first); `channels_total` says how many
/// there are.
const LISTED: usize = 500;
/// The longest a request waits for the fleet (Redis slow or away).
const FLEET_PATIENCE: Duration = Duration::from_secs(2);

const PAGE: &str = include_str!("../../web/status.html");

/// The page's own inline script and style; requests to its own origin only.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'self'";

/// One Redis connection's state, as `/status.json` shows it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RedisConnection {
    pub name: String,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A channel (or pattern) of this process with its clients and the messages it carried since
/// it was first seen.
#[derive(Clone, Debug)]
pub(crate) struct ChannelCount {
    pub channel: ChannelName,
    pub pattern: bool,
    pub clients: usize,
    pub messages: u64,
}

/// What a role tells `/status.json`.
#[derive(Default)]
pub(crate) struct RoleStatus {
    pub channels: Vec<ChannelCount>,
    pub redis: Vec<RedisConnection>,
    /// A connection the fleet can be read on (not a subscriber connection).
    pub reader: Option<fred::clients::Client>,
}

/// The publish server's channels with a publisher connected, each with its messages.
#[derive(Default)]
pub(crate) struct Channels {
    map: Mutex<HashMap<ChannelName, Arc<Tally>>>,
}

pub(crate) struct Tally {
    messages: AtomicU64,
    /// Changed under `Channels::map`'s lock only.
    publishers: AtomicUsize,
    channel: ChannelName,
    channels: Arc<Channels>,
}

/// A publisher's place in its channel's tally; leaving is dropping it (the last one out
/// removes the channel).
pub(crate) struct Seat(Arc<Tally>);

impl Seat {
    /// `n` messages were published on the seat's channel.
    #[inline]
    pub fn count(&self, n: usize) {
        self.0.messages.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut map = lock(&self.0.channels.map);
        if self.0.publishers.fetch_sub(1, Ordering::Relaxed) == 1
            && map
                .get(&self.0.channel)
                .is_some_and(|tally| Arc::ptr_eq(tally, &self.0))
        {
            map.remove(&self.0.channel);
        }
    }
}

impl Channels {
    /// A publisher connected on `channel`.
    pub fn open(self: &Arc<Self>, channel: &ChannelName) -> Seat {
        let mut map = lock(&self.map);
        let tally = map.entry(channel.clone()).or_insert_with(|| {
            Arc::new(Tally {
                messages: AtomicU64::new(0),
                publishers: AtomicUsize::new(0),
                channel: channel.clone(),
                channels: self.clone(),
            })
        });
        tally.publishers.fetch_add(1, Ordering::Relaxed);
        Seat(tally.clone())
    }

    pub fn counts(&self) -> Vec<ChannelCount> {
        lock(&self.map)
            .values()
            .map(|tally| ChannelCount {
                channel: tally.channel.clone(),
                pattern: false,
                clients: tally.publishers.load(Ordering::Relaxed),
                messages: tally.messages.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// The process's side of the status page: when it started, where it listens, the samples.
pub(crate) struct Status {
    started: Instant,
    started_ms: u64,
    listen: SocketAddr,
    ring: Mutex<VecDeque<Sample>>,
}

struct Sample {
    at: Instant,
    messages_in: u64,
    messages_out: u64,
    channels: HashMap<ChannelName, u64>,
}

/// Rates over `window` seconds (`None` until a second sample exists).
struct Rates {
    window: Option<f64>,
    messages_in: Option<f64>,
    messages_out: Option<f64>,
    channels: Vec<Option<f64>>,
}

impl Status {
    pub fn new(listen: SocketAddr) -> Self {
        Status {
            started: Instant::now(),
            started_ms: presence::now_ms(),
            listen,
            ring: Mutex::default(),
        }
    }

    /// Rates of what was read now against the oldest sample within [`WINDOW`] (or, when
    /// none is that recent, the newest one); keeps what was read as a sample.
    fn rates(&self, now: Instant, totals: (u64, u64), channels: &[ChannelCount]) -> Rates {
        let mut ring = lock(&self.ring);
        while ring.len() > 1 && ring.front().is_some_and(|s| now - s.at > WINDOW + SPACING) {
            ring.pop_front();
        }
        let rates = match ring.front().filter(|s| now > s.at) {
            None => Rates {
                window: None,
                messages_in: None,
                messages_out: None,
                channels: vec![None; channels.len()],
            },
            Some(base) => {
                let secs = (now - base.at).as_secs_f64();
                // A counter that went back (a channel left and came again) counts from zero.
                let per_s = |now: u64, then: u64| {
                    Some(if now >= then { now - then } else { now } as f64 / secs)
                };
                Rates {
                    window: Some(secs),
                    messages_in: per_s(totals.0, base.messages_in),
                    messages_out: per_s(totals.1, base.messages_out),
                    channels: channels
                        .iter()
                        .map(|c| per_s(c.messages, *base.channels.get(&c.channel).unwrap_or(&0)))
                        .collect(),
                }
            }
        };
        if ring.back().is_none_or(|s| now - s.at >= SPACING) {
            if ring.len() == RING {
                ring.pop_front();
            }
            ring.push_back(Sample {
                at: now,
                messages_in: totals.0,
                messages_out: totals.1,
                channels: channels
                    .iter()
                    .map(|c| (c.channel.clone(), c.messages))
                    .collect(),
            });
        }
        rates
    }
}

/// `GET /status`: the page.
pub(crate) fn page() -> Reply {
    let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CONTENT_SECURITY_POLICY, CSP),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// `GET /status.json`.
pub(crate) async fn json<R: Role>(relay: &Relay<R>) -> Reply {
    let mut response = reply(StatusCode::OK, render(relay).await.to_string());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn render<R: Role>(relay: &Relay<R>) -> Value {
    let common = &relay.common;
    let status = &relay.status;
    let role = relay.role.status();
    let totals = relay.metrics.totals();
    let mut channels = role.channels;
    let rates = status.rates(
        Instant::now(),
        (totals.messages_in, totals.messages_out),
        &channels,
    );
    let prefix = common.channel_prefix.as_bytes();
    let mut listed: Vec<(ChannelCount, Option<f64>)> =
        channels.drain(..).zip(rates.channels).collect();
    listed.sort_by(|(a, ra), (b, rb)| {
        rb.unwrap_or(0.0)
            .total_cmp(&ra.unwrap_or(0.0))
            .then_with(|| a.channel.cmp(&b.channel))
    });
    let total = listed.len();
    let listed: Vec<Value> = listed
        .into_iter()
        .take(LISTED)
        .map(|(c, rate)| {
            let name = c.channel.to_bytes();
            let path = name.strip_prefix(prefix).unwrap_or(&name);
            json!({
                "path": String::from_utf8_lossy(path),
                "channel": c.channel.to_string(),
                "pattern": c.pattern,
                "clients": c.clients,
                "messages": c.messages,
                "rate": rates.window.and(rate),
            })
        })
        .collect();
    let health = relay.role.health();
    let (fleet, fleet_reason) = fleet(relay, role.reader, health.as_ref().err()).await;
    let now_ms = presence::now_ms();
    json!({
        "instance": {
            // Presence's instance id (`--instance-id`), as the fleet lists it; with presence
            // off, the listen address.
            "id": relay.presence.as_ref().map_or_else(|| status.listen.to_string(), |p| p.id.clone()),
            "role": R::NAME,
            "version": env!("CARGO_PKG_VERSION"),
            "listen": status.listen.to_string(),
            "started": status.started_ms,
            "uptime_s": status.started.elapsed().as_secs(),
        },
        "now": now_ms,
        "connections": {
            "open": relay.open_connections(),
            "websocket": relay.metrics.connections.get(),
            "max": common.max_connections,
        },
        "redis": {
            "up": health.is_ok(),
            "reason": health.err(),
            "connections": role.redis,
        },
        "messages": {
            "in_per_s": rates.messages_in,
            "out_per_s": rates.messages_out,
            "window_s": rates.window,
        },
        "channels": listed,
        "channels_total": total,
        "fleet": fleet,
        "fleet_reason": fleet_reason,
    })
}

/// The fleet from presence, or `null` and why not.
async fn fleet<R: Role>(
    relay: &Relay<R>,
    reader: Option<fred::clients::Client>,
    unhealthy: Option<&String>,
) -> (Value, Option<String>) {
    let common = &relay.common;
    if common.presence_interval.is_zero() {
        return (
            Value::Null,
            Some("presence is off (--presence-interval 0)".into()),
        );
    }
    if let Some(why) = unhealthy {
        return (Value::Null, Some(format!("Redis is unreachable: {why}")));
    }
    let Some(reader) = reader else {
        return (
            Value::Null,
            Some("this server has no Redis connection to read presence on".into()),
        );
    };
    let read = presence::fleet(&reader, &common.channel_prefix, common.presence_interval);
    let patience = FLEET_PATIENCE.min(common.redis_timeout);
    match tokio::time::timeout(patience, read).await {
        Ok(Ok(fleet)) => (serde_json::to_value(fleet).unwrap_or(Value::Null), None),
        Ok(Err(e)) => (
            Value::Null,
            Some(format!("cannot read presence from Redis: {e}")),
        ),
        Err(_) => (
            Value::Null,
            Some(format!("Redis did not answer within {patience:?}")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(name: &str, messages: u64) -> ChannelCount {
        ChannelCount {
            channel: ChannelName::from_redis(Bytes::copy_from_slice(name.as_bytes())),
            pattern: false,
            clients: 1,
            messages,
        }
    }

    #[test]
    fn rates_come_from_the_oldest_sample_within_the_window() {
        let status = Status::new("127.0.0.1:1".parse().unwrap());
        let t0 = Instant::now();
        let first = status.rates(t0, (0, 0), &[count("a", 0)]);
        assert_eq!(first.window, None);
        assert_eq!(first.channels, vec![None]);
        let mut last = None;
        for i in 1..=5u64 {
            let at = t0 + Duration::from_secs(2 * i);
            last = Some(status.rates(at, (10 * i, 0), &[count("a", 20 * i), count("b", i)]));
        }
        // Samples at 0..10 s: the oldest within the window is t0 (10 s ago).
        let last = last.unwrap();
        assert_eq!(last.window, Some(10.0));
        assert_eq!(last.messages_in, Some(5.0));
        assert_eq!(last.channels, vec![Some(10.0), Some(0.5)]);
        // 30 s later: the samples older than the window are gone but for the newest.
        let late = status.rates(t0 + Duration::from_secs(40), (50, 0), &[count("a", 100)]);
        assert_eq!(late.window, Some(30.0));
        assert_eq!(late.channels, vec![Some(0.0)]);
        // A counter that went back counts from zero.
        let back = status.rates(t0 + Duration::from_secs(42), (50, 0), &[count("a", 4)]);
        assert_eq!(back.channels, vec![Some(2.0)]);
    }

    #[test]
    fn the_ring_keeps_one_sample_a_second_and_at_most_ring() {
        let status = Status::new("127.0.0.1:1".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..100u64 {
            status.rates(t0 + Duration::from_millis(100 * i), (i, i), &[]);
        }
        let ring = lock(&status.ring);
        assert!(ring.len() <= RING && ring.len() >= 9, "{}", ring.len());
        assert!(ring
            .iter()
            .zip(ring.iter().skip(1))
            .all(|(a, b)| b.at - a.at >= SPACING));
    }

    #[test]
    fn a_channel_tally_lives_while_a_publisher_is_on_it() {
        let channels = Arc::new(Channels::default());
        let name = ChannelName::from_redis(Bytes::from_static(b"p/x"));
        let a = channels.open(&name);
        let b = channels.open(&name);
        a.count(3);
        b.count(2);
        let counts = channels.counts();
        assert_eq!((counts[0].clients, counts[0].messages), (2, 5));
        drop(a);
        assert_eq!(channels.counts()[0].clients, 1);
        drop(b);
        assert!(channels.counts().is_empty());
    }

    #[test]
    fn the_page_is_self_contained_and_relative() {
        for elsewhere in [
            "src=\"http",
            "href=\"http",
            "//cdn",
            "fetch('/",
            "fetch(\"/",
        ] {
            assert!(!PAGE.contains(elsewhere), "{elsewhere}");
        }
        assert!(PAGE.contains("'status.json'"));
    }
}
