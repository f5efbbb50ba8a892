//! Issue 6 smoke: every `lightrelay bench` subcommand, a second or so each, against our own
//! servers and a private Redis (real processes, loopback only), so the benchmark never rots.
//! Each asserts the JSON is sane: something delivered, zero loss, latency recorded, the
//! server's CPU and RSS sampled for the `--pid` given. Then `bench/report.py` (what `bin/bench`
//! runs last) turns those JSON files into a report.

mod common;

use std::process::{Command, Output};

use common::nginx::{Nginx, Site};
use common::{Kind, Redis, Server};
use serde_json::Value;

/// Run `lightrelay bench ARGS… --json` (off the async runtime) and parse its JSON.
async fn bench(args: Vec<String>) -> (Output, Value) {
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_lightrelay"))
            .arg("bench")
            .args(&args)
            .arg("--json")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): exit {:?}\nstdout: {stdout}\nstderr: {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, json)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// The run counts, and the process we named was sampled.
fn assert_counts(report: &Value, output: &Output, pid: u32) {
    assert!(
        report["ok"].as_bool().unwrap(),
        "problems: {}",
        report["problems"]
    );
    assert_eq!(output.status.code(), Some(0));
    let servers = report["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1);
    assert_eq!(u(&servers[0], "pid"), u64::from(pid));
    assert!(servers[0]["cpu_s"].as_f64().unwrap() >= 0.0);
    assert!(u(&servers[0], "rss_kib_end") > 0);
    assert!(u(&servers[0], "rss_kib_peak") >= u(&servers[0], "rss_kib_end"));
}

fn assert_delivered_all(report: &Value) {
    let delivered = u(report, "delivered");
    assert!(delivered > 0, "{report}");
    assert_eq!(delivered, u(report, "expected"));
    assert_eq!(u(report, "lost"), 0);
    assert_eq!(u(report, "reordered"), 0);
    assert!(report["per_s"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn fanout_through_redis_delivers_everything_and_samples_the_server() {
    let redis = Redis::start().await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let (output, report) = bench(strings(&[
        "fanout",
        "--subscribe",
        &sub.ws("/smoke/{i}"),
        "--publish",
        &format!("{}/lightlevel/smoke/{{i}}", redis.url()),
        "--channels",
        "2",
        "--subscribers",
        "5",
        "--duration",
        "1",
        "--pid",
        &sub.pid().to_string(),
        "--label",
        "lightrelay",
    ]))
    .await;
    assert_counts(&report, &output, sub.pid());
    assert_delivered_all(&report);
    assert_eq!(u(&report, "connections"), 10);
    assert_eq!(report["label"], "lightrelay");
    // Every delivery's latency is in the histogram.
    assert_eq!(u(&report["latency"], "count"), u(&report, "delivered"));
    assert!(u(&report["latency"], "max_us") >= u(&report["latency"], "p50_us"));
    // Every delivered message was published: sent × subscribers per channel.
    assert_eq!(u(&report, "expected"), u(&report, "sent") * 5);
}

#[tokio::test]
async fn fanout_over_two_subscribe_servers_deals_each_channels_subscribers_to_both() {
    // SPEC §11's scale-out row: the same load split over two subscribe processes on one Redis.
    let redis = Redis::start().await;
    let one = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let two = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let (output, report) = bench(strings(&[
        "fanout",
        "--subscribe",
        &one.ws("/smoke/{i}"),
        "--also-subscribe",
        &two.ws("/smoke/{i}"),
        "--publish",
        &format!("{}/lightlevel/smoke/{{i}}", redis.url()),
        "--channels",
        "2",
        "--subscribers",
        "6",
        "--duration",
        "1",
        "--pid",
        &one.pid().to_string(),
        "--pid",
        &two.pid().to_string(),
    ]))
    .await;
    assert!(report["ok"].as_bool().unwrap(), "{}", report["problems"]);
    assert_eq!(output.status.code(), Some(0));
    assert_delivered_all(&report);
    assert_eq!(u(&report, "connections"), 12);
    assert_eq!(
        report["servers"].as_array().unwrap().len(),
        2,
        "both servers sampled"
    );
    // Three of each channel's six subscribers on each server: each wrote the same frames.
    let out = "lightrelay_messages_total{direction=\"ws_out\"}";
    let (a, b) = (one.metric(out).await, two.metric(out).await);
    assert!(a > 0.0 && a == b, "frames written: {a} and {b}");
    assert!(
        a + b >= u(&report, "delivered") as f64,
        "{a} + {b}: {report}"
    );
}

#[tokio::test]
async fn latency_at_a_fixed_rate_through_the_websocket_publisher() {
    let redis = Redis::start().await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let (output, report) = bench(strings(&[
        "latency",
        "--subscribe",
        &sub.ws("/rate/{i}"),
        "--publish",
        &publish.ws("/rate/{i}"),
        "--rate",
        "40",
        "--subscribers",
        "8",
        "--duration",
        "1.5",
        "--pid",
        &sub.pid().to_string(),
    ]))
    .await;
    assert_counts(&report, &output, sub.pid());
    assert_delivered_all(&report);
    assert_eq!(report["scenario"], "latency");
    // 40 messages/s for 1.5 s, give or take one.
    let sent = u(&report, "sent");
    assert!((58..=62).contains(&sent), "sent {sent}");
    let latency = &report["latency"];
    assert!(u(latency, "p50_us") > 0 && u(latency, "p99_us") >= u(latency, "p50_us"));
    assert!(u(latency, "p99_us") < 1_000_000, "{latency}");
}

/// Issue 14's fan-out with `format=json` (the `fanout-json` row): subscribers ask for
/// envelopes, both servers keep history, messages go in through the publish server as in
/// production; the bench sends text and reads each message's number and send time out of
/// the envelope's data, so every delivery counts and none is malformed.
#[tokio::test]
async fn fanout_with_json_envelopes_reads_the_data_field() {
    let redis = Redis::start().await;
    let history = ["--history", "100"];
    let sub = Server::start(Kind::Subscribe, &redis.url(), &history).await;
    let publish = Server::start(Kind::Publish, &redis.url(), &history).await;
    let (output, report) = bench(strings(&[
        "fanout",
        "--subscribe",
        &sub.ws("/json/{i}?format=json"),
        "--publish",
        &publish.ws("/json/{i}"),
        "--channels",
        "2",
        "--subscribers",
        "4",
        "--duration",
        "1",
        "--pid",
        &sub.pid().to_string(),
    ]))
    .await;
    assert_counts(&report, &output, sub.pid());
    assert_delivered_all(&report);
    assert_eq!(report["envelope"], true, "{report}");
    assert_eq!(u(&report["latency"], "count"), u(&report, "delivered"));
    // Text needs 32 bytes for the header: a smaller size is refused up front (exit 1).
    let small = Command::new(env!("CARGO_BIN_EXE_lightrelay"))
        .args(["bench", "fanout", "--subscribe"])
        .arg(sub.ws("/json/{i}?format=json"))
        .args(["--publish", &publish.ws("/json/{i}"), "--size", "20"])
        .output()
        .unwrap();
    assert_eq!(small.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&small.stderr);
    assert!(
        stderr.contains("format=json") && stderr.contains("32"),
        "{stderr}"
    );
}

#[tokio::test]
async fn fanout_through_pipelined_http_posts() {
    let redis = Redis::start().await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let (output, report) = bench(strings(&[
        "fanout",
        "--subscribe",
        &sub.ws("/post/{i}"),
        "--publish",
        &format!("http://{}/post/{{i}}", publish.addr),
        "--channels",
        "3",
        "--subscribers",
        "2",
        "--duration",
        "1",
        "--pid",
        &sub.pid().to_string(),
    ]))
    .await;
    assert_counts(&report, &output, sub.pid());
    assert_delivered_all(&report);
}

#[tokio::test]
async fn ingest_counts_what_reached_redis_plain_and_acknowledged() {
    let redis = Redis::start().await;
    // Presence off: the bench counts Redis's PUBLISH calls, and join events are PUBLISHes.
    let publish = Server::start(Kind::Publish, &redis.url(), &["--presence-interval", "0"]).await;
    for ack in [false, true] {
        let mut args = strings(&[
            "ingest",
            "--publish",
            &publish.ws("/ingest/{i}"),
            "--publishers",
            "3",
            "--redis",
            &redis.url(),
            "--duration",
            "1",
            "--pid",
            &publish.pid().to_string(),
        ]);
        if ack {
            args.push("--ack".into());
        }
        let (output, report) = bench(args).await;
        assert_counts(&report, &output, publish.pid());
        // Everything sent reached Redis (counted by Redis itself), nothing more.
        assert!(u(&report, "sent") > 0);
        assert_eq!(u(&report, "delivered"), u(&report, "sent"), "{report}");
        assert_eq!(u(&report, "lost"), 0);
        if ack {
            assert_eq!(u(&report, "acked"), u(&report, "sent"));
            assert_eq!(u(&report["latency"], "count"), u(&report, "sent"));
        }
    }
}

#[tokio::test]
async fn idle_reports_memory_per_connection() {
    let redis = Redis::start().await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let redis_pid = {
        // The harness's Redis is ours: find its PID by its port, from /proc.
        let port = redis.port.to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.starts_with("redis-server") && c.contains(&port)
                })
            })
    };
    let mut args = strings(&[
        "idle",
        "--subscribe",
        &sub.ws("/idle/{i}"),
        "--connections",
        "60",
        "--channels",
        "3",
        "--duration",
        "0.5",
        "--pid",
        &sub.pid().to_string(),
    ]);
    if let Some(pid) = redis_pid {
        args.extend(["--redis-pid".to_string(), pid.to_string()]);
    }
    let (output, report) = bench(args).await;
    assert_counts(&report, &output, sub.pid());
    assert_eq!(u(&report, "connections"), 60);
    assert!(report["kib_per_connection"].as_f64().is_some());
    if redis_pid.is_some() {
        assert!(report["redis_kib_per_connection"].as_f64().is_some());
    }
    sub.wait_metric("lightrelay_connections", |n| n == 0.0)
        .await;
}

#[tokio::test]
async fn a_target_off_loopback_is_refused_before_any_traffic() {
    let output = tokio::task::spawn_blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_lightrelay"))
            .args([
                "bench",
                "idle",
                "--subscribe",
                "ws://192.0.2.1:9/x",
                "--connections",
                "1",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

#[tokio::test]
async fn report_script_turns_runs_into_a_table() {
    let redis = Redis::start().await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let (_, fanout) = bench(strings(&[
        "fanout",
        "--subscribe",
        &sub.ws("/report/{i}"),
        "--publish",
        &format!("{}/lightlevel/report/{{i}}", redis.url()),
        "--subscribers",
        "4",
        "--duration",
        "0.5",
        "--pid",
        &sub.pid().to_string(),
        "--label",
        "lightrelay",
    ]))
    .await;
    let dir = std::env::temp_dir().join(format!("lightrelay-bench-report-{}", std::process::id()));
    let runs = dir.join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    std::fs::write(dir.join("machine.txt"), "nproc=2\ncpu=test\nquick=1\n").unwrap();
    assert!(fanout["ok"].as_bool().unwrap(), "{fanout}");
    // Half a second may cost the server less than one clock tick: fix the figures.
    let mut ours = fanout.clone();
    ours["per_server_cpu_s"] = 1000.0.into();
    std::fs::write(runs.join("fanout-1k.lightrelay.json"), ours.to_string()).unwrap();
    let mut nchan = fanout.clone();
    nchan["label"] = "nchan".into();
    nchan["per_server_cpu_s"] = 500.0.into();
    std::fs::write(runs.join("fanout-1k.nchan.json"), nchan.to_string()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/report.py");
    let dir_arg = dir.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(&dir_arg)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    let row = md
        .lines()
        .find(|l| l.starts_with("| fan-out 1 × 1,000, deliveries per server CPU-second"))
        .unwrap_or_else(|| panic!("no target row in:\n{md}"));
    assert!(row.contains("| 2.00× |"), "ours is twice nchan here: {row}");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["runs"]["fanout-1k.lightrelay"]["scenario"], "fanout");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 13's connection storm: every client connected at its 101, none refused or failed,
/// the server sampled; then every connection closed (the server holds none afterwards).
#[tokio::test]
async fn storm_connects_every_client_and_closes_them() {
    let redis = Redis::start().await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let (output, report) = bench(strings(&[
        "storm",
        "--url",
        &sub.ws("/storm/{i}"),
        "--clients",
        "200",
        "--concurrency",
        "16",
        "--settle",
        "0.2",
        "--pid",
        &sub.pid().to_string(),
        "--label",
        "lightrelay",
    ]))
    .await;
    assert_counts(&report, &output, sub.pid());
    assert_eq!(report["scenario"], "storm");
    let storm = &report["storm"];
    assert_eq!(u(storm, "clients"), 200);
    assert_eq!(u(storm, "connected"), 200, "{report}");
    assert_eq!(u(storm, "refused"), 0);
    assert_eq!(u(storm, "failed"), 0);
    assert_eq!(u(storm, "not_started"), 0);
    assert_eq!(u(storm, "closed"), 200);
    assert!(storm["all_connected_s"].as_f64().is_some(), "{storm}");
    assert_eq!(report["token"], false);
    sub.wait_metric("lightrelay_connections", |n| n == 0.0)
        .await;
}

/// Issue 14's storm with `?last=1` (the `storm-last` row): the query reaches the server as
/// it is (each client gets the retained message: its replay is read from the stream), over
/// a few channels, and `--redis` reports the XREVRANGE calls the storm caused: at least one
/// per channel, at most one per client.
#[tokio::test]
async fn storm_with_last_counts_the_history_reads() {
    let redis = Redis::start().await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &["--history", "100"]).await;
    let client = redis.client().await;
    for c in 0..4 {
        let _: fred::types::Value = fred::interfaces::ClientLike::custom(
            &client,
            fred::cmd!("XADD"),
            vec![
                format!("lightlevel/last/{c}"),
                "*".into(),
                "data".into(),
                "v".into(),
            ],
        )
        .await
        .unwrap();
    }
    let (output, report) = bench(strings(&[
        "storm",
        "--url",
        &sub.ws("/last/{i}?last=1"),
        "--channels",
        "4",
        "--clients",
        "100",
        "--concurrency",
        "16",
        "--settle",
        "0.2",
        "--redis",
        &redis.url(),
        "--pid",
        &sub.pid().to_string(),
    ]))
    .await;
    assert_counts(&report, &output, sub.pid());
    let storm = &report["storm"];
    assert_eq!(u(storm, "connected"), 100, "{report}");
    assert_eq!(u(storm, "failed"), 0);
    assert!(report["subscribe"].as_str().unwrap().ends_with("?last=1"));
    let calls = &storm["redis_calls"];
    let xrevrange = u(calls, "xrevrange");
    assert!((4..=100).contains(&xrevrange), "{calls}");
    // One SUBSCRIBE per channel at most (the hub's one subscription per channel), plus the
    // history's ids channels.
    assert!(u(calls, "subscribe") >= 1, "{calls}");
    assert_eq!(u(calls, "xrange"), 0, "{calls}");
}

/// A refusal is counted by its status and not retried: past `--max-connections` the server
/// answers 503, and the run reports it and does not count (exit 3).
#[tokio::test]
async fn storm_counts_refusals_by_status_without_retrying() {
    let redis = Redis::start().await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &["--max-connections", "5"]).await;
    let (output, report) = bench(strings(&[
        "storm",
        "--url",
        &sub.ws("/one"),
        "--clients",
        "20",
        "--concurrency",
        "4",
        "--settle",
        "0",
        "--pid",
        &sub.pid().to_string(),
    ]))
    .await;
    assert_eq!(output.status.code(), Some(3), "{report}");
    assert!(!report["ok"].as_bool().unwrap());
    let storm = &report["storm"];
    assert_eq!(u(storm, "connected"), 5, "{report}");
    assert_eq!(u(storm, "refused"), 15);
    assert_eq!(u(&storm["refused_by_status"], "503"), 15);
    assert_eq!(u(storm, "failed"), 0);
    assert!(storm["all_connected_s"].is_null());
    let problems = report["problems"].to_string();
    assert!(problems.contains("15 refused (15 × 503)"), "{problems}");
}

/// A token for every path, from `lightrelay token` (the real client), signed with `secret`.
async fn mint(secret: &std::path::Path) -> String {
    let secret = secret.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_lightrelay"))
            .arg("token")
            .arg("--secret-file")
            .arg(&secret)
            .args(["--sub", "*"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// A subscribe server with `--auth all` and an HS256 secret file, and a token it accepts.
async fn auth_server(redis: &Redis, tag: &str) -> (Server, String) {
    let (sub, dir) =
        common::auth::server_with_auth(Kind::Subscribe, &redis.url(), "all", tag).await;
    (sub, mint(&dir.join("jwt-secret")).await)
}

/// The storm's clients send `--token` as `Authorization: Bearer`: with `--auth all`, every
/// one is let in.
#[tokio::test]
async fn storm_with_a_token_connects_every_client_under_auth() {
    let redis = Redis::start().await;
    let (sub, token) = auth_server(&redis, "storm-token").await;
    let (output, report) = bench(strings(&[
        "storm",
        "--url",
        &sub.ws("/storm/{i}"),
        "--clients",
        "50",
        "--concurrency",
        "8",
        "--settle",
        "0",
        "--token",
        &token,
        "--pid",
        &sub.pid().to_string(),
    ]))
    .await;
    assert_counts(&report, &output, sub.pid());
    assert_eq!(u(&report["storm"], "connected"), 50, "{report}");
    assert_eq!(u(&report["storm"], "refused"), 0);
    assert_eq!(report["token"], true);
    // The token itself is never in the report.
    assert!(!report.to_string().contains(&token));
}

/// Without a token, each client is refused 401 once: counted, not retried (the server
/// counted exactly one refusal per client).
#[tokio::test]
async fn storm_without_a_token_counts_each_401_once() {
    let redis = Redis::start().await;
    let (sub, _) = auth_server(&redis, "storm-401").await;
    let (output, report) = bench(strings(&[
        "storm",
        "--url",
        &sub.ws("/storm/{i}"),
        "--clients",
        "30",
        "--concurrency",
        "8",
        "--settle",
        "0",
    ]))
    .await;
    assert_eq!(output.status.code(), Some(3), "{report}");
    let storm = &report["storm"];
    assert_eq!(u(storm, "connected"), 0, "{report}");
    assert_eq!(u(storm, "refused"), 30);
    assert_eq!(u(&storm["refused_by_status"], "401"), 30);
    assert_eq!(u(storm, "failed"), 0);
    assert_eq!(
        sub.metric("lightrelay_auth_refused_total{reason=\"missing\"}")
            .await,
        30.0
    );
}

/// The idle scenario under `--auth all`: its subscribers send the token and all stay open.
#[tokio::test]
async fn idle_with_a_token_under_auth() {
    let redis = Redis::start().await;
    let (sub, token) = auth_server(&redis, "idle-token").await;
    let (output, report) = bench(strings(&[
        "idle",
        "--subscribe",
        &sub.ws("/idle/{i}"),
        "--connections",
        "40",
        "--channels",
        "4",
        "--duration",
        "0.3",
        "--token",
        &token,
        "--pid",
        &sub.pid().to_string(),
    ]))
    .await;
    assert_counts(&report, &output, sub.pid());
    assert_eq!(u(&report, "connections"), 40);
    assert_eq!(report["token"], true);
    assert!(report["kib_per_connection"].as_f64().is_some());
}

/// Issue 18's deployed stack: `bench fanout` over wss:// through the shipped TLS site (a real
/// nginx terminating TLS in front of a real lightrelay-subscribe), trusting the site's
/// self-signed certificate with --ca; nginx's master counts as server CPU beside the relay.
#[tokio::test]
async fn fanout_over_wss_through_the_shipped_tls_site_with_ca_delivers_everything() {
    let redis = Redis::start().await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let nginx = Nginx::start((sub.addr, sub.addr), &[Site::Tls], None).await;
    let master = nginx.child.as_ref().unwrap().id();
    let ca = nginx.dir.join("cert.pem");
    let (output, report) = bench(strings(&[
        "fanout",
        "--subscribe",
        &nginx.wss("/subscribe/smoke/{i}"),
        "--ca",
        ca.to_str().unwrap(),
        "--publish",
        &format!("{}/lightlevel/smoke/{{i}}", redis.url()),
        "--channels",
        "2",
        "--subscribers",
        "5",
        "--duration",
        "1",
        "--pid",
        &sub.pid().to_string(),
        "--pid",
        &master.to_string(),
    ]))
    .await;
    assert!(report["ok"].as_bool().unwrap(), "{}", report["problems"]);
    assert_eq!(output.status.code(), Some(0));
    assert_delivered_all(&report);
    assert_eq!(u(&report, "connections"), 10);
    let pids: Vec<u64> = report["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| u(s, "pid"))
        .collect();
    assert_eq!(pids, [u64::from(sub.pid()), u64::from(master)]);
}

/// The same site with a CA that did not sign its certificate: refused before any load, in
/// one line that says what to do, exit 1 (the run could not be made).
#[tokio::test]
async fn fanout_over_wss_refuses_a_certificate_the_ca_did_not_sign_in_one_line() {
    let redis = Redis::start().await;
    let sub = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let nginx = Nginx::start((sub.addr, sub.addr), &[Site::Tls], None).await;
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let wrong = nginx.dir.join("other-ca.pem");
    std::fs::write(&wrong, other.cert.pem()).unwrap();
    let args = strings(&[
        "bench",
        "fanout",
        "--subscribe",
        &nginx.wss("/subscribe/smoke/{i}"),
        "--ca",
        wrong.to_str().unwrap(),
        "--publish",
        &format!("{}/lightlevel/smoke/{{i}}", redis.url()),
        "--subscribers",
        "3",
        "--duration",
        "1",
    ]);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_lightrelay"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("certificate refused"), "{stderr}");
    assert!(stderr.contains("--ca FILE"), "{stderr}");
    assert!(stderr.contains(&nginx.wss("/subscribe/smoke/")), "{stderr}");
}
