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
}
