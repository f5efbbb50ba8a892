//! The outbox: one client's bounded queue of frames waiting to be written (SPEC §4).
//!
//! Owns: the `--client-queue` bound and the `--slow-consumer close|skip` policy, applied at
//! push time so that a client that stopped reading can never grow the server's memory.
//! Frames are `tungstenite::Message`s whose payloads are shared `Bytes`: pushing the same
//! frame to a thousand outboxes copies no payload.
//! Must not: await, write to sockets, or know about channels; the hub pushes, the client's
//! session takes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use std::task::Waker;

use futures_util::task::AtomicWaker;
use tokio_tungstenite::tungstenite::Message;

use crate::config::SlowConsumer;

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
}

#[derive(Default)]
struct State {
    frames: VecDeque<Message>,
    bytes: usize,
}

impl Outbox {
    pub fn new(capacity: usize, policy: SlowConsumer) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            overflowed: AtomicBool::new(false),
            capacity: capacity.max(1),
            policy,
        }
    }

    pub fn push(&self, frame: Message) -> Pushed {
        let mut state = self.lock();
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
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
