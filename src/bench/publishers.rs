//! The publishing side of a run: lanes that send numbered, timestamped messages.
//!
//! Owns: the three ways in — `redis://` (PUBLISH through fred, pipelined on one connection
//! per lane, so each channel's order holds), `ws://` (one connection per channel, binary
//! frames written several per write call, optionally in `lightrelay.ack` mode with a window of
//! unacknowledged messages) and `http://` (POST, keep-alive, pipelined on one connection per
//! lane, as nchan's publisher location takes it) — and each lane's loop: at `--rate`, or as
//! fast as deliveries free each channel's window, bounded by `--duration` and `--count`.
//! What can go wrong is a [`PublishError`].
//! Must not: read what subscribers received beyond the per-channel counts in [`Shared`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::bytes_utils::Str;
use fred::clients::Client;
use fred::interfaces::{ClientLike, PubsubInterface};
use futures_util::stream::{self, FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::stats::{now_ns, Layout, Shared, PROBE};
use super::wire::{self, Event, FrameReader, ResponseReader, Target, WireError};

/// Why publishing failed: connecting, a refusal, a broken connection or missing answers.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{authority}: the server did not select the lightrelay.ack subprotocol")]
    NoAckProtocol { authority: String },
    #[error("{authority}: {source}")]
    Connect {
        authority: String,
        source: std::io::Error,
    },
    #[error("cannot publish through {0}://")]
    Scheme(String),
    #[error("redis://{authority}: {source}")]
    Redis {
        authority: String,
        source: fred::error::Error,
    },
    #[error("redis://{authority}: no answer")]
    RedisTimeout { authority: String },
    #[error("PUBLISH: {0}")]
    Publish(#[from] fred::error::Error),
    #[error("publishing: {0}")]
    Write(std::io::Error),
    #[error("a publisher connection is missing")]
    MissingConnection,
    #[error("no connection for channel {0}")]
    NoConnection(usize),
    #[error("a publisher's window was closed")]
    WindowClosed,
    #[error("PUBLISHes still unanswered at the end")]
    PublishesUnanswered,
    #[error("acks still missing at the end")]
    AcksMissing,
    #[error("HTTP responses still missing at the end")]
    ResponsesMissing,
    #[error("the publisher connection ended")]
    Ended,
    #[error("the http publisher connection ended")]
    HttpEnded,
    #[error("the publisher connection was closed ({})", code.map_or("no code".to_string(), |c| c.to_string()))]
    Closed { code: Option<u16> },
    #[error("the publisher answered HTTP {0}")]
    Status(u16),
}

/// Bytes of frames or requests gathered before one write call.
const WRITE_BATCH: usize = 16 * 1024;

/// How the lanes of a run connect.
pub struct Setup<'a> {
    /// `redis://host:port/CHANNEL`, `ws://host:port/PATH` or `http://host:port/PATH`, with
    /// `{i}` standing for the channel number.
    pub target: &'a Target,
    pub channels: usize,
    pub lanes: usize,
    /// `ws://` only: offer `lightrelay.ack` and keep at most `pipeline` messages unacknowledged.
    pub ack: bool,
    /// Commands (redis), requests (http) or unacknowledged messages (ws with ack) in flight
    /// per connection.
    pub pipeline: usize,
    pub concurrency: usize,
    /// Reader tasks end by themselves at this instant at the latest.
    pub until: Instant,
}

/// One lane: a set of channels (`c % lanes == lane`) and the connection(s) that carry them.
pub struct Lane {
    pub lane: usize,
    pub channels: Vec<usize>,
    /// The number of lanes: this lane's channels are `lane + k * stride`.
    stride: usize,
    kind: Kind,
    readers: Vec<JoinHandle<()>>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

enum Kind {
    Redis(RedisLane),
    Ws(Vec<WsConn>),
    Http(HttpConn),
}

type PublishFuture = Pin<Box<dyn Future<Output = Result<i64, fred::error::Error>> + Send>>;

struct RedisLane {
    client: Client,
    /// Channel names, by channel number.
    names: Arc<Vec<Str>>,
    in_flight: FuturesOrdered<PublishFuture>,
    limit: usize,
}

/// One ws:// publisher connection (one channel).
struct WsConn {
    channel: usize,
    write: OwnedWriteHalf,
    out: Vec<u8>,
    /// Ack mode: one permit per message that may still go out unacknowledged.
    window: Option<Arc<Window>>,
}

/// Requests or messages in flight on one connection, with their send times for latency.
struct Window {
    permits: Semaphore,
    capacity: usize,
    sent_at: Vec<AtomicU64>,
    sent: AtomicU64,
}

impl Window {
    fn new(capacity: usize) -> Arc<Window> {
        Arc::new(Window {
            permits: Semaphore::new(capacity),
            capacity,
            sent_at: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            sent: AtomicU64::new(0),
        })
    }

    /// Note one more in flight (a permit was taken).
    fn sent(&self) {
        let n = self.sent.fetch_add(1, Ordering::Relaxed);
        self.sent_at[(n % self.capacity as u64) as usize].store(now_ns(), Ordering::Relaxed);
    }

    /// The `n`-th answer (counted from 0) arrived: its latency in ns; frees a permit.
    fn answered(&self, n: u64) -> u64 {
        let at = self.sent_at[(n % self.capacity as u64) as usize].load(Ordering::Relaxed);
        self.permits.add_permits(1);
        now_ns().saturating_sub(at)
    }

    /// Wait until everything sent was answered, or `until`.
    async fn drained(&self, until: Instant) -> bool {
        let all = u32::try_from(self.capacity).unwrap_or(u32::MAX);
        matches!(
            tokio::time::timeout_at(until, self.permits.acquire_many(all)).await,
            Ok(Ok(_))
        )
    }
}

/// One http:// publisher connection, pipelining POSTs for its lane's channels.
struct HttpConn {
    targets: Arc<Vec<Target>>,
    write: OwnedWriteHalf,
    out: Vec<u8>,
    window: Arc<Window>,
}

/// Connect every lane. Lane `l` carries channels `l, l + lanes, …`.
pub async fn connect(setup: Setup<'_>, shared: &Arc<Shared>) -> Result<Vec<Lane>, PublishError> {
    let lanes = setup.lanes.clamp(1, setup.channels.max(1));
    let mut out = Vec::with_capacity(lanes);
    match setup.target.scheme.as_str() {
        "redis" => {
            let names: Arc<Vec<Str>> = Arc::new(
                (0..setup.channels)
                    .map(|c| Str::from(setup.target.for_channel(c).path))
                    .collect(),
            );
            for lane in 0..lanes {
                let client = redis_client(setup.target).await?;
                out.push(Lane {
                    lane,
                    channels: lane_channels(lane, lanes, setup.channels),
                    stride: lanes,
                    kind: Kind::Redis(RedisLane {
                        client,
                        names: Arc::clone(&names),
                        in_flight: FuturesOrdered::new(),
                        limit: setup.pipeline.max(1),
                    }),
                    readers: Vec::new(),
                });
            }
        }
        "ws" => {
            let protocol = setup.ack.then_some(crate::ACK_PROTOCOL);
            let mut conns: Vec<Option<(WsConn, JoinHandle<()>)>> =
                (0..setup.channels).map(|_| None).collect();
            let mut opening = stream::iter(0..setup.channels)
                .map(|c| {
                    let target = setup.target.for_channel(c);
                    async move {
                        (
                            c,
                            wire::ws_connect(
                                &target,
                                c,
                                wire::Ask {
                                    protocol,
                                    token: None,
                                },
                            )
                            .await,
                        )
                    }
                })
                .buffer_unordered(setup.concurrency.max(1));
            while let Some((c, connected)) = opening.next().await {
                let conn = connected?;
                if setup.ack && !conn.protocol_selected {
                    return Err(PublishError::NoAckProtocol {
                        authority: setup.target.authority.clone(),
                    });
                }
                let window = setup.ack.then(|| Window::new(setup.pipeline.max(1)));
                let (read, write) = conn.stream.into_split();
                let reader = tokio::spawn(ws_reader(
                    read,
                    conn.leftover,
                    window.clone(),
                    c,
                    Arc::clone(shared),
                    setup.until,
                ));
                conns[c] = Some((
                    WsConn {
                        channel: c,
                        write,
                        out: Vec::with_capacity(WRITE_BATCH * 2),
                        window,
                    },
                    reader,
                ));
            }
            let mut by_lane: Vec<(Vec<WsConn>, Vec<JoinHandle<()>>)> =
                (0..lanes).map(|_| (Vec::new(), Vec::new())).collect();
            for (c, conn) in conns.into_iter().enumerate() {
                let (conn, reader) = conn.ok_or(PublishError::MissingConnection)?;
                by_lane[c % lanes].0.push(conn);
                by_lane[c % lanes].1.push(reader);
            }
            for (lane, (conns, readers)) in by_lane.into_iter().enumerate() {
                out.push(Lane {
                    lane,
                    channels: lane_channels(lane, lanes, setup.channels),
                    stride: lanes,
                    kind: Kind::Ws(conns),
                    readers,
                });
            }
        }
        "http" => {
            let targets: Arc<Vec<Target>> = Arc::new(
                (0..setup.channels)
                    .map(|c| setup.target.for_channel(c))
                    .collect(),
            );
            for lane in 0..lanes {
                let stream =
                    wire::connect_tcp(setup.target.addr, lane)
                        .await
                        .map_err(|source| PublishError::Connect {
                            authority: setup.target.authority.clone(),
                            source,
                        })?;
                let (read, write) = stream.into_split();
                let window = Window::new(setup.pipeline.max(1));
                let reader = tokio::spawn(http_reader(
                    read,
                    Arc::clone(&window),
                    lane,
                    Arc::clone(shared),
                    setup.until,
                ));
                out.push(Lane {
                    lane,
                    channels: lane_channels(lane, lanes, setup.channels),
                    stride: lanes,
                    kind: Kind::Http(HttpConn {
                        targets: Arc::clone(&targets),
                        write,
                        out: Vec::with_capacity(WRITE_BATCH * 2),
                        window,
                    }),
                    readers: vec![reader],
                });
            }
        }
        other => return Err(PublishError::Scheme(other.into())),
    }
    Ok(out)
}

fn lane_channels(lane: usize, lanes: usize, channels: usize) -> Vec<usize> {
    (lane..channels).step_by(lanes).collect()
}

/// A fred client on the target's Redis, connected.
pub async fn redis_client(target: &Target) -> Result<Client, PublishError> {
    let authority = &target.authority;
    let redis = |source| PublishError::Redis {
        authority: authority.clone(),
        source,
    };
    let config =
        fred::types::config::Config::from_url(&format!("redis://{authority}")).map_err(redis)?;
    let client = fred::types::Builder::from_config(config)
        .with_connection_config(|conn| conn.tcp.nodelay = Some(true))
        .build()
        .map_err(redis)?;
    tokio::time::timeout(wire::CONNECT_TIMEOUT, client.init())
        .await
        .map_err(|_| PublishError::RedisTimeout {
            authority: authority.clone(),
        })?
        .map_err(redis)?;
    Ok(client)
}

/// Reads what a ws:// publisher connection gets back: acks (text frames) in ack mode,
/// answered pings, anything else ignored. An unexpected end is an error of the run.
async fn ws_reader(
    mut read: tokio::net::tcp::OwnedReadHalf,
    leftover: Vec<u8>,
    window: Option<Arc<Window>>,
    index: usize,
    shared: Arc<Shared>,
    until: Instant,
) {
    let work = async {
        let mut reader = FrameReader::default();
        let mut buf = vec![0u8; 4096];
        let mut acks = 0u64;
        let mut latencies = Vec::with_capacity(64);
        let mut pending = leftover;
        loop {
            let data: &[u8] = if pending.is_empty() {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return Err::<(), PublishError>(PublishError::Ended),
                    Ok(n) => &buf[..n],
                }
            } else {
                &pending
            };
            let mut closed = None;
            reader.feed(data, &mut |event| match event {
                Event::Message { .. } => {
                    if let Some(window) = &window {
                        latencies.push(window.answered(acks));
                        acks += 1;
                    }
                }
                Event::Ping(_) => {}
                Event::Close(code) => closed = Some(code),
            })?;
            pending = Vec::new();
            shared
                .acked
                .fetch_add(latencies.len() as u64, Ordering::Relaxed);
            shared.record(index, &latencies);
            latencies.clear();
            if let Some(code) = closed {
                return Err(PublishError::Closed { code });
            }
        }
    };
    if let Ok(Err(e)) = tokio::time::timeout_at(until, work).await {
        shared.error(e.into());
    }
}

/// Reads pipelined responses on an http:// publisher connection; each one frees a permit.
async fn http_reader(
    mut read: tokio::net::tcp::OwnedReadHalf,
    window: Arc<Window>,
    index: usize,
    shared: Arc<Shared>,
    until: Instant,
) {
    let work = async {
        let mut parser = ResponseReader::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut statuses = Vec::with_capacity(64);
        let mut latencies = Vec::with_capacity(64);
        let mut answered = 0u64;
        loop {
            let n = match read.read(&mut buf).await {
                Ok(0) | Err(_) => return Err::<(), PublishError>(PublishError::HttpEnded),
                Ok(n) => n,
            };
            parser.feed(&buf[..n], &mut statuses)?;
            for &status in &statuses {
                if !(200..300).contains(&status) {
                    return Err(PublishError::Status(status));
                }
                latencies.push(window.answered(answered));
                answered += 1;
            }
            statuses.clear();
            shared
                .acked
                .fetch_add(latencies.len() as u64, Ordering::Relaxed);
            shared.record(index, &latencies);
            latencies.clear();
        }
    };
    if let Ok(Err(e)) = tokio::time::timeout_at(until, work).await {
        shared.error(e.into());
    }
}

impl Lane {
    /// Queue one message on `channel` (a channel of this lane); it may wait for window room.
    async fn send(&mut self, channel: usize, payload: &[u8]) -> Result<(), PublishError> {
        match &mut self.kind {
            Kind::Redis(r) => {
                while r.in_flight.len() >= r.limit {
                    if let Some(Err(e)) = r.in_flight.next().await {
                        return Err(e.into());
                    }
                }
                let client = r.client.clone();
                let name = r.names[channel].clone();
                let payload = Bytes::copy_from_slice(payload);
                r.in_flight.push_back(Box::pin(async move {
                    client.publish::<i64, _, _>(name, payload).await
                }));
                // Poll now, so the command is handed to the connection at once.
                reap(&mut r.in_flight)
            }
            Kind::Ws(conns) => {
                // This lane's channels are lane, lane + stride, …: in `conns` in that order.
                let conn = conns
                    .get_mut(channel / self.stride)
                    .filter(|c| c.channel == channel)
                    .ok_or(PublishError::NoConnection(channel))?;
                if let Some(window) = &conn.window {
                    take_permit(window, &mut conn.write, &mut conn.out).await?;
                    window.sent();
                }
                wire::client_frame(&mut conn.out, wire::OP_BINARY, payload);
                if conn.out.len() >= WRITE_BATCH {
                    write_out(&mut conn.write, &mut conn.out).await?;
                }
                Ok(())
            }
            Kind::Http(h) => {
                take_permit(&h.window, &mut h.write, &mut h.out).await?;
                h.window.sent();
                wire::http_post(&mut h.out, &h.targets[channel], payload);
                if h.out.len() >= WRITE_BATCH {
                    write_out(&mut h.write, &mut h.out).await?;
                }
                Ok(())
            }
        }
    }

    /// Write whatever is gathered (and hand queued PUBLISHes on).
    async fn flush(&mut self) -> Result<(), PublishError> {
        match &mut self.kind {
            Kind::Redis(r) => reap(&mut r.in_flight),
            Kind::Ws(conns) => {
                for conn in conns {
                    write_out(&mut conn.write, &mut conn.out).await?;
                }
                Ok(())
            }
            Kind::Http(h) => write_out(&mut h.write, &mut h.out).await,
        }
    }

    /// Flush, then wait until every PUBLISH, request or acked message was answered, or `until`.
    async fn finish(&mut self, until: Instant) -> Result<(), PublishError> {
        self.flush().await?;
        match &mut self.kind {
            Kind::Redis(r) => {
                let all = async {
                    while let Some(result) = r.in_flight.next().await {
                        result?;
                    }
                    Ok::<(), PublishError>(())
                };
                tokio::time::timeout_at(until, all)
                    .await
                    .map_err(|_| PublishError::PublishesUnanswered)?
            }
            Kind::Ws(conns) => {
                for conn in conns.iter() {
                    if let Some(window) = &conn.window {
                        if !window.drained(until).await {
                            return Err(PublishError::AcksMissing);
                        }
                    }
                }
                Ok(())
            }
            Kind::Http(h) => {
                if h.window.drained(until).await {
                    Ok(())
                } else {
                    Err(PublishError::ResponsesMissing)
                }
            }
        }
    }

    /// Close the connections politely (ws: a close frame).
    pub async fn close(mut self) {
        if let Kind::Ws(conns) = &mut self.kind {
            for conn in conns {
                wire::client_frame(&mut conn.out, wire::OP_CLOSE, &1000u16.to_be_bytes());
                let _ = write_out(&mut conn.write, &mut conn.out).await;
            }
        }
        if let Kind::Redis(r) = &self.kind {
            let _ = r.client.quit().await;
        }
    }
}

/// Take completed PUBLISHes off the front without waiting (and poll new ones once).
fn reap(in_flight: &mut FuturesOrdered<PublishFuture>) -> Result<(), PublishError> {
    while let Some(Some(result)) = in_flight.next().now_or_never() {
        result?;
    }
    Ok(())
}

/// Take a window permit; when none is free, write what is gathered first (the answers we
/// wait for may depend on it).
async fn take_permit(
    window: &Window,
    write: &mut OwnedWriteHalf,
    out: &mut Vec<u8>,
) -> Result<(), PublishError> {
    if let Ok(permit) = window.permits.try_acquire() {
        permit.forget();
        return Ok(());
    }
    write_out(write, out).await?;
    window
        .permits
        .acquire()
        .await
        .map_err(|_| PublishError::WindowClosed)?
        .forget();
    Ok(())
}

async fn write_out(write: &mut OwnedWriteHalf, out: &mut Vec<u8>) -> Result<(), PublishError> {
    if !out.is_empty() {
        write.write_all(out).await.map_err(PublishError::Write)?;
        out.clear();
    }
    Ok(())
}

/// How a lane paces itself.
pub struct Pace {
    /// Messages per second over all lanes; 0: as fast as windows allow.
    pub rate: f64,
    pub total_channels: usize,
    /// Subscribers per channel (0: nobody listens, no window).
    pub subscribers: u64,
    /// Messages in flight per subscriber of a channel, on average (deliveries still to come
    /// over subscribers).
    pub window: u64,
    pub size: usize,
    /// How each message carries its sequence number and send time.
    pub layout: Layout,
    /// Stop sending at this instant, or after `count` messages in all lanes.
    pub stop: Instant,
    pub count: u64,
    /// Answers (acks, responses, replies) are awaited until this instant at the latest.
    pub until: Instant,
}

/// Send probes (sequence number [`PROBE`]) on every channel of every lane.
pub async fn probe(lanes: &mut [Lane], size: usize, layout: Layout) -> Result<(), PublishError> {
    let mut payload = vec![b'p'; size];
    layout.stamp(&mut payload, PROBE);
    for lane in lanes.iter_mut() {
        for i in 0..lane.channels.len() {
            let c = lane.channels[i];
            lane.send(c, &payload).await?;
        }
        lane.flush().await?;
    }
    Ok(())
}

/// Run one lane until `pace.stop` or its share of `pace.count`; returns messages sent.
pub async fn run(
    mut lane: Lane,
    pace: Arc<Pace>,
    shared: Arc<Shared>,
) -> Result<Lane, PublishError> {
    if lane.channels.is_empty() {
        return Ok(lane);
    }
    let mut payload = vec![b'x'; pace.size];
    let share = lane.channels.len() as f64 / pace.total_channels as f64;
    let count = ((pace.count as f64 * share).ceil() as u64).max(1);
    let start = Instant::now();
    let interval = (pace.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / (pace.rate * share)));
    let mut cursor = 0usize;
    let mut sent = 0u64;
    let wake = &shared.lanes[lane.lane];
    while sent < count {
        let now = Instant::now();
        if now >= pace.stop {
            break;
        }
        let channel = if let Some(interval) = interval {
            let due = start + interval.mul_f64(sent as f64);
            if due > now {
                lane.flush().await?;
                tokio::time::sleep_until(due.min(pace.stop)).await;
                continue;
            }
            let c = lane.channels[cursor % lane.channels.len()];
            cursor += 1;
            c
        } else {
            match next_with_room(&lane.channels, &mut cursor, &pace, &shared) {
                Some(c) => c,
                None => {
                    lane.flush().await?;
                    let notified = wake.notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    wake.waiting.store(true, Ordering::SeqCst);
                    if next_with_room(&lane.channels, &mut cursor.clone(), &pace, &shared).is_none()
                    {
                        let nap = (now + Duration::from_millis(5)).min(pace.stop);
                        tokio::select! {
                            () = &mut notified => {}
                            () = tokio::time::sleep_until(nap) => {}
                        }
                    }
                    wake.waiting.store(false, Ordering::Relaxed);
                    continue;
                }
            }
        };
        let counter = &shared.channels[channel].sent;
        pace.layout
            .stamp(&mut payload, counter.load(Ordering::Relaxed));
        lane.send(channel, &payload).await?;
        counter.fetch_add(1, Ordering::Relaxed);
        sent += 1;
        if interval.is_some() {
            lane.flush().await?;
        }
    }
    lane.finish(pace.until).await?;
    Ok(lane)
}

/// No subscriber of a channel may be this many windows behind its publisher: the window is
/// an average, and one subscriber the generator starves of CPU must not fall behind without
/// limit while the others keep up (a relay's slow-consumer rule would close it for the
/// generator's doing: 256 KiB frames, 128 behind, are 32 MiB).
const LAG_BOUND: u64 = 4;

/// The next channel (round robin from `cursor`) whose window has room and none of whose
/// subscribers is [`LAG_BOUND`] windows behind.
fn next_with_room(
    channels: &[usize],
    cursor: &mut usize,
    pace: &Pace,
    shared: &Shared,
) -> Option<usize> {
    if pace.subscribers == 0 {
        if !shared.gate_open() {
            return None;
        }
        let c = channels[*cursor % channels.len()];
        *cursor += 1;
        return Some(c);
    }
    for _ in 0..channels.len() {
        let c = channels[*cursor % channels.len()];
        *cursor += 1;
        let counts = &shared.channels[c];
        let sent = counts.sent.load(Ordering::Relaxed);
        let in_flight =
            (sent * pace.subscribers).saturating_sub(counts.delivered.load(Ordering::Relaxed));
        if in_flight < pace.window * pace.subscribers
            && !counts.lagging(sent, LAG_BOUND * pace.window)
        {
            return Some(c);
        }
    }
    None
}
