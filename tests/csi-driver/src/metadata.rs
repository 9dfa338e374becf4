//! The CSI SnapshotMetadata service: the allocated blocks of a snapshot and the blocks that
//! changed between two snapshots of one volume, as variable-length ranges aligned to 4 KiB,
//! paged (`max_results`) and resumable from `starting_offset`.

use std::fs::File;
use std::ops::Range;

use tonic::{Request, Response, Status};

use crate::extents::{allocated, changed, from_offset};
use crate::proto::csi::{self, BlockMetadataType};
use crate::state::{Kind, Snapshot, internal};
use crate::{Driver, required};

/// Tuples per message when the request leaves it to the driver.
const DEFAULT_PAGE: usize = 256;

/// One message's worth of ranges.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    /// The volume's size.
    pub capacity: u64,
    /// The ranges in this message.
    pub ranges: Vec<Range<u64>>,
}

/// Splits `ranges` from `starting_offset` into messages of at most `max_results` tuples (the
/// driver's default when 0); one empty message when nothing is left, so the caller still learns
/// the volume's size.
pub fn pages(
    ranges: &[Range<u64>],
    capacity: u64,
    starting_offset: i64,
    max_results: i32,
) -> Result<Vec<Page>, Status> {
    if starting_offset < 0 || starting_offset as u64 > capacity {
        return Err(Status::out_of_range(format!(
            "starting_offset {starting_offset} is outside the volume (0..={capacity})"
        )));
    }
    if max_results < 0 {
        return Err(Status::invalid_argument("max_results must not be negative"));
    }
    let per = if max_results == 0 {
        DEFAULT_PAGE
    } else {
        max_results as usize
    };
    let left = from_offset(ranges, starting_offset as u64);
    if left.is_empty() {
        return Ok(vec![Page {
            capacity,
            ranges: Vec::new(),
        }]);
    }
    Ok(left
        .chunks(per)
        .map(|c| Page {
            capacity,
            ranges: c.to_vec(),
        })
        .collect())
}

impl Driver {
    fn snapshot_image(&self, id: &str) -> Result<(Snapshot, File), Status> {
        let snap: Snapshot = self
            .state
            .load(Kind::Snapshot, id)?
            .ok_or_else(|| Status::not_found(format!("snapshot {id} does not exist")))?;
        let path = self.state.image(Kind::Snapshot, id);
        let file =
            File::open(&path).map_err(|e| internal(&format!("opening {}", path.display()), e))?;
        Ok((snap, file))
    }

    fn allocated_pages(&self, req: &csi::GetMetadataAllocatedRequest) -> Result<Vec<Page>, Status> {
        let (snap, file) = self.snapshot_image(required(&req.snapshot_id, "snapshot_id")?)?;
        let ranges = allocated(&file, snap.capacity)
            .map_err(|e| internal("reading the snapshot's extents", e))?;
        pages(&ranges, snap.capacity, req.starting_offset, req.max_results)
    }

    fn delta_pages(&self, req: &csi::GetMetadataDeltaRequest) -> Result<Vec<Page>, Status> {
        let (base, base_file) =
            self.snapshot_image(required(&req.base_snapshot_id, "base_snapshot_id")?)?;
        let (target, target_file) =
            self.snapshot_image(required(&req.target_snapshot_id, "target_snapshot_id")?)?;
        if base.volume_id != target.volume_id {
            return Err(Status::invalid_argument(format!(
                "snapshots {} and {} are of different volumes ({} and {})",
                base.id, target.id, base.volume_id, target.volume_id
            )));
        }
        if base.taken > target.taken {
            return Err(Status::invalid_argument(format!(
                "base snapshot {} was taken after target snapshot {}",
                base.id, target.id
            )));
        }
        let ranges = changed(&base_file, &target_file, target.capacity)
            .map_err(|e| internal("comparing the snapshots", e))?;
        pages(
            &ranges,
            target.capacity,
            req.starting_offset,
            req.max_results,
        )
    }
}

fn metadata(ranges: &[Range<u64>]) -> Vec<csi::BlockMetadata> {
    ranges
        .iter()
        .map(|r| csi::BlockMetadata {
            byte_offset: r.start as i64,
            size_bytes: (r.end - r.start) as i64,
        })
        .collect()
}

type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

async fn computed(
    d: &Driver,
    f: impl FnOnce(&Driver) -> Result<Vec<Page>, Status> + Send + 'static,
) -> Result<Vec<Page>, Status> {
    // Snapshot images never change once made, so reading them needs no lock.
    let d = d.clone();
    tokio::task::spawn_blocking(move || f(&d))
        .await
        .map_err(|e| Status::internal(format!("the metadata scan panicked: {e}")))?
}

#[tonic::async_trait]
impl csi::snapshot_metadata_server::SnapshotMetadata for Driver {
    async fn get_metadata_allocated(
        &self,
        r: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Stream<csi::GetMetadataAllocatedResponse>>, Status> {
        let req = r.into_inner();
        let pages = computed(self, move |d| d.allocated_pages(&req)).await?;
        let msgs: Vec<_> = pages
            .into_iter()
            .map(|p| {
                Ok(csi::GetMetadataAllocatedResponse {
                    block_metadata_type: BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: p.capacity as i64,
                    block_metadata: metadata(&p.ranges),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }

    async fn get_metadata_delta(
        &self,
        r: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Stream<csi::GetMetadataDeltaResponse>>, Status> {
        let req = r.into_inner();
        let pages = computed(self, move |d| d.delta_pages(&req)).await?;
        let msgs: Vec<_> = pages
            .into_iter()
            .map(|p| {
                Ok(csi::GetMetadataDeltaResponse {
                    block_metadata_type: BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: p.capacity as i64,
                    block_metadata: metadata(&p.ranges),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_respect_the_offset_and_the_page_size() {
        let r = vec![0..4096, 8192..12288, 16384..20480];
        let p = pages(&r, 1 << 20, 0, 2).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].ranges, vec![0..4096, 8192..12288]);
        assert_eq!(
            pages(&r, 1 << 20, 12288, 0).unwrap()[0].ranges,
            vec![16384..20480]
        );
        assert!(pages(&r, 1 << 20, 1 << 20, 0).unwrap()[0].ranges.is_empty());
        assert_eq!(
            pages(&r, 1 << 20, -1, 0).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            pages(&r, 1 << 20, (1 << 20) + 1, 0).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            pages(&r, 1 << 20, 0, -1).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
