//! The schedule: one cycle every interval, failed cycles retried with exponential backoff, never
//! two cycles of a group at once (cycles run one after another here, and a lock file keeps a
//! second process out). Errors a retry cannot fix ([`understudy_common::error::Permanent`]) are
//! not retried, and a stop ([`crate::stop::Stop`]) ends the loop at whatever stage it is.

use crate::cycle::{CycleReport, SourceAgent};
use crate::stop::Stop;
use anyhow::Result;
use backon::{ExponentialBuilder, Retryable};
use std::time::{Duration, Instant};
use understudy_common::error::{is_interrupted, is_permanent};

/// Shortest interval accepted: each cycle freezes the application (when hooks are set) and
/// makes a recovery point, so a tighter loop only takes the application's write time away and
/// fills the standby with points.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);

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

/// Checks an interval given by the user.
/// Parses an interval (`30s`, `5m`) and checks it.
pub fn parse_interval(s: &str) -> Result<Duration> {
    check_interval(humantime::parse_duration(s)?)
}

/// Checks an interval: at least [`MIN_INTERVAL`].
pub fn check_interval(interval: Duration) -> Result<Duration> {
    anyhow::ensure!(
        interval >= MIN_INTERVAL,
        "--interval {} is too short: the minimum is {} (each cycle makes a recovery point, and runs the hooks)",
        humantime::format_duration(interval),
        humantime::format_duration(MIN_INTERVAL)
    );
    Ok(interval)
}

/// How a run of the schedule ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// `--once` and its cycle succeeded.
    Done,
    /// Stopped by a signal between cycles: nothing was under way.
    StoppedBetweenCycles,
    /// Stopped by a signal during a cycle: it ended early (after its thaw; its cut is kept).
    StoppedDuringCycle,
}

/// Runs one cycle, retrying failures with exponential backoff (1 s doubling, capped); errors a
/// retry cannot fix, and a stop, return at once.
pub async fn cycle_with_retries(
    agent: &SourceAgent,
    s: &Schedule,
    stop: &Stop,
) -> Result<CycleReport> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(
            s.interval
                .clamp(Duration::from_secs(1), Duration::from_secs(300)),
        )
        .with_max_times(s.max_retries)
        .with_jitter();
    let sleep_stop = stop.clone();
    (|| agent.run_cycle())
        .retry(backoff)
        .sleep(move |d| {
            let stop = sleep_stop.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop.requested_wait() => {}
                }
            }
        })
        .when(|e: &anyhow::Error| !is_permanent(e) && !is_interrupted(e))
        .notify(|e: &anyhow::Error, wait: Duration| {
            tracing::warn!(group = agent.group(), error = %format!("{e:#}"), retry_in = ?wait, "cycle failed; retrying");
        })
        .await
}

/// Runs cycles until stopped (or once).
pub async fn run(
    agent: &SourceAgent,
    s: Schedule,
    stop: &Stop,
    on_report: impl Fn(&CycleReport),
) -> Result<Ended> {
    loop {
        let started = Instant::now();
        match cycle_with_retries(agent, &s, stop).await {
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
            Err(e) if is_interrupted(&e) => {
                tracing::info!(group = agent.group(), error = %format!("{e:#}"), "cycle stopped");
                return Ok(Ended::StoppedDuringCycle);
            }
            Err(e) if s.once => return Err(e),
            Err(e) if is_permanent(&e) => {
                tracing::error!(group = agent.group(), error = %format!("{e:#}"), "cycle failed, and retrying cannot fix this: correct it; next attempt at the next interval")
            }
            Err(e) => {
                tracing::error!(group = agent.group(), error = %format!("{e:#}"), "cycle failed after retries; next attempt at the next interval")
            }
        }
        if s.once {
            return Ok(Ended::Done);
        }
        if stop.requested() {
            return Ok(Ended::StoppedBetweenCycles);
        }
        let next = s.interval.saturating_sub(started.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = stop.requested_wait() => return Ok(Ended::StoppedBetweenCycles),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_below_the_minimum_are_refused_with_the_minimum() {
        let e = check_interval(Duration::ZERO).unwrap_err().to_string();
        assert!(
            e.contains("--interval 0s is too short: the minimum is 10s"),
            "{e}"
        );
        assert!(check_interval(Duration::from_millis(9999)).is_err());
        assert_eq!(check_interval(MIN_INTERVAL).unwrap(), MIN_INTERVAL);
    }
}
