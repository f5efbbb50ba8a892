//! SPEC §5, both servers: `/healthz`, `/metrics`, 426 for every other plain request, POST
//! publishing, `--max-connections`, the handshake timeout, keep-alive pings and the idle
//! timeout, SIGTERM/SIGINT, sd_notify, flags and their environment variables.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// A server process started by hand (to watch what happens before it is healthy, or with no
/// `--listen` flag); SIGKILLed when dropped.
struct Spawned(Child);

impl Spawned {
    fn new(mut command: Command) -> Spawned {
        Spawned(
            command
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A command without any `LIGHTRELAY_*` variable inherited from the test's environment.
fn clean(mut command: Command) -> Command {
    for (name, _) in std::env::vars() {
        if name.starts_with("LIGHTRELAY_") {
            command.env_remove(name);
        }
    }
    command
}

/// Read from a raw TCP connection until the server ends it; returns what it sent meanwhile.
/// Fails if the connection is still open after [`PATIENCE`].
async fn until_server_hangs_up(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for _ in 0..1_000 {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return received,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept an unfinished request open"),
        }
    }
    panic!("the server kept sending on an unfinished request");
}

/// A unix datagram socket in a fresh directory, standing in for systemd's NOTIFY_SOCKET.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(name: &str) -> NotifySocket {
        let dir = std::env::temp_dir().join(format!(
            "lightrelay-notify-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path, dir }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// The next datagram, as text.
    async fn next(&self) -> String {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, self.socket.recv(&mut buf))
            .await
            .expect("no sd_notify datagram")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Both servers on one Redis.
async fn both(redis: &Redis, extra: &[&str]) -> [Server; 2] {
    [
        Server::start(Kind::Publish, &redis.url(), extra).await,
        Server::start(Kind::Subscribe, &redis.url(), extra).await,
    ]
}

// ---------------------------------------------------------------------------------------
// Plain HTTP: /healthz, /metrics, POST, 426.

#[tokio::test]
async fn healthz_answers_200_ok_on_both_servers_while_redis_is_up() {
    let redis = Redis::start().await;
    for server in both(&redis, &[]).await {
        let (status, body) = http(server.addr, "GET", "/healthz", &[], b"").await;
        assert_eq!(status, 200);
        assert_eq!(String::from_utf8(body).unwrap().trim_end(), "ok");
        assert_eq!(server.metric("lightrelay_redis_up").await, 1.0);
    }
}

#[tokio::test]
async fn metrics_answer_prometheus_text_with_every_promised_series_on_both_servers() {
    let redis = Redis::start().await;
    let [publish, subscribe] = both(&redis, &[]).await;
    let promised = [
        "lightrelay_connections ",
        "lightrelay_messages_total{direction=",
        "lightrelay_bytes_total{direction=",
        "lightrelay_dropped_total{reason=",
        "lightrelay_redis_up ",
        "lightrelay_publish_latency_seconds_bucket{le=",
        "lightrelay_publish_latency_seconds_count ",
    ];
    for server in [&publish, &subscribe] {
        let (status, body) = http(server.addr, "GET", "/metrics", &[], b"").await;
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        for series in promised {
            assert!(
                text.lines().any(|line| line.starts_with(series)),
                "no {series} in:\n{text}"
            );
        }
        assert!(
            text.contains("# TYPE lightrelay_connections gauge"),
            "{text}"
        );
        // Every sample line is `name[{labels}] value`, the value a number.
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
        }
    }
    let subscribe_text = subscribe.metrics_text().await;
    assert!(
        subscribe_text
            .lines()
            .any(|l| l.starts_with("lightrelay_channels ")),
        "{subscribe_text}"
    );
}

#[tokio::test]
async fn metrics_count_one_message_published_and_delivered_end_to_end() {
    let redis = Redis::start().await;
    let [publish, subscribe] = both(&redis, &[]).await;
    let mut reader = connect(&subscribe.ws("/office")).await;
    redis.wait_numsub("lightlevel/office", 1).await;
    assert_eq!(subscribe.metric("lightrelay_connections").await, 1.0);
    assert_eq!(subscribe.metric("lightrelay_channels").await, 1.0);

    let mut writer = connect(&publish.ws("/office")).await;
    send_text(&mut writer, "42").await;
    assert_eq!(next_text(&mut reader).await, "42");

    // The subscriber got its frame. A frame the hub writes straight into the socket is
    // counted once the whole fan-out is written, which may be just after the client read it.
    let ws_out = r#"lightrelay_messages_total{direction="ws_out"}"#;
    let redis_in = r#"lightrelay_messages_total{direction="redis_in"}"#;
    subscribe.wait_metric(ws_out, |v| v >= 1.0).await;
    assert_eq!(subscribe.metric(ws_out).await, 1.0);
    assert_eq!(subscribe.metric(redis_in).await, 1.0);
    assert_eq!(
        subscribe
            .metric(r#"lightrelay_bytes_total{direction="ws_out"}"#)
            .await,
        2.0
    );

    // Redis's reply to the PUBLISH may reach the publish server after the subscriber's copy.
    let redis_out = r#"lightrelay_messages_total{direction="redis_out"}"#;
    publish.wait_metric(redis_out, |v| v >= 1.0).await;
    assert_eq!(publish.metric(redis_out).await, 1.0);
    assert_eq!(
        publish
            .metric(r#"lightrelay_messages_total{direction="ws_in"}"#)
            .await,
        1.0
    );
    assert_eq!(
        publish
            .metric(r#"lightrelay_bytes_total{direction="redis_out"}"#)
            .await,
        2.0
    );
    assert_eq!(
        publish
            .metric("lightrelay_publish_latency_seconds_count")
            .await,
        1.0
    );
    assert_eq!(
        publish
            .metric(r#"lightrelay_publish_latency_seconds_bucket{le="+Inf"}"#)
            .await,
        1.0
    );
    assert_eq!(publish.metric("lightrelay_connections").await, 1.0);
    // Nothing was lost on the way.
    for server in [&publish, &subscribe] {
        let text = server.metrics_text().await;
        for line in text
            .lines()
            .filter(|l| l.starts_with("lightrelay_dropped_total{"))
        {
            assert!(line.ends_with(" 0"), "a drop was counted: {line}");
        }
    }
}

#[tokio::test]
async fn any_other_plain_request_gets_426_with_a_one_line_hint() {
    let redis = Redis::start().await;
    let [publish, subscribe] = both(&redis, &[]).await;
    let cases: [(&Server, &str, &str); 7] = [
        (&publish, "GET", "/office"),
        (&publish, "GET", "/"),
        (&publish, "PUT", "/office"),
        (&publish, "DELETE", "/healthz"),
        (&subscribe, "GET", "/office"),
        (&subscribe, "POST", "/metrics/extra"),
        // Without --accept-publish the subscribe server publishes nothing, POST included.
        (&subscribe, "POST", "/office"),
    ];
    let mut watcher = redis.subscribe("lightlevel/office").await;
    for (server, method, path) in cases {
        let (status, body) = http(server.addr, method, path, &[], b"x").await;
        assert_eq!(status, 426, "{method} {path}");
        let body = String::from_utf8(body).unwrap();
        assert_eq!(body.lines().count(), 1, "{method} {path}: {body:?}");
        assert!(body.ends_with('\n') && body.trim().len() > 10, "{body:?}");
    }
    // The refused POST published nothing: the next message on the channel is this one.
    redis.publish("lightlevel/office", "after").await;
    assert_eq!(&watcher.next().await[..], b"after");
}

#[tokio::test]
async fn post_publishes_and_answers_the_receiver_count_and_413_over_max_message_bytes() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &["--max-message-bytes", "16"]).await;
    let mut watcher = redis.subscribe("lightlevel/office").await;
    let (status, body) = http(publish.addr, "POST", "/office", &[], b"21.5").await;
    assert_eq!((status, &body[..]), (200, &b"1\n"[..]));
    assert_eq!(&watcher.next().await[..], b"21.5");

    let (status, body) = http(publish.addr, "POST", "/office", &[], &[b'x'; 17]).await;
    assert_eq!(status, 413);
    assert_eq!(String::from_utf8(body).unwrap().lines().count(), 1);
    let (status, body) = http(publish.addr, "POST", "/office", &[], &[b'y'; 16]).await;
    assert_eq!((status, &body[..]), (200, &b"1\n"[..]));
    // The 17-byte body never reached Redis: the next message is the 16-byte one.
    assert_eq!(&watcher.next().await[..], &[b'y'; 16][..]);
}

// ---------------------------------------------------------------------------------------
// --max-connections and the handshake timeout.

#[tokio::test]
async fn past_max_connections_any_new_connection_gets_503_and_a_freed_slot_is_taken_again() {
    let redis = Redis::start().await;
    for server in both(&redis, &["--max-connections", "2"]).await {
        let mut first = connect(&server.ws("/office")).await;
        let _second = connect(&server.ws("/office")).await;

        // The two sessions keep the slots their connections took (hyper's part of each
        // connection ended at the upgrade): an upgrade and a plain request alike get 503.
        let (status, body) = upgrade_status(server.addr, "/office").await;
        assert_eq!(status, 503, "body: {body}");
        assert!(body.contains("--max-connections"), "body: {body}");
        let (status, body) = http(server.addr, "GET", "/healthz", &[], b"").await;
        assert_eq!(status, 503, "body: {}", String::from_utf8_lossy(&body));

        first.close(None).await.unwrap();
        finish_close(&mut first).await;
        server.wait_healthy().await;
        server
            .wait_metric("lightrelay_connections", |v| v == 1.0)
            .await;
        // At least the two refusals above (a request made while a slot was being freed
        // counts too).
        let refused = server
            .metric(r#"lightrelay_refused_total{reason="over_capacity"}"#)
            .await;
        assert!(refused >= 2.0, "{refused} refusals counted");
        // The plain requests just made free their slots as the server sees them close.
        let url = server.ws("/office");
        let mut third = eventually(|| async {
            tokio_tungstenite::connect_async(url.as_str())
                .await
                .map(|(ws, _)| ws)
                .map_err(|e| format!("third connection: {e}"))
        })
        .await;
        assert_eq!(upgrade_status(server.addr, "/office").await.0, 503);
        third.close(None).await.unwrap();
        finish_close(&mut third).await;
    }
}

#[tokio::test]
async fn an_unfinished_request_is_dropped_after_the_handshake_timeout_and_a_finished_one_is_not() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &["--handshake-timeout", "1s"]).await;
    let mut watcher = redis.subscribe("lightlevel/office").await;
    let mut finished = connect(&publish.ws("/office")).await;

    let partials: [&[u8]; 4] = [
        b"",
        b"GET /off",
        b"GET /office HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n",
        b"POST /office HTTP/1.1\r\nContent-Length: 4\r\n",
    ];
    let mut streams = Vec::new();
    for partial in partials {
        let mut stream = TcpStream::connect(publish.addr).await.unwrap();
        stream.write_all(partial).await.unwrap();
        streams.push(stream);
    }
    for stream in &mut streams {
        until_server_hangs_up(stream).await;
    }

    // Over a second later the finished handshake still carries messages.
    send_text(&mut finished, "still here").await;
    assert_eq!(&watcher.next().await[..], b"still here");
    let metrics = publish.metrics_text().await;
    assert_eq!(closes(&metrics), 0.0, "{metrics}");
}

#[tokio::test]
async fn a_post_whose_body_never_finishes_is_dropped_after_the_handshake_timeout() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &["--handshake-timeout", "1s"]).await;
    let mut watcher = redis.subscribe("lightlevel/office").await;
    let mut stream = TcpStream::connect(publish.addr).await.unwrap();
    stream
        .write_all(b"POST /office HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\nhalf")
        .await
        .unwrap();
    let answer = until_server_hangs_up(&mut stream).await;
    // At most a 408 on the way out, never a publish's 200.
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "answered {answer:?}"
    );
    // Nothing was published from the unfinished body.
    redis.publish("lightlevel/office", "next").await;
    assert_eq!(&watcher.next().await[..], b"next");
}

// ---------------------------------------------------------------------------------------
// Keep-alive: pings and the idle timeout.

/// A WebSocket client that reads and never answers: it takes each server frame off the wire
/// as it comes and notes when, without the pong a WebSocket library would send.
struct SilentClient {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The 101 arrived here: the server's session starts then.
    since: tokio::time::Instant,
}

/// A server frame, with the time since the 101 when it was read whole.
enum RawFrame {
    Ping(Duration),
    Close(Duration, u16, String),
    Other(Duration, u8),
}

impl SilentClient {
    async fn connect(addr: std::net::SocketAddr, path: &str) -> SilentClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut client = SilentClient {
            stream,
            buf: Vec::new(),
            since: tokio::time::Instant::now(),
        };
        let end = loop {
            if let Some(i) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            client.fill().await;
        };
        client.since = tokio::time::Instant::now();
        let head = String::from_utf8_lossy(&client.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client.buf.drain(..end);
        client
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
            .await
            .expect("nothing from the server in time")
            .unwrap();
        assert!(n > 0, "the connection ended");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next frame (server frames are unmasked, control frames short).
    async fn next(&mut self) -> RawFrame {
        loop {
            if self.buf.len() >= 2 && self.buf[1] < 126 {
                let len = 2 + usize::from(self.buf[1]);
                if self.buf.len() >= len {
                    let at = self.since.elapsed();
                    let frame: Vec<u8> = self.buf.drain(..len).collect();
                    return match frame[0] & 0x0f {
                        9 => RawFrame::Ping(at),
                        8 => RawFrame::Close(
                            at,
                            u16::from_be_bytes([frame[2], frame[3]]),
                            String::from_utf8_lossy(&frame[4..]).into_owned(),
                        ),
                        opcode => RawFrame::Other(at, opcode),
                    };
                }
            }
            self.fill().await;
        }
    }
}

/// Pings arrive every `--ping-interval` (1 s): each within [0.75 s, 2 s] of the one before
/// (the first of `from`), so a ping early, or late by half an interval more than the slack a loaded
/// machine needs, fails.
fn assert_ping_spacing(from: Duration, at: &[Duration]) {
    let mut last = from;
    for (k, &t) in at.iter().enumerate() {
        let gap = t - last;
        assert!(
            gap >= Duration::from_millis(750) && gap <= Duration::from_secs(2),
            "ping {k} came {gap:?} after the previous one (pings at {at:?})"
        );
        last = t;
    }
}

#[tokio::test]
async fn a_connected_client_receives_a_ping_every_ping_interval() {
    let redis = Redis::start().await;
    let servers = both(&redis, &["--ping-interval", "1s"]).await;
    let mut clients = Vec::new();
    for server in &servers {
        let mut client = SilentClient::connect(server.addr, "/office").await;
        clients.push(tokio::spawn(async move {
            let mut pings = Vec::new();
            for _ in 0..3 {
                match client.next().await {
                    RawFrame::Ping(at) => pings.push(at),
                    RawFrame::Close(at, code, reason) => {
                        panic!("expected a ping, got a close {code} {reason} at {at:?}")
                    }
                    RawFrame::Other(at, opcode) => {
                        panic!("expected a ping, got opcode {opcode} at {at:?}")
                    }
                }
            }
            pings
        }));
    }
    for client in clients {
        assert_ping_spacing(Duration::ZERO, &client.await.unwrap());
    }
}

#[tokio::test]
async fn a_client_silent_past_the_idle_timeout_is_closed_with_1001_idle_timeout() {
    let redis = Redis::start().await;
    let servers = both(&redis, &["--ping-interval", "1s", "--idle-timeout", "2s"]).await;
    // Each client reads every frame as it comes but answers none: the server hears nothing.
    let mut silent = Vec::new();
    for server in &servers {
        let mut client = SilentClient::connect(server.addr, "/office").await;
        silent.push(tokio::spawn(async move {
            loop {
                match client.next().await {
                    RawFrame::Ping(_) => {}
                    RawFrame::Close(at, code, reason) => return (client, at, code, reason),
                    RawFrame::Other(at, opcode) => {
                        panic!("expected pings and a close, got opcode {opcode} at {at:?}")
                    }
                }
            }
        }));
    }
    for (server, closed) in servers.iter().zip(silent) {
        let (mut client, at, code, reason) = closed.await.unwrap();
        assert_eq!(code, 1001);
        assert_eq!(reason, "idle timeout");
        // 2 s after the last thing heard (the handshake); not early, and not 1.75× late.
        assert!(
            at >= Duration::from_millis(1_900) && at <= Duration::from_millis(3_500),
            "closed {at:?} after the handshake"
        );
        // Answer the close (masked, with a zero key) and hang up.
        let answer = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe9];
        client.stream.write_all(&answer).await.unwrap();
        client.stream.shutdown().await.unwrap();
        server
            .wait_series(r#"lightrelay_closed_total{reason="idle_timeout"}"#, |v| {
                v == 1.0
            })
            .await;
        server
            .wait_metric("lightrelay_connections", |v| v == 0.0)
            .await;
    }
}

#[tokio::test]
async fn a_client_that_keeps_answering_pings_stays_connected_past_the_idle_timeout() {
    const OFFICE: &str = "lightlevel/office";
    let redis = Redis::start().await;
    let subscribe = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &["--ping-interval", "1s", "--idle-timeout", "2s"],
    )
    .await;
    let mut ws = connect(&subscribe.ws("/office")).await;
    redis.wait_numsub(OFFICE, 1).await;

    // Poll (and so answer pings) for twice the idle timeout and at least three pings.
    let started = tokio::time::Instant::now();
    let deadline = started + PATIENCE;
    let mut pings = Vec::new();
    for _ in 0..1_000 {
        if pings.len() >= 3 && started.elapsed() >= Duration::from_secs(4) {
            break;
        }
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("fewer than 3 pings in time")
            .expect("connection ended")
            .expect("websocket error");
        match frame {
            Message::Ping(_) => pings.push(started.elapsed()),
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    assert!(pings.len() >= 3 && started.elapsed() >= Duration::from_secs(4));
    // Answered pings keep coming at the interval (the first one timed from the handshake,
    // which came a little before `started`).
    assert!(pings[0] <= Duration::from_secs(2), "pings at {pings:?}");
    assert_ping_spacing(pings[0], &pings[1..]);

    assert_eq!(redis.publish(OFFICE, "awake").await, 1);
    assert_eq!(next_text(&mut ws).await, "awake");
    let metrics = subscribe.metrics_text().await;
    assert_eq!(closes(&metrics), 0.0, "{metrics}");
}

// ---------------------------------------------------------------------------------------
// SIGTERM / SIGINT.

/// Both servers with a client each; `signal` closes both with 1001 and they exit 0.
async fn stops_gracefully_on(signal: &str) {
    let redis = Redis::start().await;
    let [mut publish, mut subscribe] = both(&redis, &[]).await;
    let mut writer = connect(&publish.ws("/office")).await;
    let mut reader = connect(&subscribe.ws("/office")).await;
    redis.wait_numsub("lightlevel/office", 1).await;
    publish
        .wait_metric("lightrelay_connections", |v| v == 1.0)
        .await;

    for server in [&publish, &subscribe] {
        server.signal(signal);
    }
    for ws in [&mut writer, &mut reader] {
        let close = close_frame(ws).await;
        assert_eq!(close.code, CloseCode::Away);
        assert_eq!(close.reason.as_str(), "going away");
        finish_close(ws).await;
    }
    assert_eq!(publish.wait_exit().await, Some(0));
    assert_eq!(subscribe.wait_exit().await, Some(0));
}

#[tokio::test]
async fn sigterm_closes_every_client_with_1001_going_away_and_exits_0() {
    stops_gracefully_on("TERM").await;
}

#[tokio::test]
async fn sigint_closes_every_client_with_1001_going_away_and_exits_0() {
    stops_gracefully_on("INT").await;
}

#[tokio::test]
async fn after_sigterm_the_listener_is_closed_while_clients_are_still_being_closed() {
    let redis = Redis::start().await;
    // A long close timeout: the server waits for the client's answering close frame.
    let mut subscribe = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &["--handshake-timeout", "60s", "--shutdown-timeout", "60s"],
    )
    .await;
    let mut ws = connect(&subscribe.ws("/office")).await;
    redis.wait_numsub("lightlevel/office", 1).await;

    subscribe.signal("TERM");
    let close = close_frame(&mut ws).await;
    assert_eq!(close.code, CloseCode::Away);
    // The close is not answered yet, so the process is still there; new connections are not.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut refused = false;
    for _ in 0..500 {
        // A listener nobody accepts from still completes handshakes into its backlog, then
        // leaves connects hanging: each attempt is bounded too.
        match tokio::time::timeout_at(deadline, TcpStream::connect(subscribe.addr)).await {
            Ok(Err(_)) => {
                refused = true;
                break;
            }
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => break,
        }
    }
    assert!(refused, "still accepting connections after SIGTERM");
    assert!(
        !subscribe.has_exited(),
        "the process must still be closing its client"
    );
    finish_close(&mut ws).await;
    assert_eq!(subscribe.wait_exit().await, Some(0));
}

#[tokio::test]
async fn a_client_that_never_answers_the_close_does_not_hold_shutdown_past_shutdown_timeout() {
    let redis = Redis::start().await;
    let mut subscribe = Server::start(
        Kind::Subscribe,
        &redis.url(),
        // Without --shutdown-timeout, the server would wait a minute for the answer.
        &["--handshake-timeout", "60s", "--shutdown-timeout", "1s"],
    )
    .await;
    let _never_polled = connect(&subscribe.ws("/office")).await;
    redis.wait_numsub("lightlevel/office", 1).await;
    subscribe.signal("TERM");
    assert_eq!(subscribe.wait_exit().await, Some(0));
}

#[tokio::test]
async fn on_sigterm_an_ack_publisher_gets_the_acks_of_its_in_flight_messages_before_1001() {
    const CHANNEL: &str = "lightlevel/acked";
    use fred::interfaces::ClientLike as _;
    let redis = Redis::start().await;
    let mut publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe(CHANNEL).await;
    let mut ws = connect_ack(&publish.ws("/acked")).await;

    // Redis holds every PUBLISH for 2 s (PING and metrics still answer): what the server reads
    // now stays in flight across the signal.
    let pauser = redis.client().await;
    let _: fred::types::Value = pauser
        .custom(
            fred::types::CustomCommand::new_static("CLIENT", None, false),
            vec!["PAUSE", "2000", "WRITE"],
        )
        .await
        .unwrap();
    // A first half is read and held in flight; the second half is signalled right after it
    // is sent, so the server may or may not have read any of it.
    for i in 0..100 {
        send_text(&mut ws, &format!("m{i}")).await;
    }
    let in_flight = publish
        .wait_metric(r#"lightrelay_messages_total{direction="ws_in"}"#, |v| {
            v >= 100.0
        })
        .await as usize;
    for i in 100..200 {
        send_text(&mut ws, &format!("m{i}")).await;
    }
    publish.signal("TERM");

    let mut acks = 0usize;
    let close = loop {
        match next_frame(&mut ws).await {
            Message::Text(t) => {
                assert_eq!(t.as_str(), "1", "ack {acks}");
                acks += 1;
                assert!(acks <= 200, "more acks than messages");
            }
            Message::Close(Some(close)) => break close,
            other => panic!("expected acks then a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(close.reason.as_str(), "going away");
    finish_close(&mut ws).await;
    assert_eq!(publish.wait_exit().await, Some(0));
    assert!(
        acks >= in_flight,
        "{in_flight} messages were in flight, only {acks} acked"
    );

    // Redis saw exactly the acked messages, in order, and nothing after them.
    for i in 0..acks {
        assert_eq!(watcher.next().await, format!("m{i}").as_bytes());
    }
    redis.publish(CHANNEL, "sentinel").await;
    assert_eq!(&watcher.next().await[..], b"sentinel");
}

// ---------------------------------------------------------------------------------------
// sd_notify.

#[tokio::test]
async fn ready_1_is_sent_once_the_listener_is_bound_even_with_redis_down() {
    let notify = NotifySocket::bind("ready");
    // Nothing listens on this Redis port.
    let redis_url = format!("redis://127.0.0.1:{}", free_port());
    for kind in [Kind::Publish, Kind::Subscribe] {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut command = server_command(kind);
        command
            .args(["--listen", &addr, "--redis-url", &redis_url])
            .env("NOTIFY_SOCKET", notify.path());
        let server = Spawned::new(command);
        let datagram = notify.next().await;
        assert!(datagram.lines().any(|l| l == "READY=1"), "got {datagram:?}");
        // Bound before READY=1: the first connection attempt succeeds.
        TcpStream::connect(&addr)
            .await
            .expect("READY=1 came before the listener was bound");
        drop(server);
    }
}

#[tokio::test]
async fn under_systemd_ready_1_is_sent_at_start_and_stopping_1_on_sigterm() {
    let redis = Redis::start().await;
    let notify = NotifySocket::bind("stopping");
    let mut server = Server::start_with_env(
        Kind::Subscribe,
        &redis.url(),
        &[],
        &[("NOTIFY_SOCKET", notify.path())],
    )
    .await;
    let ready = notify.next().await;
    assert!(ready.lines().any(|l| l == "READY=1"), "got {ready:?}");
    server.signal("TERM");
    let stopping = notify.next().await;
    assert!(
        stopping.lines().any(|l| l == "STOPPING=1"),
        "got {stopping:?}"
    );
    assert_eq!(server.wait_exit().await, Some(0));
}

// ---------------------------------------------------------------------------------------
// Flags, environment variables, durations.

#[tokio::test]
async fn a_bad_flag_or_value_exits_2_with_the_problem_on_the_first_line() {
    // (server, flags, what the first line must name)
    let cases: [(&str, &[&str], &str); 9] = [
        ("publish", &["--ping-interval", "soon"], "--ping-interval"),
        (
            "subscribe",
            &["--idle-timeout", "5 parsecs"],
            "--idle-timeout",
        ),
        ("publish", &["--redis-url", "http://x"], "--redis-url"),
        (
            "subscribe",
            &["--redis-url", "redis://127.0.0.1:notaport"],
            "--redis-url",
        ),
        ("publish", &["--listen", "nonsense"], "--listen"),
        (
            "subscribe",
            &["--slow-consumer", "maybe"],
            "--slow-consumer",
        ),
        (
            "subscribe",
            &["--max-message-bytes", "lots"],
            "--max-message-bytes",
        ),
        ("publish", &["--frobnicate"], "--frobnicate"),
        // A subscribe-only flag is unknown to the publish server.
        ("publish", &["--slow-consumer", "skip"], "--slow-consumer"),
    ];
    for (server, flags, names) in cases {
        let kind = if server == "publish" {
            Kind::Publish
        } else {
            Kind::Subscribe
        };
        let mut command = clean(server_command(kind));
        // Valid values for what the case does not set: were its flag accepted, the server
        // would start (and be killed after PATIENCE, failing the test) without clashing.
        if !flags.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        if !flags.contains(&"--redis-url") {
            command.args(["--redis-url", "redis://127.0.0.1:1"]);
        }
        command.args(flags);
        let (code, _, stderr) = run_to_exit(&mut command).await;
        assert_eq!(code, Some(2), "{server} {flags:?}: stderr {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error:") && first.contains(names),
            "{server} {flags:?}: first line {first:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.lines().count() <= 6,
            "{server} {flags:?}: more than a short hint:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn every_number_and_duration_outside_its_range_exits_2_naming_the_flag_and_the_range() {
    // (flag, a value outside its range, the range as the first line gives it)
    let cases: [(&str, &str, &str); 19] = [
        ("--ping-interval", "0", "100ms to 1h"),
        ("--ping-interval", "99ms", "100ms to 1h"),
        ("--ping-interval", "2h", "100ms to 1h"),
        ("--idle-timeout", "500ms", "1s to 1day"),
        ("--idle-timeout", "25h", "1s to 1day"),
        ("--handshake-timeout", "0", "100ms to 10m"),
        ("--handshake-timeout", "11m", "100ms to 10m"),
        ("--redis-timeout", "50ms", "100ms to 1h"),
        ("--shutdown-timeout", "61m", "0s to 1h"),
        ("--max-message-bytes", "0", "1 to 256MiB"),
        ("--max-message-bytes", "257MiB", "1 to 256MiB"),
        ("--max-message-bytes", "18446744073709551615", "1 to 256MiB"),
        ("--max-path-bytes", "0", "1 to 8192"),
        ("--max-path-bytes", "8193", "1 to 8192"),
        ("--max-connections", "0", "1 to 1000000"),
        ("--max-connections", "1000001", "1 to 1000000"),
        ("--max-connections", "18446744073709551615", "1 to 1000000"),
        ("--worker-threads", "0", "1 to 1024"),
        ("--worker-threads", "1025", "1 to 1024"),
    ];
    for (i, (flag, value, range)) in cases.into_iter().enumerate() {
        let kind = if i % 2 == 0 {
            Kind::Publish
        } else {
            Kind::Subscribe
        };
        let mut command = clean(server_command(kind));
        command.args([
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            "redis://127.0.0.1:1",
        ]);
        command.args([flag, value]);
        let (code, _, stderr) = run_to_exit(&mut command).await;
        assert_eq!(code, Some(2), "{flag} {value}: stderr {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error:") && first.contains(flag) && first.contains(range),
            "{flag} {value}: first line {first:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.lines().count() <= 6, "{flag} {value}:\n{stderr}");
    }
    // The environment variable is held to the same range.
    let mut command = clean(server_command(Kind::Publish));
    command
        .env("LIGHTRELAY_LISTEN", "127.0.0.1:0")
        .env("LIGHTRELAY_REDIS_URL", "redis://127.0.0.1:1")
        .env("LIGHTRELAY_MAX_CONNECTIONS", "0");
    let (code, _, stderr) = run_to_exit(&mut command).await;
    assert_eq!(code, Some(2), "stderr {stderr}");
    assert!(
        stderr.starts_with("error:") && stderr.contains("--max-connections"),
        "{stderr}"
    );

    // Each range's ends are allowed: the server starts with all of them.
    let redis = Redis::start().await;
    let _server = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &[
            "--ping-interval",
            "100ms",
            "--idle-timeout",
            "1s",
            "--handshake-timeout",
            "100ms",
            "--redis-timeout",
            "1h",
            "--shutdown-timeout",
            "0",
            "--max-message-bytes",
            "256MiB",
            "--max-path-bytes",
            "8192",
            "--max-connections",
            "1000000",
            // (1024 worker threads is allowed too: config's unit test, without starting them.)
            "--worker-threads",
            "1",
        ],
    )
    .await;
}

#[tokio::test]
async fn an_idle_timeout_not_longer_than_the_ping_interval_exits_2_naming_both() {
    for (ping, idle) in [("30s", "30s"), ("1m", "30s")] {
        let mut command = clean(server_command(Kind::Subscribe));
        command.args([
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            "redis://127.0.0.1:1",
        ]);
        command.args(["--ping-interval", ping, "--idle-timeout", idle]);
        let (code, _, stderr) = run_to_exit(&mut command).await;
        assert_eq!(code, Some(2), "ping {ping}, idle {idle}: stderr {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error:")
                && first.contains("--idle-timeout")
                && first.contains("--ping-interval"),
            "first line {first:?}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit_and_one_below_max_connections_is_warned_about(
) {
    let redis = Redis::start().await;
    // (the shell's soft limit, then its hard limit: `ulimit -n` sets both, as a small
    // container might), --max-connections, whether a warning is due
    for (limits, max, warned) in [
        ("ulimit -Sn 256", "1000", false),
        ("ulimit -n 512", "1000", true),
    ] {
        let port = free_port();
        let script = format!(
            "{limits} && exec \"$0\" --listen 127.0.0.1:{port} --redis-url {} --max-connections {max}",
            redis.url()
        );
        let binary = env!("CARGO_BIN_EXE_lightrelay-publish");
        let mut command = clean(Command::new("sh"));
        command
            .args(["-c", &script, binary])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped());
        let mut server = Spawned::new(command);
        wait_for_port(port).await;
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.0.id())).unwrap();
        let open_files = limits
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .unwrap()
            .split_whitespace()
            .skip(3)
            .take(2)
            .collect::<Vec<_>>();
        assert_eq!(
            open_files[0], open_files[1],
            "soft limit not raised: {limits}"
        );
        let _ = server.0.kill();
        let _ = server.0.wait();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut server.0.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(
            stderr.contains("open-file limit"),
            warned,
            "{limits} --max-connections {max}: stderr {stderr}"
        );
    }
}

#[tokio::test]
async fn a_bad_value_in_an_environment_variable_exits_2_like_the_flag() {
    let cases: [(&str, &str, &str); 4] = [
        ("LIGHTRELAY_PING_INTERVAL", "soon", "--ping-interval"),
        ("LIGHTRELAY_REDIS_URL", "http://x", "--redis-url"),
        ("LIGHTRELAY_LISTEN", "nonsense", "--listen"),
        ("LIGHTRELAY_SLOW_CONSUMER", "maybe", "--slow-consumer"),
    ];
    for (variable, value, names) in cases {
        let mut command = clean(server_command(Kind::Subscribe));
        if variable != "LIGHTRELAY_LISTEN" {
            command.env("LIGHTRELAY_LISTEN", "127.0.0.1:0");
        }
        if variable != "LIGHTRELAY_REDIS_URL" {
            command.env("LIGHTRELAY_REDIS_URL", "redis://127.0.0.1:1");
        }
        command.env(variable, value);
        let (code, _, stderr) = run_to_exit(&mut command).await;
        assert_eq!(code, Some(2), "{variable}={value}: stderr {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error:") && (first.contains(names) || first.contains(value)),
            "{variable}={value}: first line {first:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn help_exits_0_and_names_the_environment_variables() {
    for kind in [Kind::Publish, Kind::Subscribe] {
        let mut command = clean(server_command(kind));
        command.arg("--help");
        let (code, stdout, stderr) = run_to_exit(&mut command).await;
        assert_eq!(code, Some(0), "stderr: {stderr}");
        for variable in [
            "LIGHTRELAY_REDIS_URL",
            "LIGHTRELAY_LISTEN",
            "LIGHTRELAY_PING_INTERVAL",
            "LIGHTRELAY_MAX_CONNECTIONS",
        ] {
            assert!(stdout.contains(variable), "no {variable} in:\n{stdout}");
        }
    }
}

#[tokio::test]
async fn help_describes_each_server_with_an_example_and_the_listen_forms() {
    for (kind, what, example) in [
        (
            Kind::Publish,
            "Redis PUBLISH out",
            "lightrelay-publish --listen",
        ),
        (
            Kind::Subscribe,
            "WebSocket out",
            "lightrelay-subscribe --listen",
        ),
    ] {
        let mut command = clean(server_command(kind));
        command.arg("--help");
        let (code, stdout, stderr) = run_to_exit(&mut command).await;
        assert_eq!(code, Some(0), "stderr: {stderr}");
        for expected in [
            what,
            "Examples:",
            example,
            "localhost:PORT",
            ":PORT (all interfaces",
        ] {
            assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
        }
    }
}

#[tokio::test]
async fn listen_accepts_localhost_port_and_colon_port_for_all_interfaces() {
    let redis = Redis::start().await;
    for (form, bound) in [
        ("localhost:{port}", "127.0.0.1:{port}"),
        (":{port}", "0.0.0.0:{port}"),
    ] {
        let port = free_port().to_string();
        let listen = form.replace("{port}", &port);
        let mut command = clean(server_command(Kind::Publish));
        command
            .args(["--listen", &listen, "--redis-url", &redis.url()])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped());
        let mut server = Spawned(command.spawn().unwrap());
        let stderr = StderrLines::read(&mut server.0);
        let bound = format!("addr={}", bound.replace("{port}", &port));
        stderr
            .wait_for(&bound, |lines| {
                lines
                    .iter()
                    .any(|l| l.contains("listening") && l.contains(&bound))
            })
            .await;
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let listen = &listen;
        eventually(|| async move {
            match http(addr, "GET", "/healthz", &[], b"").await.0 {
                200 => Ok(()),
                now => Err(format!("--listen {listen}: /healthz {now}")),
            }
        })
        .await;
    }
    // What is not one of the forms still exits 2 with one line naming --listen.
    for bad in ["8865", "example.org:8865", "localhost", ":99999"] {
        let mut command = clean(server_command(Kind::Subscribe));
        command.args(["--listen", bad, "--redis-url", "redis://127.0.0.1:1"]);
        let (code, _, stderr) = run_to_exit(&mut command).await;
        assert_eq!(code, Some(2), "--listen {bad}: {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error:") && first.contains("--listen") && first.contains(":PORT"),
            "--listen {bad}: {first:?}"
        );
    }
}

#[tokio::test]
async fn a_post_to_the_subscribe_server_gets_426_saying_publishing_goes_to_the_publish_server() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let (status, body) = http(subscribe.addr, "POST", "/office", &[], b"42").await;
    assert_eq!(status, 426);
    let body = String::from_utf8(body).unwrap();
    assert_eq!(body.lines().count(), 1, "{body:?}");
    assert!(
        body.contains("publish server") && body.contains("--accept-publish"),
        "{body:?}"
    );
}

#[tokio::test]
async fn metrics_are_text_0_0_4_unless_the_scraper_asks_for_openmetrics() {
    let redis = Redis::start().await;
    for server in both(&redis, &[]).await {
        let request = |accept: &str| {
            let accept = if accept.is_empty() {
                String::new()
            } else {
                format!("Accept: {accept}\r\n")
            };
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{accept}\r\n")
        };
        for accept in [
            "",
            "*/*",
            "text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5",
        ] {
            let response = raw_exchange(server.addr, request(accept).as_bytes()).await;
            assert_eq!(status_of(&response), 200);
            assert!(
                has_header(
                    &response,
                    "content-type",
                    "text/plain; version=0.0.4; charset=utf-8"
                ),
                "Accept {accept:?}: {response}"
            );
            let body = body_of(&response);
            assert!(
                body.contains("# TYPE lightrelay_messages_total counter\n"),
                "{body}"
            );
            assert!(body.contains("# HELP lightrelay_messages_total "), "{body}");
            assert!(!body.contains("# EOF"), "{body}");
        }
        // What Prometheus sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let response = raw_exchange(server.addr, request(prometheus).as_bytes()).await;
        assert!(
            has_header(
                &response,
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{response}"
        );
        let body = body_of(&response);
        assert!(
            body.contains("# TYPE lightrelay_messages counter\n"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}

#[tokio::test]
async fn listen_and_redis_url_can_come_from_the_environment_alone() {
    let redis = Redis::start().await;
    let port = free_port();
    let mut command = clean(server_command(Kind::Publish));
    command
        .env("LIGHTRELAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("LIGHTRELAY_REDIS_URL", redis.url());
    let _server = Spawned::new(command);
    wait_for_port(port).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually(|| async move {
        match http(addr, "GET", "/healthz", &[], b"").await.0 {
            200 => Ok(()),
            now => Err(format!(
                "/healthz {now} on the Redis of LIGHTRELAY_REDIS_URL"
            )),
        }
    })
    .await;
    let mut watcher = redis.subscribe("lightlevel/env").await;
    assert_eq!(http(addr, "POST", "/env", &[], b"e").await.1, b"1\n");
    assert_eq!(&watcher.next().await[..], b"e");
}

#[tokio::test]
async fn durations_accept_bare_seconds_seconds_milliseconds_and_minutes() {
    let redis = Redis::start().await;
    let subscribe = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &[
            "--ping-interval",
            "500ms",
            "--idle-timeout",
            "2m",
            "--handshake-timeout",
            "30",
            "--shutdown-timeout",
            "30s",
            "--redis-timeout",
            "1m",
        ],
    )
    .await;
    // 500ms is half a second (not the 30 s default, nor 500 s): a ping arrives soon.
    let mut ws = connect(&subscribe.ws("/office")).await;
    let frame = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("no ping in time")
        .unwrap()
        .unwrap();
    assert!(matches!(frame, Message::Ping(_)), "got {frame:?}");
    let _ = ws.send(Message::Close(None)).await;
}
