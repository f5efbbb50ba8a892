//! SPEC §8 from outside: the token checks of both servers, seen as a client sees them (status,
//! one-line reason, `WWW-Authenticate`, close codes) and as an operator does
//! (`lightrelay_auth_refused_total{reason}`, exit codes, logs). Tokens are minted here with
//! `jsonwebtoken`, independently of the relay's code; one test checks `lightrelay token`'s
//! output against the server.

mod common;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::auth::*;
use common::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// The HS256 secret most tests' servers verify with.
const SECRET: &str = "correct-horse-battery-staple";

/// Check one refusal: `status`, a one-line body holding `says`, `WWW-Authenticate: Bearer`
/// on a 401, and exactly one more count of `reason` in `/metrics`.
async fn refused(
    server: &Server,
    status: u16,
    reason: &str,
    says: &str,
    request: impl Future<Output = String>,
) {
    let before = auth_refused(server, reason).await;
    let response = request.await;
    assert_eq!(status_of(&response), status, "{response}");
    let body = body_of(&response);
    assert!(
        body.ends_with('\n') && body.trim_end().lines().count() == 1 && !body.trim().is_empty(),
        "the reason must be one line: {response:?}"
    );
    assert!(body.contains(says), "expected {says:?} in {response:?}");
    if status == 401 {
        let challenge = header_value(&response, "WWW-Authenticate");
        assert!(
            challenge
                .as_deref()
                .is_some_and(|c| c.starts_with("Bearer")),
            "a 401 must carry WWW-Authenticate: Bearer: {response:?}"
        );
    }
    assert_eq!(
        auth_refused(server, reason).await,
        before + 1.0,
        "lightrelay_auth_refused_total{{reason=\"{reason}\"}} after {response:?}"
    );
}

/// The `Authorization` value that carries `token`.
fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Assert that an upgrade answer is a 101.
fn assert_upgraded(response: &str) {
    assert_eq!(status_of(response), 101, "{response}");
}

/// A publish server under `--auth publish` verifying [`SECRET`].
async fn publish_server(redis: &Redis, keys: &KeyDir, extra: &[&str]) -> Server {
    let secret_file = keys.write("secrets", &format!("{SECRET}\n"));
    let mut args = vec![
        "--auth".to_string(),
        "publish".into(),
        "--jwt-secret-file".into(),
        arg(&secret_file),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(Kind::Publish, &redis.url(), &args).await
}

#[tokio::test]
async fn publishing_needs_a_token_whose_pub_grant_covers_the_path() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-publish");
    let server = publish_server(&redis, &keys, &[]).await;
    let addr = server.addr;
    let mut watcher = redis.subscribe("lightlevel/office/desk").await;
    let token = hs256(SECRET.as_bytes(), None, &grants(&["/office/*"], &[]));

    // No token: 401 and the challenge, for a WebSocket and for a POST.
    refused(&server, 401, "missing", "a token is required", async {
        upgrade_answer(addr, "/office/desk", &[]).await
    })
    .await;
    refused(&server, 401, "missing", "a token is required", async {
        post_answer(addr, "/office/desk", &[], b"nope").await
    })
    .await;
    // Another scheme than Bearer: 401, even with a token that would do.
    let basic = format!("Basic {}", "dXNlcjpwYXNz");
    refused(&server, 401, "malformed", "Bearer", async {
        upgrade_answer(addr, "/office/desk", &[("Authorization", &basic)]).await
    })
    .await;
    refused(&server, 401, "malformed", "Bearer", async {
        post_answer(addr, "/office/desk", &[("Authorization", &basic)], b"nope").await
    })
    .await;

    // A token covering the path, in the header: 101, and the frame reaches Redis.
    let mut ws = connect_bearer(&server.ws("/office/desk"), &token).await;
    send_text(&mut ws, "from the header").await;
    assert_eq!(&watcher.next().await[..], b"from the header");
    // The same token as ?token= (what a browser sends).
    let mut ws = connect(&server.ws(&format!("/office/desk?token={token}"))).await;
    send_text(&mut ws, "from the query").await;
    assert_eq!(&watcher.next().await[..], b"from the query");
    // POST, both ways: 200 with the receiver count (the watcher).
    let auth = bearer(&token);
    let answer = post_answer(addr, "/office/desk", &[("Authorization", &auth)], b"posted").await;
    assert_eq!(
        (status_of(&answer), body_of(&answer)),
        (200, "1\n"),
        "{answer}"
    );
    assert_eq!(&watcher.next().await[..], b"posted");
    let target = format!("/office/desk?token={token}");
    let answer = post_answer(addr, &target, &[], b"posted by query").await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(&watcher.next().await[..], b"posted by query");

    // A valid token that does not cover the path: 403, both ways, header or query.
    let says = "grants do not cover /kitchen";
    refused(&server, 403, "forbidden", says, async {
        upgrade_answer(addr, "/kitchen", &[("Authorization", &auth)]).await
    })
    .await;
    refused(&server, 403, "forbidden", says, async {
        upgrade_answer(addr, &format!("/kitchen?token={token}"), &[]).await
    })
    .await;
    refused(&server, 403, "forbidden", says, async {
        post_answer(addr, "/kitchen", &[("Authorization", &auth)], b"nope").await
    })
    .await;
    // A `sub` grant is no `pub` grant.
    let reader = hs256(SECRET.as_bytes(), None, &grants(&[], &["/office/*"]));
    refused(&server, 403, "forbidden", "\"pub\" grants", async {
        upgrade_answer(addr, "/office/desk", &[("Authorization", &bearer(&reader))]).await
    })
    .await;

    // Nothing refused was published: the next message on the channel is a marker.
    redis.publish("lightlevel/office/desk", "marker").await;
    assert_eq!(&watcher.next().await[..], b"marker");
}

#[tokio::test]
async fn bad_tokens_get_401_with_their_reason() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-bad");
    let rsa = keys.key_pair("device-rsa", KeyKind::Rsa);
    let ec = keys.key_pair("device-ec", KeyKind::Ec);
    let (rsa_key, ec_key) = (rsa.public_arg(), ec.public_arg());
    let server = publish_server(
        &redis,
        &keys,
        &[
            "--jwt-public-key-file",
            &rsa_key,
            "--jwt-public-key-file",
            &ec_key,
        ],
    )
    .await;
    let addr = server.addr;
    let claims = grants(&["/*"], &[]);
    let now = unix_now();
    // The control: every key of this server lets a good token through.
    assert_upgraded(
        &upgrade_answer(
            addr,
            "/x",
            &[(
                "Authorization",
                &bearer(&hs256(SECRET.as_bytes(), None, &claims)),
            )],
        )
        .await,
    );
    for pair in [&rsa, &ec] {
        let good = pair.sign(None, &claims);
        assert_upgraded(&upgrade_answer(addr, "/x", &[("Authorization", &bearer(&good))]).await);
    }

    let rsa_pem = std::fs::read(&rsa.public).unwrap();
    let ec_pem = std::fs::read(&ec.public).unwrap();
    let cases: Vec<(&str, &str, &str, String)> = vec![
        (
            "forged",
            "bad_signature",
            "bad token signature",
            hs256(b"another secret", None, &claims),
        ),
        (
            "expired",
            "expired",
            "token expired",
            hs256(
                SECRET.as_bytes(),
                None,
                &with(claims.clone(), "exp", json!(now - 10)),
            ),
        ),
        (
            "not yet valid",
            "not_yet_valid",
            "not valid yet",
            hs256(
                SECRET.as_bytes(),
                None,
                &with(claims.clone(), "nbf", json!(now + 3600)),
            ),
        ),
        ("alg none", "malformed", "token header", unsigned(&claims)),
        (
            "alg none with a kid",
            "malformed",
            "token header",
            format!(
                "{}.{}.",
                base64_url(&json!({"alg": "none", "kid": "device-rsa"}).to_string()),
                base64_url(&claims.to_string())
            ),
        ),
        (
            "not a JWT",
            "malformed",
            "not a JWT",
            "not-a-token".to_string(),
        ),
        // Algorithm confusion: HS256 keyed with the bytes of the server's public key files.
        (
            "HS256 keyed with the RSA public key",
            "bad_signature",
            "bad token signature",
            hs256(&rsa_pem, None, &claims),
        ),
        (
            "HS256 keyed with the RSA public key, kid of that key",
            "bad_signature",
            "HS256",
            hs256(&rsa_pem, Some("device-rsa"), &claims),
        ),
        (
            "HS256 keyed with the EC public key",
            "bad_signature",
            "bad token signature",
            hs256(&ec_pem, None, &claims),
        ),
        (
            "HS256 keyed with the EC public key, kid of that key",
            "bad_signature",
            "HS256",
            hs256(&ec_pem, Some("device-ec"), &claims),
        ),
        (
            "RS256 with the EC key's kid",
            "bad_signature",
            "",
            rsa.sign(Some("device-ec"), &claims),
        ),
        (
            "unknown kid",
            "unknown_kid",
            "'attic'",
            hs256(SECRET.as_bytes(), Some("attic"), &claims),
        ),
    ];
    for (case, reason, says, token) in &cases {
        let header = bearer(token);
        eprintln!("case: {case}");
        refused(&server, 401, reason, says, async {
            upgrade_answer(addr, "/x", &[("Authorization", &header)]).await
        })
        .await;
        refused(&server, 401, reason, says, async {
            upgrade_answer(addr, &format!("/x?token={token}"), &[]).await
        })
        .await;
        refused(&server, 401, reason, says, async {
            post_answer(addr, "/x", &[("Authorization", &header)], b"nope").await
        })
        .await;
    }
}

fn base64_url(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_set() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-iss");
    let server = publish_server(
        &redis,
        &keys,
        &["--jwt-issuer", "home-office", "--jwt-audience", "relay"],
    )
    .await;
    let addr = server.addr;
    let right = with(
        with(grants(&["/*"], &[]), "iss", json!("home-office")),
        "aud",
        json!("relay"),
    );
    let sign = |claims: &serde_json::Value| bearer(&hs256(SECRET.as_bytes(), None, claims));
    assert_upgraded(&upgrade_answer(addr, "/x", &[("Authorization", &sign(&right))]).await);
    // `aud` may be a list naming this relay among others.
    let listed = with(right.clone(), "aud", json!(["other", "relay"]));
    assert_upgraded(&upgrade_answer(addr, "/x", &[("Authorization", &sign(&listed))]).await);

    let mut no_iss = right.clone();
    no_iss.as_object_mut().unwrap().remove("iss");
    let mut no_aud = right.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    let cases = [
        (
            "wrong_issuer",
            "issuer",
            with(right.clone(), "iss", json!("someone-else")),
        ),
        ("wrong_issuer", "issuer", no_iss),
        (
            "wrong_audience",
            "audience",
            with(right.clone(), "aud", json!("another-relay")),
        ),
        ("wrong_audience", "audience", no_aud),
    ];
    for (reason, says, claims) in &cases {
        let header = sign(claims);
        refused(&server, 401, reason, says, async {
            upgrade_answer(addr, "/x", &[("Authorization", &header)]).await
        })
        .await;
    }
}

#[tokio::test]
async fn kid_picks_the_key_and_without_kid_every_key_is_tried() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-kid");
    let secrets = keys.write("secrets", "# two places\noffice:SECRET1\nhome:SECRET2\n");
    let pairs = [
        keys.key_pair("sensor-rsa", KeyKind::Rsa),
        keys.key_pair("sensor-ec", KeyKind::Ec),
        keys.key_pair("sensor-ed", KeyKind::Ed25519),
    ];
    let mut args = vec![
        "--auth".to_string(),
        "publish".into(),
        "--jwt-secret-file".into(),
        arg(&secrets),
    ];
    for pair in &pairs {
        args.extend(["--jwt-public-key-file".to_string(), pair.public_arg()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(Kind::Publish, &redis.url(), &args).await;
    let addr = server.addr;
    let claims = grants(&["/sensors/*"], &[]);
    let mut watcher = redis.subscribe("lightlevel/sensors/1").await;

    let passing = [
        (
            "SECRET2, kid home",
            hs256(b"SECRET2", Some("home"), &claims),
        ),
        ("SECRET2, no kid", hs256(b"SECRET2", None, &claims)),
        ("SECRET1, no kid", hs256(b"SECRET1", None, &claims)),
        ("RS256, kid", pairs[0].sign(Some("sensor-rsa"), &claims)),
        ("RS256, no kid", pairs[0].sign(None, &claims)),
        ("ES256, kid", pairs[1].sign(Some("sensor-ec"), &claims)),
        ("ES256, no kid", pairs[1].sign(None, &claims)),
        ("EdDSA, kid", pairs[2].sign(Some("sensor-ed"), &claims)),
        ("EdDSA, no kid", pairs[2].sign(None, &claims)),
    ];
    for (case, token) in &passing {
        let mut ws = connect_bearer(&server.ws("/sensors/1"), token).await;
        send_text(&mut ws, case).await;
        assert_eq!(&watcher.next().await[..], case.as_bytes(), "{case}");
    }

    let refusals = [
        ("bad_signature", hs256(b"SECRET2", Some("office"), &claims)),
        ("bad_signature", pairs[1].sign(Some("sensor-ed"), &claims)),
        ("unknown_kid", hs256(b"SECRET2", Some("garage"), &claims)),
    ];
    for (reason, token) in &refusals {
        let header = bearer(token);
        refused(&server, 401, reason, "", async {
            upgrade_answer(addr, "/sensors/1", &[("Authorization", &header)]).await
        })
        .await;
    }
}

#[tokio::test]
async fn subscribing_needs_a_sub_grant_under_auth_all() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-all");
    let secret_file = keys.write("secrets", &format!("{SECRET}\n"));
    let server = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &["--auth", "all", "--jwt-secret-file", &arg(&secret_file)],
    )
    .await;
    let addr = server.addr;
    let reader = hs256(SECRET.as_bytes(), None, &grants(&[], &["/sensors/*"]));
    let writer = hs256(SECRET.as_bytes(), None, &grants(&["/sensors/*"], &[]));

    refused(&server, 401, "missing", "\"sub\" grant", async {
        upgrade_answer(addr, "/sensors/a/b", &[]).await
    })
    .await;
    refused(
        &server,
        403,
        "forbidden",
        "\"sub\" grants do not cover /sensors/a/b",
        async {
            upgrade_answer(addr, "/sensors/a/b", &[("Authorization", &bearer(&writer))]).await
        },
    )
    .await;
    refused(&server, 403, "forbidden", "do not cover /office", async {
        upgrade_answer(addr, &format!("/office?token={reader}"), &[]).await
    })
    .await;
    refused(&server, 401, "bad_signature", "signature", async {
        let forged = hs256(b"guess", None, &grants(&[], &["/*"]));
        upgrade_answer(addr, "/sensors/a", &[("Authorization", &bearer(&forged))]).await
    })
    .await;

    // `/sensors/*` covers `/sensors/a/b` (`*` matches `/` too), header or query.
    let mut by_header = connect_bearer(&server.ws("/sensors/a/b"), &reader).await;
    let mut by_query = connect(&server.ws(&format!("/sensors/a/b?token={reader}"))).await;
    until_receiving(&redis, "lightlevel/sensors/a/b", &mut by_header).await;
    until_receiving(&redis, "lightlevel/sensors/a/b", &mut by_query).await;
    redis.publish("lightlevel/sensors/a/b", "21.5").await;
    for ws in [&mut by_header, &mut by_query] {
        assert_eq!(next_data(ws).await, Message::text("21.5"));
    }
}

#[tokio::test]
async fn under_auth_publish_subscribing_is_open_but_accept_publish_frames_need_a_pub_grant() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-accept");
    let secret_file = keys.write("secrets", &format!("{SECRET}\n"));
    let server = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &[
            "--auth",
            "publish",
            "--jwt-secret-file",
            &arg(&secret_file),
            "--accept-publish",
        ],
    )
    .await;
    let channel = "lightlevel/room";
    let mut watcher = redis.subscribe(channel).await;
    let reader = hs256(SECRET.as_bytes(), None, &grants(&[], &["/*"]));
    let talker = hs256(SECRET.as_bytes(), None, &grants(&["/room"], &[]));

    // Without a token, and with one without a `pub` grant: subscribed, and closed with 1008
    // at their first frame, which is not published.
    let mut anonymous = connect(&server.ws("/room")).await;
    let mut read_only = connect_bearer(&server.ws("/room"), &reader).await;
    for ws in [&mut anonymous, &mut read_only] {
        until_receiving(&redis, channel, ws).await;
        send_text(ws, "not allowed").await;
        let close = match next_data(ws).await {
            Message::Close(Some(close)) => close,
            other => panic!("expected the close frame, got {other:?}"),
        };
        assert_eq!(close.code, CloseCode::Policy);
        assert!(
            close.reason.contains("does not allow publishing"),
            "{close:?}"
        );
    }
    // With a `pub` grant: published, and back to its sender through Redis.
    let mut talking = connect_bearer(&server.ws("/room"), &talker).await;
    until_receiving(&redis, channel, &mut talking).await;
    send_text(&mut talking, "hello").await;
    assert_eq!(next_data(&mut talking).await, Message::text("hello"));
    // Redis saw probes and "hello", never "not allowed".
    let seen = loop {
        match watcher.next().await {
            probe if &probe[..] == PROBE.as_bytes() => {}
            other => break other,
        }
    };
    assert_eq!(&seen[..], b"hello");
}

/// Read `ws` until its close frame: it must be 1008 `token expired`, with no data frame
/// before it (probes aside), arriving at about `exp` (not at a next message: none comes).
async fn closed_at_exp(mut ws: Ws, exp: u64) {
    let frame = match next_data(&mut ws).await {
        Message::Close(Some(close)) => close,
        other => panic!("expected the close frame at exp, got {other:?}"),
    };
    let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "token expired");
    let exp = Duration::from_secs(exp);
    assert!(
        at + Duration::from_secs(1) >= exp,
        "closed {:?} before exp",
        exp - at
    );
    assert!(
        at <= exp + Duration::from_secs(3),
        "closed {:?} after exp",
        at - exp
    );
}

#[tokio::test]
async fn a_subscriber_is_closed_with_1008_at_its_tokens_exp() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-exp-sub");
    let secret_file = keys.write("secrets", &format!("{SECRET}\n"));
    let server = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &["--auth", "all", "--jwt-secret-file", &arg(&secret_file)],
    )
    .await;
    let exp = unix_now() + 3;
    let token = hs256(
        SECRET.as_bytes(),
        None,
        &with(grants(&[], &["/*"]), "exp", json!(exp)),
    );
    let mut ws = connect_bearer(&server.ws("/clock"), &token).await;
    until_receiving(&redis, "lightlevel/clock", &mut ws).await;
    closed_at_exp(ws, exp).await;
    server
        .wait_series("lightrelay_closed_total{reason=\"token_expired\"}", |n| {
            n == 1.0
        })
        .await;
}

#[tokio::test]
async fn a_publisher_is_closed_with_1008_at_its_tokens_exp() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-exp-pub");
    let server = publish_server(&redis, &keys, &[]).await;
    let mut watcher = redis.subscribe("lightlevel/clock").await;
    let exp = unix_now() + 3;
    let token = hs256(
        SECRET.as_bytes(),
        None,
        &with(grants(&["/*"], &[]), "exp", json!(exp)),
    );
    let mut ws = connect_bearer(&server.ws("/clock"), &token).await;
    send_text(&mut ws, "before exp").await;
    assert_eq!(&watcher.next().await[..], b"before exp");
    closed_at_exp(ws, exp).await;
    server
        .wait_series("lightrelay_closed_total{reason=\"token_expired\"}", |n| {
            n == 1.0
        })
        .await;
}

#[tokio::test]
async fn sighup_swaps_the_keys_and_open_connections_stay() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-hup");
    let secret_file = keys.write("secrets", "SECRET_A\n");
    let flags = ["--jwt-secret-file", &arg(&secret_file)];
    let publish = Server::start(
        Kind::Publish,
        &redis.url(),
        &[&["--auth", "publish"][..], &flags].concat(),
    )
    .await;
    let subscribe = Server::start(
        Kind::Subscribe,
        &redis.url(),
        &[&["--auth", "all"][..], &flags].concat(),
    )
    .await;
    let claims = grants(&["/*"], &["/*"]);
    let a = hs256(b"SECRET_A", None, &claims);
    let mut publisher = connect_bearer(&publish.ws("/hall"), &a).await;
    let mut subscriber = connect_bearer(&subscribe.ws("/hall"), &a).await;
    until_receiving(&redis, "lightlevel/hall", &mut subscriber).await;

    std::fs::write(&secret_file, "SECRET_B\n").unwrap();
    publish.signal("HUP");
    subscribe.signal("HUP");
    let b = hs256(b"SECRET_B", None, &claims);
    for server in [&publish, &subscribe] {
        // The reload is done when a B-token gets through.
        let header = bearer(&b);
        let header = &header;
        eventually(|| async move {
            let answer = upgrade_answer(server.addr, "/hall", &[("Authorization", header)]).await;
            match status_of(&answer) {
                101 => Ok(()),
                _ => Err(format!("a token of the new key stayed refused: {answer}")),
            }
        })
        .await;
        let new_a = hs256(b"SECRET_A", None, &claims);
        refused(server, 401, "bad_signature", "signature", async {
            upgrade_answer(server.addr, "/hall", &[("Authorization", &bearer(&new_a))]).await
        })
        .await;
    }
    // Both connections opened with A before the reload still work, end to end.
    send_text(&mut publisher, "still here").await;
    assert_eq!(
        next_data(&mut subscriber).await,
        Message::text("still here")
    );
}

#[tokio::test]
async fn sighup_with_an_unreadable_key_file_keeps_the_old_keys() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-hup-bad");
    let secret_file = keys.write("secrets", "SECRET_A\n");
    let (mut server, stderr) = start_logged(
        Kind::Publish,
        &redis.url(),
        &["--auth", "publish", "--jwt-secret-file", &arg(&secret_file)],
        &[],
    )
    .await;
    let a = hs256(b"SECRET_A", None, &grants(&["/*"], &[]));
    let mut watcher = redis.subscribe("lightlevel/hall").await;
    let mut before = connect_bearer(&server.ws("/hall"), &a).await;

    // Gone (a file that cannot be read whoever runs the test), then a directory.
    std::fs::remove_file(&secret_file).unwrap();
    server.signal("HUP");
    stderr
        .wait_for("the failed reload", |lines| {
            lines.iter().filter(|l| l.contains("not re-read")).count() == 1
        })
        .await;
    std::fs::create_dir(&secret_file).unwrap();
    server.signal("HUP");
    stderr
        .wait_for("the second failed reload", |lines| {
            lines.iter().filter(|l| l.contains("not re-read")).count() == 2
        })
        .await;

    assert!(
        !server.has_exited(),
        "the server stopped at a failed reload"
    );
    server.wait_healthy().await;
    let mut after = connect_bearer(&server.ws("/hall"), &a).await;
    send_text(&mut before, "opened before").await;
    assert_eq!(&watcher.next().await[..], b"opened before");
    send_text(&mut after, "opened after").await;
    assert_eq!(&watcher.next().await[..], b"opened after");
    let forged = hs256(b"SECRET_B", None, &grants(&["/*"], &[]));
    refused(&server, 401, "bad_signature", "signature", async {
        upgrade_answer(server.addr, "/hall", &[("Authorization", &bearer(&forged))]).await
    })
    .await;
}

#[tokio::test]
async fn auth_without_a_readable_key_is_a_start_up_error() {
    let keys = KeyDir::new("auth-start");
    let missing = keys.dir.join("no-such-file");
    let empty = keys.write("empty", "# nothing but a comment\n\n");
    let not_pem = keys.write("not-a-key.pem", "hello\n");
    let (missing, empty, not_pem, dir) =
        (arg(&missing), arg(&empty), arg(&not_pem), arg(&keys.dir));
    let cases: Vec<(Kind, Vec<&str>, &str)> = vec![
        (
            Kind::Publish,
            vec!["--auth", "publish"],
            "--jwt-secret-file",
        ),
        (Kind::Subscribe, vec!["--auth", "all"], "--jwt-secret-file"),
        (
            Kind::Publish,
            vec!["--auth", "publish", "--jwt-secret-file", &missing],
            "no-such-file",
        ),
        (
            Kind::Subscribe,
            vec!["--auth", "all", "--jwt-secret-file", &dir],
            "--jwt-secret-file",
        ),
        (
            Kind::Publish,
            vec!["--auth", "publish", "--jwt-secret-file", &empty],
            "no secret",
        ),
        (
            Kind::Publish,
            vec!["--auth", "publish", "--jwt-public-key-file", &missing],
            "no-such-file",
        ),
        (
            Kind::Publish,
            vec!["--auth", "publish", "--jwt-public-key-file", &not_pem],
            "not-a-key.pem",
        ),
    ];
    for (kind, flags, names) in cases {
        let mut command = server_command(kind);
        // No Redis runs there: the check comes before anything else.
        command
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--redis-url", &format!("redis://127.0.0.1:{}", free_port())])
            .args(&flags)
            .env("RUST_LOG", "info");
        let (code, _, stderr) = run_to_exit(&mut command).await;
        assert_eq!(code, Some(2), "{flags:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{flags:?}: one line: {stderr:?}");
        assert!(
            stderr.contains(names),
            "{flags:?}: {stderr:?} should name {names}"
        );
    }
    // The same through the environment.
    let (code, _, stderr) = run_to_exit(
        server_command(Kind::Publish)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .env("LIGHTRELAY_AUTH", "publish")
            .env("LIGHTRELAY_JWT_SECRET_FILE", &missing),
    )
    .await;
    assert_eq!((code, stderr.lines().count()), (Some(2), 1), "{stderr}");
}

#[tokio::test]
async fn tokens_never_appear_in_the_log() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-log");
    let secret_file = keys.write("secrets", &format!("{SECRET}\n"));
    let (server, stderr) = start_logged(
        Kind::Publish,
        &redis.url(),
        &["--auth", "publish", "--jwt-secret-file", &arg(&secret_file)],
        &[("RUST_LOG", "debug")],
    )
    .await;
    let addr = server.addr;
    let valid = hs256(SECRET.as_bytes(), None, &grants(&["/log/*"], &[]));
    let not_covering = hs256(SECRET.as_bytes(), None, &grants(&["/elsewhere"], &[]));
    let expired = hs256(
        SECRET.as_bytes(),
        None,
        &with(grants(&["/*"], &[]), "exp", json!(unix_now() - 60)),
    );

    let mut answers = Vec::new();
    for token in ["SECRETTOKEN", &valid, &not_covering, &expired] {
        answers.push(upgrade_answer(addr, &format!("/log/a?token={token}"), &[]).await);
        answers.push(post_answer(addr, &format!("/log/a?token={token}"), &[], b"x").await);
    }
    for token in ["SECRETTOKEN2", &valid, &not_covering, &expired] {
        let header = bearer(token);
        answers.push(upgrade_answer(addr, "/log/b", &[("Authorization", &header)]).await);
        answers.push(post_answer(addr, "/log/b", &[("Authorization", &header)], b"x").await);
    }
    let statuses: Vec<u16> = answers.iter().map(|a| status_of(a)).collect();
    assert_eq!(
        statuses,
        [401, 401, 101, 200, 403, 403, 401, 401, 401, 401, 101, 200, 403, 403, 401, 401]
    );
    // A connection opened with a token lives and ends, logged at debug.
    let mut ws = connect(&server.ws(&format!("/log/c?token={valid}"))).await;
    send_text(&mut ws, "logged?").await;
    drop(ws);
    let mut ws = connect_bearer(&server.ws("/log/c"), &valid).await;
    send_text(&mut ws, "logged?").await;
    drop(ws);
    // The server said something at debug (so the absence below means something).
    stderr
        .wait_for("debug lines", |lines| {
            lines.iter().any(|l| l.contains("DEBUG"))
        })
        .await;

    drop(server);
    let log = stderr.all();
    for secret in ["SECRETTOKEN", &valid, &not_covering, &expired] {
        assert!(!log.contains(secret), "{secret} appears in the log:\n{log}");
        // Nor its signature alone.
        let signature = secret.rsplit('.').next().unwrap();
        assert!(
            !log.contains(signature),
            "a signature appears in the log:\n{log}"
        );
    }
    for answer in &answers {
        assert!(
            !answer.contains("SECRETTOKEN") && !answer.contains(&valid[20..]),
            "a token came back in an answer: {answer}"
        );
    }
}

#[tokio::test]
async fn lightrelay_token_mints_tokens_the_server_accepts() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-cli");
    let secrets = keys.write("secrets", "office:SECRET1\nhome:SECRET2\n");
    let ec = keys.key_pair("pi-ec", KeyKind::Ec);
    let server = Server::start(
        Kind::Publish,
        &redis.url(),
        &[
            "--auth",
            "publish",
            "--jwt-secret-file",
            &arg(&secrets),
            "--jwt-public-key-file",
            &ec.public_arg(),
        ],
    )
    .await;
    let mut watcher = redis.subscribe("lightlevel/office/desk").await;
    let mint = |extra: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_lightrelay"));
        command.arg("token").args(extra);
        command
    };
    let secret_arg = arg(&secrets);
    let key_arg = arg(&ec.private);
    let ec_public = DecodingKey::from_ec_pem(&std::fs::read(&ec.public).unwrap()).unwrap();
    // Each: the flags, and the kid, algorithm and key the token must carry and verify with.
    let cases: [(&str, Vec<&str>, &str, Algorithm, DecodingKey); 3] = [
        (
            "secret, kid home",
            vec!["--secret-file", &secret_arg, "--kid", "home"],
            "home",
            Algorithm::HS256,
            DecodingKey::from_secret(b"SECRET2"),
        ),
        (
            "secret, first line",
            vec!["--secret-file", &secret_arg],
            "office",
            Algorithm::HS256,
            DecodingKey::from_secret(b"SECRET1"),
        ),
        (
            "ES256 private key",
            vec!["--private-key-file", &key_arg, "--kid", "pi-ec"],
            "pi-ec",
            Algorithm::ES256,
            ec_public,
        ),
    ];
    for (case, flags, kid, algorithm, key) in &cases {
        let (code, stdout, stderr) =
            run_to_exit(mint(flags).args(["--pub", "/office/*", "--ttl", "1h"])).await;
        assert_eq!(code, Some(0), "{case}: {stderr}");
        assert_eq!(
            stdout.lines().count(),
            1,
            "{case}: one token on stdout: {stdout:?}"
        );
        let token = stdout.trim();
        // Checked here too, by the library alone: its header, signature and claims.
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(
            (header.kid.as_deref(), header.alg),
            (Some(*kid), *algorithm),
            "{case}"
        );
        let mut validation = Validation::new(*algorithm);
        validation.required_spec_claims = ["exp".to_string()].into();
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
            .unwrap_or_else(|e| panic!("{case}: {e}"))
            .claims;
        assert_eq!(
            claims["lightrelay"],
            json!({"pub": ["/office/*"]}),
            "{case}"
        );
        let exp = claims["exp"].as_u64().unwrap();
        assert!(
            exp.abs_diff(unix_now() + 3600) <= 60,
            "{case}: --ttl 1h gave exp {exp}"
        );
        let mut ws = connect_bearer(&server.ws("/office/desk"), token).await;
        send_text(&mut ws, case).await;
        assert_eq!(&watcher.next().await[..], case.as_bytes(), "{case}");
        // Its grants are the ones asked for: another path is refused.
        refused(&server, 403, "forbidden", "/kitchen", async {
            upgrade_answer(
                server.addr,
                "/kitchen",
                &[("Authorization", &bearer(token))],
            )
            .await
        })
        .await;
    }
    // Signed by a key the server does not have, under the kid of one it has.
    let other = keys.key_pair("pi-ec-other", KeyKind::Ec);
    let other_key = arg(&other.private);
    let (code, stdout, stderr) = run_to_exit(&mut mint(&[
        "--private-key-file",
        &other_key,
        "--kid",
        "pi-ec",
        "--pub",
        "/*",
    ]))
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    refused(&server, 401, "bad_signature", "signature", async {
        upgrade_answer(
            server.addr,
            "/office/desk",
            &[("Authorization", &bearer(stdout.trim()))],
        )
        .await
    })
    .await;
}

#[tokio::test]
async fn tokens_without_exp_or_with_the_largest_exp_are_accepted() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-far");
    let server = publish_server(&redis, &keys, &[]).await;
    let mut watcher = redis.subscribe("lightlevel/far").await;
    let mut never = grants(&["/*"], &[]);
    never.as_object_mut().unwrap().remove("exp");
    // A signed token may say any NumericDate: the relay must neither panic nor refuse it.
    let cases = [
        ("no exp", never),
        (
            "exp u64::MAX",
            with(grants(&["/*"], &[]), "exp", json!(u64::MAX)),
        ),
        (
            "exp i64::MAX",
            with(grants(&["/*"], &[]), "exp", json!(i64::MAX)),
        ),
    ];
    for (case, claims) in &cases {
        let token = hs256(SECRET.as_bytes(), None, claims);
        let mut ws = connect_bearer(&server.ws("/far"), &token).await;
        send_text(&mut ws, case).await;
        assert_eq!(&watcher.next().await[..], case.as_bytes(), "{case}");
        let auth = bearer(&token);
        let answer = post_answer(server.addr, "/far", &[("Authorization", &auth)], b"post").await;
        assert_eq!(status_of(&answer), 200, "{case}: {answer}");
        assert_eq!(&watcher.next().await[..], b"post");
    }
}

/// A public key the token's algorithm cannot use (a P-384 key where ES256 wants P-256) is
/// skipped like a key whose signature does not match: the next key of the list still verifies
/// a token without `kid` (the check used to stop at the first key's error, "malformed").
#[tokio::test]
async fn a_key_of_another_curve_does_not_hide_the_key_that_verifies() {
    let redis = Redis::start().await;
    let keys = KeyDir::new("auth-curves");
    let p384_private = keys.write("p384.key", "");
    let p384_public = keys.write("p384.pem", "");
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            &arg(&p384_private),
        ],
        vec![
            "pkey",
            "-pubout",
            "-in",
            &arg(&p384_private),
            "-out",
            &arg(&p384_public),
        ],
    ] {
        let status = std::process::Command::new("openssl")
            .args(&args)
            .status()
            .unwrap();
        assert!(status.success(), "openssl {args:?}");
    }
    let p256 = keys.key_pair("sensor-ec", KeyKind::Ec);
    let server = Server::start(
        Kind::Publish,
        &redis.url(),
        &[
            "--auth",
            "publish",
            "--jwt-public-key-file",
            &arg(&p384_public),
            "--jwt-public-key-file",
            &p256.public_arg(),
        ],
    )
    .await;
    let mut watcher = redis.subscribe("lightlevel/sensors/1").await;
    let token = p256.sign(None, &grants(&["/sensors/*"], &[]));
    let mut ws = connect_bearer(&server.ws("/sensors/1"), &token).await;
    send_text(&mut ws, "verified by the second key").await;
    assert_eq!(&watcher.next().await[..], b"verified by the second key");
}
