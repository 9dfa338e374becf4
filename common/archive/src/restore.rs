//! Rebuilding a store from the archive alone: the packs of one archived snapshot downloaded
//! into an empty store directory (opened on the way when the archive is encrypted), then its
//! catalog made from the snapshot. Reads only (GET and LIST): read-only credentials are enough.

use crate::archiver::manifests;
use crate::bucket::Bucket;
use crate::layout::{self, Manifest};
use anyhow::{Context, Result, bail};
use std::path::Path;
use understudy_common::keys::Keyring;
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
/// not hold a catalog yet, with the archive's `keys` when it is encrypted
/// ([`crate::keys::for_reading`]); returns the open store.
pub async fn restore(
    bucket: &Bucket,
    keys: Option<&Keyring>,
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
    let keys = match (m.key_generation, keys) {
        (None, _) => None,
        (Some(_), Some(k)) => Some(k),
        (Some(g), None) => bail!(
            "snapshot {} of {} is encrypted (key generation {g}): give the archive's key (--archive-key-file, --archive-passphrase-file or ${})",
            m.stamp,
            bucket.describe(),
            crate::keys::KEY_ENV
        ),
    };
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
        let name = layout::pack_name(*id);
        let mut got = bucket.download_file(&name, &part).await?;
        bytes += got;
        if let Some(keys) = keys {
            got = open_sealed(&part, |sealed, plain| {
                crate::sealed::open_pack(keys, *id, sealed, plain)
            })
            .with_context(|| format!("{}{name}", bucket.describe()))?;
        }
        if got != *len {
            let _ = std::fs::remove_file(&part);
            bail!(
                "pack {id} in {} holds {got} bytes, snapshot {} says {len}: the archive is damaged (run `target-agent archive verify`)",
                bucket.describe(),
                m.stamp
            );
        }
        std::fs::rename(&part, &path)?;
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
    if let Some(keys) = keys {
        open_sealed(&snap, |sealed, plain| {
            crate::sealed::open_snapshot(keys, &m.stamp, sealed, plain)
        })
        .with_context(|| format!("{}{}", bucket.describe(), layout::snapshot_name(&m.stamp)))?;
    }
    let used_ids = highest_pack_id(bucket).await?;
    let file = std::fs::File::open(&snap)?;
    let r = Store::import_catalog(root, std::io::BufReader::new(file), used_ids);
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

/// Opens the sealed object downloaded to `path` in place with `open(sealed, plain)`.
fn open_sealed<T>(path: &Path, open: impl FnOnce(&Path, &Path) -> Result<T>) -> Result<T> {
    let sealed = path.with_extension("sealed");
    std::fs::rename(path, &sealed)
        .with_context(|| format!("cannot rename {} to open it", path.display()))?;
    let r = open(&sealed, path);
    let _ = std::fs::remove_file(&sealed);
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// The highest pack id the archive has seen, in an object or an unfinished upload: a store
/// restored from an older snapshot must not make a pack of that id again (its archive would
/// then hold two different packs under one name).
async fn highest_pack_id(bucket: &Bucket) -> Result<u32> {
    let objects = bucket
        .list(layout::PACKS)
        .await?
        .into_iter()
        .map(|o| o.name);
    // Read-only keys may not list uploads (s3:ListBucketMultipartUploads): then objects only.
    let uploads = match bucket.uploads(layout::PACKS).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "unfinished uploads not listed");
            Vec::new()
        }
    };
    let uploads = uploads.into_iter().map(|(name, _)| name);
    Ok(objects
        .chain(uploads)
        .filter_map(|n| layout::pack_id(&n))
        .max()
        .unwrap_or(0))
}
