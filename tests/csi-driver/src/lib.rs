//! A CSI driver for Understudy's test bed, and only for it: no reference driver is served on the
//! machines the tests run on, so the test bed brings its own. It is block-backed like the drivers
//! users run (EBS, Ceph RBD, Longhorn): every volume is a sparse image file on the node; a Block
//! volume is a loop device handed to the pod, a Filesystem volume an ext4 made on the loop device
//! at first stage. Snapshots are sparse copies cut while writes are stopped (see [`freeze`]);
//! group snapshots stop every member before copying any. The CSI SnapshotMetadata service
//! reports allocated and changed blocks exactly to 4 KiB. One process serves the controller,
//! the node, the group controller, the snapshot-metadata service and the kubelet's plugin
//! registration. Not for production: one node, no topology, no expansion, no access control.

pub mod authority;
pub mod controller;
pub mod extents;
pub mod freeze;
pub mod identity;
pub mod metadata;
pub mod node;
pub mod proto;
pub mod server;
pub mod state;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tonic::{Response, Status};

use state::State;

/// The driver: one per process, cloned into every gRPC service.
#[derive(Clone, Debug)]
pub struct Driver {
    /// The CSI driver name (the provisioner name in a StorageClass).
    pub name: String,
    /// This node's id (NodeGetInfo).
    pub node_id: String,
    /// The freezer cgroup holding the node's pods (see [`freeze`]).
    pub freezer_root: Option<PathBuf>,
    state: State,
    /// One mutating operation at a time: the CO may retry or race requests for one object.
    lock: Arc<Mutex<()>>,
}

impl Driver {
    /// A driver keeping its volumes and records in `state`.
    pub fn new(name: String, node_id: String, state: State, freezer_root: Option<PathBuf>) -> Self {
        Driver {
            name,
            node_id,
            freezer_root,
            state,
            lock: Arc::new(Mutex::new(())),
        }
    }

    /// Runs `f` on a blocking thread, holding the operation lock.
    async fn locked<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Driver) -> Result<T, Status> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let d = self.clone();
        tokio::task::spawn_blocking(move || {
            let _held = d.lock.lock().unwrap_or_else(|p| p.into_inner());
            f(&d)
        })
        .await
        .map_err(|e| Status::internal(format!("the operation panicked: {e}")))?
        .map(Response::new)
    }
}

/// INVALID_ARGUMENT when a required string field is empty.
fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}
