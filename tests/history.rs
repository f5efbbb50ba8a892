//! History (SPEC §9): the stream kept beside each channel, against a real Redis.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

// Publish side

/// A Redis reply, as a raw RESP reader sees it (what `redis-cli` prints).
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Reply::Bulk(Some(b)) => b.clone(),
            Reply::Status(s) => s.clone().into_bytes(),
            other => panic!("not a string: {other:?}"),
        }
    }
    fn text(&self) -> String {
        String::from_utf8(self.bytes()).unwrap()
    }
    fn int(&self) -> i64 {
        match self {
            Reply::Int(n) => *n,
            other => panic!("not an integer: {other:?}"),
        }
    }
    fn items(&self) -> Vec<Reply> {
        match self {
            Reply::Array(Some(items)) => items.clone(),
            other => panic!("not an array: {other:?}"),
        }
    }
}

/// A raw RESP connection to Redis: commands out, replies (and pushes) in, nothing between.
struct Resp {
    stream: BufReader<TcpStream>,
}

impl Resp {
    async fn connect(port: u16) -> Resp {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        Resp {
            stream: BufReader::new(stream),
        }
    }

    async fn send(&mut self, args: &[&[u8]]) {
        let mut wire = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            wire.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            wire.extend_from_slice(arg);
            wire.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&wire).await.unwrap();
    }

    /// The next reply, or `None` when Redis closed the connection.
    async fn read(&mut self) -> Option<Reply> {
        tokio::time::timeout(PATIENCE, read_reply(&mut self.stream))
            .await
            .expect("redis said nothing")
    }

    async fn call(&mut self, args: &[&[u8]]) -> Reply {
        self.send(args).await;
        self.read().await.expect("redis closed the connection")
    }
}

fn read_reply(
    stream: &mut BufReader<TcpStream>,
) -> Pin<Box<dyn Future<Output = Option<Reply>> + Send + '_>> {
    Box::pin(async move {
        let mut line = String::new();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1);
        Some(match kind {
            "+" => Reply::Status(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(rest.parse().unwrap()),
            "$" => match rest.parse::<i64>().unwrap() {
                -1 => Reply::Bulk(None),
                n => {
                    let mut data = vec![0; n as usize + 2];
                    stream.read_exact(&mut data).await.ok()?;
                    data.truncate(n as usize);
                    Reply::Bulk(Some(data))
                }
            },
            "*" => match rest.parse::<i64>().unwrap() {
                -1 => Reply::Array(None),
                n => {
                    let mut items = Vec::new();
                    for _ in 0..n {
                        items.push(read_reply(stream).await?);
                    }
                    Reply::Array(Some(items))
                }
            },
            _ => panic!("not RESP: {line:?}"),
        })
    })
}

/// A stream's entries: (id, the `data` field).
async fn xrange(port: u16, key: &str) -> Vec<(String, Vec<u8>)> {
    let mut redis = Resp::connect(port).await;
    let entries = redis.call(&[b"XRANGE", key.as_bytes(), b"-", b"+"]).await;
    (entries.items().iter())
        .map(|entry| {
            let entry = entry.items();
            let fields = entry[1].items();
            assert_eq!(fields.len(), 2, "one field per entry: {fields:?}");
            assert_eq!(fields[0].text(), "data");
            (entry[0].text(), fields[1].bytes())
        })
        .collect()
}

fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// `calls=` of one command in INFO commandstats (0: never run).
async fn command_calls(port: u16, command: &str) -> u64 {
    let mut redis = Resp::connect(port).await;
    let info = redis.call(&[b"INFO", b"commandstats"]).await.text();
    let prefix = format!("cmdstat_{command}:calls=");
    (info.lines())
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

/// A raw subscriber on a channel and its ids channel, as `redis-cli SUBSCRIBE` would be.
async fn subscribe_with_ids(port: u16, channel: &str) -> Resp {
    let mut sub = Resp::connect(port).await;
    let ids = format!("{channel} ids");
    sub.send(&[b"SUBSCRIBE", ids.as_bytes(), channel.as_bytes()])
        .await;
    for _ in 0..2 {
        let confirmation = sub.read().await.unwrap().items();
        assert_eq!(confirmation[0].text(), "subscribe");
    }
    sub
}

/// What a subscriber of both channels saw: (the ids messages' ids, the channel's payloads),
/// checking that each ids message comes just before as many payloads as it names.
async fn read_published(
    sub: &mut Resp,
    channel: &str,
    count: usize,
) -> (Vec<String>, Vec<Vec<u8>>) {
    let (mut ids, mut payloads, mut owed) = (Vec::new(), Vec::new(), 0);
    while payloads.len() < count {
        let push = sub.read().await.expect("redis closed").items();
        assert_eq!(push[0].text(), "message");
        let from = push[1].text();
        if from == format!("{channel} ids") {
            assert_eq!(
                owed, 0,
                "an ids message before the last batch's payloads ended"
            );
            let batch: Vec<String> = push[2].text().split(' ').map(str::to_string).collect();
            owed = batch.len();
            ids.extend(batch);
        } else {
            assert_eq!(from, channel);
            assert!(owed > 0, "a payload without its ids message just before");
            owed -= 1;
            payloads.push(push[2].bytes());
        }
    }
    assert_eq!(owed, 0);
    (ids, payloads)
}

/// Sends `payloads` (text when UTF-8, else binary) in one go; asserts each ack is `acks`.
async fn publish_acked(ws: &mut Ws, payloads: &[Vec<u8>], acks: &str) {
    for payload in payloads {
        let frame = match String::from_utf8(payload.clone()) {
            Ok(text) => Message::text(text),
            Err(_) => Message::binary(payload.clone()),
        };
        ws.feed(frame).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..payloads.len() {
        assert_eq!(next_text(ws).await, acks, "ack {i}");
    }
}

fn mixed_payloads(from: usize, to: usize) -> Vec<Vec<u8>> {
    (from..to)
        .map(|i| match i % 3 {
            0 => format!("text {i} é ✓").into_bytes(),
            1 => vec![0, 0xff, 0x80, b' ', b'\n', (i % 256) as u8],
            _ => format!("{i}").into_bytes(),
        })
        .collect()
}

/// The stream gets every message of a burst, in order, byte-exact (text and binary), with
/// increasing ids; a plain subscriber sees each batch's ids on `C ids` just before the
/// batch's payloads on `C`, byte-exact, and the ids are the stream's. A POST goes the same way.
#[tokio::test]
async fn a_burst_is_in_the_stream_and_on_the_channel_in_order_byte_exact() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &["--history", "1000"]).await;
    let channel = "lightlevel/burst";
    let mut sub = subscribe_with_ids(redis.port, channel).await;
    let mut ws = connect_ack(&publish.ws("/burst")).await;
    let mut sent = mixed_payloads(0, 300);
    publish_acked(&mut ws, &sent, "1").await;
    let (status, body) = http(publish.addr, "POST", "/burst", &[], b"posted \x00\xff").await;
    assert_eq!(
        (status, &body[..]),
        (200, &b"1\n"[..]),
        "{:?}",
        String::from_utf8_lossy(&body)
    );
    sent.push(b"posted \x00\xff".to_vec());

    let stream = xrange(redis.port, channel).await;
    let data: Vec<Vec<u8>> = stream.iter().map(|(_, data)| data.clone()).collect();
    assert_eq!(
        data, sent,
        "the stream holds every message, in order, byte-exact"
    );
    let mut xlen = Resp::connect(redis.port).await;
    assert_eq!(xlen.call(&[b"XLEN", channel.as_bytes()]).await.int(), 301);
    let stream_ids: Vec<String> = stream.iter().map(|(id, _)| id.clone()).collect();
    assert!(
        stream_ids
            .windows(2)
            .all(|w| parse_id(&w[0]) < parse_id(&w[1])),
        "ids increase"
    );

    let (ids, payloads) = read_published(&mut sub, channel, sent.len()).await;
    assert_eq!(
        payloads, sent,
        "the channel carries the payloads byte-exact"
    );
    assert_eq!(
        ids, stream_ids,
        "the ids messages name the stream's entries"
    );
}

/// `MAXLEN ~ N` keeps at least N and trims the rest in whole nodes; the TTL is set.
#[tokio::test]
async fn the_stream_is_trimmed_to_about_n_and_expires() {
    let redis = Redis::start().await;
    let args = ["--history", "100", "--history-ttl", "1h"];
    let publish = Server::start(Kind::Publish, &redis.url(), &args).await;
    let mut ws = connect_ack(&publish.ws("/trim")).await;
    for round in 0..10 {
        let payloads: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("{}", round * 100 + i).into_bytes())
            .collect();
        publish_acked(&mut ws, &payloads, "0").await;
    }
    let mut redis_cli = Resp::connect(redis.port).await;
    let xlen = redis_cli.call(&[b"XLEN", b"lightlevel/trim"]).await.int();
    assert!(
        (100..=300).contains(&xlen),
        "XLEN {xlen} after 1000 with --history 100"
    );
    let stream = xrange(redis.port, "lightlevel/trim").await;
    assert_eq!(stream.last().unwrap().1, b"999", "the newest are kept");
    let pttl = redis_cli.call(&[b"PTTL", b"lightlevel/trim"]).await.int();
    assert!(pttl > 0 && pttl <= 3_600_000, "PTTL {pttl}");
}

/// Acks carry the channel's subscriber counts, as without history: the ids channel's
/// subscribers are not counted.
#[tokio::test]
async fn acks_count_the_channels_subscribers_as_without_history() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &["--history", "10"]).await;
    let mut ws = connect_ack(&publish.ws("/acks")).await;
    publish_acked(&mut ws, &mixed_payloads(0, 20), "0").await;
    let _both = subscribe_with_ids(redis.port, "lightlevel/acks").await;
    let mut only_ids = Resp::connect(redis.port).await;
    only_ids.send(&[b"SUBSCRIBE", b"lightlevel/acks ids"]).await;
    only_ids.read().await.unwrap();
    let mut plain = Resp::connect(redis.port).await;
    plain.send(&[b"SUBSCRIBE", b"lightlevel/acks"]).await;
    plain.read().await.unwrap();
    publish_acked(&mut ws, &mixed_payloads(20, 120), "2").await;
    let mut redis_cli = Resp::connect(redis.port).await;
    let xlen = redis_cli.call(&[b"XLEN", b"lightlevel/acks"]).await.int();
    assert!(
        xlen >= 10,
        "the batches went through the history script: XLEN {xlen}"
    );
}

/// A Redis that lost its scripts (SCRIPT FLUSH, as after a restart) in the middle of a burst:
/// the batches that met NOSCRIPT are sent again, in order; nothing is lost or doubled, in
/// the stream or on the channel.
#[tokio::test]
async fn a_flushed_script_cache_loses_and_doubles_nothing() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &["--history", "100000"]).await;
    let channel = "lightlevel/flush";
    let mut sub = subscribe_with_ids(redis.port, channel).await;
    let mut ws = connect_ack(&publish.ws("/flush")).await;
    let mut redis_cli = Resp::connect(redis.port).await;
    let sent = mixed_payloads(0, 2000);
    for chunk in sent.chunks(500) {
        for payload in chunk {
            ws.feed(Message::binary(payload.clone())).await.unwrap();
        }
        ws.flush().await.unwrap();
        // While the chunk is in flight (its first ack back, the rest maybe not).
        assert_eq!(next_text(&mut ws).await, "1");
        assert_eq!(redis_cli.call(&[b"SCRIPT", b"FLUSH"]).await.text(), "OK");
        for i in 1..chunk.len() {
            assert_eq!(next_text(&mut ws).await, "1", "ack {i}");
        }
    }
    let data: Vec<Vec<u8>> = (xrange(redis.port, channel).await)
        .into_iter()
        .map(|(_, data)| data)
        .collect();
    assert_eq!(data, sent, "the stream: each message once, in order");
    let (_, payloads) = read_published(&mut sub, channel, sent.len()).await;
    assert_eq!(payloads, sent, "the channel: each message once, in order");
    assert!(command_calls(redis.port, "evalsha").await > 4);
}

/// Redis SIGKILLed in the middle of an acked burst (AOF, fsync always), restarted on the same
/// port and directory: the stream is an in-order prefix of the sequence with no hole and no
/// duplicate, holding every acked message and every message a subscriber saw.
#[tokio::test]
async fn after_a_redis_kill_mid_burst_the_stream_and_the_channel_agree() {
    let port = quiet_port();
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut redis = Redis::start_with(port, &aof).await;
    let channel = "lightlevel/atomic";
    let args = ["--history", "1000000", "--redis-timeout", "2s"];
    let publish = Server::start(Kind::Publish, &redis.url(), &args).await;
    let mut sub = Resp::connect(port).await;
    sub.send(&[b"SUBSCRIBE", channel.as_bytes()]).await;
    sub.read().await.unwrap();
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(push) = sub.read().await {
            seen.push(push.items()[2].text().parse::<u64>().unwrap());
        }
        seen
    });

    let ws = connect_ack(&publish.ws("/atomic")).await;
    let (mut sink, mut acks_in) = ws.split();
    let acked = Arc::new(AtomicUsize::new(0));
    let counting = acked.clone();
    let acks = tokio::spawn(async move {
        while let Some(Ok(frame)) = acks_in.next().await {
            if let Message::Text(_) = frame {
                counting.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let sender = tokio::spawn(async move {
        for i in 0u64..200_000 {
            if sink.send(Message::text(i.to_string())).await.is_err() {
                break;
            }
        }
    });
    eventually(|| async {
        match acked.load(Ordering::SeqCst) {
            n if n >= 3000 => Ok(()),
            n => Err(format!("only {n} acks")),
        }
    })
    .await;
    redis.kill();
    let seen = seen.await.unwrap();
    tokio::time::timeout(PATIENCE, acks).await.unwrap().unwrap();
    sender.abort();
    let acked = acked.load(Ordering::SeqCst);
    redis.restart().await;

    let stream = eventually(|| async {
        let mut redis_cli = Resp::connect(port).await;
        match redis_cli.call(&[b"XLEN", channel.as_bytes()]).await {
            Reply::Int(_) => Ok(xrange(port, channel).await),
            other => Err(format!("redis still loading: {other:?}")),
        }
    })
    .await;
    let numbers: Vec<u64> = (stream.iter())
        .map(|(_, data)| String::from_utf8_lossy(data).parse().unwrap())
        .collect();
    let prefix: Vec<u64> = (0..numbers.len() as u64).collect();
    eprintln!("acked {acked}, kept {}, seen {}", numbers.len(), seen.len());
    assert!(
        numbers == prefix,
        "not an in-order prefix without holes or duplicates"
    );
    assert!(
        numbers.len() >= acked,
        "{acked} acked, {} kept",
        numbers.len()
    );
    assert!(
        seen.len() <= numbers.len(),
        "a subscriber saw what the stream lost"
    );
    assert_eq!(
        seen,
        prefix[..seen.len()],
        "the subscriber saw the stream's order"
    );
}

/// With history off nothing is written and no script runs: the PUBLISHes are today's.
#[tokio::test]
async fn without_history_no_stream_is_written_and_no_script_runs() {
    let redis = Redis::start().await;
    // Presence off: its heartbeat is a key and a script of its own (SPEC §10).
    let publish = Server::start(Kind::Publish, &redis.url(), &["--presence-interval", "0"]).await;
    let mut ws = connect_ack(&publish.ws("/plain")).await;
    let mut plain = Resp::connect(redis.port).await;
    plain.send(&[b"SUBSCRIBE", b"lightlevel/plain"]).await;
    plain.read().await.unwrap();
    let sent = mixed_payloads(0, 50);
    publish_acked(&mut ws, &sent, "1").await;
    for payload in &sent {
        assert_eq!(&plain.read().await.unwrap().items()[2].bytes(), payload);
    }
    let mut redis_cli = Resp::connect(redis.port).await;
    assert_eq!(redis_cli.call(&[b"DBSIZE"]).await.int(), 0, "no key");
    assert_eq!(command_calls(redis.port, "evalsha").await, 0);
    assert_eq!(command_calls(redis.port, "publish").await, 50);
}

// Subscribe side: envelopes, last, since, the gap frame, the seam, resuming a lost
// subscription.

/// A subscribe and a publish server on `redis` with `--history n`.
async fn history_pair(redis_url: &str, n: &str) -> (Server, Server) {
    let publish = Server::start(Kind::Publish, redis_url, &["--history", n]).await;
    let subscribe = Server::start(Kind::Subscribe, redis_url, &["--history", n]).await;
    (publish, subscribe)
}

/// Publish `texts` through a plain WebSocket publisher, then wait until `watch` (a client of
/// the channel) has them: they are in the stream.
async fn publish_all(publish: &Server, path: &str, texts: &[String]) {
    let mut ws = connect_ack(&publish.ws(path)).await;
    for text in texts {
        ws.send(Message::text(text.as_str())).await.unwrap();
    }
    for _ in texts {
        let ack = next_data(&mut ws).await;
        assert!(ack.is_text(), "{ack:?}");
    }
}

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

#[tokio::test]
async fn last_n_gives_the_newest_retained_oldest_first_then_the_live_ones() {
    let redis = Redis::start().await;
    let (publish, subscribe) = history_pair(&redis.url(), "100").await;
    publish_all(&publish, "/last", &numbered(0..10)).await;
    let mut raw = connect(&subscribe.ws("/last?last=3")).await;
    let mut json = connect(&subscribe.ws("/last?last=3&format=json")).await;
    let mut all = connect(&subscribe.ws("/last?last=1000&format=json")).await;
    publish_all(&publish, "/last", &numbered(10..12)).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next_data_text(&mut raw).await);
    }
    assert_eq!(got, ["7", "8", "9", "10", "11"]);
    let mut ids = Vec::new();
    for want in ["7", "8", "9", "10", "11"] {
        let envelope = json_of(next_data(&mut json).await);
        assert_eq!(envelope["channel"], "lightlevel/last");
        assert_eq!(envelope["data"], want);
        ids.push(envelope["id"].as_str().expect("an id").to_string());
    }
    let stream: Vec<String> = xrange(redis.port, "lightlevel/last")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, stream[7..12], "the ids are the stream's");
    for want in 0..12 {
        assert_eq!(json_of(next_data(&mut all).await)["data"], want.to_string());
    }
    for ws in [&mut raw, &mut json, &mut all] {
        assert!(sync(ws).await.is_empty(), "nothing twice");
    }
}

#[tokio::test]
async fn since_gives_what_followed_the_id_and_an_id_no_longer_retained_starts_with_a_gap() {
    let redis = Redis::start().await;
    // Exact trimming needs MAXLEN without ~; with ~ Redis keeps at least 5: trim a lot.
    let (publish, subscribe) = history_pair(&redis.url(), "5").await;
    publish_all(&publish, "/since", &numbered(0..3)).await;
    let first = xrange(redis.port, "lightlevel/since").await;
    let mut ws = connect(&subscribe.ws(&format!("/since?format=json&since={}", first[0].0))).await;
    assert_eq!(json_of(next_data(&mut ws).await)["data"], "1");
    assert_eq!(json_of(next_data(&mut ws).await)["data"], "2");
    assert!(sync(&mut ws).await.is_empty());
    drop(ws);

    publish_all(&publish, "/since", &numbered(3..400)).await;
    let retained = xrange(redis.port, "lightlevel/since").await;
    assert!(retained.len() < 300, "trimmed: {}", retained.len());
    let mut ws = connect(&subscribe.ws(&format!("/since?format=json&since={}", first[2].0))).await;
    let gap = json_of(next_data(&mut ws).await);
    assert_eq!(
        gap,
        serde_json::json!({"gap":{"after": first[2].0, "oldest": retained[0].0}})
    );
    let oldest: usize = String::from_utf8(retained[0].1.clone())
        .unwrap()
        .parse()
        .unwrap();
    for want in oldest..400 {
        assert_eq!(json_of(next_data(&mut ws).await)["data"], want.to_string());
    }
    assert!(sync(&mut ws).await.is_empty());
}

#[tokio::test]
async fn since_needs_json_and_without_history_is_a_gap_with_no_oldest() {
    let redis = Redis::start().await;
    let subscribe = Server::start(Kind::Subscribe, &redis.url(), &[]).await;
    let (status, body) = upgrade_status(subscribe.addr, "/x?since=1-0").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("format=json"), "{body}");
    let (status, body) = upgrade_status(subscribe.addr, "/x?format=json&since=yesterday").await;
    assert_eq!(status, 400, "{body}");
    let mut ws = connect(&subscribe.ws("/x?format=json&since=5-0")).await;
    assert_eq!(
        json_of(next_data(&mut ws).await),
        serde_json::json!({"gap":{"after":"5-0","oldest":null}})
    );
    // And `last` without history: nothing retained, the live ones.
    let mut last = connect(&subscribe.ws("/x?last=5")).await;
    redis.publish("lightlevel/x", "live").await;
    assert_eq!(next_data_text(&mut last).await, "live");
}

#[tokio::test]
async fn a_plain_redis_publish_reaches_every_subscriber_and_has_a_null_id() {
    let redis = Redis::start().await;
    let (publish, subscribe) = history_pair(&redis.url(), "10").await;
    let mut raw = connect(&subscribe.ws("/mixed")).await;
    let mut json = connect(&subscribe.ws("/mixed?format=json")).await;
    publish_all(&publish, "/mixed", &["via relay".to_string()]).await;
    // One receiver: the subscribe server's one subscription, whatever its clients.
    assert_eq!(redis.publish("lightlevel/mixed", "via redis-cli").await, 1);
    let mut bytes = connect_ack(&publish.ws("/mixed")).await;
    bytes
        .send(Message::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    assert!(next_data(&mut bytes).await.is_text());
    assert_eq!(next_data_text(&mut raw).await, "via relay");
    assert_eq!(next_data_text(&mut raw).await, "via redis-cli");
    assert_eq!(
        next_data(&mut raw).await,
        Message::binary(vec![0u8, 159, 146, 150])
    );
    let a = json_of(next_data(&mut json).await);
    assert_eq!(a["data"], "via relay");
    assert!(a["id"].is_string(), "{a}");
    let b = json_of(next_data(&mut json).await);
    assert_eq!(
        b,
        serde_json::json!({"channel":"lightlevel/mixed","id":null,"data":"via redis-cli"})
    );
    let c = json_of(next_data(&mut json).await);
    assert_eq!(
        (c["data"].as_str(), c["encoding"].as_str()),
        (Some("AJ+Slg=="), Some("base64"))
    );
    assert!(c["id"].as_str().unwrap() > a["id"].as_str().unwrap());
}

/// The seam under load: a publisher sends a numbered sequence at a steady rate while
/// clients connect with `last`, read a while, and come back with `since` the last id they
/// saw. Each client's whole run, across its reconnects, is contiguous: no gap, no duplicate.
#[tokio::test]
async fn clients_joining_and_resuming_under_load_see_a_contiguous_run() {
    const CLIENTS: usize = 12;
    const CYCLES: usize = 4;
    let redis = Redis::start().await;
    let (publish, subscribe) = history_pair(&redis.url(), "100000").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = tokio::spawn({
        let (url, stop) = (publish.ws("/seam"), stop.clone());
        async move {
            let mut ws = connect(&url).await;
            let mut n = 0u64;
            // Bounded: at most 30 s and 120,000 messages, ~4,000 a second.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && n < 120_000
                && tokio::time::Instant::now() < deadline
            {
                for _ in 0..20 {
                    ws.send(Message::text(n.to_string())).await.unwrap();
                    n += 1;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            n
        }
    });
    // Let the stream fill a little first.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let url = subscribe.ws("/seam");
        clients.push(tokio::spawn(async move {
            let mut seen: Vec<u64> = Vec::new();
            let mut last_id: Option<String> = None;
            for cycle in 0..CYCLES {
                let query = match &last_id {
                    None => "?format=json&last=5".to_string(),
                    Some(id) => format!("?format=json&since={id}"),
                };
                let mut ws = connect(&format!("{url}{query}")).await;
                for _ in 0..(50 + 37 * ((c + cycle) % 5)) {
                    let envelope = json_of(next_data(&mut ws).await);
                    assert!(envelope.get("gap").is_none(), "client {c}: {envelope}");
                    seen.push(envelope["data"].as_str().unwrap().parse().unwrap());
                    last_id = Some(envelope["id"].as_str().unwrap().to_string());
                }
            }
            seen
        }));
    }
    for (c, client) in clients.into_iter().enumerate() {
        let seen = client.await.unwrap();
        let first = seen[0];
        let want: Vec<u64> = (first..first + seen.len() as u64).collect();
        assert_eq!(seen, want, "client {c}: not one contiguous run");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(publisher.await.unwrap() > 0);
}

/// The restart gap: Redis is killed under an acknowledged publisher, restarted, and the
/// publish relay gets there first and flushes its held backlog before the subscribe relay
/// has subscribed again. With history, the subscribe relay resumes the channel from the last
/// id it delivered: the backlog arrives, once and in order, without the clients
/// reconnecting; a JSON client is told first that what came before the restart is not
/// retained (the restarted Redis has no persistence).
#[tokio::test]
async fn a_redis_restart_loses_no_acknowledged_backlog_with_history() {
    let mut redis = Redis::start().await;
    let pub_gate = Gate::start(redis.port).await;
    let sub_gate = Gate::start(redis.port).await;
    let common = [
        "--history",
        "10000",
        "--ping-interval",
        "1s",
        "--redis-timeout",
        "30s",
    ];
    let publish = Server::start(Kind::Publish, &pub_gate.url(), &common).await;
    let subscribe = Server::start(Kind::Subscribe, &sub_gate.url(), &common).await;
    let mut raw = connect(&subscribe.ws("/backlog")).await;
    let mut json = connect(&subscribe.ws("/backlog?format=json")).await;
    let mut publisher = connect_ack(&publish.ws("/backlog")).await;
    for i in 0..10 {
        publisher.send(Message::text(i.to_string())).await.unwrap();
    }
    for _ in 0..10 {
        assert_eq!(next_data_text(&mut publisher).await, "1");
    }
    for i in 0..10 {
        assert_eq!(next_data_text(&mut raw).await, i.to_string());
        assert_eq!(json_of(next_data(&mut json).await)["data"], i.to_string());
    }

    pub_gate.set_open(false);
    sub_gate.set_open(false);
    redis.kill();
    // Sent once the relay knows Redis is gone, they are held, not written into a dying
    // connection (whose outcome would be unknown: a 1013, see tests/redis_outage.rs).
    publish.wait_health(503).await;
    for i in 10..300 {
        publisher.send(Message::text(i.to_string())).await.unwrap();
    }
    redis.restart().await;
    // The publish relay reaches Redis first and flushes what it held: all acknowledged,
    // and no subscriber was there to receive them live.
    pub_gate.set_open(true);
    for _ in 10..300 {
        assert_eq!(next_data_text(&mut publisher).await, "0");
    }
    sub_gate.set_open(true);
    redis.wait_numsub("lightlevel/backlog", 1).await;
    publisher.send(Message::text("after")).await.unwrap();

    let want: Vec<String> = (10..300)
        .map(|i| i.to_string())
        .chain(["after".into()])
        .collect();
    let mut got = Vec::new();
    for _ in &want {
        got.push(next_data_text(&mut raw).await);
    }
    assert_eq!(got, want, "the raw client");
    let gap = json_of(next_data(&mut json).await);
    assert!(gap["gap"]["after"].is_string(), "{gap}");
    let mut got = Vec::new();
    for _ in &want {
        got.push(
            json_of(next_data(&mut json).await)["data"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(got, want, "the JSON client");
    assert!(subscribe.metric("lightrelay_resumed_total").await >= 290.0);
    for ws in [&mut raw, &mut json] {
        assert!(sync(ws).await.is_empty(), "nothing twice");
    }
}

/// A window's batch sent with nothing of its own in flight loads the script in the same
/// pipeline, so no batch ever meets NOSCRIPT in the normal course (first use, a restarted
/// Redis): another client's reload can then never let a later batch of a window run before
/// an earlier one that met NOSCRIPT.
#[tokio::test]
async fn batches_never_meet_noscript_on_a_fresh_redis() {
    let redis = Redis::start().await;
    let publish = Server::start(Kind::Publish, &redis.url(), &["--history", "100"]).await;
    for path in ["/a", "/b", "/c"] {
        publish_all(&publish, path, &numbered(0..50)).await;
    }
    let mut resp = Resp::connect(redis.port).await;
    let errors = resp.call(&[b"INFO", b"errorstats"]).await.text();
    assert!(!errors.contains("NOSCRIPT"), "{errors}");
    assert!(command_calls(redis.port, "evalsha").await > 0);
}

/// `CLIENT KILL TYPE pubsub` under a steady numbered stream: each kill costs the subscribe
/// server its subscription, and with history it resumes every time from the last id it
/// delivered, so the client (which never reconnects) sees one contiguous run.
#[tokio::test]
async fn a_killed_subscription_resumes_under_load_with_nothing_missed_or_doubled() {
    let redis = Redis::start().await;
    let (publish, subscribe) = history_pair(&redis.url(), "100000").await;
    let mut raw = connect(&subscribe.ws("/killed")).await;
    let mut publisher = connect_ack(&publish.ws("/killed")).await;
    let killer = redis.client().await;
    let kill = || {
        let killer = killer.clone();
        async move {
            let command = fred::types::CustomCommand::new_static("CLIENT", None, false);
            let killed: i64 = fred::interfaces::ClientLike::custom(
                &killer,
                command,
                vec!["KILL", "TYPE", "pubsub"],
            )
            .await
            .unwrap();
            killed
        }
    };
    const TOTAL: usize = 3_000;
    let mut kills = 0;
    for i in 0..TOTAL {
        publisher.send(Message::text(i.to_string())).await.unwrap();
        if i % 20 == 19 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        if i % 1_000 == 500 {
            kills += kill().await;
        }
    }
    // Each kill also takes the publish server's downlink subscription (a pubsub client too).
    assert!(
        kills >= 3,
        "three kills of the subscribe server's subscription: {kills}"
    );
    for i in 0..TOTAL {
        assert_eq!(
            next_data_text(&mut raw).await,
            i.to_string(),
            "in order, none missed"
        );
    }
    assert!(sync(&mut raw).await.is_empty(), "nothing twice");
    assert!(subscribe.metric("lightrelay_resubscribed_total").await >= 3.0);
    drop(publisher);
}
