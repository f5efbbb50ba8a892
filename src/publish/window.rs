//! The publish window: one client's messages → Redis PUBLISH, pipelined and in order (SPEC §3).
//!
//! Owns: the [`Publisher`] (a small pool of fred clients, each pipelining many PUBLISHes on
//! one connection) and the [`PublishWindow`] of one client: what one read brought goes out as
//! one fred pipeline; at most `--publish-window` PUBLISHes in flight, completed in order, one
//! older than `--redis-timeout` failing the window. A full window is how back-pressure
//! reaches TCP: the session stops reading.
//! Must not: drop a message silently. A message either gets Redis's receiver count or its
//! client is closed (1013) and the loss is counted.
//! With `--history N` (SPEC §9) a batch is instead ONE `EVALSHA` of [`history::SCRIPT`]
//! (XADD each message, set the TTL, PUBLISH the ids then the messages), whose array answer
//! is split into one receiver count per message: acks are the same as without history. A
//! A batch sent while nothing else of the window is in flight goes with a `SCRIPT LOAD` in
//! front, in the same pipeline; a batch sent behind others relies on them (same connection,
//! run in order) having loaded it. So the script is never missing for a batch, and no other
//! client's reload can let a later batch of this window run before an earlier one that met
//! NOSCRIPT — unless the script cache is flushed (`SCRIPT FLUSH`, a failover to a replica)
//! between two batches in flight. Then Redis answers NOSCRIPT without running anything: the
//! window waits for what it has in flight, loads the script and sends again, in order, every
//! batch that met NOSCRIPT and every batch held meanwhile (a later batch that did run first
//! is logged).
//! In a cluster (`--redis-mode cluster`, SPEC §11) a batch is SPUBLISHes, or the EVALSHA of
//! the SPUBLISHing script, and SCRIPT LOAD and EVALSHA go to the node owning the channel's
//! slot: one channel is one slot, one shard, one connection, so order holds as on one Redis.
//! A batch that meets MOVED/ASK (its slot is migrating) fails: fred counts following the
//! redirect as a second attempt, and commands are written once, so its client is closed with
//! 1013 and resends; nothing unacknowledged is taken for delivered.
//! An auth check sits before a window is created, in the HTTP layer.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fred::bytes_utils::Str;
use fred::clients::{Client, Pool};
use fred::interfaces::{ClientLike, PubsubInterface};
use fred::types::{ClusterHash, CustomCommand, Value};
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use tokio::time::Instant;

use crate::server::channel::ChannelName;
use crate::server::history;
use crate::server::metrics::{DropReason, Metrics};
use crate::server::session::Inbound;
use crate::server::status::Seat;

/// Why publishing failed; the text is the reason of the 1013 close or the 503 body.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    #[error("redis unavailable for {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Redis(#[from] fred::error::Error),
}

/// The process's PUBLISH connections, and what they write history with (if they do).
#[derive(Clone)]
pub(crate) struct Publisher {
    pool: Pool,
    history: Option<Arc<History>>,
}

/// What every history batch shares (SPEC §9): the script, the SHA1 that EVALSHA names it
/// by (computed once), and MAXLEN and the TTL as its arguments.
pub(crate) struct History {
    sha: Str,
    script: Str,
    maxlen: Value,
    ttl_ms: Value,
    /// When a NOSCRIPT reload was last logged (seconds since the Unix epoch): once per
    /// reload, not once per window that met it.
    logged: AtomicU64,
}

impl History {
    /// `--history N` / `--history-ttl D`; `None` when history is off (N = 0).
    /// `sharded` (`--redis-mode cluster`): the script SPUBLISHes.
    pub fn new(keep: u32, ttl: Duration, sharded: bool) -> Option<Arc<History>> {
        use sha1::Digest;
        let script = history::script(sharded);
        let sha: String = sha1::Sha1::digest(script.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        (keep > 0).then(|| {
            Arc::new(History {
                sha: Str::from(sha),
                script: Str::from(script.clone()),
                maxlen: Value::Integer(i64::from(keep)),
                ttl_ms: Value::Integer(ttl_ms),
                logged: AtomicU64::new(0),
            })
        })
    }

    fn log_reload(&self, channel: &Str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.logged.swap(now, Ordering::Relaxed) != now {
            tracing::info!(
                channel = &**channel,
                "the history script was not in redis (first use, or redis restarted or flushed its scripts): loaded it, resending"
            );
        }
    }
}

impl Publisher {
    pub fn new(pool: Pool, history: Option<Arc<History>>) -> Self {
        Publisher { pool, history }
    }

    /// The connection that carries every PUBLISH on `channel`, from every client of this
    /// process: a channel's messages stay in order because they all travel, pipelined, on
    /// this one connection. That holds across a client's reconnects too: what an ack client
    /// resends after a 1013 goes after (never before) what its abandoned window had left
    /// in the same connection.
    pub fn client_for(&self, channel: &ChannelName) -> Client {
        use std::hash::{Hash, Hasher};
        let clients = self.pool.clients();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        channel.hash(&mut hasher);
        clients[hasher.finish() as usize % clients.len()].clone()
    }

    pub fn clients(&self) -> &[Client] {
        self.pool.clients()
    }
}

/// One batch of PUBLISHes, sent as one pipeline; resolves to each one's receiver count.
type BatchFuture = Pin<Box<dyn Future<Output = Vec<Answer>> + Send>>;

/// Redis's answer to one PUBLISH: its receiver count.
type Answer = Result<i64, fred::error::Error>;

/// The messages of one batch: when it was started, and each one's size.
struct Batch {
    started: Instant,
    /// Kept (shared, not copied) so that a batch fred never wrote can be sent again.
    payloads: Vec<Bytes>,
    /// How many times it was sent again because fred never wrote it or Redis lacked the
    /// history script.
    resent: u8,
    state: BatchState,
}

enum BatchState {
    /// With fred or Redis; its future is in `in_flight` (in batch order).
    InFlight,
    /// Redis answered; handed out once every older batch has been.
    Answered(Vec<Answer>),
    /// Not sent (again) yet: it met NOSCRIPT, or was sent while a reload was pending.
    Held,
}

/// How many times a batch fred could not route (never written), or that met NOSCRIPT, is
/// sent again.
const MAX_RESENDS: u8 = 8;

/// EVALSHA, routed (in a cluster) to the shard of `slot`, its key's.
fn evalsha_command(slot: u16) -> CustomCommand {
    CustomCommand::new_static("EVALSHA", ClusterHash::Custom(slot), false)
}

/// SCRIPT (LOAD), routed (in a cluster) to the shard of `slot`, where the EVALSHA behind it
/// goes: each node has its own script cache.
fn script_command(slot: u16) -> CustomCommand {
    CustomCommand::new_static("SCRIPT", ClusterHash::Custom(slot), false)
}

/// Redis's answer to an EVALSHA of a script it does not have: nothing ran.
fn no_script(answers: &[Answer]) -> bool {
    matches!(answers, [Err(e)] if e.details().starts_with("NOSCRIPT"))
}

/// The history script's answer (an array of receiver counts), one [`Answer`] per message;
/// an error stands alone, as fred answers a pipeline it could not send.
fn split_counts(answer: Option<Result<Value, fred::error::Error>>) -> Vec<Answer> {
    match answer {
        Some(Ok(Value::Array(counts))) => counts
            .into_iter()
            .map(|count| {
                count
                    .as_i64()
                    .ok_or_else(|| internal_error("the history script answered a non-integer"))
            })
            .collect(),
        Some(Err(e)) => vec![Err(e)],
        Some(Ok(_)) => vec![Err(internal_error("the history script answered no array"))],
        None => vec![Err(internal_error("no answer to the history script"))],
    }
}

/// fred's answer to a command it never wrote to Redis: it met a connection being replaced
/// (fred 10.1.0, `router/commands.rs`). Only such a command is safe to send again.
fn never_written(answer: &Answer) -> bool {
    matches!(answer, Err(e) if *e.kind() == fred::error::ErrorKind::Unknown
        && e.details() == "Failed to route command.")
}

/// One client's PUBLISHes in flight, answered in the order they were sent.
///
/// Messages are gathered with [`Self::push`] and put on the wire by [`Self::send`] as one
/// fred pipeline per batch (one future and one router command for the lot, instead of one
/// each: fred's future for a lone PUBLISH is ~6.8 KB). A batch goes to fred's router when
/// `send` is called, so batches reach Redis in the order they were sent, however the
/// futures are polled afterwards.
pub(crate) struct PublishWindow {
    client: Client,
    /// fred names channels with UTF-8 strings; ours always are (a UTF-8 prefix + ASCII path).
    channel: Str,
    /// With `--history`: the script, and the channel its ids go out on first.
    history: Option<(Arc<History>, Bytes)>,
    /// In a cluster: SPUBLISH, not PUBLISH.
    sharded: bool,
    /// The channel's cluster slot: where SCRIPT LOAD and EVALSHA go (fred would hash their
    /// first argument, `LOAD` or the SHA1, and send them to another shard).
    slot: u16,
    /// A batch met NOSCRIPT: new batches are held until what is in flight has answered,
    /// then the script is loaded and every held batch sent, in order.
    reloading: bool,
    /// Pushed, not yet sent.
    gathering: Vec<Bytes>,
    gathering_since: Option<Instant>,
    in_flight: FuturesOrdered<BatchFuture>,
    batches: VecDeque<Batch>,
    /// Redis's answers for the oldest batch, not yet handed out.
    answered: VecDeque<Answer>,
    /// Messages pushed and not yet handed out by `poll_next`.
    len: usize,
    capacity: usize,
    timeout: Duration,
    metrics: Metrics,
}

impl PublishWindow {
    pub fn new(
        publisher: &Publisher,
        channel: ChannelName,
        capacity: usize,
        timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        let sharded = crate::redis::sharded();
        let history =
            (publisher.history.clone()).map(|h| (h, history::ids_channel(&channel, sharded)));
        let slot = crate::redis::slot(&channel.to_bytes());
        PublishWindow {
            sharded,
            slot,
            client: publisher.client_for(&channel),
            channel: Str::from(channel.to_string()),
            history,
            reloading: false,
            gathering: Vec::new(),
            gathering_since: None,
            in_flight: FuturesOrdered::new(),
            batches: VecDeque::new(),
            answered: VecDeque::new(),
            len: 0,
            capacity,
            timeout,
            metrics,
        }
    }

    /// Nothing pushed, gathering, in flight or held: the window can go.
    fn is_idle(&self) -> bool {
        self.len == 0 && self.batches.is_empty() && self.gathering.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Take one message for the next batch. The caller checks `is_full` first, and calls
    /// [`Self::send`] once it has pushed what it had.
    pub fn push(&mut self, payload: Bytes) {
        self.metrics.ws_in.add(1, payload.len() as u64);
        self.gathering_since.get_or_insert_with(Instant::now);
        self.gathering.push(payload);
        self.len += 1;
    }

    /// Send what was pushed since the last call, as one pipeline; how many messages that is.
    pub fn send(&mut self) -> usize {
        let Some(started) = self.gathering_since.take() else {
            return 0;
        };
        // Taken, not drained: an idle publisher keeps no buffer.
        let payloads = std::mem::take(&mut self.gathering);
        let sent = payloads.len();
        let state = if self.reloading {
            // It must not overtake a batch that met NOSCRIPT.
            BatchState::Held
        } else {
            // Alone, the batch loads the script itself (see the module's doc).
            let load = self.history.is_some() && self.in_flight.is_empty();
            self.in_flight.push_back(self.dispatch(&payloads, load));
            BatchState::InFlight
        };
        self.batches.push_back(Batch {
            started,
            payloads,
            resent: 0,
            state,
        });
        sent
    }

    /// Hand `payloads` to fred as one pipeline, now: one PUBLISH each, or with history one
    /// EVALSHA for the lot (preceded by SCRIPT LOAD when `load`).
    fn dispatch(&self, payloads: &[Bytes], load: bool) -> BatchFuture {
        let pipeline = self.client.pipeline();
        let channel = &self.channel;
        // A pipeline only queues each command in memory, so each future is ready at once;
        // `unconstrained`: tokio's co-operative budget must not make one wait.
        fn queued<T>(queue: impl Future<Output = Result<T, fred::error::Error>>) -> bool {
            matches!(
                tokio::task::unconstrained(queue).now_or_never(),
                Some(Ok(_))
            )
        }
        let mut sending: BatchFuture = match &self.history {
            // In a cluster: SPUBLISH, which fred routes by the channel (its first key) to the
            // shard owning its slot, so the whole batch, and every batch of this channel,
            // goes to one node on one connection, in order.
            None if self.sharded
                && payloads.iter().all(|payload| {
                    queued(pipeline.spublish::<Value, _, _>(channel.clone(), payload.clone()))
                }) =>
            {
                Box::pin(async move { pipeline.try_all::<i64>().await })
            }
            None if !self.sharded
                && payloads.iter().all(|payload| {
                    queued(pipeline.publish::<Value, _, _>(channel.clone(), payload.clone()))
                }) =>
            {
                Box::pin(async move { pipeline.try_all::<i64>().await })
            }
            Some((history, ids_channel)) => {
                // fred 10.1.0's pipelines have no EVALSHA method: it goes as written.
                let mut args = Vec::with_capacity(6 + payloads.len());
                args.push(Value::String(history.sha.clone()));
                args.push(Value::Integer(1));
                args.push(Value::String(channel.clone()));
                args.push(history.maxlen.clone());
                args.push(history.ttl_ms.clone());
                args.push(Value::Bytes(ids_channel.clone()));
                args.extend(payloads.iter().cloned().map(Value::Bytes));
                let load_queued = !load || {
                    let load = [
                        Value::from_static_str("LOAD"),
                        history.script.clone().into(),
                    ];
                    queued(pipeline.custom::<Value, _>(script_command(self.slot), load.to_vec()))
                };
                if load_queued
                    && queued(pipeline.custom::<Value, _>(evalsha_command(self.slot), args))
                {
                    // The EVALSHA's answer is the last; SCRIPT LOAD's, if any, tells nothing
                    // the EVALSHA's does not.
                    Box::pin(async move { split_counts(pipeline.try_all::<Value>().await.pop()) })
                } else {
                    let error = internal_error("could not queue an EVALSHA in a pipeline");
                    Box::pin(std::future::ready(vec![Err(error)]))
                }
            }
            None => {
                let error = internal_error("could not queue a PUBLISH in a pipeline");
                Box::pin(std::future::ready(vec![Err(error)]))
            }
        };
        // Its first poll hands the batch to fred's router: do it now, so batches reach Redis
        // in the order they were sent. The session's own poll registers its waker later.
        let noop = &mut Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(answers) = sending.as_mut().poll(noop) {
            sending = Box::pin(std::future::ready(answers));
        }
        sending
    }

    /// The receiver count of the oldest message in flight, once Redis accepted it; `Pending`
    /// while it is not (or nothing is in flight). `--redis-timeout` is the caller's to watch,
    /// through [`Self::deadline`].
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<i64, PublishError>> {
        // Bounded: each turn hands out answers, settles a completed future, or sends held
        // batches (each at most MAX_RESENDS times).
        while self.answered.is_empty() {
            if matches!(
                self.batches.front(),
                Some(Batch {
                    state: BatchState::Answered(_),
                    ..
                })
            ) {
                if let Err(error) = self.take_answers() {
                    return Poll::Ready(Err(self.fail(error.into())));
                }
                continue;
            }
            match self.in_flight.poll_next_unpin(cx) {
                Poll::Ready(Some(answers)) => self.settle(answers),
                _ if self.reloading && self.in_flight.is_empty() => self.reload(),
                _ => return Poll::Pending,
            }
        }
        match self.answered.pop_front() {
            Some(Ok(receivers)) => {
                self.len -= 1;
                Poll::Ready(Ok(receivers))
            }
            Some(Err(e)) => Poll::Ready(Err(self.fail(e.into()))),
            None => Poll::Pending,
        }
    }

    /// Record the answers of the oldest batch in flight (futures complete in the order they
    /// were sent, which is batch order).
    ///
    /// Two answers mean nothing ran, so the batch is sent again: the oldest batch came back
    /// unwritten as a whole (fred met a connection being replaced) and nothing sent after it
    /// is in flight (else it would overtake it); or it met NOSCRIPT: it is held, and so is
    /// everything sent after it until [`Self::reload`].
    fn settle(&mut self, answers: Vec<Answer>) {
        let lone = self.in_flight.is_empty();
        let reloading = self.reloading;
        let Some(index) =
            (self.batches.iter()).position(|batch| matches!(batch.state, BatchState::InFlight))
        else {
            return;
        };
        let held_before = index > 0
            && (self.batches.iter().take(index)).any(|b| matches!(b.state, BatchState::Held));
        let batch = &mut self.batches[index];
        let unwritten = !answers.is_empty() && answers.iter().all(never_written);
        if batch.resent < MAX_RESENDS && index == 0 && lone && !reloading && unwritten {
            batch.resent += 1;
            let payloads = std::mem::take(&mut batch.payloads);
            let sending = self.dispatch(&payloads, false);
            self.batches[index].payloads = payloads;
            self.in_flight.push_back(sending);
        } else if batch.resent < MAX_RESENDS && self.history.is_some() && no_script(&answers) {
            batch.resent += 1;
            batch.state = BatchState::Held;
            self.reloading = true;
        } else {
            if held_before && answers.iter().any(Result::is_ok) {
                // Something loaded the script between an older batch's NOSCRIPT and this
                // one (another window): this one ran first. Nothing is lost or doubled.
                tracing::warn!(
                    channel = &*self.channel,
                    "a history batch ran before an older one that met NOSCRIPT"
                );
            }
            batch.state = BatchState::Answered(answers);
        }
    }

    /// Everything sent before the NOSCRIPT has answered: load the script and send every
    /// held batch again, in order, in one go.
    fn reload(&mut self) {
        self.reloading = false;
        if let Some((history, _)) = &self.history {
            history.log_reload(&self.channel);
        }
        let mut load = true;
        for index in 0..self.batches.len() {
            if !matches!(self.batches[index].state, BatchState::Held) {
                continue;
            }
            let payloads = std::mem::take(&mut self.batches[index].payloads);
            let sending = self.dispatch(&payloads, load);
            load = false;
            let batch = &mut self.batches[index];
            batch.payloads = payloads;
            batch.state = BatchState::InFlight;
            self.in_flight.push_back(sending);
        }
    }

    /// Count what Redis accepted of the oldest batch (answered); keep its answers for
    /// `poll_next`.
    fn take_answers(&mut self) -> Result<(), fred::error::Error> {
        let batch = self.batches.pop_front();
        let batch = batch.ok_or_else(|| internal_error("an answer to no batch"))?;
        let BatchState::Answered(answers) = batch.state else {
            return Err(internal_error("an unanswered batch taken"));
        };
        if answers.len() != batch.payloads.len() {
            // fred answers a pipeline it could not send with one error.
            let error = answers.into_iter().find_map(Result::err);
            return Err(error.unwrap_or_else(|| internal_error("a pipeline's answers miscounted")));
        }
        // Counted up to the first error (the window fails there).
        let accepted = answers.iter().take_while(|a| a.is_ok()).count();
        let waited = batch.started.elapsed().as_secs_f64();
        for _ in 0..accepted {
            self.metrics.publish_latency.observe(waited);
        }
        let bytes: usize = batch.payloads[..accepted].iter().map(Bytes::len).sum();
        self.metrics.redis_out.add(accepted as u64, bytes as u64);
        self.answered = answers.into();
        Ok(())
    }

    /// When the oldest message in flight has waited `--redis-timeout`.
    pub fn deadline(&self) -> Option<Instant> {
        self.batches
            .front()
            .map(|batch| batch.started)
            .or(self.gathering_since)
            .map(|started| started + self.timeout)
    }

    /// Give up on the window: Redis did not answer within `--redis-timeout`.
    pub fn time_out(&mut self) -> PublishError {
        self.fail(PublishError::Timeout(self.timeout))
    }

    /// Wait for the next completion, or the timeout. Cancel-safe.
    pub async fn next(&mut self) -> Result<i64, PublishError> {
        self.send();
        let Some(deadline) = self.deadline() else {
            return std::future::pending().await;
        };
        match tokio::time::timeout_at(deadline, std::future::poll_fn(|cx| self.poll_next(cx))).await
        {
            Ok(result) => result,
            Err(_) => Err(self.time_out()),
        }
    }

    fn fail(&mut self, error: PublishError) -> PublishError {
        // The window is abandoned: whatever is still in flight may or may not reach Redis,
        // and its client will not get an ack for it (an ack-mode client resends it).
        self.metrics
            .dropped(DropReason::publish_failed, self.len as u64);
        self.gathering.clear();
        self.gathering_since = None;
        self.reloading = false;
        self.in_flight = FuturesOrdered::new();
        self.batches.clear();
        self.answered.clear();
        self.len = 0;
        error
    }
}

/// What every client window (and every `POST`) of a process shares: the PUBLISH connections,
/// the window's size and `--redis-timeout`.
pub(crate) struct Windows {
    publisher: Publisher,
    capacity: usize,
    timeout: Duration,
    metrics: Metrics,
}

impl Windows {
    /// `--publish-window` and `--redis-timeout` from `common`, for every window of `publisher`.
    pub fn new(
        publisher: Publisher,
        common: &crate::server::config::CommonArgs,
        metrics: &Metrics,
    ) -> Arc<Self> {
        Arc::new(Windows {
            publisher,
            capacity: common.publish_window as usize,
            timeout: common.redis_timeout,
            metrics: metrics.clone(),
        })
    }

    /// Publish one `POST` body on `channel` within `--redis-timeout`.
    pub async fn post(&self, channel: ChannelName, body: Bytes) -> Result<i64, String> {
        publish_once(&self.publisher, &channel, body, self.timeout, &self.metrics)
            .await
            .map_err(|e| e.to_string())
    }

    /// A client's window on `channel`, counting what it publishes on `seat` (the publish
    /// server's `/status.json` rates) if given.
    pub fn on(self: &Arc<Self>, channel: ChannelName, seat: Option<Seat>) -> OnDemand {
        OnDemand {
            windows: self.clone(),
            channel,
            seat,
            window: None,
        }
    }
}

/// A client's publish window, made when its first message comes and dropped at the first ping
/// that finds all it took completed (or failed): an idle publisher holds none (the box, its
/// queues and its channel's name as fred wants it, ~400 bytes), and a bursty one does not
/// make and drop a window (its channel's name, ids channel and slot computed again, its
/// queues grown again) per burst. A window made again later uses the same
/// connection as the one before ([`Publisher::client_for`]), so order holds across them.
pub(crate) struct OnDemand {
    windows: Arc<Windows>,
    channel: ChannelName,
    seat: Option<Seat>,
    window: Option<Box<PublishWindow>>,
}

impl OnDemand {
    fn window(&mut self) -> &mut PublishWindow {
        let (windows, channel) = (&self.windows, &self.channel);
        self.window.get_or_insert_with(|| {
            Box::new(PublishWindow::new(
                &windows.publisher,
                channel.clone(),
                windows.capacity,
                windows.timeout,
                windows.metrics.clone(),
            ))
        })
    }
}

/// The session drives a window through [`Inbound`]; errors become the 1013's reason.
impl Inbound for OnDemand {
    fn push(&mut self, payload: Bytes) {
        self.window().push(payload);
    }
    fn send(&mut self) {
        if let Some(window) = &mut self.window {
            let sent = window.send();
            if let Some(seat) = &self.seat {
                seat.count(sent);
            }
        }
    }
    fn is_full(&self) -> bool {
        self.window.as_ref().is_some_and(|w| w.is_full())
    }
    fn is_empty(&self) -> bool {
        self.window.as_ref().is_none_or(|w| w.is_empty())
    }
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<i64, String>> {
        let Some(window) = &mut self.window else {
            return Poll::Pending;
        };
        window.poll_next(cx).map_err(|e| e.to_string())
    }
    fn deadline(&self) -> Option<Instant> {
        self.window.as_ref().and_then(|w| w.deadline())
    }
    fn time_out(&mut self) -> String {
        let why = self.window().time_out().to_string();
        self.release_if_idle();
        why
    }
    fn release_if_idle(&mut self) {
        if self.window.as_ref().is_some_and(|w| w.is_idle()) {
            self.window = None;
        }
    }
}

fn internal_error(what: &'static str) -> fred::error::Error {
    fred::error::Error::new(fred::error::ErrorKind::Unknown, what)
}

/// Publish one message outside any WebSocket (HTTP POST), within `timeout`.
async fn publish_once(
    publisher: &Publisher,
    channel: &ChannelName,
    payload: Bytes,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<i64, PublishError> {
    let mut window = PublishWindow::new(publisher, channel.clone(), 1, timeout, metrics.clone());
    window.push(payload);
    window.next().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::prelude::Builder;
    use std::task::Waker;

    /// A window on a pool that never connects: what it sends waits, as during an outage.
    fn window(capacity: usize, metrics: &Metrics) -> PublishWindow {
        let pool = Builder::default_centralized().build_pool(1).unwrap();
        let channel = ChannelName::from_redis(Bytes::from_static(b"lightlevel/unit"));
        let timeout = Duration::from_secs(10);
        PublishWindow::new(
            &Publisher::new(pool, None),
            channel,
            capacity,
            timeout,
            metrics.clone(),
        )
    }

    /// The window bounds what is in flight (back-pressure), its deadline is the oldest
    /// message's start plus --redis-timeout, and giving up counts every abandoned message.
    #[tokio::test(start_paused = true)]
    async fn a_full_window_waits_then_times_out_and_counts_what_it_abandoned() {
        let metrics = Metrics::new();
        let mut window = window(3, &metrics);
        assert_eq!(window.deadline(), None);
        let started = Instant::now();
        window.push(Bytes::from_static(b"a"));
        window.push(Bytes::from_static(b"b"));
        assert!(!window.is_full());
        window.send();
        tokio::time::advance(Duration::from_secs(4)).await;
        window.push(Bytes::from_static(b"c"));
        window.send();
        assert!(
            window.is_full(),
            "three in flight: the session stops reading"
        );
        // The oldest batch sets the deadline, not the newest.
        assert_eq!(window.deadline(), Some(started + Duration::from_secs(10)));
        let cx = &mut Context::from_waker(Waker::noop());
        assert!(window.poll_next(cx).is_pending(), "nothing answered yet");

        let error = window.time_out();
        assert!(matches!(error, PublishError::Timeout(_)), "{error}");
        assert!(window.is_empty() && !window.is_full());
        assert_eq!(window.deadline(), None);
        assert!(window.poll_next(cx).is_pending());
        let text = metrics.render(crate::server::metrics::Exposition::Text004);
        assert!(
            text.contains("lightrelay_dropped_total{reason=\"publish_failed\"} 3"),
            "{text}"
        );
    }

    /// The script's array answer becomes one receiver count per message; NOSCRIPT (nothing
    /// ran) is told apart from other errors.
    #[test]
    fn a_history_answer_splits_into_one_count_per_message() {
        use fred::error::{Error, ErrorKind};
        let counts = Value::Array(vec![Value::Integer(2), Value::Integer(0)]);
        let split = split_counts(Some(Ok(counts)));
        assert_eq!(
            split
                .iter()
                .map(|a| *a.as_ref().unwrap())
                .collect::<Vec<_>>(),
            [2, 0]
        );
        let missing = Error::new(ErrorKind::Unknown, "NOSCRIPT No matching script.");
        assert!(no_script(&split_counts(Some(Err(missing)))));
        let other = Error::new(ErrorKind::Unknown, "OOM command not allowed");
        assert!(!no_script(&split_counts(Some(Err(other)))));
        assert!(split_counts(Some(Ok(Value::Integer(1))))[0].is_err());
    }

    /// Only fred's "never written" answer is safe to send again.
    #[test]
    fn only_an_unrouted_command_counts_as_never_written() {
        use fred::error::{Error, ErrorKind};
        let unrouted = Err(Error::new(ErrorKind::Unknown, "Failed to route command."));
        let closed = Err(Error::new(ErrorKind::IO, "Connection closed."));
        assert!(never_written(&unrouted));
        assert!(!never_written(&closed));
        assert!(!never_written(&Ok(1)));
    }
}
