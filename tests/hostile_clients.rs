//! Clients that misbehave on purpose (issue 12): each costs the server bounded CPU, memory and
//! time, and still gets a close frame that says why.

mod common;

use std::time::Duration;

use common::*;
use fred::prelude::PubsubInterface;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
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
    until_receiving(&redis, "lightlevel/deaf", &mut ws).await;

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
        match next_frame(&mut ws).await {
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

/// A message over `--max-message-bytes` that its client sends whole anyway, then answers the
/// close: the client gets its 1009, and the connection ends with a FIN. The server used to
/// close the socket with the message's bytes unread, which resets the connection: the client's
/// writes fail and it may never read the close frame.
#[tokio::test]
async fn a_client_writing_past_its_1009_still_gets_the_close_and_a_clean_end() {
    let redis = Redis::start().await;
    let publish = Server::start(
        Kind::Publish,
        &redis.url(),
        &["--max-message-bytes", "64KiB"],
    )
    .await;
    for _ in 0..5 {
        let mut stream = raw_upgrade(publish.addr, "/big").await;
        let message = client_frame(OP_BINARY, true, &vec![7u8; 256 * 1024]);
        tokio::time::timeout(PATIENCE, stream.write_all(&message))
            .await
            .unwrap()
            .expect("the server reset the connection while the client was writing");
        stream
            .write_all(&client_frame(OP_CLOSE, true, &1000u16.to_be_bytes()))
            .await
            .expect("the server reset the connection while the client was writing");
        let (code, reason) = raw_close_frame(&mut stream).await;
        assert_eq!(code, 1009, "reason: {reason}");
        ends_cleanly(&mut stream).await;
    }
}

/// A client that starts an oversized frame and goes on writing something else: it is read
/// (bounded: 1 s, 1 MiB) and the connection still ends cleanly.
#[tokio::test]
async fn a_client_abandoning_an_oversized_frame_still_gets_a_clean_end() {
    let redis = Redis::start().await;
    let publish = Server::start(
        Kind::Publish,
        &redis.url(),
        &["--max-message-bytes", "64KiB"],
    )
    .await;
    let mut stream = raw_upgrade(publish.addr, "/big").await;
    stream
        .write_all(&client_header(OP_BINARY, true, 2 << 20))
        .await
        .unwrap();
    let (code, _) = raw_close_frame(&mut stream).await;
    assert_eq!(code, 1009);
    // Bytes after the server's close, as a client busy writing sends them.
    for _ in 0..16 {
        stream
            .write_all(&[0u8; 4096])
            .await
            .expect("the server reset the connection while the client was writing");
    }
    ends_cleanly(&mut stream).await;
}

/// A close frame whose reason is not UTF-8 gets 1007 and says so (it was told its text frame
/// was not UTF-8).
#[tokio::test]
async fn a_close_reason_that_is_not_utf8_gets_1007_saying_so() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut stream = raw_upgrade(subscribe.addr, "/bad").await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend([b'o', b'k', 0xff, 0xfe]);
    stream
        .write_all(&client_frame(OP_CLOSE, true, &payload))
        .await
        .unwrap();
    let (code, reason) = raw_close_frame(&mut stream).await;
    assert_eq!(code, 1007, "reason: {reason}");
    assert_eq!(reason, "close reason is not valid UTF-8");
}

/// A client that sends the start of a message and never the rest, while answering every ping,
/// is closed with 1008 once `--handshake-timeout` passed; on the subscribe server too, which
/// discards what it reads. It used to stay forever, holding what it had declared.
#[tokio::test]
async fn a_message_begun_and_never_finished_is_closed_within_the_handshake_timeout() {
    let redis = Redis::start().await;
    let flags = [
        "--handshake-timeout",
        "1s",
        "--ping-interval",
        "200ms",
        "--idle-timeout",
        "5s",
    ];
    let publish = Server::start(Kind::Publish, &redis.url(), &flags).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &flags).await;
    for server in [&publish, &subscribe] {
        let mut stream = raw_upgrade(server.addr, "/slow").await;
        // The first fragment of a text message; continuation frames never follow.
        stream
            .write_all(&client_frame(OP_TEXT, false, &[b'a'; 1000]))
            .await
            .unwrap();
        let (code, reason) = raw_close_frame(&mut stream).await;
        assert_eq!(code, 1008, "reason: {reason}");
        assert!(reason.contains("not finished"), "reason: {reason}");
        server
            .wait_series("lightrelay_closed_total{reason=\"message_timeout\"}", |n| {
                n == 1.0
            })
            .await;
    }
}

/// One frame declaring a large message, its first bytes sent: tungstenite reserves all of it
/// at once. Clients doing so together hold at most 64 MiB (or `--max-message-bytes`): the one
/// that would go over is closed with 1013 at once.
#[tokio::test]
async fn unfinished_messages_together_hold_a_bounded_amount() {
    let redis = Redis::start().await;
    let publish = Server::start(
        Kind::Publish,
        &redis.url(),
        &["--max-message-bytes", "30MiB", "--ping-interval", "1s"],
    )
    .await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = raw_upgrade(publish.addr, "/hog").await;
        stream
            .write_all(&client_header(OP_BINARY, true, 30 << 20))
            .await
            .unwrap();
        stream.write_all(&[1u8; 100]).await.unwrap();
        streams.push(stream);
    }
    // 30 + 30 MiB fit, a third does not.
    let closes: Vec<_> = streams
        .iter_mut()
        .map(|stream| Box::pin(raw_close_frame(stream)))
        .collect();
    let ((code, reason), _, _) = futures_util::future::select_all(closes).await;
    assert_eq!(code, 1013, "reason: {reason}");
    assert!(reason.contains("server busy"), "reason: {reason}");
}
