//! Issue 12, hostile HTTP on both servers: every accepted connection counts against
//! `--max-connections` (503 on the socket past it), request heads and POST bodies bounded in
//! memory, refusals that end their connection at once, RFC 6455's handshake rules, and a
//! one-line reason for a target byte the HTTP parser itself refuses (SPEC §2).

mod common;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A handshake timeout far longer than [`PATIENCE`]: a connection the server holds until
/// then fails the test instead of passing late.
const SLOW_HANDSHAKE: &[&str] = &["--handshake-timeout", "30s"];

/// A hand-made upgrade request to `/office` with `key` and HTTP `version`.
fn upgrade_request(version: &str, key: &str) -> Vec<u8> {
    format!(
        "GET /office {version}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn past_max_connections_a_connection_still_sending_its_request_holds_a_slot_and_a_new_one_gets_503(
) {
    let redis = Redis::start().await;
    for kind in [Kind::Publish, Kind::Subscribe] {
        let mut flags = vec!["--max-connections", "3"];
        flags.extend_from_slice(SLOW_HANDSHAKE);
        let server = Server::start(kind, &redis.url(), &flags).await;
        // Three connections that never finish their request take every slot. (A slot of the
        // start-up health check may still be held for an instant: then one of the three is
        // the one refused, and the round is tried again.)
        let addr = server.addr;
        let (mut idle, refused) = eventually(move || async move {
            let mut idle = Vec::new();
            for partial in [&b""[..], b"GET /healthz HT", b"POST /office HTTP/1.1\r\n"] {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.write_all(partial).await.unwrap();
                idle.push(stream);
            }
            // `Connection: close`: if a slot was free after all, the 200 ends too, and the
            // round is tried again.
            let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            let refused = raw_exchange(addr, request).await;
            match status_of(&refused) {
                503 => Ok((idle, refused)),
                other => Err(format!(
                    "a fourth connection got {other}, not 503: {refused:?}"
                )),
            }
        })
        .await;
        assert!(
            body_of(&refused).contains("server full: 3 connections (--max-connections)"),
            "{refused:?}"
        );
        assert_eq!(body_of(&refused).lines().count(), 1, "{refused:?}");
        assert!(has_header(&refused, "connection", "close"), "{refused:?}");
        assert!(has_header(&refused, "retry-after", "1"), "{refused:?}");

        // Closing one frees its slot for the next connection.
        drop(idle.pop());
        server.wait_healthy().await;
        assert!(
            server
                .metric(r#"lightrelay_refused_total{reason="over_capacity"}"#)
                .await
                >= 1.0
        );
    }
}

#[tokio::test]
async fn a_request_head_of_64_kib_gets_431_and_its_connection_is_closed() {
    let redis = Redis::start().await;
    for kind in [Kind::Publish, Kind::Subscribe] {
        let server = Server::start(kind, &redis.url(), SLOW_HANDSHAKE).await;
        // One large header, and many small ones: each request head is 64 KiB.
        let large = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Large: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let mut many = String::from("GET /office HTTP/1.1\r\nHost: x\r\n");
        for i in 0..64 {
            many.push_str(&format!("X-H{i}: {}\r\n", "b".repeat(1000)));
        }
        many.push_str("\r\n");
        for request in [large, many] {
            let response = raw_exchange(server.addr, request.as_bytes()).await;
            assert_eq!(status_of(&response), 431, "{response:?}");
        }
        // The server is not worse for it.
        server.wait_healthy().await;
    }
}

/// A POST announcing a 16 MiB body, of which it sends nothing.
async fn announce_16_mib(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /office HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        16 << 20
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn post_bodies_held_at_once_are_bounded_past_that_a_post_gets_503_with_retry_after() {
    let redis = Redis::start().await;
    // --max-message-bytes 16MiB: the budget is eight such bodies (128 MiB).
    let mut flags = vec!["--max-message-bytes", "16MiB"];
    flags.extend_from_slice(SLOW_HANDSHAKE);
    let publish = Server::start(Kind::Publish, &redis.url(), &flags).await;
    // Eight POSTs announce 16 MiB bodies and send none of it: together they hold the budget.
    let mut holding = Vec::new();
    for _ in 0..8 {
        holding.push(announce_16_mib(publish.addr).await);
    }
    // A ninth, however small, is refused at once, not kept waiting. (The eight are read in
    // their own time: a ninth may come first and take its two bytes, and then the eighth is
    // the one refused; it is sent again, until the eight hold the budget.)
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let response = loop {
        for holder in &mut holding {
            let mut byte = [0u8; 1];
            if !matches!(holder.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                *holder = announce_16_mib(publish.addr).await;
            }
        }
        let response = raw_exchange(
            publish.addr,
            b"POST /office HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
        )
        .await;
        if status_of(&response) == 503 {
            break response;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a ninth POST got {response:?}, not 503"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(has_header(&response, "retry-after", "1"), "{response:?}");
    assert!(has_header(&response, "connection", "close"), "{response:?}");
    assert_eq!(body_of(&response).lines().count(), 1, "{response:?}");

    // One of them gone, a POST gets its bytes again.
    drop(holding.pop());
    let mut watcher = redis.subscribe("lightlevel/office").await;
    let addr = publish.addr;
    eventually(move || async move {
        match http(addr, "POST", "/office", &[], b"hi").await {
            (200, _) => Ok(()),
            (status, body) => Err(format!(
                "POST after a body was released: {status} {}",
                String::from_utf8_lossy(&body)
            )),
        }
    })
    .await;
    assert_eq!(&watcher.next().await[..], b"hi");
}

#[tokio::test]
async fn a_refusal_ends_its_connection_at_once_not_after_the_handshake_timeout() {
    let redis = Redis::start().await;
    for kind in [Kind::Publish, Kind::Subscribe] {
        let server = Server::start(kind, &redis.url(), SLOW_HANDSHAKE).await;
        let too_long = format!("/{}", "p".repeat(300));
        let cases: Vec<(Vec<u8>, u16)> =
            vec![
            // A bad path.
            (
                format!(
                    "GET {too_long} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                )
                .into_bytes(),
                400,
            ),
            // Another WebSocket version.
            (
                b"GET /office HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                    .to_vec(),
                426,
            ),
            // A plain request that is not for us.
            (b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 426),
        ];
        for (request, status) in cases {
            let response = raw_exchange(server.addr, &request).await;
            assert_eq!(status_of(&response), status, "{response:?}");
            assert!(has_header(&response, "connection", "close"), "{response:?}");
            assert_eq!(body_of(&response).lines().count(), 1, "{response:?}");
        }
    }
}

#[tokio::test]
async fn a_post_declaring_a_body_over_max_message_bytes_gets_413_at_once() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), SLOW_HANDSHAKE).await;
    let mut watcher = redis.subscribe("lightlevel/office").await;
    let response = raw_exchange(
        publish.addr,
        b"POST /office HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&response), 413, "{response:?}");
    assert!(
        body_of(&response).contains("--max-message-bytes"),
        "{response:?}"
    );
    // Nothing was published meanwhile.
    redis.publish("lightlevel/office", "next").await;
    assert_eq!(&watcher.next().await[..], b"next");
}

#[tokio::test]
async fn an_http_1_0_upgrade_and_a_malformed_sec_websocket_key_get_400_with_a_reason() {
    let redis = Redis::start().await;
    for kind in [Kind::Publish, Kind::Subscribe] {
        let server = Server::start(kind, &redis.url(), SLOW_HANDSHAKE).await;
        let response = raw_exchange(
            server.addr,
            &upgrade_request("HTTP/1.0", "dGhlIHNhbXBsZSBub25jZQ=="),
        )
        .await;
        assert_eq!(status_of(&response), 400, "{response:?}");
        assert!(body_of(&response).contains("HTTP/1.1"), "{response:?}");

        // Not base64; 24 characters but not base64; 15 bytes; 17 bytes.
        for key in [
            "abc",
            "!!!!!!!!!!!!!!!!!!!!!!==",
            "AAAAAAAAAAAAAAAAAAAA",
            "AAAAAAAAAAAAAAAAAAAAAAA=",
        ] {
            let response = raw_exchange(server.addr, &upgrade_request("HTTP/1.1", key)).await;
            assert_eq!(status_of(&response), 400, "key {key:?}: {response:?}");
            assert!(
                body_of(&response).contains("Sec-WebSocket-Key"),
                "key {key:?}: {response:?}"
            );
        }
        // A good key of RFC 6455's own example still upgrades.
        let text = upgrade_response(server.addr, "/office", &[]).await;
        assert_eq!(status_of(&text), 101, "{text:?}");
    }
}

#[tokio::test]
async fn a_target_byte_the_http_parser_refuses_gets_400_with_a_one_line_reason() {
    let redis = Redis::start().await;
    for kind in [Kind::Publish, Kind::Subscribe] {
        let server = Server::start(kind, &redis.url(), SLOW_HANDSHAKE).await;
        // DEL, a raw UTF-8 byte, a control byte, a tab, 0xFF in the query string.
        let targets: [(&[u8], &str); 5] = [
            (b"/a\x7fb", "0x7F"),
            (b"/caf\xc3\xa9", "0xC3"),
            (b"/a\x01b", "0x01"),
            (b"/a\tb", "0x09"),
            (b"/office?q=\xff", "0xFF"),
        ];
        for (target, byte) in targets {
            let mut request = b"GET ".to_vec();
            request.extend_from_slice(target);
            request.extend_from_slice(
                b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            );
            let response = raw_exchange(server.addr, &request).await;
            assert_eq!(status_of(&response), 400, "{target:?}: {response:?}");
            let body = body_of(&response);
            assert_eq!(body.lines().count(), 1, "{target:?}: {response:?}");
            assert!(
                body.contains(byte) && body.contains("0x21-0x7E"),
                "{target:?}: {response:?}"
            );
        }
        assert!(
            server
                .metric(r#"lightrelay_refused_total{reason="bad_path"}"#)
                .await
                >= 5.0
        );
    }
}
