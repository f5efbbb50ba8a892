//! Connecting: TLS roots, the WebSocket handshake and reconnect back-off.
//!
//! Owns: the rustls configuration (system roots plus `--ca FILE`), the connect call with its
//! timeout, and [`Backoff`] (exponential, capped at 30 s, with jitter).
//! Must not: read input or write output.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS set-up for wss:// (unused for ws://).
#[derive(Clone)]
pub struct Tls(Arc<rustls::ClientConfig>);

impl Tls {
    pub fn new(ca: Option<&Path>) -> Result<Tls, String> {
        let mut roots = rustls::RootCertStore::empty();
        // The system's roots; a machine without any still works with --ca.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("--ca {}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("--ca {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("--ca {}: no certificate found", path.display()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("--ca {}: {e}", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls(Arc::new(config)))
    }
}

/// Open a WebSocket to `url`, offering `protocol` if given; returns the socket and whether
/// the server selected the protocol.
pub async fn open(url: &str, protocol: Option<&str>, tls: &Tls) -> Result<(Ws, bool), String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    if let Some(protocol) = protocol {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(protocol).map_err(|e| e.to_string())?,
        );
    }
    let connector = Connector::Rustls(tls.0.clone());
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector));
    let (ws, response) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(describe)?;
    let selected = protocol.is_some_and(|p| {
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            == Some(p)
    });
    Ok((ws, selected))
}

/// A one-line description of a connect error (with the HTTP refusal body when there is one).
fn describe(error: tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match error {
        Error::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            format!("refused: HTTP {} {}", response.status(), body.trim())
        }
        other => other.to_string(),
    }
}

/// Exponential back-off: 100 ms doubling to a 30 s cap, each wait jittered by up to ±20%.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    pub const CAP: Duration = Duration::from_secs(30);

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = 0.8 + 0.4 * f64::from(nanos % 1000) / 1000.0;
        wait.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_stops_at_thirty_seconds() {
        let mut backoff = Backoff::default();
        let waits: Vec<Duration> = (0..12).map(|_| backoff.next_wait()).collect();
        assert!(waits[0] <= Duration::from_millis(120));
        assert!(waits[1] >= Duration::from_millis(160));
        assert!(waits.iter().all(|w| *w <= Backoff::CAP.mul_f64(1.2)));
        assert!(waits[11] >= Backoff::CAP.mul_f64(0.8));
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(120));
    }
}
