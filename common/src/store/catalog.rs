//! The catalog: a redb database holding the chunk index, pack lengths, recovery points and block
//! maps. Every change to it is one redb write transaction, fsynced at commit: a crash leaves either
//! the old state or the new one.
//!
//! Block maps are stored as a head plus reverse deltas: `heads` holds, per group, the full map of
//! the latest point (absent = hole); `undo` holds, per older point P, the entries where P differs
//! from the point after it. A commit therefore writes only changed entries, the latest point
//! restores without a chain walk, and dropping the oldest point deletes just its undo rows.

use super::pack::Location;
use redb::TableDefinition;

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

/// Decodes a chunk-table value.
pub fn location((pack, offset, len): (u32, u64, u32)) -> Location {
    Location { pack, offset, len }
}
