//! The write path of a client: who may write its socket, and when (SPEC §4).
//!
//! Owns: the per-client bounded queue and the slow-consumer judgement ([`outbox`]), the
//! client's `TcpStream` shared between its session and the hub, with the tail of a partly
//! written frame and frames encoded once ([`socket`]), the one limit they share
//! ([`socket::WRITE_BUFFER`]), the memory files a large payload to many sockets is sent from
//! without a copy per socket ([`pages`]), and the batches that send one frame to many idle
//! sockets in one system call ([`batch`]). The direct write (the hub writing a frame straight
//! into an idle subscriber's socket, counted in `lightrelay_direct_writes_total`) lives here
//! and nowhere else: it spares a task wake-up and poll per delivery, 27% of the server's CPU per delivery
//! at 20 messages/s to 1,000 subscribers (`bin/bench --only latency`: 132,159 deliveries per
//! CPU-second with it, 97,087 without).
//!
//! Rules:
//! - One writer at a time. The session lends the socket (`Outbox::lend`) only while idle:
//!   nothing taken from the outbox unwritten, no tail, tungstenite holding no bytes, no ping
//!   due, not ending; it takes it back (`Outbox::take_back`) before it reads or writes. While
//!   lent, the queue is empty and there is no tail (a `debug_assert!` in `Outbox::hold_lent`).
//! - Lock order: hub (released before fan-out) → outbox → socket tail. A fan-out holds the
//!   locks of up to [`batch::BATCH`] outboxes with lent sockets across one batch of
//!   non-blocking sends (`outbox::DirectWrites`), never across an await; only a fan-out holds
//!   more than one, and the two halves of a split fan-out hold disjoint sets; nothing takes an
//!   outbox lock while holding a tail lock.
//! - Order: every push withdraws the loan, so a direct write never overtakes a queued frame; a
//!   tail is sent before any other byte, so frames are never interleaved.
//!
//! Must not: await, block on a socket, or know about channels or Redis.

pub(crate) mod batch;
pub(crate) mod outbox;
pub(crate) mod pages;
pub(crate) mod socket;
