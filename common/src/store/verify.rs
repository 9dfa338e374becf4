//! `verify`: re-reads every chunk from its pack and re-hashes it, and re-derives every volume
//! digest of every point from the catalog. Damage is named: pack file, offset, and which points,
//! volumes and block offsets use the damaged chunk.

use super::Store;
use super::catalog::*;
use super::pack;
use crate::chunk;
use crate::hash::{ChunkHash, VolumeDigest};
use anyhow::Result;
use redb::{ReadableDatabase, ReadableTable};
use std::collections::HashMap;

/// One problem `verify` found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// What is wrong.
    pub what: String,
    /// Pack file, when the problem is in one.
    pub pack_file: Option<String>,
    /// Byte offset of the frame in the pack.
    pub offset: Option<u64>,
    /// Where the damage is used: "group point N volume V at byte B".
    pub used_by: Vec<String>,
}

/// Result of a verify run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Chunks read and re-hashed.
    pub chunks_checked: u64,
    /// Bytes of frames read.
    pub bytes_checked: u64,
    /// Points whose maps and digests were checked.
    pub points_checked: u64,
    /// Everything found wrong; empty means the store is sound.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing was found wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Store {
    /// Checks the whole store; `progress` is called with bytes read so far.
    pub fn verify(&self, progress: &dyn Fn(u64)) -> Result<VerifyReport> {
        self.flush()?;
        let mut report = VerifyReport::default();
        let damaged = self.verify_chunks(&mut report, progress)?;
        self.verify_points(&mut report, &damaged)?;
        self.verify_other_tables(&mut report);
        Ok(report)
    }

    /// Reads every row of the tables the checks above do not walk (meta, staged parts,
    /// migrations): a damaged page there is reported too, not left for a failover to meet.
    fn verify_other_tables(&self, report: &mut VerifyReport) {
        let read = || -> Result<()> {
            let txn = self.db().begin_read()?;
            for r in txn.open_table(META)?.iter()? {
                r?;
            }
            for r in txn.open_table(PARTS)?.iter()? {
                r?;
            }
            for r in txn.open_table(PART_ENTRIES)?.iter()? {
                r?;
            }
            for r in txn.open_table(MIGRATIONS)?.iter()? {
                r?;
            }
            Ok(())
        };
        if let Err(e) = read() {
            report.problems.push(Problem {
                what: format!(
                    "catalog {} is damaged: {e:#}",
                    self.root().join("catalog.redb").display()
                ),
                pack_file: None,
                offset: None,
                used_by: vec![],
            });
        }
    }

    /// Total bytes of committed packs (for progress bars).
    pub fn packed_bytes(&self) -> Result<u64> {
        Ok(self.committed_packs()?.iter().map(|(_, l)| *l).sum())
    }

    fn verify_chunks(
        &self,
        report: &mut VerifyReport,
        progress: &dyn Fn(u64),
    ) -> Result<HashMap<ChunkHash, Problem>> {
        for (id, _) in self.committed_packs()? {
            let path = self.packs().path(id);
            let header = std::fs::File::open(&path)
                .map_err(anyhow::Error::from)
                .and_then(|f| pack::check_header(&f, id));
            if let Err(e) = header {
                report.problems.push(Problem {
                    what: format!("pack header unreadable: {e:#}"),
                    pack_file: Some(path.display().to_string()),
                    offset: Some(0),
                    used_by: vec![],
                });
            }
        }
        let mut damaged = HashMap::new();
        let txn = self.db().begin_read()?;
        for row in txn.open_table(CHUNKS)?.iter()? {
            let (k, v) = row?;
            let hash = ChunkHash(k.value());
            let loc = location(v.value());
            report.chunks_checked += 1;
            report.bytes_checked += loc.len as u64;
            if report.chunks_checked.is_multiple_of(256) {
                progress(report.bytes_checked);
            }
            let result = self
                .read_frame_at(loc)
                .and_then(|f| chunk::decode(&f).map_err(anyhow::Error::from));
            let what = match result {
                Ok((h, _)) if h.hash == hash => continue,
                Ok((h, _)) => format!("chunk {hash} holds chunk {} instead", h.hash),
                Err(e) => format!("chunk {hash} is damaged: {e:#}"),
            };
            let file = self.packs().path(loc.pack).display().to_string();
            damaged.insert(
                hash,
                Problem {
                    what,
                    pack_file: Some(file),
                    offset: Some(loc.offset),
                    used_by: vec![],
                },
            );
        }
        progress(report.bytes_checked);
        Ok(damaged)
    }

    fn verify_points(
        &self,
        report: &mut VerifyReport,
        damaged: &HashMap<ChunkHash, Problem>,
    ) -> Result<()> {
        let mut damaged = damaged.clone();
        for group in self.groups()? {
            let points = self.points(&group)?;
            for point in &points {
                report.points_checked += 1;
                for vol in &point.cut.volumes {
                    let map = self.block_map_among(&points, &group, point.seq, &vol.name)?;
                    let mut missing = 0u64;
                    for (i, h) in map.data() {
                        let at = i * point.cut.block_size as u64;
                        let place = format!(
                            "group {group} point {} volume {} at byte {at}",
                            point.seq, vol.name
                        );
                        if let Some(p) = damaged.get_mut(h) {
                            p.used_by.push(place);
                        } else if self.locate(h)?.is_none() {
                            missing += 1;
                            if missing <= 3 {
                                report.problems.push(Problem {
                                    what: format!("chunk {h} is referenced but not in the store"),
                                    pack_file: None,
                                    offset: None,
                                    used_by: vec![place],
                                });
                            }
                        }
                    }
                    let digest = VolumeDigest::of_map(vol.size, point.cut.block_size, &map);
                    if digest != vol.digest {
                        report.problems.push(Problem {
                            what: format!(
                                "block map of volume {} does not reproduce the source digest {} (got {digest})",
                                vol.name, vol.digest
                            ),
                            pack_file: None,
                            offset: None,
                            used_by: vec![format!("group {group} point {} volume {}", point.seq, vol.name)],
                        });
                    }
                }
                for h in &point.cut.manifests.chunks {
                    if let Some(p) = damaged.get_mut(h) {
                        p.used_by
                            .push(format!("group {group} point {} manifests", point.seq));
                    }
                }
            }
        }
        let mut found: Vec<Problem> = damaged.into_values().collect();
        found.sort_by(|a, b| (&a.pack_file, a.offset).cmp(&(&b.pack_file, b.offset)));
        report.problems.splice(0..0, found);
        Ok(())
    }
}
