//! Connecting: TLS roots, the WebSocket handshake and reconnect back-off.
//!
//! Owns: the rustls configuration (system roots plus `--ca FILE`, and [`Verifier`]: a
//! certificate given with `--ca` is also accepted as the server's own when the server
//! presents exactly it, CA flag or not), the connect call with its timeout and
//! `Authorization: Bearer` header, what can go wrong there ([`TlsError`], [`ConnectError`],
//! each in one sentence a person understands) and which failures are permanent
//! ([`ConnectError::is_final`]: 3xx/4xx answers but 408 and 429, a certificate the client
//! refuses, TLS to a plain port, a refused subprotocol; the rest is retried), why a
//! connection ended ([`Lost`], final for 1009/1003/1002: [`Lost::is_final`]), [`Backoff`] (exponential with jitter, every wait under 30 s;
//! the `backon` crate computes it) and [`shown`] (a URL as printed, any `token=` in it
//! hidden); `lightrelay bench`'s wss:// subscribers reuse [`Tls`] and the certificate
//! sentences. Must not: read input or write output, or put a token in anything it returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{ProtocolError, SubProtocolError, UrlError};
use tokio_tungstenite::tungstenite::http::header::{InvalidHeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::args::Token;
use crate::ROLE_HEADER;

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
/// `--once`, exits 1) unless [`ConnectError::is_final`].
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
    /// The server answered the upgrade with an HTTP refusal; `body` is its one-line reason
    /// (for a redirect: where to).
    #[error("refused: HTTP {status} {body}")]
    Refused {
        status: tungstenite::http::StatusCode,
        body: String,
    },
    /// The client refused the server's certificate.
    #[error("{}", certificate_sentence(.0))]
    Certificate(CertificateError),
    /// `wss://` to a port that answers in plain text.
    #[error("the server did not answer in TLS: is this a plain ws:// port?")]
    NotTls,
    /// The client offered a subprotocol and the server selected none (handled by `pub`).
    #[error("the server did not select the offered subprotocol")]
    NoSubprotocol,
    #[error(
        "the server answered with a subprotocol the client did not offer: not a lightrelay server?"
    )]
    Subprotocol(SubProtocolError),
    #[error("{0}")]
    Failed(tungstenite::Error),
}

/// One sentence for a refused certificate, saying what to do about it.
pub(crate) fn certificate_sentence(error: &CertificateError) -> String {
    use CertificateError::*;
    match error {
        UnknownIssuer => "certificate refused: the server's certificate is not signed by an \
            authority this machine trusts (a self-signed relay: pass its certificate with --ca FILE)"
            .into(),
        NotValidForName | NotValidForNameContext { .. } => format!(
            "certificate refused: the server's certificate is not for this host name ({error}); \
             connect by a name it carries, or make one with subjectAltName for this host"
        ),
        Expired | ExpiredContext { .. } => format!(
            "certificate refused: the server's certificate has expired ({error})"
        ),
        NotValidYet | NotValidYetContext { .. } => format!(
            "certificate refused: the server's certificate is not valid yet ({error}): check the clocks"
        ),
        Other(other) if is_ca_used_as_end_entity(other) => "certificate refused: the server \
            presents a CA certificate as its own; pass that exact certificate with --ca FILE, or \
            make a server certificate (see the README's recipe)"
            .into(),
        _ => format!("certificate refused: {error}"),
    }
}

/// Whether webpki refused a certificate for having the CA flag while used as the server's own
/// (what `openssl req -x509` makes by default).
fn is_ca_used_as_end_entity(other: &rustls::OtherError) -> bool {
    matches!(
        other.0.downcast_ref::<webpki::Error>(),
        Some(webpki::Error::CaUsedAsEndEntity)
    )
}

impl From<tungstenite::Error> for ConnectError {
    fn from(error: tungstenite::Error) -> Self {
        match error {
            tungstenite::Error::Http(response) => {
                // The relay's reason is one line; another server's page is cut to its first.
                let mut body: String = response
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
                if response.status().is_redirection() {
                    if let Some(to) = response
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                    {
                        body = format!("(redirected to {to}: use that URL)");
                    }
                }
                ConnectError::Refused {
                    status: response.status(),
                    body,
                }
            }
            tungstenite::Error::Io(e) => match e.get_ref().and_then(|e| e.downcast_ref()) {
                Some(rustls::Error::InvalidCertificate(why)) => {
                    ConnectError::Certificate(why.clone())
                }
                Some(rustls::Error::InvalidMessage(_)) => ConnectError::NotTls,
                _ => ConnectError::Failed(tungstenite::Error::Io(e)),
            },
            tungstenite::Error::Protocol(ProtocolError::SecWebSocketSubProtocolError(
                SubProtocolError::NoSubProtocol,
            )) => ConnectError::NoSubprotocol,
            tungstenite::Error::Protocol(ProtocolError::SecWebSocketSubProtocolError(why)) => {
                ConnectError::Subprotocol(why)
            }
            other => ConnectError::Failed(other),
        }
    }
}

impl ConnectError {
    /// A failure that reconnecting cannot change: the client says so in one line and exits 1
    /// instead of retrying. Final: a redirect or a 4xx answer (400 bad path, 401/403 token,
    /// 404 …) but 408 and 429; a refused certificate; TLS to a plain port; a subprotocol the
    /// server should not have chosen; a request that cannot be made. Retried: refused or
    /// reset connections, timeouts, 5xx (a relay starting or over its limit), name lookups.
    pub fn is_final(&self) -> bool {
        use tungstenite::http::StatusCode;
        match self {
            ConnectError::Refused { status, .. } => {
                status.is_redirection()
                    || (status.is_client_error()
                        && *status != StatusCode::REQUEST_TIMEOUT
                        && *status != StatusCode::TOO_MANY_REQUESTS)
            }
            ConnectError::Request(_)
            | ConnectError::Protocol(_)
            | ConnectError::Token
            | ConnectError::Certificate(_)
            | ConnectError::NotTls
            | ConnectError::NoSubprotocol
            | ConnectError::Subprotocol(_) => true,
            ConnectError::Failed(tungstenite::Error::Url(e)) => {
                !matches!(e, UrlError::UnableToConnect(_))
            }
            ConnectError::Timeout | ConnectError::Failed(_) => false,
        }
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

impl Lost {
    /// A close that reconnecting cannot change: 1009 (a message over the server's limit:
    /// resent, it would be refused again), 1003 (data the server does not take) or 1002 (a
    /// protocol error). Other closes (1001 going away, 1011, 1012 restarting, 1013 try again
    /// later, 1008 slow consumer …) and broken connections are retried.
    pub fn is_final(&self) -> bool {
        use tungstenite::protocol::frame::coding::CloseCode;
        matches!(
            self,
            Lost::Closed(Some(frame))
                if matches!(frame.code, CloseCode::Size | CloseCode::Unsupported | CloseCode::Protocol)
        )
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
        let mut pinned = Vec::new();
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
                roots
                    .add(cert.clone())
                    .map_err(|source| TlsError::Rejected {
                        path: path.to_path_buf(),
                        source,
                    })?;
                pinned.push(cert);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?;
        let config = if roots.is_empty() {
            // No roots and no --ca: every wss:// certificate is refused (UnknownIssuer), and
            // ws:// still works.
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Setup(rustls::Error::General(e.to_string())))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier { webpki, pinned }))
                .with_no_client_auth()
        };
        Ok(Tls(Arc::new(config)))
    }

    /// The rustls configuration (also `lightrelay bench fanout --ca`'s, for wss:// subscribers).
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.0)
    }
}

/// rustls' WebPKI verification (system roots plus `--ca`) with one exception, the one `curl
/// --cacert` makes too: a certificate given with `--ca` that the server presents as its own
/// is accepted although it has the CA flag (`openssl req -x509` sets it by default, and
/// webpki refuses such a certificate as an end entity with `CaUsedAsEndEntity`).
///
/// Still checked then: the certificate is byte for byte one the user gave; its validity
/// period (webpki checks it before the CA flag, so a `CaUsedAsEndEntity` refusal means the
/// period was fine; the unit tests hold that); that it names the host connected to; and, in
/// the handshake, that the server holds its private key (the signatures are verified as
/// always). What is not checked is what a pinned certificate makes moot: the chain and the
/// key-usage extensions.
#[derive(Debug)]
pub(crate) struct Verifier {
    webpki: Arc<WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(other)))
                if is_ca_used_as_end_entity(&other)
                    && self
                        .pinned
                        .iter()
                        .any(|c| c.as_ref() == end_entity.as_ref()) =>
            {
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&cert, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.webpki.root_hint_subjects()
    }
}

/// Which lightrelay server answered (its handshake's `lightrelay-role` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Publish,
    Subscribe,
}

/// An open WebSocket and what its handshake said.
pub struct Opened {
    pub ws: Ws,
    /// Whether the server selected the offered subprotocol.
    pub selected: bool,
    /// Which lightrelay server this is; `None` for another server (or an older relay).
    pub role: Option<Role>,
}

/// Open a WebSocket to `url`, offering `protocol` if given and sending `token` as
/// `Authorization: Bearer`.
pub async fn open(
    url: &str,
    protocol: Option<&str>,
    token: Option<&Token>,
    tls: &Tls,
) -> Result<Opened, ConnectError> {
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
    let headers = response.headers();
    let selected = protocol.is_some_and(|p| {
        headers
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            == Some(p)
    });
    let role = match headers.get(ROLE_HEADER).and_then(|v| v.to_str().ok()) {
        Some("publish") => Some(Role::Publish),
        Some("subscribe") => Some(Role::Subscribe),
        _ => None,
    };
    Ok(Opened { ws, selected, role })
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

    /// A self-signed certificate for relay.local with the CA flag, as `openssl req -x509`
    /// makes, valid `from`..`until` (years).
    fn ca_certificate(from: i32, until: i32) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec!["relay.local".to_string()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn verifier(pinned: &[CertificateDer<'static>]) -> Verifier {
        let mut roots = rustls::RootCertStore::empty();
        for cert in pinned {
            roots.add(cert.clone()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Verifier {
            webpki: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap(),
            pinned: pinned.to_vec(),
        }
    }

    fn verify(verifier: &Verifier, cert: &CertificateDer<'_>, name: &str) -> Result<(), String> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_pinned_ca_certificate_is_the_servers_own_only_for_its_name_and_dates() {
        let cert = ca_certificate(2020, 2090);
        let other = ca_certificate(2020, 2090);
        // Given with --ca and presented as is: accepted, for its own name only.
        assert_eq!(
            verify(&verifier(std::slice::from_ref(&cert)), &cert, "relay.local"),
            Ok(())
        );
        let wrong_name = verify(&verifier(std::slice::from_ref(&cert)), &cert, "other.local");
        assert!(wrong_name.unwrap_err().contains("not valid for name"));
        // Another CA certificate presented as the server's own: still refused.
        let refused = verify(
            &verifier(std::slice::from_ref(&cert)),
            &other,
            "relay.local",
        );
        assert!(refused.is_err());
        // Expired (webpki checks the dates before the CA flag: this holds that order).
        let expired = ca_certificate(2000, 2001);
        let refused = verify(
            &verifier(std::slice::from_ref(&expired)),
            &expired,
            "relay.local",
        );
        assert!(
            refused.unwrap_err().contains("expired"),
            "expired is refused"
        );
    }

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
