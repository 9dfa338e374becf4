//! `target-agent write`: rebuilds one volume of a point from a running target agent into a
//! device or a new image file, as a writer ticket allows ([`crate::ticket`]). It is what a volume
//! populator's pod runs on the node of the volume, and what rebuilds a volume on another machine
//! in standalone mode.
//!
//! Every chunk is checked against the block the point holds there ([`FetchReceiver`]); holes are
//! never sent, and on a device they are zeroed without writing data where the kernel can
//! (BLKZEROOUT). After an fsync the written blocks are read back from the device and their digest
//! must be the one the source declared at the cut: a volume is reported rebuilt only from the
//! bytes on it. Anything else exits non-zero with the point, volume and offset named, and the
//! volume must not be used (a populator binds nothing then).
//!
//! With `--basis` (failback, protocol 7) the device already holds an earlier copy of the volume
//! (the old primary's): each batch of the point's blocks is compared with it by hash and only the
//! blocks that differ are fetched; blocks the point holds as holes are zeroed only where the
//! device has data. The read-back check is the same, over every data block of the point.

use crate::ticket::WriterTicket;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use understudy_common::hash::{ChunkHash, block_len};
use understudy_common::protocol::REFUSAL_GRACE;
use understudy_common::protocol::fetch::{FetchError, FetchReceiver};
use understudy_common::store::restore::digest_of_blocks;
use understudy_common::transport::connect::{Connector, TargetAddr};
use understudy_common::transport::{Fingerprint, Identity, stream};
use understudy_common::volume::{Volume, VolumeWriter};

/// `write` arguments.
#[derive(clap::Args, Debug)]
pub struct WriteArgs {
    /// The writer's ticket (from `target-agent ticket`, or the Secret a populator made).
    #[arg(long, env = "UNDERSTUDY_TICKET")]
    pub ticket: PathBuf,
    /// Write into this existing block device (or file) of at least the volume's size.
    #[arg(long, required_unless_present = "image", conflicts_with = "image")]
    pub device: Option<PathBuf>,
    /// Write into a new sparse image file (replaced if it exists).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The device holds an earlier copy of this volume (failback onto the old primary's): fetch
    /// only the blocks that differ from the point, compared by hash.
    #[arg(long, conflicts_with = "image")]
    pub basis: bool,
    /// Also write the report here (a pod's termination message path).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// What a writer did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WriteReport {
    /// The group.
    pub group: String,
    /// The point.
    pub seq: u64,
    /// The volume.
    pub volume: String,
    /// Where it was written.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Data blocks written.
    pub blocks: u64,
    /// Bytes of data written (holes not counted).
    pub bytes_written: u64,
    /// Data blocks the device held already, not fetched (`--basis`).
    #[serde(default)]
    pub blocks_matched: u64,
    /// Bytes zeroed because the point holds a hole where the device had data (`--basis`).
    #[serde(default)]
    pub bytes_zeroed: u64,
    /// The digest the source declared at the cut.
    pub expected_digest: String,
    /// The digest of the written blocks, read back after the fsync.
    pub actual_digest: String,
    /// True when the two match: the volume may be used.
    pub ok: bool,
    /// How long it took, in ms.
    pub elapsed_ms: u64,
    /// What failed, when something did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where the volume goes.
enum Output<'a> {
    Device(&'a Path),
    Image(&'a Path),
}

impl Output<'_> {
    fn path(&self) -> &Path {
        match self {
            Output::Device(p) | Output::Image(p) => p,
        }
    }

    /// Opens it for `size` bytes; true when holes must be zeroed (a device, whose old bytes
    /// are unknown).
    fn open(&self, size: u64) -> Result<(VolumeWriter, bool)> {
        match self {
            Output::Device(p) => Ok((VolumeWriter::open_device(p, size)?, true)),
            Output::Image(p) => Ok((VolumeWriter::create_image(p, size)?, false)),
        }
    }
}

/// Runs `write`; exit code 0 when the volume was rebuilt and verified, 2 when it was not.
pub fn run(a: WriteArgs) -> Result<ExitCode> {
    let text = std::fs::read(&a.ticket)
        .with_context(|| format!("cannot read the writer's ticket {}", a.ticket.display()))?;
    let ticket: WriterTicket = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{} is not a writer's ticket: make one with `target-agent ticket`",
            a.ticket.display()
        )
    })?;
    let out = match (&a.device, &a.image) {
        (Some(d), _) => Output::Device(d),
        (None, Some(i)) => Output::Image(i),
        (None, None) => bail!("give --device or --image"),
    };
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new()?;
    let mut report = match rt.block_on(write(&ticket, &out, a.basis)) {
        Ok(r) => r,
        Err(e) => WriteReport {
            group: ticket.group.clone(),
            seq: ticket.seq,
            volume: ticket.volume.clone(),
            path: out.path().display().to_string(),
            size: ticket.size,
            expected_digest: ticket.digest.clone(),
            error: Some(format!("{e:#}")),
            ..WriteReport::default()
        },
    };
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    let json = serde_json::to_string_pretty(&report)? + "\n";
    if let Some(p) = &a.report {
        std::fs::write(p, &json)
            .with_context(|| format!("cannot write the report to {}", p.display()))?;
    }
    print!("{json}");
    if let Some(e) = &report.error {
        eprintln!("error: {e}");
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Connects as the ticket says and rebuilds the volume into `out`.
async fn write(t: &WriterTicket, out: &Output<'_>, basis: bool) -> Result<WriteReport> {
    let identity = Identity::from_pem(t.cert_pem.as_bytes(), t.key_pem.as_bytes())
        .context("the ticket's key is unreadable")?;
    let pinned: Fingerprint = t.target_fingerprint.parse()?;
    let connector = Connector::new(identity, vec![pinned]);
    let target: TargetAddr = t.target.parse()?;
    let conn = connector.connect(&target).await?;
    let result = fetch_into(&conn, t, out, basis).await;
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(REFUSAL_GRACE, connector.shutdown()).await;
    let why = understudy_common::transport::explain_close(&conn);
    result.map_err(|e| match why {
        Some(w) if e.downcast_ref::<FetchError>().is_none() => e.context(w),
        _ => e,
    })
}

/// The fetch session on an open connection.
async fn fetch_into(
    conn: &quinn::Connection,
    t: &WriterTicket,
    out: &Output<'_>,
    basis: bool,
) -> Result<WriteReport> {
    let (mut send, mut recv) = conn.open_bi().await.context(
        "cannot open the control stream: the target closed the connection (has the ticket lapsed?)",
    )?;
    stream::write_preamble(&mut send).await?;
    stream::read_preamble(&mut recv).await?;
    let (mut rx, hello) = if basis {
        FetchReceiver::with_basis(&t.group, t.seq, &t.volume)
    } else {
        FetchReceiver::new(&t.group, t.seq, &t.volume)
    };
    stream::send(&mut send, &hello).await?;
    rx.on_message(stream::recv(&mut recv).await?)?;
    let h = rx
        .header()
        .cloned()
        .context("the target sent no volume header")?;
    if (h.size, &h.digest) != (t.size, &t.digest) {
        bail!(
            "the target describes volume {} of point {} as {} bytes with digest {}, the ticket as {} bytes with digest {}: make a new ticket",
            t.volume,
            t.seq,
            h.size,
            h.digest,
            t.size,
            t.digest
        );
    }
    let (writer, zero_holes) = out.open(h.size)?;
    let mut zeroed = 0;
    let received = if basis {
        let copy = Basis {
            device: writer.reopen()?,
            writer: &writer,
            size: h.size,
            block_size: h.block_size,
        };
        receive_basis(conn, (&mut send, &mut recv), &mut rx, &copy, &mut zeroed).await
    } else {
        receive(conn, &mut recv, &mut rx, &writer, zero_holes, h.size).await
    };
    let runs = match received {
        Ok(v) => v,
        Err(e) => return Err(refusal_or(&mut recv, e).await),
    };
    let fetched = rx.finish()?;
    tokio::task::block_in_place(|| writer.sync())?;
    let actual = tokio::task::block_in_place(|| {
        digest_of_blocks(
            &writer.reopen()?,
            h.size,
            h.block_size,
            Box::new(runs.into_iter().map(Ok)),
        )
    })?;
    let ok = actual == h.digest;
    Ok(WriteReport {
        group: t.group.clone(),
        seq: t.seq,
        volume: t.volume.clone(),
        path: out.path().display().to_string(),
        size: h.size,
        blocks: fetched.blocks,
        bytes_written: fetched.bytes,
        blocks_matched: fetched.matched,
        bytes_zeroed: zeroed,
        error: (!ok).then(|| format!(
            "volume {} of point {}: the bytes read back from {} make digest {actual}, the source declared {}: the device does not hold what was written; do not use it",
            t.volume, t.seq, out.path().display(), h.digest
        )),
        expected_digest: h.digest,
        actual_digest: actual,
        ok,
        elapsed_ms: 0,
    })
}

/// The target's data stream of the fetch.
async fn data_stream(conn: &quinn::Connection) -> Result<quinn::RecvStream> {
    let mut data = conn
        .accept_uni()
        .await
        .context("the target opened no data stream")?;
    stream::read_data_kind(&mut data).await?;
    Ok(data)
}

/// Takes the data stream to its end, writing each block where it belongs and zeroing the holes
/// between (when `zero_holes`); returns the data blocks written, as runs of adjacent blocks.
async fn receive(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    rx: &mut FetchReceiver,
    writer: &VolumeWriter,
    zero_holes: bool,
    size: u64,
) -> Result<Vec<Range<u64>>> {
    let mut data = data_stream(conn).await?;
    let mut buf = Vec::new();
    let mut runs: Vec<Range<u64>> = Vec::new();
    let mut covered = 0u64; // bytes before this are written or zeroed
    loop {
        let next = stream::read_frame(&mut data).await;
        while rx.wants_entries() {
            rx.on_message(stream::recv(recv).await?)?;
        }
        let frame = match next {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => match e.downcast::<understudy_common::chunk::FrameError>() {
                Ok(bad) => return Err(rx.unreadable_frame(bad).into()),
                Err(e) => return Err(e.context("the data stream broke")),
            },
        };
        // Decode, check and write in one blocking section per block.
        let w = tokio::task::block_in_place(|| -> Result<_> {
            let w = rx.on_frame(&frame, &mut buf)?;
            if zero_holes {
                writer.zero_range(covered, w.offset - covered)?;
            }
            writer.write_at(&buf, w.offset)?;
            Ok(w)
        })?;
        covered = w.offset + buf.len() as u64;
        match runs.last_mut() {
            Some(r) if r.end == w.index => r.end += 1,
            _ => runs.push(w.index..w.index + 1),
        }
    }
    while !rx.complete() {
        rx.on_message(stream::recv(recv).await?)?;
    }
    if zero_holes {
        tokio::task::block_in_place(|| writer.zero_range(covered, size - covered))?;
    }
    Ok(runs)
}

/// The device of a basis fetch: an earlier copy of the volume, compared with the point.
struct Basis<'a> {
    device: Volume,
    writer: &'a VolumeWriter,
    /// The volume's size (the device may be larger).
    size: u64,
    block_size: u32,
}

impl Basis<'_> {
    /// The positions, in `batch`, of the blocks the device does not hold.
    fn differing(&self, batch: &[(u64, ChunkHash)], buf: &mut Vec<u8>) -> Result<Vec<u32>> {
        let (size, bs) = (self.size, self.block_size);
        let mut picks = Vec::new();
        for (k, (index, hash)) in batch.iter().enumerate() {
            buf.resize(block_len(size, bs, *index) as usize, 0);
            let n = self.device.read_at(buf, index * bs as u64)?;
            if n < buf.len() || ChunkHash::of(buf) != *hash {
                picks.push(k as u32);
            }
        }
        Ok(picks)
    }

    /// Zeroes what holds data in `[from, to)` (a hole of the point); returns the bytes zeroed.
    fn clear(&self, from: u64, to: u64, buf: &mut Vec<u8>) -> Result<u64> {
        let step = self.block_size as u64;
        let mut zeroed = 0;
        let mut pos = from;
        for extent in self.device.data_extents(from, to.saturating_sub(from)) {
            // Block by block (`from` is a block's start), so that a report counts whole blocks.
            pos = pos.max(extent.start - (extent.start - from) % step);
            while pos < extent.end {
                let len = step.min(to - pos);
                buf.resize(len as usize, 0);
                let n = self.device.read_at(buf, pos)?;
                if buf[..n].iter().any(|b| *b != 0) {
                    self.writer.zero_range(pos, len)?;
                    zeroed += len;
                }
                pos += len;
            }
        }
        Ok(zeroed)
    }
}

/// A basis fetch: for each batch of entries, the holes before them are cleared, the blocks the
/// device lacks are asked for and written as they come. Returns every data block of the point,
/// as runs (the read-back covers them all).
async fn receive_basis(
    conn: &quinn::Connection,
    (send, recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
    rx: &mut FetchReceiver,
    copy: &Basis<'_>,
    zeroed: &mut u64,
) -> Result<Vec<Range<u64>>> {
    let mut data = data_stream(conn).await?;
    let bs = copy.block_size as u64;
    let (mut buf, mut runs, mut covered) = (Vec::new(), Vec::<Range<u64>>::new(), 0u64);
    loop {
        while rx.wants_entries() {
            rx.on_message(stream::recv(recv).await?)?;
        }
        if rx.complete() {
            break;
        }
        let batch = rx.offered().to_vec();
        let picks = tokio::task::block_in_place(|| -> Result<_> {
            for (index, _) in &batch {
                *zeroed += copy.clear(covered, index * bs, &mut buf)?;
                covered = (index + 1) * bs;
            }
            copy.differing(&batch, &mut buf)
        })?;
        for (index, _) in &batch {
            match runs.last_mut() {
                Some(r) if r.end == *index => r.end += 1,
                _ => runs.push(*index..index + 1),
            }
        }
        let n = picks.len();
        stream::send(send, &rx.want(picks)?).await?;
        for _ in 0..n {
            let frame = match stream::read_frame(&mut data).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    rx.finish()?; // names how many frames were missing
                    bail!("the data stream ended before the frames the writer asked for");
                }
                Err(e) => match e.downcast::<understudy_common::chunk::FrameError>() {
                    Ok(bad) => return Err(rx.unreadable_frame(bad).into()),
                    Err(e) => return Err(e.context("the data stream broke")),
                },
            };
            tokio::task::block_in_place(|| -> Result<()> {
                let w = rx.on_frame(&frame, &mut buf)?;
                copy.writer.write_at(&buf, w.offset)
            })?;
        }
    }
    let size = copy.size;
    *zeroed += tokio::task::block_in_place(|| copy.clear(covered.min(size), size, &mut buf))?;
    Ok(runs)
}

/// A data stream that broke may be the target refusing (a chunk it cannot read): its refusal,
/// when one comes on the control stream within the grace, says why better than the broken stream.
async fn refusal_or(recv: &mut quinn::RecvStream, e: anyhow::Error) -> anyhow::Error {
    if e.downcast_ref::<FetchError>().is_some() {
        return e;
    }
    let deadline = tokio::time::Instant::now() + REFUSAL_GRACE;
    while let Ok(Ok(msg)) = tokio::time::timeout_at(deadline, stream::recv(recv)).await {
        if let understudy_common::protocol::Control::Refused { message, .. } = msg {
            return anyhow::anyhow!("the target refused: {message}");
        }
    }
    e
}
