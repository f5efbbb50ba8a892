//! SPEC §8's abuse limits, against the real binaries, a real Redis and (for client addresses
//! behind a proxy) the shipped nginx site: connections per client address, the client
//! address a trusted proxy names and an untrusted one does not, the publish rate of a
//! WebSocket (slowed, nothing lost) and of POSTs (429 + Retry-After), and allowed origins.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::nginx::{Nginx, Site};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

type RawWs = WebSocketStream<TcpStream>;

/// A WebSocket to `url` over a TCP connection from `source` (any 127.x address is loopback),
/// with extra request headers; the refusal's status and body when there is no 101.
async fn connect_from(
    source: &str,
    url: &str,
    headers: &[(&'static str, &str)],
) -> Result<RawWs, (u16, String)> {
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let target: SocketAddr = request.uri().authority().unwrap().as_str().parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = tokio::time::timeout(PATIENCE, socket.connect(target))
        .await
        .unwrap()
        .unwrap();
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("no answer to the upgrade")
    {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("upgrade to {url} from {source} failed: {e}"),
    }
}

/// Close a connection from our side and wait until the server has answered the close.
async fn close(mut ws: RawWs) {
    ws.send(Message::Close(None)).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, ws.next()).await {}
}

#[tokio::test]
async fn past_max_connections_per_ip_a_client_behind_nginx_gets_429_and_others_still_connect() {
    let redis = Redis::start().await;
    let relay = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &["--max-connections-per-ip", "2"],
    )
    .await;
    // The shipped site passes `X-Real-IP $remote_addr`; nginx on 127.0.0.1 sees each test
    // client by the loopback address it connects from, and the relay only sees nginx.
    let nginx = Nginx::start((relay.addr, relay.addr), &[Site::TwoPort], None).await;
    let url = nginx.ws_subscribe("/limits");

    let first = connect_from("127.0.0.2", &url, &[]).await.expect("first");
    let _second = connect_from("127.0.0.2", &url, &[]).await.expect("second");
    let (status, body) = connect_from("127.0.0.2", &url, &[])
        .await
        .expect_err("a third connection from 127.0.0.2 was let in");
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("too many connections from 127.0.0.2") && body.lines().count() == 1,
        "{body:?}"
    );
    // Another client address behind the same proxy has places of its own.
    let _other = connect_from("127.0.0.3", &url, &[])
        .await
        .expect("127.0.0.3 was refused: the relay counted nginx, not the client");
    assert_eq!(
        relay
            .metric("lightrelay_refused_total{reason=\"per_ip\"}")
            .await,
        1.0
    );

    // Closing one frees its place (once the session has ended).
    close(first).await;
    let _again = eventually(|| async {
        connect_from("127.0.0.2", &url, &[])
            .await
            .map_err(|(status, body)| format!("still refused after a close: {status} {body}"))
    })
    .await;
    relay
        .wait_metric("lightrelay_connections", |open| open == 3.0)
        .await;
}

#[tokio::test]
async fn an_untrusted_peers_x_real_ip_is_ignored_and_a_trusted_ones_is_the_client() {
    let redis = Redis::start().await;
    // 127.0.0.1 is not a trusted proxy here: what it says about its client does not count.
    let untrusting = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &[
            "--max-connections-per-ip",
            "1",
            "--trusted-proxies",
            "10.0.0.0/8",
        ],
    )
    .await;
    let url = untrusting.ws("/limits");
    let _held = connect_from("127.0.0.1", &url, &[("x-real-ip", "192.0.2.1")])
        .await
        .expect("first");
    let (status, body) = connect_from("127.0.0.1", &url, &[("x-real-ip", "192.0.2.2")])
        .await
        .expect_err("an untrusted peer's X-Real-IP made it another client");
    assert_eq!(status, 429);
    assert!(body.contains("127.0.0.1"), "{body}");
    let (status, _) = connect_from(
        "127.0.0.1",
        &url,
        &[("x-forwarded-for", "192.0.2.3, 10.0.0.1")],
    )
    .await
    .expect_err("an untrusted peer's X-Forwarded-For made it another client");
    assert_eq!(status, 429);

    // With the default trusted proxies (loopback), the same headers name two clients.
    let trusting = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &["--max-connections-per-ip", "1"],
    )
    .await;
    let url = trusting.ws("/limits");
    let _a = connect_from("127.0.0.1", &url, &[("x-real-ip", "192.0.2.1")])
        .await
        .expect("client 192.0.2.1");
    let _b = connect_from("127.0.0.1", &url, &[("x-real-ip", "192.0.2.2")])
        .await
        .expect("client 192.0.2.2 was counted as 192.0.2.1");
    let (status, body) = connect_from("127.0.0.1", &url, &[("x-real-ip", "192.0.2.2")])
        .await
        .expect_err("a second connection of 192.0.2.2 was let in");
    assert_eq!(status, 429);
    assert!(body.contains("192.0.2.2"), "{body}");
}

/// Send `count` numbered messages on `ws` as fast as it takes them; the numbers.
async fn send_numbered<S>(ws: &mut WebSocketStream<S>, count: usize) -> Vec<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let sent: Vec<String> = (0..count).map(|n| format!("reading {n}")).collect();
    for text in &sent {
        ws.feed(Message::text(text.as_str())).await.unwrap();
    }
    ws.flush().await.unwrap();
    sent
}

#[tokio::test]
async fn a_publisher_over_its_rate_is_read_more_slowly_and_loses_nothing() {
    const RATE: f64 = 50.0;
    const BURST: usize = 10;
    const COUNT: usize = 200;
    let redis = Redis::start().await;
    let publish = Server::start(
        Kind::Publish,
        &redis.url(),
        &["--max-publish-rate", "50", "--publish-burst", "10"],
    )
    .await;
    let mut watcher = redis.subscribe("lightlevel/rate").await;
    let mut ws = connect(&publish.ws("/rate")).await;
    let start = Instant::now();
    let sent = send_numbered(&mut ws, COUNT).await;
    for expected in &sent {
        let got = watcher.next().await;
        assert_eq!(got, expected.as_bytes(), "lost or reordered");
    }
    let took = start.elapsed();
    // A lower bound only (throttling is correctness here, not speed): after its burst, the
    // connection cannot have published faster than its rate.
    let at_least = Duration::from_secs_f64((COUNT - 2 * BURST) as f64 / RATE);
    assert!(
        took >= at_least,
        "{COUNT} messages at {RATE}/s (burst {BURST}) went through in {took:?}"
    );
    assert!(publish.metric("lightrelay_throttled_total").await > 0.0);
    assert_eq!(
        publish
            .metric("lightrelay_dropped_total{reason=\"publish_failed\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn an_accept_publish_subscriber_over_its_rate_is_slowed_and_gets_all_its_messages_back() {
    const RATE: f64 = 20.0;
    const BURST: usize = 5;
    const COUNT: usize = 40;
    let redis = Redis::start().await;
    let subscribe = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &[
            "--accept-publish",
            "--max-publish-rate",
            "20",
            "--publish-burst",
            "5",
        ],
    )
    .await;
    let mut ws = connect(&subscribe.ws("/chat")).await;
    let start = Instant::now();
    let sent = send_numbered(&mut ws, COUNT).await;
    for expected in &sent {
        assert_eq!(
            &next_data_text(&mut ws).await,
            expected,
            "lost or reordered"
        );
    }
    let took = start.elapsed();
    let at_least = Duration::from_secs_f64((COUNT - 2 * BURST) as f64 / RATE);
    assert!(took >= at_least, "{COUNT} messages echoed in {took:?}");
    assert!(subscribe.metric("lightrelay_throttled_total").await > 0.0);
}

/// A POST from this test (127.0.0.1) with extra header lines; the raw response.
async fn post(addr: SocketAddr, headers: &str) -> String {
    let request = format!(
        "POST /rate HTTP/1.1\r\nHost: relay\r\nContent-Length: 2\r\nConnection: close\r\n\
         {headers}\r\n42"
    );
    raw_exchange(addr, request.as_bytes()).await
}

#[tokio::test]
async fn a_post_over_the_rate_of_its_address_gets_429_with_retry_after() {
    let redis = Redis::start().await;
    let publish = Server::start(
        Kind::Publish,
        &redis.url(),
        &["--max-publish-rate", "1", "--publish-burst", "2"],
    )
    .await;
    let mut statuses = Vec::new();
    let mut refused = None;
    // At one a second with a burst of two, six POSTs in a row meet the limit unless they
    // took more than four seconds.
    for _ in 0..6 {
        let response = post(publish.addr, "").await;
        statuses.push(status_of(&response));
        if status_of(&response) == 429 {
            refused = Some(response);
            break;
        }
    }
    assert_eq!(&statuses[..2], [200, 200], "{statuses:?}");
    let refused = refused.unwrap_or_else(|| panic!("no 429 in {statuses:?}"));
    assert!(has_header(&refused, "retry-after", "1"), "{refused}");
    assert!(has_header(&refused, "connection", "close"), "{refused}");
    let body = body_of(&refused);
    assert!(
        body.contains("--max-publish-rate") && body.lines().count() == 1,
        "{body:?}"
    );
    // The rate is per client address: another client, named by the trusted proxy, may post.
    let other = post(publish.addr, "X-Real-IP: 192.0.2.9\r\n").await;
    assert_eq!(status_of(&other), 200, "{other}");
    assert!(
        publish
            .metric("lightrelay_refused_total{reason=\"publish_rate\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn an_upgrade_from_an_origin_not_on_the_list_gets_403_and_one_without_origin_passes() {
    let redis = Redis::start().await;
    let subscribe = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &[
            "--allowed-origins",
            "https://example.org,http://localhost:8080",
        ],
    )
    .await;
    let status = |origin: Option<&'static str>| {
        let addr = subscribe.addr;
        async move {
            let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
            upgrade_response(addr, "/page", &headers).await
        }
    };
    for allowed in [
        None,
        Some("https://example.org"),
        Some("HTTPS://EXAMPLE.ORG:443"),
        Some("http://localhost:8080"),
    ] {
        let response = status(allowed).await;
        assert_eq!(status_of(&response), 101, "{allowed:?}: {response}");
    }
    for refused in [
        "https://evil.example",
        "http://example.org",
        "http://localhost:8081",
        "null",
    ] {
        let response = status(Some(refused)).await;
        assert_eq!(status_of(&response), 403, "{refused}: {response}");
        assert!(
            body_of(&response).contains("--allowed-origins"),
            "{response}"
        );
    }
    assert_eq!(
        subscribe
            .metric("lightrelay_refused_total{reason=\"origin\"}")
            .await,
        4.0
    );
}

#[test]
fn an_allowed_origin_that_is_not_an_origin_is_refused_at_start_with_exit_2() {
    let output = server_command(Kind::Subscribe)
        .args(["--allowed-origins", "example.org"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.contains("--allowed-origins") && first.contains("is not an origin"),
        "{stderr}"
    );
}
