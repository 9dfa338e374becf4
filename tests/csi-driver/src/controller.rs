//! The Controller and GroupController services: volumes (empty, from a snapshot, cloned from a
//! volume), snapshots and group snapshots. Requests are idempotent by name, as the CSI spec
//! requires: the same name gives the same object, a conflicting one ALREADY_EXISTS.

use std::fs::File;

use tonic::{Request, Response, Status};

use crate::extents::{BLOCK, copy_sparse};
use crate::freeze::quiesce;
use crate::proto::csi::{
    self, controller_service_capability as ccap, group_controller_service_capability as gcap,
    volume_capability::{AccessType, access_mode::Mode},
    volume_content_source as source,
};
use crate::state::{self, Group, Kind, Origin, Snapshot, State, Volume};
use crate::{Driver, required};

/// A new volume's size when the request names none.
const DEFAULT_CAPACITY: u64 = 1 << 30;

/// INVALID_ARGUMENT unless every capability is one this driver serves: Block, or Mount with ext4.
pub fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    for cap in caps {
        match &cap.access_type {
            Some(AccessType::Block(_)) => {}
            Some(AccessType::Mount(m)) if m.fs_type.is_empty() || m.fs_type == "ext4" => {}
            Some(AccessType::Mount(m)) => {
                return Err(Status::invalid_argument(format!(
                    "fs_type {:?} is not supported: this driver makes ext4 only",
                    m.fs_type
                )));
            }
            None => {
                return Err(Status::invalid_argument(
                    "a volume capability needs an access type (block or mount)",
                ));
            }
        }
        let mode = cap.access_mode.as_ref().map(|m| m.mode).unwrap_or(0);
        if mode == Mode::Unknown as i32 || Mode::try_from(mode).is_err() {
            return Err(Status::invalid_argument(
                "a volume capability needs an access mode",
            ));
        }
    }
    Ok(())
}

/// The size a request asks for, rounded up to whole blocks; `floor` is the least it may be (the
/// source's size), used when the request names no size.
fn capacity(range: Option<&csi::CapacityRange>, floor: u64) -> Result<u64, Status> {
    let (required, limit) = range
        .map(|r| (r.required_bytes, r.limit_bytes))
        .unwrap_or((0, 0));
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument(
            "capacity_range values must not be negative",
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    let want = if required > 0 {
        required
    } else if floor > 0 {
        floor
    } else {
        DEFAULT_CAPACITY
    };
    let size = want.max(floor).div_ceil(BLOCK) * BLOCK;
    if limit > 0 && size > limit {
        return Err(Status::out_of_range(format!(
            "the volume needs {size} bytes (whole 4 KiB blocks, at least the source's {floor}) but limit_bytes is {limit}"
        )));
    }
    Ok(size)
}

impl Driver {
    fn volume(&self, id: &str) -> Result<Volume, Status> {
        self.state
            .load(Kind::Volume, id)?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))
    }

    fn snapshot(&self, id: &str) -> Result<Snapshot, Status> {
        self.state
            .load(Kind::Snapshot, id)?
            .ok_or_else(|| Status::not_found(format!("snapshot {id} does not exist")))
    }

    fn create_volume(
        &self,
        req: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse, Status> {
        let name = required(&req.name, "name")?;
        check_capabilities(&req.volume_capabilities)?;
        let (origin, source_image, floor) = match req
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => (Origin::Empty, None, 0),
            Some(source::Type::Snapshot(s)) => {
                let snap = self.snapshot(required(&s.snapshot_id, "snapshot_id")?)?;
                (
                    Origin::Snapshot(snap.id.clone()),
                    Some(self.state.image(Kind::Snapshot, &snap.id)),
                    snap.capacity,
                )
            }
            Some(source::Type::Volume(v)) => {
                let vol = self.volume(required(&v.volume_id, "volume_id")?)?;
                (
                    Origin::Volume(vol.id.clone()),
                    Some(self.state.image(Kind::Volume, &vol.id)),
                    vol.capacity,
                )
            }
        };
        let size = capacity(req.capacity_range.as_ref(), floor)?;
        let id = State::id_for(Kind::Volume, name);
        if let Some(existing) = self.state.load::<Volume>(Kind::Volume, &id)? {
            let limit = req
                .capacity_range
                .as_ref()
                .map(|r| r.limit_bytes as u64)
                .unwrap_or(0);
            let fits = existing.capacity >= size && (limit == 0 || existing.capacity <= limit);
            if existing.origin != origin || !fits {
                return Err(Status::already_exists(format!(
                    "volume {name} exists with {} bytes from {:?}, not {size} bytes from {origin:?}",
                    existing.capacity, existing.origin
                )));
            }
            return Ok(volume_response(&existing, req.volume_content_source));
        }
        self.state
            .make_image(Kind::Volume, &id, |f| match &source_image {
                None => f.set_len(size).and_then(|()| f.sync_all()),
                Some(src) => copy_sparse(&File::open(src)?, f, size),
            })?;
        let vol = Volume {
            id: id.clone(),
            name: name.into(),
            capacity: size,
            origin,
        };
        self.state.save(Kind::Volume, &id, &vol)?;
        tracing::info!(volume = %id, name, size, "created volume");
        Ok(volume_response(&vol, req.volume_content_source))
    }

    fn delete_volume(
        &self,
        req: csi::DeleteVolumeRequest,
    ) -> Result<csi::DeleteVolumeResponse, Status> {
        let id = required(&req.volume_id, "volume_id")?;
        if self.state.load::<Volume>(Kind::Volume, id)?.is_none() {
            return Ok(csi::DeleteVolumeResponse {});
        }
        if self.state.stage(id)?.is_some() {
            return Err(Status::failed_precondition(format!(
                "volume {id} is still staged on node {}; unstage it first",
                self.node_id
            )));
        }
        self.state.remove(Kind::Volume, id)?;
        tracing::info!(volume = %id, "deleted volume");
        Ok(csi::DeleteVolumeResponse {})
    }

    /// Cuts one snapshot of each volume at one instant: writes to all are stopped, all are
    /// copied, then writes go on. `snapshot_ids` holds one id per volume.
    fn take(
        &self,
        volume_ids: &[String],
        snapshot_ids: &[String],
        group: Option<&str>,
    ) -> Result<Vec<Snapshot>, Status> {
        let volumes = volume_ids
            .iter()
            .map(|v| self.volume(v))
            .collect::<Result<Vec<_>, _>>()?;
        let taken = {
            let _stopped = quiesce(&self.state, self.freezer_root.as_deref(), volume_ids)?;
            let taken = state::now();
            for (vol, sid) in volumes.iter().zip(snapshot_ids) {
                let src = self.state.image(Kind::Volume, &vol.id);
                self.state.make_image(Kind::Snapshot, sid, |f| {
                    copy_sparse(&File::open(&src)?, f, vol.capacity)
                })?;
            }
            taken
        };
        let mut out = Vec::new();
        for (vol, sid) in volumes.iter().zip(snapshot_ids) {
            let snap = Snapshot {
                id: sid.clone(),
                volume_id: vol.id.clone(),
                capacity: vol.capacity,
                taken,
                group: group.map(str::to_string),
            };
            self.state.save(Kind::Snapshot, sid, &snap)?;
            out.push(snap);
        }
        Ok(out)
    }

    fn create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse, Status> {
        let name = required(&req.name, "name")?;
        let volume = required(&req.source_volume_id, "source_volume_id")?;
        let id = State::id_for(Kind::Snapshot, name);
        if let Some(existing) = self.state.load::<Snapshot>(Kind::Snapshot, &id)? {
            if existing.volume_id != volume {
                return Err(Status::already_exists(format!(
                    "snapshot {name} exists of volume {}, not {volume}",
                    existing.volume_id
                )));
            }
            return Ok(csi::CreateSnapshotResponse {
                snapshot: Some(snapshot_message(&existing)),
            });
        }
        let mut snaps = self.take(&[volume.to_string()], &[id], None)?;
        let snap = snaps.pop().expect("one snapshot per volume");
        tracing::info!(snapshot = %snap.id, volume, "created snapshot");
        Ok(csi::CreateSnapshotResponse {
            snapshot: Some(snapshot_message(&snap)),
        })
    }

    fn delete_snapshot(
        &self,
        req: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse, Status> {
        let id = required(&req.snapshot_id, "snapshot_id")?;
        if self.state.load::<Snapshot>(Kind::Snapshot, id)?.is_some() {
            self.state.remove(Kind::Snapshot, id)?;
            tracing::info!(snapshot = %id, "deleted snapshot");
        }
        Ok(csi::DeleteSnapshotResponse {})
    }

    fn create_group(
        &self,
        req: csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::CreateVolumeGroupSnapshotResponse, Status> {
        let name = required(&req.name, "name")?;
        if req.source_volume_ids.is_empty() {
            return Err(Status::invalid_argument("source_volume_ids is required"));
        }
        let mut volumes = req.source_volume_ids.clone();
        volumes.sort();
        volumes.dedup();
        let id = State::id_for(Kind::Group, name);
        if let Some(existing) = self.state.load::<Group>(Kind::Group, &id)? {
            let mut had = existing.volumes.clone();
            had.sort();
            if had != volumes {
                return Err(Status::already_exists(format!(
                    "group snapshot {name} exists of volumes {:?}, not {volumes:?}",
                    existing.volumes
                )));
            }
            return Ok(csi::CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(self.group_message(&existing)?),
            });
        }
        let snapshot_ids: Vec<String> = volumes
            .iter()
            .map(|v| State::id_for(Kind::Snapshot, &format!("{name}/{v}")))
            .collect();
        let snaps = self.take(&volumes, &snapshot_ids, Some(&id))?;
        let group = Group {
            id: id.clone(),
            name: name.into(),
            volumes,
            snapshots: snapshot_ids,
            taken: snaps[0].taken,
        };
        self.state.save(Kind::Group, &id, &group)?;
        tracing::info!(group = %id, members = group.snapshots.len(), "created group snapshot");
        Ok(csi::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(self.group_message(&group)?),
        })
    }

    fn delete_group(
        &self,
        req: csi::DeleteVolumeGroupSnapshotRequest,
    ) -> Result<csi::DeleteVolumeGroupSnapshotResponse, Status> {
        let id = required(&req.group_snapshot_id, "group_snapshot_id")?;
        let Some(group) = self.state.load::<Group>(Kind::Group, id)? else {
            return Ok(csi::DeleteVolumeGroupSnapshotResponse {});
        };
        if let Some(stray) = req
            .snapshot_ids
            .iter()
            .find(|s| !group.snapshots.contains(s))
        {
            return Err(Status::failed_precondition(format!(
                "snapshot {stray} is not a member of group snapshot {id}"
            )));
        }
        for sid in &group.snapshots {
            self.state.remove(Kind::Snapshot, sid)?;
        }
        self.state.remove(Kind::Group, id)?;
        tracing::info!(group = %id, "deleted group snapshot");
        Ok(csi::DeleteVolumeGroupSnapshotResponse {})
    }

    fn get_group(
        &self,
        req: csi::GetVolumeGroupSnapshotRequest,
    ) -> Result<csi::GetVolumeGroupSnapshotResponse, Status> {
        let id = required(&req.group_snapshot_id, "group_snapshot_id")?;
        let group = self
            .state
            .load::<Group>(Kind::Group, id)?
            .ok_or_else(|| Status::not_found(format!("group snapshot {id} does not exist")))?;
        Ok(csi::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(self.group_message(&group)?),
        })
    }

    fn group_message(&self, group: &Group) -> Result<csi::VolumeGroupSnapshot, Status> {
        let snapshots = group
            .snapshots
            .iter()
            .map(|s| self.snapshot(s).map(|s| snapshot_message(&s)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(csi::VolumeGroupSnapshot {
            group_snapshot_id: group.id.clone(),
            snapshots,
            creation_time: Some(timestamp(group.taken)),
            ready_to_use: true,
        })
    }
}

fn volume_response(
    vol: &Volume,
    content_source: Option<csi::VolumeContentSource>,
) -> csi::CreateVolumeResponse {
    csi::CreateVolumeResponse {
        volume: Some(csi::Volume {
            capacity_bytes: vol.capacity as i64,
            volume_id: vol.id.clone(),
            content_source,
            ..Default::default()
        }),
    }
}

fn snapshot_message(s: &Snapshot) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.capacity as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.volume_id.clone(),
        creation_time: Some(timestamp(s.taken)),
        ready_to_use: true,
        group_snapshot_id: s.group.clone().unwrap_or_default(),
    }
}

fn timestamp((seconds, nanos): (i64, i32)) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos }
}

fn controller_capabilities() -> Vec<csi::ControllerServiceCapability> {
    use ccap::rpc::Type;
    [
        Type::CreateDeleteVolume,
        Type::CreateDeleteSnapshot,
        Type::CloneVolume,
    ]
    .into_iter()
    .map(|t| csi::ControllerServiceCapability {
        r#type: Some(ccap::Type::Rpc(ccap::Rpc { r#type: t as i32 })),
    })
    .collect()
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Driver {
    async fn create_volume(
        &self,
        r: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        self.locked(move |d| d.create_volume(r.into_inner())).await
    }

    async fn delete_volume(
        &self,
        r: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        self.locked(move |d| d.delete_volume(r.into_inner())).await
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = r.into_inner();
        self.locked(move |d| {
            d.volume(required(&req.volume_id, "volume_id")?)?;
            if req.volume_capabilities.is_empty() {
                return Err(Status::invalid_argument("volume_capabilities is required"));
            }
            Ok(match check_capabilities(&req.volume_capabilities) {
                Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                        volume_context: req.volume_context,
                        volume_capabilities: req.volume_capabilities,
                        parameters: req.parameters,
                        mutable_parameters: req.mutable_parameters,
                    }),
                    message: String::new(),
                },
                Err(e) => csi::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: e.message().into(),
                },
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: controller_capabilities(),
        }))
    }

    async fn create_snapshot(
        &self,
        r: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        self.locked(move |d| d.create_snapshot(r.into_inner()))
            .await
    }

    async fn delete_snapshot(
        &self,
        r: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        self.locked(move |d| d.delete_snapshot(r.into_inner()))
            .await
    }
}

#[tonic::async_trait]
impl csi::group_controller_server::GroupController for Driver {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        let t = gcap::rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32;
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![csi::GroupControllerServiceCapability {
                r#type: Some(gcap::Type::Rpc(gcap::Rpc { r#type: t })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        r: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        self.locked(move |d| d.create_group(r.into_inner())).await
    }

    async fn delete_volume_group_snapshot(
        &self,
        r: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        self.locked(move |d| d.delete_group(r.into_inner())).await
    }

    async fn get_volume_group_snapshot(
        &self,
        r: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        self.locked(move |d| d.get_group(r.into_inner())).await
    }
}
