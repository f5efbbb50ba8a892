//! What one server process shares between its connections, and the role that makes it a
//! publish or a subscribe server.
//!
//! Owns: [`Relay`] (the role, the shared flags, metrics, the task tracker, the shutdown token
//! and the `--max-connections` count) and the [`Role`] trait: the few things the two servers
//! do differently (what a connection does once upgraded, whether `POST` publishes, which
//! Redis connections `/healthz` covers, the live page).
//! Must not: know what a role does with Redis; the role owns its connections.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::channel::ChannelName;
use super::config::CommonArgs;
use super::frames::Watched;
use super::http::Reply;
use super::metrics::Metrics;
use super::session::Ending;
use super::socket::Socket;

/// What one of the two servers does differently from the other.
pub(crate) trait Role: Send + Sync + Sized + 'static {
    /// `publish` or `subscribe`, for logs.
    const NAME: &'static str;
    /// tungstenite's read buffer for a connection of this role (see `http::ws_config`).
    const READ_BUFFER: usize;

    /// Whether `POST /PATH` publishes (and so whether `lightrelay.ack` is offered).
    fn publishes(&self) -> bool;

    /// Publish one `POST` body; the receiver count, or why Redis did not take it.
    fn publish_once(
        relay: &Relay<Self>,
        channel: ChannelName,
        body: Bytes,
    ) -> impl Future<Output = Result<i64, String>> + Send;

    /// A plain `GET` this role answers itself (the live page), if `path` is one.
    fn page(&self, _path: &str) -> Option<Reply> {
        None
    }

    /// `Ok` while every Redis connection this role depends on answers, else why not.
    fn health(&self) -> Result<(), String>;

    /// Fill the gauges that are computed at scrape time.
    fn before_scrape(&self, _metrics: &Metrics) {}

    /// Run one upgraded connection to its end.
    fn serve(
        relay: Arc<Relay<Self>>,
        connection: Upgraded,
    ) -> impl Future<Output = Ending> + Send + 'static;
}

/// A connection just upgraded to WebSocket, with what the request asked for.
pub(crate) struct Upgraded {
    pub ws: WebSocketStream<Watched<Socket>>,
    pub socket: Socket,
    pub channel: ChannelName,
    /// The client asked for, and was given, `lightrelay.ack`.
    pub ack: bool,
}

/// Everything the connections of one server process share.
pub(crate) struct Relay<R> {
    pub role: R,
    pub common: CommonArgs,
    pub metrics: Metrics,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    connections: AtomicUsize,
}

/// A connection's place under `--max-connections`; freed when dropped.
pub(crate) struct ConnectionSlot<R>(Arc<Relay<R>>);

impl<R> Drop for ConnectionSlot<R> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connections.dec();
    }
}

impl<R: Role> Relay<R> {
    pub fn new(
        role: R,
        common: CommonArgs,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Relay {
            role,
            common,
            metrics,
            tracker: TaskTracker::new(),
            shutdown,
            connections: AtomicUsize::new(0),
        })
    }

    /// Take a connection slot, or `None` when `--max-connections` are open.
    pub fn admit(self: &Arc<Self>) -> Option<ConnectionSlot<R>> {
        let max = self.common.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.connections.inc();
        Some(ConnectionSlot(self.clone()))
    }

    pub fn render_metrics(&self) -> String {
        self.role.before_scrape(&self.metrics);
        self.metrics.render()
    }

    /// Run an upgraded connection to its end, then count how it ended and free its slot.
    pub fn serve(
        self: &Arc<Self>,
        connection: Upgraded,
        slot: ConnectionSlot<R>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let channel = connection.channel.clone();
        let session = R::serve(self.clone(), connection);
        let metrics = self.metrics.clone();
        async move {
            let ending = session.await;
            metrics.closed(ending.label());
            tracing::debug!(channel = %channel, ending = ?ending, "connection closed");
            drop(slot);
        }
    }
}
