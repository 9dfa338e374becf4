//! Sends a cut's needed chunks from its spool on parallel QUIC data streams.

use anyhow::{Context, Result};
use std::sync::Arc;
use understudy_common::hash::ChunkHash;
use understudy_common::protocol::DATA_STREAM_KIND;
use understudy_common::source::spool::SpoolReader;

/// Chunks and frame bytes sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shipped {
    /// Chunks sent.
    pub chunks: u64,
    /// Frame bytes sent.
    pub bytes: u64,
    /// Data streams used.
    pub streams: u32,
}

/// Sends `hashes` over up to `streams` data streams; returns once all were handed to QUIC.
pub async fn ship(
    conn: &quinn::Connection,
    spool: Arc<SpoolReader>,
    hashes: Vec<ChunkHash>,
    streams: usize,
    on_bytes: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<Shipped> {
    if hashes.is_empty() {
        return Ok(Shipped::default());
    }
    let n = streams.clamp(1, hashes.len());
    let per = hashes.len().div_ceil(n);
    let mut tasks = Vec::new();
    for part in hashes.chunks(per) {
        let (conn, spool, part, on_bytes) =
            (conn.clone(), spool.clone(), part.to_vec(), on_bytes.clone());
        tasks.push(tokio::spawn(async move {
            send_stream(&conn, &spool, &part, &*on_bytes).await
        }));
    }
    let mut total = Shipped {
        streams: tasks.len() as u32,
        ..Default::default()
    };
    for t in tasks {
        let (c, b) = t.await.context("data stream task failed")??;
        total.chunks += c;
        total.bytes += b;
    }
    Ok(total)
}

async fn send_stream(
    conn: &quinn::Connection,
    spool: &SpoolReader,
    hashes: &[ChunkHash],
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(u64, u64)> {
    let mut s = conn
        .open_uni()
        .await
        .context("cannot open a data stream: the connection broke")?;
    s.write_all(&[DATA_STREAM_KIND]).await?;
    let mut bytes = 0;
    for h in hashes {
        let frame = tokio::task::block_in_place(|| spool.frame(h))?;
        s.write_all(&frame)
            .await
            .context("the connection broke while sending chunks")?;
        bytes += frame.len() as u64;
        on_bytes(frame.len() as u64);
    }
    s.finish().context("cannot finish data stream")?;
    Ok((hashes.len() as u64, bytes))
}
