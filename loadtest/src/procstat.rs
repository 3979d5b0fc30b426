//! Whole-process CPU time and RSS (perf counters are not available on the
//! machines this runs on). CPU time comes from the process's CPU clock
//! (`clock_getcpuclockid`, nanosecond resolution, every thread the process
//! ever had); when that clock cannot be read, from /proc/PID/stat in clock
//! ticks (10 ms at the usual 100 Hz), and the output says which.

use std::time::Duration;

/// One reading of a process's CPU time (user + system) and resident memory.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub cpu_ns: u64,
    pub rss_kb: u64,
    /// User and system time in clock ticks (/proc/PID/stat), for the split
    /// only: the kernel samples it at the tick, so over a window of a few
    /// hundred ms it is good to a few percent where `cpu_ns` is exact.
    pub user_ticks: u64,
    pub system_ticks: u64,
}

impl Sample {
    /// Reads process `pid`; None when it is gone (or a zombie).
    pub fn of(pid: u32) -> Option<Sample> {
        if !alive(pid) {
            return None;
        }
        let dir = format!("/proc/{pid}");
        let (user_ticks, system_ticks) = stat_ticks(&dir)?;
        let cpu_ns = match cpu_clock(pid as libc::pid_t) {
            Some(clock) => read_clock(clock)?,
            None => (user_ticks + system_ticks) * 1_000_000_000 / ticks_per_second(),
        };
        Some(Sample { cpu_ns, rss_kb: rss_kb(&dir).unwrap_or(0), user_ticks, system_ticks })
    }

    pub fn own() -> Sample {
        let cpu_ns = read_clock(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or(0);
        let (user_ticks, system_ticks) = stat_ticks("/proc/self").unwrap_or((0, 0));
        Sample { cpu_ns, rss_kb: rss_kb("/proc/self").unwrap_or(0), user_ticks, system_ticks }
    }

    /// CPU time spent between `earlier` and this sample.
    pub fn cpu_since(&self, earlier: &Sample) -> Duration {
        Duration::from_nanos(self.cpu_ns.saturating_sub(earlier.cpu_ns))
    }

    /// The share of the CPU time since `earlier` that was user time (the
    /// rest is the kernel's), from the tick counts; None when no tick fell
    /// in between.
    pub fn user_share_since(&self, earlier: &Sample) -> Option<f64> {
        let user = self.user_ticks.saturating_sub(earlier.user_ticks);
        let system = self.system_ticks.saturating_sub(earlier.system_ticks);
        (user + system > 0).then(|| user as f64 / (user + system) as f64)
    }
}

/// Lowers the calling thread's CPU priority to `nice` (Linux keeps a nice
/// value per thread; threads it starts later inherit it). Lowering needs
/// no privilege.
pub fn lower_thread_priority(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid has no preconditions; setpriority only reads its
    // arguments, and a tid names this thread alone.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How a process's CPU time is read, for the output.
pub fn cpu_clock_source(pid: u32) -> (String, f64) {
    match cpu_clock(pid as libc::pid_t) {
        Some(clock) => {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: clock_getres writes one timespec.
            let res_ns = if unsafe { libc::clock_getres(clock, &mut ts) } == 0 {
                ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
            } else {
                1.0
            };
            ("process CPU clock (clock_getcpuclockid)".into(), res_ns)
        }
        None => (format!("/proc/{pid}/stat clock ticks"), 1e9 / ticks_per_second() as f64),
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    !matches!(state, None | Some('Z') | Some('X') | Some('x'))
}

/// The process's command name (`comm`).
pub fn command(pid: u32) -> Option<String> {
    Some(std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim().to_string())
}

/// Threads of `pid` that run a Kafka broker inside the process: librdkafka's
/// mock cluster (`rdk:mock`) and moonx-ws's embedded broker and demo feed
/// (`kafka-embedded`). Returns (their names, their CPU time so far).
pub fn broker_threads(pid: u32) -> (Vec<String>, Duration) {
    threads(pid, |comm| comm == "rdk:mock" || comm == "kafka-embedded")
}

/// librdkafka's client threads in `pid` (`rdk:main`, `rdk:broker…`; not
/// the mock cluster's `rdk:mock`): a Kafka consumer's own work, which goes
/// on whether or not clients connect (an idle consumer fetches once per
/// `fetch.wait.max.ms`). Returns (their names, their CPU time so far).
pub fn kafka_client_threads(pid: u32) -> (Vec<String>, Duration) {
    threads(pid, |comm| comm.starts_with("rdk:") && comm != "rdk:mock")
}

/// The distinct names of `pid`'s threads whose name `wanted` accepts, and
/// those threads' CPU time so far (threads that have exited are not
/// counted).
fn threads(pid: u32, wanted: impl Fn(&str) -> bool) -> (Vec<String>, Duration) {
    let mut names = Vec::new();
    let mut ns = 0u64;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (names, Duration::ZERO);
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if wanted(comm) {
            names.push(comm.to_string());
            // schedstat: time on CPU in ns, first field.
            ns += std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
        }
    }
    names.sort();
    names.dedup();
    (names, Duration::from_nanos(ns))
}

fn cpu_clock(pid: libc::pid_t) -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: writes one clockid_t.
    let rc = unsafe { libc::clock_getcpuclockid(pid, &mut clock) };
    (rc == 0 && read_clock(clock).is_some()).then_some(clock)
}

fn read_clock(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// User and system time in clock ticks.
fn stat_ticks(dir: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((num(11)?, num(12)?))
}

fn rss_kb(dir: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_live_process_and_refuses_a_dead_one() {
        let me = std::process::id();
        assert!(alive(me));
        let s = Sample::of(me).expect("own process");
        assert!(s.rss_kb > 0);
        let (_, res) = cpu_clock_source(me);
        assert!(res > 0.0);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!alive(pid), "a reaped child is gone");
        assert!(Sample::of(pid).is_none());
        assert!(!alive(u32::MAX / 2));
    }

    #[test]
    fn kafka_client_threads_are_librdkafkas_but_not_a_mock_clusters() {
        // Threads of this process named as librdkafka names its own: a
        // client's broker thread that has done some work, a mock cluster's
        // thread, and one that is neither.
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = ["rdk:broker7", "rdk:mock", "not-kafka"]
            .into_iter()
            .map(|name| {
                let barrier = barrier.clone();
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || {
                        if name == "rdk:broker7" {
                            let mut x = 0u64;
                            for i in 0..1_000_000u64 {
                                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                            }
                        }
                        barrier.wait(); // all started (and the work done)
                        barrier.wait(); // sampled
                    })
                    .unwrap()
            })
            .collect();
        barrier.wait();
        let (clients, client_cpu) = kafka_client_threads(std::process::id());
        let (brokers, _) = broker_threads(std::process::id());
        barrier.wait();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(clients.contains(&"rdk:broker7".to_string()), "{clients:?}");
        assert!(!clients.iter().any(|n| n == "rdk:mock" || n == "not-kafka"), "{clients:?}");
        assert!(client_cpu > Duration::ZERO, "the working thread's CPU is counted");
        assert!(brokers.contains(&"rdk:mock".to_string()), "{brokers:?}");
        assert!(!brokers.iter().any(|n| n == "rdk:broker7"), "{brokers:?}");
    }

    #[test]
    fn splits_cpu_time_by_its_tick_counts() {
        let at = |user_ticks, system_ticks| Sample { cpu_ns: 0, rss_kb: 0, user_ticks, system_ticks };
        assert_eq!(at(13, 20).user_share_since(&at(10, 11)), Some(0.25));
        assert_eq!(at(10, 11).user_share_since(&at(10, 11)), None, "no tick in between");
    }
}
