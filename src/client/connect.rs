//! Connecting: TLS roots, the WebSocket handshake and reconnect back-off.
//!
//! Owns: the rustls configuration (system roots plus `--ca FILE`), the connect call with its
//! timeout, what can go wrong there ([`TlsError`], [`ConnectError`]), why a connection ended
//! ([`Lost`]) and [`Backoff`] (exponential with jitter, every wait under 30 s; the `backon`
//! crate computes it).
//! Must not: read input or write output.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::InvalidHeaderValue;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

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
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                ConnectError::Refused {
                    status: response.status(),
                    body,
                }
            }
            other => ConnectError::Failed(other),
        }
    }
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

/// Open a WebSocket to `url`, offering `protocol` if given; returns the socket and whether
/// the server selected the protocol.
pub async fn open(
    url: &str,
    protocol: Option<&str>,
    tls: &Tls,
) -> Result<(Ws, bool), ConnectError> {
    let mut request = url.into_client_request().map_err(ConnectError::Request)?;
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
