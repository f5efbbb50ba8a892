//! `lightrelay bench`: the load generator behind `bin/bench` (issue 6).
//!
//! Owns: each scenario's sequence — open subscribers, connect publishers, wait until every
//! subscriber receives a probe (subscribed end to end; a subscribe URL with `format=json`
//! makes the messages text and reads them out of the envelope), measure (CPU and RSS of each `--pid`
//! from the first message to the last delivery), drain, report — and the exit code.
//! The parts: [`args`] (flags), [`wire`] (hand-written WebSocket and HTTP/1.1 framing),
//! [`subscribers`] (receiving connections), [`publishers`] (redis/ws/http lanes), [`storm`]
//! (the connection storm: handshakes as fast as the server answers them), [`stats`] (counts,
//! loss, order, latency), [`procstat`] (/proc sampling), [`report`] (table, JSON).
//! Before a run that holds many connections, the open-file limit is raised to the hard one
//! (a run it cannot hold is refused up front).
//! A run that cannot go on is a [`BenchError`]: one line on stderr, exit 1.
//! Fan-out and latency subscribers may be `wss://`, with the client's TLS set-up (system roots
//! plus the global `--ca FILE`, which the client checked before the run: a bad one exits 2).
//! Must not: use the server modules (it speaks only the wire protocols, like any client), or
//! send load anywhere but loopback addresses; every loop ends by count and by time.

pub mod args;
pub mod procstat;
pub mod publishers;
pub mod report;
pub mod stats;
pub mod storm;
pub mod subscribers;
pub mod wire;

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::interfaces::ClientLike;
use fred::types::InfoKind;
use tokio::time::Instant;

use args::{BenchArgs, BenchCommand, FanoutArgs, IdleArgs, IngestArgs, Measure};
use procstat::{ProcError, ProcessReport, Watch};
use publishers::{Lane, Pace, PublishError, Setup};
use report::Report;
use stats::{ConnectionFailure, Layout, Shared};
use wire::WireError;

use crate::client::connect::Tls;

/// Exit code of a run that finished but does not count (loss, a connection ended).
const NOT_COUNTED: u8 = 3;
/// How long subscribers may take to be subscribed end to end.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Set-up (connecting) may take this long at most before the run's tasks end by themselves.
const SETUP_ALLOWANCE: Duration = Duration::from_secs(600);

/// Why a run could not be done (exit 1); a run that was done but lost messages is reported
/// and exits 3 instead.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Connection(#[from] ConnectionFailure),
    #[error("{url}: with {what} > 1 the URL needs {{i}}")]
    NeedsPlaceholder { url: String, what: &'static str },
    #[error(
        "--size {size}: a format=json subscriber's messages are text, at least {min} bytes \
         (sequence number and timestamp in hex)"
    )]
    TooSmallForEnvelope { size: usize, min: usize },
    #[error("--rate must be 0 or more")]
    BadRate,
    #[error("{0}: --subscribe takes a ws:// URL")]
    NotWs(String),
    #[error("{0}: --subscribe takes a ws:// or wss:// URL")]
    NotWsOrWss(String),
    #[error("ingest measures a server: --publish takes ws:// or http://")]
    IngestScheme,
    #[error("without --redis, only acks can be counted: add --ack or --redis")]
    NothingToCount,
    #[error("only {ready} of {total} subscribers received a probe within {READY_TIMEOUT:?}")]
    NotReady { ready: usize, total: usize },
    #[error("INFO commandstats: {0}")]
    Info(fred::error::Error),
    #[error("a bench task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "{wanted} connections need {needed} open files, but this process may open only {limit} \
         (raise the hard limit: ulimit -Hn, LimitNOFILE=) or ask for fewer"
    )]
    OpenFiles {
        wanted: usize,
        needed: u64,
        limit: u64,
    },
    #[error("cannot read or raise the open-file limit: {0}")]
    OpenFileLimit(std::io::Error),
}

/// Files the load generator needs besides its connections (runtime, stdio, Redis clients).
const OTHER_FILES: u64 = 64;

/// Raise the soft open-file limit to the hard one (as the servers do), and refuse a run of
/// `connections` that even that cannot hold, before any connection is made.
fn open_file_room(connections: usize) -> Result<(), BenchError> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).map_err(BenchError::OpenFileLimit)?;
    let needed = (connections as u64).saturating_add(OTHER_FILES);
    if needed > limit {
        return Err(BenchError::OpenFiles {
            wanted: connections,
            needed,
            limit,
        });
    }
    Ok(())
}

/// Run one bench subcommand on a multi-threaded runtime (the caller made it).
pub async fn run(args: BenchArgs, tls: Tls) -> ExitCode {
    let (json, result) = match args.command {
        BenchCommand::Fanout(a) => (a.measure.json, fanout(a, "fanout", &tls).await),
        BenchCommand::Latency(a) => (a.measure.json, fanout(a, "latency", &tls).await),
        BenchCommand::Ingest(a) => (a.measure.json, ingest(a).await),
        BenchCommand::Idle(a) => (a.measure.json, idle(a).await),
        BenchCommand::Storm(a) => (a.json, storm::run(a).await),
    };
    match result {
        Ok(report) => {
            let text = if json {
                match serde_json::to_string(&report) {
                    Ok(text) => text + "\n",
                    Err(e) => {
                        eprintln!("lightrelay bench: {}", BenchError::Json(e));
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                report.table()
            };
            // A closed stdout (`| head`) is not worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(NOT_COUNTED)
            }
        }
        Err(e) => {
            eprintln!("lightrelay bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn needs_placeholder(url: &str, n: u32, what: &'static str) -> Result<(), BenchError> {
    if n > 1 && !url.contains("{i}") {
        return Err(BenchError::NeedsPlaceholder {
            url: url.into(),
            what,
        });
    }
    Ok(())
}

/// The start of a measurement: server and Redis processes, and our own CPU.
struct Meter {
    servers: Watch,
    redis: Option<Watch>,
    own_cpu: f64,
    steal: Option<(u64, u64)>,
    start: Instant,
}

impl Meter {
    fn start(m: &Measure) -> Result<Meter, ProcError> {
        Meter::start_for(&m.pids, m.redis_pid)
    }

    fn start_for(pids: &[u32], redis_pid: Option<u32>) -> Result<Meter, ProcError> {
        Ok(Meter {
            servers: Watch::start(pids)?,
            redis: redis_pid.map(|p| Watch::start(&[p])).transpose()?,
            own_cpu: procstat::own_cpu_s(),
            steal: procstat::machine_steal(),
            start: Instant::now(),
        })
    }

    fn finish(self, report: &mut Report) -> Result<(), ProcError> {
        report.elapsed_s = self.start.elapsed().as_secs_f64();
        report.servers = self.servers.finish()?;
        report.redis = match self.redis {
            Some(w) => w.finish()?.pop(),
            None => None,
        };
        report.client_cpu_s = procstat::own_cpu_s() - self.own_cpu;
        report.host_steal_pct = procstat::steal_percent(self.steal, procstat::machine_steal());
        Ok(())
    }
}

/// Fan-out and latency: subscribers on every channel, publishers, probes, then the run.
async fn fanout(a: FanoutArgs, scenario: &'static str, tls: &Tls) -> Result<Report, BenchError> {
    let m = &a.measure;
    let channels = a.channels as usize;
    let per_channel = a.subscribers as usize;
    needs_placeholder(&a.subscribe, a.channels, "--channels")?;
    needs_placeholder(&a.publish, a.channels, "--channels")?;
    let rate = a
        .rate
        .unwrap_or(if scenario == "latency" { 20.0 } else { 0.0 });
    if !(rate.is_finite() && rate >= 0.0) {
        return Err(BenchError::BadRate);
    }
    let window = a
        .window
        .unwrap_or_else(|| (4 * 1024 * 1024 / a.size as u64).clamp(2, 100));
    let sub = wire::target(&a.subscribe).await?;
    if sub.scheme != "ws" && sub.scheme != "wss" {
        return Err(BenchError::NotWsOrWss(a.subscribe.clone()));
    }
    let mut also = Vec::with_capacity(a.also_subscribe.len());
    for url in &a.also_subscribe {
        needs_placeholder(url, a.channels, "--channels")?;
        let more = wire::target(url).await?;
        if more.scheme != "ws" && more.scheme != "wss" {
            return Err(BenchError::NotWsOrWss(url.clone()));
        }
        also.push(more);
    }
    // wss:// subscribers: the client's TLS set-up (system roots plus --ca).
    let tls = std::iter::once(&sub)
        .chain(&also)
        .any(|t| t.scheme == "wss")
        .then(|| tokio_rustls::TlsConnector::from(tls.config()));
    // `format=json` subscribers get envelopes: messages are then written as text, read from
    // the envelope's data field.
    let layout = Layout::for_subscribe_url(&a.subscribe);
    if a.size < layout.min_size() {
        return Err(BenchError::TooSmallForEnvelope {
            size: a.size,
            min: layout.min_size(),
        });
    }
    let publish = wire::target(&a.publish).await?;
    let lanes_wanted = a.publish_connections as usize;
    let shared = Arc::new(Shared::new(channels, lanes_wanted.min(channels)));
    let until = Instant::now() + SETUP_ALLOWANCE + m.duration + m.drain;

    let subscribers = subscribers::open(
        subscribers::Plan {
            target: &sub,
            also: &also,
            channels,
            connections: channels * per_channel,
            concurrency: m.connect_concurrency as usize,
            // Large messages: fewer reads per message.
            buffer: if a.size > 4096 { 64 * 1024 } else { 16 * 1024 },
            until,
            token: None,
            layout,
            tls: tls.as_ref(),
        },
        &shared,
    )
    .await?;
    let mut lanes = publishers::connect(
        Setup {
            target: &publish,
            channels,
            lanes: lanes_wanted,
            ack: false,
            pipeline: a.pipeline as usize,
            concurrency: m.connect_concurrency as usize,
            until,
        },
        &shared,
    )
    .await?;
    wait_ready(&mut lanes, &shared, subscribers.len(), a.size, layout).await?;
    shared.reset_latency();

    let meter = Meter::start(m)?;
    let stop = meter.start + m.duration;
    let pace = Arc::new(Pace {
        rate,
        total_channels: channels,
        subscribers: per_channel as u64,
        window,
        size: a.size,
        layout,
        stop,
        count: a.count.unwrap_or(u64::MAX),
        until: stop + m.drain,
    });
    let lanes = run_lanes(lanes, &pace, &shared).await?;
    // Drain: until every message reached every subscriber, or --drain.
    let expected = shared.sent() * per_channel as u64;
    for _ in 0..(m.drain.as_millis() / 5 + 1) {
        if shared.delivered() >= expected || Instant::now() >= pace.until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut report = Report {
        scenario,
        label: m.label.clone(),
        subscribe: Some(a.subscribe.clone()),
        publish: Some(a.publish.clone()),
        channels,
        subscribers: per_channel,
        connections: subscribers.len(),
        size: a.size,
        rate,
        window: (rate == 0.0).then_some(window),
        envelope: Some(layout == Layout::Envelope),
        ..Report::default()
    };
    meter.finish(&mut report)?;
    report.sent = shared.sent();
    report.expected = expected;
    report.delivered = shared.delivered();
    report.reordered = shared.reordered.load(Ordering::Relaxed);
    report.latency = shared.latency();
    report.per_s = report.delivered as f64 / report.elapsed_s;
    report.mib_per_s = report.per_s * a.size as f64 / (1024.0 * 1024.0);
    collect_problems(&mut report, &shared);
    report.finish();
    drop(subscribers);
    for lane in lanes {
        lane.close().await;
    }
    Ok(report)
}

fn collect_problems(report: &mut Report, shared: &Shared) {
    let ended = shared.ended.load(Ordering::Relaxed);
    if ended > 0 {
        report
            .problems
            .push(format!("{ended} subscriber connection(s) ended early"));
    }
    let malformed = shared.malformed.load(Ordering::Relaxed);
    if malformed > 0 {
        report.problems.push(format!(
            "{malformed} message(s) too short to carry a sequence number"
        ));
    }
    if let Some(e) = shared.take_error() {
        report.problems.push(e.to_string());
    }
}

/// Send probes until every subscriber received one: every 200 ms at first, backing off to
/// every 2 s (each probe is one delivery per subscriber: a slow server must not spend the
/// wait delivering probes instead of subscribing the last connections).
async fn wait_ready(
    lanes: &mut [Lane],
    shared: &Shared,
    total: usize,
    size: usize,
    layout: Layout,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut interval = Duration::from_millis(200);
    while Instant::now() < deadline {
        publishers::probe(lanes, size, layout).await?;
        let next = (Instant::now() + interval).min(deadline);
        while Instant::now() < next {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if shared.ready.load(Ordering::Relaxed) >= total {
                return Ok(());
            }
            if let Some(e) = shared.take_error() {
                return Err(e.into());
            }
        }
        interval = (interval * 2).min(Duration::from_secs(2));
    }
    Err(BenchError::NotReady {
        ready: shared.ready.load(Ordering::Relaxed),
        total,
    })
}

/// Run every lane to its end; the lanes come back for a polite close.
async fn run_lanes(
    lanes: Vec<Lane>,
    pace: &Arc<Pace>,
    shared: &Arc<Shared>,
) -> Result<Vec<Lane>, BenchError> {
    let tasks: Vec<_> = lanes
        .into_iter()
        .map(|lane| tokio::spawn(publishers::run(lane, Arc::clone(pace), Arc::clone(shared))))
        .collect();
    let mut back = Vec::with_capacity(tasks.len());
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(lane)) => back.push(lane),
            Ok(Err(e)) => {
                first_error.get_or_insert(e.into());
            }
            Err(e) => {
                first_error.get_or_insert(e.into());
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(back),
    }
}

/// PUBLISH calls Redis has executed (INFO commandstats), including those made by scripts.
/// With history (SPEC §9, `--history`) each EVALSHA of the batch script that ran also PUBLISHes the
/// batch's ids (Redis counts a script's commands in commandstats): those are not messages.
/// An EVALSHA that met NOSCRIPT (a failed call) ran nothing.
async fn publish_calls(client: &fred::clients::Client, history: bool) -> Result<u64, BenchError> {
    let info: String = client
        .info(Some(InfoKind::CommandStats))
        .await
        .map_err(BenchError::Info)?;
    let stat = |command: &str, field: &str| -> u64 {
        let prefix = format!("cmdstat_{command}:");
        info.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|rest| {
                (rest.split(',')).find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    if !history {
        return Ok(stat("publish", "calls"));
    }
    let ids = stat("evalsha", "calls").saturating_sub(stat("evalsha", "failed_calls"));
    Ok(stat("publish", "calls").saturating_sub(ids))
}

/// Ingest: publishers as fast as the server takes their messages.
async fn ingest(a: IngestArgs) -> Result<Report, BenchError> {
    let m = &a.measure;
    let publishers = a.publishers as usize;
    needs_placeholder(&a.publish, a.publishers, "--publishers")?;
    let publish = wire::target(&a.publish).await?;
    if publish.scheme != "ws" && publish.scheme != "http" {
        return Err(BenchError::IngestScheme);
    }
    let counter = match &a.redis {
        Some(url) => Some(publishers::redis_client(&wire::target(url).await?).await?),
        None => None,
    };
    if counter.is_none() && !a.ack && publish.scheme == "ws" {
        return Err(BenchError::NothingToCount);
    }
    let shared = Arc::new(Shared::new(publishers, publishers));
    let until = Instant::now() + SETUP_ALLOWANCE + m.duration + m.drain;
    let lanes = publishers::connect(
        Setup {
            target: &publish,
            channels: publishers,
            lanes: publishers,
            ack: a.ack,
            pipeline: a.pipeline as usize,
            concurrency: m.connect_concurrency as usize,
            until,
        },
        &shared,
    )
    .await?;

    // Without acks, a poller keeps the count of messages in Redis so publishers stay at most
    // --pipeline each ahead of it (else the kernel's socket buffers would hold a backlog
    // that takes minutes to drain).
    let reached = Arc::new(AtomicU64::new(0));
    let base = match &counter {
        Some(c) => publish_calls(c, a.history).await?,
        None => 0,
    };
    let meter = Meter::start(m)?;
    let stop = meter.start + m.duration;
    let pace = Arc::new(Pace {
        rate: 0.0,
        total_channels: publishers,
        subscribers: 0,
        window: a.pipeline as u64,
        size: a.size,
        layout: Layout::Binary,
        stop,
        count: a.count.unwrap_or(u64::MAX),
        until: stop + m.drain,
    });
    let gate = (!a.ack && publish.scheme == "ws")
        .then(|| (Arc::clone(&reached), a.pipeline as u64 * publishers as u64));
    let poller = match (&counter, &gate) {
        (Some(c), Some(_)) => {
            let (c, reached, shared) = (c.clone(), Arc::clone(&reached), Arc::clone(&shared));
            let end = pace.until;
            Some(tokio::spawn(async move {
                while Instant::now() < end {
                    if let Ok(n) = publish_calls(&c, a.history).await {
                        reached.store(n.saturating_sub(base), Ordering::Relaxed);
                        for lane in &shared.lanes {
                            lane.poke();
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }))
        }
        _ => None,
    };
    shared.set_gate(gate);
    let at_stop = {
        let counter = counter.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(stop).await;
            match &counter {
                Some(c) => publish_calls(c, a.history)
                    .await
                    .map(|n| Some(n.saturating_sub(base))),
                None => Ok(None),
            }
        })
    };
    let lanes = run_lanes(lanes, &pace, &shared).await;
    let sent = shared.sent();
    let in_redis_at_stop = at_stop.await??;
    // Drain: until Redis has every message (or acks all came), or it stops moving, or --drain.
    let mut delivered = shared.acked.load(Ordering::Relaxed);
    if let Some(c) = &counter {
        let mut last = (0, Instant::now());
        for _ in 0..(m.drain.as_millis() / 20 + 1) {
            delivered = publish_calls(c, a.history).await?.saturating_sub(base);
            if delivered >= sent || Instant::now() >= pace.until {
                break;
            }
            if delivered != last.0 {
                last = (delivered, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if let Some(p) = poller {
        p.abort();
    }
    let mut report = Report {
        scenario: "ingest",
        label: m.label.clone(),
        publish: Some(a.publish.clone()),
        channels: publishers,
        connections: publishers,
        publishers: Some(publishers),
        ack: Some(a.ack),
        size: a.size,
        window: Some(a.pipeline as u64),
        acked: Some(shared.acked.load(Ordering::Relaxed)),
        ..Report::default()
    };
    meter.finish(&mut report)?;
    let lanes = lanes?;
    report.sent = sent;
    report.expected = sent;
    report.delivered = delivered;
    report.latency = shared.latency();
    // The rate while sending: what reached Redis by the end of --duration.
    let sending_s = m.duration.as_secs_f64().min(report.elapsed_s);
    report.per_s = in_redis_at_stop.unwrap_or(delivered) as f64 / sending_s;
    report.mib_per_s = report.per_s * a.size as f64 / (1024.0 * 1024.0);
    collect_problems(&mut report, &shared);
    report.finish();
    for lane in lanes {
        lane.close().await;
    }
    Ok(report)
}

/// Idle: open connections, hold them, report the server's RSS growth per connection.
async fn idle(a: IdleArgs) -> Result<Report, BenchError> {
    let m = &a.measure;
    needs_placeholder(&a.subscribe, a.channels, "--channels")?;
    let sub = wire::target(&a.subscribe).await?;
    if sub.scheme != "ws" {
        return Err(BenchError::NotWs(a.subscribe.clone()));
    }
    let channels = a.channels as usize;
    open_file_room(a.connections as usize)?;
    let shared = Arc::new(Shared::new(channels, 1));
    let meter = Meter::start(m)?;
    let subscribers = subscribers::open(
        subscribers::Plan {
            target: &sub,
            also: &[],
            channels,
            connections: a.connections as usize,
            concurrency: m.connect_concurrency as usize,
            buffer: 512,
            until: Instant::now() + SETUP_ALLOWANCE + m.duration + m.drain,
            token: a.token.as_deref(),
            layout: Layout::Binary,
            tls: None,
        },
        &shared,
    )
    .await?;
    tokio::time::sleep(m.duration).await;
    let mut report = Report {
        scenario: "idle",
        label: m.label.clone(),
        subscribe: Some(a.subscribe.clone()),
        channels,
        subscribers: subscribers.len(),
        connections: subscribers.len(),
        token: Some(a.token.is_some()),
        ..Report::default()
    };
    meter.finish(&mut report)?;
    let n = subscribers.len().max(1) as f64;
    let growth = |p: &ProcessReport| p.rss_kib_end as f64 - p.rss_kib_start as f64;
    report.kib_per_connection = Some(report.servers.iter().map(growth).sum::<f64>() / n);
    report.redis_kib_per_connection = report.redis.as_ref().map(|r| growth(r) / n);
    collect_problems(&mut report, &shared);
    report.finish();
    drop(subscribers);
    Ok(report)
}
