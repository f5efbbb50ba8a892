//! The man pages and shell completions: `lightrelay-docs OUT_DIR` (a packaging tool, thin
//! over [`main`]) writes the man pages and shell completions of the three programs
//! (`lightrelay`, `lightrelay-publish`, `lightrelay-subscribe`), generated from their clap
//! definitions, so they always say what `--help` says. The Debian package ships what it writes
//! (README, "Deploy"; `[package.metadata.deb]` in Cargo.toml):
//!
//! - `OUT_DIR/man/*.1`: one page per program and per client subcommand (`lightrelay-pub.1`, …),
//!   and beside each its `*.1.gz` (`gzip -9n`, as Debian wants them; cargo-deb does not compress
//!   files under target/release);
//! - `OUT_DIR/completions/bash/PROGRAM`, `zsh/_PROGRAM`, `fish/PROGRAM.fish`.
//!
//! Owns: nothing but writing those files. Must not: be packaged or run at build time (it is a
//! packaging step); it exits 1 with one line when it cannot write, 2 on bad usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, CommandFactory};
use clap_complete::Shell;

fn programs() -> [Command; 3] {
    [
        crate::client::args::Cli::command(),
        crate::server::config::PublishArgs::command(),
        crate::server::config::SubscribeArgs::command(),
    ]
}

fn write(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    for command in programs() {
        clap_mangen::generate_to(command, &man)?;
    }
    let mut gzip = std::process::Command::new("gzip");
    gzip.args(["-9", "-n", "-k", "-f", "--"]);
    for entry in std::fs::read_dir(&man)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "1") {
            gzip.arg(path);
        }
    }
    let status = gzip.status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!("gzip -9n failed ({status})")));
    }
    for (shell, dir, file) in [
        (Shell::Bash, "bash", "{}"),
        (Shell::Zsh, "zsh", "_{}"),
        (Shell::Fish, "fish", "{}.fish"),
    ] {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir)?;
        for mut command in programs() {
            let name = command.get_name().to_string();
            let mut bytes = Vec::new();
            clap_complete::generate(shell, &mut command, &name, &mut bytes);
            std::fs::write(dir.join(file.replace("{}", &name)), bytes)?;
        }
    }
    Ok(())
}

/// Run `lightrelay-docs` with its arguments (the program name left out).
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let args: Vec<String> = args.collect();
    let out = match args.as_slice() {
        [dir] if !dir.starts_with('-') => PathBuf::from(dir),
        _ => {
            eprintln!(
                "usage: lightrelay-docs OUT_DIR (writes OUT_DIR/man/*.1 and OUT_DIR/completions/{{bash,zsh,fish}}/)"
            );
            return ExitCode::from(2);
        }
    };
    match write(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lightrelay-docs: cannot write to {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}
