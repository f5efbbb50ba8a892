//! Issue 17, `bin/dev`: it fails with the server's reason (exit 1) when a server cannot come
//! up, rather than saying "lightrelay is running", and checks for python3 like its other
//! prerequisites. Run with `LIGHTRELAY_DEV_BIN_DIR` set to this test run's binaries (no release
//! build).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const PUBLISH: &str = env!("CARGO_BIN_EXE_lightrelay-publish");

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// Run `command` (its own process group) to its end, at most `limit`; past that, the group gets
/// SIGTERM (bin/dev's trap stops what it started) and the test fails.
fn run_bounded(command: &mut Command, limit: Duration) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    let dir = common::temp_dir("dev-out");
    let (out, err) = (dir.join("out"), dir.join("err"));
    let mut child = command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > limit {
            // SIGTERM to the group bin/dev leads (its trap stops what it started); SIGKILL to
            // the same group if that is not enough within 10 s.
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
            let stop = Instant::now();
            while child.try_wait().unwrap().is_none() && stop.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let said = format!(
        "{}{}",
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&err).unwrap()
    );
    std::fs::remove_dir_all(dir).unwrap();
    let Some(status) = status else {
        panic!("still running after {limit:?}:\n{said}");
    };
    (status.code(), said)
}

#[test]
fn bin_dev_exits_1_with_the_reason_when_a_servers_port_is_taken() {
    // Something silent holds the publish port: it listens and never answers.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port();
    let free = common::quiet_port();
    let (code, said) = run_bounded(
        Command::new(Path::new(REPO).join("bin/dev"))
            .env(
                "LIGHTRELAY_DEV_BIN_DIR",
                Path::new(PUBLISH).parent().unwrap(),
            )
            .env("LIGHTRELAY_DEV_PUBLISH_PORT", taken.to_string())
            .env("LIGHTRELAY_DEV_SUBSCRIBE_PORT", free.to_string())
            .env("NO_COLOR", "1"),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "{said}");
    assert!(!said.contains("lightrelay is running"), "{said}");
    assert!(
        said.contains(&format!(
            "bin/dev: publish did not start on 127.0.0.1:{taken}"
        )),
        "{said}"
    );
    assert!(
        said.contains("Address already in use"),
        "the reason:\n{said}"
    );
    assert!(
        said.contains("LIGHTRELAY_DEV_PUBLISH_PORT"),
        "the way out:\n{said}"
    );
    // Everything it started is stopped: the subscribe port is free again.
    common_eventually_free(free);
    drop(holder);
}

/// The port bin/dev's subscribe server had is free again (bounded poll: bin/dev waited for
/// its children before exiting, so this holds at once unless something is left behind).
fn common_eventually_free(port: u16) {
    let start = Instant::now();
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "port {port} is still held after bin/dev exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bin_dev_names_python3_among_missing_prerequisites() {
    // A PATH with everything bin/dev checks for except python3, as a user who is not root
    // (root would install it).
    let dir = common::temp_dir("dev-path");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["dirname", "id", "redis-server", "redis-cli", "curl"] {
        let found = Command::new("bash")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let path = String::from_utf8(found.stdout).unwrap();
        assert!(found.status.success(), "{tool} is not installed here");
        std::os::unix::fs::symlink(path.trim(), bin.join(tool)).unwrap();
    }
    let mut command = if is_root() {
        // By its full path: the PATH below is what the child looks programs up in.
        let setpriv = Command::new("bash")
            .args(["-c", "command -v setpriv"])
            .output()
            .unwrap();
        let mut c = Command::new(String::from_utf8(setpriv.stdout).unwrap().trim());
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/bin/bash",
        ]);
        c
    } else {
        Command::new("/bin/bash")
    };
    command
        .arg(Path::new(REPO).join("bin/dev"))
        .env_clear()
        .env("PATH", &bin);
    let output: Output = command.output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("bin/dev needs python3; install with: sudo apt-get install -y python3"),
        "{said}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// bin/dev started in its own process group; the group gets SIGTERM, then SIGKILL, if a test
/// ends (or fails) with it still running.
struct Running {
    child: std::process::Child,
    /// Where its stdout (`out`) and stderr (`err`) go.
    dir: std::path::PathBuf,
}

impl Running {
    /// What it printed so far: its stdout, then its (and its servers') stderr.
    fn said(&self) -> String {
        let read = |name| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}{}", read("out"), read("err"))
    }

    /// Wait (at most `limit`) until bin/dev has printed `what`; fails if it exits first.
    fn wait_for(&mut self, what: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let said = self.said();
            if said.contains(what) {
                return said;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("bin/dev exited ({status}) before saying {what:?}:\n{said}");
            }
            assert!(
                start.elapsed() < limit,
                "bin/dev did not say {what:?} within {limit:?}:\n{said}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            let group = format!("-{}", self.child.id());
            let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
            let stop = Instant::now();
            while self.child.try_wait().unwrap().is_none()
                && stop.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bin_dev_cluster_runs_the_servers_on_a_three_primary_cluster_and_tears_it_down() {
    use std::os::unix::process::CommandExt;
    let dir = common::temp_dir("dev-cluster");
    let (publish, subscribe) = (common::quiet_port(), common::quiet_port());
    let child = Command::new(Path::new(REPO).join("bin/dev"))
        .arg("--cluster")
        .env(
            "LIGHTRELAY_DEV_BIN_DIR",
            Path::new(PUBLISH).parent().unwrap(),
        )
        .env("LIGHTRELAY_DEV_PUBLISH_PORT", publish.to_string())
        .env("LIGHTRELAY_DEV_SUBSCRIBE_PORT", subscribe.to_string())
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("out")).unwrap())
        .stderr(std::fs::File::create(dir.join("err")).unwrap())
        .spawn()
        .unwrap();
    let mut dev = Running { child, dir };
    let said = dev.wait_for("lightrelay is running", Duration::from_secs(60));

    // `==> redis cluster: 127.0.0.1:P1 127.0.0.1:P2 127.0.0.1:P3 (3 primaries, …, in DIR)`
    let line = said
        .lines()
        .find(|l| l.starts_with("==> redis cluster: "))
        .unwrap_or_else(|| panic!("bin/dev did not name its cluster:\n{said}"));
    let nodes: Vec<u16> = line
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("127.0.0.1:")?.parse().ok())
        .collect();
    assert_eq!(nodes.len(), 3, "three nodes in: {line}");
    let state = line
        .rsplit_once(" in ")
        .map(|(_, d)| d.trim_end_matches(')').to_string())
        .unwrap();
    for &port in &nodes {
        let info = redis_cli(port, &["cluster", "info"]);
        for expected in [
            "cluster_state:ok",
            "cluster_slots_assigned:16384",
            "cluster_known_nodes:3",
            "cluster_size:3",
        ] {
            assert!(
                info.contains(expected),
                "node {port}: no {expected} in CLUSTER INFO:\n{info}"
            );
        }
    }
    // Both servers were given the three nodes as seeds, and the way to watch says SSUBSCRIBE.
    let seeds = format!(
        "redis://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
        nodes[0], nodes[1], nodes[2]
    );
    for role in ["publish", "subscribe"] {
        assert!(
            dev.said()
                .contains(&format!("redis={seeds} role=\"{role}\"")),
            "the {role} server does not run on the cluster's seeds:\n{}",
            dev.said()
        );
    }
    assert!(
        said.contains(&format!(
            "redis-cli -c -p {} ssubscribe lightlevel/office",
            nodes[0]
        )),
        "{said}"
    );

    // SIGTERM to bin/dev alone: its trap stops every node it started and removes their data.
    let status = Command::new("kill")
        .args(["-TERM", &dev.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    while dev.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "bin/dev did not stop on SIGTERM:\n{}",
            dev.said()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for &port in &nodes {
        // The node and its cluster bus are gone.
        common_eventually_free(port);
        common_eventually_free(port + 10_000);
    }
    assert!(
        !Path::new(&state).exists(),
        "bin/dev left the cluster's data in {state}"
    );
}
