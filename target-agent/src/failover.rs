//! Standalone failover: rebuild every volume of a recovery point into image files or devices,
//! verify each against the source's digest, write the transformed manifests, and report.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use understudy_common::files::{remove_if_present, sync_dir};
use understudy_common::store::restore::{RestoreOptions, VolumeRestore};
use understudy_common::store::{PointRecord, Store};
use understudy_common::volume::VolumeWriter;
use understudy_kube::bundle::Bundle;
use understudy_kube::transform::Rules;

/// Which point to fail over to. Written `latest`, a point number, or an RFC 3339 time.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum PointSelector {
    /// The newest.
    Latest,
    /// By sequence number.
    Seq(u64),
    /// The newest whose cut is at or before this time (ms since epoch).
    AtOrBefore(i64),
}

/// How people read a selector in messages: `latest point`, `point 7`, `point at or before
/// 2026-11-21T10:00:00Z`.
impl std::fmt::Display for PointSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointSelector::Latest => f.write_str("latest point"),
            PointSelector::Seq(n) => write!(f, "point {n}"),
            PointSelector::AtOrBefore(ms) => write!(
                f,
                "point at or before {}",
                understudy_common::format_ms(*ms)
            ),
        }
    }
}

impl From<PointSelector> for String {
    fn from(p: PointSelector) -> String {
        match p {
            PointSelector::Latest => "latest".into(),
            PointSelector::Seq(n) => n.to_string(),
            PointSelector::AtOrBefore(ms) => understudy_common::format_ms(ms),
        }
    }
}

impl TryFrom<String> for PointSelector {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl std::str::FromStr for PointSelector {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "latest" {
            return Ok(PointSelector::Latest);
        }
        if let Ok(n) = s.parse() {
            return Ok(PointSelector::Seq(n));
        }
        let t = humantime::parse_rfc3339_weak(s).with_context(|| {
            format!(
                "point `{s}` is not `latest`, a point number or a time like 2026-11-21T10:00:00Z"
            )
        })?;
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Ok(PointSelector::AtOrBefore(ms))
    }
}

/// Finds the selected point of a group.
pub fn select_point(store: &Store, group: &str, sel: &PointSelector) -> Result<PointRecord> {
    let points = store.points(group)?;
    if points.is_empty() {
        bail!(
            "group {group} has no recovery point in this store (groups here: {:?})",
            store.groups()?
        );
    }
    let found = match sel {
        PointSelector::Latest => points.last().cloned(),
        PointSelector::Seq(n) => points.iter().find(|p| p.seq == *n).cloned(),
        PointSelector::AtOrBefore(t) => points
            .iter()
            .rev()
            .find(|p| p.cut.created_ms <= *t)
            .cloned(),
    };
    found.with_context(|| {
        let have: Vec<u64> = points.iter().map(|p| p.seq).collect();
        let held = match (have.first(), have.last()) {
            (Some(first), Some(last)) if have.len() > 1 => format!("points {first} to {last}"),
            _ => format!("point {}", have[0]),
        };
        format!(
            "no {sel} in group {group} (it holds {held}, cut from {} to {}): list them with `target-agent points --group {group}`",
            understudy_common::format_ms(points[0].cut.created_ms),
            understudy_common::format_ms(points[points.len() - 1].cut.created_ms),
        )
    })
}

/// What a point older than the age guard's bound does.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum RpoGuard {
    /// Refuse to fail over (nothing is written).
    #[default]
    Refuse,
    /// Fail over, with a warning in the report.
    Warn,
}

/// The RPO guard: a bound on how old the chosen point's cut may be (a drill or a migration to a
/// point that old means replication has stopped).
#[derive(Clone, Copy, Debug)]
pub struct AgeGuard {
    /// The bound.
    pub max_age: Duration,
    /// What an older point does.
    pub on_older: RpoGuard,
    /// How the user set them (messages name these).
    pub words: GuardWords,
}

/// The names of the guard's settings where the user gave them.
#[derive(Clone, Copy, Debug)]
pub struct GuardWords {
    /// The bound (`--max-point-age`).
    pub bound: &'static str,
    /// Going on with a warning (`--rpo-guard warn`).
    pub warn: &'static str,
}

impl GuardWords {
    /// `target-agent failover`'s flags.
    pub const CLI: GuardWords = GuardWords {
        bound: "--max-point-age",
        warn: "--rpo-guard warn",
    };
    /// A Failover's fields.
    pub const FAILOVER: GuardWords = GuardWords {
        bound: "maxPointAge",
        warn: "rpoGuard: warn",
    };
}

/// What `guard` says of point `seq`, cut at `cut_ms`, at `now_ms`: nothing, a warning (the
/// failover goes on), or an error (it does not start).
pub fn check_point_age(
    guard: Option<&AgeGuard>,
    seq: u64,
    cut_ms: i64,
    now_ms: i64,
) -> Result<Option<String>> {
    let Some(g) = guard else {
        return Ok(None);
    };
    let age = Duration::from_millis(now_ms.saturating_sub(cut_ms).max(0) as u64);
    if age <= g.max_age {
        return Ok(None);
    }
    let what = format!(
        "point {seq} was cut {} ago (at {}), longer ago than {} {}: replication may have stopped; check the source agent and `target-agent points`",
        humantime::format_duration(Duration::from_secs(age.as_secs())),
        understudy_common::format_ms(cut_ms),
        g.words.bound,
        humantime::format_duration(g.max_age)
    );
    match g.on_older {
        RpoGuard::Refuse => bail!(
            "{what}. Nothing was written; to fail over to it anyway, set {} or a larger {}",
            g.words.warn,
            g.words.bound
        ),
        RpoGuard::Warn => Ok(Some(what)),
    }
}

/// A failover request.
#[derive(Clone, Debug)]
pub struct FailoverRequest {
    /// Group.
    pub group: String,
    /// Point.
    pub point: PointSelector,
    /// Output directory (volumes/, manifests/, report.json).
    pub out: PathBuf,
    /// Volumes to write to existing devices instead of image files.
    pub devices: BTreeMap<String, PathBuf>,
    /// Manifest transform rules.
    pub rules: Rules,
    /// Show the plan, write nothing.
    pub dry_run: bool,
    /// Re-read each volume after writing and check its digest from the written bytes.
    pub read_back: bool,
    /// The RPO guard, if any.
    pub age_guard: Option<AgeGuard>,
}

/// What failover did.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    /// Group.
    pub group: String,
    /// Point sequence number.
    pub point: u64,
    /// Cut time of the point (RFC 3339).
    pub point_time: String,
    /// Seconds between the cut and this failover: the data loss window.
    pub rpo_seconds: f64,
    /// Seconds failover took.
    pub duration_seconds: f64,
    /// True when this was a dry run.
    pub dry_run: bool,
    /// Per volume.
    pub volumes: Vec<VolumeRestore>,
    /// Manifest files written.
    pub manifest_files: usize,
    /// Objects left out (cluster-owned kinds).
    pub objects_skipped: usize,
    /// Why the manifests could not be read, if they could not.
    pub manifests_error: Option<String>,
    /// True when every volume matched its digest and the manifests were read.
    pub ok: bool,
    /// What a person should know (a point older than the RPO guard's bound).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Runs a failover. `progress(volume, done, total)` reports restore progress.
pub fn failover(
    store: &Store,
    req: &FailoverRequest,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<FailoverReport> {
    let start = Instant::now();
    let point = select_point(store, &req.group, &req.point)?;
    let now = understudy_common::now_ms();
    let warnings: Vec<String> =
        check_point_age(req.age_guard.as_ref(), point.seq, point.cut.created_ms, now)?
            .into_iter()
            .collect();
    for w in &warnings {
        tracing::warn!(warning = %w, "failover");
    }
    for name in req.devices.keys() {
        if point.cut.volume(name).is_none() {
            bail!(
                "--device names volume {name}, which point {} does not have",
                point.seq
            );
        }
    }
    if !req.dry_run {
        understudy_common::files::private_dir(&req.out)
            .context("cannot create the output directory")?;
        // An earlier run's report must not describe what this run leaves behind.
        remove_if_present(&req.out.join("report.json"))?;
    }
    // Damaged manifests do not stop the volumes from being rebuilt: the report says what failed.
    let (bundle, manifests_error) = match store
        .read_manifests(&point)
        .and_then(|b| Bundle::decode(&b))
    {
        Ok(b) => (b, None),
        Err(e) => (
            Bundle::default(),
            Some(format!(
                "the point's manifests cannot be read: {e:#}; run `target-agent verify`, and fail over to an older point for them"
            )),
        ),
    };
    let transformed = req.rules.transform_bundle(&bundle)?;
    let objects: Vec<_> = transformed.objects.into_iter().map(|(_, v)| v).collect();
    let manifests = Bundle::from_objects(&objects)?;
    let mut volumes = Vec::new();
    for v in &point.cut.volumes {
        let target = req
            .devices
            .get(&v.name)
            .cloned()
            .unwrap_or_else(|| req.out.join("volumes").join(format!("{}.img", v.name)));
        if req.dry_run {
            volumes.push(planned(v, &target));
            continue;
        }
        volumes.push(restore_one(
            store, &point, &v.name, v.size, &target, req, progress,
        ));
    }
    if !req.dry_run {
        manifests.write_to(&req.out.join("manifests"))?;
    }
    let now = understudy_common::now_ms();
    let report = FailoverReport {
        warnings,
        group: req.group.clone(),
        point: point.seq,
        point_time: understudy_common::format_ms(point.cut.created_ms),
        rpo_seconds: (now - point.cut.created_ms) as f64 / 1000.0,
        duration_seconds: start.elapsed().as_secs_f64(),
        dry_run: req.dry_run,
        ok: volumes.iter().all(|v| v.ok) && manifests_error.is_none(),
        volumes,
        manifests_error,
        manifest_files: manifests.files.len(),
        objects_skipped: transformed.skipped.len(),
    };
    if !req.dry_run {
        let path = req.out.join("report.json");
        understudy_common::files::write_private(&path, &serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}

fn planned(v: &understudy_common::store::VolumeMeta, target: &Path) -> VolumeRestore {
    VolumeRestore {
        volume: v.name.clone(),
        path: target.display().to_string(),
        size: v.size,
        bytes_written: 0,
        expected_digest: v.digest.clone(),
        actual_digest: String::new(),
        ok: true,
        error: None,
    }
}

/// Rebuilds one volume. An image is written as `<name>.img.partial` and renamed to its final
/// name only once its digest matched, so a crash or a failed check never leaves a file that looks
/// like a finished volume. An image an earlier failover left under the final name is kept as
/// `<name>.img.previous` until the new one is published, so a failed rebuild loses nothing.
fn restore_one(
    store: &Store,
    point: &PointRecord,
    name: &str,
    size: u64,
    target: &Path,
    req: &FailoverRequest,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> VolumeRestore {
    let is_device = req.devices.contains_key(name);
    let partial = target.with_extension("img.partial");
    let previous = target.with_extension("img.previous");
    let result = (|| {
        let writer = if is_device {
            VolumeWriter::open_device(target, size)?
        } else {
            let dir = target.parent().expect("under out");
            understudy_common::files::private_dir(dir)?;
            set_aside(target, &previous)?;
            VolumeWriter::create_image(&partial, size)?
        };
        let opts = RestoreOptions {
            read_back: req.read_back,
            fresh_image: !is_device,
            progress: &|d| progress(name, d, size),
        };
        let mut r = store.restore_volume(
            &point.group,
            point.seq,
            name,
            &writer,
            &target.display().to_string(),
            &opts,
        )?;
        understudy_common::failpoint::hit("failover.volume-written");
        if !is_device {
            if r.ok {
                publish(&partial, target)?;
                remove_if_present(&previous)?;
            } else {
                r.path = partial.display().to_string();
            }
        }
        Ok(r)
    })();
    result.unwrap_or_else(|e: anyhow::Error| VolumeRestore {
        volume: name.to_string(),
        path: if !is_device && partial.exists() {
            partial.display().to_string()
        } else {
            target.display().to_string()
        },
        size,
        bytes_written: 0,
        expected_digest: point
            .cut
            .volume(name)
            .map(|v| v.digest.clone())
            .unwrap_or_default(),
        actual_digest: String::new(),
        ok: false,
        error: Some(format!("{e:#}")),
    })
}

/// Moves an image an earlier failover published at `target` to `previous` (replacing an older
/// one there); does nothing when there is none.
fn set_aside(target: &Path, previous: &Path) -> Result<()> {
    match std::fs::rename(target, previous) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.with_context(|| {
            format!(
                "cannot move the earlier image {} aside to {}: check the output directory is writable",
                target.display(),
                previous.display()
            )
        }),
    }
}

/// Renames a verified image to its final name, durably.
fn publish(partial: &Path, target: &Path) -> Result<()> {
    std::fs::rename(partial, target).with_context(|| {
        format!(
            "cannot rename {} to {}",
            partial.display(),
            target.display()
        )
    })?;
    target.parent().map_or(Ok(()), sync_dir)
}

impl FailoverReport {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mode = if self.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        };
        s += &format!(
            "Failover of group {} to recovery point {}{mode}\n",
            self.group, self.point
        );
        s += &format!(
            "  point time   {}\n  RPO          {:.1} s (now minus cut time)\n  time taken   {:.2} s\n",
            self.point_time, self.rpo_seconds, self.duration_seconds
        );
        s += &format!(
            "  manifests    {} file(s), {} cluster-owned object(s) left out\n",
            self.manifest_files, self.objects_skipped
        );
        if let Some(e) = &self.manifests_error {
            s += &format!("      error: {e}\n");
        }
        for w in &self.warnings {
            s += &format!("  WARNING      {w}\n");
        }
        for v in &self.volumes {
            let status = match (self.dry_run, v.ok) {
                (true, _) => "PLANNED",
                (false, true) => "OK",
                (false, false) => "FAILED",
            };
            s += &format!(
                "  volume {:<12} {:>7} {:>12} bytes -> {}\n",
                v.volume, status, v.size, v.path
            );
            s += &format!("      digest {}\n", v.expected_digest);
            if let Some(e) = &v.error {
                s += &format!("      error: {e}\n");
            }
        }
        s += &format!("Result: {}\n", if self.ok { "OK" } else { "FAILED" });
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rpo_guard_refuses_or_warns_only_past_its_bound() {
        let guard = |on_older| AgeGuard {
            max_age: Duration::from_secs(600),
            on_older,
            words: GuardWords::CLI,
        };
        let cut = 1_800_000_000_000;
        let fresh = cut + 599_000;
        let stale = cut + 3_600_000;
        assert!(check_point_age(None, 7, cut, stale).unwrap().is_none());
        let refuse = guard(RpoGuard::Refuse);
        assert!(
            check_point_age(Some(&refuse), 7, cut, fresh)
                .unwrap()
                .is_none()
        );
        let e = format!(
            "{:#}",
            check_point_age(Some(&refuse), 7, cut, stale).unwrap_err()
        );
        assert!(
            e.contains("point 7 was cut 1h ago")
                && e.contains("--max-point-age 10m")
                && e.contains("Nothing was written"),
            "{e}"
        );
        let warn = check_point_age(Some(&guard(RpoGuard::Warn)), 7, cut, stale).unwrap();
        assert!(warn.is_some_and(|w| w.contains("replication may have stopped")));
        // A Failover's refusal names its fields, not the command's flags.
        let in_crd = AgeGuard {
            words: GuardWords::FAILOVER,
            ..refuse
        };
        let e = format!(
            "{:#}",
            check_point_age(Some(&in_crd), 7, cut, stale).unwrap_err()
        );
        assert!(
            e.contains("maxPointAge 10m") && e.contains("set rpoGuard: warn") && !e.contains("--"),
            "{e}"
        );
    }
}
