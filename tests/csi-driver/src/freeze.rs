//! Stopping writes for the instant a snapshot is copied, as a storage array does when it cuts a
//! snapshot: a Filesystem volume's file system is frozen (FIFREEZE, through `fsfreeze`), which
//! also flushes it to its loop device; a Block volume has no file system to freeze, so the pods
//! it is published to are frozen through their freezer cgroup (cgroup v1) and the device is
//! flushed. Every member of a group is stopped before any is copied, so the copies hold the
//! writes of one instant: a write that is in one copy had every write it waited for in the
//! others. Dropping the guard lets writes go on.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tonic::Status;

use crate::state::State;

/// While this lives, the volumes it was made for take no writes.
#[derive(Debug, Default)]
pub struct Quiesced {
    file_systems: Vec<PathBuf>,
    cgroups: Vec<PathBuf>,
}

/// Stops writes to every volume in `volume_ids`. `freezer_root` is the freezer cgroup holding
/// the node's pods (the kubelet's cgroup root in the freezer hierarchy); without one, Block
/// volumes published to pods cannot be stopped and the request fails.
pub fn quiesce(
    state: &State,
    freezer_root: Option<&Path>,
    volume_ids: &[String],
) -> Result<Quiesced, Status> {
    let mut q = Quiesced::default();
    let mut devices = Vec::new();
    let mut pods = BTreeSet::new();
    for id in volume_ids {
        let Some(stage) = state.stage(id)? else {
            continue;
        };
        match stage.mount {
            Some(mount) => {
                run("fsfreeze", &["--freeze"], &mount)?;
                q.file_systems.push(mount);
            }
            None => {
                devices.push(stage.device);
                for p in state.publications(id)? {
                    match p.pod_uid {
                        Some(uid) => {
                            pods.insert(uid);
                        }
                        None => {
                            return Err(Status::failed_precondition(format!(
                                "volume {id} is published to {} without a pod uid, so its writers cannot be stopped for a snapshot; set podInfoOnMount: true on the CSIDriver",
                                p.target.display()
                            )));
                        }
                    }
                }
            }
        }
    }
    if !pods.is_empty() {
        let root = freezer_root.ok_or_else(|| {
            Status::failed_precondition(
                "Block volumes in use by pods need --freezer-root (the freezer cgroup of the node's pods) to be snapshotted",
            )
        })?;
        for uid in pods {
            for cg in pod_cgroups(root, &uid) {
                freeze_cgroup(&cg)?;
                q.cgroups.push(cg);
            }
        }
    }
    for dev in devices {
        File::open(&dev)
            .and_then(|f| f.sync_all())
            .map_err(|e| Status::internal(format!("flushing {}: {e}", dev.display())))?;
    }
    Ok(q)
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        for cg in self.cgroups.drain(..) {
            if let Err(e) = fs::write(cg.join("freezer.state"), "THAWED") {
                tracing::error!(cgroup = %cg.display(), "cannot thaw: {e}");
            }
        }
        for mount in self.file_systems.drain(..) {
            if let Err(e) = run("fsfreeze", &["--unfreeze"], &mount) {
                tracing::error!(mount = %mount.display(), "cannot thaw: {}", e.message());
            }
        }
    }
}

/// The freezer cgroups named `pod<uid>` under `root` (the kubelet puts a pod under its QoS class).
fn pod_cgroups(root: &Path, uid: &str) -> Vec<PathBuf> {
    let want = format!("pod{uid}");
    let mut out = Vec::new();
    let mut dirs = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if !path.is_dir() {
                continue;
            }
            if e.file_name().to_string_lossy() == want {
                out.push(path);
            } else if depth < 3 {
                dirs.push((path, depth + 1));
            }
        }
    }
    out
}

fn freeze_cgroup(cg: &Path) -> Result<(), Status> {
    let state = cg.join("freezer.state");
    fs::write(&state, "FROZEN")
        .map_err(|e| Status::internal(format!("freezing {}: {e}", cg.display())))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = fs::read_to_string(&state).unwrap_or_default();
        if now.trim() == "FROZEN" {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = fs::write(&state, "THAWED");
            return Err(Status::unavailable(format!(
                "the pod cgroup {} did not freeze within 10 s (state {}); retry the snapshot",
                cg.display(),
                now.trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run(program: &str, args: &[&str], path: &Path) -> Result<(), Status> {
    let out = Command::new(program)
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| Status::internal(format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Status::internal(format!(
            "{program} {} {} failed: {}",
            args.join(" "),
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
