//! The read side of a client's socket under tungstenite: one read syscall for a whole burst,
//! and no buffer held while the client is quiet.
//!
//! Owns: [`ReadAhead`], the bytes read from the socket beyond what tungstenite asked for.
//! tungstenite asks for at most its `read_buffer_size` per read (it also keeps a buffer of that
//! size for as long as the connection lives), so a small size keeps idle connections small
//! (SPEC §7) but would cost a syscall per small message. Here one read takes up to
//! [`BURST`] bytes into a per-thread scratch buffer; what tungstenite did not take is kept
//! in a buffer of exactly its size, handed out on the next reads, and freed once drained.
//! Bytes a client sent behind its upgrade request (read by hyper) start there too.
//! Must not: change, drop or reorder a byte, or interpret frames ([`super::frames`] does).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// The most one read syscall takes from a client's socket: what a busy publisher's window
/// of small messages holds, several times over.
pub(crate) const BURST: usize = 16 * 1024;

thread_local! {
    /// Where each read lands first; a thread serves one poll at a time.
    static SCRATCH: RefCell<Box<[u8; BURST]>> = RefCell::new(Box::new([0; BURST]));
}

/// A client's stream with what was read ahead of its reader.
#[derive(Debug)]
pub(crate) struct ReadAhead<S> {
    io: S,
    /// Read from the socket, not yet handed on; holds no allocation while empty.
    ahead: BytesMut,
}

impl<S> ReadAhead<S> {
    /// A stream whose first bytes, `read`, were read before (by hyper, behind the request).
    pub fn after(io: S, read: &[u8]) -> Self {
        ReadAhead {
            io,
            ahead: BytesMut::from(read),
        }
    }

    /// Bytes read and not yet handed on (tests).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.ahead.capacity()
    }

    /// Hand on what was read ahead, as much as `buf` takes; the buffer is freed once empty.
    fn hand_on(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.ahead.len().min(buf.remaining());
        buf.put_slice(&self.ahead[..n]);
        self.ahead.advance(n);
        if self.ahead.is_empty() {
            self.ahead = BytesMut::new();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() || buf.remaining() == 0 {
            this.hand_on(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= BURST {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut burst = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut burst))?;
            let read = burst.filled();
            let n = read.len().min(buf.remaining());
            buf.put_slice(&read[..n]);
            if n < read.len() {
                this.ahead = BytesMut::from(&read[n..]);
            }
            Poll::Ready(Ok(()))
        })
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
