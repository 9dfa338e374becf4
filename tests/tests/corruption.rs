//! Bit-exact restore is checked end to end (invariant 2): a chunk damaged on disk is found by
//! `verify`, named by pack file, offset, point and volume, and failover refuses to hand out the
//! volume that uses it while the undamaged volume still restores.

use std::os::unix::fs::FileExt;
use understudy_e2e::*;

#[test]
fn a_corrupted_chunk_is_found_and_named_and_failover_refuses_it() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let (a, b) = (p.path("a.img"), p.path("b.img"));
    sparse_image(&a, 8 << 20);
    sparse_image(&b, 8 << 20);
    write_random(&a, 0, 1 << 20, 1);
    write_text(&b, 0, 1 << 20, 2);
    p.cycle("app", &[("a", &a), ("b", &b)], &[]);
    p.kill_target();

    // Damage the first data chunk of volume a: find its frame by content hash in the packs.
    let first = std::fs::read(&a).unwrap()[..64 << 10].to_vec();
    let hash = blake3::hash(&first);
    let pack = std::fs::read_dir(p.target_dir.join("store/packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(&pack).unwrap();
    let at = bytes
        .windows(32)
        .position(|w| w == hash.as_bytes())
        .expect("chunk hash in pack")
        - 16;
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.write_all_at(&[bytes[at + 100] ^ 0x10], (at + 100) as u64)
        .unwrap();

    let o = p.target_cmd(&["verify", "--json"]);
    assert_eq!(o.status.code(), Some(2), "verify must fail on damage");
    let rep = json(&String::from_utf8_lossy(&o.stdout));
    let problem = &rep["problems"][0];
    assert_eq!(problem["pack_file"].as_str().unwrap(), s(&pack));
    assert_eq!(problem["offset"].as_u64().unwrap(), at as u64);
    let used = problem["used_by"].to_string();
    assert!(
        used.contains("point 1") && used.contains("volume a") && used.contains("at byte 0"),
        "{used}"
    );

    let out = p.path("out");
    let rep = p.failover("app", "latest", &out, &[]);
    assert_eq!(rep["ok"], false);
    let vols = rep["volumes"].as_array().unwrap();
    let va = vols.iter().find(|v| v["volume"] == "a").unwrap();
    let vb = vols.iter().find(|v| v["volume"] == "b").unwrap();
    assert_eq!(va["ok"], false);
    assert!(va["error"].as_str().unwrap().contains("damaged"), "{va}");
    assert_eq!(vb["ok"], true);
    assert_eq!(digest(&out.join("volumes/b.img")), digest(&b));
}
