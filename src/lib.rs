//! lightrelay: a Redis pub/sub WebSocket relay.
//!
//! Devices publish over WebSocket (or HTTP POST) to `lightrelay-publish`, which PUBLISHes each
//! message, bytes unchanged, on the Redis channel `PREFIX + PATH`. `lightrelay-subscribe` holds
//! one Redis subscription per channel, whatever the number of clients, and fans each message out
//! to its WebSocket clients as one shared frame. Redis is the switchboard: `redis-cli` can watch
//! and inject traffic, and any number of relay processes can share it.
//!
//! ```text
//! socket → session → PublishWindow → Redis PUBLISH                      (publish path)
//! Redis → hub → Outbox (one per client, bounded) → session → socket     (subscribe path)
//! ```
//!
//! Modules, in the order data flows: [`config`] (flags), [`server`] (listener, shared state,
//! shutdown), [`http`] (requests, refusals, upgrades), [`channel`] (path → channel),
//! [`session`] (one WebSocket's life), [`publish`] (pipelined PUBLISH), [`hub`] (subscriptions
//! and fan-out), [`outbox`] (per-client bounded queue), [`page`] (the live page's embedded
//! files), [`redis`] (connections and health),
//! [`metrics`], [`shutdown`], [`telemetry`]. `ARCHITECTURE.md` is the longer map.

pub mod channel;
pub mod client;
pub mod config;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod page;
pub mod publish;
pub mod redis;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod socket;
pub mod telemetry;

/// Errors that stop a server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis client: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
