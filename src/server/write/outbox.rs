//! The outbox: one client's bounded queue of frames waiting to be written (SPEC §4).
//!
//! Owns: the judgement of a slow consumer and the `--slow-consumer close|skip` policy,
//! applied at push time so that a client that stopped reading can never grow the server's
//! memory ([`Limits`]). A client is slow when what it has queued stays above
//! `--client-queue-bytes` for `--slow-consumer-grace` while its socket takes nothing, or at
//! once past the memory ceiling (4 × `--client-queue-bytes`, or `--client-queue` messages).
//! A burst that a reading client takes in milliseconds never makes it slow.
//! Frames are `tungstenite::Message`s whose payloads are shared `Bytes`: pushing the same
//! frame to a thousand outboxes copies no payload.
//!
//! Owns too: who may write to a subscriber's socket. While the session is busy (its task is
//! running, frames are queued, tungstenite holds unsent bytes) only the session writes. When
//! it goes idle with nothing queued it *lends* the socket to the outbox, and the hub then
//! writes each new frame straight into the socket (one non-blocking write, no queue, no task
//! wake-up: at a light rate that wake-up was a third of the CPU per delivery). The session
//! takes the socket back at the start of its next poll. A write the socket does not take
//! whole is queued (or its unsent tail kept by the [`Socket`], which sends it before any
//! other byte) and the session is woken to finish it; a frame
//! is never split between two writers, and frames reach the socket in the order pushed.
//! Must not: await, block on a socket, or know about channels; the hub pushes, the client's
//! session takes.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio_tungstenite::tungstenite::Message;

use super::batch;
use super::socket::{EncodedFrame, Socket};
use crate::server::config::SlowConsumer;

/// What a push did, so the pusher can count losses.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// `skip` policy: this many older frames were dropped to make room for the newest.
    Skipped(usize),
    /// `close` policy: the queue overflowed now; this many frames were discarded with it.
    Overflowed(usize),
    /// The outbox was already closed; the frame was not queued.
    Closed,
    /// Written straight into the idle client's socket (see [`DirectWrites`]).
    Written,
}

/// What a client may hold before it is judged slow.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Memory ceiling in messages: past it, slow at once.
    pub messages: usize,
    /// Over this many queued bytes (see [`OVERHEAD`]) for `grace`, with the socket full: slow.
    pub soft_bytes: usize,
    /// Memory ceiling in bytes: past it, slow at once.
    pub hard_bytes: usize,
    pub grace: Duration,
}

impl Limits {
    /// From the subscribe server's flags: the hard ceiling is 4 × the soft bound (Redis's own
    /// pub/sub client limits are 8 MB soft over 60 s, 32 MB hard).
    pub(crate) fn new(messages: usize, soft_bytes: usize, grace: Duration) -> Self {
        Limits {
            messages: messages.max(1),
            soft_bytes,
            hard_bytes: soft_bytes.saturating_mul(4),
            grace,
        }
    }

    /// A publisher's: its acks (at most `acks`) and its downlink messages (SPEC §10), at most
    /// [`DOWNLINK_QUEUE`] more and, all together, 4 × `max_message_bytes` (at least 1 MiB):
    /// a device that reads nothing is closed like any slow consumer, never a memory sink.
    pub(crate) fn publisher(acks: usize, max_message_bytes: usize) -> Self {
        Limits {
            messages: acks.saturating_add(DOWNLINK_QUEUE).max(1),
            soft_bytes: usize::MAX,
            hard_bytes: max_message_bytes.saturating_mul(4).max(1 << 20),
            grace: Duration::ZERO,
        }
    }

    /// A bound on messages alone: no byte or time judgement.
    #[cfg(test)]
    pub(crate) fn messages(messages: usize) -> Self {
        Limits {
            messages: messages.max(1),
            soft_bytes: usize::MAX,
            hard_bytes: usize::MAX,
            grace: Duration::ZERO,
        }
    }
}

/// How many downlink messages a publisher's outbox holds beyond its acks.
pub(crate) const DOWNLINK_QUEUE: usize = 64;

/// What one queued message costs beyond its payload (its slot and `Bytes` handle), counted
/// so that a flood of empty messages is bounded like one of large ones.
pub(crate) const OVERHEAD: usize = 64;

pub struct Outbox {
    state: Mutex<State>,
    /// The session's task: woken when the queue goes from empty to non-empty, or overflows.
    /// (One waker, no future to store: an idle connection costs a few bytes here.)
    waker: AtomicWaker,
    /// Set once, under the state lock, when the `close` policy gives up on this client.
    overflowed: AtomicBool,
    /// The session found the socket full at its last write (it holds frames it could not
    /// hand to the socket): the client is not taking what it is sent.
    blocked: AtomicBool,
    limits: Limits,
    policy: SlowConsumer,
    /// The client's socket, for direct writes while the session lends it (unset: never).
    /// Set once, after the upgrade: a subscriber joins the hub before its 101.
    socket: OnceLock<Socket>,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Message>,
    /// Payload bytes queued plus [`OVERHEAD`] per message.
    bytes: usize,
    /// Since when `bytes` is above the soft bound (reset when the session takes the queue).
    over_since: Option<Instant>,
    /// The session is idle with nothing queued: the pusher may write into the socket.
    lent: bool,
}

impl Outbox {
    /// An outbox with no socket yet: what is pushed is queued for the session.
    pub fn new(limits: Limits, policy: SlowConsumer) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            overflowed: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            limits,
            policy,
            socket: OnceLock::new(),
        }
    }

    /// Give the outbox the client's socket, which its session may then lend for direct
    /// writes. Only before the session starts.
    pub fn set_socket(&self, socket: Socket) {
        let _ = self.socket.set(socket);
    }

    /// The session says whether the socket took everything it had (`false`) or left it
    /// holding frames (`true`).
    pub fn set_blocked(&self, blocked: bool) {
        if self.blocked.load(Ordering::Relaxed) != blocked {
            self.blocked.store(blocked, Ordering::Relaxed);
        }
    }

    /// The lent socket, held (this outbox locked) for one direct write of `frame`; if the
    /// session did not lend it, `frame` is queued like [`Outbox::push`] instead.
    fn hold_lent(&self, frame: &Message) -> Result<Lent<'_>, Pushed> {
        let state = self.lock();
        match (state.lent, self.socket.get()) {
            (true, Some(socket)) => {
                // `lent` implies an empty queue and no tail: the frame goes out in order.
                debug_assert!(
                    state.frames.is_empty() && !socket.has_tail(),
                    "a lent socket with frames queued or a tail"
                );
                Ok(Lent {
                    outbox: self,
                    state,
                    socket,
                })
            }
            _ => Err(self.push_locked(state, frame.clone())),
        }
    }

    /// The socket this outbox may write to directly, if any.
    pub fn socket(&self) -> Option<&Socket> {
        self.socket.get()
    }

    /// Lend the socket to pushers if nothing is queued; the session calls this when it goes
    /// idle and must not touch the socket until [`Outbox::take_back`]. Returns whether it did.
    pub fn lend(&self) -> bool {
        if self.socket.get().is_none() {
            return false;
        }
        let mut state = self.lock();
        state.lent = state.frames.is_empty()
            && !self.overflowed.load(Ordering::Acquire)
            && !self.socket.get().is_some_and(Socket::has_tail);
        state.lent
    }

    /// Take the socket back before writing or reading it: no direct write runs after this
    /// returns, and `waker` is woken by the next push. Returns whether a direct write left a
    /// tail in the socket (sent by the session's next write or flush).
    pub fn take_back(&self, waker: &Waker) -> bool {
        let Some(socket) = self.socket.get() else {
            return false;
        };
        // A direct write that left a tail woke (and so used up) the registered waker.
        self.waker.register(waker);
        self.withdraw();
        socket.has_tail()
    }

    /// End the loan, if any: no direct write runs after this returns.
    pub fn withdraw(&self) {
        if self.socket.get().is_some() {
            self.lock().lent = false;
        }
    }

    /// Queue `frame` for the session (which takes the socket back first, if it lent it).
    pub fn push(&self, frame: Message) -> Pushed {
        self.push_locked(self.lock(), frame)
    }

    fn push_locked(&self, mut state: MutexGuard<'_, State>, frame: Message) -> Pushed {
        // Once something is queued, no direct write may overtake it.
        state.lent = false;
        if self.overflowed.load(Ordering::Acquire) {
            return Pushed::Closed;
        }
        let was_empty = state.frames.is_empty();
        state.bytes += frame.len() + OVERHEAD;
        state.frames.push_back(frame);
        if self.is_slow(&mut state) {
            match self.policy {
                SlowConsumer::Skip => {
                    // Keep the newest: a dashboard wants the latest value, not every value.
                    let dropped = state.frames.len() - 1;
                    let newest = state.frames.pop_back();
                    state.frames.clear();
                    state.frames.extend(newest);
                    state.bytes = state.frames.iter().map(|f| f.len() + OVERHEAD).sum();
                    state.over_since = None;
                    return Pushed::Skipped(dropped);
                }
                SlowConsumer::Close => {
                    let dropped = state.frames.len() - 1;
                    state.frames = VecDeque::new();
                    state.bytes = 0;
                    state.over_since = None;
                    self.overflowed.store(true, Ordering::Release);
                    drop(state);
                    self.waker.wake();
                    return Pushed::Overflowed(dropped);
                }
            }
        }
        drop(state);
        if was_empty {
            self.waker.wake();
        }
        Pushed::Queued
    }

    /// Whether the client has fallen too far behind: past a memory ceiling, or over the soft
    /// bound for the grace time while its socket is full. The clock is read only over the
    /// soft bound.
    fn is_slow(&self, state: &mut State) -> bool {
        let limits = &self.limits;
        if state.frames.len() > limits.messages || state.bytes > limits.hard_bytes {
            return true;
        }
        if state.bytes <= limits.soft_bytes {
            return false;
        }
        let since = *state.over_since.get_or_insert_with(Instant::now);
        since.elapsed() >= limits.grace && self.blocked.load(Ordering::Relaxed)
    }

    /// Move every queued frame into `batch` (which must be empty) without waiting, and have
    /// `waker` woken when more arrive or the queue overflows.
    pub fn take(&self, batch: &mut VecDeque<Message>, waker: &Waker) {
        self.waker.register(waker);
        let mut state = self.lock();
        if !state.frames.is_empty() {
            std::mem::swap(&mut state.frames, batch);
            state.bytes = 0;
            state.over_since = None;
        }
    }

    /// Take what is queued without registering for more (flushing acks before a close).
    pub fn take_now(&self, batch: &mut VecDeque<Message>) {
        let mut state = self.lock();
        std::mem::swap(&mut state.frames, batch);
        state.bytes = 0;
        state.over_since = None;
    }

    /// Whether the queue overflowed under the `close` policy.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// (messages, payload bytes) waiting now.
    pub fn queued(&self) -> (usize, usize) {
        let state = self.lock();
        let messages = state.frames.len();
        (messages, state.bytes - messages * OVERHEAD)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is
        // a single push or swap), so a poisoned lock is still safe to use.
        crate::lock(&self.state)
    }
}

/// A lent socket held for one direct write: its outbox stays locked (no session can take
/// the socket back, no push can queue behind the write) until [`Lent::sent`].
struct Lent<'a> {
    outbox: &'a Outbox,
    state: MutexGuard<'a, State>,
    socket: &'a Socket,
}

impl Lent<'_> {
    /// What the socket's `send` of `frame` returned: written whole, written in part (the rest
    /// becomes the socket's tail and the session is woken to send it), or not at all (full,
    /// or broken: the session finds out when it reads), and then it is queued. A send whose
    /// outcome is unknown ([`batch::Unknown`]: the ring failed with it in flight) may still
    /// land in the stream: the socket is shut down instead, and the session ends the
    /// connection as broken, so the client reconnects rather than read a frame twice or cut.
    fn sent(self, frame: &Message, encoded: &EncodedFrame, sent: io::Result<usize>) -> Pushed {
        let Lent {
            outbox,
            mut state,
            socket,
        } = self;
        match sent {
            Ok(n) if socket.keep_rest(encoded, n) => Pushed::Written,
            Ok(_) => {
                state.lent = false;
                drop(state);
                outbox.waker.wake();
                Pushed::Written
            }
            Err(e) if batch::is_unknown(&e) => {
                socket.shut();
                state.lent = false;
                drop(state);
                outbox.waker.wake();
                Pushed::Closed
            }
            Err(_) => outbox.push_locked(state, frame.clone()),
        }
    }
}

/// One frame written straight into many lent sockets: up to [`batch::BATCH`] of them are
/// held at once and sent to in one system call ([`batch::send_all`]), or one `send` each
/// where the thread has no ring. An outbox whose socket is not lent gets the frame queued.
/// A frame is written only into a socket that is lent, so it never overtakes a queued one;
/// one the socket does not take whole is queued or left as the socket's tail, and the
/// session is woken to finish it. The outboxes held are released by [`DirectWrites::flush`]
/// (or the drop).
pub(crate) struct DirectWrites<'a> {
    frame: &'a Message,
    encoded: &'a EncodedFrame,
    held: Vec<Lent<'a>>,
    /// Outboxes pushed to since the first one held: a batch is sent after [`VISITS`] of them
    /// even if it is not full, so that an outbox is held for a bounded number of pushes.
    visited: usize,
    sent: Vec<io::Result<usize>>,
}

/// At most this many outboxes are pushed to while one is held for a batch.
const VISITS: usize = 2 * batch::BATCH;

impl<'a> DirectWrites<'a> {
    pub(crate) fn new(frame: &'a Message, encoded: &'a EncodedFrame) -> Self {
        batch::prepare();
        DirectWrites {
            frame,
            encoded,
            held: Vec::new(),
            visited: 0,
            sent: Vec::new(),
        }
    }

    /// Write the frame to `outbox`'s client (in this batch) or queue it; `done` hears what
    /// each push did, now for a queued frame, at the batch's flush for a written one.
    pub(crate) fn push(&mut self, outbox: &'a Outbox, done: &mut impl FnMut(Pushed)) {
        match outbox.hold_lent(self.frame) {
            Ok(lent) => self.held.push(lent),
            Err(pushed) => done(pushed),
        }
        if !self.held.is_empty() {
            self.visited += 1;
            if self.held.len() == batch::BATCH || self.visited == VISITS {
                self.flush(done);
            }
        }
    }

    /// Send to every socket held, then release their outboxes.
    pub(crate) fn flush(&mut self, done: &mut impl FnMut(Pushed)) {
        self.visited = 0;
        if self.held.is_empty() {
            return;
        }
        let fds: Vec<_> = self.held.iter().map(|lent| lent.socket.fd()).collect();
        let batched = fds.len() > 1 && batch::send_all(self.encoded.bytes(), &fds, &mut self.sent);
        drop(fds);
        for (i, lent) in self.held.drain(..).enumerate() {
            let sent = match batched {
                true => std::mem::replace(&mut self.sent[i], Ok(0)),
                false => lent.socket.send_frame(self.encoded),
            };
            done(lent.sent(self.frame, self.encoded, sent));
        }
    }
}

impl Drop for DirectWrites<'_> {
    /// A batch is always flushed by its owner; one dropped unflushed (a panic in the
    /// owner's loop) still sends what it holds, uncounted.
    fn drop(&mut self) {
        self.flush(&mut |_| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::text(s)
    }

    #[test]
    fn close_policy_overflows_once_and_refuses_more() {
        let outbox = Outbox::new(Limits::messages(2), SlowConsumer::Close);
        assert_eq!(outbox.push(text("a")), Pushed::Queued);
        assert_eq!(outbox.push(text("b")), Pushed::Queued);
        assert_eq!(outbox.push(text("c")), Pushed::Overflowed(2));
        assert_eq!(outbox.push(text("d")), Pushed::Closed);
        assert_eq!(outbox.queued(), (0, 0));
    }

    #[test]
    fn skip_policy_keeps_only_the_newest() {
        let outbox = Outbox::new(Limits::messages(2), SlowConsumer::Skip);
        outbox.push(text("a"));
        outbox.push(text("b"));
        assert_eq!(outbox.push(text("c")), Pushed::Skipped(2));
        assert_eq!(outbox.queued(), (1, 1));
        let mut batch = VecDeque::new();
        outbox.take(&mut batch, futures_util::task::noop_waker_ref());
        assert_eq!(batch, VecDeque::from([text("c")]));
    }

    /// 100-byte frames against a 1,000-byte soft bound and a 1 s grace.
    fn soft(policy: SlowConsumer) -> Outbox {
        let limits = Limits::new(1_000_000, 1_000, Duration::from_secs(1));
        Outbox::new(limits, policy)
    }

    fn frame() -> Message {
        Message::binary(vec![0u8; 100])
    }

    /// A burst over the soft bound is not slowness: the client has not had time to take it.
    #[test]
    fn a_burst_over_the_soft_bound_is_queued_while_the_grace_lasts() {
        let outbox = soft(SlowConsumer::Close);
        outbox.set_blocked(true);
        for _ in 0..24 {
            assert_eq!(outbox.push(frame()), Pushed::Queued);
        }
        assert!(!outbox.overflowed());
    }

    /// Past the grace, a client whose socket still takes what it is sent is not slow either.
    #[test]
    fn a_client_whose_socket_takes_frames_is_not_slow_after_the_grace() {
        let limits = Limits::new(1_000_000, 1_000, Duration::ZERO);
        let outbox = Outbox::new(limits, SlowConsumer::Close);
        outbox.set_blocked(false);
        for _ in 0..20 {
            assert_eq!(outbox.push(frame()), Pushed::Queued);
        }
        outbox.set_blocked(true);
        assert_eq!(outbox.push(frame()), Pushed::Overflowed(20));
    }

    /// Over the soft bound past the grace with a full socket: slow; `skip` keeps the newest
    /// and starts a new grace.
    #[test]
    fn skip_after_the_grace_keeps_the_newest_and_restarts_the_clock() {
        let limits = Limits::new(1_000_000, 1_000, Duration::ZERO);
        let outbox = Outbox::new(limits, SlowConsumer::Skip);
        outbox.set_blocked(true);
        // Six frames hold 984 bytes; the seventh goes over.
        for _ in 0..6 {
            assert_eq!(outbox.push(frame()), Pushed::Queued);
        }
        assert_eq!(outbox.push(frame()), Pushed::Skipped(6));
        assert_eq!(outbox.queued(), (1, 100));
    }

    /// The hard ceiling applies at once, whatever the grace and the socket.
    #[test]
    fn the_hard_ceiling_applies_at_once() {
        let outbox = soft(SlowConsumer::Close);
        outbox.set_blocked(false);
        // 4 × 1,000 bytes, at 164 bytes per frame (payload + overhead): the 25th is past it.
        for _ in 0..24 {
            assert_eq!(outbox.push(frame()), Pushed::Queued);
        }
        assert_eq!(outbox.push(frame()), Pushed::Overflowed(24));
    }

    /// A connected pair: the relay's side as a client [`Socket`], and the reader's side.
    async fn socket_pair(listener: &tokio::net::TcpListener) -> (Socket, tokio::net::TcpStream) {
        let reader = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        (Socket::new(stream), reader)
    }

    /// More lent sockets than one batch holds: each gets the frame once and whole; a socket
    /// not lent, or full, gets it queued instead, and then its session takes over; a written
    /// frame is counted once per socket.
    #[tokio::test]
    async fn direct_writes_in_batches_reach_every_lent_socket_and_queue_the_rest() {
        use tokio::io::AsyncReadExt;
        const CLIENTS: usize = 2 * batch::BATCH + 7;
        const NOT_LENT: usize = 5;
        const FULL: usize = batch::BATCH + 1;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut outboxes = Vec::new();
        let mut readers = Vec::new();
        for i in 0..CLIENTS {
            let (socket, reader) = socket_pair(&listener).await;
            if i == FULL {
                // Filled until it takes nothing, also once what was in flight has landed.
                let filler = EncodedFrame::of(&Message::binary(vec![0u8; 1 << 16])).unwrap();
                for _ in 0..2 {
                    while socket.send_frame(&filler).is_ok() {}
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let outbox = Outbox::new(Limits::messages(16), SlowConsumer::Close);
            outbox.set_socket(socket);
            if i != NOT_LENT {
                assert!(outbox.lend());
            }
            outboxes.push(outbox);
            readers.push(reader);
        }
        let message = Message::text("x".repeat(300));
        let encoded = EncodedFrame::of(&message).unwrap();
        let mut pushed = Vec::new();
        let mut writes = DirectWrites::new(&message, &encoded);
        for outbox in &outboxes {
            writes.push(outbox, &mut |p| pushed.push(p));
        }
        writes.flush(&mut |p| pushed.push(p));
        drop(writes);
        assert_eq!(pushed.len(), CLIENTS);
        let written = pushed.iter().filter(|p| **p == Pushed::Written).count();
        assert_eq!(written, CLIENTS - 2);
        for (i, (outbox, reader)) in outboxes.iter().zip(&mut readers).enumerate() {
            if i == NOT_LENT || i == FULL {
                assert_eq!(outbox.queued(), (1, 300), "client {i}");
                continue;
            }
            assert_eq!(outbox.queued(), (0, 0), "client {i}");
            let mut got = vec![0u8; encoded.len()];
            reader.read_exact(&mut got).await.unwrap();
            assert_eq!(got, encoded.as_bytes(), "client {i}");
            // Nothing more: the frame went once.
            let mut more = [0u8; 1];
            assert!(
                tokio::time::timeout(Duration::from_millis(20), reader.read(&mut more))
                    .await
                    .is_err(),
                "client {i} got more"
            );
        }
    }

    /// An outbox whose session lent it its socket, and the reader's side of that socket.
    async fn lent_outbox() -> (Outbox, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (socket, reader) = socket_pair(&listener).await;
        let outbox = Outbox::new(Limits::messages(16), SlowConsumer::Close);
        outbox.set_socket(socket);
        assert!(outbox.lend());
        (outbox, reader)
    }

    /// A send whose outcome the ring lost may still land: the socket is shut down (the client
    /// sees its connection end) and the frame is not queued to go a second time.
    #[tokio::test]
    async fn a_send_of_unknown_outcome_ends_the_connection_instead_of_queueing_the_frame() {
        use tokio::io::AsyncReadExt;
        let (outbox, mut reader) = lent_outbox().await;
        let message = Message::text("lost track");
        let encoded = EncodedFrame::of(&message).unwrap();
        let lent = outbox.hold_lent(&message).ok().unwrap();
        let pushed = lent.sent(&message, &encoded, Err(io::Error::other(batch::Unknown)));
        assert_eq!(pushed, Pushed::Closed);
        assert_eq!(outbox.queued(), (0, 0));
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest))
            .await
            .expect("the connection was not ended");
        assert!(read.is_ok() && rest.is_empty(), "{read:?} {rest:?}");
    }

    /// A lent socket is not held for the whole of a long fan-out in which few sockets are
    /// lent: its batch goes out after 64 outboxes, full or not.
    #[tokio::test]
    async fn a_batch_goes_out_after_a_bounded_number_of_outboxes() {
        use tokio::io::AsyncReadExt;
        let (lent, mut reader) = lent_outbox().await;
        let busy: Vec<_> = (0..VISITS)
            .map(|_| Outbox::new(Limits::messages(16), SlowConsumer::Close))
            .collect();
        let message = Message::text("soon");
        let encoded = EncodedFrame::of(&message).unwrap();
        let mut pushed = Vec::new();
        let mut writes = DirectWrites::new(&message, &encoded);
        writes.push(&lent, &mut |p| pushed.push(p));
        for outbox in &busy[..VISITS - 1] {
            writes.push(outbox, &mut |p| pushed.push(p));
        }
        // Not flushed by hand: the 64th outbox sent the batch.
        assert!(pushed.contains(&Pushed::Written), "{pushed:?}");
        let mut got = vec![0u8; encoded.len()];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(got, encoded.as_bytes());
        writes.push(&busy[VISITS - 1], &mut |p| pushed.push(p));
        writes.flush(&mut |p| pushed.push(p));
        assert_eq!(pushed.len(), VISITS + 1);
    }

    /// Taking the queue is catching up: the grace starts again.
    #[test]
    fn taking_the_queue_resets_the_grace() {
        let limits = Limits::new(1_000_000, 1_000, Duration::from_millis(50));
        let outbox = Outbox::new(limits, SlowConsumer::Close);
        outbox.set_blocked(true);
        for _ in 0..20 {
            outbox.push(frame());
        }
        let mut batch = VecDeque::new();
        outbox.take(&mut batch, futures_util::task::noop_waker_ref());
        std::thread::sleep(Duration::from_millis(60));
        for _ in 0..20 {
            assert_eq!(outbox.push(frame()), Pushed::Queued);
        }
    }
}
