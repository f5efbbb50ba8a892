//! Logging set-up: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON.
//!
//! Owns: the global subscriber, and the last guard that keeps tokens out of logs: every line
//! passes [`redact`] on its way to stderr, so a `token=…` or `Bearer …` that reached a log
//! field (a URI in an error, a header in a debug line) is written as `[redacted]`.
//! Must not: be called twice, or log message payloads.

use std::borrow::Cow;
use std::io::Write;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::server::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Redacting);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
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
    fn lines_without_credentials_pass_unchanged() {
        assert!(matches!(
            redact(b"listening addr=127.0.0.1:8765"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(r("token= alone"), "token= alone");
    }
}
