//! The subscribing side of a run: many WebSocket connections, each read by a lean task.
//!
//! Owns: opening `N` subscriber connections in batches of bounded concurrency (connection `i`
//! listens to channel `i % channels`, on subscribe server `(i / channels) % servers`), and each connection's receive loop: one reusable read
//! buffer, the streaming [`FrameReader`] (keeping a `format=json` envelope's head when the
//! plan's layout is [`Layout::Envelope`]), pongs for pings, and one flush of counts and
//! latencies per read into [`Shared`]. No allocation per message. Over `wss://` (a plan with
//! [`Plan::tls`]) the same loop runs on a TLS stream: the loop is generic over the stream, so
//! a ws:// connection's task is what it was, a bare `TcpStream` with no indirection.
//! Must not: publish, or decide when a run ends (the run aborts these tasks).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::stats::{now_ns, Batch, ConnectionFailure, Layout, Order, Shared};
use super::wire::{self, Event, FrameReader, Target, WireError, WsConn};

/// Why a subscriber connection ended before the run did.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error("the connection ended")]
    Eof,
    #[error("{0}")]
    Protocol(WireError),
    #[error("closed by the server ({})", .0.map_or("no code".to_string(), |c| c.to_string()))]
    Closed(Option<u16>),
    #[error("the connection broke")]
    Broke,
}

/// The open subscriber connections; dropping this closes them all.
pub struct Subscribers {
    tasks: Vec<JoinHandle<()>>,
}

impl Subscribers {
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What to open.
pub struct Plan<'a> {
    /// The subscribe URL, `{i}` standing for the channel number.
    pub target: &'a Target,
    /// More subscribe servers: a channel's subscribers are dealt in turn to `target` and these.
    pub also: &'a [Target],
    pub channels: usize,
    pub connections: usize,
    /// Connections being opened at once.
    pub concurrency: usize,
    /// Read buffer per connection.
    pub buffer: usize,
    /// The receive loops end by themselves at this instant at the latest.
    pub until: Instant,
    /// Sent as `Authorization: Bearer` on every handshake.
    pub token: Option<&'a str>,
    /// Where each message's sequence number and send time are found.
    pub layout: Layout,
    /// For `wss://` targets: the TLS client (`--ca`). `None`: every target is `ws://`.
    pub tls: Option<&'a TlsConnector>,
}

/// A connection just opened, plain or over TLS (boxed: a TLS stream is over a kilobyte, and
/// the plain variant stays small).
enum Opened {
    Plain(WsConn),
    Tls(Box<WsConn<TlsStream<TcpStream>>>),
}

/// Open every connection, `concurrency` at a time; the first failure fails the run.
pub async fn open(plan: Plan<'_>, shared: &Arc<Shared>) -> Result<Subscribers, WireError> {
    let servers: Vec<Vec<Target>> = std::iter::once(plan.target)
        .chain(plan.also)
        .map(|server| (0..plan.channels).map(|c| server.for_channel(c)).collect())
        .collect();
    let mut subscribers = Subscribers {
        tasks: Vec::with_capacity(plan.connections),
    };
    let mut opening = stream::iter(0..plan.connections)
        .map(|i| {
            let target = &servers[(i / plan.channels) % servers.len()][i % plan.channels];
            let ask = wire::Ask {
                protocol: None,
                token: plan.token,
            };
            let tls = plan.tls.filter(|_| target.scheme == "wss");
            async move {
                let opened = match tls {
                    Some(tls) => wire::wss_connect(target, i, ask, tls)
                        .await
                        .map(|conn| Opened::Tls(Box::new(conn))),
                    None => wire::ws_connect(target, i, ask).await.map(Opened::Plain),
                };
                (i, opened)
            }
        })
        .buffer_unordered(plan.concurrency.max(1));
    while let Some((i, connected)) = opening.next().await {
        let opened = connected?;
        let order = Order::with_layout(i % plan.channels, i, plan.layout);
        let shared = Arc::clone(shared);
        let (buffer, until) = (plan.buffer, plan.until);
        let keep = match plan.layout {
            Layout::Binary => wire::PREFIX,
            Layout::Envelope => wire::ENVELOPE_PREFIX,
        };
        subscribers.tasks.push(match opened {
            Opened::Plain(conn) => tokio::spawn(async move {
                let _ = tokio::time::timeout_at(until, receive(conn, order, keep, buffer, &shared))
                    .await;
            }),
            Opened::Tls(conn) => tokio::spawn(async move {
                let _ =
                    tokio::time::timeout_at(until, receive(*conn, order, keep, buffer, &shared))
                        .await;
            }),
        });
    }
    Ok(subscribers)
}

/// One connection's receive loop, until the server closes it or the run aborts it.
async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: WsConn<S>,
    mut order: Order,
    keep: usize,
    buffer: usize,
    shared: &Shared,
) {
    let WsConn {
        mut stream,
        leftover,
        ..
    } = conn;
    let mut reader = FrameReader::keeping(keep);
    let mut batch = Batch::default();
    let mut buf = vec![0u8; buffer.max(64)];
    let mut reply = Vec::new();
    let mut pending = leftover;
    loop {
        let data: &[u8] = if pending.is_empty() {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    ended(shared, order.channel, Ended::Eof);
                    return;
                }
                Ok(n) => &buf[..n],
            }
        } else {
            &pending
        };
        let now = now_ns();
        let mut closed = None;
        let fed = reader.feed(data, &mut |event| match event {
            Event::Message { prefix, .. } => order.on_message(prefix, now, &mut batch, shared),
            Event::Ping(payload) => wire::client_frame(&mut reply, wire::OP_PONG, payload),
            Event::Close(code) => closed = Some(code),
        });
        pending = Vec::new();
        order.flush(&mut batch, shared);
        if let Err(e) = fed {
            ended(shared, order.channel, Ended::Protocol(e));
            return;
        }
        if let Some(code) = closed {
            wire::client_frame(
                &mut reply,
                wire::OP_CLOSE,
                &code.unwrap_or(1000).to_be_bytes(),
            );
            let _ = stream.write_all(&reply).await;
            let _ = stream.flush().await;
            ended(shared, order.channel, Ended::Closed(code));
            return;
        }
        if !reply.is_empty() {
            // flush: a no-op on TCP; TLS may hold the record until flushed.
            if stream.write_all(&reply).await.is_err() || stream.flush().await.is_err() {
                ended(shared, order.channel, Ended::Broke);
                return;
            }
            reply.clear();
        }
    }
}

fn ended(shared: &Shared, channel: usize, why: Ended) {
    shared.ended.fetch_add(1, Ordering::Relaxed);
    shared.error(ConnectionFailure::Subscriber { channel, why });
}
