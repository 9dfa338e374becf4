//! What a new user hit in standalone mode (issue 20), with the real binaries: SIGTERM and SIGINT
//! at each stage of a cycle (the thaw always runs, the next start resumes), a second signal,
//! host names as the target, the interval minimum, errors a retry cannot fix, owner-only files,
//! and the text of store errors.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use understudy_e2e::crash::{spawn, wait};
use understudy_e2e::{Pair, Proc, json, run, s, sparse_image, write_random};

/// A source cycle's hooks, writing `pre` and `post` lines to an events file; the freeze sleeps
/// `pre_sleep` seconds (to be caught while it runs).
struct Hooks {
    events: PathBuf,
}

impl Hooks {
    fn new(p: &Pair) -> Self {
        Hooks {
            events: p.path("events"),
        }
    }

    fn args(&self, pre_sleep: u32) -> Vec<String> {
        let e = s(&self.events);
        vec![
            "--pre-hook".into(),
            format!("echo pre >> {e}; sleep {pre_sleep}"),
            "--post-hook".into(),
            format!("echo post >> {e}"),
            "--hook-timeout".into(),
            "60s".into(),
        ]
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn count(&self, what: &str) -> usize {
        self.lines().iter().filter(|l| *l == what).count()
    }

    /// Waits until `what` was written `n` times.
    fn wait_for(&self, what: &str, n: usize, log: &Path) {
        let start = Instant::now();
        while self.count(what) < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no `{what}` hook ran; events {:?}; log:\n{}",
                self.lines(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every freeze was thawed.
    fn assert_thawed(&self, stage: &str) {
        assert!(
            self.count("pre") >= 1 && self.count("pre") == self.count("post"),
            "{stage}: a freeze was not thawed: {:?}",
            self.lines()
        );
        assert_eq!(
            self.lines().last().map(String::as_str),
            Some("post"),
            "{stage}"
        );
    }
}

fn signal(p: &Proc, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(p.0.id() as i32).expect("pid");
    rustix::process::kill_process(pid, sig).expect("send signal");
}

/// Waits for the agent to exit after a signal; it must not hang.
fn exited(p: &mut Proc, log: &Path, stage: &str) -> ExitStatus {
    wait(p, Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "{stage}: the source did not stop after the signal; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn volume(p: &Pair) -> PathBuf {
    let v = p.path("data.img");
    sparse_image(&v, 8 << 20);
    write_random(&v, 0, 8 << 20, 7);
    v
}

#[test]
fn a_signal_at_each_stage_of_a_cycle_thaws_the_application_and_the_next_start_resumes() {
    use rustix::process::Signal;
    let mut p = Pair::new();
    p.start_target(&[]);
    let vol = volume(&p);
    let hooks = Hooks::new(&p);
    let vols = [("data", vol.as_path())];

    // 1. SIGTERM while the freeze runs: it finishes, the thaw runs, nothing is committed.
    let log = p.path("stage1.log");
    let mut a = p.source_args("g", &vols, &[]);
    a.extend(hooks.args(2));
    let mut src = spawn("source-agent", &a, &[], &log);
    hooks.wait_for("pre", 1, &log);
    signal(&src, Signal::TERM);
    let st = exited(&mut src, &log, "pre hook");
    hooks.assert_thawed("pre hook");
    assert_eq!(st.code(), Some(128 + 15), "{}", log_of(&log));
    assert!(
        log_of(&log).contains("stopped by a signal during a cycle"),
        "{}",
        log_of(&log)
    );
    assert!(p.points("g").is_empty(), "no point from a stopped cut");

    // 2. SIGINT (Ctrl-C) while the cut is scanning: the scan stops, the thaw runs.
    let log = p.path("stage2.log");
    let mut a = p.source_args("g", &vols, &[]);
    a.extend(hooks.args(0));
    let mut src = spawn(
        "source-agent",
        &a,
        &[("FAILPOINTS", "source.cut.scanning=1*sleep(3000)")],
        &log,
    );
    hooks.wait_for("pre", 2, &log);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        hooks.count("post"),
        1,
        "still scanning: {:?}",
        hooks.lines()
    );
    signal(&src, Signal::INT);
    let st = exited(&mut src, &log, "scan");
    hooks.assert_thawed("scan");
    assert_eq!(st.code(), Some(128 + 2), "{}", log_of(&log));
    assert!(p.points("g").is_empty());

    // 3. SIGTERM while the cut is being sent (at 1 Mbit/s): the session ends, the cut is kept.
    let log = p.path("stage3.log");
    let mut a = p.source_args("g", &vols, &["--bandwidth-limit-mbit", "1"]);
    a.extend(hooks.args(0));
    let mut src = spawn("source-agent", &a, &[], &log);
    hooks.wait_for("post", 3, &log);
    std::thread::sleep(Duration::from_millis(1500));
    signal(&src, Signal::TERM);
    let st = exited(&mut src, &log, "send");
    hooks.assert_thawed("send");
    assert_eq!(st.code(), Some(128 + 15), "{}", log_of(&log));
    assert!(
        p.source_dir.join("groups/g/cut/cut.bin").exists(),
        "the cut is kept for the next start"
    );
    assert!(p.points("g").is_empty());

    // The next start resumes that cut (nothing re-read) and commits it, bit-exact.
    let r = p.cycle("g", &vols, &[]);
    assert_eq!(r["resumed"], true, "{r}");
    assert_eq!(r["bytes_read"], 0, "{r}");
    let out = p.path("restored");
    let rep = p.failover("g", "latest", &out, &[]);
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(
        understudy_e2e::digest(&out.join("volumes/data.img")),
        understudy_e2e::digest(&vol)
    );

    // 4. SIGTERM while sleeping between cycles: a clean stop, exit code 0.
    let log = p.path("stage4.log");
    let mut a = p.source_args("g", &vols, &[]);
    a.retain(|x| x != "--once");
    a.extend(["--interval".to_string(), "1h".to_string()]);
    let mut src = spawn("source-agent", &a, &[], &log);
    let start = Instant::now();
    while !log_of(&log).contains("\"seq\":2") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            log_of(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&src, Signal::TERM);
    let st = exited(&mut src, &log, "sleep");
    assert_eq!(st.code(), Some(0), "{}", log_of(&log));
    assert!(log_of(&log).contains("between cycles"), "{}", log_of(&log));
}

#[test]
fn a_second_signal_exits_at_once_and_still_thaws() {
    use rustix::process::Signal;
    let mut p = Pair::new();
    p.start_target(&[]);
    let vol = volume(&p);
    let hooks = Hooks::new(&p);
    let log = p.path("source.log");
    let mut a = p.source_args("g", &[("data", vol.as_path())], &[]);
    a.extend(hooks.args(600));
    let mut src = spawn("source-agent", &a, &[], &log);
    hooks.wait_for("pre", 1, &log);
    signal(&src, Signal::TERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        src.0.try_wait().unwrap().is_none(),
        "the first signal waits for the freeze"
    );
    signal(&src, Signal::TERM);
    let st = exited(&mut src, &log, "second signal");
    assert_eq!(st.code(), Some(128 + 15), "{}", log_of(&log));
    hooks.assert_thawed("second signal");
    assert!(log_of(&log).contains("second signal"), "{}", log_of(&log));
}

/// Runs `source-agent` with these arguments.
fn source(args: &[String]) -> std::process::Output {
    run(
        "source-agent",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

#[test]
fn the_target_may_be_a_host_name_and_the_address_used_is_logged() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let vol = volume(&p);
    let port = p.addr.rsplit_once(':').unwrap().1.to_string();
    // The target listens on 127.0.0.1 only: where localhost also resolves to ::1, that attempt
    // gets no answer and the IPv4 one, started 250 ms later, wins.
    p.route = Some(format!("localhost:{port}"));
    let o = source(&p.source_args("g", &[("data", vol.as_path())], &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(json(&String::from_utf8_lossy(&o.stdout))["seq"], 1);
    assert!(
        err.contains("connected to the target") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );

    // A malformed address is refused before anything runs, with the form to use.
    p.route = Some("standby".into());
    let o = source(&p.source_args("g", &[("data", vol.as_path())], &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("has no port") && err.contains("HOST:PORT"),
        "{err}"
    );
}

#[test]
fn intervals_below_the_minimum_are_refused() {
    let mut p = Pair::new();
    p.route = Some("127.0.0.1:9".into());
    let vol = volume(&p);
    let mut a = p.source_args("g", &[("data", vol.as_path())], &[]);
    a.retain(|x| x != "--once");
    a.extend(["--interval".to_string(), "0s".to_string()]);
    let o = source(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("the minimum is 10s"), "{err}");
}

#[test]
fn errors_a_retry_cannot_fix_fail_at_once() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let vol = volume(&p);
    let bad_yaml = p.path("bad-manifests");
    std::fs::create_dir_all(&bad_yaml).unwrap();
    std::fs::write(bad_yaml.join("x.yaml"), "kind: [unclosed\n").unwrap();
    let dir_vol = p.path("a-directory");
    std::fs::create_dir_all(&dir_vol).unwrap();
    let missing = p.path("missing.img");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "missing volume",
            p.source_args("g", &[("data", missing.as_path())], &[]),
            "cannot open volume",
        ),
        (
            "directory as a volume",
            p.source_args("g", &[("data", dir_vol.as_path())], &[]),
            "is a directory",
        ),
        (
            "invalid YAML",
            p.source_args(
                "g",
                &[("data", vol.as_path())],
                &["--manifests", s(&bad_yaml)],
            ),
            "is not valid",
        ),
        (
            "missing manifests directory",
            p.source_args(
                "g",
                &[("data", vol.as_path())],
                &["--manifests", s(&p.path("nowhere"))],
            ),
            "cannot read manifest directory",
        ),
    ];
    for (what, mut args, says) in cases {
        // Retries allowed: a retried error would back off for many seconds before failing.
        let i = args.iter().position(|x| x == "--max-retries").unwrap();
        args[i + 1] = "5".into();
        let o = source(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
        assert!(!err.contains("retrying"), "{what} was retried: {err}");
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn assert_private_tree(root: &Path) {
    for e in walk(root) {
        let m = std::fs::symlink_metadata(&e).unwrap();
        if m.file_type().is_socket() {
            continue;
        }
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&e), want, "{} is {:o}", e.display(), mode(&e));
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if out[i].is_dir() {
            let mut kids: Vec<PathBuf> = std::fs::read_dir(&out[i])
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            out.append(&mut kids);
        }
        i += 1;
    }
    out
}

use std::os::unix::fs::FileTypeExt;

#[test]
fn data_and_secrets_are_owner_only_whatever_the_umask() {
    // The widest umask: every file created without an explicit mode would be world-readable.
    let old = rustix::process::umask(rustix::fs::Mode::empty());
    let mut p = Pair::new();
    p.start_target(&[]);
    let vol = volume(&p);
    let manifests = p.path("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("secret.yaml"),
        "apiVersion: v1\nkind: Secret\nmetadata: {name: db, namespace: shop}\nstringData: {password: hunter2}\n",
    )
    .unwrap();
    // A pending cut (spool included) on the source: the target is away for this cycle.
    let addr = p.addr.clone();
    p.route = Some("127.0.0.1:9".into());
    let a = p.source_args(
        "g",
        &[("data", vol.as_path())],
        &["--manifests", s(&manifests)],
    );
    let o = source(&a);
    assert!(!o.status.success());
    assert!(p.source_dir.join("groups/g/cut/spool.frames").exists());
    assert_private_tree(&p.source_dir);
    p.route = Some(addr);
    p.cycle(
        "g",
        &[("data", vol.as_path())],
        &["--manifests", s(&manifests)],
    );
    p.kill_target();
    let out = p.path("out");
    let rep = p.failover("g", "latest", &out, &[]);
    rustix::process::umask(old);
    assert_eq!(rep["ok"], true, "{rep}");
    assert_private_tree(&p.target_dir);
    assert_private_tree(&out);
    assert!(
        walk(&out)
            .iter()
            .any(|f| f.to_string_lossy().ends_with("Secret/db.json"))
    );
}

#[test]
fn store_errors_say_what_is_missing_in_words() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let vol = volume(&p);
    p.cycle("g", &[("data", vol.as_path())], &[]);
    // Through the running server's admin socket, and on the store directly.
    for running in [true, false] {
        if !running {
            p.kill_target();
        }
        for (point, says) in [
            ("999", "no point 999 in group g"),
            (
                "1999-01-01T00:00:00Z",
                "no point at or before 1999-01-01T00:00:00Z in group g",
            ),
        ] {
            let o = p.target_cmd(&["inspect", "--group", "g", "--point", point]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success());
            assert!(err.contains(says), "running={running}: {err}");
            assert!(
                !err.contains("in use by another"),
                "running={running}: {err}"
            );
            assert!(
                !err.contains("Seq(") && !err.contains("AtOrBefore("),
                "{err}"
            );
        }
    }
}

/// The RPO guard: a failover to a point older than `--max-point-age` is refused (nothing
/// written) or, with `--rpo-guard warn`, goes on with the warning in its report; through the
/// running server and on the store directly.
#[test]
fn a_failover_to_a_point_older_than_the_bound_is_refused_or_warned() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let vol = volume(&p);
    p.cycle("g", &[("data", vol.as_path())], &[]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    for running in [true, false] {
        if !running {
            p.kill_target();
        }
        let out = p.path(&format!("out-{running}"));
        let o = p.target_cmd(&[
            "failover",
            "--group",
            "g",
            "--out",
            s(&out),
            "--max-point-age",
            "1s",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "running={running}");
        assert!(
            err.contains("point 1 was cut") && err.contains("--rpo-guard warn"),
            "running={running}: {err}"
        );
        assert!(!out.exists(), "a refused failover wrote {}", out.display());
        let rep = p.failover(
            "g",
            "latest",
            &out,
            &["--max-point-age", "1s", "--rpo-guard", "warn"],
        );
        assert_eq!(rep["ok"], true, "{rep}");
        assert!(
            rep["warnings"][0]
                .as_str()
                .is_some_and(|w| w.contains("replication may have stopped")),
            "{rep}"
        );
        let fresh = p.failover("g", "latest", &out, &["--max-point-age", "1h"]);
        assert!(fresh.get("warnings").is_none(), "{fresh}");
    }
}
