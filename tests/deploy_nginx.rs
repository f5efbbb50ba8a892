//! Issue 5, `nginx/`: the shipped sites, run by a real nginx on free 127.0.0.1 ports in front of
//! both servers. The test's own nginx.conf includes the shipped files after substituting only
//! ports, upstream addresses, paths and certificate files (and, for the keep-alive tests, the
//! proxy timeouts); every other line is the shipped text.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The nginx binary: Debian puts it in /usr/sbin, which a non-root PATH may lack.
fn nginx_bin() -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
        .expect("nginx is not installed: bin/test installs it (apt-get install nginx)")
}

fn shipped(name: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join("nginx").join(name)).unwrap()
}

/// Replace every occurrence of each needle. A needle the shipped file no longer holds fails the
/// test: the substitution would otherwise silently leave nginx on the real ports and paths.
fn substitute(name: &str, swaps: &[(&str, String)]) -> String {
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
enum Site {
    TwoPort,
    Tls,
}

/// A real nginx serving the shipped sites; stopped (SIGTERM to its master, by PID) when dropped.
struct Nginx {
    dir: PathBuf,
    child: Option<Child>,
    /// The two-port site: publish (8766) and subscribe (8768).
    publish: u16,
    subscribe: u16,
    /// The TLS site: 443 and 80.
    https: u16,
    http: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Nginx {
    /// Write the configuration (and a throwaway certificate for the TLS site) without starting.
    /// `upstreams` are the relay's publish and subscribe addresses; `timeout` replaces the
    /// shipped proxy_read_timeout and proxy_send_timeout.
    fn configure(
        upstreams: (SocketAddr, SocketAddr),
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
                ("server 127.0.0.1:8765;", format!("server {};", upstreams.0)),
                ("server 127.0.0.1:8767;", format!("server {};", upstreams.1)),
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

    async fn start(
        upstreams: (SocketAddr, SocketAddr),
        sites: &[Site],
        timeout: Option<&str>,
    ) -> Nginx {
        let mut nginx = Nginx::configure(upstreams, sites, timeout);
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
    fn command(&self, extra: &[&str]) -> Command {
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
    fn test_config(&self) -> (bool, String) {
        let output = self.command(&["-t"]).output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// `nginx -T`: the whole configuration as nginx parsed it.
    fn dump(&self) -> String {
        let output = self.command(&["-T"]).output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// A throwaway self-signed certificate for 127.0.0.1, and a client that trusts only it.
    fn make_certificate(&mut self) {
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

    fn ws_publish(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.publish)
    }

    fn ws_subscribe(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.subscribe)
    }

    fn wss(&self, path: &str) -> String {
        format!("wss://127.0.0.1:{}{path}", self.https)
    }

    async fn connect_tls(&self, url: &str) -> Ws {
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
    async fn tls_stream(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone().unwrap());
        let tcp = TcpStream::connect(("127.0.0.1", self.https)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        connector.connect(name, tcp).await.unwrap()
    }

    /// A request to the TLS site; returns the response's head and body.
    async fn https_request(&self, request: &str) -> (String, Vec<u8>) {
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

/// Send a raw request, read to the end; returns (head, body).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
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

/// An HTTP/1.0 GET (no chunking either side), with extra header lines.
fn get(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}\r\n")
}

fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn plain_request(port: u16, request: &str) -> (String, Vec<u8>) {
    exchange(
        TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
        request,
    )
    .await
}

/// Redis, both servers (with `flags`) and nginx with `sites` in front of them.
struct Stack {
    redis: Redis,
    _publish: Server,
    subscribe: Server,
    nginx: Nginx,
}

async fn stack(sites: &[Site], flags: &[&str], timeout: Option<&str>) -> Stack {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), flags).await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), flags).await;
    let nginx = Nginx::start((publish.addr, subscribe.addr), sites, timeout).await;
    Stack {
        redis,
        _publish: publish,
        subscribe,
        nginx,
    }
}

/// Every byte value, and not UTF-8: arrives as a binary frame.
fn all_bytes() -> Vec<u8> {
    (0..=255u8).rev().collect()
}

#[test]
fn nginx_t_accepts_each_shipped_site_and_both_together() {
    let upstreams = (
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    for sites in [
        &[Site::TwoPort][..],
        &[Site::Tls],
        &[Site::TwoPort, Site::Tls],
    ] {
        let nginx = Nginx::configure(upstreams, sites, None);
        let (ok, output) = nginx.test_config();
        assert!(ok, "nginx -t failed:\n{output}");
        assert!(output.contains("test is successful"), "{output}");
    }
}

#[tokio::test]
async fn a_message_published_through_the_two_port_site_reaches_its_subscribers_byte_exact() {
    let s = stack(&[Site::TwoPort], &[], None).await;
    let mut watcher = s.redis.subscribe("lightlevel/office").await;
    let mut sub = connect(&s.nginx.ws_subscribe("/office")).await;
    s.redis.wait_numsub("lightlevel/office", 2).await;
    let mut publisher = connect(&s.nginx.ws_publish("/office")).await;

    publisher
        .send(Message::text("417 lux, 21.5 °C"))
        .await
        .unwrap();
    publisher.send(Message::binary(all_bytes())).await.unwrap();
    assert_eq!(next_text(&mut sub).await, "417 lux, 21.5 °C");
    assert_eq!(next_frame(&mut sub).await, Message::binary(all_bytes()));
    assert_eq!(&watcher.next().await[..], "417 lux, 21.5 °C".as_bytes());
    assert_eq!(&watcher.next().await[..], &all_bytes()[..]);

    // HTTP POST through nginx publishes too, and answers the receiver count.
    let body = "post body";
    let request = format!(
        "POST /office HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (head, count) = plain_request(s.nginx.publish, &request).await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(String::from_utf8_lossy(&count).trim(), "2");
    assert_eq!(next_text(&mut sub).await, body);
}

#[tokio::test]
async fn a_message_published_on_wss_publish_reaches_wss_subscribe_byte_exact() {
    let s = stack(&[Site::Tls], &[], None).await;
    let mut watcher = s.redis.subscribe("lightlevel/office").await;
    let mut sub = s.nginx.connect_tls(&s.nginx.wss("/subscribe/office")).await;
    s.redis.wait_numsub("lightlevel/office", 2).await;
    let mut publisher = s.nginx.connect_tls(&s.nginx.wss("/publish/office")).await;

    publisher.send(Message::text("417")).await.unwrap();
    publisher.send(Message::binary(all_bytes())).await.unwrap();
    assert_eq!(next_text(&mut sub).await, "417");
    assert_eq!(next_frame(&mut sub).await, Message::binary(all_bytes()));
    // `redis-cli SUBSCRIBE lightlevel/office` sees the same bytes: /publish/ was stripped.
    assert_eq!(&watcher.next().await[..], b"417");
    assert_eq!(&watcher.next().await[..], &all_bytes()[..]);
    // And what Redis gets from elsewhere reaches the wss subscriber.
    s.redis.publish("lightlevel/office", "from redis-cli").await;
    assert_eq!(next_text(&mut sub).await, "from redis-cli");
}

#[tokio::test]
async fn a_percent_encoded_path_maps_to_the_same_channel_through_both_sites_as_sent() {
    let s = stack(&[Site::TwoPort, Site::Tls], &[], None).await;
    // nginx's own $uri would be `/c/d`: decoded (%20, %41, %2F) and normalised (`..`).
    let path = "/a%20b/%41/../c%2Fd";
    let channel = "lightlevel/a%20b/%41/../c%2Fd";
    let mut watcher = s.redis.subscribe(channel).await;
    let mut plain_sub = connect(&s.nginx.ws_subscribe(&format!("{path}?unit=lux"))).await;
    let mut tls_sub = s
        .nginx
        .connect_tls(&s.nginx.wss(&format!("/subscribe{path}?unit=lux")))
        .await;
    // One Redis subscription for both clients (plus the watcher): the same channel.
    s.redis.wait_numsub(channel, 2).await;

    let mut plain_pub = connect(&s.nginx.ws_publish(path)).await;
    let mut tls_pub = s
        .nginx
        .connect_tls(&s.nginx.wss(&format!("/publish{path}")))
        .await;
    send_text(&mut plain_pub, "via 8766").await;
    assert_eq!(&watcher.next().await[..], b"via 8766");
    send_text(&mut tls_pub, "via 443").await;
    assert_eq!(&watcher.next().await[..], b"via 443");
    for sub in [&mut plain_sub, &mut tls_sub] {
        assert_eq!(next_text(sub).await, "via 8766");
        assert_eq!(next_text(sub).await, "via 443");
    }
}

#[tokio::test]
async fn nginx_hands_the_relay_the_raw_path_the_upgrade_and_the_clients_address() {
    // A stand-in relay that records the request nginx sends it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let recorder = tokio::spawn(async move {
        let mut heads = Vec::new();
        for _ in 0..2 {
            let (mut stream, _) = tokio::time::timeout(PATIENCE, listener.accept())
                .await
                .expect("nginx never connected to the relay")
                .unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if stream.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            stream
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await
                .unwrap();
            heads.push(String::from_utf8(head).unwrap());
        }
        heads
    });
    let nginx = Nginx::start((upstream, upstream), &[Site::TwoPort, Site::Tls], None).await;
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: relay.test\r\n{upgrade}\r\n");
    // Only sent: the stand-in's answers do not matter.
    let mut plain = TcpStream::connect(("127.0.0.1", nginx.publish))
        .await
        .unwrap();
    plain
        .write_all(request("/a%20b/../c?x=1").as_bytes())
        .await
        .unwrap();
    let mut tls = nginx.tls_stream().await;
    tls.write_all(request("/subscribe/a%20b/../c?x=1").as_bytes())
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let heads = recorder.await.unwrap();

    for (head, proto) in heads.iter().zip(["http", "https"]) {
        let lines: Vec<String> = head.lines().map(str::to_ascii_lowercase).collect();
        assert_eq!(lines[0], "get /a%20b/../c?x=1 http/1.1", "{head}");
        for expected in [
            "upgrade: websocket".to_string(),
            "connection: upgrade".to_string(),
            "x-real-ip: 127.0.0.1".to_string(),
            "x-forwarded-for: 127.0.0.1".to_string(),
            format!("x-forwarded-proto: {proto}"),
            "sec-websocket-key: dghlihnhbxbszsbub25jzq==".to_string(),
        ] {
            assert!(lines.contains(&expected), "no `{expected}` in:\n{head}");
        }
    }
}

#[tokio::test]
async fn the_live_page_is_the_subscribe_servers_root_through_both_sites_and_its_socket_works() {
    let s = stack(&[Site::TwoPort, Site::Tls], &[], None).await;
    let (direct_head, direct_body) = plain_request(s.subscribe.addr.port(), &get("/", "")).await;
    let (plain_head, plain_body) = plain_request(s.nginx.subscribe, &get("/", "")).await;
    assert_eq!(
        status_of(&plain_head),
        status_of(&direct_head),
        "{plain_head}"
    );
    assert_eq!(plain_body, direct_body);
    // https://HOST/ and https://HOST/subscribe/ are both the page.
    for path in ["/", "/subscribe/"] {
        let (tls_head, tls_body) = s.nginx.https_request(&get(path, "")).await;
        assert_eq!(
            status_of(&tls_head),
            status_of(&direct_head),
            "{path}: {tls_head}"
        );
        assert_eq!(tls_body, direct_body, "{path}");
    }
    // The page opens its socket beside itself: served at https://HOST/, the socket for /office
    // is wss://HOST/office, which is the subscribe server's /office.
    let mut page_socket = s.nginx.connect_tls(&s.nginx.wss("/office")).await;
    s.redis.wait_numsub("lightlevel/office", 1).await;
    s.redis.publish("lightlevel/office", "417").await;
    assert_eq!(next_text(&mut page_socket).await, "417");
    // /healthz through https:// is the subscribe server's too.
    let (head, body) = s.nginx.https_request(&get("/subscribe/healthz", "")).await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert!(body.starts_with(b"ok"), "{body:?}");
}

#[tokio::test]
async fn requests_are_logged_without_their_query_string_so_no_token_reaches_the_access_log() {
    let s = stack(&[Site::TwoPort, Site::Tls], &[], None).await;
    let secret = "SECRETVALUE";
    // A browser's token rides in the query string: through each server block of both sites.
    let (head, _) = plain_request(
        s.nginx.subscribe,
        &get(&format!("/office?token={secret}"), ""),
    )
    .await;
    assert_eq!(status_of(&head), 426, "{head}");
    let (head, _) = plain_request(
        s.nginx.publish,
        &get(&format!("/pi/lux?token={secret}"), ""),
    )
    .await;
    assert_eq!(status_of(&head), 426, "{head}");
    let (head, _) = s
        .nginx
        .https_request(&get(&format!("/?path=/office&token={secret}"), ""))
        .await;
    assert_eq!(status_of(&head), 200, "{head}");
    let (head, _) = s
        .nginx
        .https_request(&get(&format!("/publish/pi/lux?token={secret}"), ""))
        .await;
    assert_eq!(status_of(&head), 426, "{head}");
    let (head, _) = plain_request(
        s.nginx.http,
        &get(&format!("/subscribe/office?token={secret}"), ""),
    )
    .await;
    assert_eq!(status_of(&head), 301, "{head}");

    // nginx writes a line once it has answered; the five requests are each logged.
    let log = s.nginx.dir.join("access.log");
    let text = eventually(|| async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        match text.lines().count() {
            5 => Ok(text),
            n => Err(format!("{n} lines in the access log, expected 5:\n{text}")),
        }
    })
    .await;
    for request in [
        "\"GET /office HTTP/1.0\" 426 ",
        "\"GET /pi/lux HTTP/1.0\" 426 ",
        "\"GET / HTTP/1.0\" 200 ",
        "\"GET /publish/pi/lux HTTP/1.0\" 426 ",
        "\"GET /subscribe/office HTTP/1.0\" 301 ",
    ] {
        assert!(
            text.contains(request),
            "no {request} in the access log:\n{text}"
        );
    }
    assert!(
        !text.contains(secret) && !text.contains("token="),
        "a token reached the access log:\n{text}"
    );
}

#[tokio::test]
async fn plain_http_redirects_to_https_but_serves_certbot_challenges() {
    let nginx = Nginx::start(
        (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ),
        &[Site::Tls],
        None,
    )
    .await;
    let (head, _) = plain_request(nginx.http, &get("/subscribe/office?x=1", "")).await;
    assert_eq!(status_of(&head), 301, "{head}");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("location: https://127.0.0.1/subscribe/office?x=1")),
        "{head}"
    );
    std::fs::write(
        nginx.dir.join("www/.well-known/acme-challenge/token1"),
        "proof",
    )
    .unwrap();
    let (head, body) =
        plain_request(nginx.http, &get("/.well-known/acme-challenge/token1", "")).await;
    assert_eq!(
        (status_of(&head), &body[..]),
        (200, &b"proof"[..]),
        "{head}"
    );
}

#[tokio::test]
async fn metrics_answer_localhost_and_refuse_any_other_client() {
    let s = stack(&[Site::TwoPort, Site::Tls], &[], None).await;
    let elsewhere = "X-Forwarded-For: 203.0.113.9\r\n";
    for port in [s.nginx.publish, s.nginx.subscribe] {
        let (head, body) = plain_request(port, &get("/metrics", "")).await;
        assert_eq!(status_of(&head), 200, "{head}");
        assert!(String::from_utf8_lossy(&body).contains("lightrelay_connections"));
        let (head, _) = plain_request(port, &get("/metrics", elsewhere)).await;
        assert_eq!(status_of(&head), 403, "{head}");
        // Other requests from elsewhere are served as usual.
        let (head, _) = plain_request(port, &get("/healthz", elsewhere)).await;
        assert_eq!(status_of(&head), 200, "{head}");
    }
    for path in [
        "/metrics",
        "/publish/metrics",
        "/subscribe/metrics",
        "/publish//metrics",
        "/subscribe/%6detrics",
    ] {
        let (head, body) = s.nginx.https_request(&get(path, "")).await;
        assert_eq!(status_of(&head), 200, "{path}: {head}");
        assert!(
            String::from_utf8_lossy(&body).contains("lightrelay_connections"),
            "{path}"
        );
        let (head, _) = s.nginx.https_request(&get(path, elsewhere)).await;
        assert_eq!(status_of(&head), 403, "{path}: {head}");
    }

    // The rule itself, as nginx parsed it: every /metrics location allows only the loopback.
    let dump = s.nginx.dump();
    let blocks: Vec<&str> = dump
        .split("location = ")
        .skip(1)
        .filter(|b| b.split_whitespace().next().unwrap().ends_with("/metrics"))
        .map(|b| &b[..b.find('}').unwrap()])
        .collect();
    assert_eq!(
        blocks.len(),
        5,
        "two in the two-port site, three in the TLS site:\n{dump}"
    );
    for block in blocks {
        for rule in ["allow 127.0.0.1;", "allow ::1;", "deny all;"] {
            assert!(block.contains(rule), "no `{rule}` in location = {block}");
        }
    }
}

/// Read for `how_long`; panics if the connection ends or a data frame arrives meanwhile.
/// Pings are answered (as any WebSocket client does) and skipped.
async fn stay_idle(ws: &mut Ws, how_long: Duration) {
    let outcome = tokio::time::timeout(how_long, next_frame(ws)).await;
    assert!(outcome.is_err(), "expected silence, got {outcome:?}");
}

#[tokio::test]
async fn an_idle_connection_outlives_nginx_timeouts_because_the_relay_pings() {
    // nginx gives up on a silent upstream after 2 s; the relay pings every second.
    let s = stack(
        &[Site::TwoPort, Site::Tls],
        &["--ping-interval", "1s"],
        Some("2s"),
    )
    .await;
    let mut plain_sub = connect(&s.nginx.ws_subscribe("/office")).await;
    let mut tls_sub = s.nginx.connect_tls(&s.nginx.wss("/subscribe/office")).await;
    s.redis.wait_numsub("lightlevel/office", 1).await;
    let mut plain_pub = connect(&s.nginx.ws_publish("/office")).await;
    let mut tls_pub = s.nginx.connect_tls(&s.nginx.wss("/publish/office")).await;

    let idle = Duration::from_secs(5);
    tokio::join!(
        stay_idle(&mut plain_sub, idle),
        stay_idle(&mut tls_sub, idle),
        stay_idle(&mut plain_pub, idle),
        stay_idle(&mut tls_pub, idle),
    );

    // One publisher after the other: two connections keep no order between them.
    send_text(&mut plain_pub, "after 5 s").await;
    assert_eq!(next_text(&mut plain_sub).await, "after 5 s");
    assert_eq!(next_text(&mut tls_sub).await, "after 5 s");
    send_text(&mut tls_pub, "after 5 s, wss").await;
    assert_eq!(next_text(&mut plain_sub).await, "after 5 s, wss");
    assert_eq!(next_text(&mut tls_sub).await, "after 5 s, wss");
}

#[tokio::test]
async fn without_pings_nginx_closes_an_idle_connection_after_its_read_timeout() {
    // The control for the test above: the same 2 s timeout, the default 30 s ping interval.
    let s = stack(&[Site::TwoPort], &[], Some("2s")).await;
    let mut sub = connect(&s.nginx.ws_subscribe("/office")).await;
    let started = Instant::now();
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match sub.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("nginx kept the silent connection open");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "unexpected data: {end:?}"
    );
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(1500) && lived < Duration::from_secs(10),
        "closed after {lived:?}, not nginx's 2 s"
    );
}
