//! The target serves Prometheus metrics: after a commit, the group's last point time, RPO, stored
//! bytes and committed points are exported.

use std::io::{Read, Write};
use understudy_e2e::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

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
