//! A running relay: its shared state, its listener and its life from bind to exit (SPEC §5).
//!
//! Owns: [`Relay`] (what every connection of one process shares: role, flags, metrics, Redis
//! clients, health, the connection count and the shutdown token), the accept loop (TCP_NODELAY,
//! back-off on accept errors, handshake timeout), sd_notify `READY=1` once bound, and the
//! graceful stop: stop accepting, let every session close with 1001 after its in-flight
//! publishes, exit within `--shutdown-timeout`.
//! Must not: parse flags (config does) or know a message's path through the system.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::channel::ChannelName;
use crate::config::{CommonArgs, PublishArgs, SlowConsumer, SubscribeArgs};
use crate::hub::{Hub, Topic};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::publish::{PublishWindow, Publisher};
use crate::redis::{connect_publisher, connect_subscriber, Health};
use crate::session::{self, Inbound, SessionSettings};
use crate::socket::Socket;
use crate::{shutdown, Error};

/// Which of the two servers this process is, with what only that one needs.
pub enum Role {
    Publish,
    Subscribe {
        hub: Arc<Hub>,
        client_queue: usize,
        slow_consumer: SlowConsumer,
        accept_publish: bool,
    },
}

/// Everything the connections of one server process share.
pub struct Relay {
    role: Role,
    common: CommonArgs,
    pub metrics: Metrics,
    pub publisher: Publisher,
    pub health: Arc<Health>,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    connections: AtomicUsize,
}

/// A WebSocket connection's place under `--max-connections`; freed when dropped.
pub struct ConnectionSlot(Arc<Relay>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connections.dec();
    }
}

/// What a server needs to start: its address, its flags and its role's flags.
pub struct Settings {
    pub listen: SocketAddr,
    pub common: CommonArgs,
    subscribe: Option<(usize, SlowConsumer, bool)>,
}

impl Settings {
    pub fn publish(args: PublishArgs) -> Self {
        Settings {
            listen: args.listen,
            common: args.common,
            subscribe: None,
        }
    }

    pub fn subscribe(args: SubscribeArgs) -> Self {
        Settings {
            listen: args.listen,
            common: args.common,
            subscribe: Some((
                args.client_queue as usize,
                args.slow_consumer,
                args.accept_publish,
            )),
        }
    }
}

impl Relay {
    /// Build the relay and start its Redis connections (which retry in the background).
    fn start(settings: Settings, shutdown: CancellationToken) -> Result<Arc<Self>, Error> {
        let common = settings.common;
        let metrics = Metrics::new();
        let health = Arc::new(Health::default());
        let publisher = Publisher::new(connect_publisher(&common)?);
        let publishes = settings
            .subscribe
            .is_none_or(|(_, _, accept_publish)| accept_publish);
        if publishes {
            for (i, client) in publisher.clients().iter().enumerate() {
                health.watch(
                    format!("publish#{i}"),
                    client.clone(),
                    common.ping_interval,
                    metrics.clone(),
                    shutdown.clone(),
                );
            }
        }
        let role = match settings.subscribe {
            None => Role::Publish,
            Some((client_queue, slow_consumer, accept_publish)) => {
                let subscriber = connect_subscriber(&common)?;
                health.watch(
                    "subscriber".into(),
                    subscriber.clone(),
                    common.ping_interval,
                    metrics.clone(),
                    shutdown.clone(),
                );
                let hub = Hub::new(metrics.clone());
                spawn_hub(hub.clone(), subscriber, shutdown.clone())?;
                Role::Subscribe {
                    hub,
                    client_queue,
                    slow_consumer,
                    accept_publish,
                }
            }
        };
        Ok(Arc::new(Relay {
            role,
            common,
            metrics,
            publisher,
            health,
            tracker: TaskTracker::new(),
            shutdown,
            connections: AtomicUsize::new(0),
        }))
    }

    pub fn common(&self) -> &CommonArgs {
        &self.common
    }

    pub fn is_publish(&self) -> bool {
        matches!(self.role, Role::Publish)
    }

    /// POST publishing belongs to the publish server (and to a subscribe server that accepts
    /// publishing from its clients).
    pub fn accepts_post(&self) -> bool {
        matches!(
            self.role,
            Role::Publish
                | Role::Subscribe {
                    accept_publish: true,
                    ..
                }
        )
    }

    /// Take a connection slot, or `None` when `--max-connections` are open.
    pub fn admit(self: &Arc<Self>) -> Option<ConnectionSlot> {
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
        if let Role::Subscribe { hub, .. } = &self.role {
            let (_, messages, bytes) = hub.stats();
            self.metrics.queued_messages.set(messages as i64);
            self.metrics.queued_bytes.set(bytes as i64);
        }
        self.metrics.render()
    }

    /// Set up one upgraded WebSocket connection and return the future that runs it to its
    /// end. Set-up is synchronous so that the connection's state is moved into the returned
    /// future once, not kept twice as an async fn's argument and local.
    pub fn serve<S>(
        self: Arc<Self>,
        ws: WebSocketStream<S>,
        socket: Socket,
        channel: ChannelName,
        ack: bool,
        slot: ConnectionSlot,
    ) -> impl std::future::Future<Output = ()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let common = &self.common;
        let settings = SessionSettings {
            ping_interval: common.ping_interval,
            idle_timeout: common.idle_timeout,
            close_timeout: common.handshake_timeout,
            max_message_bytes: common.max_message_bytes,
            ack,
        };
        let window = || {
            let size = common.publish_window as usize;
            Box::new(PublishWindow::new(
                &self.publisher,
                channel.clone(),
                size,
                common.redis_timeout,
                self.metrics.clone(),
            ))
        };
        // One call to session::run below (not one per role): each await point of an async
        // fn keeps its own slot, and this future lives as long as the connection.
        let (outbox, inbound, membership) = match &self.role {
            Role::Publish => {
                // A publisher's outbox only holds its acks, at most one per message in flight;
                // one that never reads them is closed like any slow consumer.
                let size = common.publish_window as usize * 4;
                let outbox = Arc::new(Outbox::new(size, SlowConsumer::Close));
                (outbox, Inbound::Publish(window()), None)
            }
            Role::Subscribe {
                hub,
                client_queue,
                slow_consumer,
                accept_publish,
            } => {
                let outbox = Arc::new(Outbox::with_socket(
                    *client_queue,
                    *slow_consumer,
                    Some(socket),
                ));
                let membership = hub.join(Topic::Channel(channel.clone()), outbox.clone());
                let inbound = if *accept_publish {
                    Inbound::Publish(window())
                } else {
                    Inbound::Discard
                };
                (outbox, inbound, Some(membership))
            }
        };
        let shutdown = self.shutdown.clone();
        let metrics = self.metrics.clone();
        let session = session::run(ws, outbox, inbound, settings, shutdown, metrics);
        async move {
            let ending = session.await;
            drop(membership);
            self.metrics.closed(ending.label());
            tracing::debug!(channel = %channel, ending = ?ending, "connection closed");
            drop(slot);
        }
    }
}

/// Run the hub on a thread of its own. On the shared runtime it waited in the run queue
/// behind the connection tasks it had just woken (10,000 of them per message at worst), and
/// fred's message buffer overflowed meanwhile: in a 1,000 channels × 10 subscribers run at
/// full rate, 15,904 messages were lost to `redis_lagged` in the first burst.
/// With more than one core, the connections' runtime helps with large direct fan-outs.
fn spawn_hub(
    hub: Arc<Hub>,
    subscriber: fred::clients::SubscriberClient,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let helper = (cores > 1)
        .then(tokio::runtime::Handle::try_current)
        .and_then(Result::ok);
    std::thread::Builder::new()
        .name("lightrelay-hub".into())
        .spawn(move || runtime.block_on(hub.run(subscriber, shutdown, helper)))?;
    Ok(())
}

/// Run a server until SIGTERM/SIGINT. This is all a binary calls.
pub fn main(settings: Settings) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(settings.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("error: cannot listen on {}: {e}", settings.listen);
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown::on_signal(shutdown.clone()));
        match run(settings, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Serve on `listener` until `shutdown` is cancelled, then stop gracefully.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let shutdown_timeout = settings.common.shutdown_timeout;
    let redis = settings.common.redis_url.display.clone();
    let relay = Relay::start(settings, shutdown.clone())?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, %redis, role = if relay.is_publish() { "publish" } else { "subscribe" }, "listening");
    shutdown::notify_ready();

    let mut accept_errors = 0u32;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, _peer)) => {
                accept_errors = 0;
                relay.tracker.spawn(serve_http(relay.clone(), stream));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                accept_errors = (accept_errors + 1).min(6);
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10 << accept_errors)).await;
            }
        }
    }
    drop(listener);
    shutdown::notify_stopping();
    tracing::info!("shutting down: closing connections");
    relay.tracker.close();
    if tokio::time::timeout(shutdown_timeout, relay.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = relay.tracker.len(),
            "shutdown timeout: dropping what is left"
        );
    }
    Ok(())
}

/// One TCP connection: plain HTTP requests until it upgrades (or ends).
async fn serve_http(relay: Arc<Relay>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let shutdown = relay.shutdown.clone();
    let handshake_timeout = relay.common.handshake_timeout;
    let service = service_fn(move |req| crate::http::handle(relay.clone(), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
