//! SPEC §3: the publish server. Bytes unchanged and in order, pipelined PUBLISH, HTTP POST,
//! the `lightrelay.ack` subprotocol, and 1009 for an oversized message.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn text_and_binary_messages_reach_redis_byte_exact_and_in_order() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe("lightlevel/cam").await;
    let mut ws = connect(&publish.ws("/cam")).await;

    let binary: Vec<u8> = (0..=255u8).rev().chain([0, 0, 0xff]).collect();
    ws.send(Message::text("héllo, wörld")).await.unwrap();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    ws.send(Message::text("")).await.unwrap();
    for i in 0..1000 {
        ws.send(Message::text(i.to_string())).await.unwrap();
    }
    assert_eq!(&watcher.next().await[..], "héllo, wörld".as_bytes());
    assert_eq!(&watcher.next().await[..], &binary[..]);
    assert_eq!(&watcher.next().await[..], b"");
    for i in 0..1000 {
        assert_eq!(
            watcher.next().await,
            i.to_string().as_bytes(),
            "message {i} out of order"
        );
    }
}

#[tokio::test]
async fn post_publishes_the_body_unchanged_and_answers_the_receiver_count() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut first = redis.subscribe("lightlevel/office").await;
    let _second = redis.subscribe("lightlevel/office").await;
    let body = [0x00, 0x9f, b'\n', 0xff];
    let (status, answer) = http(publish.addr, "POST", "/office?ignored=1", &[], &body).await;
    assert_eq!(status, 200);
    assert_eq!(answer, b"2\n");
    assert_eq!(&first.next().await[..], &body[..]);
    assert_eq!(
        http(publish.addr, "POST", "/nobody", &[], b"x").await.1,
        b"0\n"
    );
}

#[tokio::test]
async fn a_post_body_over_max_message_bytes_is_refused_and_not_published() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &["--max-message-bytes", "8"]).await;
    let mut watcher = redis.subscribe("lightlevel/p").await;
    assert_eq!(
        http(publish.addr, "POST", "/p", &[], b"123456789").await.0,
        413
    );
    assert_eq!(
        http(publish.addr, "POST", "/p", &[], b"12345678").await.0,
        200
    );
    assert_eq!(&watcher.next().await[..], b"12345678");
}

#[tokio::test]
async fn ack_subprotocol_answers_each_message_in_order_with_the_receiver_count() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe("lightlevel/acked").await;
    let _other = redis.subscribe("lightlevel/acked").await;
    let mut ws = connect_ack(&publish.ws("/acked")).await;
    for i in 0..300 {
        send_text(&mut ws, &format!("m{i}")).await;
    }
    for i in 0..300 {
        assert_eq!(next_text(&mut ws).await, "2", "ack {i}");
        assert_eq!(watcher.next().await, format!("m{i}").as_bytes());
    }
}

#[tokio::test]
async fn without_the_ack_subprotocol_no_acks_are_sent() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &["--ping-interval", "300ms"]).await;
    let mut watcher = redis.subscribe("lightlevel/quiet").await;
    let mut ws = connect(&publish.ws("/quiet")).await;
    send_text(&mut ws, "1").await;
    assert_eq!(&watcher.next().await[..], b"1");
    // The next frame the server sends is a keep-alive ping, not an ack.
    let frame = tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut ws))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(frame, Message::Ping(_)), "got {frame:?}");
}

#[tokio::test]
async fn a_message_over_max_message_bytes_closes_with_1009_after_acking_those_before_it() {
    let redis = Redis::start().await;
    let publish = Server::start(
        Kind::Publish,
        &redis.url(),
        &["--max-message-bytes", "1KiB"],
    )
    .await;
    let mut watcher = redis.subscribe("lightlevel/big").await;
    let mut ws = connect_ack(&publish.ws("/big")).await;
    // The good messages arrive in the same read as the one too big: they are published and
    // acknowledged all the same, then the connection is closed.
    for i in 0..3 {
        ws.feed(Message::text(format!("fine {i}"))).await.unwrap();
    }
    ws.feed(Message::binary(vec![7u8; 1025])).await.unwrap();
    ws.flush().await.unwrap();
    for i in 0..3 {
        assert_eq!(next_text(&mut ws).await, "1", "ack {i}");
    }
    let close = close_frame(&mut ws).await;
    assert_eq!(close.code, CloseCode::Size);
    assert!(close.reason.contains("1024"), "reason: {}", close.reason);
    for i in 0..3 {
        assert_eq!(watcher.next().await, format!("fine {i}").as_bytes());
    }
}

/// A TCP proxy in front of Redis that holds back every reply once the first PUBLISH went
/// by, until `hold_until` PUBLISHes were seen (or 5 s passed). Reports how many PUBLISHes
/// the relay sent before it had any answer: 1 would mean one round trip per message.
struct HoldingProxy {
    port: u16,
    publishes_before_first_reply: Arc<AtomicUsize>,
}

impl HoldingProxy {
    async fn start(redis_port: u16, hold_until: usize) -> HoldingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let at_release = Arc::new(AtomicUsize::new(0));
        let released = Arc::new(AtomicBool::new(false));
        let report = at_release.clone();
        tokio::spawn(async move {
            // Bounded: the relay opens a handful of connections.
            for _ in 0..16 {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let server = TcpStream::connect(("127.0.0.1", redis_port)).await.unwrap();
                let (mut client_rd, mut client_wr) = client.into_split();
                let (mut server_rd, mut server_wr) = server.into_split();
                let seen_up = seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = client_rd.read(&mut buf).await {
                        if n == 0 || server_wr.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        let publishes = buf[..n]
                            .windows(7)
                            .filter(|w| w.eq_ignore_ascii_case(b"PUBLISH"))
                            .count();
                        seen_up.fetch_add(publishes, Ordering::SeqCst);
                    }
                });
                let (seen, released, at_release) =
                    (seen.clone(), released.clone(), at_release.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = server_rd.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        if seen.load(Ordering::SeqCst) > 0 && !released.load(Ordering::SeqCst) {
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                            while seen.load(Ordering::SeqCst) < hold_until
                                && tokio::time::Instant::now() < deadline
                            {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            at_release.store(seen.load(Ordering::SeqCst), Ordering::SeqCst);
                            released.store(true, Ordering::SeqCst);
                        }
                        if client_wr.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        HoldingProxy {
            port,
            publishes_before_first_reply: report,
        }
    }
}

#[tokio::test]
async fn publishes_are_pipelined_many_in_flight_on_one_redis_connection() {
    let redis = Redis::start().await;
    let proxy = HoldingProxy::start(redis.port, 50).await;
    let via_proxy = format!("redis://127.0.0.1:{}", proxy.port);
    // Presence off: its own connection would pass through the proxy too.
    let publish = Server::start(
        Kind::Publish,
        &via_proxy,
        &["--redis-connections", "1", "--presence-interval", "0"],
    )
    .await;
    let mut watcher = redis.subscribe("lightlevel/pipe").await;
    let mut ws = connect_ack(&publish.ws("/pipe")).await;
    for i in 0..50 {
        send_text(&mut ws, &i.to_string()).await;
    }
    for i in 0..50 {
        assert_eq!(next_text(&mut ws).await, "1", "ack {i}");
        assert_eq!(watcher.next().await, i.to_string().as_bytes());
    }
    let in_flight = proxy.publishes_before_first_reply.load(Ordering::SeqCst);
    assert!(
        in_flight >= 50,
        "only {in_flight} PUBLISHes were sent before the first reply: not pipelined"
    );
}

/// Twenty read batches, each its own fred pipeline, all in flight while the proxy holds
/// every reply: Redis runs them in the order they were read. This rests on fred handing a
/// pipeline to its router at the first poll (done when the batch is sent, not when the
/// session next polls it); a fred upgrade that changes that fails here.
#[tokio::test]
async fn batches_in_flight_together_reach_redis_in_the_order_they_were_read() {
    let redis = Redis::start().await;
    let proxy = HoldingProxy::start(redis.port, 200).await;
    let via_proxy = format!("redis://127.0.0.1:{}", proxy.port);
    // Presence off: its own connection would pass through the proxy too.
    let publish = Server::start(
        Kind::Publish,
        &via_proxy,
        &["--redis-connections", "1", "--presence-interval", "0"],
    )
    .await;
    let mut watcher = redis.subscribe("lightlevel/order").await;
    let mut ws = connect_ack(&publish.ws("/order")).await;
    for batch in 0..20 {
        for i in 0..10 {
            ws.feed(Message::text(format!("{batch}.{i}")))
                .await
                .unwrap();
        }
        ws.flush().await.unwrap();
        // Apart enough for the server to read each burst as a batch of its own.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for batch in 0..20 {
        for i in 0..10 {
            assert_eq!(watcher.next().await, format!("{batch}.{i}").as_bytes());
        }
    }
    for i in 0..200 {
        assert_eq!(next_text(&mut ws).await, "1", "ack {i}");
    }
    let in_flight = proxy.publishes_before_first_reply.load(Ordering::SeqCst);
    assert!(
        in_flight >= 100,
        "only {in_flight} PUBLISHes in flight at once"
    );
}

#[tokio::test]
async fn a_client_that_closes_right_after_sending_still_has_every_message_published() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe("lightlevel/bye").await;
    for round in 0..20 {
        let mut ws = connect(&publish.ws("/bye")).await;
        for i in 0..10 {
            ws.feed(Message::text(format!("{round}.{i}")))
                .await
                .unwrap();
        }
        // Close in the same write as the messages: the server reads them and the close together.
        ws.feed(Message::Close(None)).await.unwrap();
        ws.flush().await.unwrap();
        for i in 0..10 {
            assert_eq!(
                watcher.next().await,
                format!("{round}.{i}").as_bytes(),
                "round {round}"
            );
        }
    }
    // Counted when Redis's reply comes back, which may be just after the watcher saw it.
    let published = publish
        .wait_metric("lightrelay_messages_total{direction=\"redis_out\"}", |v| {
            v >= 200.0
        })
        .await;
    assert_eq!(published, 200.0);
}
