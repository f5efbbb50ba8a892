//! A server's life from bind to exit (SPEC §5): the accept loop and the graceful stop.
//!
//! Owns: the checks before start (the flag rule clap cannot see, the open-file limit raised
//! to its hard limit), the runtime (`--worker-threads` workers; the hub has its own thread),
//! binding, sd_notify `READY=1` once bound, the accept loop (TCP_NODELAY,
//! back-off on accept errors, `--max-connections`: every accepted connection takes a slot
//! or is answered 503 on the socket and closed), one hyper connection per TCP connection
//! with the handshake timeout and a bounded request head, the key files read at start (auth
//! on without a readable key: exit 2) and re-read on SIGHUP, and the graceful stop: stop
//! accepting, let every session close with 1001 after its in-flight publishes, exit within
//! `--shutdown-timeout`; and this instance's presence and heartbeat (SPEC §10) started
//! once bound (its default id needs the port).
//! Must not: route requests (`http` does) or know a role's Redis connections.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::config::CommonArgs;
use super::http::RequestLineGuard;
use super::metrics::{Metrics, Refusal};
use super::relay::{ConnectionSlot, Relay, Role};
use super::{http, shutdown, telemetry};
use crate::auth::Auth;
use crate::presence::heartbeat::{self, Presence};
use crate::Error;

/// Run a server until SIGTERM/SIGINT: bind `listen`, build the role with `start` (which
/// starts its Redis connections in the background) and serve. This is all a role's `main`
/// calls.
pub(crate) fn main<R, F>(listen: SocketAddr, common: CommonArgs, start: F) -> ExitCode
where
    R: Role,
    F: FnOnce(&CommonArgs, &Metrics, &CancellationToken) -> Result<R, Error>,
{
    if let Err(why) = common.check() {
        telemetry::error_line(format_args!("{why}"));
        return ExitCode::from(2);
    }
    // Keys are read before anything starts: auth on without a readable key is a bad flag.
    let auth = match Auth::from_args(&common.auth) {
        Ok(auth) => auth,
        Err(why) => {
            telemetry::error_line(format_args!("{why}"));
            return ExitCode::from(2);
        }
    };
    raise_open_file_limit(common.max_connections);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads(&common))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            telemetry::error_line(format_args!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(e) => {
                telemetry::error_line(format_args!("cannot listen on {listen}: {e}"));
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown::on_signal(shutdown.clone()));
        let metrics = Metrics::new();
        let role = match start(&common, &metrics, &shutdown) {
            Ok(role) => role,
            Err(Error::Config(e)) => {
                telemetry::error_line(format_args!("{e}"));
                return ExitCode::from(2);
            }
            Err(e) => {
                telemetry::error_line(format_args!("{e}"));
                return ExitCode::FAILURE;
            }
        };
        let presence = start_presence::<R>(&role, &common, listener.local_addr().ok(), listen);
        let relay = Relay::new(
            role,
            common,
            auth,
            metrics,
            shutdown.clone(),
            listen,
            presence.clone(),
        );
        if let Some(presence) = &presence {
            presence.spawn(shutdown);
        }
        match run(relay, listener).await {
            // A part the server cannot live without stopped: exit 1, so systemd restarts it.
            Ok(()) if shutdown::failure().is_some() => ExitCode::FAILURE,
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                telemetry::error_line(format_args!("{e}"));
                ExitCode::FAILURE
            }
        }
    })
}

/// `--worker-threads`, or (unset or empty) the CPUs this process may run on
/// (`available_parallelism` honours taskset and cgroup quotas), as tokio would choose.
fn worker_threads(common: &CommonArgs) -> usize {
    common
        .worker_threads
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// SIGHUP: re-read the key files. Connections stay as they are; a file that cannot be read
/// leaves the keys in use unchanged (and says why).
fn reload_keys(auth: &Auth) {
    if !auth.enabled() {
        tracing::info!("SIGHUP: --auth none, no keys to re-read");
        return;
    }
    match auth.reload() {
        Ok(keys) => tracing::info!(keys, "SIGHUP: key files re-read"),
        Err(why) => {
            tracing::error!(error = %why, "SIGHUP: key files not re-read; the keys in use stay")
        }
    }
}

/// File descriptors a server needs besides its client connections: the listener, Redis
/// connections (`--redis-connections`, the subscriber, health checks), logs, the runtime.
const OTHER_FILES: u64 = 64;

/// Raise the soft open-file limit to the hard one (systemd's default soft limit, 1024, is
/// far below `--max-connections`), and warn when even that cannot hold `--max-connections`:
/// past it, accepting fails and connections wait in the kernel's backlog instead of getting
/// their 503.
fn raise_open_file_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if (max_connections as u64).saturating_add(OTHER_FILES) > limit => {
            tracing::warn!(
                open_file_limit = limit,
                max_connections,
                "the open-file limit (RLIMIT_NOFILE, LimitNOFILE= under systemd) is below \
                 --max-connections + {OTHER_FILES}: connections past it wait unanswered"
            );
        }
        Ok(limit) => tracing::debug!(open_file_limit = limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

/// The most bytes of one request head (request line and headers) held at once: like nginx's
/// 4 × 8 KiB header buffers, and what an unfinished request can cost. Past it: 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Refusals over `--max-connections` that may linger at once (see [`linger`]);
/// past that, a refused connection is answered without waiting and closed at once.
const LINGERING_REFUSALS: usize = 64;

/// Serve on `listener` until the relay's shutdown token is cancelled, then stop gracefully.
/// This instance's presence (SPEC §10), when `--presence-interval` is not 0: its id is
/// `--instance-id`, or this host's name and the port it listens on.
fn start_presence<R: Role>(
    role: &R,
    common: &CommonArgs,
    bound: Option<SocketAddr>,
    listen: SocketAddr,
) -> Option<Arc<Presence>> {
    let client = role.presence_client()?;
    let bound = bound.unwrap_or(listen);
    let id = common
        .instance_id
        .clone()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| heartbeat::default_id(bound.port()));
    Some(Presence::new(
        client,
        common.channel_prefix.clone(),
        common.presence_interval,
        common.redis_timeout,
        id,
        R::NAME,
        bound.to_string(),
    ))
}

pub(crate) async fn run<R: Role>(relay: Arc<Relay<R>>, listener: TcpListener) -> Result<(), Error> {
    let addr = listener.local_addr()?;
    let redis = relay.common.redis_url.display.clone();
    // The runtime's own count, so the log shows what runs, whatever chose it.
    let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(%addr, %redis, role = R::NAME, worker_threads, "listening");
    shutdown::notify_ready();
    let shutdown = relay.shutdown.clone();
    let reloading = relay.clone();
    tokio::spawn(shutdown::on_hangup(shutdown.clone(), move || {
        reload_keys(&reloading.auth)
    }));
    tokio::spawn(telemetry::summarise(
        relay.metrics.clone(),
        relay.common.log_summary_interval,
        shutdown.clone(),
    ));
    let lingering = Arc::new(Semaphore::new(LINGERING_REFUSALS));

    let mut accept_errors = 0u32;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                accept_errors = 0;
                match relay.admit() {
                    Some(slot) => {
                        relay
                            .tracker
                            .spawn(serve_http(relay.clone(), stream, peer.ip(), slot));
                    }
                    None => refuse_over_capacity(&relay, stream, &lingering),
                }
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
    let shutdown_timeout = relay.common.shutdown_timeout;
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

/// Answer a connection over `--max-connections` with a 503 written on the socket without
/// hyper, and close it. Up to [`LINGERING_REFUSALS`] at once linger (see [`linger`]); past
/// that, the answer is written if the socket takes it at once, and the connection dropped.
fn refuse_over_capacity<R: Role>(relay: &Relay<R>, stream: TcpStream, lingering: &Arc<Semaphore>) {
    relay.metrics.refused(Refusal::over_capacity);
    let answer = http::raw_refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!(
            "server full: {} connections (--max-connections)",
            relay.common.max_connections
        ),
        "retry-after: 1\r\n",
    );
    match lingering.clone().try_acquire_owned() {
        Ok(permit) => {
            relay.tracker.spawn(async move {
                linger(stream, answer).await;
                drop(permit);
            });
        }
        Err(_) => {
            let _ = stream.try_write(&answer);
        }
    }
}

/// Write `answer`, send FIN, and for at most a second read (and drop) what the client sent
/// meanwhile, so that closing does not reset the connection before the answer is read.
async fn linger(mut stream: TcpStream, answer: Vec<u8>) {
    let linger = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        let mut scratch = [0u8; 1024];
        for _ in 0..64 {
            if stream.read(&mut scratch).await? == 0 {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
}

/// One TCP connection from `peer`, holding `slot`: plain HTTP requests until it upgrades (or
/// ends). The slot is shared with the upgraded session, which outlives hyper's connection;
/// the peer address only lives as long as hyper's connection.
fn serve_http<R: Role>(
    relay: Arc<Relay<R>>,
    stream: TcpStream,
    peer: std::net::IpAddr,
    slot: ConnectionSlot<R>,
) -> impl Future<Output = ()> {
    let _ = stream.set_nodelay(true);
    let shutdown = relay.shutdown.clone();
    let handshake_timeout = relay.common.handshake_timeout;
    let io = TokioIo::new(RequestLineGuard::new(stream, relay.metrics.clone()));
    async move {
        let slot = Arc::new(slot);
        let service = service_fn(move |req| http::handle(relay.clone(), slot.clone(), peer, req));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(handshake_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(io, service)
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
}
