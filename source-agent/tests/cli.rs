//! The source agent's command line refuses bad input with messages that say what to fix.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_source-agent"))
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
    let o = Command::new(env!("CARGO_BIN_EXE_source-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    for c in ["init", "identity", "pair", "run"] {
        assert!(out.contains(c), "{out}");
    }
}

#[test]
fn bad_input_is_explained() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let (ok, err) = run(&[
        "run",
        "--dir",
        dir,
        "--group",
        "g",
        "--target",
        "127.0.0.1:1",
        "--volume",
        "nopath",
        "--once",
    ]);
    assert!(!ok && err.contains("NAME=PATH"), "{err}");
    let (ok, err) = run(&[
        "run",
        "--dir",
        dir,
        "--group",
        "g",
        "--target",
        "127.0.0.1:1",
        "--volume",
        "a=/x",
        "--block-size",
        "1000",
        "--once",
    ]);
    assert!(!ok && err.contains("power of two"), "{err}");
    let (ok, err) = run(&[
        "run",
        "--dir",
        dir,
        "--group",
        "g",
        "--target",
        "127.0.0.1:1",
        "--volume",
        "a=/x",
        "--once",
    ]);
    assert!(
        !ok && err.contains("no identity") && err.contains("init"),
        "{err}"
    );
    let (ok, err) = run(&["pair", "--dir", dir, "--peer", "sha256:xyz"]);
    assert!(!ok && err.contains("fingerprint"), "{err}");
    run(&["init", "--dir", dir]);
    let (ok, err) = run(&[
        "run",
        "--dir",
        dir,
        "--group",
        "g",
        "--target",
        "127.0.0.1:1",
        "--volume",
        "a=/x",
        "--once",
    ]);
    assert!(!ok && err.contains("no peer is paired"), "{err}");
    let (ok, err) = run(&["init", "--dir", dir]);
    assert!(!ok && err.contains("already holds an identity"), "{err}");
}
