//! The archive tier end to end, with a real S3 server (versitygw on 127.0.0.1,
//! understudy_e2e::s3): a target agent archives behind its commits; its store is deleted; a
//! store rebuilt from the bucket alone (`target-agent archive restore`, with keys that may only
//! read it) verifies, fails every point over bit-exact, and goes on serving. Uploads cut by a
//! SIGKILLed target or a stopped server resume; damaged objects are named.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};
use understudy_archive::archiver::newest_manifest;
use understudy_e2e::s3::{ArchiveFlags, S3Server};
use understudy_e2e::*;

const MIB: u64 = 1 << 20;

/// Bytes that differ block to block.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Waits until the archive's newest snapshot holds point `seq` of `group`.
async fn archived(s3: &S3Server, prefix: &str, group: &str, seq: u64, p: &Pair) {
    let b = s3.bucket_at(prefix);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = newest_manifest(&b).await.unwrap();
        if m.iter()
            .flat_map(|m| &m.points)
            .any(|x| x.group == group && x.seq == seq)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "point {seq} not archived after 60 s; target log:\n{}",
            p.target_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_rebuilt_from_the_bucket_alone_fails_every_point_over_bit_exact() {
    let Some(s3) = S3Server::start().await else {
        return;
    };
    let mut p = Pair::new();
    let f = s3.flags("standby-1", &["--archive-every", "1s"]);
    p.start_target_env(&f.serve(), &f.env());

    let vols = Volumes::create(&p, &["db", "logs"], 48 * MIB);
    let mut digests = Vec::new();
    for seq in 1..=3u8 {
        for (i, (_, path)) in vols.0.iter().enumerate() {
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let at = u64::from(seq) * 5 * MIB + i as u64 * MIB;
            f.write_all_at(&pattern(3 * MIB as usize, seq * 10 + i as u8), at)
                .unwrap();
        }
        p.cycle("app", &vols.refs(), &[]);
        digests.push(vols.digests());
    }
    archived(&s3, "standby-1", "app", 3, &p).await;

    // The standby's disk is gone: only the bucket is left, and keys that may only read it.
    p.kill_target();
    std::fs::remove_dir_all(p.target_dir.join("store")).unwrap();
    let reader = s3.read_only(&f).await;
    let e = format!(
        "{:#}",
        reader
            .client(&s3, "standby-1")
            .put("probe", b"x".to_vec())
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("check the credentials"),
        "the reader may write: {e}"
    );
    // Straight from the bucket, with no store at all.
    let direct = p.path("direct");
    let o = archive_cmd(
        &[
            "failover",
            "--group",
            "app",
            "--point",
            "2",
            "--out",
            s(&direct),
            "--json",
        ],
        &reader,
    );
    assert!(
        o.status.success(),
        "failover from the bucket with read-only keys: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(
        (r["ok"].clone(), r["point"].clone()),
        (true.into(), 2.into()),
        "{r}"
    );
    vols.assert_restored(&direct, &digests[1], "point 2 straight from the bucket");
    // A scratch directory that holds something else (here the agent's own) is never used.
    let o = archive_cmd(
        &[
            "failover",
            "--group",
            "app",
            "--scratch",
            s(&p.target_dir),
            "--out",
            s(&p.path("x")),
        ],
        &reader,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("give an empty directory"),
        "{e}"
    );

    let o = archive_cmd(&["restore", "--dir", s(&p.target_dir)], &reader);
    assert!(
        o.status.success(),
        "restore with read-only keys: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(
        report["points"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    let v = p.target_cmd(&["verify"]);
    assert!(
        v.status.success(),
        "verify of the restored store: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    for (seq, want) in (1..=3).zip(&digests) {
        let out = p.path(&format!("out.{seq}"));
        let r = p.failover("app", &seq.to_string(), &out, &[]);
        assert_eq!(r["ok"], true, "{r}");
        vols.assert_restored(&out, want, &format!("point {seq} from the bucket"));
    }

    // The rebuilt store goes on: the source's next point lands on it.
    p.start_target_env(&f.serve(), &f.env());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(vols.path(0))
        .unwrap();
    f.write_all_at(&pattern(MIB as usize, 99), 30 * MIB)
        .unwrap();
    let r = p.cycle("app", &vols.refs(), &[]);
    assert_eq!(r["seq"], 4, "{r}");
    archived(&s3, "standby-1", "app", 4, &p).await;
}

/// Every snapshot the archive lists has all its packs, whole.
async fn assert_complete(s3: &S3Server, prefix: &str) {
    let b = s3.bucket_at(prefix);
    let have: std::collections::HashMap<String, u64> = b
        .list("packs/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.name, o.size))
        .collect();
    for m in understudy_archive::archiver::manifests(&b).await.unwrap() {
        for (id, len) in &m.packs {
            let name = understudy_archive::layout::pack_name(*id);
            assert_eq!(
                have.get(&name),
                Some(len),
                "snapshot {} lists {name} of {len} bytes",
                m.stamp
            );
        }
    }
}

/// Waits until an upload under packs/ holds two parts.
async fn upload_under_way(s3: &S3Server, prefix: &str) {
    let b = s3.bucket_at(prefix);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (name, id) in b.uploads("packs/").await.unwrap_or_default() {
            if b.parts_of(&name, &id).await.map(|p| p.len()).unwrap_or(0) >= 2 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no upload seen in 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `understudy_archive_uploaded_bytes_total` of the agent's metrics at `addr`.
fn uploaded(addr: &str) -> u64 {
    scrape(addr)
        .lines()
        .find_map(|l| l.strip_prefix("understudy_archive_uploaded_bytes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("understudy_archive_uploaded_bytes_total in the agent's metrics") as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_cut_by_a_killed_target_or_a_stopped_server_resume_and_no_snapshot_lacks_a_pack() {
    let Some(mut s3) = S3Server::start().await else {
        return;
    };
    let mut p = Pair::new();
    let metrics = format!("127.0.0.1:{}", free_port());
    let f = s3.flags(
        "standby-2",
        &["--archive-every", "1s", "--metrics-addr", &metrics],
    );
    p.start_target_env(&f.serve(), &f.env());
    let vols = Volumes::create(&p, &["db"], 600 * MIB);
    let vol = std::fs::OpenOptions::new()
        .write(true)
        .open(vols.path(0))
        .unwrap();

    // SIGKILL the target while it uploads a pack.
    vol.write_all_at(&pattern(256 * MIB as usize, 1), 0)
        .unwrap();
    p.cycle("app", &vols.refs(), &[]);
    upload_under_way(&s3, "standby-2").await;
    p.kill_target();
    assert_complete(&s3, "standby-2").await;
    p.start_target_env(&f.serve(), &f.env());
    archived(&s3, "standby-2", "app", 1, &p).await;
    assert_complete(&s3, "standby-2").await;
    let after_kill = uploaded(&metrics);
    eprintln!("after the kill the target sent {after_kill} bytes");
    assert!(
        after_kill > 0 && after_kill < 256 * MIB,
        "the restarted target sent {after_kill} bytes: the upload started again in full"
    );

    // Stop the S3 server while the next pack is uploaded.
    vol.write_all_at(&pattern(256 * MIB as usize, 2), 300 * MIB)
        .unwrap();
    p.cycle("app", &vols.refs(), &[]);
    upload_under_way(&s3, "standby-2").await;
    s3.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    s3.restart();
    archived(&s3, "standby-2", "app", 2, &p).await;
    assert_complete(&s3, "standby-2").await;
    let sent = uploaded(&metrics) - after_kill;
    eprintln!("after the server came back the target sent {sent} bytes");
    assert!(
        sent > 0 && sent < 256 * MIB,
        "{sent} bytes sent after the server came back: the upload started again in full"
    );
    assert!(
        p.target_log().contains("archive round failed"),
        "the failed round was not logged:\n{}",
        p.target_log()
    );
    assert!(
        s3.bucket_at("standby-2")
            .uploads("packs/")
            .await
            .unwrap()
            .is_empty(),
        "unfinished uploads left"
    );
}

/// `target-agent archive <args> <bucket flags>` with the flags' keys.
fn archive_cmd(args: &[&str], f: &ArchiveFlags) -> std::process::Output {
    std::process::Command::new(bin("target-agent"))
        .arg("archive")
        .args(args)
        .args(f.bucket())
        .envs(f.env())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn archive_verify_and_restore_name_an_altered_pack_a_cut_pack_and_an_altered_snapshot() {
    let Some(s3) = S3Server::start().await else {
        return;
    };
    let mut p = Pair::new();
    let f = s3.flags("standby-3", &["--archive-every", "1s"]);
    p.start_target_env(&f.serve(), &f.env());
    let vols = Volumes::create(&p, &["db"], 16 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(vols.path(0))
        .unwrap()
        .write_all_at(&pattern(4 * MIB as usize, 7), MIB)
        .unwrap();
    p.cycle("app", &vols.refs(), &[]);
    archived(&s3, "standby-3", "app", 1, &p).await;
    p.kill_target();

    let o = archive_cmd(&["verify"], &f);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("archive is sound"),
        "{out}"
    );

    let m = newest_manifest(&s3.bucket_at("standby-3"))
        .await
        .unwrap()
        .unwrap();
    let (id, len) = *m.packs.iter().max_by_key(|(_, l)| *l).unwrap();
    let object = understudy_archive::layout::pack_name(id);
    let file = s3.data().join("standby/standby-3").join(&object);
    let original = std::fs::read(&file).unwrap();

    // One byte altered inside a chunk: named with the pack object and the point that uses it,
    // and a failover from a store restored from it hands out no volume.
    let mut altered = original.clone();
    altered[len as usize / 2] ^= 0x40;
    std::fs::write(&file, &altered).unwrap();
    let o = archive_cmd(&["verify"], &f);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains(&format!("in s3://standby/standby-3/{object} at offset")),
        "{out}"
    );
    assert!(
        out.contains("used by group app point 1 volume db at byte"),
        "{out}"
    );
    let o = archive_cmd(
        &[
            "failover",
            "--group",
            "app",
            "--point",
            "1",
            "--out",
            s(&p.path("out")),
            "--json",
        ],
        &f,
    );
    assert!(
        !o.status.success(),
        "a failover from a damaged pack succeeded"
    );
    let report = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["volumes"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("volume db, block at byte")),
        "the failover does not name where: {report}"
    );

    // The pack cut short: verify and restore name it and what it should hold.
    std::fs::write(&file, &original[..len as usize - 100]).unwrap();
    let o = archive_cmd(&["verify"], &f);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains(&format!(
            "pack {id} in s3://standby/standby-3/ holds {} bytes",
            len - 100
        )),
        "{out}"
    );
    std::fs::write(&file, &original).unwrap();

    // The catalog snapshot altered: refused against its manifest.
    let snap = s3
        .data()
        .join("standby/standby-3")
        .join(understudy_archive::layout::snapshot_name(&m.stamp));
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&snap, &bytes).unwrap();
    let o = archive_cmd(&["verify"], &f);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(out.contains("does not match its manifest"), "{out}");
}

/// Every file under `dir` (recursively) with `needle` in it.
fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if std::fs::read(&path)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_archive_holds_nothing_readable_and_opens_only_with_its_key() {
    let Some(s3) = S3Server::start().await else {
        return;
    };
    let mut p = Pair::new();
    let key = p.path("archive.key");
    std::fs::write(&key, hex::encode(pattern(32, 200))).unwrap();
    let f = s3.flags(
        "sealed",
        &["--archive-every", "1s", "--archive-key-file", s(&key)],
    );
    p.start_target_env(&f.serve(), &f.env());

    // A block nobody could guess (stored raw: it does not compress) and a Secret's value.
    let block = pattern(64 * 1024, 42);
    let secret = "correct-horse-7f3a9c-battery";
    let vols = Volumes::create(&p, &["db"], 16 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(vols.path(0))
        .unwrap()
        .write_all_at(&block, 2 * MIB)
        .unwrap();
    let manifests = p.path("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("secret.yaml"),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db-password\n  namespace: shop\nstringData:\n  password: {secret}\n"
        ),
    )
    .unwrap();
    p.cycle("app", &vols.refs(), &["--manifests", s(&manifests)]);
    let first = vols.digests();
    archived(&s3, "sealed", "app", 1, &p).await;

    // Nothing readable in the bucket: not the block, not its BLAKE3 (raw or hex), not the Secret.
    let objects = s3.data().join("standby/sealed");
    let hash = blake3::hash(&block);
    for (what, needle) in [
        ("the block", block.clone()),
        ("the block's BLAKE3", hash.as_bytes().to_vec()),
        (
            "the block's BLAKE3 in hex",
            hash.to_hex().as_bytes().to_vec(),
        ),
        ("the Secret's value", secret.as_bytes().to_vec()),
    ] {
        let found = files_holding(&objects, &needle);
        assert!(found.is_empty(), "{what} is readable in {found:?}");
    }
    // The same search finds the block in the target's own packs, which are not sealed yet
    // (docs/operations.md, "Limits"): the search works.
    assert!(!files_holding(&p.target_dir.join("store/packs"), &block).is_empty());

    p.kill_target();
    let out = p.path("out");
    let failover = |point: &str, out: &std::path::Path, key_flags: &[&str]| {
        let mut a = vec![
            "failover",
            "--group",
            "app",
            "--point",
            point,
            "--out",
            s(out),
            "--json",
        ];
        a.extend_from_slice(key_flags);
        archive_cmd(&a, &f)
    };
    // Without the key, or with another, it says so and writes nothing.
    let o = failover("1", &out, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("is encrypted"), "{e}");
    let wrong = p.path("wrong.key");
    std::fs::write(&wrong, pattern(32, 201)).unwrap();
    let o = failover("1", &out, &["--archive-key-file", s(&wrong)]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("is the wrong key"), "{e}");
    assert!(!out.exists(), "a refused failover wrote {}", out.display());

    // With it: bit-exact, and the Secret comes back among the manifests.
    let with_key = ["--archive-key-file", s(&key)];
    let o = failover("1", &out, &with_key);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    vols.assert_restored(&out, &first, "point 1 of the encrypted archive");
    assert!(!files_holding(&out.join("manifests"), secret.as_bytes()).is_empty());
    let o = archive_cmd(&["verify", "--archive-key-file", s(&key)], &f);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));

    // A new key generation seals what comes next; the older data stays readable.
    let o = archive_cmd(&["rotate-key", "--archive-key-file", s(&key)], &f);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    p.start_target_env(&f.serve(), &f.env());
    std::fs::OpenOptions::new()
        .write(true)
        .open(vols.path(0))
        .unwrap()
        .write_all_at(&pattern(MIB as usize, 43), 8 * MIB)
        .unwrap();
    p.cycle("app", &vols.refs(), &["--manifests", s(&manifests)]);
    let second = vols.digests();
    archived(&s3, "sealed", "app", 2, &p).await;
    p.kill_target();
    let m = newest_manifest(&s3.bucket_at("sealed"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.key_generation, Some(2), "{m:?}");
    for (point, want) in [("1", &first), ("2", &second)] {
        let out = p.path(&format!("rotated.{point}"));
        let o = failover(point, &out, &with_key);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        vols.assert_restored(&out, want, &format!("point {point} after the rotation"));
    }

    // A sealed pack altered: verify names the object; nothing is restored from it.
    let (id, _) = *m.packs.iter().max_by_key(|(_, l)| *l).unwrap();
    let pack = objects.join(understudy_archive::layout::pack_name(id));
    let original = std::fs::read(&pack).unwrap();
    let mut altered = original.clone();
    altered[16 + 48 + 100] ^= 0x10; // inside the first record's sealed frame
    std::fs::write(&pack, &altered).unwrap();
    let o = archive_cmd(&["verify", "--archive-key-file", s(&key)], &f);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains(&understudy_archive::layout::pack_name(id))
            && out.contains("does not decrypt"),
        "{out}"
    );
    std::fs::write(&pack, &original).unwrap();

    // The first generation's key object lost: what it sealed is refused by name.
    std::fs::remove_file(objects.join("keys/00000001.json")).unwrap();
    let out = p.path("lost");
    let o = failover("1", &out, &with_key);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("key generation 1 is missing"),
        "{e}"
    );
    let o = archive_cmd(&["verify", "--archive-key-file", s(&key)], &f);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(out.contains("key generation 1 is missing"), "{out}");
}

/// The archived snapshots' stamps: (manifests, snapshot objects).
async fn catalog_objects(s3: &S3Server, prefix: &str) -> (usize, usize) {
    let names: Vec<String> = s3
        .bucket_at(prefix)
        .list(understudy_archive::layout::CATALOG)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    let count = |ext: &str| names.iter().filter(|n| n.ends_with(ext)).count();
    (count(".json"), count(".snap"))
}

/// Waits until the archive holds `want` (manifests, snapshot objects).
async fn settles_at(s3: &S3Server, prefix: &str, want: (usize, usize)) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let have = catalog_objects(s3, prefix).await;
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the archive holds {have:?} (manifests, snapshots) after 30 s, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_archive_keeps_its_own_number_and_age_of_snapshots() {
    let Some(s3) = S3Server::start().await else {
        return;
    };
    let mut p = Pair::new();
    let keep = s3.flags("kept", &["--archive-every", "1s", "--archive-keep", "2"]);
    p.start_target_env(&keep.serve(), &keep.env());
    let vols = Volumes::create(&p, &["db"], 8 * MIB);
    let write = |seed: u8| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(vols.path(0))
            .unwrap()
            .write_all_at(&pattern(MIB as usize, seed), u64::from(seed) * MIB)
            .unwrap();
    };
    for seq in 1..=3u8 {
        write(seq);
        p.cycle("app", &vols.refs(), &[]);
        archived(&s3, "kept", "app", u64::from(seq), &p).await;
    }
    // One snapshot per round that found something new; the two newest stay (the round's
    // retention runs just after its manifest is written: wait for it).
    settles_at(&s3, "kept", (2, 2)).await;

    // Older than --archive-max-age: gone at the next round, but for the newest snapshot.
    let aged = s3.flags(
        "kept",
        &[
            "--archive-every",
            "1s",
            "--archive-keep",
            "2",
            "--archive-max-age",
            "2s",
        ],
    );
    p.kill_target();
    p.start_target_env(&aged.serve(), &aged.env());
    tokio::time::sleep(Duration::from_secs(3)).await;
    write(4);
    p.cycle("app", &vols.refs(), &[]);
    archived(&s3, "kept", "app", 4, &p).await;
    settles_at(&s3, "kept", (1, 1)).await;
    // What is left restores every point the store holds.
    p.kill_target();
    let o = archive_cmd(&["verify"], &aged);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let m = newest_manifest(&s3.bucket_at("kept"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.points.len(), 4, "{m:?}");
}
