//! A real Redis Sentinel set-up for the scale-out tests (SPEC §11): one primary, one replica
//! (`redis-server --replicaof`) and three `redis-sentinel` processes (quorum 2), all on free
//! loopback ports, every process killed by its PID when the fixture is dropped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fred::prelude::*;

use super::{free_port, temp_dir, wait_for_port, Redis};

/// How long a failover may take: `down-after-milliseconds` (1 s), then the election, which
/// Sentinel retries after 2 × `failover-timeout` (10 s) when the votes split.
pub const FAILOVER_PATIENCE: Duration = Duration::from_secs(60);

/// One primary, one replica and three sentinels watching them under one master name.
pub struct Sentinel {
    pub name: String,
    /// The two redis-servers (the first started as the primary), by port.
    nodes: Vec<Redis>,
    sentinels: Vec<(u16, Child)>,
    dir: PathBuf,
}

impl Sentinel {
    /// Start everything and wait until every sentinel knows the replica (linked to its
    /// primary) and the two other sentinels: before that a failover cannot happen.
    pub async fn start(name: &str) -> Sentinel {
        let primary = Redis::start_with(free_port(), &[]).await;
        let primary_port = primary.port.to_string();
        let replica =
            Redis::start_with(free_port(), &["--replicaof", "127.0.0.1", &primary_port]).await;
        let dir = temp_dir("sentinel");
        let mut sentinel = Sentinel {
            name: name.to_string(),
            nodes: vec![primary, replica],
            sentinels: Vec::new(),
            dir,
        };
        for _ in 0..3 {
            let port = free_port();
            let conf = sentinel.dir.join(format!("sentinel-{port}.conf"));
            // Sentinel rewrites its file as it learns: it must be writable, one per process.
            std::fs::write(
                &conf,
                format!(
                    "port {port}\n\
                     bind 127.0.0.1\n\
                     daemonize no\n\
                     dir {dir}\n\
                     logfile {dir}/sentinel-{port}.log\n\
                     sentinel resolve-hostnames no\n\
                     sentinel monitor {name} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {name} 1000\n\
                     sentinel failover-timeout {name} 5000\n\
                     sentinel parallel-syncs {name} 1\n",
                    dir = sentinel.dir.display(),
                ),
            )
            .unwrap();
            let child = Command::new("redis-sentinel")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-sentinel must be installed (bin/test installs it)");
            sentinel.sentinels.push((port, child));
            wait_for_port(port).await;
        }
        sentinel.wait_ready().await;
        sentinel
    }

    /// `--redis-url` for `--redis-mode sentinel`: the sentinels, then the master's name.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis://{}/{}", hosts.join(","), self.name)
    }

    /// The redis-server on `port`.
    pub fn node(&self, port: u16) -> &Redis {
        self.nodes
            .iter()
            .find(|node| node.port == port)
            .unwrap_or_else(|| panic!("no redis-server of this fixture on port {port}"))
    }

    /// `SENTINEL args…` on the `i`th sentinel.
    pub async fn ask(&self, i: usize, args: &[&str]) -> Result<Value, Error> {
        let config = Config::from_url(&format!("redis://127.0.0.1:{}", self.sentinels[i].0))?;
        let client = Builder::from_config(config)
            .with_connection_config(|conn| conn.connection_timeout = Duration::from_secs(2))
            .build()?;
        client.init().await?;
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            client.custom::<Value, _>(fred::cmd!("SENTINEL"), args),
        )
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, "no answer from the sentinel"))?;
        let _ = client.quit().await;
        answer
    }

    /// The primary's port as the `i`th sentinel names it (`SENTINEL get-master-addr-by-name`).
    pub async fn primary_port_at(&self, i: usize) -> Result<u16, String> {
        let answer = self
            .ask(i, &["get-master-addr-by-name", &self.name])
            .await
            .map_err(|e| e.to_string())?;
        let (_host, port): (String, u16) = answer.convert().map_err(|e| e.to_string())?;
        Ok(port)
    }

    /// The primary's port, as the first sentinel names it.
    pub async fn primary_port(&self) -> u16 {
        self.primary_port_at(0).await.unwrap()
    }

    /// Wait until every sentinel names another primary than the one on `old`; its port.
    pub async fn wait_new_primary(&self, old: u16) -> u16 {
        let deadline = tokio::time::Instant::now() + FAILOVER_PATIENCE;
        loop {
            let mut seen = Vec::new();
            for i in 0..self.sentinels.len() {
                seen.push(self.primary_port_at(i).await);
            }
            match seen.first() {
                Some(Ok(port)) if *port != old && seen.iter().all(|s| s == &Ok(*port)) => {
                    return *port
                }
                _ => assert!(
                    tokio::time::Instant::now() < deadline,
                    "the sentinels still name {seen:?} (the old primary was on {old})"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL the current primary; its port.
    pub async fn kill_primary(&mut self) -> u16 {
        let port = self.primary_port().await;
        self.nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("the primary is one of this fixture's nodes")
            .kill();
        port
    }

    /// `SENTINEL FAILOVER`: the replica is promoted, the old primary stays up and is made its
    /// replica. The old primary's port.
    pub async fn failover(&self) -> u16 {
        let port = self.primary_port().await;
        self.ask(0, &["failover", &self.name])
            .await
            .expect("SENTINEL FAILOVER");
        port
    }

    /// `FAILOVER` on the primary, as an operator would run it (Redis 6.2+): the replica
    /// becomes the primary and the old primary its replica, without Sentinel, and the old
    /// primary's clients stay connected. Waits until the old primary reports itself a replica;
    /// returns its port.
    pub async fn failover_by_hand(&self) -> u16 {
        let port = self.primary_port().await;
        let client = self.node(port).client().await;
        let _: Value = client
            .custom(fred::cmd!("FAILOVER"), Vec::<String>::new())
            .await
            .expect("FAILOVER");
        let _ = client.quit().await;
        super::eventually(|| async move {
            match self.role(port).await.as_str() {
                "slave" => Ok(()),
                role => Err(format!("after FAILOVER the old primary is still a {role}")),
            }
        })
        .await;
        port
    }

    /// The role the redis-server on `port` reports (`ROLE`): "master" or "slave".
    pub async fn role(&self, port: u16) -> String {
        let client = self.node(port).client().await;
        let role: Vec<Value> = client
            .custom(fred::cmd!("ROLE"), Vec::<String>::new())
            .await
            .unwrap();
        let _ = client.quit().await;
        role.first().and_then(|r| r.as_string()).unwrap_or_default()
    }

    /// Every sentinel sees the primary up, the replica up and linked, and the two others.
    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + super::PATIENCE * 2;
        loop {
            match self.ready().await {
                Ok(()) => return,
                Err(seen) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "sentinels not ready: {seen}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ready(&self) -> Result<(), String> {
        for i in 0..self.sentinels.len() {
            let maps = |v: Value| -> Result<Vec<HashMap<String, String>>, String> {
                v.convert().map_err(|e| e.to_string())
            };
            let replicas = maps(
                self.ask(i, &["replicas", &self.name])
                    .await
                    .map_err(|e| e.to_string())?,
            )?;
            let linked = replicas.iter().any(|r| {
                r.get("flags").map(String::as_str) == Some("slave")
                    && r.get("master-link-status").map(String::as_str) == Some("ok")
            });
            if !linked {
                return Err(format!("sentinel {i} sees replicas {replicas:?}"));
            }
            let others = maps(
                self.ask(i, &["sentinels", &self.name])
                    .await
                    .map_err(|e| e.to_string())?,
            )?;
            if others.len() != self.sentinels.len() - 1 {
                return Err(format!("sentinel {i} knows {} others", others.len()));
            }
        }
        Ok(())
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        for (_, child) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The redis-servers are killed by their own Drop.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
