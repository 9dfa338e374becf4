//! Quiesce hooks: shell commands run before the cut (freeze) and after it (thaw), each with a
//! timeout and an on-error policy.
//!
//! A freeze that ran is a thaw owed to the application: [`freeze`] returns a [`Thaw`] that runs
//! the post hook when it is dropped, however the cut ends (done, failed, interrupted), and the
//! thaw is also registered process-wide so that an agent forced to exit at once (a second
//! signal) still runs it first ([`run_owed_thaws`]). Each thaw runs exactly once.

use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Thaws owed right now, by the id of their [`Thaw`].
static OWED: Mutex<Vec<(u64, Hook)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
/// Process groups of the hooks running right now.
static RUNNING: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// The thaw owed after a freeze; dropping it runs the post hook (once).
#[must_use = "dropping the Thaw runs the post hook at once"]
pub struct Thaw {
    id: u64,
}

/// Runs `pre` (the freeze) and returns the thaw that `post` owes from now on. When the freeze
/// fails (under the `fail` policy), the post hook runs at once, to undo a partial freeze, and
/// the error is returned.
pub fn freeze(pre: Option<&Hook>, post: Option<&Hook>) -> Result<Thaw> {
    let thaw = Thaw {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
    };
    if let Some(h) = post {
        owed().push((thaw.id, h.clone()));
    }
    if let Some(h) = pre {
        h.run("pre")?; // on error, dropping `thaw` runs the post hook
    }
    Ok(thaw)
}

fn owed() -> std::sync::MutexGuard<'static, Vec<(u64, Hook)>> {
    OWED.lock().unwrap_or_else(|p| p.into_inner())
}

fn take_owed(id: Option<u64>) -> Vec<Hook> {
    let mut o = owed();
    let (take, keep): (Vec<_>, Vec<_>) =
        o.drain(..).partition(|(i, _)| id.is_none_or(|id| id == *i));
    *o = keep;
    take.into_iter().map(|(_, h)| h).collect()
}

fn thaw_now(h: &Hook) {
    if let Err(e) = h.run("post") {
        tracing::error!(error = %format!("{e:#}"), "post hook failed: the application may still be frozen; thaw it by hand");
    }
}

impl Drop for Thaw {
    fn drop(&mut self) {
        take_owed(Some(self.id)).iter().for_each(thaw_now);
    }
}

/// Kills the hooks running now (a freeze must not complete after its thaw), then runs every thaw
/// still owed, each bounded by its hook's timeout. For an exit that cannot wait for the cut to
/// end; a [`Thaw`] whose hook ran here does nothing when dropped.
pub fn run_owed_thaws() {
    let running = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|p| p.into_inner()));
    for pgid in running {
        if let Some(pid) = rustix::process::Pid::from_raw(pgid) {
            rustix::process::kill_process_group(pid, rustix::process::Signal::KILL).ok();
        }
    }
    take_owed(None).iter().for_each(thaw_now);
}

/// Registers a running hook's process group for [`run_owed_thaws`] while it lives.
struct RunningHook(i32);

impl RunningHook {
    fn new(pgid: i32) -> Self {
        RUNNING.lock().unwrap_or_else(|p| p.into_inner()).push(pgid);
        RunningHook(pgid)
    }
}

impl Drop for RunningHook {
    fn drop(&mut self) {
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| *p != self.0);
    }
}

/// What to do when a hook fails or times out.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
pub enum OnError {
    /// Abort the cycle (after running the post hook, so a partial freeze is undone).
    Fail,
    /// Log a warning and go on.
    Continue,
}

/// A hook command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// Run with `sh -c`.
    pub command: String,
    /// Killed (with its whole process group) past this.
    pub timeout: Duration,
    /// Policy on failure.
    pub on_error: OnError,
}

impl Hook {
    /// Runs the hook; `Ok` also when it failed under the `continue` policy.
    pub fn run(&self, what: &str) -> Result<()> {
        match self.run_once() {
            Ok(()) => Ok(()),
            Err(e) if self.on_error == OnError::Continue => {
                tracing::warn!(hook = what, error = %format!("{e:#}"), "hook failed; continuing as --hook-on-error=continue says");
                Ok(())
            }
            Err(e) => Err(e.context(format!(
                "{what} hook `{}` failed (set --hook-on-error=continue to go on regardless)",
                self.command
            ))),
        }
    }

    fn run_once(&self) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("cannot start sh")?;
        let _running = RunningHook::new(child.id() as i32);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                let out = child.wait_with_output()?;
                if status.success() {
                    return Ok(());
                }
                let stderr = String::from_utf8_lossy(&out.stderr);
                bail!("exited with {status}: {}", stderr.trim());
            }
            if start.elapsed() > self.timeout {
                let pid = rustix::process::Pid::from_raw(child.id() as i32).context("bad pid")?;
                rustix::process::kill_process_group(pid, rustix::process::Signal::KILL).ok();
                child.wait().ok();
                bail!("timed out after {:?} and was killed", self.timeout);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(cmd: &str, ms: u64, on_error: OnError) -> Hook {
        Hook {
            command: cmd.into(),
            timeout: Duration::from_millis(ms),
            on_error,
        }
    }

    #[test]
    fn failures_and_timeouts_follow_the_policy() {
        assert!(hook("true", 5000, OnError::Fail).run("pre").is_ok());
        let e = hook("echo frozen-db >&2; exit 3", 5000, OnError::Fail)
            .run("pre")
            .unwrap_err();
        assert!(format!("{e:#}").contains("frozen-db"), "{e:#}");
        assert!(hook("exit 3", 5000, OnError::Continue).run("pre").is_ok());
        let t = Instant::now();
        let e = hook("sleep 30", 200, OnError::Fail)
            .run("post")
            .unwrap_err();
        assert!(format!("{e:#}").contains("timed out"));
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
