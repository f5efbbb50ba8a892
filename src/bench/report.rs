//! What a run found, for people (a short table) and for scripts (`--json`, one object).
//!
//! Owns: the [`Report`] fields and their meaning, the per-connection and per-CPU-second
//! figures derived from the raw counts, and the verdict (`ok`: no loss, no connection ended,
//! nothing malformed; only such runs count).
//! Must not: measure anything.

use std::collections::BTreeMap;

use serde::Serialize;

use super::procstat::ProcessReport;
use super::stats::Latency;

/// One run's results. Fields that do not apply to a scenario are left out of the JSON.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// `fanout`, `latency`, `ingest`, `idle` or `storm`.
    pub scenario: &'static str,
    pub label: String,
    /// No loss, no error: the figures count.
    pub ok: bool,
    pub problems: Vec<String>,
    pub subscribe: Option<String>,
    pub publish: Option<String>,
    pub channels: usize,
    /// Per channel (fanout, latency); in all (idle).
    pub subscribers: usize,
    pub connections: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publishers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack: Option<bool>,
    pub size: usize,
    /// Messages per second asked for; 0: as fast as delivered.
    pub rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
    /// Fan-out, latency: the subscribers asked for `format=json` envelopes (messages are then
    /// text: the sequence number and send time in hex, then padding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envelope: Option<bool>,
    /// From the first message to the last delivery (or ack); idle: how long the connections were held.
    pub elapsed_s: f64,
    pub sent: u64,
    /// Deliveries expected (sent × subscribers per channel), or messages expected in Redis.
    pub expected: u64,
    /// Deliveries (fanout), or messages that reached Redis (ingest).
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// `delivered` per second of `elapsed_s` (ingest: while sending).
    pub per_s: f64,
    pub mib_per_s: f64,
    /// Delivery latency (fanout), or ack/response latency (ingest).
    pub latency: Latency,
    pub servers: Vec<ProcessReport>,
    /// CPU seconds of every `--pid` together.
    pub server_cpu_s: f64,
    /// `delivered` per server CPU-second: the figure servers are compared by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_server_cpu_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<ProcessReport>,
    /// The load generator's own CPU seconds over the same time.
    pub client_cpu_s: f64,
    /// The share of the machine's CPU time the hypervisor took during the run (`steal` in
    /// `/proc/stat`): above a few percent, the run was disturbed by other guests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_steal_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked: Option<u64>,
    /// Idle: server RSS growth per open connection, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kib_per_connection: Option<f64>,
    /// Idle: Redis RSS growth per open connection, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_kib_per_connection: Option<f64>,
    /// Idle, storm: whether every handshake carried a token (`--token`; the token is not shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<bool>,
    /// Storm: what the handshakes came to. `per_server_cpu_s` is then connections per
    /// server CPU-second (the storm and `--settle` after it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storm: Option<Storm>,
}

/// The connection storm's own figures.
#[derive(Debug, Default, Serialize)]
pub struct Storm {
    pub clients: usize,
    pub concurrency: usize,
    /// Handshakes answered 101.
    pub connected: u64,
    /// Handshakes answered with another status (401, 403, 429, 503…): counted, not retried.
    pub refused: u64,
    /// Refusals by status code.
    pub refused_by_status: BTreeMap<u16, u64>,
    /// Handshakes that broke or timed out.
    pub failed: u64,
    /// Handshakes never started: `--timeout` passed first.
    pub not_started: u64,
    /// From the first connect to the last handshake's answer.
    pub storm_s: f64,
    /// `storm_s` when every client connected.
    pub all_connected_s: Option<f64>,
    /// Server CPU seconds from the first connect to the last handshake's answer.
    pub storm_server_cpu_s: f64,
    /// How long after the last answer the server's CPU was still counted.
    pub settle_s: f64,
    /// `connected` per second of `storm_s`.
    pub connections_per_s: f64,
    /// Connections that ended with the server's close frame or end of stream after ours.
    pub closed: u64,
    /// With `--redis`: calls of each counted Redis command from the first connect to the
    /// end of `--settle` (INFO commandstats, lower-case names: `xrevrange`, `xrange`,
    /// `subscribe`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_calls: Option<BTreeMap<String, u64>>,
}

impl Report {
    /// Fill the derived figures and the verdict from the raw counts.
    pub fn finish(&mut self) {
        self.lost = self.expected.saturating_sub(self.delivered);
        self.duplicates = self.delivered.saturating_sub(self.expected);
        self.server_cpu_s = self.servers.iter().map(|p| p.cpu_s).sum();
        if let Some(storm) = &self.storm {
            if storm.refused > 0 {
                let by: Vec<String> = storm
                    .refused_by_status
                    .iter()
                    .map(|(status, n)| format!("{n} × {status}"))
                    .collect();
                self.problems
                    .insert(0, format!("{} refused ({})", storm.refused, by.join(", ")));
            }
            if storm.failed > 0 {
                self.problems
                    .push(format!("{} handshake(s) failed", storm.failed));
            }
            if storm.not_started > 0 {
                self.problems.push(format!(
                    "{} handshake(s) not started within --timeout",
                    storm.not_started
                ));
            }
            if self.server_cpu_s > 0.0 {
                self.per_server_cpu_s = Some(storm.connected as f64 / self.server_cpu_s);
            }
        } else if self.scenario != "idle" {
            if self.lost > 0 {
                self.problems
                    .insert(0, format!("lost {} of {}", self.lost, self.expected));
            }
            if self.duplicates > 0 {
                self.problems
                    .push(format!("{} duplicates", self.duplicates));
            }
            if self.server_cpu_s > 0.0 {
                self.per_server_cpu_s = Some(self.delivered as f64 / self.server_cpu_s);
            }
        }
        self.ok = self.problems.is_empty();
    }

    /// The table a person reads.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        let rate = if self.rate > 0.0 {
            format!("{} msg/s", self.rate)
        } else {
            format!("max rate (window {})", self.window.unwrap_or(0))
        };
        let with_token = if self.token == Some(true) {
            " · with a token"
        } else {
            ""
        };
        match self.scenario {
            "idle" => line(format!(
                "idle · {} · {} connections on {} channel(s){with_token} · held {:.1} s",
                self.label, self.connections, self.channels, self.elapsed_s
            )),
            "storm" => line(format!(
                "storm · {} · {} clients, {} handshakes in flight{with_token}",
                self.label,
                self.storm.as_ref().map_or(0, |s| s.clients),
                self.storm.as_ref().map_or(0, |s| s.concurrency),
            )),
            "ingest" => line(format!(
                "ingest · {} · {} publishers{} · {} B · {:.1} s",
                self.label,
                self.publishers.unwrap_or(0),
                if self.ack == Some(true) {
                    " (lightrelay.ack)"
                } else {
                    ""
                },
                self.size,
                self.elapsed_s
            )),
            scenario => line(format!(
                "{scenario} · {} · {} channel(s) × {} subscribers · {} B · {rate} · {:.1} s",
                self.label, self.channels, self.subscribers, self.size, self.elapsed_s
            )),
        }
        match self.scenario {
            "idle" => {
                if let Some(k) = self.kib_per_connection {
                    line(format!("  server RSS    {k:.2} KiB per connection"));
                }
                if let Some(k) = self.redis_kib_per_connection {
                    line(format!("  Redis RSS     {k:.2} KiB per connection"));
                }
            }
            "storm" => {
                if let Some(s) = &self.storm {
                    line(format!(
                        "  connected     {} of {}   refused {}   failed {}   not started {}",
                        group(s.connected),
                        group(s.clients as u64),
                        s.refused,
                        s.failed,
                        s.not_started
                    ));
                    let all = match s.all_connected_s {
                        Some(t) => format!("all connected in {t:.2} s"),
                        None => format!("last answer after {:.2} s", s.storm_s),
                    };
                    line(format!(
                        "  {all} ({}/s); server {:.2} CPU-s to then, {:.2} with {:.1} s after",
                        group(s.connections_per_s.round() as u64),
                        s.storm_server_cpu_s,
                        self.server_cpu_s,
                        s.settle_s
                    ));
                }
            }
            scenario => {
                let what = if scenario == "ingest" {
                    "reached Redis"
                } else {
                    "delivered"
                };
                line(format!(
                    "  {what:<13} {} of {} ({}/s, {:.1} MiB/s)   lost {}   reordered {}",
                    group(self.delivered),
                    group(self.expected),
                    group(self.per_s.round() as u64),
                    self.mib_per_s,
                    self.lost,
                    self.reordered
                ));
                let l = &self.latency;
                if l.count > 0 {
                    line(format!(
                        "  latency       p50 {}   p99 {}   p99.9 {}   max {}",
                        ms(l.p50_us),
                        ms(l.p99_us),
                        ms(l.p999_us),
                        ms(l.max_us)
                    ));
                }
            }
        }
        for p in &self.servers {
            line(format!(
                "  server pid {:<7} {:.2} CPU-s   RSS {} → {} KiB (peak {})",
                p.pid,
                p.cpu_s,
                group(p.rss_kib_start),
                group(p.rss_kib_end),
                group(p.rss_kib_peak)
            ));
        }
        if let Some(per) = self.per_server_cpu_s {
            line(format!(
                "  per server CPU-second: {} {}",
                group(per.round() as u64),
                match self.scenario {
                    "ingest" => "messages",
                    "storm" => "connections",
                    _ => "deliveries",
                }
            ));
        }
        if let Some(r) = &self.redis {
            line(format!(
                "  redis pid {:<8} {:.2} CPU-s   RSS {} → {} KiB",
                r.pid,
                r.cpu_s,
                group(r.rss_kib_start),
                group(r.rss_kib_end)
            ));
        }
        line(format!("  load generator {:.2} CPU-s", self.client_cpu_s));
        if let Some(steal) = self.host_steal_pct {
            line(format!(
                "  host steal     {steal:.1}% of the machine's CPU time"
            ));
        }
        if self.ok {
            line("  OK".to_string());
        } else {
            line(format!("  NOT COUNTED: {}", self.problems.join("; ")));
        }
        out
    }
}

fn ms(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} ms", us as f64 / 1000.0)
    }
}

/// 1234567 → "1,234,567".
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_makes_a_run_not_count() {
        let mut r = Report {
            scenario: "fanout",
            expected: 10,
            delivered: 9,
            ..Report::default()
        };
        r.finish();
        assert!(!r.ok);
        assert_eq!(r.lost, 1);
        assert!(r.table().contains("NOT COUNTED: lost 1 of 10"));
        assert_eq!(group(1_234_567), "1,234,567");
        assert_eq!(group(12), "12");
    }
}
