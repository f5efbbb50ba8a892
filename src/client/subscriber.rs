//! `lightrelay sub`: messages → standard output, one per line.
//!
//! Owns: the output format (text as is, binary as base64 unless `--raw`), `--count`, and
//! reconnecting unless `--once` (or the failure is permanent, [`ConnectError::is_final`]: one
//! line, exit 1; also when the server is a lightrelay publish server, which sends
//! subscribers nothing). Must not: send anything but the close handshake.
//!
//! [`ConnectError::is_final`]: super::connect::ConnectError::is_final

use std::process::ExitCode;

use base64::Engine;
use futures_util::StreamExt;
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

    loop {
        let connected = tokio::select! {
            connected = open(&args.url, None, args.token.value.as_ref(), &tls) => connected,
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
                    let payload = match frame {
                        Some(Ok(Message::Text(text))) => Output::Line(text.as_bytes().to_vec()),
                        Some(Ok(Message::Binary(data))) if args.raw => Output::Raw(data.to_vec()),
                        Some(Ok(Message::Binary(data))) => Output::Line(
                            base64::engine::general_purpose::STANDARD
                                .encode(&data)
                                .into_bytes(),
                        ),
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
