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
        "apply",
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

#[test]
fn apply_checks_rules_and_dry_runs_without_a_cluster() {
    let d = tempfile::tempdir().unwrap();
    let bundle = d.path().join("app.yaml");
    std::fs::write(
        &bundle,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop, uid: x}\nspec:\n  replicas: 3\n  template:\n    spec:\n      containers: [{name: w, image: registry.shop.example/web:1}]\n",
    )
    .unwrap();
    let rules = d.path().join("rules.yaml");
    let (b, r) = (bundle.to_str().unwrap(), rules.to_str().unwrap());
    std::fs::write(
        &rules,
        "patches:\n  - name: typo\n    ops: [{op: repalce, path: /x, value: 1}]\n",
    )
    .unwrap();
    let (ok, err) = run(&["apply", "--bundle", b, "--rules", r, "--dry-run"]);
    assert!(
        !ok && err.contains("patches[0] (typo)") && err.contains("repalce"),
        "{err}"
    );
    let kubeconfig = d.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\"}}]\nusers: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n").unwrap();
    let (ok, err) = run(&[
        "apply",
        "--bundle",
        b,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("cannot reach the Kubernetes API server at https://127.0.0.1:1/"),
        "{err}"
    );
    let (ok, err) = run(&["apply", "--bundle", "/nonexistent/bundle", "--dry-run"]);
    assert!(!ok && err.contains("/nonexistent/bundle"), "{err}");

    std::fs::write(&rules, "namespaces: {shop: shop-dr}\nimages: [{from: registry.shop.example, to: registry.dr.example}]\nreplicas: [{replicas: 0}]\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_target-agent"))
        .args(["apply", "--bundle", b, "--rules", r, "--dry-run"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("=== Deployment.apps shop/web -> Deployment.apps shop-dr/web"),
        "{out}"
    );
    assert!(
        out.contains("-  replicas: 3") && out.contains("+  replicas: 0"),
        "{out}"
    );
    assert!(
        out.contains("+      - image: registry.dr.example/web:1"),
        "{out}"
    );
    assert!(out.contains("   1. Deployment.apps shop-dr/web"), "{out}");
}
