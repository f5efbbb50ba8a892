//! Connecting: TLS roots, the WebSocket handshake and reconnect back-off.
//!
//! Owns: the rustls configuration (system roots plus `--ca FILE`), the connect call with its
//! timeout and `Authorization: Bearer` header, what can go wrong there ([`TlsError`],
//! [`ConnectError`], and which refusals are final: 401 and 403), why a connection ended
//! ([`Lost`]), [`Backoff`] (exponential with jitter, every wait under 30 s; the `backon`
//! crate computes it) and [`shown`] (a URL as printed, any `token=` in it hidden).
//! Must not: read input or write output, or put a token in anything it returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{InvalidHeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::args::Token;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS set-up failed (a bad `--ca`); the client exits 2 with this line.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--ca {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("--ca {}: no certificate found", path.display())]
    NoCertificate { path: PathBuf },
    #[error("--ca {}: {source}", path.display())]
    Rejected {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS set-up: {0}")]
    Setup(rustls::Error),
}

/// Why a connection attempt failed; printed after the URL, then the client retries (or, with
/// `--once`, exits 1).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Request(tungstenite::Error),
    #[error("the subprotocol is not a valid header value: {0}")]
    Protocol(InvalidHeaderValue),
    /// (Never carries the token: `--token` only lets printable ASCII through anyway.)
    #[error("the token is not a valid header value")]
    Token,
    #[error("no answer within {CONNECT_TIMEOUT:?}")]
    Timeout,
    /// The server answered the upgrade with an HTTP refusal; `body` is its one-line reason.
    #[error("refused: HTTP {status} {body}")]
    Refused {
        status: tungstenite::http::StatusCode,
        body: String,
    },
    #[error("{0}")]
    Failed(tungstenite::Error),
}

impl From<tungstenite::Error> for ConnectError {
    fn from(error: tungstenite::Error) -> Self {
        match error {
            tungstenite::Error::Http(response) => {
                // The relay's reason is one line; another server's page is cut to its first.
                let body: String = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .trim()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect();
                ConnectError::Refused {
                    status: response.status(),
                    body,
                }
            }
            other => ConnectError::Failed(other),
        }
    }
}

impl ConnectError {
    /// A refusal that reconnecting cannot change: the token is missing, bad or expired (401),
    /// or does not cover the path (403). The client says so and exits 1 instead of retrying.
    pub fn is_final(&self) -> bool {
        use tungstenite::http::StatusCode;
        matches!(
            self,
            ConnectError::Refused { status, .. }
                if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN
        )
    }
}

/// A URL as the client prints it: the value of any `token=` query parameter is hidden.
pub fn shown(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let query: Vec<&str> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("token", _)) => "token=…",
            _ => pair,
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// Why a connection is gone (the client reconnects after it, unless told otherwise).
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("closed by the server{}", close_text(.0))]
    Closed(Option<CloseFrame>),
    #[error("{0}")]
    Broken(#[from] tungstenite::Error),
    #[error("connection ended")]
    Ended,
}

impl Lost {
    /// Whether the server closed normally (1000) or is going away (1001).
    pub fn is_normal_close(&self) -> bool {
        use tungstenite::protocol::frame::coding::CloseCode;
        match self {
            Lost::Closed(frame) => frame
                .as_ref()
                .is_none_or(|f| matches!(f.code, CloseCode::Normal | CloseCode::Away)),
            _ => false,
        }
    }
}

fn close_text(frame: &Option<CloseFrame>) -> String {
    frame.as_ref().map_or(String::new(), |f| {
        format!(": {} {}", u16::from(f.code), f.reason)
    })
}

/// The TLS set-up for wss:// (unused for ws://).
#[derive(Clone)]
pub struct Tls(Arc<rustls::ClientConfig>);

impl Tls {
    pub fn new(ca: Option<&Path>) -> Result<Tls, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        // The system's roots; a machine without any still works with --ca.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca {
            let unreadable = |source| TlsError::Unreadable {
                path: path.to_path_buf(),
                source,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(unreadable)?
                .collect::<Result<_, _>>()
                .map_err(unreadable)?;
            if certs.is_empty() {
                return Err(TlsError::NoCertificate {
                    path: path.to_path_buf(),
                });
            }
            for cert in certs {
                roots.add(cert).map_err(|source| TlsError::Rejected {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls(Arc::new(config)))
    }
}

/// Open a WebSocket to `url`, offering `protocol` if given and sending `token` as
/// `Authorization: Bearer`; returns the socket and whether the server selected the protocol.
pub async fn open(
    url: &str,
    protocol: Option<&str>,
    token: Option<&Token>,
    tls: &Tls,
) -> Result<(Ws, bool), ConnectError> {
    let mut request = url.into_client_request().map_err(ConnectError::Request)?;
    if let Some(token) = token {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.secret()))
            .map_err(|_| ConnectError::Token)?;
        value.set_sensitive(true);
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    if let Some(protocol) = protocol {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(protocol).map_err(ConnectError::Protocol)?,
        );
    }
    let connector = Connector::Rustls(tls.0.clone());
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector));
    let (ws, response) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| ConnectError::Timeout)??;
    let selected = protocol.is_some_and(|p| {
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            == Some(p)
    });
    Ok((ws, selected))
}

/// Reconnect back-off (SPEC §6): exponential from 50 ms, doubling, each wait with a random
/// jitter. `backon` adds up to 100% of the delay as jitter, so the delay stops doubling at
/// 15 s: every wait is under [`Backoff::CAP`], 30 s. [`Backoff::reset`] after a connection.
pub struct Backoff {
    delays: backon::ExponentialBackoff,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            delays: backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_factor(2.0)
                .with_max_delay(Self::CAP / 2)
                .with_jitter()
                .without_max_times()
                .build(),
        }
    }
}

impl Backoff {
    /// No wait is longer than this.
    pub const CAP: Duration = Duration::from_secs(30);

    /// Start again from the shortest wait (after a successful connection).
    pub fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        // Without a limit on attempts the iterator never ends; the cap covers the impossible.
        self.delays.next().unwrap_or(Self::CAP).min(Self::CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_url_hides_its_token() {
        assert_eq!(shown("ws://h/office"), "ws://h/office");
        assert_eq!(shown("ws://h/x?token=abc.def"), "ws://h/x?token=…");
        assert_eq!(
            shown("wss://h/x?a=1&token=abc&b=token"),
            "wss://h/x?a=1&token=…&b=token"
        );
    }

    #[test]
    fn backoff_doubles_stays_under_thirty_seconds_and_resets() {
        let mut backoff = Backoff::default();
        let waits: Vec<Duration> = (0..20).map(|_| backoff.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        // Each wait is its delay plus up to as much jitter: 50 ms · 2ⁿ up to 15 s.
        for (n, wait) in waits.iter().enumerate() {
            let delay = Duration::from_millis(50)
                .saturating_mul(1 << n.min(20))
                .min(Backoff::CAP / 2);
            assert!(*wait >= delay && *wait <= delay * 2, "wait {n}: {wait:?}");
        }
        assert!(waits.iter().all(|w| *w <= Backoff::CAP));
        assert!(waits[19] >= Backoff::CAP / 2);
        // Jittered: the waits at the cap are not all the same.
        assert!(waits[12..].windows(2).any(|w| w[0] != w[1]), "{waits:?}");
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(100));
    }
}
