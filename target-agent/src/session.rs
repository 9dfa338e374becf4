//! Runs one session on an authenticated connection (a writer's fetch goes to [`crate::fetch`]): moves bytes between QUIC streams
//! and the [`TargetSession`] state machine, which holds all protocol logic.

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use understudy_common::chunk::{self, Verified};
use understudy_common::metrics::Metrics;
use understudy_common::protocol::source_session::SessionError;
use understudy_common::protocol::target_session::{
    FlushPolicy, TargetSession, TargetStep, refusal,
};
use understudy_common::protocol::{Control, REFUSAL_GRACE, RefuseCode};
use understudy_common::store::Store;
use understudy_common::store::retention::RetentionPolicy;
use understudy_common::transport::grants::{Grants, Permit};
use understudy_common::transport::stream::StreamKind;
use understudy_common::transport::{Fingerprint, peer_fingerprint, stream};

/// What every session shares.
pub struct SessionContext {
    /// The store.
    pub store: Arc<Store>,
    /// Groups with a session running (one session per group at a time), and its connection.
    pub busy: Mutex<HashMap<String, quinn::Connection>>,
    /// Sessions hold it shared; garbage collection needs it alone.
    pub gc_gate: tokio::sync::RwLock<()>,
    /// Retention after each commit.
    pub retention: RetentionPolicy,
    /// When sessions make received chunks durable.
    pub flush: FlushPolicy,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The pinned sources.
    pub peers: Vec<Fingerprint>,
    /// Grants in force: the TLS verifier admits their certificates; a mover's session may only
    /// stage the volume granted (protocol 4), a writer's only read the volume granted
    /// (protocol 5).
    pub grants: Arc<Grants>,
    /// The target's own certificate fingerprint (what writers' tickets pin).
    pub fingerprint: understudy_common::transport::Fingerprint,
}

enum Event {
    Control(Result<Control>),
    Chunk(StreamKind, Verified),
    StreamEnd(StreamKind),
    StreamFailed(anyhow::Error),
}

/// Releases the group's busy mark when the session ends, however it ends.
struct GroupGuard<'a> {
    ctx: &'a SessionContext,
    group: Option<String>,
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        if let Some(g) = &self.group {
            self.ctx.busy.lock().expect("busy lock").remove(g);
        }
    }
}

/// Runs a session to its end.
pub async fn run_session(conn: quinn::Connection, ctx: Arc<SessionContext>) -> Result<()> {
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(30), conn.accept_bi())
        .await
        .context("peer opened no control stream within 30 s")?
        .context("connection closed before the control stream")?;
    if let Err(e) = stream::read_preamble(&mut recv).await {
        tracing::warn!(remote = %conn.remote_address(), error = %format!("{e:#}"), "refused session");
        let _ = stream::write_preamble(&mut send).await;
        let _ = send.finish();
        tokio::time::sleep(Duration::from_millis(200)).await;
        conn.close(1u32.into(), b"bad preamble or protocol version");
        return Err(e);
    }
    stream::write_preamble(&mut send).await?;
    let permit = permit_of(&ctx, &conn);
    if let Some(Permit::Fetch(grant)) = permit {
        return crate::fetch::serve(&ctx, &conn, &mut send, &mut recv, grant).await;
    }
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(read_control(recv, tx.clone()));
    tokio::spawn(accept_data(conn.clone(), tx));
    let gate = ctx.gc_gate.read().await;
    let mut guard = GroupGuard {
        ctx: &ctx,
        group: None,
    };
    let mut session = new_session(&ctx, &conn, permit);
    let result = drive(&ctx, &conn, &mut send, rx, &mut guard, &mut session).await;
    // Make what arrived durable for the next session; a failure here is logged, never allowed to
    // replace the session's own outcome (which says what went wrong first).
    if let Err(e) = tokio::task::block_in_place(|| session.close()) {
        tracing::error!(error = %e, "could not make received chunks durable; the next session resends them");
    }
    drop(gate);
    drop(guard);
    match &result {
        Ok(Some(group)) => {
            if !session.is_mover() {
                ctx.grants.revoke_group(group);
                after_commit(&ctx, group).await;
            }
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "session failed");
            // Let the Refused that says why reach the source before the connection goes.
            let _ = send.finish();
            let _ = tokio::time::timeout(REFUSAL_GRACE, conn.closed()).await;
            conn.close(2u32.into(), b"session failed");
        }
    }
    result.map(|_| ())
}

/// The grant of the peer's certificate, when it is not a pinned peer's.
fn permit_of(ctx: &SessionContext, conn: &quinn::Connection) -> Option<Permit> {
    peer_fingerprint(conn)
        .filter(|fp| !ctx.peers.contains(fp))
        .and_then(|fp| ctx.grants.get(&fp, understudy_common::now_ms()))
}

/// A source's session for a pinned peer; a mover's for a certificate a source granted.
fn new_session(
    ctx: &SessionContext,
    conn: &quinn::Connection,
    permit: Option<Permit>,
) -> TargetSession {
    let (store, flush, clock) = (ctx.store.clone(), ctx.flush, understudy_common::now_ms);
    match permit {
        Some(Permit::Stage(g)) => {
            tracing::info!(group = %g.group, volume = %g.volume, stage = %g.stage, remote = %conn.remote_address(), "a mover joined");
            TargetSession::for_mover(store, flush, clock, g)
        }
        _ => TargetSession::new(store, flush, clock),
    }
}

/// The session loop; returns the group when a point was committed (or a mover's volume
/// staged).
async fn drive(
    ctx: &SessionContext,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    mut rx: mpsc::Receiver<Event>,
    guard: &mut GroupGuard<'_>,
    session: &mut TargetSession,
) -> Result<Option<String>> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        // `None`: the tick, when the session may flush by time.
        let event = tokio::select! {
            e = rx.recv() => Some(e),
            _ = tick.tick() => None,
        };
        let step = match event {
            None => tokio::task::block_in_place(|| session.on_tick())
                .map(|()| TargetStep::Reply(vec![])),
            Some(None) => bail!("connection closed mid-session"),
            Some(Some(event)) => on_event(ctx, conn, send, guard, session, event).await?,
        };
        match step {
            Ok(TargetStep::Reply(msgs)) => {
                for m in msgs {
                    stream::send(send, &m).await?;
                }
            }
            Ok(TargetStep::Committed(reply)) => {
                stream::send(send, &reply).await?;
                log_commit(session, &reply);
                return Ok(Some(session.group().to_string()));
            }
            Ok(TargetStep::Authorize { grants, reply }) => {
                if let Some((_, g)) = grants.first() {
                    tracing::info!(group = %g.group, stage = %g.stage, movers = grants.len(), "movers authorized");
                }
                let permits = grants.into_iter().map(|(fp, g)| (fp, Permit::Stage(g)));
                ctx.grants.add(permits, understudy_common::now_ms());
                stream::send(send, &reply).await?;
                return Ok(None);
            }
            Err(e) => {
                let _ = stream::send(send, &refusal(&e)).await;
                return Err(e.into());
            }
        }
    }
}

/// Hands one event of the connection to the session; an error of the connection itself (not a
/// refusal the peer should hear) returns early.
async fn on_event(
    ctx: &SessionContext,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    guard: &mut GroupGuard<'_>,
    session: &mut TargetSession,
    event: Event,
) -> Result<Result<TargetStep, SessionError>> {
    Ok(match event {
        Event::Control(msg) => {
            let msg = msg?;
            if let Control::Hello { group } = &msg {
                claim_group(ctx, guard, group, conn, send).await?;
            }
            session.on_message(msg)
        }
        Event::Chunk(StreamKind::Data, v) => {
            tokio::task::block_in_place(|| session.on_chunk(&v)).map(|_| TargetStep::Reply(vec![]))
        }
        Event::Chunk(StreamKind::Push, v) => {
            tokio::task::block_in_place(|| session.on_pushed(&v)).map(|_| TargetStep::Reply(vec![]))
        }
        Event::StreamEnd(kind) => tokio::task::block_in_place(|| session.on_stream_end(kind)),
        Event::StreamFailed(e) => return Err(e.context("a data stream failed")),
    })
}

fn log_commit(session: &TargetSession, reply: &Control) {
    if let Control::Staged { blocks_changed } = reply {
        let (chunks, bytes) = session.received();
        let (pushed_chunks, pushed_bytes) = session.pushed();
        tracing::info!(
            group = session.group(),
            blocks_changed,
            chunks,
            bytes,
            pushed_chunks,
            pushed_bytes,
            "a mover's volume staged"
        );
    }
    if let Control::Committed {
        seq,
        blocks_changed,
        ..
    } = reply
    {
        let (chunks, bytes) = session.received();
        let (pushed_chunks, pushed_bytes) = session.pushed();
        tracing::info!(
            group = session.group(),
            seq,
            blocks_changed,
            chunks,
            bytes,
            pushed_chunks,
            pushed_bytes,
            "recovery point committed"
        );
    }
}

/// How long a new session waits for the session it supersedes to let go of the group.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// Marks `group` busy for this session. A session of the same source that still holds the group
/// is superseded: a source that crashed or lost its link leaves a session the target only notices
/// at the idle timeout, and its restart must not wait for that. Another source is refused.
async fn claim_group(
    ctx: &SessionContext,
    guard: &mut GroupGuard<'_>,
    group: &str,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
) -> Result<()> {
    let deadline = Instant::now() + TAKEOVER_WAIT;
    loop {
        let holder = {
            let mut busy = ctx.busy.lock().expect("busy lock");
            match busy.get(group) {
                None => {
                    busy.insert(group.to_string(), conn.clone());
                    None
                }
                Some(old) => Some(old.clone()),
            }
        };
        let Some(old) = holder else { break };
        let same_source =
            peer_fingerprint(&old).is_some() && peer_fingerprint(&old) == peer_fingerprint(conn);
        if !same_source || Instant::now() >= deadline {
            let msg = Control::Refused {
                code: RefuseCode::GroupBusy,
                message: format!("a session of group {group} is already running; retry later"),
            };
            let _ = stream::send(send, &msg).await;
            bail!("group {group} is busy");
        }
        if old.close_reason().is_none() {
            tracing::warn!(group, old = %old.remote_address(), "a new session of the same source supersedes the running one");
            old.close(
                3u32.into(),
                b"superseded by a new session of the same source",
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    guard.group = Some(group.to_string());
    ctx.metrics.track(group);
    Ok(())
}

/// Metrics, retention and garbage collection after a commit (GC only when no session runs).
async fn after_commit(ctx: &Arc<SessionContext>, group: &str) {
    if let Ok(Some(p)) = ctx.store.latest(group) {
        ctx.metrics.point_committed(group, p.cut.created_ms);
        ctx.metrics
            .bytes_stored
            .get_or_create(&Metrics::group(group))
            .inc_by(p.stats.bytes_received);
    }
    if ctx.retention.keeps_all() {
        return;
    }
    let Ok(_alone) = ctx.gc_gate.try_write() else {
        tracing::info!("another session is running; retention waits for the next commit");
        return;
    };
    let store = ctx.store.clone();
    let policy = ctx.retention;
    let g = group.to_string();
    let r = tokio::task::spawn_blocking(move || -> Result<_> {
        let dropped = store.apply_retention(&g, policy, understudy_common::now_ms())?;
        let gc = if dropped.is_empty() {
            None
        } else {
            Some(store.gc()?)
        };
        Ok((dropped, gc))
    })
    .await;
    match r {
        Ok(Ok((dropped, gc))) if !dropped.is_empty() => {
            tracing::info!(group, ?dropped, ?gc, "retention dropped points")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %format!("{e:#}"), "retention failed; points are kept")
        }
        Err(e) => tracing::error!(error = %e, "retention task failed"),
    }
}

async fn read_control(mut recv: quinn::RecvStream, tx: mpsc::Sender<Event>) {
    loop {
        let msg = stream::recv(&mut recv).await;
        let failed = msg.is_err();
        if tx.send(Event::Control(msg)).await.is_err() || failed {
            return;
        }
    }
}

async fn accept_data(conn: quinn::Connection, tx: mpsc::Sender<Event>) {
    while let Ok(recv) = conn.accept_uni().await {
        tokio::spawn(read_data(recv, tx.clone()));
    }
}

async fn read_data(mut recv: quinn::RecvStream, tx: mpsc::Sender<Event>) {
    let result = async {
        let kind = stream::read_data_kind(&mut recv).await?;
        while let Some(frame) = stream::read_frame(&mut recv).await? {
            let v = tokio::task::block_in_place(|| chunk::verify(frame))?;
            if tx.send(Event::Chunk(kind, v)).await.is_err() {
                return Ok(kind);
            }
        }
        anyhow::Ok(kind)
    }
    .await;
    let _ = tx
        .send(match result {
            Ok(kind) => Event::StreamEnd(kind),
            Err(e) => Event::StreamFailed(e),
        })
        .await;
}
