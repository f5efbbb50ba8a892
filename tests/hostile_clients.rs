//! Clients that misbehave on purpose (issue 12): each costs the server bounded CPU, memory and
//! time, and still gets a close frame that says why.

mod common;

use std::time::Duration;

use common::*;
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
