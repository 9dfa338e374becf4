//! One replication cycle of a group: resume the pending cut or make a new one, offer it to the
//! target, send what it lacks, and record the commit.

use crate::link::{Link, Outcome, Sent};
use crate::ship::Limiter;
use crate::stop::Stop;
use crate::target::{Connector, TargetAddr};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use understudy_common::change::{ChangeSource, HashDiff};
use understudy_common::cut::spool::SpoolReader;
use understudy_common::cut::{CutConfig, CutObserver, GroupState, PendingCut, make_cut};
use understudy_common::metrics::Metrics;
use understudy_common::protocol::source_session::SourceSession;
use understudy_common::transport::{Identity, stream};

/// Everything a cycle needs.
pub struct SourceConfig {
    /// Agent state directory.
    pub dir: PathBuf,
    /// Group name.
    pub group: String,
    /// Target address (resolved at every connect).
    pub target: TargetAddr,
    /// How to cut.
    pub cut: CutConfig,
    /// Parallel data streams.
    pub streams: usize,
    /// Cap on chunk data sent, in megabits per second.
    pub bandwidth_limit_mbit: Option<u32>,
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
    /// Chunks sent: pushed while the cut was made, plus those the target asked for after.
    pub chunks_sent: u64,
    /// Of those, chunks pushed while the cut was made.
    pub chunks_pushed: u64,
    /// Frame bytes sent.
    pub bytes_sent: u64,
    /// Chunks the cut references that the target already held.
    pub chunks_held: u64,
    /// Block-map entries that changed.
    pub blocks_changed: u64,
    /// UDP payload bytes sent on the connection (QUIC and TLS overhead and control messages
    /// included): what the link carried.
    pub wire_bytes_sent: u64,
    /// UDP payload bytes received on the connection (acknowledgements, the target's replies).
    pub wire_bytes_received: u64,
    /// UDP datagrams sent on the connection.
    pub datagrams_sent: u64,
    /// Largest UDP payload the path carried at the end (found by path MTU discovery).
    pub path_mtu: u16,
    /// Seconds the cycle took.
    pub seconds: f64,
}

impl CycleReport {
    /// Adds what a session sent.
    fn add(&mut self, sent: &Sent) {
        self.chunks_sent += sent.chunks;
        self.chunks_pushed += sent.pushed;
        self.bytes_sent += sent.bytes;
        self.chunks_held = sent.held;
        self.blocks_changed = sent.blocks_changed;
        self.already_committed |= sent.already_committed;
    }
}

/// A source agent for one group.
pub struct SourceAgent {
    cfg: SourceConfig,
    connector: Connector,
    metrics: Arc<Metrics>,
    change: Arc<dyn ChangeSource>,
    stop: Stop,
}

impl SourceAgent {
    /// Loads the identity and pinned peers; `stop` ends the agent's work when asked.
    pub fn new(mut cfg: SourceConfig, metrics: Arc<Metrics>, stop: Stop) -> Result<Self> {
        let identity = Identity::load(&cfg.dir)?;
        let peers = understudy_common::cli::require_peers(&cfg.dir)?;
        cfg.cut.source_id = identity.fingerprint.to_string();
        metrics.track(&cfg.group);
        Ok(SourceAgent {
            cfg,
            connector: Connector::new(identity, peers),
            metrics,
            change: Arc::new(HashDiff),
            stop,
        })
    }

    /// Checks what a retry could never fix before the first cycle: every volume opens as a
    /// block device or an image file, and a manifests directory reads and parses.
    pub fn preflight(&self) -> Result<()> {
        for v in &self.cfg.cut.volumes {
            understudy_common::volume::Volume::open(&v.path)
                .with_context(|| format!("volume {} is not usable", v.name))?;
        }
        self.cfg.cut.manifests.preflight()
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.cfg.group
    }

    /// Runs one cycle. A delta whose base the target no longer has becomes a full cut. A stop
    /// asked for meanwhile ends it with [`understudy_common::error::Interrupted`].
    pub async fn run_cycle(&self) -> Result<CycleReport> {
        if self.stop.requested() {
            return Err(understudy_common::error::Interrupted.into());
        }
        let start = Instant::now();
        let label = Metrics::group(&self.cfg.group);
        let r = self.cycle_once(true).await;
        self.metrics
            .cycle_seconds
            .get_or_create(&label)
            .observe(start.elapsed().as_secs_f64());
        if r.as_ref()
            .is_err_and(|e| !understudy_common::error::is_interrupted(e))
        {
            self.metrics.failures.get_or_create(&label).inc();
        }
        let mut report = r?;
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    async fn cycle_once(&self, may_retry_full: bool) -> Result<CycleReport> {
        let state = Arc::new(GroupState::lock(&self.cfg.dir, &self.cfg.group)?);
        let mut report = CycleReport::default();
        let pending = tokio::task::block_in_place(|| state.pending())?;
        let (outcome, cut) = match pending {
            Some(cut) => {
                tracing::info!(group = %self.cfg.group, cut = %cut.offer.cut.cut_id, "resuming a cut made earlier");
                self.describe(&cut, true, &mut report);
                (self.offer(&state, &cut, &mut report).await?, cut)
            }
            None => self.cut_and_offer(&state, &mut report).await?,
        };
        match outcome {
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
                    state.clear_base()?;
                    state.clear_pending()
                })?;
                drop(state);
                Box::pin(self.cycle_once(false)).await
            }
            Outcome::Staged => bail!(
                "the target answered a source's cut as a mover's part; check that the target's address is an Understudy target agent of this version"
            ),
            Outcome::BaseMismatch => bail!(
                "target refused a full offer as a base mismatch; check that no other source replicates group {}",
                self.cfg.group
            ),
        }
    }

    /// Fills the report's description of the cut.
    fn describe(&self, cut: &PendingCut, resumed: bool, report: &mut CycleReport) {
        if !resumed {
            self.metrics
                .bytes_read
                .get_or_create(&Metrics::group(&self.cfg.group))
                .inc_by(cut.bytes_read);
        }
        report.cut_id = cut.offer.cut.cut_id.clone();
        report.cut_time = understudy_common::format_ms(cut.offer.cut.created_ms);
        report.resumed = resumed;
        report.bytes_read = if resumed { 0 } else { cut.bytes_read };
    }

    /// Makes a new cut. With a target to talk to, the session starts first and the cut's chunks
    /// are pushed while it is made; without one, the cut is made and spooled, and sent later.
    async fn cut_and_offer(
        &self,
        state: &Arc<GroupState>,
        report: &mut CycleReport,
    ) -> Result<(Outcome, PendingCut)> {
        let conn = match self.connect().await {
            Ok(conn) => conn,
            Err(e) if understudy_common::error::is_interrupted(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(group = %self.cfg.group, error = %format!("{e:#}"), "target unreachable: making the cut now, to send it once the target answers");
                let cut = self.make_cut(state, None).await?;
                self.describe(&cut, false, report);
                return Err(e);
            }
        };
        let r = self.push_session(&conn, state, report).await;
        self.account(&conn, report);
        r.map_err(|e| self.ended(&conn, e))
    }

    /// Makes a cut in the background, its progress on a bar; frames are also announced on `feed`.
    async fn make_cut(
        &self,
        state: &Arc<GroupState>,
        feed: Option<understudy_common::cut::spool::Feed>,
    ) -> Result<PendingCut> {
        let (state, cfg, change) = (state.clone(), self.cfg.cut.clone(), self.change.clone());
        let total: u64 = cfg
            .volumes
            .iter()
            .filter_map(|v| understudy_common::volume::Volume::open(&v.path).ok())
            .map(|v| v.size())
            .sum();
        let stop = self.stop.clone();
        // Not cancelled from here: the cut hears the stop itself, and always thaws before it ends.
        let cut = tokio::task::spawn_blocking(move || {
            let pb = understudy_common::progress::bytes(total, "cut");
            let done = std::sync::Mutex::new(std::collections::HashMap::<String, u64>::new());
            let obs = CutObserver {
                feed,
                progress: &|vol, d, _| {
                    let mut m = done.lock().expect("progress");
                    m.insert(vol.to_string(), d);
                    pb.set_position(m.values().sum());
                },
                stop: &|| stop.requested(),
            };
            let r = make_cut(&cfg, &state, &cfg.live_instant(), change.as_ref(), obs);
            pb.finish_and_clear();
            r
        })
        .await??;
        tracing::info!(group = %self.cfg.group, cut = %cut.offer.cut.cut_id, bytes_read = cut.bytes_read, spooled = cut.bytes_spooled, kind = ?cut.offer.kind, "cut made");
        understudy_common::failpoint::hit("source.cut.made");
        Ok(cut)
    }

    /// Resolves the target and connects to the first of its addresses that answers.
    async fn connect(&self) -> Result<quinn::Connection> {
        self.stop
            .unless_stopped(self.connector.connect(&self.cfg.target))
            .await
    }

    /// Adds the connection's figures to the report.
    fn account(&self, conn: &quinn::Connection, report: &mut CycleReport) {
        let stats = conn.stats();
        report.wire_bytes_sent += stats.udp_tx.bytes;
        report.wire_bytes_received += stats.udp_rx.bytes;
        report.datagrams_sent += stats.udp_tx.datagrams;
        report.path_mtu = stats.path.current_mtu;
        tracing::debug!(path = ?stats.path, "connection path at the end of the session");
    }

    /// The link to the target over `conn`, with this agent's streams, cap and byte counter.
    fn link(&self, conn: &quinn::Connection) -> Link {
        let counter = self
            .metrics
            .bytes_sent
            .get_or_create(&Metrics::group(&self.cfg.group))
            .clone();
        Link {
            conn: conn.clone(),
            streams: self.cfg.streams,
            limit: self.cfg.bandwidth_limit_mbit.map(Limiter::mbit),
            on_bytes: Arc::new(move |n: u64| {
                counter.inc_by(n);
            }),
        }
    }

    /// Offers a cut made earlier on a new connection.
    async fn offer(
        &self,
        state: &Arc<GroupState>,
        cut: &PendingCut,
        report: &mut CycleReport,
    ) -> Result<Outcome> {
        let conn = self.connect().await?;
        let link = self.link(&conn);
        let spool = state.cut_dir().join("spool.frames");
        let mut sent = Sent::default();
        let r = self
            .stop
            .unless_stopped(async {
                let mut control = link.open_control().await?;
                let (session, hello) = SourceSession::new(&self.cfg.group, cut.offer.clone());
                stream::send(&mut control.0, &hello).await?;
                let frames = Arc::new(SpoolReader::open(&spool, cut.spool.clone())?);
                link.drive(control, session, None, frames, &mut sent).await
            })
            .await;
        report.add(&sent);
        self.account(&conn, report);
        r.map_err(|e| self.ended(&conn, e))
    }

    /// A session that starts before the cut: Hello, Welcome, then the cut is made while its
    /// chunks are pushed, then the offer goes out and the session runs as usual.
    async fn push_session(
        &self,
        conn: &quinn::Connection,
        state: &Arc<GroupState>,
        report: &mut CycleReport,
    ) -> Result<(Outcome, PendingCut)> {
        let link = self.link(conn);
        let (mut session, hello) = SourceSession::pushing(&self.cfg.group);
        let (control, welcome) = self
            .stop
            .unless_stopped(async {
                let mut control = link.open_control().await?;
                stream::send(&mut control.0, &hello).await?;
                let welcome = stream::recv(&mut control.1)
                    .await
                    .context("target closed the session")?;
                Ok((control, welcome))
            })
            .await?;
        session.on_message(welcome)?;
        if !session.awaits_cut() {
            bail!("target did not welcome the session");
        }
        let spool = state.cut_dir().join("spool.frames");
        let (feed, pusher) = if session.push_allowed() {
            let (feed, pusher) = link.start_push(&spool);
            (Some(feed), Some(pusher))
        } else {
            tracing::info!(group = %self.cfg.group, "the target holds chunks of a broken transfer: not pushing, it asks for what it lacks after the cut");
            (None, None)
        };
        let cut = match self.make_cut(state, feed).await {
            Ok(cut) => cut,
            Err(e) => {
                if let Some(p) = pusher {
                    p.abort();
                }
                return Err(e);
            }
        };
        self.describe(&cut, false, report);
        // When pushing, every frame of the spool but the manifest chunks (those wait for Need)
        // went out on the push streams; otherwise none did.
        let (streams, pushed) = pusher.as_ref().map_or((0, 0), |_| {
            let manifests = cut.offer.cut.manifests.chunks.len().min(cut.spool.len());
            (self.cfg.streams.max(1) as u32, cut.spool.len() - manifests)
        });
        let first = session.set_offer(cut.offer.clone(), streams, pushed as u64)?;
        let mut sent = Sent::default();
        let frames = Arc::new(SpoolReader::open(&spool, cut.spool.clone())?);
        let work = link.finish_pushed(control, session, first, pusher, frames, &mut sent);
        let outcome = self.stop.unless_stopped(work).await;
        report.add(&sent);
        Ok((outcome?, cut))
    }

    /// Ends the session on `conn` after `e`: a stop closes the connection with a reason the target
    /// logs, and the error says the cut is kept; any other error gets the close reason, if the
    /// connection gave one.
    fn ended(&self, conn: &quinn::Connection, e: anyhow::Error) -> anyhow::Error {
        if understudy_common::error::is_interrupted(&e) {
            conn.close(
                3u32.into(),
                b"source stopping; the cut is resumed at its next start",
            );
            return e
                .context("the session was ended; the cut is kept and resumed at the next start");
        }
        explain(conn, e)
    }

    /// Waits for connections to close cleanly (call before exiting).
    pub async fn shutdown(&self) {
        self.connector.shutdown().await
    }
}

/// Adds why the connection closed, when it says, to a session error.
fn explain(conn: &quinn::Connection, e: anyhow::Error) -> anyhow::Error {
    match understudy_common::transport::explain_close(conn) {
        Some(why) => e.context(why),
        None => e,
    }
}
