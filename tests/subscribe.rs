//! SPEC §4: the subscribe server. One frame per message (text for UTF-8, binary otherwise),
//! publish order, one Redis subscription per channel per process, bounded client queues with
//! `--slow-consumer close|skip`, and what becomes of the frames a subscriber sends.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use fred::interfaces::{ClientLike, PubsubInterface};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn utf8_payloads_arrive_as_text_frames_and_other_bytes_as_binary_frames_byte_exact() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut ws = connect(&subscribe.ws("/mixed")).await;
    redis.wait_numsub("lightlevel/mixed", 1).await;

    let not_utf8 = vec![0xff, 0x00, 0x80];
    let every_byte: Vec<u8> = (0..=255).collect();
    // As redis-cli would publish them.
    for payload in [
        Bytes::from("héllo, wörld"),
        Bytes::from(not_utf8.clone()),
        Bytes::from(""),
        Bytes::from("nul\0inside"),
    ] {
        assert_eq!(redis.publish("lightlevel/mixed", payload).await, 1);
    }
    // Through the publish server: the frame type a publisher used does not matter, the bytes do.
    let mut publisher = connect_ack(&publish.ws("/mixed")).await;
    for frame in [
        Message::text("ünïcode ✓"),
        Message::binary(not_utf8.clone()),
        Message::binary(&b"a binary frame holding UTF-8"[..]),
        Message::binary(every_byte.clone()),
    ] {
        publisher.send(frame).await.unwrap();
        assert_eq!(next_text(&mut publisher).await, "1");
    }

    let expected = [
        Message::text("héllo, wörld"),
        Message::binary(not_utf8.clone()),
        Message::text(""),
        Message::text("nul\0inside"),
        Message::text("ünïcode ✓"),
        Message::binary(not_utf8),
        Message::text("a binary frame holding UTF-8"),
        Message::binary(every_byte),
    ];
    for (i, want) in expected.into_iter().enumerate() {
        assert_eq!(next_frame(&mut ws).await, want, "frame {i}");
    }
}

#[tokio::test]
async fn messages_arrive_in_publish_order() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut ws = connect(&subscribe.ws("/order")).await;
    redis.wait_numsub("lightlevel/order", 1).await;

    let client = redis.client().await;
    let publishing = tokio::spawn(async move {
        for i in 0..2000 {
            let n: i64 = client
                .publish("lightlevel/order", i.to_string())
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
    });
    for i in 0..2000 {
        assert_eq!(next_text(&mut ws).await, i.to_string(), "message {i}");
    }
    publishing.await.unwrap();
}

#[tokio::test]
async fn one_redis_subscription_per_channel_whatever_the_number_of_clients() {
    const CHANNEL: &str = "lightlevel/office";
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&subscribe.ws("/office")).await;
        until_receiving(&redis, CHANNEL, &mut ws).await;
        clients.push(ws);
    }
    assert_eq!(redis.numsub(CHANNEL).await, 1);
    assert_eq!(subscribe.metric("lightrelay_channels").await, 1.0);
    // Redis sees one receiver; the relay hands the message to all three.
    assert_eq!(redis.publish(CHANNEL, "shared").await, 1);
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(next_data(ws).await, Message::text("shared"), "client {i}");
    }

    // The last client out unsubscribes.
    drop(clients);
    redis.wait_numsub(CHANNEL, 0).await;
    subscribe
        .wait_metric("lightrelay_channels", |v| v == 0.0)
        .await;
    subscribe
        .wait_metric("lightrelay_connections", |v| v == 0.0)
        .await;
}

#[tokio::test]
async fn a_client_that_joins_as_the_last_one_leaves_ends_up_subscribed() {
    const CHANNEL: &str = "lightlevel/door";
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut current = connect(&subscribe.ws("/door")).await;
    until_receiving(&redis, CHANNEL, &mut current).await;
    // Each round races a leave (UNSUBSCRIBE) with a join on the same channel.
    for _round in 0..20 {
        drop(current);
        current = connect(&subscribe.ws("/door")).await;
        until_receiving(&redis, CHANNEL, &mut current).await;
    }
    redis.wait_numsub(CHANNEL, 1).await;
    subscribe
        .wait_metric("lightrelay_channels", |v| v == 1.0)
        .await;
    subscribe
        .wait_metric("lightrelay_connections", |v| v == 1.0)
        .await;
}

// Slow consumers: one client never reads while another reads everything.

const CHUNK: usize = 16 * 1024;
const BATCH: u32 = 16;
/// 64 MiB at most: far more than a loopback connection's kernel buffers absorb.
const MAX_MESSAGES: u32 = 4096;

/// A 16 KiB binary payload carrying its index (0xff first: never valid UTF-8).
fn chunk(i: u32) -> Vec<u8> {
    let mut payload = vec![0xff];
    payload.extend(i.to_be_bytes());
    payload.resize(CHUNK, b'.');
    payload
}

fn index_of(frame: &Message) -> u32 {
    match frame {
        Message::Binary(b) if b.len() == CHUNK && b[0] == 0xff => {
            u32::from_be_bytes(b[1..5].try_into().unwrap())
        }
        other => panic!("expected a chunk, got {other:?}"),
    }
}

/// Publish chunks through Redis in batches until `overflow` (a dropped-messages series) is
/// above zero. `healthy` reads every batch before the next is published and must get every
/// chunk in order; the server's queues are checked to stay bounded after every batch.
/// Returns how many chunks were published.
async fn flood_until_overflow(
    redis: &Redis,
    server: &Server,
    channel: &str,
    healthy: &mut Ws,
    overflow: &str,
    queue: usize,
) -> u32 {
    flood(
        redis,
        server,
        channel,
        healthy,
        Some(overflow),
        MAX_MESSAGES,
        queue,
    )
    .await
}

/// [`flood_until_overflow`]'s loop: publish up to `total` chunks, stopping early once `stop`
/// (when given) is above zero; with `stop` given, reaching `total` fails the test.
async fn flood(
    redis: &Redis,
    server: &Server,
    channel: &str,
    healthy: &mut Ws,
    stop: Option<&str>,
    total: u32,
    queue: usize,
) -> u32 {
    let client = redis.client().await;
    let mut sent = 0;
    while sent < total {
        for _ in 0..BATCH {
            let n: i64 = client.publish(channel, chunk(sent)).await.unwrap();
            assert_eq!(n, 1, "one Redis subscriber: the relay");
            sent += 1;
        }
        for i in sent - BATCH..sent {
            assert_eq!(index_of(&next_data(healthy).await), i, "healthy client");
        }
        let queued = server.metric("lightrelay_queued_messages").await;
        assert!(queued <= (2 * queue) as f64, "{queued} messages queued");
        let bytes = server.metric("lightrelay_queued_bytes").await;
        assert!(bytes <= (2 * queue * CHUNK) as f64, "{bytes} bytes queued");
        if let Some(stop) = stop {
            if server.metric(stop).await > 0.0 {
                let _ = client.quit().await;
                return sent;
            }
        }
    }
    let _ = client.quit().await;
    if let Some(stop) = stop {
        panic!("{stop} still 0 after {sent} messages of {CHUNK} bytes");
    }
    sent
}

/// `redis-cli -p PORT ARGS…`, as an operator would type it; returns its output.
fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli must be installed with redis-server");
    assert!(out.status.success(), "redis-cli {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The ids of Redis's pub/sub client connections.
fn pubsub_client_ids(redis: &Redis) -> Vec<String> {
    redis_cli(redis, &["CLIENT", "LIST", "TYPE", "pubsub"])
        .lines()
        .filter_map(|line| line.split(' ').next()?.strip_prefix("id="))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_stalled_client_never_gets_the_relay_cut_off_by_redis_output_buffer_limits() {
    const CHANNEL: &str = "lightlevel/burst";
    let redis = Redis::start().await;
    // Redis drops a pub/sub connection that has more than 2 MiB waiting for it.
    redis_cli(
        &redis,
        &[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 2mb 2mb 0",
        ],
    );
    let subscribe = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &["--client-queue", "64", "--slow-consumer", "skip"],
    )
    .await;
    let mut healthy = connect(&subscribe.ws("/burst")).await;
    until_receiving(&redis, CHANNEL, &mut healthy).await;
    // Joined (its session answers a ping only once it has), then never read again.
    let mut stalled = connect(&subscribe.ws("/burst")).await;
    sync(&mut stalled).await;
    redis.wait_numsub(CHANNEL, 1).await;
    let relay = pubsub_client_ids(&redis);
    assert_eq!(relay.len(), 1, "{relay:?}");

    // 32 MiB, 16 times the limit, while one client reads nothing at all.
    let sent = flood(&redis, &subscribe, CHANNEL, &mut healthy, None, 2048, 64).await;
    assert_eq!(sent, 2048);
    // The same connection all along: Redis never cut the relay off.
    assert_eq!(pubsub_client_ids(&redis), relay);
    assert_eq!(
        subscribe
            .metric("lightrelay_dropped_total{reason=\"redis_lagged\"}")
            .await,
        0.0
    );
    assert!(
        subscribe
            .metric("lightrelay_dropped_total{reason=\"slow_consumer_skip\"}")
            .await
            > 0.0,
        "the stalled client did fall behind"
    );
}

/// A subscribe server with a 64-frame client queue under `--slow-consumer policy`, and two
/// clients of `lightlevel/PATH`, both receiving: `healthy` and `slow`.
struct SlowConsumer {
    redis: Redis,
    subscribe: Server,
    channel: String,
    healthy: Ws,
    slow: Ws,
}

impl SlowConsumer {
    async fn start(policy: &str, path: &str) -> SlowConsumer {
        let redis = Redis::start().await;
        let flags = ["--client-queue", "64", "--slow-consumer", policy];
        let subscribe = Server::start(Kind::Subscribe, &redis.url(), &flags).await;
        let channel = format!("lightlevel{path}");
        let mut healthy = connect(&subscribe.ws(path)).await;
        until_receiving(&redis, &channel, &mut healthy).await;
        let mut slow = connect(&subscribe.ws(path)).await;
        until_receiving(&redis, &channel, &mut slow).await;
        SlowConsumer {
            redis,
            subscribe,
            channel,
            healthy,
            slow,
        }
    }

    /// Flood while `slow` reads nothing, until `overflow` counts; returns chunks published.
    async fn flood_until(&mut self, overflow: &str) -> u32 {
        flood_until_overflow(
            &self.redis,
            &self.subscribe,
            &self.channel,
            &mut self.healthy,
            overflow,
            64,
        )
        .await
    }
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_1008_while_the_others_get_everything() {
    let mut t = SlowConsumer::start("close", "/fast").await;
    // From here on `slow` is not read until the server has given up on it.
    let published = t
        .flood_until("lightrelay_dropped_total{reason=\"slow_consumer_close\"}")
        .await;

    // The slow client reads at last: what the kernel buffered (a prefix, in order), then 1008.
    let mut received = 0;
    let close = loop {
        assert!(received <= published, "more chunks than were published");
        match next_data(&mut t.slow).await {
            Message::Close(Some(close)) => break close,
            Message::Close(None) => panic!("close frame without a code"),
            frame => {
                assert_eq!(index_of(&frame), received, "slow client");
                received += 1;
            }
        }
    };
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "slow consumer");
    finish_close(&mut t.slow).await;
    assert!(
        received < published,
        "the slow client got all {published} chunks: it was not slow"
    );
    t.subscribe
        .wait_series("lightrelay_closed_total{reason=\"slow_consumer\"}", |v| {
            v == 1.0
        })
        .await;
    t.subscribe
        .wait_metric("lightrelay_connections", |v| v == 1.0)
        .await;

    // The healthy client is still subscribed and served.
    assert_eq!(t.redis.publish(&t.channel, "after").await, 1);
    assert_eq!(next_data(&mut t.healthy).await, Message::text("after"));
    t.subscribe
        .wait_metric("lightrelay_queued_messages", |v| v == 0.0)
        .await;
}

#[tokio::test]
async fn a_slow_consumer_under_skip_keeps_its_connection_and_gets_the_newest_message_last() {
    let mut t = SlowConsumer::start("skip", "/dash").await;
    let published = t
        .flood_until("lightrelay_dropped_total{reason=\"slow_consumer_skip\"}")
        .await;
    assert_eq!(t.redis.publish(&t.channel, "newest").await, 1);
    assert_eq!(next_data(&mut t.healthy).await, Message::text("newest"));

    // The slow client reads at last: chunks in order with a gap where its backlog was
    // dropped, and the newest message last.
    let mut received = 0;
    let mut last: Option<u32> = None;
    loop {
        assert!(received <= published, "more chunks than were published");
        match next_data(&mut t.slow).await {
            Message::Text(text) if text.as_str() == "newest" => break,
            Message::Close(close) => panic!("a skipping client was closed: {close:?}"),
            frame => {
                let i = index_of(&frame);
                assert!(last.is_none_or(|l| i > l), "chunk {i} after {last:?}");
                last = Some(i);
                received += 1;
            }
        }
    }
    assert!(
        received < published,
        "the slow client got all {published} chunks: nothing was skipped"
    );
    let dropped = t
        .subscribe
        .metric("lightrelay_dropped_total{reason=\"slow_consumer_skip\"}")
        .await;
    // Every chunk was either delivered or counted as dropped.
    assert_eq!(f64::from(received) + dropped, f64::from(published));

    // Still connected and subscribed.
    assert_eq!(t.redis.publish(&t.channel, "still here").await, 1);
    assert_eq!(next_data(&mut t.slow).await, Message::text("still here"));
    assert_eq!(next_data(&mut t.healthy).await, Message::text("still here"));
    assert_eq!(t.subscribe.metric("lightrelay_connections").await, 2.0);
    let metrics = t.subscribe.metrics_text().await;
    assert_eq!(
        series_value(
            &metrics,
            "lightrelay_closed_total{reason=\"slow_consumer\"}"
        ),
        Some(0.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn frames_from_subscribers_are_discarded_without_accept_publish() {
    const CHANNEL: &str = "lightlevel/room";
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut ws = connect(&subscribe.ws("/room")).await;
    redis.wait_numsub(CHANNEL, 1).await;
    let mut watcher = redis.subscribe(CHANNEL).await;

    send_text(&mut ws, "from a subscriber").await;
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    // Once the pong is back, the server has read (and discarded) both frames.
    assert_eq!(sync(&mut ws).await, Vec::<Message>::new());
    assert_eq!(redis.publish(CHANNEL, "marker").await, 2);
    assert_eq!(&watcher.next().await[..], b"marker");
    assert_eq!(next_frame(&mut ws).await, Message::text("marker"));
    assert_eq!(
        subscribe
            .metric("lightrelay_messages_total{direction=\"redis_out\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn with_accept_publish_frames_from_subscribers_are_published_and_come_back() {
    const CHANNEL: &str = "lightlevel/chat";
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &["--accept-publish"]).await;
    let mut sender = connect(&subscribe.ws("/chat")).await;
    redis.wait_numsub(CHANNEL, 1).await;
    let mut other = connect(&subscribe.ws("/chat")).await;
    until_receiving(&redis, CHANNEL, &mut other).await;
    let mut watcher = redis.subscribe(CHANNEL).await;

    send_text(&mut sender, "hello from the browser").await;
    sender
        .send(Message::binary(vec![0xfe, 0x00, 0x01]))
        .await
        .unwrap();
    assert_eq!(&watcher.next().await[..], b"hello from the browser");
    assert_eq!(&watcher.next().await[..], &[0xfe, 0x00, 0x01]);
    for ws in [&mut sender, &mut other] {
        assert_eq!(next_data(ws).await, Message::text("hello from the browser"));
        assert_eq!(next_data(ws).await, Message::binary(vec![0xfe, 0x00, 0x01]));
    }
    // Counted when Redis's reply comes back, which may be just after the watcher saw it.
    let published = subscribe
        .wait_metric("lightrelay_messages_total{direction=\"redis_out\"}", |v| {
            v >= 2.0
        })
        .await;
    assert_eq!(published, 2.0);
}

#[tokio::test]
async fn a_frame_over_max_message_bytes_from_a_subscriber_closes_it_with_1009() {
    let redis = Redis::start().await;
    for extra in [&[][..], &["--accept-publish"][..]] {
        let flags = [&["--max-message-bytes", "1KiB"][..], extra].concat();
        let subscribe = Server::start(Kind::Subscribe, &redis.url(), &flags).await;
        let mut ws = connect(&subscribe.ws("/limit")).await;
        // At the limit: still connected.
        ws.send(Message::binary(vec![b'a'; 1024])).await.unwrap();
        sync(&mut ws).await;
        ws.send(Message::binary(vec![b'b'; 1025])).await.unwrap();
        let close = close_frame(&mut ws).await;
        assert_eq!(close.code, CloseCode::Size, "flags {flags:?}");
        assert!(close.reason.contains("1024"), "reason: {}", close.reason);
        finish_close(&mut ws).await;
        subscribe
            .wait_series("lightrelay_closed_total{reason=\"too_big\"}", |v| v == 1.0)
            .await;
    }
}

/// The response to an upgrade that offers `lightrelay.ack`, lower-cased.
async fn upgrade_offering_ack(addr: std::net::SocketAddr) -> String {
    let offer = [("Sec-WebSocket-Protocol", "lightrelay.ack")];
    upgrade_response(addr, "/acks", &offer).await.to_lowercase()
}

#[tokio::test]
async fn the_ack_subprotocol_is_selected_only_where_messages_are_published() {
    let redis = Redis::start().await;
    let plain = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let head = upgrade_offering_ack(plain.addr).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("sec-websocket-protocol"), "{head}");

    let publishing = Server::start(Kind::Subscribe, &redis.url(), &["--accept-publish"]).await;
    let head = upgrade_offering_ack(publishing.addr).await;
    assert!(
        head.contains("sec-websocket-protocol: lightrelay.ack"),
        "{head}"
    );
}

#[tokio::test]
async fn a_client_that_drops_its_connection_without_a_close_frame_is_counted_as_broken() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let ws = connect(&subscribe.ws("/gone")).await;
    subscribe
        .wait_metric("lightrelay_connections", |n| n == 1.0)
        .await;
    drop(ws); // TCP FIN, no close frame
    subscribe
        .wait_series("lightrelay_closed_total{reason=\"broken\"}", |n| n == 1.0)
        .await;
    let text = subscribe.metrics_text().await;
    assert_eq!(
        series_value(&text, "lightrelay_closed_total{reason=\"protocol_error\"}"),
        Some(0.0)
    );
}

/// A payload that says which message it is and whose every byte depends on that.
fn numbered(i: u32, len: usize) -> Vec<u8> {
    let mut payload = i.to_be_bytes().to_vec();
    payload.extend((4..len).map(|k| (k as u32).wrapping_mul(31).wrapping_add(i) as u8 | 0x80));
    payload
}

/// Connect to `url` and wait until the server runs the connection's session: it joined its
/// channel's subscribers before the session started, so it gets whatever is published next.
async fn joined(url: &str) -> Ws {
    let mut ws = connect(url).await;
    assert_eq!(sync(&mut ws).await, Vec::<Message>::new());
    ws
}

fn number_of(frame: &Message) -> u32 {
    match frame {
        Message::Binary(b) => {
            let i = u32::from_be_bytes(b[..4].try_into().unwrap());
            assert_eq!(
                b[..],
                numbered(i, b.len())[..],
                "message {i} arrived altered"
            );
            i
        }
        other => panic!("expected a binary message, got {other:?}"),
    }
}

#[tokio::test]
async fn frames_arrive_whole_and_in_order_whether_the_hub_writes_them_or_the_session_does() {
    // The hub writes a frame straight into an idle subscriber's socket; it queues it for the
    // client's session when the session is busy, the socket is full, the frame is large or
    // more messages wait. Paced messages and bursts, small and large, a client that pings the
    // server and one that stops reading make every path run: each client must still get
    // every frame whole and in order. (A frame the socket takes only in part: socket.rs.)
    const TOTAL: u32 = 600;
    // Up to 16 KiB the hub writes frames itself; larger ones always go through the session,
    // which writes them from their payload once tungstenite's buffered frames are out.
    // The paced stretches (even blocks of 20) carry 12 KiB frames, written by the hub until
    // the stalled client's socket is full.
    let size = |i: u32| match (i % 10, (i / 20) % 2) {
        (0, _) => 96 * 1024,
        (_, 0) => 12 * 1024,
        _ => 100,
    };
    let redis = Redis::start().await;
    let flags = [
        "--client-queue",
        "100000",
        "--client-queue-bytes",
        "64MiB",
        "--ping-interval",
        "200ms",
    ];
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &flags).await;
    let mut readers = Vec::new();
    for r in 0..6 {
        let mut ws = joined(&subscribe.ws("/paced")).await;
        readers.push(tokio::spawn(async move {
            for i in 0..TOTAL {
                assert_eq!(number_of(&next_data(&mut ws).await), i, "reader {r}");
                if r == 0 && i % 40 == 0 {
                    // The server answers with a pong, written between the hub's frames.
                    ws.send(Message::Ping(Bytes::from_static(b"hi")))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    let mut stalled = joined(&subscribe.ws("/paced")).await;
    redis.wait_numsub("lightlevel/paced", 1).await;

    let client = redis.client().await;
    for block in 0..(TOTAL / 20) {
        for i in block * 20..(block + 1) * 20 {
            let n: i64 = client
                .publish("lightlevel/paced", numbered(i, size(i)))
                .await
                .unwrap();
            assert_eq!(n, 1);
            if block % 2 == 0 {
                // Paced: the hub catches up between messages and writes them itself.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for reader in readers {
        reader.await.unwrap();
    }
    // The stalled client's socket filled up long ago; it reads everything only now.
    for i in 0..TOTAL {
        assert_eq!(
            number_of(&next_data(&mut stalled).await),
            i,
            "stalled reader"
        );
    }
    assert_eq!(
        subscribe
            .metric("lightrelay_messages_total{direction=\"ws_out\"}")
            .await,
        f64::from(7 * TOTAL)
    );
    // The paced stretches' 12 KiB frames: 270 messages to 6 readers, and the stalled
    // client's until its socket was full. At least half of the readers' deliveries of those
    // went straight into the socket (the hub catches up within the 2 ms between them).
    let direct = subscribe.metric("lightrelay_direct_writes_total").await;
    assert!(direct >= f64::from(270 * 6 / 2), "{direct} direct writes");
    let _ = client.quit().await;
}

#[tokio::test]
async fn a_large_fan_out_shared_by_two_writers_keeps_every_subscriber_in_order() {
    // From 64 subscribers on, the hub writes half of a fan-out and the connections' runtime
    // the other half; the next message waits for both, so no subscriber sees it early.
    const READERS: usize = 80;
    const TOTAL: u32 = 400;
    let redis = Redis::start().await;
    let flags = ["--client-queue", "100000"];
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &flags).await;
    let mut readers = Vec::new();
    for r in 0..READERS {
        let mut ws = joined(&subscribe.ws("/wide")).await;
        readers.push(tokio::spawn(async move {
            for i in 0..TOTAL {
                assert_eq!(number_of(&next_data(&mut ws).await), i, "reader {r}");
            }
        }));
    }
    redis.wait_numsub("lightlevel/wide", 1).await;
    let client = redis.client().await;
    for i in 0..TOTAL {
        let n: i64 = client
            .publish(
                "lightlevel/wide",
                numbered(i, 100 + (i as usize * 37) % 2000),
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
        // Bursts (the hub falls behind and queues) between paced stretches (it writes).
        if (i / 25) % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for reader in readers {
        reader.await.unwrap();
    }
    assert_eq!(
        subscribe
            .metric("lightrelay_messages_total{direction=\"ws_out\"}")
            .await,
        (READERS as u32 * TOTAL) as f64
    );
    // The paced stretches: 200 messages to 80 readers. At least half of those deliveries
    // were direct writes, the hub's and its helper's.
    let direct = subscribe.metric("lightrelay_direct_writes_total").await;
    assert!(
        direct >= (200 * READERS / 2) as f64,
        "{direct} direct writes"
    );
    let _ = client.quit().await;
}

#[tokio::test]
async fn frames_over_the_write_buffer_arrive_whole_also_when_still_queued_at_shutdown() {
    // --max-message-bytes bounds what clients send, not what is published in Redis, and
    // tungstenite's write buffer holds 16 KiB + --max-message-bytes: larger frames must go
    // around it, also the ones still queued when SIGTERM comes (they go out before the 1001).
    let redis = Redis::start().await;
    let mut subscribe = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &["--max-message-bytes", "64KiB"],
    )
    .await;
    let mut ws = connect(&subscribe.ws("/stills")).await;
    redis.wait_numsub("lightlevel/stills", 1).await;
    let size = 256 * 1024;
    redis.publish("lightlevel/stills", numbered(0, size)).await;
    assert_eq!(number_of(&next_data(&mut ws).await), 0);

    // 10 MiB while the client does not read: more than the sockets' buffers take.
    const QUEUED: u32 = 40;
    for i in 1..=QUEUED {
        redis.publish("lightlevel/stills", numbered(i, size)).await;
    }
    // Every message reached the client's queue (or its socket) before SIGTERM: one still in
    // Redis's or the hub's hands then is not the server's to deliver.
    let subscribe_ref = &subscribe;
    eventually(|| async move {
        let text = subscribe_ref.metrics_text().await;
        let value = |series| series_value(&text, series).unwrap_or(0.0);
        // The hub has them all (it hands each to the client's outbox as it reads it; what
        // the session took and the capped socket has not, is in neither count below).
        let received = value("lightrelay_messages_total{direction=\"redis_in\"}");
        let queued = value("lightrelay_queued_messages");
        match received >= f64::from(1 + QUEUED) && queued > 0.0 {
            true => Ok(()),
            false => Err(format!(
                "{received} received from Redis and {queued} queued"
            )),
        }
    })
    .await;
    subscribe.signal("TERM");
    for i in 1..=QUEUED {
        assert_eq!(number_of(&next_data(&mut ws).await), i);
    }
    let close = close_frame(&mut ws).await;
    assert_eq!(close.code, CloseCode::Away);
    finish_close(&mut ws).await;
    assert_eq!(subscribe.wait_exit().await, Some(0));
}
