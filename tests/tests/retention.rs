//! Retention and garbage collection: after points expire, chunks only they referenced are gone
//! from the catalog and the disk, and the remaining points still restore bit-exact.

use understudy_e2e::*;

#[test]
fn expired_points_are_dropped_and_their_chunks_collected() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let v = p.path("v.img");
    sparse_image(&v, 32 << 20);
    let mut copies = Vec::new();
    for round in 0..4u64 {
        // Each round rewrites the same 4 MiB: older versions become garbage once their points go.
        write_random(&v, 0, 4 << 20, 100 + round);
        write_random(&v, (8 + round * 4) << 20, 1 << 20, round);
        p.cycle("app", &[("d", &v)], &[]);
        let c = p.path(&format!("copy{round}.img"));
        snapshot_copy(&v, &c);
        copies.push(c);
    }
    p.kill_target();
    let before = p.pack_bytes();
    let o = p.target_cmd(&["retention", "--keep-last", "2", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(rep["dropped"].as_array().unwrap().len(), 2, "{rep}");
    assert_eq!(
        rep["gc"]["chunks_removed"].as_u64().unwrap(),
        2 * 64,
        "the two old 4 MiB versions: {rep}"
    );
    assert!(p.pack_bytes() < before, "disk space was not reclaimed");
    assert_eq!(p.points("app"), vec![3, 4]);

    let o = p.target_cmd(&["verify", "--json"]);
    assert!(
        o.status.success(),
        "store unsound after gc: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    for (seq, copy) in [(3, &copies[2]), (4, &copies[3])] {
        let out = p.path(&format!("out{seq}"));
        let rep = p.failover("app", &seq.to_string(), &out, &[]);
        assert_eq!(rep["ok"], true, "{rep}");
        assert_eq!(digest(&out.join("volumes/d.img")), digest(copy));
    }
}

#[test]
fn serve_applies_retention_after_each_commit() {
    let mut p = Pair::new();
    p.start_target(&["--keep-last", "1"]);
    let v = p.path("v.img");
    sparse_image(&v, 8 << 20);
    for round in 0..3u64 {
        write_random(&v, 0, 1 << 20, round);
        p.cycle("app", &[("d", &v)], &[]);
    }
    p.kill_target();
    assert_eq!(p.points("app"), vec![3]);
    let o = p.target_cmd(&["verify", "--json"]);
    let rep = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(
        rep["chunks_checked"].as_u64().unwrap(),
        16,
        "only the live point's chunks remain (16 data, no manifests): {rep}"
    );
}
