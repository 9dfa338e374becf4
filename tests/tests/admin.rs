//! A drill while replication goes on: with `serve` running (holding the store), `points`,
//! `failover` (relative paths resolved in the caller's directory), `verify` and `retention`
//! reach the store through the admin socket, and cycles keep committing.

use std::process::Command;
use understudy_e2e::*;

#[test]
fn store_commands_work_while_the_target_serves() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let v = p.path("v.img");
    sparse_image(&v, 8 << 20);
    write_random(&v, 0, 2 << 20, 1);
    p.cycle("app", &[("d", &v)], &[]);
    let at_point1 = p.path("p1.img");
    snapshot_copy(&v, &at_point1);
    assert_eq!(
        p.points("app"),
        vec![1],
        "points through the running server"
    );

    // Failover drill into a path relative to the caller's working directory.
    let o = Command::new(bin("target-agent"))
        .args([
            "failover",
            "--dir",
            s(&p.target_dir),
            "--group",
            "app",
            "--out",
            "drill",
            "--json",
        ])
        .current_dir(p.root.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(digest(&p.path("drill/volumes/d.img")), digest(&at_point1));

    write_random(&v, 4 << 20, 1 << 20, 2);
    p.cycle("app", &[("d", &v)], &[]);
    let o = p.target_cmd(&["verify", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = p.target_cmd(&["retention", "--keep-last", "1", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(p.points("app"), vec![2]);
    assert!(p.target.is_some(), "the target kept serving");
    p.kill_target();
    let o = p.target_cmd(&["points", "--json"]);
    assert!(o.status.success(), "direct access once serve stopped");
}
