//! Whole-process CPU time and RSS from /proc (perf counters are not
//! available on the machines this runs on).

use std::time::Duration;

/// One reading of a process's CPU time (user + system) and resident memory.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub cpu_ticks: u64,
    pub rss_kb: u64,
}

impl Sample {
    pub fn of(pid: u32) -> Sample {
        read(&format!("/proc/{pid}"))
    }

    pub fn own() -> Sample {
        read("/proc/self")
    }

    /// CPU time spent between `earlier` and this sample.
    pub fn cpu_since(&self, earlier: &Sample) -> Duration {
        let hz = ticks_per_second();
        let ticks = self.cpu_ticks.saturating_sub(earlier.cpu_ticks);
        Duration::from_nanos(ticks * 1_000_000_000 / hz)
    }
}

fn read(dir: &str) -> Sample {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let cpu_ticks = num(11) + num(12);
    let status = std::fs::read_to_string(format!("{dir}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Sample { cpu_ticks, rss_kb }
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant of the C library; no pointers involved.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}
