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
