//! Prometheus metrics, served as text on `/metrics`. Both agents use the same families, labelled
//! by group; RPO is computed at scrape time from the last point's cut time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Label set: the protection group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    /// Group name.
    pub group: String,
}

/// Label set: a group and what named the blocks a volume's read covered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeSourceLabel {
    /// Group name.
    pub group: String,
    /// `csi-delta`, `csi-allocated` or `hash-diff`.
    pub source: String,
}

/// Label set: a drill schedule (`namespace/name`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScheduleLabel {
    /// The DrillSchedule.
    pub schedule: String,
}

/// Label set: a drill schedule and a run's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrillResultLabel {
    /// The DrillSchedule (`namespace/name`).
    pub schedule: String,
    /// `succeeded` or `failed`.
    pub result: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// Every metric an agent exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    groups: Mutex<Vec<String>>,
    /// Cut time of the last committed point (Unix seconds).
    pub last_point: Family<GroupLabel, FGauge>,
    /// Now minus the last point's cut time.
    pub rpo: Family<GroupLabel, FGauge>,
    /// Bytes read from volumes.
    pub bytes_read: Family<GroupLabel, Counter>,
    /// Chunk bytes sent on the wire (frames, compressed).
    pub bytes_sent: Family<GroupLabel, Counter>,
    /// Chunk bytes received and stored.
    pub bytes_stored: Family<GroupLabel, Counter>,
    /// Duration of replication cycles.
    pub cycle_seconds: Family<GroupLabel, Histogram>,
    /// Failed cycles (source) or sessions (target).
    pub failures: Family<GroupLabel, Counter>,
    /// Points committed.
    pub points: Family<GroupLabel, Counter>,
    /// Volume reads of committed points, by what named their blocks (changed-block tracking
    /// or hash-diff).
    pub volume_reads: Family<ChangeSourceLabel, Counter>,
    /// Finished scheduled drills, by outcome.
    pub drill_runs: Family<DrillResultLabel, Counter>,
    /// When the schedule's newest successful drill finished (Unix seconds).
    pub drill_last_success: Family<ScheduleLabel, FGauge>,
    /// 1 while the schedule's newest finished drill failed, else 0.
    pub drill_failing: Family<ScheduleLabel, Gauge>,
    /// The archive tier's lag: committed points its newest snapshot does not hold.
    pub archive_points_behind: Gauge,
    /// The archive tier's lag: bytes of committed packs not in the bucket yet.
    pub archive_bytes_behind: Gauge,
    /// Bytes uploaded to the archive.
    pub archive_uploaded: Counter,
    /// When the newest archive snapshot was written (Unix seconds).
    pub archive_last_success: FGauge,
    /// Archive rounds that failed.
    pub archive_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("understudy");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            groups: Mutex::new(Vec::new()),
            last_point: Family::default(),
            rpo: Family::default(),
            bytes_read: Family::default(),
            bytes_sent: Family::default(),
            bytes_stored: Family::default(),
            cycle_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.05, 2.0, 16))
            }),
            failures: Family::default(),
            points: Family::default(),
            volume_reads: Family::default(),
            drill_runs: Family::default(),
            drill_last_success: Family::default(),
            drill_failing: Family::default(),
            archive_points_behind: Gauge::default(),
            archive_bytes_behind: Gauge::default(),
            archive_uploaded: Counter::default(),
            archive_last_success: FGauge::default(),
            archive_failures: Counter::default(),
        };
        r.register(
            "last_recovery_point_timestamp_seconds",
            "Cut time of the last committed recovery point",
            m.last_point.clone(),
        );
        r.register(
            "rpo_seconds",
            "Seconds since the cut of the last committed recovery point",
            m.rpo.clone(),
        );
        r.register(
            "volume_read_bytes",
            "Bytes read from volumes",
            m.bytes_read.clone(),
        );
        r.register(
            "wire_sent_bytes",
            "Chunk frame bytes sent",
            m.bytes_sent.clone(),
        );
        r.register(
            "stored_bytes",
            "Chunk frame bytes received and stored",
            m.bytes_stored.clone(),
        );
        r.register(
            "cycle_duration_seconds",
            "Duration of replication cycles",
            m.cycle_seconds.clone(),
        );
        r.register("failures", "Failed cycles or sessions", m.failures.clone());
        r.register(
            "points_committed",
            "Recovery points committed",
            m.points.clone(),
        );
        r.register(
            "volume_reads",
            "Volume reads of committed points by change source (csi-delta, csi-allocated, hash-diff)",
            m.volume_reads.clone(),
        );
        r.register(
            "drill_runs",
            "Finished scheduled drills by result (succeeded, failed)",
            m.drill_runs.clone(),
        );
        r.register(
            "drill_last_success_timestamp_seconds",
            "When the schedule's newest successful drill finished",
            m.drill_last_success.clone(),
        );
        r.register(
            "drill_failing",
            "1 while the schedule's newest finished drill failed",
            m.drill_failing.clone(),
        );
        r.register(
            "archive_points_behind",
            "Committed recovery points the archive's newest snapshot does not hold",
            m.archive_points_behind.clone(),
        );
        r.register(
            "archive_bytes_behind",
            "Bytes of committed packs not yet in the archive bucket",
            m.archive_bytes_behind.clone(),
        );
        r.register(
            "archive_uploaded_bytes",
            "Bytes uploaded to the archive bucket",
            m.archive_uploaded.clone(),
        );
        r.register(
            "archive_last_success_timestamp_seconds",
            "When the archive's newest snapshot was written",
            m.archive_last_success.clone(),
        );
        r.register(
            "archive_failures",
            "Archive rounds that failed",
            m.archive_failures.clone(),
        );
        *m.registry.lock().expect("registry") = r;
        m
    }

    /// Label for a group.
    pub fn group(group: &str) -> GroupLabel {
        GroupLabel {
            group: group.to_string(),
        }
    }

    /// Records a committed point's cut time.
    pub fn point_committed(&self, group: &str, created_ms: i64) {
        self.last_point
            .get_or_create(&Self::group(group))
            .set(created_ms as f64 / 1000.0);
        self.points.get_or_create(&Self::group(group)).inc();
        self.track(group);
    }

    /// Records the outcome of a schedule's newest finished drill: `new` counts it (a run seen
    /// again after a restart only sets the gauges); `last_success_ms` is the newest success.
    pub fn drill_outcome(
        &self,
        schedule: &str,
        (succeeded, new): (bool, bool),
        last_success_ms: Option<i64>,
    ) {
        let label = ScheduleLabel {
            schedule: schedule.to_string(),
        };
        if new {
            let result = if succeeded { "succeeded" } else { "failed" };
            self.drill_runs
                .get_or_create(&DrillResultLabel {
                    schedule: schedule.to_string(),
                    result: result.into(),
                })
                .inc();
        }
        self.drill_failing
            .get_or_create(&label)
            .set(i64::from(!succeeded));
        if let Some(ms) = last_success_ms {
            self.drill_last_success
                .get_or_create(&label)
                .set(ms as f64 / 1000.0);
        }
    }

    /// Prometheus text exposition, with RPO refreshed for every tracked group.
    pub fn render(&self) -> String {
        let now = crate::now_ms() as f64 / 1000.0;
        for group in self.groups.lock().expect("groups").iter() {
            let label = Self::group(group);
            let last = self.last_point.get_or_create(&label).get();
            if last > 0.0 {
                self.rpo.get_or_create(&label).set((now - last).max(0.0));
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(
            &mut out,
            &self.registry.lock().expect("registry"),
        )
        .expect("text encoding");
        out
    }

    /// Notes a group so its RPO is exported.
    pub fn track(&self, group: &str) {
        let mut g = self.groups.lock().expect("groups");
        if !g.iter().any(|x| x == group) {
            g.push(group.to_string());
        }
    }

    /// Serves `/metrics` on `addr` until the process ends; returns the bound address.
    pub async fn serve(self: Arc<Self>, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        use anyhow::Context;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}: is the port in use? choose another with --metrics-addr"))?;
        let bound = listener.local_addr()?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = self.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        m.render(),
                    )
                }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
        Ok(bound)
    }
}
