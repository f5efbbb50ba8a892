//! History (SPEC §9): what the publish and subscribe servers agree on about the stream kept
//! beside each channel.
//!
//! Owns: the names (the stream of channel `C` is the Redis key `C`; the ids of what the
//! script published on `C` go out first on the channel `C + IDS_SUFFIX`), the script that
//! writes a batch atomically ([`SCRIPT`]), and [`StreamId`] (parse, print, order).
//!
//! The script, for one batch of one channel: XADD every message (`MAXLEN ~ N`), set the
//! key's TTL, PUBLISH the batch's ids (space-separated, in order) on the ids channel, then
//! PUBLISH every message on the channel itself, byte-exact. A script runs atomically, so a
//! subscriber connection subscribed to both channels receives the ids message immediately
//! followed by the batch's messages: that is how the subscribe side learns each live
//! message's id without changing what `redis-cli SUBSCRIBE` shows. A message published on
//! the channel without a preceding ids message (a plain `redis-cli PUBLISH`) has no id.
//!
//! Must not: talk to Redis or know about connections; it only names and parses.

use std::fmt;
use std::str::FromStr;

use bytes::{BufMut, Bytes, BytesMut};

use super::channel::ChannelName;

/// What follows a channel's name in the name of its ids channel. A space: no channel made
/// from a request path holds one (paths are 0x21–0x7E), so no path can name an ids channel.
pub(crate) const IDS_SUFFIX: &[u8] = b" ids";

/// The field each stream entry keeps its payload in (`XRANGE C - +` shows `data`).
pub(crate) const DATA_FIELD: &str = "data";

/// The batch script. KEYS[1]: the channel, which is also the stream's key. ARGV[1]: MAXLEN
/// (approximate), ARGV[2]: TTL in milliseconds (0: none), ARGV[3]: the ids channel,
/// ARGV[4..]: the payloads. Returns each PUBLISH's receiver count, in order.
/// `#!lua` (no flags): Redis refuses the whole script before it starts when it is out of
/// memory, rather than after some of its writes.
pub(crate) const SCRIPT: &str = r#"#!lua
local key, maxlen, ttl, ids_channel = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local ids = {}
for i = 4, #ARGV do
  ids[#ids + 1] = redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'data', ARGV[i])
end
if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
redis.call('PUBLISH', ids_channel, table.concat(ids, ' '))
local counts = {}
for i = 4, #ARGV do
  counts[#counts + 1] = redis.call('PUBLISH', key, ARGV[i])
end
return counts
"#;

/// The ids channel of `channel`.
pub(crate) fn ids_channel(channel: &ChannelName) -> Bytes {
    let name = channel.to_bytes();
    let mut out = BytesMut::with_capacity(name.len() + IDS_SUFFIX.len());
    out.put_slice(&name);
    out.put_slice(IDS_SUFFIX);
    out.freeze()
}

/// The channel whose ids channel is `name`, if `name` is one.
pub(crate) fn channel_of_ids(name: &Bytes) -> Option<ChannelName> {
    name.ends_with(IDS_SUFFIX)
        .then(|| ChannelName::from_redis(name.slice(..name.len() - IDS_SUFFIX.len())))
}

/// A Redis stream entry id, `MS-SEQ`, ordered as Redis orders them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Why a `since` id was refused (the 400's reason).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a stream id (MS-SEQ, e.g. 1700000000000-0)")]
pub(crate) struct BadStreamId(pub String);

impl FromStr for StreamId {
    type Err = BadStreamId;

    /// `MS-SEQ`, or `MS` alone (= `MS-0`), as Redis accepts them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadStreamId(s.chars().take(64).collect());
        let digits = |t: &str| -> Option<u64> {
            (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse().ok())
                .flatten()
        };
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (digits(ms).ok_or_else(bad)?, digits(seq).ok_or_else(bad)?),
            None => (digits(s).ok_or_else(bad)?, 0),
        };
        Ok(StreamId { ms, seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_parse_print_and_order_as_redis_does() {
        let a: StreamId = "1700000000000-5".parse().unwrap();
        assert_eq!(a.to_string(), "1700000000000-5");
        assert_eq!(
            "17".parse::<StreamId>().unwrap(),
            StreamId { ms: 17, seq: 0 }
        );
        assert!(
            a < "1700000000000-10".parse().unwrap(),
            "numeric, not textual"
        );
        assert!(a < "1700000000001-0".parse().unwrap());
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "+1-0",
            "1 -0",
            "99999999999999999999-0",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn an_ids_channel_names_its_channel_and_no_path_can_name_one() {
        let channel = ChannelName::from_target("lightlevel", "/office", 256).unwrap();
        let ids = ids_channel(&channel);
        assert_eq!(&ids[..], b"lightlevel/office ids");
        assert_eq!(channel_of_ids(&ids), Some(channel.clone()));
        assert_eq!(channel_of_ids(&channel.to_bytes()), None);
        assert!(ChannelName::from_target("lightlevel", "/office ids", 256).is_err());
    }
}
