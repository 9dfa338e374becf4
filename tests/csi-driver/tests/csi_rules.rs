//! The test driver against the CSI spec's rules, over its real gRPC socket: idempotency by name,
//! the error codes, exact allocated and changed blocks, paging and resuming, group snapshots,
//! and (as root, with loop devices) stage and publish in both modes.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use understudy_csi_driver::proto::csi::{self, volume_capability as vc};
use understudy_csi_driver::{Driver, server, state::State};

type Controller = csi::controller_client::ControllerClient<Channel>;
type Groups = csi::group_controller_client::GroupControllerClient<Channel>;
type Metadata = csi::snapshot_metadata_client::SnapshotMetadataClient<Channel>;
type Node = csi::node_client::NodeClient<Channel>;

struct Fixture {
    dir: tempfile::TempDir,
    channel: Channel,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Even when a test fails: unmount what it mounted and detach its loop devices.
impl Drop for Fixture {
    fn drop(&mut self) {
        let root = self.dir.path().display().to_string();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.reverse();
        for m in mounts {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status();
        }
        for entry in std::fs::read_dir(self.dir.path().join("state/volumes"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let out = std::process::Command::new("losetup")
                .arg("-j")
                .arg(entry.path())
                .output();
            for line in out
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
                .lines()
            {
                if let Some(dev) = line.split(':').next() {
                    let _ = std::process::Command::new("losetup")
                        .arg("-d")
                        .arg(dev)
                        .status();
                }
            }
        }
    }
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("state")).unwrap();
        let driver = Driver::new("csi.understudy.test".into(), "node-1".into(), state, None);
        let socket = dir.path().join("csi.sock");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let s = socket.clone();
        tokio::spawn(async move {
            server::serve_csi(driver, &s, async {
                let _ = rx.await;
            })
            .await
            .unwrap()
        });
        let channel = connect(&socket).await;
        Fixture {
            dir,
            channel,
            _stop: tx,
        }
    }

    fn controller(&self) -> Controller {
        Controller::new(self.channel.clone())
    }

    fn image(&self, kind: &str, id: &str) -> PathBuf {
        self.dir
            .path()
            .join("state")
            .join(kind)
            .join(format!("{id}.img"))
    }

    async fn volume(&self, name: &str, size: i64, block: bool) -> String {
        let req = volume_request(name, size, block, None);
        self.controller()
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    }

    async fn snapshot(&self, name: &str, volume: &str) -> String {
        let req = csi::CreateSnapshotRequest {
            source_volume_id: volume.into(),
            name: name.into(),
            ..Default::default()
        };
        self.controller()
            .create_snapshot(req)
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
            .snapshot_id
    }

    fn write(&self, volume: &str, at: u64, data: &[u8]) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.image("volumes", volume))
            .unwrap();
        f.write_all_at(data, at).unwrap();
    }
}

async fn connect(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    for _ in 0..100 {
        let s = socket.clone();
        let c = Endpoint::try_from("http://localhost")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let s = s.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(s).await?)) }
            }))
            .await;
        if let Ok(c) = c {
            return c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the driver never listened on {}", socket.display());
}

fn capability(block: bool) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(if block {
            vc::AccessType::Block(Default::default())
        } else {
            vc::AccessType::Mount(vc::MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })
        }),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn volume_request(
    name: &str,
    size: i64,
    block: bool,
    source: Option<csi::volume_content_source::Type>,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability(block)],
        volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        ..Default::default()
    }
}

fn ranges(blocks: &[csi::BlockMetadata]) -> Vec<(i64, i64)> {
    blocks
        .iter()
        .map(|b| (b.byte_offset, b.byte_offset + b.size_bytes))
        .collect()
}

async fn allocated(
    m: &mut Metadata,
    snapshot: &str,
    from: i64,
    max: i32,
) -> Result<Vec<Vec<(i64, i64)>>, tonic::Status> {
    let req = csi::GetMetadataAllocatedRequest {
        snapshot_id: snapshot.into(),
        starting_offset: from,
        max_results: max,
        secrets: HashMap::new(),
    };
    let mut s = m.get_metadata_allocated(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = s.message().await? {
        assert_eq!(
            msg.block_metadata_type,
            csi::BlockMetadataType::VariableLength as i32
        );
        out.push(ranges(&msg.block_metadata));
    }
    Ok(out)
}

async fn delta(
    m: &mut Metadata,
    base: &str,
    target: &str,
    from: i64,
    max: i32,
) -> Result<Vec<Vec<(i64, i64)>>, tonic::Status> {
    let req = csi::GetMetadataDeltaRequest {
        base_snapshot_id: base.into(),
        target_snapshot_id: target.into(),
        starting_offset: from,
        max_results: max,
        secrets: HashMap::new(),
    };
    let mut s = m.get_metadata_delta(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = s.message().await? {
        out.push(ranges(&msg.block_metadata));
    }
    Ok(out)
}

#[tokio::test]
async fn create_volume_is_idempotent_and_refuses_what_it_cannot_do() {
    let f = Fixture::start().await;
    let mut c = f.controller();
    let a = f.volume("pvc-a", 5000, true).await;
    assert_eq!(
        a,
        f.volume("pvc-a", 5000, true).await,
        "same name, same volume"
    );
    let v = c
        .create_volume(volume_request("pvc-a", 5000, true, None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 8192, "rounded up to whole 4 KiB blocks");
    let code = |r: Result<tonic::Response<csi::CreateVolumeResponse>, tonic::Status>| {
        r.unwrap_err().code()
    };
    assert_eq!(
        code(
            c.create_volume(volume_request("pvc-a", 1 << 20, true, None))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.create_volume(volume_request("", 4096, true, None)).await),
        Code::InvalidArgument
    );
    let mut no_caps = volume_request("pvc-b", 4096, true, None);
    no_caps.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(no_caps).await), Code::InvalidArgument);
    let mut xfs = volume_request("pvc-b", 4096, false, None);
    xfs.volume_capabilities[0].access_type = Some(vc::AccessType::Mount(vc::MountVolume {
        fs_type: "xfs".into(),
        ..Default::default()
    }));
    assert_eq!(code(c.create_volume(xfs).await), Code::InvalidArgument);
    let mut limited = volume_request("pvc-b", 5000, true, None);
    limited.capacity_range = Some(csi::CapacityRange {
        required_bytes: 5000,
        limit_bytes: 6000,
    });
    assert_eq!(code(c.create_volume(limited).await), Code::OutOfRange);
    let from_nothing =
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: "snap-0000000000000000".into(),
        });
    assert_eq!(
        code(
            c.create_volume(volume_request("pvc-c", 4096, true, Some(from_nothing)))
                .await
        ),
        Code::NotFound
    );
    // Deleting is idempotent; an empty id is refused.
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: a.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: a,
        ..Default::default()
    })
    .await
    .unwrap();
    let empty = c
        .delete_volume(csi::DeleteVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn metadata_reports_exactly_the_allocated_and_changed_blocks() {
    let f = Fixture::start().await;
    let vol = f.volume("pvc-m", 64 << 20, true).await;
    f.write(&vol, 0, &[1; 4096]);
    f.write(&vol, 8 << 20, &[2; 12288]);
    let s1 = f.snapshot("s1", &vol).await;
    f.write(&vol, 4096 * 3, b"x"); // a new block
    f.write(&vol, (8 << 20) + 4096, &[9; 4096]); // the middle block of the 12 KiB run
    f.write(&vol, 0, &[1; 4096]); // the same bytes again: no change
    let s2 = f.snapshot("s2", &vol).await;
    let mut m = Metadata::new(f.channel.clone());
    let all: Vec<_> = allocated(&mut m, &s1, 0, 0).await.unwrap().concat();
    assert_eq!(all, vec![(0, 4096), (8 << 20, (8 << 20) + 12288)]);
    let changed: Vec<_> = delta(&mut m, &s1, &s2, 0, 0).await.unwrap().concat();
    assert_eq!(
        changed,
        vec![(12288, 16384), ((8 << 20) + 4096, (8 << 20) + 8192)]
    );
    // One tuple per message, and a caller that lost the stream resumes after the last range.
    let paged = delta(&mut m, &s1, &s2, 0, 1).await.unwrap();
    assert_eq!(paged.len(), 2);
    let resumed = delta(&mut m, &s1, &s2, paged[0][0].1, 1).await.unwrap();
    assert_eq!(resumed.concat(), paged[1]);
    // Resuming inside a range starts at the block holding the offset.
    let inside = allocated(&mut m, &s1, (8 << 20) + 5000, 0)
        .await
        .unwrap()
        .concat();
    assert_eq!(inside, vec![((8 << 20) + 4096, (8 << 20) + 12288)]);
    // The error codes of the spec.
    assert_eq!(
        allocated(&mut m, "snap-0000000000000000", 0, 0)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        allocated(&mut m, "", 0, 0).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        allocated(&mut m, &s1, (64 << 20) + 1, 0)
            .await
            .unwrap_err()
            .code(),
        Code::OutOfRange
    );
    assert_eq!(
        delta(&mut m, &s1, &s2, -1, 0).await.unwrap_err().code(),
        Code::OutOfRange
    );
    let other = f.volume("pvc-other", 64 << 20, true).await;
    let s3 = f.snapshot("s3", &other).await;
    assert_eq!(
        delta(&mut m, &s1, &s3, 0, 0).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        delta(&mut m, &s2, &s1, 0, 0).await.unwrap_err().code(),
        Code::InvalidArgument,
        "base after target"
    );
}

#[tokio::test]
async fn volumes_from_snapshots_and_clones_hold_the_source_bytes() {
    let f = Fixture::start().await;
    let mut c = f.controller();
    let vol = f.volume("pvc-src", 16 << 20, true).await;
    f.write(&vol, 1 << 20, b"at the snapshot");
    let snap = f.snapshot("snap", &vol).await;
    f.write(&vol, 1 << 20, b"after the snap!");
    // Same name, other volume: a conflict; same name, same volume: the same snapshot.
    let again = csi::CreateSnapshotRequest {
        source_volume_id: vol.clone(),
        name: "snap".into(),
        ..Default::default()
    };
    assert_eq!(
        c.create_snapshot(again)
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
            .snapshot_id,
        snap
    );
    let other = f.volume("pvc-x", 4096, true).await;
    let clash = csi::CreateSnapshotRequest {
        source_volume_id: other,
        name: "snap".into(),
        ..Default::default()
    };
    assert_eq!(
        c.create_snapshot(clash).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let from_snap =
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: snap.clone(),
        });
    let restored = c
        .create_volume(volume_request("pvc-r", 0, true, Some(from_snap)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        restored.capacity_bytes,
        16 << 20,
        "no size asked: the snapshot's"
    );
    let from_vol =
        csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: vol.clone(),
        });
    let clone = c
        .create_volume(volume_request("pvc-c", 32 << 20, true, Some(from_vol)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let read = |id: &str| {
        let mut buf = [0u8; 15];
        std::fs::File::open(f.image("volumes", id))
            .unwrap()
            .read_exact_at(&mut buf, 1 << 20)
            .unwrap();
        buf
    };
    assert_eq!(&read(&restored.volume_id), b"at the snapshot");
    assert_eq!(&read(&clone.volume_id), b"after the snap!");
    assert_eq!(
        std::fs::metadata(f.image("volumes", &clone.volume_id))
            .unwrap()
            .len(),
        32 << 20
    );
    let small =
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: snap.clone(),
        });
    let mut too_small = volume_request("pvc-s", 4096, true, Some(small));
    too_small.capacity_range = Some(csi::CapacityRange {
        required_bytes: 4096,
        limit_bytes: 4096,
    });
    assert_eq!(
        c.create_volume(too_small).await.unwrap_err().code(),
        Code::OutOfRange
    );
    c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap,
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn group_snapshots_are_idempotent_and_delete_their_members() {
    let f = Fixture::start().await;
    let mut g = Groups::new(f.channel.clone());
    let (a, b) = (
        f.volume("pvc-a", 1 << 20, true).await,
        f.volume("pvc-b", 1 << 20, false).await,
    );
    f.write(&a, 0, b"a1");
    f.write(&b, 0, b"b1");
    let req = |vols: Vec<String>| csi::CreateVolumeGroupSnapshotRequest {
        name: "group-1".into(),
        source_volume_ids: vols,
        ..Default::default()
    };
    let made = g
        .create_volume_group_snapshot(req(vec![a.clone(), b.clone()]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(made.snapshots.len(), 2);
    assert!(made.ready_to_use);
    assert!(
        made.snapshots
            .iter()
            .all(|s| s.group_snapshot_id == made.group_snapshot_id)
    );
    let again = g
        .create_volume_group_snapshot(req(vec![b.clone(), a.clone()]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(again.group_snapshot_id, made.group_snapshot_id);
    assert_eq!(
        g.create_volume_group_snapshot(req(vec![a.clone()]))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    assert_eq!(
        g.create_volume_group_snapshot(req(vec![]))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let missing = req(vec![a.clone(), "vol-0000000000000000".into()]);
    let missing = csi::CreateVolumeGroupSnapshotRequest {
        name: "group-2".into(),
        ..missing
    };
    assert_eq!(
        g.create_volume_group_snapshot(missing)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let get = csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: made.group_snapshot_id.clone(),
        ..Default::default()
    };
    assert_eq!(
        g.get_volume_group_snapshot(get.clone())
            .await
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap()
            .snapshots
            .len(),
        2
    );
    let members: Vec<String> = made
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    let del = csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: made.group_snapshot_id.clone(),
        snapshot_ids: members.clone(),
        ..Default::default()
    };
    g.delete_volume_group_snapshot(del.clone()).await.unwrap();
    g.delete_volume_group_snapshot(del).await.unwrap();
    assert_eq!(
        g.get_volume_group_snapshot(get).await.unwrap_err().code(),
        Code::NotFound
    );
    for m in members {
        assert!(
            !f.image("snapshots", &m).exists(),
            "member {m} deleted with its group"
        );
    }
}

/// Root and loop devices: stage and publish for real, in both modes.
fn can_attach() -> bool {
    let root = rustix::process::geteuid().is_root() && Path::new("/dev/loop-control").exists();
    if !root {
        eprintln!("SKIP: stage/publish needs root and loop devices");
    }
    root
}

#[tokio::test]
async fn stage_and_publish_both_modes_then_leave_nothing_attached() {
    if !can_attach() {
        return;
    }
    let f = Fixture::start().await;
    let mut n = Node::new(f.channel.clone());
    let mut c = f.controller();
    let block = f.volume("pvc-block", 16 << 20, true).await;
    let fsvol = f.volume("pvc-fs", 64 << 20, false).await;
    let root = f.dir.path().join("kubelet");
    let mut targets = Vec::new();
    for (vol, is_block) in [(&block, true), (&fsvol, false)] {
        let staging = root.join("staging").join(vol);
        std::fs::create_dir_all(&staging).unwrap();
        let target = root
            .join("pods")
            .join(vol)
            .join(if is_block { "dev" } else { "mount" });
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let stage = csi::NodeStageVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(capability(is_block)),
            ..Default::default()
        };
        n.node_stage_volume(stage.clone()).await.unwrap();
        n.node_stage_volume(stage).await.unwrap(); // idempotent
        let publish = csi::NodePublishVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(capability(is_block)),
            ..Default::default()
        };
        n.node_publish_volume(publish.clone()).await.unwrap();
        n.node_publish_volume(publish).await.unwrap();
        targets.push((vol.clone(), staging, target, is_block));
    }
    // Write through what the pods would see.
    let (_, _, dev, _) = &targets[0];
    std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .unwrap()
        .write_all_at(b"through the loop device", 4096)
        .unwrap();
    let (_, _, mnt, _) = &targets[1];
    std::fs::write(mnt.join("hello.txt"), "in ext4").unwrap();
    // A snapshot of the staged file system freezes it, so the copy holds the file.
    let snap = f.snapshot("fs-snap", &fsvol).await;
    for (vol, staging, target, _) in &targets {
        let unpublish = csi::NodeUnpublishVolumeRequest {
            volume_id: vol.clone(),
            target_path: target.display().to_string(),
        };
        n.node_unpublish_volume(unpublish.clone()).await.unwrap();
        n.node_unpublish_volume(unpublish).await.unwrap();
        assert!(!target.exists());
        let unstage = csi::NodeUnstageVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging.display().to_string(),
        };
        n.node_unstage_volume(unstage.clone()).await.unwrap();
        n.node_unstage_volume(unstage).await.unwrap();
    }
    let mut buf = [0u8; 23];
    std::fs::File::open(f.image("volumes", &block))
        .unwrap()
        .read_exact_at(&mut buf, 4096)
        .unwrap();
    assert_eq!(&buf, b"through the loop device");
    // The restored file system mounts and holds the file.
    let from =
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: snap,
        });
    let restored = c
        .create_volume(volume_request("pvc-restored", 0, false, Some(from)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = root.join("staging").join(&restored);
    let stage = csi::NodeStageVolumeRequest {
        volume_id: restored.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(capability(false)),
        ..Default::default()
    };
    n.node_stage_volume(stage).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(staging.join("hello.txt")).unwrap(),
        "in ext4"
    );
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: restored.clone(),
        staging_target_path: staging.display().to_string(),
    };
    n.node_unstage_volume(unstage).await.unwrap();
    for vol in [&block, &fsvol, &restored] {
        let out = std::process::Command::new("losetup")
            .arg("-j")
            .arg(f.image("volumes", vol))
            .output()
            .unwrap();
        assert!(
            out.stdout.is_empty(),
            "a loop device is left on {vol}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Publishing what is not staged is refused.
    let publish = csi::NodePublishVolumeRequest {
        volume_id: block.clone(),
        staging_target_path: "/nonexistent".into(),
        target_path: root.join("x").display().to_string(),
        volume_capability: Some(capability(true)),
        ..Default::default()
    };
    assert_eq!(
        n.node_publish_volume(publish).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}
