//! Understudy's data path, one module per step a block takes:
//!
//! volume read ([`volume`]) -> change detection ([`change`]) -> chunk frame ([`chunk`]) ->
//! session protocol ([`protocol`]) over mutual-TLS QUIC ([`transport`]) -> pack + catalog
//! ([`store`]) -> recovery point -> restore ([`store::restore`]).
//!
//! Block maps ([`block_map`]) are sparse everywhere; the scan and the restore share one worker
//! pool ([`pool`]). The source side's cut (its instant, the scan against the base, the spool)
//! lives in [`cut`]. This crate knows nothing of Kubernetes: a cut's manifests come through
//! [`cut::ManifestSource`], which the `understudy-kube` crate implements for a directory of YAML
//! and for a cluster. The agent binaries only wire these together.

pub mod block_map;
pub mod change;
pub mod chunk;
pub mod cli;
pub mod cut;
pub mod error;
pub mod failpoint;
pub mod files;
pub mod hash;
pub mod hooks;
pub mod keys;
pub mod metrics;
pub mod pool;
pub mod progress;
pub mod protocol;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod volume;

/// Default block size: 64 KiB, aligned with CBT ranges.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Smallest block size accepted (4 KiB, the usual CBT granularity).
pub const MIN_BLOCK_SIZE: u32 = 4 * 1024;
/// Largest block size accepted (4 MiB); bounds every allocation driven by a length field.
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;

/// Checks a block size given by a user or a peer.
pub fn check_block_size(size: u32) -> anyhow::Result<u32> {
    anyhow::ensure!(
        (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) && size.is_power_of_two(),
        "block size {size} is not supported: use a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes"
    );
    Ok(size)
}

/// Milliseconds since the Unix epoch, the unit of every timestamp Understudy stores.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Formats a stored timestamp as RFC 3339 (UTC, seconds).
pub fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
