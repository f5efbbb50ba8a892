//! Logging set-up: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON.
//!
//! Owns: the global subscriber (colour only when stderr is a terminal and `NO_COLOR` is unset
//! or empty), and the last guard that keeps tokens out of logs: every line
//! passes [`redact`] on its way to stderr, so a `token=…` or `Bearer …` that reached a log
//! field (a URI in an error, a header in a debug line) is written as `[redacted]`. Owns too:
//! that a stderr which cannot be written (a closed pipe) costs nothing but the line: the
//! writer ignores write errors (tracing's own writer reports them with `eprint!`, which
//! panics, and once panicked the signal task never stopped the server), and
//! [`error_line`] replaces `eprintln!` for the lines said outside tracing; and the periodic
//! summary line ([`summarise`], one task per process, reading the metrics' counters).
//! Must not: be called twice, log message payloads, or count anything on the message path.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::server::config::LogFormat;
use crate::server::metrics::{Metrics, Totals};

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(Redacting);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything but nothing
/// (<https://no-color.org>): a journal or a file shows escape codes as noise.
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// `error: {what}` on stderr, for what is said before logging (bad flags) or past it. A
/// stderr that cannot be written (a closed pipe) loses the line: `eprintln!` would panic,
/// and a server must still start, stop and exit with its code.
pub(crate) fn error_line(what: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "error: {what}");
}

/// Every `every` (`--log-summary-interval`), one `info` line of what happened meanwhile,
/// from the counters the metrics keep anyway; nothing for an interval with no connection
/// open and nothing happening. One task per process, until shutdown.
pub(crate) async fn summarise(metrics: Metrics, every: Duration, shutdown: CancellationToken) {
    if every.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = metrics.totals();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = metrics.totals();
        if let Some(s) = Summary::between(last, now) {
            tracing::info!(
                every = %humantime::format_duration(every),
                opened = s.opened,
                closed = s.closed,
                open = s.open,
                messages_in = s.messages_in,
                messages_out = s.messages_out,
                "summary"
            );
        }
        last = now;
    }
}

/// One summary line's numbers.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    opened: u64,
    closed: u64,
    open: u64,
    messages_in: u64,
    messages_out: u64,
}

impl Summary {
    /// What happened from `then` to `now`; `None` when nothing did and nothing is open.
    fn between(then: Totals, now: Totals) -> Option<Summary> {
        let closed = now.closed.saturating_sub(then.closed);
        // Every connection open now and not then was opened, and so was every one closed.
        let opened = (now.open + closed).saturating_sub(then.open);
        let summary = Summary {
            opened,
            closed,
            open: now.open,
            messages_in: now.messages_in.saturating_sub(then.messages_in),
            messages_out: now.messages_out.saturating_sub(then.messages_out),
        };
        (summary
            != Summary {
                opened: 0,
                closed: 0,
                open: 0,
                messages_in: 0,
                messages_out: 0,
            })
        .then_some(summary)
    }
}

/// Stderr, through [`redact`]. tracing's formatter writes each event with one `write_all`,
/// so a token never arrives split over two writes.
struct Redacting;

impl<'a> MakeWriter<'a> for Redacting {
    type Writer = RedactingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter
    }
}

struct RedactingWriter;

impl Write for RedactingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A log line that cannot be written is lost, not a reason to fail the caller.
        let _ = std::io::stderr().write_all(&redact(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// What follows one of these (case-insensitive) up to a delimiter is a credential.
const MARKERS: [&[u8]; 2] = [b"token=", b"bearer "];
const REDACTED: &[u8] = b"[redacted]";

/// `line` with every credential after a [`MARKERS`] entry replaced by `[redacted]`.
pub(crate) fn redact(line: &[u8]) -> Cow<'_, [u8]> {
    let lower = line.to_ascii_lowercase();
    if !MARKERS
        .iter()
        .any(|m| lower.windows(m.len()).any(|w| w == *m))
    {
        return Cow::Borrowed(line);
    }
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let marker = MARKERS.iter().find(|m| lower[i..].starts_with(m));
        let Some(marker) = marker else {
            out.push(line[i]);
            i += 1;
            continue;
        };
        out.extend_from_slice(&line[i..i + marker.len()]);
        i += marker.len();
        let end = line[i..]
            .iter()
            .position(|&b| b.is_ascii_whitespace() || b"&\"'\\,;)>".contains(&b))
            .map_or(line.len(), |n| i + n);
        if end > i {
            out.extend_from_slice(REDACTED);
        }
        i = end;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::redact;

    fn r(s: &str) -> String {
        String::from_utf8(redact(s.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn tokens_in_queries_and_headers_are_redacted() {
        assert_eq!(
            r("GET /a?x=1&token=eyJ.abc.def&y=2 HTTP/1.1"),
            "GET /a?x=1&token=[redacted]&y=2 HTTP/1.1"
        );
        assert_eq!(
            r(r#"{"uri":"/a?token=eyJ.abc"}"#),
            r#"{"uri":"/a?token=[redacted]"}"#
        );
        assert_eq!(
            r("authorization: Bearer eyJ.x.y\n"),
            "authorization: Bearer [redacted]\n"
        );
        assert_eq!(r("TOKEN=abc"), "TOKEN=[redacted]");
    }

    #[test]
    fn a_summary_counts_what_happened_in_its_interval_and_none_is_given_for_nothing() {
        use super::{Summary, Totals};
        let then = Totals {
            open: 3,
            closed: 10,
            messages_in: 100,
            messages_out: 250,
        };
        let now = Totals {
            open: 2,
            closed: 14,
            messages_in: 160,
            messages_out: 400,
        };
        assert_eq!(
            Summary::between(then, now),
            Some(Summary {
                opened: 3,
                closed: 4,
                open: 2,
                messages_in: 60,
                messages_out: 150
            })
        );
        let idle = Totals { open: 0, ..now };
        assert_eq!(Summary::between(idle, idle), None);
        // Connections open and quiet are still worth a line.
        assert!(Summary::between(now, now).is_some());
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use super::colour;
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn lines_without_credentials_pass_unchanged() {
        assert!(matches!(
            redact(b"listening addr=127.0.0.1:8765"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(r("token= alone"), "token= alone");
    }
}
