//! What arrived, and when: per-channel counts, loss, reordering and latency.
//!
//! Owns: the message layout (8-byte sequence number, 8-byte send time in ns since the start
//! of this process, both little-endian, then padding; or, for `format=json` subscribers,
//! the text layout: both as 16 hex digits, then ASCII padding, read from the envelope's
//! `"data":"…"`), the [`Shared`] counters every
//! connection adds to (per channel, cache-line padded), per-connection order tracking, and
//! the latency histograms (hdrhistogram, µs, sharded so connections rarely contend; one lock
//! per read, not per message).
//! Must not: do I/O.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Notify;

use super::publishers::PublishError;
use super::subscribers::Ended;

/// The first thing that went wrong on one of a run's connections: it fails the run while
/// subscribers are being made ready, and makes it not count after.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionFailure {
    #[error("a subscriber of channel {channel}: {why}")]
    Subscriber { channel: usize, why: Ended },
    #[error(transparent)]
    Publisher(#[from] PublishError),
}

/// The sequence number of a readiness probe (sent before measuring, never counted).
pub const PROBE: u64 = u64::MAX;
/// The smallest message: sequence number and timestamp.
pub const MIN_SIZE: usize = 16;
/// The smallest message in the text layout: both as 16 hex digits.
pub const MIN_TEXT_SIZE: usize = 32;
/// How a message's sequence number and send time are written, and where a subscriber finds
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// Binary, little-endian; subscribers receive the payload as it is.
    #[default]
    Binary,
    /// ASCII text (16 + 16 hex digits, then padding), so a `format=json` subscriber receives
    /// it as the envelope's plain `"data"` string (the common JSON case), not base64.
    Envelope,
}

impl Layout {
    /// The envelope layout when the subscribe URL asks for `format=json`.
    pub fn for_subscribe_url(url: &str) -> Layout {
        let query = url.split_once('?').map_or("", |(_, q)| q);
        if query.split('&').any(|pair| pair == "format=json") {
            Layout::Envelope
        } else {
            Layout::Binary
        }
    }

    pub fn min_size(self) -> usize {
        match self {
            Layout::Binary => MIN_SIZE,
            Layout::Envelope => MIN_TEXT_SIZE,
        }
    }

    /// Write a message's header into `out` (at least [`Layout::min_size`] bytes).
    pub fn stamp(self, out: &mut [u8], seq: u64) {
        match self {
            Layout::Binary => stamp(out, seq),
            Layout::Envelope => {
                hex16(&mut out[..16], seq);
                hex16(&mut out[16..32], now_ns());
            }
        }
    }

    /// A received message's sequence number and send time, from its first bytes.
    pub fn parse(self, prefix: &[u8]) -> Option<(u64, u64)> {
        match self {
            Layout::Binary => parse(prefix),
            Layout::Envelope => {
                const DATA: &[u8] = b"\"data\":\"";
                let at = prefix.windows(DATA.len()).position(|w| w == DATA)? + DATA.len();
                let text = prefix.get(at..at + MIN_TEXT_SIZE)?;
                Some((unhex16(&text[..16])?, unhex16(&text[16..])?))
            }
        }
    }
}

fn hex16(out: &mut [u8], v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in out.iter_mut().enumerate() {
        *b = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
}

fn unhex16(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| u64::from_str_radix(t, 16).ok())
}
/// Histogram shards; connection `i` records into shard `i % SHARDS`.
const SHARDS: usize = 16;
/// The largest latency recorded exactly: 10 minutes, in µs.
const MAX_LATENCY_US: u64 = 600_000_000;

/// Nanoseconds since this process first asked; publishers and receivers share the clock.
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Write a message's header into `out` (at least [`MIN_SIZE`] bytes); the rest is padding
/// the caller filled once.
pub fn stamp(out: &mut [u8], seq: u64) {
    out[..8].copy_from_slice(&seq.to_le_bytes());
    out[8..16].copy_from_slice(&now_ns().to_le_bytes());
}

/// A message's sequence number and send time, if it is long enough to carry them.
pub fn parse(prefix: &[u8]) -> Option<(u64, u64)> {
    if prefix.len() < MIN_SIZE {
        return None;
    }
    let seq = u64::from_le_bytes(prefix[..8].try_into().ok()?);
    let sent = u64::from_le_bytes(prefix[8..16].try_into().ok()?);
    Some((seq, sent))
}

/// One channel's counts, on its own cache line.
#[repr(align(64))]
pub struct Channel {
    /// Messages published on it (probes not counted).
    pub sent: AtomicU64,
    /// Deliveries to its subscribers (each message counts once per subscriber).
    pub delivered: AtomicU64,
    /// The publishing lane that owns it, woken when deliveries free its window.
    pub lane: usize,
    /// Each subscriber's next expected sequence number (`u64::MAX` once it ended), registered
    /// at its first probe and stored at each flush: how far the slowest one is behind.
    subscribers: Mutex<Vec<Arc<AtomicU64>>>,
    /// The slowest subscriber's next sequence number when last looked at.
    floor: AtomicU64,
}

impl Channel {
    /// Whether a subscriber is `bound` or more messages behind the `sent` ones. The window is
    /// an average over a channel's subscribers; this keeps one subscriber the generator
    /// starves of CPU from falling without limit behind the others (and being closed by a
    /// relay's slow-consumer rule for the generator's doing). Looks at every subscriber only
    /// when the last look does not already clear it.
    pub fn lagging(&self, sent: u64, bound: u64) -> bool {
        if sent < self.floor.load(Ordering::Relaxed).saturating_add(bound) {
            return false;
        }
        let floor = crate::lock(&self.subscribers)
            .iter()
            .map(|next| next.load(Ordering::Relaxed))
            .min()
            .unwrap_or(u64::MAX);
        self.floor.store(floor, Ordering::Relaxed);
        sent >= floor.saturating_add(bound)
    }
}

/// A publishing lane's wake-up: set `waiting` before sleeping on `notify`.
#[derive(Default)]
pub struct Lane {
    pub waiting: AtomicBool,
    pub notify: Notify,
}

impl Lane {
    /// Called by receivers after deliveries: wakes the lane if it waits for window room.
    pub fn poke(&self) {
        if self.waiting.load(Ordering::Relaxed) && self.waiting.swap(false, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }
}

/// Everything the connections of one run add to.
pub struct Shared {
    pub channels: Vec<Channel>,
    pub lanes: Vec<Lane>,
    /// Connections that received a probe: subscribed end to end.
    pub ready: AtomicUsize,
    pub reordered: AtomicU64,
    pub malformed: AtomicU64,
    /// Publisher acks (ws ack mode) and HTTP responses received.
    pub acked: AtomicU64,
    /// Connections that ended (closed, broken) before the run did.
    pub ended: AtomicU64,
    pub first_error: Mutex<Option<ConnectionFailure>>,
    /// Ingest without acks: (messages counted in Redis, how many may be sent beyond them).
    gate: OnceLock<(Arc<AtomicU64>, u64)>,
    histograms: Vec<Mutex<Histogram<u64>>>,
}

impl Shared {
    /// `lane_of(channel)` assigns each channel to one of `lanes` publishing lanes.
    pub fn new(channels: usize, lanes: usize) -> Shared {
        let lanes = lanes.max(1);
        Shared {
            channels: (0..channels)
                .map(|c| Channel {
                    sent: AtomicU64::new(0),
                    delivered: AtomicU64::new(0),
                    lane: c % lanes,
                    subscribers: Mutex::new(Vec::new()),
                    floor: AtomicU64::new(0),
                })
                .collect(),
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            ready: AtomicUsize::new(0),
            reordered: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            first_error: Mutex::new(None),
            gate: OnceLock::new(),
            histograms: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }

    /// Hold publishers to at most `limit` messages beyond what `reached` Redis.
    pub fn set_gate(&self, gate: Option<(Arc<AtomicU64>, u64)>) {
        if let Some(gate) = gate {
            let _ = self.gate.set(gate);
        }
    }

    /// Whether the gate (if any) lets one more message go.
    pub fn gate_open(&self) -> bool {
        match self.gate.get() {
            None => true,
            Some((reached, limit)) => {
                self.sent().saturating_sub(reached.load(Ordering::Relaxed)) < *limit
            }
        }
    }

    /// Keep the first failure of a connection during the run (later ones are its echoes).
    pub fn error(&self, error: ConnectionFailure) {
        let mut first = crate::lock(&self.first_error);
        first.get_or_insert(error);
    }

    pub fn take_error(&self) -> Option<ConnectionFailure> {
        crate::lock(&self.first_error).take()
    }

    /// Record latencies (ns) into one shard under one lock.
    pub fn record(&self, shard: usize, latencies_ns: &[u64]) {
        if latencies_ns.is_empty() {
            return;
        }
        let mut h = crate::lock(&self.histograms[shard % SHARDS]);
        for &ns in latencies_ns {
            h.saturating_record((ns / 1_000).max(1));
        }
    }

    /// Forget every latency recorded so far (the warm-up).
    pub fn reset_latency(&self) {
        for h in &self.histograms {
            crate::lock(h).reset();
        }
    }

    pub fn latency(&self) -> Latency {
        let mut all = new_histogram();
        for h in &self.histograms {
            let _ = all.add(&*crate::lock(h));
        }
        Latency::of(&all)
    }

    pub fn sent(&self) -> u64 {
        self.channels
            .iter()
            .map(|c| c.sent.load(Ordering::Relaxed))
            .sum()
    }

    pub fn delivered(&self) -> u64 {
        self.channels
            .iter()
            .map(|c| c.delivered.load(Ordering::Relaxed))
            .sum()
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Latency percentiles, in µs (`count` 0: nothing recorded).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// A single-owner histogram for places with one recorder (acks of one run).
pub struct LocalLatency(Histogram<u64>);

impl Default for LocalLatency {
    fn default() -> Self {
        LocalLatency(new_histogram())
    }
}

impl LocalLatency {
    pub fn record(&mut self, ns: u64) {
        self.0.saturating_record((ns / 1_000).max(1));
    }
    pub fn merge_into(&self, shared: &Shared) {
        let mut h = crate::lock(&shared.histograms[0]);
        let _ = h.add(&self.0);
    }
}

/// One subscriber connection's view: which channel, whether it is ready, what it expects next.
pub struct Order {
    pub channel: usize,
    pub shard: usize,
    layout: Layout,
    ready: bool,
    /// One past the highest sequence number seen.
    next: u64,
    /// `next` as the channel's publisher sees it (see [`Channel::lagging`]).
    slot: Option<Arc<AtomicU64>>,
}

/// What one read's messages added up to, flushed to [`Shared`] once per read.
pub struct Batch {
    delivered: u64,
    latencies: [u64; 64],
    n: usize,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            delivered: 0,
            latencies: [0; 64],
            n: 0,
        }
    }
}

impl Order {
    pub fn new(channel: usize, shard: usize) -> Order {
        Order::with_layout(channel, shard, Layout::Binary)
    }

    pub fn with_layout(channel: usize, shard: usize, layout: Layout) -> Order {
        Order {
            channel,
            shard,
            layout,
            ready: false,
            next: 0,
            slot: None,
        }
    }

    /// Account one message that arrived at `now` (ns).
    pub fn on_message(&mut self, prefix: &[u8], now: u64, batch: &mut Batch, shared: &Shared) {
        let Some((seq, sent)) = self.layout.parse(prefix) else {
            shared.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if seq == PROBE {
            if !self.ready {
                self.ready = true;
                shared.ready.fetch_add(1, Ordering::Relaxed);
                let slot = Arc::new(AtomicU64::new(self.next));
                crate::lock(&shared.channels[self.channel].subscribers).push(slot.clone());
                self.slot = Some(slot);
            }
            return;
        }
        if seq < self.next {
            shared.reordered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.next = seq + 1;
        }
        batch.delivered += 1;
        if batch.n == batch.latencies.len() {
            self.flush(batch, shared);
        }
        batch.latencies[batch.n] = now.saturating_sub(sent);
        batch.n += 1;
    }

    /// Add the batch to the shared counts and wake the channel's publisher if it waits.
    pub fn flush(&self, batch: &mut Batch, shared: &Shared) {
        if batch.delivered > 0 {
            if let Some(slot) = &self.slot {
                slot.store(self.next, Ordering::Relaxed);
            }
            let channel = &shared.channels[self.channel];
            channel
                .delivered
                .fetch_add(batch.delivered, Ordering::Relaxed);
            shared.lanes[channel.lane].poke();
        }
        shared.record(self.shard, &batch.latencies[..batch.n]);
        batch.delivered = 0;
        batch.n = 0;
    }
}

impl Drop for Order {
    /// An ended subscriber holds no publisher back.
    fn drop(&mut self) {
        if let Some(slot) = &self.slot {
            slot.store(u64::MAX, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, sent: u64) -> [u8; 16] {
        let mut m = [0u8; 16];
        m[..8].copy_from_slice(&seq.to_le_bytes());
        m[8..].copy_from_slice(&sent.to_le_bytes());
        m
    }

    /// The slowest subscriber holds its channel back once `bound` behind; one that ended
    /// does not.
    #[test]
    fn a_subscriber_far_behind_holds_its_channel_back_until_it_catches_up_or_ends() {
        let shared = Shared::new(1, 1);
        let (mut fast, mut slow) = (Order::new(0, 0), Order::new(0, 1));
        let mut batch = Batch::default();
        for order in [&mut fast, &mut slow] {
            order.on_message(&message(PROBE, 0), 0, &mut batch, &shared);
        }
        let channel = &shared.channels[0];
        for seq in 0..10 {
            fast.on_message(&message(seq, 0), 0, &mut batch, &shared);
        }
        fast.flush(&mut batch, &shared);
        slow.on_message(&message(0, 0), 0, &mut batch, &shared);
        slow.flush(&mut batch, &shared);
        assert!(!channel.lagging(4, 4), "1 behind of 4");
        assert!(channel.lagging(10, 4), "9 behind of 4");
        for seq in 1..8 {
            slow.on_message(&message(seq, 0), 0, &mut batch, &shared);
        }
        slow.flush(&mut batch, &shared);
        assert!(!channel.lagging(10, 4), "2 behind of 4");
        assert!(channel.lagging(12, 4));
        drop(slow);
        assert!(
            !channel.lagging(12, 4),
            "an ended subscriber held the channel back"
        );
        assert!(channel.lagging(14, 4), "the fast one is 4 behind");
    }

    #[test]
    fn counts_deliveries_reordering_probes_and_latency() {
        let shared = Shared::new(2, 1);
        let mut order = Order::new(1, 3);
        let mut batch = Batch::default();
        for (seq, sent) in [
            (PROBE, 0),
            (PROBE, 0),
            (0, 1_000),
            (2, 2_000),
            (1, 3_000),
            (3, 4_000),
        ] {
            order.on_message(&message(seq, sent), 10_000_000, &mut batch, &shared);
        }
        order.on_message(b"short", 0, &mut batch, &shared);
        order.flush(&mut batch, &shared);
        assert_eq!(shared.ready.load(Ordering::Relaxed), 1);
        assert_eq!(shared.channels[1].delivered.load(Ordering::Relaxed), 4);
        assert_eq!(shared.channels[0].delivered.load(Ordering::Relaxed), 0);
        assert_eq!(shared.reordered.load(Ordering::Relaxed), 1);
        assert_eq!(shared.malformed.load(Ordering::Relaxed), 1);
        let latency = shared.latency();
        assert_eq!(latency.count, 4);
        assert!((9_990..=10_000).contains(&latency.p50_us), "{latency:?}");
    }

    #[test]
    fn the_envelope_layout_is_read_from_the_json_data_field() {
        assert_eq!(
            Layout::for_subscribe_url("ws://127.0.0.1:1/b/{i}?last=1&format=json"),
            Layout::Envelope
        );
        assert_eq!(
            Layout::for_subscribe_url("ws://127.0.0.1:1/format=json"),
            Layout::Binary
        );
        let mut payload = vec![b'x'; 40];
        Layout::Envelope.stamp(&mut payload, 0x1234_5678_9abc);
        assert!(payload.is_ascii());
        assert_eq!(&payload[..16], b"0000123456789abc");
        let frame = format!(
            r#"{{"channel":"lightlevel/bench/0","id":"1700000000000-3","data":"{}"}}"#,
            std::str::from_utf8(&payload).unwrap()
        );
        let (seq, sent) = Layout::Envelope.parse(frame.as_bytes()).unwrap();
        assert_eq!(seq, 0x1234_5678_9abc);
        assert!(sent <= now_ns());
        // Cut short before the header ends, or no data field: malformed, not a panic.
        assert_eq!(Layout::Envelope.parse(&frame.as_bytes()[..80]), None);
        assert_eq!(Layout::Envelope.parse(br#"{"gap":{"after":"1-0"}}"#), None);
        assert_eq!(
            Layout::Binary
                .parse(frame.as_bytes())
                .map(|p| p.0 == 0x1234_5678_9abc),
            Some(false)
        );
    }

    #[test]
    fn stamp_and_parse_round_trip() {
        let mut m = vec![0u8; 100];
        stamp(&mut m, 42);
        let (seq, sent) = parse(&m).unwrap();
        assert_eq!(seq, 42);
        assert!(sent <= now_ns());
    }
}
