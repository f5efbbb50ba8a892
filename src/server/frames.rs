//! Where a client is in the frames it sends, followed header by header as its bytes are read.
//!
//! Owns: [`Watched`], the read side of a session's stream, which passes every byte read on to
//! tungstenite unchanged and follows the frame headers in them ([`FrameWatch`]): whether a
//! message is unfinished, how many bytes it declared (tungstenite reserves a frame's whole
//! length when its header arrives, and keeps the fragments of a message until its last), how
//! many messages were finished, and whether a close frame arrived. tungstenite says none of
//! this until a message is whole, so a client could hold memory with the start of a message
//! and never send the rest. The session bounds both from these figures, and after failing a
//! connection reads what is left up to the client's close frame.
//! Must not: change, copy or buffer what it reads, or decide anything; it only counts.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// A client's stream, with its incoming frames followed.
#[derive(Debug)]
pub(crate) struct Watched<S> {
    io: S,
    watch: FrameWatch,
}

impl<S> Watched<S> {
    pub fn new(io: S) -> Self {
        Watched {
            io,
            watch: FrameWatch::default(),
        }
    }

    pub fn watch(&self) -> &FrameWatch {
        &self.watch
    }
}

/// What the frames read so far say. 40 bytes per connection.
#[derive(Debug, Default)]
pub(crate) struct FrameWatch {
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// Declared payload bytes of the unfinished data message: its frames so far, the current
    /// one whole.
    held: u64,
    /// Messages finished so far (data messages, and control frames outside one); wraps.
    finished: u32,
    /// The start of a frame header that did not arrive whole (2 to 14 bytes).
    header: [u8; 14],
    header_len: u8,
    /// The current frame's first header byte (FIN and opcode).
    first: u8,
    /// A data frame without FIN began a message that continuation frames go on with.
    fragmented: bool,
    /// A close frame arrived whole.
    closed: bool,
}

impl FrameWatch {
    /// Some of a frame, or of a fragmented message, has arrived and not the rest.
    pub fn unfinished(&self) -> bool {
        self.left > 0 || self.header_len > 0 || self.fragmented
    }

    /// What the unfinished data message declared so far (0 when there is none).
    pub fn held(&self) -> u64 {
        self.held
    }

    /// How many messages were finished so far (wraps): a change means the client got on.
    pub fn finished(&self) -> u32 {
        self.finished
    }

    /// A close frame arrived whole.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Follow `bytes`, the next ones read from the client.
    pub fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len() as u64);
                self.left -= n;
                bytes = &bytes[n as usize..];
                if self.left == 0 {
                    self.frame_done();
                }
                continue;
            }
            let have = usize::from(self.header_len);
            let need = if have < 2 {
                2
            } else {
                header_size(self.header[1])
            };
            let take = (need - have).min(bytes.len());
            self.header[have..have + take].copy_from_slice(&bytes[..take]);
            self.header_len += take as u8;
            bytes = &bytes[take..];
            let have = usize::from(self.header_len);
            if have >= 2 && have == header_size(self.header[1]) {
                self.header_len = 0;
                self.frame_start();
            }
        }
    }

    fn frame_start(&mut self) {
        let header = &self.header;
        self.first = header[0];
        self.left = match header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
            127 => u64::from_be_bytes(header[2..10].try_into().unwrap_or_default()),
            len => u64::from(len),
        };
        if !self.is_control() {
            self.held = self.held.saturating_add(self.left);
        }
        if self.left == 0 {
            self.frame_done();
        }
    }

    fn frame_done(&mut self) {
        if self.is_control() {
            self.closed |= self.first & 0x0f == 0x8;
            if !self.fragmented {
                self.finished = self.finished.wrapping_add(1);
            }
        } else if self.first & 0x80 != 0 {
            self.fragmented = false;
            self.held = 0;
            self.finished = self.finished.wrapping_add(1);
        } else {
            self.fragmented = true;
        }
    }

    fn is_control(&self) -> bool {
        self.first & 0x08 != 0
    }
}

/// A frame header's size from its second byte: 2, the extended length, the mask.
fn header_size(second: u8) -> usize {
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.watch.scan(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

super::write_through!(generic Watched, io);

#[cfg(test)]
mod tests {
    use super::*;

    const CONTINUE: u8 = 0x0;
    const TEXT: u8 = 0x1;
    const BINARY: u8 = 0x2;
    const CLOSE: u8 = 0x8;
    const PING: u8 = 0x9;
    const PONG: u8 = 0xa;

    /// A frame as a client sends it: masked (the payload is left as it is; only its length
    /// matters here).
    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut wire = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n @ 0..=125 => wire.push(0x80 | n as u8),
            n @ 126..=65_535 => {
                wire.push(0x80 | 126);
                wire.extend((n as u16).to_be_bytes());
            }
            n => {
                wire.push(0x80 | 127);
                wire.extend((n as u64).to_be_bytes());
            }
        }
        wire.extend([1, 2, 3, 4]);
        wire.extend(payload);
        wire
    }

    /// Scan `wire` cut at every byte, and whole: the figures do not depend on how reads split.
    fn scanned(wire: &[u8], cut: usize) -> FrameWatch {
        let mut watch = FrameWatch::default();
        let (a, b) = wire.split_at(cut);
        watch.scan(a);
        watch.scan(b);
        watch
    }

    #[test]
    fn follows_frames_however_the_reads_split() {
        let mut wire = client_frame(TEXT, true, b"hello");
        wire.extend(client_frame(BINARY, true, &[7u8; 300]));
        wire.extend(client_frame(TEXT, true, &vec![b'x'; 70_000]));
        wire.extend(client_frame(PING, true, b""));
        for cut in 0..=wire.len() {
            let watch = scanned(&wire, cut);
            assert!(!watch.unfinished(), "cut {cut}");
            assert_eq!(watch.finished(), 4, "cut {cut}");
            assert_eq!(watch.held(), 0);
            assert!(!watch.closed());
        }
    }

    #[test]
    fn an_unfinished_message_is_seen_with_what_it_declared() {
        // One frame of 1 MiB, its header and 10 bytes sent.
        let big = client_frame(BINARY, true, &vec![1u8; 1 << 20]);
        let mut watch = FrameWatch::default();
        watch.scan(&big[..24]);
        assert!(watch.unfinished());
        assert_eq!(watch.held(), 1 << 20);

        // Fragments, with pongs between them: the message stays unfinished, and the pongs do
        // not count as progress.
        let mut watch = FrameWatch::default();
        watch.scan(&client_frame(TEXT, false, &[b'a'; 1000]));
        let finished = watch.finished();
        for _ in 0..3 {
            watch.scan(&client_frame(PONG, true, b""));
            watch.scan(&client_frame(CONTINUE, false, &[b'a'; 1000]));
        }
        assert!(watch.unfinished());
        assert_eq!(watch.held(), 4000);
        assert_eq!(watch.finished(), finished);
        watch.scan(&client_frame(CONTINUE, true, b"end"));
        assert!(!watch.unfinished());
        assert_eq!(watch.held(), 0);
        assert_eq!(watch.finished(), finished + 1);
    }

    #[test]
    fn a_close_frame_is_seen_once_whole() {
        let close = client_frame(CLOSE, true, &[3, 232, b'b', b'y']);
        let mut watch = FrameWatch::default();
        watch.scan(&close[..close.len() - 1]);
        assert!(!watch.closed());
        watch.scan(&close[close.len() - 1..]);
        assert!(watch.closed());
    }
}
