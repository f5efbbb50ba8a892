//! The JSON frames of `?format=json` (SPEC §9): a message's envelope and the gap notice.
//!
//! Owns: their exact text. `{"channel":C,"id":ID|null,"data":TEXT}` for a UTF-8 payload,
//! `{"channel":C,"id":ID|null,"data":BASE64,"encoding":"base64"}` for any other;
//! `{"gap":{"after":ID,"oldest":ID|null}}`. An envelope is built once per message and shared
//! by every JSON subscriber of the topic, like a raw frame.
//! Must not: know about subscribers, Redis or sockets.

use base64::Engine;
use bytes::Bytes;
use tokio_tungstenite::tungstenite::{protocol::frame::Utf8Bytes, Message};

use crate::server::history::StreamId;

/// The envelope of `payload` (a text or binary frame) published on `channel`.
pub(crate) fn envelope(channel: &[u8], id: Option<StreamId>, payload: &Message) -> Message {
    let mut out = String::with_capacity(payload.len() + channel.len() + 64);
    out.push_str("{\"channel\":");
    push_json_string(&mut out, &String::from_utf8_lossy(channel));
    out.push_str(",\"id\":");
    push_id(&mut out, id);
    out.push_str(",\"data\":");
    match payload {
        Message::Text(text) => push_json_string(&mut out, text.as_str()),
        other => {
            out.push('"');
            base64::engine::general_purpose::STANDARD
                .encode_string(other.clone().into_data(), &mut out);
            out.push_str("\",\"encoding\":\"base64\"");
        }
    }
    out.push('}');
    text_frame(out)
}

/// The first frame of a replay that could not start right after `after`: what is retained
/// starts at `oldest` (or nothing is, or history is off: null).
pub(crate) fn gap(after: StreamId, oldest: Option<StreamId>) -> Message {
    let mut out = String::with_capacity(80);
    out.push_str("{\"gap\":{\"after\":");
    push_id(&mut out, Some(after));
    out.push_str(",\"oldest\":");
    push_id(&mut out, oldest);
    out.push_str("}}");
    text_frame(out)
}

fn push_id(out: &mut String, id: Option<StreamId>) {
    use std::fmt::Write;
    match id {
        Some(id) => {
            let _ = write!(out, "\"{id}\"");
        }
        None => out.push_str("null"),
    }
}

fn push_json_string(out: &mut String, s: &str) {
    // serde_json's escaping, written straight into the frame's buffer.
    let quoted = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    out.push_str(&quoted);
}

fn text_frame(text: String) -> Message {
    Message::Text(Utf8Bytes::from(text))
}

/// A payload's frame: text when it is valid UTF-8, binary otherwise (as Redis sent it).
pub(crate) fn payload_frame(payload: Bytes) -> Message {
    match Utf8Bytes::try_from(payload.clone()) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Binary(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(frame: &Message) -> serde_json::Value {
        serde_json::from_str(frame.to_text().unwrap()).unwrap()
    }

    #[test]
    fn text_and_binary_payloads_have_their_envelopes() {
        let id = Some(StreamId { ms: 17, seq: 2 });
        let text = envelope(b"lightlevel/a", id, &Message::text("x \"y\"\n\u{e9}"));
        assert_eq!(
            json(&text),
            serde_json::json!({"channel":"lightlevel/a","id":"17-2","data":"x \"y\"\n\u{e9}"})
        );
        let binary = envelope(b"lightlevel/a", None, &Message::binary(vec![0u8, 255, 7]));
        assert_eq!(
            json(&binary),
            serde_json::json!({"channel":"lightlevel/a","id":null,"data":"AP8H","encoding":"base64"})
        );
    }

    #[test]
    fn a_gap_says_after_what_and_where_history_starts() {
        let after = StreamId { ms: 5, seq: 0 };
        assert_eq!(
            json(&gap(after, Some(StreamId { ms: 9, seq: 1 }))),
            serde_json::json!({"gap":{"after":"5-0","oldest":"9-1"}})
        );
        assert_eq!(
            json(&gap(after, None)),
            serde_json::json!({"gap":{"after":"5-0","oldest":null}})
        );
    }
}
