//! Abuse limits (SPEC §8): who the client is, how many WebSockets it holds open, how fast it
//! publishes, and which browser pages may open a WebSocket at all.
//!
//! Owns: the client address (the TCP peer, or what a trusted proxy says in `X-Real-IP` /
//! `X-Forwarded-For`, [`Limits::client_address`]); the checks an upgrade passes before its
//! 101 ([`Limits::admit_upgrade`]: `--allowed-origins`, 403, then `--max-connections-per-ip`,
//! 429) and the [`Admission`] that holds the client's place for as long as its session runs;
//! the `POST` rate per client address ([`Limits::admit_post`], 429 with `Retry-After`); and a
//! publishing connection's [`Throttle`] (`--max-publish-rate`, `--publish-burst`), which its
//! session asks before each read: over its rate, the connection is not read until the rate
//! allows the next message (TCP back-pressure, nothing lost).
//! Must not: hold a lock across an await, keep state for an address that has no open
//! session (its count is removed at zero; the POST limiter forgets addresses whose state is
//! fresh again), or cost a connection anything when its limit is off (each limit is an
//! `Option`, and the client address is only worked out when a limit needs it).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::StatusCode;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::config::{normalise_origin, LimitArgs};
use super::http::{refusal, Reply};
use super::metrics::{Metrics, Refusal};

/// One connection's publish rate: std's monotonic clock, whose instants convert to tokio's.
type ConnectionLimiter =
    RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<std::time::Instant>>;

/// The `POST` rate of every client address.
type AddressLimiter = RateLimiter<
    IpAddr,
    DashMapStateStore<IpAddr>,
    MonotonicClock,
    NoOpMiddleware<std::time::Instant>,
>;

/// The POST limiter forgets fresh addresses once it holds this many (or twice as many as it
/// kept at its last sweep), so its memory follows the addresses active within one burst.
const SWEEP_FROM: usize = 4096;

/// The limits of one server process, built from its flags.
pub(crate) struct Limits {
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Normalised `--allowed-origins` (see [`normalise_origin`]); empty: any origin.
    allowed_origins: Vec<String>,
    per_ip: Option<Arc<PerIp>>,
    publish_rate: Option<Quota>,
    post_rate: Option<PostRate>,
    metrics: Metrics,
}

/// Open WebSocket sessions per client address, under `--max-connections-per-ip`.
struct PerIp {
    max: u32,
    /// Only addresses with an open session: an entry is removed when its count reaches 0.
    open: Mutex<HashMap<IpAddr, u32>>,
}

struct PostRate {
    limiter: AddressLimiter,
    /// Addresses the limiter may hold before the next sweep.
    sweep_at: AtomicUsize,
}

impl Limits {
    pub(crate) fn new(args: &LimitArgs, metrics: Metrics) -> Self {
        let per_ip = (args.max_connections_per_ip > 0).then(|| {
            Arc::new(PerIp {
                max: args.max_connections_per_ip,
                open: Mutex::new(HashMap::new()),
            })
        });
        let publish_rate = NonZeroU32::new(args.max_publish_rate).map(|rate| {
            let burst = NonZeroU32::new(args.publish_burst).unwrap_or(rate);
            Quota::per_second(rate).allow_burst(burst)
        });
        let post_rate = publish_rate.map(|quota| PostRate {
            limiter: RateLimiter::new(quota, DashMapStateStore::default(), MonotonicClock),
            sweep_at: AtomicUsize::new(SWEEP_FROM),
        });
        Limits {
            trusted_proxies: args.trusted_proxies.iter().flatten().copied().collect(),
            allowed_origins: args
                .allowed_origins
                .iter()
                .filter(|origin| !origin.is_empty())
                .cloned()
                .collect(),
            per_ip,
            publish_rate,
            post_rate,
            metrics,
        }
    }

    /// Who the client is: the peer, or, when the peer is a trusted proxy, the address it
    /// passes in `X-Real-IP`, else the right-most address in `X-Forwarded-For` that is not
    /// itself a trusted proxy. A header that does not parse is ignored.
    pub(crate) fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        // An X-Real-IP that is itself a trusted proxy (a CDN in front of nginx) says who
        // the last proxy saw, not who the client is: X-Forwarded-For knows more then.
        if let Some(real) = headers
            .get("x-real-ip")
            .and_then(|value| parse_address(value.to_str().ok()?))
            .filter(|real| !self.is_trusted(*real))
        {
            return real;
        }
        self.forwarded_for(headers).unwrap_or(peer)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The right-most untrusted address of `X-Forwarded-For` (over all its lines), or the
    /// left-most when all are trusted; `None` when absent or any item does not parse.
    fn forwarded_for(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let mut leftmost = None;
        for line in headers.get_all("x-forwarded-for").iter().rev() {
            for item in line.to_str().ok()?.rsplit(',') {
                let ip = parse_address(item)?;
                if !self.is_trusted(ip) {
                    return Some(ip);
                }
                leftmost = Some(ip);
            }
        }
        leftmost
    }

    /// The checks of an upgrade before its 101: its `Origin` (403), then its client's open
    /// sessions (429). The [`Admission`] holds the client's place until the session ends.
    pub(crate) fn admit_upgrade(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
    ) -> Result<Admission, Box<Reply>> {
        if !self.allowed_origins.is_empty() {
            if let Some(origin) = headers.get(header::ORIGIN) {
                let allowed = origin
                    .to_str()
                    .ok()
                    .and_then(|origin| normalise_origin(origin).ok())
                    .is_some_and(|origin| self.allowed_origins.contains(&origin));
                if !allowed {
                    self.metrics.refused(Refusal::origin);
                    return Err(Box::new(refusal(
                        StatusCode::FORBIDDEN,
                        "this page's origin may not open a WebSocket here (--allowed-origins)\n",
                    )));
                }
            }
        }
        let Some(per_ip) = &self.per_ip else {
            return Ok(Admission(None));
        };
        let client = limit_key(self.client_address(peer, headers));
        match per_ip.take(client) {
            Some(place) => Ok(Admission(Some(place))),
            None => {
                self.metrics.refused(Refusal::per_ip);
                Err(Box::new(refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "too many connections from {client} (--max-connections-per-ip {})\n",
                        per_ip.max
                    ),
                )))
            }
        }
    }

    /// A `POST` from `peer`: `Err(429)` with `Retry-After` when its client address publishes
    /// faster than `--max-publish-rate` allows.
    pub(crate) fn admit_post(&self, peer: IpAddr, headers: &HeaderMap) -> Result<(), Box<Reply>> {
        let Some(post_rate) = &self.post_rate else {
            return Ok(());
        };
        let client = limit_key(self.client_address(peer, headers));
        let checked = post_rate.limiter.check_key(&client);
        post_rate.sweep();
        let Err(not_until) = checked else {
            return Ok(());
        };
        self.metrics.refused(Refusal::publish_rate);
        let wait = not_until.wait_time_from(std::time::Instant::now());
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let quota = not_until.quota();
        let rate = (1.0 / quota.replenish_interval().as_secs_f64()).round();
        let mut response = refusal(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "publishing faster than {rate} messages per second (--max-publish-rate); \
                 retry in {} s\n",
                seconds.max(1)
            ),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        Err(Box::new(response))
    }

    /// A publishing connection's throttle, or `None` when `--max-publish-rate` is off.
    pub(crate) fn throttle(&self) -> Option<Box<Throttle>> {
        self.publish_rate.map(|quota| {
            Box::new(Throttle {
                limiter: RateLimiter::direct_with_clock(quota, MonotonicClock),
                owed: None,
                throttled: self.metrics.throttled.clone(),
            })
        })
    }
}

impl PerIp {
    /// A place for one more session of `client`, or `None` when it holds `max` already.
    fn take(self: &Arc<Self>, client: IpAddr) -> Option<Place> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(client).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Place {
            per_ip: self.clone(),
            client,
        })
    }
}

impl PostRate {
    /// Forget the addresses whose state is fresh again, when the limiter grew past its mark.
    fn sweep(&self) {
        if self.limiter.len() < self.sweep_at.load(Ordering::Relaxed) {
            return;
        }
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let kept = self.limiter.len();
        self.sweep_at
            .store(SWEEP_FROM.max(kept.saturating_mul(2)), Ordering::Relaxed);
    }
}

/// An upgrade that passed the limits: while `--max-connections-per-ip` is on, it holds one of
/// its client's places, freed when the session's task ends.
pub(crate) struct Admission(Option<Place>);

impl Admission {
    /// Spawn the connection's task on `tracker`, holding this admission until it ends. The
    /// task is spawned as it is when there is nothing to hold: no byte more per connection.
    pub(crate) fn spawn<F>(self, tracker: &TaskTracker, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match self.0 {
            None => drop(tracker.spawn(task)),
            Some(place) => {
                let task = futures_util::FutureExt::map(task, move |()| drop(place));
                drop(tracker.spawn(task));
            }
        }
    }
}

/// One open session of a client under `--max-connections-per-ip`; given back when dropped.
struct Place {
    per_ip: Arc<PerIp>,
    client: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self
            .per_ip
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// A publishing connection's rate (`--max-publish-rate` with `--publish-burst`), asked by its
/// session before each read. The message that finds the bucket empty has been read already:
/// it goes on, and the connection is not read again until that message's turn has come (its
/// cell is taken then), so over any stretch longer than a burst the rate holds; a burst may
/// be one message longer than `--publish-burst`.
pub(crate) struct Throttle {
    limiter: ConnectionLimiter,
    /// When the last message read may have been sent by the rate: nothing is read before.
    owed: Option<Instant>,
    throttled: Counter,
}

impl Throttle {
    /// Whether the session may read now. Called before every read while the session is
    /// open (also when its publish window is full), so a passed deadline never lingers.
    pub(crate) fn may_read(&mut self) -> bool {
        let Some(until) = self.owed else {
            return true;
        };
        if Instant::now() < until {
            return false;
        }
        match self.limiter.check() {
            Ok(()) => {
                self.owed = None;
                true
            }
            Err(not_until) => {
                self.owed = Some(Instant::from_std(not_until.earliest_possible()));
                false
            }
        }
    }

    /// One message was read; past the rate, reading stops until its turn.
    pub(crate) fn took_one(&mut self) {
        if let Err(not_until) = self.limiter.check() {
            self.owed = Some(Instant::from_std(not_until.earliest_possible()));
            self.throttled.inc();
        }
    }

    /// The session is not reading because of the rate.
    pub(crate) fn is_holding(&self) -> bool {
        self.owed.is_some()
    }

    /// When the session may read again (its timer wakes it then).
    pub(crate) fn resume_at(&self) -> Option<Instant> {
        self.owed
    }
}

/// An address as proxies write it: `1.2.3.4`, `::1`, `[::1]`, or either with a port.
fn parse_address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let ip = text
        .parse::<IpAddr>()
        .or_else(|_| text.parse::<SocketAddr>().map(|addr| addr.ip()))
        .or_else(|_| {
            text.strip_prefix('[')
                .and_then(|rest| rest.strip_suffix(']'))
                .ok_or(())
                .and_then(|inner| inner.parse::<IpAddr>().map_err(|_| ()))
        })
        .ok()?;
    Some(ip.to_canonical())
}

/// What the per-address limits count by: an IPv4 address, or an IPv6 address's /64 (one
/// subscriber's network: a host picks any of its 2^64 addresses at will, so counting whole
/// addresses would let one client step around the limits and grow the POST limiter's map).
fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(trusted: &[&str]) -> Limits {
        let args = LimitArgs {
            trusted_proxies: trusted
                .iter()
                .map(|net| Some(net.parse().unwrap()))
                .collect(),
            max_connections_per_ip: 1,
            max_publish_rate: 0,
            publish_burst: 0,
            allowed_origins: vec![],
        };
        Limits::new(&args, Metrics::new())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_anyone_else_is_their_own_address() {
        let limits = limits(&["127.0.0.1/32", "::1/128", "10.0.0.0/8"]);
        let real = headers(&[("x-real-ip", "203.0.113.7")]);
        assert_eq!(
            limits.client_address(ip("127.0.0.1"), &real),
            ip("203.0.113.7")
        );
        // An IPv4 peer on a dual-stack listener is still the trusted 127.0.0.1.
        assert_eq!(
            limits.client_address(ip("::ffff:127.0.0.1"), &real),
            ip("203.0.113.7")
        );
        assert_eq!(
            limits.client_address(ip("198.51.100.1"), &real),
            ip("198.51.100.1")
        );
        // X-Forwarded-For: the right-most address that is not a trusted proxy, over all lines.
        let forwarded = headers(&[
            ("x-forwarded-for", "192.0.2.1, 203.0.113.9"),
            ("x-forwarded-for", "10.1.1.1"),
        ]);
        assert_eq!(
            limits.client_address(ip("127.0.0.1"), &forwarded),
            ip("203.0.113.9")
        );
        let all_trusted = headers(&[("x-forwarded-for", "10.0.0.2, 10.0.0.3")]);
        assert_eq!(
            limits.client_address(ip("::1"), &all_trusted),
            ip("10.0.0.2")
        );
        let ported = headers(&[("x-real-ip", "[2001:db8::1]:443")]);
        assert_eq!(limits.client_address(ip("::1"), &ported), ip("2001:db8::1"));
    }

    #[test]
    fn an_x_real_ip_that_is_itself_a_trusted_proxy_defers_to_x_forwarded_for() {
        // A CDN (203.0.113.0/24, trusted) in front of nginx (loopback): nginx's X-Real-IP is
        // the CDN; the client is the right-most untrusted X-Forwarded-For entry.
        let limits = limits(&["127.0.0.1/32", "203.0.113.0/24"]);
        let forwarded = headers(&[
            ("x-real-ip", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.9, 203.0.113.7"),
        ]);
        assert_eq!(
            limits.client_address(ip("127.0.0.1"), &forwarded),
            ip("198.51.100.9")
        );
    }

    #[test]
    fn ipv6_clients_are_limited_per_64_and_ipv4_per_address() {
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:2::2"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(limit_key(ip("192.0.2.7")), ip("192.0.2.7"));
        let limits = limits(&["127.0.0.1/32"]);
        let per_ip = limits.per_ip.as_ref().unwrap();
        let _first = per_ip
            .take(limit_key(ip("2001:db8::1")))
            .expect("first place");
        assert!(
            per_ip.take(limit_key(ip("2001:db8::2"))).is_none(),
            "a second address of the same /64 is the same client (max 1)"
        );
    }

    #[test]
    fn malformed_forwarding_headers_fall_back_to_the_peer() {
        let limits = limits(&["127.0.0.1/32"]);
        for bad in [
            headers(&[("x-real-ip", "not an address")]),
            headers(&[("x-forwarded-for", "203.0.113.9, bogus")]),
            headers(&[("x-forwarded-for", "")]),
            headers(&[]),
        ] {
            assert_eq!(
                limits.client_address(ip("127.0.0.1"), &bad),
                ip("127.0.0.1")
            );
        }
        // A bad X-Real-IP does not hide a good X-Forwarded-For.
        let both = headers(&[("x-real-ip", "?"), ("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(
            limits.client_address(ip("127.0.0.1"), &both),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn a_clients_place_is_freed_when_dropped_and_its_entry_goes_at_zero() {
        let limits = limits(&[]);
        let per_ip = limits.per_ip.as_ref().unwrap();
        let first = per_ip.take(ip("192.0.2.1")).expect("first place");
        assert!(per_ip.take(ip("192.0.2.1")).is_none(), "over the limit");
        let other = per_ip.take(ip("192.0.2.2")).expect("another address");
        drop(first);
        assert_eq!(per_ip.open.lock().unwrap().len(), 1);
        let again = per_ip.take(ip("192.0.2.1")).expect("freed");
        drop((again, other));
        assert!(per_ip.open.lock().unwrap().is_empty());
    }

    #[test]
    fn origins_compare_scheme_and_host_in_any_case_and_the_port_exactly() {
        let n = |s: &str| normalise_origin(s).unwrap();
        assert_eq!(n("HTTPS://Example.ORG"), "https://example.org:443");
        assert_eq!(n("https://example.org:443/"), "https://example.org:443");
        assert_eq!(n("http://localhost:8080"), "http://localhost:8080");
        assert_ne!(n("http://localhost:8080"), n("http://localhost:8081"));
        assert_ne!(n("http://example.org"), n("https://example.org"));
        assert_eq!(n("http://[::1]:3000"), "http://[::1]:3000");
        assert_eq!(n("app://desk"), "app://desk");
        assert_eq!(n("null"), "null");
        for bad in [
            "example.org",
            "https://",
            "https://example.org/path",
            "https://user@example.org",
            "https://example.org:99999",
            "https://[::1",
            "1http://x",
        ] {
            assert!(normalise_origin(bad).is_err(), "{bad}");
        }
    }
}
