//! Rebuilding a store from the archive alone: the packs of one archived snapshot downloaded
//! into an empty store directory, then its catalog made from the snapshot. Reads only (GET and
//! LIST): read-only credentials are enough.

use crate::archiver::manifests;
use crate::bucket::Bucket;
use crate::layout::{self, Manifest};
use anyhow::{Context, Result, bail};
use std::path::Path;
use understudy_common::store::Store;
use understudy_common::store::pack::pack_path;

/// What a restore did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Restored {
    /// The snapshot restored (its stamp).
    pub stamp: String,
    /// Its points (group, sequence).
    pub points: Vec<(String, u64)>,
    /// Packs downloaded.
    pub packs: usize,
    /// Bytes downloaded.
    pub bytes: u64,
}

/// The manifest of snapshot `stamp`, or the newest when `None`.
pub async fn choose(bucket: &Bucket, stamp: Option<&str>) -> Result<Manifest> {
    let all = manifests(bucket).await?;
    let found = match stamp {
        None => all.into_iter().next_back(),
        Some(s) => all.into_iter().find(|m| m.stamp == s),
    };
    found.with_context(|| match stamp {
        None => format!(
            "{} holds no archived snapshot: check --archive-bucket and --archive-prefix",
            bucket.describe()
        ),
        Some(s) => format!(
            "{} has no snapshot {s}: `target-agent archive list` shows those it has",
            bucket.describe()
        ),
    })
}

/// Restores snapshot `stamp` (the newest when `None`) into `root`, a store directory that must
/// not hold a catalog yet; returns the open store.
pub async fn restore(
    bucket: &Bucket,
    root: &Path,
    stamp: Option<&str>,
) -> Result<(Store, Restored)> {
    if root.join("catalog.redb").exists() {
        bail!(
            "{} already holds a store: restore into an empty directory (move the old store away first)",
            root.display()
        );
    }
    let m = choose(bucket, stamp).await?;
    let packs = root.join("packs");
    std::fs::create_dir_all(&packs)
        .with_context(|| format!("cannot create {}", packs.display()))?;
    let mut bytes = 0;
    for (id, len) in &m.packs {
        let path = pack_path(&packs, *id);
        if std::fs::metadata(&path).is_ok_and(|f| f.len() == *len) {
            continue; // an earlier, interrupted restore fetched it
        }
        let part = path.with_extension("part");
        let got = bucket.download_file(&layout::pack_name(*id), &part).await?;
        if got != *len {
            let _ = std::fs::remove_file(&part);
            bail!(
                "pack {id} in {} holds {got} bytes, snapshot {} says {len}: the archive is damaged (run `target-agent verify --archive`)",
                bucket.describe(),
                m.stamp
            );
        }
        std::fs::rename(&part, &path)?;
        bytes += got;
    }
    let snap = root.join("archive-snapshot.part");
    let got = bucket
        .download_file(&layout::snapshot_name(&m.stamp), &snap)
        .await?;
    bytes += got;
    let hash = std::fs::File::open(&snap).and_then(|f| {
        let mut h = blake3::Hasher::new();
        h.update_reader(f)?;
        Ok(h.finalize().to_hex().to_string())
    });
    if got != m.snapshot_bytes || hash.ok().as_deref() != Some(m.snapshot_blake3.as_str()) {
        let _ = std::fs::remove_file(&snap);
        bail!(
            "catalog snapshot {} in {} does not match its manifest ({got} bytes, {} expected, or its BLAKE3 differs): the archive is damaged; restore an older snapshot with --snapshot",
            m.stamp,
            bucket.describe(),
            m.snapshot_bytes
        );
    }
    let file = std::fs::File::open(&snap)?;
    let r = Store::import_catalog(root, std::io::BufReader::new(file));
    let _ = std::fs::remove_file(&snap);
    let (store, sum) = r?;
    let report = Restored {
        stamp: m.stamp.clone(),
        points: sum
            .points
            .iter()
            .map(|p| (p.group.clone(), p.seq))
            .collect(),
        packs: m.packs.len(),
        bytes,
    };
    Ok((store, report))
}
