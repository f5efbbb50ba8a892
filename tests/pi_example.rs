//! `examples/pi_sensor.py`, the Raspberry Pi publisher, against the real publish server: what
//! a plain Redis subscriber sees is exactly what the sensor file held.
//!
//! The example runs in a venv made under `target/pi-venv` from `examples/requirements.txt`
//! (made once and shared by these tests; made again when the requirements change).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::auth as jwt;
use common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's python, made when missing. Tests run in parallel processes: a lock directory
/// lets one of them make it while the others wait for its ready mark.
fn venv_python() -> PathBuf {
    let target = root().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let venv = target.join("pi-venv");
    let ready = venv.join("lightrelay-ready");
    let lock = target.join("pi-venv.lock");
    let requirements = std::fs::read_to_string(root().join("examples/requirements.txt")).unwrap();
    let python = venv.join("bin/python");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if std::fs::read_to_string(&ready).ok().as_deref() == Some(requirements.as_str()) {
            return python;
        }
        match std::fs::create_dir(&lock) {
            Ok(()) => {
                let made = make_venv(&venv, &requirements, &ready);
                let _ = std::fs::remove_dir(&lock);
                made.unwrap_or_else(|e| panic!("{e}"));
                return python;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A lock older than the longest make is left over from a killed run.
                let stale = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(300));
                if stale {
                    let _ = std::fs::remove_dir(&lock);
                }
                assert!(Instant::now() < deadline, "the venv was never made");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("cannot lock {}: {e}", lock.display()),
        }
    }
}

fn make_venv(venv: &Path, requirements: &str, ready: &Path) -> Result<(), String> {
    let status = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(venv)
        .status()
        .map_err(|e| format!("python3 must be installed (bin/test installs it): {e}"))?;
    if !status.success() {
        return Err(format!("python3 -m venv failed: {status}"));
    }
    let status = Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(root().join("examples/requirements.txt"))
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!(
            "pip install -r examples/requirements.txt failed: {status}"
        ));
    }
    std::fs::write(ready, requirements).map_err(|e| e.to_string())
}

/// The example, started with `args`; stderr is kept for the assertions.
fn pi_sensor(args: &[&str]) -> Child {
    pi_sensor_with_env(args, &[])
}

fn pi_sensor_with_env(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(venv_python())
        .arg(root().join("examples/pi_sensor.py"))
        .args(args)
        .env_remove("LIGHTRELAY_TOKEN")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait (bounded) for the example to exit; returns its exit code and stderr.
async fn finish(mut child: Child) -> (Option<i32>, String) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            // Unless a test took it over (StderrLines).
            if let Some(mut pipe) = child.stderr.take() {
                pipe.read_to_string(&mut stderr).unwrap();
            }
            return (status.code(), stderr);
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pi_sensor.py did not exit");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn temp_file(name: &str, content: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("lightrelay-{name}-{}", std::process::id()));
    std::fs::write(&path, content).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn readings_from_a_file_arrive_byte_exact_across_a_late_relay() {
    venv_python();
    let redis = Redis::start().await;
    let mut watcher = redis.subscribe("lightlevel/pi/lux").await;
    let sensor = temp_file("lux", "  417.25\n");

    // The relay is not there yet: the example retries with back-off and keeps its readings.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let url = format!("ws://{addr}/pi/lux");
    let mut child = pi_sensor(&[
        &url,
        "--file",
        sensor.to_str().unwrap(),
        "--interval",
        "0.2",
        "--count",
        "4",
    ]);
    let log = StderrLines::read(&mut child);
    log.wait_for("a retry with all 4 readings kept", |lines| {
        lines
            .iter()
            .any(|l| l.contains("reconnecting in") && l.contains("(4 readings waiting)"))
    })
    .await;
    let _publish = Server::start_at(Kind::Publish, addr, &redis.url(), &[]).await;

    for _ in 0..4 {
        assert_eq!(watcher.next().await, "417.25");
    }
    let (code, _) = finish(child).await;
    let stderr = log.all();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("4 readings sent"), "{stderr}");
    assert!(!stderr.contains("Traceback"), "{stderr}");
    // Exactly four: nothing lost, nothing twice.
    redis.publish("lightlevel/pi/lux", "end").await;
    assert_eq!(watcher.next().await, "end");
    let _ = std::fs::remove_file(sensor);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_file_it_publishes_a_sine() {
    venv_python();
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe("lightlevel/office").await;

    let child = pi_sensor(&[
        &publish.ws("/office"),
        "--interval",
        "0.1",
        "--count",
        "6",
        "--period",
        "2",
    ]);
    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "{stderr}");
    let mut levels = Vec::new();
    for _ in 0..6 {
        let payload = String::from_utf8(watcher.next().await.to_vec()).unwrap();
        let (whole, tenth) = payload.split_once('.').expect("one decimal");
        assert!(
            whole.bytes().all(|b| b.is_ascii_digit()) && tenth.len() == 1,
            "{payload:?}"
        );
        let level: f64 = payload.parse().unwrap();
        assert!((200.0..=800.0).contains(&level), "{level}");
        levels.push(level);
    }
    redis.publish("lightlevel/office", "end").await;
    assert_eq!(watcher.next().await, "end", "more than 6 readings");
    levels.dedup();
    assert!(levels.len() > 3, "the sine does not move: {levels:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_it_cleanly_and_bad_input_exits_2() {
    venv_python();
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let mut watcher = redis.subscribe("lightlevel/desk").await;

    // Fire-and-forget mode, the one without acks.
    let child = pi_sensor(&[&publish.ws("/desk"), "--interval", "0.1", "--no-ack"]);
    watcher.next().await;
    let status = Command::new("kill")
        .args(["-s", "INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
    assert!(!stderr.contains("Traceback"), "{stderr}");

    for args in [
        &["http://127.0.0.1:1/office"][..],
        &["--file", "/nonexistent/lightrelay-sensor"],
        &["--interval", "0"],
    ] {
        let (code, stderr) = finish(pi_sensor(args)).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("error:"), "{stderr}");
    }
    // A path the relay refuses (400: over --max-path-bytes) is not retried.
    let long = publish.ws(&format!("/{}", "x".repeat(300)));
    let (code, stderr) = finish(pi_sensor(&[&long, "--count", "1"])).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("HTTP 400"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_publish_auth_the_pi_publishes_with_its_token_and_without_one_is_refused_in_one_line()
{
    venv_python();
    let redis = Redis::start().await;
    let (publish, dir) =
        jwt::server_with_auth(Kind::Publish, &redis.url(), "publish", "pi-token").await;
    let mut watcher = redis.subscribe("lightlevel/pi/lux").await;
    let sensor = temp_file("lux-token", "417\n");
    let url = publish.ws("/pi/lux");
    let reading = ["--file", sensor.to_str().unwrap(), "--interval", "0.1"];
    let token = jwt::token(&["/pi/*"], &[]);

    // With its token, from the environment or from --token: published.
    let from_env = pi_sensor_with_env(
        &[
            &url, reading[0], reading[1], reading[2], reading[3], "--count", "1",
        ],
        &[("LIGHTRELAY_TOKEN", &token)],
    );
    let (code, stderr) = finish(from_env).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(watcher.next().await, "417");
    let with_flag = pi_sensor(&[
        "--url", &url, reading[0], reading[1], reading[2], reading[3], "--count", "1", "--token",
        &token,
    ]);
    let (code, stderr) = finish(with_flag).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(watcher.next().await, "417");

    // Without one, with a forged one, or with one for other paths: one clear line, exit 1,
    // no retry, and the token never shown.
    let forged = jwt::token_with("not-the-relays-secret", &["/pi/*"], &[]);
    let elsewhere = jwt::token(&["/office"], &[]);
    for (token, status, hint) in [
        (None, "HTTP 401", "wants a valid token"),
        (Some(&forged), "HTTP 401", "wants a valid token"),
        (
            Some(&elsewhere),
            "HTTP 403",
            "does not allow publishing on this path",
        ),
    ] {
        let mut args = vec![url.as_str(), "--interval", "0.1"];
        if let Some(token) = token {
            args.extend(["--token", token.as_str()]);
        }
        let (code, stderr) = finish(pi_sensor(&args)).await;
        assert_eq!(code, Some(1), "{token:?}: {stderr}");
        let refusals: Vec<&str> = stderr.lines().filter(|l| l.contains("refused")).collect();
        assert_eq!(refusals.len(), 1, "{stderr}");
        assert!(
            refusals[0].contains(status) && refusals[0].contains(hint),
            "{stderr}"
        );
        assert!(!stderr.contains("reconnecting"), "{stderr}");
        assert!(!stderr.contains("Traceback"), "{stderr}");
        if let Some(token) = token {
            assert!(
                !stderr.contains(token.as_str()),
                "the token was logged: {stderr}"
            );
        }
    }
    // Nothing else reached Redis.
    redis.publish("lightlevel/pi/lux", "end").await;
    assert_eq!(watcher.next().await, "end");
    let _ = std::fs::remove_file(sensor);
    std::fs::remove_dir_all(dir).unwrap();
}

/// SPEC §10: `{"interval": S}` on the downlink changes the pace, acknowledged on the channel.
/// Readings at the new pace: at the old one (60 s) none would come within the test's patience.
#[tokio::test(flavor = "multi_thread")]
async fn a_downlink_interval_changes_its_pace_and_is_acknowledged_on_its_channel() {
    venv_python();
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &[]).await;
    let relay = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    // One with acks (its downlink comes in binary frames), one without (text frames).
    for (path, extra) in [("/sensors/pi1", None), ("/sensors/pi2", Some("--no-ack"))] {
        let channel = format!("lightlevel{path}");
        let mut watcher = redis.subscribe(&channel).await;
        let mut args = vec![publish.ws(path), "--interval".into(), "60".into()];
        args.extend(extra.map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = pi_sensor(&args);
        // Its first reading: it is connected (and subscribed to its downlink soon after).
        let first = watcher.next().await;
        assert!(first[..].iter().all(|b| b.is_ascii_digit() || *b == b'.'));
        let asked = format!("/down{path}");
        eventually(|| async {
            match http(relay.addr, "POST", &asked, &[], b"{\"interval\": 0.1}").await {
                (200, _) => Ok(()),
                (status, body) => Err(format!(
                    "POST {asked}: {status} {}",
                    String::from_utf8_lossy(&body)
                )),
            }
        })
        .await;
        let mut acknowledged = false;
        let mut readings = 0;
        while readings < 3 {
            let message = String::from_utf8(watcher.next().await.to_vec()).unwrap();
            if message.starts_with('{') {
                let said: serde_json::Value = serde_json::from_str(&message).unwrap();
                assert_eq!(said, serde_json::json!({"interval": 0.1}));
                acknowledged = true;
            } else if acknowledged {
                readings += 1;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
