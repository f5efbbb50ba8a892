//! The heartbeat (SPEC §10): what this instance writes of the fleet's presence.
//!
//! Owns: [`Presence`], one per process (both servers: the subscribe server's has no paths),
//! with its in-memory tracker (path → since, connections) that a publish connection marks
//! when it opens and closes ([`Presence::open`], a guard whose drop is the close), and the
//! heartbeat task ([`Presence::spawn`]) that writes, every `--presence-interval`, the
//! instance and what changed since the last heartbeat in ONE Redis command: an EVALSHA of
//! [`SCRIPT`] (preceded by `SCRIPT LOAD` in the same pipeline when Redis may not have it:
//! the first heartbeat, and the one after a NOSCRIPT).
//!
//! Batching: a connection only touches the tracker's mutex when it opens and when it closes
//! (never per message), and notes its path as changed. The heartbeat compares each changed
//! path with what it last wrote: a path that gained its first publisher is a join (HSET and
//! one event), a path that lost its last one a leave (HDEL and one event), a path whose count
//! changed is rewritten without an event. A publisher that opens and closes within one
//! interval therefore produces nothing at all.
//!
//! Repair: the script answers the hash's length after the writes; when it is not what the
//! heartbeat believes (Redis restarted or flushed, or a heartbeat failed halfway), the next
//! heartbeat rewrites the whole hash. The first heartbeat of a process always does: that is
//! how a restarted instance drops its previous life's paths (each of them gets its leave).
//!
//! Must not: hold the tracker's lock across an await, or write to Redis from a connection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::ClientLike;
use fred::types::{CustomCommand, Value};
use tokio_util::sync::CancellationToken;

use super::{
    instance_key, instances_key, now_ms, presence_key, Entry, Fleet, Instance, ALIVE_INTERVALS,
};
use crate::lock;

/// The heartbeat script. KEYS: the instances set, the instance's key, its presence hash.
/// ARGV: 1 id, 2 now (ms), 3 TTL (ms, three intervals), 4 the instance's JSON, 5 the events
/// channel, 6 `1` to rewrite the whole hash, 7 the paths to set as `PATH\tENTRY\n` lines,
/// 8 how many of those (the first ones) are joins, 9 the paths to delete (leaves) as
/// `PATH\n` lines, 10 the id as a JSON string. Paths are printable ASCII (SPEC §2), so
/// neither a tab nor a newline can be in one, and escaping `"` and `\` makes one a JSON
/// string. Answers the hash's length after the writes.
///
/// Two text arguments rather than one per path: a heartbeat after 10,000 devices joined
/// held ~600 bytes per path while it was built and sent (a `Value` per path, entry and
/// event, copied twice on the way), and the process's memory stays at its peak.
pub(crate) const SCRIPT: &str = r#"#!lua
local id, now, ttl, channel = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5]
local function event(kind, path)
  return '{"event":"' .. kind .. '","path":"' .. string.gsub(path, '[\\"]', '\\%0') ..
    '","instance":' .. ARGV[10] .. ',"at":' .. ARGV[2] .. '}'
end
local sets, dels = {}, {}
for path, entry in string.gmatch(ARGV[7], '([^\t\n]+)\t([^\n]*)\n') do
  sets[#sets + 1] = path
  sets[#sets + 1] = entry
end
for path in string.gmatch(ARGV[9], '([^\n]+)\n') do dels[#dels + 1] = path end
redis.call('ZADD', KEYS[1], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - ttl))
redis.call('SET', KEYS[2], ARGV[4], 'PX', ttl)
if ARGV[6] == '1' then
  local keep = {}
  for i = 1, #sets, 2 do keep[sets[i]] = true end
  for _, path in ipairs(dels) do keep[path] = true end
  for _, path in ipairs(redis.call('HKEYS', KEYS[3])) do
    if not keep[path] then redis.call('PUBLISH', channel, event('leave', path)) end
  end
  redis.call('DEL', KEYS[3])
end
for i = 1, #sets, 1000 do
  redis.call('HSET', KEYS[3], unpack(sets, i, math.min(i + 999, #sets)))
end
for i = 1, #dels, 500 do
  redis.call('HDEL', KEYS[3], unpack(dels, i, math.min(i + 499, #dels)))
end
for i = 1, tonumber(ARGV[8]) do redis.call('PUBLISH', channel, event('join', sets[2 * i - 1])) end
for _, path in ipairs(dels) do redis.call('PUBLISH', channel, event('leave', path)) end
redis.call('PEXPIRE', KEYS[3], ttl)
return redis.call('HLEN', KEYS[3])
"#;

/// What connections mark: the paths with a publisher now, and which changed since the last
/// heartbeat took them.
#[derive(Default)]
struct Tracker {
    paths: HashMap<Box<str>, Entry>,
    changed: HashSet<Box<str>>,
}

/// This instance's presence: the tracker, and what the heartbeat and `GET /presence` use.
pub(crate) struct Presence {
    pub client: Client,
    pub prefix: String,
    pub interval: Duration,
    /// How long a `GET /presence` may wait for Redis (`--redis-timeout`).
    pub timeout: Duration,
    pub id: String,
    instance: Instance,
    tracker: Mutex<Tracker>,
}

/// A publish connection's mark on its path; dropping it is the connection's close.
pub(crate) struct Marked {
    presence: Arc<Presence>,
    path: Box<str>,
}

impl Drop for Marked {
    fn drop(&mut self) {
        let mut tracker = lock(&self.presence.tracker);
        let gone = match tracker.paths.get_mut(&self.path) {
            Some(entry) => {
                entry.connections = entry.connections.saturating_sub(1);
                entry.connections == 0
            }
            None => false,
        };
        if gone {
            tracker.paths.remove(&self.path);
        }
        let path = std::mem::take(&mut self.path);
        tracker.changed.insert(path);
    }
}

impl Presence {
    /// The presence of an instance `id` of `role` listening on `listen`, with `client` (its
    /// own connection, connecting in the background).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        prefix: String,
        interval: Duration,
        timeout: Duration,
        id: String,
        role: &str,
        listen: String,
    ) -> Arc<Self> {
        let instance = Instance {
            id: id.clone(),
            role: role.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            listen,
            started: now_ms(),
            heartbeat: 0,
        };
        Arc::new(Presence {
            client,
            prefix,
            interval,
            timeout,
            id,
            instance,
            tracker: Mutex::new(Tracker::default()),
        })
    }

    /// Mark a publisher connection on `path` as open, until the guard is dropped.
    pub fn open(self: &Arc<Self>, path: &str) -> Marked {
        let path: Box<str> = path.into();
        let mut tracker = lock(&self.tracker);
        let entry = tracker.paths.entry(path.clone()).or_insert(Entry {
            since: now_ms(),
            connections: 0,
        });
        entry.connections += 1;
        tracker.changed.insert(path.clone());
        drop(tracker);
        Marked {
            presence: self.clone(),
            path,
        }
    }

    /// Read the fleet, within `--redis-timeout`.
    pub async fn fleet(&self) -> Result<Fleet, String> {
        match tokio::time::timeout(
            self.timeout,
            super::fleet(&self.client, &self.prefix, self.interval),
        )
        .await
        {
            Ok(Ok(fleet)) => Ok(fleet),
            Ok(Err(e)) => Err(format!("redis: {}", e.details())),
            Err(_) => Err(format!(
                "redis did not answer within {:?} (--redis-timeout)",
                self.timeout
            )),
        }
    }

    /// Run the heartbeat until `shutdown`: at once, then every interval.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) {
        let presence = self.clone();
        tokio::spawn(async move {
            let mut beat = Beat::new(&presence);
            let mut ticks = tokio::time::interval(presence.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = shutdown.cancelled() => break,
                }
                // Bounded: a heartbeat that Redis does not answer within an interval is given up
                // (and its changes sent again by the next).
                let sent = tokio::time::timeout(presence.interval, beat.run(&presence)).await;
                if sent.is_err() {
                    beat.failed(&presence, "no answer within one interval".into());
                }
            }
        });
    }
}

/// What the heartbeat task keeps between heartbeats.
struct Beat {
    sha: String,
    /// What the presence hash holds, as far as this instance wrote it.
    written: HashMap<Box<str>, Entry>,
    /// Rewrite the whole hash at the next heartbeat (the first one, or after a mismatch).
    full: bool,
    /// Send SCRIPT LOAD with the next heartbeat.
    load: bool,
    /// The changed paths the heartbeat in progress took from the tracker.
    taking: Vec<Box<str>>,
    /// Whether the last failure was logged (once per outage).
    logged: bool,
}

impl Beat {
    fn new(_presence: &Presence) -> Self {
        use sha1::Digest;
        Beat {
            sha: sha1::Sha1::digest(script().as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            written: HashMap::new(),
            full: true,
            load: true,
            taking: Vec::new(),
            logged: false,
        }
    }

    /// One heartbeat: take what changed, send it with the instance, note what Redis now holds.
    async fn run(&mut self, presence: &Presence) {
        let now = now_ms();
        let ttl = presence.interval.as_millis() as u64 * u64::from(ALIVE_INTERVALS);
        // What changed, under the lock, and nothing more.
        let (changed, current): (Vec<Box<str>>, Vec<Option<Entry>>) = {
            let mut tracker = lock(&presence.tracker);
            if self.full {
                tracker.changed.clear();
                let paths: Vec<Box<str>> = tracker
                    .paths
                    .keys()
                    .cloned()
                    .chain(self.written.keys().cloned())
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                let entries = paths
                    .iter()
                    .map(|p| tracker.paths.get(p).cloned())
                    .collect();
                (paths, entries)
            } else {
                let paths: Vec<Box<str>> = tracker.changed.drain().collect();
                let entries = paths
                    .iter()
                    .map(|p| tracker.paths.get(p).cloned())
                    .collect();
                (paths, entries)
            }
        };
        self.taking = changed;
        // Joins first (the script publishes an event for each of the first `joins`), then
        // paths whose count changed (rewritten, no event); leaves apart.
        let mut sets = String::new();
        let mut dels = String::new();
        let mut joins = 0i64;
        let line = |out: &mut String, path: &str, entry: &Entry| {
            out.push_str(path);
            out.push('\t');
            out.push_str(&serde_json::to_string(entry).unwrap_or_default());
            out.push('\n');
        };
        for (path, entry) in self.taking.iter().zip(&current) {
            match (self.written.get(path), entry) {
                (None, Some(entry)) => {
                    line(&mut sets, path, entry);
                    joins += 1;
                }
                (Some(_), None) => {
                    dels.push_str(path);
                    dels.push('\n');
                }
                _ => {}
            }
        }
        for (path, entry) in self.taking.iter().zip(&current) {
            if let (Some(before), Some(entry)) = (self.written.get(path), entry) {
                if before != entry || self.full {
                    line(&mut sets, path, entry);
                }
            }
        }
        let args: Vec<Value> = vec![
            self.sha.clone().into(),
            3.into(),
            instances_key(&presence.prefix).into(),
            instance_key(&presence.prefix, &presence.id).into(),
            presence_key(&presence.prefix, &presence.id).into(),
            presence.id.clone().into(),
            (now as i64).into(),
            (ttl as i64).into(),
            serde_json::to_string(&presence.instance)
                .unwrap_or_default()
                .into(),
            super::events_channel(&presence.prefix).into(),
            if self.full { "1" } else { "0" }.into(),
            sets.into(),
            joins.into(),
            dels.into(),
            serde_json::to_string(&presence.id)
                .unwrap_or_default()
                .into(),
        ];
        let answer = self.send(presence, args).await;
        match answer {
            Ok(length) => {
                for (path, entry) in self.taking.drain(..).zip(current) {
                    match entry {
                        Some(entry) => self.written.insert(path, entry),
                        None => self.written.remove(&path),
                    };
                }
                // Not what this instance wrote: Redis lost (or someone changed) the hash.
                self.full = length != self.written.len() as i64;
                if self.logged {
                    tracing::info!("presence heartbeat written again");
                    self.logged = false;
                }
            }
            Err(why) => self.failed(presence, why),
        }
    }

    /// One EVALSHA (with SCRIPT LOAD before it when needed, in the same pipeline); again with
    /// the load if Redis answered NOSCRIPT. The hash's length.
    async fn send(&mut self, presence: &Presence, args: Vec<Value>) -> Result<i64, String> {
        // In a cluster: the node of the keys' slot (fred would hash `LOAD` or the SHA1).
        let slot = crate::redis::slot(instances_key(&presence.prefix).as_bytes());
        for _ in 0..2 {
            let pipeline = presence.client.pipeline();
            if self.load {
                let load = vec![Value::from_static_str("LOAD"), script().into()];
                let _: Result<Value, _> = pipeline.custom(script_command(slot), load).await;
            }
            let _: Result<Value, _> = pipeline.custom(evalsha_command(slot), args.clone()).await;
            let mut answers = pipeline.try_all::<Value>().await;
            match answers.pop() {
                Some(Ok(value)) => {
                    self.load = false;
                    return value
                        .as_i64()
                        .ok_or_else(|| "the presence script answered no integer".into());
                }
                Some(Err(e)) if e.details().starts_with("NOSCRIPT") && !self.load => {
                    self.load = true;
                }
                Some(Err(e)) => return Err(e.details().to_string()),
                None => return Err("no answer".into()),
            }
        }
        Err("the presence script could not be loaded".into())
    }

    /// A heartbeat that did not go through: what it took is marked changed again, and the
    /// next heartbeat rewrites the whole hash (this one may have run in part).
    fn failed(&mut self, presence: &Presence, why: String) {
        let mut tracker = lock(&presence.tracker);
        tracker.changed.extend(self.taking.drain(..));
        drop(tracker);
        self.full = true;
        if !self.logged {
            tracing::warn!(error = %why, "presence heartbeat not written; retrying every interval");
            self.logged = true;
        }
    }
}

fn evalsha_command(slot: u16) -> CustomCommand {
    CustomCommand::new_static("EVALSHA", fred::types::ClusterHash::Custom(slot), false)
}

fn script_command(slot: u16) -> CustomCommand {
    CustomCommand::new_static("SCRIPT", fred::types::ClusterHash::Custom(slot), false)
}

/// The script as this process runs it: in a cluster the events are SPUBLISHed (see the
/// layout in `presence`).
fn script() -> String {
    if crate::redis::sharded() {
        SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
    } else {
        SCRIPT.to_string()
    }
}

/// The default instance id: this host's name and the port it listens on.
pub(crate) fn default_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{port}")
}
