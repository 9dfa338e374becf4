//! Block hashes and per-volume digests.
//!
//! Every block is identified by the BLAKE3 hash of its raw bytes. A volume's digest is BLAKE3 (in
//! derive-key mode) over its size, its block size and the index and hash of every data block in
//! order; an all-zero block is always a hole, never data, so a digest is a pure function of the
//! volume's bytes, computable from the block map alone: the source gets it from the cut without
//! re-reading unchanged blocks, the target re-derives it at restore, and holes cost nothing.

use serde::{Deserialize, Serialize};
use std::fmt;

/// BLAKE3 hash of a block's raw (uncompressed) bytes. Also the chunk's address in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes raw block bytes.
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// Short hex form for logs and reports.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// What one block of a volume holds in a recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlockRef {
    /// All zero (or never written): stored and sent as nothing.
    Hole,
    /// The chunk with this hash.
    Data(ChunkHash),
}

impl BlockRef {
    /// Encodes for a catalog value: empty for a hole, the 32 hash bytes otherwise.
    pub fn to_bytes(self) -> Vec<u8> {
        match self {
            BlockRef::Hole => Vec::new(),
            BlockRef::Data(h) => h.0.to_vec(),
        }
    }

    /// Decodes a catalog value written by [`BlockRef::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        match b.len() {
            0 => Some(BlockRef::Hole),
            32 => Some(BlockRef::Data(ChunkHash(b.try_into().ok()?))),
            _ => None,
        }
    }
}

/// Length in bytes of block `index` of a volume of `size` bytes.
pub fn block_len(size: u64, block_size: u32, index: u64) -> u32 {
    let start = index * block_size as u64;
    (size.saturating_sub(start)).min(block_size as u64) as u32
}

/// Number of blocks of a volume of `size` bytes.
pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(block_size as u64)
}

/// Incremental computation of a volume digest (v2), fed the volume's data blocks in increasing
/// index order. It is BLAKE3 (derive-key mode) over the size, the block size and, for each data
/// block, its index and hash; holes (all-zero blocks, which a scan never records as data) add
/// nothing, so the digest costs what the data costs and a run of holes costs nothing.
pub struct VolumeDigest {
    hasher: blake3::Hasher,
    blocks: u64,
    next: u64,
}

impl VolumeDigest {
    /// Starts the digest of a volume of `size` bytes cut into `block_size` blocks.
    pub fn new(size: u64, block_size: u32) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("understudy volume digest v2");
        hasher.update(&size.to_le_bytes());
        hasher.update(&block_size.to_le_bytes());
        VolumeDigest {
            hasher,
            blocks: block_count(size, block_size),
            next: 0,
        }
    }

    /// Adds data block `index`. Blocks out of order or past the end are ignored (they cannot
    /// belong to this volume, and the digest then differs from the source's).
    pub fn push(&mut self, index: u64, hash: &ChunkHash) {
        if index < self.next || index >= self.blocks {
            self.next = u64::MAX; // poisons the digest: nothing matches it
            self.hasher.update(b"out of order");
            return;
        }
        self.hasher.update(&index.to_le_bytes());
        self.hasher.update(&hash.0);
        self.next = index + 1;
    }

    /// Finishes the digest; the hex string is what reports print.
    pub fn finish(self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }

    /// Digest of a whole block map.
    pub fn of_map(size: u64, block_size: u32, map: &crate::block_map::BlockMap) -> String {
        let mut d = VolumeDigest::new(size, block_size);
        map.data().iter().for_each(|(i, h)| d.push(*i, h));
        d.finish()
    }
}

/// True when every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = unsafe { data.align_to::<u128>() };
    prefix.iter().all(|b| *b == 0)
        && words.iter().all(|w| *w == 0)
        && suffix.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_data_blocks_size_and_order_only() {
        use crate::block_map::BlockMap;
        let bs = 4096u32;
        let size = 3 * 4096 + 100;
        let data = ChunkHash::of(&[7u8; 4096]);
        let one = BlockMap::from_sorted(vec![(1, data)]).unwrap();
        assert_eq!(
            VolumeDigest::of_map(size, bs, &one),
            VolumeDigest::of_map(size, bs, &one.clone())
        );
        assert_ne!(
            VolumeDigest::of_map(size, bs, &one),
            VolumeDigest::of_map(size + 1, bs, &one)
        );
        let moved = BlockMap::from_sorted(vec![(2, data)]).unwrap();
        assert_ne!(
            VolumeDigest::of_map(size, bs, &one),
            VolumeDigest::of_map(size, bs, &moved)
        );
        let mut d = VolumeDigest::new(size, bs);
        d.push(2, &data);
        d.push(1, &data);
        assert_ne!(
            d.finish(),
            VolumeDigest::of_map(size, bs, &moved),
            "out of order"
        );
        let mut d = VolumeDigest::new(size, bs);
        d.push(4, &data);
        assert_ne!(
            d.finish(),
            VolumeDigest::of_map(size, bs, &BlockMap::new()),
            "past the end"
        );
    }

    #[test]
    fn is_zero_checks_every_byte() {
        let mut v = vec![0u8; 65537];
        assert!(is_zero(&v));
        for i in [0, 15, 16, 4000, 65536] {
            v[i] = 1;
            assert!(!is_zero(&v[1..]) || i == 0);
            v[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn block_ref_round_trips() {
        for b in [BlockRef::Hole, BlockRef::Data(ChunkHash::of(b"x"))] {
            assert_eq!(BlockRef::from_bytes(&b.to_bytes()), Some(b));
        }
        assert_eq!(BlockRef::from_bytes(&[1, 2, 3]), None);
    }
}
