//! Issue 16, SPEC §11 first bullet: many instances per role, all on one standalone Redis. Two
//! publish and three subscribe processes (and, through a real nginx, two of each behind the
//! shipped `upstream`s): every subscriber gets every message of its channel exactly once,
//! whatever instance it and its publisher are on, and each publisher's messages in its order.
//!
//! A message is `SOURCE#SEQ`; a subscriber reads until the `end` marker published after every
//! acknowledged message, then a `fence` published after that must be the very next frame, so a
//! late duplicate cannot hide behind the marker.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::nginx::{Nginx, Site};
use common::*;
use fred::prelude::{ClientLike, PubsubInterface};
use futures_util::future::join_all;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

/// Messages each publishing connection sends (pipelined, acknowledged).
const PER_PUBLISHER: usize = 100;
/// Messages `PUBLISH`ed straight into Redis per channel, as `redis-cli PUBLISH` would.
const FROM_REDIS: usize = 20;

fn payload(source: &str, seq: usize) -> String {
    format!("{source}#{seq}")
}

/// Send `PER_PUBLISHER` messages on an acknowledged connection, pipelined, then read the acks:
/// each one must be `receivers`, the number of subscribe processes (one Redis subscription per
/// channel per process, whatever its number of clients).
async fn publish_acked(url: String, source: String, receivers: usize) {
    let mut ws = connect_ack(&url).await;
    for seq in 0..PER_PUBLISHER {
        ws.feed(Message::text(payload(&source, seq))).await.unwrap();
    }
    ws.flush().await.unwrap();
    for seq in 0..PER_PUBLISHER {
        let ack = next_text(&mut ws).await;
        assert_eq!(
            ack,
            receivers.to_string(),
            "{source}: the ack of message {seq} counts {ack} Redis receivers, not one per \
             subscribe process ({receivers})"
        );
    }
}

/// `PUBLISH` into Redis itself, as an outside producer would.
async fn publish_from_redis(redis: &Redis, channel: String, receivers: i64) {
    let client = redis.client().await;
    for seq in 0..FROM_REDIS {
        let n: i64 = client
            .publish(&channel, payload("redis", seq))
            .await
            .unwrap();
        assert_eq!(n, receivers, "PUBLISH {channel} reached {n} subscriptions");
    }
    let _ = client.quit().await;
}

/// Read until `marker`, at most `limit` frames.
async fn read_until(ws: &mut Ws, marker: &str, limit: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..limit {
        let text = next_text(ws).await;
        if text == marker {
            return got;
        }
        got.push(text);
    }
    panic!("no `{marker}` among {limit} frames; got {got:?}");
}

/// Every payload of `sources` (each `0..count`) exactly once, and each source's in order.
fn assert_exactly_once_in_order(who: &str, got: &[String], sources: &[(String, usize)]) {
    let mut next: HashMap<&str, usize> = sources.iter().map(|(s, _)| (s.as_str(), 0)).collect();
    for text in got {
        let (source, seq) = text
            .rsplit_once('#')
            .unwrap_or_else(|| panic!("{who}: a frame not sent by this test: {text:?}"));
        let seq: usize = seq.parse().unwrap();
        let expected = next
            .get_mut(source)
            .unwrap_or_else(|| panic!("{who}: {text:?} is from another channel's source"));
        assert!(
            seq >= *expected,
            "{who}: {text:?} again or out of order: {source}'s next was #{expected}"
        );
        assert_eq!(
            seq, *expected,
            "{who}: {source}#{expected} is missing (got #{seq} next)"
        );
        *expected += 1;
    }
    for (source, count) in sources {
        assert_eq!(
            next[source.as_str()],
            *count,
            "{who}: {source} stopped at #{} of {count}",
            next[source.as_str()]
        );
    }
}

/// A subscriber: its WebSocket, read on a task of its own until `end`.
fn read_in_background(mut ws: Ws, limit: usize) -> tokio::task::JoinHandle<(Ws, Vec<String>)> {
    tokio::spawn(async move {
        let got = read_until(&mut ws, "end", limit).await;
        (ws, got)
    })
}

/// After `end`, the next frame is `fence`: nothing arrived late or twice.
async fn assert_fence_is_next(redis: &Redis, channel: &str, subscribers: &mut [(String, Ws)]) {
    redis.publish(channel, "fence").await;
    for (who, ws) in subscribers.iter_mut() {
        assert_eq!(
            next_text(ws).await,
            "fence",
            "{who}: a frame arrived after `end`, before `fence`"
        );
    }
}

/// The `lightrelay_connections` gauge of each server.
async fn connections(servers: &[Server]) -> Vec<f64> {
    join_all(servers.iter().map(|s| s.metric("lightrelay_connections"))).await
}

#[tokio::test]
async fn two_publish_and_three_subscribe_instances_on_one_redis_deliver_each_message_once() {
    let redis = Redis::start().await;
    let url = redis.url();
    let publishers: Vec<Server> =
        join_all((0..2).map(|_| Server::start(Kind::Publish, &url, &[]))).await;
    let subscribers: Vec<Server> =
        join_all((0..3).map(|_| Server::start(Kind::Subscribe, &url, &[]))).await;
    let paths = ["/fleet/a", "/fleet/b", "/fleet/c"];

    // Two clients of every channel on every subscribe instance: 18 clients.
    let mut clients: Vec<(String, &str, Ws)> = Vec::new();
    for (i, server) in subscribers.iter().enumerate() {
        for path in paths {
            for k in 0..2 {
                let who = format!("subscriber {k} of {path} on subscribe instance {i}");
                clients.push((who, path, connect(&server.ws(path)).await));
            }
        }
    }
    // One Redis subscription per channel per process: three, not six.
    for path in paths {
        redis.wait_numsub(&format!("lightlevel{path}"), 3).await;
    }

    // Every frame a subscriber may get: both publish instances' connections and Redis.
    let per_channel = 2 * PER_PUBLISHER + FROM_REDIS;
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(who, path, ws)| (who, path, read_in_background(ws, per_channel + 10)))
        .collect();

    // On each channel, one acknowledged connection to each publish instance, and Redis.
    let mut sends = Vec::new();
    for path in paths {
        for (i, server) in publishers.iter().enumerate() {
            sends.push(tokio::spawn(publish_acked(
                server.ws(path),
                format!("publish instance {i}"),
                3,
            )));
        }
    }
    let injections = join_all(
        paths
            .iter()
            .map(|path| publish_from_redis(&redis, format!("lightlevel{path}"), 3)),
    );
    let (sent, _) = tokio::join!(join_all(sends), injections);
    for outcome in sent {
        outcome.expect("a publisher failed");
    }
    for path in paths {
        redis.publish(&format!("lightlevel{path}"), "end").await;
    }

    let sources: Vec<(String, usize)> = (0..2)
        .map(|i| (format!("publish instance {i}"), PER_PUBLISHER))
        .chain([("redis".to_string(), FROM_REDIS)])
        .collect();
    let mut by_channel: HashMap<&str, Vec<(String, Ws)>> = HashMap::new();
    for (who, path, reader) in readers {
        let (ws, got) = reader.await.expect("a subscriber failed");
        assert_exactly_once_in_order(&who, &got, &sources);
        by_channel.entry(path).or_default().push((who, ws));
    }
    for path in paths {
        let subscribers = by_channel.get_mut(path).unwrap();
        assert_fence_is_next(&redis, &format!("lightlevel{path}"), subscribers).await;
    }
}

#[tokio::test]
async fn through_nginx_upstreams_of_two_processes_each_connections_land_on_both_and_each_message_arrives_once(
) {
    let redis = Redis::start().await;
    let url = redis.url();
    let publishers: Vec<Server> =
        join_all((0..2).map(|_| Server::start(Kind::Publish, &url, &[]))).await;
    let subscribers: Vec<Server> =
        join_all((0..2).map(|_| Server::start(Kind::Subscribe, &url, &[]))).await;
    let addrs = |servers: &[Server]| servers.iter().map(|s| s.addr).collect::<Vec<SocketAddr>>();
    let nginx = Nginx::start_fleet(
        &addrs(&publishers),
        &addrs(&subscribers),
        &[Site::TwoPort],
        None,
    )
    .await;
    let channel = "lightlevel/office";

    let mut clients = Vec::new();
    for k in 0..6 {
        clients.push((
            format!("subscriber {k} (through nginx)"),
            connect(&nginx.ws_subscribe("/office")).await,
        ));
    }
    // least_conn spread them: both subscribe processes hold some, and together all six.
    let spread = eventually(|| async {
        let now = connections(&subscribers).await;
        if now.iter().sum::<f64>() == 6.0 {
            Ok(now)
        } else {
            Err(format!("subscribe processes' connection gauges: {now:?}"))
        }
    })
    .await;
    assert!(
        spread.iter().all(|&n| n >= 1.0),
        "a subscribe process got none of the six: {spread:?}"
    );
    // So each process subscribed the channel once.
    redis.wait_numsub(channel, 2).await;

    let per_channel = 4 * PER_PUBLISHER + FROM_REDIS;
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(who, ws)| (who, read_in_background(ws, per_channel + 10)))
        .collect();

    // Four acknowledged publishing connections through nginx: on both publish processes.
    let mut publishing = Vec::new();
    for k in 0..4 {
        publishing.push((
            format!("publisher {k}"),
            connect_ack(&nginx.ws_publish("/office")).await,
        ));
    }
    let spread = eventually(|| async {
        let now = connections(&publishers).await;
        if now.iter().sum::<f64>() == 4.0 {
            Ok(now)
        } else {
            Err(format!("publish processes' connection gauges: {now:?}"))
        }
    })
    .await;
    assert!(
        spread.iter().all(|&n| n >= 1.0),
        "a publish process got none of the four: {spread:?}"
    );

    let sends = publishing.into_iter().map(|(source, mut ws)| async move {
        for seq in 0..PER_PUBLISHER {
            ws.feed(Message::text(payload(&source, seq))).await.unwrap();
        }
        ws.flush().await.unwrap();
        for seq in 0..PER_PUBLISHER {
            assert_eq!(
                next_text(&mut ws).await,
                "2",
                "{source}: message {seq} did not reach exactly the two subscribe processes"
            );
        }
    });
    tokio::join!(
        join_all(sends),
        publish_from_redis(&redis, channel.to_string(), 2)
    );
    redis.publish(channel, "end").await;

    let sources: Vec<(String, usize)> = (0..4)
        .map(|k| (format!("publisher {k}"), PER_PUBLISHER))
        .chain([("redis".to_string(), FROM_REDIS)])
        .collect();
    let mut done = Vec::new();
    for (who, reader) in readers {
        let (ws, got) = reader.await.expect("a subscriber failed");
        assert_exactly_once_in_order(&who, &got, &sources);
        done.push((who, ws));
    }
    assert_fence_is_next(&redis, channel, &mut done).await;
}
