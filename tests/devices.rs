//! Devices (SPEC §10): presence and the downlink, with two publish instances and one subscribe
//! instance on one real Redis and the real binaries.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use fred::interfaces::{ClientLike, HashesInterface, ServerInterface};
use fred::types::CustomCommand;
use serde_json::Value as Json;
use tokio_tungstenite::tungstenite::Message;

// Presence

const BEAT: &str = "1s";

async fn publish_instance(redis: &Redis, id: &str) -> Server {
    Server::start(
        Kind::Publish,
        &redis.url(),
        &["--presence-interval", BEAT, "--instance-id", id],
    )
    .await
}

/// `GET path` on a server: status and body as JSON (Null when not JSON).
async fn get_json(addr: SocketAddr, path: &str) -> (u16, Json) {
    let (status, body) = http(addr, "GET", path, &[], b"").await;
    (status, serde_json::from_slice(&body).unwrap_or(Json::Null))
}

/// The (path, instance) pairs `GET /presence` lists on `addr`.
async fn devices(addr: SocketAddr) -> Vec<(String, String)> {
    let (status, fleet) = get_json(addr, "/presence").await;
    assert_eq!(status, 200, "GET /presence answered {status}");
    let mut pairs: Vec<(String, String)> = fleet["devices"]
        .as_array()
        .expect("a devices array")
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap().to_string(),
                d["instance"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    pairs.sort();
    pairs
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, i)| (p.to_string(), i.to_string()))
        .collect()
}

/// Wait until `GET /presence` on `addr` lists exactly `want`.
async fn wait_devices(addr: SocketAddr, want: &[(&str, &str)]) {
    let want = pairs(want);
    eventually(|| {
        let want = want.clone();
        async move {
            let seen = devices(addr).await;
            if seen == want {
                Ok(())
            } else {
                Err(format!(
                    "/presence on {addr} listed {seen:?}, expected {want:?}"
                ))
            }
        }
    })
    .await
}

/// The next join/leave event on the events channel, as (event, path, instance).
async fn next_event(watcher: &mut RedisWatcher) -> (String, String, String) {
    let event: Json = serde_json::from_slice(&watcher.next().await).unwrap();
    assert!(event["at"].as_u64().is_some(), "{event}");
    (
        event["event"].as_str().unwrap().to_string(),
        event["path"].as_str().unwrap().to_string(),
        event["instance"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn presence_lists_every_device_from_either_server() {
    let redis = Redis::start().await;
    let a = publish_instance(&redis, "pub-a").await;
    let b = publish_instance(&redis, "pub-b").await;
    let sub = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &["--presence-interval", BEAT],
    )
    .await;
    let _cam = connect(&a.ws("/cam/1")).await;
    let _pi = connect(&b.ws("/pi/7")).await;
    let want = [("/cam/1", "pub-a"), ("/pi/7", "pub-b")];
    for server in [&sub, &a, &b] {
        wait_devices(server.addr, &want).await;
    }
    // The fleet's instances: both publish servers and the subscribe server, with versions.
    let (_, fleet) = get_json(sub.addr, "/presence").await;
    let instances = fleet["instances"].as_array().unwrap();
    let roles: Vec<(&str, &str)> = instances
        .iter()
        .map(|i| (i["id"].as_str().unwrap(), i["role"].as_str().unwrap()))
        .collect();
    assert!(roles.contains(&("pub-a", "publish")), "{fleet}");
    assert!(roles.contains(&("pub-b", "publish")), "{fleet}");
    assert!(
        roles.iter().any(|(_, role)| *role == "subscribe"),
        "{fleet}"
    );
    assert!(instances
        .iter()
        .all(|i| i["version"].is_string() && i["heartbeat"].as_u64().is_some_and(|h| h > 0)));
    // One path: its entries, from either server.
    for server in [&sub, &b] {
        let (status, entries) = get_json(server.addr, "/presence/cam/1").await;
        assert_eq!(status, 200);
        let entries = entries.as_array().unwrap();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0]["instance"], "pub-a");
        assert_eq!(entries[0]["connections"], 1);
        assert!(entries[0]["since"].as_u64().is_some_and(|s| s > 0));
    }
    let (status, _) = http(sub.addr, "GET", "/presence/nobody/here", &[], b"").await;
    assert_eq!(status, 404);
}

/// The script writes each event's JSON itself (a path as a string with `"` and `\`
/// escaped): a path and an instance id holding both still read back as they were.
#[tokio::test]
async fn presence_events_escape_quotes_and_backslashes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = Redis::start().await;
    let mut events = redis.subscribe("lightlevel/_presence").await;
    let a = publish_instance(&redis, r#"pub"a\b"#).await;
    // Raw, since a URL parser would refuse these bytes; the relay accepts printable ASCII.
    let mut tcp = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    tcp.write_all(
        b"GET /cam/\"q\\x HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 1024];
    let n = tcp.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        next_event(&mut events).await,
        ("join".into(), r#"/cam/"q\x"#.into(), r#"pub"a\b"#.into())
    );
    drop(tcp);
    assert_eq!(
        next_event(&mut events).await,
        ("leave".into(), r#"/cam/"q\x"#.into(), r#"pub"a\b"#.into())
    );
}

#[tokio::test]
async fn presence_events_carry_join_and_leave() {
    let redis = Redis::start().await;
    let mut events = redis.subscribe("lightlevel/_presence").await;
    let a = publish_instance(&redis, "pub-a").await;
    let mut cam = connect(&a.ws("/cam/1")).await;
    assert_eq!(
        next_event(&mut events).await,
        ("join".into(), "/cam/1".into(), "pub-a".into())
    );
    // A second connection on the same path is no new join; its leave is no leave either.
    let second = connect(&a.ws("/cam/1")).await;
    let (_, entries) = eventually(|| async {
        match get_json(a.addr, "/presence/cam/1").await {
            (200, e) if e[0]["connections"] == 2 => Ok((200, e)),
            other => Err(format!("/presence/cam/1: {other:?}")),
        }
    })
    .await;
    assert_eq!(entries.as_array().unwrap().len(), 1);
    drop(second);
    cam.close(None).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        ("leave".into(), "/cam/1".into(), "pub-a".into())
    );
    wait_devices(a.addr, &[]).await;
}

#[tokio::test]
async fn presence_of_a_killed_instance_vanishes_within_three_heartbeats() {
    let redis = Redis::start().await;
    let a = publish_instance(&redis, "pub-a").await;
    let b = publish_instance(&redis, "pub-b").await;
    let _cam = connect(&a.ws("/cam/1")).await;
    let _pi = connect(&b.ws("/pi/7")).await;
    wait_devices(b.addr, &[("/cam/1", "pub-a"), ("/pi/7", "pub-b")]).await;
    a.signal("KILL");
    let killed = Instant::now();
    // Three heartbeats of one second, and a second's grace for this test's own polling.
    let bound = Duration::from_secs(4);
    loop {
        let seen = devices(b.addr).await;
        if seen == pairs(&[("/pi/7", "pub-b")]) {
            break;
        }
        assert!(
            killed.elapsed() < bound,
            "{seen:?} still listed {:?} after the SIGKILL",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The survivor keeps beating: its heartbeat moves past the kill and its device stays.
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - killed.elapsed().as_millis() as u64;
    let fleet = eventually(|| async {
        let (_, fleet) = get_json(b.addr, "/presence").await;
        let beat = fleet["instances"]
            .as_array()
            .and_then(|all| all.iter().find(|i| i["id"] == "pub-b"))
            .and_then(|i| i["heartbeat"].as_u64());
        match beat {
            Some(beat) if beat > killed_at + 3000 => Ok(fleet),
            _ => Err(format!("pub-b's heartbeat did not move on: {fleet}")),
        }
    })
    .await;
    assert_eq!(fleet["devices"].as_array().unwrap().len(), 1, "{fleet}");
    assert!(
        !fleet["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == "pub-a"),
        "{fleet}"
    );
}

#[tokio::test]
async fn a_restarted_instance_does_not_show_its_previous_paths() {
    let redis = Redis::start().await;
    // A long interval: the previous life's hash would outlive the restart by many seconds.
    let args = ["--presence-interval", "5s", "--instance-id", "pub-a"];
    let a = Server::start(Kind::Publish, &redis.url(), &args).await;
    let old = connect(&a.ws("/old")).await;
    wait_devices(a.addr, &[("/old", "pub-a")]).await;
    let started = |fleet: &Json| {
        fleet["instances"]
            .as_array()
            .and_then(|all| all.iter().find(|i| i["id"] == "pub-a"))
            .and_then(|i| i["started"].as_u64())
    };
    let (_, fleet) = get_json(a.addr, "/presence").await;
    let first_life = started(&fleet).unwrap();
    a.signal("KILL");
    drop(old);
    drop(a);
    let a = Server::start(Kind::Publish, &redis.url(), &args).await;
    // The new life's first heartbeat (at start) writes the instance and drops the old paths
    // in one command: as soon as the new life is listed, /old is not.
    let fleet = eventually(|| async {
        let (_, fleet) = get_json(a.addr, "/presence").await;
        match started(&fleet) {
            Some(started) if started != first_life => Ok(fleet),
            _ => Err(format!("the new life of pub-a is not listed yet: {fleet}")),
        }
    })
    .await;
    assert_eq!(fleet["devices"], Json::Array(vec![]), "{fleet}");
    let client = redis.client().await;
    let fields: Vec<String> = client.hkeys("lightlevel presence pub-a").await.unwrap();
    assert!(fields.is_empty(), "{fields:?}");
}

#[tokio::test]
async fn presence_off_writes_nothing_to_redis() {
    let redis = Redis::start().await;
    let off = ["--presence-interval", "0"];
    let publish = Server::start(Kind::Publish, &redis.url(), &off).await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &off).await;
    // A control instance with presence on proves a heartbeat would have been written by now.
    let control = Redis::start().await;
    let on = Server::start(
        Kind::Publish,
        &control.url(),
        &["--presence-interval", BEAT],
    )
    .await;
    let mut device = connect_ack(&publish.ws("/cam/1")).await;
    send_text(&mut device, "42").await;
    assert_eq!(next_text(&mut device).await, "0");
    let _controlled = connect(&on.ws("/cam/1")).await;
    eventually(|| async {
        match devices(on.addr).await.as_slice() {
            [(path, _)] if path == "/cam/1" => Ok(()),
            seen => Err(format!("the control instance listed {seen:?}")),
        }
    })
    .await;
    for server in [&publish, &sub] {
        let (status, body) = http(server.addr, "GET", "/presence", &[], b"").await;
        assert_eq!(status, 404);
        let body = String::from_utf8_lossy(&body).to_string();
        assert!(
            body.contains("--presence-interval 0") && body.lines().count() == 1,
            "{body}"
        );
    }
    let client = redis.client().await;
    let size: i64 = client.dbsize().await.unwrap();
    let keys: Vec<String> = client
        .custom(CustomCommand::new_static("KEYS", None, false), vec!["*"])
        .await
        .unwrap();
    assert_eq!((size, keys), (0, Vec::<String>::new()));
}

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

/// With `--auth all` (every read needs a token), what shows the whole fleet — `/presence`,
/// `/presence/PATH`, `/status.json` — needs an operator's token, one whose `sub` grant covers
/// every path (`*`); a grant on some paths is not enough. With `--auth publish` (the
/// deployed default) they are as open as subscribing is.
#[tokio::test]
async fn with_auth_all_the_fleet_needs_a_token_that_may_subscribe_everywhere() {
    use common::auth::{server_with_auth, token};
    let redis = Redis::start().await;
    let (all, _dir) = server_with_auth(Kind::Subscribe, &redis.url(), "all", "fleet-auth").await;
    let (open, _dir2) =
        server_with_auth(Kind::Subscribe, &redis.url(), "publish", "fleet-open").await;
    for target in ["/presence", "/presence/x", "/status.json"] {
        let (status, _) = http(all.addr, "GET", target, &[], b"").await;
        assert_eq!(status, 401, "{target} without a token");
        let some = format!("Bearer {}", token(&[], &["/x", "/office/*"]));
        let (status, _) = http(all.addr, "GET", target, &[("Authorization", &some)], b"").await;
        assert_eq!(status, 403, "{target} with a grant on some paths");
        let every = format!("Bearer {}", token(&[], &["*"]));
        let (status, _) = http(all.addr, "GET", target, &[("Authorization", &every)], b"").await;
        // (`/presence/x` is 404: no device is on it.)
        assert!(
            ![401, 403].contains(&status),
            "{target} with an operator's token: {status}"
        );
        let (status, _) = http(open.addr, "GET", target, &[], b"").await;
        assert!(
            ![401, 403].contains(&status),
            "{target} with --auth publish: {status}"
        );
    }
}
