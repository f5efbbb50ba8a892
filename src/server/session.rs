//! One WebSocket client's life, on either server: read, write, keep alive, close (SPEC §3–5).
//!
//! Owns: the connection's single task, in phases ([`Phase`]): *open* (it reads frames, handing
//! them to its [`Inbound`]: the publish side's window, or `None`: discarded; small ones copied
//! out of tungstenite's read buffer first, see [`SMALL_MESSAGE`]; at each ping the window may
//! let go of what only a busy client needs; under
//! `--max-publish-rate` its [`Throttle`] says when it may read again; pings every
//! `--ping-interval`; closes a peer silent for `--idle-timeout`, or one that began a message and
//! did not finish it within `--handshake-timeout`, and keeps all unfinished messages of the
//! process within a byte budget), *draining* (nothing read, the publishes in flight finish
//! within `--redis-timeout`) and closing (the close frame that says why, see [`Ending`]; after
//! failing a client it reads what the client still sends, bounded, so the TCP close is not a
//! reset). Each phase holds only its own deadlines, all served by one timer. It writes what its
//! [`Outbox`] holds (several queued frames per write, then one flush). A subscriber's session
//! lends its socket to its outbox whenever it goes idle with nothing queued, so the hub can
//! write the next frame directly, and takes it back at its next poll.
//! Must not: touch Redis subscriptions or other clients; it only sees its own outbox and
//! window (and one process-wide count of unfinished bytes), so one slow or broken client
//! cannot slow anyone else.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::config::CommonArgs;
use super::frames::Watched;
use super::limits::Throttle;
use super::metrics::{Closed, Metrics};
use super::write::outbox::Outbox;

/// How a session ended, and so which close frame (if any) the client gets.
#[derive(Debug)]
pub enum Ending {
    /// The client closed (or its close frame was answered by tungstenite).
    ClientClosed,
    /// The TCP connection broke; nothing can be sent.
    Broken,
    /// Server shutdown: 1001 `going away`, after pending acks.
    GoingAway,
    /// Its outbox overflowed under `--slow-consumer close`: 1008 `slow consumer`.
    SlowConsumer,
    /// Silent past `--idle-timeout`: 1001 `idle timeout`.
    IdleTimeout,
    /// A message over `--max-message-bytes`: 1009.
    TooBig(usize),
    /// A message begun and not finished within `--handshake-timeout`: 1008.
    Unfinished(Duration),
    /// The unfinished messages of all clients would hold more than their budget: 1013.
    Busy(usize),
    /// Redis did not accept a publish in time: 1013 (try again later), with why.
    RedisUnavailable(String),
    /// Broken framing: 1002; invalid UTF-8 in a text frame: 1007.
    Protocol(CloseCode, String),
    /// The token the connection was opened with reached its `exp`: 1008 `token expired`.
    TokenExpired,
    /// A data frame on a connection whose token may not publish on its path (a subscriber
    /// on a server with `--accept-publish` and `--auth`): 1008.
    NotAllowed,
}

impl Ending {
    /// Whether frames can still go out: not once the client closed, the socket broke or the
    /// client stopped reading (its outbox overflowed).
    fn can_write(&self) -> bool {
        !matches!(
            self,
            Ending::ClientClosed | Ending::Broken | Ending::SlowConsumer
        )
    }

    /// The metric label for `lightrelay_closed_total{reason}`.
    pub fn label(&self) -> Closed {
        match self {
            Ending::ClientClosed => Closed::client,
            Ending::Broken => Closed::broken,
            Ending::GoingAway => Closed::going_away,
            Ending::SlowConsumer => Closed::slow_consumer,
            Ending::IdleTimeout => Closed::idle_timeout,
            Ending::TooBig(_) => Closed::too_big,
            Ending::Unfinished(_) => Closed::message_timeout,
            Ending::Busy(_) => Closed::busy,
            Ending::RedisUnavailable(_) => Closed::redis_unavailable,
            Ending::Protocol(..) => Closed::protocol_error,
            Ending::TokenExpired => Closed::token_expired,
            Ending::NotAllowed => Closed::not_allowed,
        }
    }

    fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Ending::ClientClosed | Ending::Broken => return None,
            Ending::GoingAway => (CloseCode::Away, "going away".to_string()),
            Ending::SlowConsumer => (CloseCode::Policy, "slow consumer".to_string()),
            Ending::IdleTimeout => (CloseCode::Away, "idle timeout".to_string()),
            Ending::TooBig(max) => (
                CloseCode::Size,
                format!("message too big (limit {max} bytes)"),
            ),
            Ending::Unfinished(limit) => (
                CloseCode::Policy,
                format!("message not finished within {limit:?} (--handshake-timeout)"),
            ),
            Ending::Busy(budget) => (
                CloseCode::Again,
                format!("server busy: unfinished messages over {budget} bytes; try again later"),
            ),
            Ending::RedisUnavailable(why) => (CloseCode::Again, why.clone()),
            Ending::Protocol(code, reason) => (*code, reason.clone()),
            Ending::TokenExpired => (CloseCode::Policy, "token expired".to_string()),
            Ending::NotAllowed => (
                CloseCode::Policy,
                "this token does not allow publishing on this path".to_string(),
            ),
        };
        Some(CloseFrame {
            code,
            reason: truncate_reason(reason).into(),
        })
    }
}

/// A close reason must fit the 125-byte control frame with its 2-byte code.
fn truncate_reason(mut reason: String) -> String {
    if reason.len() > 123 {
        let mut end = 123;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// The per-connection settings a session needs.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// `--handshake-timeout`: how long a message may take to arrive once its first byte has,
    /// and how long closing (sending the close frame, waiting for the answer) may take.
    pub handshake_timeout: Duration,
    pub max_message_bytes: usize,
    /// The client asked for `lightrelay.ack`: one text frame with the receiver count per
    /// message, once Redis accepted it.
    pub ack: bool,
    /// When the connection's token expires (SPEC §8): the open phase ends there, with 1008.
    pub expires: Option<Instant>,
    /// A data frame from the client ends the connection with 1008 instead of being handed on
    /// (its token does not allow publishing on its path).
    pub refuse_data: bool,
}

impl SessionSettings {
    /// A client's session settings, from the flags both servers share.
    pub(crate) fn new(common: &CommonArgs, ack: bool, expires: Option<Instant>) -> Self {
        SessionSettings {
            ping_interval: common.ping_interval,
            idle_timeout: common.idle_timeout,
            handshake_timeout: common.handshake_timeout,
            max_message_bytes: common.max_message_bytes,
            ack,
            expires,
            refuse_data: false,
        }
    }
}

/// What a session does with the data frames its client sends: publish them (the publish
/// side's window implements this) or discard them (`None`). Errors are the reason of a 1013.
pub(crate) trait Inbound {
    /// Take one message; the caller checks [`Inbound::is_full`] first and calls
    /// [`Inbound::send`] once it has pushed what one read brought.
    fn push(&mut self, payload: Bytes);
    /// Put what was pushed on its way, as one batch.
    fn send(&mut self);
    /// No more may be pushed until some complete (back-pressure: the session stops reading).
    fn is_full(&self) -> bool;
    /// Nothing pushed is waiting for its completion.
    fn is_empty(&self) -> bool;
    /// The oldest message's completion (its receiver count), in order.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<i64, String>>;
    /// When the oldest message waiting gives up (`--redis-timeout`).
    fn deadline(&self) -> Option<Instant>;
    /// Give up on everything waiting; the reason of the 1013.
    fn time_out(&mut self) -> String;
    /// Free what only a busy client needs, if nothing is waiting (called at each ping).
    fn release_if_idle(&mut self);
}

/// `Some(window)` publishes, `None` discards: one session type for a subscribe server with or
/// without `--accept-publish`.
impl<I: Inbound> Inbound for Option<I> {
    fn push(&mut self, payload: Bytes) {
        if let Some(inbound) = self {
            inbound.push(payload);
        }
    }
    fn send(&mut self) {
        if let Some(inbound) = self {
            inbound.send();
        }
    }
    fn is_full(&self) -> bool {
        self.as_ref().is_some_and(I::is_full)
    }
    fn is_empty(&self) -> bool {
        self.as_ref().is_none_or(I::is_empty)
    }
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<i64, String>> {
        match self {
            Some(inbound) => inbound.poll_next(cx),
            None => Poll::Pending,
        }
    }
    fn deadline(&self) -> Option<Instant> {
        self.as_ref().and_then(I::deadline)
    }
    fn time_out(&mut self) -> String {
        self.as_mut().map(I::time_out).unwrap_or_default()
    }
    fn release_if_idle(&mut self) {
        if let Some(inbound) = self {
            inbound.release_if_idle();
        }
    }
}

/// Run one client's connection to its end and say how it ended. `throttle`: the publish
/// rate of a connection whose messages are published (`None`: not limited).
///
/// The connection's state is boxed once here: async fns and blocks keep their arguments and
/// every awaited future in separate slots, so passing a WebSocket by value through a few
/// layers of futures stores it several times over; passing a `Box` stores a pointer.
pub(crate) fn run<S, I>(
    ws: WebSocketStream<Watched<S>>,
    outbox: Arc<Outbox>,
    inbound: I,
    throttle: Option<Box<Throttle>>,
    settings: SessionSettings,
    shutdown: CancellationToken,
    metrics: Metrics,
) -> impl Future<Output = Ending>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: Inbound,
{
    let now = Instant::now();
    let conn = Box::new(Connection {
        ws,
        outbox,
        inbound,
        batch: VecDeque::new(),
        tail: false,
        unflushed: false,
        read_idle: false,
        phase: Phase::Open(Open {
            last_heard: now,
            next_ping: now + settings.ping_interval,
            ping_due: false,
            message_started: None,
            finished_seen: 0,
            throttle,
        }),
        held: 0,
        settings,
        metrics,
    });
    conn.drive(shutdown)
}

/// How many rounds of read/write one poll may make before letting other tasks run.
const POLL_BUDGET: usize = 16;
/// How many frames one round may read from a client.
const READ_BUDGET: usize = 64;

/// One connection's state. Everything is polled by hand from a single task, on the unsplit
/// WebSocket: no lock between a reader and a writer half, no stored futures besides one
/// timer and the shutdown signal, so an idle connection costs little more than its socket.
struct Connection<S, I> {
    ws: WebSocketStream<Watched<S>>,
    outbox: Arc<Outbox>,
    inbound: I,
    /// Frames taken from the outbox and not yet handed to tungstenite.
    batch: VecDeque<Message>,
    /// The socket holds a tail: the unsent end of a frame the hub wrote directly, or a large
    /// frame this session writes from its payload. Any write sends it first; this makes sure
    /// it goes out even when nothing else is to be written.
    tail: bool,
    /// Frames were handed to tungstenite since the last completed flush.
    unflushed: bool,
    /// The last read came back empty: tungstenite holds no whole frame (nor [`ReadAhead`] a
    /// byte) and the socket would block. Until the socket is readable again another read
    /// can only find the same, so the session asks the socket's readiness instead (a few
    /// atomics, not tungstenite's read path: ~1,500 instructions per poll, 13% of a
    /// subscriber's per-delivery instructions when its writes coalesce).
    ///
    /// [`ReadAhead`]: super::read_ahead::ReadAhead
    read_idle: bool,
    phase: Phase,
    /// What this connection's unfinished message counts against [`UNFINISHED`].
    held: usize,
    settings: SessionSettings,
    metrics: Metrics,
}

/// Where a connection is in its life. Each phase holds its own deadlines and no other's, so a
/// timer of one phase cannot fire in another: a draining session has no idle deadline to
/// re-arm (one that stayed armed after the ending, already past, woke the task on every poll
/// and spun a core for as long as a Redis stall lasted).
enum Phase {
    /// Reading and writing, pinging the client and watching it for silence.
    Open(Open),
    /// Ending: nothing more is read, the publishes in flight finish (their only deadline is
    /// `--redis-timeout`), then the session closes with this (shutdown: 1001 after the acks).
    Draining(Ending),
    /// `poll` returned the ending; `close` runs the close handshake.
    Closing,
}

/// The open phase's state: its timers.
struct Open {
    /// When the client was last heard from (any frame, pongs included): `--idle-timeout`.
    last_heard: Instant,
    /// When the next ping is due: `--ping-interval`.
    next_ping: Instant,
    /// A ping is due and not yet handed to tungstenite.
    ping_due: bool,
    /// Since when the client has owed the rest of a message it began (at most
    /// `--handshake-timeout`); `None` while nothing is unfinished or while the session does
    /// not read (its publish window is full).
    message_started: Option<Instant>,
    /// [`FrameWatch::finished`] when last looked at: a change means the client got on.
    finished_seen: u32,
    /// `--max-publish-rate`: while it holds the connection back, nothing is read and the
    /// timer wakes the session when it may read again.
    throttle: Option<Box<Throttle>>,
}

/// Bytes that all unfinished messages of the process declared, counted from
/// [`UNFINISHED_FROM`] bytes each: tungstenite reserves a frame's whole length when its header
/// arrives and keeps a fragmented message's frames until its last, so a client that sends the
/// start of a message holds up to `--max-message-bytes` of memory (twice that when
/// fragmented) for nothing.
static UNFINISHED: AtomicUsize = AtomicUsize::new(0);

/// What all unfinished messages together may hold: this, or `--max-message-bytes` if larger.
/// Past it, the connection whose message would go over is closed with 1013 (try again later).
pub(crate) const UNFINISHED_BUDGET: usize = 64 << 20;

/// Unfinished messages smaller than this are not counted: a connection's own buffers hold as
/// much, and a publisher's reads end mid-frame all the time (no shared counter to touch).
const UNFINISHED_FROM: usize = 16 << 10;

/// Messages up to this size are copied out of tungstenite's read buffer into one arena per
/// read before they are published. tungstenite's buffer is small ([`READ_BUFFER`], 256
/// bytes, for idle connections' sake) and a payload it hands out still shares it: while the
/// payload waits for Redis, tungstenite cannot reuse the buffer and allocates one exactly as
/// large as the next frame (under 1 KiB, `bytes` keeps no larger size in mind), so it read
/// one frame per read call and allocated twice (buffer, shared header) per message. Copied
/// out, each payload is dropped at once, the buffer is reused in place, reads stay 256
/// bytes, and one allocation serves a whole read's small messages.
///
/// [`READ_BUFFER`]: super::http::READ_BUFFER
const SMALL_MESSAGE: usize = 1024;

/// The arena's size: a read's small messages in one or a few allocations.
const ARENA: usize = 8 * 1024;

/// `payload` as the window keeps it: a small one copied into `arena` (see [`SMALL_MESSAGE`]).
fn own(payload: Bytes, arena: &mut BytesMut) -> Bytes {
    if payload.len() > SMALL_MESSAGE {
        return payload;
    }
    if arena.capacity() - arena.len() < payload.len() {
        *arena = BytesMut::with_capacity(ARENA);
    }
    arena.extend_from_slice(&payload);
    arena.split().freeze()
}

/// How long, and how much, a failed connection is read after its close frame.
const DRAIN_TIME: Duration = Duration::from_secs(1);
const DRAIN_BYTES: usize = 1 << 20;

impl<S, I> Connection<S, I>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: Inbound,
{
    async fn drive(mut self: Box<Self>, shutdown: CancellationToken) -> Ending {
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let start = self.next_deadline().unwrap_or_else(Instant::now);
        let timer = tokio::time::sleep_until(start);
        tokio::pin!(timer);
        let ending =
            std::future::poll_fn(|cx| self.poll(cx, cancelled.as_mut(), timer.as_mut())).await;
        // Boxed: closing's futures (a timeout, tungstenite's sends) would otherwise widen the
        // task of every connection, open or closing, to their size.
        Box::pin(self.close(ending)).await
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
        mut timer: Pin<&mut Sleep>,
    ) -> Poll<Ending> {
        if self.is_open() && cancelled.poll(cx).is_ready() {
            self.end(Ending::GoingAway);
        }
        // From here on only this session writes to the socket.
        self.tail |= self.outbox.take_back(cx.waker());
        for _ in 0..POLL_BUDGET {
            if self.is_open() && self.outbox.overflowed() {
                self.end(Ending::SlowConsumer);
            }
            let mut progress = match self.poll_acks(cx) {
                Ok(progress) => progress,
                Err(ending) => return Poll::Ready(ending),
            };
            // However the connection ends, what was read from it is published first: frames
            // already taken off the socket must not be dropped (bounded by --redis-timeout).
            if !self.is_open() && self.inbound.is_empty() {
                return Poll::Ready(self.take_ending());
            }
            if self.can_write() {
                let wrote = self.poll_write(cx);
                // What the socket did not take: the outbox judges slowness by it.
                self.outbox
                    .set_blocked(!self.batch.is_empty() || self.tail || self.unflushed);
                match wrote {
                    Ok(wrote) => progress |= wrote,
                    Err(ending) => {
                        self.end(ending);
                        continue;
                    }
                }
            }
            if self.is_open() {
                match self.poll_read(cx) {
                    Ok(read) => progress |= read,
                    Err(ending) => {
                        self.end(ending);
                        continue;
                    }
                }
            }
            // Timers: one sleep serves the phase's deadlines. It may fire early (a frame moved
            // the idle deadline on); it is then simply re-armed.
            let now = Instant::now();
            if self.is_open() {
                if let Err(ending) = self.watch_messages(now) {
                    self.end(ending);
                    continue;
                }
            }
            if self.is_open() && self.settings.expires.is_some_and(|at| now >= at) {
                self.end(Ending::TokenExpired);
                continue;
            }
            if let Phase::Open(open) = &mut self.phase {
                if now >= open.last_heard + self.settings.idle_timeout {
                    self.end(Ending::IdleTimeout);
                    continue;
                }
                if now >= open.next_ping {
                    // A window kept since the last ping and idle now goes (an idle publisher
                    // holds none); a busy publisher keeps one across its bursts.
                    self.inbound.release_if_idle();
                    open.ping_due = true;
                    open.next_ping = now + self.settings.ping_interval;
                    progress = true;
                }
            }
            if self.inbound.deadline().is_some_and(|d| now >= d) {
                return Poll::Ready(Ending::RedisUnavailable(self.inbound.time_out()));
            }
            // Every deadline left is in the future now, so the timer cannot be ready at once.
            if let Some(deadline) = self.next_deadline() {
                if deadline < timer.deadline() || timer.is_elapsed() {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    progress = true;
                }
            }
            if !progress {
                if self.is_idle() {
                    // Nothing of ours in flight: the hub may write the next frames itself.
                    self.outbox.lend();
                }
                return Poll::Pending;
            }
        }
        // Busy: let other connections run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Bound what a client's unfinished message costs: its time from the first byte (`--handshake-timeout`)
    /// and its share of the process's [`UNFINISHED_BUDGET`]. Open phase only.
    fn watch_messages(&mut self, now: Instant) -> Result<(), Ending> {
        let Phase::Open(open) = &mut self.phase else {
            return Ok(());
        };
        let watch = self.ws.get_ref().watch();
        let finished = watch.finished();
        open.message_started = match open.message_started {
            // Not reading (back-pressure, the publish rate) is not the client's delay.
            _ if !watch.unfinished()
                || self.inbound.is_full()
                || open.throttle.as_ref().is_some_and(|t| t.is_holding()) =>
            {
                None
            }
            Some(started) if finished == open.finished_seen => Some(started),
            _ => Some(now),
        };
        open.finished_seen = finished;
        let timeout = self.settings.handshake_timeout;
        if open
            .message_started
            .is_some_and(|started| now >= started + timeout)
        {
            return Err(Ending::Unfinished(timeout));
        }
        let held = usize::try_from(watch.held()).unwrap_or(usize::MAX);
        let held = if held < UNFINISHED_FROM { 0 } else { held };
        if held == self.held {
            return Ok(());
        }
        if held < self.held {
            UNFINISHED.fetch_sub(self.held - held, Ordering::Relaxed);
            self.held = held;
            return Ok(());
        }
        let more = held - self.held;
        self.held = held;
        let total = UNFINISHED
            .fetch_add(more, Ordering::Relaxed)
            .saturating_add(more);
        let budget = UNFINISHED_BUDGET.max(self.settings.max_message_bytes);
        if total > budget {
            return Err(Ending::Busy(budget));
        }
        Ok(())
    }

    fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// Leave the open phase with `ending`; a connection already ending keeps its first reason.
    fn end(&mut self, ending: Ending) {
        if self.is_open() {
            self.phase = Phase::Draining(ending);
        }
    }

    /// The ending `poll` returns; the phase becomes [`Phase::Closing`].
    fn take_ending(&mut self) -> Ending {
        match std::mem::replace(&mut self.phase, Phase::Closing) {
            Phase::Draining(ending) => ending,
            Phase::Open(_) | Phase::Closing => Ending::Broken,
        }
    }

    fn ping_due(&self) -> bool {
        matches!(&self.phase, Phase::Open(open) if open.ping_due)
    }

    /// Nothing taken from the outbox is unwritten and tungstenite holds no unsent bytes.
    fn is_idle(&self) -> bool {
        self.batch.is_empty() && !self.tail && !self.unflushed && self.is_open() && !self.ping_due()
    }

    /// Whether frames can still go out.
    fn can_write(&self) -> bool {
        match &self.phase {
            Phase::Open(_) => true,
            Phase::Draining(ending) => ending.can_write(),
            Phase::Closing => false,
        }
    }

    /// The earliest deadline of the current phase: ping, idle timeout, the publish rate's
    /// next read and the oldest publish's `--redis-timeout` while open; only the latter while
    /// draining.
    fn next_deadline(&self) -> Option<Instant> {
        let publish = self.inbound.deadline();
        match &self.phase {
            Phase::Open(open) => {
                let idle = open.last_heard + self.settings.idle_timeout;
                let mut own = open.next_ping.min(idle);
                if let Some(started) = open.message_started {
                    own = own.min(started + self.settings.handshake_timeout);
                }
                if let Some(resume) = open.throttle.as_ref().and_then(|t| t.resume_at()) {
                    own = own.min(resume);
                }
                if let Some(expires) = self.settings.expires {
                    own = own.min(expires);
                }
                Some(publish.map_or(own, |p| p.min(own)))
            }
            Phase::Draining(_) | Phase::Closing => publish,
        }
    }

    /// Publishes Redis accepted: one ack each (in ack mode), in order.
    fn poll_acks(&mut self, cx: &mut Context<'_>) -> Result<bool, Ending> {
        let ack = self.settings.ack;
        let mut progress = false;
        while let Poll::Ready(done) = self.inbound.poll_next(cx) {
            let receivers = done.map_err(Ending::RedisUnavailable)?;
            if ack {
                self.outbox.push(Message::text(receivers.to_string()));
            }
            progress = true;
        }
        Ok(progress)
    }

    /// Hand queued frames to tungstenite (it writes once 16 KiB have gathered), then flush:
    /// a burst goes out in few write calls.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, Ending> {
        let mut progress = false;
        if self.tail {
            match self.poll_tail(cx) {
                Poll::Ready(result) => progress = result?,
                Poll::Pending => return Ok(false),
            }
        }
        let (mut frames, mut bytes) = (0u64, 0u64);
        loop {
            let ping_due = self.ping_due();
            if self.batch.is_empty() && !ping_due {
                self.outbox.take(&mut self.batch, cx.waker());
                if self.batch.is_empty() {
                    break;
                }
            }
            let own_socket = self.outbox.socket().is_some();
            if own_socket && !ping_due && self.batch.front().is_some_and(is_large) {
                match self.poll_write_large(cx) {
                    Poll::Ready(Ok(payload)) => {
                        frames += 1;
                        bytes += payload as u64;
                        progress = true;
                        continue;
                    }
                    Poll::Ready(Err(ending)) => return Err(ending),
                    Poll::Pending => break,
                }
            }
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Err(Ending::Broken),
                Poll::Pending => break,
            }
            let frame = if ping_due {
                if let Phase::Open(open) = &mut self.phase {
                    open.ping_due = false;
                }
                Message::Ping(Bytes::new())
            } else {
                let Some(frame) = self.batch.pop_front() else {
                    break;
                };
                frames += 1;
                bytes += frame.len() as u64;
                frame
            };
            Pin::new(&mut self.ws)
                .start_send(frame)
                .map_err(|_| Ending::Broken)?;
            self.unflushed = true;
            progress = true;
        }
        if frames > 0 {
            self.metrics.ws_out.add(frames, bytes);
        }
        if self.unflushed {
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(_)) => return Err(Ending::Broken),
                Poll::Pending => {}
            }
        }
        Ok(progress)
    }

    /// Write the large frame at the front of the batch from its shared payload, not through
    /// tungstenite, which would copy it into its buffer and move the unsent rest down after
    /// every partial write. What tungstenite holds goes first. Ready with the payload's size
    /// once the frame is handed to the socket (its unsent end kept as the socket's tail);
    /// `Pending` while tungstenite's bytes or an earlier tail are still going out.
    fn poll_write_large(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Ending>> {
        if self.unflushed {
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Ending::Broken)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.tail {
            match self.poll_tail(cx) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(ending)) => return Poll::Ready(Err(ending)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let (Some(socket), Some(frame)) = (self.outbox.socket(), self.batch.front()) else {
            return Poll::Ready(Err(Ending::Broken));
        };
        let payload = frame.len();
        if !socket.set_tail_frame(frame) {
            return Poll::Ready(Err(Ending::Broken));
        }
        self.batch.pop_front();
        self.tail = true;
        if let Poll::Ready(Err(ending)) = self.poll_tail(cx) {
            return Poll::Ready(Err(ending));
        }
        Poll::Ready(Ok(payload))
    }

    /// Send the socket's tail (see the `tail` field); ready with whether there was one.
    fn poll_tail(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Ending>> {
        let Some(socket) = self.outbox.socket() else {
            self.tail = false;
            return Poll::Ready(Ok(false));
        };
        match socket.poll_write_tail(cx) {
            Poll::Ready(Ok(())) => {
                self.tail = false;
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(Ending::Broken)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Read what the client sent: publish it (all that one read brought, as one batch), or
    /// discard it.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Result<bool, Ending> {
        let read = self.read_frames(cx);
        // However reading ended, what was taken off the socket goes to Redis now.
        self.inbound.send();
        read
    }

    fn read_frames(&mut self, cx: &mut Context<'_>) -> Result<bool, Ending> {
        let mut progress = false;
        // Where this read's small messages are copied to (see [`SMALL_MESSAGE`]); dropped at
        // the end of the read, so a quiet connection holds none of it.
        let mut arena = BytesMut::new();
        if self.read_idle {
            // Registers the task for the socket's readability, as the read did.
            let quiet = self
                .outbox
                .socket()
                .map(|socket| socket.poll_read_ready(cx));
            if matches!(quiet, Some(Poll::Pending)) {
                return Ok(false);
            }
            self.read_idle = false;
        }
        for _ in 0..READ_BUDGET {
            // The rate first: it settles what it is owed even while the window is full, so
            // no passed deadline of its stays armed.
            if !self.may_read() || self.inbound.is_full() {
                break;
            }
            let frame = match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Pending => {
                    self.read_idle = true;
                    break;
                }
                Poll::Ready(None) => return Err(Ending::ClientClosed),
                Poll::Ready(Some(Err(e))) => {
                    let in_close = self.ws.get_ref().watch().closed();
                    return Err(ending_of(e, self.settings.max_message_bytes, in_close));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            if let Phase::Open(open) = &mut self.phase {
                open.last_heard = Instant::now();
            }
            progress = true;
            match frame {
                Message::Text(_) | Message::Binary(_) if self.settings.refuse_data => {
                    return Err(Ending::NotAllowed)
                }
                Message::Text(text) => self.accept(own(Bytes::from(text), &mut arena)),
                Message::Binary(data) => self.accept(own(data, &mut arena)),
                Message::Close(_) => return Err(Ending::ClientClosed),
                // tungstenite queued a pong: make sure a flush sends it.
                Message::Ping(_) => self.unflushed = true,
                Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        Ok(progress)
    }

    fn accept(&mut self, payload: Bytes) {
        self.inbound.push(payload);
        if let Phase::Open(Open {
            throttle: Some(throttle),
            ..
        }) = &mut self.phase
        {
            throttle.took_one();
        }
    }

    /// Whether the publish rate lets the session read now (always without one).
    fn may_read(&mut self) -> bool {
        match &mut self.phase {
            Phase::Open(Open {
                throttle: Some(throttle),
                ..
            }) => throttle.may_read(),
            _ => true,
        }
    }

    /// Send what is queued (acks of publishes Redis accepted among it) and then the close
    /// frame that says why, wait for the client's answer, all within the close timeout.
    async fn close(&mut self, ending: Ending) -> Ending {
        let close_timeout = self.settings.handshake_timeout;
        let closing = async {
            let ws = &mut self.ws;
            let outbox = &self.outbox;
            if ending.can_write() {
                // The batch first, then what is still queued: `take_now` swaps its queue with
                // the deque it is given, so it gets an empty one (given the batch, it kept the
                // batch's frames and they were never written: a capped socket buffer left
                // more of them there at shutdown).
                let mut rest = std::mem::take(&mut self.batch);
                let mut queued = VecDeque::new();
                outbox.take_now(&mut queued);
                rest.append(&mut queued);
                for frame in rest {
                    match outbox.socket().filter(|_| is_large(&frame)) {
                        // As in `poll_write_large`: larger than tungstenite's buffer may hold.
                        Some(socket) => {
                            ws.flush().await?;
                            socket.set_tail_frame(&frame);
                            std::future::poll_fn(|cx| socket.poll_write_tail(cx)).await?;
                        }
                        None => ws.feed(frame).await?,
                    }
                }
            }
            if let Some(frame) = ending.close_frame() {
                ws.send(Message::Close(Some(frame))).await?;
                // Wait for the client's answering close frame so the TCP close is clean; but
                // not through tungstenite for an unfinished message it would go on collecting.
                if !matches!(ending, Ending::Unfinished(_) | Ending::Busy(_)) {
                    while let Some(Ok(frame)) = ws.next().await {
                        if matches!(frame, Message::Close(_)) {
                            break;
                        }
                    }
                }
                // tungstenite stopped reading (the client broke the protocol or sent too
                // much): closing with unread bytes would reset the connection, and the client
                // could lose the close frame. Read what it still sends, up to its close frame.
                if !ws.get_ref().watch().closed() {
                    // Boxed: its timer would otherwise enlarge every connection's task.
                    let draining = Box::pin(tokio::time::timeout(DRAIN_TIME, drain(ws.get_mut())));
                    let _ = draining.await;
                }
            } else {
                ws.flush().await?;
            }
            Ok::<(), tungstenite::Error>(())
        };
        let _ = tokio::time::timeout(close_timeout, closing).await;
        ending
    }
}

impl<S, I> Drop for Connection<S, I> {
    fn drop(&mut self) {
        // However the task ends, the hub writes no more into this socket.
        self.outbox.withdraw();
        if self.held > 0 {
            UNFINISHED.fetch_sub(self.held, Ordering::Relaxed);
        }
    }
}

/// Read and discard what the client sends until its close frame, the end of the stream or
/// [`DRAIN_BYTES`]; one buffer, allocated only here.
async fn drain<S: AsyncRead + Unpin>(stream: &mut Watched<S>) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    let mut read = 0;
    while read < DRAIN_BYTES && !stream.watch().closed() {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n,
        }
    }
}

/// A data frame larger than tungstenite's write buffer (16 KiB): a session with a socket of
/// its own writes it from its payload itself.
fn is_large(frame: &Message) -> bool {
    matches!(frame, Message::Binary(_) | Message::Text(_)) && frame.len() > LARGE_FRAME
}

/// Larger than tungstenite's write buffer: written by the session from its payload.
const LARGE_FRAME: usize = super::write::socket::WRITE_BUFFER;

/// The ending a read error means; `in_close`: a close frame was among what was read.
fn ending_of(error: tungstenite::Error, max_message_bytes: usize, in_close: bool) -> Ending {
    use tungstenite::error::{CapacityError, Error as E, ProtocolError};
    match error {
        E::Capacity(CapacityError::MessageTooLong { .. }) => Ending::TooBig(max_message_bytes),
        E::Capacity(e) => Ending::Protocol(CloseCode::Size, e.to_string()),
        // A TCP connection that ends without a close frame is broken, not a protocol error.
        E::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Ending::Broken,
        E::Protocol(e) => Ending::Protocol(CloseCode::Protocol, e.to_string()),
        // tungstenite says the same for a text message and a close frame's reason. (A text
        // frame read in the same read as a close frame behind it is taken for the latter.)
        E::Utf8(_) if in_close => {
            Ending::Protocol(CloseCode::Invalid, "close reason is not valid UTF-8".into())
        }
        E::Utf8(_) => Ending::Protocol(CloseCode::Invalid, "text frame is not valid UTF-8".into()),
        _ => Ending::Broken,
    }
}

#[cfg(test)]
mod tests {
    //! A session's phases over an in-memory stream, in paused time: every deadline is met
    //! exactly, and no timer of the open phase is left once it ended.

    use super::*;
    use crate::server::config::SlowConsumer;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::DuplexStream;
    use tokio::task::JoinHandle;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::Role;

    const PING: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(30);
    const HANDSHAKE: Duration = Duration::from_secs(5);

    /// A small message kept for Redis no longer holds tungstenite's read buffer, which can
    /// then be reused in place for the next frames; a large one is kept as it is (its frame
    /// had a buffer of its own).
    #[test]
    fn a_small_message_kept_for_redis_leaves_the_read_buffer_free() {
        // tungstenite's buffer after a read: a payload split off the front, the rest behind.
        let mut read = BytesMut::with_capacity(256);
        read.extend_from_slice(&[7; 250]);
        let mut arena = BytesMut::new();
        let mut kept = Vec::new();
        for _ in 0..2 {
            let payload = read.split_to(100).freeze();
            kept.push(own(payload.clone(), &mut arena));
            assert_eq!(kept.last(), Some(&payload));
        }
        // The next frame's header says 100 bytes: its 50 read so far move to the front.
        assert!(
            read.try_reclaim(100),
            "the read buffer is shared with no payload: reused without an allocation"
        );
        let second = own(Bytes::from_static(&[1; 40]), &mut arena);
        assert_eq!(&second[..], &[1; 40]);
        assert_eq!(
            &kept[1][..],
            &[7; 100],
            "the arena's earlier messages are intact"
        );

        let large = Bytes::from(vec![3; SMALL_MESSAGE + 1]);
        let ptr = large.as_ptr();
        assert_eq!(
            own(large, &mut arena).as_ptr(),
            ptr,
            "a large message is not copied"
        );
    }

    fn settings(ping_interval: Duration) -> SessionSettings {
        SessionSettings {
            ping_interval,
            idle_timeout: IDLE,
            handshake_timeout: HANDSHAKE,
            max_message_bytes: 1 << 20,
            ack: false,
            expires: None,
            refuse_data: false,
        }
    }

    type Client = WebSocketStream<DuplexStream>;

    /// A session over one end of an in-memory stream, and a client on the other.
    async fn open_session<I: Inbound + Send + 'static>(
        settings: SessionSettings,
        inbound: I,
    ) -> (JoinHandle<Ending>, Client) {
        let (server, client) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(Watched::new(server), Role::Server, None);
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None);
        let (server, client) = tokio::join!(server, client);
        let outbox = Arc::new(Outbox::new(
            crate::server::write::outbox::Limits::messages(16),
            SlowConsumer::Close,
        ));
        let session = run(
            server,
            outbox,
            inbound,
            None,
            settings,
            CancellationToken::new(),
            Metrics::new(),
        );
        (tokio::spawn(session), client)
    }

    /// The next frame the client reads (reading answers pings).
    async fn next(client: &mut Client) -> Message {
        client.next().await.expect("ended").expect("error")
    }

    fn discard() -> Option<crate::publish::window::OnDemand> {
        None
    }

    #[tokio::test(start_paused = true)]
    async fn pings_go_out_at_the_ping_interval() {
        let start = Instant::now();
        let (_session, mut client) = open_session(settings(PING), discard()).await;
        for n in 1..=3 {
            assert!(matches!(next(&mut client).await, Message::Ping(_)));
            assert_eq!(start.elapsed(), PING * n);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_with_1001_at_the_idle_deadline() {
        let start = Instant::now();
        // No ping before the idle timeout: nothing makes the client answer.
        let (session, mut client) = open_session(settings(IDLE * 2), discard()).await;
        let Message::Close(Some(close)) = next(&mut client).await else {
            panic!("expected a close frame");
        };
        assert_eq!(start.elapsed(), IDLE);
        assert_eq!(close.code, CloseCode::Away);
        assert_eq!(close.reason.as_str(), "idle timeout");
        assert!(matches!(session.await.unwrap(), Ending::IdleTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_closed_with_1008_at_its_tokens_expiry() {
        let start = Instant::now();
        let expiry = Duration::from_secs(25);
        let mut settings = settings(PING);
        settings.expires = Some(start + expiry);
        let (session, mut client) = open_session(settings, discard()).await;
        // Pings keep coming (and are answered) until the expiry, which falls between two.
        let close = loop {
            match next(&mut client).await {
                Message::Ping(_) => continue,
                Message::Close(Some(close)) => break close,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(start.elapsed(), expiry);
        assert_eq!(close.code, CloseCode::Policy);
        assert_eq!(close.reason.as_str(), "token expired");
        assert!(matches!(session.await.unwrap(), Ending::TokenExpired));
    }

    #[tokio::test(start_paused = true)]
    async fn a_data_frame_is_refused_with_1008_when_the_token_may_not_publish() {
        let mut settings = settings(PING);
        settings.refuse_data = true;
        let (session, mut client) = open_session(settings, discard()).await;
        client.send(Message::text("hello")).await.unwrap();
        let Message::Close(Some(close)) = next(&mut client).await else {
            panic!("expected a close frame");
        };
        assert_eq!(close.code, CloseCode::Policy);
        assert!(matches!(session.await.unwrap(), Ending::NotAllowed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_begun_and_not_finished_is_closed_at_the_handshake_timeout() {
        let (session, mut client) = open_session(settings(PING), discard()).await;
        let fragment = Frame::message(
            Bytes::from_static(b"the start"),
            OpCode::Data(Data::Text),
            false,
        );
        client.send(Message::Frame(fragment)).await.unwrap();
        let sent = Instant::now();
        let Message::Close(Some(close)) = next(&mut client).await else {
            panic!("expected a close frame");
        };
        assert_eq!(sent.elapsed(), HANDSHAKE);
        assert_eq!(close.code, CloseCode::Policy);
        assert!(matches!(session.await.unwrap(), Ending::Unfinished(_)));
    }

    /// Publishes that never complete (Redis stalled), the window full, until a deadline.
    struct Stalled {
        polls: Arc<AtomicUsize>,
        deadline: Instant,
    }

    impl Inbound for Stalled {
        fn push(&mut self, _payload: Bytes) {}
        fn send(&mut self) {}
        fn is_full(&self) -> bool {
            true
        }
        fn is_empty(&self) -> bool {
            false
        }
        fn poll_next(&mut self, _cx: &mut Context<'_>) -> Poll<Result<i64, String>> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            Poll::Pending
        }
        fn deadline(&self) -> Option<Instant> {
            Some(self.deadline)
        }
        fn time_out(&mut self) -> String {
            "redis stalled".into()
        }
        fn release_if_idle(&mut self) {}
    }

    /// Once the open phase ended (idle timeout), only the publishes' deadline is left: the
    /// session sleeps until it instead of waking on the idle deadline it passed.
    #[tokio::test(start_paused = true)]
    async fn no_timer_of_the_open_phase_is_left_while_draining() {
        let start = Instant::now();
        let polls = Arc::new(AtomicUsize::new(0));
        let stalled = Stalled {
            polls: polls.clone(),
            deadline: start + IDLE * 3,
        };
        let (session, mut client) = open_session(settings(IDLE * 4), stalled).await;
        // Moved by hand: a spinning session would keep paused time from moving on its own.
        tokio::time::advance(IDLE + Duration::from_secs(1)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // Draining now. Let the session run if anything woke it: nothing should have.
        let before = polls.load(Ordering::Relaxed);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let woken = polls.load(Ordering::Relaxed) - before;
        assert!(woken < 5, "a draining session was polled {woken} times");

        let Message::Close(Some(close)) = next(&mut client).await else {
            panic!("expected a close frame");
        };
        assert_eq!(start.elapsed(), IDLE * 3);
        assert_eq!(close.code, CloseCode::Again);
        assert!(matches!(
            session.await.unwrap(),
            Ending::RedisUnavailable(_)
        ));
    }
}
