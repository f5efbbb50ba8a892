//! `--redis-mode cluster` (SPEC §11) against a real Redis Cluster on loopback: three
//! primaries and three replicas (`common::cluster`). One cluster per test function; each
//! function checks several things in sequence, each step named in its assertions.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::Cluster;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const CLUSTER_MODE: &[&str] = &["--redis-mode", "cluster", "--history", "10000"];

async fn relays(cluster: &Cluster) -> (Server, Server) {
    let url = cluster.seed_url();
    let extra: Vec<&str> = CLUSTER_MODE
        .iter()
        .copied()
        .chain(["--ping-interval", "500ms", "--presence-interval", "1s"])
        .collect();
    let subscribe = Server::start(Kind::Subscribe, &url, &extra).await;
    let publish = Server::start(Kind::Publish, &url, &extra).await;
    (subscribe, publish)
}

/// What a WebSocket subscriber received, as numbers, read by a task of its own; `closed` says
/// the connection ended (a subscriber must never have to reconnect).
#[derive(Clone, Default)]
struct Received {
    numbers: Arc<Mutex<Vec<u64>>>,
    closed: Arc<Mutex<Option<String>>>,
}

impl Received {
    fn listen(mut ws: Ws) -> Received {
        let received = Received::default();
        let out = received.clone();
        tokio::spawn(async move {
            while let Some(frame) = ws.next().await {
                match frame {
                    Ok(Message::Text(t)) => {
                        if let Ok(n) = t.as_str().parse() {
                            out.numbers.lock().unwrap().push(n);
                        }
                    }
                    Ok(Message::Close(c)) => {
                        *out.closed.lock().unwrap() = Some(format!("closed: {c:?}"));
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        *out.closed.lock().unwrap() = Some(format!("error: {e}"));
                        return;
                    }
                }
            }
            *out.closed.lock().unwrap() = Some("ended".into());
        });
        received
    }

    fn numbers(&self) -> Vec<u64> {
        self.numbers.lock().unwrap().clone()
    }

    /// Until the subscriber has received a number above `n` (still connected).
    async fn wait_beyond(&self, n: u64, step: &str) {
        eventually(|| async {
            if let Some(why) = self.closed.lock().unwrap().clone() {
                panic!("{step}: the subscriber's connection ended ({why})");
            }
            match self.numbers().last() {
                Some(&last) if last > n => Ok(()),
                last => Err(format!(
                    "{step}: the subscriber got nothing after {n} (last: {last:?})"
                )),
            }
        })
        .await
    }
}

/// An acknowledged publisher (SPEC §3, `lightrelay.ack`) sending 0, 1, 2, … one at a time:
/// a number counts as acknowledged once its ack came; a connection that closes (1013) or
/// stays silent is replaced and the unacknowledged number sent again, as `lightrelay pub`
/// does.
struct Publisher {
    acked: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn start(url: String) -> Publisher {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, stopped) = (acked.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut ws = connect_ack(&url).await;
            let mut next = 0u64;
            // Bounded: at most this many messages, each waited for at most PATIENCE.
            while !stopped.load(Ordering::Relaxed) && next < 100_000 {
                let acked = match ws.send(Message::text(next.to_string())).await {
                    Ok(()) => tokio::time::timeout(PATIENCE, async {
                        while let Some(Ok(frame)) = ws.next().await {
                            match frame {
                                Message::Text(_) => return true,
                                Message::Close(_) => return false,
                                _ => {}
                            }
                        }
                        false
                    })
                    .await
                    .unwrap_or(false),
                    Err(_) => false,
                };
                if acked {
                    out.lock().unwrap().push(next);
                    next += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                } else {
                    ws = connect_ack(&url).await;
                }
            }
        });
        Publisher { acked, stop, task }
    }

    fn last_acked(&self) -> u64 {
        self.acked.lock().unwrap().last().copied().unwrap_or(0)
    }

    /// Stop, and return every acknowledged number.
    async fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the publisher did not stop")
            .unwrap();
        self.acked.lock().unwrap().clone()
    }
}

/// Every acknowledged number reached the subscriber, in order (a number sent again after a
/// lost ack may come twice, next to itself: never out of order).
async fn all_acked_arrived(received: &Received, acked: &[u64], step: &str) {
    let last = *acked.last().expect("nothing was acknowledged");
    eventually(|| async {
        let got = received.numbers();
        // A set, not a binary search: out of order is its own failure, asserted below.
        let seen: std::collections::HashSet<u64> = got.iter().copied().collect();
        let missing: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|n| !seen.contains(n))
            .take(10)
            .collect();
        match (missing.is_empty(), got.last()) {
            (true, Some(&l)) if l >= last => Ok(()),
            _ => Err(format!(
                "{step}: acknowledged numbers lost at the subscriber (first ones: {missing:?}; \
                 {} acknowledged, {} received)",
                acked.len(),
                got.len()
            )),
        }
    })
    .await;
    let got = received.numbers();
    assert!(
        got.windows(2).all(|w| w[0] <= w[1]),
        "{step}: out of order at the subscriber: {:?}",
        got.windows(2).find(|w| w[0] > w[1])
    );
    assert!(
        received.closed.lock().unwrap().is_none(),
        "{step}: the subscriber was disconnected"
    );
}

/// (a) Channels spread over the shards (PUBSUB SHARDNUMSUB on every primary), a
/// `redis-cli -c SPUBLISH` reaches a WebSocket subscriber, a publisher's messages arrive
/// exactly once and in order, `?last=N` replays from the channel's stream on its shard,
/// presence is written and its events arrive, a shard's dropped subscriber connection is
/// subscribed again, and a pattern path is refused with 400.
#[tokio::test]
async fn channels_spread_over_the_shards_and_arrive_once_in_order() {
    let cluster = Cluster::start().await;
    let (subscribe, publish) = relays(&cluster).await;

    // Step 1: 30 channels, each subscribed on the primary that owns its slot.
    let mut subscribers = Vec::new();
    let channels: Vec<String> = (0..30).map(|i| format!("lightlevel/room{i}")).collect();
    for i in 0..30 {
        subscribers.push(connect(&subscribe.ws(&format!("/room{i}"))).await);
    }
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3, "step 1: a cluster of three primaries");
    eventually(|| async {
        let counts: Vec<i64> = primaries
            .iter()
            .map(|&p| cluster.shardnumsub(p, &channels))
            .collect();
        match counts.iter().all(|&n| n > 0) && counts.iter().sum::<i64>() == 30 {
            true => Ok(()),
            false => Err(format!(
                "step 1: 30 channels not spread over the 3 primaries' sharded subscriptions \
                 (PUBSUB SHARDNUMSUB per primary: {counts:?})"
            )),
        }
    })
    .await;

    // Step 2: redis-cli -c SPUBLISH reaches the WebSocket subscribers of /office.
    let mut office = connect(&subscribe.ws("/office")).await;
    let receivers = cluster.cli_c(&["SPUBLISH", "lightlevel/office", "42"]);
    assert_eq!(receivers, "1", "step 2: SPUBLISH's receiver count");
    match next_data(&mut office).await {
        Message::Text(t) => assert_eq!(t.as_str(), "42", "step 2: redis-cli -c SPUBLISH"),
        other => panic!("step 2: expected 42, got {other:?}"),
    }

    // Step 3: a publisher's 300 messages arrive exactly once and in order.
    let received = Received::listen(connect(&subscribe.ws("/order")).await);
    let mut publisher = connect_ack(&publish.ws("/order")).await;
    for n in 0..300u64 {
        publisher.send(Message::text(n.to_string())).await.unwrap();
    }
    for n in 0..300u64 {
        let ack = next_data_text(&mut publisher).await;
        assert_eq!(ack, "1", "step 3: the ack of message {n} (one receiver)");
    }
    eventually(|| async {
        match received.numbers() {
            got if got == (0..300).collect::<Vec<u64>>() => Ok(()),
            got => Err(format!(
                "step 3: expected 0..300 once each, in order; got {} numbers: {:?}…",
                got.len(),
                &got[..got.len().min(20)]
            )),
        }
    })
    .await;

    // Step 4: history works on the channel's shard: ?last=5 replays the 5 newest.
    let mut late = connect(&subscribe.ws("/order?last=5")).await;
    for n in 295..300u64 {
        match next_data(&mut late).await {
            Message::Text(t) => assert_eq!(t.as_str(), n.to_string(), "step 4: ?last=5"),
            other => panic!("step 4: expected {n}, got {other:?}"),
        }
    }

    // Step 5: presence's keys share a slot (one script), and its events reach the relay's
    // own /_presence subscribers: the publisher of /order is listed, and a new one joins.
    let mut events = connect(&subscribe.ws("/_presence")).await;
    let _joining = connect_ack(&publish.ws("/joining")).await;
    // (The join of /order may come first, from the heartbeat after step 3.)
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &String| e.contains(r#""event":"join","path":"/joining""#))
    {
        assert!(
            seen.len() < 10,
            "step 5: no join event for /joining among {seen:?}"
        );
        match next_data(&mut events).await {
            Message::Text(t) => seen.push(t.to_string()),
            other => panic!("step 5: expected a join event, got {other:?}"),
        }
    }
    eventually(|| async {
        let (status, body) = http(subscribe.addr, "GET", "/presence/order", &[], b"").await;
        match status {
            200 => Ok(()),
            _ => Err(format!(
                "step 5: GET /presence/order answered {status}: {}",
                String::from_utf8_lossy(&body)
            )),
        }
    })
    .await;

    // Step 6: one shard drops the relays' subscriber connections (CLIENT KILL): the hub
    // subscribes that node's channels again on the new connection.
    let owner = cluster.owner(cluster.slot("lightlevel/office"));
    let killed = cluster.cli(owner, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_ne!(
        killed, "0",
        "step 6: CLIENT KILL found the subscriber connections"
    );
    eventually(|| async {
        match cluster
            .cli_c(&["SPUBLISH", "lightlevel/office", "43"])
            .as_str()
        {
            "1" => Ok(()),
            n => Err(format!(
                "step 6: /office not subscribed again on {owner} ({n} receivers)"
            )),
        }
    })
    .await;
    match next_data(&mut office).await {
        Message::Text(t) => assert_eq!(t.as_str(), "43", "step 6: after CLIENT KILL"),
        other => panic!("step 6: expected 43, got {other:?}"),
    }

    // Step 7: a pattern cannot see SPUBLISH: refused before the upgrade, with a reason.
    let (status, body) = upgrade_status(subscribe.addr, "/room*").await;
    assert_eq!(
        status, 400,
        "step 7: a pattern path in cluster mode: {body}"
    );
    assert!(
        body.contains("cluster"),
        "step 7: the reason names the cause: {body}"
    );
}

/// (b) A primary failed over under traffic, by `CLUSTER FAILOVER` and then by SIGKILL: the
/// subscriber gets what is published afterwards without reconnecting, no acknowledged publish
/// is lost, and `/healthz` is 503 while the killed primary's slots are unserved, 200 after.
#[tokio::test]
async fn a_failed_over_primary_loses_no_subscription_and_no_acked_message() {
    let mut cluster = Cluster::start().await;
    let (subscribe, publish) = relays(&cluster).await;
    let slot = cluster.slot("lightlevel/failover");
    let received = Received::listen(connect(&subscribe.ws("/failover")).await);
    let publisher = Publisher::start(publish.ws("/failover"));
    received.wait_beyond(20, "before the failover").await;

    // Step 1: CLUSTER FAILOVER on the replica of the channel's primary.
    let owner = cluster.owner(slot);
    let replica = cluster.replica_of(owner);
    cluster.failover(replica).await;
    assert_eq!(
        cluster.owner(slot),
        replica,
        "step 1: the replica took the slot"
    );
    let after = publisher.last_acked() + 20;
    received
        .wait_beyond(after, "step 1: after CLUSTER FAILOVER")
        .await;
    eventually(|| async {
        match cluster.shardnumsub(replica, &["lightlevel/failover".into()]) {
            0 => Err("step 1: not subscribed on the new primary".to_string()),
            _ => Ok(()),
        }
    })
    .await;

    // Step 2: SIGKILL of the channel's primary (now `replica`).
    cluster.kill(replica);
    let unhealthy = subscribe.wait_health(503).await;
    assert!(
        unhealthy.contains(&replica.to_string()),
        "step 2: /healthz names the unreachable node: {unhealthy}"
    );
    // Never 200 while no node serves the killed primary's slots.
    eventually(|| async {
        let (status, _) = http(subscribe.addr, "GET", "/healthz", &[], b"").await;
        match status {
            200 if cluster.served_elsewhere(slot, replica) => Ok(()),
            200 => panic!("step 2: /healthz 200 while the killed primary's slots are unserved"),
            _ => Err(format!(
                "step 2: /healthz still {status} after the failover"
            )),
        }
    })
    .await;
    cluster.wait_replaced(replica).await;
    subscribe.wait_health(200).await;
    publish.wait_health(200).await;
    let after = publisher.last_acked() + 20;
    received
        .wait_beyond(after, "step 2: after the SIGKILL")
        .await;

    let acked = publisher.finish().await;
    all_acked_arrived(&received, &acked, "failover and SIGKILL").await;
}

/// (c) The channel's slot migrated to another primary under traffic: the subscriber keeps
/// receiving without reconnecting (it is subscribed on the new owner), and no acknowledged
/// publish is lost.
#[tokio::test]
async fn a_migrated_slot_loses_no_subscription_and_no_acked_message() {
    let cluster = Cluster::start().await;
    let (subscribe, publish) = relays(&cluster).await;
    let channel = "lightlevel/moving".to_string();
    let slot = cluster.slot(&channel);
    let received = Received::listen(connect(&subscribe.ws("/moving")).await);
    let publisher = Publisher::start(publish.ws("/moving"));
    received.wait_beyond(20, "before the migration").await;

    let from = cluster.owner(slot);
    let to = *cluster.primaries().iter().find(|&&p| p != from).unwrap();
    cluster.migrate_slot(slot, to).await;
    eventually(|| async {
        match cluster.shardnumsub(to, std::slice::from_ref(&channel)) {
            0 => Err("not subscribed on the slot's new owner".to_string()),
            _ => Ok(()),
        }
    })
    .await;
    let after = publisher.last_acked() + 20;
    received.wait_beyond(after, "after the migration").await;

    let acked = publisher.finish().await;
    all_acked_arrived(&received, &acked, "slot migration").await;
}

/// (d) The channel's shard drops the relay's subscriber connection again and again (CLIENT
/// KILL) under acknowledged traffic: each time the hub subscribes the channel again and
/// resumes it from its stream. A message published between the SSUBSCRIBE of the channel and
/// that of its ids channel came without its id, so the seam let it through ahead of the
/// resumed ones (and the resume sent it again): seen in CI as a failover's "lost" message,
/// which was out of order. The ids channel is now subscribed first.
#[tokio::test]
async fn repeated_resubscriptions_keep_every_acked_message_in_order() {
    let cluster = Cluster::start().await;
    let (subscribe, publish) = relays(&cluster).await;
    let channel = "lightlevel/again".to_string();
    let owner = cluster.owner(cluster.slot(&channel));
    let received = Received::listen(connect(&subscribe.ws("/again")).await);
    let publisher = Publisher::start(publish.ws("/again"));
    received.wait_beyond(5, "before the kills").await;
    let resubscribed = || async {
        eventually(|| async {
            match cluster.shardnumsub(owner, std::slice::from_ref(&channel)) {
                0 => Err("not subscribed again after CLIENT KILL".to_string()),
                _ => Ok(()),
            }
        })
        .await
    };
    // Bounded: 40 kills, each waited out.
    for _ in 0..40 {
        cluster.cli(owner, &["CLIENT", "KILL", "TYPE", "pubsub"]);
        resubscribed().await;
        let after = publisher.last_acked() + 2;
        received.wait_beyond(after, "after a CLIENT KILL").await;
    }
    let acked = publisher.finish().await;
    all_acked_arrived(&received, &acked, "repeated CLIENT KILL").await;
}
