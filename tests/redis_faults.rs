//! Delivery under Redis faults (SPEC §3–5): a paused Redis is waited for without duplicating
//! anything, a burst does not close a subscriber that reads, a lost subscription is counted,
//! and Redis's own errors are shown in `/healthz` and the metrics.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

/// SIGSTOP Redis for 6 s under an acked publisher: the relays wait (503 meanwhile, with the
/// reason) and neither reconnect nor re-send; every message reaches the subscriber exactly
/// once, in order, and nobody is closed. (Before: the health check's forced reconnect made
/// fred re-send the window in flight while Redis also ran the originals: 256 duplicates.)
#[tokio::test]
async fn a_paused_redis_is_waited_for_and_nothing_is_duplicated_or_lost() {
    const CHANNEL: &str = "lightlevel/paused";
    const MESSAGES: usize = 800;
    let redis = Redis::start().await;
    let flags = ["--ping-interval", "1s", "--redis-timeout", "15s"];
    let publish = Server::start(Kind::Publish, &redis.url(), &flags).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &flags).await;
    let mut reader = connect(&subscribe.ws("/paused")).await;
    redis.wait_numsub(CHANNEL, 1).await;
    let mut publisher = connect_ack(&publish.ws("/paused")).await;

    // 100 messages a second: the pause falls in the middle of the stream.
    let sending = tokio::spawn(async move {
        for i in 0..MESSAGES {
            publisher.send(Message::text(format!("{i}"))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        publisher
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let paused = redis.pause();
    let reason = publish.wait_health(503).await;
    // Whichever of its connections noticed first: a PUBLISH one, or its downlink's
    // subscriber (SPEC §10).
    assert!(
        reason.starts_with("redis publish#") || reason.starts_with("redis downlink"),
        "reason: {reason}"
    );
    subscribe.wait_health(503).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(paused);

    let mut publisher = sending.await.unwrap();
    for i in 0..MESSAGES {
        assert_eq!(next_data_text(&mut publisher).await, "1", "ack {i}");
    }
    for i in 0..MESSAGES {
        assert_eq!(
            next_data_text(&mut reader).await,
            i.to_string(),
            "message {i}"
        );
    }
    // Nothing twice: the next message is the next one sent.
    let watcher_ok = redis.publish(CHANNEL, "end").await;
    assert_eq!(watcher_ok, 1);
    assert_eq!(next_data_text(&mut reader).await, "end");
    publish.wait_health(200).await;
    subscribe.wait_health(200).await;
    for server in [&publish, &subscribe] {
        let metrics = server.metrics_text().await;
        assert_eq!(closes(&metrics), 0.0, "{metrics}");
        assert!(
            !metrics.contains("lightrelay_redis_reconnects_total{"),
            "{metrics}"
        );
    }
}

/// 12,000 small messages published in one pipeline reach a subscriber that reads them all,
/// whole and in order, even though it looks away for 300 ms meanwhile: a burst is not
/// slowness. (Before: closed with 1008 once 1,024 messages were queued, after 0-1,916 frames
/// in 11 of 11 runs of a release build. The outbox's unit tests pin the rule itself.)
#[tokio::test]
async fn a_burst_does_not_close_a_subscriber_that_reads() {
    const CHANNEL: &str = "lightlevel/burst";
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut fast = connect(&subscribe.ws("/burst")).await;
    until_receiving(&redis, CHANNEL, &mut fast).await;
    let payloads: Vec<Vec<u8>> = (0..12_000)
        .map(|i| format!("{i:016}").into_bytes())
        .collect();
    let commands: Vec<Vec<&[u8]>> = payloads
        .iter()
        .map(|p| vec![&b"PUBLISH"[..], CHANNEL.as_bytes(), p])
        .collect();
    redis.pipe(&commands).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, payload) in payloads.iter().enumerate() {
        let got = next_data(&mut fast).await;
        assert_eq!(
            got,
            Message::text(String::from_utf8(payload.clone()).unwrap()),
            "{i}"
        );
    }
    let metrics = subscribe.metrics_text().await;
    assert_eq!(closes(&metrics), 0.0, "{metrics}");
}

/// A Redis restart and a `CLIENT KILL TYPE pubsub` each cost the subscribe server its
/// subscription: it subscribes again at once, and counts the channels and how long they
/// were without a subscription, so the gap is never silent.
#[tokio::test]
async fn a_lost_subscription_is_restored_and_counted() {
    const CHANNEL: &str = "lightlevel/lost";
    let mut redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &["--ping-interval", "1s"]).await;
    let mut ws = connect(&subscribe.ws("/lost")).await;
    until_receiving(&redis, CHANNEL, &mut ws).await;
    assert_eq!(subscribe.metric("lightrelay_resubscribed_total").await, 0.0);

    let killer = redis.client().await;
    let kill = fred::types::CustomCommand::new_static("CLIENT", None, false);
    let killed: i64 =
        fred::interfaces::ClientLike::custom(&killer, kill, vec!["KILL", "TYPE", "pubsub"])
            .await
            .unwrap();
    assert_eq!(killed, 1);
    subscribe
        .wait_series("lightrelay_resubscribed_total", |v| v >= 1.0)
        .await;
    until_receiving(&redis, CHANNEL, &mut ws).await;

    redis.restart().await;
    subscribe
        .wait_series("lightrelay_resubscribed_total", |v| v >= 2.0)
        .await;
    until_receiving(&redis, CHANNEL, &mut ws).await;
    assert!(
        subscribe
            .metric("lightrelay_unsubscribed_seconds_count")
            .await
            >= 2.0
    );
    assert!(
        subscribe
            .metric("lightrelay_unsubscribed_seconds_sum")
            .await
            > 0.0
    );
}

/// A wrong password: the relays keep retrying, and `/healthz` and the metrics say what Redis
/// said (WRONGPASS), not just "not connected".
#[tokio::test]
async fn a_wrong_password_is_shown_in_healthz_with_redis_words() {
    let redis = Redis::start().await;
    let admin = redis.client().await;
    let config = fred::types::CustomCommand::new_static("CONFIG", None, false);
    let _: fred::types::Value =
        fred::interfaces::ClientLike::custom(&admin, config, vec!["SET", "requirepass", "right"])
            .await
            .unwrap();
    let url = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    for kind in [Kind::Publish, Kind::Subscribe] {
        let server = Server::start_unhealthy(kind, &url, &[]).await;
        let reason = eventually(|| async {
            let reason = server.wait_health(503).await;
            if reason.contains("WRONGPASS") {
                Ok(reason)
            } else {
                Err(format!("healthz says: {reason}"))
            }
        })
        .await;
        assert!(reason.starts_with("redis "), "{reason}");
        server
            .wait_series("lightrelay_redis_errors_total{kind=\"auth\"}", |v| v >= 1.0)
            .await;
    }
}

/// The 101 goes out once the channel's subscription is active: a fresh subscriber gets what
/// is published right after it connected, and with `--accept-publish` a client's first
/// message, sent the moment it is open, comes back to it. (Before: missed in 1-3% of
/// connections, the 101 racing the SUBSCRIBE.) Each round uses a channel nobody subscribed.
#[tokio::test]
async fn what_is_published_right_after_the_upgrade_reaches_the_new_subscriber() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &["--accept-publish"]).await;
    for round in 0..150 {
        let mut echo = connect(&subscribe.ws(&format!("/echo/{round}"))).await;
        echo.send(Message::text(format!("mine {round}")))
            .await
            .unwrap();
        assert_eq!(next_data_text(&mut echo).await, format!("mine {round}"));

        let channel = format!("lightlevel/fresh/{round}");
        let mut fresh = connect(&subscribe.ws(&format!("/fresh/{round}"))).await;
        assert_eq!(redis.publish(&channel, "first").await, 1, "round {round}");
        assert_eq!(next_data_text(&mut fresh).await, "first");
    }
}

/// A `rediss://` Redis whose certificate is not trusted: the relay retries, and `/healthz`
/// and the metrics say why (the certificate), not just "not connected". With `--redis-ca`
/// naming the certificate, it connects.
#[tokio::test]
async fn an_untrusted_redis_certificate_is_shown_and_redis_ca_trusts_it() {
    let dir = temp_dir("redis-tls");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert_pem, key_pem) = (dir.join("redis.pem"), dir.join("redis.key"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    let port = free_port();
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(&cert_pem)
        .arg("--tls-key-file")
        .arg(&key_pem)
        .arg("--tls-ca-cert-file")
        .arg(&cert_pem)
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port).await;
    let url = format!("rediss://127.0.0.1:{port}");

    let untrusted = Server::start_unhealthy(Kind::Subscribe, &url, &[]).await;
    let reason = eventually(|| async {
        let reason = untrusted.wait_health(503).await;
        if reason.contains("Certificate") {
            Ok(reason)
        } else {
            Err(format!("healthz says: {reason}"))
        }
    })
    .await;
    assert!(reason.starts_with("redis subscriber"), "{reason}");
    untrusted
        .wait_series("lightrelay_redis_errors_total{kind=\"tls\"}", |v| v >= 1.0)
        .await;

    let ca = cert_pem.to_str().unwrap();
    let trusted = Server::start(Kind::Subscribe, &url, &["--redis-ca", ca]).await;
    trusted.wait_health(200).await;
    let _ = redis.kill();
    let _ = redis.wait();
}

/// `--redis-ca` with a file that holds no certificate is a start-up error: exit 2, one line.
#[tokio::test]
async fn a_redis_ca_without_a_certificate_exits_2() {
    let dir = temp_dir("redis-ca");
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let output = server_command(Kind::Publish)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            "rediss://127.0.0.1:1",
        ])
        .arg("--redis-ca")
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.lines().next().unwrap_or("").contains("--redis-ca"),
        "{stderr}"
    );
}
