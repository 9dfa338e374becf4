//! Stopping on SIGTERM and SIGINT. The first signal asks the agent to stop: a cut being made
//! ends at its next block batch, the freeze it made is always thawed first, a session is ended
//! (the cut stays spooled and the next start resumes it), a sleep between cycles ends at once.
//! A second signal exits at once, after running any thaw still owed (killing a freeze that is
//! still running first), so the application is never left frozen.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The stop request, shared by everything a cycle runs.
#[derive(Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    signal: Arc<AtomicI32>,
}

impl Stop {
    /// A stop that only [`Stop::request`] triggers (tests, embedding).
    pub fn new() -> Self {
        Self::default()
    }

    /// Listens for SIGTERM and SIGINT on the current Tokio runtime.
    pub fn on_signals() -> anyhow::Result<Self> {
        let stop = Stop::new();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let s = stop.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let (name, no) = tokio::select! {
                    _ = term.recv() => ("SIGTERM", libc::SIGTERM),
                    _ = int.recv() => ("SIGINT", libc::SIGINT),
                };
                if n == 0 {
                    tracing::warn!(
                        signal = name,
                        "stopping: the cycle under way ends after its thaw, its cut is kept for the next start (send the signal again to exit at once)"
                    );
                    s.request(no);
                } else {
                    tracing::warn!(
                        signal = name,
                        "second signal: running any thaw still owed and exiting now"
                    );
                    tokio::task::spawn_blocking(understudy_common::hooks::run_owed_thaws)
                        .await
                        .ok();
                    std::process::exit(128 + no);
                }
            }
        });
        Ok(stop)
    }

    /// Asks for a stop, as signal number `signal` would.
    pub fn request(&self, signal: i32) {
        self.signal.store(signal, Ordering::SeqCst);
        self.token.cancel();
    }

    /// True once a stop was asked for.
    pub fn requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The signal that asked for the stop, if one did.
    pub fn signal(&self) -> Option<i32> {
        Some(self.signal.load(Ordering::SeqCst)).filter(|s| *s != 0)
    }

    /// Completes once a stop was asked for.
    pub async fn requested_wait(&self) {
        self.token.cancelled().await
    }

    /// Runs `work` unless a stop comes first; then `work` is dropped and [`Interrupted`] returned.
    ///
    /// [`Interrupted`]: understudy_common::error::Interrupted
    pub async fn unless_stopped<T>(
        &self,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        tokio::select! {
            r = work => r,
            _ = self.token.cancelled() => Err(understudy_common::error::Interrupted.into()),
        }
    }
}
