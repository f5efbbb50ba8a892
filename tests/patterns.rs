//! Pattern paths (SPEC §9): a path holding `*`, `?` or `[` subscribes to a Redis pattern,
//! one PSUBSCRIBE per pattern per process, and needs `?format=json` so each message names
//! its channel. Redis is a real redis-server; messages are published with a plain client,
//! as `redis-cli PUBLISH` would.

mod common;

use common::*;
use fred::interfaces::ClientLike;

async fn numpat(redis: &Redis) -> i64 {
    let client = redis.client().await;
    let n: i64 = client
        .custom(fred::cmd!("PUBSUB"), vec!["NUMPAT"])
        .await
        .unwrap();
    let _ = client.quit().await;
    n
}

#[tokio::test]
async fn a_pattern_path_without_format_json_gets_400_with_a_reason() {
    let redis = Redis::start().await;
    let server = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let (status, body) = upgrade_status(server.addr, "/office/*").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("format=json"), "{body}");
    let (status, body) = upgrade_status(server.addr, "/office/[ab]").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = upgrade_status(server.addr, "/office/*?format=json&last=1").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a pattern"), "{body}");
    assert_eq!(
        numpat(&redis).await,
        0,
        "nothing subscribed for a refused request"
    );
}

#[tokio::test]
async fn a_pattern_reaches_nested_paths_and_each_envelope_names_its_channel() {
    let redis = Redis::start().await;
    let server = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut ws = connect(&server.ws("/office/*?format=json")).await;
    redis.publish("lightlevel/office/desk", "1").await;
    redis.publish("lightlevel/elsewhere", "not for it").await;
    redis.publish("lightlevel/office/desk/lamp", "2").await;
    redis.publish("lightlevel/office/bin", vec![0u8, 255]).await;
    let got: Vec<serde_json::Value> = vec![
        json_of(next_data(&mut ws).await),
        json_of(next_data(&mut ws).await),
        json_of(next_data(&mut ws).await),
    ];
    assert_eq!(
        got,
        vec![
            serde_json::json!({"channel":"lightlevel/office/desk","id":null,"data":"1"}),
            serde_json::json!({"channel":"lightlevel/office/desk/lamp","id":null,"data":"2"}),
            serde_json::json!({"channel":"lightlevel/office/bin","id":null,"data":"AP8=","encoding":"base64"}),
        ]
    );
    assert!(sync(&mut ws).await.is_empty(), "nothing else arrived");
}

#[tokio::test]
async fn one_psubscribe_per_pattern_per_process_whatever_the_number_of_clients() {
    let redis = Redis::start().await;
    let server = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&server.ws("/a/*?format=json")).await);
    }
    clients.push(connect(&server.ws("/b/*?format=json")).await);
    assert_eq!(numpat(&redis).await, 2);
    clients.truncate(1);
    let left = eventually(|| async {
        match numpat(&redis).await {
            1 => Ok(()),
            n => Err(format!(
                "NUMPAT stayed {n}, expected 1 once /b/* has no client"
            )),
        }
    });
    left.await;
    clients.clear();
    eventually(|| async {
        match numpat(&redis).await {
            0 => Ok(()),
            n => Err(format!("NUMPAT stayed {n} with no client left")),
        }
    })
    .await;
}

/// Redis delivers a message once per subscription that matches it; so does the relay: a
/// client of the channel, a client of a pattern and a client of an overlapping pattern each
/// get every message exactly once.
#[tokio::test]
async fn a_channel_under_two_patterns_and_its_own_subscription_reaches_each_client_once() {
    let redis = Redis::start().await;
    let server = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let mut direct = connect(&server.ws("/office/a")).await;
    let mut wide = connect(&server.ws("/office/*?format=json")).await;
    let mut narrow = connect(&server.ws("/office/a*?format=json")).await;
    for i in 0..20 {
        // The same payload twice in a row too: copies are counted, not compared.
        let payload = format!("m{}", i / 2);
        assert_eq!(redis.publish("lightlevel/office/a", payload).await, 3);
    }
    redis.publish("lightlevel/office/b", "only wide").await;
    let expected: Vec<String> = (0..20).map(|i| format!("m{}", i / 2)).collect();
    let mut got_direct = Vec::new();
    for _ in 0..20 {
        got_direct.push(next_data_text(&mut direct).await);
    }
    assert_eq!(got_direct, expected);
    for (name, ws, last) in [
        ("wide", &mut wide, Some("only wide")),
        ("narrow", &mut narrow, None),
    ] {
        let mut got = Vec::new();
        for _ in 0..20 {
            got.push(
                json_of(next_data(ws).await)["data"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(got, expected, "{name}");
        if let Some(last) = last {
            assert_eq!(json_of(next_data(ws).await)["data"], last, "{name}");
        }
        assert!(sync(ws).await.is_empty(), "{name}: a copy arrived twice");
    }
    assert!(sync(&mut direct).await.is_empty());
}

/// With `--auth all`, a pattern path is allowed only when the token's grant covers every
/// channel it can match, not merely its text: `/office/a?` matches the text `/office/a*`,
/// but `/office/a*` would also hear `/office/abc`, which `/office/a?` does not grant.
#[tokio::test]
async fn a_pattern_needs_a_grant_that_covers_every_channel_it_can_match() {
    use common::auth::{server_with_auth, token, upgrade_answer};
    let redis = Redis::start().await;
    let (server, _dir) =
        server_with_auth(Kind::Subscribe, &redis.url(), "all", "pattern-auth").await;
    let answer = |sub: &'static str| {
        let bearer = format!("Bearer {}", token(&[], &[sub]));
        let addr = server.addr;
        async move {
            upgrade_answer(
                addr,
                "/office/a*?format=json",
                &[("Authorization", &bearer)],
            )
            .await
        }
    };
    let narrow = answer("/office/a?").await;
    assert!(narrow.starts_with("HTTP/1.1 403"), "{narrow}");
    let wide = answer("/office/*").await;
    assert!(wide.starts_with("HTTP/1.1 101"), "{wide}");
}
