//! `archive verify`: checks the bucket the way `verify` checks a store. Each snapshot checked is
//! restored into a scratch directory (packs already fetched for an earlier snapshot are kept),
//! then the store's own verify re-reads and re-hashes every chunk and re-derives every volume
//! digest. Damage is named by object: a pack or snapshot missing, cut short or altered.

use crate::archiver::manifests;
use crate::bucket::Bucket;
use crate::layout;
use anyhow::Result;
use std::path::Path;
use understudy_common::keys::Keyring;
use understudy_common::store::pack::pack_id_of;
use understudy_common::store::verify::Problem;

/// One problem found in the archive: the store's [`Problem`], its pack named as the object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ArchiveProblem {
    /// The snapshot (stamp) it was found in.
    pub snapshot: String,
    /// What is wrong and where it is used; `pack_file` is the object
    /// (`s3://bucket/prefix/packs/….pack`).
    #[serde(flatten)]
    pub problem: Problem,
}

/// What `archive verify` checked and found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ArchiveReport {
    /// Snapshots checked.
    pub snapshots_checked: u64,
    /// Points checked across them.
    pub points_checked: u64,
    /// Chunks read and re-hashed.
    pub chunks_checked: u64,
    /// Everything found wrong; empty means the archive is sound.
    pub problems: Vec<ArchiveProblem>,
}

impl ArchiveReport {
    /// True when nothing was found wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies the snapshots of the archive (every one when `all`, else the newest) using
/// `scratch` for the downloads, with its `keys` when it is encrypted (a sealed object that does
/// not open is a problem named by its object).
pub async fn verify(
    bucket: &Bucket,
    keys: Option<&Keyring>,
    scratch: &Path,
    all: bool,
) -> Result<ArchiveReport> {
    let mut chosen = manifests(bucket).await?;
    if !all && chosen.len() > 1 {
        chosen.drain(..chosen.len() - 1);
    }
    anyhow::ensure!(
        !chosen.is_empty(),
        "{} holds no archived snapshot: check --archive-bucket and --archive-prefix",
        bucket.describe()
    );
    let root = scratch.join("store");
    let mut report = ArchiveReport::default();
    for m in &chosen {
        let _ = std::fs::remove_file(root.join("catalog.redb"));
        report.snapshots_checked += 1;
        let store = match crate::restore::restore(bucket, keys, &root, Some(&m.stamp)).await {
            Ok((store, _)) => store,
            Err(e) => {
                report.problems.push(ArchiveProblem {
                    snapshot: m.stamp.clone(),
                    problem: Problem {
                        what: format!("{e:#}"),
                        pack_file: None,
                        offset: None,
                        used_by: Vec::new(),
                    },
                });
                continue;
            }
        };
        let found = tokio::task::spawn_blocking(move || store.verify(&|_| {})).await??;
        report.points_checked += found.points_checked;
        report.chunks_checked += found.chunks_checked;
        for mut p in found.problems {
            p.pack_file = p.pack_file.as_deref().and_then(|f| {
                let name = Path::new(f).file_name()?.to_str()?;
                Some(format!(
                    "{}{}",
                    bucket.describe(),
                    layout::pack_name(pack_id_of(name)?)
                ))
            });
            report.problems.push(ArchiveProblem {
                snapshot: m.stamp.clone(),
                problem: p,
            });
        }
    }
    Ok(report)
}
