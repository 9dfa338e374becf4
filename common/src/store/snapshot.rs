//! Catalog snapshots: every committed row of a store's catalog (packs, chunk locations, points,
//! block maps) as one portable stream, taken from one read transaction right after the pack
//! being written is sealed. The packs it lists are then all sealed, so copies of them plus the
//! snapshot are a whole store: the archive tier's unit, and what rebuilds a catalog
//! (docs/store-format.md, "Catalog snapshot").
//!
//! Staged parts (received, not committed) are left out: no point lists them.

use super::Store;
use super::catalog::{self, CHUNKS, HEADS, PACKS, POINTS, UNDO};
use super::recovery_point::PointRecord;
use anyhow::{Context, Result, bail};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::Path;

/// First bytes of a snapshot.
const MAGIC: &[u8; 8] = b"UCATSNAP";
/// Version of the snapshot stream.
const VERSION: u32 = 1;
/// Largest row accepted on import (a point record with many volumes, or a block-map value).
const MAX_ROW: usize = 16 << 20;

/// One catalog row.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Row {
    Pack {
        id: u32,
        len: u64,
    },
    Chunk {
        hash: [u8; 32],
        pack: u32,
        offset: u64,
        len: u32,
    },
    Point {
        group: String,
        seq: u64,
        record: Vec<u8>,
    },
    Head {
        group: String,
        volume: String,
        block: u64,
        value: Vec<u8>,
    },
    Undo {
        group: String,
        seq: u64,
        volume: String,
        block: u64,
        value: Vec<u8>,
    },
    /// The last row: how many came before it (a cut stream is refused).
    End {
        rows: u64,
    },
}

/// What a snapshot holds, for listing and for the archive's bookkeeping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    /// Packs (id, committed length) the snapshot's chunks are in.
    pub packs: Vec<(u32, u64)>,
    /// Points, by group and sequence, with their cut times (ms).
    pub points: Vec<PointSummary>,
    /// Rows written.
    pub rows: u64,
}

/// One point of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointSummary {
    /// Its group.
    pub group: String,
    /// Its sequence number.
    pub seq: u64,
    /// When its cut was taken (ms since epoch).
    pub created_ms: i64,
}

impl Store {
    /// Seals the pack being written and writes a snapshot of the catalog as of that instant to
    /// `out`. Commits and new chunks go on meanwhile (into a new pack).
    pub fn snapshot_catalog(&self, out: impl Write) -> Result<SnapshotSummary> {
        let txn = {
            let mut w = self.packs.writing();
            self.seal_locked(&mut w)?;
            self.db().begin_read()?
        };
        let mut w = RowWriter::new(out)?;
        let mut sum = SnapshotSummary::default();
        for r in txn.open_table(PACKS)?.iter()? {
            let (id, len) = r?;
            sum.packs.push((id.value(), len.value()));
            w.put(&Row::Pack {
                id: id.value(),
                len: len.value(),
            })?;
        }
        for r in txn.open_table(CHUNKS)?.iter()? {
            let (h, v) = r?;
            let (pack, offset, len) = v.value();
            w.put(&Row::Chunk {
                hash: h.value(),
                pack,
                offset,
                len,
            })?;
        }
        for r in txn.open_table(POINTS)?.iter()? {
            let (k, v) = r?;
            let (group, seq) = k.value();
            let record = v.value().to_vec();
            sum.points.push(PointSummary {
                group: group.to_string(),
                seq,
                created_ms: PointRecord::decode(&record)?.cut.created_ms,
            });
            w.put(&Row::Point {
                group: group.to_string(),
                seq,
                record,
            })?;
        }
        for r in txn.open_table(HEADS)?.iter()? {
            let (k, v) = r?;
            let (group, volume, block) = k.value();
            w.put(&Row::Head {
                group: group.into(),
                volume: volume.into(),
                block,
                value: v.value().to_vec(),
            })?;
        }
        for r in txn.open_table(UNDO)?.iter()? {
            let (k, v) = r?;
            let (group, seq, volume, block) = k.value();
            w.put(&Row::Undo {
                group: group.into(),
                seq,
                volume: volume.into(),
                block,
                value: v.value().to_vec(),
            })?;
        }
        sum.rows = w.finish()?;
        Ok(sum)
    }

    /// Makes the catalog of a new store at `root` from a snapshot (its packs already in
    /// `root/packs`, each at least as long as the snapshot says), then opens the store. Refuses
    /// a store that already has a catalog, and a snapshot that is cut short or damaged.
    /// `used_ids` is the highest pack id used elsewhere for this store's data (by newer packs
    /// in its archive): the store never makes a pack of that id or below.
    pub fn import_catalog(
        root: &Path,
        input: impl Read,
        used_ids: u32,
    ) -> Result<(Store, SnapshotSummary)> {
        let path = root.join("catalog.redb");
        if path.exists() {
            bail!(
                "{} already has a catalog: restore into an empty directory",
                root.display()
            );
        }
        crate::files::private_dir(root)?;
        let sum = {
            let cat = catalog::Catalog::open(root)?;
            let r = write_rows(&cat, input);
            drop(cat);
            match r {
                Ok(sum) => sum,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            }
        };
        for (id, len) in &sum.packs {
            let p = super::pack::pack_path(&root.join("packs"), *id);
            let have = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            if have < *len {
                let _ = std::fs::remove_file(&path);
                bail!(
                    "pack {} holds {have} bytes, the snapshot says {len}: fetch it again",
                    p.display()
                );
            }
        }
        let store = Store::open(root)?;
        let high = sum.packs.iter().map(|(id, _)| *id).max().unwrap_or(0);
        store.packs.raise_high(high.max(used_ids))?;
        Ok((store, sum))
    }
}

/// Writes a snapshot: the header, then length-prefixed rows in a zstd stream, then `End`.
struct RowWriter<W: Write> {
    enc: zstd::Encoder<'static, W>,
    rows: u64,
}

impl<W: Write> RowWriter<W> {
    fn new(mut out: W) -> Result<Self> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&(catalog::FORMAT_VERSION as u32).to_le_bytes())?;
        Ok(RowWriter {
            enc: zstd::Encoder::new(out, 3)?,
            rows: 0,
        })
    }

    fn put(&mut self, row: &Row) -> Result<()> {
        self.write(row)?;
        self.rows += 1;
        Ok(())
    }

    fn write(&mut self, row: &Row) -> Result<()> {
        let b = postcard::to_stdvec(row)?;
        self.enc.write_all(&(b.len() as u32).to_le_bytes())?;
        self.enc.write_all(&b)?;
        Ok(())
    }

    /// Writes `End` and flushes; the number of rows before it.
    fn finish(mut self) -> Result<u64> {
        let rows = self.rows;
        self.write(&Row::End { rows })?;
        self.enc.finish()?.flush()?;
        Ok(rows)
    }
}

/// Reads a snapshot's rows into the (new, empty) catalog `cat`, in one transaction.
fn write_rows(cat: &catalog::Catalog, mut input: impl Read) -> Result<SnapshotSummary> {
    let mut h = [0u8; 16];
    input
        .read_exact(&mut h)
        .context("the catalog snapshot is too short for its header")?;
    if &h[..8] != MAGIC {
        bail!("not a catalog snapshot (bad magic)");
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    let format = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    if version != VERSION || u64::from(format) != catalog::FORMAT_VERSION {
        bail!(
            "catalog snapshot version {version}, catalog format {format}: this agent reads version {VERSION}, format {}",
            catalog::FORMAT_VERSION
        );
    }
    let mut dec = zstd::Decoder::new(input)?;
    let mut sum = SnapshotSummary::default();
    let txn = cat.db().begin_write()?;
    {
        let mut packs = txn.open_table(PACKS)?;
        let mut chunks = txn.open_table(CHUNKS)?;
        let mut points = txn.open_table(POINTS)?;
        let mut heads = txn.open_table(HEADS)?;
        let mut undo = txn.open_table(UNDO)?;
        loop {
            let row = next_row(&mut dec).with_context(|| {
                format!(
                    "the catalog snapshot is damaged or cut short after {} rows",
                    sum.rows
                )
            })?;
            match row {
                Row::Pack { id, len } => {
                    packs.insert(id, len)?;
                    sum.packs.push((id, len));
                }
                Row::Chunk {
                    hash,
                    pack,
                    offset,
                    len,
                } => {
                    chunks.insert(hash, (pack, offset, len))?;
                }
                Row::Point { group, seq, record } => {
                    let p = PointRecord::decode(&record)?;
                    points.insert((group.as_str(), seq), record.as_slice())?;
                    sum.points.push(PointSummary {
                        group,
                        seq,
                        created_ms: p.cut.created_ms,
                    });
                }
                Row::Head {
                    group,
                    volume,
                    block,
                    value,
                } => {
                    heads.insert((group.as_str(), volume.as_str(), block), value.as_slice())?;
                }
                Row::Undo {
                    group,
                    seq,
                    volume,
                    block,
                    value,
                } => {
                    undo.insert(
                        (group.as_str(), seq, volume.as_str(), block),
                        value.as_slice(),
                    )?;
                }
                Row::End { rows } => {
                    if rows != sum.rows {
                        bail!(
                            "the catalog snapshot declares {rows} rows and holds {}",
                            sum.rows
                        );
                    }
                    break;
                }
            }
            sum.rows += 1;
        }
    }
    catalog::commit(txn)?;
    Ok(sum)
}

fn next_row(dec: &mut impl Read) -> Result<Row> {
    let mut len = [0u8; 4];
    dec.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_ROW {
        bail!("a row of {len} bytes (at most {MAX_ROW})");
    }
    let mut b = vec![0u8; len];
    dec.read_exact(&mut b)?;
    Ok(postcard::from_bytes(&b)?)
}
