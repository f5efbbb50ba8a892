//! `lightrelay pub`: input → acknowledged messages, with nothing lost or duplicated by a
//! relay restart.
//!
//! Owns: the [`Pending`] queue (every message not yet acknowledged, oldest first, at most
//! `--buffer`), the resend of everything unacknowledged after each reconnect, and the drop
//! accounting while disconnected. While connected, input is read only when the queue has
//! room, so back-pressure reaches the producer; while disconnected, input keeps being read
//! and the oldest messages are dropped past `--buffer` (a sensor should never block), with
//! the count reported on stderr. A permanent failure ([`ConnectError::is_final`]: 4xx, a
//! refused certificate, TLS to a plain port …) ends it with one line and exit 1: resending
//! cannot change that. Without acknowledgements (`--no-ack`, or a server that does not select
//! `lightrelay.ack`, said once on stderr: SPEC §6) a message counts as delivered once written
//! to the socket; a lightrelay subscribe server that did not select the subprotocol discards
//! what it is sent, so that ends it with exit 1 too.
//! Owns too `--downlink`: what the server sends that is not an ack (SPEC §10: on an ack
//! connection the binary frames, else every data frame) printed on stdout, a line each.
//! Must not: print anything else on stdout.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader, Stdin};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use super::args::PubArgs;
use super::connect::{open, shown, Backoff, ConnectError, Lost, Opened, Role, Tls, Ws};
use super::INTERRUPTED;

use crate::ACK_PROTOCOL;

/// Where messages come from: lines of standard input, or whole files.
enum Source {
    Lines {
        reader: BufReader<Stdin>,
        line: Vec<u8>,
        done: bool,
    },
    Files(VecDeque<PathBuf>),
}

impl Source {
    fn new(binary: Vec<PathBuf>) -> Source {
        if binary.is_empty() {
            Source::Lines {
                reader: BufReader::new(tokio::io::stdin()),
                line: Vec::new(),
                done: false,
            }
        } else {
            Source::Files(binary.into())
        }
    }

    fn done(&self) -> bool {
        match self {
            Source::Lines { done, .. } => *done,
            Source::Files(paths) => paths.is_empty(),
        }
    }

    /// The next message, `None` at the end of input. Cancel-safe: a partly read line stays
    /// in `line` and a file is only taken off the list once read.
    async fn next(&mut self) -> io::Result<Option<Message>> {
        match self {
            Source::Lines { reader, line, done } => {
                let n = reader.read_until(b'\n', line).await?;
                if n == 0 && line.is_empty() {
                    *done = true;
                    return Ok(None);
                }
                let mut bytes = std::mem::take(line);
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                    if bytes.last() == Some(&b'\r') {
                        bytes.pop();
                    }
                }
                Ok(Some(match String::from_utf8(bytes) {
                    Ok(text) => Message::text(text),
                    Err(e) => Message::Binary(Bytes::from(e.into_bytes())),
                }))
            }
            Source::Files(paths) => {
                let Some(path) = paths.front() else {
                    return Ok(None);
                };
                let data = tokio::fs::read(path)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                paths.pop_front();
                Ok(Some(Message::Binary(Bytes::from(data))))
            }
        }
    }
}

/// Messages not yet acknowledged, oldest first; the first `sent` went out on this connection.
struct Pending {
    messages: VecDeque<Message>,
    sent: usize,
    capacity: usize,
    dropped: u64,
    dropped_unreported: u64,
}

impl Pending {
    fn push(&mut self, message: Message) {
        if self.messages.len() >= self.capacity {
            self.messages.pop_front();
            self.sent = self.sent.saturating_sub(1);
            self.dropped += 1;
            self.dropped_unreported += 1;
        }
        self.messages.push_back(message);
    }

    fn report_drops(&mut self) {
        if self.dropped_unreported > 0 {
            eprintln!(
                "lightrelay: dropped the {} oldest messages while disconnected (--buffer {})",
                self.dropped_unreported, self.capacity
            );
            self.dropped_unreported = 0;
        }
    }
}

enum End {
    /// Input ended and everything was acknowledged.
    Done,
    /// The connection was lost; reconnect and resend.
    Lost(Lost),
    Interrupted,
    Failed(Failure),
}

/// Why `pub` gives up (exit 1).
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("the server acknowledged a message that was never sent")]
    UnexpectedAck,
    #[error("reading input: {0}")]
    Input(#[from] io::Error),
    #[error(
        "{url}: this is a lightrelay subscribe server, which discards what it is sent here (it \
         runs without --accept-publish, or the token may not publish): publish to the publish \
         server (port 8765, or /publish/ behind nginx)"
    )]
    SubscribeServer { url: String },
}

pub async fn run(args: PubArgs, tls: Tls) -> ExitCode {
    let mut source = Source::new(args.binary);
    let mut pending = Pending {
        messages: VecDeque::new(),
        sent: 0,
        capacity: args.buffer as usize,
        dropped: 0,
        dropped_unreported: 0,
    };
    let mut backoff = Backoff::default();
    // Acknowledged until told otherwise (--no-ack) or the server selects no lightrelay.ack.
    let mut ack = !args.no_ack;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        if source.done() && pending.messages.is_empty() {
            return finish(&mut pending);
        }
        let protocol = ack.then_some(ACK_PROTOCOL);
        let connected = tokio::select! {
            connected = open(&args.url, protocol, args.token.value.as_ref(), &tls) => connected,
            _ = &mut ctrl_c => return interrupted(&pending),
        };
        let problem = match connected {
            Ok(Opened {
                role: Some(Role::Subscribe),
                selected: false,
                ..
            }) if !args.no_ack => {
                // Offered lightrelay.ack and a subscribe server did not take it: it would
                // discard every message.
                let url = shown(&args.url);
                eprintln!("lightrelay: {}", Failure::SubscribeServer { url });
                return ExitCode::FAILURE;
            }
            Ok(opened) if ack && !opened.selected => {
                no_ack_from_now_on(&args.url, &mut ack);
                continue;
            }
            Ok(Opened { ws, .. }) => {
                backoff.reset();
                pending.report_drops();
                let downlink = args.downlink;
                match session(ws, ack, downlink, &mut source, &mut pending, &mut ctrl_c).await {
                    End::Done => return finish(&mut pending),
                    End::Interrupted => return interrupted(&pending),
                    End::Failed(e) => {
                        eprintln!("lightrelay: {e}");
                        return ExitCode::FAILURE;
                    }
                    // 1009 (a message over the server's limit): resending it cannot help.
                    End::Lost(why) if why.is_final() => {
                        eprintln!("lightrelay: {}: {why}", shown(&args.url));
                        return ExitCode::FAILURE;
                    }
                    End::Lost(why) => why,
                }
            }
            // Another relay, or a proxy that drops the header: go on unacknowledged, at once
            // (this happens once: `ack` stays false).
            Err(ConnectError::NoSubprotocol) if ack => {
                no_ack_from_now_on(&args.url, &mut ack);
                continue;
            }
            // A refusal no reconnect changes (4xx, certificate, not TLS …): one line, exit 1.
            Err(e) if e.is_final() => {
                eprintln!("lightrelay: {}: {e}", shown(&args.url));
                return ExitCode::FAILURE;
            }
            Err(e) => Lost::Connect(e),
        };
        let wait = backoff.next_wait();
        eprintln!(
            "lightrelay: {}: {problem}; {} unacknowledged, retrying in {:.1}s",
            shown(&args.url),
            pending.messages.len(),
            wait.as_secs_f64()
        );
        // Keep reading input while waiting, dropping the oldest past --buffer.
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                _ = &mut ctrl_c => return interrupted(&pending),
                next = source.next(), if !source.done() => match next {
                    Ok(Some(message)) => pending.push(message),
                    Ok(None) => {}
                    Err(e) => {
                        eprintln!("lightrelay: {}", Failure::Input(e));
                        return ExitCode::FAILURE;
                    }
                },
            }
        }
    }
}

/// Say once that acknowledgements are off, and turn them off.
fn no_ack_from_now_on(url: &str, ack: &mut bool) {
    eprintln!(
        "lightrelay: {}: the server did not select the {ACK_PROTOCOL} subprotocol; going on \
         without acknowledgements (a message in flight when a connection drops can be lost; \
         --no-ack skips this check)",
        shown(url)
    );
    *ack = false;
}

enum Step {
    Fed,
    Flushed,
}

async fn step(
    sink: &mut futures_util::stream::SplitSink<Ws, Message>,
    next: Option<Message>,
) -> Result<Step, tungstenite::Error> {
    match next {
        Some(message) => sink.feed(message).await.map(|()| Step::Fed),
        None => sink.flush().await.map(|()| Step::Flushed),
    }
}

async fn session<F>(
    ws: Ws,
    ack: bool,
    downlink: bool,
    source: &mut Source,
    pending: &mut Pending,
    ctrl_c: &mut std::pin::Pin<&mut F>,
) -> End
where
    F: std::future::Future<Output = io::Result<()>>,
{
    let (mut sink, mut stream) = ws.split();
    // Everything not acknowledged is sent again on the new connection, in order.
    pending.sent = 0;
    let mut unflushed = false;
    loop {
        if source.done() && pending.messages.is_empty() {
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "done".into(),
                })))
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while stream.next().await.is_some() {}
            })
            .await;
            return End::Done;
        }
        let unsent = pending.messages.get(pending.sent).cloned();
        let can_step = unsent.is_some() || unflushed;
        let can_read = !source.done() && pending.messages.len() < pending.capacity;
        tokio::select! {
            biased;
            _ = &mut *ctrl_c => return End::Interrupted,
            frame = stream.next() => match frame {
                // Without acknowledgements, whatever the server sends is not ours to count.
                Some(Ok(Message::Text(text))) if !ack => {
                    if downlink {
                        print_downlink(text.as_bytes());
                    }
                }
                // Acks are text frames: a binary frame is the downlink.
                Some(Ok(Message::Binary(data))) if downlink => print_downlink(&data),
                Some(Ok(Message::Text(_))) => {
                    if pending.sent == 0 {
                        return End::Failed(Failure::UnexpectedAck);
                    }
                    pending.messages.pop_front();
                    pending.sent -= 1;
                }
                Some(Ok(Message::Close(frame))) => return End::Lost(Lost::Closed(frame)),
                Some(Ok(_)) => {}
                Some(Err(e)) => return End::Lost(Lost::Broken(e)),
                None => return End::Lost(Lost::Ended),
            },
            stepped = step(&mut sink, unsent), if can_step => match stepped {
                Ok(Step::Fed) => {
                    pending.sent += 1;
                    unflushed = true;
                }
                Ok(Step::Flushed) => {
                    unflushed = false;
                    if !ack {
                        // Written to the socket is as delivered as it gets without acks.
                        pending.messages.drain(..pending.sent);
                        pending.sent = 0;
                    }
                }
                Err(e) => return End::Lost(Lost::Broken(e)),
            },
            next = source.next(), if can_read => match next {
                Ok(Some(message)) => pending.push(message),
                Ok(None) => {}
                Err(e) => return End::Failed(Failure::Input(e)),
            },
        }
    }
}

/// One downlink message on stdout, a line: UTF-8 as is (on an ack connection a text message
/// comes as a binary frame), anything else as base64.
fn print_downlink(data: &[u8]) {
    use base64::Engine;
    use std::io::Write;
    let text = match std::str::from_utf8(data) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        _ => std::borrow::Cow::Owned(base64::engine::general_purpose::STANDARD.encode(data)),
    };
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

fn finish(pending: &mut Pending) -> ExitCode {
    pending.report_drops();
    if pending.dropped > 0 {
        eprintln!(
            "lightrelay: done; {} messages were dropped in all",
            pending.dropped
        );
    }
    ExitCode::SUCCESS
}

fn interrupted(pending: &Pending) -> ExitCode {
    if !pending.messages.is_empty() {
        eprintln!(
            "lightrelay: interrupted with {} messages not acknowledged",
            pending.messages.len()
        );
    }
    ExitCode::from(INTERRUPTED)
}
