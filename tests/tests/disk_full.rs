//! Disk full on the target (invariants 1 and 7): the target's directory lives on a 48 MiB ext4 file
//! system on a loop device. When a cycle does not fit, it fails with an error that says the disk
//! is full and what to do, the previous point stays intact and restorable, the target keeps
//! running, and the same cut completes once space is freed.

use std::io::Write;
use understudy_e2e::*;

#[test]
fn a_full_disk_fails_the_cycle_clearly_keeps_the_last_point_and_recovers() {
    if !loop_devices_available() {
        return;
    }
    let mut p = Pair::new();
    let fs = SmallFs::mount(&p.path("small.img"), 48 << 20, &p.path("small")).expect("small fs");
    let moved = fs.path.join("target");
    let cp = std::process::Command::new("cp")
        .args(["-a", s(&p.target_dir), s(&moved)])
        .status()
        .unwrap();
    assert!(cp.success());
    p.target_dir = moved;
    p.start_target(&["--flush-every-mib", "1"]);

    let v = p.path("v.img");
    sparse_image(&v, 64 << 20);
    write_random(&v, 0, 4 << 20, 1);
    p.cycle("db", &[("data", &v)], &[]);
    let point1 = p.path("point1.img");
    snapshot_copy(&v, &point1);

    // Leave about 2 MiB free, then change 8 MiB of incompressible data.
    let filler_path = fs.path.join("filler");
    let mut filler = std::fs::File::create(&filler_path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    while fs.available() > 3 << 20 {
        filler.write_all(&chunk).unwrap();
        filler.sync_all().unwrap();
    }
    drop(filler);
    write_random(&v, 8 << 20, 8 << 20, 2);
    let args = p.source_args("db", &[("data", &v)], &[]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run("source-agent", &refs);
    assert!(!o.status.success(), "the cycle cannot fit");
    let err = String::from_utf8_lossy(&o.stderr);
    println!("source error on a full target disk: {err}");
    assert!(
        err.contains("No space left on device") && err.contains("free space"),
        "the error must say the disk is full and what to do: {err}"
    );
    assert!(
        p.target.as_mut().unwrap().0.try_wait().unwrap().is_none(),
        "the target must keep running: {}",
        p.target_log()
    );

    assert_eq!(p.points("db"), vec![1], "a partial point is listed");
    let out = p.path("out1");
    let rep = p.failover("db", "latest", &out, &[]);
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(digest(&out.join("volumes/data.img")), digest(&point1));
    let verify = p.target_cmd(&["verify", "--json"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // Space freed: the same cut completes, without a restart of the target.
    std::fs::remove_file(&filler_path).unwrap();
    let r = p.cycle("db", &[("data", &v)], &[]);
    assert_eq!(
        (r["seq"].as_u64(), r["resumed"].as_bool()),
        (Some(2), Some(true)),
        "{r}"
    );
    let out = p.path("out2");
    let rep = p.failover("db", "latest", &out, &[]);
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(digest(&out.join("volumes/data.img")), digest(&v));
    let verify = p.target_cmd(&["verify", "--json"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    p.kill_target();
}
