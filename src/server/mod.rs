//! The machinery both servers share: listening, HTTP, one WebSocket's life, shutdown.
//!
//! Owns: the accept loop and the process's life from bind to exit ([`listener`]), the
//! per-process state every connection shares and the [`Role`] each server plugs in
//! ([`relay`]), plain HTTP and the upgrade with its refusals ([`http`]), the status page ([`status`]), the abuse limits (client address,
//! connections per address, publish rates, origins: [`limits`]), one WebSocket's
//! session with its phases and timers ([`session`]) and what its client's frames say as they
//! are read ([`frames`]) above the socket's read-ahead ([`read_ahead`]), the client write path (the bounded
//! per-client [`outbox`] and the shared [`socket`]), channel mapping ([`channel`]), flags
//! ([`config`]), metrics ([`metrics`]), signals and sd_notify ([`shutdown`]) and logging
//! ([`telemetry`]).
//! Must not: import the publish or subscribe side, or talk to Redis itself. What differs
//! between the two servers is a [`Role`], implemented in `crate::publish` and
//! `crate::subscribe`, which sit above this module.

/// `AsyncWrite` for a wrapper around a client's stream that changes only what is read (the
/// request-line guard, the read-ahead, the frame watch): every write goes straight through to
/// the stream in its `$field`. `generic Name` for `Name<S>` over any stream `S`.
macro_rules! write_through {
    (generic $name:ident, $field:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $name<S> {
            $crate::server::write_through!(@methods $field);
        }
    };
    ($name:ty, $field:ident) => {
        impl tokio::io::AsyncWrite for $name {
            $crate::server::write_through!(@methods $field);
        }
    };
    (@methods $field:ident) => {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.$field.is_write_vectored()
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
        }
    };
}
pub(crate) use write_through;

pub(crate) mod channel;
pub mod config;
pub(crate) mod frames;
#[allow(dead_code)] // wired by the publish and subscribe sides next
pub(crate) mod history;
pub(crate) mod http;
pub(crate) mod limits;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod read_ahead;
pub(crate) mod relay;
pub(crate) mod session;
pub(crate) mod shutdown;
pub(crate) mod status;
pub mod telemetry;
pub(crate) mod write;

pub(crate) use listener::main;
pub(crate) use relay::{Relay, Role, Upgraded};
