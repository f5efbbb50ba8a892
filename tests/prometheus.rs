//! Issue 17: the shipped alerting rules (`deploy/prometheus/lightrelay.rules.yml`) and Grafana
//! dashboard (`deploy/grafana/lightrelay.json`) against Debian's real `prometheus` (bin/test
//! installs it), started here on a free loopback port, scraping both servers every second
//! while a publisher and a subscriber keep traffic flowing through a real Redis.
//!
//! Prometheus loads a copy of the rules with every `for:` set to 1s (the shipped durations are
//! minutes); every other line is the shipped text, and `promtool` checks the shipped file
//! itself. An alert expression is a condition that is false on a healthy relay, so what must
//! return data is each operand of its `and`/`or`/`unless` with its comparison to a number taken
//! away (see [`probes`]); the whole expression must still be accepted by Prometheus.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const RULES: &str = "deploy/prometheus/lightrelay.rules.yml";
const DASHBOARD: &str = "deploy/grafana/lightrelay.json";

/// How long Prometheus may take to have data for every query, or to fire an alert.
const PROMETHEUS_PATIENCE: Duration = Duration::from_secs(25);

/// A real `prometheus` on 127.0.0.1 with its data in a temporary directory; killed by PID and
/// its directory removed when dropped.
struct Prometheus {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Prometheus {
    /// Scrape every `(job, address)` each second and evaluate `rules` each second.
    async fn start(targets: &[(&str, SocketAddr)], rules: &str) -> Prometheus {
        let dir = temp_dir("prometheus");
        let rules_path = dir.join("lightrelay.rules.yml");
        std::fs::write(&rules_path, rules).unwrap();
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\nscrape_configs:\n",
            rules_path.display()
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let port = quiet_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect(
                "prometheus is not installed: bin/test installs it (apt-get install prometheus)",
            );
        let prometheus = Prometheus { port, dir, child };
        let deadline = Instant::now() + PROMETHEUS_PATIENCE;
        loop {
            if let Ok((200, _)) = prometheus.request("GET", "/-/ready", "").await {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An HTTP/1.0 request (no chunked answer); `form` is an urlencoded body for POST.
    async fn request(
        &self,
        method: &str,
        path: &str,
        form: &str,
    ) -> std::io::Result<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
        let request = format!(
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
            .await
            .map_err(|_| std::io::Error::other("no answer from prometheus"))??;
        let text = String::from_utf8_lossy(&response).into_owned();
        Ok((status_of(&text), body_of(&text).to_string()))
    }

    /// The `data` of a successful API answer; anything else fails the test.
    async fn api(&self, method: &str, path: &str, form: &str) -> Value {
        let (status, body) = self.request(method, path, form).await.unwrap();
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{method} {path} {form}: {status} {e}: {body}"));
        assert_eq!(json["status"], "success", "{method} {path} {form}: {body}");
        json["data"].clone()
    }

    /// The instant vector `expr` evaluates to now.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self
            .api("POST", "/api/v1/query", &format!("query={}", encode(expr)))
            .await;
        assert_eq!(data["resultType"], "vector", "{expr}: {data}");
        data["result"].as_array().unwrap().clone()
    }

    /// Wait until every query of `exprs` returns at least one sample with a finite value.
    async fn wait_for_data(&self, exprs: &[String]) {
        let deadline = Instant::now() + PROMETHEUS_PATIENCE;
        let mut waiting: Vec<&String> = exprs.iter().collect();
        loop {
            let mut still = Vec::new();
            for expr in waiting {
                if !self.query(expr).await.iter().any(finite) {
                    still.push(expr);
                }
            }
            waiting = still;
            if waiting.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no data from these queries under traffic:\n{}",
                waiting
                    .iter()
                    .map(|e| e.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The alerts Prometheus holds now (pending and firing).
    async fn alerts(&self) -> Vec<Value> {
        self.api("GET", "/api/v1/alerts", "").await["alerts"]
            .as_array()
            .unwrap()
            .clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A sample whose value is a number (not NaN, which a quantile of no observations gives).
fn finite(sample: &Value) -> bool {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(f64::is_finite)
}

/// Percent-encoding for a form value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Byte offsets of `text`'s characters outside any (), [], {} or string.
fn top_level(text: &str) -> Vec<usize> {
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    let mut out = Vec::new();
    for (i, b) in text.bytes().enumerate() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == q {
                quote = None;
            }
            continue;
        }
        match b {
            b'"' | b'\'' | b'`' => quote = Some(b),
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ if depth == 0 => out.push(i),
            _ => {}
        }
    }
    out
}

/// `text` without parentheses around all of it.
fn unwrap_parens(text: &str) -> &str {
    let mut text = text.trim();
    while text.starts_with('(') && text.ends_with(')') && top_level(text).is_empty() {
        text = text[1..text.len() - 1].trim();
    }
    text
}

/// A vector matching clause (`on (…)`, `ignoring (…)`, `group_left (…)`) at the start of an
/// operand, removed.
fn strip_matching(mut text: &str) -> &str {
    loop {
        text = text.trim_start();
        let Some(rest) = ["on", "ignoring", "group_left", "group_right"]
            .iter()
            .find_map(|kw| {
                text.strip_prefix(kw)
                    .filter(|r| r.trim_start().starts_with('('))
            })
        else {
            return text;
        };
        let rest = rest.trim_start();
        let close = rest.find(')').unwrap();
        text = &rest[close + 1..];
    }
}

/// The queries that must return data for an alert `expr` to be meaningful on a healthy relay:
/// the operands of its top-level `and`, `or` and `unless`, each without a comparison to a
/// number (`x > 0.9` is probed as `x`).
fn probes(expr: &str) -> Vec<String> {
    let expr = unwrap_parens(expr);
    let top = top_level(expr);
    let bytes = expr.as_bytes();
    // Split at the set operators, written as words between spaces.
    let mut parts = Vec::new();
    let mut start = 0;
    for &i in &top {
        if i < start || bytes[i] != b' ' {
            continue;
        }
        for op in [" and ", " or ", " unless "] {
            if expr[i..].starts_with(op) {
                parts.push(&expr[start..i]);
                start = i + op.len() - 1;
                break;
            }
        }
    }
    if start > 0 {
        parts.push(&expr[start..]);
        return parts
            .into_iter()
            .flat_map(|part| probes(strip_matching(part)))
            .collect();
    }
    // A comparison: keep the side that is not a number.
    for &i in &top {
        let op_len = match &bytes[i..] {
            [b'=' | b'!' | b'>' | b'<', b'=', ..] => 2,
            [b'>' | b'<', ..] => 1,
            _ => continue,
        };
        let left = expr[..i].trim();
        let right = expr[i + op_len..].trim();
        let right = right.strip_prefix("bool ").unwrap_or(right).trim();
        let right = strip_matching(right);
        return match (left.parse::<f64>(), right.parse::<f64>()) {
            (_, Ok(_)) => probes(left),
            (Ok(_), _) => probes(right),
            _ => [probes(left), probes(right)].concat(),
        };
    }
    vec![expr.to_string()]
}

#[test]
fn probes_take_operands_and_drop_thresholds() {
    assert_eq!(probes("up == 0"), ["up"]);
    assert_eq!(probes("a / b > 0.9"), ["a / b"]);
    assert_eq!(
        probes(
            "sum without (direction) (rate(m{direction=\"x\"}[5m])) > 0 and \
             (c > 0) and on () sum(r{direction=\"y\"}) == 0"
        ),
        [
            "sum without (direction) (rate(m{direction=\"x\"}[5m]))",
            "c",
            "sum(r{direction=\"y\"})"
        ]
    );
    assert_eq!(
        probes("increase(x{reason=~\"a|b\"}[5m]) > 0"),
        ["increase(x{reason=~\"a|b\"}[5m])"]
    );
}

fn shipped(path: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join(path)).unwrap()
}

/// The shipped rules with every `for:` set to 1s, so an alert fires within seconds.
fn rules_for_test() -> String {
    let shipped = shipped(RULES);
    let alerts = shipped
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    let fors = shipped
        .lines()
        .filter(|l| l.trim_start().starts_with("for:"))
        .count();
    assert!(alerts > 0, "{RULES} has no alert");
    assert_eq!(alerts, fors, "every alert in {RULES} needs a `for:`");
    shipped
        .lines()
        .map(|line| match line.find("for:") {
            Some(at) if line.trim_start().starts_with("for:") => format!("{}for: 1s", &line[..at]),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A publisher sending a message every 20 ms and a subscriber reading them, both on one path;
/// stopped (aborted) when dropped.
struct Traffic {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    async fn start(publish: &Server, subscribe: &Server) -> Traffic {
        let received = Arc::new(AtomicU64::new(0));
        let mut subscriber = connect(&subscribe.ws("/metrics-test/room")).await;
        let counter = received.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(_)) = subscriber.next().await {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        let mut publisher = connect(&publish.ws("/metrics-test/room")).await;
        let writer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            // At most 5 minutes of traffic, far past the test's end.
            for i in 0..15_000u32 {
                tick.tick().await;
                let frame = tokio_tungstenite::tungstenite::Message::text(format!("reading {i}"));
                if publisher.send(frame).await.is_err() {
                    return;
                }
            }
        });
        let traffic = Traffic {
            tasks: vec![reader, writer],
        };
        // The subscriber's channel is subscribed in Redis once a message comes through.
        let received = &received;
        eventually(|| async move {
            match received.load(Ordering::Relaxed) {
                0 => Err("the subscriber received nothing from the publisher".to_string()),
                _ => Ok(()),
            }
        })
        .await;
        traffic
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// `text` as a regular expression matching itself (Grafana's escaping of a variable's value).
fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c {
            '.' | '+' | '*' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' | '\\' => {
                vec!['\\', '\\', c]
            }
            c => vec![c],
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_the_shipped_rules() {
    let output = Command::new("promtool")
        .args(["check", "rules", RULES])
        .current_dir(REPO)
        .output()
        .expect("promtool is not installed: bin/test installs it (apt-get install prometheus)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool check rules:\n{report}");
    assert!(report.contains("SUCCESS"), "{report}");
}

/// Every alert and recording rule, and every dashboard panel query and variable, returns data
/// from a real Prometheus scraping both servers under traffic; no alert fires on that healthy
/// relay; and LightrelayRedisDown fires for both servers once Redis is killed.
#[tokio::test(flavor = "multi_thread")]
async fn alerts_and_dashboard_queries_work_against_a_real_prometheus() {
    let mut redis = Redis::start().await;
    // The servers find Redis gone at their next health PING, every --ping-interval (30 s by
    // default): 1 s here, so that the alert can fire within the test's patience.
    let flags = ["--ping-interval", "1s"];
    let publish = Server::start(Kind::Publish, &redis.url(), &flags).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &flags).await;
    let traffic = Traffic::start(&publish, &subscribe).await;
    let prometheus = Prometheus::start(
        &[
            ("lightrelay-publish", publish.addr),
            ("lightrelay-subscribe", subscribe.addr),
        ],
        &rules_for_test(),
    )
    .await;
    let instances = [publish.addr.to_string(), subscribe.addr.to_string()];

    // Both targets are scraped.
    let mut queries = Vec::new();
    for instance in &instances {
        queries.push(format!("up{{instance=\"{instance}\"}} == 1"));
    }

    // The rules Prometheus loaded: each alert is labelled and explained.
    let groups = prometheus.api("GET", "/api/v1/rules", "").await["groups"].clone();
    let rules: Vec<Value> = groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect();
    let mut alert_names = Vec::new();
    for rule in &rules {
        let expr = rule["query"].as_str().unwrap();
        match rule["type"].as_str().unwrap() {
            "alerting" => {
                let name = rule["name"].as_str().unwrap();
                alert_names.push(name.to_string());
                let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
                assert!(
                    ["critical", "warning", "info"].contains(&severity),
                    "{name}: severity {severity:?}"
                );
                for annotation in ["summary", "description"] {
                    assert!(
                        rule["annotations"][annotation]
                            .as_str()
                            .is_some_and(|t| !t.is_empty()),
                        "{name} has no {annotation}"
                    );
                }
                // The whole expression is valid PromQL (its result is empty while healthy).
                prometheus.query(expr).await;
                queries.extend(probes(expr));
            }
            "recording" => queries.push(rule["name"].as_str().unwrap().to_string()),
            other => panic!("rule type {other}"),
        }
    }
    for name in [
        "LightrelayRedisDown",
        "LightrelayNotDelivering",
        "LightrelayMessagesLost",
        "LightrelaySlowConsumersClosed",
        "LightrelayConnectionsNearLimit",
        "LightrelayAuthRefusalsSpiking",
    ] {
        assert!(alert_names.iter().any(|n| n == name), "no alert {name}");
    }

    // The dashboard: a Prometheus datasource variable every panel uses, an instance variable
    // whose values are our two servers, and panel queries that return data.
    let dashboard: Value = serde_json::from_str(&shipped(DASHBOARD)).unwrap();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no Prometheus datasource variable"
    );
    let selected = format!(
        "({})",
        instances
            .iter()
            .map(|i| regex_escape(i))
            .collect::<Vec<_>>()
            .join("|")
    );
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut ids = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        ids.push(panel["id"].as_u64().unwrap());
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("${instance}", &selected)
                .replace("$instance", &selected)
                .replace("$__rate_interval", "1m");
            assert!(!expr.contains('$'), "{title}: a variable left in {expr}");
            queries.push(expr);
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids must be unique");

    prometheus.wait_for_data(&queries).await;

    // The instance variable lists both servers.
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let definition = variable["definition"].as_str().unwrap();
        let (metric, label) = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .and_then(|d| d.split_once(", "))
            .unwrap_or_else(|| panic!("variable query {definition}"));
        let path = format!("/api/v1/label/{label}/values?match[]={}", encode(metric));
        let values = prometheus.api("GET", &path, "").await;
        for instance in &instances {
            assert!(
                values.as_array().unwrap().iter().any(|v| v == instance),
                "variable {definition}: {values} lacks {instance}"
            );
        }
    }

    // A healthy relay under traffic sets off nothing.
    let firing: Vec<Value> = prometheus
        .alerts()
        .await
        .into_iter()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert!(
        firing.is_empty(),
        "alerts firing on a healthy relay: {firing:?}"
    );

    // Redis dies: both servers' LightrelayRedisDown fires.
    drop(traffic);
    redis.kill();
    let deadline = Instant::now() + PROMETHEUS_PATIENCE;
    loop {
        let alerts = prometheus.alerts().await;
        let fired = |instance: &String| {
            alerts.iter().any(|a| {
                a["labels"]["alertname"] == "LightrelayRedisDown"
                    && a["labels"]["instance"] == instance.as_str()
                    && a["state"] == "firing"
            })
        };
        if instances.iter().all(fired) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "LightrelayRedisDown did not fire for both servers: {alerts:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
