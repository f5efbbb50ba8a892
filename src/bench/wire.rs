//! The bytes on the wire, written by hand so the load generator stays cheap and allocation-free.
//!
//! Owns: target URLs (`ws://`, `wss://`, `http://`, `redis://` with a `{i}` channel placeholder,
//! loopback only), TCP connects spread over 127.0.0.x source addresses past 20,000 connections,
//! the WebSocket client handshake (with an optional subprotocol and bearer token) over plain TCP
//! ([`ws_connect`]) or over TLS ([`wss_connect`], tokio-rustls, for a subscriber behind a TLS
//! terminator; the plain path's stream stays a bare `TcpStream`), a streaming frame reader
//! that keeps only the first bytes of each message (so a 256 KiB frame is never buffered), masked client frames, and pipelined
//! HTTP/1.1 POST requests with a response parser.
//! What can go wrong on the wire is a [`WireError`].
//! Must not: keep statistics or decide when to send; callers do.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How long a connect plus handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections per source address before the next 127.0.0.x is used.
const PER_SOURCE: usize = 20_000;

/// A bad target URL, a failed connect or handshake, or bytes that break the protocol.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{url}: not a URL")]
    NotAUrl { url: String },
    #[error("{url}: the bench speaks ws://, wss://, http:// and redis://, not {scheme}://")]
    Scheme { url: String, scheme: String },
    #[error("{url}: {source}")]
    Io { url: String, source: io::Error },
    #[error("{url}: no address")]
    NoAddress { url: String },
    #[error("{url}: {ip} is not a loopback address; the bench loads only this machine")]
    NotLoopback { url: String, ip: IpAddr },
    #[error("{url}: not a TLS server name: {host}")]
    ServerName { url: String, host: String },
    /// The TLS handshake failed: `why` is one sentence (a refused certificate says what to do).
    #[error("{url}: {why}")]
    Tls { url: String, why: String },
    #[error("{url}: no handshake within {CONNECT_TIMEOUT:?}")]
    HandshakeTimeout { url: String },
    #[error("{url}: the connection ended during the handshake")]
    HandshakeEnded { url: String },
    #[error("{url}: handshake response too long")]
    HandshakeTooLong { url: String },
    #[error("{url}: refused: {status_line}")]
    Refused {
        url: String,
        /// The response's status code (0 if it had none that parses).
        status: u16,
        status_line: String,
    },
    #[error("the server sent a masked frame")]
    MaskedFrame,
    #[error("bad control frame")]
    BadControlFrame,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    #[error("non-UTF-8 response head")]
    NonUtf8Head,
    #[error("bad status line: {0}")]
    BadStatusLine(String),
    #[error("bad chunk size {0:?}")]
    BadChunkSize(String),
}

/// What a URL names: a scheme, a loopback socket address and the rest (path or channel).
#[derive(Clone, Debug)]
pub struct Target {
    pub scheme: String,
    pub addr: SocketAddr,
    /// `host:port` as written, for the Host header.
    pub authority: String,
    /// The request target (`/path?query`) or, for `redis://`, the channel name (no leading `/`).
    pub path: String,
}

/// Parse `scheme://host:port/rest` and resolve it; refuses anything but loopback addresses,
/// since a benchmark sends load only to this machine.
pub async fn target(url: &str) -> Result<Target, WireError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| WireError::NotAUrl { url: url.into() })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let default_port = match scheme {
        "ws" | "http" => 80,
        "wss" => 443,
        "redis" => 6379,
        other => {
            return Err(WireError::Scheme {
                url: url.into(),
                scheme: other.into(),
            })
        }
    };
    let host_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let addr = tokio::net::lookup_host(&host_port)
        .await
        .map_err(|source| WireError::Io {
            url: url.into(),
            source,
        })?
        .next()
        .ok_or_else(|| WireError::NoAddress { url: url.into() })?;
    if !addr.ip().is_loopback() {
        return Err(WireError::NotLoopback {
            url: url.into(),
            ip: addr.ip(),
        });
    }
    let path = if scheme == "redis" {
        path.trim_start_matches('/').to_string()
    } else {
        path.to_string()
    };
    Ok(Target {
        scheme: scheme.to_string(),
        addr,
        authority: authority.to_string(),
        path,
    })
}

impl Target {
    /// This target as a URL (for messages).
    pub fn url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.path)
    }

    /// The host as written, without the port or an IPv6 address's brackets (the TLS server name).
    pub fn host(&self) -> &str {
        let host = match self.authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => &self.authority,
        };
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// This target with `{i}` in its path replaced by `n`.
    pub fn for_channel(&self, n: usize) -> Target {
        let mut t = self.clone();
        t.path = self.path.replace("{i}", &n.to_string());
        t
    }
}

/// A TCP connection to `addr`; the `index`-th connection of a run. Past 20,000 connections to
/// one loopback address, the source address moves on to 127.0.0.2, .3, …, so ports never run out.
pub async fn connect_tcp(addr: SocketAddr, index: usize) -> io::Result<TcpStream> {
    let stream = match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() && index >= PER_SOURCE => {
            let socket = TcpSocket::new_v4()?;
            let host = u8::try_from(1 + index / PER_SOURCE).unwrap_or(254);
            socket.bind(SocketAddr::new(Ipv4Addr::new(127, 0, 0, host).into(), 0))?;
            socket.connect(addr).await?
        }
        _ => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A connected WebSocket: the stream (a bare `TcpStream` for ws://, a [`TlsStream`] for
/// wss://), the bytes that arrived after the 101 response, and whether the server selected the
/// subprotocol asked for.
pub struct WsConn<S = TcpStream> {
    pub stream: S,
    pub leftover: Vec<u8>,
    pub protocol_selected: bool,
}

/// What a client handshake asks for besides the upgrade itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ask<'a> {
    /// A subprotocol to offer (`Sec-WebSocket-Protocol`).
    pub protocol: Option<&'a str>,
    /// A token, sent as `Authorization: Bearer TOKEN` (SPEC §8).
    pub token: Option<&'a str>,
}

/// Connect and do the client handshake (RFC 6455 §4.1), within [`CONNECT_TIMEOUT`].
pub async fn ws_connect(target: &Target, index: usize, ask: Ask<'_>) -> Result<WsConn, WireError> {
    let url = target.url();
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        let stream = connect_tcp(target.addr, index)
            .await
            .map_err(|source| WireError::Io {
                url: url.clone(),
                source,
            })?;
        ws_handshake(stream, target, ask, &url).await
    })
    .await
    .map_err(|_| WireError::HandshakeTimeout { url: url.clone() })?
}

/// As [`ws_connect`], over TLS (`wss://`): the TCP connect, the TLS handshake with `tls`
/// (verifying the certificate against the target's host), then the WebSocket handshake, all
/// within [`CONNECT_TIMEOUT`].
pub async fn wss_connect(
    target: &Target,
    index: usize,
    ask: Ask<'_>,
    tls: &TlsConnector,
) -> Result<WsConn<TlsStream<TcpStream>>, WireError> {
    let url = target.url();
    let host = target.host();
    let name = ServerName::try_from(host.to_string()).map_err(|_| WireError::ServerName {
        url: url.clone(),
        host: host.into(),
    })?;
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = connect_tcp(target.addr, index)
            .await
            .map_err(|source| WireError::Io {
                url: url.clone(),
                source,
            })?;
        let stream = tls.connect(name, tcp).await.map_err(|e| WireError::Tls {
            url: url.clone(),
            why: tls_sentence(&e),
        })?;
        ws_handshake(stream, target, ask, &url).await
    })
    .await
    .map_err(|_| WireError::HandshakeTimeout { url: url.clone() })?
}

/// One sentence for a failed TLS handshake: a refused certificate in the client's words.
fn tls_sentence(error: &io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(why)) => {
            crate::client::connect::certificate_sentence(why)
        }
        Some(rustls::Error::InvalidMessage(_)) => {
            "the server did not answer in TLS: is this a plain ws:// port?".into()
        }
        Some(other) => format!("TLS: {other}"),
        None => format!("TLS: {error}"),
    }
}

async fn ws_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    target: &Target,
    ask: Ask<'_>,
    url: &str,
) -> Result<WsConn<S>, WireError> {
    let protocol = ask.protocol;
    let io = |source| WireError::Io {
        url: url.into(),
        source,
    };
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        target.path, target.authority
    );
    if let Some(p) = protocol {
        request.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    if let Some(t) = ask.token {
        request.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    // A no-op on TCP; TLS may hold the record until flushed.
    stream.flush().await.map_err(io)?;
    let mut response = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(WireError::HandshakeEnded { url: url.into() });
        }
        response.extend_from_slice(&chunk[..n]);
        if let Some(i) = find(&response, b"\r\n\r\n") {
            break i + 4;
        }
        if response.len() > 16 * 1024 {
            return Err(WireError::HandshakeTooLong { url: url.into() });
        }
    };
    let head = String::from_utf8_lossy(&response[..end]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "101" {
        let status_line = head.lines().next().unwrap_or("").to_string();
        return Err(WireError::Refused {
            url: url.into(),
            status: status.parse().unwrap_or(0),
            status_line,
        });
    }
    let protocol_selected = protocol.is_some_and(|p| {
        head.lines().any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("sec-websocket-protocol") && value.trim() == p
            })
        })
    });
    Ok(WsConn {
        stream,
        leftover: response[end..].to_vec(),
        protocol_selected,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How many leading bytes of each message the reader keeps by default: the sequence number
/// and the send timestamp.
pub const PREFIX: usize = 16;
/// How many it keeps of a `format=json` envelope: `{"channel":"…","id":"…","data":"` then the
/// 32-character text header (channel names here are short; an id is at most 41 bytes).
pub const ENVELOPE_PREFIX: usize = 256;

/// What the reader found in the bytes fed to it.
pub enum Event<'a> {
    /// A whole data message (text or binary; in `lightrelay.ack` mode a text one is an ack);
    /// `prefix` holds its first bytes (up to [`PREFIX`], or what [`FrameReader::keeping`] asked).
    Message {
        prefix: &'a [u8],
        len: u64,
    },
    /// A ping, to be answered with a pong carrying the same payload.
    Ping(&'a [u8]),
    Close(Option<u16>),
}

/// A streaming reader of server-to-client frames. It never buffers a payload: it keeps the
/// first 16 bytes (or up to [`ENVELOPE_PREFIX`]) of each message and control-frame payloads (at most 125 bytes), and skips
/// the rest as it arrives.
pub struct FrameReader {
    header: [u8; 14],
    header_len: usize,
    in_frame: bool,
    opcode: u8,
    fin: bool,
    remaining: u64,
    prefix: [u8; ENVELOPE_PREFIX],
    prefix_len: usize,
    /// How many leading bytes of each message to keep (at most [`ENVELOPE_PREFIX`]).
    keep: usize,
    message_len: u64,
    control: [u8; 125],
    control_len: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            header: [0; 14],
            header_len: 0,
            in_frame: false,
            opcode: 0,
            fin: false,
            remaining: 0,
            prefix: [0; ENVELOPE_PREFIX],
            prefix_len: 0,
            keep: PREFIX,
            message_len: 0,
            control: [0; 125],
            control_len: 0,
        }
    }
}

impl FrameReader {
    /// A reader that keeps the first `keep` bytes of each message (at most [`ENVELOPE_PREFIX`]).
    pub fn keeping(keep: usize) -> FrameReader {
        FrameReader {
            keep: keep.min(ENVELOPE_PREFIX),
            ..FrameReader::default()
        }
    }

    /// Consume `data`, calling `on` for each complete message or control frame. An error is
    /// a protocol violation (a masked or oversized control frame).
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on: &mut impl FnMut(Event<'_>),
    ) -> Result<(), WireError> {
        loop {
            if !self.in_frame {
                // Gather the header: 2 bytes, then the extended length.
                let need = if self.header_len < 2 {
                    2
                } else {
                    match self.header[1] & 0x7f {
                        126 => 4,
                        127 => 10,
                        _ => 2,
                    }
                };
                if self.header_len < need {
                    if data.is_empty() {
                        return Ok(());
                    }
                    let take = (need - self.header_len).min(data.len());
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&data[..take]);
                    self.header_len += take;
                    data = &data[take..];
                    continue;
                }
                self.start_frame(need)?;
            }
            let take = usize::try_from(self.remaining)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let chunk = &data[..take];
            if self.opcode >= 8 {
                self.control[self.control_len..self.control_len + take].copy_from_slice(chunk);
                self.control_len += take;
            } else {
                let keep = (self.keep - self.prefix_len).min(take);
                self.prefix[self.prefix_len..self.prefix_len + keep]
                    .copy_from_slice(&chunk[..keep]);
                self.prefix_len += keep;
                self.message_len += take as u64;
            }
            self.remaining -= take as u64;
            data = &data[take..];
            if self.remaining > 0 {
                return Ok(());
            }
            self.end_frame(on);
        }
    }

    fn start_frame(&mut self, header_len: usize) -> Result<(), WireError> {
        let h = &self.header;
        if h[1] & 0x80 != 0 {
            return Err(WireError::MaskedFrame);
        }
        self.fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        self.remaining = match header_len {
            4 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            10 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            _ => u64::from(h[1] & 0x7f),
        };
        match opcode {
            0 => {}
            1 | 2 => {
                self.prefix_len = 0;
                self.message_len = 0;
            }
            8..=10 => {
                if self.remaining > 125 || !self.fin {
                    return Err(WireError::BadControlFrame);
                }
                self.control_len = 0;
            }
            other => return Err(WireError::UnknownOpcode(other)),
        }
        // A continuation keeps the data opcode of its message.
        if opcode != 0 {
            self.opcode = opcode;
        }
        self.in_frame = true;
        Ok(())
    }

    fn end_frame(&mut self, on: &mut impl FnMut(Event<'_>)) {
        self.in_frame = false;
        self.header_len = 0;
        match self.opcode {
            8 => {
                let code = (self.control_len >= 2)
                    .then(|| u16::from_be_bytes([self.control[0], self.control[1]]));
                on(Event::Close(code));
            }
            9 => on(Event::Ping(&self.control[..self.control_len])),
            10 => {}
            _ if self.fin => on(Event::Message {
                prefix: &self.prefix[..self.prefix_len],
                len: self.message_len,
            }),
            _ => {}
        }
    }
}

/// Append one masked client frame (FIN set) to `out`. The mask key is zero, which RFC 6455
/// allows (the key must be present, not random for a non-browser client): the payload goes
/// out as it is, and servers unmask it as they would any other.
pub fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

pub const OP_BINARY: u8 = 2;
pub const OP_CLOSE: u8 = 8;
pub const OP_PONG: u8 = 10;

/// Append one `POST` request (HTTP/1.1, keep-alive) with `body`.
pub fn http_post(out: &mut Vec<u8>, target: &Target, body: &[u8]) {
    use std::io::Write;
    let _ = write!(
        out,
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        target.path,
        target.authority,
        body.len()
    );
    out.extend_from_slice(body);
}

/// Parses pipelined HTTP/1.1 responses (Content-Length or chunked bodies) from a stream.
#[derive(Default)]
pub struct ResponseReader {
    buf: Vec<u8>,
}

impl ResponseReader {
    /// Add bytes and return the status codes of every response now complete.
    pub fn feed(&mut self, data: &[u8], statuses: &mut Vec<u16>) -> Result<(), WireError> {
        self.buf.extend_from_slice(data);
        let mut at = 0;
        while let Some(used) = parse_response(&self.buf[at..], statuses)? {
            at += used;
        }
        self.buf.drain(..at);
        Ok(())
    }
}

/// One response at the start of `buf`: its length once complete, `None` while incomplete.
fn parse_response(buf: &[u8], statuses: &mut Vec<u16>) -> Result<Option<usize>, WireError> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| WireError::NonUtf8Head)?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| WireError::BadStatusLine(head.lines().next().unwrap_or("").into()))?;
    let mut length = None;
    let mut chunked = false;
    for line in head.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    let body_start = head_end + 4;
    let end = if chunked {
        let mut at = body_start;
        loop {
            let Some(line_end) = find(&buf[at..], b"\r\n") else {
                return Ok(None);
            };
            let size_text = std::str::from_utf8(&buf[at..at + line_end]).unwrap_or("");
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| WireError::BadChunkSize(size_text.into()))?;
            at += line_end + 2;
            if size == 0 {
                // No trailers expected: the final CRLF.
                if buf.len() < at + 2 {
                    return Ok(None);
                }
                break at + 2;
            }
            if buf.len() < at + size + 2 {
                return Ok(None);
            }
            at += size + 2;
        }
    } else {
        let end = body_start + length.unwrap_or(0);
        if buf.len() < end {
            return Ok(None);
        }
        end
    };
    statuses.push(status);
    Ok(Some(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(len as u8);
        } else if len <= 65535 {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    #[derive(Debug, PartialEq)]
    enum Seen {
        Message(Vec<u8>, u64),
        Ping(Vec<u8>),
        Close(Option<u16>),
    }

    fn read_all(bytes: &[u8], step: usize) -> Vec<Seen> {
        let mut reader = FrameReader::default();
        let mut seen = Vec::new();
        for chunk in bytes.chunks(step) {
            reader
                .feed(chunk, &mut |event| {
                    seen.push(match event {
                        Event::Message { prefix, len } => Seen::Message(prefix.to_vec(), len),
                        Event::Ping(p) => Seen::Ping(p.to_vec()),
                        Event::Close(c) => Seen::Close(c),
                    })
                })
                .unwrap();
        }
        seen
    }

    #[test]
    fn frames_split_anywhere_read_the_same() {
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let mut stream = server_frame(2, true, b"0123456789abcdefXYZ");
        stream.extend(server_frame(1, true, b""));
        stream.extend(server_frame(9, true, b"hi"));
        stream.extend(server_frame(2, true, &big));
        stream.extend(server_frame(2, false, b"01234567"));
        stream.extend(server_frame(0, false, b"89abcdef"));
        stream.extend(server_frame(0, true, b"tail"));
        stream.extend(server_frame(2, true, &big[..1000]));
        stream.extend(server_frame(8, true, &1001u16.to_be_bytes()));
        let expected = vec![
            Seen::Message(b"0123456789abcdef".to_vec(), 19),
            Seen::Message(vec![], 0),
            Seen::Ping(b"hi".to_vec()),
            Seen::Message(big[..16].to_vec(), 300_000),
            Seen::Message(b"0123456789abcdef".to_vec(), 20),
            Seen::Message(big[..16].to_vec(), 1000),
            Seen::Close(Some(1001)),
        ];
        for step in [1, 2, 3, 7, 100, 4096, stream.len()] {
            assert_eq!(read_all(&stream, step), expected, "step {step}");
        }
    }

    #[test]
    fn a_reader_keeping_more_sees_the_envelope_header() {
        let text = [b'a'; 300];
        let stream = server_frame(1, true, &text);
        let mut reader = FrameReader::keeping(ENVELOPE_PREFIX);
        let mut kept = Vec::new();
        for chunk in stream.chunks(7) {
            reader
                .feed(chunk, &mut |event| {
                    if let Event::Message { prefix, len } = event {
                        kept.push((prefix.len(), len));
                    }
                })
                .unwrap();
        }
        assert_eq!(kept, vec![(ENVELOPE_PREFIX, 300)]);
    }

    #[test]
    fn pipelined_responses_with_length_and_chunks() {
        let text = "HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        for step in [1, 5, text.len()] {
            let mut reader = ResponseReader::default();
            let mut statuses = Vec::new();
            for chunk in text.as_bytes().chunks(step) {
                reader.feed(chunk, &mut statuses).unwrap();
            }
            assert_eq!(statuses, vec![201, 202, 200]);
        }
    }

    #[test]
    fn client_frames_carry_a_zero_mask() {
        let mut out = Vec::new();
        client_frame(&mut out, OP_BINARY, &[7u8; 200]);
        assert_eq!(&out[..8], &[0x82, 0x80 | 126, 0, 200, 0, 0, 0, 0]);
        assert_eq!(out.len(), 8 + 200);
    }
}
