//! The manifest commands (`source-agent capture`, `target-agent apply`) run against test
//! clusters, and readers of their reports.

use crate::testbed::TestCluster;
use crate::{json, run, s};
use anyhow::{Result, bail};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// A primary and a standby API server; `None` when the test bed is not available.
pub async fn pair() -> Result<Option<(TestCluster, TestCluster)>> {
    let (a, b) = tokio::try_join!(TestCluster::start(), TestCluster::start())?;
    Ok(a.zip(b))
}

/// Waits up to 90 s for `check` to hold.
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("timed out waiting for {what}")
}

/// `source-agent capture` of `namespaces` into `out`; the JSON summary.
pub fn capture(cluster: &TestCluster, namespaces: &[&str], out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["capture", "--kubeconfig", s(&cluster.kubeconfig)];
    for ns in namespaces {
        args.extend(["--namespace", ns]);
    }
    args.extend(["--out", s(out), "--json"]);
    args.extend_from_slice(extra);
    let o = run("source-agent", &args);
    assert!(
        o.status.success(),
        "capture failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    json(&String::from_utf8_lossy(&o.stdout))
}

/// `target-agent apply` of `bundle` with `rules`; the exit code and the JSON report.
pub fn apply(cluster: &TestCluster, bundle: &Path, rules: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec![
        "apply",
        "--bundle",
        s(bundle),
        "--rules",
        s(rules),
        "--kubeconfig",
        s(&cluster.kubeconfig),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = run("target-agent", &args);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "apply printed no report ({e}): {stdout}{}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().unwrap_or(-1), report)
}

/// The per-object results of an apply report.
pub fn results(report: &Value) -> &Vec<Value> {
    report["results"].as_array().expect("results")
}

/// The result for one object of an apply report.
pub fn outcome_of<'a>(report: &'a Value, kind: &str, name: &str) -> &'a Value {
    results(report)
        .iter()
        .find(|r| r["object"]["kind"] == kind && r["object"]["name"] == name)
        .unwrap_or_else(|| panic!("no result for {kind} {name}: {report}"))
}

/// Every file under `dir`, relative, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).expect("under").display().to_string());
            }
        }
    }
    out.sort();
    out
}
