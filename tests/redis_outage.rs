//! When Redis goes away: publishing waits, then closes with 1013 past `--redis-timeout`
//! (SPEC §3); subscribers stay connected and every channel is subscribed again (SPEC §4);
//! `/healthz` and `lightrelay_redis_up` say so, and a server starts and listens without Redis
//! (SPEC §5). Redis is a real redis-server, killed with SIGKILL and started again on its port.

mod common;

use common::*;
use futures_util::SinkExt;
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
    assert_eq!(closes(&metrics), 0.0, "{metrics}");
    subscribe.wait_health(200).await;
}

/// An ack publisher as SPEC §6 describes `lightrelay pub`: it keeps what was not
/// acknowledged, and when the relay closes it (1013: the outcome of what it had in flight is
/// unknown), connects again and resends that, in order.
struct Resender {
    url: String,
    ws: Ws,
    unacked: std::collections::VecDeque<String>,
    closed_1013: usize,
}

impl Resender {
    async fn connect(url: String) -> Resender {
        let ws = connect_ack(&url).await;
        Resender {
            url,
            ws,
            unacked: Default::default(),
            closed_1013: 0,
        }
    }

    async fn send(&mut self, text: &str) {
        self.unacked.push_back(text.to_string());
        // A send into a connection the relay is closing fails or is lost: it is resent.
        let _ = self.ws.send(Message::text(text)).await;
    }

    /// Read acks (reconnecting and resending after a 1013) until everything is acknowledged.
    async fn drain(&mut self) {
        for _ in 0..10_000 {
            if self.unacked.is_empty() {
                return;
            }
            match next_frame(&mut self.ws).await {
                Message::Text(count) => {
                    assert_eq!(count.as_str(), "2", "receiver count");
                    self.unacked.pop_front();
                }
                Message::Close(Some(frame)) => {
                    assert_eq!(frame.code, CloseCode::Again, "closed: {frame:?}");
                    self.closed_1013 += 1;
                    assert!(self.closed_1013 < 20, "closed with 1013 again and again");
                    self.ws = connect_ack(&self.url).await;
                    for text in self.unacked.clone() {
                        let _ = self.ws.send(Message::text(text)).await;
                    }
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        panic!("{} messages never acknowledged", self.unacked.len());
    }
}

/// The first occurrences in `seen` are `want`, in order; what comes twice comes only later
/// (a resend after a 1013). Returns how many were duplicates.
fn in_order_at_least_once(seen: &[String], want: &[String]) -> usize {
    let mut firsts = Vec::new();
    for text in seen {
        if !firsts.contains(text) {
            firsts.push(text.clone());
        }
    }
    assert_eq!(firsts, want, "first occurrences out of order or missing");
    seen.len() - firsts.len()
}

#[tokio::test]
async fn an_ack_publisher_sending_through_a_redis_restart_gets_everything_to_redis_in_order() {
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
    let mut publisher = Resender::connect(publish.ws("/acked")).await;
    publisher.send("before").await;
    publisher.drain().await;
    assert_eq!(next_data(&mut reader).await, Message::text("before"));

    gate.set_open(false);
    redis.kill();
    drop(before_kill);
    // Some messages go out before the relay has noticed that Redis is gone, some after.
    for i in 0..25 {
        publisher.send(&format!("during {i}")).await;
    }
    publish.wait_health(503).await;
    for i in 25..50 {
        publisher.send(&format!("during {i}")).await;
    }

    redis.restart().await;
    let mut watcher = redis.subscribe(CHANNEL).await;
    // The watcher and the subscribe server (subscribed again on its own) are both there
    // before the publish server can reach Redis.
    redis.wait_numsub(CHANNEL, 2).await;
    gate.set_open(true);
    publisher.drain().await;
    publisher.send("after").await;
    publisher.drain().await;

    let mut want: Vec<String> = (0..50).map(|i| format!("during {i}")).collect();
    want.push("after".into());
    let (mut in_redis, mut relayed) = (Vec::new(), Vec::new());
    while in_redis.last().map(String::as_str) != Some("after") {
        in_redis.push(String::from_utf8(watcher.next().await.to_vec()).unwrap());
    }
    while relayed.len() < in_redis.len() {
        relayed.push(next_data_text(&mut reader).await);
    }
    let duplicates = in_order_at_least_once(&in_redis, &want);
    assert_eq!(
        relayed, in_redis,
        "the subscriber got what Redis carried, as Redis did"
    );
    // The relay never publishes a message twice on its own: a duplicate needs a resend, and
    // a resend needs a 1013 whose abandoned messages are counted.
    let abandoned = publish
        .metric("lightrelay_dropped_total{reason=\"publish_failed\"}")
        .await;
    if publisher.closed_1013 == 0 {
        assert_eq!(duplicates, 0, "duplicated without a resend: {in_redis:?}");
        assert_eq!(abandoned, 0.0);
    } else {
        assert!(
            abandoned >= duplicates as f64,
            "{abandoned} abandoned, {duplicates} twice"
        );
    }
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

/// With the default `--ping-interval` (30 s), a lost Redis shows in `/healthz` and
/// `lightrelay_redis_up` as soon as fred reports the connection lost, not at the next PING
/// (the live page and the RedisDown alert read them), and a Redis that is back shows at once.
#[tokio::test]
async fn a_lost_redis_shows_in_healthz_at_once_not_at_the_next_ping() {
    let mut redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    for server in [&publish, &subscribe] {
        assert_eq!(server.wait_health(200).await, "ok\n");
    }
    let within = |what: &'static str, server: &'static str, status: u16, addr| async move {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let (seen, _) = http(addr, "GET", "/healthz", &[], b"").await;
            if seen == status {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{server}: /healthz still {seen} 5 s after {what} (the next PING is 30 s away)"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    redis.kill();
    within("Redis was killed", "publish", 503, publish.addr).await;
    within("Redis was killed", "subscribe", 503, subscribe.addr).await;
    assert_eq!(publish.metric("lightrelay_redis_up").await, 0.0);
    assert_eq!(subscribe.metric("lightrelay_redis_up").await, 0.0);

    redis.restart().await;
    within("Redis came back", "publish", 200, publish.addr).await;
    within("Redis came back", "subscribe", 200, subscribe.addr).await;
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
