//! The read side of a client's socket under tungstenite: one read syscall for a whole burst,
//! and no buffer held while the client is quiet.
//!
//! Owns: [`ReadAhead`], the bytes read from the socket beyond what tungstenite asked for.
//! tungstenite asks for at most its `read_buffer_size` per read (it also keeps a buffer of that
//! size for as long as the connection lives), so a small size keeps idle connections small
//! (SPEC §7) but would cost a syscall per small message. Here one read takes up to
//! [`BURST`] bytes into a per-thread scratch buffer; when tungstenite did not take it all, the
//! buffer itself (not a copy of its rest) is kept by the stream, handed out on the next
//! reads, and given back to the thread (or freed) once drained.
//! Bytes a client sent behind its upgrade request (read by hyper) start there too.
//! Must not: change, drop or reorder a byte, or interpret frames ([`super::frames`] does).

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// The most one read syscall takes from a client's socket: what a busy publisher's window
/// of small messages holds, several times over.
pub(crate) const BURST: usize = 16 * 1024;

thread_local! {
    /// Where each read lands first; a thread serves one poll at a time. A read that brings
    /// more than tungstenite takes moves this buffer into the stream's [`ReadAhead`] (no
    /// copy), which gives it back once drained; the next read meanwhile allocates another.
    static SCRATCH: Cell<Option<Box<[u8; BURST]>>> = const { Cell::new(None) };
}

/// A client's stream with what was read ahead of its reader.
#[derive(Debug)]
pub(crate) struct ReadAhead<S> {
    io: S,
    /// Read from the socket, not yet handed on; holds no allocation while empty.
    ahead: Ahead,
}

/// Bytes read ahead: hyper's (behind the upgrade request) or a burst's rest.
#[derive(Debug)]
enum Ahead {
    Empty,
    /// What hyper read behind the request.
    Copied(BytesMut),
    /// A burst's buffer and where its unread part starts and ends.
    Burst(Box<[u8; BURST]>, usize, usize),
}

impl<S> ReadAhead<S> {
    /// A stream whose first bytes, `read`, were read before (by hyper, behind the request).
    pub fn after(io: S, read: &[u8]) -> Self {
        let ahead = if read.is_empty() {
            Ahead::Empty
        } else {
            Ahead::Copied(BytesMut::from(read))
        };
        ReadAhead { io, ahead }
    }

    /// Bytes read and not yet handed on (tests).
    #[cfg(test)]
    fn held(&self) -> usize {
        match &self.ahead {
            Ahead::Empty => 0,
            Ahead::Copied(bytes) => bytes.capacity(),
            Ahead::Burst(buffer, _, _) => buffer.len(),
        }
    }

    /// Hand on what was read ahead, as much as `buf` takes; the buffer is freed (or given
    /// back to the thread) once empty.
    fn hand_on(&mut self, buf: &mut ReadBuf<'_>) {
        match &mut self.ahead {
            Ahead::Empty => {}
            Ahead::Copied(bytes) => {
                let n = bytes.len().min(buf.remaining());
                buf.put_slice(&bytes[..n]);
                bytes.advance(n);
                if bytes.is_empty() {
                    self.ahead = Ahead::Empty;
                }
            }
            Ahead::Burst(buffer, start, end) => {
                let n = (*end - *start).min(buf.remaining());
                buf.put_slice(&buffer[*start..*start + n]);
                *start += n;
                if start == end {
                    if let Ahead::Burst(buffer, _, _) =
                        std::mem::replace(&mut self.ahead, Ahead::Empty)
                    {
                        give_back(buffer);
                    }
                }
            }
        }
    }
}

/// A drained burst buffer goes back to the thread's scratch slot if that is empty.
fn give_back(buffer: Box<[u8; BURST]>) {
    SCRATCH.with(|slot| {
        let kept = slot.take();
        slot.set(Some(kept.unwrap_or(buffer)));
    });
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !matches!(this.ahead, Ahead::Empty) || buf.remaining() == 0 {
            this.hand_on(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= BURST {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let mut scratch = SCRATCH
            .with(Cell::take)
            .unwrap_or_else(|| Box::new([0; BURST]));
        let mut burst = ReadBuf::new(&mut scratch[..]);
        let polled = Pin::new(&mut this.io).poll_read(cx, &mut burst);
        let read = burst.filled().len();
        if !matches!(polled, Poll::Ready(Ok(()))) {
            give_back(scratch);
            return polled;
        }
        let n = read.min(buf.remaining());
        buf.put_slice(&scratch[..n]);
        if n < read {
            this.ahead = Ahead::Burst(scratch, n, read);
        } else {
            give_back(scratch);
        }
        Poll::Ready(Ok(()))
    }
}

super::write_through!(generic ReadAhead, io);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_burst_is_read_once_handed_on_in_order_and_then_freed() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut reader = ReadAhead::after(server, b"hello ");
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 256];
        // What hyper read comes first, then the burst: read once, handed on 256 bytes at a
        // time, the rest kept meanwhile.
        let n = reader.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"hello ");
        let n = reader.read(&mut small).await.unwrap();
        got.extend_from_slice(&small[..n]);
        assert!(reader.held() > 0, "the rest of the burst is kept");
        while got.len() < sent.len() {
            let n = reader.read(&mut small).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(reader.held(), 0, "nothing is held once all was handed on");
        drop(client);
        assert_eq!(
            reader.read(&mut small).await.unwrap(),
            0,
            "EOF passes through"
        );
    }
}
