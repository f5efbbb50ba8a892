//! `lightrelay-docs OUT_DIR`: the man pages and shell completions for the package. See
//! `lightrelay::docs`.

fn main() -> std::process::ExitCode {
    lightrelay::docs::main(std::env::args().skip(1))
}
