//! What the servers spend: CPU time and memory of each `--pid`, read from `/proc`.
//!
//! Owns: reading `utime + stime` from `/proc/PID/stat` (all threads of the process, in clock
//! ticks of 1/100 s: Linux reports USER_HZ, 100 on every architecture) and `VmRSS` from
//! `/proc/PID/status`, and a sampler that keeps each process's peak RSS during a run.
//! What can go wrong is a [`ProcError`].
//! Must not: signal or otherwise touch the processes it watches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// Linux's USER_HZ: the unit of the CPU times in `/proc/PID/stat`.
const TICKS_PER_SECOND: f64 = 100.0;

/// A `/proc` file that could not be read or parsed (a `--pid` that is not, or no longer, there).
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: unexpected format")]
    Format { path: String },
}

fn read(path: String) -> Result<String, ProcError> {
    std::fs::read_to_string(&path).map_err(|source| ProcError::Read { path, source })
}

/// One reading of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub cpu_ticks: u64,
    pub rss_kib: u64,
}

/// Read `/proc/PID/stat` and `/proc/PID/status` (`pid` may be `"self"`).
pub fn sample(pid: &str) -> Result<Sample, ProcError> {
    let stat = read(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
        return Err(ProcError::Format {
            path: format!("/proc/{pid}/stat"),
        });
    };
    let status = read(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Sample {
        cpu_ticks: utime + stime,
        rss_kib,
    })
}

/// A watched process over one measurement: readings at the start and end, and the peak RSS.
pub struct Watched {
    pub pid: u32,
    pub start: Sample,
    peak_rss: AtomicU64,
}

/// What the report says about one process.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    pub cpu_s: f64,
    pub rss_kib_start: u64,
    pub rss_kib_end: u64,
    pub rss_kib_peak: u64,
}

/// Every `--pid` of a run, sampled together.
pub struct Watch {
    processes: Vec<Arc<Watched>>,
    sampler: Option<tokio::task::JoinHandle<()>>,
}

impl Watch {
    /// Take the start readings and begin sampling peak RSS every 100 ms.
    pub fn start(pids: &[u32]) -> Result<Watch, ProcError> {
        let mut processes = Vec::with_capacity(pids.len());
        for &pid in pids {
            let start = sample(&pid.to_string())?;
            processes.push(Arc::new(Watched {
                pid,
                start,
                peak_rss: AtomicU64::new(start.rss_kib),
            }));
        }
        let watched = processes.clone();
        let sampler = (!watched.is_empty()).then(|| {
            tokio::spawn(async move {
                // Bounded: the run aborts this task when it ends; a day at most regardless.
                for _ in 0..864_000u32 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    for w in &watched {
                        if let Ok(s) = sample(&w.pid.to_string()) {
                            w.peak_rss.fetch_max(s.rss_kib, Ordering::Relaxed);
                        }
                    }
                }
            })
        });
        Ok(Watch { processes, sampler })
    }

    /// CPU seconds every process spent since the start, together (the watch goes on).
    pub fn cpu_s_so_far(&self) -> Result<f64, ProcError> {
        let mut ticks = 0;
        for w in &self.processes {
            let now = sample(&w.pid.to_string())?;
            ticks += now.cpu_ticks.saturating_sub(w.start.cpu_ticks);
        }
        Ok(ticks as f64 / TICKS_PER_SECOND)
    }

    /// Take the end readings; an error if a process has gone.
    pub fn finish(mut self) -> Result<Vec<ProcessReport>, ProcError> {
        if let Some(sampler) = self.sampler.take() {
            sampler.abort();
        }
        self.processes
            .iter()
            .map(|w| {
                let end = sample(&w.pid.to_string())?;
                Ok(ProcessReport {
                    pid: w.pid,
                    cpu_s: end.cpu_ticks.saturating_sub(w.start.cpu_ticks) as f64
                        / TICKS_PER_SECOND,
                    rss_kib_start: w.start.rss_kib,
                    rss_kib_end: end.rss_kib,
                    rss_kib_peak: w.peak_rss.load(Ordering::Relaxed).max(end.rss_kib),
                })
            })
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(sampler) = self.sampler.take() {
            sampler.abort();
        }
    }
}

/// The machine's CPU time so far, as (stolen by the hypervisor, all), in ticks from the
/// `cpu` line of `/proc/stat`; `None` where it cannot be read.
pub fn machine_steal() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let all = fields.iter().take(8).sum();
    Some((*fields.get(7)?, all))
}

/// The share of the machine's CPU time the hypervisor took between two readings, in percent.
pub fn steal_percent(start: Option<(u64, u64)>, end: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, a0), (s1, a1)) = (start?, end?);
    let all = a1.checked_sub(a0).filter(|&all| all > 0)?;
    Some(s1.saturating_sub(s0) as f64 * 100.0 / all as f64)
}

/// This process's own CPU seconds so far (the load generator's cost).
pub fn own_cpu_s() -> f64 {
    sample("self").map_or(0.0, |s| s.cpu_ticks as f64 / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_a_share_of_the_machine() {
        assert_eq!(steal_percent(Some((10, 1000)), Some((60, 2000))), Some(5.0));
        assert_eq!(steal_percent(Some((10, 1000)), Some((10, 1000))), None);
        let now = machine_steal().expect("/proc/stat has a cpu line");
        assert!(now.0 <= now.1);
    }

    #[test]
    fn reads_this_process() {
        let s = sample("self").unwrap();
        assert!(s.rss_kib > 0);
        let w = Watch {
            processes: vec![Arc::new(Watched {
                pid: std::process::id(),
                start: s,
                peak_rss: AtomicU64::new(s.rss_kib),
            })],
            sampler: None,
        };
        let report = w.finish().unwrap();
        assert_eq!(report[0].pid, std::process::id());
        assert!(report[0].cpu_s >= 0.0 && report[0].rss_kib_peak > 0);
    }
}
