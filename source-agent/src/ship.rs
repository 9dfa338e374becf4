//! Sends a cut's chunks on parallel QUIC data streams: pushed while the cut is made (from its
//! spool, or handed over by the scan of a snapshot), and those the target asks for after the
//! offer (from a [`FrameSource`]).

use anyhow::{Context, Result};
use std::num::NonZeroU32;
use std::sync::Arc;
use understudy_common::cut::spool::{FrameSource, SpoolReader};
use understudy_common::hash::ChunkHash;
use understudy_common::transport::stream::{self, StreamKind};

/// A shared cap on the bytes all data streams send (a token bucket counted in KiB).
#[derive(Clone)]
pub struct Limiter(Arc<governor::DefaultDirectRateLimiter>);

/// Burst allowed above the rate, in KiB: a few frames, so streams do not stall one another.
const BURST_KIB: u32 = 512;

impl Limiter {
    /// A cap of `mbit` megabits (10^6 bits) per second.
    pub fn mbit(mbit: u32) -> Self {
        let kib_per_second = (u64::from(mbit) * 1_000_000 / 8 / 1024).max(1);
        let rate =
            NonZeroU32::new(u32::try_from(kib_per_second).unwrap_or(u32::MAX)).expect("at least 1");
        let burst = NonZeroU32::new(BURST_KIB).expect("non-zero");
        Limiter(Arc::new(governor::RateLimiter::direct(
            governor::Quota::per_second(rate).allow_burst(burst),
        )))
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, bytes: usize) {
        let kib = bytes.div_ceil(1024).clamp(1, BURST_KIB as usize) as u32;
        let n = NonZeroU32::new(kib).expect("at least 1");
        // Never fails: n is within the burst.
        let _ = self.0.until_n_ready(n).await;
    }
}

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
    spool: Arc<dyn FrameSource>,
    hashes: Vec<ChunkHash>,
    streams: usize,
    limit: Option<Limiter>,
    on_bytes: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<Shipped> {
    if hashes.is_empty() {
        return Ok(Shipped::default());
    }
    let n = streams.clamp(1, hashes.len());
    let per = hashes.len().div_ceil(n);
    let mut tasks = Vec::new();
    for part in hashes.chunks(per) {
        let (conn, spool, part, on_bytes, limit) = (
            conn.clone(),
            spool.clone(),
            part.to_vec(),
            on_bytes.clone(),
            limit.clone(),
        );
        tasks.push(tokio::spawn(async move {
            send_stream(&conn, &*spool, &part, limit.as_ref(), &*on_bytes).await
        }));
    }
    join_streams(tasks).await
}

/// Waits for every stream task; sums what they sent.
async fn join_streams(tasks: Vec<tokio::task::JoinHandle<Result<(u64, u64)>>>) -> Result<Shipped> {
    let mut total = Shipped {
        streams: tasks.len() as u32,
        ..Default::default()
    };
    for t in tasks {
        let (chunks, bytes) = t.await.context("stream task failed")??;
        total.chunks += chunks;
        total.bytes += bytes;
    }
    Ok(total)
}

/// Sends one frame on `s` within the cap, and counts it.
async fn send_frame(
    s: &mut quinn::SendStream,
    frame: &[u8],
    limit: Option<&Limiter>,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<()> {
    if let Some(l) = limit {
        l.take(frame.len()).await;
    }
    stream::write_frame(s, frame).await?;
    on_bytes(frame.len() as u64);
    Ok(())
}

async fn send_stream(
    conn: &quinn::Connection,
    spool: &dyn FrameSource,
    hashes: &[ChunkHash],
    limit: Option<&Limiter>,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(u64, u64)> {
    let mut s = stream::open_data(conn, StreamKind::Data).await?;
    let mut bytes = 0;
    let mut frame = Vec::new();
    for h in hashes {
        tokio::task::block_in_place(|| spool.frame_into(h, &mut frame))?;
        send_frame(&mut s, &frame, limit, on_bytes).await?;
        bytes += frame.len() as u64;
    }
    s.finish().context("cannot finish data stream")?;
    Ok((hashes.len() as u64, bytes))
}

/// Work of one push stream: frames, in order.
type StreamQueue = tokio::sync::mpsc::Receiver<Vec<u8>>;

/// Frames waiting per push stream.
const PUSH_STREAM_QUEUE: usize = 8;

/// Where the frames to push come from while a cut is made.
pub enum PushFeed {
    /// A spool announces them (its file's offsets, unbounded, so the cut never waits); they are
    /// read back from the file (the page cache).
    Spool {
        /// The spool file.
        path: std::path::PathBuf,
        /// Its announcements.
        feed: tokio::sync::mpsc::UnboundedReceiver<Vec<(u64, u32)>>,
    },
    /// The scan hands them over (a snapshot's cut, which is not spooled; bounded).
    Frames(tokio::sync::mpsc::Receiver<Vec<u8>>),
}

impl PushFeed {
    /// The next frames in order; `None` once the feed ended.
    async fn next(&mut self, reader: &mut Option<SpoolReader>) -> Result<Option<Vec<Vec<u8>>>> {
        match self {
            PushFeed::Frames(rx) => Ok(rx.recv().await.map(|f| vec![f])),
            PushFeed::Spool { path, feed } => {
                let Some(batch) = feed.recv().await else {
                    return Ok(None);
                };
                let r = match reader {
                    Some(r) => r,
                    None => reader.insert(SpoolReader::growing(path).with_context(|| {
                        format!("cannot open the spool {} to push from it", path.display())
                    })?),
                };
                let frames = tokio::task::block_in_place(|| {
                    batch
                        .into_iter()
                        .map(|(offset, len)| {
                            let mut frame = Vec::new();
                            r.frame_at(offset, len, &mut frame).map(|()| frame)
                        })
                        .collect::<Result<Vec<_>>>()
                })?;
                Ok(Some(frames))
            }
        }
    }
}

/// Pushes the frames of `feed` on `streams` push streams, until the feed ends and all are
/// sent. The streams are opened at once, so their number is known before the offer.
pub async fn push(
    conn: quinn::Connection,
    mut feed: PushFeed,
    streams: usize,
    limit: Option<Limiter>,
    on_bytes: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<Shipped> {
    let n = streams.max(1);
    let mut lanes = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let s = stream::open_data(&conn, StreamKind::Push).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(PUSH_STREAM_QUEUE);
        lanes.push(tx);
        let (limit, on_bytes) = (limit.clone(), on_bytes.clone());
        tasks.push(tokio::spawn(async move {
            push_stream(s, rx, limit.as_ref(), &*on_bytes).await
        }));
    }
    let mut next = 0;
    let mut reader = None;
    'feed: while let Some(frames) = feed.next(&mut reader).await? {
        for frame in frames {
            if lanes[next % n].send(frame).await.is_err() {
                break 'feed; // that stream failed: its task reports why
            }
            next += 1;
        }
    }
    drop(lanes);
    join_streams(tasks).await
}

async fn push_stream(
    mut s: quinn::SendStream,
    mut frames: StreamQueue,
    limit: Option<&Limiter>,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(u64, u64)> {
    let (mut chunks, mut bytes) = (0u64, 0u64);
    while let Some(frame) = frames.recv().await {
        send_frame(&mut s, &frame, limit, on_bytes).await?;
        chunks += 1;
        bytes += frame.len() as u64;
    }
    s.finish().context("cannot finish push stream")?;
    Ok((chunks, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap is a ceiling: 4 MiB at 16 Mbit/s (2 MB/s) cannot pass in less than the time the
    /// bucket takes to refill beyond its 512 KiB burst. (A lower bound only: a slow machine
    /// makes this test slower, never wrong.)
    #[tokio::test]
    async fn the_limiter_never_lets_more_than_the_cap_through() {
        let l = Limiter::mbit(16);
        let start = std::time::Instant::now();
        for _ in 0..64 {
            l.take(64 << 10).await;
        }
        let floor = ((4u64 << 20) - (512 << 10)) as f64 / 2e6;
        let took = start.elapsed().as_secs_f64();
        assert!(
            took >= floor * 0.98,
            "4 MiB took {took:.2} s, the cap allows {floor:.2} s at least"
        );
    }
}
