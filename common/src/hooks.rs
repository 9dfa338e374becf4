//! Quiesce hooks: shell commands run before the cut (freeze) and after it (thaw), each with a
//! timeout and an on-error policy.

use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
