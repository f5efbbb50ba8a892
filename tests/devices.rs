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
    // The fleet's presence, as an instance elsewhere writes it (presence's layout): three
    // connections on the path there. Each publish instance's heartbeat adds its own.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let instance =
        format!(r#"{{"id":"far","role":"publish","version":"0","listen":"x:1","started":{now}}}"#);
    let entry = format!(r#"{{"since":{now},"connections":3}}"#);
    redis
        .pipe(&[
            vec![b"ZADD", b"lightlevel instances", now.as_bytes(), b"far"],
            vec![b"SET", b"lightlevel instance far", instance.as_bytes()],
            vec![
                b"HSET",
                b"lightlevel presence far",
                b"/sensors/pi1",
                entry.as_bytes(),
            ],
        ])
        .await;

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
    // 3 from the far instance, plus the two connections here once heartbeats list them.
    let devices = counts["devices"].as_u64().expect(&body);
    assert!(devices == 3 || devices == 5, "{body}");
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

#[tokio::test]
async fn pub_downlink_prints_what_the_device_is_sent_while_publishing_stdin() {
    use std::io::{BufRead, Write};
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe("lightlevel/dev/p").await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lightrelay"))
        .args(["pub", "--downlink", &publish.ws("/dev/p")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, mut printed) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    writeln!(stdin, "first").unwrap();
    assert_eq!(&watcher.next().await[..], b"first");
    redis.wait_numsub(&down("/dev/p"), 1).await;
    // It publishes with acks on: the downlink comes as binary frames, UTF-8 printed as is.
    assert_eq!(redis.publish(&down("/dev/p"), "{\"interval\":5}").await, 1);
    assert_eq!(redis.publish(&down("/dev/p"), vec![0u8, 0xff]).await, 1);
    for expected in ["{\"interval\":5}", "AP8="] {
        let line = tokio::time::timeout(PATIENCE, printed.recv())
            .await
            .expect("no downlink printed")
            .unwrap();
        assert_eq!(line, expected);
    }
    writeln!(stdin, "second").unwrap();
    assert_eq!(&watcher.next().await[..], b"second");
    drop(stdin);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn with_auth_post_down_needs_a_down_grant_on_the_device_path() {
    use common::auth::{hs256, server_with_auth, unix_now, SECRET};
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let (relay, dir) =
        server_with_auth(Kind::Subscribe, &redis.url(), "publish", "down-auth").await;
    let mut device = connect(&publish.ws("/sensors/pi1")).await;
    redis.wait_numsub(&down("/sensors/pi1"), 1).await;
    let token = |claims: serde_json::Value| {
        let claims = serde_json::json!({"lightrelay": claims, "exp": unix_now() + 3600});
        format!("Bearer {}", hs256(SECRET.as_bytes(), None, &claims))
    };
    let target = "/down/sensors/pi1";
    let (status, _) = http(relay.addr, "POST", target, &[], b"x").await;
    assert_eq!(status, 401);
    // A pub grant on the path, or a down grant elsewhere (on /down/… itself too), is not one.
    for claims in [
        serde_json::json!({"pub": ["/sensors/pi1"]}),
        serde_json::json!({"down": ["/sensors/pi2", "/down/sensors/pi1"]}),
    ] {
        let bearer = token(claims);
        let (status, _) = http(
            relay.addr,
            "POST",
            target,
            &[("Authorization", &bearer)],
            b"x",
        )
        .await;
        assert_eq!(status, 403);
    }
    let bearer = token(serde_json::json!({"down": ["/sensors/*"]}));
    let (status, body) = http(
        relay.addr,
        "POST",
        target,
        &[("Authorization", &bearer)],
        b"go",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(next_data(&mut device).await, Message::text("go"));
    let _ = std::fs::remove_dir_all(dir);
}
