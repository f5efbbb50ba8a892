//! Issue 5, packaging: the Debian package built by `cargo deb` (contents, conffiles, maintainer
//! scripts; installed into a temporary root with dpkg, upgraded, removed, purged), and
//! `deploy/install.sh` / `deploy/uninstall.sh` run into a temporary root (DESTDIR), each
//! checked file by file, with the token secret both make (SPEC §8: 0600, root's, random, made
//! once and never replaced, gone on purge).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::temp_dir;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const PUBLISH: &str = env!("CARGO_BIN_EXE_lightrelay-publish");
const SUBSCRIBE: &str = env!("CARGO_BIN_EXE_lightrelay-subscribe");
const CLIENT: &str = env!("CARGO_BIN_EXE_lightrelay");
const DOCS: &str = env!("CARGO_BIN_EXE_lightrelay-docs");

fn repo_file(path: &str) -> Vec<u8> {
    std::fs::read(Path::new(REPO).join(path)).unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn succeed(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let said = text(&output);
    assert!(output.status.success(), "{command:?} failed:\n{said}");
    said
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// What a directory tree holds: files (mode, bytes) and symlinks (target); directories are
/// implied (a missing root is empty). Paths are relative to `root`, with a leading `/`.
#[derive(Debug, PartialEq)]
enum Entry {
    File(u32, Vec<u8>),
    Link(String),
    /// Expected only: the token secret, random, so checked by its form ([`check_secret`]).
    Secret,
}

const SECRET: &str = "/etc/lightrelay/jwt-secret";

/// The token secret install.sh and the postinst make (SPEC §8): mode 0600, owned by root
/// (when the test runs as root, as they then do), comment lines and one line of 32 random
/// bytes in base64. Returns the secret line.
fn check_secret(path: &Path) -> String {
    use base64::Engine;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap_or_else(|_| panic!("no {}", path.display()));
    assert!(meta.is_file(), "{} is not a plain file", path.display());
    assert_eq!(
        format!("{:o}", meta.permissions().mode() & 0o7777),
        "600",
        "mode of {}",
        path.display()
    );
    if is_root() {
        assert_eq!(
            (meta.uid(), meta.gid()),
            (0, 0),
            "owner of {}",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path).unwrap();
    let secrets: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        secrets.len(),
        1,
        "one secret line in {}:\n{text}",
        path.display()
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(secrets[0])
        .unwrap_or_else(|e| panic!("the secret is not base64 ({e}): {}", path.display()));
    assert_eq!(bytes.len(), 32, "the secret's length");
    assert!(
        bytes.iter().any(|&b| b != bytes[0]),
        "the secret is not random"
    );
    secrets[0].to_string()
}

fn tree(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.path());
        for entry in entries {
            let path = entry.path();
            let name = format!("/{}", path.strip_prefix(root).unwrap().display());
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(name, Entry::Link(target.display().to_string()));
            } else if meta.is_dir() {
                walk(root, &path, out);
            } else {
                let mode = meta.permissions().mode() & 0o7777;
                out.insert(name, Entry::File(mode, std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

fn file(mode: u32, bytes: Vec<u8>) -> Entry {
    Entry::File(mode, bytes)
}

fn link(target: &str) -> Entry {
    Entry::Link(target.to_string())
}

/// Compare a tree with what it should hold, naming the first difference.
fn assert_tree(root: &Path, expected: &BTreeMap<String, Entry>) {
    let actual = tree(root);
    let names = |m: &BTreeMap<String, Entry>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&actual),
        names(expected),
        "files under {}",
        root.display()
    );
    for (name, entry) in expected {
        let got = &actual[name];
        match (got, entry) {
            (Entry::File(m1, b1), Entry::File(m2, b2)) => {
                assert_eq!(format!("{m1:o}"), format!("{m2:o}"), "mode of {name}");
                assert!(b1 == b2, "content of {name} differs from what was shipped");
            }
            (Entry::File(..), Entry::Secret) => {
                check_secret(&root.join(&name[1..]));
            }
            _ => assert_eq!(got, entry, "{name}"),
        }
    }
}

fn with_sed(path: &str, from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(repo_file(path)).unwrap();
    assert!(text.contains(from), "{path} lacks {from}");
    text.replace(from, to).into_bytes()
}

const UNITS: [&str; 4] = [
    "lightrelay-publish.service",
    "lightrelay-subscribe.service",
    "lightrelay-publish@.service",
    "lightrelay-subscribe@.service",
];

// ---------------------------------------------------------------------------------------------
// The Debian package

/// Build the .deb with `cargo deb` from the binaries this test run built (copied where cargo-deb
/// expects release binaries, in a private target directory: no release build needed), with the
/// man pages and completions written first, as the README's packaging step does. No `--strip`:
/// whether the binaries are stripped is the manifest's release profile's say, as for a user's
/// `cargo deb` (these debug binaries carry full debug info, so a profile that keeps debug info
/// would ship it).
fn build_deb(dir: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has_cargo_deb = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_cargo_deb,
        "cargo-deb is missing: bin/test installs it (cargo install --locked cargo-deb)"
    );
    let release = dir.join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    for program in [PUBLISH, SUBSCRIBE, CLIENT] {
        let name = Path::new(program).file_name().unwrap();
        std::fs::copy(program, release.join(name)).unwrap();
    }
    succeed(Command::new(DOCS).arg(release.join("docs")));
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    succeed(
        Command::new(&cargo)
            .current_dir(REPO)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .args(["deb", "--no-build", "--fast", "--offline", "--quiet"])
            .arg("--output")
            .arg(&out),
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    debs[0].clone()
}

/// Files the package installs that come from the repository unchanged: (path, source, mode).
const PACKAGED: [(&str, &str, u32); 10] = [
    (
        "/usr/lib/systemd/system/lightrelay-publish.service",
        "systemd/lightrelay-publish.service",
        0o644,
    ),
    (
        "/usr/lib/systemd/system/lightrelay-subscribe.service",
        "systemd/lightrelay-subscribe.service",
        0o644,
    ),
    (
        "/usr/lib/systemd/system/lightrelay-publish@.service",
        "systemd/lightrelay-publish@.service",
        0o644,
    ),
    (
        "/usr/lib/systemd/system/lightrelay-subscribe@.service",
        "systemd/lightrelay-subscribe@.service",
        0o644,
    ),
    (
        "/etc/default/lightrelay",
        "deploy/lightrelay.default",
        0o644,
    ),
    (
        "/etc/nginx/conf.d/lightrelay-upstreams.conf",
        "nginx/lightrelay-upstreams.conf",
        0o644,
    ),
    (
        "/etc/nginx/sites-available/lightrelay",
        "nginx/lightrelay.conf",
        0o644,
    ),
    (
        "/etc/nginx/sites-available/lightrelay-tls",
        "nginx/lightrelay-tls.conf",
        0o644,
    ),
    ("/usr/share/doc/lightrelay/README.md", "README.md", 0o644),
    ("/usr/bin/lightrelay-publish", "", 0o755),
];

const CONFFILES: [&str; 4] = [
    "/etc/default/lightrelay",
    "/etc/nginx/conf.d/lightrelay-upstreams.conf",
    "/etc/nginx/sites-available/lightrelay",
    "/etc/nginx/sites-available/lightrelay-tls",
];

#[test]
fn cargo_deb_packages_binaries_units_sites_and_settings_with_enable_only_scripts() {
    let dir = temp_dir("deb");
    let deb = build_deb(&dir);

    // Control fields.
    let info = succeed(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for field in [
        "Package: lightrelay",
        "Version: 0.1.0-1",
        "Section: net",
        "Recommends: redis-server, nginx",
    ] {
        assert!(info.contains(field), "no `{field}` in:\n{info}");
    }
    assert!(info.contains("Depends: libc6"), "{info}");

    // The file list, with modes.
    let listing = succeed(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mut files: Vec<(String, String)> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let path = fields.last().unwrap().trim_start_matches('.').to_string();
            (path, fields[0].to_string())
        })
        .collect();
    files.sort();
    let mut expected: Vec<(String, String)> = PACKAGED
        .iter()
        .map(|(path, _, mode)| {
            let perms = if *mode == 0o755 {
                "-rwxr-xr-x"
            } else {
                "-rw-r--r--"
            };
            (path.to_string(), perms.to_string())
        })
        .chain([
            ("/usr/bin/lightrelay-subscribe".into(), "-rwxr-xr-x".into()),
            ("/usr/bin/lightrelay".into(), "-rwxr-xr-x".into()),
            (
                "/usr/share/doc/lightrelay/copyright".into(),
                "-rw-r--r--".into(),
            ),
        ])
        .chain(
            packaged_docs(&dir.join("target/release/docs"))
                .into_iter()
                .map(|path| (path, "-rw-r--r--".to_string())),
        )
        .collect();
    expected.sort();
    assert_eq!(files, expected, "dpkg-deb -c:\n{listing}");

    // Conffiles and maintainer scripts.
    let control = dir.join("control");
    succeed(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), CONFFILES);
    for script in ["postinst", "prerm", "postrm"] {
        let shipped = control.join(script);
        assert_eq!(
            std::fs::read(&shipped).unwrap(),
            repo_file(&format!("deploy/debian/{script}")),
            "{script} differs from deploy/debian/{script}"
        );
        let mode = std::fs::metadata(&shipped).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{script} is not executable");
        let text = std::fs::read_to_string(&shipped).unwrap();
        // Enable, never start: no start, restart, or enable --now (try-restart only restarts
        // what already runs, on upgrades). And no package manager calls.
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let words: Vec<&str> = line.split_whitespace().collect();
            for forbidden in ["start", "restart", "--now", "reload-or-restart"] {
                assert!(!words.contains(&forbidden), "{script}: `{line}`");
            }
            for tool in ["apt", "apt-get", "dpkg"] {
                assert!(!words.contains(&tool), "{script}: `{line}`");
            }
        }
        let sh = Command::new("sh").arg("-n").arg(&shipped).output().unwrap();
        assert!(sh.status.success(), "{script}: {}", text_of(&sh));
    }
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("systemctl --no-reload --quiet enable $UNITS"));

    // The binaries in it run.
    let unpacked = dir.join("unpacked");
    succeed(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked));
    for program in ["lightrelay-publish", "lightrelay-subscribe", "lightrelay"] {
        let binary = unpacked.join("usr/bin").join(program);
        succeed(Command::new(&binary).arg("--help"));
        // Issue 17: stripped (the package once installed 213 MB, nearly all debug info).
        let sections = succeed(Command::new("readelf").arg("-SW").arg(&binary));
        assert!(
            !sections.contains(".debug_info"),
            "{program} in the package carries debug info:\n{sections}"
        );
    }
    // Issue 17: the man pages, gzipped where man finds them, name the programs' flags.
    for (page, flag) in [
        ("lightrelay-publish", "--redis-url"),
        ("lightrelay-subscribe", "--redis-url"),
        ("lightrelay", "--ca"),
        ("lightrelay-pub", "--binary"),
    ] {
        let gz = unpacked.join(format!("usr/share/man/man1/{page}.1.gz"));
        let roff = succeed(Command::new("gzip").arg("-dc").arg(&gz));
        assert!(roff.contains(".TH "), "{page}.1 is not a man page:\n{roff}");
        assert!(
            roff.contains(&flag.replace('-', "\\-")),
            "{page}.1 does not name {flag}:\n{roff}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Where the package puts what `lightrelay-docs` wrote into `docs`: man pages (gzipped) and the bash, zsh and fish completions, at the paths Debian's man, bash-completion,
/// zsh and fish look in.
fn packaged_docs(docs: &Path) -> Vec<String> {
    let names = |sub: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(docs.join(sub))
            .unwrap_or_else(|e| panic!("{}/{sub}: {e}", docs.display()))
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let mut paths = Vec::new();
    for (sub, dest, suffix) in [
        ("man", "/usr/share/man/man1", ".1.gz"),
        (
            "completions/bash",
            "/usr/share/bash-completion/completions",
            "",
        ),
        ("completions/zsh", "/usr/share/zsh/vendor-completions", ""),
        (
            "completions/fish",
            "/usr/share/fish/vendor_completions.d",
            "",
        ),
    ] {
        let found: Vec<String> = names(sub)
            .into_iter()
            .filter(|n| n.ends_with(suffix))
            .collect();
        assert!(found.len() >= 3, "{sub}: {found:?}");
        paths.extend(found.iter().map(|n| format!("{dest}/{n}")));
    }
    paths
}

fn text_of(output: &Output) -> String {
    text(output)
}

/// dpkg on a private root and database: maintainer scripts run outside a chroot with
/// DPKG_ROOT set, as for an image build.
fn dpkg(root: &Path) -> Command {
    let mut command = Command::new("dpkg");
    command
        .arg(format!("--root={}", root.display()))
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args([
            "--log=/dev/null",
            "--force-not-root",
            "--force-script-chrootless",
        ])
        .args(["--force-depends", "--force-unsafe-io", "--force-confold"]);
    command
}

fn wants(root: &Path, unit: &str) -> PathBuf {
    root.join("etc/systemd/system/multi-user.target.wants")
        .join(unit)
}

#[test]
fn the_package_installs_into_a_root_enabled_not_started_and_keeps_settings_until_purged() {
    let dir = temp_dir("dpkg");
    let deb = build_deb(&dir);
    let root = dir.join("root");
    for sub in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("var/lib/dpkg/available"), "").unwrap();

    succeed(dpkg(&root).arg("-i").arg(&deb));

    // Every file, from the repository unchanged (binaries: the stripped ones run).
    for (path, source, mode) in PACKAGED {
        let installed = root.join(&path[1..]);
        let meta = std::fs::metadata(&installed).unwrap_or_else(|_| panic!("no {path}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of {path}");
        if !source.is_empty() {
            assert!(
                std::fs::read(&installed).unwrap() == repo_file(source),
                "{path} differs from {source}"
            );
        }
    }
    for program in ["lightrelay-publish", "lightrelay-subscribe", "lightrelay"] {
        succeed(Command::new(root.join("usr/bin").join(program)).arg("--help"));
    }
    // The postinst made the token secret.
    let secret = check_secret(&root.join(&SECRET[1..]));
    // Enabled (the postinst ran), pointing at the packaged units; templates not instantiated.
    for unit in ["lightrelay-publish.service", "lightrelay-subscribe.service"] {
        let target = std::fs::read_link(wants(&root, unit))
            .unwrap_or_else(|_| panic!("{unit} was not enabled"));
        assert_eq!(target, Path::new("/usr/lib/systemd/system").join(unit));
    }
    let enabled: Vec<_> =
        std::fs::read_dir(root.join("etc/systemd/system/multi-user.target.wants"))
            .unwrap()
            .collect();
    assert_eq!(enabled.len(), 2);
    let status = succeed(dpkg(&root).args(["--status", "lightrelay"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    for conffile in CONFFILES {
        assert!(
            status.contains(&format!(" {conffile} ")),
            "{conffile} not a conffile:\n{status}"
        );
    }

    // Upgrade (reinstall): an edited setting is kept, a unit the admin disabled stays disabled.
    let settings = root.join("etc/default/lightrelay");
    std::fs::write(&settings, "LIGHTRELAY_CHANNEL_PREFIX=mine\n").unwrap();
    std::fs::remove_file(wants(&root, "lightrelay-publish.service")).unwrap();
    succeed(dpkg(&root).arg("-i").arg(&deb));
    assert_eq!(
        std::fs::read_to_string(&settings).unwrap(),
        "LIGHTRELAY_CHANNEL_PREFIX=mine\n"
    );
    // (symlink_metadata: the links point into the root, at paths absent on this host.)
    assert!(std::fs::symlink_metadata(wants(&root, "lightrelay-publish.service")).is_err());
    assert!(std::fs::symlink_metadata(wants(&root, "lightrelay-subscribe.service")).is_ok());
    assert_eq!(
        check_secret(&root.join(&SECRET[1..])),
        secret,
        "an upgrade replaced the secret"
    );

    // An instance of a template, enabled by the admin.
    succeed(
        Command::new("systemctl")
            .arg(format!("--root={}", root.display()))
            .args(["--quiet", "enable", "lightrelay-subscribe@8777.service"]),
    );
    assert!(std::fs::symlink_metadata(wants(&root, "lightrelay-subscribe@8777.service")).is_ok());

    // What the README has the admin do (issue 17): enable both sites (the TLS one under a name
    // of their own, by an absolute link), per-server settings, a `systemctl edit` drop-in;
    // beside the host's own default site, which must stay.
    let etc = root.join("etc");
    std::fs::write(etc.join("nginx/sites-available/default"), "server {}\n").unwrap();
    std::fs::create_dir_all(etc.join("nginx/sites-enabled")).unwrap();
    for (name, target) in [
        ("default", "../sites-available/default"),
        ("lightrelay", "../sites-available/lightrelay"),
        ("relay-tls", "/etc/nginx/sites-available/lightrelay-tls"),
    ] {
        std::os::unix::fs::symlink(target, etc.join("nginx/sites-enabled").join(name)).unwrap();
    }
    std::fs::write(
        etc.join("default/lightrelay-subscribe"),
        "LIGHTRELAY_LISTEN=[::]:8767\n",
    )
    .unwrap();
    std::fs::write(
        etc.join("default/lightrelay-publish"),
        "LIGHTRELAY_LOG_FORMAT=json\n",
    )
    .unwrap();
    let drop_in = etc.join("systemd/system/lightrelay-subscribe.service.d");
    std::fs::create_dir_all(&drop_in).unwrap();
    std::fs::write(drop_in.join("override.conf"), "[Service]\nNice=5\n").unwrap();

    // Remove: programs, units, every enablement and both sites gone; settings kept.
    succeed(dpkg(&root).args(["--remove", "lightrelay"]));
    let left = tree(&root.join("etc"))
        .into_keys()
        .chain(tree(&root.join("usr")).into_keys())
        .collect::<Vec<_>>();
    assert_eq!(
        left,
        [
            "/default/lightrelay",
            "/default/lightrelay-publish",
            "/default/lightrelay-subscribe",
            "/lightrelay/jwt-secret",
            "/nginx/conf.d/lightrelay-upstreams.conf",
            "/nginx/sites-available/default",
            "/nginx/sites-available/lightrelay",
            "/nginx/sites-available/lightrelay-tls",
            "/nginx/sites-enabled/default",
            "/systemd/system/lightrelay-subscribe.service.d/override.conf",
        ],
        "after dpkg --remove"
    );
    assert_no_dangling_sites(&root);
    // Purge: nothing of ours left, and no link in sites-enabled dangles (nginx -t would fail).
    succeed(dpkg(&root).args(["--purge", "lightrelay"]));
    assert_eq!(
        tree(&root.join("etc")).into_keys().collect::<Vec<_>>(),
        [
            "/nginx/sites-available/default",
            "/nginx/sites-enabled/default",
        ],
        "after dpkg --purge"
    );
    assert_no_dangling_sites(&root);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Every link in `root`'s /etc/nginx/sites-enabled resolves (inside `root`) to a file: a
/// dangling one makes `nginx -t` fail, and with it every reload and start of nginx.
fn assert_no_dangling_sites(root: &Path) {
    let enabled = root.join("etc/nginx/sites-enabled");
    let Ok(entries) = std::fs::read_dir(&enabled) else {
        return;
    };
    for entry in entries {
        let link = entry.unwrap().path();
        let Ok(target) = std::fs::read_link(&link) else {
            continue;
        };
        let resolved = match target.strip_prefix("/") {
            Ok(absolute) => root.join(absolute),
            Err(_) => enabled.join(&target),
        };
        assert!(
            resolved.is_file(),
            "{} -> {} dangles",
            link.display(),
            target.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// deploy/install.sh and deploy/uninstall.sh

fn script(name: &str) -> Command {
    let mut command = Command::new("bash");
    command.arg(Path::new(REPO).join("deploy").join(name));
    command
}

/// A copy of the built binaries in the test's directory, for `install.sh --bin-dir`: what the
/// test compares with cannot change under it (another build may relink target/debug).
/// `deploy/install.sh --bin-dir` with this test's binaries.
fn install_sh(dir: &Path) -> Command {
    let mut command = script("install.sh");
    command.arg("--bin-dir").arg(bin_dir(dir));
    command
}

fn bin_dir(dir: &Path) -> PathBuf {
    let bins = dir.join("bin");
    if !bins.exists() {
        std::fs::create_dir_all(&bins).unwrap();
        for program in [PUBLISH, SUBSCRIBE, CLIENT] {
            std::fs::copy(program, bins.join(Path::new(program).file_name().unwrap())).unwrap();
        }
    }
    bins
}

/// What install.sh puts under DESTDIR with `prefix` (binaries in PREFIX/bin), from the
/// binaries of `bin_dir(dir)`.
fn installed(dir: &Path, prefix: &str, tls_host: Option<&str>) -> BTreeMap<String, Entry> {
    let mut expected = BTreeMap::new();
    for name in ["lightrelay-publish", "lightrelay-subscribe", "lightrelay"] {
        expected.insert(
            format!("{prefix}/bin/{name}"),
            file(0o755, std::fs::read(bin_dir(dir).join(name)).unwrap()),
        );
    }
    for unit in UNITS {
        let bytes = with_sed(
            &format!("systemd/{unit}"),
            "ExecStart=/usr/bin/",
            &format!("ExecStart={prefix}/bin/"),
        );
        expected.insert(format!("/etc/systemd/system/{unit}"), file(0o644, bytes));
    }
    for unit in ["lightrelay-publish.service", "lightrelay-subscribe.service"] {
        expected.insert(
            format!("/etc/systemd/system/multi-user.target.wants/{unit}"),
            link(&format!("/etc/systemd/system/{unit}")),
        );
    }
    expected.insert(
        "/etc/default/lightrelay".into(),
        file(0o644, repo_file("deploy/lightrelay.default")),
    );
    expected.insert(SECRET.into(), Entry::Secret);
    expected.insert(
        "/etc/nginx/conf.d/lightrelay-upstreams.conf".into(),
        file(0o644, repo_file("nginx/lightrelay-upstreams.conf")),
    );
    expected.insert(
        "/etc/nginx/sites-available/lightrelay".into(),
        file(0o644, repo_file("nginx/lightrelay.conf")),
    );
    let tls = match tls_host {
        Some(host) => with_sed("nginx/lightrelay-tls.conf", "lightrelay.example.com", host),
        None => repo_file("nginx/lightrelay-tls.conf"),
    };
    expected.insert(
        "/etc/nginx/sites-available/lightrelay-tls".into(),
        file(0o644, tls),
    );
    expected.insert(
        "/etc/nginx/sites-enabled/lightrelay".into(),
        link("../sites-available/lightrelay"),
    );
    expected
}

#[test]
fn install_sh_stages_every_file_under_destdir_and_a_second_run_changes_nothing() {
    let dir = temp_dir("install");
    let root = dir.join("root");
    let first = succeed(install_sh(&dir).env("DESTDIR", &root));
    assert_tree(&root, &installed(&dir, "/usr/local", None));
    assert!(
        first.contains("+ install -D -m 0755"),
        "prints what it does:\n{first}"
    );

    let secret = check_secret(&root.join(&SECRET[1..]));

    let second = succeed(install_sh(&dir).arg("--destdir").arg(&root));
    assert_tree(&root, &installed(&dir, "/usr/local", None));
    assert!(
        !second.contains("+ install"),
        "second run installed again:\n{second}"
    );
    assert_eq!(
        check_secret(&root.join(&SECRET[1..])),
        secret,
        "a second run replaced the secret (every token minted with it would stop working)"
    );
    assert!(
        second.contains("= /etc/lightrelay/jwt-secret (kept"),
        "{second}"
    );
    assert!(
        second.contains("= /etc/default/lightrelay (unchanged)"),
        "{second}"
    );

    // A host name, with its certificate present: the TLS site gets it and is enabled.
    let live = root.join("etc/letsencrypt/live/relay.test");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::write(live.join("fullchain.pem"), "cert").unwrap();
    succeed(
        install_sh(&dir)
            .args(["--domain", "relay.test"])
            .env("DESTDIR", &root),
    );
    std::fs::remove_dir_all(root.join("etc/letsencrypt")).unwrap();
    // The site as shipped is no edit of the admin's: it is replaced.
    let mut expected = installed(&dir, "/usr/local", Some("relay.test"));
    expected.insert(
        "/etc/nginx/sites-enabled/lightrelay-tls".into(),
        link("../sites-available/lightrelay-tls"),
    );
    assert_tree(&root, &expected);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn install_sh_with_a_domain_and_prefix_writes_them_into_the_site_and_units() {
    let dir = temp_dir("install-prefix");
    let root = dir.join("root");
    succeed(
        install_sh(&dir)
            .args(["--prefix", "/opt/lightrelay", "--domain", "relay.test"])
            .arg(format!("--destdir={}", root.display())),
    );
    // No certificate yet: the TLS site is installed with the host name but not enabled.
    assert_tree(
        &root,
        &installed(&dir, "/opt/lightrelay", Some("relay.test")),
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn install_sh_keeps_edited_settings_and_sets_the_shipped_file_beside_them() {
    let dir = temp_dir("install-edit");
    let root = dir.join("root");
    let install = || succeed(install_sh(&dir).env("DESTDIR", &root));
    install();
    let settings = root.join("etc/default/lightrelay");
    std::fs::write(&settings, "LIGHTRELAY_REDIS_URL=redis://10.0.0.5:6379\n").unwrap();
    let said = install();
    assert!(
        said.contains("/etc/default/lightrelay was edited here: kept"),
        "{said}"
    );
    let mut expected = installed(&dir, "/usr/local", None);
    expected.insert(
        "/etc/default/lightrelay".into(),
        file(
            0o644,
            b"LIGHTRELAY_REDIS_URL=redis://10.0.0.5:6379\n".to_vec(),
        ),
    );
    expected.insert(
        "/etc/default/lightrelay.new".into(),
        file(0o644, repo_file("deploy/lightrelay.default")),
    );
    assert_tree(&root, &expected);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn install_sh_dry_run_prints_each_step_and_changes_nothing() {
    let dir = temp_dir("install-dry");
    let root = dir.join("root");
    let said = succeed(install_sh(&dir).arg("--dry-run").env("DESTDIR", &root));
    assert!(!root.exists(), "--dry-run created {}", root.display());
    for path in installed(&dir, "/usr/local", None).keys() {
        if path.contains(".wants/") {
            continue;
        }
        let target = format!("{}{path}", root.display());
        assert!(
            said.contains(&target),
            "--dry-run does not mention {target}:\n{said}"
        );
    }
    assert!(said.contains("systemctl --root="), "{said}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn install_sh_and_uninstall_sh_refuse_clearly_without_root_nginx_or_systemd() {
    // Not root, no DESTDIR: refused before anything is touched.
    for name in ["install.sh", "uninstall.sh"] {
        let mut command = if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash"]);
            c
        } else {
            Command::new("bash")
        };
        let output = command
            .arg(Path::new(REPO).join("deploy").join(name))
            .env_remove("DESTDIR")
            .output()
            .unwrap();
        let said = text(&output);
        assert_eq!(output.status.code(), Some(1), "{name}: {said}");
        assert!(said.contains("run me as root"), "{name}: {said}");
        assert!(
            said.contains("--destdir"),
            "{name} names the way out: {said}"
        );
    }
    if !is_root() {
        println!("not root: the nginx and systemd refusals need root to be reached");
        return;
    }
    // Root, no nginx (dry run, so that nothing could change even if it went on).
    let output = script("install.sh")
        .args(["--dry-run", "--bin-dir"])
        .arg(Path::new(PUBLISH).parent().unwrap())
        .env_remove("DESTDIR")
        .env("NGINX", "/nonexistent/nginx")
        .output()
        .unwrap();
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("nginx is not installed: apt-get install nginx"),
        "{said}"
    );
    // Root, nginx, but no systemd running (as in this container).
    if Path::new("/run/systemd/system").exists() {
        println!("systemd runs here: its refusal cannot be seen");
        return;
    }
    let output = script("install.sh")
        .args(["--dry-run", "--bin-dir"])
        .arg(Path::new(PUBLISH).parent().unwrap())
        .env_remove("DESTDIR")
        .output()
        .unwrap();
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("systemd is not running"), "{said}");
}

#[test]
fn uninstall_sh_removes_what_install_sh_staged_and_keeps_settings_unless_purged() {
    let dir = temp_dir("uninstall");
    let root = dir.join("root");
    let install = || succeed(install_sh(&dir).env("DESTDIR", &root));
    install();
    // An instance the admin enabled goes too.
    succeed(
        Command::new("systemctl")
            .arg(format!("--root={}", root.display()))
            .args(["--quiet", "enable", "lightrelay-publish@8775.service"]),
    );
    let dry = succeed(
        script("uninstall.sh")
            .arg("--dry-run")
            .env("DESTDIR", &root),
    );
    assert!(dry.contains("lightrelay-publish@8775.service"), "{dry}");
    assert_eq!(
        tree(&root).len(),
        installed(&dir, "/usr/local", None).len() + 1
    );

    succeed(script("uninstall.sh").env("DESTDIR", &root));
    let left: Vec<String> = tree(&root).into_keys().collect();
    assert_eq!(left, ["/etc/default/lightrelay", SECRET]);

    install();
    // What the README has the admin add (issue 17): the TLS site enabled under a name of their
    // own, per-server settings, a `systemctl edit` drop-in.
    let etc = root.join("etc");
    std::os::unix::fs::symlink(
        "/etc/nginx/sites-available/lightrelay-tls",
        etc.join("nginx/sites-enabled/relay-tls"),
    )
    .unwrap();
    std::fs::write(
        etc.join("default/lightrelay-subscribe"),
        "LIGHTRELAY_LISTEN=[::]:8767\n",
    )
    .unwrap();
    let drop_in = etc.join("systemd/system/lightrelay-publish.service.d");
    std::fs::create_dir_all(&drop_in).unwrap();
    std::fs::write(drop_in.join("override.conf"), "[Service]\nNice=5\n").unwrap();
    succeed(script("uninstall.sh").arg("--purge").env("DESTDIR", &root));
    assert_no_dangling_sites(&root);
    assert!(tree(&root).is_empty(), "{:?}", tree(&root).keys());
    std::fs::remove_dir_all(dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Man pages and completions (issue 17)

#[test]
fn lightrelay_docs_writes_man_pages_that_render_and_completions_that_know_the_subcommands() {
    let dir = temp_dir("docs");
    succeed(Command::new(DOCS).arg(&dir));
    let has_man = Command::new("man")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    for (program, flags) in [
        (
            "lightrelay-publish",
            &["--redis-url", "--listen", "--channel-prefix"][..],
        ),
        (
            "lightrelay-subscribe",
            &["--redis-url", "--listen", "--channel-prefix"][..],
        ),
        ("lightrelay", &["--ca"][..]),
        ("lightrelay-sub", &["--count", "--raw"][..]),
    ] {
        let page = dir.join(format!("man/{program}.1"));
        let roff = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{program}.1: {e}"));
        assert!(roff.starts_with(".ie") || roff.contains(".TH "), "{roff}");
        let shown = if has_man {
            // man -l: the page as a reader sees it (roff's `\-` becomes `-`).
            succeed(
                Command::new("man")
                    .arg("-l")
                    .arg(&page)
                    .env("MANWIDTH", "100")
                    .env("PAGER", "cat"),
            )
        } else {
            println!("no man here: checking the roff source");
            roff.replace("\\-", "-")
        };
        for flag in flags {
            assert!(
                shown.contains(flag),
                "{program}.1 does not name {flag}:\n{shown}"
            );
        }
    }
    let bash = std::fs::read_to_string(dir.join("completions/bash/lightrelay")).unwrap();
    for word in ["pub", "sub", "token", "--ca"] {
        assert!(
            bash.split(|c: char| c.is_whitespace() || c == '"' || c == '|')
                .any(|w| w == word),
            "the bash completion does not know `{word}`"
        );
    }
    for (file, word) in [
        ("completions/bash/lightrelay-publish", "--redis-url"),
        ("completions/zsh/_lightrelay", "token"),
        ("completions/fish/lightrelay-subscribe.fish", "redis-url"),
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(text.contains(word), "{file} does not mention {word}");
    }
    // Bad usage: one line, exit 2.
    let output = Command::new(DOCS).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    std::fs::remove_dir_all(dir).unwrap();
}
