//! A real nginx serving the shipped sites (`nginx/`) on free 127.0.0.1 ports in front of our
//! servers, for the tests that need the proxy in the path (`deploy_nginx`, `limits`). Its
//! nginx.conf includes the shipped files after substituting only ports, upstream addresses,
//! paths and certificate files (and, when asked, the proxy timeouts). An upstream may list
//! several processes ([`Nginx::start_fleet`], SPEC §11), as a second `@PORT` unit would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::Connector;

use super::{free_port, Ws, PATIENCE};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The nginx binary: Debian puts it in /usr/sbin, which a non-root PATH may lack.
pub fn nginx_bin() -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
        .expect("nginx is not installed: bin/test installs it (apt-get install nginx)")
}

pub fn shipped(name: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join("nginx").join(name)).unwrap()
}

/// Replace every occurrence of each needle. A needle the shipped file no longer holds fails the
/// test: the substitution would otherwise silently leave nginx on the real ports and paths.
pub fn substitute(name: &str, swaps: &[(&str, String)]) -> String {
    let mut text = shipped(name);
    for (needle, replacement) in swaps {
        assert!(
            text.contains(needle),
            "nginx/{name} no longer contains `{needle}`: update the substitutions of this test"
        );
        text = text.replace(needle, replacement);
    }
    text
}

#[derive(Clone, Copy, PartialEq)]
pub enum Site {
    TwoPort,
    Tls,
}

/// A real nginx serving the shipped sites; stopped (SIGTERM to its master, by PID) when dropped.
pub struct Nginx {
    pub dir: PathBuf,
    pub child: Option<Child>,
    /// The two-port site: publish (8766) and subscribe (8768).
    pub publish: u16,
    pub subscribe: u16,
    /// The TLS site: 443 and 80.
    pub https: u16,
    pub http: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Nginx {
    /// Write the configuration (and a throwaway certificate for the TLS site) without starting.
    /// `upstreams` are the relay's publish and subscribe addresses; `timeout` replaces the
    /// shipped proxy_read_timeout and proxy_send_timeout.
    pub fn configure(
        upstreams: (SocketAddr, SocketAddr),
        sites: &[Site],
        timeout: Option<&str>,
    ) -> Nginx {
        Nginx::configure_fleet(&[upstreams.0], &[upstreams.1], sites, timeout)
    }

    /// As [`Nginx::configure`], with several processes in each upstream (SPEC §11): every
    /// address becomes one `server` line, as a second `@PORT` unit would.
    pub fn configure_fleet(
        publish: &[SocketAddr],
        subscribe: &[SocketAddr],
        sites: &[Site],
        timeout: Option<&str>,
    ) -> Nginx {
        let dir = std::env::temp_dir().join(format!(
            "lightrelay-test-nginx-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        std::fs::create_dir_all(dir.join("www/.well-known/acme-challenge")).unwrap();
        let mut nginx = Nginx {
            publish: free_port(),
            subscribe: free_port(),
            https: free_port(),
            http: free_port(),
            dir,
            child: None,
            tls: None,
        };
        let d = nginx.dir.display().to_string();

        let upstream_conf = substitute(
            "lightrelay-upstreams.conf",
            &[
                ("server 127.0.0.1:8765;", server_lines(publish)),
                ("server 127.0.0.1:8767;", server_lines(subscribe)),
            ],
        );
        std::fs::write(nginx.dir.join("lightrelay-upstreams.conf"), upstream_conf).unwrap();

        let timeouts = |swaps: &mut Vec<(&str, String)>| {
            if let Some(t) = timeout {
                swaps.push((
                    "proxy_read_timeout 120s;",
                    format!("proxy_read_timeout {t};"),
                ));
                swaps.push((
                    "proxy_send_timeout 120s;",
                    format!("proxy_send_timeout {t};"),
                ));
            }
        };
        let mut includes = String::new();
        if sites.contains(&Site::TwoPort) {
            let mut swaps = vec![
                (
                    "listen 8766;",
                    format!("listen 127.0.0.1:{};", nginx.publish),
                ),
                (
                    "listen 8768;",
                    format!("listen 127.0.0.1:{};", nginx.subscribe),
                ),
                // Loopback only: the IPv6 wildcard listeners are dropped.
                ("listen [::]:8766;", String::new()),
                ("listen [::]:8768;", String::new()),
                (
                    "access_log /var/log/nginx/access.log ",
                    format!("access_log {d}/access.log "),
                ),
            ];
            timeouts(&mut swaps);
            let site = substitute("lightrelay.conf", &swaps);
            std::fs::write(nginx.dir.join("lightrelay.conf"), site).unwrap();
            includes.push_str(&format!("    include {d}/lightrelay.conf;\n"));
        }
        if sites.contains(&Site::Tls) {
            nginx.make_certificate();
            let mut swaps = vec![
                ("listen 80;", format!("listen 127.0.0.1:{};", nginx.http)),
                (
                    "listen 443 ssl;",
                    format!("listen 127.0.0.1:{} ssl;", nginx.https),
                ),
                ("listen [::]:80;", String::new()),
                ("listen [::]:443 ssl;", String::new()),
                (
                    "/etc/letsencrypt/live/lightrelay.example.com/fullchain.pem",
                    format!("{d}/cert.pem"),
                ),
                (
                    "/etc/letsencrypt/live/lightrelay.example.com/privkey.pem",
                    format!("{d}/key.pem"),
                ),
                ("root /var/www/html;", format!("root {d}/www;")),
                (
                    "access_log /var/log/nginx/access.log ",
                    format!("access_log {d}/access.log "),
                ),
            ];
            timeouts(&mut swaps);
            let site = substitute("lightrelay-tls.conf", &swaps);
            std::fs::write(nginx.dir.join("lightrelay-tls.conf"), site).unwrap();
            includes.push_str(&format!("    include {d}/lightrelay-tls.conf;\n"));
        }

        // The http block Debian's nginx.conf would give: conf.d, then the enabled sites.
        // set_real_ip_from lets a test play a client from elsewhere with X-Forwarded-For (only
        // ever a header: no traffic leaves 127.0.0.1), to see the /metrics refusal.
        let main = format!(
            "worker_processes 1;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             \x20   access_log {d}/access.log;\n\
             \x20   client_body_temp_path {d}/tmp/body;\n\
             \x20   proxy_temp_path {d}/tmp/proxy;\n\
             \x20   fastcgi_temp_path {d}/tmp/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20   scgi_temp_path {d}/tmp/scgi;\n\
             \x20   set_real_ip_from 127.0.0.1;\n\
             \x20   real_ip_header X-Forwarded-For;\n\
             \x20   include {d}/lightrelay-upstreams.conf;\n\
             {includes}\
             }}\n"
        );
        std::fs::write(nginx.dir.join("nginx.conf"), main).unwrap();
        nginx
    }

    pub async fn start(
        upstreams: (SocketAddr, SocketAddr),
        sites: &[Site],
        timeout: Option<&str>,
    ) -> Nginx {
        Nginx::start_fleet(&[upstreams.0], &[upstreams.1], sites, timeout).await
    }

    /// As [`Nginx::start`], with several processes in each upstream.
    pub async fn start_fleet(
        publish: &[SocketAddr],
        subscribe: &[SocketAddr],
        sites: &[Site],
        timeout: Option<&str>,
    ) -> Nginx {
        let mut nginx = Nginx::configure_fleet(publish, subscribe, sites, timeout);
        let log = std::fs::File::create(nginx.dir.join("stderr.log")).unwrap();
        let child = nginx
            .command(&[])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        nginx.child = Some(child);
        let mut ports = Vec::new();
        if sites.contains(&Site::TwoPort) {
            ports.extend([nginx.publish, nginx.subscribe]);
        }
        if sites.contains(&Site::Tls) {
            ports.extend([nginx.https, nginx.http]);
        }
        let deadline = Instant::now() + PATIENCE;
        for port in ports {
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                if let Some(status) = nginx.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!("nginx exited ({status}):\n{}", nginx.stderr());
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx never listened on {port}:\n{}",
                    nginx.stderr()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        nginx
    }

    /// nginx with this directory as prefix and our pid file and error log.
    pub fn command(&self, extra: &[&str]) -> Command {
        let d = self.dir.display().to_string();
        let mut command = Command::new(nginx_bin());
        command
            .args(["-e", "stderr", "-p", &d, "-c", &format!("{d}/nginx.conf")])
            .args([
                "-g",
                &format!("daemon off; pid {d}/nginx.pid; error_log stderr;"),
            ])
            .args(extra);
        command
    }

    /// `nginx -t`: (success, what it printed).
    pub fn test_config(&self) -> (bool, String) {
        let output = self.command(&["-t"]).output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// `nginx -T`: the whole configuration as nginx parsed it.
    pub fn dump(&self) -> String {
        let output = self.command(&["-T"]).output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// A throwaway self-signed certificate for 127.0.0.1, and a client that trusts only it.
    pub fn make_certificate(&mut self) {
        let d = &self.dir;
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(d.join("key.pem"))
            .arg("-out")
            .arg(d.join("cert.pem"))
            .stderr(Stdio::null())
            .status()
            .expect("openssl must be installed (bin/test installs it)");
        assert!(status.success(), "openssl req failed");
        let status = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(d.join("cert.pem"))
            .arg("-out")
            .arg(d.join("cert.der"))
            .status()
            .unwrap();
        assert!(status.success(), "openssl x509 failed");
        let der = std::fs::read(d.join("cert.der")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(der))
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        self.tls = Some(Arc::new(config));
    }

    pub fn ws_publish(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.publish)
    }

    pub fn ws_subscribe(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.subscribe)
    }

    pub fn wss(&self, path: &str) -> String {
        format!("wss://127.0.0.1:{}{path}", self.https)
    }

    pub async fn connect_tls(&self, url: &str) -> Ws {
        let connector = Connector::Rustls(self.tls.clone().unwrap());
        let (ws, _) = tokio::time::timeout(
            PATIENCE,
            tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector)),
        )
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("wss connect to {url}: {e}\n{}", self.stderr()));
        ws
    }

    /// A TLS connection to the TLS site.
    pub async fn tls_stream(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone().unwrap());
        let tcp = TcpStream::connect(("127.0.0.1", self.https)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        connector.connect(name, tcp).await.unwrap()
    }

    /// A request to the TLS site; returns the response's head and body.
    pub async fn https_request(&self, request: &str) -> (String, Vec<u8>) {
        exchange(self.tls_stream().await, request).await
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM to the master we started (it stops its worker); SIGKILL if it lingers.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `server ADDR;` line per process of an upstream.
fn server_lines(addrs: &[SocketAddr]) -> String {
    assert!(!addrs.is_empty(), "an upstream needs at least one server");
    addrs
        .iter()
        .map(|addr| format!("server {addr};"))
        .collect::<Vec<_>>()
        .join("\n    ")
}

/// Send a raw request, read to the end; returns (head, body).
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> (String, Vec<u8>) {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("no complete response in time");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no response head in {:?}",
                String::from_utf8_lossy(&response)
            )
        });
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    (head, response[split + 4..].to_vec())
}
