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
//! The parts, lowest first (a part only imports the ones above it in this list):
//! - [`server`]: what both servers share (flags, listener, HTTP, the status page, the abuse
//!   limits, a WebSocket's session, the client write path, metrics, shutdown); it knows a
//!   server only as a `Role`.
//! - `redis`: connections to Redis, their health and how they reconnect.
//! - `auth`: signed tokens (SPEC §8): keys, verification, what a token grants.
//! - [`publish`]: the publish server's role and the pipelined PUBLISH window.
//! - [`subscribe`]: the subscribe server's role, the hub and the live page.
//! - [`client`] and [`bench`]: the `lightrelay` binary; they speak only the wire protocol and
//!   use no server module.
//! - [`docs`]: man pages and shell completions from the three programs' flags (packaging).
//!
//! `ARCHITECTURE.md` is the longer map.

mod auth;
pub mod bench;
pub mod client;
pub mod docs;
mod hub;
#[allow(dead_code)] // wired by /status and POST /down next
mod presence;
pub mod publish;
mod redis;
pub mod server;
pub mod subscribe;

/// The subprotocol a publisher offers to get one ack per message (SPEC §3); the servers
/// select it, the client and the bench offer it.
pub const ACK_PROTOCOL: &str = "lightrelay.ack";

/// The response header of a server's WebSocket handshake that names it: `publish` or
/// `subscribe`. The client reads it to say "this is the other server" instead of waiting for
/// messages that never come (a `sub` aimed at the publish port) or publishing into a
/// subscribe server that discards what it is sent.
pub const ROLE_HEADER: &str = "lightrelay-role";

/// Lock `mutex`, also when a thread panicked while holding it. Every mutex in lightrelay
/// guards state that each update leaves consistent in one step (a push, a swap, an
/// assignment, a map insert), so a poisoned lock is still safe to use; refusing it would turn
/// one panic into a dead hub, queue or socket.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors that stop a server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis client: {0}")]
    Redis(#[from] fred::error::Error),
    /// A setting that cannot work (a flag's file, a flag combination): exit 2.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
