//! The connection storm (issue 13): `--clients` WebSocket handshakes, `--concurrency` in
//! flight, each as soon as a slot is free, measured as connections per server CPU-second and
//! time until every client is connected; run with and without `--token` it prices the
//! server's token check.
//!
//! Owns: the storm's sequence — raise the open-file limit, start the meter (and, with
//! `--redis`, read the Redis command counts a history replay or a subscription costs), open every
//! connection (a 101 counts as connected; any other status is a refusal, counted by status
//! and never retried; a broken or timed-out handshake is a failure), hold them for
//! `--settle` while the server finishes what the storm asked of it, take the readings (the
//! Redis counts again: the difference is what the storm made the server ask), then
//! close every connection (our close frame, then the server's close or end of stream).
//! Must not: read or send data frames, or retry; every loop ends by count (`--clients`) and
//! by time (`--timeout`).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::args::StormArgs;
use super::report::{Report, Storm};
use super::wire::{self, Ask, WireError};
use super::{open_file_room, publishers, BenchError, Meter};

/// The Redis commands a storm's count covers (`cmdstat_NAME` in INFO commandstats).
const COUNTED: [&str; 3] = ["xrevrange", "xrange", "subscribe"];

/// How long closing every connection may take in all, after the storm.
const CLOSE_ALLOWANCE: Duration = Duration::from_secs(30);
/// How long one connection may take to answer our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one handshake came to.
enum Outcome {
    Connected(TcpStream),
    Refused(u16),
    Failed(String),
    NotStarted,
}

/// Run the storm and report it.
pub async fn run(a: StormArgs) -> Result<Report, BenchError> {
    let clients = a.clients as usize;
    let channels = a.channels.map_or(clients, |c| c as usize);
    let target = wire::target(&a.url).await?;
    if target.scheme != "ws" {
        return Err(BenchError::NotWs(a.url.clone()));
    }
    open_file_room(clients)?;
    let ask = Ask {
        protocol: None,
        token: a.token.as_deref(),
    };

    let redis = match &a.redis {
        Some(url) => Some(publishers::redis_client(&wire::target(url).await?).await?),
        None => None,
    };
    let calls_before = match &redis {
        Some(client) => Some(command_calls(client).await?),
        None => None,
    };
    let meter = Meter::start_for(&a.pids, a.redis_pid)?;
    let start = meter.start;
    let deadline = start + a.timeout;
    let mut open = Vec::with_capacity(clients);
    let mut figures = Storm {
        clients,
        concurrency: a.concurrency as usize,
        ..Storm::default()
    };
    let mut refused_by_status = BTreeMap::new();
    let mut first_failure = None;
    {
        let target = &target;
        let mut handshakes = stream::iter(0..clients)
            .map(|i| async move {
                if Instant::now() >= deadline {
                    return Outcome::NotStarted;
                }
                let t = target.for_channel(i % channels);
                match tokio::time::timeout_at(deadline, wire::ws_connect(&t, i, ask)).await {
                    Ok(Ok(conn)) => Outcome::Connected(conn.stream),
                    Ok(Err(WireError::Refused { status, .. })) => Outcome::Refused(status),
                    Ok(Err(e)) => Outcome::Failed(e.to_string()),
                    Err(_) => {
                        Outcome::Failed(format!("no answer within --timeout {:?}", a.timeout))
                    }
                }
            })
            .buffer_unordered(a.concurrency.max(1) as usize);
        while let Some(outcome) = handshakes.next().await {
            match outcome {
                Outcome::Connected(stream) => {
                    figures.connected += 1;
                    open.push(stream);
                }
                Outcome::Refused(status) => {
                    figures.refused += 1;
                    *refused_by_status.entry(status).or_insert(0) += 1;
                }
                Outcome::Failed(why) => {
                    figures.failed += 1;
                    first_failure.get_or_insert(why);
                }
                Outcome::NotStarted => figures.not_started += 1,
            }
        }
    }
    let storm_s = start.elapsed().as_secs_f64();
    figures.storm_server_cpu_s = meter.servers.cpu_s_so_far()?;
    figures.storm_s = storm_s;
    figures.connections_per_s = figures.connected as f64 / storm_s.max(1e-9);
    figures.all_connected_s = (figures.connected == clients as u64).then_some(storm_s);
    figures.refused_by_status = refused_by_status;
    let settle_start = Instant::now();
    tokio::time::sleep(a.settle).await;
    figures.settle_s = settle_start.elapsed().as_secs_f64();
    if let (Some(client), Some(before)) = (&redis, calls_before) {
        let after = command_calls(client).await?;
        figures.redis_calls = Some(
            after
                .into_iter()
                .map(|(name, n)| {
                    let was = before.get(&name).copied().unwrap_or(0);
                    (name, n.saturating_sub(was))
                })
                .collect(),
        );
    }

    let mut report = Report {
        scenario: "storm",
        label: a.label.clone(),
        subscribe: Some(a.url.clone()),
        channels: if a.url.contains("{i}") {
            channels.min(clients)
        } else {
            1
        },
        connections: open.len(),
        token: Some(a.token.is_some()),
        ..Report::default()
    };
    meter.finish(&mut report)?;
    figures.closed = close_all(open, a.concurrency.max(1) as usize).await;
    report.storm = Some(figures);
    if let Some(why) = first_failure {
        report.problems.push(format!("first failure: {why}"));
    }
    report.finish();
    Ok(report)
}

/// Close every connection politely, `concurrency` at a time: our close frame (1000), then
/// wait for the server's close frame and end of stream. Returns how many ended that way;
/// the rest are dropped (reset) when [`CLOSE_ALLOWANCE`] runs out.
async fn close_all(open: Vec<TcpStream>, concurrency: usize) -> u64 {
    let until = Instant::now() + CLOSE_ALLOWANCE;
    let mut frame = Vec::with_capacity(8);
    wire::client_frame(&mut frame, wire::OP_CLOSE, &1000u16.to_be_bytes());
    let frame = &frame;
    stream::iter(open)
        .map(|mut stream| async move {
            let polite = async {
                stream.write_all(frame).await.ok()?;
                let mut buf = [0u8; 256];
                // Bounded by the timeout below; a server sends a few bytes and ends.
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => return Some(()),
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
            };
            let by = (Instant::now() + CLOSE_TIMEOUT).min(until);
            matches!(tokio::time::timeout_at(by, polite).await, Ok(Some(())))
        })
        .buffer_unordered(concurrency)
        .fold(0u64, |n, closed| async move { n + u64::from(closed) })
        .await
}

/// The calls of each [`COUNTED`] command Redis has executed (INFO commandstats); a command
/// never called is 0.
async fn command_calls(
    client: &fred::clients::Client,
) -> Result<BTreeMap<String, u64>, BenchError> {
    use fred::interfaces::ClientLike;
    let info: String = client
        .info(Some(fred::types::InfoKind::CommandStats))
        .await
        .map_err(BenchError::Info)?;
    Ok(COUNTED
        .iter()
        .map(|name| {
            let prefix = format!("cmdstat_{name}:calls=");
            let calls = info
                .lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            (name.to_string(), calls)
        })
        .collect())
}
