//! The outbox: one client's bounded queue of frames waiting to be written (SPEC §4).
//!
//! Owns: the `--client-queue` bound and the `--slow-consumer close|skip` policy, applied at
//! push time so that a client that stopped reading can never grow the server's memory.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;

use futures_util::task::AtomicWaker;
use tokio_tungstenite::tungstenite::Message;

use crate::server::config::SlowConsumer;
use crate::server::socket::{EncodedFrame, Socket};

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
    /// Written straight into the idle client's socket (see [`Outbox::push_or_write`]).
    Written,
}

pub struct Outbox {
    state: Mutex<State>,
    /// The session's task: woken when the queue goes from empty to non-empty, or overflows.
    /// (One waker, no future to store: an idle connection costs a few bytes here.)
    waker: AtomicWaker,
    /// Set once, under the state lock, when the `close` policy gives up on this client.
    overflowed: AtomicBool,
    capacity: usize,
    policy: SlowConsumer,
    /// The client's socket, for direct writes while the session lends it (`None`: never).
    socket: Option<Socket>,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Message>,
    bytes: usize,
    /// The session is idle with nothing queued: the pusher may write into the socket.
    lent: bool,
}

impl Outbox {
    pub fn new(capacity: usize, policy: SlowConsumer) -> Self {
        Self::with_socket(capacity, policy, None)
    }

    /// An outbox whose session may lend it `socket` for direct writes.
    pub fn with_socket(capacity: usize, policy: SlowConsumer, socket: Option<Socket>) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            overflowed: AtomicBool::new(false),
            capacity: capacity.max(1),
            policy,
            socket,
        }
    }

    /// Write `frame` (whose wire form is `encoded`) into the client's socket if the session
    /// lent it and nothing is queued; otherwise (or if the socket takes none of it) queue it
    /// like [`Outbox::push`]. A partial write leaves its tail in the socket and wakes the
    /// session to send it.
    pub fn push_or_write(&self, frame: &Message, encoded: &EncodedFrame) -> Pushed {
        let mut state = self.lock();
        if let (true, Some(socket)) = (state.lent, &self.socket) {
            // `lent` implies an empty queue and no tail: the frame goes out in order.
            match socket.try_write_frame(encoded) {
                Ok(true) => return Pushed::Written,
                Ok(false) => {
                    state.lent = false;
                    drop(state);
                    self.waker.wake();
                    return Pushed::Written;
                }
                // Full (or broken: the session finds out when it reads): queue it.
                Err(_) => {}
            }
        }
        self.push_locked(state, frame.clone())
    }

    /// The socket this outbox may write to directly, if any.
    pub fn socket(&self) -> Option<&Socket> {
        self.socket.as_ref()
    }

    /// Lend the socket to pushers if nothing is queued; the session calls this when it goes
    /// idle and must not touch the socket until [`Outbox::take_back`]. Returns whether it did.
    pub fn lend(&self) -> bool {
        if self.socket.is_none() {
            return false;
        }
        let mut state = self.lock();
        state.lent = state.frames.is_empty()
            && !self.overflowed.load(Ordering::Acquire)
            && !self.socket.as_ref().is_some_and(Socket::has_tail);
        state.lent
    }

    /// Take the socket back before writing or reading it: no direct write runs after this
    /// returns, and `waker` is woken by the next push. Returns whether a direct write left a
    /// tail in the socket (sent by the session's next write or flush).
    pub fn take_back(&self, waker: &Waker) -> bool {
        let Some(socket) = &self.socket else {
            return false;
        };
        // A direct write that left a tail woke (and so used up) the registered waker.
        self.waker.register(waker);
        self.withdraw();
        socket.has_tail()
    }

    /// End the loan, if any: no direct write runs after this returns.
    pub fn withdraw(&self) {
        if self.socket.is_some() {
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
        let mut result = Pushed::Queued;
        if state.frames.len() >= self.capacity {
            let dropped = state.frames.len();
            state.frames.clear();
            state.bytes = 0;
            match self.policy {
                SlowConsumer::Skip => result = Pushed::Skipped(dropped),
                SlowConsumer::Close => {
                    self.overflowed.store(true, Ordering::Release);
                    drop(state);
                    self.waker.wake();
                    return Pushed::Overflowed(dropped);
                }
            }
        }
        let was_empty = state.frames.is_empty();
        state.bytes += frame.len();
        state.frames.push_back(frame);
        drop(state);
        if was_empty {
            self.waker.wake();
        }
        result
    }

    /// Move every queued frame into `batch` (which must be empty) without waiting, and have
    /// `waker` woken when more arrive or the queue overflows.
    pub fn take(&self, batch: &mut VecDeque<Message>, waker: &Waker) {
        self.waker.register(waker);
        let mut state = self.lock();
        if !state.frames.is_empty() {
            std::mem::swap(&mut state.frames, batch);
            state.bytes = 0;
        }
    }

    /// Take what is queued without registering for more (flushing acks before a close).
    pub fn take_now(&self, batch: &mut VecDeque<Message>) {
        let mut state = self.lock();
        std::mem::swap(&mut state.frames, batch);
        state.bytes = 0;
    }

    /// Whether the queue overflowed under the `close` policy.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// (messages, payload bytes) waiting now.
    pub fn queued(&self) -> (usize, usize) {
        let state = self.lock();
        (state.frames.len(), state.bytes)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is
        // a single push or swap), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        let outbox = Outbox::new(2, SlowConsumer::Close);
        assert_eq!(outbox.push(text("a")), Pushed::Queued);
        assert_eq!(outbox.push(text("b")), Pushed::Queued);
        assert_eq!(outbox.push(text("c")), Pushed::Overflowed(2));
        assert_eq!(outbox.push(text("d")), Pushed::Closed);
        assert_eq!(outbox.queued(), (0, 0));
    }

    #[test]
    fn skip_policy_keeps_only_the_newest() {
        let outbox = Outbox::new(2, SlowConsumer::Skip);
        outbox.push(text("a"));
        outbox.push(text("b"));
        assert_eq!(outbox.push(text("c")), Pushed::Skipped(2));
        assert_eq!(outbox.queued(), (1, 1));
        let mut batch = VecDeque::new();
        outbox.take(&mut batch, futures_util::task::noop_waker_ref());
        assert_eq!(batch, VecDeque::from([text("c")]));
    }
}
