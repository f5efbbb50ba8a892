//! The hub: which clients of this process listen to which Redis channel (SPEC §4).
//!
//! Owns: the map topic → subscribers, the one Redis subscription per topic per process
//! (first client in SUBSCRIBEs, last one out UNSUBSCRIBEs), and fan-out: a message from Redis
//! becomes one frame, built once, pushed to every subscriber's [`Outbox`]. When the hub has
//! caught up with Redis (no other message waiting), the frame is also encoded once and
//! written straight into the socket of each subscriber whose session is idle: at a light
//! rate that spares a task wake-up and poll per delivery. When messages wait, they are only
//! queued, so busy sessions write many frames per call and the hub keeps up.
//!
//! Invariants:
//! - The hub's lock is a plain mutex, never held across an await. Joining and leaving only
//!   mark a topic *dirty*; a single reconciler task compares "has subscribers" with "is
//!   subscribed in Redis" and issues SUBSCRIBE/UNSUBSCRIBE one at a time. A client that joins
//!   while an UNSUBSCRIBE of its topic is in flight marks it dirty again, so the reconciler
//!   subscribes it right after: it always ends up subscribed.
//! - A topic is *active* once Redis has confirmed its SUBSCRIBE (a PING on the subscriber
//!   connection answered after it: Redis runs a connection's commands in order). Every
//!   reconnect of the subscriber makes every topic inactive and re-subscribes them all; the
//!   time each spent unsubscribed is logged and counted (`lightrelay_resubscribed_total`,
//!   `lightrelay_unsubscribed_seconds`). New clients can wait for activity
//!   ([`Hub::wait_active`]) so that what is published after their 101 reaches them.
//! - Messages are read from fred's broadcast channel as fast as they come; when the hub falls
//!   behind, fred overwrites the oldest and the loss is counted (`redis_lagged`), never silent,
//!   and the loop goes on.
//!
//! - Fan-out works on a snapshot of the topic's subscribers (an `Arc`, copied on write by
//!   joins and leaves), so the hub's lock is not held while it writes to sockets.
//!
//! Must not: block on a client (direct writes never wait; a full socket means the frame is
//! queued); a slow client only fills its own outbox.
//! Room left: `Topic` is where pattern (PSUBSCRIBE) and sharded (SSUBSCRIBE) topics go.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::interfaces::ClientLike;
use tokio::time::Instant;

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::interfaces::{EventInterface, PubsubInterface};
use fred::types::Value;
use slab::Slab;
use tokio::runtime::Handle;
use tokio::sync::{broadcast::error::RecvError, Notify};
use tokio_tungstenite::tungstenite::{protocol::frame::Utf8Bytes, Message};
use tokio_util::sync::CancellationToken;

use crate::server::channel::ChannelName;
use crate::server::metrics::{DropReason, Metrics};
use crate::server::write::outbox::{Outbox, Pushed};
use crate::server::write::socket::EncodedFrame;

/// What a client listens to. Today a plain channel; patterns and shard channels come later.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    Channel(ChannelName),
}

pub struct Hub {
    state: Mutex<State>,
    dirty: Notify,
    /// Notified (all waiters) whenever topics become active.
    activated: Notify,
    metrics: Metrics,
}

#[derive(Default)]
struct State {
    topics: HashMap<Topic, Entry>,
    dirty: HashSet<Topic>,
}

#[derive(Default)]
struct Entry {
    /// Copied on write: a fan-out in progress keeps its snapshot, joins and leaves copy.
    subscribers: Arc<Slab<Arc<Outbox>>>,
    /// Redis confirmed the subscription (and it was not lost since).
    active: bool,
}

/// A client's place in the hub; leaving is dropping it.
pub struct Membership {
    hub: Arc<Hub>,
    topic: Topic,
    key: usize,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.topic, self.key);
    }
}

impl Hub {
    pub fn new(metrics: Metrics) -> Arc<Self> {
        Arc::new(Hub {
            state: Mutex::new(State::default()),
            dirty: Notify::new(),
            activated: Notify::new(),
            metrics,
        })
    }

    /// Add a client to a topic; the topic is subscribed in Redis if it was not already.
    pub fn join(self: &Arc<Self>, topic: Topic, outbox: Arc<Outbox>) -> Membership {
        let mut state = self.lock();
        let entry = state.topics.entry(topic.clone()).or_default();
        let subscribers = Arc::make_mut(&mut entry.subscribers);
        let key = subscribers.insert(outbox);
        if subscribers.len() == 1 {
            state.dirty.insert(topic.clone());
            drop(state);
            self.dirty.notify_one();
        }
        Membership {
            hub: Arc::clone(self),
            topic,
            key,
        }
    }

    fn leave(&self, topic: &Topic, key: usize) {
        let mut state = self.lock();
        let Some(entry) = state.topics.get_mut(topic) else {
            return;
        };
        let subscribers = Arc::make_mut(&mut entry.subscribers);
        subscribers.try_remove(key);
        if subscribers.is_empty() {
            state.topics.remove(topic);
            state.dirty.insert(topic.clone());
            drop(state);
            self.dirty.notify_one();
        }
    }

    /// Push one message to every subscriber of `topic`; with `direct`, write it into the
    /// sockets of idle subscribers instead. With `helper` (the connections' runtime) and a
    /// large topic, half of the direct writes run there while the hub does the other half,
    /// and both halves are done before this returns, so the next message cannot overtake.
    /// Returns how many subscribers received it.
    pub async fn publish_local(
        &self,
        topic: &Topic,
        frame: Message,
        direct: bool,
        helper: Option<&Handle>,
    ) -> usize {
        let Some(subscribers) = self.lock().topics.get(topic).map(|e| e.subscribers.clone()) else {
            return 0;
        };
        // Large frames always go through the sessions: a megabyte copied into a thousand
        // sockets is work to spread over the runtime's threads, not to do on the hub's.
        let encoded = (direct && frame.len() <= DIRECT_MAX)
            .then(|| EncodedFrame::of(&frame))
            .flatten();
        let tally = match (encoded, helper) {
            (Some(encoded), Some(helper)) if subscribers.len() >= SPLIT_AT => {
                let encoded = Arc::new(encoded);
                // Whoever claims the odd half writes it: the helper task if a worker runs it
                // soon, else the hub itself once its own half is done (a busy runtime must
                // not keep the hub from reading Redis).
                let claimed = Arc::new(AtomicBool::new(false));
                let theirs = helper.spawn({
                    let (subscribers, frame, encoded, claimed) = (
                        subscribers.clone(),
                        frame.clone(),
                        encoded.clone(),
                        claimed.clone(),
                    );
                    async move {
                        (!claimed.swap(true, Ordering::AcqRel))
                            .then(|| fan_out(&subscribers, &frame, Some(&encoded), odd))
                    }
                });
                let mine = fan_out(&subscribers, &frame, Some(&encoded), |key| !odd(key));
                if claimed.swap(true, Ordering::AcqRel) {
                    // Claimed by the helper: wait for it, so the next message cannot overtake.
                    // (Once started it runs to the end: it has no await point.)
                    mine + theirs.await.ok().flatten().unwrap_or_default()
                } else {
                    mine + fan_out(&subscribers, &frame, Some(&encoded), odd)
                }
            }
            (encoded, _) => fan_out(&subscribers, &frame, encoded.as_ref(), |_| true),
        };
        if tally.written > 0 {
            let bytes = tally.written * frame.len() as u64;
            self.metrics.ws_out.add(tally.written, bytes);
            self.metrics.direct_writes.inc_by(tally.written);
        }
        self.metrics
            .dropped(DropReason::slow_consumer_skip, tally.skipped);
        self.metrics
            .dropped(DropReason::slow_consumer_close, tally.discarded);
        subscribers.len()
    }

    /// (topics, queued messages, queued bytes) across every client, for `/metrics`.
    pub fn stats(&self) -> (usize, usize, usize) {
        let state = self.lock();
        let (mut messages, mut bytes) = (0, 0);
        for entry in state.topics.values() {
            for (_, outbox) in entry.subscribers.iter() {
                let (m, b) = outbox.queued();
                messages += m;
                bytes += b;
            }
        }
        (state.topics.len(), messages, bytes)
    }

    /// Run the hub against Redis until shutdown: the reconciler and the message reader.
    /// `helper` is the runtime that may take half of a large direct fan-out (the connections'
    /// runtime, idle at the light rates where the hub writes directly).
    pub async fn run(
        self: Arc<Self>,
        redis: SubscriberClient,
        shutdown: CancellationToken,
        helper: Option<Handle>,
    ) {
        let reader = self.clone().read_messages(redis.clone(), helper);
        let reconciler = self.reconcile(redis);
        tokio::select! {
            () = reader => {},
            () = reconciler => {},
            () = shutdown.cancelled() => {},
        }
    }

    async fn read_messages(self: Arc<Self>, redis: SubscriberClient, helper: Option<Handle>) {
        let mut messages = redis.message_rx();
        loop {
            match messages.recv().await {
                Ok(message) => {
                    let Some(frame) = frame_of(message.value) else {
                        continue;
                    };
                    self.metrics.redis_in.add(1, frame.len() as u64);
                    let topic =
                        Topic::Channel(ChannelName::from_redis(message.channel.into_inner()));
                    // Caught up with Redis: write to idle subscribers directly. Behind: only
                    // queue, and let the sessions write their backlog in few calls.
                    let direct = messages.is_empty();
                    self.publish_local(&topic, frame, direct, helper.as_ref())
                        .await;
                }
                Err(RecvError::Lagged(n)) => {
                    self.metrics.dropped(DropReason::redis_lagged, n);
                    tracing::warn!(lost = n, "hub fell behind Redis; messages were dropped");
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Wait until Redis confirmed `topic`'s subscription, for at most `patience`; whether it
    /// did.
    pub async fn wait_active(&self, topic: &Topic, patience: Duration) -> bool {
        let waiting = async {
            loop {
                let activated = self.activated.notified();
                tokio::pin!(activated);
                // Registered before the check: an activation between the two is not missed.
                activated.as_mut().enable();
                match self.lock().topics.get(topic) {
                    Some(entry) if entry.active => return true,
                    Some(_) => {}
                    None => return false,
                }
                activated.await;
            }
        };
        tokio::time::timeout(patience, waiting)
            .await
            .unwrap_or(false)
    }

    /// Mark `topics` active (Redis confirmed them) and wake whoever waits for them.
    fn activate(&self, topics: &[Topic]) {
        let mut state = self.lock();
        for topic in topics {
            if let Some(entry) = state.topics.get_mut(topic) {
                entry.active = true;
            }
        }
        drop(state);
        self.activated.notify_waiters();
    }

    /// The subscriber connection was (re)established: every subscription must be made again.
    /// Returns the topics to re-subscribe.
    fn connection_reset(&self, subscribed: &mut HashSet<Topic>) -> usize {
        let mut state = self.lock();
        for entry in state.topics.values_mut() {
            entry.active = false;
        }
        let lost = subscribed.len();
        state.dirty.extend(subscribed.drain());
        lost
    }

    /// Bring Redis subscriptions in line with the hub, one command at a time; after every
    /// reconnect of the subscriber connection, subscribe everything again.
    async fn reconcile(&self, redis: SubscriberClient) {
        let mut subscribed: HashSet<Topic> = HashSet::new();
        let mut reconnects = redis.reconnect_rx();
        let mut errors = redis.error_rx();
        let mut recovery = Recovery::default();
        loop {
            use tokio::sync::broadcast::error::TryRecvError;
            while let Ok(_) | Err(TryRecvError::Lagged(_)) = errors.try_recv() {
                recovery.lost();
            }
            loop {
                match reconnects.try_recv() {
                    // A missed event is handled like one: subscribing again is harmless.
                    Ok(_) | Err(TryRecvError::Lagged(_)) => {
                        recovery.reconnected(self.connection_reset(&mut subscribed));
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return,
                }
            }
            let work: Vec<(Topic, bool)> = {
                let mut state = self.lock();
                let dirty: Vec<Topic> = state.dirty.drain().collect();
                dirty
                    .into_iter()
                    .map(|t| {
                        let wanted = state.topics.contains_key(&t);
                        (t, wanted)
                    })
                    .filter(|(t, wanted)| *wanted != subscribed.contains(t))
                    .collect()
            };
            if work.is_empty() {
                self.metrics.channels.set(subscribed.len() as i64);
                recovery.done(&self.metrics);
                tokio::select! {
                    () = self.dirty.notified() => {}
                    event = reconnects.recv() => match event {
                        Ok(_) | Err(RecvError::Lagged(_)) => {
                            recovery.reconnected(self.connection_reset(&mut subscribed));
                        }
                        Err(RecvError::Closed) => return,
                    },
                    event = errors.recv() => match event {
                        Ok(_) | Err(RecvError::Lagged(_)) => recovery.lost(),
                        Err(RecvError::Closed) => return,
                    },
                }
                continue;
            }
            let (joins, leaves): (Vec<_>, Vec<_>) =
                work.into_iter().partition(|(_, wanted)| *wanted);
            let joins: Vec<Topic> = joins.into_iter().map(|(t, _)| t).collect();
            let leaves: Vec<Topic> = leaves.into_iter().map(|(t, _)| t).collect();
            for (topics, subscribe) in [(joins, true), (leaves, false)] {
                if topics.is_empty() {
                    continue;
                }
                let names: Vec<Bytes> = topics
                    .iter()
                    .map(|Topic::Channel(c)| c.to_bytes())
                    .collect();
                let names: Vec<fred::types::Key> = names.into_iter().map(Into::into).collect();
                let result = if subscribe {
                    // fred resolves SUBSCRIBE once written; the PING's answer comes after
                    // Redis ran it, so then the subscription is active.
                    match redis.subscribe(names).await {
                        Ok(()) => redis.ping::<fred::types::Value>(None).await.map(drop),
                        Err(e) => Err(e),
                    }
                } else {
                    redis.unsubscribe(names).await
                };
                match result {
                    Ok(()) => {
                        if subscribe {
                            self.activate(&topics);
                        }
                        for t in topics {
                            if subscribe {
                                subscribed.insert(t);
                            } else {
                                subscribed.remove(&t);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, subscribe, "Redis (un)subscribe failed; will retry");
                        self.lock().dirty.extend(topics);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
            self.metrics.channels.set(subscribed.len() as i64);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update under this lock is a single insert/remove; a poisoned lock is consistent.
        crate::lock(&self.state)
    }
}

/// What the hub knows about a lost subscriber connection: since when it was lost, and how
/// many channels were subscribed again since.
#[derive(Default)]
struct Recovery {
    /// fred reports the first connection as a reconnect too; only later ones are recoveries.
    connected_once: bool,
    lost_at: Option<Instant>,
    pending: Option<(Instant, usize)>,
}

impl Recovery {
    /// fred reported an error on the connection: the subscriptions may be gone from here.
    fn lost(&mut self) {
        self.lost_at.get_or_insert_with(Instant::now);
    }

    /// The connection is back; `channels` must be subscribed again.
    fn reconnected(&mut self, channels: usize) {
        let since = self.lost_at.take().unwrap_or_else(Instant::now);
        let first = !std::mem::replace(&mut self.connected_once, true);
        if channels > 0 && !first {
            tracing::warn!(
                channels,
                "subscriber connection re-established: subscribing every channel again"
            );
            let (first, count) = self.pending.unwrap_or((since, 0));
            self.pending = Some((first, count + channels));
        }
    }

    /// Everything is subscribed again: say how long channels were without a subscription.
    fn done(&mut self, metrics: &Metrics) {
        if let Some((since, channels)) = self.pending.take() {
            let gap = since.elapsed();
            metrics.resubscribed(channels as u64, gap);
            tracing::warn!(
                channels,
                unsubscribed_ms = gap.as_millis() as u64,
                "re-subscribed after losing the subscriber connection; what was published \
                 meanwhile did not reach this relay"
            );
        }
    }
}

/// From this many subscribers on, a direct fan-out is split between the hub and a helper:
/// each write costs a few microseconds in the kernel, so a thousand of them take milliseconds
/// on one thread, and the last subscriber's latency is that long.
const SPLIT_AT: usize = 64;

/// The largest frame the hub writes directly (the sessions' write buffer size).
const DIRECT_MAX: usize = crate::server::write::socket::WRITE_BUFFER;

/// The helper's half of a split fan-out.
fn odd(key: usize) -> bool {
    key % 2 == 1
}

/// What one fan-out did, for the metrics.
#[derive(Default)]
struct Tally {
    written: u64,
    skipped: u64,
    discarded: u64,
}

impl std::ops::Add for Tally {
    type Output = Tally;
    fn add(self, other: Tally) -> Tally {
        Tally {
            written: self.written + other.written,
            skipped: self.skipped + other.skipped,
            discarded: self.discarded + other.discarded,
        }
    }
}

/// Push (or write, given `encoded`) `frame` to the subscribers whose key `mine` accepts.
fn fan_out(
    subscribers: &Slab<Arc<Outbox>>,
    frame: &Message,
    encoded: Option<&EncodedFrame>,
    mine: impl Fn(usize) -> bool,
) -> Tally {
    let mut tally = Tally::default();
    for (_, outbox) in subscribers.iter().filter(|(key, _)| mine(*key)) {
        let pushed = match encoded {
            Some(encoded) => outbox.push_or_write(frame, encoded),
            None => outbox.push(frame.clone()),
        };
        match pushed {
            Pushed::Queued | Pushed::Closed => {}
            Pushed::Written => tally.written += 1,
            Pushed::Skipped(n) => tally.skipped += n as u64,
            Pushed::Overflowed(n) => tally.discarded += n as u64 + 1,
        }
    }
    tally
}

/// One frame per message: text when the payload is valid UTF-8, binary otherwise.
fn frame_of(value: Value) -> Option<Message> {
    match value {
        // Checked once per message here, then shared by every subscriber.
        Value::String(s) => Some(match Utf8Bytes::try_from(s.into_inner()) {
            Ok(text) => Message::Text(text),
            Err(_) => return None,
        }),
        Value::Bytes(b) => Some(Message::Binary(b)),
        other => other.into_bytes().map(Message::Binary),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::config::SlowConsumer;
    use crate::server::write::outbox::Limits;

    fn topic(name: &str) -> Topic {
        Topic::Channel(ChannelName::from_redis(Bytes::from(name.to_string())))
    }

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(Limits::messages(16), SlowConsumer::Close))
    }

    fn dirty(hub: &Hub) -> Vec<Topic> {
        hub.lock().dirty.drain().collect()
    }

    /// Only the first join and the last leave of a topic give the reconciler work: one
    /// SUBSCRIBE per topic per process, whatever the number of clients.
    #[test]
    fn first_join_and_last_leave_mark_a_topic_dirty_and_nothing_else_does() {
        let hub = Hub::new(Metrics::new());
        let a = hub.join(topic("t"), outbox());
        assert_eq!(dirty(&hub), vec![topic("t")]);
        let b = hub.join(topic("t"), outbox());
        assert!(dirty(&hub).is_empty(), "a second client subscribes nothing");
        drop(a);
        assert!(dirty(&hub).is_empty(), "a client leaving with others left");
        drop(b);
        assert_eq!(dirty(&hub), vec![topic("t")]);
        assert!(hub.lock().topics.is_empty());
    }

    /// A topic becomes active when Redis confirmed it, and every reconnect makes it inactive
    /// and dirty again until it is confirmed anew.
    #[tokio::test]
    async fn a_reconnect_makes_every_topic_inactive_and_dirty_until_confirmed_again() {
        let hub = Hub::new(Metrics::new());
        let _member = hub.join(topic("t"), outbox());
        dirty(&hub);
        let patience = Duration::from_millis(20);
        assert!(!hub.wait_active(&topic("t"), patience).await);
        hub.activate(&[topic("t")]);
        assert!(hub.wait_active(&topic("t"), patience).await);

        let mut subscribed = HashSet::from([topic("t")]);
        assert_eq!(hub.connection_reset(&mut subscribed), 1);
        assert!(subscribed.is_empty());
        assert_eq!(dirty(&hub), vec![topic("t")]);
        assert!(!hub.wait_active(&topic("t"), patience).await);
    }

    /// A client waiting for its topic is woken by the activation, not by its patience.
    #[tokio::test]
    async fn a_waiting_client_is_woken_when_its_topic_becomes_active() {
        let hub = Hub::new(Metrics::new());
        let _member = hub.join(topic("t"), outbox());
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_active(&topic("t"), Duration::from_secs(30)).await }
        });
        tokio::task::yield_now().await;
        hub.activate(&[topic("t")]);
        let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(woken.expect("not woken by the activation").unwrap());
    }
}
