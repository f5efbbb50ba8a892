//! SPEC §6: the `lightrelay` client. `pub` resends what was not acknowledged and loses
//! nothing across a relay restart; `sub` prints one line per message; ws:// and wss://.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::auth as jwt;
use common::*;
use tokio::net::{TcpListener, TcpStream};

fn lightrelay(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lightrelay"));
    command.args(args);
    command
}

fn spawn_pub(args: &[&str]) -> Child {
    lightrelay(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn spawn_sub(args: &[&str]) -> Child {
    lightrelay(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait for a child to exit; returns (code, stdout, stderr).
async fn finish(child: Child) -> (Option<i32>, Vec<u8>, String) {
    let pid = child.id().to_string();
    let waited = tokio::time::timeout(
        PATIENCE,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let Ok(output) = waited else {
        // Not left running (the test's runtime would wait for it): killed by its PID.
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        panic!("client did not exit in time");
    };
    let output = output.unwrap().unwrap();
    (
        output.status.code(),
        output.stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Assert the watcher's next messages are exactly `expected`, then that nothing else came
/// (a marker published afterwards is the very next message).
async fn expect_exactly(
    redis: &Redis,
    watcher: &mut RedisWatcher,
    channel: &str,
    expected: &[String],
) {
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(watcher.next().await, want.as_bytes(), "message {i}");
    }
    redis.publish(channel, "end-marker").await;
    assert_eq!(
        &watcher.next().await[..],
        b"end-marker",
        "an extra (duplicated) message arrived"
    );
}

#[tokio::test]
async fn pub_sends_each_input_line_as_one_message_and_exits_0_once_all_are_acknowledged() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe("lightlevel/office").await;
    let mut client = spawn_pub(&["pub", &publish.ws("/office")]);
    let mut expected: Vec<String> = (0..500).map(|i| format!("{}", 400 + i)).collect();
    expected.extend([
        "".to_string(),
        "crlf line".to_string(),
        "last line without newline".to_string(),
    ]);
    let mut input = String::new();
    for line in &expected[..500] {
        input.push_str(line);
        input.push('\n');
    }
    input.push_str("\ncrlf line\r\nlast line without newline");
    client
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    expect_exactly(&redis, &mut watcher, "lightlevel/office", &expected).await;
}

#[tokio::test]
async fn pub_loses_and_duplicates_nothing_across_a_relay_restart() {
    let redis = Redis::start().await;
    let mut publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let addr = publish.addr;
    let mut watcher = redis.subscribe("lightlevel/pi").await;
    let mut client = spawn_pub(&["pub", &publish.ws("/pi")]);
    let mut stdin = client.stdin.take().unwrap();
    let lines: Vec<String> = (0..300).map(|i| format!("reading {i}")).collect();

    for line in &lines[..100] {
        writeln!(stdin, "{line}").unwrap();
    }
    for line in &lines[..100] {
        assert_eq!(watcher.next().await, line.as_bytes());
    }
    publish.signal("TERM");
    assert_eq!(publish.wait_exit().await, Some(0));
    for line in &lines[100..200] {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(publish);
    let _restarted = Server::start_at(Kind::Publish, addr, &redis.url(), &[]).await;
    for line in &lines[200..] {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    expect_exactly(&redis, &mut watcher, "lightlevel/pi", &lines[100..]).await;
}

#[tokio::test]
async fn pub_keeps_the_newest_buffer_messages_while_disconnected_and_reports_the_drop() {
    let redis = Redis::start().await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut watcher = redis.subscribe("lightlevel/late").await;
    let mut client = spawn_pub(&["pub", "--buffer", "10", &format!("ws://{addr}/late")]);
    let lines: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    let mut stdin = client.stdin.take().unwrap();
    for line in &lines {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    // Nothing listens yet: the client retries with back-off and reads its input meanwhile.
    // Two retries in a row with the buffer full: a whole wait passed between them with all
    // the input ready to read.
    let stderr = StderrLines::read(&mut client);
    stderr
        .wait_for("two retries with a full buffer", |lines| {
            let full = |l: &String| l.contains("10 unacknowledged, retrying");
            lines.windows(2).any(|w| full(&w[0]) && full(&w[1]))
        })
        .await;
    let _publish = Server::start_at(Kind::Publish, addr, &redis.url(), &[]).await;
    let (code, _, _) = finish(client).await;
    let stderr = stderr.all();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(
        stderr.contains("dropped the 40 oldest messages"),
        "stderr: {stderr}"
    );
    expect_exactly(&redis, &mut watcher, "lightlevel/late", &lines[40..]).await;
}

#[tokio::test]
async fn pub_binary_sends_each_file_as_one_binary_message_byte_exact() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe("lightlevel/cam").await;
    let dir = std::env::temp_dir().join(format!("lightrelay-client-test-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let still: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let tiny = vec![0xffu8, 0x00, b'\n'];
    std::fs::write(dir.join("a.jpg"), &still).unwrap();
    std::fs::write(dir.join("b.bin"), &tiny).unwrap();
    let (a, b) = (dir.join("a.jpg"), dir.join("b.bin"));
    let client = lightrelay(&[
        "pub",
        &publish.ws("/cam"),
        "--binary",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(&watcher.next().await[..], &still[..]);
    assert_eq!(&watcher.next().await[..], &tiny[..]);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn sub_prints_one_line_per_message_with_binary_as_base64_and_stops_after_count() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let client = spawn_sub(&["sub", "--count", "3", &subscribe.ws("/office")]);
    redis.wait_numsub("lightlevel/office", 1).await;
    redis.publish("lightlevel/office", "hello").await;
    redis
        .publish("lightlevel/office", vec![0u8, 1, 2, 255])
        .await;
    redis.publish("lightlevel/office", "42").await;
    redis.publish("lightlevel/office", "not printed").await;
    let (code, stdout, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(String::from_utf8(stdout).unwrap(), "hello\nAAEC/w==\n42\n");
}

#[tokio::test]
async fn sub_raw_writes_binary_payloads_unchanged() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let client = spawn_sub(&["sub", "--raw", "--count", "1", &subscribe.ws("/cam")]);
    redis.wait_numsub("lightlevel/cam", 1).await;
    let frame: Vec<u8> = vec![0xff, 0xd8, 0xff, 0x00, b'\n', 0xd9];
    redis.publish("lightlevel/cam", frame.clone()).await;
    let (code, stdout, _) = finish(client).await;
    assert_eq!(code, Some(0));
    assert_eq!(stdout, frame);
}

#[tokio::test]
async fn sub_reconnects_after_a_relay_restart_and_once_exits_when_the_relay_stops() {
    let redis = Redis::start().await;
    let mut subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let addr = subscribe.addr;
    let again = spawn_sub(&["sub", "--count", "2", &subscribe.ws("/r")]);
    let once = spawn_sub(&["sub", "--once", &subscribe.ws("/r1")]);
    // Both channels subscribed in Redis (each client is answered once its channel is).
    subscribe
        .wait_metric("lightrelay_channels", |n| n >= 2.0)
        .await;
    redis.publish("lightlevel/r", "before").await;
    redis.publish("lightlevel/r1", "before").await;
    // Both written to their clients before the stop: what is still on its way from Redis
    // when SIGTERM comes is not delivered.
    subscribe
        .wait_metric("lightrelay_messages_total{direction=\"ws_out\"}", |n| {
            n >= 2.0
        })
        .await;
    subscribe.signal("TERM");
    assert_eq!(subscribe.wait_exit().await, Some(0));
    drop(subscribe);

    let (code, stdout, stderr) = finish(once).await;
    assert_eq!(
        code,
        Some(0),
        "a 1001 going-away close is a normal end: {stderr}"
    );
    assert_eq!(stdout, b"before\n");
    assert!(stderr.contains("1001"), "stderr: {stderr}");

    let _restarted = Server::start_at(Kind::Subscribe, addr, &redis.url(), &[]).await;
    redis.wait_numsub("lightlevel/r", 1).await;
    redis.publish("lightlevel/r", "after").await;
    let (code, stdout, stderr) = finish(again).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stdout, b"before\nafter\n");
}

#[tokio::test]
async fn bad_usage_exits_2_with_the_problem_on_the_first_line() {
    for args in [
        &["pub", "http://example"][..],
        &["sub", "ws://"],
        &["sub"],
        &["frobnicate"],
        &["sub", "--count", "x", "ws://h/p"],
        &["sub", "--token", "", "ws://h/p"],
        &["pub", "--token", "two words", "ws://h/p"],
    ] {
        let output = lightrelay(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
        // A refused token is never repeated (clap's own errors quote the value).
        assert!(!stderr.contains("two words"), "{args:?}: {stderr}");
    }
    let help = lightrelay(&["--help"]).output().unwrap();
    assert_eq!(help.status.code(), Some(0));
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("Examples:") && help.contains("lightrelay pub"),
        "{help}"
    );
}

/// The first line of `stderr` that says why the client gave up, for the refusal tests.
fn refusal_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.contains("refused"))
        .unwrap_or_else(|| panic!("no refusal on stderr: {stderr}"))
}

#[tokio::test]
async fn pub_sends_its_token_and_a_401_or_403_exits_1_at_once_with_the_servers_reason() {
    let redis = Redis::start().await;
    let (publish, dir) =
        jwt::server_with_auth(Kind::Publish, &redis.url(), "publish", "client-token").await;
    let mut watcher = redis.subscribe("lightlevel/pi/lux").await;
    let good = jwt::token(&["/pi/*"], &[]);

    // --token: published and acknowledged.
    let mut client = spawn_pub(&["pub", "--token", &good, &publish.ws("/pi/lux")]);
    client.stdin.take().unwrap().write_all(b"417\n").unwrap();
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(&watcher.next().await[..], b"417");

    // Refusals end the client at once (it would otherwise retry for ever), in one line that
    // gives the status and the server's reason, never the token.
    let forged = jwt::token_with("not-the-servers-secret", &["/pi/*"], &[]);
    let elsewhere = jwt::token(&["/office"], &[]);
    for (token, status) in [
        (None, "401"),
        (Some(&forged), "401"),
        (Some(&elsewhere), "403"),
    ] {
        let mut args = vec!["pub"];
        if let Some(token) = token {
            args.extend(["--token", token.as_str()]);
        }
        let url = publish.ws("/pi/lux");
        args.push(&url);
        let mut client = spawn_pub(&args);
        // Input stays open: only the refusal can end the client.
        let stdin = client.stdin.take().unwrap();
        let (code, _, stderr) = finish(client).await;
        drop(stdin);
        assert_eq!(code, Some(1), "{token:?}: {stderr}");
        let line = refusal_line(&stderr);
        assert!(line.contains(&format!("HTTP {status}")), "{line}");
        let reason = line.split(&format!("HTTP {status}")).nth(1).unwrap();
        assert!(
            reason.split_whitespace().count() > 2,
            "the server's reason is shown: {line}"
        );
        assert!(!stderr.contains("retrying"), "{stderr}");
        if let Some(token) = token {
            assert!(
                !stderr.contains(token.as_str()),
                "the token was printed: {stderr}"
            );
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn sub_takes_its_token_from_the_environment_and_a_401_exits_1_at_once() {
    let redis = Redis::start().await;
    let (subscribe, dir) =
        jwt::server_with_auth(Kind::Subscribe, &redis.url(), "all", "client-sub-token").await;
    let token = jwt::token(&[], &["/office"]);
    let client = lightrelay(&["sub", "--count", "1", &subscribe.ws("/office")])
        .env("LIGHTRELAY_TOKEN", &token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    redis.wait_numsub("lightlevel/office", 1).await;
    redis.publish("lightlevel/office", "417").await;
    let (code, stdout, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stdout, b"417\n");

    // Without a token (and without --once): exit 1, not a reconnect loop.
    let client = spawn_sub(&["sub", &subscribe.ws("/office")]);
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(refusal_line(&stderr).contains("HTTP 401"), "{stderr}");
    assert!(!stderr.contains("retrying"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A TLS terminator in front of a relay, with a throwaway self-signed certificate.
async fn tls_proxy(backend: std::net::SocketAddr) -> (u16, std::path::PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let base = std::env::temp_dir().join(format!("lightrelay-test-ca-{}", free_port()));
    let (pem, key) = (base.with_extension("pem"), base.with_extension("key"));
    std::fs::write(&pem, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.key_pair.serialize_pem()).unwrap();
    (tls_proxy_with(&pem, &key, backend).await, pem)
}

#[tokio::test]
async fn wss_works_with_a_self_signed_certificate_given_with_ca_and_fails_without() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let (port, pem) = tls_proxy(publish.addr).await;
    let url = format!("wss://127.0.0.1:{port}/secure");
    let mut watcher = redis.subscribe("lightlevel/secure").await;

    let untrusted = spawn_sub(&["sub", "--once", &url]);
    let (code, _, stderr) = finish(untrusted).await;
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "stderr: {stderr}"
    );

    let mut client = spawn_pub(&["pub", "--ca", pem.to_str().unwrap(), &url]);
    client
        .stdin
        .take()
        .unwrap()
        .write_all(b"over tls\n")
        .unwrap();
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(&watcher.next().await[..], b"over tls");
    let _ = std::fs::remove_file(pem);
}

/// The README's `openssl` recipe for a self-signed certificate, run as written in `dir`;
/// returns the certificate and key files it made.
fn readme_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("# a self-signed certificate for relay.local")
        .expect("the README's certificate recipe");
    let block = &readme[start..];
    let block = &block[..block.find("```").unwrap()];
    // The block is indented under its list item.
    let script: String = block
        .lines()
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    assert!(script.contains("openssl req -x509"), "{script}");
    let status = Command::new("sh")
        .args(["-e", "-c", &script])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the README's openssl recipe failed:\n{script}"
    );
    (dir.join("relay.pem"), dir.join("relay.key"))
}

/// A TLS terminator presenting `cert` (PEM, with its `key`) in front of `backend`.
async fn tls_proxy_with(
    cert: &std::path::Path,
    key: &std::path::Path,
    backend: std::net::SocketAddr,
) -> u16 {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        for _ in 0..16 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut upstream = TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    port
}

/// The lines a failed client wrote: exactly one, and no retry.
fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, no retry: {stderr}");
    assert!(!stderr.contains("retrying"), "{stderr}");
    lines[0]
}

#[tokio::test]
async fn the_readmes_openssl_certificate_works_with_ca_and_certificate_errors_are_final() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let dir = temp_dir("client-openssl");
    let (cert, key) = readme_certificate(&dir);
    let port = tls_proxy_with(&cert, &key, publish.addr).await;
    let ca = cert.to_str().unwrap();
    let mut watcher = redis.subscribe("lightlevel/lan").await;

    // The certificate openssl makes by default (CA flag set) is accepted as the server's own.
    let mut client = spawn_pub(&["pub", "--ca", ca, &format!("wss://127.0.0.1:{port}/lan")]);
    client
        .stdin
        .take()
        .unwrap()
        .write_all(b"over tls\n")
        .unwrap();
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(&watcher.next().await[..], b"over tls");

    // Still checked: the name. `localhost` is not in the certificate: final, one sentence.
    let client = spawn_sub(&["sub", "--ca", ca, &format!("wss://localhost:{port}/lan")]);
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        one_line(&stderr).contains("not for this host name"),
        "{stderr}"
    );

    // Without --ca (and without --once): final too, saying what to do.
    let client = spawn_sub(&["sub", &format!("wss://127.0.0.1:{port}/lan")]);
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(one_line(&stderr).contains("--ca"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A plain HTTP server that answers every request with `status` (and `Location` for a
/// redirect), for the refusals a relay does not make itself.
async fn answering(status: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..32 {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = 0;
                while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") && got < buf.len() {
                    match tcp.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                let body = "the answer of this test server\n";
                let answer = format!(
                    "HTTP/1.1 {status}\r\nlocation: ws://elsewhere/\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn permanent_refusals_exit_1_in_one_line_and_transient_ones_are_retried() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;

    // 400 from the relay itself: a path over --max-path-bytes.
    let long = format!("/{}", "x".repeat(300));
    for command in ["pub", "sub"] {
        let mut client = if command == "pub" {
            spawn_pub(&["pub", &publish.ws(&long)])
        } else {
            spawn_sub(&["sub", &publish.ws(&long)])
        };
        let stdin = client.stdin.take();
        let (code, _, stderr) = finish(client).await;
        drop(stdin);
        assert_eq!(code, Some(1), "{command}: {stderr}");
        assert!(
            one_line(&stderr).contains("HTTP 400"),
            "{command}: {stderr}"
        );
    }

    // 404 and a redirect from another server.
    for (status, says) in [
        ("404 Not Found", "HTTP 404"),
        ("301 Moved Permanently", "ws://elsewhere/"),
    ] {
        let addr = answering(status).await;
        let client = spawn_sub(&["sub", &format!("ws://{addr}/office")]);
        let (code, _, stderr) = finish(client).await;
        assert_eq!(code, Some(1), "{status}: {stderr}");
        assert!(one_line(&stderr).contains(says), "{status}: {stderr}");
    }

    // wss:// to the relay's plain port.
    let client = spawn_sub(&["sub", &format!("wss://{}/office", publish.addr)]);
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(one_line(&stderr).contains("plain ws:// port"), "{stderr}");

    // 503 (a relay over its limit) is transient: retried.
    let addr = answering("503 Service Unavailable").await;
    let mut client = spawn_sub(&["sub", &format!("ws://{addr}/office")]);
    let stderr = StderrLines::read(&mut client);
    stderr
        .wait_for("two retries after 503", |lines| {
            lines
                .iter()
                .filter(|l| l.contains("HTTP 503") && l.contains("retrying"))
                .count()
                >= 2
        })
        .await;
    let _ = Command::new("kill")
        .args(["-KILL", &client.id().to_string()])
        .status();
    let _ = client.wait();
}

#[tokio::test]
async fn sub_at_the_publish_port_and_pub_at_a_subscribe_server_exit_1_saying_so() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;

    let client = spawn_sub(&["sub", &publish.ws("/office")]);
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(one_line(&stderr).contains("publish server"), "{stderr}");

    // Input stays open: only the refusal can end the client.
    let mut client = spawn_pub(&["pub", &subscribe.ws("/office")]);
    let stdin = client.stdin.take();
    let (code, _, stderr) = finish(client).await;
    drop(stdin);
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("subscribe server") && last.contains("--accept-publish"),
        "{stderr}"
    );
    assert!(!stderr.contains("retrying"), "{stderr}");
}

/// A WebSocket server that is not a relay: selects no subprotocol, keeps what it receives.
async fn plain_websocket_server() -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<String>) {
    use futures_util::StreamExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        for _ in 0..8 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                        let _ = tx.send(text.to_string()).await;
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn pub_goes_on_without_acks_where_the_server_selects_none_and_no_ack_asks_for_that() {
    let (addr, mut received) = plain_websocket_server().await;
    for no_ack in [false, true] {
        let mut args = vec!["pub"];
        if no_ack {
            args.push("--no-ack");
        }
        let url = format!("ws://{addr}/elsewhere");
        args.push(&url);
        let mut client = spawn_pub(&args);
        client
            .stdin
            .take()
            .unwrap()
            .write_all(b"one\ntwo\nthree\n")
            .unwrap();
        let (code, _, stderr) = finish(client).await;
        assert_eq!(code, Some(0), "--no-ack {no_ack}: {stderr}");
        for want in ["one", "two", "three"] {
            let got = tokio::time::timeout(PATIENCE, received.recv())
                .await
                .unwrap();
            assert_eq!(got.as_deref(), Some(want), "--no-ack {no_ack}");
        }
        let said = stderr.matches("without acknowledgements").count();
        assert_eq!(
            said,
            if no_ack { 0 } else { 1 },
            "said once, or not at all: {stderr}"
        );
        assert!(!stderr.contains("retrying"), "{stderr}");
    }

    // --no-ack against the relay itself publishes too.
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe("lightlevel/na").await;
    let mut client = spawn_pub(&["pub", "--no-ack", &publish.ws("/na")]);
    client.stdin.take().unwrap().write_all(b"417\n").unwrap();
    let (code, _, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(&watcher.next().await[..], b"417");
}

#[tokio::test]
async fn pub_exits_1_when_the_server_closes_with_1009_instead_of_resending_for_ever() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &["--max-message-bytes", "16"]).await;
    let mut client = spawn_pub(&["pub", &publish.ws("/big")]);
    let mut stdin = client.stdin.take().unwrap();
    writeln!(stdin, "{}", "x".repeat(100)).unwrap();
    let (code, _, stderr) = finish(client).await;
    drop(stdin);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(one_line(&stderr).contains("1009"), "{stderr}");
}

/// POST `body` on `path` of the publish server; asserts 200.
async fn post(publish: &Server, path: &str, body: &str) {
    let (status, answer) = http(publish.addr, "POST", path, &[], body.as_bytes()).await;
    assert_eq!(
        status,
        200,
        "POST {path}: {}",
        String::from_utf8_lossy(&answer)
    );
}

/// Both servers keep history (SPEC §9).
const HISTORY: [&str; 2] = ["--history", "1000"];

#[tokio::test]
async fn sub_last_prints_that_many_retained_messages_then_the_live_ones() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &HISTORY).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &HISTORY).await;
    for n in 1..=5 {
        post(&publish, "/office", &n.to_string()).await;
    }
    let client = spawn_sub(&[
        "sub",
        "--last",
        "3",
        "--count",
        "5",
        &subscribe.ws("/office"),
    ]);
    redis.wait_numsub("lightlevel/office", 1).await;
    for n in 6..=7 {
        post(&publish, "/office", &n.to_string()).await;
    }
    let (code, stdout, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(String::from_utf8(stdout).unwrap(), "3\n4\n5\n6\n7\n");
}

#[tokio::test]
async fn sub_json_prints_each_envelope_as_received() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &HISTORY).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &HISTORY).await;
    let client = spawn_sub(&["sub", "--json", "--count", "2", &subscribe.ws("/office")]);
    redis.wait_numsub("lightlevel/office", 1).await;
    post(&publish, "/office", "42").await;
    // A plain PUBLISH (no history id), not UTF-8.
    redis
        .publish("lightlevel/office", vec![0u8, 1, 2, 255])
        .await;
    let (code, stdout, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let stdout = String::from_utf8(stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0]["channel"], "lightlevel/office", "{stdout}");
    assert_eq!(lines[0]["data"], "42", "{stdout}");
    let id = lines[0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {stdout}"));
    let (ms, seq) = id.split_once('-').unwrap();
    assert!(
        ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok(),
        "{id}"
    );
    assert_eq!(lines[1]["id"], serde_json::Value::Null, "{stdout}");
    assert_eq!(lines[1]["data"], "AAEC/w==", "{stdout}");
    assert_eq!(lines[1]["encoding"], "base64", "{stdout}");
}

/// A publisher POSTing "0", "1", … `total - 1` on `path`, one every few milliseconds; the
/// returned counter says how many were answered.
fn numbered_publisher(
    publish: &Server,
    path: &'static str,
    total: usize,
) -> (
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let addr = publish.addr;
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(4));
        for n in 0..total {
            tick.tick().await;
            let (status, _) = http(addr, "POST", path, &[], n.to_string().as_bytes()).await;
            assert_eq!(status, 200, "POST {n}");
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (sent, task)
}

async fn sent_at_least(sent: &std::sync::atomic::AtomicUsize, n: usize) {
    eventually(|| async move {
        match sent.load(std::sync::atomic::Ordering::SeqCst) {
            now if now >= n => Ok(()),
            now => Err(format!("the publisher stayed at {now} of {n}")),
        }
    })
    .await
}

#[tokio::test]
async fn sub_resumes_after_a_subscribe_server_restart_with_nothing_missed_or_printed_twice() {
    const TOTAL: usize = 400;
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &HISTORY).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &HISTORY).await;
    let addr = subscribe.addr;
    let client = spawn_sub(&["sub", "--count", &TOTAL.to_string(), &subscribe.ws("/seq")]);
    redis.wait_numsub("lightlevel/seq", 1).await;
    let (sent, publisher) = numbered_publisher(&publish, "/seq", TOTAL);

    // Some printed, then the subscribe server is gone (SIGKILL) while the publisher goes on.
    subscribe
        .wait_metric("lightrelay_messages_total{direction=\"ws_out\"}", |n| {
            n >= 50.0
        })
        .await;
    let before = sent.load(std::sync::atomic::Ordering::SeqCst);
    drop(subscribe);
    sent_at_least(&sent, before + 50).await;
    let _restarted = Server::start_at(Kind::Subscribe, addr, &redis.url(), &HISTORY).await;
    publisher.await.unwrap();

    let (code, stdout, stderr) = finish(client).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let expected: String = (0..TOTAL).map(|n| format!("{n}\n")).collect();
    assert_eq!(
        String::from_utf8(stdout).unwrap(),
        expected,
        "stderr: {stderr}"
    );
    assert!(!stderr.contains("gap"), "stderr: {stderr}");
}

#[tokio::test]
async fn sub_reports_a_gap_on_stderr_when_what_it_missed_is_no_longer_retained() {
    // MAXLEN ~ 5 trims whole stream nodes (100 entries by default): 300 published while the
    // client is away leave its last id far behind what is retained.
    let flags = ["--history", "5"];
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &flags).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &flags).await;
    let addr = subscribe.addr;
    let mut client = spawn_sub(&["sub", &subscribe.ws("/trim")]);
    let stderr = StderrLines::read(&mut client);
    redis.wait_numsub("lightlevel/trim", 1).await;
    post(&publish, "/trim", "first").await;
    subscribe
        .wait_metric("lightrelay_messages_total{direction=\"ws_out\"}", |n| {
            n >= 1.0
        })
        .await;
    drop(subscribe);
    for n in 0..300 {
        post(&publish, "/trim", &n.to_string()).await;
    }
    let _restarted = Server::start_at(Kind::Subscribe, addr, &redis.url(), &flags).await;
    stderr
        .wait_for("the gap line", |lines| {
            lines.iter().any(|l| {
                l.starts_with("lightrelay: gap: messages after ")
                    && l.contains("are no longer retained (oldest retained: ")
            })
        })
        .await;
    redis.wait_numsub("lightlevel/trim", 1).await;
    post(&publish, "/trim", "last").await;
    // Stopped by its PID once "last" is printed (it would reconnect for ever).
    let mut stdout = client.stdout.take().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(&mut stdout).lines() {
            let line = line.unwrap();
            let done = line == "last";
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    let printed = tokio::time::timeout(PATIENCE, printed).await;
    let _ = client.kill();
    let _ = client.wait();
    let printed = printed.expect("\"last\" was never printed").unwrap();
    // No gap frame on stdout: "first", then the retained tail in order, then "last".
    assert_eq!(
        printed.first().map(String::as_str),
        Some("first"),
        "{printed:?}"
    );
    assert_eq!(
        printed.last().map(String::as_str),
        Some("last"),
        "{printed:?}"
    );
    let middle: Vec<u32> = printed[1..printed.len() - 1]
        .iter()
        .map(|l| l.parse().unwrap_or_else(|_| panic!("{l:?} in {printed:?}")))
        .collect();
    assert!(!middle.is_empty() && middle.len() < 300, "{printed:?}");
    assert!(middle.windows(2).all(|w| w[1] == w[0] + 1), "{middle:?}");
    assert_eq!(middle.last(), Some(&299), "{printed:?}");
}
