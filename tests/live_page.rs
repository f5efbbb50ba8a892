//! SPEC §7: the live page, served by the subscribe server, in real headless Chromium.
//!
//! The browser part is `tests/browser/live_page.mjs` (playwright-core driving Debian's
//! `chromium`); this file owns Redis and both servers and does what the script asks over its
//! stdin/stdout: stop the subscribe server, start it again on the same address, wait for the
//! Redis subscription of a path, kill Redis and restart it. The screenshots land in
//! `target/live-page.png` (and `live-page-no-redis.png`: the page while Redis is down).

mod common;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::auth as jwt;
use common::*;

/// The whole browser run, start to end (the script bounds itself at 150 s).
const BROWSER_PATIENCE: Duration = Duration::from_secs(180);

/// A plain request; returns the status line and headers (lower-cased names) and the body.
async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let at = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers")
        + 4;
    let head = String::from_utf8_lossy(&response[..at]).to_lowercase();
    (head, response[at..].to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_server_serves_the_page_and_its_files() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;

    for target in ["/", "/index.html", "/?path=/office&ws=wss://example.test/x"] {
        let (head, body) = get(subscribe.addr, "GET", target).await;
        assert!(head.starts_with("http/1.1 200"), "{target}: {head}");
        assert!(
            head.contains("content-type: text/html; charset=utf-8"),
            "{head}"
        );
        assert!(head.contains("cache-control: no-cache"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert!(head.contains("content-security-policy: "), "{head}");
        let body = String::from_utf8(body).unwrap();
        assert!(
            body.contains("<title>lightrelay"),
            "{target} is not the page"
        );
        for elsewhere in [
            "src=\"http",
            "href=\"http",
            "src=\"//",
            "href=\"//",
            "url(http",
            "url(//",
        ] {
            assert!(
                !body.contains(elsewhere),
                "the page loads nothing from elsewhere"
            );
        }
    }
    let (head, body) = get(subscribe.addr, "GET", "/vendor/uPlot.iife.min.js").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/javascript; charset=utf-8"));
    assert!(head.contains("cache-control: public, max-age="), "{head}");
    assert!(body.starts_with(b"/*! https://github.com/leeoniya/uPlot (v"));
    let (head, _) = get(subscribe.addr, "GET", "/vendor/uPlot.min.css?v=1").await;
    assert!(
        head.contains("content-type: text/css; charset=utf-8"),
        "{head}"
    );
    let (head, body) = get(subscribe.addr, "GET", "/vendor/uPlot.LICENSE.txt").await;
    assert!(head.contains("content-type: text/plain"), "{head}");
    assert!(String::from_utf8(body).unwrap().contains("MIT License"));
    let (head, body) = get(subscribe.addr, "HEAD", "/").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body.is_empty());

    // Other paths stay WebSocket endpoints; the publish server has no page.
    for (server, target) in [
        (&subscribe, "/office"),
        (&subscribe, "/vendor/"),
        (&publish, "/"),
        (&publish, "/index.html"),
        (&publish, "/vendor/uPlot.iife.min.js"),
    ] {
        let (head, _) = get(server.addr, "GET", target).await;
        assert!(head.starts_with("http/1.1 426"), "{target}: {head}");
    }
    let (status, _) = http(subscribe.addr, "POST", "/", &[], b"1").await;
    assert_eq!(status, 426, "the page is GET only");

    // `/` is still a channel path for WebSocket clients of the subscribe server.
    let mut ws = connect(&subscribe.ws("/")).await;
    redis.wait_numsub("lightlevel/", 1).await;
    redis.publish("lightlevel/", "root").await;
    assert_eq!(next_text(&mut ws).await, "root");
}

#[tokio::test(flavor = "multi_thread")]
async fn live_page_in_headless_chromium() {
    browser_deps();
    let mut redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    // The subscribe server's /healthz sees a dead Redis within a ping interval (SPEC §5): 1 s,
    // for the page's Redis state in step 7.
    let flags = ["--ping-interval", "1s"];
    let mut subscribe = Some(Server::start(Kind::Subscribe, &redis.url(), &flags).await);
    let subscribe_addr = subscribe.as_ref().unwrap().addr;

    let target = root().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let screenshot: PathBuf = target.join("live-page.png");
    let phone: PathBuf = target.join("live-page-phone.png");
    let _ = std::fs::remove_file(&screenshot);

    let args: Vec<OsString> = vec![
        "--subscribe".into(),
        format!("http://{subscribe_addr}").into(),
        "--publish".into(),
        format!("http://{}", publish.addr).into(),
        "--screenshot".into(),
        screenshot.clone().into(),
        "--phone-screenshot".into(),
        phone.into(),
    ];
    let passed = run_browser(&args, async |command: &str, arg: &str| match command {
        "subscribed" => redis.wait_numsub(&format!("lightlevel{arg}"), 1).await,
        "stop-subscribe" => drop(subscribe.take().expect("already stopped")),
        "stop-redis" => redis.kill(),
        "start-redis" => redis.restart().await,
        "start-subscribe" => {
            assert!(subscribe.is_none(), "already running");
            subscribe =
                Some(Server::start_at(Kind::Subscribe, subscribe_addr, &redis.url(), &flags).await);
        }
        other => panic!("unknown request from the browser test: {other:?}"),
    })
    .await;
    assert!(passed.starts_with("PASS live page: "), "{passed}");

    let png = std::fs::read(&screenshot).expect("no screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is not a PNG"
    );
    assert!(png.len() > 20_000, "the screenshot looks empty");
    println!("screenshot: {}", screenshot.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn live_page_with_a_token_in_headless_chromium() {
    browser_deps();
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let (subscribe, dir) =
        jwt::server_with_auth(Kind::Subscribe, &redis.url(), "all", "live-page-token").await;
    let token = jwt::token(&[], &["/live-page-*"]);
    let args: Vec<OsString> = vec![
        "--subscribe".into(),
        format!("http://{}", subscribe.addr).into(),
        "--publish".into(),
        format!("http://{}", publish.addr).into(),
        "--token".into(),
        token.into(),
    ];
    let passed = run_browser(&args, async |command: &str, arg: &str| match command {
        "subscribed" => redis.wait_numsub(&format!("lightlevel{arg}"), 1).await,
        other => panic!("unknown request from the browser test: {other:?}"),
    })
    .await;
    assert!(
        passed.starts_with("PASS live page with tokens: "),
        "{passed}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn live_page_opens_with_the_latest_retained_value_and_resumes_after_a_restart() {
    browser_deps();
    let redis = Redis::start().await;
    let flags = ["--history", "100"];
    let publish = Server::start(Kind::Publish, &redis.url(), &flags).await;
    let mut subscribe = Some(Server::start(Kind::Subscribe, &redis.url(), &flags).await);
    let subscribe_addr = subscribe.as_ref().unwrap().addr;
    let args: Vec<OsString> = vec![
        "--subscribe".into(),
        format!("http://{subscribe_addr}").into(),
        "--publish".into(),
        format!("http://{}", publish.addr).into(),
        "--history".into(),
    ];
    let passed = run_browser(&args, async |command: &str, arg: &str| match command {
        "subscribed" => redis.wait_numsub(&format!("lightlevel{arg}"), 1).await,
        "stop-subscribe" => drop(subscribe.take().expect("already stopped")),
        "start-subscribe" => {
            assert!(subscribe.is_none(), "already running");
            subscribe =
                Some(Server::start_at(Kind::Subscribe, subscribe_addr, &redis.url(), &flags).await);
        }
        other => panic!("unknown request from the browser test: {other:?}"),
    })
    .await;
    assert!(
        passed.starts_with("PASS live page with history: "),
        "{passed}"
    );
}

/// Run tests/browser/live_page.mjs with `args`, doing what it asks (`@COMMAND ARG` lines) with
/// `handle` and answering `ok`; returns its `PASS …` line.
async fn run_browser(args: &[OsString], mut handle: impl AsyncFnMut(&str, &str)) -> String {
    let mut node = Command::new("node")
        .arg(root().join("tests/browser/live_page.mjs"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node must be installed (bin/test installs it)");
    let mut to_node = node.stdin.take().unwrap();
    let from_node = node.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from_node).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = tokio::time::Instant::now() + BROWSER_PATIENCE;
    let mut passed = None;
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(_) => {
                let _ = node.kill();
                let _ = node.wait();
                panic!("the browser test ran longer than {BROWSER_PATIENCE:?}");
            }
        };
        println!("{line}");
        let Some(command) = line.strip_prefix('@') else {
            if line.starts_with("PASS") {
                passed = Some(line);
            }
            continue;
        };
        let (command, arg) = command.split_once(' ').unwrap_or((command, ""));
        handle(command, arg).await;
        writeln!(to_node, "ok").unwrap();
        to_node.flush().unwrap();
    }
    let status = node.wait().unwrap();
    assert!(status.success(), "the browser test failed: {status}");
    passed.expect("the browser test did not say PASS")
}
