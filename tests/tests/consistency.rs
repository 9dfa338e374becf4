//! Group consistency (invariant 3): a writer spreads sequence-numbered records over three
//! volumes while cycles run with freeze/thaw hooks (SIGSTOP/SIGCONT of the writer); every
//! recovery point's rebuilt volumes hold exactly a prefix of the sequence.

use std::process::Command;
use understudy_e2e::*;

#[test]
fn every_point_holds_a_prefix_of_the_write_sequence() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let vols: Vec<_> = (0..3).map(|i| p.path(&format!("v{i}.img"))).collect();
    for v in &vols {
        sparse_image(v, 16 << 20);
    }
    let writer = Proc(
        Command::new(bin("consistency-writer"))
            .arg("write")
            .args(vols.iter().map(|v| s(v)))
            .spawn()
            .unwrap(),
    );
    let pid = writer.0.id();
    let pre = format!(
        "kill -STOP {pid} && while ! grep -q '^State:.*stopped' /proc/{pid}/status; do sleep 0.002; done"
    );
    let post = format!("kill -CONT {pid}");
    let named: Vec<(&str, &std::path::Path)> =
        vec![("v0", &vols[0]), ("v1", &vols[1]), ("v2", &vols[2])];
    for _ in 0..4 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        p.cycle(
            "seq",
            &named,
            &[
                "--pre-hook",
                &pre,
                "--post-hook",
                &post,
                "--hook-timeout",
                "10s",
            ],
        );
    }
    drop(writer);
    p.kill_target();
    let mut last = 0;
    for point in p.points("seq") {
        let out = p.path(&format!("out{point}"));
        let rep = p.failover("seq", &point.to_string(), &out, &[]);
        assert_eq!(rep["ok"], true, "{rep}");
        let files: Vec<String> = (0..3)
            .map(|i| s(&out.join(format!("volumes/v{i}.img"))).to_string())
            .collect();
        let o = Command::new(bin("consistency-writer"))
            .arg("check")
            .args(&files)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "point {point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let records: u64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        assert!(records >= last, "points go forward in the sequence");
        last = records;
    }
    assert!(last > 0, "the writer wrote nothing before the cuts");
}
