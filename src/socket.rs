//! A WebSocket client's TCP socket, shared by its session and the hub (SPEC §4).
//!
//! Owns: the one `TcpStream` of an upgraded connection, behind an `Arc` so that two parties
//! can write to it without a lock around the socket: the connection's session (through
//! tungstenite, as `AsyncRead + AsyncWrite`) and the hub, which writes a frame straight into
//! an idle subscriber's socket instead of queueing it and waking the session's task (see
//! [`crate::outbox`] for who may write when). Every write here is non-blocking: a full
//! socket buffer is reported, never waited for.
//! Must not: decide who writes, frame messages or hold any state besides the socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::Message;

/// A shared handle on a client's socket; cloning it shares the socket.
#[derive(Clone, Debug)]
pub struct Socket(Arc<TcpStream>);

impl Socket {
    pub fn new(stream: TcpStream) -> Self {
        Socket(Arc::new(stream))
    }

    /// Write as much of `frame` as the socket takes now, without waiting: `Ok(n)` bytes went
    /// out (possibly fewer than the frame), `WouldBlock` when none could.
    pub fn try_write_frame(&self, frame: &EncodedFrame) -> io::Result<usize> {
        // One `send` per socket: cheaper in the kernel than `writev`, which goes through the
        // file layer (its position lock included) before reaching the socket.
        self.0.try_write(frame.as_bytes())
    }

    /// Write `buf` once the socket can take some of it; returns how much it took.
    pub fn poll_write_some(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // `try_read` clears the readiness on WouldBlock, so the next poll parks the task.
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_some(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TCP socket has no user-space buffer to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing half-closes a client's socket: tungstenite ends a connection with its close
        // handshake, and the socket closes when its last handle (session, outbox) is dropped.
        Poll::Ready(Ok(()))
    }
}

/// A data frame as it goes on the wire from a server, encoded once per message (header and
/// payload in one buffer, so each socket gets it in one `send`) and written to any number of
/// sockets.
pub struct EncodedFrame {
    wire: Bytes,
}

impl EncodedFrame {
    /// The wire form of a text or binary message (`None` for control frames).
    pub fn of(message: &Message) -> Option<Self> {
        let (opcode, payload): (_, &[u8]) = match message {
            Message::Text(text) => (Data::Text, text.as_bytes()),
            Message::Binary(data) => (Data::Binary, data),
            _ => return None,
        };
        let header = FrameHeader {
            opcode: OpCode::Data(opcode),
            ..FrameHeader::default()
        };
        let mut wire = Vec::with_capacity(header.len(payload.len() as u64) + payload.len());
        header.format(payload.len() as u64, &mut wire).ok()?;
        wire.extend_from_slice(payload);
        Some(EncodedFrame {
            wire: Bytes::from(wire),
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.wire
    }

    pub fn len(&self) -> usize {
        self.wire.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wire.is_empty()
    }

    /// What is left to send after the first `written` bytes went out.
    pub fn rest(&self, written: usize) -> Bytes {
        self.wire.slice(written.min(self.wire.len())..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;

    /// The header encoded here is byte for byte what tungstenite writes for the same message.
    #[test]
    fn encoded_frames_match_tungstenite() {
        for size in [0usize, 1, 125, 126, 65_535, 65_536, 300_000] {
            for message in [
                Message::Binary(Bytes::from(vec![7u8; size])),
                Message::text("é".repeat(size / 2)),
            ] {
                let encoded = EncodedFrame::of(&message).unwrap();
                let ours = encoded.as_bytes().to_vec();
                let opcode = match &message {
                    Message::Text(_) => Data::Text,
                    _ => Data::Binary,
                };
                let payload = match message {
                    Message::Text(t) => Bytes::from(t),
                    Message::Binary(b) => b,
                    _ => unreachable!(),
                };
                let mut theirs = Vec::new();
                Frame::message(payload, OpCode::Data(opcode), true)
                    .format(&mut theirs)
                    .unwrap();
                assert_eq!(ours, theirs, "size {size}");
                assert_eq!(encoded.len(), theirs.len());
                for cut in [0, 1, encoded.len() / 2, encoded.len()] {
                    let cut = cut.min(encoded.len());
                    assert_eq!(&encoded.rest(cut)[..], &theirs[cut..], "cut {cut}");
                }
            }
        }
        assert!(EncodedFrame::of(&Message::Ping(Bytes::new())).is_none());
    }
}
