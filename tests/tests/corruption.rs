//! Bit-exact restore is checked end to end (invariant 2): a chunk damaged on disk is found by
//! `verify`, named by pack file, offset, point and volume, and failover refuses to hand out the
//! volume that uses it while the undamaged volume still restores.

use std::os::unix::fs::FileExt;
use understudy_e2e::*;

/// The target's first pack file (`packs/` also holds `.high`, the pack id record).
fn first_pack(p: &Pair) -> std::path::PathBuf {
    let mut packs: Vec<_> = std::fs::read_dir(p.target_dir.join("store/packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    packs.sort();
    packs.into_iter().next().expect("a pack")
}

#[test]
fn a_corrupted_chunk_is_found_and_named_and_failover_refuses_it() {
    let (p, a, b) = stored_pair();

    // Damage the first data chunk of volume a: find its frame by content hash in the packs.
    let first = std::fs::read(&a).unwrap()[..64 << 10].to_vec();
    let hash = blake3::hash(&first);
    let pack = first_pack(&p);
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

/// Two volumes in one point, target stopped; returns the pair and the volumes.
fn stored_pair() -> (Pair, std::path::PathBuf, std::path::PathBuf) {
    let mut p = Pair::new();
    p.start_target(&[]);
    let (a, b) = (p.path("a.img"), p.path("b.img"));
    sparse_image(&a, 8 << 20);
    sparse_image(&b, 8 << 20);
    write_random(&a, 0, 2 << 20, 1);
    write_text(&b, 0, 2 << 20, 2);
    p.cycle("app", &[("a", &a), ("b", &b)], &[]);
    p.kill_target();
    (p, a, b)
}

fn no_panic(o: &std::process::Output) {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !all.contains("panicked"),
        "a damaged store made the agent panic: {all}"
    );
}

#[test]
fn a_truncated_pack_is_found_and_named_and_failover_refuses_it() {
    let (p, _, _) = stored_pair();
    let pack = first_pack(&p);
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let o = p.target_cmd(&["verify", "--json"]);
    no_panic(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "verify must fail on a truncated pack"
    );
    let rep = json(&String::from_utf8_lossy(&o.stdout));
    let problem = &rep["problems"][0];
    assert_eq!(problem["pack_file"].as_str().unwrap(), s(&pack));
    assert!(
        problem["offset"].as_u64().unwrap() >= len / 2 - (256 << 10),
        "{problem}"
    );
    assert!(
        problem["used_by"].to_string().contains("point 1"),
        "{problem}"
    );

    let out = p.path("out");
    let rep = p.failover("app", "latest", &out, &[]);
    assert_eq!(rep["ok"], false, "{rep}");
    let bad: Vec<_> = rep["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["ok"] == false)
        .collect();
    assert!(
        !bad.is_empty() && bad.iter().all(|v| v["error"].as_str().is_some()),
        "{rep}"
    );
    for v in bad {
        assert!(
            !out.join(format!("volumes/{}.img", v["volume"].as_str().unwrap()))
                .exists(),
            "a damaged volume was handed out under its final name"
        );
    }
}

/// A way to damage a file's bytes.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

/// Damage to the catalog is never silent: either `verify` reports it (and failover refuses), or
/// the damage hit space the catalog does not use, and then every volume still restores
/// bit-exact. A damaged header or a truncated catalog must be reported, naming the catalog.
#[test]
fn a_damaged_or_truncated_catalog_is_reported_never_trusted() {
    let (p, a, b) = stored_pair();
    let catalog = p.target_dir.join("store/catalog.redb");
    let good = std::fs::read(&catalog).unwrap();
    let n = good.len();
    let damages: Vec<(&str, Damage, bool)> = vec![
        (
            "truncated to half",
            Box::new(|c: &mut Vec<u8>| c.truncate(c.len() / 2)),
            true,
        ),
        (
            "header zeroed",
            Box::new(|c: &mut Vec<u8>| c[..4096].fill(0)),
            true,
        ),
        (
            "middle overwritten",
            Box::new(move |c: &mut Vec<u8>| c[n / 2..n / 2 + 4096].fill(0x5a)),
            false,
        ),
        (
            "last page flipped",
            Box::new(move |c: &mut Vec<u8>| c[n - 4096..].iter_mut().for_each(|x| *x ^= 0xff)),
            false,
        ),
    ];
    for (name, damage, must_detect) in damages {
        let mut bytes = good.clone();
        damage(&mut bytes);
        std::fs::write(&catalog, &bytes).unwrap();
        let verify = p.target_cmd(&["verify", "--json"]);
        no_panic(&verify);
        let out = p.path(&format!("out-{}", name.replace(' ', "-")));
        let fo = p.target_cmd(&[
            "failover",
            "--group",
            "app",
            "--point",
            "latest",
            "--out",
            s(&out),
            "--json",
        ]);
        no_panic(&fo);
        let failover_ok =
            fo.status.success() && json(&String::from_utf8_lossy(&fo.stdout))["ok"] == true;
        if verify.status.success() {
            assert!(!must_detect, "{name}: verify passed a damaged catalog");
            assert!(
                failover_ok,
                "{name}: verify passed but failover failed: {}{}",
                String::from_utf8_lossy(&fo.stdout),
                String::from_utf8_lossy(&fo.stderr)
            );
            assert_eq!(digest(&out.join("volumes/a.img")), digest(&a), "{name}");
            assert_eq!(digest(&out.join("volumes/b.img")), digest(&b), "{name}");
        } else {
            let err = format!(
                "{}{}",
                String::from_utf8_lossy(&verify.stdout),
                String::from_utf8_lossy(&verify.stderr)
            );
            println!("{name}: verify says: {}", err.trim());
            assert!(
                err.contains("catalog") || err.contains("point 1"),
                "{name}: the error names neither the catalog nor the point: {err}"
            );
            if failover_ok {
                assert_eq!(digest(&out.join("volumes/a.img")), digest(&a), "{name}");
                assert_eq!(digest(&out.join("volumes/b.img")), digest(&b), "{name}");
            }
        }
    }
    std::fs::write(&catalog, &good).unwrap();
    assert!(
        p.target_cmd(&["verify"]).status.success(),
        "the undamaged catalog verifies again"
    );
}
