//! The publish path: client messages → Redis PUBLISH, pipelined and in order (SPEC §3).
//!
//! Owns: the [`Publisher`] (a small pool of fred clients, each pipelining many PUBLISHes on
//! one connection) and the [`PublishWindow`] of one client: at most `--publish-window`
//! PUBLISHes in flight, completed in order, each older than `--redis-timeout` failing the
//! window. A full window is how back-pressure reaches TCP: the session stops reading.
//! Must not: drop a message silently. A message either gets Redis's receiver count or its
//! client is closed (1013) and the loss is counted.
//! Room left: a stream write (SPEC §9 history) goes where `publish_one` builds the command;
//! an auth check sits before a window is created, in the HTTP layer.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fred::bytes_utils::Str;
use fred::clients::{Client, Pool};
use fred::interfaces::PubsubInterface;
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::time::Instant;

use crate::channel::ChannelName;
use crate::metrics::{DropReason, Metrics};

/// Why publishing failed; the text is the reason of the 1013 close or the 503 body.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("redis unavailable for {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Redis(#[from] fred::error::Error),
}

/// The process's PUBLISH connections.
#[derive(Clone)]
pub struct Publisher {
    pool: Pool,
}

impl Publisher {
    pub fn new(pool: Pool) -> Self {
        Publisher { pool }
    }

    /// The connection one client keeps for its whole life: its messages stay in order
    /// because they all travel, pipelined, on this one connection.
    pub fn client(&self) -> Client {
        self.pool.next().clone()
    }

    pub fn clients(&self) -> &[Client] {
        self.pool.clients()
    }
}

/// One PUBLISH; its future resolves to the number of receivers.
fn publish_one(client: &Client, channel: &Str, payload: Bytes) -> PublishFuture {
    let client = client.clone();
    let channel = channel.clone();
    Box::pin(async move { client.publish::<i64, _, _>(channel, payload).await })
}

type PublishFuture = Pin<Box<dyn Future<Output = Result<i64, fred::error::Error>> + Send>>;

/// One client's PUBLISHes in flight, answered in the order they were sent.
pub struct PublishWindow {
    client: Client,
    /// fred names channels with UTF-8 strings; ours always are (a UTF-8 prefix + ASCII path).
    channel: Str,
    in_flight: FuturesOrdered<PublishFuture>,
    started: VecDeque<(Instant, u64)>,
    capacity: usize,
    timeout: Duration,
    metrics: Metrics,
}

impl PublishWindow {
    pub fn new(
        publisher: &Publisher,
        channel: ChannelName,
        capacity: usize,
        timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        PublishWindow {
            client: publisher.client(),
            channel: Str::from(channel.to_string()),
            in_flight: FuturesOrdered::new(),
            started: VecDeque::new(),
            capacity,
            timeout,
            metrics,
        }
    }

    pub fn is_full(&self) -> bool {
        self.in_flight.len() >= self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Start publishing one message. The caller checks `is_full` first.
    pub fn push(&mut self, payload: Bytes) {
        self.metrics.ws_in.add(1, payload.len() as u64);
        self.started
            .push_back((Instant::now(), payload.len() as u64));
        self.in_flight
            .push_back(publish_one(&self.client, &self.channel, payload));
    }

    /// The receiver count of the oldest message in flight, once Redis accepted it; `Pending`
    /// while it is not (or nothing is in flight). `--redis-timeout` is the caller's to watch,
    /// through [`Self::deadline`].
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<i64, PublishError>> {
        match self.in_flight.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(receivers))) => {
                if let Some((started, len)) = self.started.pop_front() {
                    self.metrics
                        .publish_latency
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.redis_out.add(1, len);
                }
                Poll::Ready(Ok(receivers))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(self.fail(e.into()))),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    /// When the oldest message in flight has waited `--redis-timeout`.
    pub fn deadline(&self) -> Option<Instant> {
        self.started
            .front()
            .map(|(started, _)| *started + self.timeout)
    }

    /// Give up on the window: Redis did not answer within `--redis-timeout`.
    pub fn time_out(&mut self) -> PublishError {
        self.fail(PublishError::Timeout(self.timeout))
    }

    /// Wait for the next completion, or the timeout. Cancel-safe.
    pub async fn next(&mut self) -> Result<i64, PublishError> {
        let Some(deadline) = self.deadline() else {
            return std::future::pending().await;
        };
        match tokio::time::timeout_at(deadline, std::future::poll_fn(|cx| self.poll_next(cx))).await
        {
            Ok(result) => result,
            Err(_) => Err(self.time_out()),
        }
    }

    fn fail(&mut self, error: PublishError) -> PublishError {
        // The window is abandoned: whatever is still in flight may or may not reach Redis,
        // and its client will not get an ack for it (an ack-mode client resends it).
        self.metrics
            .dropped(DropReason::PublishFailed, self.in_flight.len() as u64);
        self.in_flight = FuturesOrdered::new();
        self.started.clear();
        error
    }
}

/// Publish one message outside any WebSocket (HTTP POST), within `timeout`.
pub async fn publish_once(
    publisher: &Publisher,
    channel: &ChannelName,
    payload: Bytes,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<i64, PublishError> {
    let mut window = PublishWindow::new(publisher, channel.clone(), 1, timeout, metrics.clone());
    window.push(payload);
    window.next().await
}
