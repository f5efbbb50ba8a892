//! A server's life from bind to exit (SPEC §5): the accept loop and the graceful stop.
//!
//! Owns: binding, sd_notify `READY=1` once bound, the accept loop (TCP_NODELAY, back-off on
//! accept errors), one hyper connection per TCP connection with the handshake timeout, and
//! the graceful stop: stop accepting, let every session close with 1001 after its in-flight
//! publishes, exit within `--shutdown-timeout`.
//! Must not: route requests (`http` does) or know a role's Redis connections.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::config::CommonArgs;
use super::metrics::Metrics;
use super::relay::{Relay, Role};
use super::{http, shutdown};
use crate::Error;

/// Run a server until SIGTERM/SIGINT: bind `listen`, build the role with `start` (which
/// starts its Redis connections in the background) and serve. This is all a role's `main`
/// calls.
pub(crate) fn main<R, F>(listen: SocketAddr, common: CommonArgs, start: F) -> ExitCode
where
    R: Role,
    F: FnOnce(&CommonArgs, &Metrics, &CancellationToken) -> Result<R, Error>,
{
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
        let listener = match TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(shutdown::on_signal(shutdown.clone()));
        let metrics = Metrics::new();
        let role = match start(&common, &metrics, &shutdown) {
            Ok(role) => role,
            Err(Error::Config(e)) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let relay = Relay::new(role, common, metrics, shutdown);
        match run(relay, listener).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Serve on `listener` until the relay's shutdown token is cancelled, then stop gracefully.
pub(crate) async fn run<R: Role>(relay: Arc<Relay<R>>, listener: TcpListener) -> Result<(), Error> {
    let addr = listener.local_addr()?;
    let redis = relay.common.redis_url.display.clone();
    tracing::info!(%addr, %redis, role = R::NAME, "listening");
    shutdown::notify_ready();
    let shutdown = relay.shutdown.clone();

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

/// One TCP connection: plain HTTP requests until it upgrades (or ends).
fn serve_http<R: Role>(relay: Arc<Relay<R>>, stream: TcpStream) -> impl Future<Output = ()> {
    let _ = stream.set_nodelay(true);
    let shutdown = relay.shutdown.clone();
    let handshake_timeout = relay.common.handshake_timeout;
    async move {
        let service = service_fn(move |req| http::handle(relay.clone(), req));
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
}
