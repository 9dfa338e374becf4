//! The schedule: one cycle every interval, failed cycles retried with exponential backoff, never
//! two cycles of a group at once (cycles run one after another here, and a lock file keeps a
//! second process out).

use crate::cycle::{CycleReport, SourceAgent};
use anyhow::Result;
use backon::{ExponentialBuilder, Retryable};
use std::time::{Duration, Instant};

/// Scheduling settings.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Time between cycle starts.
    pub interval: Duration,
    /// Retries of a failed cycle before giving up on it (the next interval tries again).
    pub max_retries: usize,
    /// Run one cycle (with its retries) and return.
    pub once: bool,
}

/// Runs one cycle, retrying failures with exponential backoff (1 s doubling, capped).
pub async fn cycle_with_retries(agent: &SourceAgent, s: &Schedule) -> Result<CycleReport> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(
            s.interval
                .clamp(Duration::from_secs(1), Duration::from_secs(300)),
        )
        .with_max_times(s.max_retries)
        .with_jitter();
    (|| agent.run_cycle())
        .retry(backoff)
        .notify(|e: &anyhow::Error, wait: Duration| {
            tracing::warn!(group = agent.group(), error = %format!("{e:#}"), retry_in = ?wait, "cycle failed; retrying");
        })
        .await
}

/// Runs cycles until interrupted (or once).
pub async fn run(agent: &SourceAgent, s: Schedule, on_report: impl Fn(&CycleReport)) -> Result<()> {
    loop {
        let started = Instant::now();
        match cycle_with_retries(agent, &s).await {
            Ok(r) => {
                tracing::info!(
                    group = agent.group(),
                    point = r.seq,
                    resumed = r.resumed,
                    bytes_read = r.bytes_read,
                    chunks_sent = r.chunks_sent,
                    bytes_sent = r.bytes_sent,
                    chunks_held = r.chunks_held,
                    seconds = r.seconds,
                    "cycle complete"
                );
                on_report(&r);
            }
            Err(e) if s.once => return Err(e),
            Err(e) => {
                tracing::error!(group = agent.group(), error = %format!("{e:#}"), "cycle failed after retries; next attempt at the next interval")
            }
        }
        if s.once {
            return Ok(());
        }
        let next = s.interval.saturating_sub(started.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; stopping"); return Ok(()); }
        }
    }
}
