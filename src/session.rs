//! One WebSocket client's life, on either server: read, write, keep alive, close (SPEC §3–5).
//!
//! Owns: the connection's single task. It reads frames (publishing them through a
//! [`PublishWindow`] or discarding them), writes what its [`Outbox`] holds (several queued
//! frames per write, then one flush), pings every `--ping-interval`, closes a peer silent for
//! `--idle-timeout`, and ends with the close code that says why (see [`Ending`]).
//! Must not: touch Redis subscriptions or other clients; it only sees its own outbox and
//! window, so one slow or broken client cannot slow anyone else.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::publish::{PublishError, PublishWindow};

/// How a session ended, and so which close frame (if any) the client gets.
#[derive(Debug)]
pub enum Ending {
    /// The client closed (or its close frame was answered by tungstenite).
    ClientClosed,
    /// The TCP connection broke; nothing can be sent.
    Broken,
    /// Server shutdown: 1001 `going away`, after pending acks.
    GoingAway,
    /// Its outbox overflowed under `--slow-consumer close`: 1008 `slow consumer`.
    SlowConsumer,
    /// Silent past `--idle-timeout`: 1001 `idle timeout`.
    IdleTimeout,
    /// A message over `--max-message-bytes`: 1009.
    TooBig(usize),
    /// Redis did not accept a publish in time: 1013 (try again later).
    RedisUnavailable(PublishError),
    /// Broken framing: 1002; invalid UTF-8 in a text frame: 1007.
    Protocol(CloseCode, String),
}

impl Ending {
    /// The metric label for `lightrelay_closed_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            Ending::ClientClosed => "client",
            Ending::Broken => "broken",
            Ending::GoingAway => "going_away",
            Ending::SlowConsumer => "slow_consumer",
            Ending::IdleTimeout => "idle_timeout",
            Ending::TooBig(_) => "too_big",
            Ending::RedisUnavailable(_) => "redis_unavailable",
            Ending::Protocol(..) => "protocol_error",
        }
    }

    fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Ending::ClientClosed | Ending::Broken => return None,
            Ending::GoingAway => (CloseCode::Away, "going away".to_string()),
            Ending::SlowConsumer => (CloseCode::Policy, "slow consumer".to_string()),
            Ending::IdleTimeout => (CloseCode::Away, "idle timeout".to_string()),
            Ending::TooBig(max) => (
                CloseCode::Size,
                format!("message too big (limit {max} bytes)"),
            ),
            Ending::RedisUnavailable(e) => (CloseCode::Again, e.to_string()),
            Ending::Protocol(code, reason) => (*code, reason.clone()),
        };
        Some(CloseFrame {
            code,
            reason: truncate_reason(reason).into(),
        })
    }
}

/// A close reason must fit the 125-byte control frame with its 2-byte code.
fn truncate_reason(mut reason: String) -> String {
    if reason.len() > 123 {
        let mut end = 123;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// The per-connection settings a session needs.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// How long closing (sending the close frame, waiting for the answer) may take.
    pub close_timeout: Duration,
    pub max_message_bytes: usize,
    /// The client asked for `lightrelay.ack`: one text frame with the receiver count per
    /// message, once Redis accepted it.
    pub ack: bool,
}

/// What a session does with the data frames its client sends.
pub enum Inbound {
    /// Read and discard (subscribers without `--accept-publish`).
    Discard,
    /// Publish on the client's channel.
    Publish(PublishWindow),
}

/// Run one client's connection to its end and say how it ended.
pub async fn run<S>(
    ws: WebSocketStream<S>,
    outbox: Arc<Outbox>,
    mut inbound: Inbound,
    settings: SessionSettings,
    shutdown: CancellationToken,
    metrics: Metrics,
) -> Ending
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let mut last_heard = Instant::now();
    let idle = sleep_until(last_heard + settings.idle_timeout);
    tokio::pin!(idle);
    let mut draining = false;

    let ending = {
        let writer = write_outbox(&mut sink, &outbox, settings.ping_interval, &metrics);
        tokio::pin!(writer);
        loop {
            let window = match &mut inbound {
                Inbound::Publish(w) => Some(w),
                Inbound::Discard => None,
            };
            let in_flight = window.as_ref().is_some_and(|w| !w.is_empty());
            let can_read = !draining && !window.as_ref().is_some_and(|w| w.is_full());
            if draining && !in_flight {
                break Ending::GoingAway;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if !draining => draining = true,
                () = outbox.overflowed() => break Ending::SlowConsumer,
                ending = &mut writer => break ending,
                done = next_ack(window), if in_flight => match done {
                    Ok(receivers) => {
                        if settings.ack {
                            outbox.push(Message::text(receivers.to_string()));
                        }
                    }
                    Err(e) => break Ending::RedisUnavailable(e),
                },
                frame = stream.next(), if can_read => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(Message::Text(text))) => accept(&mut inbound, Bytes::from(text)),
                        Some(Ok(Message::Binary(data))) => accept(&mut inbound, data),
                        Some(Ok(Message::Close(_))) | None => break Ending::ClientClosed,
                        Some(Ok(_)) => {} // ping (answered by tungstenite), pong, raw frame
                        Some(Err(e)) => break ending_of(e, settings.max_message_bytes),
                    }
                }
                () = &mut idle => {
                    // Re-armed lazily: one timer update per idle period, not one per frame.
                    let deadline = last_heard + settings.idle_timeout;
                    if deadline <= Instant::now() {
                        break Ending::IdleTimeout;
                    }
                    idle.as_mut().reset(deadline);
                }
            }
        }
    };

    // Closing. Pending acks go out before a graceful close; a slow consumer's backlog does not.
    let close = async {
        if matches!(ending, Ending::GoingAway | Ending::RedisUnavailable(_)) {
            let mut rest = VecDeque::new();
            outbox.take_now(&mut rest);
            for frame in rest {
                sink.feed(frame).await?;
            }
        }
        if let Some(frame) = ending.close_frame() {
            sink.send(Message::Close(Some(frame))).await?;
            // Wait for the client's answering close frame so the TCP close is clean.
            while let Some(Ok(frame)) = stream.next().await {
                if matches!(frame, Message::Close(_)) {
                    break;
                }
            }
        } else {
            sink.flush().await?;
        }
        Ok::<(), tungstenite::Error>(())
    };
    let _ = tokio::time::timeout(settings.close_timeout, close).await;
    ending
}

fn accept(inbound: &mut Inbound, payload: Bytes) {
    match inbound {
        Inbound::Discard => {}
        Inbound::Publish(window) => window.push(payload),
    }
}

async fn next_ack(window: Option<&mut PublishWindow>) -> Result<i64, PublishError> {
    match window {
        Some(window) => window.next().await,
        None => std::future::pending().await,
    }
}

fn ending_of(error: tungstenite::Error, max_message_bytes: usize) -> Ending {
    use tungstenite::error::{CapacityError, Error as E};
    match error {
        E::Capacity(CapacityError::MessageTooLong { .. }) => Ending::TooBig(max_message_bytes),
        E::Capacity(e) => Ending::Protocol(CloseCode::Size, e.to_string()),
        E::Protocol(e) => Ending::Protocol(CloseCode::Protocol, e.to_string()),
        E::Utf8(_) => Ending::Protocol(CloseCode::Invalid, "text frame is not valid UTF-8".into()),
        _ => Ending::Broken,
    }
}

/// Write what the outbox holds, several frames per write, and ping on schedule.
/// Returns only when the connection is broken.
async fn write_outbox<S>(
    sink: &mut futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    outbox: &Outbox,
    ping_interval: Duration,
    metrics: &Metrics,
) -> Ending
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut batch = VecDeque::new();
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let sent = tokio::select! {
            () = outbox.take(&mut batch) => {
                let (frames, bytes) = (batch.len() as u64, batch.iter().map(|f| f.len() as u64).sum::<u64>());
                // feed() only encodes into tungstenite's write buffer (flushed when it passes
                // WRITE_BUFFER bytes); one flush at the end sends the whole batch.
                let result = async {
                    for frame in batch.drain(..) {
                        sink.feed(frame).await?;
                    }
                    sink.flush().await
                }
                .await;
                metrics.ws_out.add(frames, bytes);
                result
            }
            _ = ping.tick() => sink.send(Message::Ping(Bytes::new())).await,
        };
        if sent.is_err() {
            batch.clear();
            return Ending::Broken;
        }
    }
}
