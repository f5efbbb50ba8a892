//! Presence (SPEC §10): which paths have a live publisher, on which instance, since when; and
//! which relay instances are alive. What every instance writes and reads in Redis.
//!
//! Owns: the Redis layout (below), the shapes of `GET /presence` and of the join/leave
//! events, and reading the fleet ([`fleet`]). The heartbeat that writes it, and the tracker connections mark,
//! are [`heartbeat`].
//!
//! Layout (PREFIX is `--channel-prefix`; a space in a key name keeps it apart from every
//! stream key, which is a channel name, and no path holds a space):
//! - `PREFIX instances`: a sorted set, member = instance id, score = its last heartbeat (ms
//!   since the Unix epoch). An instance is alive while its score is within three
//!   `--presence-interval`s of now.
//! - `PREFIX instance ID`: a string, the instance's [`Instance`] as JSON; TTL three intervals.
//! - `PREFIX presence ID`: a hash, field = PATH, value = the path's [`Entry`] as JSON (`since`,
//!   `connections`); TTL three intervals. Only publish servers have one.
//! - Events: `PREFIX/_presence` (a channel a dashboard can subscribe to through the relay,
//!   `ws://HOST/_presence`), one JSON message per join or leave:
//!   `{"event":"join"|"leave","path":"/x","instance":"ID","at":MS}`.
//! - In a cluster (`--redis-mode cluster`) the script's keys and its channel must share a
//!   slot: every key starts with the hash tag `{PREFIX/_presence}` instead of PREFIX
//!   (`{lightlevel/_presence} instances`, …), and the events are SPUBLISHed, so that the
//!   relays' own `/_presence` subscribers (SSUBSCRIBEd, like every channel in a cluster) get
//!   them; `redis-cli -c SSUBSCRIBE lightlevel/_presence` shows them.
//!
//! Must not: write presence on the hot path (a connection only marks its path in memory; the
//! heartbeat writes what changed, once per interval, in one command).

pub(crate) mod heartbeat;

use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::{KeysInterface, SortedSetsInterface};
use serde::{Deserialize, Serialize};

/// The channel (after PREFIX) joins and leaves are published on.
pub(crate) const EVENTS_PATH: &str = "/_presence";

/// An instance's heartbeats are this many intervals apart at most before it counts as gone.
pub(crate) const ALIVE_INTERVALS: u32 = 3;

/// What every key starts with: PREFIX; in a cluster, a hash tag that puts every key on the
/// slot of the events channel, so that the heartbeat script's keys and the channel it
/// SPUBLISHes on are on one slot (`{PREFIX/_presence}` for a plain PREFIX).
fn key_base(prefix: &str) -> String {
    if crate::redis::sharded() {
        crate::redis::slot_tag(&events_channel(prefix))
    } else {
        prefix.to_string()
    }
}

/// The channel joins and leaves are published on: `PREFIX/_presence`.
pub(crate) fn events_channel(prefix: &str) -> String {
    format!("{prefix}{EVENTS_PATH}")
}

pub(crate) fn instances_key(prefix: &str) -> String {
    format!("{} instances", key_base(prefix))
}

pub(crate) fn instance_key(prefix: &str, id: &str) -> String {
    format!("{} instance {id}", key_base(prefix))
}

pub(crate) fn presence_key(prefix: &str, id: &str) -> String {
    format!("{} presence {id}", key_base(prefix))
}

/// What an instance says about itself (`PREFIX instance ID`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Instance {
    pub id: String,
    /// `publish` or `subscribe`.
    pub role: String,
    pub version: String,
    /// What it listens on (`--listen`).
    pub listen: String,
    /// When it started, ms since the Unix epoch.
    pub started: u64,
    /// Its last heartbeat, ms since the Unix epoch (from the sorted set's score).
    #[serde(default)]
    pub heartbeat: u64,
}

/// One path's publishers on one instance (`PREFIX presence ID`, field PATH).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Since when the path has had a publisher on this instance, ms since the Unix epoch.
    pub since: u64,
    /// How many publisher connections it has there now.
    pub connections: u64,
}

/// A path with a live publisher, as `GET /presence` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Device {
    pub path: String,
    pub instance: String,
    pub since: u64,
    pub connections: u64,
}

/// The whole fleet: `GET /presence`'s answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fleet {
    pub instances: Vec<Instance>,
    pub devices: Vec<Device>,
}

impl Fleet {
    /// The entries of one path, on every instance.
    pub fn on(&self, path: &str) -> Vec<&Device> {
        self.devices.iter().filter(|d| d.path == path).collect()
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Read the fleet: the instances whose last heartbeat is within three `interval`s, and the
/// paths their presence hashes hold. A few commands, whatever the fleet's size in paths.
pub(crate) async fn fleet(
    client: &Client,
    prefix: &str,
    interval: Duration,
) -> Result<Fleet, fred::error::Error> {
    let alive_since = now_ms().saturating_sub(interval.as_millis() as u64 * ALIVE_INTERVALS as u64);
    let members: Vec<(String, f64)> = client
        .zrangebyscore(
            instances_key(prefix),
            alive_since as f64,
            "+inf",
            true,
            None,
        )
        .await?;
    let mut fleet = Fleet::default();
    for (id, score) in members {
        let info: Option<String> = client.get(instance_key(prefix, &id)).await?;
        let Some(mut instance) = info.and_then(|json| serde_json::from_str::<Instance>(&json).ok())
        else {
            continue;
        };
        instance.heartbeat = score as u64;
        let paths: std::collections::HashMap<String, String> =
            fred::interfaces::HashesInterface::hgetall(client, presence_key(prefix, &id)).await?;
        for (path, entry) in paths {
            if let Ok(entry) = serde_json::from_str::<Entry>(&entry) {
                fleet.devices.push(Device {
                    path,
                    instance: id.clone(),
                    since: entry.since,
                    connections: entry.connections,
                });
            }
        }
        fleet.instances.push(instance);
    }
    fleet.instances.sort_by(|a, b| a.id.cmp(&b.id));
    fleet
        .devices
        .sort_by(|a, b| (&a.path, &a.instance).cmp(&(&b.path, &b.instance)));
    Ok(fleet)
}
