//! A session over one connection to the target, from the source's side: opens the control
//! stream, pushes a cut's frames while it is made, and runs the [`SourceSession`] machine to its
//! end (needs, data streams, commit). The standalone cycle, a mover and the controller's commit
//! all drive their sessions through it.

use crate::ship::{Limiter, PushFeed, Shipped, push, ship};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;
use understudy_common::cut::snapshot::FrameFeed;
use understudy_common::cut::spool::{Feed, FrameSource};
use understudy_common::hash::ChunkHash;
use understudy_common::protocol::Control;
use understudy_common::protocol::source_session::{SourceSession, SourceStep};
use understudy_common::transport::stream;

/// A connection to the target and how to send on it.
#[derive(Clone)]
pub struct Link {
    /// The connection.
    pub conn: quinn::Connection,
    /// Parallel data (and push) streams.
    pub streams: usize,
    /// Cap on the chunk bytes sent.
    pub limit: Option<Limiter>,
    /// Called with every frame's bytes as they go out (metrics).
    pub on_bytes: Arc<dyn Fn(u64) + Send + Sync>,
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The cut is point `seq` (or was already).
    Committed(u64),
    /// The target does not hold the delta's base.
    BaseMismatch,
    /// A mover's volume is staged.
    Staged,
}

/// What a session sent and learnt.
#[derive(Clone, Debug, Default)]
pub struct Sent {
    /// Chunks sent (pushed and asked for).
    pub chunks: u64,
    /// Of those, chunks pushed while the cut was made.
    pub pushed: u64,
    /// Frame bytes sent.
    pub bytes: u64,
    /// Chunks the cut references that the target already held.
    pub held: u64,
    /// Block-map entries that changed.
    pub blocks_changed: u64,
    /// True when the target had already committed the cut.
    pub already_committed: bool,
    /// The group's planned migration as the target told it (protocol 6).
    pub migration: Option<understudy_common::protocol::MigrationState>,
}

/// The task pushing a cut's frames while it is made.
pub type Pusher = tokio::task::JoinHandle<Result<Shipped>>;

/// Frames a snapshot's scan may have made ahead of the push (64 KiB blocks: 2 MiB).
const PUSHED_FRAMES_QUEUE: usize = 32;

/// The two halves of the control stream.
pub type Control2 = (quinn::SendStream, quinn::RecvStream);

impl Link {
    /// Opens the control stream and exchanges preambles.
    pub async fn open_control(&self) -> Result<Control2> {
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .context("cannot open the control stream")?;
        stream::write_preamble(&mut send).await?;
        stream::read_preamble(&mut recv)
            .await
            .context("target did not accept the session")?;
        Ok((send, recv))
    }

    /// Starts pushing the frames a spool at `spool` announces on the returned feed.
    pub fn start_push(&self, spool: &Path) -> (Feed, Pusher) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let feed = PushFeed::Spool {
            path: spool.to_path_buf(),
            feed: rx,
        };
        (tx, self.spawn_push(feed))
    }

    /// Starts pushing the frames handed to the returned feed (a snapshot's cut: no spool).
    pub fn start_push_frames(&self) -> (FrameFeed, Pusher) {
        let (tx, rx) = tokio::sync::mpsc::channel(PUSHED_FRAMES_QUEUE);
        (tx, self.spawn_push(PushFeed::Frames(rx)))
    }

    fn spawn_push(&self, feed: PushFeed) -> Pusher {
        tokio::spawn(push(
            self.conn.clone(),
            feed,
            self.streams,
            self.limit.clone(),
            self.on_bytes.clone(),
        ))
    }

    /// After the cut is made: hands the offer's first step to the session, waits for the push
    /// (the target answers once its push streams drained), then drives the session to its end.
    pub async fn finish_pushed(
        &self,
        (mut send, mut recv): Control2,
        session: SourceSession,
        first: SourceStep,
        pusher: Option<Pusher>,
        frames: Arc<dyn FrameSource>,
        sent: &mut Sent,
    ) -> Result<Outcome> {
        let first = match first {
            SourceStep::Send(msgs) => {
                for m in &msgs {
                    stream::send(&mut send, m).await?;
                }
                None
            }
            other => Some(other),
        };
        match pusher {
            Some(p) if first.is_none() => {
                let _abort = AbortOnDrop(p.abort_handle());
                let pushed = match p.await.context("push task failed")? {
                    Ok(pushed) => pushed,
                    Err(e) => return Err(refusal_or(&mut recv, e).await),
                };
                sent.pushed = pushed.chunks;
                sent.chunks = pushed.chunks;
                sent.bytes = pushed.bytes;
            }
            Some(p) => p.abort(),
            None => {}
        }
        self.drive((send, recv), session, first, frames, sent).await
    }

    /// Runs a session to its end: handles `step` (if any), then each message from the target.
    /// Chunks the target asks for are read from `frames`.
    pub async fn drive(
        &self,
        (mut send, mut recv): Control2,
        mut session: SourceSession,
        mut step: Option<SourceStep>,
        frames: Arc<dyn FrameSource>,
        sent: &mut Sent,
    ) -> Result<Outcome> {
        loop {
            let next = match step.take() {
                Some(s) => s,
                None => {
                    let msg = stream::recv(&mut recv)
                        .await
                        .context("target closed the session")?;
                    if let Control::NeedEnd { held, .. } = &msg {
                        sent.held = *held;
                    }
                    session.on_message(msg)?
                }
            };
            match next {
                SourceStep::Send(msgs) => {
                    for m in &msgs {
                        stream::send(&mut send, m).await?;
                    }
                }
                SourceStep::SendChunks(hashes) => {
                    let shipped = self.send_chunks(frames.clone(), hashes).await?;
                    sent.chunks += shipped.chunks;
                    sent.bytes += shipped.bytes;
                    let commit = session.commit(shipped.streams, shipped.chunks);
                    stream::send(&mut send, &commit).await?;
                }
                SourceStep::AlreadyCommitted { seq } => {
                    sent.already_committed = true;
                    sent.migration = session.migration().cloned();
                    self.conn.close(0u32.into(), b"done");
                    return Ok(Outcome::Committed(seq));
                }
                SourceStep::BaseMismatch { .. } => {
                    self.conn.close(0u32.into(), b"base mismatch");
                    return Ok(Outcome::BaseMismatch);
                }
                SourceStep::Committed {
                    seq,
                    blocks_changed,
                } => {
                    sent.blocks_changed = blocks_changed;
                    sent.migration = session.migration().cloned();
                    let _ = send.finish();
                    self.conn.close(0u32.into(), b"done");
                    return Ok(Outcome::Committed(seq));
                }
                SourceStep::Staged { blocks_changed } => {
                    sent.blocks_changed = blocks_changed;
                    let _ = send.finish();
                    self.conn.close(0u32.into(), b"done");
                    return Ok(Outcome::Staged);
                }
                SourceStep::Base(_) | SourceStep::BaseEnd => {
                    anyhow::bail!("target sent a base outside a mover's scan")
                }
            }
        }
    }

    async fn send_chunks(
        &self,
        spool: Arc<dyn FrameSource>,
        hashes: Vec<ChunkHash>,
    ) -> Result<Shipped> {
        let total: u64 = hashes.iter().filter_map(|h| spool.len_of(h)).sum();
        let pb = understudy_common::progress::bytes(total, "send");
        let (bar, counter) = (pb.clone(), self.on_bytes.clone());
        let on_bytes: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |n| {
            counter(n);
            bar.inc(n);
        });
        let r = ship(
            &self.conn,
            spool,
            hashes,
            self.streams,
            self.limit.clone(),
            on_bytes,
        )
        .await;
        pb.finish_and_clear();
        r
    }

    /// Adds why the connection closed, when it says, to a session error.
    pub fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        match understudy_common::transport::explain_close(&self.conn) {
            Some(why) => e.context(why),
            None => e,
        }
    }
}

/// Aborts a task when dropped (when the future awaiting it is dropped by a stop).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The target's Refused, when it sent one before a push failed (it says why: a full disk, a
/// protocol error), or else the push's own error.
async fn refusal_or(recv: &mut quinn::RecvStream, push_error: anyhow::Error) -> anyhow::Error {
    match tokio::time::timeout(understudy_common::protocol::REFUSAL_GRACE, stream::recv(recv)).await {
        Ok(Ok(Control::Refused { code, message })) => {
            anyhow::anyhow!("target refused the session ({code:?}): {message}")
        }
        _ => push_error.context(
            "the connection broke while pushing the cut's chunks; the cut is kept and sent on the next attempt",
        ),
    }
}
