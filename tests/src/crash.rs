//! The crash harness: runs the real agent binaries and kills them with SIGKILL, either at a
//! random instant (seeded, so a failing run replays with its seed) or at a named crash point in
//! the code (`understudy_common::failpoint`, armed through the `FAILPOINTS` environment variable).
//! docs/reliability.md lists the crash points and the loops that use them.

use crate::{Proc, bin};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The controller's crash points, each armed in turn by `kube_replication.rs` (the controller
/// runs against the two-cluster test bed, so these are tested there, not in `crash_points.rs`).
pub const CONTROLLER_POINTS: &[&str] = &[
    "controller.snapshots.taken",
    "controller.movers.started",
    "controller.point.committed",
    "controller.cleanup.deleting",
];

/// A seeded random source for a crash run. The seed comes from `var` when set (to replay a
/// failure), else from the clock; it is printed either way.
pub fn seeded(var: &str) -> (u64, StdRng) {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        });
    println!("crash seed {seed} (replay with {var}={seed})");
    (seed, StdRng::seed_from_u64(seed))
}

/// A number from the environment, or `default`.
pub fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Starts an agent command in the background with extra environment (e.g. `FAILPOINTS`),
/// its output appended to `log`.
pub fn spawn(agent: &str, args: &[String], env: &[(&str, &str)], log: &std::path::Path) -> Proc {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log");
    Proc(
        Command::new(bin(agent))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("spawn agent"),
    )
}

/// Waits up to `limit` for the process to exit; `None` if it is still running.
pub fn wait(p: &mut Proc, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = p.0.try_wait().expect("wait") {
            return Some(st);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when the process ended by SIGKILL (the harness's or its own at a crash point).
pub fn sigkilled(st: &ExitStatus) -> bool {
    st.signal() == Some(9)
}

/// `FAILPOINTS` value that crashes at the `n`-th time (1-based) `point` is reached.
pub fn crash_at(point: &str, n: usize) -> String {
    if n <= 1 {
        format!("{point}=return")
    } else {
        format!("{point}={}*off->return", n - 1)
    }
}
