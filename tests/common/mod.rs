//! Real parts for the contract tests: a private `redis-server` per test on a free loopback
//! port (killable and restartable on the same port), our servers started as the built
//! binaries, a WebSocket client, a plain Redis client, a minimal HTTP client, and a real nginx
//! serving the shipped sites ([`nginx`]).
#![allow(dead_code)]

/// Token tests (SPEC §8): keys, tokens, requests that carry them.
pub mod auth;
/// A real Redis Cluster (SPEC §11): six nodes, failover, slot migration.
pub mod cluster;
pub mod nginx;
/// Redis Sentinel (SPEC §11): a primary, a replica and three sentinels.
pub mod sentinel;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any wait in a test may last before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(15);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port that stays free while a test waits before using it: one below the kernel's
/// ephemeral range, so no outgoing connection of a concurrent test (and no relay retrying a
/// connection to it, which can connect to itself in that range) takes it meanwhile.
pub fn quiet_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    if low < 12_000 {
        return free_port();
    }
    let span = low - 10_000;
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
    for _ in 0..1000 {
        let n = NEXT.fetch_add(7919, std::sync::atomic::Ordering::Relaxed);
        let port = 10_000 + seed.wrapping_add(n) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    free_port()
}

/// A fresh directory under the system's temporary directory, unique to this test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "lightrelay-test-{tag}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A private redis-server on 127.0.0.1, killed when dropped.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    /// More redis-server arguments, after (so overriding) the defaults.
    extra: Vec<String>,
}

impl Redis {
    pub async fn start() -> Redis {
        Redis::start_on(free_port()).await
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // DEBUG SLEEP lets a test make Redis deaf without closing its connections.
                "--enable-debug-command",
                "yes",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (bin/test installs it)");
        self.child = Some(child);
        wait_for_port(self.port).await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: Redis vanishes with every connection and subscription.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port and directory (empty, unless it persists).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// A plain client, as redis-cli would be.
    pub async fn client(&self) -> Client {
        let config = Config::from_url(&self.url()).unwrap();
        let client = Builder::from_config(config).build().unwrap();
        client.init().await.unwrap();
        client
    }

    /// A plain subscriber on `channel`: what `redis-cli SUBSCRIBE` would see.
    pub async fn subscribe(&self, channel: &str) -> RedisWatcher {
        let config = Config::from_url(&self.url()).unwrap();
        // fred's default broadcast buffer (32) would lose messages in any burst.
        let client = Builder::from_config(config)
            .with_performance_config(|perf| perf.broadcast_channel_capacity = 1 << 16)
            .build_subscriber_client()
            .unwrap();
        client.init().await.unwrap();
        let rx = client.message_rx();
        client.subscribe(channel).await.unwrap();
        RedisWatcher {
            _client: client,
            rx,
        }
    }

    /// PUBSUB NUMSUB for one channel.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let client = self.client().await;
        let counts: Vec<Value> = client.pubsub_numsub(channel).await.unwrap();
        let n = counts.get(1).and_then(|v| v.as_i64()).unwrap_or(0);
        let _ = client.quit().await;
        n
    }

    /// Wait until `channel` has exactly `n` Redis subscribers.
    pub async fn wait_numsub(&self, channel: &str, n: i64) {
        eventually(|| async move {
            match self.numsub(channel).await {
                now if now == n => Ok(()),
                now => Err(format!("NUMSUB {channel} stayed {now}, expected {n}")),
            }
        })
        .await
    }

    pub async fn publish(&self, channel: &str, payload: impl Into<Bytes>) -> i64 {
        let client = self.client().await;
        let n: i64 = client.publish(channel, payload.into()).await.unwrap();
        let _ = client.quit().await;
        n
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct RedisWatcher {
    _client: SubscriberClient,
    rx: tokio::sync::broadcast::Receiver<fred::types::Message>,
}

impl RedisWatcher {
    /// The next payload published on the channel, as bytes.
    pub async fn next(&mut self) -> Bytes {
        let message = tokio::time::timeout(PATIENCE, self.rx.recv())
            .await
            .expect("no message on Redis")
            .unwrap();
        match message.value {
            Value::String(s) => s.into_inner(),
            Value::Bytes(b) => b,
            other => panic!("unexpected payload {other:?}"),
        }
    }
}

pub async fn wait_for_port(port: u16) {
    eventually(|| async move {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("nothing listens on port {port}: {e}")),
        }
    })
    .await
}

/// Ask `probe` every 20 ms until it answers `Ok`, for at most [`PATIENCE`]; the test fails
/// with its last `Err`, which says what it saw instead.
pub async fn eventually<T, F, Fut>(mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => assert!(tokio::time::Instant::now() < deadline, "{seen}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One of our servers, started from the built binary; SIGKILLed when dropped.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
}

pub enum Kind {
    Publish,
    Subscribe,
}

impl Server {
    pub async fn start(kind: Kind, redis_url: &str, extra: &[&str]) -> Server {
        Self::start_with_env(kind, redis_url, extra, &[]).await
    }

    pub async fn start_with_env(
        kind: Kind,
        redis_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        // Below the ephemeral range: a port `free_port` found free can be handed to another
        // test's bind(0) (an nginx of deploy_nginx.rs, say) before this server binds it; then
        // the server exits and the test talks to the other one (seen in CI: a `pub` answered
        // 101 with no role header, then not at all).
        let port = quiet_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = server_command(kind)
            .args(["--listen", &addr.to_string(), "--redis-url", redis_url])
            .args(extra)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .unwrap();
        wait_for_port(port).await;
        let server = Server { addr, child };
        server.wait_healthy().await;
        server
    }

    /// Start on a chosen address (to restart a server where its clients expect it).
    pub async fn start_at(kind: Kind, addr: SocketAddr, redis_url: &str, extra: &[&str]) -> Server {
        let child = server_command(kind)
            .args(["--listen", &addr.to_string(), "--redis-url", redis_url])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .unwrap();
        wait_for_port(addr.port()).await;
        let server = Server { addr, child };
        server.wait_healthy().await;
        server
    }

    /// Start without waiting for Redis (for tests where Redis is down at start-up).
    pub async fn start_unhealthy(kind: Kind, redis_url: &str, extra: &[&str]) -> Server {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = server_command(kind)
            .args(["--listen", &addr.to_string(), "--redis-url", redis_url])
            .args(extra)
            .spawn()
            .unwrap();
        wait_for_port(port).await;
        Server { addr, child }
    }

    pub fn ws(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub async fn wait_healthy(&self) {
        self.wait_health(200).await;
    }

    /// The value of one metric line, e.g. `lightrelay_channels` or
    /// `lightrelay_dropped_total{reason="slow_consumer_skip"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let body = self.metrics_text().await;
        series_value(&body, series).unwrap_or_else(|| panic!("no series {series} in:\n{body}"))
    }

    /// Wait until a metric satisfies `ok`.
    pub async fn wait_metric(&self, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let ok = &ok;
        eventually(|| async move {
            match self.metric(series).await {
                value if ok(value) => Ok(value),
                value => Err(format!("{series} stayed at {value}")),
            }
        })
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A server the test started itself (its own stderr, say), to be signalled, awaited and
    /// SIGKILLed when dropped like any other.
    pub fn adopt(child: Child, addr: SocketAddr) -> Server {
        Server { addr, child }
    }

    /// The process, for its pipes.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Send a signal to this server (only ever to the process we started).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait for the process to exit and return its exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn server_command(kind: Kind) -> Command {
    Command::new(match kind {
        Kind::Publish => env!("CARGO_BIN_EXE_lightrelay-publish"),
        Kind::Subscribe => env!("CARGO_BIN_EXE_lightrelay-subscribe"),
    })
}

pub async fn connect(url: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .unwrap();
    ws
}

/// Connect offering the `lightrelay.ack` subprotocol; asserts the server selected it.
pub async fn connect_ack(url: &str) -> Ws {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "lightrelay.ack".parse().unwrap());
    let (ws, response) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "lightrelay.ack"
    );
    ws
}

/// The next data or close frame (pings and pongs are skipped).
pub async fn next_frame<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // One deadline for the whole wait: pings from the server must not extend it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no frame in time")
            .expect("connection ended without a close frame")
            .expect("websocket error");
        if !matches!(frame, Message::Ping(_) | Message::Pong(_)) {
            return frame;
        }
    }
}

pub async fn next_text(ws: &mut Ws) -> String {
    match next_frame(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Read until the close frame and return it.
pub async fn close_frame(ws: &mut Ws) -> CloseFrame {
    loop {
        match next_frame(ws).await {
            Message::Close(Some(frame)) => return frame,
            Message::Close(None) => panic!("close frame without a code"),
            _ => {}
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body_at = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |i| i + 4);
    (status, response[body_at..].to_vec())
}

/// An upgrade request sent by hand, to see refusals that come before the upgrade.
pub async fn upgrade_status(addr: SocketAddr, target: &str) -> (u16, String) {
    let text = upgrade_response(addr, target, &[]).await;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// The raw first response to a hand-made upgrade request with `extra` headers.
pub async fn upgrade_response(addr: SocketAddr, target: &str, extra: &[(&str, &str)]) -> String {
    let headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers.iter().chain(extra) {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

// Helpers for the subscribe and Redis-outage tests (SPEC §3–5).

impl Redis {
    /// A private redis-server on a chosen port: for a server that was told where Redis is
    /// before Redis ran there.
    pub async fn start_on(port: u16) -> Redis {
        Redis::start_with(port, &[]).await
    }

    /// A private redis-server on `port` with more arguments (e.g. `--appendonly yes`): they
    /// hold across [`Redis::restart`], which keeps its directory.
    pub async fn start_with(port: u16, extra: &[&str]) -> Redis {
        let dir = std::env::temp_dir().join(format!(
            "lightrelay-test-redis-{port}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Redis {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        redis.spawn().await;
        redis
    }
}

impl Server {
    /// Whether the process has exited (checked without waiting).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// The whole `/metrics` text.
    /// (A 503 is asked again: every connection takes a slot under `--max-connections`, and
    /// the one of the request before may not be freed yet.)
    pub async fn metrics_text(&self) -> String {
        eventually(|| async move {
            match http(self.addr, "GET", "/metrics", &[], b"").await {
                (200, body) => Ok(String::from_utf8(body).unwrap()),
                (status, body) => Err(format!(
                    "/metrics answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )),
            }
        })
        .await
    }

    /// Poll `/healthz` until it answers `status`; returns that answer's body.
    pub async fn wait_health(&self, status: u16) -> String {
        eventually(|| async move {
            match http(self.addr, "GET", "/healthz", &[], b"").await {
                (now, body) if now == status => Ok(String::from_utf8(body).unwrap()),
                (now, _) => Err(format!("/healthz stayed {now}, expected {status}")),
            }
        })
        .await
    }

    /// Like [`Server::wait_metric`], for a series that only appears once it counted something
    /// (e.g. `lightrelay_closed_total{reason="slow_consumer"}`): absent reads as 0.
    pub async fn wait_series(&self, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let ok = &ok;
        eventually(|| async move {
            match series_value(&self.metrics_text().await, series).unwrap_or(0.0) {
                value if ok(value) => Ok(value),
                value => Err(format!("{series} stayed at {value}")),
            }
        })
        .await
    }
}

/// The value of one series (`name{labels}`) in a Prometheus text exposition.
/// Every `lightrelay_closed_total{reason}` added up: the connections closed so far (each
/// reason's series exists from the start, at zero).
pub fn closes(body: &str) -> f64 {
    body.lines()
        .filter_map(|line| line.strip_prefix("lightrelay_closed_total{"))
        .filter_map(|rest| rest.rsplit_once(' '))
        .map(|(_, v)| v.trim().parse::<f64>().unwrap())
        .sum()
}

pub fn series_value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// The text every probe carries; [`next_data`] skips it.
pub const PROBE: &str = "probe";

/// Publish [`PROBE`] through Redis until `ws` receives one: its subscription is then active.
/// Other clients of the channel get the probes too (and `ws` may get more than one), so
/// readers use [`next_data`].
pub async fn until_receiving<S>(redis: &Redis, channel: &str, ws: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let client = redis.client().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let _: i64 = client.publish(channel, PROBE).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(100), next_frame(ws)).await {
            Ok(Message::Text(t)) if t.as_str() == PROBE => break,
            Ok(other) => panic!("expected a probe on {channel}, got {other:?}"),
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "{channel}: the client never received a message"
            ),
        }
    }
    let _ = client.quit().await;
}

/// The next data or close frame that is not a [`PROBE`], within [`PATIENCE`] in all (unlike
/// [`next_frame`], a server pinging every second cannot stretch the wait).
pub async fn next_data(ws: &mut Ws) -> Message {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // Bounded in count too: a test publishes far fewer probes than this.
    for _ in 0..100_000 {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no frame in time")
            .expect("connection ended without a close frame")
            .expect("websocket error");
        match frame {
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Text(t) if t.as_str() == PROBE => {}
            frame => return frame,
        }
    }
    panic!("only probes and pings arrived");
}

/// The next data frame, which must be text (e.g. an ack), as with [`next_data`].
pub async fn next_data_text(ws: &mut Ws) -> String {
    match next_data(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Send a ping and read until its pong: the server has then read every frame sent before.
/// Returns the data frames (probes skipped) that arrived meanwhile.
pub async fn sync(ws: &mut Ws) -> Vec<Message> {
    ws.send(Message::Ping(Bytes::from_static(b"sync")))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut data = Vec::new();
    for _ in 0..100_000 {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no pong in time")
            .expect("connection ended before the pong")
            .expect("websocket error");
        match frame {
            Message::Pong(p) if &p[..] == b"sync" => return data,
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Text(t) if t.as_str() == PROBE => {}
            Message::Close(c) => panic!("closed while waiting for the pong: {c:?}"),
            other => data.push(other),
        }
    }
    panic!("no pong among 100000 frames");
}

/// After the server's close frame: keep polling so the client's answering close frame goes
/// out (tungstenite sends it on the next poll), until the connection ends.
pub async fn finish_close(ws: &mut Ws) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for _ in 0..10_000 {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return,
            Err(_) => panic!("the connection did not end after its close frame"),
        }
    }
    panic!("frames kept coming after the close frame");
}

/// Redis paused with SIGSTOP (it keeps every connection open and answers nothing); resumed
/// with SIGCONT when dropped, also when the test fails.
pub struct Paused(u32);

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "CONT", &self.0.to_string()])
            .status();
    }
}

impl Redis {
    /// SIGSTOP this test's redis-server until the returned guard is dropped.
    pub fn pause(&self) -> Paused {
        let pid = self.child.as_ref().expect("redis is running").id();
        let status = Command::new("kill")
            .args(["-s", "STOP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        Paused(pid)
    }

    /// Send `commands` to Redis in one write, as `redis-cli --pipe` does, and read the
    /// replies (one line each, for commands with integer or status replies).
    pub async fn pipe(&self, commands: &[Vec<&[u8]>]) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let mut wire = Vec::new();
        for args in commands {
            wire.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for arg in args {
                wire.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                wire.extend_from_slice(arg);
                wire.extend_from_slice(b"\r\n");
            }
        }
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        stream.write_all(&wire).await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        for _ in commands {
            let line = tokio::time::timeout(PATIENCE, lines.next_line())
                .await
                .expect("redis did not answer the pipeline")
                .unwrap()
                .expect("redis closed the pipeline");
            assert!(!line.starts_with('-'), "redis: {line}");
        }
    }
}

/// A child's standard error, read line by line as it comes (on a thread of its own), so a
/// test can wait for what the child says instead of sleeping.
pub struct StderrLines {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl StderrLines {
    /// Take over `child`'s piped stderr.
    pub fn read(child: &mut Child) -> StderrLines {
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            // Ends when the child exits and its stderr closes.
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap().push(line);
            }
        });
        StderrLines { lines, reader }
    }

    /// Wait (as [`eventually`] does) until the lines so far satisfy `ok`.
    pub async fn wait_for(&self, what: &str, ok: impl Fn(&[String]) -> bool) {
        let ok = &ok;
        eventually(|| async move {
            let lines = self.lines.lock().unwrap().clone();
            match ok(&lines) {
                true => Ok(()),
                false => Err(format!("stderr never showed {what}: {lines:?}")),
            }
        })
        .await
    }

    /// The lines read so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Everything the child wrote, once it has exited (its stderr is then closed).
    pub fn all(self) -> String {
        let _ = self.reader.join();
        let lines = self.lines.lock().unwrap();
        lines.join("\n")
    }
}

// Raw HTTP for the hostile-input tests (issue 12): what a connection gets back when the server
// refuses it, and whether the server then ends it.

/// Send `request` on a fresh connection and read until the server closes it; returns all it
/// sent. Fails if the connection is still open after [`PATIENCE`] (a refusal must end its
/// connection, not wait for a timeout).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_until_closed(&mut stream).await
}

/// Read from `stream` until the server ends it (EOF or reset), within [`PATIENCE`].
pub async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // Bounded in count: a refusal is a few hundred bytes.
    for _ in 0..10_000 {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&received).into_owned(),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server kept the connection open for {PATIENCE:?}; it had sent {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
    panic!("the server kept sending");
}

/// The status code of a raw HTTP response (0 if there is none).
pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The body of a raw HTTP response.
pub fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Whether a raw HTTP response carries the header `name: value` (both case-insensitive).
pub fn has_header(response: &str, name: &str, value: &str) -> bool {
    let head = response.split_once("\r\n\r\n").map_or(response, |(h, _)| h);
    head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case(name) && v.trim().eq_ignore_ascii_case(value)
        })
    })
}

// Helpers for the hostile-client tests.

/// CPU time (user + system) a process has used so far, from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (in parentheses, which may hold spaces): state is the
    // first, utime and stime the 12th and 13th.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second: u64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / per_second)
}

/// A WebSocket over a plain TCP stream (no TLS wrapper).
pub type RawWs = WebSocketStream<TcpStream>;

/// Connect with a small receive buffer (16 KiB asked), so that what a server manages to push
/// into a client that does not read is mostly what the server's side buffers.
pub async fn connect_small_receive_buffer(url: &str) -> RawWs {
    let addr: SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(url, stream))
        .await
        .unwrap()
        .unwrap();
    ws
}

/// A WebSocket client made by hand on a plain TCP stream, to send what a real client library
/// would refuse to (partial, oversized or broken frames): upgrade `path`, return the stream.
pub async fn raw_upgrade(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // Byte by byte up to the blank line: nothing of the frames behind it is taken.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 4096, "no end to the upgrade response");
        let mut byte = [0u8; 1];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut byte))
            .await
            .expect("no upgrade response in time")
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    stream
}

pub const OP_CONTINUE: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

/// The header of a frame as a client sends it (masked, with a zero key: the payload goes as
/// it is), declaring `len` payload bytes.
pub fn client_header(opcode: u8, fin: bool, len: u64) -> Vec<u8> {
    let mut wire = vec![opcode | if fin { 0x80 } else { 0 }];
    match len {
        0..=125 => wire.push(0x80 | len as u8),
        126..=65_535 => {
            wire.push(0x80 | 126);
            wire.extend((len as u16).to_be_bytes());
        }
        _ => {
            wire.push(0x80 | 127);
            wire.extend(len.to_be_bytes());
        }
    }
    wire.extend([0, 0, 0, 0]);
    wire
}

/// A whole client frame: [`client_header`] and `payload`.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut wire = client_header(opcode, fin, payload.len() as u64);
    wire.extend(payload);
    wire
}

/// The next frame a server sends on a raw stream: its opcode and payload.
pub async fn read_server_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let read = async {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await?;
        let len = match head[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).await?;
                u64::from(u16::from_be_bytes(ext))
            }
            127 => {
                let mut ext = [0u8; 8];
                stream.read_exact(&mut ext).await?;
                u64::from_be_bytes(ext)
            }
            len => u64::from(len),
        };
        let mut payload = vec![0u8; len as usize];
        stream.read_exact(&mut payload).await?;
        Ok::<_, std::io::Error>((head[0] & 0x0f, payload))
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("no frame in time")
        .expect("the connection failed before a whole frame")
}

/// Read a raw stream's frames, answering pings, until its close frame: its code and reason.
/// One deadline for the whole wait ([`PATIENCE`]): pings must not extend it.
pub async fn raw_close_frame(stream: &mut TcpStream) -> (u16, String) {
    let wait = async {
        for _ in 0..10_000 {
            match read_server_frame(stream).await {
                (OP_CLOSE, payload) => {
                    assert!(payload.len() >= 2, "close frame without a code");
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
                }
                (OP_PING, payload) => stream
                    .write_all(&client_frame(OP_PONG, true, &payload))
                    .await
                    .unwrap(),
                _ => {}
            }
        }
        panic!("no close frame among 10000 frames");
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("no close frame in time")
}

/// After the close frame: the server ends the TCP connection cleanly (FIN, not a reset) once
/// it has read what the client sent.
pub async fn ends_cleanly(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    match tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("the connection was reset instead of closed: {e}"),
        Err(_) => panic!("the server did not close the connection"),
    }
}

/// Run `command` to its end (within [`PATIENCE`], else it is killed and the test fails): its
/// exit code, stdout and stderr.
pub async fn run_to_exit(command: &mut Command) -> (Option<i32>, String, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not exit within {PATIENCE:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let read = |pipe: Option<&mut dyn std::io::Read>| {
        let mut text = String::new();
        if let Some(pipe) = pipe {
            pipe.read_to_string(&mut text).unwrap();
        }
        text
    };
    let stdout = read(child.stdout.as_mut().map(|p| p as &mut dyn std::io::Read));
    let stderr = read(child.stderr.as_mut().map(|p| p as &mut dyn std::io::Read));
    (status.code(), stdout, stderr)
}

/// A TCP forwarder between a relay and Redis that the test opens and closes. Closed, it hangs
/// up on every new connection at once, as if Redis were still down; connections already open
/// are left alone (they end when Redis does). It lets a test restart Redis and subscribe a
/// watcher there before the relay can reach it again.
pub struct Gate {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    pub async fn start(redis_port: u16) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let is_open = open.clone();
        tokio::spawn(async move {
            // Bounded: the relay reconnects at most every 100 ms for the length of a test.
            for _ in 0..10_000 {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !is_open.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: hung up
                }
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Gate { port, open }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The repository's root (where Cargo.toml is).
pub fn root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `npm ci` in tests/browser when playwright-core is not there yet (bin/test does it first).
pub fn browser_deps() {
    let dir = root().join("tests/browser");
    if dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir)
        .status()
        .expect("npm must be installed (bin/test installs it)");
    assert!(status.success(), "npm ci in tests/browser failed");
}

/// A text frame's JSON (a `format=json` envelope or a gap notice, SPEC §9).
pub fn json_of(frame: Message) -> serde_json::Value {
    match frame {
        Message::Text(text) => serde_json::from_str(text.as_str()).expect("json"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}
