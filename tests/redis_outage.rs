//! When Redis goes away: publishing waits, then closes with 1013 past `--redis-timeout`
//! (SPEC §3); subscribers stay connected and every channel is subscribed again (SPEC §4);
//! `/healthz` and `lightrelay_redis_up` say so, and a server starts and listens without Redis
//! (SPEC §5). Redis is a real redis-server, killed with SIGKILL and started again on its port.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use futures_util::SinkExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn subscribers_stay_connected_through_a_redis_restart_and_get_what_is_published_after() {
    const OFFICE: &str = "lightlevel/office";
    let mut redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &["--ping-interval", "1s"]).await;
    let mut first = connect(&subscribe.ws("/office")).await;
    until_receiving(&redis, OFFICE, &mut first).await;
    let mut second = connect(&subscribe.ws("/office")).await;
    until_receiving(&redis, OFFICE, &mut second).await;

    redis.kill();
    subscribe.wait_health(503).await;
    // A channel first asked for while Redis is down is subscribed once it is back.
    let mut late = connect(&subscribe.ws("/late")).await;
    redis.restart().await;

    // NUMSUB back at 1 is the relay subscribing again, on its own.
    redis.wait_numsub(OFFICE, 1).await;
    redis.wait_numsub("lightlevel/late", 1).await;
    assert_eq!(redis.publish(OFFICE, "after the restart").await, 1);
    assert_eq!(redis.publish("lightlevel/late", "late too").await, 1);
    // The same connections: no close frame, no reconnect, the next message is the new one.
    for ws in [&mut first, &mut second] {
        assert_eq!(next_data(ws).await, Message::text("after the restart"));
    }
    assert_eq!(next_data(&mut late).await, Message::text("late too"));
    assert_eq!(subscribe.metric("lightrelay_connections").await, 3.0);
    assert_eq!(subscribe.metric("lightrelay_channels").await, 2.0);
    let metrics = subscribe.metrics_text().await;
    assert!(!metrics.contains("lightrelay_closed_total"), "{metrics}");
    subscribe.wait_health(200).await;
}

/// A TCP forwarder between a relay and Redis that the test opens and closes. Closed, it hangs
/// up on every new connection at once, as if Redis were still down; connections already open
/// are left alone (they end when Redis does). It lets a test restart Redis and subscribe a
/// watcher there before the relay can reach it again.
struct Gate {
    port: u16,
    open: Arc<AtomicBool>,
}

impl Gate {
    async fn start(redis_port: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let is_open = open.clone();
        tokio::spawn(async move {
            // Bounded: the relay reconnects at most every 100 ms for the length of a test.
            for _ in 0..10_000 {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !is_open.load(Ordering::SeqCst) {
                    continue; // dropped: hung up
                }
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Gate { port, open }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn an_ack_publisher_sending_through_an_outage_gets_every_ack_in_order_and_nothing_is_lost() {
    const CHANNEL: &str = "lightlevel/acked";
    let mut redis = Redis::start().await;
    // The publish server reaches Redis through the gate; the subscribe server directly.
    let gate = Gate::start(redis.port).await;
    let publish = Server::start(
        Kind::Publish,
        &gate.url(),
        &["--redis-timeout", "20s", "--ping-interval", "1s"],
    )
    .await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &["--ping-interval", "1s"]).await;
    let mut reader = connect(&subscribe.ws("/acked")).await;
    redis.wait_numsub(CHANNEL, 1).await;
    let before_kill = redis.subscribe(CHANNEL).await;
    let mut publisher = connect_ack(&publish.ws("/acked")).await;
    send_text(&mut publisher, "before").await;
    assert_eq!(next_data_text(&mut publisher).await, "2");
    assert_eq!(next_data(&mut reader).await, Message::text("before"));

    gate.set_open(false);
    redis.kill();
    drop(before_kill);
    // Some messages go out before the relay has noticed that Redis is gone, some after.
    for i in 0..25 {
        send_text(&mut publisher, &format!("during {i}")).await;
    }
    publish.wait_health(503).await;
    for i in 25..50 {
        send_text(&mut publisher, &format!("during {i}")).await;
    }

    // Every message was read off the WebSocket, none has reached Redis: the relay holds them.
    publish
        .wait_metric("lightrelay_messages_total{direction=\"ws_in\"}", |v| {
            v == 51.0
        })
        .await;
    assert_eq!(
        publish
            .metric("lightrelay_messages_total{direction=\"redis_out\"}")
            .await,
        1.0
    );

    redis.restart().await;
    let mut watcher = redis.subscribe(CHANNEL).await;
    // The watcher and the subscribe server (subscribed again on its own) are both there
    // before the publish server can reach Redis.
    redis.wait_numsub(CHANNEL, 2).await;
    gate.set_open(true);

    for i in 0..50 {
        assert_eq!(next_data_text(&mut publisher).await, "2", "ack {i}");
    }
    for i in 0..50 {
        let want = format!("during {i}");
        assert_eq!(watcher.next().await, want.as_bytes(), "Redis, message {i}");
        assert_eq!(next_data(&mut reader).await, Message::text(want));
    }
    // Nothing duplicated: the next message on both is the next one sent.
    send_text(&mut publisher, "after").await;
    assert_eq!(next_data_text(&mut publisher).await, "2");
    assert_eq!(&watcher.next().await[..], b"after");
    assert_eq!(next_data(&mut reader).await, Message::text("after"));
    assert_eq!(
        publish
            .metric("lightrelay_dropped_total{reason=\"publish_failed\"}")
            .await,
        0.0
    );
    assert!(!publish
        .metrics_text()
        .await
        .contains("lightrelay_closed_total"));
}

#[tokio::test]
async fn a_publisher_is_closed_with_1013_when_redis_stays_down_past_redis_timeout() {
    let mut redis = Redis::start().await;
    let publish = Server::start(
        Kind::Publish,
        &redis.url(),
        &["--redis-timeout", "1s", "--ping-interval", "1s"],
    )
    .await;
    let mut sender = connect_ack(&publish.ws("/gone")).await;
    let mut idle = connect(&publish.ws("/gone")).await;
    send_text(&mut sender, "first").await;
    assert_eq!(next_data_text(&mut sender).await, "0");

    redis.kill();
    send_text(&mut sender, "never accepted").await;
    // No ack for it: the next frame is the close.
    match next_data(&mut sender).await {
        Message::Close(Some(close)) => {
            assert_eq!(close.code, CloseCode::Again);
            assert!(
                close.reason.to_lowercase().contains("redis"),
                "reason: {:?}",
                close.reason.as_str()
            );
        }
        other => panic!("expected a 1013 close, got {other:?}"),
    }
    finish_close(&mut sender).await;
    publish
        .wait_series(
            "lightrelay_closed_total{reason=\"redis_unavailable\"}",
            |v| v == 1.0,
        )
        .await;
    // The loss is counted, not silent.
    assert!(
        publish
            .metric("lightrelay_dropped_total{reason=\"publish_failed\"}")
            .await
            >= 1.0
    );

    // A publisher that did not send meanwhile was left alone and publishes once Redis is back.
    redis.restart().await;
    publish.wait_healthy().await;
    let mut watcher = redis.subscribe("lightlevel/gone").await;
    idle.send(Message::text("still connected")).await.unwrap();
    assert_eq!(&watcher.next().await[..], b"still connected");
}

#[tokio::test]
async fn healthz_answers_503_with_a_reason_while_redis_is_down_and_200_once_it_is_back() {
    let mut redis = Redis::start().await;
    let flags = ["--ping-interval", "1s"];
    let publish = Server::start(Kind::Publish, &redis.url(), &flags).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &flags).await;
    for server in [&publish, &subscribe] {
        assert_eq!(server.wait_health(200).await, "ok\n");
        assert_eq!(server.metric("lightrelay_redis_up").await, 1.0);
    }

    redis.kill();
    for server in [&publish, &subscribe] {
        let reason = server.wait_health(503).await;
        assert!(reason.starts_with("redis "), "reason: {reason:?}");
        assert_eq!(reason.trim_end().lines().count(), 1, "reason: {reason:?}");
        server
            .wait_metric("lightrelay_redis_up", |v| v == 0.0)
            .await;
    }

    redis.restart().await;
    for server in [&publish, &subscribe] {
        assert_eq!(server.wait_health(200).await, "ok\n");
        server
            .wait_metric("lightrelay_redis_up", |v| v == 1.0)
            .await;
    }
}

#[tokio::test]
async fn servers_started_while_redis_is_down_listen_at_once_and_work_once_it_is_up() {
    // Nothing listens on it for 4 s: a port no concurrent connection can take meanwhile.
    let port = quiet_port();
    let url = format!("redis://127.0.0.1:{port}");
    let flags = ["--ping-interval", "1s"];
    let mut publish = Server::start_unhealthy(Kind::Publish, &url, &flags).await;
    let mut subscribe = Server::start_unhealthy(Kind::Subscribe, &url, &flags).await;
    for server in [&publish, &subscribe] {
        let (status, reason) = http(server.addr, "GET", "/healthz", &[], b"").await;
        assert_eq!(status, 503);
        let reason = String::from_utf8(reason).unwrap();
        assert!(reason.starts_with("redis "), "reason: {reason:?}");
        assert_eq!(server.metric("lightrelay_redis_up").await, 0.0);
    }
    // Let the servers retry for a while (their back-off reaches its cap after about 3 s):
    // they keep running, keep answering, and do not give up on Redis.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert!(!publish.has_exited() && !subscribe.has_exited());
    // WebSocket clients are accepted meanwhile.
    let mut early = connect(&subscribe.ws("/early")).await;
    let (status, _) = http(publish.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 503, "nothing listens on {port} yet");
    assert!(!publish.has_exited() && !subscribe.has_exited());

    let redis = Redis::start_on(port).await;
    for server in [&publish, &subscribe] {
        assert_eq!(server.wait_health(200).await, "ok\n");
        server
            .wait_metric("lightrelay_redis_up", |v| v == 1.0)
            .await;
    }
    redis.wait_numsub("lightlevel/early", 1).await;
    let mut publisher = connect_ack(&publish.ws("/early")).await;
    send_text(&mut publisher, "hello").await;
    assert_eq!(next_data_text(&mut publisher).await, "1");
    assert_eq!(next_data(&mut early).await, Message::text("hello"));
    assert!(!publish.has_exited() && !subscribe.has_exited());
}

#[tokio::test]
async fn a_deaf_redis_turns_healthz_503_and_the_subscription_still_works_after() {
    let redis = Redis::start().await;
    let subscribe =
        Server::start(Kind::Subscribe, &redis.url(), &["--ping-interval", "500ms"]).await;
    let mut ws = connect(&subscribe.ws("/deaf")).await;
    until_receiving(&redis, "lightlevel/deaf", &mut ws).await;

    // Redis stops answering but keeps every connection open: only a PING can tell.
    use fred::interfaces::ClientLike as _;
    let sleeper = redis.client().await;
    let deaf = tokio::spawn(async move {
        let _: fred::types::Value = sleeper
            .custom(
                fred::types::CustomCommand::new_static("DEBUG", None, false),
                vec!["SLEEP", "4"],
            )
            .await
            .unwrap();
    });
    let reason = subscribe.wait_health(503).await;
    assert!(reason.starts_with("redis subscriber"), "reason: {reason}");
    assert!(
        !deaf.is_finished(),
        "503 must come while Redis is deaf, not after it answers again"
    );
    deaf.await.unwrap();
    subscribe.wait_health(200).await;

    // The subscriber connection was reconnected and re-subscribed: messages flow again.
    redis.wait_numsub("lightlevel/deaf", 1).await;
    redis.publish("lightlevel/deaf", "awake").await;
    assert_eq!(next_data_text(&mut ws).await, "awake");
}
