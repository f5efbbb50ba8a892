//! The HTTP face of both servers: every request that arrives, upgraded or not (SPEC §2, §5).
//!
//! Owns: routing (`/healthz`, `/metrics`, `/status` and `/status.json`, `/presence` and
//! `/presence/PATH` (SPEC §10) on both servers, `POST /PATH`, `POST /down/PATH` on the
//! subscribe server (SPEC §10; its token check is on PATH), the live page's files on the
//! subscribe server, WebSocket upgrades, 426 for the rest),
//! the refusals that happen before an upgrade (400 bad path, bad key or HTTP/1.0; 413, 408,
//! 503 when the POST body budget is spent), each with a one-line reason and
//! `Connection: close` so the connection ends with the answer; the raw answers written
//! before hyper parses anything ([`raw_refusal`]: 503 over `--max-connections`, and
//! [`RequestLineGuard`]'s 400 for a request target hyper's parser would refuse with an empty
//! body); the WebSocket handshake itself (accept key, `lightrelay.ack` subprotocol, buffer
//! sizes) and handing the upgraded connection, with its connection slot (and its client's
//! place under `--max-connections-per-ip`), to its session. The abuse limits are
//! `limits`'s: one call before the upgrade (origin, connections per address) and one before
//! a POST body is read (rate per address).
//! Owns too: the `/metrics` content negotiation (text 0.0.4 unless `Accept` prefers
//! OpenMetrics), and the `debug` lines of a client connecting and leaving (with its address):
//! only when debug is on are they worked out and carried by the connection's task.
//! Must not: hold per-connection state after the upgrade, wait for the POST body budget, or
//! block on Redis except for a POST publish (bounded by `--redis-timeout`).
//! The abuse limits (`limits`) and then the token check (SPEC §8, `auth`) run once the path
//! is known and before anything else is done for the request: before a POST body is read,
//! before an upgrade joins the hub.

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::channel::ChannelName;
use super::frames::Watched;
use super::metrics::{Exposition, Metrics, Refusal};
use super::read_ahead::ReadAhead;
use super::relay::{ConnectionSlot, Relay, Role, Upgraded};
use super::status;
use super::write::socket::Socket;
use crate::auth::{self, AuthRefusal, Grant};
use crate::{ACK_PROTOCOL, ROLE_HEADER};

/// Every answer to a plain request.
pub(crate) type Reply = Response<Full<Bytes>>;

pub(crate) fn reply(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A refusal: `reply` with `Connection: close`, so hyper ends the connection once the answer
/// is out instead of keeping it open for another request until the handshake timeout.
pub(crate) fn refusal(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut response = reply(status, body);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A whole refusal as bytes, for the answers written on the socket before (or instead of)
/// hyper: `reason` is one line.
pub(crate) fn raw_refusal(status: StatusCode, reason: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         connection: close\r\n{extra_headers}\r\n{reason}\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        reason.len() + 1,
    )
    .into_bytes()
}

/// Answer one HTTP request from `peer` (the TCP peer address) on a connection holding `slot`.
pub(crate) async fn handle<R: Role>(
    relay: Arc<Relay<R>>,
    slot: Arc<ConnectionSlot<R>>,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Result<Reply, Infallible> {
    if is_upgrade(&req) {
        return Ok(upgrade(relay, slot, peer, req).await);
    }
    let path = req.uri().path();
    // The live page (SPEC §7) belongs to the subscribe server; the publish server's `GET /`
    // stays a 426 like any other plain request there.
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        // The status page (SPEC §10), on both servers.
        match path {
            "/status" => return Ok(status::page()),
            "/status.json" => {
                if let Err(refusal) = operator(&relay, &req) {
                    return Ok(*refusal);
                }
                return Ok(status::json(&relay).await);
            }
            _ => {}
        }
        if let Some(page) = relay.role.page(path) {
            return Ok(page);
        }
    }
    let answer = match (req.method(), path) {
        (&Method::GET, "/healthz") => match relay.role.health() {
            Ok(()) => reply(StatusCode::OK, "ok\n"),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        (&Method::GET, p) if p == "/presence" || p.starts_with("/presence/") => {
            match operator(&relay, &req) {
                Err(refusal) => *refusal,
                Ok(()) if p == "/presence" => presence(&relay, None).await,
                Ok(()) => presence(&relay, Some(&p["/presence".len()..])).await,
            }
        }
        (&Method::GET, "/metrics") => {
            let format = Exposition::asked_by(req.headers().get_all(header::ACCEPT));
            let mut response = reply(StatusCode::OK, relay.render_metrics(format));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            response
        }
        // SPEC §10: routed before the subscribe server's 426 (it answers with or without
        // --accept-publish); on the publish server `/down/x` is a channel like any other.
        (&Method::POST, p) if p.starts_with(DOWN) && relay.role.sends_downlink() => {
            post(relay, peer, req, Grant::Down).await
        }
        (&Method::POST, _) if relay.role.publishes() => {
            post(relay, peer, req, Grant::Publish).await
        }
        // Only the subscribe server without --accept-publish does not publish.
        (&Method::POST, _) => {
            let mut response = refusal(
                StatusCode::UPGRADE_REQUIRED,
                "this is the subscribe server: POST to publish goes to the publish server \
                 (lightrelay-publish), or start this one with --accept-publish\n",
            );
            response
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            response
        }
        _ => {
            let mut response = refusal(
                StatusCode::UPGRADE_REQUIRED,
                "this is a WebSocket endpoint: connect with ws:// (GET /healthz, /metrics, /status and /presence answer plain HTTP)\n",
            );
            response
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            response
        }
    };
    Ok(answer)
}

/// `GET /presence` (the fleet, JSON) and `GET /presence/PATH` (that path's entries, or 404):
/// SPEC §10. 404 with presence off, 503 when Redis does not answer.
async fn presence<R: Role>(relay: &Relay<R>, path: Option<&str>) -> Reply {
    let Some(presence) = &relay.presence else {
        return reply(
            StatusCode::NOT_FOUND,
            "presence is off on this server (--presence-interval 0)\n",
        );
    };
    let fleet = match presence.fleet().await {
        Ok(fleet) => fleet,
        Err(why) => return reply(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    };
    let json = match path {
        None => serde_json::to_string(&fleet),
        Some(path) => {
            let devices = fleet.on(path);
            if devices.is_empty() {
                return reply(
                    StatusCode::NOT_FOUND,
                    format!("no publisher is connected on {path}\n"),
                );
            }
            serde_json::to_string(&devices)
        }
    };
    let mut response = reply(StatusCode::OK, json.unwrap_or_default());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    header_has_token(req, header::UPGRADE, "websocket")
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The request's channel, or the 400 that refuses it (boxed: a response is large, and this is
/// the path every upgrade takes).
fn channel_of<R: Role>(
    relay: &Relay<R>,
    req: &Request<Incoming>,
) -> Result<ChannelName, Box<Reply>> {
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let common = &relay.common;
    ChannelName::from_target(&common.channel_prefix, target, common.max_path_bytes).map_err(|e| {
        relay.metrics.refused(Refusal::bad_path);
        Box::new(refusal(StatusCode::BAD_REQUEST, format!("{e}\n")))
    })
}

/// `POST /down/PATH` (SPEC §10): the path of the device follows, with its leading `/`.
const DOWN: &str = "/down/";

/// What the token check lets a request on its path do.
struct Access {
    /// When its token expires.
    expires: Option<tokio::time::Instant>,
    /// Whether it may publish (a `pub` grant, or no token needed for publishing).
    may_publish: bool,
}

/// The token check (SPEC §8) for a request asking `grant` on its path: what it may do, or the
/// 401 (with `WWW-Authenticate: Bearer`) or 403 that refuses it, counted by reason.
fn authorize<R: Role>(
    relay: &Relay<R>,
    req: &Request<Incoming>,
    grant: Grant,
) -> Result<Access, Box<Reply>> {
    let path = req.uri().path();
    authorize_on(relay, req, if path.is_empty() { "/" } else { path }, grant)
}

/// The token check for what shows the whole fleet (`/presence`, `/status.json`): when
/// subscribing needs a token (`--auth all`), one whose `sub` grant covers every path (`*`).
/// With `--auth publish` they are as open as subscribing is.
fn operator<R: Role>(relay: &Relay<R>, req: &Request<Incoming>) -> Result<(), Box<Reply>> {
    authorize_on(relay, req, "*", Grant::Subscribe).map(drop)
}

/// The token check for `grant` on `path` (the device's path of a `POST /down/PATH`).
fn authorize_on<R: Role>(
    relay: &Relay<R>,
    req: &Request<Incoming>,
    path: &str,
    grant: Grant,
) -> Result<Access, Box<Reply>> {
    match relay
        .auth
        .check(req.headers(), req.uri().query(), path, grant)
    {
        Ok(token) => Ok(Access {
            expires: token.as_ref().and_then(|t| t.exp).map(auth::deadline_of),
            may_publish: !relay.auth.requires(Grant::Publish)
                || token.is_some_and(|t| t.allows(Grant::Publish, path)),
        }),
        Err(refused) => {
            relay.metrics.auth_refused(refused.reason);
            let mut response = refusal(refused.status, format!("{}\n", refused.message));
            if refused.status == StatusCode::UNAUTHORIZED {
                // RFC 6750 §3: no error code when no token was given.
                let challenge = if refused.reason == AuthRefusal::missing {
                    HeaderValue::from_static("Bearer realm=\"lightrelay\"")
                } else {
                    HeaderValue::from_static("Bearer realm=\"lightrelay\", error=\"invalid_token\"")
                };
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge);
            }
            Err(Box::new(response))
        }
    }
}

/// `POST /PATH` (`grant` Publish): publish the body, answer the receiver count.
/// `POST /down/PATH` (`grant` Down, SPEC §10): publish it on PATH's downlink channel, answer
/// what [`Role::downlink`] says.
async fn post<R: Role>(
    relay: Arc<Relay<R>>,
    peer: IpAddr,
    req: Request<Incoming>,
    grant: Grant,
) -> Reply {
    // The device's path: what follows `/down`, its `/` kept.
    let device = (grant == Grant::Down).then(|| req.uri().path()["/down".len()..].to_string());
    let channel = match &device {
        None => channel_of(&relay, &req),
        Some(path) => {
            let common = &relay.common;
            ChannelName::from_target(&common.channel_prefix, path, common.max_path_bytes)
                .map(|channel| channel.with_suffix(&common.downlink_suffix))
                .map_err(|e| {
                    relay.metrics.refused(Refusal::bad_path);
                    Box::new(refusal(StatusCode::BAD_REQUEST, format!("{e}\n")))
                })
        }
    };
    let channel = match channel {
        Ok(channel) => channel,
        Err(refusal) => return *refusal,
    };
    if let Err(refusal) = relay.limits.admit_post(peer, req.headers()) {
        return *refusal;
    }
    let access = match &device {
        None => authorize(&relay, &req, grant),
        Some(path) => authorize_on(&relay, &req, path, grant),
    };
    if let Err(refusal) = access {
        return *refusal;
    }
    let max = relay.common.max_message_bytes;
    let too_large = || {
        refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {max} bytes (--max-message-bytes)\n"),
        )
    };
    // A declared Content-Length is known before any of the body: refuse at once rather than
    // after reading (or waiting for) bytes that will be thrown away.
    let declared = req.body().size_hint().lower();
    if declared > max as u64 {
        return too_large();
    }
    // The bytes this body may hold, from the process-wide budget, taken without waiting: a
    // body without Content-Length (chunked) may grow to --max-message-bytes.
    let want = match req.body().size_hint().exact() {
        Some(len) => len as usize,
        None => max,
    };
    // Bounded by MAX_MESSAGE_BYTES (256 MiB), so it fits a u32.
    let want = u32::try_from(want).unwrap_or(u32::MAX);
    let Ok(_held) = relay.post_budget.try_acquire_many(want) else {
        relay.metrics.refused(Refusal::post_budget);
        let mut response = refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many POST bodies being received at once; try again shortly\n",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    // The body is part of the request: hyper's header timeout does not cover it, so a body
    // that stalls is bounded here by the same --handshake-timeout (else it holds the
    // connection forever).
    let patience = relay.common.handshake_timeout;
    let collected =
        tokio::time::timeout(patience, Limited::new(req.into_body(), max).collect()).await;
    let Ok(collected) = collected else {
        return refusal(
            StatusCode::REQUEST_TIMEOUT,
            format!("body not received within {patience:?} (--handshake-timeout)\n"),
        );
    };
    let body = match collected {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                format!("could not read body: {e}\n"),
            )
        }
    };
    if let Some(path) = device {
        return R::downlink(&relay, &path, channel, body).await;
    }
    match R::publish_once(&relay, channel, body).await {
        Ok(receivers) => reply(StatusCode::OK, format!("{receivers}\n")),
        Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// Check an upgrade request, answer 101 and start its session; or refuse it before the upgrade.
async fn upgrade<R: Role>(
    relay: Arc<Relay<R>>,
    slot: Arc<ConnectionSlot<R>>,
    peer: IpAddr,
    mut req: Request<Incoming>,
) -> Reply {
    if req.method() != Method::GET {
        return refusal(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade must be a GET\n",
        );
    }
    // RFC 6455 §4.1: the opening handshake is an HTTP/1.1 request (1.0 has no Upgrade).
    if req.version() != Version::HTTP_11 {
        return refusal(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade must be an HTTP/1.1 request\n",
        );
    }
    let channel = match channel_of(&relay, &req) {
        Ok(channel) => channel,
        Err(refusal) => return *refusal,
    };
    let admission = match relay.limits.admit_upgrade(peer, req.headers()) {
        Ok(admission) => admission,
        Err(refusal) => return *refusal,
    };
    let access = match authorize(&relay, &req, R::GRANT) {
        Ok(access) => access,
        Err(refusal) => return *refusal,
    };
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut response = refusal(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is supported\n",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return refusal(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    if !is_websocket_key(key.as_bytes()) {
        return refusal(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be 16 bytes in base64 (24 characters)\n",
        );
    }
    if !header_has_token(&req, header::CONNECTION, "upgrade") {
        return refusal(StatusCode::BAD_REQUEST, "missing 'Connection: upgrade'\n");
    }
    // Acks only where messages are published: a subscribe server without --accept-publish
    // does not select the subprotocol, so an ack publisher pointed at it fails at once
    // instead of waiting for acks that never come.
    let ack = relay.role.publishes()
        && access.may_publish
        && header_has_token(&req, header::SEC_WEBSOCKET_PROTOCOL, ACK_PROTOCOL);
    let accept = derive_accept_key(key.as_bytes());

    let on_upgrade = hyper::upgrade::on(&mut req);
    let prepared = match R::prepare(&relay, &channel, req.uri().query()).await {
        Ok(prepared) => prepared,
        Err(reason) => {
            relay.metrics.refused(Refusal::bad_query);
            return refusal(StatusCode::BAD_REQUEST, format!("{reason}\n"));
        }
    };
    // The client's comings and goings are logged at debug: when that is off (the usual case),
    // this is one cached check and the connection's task carries nothing more.
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        (
            relay.limits.client_address(peer, req.headers()),
            channel.clone(),
        )
    });
    let task_relay = relay.clone();
    // Combinators, not an async block: the task holds the wait for the upgrade, then the
    // session, each once (see `start_session`).
    let task = futures_util::FutureExt::then(on_upgrade, move |upgraded| {
        let session = match upgraded {
            Ok(upgraded) => {
                start_session(&task_relay, upgraded, channel, ack, access, prepared, slot)
            }
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                None
            }
        };
        match session {
            Some(session) => {
                futures_util::future::Either::Left(futures_util::FutureExt::map(session, Some))
            }
            None => futures_util::future::Either::Right(std::future::ready(None)),
        }
    });
    match logged {
        None => admission.spawn(&relay.tracker, futures_util::FutureExt::map(task, drop)),
        Some((client, channel)) => {
            tracing::debug!(%client, %channel, ack, "client connected");
            let task = futures_util::FutureExt::map(task, move |ending| {
                if let Some(ending) = ending {
                    tracing::debug!(%client, %channel, ?ending, "client left");
                }
            });
            admission.spawn(&relay.tracker, task);
        }
    }

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    // Which server this is, for a client aimed at the wrong port (once per handshake).
    headers.insert(
        header::HeaderName::from_static(ROLE_HEADER),
        HeaderValue::from_static(R::NAME),
    );
    if ack {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(ACK_PROTOCOL),
        );
    }
    response
}

/// RFC 6455 §4.1: the key is a base64-encoded 16-byte value.
fn is_websocket_key(key: &[u8]) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|bytes| bytes.len() == 16)
}

/// The session of a connection just upgraded, built synchronously: the WebSocket is made
/// here (tokio-tungstenite's constructor is an `async fn` that is ready at its first poll)
/// and moved into the session's future once. Awaited inside the connection's task instead,
/// the WebSocket and the session were each kept in a slot of their own in that task: it grew
/// from 1.8 KB to 3.4 KB per connection.
fn start_session<R: Role>(
    relay: &Arc<Relay<R>>,
    upgraded: hyper::upgrade::Upgraded,
    channel: ChannelName,
    ack: bool,
    access: Access,
    prepared: R::Prepared,
    slot: Arc<ConnectionSlot<R>>,
) -> Option<impl std::future::Future<Output = super::session::Ending> + Send + 'static> {
    use futures_util::FutureExt;
    let ws_config = ws_config(relay.common.max_message_bytes);
    let Some((socket, read_ahead)) = into_socket(upgraded) else {
        tracing::error!("an upgraded connection is not a TCP stream; dropped");
        return None;
    };
    // Bytes the client sent right behind its request (read by hyper) are handed on first.
    let ws = WebSocketStream::from_raw_socket(
        Watched::new(ReadAhead::after(socket.clone(), &read_ahead)),
        WsRole::Server,
        Some(ws_config),
    )
    .now_or_never();
    let Some(ws) = ws else {
        tracing::error!("the WebSocket could not be set up at once; dropped");
        return None;
    };
    let connection = Upgraded {
        ws,
        socket,
        channel,
        ack,
        expires: access.expires,
        may_publish: access.may_publish,
    };
    Some(relay.serve(connection, prepared, slot))
}

/// Back from hyper's upgraded connection to the TCP stream itself, and what hyper read past
/// the request: the session and the hub share the stream as a [`Socket`] (the hub writes
/// directly to idle subscribers). Nothing of hyper's is kept: its read buffer would stay
/// allocated (8 KiB) for as long as a slice of it lived.
fn into_socket(upgraded: hyper::upgrade::Upgraded) -> Option<(Socket, Vec<u8>)> {
    let parts = upgraded.downcast::<TokioIo<RequestLineGuard>>().ok()?;
    let read_ahead = parts.read_buf.to_vec();
    Some((Socket::new(parts.io.into_inner().stream), read_ahead))
}

/// The TCP stream as hyper reads it, watching the request target of the connection's first
/// request as it passes (SPEC §2). hyper's parser refuses a target holding DEL, a byte
/// 0x80-0xFF or a control byte with a bare 400 and an empty body, and has no hook to say
/// more; so the guard sees such a byte first, writes a 400 with the reason itself and ends
/// the connection (an I/O error to hyper, which then answers nothing). After the first
/// request line it only passes reads and writes through; the upgrade unwraps it.
pub(crate) struct RequestLineGuard {
    stream: TcpStream,
    state: Scan,
    metrics: Metrics,
}

enum Scan {
    /// In the method (a token), before the first space.
    Method,
    /// In the request target, `offset` bytes in.
    Target { offset: usize },
    /// The request line passed (or is not one this guard judges): hyper decides.
    Passed,
    /// Writing the 400.
    Refusing { answer: Vec<u8>, written: usize },
    /// Sending FIN after the 400.
    Closing,
    /// Reading what the client had sent (at most `left` more bytes), so that closing the
    /// socket does not reset the connection and lose the 400 on its way (nginx's lingering
    /// close); hyper's header timeout bounds the time.
    Draining { left: usize },
    /// The 400 is out: every further read fails, so hyper ends the connection.
    Refused,
}

impl RequestLineGuard {
    pub(crate) fn new(stream: TcpStream, metrics: Metrics) -> Self {
        RequestLineGuard {
            stream,
            state: Scan::Method,
            metrics,
        }
    }

    /// Follow the request line through `bytes`; the reason when the target holds a byte
    /// outside 0x21-0x7E.
    fn scan(&mut self, bytes: &[u8]) -> Option<String> {
        for &byte in bytes {
            match &mut self.state {
                Scan::Method if byte == b' ' => self.state = Scan::Target { offset: 0 },
                // A method is a token; anything else is hyper's to refuse.
                Scan::Method if !byte.is_ascii_graphic() => self.state = Scan::Passed,
                Scan::Method => {}
                Scan::Target { .. } if matches!(byte, b' ' | b'\r' | b'\n') => {
                    self.state = Scan::Passed;
                }
                Scan::Target { offset } if !(0x21..=0x7E).contains(&byte) => {
                    return Some(format!(
                        "request target holds byte 0x{byte:02X} at offset {offset}; \
                         only printable ASCII (0x21-0x7E) is allowed"
                    ));
                }
                Scan::Target { offset } => *offset += 1,
                _ => return None,
            }
        }
        None
    }
}

impl AsyncRead for RequestLineGuard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                Scan::Passed => return Pin::new(&mut this.stream).poll_read(cx, buf),
                Scan::Method | Scan::Target { .. } => {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
                    let Some(reason) = this.scan(&buf.filled()[before..]) else {
                        return Poll::Ready(Ok(()));
                    };
                    // hyper never sees these bytes.
                    buf.set_filled(before);
                    this.metrics.refused(Refusal::bad_path);
                    this.state = Scan::Refusing {
                        answer: raw_refusal(StatusCode::BAD_REQUEST, &reason, ""),
                        written: 0,
                    };
                }
                Scan::Refusing { answer, written } => {
                    while *written < answer.len() {
                        match ready!(Pin::new(&mut this.stream).poll_write(cx, &answer[*written..]))
                        {
                            Ok(0) => break,
                            Ok(n) => *written += n,
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    this.state = Scan::Closing;
                }
                Scan::Closing => {
                    // An error here only means the client is gone already.
                    let _ = ready!(Pin::new(&mut this.stream).poll_shutdown(cx));
                    this.state = Scan::Draining { left: 64 * 1024 };
                }
                Scan::Draining { left } => {
                    let mut scratch = [0u8; 1024];
                    let mut scratch = ReadBuf::new(&mut scratch);
                    match ready!(Pin::new(&mut this.stream).poll_read(cx, &mut scratch)) {
                        Ok(()) if !scratch.filled().is_empty() && *left > 1024 => {
                            *left -= scratch.filled().len();
                        }
                        _ => this.state = Scan::Refused,
                    }
                }
                Scan::Refused => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "request target refused before parsing",
                    )))
                }
            }
        }
    }
}

super::write_through!(RequestLineGuard, stream);

/// tungstenite's read buffer, and the most it asks for per read: 256 bytes hold any control
/// frame a client sends (at most 131 bytes with its mask), or two small messages.
pub(crate) const READ_BUFFER: usize = 256;

/// Buffer sizes, chosen on purpose: tungstenite's defaults (128 KiB to read, 128 KiB before a
/// write) would cost 100+ KiB per idle connection. tungstenite keeps its read buffer for the
/// connection's life, so it gets [`READ_BUFFER`] bytes on either server: an idle subscriber
/// reads pongs and the odd frame, an idle publisher nothing; a burst is read with one syscall
/// by [`ReadAhead`], which holds its rest only until tungstenite has taken it, and a larger
/// message grows tungstenite's buffer as it comes. Writes collect up to 16 KiB of queued
/// frames before a write call, so a burst goes out in few syscalls while an idle connection
/// holds no write buffer at all.
fn ws_config(max: usize) -> WebSocketConfig {
    use super::write::socket::WRITE_BUFFER;
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = READ_BUFFER;
    config.write_buffer_size = WRITE_BUFFER;
    config.max_write_buffer_size = WRITE_BUFFER + max + 64;
    config.max_message_size = Some(max);
    config.max_frame_size = Some(max);
    config
}
