//! Crashes at named points (invariants 1, 2 and 5): each test arms one crash point of
//! `understudy_common::failpoint::POINTS` in a real agent process, which kills itself there with
//! SIGKILL. After the crash no partial point is listed, the last committed point restores
//! bit-exact, `verify` finds the store whole, and the next cycle completes.

use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;
use understudy_common::failpoint::POINTS;
use understudy_e2e::crash::{CONTROLLER_POINTS, crash_at, sigkilled, spawn, wait};
use understudy_e2e::*;

/// The crash points these tests cover; every point in the code must be here or among the
/// controller's (`CONTROLLER_POINTS`, armed by `kube_replication.rs`).
const COVERED: &[&str] = &[
    "store.flush.packs-synced",
    "store.commit.before",
    "store.commit.after",
    "store.gc.chunks-removed",
    "store.compact.copied",
    "failover.volume-written",
    "source.cut.scanning",
    "source.cut.made",
    "source.commit.acked",
];

#[test]
fn every_crash_point_is_tested() {
    let mut covered = [COVERED, CONTROLLER_POINTS].concat();
    let mut all = POINTS.to_vec();
    covered.sort();
    all.sort();
    assert_eq!(covered, all, "a crash point without a test here");
}

/// A pair with two volumes and one committed point.
struct Scene {
    p: Pair,
    vols: Volumes,
    serve: Vec<&'static str>,
    generation: u64,
    /// Digests per committed point.
    expected: Vec<(u64, Vec<String>)>,
}

impl Scene {
    fn new(serve: &[&'static str]) -> Self {
        let mut p = Pair::new();
        let mut serve = serve.to_vec();
        serve.extend(["--flush-every-mib", "1"]);
        p.start_target(&serve);
        let vols = Volumes::create(&p, &["a", "b"], 16 << 20);
        write_random(vols.path(0), 0, 6 << 20, 1);
        write_text(vols.path(1), 0, 4 << 20, 2);
        let mut s = Scene {
            p,
            vols,
            serve,
            generation: 1,
            expected: Vec::new(),
        };
        let r = s.p.cycle("g", &s.vols.refs(), &[]);
        s.expected
            .push((r["seq"].as_u64().unwrap(), s.vols.digests()));
        s
    }

    /// Overwrites most of volume a's data and some of b: 5 MiB of new chunks.
    fn change(&mut self) -> Vec<String> {
        self.generation += 1;
        write_random(self.vols.path(0), 1 << 20, 4 << 20, self.generation * 100);
        write_random(
            self.vols.path(1),
            8 << 20,
            1 << 20,
            self.generation * 100 + 1,
        );
        self.vols.digests()
    }

    fn restart_target(&mut self, env: &[(&str, &str)]) {
        self.p.kill_target();
        let serve = self.serve.clone();
        self.p.start_target_env(&serve, env);
    }

    /// Waits for the target to die at its crash point.
    fn target_crashed(&mut self) {
        let mut t = self.p.target.take().expect("target running");
        let st = wait(&mut t, Duration::from_secs(60)).expect("the target reached its crash point");
        assert!(sigkilled(&st), "target ended with {st}, not SIGKILL");
    }

    /// One source cycle with extra environment; returns its exit status and report (if any).
    fn cycle_env(&self, env: &[(&str, &str)]) -> (ExitStatus, Option<serde_json::Value>) {
        let args = self.p.source_args("g", &self.vols.refs(), &[]);
        let o = Command::new(bin("source-agent"))
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("source runs");
        let out = String::from_utf8_lossy(&o.stdout);
        (o.status, out.contains('{').then(|| json(&out)))
    }

    /// Runs a cycle while the target dies at its armed crash point, restarts the target at once
    /// (so the source hears a reset instead of waiting out the idle timeout) and returns whether
    /// the source still saw its point committed.
    fn cycle_through_target_crash(&mut self) -> bool {
        let args = self.p.source_args("g", &self.vols.refs(), &[]);
        let mut source = spawn("source-agent", &args, &[], &self.p.path("source.log"));
        self.target_crashed();
        let serve = self.serve.clone();
        self.p.start_target(&serve);
        let st = wait(&mut source, Duration::from_secs(90)).expect("source ends after the crash");
        st.success()
    }

    fn cycle(&self) -> serde_json::Value {
        self.p.cycle("g", &self.vols.refs(), &[])
    }

    /// Every listed point restores bit-exact, and only committed points are listed.
    fn check_store(&self) {
        let listed = self.p.points("g");
        let known: Vec<u64> = self.expected.iter().map(|(s, _)| *s).collect();
        for seq in &listed {
            assert!(
                known.contains(seq),
                "point {seq} listed but never committed: {listed:?} vs {known:?}"
            );
        }
        let latest = *listed.last().expect("a point is listed");
        let want = &self.expected.iter().find(|(s, _)| *s == latest).unwrap().1;
        let out = self
            .p
            .path(&format!("restore-{latest}-{}", self.generation));
        let rep = self.p.failover("g", &latest.to_string(), &out, &[]);
        assert_eq!(rep["ok"], true, "{rep}");
        self.vols
            .assert_restored(&out, want, &format!("point {latest}"));
        std::fs::remove_dir_all(&out).unwrap();
        let v = self.p.target_cmd(&["verify", "--json"]);
        assert!(
            v.status.success(),
            "verify found damage: {}",
            String::from_utf8_lossy(&v.stdout)
        );
    }

    /// The next cycle completes as point `seq` and restores bit-exact.
    fn completes_as(&mut self, seq: u64, want: Vec<String>) -> serde_json::Value {
        let r = self.cycle();
        assert_eq!(r["seq"], seq, "{r}");
        if !self.expected.iter().any(|(s, _)| *s == seq) {
            self.expected.push((seq, want));
        }
        self.check_store();
        r
    }
}

/// A target crash point reached during a sync: the point is not listed, the previous one is whole.
fn target_crash_before_commit(point: &str, nth: usize) {
    let mut s = Scene::new(&[]);
    let fp = crash_at(point, nth);
    s.restart_target(&[("FAILPOINTS", &fp)]);
    let want = s.change();
    assert!(
        !s.cycle_through_target_crash(),
        "the cycle cannot succeed when the target dies"
    );
    s.check_store();
    assert_eq!(s.p.points("g"), vec![1]);
    let r = s.completes_as(2, want);
    assert_eq!(r["resumed"], true, "{r}");
}

#[test]
fn crash_after_packs_are_synced_but_before_the_catalog_records_them() {
    target_crash_before_commit("store.flush.packs-synced", 2);
}

#[test]
fn crash_just_before_the_point_commit() {
    target_crash_before_commit("store.commit.before", 1);
}

#[test]
fn crash_after_the_point_commit_before_the_source_hears_of_it() {
    let mut s = Scene::new(&[]);
    s.restart_target(&[("FAILPOINTS", "store.commit.after=return")]);
    let want = s.change();
    assert!(!s.cycle_through_target_crash());
    s.expected.push((2, want.clone()));
    s.check_store();
    assert_eq!(
        s.p.points("g"),
        vec![1, 2],
        "the committed point survives the crash"
    );
    let r = s.completes_as(2, want);
    assert_eq!(r["already_committed"], true, "{r}");
    let next = s.change();
    s.completes_as(3, next);
}

/// Crash during retention's garbage collection after a commit (`--keep-last 1`, so the first
/// point's overwritten chunks die and its pack is compacted).
fn crash_during_gc(point: &str) {
    let mut s = Scene::new(&["--keep-last", "1"]);
    s.restart_target(&[("FAILPOINTS", &crash_at(point, 1))]);
    let want = s.change();
    // The commit reply may or may not reach the source before the crash in GC.
    let source_saw_commit = s.cycle_through_target_crash();
    s.expected.push((2, want.clone()));
    s.check_store();
    assert_eq!(
        s.p.points("g"),
        vec![2],
        "retention dropped point 1 before the crash"
    );
    if !source_saw_commit {
        let r = s.completes_as(2, want);
        assert_eq!(r["already_committed"], true, "{r}");
    }
    let next = s.change();
    s.completes_as(3, next);
    let gc = s.p.target_cmd(&["gc", "--json"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    s.check_store();
}

#[test]
fn crash_during_gc_after_chunks_are_forgotten() {
    crash_during_gc("store.gc.chunks-removed");
}

#[test]
fn crash_during_compaction_after_live_chunks_are_copied() {
    crash_during_gc("store.compact.copied");
}

#[test]
fn crash_during_a_failover_rebuild_leaves_no_finished_looking_volume() {
    let mut sc = Scene::new(&[]);
    sc.p.kill_target();
    let out = sc.p.path("fo");
    // An earlier failover into the same directory: its image must outlive a rebuild that stops.
    sc.p.failover("g", "latest", &out, &[]);
    let earlier = digest(&out.join("volumes/a.img"));
    let o = Command::new(bin("target-agent"))
        .args([
            "failover",
            "--dir",
            s(&sc.p.target_dir),
            "--group",
            "g",
            "--point",
            "latest",
            "--out",
            s(&out),
        ])
        .env("FAILPOINTS", "failover.volume-written=return")
        .output()
        .unwrap();
    assert!(sigkilled(&o.status), "failover ended with {}", o.status);
    assert!(
        !out.join("volumes/a.img").exists(),
        "a half-written volume has its final name"
    );
    assert!(out.join("volumes/a.img.partial").exists());
    assert_eq!(
        digest(&out.join("volumes/a.img.previous")),
        earlier,
        "the earlier image was not kept aside"
    );
    assert!(
        !out.join("report.json").exists(),
        "the earlier run's report is still there"
    );
    let rep = sc.p.failover("g", "latest", &out, &[]);
    assert_eq!(rep["ok"], true, "{rep}");
    assert!(!out.join("volumes/a.img.partial").exists());
    assert!(!out.join("volumes/a.img.previous").exists());
    sc.vols.assert_restored(&out, &sc.expected[0].1, "point 1");
}

#[test]
fn source_crash_while_scanning_leaves_no_cut_and_the_next_cycle_makes_one() {
    let mut s = Scene::new(&[]);
    let want = s.change();
    // The second batch of the scan: some chunks of the cut are spooled (and pushed) already.
    let (st, _) = s.cycle_env(&[("FAILPOINTS", "source.cut.scanning=1*off->return")]);
    assert!(sigkilled(&st), "source ended with {st}");
    s.check_store();
    let r = s.completes_as(2, want);
    assert_eq!(r["resumed"], false, "a half-made cut is never offered: {r}");
}

#[test]
fn source_crash_after_the_cut_resumes_that_cut() {
    let mut s = Scene::new(&[]);
    let want = s.change();
    let (st, _) = s.cycle_env(&[("FAILPOINTS", "source.cut.made=return")]);
    assert!(sigkilled(&st), "source ended with {st}");
    s.check_store();
    // The volume changes again after the crash: the resumed cut must still be the one made.
    let later = s.change();
    let r = s.completes_as(2, want);
    assert_eq!(r["resumed"], true, "{r}");
    s.completes_as(3, later);
}

#[test]
fn source_crash_after_the_commit_reply_records_it_on_restart() {
    let mut s = Scene::new(&[]);
    let want = s.change();
    let (st, _) = s.cycle_env(&[("FAILPOINTS", "source.commit.acked=return")]);
    assert!(sigkilled(&st), "source ended with {st}");
    s.expected.push((2, want.clone()));
    s.check_store();
    let r = s.completes_as(2, want);
    assert_eq!(r["already_committed"], true, "{r}");
    assert_eq!(r["chunks_sent"], 0, "{r}");
    let next = s.change();
    let r = s.completes_as(3, next);
    assert_eq!(r["resumed"], false, "{r}");
}
