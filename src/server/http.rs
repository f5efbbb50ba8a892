//! The HTTP face of both servers: every request that arrives, upgraded or not (SPEC §2, §5).
//!
//! Owns: routing (`/healthz`, `/metrics`, `POST /PATH`, the live page's files on the subscribe
//! server, WebSocket upgrades, 426 for the rest),
//! the refusals that happen before an upgrade (400 bad path, 503 over `--max-connections`),
//! the WebSocket handshake itself (accept key, `lightrelay.ack` subprotocol, buffer sizes) and
//! handing the upgraded connection to its session.
//! Must not: hold per-connection state after the upgrade, or block on Redis except for a POST
//! publish (bounded by `--redis-timeout`).
//! Room left: authentication (SPEC §8) is a check between `upgrade_target` and the 101.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::channel::ChannelName;
use super::frames::Watched;
use super::relay::{Relay, Role, Upgraded};
use super::socket::Socket;
use crate::ACK_PROTOCOL;

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

/// Answer one HTTP request.
pub(crate) async fn handle<R: Role>(
    relay: Arc<Relay<R>>,
    req: Request<Incoming>,
) -> Result<Reply, Infallible> {
    if is_upgrade(&req) {
        return Ok(upgrade(relay, req));
    }
    let path = req.uri().path();
    // The live page (SPEC §7) belongs to the subscribe server; the publish server's `GET /`
    // stays a 426 like any other plain request there.
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        if let Some(page) = relay.role.page(path) {
            return Ok(page);
        }
    }
    let answer = match (req.method(), path) {
        (&Method::GET, "/healthz") => match relay.role.health() {
            Ok(()) => reply(StatusCode::OK, "ok\n"),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        (&Method::GET, "/metrics") => {
            let mut response = reply(StatusCode::OK, relay.render_metrics());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        (&Method::POST, _) if relay.role.publishes() => post(relay, req).await,
        _ => {
            let mut response = reply(
                StatusCode::UPGRADE_REQUIRED,
                "this is a WebSocket endpoint: connect with ws:// (GET /healthz and /metrics answer plain HTTP)\n",
            );
            response
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            response
        }
    };
    Ok(answer)
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
        relay.metrics.refused("bad_path");
        Box::new(reply(StatusCode::BAD_REQUEST, format!("{e}\n")))
    })
}

/// `POST /PATH`: publish the body, answer the receiver count.
async fn post<R: Role>(relay: Arc<Relay<R>>, req: Request<Incoming>) -> Reply {
    let channel = match channel_of(&relay, &req) {
        Ok(channel) => channel,
        Err(refusal) => return *refusal,
    };
    let max = relay.common.max_message_bytes;
    // The body is part of the request: hyper's header timeout does not cover it, so a body
    // that stalls is bounded here by the same --handshake-timeout (else it holds the
    // connection forever).
    let patience = relay.common.handshake_timeout;
    let collected =
        tokio::time::timeout(patience, Limited::new(req.into_body(), max).collect()).await;
    let Ok(collected) = collected else {
        return reply(
            StatusCode::REQUEST_TIMEOUT,
            format!("body not received within {patience:?} (--handshake-timeout)\n"),
        );
    };
    let body = match collected {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {max} bytes (--max-message-bytes)\n"),
            );
        }
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                format!("could not read body: {e}\n"),
            )
        }
    };
    match R::publish_once(&relay, channel, body).await {
        Ok(receivers) => reply(StatusCode::OK, format!("{receivers}\n")),
        Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// Check an upgrade request, answer 101 and start its session; or refuse it before the upgrade.
fn upgrade<R: Role>(relay: Arc<Relay<R>>, mut req: Request<Incoming>) -> Reply {
    if req.method() != Method::GET {
        return reply(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade must be a GET\n",
        );
    }
    let channel = match channel_of(&relay, &req) {
        Ok(channel) => channel,
        Err(refusal) => return *refusal,
    };
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut response = reply(
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
        return reply(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    if !header_has_token(&req, header::CONNECTION, "upgrade") {
        return reply(StatusCode::BAD_REQUEST, "missing 'Connection: upgrade'\n");
    }
    let Some(slot) = relay.admit() else {
        relay.metrics.refused("over_capacity");
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "server full: {} connections (--max-connections)\n",
                relay.common.max_connections
            ),
        );
    };
    // Acks only where messages are published: a subscribe server without --accept-publish
    // does not select the subprotocol, so an ack publisher pointed at it fails at once
    // instead of waiting for acks that never come.
    let ack = relay.role.publishes()
        && header_has_token(&req, header::SEC_WEBSOCKET_PROTOCOL, ACK_PROTOCOL);
    let accept = derive_accept_key(key.as_bytes());

    let on_upgrade = hyper::upgrade::on(&mut req);
    let ws_config = ws_config::<R>(relay.common.max_message_bytes);
    let task_relay = relay.clone();
    relay.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let Some((socket, read_ahead)) = into_socket(upgraded) else {
            tracing::error!("an upgraded connection is not a TCP stream; dropped");
            return;
        };
        // Only when the client sent frames right behind its request: tungstenite's read
        // buffer built from such bytes forgets its configured size, and afterwards reads
        // each header and payload with a syscall of its own (a publisher at full rate lost a
        // quarter of its throughput that way).
        let ws = if read_ahead.is_empty() {
            WebSocketStream::from_raw_socket(
                Watched::new(socket.clone()),
                WsRole::Server,
                Some(ws_config),
            )
            .await
        } else {
            WebSocketStream::from_partially_read(
                Watched::after(socket.clone(), &read_ahead),
                read_ahead,
                WsRole::Server,
                Some(ws_config),
            )
            .await
        };
        let connection = Upgraded {
            ws,
            socket,
            channel,
            ack,
        };
        task_relay.serve(connection, slot).await;
    });

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if ack {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(ACK_PROTOCOL),
        );
    }
    response
}

/// Back from hyper's upgraded connection to the TCP stream itself, and what hyper read past
/// the request: the session and the hub share the stream as a [`Socket`] (the hub writes
/// directly to idle subscribers). Nothing of hyper's is kept: its read buffer would stay
/// allocated (8 KiB) for as long as a slice of it lived.
fn into_socket(upgraded: hyper::upgrade::Upgraded) -> Option<(Socket, Vec<u8>)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    let read_ahead = parts.read_buf.to_vec();
    Some((Socket::new(parts.io.into_inner()), read_ahead))
}

/// Buffer sizes, chosen on purpose: tungstenite's defaults (128 KiB to read, 128 KiB before a
/// write) would cost 100+ KiB per idle connection. An idle subscriber needs almost no read
/// buffer (it reads pongs and the odd frame), so it gets 256 bytes, which hold any control
/// frame a client sends (at most 131 bytes with its mask) in one read; a publisher reads real
/// traffic and gets 4 KiB (larger messages grow the buffer as they come). Writes collect up
/// to 16 KiB of queued frames before a write call, so a burst goes out in few syscalls while
/// an idle connection holds no write buffer at all.
fn ws_config<R: Role>(max: usize) -> WebSocketConfig {
    const WRITE_BUFFER: usize = 16 * 1024;
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = R::READ_BUFFER;
    config.write_buffer_size = WRITE_BUFFER;
    config.max_write_buffer_size = WRITE_BUFFER + max + 64;
    config.max_message_size = Some(max);
    config.max_frame_size = Some(max);
    config
}
