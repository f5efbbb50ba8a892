//! Devices (SPEC §10): presence, downlink, against a real Redis and the real binaries.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use fred::interfaces::{ClientLike, HashesInterface, ServerInterface};
use fred::types::CustomCommand;
use serde_json::Value as Json;

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
