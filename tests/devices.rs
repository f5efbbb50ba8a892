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
