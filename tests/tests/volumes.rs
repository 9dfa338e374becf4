//! Volumes on loop devices and on multi-GiB sparse images replicate and fail over bit-exact
//! (invariant 2), holes travel as holes, and incremental cycles send only changed blocks.

use understudy_e2e::*;

#[test]
fn loop_devices_replicate_and_fail_over_onto_devices() {
    if !loop_devices_available() {
        return;
    }
    let mut p = Pair::new();
    p.start_target(&[]);
    // Sizes that are not a multiple of the block size: the size comes from the device.
    let (fa, fb) = (p.path("a.img"), p.path("b.img"));
    sparse_image(&fa, (48 << 20) + 3 * 4096);
    sparse_image(&fb, 32 << 20);
    write_random(&fa, 1 << 20, 4 << 20, 1);
    write_text(&fb, 0, 2 << 20, 2);
    write_random(&fa, (48 << 20) + 4096, 8192, 3); // in the last, partial block
    let (la, lb) = (
        LoopDevice::attach(&fa).unwrap(),
        LoopDevice::attach(&fb).unwrap(),
    );
    let vols = [("a", la.path.as_path()), ("b", lb.path.as_path())];
    let r1 = p.cycle("app", &vols, &[]);
    assert_eq!(r1["seq"], 1);
    let first_bytes = r1["bytes_sent"].as_u64().unwrap();
    assert!(
        first_bytes < 7 << 20,
        "holes were sent as data: {first_bytes} bytes"
    );

    write_random(&la.path, 10 << 20, 64 << 10, 4);
    let r2 = p.cycle("app", &vols, &[]);
    assert_eq!(r2["seq"], 2);
    assert_eq!(
        r2["chunks_sent"], 1,
        "one changed 64 KiB block, one chunk: {r2}"
    );

    let (da, db) = (digest(&la.path), digest(&lb.path));
    p.kill_target();
    // Rebuild onto two other loop devices.
    let (oa, ob) = (p.path("oa.img"), p.path("ob.img"));
    sparse_image(&oa, (48 << 20) + 3 * 4096);
    sparse_image(&ob, 32 << 20);
    write_random(&oa, 0, 1 << 20, 99); // stale bytes a hole must overwrite
    let (loa, lob) = (
        LoopDevice::attach(&oa).unwrap(),
        LoopDevice::attach(&ob).unwrap(),
    );
    let out = p.path("out");
    let rep = p.failover(
        "app",
        "latest",
        &out,
        &[
            "--device",
            &format!("a={}", s(&loa.path)),
            "--device",
            &format!("b={}", s(&lob.path)),
        ],
    );
    assert_eq!(rep["ok"], true, "{rep}");
    assert_eq!(digest(&loa.path), da);
    assert_eq!(digest(&lob.path), db);
}

#[test]
fn multi_gib_sparse_images_cost_only_their_data() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let v = p.path("big.img");
    let size: u64 = 6 << 30;
    sparse_image(&v, size);
    for (i, off) in [0u64, 1 << 30, 3 << 30, size - (1 << 20)]
        .iter()
        .enumerate()
    {
        write_random(&v, *off, 1 << 20, i as u64);
    }
    let r = p.cycle("big", &[("disk", &v)], &[]);
    assert!(
        r["bytes_read"].as_u64().unwrap() <= 16 << 20,
        "sparse ranges were read: {r}"
    );
    assert_eq!(
        r["chunks_sent"], 64,
        "4 MiB of data in 64 KiB chunks (a cut without manifests stores none)"
    );
    p.kill_target();
    let out = p.path("out");
    let rep = p.failover("big", "latest", &out, &[]);
    assert_eq!(rep["ok"], true, "{rep}");
    let restored = out.join("volumes/disk.img");
    assert_eq!(std::fs::metadata(&restored).unwrap().len(), size);
    assert_eq!(digest(&restored), digest(&v));
}

/// Invariant 4 at 1 TiB: a sparse volume costs its data, in the first cycle and after a change,
/// never its capacity (the scan, the base on disk, the offer, the target's maps, the rebuild).
#[test]
fn a_terabyte_sparse_volume_costs_its_data_in_every_cycle() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let v = p.path("tera.img");
    let size: u64 = 1 << 40;
    sparse_image(&v, size);
    let spots = [0u64, 300 << 30, 777 << 30, size - (2 << 20)];
    for (i, off) in spots.iter().enumerate() {
        write_random(&v, *off, 2 << 20, i as u64);
    }
    let r = p.cycle("tera", &[("disk", &v)], &[]);
    assert!(r["bytes_read"].as_u64().unwrap() <= 8 << 20, "{r}");
    assert_eq!(
        r["chunks_sent"], 128,
        "8 MiB of data (a cut without manifests stores none): {r}"
    );
    // 1 MiB changes, in one place.
    write_random(&v, 300 << 30, 1 << 20, 99);
    let r = p.cycle("tera", &[("disk", &v)], &[]);
    assert_eq!(r["blocks_changed"], 16, "{r}");
    assert_eq!(r["chunks_sent"], 16, "{r}");
    assert!(
        r["bytes_read"].as_u64().unwrap() <= 8 << 20,
        "only the data is read again: {r}"
    );
    assert!(p.source_dir.join("groups/tera/base.redb").exists());
    p.kill_target();
    // Rebuilt with read-back: the digest of what was written (data extents only) must equal the
    // source's digest of its bytes.
    let out = p.path("out");
    let rep = p.failover("tera", "latest", &out, &["--read-back"]);
    assert_eq!(rep["ok"], true, "{rep}");
    let restored = out.join("volumes/disk.img");
    assert_eq!(std::fs::metadata(&restored).unwrap().len(), size);
    let read = |path: &std::path::Path, off: u64| {
        let mut b = vec![0u8; 2 << 20];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(path).unwrap(), &mut b, off)
            .unwrap();
        b
    };
    for off in spots {
        assert!(
            read(&restored, off) == read(&v, off),
            "bytes at {off} differ"
        );
    }
    // The older point still restores (its map is the head with the change undone).
    let out1 = p.path("out1");
    let rep = p.failover("tera", "1", &out1, &["--read-back"]);
    assert_eq!(rep["ok"], true, "{rep}");
}
