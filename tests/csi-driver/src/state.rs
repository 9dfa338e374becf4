//! The driver's records on disk: one sparse image per volume and per snapshot, one JSON record
//! beside each, and one record per group snapshot and per staged or published volume. A record
//! is written (atomically, by rename) only after its image is complete, so a crash leaves either
//! nothing or a whole object; a retried request with the same name finds the same id.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::Status;

/// Where a volume's first bytes came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// An empty volume.
    Empty,
    /// A copy of a snapshot.
    Snapshot(String),
    /// A clone of another volume.
    Volume(String),
}

/// A volume: its image is `volumes/<id>.img`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Volume {
    /// The volume id handed to the CO.
    pub id: String,
    /// The name the CO asked for (idempotency key).
    pub name: String,
    /// Size in bytes, a multiple of the block size.
    pub capacity: u64,
    /// What it was created from.
    pub origin: Origin,
}

/// A snapshot: its image is `snapshots/<id>.img`, a copy of the volume at one instant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The snapshot id handed to the CO.
    pub id: String,
    /// The volume it was taken of.
    pub volume_id: String,
    /// The volume's size when it was taken.
    pub capacity: u64,
    /// When it was taken (seconds, nanoseconds since the epoch).
    pub taken: (i64, i32),
    /// The group snapshot it belongs to, if any.
    pub group: Option<String>,
}

/// A group snapshot: member snapshots of several volumes taken at one instant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Group {
    /// The group snapshot id.
    pub id: String,
    /// The name the CO asked for.
    pub name: String,
    /// The source volumes, in request order.
    pub volumes: Vec<String>,
    /// The member snapshots, one per volume, same order.
    pub snapshots: Vec<String>,
    /// When it was taken.
    pub taken: (i64, i32),
}

/// How a volume is staged on this node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stage {
    /// The loop device over the image.
    pub device: PathBuf,
    /// Where its file system is mounted (Filesystem mode), `None` for a Block volume.
    pub mount: Option<PathBuf>,
}

/// One pod's use of a volume (NodePublish).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Publication {
    /// The path the kubelet asked for.
    pub target: PathBuf,
    /// The pod's uid (from `csi.storage.k8s.io/pod.uid`), when the kubelet sent it.
    pub pod_uid: Option<String>,
}

/// The kinds of object the driver keeps.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Volumes.
    Volume,
    /// Snapshots.
    Snapshot,
    /// Group snapshots.
    Group,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
            Kind::Group => "groups",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Kind::Volume => "vol",
            Kind::Snapshot => "snap",
            Kind::Group => "group",
        }
    }
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct State {
    root: PathBuf,
}

impl State {
    /// Opens (creating) the state directory.
    pub fn open(root: &Path) -> io::Result<Self> {
        for d in ["volumes", "snapshots", "groups", "node"] {
            fs::create_dir_all(root.join(d))?;
        }
        Ok(State {
            root: root.to_path_buf(),
        })
    }

    /// The id an object of this kind and name gets: the same name always gives the same id, so
    /// a retried create after a crash finds what the first attempt made.
    pub fn id_for(kind: Kind, name: &str) -> String {
        let h = blake3::hash(name.as_bytes());
        format!("{}-{}", kind.prefix(), hex::encode(&h.as_bytes()[..8]))
    }

    /// The image of a volume or snapshot.
    pub fn image(&self, kind: Kind, id: &str) -> PathBuf {
        self.root.join(kind.dir()).join(format!("{id}.img"))
    }

    fn record(&self, kind: Kind, id: &str) -> PathBuf {
        self.root.join(kind.dir()).join(format!("{id}.json"))
    }

    /// Reads a record; `None` when there is none. Ids are checked first, so a request cannot
    /// name a path outside the state directory.
    pub fn load<T: DeserializeOwned>(&self, kind: Kind, id: &str) -> Result<Option<T>, Status> {
        if !valid_id(kind, id) {
            return Ok(None);
        }
        read_json(&self.record(kind, id))
    }

    /// Writes a record atomically.
    pub fn save<T: Serialize>(&self, kind: Kind, id: &str, value: &T) -> Result<(), Status> {
        write_json(&self.record(kind, id), value)
    }

    /// Removes a record and its image (either may already be gone).
    pub fn remove(&self, kind: Kind, id: &str) -> Result<(), Status> {
        for p in [self.record(kind, id), self.image(kind, id)] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(internal(&format!("removing {}", p.display()), e)),
            }
        }
        Ok(())
    }

    /// Every record of a kind.
    pub fn all<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<T>, Status> {
        let dir = self.root.join(kind.dir());
        let entries =
            fs::read_dir(&dir).map_err(|e| internal(&format!("listing {}", dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| internal("listing records", e))?.path();
            if path.extension().is_some_and(|x| x == "json")
                && let Some(v) = read_json(&path)?
            {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Creates an image of `len` bytes filled by `fill`, under a temporary name renamed into
    /// place when complete.
    pub fn make_image(
        &self,
        kind: Kind,
        id: &str,
        fill: impl FnOnce(&File) -> io::Result<()>,
    ) -> Result<(), Status> {
        let path = self.image(kind, id);
        let tmp = path.with_extension("img.tmp");
        let file =
            File::create(&tmp).map_err(|e| internal(&format!("creating {}", tmp.display()), e))?;
        fill(&file).map_err(|e| internal(&format!("writing {}", tmp.display()), e))?;
        fs::rename(&tmp, &path).map_err(|e| internal(&format!("renaming {}", tmp.display()), e))
    }

    fn node_dir(&self, volume_id: &str) -> PathBuf {
        self.root.join("node").join(volume_id)
    }

    /// How a volume is staged here, if it is.
    pub fn stage(&self, volume_id: &str) -> Result<Option<Stage>, Status> {
        read_json(&self.node_dir(volume_id).join("stage.json"))
    }

    /// Records (or with `None` forgets) how a volume is staged.
    pub fn set_stage(&self, volume_id: &str, stage: Option<&Stage>) -> Result<(), Status> {
        let path = self.node_dir(volume_id).join("stage.json");
        match stage {
            Some(s) => write_json(&path, s),
            None => remove_if_present(&path),
        }
    }

    /// The pods a volume is published to.
    pub fn publications(&self, volume_id: &str) -> Result<Vec<Publication>, Status> {
        let dir = self.node_dir(volume_id).join("published");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            if let Some(p) = read_json(&entry.path())? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Records (or with `None` forgets) one publication, keyed by its target path.
    pub fn set_publication(
        &self,
        volume_id: &str,
        target: &Path,
        publication: Option<&Publication>,
    ) -> Result<(), Status> {
        let key = hex::encode(&blake3::hash(target.as_os_str().as_encoded_bytes()).as_bytes()[..8]);
        let path = self
            .node_dir(volume_id)
            .join("published")
            .join(format!("{key}.json"));
        match publication {
            Some(p) => write_json(&path, p),
            None => remove_if_present(&path),
        }
    }
}

fn valid_id(kind: Kind, id: &str) -> bool {
    id.strip_prefix(kind.prefix())
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, Status> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("record {} is damaged: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(internal(&format!("reading {}", path.display()), e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Status> {
    let dir = path.parent().expect("records live in a directory");
    fs::create_dir_all(dir).map_err(|e| internal(&format!("creating {}", dir.display()), e))?;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).expect("records serialize");
    fs::write(&tmp, bytes)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| internal(&format!("writing {}", path.display()), e))
}

fn remove_if_present(path: &Path) -> Result<(), Status> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(internal(&format!("removing {}", path.display()), e)),
    }
}

/// An INTERNAL status naming what failed.
pub fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

/// Now, as (seconds, nanoseconds) since the epoch.
pub fn now() -> (i64, i32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_paths_cannot_escape() {
        let a = State::id_for(Kind::Volume, "pvc-1");
        assert_eq!(a, State::id_for(Kind::Volume, "pvc-1"));
        assert_ne!(a, State::id_for(Kind::Volume, "pvc-2"));
        assert!(valid_id(Kind::Volume, &a));
        assert!(!valid_id(Kind::Snapshot, &a));
        assert!(!valid_id(Kind::Volume, "vol-../../etc/passwd"));
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        assert!(s.load::<Volume>(Kind::Volume, "../x").unwrap().is_none());
    }
}
