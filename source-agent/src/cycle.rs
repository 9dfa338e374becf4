//! One replication cycle of a group: resume the pending cut or make a new one, offer it to the
//! target, send what it lacks, and record the commit.

use crate::ship::{Shipped, ship};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use understudy_common::change::{ChangeSource, FullScan};
use understudy_common::metrics::Metrics;
use understudy_common::protocol::Control;
use understudy_common::protocol::source_session::{SourceSession, SourceStep};
use understudy_common::source::spool::SpoolReader;
use understudy_common::source::{CutConfig, GroupState, PendingCut, make_cut};
use understudy_common::transport::{Identity, quic, stream};

/// How long the QUIC and TLS handshake with the target may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Everything a cycle needs.
pub struct SourceConfig {
    /// Agent state directory.
    pub dir: PathBuf,
    /// Group name.
    pub group: String,
    /// Target address.
    pub target: SocketAddr,
    /// How to cut.
    pub cut: CutConfig,
    /// Parallel data streams.
    pub streams: usize,
}

/// What one cycle did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CycleReport {
    /// Point number on the target.
    pub seq: u64,
    /// Cut id.
    pub cut_id: String,
    /// Cut time (RFC 3339).
    pub cut_time: String,
    /// True when a cut left by an earlier cycle was sent (nothing was re-read).
    pub resumed: bool,
    /// True when the target had already committed the cut.
    pub already_committed: bool,
    /// Bytes read from volumes.
    pub bytes_read: u64,
    /// Chunks the target lacked and were sent.
    pub chunks_sent: u64,
    /// Frame bytes sent.
    pub bytes_sent: u64,
    /// Chunks the cut references that the target already held.
    pub chunks_held: u64,
    /// Block-map entries that changed.
    pub blocks_changed: u64,
    /// UDP payload bytes sent on the connection (QUIC and TLS overhead and control messages
    /// included): what the link carried.
    pub wire_bytes_sent: u64,
    /// Seconds the cycle took.
    pub seconds: f64,
}

/// A source agent for one group.
pub struct SourceAgent {
    cfg: SourceConfig,
    endpoint: quinn::Endpoint,
    metrics: Arc<Metrics>,
    change: Arc<dyn ChangeSource>,
}

impl SourceAgent {
    /// Loads the identity and pinned peers and prepares the QUIC client.
    pub fn new(mut cfg: SourceConfig, metrics: Arc<Metrics>) -> Result<Self> {
        let identity = Identity::load(&cfg.dir)?;
        let peers = understudy_common::cli::require_peers(&cfg.dir)?;
        cfg.cut.source_id = identity.fingerprint.to_string();
        let bind: SocketAddr = if cfg.target.is_ipv6() {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        };
        let mut endpoint = quinn::Endpoint::client(bind).context("cannot open a UDP socket")?;
        endpoint.set_default_client_config(quic::client_config(&identity, peers)?);
        metrics.track(&cfg.group);
        Ok(SourceAgent {
            cfg,
            endpoint,
            metrics,
            change: Arc::new(FullScan),
        })
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.cfg.group
    }

    /// Runs one cycle. A delta whose base the target no longer has becomes a full cut.
    pub async fn run_cycle(&self) -> Result<CycleReport> {
        let start = Instant::now();
        let label = Metrics::group(&self.cfg.group);
        let r = self.cycle_once(true).await;
        self.metrics
            .cycle_seconds
            .get_or_create(&label)
            .observe(start.elapsed().as_secs_f64());
        if r.is_err() {
            self.metrics.failures.get_or_create(&label).inc();
        }
        let mut report = r?;
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    async fn cycle_once(&self, may_retry_full: bool) -> Result<CycleReport> {
        let state = Arc::new(GroupState::lock(&self.cfg.dir, &self.cfg.group)?);
        let (cut, resumed) = self.pending_or_new(&state).await?;
        let label = Metrics::group(&self.cfg.group);
        if !resumed {
            self.metrics
                .bytes_read
                .get_or_create(&label)
                .inc_by(cut.bytes_read);
        }
        let mut report = CycleReport {
            cut_id: cut.offer.cut.cut_id.clone(),
            cut_time: understudy_common::format_ms(cut.offer.cut.created_ms),
            resumed,
            bytes_read: if resumed { 0 } else { cut.bytes_read },
            ..Default::default()
        };
        match self.offer(&state, &cut, &mut report).await? {
            Outcome::Committed(seq) => {
                understudy_common::failpoint::hit("source.commit.acked");
                report.seq = seq;
                tokio::task::block_in_place(|| state.promote(&cut, seq))?;
                self.metrics
                    .point_committed(&self.cfg.group, cut.offer.cut.created_ms);
                Ok(report)
            }
            Outcome::BaseMismatch if may_retry_full => {
                tracing::warn!(group = %self.cfg.group, "target does not hold our base point; making a full cut");
                tokio::task::block_in_place(|| -> Result<()> {
                    state.set_base(None)?;
                    state.clear_pending()
                })?;
                drop(state);
                Box::pin(self.cycle_once(false)).await
            }
            Outcome::BaseMismatch => bail!(
                "target refused a full offer as a base mismatch; check that no other source replicates group {}",
                self.cfg.group
            ),
        }
    }

    async fn pending_or_new(&self, state: &Arc<GroupState>) -> Result<(PendingCut, bool)> {
        if let Some(cut) = state.pending()? {
            tracing::info!(group = %self.cfg.group, cut = %cut.offer.cut.cut_id, "resuming a cut made earlier");
            return Ok((cut, true));
        }
        let (state, cfg, change) = (state.clone(), self.cfg.cut.clone(), self.change.clone());
        let total: u64 = cfg
            .volumes
            .iter()
            .filter_map(|v| understudy_common::volume::Volume::open(&v.path).ok())
            .map(|v| v.size())
            .sum();
        let cut = tokio::task::spawn_blocking(move || {
            let pb = understudy_common::progress::bytes(total, "cut");
            let done = std::sync::Mutex::new(std::collections::HashMap::<String, u64>::new());
            let base = state.base()?;
            let r = make_cut(
                &cfg,
                &state,
                base.as_ref(),
                change.as_ref(),
                &|vol, d, _| {
                    let mut m = done.lock().expect("progress");
                    m.insert(vol.to_string(), d);
                    pb.set_position(m.values().sum());
                },
            );
            pb.finish_and_clear();
            r
        })
        .await??;
        tracing::info!(group = %self.cfg.group, cut = %cut.offer.cut.cut_id, bytes_read = cut.bytes_read, spooled = cut.bytes_spooled, kind = ?cut.offer.kind, "cut made");
        understudy_common::failpoint::hit("source.cut.made");
        Ok((cut, false))
    }

    async fn connect(&self) -> Result<quinn::Connection> {
        let target = self.cfg.target;
        let hint = "is it running, reachable over UDP, and are both agents paired with each other's fingerprint?";
        let connecting = self.endpoint.connect(target, quic::SERVER_NAME)?;
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(r) => r.with_context(|| format!("cannot connect to target {target}: {hint}")),
            Err(_) => {
                anyhow::bail!("no answer from target {target} within {CONNECT_TIMEOUT:?}: {hint}")
            }
        }
    }

    async fn offer(
        &self,
        state: &Arc<GroupState>,
        cut: &PendingCut,
        report: &mut CycleReport,
    ) -> Result<Outcome> {
        let conn = self.connect().await?;
        let r = self.session(&conn, state, cut, report).await;
        report.wire_bytes_sent += conn.stats().udp_tx.bytes;
        r.map_err(
            |e| match understudy_common::transport::explain_close(&conn) {
                Some(why) => e.context(why),
                None => e,
            },
        )
    }

    async fn session(
        &self,
        conn: &quinn::Connection,
        state: &Arc<GroupState>,
        cut: &PendingCut,
        report: &mut CycleReport,
    ) -> Result<Outcome> {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .context("cannot open the control stream")?;
        stream::write_preamble(&mut send).await?;
        stream::read_preamble(&mut recv)
            .await
            .context("target did not accept the session")?;
        let (mut session, hello) = SourceSession::new(&self.cfg.group, cut.offer.clone());
        stream::send(&mut send, &hello).await?;
        loop {
            let msg = stream::recv(&mut recv)
                .await
                .context("target closed the session")?;
            if let Control::NeedEnd { held, .. } = &msg {
                report.chunks_held = *held;
            }
            match session.on_message(msg)? {
                SourceStep::Send(msgs) => {
                    for m in &msgs {
                        stream::send(&mut send, m).await?;
                    }
                }
                SourceStep::SendChunks(hashes) => {
                    let spool = Arc::new(SpoolReader::open(
                        &state.cut_dir().join("spool.frames"),
                        cut.spool.clone(),
                    )?);
                    let sent = self.send_chunks(conn, spool, hashes).await?;
                    report.chunks_sent = sent.chunks;
                    report.bytes_sent = sent.bytes;
                    stream::send(&mut send, &session.commit(sent.streams, sent.chunks)).await?;
                }
                SourceStep::AlreadyCommitted { seq } => {
                    report.already_committed = true;
                    conn.close(0u32.into(), b"done");
                    return Ok(Outcome::Committed(seq));
                }
                SourceStep::BaseMismatch { .. } => {
                    conn.close(0u32.into(), b"base mismatch");
                    return Ok(Outcome::BaseMismatch);
                }
                SourceStep::Committed {
                    seq,
                    blocks_changed,
                } => {
                    report.blocks_changed = blocks_changed;
                    let _ = send.finish();
                    conn.close(0u32.into(), b"done");
                    return Ok(Outcome::Committed(seq));
                }
            }
        }
    }

    async fn send_chunks(
        &self,
        conn: &quinn::Connection,
        spool: Arc<SpoolReader>,
        hashes: Vec<understudy_common::hash::ChunkHash>,
    ) -> Result<Shipped> {
        let counter = self
            .metrics
            .bytes_sent
            .get_or_create(&Metrics::group(&self.cfg.group))
            .clone();
        let total: u64 = hashes.iter().filter_map(|h| spool.len_of(h)).sum();
        let pb = understudy_common::progress::bytes(total, "send");
        let pb2 = pb.clone();
        let on_bytes = Arc::new(move |n: u64| {
            counter.inc_by(n);
            pb2.inc(n);
        });
        let r = ship(conn, spool, hashes, self.cfg.streams, on_bytes).await;
        pb.finish_and_clear();
        r
    }

    /// Waits for connections to close cleanly (call before exiting).
    pub async fn shutdown(&self) {
        self.endpoint.wait_idle().await;
    }
}

enum Outcome {
    Committed(u64),
    BaseMismatch,
}
