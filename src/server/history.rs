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
//! In a cluster (SPEC §11) the script SPUBLISHes ([`script`]) and the ids channel is named
//! so that it hashes to the channel's slot ([`ids_channel`]): one script, one slot, one shard.
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

/// The script in cluster mode (SPEC §11): the same, with SPUBLISH (sharded pub/sub), so the
/// ids and the messages go out on the shard that owns the channel's slot, where its
/// subscribers are. The ids channel shares the channel's slot ([`ids_channel`]).
pub(crate) fn script(sharded: bool) -> String {
    if sharded {
        SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
    } else {
        SCRIPT.to_string()
    }
}

/// What follows `{C}` in the ids channel of a channel `C` that has no hash tag of its own
/// (cluster mode): not ` ids`, so that it never equals the ids channel of a channel that is
/// itself `{C}`.
const WRAPPED_SUFFIX: &[u8] = b"} sids";

/// What follows `C` in the ids channel of a channel that holds a `}` but no hash tag
/// (cluster mode), before the two bytes that bring its slot to `C`'s.
const PADDED_SUFFIX: &[u8] = b" xids";

/// The hash tag Redis hashes in `name`, if it has one: between the first `{` and the first
/// `}` after it, when that is not empty.
fn hash_tag(name: &[u8]) -> Option<&[u8]> {
    let open = name.iter().position(|&b| b == b'{')?;
    let close = name[open + 1..].iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &name[open + 1..open + 1 + close])
}

/// The ids channel of `channel`: `C + " ids"` on one Redis. In a cluster (`sharded`) the
/// script publishes it on the channel's slot, so it must hash to that slot: `C + " ids"`
/// when `C` has a hash tag (it keeps it); else `{C} sids` when `C` holds no `}`; else
/// `C + " xids"` and two bytes (neither `{` nor `}`) that bring its CRC16 slot to `C`'s.
pub(crate) fn ids_channel(channel: &ChannelName, sharded: bool) -> Bytes {
    let name = channel.to_bytes();
    let mut out = BytesMut::with_capacity(name.len() + 8);
    if !sharded || hash_tag(&name).is_some() {
        out.put_slice(&name);
        out.put_slice(IDS_SUFFIX);
    } else if !name.contains(&b'}') {
        out.put_u8(b'{');
        out.put_slice(&name);
        out.put_slice(WRAPPED_SUFFIX);
    } else {
        out.put_slice(&name);
        out.put_slice(PADDED_SUFFIX);
        let want = crate::redis::slot(&name);
        let len = out.len();
        out.put_slice(b"  ");
        // CRC16 over two appended bytes reaches every value: the search always ends, at
        // worst after 64,516 checksums of a short name (only such odd names pay it).
        'search: for a in (0..=255u8).filter(|b| !b"{}".contains(b)) {
            for b in (0..=255u8).filter(|b| !b"{}".contains(b)) {
                out[len] = a;
                out[len + 1] = b;
                if crate::redis::slot(&out) == want {
                    break 'search;
                }
            }
        }
    }
    out.freeze()
}

/// The channel whose ids channel is `name`, if `name` is one (of either mode: the three forms
/// of [`ids_channel`] end differently, and no channel made from a path holds a space).
pub(crate) fn channel_of_ids(name: &Bytes) -> Option<ChannelName> {
    if name.ends_with(IDS_SUFFIX) {
        return Some(ChannelName::from_redis(
            name.slice(..name.len() - IDS_SUFFIX.len()),
        ));
    }
    if name.starts_with(b"{")
        && name.ends_with(WRAPPED_SUFFIX)
        && name.len() > 1 + WRAPPED_SUFFIX.len()
    {
        return Some(ChannelName::from_redis(
            name.slice(1..name.len() - WRAPPED_SUFFIX.len()),
        ));
    }
    let padded = PADDED_SUFFIX.len() + 2;
    (name.len() > padded && &name[name.len() - padded..name.len() - 2] == PADDED_SUFFIX)
        .then(|| ChannelName::from_redis(name.slice(..name.len() - padded)))
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
        let ids = ids_channel(&channel, false);
        assert_eq!(&ids[..], b"lightlevel/office ids");
        assert_eq!(channel_of_ids(&ids), Some(channel.clone()));
        assert_eq!(channel_of_ids(&channel.to_bytes()), None);
        assert!(ChannelName::from_target("lightlevel", "/office ids", 256).is_err());
    }

    /// In a cluster the script's keys and the channels it SPUBLISHes must share a slot: the
    /// ids channel of every channel, however it uses `{` and `}`, hashes to the channel's
    /// slot (CRC16, as Redis computes it), names its channel back, and differs from every
    /// other channel's ids channel.
    #[test]
    fn in_a_cluster_an_ids_channel_hashes_to_its_channels_slot() {
        let names: &[&[u8]] = &[
            b"lightlevel/office",
            b"lightlevel/{office}",
            b"{office}",
            b"lightlevel/{office}/{desk}",
            b"lightlevel/{}office",
            b"lightlevel/{}",
            b"lightlevel/}office",
            b"lightlevel/}{office",
            b"lightlevel/{office",
            b"lightlevel/office}",
            b"lightlevel/{}}",
            b"}",
            b"{",
            b"{}",
            b"{} s",
            b"a{b}c}d",
            b"x}",
            b"x} s",
        ];
        let mut seen = std::collections::HashSet::new();
        for &name in names {
            let channel = ChannelName::from_redis(Bytes::from_static(name));
            let ids = ids_channel(&channel, true);
            let shown = String::from_utf8_lossy(name);
            assert_eq!(
                crate::redis::slot(&ids),
                crate::redis::slot(name),
                "{shown}: ids channel {ids:?} is on another slot"
            );
            assert_eq!(
                channel_of_ids(&ids),
                Some(channel.clone()),
                "{shown}: {ids:?}"
            );
            assert_eq!(channel_of_ids(&channel.to_bytes()), None, "{shown}");
            assert!(seen.insert(ids.clone()), "{shown}: {ids:?} named twice");
        }
        // Known slots (Redis's CLUSTER KEYSLOT): a tag is hashed alone.
        assert_eq!(
            crate::redis::slot(b"{office}x"),
            crate::redis::slot(b"office")
        );
        assert_eq!(crate::redis::slot(b"foo"), 12182);
    }
}
