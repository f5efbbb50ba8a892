//! What one server process shares between its connections, and the role that makes it a
//! publish or a subscribe server.
//!
//! Owns: [`Relay`] (the role, the shared flags, metrics, the task tracker, the shutdown token,
//! the `--max-connections` count, the budget of POST body bytes held at once, the abuse
//! [`Limits`] and the instance's presence handle) and the
//! [`Role`] trait: the few things the two servers do differently (what a connection does once
//! upgraded, whether `POST` publishes, which Redis connections `/healthz` covers, the live
//! page, what `/status.json` shows of it) and the status page's samples ([`Status`]). A [`ConnectionSlot`] is taken per accepted TCP connection (by `listener`) and lives
//! as long as the connection, its WebSocket session included.
//! Must not: know what a role does with Redis; the role owns its connections.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::channel::ChannelName;
use super::config::CommonArgs;
use super::frames::Watched;
use super::http::Reply;
use super::limits::Limits;
use super::metrics::{Exposition, Metrics};
use super::read_ahead::ReadAhead;
use super::session::Ending;
use super::status::{RoleStatus, Status};
use super::write::socket::Socket;
use crate::auth::{Auth, Grant};
use crate::presence::heartbeat::Presence;

/// What one of the two servers does differently from the other.
pub(crate) trait Role: Send + Sync + Sized + 'static {
    /// `publish` or `subscribe`, for logs.
    const NAME: &'static str;
    /// What a WebSocket connection to this server asks of a token (SPEC §8).
    const GRANT: Grant;
    /// Whether `POST /PATH` publishes (and so whether `lightrelay.ack` is offered).
    fn publishes(&self) -> bool;

    /// Publish one `POST` body; the receiver count, or why Redis did not take it.
    fn publish_once(
        relay: &Relay<Self>,
        channel: ChannelName,
        body: Bytes,
    ) -> impl Future<Output = Result<i64, String>> + Send;

    /// Whether `POST /down/PATH` sends a downlink (SPEC §10): only the subscribe server's,
    /// which never publishes a POST itself; on the publish server it is a plain publish.
    fn sends_downlink(&self) -> bool {
        false
    }

    /// Publish `body` on `channel` (`PREFIX + PATH + --downlink-suffix`) for the devices on
    /// `path`, and answer the request: `200` with the counts, `404`, or `503`.
    fn downlink(
        _relay: &Relay<Self>,
        _path: &str,
        _channel: ChannelName,
        _body: Bytes,
    ) -> impl Future<Output = Reply> + Send {
        std::future::ready(super::http::refusal(
            hyper::StatusCode::NOT_FOUND,
            "this server sends no downlink\n",
        ))
    }

    /// A plain `GET` this role answers itself (the live page), if `path` is one.
    fn page(&self, _path: &str) -> Option<Reply> {
        None
    }

    /// `Ok` while every Redis connection this role depends on answers, else why not.
    fn health(&self) -> Result<(), String>;

    /// The connection presence (SPEC §10) is written and read on, when `--presence-interval`
    /// is not 0.
    fn presence_client(&self) -> Option<fred::clients::Client>;

    /// Fill the gauges that are computed at scrape time.
    fn before_scrape(&self, _metrics: &Metrics) {}

    /// What `/status.json` shows of this role: its channels with their message counts, its
    /// Redis connections, and a connection the fleet can be read on.
    fn status(&self) -> RoleStatus;

    /// What a connection on a channel needs before its 101 (see [`Role::prepare`]).
    type Prepared: Send + 'static;

    /// Get ready for a connection on `channel`, before its 101: the subscribe side reads what
    /// the query asks (`format`, `last`, `since`), joins the hub and waits (bounded) until
    /// Redis confirmed the subscription, so that what is published after the 101 reaches the
    /// client. `Err` is the one-line reason of a 400.
    fn prepare(
        relay: &Arc<Relay<Self>>,
        channel: &ChannelName,
        query: Option<&str>,
    ) -> impl Future<Output = Result<Self::Prepared, String>> + Send;

    /// Run one upgraded connection to its end.
    fn serve(
        relay: Arc<Relay<Self>>,
        connection: Upgraded,
        prepared: Self::Prepared,
    ) -> impl Future<Output = Ending> + Send + 'static;
}

/// A connection just upgraded to WebSocket, with what the request asked for.
pub(crate) struct Upgraded {
    pub ws: WebSocketStream<Watched<ReadAhead<Socket>>>,
    pub socket: Socket,
    pub channel: ChannelName,
    /// The client asked for, and was given, `lightrelay.ack`.
    pub ack: bool,
    /// When its token expires (the session closes it then with 1008).
    pub expires: Option<tokio::time::Instant>,
    /// Whether what it sends may be published, as far as tokens go (a subscriber on a server
    /// with `--accept-publish` and `--auth` needs a `pub` grant on its path).
    pub may_publish: bool,
}

/// Everything the connections of one server process share.
pub(crate) struct Relay<R> {
    pub role: R,
    pub common: CommonArgs,
    /// The token checks (`--auth`), asked before every upgrade and publishing POST.
    pub auth: Auth,
    pub metrics: Metrics,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    /// POST body bytes that requests may hold at once, all connections together: a permit per
    /// byte, taken before a body is read (see [`post_body_budget`]).
    pub post_budget: Semaphore,
    /// SPEC §8's abuse limits: origins, connections per address, publish rates.
    pub limits: Limits,
    /// The status page's side: start time, listen address, the rates' samples.
    pub status: Status,
    /// This instance's presence (SPEC §10): the tracker publish connections mark, and the
    /// handle `GET /presence` reads with. `None` with `--presence-interval 0`.
    pub presence: Option<Arc<Presence>>,
    connections: AtomicUsize,
}

/// The POST body budget for a `--max-message-bytes`: 64 MiB, or eight largest bodies when
/// that is more, so a few clients sending large bodies at once cannot take the memory of
/// the process while a modest server still takes several at a time.
pub(crate) fn post_body_budget(max_message_bytes: usize) -> usize {
    (64 << 20).max(max_message_bytes.saturating_mul(8))
}

/// A TCP connection's place under `--max-connections`; freed when dropped. Shared (`Arc`)
/// between hyper's connection and the WebSocket session that outlives it.
pub(crate) struct ConnectionSlot<R>(Arc<Relay<R>>);

impl<R> Drop for ConnectionSlot<R> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<R: Role> Relay<R> {
    pub fn new(
        role: R,
        common: CommonArgs,
        auth: Auth,
        metrics: Metrics,
        shutdown: CancellationToken,
        listen: SocketAddr,
        presence: Option<Arc<Presence>>,
    ) -> Arc<Self> {
        let common_max_message_bytes = common.max_message_bytes;
        let limits = Limits::new(&common.limits, metrics.clone());
        metrics
            .max_connections
            .set(i64::try_from(common.max_connections).unwrap_or(i64::MAX));
        Arc::new(Relay {
            role,
            common,
            auth,
            metrics,
            tracker: TaskTracker::new(),
            shutdown,
            post_budget: Semaphore::new(post_body_budget(common_max_message_bytes)),
            limits,
            status: Status::new(listen),
            presence,
            connections: AtomicUsize::new(0),
        })
    }

    /// Take a slot for an accepted TCP connection, or `None` when `--max-connections` are open.
    pub fn admit(self: &Arc<Self>) -> Option<ConnectionSlot<R>> {
        let max = self.common.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConnectionSlot(self.clone()))
    }

    /// TCP connections open now (WebSocket sessions and plain requests alike).
    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn render_metrics(&self, format: Exposition) -> String {
        self.role.before_scrape(&self.metrics);
        self.metrics.render(format)
    }

    /// Run an upgraded connection to its end, then count how it ended and free its slot
    /// (the connection's, taken when it was accepted); its output says how it ended.
    pub fn serve(
        self: &Arc<Self>,
        connection: Upgraded,
        prepared: R::Prepared,
        slot: Arc<ConnectionSlot<R>>,
    ) -> impl Future<Output = Ending> + Send + 'static {
        use futures_util::FutureExt;
        let session = R::serve(self.clone(), connection, prepared);
        let open = OpenSession::new(self.metrics.clone());
        // A combinator, not an `async move` block awaiting `session`: such a block keeps the
        // future it captured and the one it awaits in two slots (rustc #62958), and every
        // layer doubled the connection's task (3.4 KB instead of 1.8 KB per connection).
        session.map(move |ending| {
            open.0.closed(ending.label());
            drop(open);
            drop(slot);
            ending
        })
    }
}

/// One WebSocket session in `lightrelay_connections`, from its start until it is dropped
/// (ended, or dropped unfinished at shutdown).
struct OpenSession(Metrics);

impl OpenSession {
    fn new(metrics: Metrics) -> Self {
        metrics.connections.inc();
        OpenSession(metrics)
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}
