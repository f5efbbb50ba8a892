//! What the servers say on stderr (SPEC §5 "Logs"), and that they stop without it: a Redis
//! never reached is reported at once and then only as reminders, colour only on a terminal,
//! clients' comings and goings at debug, a periodic summary at info, and SIGTERM obeyed with
//! stderr a closed pipe.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A server started with its stderr piped to the test, with `RUST_LOG=rust_log`, no
/// `NO_COLOR`, and `extra` flags; SIGKILLed when dropped.
fn start_logged(kind: Kind, redis_url: &str, rust_log: &str, extra: &[&str]) -> Server {
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = command(kind, addr, redis_url, rust_log, extra)
        .spawn()
        .unwrap();
    Server::adopt(child, addr)
}

fn command(
    kind: Kind,
    addr: std::net::SocketAddr,
    redis_url: &str,
    rust_log: &str,
    extra: &[&str],
) -> Command {
    let mut command = server_command(kind);
    command
        .args(["--listen", &addr.to_string(), "--redis-url", redis_url])
        .args(extra)
        .env("RUST_LOG", rust_log)
        .env_remove("NO_COLOR")
        .env_remove("LIGHTRELAY_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

async fn wait_healthy(addr: std::net::SocketAddr) {
    wait_for_port(addr.port()).await;
    eventually(|| async move {
        match http(addr, "GET", "/healthz", &[], b"").await.0 {
            200 => Ok(()),
            status => Err(format!("/healthz {status}")),
        }
    })
    .await;
}

fn count(lines: &[String], what: &str) -> usize {
    lines.iter().filter(|line| line.contains(what)).count()
}

#[tokio::test]
async fn a_redis_never_reached_is_reported_at_once_then_only_as_reminders_and_when_reached() {
    // A port nothing listens on (yet), a URL with a password, and eight publish connections
    // failing together.
    let port = quiet_port();
    let url = format!("redis://default:secret@127.0.0.1:{port}");
    let mut server = start_logged(Kind::Publish, &url, "info", &["--redis-connections", "8"]);
    let stderr = StderrLines::read(server.child());
    let shown = format!("redis://***@127.0.0.1:{port}");
    stderr
        .wait_for("the first failure to connect, with the URL", |lines| {
            lines.iter().any(|l| {
                l.contains("WARN") && l.contains("cannot connect to Redis") && l.contains(&shown)
            })
        })
        .await;
    // A window to see that no flood follows (this observes, it does not synchronise): the
    // connections retry many times a second, the first reminder is due after 10 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lines = stderr.lines();
    assert!(
        count(&lines, "WARN") <= 2,
        "more than a line and a reminder in 5 s:\n{}",
        lines.join("\n")
    );
    assert!(!lines.iter().any(|l| l.contains("secret")), "{lines:?}");

    let _redis = Redis::start_on(port).await;
    stderr
        .wait_for("a line when Redis is reached", |lines| {
            lines.iter().any(|l| {
                l.contains("connected to Redis") && l.contains(&shown) && l.contains("after=")
            })
        })
        .await;
    wait_healthy(server.addr).await;
}

#[tokio::test]
async fn with_stderr_a_closed_pipe_sigterm_still_stops_the_server_with_exit_0() {
    let redis = Redis::start().await;
    for kind in [Kind::Publish, Kind::Subscribe] {
        // Debug logging, so that every request writes to stderr.
        let mut server = start_logged(kind, &redis.url(), "debug", &[]);
        // Like `… 2>&1 | head`: stderr is read until told to stop, then closed.
        let stderr = server.child().stderr.take().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = std::thread::spawn({
            let stop = stop.clone();
            move || {
                use std::io::BufRead;
                let mut lines = std::io::BufReader::new(stderr).lines();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if lines.next().is_none() {
                        return;
                    }
                }
            }
        });
        wait_healthy(server.addr).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // The next line read ends the reader, and stderr becomes a broken pipe. A client
        // coming and going makes lines (at debug).
        let url = format!("ws://{}/office", server.addr);
        eventually(|| {
            let closed = reader.is_finished();
            let url = url.clone();
            async move {
                // Whether it works is not this test's matter (a server that panics on a
                // log line fails it below, by not stopping).
                drop(tokio_tungstenite::connect_async(&url).await);
                closed.then_some(()).ok_or("stderr still read".to_string())
            }
        })
        .await;
        // More lines into the broken pipe, then the signal (whose handler logs too).
        let _ = tokio_tungstenite::connect_async(&url).await;
        server.signal("TERM");
        assert_eq!(server.wait_exit().await, Some(0));
    }
}

/// `--worker-threads` (or its variable) sets how many threads serve connections, and unset it
/// is the CPUs the process may run on: one under `taskset -c 0`. The listening line says what
/// the runtime has.
#[tokio::test]
async fn the_listening_line_gives_the_worker_threads_set_or_the_cpus_allowed() {
    let redis = Redis::start().await;
    let listening_with = |n: usize| {
        let field = format!("worker_threads={n}");
        move |lines: &[String]| {
            lines
                .iter()
                .any(|l| l.contains("listening") && l.contains(&field))
        }
    };
    let mut server = start_logged(
        Kind::Publish,
        &redis.url(),
        "info",
        &["--worker-threads", "3"],
    );
    let stderr = StderrLines::read(server.child());
    stderr.wait_for("worker_threads=3", listening_with(3)).await;

    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut by_variable = command(Kind::Subscribe, addr, &redis.url(), "info", &[]);
    by_variable.env("LIGHTRELAY_WORKER_THREADS", "2");
    let mut server = Server::adopt(by_variable.spawn().unwrap(), addr);
    let stderr = StderrLines::read(server.child());
    stderr.wait_for("worker_threads=2", listening_with(2)).await;

    // Pinned to one CPU, with no flag: one worker.
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let pinned = command(Kind::Subscribe, addr, &redis.url(), "info", &[]);
    let mut taskset = Command::new("taskset");
    taskset
        .args(["-c", "0"])
        .arg(pinned.get_program())
        .args(pinned.get_args())
        .envs(
            pinned
                .get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .env_remove("NO_COLOR")
        .env_remove("LIGHTRELAY_LOG_FORMAT")
        .env_remove("LIGHTRELAY_WORKER_THREADS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut server = Server::adopt(taskset.spawn().unwrap(), addr);
    let stderr = StderrLines::read(server.child());
    stderr.wait_for("worker_threads=1", listening_with(1)).await;
}

#[tokio::test]
async fn logs_to_a_pipe_carry_no_colour_codes() {
    let redis = Redis::start().await;
    let mut server = start_logged(Kind::Subscribe, &redis.url(), "info", &[]);
    let stderr = StderrLines::read(server.child());
    stderr
        .wait_for("the listening line", |lines| {
            lines.iter().any(|l| l.contains("listening"))
        })
        .await;
    let lines = stderr.lines();
    assert!(
        !lines.iter().any(|l| l.contains('\x1b')),
        "escape codes in {lines:?}"
    );
}

#[tokio::test]
async fn at_debug_a_client_connecting_and_leaving_is_logged_with_its_address() {
    let redis = Redis::start().await;
    for kind in [Kind::Publish, Kind::Subscribe] {
        let mut server = start_logged(kind, &redis.url(), "info,lightrelay=debug", &[]);
        let stderr = StderrLines::read(server.child());
        wait_healthy(server.addr).await;
        // The peer (127.0.0.1) is a trusted proxy by default: X-Real-IP names the client.
        let mut request = format!("ws://{}/office/desk", server.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("x-real-ip", "203.0.113.7".parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        stderr
            .wait_for("a connect line with the client address", |lines| {
                lines.iter().any(|l| {
                    l.contains("client connected")
                        && l.contains("client=203.0.113.7")
                        && l.contains("lightlevel/office/desk")
                })
            })
            .await;
        ws.close(None).await.unwrap();
        finish_close(&mut ws).await;
        stderr
            .wait_for(
                "a leave line with the client address and the ending",
                |lines| {
                    lines.iter().any(|l| {
                        l.contains("client left")
                            && l.contains("client=203.0.113.7")
                            && l.contains("ending=ClientClosed")
                    })
                },
            )
            .await;
    }
}

#[tokio::test]
async fn a_summary_of_connections_and_messages_is_logged_at_info_every_interval() {
    let redis = Redis::start().await;
    let mut server = start_logged(
        Kind::Publish,
        &redis.url(),
        "info",
        &["--log-summary-interval", "200ms"],
    );
    let stderr = StderrLines::read(server.child());
    wait_healthy(server.addr).await;
    let mut ws = connect(&format!("ws://{}/office", server.addr)).await;
    for _ in 0..3 {
        send_text(&mut ws, "42").await;
    }
    ws.close(None).await.unwrap();
    finish_close(&mut ws).await;
    // The connection and its messages may fall into two intervals: sum them.
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(&format!("{name}=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    stderr
        .wait_for("summaries adding up to what happened", |lines| {
            let summaries: Vec<&String> = lines
                .iter()
                .filter(|l| l.contains("INFO") && l.contains(" summary "))
                .collect();
            let sum = |name| summaries.iter().map(|l| field(l, name)).sum::<u64>();
            sum("opened") == 1
                && sum("closed") == 1
                && sum("messages_in") == 3
                && sum("messages_out") == 3
        })
        .await;
}

#[tokio::test]
async fn a_server_that_cannot_listen_exits_1_even_with_stderr_a_closed_pipe() {
    // The port is taken; the error line goes to a pipe nobody reads any more.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = command(
        Kind::Publish,
        taken.local_addr().unwrap(),
        "redis://127.0.0.1:1",
        "info",
        &[],
    )
    .stderr(writer)
    .spawn()
    .unwrap();
    let mut server = Server::adopt(child, taken.local_addr().unwrap());
    // Not 101, the code of a panic on the write.
    assert_eq!(server.wait_exit().await, Some(1));
}
