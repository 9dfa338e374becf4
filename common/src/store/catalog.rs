//! The catalog: a redb database holding the chunk index, pack lengths, recovery points and block
//! maps. Every change to it is one redb write transaction, fsynced at commit: a crash leaves either
//! the old state or the new one.
//!
//! Block maps are stored as a head plus reverse deltas: `heads` holds, per group, the full map of
//! the latest point (absent = hole); `undo` holds, per older point P, the entries where P differs
//! from the point after it. A commit therefore writes only changed entries, the latest point
//! restores without a chain walk, and dropping the oldest point deletes just its undo rows.

use super::StoreInUse;
use super::pack::{self, Location};
use crate::hash::ChunkHash;
use anyhow::{Context, Result, bail};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

/// Catalog format version; a store written by another version is refused with a clear error.
/// 2: volume digests v2 (data blocks only, see [`crate::hash::VolumeDigest`]).
pub const FORMAT_VERSION: u64 = 2;

/// `"format"` -> [`FORMAT_VERSION`].
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Chunk hash -> (pack id, offset, frame length).
pub const CHUNKS: TableDefinition<[u8; 32], (u32, u64, u32)> = TableDefinition::new("chunks");
/// Pack id -> committed length in bytes.
pub const PACKS: TableDefinition<u32, u64> = TableDefinition::new("packs");
/// (group, seq) -> encoded [`super::PointRecord`].
pub const POINTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("points");
/// (group, volume, block index) -> chunk hash of the latest point (rows only for data blocks).
pub const HEADS: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("heads");
/// (group, seq, volume, block index) -> block ref of point `seq` where it differs from the next point.
pub const UNDO: TableDefinition<(&str, u64, &str, u64), &[u8]> = TableDefinition::new("undo");
/// (group, stage, volume) -> encoded [`super::StagedPart`] header: a volume a mover staged for
/// a cut the source has not committed yet (protocol 4).
pub const PARTS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("parts");
/// (group, stage, volume, block index) -> block ref: the staged part's entries.
pub const PART_ENTRIES: TableDefinition<(&str, &str, &str, u64), &[u8]> =
    TableDefinition::new("part_entries");

/// Group -> encoded [`super::migration::Migration`]: its planned migration, if one was asked.
pub const MIGRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("migrations");

/// Decodes a chunk-table value.
pub fn location((pack, offset, len): (u32, u64, u32)) -> Location {
    Location { pack, offset, len }
}

/// Catalog page cache: the catalog of a multi-TiB store fits, and RSS stays bounded.
const CATALOG_CACHE: usize = 64 << 20;

/// The open catalog (`<store>/catalog.redb`).
pub(crate) struct Catalog {
    db: Database,
}

impl Catalog {
    /// Opens (creating owner-only if needed) the catalog of the store at `root` and checks its
    /// format. A damaged file or one held by another process is a clear error, never a panic.
    pub(crate) fn open(root: &Path) -> Result<Self> {
        let path = root.join("catalog.redb");
        // Created owner-only before redb opens it (redb takes an empty file as a new catalog).
        let file = crate::files::private_file()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| {
                format!(
                    "cannot create catalog {}: check permissions",
                    path.display()
                )
            })?;
        crate::files::restrict(&file, &path)?;
        drop(file);
        let opened = contain_panic(|| redb::Builder::new().set_cache_size(CATALOG_CACHE).create(&path))
            .map_err(|why| {
                anyhow::anyhow!(
                    "catalog {} is damaged and cannot be opened ({why}). The packs are intact: restore the catalog from a backup or the S3 archive, or move the store away and resync",
                    path.display()
                )
            })?;
        let db = match opened {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreInUse(root.to_path_buf()).into());
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot open catalog {}: if it is damaged, restore it from a backup or the S3 archive (the packs are intact), or move the store away and resync",
                        path.display()
                    )
                });
            }
        };
        let catalog = Catalog { db };
        catalog.init_tables(root)?;
        Ok(catalog)
    }

    fn init_tables(&self, root: &Path) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let version = meta.get("format")?.map(|v| v.value());
            match version {
                None => {
                    meta.insert("format", FORMAT_VERSION)?;
                }
                Some(FORMAT_VERSION) => {}
                Some(v) => bail!(
                    "store {} has catalog format {v}, this agent reads format {FORMAT_VERSION}: use a matching target-agent, or move the store away and let the source resync (format 1 stores hold v1 volume digests, which this agent cannot check)",
                    root.display()
                ),
            }
            txn.open_table(CHUNKS)?;
            txn.open_table(PACKS)?;
            txn.open_table(POINTS)?;
            txn.open_table(HEADS)?;
            txn.open_table(UNDO)?;
            txn.open_table(PARTS)?;
            txn.open_table(PART_ENTRIES)?;
            txn.open_table(MIGRATIONS)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The database, for the transactions of points, block maps, retention and verify.
    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// Pack ids and committed lengths.
    pub(crate) fn committed_packs(&self) -> Result<Vec<(u32, u64)>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PACKS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value(), v.value()));
        }
        Ok(out)
    }

    /// Records a new, empty pack before any chunk goes in, so a pack the catalog does not know
    /// can only mean a lost catalog, never a crash.
    pub(crate) fn add_pack(&self, id: u32) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(PACKS)?.insert(id, pack::PACK_HEADER_LEN)?;
        commit(txn)
    }

    /// Forgets a pack (its chunks must be recorded elsewhere or dead).
    pub(crate) fn remove_pack(&self, id: u32) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(PACKS)?.remove(id)?;
        commit(txn)
    }

    /// Records `chunks` as durable in pack `id`, whose synced length is now `len`: one
    /// transaction, so they all become visible to [`Catalog::missing`] or none does.
    pub(crate) fn record(&self, id: u32, len: u64, chunks: &[([u8; 32], Location)]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(CHUNKS)?;
            for (h, loc) in chunks {
                t.insert(h, (loc.pack, loc.offset, loc.len))?;
            }
            txn.open_table(PACKS)?.insert(id, len)?;
        }
        commit(txn)
    }

    /// The hashes among `hashes` the catalog does not record.
    pub(crate) fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CHUNKS)?;
        let mut out = Vec::new();
        for h in hashes {
            if t.get(h.0)?.is_none() {
                out.push(*h);
            }
        }
        Ok(out)
    }

    /// Locations of many chunks, read in one transaction (`None` where a chunk is missing).
    pub(crate) fn locate_all(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<Location>>> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CHUNKS)?;
        hashes
            .iter()
            .map(|h| Ok(t.get(h.0)?.map(|v| location(v.value()))))
            .collect()
    }
}

/// Commits a catalog write, naming the usual cause of a failure.
pub(crate) fn commit(txn: redb::WriteTransaction) -> Result<()> {
    txn.commit()
        .context("catalog commit failed: the store's disk may be full")
}

/// Runs `f`, turning a panic inside it into an error message instead of unwinding (and without
/// the panic hook's report). For opening a file whose contents a library asserts on: a damaged
/// file must give a clear error, never a crash.
fn contain_panic<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "an internal check failed".into())
    })
}
