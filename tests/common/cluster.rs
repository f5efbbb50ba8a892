//! A real Redis Cluster on loopback (SPEC §11): six `redis-server --cluster-enabled yes`
//! processes (three primaries, one replica each) made one cluster by `redis-cli --cluster
//! create`, with a short `cluster-node-timeout` so a killed primary is replaced in seconds.
//! Failover, SIGKILL and slot migration are done as an operator would, with `redis-cli`.
//! Every process is killed by PID when the fixture is dropped.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, quiet_port, temp_dir, wait_for_port};

/// One cluster node: its client port and its process (none once killed).
pub struct Node {
    pub port: u16,
    child: Option<Child>,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

impl Cluster {
    /// Six nodes, three primaries with one replica each, `cluster_state:ok` on all.
    pub async fn start() -> Cluster {
        let dir = temp_dir("cluster");
        let mut nodes = Vec::new();
        for i in 0..6 {
            let port = quiet_port();
            // The cluster bus port is chosen too (by default port + 10000, maybe not free).
            let bus = quiet_port();
            let node_dir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--cluster-config-file", "nodes.conf"])
                // A replica may take over at once after a short outage (no long data-age check).
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (bin/test installs it)");
            nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        for node in &nodes {
            wait_for_port(node.port).await;
        }
        let cluster = Cluster { nodes, dir };
        let mut create = vec!["--cluster".to_string(), "create".to_string()];
        create.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port)),
        );
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = Command::new("redis-cli")
            .args(&create)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok().await;
        cluster
    }

    /// `--redis-url` for `--redis-mode cluster`: the three first nodes as seeds.
    pub fn seed_url(&self) -> String {
        let seeds: Vec<String> = self.nodes[..3]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis://{}", seeds.join(","))
    }

    /// The ports of the nodes still running.
    pub fn live(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// `redis-cli -p PORT ARGS…`: its output, trimmed.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `redis-cli -c` (following redirections) against a live node.
    pub fn cli_c(&self, args: &[&str]) -> String {
        let port = self.live()[0];
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        self.cli(port, &all)
    }

    /// Until every live node says `cluster_state:ok` and agrees on who serves every slot.
    pub async fn wait_ok(&self) {
        eventually(|| async {
            let mut views = Vec::new();
            for port in self.live() {
                let info = self.cli(port, &["CLUSTER", "INFO"]);
                if !info.contains("cluster_state:ok") {
                    return Err(format!("node {port}: not ok yet:\n{info}"));
                }
                views.push(self.slot_owners(port));
            }
            if views.windows(2).any(|w| w[0] != w[1]) {
                return Err(format!("nodes disagree on the slots: {views:?}"));
            }
            Ok(())
        })
        .await
    }

    /// The primaries serving slots, as `port` sees them: (first slot, last slot, port).
    fn slot_owners(&self, port: u16) -> Vec<(u16, u16, u16)> {
        let mut out = Vec::new();
        for line in self.cli(port, &["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let node_port: u16 = fields[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap();
            for range in &fields[8..] {
                if range.starts_with('[') {
                    continue;
                }
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                out.push((a.parse().unwrap(), b.parse().unwrap(), node_port));
            }
        }
        out.sort();
        out
    }

    /// The ports of the primaries serving slots.
    pub fn primaries(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .slot_owners(self.live()[0])
            .into_iter()
            .map(|(_, _, p)| p)
            .collect();
        ports.sort();
        ports.dedup();
        ports
    }

    /// The slot of a key or channel name (`CLUSTER KEYSLOT`).
    pub fn slot(&self, name: &str) -> u16 {
        self.cli(self.live()[0], &["CLUSTER", "KEYSLOT", name])
            .parse()
            .unwrap()
    }

    /// The port of the primary serving `slot`.
    pub fn owner(&self, slot: u16) -> u16 {
        self.slot_owners(self.live()[0])
            .into_iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, p)| p)
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
    }

    /// A node's id (`CLUSTER MYID`).
    pub fn id(&self, port: u16) -> String {
        self.cli(port, &["CLUSTER", "MYID"])
    }

    /// The port of a live replica of the primary on `primary`.
    pub fn replica_of(&self, primary: u16) -> u16 {
        let id = self.id(primary);
        self.live()
            .into_iter()
            .find(|&port| {
                port != primary
                    && self.cli(port, &["CLUSTER", "NODES"]).lines().any(|l| {
                        l.contains("myself") && l.contains("slave") && l.contains(id.as_str())
                    })
            })
            .unwrap_or_else(|| panic!("no replica of {primary}"))
    }

    /// `SPUBLISH`-receiver counts: `PUBSUB SHARDNUMSUB` of `channels` on the node `port`,
    /// summed.
    pub fn shardnumsub(&self, port: u16, channels: &[String]) -> i64 {
        let mut args = vec!["PUBSUB", "SHARDNUMSUB"];
        args.extend(channels.iter().map(String::as_str));
        self.cli(port, &args)
            .lines()
            .skip(1)
            .step_by(2)
            .filter_map(|n| n.trim().parse::<i64>().ok())
            .sum()
    }

    /// SIGKILL the node on `port` (by its PID): its connections vanish at once.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether some live node sees `slot` served by a node other than `port`.
    pub fn served_elsewhere(&self, slot: u16, port: u16) -> bool {
        self.live().into_iter().any(|live| {
            self.slot_owners(live)
                .iter()
                .any(|(a, b, p)| (*a..=*b).contains(&slot) && *p != port)
        })
    }

    /// Until a replica serves the slots of the (killed) primary on `port`, as every live node
    /// sees it.
    pub async fn wait_replaced(&self, port: u16) {
        eventually(|| async {
            for live in self.live() {
                if self.slot_owners(live).iter().any(|(_, _, p)| *p == port) {
                    return Err(format!("node {live} still sees {port} serving slots"));
                }
            }
            Ok(())
        })
        .await;
        self.wait_ok().await;
    }

    /// `CLUSTER FAILOVER` on the replica on `replica`, and wait until it serves its slots.
    pub async fn failover(&self, replica: u16) {
        assert_eq!(self.cli(replica, &["CLUSTER", "FAILOVER"]), "OK");
        eventually(|| async {
            let role = self.cli(replica, &["ROLE"]);
            match role.lines().next() {
                Some("master") => Ok(()),
                _ => Err(format!("{replica} is not primary yet: {role}")),
            }
        })
        .await;
        self.wait_ok().await;
    }

    /// Move `slot` from its primary to the primary on `to`, keys and all, as
    /// `redis-cli --cluster reshard` does: IMPORTING / MIGRATING, MIGRATE the keys, then
    /// SETSLOT NODE on the target, the source and every other primary.
    pub async fn migrate_slot(&self, slot: u16, to: u16) {
        let from = self.owner(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let slot_text = slot.to_string();
        let (from_id, to_id) = (self.id(from), self.id(to));
        let ok = |out: String, what: &str| assert_eq!(out, "OK", "{what}");
        ok(
            self.cli(
                to,
                &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id],
            ),
            "IMPORTING",
        );
        ok(
            self.cli(
                from,
                &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id],
            ),
            "MIGRATING",
        );
        for _ in 0..1000 {
            let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            ok(self.cli(from, &args), "MIGRATE");
        }
        for port in [to, from] {
            ok(
                self.cli(port, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]),
                "SETSLOT NODE",
            );
        }
        for port in self.primaries() {
            if port != to && port != from {
                self.cli(port, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
            }
        }
        eventually(|| async {
            match self.owner(slot) {
                owner if owner == to => Ok(()),
                owner => Err(format!("slot {slot} still on {owner}")),
            }
        })
        .await;
        self.wait_ok().await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How long a failover may take here (node timeout 1 s, then an election).
pub const FAILOVER: Duration = Duration::from_secs(15);
