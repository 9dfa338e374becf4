//! Where a cut's manifests come from. The core stores them as opaque bytes; what they mean (a
//! bundle of Kubernetes objects, from a directory or a cluster) is the `understudy-kube` crate's.

use super::spool::SpoolWriter;
use crate::hash::ChunkHash;
use crate::store::ManifestRef;
use anyhow::Result;
use std::fmt;

/// The application's manifests as one cut stores them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapturedManifests {
    /// The encoded bundle, stored as chunks of the recovery point.
    pub encoded: Vec<u8>,
    /// How many files it holds (shown in listings).
    pub files: u32,
}

impl CapturedManifests {
    /// Frames the bundle into `spool` as chunks of `block_size` bytes; returns how the cut
    /// declares it.
    pub fn spool(
        &self,
        block_size: u32,
        zstd_level: i32,
        spool: &mut SpoolWriter,
    ) -> Result<ManifestRef> {
        let bytes = &self.encoded;
        let mut chunks = Vec::new();
        for piece in bytes.chunks(block_size as usize) {
            let h = ChunkHash::of(piece);
            if !spool.contains(&h) {
                spool.add(h, crate::chunk::encode_with_hash(piece, h, zstd_level))?;
            }
            chunks.push(h);
        }
        Ok(ManifestRef {
            len: bytes.len() as u64,
            digest: blake3::hash(bytes).to_hex().to_string(),
            files: self.files,
            chunks,
        })
    }
}

/// A capture of the application's manifests, taken inside the hold on the instant (after the
/// pre hook, before the post hook). Called from a blocking thread.
pub trait ManifestSource: Send + Sync + fmt::Debug {
    /// Captures the manifests now.
    fn capture(&self) -> Result<CapturedManifests>;

    /// Checks, before the first cycle, what a retry could never fix (a missing directory, a file
    /// that does not parse). The default checks nothing.
    fn preflight(&self) -> Result<()> {
        Ok(())
    }
}

/// No manifests: the cut protects volumes only.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoManifests;

impl ManifestSource for NoManifests {
    fn capture(&self) -> Result<CapturedManifests> {
        Ok(CapturedManifests::default())
    }
}
