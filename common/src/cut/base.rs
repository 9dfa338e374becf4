//! The source's base: the block maps of the last point the target committed, kept on disk in a
//! redb database (`<state>/groups/<group>/base.redb`) so that neither memory nor the work of a
//! cycle grows with volume capacity. The scan reads a volume's map as an ordered stream and
//! merges it with what it reads; a commit applies the cut's changes in one write transaction,
//! so the base is updated in proportion to what changed, atomically (redb commits are
//! crash-safe: a kill leaves the old base or the new one).
//!
//! Tables: `info` (one row: [`BaseInfo`], postcard) and `blocks` ((volume, block index) ->
//! chunk hash, data blocks only; a missing row is a hole).

use crate::block_map::BlockChange;
use crate::hash::{BlockRef, ChunkHash};
use anyhow::{Context, Result};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;

const INFO: TableDefinition<&str, &[u8]> = TableDefinition::new("info");
const BLOCKS: TableDefinition<(&str, u64), [u8; 32]> = TableDefinition::new("blocks");

/// What the base is: the point it mirrors and its volumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseInfo {
    /// Point sequence number on the target.
    pub seq: u64,
    /// Cut id of that point.
    pub cut_id: String,
    /// Block size of the maps.
    pub block_size: u32,
    /// (volume name, size) at that point.
    pub volumes: Vec<(String, u64)>,
}

impl BaseInfo {
    /// Size of a volume at the base, if it has it.
    pub fn volume_size(&self, name: &str) -> Option<u64> {
        self.volumes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| *s)
    }
}

/// The open base database of a group.
pub struct SourceBase {
    db: Database,
}

/// One volume's changes of a committed cut, as [`SourceBase::commit`] takes them.
pub struct VolumeChanges<'a> {
    /// Volume name.
    pub name: &'a str,
    /// Size at the cut.
    pub size: u64,
    /// The changes, in block order.
    pub changes: &'a [BlockChange],
}

impl SourceBase {
    /// Opens (creating, owner-only) the base at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let unreadable = || {
            format!(
                "source base {} cannot be opened: delete it to start over with a full sync",
                path.display()
            )
        };
        let f = crate::files::private_file()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(unreadable)?;
        crate::files::restrict(&f, path)?;
        drop(f);
        let db = Database::create(path).with_context(unreadable)?;
        let txn = db.begin_write()?;
        txn.open_table(INFO)?;
        txn.open_table(BLOCKS)?;
        txn.commit()?;
        Ok(SourceBase { db })
    }

    /// What the base mirrors, or `None` when there is no base (the next cut is full).
    pub fn info(&self) -> Result<Option<BaseInfo>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(INFO)?;
        let Some(v) = t.get("base")? else {
            return Ok(None);
        };
        postcard::from_bytes(v.value()).map(Some).context(
            "the source base is unreadable: delete base.redb to start over with a full sync",
        )
    }

    /// A read view of the maps, stable while it lives (a scan reads its volumes through one).
    pub fn reader(&self) -> Result<BaseReader> {
        let txn = self.db.begin_read()?;
        Ok(BaseReader {
            blocks: txn.open_table(BLOCKS)?,
        })
    }

    /// Makes the base the point `info` describes: applies each volume's changes (for a full cut,
    /// after forgetting the volume's old map), forgets volumes the cut does not have, in one
    /// transaction. A base already at `info.cut_id` is left as it is (the commit was recorded
    /// before a crash).
    pub fn commit(&self, info: &BaseInfo, full: bool, volumes: &[VolumeChanges<'_>]) -> Result<()> {
        let old = self.info()?;
        if old.as_ref().is_some_and(|b| b.cut_id == info.cut_id) {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut blocks = txn.open_table(BLOCKS)?;
            let keep = |n: &str| !full && volumes.iter().any(|v| v.name == n);
            for (name, _) in old.iter().flat_map(|o| o.volumes.iter()) {
                if !keep(name) {
                    blocks
                        .retain_in((name.as_str(), 0)..=(name.as_str(), u64::MAX), |_, _| false)?;
                }
            }
            for v in volumes {
                for (index, block) in v.changes {
                    match block {
                        BlockRef::Data(h) => {
                            blocks.insert((v.name, *index), h.0)?;
                        }
                        BlockRef::Hole => {
                            blocks.remove((v.name, *index))?;
                        }
                    }
                }
                // Blocks past a shrunk volume's end are gone.
                let blocks_now = v.size.div_ceil(info.block_size as u64);
                blocks.retain_in((v.name, blocks_now)..=(v.name, u64::MAX), |_, _| false)?;
            }
            txn.open_table(INFO)?
                .insert("base", postcard::to_stdvec(info)?.as_slice())?;
        }
        txn.commit().context(
            "cannot record the committed point in the source base: is the state disk full?",
        )?;
        Ok(())
    }

    /// Forgets the base: the next cut is full.
    pub fn clear(&self) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.delete_table(BLOCKS)?;
        txn.open_table(BLOCKS)?;
        txn.open_table(INFO)?.remove("base")?;
        txn.commit()?;
        Ok(())
    }
}

/// A stable view of the base's maps.
pub struct BaseReader {
    blocks: redb::ReadOnlyTable<(&'static str, u64), [u8; 32]>,
}

impl BaseReader {
    /// The data blocks of `volume`, in index order.
    pub fn volume<'a>(
        &'a self,
        volume: &'a str,
    ) -> Result<impl Iterator<Item = Result<(u64, ChunkHash)>> + Send + 'a> {
        let range = self.blocks.range((volume, 0)..=(volume, u64::MAX))?;
        Ok(range.map(|row| {
            let (k, v) = row.context(
                "the source base is unreadable: delete base.redb to start over with a full sync",
            )?;
            Ok((k.value().1, ChunkHash(v.value())))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> ChunkHash {
        ChunkHash([n; 32])
    }

    fn map(r: &BaseReader, v: &str) -> Vec<(u64, ChunkHash)> {
        r.volume(v).unwrap().collect::<Result<_>>().unwrap()
    }

    #[test]
    fn commits_apply_changes_and_full_cuts_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let base = SourceBase::open(&dir.path().join("base.redb")).unwrap();
        assert!(base.info().unwrap().is_none());
        let info = |seq: u64| BaseInfo {
            seq,
            cut_id: format!("c{seq}"),
            block_size: 4096,
            volumes: vec![("a".into(), 40960)],
        };
        let full = [(1, BlockRef::Data(h(1))), (9, BlockRef::Data(h(9)))];
        base.commit(
            &info(1),
            true,
            &[VolumeChanges {
                name: "a",
                size: 40960,
                changes: &full,
            }],
        )
        .unwrap();
        let delta = [(1, BlockRef::Hole), (2, BlockRef::Data(h(2)))];
        let changes = [VolumeChanges {
            name: "a",
            size: 40960,
            changes: &delta,
        }];
        base.commit(&info(2), false, &changes).unwrap();
        // Recording the same commit again (after a crash) changes nothing.
        base.commit(&info(2), false, &changes).unwrap();
        assert_eq!(
            map(&base.reader().unwrap(), "a"),
            vec![(2, h(2)), (9, h(9))]
        );
        assert_eq!(base.info().unwrap().unwrap().seq, 2);
        // A shrunk volume loses the blocks past its end.
        base.commit(
            &info(3),
            false,
            &[VolumeChanges {
                name: "a",
                size: 4096 * 5,
                changes: &[],
            }],
        )
        .unwrap();
        assert_eq!(map(&base.reader().unwrap(), "a"), vec![(2, h(2))]);
        // A full cut replaces the map; a volume the cut lacks is forgotten.
        let f2 = [(3, BlockRef::Data(h(3)))];
        base.commit(
            &info(4),
            true,
            &[VolumeChanges {
                name: "b",
                size: 4096 * 5,
                changes: &f2,
            }],
        )
        .unwrap();
        let r = base.reader().unwrap();
        assert!(map(&r, "a").is_empty());
        assert_eq!(map(&r, "b"), vec![(3, h(3))]);
        base.clear().unwrap();
        assert!(base.info().unwrap().is_none());
        assert!(map(&base.reader().unwrap(), "b").is_empty());
    }
}
