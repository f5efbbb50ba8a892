//! Devices (SPEC §10): presence, the downlink, the status page; two publish instances and one
//! subscribe instance on one real Redis.

mod common;

use common::*;
use tokio_tungstenite::tungstenite::Message;

// Downlink

/// The downlink channel of `path` with the default `--downlink-suffix`.
fn down(path: &str) -> String {
    format!("lightlevel{path}:down")
}

#[tokio::test]
async fn a_downlink_published_in_redis_reaches_the_device_on_whichever_instance() {
    let redis = Redis::start().await;
    let one = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let two = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut plain = connect(&one.ws("/dev/a")).await;
    // Its acks are text frames: what the downlink brings comes as binary frames.
    let mut acked = connect_ack(&two.ws("/dev/a")).await;
    let mut other = connect(&two.ws("/dev/b")).await;
    // One subscription per instance for the path with a device on it.
    redis.wait_numsub(&down("/dev/a"), 2).await;
    redis.wait_numsub(&down("/dev/b"), 1).await;

    assert_eq!(redis.publish(&down("/dev/a"), "{\"interval\":5}").await, 2);
    assert_eq!(
        next_data(&mut plain).await,
        Message::text("{\"interval\":5}")
    );
    assert_eq!(
        next_data(&mut acked).await,
        Message::binary(&b"{\"interval\":5}"[..])
    );
    let bytes = vec![0u8, 0xff, 7];
    assert_eq!(redis.publish(&down("/dev/a"), bytes.clone()).await, 2);
    assert_eq!(next_data(&mut plain).await, Message::binary(bytes.clone()));
    assert_eq!(next_data(&mut acked).await, Message::binary(bytes));

    // The ack connection still publishes and gets its acks as text.
    send_text(&mut acked, "reading").await;
    assert_eq!(next_data_text(&mut acked).await, "0");
    // The other path's device got nothing.
    assert_eq!(sync(&mut other).await, Vec::<Message>::new());

    // A device that leaves takes its subscription with it.
    drop(plain);
    redis.wait_numsub(&down("/dev/a"), 1).await;
}

#[tokio::test]
async fn post_down_on_the_subscribe_server_answers_the_counts_or_404_and_on_the_publish_server_is_a_publish(
) {
    let redis = Redis::start().await;
    let one = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let two = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let relay = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut a = connect(&one.ws("/sensors/pi1")).await;
    let mut b = connect(&two.ws("/sensors/pi1")).await;
    redis.wait_numsub(&down("/sensors/pi1"), 2).await;

    let (status, body) = http(
        relay.addr,
        "POST",
        "/down/sensors/pi1",
        &[],
        b"{\"interval\":5}",
    )
    .await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{body}");
    let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(counts["relays"], 2, "{body}");
    assert!(counts.get("devices").is_some(), "{body}");
    assert_eq!(next_data(&mut a).await, Message::text("{\"interval\":5}"));
    assert_eq!(next_data(&mut b).await, Message::text("{\"interval\":5}"));

    // No device on the path: nothing got it.
    let (status, body) = http(relay.addr, "POST", "/down/sensors/pi2", &[], b"x").await;
    assert_eq!(status, 404);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "no device is connected on /sensors/pi2\n"
    );
    // Any other POST is still refused there (no --accept-publish).
    let (status, _) = http(relay.addr, "POST", "/sensors/pi1", &[], b"x").await;
    assert_eq!(status, 426);

    // On the publish server, /down/x is a channel like any other.
    let mut watcher = redis.subscribe("lightlevel/down/x").await;
    let (status, body) = http(one.addr, "POST", "/down/x", &[], b"plain").await;
    assert_eq!((status, &body[..]), (200, &b"1\n"[..]));
    assert_eq!(&watcher.next().await[..], b"plain");
}
