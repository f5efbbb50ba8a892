//! A WebSocket client's TCP socket, shared by its session and the hub (SPEC §4).
//!
//! Owns: the one `TcpStream` of an upgraded connection, behind an `Arc` so that two parties
//! can write to it without a lock around the socket: the connection's session (through
//! tungstenite, as `AsyncRead + AsyncWrite`) and the hub, which writes a frame straight into
//! an idle subscriber's socket instead of queueing it and waking the session's task (see
//! [`crate::outbox`] for who may write when). Every write here is non-blocking: a full
//! socket buffer is reported, never waited for.
//! Owns too: the *tail*, the unsent end of a frame the hub wrote only in part, or a large
//! frame the session writes from its shared payload instead of through tungstenite's buffer.
//! Every write through `AsyncWrite` (tungstenite's frames, its pongs and close replies) and
//! every flush sends the tail first, so no byte can come between the parts of a frame, and
//! the session keeps reading meanwhile.
//! Must not: decide who writes, or frame messages.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::Message;

use super::pages;

/// The one write-path limit: tungstenite gathers queued frames up to this many bytes before a
/// write (`http::ws_config`), the hub writes frames up to this size straight into idle
/// sockets, and a session writes larger frames itself from their shared payload.
pub(crate) const WRITE_BUFFER: usize = 16 * 1024;

/// A shared handle on a client's socket; cloning it shares the socket.
#[derive(Clone, Debug)]
pub struct Socket(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    stream: TcpStream,
    tail: Mutex<Option<Tail>>,
}

/// Bytes to send before anything else: a frame's header (or a partly sent frame) and the
/// payload that follows it, each shared, never copied. With `file`, the payload's sealed
/// memory file ([`super::pages`]): the body is sent from it, at the body's offset in the
/// payload, so the kernel takes the file's pages instead of copying the body.
#[derive(Debug)]
struct Tail {
    head: Bytes,
    body: Bytes,
    file: Option<PayloadFile>,
}

/// A payload's file and the payload's length, which the file holds exactly.
#[derive(Debug)]
struct PayloadFile {
    fd: Arc<pages::PageFile>,
    len: usize,
}

impl Tail {
    /// Where the unsent body starts in the payload's file.
    fn file_offset(&self) -> u64 {
        self.file
            .as_ref()
            .map_or(0, |file| (file.len - self.body.len()) as u64)
    }

    fn advance(&mut self, n: usize) {
        let from_head = n.min(self.head.len());
        self.head.advance(from_head);
        self.body.advance(n - from_head);
    }

    fn is_empty(&self) -> bool {
        self.head.is_empty() && self.body.is_empty()
    }
}

/// Each client socket's send buffer, asked of the kernel (which doubles it: 128 KiB).
/// Left to itself, Linux grows a socket's send buffer up to `net.ipv4.tcp_wmem`'s maximum
/// (4 MiB): a subscriber that stopped reading pinned ~3.8 MiB of kernel memory (not counted in
/// RSS: ~760 MiB for 200 such clients), and filling those buffers stalled healthy subscribers
/// by up to 1 s. Past this cap a client that does not read backs up into its bounded outbox,
/// where `--slow-consumer` applies. 128 KiB still holds ~1 ms of a 1 Gbit/s stream, and a
/// large frame is written from its payload as the socket drains (the tail).
pub const SEND_BUFFER: usize = 64 * 1024;

/// A direct write never raises `SIGPIPE` on a connection the peer reset (as `std`'s writes).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: std::ffi::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: std::ffi::c_int = 0;

/// More of the frame follows at once: the kernel holds a header back for its body.
#[cfg(any(target_os = "linux", target_os = "android"))]
const MORE_FLAG: std::ffi::c_int = libc::MSG_MORE;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const MORE_FLAG: std::ffi::c_int = 0;

impl Socket {
    pub fn new(stream: TcpStream) -> Self {
        // Only a limit: a socket that refuses it keeps the kernel's default, and still works.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        Socket(Arc::new(Inner {
            stream,
            tail: Mutex::new(None),
        }))
    }

    /// Write `frame` as far as the socket takes it now, without waiting; the part it did
    /// not take becomes the tail, sent before anything else. Returns `Ok(true)` when all of
    /// it went out, `Ok(false)` when a tail is left; `WouldBlock` when none could go (nothing
    /// was kept). Only for a socket nobody else writes to at the moment, with no tail.
    #[cfg(test)]
    pub fn try_write_frame(&self, frame: &EncodedFrame) -> io::Result<bool> {
        let n = self.send_frame(frame)?;
        Ok(self.keep_rest(frame, n))
    }

    /// One non-blocking `send` of `frame`: how much of it the socket took. Only for a socket
    /// nobody else writes to at the moment, with no tail; then [`Self::keep_rest`].
    pub fn send_frame(&self, frame: &EncodedFrame) -> io::Result<usize> {
        // One `send` per socket: cheaper in the kernel than `writev`, which goes through the
        // file layer (its position lock included) before reaching the socket. Straight on the
        // descriptor, not through tokio's `try_write`: that first reads the socket's readiness
        // from its registration, a cache line of its own per subscriber, and in a fan-out to a
        // thousand sockets that miss was 4% of the server's CPU per delivery (`perf`). A
        // `WouldBlock` here leaves tokio's readiness set: the session's next write then finds
        // the socket full itself, and waits for it. (`batch::send_all` sends to many sockets
        // at once, non-blocking too: `MSG_DONTWAIT` there, the socket's `O_NONBLOCK` here.)
        socket2::SockRef::from(&self.0.stream).send_with_flags(frame.as_bytes(), SEND_FLAGS)
    }

    /// After a direct write of `frame` took its first `written` bytes: `true` if that was all
    /// of it, else its rest becomes the tail, sent before anything else (`false`).
    pub fn keep_rest(&self, frame: &EncodedFrame, written: usize) -> bool {
        if written >= frame.len() {
            return true;
        }
        *self.tail() = Some(Tail {
            head: frame.rest(written),
            body: Bytes::new(),
            file: None,
        });
        false
    }

    /// End the connection's stream both ways at once (a direct write's outcome is unknown):
    /// the session's next read or write fails, and it ends the connection as broken.
    pub fn shut(&self) {
        let _ = socket2::SockRef::from(&self.0.stream).shutdown(std::net::Shutdown::Both);
    }

    /// The socket's descriptor, for a batch of direct writes ([`super::batch`]).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.stream.as_fd()
    }

    /// Make a text or binary `message` the tail, to be written by [`Self::poll_write_tail`]
    /// straight from its payload (shared, not copied); `false` for a control frame (nothing
    /// is kept). Only with no tail already.
    pub fn set_tail_frame(&self, message: &Message) -> bool {
        let Some((head, body)) = data_frame(message) else {
            return false;
        };
        let file = pages::file_of(&body).map(|fd| PayloadFile {
            fd,
            len: body.len(),
        });
        *self.tail() = Some(Tail {
            head: Bytes::from(head),
            body,
            file,
        });
        true
    }

    /// Whether part of a frame waits to be sent.
    pub fn has_tail(&self) -> bool {
        self.tail().is_some()
    }

    /// Ready once the socket may have bytes to read (or an error); `Pending` registers the
    /// task to be woken when it does. For the session that reads this socket only.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.stream.poll_read_ready(cx)
    }

    /// Send the tail, if any; ready once none is left.
    pub fn poll_write_tail(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut tail = self.tail();
        while let Some(rest) = tail.as_mut() {
            let written = match &rest.file {
                // The header alone, held back for the body (`MSG_MORE`): no segment of its own.
                Some(_) if !rest.head.is_empty() => {
                    ready!(self.poll_send(cx, &rest.head, SEND_FLAGS | MORE_FLAG))
                }
                Some(file) => {
                    let offset = rest.file_offset();
                    match ready!(self.poll_send_file(cx, &file.fd, offset, rest.body.len())) {
                        Err(error) => {
                            // A file the kernel will not send from (or shorter than its
                            // payload): the body goes from memory, and the socket's own error,
                            // if that is what it was, comes again there.
                            tracing::debug!(%error, "sendfile refused; the payload goes from memory");
                            rest.file = None;
                            continue;
                        }
                        sent => sent,
                    }
                }
                None if rest.head.is_empty() => ready!(self.poll_send(cx, &rest.body, SEND_FLAGS)),
                None if rest.body.is_empty() => ready!(self.poll_send(cx, &rest.head, SEND_FLAGS)),
                None => ready!(self.poll_write_two(cx, &rest.head, &rest.body)),
            };
            match written {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => rest.advance(n),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if rest.is_empty() {
                *tail = None;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Write `head` then `body` in one `writev` once the socket can take some.
    fn poll_write_two(
        &self,
        cx: &mut Context<'_>,
        head: &[u8],
        body: &[u8],
    ) -> Poll<io::Result<usize>> {
        let parts = [IoSlice::new(head), IoSlice::new(body)];
        loop {
            ready!(self.0.stream.poll_write_ready(cx))?;
            match self.0.stream.try_write_vectored(&parts) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    /// `send(2)` `buf` with `flags` once the socket can take some of it; returns how much it
    /// took.
    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        flags: std::ffi::c_int,
    ) -> Poll<io::Result<usize>> {
        let stream = &self.0.stream;
        loop {
            ready!(stream.poll_write_ready(cx))?;
            let sent = stream.try_io(Interest::WRITABLE, || {
                socket2::SockRef::from(stream).send_with_flags(buf, flags)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    /// `sendfile(2)` up to `len` bytes of `file` from `offset` once the socket can take some;
    /// returns how much it took, never 0 (a file that ends early is a `WriteZero` error).
    fn poll_send_file(
        &self,
        cx: &mut Context<'_>,
        file: &pages::PageFile,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let stream = &self.0.stream;
        loop {
            ready!(stream.poll_write_ready(cx))?;
            let sent = stream.try_io(Interest::WRITABLE, || {
                let mut at = offset;
                match rustix::fs::sendfile(stream, file, Some(&mut at), len) {
                    Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                    result => result.map_err(io::Error::from),
                }
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn tail(&self) -> MutexGuard<'_, Option<Tail>> {
        // Every update under this lock is a single assignment or advance.
        crate::lock(&self.0.tail)
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.stream.poll_read_ready(cx))?;
            // `try_read` clears the readiness on WouldBlock, so the next poll parks the task.
            match self.0.stream.try_read(buf.initialize_unfilled()) {
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
        ready!(self.poll_write_tail(cx))?;
        self.poll_send(cx, buf, SEND_FLAGS)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The tail is the only user-space buffer here.
        self.poll_write_tail(cx)
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
        let (mut wire, payload) = data_frame(message)?;
        wire.reserve_exact(payload.len());
        wire.extend_from_slice(&payload);
        Some(EncodedFrame {
            wire: Bytes::from(wire),
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.wire
    }

    /// The wire form, shared.
    pub fn bytes(&self) -> &Bytes {
        &self.wire
    }

    pub fn len(&self) -> usize {
        self.wire.len()
    }

    /// What is left to send after the first `written` bytes went out.
    pub fn rest(&self, written: usize) -> Bytes {
        self.wire.slice(written.min(self.wire.len())..)
    }
}

/// A text or binary message's frame header as a server sends it, and its payload (shared);
/// `None` for control frames.
fn data_frame(message: &Message) -> Option<(Vec<u8>, Bytes)> {
    let (opcode, payload) = match message {
        Message::Text(text) => (Data::Text, Bytes::from(text.clone())),
        Message::Binary(data) => (Data::Binary, data.clone()),
        _ => return None,
    };
    let header = FrameHeader {
        opcode: OpCode::Data(opcode),
        ..FrameHeader::default()
    };
    let len = payload.len() as u64;
    let mut head = Vec::with_capacity(header.len(len));
    header.format(len, &mut head).ok()?;
    Some((head, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;

    /// Both ends of a real loopback connection: the peer's, and ours as a `Socket`.
    async fn loopback() -> (TcpStream, Socket) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), Socket::new(accepted.unwrap().0))
    }

    /// `socket` holds a tail that completes `frame`: a later write must wait for it, so the
    /// peer reads `frame` whole, then the write.
    async fn tail_goes_before_a_later_write(peer: &mut TcpStream, socket: &Socket, frame: &[u8]) {
        let mut writer = socket.clone();
        let reading = async {
            let mut got = vec![0u8; frame.len() + 5];
            peer.read_exact(&mut got).await.unwrap();
            got
        };
        let writing = async {
            writer.write_all(b"after").await.unwrap();
            assert!(!writer.has_tail());
        };
        let both = async { tokio::join!(reading, writing) };
        let (got, ()) = tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .expect("the frame and the later write did not arrive");
        assert!(got[..frame.len()] == *frame, "the frame arrived altered");
        assert_eq!(&got[frame.len()..], b"after");
    }

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

    /// A frame made the tail goes out, header then shared payload, before any later write,
    /// byte for byte as `EncodedFrame` (checked above against tungstenite) has it.
    #[tokio::test]
    async fn a_frame_set_as_the_tail_goes_out_whole_before_later_writes() {
        let (mut peer, socket) = loopback().await;
        let message = Message::binary((0..4 << 20).map(|i| i as u8).collect::<Vec<u8>>());
        let expected = EncodedFrame::of(&message).unwrap();
        assert!(socket.set_tail_frame(&message));
        assert!(socket.has_tail());
        assert!(!socket.set_tail_frame(&Message::Ping(Bytes::new())));
        tail_goes_before_a_later_write(&mut peer, &socket, expected.as_bytes()).await;
    }

    /// A payload shared into a memory file goes out from the file (the tail says so), byte
    /// for byte as from memory, text and binary, before any later write; and the file
    /// outlives every other handle on the payload for as long as the tail needs it.
    #[tokio::test]
    async fn a_shared_payload_goes_out_from_its_file_whole_before_later_writes() {
        let (mut peer, socket) = loopback().await;
        let bytes: Vec<u8> = (0..(4 << 20) + 3).map(|i| (i % 253) as u8).collect();
        let text = "é".repeat(300_000);
        for message in [Message::binary(bytes), Message::text(text)] {
            let expected = EncodedFrame::of(&message).unwrap();
            let shared = pages::share_frame(message, pages::MIN_READERS);
            assert!(socket.set_tail_frame(&shared));
            assert!(
                socket
                    .tail()
                    .as_ref()
                    .is_some_and(|tail| tail.file.is_some()),
                "the tail does not send from the payload's file"
            );
            drop(shared);
            tail_goes_before_a_later_write(&mut peer, &socket, expected.as_bytes()).await;
        }
        // A payload nobody shared is sent from memory.
        assert!(socket.set_tail_frame(&Message::binary(vec![1u8; 1 << 20])));
        assert!(socket
            .tail()
            .as_ref()
            .is_some_and(|tail| tail.file.is_none()));
    }

    /// A frame the socket took only in part is finished before any later write, and a flush
    /// sends it too. (Real loopback sockets: an 8 MiB frame into a peer that does not read.)
    #[tokio::test]
    async fn a_partly_written_frame_is_finished_before_anything_else() {
        let (mut peer, socket) = loopback().await;
        socket.0.stream.writable().await.unwrap();
        let frame = EncodedFrame::of(&Message::binary(vec![7u8; 8 << 20])).unwrap();
        assert!(
            !socket.try_write_frame(&frame).unwrap(),
            "8 MiB went out whole"
        );
        assert!(socket.has_tail());
        tail_goes_before_a_later_write(&mut peer, &socket, frame.as_bytes()).await;

        // Nothing else to write: a flush alone sends the tail.
        let mut writer = socket.clone();
        assert!(!socket.try_write_frame(&frame).unwrap());
        let reading = async {
            let mut got = vec![0u8; frame.len()];
            peer.read_exact(&mut got).await.unwrap();
            got
        };
        let both = async { tokio::join!(reading, writer.flush()) };
        let (got, flushed) = tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .expect("the flush did not send the tail");
        flushed.unwrap();
        assert!(got == *frame.as_bytes());
    }
}
