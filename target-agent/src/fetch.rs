//! Serves a writer's fetch session (protocol 5, [`understudy_common::protocol::fetch`]): one
//! volume of one committed point, its data blocks in block order on the control stream and their
//! chunk frames, as stored, on one data stream. Holes are never sent. The writer checks every
//! chunk; the target only reads. In a basis fetch (protocol 7, failback) the target sends a
//! batch's frames only after the writer's `Want`, and only the ones it picks.

use crate::session::SessionContext;
use anyhow::{Context, Result};
use std::time::Duration;
use understudy_common::protocol::fetch;
use understudy_common::protocol::source_session::SessionError;
use understudy_common::protocol::target_session::refusal;
use understudy_common::protocol::{Control, ENTRIES_PER_MESSAGE, REFUSAL_GRACE, RefuseCode};
use understudy_common::store::Store;
use understudy_common::store::pack::Location;
use understudy_common::transport::grants::FetchGrant;
use understudy_common::transport::stream::{self, StreamKind};

/// How long a writer that read everything may take to close the connection.
const DRAIN_WAIT: Duration = Duration::from_secs(30);

/// How long a basis writer may take to compare one batch of entries with its copy (a batch is
/// up to 16384 blocks, 1 GiB at the default block size, read from its device).
const WANT_WAIT: Duration = Duration::from_secs(600);

/// Runs a writer's session to its end.
pub async fn serve(
    ctx: &SessionContext,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    grant: FetchGrant,
) -> Result<()> {
    // Retention's garbage collection waits while a point is read.
    let _gate = ctx.gc_gate.read().await;
    let first = tokio::time::timeout(Duration::from_secs(30), stream::recv(recv))
        .await
        .context("the writer sent no Fetch within 30 s")??;
    match send_volume(ctx, conn, (send, recv), &grant, first).await {
        Ok(Ok(blocks)) => {
            tracing::info!(group = %grant.group, seq = grant.seq, volume = %grant.volume, blocks_sent = blocks, "a writer fetched a volume");
            let _ = tokio::time::timeout(DRAIN_WAIT, conn.closed()).await;
            Ok(())
        }
        Ok(Err(e)) => {
            let _ = stream::send(send, &refusal(&e)).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(REFUSAL_GRACE, conn.closed()).await;
            conn.close(2u32.into(), b"fetch refused");
            Err(e.into())
        }
        Err(e) => Err(e.context("the fetch broke")),
    }
}

/// Sends the volume; the inner error is a refusal the writer should hear, the outer one a broken
/// connection. Returns the chunk frames sent.
async fn send_volume(
    ctx: &SessionContext,
    conn: &quinn::Connection,
    (send, recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
    grant: &FetchGrant,
    first: Control,
) -> Result<Result<u64, SessionError>> {
    let fetch::FetchRequest {
        group,
        seq,
        volume,
        basis,
    } = match fetch::admit(grant, first) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    let store = ctx.store.clone();
    let loaded = tokio::task::block_in_place(|| load(&store, &group, seq, &volume));
    let (header, map, locations) = match loaded {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    stream::send(send, &header).await?;
    let mut data = stream::open_data(conn, StreamKind::Data).await?;
    let mut frame = Vec::new();
    let mut sent = 0u64;
    for (entries, locs) in map
        .data()
        .chunks(ENTRIES_PER_MESSAGE)
        .zip(locations.chunks(ENTRIES_PER_MESSAGE))
    {
        stream::send(
            send,
            &Control::BaseEntries {
                entries: entries.to_vec(),
            },
        )
        .await?;
        let picks = if basis {
            let want = tokio::time::timeout(WANT_WAIT, stream::recv(recv))
                .await
                .with_context(|| {
                    format!("the writer chose nothing within {} s", WANT_WAIT.as_secs())
                })??;
            match fetch::picked(locs.len(), want) {
                Ok(p) => p,
                Err(e) => return Ok(Err(e)),
            }
        } else {
            (0..locs.len()).collect()
        };
        for loc in picks.into_iter().map(|k| &locs[k]) {
            sent += 1;
            if let Err(e) = tokio::task::block_in_place(|| store.read_frame_into(*loc, &mut frame))
            {
                let _ = data.reset(0u32.into());
                return Ok(Err(SessionError::Refused {
                    code: RefuseCode::StoreFailed,
                    message: format!(
                        "cannot read a chunk of volume {volume} of point {seq} from the store: {e:#}"
                    ),
                }));
            }
            stream::write_frame(&mut data, &frame).await?;
        }
    }
    let blocks = map.data().len() as u64;
    stream::send(send, &Control::BaseEnd { entries: blocks }).await?;
    data.finish().context("cannot end the data stream")?;
    send.finish().context("cannot end the control stream")?;
    Ok(Ok(sent))
}

/// The volume's header, map and chunk locations; a refusal naming what is missing.
fn load(
    store: &Store,
    group: &str,
    seq: u64,
    volume: &str,
) -> Result<
    (
        Control,
        understudy_common::block_map::BlockMap,
        Vec<Location>,
    ),
    SessionError,
> {
    let failed = |e: anyhow::Error| SessionError::Refused {
        code: RefuseCode::StoreFailed,
        message: format!("{e:#}"),
    };
    let point = store
        .point(group, seq)
        .map_err(failed)?
        .ok_or_else(|| SessionError::Invalid(format!("group {group} has no point {seq} (retention may have dropped it): rebuild from a point `target-agent points` lists")))?;
    let header = fetch::header(&point, volume)?;
    let map = store.block_map(group, seq, volume).map_err(failed)?;
    let hashes: Vec<_> = map.data().iter().map(|(_, h)| *h).collect();
    let found = store.locate_all(&hashes).map_err(failed)?;
    let mut locations = Vec::with_capacity(found.len());
    for ((index, hash), loc) in map.data().iter().zip(found) {
        let loc = loc.ok_or_else(|| SessionError::Refused {
            code: RefuseCode::StoreFailed,
            message: format!(
                "volume {volume} of point {seq}, block {index}: chunk {hash} is not in the store: run `target-agent verify`"
            ),
        })?;
        locations.push(loc);
    }
    Ok((header, map, locations))
}
