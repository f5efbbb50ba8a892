//! Helpers for the token tests (SPEC §8): key files (secrets written here, key pairs made by
//! `openssl`), tokens minted here with `jsonwebtoken` (independently of `lightrelay token`),
//! requests that carry a token, the refusal counters, and servers or commands whose stderr a
//! test reads.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value as Json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{
    free_port, raw_exchange, series_value, server_command, temp_dir, wait_for_port, Kind, Server,
    StderrLines, Ws, PATIENCE,
};

/// Seconds since the epoch, as a token's `exp` and `nbf` count.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims granting `publish` and `sub` patterns, valid for an hour.
pub fn grants(publish: &[&str], sub: &[&str]) -> Json {
    json!({
        "lightrelay": {"pub": publish, "sub": sub},
        "exp": unix_now() + 3600,
    })
}

/// `claims` with `field` set to `value`.
pub fn with(mut claims: Json, field: &str, value: Json) -> Json {
    claims[field] = value;
    claims
}

/// An HS256 token signed with `secret`, with `kid` in its header when given.
pub fn hs256(secret: &[u8], kid: Option<&str>, claims: &Json) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(secret),
        kid,
        claims,
    )
}

/// A token signed with `key` by `algorithm`.
pub fn sign(algorithm: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Json) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// The HS256 secret the servers of the callers' tests (client, live page, Pi example, the
/// units) are given.
pub const SECRET: &str = "test-secret-of-the-callers-tests-0123456789";

/// A secret file (`--jwt-secret-file`) holding [`SECRET`], in `dir`.
pub fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("jwt-secret");
    std::fs::write(&path, format!("# the tests' key\n{SECRET}\n")).unwrap();
    path
}

/// A server of `kind` started with `--auth MODE` and a secret file holding [`SECRET`], in a
/// fresh directory named after `tag` (returned: the test removes it at its end), the way
/// every caller's test needs one.
pub async fn server_with_auth(
    kind: Kind,
    redis_url: &str,
    mode: &str,
    tag: &str,
) -> (Server, PathBuf) {
    let dir = temp_dir(tag);
    let secret = secret_file(&dir);
    let flags = [
        "--auth",
        mode,
        "--jwt-secret-file",
        secret.to_str().unwrap(),
    ];
    (Server::start(kind, redis_url, &flags).await, dir)
}

/// An HS256 token signed with `secret`, granting `pub` and `sub` patterns, valid for an hour.
pub fn token_with(secret: &str, publish: &[&str], sub: &[&str]) -> String {
    hs256(secret.as_bytes(), None, &grants(publish, sub))
}

/// A token signed with [`SECRET`].
pub fn token(publish: &[&str], sub: &[&str]) -> String {
    token_with(SECRET, publish, sub)
}

/// An `alg: none` token, built by hand (no library mints one): header, claims, and an empty
/// signature.
pub fn unsigned(claims: &Json) -> String {
    let b64 = |v: &Json| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

/// The kinds of key pair `openssl` makes for the public-key tests.
#[derive(Debug, Clone, Copy)]
pub enum KeyKind {
    /// P-256, ES256.
    Ec,
    /// Ed25519, EdDSA.
    Ed25519,
    /// RSA 2048, RS256.
    Rsa,
}

impl KeyKind {
    pub fn algorithm(self) -> Algorithm {
        match self {
            KeyKind::Ec => Algorithm::ES256,
            KeyKind::Ed25519 => Algorithm::EdDSA,
            KeyKind::Rsa => Algorithm::RS256,
        }
    }
}

/// A key pair made by `openssl`: the PKCS#8 private key and the public key, both PEM.
pub struct KeyPair {
    pub kind: KeyKind,
    pub private: PathBuf,
    /// `NAME.pem`: the server's `kid` for it is NAME.
    pub public: PathBuf,
}

impl KeyPair {
    /// A token signed with the private key.
    pub fn sign(&self, kid: Option<&str>, claims: &Json) -> String {
        let pem = std::fs::read(&self.private).unwrap();
        let key = match self.kind {
            KeyKind::Ec => EncodingKey::from_ec_pem(&pem),
            KeyKind::Ed25519 => EncodingKey::from_ed_pem(&pem),
            KeyKind::Rsa => EncodingKey::from_rsa_pem(&pem),
        }
        .unwrap();
        sign(self.kind.algorithm(), &key, kid, claims)
    }

    /// The public key file as a flag value.
    pub fn public_arg(&self) -> String {
        self.public.display().to_string()
    }
}

/// A temporary directory for key files, removed when dropped.
pub struct KeyDir {
    pub dir: PathBuf,
}

impl KeyDir {
    pub fn new(tag: &str) -> KeyDir {
        KeyDir { dir: temp_dir(tag) }
    }

    /// Write `text` to the file `name` (a secret file); returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A fresh key pair: `NAME.key` (private) and `NAME.pem` (public).
    pub fn key_pair(&self, name: &str, kind: KeyKind) -> KeyPair {
        let private = self.dir.join(format!("{name}.key"));
        let public = self.dir.join(format!("{name}.pem"));
        let generate: &[&str] = match kind {
            KeyKind::Ec => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            KeyKind::Ed25519 => &["-algorithm", "ED25519"],
            KeyKind::Rsa => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        };
        openssl(
            Command::new("openssl")
                .arg("genpkey")
                .args(generate)
                .arg("-out")
                .arg(&private),
        );
        openssl(
            Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(&public),
        );
        KeyPair {
            kind,
            private,
            public,
        }
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(command: &mut Command) {
    let out = command.output().expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A path as a flag value.
pub fn arg(path: &Path) -> String {
    path.display().to_string()
}

/// `lightrelay_auth_refused_total{reason}` (0 while never counted).
pub async fn auth_refused(server: &Server, reason: &str) -> f64 {
    let series = format!("lightrelay_auth_refused_total{{reason=\"{reason}\"}}");
    series_value(&server.metrics_text().await, &series).unwrap_or(0.0)
}

/// A WebSocket connection to `url` sending `Authorization: Bearer token`; fails the test
/// (saying what the server answered) if the upgrade is refused.
pub async fn connect_bearer(url: &str, token: &str) -> Ws {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
        .await
        .expect("no upgrade answer in time")
    {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => panic!(
            "upgrade of {url} with a token refused: {} {}",
            response.status(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
        ),
        Err(e) => panic!("upgrade of {url} with a token failed: {e}"),
    }
}

/// The server's answer to a WebSocket upgrade of `target` with `headers`, by hand: the whole
/// response of a refusal (read until the server ends the connection), or the head of a 101.
pub async fn upgrade_answer(
    addr: std::net::SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // Bounded in count: an answer is a few hundred bytes.
    for _ in 0..10_000 {
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0,
            Err(_) => panic!(
                "no whole answer to the upgrade in time: {:?}",
                String::from_utf8_lossy(&received)
            ),
        };
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&received);
        if text.starts_with("HTTP/1.1 101") && text.contains("\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// The server's whole answer to `POST target` with `headers` and `body`.
pub async fn post_answer(
    addr: std::net::SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> String {
    let mut request = format!(
        "POST {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (name, value) in headers {
        request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);
    raw_exchange(addr, &request).await
}

/// The value of header `name` (case-insensitive) in a raw HTTP response.
pub fn header_value(response: &str, name: &str) -> Option<String> {
    let head = response.split_once("\r\n\r\n").map_or(response, |(h, _)| h);
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// A server started like [`Server::start_with_env`] (RUST_LOG `warn` unless `env` says
/// otherwise), whose stderr the test reads.
pub async fn start_logged(
    kind: Kind,
    redis_url: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Server, StderrLines) {
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = server_command(kind)
        .args(["--listen", &addr.to_string(), "--redis-url", redis_url])
        .args(extra)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = StderrLines::read(&mut child);
    wait_for_port(port).await;
    let server = Server { addr, child };
    server.wait_healthy().await;
    (server, lines)
}
