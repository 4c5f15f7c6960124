//! Process plumbing shared by the daemons: signals, and named tasks drained with a deadline.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Resolves on SIGTERM or SIGINT and says which.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be killed; never resolve.
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// A daemon's configuration, or every problem printed (prefixed by `program`) and the exit status
/// 78 (`EX_CONFIG`) to return.
pub fn config_or_exit<T>(
    program: &str,
    loaded: Result<T, crate::config::ConfigErrors>,
) -> Result<T, std::process::ExitCode> {
    loaded.map_err(|errors| {
        eprintln!("{program}: {errors}");
        std::process::ExitCode::from(crate::config::EX_CONFIG as u8)
    })
}

/// The multi-threaded runtime of a daemon, its threads named `program`; `workers` caps the worker
/// threads (the agent keeps to one on the host it watches: its capture has its own thread).
pub fn daemon_runtime(
    program: &str,
    workers: Option<usize>,
) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .thread_name(program)
        .build()
        .map_err(|error| {
            eprintln!("{program}: cannot start the runtime: {error}");
            std::process::ExitCode::FAILURE
        })
}

/// Long-running tasks with names, so a slow shutdown says what it waits for.
#[derive(Default)]
pub struct Tasks {
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Tasks {
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push((name, tokio::spawn(task)));
    }

    /// Waits for every task until `deadline`, then aborts those still running and logs their names.
    /// Returns the names of the tasks that had to be aborted.
    pub async fn drain(self, deadline: Duration) -> Vec<&'static str> {
        let until = tokio::time::Instant::now() + deadline;
        let mut late = Vec::new();
        for (name, mut handle) in self.tasks {
            match tokio::time::timeout_at(until, &mut handle).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(task = name, %error, "task failed"),
                Err(_) => {
                    handle.abort();
                    late.push(name);
                }
            }
        }
        if !late.is_empty() {
            tracing::warn!(tasks = ?late, ?deadline, "shutdown deadline passed; aborted tasks still running");
        }
        late
    }
}

/// Whether packet-path threads ask for real-time scheduling (`realtime_thread`); set once at start
/// from the daemon's configuration (`capture.realtime`, `mirror.realtime`).
static REALTIME: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
/// Whether a refusal was already logged: once per process is enough.
static REALTIME_REFUSED: std::sync::Once = std::sync::Once::new();

/// Turns real-time scheduling of packet-path threads on or off for this process.
pub fn set_realtime(on: bool) {
    REALTIME.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Puts the calling thread in `SCHED_FIFO` at priority 1, the lowest real-time priority, when
/// the process allows it (`set_realtime`). A packet-path thread does a bounded amount of work per
/// wake-up (a ring block, a batch), and on a busy host the time it waits for a CPU is what loses
/// and delays packets: bench/burst.sh measured the capture thread waiting 16 ms at times under
/// the default policy, longer than its ring holds. Any task of the host's own real-time
/// priorities still comes first, and the kernel's real-time throttling (95% of each second)
/// bounds what such a thread can take. Without `CAP_SYS_NICE` (or with an `RLIMIT_RTPRIO` of 0)
/// it stays as it is and the refusal is logged once.
pub fn realtime_thread(what: &str) -> bool {
    if !REALTIME.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    use thread_priority::{
        RealtimeThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    // Min: the lowest priority of the policy, 1 for SCHED_FIFO.
    let Err(error) = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
    ) else {
        return true;
    };
    REALTIME_REFUSED.call_once(|| {
        tracing::warn!(thread = what, %error, "real-time scheduling refused (needs CAP_SYS_NICE); packet-path threads keep the default policy, so on a busy host they may wait for a CPU longer than the capture ring lasts");
    });
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_names_the_tasks_that_overrun() {
        let mut tasks = Tasks::default();
        tasks.spawn("quick", async {});
        tasks.spawn("stuck", std::future::pending());
        assert_eq!(tasks.drain(Duration::from_millis(50)).await, ["stuck"]);
    }

    /// The scheduling policy of the calling thread, from /proc (field 41: 1 is SCHED_FIFO).
    fn sched_policy() -> u32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(38).unwrap().parse().unwrap()
    }

    #[test]
    fn a_packet_thread_runs_fifo_when_allowed_and_as_before_when_turned_off() {
        let root = nix::unistd::geteuid().is_root();
        let (took, policy) = std::thread::spawn(|| (realtime_thread("test"), sched_policy()))
            .join()
            .unwrap();
        if !root {
            eprintln!("NOT RUN as root: real-time scheduling is only checked as refused");
            assert!(!took);
            assert_eq!(policy, 0);
            return;
        }
        assert!(took);
        assert_eq!(policy, 1, "SCHED_FIFO");
        set_realtime(false);
        let (took, policy) = std::thread::spawn(|| (realtime_thread("test"), sched_policy()))
            .join()
            .unwrap();
        set_realtime(true);
        assert!(!took);
        assert_eq!(policy, 0, "SCHED_OTHER");
    }
}
