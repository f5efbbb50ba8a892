//! Issue 5, `nginx/`: the shipped sites, run by a real nginx on free 127.0.0.1 ports in front of
//! both servers. The test's own nginx.conf (`common::nginx`) includes the shipped files after
//! substituting only ports, upstream addresses, paths and certificate files (and, for the
//! keep-alive tests, the proxy timeouts); every other line is the shipped text.

mod common;

use std::time::{Duration, Instant};

use common::nginx::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// An HTTP/1.0 GET (no chunking either side), with extra header lines.
fn get(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}\r\n")
}

fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn plain_request(port: u16, request: &str) -> (String, Vec<u8>) {
    exchange(
        TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
        request,
    )
    .await
}

/// Redis, both servers (with `flags`) and nginx with `sites` in front of them.
struct Stack {
    redis: Redis,
    _publish: Server,
    subscribe: Server,
    nginx: Nginx,
}

async fn stack(sites: &[Site], flags: &[&str], timeout: Option<&str>) -> Stack {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), flags).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), flags).await;
    let nginx = Nginx::start((publish.addr, subscribe.addr), sites, timeout).await;
    Stack {
        redis,
        _publish: publish,
        subscribe,
        nginx,
    }
}

/// Every byte value, and not UTF-8: arrives as a binary frame.
fn all_bytes() -> Vec<u8> {
    (0..=255u8).rev().collect()
}

#[test]
fn nginx_t_accepts_each_shipped_site_and_both_together() {
    let upstreams = (
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    for sites in [
        &[Site::TwoPort][..],
        &[Site::Tls],
        &[Site::TwoPort, Site::Tls],
    ] {
        let nginx = Nginx::configure(upstreams, sites, None);
        let (ok, output) = nginx.test_config();
        assert!(ok, "nginx -t failed:\n{output}");
        assert!(output.contains("test is successful"), "{output}");
    }
}

#[tokio::test]
async fn a_message_published_through_the_two_port_site_reaches_its_subscribers_byte_exact() {
    let s = stack(&[Site::TwoPort], &[], None).await;
    let mut watcher = s.redis.subscribe("lightlevel/office").await;
    let mut sub = connect(&s.nginx.ws_subscribe("/office")).await;
    s.redis.wait_numsub("lightlevel/office", 2).await;
    let mut publisher = connect(&s.nginx.ws_publish("/office")).await;

    publisher
        .send(Message::text("417 lux, 21.5 °C"))
        .await
        .unwrap();
    publisher.send(Message::binary(all_bytes())).await.unwrap();
    assert_eq!(next_text(&mut sub).await, "417 lux, 21.5 °C");
    assert_eq!(next_frame(&mut sub).await, Message::binary(all_bytes()));
    assert_eq!(&watcher.next().await[..], "417 lux, 21.5 °C".as_bytes());
    assert_eq!(&watcher.next().await[..], &all_bytes()[..]);

    // HTTP POST through nginx publishes too, and answers the receiver count.
    let body = "post body";
    let request = format!(
        "POST /office HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (head, count) = plain_request(s.nginx.publish, &request).await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(String::from_utf8_lossy(&count).trim(), "2");
    assert_eq!(next_text(&mut sub).await, body);
}

#[tokio::test]
async fn a_message_published_on_wss_publish_reaches_wss_subscribe_byte_exact() {
    let s = stack(&[Site::Tls], &[], None).await;
    let mut watcher = s.redis.subscribe("lightlevel/office").await;
    let mut sub = s.nginx.connect_tls(&s.nginx.wss("/subscribe/office")).await;
    s.redis.wait_numsub("lightlevel/office", 2).await;
    let mut publisher = s.nginx.connect_tls(&s.nginx.wss("/publish/office")).await;

    publisher.send(Message::text("417")).await.unwrap();
    publisher.send(Message::binary(all_bytes())).await.unwrap();
    assert_eq!(next_text(&mut sub).await, "417");
    assert_eq!(next_frame(&mut sub).await, Message::binary(all_bytes()));
    // `redis-cli SUBSCRIBE lightlevel/office` sees the same bytes: /publish/ was stripped.
    assert_eq!(&watcher.next().await[..], b"417");
    assert_eq!(&watcher.next().await[..], &all_bytes()[..]);
    // And what Redis gets from elsewhere reaches the wss subscriber.
    s.redis.publish("lightlevel/office", "from redis-cli").await;
    assert_eq!(next_text(&mut sub).await, "from redis-cli");
}

#[tokio::test]
async fn a_percent_encoded_path_maps_to_the_same_channel_through_both_sites_as_sent() {
    let s = stack(&[Site::TwoPort, Site::Tls], &[], None).await;
    // nginx's own $uri would be `/c/d`: decoded (%20, %41, %2F) and normalised (`..`).
    let path = "/a%20b/%41/../c%2Fd";
    let channel = "lightlevel/a%20b/%41/../c%2Fd";
    let mut watcher = s.redis.subscribe(channel).await;
    let mut plain_sub = connect(&s.nginx.ws_subscribe(&format!("{path}?unit=lux"))).await;
    let mut tls_sub = s
        .nginx
        .connect_tls(&s.nginx.wss(&format!("/subscribe{path}?unit=lux")))
        .await;
    // One Redis subscription for both clients (plus the watcher): the same channel.
    s.redis.wait_numsub(channel, 2).await;

    let mut plain_pub = connect(&s.nginx.ws_publish(path)).await;
    let mut tls_pub = s
        .nginx
        .connect_tls(&s.nginx.wss(&format!("/publish{path}")))
        .await;
    send_text(&mut plain_pub, "via 8766").await;
    assert_eq!(&watcher.next().await[..], b"via 8766");
    send_text(&mut tls_pub, "via 443").await;
    assert_eq!(&watcher.next().await[..], b"via 443");
    for sub in [&mut plain_sub, &mut tls_sub] {
        assert_eq!(next_text(sub).await, "via 8766");
        assert_eq!(next_text(sub).await, "via 443");
    }
}

#[tokio::test]
async fn nginx_hands_the_relay_the_raw_path_the_upgrade_and_the_clients_address() {
    // A stand-in relay that records the request nginx sends it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let recorder = tokio::spawn(async move {
        let mut heads = Vec::new();
        for _ in 0..2 {
            let (mut stream, _) = tokio::time::timeout(PATIENCE, listener.accept())
                .await
                .expect("nginx never connected to the relay")
                .unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if stream.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            stream
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await
                .unwrap();
            heads.push(String::from_utf8(head).unwrap());
        }
        heads
    });
    let nginx = Nginx::start((upstream, upstream), &[Site::TwoPort, Site::Tls], None).await;
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: relay.test\r\n{upgrade}\r\n");
    // Only sent: the stand-in's answers do not matter.
    let mut plain = TcpStream::connect(("127.0.0.1", nginx.publish))
        .await
        .unwrap();
    plain
        .write_all(request("/a%20b/../c?x=1").as_bytes())
        .await
        .unwrap();
    let mut tls = nginx.tls_stream().await;
    tls.write_all(request("/subscribe/a%20b/../c?x=1").as_bytes())
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let heads = recorder.await.unwrap();

    for (head, proto) in heads.iter().zip(["http", "https"]) {
        let lines: Vec<String> = head.lines().map(str::to_ascii_lowercase).collect();
        assert_eq!(lines[0], "get /a%20b/../c?x=1 http/1.1", "{head}");
        for expected in [
            "upgrade: websocket".to_string(),
            "connection: upgrade".to_string(),
            "x-real-ip: 127.0.0.1".to_string(),
            "x-forwarded-for: 127.0.0.1".to_string(),
            format!("x-forwarded-proto: {proto}"),
            "sec-websocket-key: dghlihnhbxbszsbub25jzq==".to_string(),
        ] {
            assert!(lines.contains(&expected), "no `{expected}` in:\n{head}");
        }
    }
}

#[tokio::test]
async fn the_live_page_is_the_subscribe_servers_root_through_both_sites_and_its_socket_works() {
    let s = stack(&[Site::TwoPort, Site::Tls], &[], None).await;
    let (direct_head, direct_body) = plain_request(s.subscribe.addr.port(), &get("/", "")).await;
    let (plain_head, plain_body) = plain_request(s.nginx.subscribe, &get("/", "")).await;
    assert_eq!(
        status_of(&plain_head),
        status_of(&direct_head),
        "{plain_head}"
    );
    assert_eq!(plain_body, direct_body);
    // https://HOST/ and https://HOST/subscribe/ are both the page.
    for path in ["/", "/subscribe/"] {
        let (tls_head, tls_body) = s.nginx.https_request(&get(path, "")).await;
        assert_eq!(
            status_of(&tls_head),
            status_of(&direct_head),
            "{path}: {tls_head}"
        );
        assert_eq!(tls_body, direct_body, "{path}");
    }
    // The page opens its socket beside itself: served at https://HOST/, the socket for /office
    // is wss://HOST/office, which is the subscribe server's /office.
    let mut page_socket = s.nginx.connect_tls(&s.nginx.wss("/office")).await;
    s.redis.wait_numsub("lightlevel/office", 1).await;
    s.redis.publish("lightlevel/office", "417").await;
    assert_eq!(next_text(&mut page_socket).await, "417");
    // /healthz through https:// is the subscribe server's too.
    let (head, body) = s.nginx.https_request(&get("/subscribe/healthz", "")).await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert!(body.starts_with(b"ok"), "{body:?}");
}

#[tokio::test]
async fn requests_are_logged_without_their_query_string_so_no_token_reaches_the_access_log() {
    let s = stack(&[Site::TwoPort, Site::Tls], &[], None).await;
    let secret = "SECRETVALUE";
    // A browser's token rides in the query string: through each server block of both sites.
    let (head, _) = plain_request(
        s.nginx.subscribe,
        &get(&format!("/office?token={secret}"), ""),
    )
    .await;
    assert_eq!(status_of(&head), 426, "{head}");
    let (head, _) = plain_request(
        s.nginx.publish,
        &get(&format!("/pi/lux?token={secret}"), ""),
    )
    .await;
    assert_eq!(status_of(&head), 426, "{head}");
    let (head, _) = s
        .nginx
        .https_request(&get(&format!("/?path=/office&token={secret}"), ""))
        .await;
    assert_eq!(status_of(&head), 200, "{head}");
    let (head, _) = s
        .nginx
        .https_request(&get(&format!("/publish/pi/lux?token={secret}"), ""))
        .await;
    assert_eq!(status_of(&head), 426, "{head}");
    let (head, _) = plain_request(
        s.nginx.http,
        &get(&format!("/subscribe/office?token={secret}"), ""),
    )
    .await;
    assert_eq!(status_of(&head), 301, "{head}");

    // nginx writes a line once it has answered; the five requests are each logged.
    let log = s.nginx.dir.join("access.log");
    let text = eventually(|| async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        match text.lines().count() {
            5 => Ok(text),
            n => Err(format!("{n} lines in the access log, expected 5:\n{text}")),
        }
    })
    .await;
    for request in [
        "\"GET /office HTTP/1.0\" 426 ",
        "\"GET /pi/lux HTTP/1.0\" 426 ",
        "\"GET / HTTP/1.0\" 200 ",
        "\"GET /publish/pi/lux HTTP/1.0\" 426 ",
        "\"GET /subscribe/office HTTP/1.0\" 301 ",
    ] {
        assert!(
            text.contains(request),
            "no {request} in the access log:\n{text}"
        );
    }
    assert!(
        !text.contains(secret) && !text.contains("token="),
        "a token reached the access log:\n{text}"
    );
}

#[tokio::test]
async fn plain_http_redirects_to_https_but_serves_certbot_challenges() {
    let nginx = Nginx::start(
        (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ),
        &[Site::Tls],
        None,
    )
    .await;
    let (head, _) = plain_request(nginx.http, &get("/subscribe/office?x=1", "")).await;
    assert_eq!(status_of(&head), 301, "{head}");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("location: https://127.0.0.1/subscribe/office?x=1")),
        "{head}"
    );
    std::fs::write(
        nginx.dir.join("www/.well-known/acme-challenge/token1"),
        "proof",
    )
    .unwrap();
    let (head, body) =
        plain_request(nginx.http, &get("/.well-known/acme-challenge/token1", "")).await;
    assert_eq!(
        (status_of(&head), &body[..]),
        (200, &b"proof"[..]),
        "{head}"
    );
}

#[tokio::test]
async fn metrics_answer_localhost_and_refuse_any_other_client() {
    let s = stack(&[Site::TwoPort, Site::Tls], &[], None).await;
    let elsewhere = "X-Forwarded-For: 203.0.113.9\r\n";
    for port in [s.nginx.publish, s.nginx.subscribe] {
        let (head, body) = plain_request(port, &get("/metrics", "")).await;
        assert_eq!(status_of(&head), 200, "{head}");
        assert!(String::from_utf8_lossy(&body).contains("lightrelay_connections"));
        let (head, _) = plain_request(port, &get("/metrics", elsewhere)).await;
        assert_eq!(status_of(&head), 403, "{head}");
        // Other requests from elsewhere are served as usual.
        let (head, _) = plain_request(port, &get("/healthz", elsewhere)).await;
        assert_eq!(status_of(&head), 200, "{head}");
    }
    for path in [
        "/metrics",
        "/publish/metrics",
        "/subscribe/metrics",
        "/publish//metrics",
        "/subscribe/%6detrics",
    ] {
        let (head, body) = s.nginx.https_request(&get(path, "")).await;
        assert_eq!(status_of(&head), 200, "{path}: {head}");
        assert!(
            String::from_utf8_lossy(&body).contains("lightrelay_connections"),
            "{path}"
        );
        let (head, _) = s.nginx.https_request(&get(path, elsewhere)).await;
        assert_eq!(status_of(&head), 403, "{path}: {head}");
    }

    // The rule itself, as nginx parsed it: every /metrics location allows only the loopback.
    let dump = s.nginx.dump();
    let blocks: Vec<&str> = dump
        .split("location = ")
        .skip(1)
        .filter(|b| b.split_whitespace().next().unwrap().ends_with("/metrics"))
        .map(|b| &b[..b.find('}').unwrap()])
        .collect();
    assert_eq!(
        blocks.len(),
        5,
        "two in the two-port site, three in the TLS site:\n{dump}"
    );
    for block in blocks {
        for rule in ["allow 127.0.0.1;", "allow ::1;", "deny all;"] {
            assert!(block.contains(rule), "no `{rule}` in location = {block}");
        }
    }
}

/// Read for `how_long`; panics if the connection ends or a data frame arrives meanwhile.
/// Pings are answered (as any WebSocket client does) and skipped.
async fn stay_idle(ws: &mut Ws, how_long: Duration) {
    let outcome = tokio::time::timeout(how_long, next_frame(ws)).await;
    assert!(outcome.is_err(), "expected silence, got {outcome:?}");
}

#[tokio::test]
async fn an_idle_connection_outlives_nginx_timeouts_because_the_relay_pings() {
    // nginx gives up on a silent upstream after 2 s; the relay pings every second.
    let s = stack(
        &[Site::TwoPort, Site::Tls],
        &["--ping-interval", "1s"],
        Some("2s"),
    )
    .await;
    let mut plain_sub = connect(&s.nginx.ws_subscribe("/office")).await;
    let mut tls_sub = s.nginx.connect_tls(&s.nginx.wss("/subscribe/office")).await;
    s.redis.wait_numsub("lightlevel/office", 1).await;
    let mut plain_pub = connect(&s.nginx.ws_publish("/office")).await;
    let mut tls_pub = s.nginx.connect_tls(&s.nginx.wss("/publish/office")).await;

    let idle = Duration::from_secs(5);
    tokio::join!(
        stay_idle(&mut plain_sub, idle),
        stay_idle(&mut tls_sub, idle),
        stay_idle(&mut plain_pub, idle),
        stay_idle(&mut tls_pub, idle),
    );

    // One publisher after the other: two connections keep no order between them.
    send_text(&mut plain_pub, "after 5 s").await;
    assert_eq!(next_text(&mut plain_sub).await, "after 5 s");
    assert_eq!(next_text(&mut tls_sub).await, "after 5 s");
    send_text(&mut tls_pub, "after 5 s, wss").await;
    assert_eq!(next_text(&mut plain_sub).await, "after 5 s, wss");
    assert_eq!(next_text(&mut tls_sub).await, "after 5 s, wss");
}

#[tokio::test]
async fn without_pings_nginx_closes_an_idle_connection_after_its_read_timeout() {
    // The control for the test above: the same 2 s timeout, the default 30 s ping interval.
    let s = stack(&[Site::TwoPort], &[], Some("2s")).await;
    let mut sub = connect(&s.nginx.ws_subscribe("/office")).await;
    let started = Instant::now();
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match sub.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("nginx kept the silent connection open");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "unexpected data: {end:?}"
    );
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(1500) && lived < Duration::from_secs(10),
        "closed after {lived:?}, not nginx's 2 s"
    );
}
