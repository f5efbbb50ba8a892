//! `lightrelay sub`: messages → standard output, one per line.
//!
//! Owns: the output format (text as is, binary as base64 unless `--raw`, the envelope as
//! received with `--json`), `--count`, `--last`, and reconnecting unless `--once` (or the
//! failure is permanent, [`ConnectError::is_final`]: one line, exit 1; also when the server
//! is a lightrelay publish server, which sends subscribers nothing).
//!
//! Resuming (SPEC §9): every connection asks `format=json` ([`request_url`]), so each message
//! comes with its history id; the client keeps the id of the last message it printed and
//! reconnects with `?since=ID`, so with history on the server nothing is printed twice or
//! missed across a reconnect. `?last=N` is asked on the first connection only (asked again it
//! would print those messages twice). A gap frame (what was missed is no longer retained, or
//! history is off) is never printed: it is one line on stderr. A frame that is not an
//! envelope (a relay without `format=json`, another WebSocket server) is printed as today.
//! Must not: send anything but the close handshake.
//!
//! [`ConnectError::is_final`]: super::connect::ConnectError::is_final

use std::process::ExitCode;

use base64::Engine;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncWriteExt, Stdout};
use tokio_tungstenite::tungstenite::Message;

use super::args::SubArgs;
use super::connect::{open, shown, Backoff, Lost, Opened, Role, Tls};
use super::INTERRUPTED;

pub async fn run(args: SubArgs, tls: Tls) -> ExitCode {
    let mut out = tokio::io::stdout();
    let mut received = 0u64;
    let mut backoff = Backoff::default();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    if args.count == Some(0) {
        return ExitCode::SUCCESS;
    }
    // The id of the last message printed: where a reconnect resumes.
    let mut last_id: Option<String> = None;
    let mut first = true;

    loop {
        let (url, json) = request_url(
            &args.url,
            first.then_some(args.last).flatten(),
            last_id.as_deref(),
            first,
        );
        first = false;
        let connected = tokio::select! {
            connected = open(&url, None, args.token.value.as_ref(), &tls) => connected,
            _ = &mut ctrl_c => return ExitCode::from(INTERRUPTED),
        };
        let problem = match connected {
            Ok(Opened {
                role: Some(Role::Publish),
                mut ws,
                ..
            }) => {
                let _ = ws.close(None).await;
                eprintln!(
                    "lightrelay: {}: this is the lightrelay publish server, which sends \
                     subscribers nothing: subscribe on the subscribe server (port 8767, or \
                     /subscribe/ behind nginx)",
                    shown(&args.url)
                );
                return ExitCode::FAILURE;
            }
            Ok(Opened { mut ws, .. }) => {
                backoff.reset();
                loop {
                    let frame = tokio::select! {
                        frame = ws.next() => frame,
                        _ = &mut ctrl_c => {
                            let _ = ws.close(None).await;
                            return ExitCode::from(INTERRUPTED);
                        }
                    };
                    let mut id = None;
                    let payload = match frame {
                        Some(Ok(Message::Text(text))) => match json.then(|| parse(&text)).flatten()
                        {
                            Some(Frame::Gap { gap }) => {
                                eprintln!("lightrelay: gap: {}", gap.sentence());
                                continue;
                            }
                            Some(Frame::Message(envelope)) => {
                                id = envelope.id.clone();
                                if args.json {
                                    Output::Line(text.as_bytes().to_vec())
                                } else {
                                    output(envelope.payload(), args.raw)
                                }
                            }
                            None => Output::Line(text.as_bytes().to_vec()),
                        },
                        Some(Ok(Message::Binary(data))) => {
                            output(Payload::Binary(data.to_vec()), args.raw)
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let why = Lost::Closed(frame);
                            if args.once {
                                eprintln!("lightrelay: {why}");
                                return if why.is_normal_close() {
                                    ExitCode::SUCCESS
                                } else {
                                    ExitCode::FAILURE
                                };
                            }
                            break why;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => break Lost::Broken(e),
                        None => break Lost::Ended,
                    };
                    if write(&mut out, payload).await.is_err() {
                        // stdout closed (`| head`): nothing more is wanted.
                        return ExitCode::SUCCESS;
                    }
                    if id.is_some() {
                        last_id = id;
                    }
                    received += 1;
                    if args.count.is_some_and(|n| received >= n) {
                        let _ = ws.close(None).await;
                        return ExitCode::SUCCESS;
                    }
                }
            }
            // 4xx, a refused certificate, not TLS …: a reconnect would fail the same way.
            Err(e) if e.is_final() => {
                eprintln!("lightrelay: {}: {e}", shown(&args.url));
                return ExitCode::FAILURE;
            }
            Err(e) => Lost::Connect(e),
        };
        if args.once {
            eprintln!("lightrelay: {}: {problem}", shown(&args.url));
            return ExitCode::FAILURE;
        }
        let wait = backoff.next_wait();
        eprintln!(
            "lightrelay: {}: {problem}; retrying in {:.1}s",
            shown(&args.url),
            wait.as_secs_f64()
        );
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = &mut ctrl_c => return ExitCode::from(INTERRUPTED),
        }
    }
}

/// The URL of one connection: the user's URL with `format=json` added (unless its query has
/// a `format` already: the user's query is kept as is and only what is missing is added), and
/// on the first connection `last=N` (unless the query has a `last`). A reconnect drops any
/// `last` (the messages it asks for were printed) and, with an id to resume from, asks
/// `since=ID` instead of any `since` the user wrote. Also says whether the frames will be
/// envelopes (`format=json`).
pub(crate) fn request_url(
    url: &str,
    last: Option<u32>,
    resume: Option<&str>,
    first: bool,
) -> (String, bool) {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let key = |pair: &str| pair.split_once('=').map_or(pair, |(k, _)| k).to_string();
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| first || key(pair) != "last")
        .map(str::to_string)
        .collect();
    let json = match pairs.iter().find(|pair| key(pair) == "format") {
        Some(pair) => pair.split_once('=').is_some_and(|(_, v)| v == "json"),
        None => {
            pairs.push("format=json".into());
            true
        }
    };
    if let Some(n) = last.filter(|_| first) {
        if !pairs.iter().any(|pair| key(pair) == "last") {
            pairs.push(format!("last={n}"));
        }
    }
    // A pattern path (SPEC §9) spans channels, each with its own ids: there is no `since`
    // for it (the server refuses one), so a reconnect just takes the live messages again.
    let path = base.split_once("://").map_or(base, |(_, rest)| rest);
    let pattern = path
        .split_once('/')
        .is_some_and(|(_, p)| p.contains(['*', '[']));
    if let Some(id) = resume.filter(|_| json && !first && !pattern) {
        pairs.retain(|pair| key(pair) != "since");
        pairs.push(format!("since={}", encode(id)));
    }
    (format!("{base}?{}", pairs.join("&")), json)
}

/// Percent-encode what is not an unreserved URL character (an id is `MS-SEQ`: nothing to do,
/// unless a server sends something else).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One text frame of a `format=json` connection.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Frame {
    Gap { gap: Gap },
    Message(Envelope),
}

/// `{"gap":{"after":ID,"oldest":ID|null}}`: messages after `after` were missed.
#[derive(Debug, Deserialize)]
pub(crate) struct Gap {
    after: Option<String>,
    oldest: Option<String>,
}

impl Gap {
    /// The stderr line, after `lightrelay: gap: `.
    fn sentence(&self) -> String {
        let after = self.after.as_deref().unwrap_or("the last one printed");
        match &self.oldest {
            Some(oldest) => {
                format!("messages after {after} are no longer retained (oldest retained: {oldest})")
            }
            None => format!(
                "history is off on the server (or nothing is retained): messages published \
                 after {after} while reconnecting were not received"
            ),
        }
    }
}

/// `{"channel":…,"id":…,"data":…}`, `"encoding":"base64"` for a payload that is not UTF-8.
#[derive(Debug, Deserialize)]
pub(crate) struct Envelope {
    #[allow(dead_code)]
    channel: String,
    id: Option<String>,
    data: String,
    encoding: Option<String>,
}

impl Envelope {
    /// The payload as published.
    fn payload(self) -> Payload {
        if self.encoding.as_deref() == Some("base64") {
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&self.data) {
                return Payload::Binary(bytes);
            }
        }
        Payload::Text(self.data)
    }
}

pub(crate) fn parse(text: &str) -> Option<Frame> {
    serde_json::from_str(text).ok()
}

enum Payload {
    Text(String),
    Binary(Vec<u8>),
}

/// How a payload is printed: text as a line, binary as a base64 line or, with `--raw`, as is.
fn output(payload: Payload, raw: bool) -> Output {
    match payload {
        Payload::Text(text) => Output::Line(text.into_bytes()),
        Payload::Binary(data) if raw => Output::Raw(data),
        Payload::Binary(data) => Output::Line(
            base64::engine::general_purpose::STANDARD
                .encode(&data)
                .into_bytes(),
        ),
    }
}

enum Output {
    Line(Vec<u8>),
    Raw(Vec<u8>),
}

async fn write(out: &mut Stdout, payload: Output) -> std::io::Result<()> {
    match payload {
        Output::Line(mut line) => {
            line.push(b'\n');
            out.write_all(&line).await?;
        }
        Output::Raw(data) => out.write_all(&data).await?,
    }
    out.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_asks_json_and_the_first_one_last() {
        let u = |url, last, resume, first| request_url(url, last, resume, first);
        assert_eq!(
            u("ws://h/office", None, None, true),
            ("ws://h/office?format=json".into(), true)
        );
        assert_eq!(
            u("ws://h/office", Some(10), None, true),
            ("ws://h/office?format=json&last=10".into(), true)
        );
        // A pattern: never `since` (each channel has its own ids).
        assert_eq!(
            u("ws://h/office/*", None, Some("5-1"), false).0,
            "ws://h/office/*?format=json"
        );
        // Reconnecting: never `last` again; `since` once there is an id.
        assert_eq!(
            u("ws://h/office", Some(10), None, false).0,
            "ws://h/office?format=json"
        );
        assert_eq!(
            u("ws://h/office", Some(10), Some("1700000000000-3"), false).0,
            "ws://h/office?format=json&since=1700000000000-3"
        );
        // The user's query is kept; only what is missing is added.
        assert_eq!(
            u("ws://h/x?token=a.b&last=2", Some(9), None, true).0,
            "ws://h/x?token=a.b&last=2&format=json"
        );
        assert_eq!(
            u(
                "ws://h/x?token=a.b&last=2&since=1-0",
                None,
                Some("5-1"),
                false
            )
            .0,
            "ws://h/x?token=a.b&format=json&since=5-1"
        );
        // A user who asked another format gets it, and no envelopes nor `since`.
        assert_eq!(
            u("ws://h/x?format=raw", None, Some("5-1"), false),
            ("ws://h/x?format=raw".into(), false)
        );
        assert_eq!(u("ws://h/x?", None, None, true).0, "ws://h/x?format=json");
        assert_eq!(encode("5-1 x&"), "5-1%20x%26");
    }

    #[test]
    fn envelopes_give_back_the_payload_and_gaps_say_what_was_missed() {
        let text = r#"{"channel":"lightlevel/office","id":"1700000000000-0","data":"42"}"#;
        let Some(Frame::Message(envelope)) = parse(text) else {
            panic!("not an envelope")
        };
        assert_eq!(envelope.id.as_deref(), Some("1700000000000-0"));
        assert!(matches!(envelope.payload(), Payload::Text(t) if t == "42"));

        let binary = r#"{"channel":"c","id":null,"data":"AAEC/w==","encoding":"base64"}"#;
        let Some(Frame::Message(envelope)) = parse(binary) else {
            panic!("not an envelope")
        };
        assert_eq!(envelope.id, None);
        assert!(matches!(envelope.payload(), Payload::Binary(b) if b == [0, 1, 2, 255]));

        let Some(Frame::Gap { gap }) = parse(r#"{"gap":{"after":"5-1","oldest":"9-0"}}"#) else {
            panic!("not a gap")
        };
        assert_eq!(
            gap.sentence(),
            "messages after 5-1 are no longer retained (oldest retained: 9-0)"
        );
        let Some(Frame::Gap { gap }) = parse(r#"{"gap":{"after":"5-1","oldest":null}}"#) else {
            panic!("not a gap")
        };
        assert!(gap.sentence().starts_with("history is off on the server"));

        // Not envelopes: printed as they came.
        for text in ["42", "{\"temp\":21}", "[1,2]", "{\"data\":\"x\"}"] {
            assert!(parse(text).is_none(), "{text}");
        }
    }
}
