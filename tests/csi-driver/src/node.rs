//! The Node service. Stage attaches the volume's image to a loop device and, in Filesystem mode,
//! makes an ext4 on it the first time and mounts it at the staging path. Publish hands the pod
//! its view: a bind mount of the staged file system, or of the loop device node onto the target
//! file (Block mode). Every step is idempotent, as the kubelet retries them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use tonic::{Request, Response, Status};

use crate::controller::check_capabilities;
use crate::proto::csi::{self, node_service_capability as ncap, volume_capability::AccessType};
use crate::state::{Kind, Publication, Stage, Volume, internal};
use crate::{Driver, required};

/// The volume-context key the kubelet fills with the pod's uid (CSIDriver `podInfoOnMount`).
const POD_UID: &str = "csi.storage.k8s.io/pod.uid";

fn is_block(cap: Option<&csi::VolumeCapability>) -> Result<bool, Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    check_capabilities(std::slice::from_ref(cap))?;
    Ok(matches!(cap.access_type, Some(AccessType::Block(_))))
}

impl Driver {
    fn stage(
        &self,
        req: csi::NodeStageVolumeRequest,
    ) -> Result<csi::NodeStageVolumeResponse, Status> {
        let id = required(&req.volume_id, "volume_id")?;
        let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
        let block = is_block(req.volume_capability.as_ref())?;
        let vol: Volume = self
            .state
            .load(Kind::Volume, id)?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        if let Some(stage) = self.state.stage(id)? {
            return match (block, &stage.mount) {
                (true, None) => Ok(csi::NodeStageVolumeResponse {}),
                (false, Some(m)) if *m == staging => Ok(csi::NodeStageVolumeResponse {}),
                _ => Err(Status::already_exists(format!(
                    "volume {id} is already staged differently ({stage:?}); unstage it first"
                ))),
            };
        }
        let device = attach(&self.state.image(Kind::Volume, &vol.id))?;
        let mount = if block {
            None
        } else {
            if let Err(e) = format_and_mount(&device, &staging) {
                let _ = detach(&device);
                return Err(e);
            }
            Some(staging)
        };
        self.state.set_stage(id, Some(&Stage { device, mount }))?;
        Ok(csi::NodeStageVolumeResponse {})
    }

    fn unstage(
        &self,
        req: csi::NodeUnstageVolumeRequest,
    ) -> Result<csi::NodeUnstageVolumeResponse, Status> {
        let id = required(&req.volume_id, "volume_id")?;
        required(&req.staging_target_path, "staging_target_path")?;
        let Some(stage) = self.state.stage(id)? else {
            return Ok(csi::NodeUnstageVolumeResponse {});
        };
        if let Some(m) = &stage.mount {
            unmount(m)?;
        }
        detach(&stage.device)?;
        self.state.set_stage(id, None)?;
        Ok(csi::NodeUnstageVolumeResponse {})
    }

    fn publish(
        &self,
        req: csi::NodePublishVolumeRequest,
    ) -> Result<csi::NodePublishVolumeResponse, Status> {
        let id = required(&req.volume_id, "volume_id")?;
        let target = PathBuf::from(required(&req.target_path, "target_path")?);
        required(&req.staging_target_path, "staging_target_path")?;
        let block = is_block(req.volume_capability.as_ref())?;
        let stage = self.state.stage(id)?.ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {id} is not staged on this node; stage it first"
            ))
        })?;
        if block != stage.mount.is_none() {
            return Err(Status::invalid_argument(format!(
                "volume {id} is staged in {} mode but published in {} mode",
                if stage.mount.is_none() {
                    "Block"
                } else {
                    "Filesystem"
                },
                if block { "Block" } else { "Filesystem" }
            )));
        }
        if !is_mounted(&target)? {
            let source = stage.mount.as_ref().unwrap_or(&stage.device);
            bind(source, &target, block, req.readonly)?;
        }
        let publication = Publication {
            target: target.clone(),
            pod_uid: req.volume_context.get(POD_UID).cloned(),
        };
        self.state
            .set_publication(id, &target, Some(&publication))?;
        Ok(csi::NodePublishVolumeResponse {})
    }

    fn unpublish(
        &self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> Result<csi::NodeUnpublishVolumeResponse, Status> {
        let id = required(&req.volume_id, "volume_id")?;
        let target = PathBuf::from(required(&req.target_path, "target_path")?);
        if is_mounted(&target)? {
            unmount(&target)?;
        }
        let removed = if target.is_dir() {
            fs::remove_dir(&target)
        } else {
            fs::remove_file(&target)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal(&format!("removing {}", target.display()), e)),
        }
        self.state.set_publication(id, &target, None)?;
        Ok(csi::NodeUnpublishVolumeResponse {})
    }
}

/// A loop device over `image` (the one already attached, if any).
fn attach(image: &Path) -> Result<PathBuf, Status> {
    let found = run("losetup", &["-j".as_ref(), image.as_os_str()])?;
    if let Some(dev) = found.split(':').next().filter(|d| !d.trim().is_empty()) {
        return Ok(PathBuf::from(dev.trim()));
    }
    let dev = run(
        "losetup",
        &["--find".as_ref(), "--show".as_ref(), image.as_os_str()],
    )?;
    Ok(PathBuf::from(dev.trim()))
}

fn detach(device: &Path) -> Result<(), Status> {
    run("losetup", &["-d".as_ref(), device.as_os_str()]).map(drop)
}

/// Makes an ext4 on `device` unless it holds a file system already, and mounts it at `at`.
fn format_and_mount(device: &Path, at: &Path) -> Result<(), Status> {
    let probe = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .output()
        .map_err(|e| Status::internal(format!("cannot run blkid: {e}")))?;
    let fs_type = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    match fs_type.as_str() {
        // blkid exits 2 when it finds nothing: a new volume.
        "" => {
            run(
                "mkfs.ext4",
                &[
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-E".as_ref(),
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard".as_ref(),
                    device.as_os_str(),
                ],
            )?;
        }
        "ext4" => {}
        other => {
            return Err(Status::failed_precondition(format!(
                "{} holds a {other} file system, not ext4; this driver mounts ext4 only",
                device.display()
            )));
        }
    }
    fs::create_dir_all(at).map_err(|e| internal(&format!("creating {}", at.display()), e))?;
    if !is_mounted(at)? {
        rustix::mount::mount(device, at, "ext4", MountFlags::empty(), None).map_err(|e| {
            internal(
                &format!("mounting {} on {}", device.display(), at.display()),
                e,
            )
        })?;
    }
    Ok(())
}

/// Bind-mounts `source` (a directory, or a device node when `block`) onto `target`.
fn bind(source: &Path, target: &Path, block: bool, readonly: bool) -> Result<(), Status> {
    let made = if block {
        target
            .parent()
            .map(fs::create_dir_all)
            .transpose()
            .and_then(|_| {
                fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(target)
                    .map(drop)
            })
    } else {
        fs::create_dir_all(target)
    };
    made.map_err(|e| internal(&format!("creating {}", target.display()), e))?;
    rustix::mount::mount_bind(source, target).map_err(|e| {
        internal(
            &format!("bind-mounting {} on {}", source.display(), target.display()),
            e,
        )
    })?;
    // The pod's mount must not propagate back into the staging mount.
    let _ = rustix::mount::mount_change(target, MountPropagationFlags::PRIVATE);
    if readonly {
        rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "")
            .map_err(|e| internal(&format!("making {} read-only", target.display()), e))?;
    }
    Ok(())
}

fn unmount(path: &Path) -> Result<(), Status> {
    match rustix::mount::unmount(path, UnmountFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(internal(&format!("unmounting {}", path.display()), e)),
    }
}

/// Whether something is mounted exactly at `path` (in this process's mount namespace).
pub fn is_mounted(path: &Path) -> Result<bool, Status> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| internal("reading /proc/self/mountinfo", e))?;
    let want = path.to_string_lossy();
    Ok(info
        .lines()
        .any(|l| l.split(' ').nth(4).map(unescape).as_deref() == Some(&*want)))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<String, Status> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Status::internal(format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(Status::internal(format!(
            "{program} {:?} failed: {}",
            args,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tonic::async_trait]
impl csi::node_server::Node for Driver {
    async fn node_stage_volume(
        &self,
        r: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        self.locked(move |d| d.stage(r.into_inner())).await
    }

    async fn node_unstage_volume(
        &self,
        r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        self.locked(move |d| d.unstage(r.into_inner())).await
    }

    async fn node_publish_volume(
        &self,
        r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        self.locked(move |d| d.publish(r.into_inner())).await
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        self.locked(move |d| d.unpublish(r.into_inner())).await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let t = ncap::rpc::Type::StageUnstageVolume as i32;
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![csi::NodeServiceCapability {
                r#type: Some(ncap::Type::Rpc(ncap::Rpc { r#type: t })),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            ..Default::default()
        }))
    }
}
