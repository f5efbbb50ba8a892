//! Clients that misbehave on purpose (issue 12): each costs the server bounded CPU, memory and
//! time, and still gets a close frame that says why.

mod common;

use std::time::Duration;

use common::*;
use fred::prelude::PubsubInterface;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// A publisher that filled its window while Redis stalls, then went silent past
/// `--idle-timeout`: its session drains the publishes in flight (up to `--redis-timeout`)
/// without spinning. (It spun a core on the idle deadline of its open phase: 6 CPU-s in 8 s.)
#[tokio::test]
async fn a_session_draining_through_a_redis_stall_does_not_spin() {
    let redis = Redis::start().await;
    let publish = Server::start(
        Kind::Publish,
        &redis.url(),
        &[
            "--idle-timeout",
            "1s",
            "--ping-interval",
            "500ms",
            "--redis-timeout",
            "8s",
            "--publish-window",
            "256",
        ],
    )
    .await;
    let mut ws = connect(&publish.ws("/stall")).await;
    let paused = redis.pause();
    for i in 0..1000 {
        ws.feed(Message::text(format!("m{i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    // The window is full: the server stopped reading and waits for Redis.
    publish
        .wait_metric("lightrelay_messages_total{direction=\"ws_in\"}", |n| {
            n >= 256.0
        })
        .await;

    // A measurement, not a wait: 1 s of it goes to the idle timeout, the rest to draining.
    let before = cpu_time(publish.pid());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let used = cpu_time(publish.pid()) - before;
    assert!(
        used < Duration::from_millis(500),
        "the server used {used:?} of CPU in 4 s while a session drained"
    );

    drop(paused);
    // Redis answers again: the publishes finish and the client gets its close (1001 idle
    // timeout once the acks are in, or 1013 if Redis answered too late).
    let close = close_frame(&mut ws).await;
    assert!(
        close.code == CloseCode::Away || close.code == CloseCode::Again,
        "close: {close:?}"
    );
}

/// A subscriber that stops reading fills its socket's buffers, and then only its bounded
/// outbox: the server's send buffer is capped (64 KiB asked, 128 KiB given), where Linux
/// alone grew it to ~4 MiB per client. Measured from the client's side: with a small receive
/// buffer of its own, everything it gets once it reads again, up to the newest message, is
/// what the kernel buffers held (the outbox skipped the rest).
#[tokio::test]
async fn a_subscriber_that_stops_reading_holds_little_kernel_memory() {
    let redis = Redis::start().await;
    let subscribe = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &["--slow-consumer", "skip", "--client-queue", "16"],
    )
    .await;
    let mut ws = connect_small_receive_buffer(&subscribe.ws("/deaf")).await;
    until_receiving_raw(&redis, "lightlevel/deaf", &mut ws).await;

    const SIZE: usize = 4096;
    const COUNT: usize = 2000;
    let client = redis.client().await;
    let payload = "x".repeat(SIZE);
    for _ in 0..COUNT {
        let _: i64 = client
            .publish("lightlevel/deaf", payload.as_str())
            .await
            .unwrap();
    }
    // The socket blocked and the outbox overflowed: the rest was skipped.
    subscribe
        .wait_series(
            "lightrelay_dropped_total{reason=\"slow_consumer_skip\"}",
            |n| n > 0.0,
        )
        .await;
    let _: i64 = client.publish("lightlevel/deaf", "last").await.unwrap();

    let mut received = 0usize;
    loop {
        match next_raw_data(&mut ws).await {
            Message::Text(t) if t.as_str() == "last" => break,
            Message::Text(t) => received += t.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Kernel buffers (ours 128 KiB, the client's small one) and the outbox (16 messages):
    // 192 KiB when measured, against 3.6 MiB without the cap.
    assert!(
        received < 512 * 1024,
        "{received} bytes were buffered for a client that did not read"
    );
}
