//! Block hashes and per-volume digests.
//!
//! Every block is identified by the BLAKE3 hash of its raw bytes. A volume's digest is BLAKE3 (in
//! derive-key mode) over its size, its block size and the content hash of every block in order, so a
//! digest is a pure function of the volume's bytes, computable from block hashes alone: the source
//! gets it from the cut without re-reading unchanged blocks, the target re-derives it at restore.

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

/// Incremental computation of a volume digest, fed block by block in index order.
pub struct VolumeDigest {
    hasher: blake3::Hasher,
    size: u64,
    block_size: u32,
    next: u64,
    zero: ZeroHashes,
}

impl VolumeDigest {
    /// Starts the digest of a volume of `size` bytes cut into `block_size` blocks.
    pub fn new(size: u64, block_size: u32) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("understudy volume digest v1");
        hasher.update(&size.to_le_bytes());
        hasher.update(&block_size.to_le_bytes());
        VolumeDigest {
            hasher,
            size,
            block_size,
            next: 0,
            zero: ZeroHashes::default(),
        }
    }

    /// Adds the next block. Panics never: blocks past the end are ignored.
    pub fn push(&mut self, block: BlockRef) {
        if self.next >= block_count(self.size, self.block_size) {
            return;
        }
        let hash = match block {
            BlockRef::Data(h) => h,
            BlockRef::Hole => self
                .zero
                .get(block_len(self.size, self.block_size, self.next)),
        };
        self.hasher.update(&hash.0);
        self.next += 1;
    }

    /// Finishes the digest; the hex string is what reports print.
    pub fn finish(self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }

    /// Digest of a whole block map.
    pub fn of_map(size: u64, block_size: u32, map: &[BlockRef]) -> String {
        let mut d = VolumeDigest::new(size, block_size);
        map.iter().for_each(|b| d.push(*b));
        d.finish()
    }
}

/// Cache of the hash of an all-zero block of a given length (at most two lengths per volume).
#[derive(Default)]
pub struct ZeroHashes(Vec<(u32, ChunkHash)>);

impl ZeroHashes {
    /// Hash of `len` zero bytes.
    pub fn get(&mut self, len: u32) -> ChunkHash {
        if let Some((_, h)) = self.0.iter().find(|(l, _)| *l == len) {
            return *h;
        }
        let h = ChunkHash::of(&vec![0u8; len as usize]);
        self.0.push((len, h));
        h
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
    fn digest_treats_hole_as_zero_bytes() {
        let bs = 4096u32;
        let size = 3 * 4096 + 100;
        let data = vec![7u8; 4096];
        let holes = [
            BlockRef::Hole,
            BlockRef::Data(ChunkHash::of(&data)),
            BlockRef::Hole,
            BlockRef::Hole,
        ];
        let explicit = [
            BlockRef::Data(ChunkHash::of(&[0; 4096])),
            BlockRef::Data(ChunkHash::of(&data)),
            BlockRef::Data(ChunkHash::of(&[0; 4096])),
            BlockRef::Data(ChunkHash::of(&[0; 100])),
        ];
        assert_eq!(
            VolumeDigest::of_map(size, bs, &holes),
            VolumeDigest::of_map(size, bs, &explicit)
        );
        assert_ne!(
            VolumeDigest::of_map(size, bs, &holes),
            VolumeDigest::of_map(size + 1, bs, &holes)
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
