//! Atomic recovery points (invariant 1) and resume without resending (invariant 5): the target is
//! killed with SIGKILL in the middle of receiving a point. After restart no partial point is
//! listed, the previous point restores bit-exact, and the next cycle completes without resending
//! any chunk that was durable on the target.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use understudy_e2e::*;

fn durable_chunks(p: &Pair) -> u64 {
    let o = p.target_cmd(&["verify", "--json"]);
    assert!(
        o.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    json(&String::from_utf8_lossy(&o.stdout))["chunks_checked"]
        .as_u64()
        .unwrap()
}

#[test]
fn sigkill_mid_receive_keeps_the_previous_point_and_resumes_without_resending() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let v = p.path("vol.img");
    sparse_image(&v, 512 << 20);
    write_random(&v, 0, 8 << 20, 1);
    p.cycle("db", &[("data", &v)], &[]);
    let point1 = p.path("point1.img");
    snapshot_copy(&v, &point1);
    p.kill_target();
    let before = durable_chunks(&p);
    p.start_target(&[]);

    // A big change, then kill the target once it has stored ~100 MB of it.
    write_random(&v, 16 << 20, 448 << 20, 2);
    let args = p.source_args("db", &[("data", &v)], &[]);
    let mut source = Proc(
        Command::new(bin("source-agent"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = p.pack_bytes();
    let start = Instant::now();
    while p.pack_bytes() < base + (100 << 20) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "transfer never started: {}",
            p.target_log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    p.kill_target();
    p.start_target(&[]); // the source's connection is reset by the new process
    let start = Instant::now();
    while source.0.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    source.kill9();
    p.kill_target();

    assert_eq!(p.points("db"), vec![1], "a partial point is listed");
    let out = p.path("out1");
    let rep = p.failover("db", "latest", &out, &[]);
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(
        digest(&out.join("volumes/data.img")),
        digest(&point1),
        "previous point is not intact"
    );
    let durable = durable_chunks(&p) - before;
    assert!(
        durable > 0,
        "nothing was durable at the kill; the test did not test resume"
    );

    p.start_target(&[]);
    let r = p.cycle("db", &[("data", &v)], &[]);
    assert_eq!(
        r["resumed"], true,
        "the cut made before the crash is reused: {r}"
    );
    assert_eq!(r["seq"], 2);
    let held = r["chunks_held"].as_u64().unwrap();
    let sent = r["chunks_sent"].as_u64().unwrap();
    println!(
        "chunks durable at the kill: {durable}; resumed cycle: sent {sent}, already held {held}"
    );
    assert!(
        held >= durable,
        "chunks durable on the target were sent again: held {held} < durable {durable}"
    );
    p.kill_target();
    let o = p.target_cmd(&["inspect", "--group", "db", "--json"]);
    let point = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(
        point["stats"]["chunks_received"].as_u64().unwrap(),
        sent,
        "the target received a chunk twice"
    );
    let out = p.path("out2");
    let rep = p.failover("db", "latest", &out, &[]);
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(digest(&out.join("volumes/data.img")), digest(&v));
}
