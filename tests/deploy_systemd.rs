//! Issue 5, `systemd/` and `deploy/lightrelay.default`: every unit passes `systemd-analyze
//! verify` and is hardened to an exposure of at most 1.5; each unit's command line, with the
//! settings of the defaults file, starts its server the way systemd would (a clean
//! environment, `NOTIFY_SOCKET`, the JWT secret as a credential), which reports `READY=1` once
//! it listens, needs a token to publish (the shipped `LIGHTRELAY_AUTH=publish`), survives its
//! `ExecReload` and stops on SIGTERM.

mod common;
#[path = "common/jwt.rs"]
mod jwt;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The highest `systemd-analyze security` exposure a shipped unit may have.
const MAX_EXPOSURE: f64 = 1.5;

fn systemd_analyze() -> Command {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "systemd-analyze is missing: bin/test installs it (apt-get install systemd)"
    );
    Command::new("systemd-analyze")
}

/// The shipped unit files, templates included.
fn units() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(Path::new(REPO).join("systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    units.sort();
    let names: Vec<_> = units
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "lightrelay-publish.service",
            "lightrelay-publish@.service",
            "lightrelay-subscribe.service",
            "lightrelay-subscribe@.service",
        ]
    );
    units
}

fn binary_for(program: &str) -> &'static str {
    match program {
        "/usr/bin/lightrelay-publish" => env!("CARGO_BIN_EXE_lightrelay-publish"),
        "/usr/bin/lightrelay-subscribe" => env!("CARGO_BIN_EXE_lightrelay-subscribe"),
        other => panic!("unexpected ExecStart program {other}"),
    }
}

/// `Key=Value` settings of a unit file, in order (comments and section headers skipped).
fn settings(unit: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(unit)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("bad line {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn values<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn one<'a>(settings: &'a [(String, String)], key: &str) -> &'a str {
    match values(settings, key)[..] {
        [v] => v,
        ref other => panic!("expected one {key}=, got {other:?}"),
    }
}

/// The settings the defaults file makes as shipped (uncommented `NAME=value` lines).
fn shipped_settings() -> Vec<(String, String)> {
    std::fs::read_to_string(Path::new(REPO).join("deploy/lightrelay.default"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("LIGHTRELAY_") || l.starts_with("RUST_LOG="))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The `NAME=value` settings the defaults file documents, commented out (`#NAME=value`).
fn documented_defaults() -> Vec<(String, String)> {
    std::fs::read_to_string(Path::new(REPO).join("deploy/lightrelay.default"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter(|l| l.starts_with("LIGHTRELAY_") || l.starts_with("RUST_LOG="))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let dir = temp_dir("units");
    for unit in units() {
        // Only the program's path is swapped for the one cargo built (verify checks it exists).
        let text = std::fs::read_to_string(&unit).unwrap();
        let program = one(&settings(&unit), "ExecStart")
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        let name = unit.file_name().unwrap().to_str().unwrap();
        std::fs::write(dir.join(name), text.replace(&program, binary_for(&program))).unwrap();
        // A template is verified through an instance, as systemd would load it.
        let instance = name.replace("@.service", "@8775.service");
        let output = systemd_analyze()
            .args(["verify", "--man=no"])
            .arg(dir.join(&instance))
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{instance}: {said}");
        assert!(
            said.trim().is_empty(),
            "{instance}: systemd-analyze verify said:\n{said}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_unit_is_hardened_to_an_exposure_of_at_most_1_5() {
    let mut scores = Vec::new();
    for unit in units() {
        let output = systemd_analyze()
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level for"))
            .unwrap_or_else(|| {
                panic!(
                    "no overall exposure for {}:\n{stdout}{}",
                    unit.display(),
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        // "→ Overall exposure level for NAME: 1.1 OK 🙂"
        let score: f64 = line
            .rsplit_once(": ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("cannot read a score in {line:?}"));
        println!("{}: {score}", unit.file_name().unwrap().to_str().unwrap());
        scores.push((unit, score, stdout.to_string()));
    }
    for (unit, score, report) in scores {
        assert!(
            score <= MAX_EXPOSURE,
            "{}: exposure {score} > {MAX_EXPOSURE}:\n{report}",
            unit.display()
        );
    }
}

#[test]
fn each_unit_declares_restart_settings_ordering_and_file_limits() {
    for unit in units() {
        let s = settings(&unit);
        let name = unit.file_name().unwrap().to_str().unwrap();
        let role = if name.contains("publish") {
            "publish"
        } else {
            "subscribe"
        };
        assert_eq!(one(&s, "Type"), "notify", "{name}");
        assert_eq!(one(&s, "Restart"), "on-failure", "{name}");
        assert_eq!(
            values(&s, "EnvironmentFile"),
            [
                "-/etc/default/lightrelay".to_string(),
                format!("-/etc/default/lightrelay-{role}")
            ],
            "{name}: shared settings first, the role's own after (they win)"
        );
        let after = one(&s, "After");
        for needed in ["network-online.target", "redis-server.service"] {
            assert!(
                after.split_whitespace().any(|u| u == needed),
                "{name}: After={after}"
            );
        }
        assert_eq!(one(&s, "Wants"), "network-online.target", "{name}");
        let nofile: u64 = one(&s, "LimitNOFILE").parse().unwrap();
        assert!(nofile >= 65536, "{name}: LimitNOFILE={nofile}");
        assert_eq!(one(&s, "WantedBy"), "multi-user.target", "{name}");
        // SPEC §8: the secret reaches the dynamic user as a credential, the variable points at
        // it (an environment file may still name another), and reload is SIGHUP.
        assert_eq!(
            one(&s, "LoadCredential"),
            "jwt-secret:/etc/lightrelay/jwt-secret",
            "{name}"
        );
        assert_eq!(
            values(&s, "Environment"),
            ["LIGHTRELAY_JWT_SECRET_FILE=%d/jwt-secret"],
            "{name}"
        );
        assert_eq!(one(&s, "ExecReload"), "/bin/kill -HUP $MAINPID", "{name}");
        let exec = one(&s, "ExecStart");
        if name.contains('@') {
            assert_eq!(
                exec,
                format!("/usr/bin/lightrelay-{role} --listen 127.0.0.1:%i")
            );
        } else {
            assert_eq!(exec, format!("/usr/bin/lightrelay-{role}"));
        }
    }
}

#[test]
fn the_defaults_file_turns_publish_auth_on_and_leaves_the_secrets_path_to_the_units() {
    assert_eq!(
        shipped_settings(),
        [("LIGHTRELAY_AUTH".to_string(), "publish".to_string())],
        "deploy/lightrelay.default sets exactly LIGHTRELAY_AUTH=publish"
    );
}

#[test]
fn the_defaults_file_lists_every_server_setting_with_its_built_in_default() {
    let documented = documented_defaults();
    let mut seen = Vec::new();
    for program in [
        env!("CARGO_BIN_EXE_lightrelay-publish"),
        env!("CARGO_BIN_EXE_lightrelay-subscribe"),
    ] {
        // `--help` shows each flag's variable and built-in default.
        let help = Command::new(program)
            .arg("--help")
            .env_clear()
            .output()
            .unwrap();
        let help = String::from_utf8(help.stdout).unwrap();
        let mut current: Option<String> = None;
        for line in help.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("[env: ") {
                let name = rest.split('=').next().unwrap().to_string();
                if name == "LIGHTRELAY_LISTEN" {
                    // Per role, so never in the shared file (where both servers would read it).
                    assert!(
                        !documented.iter().any(|(k, _)| k == &name),
                        "LIGHTRELAY_LISTEN must not be a setting of the shared file"
                    );
                    current = None;
                    continue;
                }
                let entry = documented.iter().find(|(k, _)| k == &name);
                assert!(entry.is_some(), "deploy/lightrelay.default lacks #{name}=…");
                seen.push(name.clone());
                current = Some(name);
            } else if let (Some(rest), Some(name)) = (line.strip_prefix("[default: "), &current) {
                let default = rest.trim_end_matches(']');
                let (_, value) = documented.iter().find(|(k, _)| k == name).unwrap();
                assert_eq!(value, default, "#{name}= in deploy/lightrelay.default");
                current = None;
            }
        }
    }
    assert!(seen.len() >= 15, "read too few flags from --help: {seen:?}");
    for (name, _) in &documented {
        assert!(
            name == "RUST_LOG" || seen.contains(name),
            "deploy/lightrelay.default documents {name}, which no server has"
        );
    }
}

/// The server a test started, SIGKILLed if the test fails before it stopped it.
struct Killed(std::process::Child);

impl std::ops::Deref for Killed {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a unit's ExecStart as systemd would: only the environment files' settings, and a
/// notification socket; wait for READY=1, check it listens and is healthy, then SIGTERM it
/// and wait for STOPPING=1 and exit 0 within the unit's TimeoutStopSec.
async fn run_like_systemd(unit: &Path, redis: &Redis) {
    let name = unit.file_name().unwrap().to_str().unwrap().to_string();
    let s = settings(unit);
    let port = free_port();
    let exec = one(&s, "ExecStart").replace("%i", &port.to_string());
    let mut words = exec.split_whitespace();
    let program = binary_for(words.next().unwrap());

    let dir = temp_dir("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();

    // LoadCredential=ID:PATH: systemd copies PATH to $CREDENTIALS_DIRECTORY/ID (%d) at start.
    let credentials = dir.join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    let (id, source) = one(&s, "LoadCredential").split_once(':').unwrap();
    assert_eq!(source, "/etc/lightrelay/jwt-secret", "{name}");
    std::fs::write(credentials.join(id), format!("{}\n", jwt::SECRET)).unwrap();
    let unit_env: Vec<(String, String)> = values(&s, "Environment")
        .into_iter()
        .map(|assignment| {
            let (k, v) = assignment.split_once('=').unwrap();
            let v = v.replace("%d", credentials.to_str().unwrap());
            (k.to_string(), v)
        })
        .collect();

    let mut command = Command::new(program);
    command.args(words).env_clear();
    command.env("CREDENTIALS_DIRECTORY", &credentials);
    command.envs(unit_env.iter().cloned());
    // /etc/default/lightrelay as shipped, with every documented default switched on, but for
    // those the unit sets itself (an environment file would win over the unit's Environment=).
    command.envs(
        documented_defaults()
            .into_iter()
            .filter(|(k, _)| !unit_env.iter().any(|(u, _)| u == k)),
    );
    command.envs(shipped_settings());
    command.env("LIGHTRELAY_REDIS_URL", redis.url());
    if name.contains('@') {
        // The instance's address wins over one a role file might set.
        command.env("LIGHTRELAY_LISTEN", "127.0.0.1:1");
    } else {
        // What /etc/default/lightrelay-ROLE would say (8765/8767 may be taken here).
        command.env("LIGHTRELAY_LISTEN", format!("127.0.0.1:{port}"));
    }
    command.env("NOTIFY_SOCKET", &socket_path);
    let mut child = Killed(command.spawn().unwrap());

    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("{name}: no sd_notify message: {e}"));
    let message = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        message.lines().any(|l| l == "READY=1"),
        "{name}: {message:?}"
    );
    // READY=1 comes once the listener is bound.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "{name}: READY=1 before listening on {port}"
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + PATIENCE;
    while http(addr, "GET", "/healthz", &[], b"").await.0 != 200 {
        assert!(Instant::now() < deadline, "{name}: never healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The shipped LIGHTRELAY_AUTH=publish, checked with the credential's secret.
    if name.contains("publish") {
        let (status, _) = http(addr, "POST", "/sensors/a", &[], b"1").await;
        assert_eq!(status, 401, "{name}: a POST without a token");
        let token = jwt::token(&["/sensors/*"], &[]);
        let bearer = format!("Bearer {token}");
        let (status, body) = http(
            addr,
            "POST",
            "/sensors/a",
            &[("Authorization", bearer.as_str())],
            b"1",
        )
        .await;
        assert_eq!(status, 200, "{name}: {}", String::from_utf8_lossy(&body));
    }
    // ExecReload, as systemd runs it: the server stays up and healthy.
    let reload = one(&s, "ExecReload").replace("$MAINPID", &child.id().to_string());
    let mut reload = reload.split_whitespace();
    let status = Command::new(reload.next().unwrap())
        .args(reload)
        .status()
        .unwrap();
    assert!(status.success(), "{name}: ExecReload failed");
    // The signal is handled before the server runs again: an answer now means it survived.
    assert_eq!(http(addr, "GET", "/healthz", &[], b"").await.0, 200);
    assert!(
        child.try_wait().unwrap().is_none(),
        "{name}: SIGHUP ended it"
    );

    let stop_timeout: u64 = one(&s, "TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // (A reload may have said RELOADING=1 and READY=1 before.)
    let mut said = Vec::new();
    for _ in 0..10 {
        let n = socket.recv(&mut buf).expect("no STOPPING=1");
        let message = String::from_utf8_lossy(&buf[..n]).to_string();
        if message.lines().any(|l| l == "STOPPING=1") {
            break;
        }
        said.push(message);
        assert!(said.len() < 10, "{name}: no STOPPING=1 in {said:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(stop_timeout);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{name}: still running {stop_timeout}s after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0), "{name}: exit status after SIGTERM");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn each_unit_starts_its_server_with_the_defaults_file_and_reports_ready_then_stopping() {
    let redis = Redis::start().await;
    for unit in units() {
        run_like_systemd(&unit, &redis).await;
    }
}
