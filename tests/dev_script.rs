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
