//! Sends a cut's needed chunks from its spool on parallel QUIC data streams.

use anyhow::{Context, Result};
use std::num::NonZeroU32;
use std::sync::Arc;
use understudy_common::hash::ChunkHash;
use understudy_common::protocol::{DATA_STREAM_KIND, PUSH_STREAM_KIND};
use understudy_common::source::spool::SpoolReader;

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
    spool: Arc<SpoolReader>,
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
            send_stream(&conn, &spool, &part, limit.as_ref(), &*on_bytes).await
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
    limit: Option<&Limiter>,
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
        if let Some(l) = limit {
            l.take(frame.len()).await;
        }
        s.write_all(&frame)
            .await
            .context("the connection broke while sending chunks")?;
        bytes += frame.len() as u64;
        on_bytes(frame.len() as u64);
    }
    s.finish().context("cannot finish data stream")?;
    Ok((hashes.len() as u64, bytes))
}

/// Frames handed over by the cut as it spools them.
type PushQueue = tokio::sync::Mutex<tokio::sync::mpsc::Receiver<(ChunkHash, Vec<u8>)>>;

/// Sends the frames the cut hands over on up to `streams` push streams, until the cut ends;
/// each stream is opened at its first frame. Returns what went out.
pub async fn push(
    conn: quinn::Connection,
    frames: tokio::sync::mpsc::Receiver<(ChunkHash, Vec<u8>)>,
    streams: usize,
    limit: Option<Limiter>,
    on_bytes: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<Shipped> {
    let queue: Arc<PushQueue> = Arc::new(tokio::sync::Mutex::new(frames));
    let tasks: Vec<_> = (0..streams.max(1))
        .map(|_| {
            let (conn, queue, limit, on_bytes) =
                (conn.clone(), queue.clone(), limit.clone(), on_bytes.clone());
            tokio::spawn(
                async move { push_stream(&conn, &queue, limit.as_ref(), &*on_bytes).await },
            )
        })
        .collect();
    let mut total = Shipped::default();
    let mut first_error = None;
    for t in tasks {
        match t.await.context("push stream task failed")? {
            Ok((chunks, bytes)) => {
                total.streams += u32::from(chunks > 0);
                total.chunks += chunks;
                total.bytes += bytes;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // Keep draining after a failure so the cut never waits on a full queue.
    queue.lock().await.close();
    match first_error {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

async fn push_stream(
    conn: &quinn::Connection,
    queue: &PushQueue,
    limit: Option<&Limiter>,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(u64, u64)> {
    let mut stream: Option<quinn::SendStream> = None;
    let (mut chunks, mut bytes) = (0u64, 0u64);
    loop {
        let next = queue.lock().await.recv().await;
        let Some((_, frame)) = next else { break };
        if stream.is_none() {
            let mut s = conn
                .open_uni()
                .await
                .context("cannot open a push stream: the connection broke")?;
            s.write_all(&[PUSH_STREAM_KIND]).await?;
            stream = Some(s);
        }
        if let Some(l) = limit {
            l.take(frame.len()).await;
        }
        let s = stream.as_mut().expect("opened above");
        if let Err(e) = s.write_all(&frame).await {
            queue.lock().await.close();
            return Err(anyhow::Error::new(e).context("the connection broke while pushing chunks"));
        }
        chunks += 1;
        bytes += frame.len() as u64;
        on_bytes(frame.len() as u64);
    }
    if let Some(mut s) = stream {
        s.finish().context("cannot finish push stream")?;
    }
    Ok((chunks, bytes))
}
