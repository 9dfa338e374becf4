//! The target serves Prometheus metrics: after a commit, the group's last point time, RPO, stored
//! bytes and committed points are exported.

use understudy_e2e::*;

#[test]
fn target_exports_rpo_and_last_point_after_a_commit() {
    let mut p = Pair::new();
    let metrics = format!("127.0.0.1:{}", free_port());
    p.start_target(&["--metrics-addr", &metrics]);
    let v = p.path("v.img");
    sparse_image(&v, 4 << 20);
    write_random(&v, 0, 1 << 20, 7);
    p.cycle("shop", &[("d", &v)], &[]);
    let text = scrape(&metrics);
    for name in [
        "understudy_last_recovery_point_timestamp_seconds{group=\"shop\"}",
        "understudy_rpo_seconds{group=\"shop\"}",
        "understudy_stored_bytes_total{group=\"shop\"}",
        "understudy_points_committed_total{group=\"shop\"} 1",
    ] {
        assert!(text.contains(name), "missing {name} in:\n{text}");
    }
    let rpo: f64 = text
        .lines()
        .find(|l| l.starts_with("understudy_rpo_seconds{"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.0..60.0).contains(&rpo), "rpo {rpo}");
}
