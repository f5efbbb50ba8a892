//! Channel mapping: `channel = PREFIX + PATH` (SPEC §2).
//!
//! Owns: turning a request target into a Redis channel name, and refusing paths that are too
//! long or hold bytes outside 0x21–0x7E. Must not: percent-decode or normalise the path
//! (what the client sent is what `redis-cli` sees), or know about HTTP or Redis clients.

use std::fmt;

use bytes::Bytes;

/// A Redis channel name, always `PREFIX + PATH`. Cheap to clone (shared bytes).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Bytes);

/// Why a request path cannot name a channel. Its text is the one-line reason of the 400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path is {len} bytes, longer than the limit of {max} (--max-path-bytes)")]
    TooLong { len: usize, max: usize },
    #[error("path holds byte 0x{byte:02X} at offset {offset}; only printable ASCII (0x21-0x7E) is allowed")]
    BadByte { byte: u8, offset: usize },
    #[error("path must start with '/'")]
    NotAbsolute,
}

impl ChannelName {
    /// Map a request target (`/office/desk?x=1`) to its channel (`lightlevel/office/desk`).
    pub fn from_target(
        prefix: &str,
        target: &str,
        max_path_bytes: usize,
    ) -> Result<Self, PathError> {
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        let path = if path.is_empty() { "/" } else { path };
        if !path.starts_with('/') {
            return Err(PathError::NotAbsolute);
        }
        if path.len() > max_path_bytes {
            return Err(PathError::TooLong {
                len: path.len(),
                max: max_path_bytes,
            });
        }
        if let Some((offset, &byte)) = path
            .as_bytes()
            .iter()
            .enumerate()
            .find(|(_, b)| !(0x21..=0x7E).contains(*b))
        {
            return Err(PathError::BadByte { byte, offset });
        }
        let mut name = Vec::with_capacity(prefix.len() + path.len());
        name.extend_from_slice(prefix.as_bytes());
        name.extend_from_slice(path.as_bytes());
        Ok(ChannelName(Bytes::from(name)))
    }

    /// This channel's name followed by `suffix`: its downlink channel (`--downlink-suffix`,
    /// SPEC §10).
    pub fn with_suffix(&self, suffix: &str) -> Self {
        let mut name = Vec::with_capacity(self.0.len() + suffix.len());
        name.extend_from_slice(&self.0);
        name.extend_from_slice(suffix.as_bytes());
        ChannelName(Bytes::from(name))
    }

    /// A channel name as Redis sent it (used for incoming pub/sub messages).
    pub fn from_redis(name: Bytes) -> Self {
        ChannelName(name)
    }

    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }
}

impl std::borrow::Borrow<[u8]> for ChannelName {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(target: &str) -> Result<String, PathError> {
        ChannelName::from_target("lightlevel", target, 256).map(|c| c.to_string())
    }

    #[test]
    fn path_is_appended_exactly_without_query_or_decoding() {
        assert_eq!(map("/office/desk").unwrap(), "lightlevel/office/desk");
        assert_eq!(map("/").unwrap(), "lightlevel/");
        assert_eq!(map("/a%20b?token=x").unwrap(), "lightlevel/a%20b");
        assert_eq!(map("/a/../b//c").unwrap(), "lightlevel/a/../b//c");
    }

    #[test]
    fn long_paths_and_unprintable_bytes_are_refused() {
        assert_eq!(
            map(&format!("/{}", "a".repeat(256))),
            Err(PathError::TooLong { len: 257, max: 256 })
        );
        assert_eq!(
            map("/a b"),
            Err(PathError::BadByte {
                byte: b' ',
                offset: 2
            })
        );
        assert_eq!(
            map("/caf\u{e9}"),
            Err(PathError::BadByte {
                byte: 0xC3,
                offset: 4
            })
        );
    }
}
