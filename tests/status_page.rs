//! SPEC §10: the status page. `GET /status.json` on both servers (this instance, Redis, the
//! channels with their rates, the fleet), and `GET /status` in real headless Chromium
//! (`tests/browser/status_page.mjs`, playwright-core driving Debian's `chromium`). The
//! screenshot lands in `target/status-page.png`.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use fred::interfaces::{HashesInterface, KeysInterface, SortedSetsInterface};
use serde_json::Value;

/// The path the steady publisher sends on.
const PATH: &str = "/status-test";

async fn status(addr: SocketAddr) -> Value {
    let (code, body) = http(addr, "GET", "/status.json", &[], b"").await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).expect("status.json is JSON")
}

/// The entry of `path` in a status, if listed.
fn channel<'a>(status: &'a Value, path: &str) -> Option<&'a Value> {
    status["channels"]
        .as_array()?
        .iter()
        .find(|c| c["path"] == path)
}

/// A publisher on the publish server sending one message every 20 ms on PATH, for at most a
/// few minutes (aborted when the test is done with it).
async fn steady_publisher(publish: &Server) -> tokio::task::JoinHandle<()> {
    let mut ws = connect(&publish.ws(PATH)).await;
    tokio::spawn(async move {
        for i in 0..10_000u32 {
            send_text(&mut ws, &format!("{{\"lux\":{i}}}")).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Poll `addr`'s status.json until PATH is listed with a rate above zero.
async fn until_rated(addr: SocketAddr) -> Value {
    eventually(|| async {
        let status = status(addr).await;
        match channel(&status, PATH).and_then(|c| c["rate"].as_f64()) {
            Some(rate) if rate > 0.0 => Ok(status),
            _ => Err(format!("{PATH} has no rate above zero: {status}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_shows_the_instance_redis_and_the_channels_rates() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut subscriber = connect(&subscribe.ws(PATH)).await;
    redis.wait_numsub(&format!("lightlevel{PATH}"), 1).await;
    let publisher = steady_publisher(&publish).await;
    // Messages flow end to end (so the subscribe server's topic carries them).
    next_data_text(&mut subscriber).await;

    for (server, role) in [(&subscribe, "subscribe"), (&publish, "publish")] {
        let status = until_rated(server.addr).await;
        let instance = &status["instance"];
        assert_eq!(instance["role"], role, "{status}");
        assert_eq!(instance["version"], env!("CARGO_PKG_VERSION"));
        assert!(instance["id"].as_str().is_some_and(|id| !id.is_empty()));
        assert_eq!(instance["listen"], server.addr.to_string());
        assert!(instance["uptime_s"].is_u64());
        assert!(status["connections"]["open"].as_u64().unwrap() >= 1);
        assert_eq!(status["connections"]["max"], 10_000, "{status}");
        assert_eq!(status["redis"]["up"], true, "{status}");
        let connections = status["redis"]["connections"].as_array().unwrap();
        assert!(!connections.is_empty());
        assert!(connections.iter().all(|c| c["up"] == true), "{status}");
        let entry = channel(&status, PATH).unwrap();
        assert_eq!(entry["channel"], format!("lightlevel{PATH}"));
        assert_eq!(
            entry["clients"], 1,
            "one publisher, one subscriber: {status}"
        );
        assert!(entry["messages"].as_u64().unwrap() > 0);
        assert!(status["messages"]["in_per_s"].as_f64().unwrap() > 0.0);
        assert!(status["messages"]["out_per_s"].as_f64().unwrap() > 0.0);
        // Presence is on by default: the fleet is read (what it holds is the heartbeat's).
        assert!(status["fleet"]["instances"].is_array(), "{status}");
        assert!(status["fleet_reason"].is_null(), "{status}");
    }
    publisher.abort();

    // Presence off: no fleet, and why.
    let quiet = Server::start(Kind::Publish, &redis.url(), &["--presence-interval", "0"]).await;
    let status = status(quiet.addr).await;
    assert!(status["fleet"].is_null(), "{status}");
    assert!(
        status["fleet_reason"]
            .as_str()
            .unwrap()
            .contains("--presence-interval 0"),
        "{status}"
    );
    // A channel with no publisher left is not listed.
    assert!(channel(&status, PATH).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_says_redis_is_down_and_why_there_is_no_fleet() {
    let mut redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    redis.kill();
    let status = eventually(|| async {
        let status = status(publish.addr).await;
        match status["redis"]["up"] == false {
            true => Ok(status),
            false => Err(format!("Redis still up: {status}")),
        }
    })
    .await;
    assert!(status["redis"]["reason"].is_string(), "{status}");
    assert!(status["fleet"].is_null(), "{status}");
    assert!(
        status["fleet_reason"]
            .as_str()
            .unwrap()
            .starts_with("Redis is unreachable"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_in_headless_chromium() {
    browser_deps();
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let _subscriber = connect(&subscribe.ws(PATH)).await;
    redis.wait_numsub(&format!("lightlevel{PATH}"), 1).await;
    let publisher = steady_publisher(&publish).await;
    let screenshot = root().join("target/status-page.png");
    let _ = std::fs::remove_file(&screenshot);

    // Another relay instance's heartbeat, written as it would be (src/presence/mod.rs's
    // layout), with a device on /pi.
    let other = redis.client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let id = "relay-elsewhere:8765";
    let _: () = other
        .zadd(
            "lightlevel instances",
            None,
            None,
            false,
            false,
            (now as f64, id),
        )
        .await
        .unwrap();
    let instance = format!(
        r#"{{"id":"{id}","role":"publish","version":"9.9.9","listen":"10.0.0.2:8765","started":{now}}}"#
    );
    let _: () = other
        .set(
            format!("lightlevel instance {id}"),
            instance,
            None,
            None,
            false,
        )
        .await
        .unwrap();
    let entry = format!(r#"{{"since":{now},"connections":1}}"#);
    let _: () = other
        .hset(format!("lightlevel presence {id}"), ("/pi", entry))
        .await
        .unwrap();

    // The fleet's instances as presence lists them: the other one, and these two once their
    // heartbeats write them.
    let fleet = status(publish.addr).await["fleet"].clone();
    let ids: Vec<&str> = fleet["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&id), "{fleet}");
    assert_eq!(fleet["devices"][0]["path"], "/pi", "{fleet}");
    let fleet = ids.join(",");
    let base = |s: &Server| format!("http://{}", s.addr);
    let node = Command::new("node")
        .arg(root().join("tests/browser/status_page.mjs"))
        .args([
            "--subscribe",
            &base(&subscribe),
            "--publish",
            &base(&publish),
        ])
        .args(["--path", PATH, "--instances", &fleet, "--screenshot"])
        .arg(&screenshot)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node must be installed (bin/test installs it)");
    let pid = node.id();
    // The script bounds itself (90 s); this is the backstop.
    let waited = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || node.wait_with_output()),
    )
    .await;
    let Ok(output) = waited else {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        panic!("the browser test ran longer than 120 s");
    };
    let output = output.unwrap().unwrap();
    let (exit, text) = (output.status, String::from_utf8_lossy(&output.stdout));
    print!("{text}");
    assert!(exit.success(), "the browser test failed: {exit}");
    assert!(text.contains("PASS status page"), "{text}");
    assert!(screenshot.exists());
    publisher.abort();
}
