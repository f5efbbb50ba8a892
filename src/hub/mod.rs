//! The hub: which clients of this process listen to which Redis channel or pattern (SPEC §4,
//! §9).
//!
//! Owns: the map topic → subscribers (raw, JSON, and binary-only: a publisher's downlink on an
//! ack connection, SPEC §10), the one Redis subscription per topic per
//! process (first client in SUBSCRIBEs or PSUBSCRIBEs, last one out unsubscribes), and
//! fan-out: a message from Redis becomes one frame, built once (and one envelope, built once,
//! for the JSON clients), pushed to every subscriber's [`Outbox`]. When the hub has caught up
//! with Redis (no other message waiting), the frame is also encoded once and written straight
//! into the socket of each subscriber whose session is idle: at a light rate that spares a
//! task wake-up and poll per delivery. When messages wait, they are only queued, so busy
//! sessions write many frames per call and the hub keeps up.
//!
//! Owns too, with `--history`: each live message's id (from the ids message the history
//! script publishes just before a batch, see `server::history`), each client's replay
//! (`?last=`, `?since=`) and its seam with the live messages, and resuming a channel from the
//! last id it delivered after the subscription was lost.
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
//! - Fan-out works on a snapshot of the topic's subscribers (an `Arc`, copied on write by
//!   joins and leaves), so the hub's lock is not held while it writes to sockets.
//! - The seam (history): only the message reader fans out, and it serves replays and
//!   resumptions between two messages. A client with a replay joins *waiting* (no live
//!   message reaches it; those the reader passes meanwhile are already in the stream), the
//!   reader reads the stream and queues the replay, and the client then takes every live
//!   message newer than the replay's last id: no gap, no duplicate. Each read is bounded
//!   (`--redis-timeout`, at most 2 s): a read that fails or times out starts the client live
//!   (with a gap frame for `since`), it never stalls fan-out for long. A channel whose
//!   subscription was lost waits the same way until the reader has delivered what its stream
//!   holds after the channel's last delivered id.
//! - Patterns: one PUBLISH reaches the connection once per matching pattern; the first copy
//!   is delivered to every matching active pattern's clients, the following copies (as many
//!   as the other active matching patterns, with the same channel and payload) are skipped. A client of a pattern and of a
//!   channel it matches are two clients: each gets the message once, as in Redis.
//!
//! - Cluster (`--redis-mode cluster`, SPEC §11): a channel is SSUBSCRIBEd (one channel per
//!   command) on the primary owning its slot, activated by a PING to that node, and the hub
//!   remembers which node that was. A reconnect of one node's connection re-subscribes only
//!   the channels that were on it. Redis drops the subscriptions of a slot that leaves a node
//!   (failover, migration) with a `sunsubscribe` push that fred 10.1.0 discards, so every
//!   [`OWNERS_CHECK`] the hub reads the routing table again (CLUSTER SLOTS) and re-subscribes
//!   the channels whose slot moved, on their new owner (with history, resuming them from
//!   their stream like any lost subscription). `smessage`s are delivered as `message`s; the
//!   ids of each shard's scripts are kept per channel, since shards' messages interleave.
//!   Patterns are refused before the upgrade in this mode (a PSUBSCRIBE sees no SPUBLISH).
//!
//! Must not: block on a client (direct writes never wait; a full socket means the frame is
//! queued); a slow client only fills its own outbox.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::{Client, SubscriberClient};
use fred::interfaces::ClientLike;
use fred::interfaces::{ClusterInterface, EventInterface, PubsubInterface};
use fred::types::cluster::ClusterRouting;
use fred::types::config::Server;
use fred::types::{MessageKind, Value};
use slab::Slab;
use tokio::runtime::Handle;
use tokio::sync::{broadcast::error::RecvError, mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{protocol::frame::Utf8Bytes, Message};
use tokio_util::sync::CancellationToken;

pub(crate) mod envelope;
pub(crate) mod retained;
pub(crate) mod thread;

use crate::auth::glob;
use crate::server::channel::ChannelName;
use crate::server::history::{self, StreamId};
use crate::server::metrics::{DropReason, Metrics};
use crate::server::status::ChannelCount;
use crate::server::write::outbox::{DirectWrites, Outbox, Pushed};
use crate::server::write::pages;
use crate::server::write::socket::EncodedFrame;

/// What a client listens to: one channel, or a pattern of channels (SPEC §9).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    Channel(ChannelName),
    /// A Redis glob over channel names (`PREFIX + PATH` where the path holds `*`, `?`, `[`).
    Pattern(ChannelName),
}

impl Topic {
    fn name(&self) -> &ChannelName {
        match self {
            Topic::Channel(name) | Topic::Pattern(name) => name,
        }
    }
}

/// How a client receives messages: the raw payload, or its JSON envelope (`?format=json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Json,
    /// The raw payload, always in a binary frame: a publisher's downlink on a connection
    /// whose text frames are its acks (`lightrelay.ack`, SPEC §10).
    Binary,
}

/// What a client asked to be sent before the live messages (SPEC §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    Nothing,
    /// `?last=N`: the newest N retained messages.
    Last(usize),
    /// `?since=ID`: every retained message after ID.
    Since(StreamId),
}

/// History as the hub reads it (`--history` on): the connection replays are read on, and
/// how many entries one read may bring (the client queue's message bound).
pub(crate) struct History {
    pub reader: Client,
    pub limit: usize,
    /// How long one read may take (the hub waits for it between two messages).
    pub patience: Duration,
}

pub struct Hub {
    state: Mutex<State>,
    dirty: Notify,
    /// Notified (all waiters) whenever topics become active.
    activated: Notify,
    metrics: Metrics,
    history: Option<History>,
    /// Replays and resumptions, served by the message reader between two messages.
    requests: mpsc::Sender<Request>,
    requests_rx: Mutex<Option<mpsc::Receiver<Request>>>,
    /// In a cluster: the connection the slot map is read on ([`Hub::read_slots_on`]).
    slot_reader: std::sync::OnceLock<Client>,
}

#[derive(Default)]
struct State {
    topics: HashMap<Topic, Entry>,
    dirty: HashSet<Topic>,
    /// The pattern topics among `topics`, so a pattern message is matched against patterns
    /// only, not against every channel.
    patterns: HashSet<ChannelName>,
}

/// A client's place in a topic's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Seat {
    format: Format,
    key: usize,
}

/// Where live messages start for a client (or a topic) whose replay is being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Floor {
    /// The replay is not read yet: every live message waits for it (what the reader skips is
    /// in the stream, so in the replay).
    Waiting,
    /// The replay went up to this id: live messages up to it are duplicates of it.
    UpTo(StreamId),
}

impl Floor {
    fn holds_back(self, id: Option<StreamId>) -> bool {
        match self {
            // What has an id is in the stream, so in the replay; a message without one (a
            // plain PUBLISH, `redis-cli` or a relay without history) is not, and goes out now.
            Floor::Waiting => id.is_some(),
            Floor::UpTo(floor) => id.is_some_and(|id| id <= floor),
        }
    }
}

#[derive(Default)]
struct Entry {
    /// Copied on write: a fan-out in progress keeps its snapshot, joins and leaves copy.
    raw: Arc<Slab<Arc<Outbox>>>,
    json: Arc<Slab<Arc<Outbox>>>,
    binary: Arc<Slab<Arc<Outbox>>>,
    /// Redis confirmed the subscription (and it was not lost since).
    active: bool,
    /// Clients whose replay seam is not passed yet (rare, short-lived).
    floors: HashMap<Seat, Floor>,
    /// The newest history id delivered on this topic: where it resumes after a lost
    /// subscription.
    last_id: Option<StreamId>,
    /// Set while the topic resumes after a lost subscription (history on).
    resume: Option<Floor>,
    /// How many times the topic lost its subscription. A resume read for one loss must not
    /// end the resume of a later one: the reader awaits its XRANGE while the reconciler may
    /// see the topic lost again (in a cluster, a moved slot then fred's new connection to the
    /// new owner), and what was published in that second gap is only in the stream.
    losses: u64,
    /// Messages that arrived for the topic since it was first joined (`/status.json`'s
    /// rates; counted under the lock `deliver` takes anyway).
    messages: u64,
}

impl Entry {
    /// A resume read ended, passing live messages from `floor` on. `losses` is the count of
    /// lost subscriptions when the read started, if the topic was subscribed then. If it was
    /// not, or the subscription was lost again since, the read may have missed what was
    /// published in that later gap: the topic keeps waiting for the next resume (the one its
    /// next confirmed subscription asks for).
    fn resumed(&mut self, losses: Option<u64>, floor: Option<Floor>) {
        if losses == Some(self.losses) {
            self.resume = floor;
        }
    }

    fn is_empty(&self) -> bool {
        self.raw.is_empty() && self.json.is_empty() && self.binary.is_empty()
    }

    fn seats(&self, format: Format) -> &Arc<Slab<Arc<Outbox>>> {
        match format {
            Format::Raw => &self.raw,
            Format::Json => &self.json,
            Format::Binary => &self.binary,
        }
    }

    fn seats_mut(&mut self, format: Format) -> &mut Arc<Slab<Arc<Outbox>>> {
        match format {
            Format::Raw => &mut self.raw,
            Format::Json => &mut self.json,
            Format::Binary => &mut self.binary,
        }
    }
}

/// A client's place in the hub; leaving is dropping it.
pub struct Membership {
    hub: Arc<Hub>,
    topic: Topic,
    seat: Seat,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.topic, self.seat);
    }
}

/// Work for the message reader besides messages: it alone fans out, so it alone can place
/// a replay exactly between the live messages it has and has not delivered.
enum Request {
    Replay(Arrival),
    /// These topics were (re)subscribed and are active: resume those that lost their
    /// subscription from their last id; note where the others start.
    Activated(Vec<Topic>),
}

/// A client waiting for its replay.
struct Arrival {
    topic: Topic,
    seat: Seat,
    outbox: Arc<Outbox>,
    replay: Replay,
    done: oneshot::Sender<()>,
}

/// In a cluster: how often the hub reads the routing table again to find channels whose slot
/// moved (Redis drops their subscription then, and fred does not say so).
const OWNERS_CHECK: Duration = Duration::from_millis(500);

/// How many requests the reader serves in one go (reads sharing one round trip).
const REQUEST_BATCH: usize = 256;

impl Hub {
    pub fn new(metrics: Metrics, history: Option<History>) -> Arc<Self> {
        let (requests, requests_rx) = mpsc::channel(1024);
        Arc::new(Hub {
            state: Mutex::new(State::default()),
            dirty: Notify::new(),
            activated: Notify::new(),
            metrics,
            history,
            requests,
            requests_rx: Mutex::new(Some(requests_rx)),
            slot_reader: std::sync::OnceLock::new(),
        })
    }

    /// Add a client to a topic; the topic is subscribed in Redis if it was not already. With
    /// `replaying`, no live message reaches it until [`Hub::replay`] placed its replay.
    pub fn join(
        self: &Arc<Self>,
        topic: Topic,
        format: Format,
        outbox: Arc<Outbox>,
        replaying: bool,
    ) -> Membership {
        let mut state = self.lock();
        if let Topic::Pattern(pattern) = &topic {
            state.patterns.insert(pattern.clone());
        }
        let entry = state.topics.entry(topic.clone()).or_default();
        let first = entry.is_empty();
        let slab = entry.seats_mut(format);
        let key = Arc::make_mut(slab).insert(outbox);
        let seat = Seat { format, key };
        if replaying {
            entry.floors.insert(seat, Floor::Waiting);
        }
        if first {
            state.dirty.insert(topic.clone());
            drop(state);
            self.dirty.notify_one();
        }
        Membership {
            hub: Arc::clone(self),
            topic,
            seat,
        }
    }

    fn leave(&self, topic: &Topic, seat: Seat) {
        let mut state = self.lock();
        let Some(entry) = state.topics.get_mut(topic) else {
            return;
        };
        let slab = entry.seats_mut(seat.format);
        Arc::make_mut(slab).try_remove(seat.key);
        entry.floors.remove(&seat);
        if entry.is_empty() {
            state.topics.remove(topic);
            if let Topic::Pattern(pattern) = topic {
                state.patterns.remove(pattern);
            }
            state.dirty.insert(topic.clone());
            drop(state);
            self.dirty.notify_one();
        }
    }

    /// Send `membership`'s client what it asked for before the live messages, then let the
    /// live ones through from exactly where the replay ends; waits at most `patience` for
    /// the read (a later one still arrives first, before any live message).
    pub async fn replay(
        &self,
        membership: &Membership,
        outbox: Arc<Outbox>,
        replay: Replay,
        patience: Duration,
    ) {
        let (done, served) = oneshot::channel();
        let request = Request::Replay(Arrival {
            topic: membership.topic.clone(),
            seat: membership.seat,
            outbox,
            replay,
            done,
        });
        if self.requests.send(request).await.is_ok() {
            let _ = tokio::time::timeout(patience, served).await;
        }
    }

    /// (topics, queued messages, queued bytes) across every client, for `/metrics`.
    pub fn stats(&self) -> (usize, usize, usize) {
        let state = self.lock();
        let (mut messages, mut bytes) = (0, 0);
        for entry in state.topics.values() {
            let all = entry.raw.iter().chain(entry.json.iter());
            for (_, outbox) in all.chain(entry.binary.iter()) {
                let (m, b) = outbox.queued();
                messages += m;
                bytes += b;
            }
        }
        (state.topics.len(), messages, bytes)
    }

    /// Every topic with its clients and the messages it carried, for `/status.json`.
    pub(crate) fn channels(&self) -> Vec<ChannelCount> {
        let state = self.lock();
        state
            .topics
            .iter()
            .map(|(topic, entry)| ChannelCount {
                channel: topic.name().clone(),
                pattern: matches!(topic, Topic::Pattern(_)),
                clients: entry.raw.len() + entry.json.len(),
                messages: entry.messages,
            })
            .collect()
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
        let Some(requests) = crate::lock(&self.requests_rx).take() else {
            return;
        };
        let reader = self.clone().read_messages(redis.clone(), requests, helper);
        let reconciler = self.reconcile(redis);
        tokio::select! {
            () = reader => {},
            () = reconciler => {},
            () = shutdown.cancelled() => {},
        }
    }

    async fn read_messages(
        self: Arc<Self>,
        redis: SubscriberClient,
        mut requests: mpsc::Receiver<Request>,
        helper: Option<Handle>,
    ) {
        let mut messages = redis.message_rx();
        let mut order = Order::default();
        let mut batch = Vec::with_capacity(REQUEST_BATCH);
        loop {
            tokio::select! {
                received = messages.recv() => match received {
                    Ok(message) => {
                        // Caught up with Redis: write to idle subscribers directly. Behind:
                        // only queue, and let the sessions write their backlog in few calls.
                        let direct = messages.is_empty();
                        self.on_message(message, &mut order, direct, helper.as_ref()).await;
                    }
                    Err(RecvError::Lagged(n)) => {
                        // What paired ids with messages may be gone: start afresh.
                        order = Order::default();
                        self.metrics.dropped(DropReason::redis_lagged, n);
                        tracing::warn!(lost = n, "hub fell behind Redis; messages were dropped");
                    }
                    Err(RecvError::Closed) => return,
                },
                n = requests.recv_many(&mut batch, REQUEST_BATCH) => {
                    if n == 0 {
                        return;
                    }
                    self.serve(std::mem::take(&mut batch)).await;
                }
            }
        }
    }

    async fn on_message(
        &self,
        message: fred::types::Message,
        order: &mut Order,
        direct: bool,
        helper: Option<&Handle>,
    ) {
        let name: Bytes = message.channel.into_inner();
        if self.history.is_some() {
            if let Some(channel) = history::channel_of_ids(&name) {
                if message.kind == MessageKind::SMessage {
                    order.shard_ids(channel, &message.value);
                } else {
                    order.ids(channel, &message.value);
                }
                return;
            }
        }
        let Some(frame) = frame_of(message.value) else {
            return;
        };
        self.metrics.redis_in.add(1, frame.len() as u64);
        let channel = ChannelName::from_redis(name);
        match message.kind {
            // SPUBLISH (a cluster) is delivered as PUBLISH is.
            MessageKind::SMessage => {
                let id = order.shard_message(&channel);
                let topic = Topic::Channel(channel.clone());
                self.deliver(&topic, &channel, id, frame, direct, helper, false)
                    .await;
            }
            MessageKind::Message => {
                let id = order.message(&channel, self.history.is_some());
                let topic = Topic::Channel(channel.clone());
                self.deliver(&topic, &channel, id, frame, direct, helper, false)
                    .await;
            }
            MessageKind::PMessage => {
                // One PUBLISH reaches this connection once per pattern it matches: the first
                // copy goes to every matching pattern's clients, the others are skipped.
                if order.is_copy(&channel, &frame) {
                    return;
                }
                let id = order.pattern_message(&channel);
                let patterns = self.matching_patterns(&channel);
                order.copies_follow(&channel, &frame, patterns.len().saturating_sub(1));
                for pattern in patterns {
                    let topic = Topic::Pattern(pattern);
                    self.deliver(&topic, &channel, id, frame.clone(), direct, helper, false)
                        .await;
                }
            }
        }
    }

    /// The active pattern topics that match `channel`.
    fn matching_patterns(&self, channel: &ChannelName) -> Vec<ChannelName> {
        let state = self.lock();
        let name = channel.to_bytes();
        state
            .patterns
            .iter()
            .filter(|pattern| {
                glob::matches(&pattern.to_bytes(), &name)
                    && state
                        .topics
                        .get(&Topic::Pattern((*pattern).clone()))
                        .is_some_and(|entry| entry.active)
            })
            .cloned()
            .collect()
    }

    /// Deliver one message of `channel` (id `id`) to `topic`'s clients: the raw frame to
    /// raw ones, its envelope (built once) to JSON ones, none to a client whose replay seam
    /// holds it back. `replayed`: it comes from the topic's own resumption, which the
    /// topic's floor does not hold back. Returns how many clients it reached.
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        topic: &Topic,
        channel: &ChannelName,
        id: Option<StreamId>,
        frame: Message,
        direct: bool,
        helper: Option<&Handle>,
        replayed: bool,
    ) -> usize {
        let (raw, json, binary, floors) = {
            let mut state = self.lock();
            let Some(entry) = state.topics.get_mut(topic) else {
                return 0;
            };
            if !replayed {
                entry.messages += 1;
                match entry.resume {
                    Some(floor) if floor.holds_back(id) => return 0,
                    Some(_) if id.is_some() => entry.resume = None,
                    _ => {}
                }
            }
            if id.is_some() && id > entry.last_id {
                entry.last_id = id;
            }
            let floors = (!entry.floors.is_empty()).then(|| entry.floors.clone());
            let json = (!entry.json.is_empty()).then(|| entry.json.clone());
            let binary = (!entry.binary.is_empty()).then(|| entry.binary.clone());
            (entry.raw.clone(), json, binary, floors)
        };
        // A large payload to many sockets goes from a memory file, whose pages each session's
        // send takes instead of copying the payload again: raw and binary clients share it.
        let readers = raw.len() + binary.as_ref().map_or(0, |binary| binary.len());
        let frame = pages::share_frame(frame, readers);
        let mut reached = 0;
        if !raw.is_empty() {
            reached += self
                .fan_out_to(
                    &raw,
                    frame.clone(),
                    Format::Raw,
                    id,
                    floors.as_ref(),
                    direct,
                    helper,
                )
                .await;
        }
        if let Some(json) = json {
            let envelope = envelope::envelope(&channel.to_bytes(), id, &frame);
            let envelope = pages::share_frame(envelope, json.len());
            reached += self
                .fan_out_to(
                    &json,
                    envelope,
                    Format::Json,
                    id,
                    floors.as_ref(),
                    direct,
                    helper,
                )
                .await;
        }
        if let Some(binary) = binary {
            let frame = match frame {
                Message::Text(text) => Message::Binary(text.into()),
                other => other,
            };
            reached += self
                .fan_out_to(
                    &binary,
                    frame,
                    Format::Binary,
                    id,
                    floors.as_ref(),
                    direct,
                    helper,
                )
                .await;
        }
        if floors.is_some() && id.is_some() {
            // Clients whose seam this message passed take every message from now on.
            let mut state = self.lock();
            if let Some(entry) = state.topics.get_mut(topic) {
                entry
                    .floors
                    .retain(|_, floor| *floor == Floor::Waiting || floor.holds_back(id));
            }
        }
        reached
    }

    /// Push one frame to every client of `subscribers`; with `direct`, write it into the
    /// sockets of idle ones instead. With `helper` (the connections' runtime) and a large
    /// topic, half of the direct writes run there while the hub does the other half, and
    /// both halves are done before this returns, so the next message cannot overtake.
    #[allow(clippy::too_many_arguments)]
    async fn fan_out_to(
        &self,
        subscribers: &Arc<Slab<Arc<Outbox>>>,
        frame: Message,
        format: Format,
        id: Option<StreamId>,
        floors: Option<&HashMap<Seat, Floor>>,
        direct: bool,
        helper: Option<&Handle>,
    ) -> usize {
        // Large frames always go through the sessions: a megabyte copied into a thousand
        // sockets is work to spread over the runtime's threads, not to do on the hub's.
        let encoded = (direct && frame.len() <= DIRECT_MAX)
            .then(|| EncodedFrame::of(&frame))
            .flatten();
        let tally = match (encoded, helper, floors) {
            (Some(encoded), Some(helper), None) if subscribers.len() >= SPLIT_AT => {
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
                let mine = fan_out(subscribers, &frame, Some(&encoded), |key| !odd(key));
                if claimed.swap(true, Ordering::AcqRel) {
                    // Claimed by the helper: wait for it, so the next message cannot overtake.
                    // (Once started it runs to the end: it has no await point.)
                    mine + theirs.await.ok().flatten().unwrap_or_default()
                } else {
                    mine + fan_out(subscribers, &frame, Some(&encoded), odd)
                }
            }
            (encoded, _, floors) => fan_out(subscribers, &frame, encoded.as_ref(), |key| {
                floors.is_none_or(|floors| {
                    floors
                        .get(&Seat { format, key })
                        .is_none_or(|floor| !floor.holds_back(id))
                })
            }),
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

    /// Serve a batch of requests: one read per stream and kind of read, all at once.
    async fn serve(&self, requests: Vec<Request>) {
        let mut replays = Vec::new();
        let mut activated = Vec::new();
        for request in requests {
            match request {
                Request::Replay(arrival) => replays.push(arrival),
                Request::Activated(topics) => activated.extend(topics),
            }
        }
        // Replays first: a channel whose replay was read knows where its stream stands and
        // needs no read of its own to note it (one XREVRANGE per channel per batch).
        if !replays.is_empty() {
            self.place_replays(replays).await;
        }
        if !activated.is_empty() {
            self.resume(activated).await;
        }
    }

    /// Read and place the replays of newly arrived clients; each then takes live messages
    /// from just after its replay's last id.
    async fn place_replays(&self, replays: Vec<Arrival>) {
        // One read per channel for every `last` (the largest N), one per (channel, id) for
        // every `since`.
        let mut lasts: HashMap<ChannelName, usize> = HashMap::new();
        let mut sinces: HashSet<(ChannelName, StreamId)> = HashSet::new();
        for Arrival { topic, replay, .. } in &replays {
            match *replay {
                Replay::Last(n) => {
                    let most = lasts.entry(topic.name().clone()).or_default();
                    *most = (*most).max(n);
                }
                Replay::Since(id) => {
                    sinces.insert((topic.name().clone(), id));
                }
                Replay::Nothing => {}
            }
        }
        let (last_reads, since_reads) = match &self.history {
            Some(history) => {
                let (limit, patience) = (history.limit, history.patience);
                let reader = &history.reader;
                let lasts = futures_util::future::join_all(lasts.into_iter().map(
                    |(channel, n)| async move {
                        let read = retained::last(reader, &channel, n.min(limit), patience).await;
                        (channel, read)
                    },
                ));
                let sinces = futures_util::future::join_all(sinces.into_iter().map(
                    |(channel, id)| async move {
                        let read = retained::after(reader, &channel, id, limit, patience).await;
                        ((channel, id), read)
                    },
                ));
                let (lasts, sinces) = futures_util::future::join(lasts, sinces).await;
                (
                    lasts.into_iter().collect::<HashMap<_, _>>(),
                    sinces.into_iter().collect::<HashMap<_, _>>(),
                )
            }
            None => (HashMap::new(), HashMap::new()),
        };
        for Arrival {
            topic,
            seat,
            outbox,
            replay,
            done,
        } in replays
        {
            let channel = topic.name();
            let frames_of = |entries: &[retained::Entry]| -> Vec<(StreamId, Message)> {
                entries
                    .iter()
                    .map(|(id, data)| {
                        let frame = envelope::payload_frame(data.clone());
                        let frame = match seat.format {
                            Format::Raw => frame,
                            Format::Json => {
                                envelope::envelope(&channel.to_bytes(), Some(*id), &frame)
                            }
                            Format::Binary => Message::Binary(frame.into_data()),
                        };
                        (*id, frame)
                    })
                    .collect()
            };
            let mut frames = Vec::new();
            match replay {
                Replay::Last(n) => match last_reads.get(channel) {
                    Some(Ok(entries)) => {
                        frames = frames_of(&entries[entries.len().saturating_sub(n)..]);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(%channel, error = %e, "could not read the retained messages; the client starts with the live ones");
                    }
                    None => {}
                },
                Replay::Since(after) => match since_reads.get(&(channel.clone(), after)) {
                    Some(Ok(read)) => {
                        if let Some(oldest) = read.gap {
                            outbox.push(envelope::gap(after, oldest));
                        }
                        frames = frames_of(&read.entries);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(%channel, error = %e, "could not read the retained messages; the client is told of a gap");
                        outbox.push(envelope::gap(after, None));
                    }
                    // History is off: nothing is retained.
                    None => {
                        outbox.push(envelope::gap(after, None));
                    }
                },
                Replay::Nothing => {}
            }
            let newest = frames.last().map(|(id, _)| *id);
            self.metrics.replayed.inc_by(frames.len() as u64);
            for (_, frame) in frames {
                outbox.push(frame);
            }
            let mut state = self.lock();
            if let Some(entry) = state.topics.get_mut(&topic) {
                // Only if the client is still there: a seat left meanwhile may have been
                // taken by another client, waiting for its own replay.
                let slab = entry.seats(seat.format);
                if slab
                    .get(seat.key)
                    .is_some_and(|there| Arc::ptr_eq(there, &outbox))
                {
                    match newest {
                        Some(newest) => entry.floors.insert(seat, Floor::UpTo(newest)),
                        None => entry.floors.remove(&seat),
                    };
                }
                // What the stream held when it was read was published before any message
                // the reader passes from now on: the topic may resume from there, unless it
                // is resuming already (from its own, older, last id).
                if entry.resume.is_none() && newest > entry.last_id {
                    entry.last_id = newest;
                }
            }
            drop(state);
            let _ = done.send(());
        }
    }

    /// Topics just (re)subscribed: those that lost their subscription get what was published
    /// meanwhile from their stream, in order, before any live message; the others learn
    /// where their stream stands, to resume from there if they lose it later.
    async fn resume(&self, topics: Vec<Topic>) {
        let Some(history) = &self.history else {
            return;
        };
        let work: Vec<(Topic, Option<StreamId>, bool, Option<u64>)> = {
            let state = self.lock();
            topics
                .into_iter()
                .filter(|topic| matches!(topic, Topic::Channel(_)))
                .filter_map(|topic| {
                    let entry = state.topics.get(&topic)?;
                    let resuming = entry.resume.is_some();
                    (resuming || entry.last_id.is_none()).then_some((
                        topic,
                        entry.last_id,
                        resuming,
                        // The read covers the gap only if it starts after the subscription
                        // was confirmed again since the last loss.
                        entry.active.then_some(entry.losses),
                    ))
                })
                .collect()
        };
        let reader = &history.reader;
        let (limit, patience) = (history.limit, history.patience);
        let reads = futures_util::future::join_all(work.into_iter().map(
            |(topic, last_id, resuming, losses)| async move {
                let channel = topic.name().clone();
                let read = match (resuming, last_id) {
                    (true, Some(after)) => {
                        retained::after(reader, &channel, after, limit, patience)
                            .await
                            .map(Resumed::After)
                    }
                    (true, None) => Ok(Resumed::NothingToResume),
                    (false, _) => retained::last(reader, &channel, 1, patience)
                        .await
                        .map(Resumed::Anchor),
                };
                (topic, last_id, losses, read)
            },
        ))
        .await;
        for (topic, last_id, losses, read) in reads {
            let channel = topic.name().clone();
            match read {
                Ok(Resumed::Anchor(newest)) => {
                    if let (Some(entry), Some((id, _))) =
                        (self.lock().topics.get_mut(&topic), newest.last())
                    {
                        entry.last_id = entry.last_id.max(Some(*id));
                    }
                }
                Ok(Resumed::After(read)) => {
                    let after = last_id.unwrap_or(StreamId::ZERO);
                    if let Some(oldest) = read.gap {
                        self.metrics.history_gaps.inc();
                        tracing::warn!(%channel, after = %after, oldest = ?oldest.map(|id| id.to_string()),
                            "resuming after a lost subscription: some messages are no longer retained");
                        self.deliver_gap(&topic, after, oldest);
                    }
                    let count = read.entries.len();
                    let newest = read.entries.last().map(|(id, _)| *id);
                    for (id, data) in read.entries {
                        let frame = envelope::payload_frame(data);
                        self.deliver(&topic, &channel, Some(id), frame, false, None, true)
                            .await;
                    }
                    self.metrics.resumed.inc_by(count as u64);
                    if count > 0 {
                        tracing::info!(%channel, messages = count, "resumed from history after a lost subscription");
                    }
                    if let Some(entry) = self.lock().topics.get_mut(&topic) {
                        entry.resumed(losses, newest.map(Floor::UpTo));
                    }
                }
                Ok(Resumed::NothingToResume) => {
                    if let Some(entry) = self.lock().topics.get_mut(&topic) {
                        entry.resumed(losses, None);
                    }
                }
                Err(e) => {
                    tracing::warn!(%channel, error = %e, "could not read history to resume a lost subscription; what was published meanwhile did not reach this relay");
                    if let Some(entry) = self.lock().topics.get_mut(&topic) {
                        entry.resumed(losses, None);
                    }
                }
            }
        }
    }

    /// Tell a topic's JSON clients that messages after `after` are missing.
    fn deliver_gap(&self, topic: &Topic, after: StreamId, oldest: Option<StreamId>) {
        let json = self
            .lock()
            .topics
            .get(topic)
            .map(|entry| entry.json.clone());
        if let Some(json) = json {
            let frame = envelope::gap(after, oldest);
            for (_, outbox) in json.iter() {
                outbox.push(frame.clone());
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
    /// With history, each lost channel holds its live messages back until it has resumed
    /// from its stream. Returns how many topics to re-subscribe.
    fn connection_reset(&self, subscribed: &mut HashSet<Topic>) -> usize {
        self.subscriptions_lost(subscribed, |_| true)
    }

    /// fred connected (again) to `server` (in a cluster: one node), or to every node (`None`,
    /// or outside a cluster): the subscriptions that were on it are gone. Returns how many.
    fn reconnected(
        &self,
        subscribed: &mut HashSet<Topic>,
        owners: &mut HashMap<Topic, Server>,
        server: Option<&Server>,
    ) -> usize {
        let Some(server) = server else {
            owners.clear();
            return self.connection_reset(subscribed);
        };
        let lost = self.subscriptions_lost(subscribed, |t| owners.get(t) == Some(server));
        owners.retain(|_, node| node != server);
        lost
    }

    /// The subscribed topics that `lost` picks lost their subscription (their connection was
    /// re-established, or, in a cluster, their slot moved to another node): each becomes
    /// inactive and dirty, to be subscribed again; with history, it holds its live messages
    /// back until it has resumed from its stream. Returns how many.
    fn subscriptions_lost(
        &self,
        subscribed: &mut HashSet<Topic>,
        lost: impl Fn(&Topic) -> bool,
    ) -> usize {
        let gone: Vec<Topic> = subscribed.iter().filter(|t| lost(t)).cloned().collect();
        let mut state = self.lock();
        for topic in &gone {
            subscribed.remove(topic);
            if let Some(entry) = state.topics.get_mut(topic) {
                entry.active = false;
                if self.history.is_some() && matches!(topic, Topic::Channel(_)) {
                    entry.resume = Some(Floor::Waiting);
                    entry.losses += 1;
                }
            }
        }
        let count = gone.len();
        state.dirty.extend(gone);
        count
    }

    /// The Redis names a topic is subscribed with: itself, and its ids channel (or pattern)
    /// when history is on.
    fn redis_names(&self, topics: &[Topic]) -> Vec<fred::types::Key> {
        let mut names = Vec::with_capacity(topics.len() * 2);
        for topic in topics {
            names.push(topic.name().to_bytes().into());
            if self.history.is_some() {
                names.push(history::ids_channel(topic.name(), false).into());
            }
        }
        names
    }

    /// In a cluster: the shard channels of one channel topic, in the order to subscribe them
    /// (with history its ids channel, on the same slot, then itself), and that slot.
    /// They take one SSUBSCRIBE each, so a message can be published between the two: were
    /// the channel subscribed first, that message would come without its ids message, pass
    /// a resume's seam as a plain SPUBLISH does, ahead of the resumed ones, and come again
    /// with them. The ids channel first means every message that arrives had its ids arrive.
    fn shard_names(&self, topic: &Topic) -> (u16, Vec<Bytes>) {
        let name = topic.name().to_bytes();
        let slot = crate::redis::slot(&name);
        let mut names = Vec::with_capacity(2);
        if self.history.is_some() {
            names.push(history::ids_channel(topic.name(), true));
        }
        names.push(name);
        (slot, names)
    }

    /// In a cluster: SSUBSCRIBE (or SUNSUBSCRIBE) each of `topics` on the node owning its
    /// slot, one channel per command (fred 10.1.0 matches an SSUBSCRIBE to the first of the
    /// replies Redis sends, one per channel, and would take the others for later commands'
    /// answers), then PING each node subscribed on, whose answer comes after Redis ran them.
    /// Records which node each subscribed topic is on. Returns what went through and, on a
    /// failure, the error and the topics to try again.
    async fn shard_subscribe(
        &self,
        redis: &SubscriberClient,
        topics: Vec<Topic>,
        subscribe: bool,
        owners: &mut HashMap<Topic, Server>,
    ) -> (Vec<Topic>, Option<(fred::error::Error, Vec<Topic>)>) {
        let mut done: Vec<Topic> = Vec::with_capacity(topics.len());
        let mut failure = None;
        let mut topics = topics.into_iter();
        while let Some(topic) = topics.next() {
            let (slot, names) = self.shard_names(&topic);
            let mut result = Ok(());
            for name in names {
                let name = fred::types::Key::from(name);
                result = if subscribe {
                    redis.ssubscribe(name).await
                } else {
                    redis.sunsubscribe(name).await
                };
                if result.is_err() {
                    break;
                }
            }
            // After a MOVED fred has read the routing table again: this is the new owner.
            let owner = redis
                .cached_cluster_state()
                .and_then(|state| state.get_server(slot).cloned());
            match (result, owner, subscribe) {
                (Ok(()), Some(owner), true) => {
                    owners.insert(topic.clone(), owner);
                    done.push(topic);
                }
                (Ok(()), _, false) => {
                    owners.remove(&topic);
                    done.push(topic);
                }
                (result, _, _) => {
                    let error = result.err().unwrap_or_else(|| {
                        let why = format!("no node owns slot {slot} yet");
                        fred::error::Error::new(fred::error::ErrorKind::Cluster, why)
                    });
                    let mut left = vec![topic];
                    left.extend(topics.by_ref());
                    failure = Some((error, left));
                }
            }
        }
        if subscribe {
            let nodes: HashSet<Server> =
                done.iter().filter_map(|t| owners.get(t)).cloned().collect();
            for node in nodes {
                let options = fred::types::config::Options {
                    cluster_node: Some(node.clone()),
                    ..Default::default()
                };
                if let Err(e) = redis.with_options(&options).ping::<Value>(None).await {
                    // Not confirmed: subscribed again (a second SSUBSCRIBE is harmless).
                    let (unconfirmed, confirmed): (Vec<Topic>, Vec<Topic>) =
                        done.into_iter().partition(|t| owners.get(t) == Some(&node));
                    done = confirmed;
                    let (_, left) = failure.get_or_insert_with(|| (e, Vec::new()));
                    left.extend(unconfirmed);
                }
            }
        }
        (done, failure)
    }

    /// In a cluster, a plain connection to read the slot map on (`CLUSTER SLOTS`: a subscribed
    /// connection takes no such command). Without one, moved slots are not looked for.
    pub(crate) fn read_slots_on(&self, client: Client) {
        let _ = self.slot_reader.set(client);
    }

    /// In a cluster: read the slot map (CLUSTER SLOTS) and find the subscribed topics whose
    /// slot is no longer on the node they were subscribed on (a failover, a slot migration).
    /// Redis drops such a subscription itself, telling the client with a `sunsubscribe` push
    /// that fred 10.1.0 discards (`router/responses.rs`, `check_pubsub_message`): asking is the
    /// only way to know. Then fred's routing table is refreshed (its `sync_cluster` opens a
    /// new connection each time in 10.1.0, so it is called only when something moved).
    async fn moved(
        &self,
        redis: &SubscriberClient,
        owners: &HashMap<Topic, Server>,
    ) -> HashSet<Topic> {
        let Some(reader) = self.slot_reader.get().filter(|_| !owners.is_empty()) else {
            return HashSet::new();
        };
        // fred's own parser of the answer; a host it leaves empty means "the node asked",
        // which matches whatever host a channel was subscribed on.
        let routing =
            match tokio::time::timeout(Duration::from_secs(2), reader.cluster_slots::<Value>())
                .await
            {
                Ok(Ok(map)) => match ClusterRouting::from_cluster_slots(map, "") {
                    Ok(routing) => routing,
                    Err(_) => return HashSet::new(),
                },
                _ => return HashSet::new(),
            };
        let moved: HashSet<Topic> = owners
            .iter()
            .filter(|(topic, node)| {
                let slot = crate::redis::slot(&topic.name().to_bytes());
                routing.get_server(slot).is_some_and(|owner| {
                    owner.port != node.port || (!owner.host.is_empty() && owner.host != node.host)
                })
            })
            .map(|(topic, _)| topic.clone())
            .collect();
        if !moved.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(2), redis.sync_cluster()).await;
        }
        moved
    }

    /// Bring Redis subscriptions in line with the hub, one command at a time; after every
    /// reconnect of the subscriber connection, subscribe everything again.
    /// In a cluster (`--redis-mode cluster`), each channel is SSUBSCRIBEd on the node owning
    /// its slot; a reconnect of one node's connection re-subscribes the channels that were on
    /// it, and every [`OWNERS_CHECK`] the routing table is read again and the channels whose
    /// slot moved (failover, migration) are subscribed on their new owner.
    async fn reconcile(&self, redis: SubscriberClient) {
        let mut subscribed: HashSet<Topic> = HashSet::new();
        let mut reconnects = redis.reconnect_rx();
        let mut errors = redis.error_rx();
        let mut recovery = Recovery::default();
        let sharded = crate::redis::sharded();
        // In a cluster: the node each subscribed channel is subscribed on.
        let mut owners: HashMap<Topic, Server> = HashMap::new();
        let mut next_check = Instant::now() + OWNERS_CHECK;
        loop {
            use tokio::sync::broadcast::error::TryRecvError;
            while let Ok(_) | Err(TryRecvError::Lagged(_)) = errors.try_recv() {
                recovery.lost();
            }
            loop {
                match reconnects.try_recv() {
                    // A missed event is handled like one: subscribing again is harmless.
                    Ok(server) => recovery.reconnected(self.reconnected(
                        &mut subscribed,
                        &mut owners,
                        sharded.then_some(&server),
                    )),
                    Err(TryRecvError::Lagged(_)) => {
                        recovery.reconnected(self.reconnected(&mut subscribed, &mut owners, None))
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return,
                }
            }
            if sharded && Instant::now() >= next_check {
                let moved = self.moved(&redis, &owners).await;
                if !moved.is_empty() {
                    tracing::warn!(
                        channels = moved.len(),
                        "the slots of subscribed channels moved to another node (failover or \
                         migration): subscribing them on their new owner"
                    );
                    owners.retain(|t, _| !moved.contains(t));
                    recovery.lost();
                    recovery.reconnected(
                        self.subscriptions_lost(&mut subscribed, |t| moved.contains(t)),
                    );
                }
                next_check = Instant::now() + OWNERS_CHECK;
            }
            let (work, still) = self.plan(&subscribed);
            if !still.is_empty() {
                self.confirmed(still).await;
            }
            if work.is_empty() {
                self.metrics.channels.set(subscribed.len() as i64);
                recovery.done(&self.metrics, self.history.is_some());
                tokio::select! {
                    () = self.dirty.notified() => {}
                    () = tokio::time::sleep_until(next_check), if sharded && !owners.is_empty() => {}
                    event = reconnects.recv() => match event {
                        Ok(server) => recovery.reconnected(self.reconnected(
                            &mut subscribed,
                            &mut owners,
                            sharded.then_some(&server),
                        )),
                        Err(RecvError::Lagged(_)) => recovery.reconnected(self.reconnected(
                            &mut subscribed,
                            &mut owners,
                            None,
                        )),
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
            for (topics, subscribe) in [(joins, true), (leaves, false)] {
                let (patterns, channels): (Vec<Topic>, Vec<Topic>) = topics
                    .into_iter()
                    .map(|(t, _)| t)
                    .partition(|t| matches!(t, Topic::Pattern(_)));
                for (topics, pattern) in [(channels, false), (patterns, true)] {
                    if topics.is_empty() {
                        continue;
                    }
                    if sharded && !pattern {
                        let (done, failure) = self
                            .shard_subscribe(&redis, topics, subscribe, &mut owners)
                            .await;
                        if subscribe && !done.is_empty() {
                            self.activate(&done);
                            if self.history.is_some() {
                                let _ = self.requests.send(Request::Activated(done.clone())).await;
                            }
                        }
                        for t in done {
                            if subscribe {
                                subscribed.insert(t);
                            } else {
                                subscribed.remove(&t);
                            }
                        }
                        if let Some((e, left)) = failure {
                            tracing::warn!(error = %e, subscribe, "Redis (un)subscribe (sharded) failed; will retry");
                            self.lock().dirty.extend(left);
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        continue;
                    }
                    let names = self.redis_names(&topics);
                    let result = match (subscribe, pattern) {
                        // fred resolves SUBSCRIBE once written; the PING's answer comes after
                        // Redis ran it, so then the subscription is active.
                        (true, false) => match redis.subscribe(names).await {
                            Ok(()) => redis.ping::<Value>(None).await.map(drop),
                            Err(e) => Err(e),
                        },
                        (true, true) => match redis.psubscribe(names).await {
                            Ok(()) => redis.ping::<Value>(None).await.map(drop),
                            Err(e) => Err(e),
                        },
                        (false, false) => redis.unsubscribe(names).await,
                        (false, true) => redis.punsubscribe(names).await,
                    };
                    match result {
                        Ok(()) => {
                            if subscribe {
                                self.confirmed(topics.clone()).await;
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
            }
            self.metrics.channels.set(subscribed.len() as i64);
        }
    }

    /// What the reconciler must do for the dirty topics: each to (un)subscribe, with whether
    /// it is wanted; and, second, those still subscribed whose entry is inactive. A topic left
    /// and joined again before the reconciler saw it is wanted and still subscribed (no
    /// UNSUBSCRIBE was sent): it needs no command, but its entry is new, and its clients would
    /// wait for an activation no command would bring (seen in CI: a handshake hung for 10 s).
    fn plan(&self, subscribed: &HashSet<Topic>) -> (Vec<(Topic, bool)>, Vec<Topic>) {
        let mut work = Vec::new();
        let mut still = Vec::new();
        let mut state = self.lock();
        let dirty: Vec<Topic> = state.dirty.drain().collect();
        for topic in dirty {
            let (wanted, active) = state
                .topics
                .get(&topic)
                .map_or((false, false), |entry| (true, entry.active));
            match (wanted, subscribed.contains(&topic)) {
                (true, true) if !active => still.push(topic),
                (wanted, subscribed) if wanted != subscribed => work.push((topic, wanted)),
                _ => {}
            }
        }
        (work, still)
    }

    /// Redis has `topics` subscribed: wake their waiting clients and, with history, have the
    /// reader note where each stream stands (or resume it after a loss).
    async fn confirmed(&self, topics: Vec<Topic>) {
        self.activate(&topics);
        if self.history.is_some() {
            let _ = self.requests.send(Request::Activated(topics)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update under this lock is a single insert/remove; a poisoned lock is consistent.
        crate::lock(&self.state)
    }
}

/// What a resumption read found.
enum Resumed {
    After(retained::After),
    /// The topic never delivered an id: there is nothing to resume from.
    NothingToResume,
    /// Where the stream stood when the topic was first subscribed.
    Anchor(Vec<retained::Entry>),
}

/// The order of what arrives on the subscriber connection, which is how live messages get
/// their ids and how the copies of one PUBLISH matched by several patterns are told apart.
///
/// The history script publishes a batch's ids on the ids channel and then the batch's
/// messages, atomically: nothing else arrives in between. So the ids message names the ids
/// of the next messages of its channel, in order. One PUBLISH reaches this connection as the
/// channel's `message` (if subscribed) followed by one `pmessage` per matching pattern.
#[derive(Default)]
struct Order {
    /// The ids of the next messages of this channel, and whether any was taken yet.
    ids: Option<(ChannelName, std::collections::VecDeque<StreamId>, bool)>,
    /// The channel and id of the `message` just delivered, for the `pmessage`s that follow.
    current: Option<(ChannelName, Option<StreamId>)>,
    /// Copies of a pattern message still to come (one per further matching pattern): a
    /// copy has the same channel and the same payload.
    copies: Option<(ChannelName, Message, usize)>,
    /// In a cluster: the ids announced for each channel. A script's ids and messages come in
    /// order from their shard's connection, but the shards' connections interleave.
    shards: HashMap<ChannelName, std::collections::VecDeque<StreamId>>,
}

impl Order {
    /// An ids message (SPUBLISHed, in a cluster) for `channel`.
    fn shard_ids(&mut self, channel: ChannelName, value: &Value) {
        let Some(text) = value.as_str() else {
            return;
        };
        let ids = text.split(' ').filter_map(|id| id.parse().ok()).collect();
        self.shards.insert(channel, ids);
    }

    /// The id of an `smessage` on `channel`, if its ids message announced it.
    fn shard_message(&mut self, channel: &ChannelName) -> Option<StreamId> {
        let ids = self.shards.get_mut(channel)?;
        let id = ids.pop_front();
        if ids.is_empty() {
            self.shards.remove(channel);
        }
        id
    }

    /// An ids message for `channel`.
    fn ids(&mut self, channel: ChannelName, value: &Value) {
        let Some(text) = value.as_str() else {
            return;
        };
        let ids: std::collections::VecDeque<StreamId> =
            text.split(' ').filter_map(|id| id.parse().ok()).collect();
        // The same ids message may come twice (the ids channel and a pattern matching it).
        if let Some((pending, pending_ids, false)) = &self.ids {
            if *pending == channel && *pending_ids == ids {
                return;
            }
        }
        self.ids = Some((channel, ids, false));
        self.current = None;
        self.copies = None;
    }

    /// The id of the next message of `channel`, if an ids message announced it.
    fn take_id(&mut self, channel: &ChannelName) -> Option<StreamId> {
        match &mut self.ids {
            Some((pending, ids, taken)) if pending == channel => {
                *taken = true;
                let id = ids.pop_front();
                if ids.is_empty() {
                    self.ids = None;
                }
                id
            }
            // A message of another channel: whatever was announced does not concern it.
            Some(_) => {
                self.ids = None;
                None
            }
            None => None,
        }
    }

    /// A `message` on `channel`: a new PUBLISH. Without `history` there are no ids.
    fn message(&mut self, channel: &ChannelName, history: bool) -> Option<StreamId> {
        self.copies = None;
        if !history {
            return None;
        }
        let id = self.take_id(channel);
        self.current = Some((channel.clone(), id));
        id
    }

    /// Whether a `pmessage` on `channel` is a further copy of the PUBLISH just delivered.
    fn is_copy(&mut self, channel: &ChannelName, frame: &Message) -> bool {
        match &mut self.copies {
            Some((last, payload, left)) if *left > 0 && last == channel && payload == frame => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }

    /// The id of a `pmessage` that starts a PUBLISH's deliveries to patterns.
    fn pattern_message(&mut self, channel: &ChannelName) -> Option<StreamId> {
        match self.current.take() {
            Some((current, id)) if current == *channel => id,
            _ => self.take_id(channel),
        }
    }

    fn copies_follow(&mut self, channel: &ChannelName, frame: &Message, copies: usize) {
        self.copies = (copies > 0).then(|| (channel.clone(), frame.clone(), copies));
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
    /// With `history`, what was published meanwhile is then resumed from the streams.
    fn done(&mut self, metrics: &Metrics, history: bool) {
        if let Some((since, channels)) = self.pending.take() {
            let gap = since.elapsed();
            metrics.resubscribed(channels as u64, gap);
            if history {
                tracing::warn!(
                    channels,
                    unsubscribed_ms = gap.as_millis() as u64,
                    "re-subscribed after losing the subscriber connection; resuming each \
                     channel from its history"
                );
            } else {
                tracing::warn!(
                    channels,
                    unsubscribed_ms = gap.as_millis() as u64,
                    "re-subscribed after losing the subscriber connection; what was published \
                     meanwhile did not reach this relay"
                );
            }
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
/// The direct writes go in batches, one system call each where the thread has a ring.
fn fan_out(
    subscribers: &Slab<Arc<Outbox>>,
    frame: &Message,
    encoded: Option<&EncodedFrame>,
    mine: impl Fn(usize) -> bool,
) -> Tally {
    let mut tally = Tally::default();
    let mut count = |pushed| match pushed {
        Pushed::Queued | Pushed::Closed => {}
        Pushed::Written => tally.written += 1,
        Pushed::Skipped(n) => tally.skipped += n as u64,
        Pushed::Overflowed(n) => tally.discarded += n as u64 + 1,
    };
    let mut direct = encoded.map(|encoded| DirectWrites::new(frame, encoded));
    for (_, outbox) in subscribers.iter().filter(|(key, _)| mine(*key)) {
        match direct.as_mut() {
            Some(direct) => direct.push(outbox, &mut count),
            None => count(outbox.push(frame.clone())),
        }
    }
    if let Some(direct) = direct.as_mut() {
        direct.flush(&mut count);
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

    /// While a replay or a resume is being read, a message with an id waits (the stream has
    /// it), but one without (a plain PUBLISH) is in no stream: holding it back lost it (seen
    /// in CI: a `redis-cli -c SPUBLISH` during a resume after CLIENT KILL never arrived).
    #[test]
    fn a_seam_holds_back_only_what_the_stream_has() {
        let id: StreamId = "5-0".parse().unwrap();
        assert!(Floor::Waiting.holds_back(Some(id)));
        assert!(!Floor::Waiting.holds_back(None));
        assert!(Floor::UpTo(id).holds_back(Some("4-9".parse().unwrap())));
        assert!(!Floor::UpTo(id).holds_back(Some("5-1".parse().unwrap())));
        assert!(!Floor::UpTo(id).holds_back(None));
    }

    /// A resume read that started before the subscription was lost again (or before it was
    /// confirmed) cannot have seen what was published in the later gap: it must leave the
    /// topic waiting for the next resume. Seen in CI: a cluster failover moved the slot, fred
    /// then reconnected to the new owner while the first resume's XRANGE was in flight, and
    /// that resume's end let live messages through, so no second resume read the gap.
    #[test]
    fn only_a_resume_read_after_the_latest_confirmed_subscription_ends_the_wait() {
        let mut entry = Entry {
            active: true,
            resume: Some(Floor::Waiting),
            losses: 1,
            ..Entry::default()
        };
        let upto = Some(Floor::UpTo("7-0".parse().unwrap()));
        // Read started while subscribed after loss 1; lost again before it ended.
        let started = entry.active.then_some(entry.losses);
        entry.losses += 1;
        entry.active = false;
        entry.resumed(started, upto);
        assert_eq!(
            entry.resume,
            Some(Floor::Waiting),
            "a later loss keeps the wait"
        );
        // Read started while the subscription was not confirmed yet.
        let started = entry.active.then_some(entry.losses);
        entry.active = true;
        entry.resumed(started, upto);
        assert_eq!(
            entry.resume,
            Some(Floor::Waiting),
            "an unconfirmed read keeps it"
        );
        // Read started after the latest confirmed subscription: the seam is its newest id.
        let started = entry.active.then_some(entry.losses);
        entry.resumed(started, upto);
        assert_eq!(entry.resume, upto);
    }

    /// Only the first join and the last leave of a topic give the reconciler work: one
    /// SUBSCRIBE per topic per process, whatever the number of clients.
    #[test]
    fn first_join_and_last_leave_mark_a_topic_dirty_and_nothing_else_does() {
        let hub = Hub::new(Metrics::new(), None);
        let a = hub.join(topic("t"), Format::Raw, outbox(), false);
        assert_eq!(dirty(&hub), vec![topic("t")]);
        let b = hub.join(topic("t"), Format::Raw, outbox(), false);
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
        let hub = Hub::new(Metrics::new(), None);
        let _member = hub.join(topic("t"), Format::Raw, outbox(), false);
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

    /// A large message to enough raw and binary clients goes out from one shared memory file
    /// (their frames carry the shared payload); to fewer, from memory.
    #[tokio::test]
    async fn a_large_message_to_many_clients_shares_a_memory_file() {
        let hub = Hub::new(Metrics::new(), None);
        let t = topic("t");
        let channel = ChannelName::from_redis(Bytes::from_static(b"t"));
        let mut members = Vec::new();
        let mut outboxes = Vec::new();
        for n in 0..pages::MIN_READERS {
            let outbox = outbox();
            let format = if n == 0 { Format::Binary } else { Format::Raw };
            members.push(hub.join(t.clone(), format, outbox.clone(), false));
            outboxes.push(outbox);
            let large = Message::binary(vec![n as u8; pages::MIN_BYTES]);
            hub.deliver(&t, &channel, None, large, false, None, false)
                .await;
        }
        for (n, outbox) in outboxes.iter().enumerate() {
            let mut frames = std::collections::VecDeque::new();
            outbox.take_now(&mut frames);
            let last = frames.pop_back().expect("a frame").into_data();
            assert_eq!(last.len(), pages::MIN_BYTES);
            // Only the last message went to as many clients as a file needs.
            assert!(pages::file_of(&last).is_some(), "client {n}, last message");
            for earlier in frames {
                assert!(pages::file_of(&earlier.into_data()).is_none(), "client {n}");
            }
        }
    }

    /// A topic left and joined again before the reconciler ran is still subscribed in Redis:
    /// no command is due, and the new client is let in at once, not left waiting for an
    /// activation that no command would bring.
    #[tokio::test]
    async fn a_topic_left_and_joined_again_before_the_reconciler_ran_is_active_at_once() {
        let hub = Hub::new(Metrics::new(), None);
        let first = hub.join(topic("t"), Format::Raw, outbox(), false);
        let (work, _) = hub.plan(&HashSet::new());
        assert_eq!(work, vec![(topic("t"), true)]);
        hub.activate(&[topic("t")]);
        let subscribed = HashSet::from([topic("t")]);

        drop(first);
        let _again = hub.join(topic("t"), Format::Raw, outbox(), false);
        let (work, still) = hub.plan(&subscribed);
        assert!(
            work.is_empty(),
            "nothing to send: it was never unsubscribed"
        );
        assert_eq!(still, vec![topic("t")]);
        hub.confirmed(still).await;
        assert!(
            hub.wait_active(&topic("t"), Duration::from_millis(20))
                .await
        );
    }

    /// A client waiting for its topic is woken by the activation, not by its patience.
    #[tokio::test]
    async fn a_waiting_client_is_woken_when_its_topic_becomes_active() {
        let hub = Hub::new(Metrics::new(), None);
        let _member = hub.join(topic("t"), Format::Raw, outbox(), false);
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
