//! SPEC §2: `channel = PREFIX + PATH`, exactly as sent; refusals before the upgrade.

mod common;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_message_on_a_path_is_published_on_prefix_plus_path() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe("lightlevel/office/desk").await;
    let mut ws = connect(&publish.ws("/office/desk?unit=lux")).await;
    send_text(&mut ws, "417").await;
    assert_eq!(&watcher.next().await[..], b"417");
}

#[tokio::test]
async fn the_root_path_maps_to_prefix_slash_and_percent_escapes_stay_as_sent() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut root = redis.subscribe("lightlevel/").await;
    let mut escaped = redis.subscribe("lightlevel/a%20b/../c").await;
    let mut ws = connect(&publish.ws("/")).await;
    send_text(&mut ws, "root").await;
    assert_eq!(&root.next().await[..], b"root");
    let (status, _) = http(publish.addr, "POST", "/a%20b/../c", &[], b"raw").await;
    assert_eq!(status, 200);
    assert_eq!(&escaped.next().await[..], b"raw");
}

#[tokio::test]
async fn channel_prefix_flag_and_its_environment_variable_set_the_prefix() {
    let redis = Redis::start().await;
    let by_flag = Server::start(
        Kind::Publish,
        &redis.url(),
        &["--channel-prefix", "sensors:"],
    )
    .await;
    let by_env = Server::start_with_env(
        Kind::Publish,
        &redis.url(),
        &[],
        &[("LIGHTRELAY_CHANNEL_PREFIX", "env")],
    )
    .await;
    let mut flagged = redis.subscribe("sensors:/pi").await;
    let mut enved = redis.subscribe("env/pi").await;
    http(by_flag.addr, "POST", "/pi", &[], b"1").await;
    http(by_env.addr, "POST", "/pi", &[], b"2").await;
    assert_eq!(&flagged.next().await[..], b"1");
    assert_eq!(&enved.next().await[..], b"2");
}

#[tokio::test]
async fn redis_cli_publish_reaches_the_websocket_subscribers_of_the_path() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut ws = connect(&subscribe.ws("/office")).await;
    redis.wait_numsub("lightlevel/office", 1).await;
    assert_eq!(redis.publish("lightlevel/office", "42").await, 1);
    assert_eq!(next_text(&mut ws).await, "42");
    let _ = ws.send(Message::Close(None)).await;
}

#[tokio::test]
async fn a_path_over_max_path_bytes_is_refused_with_400_and_a_reason() {
    let redis = Redis::start().await;
    for kind in [Kind::Publish, Kind::Subscribe] {
        let server = Server::start(kind, &redis.url(), &["--max-path-bytes", "8"]).await;
        let (status, body) = upgrade_status(server.addr, "/123456789").await;
        assert_eq!(status, 400);
        assert!(
            body.contains("longer than the limit of 8"),
            "reason was: {body}"
        );
        assert_eq!(upgrade_status(server.addr, "/1234567").await.0, 101);
    }
}

#[tokio::test]
async fn a_path_with_a_byte_outside_printable_ascii_is_refused_with_400() {
    let redis = Redis::start().await;
    let server = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    // 0x7F (DEL) and a raw UTF-8 byte: neither is in 0x21..=0x7E.
    for target in ["/a\u{7f}b", "/caf\u{e9}"] {
        let (status, body) = upgrade_status(server.addr, target).await;
        assert_eq!(status, 400, "target {target:?}");
        assert!(body.lines().count() <= 1, "one-line reason, got {body:?}");
    }
    assert_eq!(redis.numsub("lightlevel/caf\u{e9}").await, 0);
}
