//! Reading what a channel's stream retains (SPEC §9), for `?last=`, `?since=` and resuming a
//! lost subscription.
//!
//! Owns: the two reads, each one XREVRANGE (newest first, reversed here): the last N entries,
//! and the entries after an id, inclusive of the id itself so that whether the reader's
//! last id is still retained (no gap) or not (a gap, with the oldest entry that is) is known
//! from the same answer.
//! Must not: push to clients or decide the seam; the hub does, with what these return.

use std::time::Duration;

use bytes::Bytes;
use fred::clients::Client;
use fred::interfaces::{ClientLike, StreamsInterface};
use fred::types::Value;

use crate::server::channel::ChannelName;
use crate::server::history::{StreamId, DATA_FIELD};

/// One retained message.
pub(crate) type Entry = (StreamId, Bytes);

/// What a read after an id found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct After {
    /// Oldest first, every one newer than the id.
    pub entries: Vec<Entry>,
    /// The id was not retained (trimmed, expired, or more came than the read may hold): what
    /// follows it starts at this entry (None: nothing is retained).
    pub gap: Option<Option<StreamId>>,
}

/// A read that takes longer than `patience` fails: the hub waits for it between two
/// messages, and must not stall every channel's fan-out on one slow read.
async fn bounded(
    patience: Duration,
    read: impl std::future::Future<Output = Result<Value, fred::error::Error>>,
) -> Result<Value, fred::error::Error> {
    tokio::time::timeout(patience, read)
        .await
        .unwrap_or_else(|_| {
            Err(fred::error::Error::new(
                fred::error::ErrorKind::Timeout,
                format!("no answer within {patience:?}"),
            ))
        })
}

/// A read may be written more than once: it changes nothing. fred 10.1.0 counts the write
/// after a MOVED or ASK (a slot that moved, in a cluster) as an attempt (`router/commands.rs`,
/// `write_command`), so with the connections' single attempt a redirected read would fail.
fn read_options() -> fred::types::config::Options {
    fred::types::config::Options {
        max_attempts: Some(3),
        ..Default::default()
    }
}

/// The last `n` entries of `channel`'s stream, oldest first.
pub(crate) async fn last(
    reader: &Client,
    channel: &ChannelName,
    n: usize,
    patience: Duration,
) -> Result<Vec<Entry>, fred::error::Error> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let value = bounded(
        patience,
        reader.with_options(&read_options()).xrevrange(
            channel.to_bytes(),
            "+",
            "-",
            Some(n as u64),
        ),
    )
    .await?;
    let mut entries = entries_of(value);
    entries.reverse();
    Ok(entries)
}

/// Up to `limit` entries of `channel`'s stream after `after` (the newest ones, if more are
/// retained), oldest first, and whether some between `after` and them are missing.
pub(crate) async fn after(
    reader: &Client,
    channel: &ChannelName,
    after: StreamId,
    limit: usize,
    patience: Duration,
) -> Result<After, fred::error::Error> {
    let value = bounded(
        patience,
        reader.with_options(&read_options()).xrevrange(
            channel.to_bytes(),
            "+",
            after.to_string(),
            Some(limit as u64 + 1),
        ),
    )
    .await?;
    Ok(split_after(entries_of(value), after, limit))
}

/// `newest_first` holds up to `limit + 1` entries from `after` (inclusive) on.
fn split_after(mut newest_first: Vec<Entry>, after: StreamId, limit: usize) -> After {
    newest_first.reverse();
    let mut entries = newest_first;
    let gap = match entries.first() {
        Some((oldest, _)) if *oldest == after => {
            entries.remove(0);
            None
        }
        _ => {
            if entries.len() > limit {
                entries.remove(0);
            }
            Some(entries.first().map(|(id, _)| *id))
        }
    };
    After { entries, gap }
}

/// XRANGE's answer: `[[id, [field, value, …]], …]`; anything else is skipped.
fn entries_of(value: Value) -> Vec<Entry> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut pair) = item else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id: StreamId = pair.pop()?.as_str()?.parse().ok()?;
            let fields = match fields {
                Value::Array(fields) => fields,
                _ => return None,
            };
            let mut fields = fields.into_iter();
            while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                if name.as_str().as_deref() == Some(DATA_FIELD) {
                    return value.into_bytes().map(|data| (id, data));
                }
            }
            None
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(ms: u64) -> Entry {
        (StreamId { ms, seq: 0 }, Bytes::from(ms.to_string()))
    }
    fn id(ms: u64) -> StreamId {
        StreamId { ms, seq: 0 }
    }

    #[test]
    fn a_retained_id_gives_what_follows_it_and_no_gap() {
        let read = split_after(vec![e(7), e(6), e(5)], id(5), 10);
        assert_eq!(read.entries, vec![e(6), e(7)]);
        assert_eq!(read.gap, None);
    }

    #[test]
    fn an_id_no_longer_retained_is_a_gap_starting_at_the_oldest_retained() {
        let read = split_after(vec![e(9), e(8)], id(5), 10);
        assert_eq!(read.entries, vec![e(8), e(9)]);
        assert_eq!(read.gap, Some(Some(id(8))));
        assert_eq!(split_after(vec![], id(5), 10).gap, Some(None));
    }

    #[test]
    fn more_than_the_limit_keeps_the_newest_and_says_what_was_skipped() {
        // limit 2: the read asked for 3 from id 5 on and 5 was not among them.
        let read = split_after(vec![e(9), e(8), e(7)], id(5), 2);
        assert_eq!(read.entries, vec![e(8), e(9)]);
        assert_eq!(read.gap, Some(Some(id(8))));
    }

    #[test]
    fn xrange_answers_are_parsed_and_other_fields_ignored() {
        let value = Value::Array(vec![
            Value::Array(vec![
                Value::String("17-1".into()),
                Value::Array(vec![
                    Value::String("data".into()),
                    Value::Bytes(Bytes::from_static(&[0, 255])),
                ]),
            ]),
            Value::Array(vec![
                Value::String("18-0".into()),
                Value::Array(vec![
                    Value::String("other".into()),
                    Value::String("x".into()),
                ]),
            ]),
        ]);
        assert_eq!(
            entries_of(value),
            vec![(StreamId { ms: 17, seq: 1 }, Bytes::from_static(&[0, 255]))]
        );
    }
}
