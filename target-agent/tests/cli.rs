//! The target agent's command line refuses bad input with messages that say what to fix.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_target-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_commands() {
    let o = Command::new(env!("CARGO_BIN_EXE_target-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    for c in [
        "serve",
        "points",
        "inspect",
        "verify",
        "retention",
        "gc",
        "failover",
        "pair",
    ] {
        assert!(out.contains(c), "{out}");
    }
}

#[test]
fn bad_input_is_explained() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let (ok, err) = run(&["points", "--dir", dir]);
    assert!(!ok && err.contains("no store"), "{err}");
    let (ok, err) = run(&[
        "failover",
        "--dir",
        dir,
        "--group",
        "g",
        "--point",
        "yesterday",
        "--out",
        dir,
    ]);
    assert!(!ok && err.contains("latest"), "{err}");
    run(&["init", "--dir", dir]);
    let (ok, err) = run(&["serve", "--dir", dir, "--listen", "127.0.0.1:0"]);
    assert!(!ok && err.contains("no peer is paired"), "{err}");
    std::fs::create_dir_all(d.path().join("store")).unwrap();
    let (ok, err) = run(&["failover", "--dir", dir, "--group", "g", "--out", dir]);
    assert!(!ok && err.contains("no recovery point"), "{err}");
    let (ok, err) = run(&["retention", "--dir", dir]);
    assert!(!ok && err.contains("--keep-last"), "{err}");
}
